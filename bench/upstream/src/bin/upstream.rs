//! A fast loopback upstream that speaks just enough OpenAI for the benchmark.
//!
//! `POST /v1/chat/completions`:
//! - without `"stream":true` → a fixed ~420-byte `chat.completion` JSON (Content-Length);
//! - with `"stream":true` → an SSE stream of `chat.completion.chunk` events, one write per event
//!   (the body yields to the runtime between events, so hyper flushes each one on its own, as a
//!   real provider's token-by-token stream does). With `stream_options.include_usage` every
//!   chunk carries `"usage":null` and a usage-only chunk precedes `[DONE]` (18 events), as
//!   OpenAI does; without it, 17 events.
//! - with the request header `x-bench-hold: 1` a stream sends its first event and then stays
//!   open until the client goes away (for per-stream memory measurements).
//!
//! Single-threaded runtime, TCP_NODELAY, HTTP/1.1 keep-alive. Usage: `bench-upstream ADDR`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const CHAT_JSON: &str = concat!(
    r#"{"id":"chatcmpl-bench0000000000000000000000001","object":"chat.completion","created":1732350000,"#,
    r#""model":"bench-model","system_fingerprint":"fp_bench_0001","choices":[{"index":0,"message":"#,
    r#"{"role":"assistant","content":"Hello! This is a fixed reply from the loopback benchmark upstream, "#,
    r#"about as long as a short answer.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"#,
    r#""usage":{"prompt_tokens":9,"completion_tokens":24,"total_tokens":33}}"#
);

const WORDS: [&str; 14] = [
    "Hello",
    "!",
    " This",
    " is",
    " a",
    " streamed",
    " reply",
    " from",
    " the",
    " loopback",
    " benchmark",
    " upstream",
    ",",
    " done.",
];

/// The events of one stream, built once at start-up.
struct Streams {
    with_usage: Vec<Bytes>,
    without_usage: Vec<Bytes>,
}

fn chunk(delta: &str, finish: &str, usage_null: bool) -> String {
    let usage = if usage_null { r#","usage":null"# } else { "" };
    format!(
        "data: {{\"id\":\"chatcmpl-bench0000000000000000000000001\",\"object\":\"chat.completion.chunk\",\"created\":1732350000,\"model\":\"bench-model\",\"system_fingerprint\":\"fp_bench_0001\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]{usage}}}\n\n"
    )
}

fn build_stream(include_usage: bool) -> Vec<Bytes> {
    let mut events = Vec::new();
    events.push(chunk(r#"{"role":"assistant","content":"","refusal":null}"#, "null", include_usage));
    for word in WORDS {
        events.push(chunk(&format!("{{\"content\":\"{word}\"}}"), "null", include_usage));
    }
    events.push(chunk("{}", "\"stop\"", include_usage));
    if include_usage {
        events.push(
            "data: {\"id\":\"chatcmpl-bench0000000000000000000000001\",\"object\":\"chat.completion.chunk\",\"created\":1732350000,\"model\":\"bench-model\",\"system_fingerprint\":\"fp_bench_0001\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":16,\"total_tokens\":25}}\n\n"
                .to_owned(),
        );
    }
    events.push("data: [DONE]\n\n".to_owned());
    events.into_iter().map(Bytes::from).collect()
}

/// Yields one event per poll and returns `Pending` (after waking itself) in between, so the
/// connection flushes each event with its own write.
struct SseBody {
    events: Vec<Bytes>,
    next: usize,
    yield_next: bool,
    hold: bool,
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.hold && this.next >= 1 {
            // Held open: never ends, never wakes; dropped when the client disconnects.
            return Poll::Pending;
        }
        if this.next >= this.events.len() {
            return Poll::Ready(None);
        }
        if this.yield_next {
            this.yield_next = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.yield_next = true;
        let event = this.events[this.next].clone();
        this.next += 1;
        Poll::Ready(Some(Ok(Frame::data(event))))
    }

    fn is_end_stream(&self) -> bool {
        !self.hold && self.next >= self.events.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

type OutBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

async fn handle(streams: &'static Streams, request: Request<Incoming>) -> Result<Response<OutBody>, Infallible> {
    let hold = request.headers().contains_key("x-bench-hold");
    let path_ok = request.uri().path() == "/v1/chat/completions";
    let body = match request.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    if !path_ok {
        let mut r =
            Response::new(http_body_util::Full::new(Bytes::from_static(b"{\"error\":\"not found\"}")).boxed_unsync());
        *r.status_mut() = StatusCode::NOT_FOUND;
        return Ok(r);
    }
    let stream = contains(&body, b"\"stream\":true") || contains(&body, b"\"stream\": true");
    if !stream {
        let mut r = Response::new(http_body_util::Full::new(Bytes::from_static(CHAT_JSON.as_bytes())).boxed_unsync());
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Ok(r);
    }
    let include_usage = contains(&body, b"\"include_usage\":true") || contains(&body, b"\"include_usage\": true");
    let events = if include_usage { streams.with_usage.clone() } else { streams.without_usage.clone() };
    let mut r = Response::new(SseBody { events, next: 0, yield_next: false, hold }.boxed_unsync());
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(r)
}

fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:28101".to_owned()).parse()?;
    let streams: &'static Streams =
        Box::leak(Box::new(Streams { with_usage: build_stream(true), without_usage: build_stream(false) }));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        eprintln!(
            "bench-upstream listening on {addr} (json {} bytes, sse {} events with usage)",
            CHAT_JSON.len(),
            streams.with_usage.len()
        );
        loop {
            let (socket, _) = match listener.accept().await {
                Ok(pair) => pair,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(streams, req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    })
}
