//! SIGTERM drains: in-flight streams finish, new connections are refused, exit code 0; the
//! drain deadline bounds shutdown.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use portcullis_e2e::client::SseEvent;
use portcullis_e2e::fixture::*;
use portcullis_e2e::{assert, eventually, Fixture, FixtureOptions, GatewayOptions, TestClient, UpstreamOptions};

#[tokio::test]
async fn sigterm_lets_a_slow_stream_finish_refuses_new_connections_and_exits_zero() {
    let opts = FixtureOptions {
        gateway: GatewayOptions { drain_timeout_secs: Some(20), ..Default::default() },
        upstream: UpstreamOptions { chunks: 12, event_delay: Duration::from_millis(300), ..Default::default() },
        ..Default::default()
    };
    let mut fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    let listen = fx.gateway.listen_addr();
    let mut stream = fx.chat_stream(ALICE_KEY, "gpt-4o-mini").await.unwrap();
    assert_eq!(stream.status, 200);
    let first = stream.next_event(Duration::from_secs(10)).await.unwrap().expect("first event");

    fx.gateway.sigterm().unwrap();
    let sent_at = tokio::time::Instant::now();

    // New connections are refused while the stream is still being served.
    eventually(Duration::from_secs(3), "listener to stop accepting", || async {
        tokio::net::TcpStream::connect(listen).await.is_err().then_some(())
    })
    .await
    .unwrap();
    assert!(fx.openai.stream_timings()[0].last_event_sent.is_none(), "the test stream should still be running");

    let rest = stream.collect_events(Duration::from_secs(20)).await.expect("stream must keep flowing during drain");
    let mut events = vec![first];
    events.extend(rest);
    assert!(events.last().is_some_and(SseEvent::is_done), "stream must finish completely: {events:?}");
    let text: String =
        events.iter().filter_map(|e| e.json()["choices"][0]["delta"]["content"].as_str().map(str::to_string)).collect();
    assert_eq!(text, "Hello from the loopback upstream.");

    let status = fx.gateway.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "exit status after drain: {status}");
    assert!(sent_at.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn sigterm_on_an_idle_gateway_exits_promptly() {
    let mut fx = Fixture::start().await.expect("fixture");
    // Leave an idle keep-alive connection in the client pool.
    assert::ok(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap());
    let started = tokio::time::Instant::now();
    let status = fx.gateway.shutdown(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "exit status: {status}");
    assert!(started.elapsed() < Duration::from_secs(5), "idle shutdown took {:?}", started.elapsed());
}

#[tokio::test]
async fn drain_deadline_bounds_shutdown() {
    let opts = FixtureOptions {
        gateway: GatewayOptions { drain_timeout_secs: Some(1), ..Default::default() },
        ..Default::default()
    };
    let mut fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    fx.openai.hold_last_event();
    let mut stream = fx.chat_stream(ALICE_KEY, "gpt-4o-mini").await.unwrap();
    stream.next_event(Duration::from_secs(10)).await.unwrap().expect("first event");
    fx.openai.wait_held(1, Duration::from_secs(10)).await.unwrap();

    let started = tokio::time::Instant::now();
    fx.gateway.sigterm().unwrap();
    let status =
        fx.gateway.wait_exit(Duration::from_secs(10)).await.expect("gateway must exit after the drain deadline");
    let took = started.elapsed();
    eprintln!("exited {status} after {took:?} with a 1 s drain deadline");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?} with --drain-timeout 1");
    assert!(status.success(), "exit status: {status}");
    fx.openai.release();
}

#[tokio::test]
async fn sigterm_drains_inflight_h2_requests_over_tls() {
    let opts = FixtureOptions {
        listener_tls: true,
        gateway: GatewayOptions { drain_timeout_secs: Some(20), ..Default::default() },
        upstream: UpstreamOptions { response_delay: Duration::from_millis(1500), ..Default::default() },
        ..Default::default()
    };
    let mut fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    let client = fx.client.clone();
    let url = fx.url("/v1/chat/completions");
    let auth = format!("Bearer {ALICE_KEY}");
    let mut inflight = Vec::new();
    for _ in 0..3 {
        let (client, url, auth) = (client.clone(), url.clone(), auth.clone());
        inflight.push(tokio::spawn(async move {
            client.post_json(&url, &[("authorization", &auth)], &chat_body("gpt-4o-mini", "hi", false)).await
        }));
    }
    eventually(Duration::from_secs(5), "requests to reach upstream", || async {
        (fx.openai.request_count() == 3).then_some(())
    })
    .await
    .unwrap();
    fx.gateway.sigterm().unwrap();
    for handle in inflight {
        let resp = handle.await.unwrap().expect("in-flight request must complete during drain");
        assert::ok(&resp);
        assert_eq!(resp.version, http::Version::HTTP_2);
    }
    let status = fx.gateway.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "exit status: {status}");
}

/// With `--shutdown-delay`, SIGTERM first turns `/readyz` to 503 and keeps serving new
/// connections (kube-proxy and load balancers still route here until the endpoint is withdrawn),
/// then drains and exits.
#[tokio::test]
async fn a_shutdown_delay_keeps_serving_new_connections_while_readiness_fails() {
    let opts = FixtureOptions { gateway: GatewayOptions::with_args(&["--shutdown-delay", "2"]), ..Default::default() };
    let mut fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    let listen = fx.gateway.listen_addr();
    let readyz = fx.gateway.admin_url("/readyz");
    fx.gateway.sigterm().unwrap();
    let sent_at = tokio::time::Instant::now();

    eventually(Duration::from_secs(1), "readyz to say draining", || async {
        let ready = TestClient::plain().get(&readyz, &[]).await.ok()?;
        (ready.status == 503).then_some(())
    })
    .await
    .unwrap();
    // A client with no pooled connection: a new connection, accepted and served.
    let fresh = TestClient::plain();
    let auth = format!("Bearer {ALICE_KEY}");
    let served = fresh
        .post_json(&fx.url("/v1/chat/completions"), &[("authorization", &auth)], &chat_body("gpt-4o-mini", "hi", false))
        .await
        .expect("a new connection during the shutdown delay");
    assert::ok(&served);
    assert!(sent_at.elapsed() < Duration::from_secs(2), "served after the delay: {:?}", sent_at.elapsed());

    // Then the listener closes and the process drains and exits.
    eventually(Duration::from_secs(5), "listener to stop accepting", || async {
        tokio::net::TcpStream::connect(listen).await.is_err().then_some(())
    })
    .await
    .unwrap();
    assert!(sent_at.elapsed() >= Duration::from_secs(2), "closed before the delay: {:?}", sent_at.elapsed());
    let status = fx.gateway.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "exit status: {status}");
}
