//! The gateway's own HTTP/1.1 server, spoken to byte by byte: pipelining, chunked request
//! bodies, `Expect: 100-continue`, HTTP/1.0, and everything a smuggler or a slow client could
//! try (ambiguous framing, oversized heads, stalled heads, bodies left unread). HTTP/2 with prior
//! knowledge on plain TCP is still served (by hyper).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portcullis_e2e::fixture::*;
use portcullis_e2e::{Fixture, FixtureOptions, GatewayOptions, UpstreamOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REPLY: &str = "Hello from the loopback upstream.";
const CANARY: &str = "CANARY-http1-8d1f0c";

async fn fixture() -> Fixture {
    let options = FixtureOptions {
        gateway: GatewayOptions {
            log_level: "trace".into(),
            ..GatewayOptions::with_args(&["--header-read-timeout", "1", "--request-body-timeout", "1"])
        },
        ..FixtureOptions::default()
    };
    Fixture::start_with(options, |_| {}).await.expect("fixture")
}

fn chat(extra_headers: &str, close: bool) -> String {
    let body = format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{CANARY}"}}]}}"#);
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALICE_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}{connection}\r\n{body}",
        body.len()
    )
}

/// Reads until the server closes the connection (bounded by `limit`); the elapsed time too.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> (String, Duration, bool) {
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&seen).into_owned(), started.elapsed(), closed)
}

async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw).await.expect("write");
    let (text, _, closed) = read_to_close(&mut stream, Duration::from_secs(10)).await;
    assert!(closed, "the server should close the connection: {text}");
    text
}

fn error_code(response: &str) -> String {
    let body = response.split("\r\n\r\n").nth(1).expect("a body");
    let value: serde_json::Value = serde_json::from_str(body).expect("a JSON error body");
    value["error"]["code"].as_str().expect("an error code").to_owned()
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_chunked_bodies_are_read() {
    let fx = fixture().await;
    let addr = fx.gateway.listen_addr();
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let (a, b) = body.split_at(20);
    let chunked = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALICE_KEY}\r\n\
         X-Request-Id: third\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x};ext=1\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nX-Trailer: t\r\n\r\n",
        a.len(),
        b.len()
    );
    let raw = [chat("X-Request-Id: first\r\n", false), chat("X-Request-Id: second\r\n", false), chunked].concat();
    let text = exchange(addr, raw.as_bytes()).await;
    assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{text}");
    assert_eq!(text.matches(REPLY).count(), 3, "{text}");
    let order: Vec<usize> = ["x-request-id: first", "x-request-id: second", "x-request-id: third"]
        .iter()
        .map(|id| text.find(id).expect(id))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "answers out of order: {text}");
    assert!(text.contains("connection: close\r\n"));
    assert!(text.contains("\r\ndate: "), "{text}");
    assert!(!fx.gateway.logs().contains(CANARY), "request content in the logs");
}

#[tokio::test]
async fn ambiguous_framing_is_refused_and_nothing_is_smuggled_behind_it() {
    let fx = fixture().await;
    let addr = fx.gateway.listen_addr();
    // A front end reading Content-Length and a back end reading chunked would disagree on
    // where the next request starts: the gateway answers once and closes.
    let smuggle = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Note: {CANARY}\r\nContent-Length: 5\r\n\
         Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALICE_KEY}\r\n\r\n"
    );
    let text = exchange(addr, smuggle.as_bytes()).await;
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "a second response was smuggled: {text}");
    assert!(text.contains("connection: close\r\n"));
    assert!(text.contains("x-portcullis-error-code: malformed_request\r\n"), "{text}");
    assert_eq!(error_code(&text), "malformed_request");

    for (raw, status, code) in [
        (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "400",
            "malformed_request",
        ),
        ("POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: -1\r\n\r\n", "400", "malformed_request"),
        (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip\r\n\r\n",
            "501",
            "transfer_encoding_not_supported",
        ),
        ("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "400", "malformed_request"),
        ("POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Folded: a\r\n b\r\n\r\n", "400", "malformed_request"),
        // A header after a bare LF, which a CRLF-only front end reads as part of X-Note.
        (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Note: a\nContent-Length: 5\r\n\r\nhello",
            "400",
            "malformed_request",
        ),
        ("POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nExpect: wishes\r\n\r\n", "417", "expectation_failed"),
        ("POST /v1/chat/completions HTTP/3.0\r\nHost: gw\r\n\r\n", "505", "http_version_not_supported"),
    ] {
        let text = exchange(addr, raw.as_bytes()).await;
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{raw:?} gave {text}");
        assert_eq!(error_code(&text), code, "{raw:?}");
    }

    // Anthropic routes answer in Anthropic's format.
    let text = exchange(addr, b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nContent-Length: x\r\n\r\n").await;
    let body: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["type"], "error", "{text}");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let huge = format!("GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Pad: {}\r\n\r\n", "a".repeat(70 * 1024));
    let text = exchange(addr, huge.as_bytes()).await;
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    assert!(!fx.gateway.logs().contains(CANARY), "request content in the logs");
}

#[tokio::test]
async fn stalled_heads_time_out_and_idle_connections_close() {
    let fx = fixture().await;
    let addr = fx.gateway.listen_addr();
    // Header read timeout is 1 s in this fixture.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n").await.unwrap();
    // The same on the Messages API (after an empty line, with a query): answered in its format.
    let mut anthropic = TcpStream::connect(addr).await.unwrap();
    anthropic.write_all(b"\r\nPOST /v1/messages?beta=true HTTP/1.1\r\nHost: gw\r\n").await.unwrap();
    let (text, elapsed, closed) = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(closed && text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(elapsed >= Duration::from_millis(900), "timed out too early: {elapsed:?}");
    assert!(text.contains("The request head was not received in time."), "{text}");
    let (text, _, closed) = read_to_close(&mut anthropic, Duration::from_secs(5)).await;
    assert!(closed && text.starts_with("HTTP/1.1 408 "), "{text}");
    let body: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["type"], "error", "{text}");

    let mut idle = TcpStream::connect(addr).await.unwrap();
    let (text, elapsed, closed) = read_to_close(&mut idle, Duration::from_secs(5)).await;
    assert!(closed && text.is_empty(), "an idle connection is closed without a response: {text}");
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");

    // A body that stops arriving is answered 408 once the body timeout (1 s here) has passed.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALICE_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\":"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let (text, elapsed, closed) = read_to_close(&mut slow, Duration::from_secs(5)).await;
    assert!(closed && text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(elapsed >= Duration::from_millis(900), "timed out too early: {elapsed:?}");

    // A keep-alive connection stays usable within the timeout, then closes once idle.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(chat("", false).as_bytes()).await.unwrap();
    let (text, _, closed) = read_to_close(&mut kept, Duration::from_secs(5)).await;
    assert!(closed && text.starts_with("HTTP/1.1 200 OK"), "{text}");
}

/// HTTP/1.0 keep-alive (`ab -k`, some proxies): a response of known length keeps the connection
/// for the next request. One of unknown length (a stream) can end only with the connection: it is
/// announced with `connection: close`, and the connection closes as the stream ends rather than
/// after the idle timeout, with the client waiting for the close all that time.
#[tokio::test]
async fn http10_keep_alive_is_kept_after_a_known_length_and_ended_after_a_stream() {
    let fx = Fixture::start_with(FixtureOptions::with_args(&["--header-read-timeout", "20"]), |_| {})
        .await
        .expect("fixture");
    let mut stream = TcpStream::connect(fx.gateway.listen_addr()).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let plain = chat("Connection: keep-alive\r\n", false).replacen("HTTP/1.1", "HTTP/1.0", 1);
    stream.write_all(plain.as_bytes()).await.expect("write");
    let response = read_one_response(&mut stream).await;
    assert!(response.starts_with("HTTP/1.1 200") && response.contains(REPLY), "{response}");
    assert!(response.contains("connection: keep-alive\r\n"), "{response}");

    // A stream on the same connection.
    let body =
        format!(r#"{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"{CANARY}"}}]}}"#);
    let streamed = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nHost: gw\r\nAuthorization: Bearer {ALICE_KEY}\r\n\
         Content-Type: application/json\r\nConnection: keep-alive\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(streamed.as_bytes()).await.expect("write");
    let (text, elapsed, closed) = read_to_close(&mut stream, Duration::from_secs(15)).await;
    assert!(closed && text.starts_with("HTTP/1.1 200") && text.contains("data: [DONE]"), "{text}");
    assert!(text.contains("connection: close\r\n") && !text.contains("transfer-encoding"), "{text}");
    assert!(elapsed < Duration::from_secs(10), "closed after {elapsed:?}, not as the stream ended");
}

#[tokio::test]
async fn expect_continue_http10_and_unread_bodies() {
    let fx = fixture().await;
    let addr = fx.gateway.listen_addr();

    // Expect: 100-continue — the interim answer comes before the body is sent.
    let full = chat("Expect: 100-continue\r\n", true);
    let (head, body) = full.split_once("\r\n\r\n").unwrap();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("{head}\r\n\r\n").as_bytes()).await.unwrap();
    let mut interim = vec![0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut interim)).await.unwrap().unwrap();
    assert_eq!(&interim[..], b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body.as_bytes()).await.unwrap();
    let (text, _, closed) = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(closed && text.starts_with("HTTP/1.1 200 OK") && text.contains(REPLY), "{text}");

    // A request refused on its head alone is answered at once, without inviting its body: the
    // client reads the refusal, not `100 Continue`.
    for (extra, status) in [("Authorization: Bearer wrong-key\r\n", "401"), ("", "401")] {
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n{extra}Content-Type: application/json\r\n\
             Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n"
        );
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let (text, _, closed) = read_to_close(&mut stream, Duration::from_secs(5)).await;
        assert!(closed && text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
        assert!(!text.contains("100 Continue"), "{text}");
    }

    // HTTP/1.0 without keep-alive: answered, then closed.
    let old = chat("", false).replacen("HTTP/1.1", "HTTP/1.0", 1);
    let text = exchange(addr, old.as_bytes()).await;
    assert!(text.starts_with("HTTP/1.1 200 OK") && text.contains(REPLY), "{text}");
    assert!(text.contains("connection: close\r\n"));

    // A refused request whose body is still coming: the answer is readable, then the
    // connection closes instead of reading the rest of the body as a new request.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let refused = "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer wrong-key\r\n\
                   Content-Length: 1000000\r\n\r\n{\"model\":";
    stream.write_all(refused.as_bytes()).await.unwrap();
    let (text, elapsed, closed) = read_to_close(&mut stream, Duration::from_secs(10)).await;
    assert!(closed && text.starts_with("HTTP/1.1 401 "), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}

/// A chat request with Alice's key, for hyper's HTTP/2 client.
fn h2_chat(url: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    http::Request::post(url)
        .header("authorization", format!("Bearer {ALICE_KEY}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap()
}

/// A gateway that gives up on a client taking nothing for 1 s, and a provider answering `text`.
fn write_timeout_fixture(text: String) -> FixtureOptions {
    FixtureOptions {
        upstream: portcullis_e2e::UpstreamOptions { response_text: text, ..Default::default() },
        ..FixtureOptions::with_args(&["--response-write-timeout", "1"])
    }
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_still_served_on_plain_tcp() {
    use http_body_util::BodyExt;
    let fx = fixture().await;
    let tcp = TcpStream::connect(fx.gateway.listen_addr()).await.unwrap();
    // As SDK clients do: without it a request's DATA frame waits ~40 ms behind its HEADERS.
    tcp.set_nodelay(true).expect("nodelay");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let response = sender.send_request(h2_chat(&fx.url("/v1/chat/completions"))).await.expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&bytes).contains(REPLY));
}

#[tokio::test]
async fn a_client_that_goes_away_is_noticed_while_the_provider_thinks_and_mid_stream() {
    use portcullis_e2e::eventually;
    let options = FixtureOptions {
        upstream: UpstreamOptions { response_delay: Duration::from_secs(5), ..UpstreamOptions::default() },
        ..FixtureOptions::default()
    };
    let fx = Fixture::start_with(options, |_| {}).await.expect("fixture");
    let addr = fx.gateway.listen_addr();
    let open = || async {
        let metrics = fx.gateway.metrics().await.ok()?;
        metrics.get("portcullis_open_connections", &[])
    };

    // The provider takes 5 s before its response head; the client leaves after 300 ms. The
    // connection (and the upstream request with it) ends at once, not when the answer comes.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(chat("", false).as_bytes()).await.unwrap();
    eventually(Duration::from_secs(2), "the connection to be counted", || async {
        (open().await == Some(1.0)).then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = Instant::now();
    drop(stream);
    eventually(Duration::from_secs(3), "the connection to close", || async {
        (open().await == Some(0.0)).then_some(())
    })
    .await
    .unwrap();
    assert!(left.elapsed() < Duration::from_secs(3), "noticed only after {:?}", left.elapsed());

    // Mid-stream: the provider holds its last event; the client reads the first ones and leaves.
    fx.openai.set(|o| o.response_delay = Duration::ZERO);
    fx.openai.hold_last_event();
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALICE_KEY}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    fx.openai.wait_held(1, Duration::from_secs(5)).await.unwrap();
    let mut first = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut first)).await.unwrap().unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200 OK"), "{}", String::from_utf8_lossy(&first[..n]));
    drop(stream);
    eventually(Duration::from_secs(3), "the stream's connection to close", || async {
        (open().await == Some(0.0)).then_some(())
    })
    .await
    .unwrap();
    fx.openai.release();
}

/// A client that stops reading a response larger than the socket buffers is disconnected once
/// the write timeout (1 s here) passes without progress; one that pauses for less reads it all.
#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_after_the_write_timeout() {
    // Well past what the kernel buffers for a client that reads nothing (a few MiB with default
    // limits: the receive buffer does not grow while nothing is read).
    let options = write_timeout_fixture("bulk ".repeat(8 * 1024 * 1024));
    let fx = Fixture::start_with(options, |_| {}).await.expect("fixture");
    let addr = fx.gateway.listen_addr();

    let read_all_after = |pause: Duration| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(chat("", true).as_bytes()).await.unwrap();
        tokio::time::sleep(pause).await;
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
                Err(_) => panic!("the connection neither closed nor sent anything for 20 s"),
            }
        }
        let (_, head_len, length) = portcullis_e2e::raw::response_head(&seen).expect("a response head");
        (seen.len() - head_len, length.expect("a Content-Length"))
    };

    let (got, length) = read_all_after(Duration::from_millis(200)).await;
    assert!(length > 40 * 1024 * 1024, "{length}");
    assert_eq!(got, length, "a client that pauses briefly gets the whole response");

    let (got, length) = read_all_after(Duration::from_secs(3)).await;
    assert!(got < length, "a client that stopped reading was cut off: {got} of {length} bytes");
}

/// HTTP/2: hyper polls a response body only while its stream has window, so a client that stops
/// reading (sends no `WINDOW_UPDATE`) would hold the provider request for ever. Once the write
/// timeout (1 s here) passes the stream loses it and is reset; a client that pauses for less gets
/// the whole response.
#[tokio::test]
async fn an_http2_stream_the_client_stops_reading_is_reset_after_the_write_timeout() {
    use http_body_util::BodyExt;
    // Far more than the client's 64 KiB windows.
    let options = write_timeout_fixture("bulk ".repeat(1024 * 1024));
    let fx = Fixture::start_with(options, |_| {}).await.expect("fixture");
    let addr = fx.gateway.listen_addr();
    let url = fx.url("/v1/chat/completions");

    let read_all_after = |pause: Duration| {
        let url = url.clone();
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .initial_stream_window_size(65_535)
                    .initial_connection_window_size(65_535)
                    .handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .expect("h2 handshake");
            tokio::spawn(connection);
            let response = sender.send_request(h2_chat(&url)).await.expect("response");
            assert_eq!(response.status(), 200);
            let length: usize = response.headers()["content-length"].to_str().unwrap().parse().unwrap();
            // Nothing is read (no window is given back) during the pause.
            tokio::time::sleep(pause).await;
            let read = tokio::time::timeout(Duration::from_secs(20), response.into_body().collect())
                .await
                .expect("the stream neither ended nor failed within 20 s");
            // The connection carries on: another request on it is answered in full.
            let again = sender.send_request(h2_chat(&url)).await.expect("a second response on the connection");
            let again_length: usize = again.headers()["content-length"].to_str().unwrap().parse().unwrap();
            let again = again.into_body().collect().await.expect("the second response, whole").to_bytes();
            assert_eq!(again.len(), again_length);
            (read.map(|body| body.to_bytes().len()), length)
        }
    };
    let dropped_by_the_gateway = || async {
        let metrics = fx.gateway.metrics().await.expect("metrics");
        metrics.sum("portcullis_requests_total", &[("outcome", "client_closed")])
    };

    let (got, length) = read_all_after(Duration::from_millis(200)).await;
    assert!(length > 5 * 1024 * 1024, "{length}");
    assert_eq!(got.expect("a client that pauses briefly reads it all"), length);
    assert_eq!(dropped_by_the_gateway().await, 0.0);

    let (got, length) = read_all_after(Duration::from_secs(3)).await;
    assert!(got.is_err(), "a stalled stream is reset, not finished: {got:?} of {length} bytes");
    // The gateway dropped the provider request (the client never closed anything).
    assert_eq!(dropped_by_the_gateway().await, 1.0);
}

/// Reads one response from a keep-alive connection: its head, then `Content-Length` bytes.
async fn read_one_response(stream: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .expect("read");
        assert!(n > 0, "closed before a whole response: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .expect("content-length")
                .parse()
                .expect("a length");
            if seen.len() >= end + 4 + length {
                return text.into_owned();
            }
        }
    }
}

/// Connects to a listener at its connection limit and sends `request`: the kernel completes the
/// handshake (the backlog takes the connection), but no byte of an answer comes for 500 ms.
async fn waits_in_the_backlog(addr: SocketAddr, request: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect: the backlog takes it");
    stream.write_all(request).await.expect("write");
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut byte)).await;
    assert!(early.is_err(), "a connection beyond the limit was served: {early:?}");
    stream
}

/// A gateway serving at most two client connections, with nothing open yet.
async fn two_connection_gateway(upstream: UpstreamOptions) -> Fixture {
    // A header timeout long enough that it is not what closes an idle connection here.
    let options = FixtureOptions {
        upstream,
        ..FixtureOptions::with_args(&["--max-connections", "2", "--header-read-timeout", "30"])
    };
    let fx = Fixture::start_with(options, |_| {}).await.expect("fixture");
    // Whatever connection the fixture made to see the gateway up has closed.
    portcullis_e2e::eventually(Duration::from_secs(10), "no client connection open", || async {
        let metrics = fx.gateway.metrics().await.ok()?;
        (metrics.sum("portcullis_open_connections", &[]) == 0.0).then_some(())
    })
    .await
    .expect("an idle gateway");
    fx
}

/// How soon a connection waiting at the limit is served once an idle one is closed for it: far
/// below the 30 s idle timeout of [`two_connection_gateway`] (which would serve it too), and far
/// above the ~0.2 s it takes, so a slow machine does not fail the test.
const SERVED_WITHIN: Duration = Duration::from_secs(12);

/// Connections, waits and reclaims as the gateway counts them: the context of a failure.
async fn connection_counts(fx: &Fixture) -> String {
    match fx.gateway.metrics().await {
        Ok(metrics) => [
            "portcullis_open_connections",
            "portcullis_connection_limit_waits_total",
            "portcullis_idle_connections_reclaimed_total",
        ]
        .map(|name| format!("{name}={}", metrics.sum(name, &[])))
        .join(" "),
        Err(e) => format!("metrics unreadable: {e}"),
    }
}

/// Connects to a gateway at its connection limit and is answered in full within
/// [`SERVED_WITHIN`], long before the idle timeout would free a slot.
async fn served_at_once(fx: &Fixture) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(fx.gateway.listen_addr()).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream.write_all(chat("", true).as_bytes()).await.expect("write");
    let (text, _, closed) = read_to_close(&mut stream, SERVED_WITHIN + Duration::from_secs(5)).await;
    let took = started.elapsed();
    let served = closed && text.starts_with("HTTP/1.1 200") && text.contains(REPLY);
    assert!(
        served && took < SERVED_WITHIN,
        "a waiting connection was not served at once: after {took:?} (closed: {closed}; {}): {text:?}",
        connection_counts(fx).await
    );
}

/// `--max-connections`: at the limit the gateway serves nothing more, so a new connection waits
/// (the kernel completes its handshake) while the open ones are busy with requests. The first
/// to finish is closed once it has idled briefly (the listener keeps asking while it waits),
/// and the waiting connection is served; the other stays open once nothing waits for its slot. The metrics give the limit, how
/// often the listener waited, and the connections closed to make room.
#[tokio::test]
async fn at_the_connection_limit_a_new_connection_waits_while_the_open_ones_are_busy() {
    let delay = Duration::from_secs(2);
    let fx = two_connection_gateway(UpstreamOptions { response_delay: delay, ..Default::default() }).await;
    let addr = fx.gateway.listen_addr();

    // Two keep-alive connections, each with a request the provider takes 2 s to answer, the
    // second sent a second after the first.
    let started = Instant::now();
    let mut first = TcpStream::connect(addr).await.expect("connect");
    first.write_all(chat("", false).as_bytes()).await.expect("write");
    tokio::time::sleep(delay / 2).await;
    let mut second = TcpStream::connect(addr).await.expect("connect");
    second.write_all(chat("", false).as_bytes()).await.expect("write");
    // Both requests are with the provider when the third comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third is connected by the kernel but not served while both are busy.
    let mut third = waits_in_the_backlog(addr, chat("", true).as_bytes()).await;

    // The first gets its whole answer and closes for the third, which is then served (not
    // after the 30 s header timeout).
    let (text, _, closed) = read_to_close(&mut first, Duration::from_secs(10)).await;
    assert!(closed && text.starts_with("HTTP/1.1 200") && text.contains(REPLY), "{text}");
    let (text, _, closed) = read_to_close(&mut third, Duration::from_secs(10)).await;
    assert!(closed && text.starts_with("HTTP/1.1 200") && text.contains(REPLY), "{text}");
    assert!(started.elapsed() < delay * 4, "{:?}", started.elapsed());

    // The second was answered before the third; nothing waits for its slot, so it stays open
    // and serves another request.
    let response = read_one_response(&mut second).await;
    assert!(response.starts_with("HTTP/1.1 200") && response.contains(REPLY), "{response}");
    second.write_all(chat("", true).as_bytes()).await.expect("write");
    let (text, _, _) = read_to_close(&mut second, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 200") && text.contains(REPLY), "{text}");

    let metrics = fx.gateway.metrics().await.expect("metrics");
    assert_eq!(metrics.get("portcullis_max_connections", &[]), Some(2.0));
    assert!(metrics.sum("portcullis_connection_limit_waits_total", &[]) >= 1.0);
    assert_eq!(metrics.sum("portcullis_idle_connections_reclaimed_total", &[]), 1.0);
}

/// At the limit, connections that only sit open (idle keep-alive, or new and silent) are
/// closed to make room for a waiting one at once; one in the middle of sending its request
/// head is not idle, keeps its slot, and is served when it completes the request.
#[tokio::test]
async fn at_the_connection_limit_idle_connections_are_closed_to_make_room() {
    let fx = two_connection_gateway(UpstreamOptions::default()).await;
    let addr = fx.gateway.listen_addr();

    // One keep-alive connection, answered once and left open; one that has sent part of a head.
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    idle.write_all(chat("", false).as_bytes()).await.expect("write");
    let response = read_one_response(&mut idle).await;
    assert!(response.starts_with("HTTP/1.1 200") && response.contains(REPLY), "{response}");
    let request = chat("", true);
    let (head_start, rest) = request.split_at(40);
    let mut sending = TcpStream::connect(addr).await.expect("connect");
    sending.write_all(head_start.as_bytes()).await.expect("write");
    portcullis_e2e::eventually(Duration::from_secs(10), "both connections open", || async {
        let metrics = fx.gateway.metrics().await.ok()?;
        (metrics.sum("portcullis_open_connections", &[]) == 2.0).then_some(())
    })
    .await
    .expect("two connections held");

    // A third is served at once: the idle one is closed for it (without a byte sent).
    served_at_once(&fx).await;
    let (text, _, closed) = read_to_close(&mut idle, Duration::from_secs(5)).await;
    assert!(closed && text.is_empty(), "the idle connection closed silently: {text:?}");

    // The one that was sending its head kept its slot: it finishes and is served.
    sending.write_all(rest.as_bytes()).await.expect("write");
    let (text, _, closed) = read_to_close(&mut sending, Duration::from_secs(10)).await;
    assert!(closed && text.starts_with("HTTP/1.1 200") && text.contains(REPLY), "{text}");

    let metrics = fx.gateway.metrics().await.expect("metrics");
    assert_eq!(metrics.sum("portcullis_idle_connections_reclaimed_total", &[]), 1.0);
}

/// Opens an HTTP/2 (prior knowledge) connection to the gateway and has one chat answered on it.
/// The returned handle finishes when the gateway closes the connection; the sender keeps the
/// client from closing it first.
async fn h2_answered_once(
    fx: &Fixture,
) -> (tokio::task::JoinHandle<()>, hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>) {
    let tcp = TcpStream::connect(fx.gateway.listen_addr()).await.unwrap();
    // As SDK clients do: without it a request's DATA frame waits ~40 ms behind its HEADERS.
    tcp.set_nodelay(true).expect("nodelay");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    let closed = tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender.send_request(h2_chat(&fx.url("/v1/chat/completions"))).await.expect("response");
    assert_eq!(response.status(), 200);
    http_body_util::BodyExt::collect(response.into_body()).await.expect("body");
    (closed, sender)
}

/// hyper keeps an HTTP/2 connection open for as long as the client answers pings; the gateway
/// closes one (GOAWAY) once it has had no open stream for `--header-read-timeout`, the limit an
/// idle HTTP/1.1 connection has. A stream that lasts longer than that keeps it open.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout_and_a_long_stream_is_not() {
    let options = FixtureOptions {
        upstream: UpstreamOptions { response_delay: Duration::from_secs(3), ..Default::default() },
        ..FixtureOptions::with_args(&["--header-read-timeout", "2"])
    };
    let fx = Fixture::start_with(options, |_| {}).await.expect("fixture");
    // The request takes 3 s, longer than the 2 s idle timeout: answered in full.
    let started = Instant::now();
    let (closed, _sender) = h2_answered_once(&fx).await;
    assert!(started.elapsed() >= Duration::from_secs(3), "{:?}", started.elapsed());
    // Then idle: closed about 2 s later.
    let idle_from = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), closed).await.expect("closed within 10 s").expect("task");
    let idle = idle_from.elapsed();
    assert!(idle >= Duration::from_millis(1500) && idle < Duration::from_secs(6), "closed after {idle:?}");
}

/// At the connection limit an idle HTTP/2 connection is closed (GOAWAY) to make room, like an
/// idle HTTP/1.1 one.
#[tokio::test]
async fn at_the_connection_limit_an_idle_http2_connection_is_closed_to_make_room() {
    let fx = two_connection_gateway(UpstreamOptions::default()).await;
    let (first, _first_sender) = h2_answered_once(&fx).await;
    let (second, _second_sender) = h2_answered_once(&fx).await;

    // A third is served at once, not after the 30 s idle timeout.
    served_at_once(&fx).await;
    // Both idle connections got the ask; at least one closed for it (before the third was
    // served: its slot is what the third took).
    let closed = tokio::time::timeout(SERVED_WITHIN, async {
        tokio::select! {
            _ = first => {}
            _ = second => {}
        }
    })
    .await;
    assert!(closed.is_ok(), "no idle HTTP/2 connection was closed ({})", connection_counts(&fx).await);
    let metrics = fx.gateway.metrics().await.expect("metrics");
    assert!(metrics.sum("portcullis_idle_connections_reclaimed_total", &[]) >= 1.0);
}

/// The admin port is bounded like the traffic port: a connection that sends no complete request
/// head within `--header-read-timeout` is closed (one that sends nothing too; HTTP/2's opening at once), and at most 64 connections are served at once,
/// the rest waiting in the backlog; so a flood there cannot hold descriptors for ever.
#[tokio::test]
async fn the_admin_port_closes_silent_connections_and_serves_a_bounded_number() {
    let options = FixtureOptions::with_args(&["--header-read-timeout", "3"]);
    let fx = Fixture::start_with(options, |_| {}).await.expect("fixture");
    let admin = fx.gateway.admin_addr();
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";

    // HTTP/2's opening is no HTTP/1.1 head: closed at once, not held until the timeout (a
    // protocol-sniffing server would then wait for HTTP/2 frames for ever).
    let mut h2 = TcpStream::connect(admin).await.expect("connect");
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("write");
    let (_, _, closed) = read_to_close(&mut h2, Duration::from_secs(2)).await;
    assert!(closed, "an HTTP/2 opening held an admin connection");

    // 64 connections that send a partial head, or nothing at all, and then nothing more.
    let mut silent = Vec::new();
    for i in 0..64 {
        let mut stream = TcpStream::connect(admin).await.expect("connect");
        if i % 2 == 0 {
            stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: adm").await.expect("write");
        }
        silent.push(stream);
    }
    // Another is connected by the kernel but not served while they hold every slot.
    let mut waiting = waits_in_the_backlog(admin, healthz).await;

    // The silent ones are closed once the header timeout passes; then the waiting one is served.
    let started = Instant::now();
    for stream in &mut silent {
        let (_, _, closed) = read_to_close(stream, Duration::from_secs(10)).await;
        assert!(closed, "a silent admin connection was left open");
    }
    assert!(started.elapsed() < Duration::from_secs(8), "closed after {:?}", started.elapsed());
    let (text, _, _) = read_to_close(&mut waiting, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}
