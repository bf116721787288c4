//! Phase 4: limits. Requests and tokens per minute (key and team), token budgets, and the shared
//! brute-force lockout. Runs after routing, so requests for unknown or forbidden models cost
//! nothing, and before any upstream call.

use std::net::IpAddr;

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

fn duration_text(ms: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("{:.3}s", ms as f64 / 1000.0)).unwrap_or_else(|_| HeaderValue::from_static("0s"))
}

/// OpenAI-style `x-ratelimit-*` headers for an admitted request.
pub fn rate_headers(ticket: &Ticket, headers: &mut HeaderMap) {
    let limits = &ticket.admission.key.limits;
    let granted = &ticket.granted;
    if let Some(limit) = limits.requests_per_minute {
        headers.insert("x-ratelimit-limit-requests", HeaderValue::from(limit));
        headers
            .insert("x-ratelimit-remaining-requests", HeaderValue::from(limit.saturating_sub(granted.requests_used)));
        headers.insert("x-ratelimit-reset-requests", duration_text(granted.requests_reset_ms));
    }
    if let Some(limit) = limits.tokens_per_minute {
        headers.insert("x-ratelimit-limit-tokens", HeaderValue::from(limit));
        headers.insert("x-ratelimit-remaining-tokens", HeaderValue::from(limit.saturating_sub(granted.tokens_used)));
        headers.insert("x-ratelimit-reset-tokens", duration_text(granted.tokens_reset_ms));
    }
}

/// The same headers on a 429.
pub fn refusal_headers(error: &GatewayError, headers: &mut HeaderMap) {
    if let GatewayError::RateLimited { retry_after_ms, limit_value, used, tokens, .. } = error {
        let kind = if *tokens { "tokens" } else { "requests" };
        let set = |headers: &mut HeaderMap, name: String, value: HeaderValue| {
            if let Ok(name) = http::header::HeaderName::from_bytes(name.as_bytes()) {
                headers.insert(name, value);
            }
        };
        set(headers, format!("x-ratelimit-limit-{kind}"), HeaderValue::from(*limit_value));
        set(headers, format!("x-ratelimit-remaining-{kind}"), HeaderValue::from(limit_value.saturating_sub(*used)));
        set(headers, format!("x-ratelimit-reset-{kind}"), duration_text(*retry_after_ms));
    }
}
