//! A lean HTTP/1.1 client codec: request heads written in one `writev` with the body,
//! response heads parsed with `httparse`, bodies framed per RFC 9112 §6.3.
//!
//! Nothing here logs, and no error carries request or response content: only what went wrong
//! ("invalid chunk size", "response head too large").

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use http::{Method, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::fields::{HeaderFields, Lines, RawFields};
pub use crate::http1::codec::H1Error;
use crate::http1::codec::{parse_length, push_decimal, worth_parsing};
pub(super) use crate::http1::codec::{poll_fill, Chunked, Decoder};

/// Most header fields accepted in a response head.
pub(super) const MAX_HEADERS: usize = 100;
/// Largest response head accepted (status line, fields and the empty line).
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// Most interim (1xx) responses skipped before the final one.
const MAX_INTERIM: usize = 16;

/// A connection to a provider: plain TCP or TLS over TCP.
#[derive(Debug)]
pub(super) enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Io::Tls(io) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Io::Tls(io) => Pin::new(&mut **io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Io::Tls(io) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_flush(cx),
            Io::Tls(io) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Io::Tls(io) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request
// ---------------------------------------------------------------------------------------------

/// Methods whose requests carry no `Content-Length: 0` when their body is empty.
fn bodiless_method(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::CONNECT | Method::TRACE)
}

/// The request head: `METHOD target HTTP/1.1`, every header of `headers` but the framing ones,
/// and `Content-Length` from the body actually sent (the request is always length-delimited).
///
/// The head holds the provider's credential: its buffer is allocated once, never reallocates
/// (leaving no stray copy behind), and is zeroized when dropped.
///
/// Tests build requests as `http::Request`s; the gateway encodes its fields directly
/// ([`encode_fields`], from `forward::build`).
#[cfg(test)]
pub(super) fn encode_head(
    method: &Method,
    target: &str,
    headers: &http::HeaderMap,
    body_len: usize,
) -> Result<zeroize::Zeroizing<Vec<u8>>, H1Error> {
    use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
    let fields = headers
        .iter()
        .filter(|(name, _)| **name != CONTENT_LENGTH && **name != TRANSFER_ENCODING)
        .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()));
    let bound = headers.iter().map(|(name, value)| field_len(name.as_str().as_bytes(), value.as_bytes())).sum();
    encode_fields(method, target, fields, bound, body_len)
}

/// Bytes a field takes in a head: name, `: `, value, CRLF.
pub fn field_len(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + 4
}

/// A request head (request line, fields, `Content-Length`) from name and value bytes, in one
/// pass. `fields_bound` is at least the sum of [`field_len`] over `fields` (the buffer is sized
/// from it; a head that would outgrow it is refused rather than reallocated). The caller leaves
/// out `Content-Length` and `Transfer-Encoding`.
pub fn encode_fields<'a>(
    method: &Method,
    target: &str,
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    fields_bound: usize,
    body_len: usize,
) -> Result<zeroize::Zeroizing<Vec<u8>>, H1Error> {
    // Origin-form only: a path, never a space, control character or DEL.
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(H1Error::InvalidRequest("invalid request target"));
    }
    const CONTENT_LENGTH_LINE: usize = "content-length: ".len() + 20 + 2;
    let request_line = method.as_str().len() + 1 + target.len() + " HTTP/1.1\r\n".len();
    let mut head = zeroize::Zeroizing::new(Vec::with_capacity(request_line + fields_bound + CONTENT_LENGTH_LINE + 2));
    head.extend_from_slice(method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in fields {
        // Names are tokens and values never break a line, whatever built them.
        if name.is_empty() || name.iter().any(|&b| b <= b' ' || b == b':' || b == 0x7f) {
            return Err(H1Error::InvalidRequest("invalid header name"));
        }
        if memchr::memchr3(b'\r', b'\n', 0, value).is_some() {
            return Err(H1Error::InvalidRequest("invalid header value"));
        }
        if head.len() + field_len(name, value) + CONTENT_LENGTH_LINE + 2 > head.capacity() {
            return Err(H1Error::InvalidRequest("request head larger than its bound"));
        }
        head.extend_from_slice(name);
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    if body_len > 0 || !bodiless_method(method) {
        head.extend_from_slice(b"content-length: ");
        push_decimal(&mut head, body_len as u64);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    debug_assert!(head.len() <= head.capacity(), "the head never outgrows its reservation");
    Ok(head)
}

/// A failed write, and whether none of the request went out (so it may be sent elsewhere).
pub(super) struct WriteFailure {
    pub error: H1Error,
    pub unsent: bool,
}

/// How a request write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wrote {
    /// All of it went out.
    All,
    /// The provider answered before taking all of it (an early 401 or 413 from a front end that
    /// does not read the body): its answer is in the read buffer and is read next; the
    /// connection carries nothing after it.
    Interrupted,
}

/// Writes head and body with as few calls as the stream allows (one `writev` when it takes
/// everything), then flushes. While the provider takes no more, what it sends is read into
/// `read_buf`: a provider answering before it has read the whole body gets its answer through
/// instead of a failed write (nginx reads while it writes too). A fast write never reads.
pub(super) async fn write_request<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    read_buf: &mut BytesMut,
    head: &[u8],
    body: &[u8],
) -> Result<Wrote, WriteFailure> {
    let total = head.len() + body.len();
    let mut written = 0;
    std::future::poll_fn(|cx| {
        while written < total {
            let slices = if written < head.len() {
                [IoSlice::new(&head[written..]), IoSlice::new(body)]
            } else {
                [IoSlice::new(&body[written - head.len()..]), IoSlice::new(&[])]
            };
            let failed = match Pin::new(&mut *io).poll_write_vectored(cx, &slices) {
                Poll::Ready(Ok(0)) => H1Error::Write(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    written += n;
                    continue;
                }
                Poll::Ready(Err(e)) => {
                    // A provider that answered and then closed (the write meets its reset) may
                    // have left its answer in the socket: that is what the client gets.
                    let answered = matches!(poll_fill(io, cx, read_buf), Poll::Ready(Ok(n)) if n > 0);
                    if written > 0 && (answered || !read_buf.is_empty()) {
                        return Poll::Ready(Ok(Wrote::Interrupted));
                    }
                    H1Error::Write(e)
                }
                // Waiting for room, or for the provider's answer, whichever comes first.
                Poll::Pending => match poll_fill(io, cx, read_buf) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => H1Error::ClosedBeforeHead,
                    Poll::Ready(Ok(_)) if answering(read_buf) => return Poll::Ready(Ok(Wrote::Interrupted)),
                    // An interim response (or too little to tell): the provider wants the rest.
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Ready(Err(e)) => H1Error::Read(e),
                },
            };
            return Poll::Ready(Err(WriteFailure { error: failed, unsent: written == 0 }));
        }
        Pin::new(&mut *io)
            .poll_flush(cx)
            .map_ok(|()| Wrote::All)
            .map_err(|e| WriteFailure { error: H1Error::Write(e), unsent: false })
    })
    .await
}

/// Whether what a provider sent while its request was still being written is its answer.
/// Complete interim (1xx) heads are dropped on the way: a server may send `100 Continue` unasked,
/// and then wants the rest of the body. A final status, or anything that is not a response head,
/// is the answer, left in `buf` whole for the reader (which says which).
fn answering(buf: &mut BytesMut) -> bool {
    const STATUS_DIGIT: usize = b"HTTP/1.1 ".len();
    loop {
        // Empty lines before a head are dropped, as the head's parser skips them; the status
        // digit is then where a head that is interim has it.
        let blank = empty_lines(buf);
        buf.advance(blank);
        if buf.len() <= STATUS_DIGIT {
            return false;
        }
        // Only a head with a 1xx status is parsed here (parsing a final one would take it out
        // of `buf`); this is its exact shape (one space after the version, as the parser wants).
        if !(buf.starts_with(b"HTTP/1.") && buf[STATUS_DIGIT - 1] == b' ' && buf[STATUS_DIGIT] == b'1') {
            return true;
        }
        match parse_head(buf, false) {
            Ok(Parsed::Interim) => {}
            Ok(Parsed::Partial) => return false,
            // A 101, or a malformed head: reading the response says so. (A status starting
            // with 1 is never final.)
            Ok(Parsed::Final(_)) | Err(_) => return true,
        }
    }
}

/// The length of the empty lines (CRLF or LF) at the front of `buf`.
fn empty_lines(buf: &[u8]) -> usize {
    let mut at = 0;
    loop {
        match buf[at..] {
            [b'\r', b'\n', ..] => at += 2,
            [b'\n', ..] => at += 1,
            _ => return at,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Response head
// ---------------------------------------------------------------------------------------------

/// A final response head and how its body is framed.
#[derive(Debug)]
pub(super) struct ResponseHead {
    pub status: StatusCode,
    /// Names lowercase; the framing fields are still among them (see [`framing`]).
    pub fields: RawFields,
    pub decoder: Decoder,
    /// Whether the connection may carry another request once this body was read to the end.
    pub reusable: bool,
}

/// What the front of the read buffer holds.
#[derive(Debug)]
pub(super) enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// An interim (1xx) response, consumed.
    Interim,
    Final(ResponseHead),
}

fn httparse_error(error: httparse::Error) -> H1Error {
    match error {
        httparse::Error::TooManyHeaders => H1Error::TooManyHeaders,
        httparse::Error::HeaderName => H1Error::InvalidHead("invalid header name"),
        httparse::Error::HeaderValue => H1Error::InvalidHead("invalid header value"),
        httparse::Error::NewLine => H1Error::InvalidHead("invalid line ending"),
        httparse::Error::Status => H1Error::InvalidHead("invalid status"),
        httparse::Error::Token => H1Error::InvalidHead("invalid token"),
        httparse::Error::Version => H1Error::InvalidHead("invalid version"),
    }
}

/// Parses the response head at the front of `buf`, consuming it when complete. The fields stay
/// in one frozen copy of the head, indexed (one allocation for the index, none per field).
pub(super) fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Parsed, H1Error> {
    let window_len = buf.len().min(MAX_HEAD);
    let (len, code, version, lines) = {
        // Uninitialised: httparse writes only the fields it finds; zeroing the table per
        // response cost as much as parsing a typical head.
        let mut storage = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let window = &buf[..window_len];
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut response, window, &mut storage)
            .map_err(httparse_error)?
        {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial if buf.len() >= MAX_HEAD => return Err(H1Error::HeadTooLarge),
            httparse::Status::Partial => return Ok(Parsed::Partial),
        };
        let code = response.code.ok_or(H1Error::InvalidHead("invalid status"))?;
        let version = if response.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
        // An interim response's fields are skipped with it, not indexed.
        let lines = if (100..200).contains(&code) {
            None
        } else {
            Some(Lines::index(&window[..len], response.headers).ok_or(H1Error::InvalidHead("invalid header"))?)
        };
        (len, code, version, lines)
    };
    let Some(lines) = lines else {
        if code == 101 {
            return Err(H1Error::SwitchingProtocols);
        }
        buf.advance(len);
        return Ok(Parsed::Interim);
    };
    let status = StatusCode::from_u16(code).map_err(|_| H1Error::InvalidHead("invalid status"))?;
    let fields = RawFields::split_from(buf, len, lines);
    let (decoder, reusable) = framing(status, version, &fields, head_request)?;
    Ok(Parsed::Final(ResponseHead { status, fields, decoder, reusable }))
}

/// How the body is delimited (RFC 9112 §6.3), and whether the connection can be reused after it.
/// The framing fields themselves are never passed on (`forward::stripped_response_field`).
fn framing(
    status: StatusCode,
    version: Version,
    fields: &RawFields,
    head_request: bool,
) -> Result<(Decoder, bool), H1Error> {
    let mut close = false;
    let mut keep_alive = false;
    for token in fields.tokens("connection") {
        close |= token.eq_ignore_ascii_case(b"close");
        keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
    }
    let mut reusable = !close && (version != Version::HTTP_10 || keep_alive);

    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Decoder::Done, reusable));
    }
    if fields.has("transfer-encoding") {
        let chunked = fields.tokens("transfer-encoding").last().is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
        // Both framings at once, or Transfer-Encoding in HTTP/1.0: faulty framing, use the
        // connection for nothing else (RFC 9112 §6.1, §6.3). The length means nothing here.
        if fields.has("content-length") || version == Version::HTTP_10 {
            reusable = false;
        }
        return Ok(if chunked { (Decoder::Chunked(Chunked::default()), reusable) } else { (Decoder::Eof, false) });
    }
    let mut length = None;
    for value in fields.all("content-length") {
        for element in value.split(|&b| b == b',') {
            let n = parse_length(element.trim_ascii()).ok_or(H1Error::InvalidContentLength)?;
            if length.is_some_and(|seen| seen != n) {
                return Err(H1Error::InvalidContentLength);
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => (Decoder::Done, reusable),
        Some(n) => (Decoder::Length(n), reusable),
        None => (Decoder::Eof, false),
    })
}

/// Reads until a final response head is at the front of `buf`, skipping interim responses.
pub(super) async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<ResponseHead, H1Error> {
    let mut interim = 0;
    // How much of `buf` the last parse saw (see `worth_parsing`).
    let mut looked = 0;
    std::future::poll_fn(|cx| loop {
        if worth_parsing(buf, looked, MAX_HEAD) {
            match parse_head(buf, head_request)? {
                Parsed::Final(head) => return Poll::Ready(Ok(head)),
                Parsed::Interim => {
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return Poll::Ready(Err(H1Error::TooManyInterim));
                    }
                    looked = 0;
                    continue;
                }
                Parsed::Partial => {}
            }
        }
        looked = buf.len();
        match ready!(poll_fill(io, cx, buf)) {
            Ok(0) => return Poll::Ready(Err(H1Error::ClosedBeforeHead)),
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(H1Error::Read(e))),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
    use http::{HeaderMap, HeaderValue};

    fn parse(head: &str) -> Result<Parsed, H1Error> {
        parse_head(&mut BytesMut::from(head.as_bytes()), false)
    }

    fn parse_final(head: &str) -> ResponseHead {
        match parse(head) {
            Ok(Parsed::Final(head)) => head,
            other => panic!("not a final head: {other:?}"),
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let head = parse_final("HTTP/1.1 200 OK\r\ncontent-length: 12\r\nx-a: b\r\n\r\n");
        assert!(matches!(head.decoder, Decoder::Length(12)));
        assert!(head.reusable);
        assert_eq!(head.fields.first("x-a"), Some(&b"b"[..]));

        let head = parse_final("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
        assert!(matches!(head.decoder, Decoder::Chunked(_)));
        assert!(head.reusable);

        // Both: Transfer-Encoding wins, the length means nothing (no framing field is passed on),
        // and the connection is not reused.
        let head = parse_final("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n");
        assert!(matches!(head.decoder, Decoder::Chunked(_)));
        assert!(!head.reusable);

        // Chunked not last: read until close.
        let head = parse_final("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n");
        assert!(matches!(head.decoder, Decoder::Eof));
        assert!(!head.reusable);
        let head = parse_final("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: CHUNKED\r\n\r\n");
        assert!(matches!(head.decoder, Decoder::Chunked(_)));

        // Neither: until close.
        let head = parse_final("HTTP/1.1 200 OK\r\n\r\n");
        assert!(matches!(head.decoder, Decoder::Eof));
        assert!(!head.reusable);

        // No body, whatever the fields say.
        for status in [204, 304] {
            let head = parse_final(&format!("HTTP/1.1 {status} X\r\ncontent-length: 5\r\n\r\n"));
            assert!(head.decoder.is_done(), "{status}");
            assert!(head.reusable, "{status}");
        }
        let head = parse_head(&mut BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"[..]), true);
        assert!(matches!(head, Ok(Parsed::Final(ResponseHead { decoder: Decoder::Done, .. }))));
        let head = parse_final("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert!(head.decoder.is_done());
        assert!(head.reusable);
    }

    #[test]
    fn content_length_must_be_one_valid_number() {
        let head = parse_final("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n");
        assert!(matches!(head.decoder, Decoder::Length(5)));
        for bad in ["5, 6", "5\r\ncontent-length: 6", "-5", "+5", "0x5", "", "5a", "99999999999999999999", ","] {
            let error = parse(&format!("HTTP/1.1 200 OK\r\ncontent-length: {bad}\r\n\r\n")).expect_err(bad);
            assert!(matches!(error, H1Error::InvalidContentLength), "{bad}: {error:?}");
        }
    }

    #[test]
    fn connection_close_and_http_1_0_prevent_reuse() {
        let cases = [
            ("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n", false),
            ("HTTP/1.1 200 OK\r\nConnection: Upgrade, Close\r\ncontent-length: 0\r\n\r\n", false),
            ("HTTP/1.1 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n", true),
            ("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false),
            ("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n", true),
            ("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n", false),
        ];
        for (head, reusable) in cases {
            assert_eq!(parse_final(head).reusable, reusable, "{head:?}");
        }
    }

    #[test]
    fn interim_responses_are_consumed_and_101_is_refused() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..]);
        assert!(matches!(parse_head(&mut buf, false), Ok(Parsed::Interim)));
        assert!(matches!(parse_head(&mut buf, false), Ok(Parsed::Interim)));
        match parse_head(&mut buf, false) {
            Ok(Parsed::Final(head)) => assert_eq!(head.status, 200),
            other => panic!("{other:?}"),
        }
        assert!(buf.is_empty());
        assert!(matches!(parse("HTTP/1.1 101 Switching Protocols\r\n\r\n"), Err(H1Error::SwitchingProtocols)));
    }

    /// An answer that comes while the request is still being written is left whole for the
    /// reader, empty lines before it or not; interim heads before it are dropped, and too little
    /// to tell waits for more.
    #[test]
    fn an_answer_during_the_write_is_left_whole_after_empty_lines_and_interim_heads() {
        let final_head = "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n";
        for before in
            ["", "\r\n", "\n", "\r\n\r\n", "HTTP/1.1 100 Continue\r\n\r\n\r\n", "\r\nHTTP/1.1 100 Continue\r\n\r\n"]
        {
            let mut buf = BytesMut::from(format!("{before}{final_head}").as_bytes());
            assert!(answering(&mut buf), "{before:?}");
            match parse_head(&mut buf, false) {
                Ok(Parsed::Final(head)) => assert_eq!(head.status, 413, "{before:?}"),
                other => panic!("{before:?}: {other:?}"),
            }
        }
        for waiting in ["\r\n", "\r\nHTTP/1.1", "HTTP/1.1 100 Continue\r\n", "\nHTTP/1.1 100 Continue\r\n\r\n"] {
            let mut buf = BytesMut::from(waiting.as_bytes());
            assert!(!answering(&mut buf), "{waiting:?}");
        }
        let mut buf = BytesMut::from(&b"\r\nHTTP/1.1 100 Continue\r\n\r\n"[..]);
        assert!(!answering(&mut buf));
        assert!(buf.is_empty(), "the interim head and the empty line before it are dropped");
        for other in ["garbage that is no head", "HTTP/1.1 101 Switching Protocols\r\n\r\n", "HTTP/1.1  100 X\r\n\r\n"]
        {
            let mut buf = BytesMut::from(other.as_bytes());
            assert!(answering(&mut buf), "{other:?}");
            assert_eq!(&buf[..], other.as_bytes(), "left for the reader: {other:?}");
        }
    }

    #[test]
    fn response_heads_are_bounded() {
        assert!(matches!(parse("HTTP/1.1 200 OK\r\ncontent-le"), Ok(Parsed::Partial)));
        let mut head = "HTTP/1.1 200 OK\r\nx-big: ".to_owned();
        head.extend(std::iter::repeat_n('a', MAX_HEAD - 1 - head.len()));
        assert!(matches!(parse(&head), Ok(Parsed::Partial)), "under the bound, still waiting");
        head.push('a');
        assert!(matches!(parse(&head), Err(H1Error::HeadTooLarge)));
        // A complete head over the bound is refused too, even if it arrived in one read.
        head.push_str("\r\n\r\n");
        assert!(matches!(parse(&head), Err(H1Error::HeadTooLarge)));
        // One just within it is accepted.
        head.truncate(MAX_HEAD - 4);
        head.push_str("\r\n\r\n");
        assert!(matches!(parse(&head), Ok(Parsed::Final(_))));

        let mut head = "HTTP/1.1 200 OK\r\n".to_owned();
        for i in 0..MAX_HEADERS {
            head.push_str(&format!("x-{i}: 1\r\n"));
        }
        assert!(matches!(parse(&format!("{head}\r\n")), Ok(Parsed::Final(_))));
        assert!(matches!(parse(&format!("{head}x-last: 1\r\n\r\n")), Err(H1Error::TooManyHeaders)));
        assert!(matches!(parse("HTTP/1.1 200 OK\r\nbad header: 1\r\n\r\n"), Err(H1Error::InvalidHead(_))));
    }

    #[test]
    fn request_heads_are_length_delimited_and_clean() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, HeaderValue::from_static("api.example.com"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        let mut key = HeaderValue::from_static("Bearer sk-test");
        key.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, key);
        let head = encode_head(&Method::POST, "/v1/chat/completions?a=1", &headers, 2).expect("head");
        assert_eq!(
            std::str::from_utf8(&head).expect("ascii"),
            "POST /v1/chat/completions?a=1 HTTP/1.1\r\nhost: api.example.com\r\nauthorization: Bearer sk-test\r\ncontent-length: 2\r\n\r\n"
        );
        let head = encode_head(&Method::GET, "/", &HeaderMap::new(), 0).expect("head");
        assert_eq!(&head[..], b"GET / HTTP/1.1\r\n\r\n");
        let head = encode_head(&Method::POST, "/", &HeaderMap::new(), 0).expect("head");
        assert_eq!(&head[..], b"POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        for target in ["", "/a b", "/a\r\nx: y", "http://x/", "/\x7f"] {
            assert!(
                matches!(encode_head(&Method::GET, target, &HeaderMap::new(), 0), Err(H1Error::InvalidRequest(_))),
                "{target:?}"
            );
        }
    }

    #[test]
    fn encoded_fields_stay_within_their_bound_and_never_break_a_line() {
        let fields = [(&b"x-a"[..], &b"1"[..]), (&b"x-b"[..], &b"22"[..])];
        let exact: usize = fields.iter().map(|(n, v)| field_len(n, v)).sum();
        let head = encode_fields(&Method::POST, "/", fields.iter().copied(), exact, 0).expect("head");
        assert_eq!(&head[..], b"POST / HTTP/1.1\r\nx-a: 1\r\nx-b: 22\r\ncontent-length: 0\r\n\r\n");
        let capacity = head.capacity();
        assert!(head.len() <= capacity);
        // A bound that is too small is refused, not grown past (a reallocation would leave a
        // copy of the credential in freed memory).
        assert!(matches!(
            encode_fields(&Method::POST, "/", fields.iter().copied(), exact - 1, 0),
            Err(H1Error::InvalidRequest(_))
        ));
        for bad in [(&b"x-a"[..], &b"1\r\nx-injected: 1"[..]), (&b"x a"[..], &b"1"[..]), (&b""[..], &b"1"[..])] {
            assert!(matches!(
                encode_fields(&Method::POST, "/", [bad].into_iter(), 256, 0),
                Err(H1Error::InvalidRequest(_))
            ));
        }
    }

    /// A writer that takes `accept` bytes per call, then fails with `fail` once they are used up.
    struct Scripted {
        accept: Vec<usize>,
        written: Vec<u8>,
        calls: usize,
    }

    /// Nothing to read: the provider said nothing and closed.
    impl AsyncRead for Scripted {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Scripted {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.calls += 1;
            if this.accept.is_empty() {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            let n = this.accept.remove(0).min(buf.len());
            this.written.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            // Takes from both slices in one call, like writev.
            let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.poll_write(cx, &joined)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn head_and_body_go_out_together_and_a_request_is_unsent_only_if_no_byte_left() {
        let mut io = Scripted { accept: vec![usize::MAX], written: Vec::new(), calls: 0 };
        write_request(&mut io, &mut BytesMut::new(), b"HEAD", b"body").await.map_err(|f| f.error).expect("written");
        assert_eq!((io.written.as_slice(), io.calls), (&b"HEADbody"[..], 1), "one call for head and body");

        let mut io = Scripted { accept: vec![3, 2, 1, usize::MAX], written: Vec::new(), calls: 0 };
        write_request(&mut io, &mut BytesMut::new(), b"HEAD", b"body").await.map_err(|f| f.error).expect("written");
        assert_eq!(io.written, b"HEADbody", "partial writes resume where they stopped");

        let mut io = Scripted { accept: vec![], written: Vec::new(), calls: 0 };
        let failure = write_request(&mut io, &mut BytesMut::new(), b"HEAD", b"body").await.expect_err("fails");
        assert!(failure.unsent, "nothing went out: another connection may take it");
        assert!(matches!(failure.error, H1Error::Write(_)));

        let mut io = Scripted { accept: vec![1], written: Vec::new(), calls: 0 };
        let failure = write_request(&mut io, &mut BytesMut::new(), b"HEAD", b"body").await.expect_err("fails");
        assert!(!failure.unsent, "one byte went out: never sent again");

        let mut io = Scripted { accept: vec![0], written: Vec::new(), calls: 0 };
        let failure = write_request(&mut io, &mut BytesMut::new(), b"HEAD", b"body").await.expect_err("fails");
        assert!(failure.unsent);
    }
}
