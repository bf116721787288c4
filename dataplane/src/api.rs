//! The client-facing API surface: which routes exist, which format each speaks, and what the
//! gateway reads from a request body (only routing metadata, never content).

use std::borrow::Cow;

use http::header::HeaderName;
use http::{HeaderValue, Method};
use serde::Deserialize;

use crate::error::GatewayError;

/// The longest model name a request may ask for: the longest the CRDs let a model be named.
pub const MODEL_LEN: usize = portcullis_crds::v1alpha1::bounds::MODEL_NAME_LEN;
use crate::fields::HeaderFields;
use crate::json_scan::{plain_name, Scanner};

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The error and authentication conventions of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiFlavor {
    OpenAi,
    Anthropic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiRoute {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Models,
    Messages,
}

impl ApiRoute {
    pub const ALL: [ApiRoute; 6] = [
        ApiRoute::ChatCompletions,
        ApiRoute::Completions,
        ApiRoute::Embeddings,
        ApiRoute::Responses,
        ApiRoute::Models,
        ApiRoute::Messages,
    ];

    /// Position in `ALL`, for per-route tables.
    pub fn index(self) -> usize {
        match self {
            ApiRoute::ChatCompletions => 0,
            ApiRoute::Completions => 1,
            ApiRoute::Embeddings => 2,
            ApiRoute::Responses => 3,
            ApiRoute::Models => 4,
            ApiRoute::Messages => 5,
        }
    }

    /// Classifies a request. Unknown paths and wrong methods are errors in the flavor the path
    /// suggests.
    pub fn classify(method: &Method, path: &str) -> Result<ApiRoute, (ApiFlavor, GatewayError)> {
        let path = path.strip_suffix('/').unwrap_or(path);
        let route = match path {
            "/v1/chat/completions" => ApiRoute::ChatCompletions,
            "/v1/completions" => ApiRoute::Completions,
            "/v1/embeddings" => ApiRoute::Embeddings,
            "/v1/responses" => ApiRoute::Responses,
            "/v1/models" => ApiRoute::Models,
            "/v1/messages" => ApiRoute::Messages,
            _ => return Err((ApiFlavor::OpenAi, GatewayError::RouteNotFound)),
        };
        let expected = if route == ApiRoute::Models { Method::GET } else { Method::POST };
        if method != expected {
            return Err((route.flavor(), GatewayError::MethodNotAllowed));
        }
        Ok(route)
    }

    pub fn flavor(self) -> ApiFlavor {
        match self {
            ApiRoute::Messages => ApiFlavor::Anthropic,
            ApiRoute::ChatCompletions
            | ApiRoute::Completions
            | ApiRoute::Embeddings
            | ApiRoute::Responses
            | ApiRoute::Models => ApiFlavor::OpenAi,
        }
    }

    /// Path below the provider's base URL (which carries the `/v1` prefix).
    pub fn upstream_suffix(self) -> &'static str {
        match self {
            ApiRoute::ChatCompletions => "/chat/completions",
            ApiRoute::Completions => "/completions",
            ApiRoute::Embeddings => "/embeddings",
            ApiRoute::Responses => "/responses",
            ApiRoute::Models => "/models",
            ApiRoute::Messages => "/messages",
        }
    }

    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            ApiRoute::ChatCompletions => "chat_completions",
            ApiRoute::Completions => "completions",
            ApiRoute::Embeddings => "embeddings",
            ApiRoute::Responses => "responses",
            ApiRoute::Models => "models",
            ApiRoute::Messages => "messages",
        }
    }

    /// OpenTelemetry `gen_ai.operation.name`.
    pub fn operation_name(self) -> &'static str {
        match self {
            ApiRoute::ChatCompletions | ApiRoute::Messages => "chat",
            ApiRoute::Completions => "text_completion",
            ApiRoute::Embeddings => "embeddings",
            ApiRoute::Responses => "generate_content",
            ApiRoute::Models => "list_models",
        }
    }
}

/// The routing metadata of a request body. Everything else in the body is skipped unread.
#[derive(Debug, Default, PartialEq, Deserialize)]
pub struct RequestHead<'a> {
    /// Borrowed from the body unless it holds escapes (serde's own `Option<Cow<str>>` always
    /// copies).
    #[serde(borrow, default, deserialize_with = "borrowed_str")]
    pub model: Option<Cow<'a, str>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Output caps, for reserving tokens against limits (OpenAI chat, newer OpenAI, Responses
    /// API; Anthropic uses `max_tokens`).
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
}

fn borrowed_str<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct Text;
    impl<'de> serde::de::Visitor<'de> for Text {
        type Value = Option<Cow<'de, str>>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string or null")
        }

        fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }
    deserializer.deserialize_option(Text)
}

#[derive(Debug, Default, PartialEq, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

impl<'a> RequestHead<'a> {
    pub fn parse(body: &'a [u8]) -> Result<Self, GatewayError> {
        if body.is_empty() {
            return Err(GatewayError::InvalidRequest(
                "The request body is empty; a JSON object is required.".to_owned(),
            ));
        }
        if let Some(head) = Self::scan(body) {
            return Ok(head);
        }
        serde_json::from_slice(body).map_err(|e| {
            // serde_json's messages name positions and expected types, never the input text.
            GatewayError::InvalidRequest(format!(
                "The request body is not a valid JSON object: {}",
                classify_json_error(&e)
            ))
        })
    }

    /// The common shape read without serde_json's visitors; `None` leaves the body to
    /// serde_json (see [`crate::json_scan`]), which has the last word on anything unusual.
    fn scan(body: &'a [u8]) -> Option<Self> {
        const MODEL: u8 = 1;
        const STREAM: u8 = 2;
        const STREAM_OPTIONS: u8 = 4;
        const MAX_TOKENS: u8 = 8;
        const MAX_COMPLETION_TOKENS: u8 = 16;
        const MAX_OUTPUT_TOKENS: u8 = 32;
        let mut head = RequestHead::default();
        let mut seen = 0u8;
        let mut scanner = Scanner::new(body);
        scanner.ws();
        scanner.object(0, |scanner, key, plain| {
            let field = match plain_name(key, plain)? {
                b"model" => MODEL,
                b"stream" => STREAM,
                b"stream_options" => STREAM_OPTIONS,
                b"max_tokens" => MAX_TOKENS,
                b"max_completion_tokens" => MAX_COMPLETION_TOKENS,
                b"max_output_tokens" => MAX_OUTPUT_TOKENS,
                _ => return scanner.skip_value(1),
            };
            // serde's derive refuses a repeated field.
            if seen & field != 0 {
                return None;
            }
            seen |= field;
            match field {
                MODEL => head.model = scanner.optional_str()?.map(Cow::Borrowed),
                STREAM => head.stream = scanner.optional_bool()?,
                STREAM_OPTIONS => head.stream_options = StreamOptions::scan(scanner)?,
                MAX_TOKENS => head.max_tokens = scanner.optional_u64()?,
                MAX_COMPLETION_TOKENS => head.max_completion_tokens = scanner.optional_u64()?,
                _ => head.max_output_tokens = scanner.optional_u64()?,
            }
            Some(())
        })?;
        scanner.at_end().then_some(head)
    }

    /// The model asked for, at most [`MODEL_LEN`] bytes. Every model pattern in the snapshot
    /// (routes, kill switches, the key's `allowedModels`) is matched against it before any limit
    /// is spent, each in time proportional to the name's length: a name as long as the body
    /// would cost seconds.
    pub fn model(&self) -> Result<&str, GatewayError> {
        match self.model.as_deref() {
            Some(m) if m.len() > MODEL_LEN => Err(GatewayError::InvalidRequest(format!(
                "The `model` field must be at most {MODEL_LEN} bytes; no model has a longer name."
            ))),
            Some(m) if !m.is_empty() => Ok(m),
            _ => Err(GatewayError::InvalidRequest("The `model` field is required.".to_owned())),
        }
    }

    pub fn streaming(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// The output cap the client asked for, if any, at most [`MAX_TOKEN_COUNT`].
    ///
    /// [`MAX_TOKEN_COUNT`]: crate::limits::MAX_TOKEN_COUNT
    pub fn output_cap(&self) -> Option<u64> {
        let cap = self.max_completion_tokens.or(self.max_output_tokens).or(self.max_tokens)?;
        Some(cap.min(crate::limits::MAX_TOKEN_COUNT))
    }

    pub fn client_wants_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false)
    }
}

impl StreamOptions {
    /// `null` or an object (serde would also take an array; that is left to it).
    fn scan(scanner: &mut Scanner<'_>) -> Option<Option<Self>> {
        if scanner.peek()? == b'n' {
            return scanner.null().map(|()| None);
        }
        let mut include_usage = None;
        let mut seen = false;
        scanner.object(1, |scanner, key, plain| {
            if plain_name(key, plain)? != b"include_usage" {
                return scanner.skip_value(2);
            }
            if std::mem::replace(&mut seen, true) {
                return None;
            }
            include_usage = scanner.optional_bool()?;
            Some(())
        })?;
        Some(Some(StreamOptions { include_usage }))
    }
}

fn classify_json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "read error",
        Category::Syntax => "syntax error",
        Category::Data => "unexpected type for `model`, `stream`, `stream_options` or a `max_*tokens` field",
        Category::Eof => "unexpected end of input",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

/// The client's key from `Authorization: Bearer` or `x-api-key`.
pub fn presented_key(headers: &impl HeaderFields) -> Option<&[u8]> {
    if let Some(bytes) = headers.first("authorization") {
        let prefix = b"Bearer ";
        if bytes.len() > prefix.len() && bytes[..prefix.len()].eq_ignore_ascii_case(prefix) {
            return Some(bytes[prefix.len()..].trim_ascii());
        }
    }
    headers.first("x-api-key").map(<[u8]>::trim_ascii)
}

/// The client's request id if it is a sane token, otherwise a fresh one.
pub fn request_id(headers: &impl HeaderFields) -> HeaderValue {
    if let Some(bytes) = headers.first("x-request-id") {
        let sane = !bytes.is_empty()
            && bytes.len() <= 128
            && bytes.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b));
        if let Some(value) = headers.shared("x-request-id").filter(|_| sane) {
            return value;
        }
    }
    // `req_` and 32 hex digits, formatted on the stack and then owned by the value: one
    // allocation, and clones (the access record keeps one) only count references; a value
    // copied from a slice is allocated again when first cloned.
    let mut id = *b"req_00000000000000000000000000000000";
    if hex::encode_to_slice(fastrand::u128(..).to_be_bytes(), &mut id[4..]).is_err() {
        return HeaderValue::from_static("req_unknown");
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(id))
        .unwrap_or_else(|_| HeaderValue::from_static("req_unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_is_borrowed_from_the_body_unless_it_holds_escapes() {
        let head = RequestHead::parse(br#"{"messages":[],"model":"gpt-4o"}"#).expect("parse");
        assert!(matches!(head.model, Some(Cow::Borrowed("gpt-4o"))), "{:?}", head.model);
        let head = RequestHead::parse(br#"{"model":"gpt\u002d4o"}"#).expect("parse");
        assert!(matches!(&head.model, Some(Cow::Owned(m)) if m == "gpt-4o"), "{:?}", head.model);
        assert_eq!(RequestHead::parse(br#"{"model":null}"#).expect("parse").model, None);
        assert_eq!(RequestHead::parse(br#"{"stream":true}"#).expect("parse").model, None);
        let refused = RequestHead::parse(br#"{"model":7}"#).expect_err("a number is not a model");
        assert!(
            matches!(&refused, GatewayError::InvalidRequest(message) if message.contains("unexpected type")),
            "{refused:?}"
        );
    }

    #[test]
    fn routes_and_methods() {
        assert_eq!(ApiRoute::classify(&Method::POST, "/v1/chat/completions"), Ok(ApiRoute::ChatCompletions));
        assert_eq!(ApiRoute::classify(&Method::GET, "/v1/models/"), Ok(ApiRoute::Models));
        assert_eq!(
            ApiRoute::classify(&Method::GET, "/v1/messages"),
            Err((ApiFlavor::Anthropic, GatewayError::MethodNotAllowed))
        );
        assert!(ApiRoute::classify(&Method::POST, "/v2/x").is_err());
    }

    /// What the scanner answers serde_json answers the same; the common shapes are answered.
    #[test]
    fn the_scanned_head_is_serde_jsons() {
        use crate::json_scan::generate;
        let (mut parsed, mut scanned) = (0, 0);
        for (_, bytes) in generate::documents(0x5eed_0002, generate::object) {
            let serde = serde_json::from_slice::<RequestHead>(&bytes);
            parsed += usize::from(serde.is_ok());
            if let Some(head) = RequestHead::scan(&bytes) {
                scanned += 1;
                assert_eq!(serde.as_ref().ok(), Some(&head), "{:?}: {serde:?}", String::from_utf8_lossy(&bytes));
            }
        }
        // Those left to serde_json hold escapes in names or the model, or repeat a field.
        assert!(scanned * 10 > parsed * 7, "{scanned} of {parsed} documents serde_json parsed were scanned");

        for common in [
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"say \"hi\"\n"}]}"#,
            r#"{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true}, "temperature": 0.7, "max_completion_tokens": 256}"#,
            r#"{"max_tokens":1024,"messages":[{"role":"user","content":[{"type":"text","text":"日本"}]}],"model":"claude-sonnet-4-5","stream":false}"#,
            r#"{"model":"gpt-4.1","input":"hi","max_output_tokens":null,"tools":[{"type":"function","parameters":{"type":"object"}}]}"#,
        ] {
            let head = RequestHead::scan(common.as_bytes()).expect(common);
            assert_eq!(Ok(&head), serde_json::from_slice::<RequestHead>(common.as_bytes()).as_ref().map_err(drop));
        }
        for unusual in [
            r#"{"model":"gpt\u002d4o"}"#,
            r#"{"model":"a","model":"b"}"#,
            r#"{"mod\u0065l":"gpt-4o"}"#,
            r#"{"max_tokens":1.0}"#,
            r#"{"max_tokens":18446744073709551616}"#,
            r#"{"stream_options":[true]}"#,
            r#"["gpt-4o"]"#,
        ] {
            assert_eq!(RequestHead::scan(unusual.as_bytes()), None, "{unusual}");
        }
    }

    /// A client's cap is read as at most `MAX_TOKEN_COUNT`: 1e17 would reach Redis's Lua as a
    /// float it refuses.
    #[test]
    fn an_absurd_output_cap_is_read_as_the_largest_count() {
        let huge = RequestHead::scan(br#"{"model":"m","max_tokens":100000000000000000}"#).expect("scanned");
        assert_eq!(huge.output_cap(), Some(crate::limits::MAX_TOKEN_COUNT));
        let max = RequestHead::scan(br#"{"model":"m","max_completion_tokens":18446744073709551615}"#).expect("scanned");
        assert_eq!(max.output_cap(), Some(crate::limits::MAX_TOKEN_COUNT));
        let (_, reserved) = crate::pipeline::limit::estimate_tokens(usize::MAX, &max, 0);
        assert_eq!(reserved, u64::MAX / 4 + 1 + crate::limits::MAX_TOKEN_COUNT);
        let usual = RequestHead::scan(br#"{"model":"m","max_tokens":1024}"#).expect("scanned");
        assert_eq!(usual.output_cap(), Some(1024));
    }

    #[test]
    fn head_reads_only_routing_fields() {
        let body = br#"{"messages":[{"role":"user","content":"secret"}],"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#;
        let head = RequestHead::parse(body).expect("parse");
        assert_eq!(head.model().expect("model"), "gpt-4o");
        assert!(head.streaming());
        assert!(head.client_wants_usage());
        let err = RequestHead::parse(br#"{"model": 5, "messages": "CANARY"}"#).expect_err("bad type");
        assert!(!err.message().contains("CANARY"));
        let err = RequestHead::parse(br#"{"messages": "CANARY-unterminated"#).expect_err("eof");
        assert!(!err.message().contains("CANARY"), "{}", err.message());
        assert!(RequestHead::parse(b"{}").expect("parse").model().is_err());
    }

    /// A model name longer than any model can have is refused before a pattern sees it.
    #[test]
    fn a_model_name_is_at_most_the_longest_a_model_can_have() {
        let longest = "m".repeat(MODEL_LEN);
        let body = format!(r#"{{"model":"{longest}"}}"#);
        assert_eq!(RequestHead::parse(body.as_bytes()).expect("parse").model().expect("fits"), longest);
        let body = format!(r#"{{"model":"{longest}x"}}"#);
        let err = RequestHead::parse(body.as_bytes()).expect("parse").model().expect_err("too long");
        assert_eq!(
            err.message(),
            format!("The `model` field must be at most {MODEL_LEN} bytes; no model has a longer name.")
        );
    }

    #[test]
    fn keys_and_request_ids() {
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer abc "));
        assert_eq!(presented_key(&headers), Some(&b"abc"[..]));
        let mut headers = http::HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static("xyz"));
        assert_eq!(presented_key(&headers), Some(&b"xyz"[..]));
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&headers), "abc-123");
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static("has spaces"));
        let fresh = request_id(&headers);
        let fresh = fresh.to_str().expect("ascii");
        assert!(fresh.starts_with("req_") && fresh.len() == 36, "{fresh}");
        assert!(fresh[4..].bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{fresh}");
    }
}
