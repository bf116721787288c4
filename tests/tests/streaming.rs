//! Streaming: events are forwarded as they arrive (proved with a hold gate), the usage-only
//! chunk is requested and stripped unless the client asked for it, and tokens are metered.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use portcullis_e2e::client::SseEvent;
use portcullis_e2e::fixture::*;
use portcullis_e2e::{
    assert, eventually, Fixture, FixtureOptions, Gateway, GatewayOptions, Manifests, UpstreamOptions,
};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

fn chat_text(events: &[SseEvent]) -> String {
    events.iter().filter_map(|e| e.json()["choices"][0]["delta"]["content"].as_str().map(str::to_string)).collect()
}

fn is_usage_only(e: &SseEvent) -> bool {
    e.json()["choices"].as_array().is_some_and(Vec::is_empty)
}

/// Waits until the token usage histogram has counted `input`/`output` tokens (summed over labels).
async fn wait_token_usage(fx: &Fixture, input: f64, output: f64) {
    let result = eventually(Duration::from_secs(5), "token usage metrics", || async {
        let m = fx.gateway.metrics().await.ok()?;
        let i = m.sum("gen_ai_client_token_usage_sum", &[("gen_ai_token_type", "input")]);
        let o = m.sum("gen_ai_client_token_usage_sum", &[("gen_ai_token_type", "output")]);
        (i == input && o == output).then_some(())
    })
    .await;
    if result.is_err() {
        let text = fx.gateway.metrics_text().await.unwrap_or_default();
        let usage: Vec<&str> = text.lines().filter(|l| l.contains("gen_ai_client_token_usage")).collect();
        panic!("expected input={input} output={output} tokens metered; metrics:\n{}", usage.join("\n"));
    }
}

#[tokio::test]
async fn first_event_reaches_client_before_upstream_sends_its_last() {
    let fx = Fixture::start().await.expect("fixture");
    for upstream in [&fx.openai, &fx.anthropic] {
        upstream.hold_last_event();
    }

    // OpenAI chat.
    let mut stream = fx.chat_stream(ALICE_KEY, "gpt-4o-mini").await.unwrap();
    assert_eq!(stream.status, 200);
    assert!(stream.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")));
    assert!(stream.header("x-request-id").is_some());
    let first = stream.next_event(T).await.unwrap().expect("a first event while upstream holds its last");
    assert_eq!(first.json()["object"], "chat.completion.chunk");
    fx.openai.wait_held(1, T).await.unwrap();
    assert!(fx.openai.stream_timings()[0].last_event_sent.is_none(), "upstream is still holding its last event");
    fx.openai.release();
    let rest = stream.collect_events(T).await.unwrap();
    assert!(rest.last().is_some_and(SseEvent::is_done), "stream must end with [DONE]: {rest:?}");
    let last_sent = fx.openai.stream_timings()[0].last_event_sent.expect("upstream sent its last event");
    assert!(first.at < last_sent, "client got its first event only after upstream sent the last one");
    let mut all = vec![first];
    all.extend(rest);
    assert_eq!(chat_text(&all), "Hello from the loopback upstream.");

    // Anthropic messages.
    let mut stream = fx.messages_stream(ALICE_KEY, "claude-3-5-haiku-latest").await.unwrap();
    assert_eq!(stream.status, 200);
    let first = stream.next_event(T).await.unwrap().expect("message_start while upstream holds message_stop");
    assert_eq!(first.event.as_deref(), Some("message_start"));
    fx.anthropic.wait_held(1, T).await.unwrap();
    fx.anthropic.release();
    let rest = stream.collect_events(T).await.unwrap();
    assert_eq!(rest.last().and_then(|e| e.event.as_deref()), Some("message_stop"));
    let last_sent = fx.anthropic.stream_timings()[0].last_event_sent.expect("upstream sent message_stop");
    assert!(first.at < last_sent);
}

#[tokio::test]
async fn events_are_forwarded_one_by_one_not_batched() {
    let opts = FixtureOptions {
        upstream: UpstreamOptions { chunks: 6, event_delay: Duration::from_millis(150), ..Default::default() },
        ..Default::default()
    };
    let fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    let mut stream = fx.chat_stream(ALICE_KEY, "gpt-4o").await.unwrap();
    let events = stream.collect_events(T).await.unwrap();
    // role + 6 deltas + finish + [DONE] = 9 events, 150 ms apart upstream.
    assert_eq!(events.len(), 9, "{events:?}");
    let spread = events.last().unwrap().at - events.first().unwrap().at;
    assert!(spread >= Duration::from_millis(900), "events arrived within {spread:?}: buffered?");
    let gaps = events.windows(2).filter(|w| w[1].at - w[0].at >= Duration::from_millis(60)).count();
    assert!(gaps >= 6, "expected events to arrive spaced out, only {gaps} gaps >= 60ms");
}

#[tokio::test]
async fn usage_chunk_is_requested_and_stripped_when_client_did_not_ask() {
    let fx = Fixture::start().await.expect("fixture");
    let mut stream = fx.chat_stream(ALICE_KEY, "gpt-4o-mini").await.unwrap();
    assert_eq!(stream.status, 200);
    let events = stream.collect_events(T).await.unwrap();

    let sent = fx.openai.last_request().unwrap().json();
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"]["include_usage"], true, "gateway must ask upstream for usage: {sent}");

    assert!(!events.iter().any(is_usage_only), "usage-only chunk must be stripped: {events:?}");
    assert!(events.last().is_some_and(SseEvent::is_done), "{events:?}");
    assert_eq!(events.iter().filter(|e| e.is_done()).count(), 1);
    assert_eq!(chat_text(&events), "Hello from the loopback upstream.");
    assert!(events.iter().any(|e| e.json()["choices"][0]["finish_reason"] == "stop"));
    wait_token_usage(&fx, 17.0, 9.0).await;
    let m = fx.gateway.metrics().await.unwrap();
    assert!(m.has("gen_ai_server_time_to_first_token"), "gen_ai_server_time_to_first_token missing after a stream");
}

/// `"stream_options": null` (or a value that is not an object) asks for nothing: the gateway
/// asks for usage in its place, so the stream is metered on the provider's counts.
#[tokio::test]
async fn usage_is_requested_when_stream_options_is_not_an_object() {
    let fx = Fixture::start().await.expect("fixture");
    let auth = format!("Bearer {ALICE_KEY}");
    for (options, usage_tokens) in [(json!(null), (17.0, 9.0)), (json!([false]), (34.0, 18.0))] {
        let mut body = chat_body("gpt-4o-mini", "hi", true);
        body["stream_options"] = options.clone();
        let mut stream = fx
            .client
            .post_json_streaming(&fx.url("/v1/chat/completions"), &[("authorization", &auth)], &body)
            .await
            .unwrap();
        assert_eq!(stream.status, 200, "{options}");
        let events = stream.collect_events(T).await.unwrap();
        let sent = fx.openai.last_request().unwrap().json();
        assert_eq!(sent["stream_options"], json!({"include_usage": true}), "{options}: {sent}");
        assert!(!events.iter().any(is_usage_only), "{options}: the chunk asked for is stripped: {events:?}");
        assert!(events.last().is_some_and(SseEvent::is_done), "{options}: {events:?}");
        // The provider's counts, summed over the streams so far (an estimate would differ).
        wait_token_usage(&fx, usage_tokens.0, usage_tokens.1).await;
    }
}

#[tokio::test]
async fn usage_chunk_is_kept_when_client_asked() {
    let fx = Fixture::start().await.expect("fixture");
    let auth = format!("Bearer {ALICE_KEY}");
    let mut body = chat_body("gpt-4o-mini", "hi", true);
    body["stream_options"] = json!({"include_usage": true});
    let mut stream = fx
        .client
        .post_json_streaming(&fx.url("/v1/chat/completions"), &[("authorization", &auth)], &body)
        .await
        .unwrap();
    let events = stream.collect_events(T).await.unwrap();
    let usage: Vec<&SseEvent> = events.iter().filter(|e| is_usage_only(e)).collect();
    assert_eq!(usage.len(), 1, "exactly one usage chunk: {events:?}");
    let u = &usage[0].json()["usage"];
    assert_eq!(u["prompt_tokens"], 17);
    assert_eq!(u["completion_tokens"], 9);
    assert!(events.last().is_some_and(SseEvent::is_done));
    assert_eq!(fx.openai.last_request().unwrap().json()["stream_options"]["include_usage"], true);
    wait_token_usage(&fx, 17.0, 9.0).await;
}

#[tokio::test]
async fn anthropic_stream_is_forwarded_in_order_and_metered() {
    let fx = Fixture::start().await.expect("fixture");
    let mut stream = fx.messages_stream(ALICE_KEY, "claude-3-5-haiku-latest").await.unwrap();
    assert_eq!(stream.status, 200);
    let events = stream.collect_events(T).await.unwrap();
    let names: Vec<&str> = events.iter().filter_map(|e| e.event.as_deref()).collect();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(std::iter::repeat_n("content_block_delta", 4));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    for e in &events {
        assert_eq!(e.json()["type"].as_str(), e.event.as_deref(), "event name matches data.type");
    }
    let text: String = events.iter().filter_map(|e| e.json()["delta"]["text"].as_str().map(str::to_string)).collect();
    assert_eq!(text, "Hello from the loopback upstream.");
    wait_token_usage(&fx, 17.0, 9.0).await;

    let m = fx.gateway.metrics().await.unwrap();
    let sample = m
        .matching("gen_ai_client_token_usage_count", &[("gen_ai_token_type", "input")])
        .next()
        .expect("token usage series");
    assert_eq!(sample.labels.get("gen_ai_request_model").map(String::as_str), Some("claude-3-5-haiku-latest"));
    for label in ["gen_ai_provider_name", "gen_ai_operation_name"] {
        assert!(sample.labels.contains_key(label), "missing label {label}: {sample:?}");
    }
}

#[tokio::test]
async fn non_streaming_usage_and_request_metrics() {
    let fx = Fixture::start().await.expect("fixture");
    assert::ok(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap());
    assert::ok(&fx.messages(ALICE_KEY, &messages_body("claude-3-5-haiku-latest", "hi", false), &[]).await.unwrap());
    let auth = format!("Bearer {ALICE_KEY}");
    let emb = fx
        .client
        .post_json(
            &fx.url("/v1/embeddings"),
            &[("authorization", &auth)],
            &json!({"model": "text-embedding-3-small", "input": "x"}),
        )
        .await
        .unwrap();
    assert::ok(&emb);
    // chat 17/9 + messages 17/9 + embeddings 17/0.
    wait_token_usage(&fx, 51.0, 18.0).await;

    let m = fx.gateway.metrics().await.unwrap();
    let _ = fx.chat(UNKNOWN_KEY, "gpt-4o-mini").await.unwrap();
    let m2 = fx.gateway.metrics().await.unwrap();
    let total: f64 = m2.sum("portcullis_requests_total", &[]);
    assert!(total >= 4.0, "portcullis_requests_total should count every request: {total}");
    assert!(m2.sum("portcullis_requests_total", &[]) > m.sum("portcullis_requests_total", &[]));
    for s in m2.matching("portcullis_requests_total", &[]) {
        assert!(s.labels.contains_key("route") && s.labels.contains_key("outcome"), "{s:?}");
    }
    assert!(m2.has("gen_ai_server_request_duration"), "gen_ai_server_request_duration missing");
}

/// `--busy-poll-us`: the spinner turns while requests arrive, JSON and streams are served as
/// usual, and it stops turning (the core idles) one window after traffic stops.
#[tokio::test]
async fn busy_polling_spins_with_traffic_and_parks_without() {
    let options = FixtureOptions::with_args(&["--worker-threads", "1", "--busy-poll-us", "20000"]);
    let fx = Fixture::start_with(options, |_| {}).await.expect("fixture");
    let turns = || async { fx.gateway.metrics().await.expect("metrics").sum("portcullis_busy_poll_turns_total", &[]) };

    let before = turns().await;
    for _ in 0..5 {
        let response = fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap();
        assert_eq!(response.status, 200);
    }
    let events = fx.chat_stream(ALICE_KEY, "gpt-4o-mini").await.unwrap().collect_events(T).await.unwrap();
    assert!(events.last().is_some_and(SseEvent::is_done), "stream must end with [DONE]: {events:?}");
    let after_traffic = turns().await;
    assert!(after_traffic > before, "the spinner turned while requests came in ({before} → {after_traffic})");

    // Quiet: a window (20 ms) later it parks; scraping /metrics is not a request that wakes it.
    let parked = eventually(Duration::from_secs(5), "the spinner parks", || async {
        let first = turns().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        (turns().await == first).then_some(first)
    })
    .await
    .expect("the spinner stops turning once traffic stops");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(turns().await, parked, "a parked spinner stays parked");

    // The next request wakes it again.
    assert_eq!(fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap().status, 200);
    assert!(turns().await > parked, "a request wakes the spinner");
}

/// Spinning on the multi-threaded runtime would burn a worker that serves nothing: refused.
#[tokio::test]
async fn busy_polling_needs_the_single_threaded_runtime() {
    let options = GatewayOptions { wait_ready: false, ..GatewayOptions::with_args(&["--busy-poll-us", "200"]) };
    let mut gateway = Gateway::start(&Manifests::new(), options).await.expect("spawned");
    let status = gateway.wait_exit(T).await.expect("exits");
    assert!(!status.success());
    let logs = gateway.logs();
    assert!(logs.contains("--busy-poll-us needs --worker-threads 1"), "clear error expected, got:\n{logs}");
}
