//! Finding token usage in responses without keeping them.
//!
//! JSON responses put `usage` at the end, so only a bounded tail is kept. SSE responses are cut
//! into events as they pass; only an event that mentions `"usage"` is parsed, and the rest are
//! forwarded untouched (the original buffer, when a chunk holds whole events and none is dropped).

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use serde::Deserialize;
use smallvec::SmallVec;

use crate::json_scan::{plain_name, Scanner};

/// Bytes of a JSON body kept to find its `usage`.
const JSON_TAIL_BYTES: usize = 32 * 1024;
/// Largest partial SSE event held while waiting for its end; a longer one is passed through as
/// it comes rather than buffered without bound, and metered on its start and last bytes
/// ([`Oversized`]).
const MAX_PENDING_EVENT: usize = 1024 * 1024;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub input: Option<u64>,
    pub output: Option<u64>,
}

impl Usage {
    /// Streams report usage more than once (Anthropic's counts are cumulative): keep the largest.
    fn merge(&mut self, other: Usage) {
        self.input = self.input.max(other.input);
        self.output = self.output.max(other.output);
    }
}

#[derive(Debug, Default, PartialEq, Deserialize)]
struct UsageFields {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    /// Anthropic counts prompt-cache reads and writes apart from `input_tokens` (OpenAI's
    /// `prompt_tokens` and `input_tokens` include cached tokens).
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl UsageFields {
    /// The usage object at the start of `json` read without serde_json's visitors; `None` leaves
    /// it to serde_json (see [`crate::json_scan`]). What follows the object is not read.
    fn scan(json: &[u8]) -> Option<Self> {
        let mut fields = UsageFields::default();
        let mut seen = 0u8;
        Scanner::new(json).object(0, |scanner, key, plain| {
            let (bit, slot) = match plain_name(key, plain)? {
                b"prompt_tokens" => (1, &mut fields.prompt_tokens),
                b"completion_tokens" => (2, &mut fields.completion_tokens),
                b"input_tokens" => (4, &mut fields.input_tokens),
                b"output_tokens" => (8, &mut fields.output_tokens),
                b"cache_creation_input_tokens" => (16, &mut fields.cache_creation_input_tokens),
                b"cache_read_input_tokens" => (32, &mut fields.cache_read_input_tokens),
                _ => return scanner.skip_value(1),
            };
            // serde's derive refuses a repeated field.
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            *slot = scanner.optional_u64()?;
            Some(())
        })?;
        Some(fields)
    }
}

impl From<UsageFields> for Usage {
    fn from(f: UsageFields) -> Self {
        // A provider's numbers are untrusted too: capped like a client's.
        let capped = |n: Option<u64>| n.map(|n| n.min(crate::limits::MAX_TOKEN_COUNT));
        // Cached prompt tokens are tokens the request used: a limit counts them. A fold, not
        // `flatten().reduce()`: with that, `find_usage` (which inlines this) cost 2,700 more
        // instructions per request under callgrind (bench/PROFILE.md, stop of 2026-11-25 late).
        let cached = [f.cache_creation_input_tokens, f.cache_read_input_tokens];
        let input = cached.into_iter().flatten().fold(capped(f.prompt_tokens.or(f.input_tokens)), |sum, n| {
            Some(sum.unwrap_or(0).saturating_add(n.min(crate::limits::MAX_TOKEN_COUNT)))
        });
        Usage { input, output: capped(f.completion_tokens.or(f.output_tokens)) }
    }
}

const USAGE_KEY: &[u8] = b"\"usage\"";

/// Finds `"usage"`, built once: constructing a searcher costs more than most searches.
fn usage_key() -> &'static memmem::Finder<'static> {
    static FINDER: std::sync::LazyLock<memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memmem::Finder::new(USAGE_KEY));
    &FINDER
}

/// The same, searching from the end.
fn usage_key_rev() -> &'static memmem::FinderRev<'static> {
    static FINDER: std::sync::LazyLock<memmem::FinderRev<'static>> =
        std::sync::LazyLock::new(|| memmem::FinderRev::new(USAGE_KEY));
    &FINDER
}

/// The object after a `"usage"` key at `pos`, if the value is an object (not `null`).
fn usage_object_at(json: &[u8], pos: usize) -> Option<&[u8]> {
    let rest = json[pos + USAGE_KEY.len()..].trim_ascii_start().strip_prefix(b":")?.trim_ascii_start();
    rest.starts_with(b"{").then_some(rest)
}

/// True when `event` reports a usage object somewhere (most stream chunks say `"usage":null`).
fn mentions_usage_object(event: &[u8]) -> bool {
    usage_key().find_iter(event).any(|pos| usage_object_at(event, pos).is_some())
}

/// Bytes at the end of a body searched forward first (a vectorised search; the backward one is
/// bytewise): a response's `usage` is near its end.
const USAGE_WINDOW: usize = 2048;

/// `"usage"` keys holding an object that [`find_usage`] reads, last first, before it gives up.
/// A response has one (two in an event that nests the response); a provider sending thousands,
/// each over an object it never closes, would otherwise have each read to the end of the event:
/// quadratic in the event's size.
const USAGE_CANDIDATES: usize = 8;
/// Bytes of a usage object read at most (OpenAI's, with its token details, is about 400). A
/// longer one is not read.
const MAX_USAGE_OBJECT: usize = 4096;

/// The usage object following the last `"usage":` key in `json` that holds an object.
pub fn find_usage(json: &[u8]) -> Option<Usage> {
    let split = json.len().saturating_sub(USAGE_WINDOW);
    // Every start, overlapping ones included, as the backward search would see them.
    let mut in_window: SmallVec<[usize; 4]> = SmallVec::new();
    let mut from = split;
    while let Some(pos) = usage_key().find(&json[from..]) {
        in_window.push(from + pos);
        from += pos + 1;
    }
    // Keys that start before the window (one may end inside it), last first.
    let mut end = (split + USAGE_KEY.len() - 1).min(json.len());
    let before = std::iter::from_fn(move || {
        end = usage_key_rev().rfind(&json[..end])?;
        Some(end)
    });
    in_window
        .iter()
        .rev()
        .copied()
        .chain(before)
        .filter_map(|pos| usage_object_at(json, pos))
        .take(USAGE_CANDIDATES)
        .find_map(usage_in)
}

/// The usage in the object at the start of `object` (what follows it is not read), if it is
/// one and no longer than [`MAX_USAGE_OBJECT`].
fn usage_in(object: &[u8]) -> Option<Usage> {
    let rest = &object[..object.len().min(MAX_USAGE_OBJECT)];
    if let Some(fields) = UsageFields::scan(rest) {
        return Some(fields.into());
    }
    let mut stream = serde_json::Deserializer::from_slice(rest).into_iter::<UsageFields>();
    match stream.next() {
        Some(Ok(fields)) => Some(fields.into()),
        _ => None,
    }
}

/// Keeps the last bytes of a JSON body. The newest chunk is held by reference and copied only
/// when another follows it, so a body that arrives in one chunk is never copied.
#[derive(Default)]
pub struct JsonTail {
    tail: Vec<u8>,
    last: Option<Bytes>,
    /// The usage, read when a body's only chunk arrived (it is then not kept).
    read: Option<Option<Usage>>,
}

/// Sizes only: the bytes are a provider's response.
impl std::fmt::Debug for JsonTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonTail")
            .field("tail_len", &self.tail.len())
            .field("last_len", &self.last.as_ref().map(Bytes::len))
            .field("read", &self.read)
            .finish()
    }
}

impl JsonTail {
    pub fn push(&mut self, chunk: Bytes) {
        if let Some(previous) = self.last.replace(chunk) {
            self.append(&previous);
        }
    }

    /// The body's last chunk: when it is also the first (a small response), its usage is read
    /// now and the chunk is not held.
    pub fn push_last(&mut self, chunk: &Bytes) {
        if self.last.is_none() && self.tail.is_empty() {
            self.read = Some(find_usage(chunk));
        } else {
            self.push(chunk.clone());
        }
    }

    /// Keeps the last [`JSON_TAIL_BYTES`] of the body, and up to as many more before them: the
    /// older bytes are dropped (the rest moved down) only once twice that has built up, so each
    /// byte is moved at most once however small a provider cuts its chunks. (Dropping them with
    /// every chunk moved the whole tail per chunk: 32 KiB for a 1-byte chunk of 6 wire bytes.)
    fn append(&mut self, chunk: &[u8]) {
        append_to_tail(&mut self.tail, chunk);
    }

    /// The last [`JSON_TAIL_BYTES`] kept, whatever more is kept before them: what is read does
    /// not depend on how the body was cut.
    fn kept(&self) -> &[u8] {
        kept_tail(&self.tail)
    }

    pub fn usage(&self) -> Option<Usage> {
        if let Some(read) = self.read {
            return read;
        }
        let kept = self.kept();
        match &self.last {
            None => find_usage(kept),
            Some(last) if kept.is_empty() || last.len() >= JSON_TAIL_BYTES => find_usage(last),
            Some(last) => {
                let mut joined = Vec::with_capacity(kept.len() + last.len());
                joined.extend_from_slice(kept);
                joined.extend_from_slice(last);
                find_usage(&joined)
            }
        }
    }
}

/// Appends `chunk` to a tail that keeps the last [`JSON_TAIL_BYTES`] and up to as many more
/// before them (see [`JsonTail::append`]).
fn append_to_tail(tail: &mut Vec<u8>, chunk: &[u8]) {
    if chunk.len() >= JSON_TAIL_BYTES {
        tail.clear();
        tail.extend_from_slice(&chunk[chunk.len() - JSON_TAIL_BYTES..]);
        return;
    }
    if tail.len() + chunk.len() > 2 * JSON_TAIL_BYTES {
        // Less than the tail: the chunk is shorter than JSON_TAIL_BYTES.
        let dropped = tail.len() + chunk.len() - JSON_TAIL_BYTES;
        tail.drain(..dropped);
    }
    tail.extend_from_slice(chunk);
}

/// The last [`JSON_TAIL_BYTES`] of a tail [`append_to_tail`] keeps.
fn kept_tail(tail: &[u8]) -> &[u8] {
    &tail[tail.len().saturating_sub(JSON_TAIL_BYTES)..]
}

/// An event longer than [`MAX_PENDING_EVENT`], forwarded as it comes: whether it ends the
/// stream (read from its start) and its last bytes (its `usage`, which providers put at the end:
/// the Responses API's `response.completed` repeats the request's instructions and tools and the
/// whole output before it) are kept until its end, where it is metered like any other event.
/// Passed through unread, a client could have its usage go uncounted by sending over a megabyte
/// of instructions.
struct Oversized {
    ends_stream: bool,
    tail: Vec<u8>,
}

/// Splits an SSE stream into events, meters usage, and optionally drops OpenAI's usage-only chunk
/// (the one the gateway asked for on the client's behalf).
#[derive(Default)]
pub struct SseScanner {
    pending: BytesMut,
    /// The event being passed through because it outgrew [`MAX_PENDING_EVENT`].
    oversized: Option<Oversized>,
    strip_usage_only_chunk: bool,
    /// Whether the stream ends its lines in a lone CR, once its first line end is seen.
    lone_cr: Option<bool>,
    pub usage: Usage,
    pub events: u64,
    /// Whether the last event seen is one a provider ends a finished stream with
    /// ([`ends_stream`]): a stream that stops after anything else (an error event, or a
    /// provider gone quiet) was cut, and its reported usage may be its start's.
    pub finished: bool,
}

/// Sizes and counts only: the pending bytes are a provider's response.
impl std::fmt::Debug for SseScanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseScanner")
            .field("pending_len", &self.pending.len())
            .field("passing_oversized_event", &self.oversized.is_some())
            .field("strip_usage_only_chunk", &self.strip_usage_only_chunk)
            .field("usage", &self.usage)
            .field("events", &self.events)
            .field("finished", &self.finished)
            .finish()
    }
}

/// Length of the event at the start of `buf` including its blank-line terminator (`\n\n` or
/// `\n\r\n`), for a stream whose lines end in LF or CRLF (every provider's): one pass over the
/// bytes up to the first one, with no searcher to build.
fn lf_event_end(buf: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', buf).find_map(|i| match buf.get(i + 1..) {
        Some([b'\n', ..]) => Some(i + 2),
        Some([b'\r', b'\n', ..]) => Some(i + 3),
        _ => None,
    })
}

/// [`lf_event_end`] for a stream that may end lines in a lone CR too (the SSE grammar allows
/// CRLF, LF and CR). A CR that is the last byte seen may be the first half of a CRLF, so it ends
/// nothing until the next byte comes.
fn event_end(buf: &[u8]) -> Option<usize> {
    for i in memchr::memchr2_iter(b'\n', b'\r', buf) {
        // Where the line ending at `i` ends (the LF of a CRLF is also seen on its own; as a
        // line end it reads the same).
        let after = match (buf[i], buf.get(i + 1)) {
            (b'\r', None) => return None,
            (b'\r', Some(b'\n')) => i + 2,
            _ => i + 1,
        };
        // An empty line right after it ends the event.
        match (buf.get(after), buf.get(after + 1)) {
            (Some(b'\n'), _) => return Some(after + 1),
            (Some(b'\r'), Some(b'\n')) => return Some(after + 2),
            (Some(b'\r'), Some(_)) => return Some(after + 1),
            (Some(b'\r'), None) => return None,
            _ => {}
        }
    }
    None
}

/// Whether `event` is the one a provider ends a finished stream with: OpenAI's `data: [DONE]`,
/// Anthropic's `message_stop`, or the Responses API's `response.completed` (`.incomplete`,
/// `.failed`: each carries the response's final usage). The first `data` or `event` line
/// decides, and only its start is read (no search through a long data line: this runs on every
/// event). Comment, `id` and `retry` lines before it are stepped over: the SSE grammar lets a
/// provider put them first, and they are short.
fn ends_stream(event: &[u8]) -> bool {
    fn value_is(rest: &[u8], values: &[&[u8]]) -> bool {
        let blank = rest.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
        let rest = &rest[blank..];
        values.iter().any(|v| {
            rest.strip_prefix(*v)
                .is_some_and(|after| matches!(after.first(), None | Some(b'\n' | b'\r' | b' ' | b'\t')))
        })
    }
    let mut line = event;
    loop {
        if let Some(rest) = line.strip_prefix(b"data:") {
            return value_is(rest, &[b"[DONE]"]);
        }
        if let Some(rest) = line.strip_prefix(b"event:") {
            return value_is(
                rest,
                &[b"message_stop", b"response.completed", b"response.incomplete", b"response.failed"],
            );
        }
        // Another line (a comment, `id`, `retry`, or a field the grammar ignores): the next.
        let Some(end) = memchr::memchr2(b'\n', b'\r', line) else { return false };
        let next = match line[end..] {
            [b'\r', b'\n', ..] => end + 2,
            _ => end + 1,
        };
        line = &line[next..];
        // A blank line ends the event: nothing decided in it.
        if matches!(line.first(), None | Some(b'\n' | b'\r')) {
            return false;
        }
    }
}

/// How a stream ends its lines, from its first line end: `Some(true)` for a lone CR,
/// `Some(false)` for LF or CRLF, `None` while it cannot tell (no line end yet, or a CR last).
fn ends_lines_in_lone_cr(buf: &[u8]) -> Option<bool> {
    let i = memchr::memchr2(b'\n', b'\r', buf)?;
    match (buf[i], buf.get(i + 1)) {
        (b'\n', _) | (_, Some(b'\n')) => Some(false),
        (_, Some(_)) => Some(true),
        (_, None) => None,
    }
}

impl SseScanner {
    pub fn new(strip_usage_only_chunk: bool) -> Self {
        Self { strip_usage_only_chunk, ..Default::default() }
    }

    /// Inspects one event; true when it must be dropped.
    fn inspect(&mut self, event: &[u8]) -> bool {
        self.events += 1;
        self.finished = ends_stream(event);
        if !mentions_usage_object(event) {
            return false;
        }
        let mut drop_event = false;
        // A CRLF's CR is trimmed from its line below.
        if self.lone_cr == Some(true) {
            for line in event.split(|&b| b == b'\n' || b == b'\r') {
                drop_event |= self.read_line(line);
            }
        } else {
            for line in event.split(|&b| b == b'\n') {
                drop_event |= self.read_line(line);
            }
        }
        drop_event
    }

    /// Meters one line of an event that mentions usage; true when the event must be dropped.
    fn read_line(&mut self, line: &[u8]) -> bool {
        let Some(data) = line.strip_prefix(b"data:") else {
            return false;
        };
        let data = data.trim_ascii();
        #[derive(Deserialize)]
        struct Chunk {
            #[serde(default)]
            choices: Option<Vec<serde::de::IgnoredAny>>,
            #[serde(default)]
            usage: Option<UsageFields>,
        }
        match serde_json::from_slice::<Chunk>(data) {
            Ok(Chunk { usage: Some(usage), choices }) => {
                self.usage.merge(usage.into());
                let usage_only = choices.as_ref().is_some_and(|c| c.is_empty());
                usage_only && self.strip_usage_only_chunk
            }
            // Anthropic's message_start and the Responses API nest usage deeper.
            _ => {
                if let Some(usage) = find_usage(data) {
                    self.usage.merge(usage);
                }
                false
            }
        }
    }

    /// Where the event at the start of `buf` ends, by the stream's line ends.
    #[inline]
    fn event_end(&self, buf: &[u8]) -> Option<usize> {
        match self.lone_cr {
            Some(false) => lf_event_end(buf),
            _ => event_end(buf),
        }
    }

    /// Learns how the stream ends its lines from its first line end, which `chunk` may hold (or
    /// finish: a CR the pending bytes end with).
    fn learn_line_ends(&mut self, chunk: &[u8]) {
        if self.lone_cr.is_some() {
            return;
        }
        self.lone_cr = match self.pending.last() {
            Some(b'\r') => chunk.first().map(|&b| b != b'\n'),
            _ => ends_lines_in_lone_cr(chunk),
        };
    }

    /// Takes the next chunk from upstream; returns what to forward now.
    pub fn push(&mut self, chunk: Bytes) -> Option<Bytes> {
        self.learn_line_ends(&chunk);
        if self.oversized.is_some() {
            return self.push_oversized(chunk);
        }
        if self.pending.is_empty() {
            // Fast path: whole events, nothing dropped → forward the buffer as it came.
            let events_before = self.events;
            let mut offset = 0;
            let mut dropped = false;
            while let Some(len) = self.event_end(&chunk[offset..]) {
                if self.inspect(&chunk[offset..offset + len]) {
                    dropped = true;
                    break;
                }
                offset += len;
            }
            if dropped {
                // Rare (the one usage-only chunk): rebuild the chunk without it. Usage merging
                // is idempotent; the event count is reset so nothing counts twice.
                self.events = events_before;
                return self.rebuild(&chunk);
            }
            if offset == chunk.len() {
                return Some(chunk);
            }
            // Forward the whole events now, hold the partial one.
            self.pending.extend_from_slice(&chunk[offset..]);
            return (offset > 0).then(|| chunk.slice(..offset));
        }
        // The pending bytes hold no event end: one can only end in what just came, or across the
        // seam (a blank line is at most three bytes). Until it does (or the bytes pass the limit)
        // nothing is scanned or copied again, so an event sent in many small pieces costs linear
        // time, not quadratic.
        let seam = self.pending.len().saturating_sub(2);
        self.pending.extend_from_slice(&chunk);
        if self.pending.len() <= MAX_PENDING_EVENT && self.event_end(&self.pending[seam..]).is_none() {
            return None;
        }
        let pending = std::mem::take(&mut self.pending).freeze();
        self.rebuild(&pending)
    }

    fn rebuild(&mut self, buf: &Bytes) -> Option<Bytes> {
        let mut out = BytesMut::new();
        let mut offset = 0;
        while let Some(len) = self.event_end(&buf[offset..]) {
            let event = &buf[offset..offset + len];
            if !self.inspect(event) {
                out.extend_from_slice(event);
            }
            offset += len;
        }
        let rest = &buf[offset..];
        if rest.len() > MAX_PENDING_EVENT {
            // Too long to hold back: passed through from here, metered at its end.
            let mut long = Oversized { ends_stream: ends_stream(rest), tail: Vec::new() };
            append_to_tail(&mut long.tail, rest);
            self.oversized = Some(long);
            out.extend_from_slice(rest);
        } else {
            self.pending.extend_from_slice(rest);
        }
        (!out.is_empty()).then(|| out.freeze())
    }

    /// The next bytes of an event passed through ([`Oversized`]): forwarded at once; at its end
    /// it is metered, and what follows it is scanned as usual.
    fn push_oversized(&mut self, chunk: Bytes) -> Option<Bytes> {
        let long = self.oversized.as_mut()?;
        if chunk.is_empty() {
            return None;
        }
        // The last bytes held and the chunk: a blank line across the seam is found as in `push`.
        let carry = long.tail.len().min(2);
        let mut probe = Vec::with_capacity(carry + chunk.len());
        probe.extend_from_slice(&long.tail[long.tail.len() - carry..]);
        probe.extend_from_slice(&chunk);
        let Some(len) = self.event_end(&probe) else {
            append_to_tail(&mut self.oversized.as_mut()?.tail, &chunk);
            return Some(chunk);
        };
        // The bytes held had no end: it is in the chunk, or just after the held bytes.
        let in_chunk = len.saturating_sub(carry);
        let mut long = self.oversized.take()?;
        append_to_tail(&mut long.tail, &chunk[..in_chunk]);
        self.meter_oversized(&long);
        let done = chunk.slice(..in_chunk);
        let rest = chunk.slice(in_chunk..);
        if rest.is_empty() {
            return Some(done);
        }
        match self.push(rest) {
            None => (!done.is_empty()).then_some(done),
            Some(after) if done.is_empty() => Some(after),
            Some(after) => {
                let mut out = BytesMut::with_capacity(done.len() + after.len());
                out.extend_from_slice(&done);
                out.extend_from_slice(&after);
                Some(out.freeze())
            }
        }
    }

    /// Meters an event passed through; never dropped (the usage-only chunk the gateway strips is
    /// small).
    fn meter_oversized(&mut self, long: &Oversized) {
        self.events += 1;
        self.finished = long.ends_stream;
        if let Some(usage) = find_usage(kept_tail(&long.tail)) {
            self.usage.merge(usage);
        }
    }

    /// Whatever is left when the stream ends (an unterminated last event) is forwarded as is.
    pub fn finish(&mut self) -> Option<Bytes> {
        if let Some(long) = self.oversized.take() {
            self.meter_oversized(&long);
            return None;
        }
        if self.pending.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.pending).freeze();
        self.inspect(&rest);
        Some(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENAI_STREAM: &str = concat!(
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7,\"total_tokens\":18}}\n\n",
        "data: [DONE]\n\n",
    );

    fn run(scanner: &mut SseScanner, input: &str, split: usize) -> String {
        let bytes = Bytes::from(input.to_owned());
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let end = (i + split).min(bytes.len());
            if let Some(b) = scanner.push(bytes.slice(i..end)) {
                out.extend_from_slice(&b);
            }
            i = end;
        }
        if let Some(b) = scanner.finish() {
            out.extend_from_slice(&b);
        }
        String::from_utf8(out).expect("utf8")
    }

    #[test]
    fn openai_usage_chunk_is_metered_and_stripped_at_any_split() {
        for split in [1, 2, 3, 7, 50, 10_000] {
            let mut keep = SseScanner::new(false);
            assert_eq!(run(&mut keep, OPENAI_STREAM, split), OPENAI_STREAM, "split {split}");
            assert_eq!(keep.usage, Usage { input: Some(11), output: Some(7) });

            let mut strip = SseScanner::new(true);
            let out = run(&mut strip, OPENAI_STREAM, split);
            assert!(!out.contains("prompt_tokens"), "split {split}: {out}");
            assert!(out.contains("finish_reason") && out.ends_with("data: [DONE]\n\n"), "split {split}");
            assert_eq!(strip.usage, Usage { input: Some(11), output: Some(7) }, "split {split}");
        }
    }

    /// A provider's count is untrusted: 2^63 (which overflowed the settlement's arithmetic) is
    /// read as the largest count.
    #[test]
    fn an_absurd_reported_count_is_read_as_the_largest() {
        let usage = find_usage(br#"{"usage":{"prompt_tokens":9223372036854775808,"completion_tokens":5}}"#);
        assert_eq!(usage, Some(Usage { input: Some(crate::limits::MAX_TOKEN_COUNT), output: Some(5) }));
    }

    #[test]
    fn whole_events_pass_through_without_copying() {
        let mut scanner = SseScanner::new(false);
        let chunk = Bytes::from_static(b"data: {\"a\":1}\n\n");
        let out = scanner.push(chunk.clone()).expect("forwarded");
        assert_eq!(out.as_ptr(), chunk.as_ptr());
    }

    #[test]
    fn anthropic_usage_is_cumulative() {
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"usage\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let mut scanner = SseScanner::new(false);
        assert_eq!(run(&mut scanner, stream, 9), stream);
        assert_eq!(scanner.usage, Usage { input: Some(25), output: Some(15) });
        assert_eq!(scanner.events, 4);
    }

    #[test]
    fn final_events_are_told_from_the_rest_by_their_first_field() {
        for finished in [
            "data: [DONE]\n\n",
            "data:[DONE]\r\n\r\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            "event:response.completed\rdata: {}\r\r",
            "event: response.incomplete\ndata: {}\n\n",
            "event: response.failed\ndata: {}\n\n",
            // Comment, `id` and `retry` lines may come first.
            ": keep-alive\ndata: [DONE]\n\n",
            "id: 42\r\nretry: 1000\r\ndata: [DONE]\r\n\r\n",
            ":\revent: message_stop\rdata: {}\r\r",
        ] {
            assert!(ends_stream(finished.as_bytes()), "{finished:?}");
        }
        for other in [
            "data: {\"choices\":[]}\n\n",
            "data: {\"error\":{\"message\":\"[DONE]\"}}\n\n",
            "event: error\ndata: {\"type\":\"message_stop\"}\n\n",
            "event: message_delta\ndata: {}\n\n",
            ": comment\n\ndata: [DONE]\n\n",
            "id: 7\ndata: {\"choices\":[]}\ndata: [DONE]\n\n",
            ": only a comment\n\n",
            "id: 7",
            "",
        ] {
            assert!(!ends_stream(other.as_bytes()), "{other:?}");
        }
        // The scanner says whether the last event it saw was one.
        let mut scanner = SseScanner::new(false);
        scanner.push(Bytes::from_static(b"data: {}\n\ndata: [DONE]\n\n"));
        assert!(scanner.finished);
        scanner.push(Bytes::from_static(b"data: {\"error\":{}}\n\n"));
        assert!(!scanner.finished);
    }

    #[test]
    fn event_ends_are_the_first_blank_line_of_either_kind() {
        assert_eq!(event_end(b"data: a\n\ndata: b\n\n"), Some(9));
        assert_eq!(event_end(b"data: a\r\n\r\ndata: b\n\n"), Some(11));
        assert_eq!(event_end(b"data: a\ndata: b\n\r\n"), Some(18));
        assert_eq!(event_end(b"data: a\n"), None);
        assert_eq!(event_end(b"data: a\n\r"), None);
        assert_eq!(event_end(b""), None);
        // A lone CR ends a line too; one that is the last byte may be half a CRLF.
        assert_eq!(event_end(b"data: a\r\rdata: b\r\r"), Some(9));
        assert_eq!(event_end(b"data: a\r\n\ndata: b"), Some(10));
        assert_eq!(event_end(b"data: a\r\r\ndata: b"), Some(10));
        assert_eq!(event_end(b"data: a\r\n\rdata: b"), Some(10));
        assert_eq!(event_end(b"event: x\rdata: a\r\rdata"), Some(18));
        assert_eq!(event_end(b"data: a\r\r"), None);
        assert_eq!(event_end(b"data: a\r"), None);
        assert_eq!(event_end(b"data: a\rdata: b\r\n"), None);
        assert_eq!(
            find_usage(br#"{"usage":{"input_tokens":1},"x":{"usage":null}}"#),
            Some(Usage { input: Some(1), output: None })
        );
    }

    #[test]
    fn events_split_anywhere_even_byte_by_byte_come_out_whole() {
        let stream = "data: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\nevent: x\ndata: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\r\ndata: [DONE]\n\ndata: tail";
        for split in [1, 2, 3, 5, 7, stream.len()] {
            let mut scanner = SseScanner::new(false);
            assert_eq!(run(&mut scanner, stream, split), stream, "split {split}");
            assert_eq!(scanner.events, 5, "split {split}");
            assert_eq!(scanner.usage, Usage { input: Some(3), output: Some(4) }, "split {split}");
        }
        // Byte by byte, each event goes out with the byte that ends it, whichever blank line.
        let mut scanner = SseScanner::new(false);
        let mut out = Vec::new();
        for (i, byte) in stream.bytes().enumerate() {
            if let Some(b) = scanner.push(Bytes::copy_from_slice(&[byte])) {
                out.extend_from_slice(&b);
            }
            let sent = &stream.as_bytes()[..=i];
            let ends_an_event =
                event_end(sent).is_some() && [b"\n\n".as_slice(), b"\n\r\n"].iter().any(|e| sent.ends_with(e));
            if ends_an_event {
                assert_eq!(out, sent, "held back after byte {i}");
            }
        }
    }

    /// On a stream without lone CRs the LF search answers what the general scan answers.
    #[test]
    fn the_lf_search_agrees_with_the_general_scan() {
        let mut rng = crate::json_scan::generate::Rng::new(0x5eed_0c12);
        for _ in 0..20_000 {
            let mut buf = Vec::new();
            for _ in 0..rng.below(8) {
                buf.extend_from_slice([&b"a"[..], b"\r\n", b"\n"][rng.below(3)]);
            }
            assert_eq!(lf_event_end(&buf), event_end(&buf), "{:?}", String::from_utf8_lossy(&buf));
            assert_ne!(ends_lines_in_lone_cr(&buf), Some(true));
        }
        assert_eq!(ends_lines_in_lone_cr(b"data: a\rdata"), Some(true));
        assert_eq!(ends_lines_in_lone_cr(b"data: a\r"), None);
        assert_eq!(ends_lines_in_lone_cr(b"data: a"), None);
    }

    /// A provider that ends its lines with a lone CR: each event goes out when the next one
    /// starts (its blank line might still be half a CRLF until then), and its usage is read.
    #[test]
    fn lone_cr_events_are_split_and_metered() {
        let stream = "data: {\"a\":1}\r\revent: x\rdata: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\r\rdata: [DONE]\r\r";
        for split in [1, 2, 3, 5, 7, stream.len()] {
            let mut scanner = SseScanner::new(false);
            assert_eq!(run(&mut scanner, stream, split), stream, "split {split}");
            assert_eq!(scanner.usage, Usage { input: Some(3), output: Some(4) }, "split {split}");
        }
        let mut scanner = SseScanner::new(false);
        let first = scanner.push(Bytes::from_static(b"data: {\"a\":1}\r\rdata: {\"b\""));
        assert_eq!(first.as_deref(), Some(&b"data: {\"a\":1}\r\r"[..]), "not held until the pending limit");
        assert_eq!(scanner.events, 1);
    }

    #[test]
    fn crlf_events_and_unterminated_tail() {
        let stream = "data: {\"x\":1}\r\n\r\ndata: partial";
        let mut scanner = SseScanner::new(false);
        assert_eq!(run(&mut scanner, stream, 4), stream);
    }

    /// What the scanner answers serde_json answers the same; the common shapes are answered.
    #[test]
    fn the_scanned_usage_is_serde_jsons() {
        use crate::json_scan::generate::{self, Rng};
        let serde = |json: &[u8]| serde_json::Deserializer::from_slice(json).into_iter::<UsageFields>().next();
        let mut rng = Rng::new(0x5eed_0003);
        let (mut parsed, mut scanned) = (0, 0);
        for round in 0..20_000 {
            let mut doc = String::new();
            generate::object(&mut rng, &mut doc, 0);
            // What follows the object is not the reader's business.
            generate::value(&mut rng, &mut doc, 0);
            let bytes = if round % 2 == 0 { doc.into_bytes() } else { generate::mutate(&mut rng, &doc) };
            let parsed_by_serde = serde(&bytes);
            parsed += usize::from(matches!(parsed_by_serde, Some(Ok(_))));
            if let Some(fields) = UsageFields::scan(&bytes) {
                scanned += 1;
                assert!(
                    matches!(&parsed_by_serde, Some(Ok(theirs)) if *theirs == fields),
                    "{:?}: {parsed_by_serde:?}",
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
        assert!(scanned * 10 > parsed * 7, "{scanned} of {parsed} objects serde_json parsed were scanned");

        let openai = br#"{"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29, "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}, "system_fingerprint": null}"#;
        let anthropic = br#"{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":6,"service_tier":"standard"}}"#;
        for common in [&openai[..], &anthropic[..]] {
            let fields = UsageFields::scan(common).expect("scanned");
            assert!(matches!(serde(common), Some(Ok(theirs)) if theirs == fields));
        }
        assert_eq!(
            find_usage(&[br#"{"id":"x","usage":"#, &openai[..]].concat()),
            Some(Usage { input: Some(19), output: Some(10) })
        );
    }

    /// An event over [`MAX_PENDING_EVENT`] (the Responses API's `response.completed` repeats
    /// the request's instructions: a client's 1.5 MB of them) is passed through as it comes, and
    /// still metered at its end, with whatever follows it scanned as usual, however it is cut.
    #[test]
    fn an_event_too_long_to_hold_is_passed_through_and_still_metered() {
        let instructions = "x".repeat(1_500_000);
        let completed = format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"instructions\":\"{instructions}\",\"usage\":{{\"input_tokens\":500000,\"output_tokens\":90000}},\"metadata\":{{}}}}}}\n\n"
        );
        let created =
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n";
        for (after, events, finished) in [("", 2, true), ("data: [DONE]\n\n", 3, true), (": note\n\ndata: x", 4, false)]
        {
            let stream = format!("{created}{completed}{after}");
            for split in [16 * 1024, 16 * 1024 + 1, 64 * 1024, 1 << 20, stream.len()] {
                let mut scanner = SseScanner::new(true);
                let out = run(&mut scanner, &stream, split);
                assert!(out == stream, "split {split}: the stream changed");
                assert_eq!(scanner.usage, Usage { input: Some(500_000), output: Some(90_000) }, "split {split}");
                assert_eq!((scanner.events, scanner.finished), (events, finished), "split {split} after {after:?}");
                assert!(scanner.oversized.is_none() && scanner.pending.is_empty());
            }
        }
        // Cut anywhere near its end: the blank line across two chunks, or right after the held bytes.
        let stream = format!("{completed}data: [DONE]\n\n");
        let end = completed.len();
        for cut in end - 4..=end + 1 {
            let bytes = Bytes::from(stream.clone());
            let mut scanner = SseScanner::new(false);
            let mut out = Vec::new();
            for part in [bytes.slice(..1_200_000), bytes.slice(1_200_000..cut), bytes.slice(cut..)] {
                out.extend_from_slice(&scanner.push(part).unwrap_or_default());
            }
            assert!(scanner.finish().is_none());
            assert!(out == stream.as_bytes(), "cut {cut}");
            assert_eq!(scanner.usage.output, Some(90_000), "cut {cut}");
            assert_eq!((scanner.events, scanner.finished), (2, true), "cut {cut}");
        }
        // Unterminated when the stream stops: metered as its last event.
        let mut scanner = SseScanner::new(false);
        let cut_short = &completed[..completed.len() - 2];
        assert!(run(&mut scanner, cut_short, 64 * 1024) == cut_short);
        assert_eq!((scanner.usage.input, scanner.events, scanner.finished), (Some(500_000), 1, true));
    }

    /// The readers' Debug output never holds response bytes.
    #[test]
    fn debug_output_holds_no_content() {
        let mut tail = JsonTail::default();
        tail.push(Bytes::from_static(b"{\"content\":\"CANARY-1\","));
        tail.push(Bytes::from_static(b"\"more\":\"CANARY-2\"}"));
        let mut scanner = SseScanner::new(false);
        scanner.push(Bytes::from_static(b"data: {\"content\":\"CANARY-3\"}\n\ndata: {\"partial CANARY-4"));
        let shown = format!("{tail:?} {scanner:?}");
        assert!(!shown.contains("CANARY"), "{shown}");
        assert!(shown.contains("pending_len"), "{shown}");
    }

    /// The last usage object wins wherever it sits: in the window searched forward, before it,
    /// or across its start; a later key without an object does not hide an earlier one.
    #[test]
    fn the_last_usage_object_is_found_inside_and_before_the_window() {
        let usage = |n: u64| format!(r#""usage":{{"prompt_tokens":{n},"completion_tokens":1}}"#);
        let found = |json: &str| find_usage(json.as_bytes()).and_then(|u| u.input);
        for filler in [0, 100, USAGE_WINDOW - 40, USAGE_WINDOW - 3, USAGE_WINDOW, 3 * USAGE_WINDOW] {
            let pad = "x".repeat(filler);
            assert_eq!(found(&format!(r#"{{{},"a":"{pad}"}}"#, usage(1))), Some(1), "filler {filler}");
            assert_eq!(found(&format!(r#"{{{},"a":"{pad}",{}}}"#, usage(1), usage(2))), Some(2), "filler {filler}");
            assert_eq!(found(&format!(r#"{{{},"a":"{pad}","usage":null}}"#, usage(3))), Some(3), "filler {filler}");
            assert_eq!(
                found(&format!(r#"{{{},"a":"{pad}","usage":{{"prompt_tokens":"bad"}}}}"#, usage(4))),
                Some(4),
                "filler {filler}"
            );
        }
        // Overlapping keys (malformed, but read as the backward search reads them).
        assert_eq!(found(r#"{"usage"usage":{"prompt_tokens":6}}"#), Some(6));
        // The window starting at every byte of the key and around it.
        for start in 0..12 {
            // `{` + key + `,"a":"` + pad + `"}`: the window starts at `len - USAGE_WINDOW`.
            let pad = USAGE_WINDOW + start - usage(5).len() - 9;
            let json = format!(r#"{{{},"a":"{}"}}"#, usage(5), "y".repeat(pad));
            assert_eq!(json.len() - USAGE_WINDOW, start);
            assert_eq!(found(&json), Some(5), "window from {start}");
        }
    }

    /// Anthropic's `input_tokens` leaves out prompt-cache reads and writes: they are input too.
    #[test]
    fn cached_prompt_tokens_are_counted_as_input() {
        let usage = br#"{"usage":{"input_tokens":10,"cache_creation_input_tokens":2000,"cache_read_input_tokens":150000,"output_tokens":5}}"#;
        assert_eq!(find_usage(usage), Some(Usage { input: Some(152_010), output: Some(5) }));
        // The same read by serde_json (a field the scanner leaves to it: a fraction).
        let fallback = br#"{"usage":{"input_tokens":10,"cache_read_input_tokens":150000,"output_tokens":5,"x":1.5}}"#;
        assert_eq!(find_usage(fallback), Some(Usage { input: Some(150_010), output: Some(5) }));
        // A stream: the counts of `message_start` stay when `message_delta` reports the output.
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"cache_read_input_tokens\":4000,\"output_tokens\":1}}}\n\n\
                      event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":42}}\n\n";
        let mut scanner = SseScanner::new(false);
        assert_eq!(run(&mut scanner, stream, 7), stream);
        assert_eq!(scanner.usage, Usage { input: Some(4003), output: Some(42) });
        // Each count capped, and the sum saturates rather than wraps.
        let huge = format!(
            r#"{{"usage":{{"input_tokens":{m},"cache_read_input_tokens":{m},"cache_creation_input_tokens":{m}}}}}"#,
            m = u64::MAX
        );
        assert_eq!(find_usage(huge.as_bytes()).and_then(|u| u.input), Some(3 * crate::limits::MAX_TOKEN_COUNT));
    }

    /// A provider cannot make the search for usage quadratic: thousands of `"usage"` objects it
    /// never closes are not each read to the end of the event. The last few are tried, each
    /// within a bound; then the search gives up.
    #[test]
    fn the_usage_search_reads_a_bounded_number_of_bounded_objects() {
        let valid = r#""usage":{"prompt_tokens":7,"completion_tokens":1}"#;
        let unclosed = |n: usize| r#"{"usage":{"a":"#.repeat(n);
        // Within the candidates tried, an earlier valid object is still found.
        let json = format!("{{{valid},\"x\":{}0", unclosed(USAGE_CANDIDATES - 1));
        assert_eq!(find_usage(json.as_bytes()).and_then(|u| u.input), Some(7));
        // Behind more of them than that, it is not: the search stopped.
        let json = format!("{{{valid},\"x\":{}0", unclosed(USAGE_CANDIDATES));
        assert_eq!(find_usage(json.as_bytes()), None);
        // A usage object longer than the bound is not read.
        let long = format!(r#"{{"usage":{{"prompt_tokens":7,"pad":"{}"}}}}"#, "p".repeat(MAX_USAGE_OBJECT));
        assert_eq!(find_usage(long.as_bytes()), None);
        // The attack itself, in an SSE event near the pending limit (read quadratically, this
        // took tens of seconds).
        let event = format!("data: {{\"x\":{}0\n\n", unclosed(50_000));
        assert!(event.len() < MAX_PENDING_EVENT);
        let mut scanner = SseScanner::new(false);
        assert_eq!(scanner.push(Bytes::from(event.clone())).as_deref(), Some(event.as_bytes()));
        assert_eq!(scanner.usage, Usage::default());
    }

    /// A body cut into the smallest chunks reads as the same body in one piece, and the tail
    /// stays within twice its size.
    #[test]
    fn json_tail_reads_a_body_in_tiny_chunks_as_in_one() {
        let mut body = format!("{{\"data\":[\"{}\"],", "x".repeat(3 * JSON_TAIL_BYTES)).into_bytes();
        body.extend_from_slice(br#""usage":{"prompt_tokens":3,"completion_tokens":9}}"#);
        for cut in [1, 7, 1000, JSON_TAIL_BYTES - 1] {
            let mut tail = JsonTail::default();
            for piece in body.chunks(cut) {
                tail.push(Bytes::copy_from_slice(piece));
                assert!(tail.tail.len() <= 2 * JSON_TAIL_BYTES, "{cut}: {}", tail.tail.len());
            }
            assert_eq!(tail.usage(), Some(Usage { input: Some(3), output: Some(9) }), "{cut}");
        }
        // What lies beyond the last JSON_TAIL_BYTES is not read, however the body was cut.
        let far = [&br#"{"usage":{"prompt_tokens":1},"x":""#[..], &vec![b'y'; JSON_TAIL_BYTES][..], b"\"}"].concat();
        for cut in [1, 64, far.len()] {
            let mut tail = JsonTail::default();
            for piece in far.chunks(cut) {
                tail.push(Bytes::copy_from_slice(piece));
            }
            tail.push(Bytes::new());
            assert_eq!(tail.usage(), None, "{cut}");
        }
    }

    #[test]
    fn json_tail_finds_usage_at_the_end_of_large_bodies() {
        let mut tail = JsonTail::default();
        let filler = format!("{{\"data\":[\"{}\"],", "x".repeat(100_000));
        tail.push(Bytes::from(filler));
        tail.push(Bytes::from_static(br#""usage":{"prompt_tokens":3,"#));
        tail.push(Bytes::from_static(br#""total_tokens":3}}"#));
        assert_eq!(tail.usage(), Some(Usage { input: Some(3), output: None }));
        let mut whole = JsonTail::default();
        whole.push(Bytes::from_static(br#"{"x":1,"usage":{"prompt_tokens":2,"completion_tokens":5}}"#));
        assert_eq!(whole.usage(), Some(Usage { input: Some(2), output: Some(5) }));
        // Told it is the last chunk: read at once when it is the only one, kept when not.
        let body = Bytes::from_static(br#"{"x":1,"usage":{"prompt_tokens":2,"completion_tokens":5}}"#);
        let mut only = JsonTail::default();
        only.push_last(&body);
        assert!(only.last.is_none());
        assert_eq!(only.usage(), Some(Usage { input: Some(2), output: Some(5) }));
        let mut split = JsonTail::default();
        split.push(body.slice(..20));
        split.push_last(&body.slice(20..));
        assert_eq!(split.usage(), Some(Usage { input: Some(2), output: Some(5) }));
        let mut none = JsonTail::default();
        none.push_last(&Bytes::from_static(b"{}"));
        assert_eq!(none.usage(), None);
        // A quoted "usage" inside content is escaped and never matches.
        assert_eq!(find_usage(br#"{"content":"say \"usage\": {\"prompt_tokens\": 99}"}"#), None);
        assert_eq!(find_usage(br#"{"usage": null}"#), None);
    }
}
