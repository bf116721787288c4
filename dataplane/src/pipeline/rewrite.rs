//! The request body as the provider must see it when the gateway changes it: the model renamed
//! to the provider's, or `stream_options.include_usage` asked for so that a stream is metered on
//! the provider's counts.
//!
//! The body is streamed through serde_json member by member and written out as it is read:
//! the members the gateway changes are written anew, every other one is copied byte for byte in
//! its place (a [`RawValue`] borrows the input; nothing inside it is parsed into values). So a
//! rewrite holds one copy of the body, at most [`MAX_GROWTH`] longer (which the body budget
//! counts), and while reading it serde_json's own skipping stack, a byte per level of nesting,
//! as when the request head is read. Building a `serde_json::Value` instead cost 32 bytes or
//! more per element (a 4 MiB body of `0,` ran to 72 MiB), none of it counted, and sorted the
//! members. A client's order and formatting reach the provider unchanged.
//!
//! Member names are compared as serde_json reads them (escapes decoded), as the request head
//! is read ([`crate::api::RequestHead`]); a repeated member is changed wherever it appears, so
//! whichever one a provider's parser keeps carries the change. (The request head refuses a
//! repeated `model`, `stream` or `stream_options`; another repeated member is passed on
//! repeated, as the body would be without a rewrite.) What serde_json passes over without
//! building it is passed on as it came, as without a rewrite: a lone surrogate escape, a number
//! beyond `f64`, nesting deeper than its recursion limit.

use std::borrow::Cow;
use std::fmt;

use portcullis_crds::v1alpha1::bounds;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The most a rewrite adds to a body: the provider's model name (at most
/// [`bounds::MODEL_NAME_LEN`] bytes, six each once escaped, as a member of its own when the body
/// had none), and `,"stream_options":{"include_usage":true}`. Member names are never longer
/// encoded again (what JSON makes a client escape is escaped as briefly or more), and whitespace
/// between members is dropped.
pub const MAX_GROWTH: usize = 2048;

const _: () = assert!(
    MAX_GROWTH
        >= r#","model":"#.len() + 2 + 6 * bounds::MODEL_NAME_LEN + r#","stream_options":{"include_usage":true}"#.len()
);

/// What the gateway changes in a body.
#[derive(Debug, Clone, Copy)]
pub struct Changes<'c> {
    /// The model the provider knows the requested one by.
    pub model: Option<&'c str>,
    /// Set `stream_options.include_usage` to `true`.
    pub include_usage: bool,
}

/// The body with `changes` made. Fails when the body is not one JSON object (the message names a
/// position and what was expected, never the input).
pub fn rewrite(body: &[u8], changes: Changes<'_>) -> Result<Vec<u8>, serde_json::Error> {
    let room = changes.model.map_or(0, |model| model.len() + 16) + if changes.include_usage { 48 } else { 0 };
    let mut out = Vec::with_capacity(body.len() + room);
    let mut reader = serde_json::Deserializer::from_slice(body);
    Object { out: &mut out, kind: ObjectKind::Request(changes) }.deserialize(&mut reader)?;
    reader.end()?;
    Ok(out)
}

/// `"include_usage":true`, the member the gateway adds to `stream_options`.
const INCLUDE_USAGE: &[u8] = br#""include_usage":true"#;

#[derive(Clone, Copy)]
enum ObjectKind<'c> {
    /// The request itself.
    Request(Changes<'c>),
    /// Its `stream_options`, given `include_usage: true`.
    StreamOptions,
}

/// An object written out member by member into `out` as it is read.
struct Object<'o, 'c> {
    out: &'o mut Vec<u8>,
    kind: ObjectKind<'c>,
}

impl<'de> DeserializeSeed<'de> for Object<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Object<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Self { out, kind } = self;
        out.push(b'{');
        let (mut first, mut model_seen, mut options_seen) = (true, false, false);
        while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            serde_json::to_writer(&mut *out, &*name).map_err(serde::de::Error::custom)?;
            out.push(b':');
            match (kind, &*name) {
                (ObjectKind::Request(Changes { model: Some(model), .. }), "model") => {
                    // Read as any other value is, so a body is held to the same rules whichever
                    // members it holds (a raw value's bytes are UTF-8).
                    map.next_value::<&'de RawValue>()?;
                    serde_json::to_writer(&mut *out, model).map_err(serde::de::Error::custom)?;
                    model_seen = true;
                }
                (ObjectKind::Request(Changes { include_usage: true, .. }), "stream_options") => {
                    let options = map.next_value::<&'de RawValue>()?;
                    if options.get().starts_with('{') {
                        let mut reader = serde_json::Deserializer::from_str(options.get());
                        Object { out: &mut *out, kind: ObjectKind::StreamOptions }
                            .deserialize(&mut reader)
                            .map_err(serde::de::Error::custom)?;
                    } else {
                        // `null` (or anything else that is not an object, which the provider
                        // would not read usage from either): without the option the provider
                        // sends no usage, and the stream would be metered on estimates.
                        out.push(b'{');
                        out.extend_from_slice(INCLUDE_USAGE);
                        out.push(b'}');
                    }
                    options_seen = true;
                }
                (ObjectKind::StreamOptions, "include_usage") => {
                    map.next_value::<&'de RawValue>()?;
                    out.extend_from_slice(b"true");
                    options_seen = true;
                }
                _ => out.extend_from_slice(map.next_value::<&'de RawValue>()?.get().as_bytes()),
            }
        }
        // What was asked for and not found is added at the end.
        let mut add = |member: &[u8], out: &mut Vec<u8>| {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            out.extend_from_slice(member);
        };
        match kind {
            ObjectKind::Request(changes) => {
                if let (Some(model), false) = (changes.model, model_seen) {
                    let mut member = br#""model":"#.to_vec();
                    serde_json::to_writer(&mut member, model).map_err(serde::de::Error::custom)?;
                    add(&member, out);
                }
                if changes.include_usage && !options_seen {
                    add(br#""stream_options":{"include_usage":true}"#, out);
                }
            }
            ObjectKind::StreamOptions if !options_seen => add(INCLUDE_USAGE, out),
            ObjectKind::StreamOptions => {}
        }
        out.push(b'}');
        Ok(())
    }
}

/// A member's name, borrowed from the body unless it holds escapes.
struct Name<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> Visitor<'de> for Text {
            type Value = Name<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }

            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map, Value};

    use super::*;

    /// What the gateway built before: the body as a map, changed, encoded again.
    fn through_a_map(body: &[u8], changes: Changes<'_>) -> Option<Value> {
        let mut object: Map<String, Value> = serde_json::from_slice(body).ok()?;
        if let Some(model) = changes.model {
            object.insert("model".to_owned(), Value::String(model.to_owned()));
        }
        if changes.include_usage {
            let options = object.entry("stream_options").or_insert(Value::Null);
            if !options.is_object() {
                *options = Value::Object(Map::new());
            }
            options.as_object_mut()?.insert("include_usage".to_owned(), Value::Bool(true));
        }
        Some(Value::Object(object))
    }

    fn rewritten(body: &str, model: Option<&str>, include_usage: bool) -> String {
        String::from_utf8(rewrite(body.as_bytes(), Changes { model, include_usage }).unwrap()).unwrap()
    }

    #[test]
    fn only_the_changed_members_are_written_anew() {
        let body = r#"{ "model" : "gpt-4o",  "messages":[ {"role":"user","content":"say \"hi\"\n"} ], "stream":true }"#;
        assert_eq!(
            rewritten(body, Some("gpt-4o-2024-08-06"), true),
            r#"{"model":"gpt-4o-2024-08-06","messages":[ {"role":"user","content":"say \"hi\"\n"} ],"stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(
            rewritten(body, None, true),
            r#"{"model":"gpt-4o","messages":[ {"role":"user","content":"say \"hi\"\n"} ],"stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(
            rewritten(body, Some("a\"b"), false),
            r#"{"model":"a\"b","messages":[ {"role":"user","content":"say \"hi\"\n"} ],"stream":true}"#
        );
    }

    #[test]
    fn stream_options_keep_their_other_members_and_ask_for_usage() {
        for (options, expected) in [
            (r#"{"include_usage":false,"x":[1]}"#, r#"{"include_usage":true,"x":[1]}"#),
            (r#"{"x":{"y":null}}"#, r#"{"x":{"y":null},"include_usage":true}"#),
            (r#"{"include_usage":null}"#, r#"{"include_usage":true}"#),
            ("{}", r#"{"include_usage":true}"#),
            ("{ }", r#"{"include_usage":true}"#),
            ("null", r#"{"include_usage":true}"#),
            ("[false]", r#"{"include_usage":true}"#),
            (r#""yes""#, r#"{"include_usage":true}"#),
        ] {
            let body = format!(r#"{{"stream_options":{options},"model":"m","stream":true}}"#);
            assert_eq!(
                rewritten(&body, None, true),
                format!(r#"{{"stream_options":{expected},"model":"m","stream":true}}"#),
                "{options}"
            );
        }
    }

    /// The longest provider model name, every byte a control character, added to a body that
    /// named none, with usage asked for: the most a rewrite adds, within [`MAX_GROWTH`].
    #[test]
    fn a_rewrite_grows_a_body_by_at_most_its_bound() {
        let model = "\u{1}".repeat(bounds::MODEL_NAME_LEN);
        for body in [r#"{"stream":true}"#, r#"{"model":"x","stream":true}"#, r#"{"stream_options":null}"#] {
            let out = rewrite(body.as_bytes(), Changes { model: Some(&model), include_usage: true }).unwrap();
            assert!(out.len() <= body.len() + MAX_GROWTH, "{body}: {} more", out.len() - body.len());
            assert_eq!(serde_json::from_slice::<Value>(&out).unwrap()["model"], model.as_str());
        }
    }

    /// Names are read as serde_json reads them: an escaped `model` is the model.
    #[test]
    fn escaped_names_are_the_names_they_spell() {
        assert_eq!(
            rewritten(r#"{"mod\u0065l":"a","stream\u005foptions":{"include\u005fusage":false}}"#, Some("b"), true),
            r#"{"model":"b","stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn anything_but_one_object_is_refused() {
        for body in [&b""[..], b"[]", b"\"x\"", b"{} {}", b"{\"model\":}", b"{\"a\":1,}", b"{\"a\":\"\xff\"}"] {
            let refused = rewrite(body, Changes { model: Some("m"), include_usage: true });
            assert!(refused.is_err(), "{:?}", String::from_utf8_lossy(body));
        }
    }

    /// The rewritten body reads as the map-built one did, on generated and mutated documents;
    /// what the map refused is refused here too, but for what serde_json itself passes over.
    #[test]
    fn the_rewrite_reads_as_the_map_built_body() {
        use crate::json_scan::generate;
        let mut rewrote = 0;
        for (round, bytes) in generate::documents(0x5eed_0003, generate::object) {
            let changes = Changes { model: [None, Some("up-model")][round % 2], include_usage: round % 3 != 0 };
            let shown = String::from_utf8_lossy(&bytes);
            match (through_a_map(&bytes, changes), rewrite(&bytes, changes).ok()) {
                (Some(expected), Some(out)) => {
                    assert_eq!(serde_json::from_slice::<Value>(&out).ok(), Some(expected), "{shown}");
                    rewrote += 1;
                }
                (None, None) => {}
                (Some(_), None) => panic!("an object serde_json reads was refused: {shown}"),
                // What serde_json passes over but refuses in a value it builds (a lone surrogate
                // escape, a number beyond `f64`): passed on, as when it reads the request head
                // and the body goes unchanged, and the rewrite is still JSON.
                (None, Some(out)) => {
                    assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok(), "{shown}");
                    serde_json::from_slice::<serde::de::IgnoredAny>(&out).unwrap();
                }
            }
        }
        assert!(rewrote > 3_000, "only {rewrote} documents were objects serde_json read");
    }

    /// A body of many small values is copied, not expanded: the rewrite is the body's size plus
    /// the members changed.
    #[test]
    fn a_body_of_many_small_values_is_copied_not_expanded() {
        let mut body = br#"{"model":"m","stream":true,"messages":["#.to_vec();
        for _ in 0..500_000 {
            body.extend_from_slice(b"0,");
        }
        body.extend_from_slice(b"0]}");
        let out = rewrite(&body, Changes { model: Some("mm"), include_usage: true }).unwrap();
        assert_eq!(out.len(), body.len() + 1 + r#","stream_options":{"include_usage":true}"#.len());
        // Written into the room reserved at the start: never grown (doubling) on the way.
        assert!(out.capacity() <= body.len() + 128, "{} for {}", out.capacity(), body.len());
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap()["stream_options"], json!({"include_usage": true}));
    }
}
