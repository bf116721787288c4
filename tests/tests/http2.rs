//! HTTP/2 connections that never let go: a TLS client that picks `h2` and never sends its
//! preface, and one that grants no window for the response. Either held its connection slot
//! for ever (hyper's GOAWAY waits for both); now each is closed a few timeouts later, and the
//! slot serves someone else. Heads are held to HTTP/1.1's size limit on both protocols.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_e2e::fixture::*;
use portcullis_e2e::{Fixture, FixtureOptions, GatewayOptions};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tls(fx: &Fixture, alpn: &[&[u8]]) -> TlsStream {
    let tcp = tokio::net::TcpStream::connect(fx.gateway.listen_addr()).await.unwrap();
    let config = fx.pki.client_config(&[&rustls::version::TLS13], alpn).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// Reads (the server's SETTINGS, a GOAWAY) until the server closes or `limit` passes: whether
/// it closed.
async fn closed_within(stream: &mut TlsStream, limit: Duration) -> bool {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn a_tls_client_that_picks_h2_and_sends_no_preface_is_closed_and_its_slot_reused() {
    let options = FixtureOptions {
        listener_tls: true,
        gateway: GatewayOptions {
            drain_timeout_secs: Some(20),
            ..GatewayOptions::with_args(&["--header-read-timeout", "1", "--max-connections", "2"])
        },
        ..Default::default()
    };
    let mut fx = Fixture::start_with(options, |_| {}).await.expect("fixture");
    // One sends nothing after the handshake, the other 10 of the preface's 24 bytes.
    let mut silent = tls(&fx, &[b"h2"]).await;
    let mut partial = tls(&fx, &[b"h2"]).await;
    partial.write_all(&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..10]).await.unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(8)).await, "a silent h2 connection was kept");
    assert!(closed_within(&mut partial, Duration::from_secs(8)).await, "a partial preface was kept");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed after {:?}", started.elapsed());

    // Their slots serve others; and a drain does not wait for its deadline.
    let response = tokio::time::timeout(Duration::from_secs(5), fx.chat(ALICE_KEY, "gpt-4o-mini")).await;
    assert_eq!(response.expect("served").expect("chat").status, 200);
    let _held = tls(&fx, &[b"h2"]).await;
    let started = Instant::now();
    fx.gateway.sigterm().unwrap();
    fx.gateway.wait_exit(Duration::from_secs(25)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "drain took {:?}", started.elapsed());
}

/// A client that grants no window gets a response head, never its body: hyper never polls the
/// body, so no write was seen to stall. The body now counts as stalled from the head; once it
/// is dropped the connection idles out, and is dropped when the GOAWAY does not close it.
#[tokio::test]
async fn a_client_that_grants_no_window_loses_its_stream_and_connection() {
    let options = FixtureOptions::with_args(&[
        "--header-read-timeout",
        "1",
        "--response-write-timeout",
        "1",
        "--max-connections",
        "1",
    ]);
    let fx = Fixture::start_with(options, |_| {}).await.expect("fixture");
    portcullis_e2e::eventually(Duration::from_secs(10), "no client connection open", || async {
        let metrics = fx.gateway.metrics().await.ok()?;
        (metrics.sum("portcullis_open_connections", &[]) == 0.0).then_some(())
    })
    .await
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(fx.gateway.listen_addr()).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .initial_stream_window_size(0)
        .handshake::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    let closed = tokio::spawn(async move {
        let _ = connection.await;
    });
    // No key: a 401 made by the gateway, its JSON body held back by the zero window.
    let request = http::Request::get(fx.url("/v1/models")).body(http_body_util::Full::default()).unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 401);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), closed).await.expect("closed within 10 s").unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900), "closed after {:?}", started.elapsed());
    // The one slot serves another client.
    let other = tokio::time::timeout(Duration::from_secs(5), fx.chat(ALICE_KEY, "gpt-4o-mini")).await;
    assert_eq!(other.expect("served").expect("chat").status, 200);
    drop(response);
}

/// A 20 KiB request field: within HTTP/1.1's 64 KiB head, so served over HTTP/2 as well (h2's
/// own default list size is 16 KiB, refused with a bare 431).
#[tokio::test]
async fn a_head_http1_takes_is_taken_over_http2_too() {
    let fx = Fixture::start().await.expect("fixture");
    let tcp = tokio::net::TcpStream::connect(fx.gateway.listen_addr()).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let request = http::Request::post(fx.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {ALICE_KEY}"))
        .header("content-type", "application/json")
        .header("x-pad", "p".repeat(20 * 1024))
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
}
