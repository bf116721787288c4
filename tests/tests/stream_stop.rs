//! Streams already open when a kill switch over their scope is flipped end with a final error
//! event in the API's format within a second of the new snapshot being applied; requests still
//! waiting, for their provider or for their own body, are refused with the switch's error.
//! (Revocation is different: in-flight requests finish on their snapshot; see hot_reload.rs.)
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

/// A switch reaches requests that have not streamed yet too: one whose provider is still
/// thinking ends with the switch's error as soon as the snapshot is applied (its provider
/// connection dropped), not when the provider answers.
#[tokio::test]
async fn a_request_waiting_on_its_provider_is_stopped_by_a_switch_set_meanwhile() {
    let options = FixtureOptions {
        upstream: UpstreamOptions { response_delay: Duration::from_secs(4), ..Default::default() },
        ..Default::default()
    };
    let fx = Fixture::start_with(options, |_| {}).await.expect("fixture");
    let mut stopped = fx.manifests.clone();
    stopped.update("KillSwitch", "emergency-stop", |d| d["spec"]["active"] = json!(true));
    let started = Instant::now();
    let (response, applied) = tokio::join!(fx.chat(ALICE_KEY, "gpt-4o-mini"), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        fx.gateway.reload(&stopped).await.expect("reload");
        Instant::now()
    });
    let response = response.expect("response");
    assert_eq!(response.status, 503, "{}", response.describe());
    assert_eq!(response.error_code(), Some("kill_switch_active"));
    let lag = Instant::now().saturating_duration_since(applied);
    assert!(lag < Duration::from_secs(1), "answered {lag:?} after the switch was applied");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}: the provider's answer was awaited", started.elapsed());
}

/// A body still arriving when a switch is set: the request is checked against the snapshot of
/// when its body is complete, and refused.
#[tokio::test]
async fn a_request_whose_body_arrives_after_a_switch_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fx = Fixture::start().await.expect("fixture");
    let body = chat_body("gpt-4o-mini", "Say hello.", false).to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALICE_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(fx.gateway.listen_addr()).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(&body.as_bytes()[..10]).await.expect("part of the body");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut stopped = fx.manifests.clone();
    stopped.update("KillSwitch", "emergency-stop", |d| d["spec"]["active"] = json!(true));
    fx.gateway.reload(&stopped).await.expect("reload");
    stream.write_all(&body.as_bytes()[10..]).await.expect("the rest");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("kill_switch_active"), "{answer}");
    assert_eq!(fx.openai.request_count(), 0, "refused before anything was sent");
}
