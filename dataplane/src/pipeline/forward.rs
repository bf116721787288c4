//! Phase 4: the request as the provider must see it — its URL, its auth, the upstream model name,
//! and none of the client's credentials or hop-by-hop headers.

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Method, Uri};
use portcullis_crds::v1alpha1::ProviderKind;
use smallvec::SmallVec;

use super::rewrite::Changes;
use crate::api::{ApiRoute, RequestHead};
use crate::error::GatewayError;
use crate::fields::{FieldValue, HeaderFields, ResponseFields};
use crate::snapshot::ModelRoute;
use crate::upstream::h1::{encode_fields, field_len};

/// Anthropic requires a version header; this one is used when the client sends none.
const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// Hop-by-hop fields (RFC 9110 §7.6.1), never passed on in either direction.
fn hop_by_hop(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection"
            | b"keep-alive"
            | b"proxy-authenticate"
            | b"proxy-authorization"
            | b"proxy-connection"
            | b"te"
            | b"trailer"
            | b"transfer-encoding"
            | b"upgrade"
    )
}

/// Request headers never forwarded: hop-by-hop (RFC 9110 §7.6.1), the client's credentials, and
/// headers that would let a client steer the provider account or leak its own address.
/// A `match` on the lowercase name: no table walk, no string compares against every entry.
fn stripped_request_header(name: &[u8]) -> bool {
    hop_by_hop(name)
        || matches!(
            name,
            b"host"
            | b"content-length"
            | b"authorization"
            | b"x-api-key"
            | b"api-key"
            | b"cookie"
            | b"openai-organization"
            | b"openai-project"
            | b"forwarded"
            | b"x-forwarded-for"
            | b"x-forwarded-host"
            | b"x-forwarded-proto"
            | b"x-real-ip"
            // The gateway sends its own.
            | b"x-request-id"
            // Metering reads the body, so it must come back uncompressed.
            | b"accept-encoding"
            // The gateway has read the whole body already and sends it with the head.
            | b"expect"
        )
}

/// Response fields never passed back: hop-by-hop (RFC 9110 §7.6.1), the framing ones (the
/// gateway frames the body itself: a dropped SSE event changes the length), and cookies.
fn stripped_response_field(name: &[u8]) -> bool {
    hop_by_hop(name)
        || matches!(
            name,
            b"set-cookie"
            | b"content-length"
            // The gateway sets it from the provider's `x-request-id`, and from nothing else.
            | b"x-upstream-request-id"
        )
}

/// Response fields whose value changes from one response to the next: request ids (the
/// gateway's, a provider's own, Cloudflare's ray), a provider's processing times, when to retry,
/// and what is left of a rate limit and when it resets (OpenAI's `x-ratelimit-remaining-*` and
/// `-reset-*`, Anthropic's `anthropic-ratelimit-*-remaining` and `-reset`). HTTP/2 sends them
/// never indexed (`super::never_index_varying`).
pub fn varies_per_response(name: &[u8]) -> bool {
    matches!(
        name,
        b"x-request-id"
            | b"x-upstream-request-id"
            | b"request-id"
            | b"cf-ray"
            | b"openai-processing-ms"
            | b"x-envoy-upstream-service-time"
            | b"retry-after"
            | b"retry-after-ms"
    ) || name.starts_with(b"x-ratelimit-remaining-")
        || name.starts_with(b"x-ratelimit-reset-")
        || (name.starts_with(b"anthropic-ratelimit-") && (name.ends_with(b"-remaining") || name.ends_with(b"-reset")))
}

/// The field names a `Connection` header lists (hop-by-hop for this message only).
fn connection_listed(fields: &impl HeaderFields) -> SmallVec<[&[u8]; 4]> {
    fields.tokens("connection").collect()
}

/// Whether `name` (lowercase) is among `listed` (as sent).
fn is_listed(listed: &[&[u8]], name: &[u8]) -> bool {
    listed.iter().any(|token| token.eq_ignore_ascii_case(name))
}

/// A provider's response fields as the client receives them, read from where they arrived
/// instead of copied into a map: the servers write them out through [`PassedFields::each`].
#[derive(Debug)]
pub struct PassedFields {
    fields: ResponseFields,
    request_id: HeaderValue,
}

impl PassedFields {
    pub fn new(fields: ResponseFields, request_id: HeaderValue) -> Self {
        Self { fields, request_id }
    }

    /// Each field passed on, in order: the provider's, minus the stripped ones and those its
    /// `Connection` field names, its `x-request-id` renamed `x-upstream-request-id`; then the
    /// gateway's `x-request-id`.
    pub fn each(&self) -> impl Iterator<Item = (&[u8], FieldValue<'_>)> {
        let listed = connection_listed(&self.fields);
        let provider = self.fields.each_value().filter_map(move |(name, value)| {
            if stripped_response_field(name) || is_listed(&listed, name) {
                return None;
            }
            Some((if name == b"x-request-id" { &b"x-upstream-request-id"[..] } else { name }, value))
        });
        provider.chain(std::iter::once((&b"x-request-id"[..], FieldValue::Map(&self.request_id))))
    }

    /// At least as many fields as [`Self::each`] passes on, counted without walking them: the
    /// provider's, and the gateway's `x-request-id`.
    pub fn max_len(&self) -> usize {
        self.fields.count() + 1
    }

    /// Appends the fields passed on to `headers` (for a server that writes a map: HTTP/2).
    pub fn append_to(&self, headers: &mut HeaderMap) {
        for (name, value) in self.each() {
            if let (Ok(name), Some(value)) = (HeaderName::from_bytes(name), value.to_header_value()) {
                headers.append(name, value);
            }
        }
    }
}

/// The outbound request and what metering must know about it.
pub struct Outbound {
    /// The request head as the provider receives it, `Content-Length` included; empty for the
    /// in-process mock provider. It holds the provider credential and is zeroized when dropped.
    pub head: zeroize::Zeroizing<Vec<u8>>,
    /// The body when the gateway rewrote it; `None` sends the client's as it came (borrowed, so
    /// the request's bytes are not shared once more).
    rewritten: Option<Bytes>,
    /// The gateway asked for OpenAI's usage chunk; the client did not and must not see it.
    pub strip_usage_chunk: bool,
}

/// Sizes only: the head holds the provider credential, the body the client's content.
impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("head_len", &self.head.len())
            .field("rewritten_len", &self.rewritten.as_ref().map(Bytes::len))
            .field("strip_usage_chunk", &self.strip_usage_chunk)
            .finish()
    }
}

impl Outbound {
    /// Whether the gateway rewrote the body (the model renamed or usage requested).
    pub fn rewrote(&self) -> bool {
        self.rewritten.is_some()
    }

    /// The body to send, given the client's.
    pub fn body<'b>(&'b self, client: &'b Bytes) -> &'b Bytes {
        self.rewritten.as_ref().unwrap_or(client)
    }
}

/// What the body sent to `chosen` changes from the client's, if anything: the model renamed,
/// or usage asked for on a stream the client did not ask it for (so the stream is metered on
/// the provider's counts).
pub fn body_changes<'c>(route: ApiRoute, head: &RequestHead<'_>, chosen: &'c ModelRoute) -> Option<Changes<'c>> {
    let include_usage = matches!(route, ApiRoute::ChatCompletions | ApiRoute::Completions)
        && chosen.upstream.kind != ProviderKind::Anthropic
        && head.streaming()
        && !head.client_wants_usage();
    let model = chosen.upstream_model.as_deref();
    (model.is_some() || include_usage).then_some(Changes { model, include_usage })
}

/// The body to send when it is not the client's ([`body_changes`]), and whether usage was asked for.
fn upstream_body(body: &Bytes, changes: Option<Changes<'_>>) -> Result<(Option<Bytes>, bool), GatewayError> {
    let Some(changes) = changes else {
        return Ok((None, false));
    };
    let bytes = super::rewrite::rewrite(body, changes)
        .map_err(|_| GatewayError::InvalidRequest("The request body must be a JSON object.".to_owned()))?;
    Ok((Some(Bytes::from(bytes)), changes.include_usage))
}

/// `name` if it can be an Azure deployment: one path segment of letters, digits, `-`, `_` and
/// `.` (Azure's own rule for deployment names), and not `.` or `..`. Under a glob model the
/// client's `model` is the deployment, and `/`, `?`, `#` or `%` in it would reach other paths or
/// API versions of the provider with the provider's key.
fn azure_deployment(name: &str) -> Option<&str> {
    let segment = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    (segment && name.bytes().any(|b| b != b'.')).then_some(name)
}

/// The origin-form target (`/v1/chat/completions?…`) from the paths precomputed per snapshot.
fn upstream_path(route: ApiRoute, client_uri: &Uri, model: &str, chosen: &ModelRoute) -> Result<Uri, GatewayError> {
    let upstream = &chosen.upstream;
    if upstream.kind == ProviderKind::Mock {
        // Answered in process; the target is never used.
        return Ok(Uri::from_static("/"));
    }
    let endpoint = upstream.endpoint.as_ref().ok_or(GatewayError::UpstreamUnavailable)?;
    let path = match (upstream.kind, &upstream.azure_api_version) {
        (ProviderKind::AzureOpenAi, Some(version)) => {
            let deployment = chosen.upstream_model.as_deref().unwrap_or(model);
            let deployment = azure_deployment(deployment).ok_or_else(|| {
                GatewayError::InvalidRequest(
                    "The model cannot name an Azure OpenAI deployment: use letters, digits, '-', '_' and '.'."
                        .to_owned(),
                )
            })?;
            endpoint.azure_path(route, deployment, version)
        }
        _ => endpoint.path(route, client_uri.query()),
    };
    path.map(Uri::from).ok_or(GatewayError::UpstreamUnavailable)
}

/// Builds the request for `chosen` from the client's request parts and body (with `changes`, what
/// [`body_changes`] said), encoded straight into its wire form: the client's headers minus the
/// stripped ones, then the gateway's own.
pub fn build(
    route: ApiRoute,
    (uri, client): (&Uri, &impl HeaderFields),
    (body, changes): (&Bytes, Option<Changes<'_>>),
    model: &str,
    chosen: &ModelRoute,
    request_id: &HeaderValue,
) -> Result<Outbound, GatewayError> {
    let (rewritten, strip_usage_chunk) = upstream_body(body, changes)?;
    let body_len = rewritten.as_ref().unwrap_or(body).len();
    let upstream = &chosen.upstream;
    let Some(endpoint) = upstream.endpoint.as_ref().filter(|_| upstream.kind != ProviderKind::Mock) else {
        return Ok(Outbound { head: zeroize::Zeroizing::new(Vec::new()), rewritten, strip_usage_chunk });
    };
    let target = upstream_path(route, uri, model, chosen)?;
    // Fields the client's `Connection` header names are hop-by-hop too (names are lowercase,
    // tokens may not be).
    let listed = connection_listed(client);
    let forwarded = client.each().filter(|(name, _)| !stripped_request_header(name) && !is_listed(&listed, name));
    let content_type = (!client.has("content-type")).then_some((&b"content-type"[..], &b"application/json"[..]));
    let anthropic_version = (upstream.kind == ProviderKind::Anthropic && !client.has("anthropic-version"))
        .then_some((&b"anthropic-version"[..], DEFAULT_ANTHROPIC_VERSION.as_bytes()));
    let gateway = [
        Some((&b"x-request-id"[..], request_id.as_bytes())),
        Some((&b"accept-encoding"[..], &b"identity"[..])),
        content_type,
        upstream.credential().map(|credential| (credential.name, credential.value.expose())),
        anthropic_version,
        Some((&b"host"[..], endpoint.host.as_bytes())),
    ];
    // Sized from every client header, forwarded or not: one cheap pass instead of filtering twice.
    let bound = client.each().map(|(name, value)| field_len(name, value)).sum::<usize>()
        + gateway.iter().flatten().map(|(name, value)| field_len(name, value)).sum::<usize>();
    let fields = forwarded.chain(gateway.iter().flatten().copied());
    let target = target.path_and_query().map_or("/", |target| target.as_str());
    let head =
        encode_fields(&Method::POST, target, fields, bound, body_len).map_err(|_| GatewayError::UpstreamUnavailable)?;
    Ok(Outbound { head, rewritten, strip_usage_chunk })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::tests::response_fields;

    const PROVIDER_HEAD: &str = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
        Connection: keep-alive, X-Hop\r\nX-Hop: a\r\nSet-Cookie: s=CANARY\r\nContent-Length: 5\r\n\
        Transfer-Encoding: chunked\r\nX-Request-Id: up-1\r\nOpenAI-Processing-Ms: 12\r\nUpgrade: h2c\r\n\r\n";

    fn passed_lines(passed: &PassedFields) -> Vec<String> {
        passed
            .each()
            .map(|(name, value)| {
                format!("{}: {}", String::from_utf8_lossy(name), String::from_utf8_lossy(value.bytes()))
            })
            .collect()
    }

    /// What the gateway answers or sets itself never reaches the provider: credentials, the
    /// client's addresses, framing, and `Expect: 100-continue` (the body was read in whole, and
    /// goes with the head: a provider's `100 Continue` would only be read and thrown away).
    #[test]
    fn the_clients_own_fields_are_not_passed_on() {
        for name in ["authorization", "x-api-key", "cookie", "x-forwarded-for", "content-length", "expect", "te"] {
            assert!(stripped_request_header(name.as_bytes()), "{name}");
        }
        for name in ["content-type", "anthropic-version", "openai-beta", "user-agent"] {
            assert!(!stripped_request_header(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn an_azure_deployment_is_one_plain_path_segment() {
        for good in ["gpt-4o", "gpt-4o-mini_2024.08", "o1", "a.b", "...x", "DEPLOY-1"] {
            assert_eq!(azure_deployment(good), Some(good));
        }
        for bad in [
            "",
            ".",
            "..",
            "gpt-4o/../o1-pro",
            "gpt-4o-x?api-version=2099-preview#",
            "gpt-4o#",
            "gpt%2F4o",
            "gpt 4o",
            "gpt-4o:latest",
            "gpt-4o\\x",
            "gpt-4o\u{e9}",
        ] {
            assert_eq!(azure_deployment(bad), None, "{bad:?}");
        }
    }

    /// The outbound request's head holds the provider credential and its body the client's
    /// content: Debug shows neither.
    #[test]
    fn outbound_debug_shows_sizes_only() {
        let outbound = Outbound {
            head: zeroize::Zeroizing::new(b"POST / HTTP/1.1\r\nauthorization: Bearer sk-CANARY\r\n\r\n".to_vec()),
            rewritten: Some(Bytes::from_static(b"{\"messages\":\"CANARY\"}")),
            strip_usage_chunk: true,
        };
        let shown = format!("{outbound:?}");
        assert!(!shown.contains("CANARY"), "{shown}");
        assert!(shown.contains("head_len"), "{shown}");
    }

    #[test]
    fn the_fields_that_change_every_response_are_named() {
        for name in [
            "x-request-id",
            "x-upstream-request-id",
            "request-id",
            "cf-ray",
            "openai-processing-ms",
            "x-envoy-upstream-service-time",
            "retry-after",
            "retry-after-ms",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-tokens",
            "anthropic-ratelimit-input-tokens-remaining",
            "anthropic-ratelimit-requests-reset",
        ] {
            assert!(varies_per_response(name.as_bytes()), "{name}");
        }
        for name in [
            "content-type",
            "openai-version",
            "openai-organization",
            "x-ratelimit-limit-requests",
            "anthropic-ratelimit-tokens-limit",
            "anthropic-ratelimit-requests-remaining-x",
            "x-ratelimit",
        ] {
            assert!(!varies_per_response(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn a_providers_fields_are_passed_on_without_hop_by_hop_framing_or_cookies() {
        let ours = HeaderValue::from_static("req_ours");
        let passed = PassedFields::new(ResponseFields::Raw(response_fields(PROVIDER_HEAD)), ours.clone());
        let expected = [
            "content-type: application/json",
            "x-upstream-request-id: up-1",
            "openai-processing-ms: 12",
            "x-request-id: req_ours",
        ];
        assert_eq!(passed_lines(&passed), expected);

        // The map a server that cannot write them itself (HTTP/2) gets holds the same.
        let mut map = HeaderMap::new();
        passed.append_to(&mut map);
        let from_map: Vec<String> =
            map.iter().map(|(name, value)| format!("{name}: {}", value.to_str().expect("ascii"))).collect();
        assert_eq!(from_map, expected);

        // The mock's fields (a map) go the same way.
        let mut mock = HeaderMap::new();
        mock.insert("content-type", HeaderValue::from_static("text/event-stream"));
        mock.insert("set-cookie", HeaderValue::from_static("s=1"));
        let passed = PassedFields::new(ResponseFields::Map(mock), ours);
        assert_eq!(passed_lines(&passed), ["content-type: text/event-stream", "x-request-id: req_ours"]);
    }
}
