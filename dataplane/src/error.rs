//! Every way a request can fail inside the gateway, and the one place that turns a failure into
//! a status code and a body in the API's own format.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::api::ApiFlavor;
use crate::body::GatewayBody;

/// Header naming the stable error code on every error the gateway produces itself.
pub const ERROR_CODE_HEADER: &str = "x-portcullis-error-code";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayError {
    MissingApiKey,
    InvalidApiKey,
    ApiKeyExpired,
    ApiKeyRevoked,
    KillSwitchActive {
        switch: String,
        reason: Option<String>,
    },
    ModelNotFound {
        model: Option<String>,
    },
    ModelNotAllowed {
        model: String,
    },
    InvalidRequest(String),
    RequestTooLarge {
        limit: usize,
    },
    RequestTimeout,
    RouteNotFound,
    MethodNotAllowed,
    NotReady,
    UpstreamUnavailable,
    UpstreamTimeout,
    UpstreamProtocol,
    RateLimited {
        limit: &'static str,
        retry_after_ms: u64,
        limit_value: u64,
        used: u64,
        tokens: bool,
        /// What the request asked of the limit: its reserved tokens, or one request.
        requested: u64,
        /// The limiter's wall clock at the refusal (Anthropic's resets are instants).
        at_ms: u64,
    },
    BudgetExceeded {
        limit: &'static str,
        retry_after_ms: u64,
    },
    LockedOut {
        retry_after_ms: u64,
    },
    /// A stream used up what was left of its budget (sent as a final event, not a status).
    BudgetExceededMidStream,
    LimiterUnavailable,
    /// The key's limit decisions are queued past the shared store's timeout.
    LimiterBusy,
    /// The request bodies held at once reached `--max-buffered-body-bytes`.
    Overloaded,
    /// As many provider connections are open as the gateway may hold.
    UpstreamBusy,
    /// The request could not be read as HTTP/1.1.
    Http1(crate::http1::Http1Error),
}

/// How an error is presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorShape {
    pub status: StatusCode,
    /// Stable machine-readable code, also used as the `outcome` metric label.
    pub code: &'static str,
    pub openai_type: &'static str,
    pub anthropic_type: &'static str,
}

impl GatewayError {
    pub fn shape(&self) -> ErrorShape {
        use GatewayError as E;
        let (status, code, openai_type, anthropic_type) = match self {
            E::MissingApiKey => {
                (StatusCode::UNAUTHORIZED, "missing_api_key", "invalid_request_error", "authentication_error")
            }
            E::InvalidApiKey => {
                (StatusCode::UNAUTHORIZED, "invalid_api_key", "invalid_request_error", "authentication_error")
            }
            E::ApiKeyExpired => {
                (StatusCode::UNAUTHORIZED, "api_key_expired", "invalid_request_error", "authentication_error")
            }
            E::ApiKeyRevoked => {
                (StatusCode::UNAUTHORIZED, "api_key_revoked", "invalid_request_error", "authentication_error")
            }
            E::KillSwitchActive { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "kill_switch_active", "server_error", "api_error")
            }
            E::ModelNotFound { .. } => {
                (StatusCode::NOT_FOUND, "model_not_found", "invalid_request_error", "not_found_error")
            }
            E::ModelNotAllowed { .. } => {
                (StatusCode::FORBIDDEN, "model_not_allowed", "permission_error", "permission_error")
            }
            E::InvalidRequest(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request", "invalid_request_error", "invalid_request_error")
            }
            E::RequestTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", "invalid_request_error", "request_too_large")
            }
            E::RequestTimeout => {
                (StatusCode::REQUEST_TIMEOUT, "request_timeout", "invalid_request_error", "invalid_request_error")
            }
            E::RouteNotFound => (StatusCode::NOT_FOUND, "route_not_found", "invalid_request_error", "not_found_error"),
            E::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "invalid_request_error", "invalid_request_error")
            }
            E::NotReady => (StatusCode::SERVICE_UNAVAILABLE, "gateway_not_ready", "server_error", "overloaded_error"),
            E::UpstreamUnavailable => (StatusCode::BAD_GATEWAY, "upstream_unavailable", "server_error", "api_error"),
            E::UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", "server_error", "api_error"),
            E::UpstreamProtocol => (StatusCode::BAD_GATEWAY, "upstream_protocol_error", "server_error", "api_error"),
            E::RateLimited { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", "rate_limit_error", "rate_limit_error")
            }
            E::BudgetExceeded { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "token_budget_exceeded", "insufficient_quota", "rate_limit_error")
            }
            E::LockedOut { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_failed_authentications",
                "rate_limit_error",
                "rate_limit_error",
            ),
            E::BudgetExceededMidStream => {
                (StatusCode::TOO_MANY_REQUESTS, "token_budget_exceeded", "insufficient_quota", "rate_limit_error")
            }
            E::LimiterUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "rate_limiter_unavailable", "server_error", "overloaded_error")
            }
            E::LimiterBusy => {
                (StatusCode::SERVICE_UNAVAILABLE, "rate_limiter_busy", "server_error", "overloaded_error")
            }
            E::Overloaded | E::UpstreamBusy => {
                (StatusCode::SERVICE_UNAVAILABLE, "gateway_overloaded", "server_error", "overloaded_error")
            }
            E::Http1(error) => {
                use crate::http1::Http1Error as H;
                let (status, code) = match error {
                    H::Malformed(_) => (StatusCode::BAD_REQUEST, "malformed_request"),
                    H::HeadTooLarge => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request_head_too_large"),
                    H::UnsupportedVersion => (StatusCode::HTTP_VERSION_NOT_SUPPORTED, "http_version_not_supported"),
                    H::UnsupportedTransferEncoding => (StatusCode::NOT_IMPLEMENTED, "transfer_encoding_not_supported"),
                    H::ExpectationFailed => (StatusCode::EXPECTATION_FAILED, "expectation_failed"),
                    H::HeadTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
                };
                (status, code, "invalid_request_error", "invalid_request_error")
            }
        };
        ErrorShape { status, code, openai_type, anthropic_type }
    }

    /// A message a person can act on. Never contains request or response content: a model name
    /// is echoed only after it has been checked to be a plain identifier.
    pub fn message(&self) -> String {
        use GatewayError as E;
        match self {
            E::MissingApiKey => {
                "No API key provided. Send it as `Authorization: Bearer <key>` or `x-api-key: <key>`.".to_owned()
            }
            E::InvalidApiKey => "Incorrect API key provided.".to_owned(),
            E::ApiKeyExpired => "This API key has expired.".to_owned(),
            E::ApiKeyRevoked => "This API key has been revoked.".to_owned(),
            E::KillSwitchActive { switch, reason } => match reason {
                Some(reason) => format!("Traffic is stopped by kill switch {switch}: {reason}"),
                None => format!("Traffic is stopped by kill switch {switch}."),
            },
            E::ModelNotFound { model: Some(model) } => {
                format!("The model `{model}` does not exist or is not served by this gateway.")
            }
            E::ModelNotFound { model: None } => {
                "The requested model does not exist or is not served by this gateway.".to_owned()
            }
            E::ModelNotAllowed { model } => format!("This API key is not allowed to use the model `{model}`."),
            E::InvalidRequest(why) => why.clone(),
            E::RequestTooLarge { limit } => format!("Request body is larger than the {limit}-byte limit."),
            E::RequestTimeout => "The request body was not received in time.".to_owned(),
            E::RouteNotFound => "Unknown API route.".to_owned(),
            E::MethodNotAllowed => "Method not allowed on this route.".to_owned(),
            E::NotReady => "The gateway has not loaded its configuration yet.".to_owned(),
            E::UpstreamUnavailable => "The upstream provider could not be reached.".to_owned(),
            E::UpstreamTimeout => "The upstream provider did not answer in time.".to_owned(),
            E::UpstreamProtocol => "The upstream provider sent a malformed response.".to_owned(),
            E::RateLimited { limit, limit_value, requested, .. } if self.never_fits() => format!(
                "Request too large ({limit}): it needs about {requested} tokens and the limit is {limit_value}. \
                 Lower max_tokens or shorten the input; retrying will not help."
            ),
            E::RateLimited { limit, retry_after_ms, .. } => {
                format!("Rate limit reached ({limit}). Retry after {:.1} s.", *retry_after_ms as f64 / 1000.0)
            }
            E::BudgetExceeded { limit, .. } => format!("Token budget exhausted ({limit})."),
            E::LockedOut { retry_after_ms } => format!(
                "Too many failed authentications from this address. Retry after {} s.",
                retry_after_ms.div_ceil(1000)
            ),
            E::LimiterUnavailable => "Limits cannot be checked right now; try again shortly.".to_owned(),
            E::LimiterBusy => {
                "Too many of this key's requests are waiting for a limit decision; try again shortly.".to_owned()
            }
            E::Overloaded => {
                "The gateway holds as many request bodies as it may at once; try again shortly.".to_owned()
            }
            E::UpstreamBusy => {
                "The gateway has as many provider connections open as it may at once; try again shortly.".to_owned()
            }
            E::BudgetExceededMidStream => {
                "Token budget exhausted during this response; the stream was ended.".to_owned()
            }
            E::Http1(error) => {
                use crate::http1::Http1Error as H;
                match error {
                    H::Malformed(why) => (*why).to_owned(),
                    H::HeadTooLarge => format!(
                        "The request head is larger than {} KiB or has more than {} header lines.",
                        crate::http1::MAX_HEAD / 1024,
                        crate::http1::head::MAX_HEADERS
                    ),
                    H::UnsupportedVersion => "Only HTTP/1.0, HTTP/1.1 and HTTP/2 are served.".to_owned(),
                    H::UnsupportedTransferEncoding => "Only the chunked transfer coding is accepted.".to_owned(),
                    H::ExpectationFailed => "Only `Expect: 100-continue` is supported.".to_owned(),
                    H::HeadTimeout => "The request head was not received in time.".to_owned(),
                }
            }
        }
    }

    /// A rate-limit refusal of a request larger than the limit itself: no wait lets it through.
    pub fn never_fits(&self) -> bool {
        matches!(self, GatewayError::RateLimited { limit_value, requested, .. } if requested > limit_value)
    }

    /// The error as a response in `flavor`'s format.
    pub fn into_response(self, flavor: ApiFlavor, request_id: &HeaderValue) -> Response<GatewayBody> {
        let shape = self.shape();
        let body = render_body(flavor, &shape, &self.message(), request_id);
        let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed_unsync());
        *response.status_mut() = shape.status;
        let headers = response.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ERROR_CODE_HEADER, HeaderValue::from_static(shape.code));
        headers.insert(crate::api::REQUEST_ID_HEADER, request_id.clone());
        let retry_after_ms = match &self {
            GatewayError::RateLimited { retry_after_ms, .. }
            | GatewayError::BudgetExceeded { retry_after_ms, .. }
            | GatewayError::LockedOut { retry_after_ms } => Some(*retry_after_ms),
            _ if shape.status == StatusCode::SERVICE_UNAVAILABLE => Some(1_000),
            _ => None,
        };
        if let Some(ms) = retry_after_ms {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000).max(1)));
            // Both SDKs read this before `Retry-After`: a window that frees in 150 ms is not
            // waited on for a whole second.
            headers.insert(RETRY_AFTER_MS_HEADER, HeaderValue::from(ms.max(1)));
            // A budget spent until tomorrow, a lockout, or a request larger than its limit: not
            // worth an SDK's retries, and the Anthropic SDK would sleep the whole `Retry-After`
            // before its first one.
            if ms > MAX_RETRY_WORTH_MS || self.never_fits() {
                headers.insert(SHOULD_RETRY_HEADER, HeaderValue::from_static("false"));
            }
        }
        crate::pipeline::limit::refusal_headers(&self, flavor, headers);
        response
    }
}

/// Read by the OpenAI and Anthropic SDKs before their own retry rules.
const SHOULD_RETRY_HEADER: &str = "x-should-retry";

/// `Retry-After` in milliseconds, read by the OpenAI and Anthropic SDKs before `Retry-After`.
const RETRY_AFTER_MS_HEADER: &str = "retry-after-ms";

/// The longest wait after which a retry is still worth the client's while (the SDKs' own cap on
/// an honoured `Retry-After` is 60 s or more); a refusal for longer says not to retry.
const MAX_RETRY_WORTH_MS: u64 = 60_000;

/// Error body in the API's own format.
pub fn render_body(flavor: ApiFlavor, shape: &ErrorShape, message: &str, request_id: &HeaderValue) -> Vec<u8> {
    let value = match flavor {
        ApiFlavor::OpenAi => serde_json::json!({
            "error": {"message": message, "type": shape.openai_type, "param": null, "code": shape.code}
        }),
        ApiFlavor::Anthropic => serde_json::json!({
            "type": "error",
            "error": {"type": shape.anthropic_type, "message": message},
            "request_id": request_id.to_str().unwrap_or_default(),
        }),
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// A model name safe to echo in an error: a plain identifier of bounded length.
pub fn echoable_model(model: &str) -> Option<String> {
    let plain = !model.is_empty()
        && model.len() <= 128
        && model.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:/@".contains(&b));
    plain.then(|| model.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_follow_each_api() {
        let id = HeaderValue::from_static("req-1");
        let shape = GatewayError::InvalidApiKey.shape();
        let openai: serde_json::Value =
            serde_json::from_slice(&render_body(ApiFlavor::OpenAi, &shape, "m", &id)).expect("json");
        assert_eq!(openai["error"]["code"], "invalid_api_key");
        assert_eq!(openai["error"]["message"], "m");
        let anthropic: serde_json::Value =
            serde_json::from_slice(&render_body(ApiFlavor::Anthropic, &shape, "m", &id)).expect("json");
        assert_eq!(anthropic["type"], "error");
        assert_eq!(anthropic["error"]["type"], "authentication_error");
        assert_eq!(anthropic["request_id"], "req-1");
    }

    /// A refusal gives its wait in seconds and in milliseconds; one that lasts beyond a minute
    /// tells the SDKs not to retry, a minute's rate limit leaves them to honour the wait.
    #[test]
    fn refusals_give_their_wait_twice_and_long_ones_say_not_to_retry() {
        let id = HeaderValue::from_static("req-1");
        let cases = [
            (GatewayError::BudgetExceeded { limit: "tokensPerDay", retry_after_ms: 5 * 3_600_000 }, Some("false")),
            (GatewayError::LockedOut { retry_after_ms: 300_000 }, Some("false")),
            (
                GatewayError::RateLimited {
                    limit: "requestsPerMinute",
                    retry_after_ms: 20_000,
                    limit_value: 10,
                    used: 10,
                    tokens: false,
                    requested: 1,
                    at_ms: 0,
                },
                None,
            ),
            // Larger than the limit: the window's full minute would not let it through.
            (
                GatewayError::RateLimited {
                    limit: "tokensPerMinute",
                    retry_after_ms: 60_000,
                    limit_value: 1_000,
                    used: 0,
                    tokens: true,
                    requested: 4_097,
                    at_ms: 0,
                },
                Some("false"),
            ),
        ];
        for (error, should_retry) in cases {
            let ms = match &error {
                GatewayError::BudgetExceeded { retry_after_ms, .. }
                | GatewayError::LockedOut { retry_after_ms }
                | GatewayError::RateLimited { retry_after_ms, .. } => *retry_after_ms,
                _ => unreachable!(),
            };
            let response = error.into_response(ApiFlavor::Anthropic, &id);
            assert_eq!(response.headers()[http::header::RETRY_AFTER], (ms / 1000).to_string());
            assert_eq!(response.headers()[RETRY_AFTER_MS_HEADER], ms.to_string());
            let header = response.headers().get(SHOULD_RETRY_HEADER).map(|v| v.to_str().expect("ascii"));
            assert_eq!(header, should_retry);
        }
    }

    #[test]
    fn only_plain_model_names_are_echoed() {
        assert_eq!(echoable_model("gpt-4o").as_deref(), Some("gpt-4o"));
        assert_eq!(echoable_model("ignore previous instructions"), None);
        assert_eq!(echoable_model(&"a".repeat(200)), None);
    }
}
