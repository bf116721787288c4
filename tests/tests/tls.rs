//! TLS on both sides with a CA made at run time: the gateway listener (TLS 1.2+, ALPN h2 and
//! http/1.1) and upstream HTTPS (trusted only through `--upstream-ca`).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use portcullis_e2e::client::HttpVersions;
use portcullis_e2e::fixture::*;
use portcullis_e2e::{assert, Fixture, FixtureOptions, TestClient, TestPki};
use rustls::pki_types::ServerName;

async fn handshake(
    addr: std::net::SocketAddr,
    config: rustls::ClientConfig,
) -> anyhow::Result<(rustls::ProtocolVersion, Option<Vec<u8>>)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(ServerName::try_from("localhost")?, tcp))
        .await??;
    let (_, conn) = tls.get_ref();
    let version = conn.protocol_version().ok_or_else(|| anyhow::anyhow!("no protocol version"))?;
    Ok((version, conn.alpn_protocol().map(<[u8]>::to_vec)))
}

#[tokio::test]
async fn https_listener_serves_h2_and_http1_through_https_upstreams() {
    let opts = FixtureOptions { listener_tls: true, ..Default::default() };
    let fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    assert!(fx.url("/").starts_with("https://"));

    let h2 = fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap();
    assert::ok(&h2);
    assert_eq!(h2.version, http::Version::HTTP_2, "ALPN should pick h2");
    assert_eq!(h2.json()["choices"][0]["message"]["content"], "Hello from the loopback upstream.");

    let h1_client = TestClient::with_ca_versions(&fx.pki, HttpVersions::Http1Only).unwrap();
    let auth = format!("Bearer {ALICE_KEY}");
    let h1 = h1_client
        .post_json(&fx.url("/v1/chat/completions"), &[("authorization", &auth)], &chat_body("gpt-4o-mini", "hi", false))
        .await
        .unwrap();
    assert::ok(&h1);
    assert_eq!(h1.version, http::Version::HTTP_11);

    // SSE over h2 through TLS on both sides.
    let mut stream = fx.messages_stream(ALICE_KEY, "claude-3-5-haiku-latest").await.unwrap();
    assert_eq!(stream.status, 200);
    assert_eq!(stream.version, http::Version::HTTP_2);
    let events = stream.collect_events(Duration::from_secs(10)).await.unwrap();
    assert_eq!(events.last().and_then(|e| e.event.as_deref()), Some("message_stop"));

    // Errors over TLS keep their shape.
    assert::openai_error(&fx.chat(UNKNOWN_KEY, "gpt-4o-mini").await.unwrap(), 401, "invalid_api_key");

    // Every upstream request arrived over TLS with the provider key.
    assert_eq!(fx.openai.request_count(), 2);
    assert_eq!(fx.anthropic.request_count(), 1);
}

#[tokio::test]
async fn listener_accepts_tls12_and_tls13_and_presents_the_test_certificate() {
    let opts = FixtureOptions { listener_tls: true, ..Default::default() };
    let fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    let addr = fx.gateway.listen_addr();

    let alpn: &[&[u8]] = &[b"h2", b"http/1.1"];
    let (v, proto) = handshake(addr, fx.pki.client_config(&[&rustls::version::TLS13], alpn).unwrap()).await.unwrap();
    assert_eq!(v, rustls::ProtocolVersion::TLSv1_3);
    assert_eq!(proto.as_deref(), Some(&b"h2"[..]));

    let (v, proto) = handshake(addr, fx.pki.client_config(&[&rustls::version::TLS12], alpn).unwrap()).await.unwrap();
    assert_eq!(v, rustls::ProtocolVersion::TLSv1_2, "TLS 1.2 must still be accepted");
    assert_eq!(proto.as_deref(), Some(&b"h2"[..]));

    let (_, proto) =
        handshake(addr, fx.pki.client_config(&[&rustls::version::TLS13], &[b"http/1.1"]).unwrap()).await.unwrap();
    assert_eq!(proto.as_deref(), Some(&b"http/1.1"[..]));

    // A client that does not trust the test CA must fail the handshake.
    let stranger = TestPki::with_ca_name("Some Other CA").unwrap();
    let err = handshake(addr, stranger.client_config(&[&rustls::version::TLS13], alpn).unwrap()).await;
    assert!(err.is_err(), "handshake must fail against an untrusted CA");

    // Plain HTTP on the TLS port does not get a normal response.
    let plain = TestClient::plain().get(&format!("http://{addr}/v1/models"), &[]).await;
    assert!(plain.map(|r| r.status != 200).unwrap_or(true));
}

#[tokio::test]
async fn upstream_certificate_must_be_trusted() {
    let opts = FixtureOptions { no_upstream_ca: true, ..Default::default() };
    let fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    let resp = fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap();
    assert::openai_error(&resp, 502, "upstream_unavailable");
    let resp = fx.messages(ALICE_KEY, &messages_body("claude-3-5-haiku-latest", "hi", false), &[]).await.unwrap();
    assert::anthropic_error(&resp, 502, "upstream_unavailable", None);
    assert_eq!(
        fx.openai.request_count() + fx.anthropic.request_count(),
        0,
        "no request may cross an untrusted TLS connection"
    );
}
