//! An HTTP(S) client for tests: buffered requests, and streaming responses read frame by frame
//! (or SSE event by SSE event) with arrival timestamps.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::time::Instant;

use crate::pki::TestPki;

/// Default bound on any single request in tests.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Which HTTP versions the client offers over TLS (ALPN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersions {
    /// ALPN `h2` and `http/1.1`; plain-text connections use HTTP/1.1.
    Auto,
    /// ALPN `http/1.1` only.
    Http1Only,
}

/// A hyper-util client with a rustls connector trusting the test CA (if any).
#[derive(Clone, Debug)]
pub struct TestClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl TestClient {
    /// A client for plain HTTP (HTTPS attempts fail: it trusts no roots).
    pub fn plain() -> Self {
        let roots = rustls::RootCertStore::empty();
        Self::from_roots(roots, HttpVersions::Auto).unwrap_or_else(|e| panic!("building plain client: {e}"))
    }

    /// A client trusting the test CA, offering h2 and http/1.1.
    pub fn with_ca(pki: &TestPki) -> anyhow::Result<Self> {
        Self::from_roots(pki.root_store()?, HttpVersions::Auto)
    }

    /// A client trusting the test CA with the given ALPN choice.
    pub fn with_ca_versions(pki: &TestPki, versions: HttpVersions) -> anyhow::Result<Self> {
        Self::from_roots(pki.root_store()?, versions)
    }

    fn from_roots(roots: rustls::RootCertStore, versions: HttpVersions) -> anyhow::Result<Self> {
        let config = rustls::ClientConfig::builder_with_provider(crate::crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_or_http();
        let connector = match versions {
            HttpVersions::Auto => builder.enable_all_versions().build(),
            HttpVersions::Http1Only => builder.enable_http1().build(),
        };
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(5)).build(connector);
        Ok(Self { client })
    }

    /// Sends a request and buffers the whole response (bounded by [`REQUEST_TIMEOUT`]).
    pub async fn send(&self, req: Request<Full<Bytes>>) -> anyhow::Result<Response> {
        let what = format!("{} {}", req.method(), req.uri());
        let fut = async {
            let resp = self.client.request(req).await.with_context(|| format!("sending {what}"))?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.with_context(|| format!("reading body of {what}"))?.to_bytes();
            Ok::<_, anyhow::Error>(Response {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| anyhow::anyhow!("{what} did not complete within {REQUEST_TIMEOUT:?}"))?
    }

    /// Sends a request and returns as soon as the response head arrives.
    pub async fn send_streaming(&self, req: Request<Full<Bytes>>) -> anyhow::Result<StreamingResponse> {
        let what = format!("{} {}", req.method(), req.uri());
        let started = Instant::now();
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| anyhow::anyhow!("no response head for {what} within {REQUEST_TIMEOUT:?}"))?
            .with_context(|| format!("sending {what}"))?;
        let (parts, body) = resp.into_parts();
        Ok(StreamingResponse {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            started,
            head_at: Instant::now(),
            body,
            buf: String::new(),
            pending: VecDeque::new(),
            ended: false,
            raw: Vec::new(),
        })
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Response> {
        self.send(request(Method::GET, url, headers, Bytes::new())?).await
    }

    pub async fn post_json(&self, url: &str, headers: &[(&str, &str)], body: &Value) -> anyhow::Result<Response> {
        self.send(json_request(url, headers, body)?).await
    }

    pub async fn post_raw(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<Response> {
        self.send(request(Method::POST, url, headers, body.into())?).await
    }

    pub async fn post_json_streaming(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> anyhow::Result<StreamingResponse> {
        self.send_streaming(json_request(url, headers, body)?).await
    }
}

/// Builds a request with the given headers.
pub fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> anyhow::Result<Request<Full<Bytes>>> {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    Ok(builder.body(Full::new(body))?)
}

/// A POST with a JSON body and `content-type: application/json`.
pub fn json_request(url: &str, headers: &[(&str, &str)], body: &Value) -> anyhow::Result<Request<Full<Bytes>>> {
    let mut all: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    request(Method::POST, url, &all, Bytes::from(body.to_string()))
}

/// A fully buffered response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: StatusCode,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Value::Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Every value of a header, in order (values that are not visible ASCII are skipped).
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect()
    }

    /// `x-portcullis-error-code`.
    pub fn error_code(&self) -> Option<&str> {
        self.header("x-portcullis-error-code")
    }

    /// `x-request-id`.
    pub fn request_id(&self) -> Option<&str> {
        self.header("x-request-id")
    }

    /// A one-line description for assertion messages.
    pub fn describe(&self) -> String {
        format!("{} {:?} body={}", self.status, self.headers, self.text())
    }
}

/// A data frame and when it arrived.
#[derive(Clone, Debug)]
pub struct Chunk {
    pub at: Instant,
    pub data: Bytes,
}

/// One server-sent event and when its last byte arrived.
#[derive(Clone, Debug)]
pub struct SseEvent {
    pub at: Instant,
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    /// The data parsed as JSON (`Value::Null` for `[DONE]` or non-JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }

    pub fn is_done(&self) -> bool {
        self.data.trim() == "[DONE]"
    }
}

/// A response whose body is read incrementally.
#[derive(Debug)]
pub struct StreamingResponse {
    pub status: StatusCode,
    pub version: http::Version,
    pub headers: HeaderMap,
    /// When the request was sent.
    pub started: Instant,
    /// When the response head arrived.
    pub head_at: Instant,
    body: Incoming,
    buf: String,
    pending: VecDeque<SseEvent>,
    ended: bool,
    raw: Vec<u8>,
}

impl StreamingResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Every body byte received so far.
    pub fn raw_so_far(&self) -> &[u8] {
        &self.raw
    }

    /// The next data frame, `None` at the end of the body.
    pub async fn next_chunk(&mut self, timeout: Duration) -> anyhow::Result<Option<Chunk>> {
        if self.ended {
            return Ok(None);
        }
        loop {
            let frame = tokio::time::timeout(timeout, self.body.frame())
                .await
                .map_err(|_| anyhow::anyhow!("no body frame within {timeout:?}"))?;
            match frame {
                None => {
                    self.ended = true;
                    return Ok(None);
                }
                Some(Err(e)) => return Err(anyhow::anyhow!("body error: {e}")),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if data.is_empty() {
                            continue;
                        }
                        self.raw.extend_from_slice(&data);
                        return Ok(Some(Chunk { at: Instant::now(), data }));
                    }
                }
            }
        }
    }

    /// The next complete SSE event, `None` at the end of the body.
    pub async fn next_event(&mut self, timeout: Duration) -> anyhow::Result<Option<SseEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(Some(ev));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_chunk(left).await? {
                None => {
                    let rest = std::mem::take(&mut self.buf);
                    return Ok(parse_event(&rest, Instant::now()));
                }
                Some(chunk) => {
                    self.buf.push_str(&String::from_utf8_lossy(&chunk.data).replace("\r\n", "\n"));
                    while let Some(end) = self.buf.find("\n\n") {
                        let block: String = self.buf.drain(..end + 2).collect();
                        if let Some(ev) = parse_event(&block, chunk.at) {
                            self.pending.push_back(ev);
                        }
                    }
                }
            }
        }
    }

    /// Reads every remaining SSE event until the body ends (bounded by `timeout` overall).
    pub async fn collect_events(&mut self, timeout: Duration) -> anyhow::Result<Vec<SseEvent>> {
        let deadline = Instant::now() + timeout;
        let mut events = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await? {
                Some(ev) => events.push(ev),
                None => return Ok(events),
            }
        }
    }

    /// Reads the rest of the body and returns everything received (bounded by `timeout`).
    pub async fn collect_body(&mut self, timeout: Duration) -> anyhow::Result<Bytes> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.next_chunk(left).await?.is_none() {
                return Ok(Bytes::from(self.raw.clone()));
            }
        }
    }
}

/// Parses one SSE block (lines up to a blank line). Comment-only blocks yield `None`.
fn parse_event(block: &str, at: Instant) -> Option<SseEvent> {
    let mut event = None;
    let mut data: Vec<&str> = Vec::new();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            event = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    if event.is_none() && data.is_empty() {
        return None;
    }
    Some(SseEvent { at, event, data: data.join("\n") })
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_sse_blocks() {
        let now = Instant::now();
        let ev = parse_event("event: message_start\ndata: {\"a\":1}\n\n", now).expect("event");
        assert_eq!(ev.event.as_deref(), Some("message_start"));
        assert_eq!(ev.json()["a"], 1);
        assert!(parse_event(": keep-alive\n\n", now).is_none());
        assert!(parse_event("data: [DONE]\n\n", now).expect("done").is_done());
    }
}
