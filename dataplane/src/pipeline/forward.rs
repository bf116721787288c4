//! Phase 4: the request as the provider must see it — its URL, its auth, the upstream model name,
//! and none of the client's credentials or hop-by-hop headers.

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Uri};
use portcullis_crds::v1alpha1::ProviderKind;

use crate::api::{ApiRoute, RequestHead, REQUEST_ID_HEADER};
use crate::error::GatewayError;
use crate::snapshot::ModelRoute;
use crate::upstream::h1::{encode_fields, field_len};

/// Anthropic requires a version header; this one is used when the client sends none.
const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// Request headers never forwarded: hop-by-hop (RFC 9110 §7.6.1), the client's credentials, and
/// headers that would let a client steer the provider account or leak its own address.
/// A `match` on the lowercase name: no table walk, no string compares against every entry.
fn stripped_request_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "authorization"
            | "x-api-key"
            | "api-key"
            | "cookie"
            | "openai-organization"
            | "openai-project"
            | "forwarded"
            | "x-forwarded-for"
            | "x-forwarded-host"
            | "x-forwarded-proto"
            | "x-real-ip"
            // Metering reads the body, so it must come back uncompressed.
            | "accept-encoding"
    )
}

/// Response headers never passed back.
const STRIPPED_RESPONSE_HEADERS: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::SET_COOKIE,
];

const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");

/// The outbound request and what metering must know about it.
#[derive(Debug)]
pub struct Outbound {
    /// The request head as the provider receives it, `Content-Length` included; empty for the
    /// in-process mock provider. It holds the provider credential and is zeroized when dropped.
    pub head: zeroize::Zeroizing<Vec<u8>>,
    pub body: Bytes,
    /// The gateway asked for OpenAI's usage chunk; the client did not and must not see it.
    pub strip_usage_chunk: bool,
}

fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// Removes hop-by-hop headers from an upstream response in place. One pass over the names
/// first: most responses carry none of them, and a removal hashes the name.
pub fn clean_response_headers(headers: &mut HeaderMap) {
    let found = headers.keys().any(|name| STRIPPED_RESPONSE_HEADERS.contains(name));
    if !found {
        return;
    }
    for name in connection_listed(headers) {
        headers.remove(name);
    }
    for name in &STRIPPED_RESPONSE_HEADERS {
        headers.remove(name);
    }
}

/// The body to send: unchanged unless the model must be renamed or usage requested.
fn upstream_body(
    body: Bytes,
    route: ApiRoute,
    head: &RequestHead<'_>,
    chosen: &ModelRoute,
) -> Result<(Bytes, bool), GatewayError> {
    let wants_usage_injection = matches!(route, ApiRoute::ChatCompletions | ApiRoute::Completions)
        && chosen.upstream.kind != ProviderKind::Anthropic
        && head.streaming()
        && !head.client_wants_usage();
    if chosen.upstream_model.is_none() && !wants_usage_injection {
        return Ok((body, false));
    }
    let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&body)
        .map_err(|_| GatewayError::InvalidRequest("The request body must be a JSON object.".to_owned()))?;
    if let Some(upstream_model) = &chosen.upstream_model {
        object.insert("model".to_owned(), serde_json::Value::String(upstream_model.to_string()));
    }
    if wants_usage_injection {
        let options =
            object.entry("stream_options").or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
        if let Some(options) = options.as_object_mut() {
            options.insert("include_usage".to_owned(), serde_json::Value::Bool(true));
        }
    }
    let bytes = serde_json::to_vec(&object)
        .map_err(|_| GatewayError::InvalidRequest("The request body could not be re-encoded.".to_owned()))?;
    Ok((Bytes::from(bytes), wants_usage_injection))
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
            endpoint.azure_path(route, deployment, version)
        }
        _ => endpoint.path(route, client_uri.query()),
    };
    path.map(Uri::from).ok_or(GatewayError::UpstreamUnavailable)
}

/// Builds the request for `chosen` from the client's request parts and body, encoded straight
/// into its wire form: the client's headers minus the stripped ones, then the gateway's own.
pub fn build(
    route: ApiRoute,
    client: &http::request::Parts,
    body: Bytes,
    head: &RequestHead<'_>,
    model: &str,
    chosen: &ModelRoute,
    request_id: &HeaderValue,
) -> Result<Outbound, GatewayError> {
    let (body, strip_usage_chunk) = upstream_body(body, route, head, chosen)?;
    let upstream = &chosen.upstream;
    let Some(endpoint) = upstream.endpoint.as_ref().filter(|_| upstream.kind != ProviderKind::Mock) else {
        return Ok(Outbound { head: zeroize::Zeroizing::new(Vec::new()), body, strip_usage_chunk });
    };
    let target = upstream_path(route, &client.uri, model, chosen)?;
    let listed = connection_listed(&client.headers);
    let forwarded = client
        .headers
        .iter()
        .filter(|(name, _)| !stripped_request_header(name) && **name != REQUEST_ID_HEADER && !listed.contains(name))
        .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()));
    let content_type = (!client.headers.contains_key(header::CONTENT_TYPE))
        .then_some((&b"content-type"[..], &b"application/json"[..]));
    let anthropic_version = (upstream.kind == ProviderKind::Anthropic
        && !client.headers.contains_key(&ANTHROPIC_VERSION))
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
    let bound =
        client.headers.iter().map(|(name, value)| field_len(name.as_str().as_bytes(), value.as_bytes())).sum::<usize>()
            + gateway.iter().flatten().map(|(name, value)| field_len(name, value)).sum::<usize>();
    let fields = forwarded.chain(gateway.iter().flatten().copied());
    let target = target.path_and_query().map_or("/", |target| target.as_str());
    let head = encode_fields(&Method::POST, target, fields, bound, body.len())
        .map_err(|_| GatewayError::UpstreamUnavailable)?;
    Ok(Outbound { head, body, strip_usage_chunk })
}
