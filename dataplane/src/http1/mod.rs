//! The client-facing HTTP/1.1 server: one task per connection that reads a request head, runs
//! the pipeline, and writes the response, in turn, on the same socket.
//!
//! ```text
//!  socket ─▶ buf ─▶ head::parse ─┬─▶ ClientRequest<Full>         whole body already read; the
//!                                │                                socket is watched meanwhile
//!                                │                                for a client that left
//!                                └─▶ ClientRequest<RequestBody>  borrows the connection: chunked,
//!                                           │                     or a body still arriving
//!                                           ▼
//!                          Gateway::handle ─▶ write_response ─▶ socket   head, body frames and chunk
//!                                                                        framing merged into few writes
//! ```
//!
//! Written for the hot path instead of serving HTTP/1 through hyper: the header fields stay in
//! the request head, indexed, instead of being copied into a map (`crate::fields::RawFields`);
//! the request body is read by the pipeline straight from the connection's buffer (no body
//! channel, no second task); the response head is encoded in one pass, and every body frame
//! already available is merged into the same write, so a JSON answer goes out in one `write`
//! and a burst of SSE events in one.
//! HTTP/2 (ALPN `h2`, or the prior-knowledge preface on plain TCP) is handed to hyper.
//!
//! Hardening: strict framing (see `head`), a bounded head read within the header timeout,
//! bounded chunk lines and trailers, no request smuggling through ambiguous lengths, and a
//! connection whose request body was not read to its end is closed (after a bounded linger so
//! the client can read the answer) rather than reused.

pub mod codec;
pub mod head;
mod idle;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::busy_poll::BusyPoll;
use crate::error::GatewayError;
use crate::pipeline::forward::PassedFields;
use crate::pipeline::limit::RateHeaders;
use crate::pipeline::{ClientRequest, Gateway, Reply};
use codec::{poll_fill, poll_fill_waiting, push_decimal, worth_parsing, Chunked, Decoder, H1Error};
pub use head::{Framing, Http1Error};
pub use idle::Reclaim;
pub(crate) use idle::Reclaimable;
use idle::{Deadline, Drain};

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Room the response head is encoded into (a connection's write buffer starts with it).
const OUT_SIZE: usize = 4096;
/// How long a keep-alive connection waits for its next request before it gives back its read
/// and write buffers (20 KiB, more after a large answer): the next request, if any, takes new
/// ones. A connection that is busy keeps them; an idle one (a client pool's spare connection)
/// holds only its task until it is used again or times out. nginx frees them at once; waiting
/// a second keeps the allocations off the path of a busy connection's every request. The cost:
/// the header timer of a busy connection fires once a second rather than once per header
/// timeout, waking its task once (mid-request, for a long answer) to be moved later.
const IDLE_RELEASE: Duration = Duration::from_secs(1);
/// Body bytes merged into one write before it is sent.
const WRITE_MERGE: usize = 64 * 1024;
/// A frame at least this large is written as it is instead of being copied into the buffer.
const WRITE_DIRECT: usize = 16 * 1024;
/// After refusing a request whose body was not read, how long and how much of it is read and
/// thrown away so the client, still sending, reads the answer instead of a reset.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone)]
pub struct Settings {
    /// Time a client has to send a complete request head, counted from when the server starts
    /// waiting for it (so it also bounds how long a keep-alive connection may sit idle).
    pub header_read_timeout: Duration,
    /// Time a client may take to accept any more of a response that does not fit in the socket
    /// buffers (nginx's `send_timeout`): one that stops reading is disconnected, and the provider
    /// request it was holding open is cancelled. HTTP/2 streams get the same limit (`stall`).
    pub response_write_timeout: Duration,
    /// Told of every request when busy polling is on.
    pub busy_poll: Option<Arc<BusyPoll>>,
    /// The listener's asks to close idle connections (see [`Reclaim`]).
    pub reclaim: Option<Arc<Reclaim>>,
}

/// How a connection ended.
#[derive(Debug)]
pub enum Ended<IO> {
    Closed,
    /// The client speaks HTTP/2 with prior knowledge: serve it with `Rewind`, which replays what
    /// was read.
    Http2(Rewind<IO>),
}

#[derive(Debug)]
struct Conn<IO> {
    io: IO,
    buf: BytesMut,
    out: Vec<u8>,
    /// What is left of the current request's body.
    body: Decoder,
    /// The body could not be read (bad framing, early end): the connection cannot be reused.
    broken: bool,
    /// When the connection gives back its buffers while idle, then when the next request head
    /// must have arrived.
    head_deadline: Deadline,
    /// See [`Settings::response_write_timeout`].
    write_timeout: Duration,
    /// The rest of a `100 Continue` begun but not finished when the body was given up (a body
    /// timeout while the client took none of it): sent ahead of the response, which would
    /// otherwise follow a partial status line.
    interim_owed: &'static [u8],
}

impl<IO> Conn<IO> {
    /// Gives back the read and write buffers of a connection waiting for a request, when no byte
    /// of one has come. `poll_fill_waiting` reads the next request through the stack and takes a
    /// read buffer with its first bytes; `write_response` takes a write buffer for its head.
    fn release_buffers(&mut self) {
        if self.buf.is_empty() && self.out.is_empty() {
            self.buf = BytesMut::new();
            self.out = Vec::new();
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Conn<IO> {
    async fn flush_out(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            write_all_within(&mut self.io, &self.out, self.write_timeout).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Half-closes the connection (for TLS: sends `close_notify` after what is still buffered),
    /// within the write timeout.
    async fn shut_down(&mut self) {
        let _ = tokio::time::timeout(self.write_timeout, self.io.shutdown()).await;
    }

    /// The whole request body, if it has already been read (a `Content-Length` body).
    fn take_buffered_body(&mut self) -> Option<Bytes> {
        match self.body {
            Decoder::Done => Some(Bytes::new()),
            Decoder::Length(length) if self.buf.len() as u64 >= length => {
                self.body = Decoder::Done;
                Some(self.buf.split_to(length as usize).freeze())
            }
            _ => None,
        }
    }

    /// Ready when the client has closed the connection (or it failed). Pipelined requests that
    /// arrive meanwhile are kept for later, up to one head's worth; past that, nothing more is
    /// read until they are served.
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.buf.len() < MAX_HEAD {
            match poll_fill(&mut self.io, cx, &mut self.buf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Pending
    }

    /// Consumes whatever is left of the request body from bytes already read, without waiting.
    /// True when the body is complete and the connection can carry another request.
    fn finish_body_from_buffer(&mut self) -> bool {
        while !self.broken {
            match self.body.decode(&mut self.buf) {
                Ok(Some(_)) => {}
                Ok(None) => return self.body.is_done(),
                Err(_) => self.broken = true,
            }
        }
        false
    }
}

/// The interim answer to `Expect: 100-continue`.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The request body, read from the connection while the pipeline holds it.
#[derive(Debug)]
pub struct RequestBody<'c, IO> {
    conn: &'c mut Conn<IO>,
    /// What is left to send of `100 Continue` before the body is read; `None` once it is sent
    /// and flushed, or when the client did not ask for it. It goes out when the pipeline first
    /// wants body bytes that have not come, so a request refused on its head alone (route, key,
    /// kill switch) is answered without inviting the client to send its body.
    interim: Option<&'static [u8]>,
}

impl<IO: AsyncWrite + Unpin> RequestBody<'_, IO> {
    /// Sends the rest of `100 Continue`, if owed. Bounded by the pipeline's body timeout, which
    /// runs while this waits.
    fn poll_interim(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(rest) = self.interim {
            let io = Pin::new(&mut self.conn.io);
            if rest.is_empty() {
                ready!(io.poll_flush(cx))?;
                self.interim = None;
            } else {
                match ready!(io.poll_write(cx, rest))? {
                    0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    n => self.interim = Some(&rest[n..]),
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO> Drop for RequestBody<'_, IO> {
    fn drop(&mut self) {
        // Begun and not finished: the response goes after the rest of it (a final response may
        // follow a 100, RFC 9110 §15.2).
        if let Some(rest) = self.interim.filter(|rest| rest.len() < CONTINUE.len()) {
            self.conn.interim_owed = rest;
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Body for RequestBody<'_, IO> {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        loop {
            let conn = &mut *this.conn;
            if conn.broken {
                return Poll::Ready(Some(Err(H1Error::IncompleteBody)));
            }
            match conn.body.decode(&mut conn.buf) {
                Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(None) if conn.body.is_done() => return Poll::Ready(None),
                Ok(None) => {}
                Err(e) => {
                    conn.broken = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if let Err(e) = ready!(this.poll_interim(cx)) {
                this.conn.broken = true;
                return Poll::Ready(Some(Err(H1Error::Write(e))));
            }
            let conn = &mut *this.conn;
            match ready!(poll_fill(&mut conn.io, cx, &mut conn.buf)) {
                Ok(0) => conn.broken = true,
                Ok(_) => {}
                Err(e) => {
                    conn.broken = true;
                    return Poll::Ready(Some(Err(H1Error::Read(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.body.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.conn.body.size_hint()
    }
}

impl From<Http1Error> for GatewayError {
    fn from(error: Http1Error) -> Self {
        GatewayError::Http1(error)
    }
}

/// What waiting for the next request head gave. The head is not boxed: moving it out of the
/// future once costs less than an allocation and a free per request.
#[allow(clippy::large_enum_variant)]
enum Next {
    Head(head::Head),
    /// Nothing more on this connection: closed by the client, idle too long, or draining.
    Close,
    Refuse(head::Refused),
    Http2,
}

async fn read_head<IO: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<IO>,
    settings: &Settings,
    drain: &mut Drain,
    reclaim: &mut Option<Reclaimable>,
    first: bool,
) -> Next {
    let idle_since = Instant::now();
    let close_at = idle_since + settings.header_read_timeout;
    // First the buffers go, then the connection. One timer for both: a busy connection's is
    // moved later with every request without touching the wheel (see `Deadline`).
    let release_at = idle_since + IDLE_RELEASE;
    let mut releasing = release_at < close_at;
    conn.head_deadline.set(if releasing { release_at } else { close_at });
    // How much of the buffer has been looked at for a line end since the last parse.
    let mut looked = 0;
    loop {
        // On a new plain-TCP connection, bytes that could still be the HTTP/2 preface wait for
        // the rest of it.
        let seen = conn.buf.len().min(PREFACE.len());
        let maybe_h2 = first && seen > 0 && conn.buf[..seen] == PREFACE[..seen];
        if maybe_h2 && seen == PREFACE.len() {
            return Next::Http2;
        }
        if !maybe_h2 && worth_parsing(&conn.buf, looked, MAX_HEAD) {
            match head::parse(&mut conn.buf, MAX_HEAD) {
                Ok(Some(head)) => return Next::Head(head),
                Ok(None) => {}
                Err(refused) => return Next::Refuse(refused),
            }
        }
        if !maybe_h2 {
            looked = conn.buf.len();
        }
        let idle = conn.buf.is_empty();
        if idle && drain.draining() {
            return Next::Close;
        }
        if idle && reclaim.as_ref().is_some_and(Reclaimable::ask_came) {
            // A request may have come since the last read (a new connection's usually has been
            // sent while it waited in the backlog): a connection with one is not idle.
            let Conn { io, buf, .. } = &mut *conn;
            match std::future::poll_fn(|cx| Poll::Ready(poll_fill_waiting(io, cx, buf))).await {
                Poll::Ready(Ok(0) | Err(_)) => return Next::Close,
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending if reclaim.as_mut().is_some_and(|r| r.asked(idle_since)) => return Next::Close,
                Poll::Pending => {}
            }
        }
        let Conn { io, buf, head_deadline, .. } = &mut *conn;
        tokio::select! {
            // The socket first: a waiting connection's usual wake-up is its next request.
            biased;
            read = std::future::poll_fn(|cx| poll_fill_waiting(io, cx, buf)) => match read {
                Ok(0) | Err(_) => return Next::Close,
                Ok(_) => {}
            },
            () = std::future::poll_fn(|cx| head_deadline.poll_passed(cx)) => {
                if releasing {
                    // Idle this long (or a head still coming, which keeps its buffer).
                    releasing = false;
                    conn.release_buffers();
                    conn.head_deadline.set(close_at);
                    continue;
                }
                return if conn.buf.is_empty() {
                    Next::Close
                } else {
                    Next::Refuse(head::Refused::of(Http1Error::HeadTimeout, &conn.buf))
                };
            }
            () = std::future::poll_fn(|cx| drain.poll_draining(cx)), if !drain.draining() => {}
            // Looked at by the next turn, if this connection is still idle then.
            () = std::future::poll_fn(|cx| reclaim.as_mut().map_or(Poll::Pending, |r| r.poll_ask(cx))),
                if idle && reclaim.is_some() => {}
        }
    }
}

/// Serves HTTP/1.1 requests on `io` until the client or the server ends the connection.
/// `detect_h2`: look for the HTTP/2 prior-knowledge preface first (plain TCP).
pub async fn serve<IO>(
    io: IO,
    peer: SocketAddr,
    gateway: &Gateway,
    settings: &Settings,
    shutdown: watch::Receiver<bool>,
    detect_h2: bool,
) -> Ended<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = Conn {
        io,
        // Taken with the first request's bytes: a connection that only sits open holds none.
        buf: BytesMut::new(),
        out: Vec::new(),
        body: Decoder::Done,
        broken: false,
        head_deadline: Deadline::new(),
        write_timeout: settings.response_write_timeout,
        interim_owed: &[],
    };
    let mut drain = Drain::new(shutdown);
    let mut reclaim = settings.reclaim.as_ref().map(Reclaim::follow);
    let mut first = detect_h2;
    loop {
        let head = match read_head(&mut conn, settings, &mut drain, &mut reclaim, first).await {
            Next::Head(head) => head,
            Next::Close => return Ended::Closed,
            Next::Http2 => return Ended::Http2(Rewind { pending: conn.buf.freeze(), io: conn.io }),
            Next::Refuse(head::Refused { error, flavor, head_only }) => {
                let error = GatewayError::from(error);
                let response = error.into_response(flavor, &crate::api::request_id(&http::HeaderMap::new()));
                conn.broken = true;
                let _ = write_response(&mut conn, Reply::plain(response), Version::HTTP_11, head_only, false).await;
                linger(&mut conn).await;
                return Ended::Closed;
            }
        };
        first = false;
        if let Some(busy) = &settings.busy_poll {
            busy.touch();
        }
        let head::Head { method, uri, version, headers, framing, keep_alive, expect_continue } = head;
        let head_only = method == Method::HEAD;
        conn.body = match framing {
            Framing::Length(0) => Decoder::Done,
            Framing::Length(length) => Decoder::Length(length),
            Framing::Chunked => Decoder::Chunked(Chunked::default()),
        };
        // Owed only while none of the body has come (a client may send it without waiting).
        let interim = (expect_continue && !conn.body.is_done() && conn.buf.is_empty()).then_some(CONTINUE);
        let reply = match conn.take_buffered_body() {
            // The whole body has arrived (the usual case): the pipeline gets it as it is, and
            // the connection is watched meanwhile, so a client that goes away while the provider
            // thinks cancels the request, as it would mid-stream.
            Some(body) => {
                let request = ClientRequest { method, uri, headers, body: Full::new(body) };
                // Pinned where it is made, so `select!` holds a pointer rather than a copy.
                let handling = std::pin::pin!(gateway.handle(request, Some(peer)));
                tokio::select! {
                    biased;
                    reply = handling => reply,
                    () = std::future::poll_fn(|cx| conn.poll_gone(cx)) => return Ended::Closed,
                }
            }
            // The pipeline reads the rest of the body from the connection itself.
            None => {
                let request = ClientRequest { method, uri, headers, body: RequestBody { conn: &mut conn, interim } };
                gateway.handle(request, Some(peer)).await
            }
        };

        let body_read = conn.finish_body_from_buffer();
        let keep_alive = keep_alive && body_read && !drain.draining();
        let reusable = write_response(&mut conn, reply, version, head_only, keep_alive).await;
        match reusable {
            Ok(true) => continue,
            Ok(_) if !body_read => {
                linger(&mut conn).await;
                return Ended::Closed;
            }
            // A client that stopped reading would not take a TLS `close_notify` either: drop
            // the connection rather than wait out the write timeout a second time.
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Ended::Closed,
            Ok(_) | Err(_) => {
                conn.shut_down().await;
                return Ended::Closed;
            }
        }
    }
}

/// Half-closes, then reads and discards what the client is still sending, within bounds.
async fn linger<IO: AsyncRead + AsyncWrite + Unpin>(conn: &mut Conn<IO>) {
    conn.shut_down().await;
    let deadline = Instant::now() + LINGER_TIME;
    let mut discarded = 0usize;
    // On the heap: held across awaits, an array would make every connection's future 4 KiB
    // larger for a path few connections take.
    let mut scratch = vec![0u8; 4096];
    while discarded < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, conn.io.read(&mut scratch)).await {
            Ok(Ok(n)) if n > 0 => discarded += n,
            _ => break,
        }
    }
}

/// Response headers the server writes itself.
fn managed(name: &[u8]) -> bool {
    matches!(name, b"content-length" | b"transfer-encoding" | b"connection" | b"keep-alive")
}

fn push_hex(out: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// How the response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delimit {
    None,
    Length(u64),
    Chunked,
    Close,
}

/// Encodes the status line and headers into `out`.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    passed: Option<&PassedFields>,
    rate: Option<&RateHeaders>,
    delimit: Delimit,
    version: Version,
    keep_alive: bool,
) {
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut dated = false;
    let mut field = |name: &[u8], value: &[u8]| {
        if managed(name) || rate.is_some_and(|rate| rate.replaces(name)) {
            return;
        }
        // Names and values were checked by whoever parsed them (httparse, `HeaderName`,
        // `HeaderValue`): nothing here can end a line early.
        debug_assert!(!name.iter().chain(value).any(|&b| b == b'\r' || b == b'\n'));
        dated |= name == b"date";
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in &parts.headers {
        field(name.as_str().as_bytes(), value.as_bytes());
    }
    for (name, value) in passed.into_iter().flat_map(PassedFields::each) {
        field(name, value.bytes());
    }
    if let Some(rate) = rate {
        rate.encode(out);
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        date::extend(out);
        out.extend_from_slice(b"\r\n");
    }
    match delimit {
        Delimit::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Delimit::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Delimit::None | Delimit::Close => {}
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes `response`. `Ok(true)`: written whole and correctly delimited, with the connection
/// kept alive, so it may carry another request. `Ok(false)`: the connection must close, because
/// `keep_alive` was false, or the response was announced with `connection: close` (a body of
/// unknown length to an HTTP/1.0 client ends with the connection), or the body failed or did not
/// match its length (the close is how the client learns it is incomplete).
async fn write_response<IO: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<IO>,
    reply: Reply,
    version: Version,
    head_only: bool,
    keep_alive: bool,
) -> io::Result<bool> {
    let Reply { response, passed, rate } = reply;
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let bodiless = status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let exact = body.size_hint().exact();
    let mut delimit = match exact {
        _ if bodiless => Delimit::None,
        Some(length) => Delimit::Length(length),
        None if version == Version::HTTP_11 => Delimit::Chunked,
        None => Delimit::Close,
    };
    let keep_alive = keep_alive && delimit != Delimit::Close;
    if head_only && delimit == Delimit::Chunked {
        delimit = Delimit::None;
    }
    conn.out.clear();
    // Only the first response after the buffers were given back allocates.
    conn.out.reserve(OUT_SIZE);
    conn.out.extend_from_slice(std::mem::take(&mut conn.interim_owed));
    encode_head(&mut conn.out, &parts, passed.as_ref(), rate.as_ref(), delimit, version, keep_alive);
    drop(passed);
    if head_only || bodiless {
        conn.flush_out().await?;
        return Ok(keep_alive);
    }

    let mut body = std::pin::pin!(body);
    let mut left = match delimit {
        Delimit::Length(n) => n,
        _ => u64::MAX,
    };
    loop {
        // Wait only when nothing is buffered; otherwise take what is ready and send it.
        let polled = if conn.out.is_empty() {
            // Waiting for the provider: a client that goes away ends the response (and the
            // upstream request with it) now rather than at the next write.
            let next = std::future::poll_fn(|cx| match body.as_mut().poll_frame(cx) {
                Poll::Ready(frame) => Poll::Ready(Some(frame)),
                Poll::Pending => conn.poll_gone(cx).map(|()| None),
            })
            .await;
            match next {
                Some(frame) => Some(frame),
                None => return Ok(false),
            }
        } else {
            std::future::poll_fn(|cx| {
                Poll::Ready(match body.as_mut().poll_frame(cx) {
                    Poll::Ready(frame) => Some(frame),
                    Poll::Pending => None,
                })
            })
            .await
        };
        let Some(frame) = polled else {
            conn.flush_out().await?;
            continue;
        };
        match frame {
            Some(Ok(frame)) => {
                let Ok(mut data) = frame.into_data() else { continue };
                if data.is_empty() {
                    continue;
                }
                let overrun = data.len() as u64 > left;
                if overrun {
                    data.truncate(left as usize);
                }
                if delimit != Delimit::Chunked {
                    left -= data.len() as u64;
                }
                if delimit == Delimit::Chunked {
                    push_hex(&mut conn.out, data.len());
                    conn.out.extend_from_slice(b"\r\n");
                }
                if data.len() >= WRITE_DIRECT {
                    conn.flush_out().await?;
                    write_all_within(&mut conn.io, &data, conn.write_timeout).await?;
                } else {
                    conn.out.extend_from_slice(&data);
                }
                if delimit == Delimit::Chunked {
                    conn.out.extend_from_slice(b"\r\n");
                }
                if overrun {
                    conn.flush_out().await?;
                    return Ok(false);
                }
                if conn.out.len() >= WRITE_MERGE {
                    conn.flush_out().await?;
                }
            }
            Some(Err(_)) => {
                // Cut short: no terminating chunk, so the client sees the body is incomplete.
                conn.flush_out().await?;
                return Ok(false);
            }
            None => {
                if delimit == Delimit::Chunked {
                    conn.out.extend_from_slice(b"0\r\n\r\n");
                }
                conn.flush_out().await?;
                return Ok(keep_alive && (!matches!(delimit, Delimit::Length(_)) || left == 0));
            }
        }
    }
}

/// Writes all of `data` and flushes it (TLS keeps records the socket did not take yet; they
/// must not wait for the next response). Fails with `TimedOut` once the client has accepted
/// nothing for `limit`; the timer exists only while a write is blocked. (While the last TLS
/// records are flushed, a partial send does not show as progress: a TLS client that takes the
/// final ≤ 64 KiB of a response slower than over `limit` is cut off.)
async fn write_all_within<IO: AsyncWrite + Unpin>(io: &mut IO, mut data: &[u8], limit: Duration) -> io::Result<()> {
    let mut stalled: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| loop {
        let polled = if data.is_empty() {
            match Pin::new(&mut *io).poll_flush(cx) {
                Poll::Ready(flushed) => return Poll::Ready(flushed),
                Poll::Pending => Poll::Pending,
            }
        } else {
            Pin::new(&mut *io).poll_write(cx, data)
        };
        match polled {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                data = &data[n..];
                // Progress: a later stall is timed from its own start.
                stalled = None;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                let timer = stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                return match std::future::Future::poll(timer.as_mut(), cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client accepted none of the response within the write timeout",
                    ))),
                    Poll::Pending => Poll::Pending,
                };
            }
        }
    })
    .await
}

/// The `Date` header value, rendered once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
    }

    pub(super) fn extend(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != second {
                let rendered = httpdate::fmt_http_date(now);
                if rendered.len() == 29 {
                    cached.1.copy_from_slice(rendered.as_bytes());
                    cached.0 = second;
                }
            }
            out.extend_from_slice(&cached.1);
        });
    }
}

/// An IO that first replays bytes already read from it.
#[derive(Debug)]
pub struct Rewind<IO> {
    pending: Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pending.is_empty() {
            let n = this.pending.len().min(buf.remaining());
            buf.put_slice(&this.pending.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::ResponseFields;

    #[test]
    fn a_providers_fields_are_written_with_the_gateways_framing_date_and_limits() {
        let provider = crate::fields::tests::response_fields(
            "HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nContent-Length: 999\r\n\
             Connection: close\r\nX-Ratelimit-Limit-Requests: 5000\r\nX-Ratelimit-Limit-Tokens: 777\r\n\
             OpenAI-Version: 2020-10-01\r\n\r\n",
        );
        let passed = PassedFields::new(ResponseFields::Raw(provider), http::HeaderValue::from_static("req_1"));
        let rate = RateHeaders::requests(50, 49, 1_250);
        let (parts, ()) = http::Response::new(()).into_parts();
        let mut out = Vec::new();
        encode_head(&mut out, &parts, Some(&passed), Some(&rate), Delimit::Length(12), Version::HTTP_11, true);
        // The provider's date (once), its token limit (the key has none of its own), its other
        // fields; its length, `Connection` and request limits replaced by the gateway's.
        assert_eq!(
            String::from_utf8(out).expect("ascii"),
            "HTTP/1.1 200 OK\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\nx-ratelimit-limit-tokens: 777\r\n\
             openai-version: 2020-10-01\r\nx-request-id: req_1\r\nx-ratelimit-limit-requests: 50\r\n\
             x-ratelimit-remaining-requests: 49\r\nx-ratelimit-reset-requests: 1.250s\r\ncontent-length: 12\r\n\r\n"
        );

        // Without a date from anyone, the gateway writes its own.
        let passed = PassedFields::new(
            ResponseFields::Raw(crate::fields::tests::response_fields("HTTP/1.1 200 OK\r\n\r\n")),
            http::HeaderValue::from_static("req_2"),
        );
        let mut out = Vec::new();
        encode_head(&mut out, &parts, Some(&passed), None, Delimit::Chunked, Version::HTTP_11, false);
        let text = String::from_utf8(out).expect("ascii");
        assert_eq!(text.matches("date: ").count(), 1, "{text}");
        assert!(text.ends_with("transfer-encoding: chunked\r\nconnection: close\r\n\r\n"), "{text}");
    }

    /// A `100 Continue` the client took only part of before the body was given up (its socket
    /// full): the response goes out after the rest of it, not after a partial status line.
    #[tokio::test]
    async fn a_response_follows_the_rest_of_a_partly_sent_100_continue() {
        let (near, mut far) = tokio::io::duplex(10);
        let mut conn = Conn {
            io: near,
            buf: BytesMut::new(),
            out: Vec::new(),
            body: Decoder::Length(5),
            broken: false,
            head_deadline: Deadline::new(),
            write_timeout: Duration::from_secs(5),
            interim_owed: &[],
        };
        let mut body = RequestBody { conn: &mut conn, interim: Some(CONTINUE) };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending(), "the socket takes 10 bytes");
        assert_eq!(body.interim.map(<[u8]>::len), Some(CONTINUE.len() - 10));
        drop(body);

        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut chunk = [0u8; 64];
            while !String::from_utf8_lossy(&seen).ends_with("timeout") {
                match far.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&chunk[..n]),
                }
            }
            String::from_utf8(seen).expect("ascii")
        });
        let response = http::Response::builder()
            .status(StatusCode::REQUEST_TIMEOUT)
            .body(crate::body::full("timeout"))
            .expect("response");
        let reusable = write_response(&mut conn, Reply::plain(response), Version::HTTP_11, false, false).await;
        assert!(!reusable.expect("written"), "not kept alive");
        let text = tokio::time::timeout(Duration::from_secs(5), reader).await.expect("read").expect("reader");
        assert!(text.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 408 Request Timeout\r\n"), "{text:?}");
        assert!(conn.interim_owed.is_empty());
    }

    /// A client's socket that records how much room each read that brought bytes offered.
    struct RoomSeen {
        io: tokio::io::DuplexStream,
        rooms: Vec<usize>,
    }

    impl AsyncRead for RoomSeen {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let (room, before) = (buf.remaining(), buf.filled().len());
            let polled = Pin::new(&mut self.io).poll_read(cx, buf);
            if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
                self.rooms.push(room);
            }
            polled
        }
    }

    impl AsyncWrite for RoomSeen {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.io).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// A keep-alive connection idle for less than `IDLE_RELEASE` keeps its buffers; one idle
    /// longer gives them back and serves its next request with new ones; a new connection takes
    /// none before its first bytes. The header timeout is what it was.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_gives_its_buffers_back_and_serves_the_next_request() {
        const REQUEST: &[u8] = b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n\r\n";
        let settings = Settings {
            header_read_timeout: Duration::from_secs(10),
            response_write_timeout: Duration::from_secs(5),
            busy_poll: None,
            reclaim: None,
        };
        let (_draining, signal) = watch::channel(false);
        let mut drain = Drain::new(signal);
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let mut conn = Conn {
            io: RoomSeen { io: near, rooms: Vec::new() },
            buf: BytesMut::new(),
            out: Vec::new(),
            body: Decoder::Done,
            broken: false,
            head_deadline: Deadline::new(),
            write_timeout: Duration::from_secs(5),
            interim_owed: &[],
        };
        let mut answered = 0;
        // One request after `idle`, answered: whether it was read whole, the room of its read,
        // and the write buffer's capacity when it had been read.
        let mut exchange = async |conn: &mut Conn<RoomSeen>, idle: Duration| {
            let client = async {
                tokio::time::sleep(idle).await;
                far.write_all(REQUEST).await.expect("send");
            };
            let mut reclaim = None;
            let (next, ()) = tokio::join!(read_head(conn, &settings, &mut drain, &mut reclaim, false), client);
            let head = matches!(next, Next::Head(_));
            let room = conn.io.rooms.pop().expect("a read brought the request");
            let out = conn.out.capacity();
            let response = http::Response::new(crate::body::full("{}"));
            assert!(write_response(conn, Reply::plain(response), Version::HTTP_11, false, true)
                .await
                .expect("answered"));
            let mut seen = vec![0u8; 4096];
            let n = far.read(&mut seen).await.expect("read");
            assert!(seen[..n].starts_with(b"HTTP/1.1 200 OK\r\n") && seen[..n].ends_with(b"\r\n\r\n{}"));
            answered += 1;
            (head, room, out)
        };
        // New: read through the stack, no buffer before.
        assert_eq!(exchange(&mut conn, Duration::from_millis(500)).await, (true, codec::FIRST_READ, 0));
        assert!(conn.buf.capacity() > 0 && conn.out.capacity() >= OUT_SIZE);
        // Kept alive, idle half a second: read into the buffers it holds.
        let (head, room, out) = exchange(&mut conn, IDLE_RELEASE / 2).await;
        assert!(head && room > codec::FIRST_READ && out >= OUT_SIZE, "room {room}, out {out}");
        // Idle past `IDLE_RELEASE`: both given back, the request read through the stack.
        let (head, room, out) = exchange(&mut conn, IDLE_RELEASE + Duration::from_millis(500)).await;
        assert_eq!((head, room, out), (true, codec::FIRST_READ, 0), "a buffer was kept");
        // And the one after is served as usual.
        let (head, room, out) = exchange(&mut conn, Duration::ZERO).await;
        assert!(head && room > codec::FIRST_READ && out >= OUT_SIZE, "room {room}, out {out}");
        assert_eq!(answered, 4);

        // Past the buffers' release, the header timeout still closes the connection, counted
        // from when it began to wait, and a head begun keeps its buffer until it times out.
        let mut reclaim = None;
        let started = Instant::now();
        let next = read_head(&mut conn, &settings, &mut drain, &mut reclaim, false).await;
        assert!(matches!(next, Next::Close) && started.elapsed() == settings.header_read_timeout);
        far.write_all(b"GET /v1/models HTTP/1.1\r\n").await.expect("send");
        let started = Instant::now();
        let next = read_head(&mut conn, &settings, &mut drain, &mut reclaim, false).await;
        assert!(matches!(next, Next::Refuse(_)) && started.elapsed() == settings.header_read_timeout);
        assert!(conn.buf.capacity() > 0);
    }

    #[tokio::test]
    async fn a_write_is_flushed_through_a_buffering_stream() {
        // Like a TLS session, a `BufWriter` holds what it accepted until it is flushed.
        let (near, mut far) = tokio::io::duplex(1024);
        let mut buffered = tokio::io::BufWriter::new(near);
        write_all_within(&mut buffered, b"HTTP/1.1 200 OK\r\n\r\n", Duration::from_secs(5)).await.expect("write");
        let mut seen = [0u8; 64];
        let n =
            tokio::time::timeout(Duration::from_secs(5), far.read(&mut seen)).await.expect("flushed").expect("read");
        assert_eq!(&seen[..n], b"HTTP/1.1 200 OK\r\n\r\n");
    }

    #[tokio::test]
    async fn a_client_that_accepts_nothing_times_the_write_out_and_a_slow_one_does_not() {
        let (mut near, far) = tokio::io::duplex(64);
        let started = Instant::now();
        let error = tokio::time::timeout(
            Duration::from_secs(10),
            write_all_within(&mut near, &[b'x'; 1024], Duration::from_millis(100)),
        )
        .await
        .expect("the stall is timed")
        .expect_err("stalled");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(100), "{:?}", started.elapsed());
        drop(far);

        // 64 bytes every 40 ms: 1 KiB takes ~640 ms, longer than the limit, but every stall is
        // shorter than it.
        let (mut near, mut far) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut total = 0;
            let mut chunk = [0u8; 64];
            loop {
                tokio::time::sleep(Duration::from_millis(40)).await;
                match far.read(&mut chunk).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        });
        let started = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(10),
            write_all_within(&mut near, &[b'x'; 1024], Duration::from_millis(200)),
        )
        .await
        .expect("the reader keeps up")
        .expect("slow but moving");
        assert!(started.elapsed() > Duration::from_millis(200), "{:?}", started.elapsed());
        drop(near);
        assert_eq!(reader.await.expect("reader"), 1024);
    }
}
