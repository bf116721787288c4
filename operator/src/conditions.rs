//! Status conditions: what `Ready` says about an object, and merging it into the existing list
//! so that `lastTransitionTime` only moves on a real transition (and unchanged status causes no
//! write).

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";

/// Why an object is or is not Ready. The string forms are part of the API (conditions, Events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyReason {
    /// In the snapshot and enforced as declared.
    Active,
    /// A generated key is waiting to be issued.
    Pending,
    Expired,
    Revoked,
    InvalidSpec,
    SecretNotFound,
}

impl ReadyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadyReason::Active => "Active",
            ReadyReason::Pending => "Pending",
            ReadyReason::Expired => "Expired",
            ReadyReason::Revoked => "Revoked",
            ReadyReason::InvalidSpec => "InvalidSpec",
            ReadyReason::SecretNotFound => "SecretNotFound",
        }
    }

    pub fn is_ready(self) -> bool {
        matches!(self, ReadyReason::Active)
    }
}

/// The Ready verdict for one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub reason: ReadyReason,
    pub message: String,
}

impl Readiness {
    pub fn new(reason: ReadyReason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}

/// Returns `existing` with Ready set to `readiness`, keeping `lastTransitionTime` when the
/// condition's status did not change.
pub fn with_ready(
    existing: &[Condition],
    readiness: &Readiness,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Vec<Condition> {
    let status = if readiness.reason.is_ready() { "True" } else { "False" };
    let set = ConditionSet { status, reason: readiness.reason.as_str(), message: &readiness.message };
    with_condition(existing, READY, Some(set), generation, now)
}

/// What one condition should say.
#[derive(Debug, Clone, Copy)]
pub struct ConditionSet<'a> {
    pub status: &'a str,
    pub reason: &'a str,
    pub message: &'a str,
}

/// Returns `existing` with the condition `type_` set (or removed when `set` is `None`), sorted
/// by type. `lastTransitionTime` is kept when the status did not change, so an unchanged
/// verdict gives an identical list (and no write).
pub fn with_condition(
    existing: &[Condition],
    type_: &str,
    set: Option<ConditionSet<'_>>,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = existing.iter().filter(|c| c.type_ != type_).cloned().collect();
    if let Some(set) = set {
        let last_transition_time = match existing.iter().find(|c| c.type_ == type_) {
            Some(p) if p.status == set.status => p.last_transition_time.clone(),
            _ => Time(now_timestamp(now)),
        };
        out.push(Condition {
            type_: type_.to_owned(),
            status: set.status.to_owned(),
            reason: set.reason.to_owned(),
            message: set.message.to_owned(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// The current Ready reason in `conditions`, if any.
pub fn ready_reason(conditions: &[Condition]) -> Option<&str> {
    conditions.iter().find(|c| c.type_ == READY).map(|c| c.reason.as_str())
}

fn now_timestamp(now: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_second(now.timestamp()).unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let t0: DateTime<Utc> = "2025-01-01T00:00:00Z".parse().unwrap_or_default();
        let t1 = t0 + chrono::Duration::minutes(5);
        let ready = Readiness::new(ReadyReason::Active, "ok");
        let first = with_ready(&[], &ready, Some(1), t0);
        let same = with_ready(&first, &ready, Some(1), t1);
        assert_eq!(first, same, "no-op status must be identical (no write)");
        let revoked = with_ready(&same, &Readiness::new(ReadyReason::Revoked, "revoked"), Some(2), t1);
        assert_eq!(revoked[0].status, "False");
        assert_eq!(revoked[0].reason, "Revoked");
        assert_ne!(revoked[0].last_transition_time, first[0].last_transition_time);
        assert_eq!(ready_reason(&revoked), Some("Revoked"));
    }
}
