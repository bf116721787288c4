//! Key issuance for generated ApiKeys: when to generate a key, what the durable record holds,
//! and what happens to the reveal Secret. Pure: the clock, the random source and what the
//! cluster holds are all arguments.
//!
//! The durable record is `status.issuedDigests` (digests only). The plaintext exists once, in the
//! reveal Secret. Writes happen reveal-first: if the operator dies between writing the reveal
//! Secret and the status, the next reconcile adopts the key in the reveal Secret instead of
//! generating another, so no key is ever issued twice or lost. Once the record holds a digest for
//! the current `spec.rotation`, nothing — a restart, a deleted reveal Secret — issues a new key.

use chrono::{DateTime, Duration, Utc};
use portcullis_crds::digest::{ClientKey, KeyMaterialError, Pepper};
use portcullis_crds::snapshot::IssuedDigest;
use portcullis_crds::v1alpha1::{ApiKey, IssuedKeyDigest};

/// Annotation on a reveal Secret: the `spec.rotation` its key was issued for.
pub const ROTATION_ANNOTATION: &str = "portcullis.dev/rotation";
/// Annotation users set to `"true"` once they have stored the key; the operator then deletes
/// the reveal Secret.
pub const CONSUMED_ANNOTATION: &str = "portcullis.dev/consumed";
/// Label marking Secrets the operator writes.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`]; also the server-side-apply field manager.
pub const MANAGER: &str = "portcullis-operator";
/// Data key of the reveal Secret holding the plaintext key.
pub const REVEAL_KEY_FIELD: &str = "key";

/// Name of the Secret revealing the key of ApiKey `name`.
pub fn reveal_secret_name(api_key_name: &str) -> String {
    format!("{api_key_name}-apikey-reveal")
}

/// What the cluster holds in an ApiKey's reveal Secret, read by the reconciler.
#[derive(Debug, Clone)]
pub struct RevealView {
    /// The `spec.rotation` the key was issued for.
    pub rotation: String,
    pub consumed: bool,
    pub created_at: Option<DateTime<Utc>>,
    /// The key it holds, when well formed.
    pub key: Option<ClientKey>,
}

/// What to do with the reveal Secret.
#[derive(Debug)]
pub enum RevealAction {
    Keep,
    /// Write a new reveal Secret holding `key` (before the status records its digest).
    Write {
        key: ClientKey,
    },
    Delete,
}

/// A transition worth an Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssuanceEvent {
    Issued,
    Rotated,
    /// Adopted a key found in the reveal Secret after an interrupted issuance.
    Recovered,
}

/// The outcome of [`decide`]: the status record to write and the reveal Secret action.
#[derive(Debug)]
pub struct Issuance {
    pub digests: Vec<IssuedKeyDigest>,
    pub rotation: Option<String>,
    pub issued_at: Option<DateTime<Utc>>,
    pub key_prefix: Option<String>,
    pub reveal: RevealAction,
    /// Whether a reveal Secret exists after the action.
    pub reveal_present: bool,
    pub reveal_expires_at: Option<DateTime<Utc>>,
    /// Next moment something changes on its own (grace end, reveal expiry).
    pub requeue_at: Option<DateTime<Utc>>,
    pub event: Option<IssuanceEvent>,
}

/// Decides issuance for `api_key` at `now`. `generate` is only called when a key is issued.
pub fn decide(
    api_key: &ApiKey,
    reveal: Option<&RevealView>,
    pepper: &Pepper,
    now: DateTime<Utc>,
    reveal_ttl: Duration,
    generate: impl FnOnce() -> Result<ClientKey, KeyMaterialError>,
) -> Result<Issuance, KeyMaterialError> {
    let status = api_key.status.clone().unwrap_or_default();
    if api_key.spec.secret_ref.is_some() {
        // A brought key: nothing to issue; a reveal Secret left from before has no purpose.
        return Ok(Issuance {
            digests: Vec::new(),
            rotation: None,
            issued_at: None,
            key_prefix: None,
            reveal: if reveal.is_some() { RevealAction::Delete } else { RevealAction::Keep },
            reveal_present: false,
            reveal_expires_at: None,
            requeue_at: None,
            event: None,
        });
    }
    let token = api_key.spec.rotation_token();
    let mut digests: Vec<IssuedKeyDigest> =
        status.issued_digests.iter().filter(|d| d.valid_until.is_none_or(|until| until > now)).cloned().collect();
    let current = digests.iter().position(|d| d.valid_until.is_none());
    let recorded_token = status.rotation.clone().unwrap_or_default();
    let needs_key = match current {
        None => !api_key.spec.revoked,
        Some(_) => !api_key.spec.rotation_is(&recorded_token),
    };

    let mut issued_at = status.issued_at;
    let mut key_prefix = status.key_prefix.clone();
    let mut reveal_expires_at = status.reveal_expires_at;
    let mut event = None;
    let mut action = RevealAction::Keep;
    let mut reveal_present = reveal.is_some();

    if needs_key {
        // Retire the current key for the declared grace period.
        if let Some(i) = current {
            let grace = api_key.spec.rotation_grace();
            if grace > Duration::zero() {
                digests[i].valid_until = Some(now + grace);
            } else {
                digests.remove(i);
            }
        }
        let adoptable = reveal.filter(|r| api_key.spec.rotation_is(&r.rotation)).and_then(|r| {
            let key = r.key.as_ref()?;
            let digest = key.digest(pepper).to_hex();
            // A key already recorded (e.g. the one being retired) is not a new issuance.
            (!status.issued_digests.iter().any(|d| d.digest == digest)).then(|| (key.clone(), r.created_at))
        });
        let (key, at) = match adoptable {
            Some((key, created)) => {
                event = Some(IssuanceEvent::Recovered);
                (key, created.unwrap_or(now))
            }
            None => {
                let key = generate()?;
                action = RevealAction::Write { key: key.clone() };
                reveal_present = true;
                event = Some(if current.is_some() { IssuanceEvent::Rotated } else { IssuanceEvent::Issued });
                reveal_expires_at = Some(now + reveal_ttl);
                (key, now)
            }
        };
        if event == Some(IssuanceEvent::Recovered) {
            reveal_expires_at = Some(at + reveal_ttl);
        }
        let prefix = key.display_prefix();
        digests.insert(
            0,
            IssuedKeyDigest {
                digest: key.digest(pepper).to_hex(),
                key_prefix: Some(prefix.clone()),
                valid_until: None,
                pepper_id: Some(pepper.id()),
            },
        );
        issued_at = Some(at);
        key_prefix = Some(prefix);
    } else if let Some(r) = reveal {
        let expired = reveal_expires_at.or_else(|| r.created_at.map(|c| c + reveal_ttl)).is_none_or(|at| at <= now);
        if r.consumed || expired || !api_key.spec.rotation_is(&r.rotation) {
            action = RevealAction::Delete;
            reveal_present = false;
        }
    }
    if !reveal_present {
        reveal_expires_at = None;
    }

    let requeue_at = digests.iter().filter_map(|d| d.valid_until).chain(reveal_expires_at).min();
    Ok(Issuance {
        rotation: (!digests.is_empty()).then_some(token),
        digests,
        issued_at,
        key_prefix,
        reveal: action,
        reveal_present,
        reveal_expires_at,
        requeue_at,
        event,
    })
}

/// The snapshot's view of a status record; malformed digests are skipped (status is
/// operator-written, so a bad entry means someone edited it by hand).
/// Digests recorded under another pepper than `pepper_id` are left out: they match no key.
pub fn snapshot_digests(record: &[IssuedKeyDigest], pepper_id: &str) -> Vec<IssuedDigest> {
    record
        .iter()
        .filter(|d| d.pepper_id.as_deref().is_none_or(|id| id == pepper_id))
        .filter_map(|d| {
            Some(IssuedDigest {
                digest: portcullis_crds::digest::KeyDigest::from_hex(&d.digest).ok()?,
                valid_until: d.valid_until,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
