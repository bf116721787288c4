//! Streams already open when a kill switch over their scope is flipped end with a final error
//! event in the API's format within a second of the new snapshot being applied. (Revocation is
//! different: in-flight requests finish on their snapshot; see hot_reload.rs.)
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use tokio::time::Instant;

use portcullis_e2e::fixture::*;
use portcullis_e2e::{Fixture, FixtureOptions, UpstreamOptions};
use serde_json::json;

fn slow_stream() -> FixtureOptions {
    // 400 events 25 ms apart: ten seconds of stream, far longer than the test waits.
    FixtureOptions {
        upstream: UpstreamOptions { chunks: 400, event_delay: Duration::from_millis(25), ..Default::default() },
        ..Default::default()
    }
}

/// Reads events until the stream ends; returns them and when the last one arrived.
async fn drain(stream: &mut portcullis_e2e::StreamingResponse) -> (Vec<portcullis_e2e::SseEvent>, Instant) {
    let mut events = Vec::new();
    while let Some(event) = stream.next_event(Duration::from_secs(5)).await.expect("event") {
        events.push(event);
    }
    let at = events.last().map_or_else(Instant::now, |e| e.at);
    (events, at)
}

#[tokio::test]
async fn open_openai_stream_ends_when_a_global_switch_is_applied() {
    let mut fx = Fixture::start_with(slow_stream(), |_| {}).await.expect("fixture");
    let mut stream = fx.chat_stream(ALICE_KEY, "gpt-4o-mini").await.expect("stream");
    assert_eq!(stream.status, 200);
    stream.next_event(Duration::from_secs(5)).await.expect("first event").expect("not ended");

    fx.reload(|ms| {
        ms.update("KillSwitch", "emergency-stop", |d| d["spec"]["active"] = json!(true));
    })
    .await
    .expect("reload");
    let applied = Instant::now();
    let (events, ended) = drain(&mut stream).await;
    let last = events.last().expect("events").json();
    assert_eq!(last["error"]["code"], "kill_switch_active", "last event: {last}");
    assert!(last["error"]["message"].as_str().unwrap_or_default().contains("emergency-stop"));
    let lag = ended.saturating_duration_since(applied);
    println!("stream ended {lag:?} after the snapshot was observed applied ({} events)", events.len());
    assert!(lag < Duration::from_secs(1), "stream ended {lag:?} after the switch was applied");
    assert!(events.len() < 300, "the stream was cut, not finished");
}

#[tokio::test]
async fn open_anthropic_stream_ends_when_its_provider_is_stopped() {
    let mut fx = Fixture::start_with(slow_stream(), |_| {}).await.expect("fixture");
    let mut stream = fx.messages_stream(ALICE_KEY, "claude-3-5-haiku-latest").await.expect("stream");
    assert_eq!(stream.status, 200);
    stream.next_event(Duration::from_secs(5)).await.expect("first event").expect("not ended");

    fx.reload(|ms| {
        ms.add(
            SWITCHES_FILE,
            portcullis_e2e::manifests::kill_switch("stop-anthropic", json!({"provider": "anthropic-main"}), true, "x"),
        );
    })
    .await
    .expect("reload");
    let applied = Instant::now();
    let (events, ended) = drain(&mut stream).await;
    let last = events.last().expect("events");
    assert_eq!(last.event.as_deref(), Some("error"), "last event: {last:?}");
    assert_eq!(last.json()["error"]["type"], "api_error");
    assert!(last.json()["error"]["message"].as_str().unwrap_or_default().contains("stop-anthropic"));
    assert!(ended.saturating_duration_since(applied) < Duration::from_secs(1));
}

#[tokio::test]
async fn streams_outside_the_switch_scope_continue() {
    let mut fx = Fixture::start_with(
        FixtureOptions {
            upstream: UpstreamOptions { chunks: 40, event_delay: Duration::from_millis(25), ..Default::default() },
            ..Default::default()
        },
        |_| {},
    )
    .await
    .expect("fixture");
    let mut stream = fx.chat_stream(ALICE_KEY, "gpt-4o-mini").await.expect("stream");
    stream.next_event(Duration::from_secs(5)).await.expect("first event").expect("not ended");
    fx.reload(|ms| {
        ms.add(
            SWITCHES_FILE,
            portcullis_e2e::manifests::kill_switch("stop-anthropic", json!({"provider": "anthropic-main"}), true, "x"),
        );
    })
    .await
    .expect("reload");
    let (events, _) = drain(&mut stream).await;
    assert!(events.last().expect("events").is_done(), "an OpenAI stream is not in an Anthropic switch's scope");
}
