//! Bad input and upstream failures get clear errors in the style of the API they came in on,
//! each with `x-portcullis-error-code` and `x-request-id`; request ids are propagated.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use portcullis_e2e::fixture::*;
use portcullis_e2e::manifests as m;
use portcullis_e2e::{assert, eventually, free_port, Fixture, FixtureOptions, GatewayOptions, UpstreamOptions};
use serde_json::json;

#[tokio::test]
async fn bad_json_and_missing_model_are_400_in_both_formats() {
    let fx = Fixture::start().await.expect("fixture");
    let auth = format!("Bearer {ALICE_KEY}");
    let chat_url = fx.url("/v1/chat/completions");
    let msg_url = fx.url("/v1/messages");
    let oa = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let an = [("x-api-key", ALICE_KEY), ("anthropic-version", "2023-06-01"), ("content-type", "application/json")];

    let r = fx.client.post_raw(&chat_url, &oa, "{\"model\": \"gpt-4o-mini\", \"messages\": [").await.unwrap();
    assert::openai_error(&r, 400, "invalid_request");
    let r = fx.client.post_raw(&chat_url, &oa, "").await.unwrap();
    assert::openai_error(&r, 400, "invalid_request");
    let r = fx
        .client
        .post_json(&chat_url, &oa[..1], &json!({"messages": [{"role": "user", "content": "hi"}]}))
        .await
        .unwrap();
    assert::openai_error(&r, 400, "invalid_request");
    let r = fx.client.post_json(&chat_url, &oa[..1], &json!({"model": 42, "messages": []})).await.unwrap();
    assert::openai_error(&r, 400, "invalid_request");
    let r = fx.client.post_raw(&chat_url, &oa, "[1, 2, 3]").await.unwrap();
    assert::openai_error(&r, 400, "invalid_request");
    let r = fx.client.post_raw(&fx.url("/v1/embeddings"), &oa, "not json at all").await.unwrap();
    assert::openai_error(&r, 400, "invalid_request");

    let r = fx.client.post_raw(&msg_url, &an, "{\"model\": ").await.unwrap();
    assert::anthropic_error(&r, 400, "invalid_request", Some("invalid_request_error"));
    let r = fx.client.post_json(&msg_url, &an[..2], &json!({"max_tokens": 5, "messages": []})).await.unwrap();
    assert::anthropic_error(&r, 400, "invalid_request", Some("invalid_request_error"));
    let r = fx.client.post_raw(&msg_url, &an, vec![0xff_u8, 0xfe, 0x00, 0x01]).await.unwrap();
    assert::anthropic_error(&r, 400, "invalid_request", Some("invalid_request_error"));

    assert_eq!(fx.openai.request_count() + fx.anthropic.request_count(), 0, "bad requests must not reach upstream");
    // The gateway is still healthy afterwards.
    assert::ok(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap());
}

#[tokio::test]
async fn oversize_body_is_413_in_both_formats() {
    let opts = FixtureOptions {
        gateway: GatewayOptions { max_request_body_bytes: Some(2048), ..Default::default() },
        ..Default::default()
    };
    let fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    let big = "x".repeat(8 * 1024);

    let r = fx.chat_with(ALICE_KEY, &chat_body("gpt-4o-mini", &big, false), &[]).await.unwrap();
    assert::openai_error(&r, 413, "request_too_large");
    let r = fx.messages(ALICE_KEY, &messages_body("claude-3-5-haiku-latest", &big, false), &[]).await.unwrap();
    assert::anthropic_error(&r, 413, "request_too_large", Some("request_too_large"));

    let small = fx.chat_with(ALICE_KEY, &chat_body("gpt-4o-mini", &"z".repeat(512), false), &[]).await.unwrap();
    assert::ok(&small);
    assert_eq!(fx.openai.request_count(), 1);
    assert_eq!(fx.anthropic.request_count(), 0);
}

/// A body far over the limit must still get a readable 413, not a reset: the gateway has to
/// drain the body (or close only after the client could read the answer). Each attempt uses a
/// fresh connection; hyper's client, like most, writes the whole body before reading.
#[tokio::test]
async fn far_oversize_body_gets_a_clean_413_not_a_reset() {
    let opts = FixtureOptions {
        gateway: GatewayOptions { max_request_body_bytes: Some(2048), ..Default::default() },
        ..Default::default()
    };
    let fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    let huge = chat_body("gpt-4o-mini", &"y".repeat(4 * 1024 * 1024), false);
    let mut outcomes = Vec::new();
    for _ in 0..8 {
        let client = portcullis_e2e::TestClient::with_ca(&fx.pki).unwrap();
        let auth = format!("Bearer {ALICE_KEY}");
        match client.post_json(&fx.url("/v1/chat/completions"), &[("authorization", &auth)], &huge).await {
            Ok(r) => outcomes.push(format!("{} {}", r.status, r.error_code().unwrap_or("-"))),
            Err(e) => outcomes.push(format!("transport error: {:#}", e)),
        }
    }
    assert!(
        outcomes.iter().all(|o| o == "413 Payload Too Large request_too_large"),
        "1 MiB bodies over a 2 KiB limit: {outcomes:#?}"
    );
}

#[tokio::test]
async fn default_body_limit_is_four_mebibytes() {
    let fx = Fixture::start().await.expect("fixture");
    let under =
        fx.chat_with(ALICE_KEY, &chat_body("gpt-4o-mini", &"a".repeat(3 * 1024 * 1024), false), &[]).await.unwrap();
    assert::ok(&under);
    let over =
        fx.chat_with(ALICE_KEY, &chat_body("gpt-4o-mini", &"b".repeat(4 * 1024 * 1024 + 1), false), &[]).await.unwrap();
    assert::openai_error(&over, 413, "request_too_large");
    assert_eq!(fx.openai.request_count(), 1);
}

#[tokio::test]
async fn unreachable_upstream_is_502_in_both_formats() {
    let dead = free_port().unwrap();
    let fx = Fixture::start_with(Default::default(), |ms| {
        let url = format!("https://127.0.0.1:{dead}/v1");
        ms.add(
            PROVIDERS_FILE,
            m::provider(
                "dead-openai",
                "openai",
                Some(&url),
                Some(("openai-upstream-key", "key")),
                &[("gpt-dead", None)],
            ),
        );
        ms.add(
            PROVIDERS_FILE,
            m::provider(
                "dead-anthropic",
                "anthropic",
                Some(&url),
                Some(("anthropic-upstream-key", "key")),
                &[("claude-dead", None)],
            ),
        );
    })
    .await
    .expect("fixture");

    let r = fx.chat(ALICE_KEY, "gpt-dead").await.unwrap();
    assert::openai_error(&r, 502, "upstream_unavailable");
    assert!(!r.text().contains(OPENAI_PROVIDER_KEY));
    let r = fx.messages(ALICE_KEY, &messages_body("claude-dead", "hi", false), &[]).await.unwrap();
    assert::anthropic_error(&r, 502, "upstream_unavailable", None);

    let auth = format!("Bearer {ALICE_KEY}");
    let mut body = chat_body("gpt-dead", "hi", true);
    body["stream"] = json!(true);
    let r = fx.client.post_json(&fx.url("/v1/chat/completions"), &[("authorization", &auth)], &body).await.unwrap();
    assert::openai_error(&r, 502, "upstream_unavailable");

    // Healthy providers are unaffected.
    assert::ok(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap());
}

#[tokio::test]
async fn slow_upstream_is_504_in_both_formats() {
    let opts = FixtureOptions {
        upstream: UpstreamOptions { response_delay: Duration::from_secs(4), ..Default::default() },
        ..FixtureOptions::with_args(&["--upstream-response-timeout", "1"])
    };
    let fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    let started = tokio::time::Instant::now();
    let r = fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap();
    assert::openai_error(&r, 504, "upstream_timeout");
    let r = fx.messages(ALICE_KEY, &messages_body("claude-3-5-haiku-latest", "hi", false), &[]).await.unwrap();
    assert::anthropic_error(&r, 504, "upstream_timeout", None);
    assert!(started.elapsed() < Duration::from_secs(7), "timeouts took {:?}", started.elapsed());
}

#[tokio::test]
async fn request_ids_are_propagated_or_generated() {
    let fx = Fixture::start().await.expect("fixture");
    let given = "e2e-req-7d41c2a9b3e8";

    let ok = fx.chat_with(ALICE_KEY, &chat_body("gpt-4o-mini", "hi", false), &[("x-request-id", given)]).await.unwrap();
    assert::ok(&ok);
    assert_eq!(ok.request_id(), Some(given));

    let err =
        fx.chat_with(UNKNOWN_KEY, &chat_body("gpt-4o-mini", "hi", false), &[("x-request-id", given)]).await.unwrap();
    assert::openai_error(&err, 401, "invalid_api_key");
    assert_eq!(err.request_id(), Some(given));

    let an = fx
        .messages(UNKNOWN_KEY, &messages_body("claude-3-5-haiku-latest", "hi", false), &[("x-request-id", given)])
        .await
        .unwrap();
    assert_eq!(an.request_id(), Some(given));

    let a = fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap();
    let b = fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap();
    let (a, b) = (a.request_id().unwrap().to_string(), b.request_id().unwrap().to_string());
    assert!(!a.is_empty() && a != b, "generated ids must be unique: {a} {b}");

    let malformed = format!("<script>\"{}\"</script>", "z".repeat(300));
    let r =
        fx.chat_with(ALICE_KEY, &chat_body("gpt-4o-mini", "hi", false), &[("x-request-id", &malformed)]).await.unwrap();
    assert::ok(&r);
    let id = r.request_id().unwrap();
    assert_ne!(id, malformed, "a malformed x-request-id must be replaced");
    assert!(!id.contains('<') && !id.contains('"'));

    // The access log names the request id (metadata only).
    eventually(Duration::from_secs(5), "access log line with the request id", || async {
        let logs = fx.gateway.logs();
        logs.lines()
            .find(|l| {
                l.contains("portcullis::access")
                    && l.contains(given)
                    && (l.contains("status=200") || l.contains("\"status\":200"))
            })
            .map(str::to_string)
    })
    .await
    .map(|line| {
        // Metadata only: key id, provider, model, status, latency, tokens.
        for needle in ["default/alice", "openai-main", "gpt-4o-mini", "latency", "tokens"] {
            assert!(line.contains(needle), "access log line lacks {needle}: {line}");
        }
    })
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", fx.gateway.logs()));
}

#[tokio::test]
async fn unknown_routes_and_methods_still_carry_error_code_and_request_id() {
    let fx = Fixture::start().await.expect("fixture");
    let auth = format!("Bearer {ALICE_KEY}");
    let r = fx.client.post_json(&fx.url("/v1/not-a-route"), &[("authorization", &auth)], &json!({})).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.describe());
    assert!(r.error_code().is_some_and(|c| !c.is_empty()), "{}", r.describe());
    assert::has_request_id(&r);
    let r = fx.client.get(&fx.url("/v1/chat/completions"), &[("authorization", &auth)]).await.unwrap();
    assert!(r.status == 405 || r.status == 404, "{}", r.describe());
    assert!(r.error_code().is_some_and(|c| !c.is_empty()), "{}", r.describe());
    assert::has_request_id(&r);
    assert_eq!(fx.openai.request_count(), 0);
}

#[tokio::test]
async fn upstream_error_status_reaches_the_client_with_a_request_id() {
    let fx = Fixture::start().await.expect("fixture");
    fx.openai.set(|o| o.fail_status = Some(500));
    let r = fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap();
    assert!(r.status.is_server_error(), "{}", r.describe());
    assert::has_request_id(&r);
    assert!(!r.text().contains(OPENAI_PROVIDER_KEY));
    fx.openai.set(|o| o.fail_status = Some(429));
    let r = fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap();
    assert_eq!(r.status, 429, "an upstream rate limit is relayed: {}", r.describe());
    assert::has_request_id(&r);
    fx.openai.set(|o| o.fail_status = None);
    assert::ok(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap());
}

#[tokio::test]
async fn admin_endpoints_answer() {
    let fx = Fixture::start().await.expect("fixture");
    let healthz = fx.client.get(&fx.gateway.admin_url("/healthz"), &[]).await.unwrap();
    assert_eq!(healthz.status, 200);
    let readyz = fx.client.get(&fx.gateway.admin_url("/readyz"), &[]).await.unwrap();
    assert_eq!(readyz.status, 200);
    let metrics = fx.gateway.metrics().await.unwrap();
    assert!(metrics.get("portcullis_snapshot_generation", &[]).is_some_and(|g| g >= 1.0));
    assert_eq!(metrics.get("portcullis_snapshot_valid", &[]), Some(1.0));
    assert!(metrics.text.contains("portcullis_snapshot_reload_failures_total"));
}

/// Sends a chat request whose head declares all of `body` but only the first half of it, and
/// stalls: the gateway holds the body's share of the budget while it waits for the rest.
async fn partly_sent(fx: &Fixture, body: &str, sent: usize) -> (tokio::net::TcpStream, String) {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(fx.gateway.listen_addr()).await.expect("connect");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALICE_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let (sent, rest) = body.split_at(sent);
    stream.write_all(format!("{head}{sent}").as_bytes()).await.expect("write");
    (stream, rest.to_owned())
}

/// Sends the rest of a half-sent body and reads the response to the end.
async fn finish_sending(stream: &mut tokio::net::TcpStream, rest: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(rest.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut response))
        .await
        .expect("answered within 20 s")
        .expect("read");
    String::from_utf8_lossy(&response).into_owned()
}

/// `--max-buffered-body-bytes` bounds the request bodies held at once, counted as they arrive:
/// a client that declares a body and sends nothing of it holds nothing. While two clients are
/// still sending ~4 KiB bodies, ~3.9 KiB of each received, a third body that does not fit the
/// 10 KiB budget is refused at once, unread, with a 503 in the API's format and `Retry-After`. A
/// body is let go once written to the provider: while the two wait for a provider that takes
/// 3 s, they hold nothing, and the same body fits again. The metrics give the budget and the
/// refusals.
#[tokio::test]
async fn request_bodies_held_at_once_are_bounded() {
    let options = FixtureOptions {
        upstream: UpstreamOptions { response_delay: Duration::from_secs(3), ..Default::default() },
        ..FixtureOptions::with_args(&["--max-request-body-bytes", "4096", "--max-buffered-body-bytes", "10240"])
    };
    let fx = Fixture::start_with(options, |_| {}).await.expect("fixture");
    let prompt = "x".repeat(3950);
    let big_chat = chat_body("gpt-4o-mini", &prompt, false);
    let held = || async { fx.gateway.metrics().await.ok().map(|m| m.sum("portcullis_request_body_bytes_held", &[])) };

    // Declared, nothing sent: nothing held (it used to take its whole length from the budget).
    let raw = big_chat.to_string();
    let (_silent, _) = partly_sent(&fx, &raw, 0).await;
    let ok = fx.chat_with(ALICE_KEY, &chat_body("gpt-4o-mini", "hi", false), &[]).await.unwrap();
    assert_eq!(ok.status, 200, "{}", ok.describe());
    assert_eq!(held().await, Some(0.0), "a silent body holds nothing");

    // Two clients nearly done sending ~3 KiB bodies.
    let nearly = raw.len() - 64;
    let (mut first, first_rest) = partly_sent(&fx, &raw, nearly).await;
    let (mut second, second_rest) = partly_sent(&fx, &raw, nearly).await;
    eventually(Duration::from_secs(10), "both bodies' received bytes held", || async {
        held().await.filter(|bytes| *bytes == (2 * nearly) as f64)
    })
    .await
    .expect("two bodies held as they arrived");

    // A third does not fit: refused at once, in both APIs' formats.
    let started = std::time::Instant::now();
    let chat = fx.chat_with(ALICE_KEY, &big_chat, &[]).await.unwrap();
    let anthropic =
        fx.messages(ALICE_KEY, &messages_body("claude-3-5-haiku-latest", &prompt, false), &[]).await.unwrap();
    assert::openai_error(&chat, 503, "gateway_overloaded");
    assert_eq!(chat.header("retry-after"), Some("1"), "{}", chat.describe());
    assert_eq!(chat.header("retry-after-ms"), Some("1000"), "{}", chat.describe());
    assert::anthropic_error(&anthropic, 503, "gateway_overloaded", Some("overloaded_error"));
    assert!(started.elapsed() < Duration::from_secs(2), "refused at once: {:?}", started.elapsed());

    // Both finish sending; written to the provider, which takes 3 s, their bodies are let go
    // and the same body fits while they wait.
    let (first, second, third) =
        tokio::join!(finish_sending(&mut first, &first_rest), finish_sending(&mut second, &second_rest), async {
            eventually(Duration::from_secs(2), "bodies let go once written", || async {
                held().await.filter(|bytes| *bytes == 0.0)
            })
            .await
            .expect("nothing held while the provider thinks");
            fx.chat_with(ALICE_KEY, &big_chat, &[]).await.unwrap()
        });
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert_eq!(third.status, 200, "{}", third.describe());

    let metrics = fx.gateway.metrics().await.expect("metrics");
    assert_eq!(metrics.get("portcullis_request_body_budget_bytes", &[]), Some(10240.0));
    assert_eq!(metrics.get("portcullis_request_body_bytes_held", &[]), Some(0.0));
    assert_eq!(metrics.sum("portcullis_requests_total", &[("outcome", "gateway_overloaded")]), 2.0);
}

/// A body the gateway rewrites for the provider (here: usage asked for on a stream the client
/// did not ask it for) is a second copy, held beside the client's until the request is written,
/// and takes its share of the budget too, before it is admitted (a refusal spends none of the
/// key's limits). With a ~4 KiB body held, a ~4 KiB stream fits the 10 KiB budget as it
/// arrives but not with its copy, and is refused with a 503; the same body not streamed (sent
/// as it came) is served; once the held body is gone the largest stream fits with its copy at
/// the least budget the flags allow.
#[tokio::test]
async fn a_rewritten_body_takes_its_share_of_the_budget() {
    let options =
        FixtureOptions::with_args(&["--max-request-body-bytes", "4096", "--max-buffered-body-bytes", "10240"]);
    let fx = Fixture::start_with(options, |_| {}).await.expect("fixture");
    let prompt = "x".repeat(3950);
    let (streamed, plain) = (chat_body("gpt-4o-mini", &prompt, true), chat_body("gpt-4o-mini", &prompt, false));
    let held = || async { fx.gateway.metrics().await.ok().map(|m| m.sum("portcullis_request_body_bytes_held", &[])) };

    let raw = plain.to_string();
    let nearly = raw.len() - 64;
    let (mut waiting, rest) = partly_sent(&fx, &raw, nearly).await;
    eventually(Duration::from_secs(10), "the partly sent body held", || async {
        held().await.filter(|bytes| *bytes == nearly as f64)
    })
    .await
    .expect("held as it arrived");

    let refused = fx.chat_with(ALICE_KEY, &streamed, &[]).await.unwrap();
    assert::openai_error(&refused, 503, "gateway_overloaded");
    let served = fx.chat_with(ALICE_KEY, &plain, &[]).await.unwrap();
    assert_eq!(served.status, 200, "{}", served.describe());

    let first = finish_sending(&mut waiting, &rest).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let stream = fx.chat_with(ALICE_KEY, &streamed, &[]).await.unwrap();
    assert_eq!(stream.status, 200, "{}", stream.describe());
    assert_eq!(fx.openai.last_request().unwrap().json()["stream_options"]["include_usage"], true);
    // The largest body a client may send, streamed, at the least budget (2 × 4096 + 2048).
    let largest = chat_body("gpt-4o-mini", "", true).to_string();
    let largest =
        largest.replacen(r#""content":"""#, &format!(r#""content":"{}""#, "y".repeat(4096 - largest.len())), 1);
    assert_eq!(largest.len(), 4096);
    let stream = fx
        .client
        .post_raw(
            &fx.url("/v1/chat/completions"),
            &[("authorization", &format!("Bearer {ALICE_KEY}")), ("content-type", "application/json")],
            largest,
        )
        .await
        .unwrap();
    assert_eq!(stream.status, 200, "{}", stream.describe());
    assert_eq!(held().await, Some(0.0), "both copies let go");
    let metrics = fx.gateway.metrics().await.expect("metrics");
    assert_eq!(metrics.sum("portcullis_requests_total", &[("outcome", "gateway_overloaded")]), 1.0);
}
