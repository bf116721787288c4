//! Incremental `Transfer-Encoding: chunked` decoding (RFC 9112 §7.1): fed whatever has arrived,
//! in any split, it hands out data without copying and never buffers more than one bounded line.

use bytes::{Buf, Bytes, BytesMut};

/// Longest chunk-size line, extensions included.
const MAX_SIZE_LINE: usize = 4 * 1024;
/// Most trailer bytes read (and thrown away) after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk size line")]
    SizeLine,
    #[error("chunk size line too long")]
    SizeLineTooLong,
    #[error("chunk data not followed by CRLF")]
    MissingCrlf,
    #[error("trailers too large or malformed")]
    Trailers,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// Nothing more can be decoded from what has arrived.
    NeedMore,
    /// The last chunk and the trailers have been read.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
    Done,
}

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self { state: State::Size }
    }
}

/// The line at the front of `buf` without its CRLF, if a whole one has arrived.
fn line(buf: &BytesMut, limit: usize, too_long: ChunkError) -> Result<Option<usize>, ChunkError> {
    match memchr::memchr(b'\n', buf) {
        None if buf.len() > limit => Err(too_long),
        None => Ok(None),
        Some(at) if at > limit => Err(too_long),
        Some(at) if at == 0 || buf[at - 1] != b'\r' => Err(ChunkError::MissingCrlf),
        Some(at) => Ok(Some(at)),
    }
}

/// `1*16HEXDIG`, then nothing or extensions (`;…`) after optional whitespace.
fn parse_size(line: &[u8]) -> Result<u64, ChunkError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(ChunkError::SizeLine);
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(ChunkError::SizeLine);
    }
    let mut size = 0u64;
    for &b in &line[..digits] {
        let digit = (b as char).to_digit(16).ok_or(ChunkError::SizeLine)?;
        size = (size << 4) | u64::from(digit);
    }
    Ok(size)
}

impl ChunkedDecoder {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from the front of `buf`, consuming what it uses.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkError> {
        loop {
            match self.state {
                State::Size => {
                    let Some(at) = line(buf, MAX_SIZE_LINE, ChunkError::SizeLineTooLong)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = parse_size(&buf[..at - 1])?;
                    buf.advance(at + 1);
                    self.state = if size == 0 { State::Trailers(0) } else { State::Data(size) };
                }
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = if left == 0 { State::DataEnd } else { State::Data(left) };
                    return Ok(Decoded::Data(data));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ChunkError::MissingCrlf);
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers(seen) => {
                    let room = MAX_TRAILERS.saturating_sub(seen);
                    let Some(at) = line(buf, room, ChunkError::Trailers)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    buf.advance(at + 1);
                    self.state = if at == 1 { State::Done } else { State::Trailers(seen + at + 1) };
                }
                State::Done => return Ok(Decoded::End),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` in pieces of `step` bytes; returns the body and whether it ended.
    fn feed(wire: &[u8], step: usize) -> Result<(Vec<u8>, bool), ChunkError> {
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match decoder.decode(&mut buf)? {
                    Decoded::Data(data) => body.extend_from_slice(&data),
                    Decoded::NeedMore => break,
                    Decoded::End => return Ok((body, true)),
                }
            }
        }
        Ok((body, false))
    }

    const WIRE: &[u8] = b"5\r\nhello\r\n1;ext=\"v\"\r\n \r\n10 ; x\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\n";

    #[test]
    fn decodes_any_split_with_extensions_and_trailers() {
        for step in 1..=WIRE.len() {
            let (body, ended) = feed(WIRE, step).expect("valid");
            assert_eq!(body, b"hello 0123456789abcdef", "step {step}");
            assert!(ended, "step {step}");
        }
    }

    #[test]
    fn stops_at_the_end_and_leaves_what_follows() {
        let mut buf = BytesMut::from(&b"2\r\nhi\r\n0\r\n\r\nPOST /next"[..]);
        let mut decoder = ChunkedDecoder::default();
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::Data(Bytes::from_static(b"hi"))));
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::End));
        assert!(decoder.is_done());
        assert_eq!(&buf[..], b"POST /next");
    }

    #[test]
    fn refuses_bad_sizes_missing_crlf_and_endless_lines() {
        for bad in [&b"x\r\n"[..], b"\r\n", b"-1\r\n", b"12345678901234567\r\nx", b"5 x\r\n", b"5\n"] {
            assert!(feed(bad, bad.len()).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(feed(b"2\r\nhiXX0\r\n\r\n", 64), Err(ChunkError::MissingCrlf));
        let endless = vec![b'1'; MAX_SIZE_LINE + 2];
        assert_eq!(feed(&endless, 100), Err(ChunkError::SizeLineTooLong));
        let endless_ext = [&b"1;"[..], &vec![b'a'; MAX_SIZE_LINE + 2]].concat();
        assert_eq!(feed(&endless_ext, 100), Err(ChunkError::SizeLineTooLong));
        let big_trailers = [&b"0\r\n"[..], &b"X: y\r\n".repeat(MAX_TRAILERS / 6 + 1)].concat();
        assert_eq!(feed(&big_trailers, 64), Err(ChunkError::Trailers));
        assert_eq!(feed(b"ffffffffffffffff\r\nab", 64).map(|(b, e)| (b.len(), e)), Ok((2, false)));
    }
}
