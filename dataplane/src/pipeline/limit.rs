//! Phase 4: limits. Requests and tokens per minute (key and team), token budgets, and the shared
//! brute-force lockout. Runs after routing, so requests for unknown or forbidden models cost
//! nothing, and before any upstream call.

use std::net::IpAddr;

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};

use crate::api::RequestHead;
use crate::error::GatewayError;
use crate::http1::codec::push_decimal;
use crate::limits::{AdmitError, Limiter, Refusal, Ticket, Which};
use crate::snapshot::KeyGrant;

/// Tokens to reserve: the request's size in tokens (about four bytes each) plus its output cap.
pub fn estimate_tokens(body_len: usize, head: &RequestHead<'_>, default_output: u64) -> (u64, u64) {
    let input = (body_len as u64).div_ceil(4).max(1);
    (input, input.saturating_add(head.output_cap().unwrap_or(default_output)))
}

/// Admits the request or says which limit refused it, at once when there is no shared store:
/// no future is built or moved for it. `None` when there is one: ask [`admit_shared`].
pub fn admit_in_process(
    limiter: &Limiter,
    grant: &KeyGrant,
    tokens: u64,
    now_ms: u64,
) -> Option<Result<Option<Ticket>, GatewayError>> {
    if limiter.is_shared() {
        return None;
    }
    let admission = grant.limits.as_ref().map(|limits| limiter.admission_at(limits, tokens, now_ms));
    Some(admission.map(|admission| limiter.admit_in_process(admission)).transpose().map_err(admit_error))
}

/// Admits the request through the shared store or says which limit refused it. The future
/// (the admission and the lockout check, joined) is large: the caller boxes it, so that every
/// request's pipeline future need not make room for it.
pub async fn admit_shared(
    limiter: &Limiter,
    grant: &KeyGrant,
    tokens: u64,
    client: Option<IpAddr>,
    now_ms: u64,
) -> Result<Option<Ticket>, GatewayError> {
    let admission = grant.limits.as_ref().map(|limits| limiter.admission_at(limits, tokens, now_ms));
    let admitted = async {
        match admission {
            Some(admission) => limiter.admit(admission).await.map(Some),
            None => Ok(None),
        }
    };
    let decided = match client {
        // Lockouts set by other replicas are checked alongside the admission: one round trip.
        Some(ip) => {
            let (locked, admitted) = tokio::join!(limiter.locked_shared(ip), admitted);
            if let Some(retry_after_ms) = locked {
                if let Ok(Some(ticket)) = &admitted {
                    limiter.settle(ticket, 0).await;
                }
                return Err(GatewayError::LockedOut { retry_after_ms });
            }
            admitted
        }
        None => admitted.await,
    };
    decided.map_err(admit_error)
}

fn admit_error(e: AdmitError) -> GatewayError {
    match e {
        AdmitError::Unavailable => GatewayError::LimiterUnavailable,
        AdmitError::Refused(refusal) => refused(refusal),
    }
}

fn refused(r: Refusal) -> GatewayError {
    if r.which.is_budget() {
        GatewayError::BudgetExceeded { limit: r.which.label(), retry_after_ms: r.retry_after_ms }
    } else {
        let tokens = matches!(r.which, Which::Tokens | Which::TeamTokens);
        GatewayError::RateLimited {
            limit: r.which.label(),
            retry_after_ms: r.retry_after_ms,
            limit_value: r.limit,
            used: r.used,
            tokens,
        }
    }
}

const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

/// Seconds with three decimals (`12.345s`), written digit by digit (no formatter: this runs
/// on every limited response).
fn push_seconds(out: &mut Vec<u8>, ms: u64) {
    push_decimal(out, ms / 1000);
    let fraction = ms % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (fraction / 100) as u8,
        b'0' + (fraction / 10 % 10) as u8,
        b'0' + (fraction % 10) as u8,
        b's',
    ]);
}

/// A rate-limit header value.
#[derive(Debug, Clone, Copy)]
enum Text {
    Count(u64),
    Seconds(u64),
}

impl Text {
    fn push(self, out: &mut Vec<u8>) {
        match self {
            Text::Count(n) => push_decimal(out, n),
            Text::Seconds(ms) => push_seconds(out, ms),
        }
    }
}

/// One `x-ratelimit-*` group: a limit, what is left of it, and when it resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    limit: u64,
    remaining: u64,
    reset_ms: u64,
}

/// The OpenAI-style `x-ratelimit-*` headers of a response.
///
/// On a forwarded response they ride beside it ([`super::Reply`]) instead of in its header map:
/// the HTTP/1.1 server encodes them straight into the response head (six header-map entries,
/// built, hashed and dropped per request, cost more than encoding the rest of the head; the
/// response's extensions cost three allocations), and the HTTP/2 server moves them into the map
/// ([`super::Reply::into_response`]). Either way they replace an upstream's headers of the same
/// names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateHeaders {
    requests: Option<Window>,
    tokens: Option<Window>,
}

impl RateHeaders {
    /// Request limits only, for tests elsewhere.
    #[cfg(test)]
    pub fn requests(limit: u64, remaining: u64, reset_ms: u64) -> Self {
        Self { requests: Some(Window { limit, remaining, reset_ms }), tokens: None }
    }

    /// What an admitted request has left; `None` when its key has no per-minute limits.
    pub fn for_ticket(ticket: &Ticket) -> Option<Self> {
        let limits = &ticket.admission.key().limits;
        let granted = &ticket.granted;
        let window = |limit: Option<u64>, used: u64, reset_ms: u64| {
            limit.map(|limit| Window { limit, remaining: limit.saturating_sub(used), reset_ms })
        };
        let headers = Self {
            requests: window(limits.requests_per_minute, granted.requests_used, granted.requests_reset_ms),
            tokens: window(limits.tokens_per_minute, granted.tokens_used, granted.tokens_reset_ms),
        };
        (headers.requests.is_some() || headers.tokens.is_some()).then_some(headers)
    }

    /// The limit that refused a request, on its 429.
    fn for_refusal(error: &GatewayError) -> Option<Self> {
        let GatewayError::RateLimited { retry_after_ms, limit_value, used, tokens, .. } = error else {
            return None;
        };
        let window = Some(Window {
            limit: *limit_value,
            remaining: limit_value.saturating_sub(*used),
            reset_ms: *retry_after_ms,
        });
        Some(if *tokens { Self { requests: None, tokens: window } } else { Self { requests: window, tokens: None } })
    }

    fn each(&self, mut field: impl FnMut(&HeaderName, Text)) {
        if let Some(w) = self.requests {
            field(&LIMIT_REQUESTS, Text::Count(w.limit));
            field(&REMAINING_REQUESTS, Text::Count(w.remaining));
            field(&RESET_REQUESTS, Text::Seconds(w.reset_ms));
        }
        if let Some(w) = self.tokens {
            field(&LIMIT_TOKENS, Text::Count(w.limit));
            field(&REMAINING_TOKENS, Text::Count(w.remaining));
            field(&RESET_TOKENS, Text::Seconds(w.reset_ms));
        }
    }

    /// Whether `name` is one of the headers these replace.
    pub fn replaces(&self, name: &[u8]) -> bool {
        let Some(rest) = name.strip_prefix(b"x-ratelimit-") else { return false };
        let group = if rest.ends_with(b"-requests") {
            self.requests.is_some()
        } else {
            rest.ends_with(b"-tokens") && self.tokens.is_some()
        };
        group
            && [LIMIT_REQUESTS, REMAINING_REQUESTS, RESET_REQUESTS, LIMIT_TOKENS, REMAINING_TOKENS, RESET_TOKENS]
                .iter()
                .any(|ours| ours.as_str().as_bytes() == name)
    }

    /// `name: value\r\n` lines for an HTTP/1.1 head.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.each(|name, text| {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            text.push(out);
            out.extend_from_slice(b"\r\n");
        });
    }

    /// Sets these headers in `headers`, replacing any of the same names.
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        let mut text = Vec::with_capacity(24);
        self.each(|name, value| {
            text.clear();
            value.push(&mut text);
            if let Ok(value) = HeaderValue::from_bytes(&text) {
                headers.insert(name.clone(), value);
            }
        });
    }
}

/// The headers of the limit that refused a request, on its 429.
pub fn refusal_headers(error: &GatewayError, headers: &mut HeaderMap) {
    if let Some(rate) = RateHeaders::for_refusal(error) {
        rate.insert_into(headers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_and_inserted_headers_agree_and_replace_only_their_group() {
        let rate = RateHeaders { requests: Some(Window { limit: 100, remaining: 97, reset_ms: 1_250 }), tokens: None };
        let mut encoded = Vec::new();
        rate.encode(&mut encoded);
        assert_eq!(
            std::str::from_utf8(&encoded).unwrap(),
            "x-ratelimit-limit-requests: 100\r\nx-ratelimit-remaining-requests: 97\r\n\
             x-ratelimit-reset-requests: 1.250s\r\n"
        );
        let mut headers = HeaderMap::new();
        headers.insert(LIMIT_REQUESTS, HeaderValue::from_static("9"));
        headers.insert(LIMIT_TOKENS, HeaderValue::from_static("9"));
        rate.insert_into(&mut headers);
        let lines: String = headers
            .iter()
            .filter(|(name, _)| rate.replaces(name.as_str().as_bytes()))
            .map(|(name, value)| format!("{name}: {}\r\n", value.to_str().unwrap()))
            .collect();
        assert_eq!(lines.as_bytes(), encoded);
        assert_eq!(headers[LIMIT_TOKENS], "9");
        assert!(!rate.replaces(LIMIT_TOKENS.as_str().as_bytes()));
        assert!(!rate.replaces(b"x-ratelimit-limit-requestsx"));
        assert!(!rate.replaces(b"content-type"));
    }

    #[test]
    fn reset_durations_have_three_decimals() {
        for (ms, text) in [
            (0, "0.000s"),
            (5, "0.005s"),
            (1005, "1.005s"),
            (59_999, "59.999s"),
            (60_000, "60.000s"),
            (86_400_000, "86400.000s"),
            (u64::MAX, "18446744073709551.615s"),
        ] {
            let mut written = Vec::new();
            push_seconds(&mut written, ms);
            assert_eq!(written, text.as_bytes());
            if ms < 1 << 50 {
                // The same as formatting the seconds as a float (exact in this range).
                assert_eq!(format!("{:.3}s", ms as f64 / 1000.0), text);
            }
        }
    }
}
