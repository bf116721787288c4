//! HTTP/1.1 pieces both directions share: body framing (Content-Length, chunked, read until
//! close), the decimal and length helpers, reading into a buffer's spare room, and the error
//! type. The server (`http1`) decodes request bodies with them, the upstream client
//! (`upstream::h1`) response bodies.
//!
//! Nothing here logs, and no error carries request or response content: only what went wrong
//! ("invalid chunk size", "response head too large").

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::SizeHint;
use tokio::io::AsyncRead;

/// Longest chunk-size line, extensions included.
const MAX_SIZE_LINE: usize = 4 * 1024;
/// Most chunk-extension bytes (with the whitespace after a size) in one body, as hyper bounds
/// them. Each line is bounded by `MAX_SIZE_LINE`, but without a total a body of one-byte chunks
/// each carrying 4 KiB of extensions would be read at about 4,000 bytes per byte it delivers.
const MAX_EXTENSIONS: usize = 16 * 1024;
/// Most trailer bytes read (and discarded) after the last chunk.
const MAX_TRAILERS: usize = 64 * 1024;
/// Reads go into at least this much free buffer space ...
const MIN_READ_SPACE: usize = 4 * 1024;
/// ... topped up by this much when less is left.
const READ_RESERVE: usize = 16 * 1024;
/// How much of a message that comes to a connection without a buffer is read through the stack.
pub(super) const FIRST_READ: usize = 4 * 1024;

/// What went wrong in an HTTP/1.1 exchange. Metadata only: never a byte of content.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    #[error("writing the request: {0}")]
    Write(io::Error),
    #[error("reading the response: {0}")]
    Read(io::Error),
    #[error("connection closed before the response head")]
    ClosedBeforeHead,
    #[error("connection closed before the response body ended")]
    IncompleteBody,
    #[error("response head too large")]
    HeadTooLarge,
    #[error("too many response headers")]
    TooManyHeaders,
    #[error("invalid response head: {0}")]
    InvalidHead(&'static str),
    #[error("too many interim responses")]
    TooManyInterim,
    #[error("unexpected 101 Switching Protocols")]
    SwitchingProtocols,
    #[error("invalid content-length")]
    InvalidContentLength,
    #[error("invalid chunk size")]
    InvalidChunkSize,
    #[error("chunk size line too long")]
    ChunkSizeLineTooLong,
    #[error("invalid chunk extension")]
    InvalidChunkExtension,
    #[error("chunk extensions too large")]
    ChunkExtensionsTooLarge,
    #[error("missing CRLF after chunk data")]
    MissingChunkCrlf,
    #[error("invalid trailer section")]
    InvalidTrailers,
    #[error("trailers too large")]
    TrailersTooLarge,
}

/// Appends the decimal form of `n`.
pub fn push_decimal(out: &mut Vec<u8>, n: u64) {
    // itoa: two digits per division (a lookup table), on the stack.
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// The comma-separated, whitespace-trimmed, non-empty elements of a list-valued header
/// (`Connection`, `Transfer-Encoding`).
pub fn list_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty())
}

/// A Content-Length value: 1*DIGIT (leading zeros allowed, as the grammar does), fitting in u64.
/// Its length is bounded by the head's.
pub fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Reads into the free space of `buf`, topping it up first when little is left.
///
/// An empty buffer whose earlier contents have all been released goes back to the start of its
/// allocation first (no copy, no allocation), so a keep-alive connection reads every request
/// into the same few cache lines instead of walking through the whole buffer.
pub fn poll_fill<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if buf.is_empty() && buf.capacity() < READ_RESERVE {
        // Only succeeds when no `Bytes` split from it is still alive; otherwise nothing happens.
        let _ = buf.try_reclaim(READ_RESERVE);
    }
    if buf.capacity() - buf.len() < MIN_READ_SPACE {
        buf.reserve(READ_RESERVE);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// [`poll_fill`] for a connection waiting for its next message, which may have given its buffer
/// back ([`BytesMut::new`], no room): that read goes through the stack, so a connection polled
/// while nothing comes holds no buffer, and takes one when the first bytes come (one copy of at
/// most `FIRST_READ` bytes). A buffer with room is read into as `poll_fill` does.
pub fn poll_fill_waiting<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if buf.capacity() != 0 {
        return poll_fill(io, cx, buf);
    }
    let mut stack = [0u8; FIRST_READ];
    let mut read = tokio::io::ReadBuf::new(&mut stack);
    std::task::ready!(Pin::new(io).poll_read(cx, &mut read))?;
    let bytes = read.filled();
    if !bytes.is_empty() {
        buf.reserve(READ_RESERVE);
        buf.extend_from_slice(bytes);
    }
    Poll::Ready(Ok(bytes.len()))
}

/// How much of the body is left, and how it is delimited.
#[derive(Debug)]
pub enum Decoder {
    /// Content-Length: this many bytes to go (never 0: an exhausted body is `Done`).
    Length(u64),
    Chunked(Chunked),
    /// Until the provider closes the connection.
    Eof,
    Done,
}

impl Decoder {
    /// The next piece of body data in `buf`, if any, consuming framing bytes on the way and
    /// after it: a body whose end is already buffered is `Done` as its last data is returned.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, H1Error> {
        match self {
            Decoder::Done => Ok(None),
            Decoder::Length(remaining) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = (*remaining).min(buf.len() as u64) as usize;
                *remaining -= n as u64;
                if *remaining == 0 {
                    *self = Decoder::Done;
                }
                Ok(Some(buf.split_to(n).freeze()))
            }
            Decoder::Eof => Ok((!buf.is_empty()).then(|| buf.split().freeze())),
            Decoder::Chunked(chunked) => {
                chunked.skip_framing(buf)?;
                let data = match chunked.state {
                    ChunkState::Data if !buf.is_empty() => {
                        let n = chunked.size.min(buf.len() as u64) as usize;
                        chunked.size -= n as u64;
                        if chunked.size == 0 {
                            chunked.state = ChunkState::DataCr;
                        }
                        let data = buf.split_to(n).freeze();
                        chunked.skip_framing(buf)?;
                        Some(data)
                    }
                    _ => None,
                };
                if chunked.state == ChunkState::End {
                    *self = Decoder::Done;
                }
                Ok(data)
            }
        }
    }

    /// The provider closed the connection: the end of a close-delimited body, else an error.
    pub fn eof(&mut self) -> Result<(), H1Error> {
        match self {
            Decoder::Eof | Decoder::Done => {
                *self = Decoder::Done;
                Ok(())
            }
            Decoder::Length(_) | Decoder::Chunked(_) => Err(H1Error::IncompleteBody),
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, Decoder::Done)
    }

    pub fn size_hint(&self) -> SizeHint {
        match self {
            Decoder::Length(remaining) => SizeHint::with_exact(*remaining),
            Decoder::Done => SizeHint::with_exact(0),
            Decoder::Chunked(_) | Decoder::Eof => SizeHint::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ChunkState {
    /// Hex digits of the chunk size.
    #[default]
    Size,
    /// Whitespace after the size.
    SizeWs,
    /// A chunk extension (ignored) up to the CR.
    Ext,
    /// The LF ending the size line.
    SizeLf,
    /// `size` bytes of chunk data.
    Data,
    DataCr,
    DataLf,
    /// The start of a trailer line, or of the empty line ending the body.
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    End,
}

/// Whether parsing a head in `buf` could tell more than the last parse did, which saw its first
/// `looked` bytes: only a new line end can complete a head or show a line to be malformed, and a
/// buffer at the size limit is refused by the parse. Parsing after every read instead would scan
/// the whole buffer again for each byte a slow peer sends: quadratic in the head's size.
pub fn worth_parsing(buf: &[u8], looked: usize, max_head: usize) -> bool {
    buf.len() >= max_head || memchr::memchr(b'\n', buf.get(looked..).unwrap_or(buf)).is_some()
}

/// The chunked transfer coding, decoded byte by byte across any split of its input.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    /// The size being parsed, then the data left in the chunk.
    size: u64,
    /// Whether the size line has had a digit yet (a size needs one; leading zeros are fine).
    has_digit: bool,
    line: usize,
    /// Extension bytes in the whole body so far (see `MAX_EXTENSIONS`); small, so the decoder
    /// stays as small as it was without it.
    extensions: u16,
    trailers: usize,
}

impl Chunked {
    /// Consumes framing bytes from the front of `buf` until chunk data, the end of the body,
    /// or the end of `buf`.
    fn skip_framing(&mut self, buf: &mut BytesMut) -> Result<(), H1Error> {
        let mut used = 0;
        let result = self.scan(buf, &mut used);
        buf.advance(used);
        result
    }

    fn scan(&mut self, bytes: &[u8], used: &mut usize) -> Result<(), H1Error> {
        for &b in bytes {
            match self.state {
                ChunkState::Data | ChunkState::End => return Ok(()),
                ChunkState::Size | ChunkState::SizeWs | ChunkState::Ext | ChunkState::SizeLf => {
                    self.line += 1;
                    if self.line > MAX_SIZE_LINE {
                        return Err(H1Error::ChunkSizeLineTooLong);
                    }
                    self.size_line(b)?;
                }
                ChunkState::DataCr if b == b'\r' => self.state = ChunkState::DataLf,
                ChunkState::DataLf if b == b'\n' => {
                    *self = Chunked { extensions: self.extensions, ..Chunked::default() };
                }
                ChunkState::DataCr | ChunkState::DataLf => return Err(H1Error::MissingChunkCrlf),
                ChunkState::TrailerStart | ChunkState::Trailer | ChunkState::TrailerLf | ChunkState::EndLf => {
                    self.trailers += 1;
                    if self.trailers > MAX_TRAILERS {
                        return Err(H1Error::TrailersTooLarge);
                    }
                    self.state = match (self.state, b) {
                        (ChunkState::TrailerStart, b'\r') => ChunkState::EndLf,
                        (ChunkState::EndLf, b'\n') => ChunkState::End,
                        (ChunkState::Trailer, b'\r') => ChunkState::TrailerLf,
                        (ChunkState::TrailerLf, b'\n') => ChunkState::TrailerStart,
                        (ChunkState::TrailerStart | ChunkState::Trailer, b) if b != b'\n' => ChunkState::Trailer,
                        _ => return Err(H1Error::InvalidTrailers),
                    };
                }
            }
            *used += 1;
        }
        Ok(())
    }

    /// Counts one byte of extension (or of whitespace after a size) against `MAX_EXTENSIONS`.
    fn extension_byte(&mut self, next: ChunkState) -> Result<ChunkState, H1Error> {
        self.extensions += 1;
        if usize::from(self.extensions) > MAX_EXTENSIONS {
            return Err(H1Error::ChunkExtensionsTooLarge);
        }
        Ok(next)
    }

    fn size_line(&mut self, b: u8) -> Result<(), H1Error> {
        self.state = match (self.state, b) {
            (ChunkState::Size, _) if b.is_ascii_hexdigit() => {
                // Leading zeros are allowed (1*HEXDIG); a size past u64 is not.
                if self.size > u64::MAX >> 4 {
                    return Err(H1Error::InvalidChunkSize);
                }
                self.has_digit = true;
                let digit = match b {
                    b'0'..=b'9' => b - b'0',
                    b'a'..=b'f' => b - b'a' + 10,
                    _ => b - b'A' + 10,
                };
                self.size = (self.size << 4) | u64::from(digit);
                ChunkState::Size
            }
            (ChunkState::Size, _) if !self.has_digit => return Err(H1Error::InvalidChunkSize),
            // Counted only here, off the path of a plain size line.
            (ChunkState::Size | ChunkState::SizeWs, b' ' | b'\t') => self.extension_byte(ChunkState::SizeWs)?,
            (ChunkState::Size | ChunkState::SizeWs, b';') => self.extension_byte(ChunkState::Ext)?,
            (ChunkState::Size | ChunkState::SizeWs | ChunkState::Ext, b'\r') => ChunkState::SizeLf,
            (ChunkState::Size | ChunkState::SizeWs, _) => return Err(H1Error::InvalidChunkSize),
            (ChunkState::Ext, b'\n') => return Err(H1Error::InvalidChunkExtension),
            (ChunkState::Ext, _) => self.extension_byte(ChunkState::Ext)?,
            (ChunkState::SizeLf, b'\n') if self.size == 0 => ChunkState::TrailerStart,
            (ChunkState::SizeLf, b'\n') => ChunkState::Data,
            _ => return Err(H1Error::InvalidChunkSize),
        };
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// A valid chunked body: extensions, a chunk split across reads, trailers, the last chunk.
    const CHUNKED: &[u8] = b"6;name=value\r\ndata: \r\n1A\r\n{\"a\":1}\n\nlonger piece.....\r\n0003 ; ext\r\n\n\n\n\r\n0;last\r\nx-trailer: 1\r\nx-other: two\r\n\r\n";
    const DECODED: &[u8] = b"data: {\"a\":1}\n\nlonger piece.....\n\n\n";

    /// Feeds `pieces` one after another, decoding all that each makes available.
    fn decode_pieces<'a>(
        decoder: &mut Decoder,
        pieces: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<u8>, H1Error> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in pieces.into_iter().filter(|piece| !piece.is_empty()) {
            assert!(!decoder.is_done(), "no input after the end");
            buf.extend_from_slice(piece);
            while let Some(data) = decoder.decode(&mut buf)? {
                assert!(!data.is_empty(), "no empty frames");
                out.extend_from_slice(&data);
            }
        }
        assert!(buf.is_empty(), "every byte consumed");
        Ok(out)
    }

    fn chunked() -> Decoder {
        Decoder::Chunked(Chunked::default())
    }

    #[test]
    fn a_head_is_parsed_again_only_when_a_line_end_arrives() {
        const MAX: usize = 64 * 1024;
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nX: aaaa";
        assert!(!worth_parsing(b"", 0, MAX));
        assert!(!worth_parsing(b"GET / HTTP/1.1\r", 0, MAX));
        assert!(worth_parsing(b"GET / HTTP/1.1\r\n", 15, MAX), "the line end just arrived");
        assert!(worth_parsing(&head[..], 0, MAX), "a buffer not looked at yet");
        // A slow client adds to a line byte by byte: nothing new to find until its line ends.
        assert!(!worth_parsing(&head[..], head.len() - 1, MAX));
        assert!(!worth_parsing(&head[..], head.len(), MAX));
        let mut ended = head.to_vec();
        ended.extend_from_slice(b"\r\n\r\n");
        assert!(worth_parsing(&ended, head.len(), MAX));
        // At the size limit the parse refuses it, line end or not.
        assert!(worth_parsing(&vec![b'a'; MAX], MAX - 1, MAX));
        assert!(!worth_parsing(&vec![b'a'; MAX - 1], MAX - 2, MAX));
        // A buffer that somehow shrank is looked at whole.
        assert!(worth_parsing(b"GET / HTTP/1.1\r\n", 100, MAX));
    }

    #[test]
    fn chunked_bodies_decode_split_at_every_byte() {
        let mut decoder = chunked();
        assert_eq!(decode_pieces(&mut decoder, CHUNKED.chunks(1)).expect("decodes"), DECODED);
        assert!(decoder.is_done());

        for split in 0..=CHUNKED.len() {
            let mut decoder = chunked();
            let (a, b) = CHUNKED.split_at(split);
            assert_eq!(decode_pieces(&mut decoder, [a, b]).expect("decodes"), DECODED, "split at {split}");
            assert!(decoder.is_done(), "split at {split}");
        }
    }

    #[test]
    fn chunked_bodies_decode_in_random_pieces() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..500 {
            let mut pieces = Vec::new();
            let mut rest = CHUNKED;
            while !rest.is_empty() {
                let (piece, tail) = rest.split_at(rng.usize(1..=rest.len().min(9)));
                pieces.push(piece);
                rest = tail;
            }
            let mut decoder = chunked();
            assert_eq!(decode_pieces(&mut decoder, pieces).expect("decodes"), DECODED);
            assert!(decoder.is_done());
        }
    }

    #[test]
    fn a_body_whose_end_is_buffered_is_done_with_its_last_data() {
        let mut decoder = chunked();
        let mut buf = BytesMut::from(&b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"[..]);
        assert_eq!(decoder.decode(&mut buf).expect("data").expect("some"), "ab");
        assert!(!decoder.is_done());
        assert_eq!(decoder.decode(&mut buf).expect("data").expect("some"), "c");
        assert!(decoder.is_done(), "the last chunk was consumed with the data before it");
        assert!(buf.is_empty());

        // Bytes beyond the body stay for the pool to see.
        let mut decoder = chunked();
        let mut buf = BytesMut::from(&b"1\r\nc\r\n0\r\n\r\nHTTP"[..]);
        assert_eq!(decoder.decode(&mut buf).expect("data").expect("some"), "c");
        assert!(decoder.is_done());
        assert_eq!(&buf[..], b"HTTP");
    }

    #[test]
    fn malformed_chunked_framing_is_rejected() {
        type Expected = fn(&H1Error) -> bool;
        let cases: &[(&[u8], Expected)] = &[
            (b"\r\nab\r\n", |e| matches!(e, H1Error::InvalidChunkSize)),
            (b";ext\r\n", |e| matches!(e, H1Error::InvalidChunkSize)),
            (b"x\r\n", |e| matches!(e, H1Error::InvalidChunkSize)),
            (b"1 2\r\n", |e| matches!(e, H1Error::InvalidChunkSize)),
            (b"-1\r\n", |e| matches!(e, H1Error::InvalidChunkSize)),
            (b"2\nab\r\n", |e| matches!(e, H1Error::InvalidChunkSize)),
            (b"2\r\rab", |e| matches!(e, H1Error::InvalidChunkSize)),
            (b"10000000000000000\r\n", |e| matches!(e, H1Error::InvalidChunkSize)),
            (b"2\r\nabc\r\n", |e| matches!(e, H1Error::MissingChunkCrlf)),
            (b"2\r\nab\n0\r\n\r\n", |e| matches!(e, H1Error::MissingChunkCrlf)),
            (b"2\r\nab\rx", |e| matches!(e, H1Error::MissingChunkCrlf)),
            (b"2;a\nb\r\n", |e| matches!(e, H1Error::InvalidChunkExtension)),
            (b"0\r\n\n", |e| matches!(e, H1Error::InvalidTrailers)),
            (b"0\r\nx: 1\n\r\n", |e| matches!(e, H1Error::InvalidTrailers)),
            (b"0\r\n\rx", |e| matches!(e, H1Error::InvalidTrailers)),
        ];
        for (input, expected) in cases {
            for pieces in [input.chunks(1).collect::<Vec<_>>(), vec![*input]] {
                let error = decode_pieces(&mut chunked(), pieces).expect_err("rejected");
                assert!(expected(&error), "{:?}: {error:?}", String::from_utf8_lossy(input));
            }
        }
        // Sixteen significant hex digits are the most a size may have; they must still fit.
        let mut decoder = chunked();
        decode_pieces(&mut decoder, [&b"ffffffffffffffff\r\nab"[..]]).expect("a huge chunk begins");
        // Leading zeros do not count (1*HEXDIG): a size of 1 in twenty digits is a size of 1.
        let zeros = b"00000000000000000001\r\na\r\n0000000000000000000000\r\n\r\n";
        assert_eq!(decode_pieces(&mut chunked(), zeros.chunks(1)).expect("decodes"), b"a");
        let mut decoder = chunked();
        decode_pieces(&mut decoder, [&b"0000ffffffffffffffff\r\nab"[..]]).expect("a huge chunk begins");
        let error = decode_pieces(&mut chunked(), [&b"0001ffffffffffffffff\r\n"[..]]).expect_err("past u64");
        assert!(matches!(error, H1Error::InvalidChunkSize), "{error:?}");
    }

    #[test]
    fn lengths_take_leading_zeros_and_refuse_what_does_not_fit() {
        assert_eq!(parse_length(b"000000000000000000005"), Some(5));
        assert_eq!(parse_length(b"018446744073709551615"), Some(u64::MAX));
        for bad in [&b"18446744073709551616"[..], b"", b"+5", b"5 ", b"0x5", b"\xd9\xa5"] {
            assert_eq!(parse_length(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_size_line_and_trailers_are_bounded() {
        let mut line = b"1;".to_vec();
        line.resize(MAX_SIZE_LINE, b'x');
        line.extend_from_slice(b"\r\n");
        let error = decode_pieces(&mut chunked(), [&line[..]]).expect_err("refused");
        assert!(matches!(error, H1Error::ChunkSizeLineTooLong), "{error:?}");
        // Just under the bound is fine.
        line.truncate(MAX_SIZE_LINE - 2);
        line.extend_from_slice(b"\r\na\r\n");
        assert_eq!(decode_pieces(&mut chunked(), [&line[..]]).expect("decodes"), b"a");

        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() < 3 + MAX_TRAILERS {
            trailers.extend_from_slice(b"x-filler: 0123456789abcdef\r\n");
        }
        let error = decode_pieces(&mut chunked(), trailers.chunks(1000)).expect_err("refused");
        assert!(matches!(error, H1Error::TrailersTooLarge), "{error:?}");

        // Extensions are bounded over the whole body too, not only per line: one-byte chunks
        // with 1 KiB of extension each are refused once the total passes 16 KiB.
        let mut chunk = b"1 ;".to_vec();
        chunk.resize(1024 + 1, b'x');
        chunk.extend_from_slice(b"\r\na\r\n");
        let many = chunk.repeat(MAX_EXTENSIONS / 1024);
        let within = [&many[..], b"0\r\n\r\n"].concat();
        let decoded = decode_pieces(&mut chunked(), within.chunks(777)).expect("16 KiB of extensions in all");
        assert_eq!(decoded.len(), MAX_EXTENSIONS / 1024);
        let past = [&many[..], &chunk[..]].concat();
        let error = decode_pieces(&mut chunked(), past.chunks(777)).expect_err("refused");
        assert!(matches!(error, H1Error::ChunkExtensionsTooLarge), "{error:?}");
    }

    #[test]
    fn length_delimited_bodies_end_exactly_and_early_eof_is_an_error() {
        let mut decoder = Decoder::Length(5);
        assert_eq!(decoder.size_hint().exact(), Some(5));
        let mut buf = BytesMut::from(&b"hel"[..]);
        assert_eq!(decoder.decode(&mut buf).expect("ok").expect("data"), "hel");
        assert_eq!(decoder.size_hint().exact(), Some(2));
        assert!(matches!(decoder.eof(), Err(H1Error::IncompleteBody)));

        let mut decoder = Decoder::Length(5);
        let mut buf = BytesMut::from(&b"helloHTTP/1.1"[..]);
        assert_eq!(decoder.decode(&mut buf).expect("ok").expect("data"), "hello");
        assert!(decoder.is_done());
        assert_eq!(decoder.size_hint().exact(), Some(0));
        assert_eq!(&buf[..], b"HTTP/1.1", "the rest is not body");

        let mut decoder = chunked();
        decode_pieces(&mut decoder, [&b"5\r\nhello\r\n"[..]]).expect("ok so far");
        assert!(matches!(decoder.eof(), Err(H1Error::IncompleteBody)));

        let mut decoder = Decoder::Eof;
        assert_eq!(decode_pieces(&mut decoder, [&b"until "[..], b"close"]).expect("ok"), b"until close");
        decoder.eof().expect("the end of a close-delimited body");
        assert!(decoder.is_done());
    }

    /// Random bytes in random splits: the chunked decoder returns data, waits, ends or refuses,
    /// and never panics or loops.
    #[test]
    fn arbitrary_chunked_input_never_panics() {
        let mut rng = fastrand::Rng::with_seed(0xc0de);
        let alphabet = b"0123456789abcdefABCDEF\r\n; \t=x";
        for _ in 0..20_000 {
            let input: Vec<u8> = (0..rng.usize(0..120)).map(|_| alphabet[rng.usize(..alphabet.len())]).collect();
            let mut decoder = chunked();
            let mut buf = BytesMut::new();
            'feed: for piece in input.chunks(rng.usize(1..=input.len().max(1))) {
                buf.extend_from_slice(piece);
                loop {
                    match decoder.decode(&mut buf) {
                        Ok(Some(data)) => assert!(!data.is_empty()),
                        Ok(None) if decoder.is_done() => break 'feed,
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
            }
        }
    }

    fn fill(reader: &mut &[u8], buf: &mut BytesMut) -> usize {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match poll_fill(reader, &mut cx, buf) {
            Poll::Ready(read) => read.expect("a slice reads"),
            Poll::Pending => panic!("a slice is always ready"),
        }
    }

    /// Keep-alive requests read into the start of the buffer once the previous one is released,
    /// and never over a request that is still held.
    #[test]
    fn an_emptied_buffer_reads_from_its_start_unless_a_piece_is_still_held() {
        let mut buf = BytesMut::new();
        let mut reader: &[u8] = b"first request";
        assert_eq!(fill(&mut reader, &mut buf), 13);
        let start = buf.as_ptr();
        drop(buf.split_to(13).freeze());
        let mut reader: &[u8] = b"second";
        assert_eq!(fill(&mut reader, &mut buf), 6);
        assert_eq!(buf.as_ptr(), start, "read into the start again");

        let held = buf.split_to(6).freeze();
        let mut reader: &[u8] = b"third!";
        assert_eq!(fill(&mut reader, &mut buf), 6);
        assert_ne!(buf.as_ptr(), start, "not over the held piece");
        assert_eq!(&held[..], b"second");
        assert_eq!(&buf[..], b"third!");

        // A buffer holding unread bytes keeps them where they are.
        drop(held);
        let mut reader: &[u8] = b" and more";
        let before = buf.as_ptr();
        fill(&mut reader, &mut buf);
        assert_eq!(buf.as_ptr(), before);
        assert_eq!(&buf[..], b"third! and more");
    }

    /// A connection waiting without a buffer takes none while nothing comes, one with the first
    /// bytes (all of them, even past the stack's share), and reads into a buffer with room as
    /// `poll_fill` does.
    #[tokio::test]
    async fn a_waiting_connection_takes_a_buffer_only_when_bytes_come() {
        let (mut near, mut far) = tokio::io::duplex(64 * 1024);
        let mut buf = BytesMut::new();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(poll_fill_waiting(&mut near, &mut cx, &mut buf).is_pending());
        assert_eq!(buf.capacity(), 0, "a buffer taken while nothing came");

        let message: Vec<u8> = (0..FIRST_READ + 100).map(|i| b'a' + (i % 26) as u8).collect();
        tokio::io::AsyncWriteExt::write_all(&mut far, &message).await.expect("write");
        let mut read = 0;
        while read < message.len() {
            match poll_fill_waiting(&mut near, &mut cx, &mut buf) {
                Poll::Ready(Ok(n)) if n > 0 => read += n,
                other => panic!("the message was not read whole: {other:?}"),
            }
            assert!(buf.capacity() >= READ_RESERVE, "capacity {}", buf.capacity());
        }
        assert_eq!(&buf[..], &message[..]);
        let first = buf.as_ptr();

        // Room again: read in place, after the bytes the buffer holds, and more at once than
        // the stack would take.
        let next = vec![b'n'; FIRST_READ + 1000];
        tokio::io::AsyncWriteExt::write_all(&mut far, &next).await.expect("write");
        let read = poll_fill_waiting(&mut near, &mut cx, &mut buf);
        assert!(matches!(read, Poll::Ready(Ok(n)) if n == next.len()), "{read:?}");
        assert_eq!(buf.as_ptr(), first);
        assert!(buf.ends_with(&next));

        // The end of the stream is an end, without a buffer as with one.
        drop(far);
        let mut buf = BytesMut::new();
        assert!(matches!(poll_fill_waiting(&mut near, &mut cx, &mut buf), Poll::Ready(Ok(0))));
        assert_eq!(buf.capacity(), 0);
    }
}
