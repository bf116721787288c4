//! Phase 4: limits. Requests and tokens per minute (key and team), token budgets, and the shared
//! brute-force lockout. Runs after routing, so requests for unknown or forbidden models cost
//! nothing, and before any upstream call.

use std::net::IpAddr;

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};
use portcullis_crds::snapshot::ApiKeyEntry;

use crate::api::RequestHead;
use crate::error::GatewayError;
use crate::limits::{AdmitError, Limiter, Refusal, Ticket, Which};
use crate::snapshot::RuntimeSnapshot;

/// Tokens to reserve: the request's size in tokens (about four bytes each) plus its output cap.
pub fn estimate_tokens(body_len: usize, head: &RequestHead<'_>, default_output: u64) -> (u64, u64) {
    let input = (body_len as u64).div_ceil(4).max(1);
    (input, input + head.output_cap().unwrap_or(default_output))
}

/// Admits the request or says which limit refused it.
pub async fn admit(
    limiter: &Limiter,
    snapshot: &RuntimeSnapshot,
    key: &ApiKeyEntry,
    tokens: u64,
    client: Option<IpAddr>,
) -> Result<Option<Ticket>, GatewayError> {
    let admission = limiter.admission_for(key, snapshot.team_limits(key), tokens);
    // Lockouts set by other replicas are checked alongside the admission: one round trip.
    let locked = async {
        match client {
            Some(ip) => limiter.locked_shared(ip).await,
            None => None,
        }
    };
    let admitted = async {
        match admission {
            Some(admission) => limiter.admit(admission).await.map(Some),
            None => Ok(None),
        }
    };
    let (locked, admitted) = tokio::join!(locked, admitted);
    if let Some(retry_after_ms) = locked {
        if let Ok(Some(ticket)) = &admitted {
            limiter.settle(ticket, 0).await;
        }
        return Err(GatewayError::LockedOut { retry_after_ms });
    }
    admitted.map_err(|e| match e {
        AdmitError::Unavailable => GatewayError::LimiterUnavailable,
        AdmitError::Refused(refusal) => refused(refusal),
    })
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

/// Seconds with three decimals (`12.345s`), written digit by digit into a stack buffer (no
/// formatter, no string: this runs on every limited response).
fn duration_text(ms: u64) -> HeaderValue {
    // u64::MAX / 1000 has 17 digits; then ".", three decimals and "s".
    let mut buf = [0u8; 24];
    let mut at = buf.len();
    let mut put = |digit: u8| {
        at -= 1;
        buf[at] = digit;
    };
    put(b's');
    let (mut seconds, mut fraction) = (ms / 1000, ms % 1000);
    for _ in 0..3 {
        put(b'0' + (fraction % 10) as u8);
        fraction /= 10;
    }
    put(b'.');
    loop {
        put(b'0' + (seconds % 10) as u8);
        seconds /= 10;
        if seconds == 0 {
            break;
        }
    }
    HeaderValue::from_bytes(&buf[at..]).unwrap_or_else(|_| HeaderValue::from_static("0s"))
}

/// OpenAI-style `x-ratelimit-*` headers for an admitted request.
pub fn rate_headers(ticket: &Ticket, headers: &mut HeaderMap) {
    let limits = &ticket.admission.key.limits;
    let granted = &ticket.granted;
    // One growth of the map instead of up to two while inserting.
    headers.reserve(
        3 * (usize::from(limits.requests_per_minute.is_some()) + usize::from(limits.tokens_per_minute.is_some())),
    );
    if let Some(limit) = limits.requests_per_minute {
        headers.insert(LIMIT_REQUESTS, HeaderValue::from(limit));
        headers.insert(REMAINING_REQUESTS, HeaderValue::from(limit.saturating_sub(granted.requests_used)));
        headers.insert(RESET_REQUESTS, duration_text(granted.requests_reset_ms));
    }
    if let Some(limit) = limits.tokens_per_minute {
        headers.insert(LIMIT_TOKENS, HeaderValue::from(limit));
        headers.insert(REMAINING_TOKENS, HeaderValue::from(limit.saturating_sub(granted.tokens_used)));
        headers.insert(RESET_TOKENS, duration_text(granted.tokens_reset_ms));
    }
}

/// The same headers on a 429.
pub fn refusal_headers(error: &GatewayError, headers: &mut HeaderMap) {
    if let GatewayError::RateLimited { retry_after_ms, limit_value, used, tokens, .. } = error {
        let (limit, remaining, reset) = if *tokens {
            (LIMIT_TOKENS, REMAINING_TOKENS, RESET_TOKENS)
        } else {
            (LIMIT_REQUESTS, REMAINING_REQUESTS, RESET_REQUESTS)
        };
        headers.insert(limit, HeaderValue::from(*limit_value));
        headers.insert(remaining, HeaderValue::from(limit_value.saturating_sub(*used)));
        headers.insert(reset, duration_text(*retry_after_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(duration_text(ms), text);
            if ms < 1 << 50 {
                // The same as formatting the seconds as a float (exact in this range).
                assert_eq!(format!("{:.3}s", ms as f64 / 1000.0), text);
            }
        }
    }
}
