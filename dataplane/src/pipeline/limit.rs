//! Phase 4: limits. Requests and tokens per minute (key and team), token budgets, and the shared
//! brute-force lockout. Runs after routing, so requests for unknown or forbidden models cost
//! nothing, and before any upstream call.

use std::net::IpAddr;

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};
use portcullis_crds::snapshot::ApiKeyEntry;

use crate::api::RequestHead;
use crate::error::GatewayError;
use crate::http1::codec::push_decimal;
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
enum Text {
    Count(u64),
    Seconds(u64),
}

/// Inserts up to six headers whose values are written into one buffer: one allocation for all.
fn insert_all(headers: &mut HeaderMap, fields: &[(HeaderName, Text)]) {
    let mut text = Vec::with_capacity(fields.len() * 24);
    let mut ends = [0usize; 6];
    for ((_, value), end) in fields.iter().zip(ends.iter_mut()) {
        match *value {
            Text::Count(n) => push_decimal(&mut text, n),
            Text::Seconds(ms) => push_seconds(&mut text, ms),
        }
        *end = text.len();
    }
    let text = Bytes::from(text);
    let mut start = 0;
    for ((name, _), &end) in fields.iter().zip(&ends) {
        if let Ok(value) = HeaderValue::from_maybe_shared(text.slice(start..end)) {
            headers.insert(name.clone(), value);
        }
        start = end;
    }
}

/// OpenAI-style `x-ratelimit-*` headers for an admitted request.
pub fn rate_headers(ticket: &Ticket, headers: &mut HeaderMap) {
    let limits = &ticket.admission.key.limits;
    let granted = &ticket.granted;
    let requests = limits.requests_per_minute.map(|limit| {
        [
            (LIMIT_REQUESTS, Text::Count(limit)),
            (REMAINING_REQUESTS, Text::Count(limit.saturating_sub(granted.requests_used))),
            (RESET_REQUESTS, Text::Seconds(granted.requests_reset_ms)),
        ]
    });
    let tokens = limits.tokens_per_minute.map(|limit| {
        [
            (LIMIT_TOKENS, Text::Count(limit)),
            (REMAINING_TOKENS, Text::Count(limit.saturating_sub(granted.tokens_used))),
            (RESET_TOKENS, Text::Seconds(granted.tokens_reset_ms)),
        ]
    });
    match (requests, tokens) {
        (Some(requests), Some(tokens)) => {
            let [a, b, c] = requests;
            let [d, e, f] = tokens;
            insert_all(headers, &[a, b, c, d, e, f]);
        }
        (Some(only), None) | (None, Some(only)) => insert_all(headers, &only),
        (None, None) => {}
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
        insert_all(
            headers,
            &[
                (limit, Text::Count(*limit_value)),
                (remaining, Text::Count(limit_value.saturating_sub(*used))),
                (reset, Text::Seconds(*retry_after_ms)),
            ],
        );
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
