//! Header fields as the pipeline reads them, whichever side parsed them: hyper's `HeaderMap`
//! (HTTP/2 clients, responses the gateway makes itself), or [`RawFields`], which indexes the
//! lines of an HTTP/1.1 head where they lie instead of building a map: no name is hashed, no
//! value is copied or reference-counted one by one. The HTTP/1.1 server reads client requests
//! this way, and the upstream client reads providers' responses this way.
//!
//! Names are always lowercase: `HeaderMap` stores them so, and the HTTP/1.1 parsers lowercase
//! them in place. Lookups take the lowercase name.

use std::fmt;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};

pub trait HeaderFields {
    /// The first value of `name`.
    fn first(&self, name: &str) -> Option<&[u8]>;

    /// Every value of `name`, in order.
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a;

    /// Every field as (name, value), in the order received.
    fn each(&self) -> impl Iterator<Item = (&[u8], &[u8])>;

    /// The first value of `name` as a `HeaderValue` that shares the fields' bytes, so it can be
    /// echoed in a response without a copy.
    fn shared(&self, name: &str) -> Option<HeaderValue>;

    fn has(&self, name: &str) -> bool {
        self.first(name).is_some()
    }

    /// The list elements of every `name` field (`Connection`, `Transfer-Encoding`), in order.
    fn tokens<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.all(name).flat_map(crate::http1::codec::list_tokens)
    }
}

impl HeaderFields for HeaderMap {
    fn first(&self, name: &str) -> Option<&[u8]> {
        debug_assert_lowercase(name);
        self.get(name).map(HeaderValue::as_bytes)
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        debug_assert_lowercase(name);
        self.get_all(name).into_iter().map(HeaderValue::as_bytes)
    }

    fn each(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.iter().map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
    }

    fn shared(&self, name: &str) -> Option<HeaderValue> {
        self.get(name).cloned()
    }
}

/// Byte ranges of one header line inside its head.
#[derive(Debug, Clone, Copy)]
struct Line {
    name: (u32, u32),
    value: (u32, u32),
}

/// The lines of a head as ranges into it, from [`Lines::index`]; turned into [`RawFields`] by
/// [`RawFields::split_from`]. On the heap: one allocation per head, and a `RawFields` small
/// enough to move cheaply (futures move it several times on the way through the pipeline;
/// inline storage for the 15 to 25 fields SDK requests and provider responses carry cost more in
/// copies than the allocation does).
#[derive(Debug)]
pub struct Lines(Vec<Line>);

impl Lines {
    /// The fields httparse found in `head` (the head alone: its first byte to its empty line),
    /// as ranges into it. `None` if a field lies outside it.
    pub fn index(head: &[u8], fields: &[httparse::Header<'_>]) -> Option<Self> {
        let mut lines = Vec::with_capacity(fields.len());
        for field in fields {
            lines.push(Line { name: range_in(head, field.name.as_bytes())?, value: range_in(head, field.value)? });
        }
        Some(Lines(lines))
    }
}

/// Where `part` sits in `base` (a head of at most 64 KiB, so offsets fit in `u32`). `None` for a
/// slice from anywhere else, rather than a bad range.
pub fn range_in(base: &[u8], part: &[u8]) -> Option<(u32, u32)> {
    // Both slices come from `base`; their addresses give the offset without unsafe code.
    let start = (part.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
    let end = start.wrapping_add(part.len());
    if start > base.len() || end > base.len() || end < start || end > u32::MAX as usize {
        return None;
    }
    Some((start as u32, end as u32))
}

fn slice(head: &[u8], (start, end): (u32, u32)) -> &[u8] {
    head.get(start as usize..end as usize).unwrap_or_default()
}

/// Lookups take lowercase names: a `HeaderMap` would find `Authorization` too, `RawFields` would
/// not, and a test over one would hide the miss in the other.
fn debug_assert_lowercase(name: &str) {
    debug_assert!(!name.bytes().any(|b| b.is_ascii_uppercase()), "header lookups take lowercase names: {name}");
}

/// The header fields of a head, left where they lie in it: the head's bytes and the ranges of
/// each name and value. Names are lowercase. Reading a field is a short scan.
///
/// Built only by [`RawFields::split_from`] from a head httparse has parsed, so every name is a
/// token and every value is free of CR, LF and other control characters (what `HeaderName` and
/// `HeaderValue` guarantee), and both can be written to the wire as they are.
pub struct RawFields {
    head: Bytes,
    lines: Vec<Line>,
}

impl RawFields {
    /// Splits the first `len` bytes (the head `lines` was indexed over) off `buf`, lowercasing
    /// the field names in place first (httparse has checked that they are tokens, so ASCII
    /// lowercasing is the whole job); `buf` keeps whatever follows the head.
    pub fn split_from(buf: &mut BytesMut, len: usize, lines: Lines) -> Self {
        let len = len.min(buf.len());
        let head = &mut buf[..len];
        for line in &lines.0 {
            if let Some(name) = head.get_mut(line.name.0 as usize..line.name.1 as usize) {
                name.make_ascii_lowercase();
            }
        }
        Self { head: buf.split_to(len).freeze(), lines: lines.0 }
    }

    /// The whole head these fields lie in.
    pub fn head(&self) -> &Bytes {
        &self.head
    }

    fn name(&self, line: &Line) -> &[u8] {
        slice(&self.head, line.name)
    }

    fn value(&self, line: &Line) -> &[u8] {
        slice(&self.head, line.value)
    }

    fn find(&self, name: &str) -> Option<&Line> {
        debug_assert_lowercase(name);
        self.lines.iter().find(|line| self.name(line) == name.as_bytes())
    }

    /// `value` (a slice of these fields) as a `HeaderValue` sharing the head's bytes.
    fn share(&self, value: &[u8]) -> Option<HeaderValue> {
        let (start, end) = range_in(&self.head, value)?;
        HeaderValue::from_maybe_shared(self.head.slice(start as usize..end as usize)).ok()
    }
}

/// Names only: values can be credentials.
impl fmt::Debug for RawFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.lines.iter().map(|line| String::from_utf8_lossy(self.name(line)))).finish()
    }
}

impl HeaderFields for RawFields {
    fn first(&self, name: &str) -> Option<&[u8]> {
        self.find(name).map(|line| self.value(line))
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        debug_assert_lowercase(name);
        self.lines.iter().filter(move |line| self.name(line) == name.as_bytes()).map(move |line| self.value(line))
    }

    fn each(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines.iter().map(|line| (self.name(line), self.value(line)))
    }

    fn shared(&self, name: &str) -> Option<HeaderValue> {
        self.share(self.first(name)?)
    }
}

/// A provider's response fields: indexed in the head they came in (a real provider), or a map
/// (the in-process mock).
pub enum ResponseFields {
    Raw(RawFields),
    Map(HeaderMap),
}

/// Names only, like [`RawFields`]' `Debug`.
impl fmt::Debug for ResponseFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.each().map(|(name, _)| String::from_utf8_lossy(name))).finish()
    }
}

impl ResponseFields {
    /// How many fields there are.
    pub fn count(&self) -> usize {
        match self {
            ResponseFields::Raw(raw) => raw.lines.len(),
            ResponseFields::Map(map) => map.len(),
        }
    }

    /// Every field as (name, value), the value able to become a `HeaderValue` that shares the
    /// head's bytes (HTTP/2 responses need those; HTTP/1.1 writes the bytes).
    pub fn each_value(&self) -> impl Iterator<Item = (&[u8], FieldValue<'_>)> {
        let (raw, map) = match self {
            ResponseFields::Raw(raw) => (Some(raw), None),
            ResponseFields::Map(map) => (None, Some(map)),
        };
        let raw_fields =
            raw.into_iter().flat_map(|raw| raw.each().map(move |(name, value)| (name, FieldValue::Raw(raw, value))));
        let map_fields = map
            .into_iter()
            .flat_map(|map| map.iter().map(|(name, value)| (name.as_str().as_bytes(), FieldValue::Map(value))));
        raw_fields.chain(map_fields)
    }
}

/// One field value of [`ResponseFields`].
#[derive(Clone, Copy)]
pub enum FieldValue<'a> {
    Raw(&'a RawFields, &'a [u8]),
    Map(&'a HeaderValue),
}

/// The length only, like [`RawFields`]' `Debug`.
impl fmt::Debug for FieldValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FieldValue({} bytes)", self.bytes().len())
    }
}

impl<'a> FieldValue<'a> {
    pub fn bytes(&self) -> &'a [u8] {
        match self {
            FieldValue::Raw(_, value) => value,
            FieldValue::Map(value) => value.as_bytes(),
        }
    }

    /// The value as a `HeaderValue`, sharing the head's bytes.
    pub fn to_header_value(&self) -> Option<HeaderValue> {
        match self {
            FieldValue::Raw(raw, value) => raw.share(value),
            FieldValue::Map(value) => Some((*value).clone()),
        }
    }
}

impl HeaderFields for ResponseFields {
    fn first(&self, name: &str) -> Option<&[u8]> {
        match self {
            ResponseFields::Raw(raw) => raw.first(name),
            ResponseFields::Map(map) => map.first(name),
        }
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        let (raw, map) = match self {
            ResponseFields::Raw(raw) => (Some(raw), None),
            ResponseFields::Map(map) => (None, Some(map)),
        };
        raw.into_iter().flat_map(move |raw| raw.all(name)).chain(map.into_iter().flat_map(move |map| map.all(name)))
    }

    fn each(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.each_value().map(|(name, value)| (name, value.bytes()))
    }

    fn shared(&self, name: &str) -> Option<HeaderValue> {
        match self {
            ResponseFields::Raw(raw) => raw.shared(name),
            ResponseFields::Map(map) => map.shared(name),
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    #[test]
    fn a_header_map_answers_by_lowercase_name() {
        let mut map = HeaderMap::new();
        map.append("X-Forwarded-For", HeaderValue::from_static("10.0.0.1"));
        map.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        map.insert("Authorization", HeaderValue::from_static("Bearer k"));
        assert_eq!(map.first("authorization"), Some(&b"Bearer k"[..]));
        assert_eq!(map.all("x-forwarded-for").collect::<Vec<_>>(), [&b"10.0.0.1"[..], b"10.0.0.2"]);
        assert!(map.has("x-forwarded-for") && !map.has("cookie"));
        assert_eq!(map.each().count(), 3);
        assert_eq!(map.shared("authorization"), Some(HeaderValue::from_static("Bearer k")));
    }

    /// Splits the response head at the front of `buf` off it, indexed as the upstream client
    /// does it.
    fn split_response(buf: &mut BytesMut) -> RawFields {
        let mut storage = [httparse::EMPTY_HEADER; 32];
        let (len, lines) = {
            let mut response = httparse::Response::new(&mut storage);
            let httparse::Status::Complete(len) = response.parse(buf).expect("valid") else { panic!("partial") };
            (len, Lines::index(&buf[..len], response.headers).expect("inside"))
        };
        RawFields::split_from(buf, len, lines)
    }

    /// The fields of a response head.
    pub fn response_fields(head: &str) -> RawFields {
        split_response(&mut BytesMut::from(head))
    }

    #[test]
    fn raw_fields_and_a_map_read_the_same() {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n\r\n";
        let raw = ResponseFields::Raw(response_fields(head));
        let mut map = HeaderMap::new();
        map.insert("content-type", HeaderValue::from_static("text/plain"));
        map.append("set-cookie", HeaderValue::from_static("a=1"));
        map.append("set-cookie", HeaderValue::from_static("b=2"));
        let map = ResponseFields::Map(map);
        for fields in [&raw, &map] {
            assert_eq!(fields.first("content-type"), Some(&b"text/plain"[..]));
            assert_eq!(fields.all("set-cookie").collect::<Vec<_>>(), [&b"a=1"[..], b"b=2"]);
            assert_eq!(fields.each().count(), 3);
            assert_eq!(fields.shared("set-cookie"), Some(HeaderValue::from_static("a=1")));
            let shared: Vec<_> =
                fields.each_value().map(|(name, value)| (name.to_vec(), value.to_header_value())).collect();
            assert_eq!(shared[0], (b"content-type".to_vec(), Some(HeaderValue::from_static("text/plain"))));
            assert_eq!(shared.len(), 3);
        }
        // A raw value is shared with the head, not copied.
        let ResponseFields::Raw(fields) = &raw else { unreachable!() };
        let value = fields.first("content-type").expect("present");
        assert_eq!(fields.shared("content-type").expect("present").as_bytes().as_ptr(), value.as_ptr());
    }

    #[test]
    fn ranges_outside_the_head_are_refused() {
        let whole = b"0123456789abcdef";
        let base = &whole[4..10];
        assert_eq!(range_in(base, &whole[5..7]), Some((1, 3)));
        assert_eq!(range_in(base, &whole[10..10]), Some((6, 6)));
        // Starting before the head, running past its end, or from another buffer: refused.
        assert_eq!(range_in(base, &whole[2..5]), None);
        assert_eq!(range_in(base, &whole[8..12]), None);
        assert_eq!(range_in(base, &whole[11..12]), None);
        assert_eq!(range_in(base, b"x"), None);
    }

    #[test]
    fn split_lowercases_names_and_leaves_what_follows() {
        let head = "HTTP/1.1 200 OK\r\nX-Mixed-Case: Value\r\n\r\n";
        let mut buf = BytesMut::from(format!("{head}BODY").as_str());
        let fields = split_response(&mut buf);
        assert_eq!(fields.each().collect::<Vec<_>>(), [(&b"x-mixed-case"[..], &b"Value"[..])]);
        assert_eq!(&buf[..], b"BODY");
        assert_eq!(fields.head().len(), head.len());
        // Fields lying past the bytes given as the head are not indexed.
        let other = b"HTTP/1.1 200 OK\r\nX-A: b\r\n\r\n";
        let mut storage = [httparse::EMPTY_HEADER; 4];
        let mut response = httparse::Response::new(&mut storage);
        assert!(response.parse(other).is_ok_and(|status| status.is_complete()));
        assert!(Lines::index(&other[..other.len()], response.headers).is_some());
        assert!(Lines::index(&other[..20], response.headers).is_none());
    }
}
