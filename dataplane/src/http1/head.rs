//! Request heads: parsed with `httparse`, framed strictly (RFC 9112 §6), built without copying.
//!
//! Anything a front-end and a back-end could read two ways is refused instead of guessed at:
//! `Transfer-Encoding` with `Content-Length`, a coding other than a single `chunked`,
//! disagreeing or malformed lengths, chunked HTTP/1.0, a missing or repeated `Host`, obsolete
//! line folding (httparse refuses it), control characters in values, a line ending in a bare LF.

use bytes::{Buf, BytesMut};
use http::{Method, Uri, Version};

use super::codec::{list_tokens, parse_length};
use crate::api::{ApiFlavor, ApiRoute};
use crate::fields::{self, HeaderFields, Lines, RawFields};

/// Most header lines accepted in one request head.
pub const MAX_HEADERS: usize = 100;

/// Why a request head cannot be served. Carries no request content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http1Error {
    /// Unreadable or ambiguous: 400.
    Malformed(&'static str),
    /// Head larger than allowed, or too many header lines: 431.
    HeadTooLarge,
    /// Not HTTP/1.0 or HTTP/1.1: 505.
    UnsupportedVersion,
    /// A transfer coding other than `chunked`: 501.
    UnsupportedTransferEncoding,
    /// An `Expect` other than `100-continue`: 417.
    ExpectationFailed,
    /// The head did not arrive within the header read timeout: 408.
    HeadTimeout,
}

/// A refused head: why, and how the answer should go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub error: Http1Error,
    pub flavor: ApiFlavor,
    /// The request line is a `HEAD`: the answer has no body.
    pub head_only: bool,
}

impl Refused {
    /// The answer to a head refused for `error`, from what of it has arrived (`raw`).
    pub fn of(error: Http1Error, raw: &[u8]) -> Self {
        Refused { error, flavor: sniff_flavor(raw), head_only: raw.starts_with(b"HEAD ") }
    }
}

/// The API format of a request, from its request line alone (the head may be unparsable or
/// incomplete).
fn sniff_flavor(raw: &[u8]) -> ApiFlavor {
    let line = &raw[..memchr::memchr(b'\n', raw).unwrap_or(raw.len())];
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else { return ApiFlavor::OpenAi };
    // The route is the path: `/v1/messages?beta=true` is the Messages API.
    let path = &target[..memchr::memchr(b'?', target).unwrap_or(target.len())];
    let (Ok(method), Ok(path)) = (Method::from_bytes(method), std::str::from_utf8(path)) else {
        return ApiFlavor::OpenAi;
    };
    match ApiRoute::classify(&method, path) {
        Ok(route) => route.flavor(),
        Err((flavor, _)) => flavor,
    }
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
}

/// A request head, ready for the pipeline.
#[derive(Debug)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: RawFields,
    pub framing: Framing,
    /// The client allows another request on this connection after this one.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before sending its body.
    pub expect_continue: bool,
}

/// Parses the head at the front of `buf`. `Ok(None)`: not complete yet. On success the head's
/// bytes are split off `buf` (which keeps whatever follows: the body, or a pipelined request).
pub fn parse(buf: &mut BytesMut, max_head: usize) -> Result<Option<Head>, Refused> {
    skip_empty_lines(buf);
    let (len, request_line, lines) = match scan(buf, max_head) {
        Ok(Some(scanned)) => scanned,
        Ok(None) => return Ok(None),
        Err(error) => return Err(Refused::of(error, &buf[..])),
    };
    let headers = RawFields::split_from(buf, len, lines);
    // Refusals from here on read the request line from the head split off.
    match finish(&headers, &request_line) {
        Ok((uri, framing, keep_alive, expect_continue)) => {
            let RequestLine { method, version, .. } = request_line;
            Ok(Some(Head { method, uri, version, headers, framing, keep_alive, expect_continue }))
        }
        Err(error) => Err(Refused::of(error, headers.head())),
    }
}

/// Drops the empty lines a client may send before a request line (RFC 9112 §2.2 asks a server
/// to ignore at least one). Dropped rather than left for httparse, which skips them on every
/// parse: a client sending one line end at a time would have the buffer scanned again for each,
/// quadratic in the 64 KiB a head may take. A lone CR stays until its LF comes (or is refused
/// as the start of the request line).
fn skip_empty_lines(buf: &mut BytesMut) {
    let mut at = 0;
    loop {
        match buf.get(at..at + 2) {
            Some(b"\r\n") => at += 2,
            _ if buf.get(at) == Some(&b'\n') => at += 1,
            _ => break,
        }
    }
    if at > 0 {
        buf.advance(at);
    }
}

/// What the request line says; the target as a range of the head.
struct RequestLine {
    method: Method,
    version: Version,
    target: (u32, u32),
}

/// The head's length, its request line and its field lines, once the head is complete.
fn scan(buf: &BytesMut, max_head: usize) -> Result<Option<(usize, RequestLine, Lines)>, Http1Error> {
    // Left uninitialised: httparse writes only the lines it finds (zeroing the whole table
    // cost as much as parsing a typical head).
    let mut storage = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(buf, &mut storage) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_head => return Err(Http1Error::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Http1Error::HeadTooLarge),
        Err(httparse::Error::Version) => return Err(Http1Error::UnsupportedVersion),
        Err(_) => return Err(Http1Error::Malformed("The request head is not valid HTTP/1.1.")),
    };
    if len > max_head {
        return Err(Http1Error::HeadTooLarge);
    }
    if bare_line_feed(&buf[..len]) {
        return Err(Http1Error::Malformed("A line of the request head ends in a bare LF instead of CRLF."));
    }
    let version = match request.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(Http1Error::UnsupportedVersion),
    };
    let method = Method::from_bytes(request.method.unwrap_or_default().as_bytes())
        .map_err(|_| Http1Error::Malformed("The request method is not valid."))?;
    let malformed = || Http1Error::Malformed("The request head is not valid HTTP/1.1.");
    let target = fields::range_in(&buf[..len], request.path.unwrap_or_default().as_bytes()).ok_or_else(malformed)?;
    let lines = Lines::index(&buf[..len], request.headers).ok_or_else(malformed)?;
    Ok(Some((len, RequestLine { method, version, target }, lines)))
}

/// Whether a line of `head` ends in a lone LF. httparse takes one as a line end (RFC 9112 §2.2
/// lets a recipient), but a front end that does not would read the next line as part of this
/// one, and a framing header hidden there as nothing: one head read two ways, so it is refused.
/// (Empty lines before the request line are dropped before this, lone LFs included.)
fn bare_line_feed(head: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', head).any(|at| at.checked_sub(1).and_then(|before| head.get(before)) != Some(&b'\r'))
}

/// The target as a URI, and the body's framing, from a head split off the buffer.
fn finish(headers: &RawFields, line: &RequestLine) -> Result<(Uri, Framing, bool, bool), Http1Error> {
    // httparse has checked that names are tokens and that values hold only visible characters,
    // spaces, tabs and obs-text (no other control character, no DEL: the rule `HeaderValue`
    // applies; `control_characters_and_bad_targets_are_refused` holds it to that).
    let mut framing = Framer::default();
    for (name, value) in headers.each() {
        framing.observe(name, value)?;
    }
    let (framing, keep_alive, expect_continue) = framing.finish(line.version)?;
    let malformed = || Http1Error::Malformed("The request head is not valid HTTP/1.1.");
    let target = headers.head().get(line.target.0 as usize..line.target.1 as usize).ok_or_else(malformed)?;
    let uri = Uri::from_maybe_shared(headers.head().slice_ref(target))
        .map_err(|_| Http1Error::Malformed("The request target is not a valid URI."))?;
    Ok((uri, framing, keep_alive, expect_continue))
}

/// What the framing headers say, gathered one line at a time.
#[derive(Default)]
struct Framer {
    content_length: Option<u64>,
    chunked: bool,
    transfer_encoding: bool,
    hosts: usize,
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
}

impl Framer {
    fn observe(&mut self, name: &[u8], value: &[u8]) -> Result<(), Http1Error> {
        match name {
            b"content-length" => {
                let length = parse_length(value.trim_ascii())
                    .ok_or(Http1Error::Malformed("The Content-Length header is not a valid length."))?;
                if self.content_length.is_some_and(|seen| seen != length) {
                    return Err(Http1Error::Malformed("The request has conflicting Content-Length headers."));
                }
                self.content_length = Some(length);
            }
            b"transfer-encoding" => {
                self.transfer_encoding = true;
                for coding in list_tokens(value) {
                    // `chunked` must be the only coding, and applied once.
                    if !coding.eq_ignore_ascii_case(b"chunked") {
                        return Err(Http1Error::UnsupportedTransferEncoding);
                    }
                    if self.chunked {
                        return Err(Http1Error::Malformed("The request is chunked more than once."));
                    }
                    self.chunked = true;
                }
            }
            b"host" => self.hosts += 1,
            b"connection" => {
                for token in list_tokens(value) {
                    self.close |= token.eq_ignore_ascii_case(b"close");
                    self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            b"expect" => {
                if !value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                    return Err(Http1Error::ExpectationFailed);
                }
                self.expect_continue = true;
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(self, version: Version) -> Result<(Framing, bool, bool), Http1Error> {
        if self.transfer_encoding && self.content_length.is_some() {
            return Err(Http1Error::Malformed("The request has both Transfer-Encoding and Content-Length."));
        }
        if self.transfer_encoding && !self.chunked {
            return Err(Http1Error::Malformed("The Transfer-Encoding header is empty."));
        }
        if self.chunked && version == Version::HTTP_10 {
            return Err(Http1Error::Malformed("HTTP/1.0 requests cannot be chunked."));
        }
        if self.hosts > 1 || (self.hosts == 0 && version == Version::HTTP_11) {
            return Err(Http1Error::Malformed("An HTTP/1.1 request needs exactly one Host header."));
        }
        let framing = if self.chunked { Framing::Chunked } else { Framing::Length(self.content_length.unwrap_or(0)) };
        let keep_alive = !self.close && (version == Version::HTTP_11 || self.keep_alive);
        // RFC 9110 §10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored (its
        // client would take a 100 for the final response).
        Ok((framing, keep_alive, self.expect_continue && version == Version::HTTP_11))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Option<Head>, Http1Error> {
        parse(&mut BytesMut::from(raw), 64 * 1024).map_err(|refused| refused.error)
    }

    fn ok(raw: &str) -> Head {
        head(raw).expect("valid").expect("complete")
    }

    #[test]
    fn a_plain_request_is_parsed_and_what_follows_stays_in_the_buffer() {
        let mut buf = BytesMut::from(
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nX-Api-Key: k\r\n\r\n{}GET",
        );
        let head = parse(&mut buf, 1024).expect("valid").expect("complete");
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.uri.path(), "/v1/chat/completions");
        assert_eq!(head.uri.query(), Some("x=1"));
        assert_eq!(head.headers.first("x-api-key"), Some(&b"k"[..]));
        assert_eq!(head.framing, Framing::Length(2));
        assert!(head.keep_alive && !head.expect_continue);
        assert_eq!(&buf[..], b"{}GET");
    }

    #[test]
    fn header_fields_stay_in_the_head_lowercased_in_order_and_shared() {
        let mut buf = BytesMut::from(
            "POST /v1/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer CANARY-9f2c\r\nX-Forwarded-For: 10.0.0.1\r\n\
             x-forwarded-for: 10.0.0.2\r\nX-Request-Id: Req-7\r\nContent-Length: 0\r\n\r\n",
        );
        let head = parse(&mut buf, 1024).expect("valid").expect("complete");
        let fields = &head.headers;
        assert_eq!(fields.each().count(), 6);
        assert_eq!(fields.first("authorization"), Some(&b"Bearer CANARY-9f2c"[..]));
        assert_eq!(fields.all("x-forwarded-for").collect::<Vec<_>>(), [&b"10.0.0.1"[..], b"10.0.0.2"]);
        let names: Vec<&[u8]> = fields.each().map(|(name, _)| name).collect();
        assert_eq!(
            names,
            [
                &b"host"[..],
                b"authorization",
                b"x-forwarded-for",
                b"x-forwarded-for",
                b"x-request-id",
                b"content-length"
            ]
        );
        // Values keep their case, and an echoed one points into the head instead of a copy.
        let shared = fields.shared("x-request-id").expect("present");
        assert_eq!(shared, "Req-7");
        let value = fields.first("x-request-id").expect("present");
        assert_eq!(shared.as_bytes().as_ptr(), value.as_ptr());
        assert!(fields.has("host") && !fields.has("cookie") && fields.shared("cookie").is_none());
        // Debug names the fields and never shows a value (they can be credentials).
        let debug = format!("{head:?}");
        assert!(debug.contains("authorization") && !debug.contains("CANARY-9f2c"), "{debug}");
    }

    #[test]
    fn a_hundred_header_lines_are_indexed() {
        let many: String = (0..MAX_HEADERS - 1).map(|i| format!("X-F{i}: v{i}\r\n")).collect();
        let head = ok(&format!("GET / HTTP/1.1\r\nHost: gw\r\n{many}\r\n"));
        assert_eq!(head.headers.each().count(), MAX_HEADERS);
        assert_eq!(head.headers.first("x-f98"), Some(&b"v98"[..]));
    }

    #[test]
    fn a_partial_head_waits_and_an_oversized_one_is_refused() {
        assert!(head("POST / HTTP/1.1\r\nHost: gw\r\n").expect("valid").is_none());
        let long = format!("GET / HTTP/1.1\r\nHost: gw\r\nX-Pad: {}\r\n", "a".repeat(2000));
        assert_eq!(parse(&mut BytesMut::from(&long[..]), 1024).err().map(|r| r.error), Some(Http1Error::HeadTooLarge));
        let complete = format!("{long}\r\n");
        assert_eq!(
            parse(&mut BytesMut::from(&complete[..]), 1024).err().map(|r| r.error),
            Some(Http1Error::HeadTooLarge)
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(head(&format!("GET / HTTP/1.1\r\nHost: gw\r\n{many}\r\n")).err(), Some(Http1Error::HeadTooLarge));
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let both = "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(head(both), Err(Http1Error::Malformed(_))));
        let conflicting = "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert!(matches!(head(conflicting), Err(Http1Error::Malformed(_))));
        assert_eq!(
            ok("POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n").framing,
            Framing::Length(3)
        );
        for bad in ["-1", "+3", "3 4", "0x10", "", "99999999999999999999"] {
            let raw = format!("POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: {bad}\r\n\r\n");
            assert!(matches!(head(&raw), Err(Http1Error::Malformed(_))), "{bad}");
        }
        let gzip = "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(head(gzip).err(), Some(Http1Error::UnsupportedTransferEncoding));
        let twice = "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(head(twice), Err(Http1Error::Malformed(_))));
        let old = "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(head(old), Err(Http1Error::Malformed(_))));
        assert_eq!(ok("POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: Chunked\r\n\r\n").framing, Framing::Chunked);
        let folded = "POST / HTTP/1.1\r\nHost: gw\r\nX-A: one\r\n two\r\n\r\n";
        assert!(matches!(head(folded), Err(Http1Error::Malformed(_))));
        let space_before_colon = "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length : 3\r\n\r\n";
        assert!(matches!(head(space_before_colon), Err(Http1Error::Malformed(_))));
    }

    /// A lone LF ends a line for httparse but not for a front end that wants CRLF, which would
    /// see one header where the gateway sees two: a framing header could hide in the second.
    #[test]
    fn a_line_ending_in_a_bare_lf_is_refused() {
        for raw in [
            "POST / HTTP/1.1\r\nHost: gw\r\nX: a\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: gw\r\nX: a\nContent-Length: 5\r\n\r\nhello",
            "GET / HTTP/1.1\nHost: gw\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: gw\n\n",
            "GET / HTTP/1.1\r\nHost: gw\r\n\n",
        ] {
            assert!(matches!(head(raw), Err(Http1Error::Malformed(_))), "{raw:?}");
        }
        // CRLF throughout, and lone LFs before the request line (dropped): served.
        assert_eq!(ok("POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello").framing, Framing::Length(5));
        assert_eq!(ok("\n\r\nGET / HTTP/1.1\r\nHost: gw\r\n\r\n").uri.path(), "/");
    }

    #[test]
    fn host_version_expect_and_connection_rules() {
        assert!(matches!(head("GET / HTTP/1.1\r\n\r\n"), Err(Http1Error::Malformed(_))));
        assert!(matches!(head("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), Err(Http1Error::Malformed(_))));
        assert_eq!(head("GET / HTTP/2.0\r\nHost: a\r\n\r\n").err(), Some(Http1Error::UnsupportedVersion));
        assert_eq!(
            head("GET / HTTP/1.1\r\nHost: a\r\nExpect: gold\r\n\r\n").err(),
            Some(Http1Error::ExpectationFailed)
        );
        assert!(ok("POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n").expect_continue);
        assert!(!ok("POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n").expect_continue);

        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!ok("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(ok("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        let http10 = ok("GET / HTTP/1.0\r\n\r\n");
        assert_eq!(http10.version, Version::HTTP_10);
        assert_eq!(http10.framing, Framing::Length(0));
    }

    #[test]
    fn refusals_carry_the_format_of_the_route() {
        let refused = |raw: &str| parse(&mut BytesMut::from(raw), 1024).expect_err("refused");
        let late = refused("POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n");
        assert_eq!(late.flavor, ApiFlavor::Anthropic);
        let early = refused("POST /v1/messages HTTP/1.1\r\nHo st: a\r\n\r\n");
        assert_eq!(early.flavor, ApiFlavor::Anthropic);
        assert_eq!(
            refused("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n").flavor,
            ApiFlavor::OpenAi
        );
        assert_eq!(refused("\x01\r\n\r\n").flavor, ApiFlavor::OpenAi);
        // The route is the target's path: the Anthropic SDK's beta calls add a query.
        let beta = refused("POST /v1/messages?beta=true HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n");
        assert_eq!(beta.flavor, ApiFlavor::Anthropic);
        assert_eq!(refused("\r\nPOST /v1/messages HTTP/1.1\r\nHo st: a\r\n\r\n").flavor, ApiFlavor::Anthropic);
        // A refused HEAD is answered without a body.
        assert!(refused("HEAD /v1/models HTTP/1.1\r\nHost: a\r\nExpect: x\r\n\r\n").head_only);
        assert!(!beta.head_only);
    }

    #[test]
    fn empty_lines_before_a_request_line_are_dropped_as_they_come() {
        // One line end at a time: each is dropped, so the buffer never grows and no parse scans
        // what an earlier one already did (httparse alone would skip them all again each time).
        let mut buf = BytesMut::new();
        for i in 0..10_000 {
            buf.extend_from_slice(if i % 2 == 0 { b"\r\n" } else { b"\n" });
            assert!(parse(&mut buf, 1024).expect("waits").is_none());
            assert!(buf.is_empty(), "{} bytes kept after {i} empty lines", buf.len());
        }
        // A CR waits for its LF; then the request that follows is served.
        buf.extend_from_slice(b"\r");
        assert!(parse(&mut buf, 1024).expect("waits").is_none());
        assert_eq!(&buf[..], b"\r");
        buf.extend_from_slice(b"\nGET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n");
        let served = parse(&mut buf, 1024).expect("valid").expect("complete");
        assert_eq!(served.uri.path(), "/v1/models");
        assert!(buf.is_empty());
        // A CR that is not a line end is the start of a malformed request line.
        assert!(matches!(head("\rGET / HTTP/1.1\r\nHost: a\r\n\r\n"), Err(Http1Error::Malformed(_))));
    }

    /// Random bytes, and random mutations of a valid head, fed in random splits: every outcome
    /// is a head, a wait or a refusal, never a panic.
    #[test]
    fn arbitrary_input_never_panics() {
        let valid = b"POST /v1/chat/completions?a=1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n{}";
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        for round in 0..20_000 {
            let input: Vec<u8> = if round % 2 == 0 {
                (0..rng.usize(0..200)).map(|_| rng.u8(..)).collect()
            } else {
                let mut mutated = valid.to_vec();
                for _ in 0..rng.usize(1..6) {
                    let at = rng.usize(..mutated.len());
                    match rng.u8(0..3) {
                        0 => mutated[at] = rng.u8(..),
                        1 => mutated.insert(at, *b"\r\n :;,\t\0".get(rng.usize(..9)).unwrap_or(&b'x')),
                        _ => {
                            mutated.remove(at);
                        }
                    }
                }
                mutated
            };
            let mut buf = BytesMut::new();
            for piece in input.chunks(rng.usize(1..=input.len().max(1))) {
                buf.extend_from_slice(piece);
                match parse(&mut buf, 1024) {
                    Ok(None) => continue,
                    Ok(Some(_)) | Err(_) => break,
                }
            }
        }
    }

    #[test]
    fn control_characters_and_bad_targets_are_refused() {
        assert!(matches!(head("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x01b\r\n\r\n"), Err(Http1Error::Malformed(_))));
        assert!(matches!(head("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x7fb\r\n\r\n"), Err(Http1Error::Malformed(_))));
        assert!(ok("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\tb é\r\n\r\n").headers.has("x-a"));
        assert!(head("GET /a b HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        assert!(matches!(head("G\x01T / HTTP/1.1\r\nHost: a\r\n\r\n"), Err(Http1Error::Malformed(_))));
    }
}
