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

/// A provider whose events reach the gateway together (here: queued at once): over HTTP/2
/// the gateway hands hyper what is ready together as one piece of at most 16 KiB
/// (`stall::gather`), over several reads when they come at once. Every event still arrives
/// whole and in order, the last one included, and the stream ends: with many small events and
/// with big ones (a piece full before the next).
#[tokio::test]
async fn a_burst_of_events_over_h2_arrives_whole_and_in_order() {
    let opts = FixtureOptions { listener_tls: true, ..Default::default() };
    let fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    let small: String = (0..500).map(|i| format!("w{i:03} ")).collect();
    let big: String = (0..30).map(|i| format!("{i:02}").repeat(2_500)).collect();
    for (text, deltas) in [(small, 500), (big, 30)] {
        fx.openai.set(|o| {
            o.response_text = text.clone();
            o.chunks = deltas;
            o.burst = true;
        });
        let mut stream = fx.chat_stream(ALICE_KEY, "gpt-4o-mini").await.unwrap();
        assert_eq!(stream.status, 200);
        assert_eq!(stream.version, http::Version::HTTP_2);
        let events = stream.collect_events(Duration::from_secs(10)).await.unwrap();
        assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"));
        let said: String = events
            .iter()
            .filter_map(|e| e.json()["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
            .collect();
        assert!(said == text, "every delta, in order ({} of {} bytes)", said.len(), text.len());
        assert!(events.len() > deltas, "{} events", events.len());
    }
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

/// Checks a response's request-limit fields (`names`: limit, remaining, reset) for a key allowed
/// 50 requests a minute that has made `used`, each field once; returns the reset as sent.
fn request_limits(response: &portcullis_e2e::Response, [limit, remaining, reset]: [&str; 3], used: u64) -> String {
    let version = response.version;
    assert_eq!(response.header_values(limit), ["50"], "{version:?}");
    assert_eq!(response.header_values(remaining), [(50 - used).to_string()], "{version:?}");
    let reset = response.header_values(reset);
    assert_eq!(reset.len(), 1, "{version:?}");
    reset[0].to_owned()
}

/// The gateway's `x-ratelimit-*` headers are the same over HTTP/2 and HTTP/1.1 (they reach the
/// two servers by different paths), replace an upstream's headers for the limits the key has,
/// and leave the upstream's alone for the limits it has not. Anthropic routes get them in
/// Anthropic's names (`anthropic-ratelimit-*`, resets as RFC 3339 instants).
#[tokio::test]
async fn rate_limit_headers_replace_the_upstreams_over_h2_and_http1() {
    const ERIN_KEY: &str = "pcl_e2e_erin_CLIENTKEY_4d6f8a0c2e4b6d8f0a2c4e6b8d";
    let opts = FixtureOptions {
        listener_tls: true,
        upstream: portcullis_e2e::UpstreamOptions {
            extra_headers: vec![
                ("x-ratelimit-limit-requests", "999999"),
                ("x-ratelimit-remaining-requests", "999998"),
                ("x-ratelimit-limit-tokens", "12345"),
                ("anthropic-ratelimit-requests-limit", "4000"),
                ("anthropic-ratelimit-tokens-limit", "400000"),
            ],
            ..Default::default()
        },
        ..Default::default()
    };
    let fx = Fixture::start_with(opts, |ms| {
        ms.add(SECRETS_FILE, portcullis_e2e::manifests::secret("erin-key", "key", ERIN_KEY));
        let mut key = portcullis_e2e::manifests::api_key("erin", "erin-key", &["gpt-*", "claude-*"]);
        key["spec"]["limits"] = serde_json::json!({"requestsPerMinute": 50});
        ms.add(KEYS_FILE, key);
    })
    .await
    .expect("fixture");
    let h1_client = TestClient::with_ca_versions(&fx.pki, HttpVersions::Http1Only).unwrap();
    let auth = format!("Bearer {ERIN_KEY}");
    for (used, client, version) in [(1, &fx.client, http::Version::HTTP_2), (2, &h1_client, http::Version::HTTP_11)] {
        let response = client
            .post_json(&fx.url("/v1/chat/completions"), &[("authorization", &auth)], &chat_body("gpt-4o", "hi", false))
            .await
            .unwrap();
        assert::ok(&response);
        assert_eq!(response.version, version);
        let all = |name: &str| response.header_values(name);
        let reset = request_limits(
            &response,
            ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"],
            used,
        );
        let seconds = reset.strip_suffix('s').and_then(|s| s.parse::<f64>().ok()).expect("seconds");
        // A minute and at most one 100 ms granule (the window's resolution).
        assert!((0.0..=60.1).contains(&seconds), "{seconds}");
        // No token limit on this key: the upstream's token headers pass through.
        assert_eq!(all("x-ratelimit-limit-tokens"), ["12345"], "{version:?}");
        assert!(all("x-ratelimit-remaining-tokens").is_empty());
    }
    let anthropic_headers = [("x-api-key", ERIN_KEY), ("anthropic-version", "2023-06-01")];
    let body = messages_body("claude-3-5-haiku-latest", "hi", false);
    for (used, client, version) in [(3, &fx.client, http::Version::HTTP_2), (4, &h1_client, http::Version::HTTP_11)] {
        let before = chrono::Utc::now().timestamp();
        let response = client.post_json(&fx.url("/v1/messages"), &anthropic_headers, &body).await.unwrap();
        assert::ok(&response);
        assert_eq!(response.version, version);
        let all = |name: &str| response.header_values(name);
        let names = [
            "anthropic-ratelimit-requests-limit",
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-requests-reset",
        ];
        let reset = request_limits(&response, names, used);
        let reset = chrono::DateTime::parse_from_rfc3339(&reset).expect("RFC 3339").timestamp();
        // Within a minute (and a granule, rounded up to the second) of the request.
        assert!((before..=before + 62).contains(&reset), "{reset} against {before}");
        // No token limit on this key: the provider's field passes through; none in OpenAI's names.
        assert_eq!(all("anthropic-ratelimit-tokens-limit"), ["400000"], "{version:?}");
        assert_eq!(all("x-ratelimit-limit-requests"), ["999999"], "{version:?}");
        assert_eq!(all("x-ratelimit-remaining-requests"), ["999998"], "{version:?}");
    }
    // A key without limits gets the upstream's headers untouched.
    let alice = fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap();
    assert::ok(&alice);
    assert_eq!(alice.header("x-ratelimit-limit-requests"), Some("999999"));
    assert_eq!(alice.header("x-ratelimit-remaining-requests"), Some("999998"));
}

/// A provider's own fields reach the client the same way over HTTP/2 and HTTP/1.1 (the two
/// servers write them by different paths): its request id renamed `x-upstream-request-id`
/// beside the gateway's, informational fields as they came, cookies dropped, and the body framed
/// by the gateway. (The fields a provider's `Connection` header names are dropped too; the
/// test upstream cannot send those, so `forward::tests` covers them.)
#[tokio::test]
async fn a_providers_fields_are_passed_on_alike_over_h2_and_http1() {
    let opts = FixtureOptions {
        listener_tls: true,
        upstream: portcullis_e2e::UpstreamOptions {
            extra_headers: vec![
                ("x-request-id", "up-req-42"),
                ("openai-processing-ms", "7"),
                ("openai-version", "2020-10-01"),
                ("set-cookie", "__cf_bm=abc; path=/"),
            ],
            ..Default::default()
        },
        ..Default::default()
    };
    let fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    let h1_client = TestClient::with_ca_versions(&fx.pki, HttpVersions::Http1Only).unwrap();
    let auth = format!("Bearer {ALICE_KEY}");
    for (client, version) in [(&fx.client, http::Version::HTTP_2), (&h1_client, http::Version::HTTP_11)] {
        let response = client
            .post_json(
                &fx.url("/v1/chat/completions"),
                &[("authorization", &auth), ("x-request-id", "client-req-7")],
                &chat_body("gpt-4o-mini", "hi", false),
            )
            .await
            .unwrap();
        assert::ok(&response);
        assert_eq!(response.version, version);
        let all = |name: &str| response.header_values(name);
        assert_eq!(all("x-request-id"), ["client-req-7"], "{version:?}");
        assert_eq!(all("x-upstream-request-id"), ["up-req-42"], "{version:?}");
        assert_eq!(all("openai-processing-ms"), ["7"], "{version:?}");
        assert_eq!(all("openai-version"), ["2020-10-01"], "{version:?}");
        assert_eq!(all("content-type"), ["application/json"], "{version:?}");
        assert!(all("set-cookie").is_empty(), "{version:?}: {:?}", response.headers);
        // One length, the gateway's (hyper's from the body's exact size on HTTP/2), matching
        // the body.
        assert_eq!(all("content-length"), [response.body.len().to_string()], "{version:?}");
        assert_eq!(response.json()["choices"][0]["message"]["content"], "Hello from the loopback upstream.");
    }
}

/// HTTP/1.1 over TLS: a response larger than the socket buffers, to a client that reads it
/// slowly, arrives whole and in time on a kept-alive connection (every write blocks on the
/// socket and resumes; nothing is left behind in the TLS session for the idle close).
#[tokio::test]
async fn a_large_http1_response_to_a_slow_reader_arrives_whole_over_tls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let text = "tls-bulk ".repeat(512 * 1024);
    let opts = FixtureOptions {
        listener_tls: true,
        upstream: portcullis_e2e::UpstreamOptions { response_text: text.clone(), ..Default::default() },
        ..Default::default()
    };
    let fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    let config = fx.pki.client_config(&[&rustls::version::TLS13], &[b"http/1.1"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(fx.gateway.listen_addr()).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    let body = serde_json::to_string(&chat_body("gpt-4o-mini", "hi", false)).unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALICE_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    // Read slowly, so the gateway's socket stays full and its writes keep blocking to the end.
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let read = tokio::time::timeout(Duration::from_secs(8), async {
        let mut head: Option<(String, usize)> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed early");
            seen.extend_from_slice(&buf[..n]);
            if head.is_none() {
                if let Some((text, head_len, length)) = portcullis_e2e::raw::response_head(&seen) {
                    seen.drain(..head_len);
                    head = Some((text, length.expect("a Content-Length")));
                }
            }
            if let Some((text, length)) = &head {
                if seen.len() >= *length {
                    return (text.clone(), seen.len(), *length);
                }
            }
        }
    })
    .await;
    let (head, got, length) = read.expect("the whole response, without waiting for the idle close");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(got, length);
    assert!(length > text.len(), "{length}");
}

/// A renewed certificate written over the listener's files is served without a restart; a
/// half-written pair (a certificate without its key) leaves the current one serving.
#[tokio::test]
async fn a_renewed_listener_certificate_is_served_without_a_restart() {
    let opts = FixtureOptions { listener_tls: true, ..FixtureOptions::with_args(&["--tls-reload-interval", "0.2"]) };
    let fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    let addr = fx.gateway.listen_addr();
    let alpn: &[&[u8]] = &[b"http/1.1"];
    let trusts_first = || fx.pki.client_config(&[&rustls::version::TLS13], alpn).unwrap();
    handshake(addr, trusts_first()).await.expect("the first certificate serves");

    let renewed = TestPki::with_ca_name("Renewing CA").unwrap();
    let trusts_renewed = || renewed.client_config(&[&rustls::version::TLS13], alpn).unwrap();
    // Mid-rotation: the new certificate beside the old key is refused; the old pair serves on.
    std::fs::write(fx.pki.server_cert_path(), &renewed.server_cert_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    handshake(addr, trusts_first()).await.expect("the old pair still serves");
    // The key arrives: the renewed pair serves.
    std::fs::write(fx.pki.server_key_path(), &renewed.server_key_pem).unwrap();
    portcullis_e2e::eventually(Duration::from_secs(5), "the renewed certificate served", || async {
        handshake(addr, trusts_renewed()).await.ok()
    })
    .await
    .unwrap();
    assert!(handshake(addr, trusts_first()).await.is_err(), "the old certificate is no longer served");
}
