//! Response bodies and SSE event sequences in the OpenAI and Anthropic wire formats, as the
//! loopback upstreams send them.

use serde_json::{json, Value};

use crate::upstream::UpstreamOptions;

const CREATED: u64 = 1_700_000_000;

/// Splits `text` into at most `n` non-empty pieces on char boundaries.
pub fn split_text(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    let n = n.clamp(1, chars.len());
    let size = chars.len().div_ceil(n);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

fn data(value: &Value) -> String {
    format!("data: {value}\n\n")
}

fn event(name: &str, value: &Value) -> String {
    format!("event: {name}\ndata: {value}\n\n")
}

fn openai_usage(o: &UpstreamOptions) -> Value {
    json!({"prompt_tokens": o.input_tokens, "completion_tokens": o.output_tokens, "total_tokens": o.input_tokens + o.output_tokens})
}

pub fn openai_chat_json(model: &str, o: &UpstreamOptions) -> Value {
    json!({
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": o.response_text}, "logprobs": null, "finish_reason": "stop"}],
        "usage": openai_usage(o),
        "system_fingerprint": "fp_loopback"
    })
}

/// Role chunk, one chunk per text piece, finish chunk, optional usage-only chunk, `[DONE]`.
pub fn openai_chat_events(model: &str, o: &UpstreamOptions, include_usage: bool) -> Vec<String> {
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({
            "id": "chatcmpl-loopback",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_loopback",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        data(&c)
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    for piece in split_text(&o.response_text, o.chunks) {
        events.push(chunk(json!({"content": piece}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        events.push(data(&json!({
            "id": "chatcmpl-loopback",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_loopback",
            "choices": [],
            "usage": openai_usage(o)
        })));
    }
    events.push("data: [DONE]\n\n".to_string());
    events
}

pub fn openai_completion_json(model: &str, o: &UpstreamOptions) -> Value {
    json!({
        "id": "cmpl-loopback",
        "object": "text_completion",
        "created": CREATED,
        "model": model,
        "choices": [{"text": o.response_text, "index": 0, "logprobs": null, "finish_reason": "stop"}],
        "usage": openai_usage(o)
    })
}

pub fn openai_completion_events(model: &str, o: &UpstreamOptions, include_usage: bool) -> Vec<String> {
    let chunk = |text: &str, finish: Value| {
        data(&json!({
            "id": "cmpl-loopback", "object": "text_completion", "created": CREATED, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]
        }))
    };
    let mut events: Vec<String> =
        split_text(&o.response_text, o.chunks).iter().map(|p| chunk(p, Value::Null)).collect();
    events.push(chunk("", json!("stop")));
    if include_usage {
        events.push(data(&json!({
            "id": "cmpl-loopback", "object": "text_completion", "created": CREATED, "model": model,
            "choices": [], "usage": openai_usage(o)
        })));
    }
    events.push("data: [DONE]\n\n".to_string());
    events
}

pub fn openai_embeddings_json(model: &str, o: &UpstreamOptions) -> Value {
    json!({
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.011, -0.022, 0.033, 0.044]}],
        "model": model,
        "usage": {"prompt_tokens": o.input_tokens, "total_tokens": o.input_tokens}
    })
}

pub fn openai_responses_json(model: &str, o: &UpstreamOptions) -> Value {
    json!({
        "id": "resp_loopback",
        "object": "response",
        "created_at": CREATED,
        "status": "completed",
        "model": model,
        "output": [{
            "type": "message", "id": "msg_loopback", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": o.response_text, "annotations": []}]
        }],
        "usage": {"input_tokens": o.input_tokens, "output_tokens": o.output_tokens, "total_tokens": o.input_tokens + o.output_tokens}
    })
}

pub fn anthropic_json(model: &str, o: &UpstreamOptions) -> Value {
    json!({
        "id": "msg_loopback",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": o.response_text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": o.input_tokens, "output_tokens": o.output_tokens}
    })
}

/// message_start, content_block_start, ping, deltas, content_block_stop, message_delta, message_stop.
pub fn anthropic_events(model: &str, o: &UpstreamOptions) -> Vec<String> {
    let mut events = vec![
        event(
            "message_start",
            &json!({
                "type": "message_start",
                "message": {
                    "id": "msg_loopback", "type": "message", "role": "assistant", "model": model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": o.input_tokens, "output_tokens": 1}
                }
            }),
        ),
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", &json!({"type": "ping"})),
    ];
    for piece in split_text(&o.response_text, o.chunks) {
        events.push(event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
        ));
    }
    events.push(event("content_block_stop", &json!({"type": "content_block_stop", "index": 0})));
    events.push(event(
        "message_delta",
        &json!({
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": o.output_tokens}
        }),
    ));
    events.push(event("message_stop", &json!({"type": "message_stop"})));
    events
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn split_text_covers_all_chars() {
        assert_eq!(split_text("abcdefg", 3).concat(), "abcdefg");
        assert_eq!(split_text("ab", 5).len(), 2);
        assert_eq!(split_text("", 3), vec![String::new()]);
    }

    #[test]
    fn openai_stream_ends_with_usage_then_done() {
        let o = UpstreamOptions::default();
        let events = openai_chat_events("m", &o, true);
        assert_eq!(events.last().map(String::as_str), Some("data: [DONE]\n\n"));
        assert!(events[events.len() - 2].contains("\"choices\":[]"));
        let without = openai_chat_events("m", &o, false);
        assert!(!without.iter().any(|e| e.contains("\"choices\":[]")));
    }
}
