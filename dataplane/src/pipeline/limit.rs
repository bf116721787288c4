//! Phase 4: limits. Requests and tokens per minute (key and team), token budgets, and the shared
//! brute-force lockout. Runs after routing, so requests for unknown or forbidden models cost
//! nothing, and before any upstream call.

use std::net::IpAddr;

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};

use crate::api::{ApiFlavor, RequestHead};
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
    Some(
        admission
            .map(|admission| limiter.admit_in_process(admission))
            .transpose()
            .map_err(|e| admit_error(e, tokens, now_ms)),
    )
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
    decided.map_err(|e| admit_error(e, tokens, now_ms))
}

/// `tokens`: what the request reserved; `now_ms`: when it was admitted or refused.
fn admit_error(e: AdmitError, tokens: u64, now_ms: u64) -> GatewayError {
    match e {
        AdmitError::Unavailable => GatewayError::LimiterUnavailable,
        AdmitError::Busy => GatewayError::LimiterBusy,
        AdmitError::Refused(refusal) => refused(refusal, tokens, now_ms),
    }
}

fn refused(r: Refusal, reserved: u64, at_ms: u64) -> GatewayError {
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
            requested: if tokens { reserved } else { 1 },
            at_ms,
        }
    }
}

/// The rate-limit fields of one API's responses, each group in the order limit, remaining, reset.
struct Names {
    /// What every one of the names starts with.
    prefix: &'static [u8],
    requests: [HeaderName; 3],
    tokens: [HeaderName; 3],
}

/// OpenAI's: the reset is a duration (`1.250s`).
static OPENAI: Names = Names {
    prefix: b"x-ratelimit-",
    requests: [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ],
    tokens: [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ],
};

/// Anthropic's: the reset is an instant (RFC 3339, `2026-11-25T10:00:01Z`).
static ANTHROPIC: Names = Names {
    prefix: b"anthropic-ratelimit-",
    requests: [
        HeaderName::from_static("anthropic-ratelimit-requests-limit"),
        HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
        HeaderName::from_static("anthropic-ratelimit-requests-reset"),
    ],
    tokens: [
        HeaderName::from_static("anthropic-ratelimit-tokens-limit"),
        HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
    ],
};

fn names(flavor: ApiFlavor) -> &'static Names {
    match flavor {
        ApiFlavor::OpenAi => &OPENAI,
        ApiFlavor::Anthropic => &ANTHROPIC,
    }
}

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

/// The instant `ms` after the Unix epoch, rounded up to its second, in RFC 3339 (UTC), written
/// digit by digit; instants past year 9999 are written as its last second.
fn push_instant(out: &mut Vec<u8>, ms: u64) {
    use chrono::{Datelike, Timelike};
    let seconds = i64::try_from(ms.div_ceil(1000)).unwrap_or(i64::MAX);
    let (date, time) = chrono::DateTime::from_timestamp(seconds, 0)
        .filter(|at| at.year() <= 9999)
        .map_or(((9999, 12, 31), (23, 59, 59)), |at| {
            ((at.year() as u32, at.month(), at.day()), (at.hour(), at.minute(), at.second()))
        });
    let two = |out: &mut Vec<u8>, n: u32| out.extend_from_slice(&[b'0' + (n / 10 % 10) as u8, b'0' + (n % 10) as u8]);
    let ((year, month, day), (hour, minute, second)) = (date, time);
    two(out, year / 100);
    two(out, year % 100);
    out.push(b'-');
    two(out, month);
    out.push(b'-');
    two(out, day);
    out.push(b'T');
    two(out, hour);
    out.push(b':');
    two(out, minute);
    out.push(b':');
    two(out, second);
    out.push(b'Z');
}

/// A rate-limit header value.
#[derive(Debug, Clone, Copy)]
enum Text {
    Count(u64),
    /// A reset as a duration in milliseconds (OpenAI's `1.250s`).
    Seconds(u64),
    /// A reset as an instant, milliseconds after the Unix epoch (Anthropic's RFC 3339).
    Instant(u64),
}

impl Text {
    fn push(self, out: &mut Vec<u8>) {
        match self {
            Text::Count(n) => push_decimal(out, n),
            Text::Seconds(ms) => push_seconds(out, ms),
            Text::Instant(ms) => push_instant(out, ms),
        }
    }
}

/// One rate-limit group: a limit, what is left of it, and when it resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    limit: u64,
    remaining: u64,
    reset_ms: u64,
}

/// The rate-limit headers of a response, in the route's API's own names: OpenAI's
/// `x-ratelimit-*` or Anthropic's `anthropic-ratelimit-*`.
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
    flavor: ApiFlavor,
    /// Wall-clock milliseconds the resets count from (Anthropic's are instants).
    at_ms: u64,
}

impl RateHeaders {
    /// Request limits only, for tests elsewhere.
    #[cfg(test)]
    pub fn requests(limit: u64, remaining: u64, reset_ms: u64) -> Self {
        Self {
            requests: Some(Window { limit, remaining, reset_ms }),
            tokens: None,
            flavor: ApiFlavor::OpenAi,
            at_ms: 0,
        }
    }

    /// What an admitted request has left, in `flavor`'s names; `None` when its key has no
    /// per-minute limits.
    pub fn for_ticket(ticket: &Ticket, flavor: ApiFlavor) -> Option<Self> {
        let limits = &ticket.admission.key().limits;
        let granted = &ticket.granted;
        let window = |limit: Option<u64>, used: u64, reset_ms: u64| {
            limit.map(|limit| Window { limit, remaining: limit.saturating_sub(used), reset_ms })
        };
        let headers = Self {
            requests: window(limits.requests_per_minute, granted.requests_used, granted.requests_reset_ms),
            tokens: window(limits.tokens_per_minute, granted.tokens_used, granted.tokens_reset_ms),
            flavor,
            at_ms: ticket.admission.at_ms,
        };
        (headers.requests.is_some() || headers.tokens.is_some()).then_some(headers)
    }

    /// The limit that refused a request, on its 429.
    fn for_refusal(error: &GatewayError, flavor: ApiFlavor) -> Option<Self> {
        let GatewayError::RateLimited { retry_after_ms, limit_value, used, tokens, at_ms, .. } = error else {
            return None;
        };
        let window = Some(Window {
            limit: *limit_value,
            remaining: limit_value.saturating_sub(*used),
            reset_ms: *retry_after_ms,
        });
        let (requests, tokens) = if *tokens { (None, window) } else { (window, None) };
        Some(Self { requests, tokens, flavor, at_ms: *at_ms })
    }

    fn each(&self, mut field: impl FnMut(&HeaderName, Text)) {
        let names = names(self.flavor);
        let reset = |ms: u64| match self.flavor {
            ApiFlavor::OpenAi => Text::Seconds(ms),
            ApiFlavor::Anthropic => Text::Instant(self.at_ms.saturating_add(ms)),
        };
        for (window, [limit, remaining, resets]) in [(self.requests, &names.requests), (self.tokens, &names.tokens)] {
            if let Some(w) = window {
                field(limit, Text::Count(w.limit));
                field(remaining, Text::Count(w.remaining));
                field(resets, reset(w.reset_ms));
            }
        }
    }

    /// Whether `name` is one of the headers these replace: a field of a group they carry.
    pub fn replaces(&self, name: &[u8]) -> bool {
        let names = names(self.flavor);
        let carried = |window: Option<Window>, group: &[HeaderName; 3]| {
            window.is_some() && group.iter().any(|ours| ours.as_str().as_bytes() == name)
        };
        // Every name of the API starts with its prefix; most fields of a response do not.
        name.starts_with(names.prefix)
            && (carried(self.requests, &names.requests) || carried(self.tokens, &names.tokens))
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

    /// How many headers these are: three per window carried.
    pub fn count(&self) -> usize {
        3 * (usize::from(self.requests.is_some()) + usize::from(self.tokens.is_some()))
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

/// The headers of the limit that refused a request, on its 429, in `flavor`'s names.
pub fn refusal_headers(error: &GatewayError, flavor: ApiFlavor, headers: &mut HeaderMap) {
    if let Some(rate) = RateHeaders::for_refusal(error, flavor) {
        rate.insert_into(headers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(limit: u64, remaining: u64, reset_ms: u64) -> Option<Window> {
        Some(Window { limit, remaining, reset_ms })
    }

    /// The head lines `rate` encodes, and the same fields inserted into a map that held `prior`:
    /// they must agree, and only the carried group's names may be replaced.
    fn encoded_and_inserted(rate: &RateHeaders, prior: &[(&'static str, &'static str)]) -> (String, HeaderMap) {
        let mut encoded = Vec::new();
        rate.encode(&mut encoded);
        let mut headers = HeaderMap::new();
        for (name, value) in prior {
            headers.insert(*name, HeaderValue::from_static(value));
        }
        rate.insert_into(&mut headers);
        let lines: String = headers
            .iter()
            .filter(|(name, _)| rate.replaces(name.as_str().as_bytes()))
            .map(|(name, value)| format!("{name}: {}\r\n", value.to_str().unwrap()))
            .collect();
        let encoded = String::from_utf8(encoded).unwrap();
        assert_eq!(lines, encoded);
        (encoded, headers)
    }

    #[test]
    fn encoded_and_inserted_headers_agree_and_replace_only_their_group() {
        let rate = RateHeaders {
            requests: window(100, 97, 1_250),
            tokens: None,
            flavor: ApiFlavor::OpenAi,
            at_ms: 1_700_000_000_000,
        };
        let prior = [("x-ratelimit-limit-requests", "9"), ("x-ratelimit-limit-tokens", "9")];
        let (encoded, headers) = encoded_and_inserted(&rate, &prior);
        assert_eq!(
            encoded,
            "x-ratelimit-limit-requests: 100\r\nx-ratelimit-remaining-requests: 97\r\n\
             x-ratelimit-reset-requests: 1.250s\r\n"
        );
        assert_eq!(headers["x-ratelimit-limit-tokens"], "9");
        assert!(!rate.replaces(b"x-ratelimit-limit-tokens"));
        assert!(!rate.replaces(b"x-ratelimit-limit-requestsx"));
        assert!(!rate.replaces(b"anthropic-ratelimit-requests-limit"));
        assert!(!rate.replaces(b"content-type"));
    }

    #[test]
    fn every_name_starts_with_its_apis_prefix() {
        for names in [&OPENAI, &ANTHROPIC] {
            for name in names.requests.iter().chain(&names.tokens) {
                assert!(name.as_str().as_bytes().starts_with(names.prefix), "{name}");
            }
        }
    }

    #[test]
    fn anthropic_routes_get_anthropic_names_and_reset_instants() {
        // 2023-11-14T22:13:20Z, plus 1.25 s: the reset rounds up to the next whole second.
        let rate = RateHeaders {
            requests: window(50, 49, 1_250),
            tokens: window(40_000, 39_000, 60_000),
            flavor: ApiFlavor::Anthropic,
            at_ms: 1_700_000_000_000,
        };
        let prior = [
            ("anthropic-ratelimit-requests-limit", "4000"),
            ("anthropic-ratelimit-input-tokens-limit", "400000"),
            ("x-ratelimit-limit-requests", "9"),
        ];
        let (encoded, headers) = encoded_and_inserted(&rate, &prior);
        assert_eq!(
            encoded,
            "anthropic-ratelimit-requests-limit: 50\r\nanthropic-ratelimit-requests-remaining: 49\r\n\
             anthropic-ratelimit-requests-reset: 2023-11-14T22:13:22Z\r\n\
             anthropic-ratelimit-tokens-limit: 40000\r\nanthropic-ratelimit-tokens-remaining: 39000\r\n\
             anthropic-ratelimit-tokens-reset: 2023-11-14T22:14:20Z\r\n"
        );
        // The provider's own fields of other names stay, OpenAI's names are not Anthropic's.
        assert_eq!(headers["anthropic-ratelimit-input-tokens-limit"], "400000");
        assert_eq!(headers["x-ratelimit-limit-requests"], "9");
        assert!(!rate.replaces(b"x-ratelimit-limit-requests"));
    }

    #[test]
    fn reset_instants_are_rfc3339_seconds_like_chrono_writes_them() {
        for ms in [0, 1, 999, 1_000, 951_782_400_000, 1_709_164_799_001, 4_102_444_799_999, 253_402_300_799_000] {
            let mut written = Vec::new();
            push_instant(&mut written, ms);
            let expected = chrono::DateTime::from_timestamp(ms.div_ceil(1000) as i64, 0)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            assert_eq!(String::from_utf8(written).unwrap(), expected, "{ms}");
        }
        // Past year 9999 (no reset is that far; a wrong clock could say so): the last second.
        for ms in [253_402_300_800_000, u64::MAX] {
            let mut written = Vec::new();
            push_instant(&mut written, ms);
            assert_eq!(written, b"9999-12-31T23:59:59Z");
        }
    }

    #[test]
    fn a_refusal_names_its_own_group_in_the_routes_api() {
        let error = GatewayError::RateLimited {
            limit: "tokens_per_minute",
            retry_after_ms: 2_000,
            limit_value: 1_000,
            used: 1_200,
            tokens: true,
            requested: 300,
            at_ms: 1_700_000_000_000,
        };
        let mut headers = HeaderMap::new();
        refusal_headers(&error, ApiFlavor::Anthropic, &mut headers);
        assert_eq!(headers["anthropic-ratelimit-tokens-remaining"], "0");
        assert_eq!(headers.len(), 3, "{headers:?}");
        // Counted from the refusal's own instant (2023-11-14T22:13:20Z), two seconds on.
        assert_eq!(headers["anthropic-ratelimit-tokens-reset"], "2023-11-14T22:13:22Z");
        let mut headers = HeaderMap::new();
        refusal_headers(&error, ApiFlavor::OpenAi, &mut headers);
        assert_eq!(headers["x-ratelimit-reset-tokens"], "2.000s");
        assert_eq!(headers.len(), 3, "{headers:?}");
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

    /// Over HTTP/2 the limit is indexed (it repeats), what is left and when it resets are not.
    #[test]
    fn only_the_limits_themselves_are_indexed() {
        for names in [&OPENAI, &ANTHROPIC] {
            for [limit, remaining, reset] in [&names.requests, &names.tokens] {
                assert!(!super::super::forward::varies_per_response(limit.as_str().as_bytes()), "{limit}");
                assert!(super::super::forward::varies_per_response(remaining.as_str().as_bytes()), "{remaining}");
                assert!(super::super::forward::varies_per_response(reset.as_str().as_bytes()), "{reset}");
            }
        }
        let both = RateHeaders { tokens: window(5, 4, 9), ..RateHeaders::requests(1, 0, 2) };
        assert_eq!((both.count(), RateHeaders::requests(1, 0, 2).count()), (6, 3));
    }
}
