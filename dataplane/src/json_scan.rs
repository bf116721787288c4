//! A strict, allocation-free reader for the few JSON fields the gateway takes from bodies.
//!
//! serde_json's derive walks a body through visitors and checks the UTF-8 of every key it
//! reads: for the routing fields of a small chat request that was about 2,000 instructions, and
//! as many again for a response's `usage`. This reader is for the common shape only. It answers
//! when it is certain serde_json would give the same answer, and otherwise gives up with `None`:
//! an escape in a wanted string or in a field name, a field name that is not ASCII, a repeated
//! field, a number that is not a plain integer where one is wanted, nesting deeper than
//! 64 levels, and any syntax error. The caller then asks serde_json, whose value (or error
//! message) stands. The tests hold both readers to that contract on generated and mutated
//! documents.
//!
//! Skipped values are checked the way serde_json checks what it ignores: strings end, hold no
//! control characters and only valid escapes (their UTF-8 is not checked, as serde_json does not
//! check it either); numbers follow the JSON grammar; literals are spelled out.

/// Deeper nesting is left to serde_json, which skips ignored values without recursing.
const MAX_DEPTH: u32 = 64;

pub struct Scanner<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// Positions only: the bytes are a client's or a provider's content.
impl std::fmt::Debug for Scanner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scanner").field("len", &self.buf.len()).field("pos", &self.pos).finish()
    }
}

impl<'a> Scanner<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.buf.get(self.pos) {
            self.pos += 1;
        }
    }

    /// True when only whitespace is left.
    pub fn at_end(&mut self) -> bool {
        self.ws();
        self.pos == self.buf.len()
    }

    pub fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    pub fn null(&mut self) -> Option<()> {
        self.literal(b"null")
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.buf[self.pos..].starts_with(word).then(|| self.pos += word.len())
    }

    /// A string's raw content (between the quotes), and whether it is plain: free of escapes,
    /// so that the raw bytes are the value.
    pub fn string(&mut self) -> Option<(&'a [u8], bool)> {
        self.eat(b'"')?;
        let start = self.pos;
        let mut plain = true;
        loop {
            self.pos += special_at(&self.buf[self.pos..])?;
            match self.buf[self.pos] {
                b'"' => {
                    self.pos += 1;
                    return Some((&self.buf[start..self.pos - 1], plain));
                }
                b'\\' => {
                    plain = false;
                    match self.buf.get(self.pos + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.pos += 2,
                        b'u' => {
                            let hex = self.buf.get(self.pos + 2..self.pos + 6)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.pos += 6;
                        }
                        _ => return None,
                    }
                }
                // A control character.
                _ => return None,
            }
        }
    }

    /// A string without escapes, or `null`.
    pub fn optional_str(&mut self) -> Option<Option<&'a str>> {
        if self.peek()? == b'n' {
            return self.null().map(|()| None);
        }
        match self.string()? {
            (raw, true) => std::str::from_utf8(raw).ok().map(Some),
            (_, false) => None,
        }
    }

    /// `true`, `false` or `null`.
    pub fn optional_bool(&mut self) -> Option<Option<bool>> {
        match self.peek()? {
            b't' => self.literal(b"true").map(|()| Some(true)),
            b'f' => self.literal(b"false").map(|()| Some(false)),
            b'n' => self.null().map(|()| None),
            _ => None,
        }
    }

    /// A plain non-negative integer that fits a `u64`, or `null`.
    pub fn optional_u64(&mut self) -> Option<Option<u64>> {
        if self.peek()? == b'n' {
            return self.null().map(|()| None);
        }
        let start = self.pos;
        if !self.peek()?.is_ascii_digit() || self.digits() > 1 && self.buf[start] == b'0' {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.peek() {
            return None;
        }
        let mut value = 0u64;
        for &digit in &self.buf[start..self.pos] {
            value = value.checked_mul(10)?.checked_add(u64::from(digit - b'0'))?;
        }
        Some(Some(value))
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Option<()> {
        let _ = self.eat(b'-');
        match self.peek()? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.eat(b'.').is_some() && self.digits() == 0 {
            return None;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    /// Any value, checked and passed over. `depth` counts the objects and arrays around it.
    pub fn skip_value(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(depth, |scanner, _, _| scanner.skip_value(depth + 1)),
            b'[' => self.array(depth),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn array(&mut self, depth: u32) -> Option<()> {
        self.sequence(depth, b'[', b']', |scanner| scanner.skip_value(depth + 1))
    }

    /// An object, handing each member's raw key (and whether it is plain) to `member`, which
    /// must consume the value. `depth` counts the objects and arrays around this one.
    pub fn object(
        &mut self,
        depth: u32,
        mut member: impl FnMut(&mut Self, &'a [u8], bool) -> Option<()>,
    ) -> Option<()> {
        self.sequence(depth, b'{', b'}', |scanner| {
            let (key, plain) = scanner.string()?;
            scanner.ws();
            scanner.eat(b':')?;
            scanner.ws();
            member(scanner, key, plain)
        })
    }

    /// `open`, items separated by commas (no trailing one), `close`: the shape of arrays and
    /// objects. `item` consumes one item.
    fn sequence(
        &mut self,
        depth: u32,
        open: u8,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        if depth >= MAX_DEPTH {
            return None;
        }
        self.eat(open)?;
        self.ws();
        if self.eat(close).is_some() {
            return Some(());
        }
        loop {
            item(self)?;
            self.ws();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.ws();
                }
                byte if byte == close => {
                    self.pos += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }
}

/// A field name serde's derive would match byte for byte: no escapes, and ASCII, so its UTF-8
/// needs no check.
pub fn plain_name(key: &[u8], plain: bool) -> Option<&[u8]> {
    (plain && key.is_ascii()).then_some(key)
}

/// The offset of the first `"`, `\` or control character, eight bytes at a time.
fn special_at(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    let whole = bytes.len() - tail.len();
    for (index, word) in words.enumerate() {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(word);
        let word = u64::from_le_bytes(eight);
        let quote = word ^ (ONES * u64::from(b'"'));
        let backslash = word ^ (ONES * u64::from(b'\\'));
        // Per byte: zero after the xor, or below 0x20. The lowest flagged byte is exact (a borrow
        // only flags bytes above a true hit), and only the lowest is used.
        let hits = ((quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (word.wrapping_sub(ONES * 0x20) & !word))
            & HIGH;
        if hits != 0 {
            return Some(index * 8 + hits.trailing_zeros() as usize / 8);
        }
    }
    tail.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20).map(|at| whole + at)
}

#[cfg(test)]
pub(crate) mod generate {
    //! Random JSON-ish documents for holding the scanner to serde_json's answers.

    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Self(seed | 1)
        }

        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        pub fn pick<'t>(&mut self, items: &[&'t str]) -> &'t str {
            items[self.below(items.len())]
        }
    }

    /// Field names the readers look for, their look-alikes, and others.
    const KEYS: &[&str] = &[
        "model",
        "stream",
        "stream_options",
        "include_usage",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "prompt_tokens",
        "completion_tokens",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "messages",
        "content",
        "mod\\u0065l",
        "Model",
        "modèle",
        "",
    ];

    fn ws(rng: &mut Rng, out: &mut String) {
        if rng.below(4) == 0 {
            out.push_str(rng.pick(&[" ", "\n", "\t ", "\r\n  "]));
        }
    }

    fn string(rng: &mut Rng, out: &mut String) {
        out.push('"');
        for _ in 0..rng.below(6) {
            out.push_str(rng.pick(&[
                "hi", "gpt-4o", "é", "\\n", "\\\"", "\\u00e9", "\\ud83d", "\\/", "CANARY", " ", "\u{1}", "\\x",
                "\\u12", "日本",
            ]));
        }
        out.push('"');
    }

    fn number(rng: &mut Rng, out: &mut String) {
        out.push_str(rng.pick(&[
            "0",
            "7",
            "128",
            "-3",
            "1.5",
            "2e10",
            "-0.0E-1",
            "18446744073709551615",
            "18446744073709551616",
            "01",
            "1.",
            "-",
            "1e",
            "1e+",
            "00",
        ]));
    }

    pub fn value(rng: &mut Rng, out: &mut String, depth: usize) {
        match rng.below(if depth > 3 { 4 } else { 7 }) {
            0 => string(rng, out),
            1 => number(rng, out),
            2 => out.push_str(rng.pick(&["true", "false", "null", "tru", "nul"])),
            3 => number(rng, out),
            4 => object(rng, out, depth + 1),
            5 => {
                out.push('[');
                for i in 0..rng.below(4) {
                    if i > 0 {
                        out.push(',');
                    }
                    ws(rng, out);
                    value(rng, out, depth + 1);
                    ws(rng, out);
                }
                out.push(']');
            }
            _ => string(rng, out),
        }
    }

    /// An object whose members are mostly the wanted fields with plausible values.
    pub fn object(rng: &mut Rng, out: &mut String, depth: usize) {
        out.push('{');
        for i in 0..rng.below(6) {
            if i > 0 {
                out.push(',');
            }
            ws(rng, out);
            let key = rng.pick(KEYS);
            out.push('"');
            out.push_str(key);
            out.push('"');
            ws(rng, out);
            out.push(':');
            ws(rng, out);
            match (key, rng.below(3)) {
                (_, 0) => value(rng, out, depth),
                ("model", _) => string(rng, out),
                ("stream" | "include_usage", _) => out.push_str(rng.pick(&["true", "false", "null"])),
                ("stream_options", _) => object(rng, out, depth + 1),
                (name, _) if name.ends_with("tokens") => number(rng, out),
                _ => value(rng, out, depth),
            }
            ws(rng, out);
        }
        out.push('}');
    }

    /// 20,000 documents from `seed`, each with its round: generated by `top` (an object or any
    /// value), and every other one mutated.
    pub fn documents(seed: u64, top: fn(&mut Rng, &mut String, usize)) -> impl Iterator<Item = (usize, Vec<u8>)> {
        let mut rng = Rng::new(seed);
        (0..20_000).map(move |round| {
            let mut doc = String::new();
            top(&mut rng, &mut doc, 0);
            (round, if round % 2 == 0 { doc.into_bytes() } else { mutate(&mut rng, &doc) })
        })
    }

    /// Up to three random edits: a byte dropped, inserted or the end cut off.
    pub fn mutate(rng: &mut Rng, doc: &str) -> Vec<u8> {
        let mut bytes = doc.as_bytes().to_vec();
        for _ in 0..=rng.below(3) {
            if bytes.is_empty() {
                break;
            }
            let at = rng.below(bytes.len());
            match rng.below(3) {
                0 => {
                    bytes.remove(at);
                }
                1 => bytes.insert(at, b"{}[]\":,\\0129.e-tnu \n\x01\xff"[rng.below(22)]),
                _ => bytes.truncate(at),
            }
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::generate;
    use super::*;

    fn skips_whole(doc: &[u8]) -> bool {
        let mut scanner = Scanner::new(doc);
        scanner.ws();
        scanner.skip_value(0).is_some() && scanner.at_end()
    }

    #[test]
    fn accepts_only_what_serde_json_accepts() {
        let mut accepted = 0;
        for (_, bytes) in generate::documents(0x5eed_0001, generate::value) {
            if skips_whole(&bytes) {
                accepted += 1;
                let serde = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes);
                assert!(
                    serde.is_ok(),
                    "scanner accepted what serde_json refuses: {:?}",
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
        assert!(accepted > 5_000, "the scanner accepted only {accepted} documents");
    }

    #[test]
    fn strings_and_numbers() {
        for good in [
            r#""""#,
            r#""a\"b\\c\/\b\f\n\r\t\u00E9""#,
            r#""a long string without anything special in it at all""#,
            "0",
            "-0",
            "12.5e-3",
            "1E+2",
            r#"[1, {"a": [true, false, null]}, "x"]"#,
            " {} ",
        ] {
            assert!(skips_whole(good.as_bytes()), "{good}");
        }
        for bad in [
            r#""abc"#,
            "\"a\u{1}b\"",
            r#""\x""#,
            r#""\u12g4""#,
            "01",
            "1.",
            "-",
            "1e",
            "[1,]",
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            "[1 2]",
            "tru",
            "{} x",
            // Form feed and vertical tab are not JSON whitespace.
            "\u{c}{}",
            "[1,\u{b}2]",
        ] {
            assert!(!skips_whole(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn special_bytes_are_found_in_every_position() {
        // Fillers next to the special bytes' values, so a borrow or a near miss would show.
        for filler in [b'a', 0x20, 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xa2, 0xdc, 0xff] {
            for len in 0..40 {
                for at in 0..len {
                    for special in [b'"', b'\\', 0x00, 0x01, 0x1f] {
                        let mut bytes = vec![filler; len];
                        bytes[at] = special;
                        // A later special byte must not win.
                        if at + 1 < len {
                            bytes[len - 1] = b'"';
                        }
                        assert_eq!(special_at(&bytes), Some(at), "filler {filler} len {len} at {at} byte {special}");
                    }
                }
                assert_eq!(special_at(&vec![filler; len]), None, "filler {filler} len {len}");
            }
        }
    }

    #[test]
    fn nesting_beyond_the_limit_is_left_to_serde() {
        let deep = format!("{}{}", "[".repeat(70), "]".repeat(70));
        assert!(!skips_whole(deep.as_bytes()));
        let fine = format!("{}{}", "[".repeat(60), "]".repeat(60));
        assert!(skips_whole(fine.as_bytes()));
    }
}
