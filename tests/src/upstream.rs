//! Loopback upstream providers speaking the OpenAI and Anthropic wire formats.
//!
//! One [`Upstream`] answers every route by path suffix, so the same server can stand in for
//! OpenAI (`…/chat/completions`, `…/completions`, `…/embeddings`, `…/responses`, `…/models`),
//! Azure OpenAI (`…/deployments/{d}/chat/completions?api-version=…`) and Anthropic
//! (`…/messages`). It records every request it receives and can be told what to answer, how
//! slowly to stream, and to hold the last SSE event of a stream until the test releases it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::wire as sse;

type RespBody = BoxBody<Bytes, Infallible>;

/// How the upstream answers. Change it at any time with [`Upstream::set`].
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// Text of the assistant's answer (put canary markers here).
    pub response_text: String,
    /// Number of content deltas the text is split into when streaming.
    pub chunks: usize,
    /// Pause between SSE events.
    pub event_delay: Duration,
    /// Queue a stream's events all at once (each its own chunk, written together as far as
    /// the server's buffer goes), as they reach a gateway that reads later than the provider
    /// writes. No delay, hold gate or timings.
    pub burst: bool,
    /// Pause before the response head is sent.
    pub response_delay: Duration,
    /// Usage reported for the prompt.
    pub input_tokens: u64,
    /// Usage reported for the completion.
    pub output_tokens: u64,
    /// Answer every request with this status and an error body instead.
    pub fail_status: Option<u16>,
    /// Headers added to every response (as a provider adds its own `x-ratelimit-*`).
    pub extra_headers: Vec<(&'static str, &'static str)>,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self {
            response_text: "Hello from the loopback upstream.".to_string(),
            chunks: 4,
            event_delay: Duration::from_millis(0),
            burst: false,
            response_delay: Duration::from_millis(0),
            input_tokens: 17,
            output_tokens: 9,
            fail_status: None,
            extra_headers: Vec::new(),
        }
    }
}

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, e.g. `/v1/chat/completions` or `/openai/deployments/d/chat/completions?api-version=x`.
    pub path_and_query: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl RecordedRequest {
    /// The body parsed as JSON (`Value::Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// First value of a header as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Path without the query string.
    pub fn path(&self) -> &str {
        self.path_and_query.split('?').next().unwrap_or_default()
    }

    /// True if `needle` occurs in any header name or value, or in the body.
    pub fn contains_anywhere(&self, needle: &str) -> bool {
        let in_headers = self.headers.iter().any(|(name, value)| {
            name.as_str().contains(needle) || String::from_utf8_lossy(value.as_bytes()).contains(needle)
        });
        in_headers || String::from_utf8_lossy(&self.body).contains(needle) || self.path_and_query.contains(needle)
    }
}

/// When a stream sent its first and last events.
#[derive(Clone, Copy, Debug)]
pub struct StreamTiming {
    pub first_event_sent: Instant,
    pub last_event_sent: Option<Instant>,
}

#[derive(Debug)]
pub(crate) struct State {
    options: Mutex<UpstreamOptions>,
    requests: Mutex<Vec<RecordedRequest>>,
    timings: Mutex<Vec<StreamTiming>>,
    /// While true, streams wait before their last event until `release` becomes true.
    hold_armed: Mutex<bool>,
    release: watch::Sender<bool>,
    /// Number of streams that have reached the hold point.
    held: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running loopback upstream. Stops when dropped.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    tls: bool,
    state: Arc<State>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Starts a plain-HTTP upstream.
    pub async fn start(options: UpstreamOptions) -> anyhow::Result<Self> {
        Self::start_inner(options, None).await
    }

    /// Starts an HTTPS upstream presenting the given server config (ALPN as configured there).
    pub async fn start_tls(options: UpstreamOptions, tls: Arc<rustls::ServerConfig>) -> anyhow::Result<Self> {
        Self::start_inner(options, Some(tls)).await
    }

    async fn start_inner(options: UpstreamOptions, tls: Option<Arc<rustls::ServerConfig>>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            options: Mutex::new(options),
            requests: Mutex::new(Vec::new()),
            timings: Mutex::new(Vec::new()),
            hold_armed: Mutex::new(false),
            release: watch::channel(false).0,
            held: watch::channel(0).0,
        });
        let is_tls = tls.is_some();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let st = state.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
        });
        Ok(Self { addr, tls: is_tls, state, accept_task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http(s)://127.0.0.1:PORT` with no trailing slash.
    pub fn origin(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// `origin` + `/v1`, the usual `baseUrl` of a ProviderCredential.
    pub fn base_url_v1(&self) -> String {
        format!("{}/v1", self.origin())
    }

    /// Changes how the upstream answers from now on.
    pub fn set(&self, f: impl FnOnce(&mut UpstreamOptions)) {
        f(&mut lock(&self.state.options));
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    /// Number of requests received so far.
    pub fn request_count(&self) -> usize {
        lock(&self.state.requests).len()
    }

    /// The most recent request, if any.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        lock(&self.state.requests).last().cloned()
    }

    /// Forgets recorded requests and stream timings.
    pub fn clear(&self) {
        lock(&self.state.requests).clear();
        lock(&self.state.timings).clear();
    }

    /// First/last event send times of every stream so far.
    pub fn stream_timings(&self) -> Vec<StreamTiming> {
        lock(&self.state.timings).clone()
    }

    /// From now on, streams stop before their last event until [`Upstream::release`].
    pub fn hold_last_event(&self) {
        *lock(&self.state.hold_armed) = true;
        self.state.release.send_replace(false);
    }

    /// Lets held streams (and future ones) send their last event.
    pub fn release(&self) {
        *lock(&self.state.hold_armed) = false;
        self.state.release.send_replace(true);
    }

    /// Waits until at least `n` streams have reached the hold point.
    pub async fn wait_held(&self, n: u64, timeout: Duration) -> anyhow::Result<()> {
        let mut rx = self.state.held.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|held| *held >= n))
            .await
            .map_err(|_| anyhow::anyhow!("no stream reached the hold point within {timeout:?}"))?
            .map_err(|_| anyhow::anyhow!("upstream state dropped"))?;
        Ok(())
    }

    /// Stops accepting new connections (existing ones keep running).
    pub fn stop_accepting(&self) {
        self.accept_task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// A response body fed from a channel, one frame per SSE event.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> http::Response<RespBody> {
    let mut resp = http::Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

fn json_response(status: StatusCode, value: &Value) -> http::Response<RespBody> {
    full(status, "application/json", value.to_string())
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<http::Response<RespBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        path_and_query: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/".into()),
        version: parts.version,
        headers: parts.headers,
        body,
    };
    lock(&state.requests).push(recorded.clone());
    let options = lock(&state.options).clone();
    if !options.response_delay.is_zero() {
        tokio::time::sleep(options.response_delay).await;
    }
    if let Some(code) = options.fail_status {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let err = json!({"error": {"message": "upstream failure injected by test", "type": "server_error", "param": null, "code": "injected"}});
        return Ok(json_response(status, &err));
    }
    let req_json = recorded.json();
    let path = recorded.path().to_string();
    let model = req_json.get("model").and_then(Value::as_str).unwrap_or("unknown-model").to_string();
    let stream = req_json.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = req_json.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);

    let mut resp = if recorded.method == "GET" && path.ends_with("/models") {
        json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": [{"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "loopback"}]}),
        )
    } else if recorded.method != "POST" {
        json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": {"message": "method not allowed", "type": "invalid_request_error", "param": null, "code": null}}),
        )
    } else if path.ends_with("/chat/completions") {
        if stream {
            let events = sse::openai_chat_events(&model, &options, include_usage);
            start_stream(state, events, &options)
        } else {
            json_response(StatusCode::OK, &sse::openai_chat_json(&model, &options))
        }
    } else if path.ends_with("/completions") {
        if stream {
            let events = sse::openai_completion_events(&model, &options, include_usage);
            start_stream(state, events, &options)
        } else {
            json_response(StatusCode::OK, &sse::openai_completion_json(&model, &options))
        }
    } else if path.ends_with("/embeddings") {
        json_response(StatusCode::OK, &sse::openai_embeddings_json(&model, &options))
    } else if path.ends_with("/responses") {
        json_response(StatusCode::OK, &sse::openai_responses_json(&model, &options))
    } else if path.ends_with("/messages") {
        if stream {
            let events = sse::anthropic_events(&model, &options);
            start_stream(state, events, &options)
        } else {
            json_response(StatusCode::OK, &sse::anthropic_json(&model, &options))
        }
    } else {
        json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": {"message": format!("no route {path}"), "type": "invalid_request_error", "param": null, "code": "unknown_url"}}),
        )
    };
    for (name, value) in &options.extra_headers {
        resp.headers_mut().append(*name, http::HeaderValue::from_static(value));
    }
    Ok(resp)
}

/// Streams `events` (already SSE-framed) with the options' delay between them, honouring the
/// hold gate before the last one; or queues them all at once (`burst`).
fn start_stream(state: Arc<State>, events: Vec<String>, options: &UpstreamOptions) -> http::Response<RespBody> {
    let delay = options.event_delay;
    let (tx, rx) = mpsc::channel::<Bytes>(if options.burst { events.len().max(1) } else { 4 });
    if options.burst {
        for event in events {
            let _ = tx.try_send(Bytes::from(event));
        }
        return event_stream(rx);
    }
    tokio::spawn(async move {
        let total = events.len();
        let mut timing_index = None;
        for (i, event) in events.into_iter().enumerate() {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if i + 1 == total && total > 1 && *lock(&state.hold_armed) {
                let mut release = state.release.subscribe();
                state.held.send_modify(|n| *n += 1);
                let _ = release.wait_for(|released| *released).await;
            }
            if tx.send(Bytes::from(event)).await.is_err() {
                return;
            }
            let now = Instant::now();
            let mut timings = lock(&state.timings);
            match timing_index {
                None => {
                    timings.push(StreamTiming { first_event_sent: now, last_event_sent: None });
                    timing_index = Some(timings.len() - 1);
                }
                Some(idx) if i + 1 == total => {
                    if let Some(t) = timings.get_mut(idx) {
                        t.last_event_sent = Some(now);
                    }
                }
                Some(_) => {}
            }
        }
    });
    event_stream(rx)
}

fn event_stream(rx: mpsc::Receiver<Bytes>) -> http::Response<RespBody> {
    let mut resp = http::Response::new(ChannelBody(rx).boxed());
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
    resp.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    resp
}
