//! Zero content retention: with trace logging, unique markers in prompts and in upstream
//! answers never show up in the gateway's output or metrics; neither do provider or client keys.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use portcullis_e2e::fixture::*;
use portcullis_e2e::{assert, unique, Fixture, FixtureOptions, GatewayOptions, UpstreamOptions};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

async fn exercise_every_route(fx: &Fixture, prompt_marker: &str, response_marker: &str) {
    let auth = format!("Bearer {ALICE_KEY}");
    let oa = [("authorization", auth.as_str())];
    let an = [("x-api-key", ALICE_KEY), ("anthropic-version", "2023-06-01")];
    let prompt = format!("Please repeat {prompt_marker} back to me");

    let r = fx.chat_with(ALICE_KEY, &chat_body("gpt-4o-mini", &prompt, false), &[]).await.unwrap();
    assert::ok(&r);
    assert!(r.text().contains(response_marker), "content must pass through to the client");

    let mut s = fx
        .client
        .post_json_streaming(&fx.url("/v1/chat/completions"), &oa, &chat_body("gpt-4o", &prompt, true))
        .await
        .unwrap();
    let body = s.collect_body(T).await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains(response_marker));

    let mut with_usage = chat_body("gpt-alias", &prompt, true);
    with_usage["stream_options"] = json!({"include_usage": true});
    let mut s = fx.client.post_json_streaming(&fx.url("/v1/chat/completions"), &oa, &with_usage).await.unwrap();
    s.collect_body(T).await.unwrap();

    let r = fx.messages(ALICE_KEY, &messages_body("claude-3-5-haiku-latest", &prompt, false), &[]).await.unwrap();
    assert::ok(&r);
    assert!(r.text().contains(response_marker));

    let mut s = fx
        .client
        .post_json_streaming(&fx.url("/v1/messages"), &an, &messages_body("claude-3-5-haiku-latest", &prompt, true))
        .await
        .unwrap();
    let body = s.collect_body(T).await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains(response_marker));

    let r = fx
        .client
        .post_json(&fx.url("/v1/embeddings"), &oa, &json!({"model": "text-embedding-3-small", "input": prompt}))
        .await
        .unwrap();
    assert::ok(&r);
    let r = fx
        .client
        .post_json(&fx.url("/v1/completions"), &oa, &json!({"model": "gpt-3.5-turbo-instruct", "prompt": prompt}))
        .await
        .unwrap();
    assert::ok(&r);
    let r =
        fx.client.post_json(&fx.url("/v1/responses"), &oa, &json!({"model": "gpt-4o", "input": prompt})).await.unwrap();
    assert::ok(&r);
    let r = fx.chat_with(ALICE_KEY, &chat_body("gpt-azure", &prompt, false), &[]).await.unwrap();
    assert::ok(&r);

    // Error paths must not echo content either.
    let bad = format!("{{\"model\": \"gpt-4o-mini\", \"messages\": [{{\"content\": \"{prompt_marker}\"");
    let r = fx
        .client
        .post_raw(
            &fx.url("/v1/chat/completions"),
            &[("authorization", auth.as_str()), ("content-type", "application/json")],
            bad.clone(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(!r.text().contains(prompt_marker), "error echoes content: {}", r.text());
    let r = fx
        .client
        .post_raw(&fx.url("/v1/messages"), &[("x-api-key", ALICE_KEY), ("content-type", "application/json")], bad)
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(!r.text().contains(prompt_marker), "error echoes content: {}", r.text());
    let r = fx.chat_with(UNKNOWN_KEY, &chat_body("gpt-4o-mini", &prompt, false), &[]).await.unwrap();
    assert!(!r.text().contains(prompt_marker));
    let r = fx.chat_with(BOB_KEY, &chat_body("gpt-4o", &prompt, false), &[]).await.unwrap();
    assert_eq!(r.status, 403);
    assert!(!r.text().contains(prompt_marker));
}

fn assert_clean(what: &str, text: &str, needles: &[(&str, &str)]) {
    for (label, needle) in needles {
        if let Some(pos) = text.find(needle) {
            let start = text[..pos].rfind('\n').map(|p| p + 1).unwrap_or(0);
            let end = text[pos..].find('\n').map(|p| pos + p).unwrap_or(text.len());
            panic!("{label} found in {what}: {}", &text[start..end]);
        }
    }
}

async fn run_canary(log_format: Option<&str>) {
    let prompt_marker = unique("CANARYPROMPT");
    let response_marker = unique("CANARYREPLY");
    let opts = FixtureOptions {
        gateway: GatewayOptions {
            log_level: "trace".to_string(),
            log_format: log_format.map(str::to_string),
            ..Default::default()
        },
        upstream: UpstreamOptions {
            response_text: format!("Sure: {response_marker}"),
            chunks: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    exercise_every_route(&fx, &prompt_marker, &response_marker).await;

    // Upstreams really saw the prompt (so its absence from logs means something).
    assert!(fx.openai.requests().iter().any(|r| r.contains_anywhere(&prompt_marker)));
    assert!(fx.anthropic.requests().iter().any(|r| r.contains_anywhere(&prompt_marker)));

    let needles = [
        ("prompt marker", prompt_marker.as_str()),
        ("response marker", response_marker.as_str()),
        ("OpenAI provider key", OPENAI_PROVIDER_KEY),
        ("Anthropic provider key", ANTHROPIC_PROVIDER_KEY),
        ("Azure provider key", AZURE_PROVIDER_KEY),
        ("alice's client key", ALICE_KEY),
        ("bob's client key", BOB_KEY),
        ("unknown client key", UNKNOWN_KEY),
    ];
    // Client-chosen model names that match nothing must not become metric labels either.
    let r = fx.chat_with(ALICE_KEY, &chat_body(&format!("gpt-{prompt_marker}"), "hi", false), &[]).await.unwrap();
    assert_eq!(r.status, 404);
    let metrics = fx.gateway.metrics_text().await.unwrap();
    assert_clean("/metrics", &metrics, &needles);

    let status = fx.gateway.shutdown(Duration::from_secs(15)).await.unwrap();
    assert!(status.success(), "exit status {status}");
    let logs = fx.gateway.logs();
    assert!(logs.lines().count() > 20, "trace logging should produce output; got:\n{logs}");
    assert!(logs.contains("portcullis::access"), "expected access log lines; got:\n{logs}");
    assert_clean("gateway logs", &logs, &needles);
    assert_clean("raw gateway output", &fx.gateway.raw_logs(), &needles);
    if log_format == Some("json") {
        for line in logs.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                serde_json::from_str::<serde_json::Value>(line).is_ok(),
                "--log-format json line is not JSON: {line}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_content_or_secrets_in_trace_text_logs_or_metrics() {
    run_canary(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_content_or_secrets_in_trace_json_logs() {
    run_canary(Some("json")).await;
}
