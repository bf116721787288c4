//! The `mock` provider kind: answers in-process in the OpenAI and Anthropic formats, JSON and SSE,
//! so a setup can be exercised offline. It is a product feature, not a test double: it goes
//! through the same authentication, routing, kill switches and metering as any provider.
//!
//! Replies are fixed text; token counts are estimates (about four bytes of request per input
//! token, one token per reply word). Embeddings are deterministic unit vectors derived from each
//! input, in float or base64 encoding as requested.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::ApiRoute;
use crate::body::{BoxError, GatewayBody};

/// What every mock completion says.
pub const MOCK_REPLY: &str = "Hello from the Portcullis mock provider. Your gateway works.";

#[derive(Deserialize, Default)]
struct MockRequest {
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    encoding_format: Option<String>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

fn reply_words() -> Vec<String> {
    let words: Vec<&str> = MOCK_REPLY.split(' ').collect();
    words.iter().enumerate().map(|(i, w)| if i == 0 { (*w).to_owned() } else { format!(" {w}") }).collect()
}

/// Answers `route` for `model` from the (already rewritten) upstream request body.
pub fn respond(route: ApiRoute, body: &[u8], model: &str) -> Response<GatewayBody> {
    let request: MockRequest = serde_json::from_slice(body).unwrap_or_default();
    let input_tokens = (body.len() as u64).div_ceil(4).max(1);
    let output_tokens = reply_words().len() as u64;
    let id = format!("mock-{:016x}", fastrand::u64(..));
    match (route, request.stream) {
        (ApiRoute::Embeddings, _) => match embeddings(&request, model, input_tokens) {
            Ok(value) => json_response(value),
            Err(why) => invalid_request(&why, "input"),
        },
        (ApiRoute::Messages, false) => json_response(json!({
            "id": format!("msg_{id}"), "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": MOCK_REPLY}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}
        })),
        (ApiRoute::Messages, true) => sse_response(anthropic_stream(&id, model, input_tokens, output_tokens)),
        (ApiRoute::ChatCompletions, false) => json_response(json!({
            "id": format!("chatcmpl-{id}"), "object": "chat.completion", "created": now_secs(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": MOCK_REPLY, "refusal": null},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}
        })),
        (ApiRoute::ChatCompletions, true) => {
            let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
            sse_response(chat_stream(&id, model, include_usage, input_tokens, output_tokens))
        }
        (ApiRoute::Completions, false) => json_response(json!({
            "id": format!("cmpl-{id}"), "object": "text_completion", "created": now_secs(), "model": model,
            "choices": [{"text": MOCK_REPLY, "index": 0, "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}
        })),
        (ApiRoute::Completions, true) => {
            let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
            sse_response(completion_stream(&id, model, include_usage, input_tokens, output_tokens))
        }
        (ApiRoute::Responses, false) => json_response(response_object(&id, model, input_tokens, output_tokens)),
        (ApiRoute::Responses, true) => sse_response(responses_stream(&id, model, input_tokens, output_tokens)),
        (ApiRoute::Models, _) => json_response(json!({"object": "list", "data": []})),
    }
}

fn json_response(value: Value) -> Response<GatewayBody> {
    mock_response(StatusCode::OK, &value)
}

fn mock_response(status: StatusCode, value: &Value) -> Response<GatewayBody> {
    let mut response = crate::body::json_response(status, value);
    response.headers_mut().insert("x-portcullis-mock", HeaderValue::from_static("true"));
    response
}

/// A 400 as OpenAI words it.
fn invalid_request(message: &str, param: &str) -> Response<GatewayBody> {
    let error = json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": null}});
    mock_response(StatusCode::BAD_REQUEST, &error)
}

fn sse_response(events: Vec<String>) -> Response<GatewayBody> {
    let frames = events.into_iter().map(|e| Ok::<_, BoxError>(Frame::data(Bytes::from(e))));
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-portcullis-mock", HeaderValue::from_static("true"));
    response
}

fn data(value: &Value) -> String {
    format!("data: {value}\n\n")
}

fn named(event: &str, value: &Value) -> String {
    format!("event: {event}\ndata: {value}\n\n")
}

fn chat_stream(id: &str, model: &str, include_usage: bool, input: u64, output: u64) -> Vec<String> {
    let created = now_secs();
    let usage_null = include_usage.then_some(Value::Null);
    let chunk = |delta: Value, finish: Value| {
        let mut v = json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        if let Some(u) = &usage_null {
            v["usage"] = u.clone();
        }
        data(&v)
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    events.extend(reply_words().into_iter().map(|w| chunk(json!({"content": w}), Value::Null)));
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        events.push(data(&json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output}})));
    }
    events.push("data: [DONE]\n\n".to_owned());
    events
}

fn completion_stream(id: &str, model: &str, include_usage: bool, input: u64, output: u64) -> Vec<String> {
    let created = now_secs();
    let mut events: Vec<String> = reply_words()
        .into_iter()
        .map(|w| {
            data(&json!({"id": format!("cmpl-{id}"), "object": "text_completion", "created": created, "model": model,
                              "choices": [{"text": w, "index": 0, "logprobs": null, "finish_reason": null}]}))
        })
        .collect();
    events.push(data(
        &json!({"id": format!("cmpl-{id}"), "object": "text_completion", "created": created, "model": model,
                             "choices": [{"text": "", "index": 0, "logprobs": null, "finish_reason": "stop"}]}),
    ));
    if include_usage {
        events.push(data(&json!({"id": format!("cmpl-{id}"), "object": "text_completion", "created": created, "model": model,
            "choices": [], "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output}})));
    }
    events.push("data: [DONE]\n\n".to_owned());
    events
}

fn anthropic_stream(id: &str, model: &str, input: u64, output: u64) -> Vec<String> {
    let mut events = vec![
        named(
            "message_start",
            &json!({"type": "message_start", "message": {"id": format!("msg_{id}"), "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": input, "output_tokens": 1}}}),
        ),
        named(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        named("ping", &json!({"type": "ping"})),
    ];
    events.extend(reply_words().into_iter().map(|w| {
        named(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}),
        )
    }));
    events.push(named("content_block_stop", &json!({"type": "content_block_stop", "index": 0})));
    events.push(named(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                                               "usage": {"output_tokens": output}}),
    ));
    events.push(named("message_stop", &json!({"type": "message_stop"})));
    events
}

fn response_object(id: &str, model: &str, input: u64, output: u64) -> Value {
    json!({
        "id": format!("resp_{id}"), "object": "response", "created_at": now_secs(), "status": "completed", "model": model,
        "output": [{"type": "message", "id": format!("msg_{id}"), "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": MOCK_REPLY, "annotations": []}]}],
        "usage": {"input_tokens": input, "output_tokens": output, "total_tokens": input + output}
    })
}

fn responses_stream(id: &str, model: &str, input: u64, output: u64) -> Vec<String> {
    let mut created = response_object(id, model, input, output);
    created["status"] = json!("in_progress");
    created["output"] = json!([]);
    created.as_object_mut().map(|o| o.remove("usage"));
    let mut events = vec![named("response.created", &json!({"type": "response.created", "response": created}))];
    events.extend(reply_words().into_iter().map(|w| {
        named(
            "response.output_text.delta",
            &json!({"type": "response.output_text.delta", "item_id": format!("msg_{id}"),
                                                     "output_index": 0, "content_index": 0, "delta": w}),
        )
    }));
    events.push(named(
        "response.completed",
        &json!({"type": "response.completed", "response": response_object(id, model, input, output)}),
    ));
    events
}

/// A deterministic unit vector for one input.
fn embedding_for(input: &Value, dimensions: usize) -> Vec<f32> {
    let seed = input
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let mut rng = fastrand::Rng::with_seed(seed);
    let raw: Vec<f32> = (0..dimensions).map(|_| rng.f32() * 2.0 - 1.0).collect();
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::EPSILON);
    raw.into_iter().map(|x| x / norm).collect()
}

/// Inputs in one embeddings request at most (OpenAI's limit).
const MAX_EMBEDDING_INPUTS: usize = 2048;
/// Numbers in one mock embeddings answer at most (inputs × dimensions; about 5 MB of JSON): a
/// small request must not make the gateway build a huge one in memory.
const MAX_EMBEDDING_VALUES: usize = 256 * 1024;

fn embeddings(request: &MockRequest, model: &str, input_tokens: u64) -> Result<Value, String> {
    let inputs: &[Value] = match &request.input {
        Some(Value::Array(items)) if items.iter().all(|i| !i.is_number()) => items,
        Some(other) => std::slice::from_ref(other),
        None => &[],
    };
    let dimensions = request.dimensions.unwrap_or(16).clamp(1, 4096);
    if inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(format!("'$.input' holds {} items; at most {MAX_EMBEDDING_INPUTS} are accepted.", inputs.len()));
    }
    if inputs.len() * dimensions > MAX_EMBEDDING_VALUES {
        return Err(format!(
            "The mock provider answers at most {MAX_EMBEDDING_VALUES} embedding values per request \
             ({} inputs × {dimensions} dimensions asked).",
            inputs.len()
        ));
    }
    let base64_encoding = request.encoding_format.as_deref() == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = embedding_for(input, dimensions);
            let embedding = if base64_encoding {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(
        json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": input_tokens, "total_tokens": input_tokens}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_text(response: Response<GatewayBody>) -> String {
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf8")
    }

    #[tokio::test]
    async fn chat_stream_honours_include_usage() {
        let with = body_text(respond(
            ApiRoute::ChatCompletions,
            br#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            "m",
        ))
        .await;
        assert!(with.contains("\"choices\":[]") && with.ends_with("data: [DONE]\n\n"));
        let without = body_text(respond(ApiRoute::ChatCompletions, br#"{"stream":true}"#, "m")).await;
        assert!(!without.contains("prompt_tokens"));
    }

    /// A small request cannot make the mock build a huge answer: refused as OpenAI would.
    #[tokio::test]
    async fn embeddings_beyond_the_bounds_are_refused() {
        let many = format!(r#"{{"input":[{}],"dimensions":4096}}"#, vec!["[]"; 2000].join(","));
        let refused = respond(ApiRoute::Embeddings, many.as_bytes(), "e");
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        let body: Value = serde_json::from_str(&body_text(refused).await).expect("json");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "input");
        let too_many = format!(r#"{{"input":[{}],"dimensions":1}}"#, vec!["\"a\""; MAX_EMBEDDING_INPUTS + 1].join(","));
        assert_eq!(respond(ApiRoute::Embeddings, too_many.as_bytes(), "e").status(), StatusCode::BAD_REQUEST);
        // At the bound it is answered.
        let at_bound = format!(r#"{{"input":[{}],"dimensions":4096}}"#, vec!["\"a\""; 64].join(","));
        let answered = respond(ApiRoute::Embeddings, at_bound.as_bytes(), "e");
        assert_eq!(answered.status(), StatusCode::OK);
        let body: Value = serde_json::from_str(&body_text(answered).await).expect("json");
        assert_eq!(body["data"].as_array().map(Vec::len), Some(64));
    }

    #[tokio::test]
    async fn embeddings_in_both_encodings() {
        let floats: Value = serde_json::from_str(
            &body_text(respond(ApiRoute::Embeddings, br#"{"input":["a","b"],"dimensions":4}"#, "e")).await,
        )
        .expect("json");
        assert_eq!(floats["data"].as_array().map(Vec::len), Some(2));
        assert_eq!(floats["data"][0]["embedding"].as_array().map(Vec::len), Some(4));
        let b64: Value = serde_json::from_str(
            &body_text(respond(ApiRoute::Embeddings, br#"{"input":"a","encoding_format":"base64"}"#, "e")).await,
        )
        .expect("json");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64["data"][0]["embedding"].as_str().expect("str"))
            .expect("b64");
        assert_eq!(decoded.len(), 16 * 4);
    }

    #[tokio::test]
    async fn anthropic_stream_shape() {
        let text = body_text(respond(ApiRoute::Messages, br#"{"stream":true}"#, "c")).await;
        assert!(text.starts_with("event: message_start\n"));
        assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    }
}
