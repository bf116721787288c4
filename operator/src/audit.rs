//! Which admin actions an observed object represents — pure, no client, no clock.
//!
//! ```text
//!   ledger entries ──replay──▶ Recorded (per kind/namespace/name)
//!   object now ──observe──▶ Observed ─┐
//!                                     ├─decide──▶ [Draft] ──(cluster::audit appends)──▶ ledger
//!   Recorded ─────────────────────────┘
//! ```
//!
//! The ledger itself is the durable state: every entry carries the facts it was decided from
//! (`revoked`, `rotation`, `expired`, `keyVersion`, `active`, `activeKeyId`), so an operator that
//! restarts replays the ledger and neither repeats nor skips an action. Spec values are kept in
//! memory only (to name changed fields): after a restart, a change made while the operator was
//! down is summarised as `spec`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use portcullis_crds::v1alpha1::{ApiKey, KillSwitch, ProviderCredential};
use serde_json::Value;

use crate::ledger::{changed_fields, Action, Actor, LedgerEntry, ObjectReference};

/// Finalizer that holds a deleted object until its deletion is in the ledger.
pub const FINALIZER: &str = "portcullis.dev/audit-ledger";
/// Field manager that owns only the finalizer, so it never shows up as an object's actor.
pub const FINALIZER_MANAGER: &str = "portcullis-operator-audit";

/// `(kind, namespace, name)`.
pub type AuditKey = (String, String, String);

pub fn key_of(object: &ObjectReference) -> AuditKey {
    (object.kind.clone(), object.namespace.clone(), object.name.clone())
}

/// One object as it is now.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub object: ObjectReference,
    pub deleting: bool,
    /// The spec (names and settings only; specs never hold secret values).
    pub spec: Value,
    pub facts: BTreeMap<String, String>,
}

/// What the ledger last said about one object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recorded {
    pub uid: String,
    pub generation: i64,
    pub facts: BTreeMap<String, String>,
    pub deleted: bool,
    /// Known only for entries this process wrote.
    pub spec: Option<Value>,
}

/// One entry to append.
#[derive(Clone, Debug, PartialEq)]
pub struct Draft {
    pub action: Action,
    pub changed_fields: Vec<String>,
    /// The operator itself did this (expiry): the actor is the operator.
    pub by_operator: bool,
}

fn flag(value: bool) -> String {
    value.to_string()
}

fn metadata_ref(kind: &str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectReference {
    ObjectReference {
        kind: kind.to_owned(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        generation: meta.generation.unwrap_or_default(),
    }
}

/// An object whose spec does not read (malformed): its metadata only. What the ledger decides
/// on its deletion needs nothing more (see [`decide`]).
pub fn observe_unreadable(kind: &str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Observed {
    Observed {
        object: metadata_ref(kind, meta),
        deleting: meta.deletion_timestamp.is_some(),
        spec: Value::Null,
        facts: BTreeMap::new(),
    }
}

pub fn observe_api_key(key: &ApiKey, now: DateTime<Utc>) -> Observed {
    let facts = BTreeMap::from([
        ("revoked".to_owned(), flag(key.spec.revoked)),
        ("expired".to_owned(), flag(key.spec.expires_at.is_some_and(|at| at <= now))),
        ("rotation".to_owned(), key.spec.rotation_token()),
    ]);
    Observed {
        object: metadata_ref("ApiKey", &key.metadata),
        deleting: key.metadata.deletion_timestamp.is_some(),
        spec: serde_json::to_value(&key.spec).unwrap_or(Value::Null),
        facts,
    }
}

/// `key_version` is the version the snapshot holds (the credential's status), if any yet.
pub fn observe_credential(credential: &ProviderCredential, key_version: Option<u64>) -> Observed {
    let facts = key_version.map(|v| ("keyVersion".to_owned(), v.to_string())).into_iter().collect();
    Observed {
        object: metadata_ref("ProviderCredential", &credential.metadata),
        deleting: credential.metadata.deletion_timestamp.is_some(),
        spec: serde_json::to_value(&credential.spec).unwrap_or(Value::Null),
        facts,
    }
}

pub fn observe_kill_switch(switch: &KillSwitch, now: DateTime<Utc>) -> Observed {
    let expired = switch.spec.expires_at.is_some_and(|at| at <= now);
    let facts = BTreeMap::from([
        ("active".to_owned(), flag(switch.spec.active && !expired)),
        ("expired".to_owned(), flag(expired)),
    ]);
    Observed {
        object: metadata_ref("KillSwitch", &switch.metadata),
        deleting: switch.metadata.deletion_timestamp.is_some(),
        spec: serde_json::to_value(&switch.spec).unwrap_or(Value::Null),
        facts,
    }
}

/// The master keyring Secret: only which key is active (never key material).
pub fn observe_keyring(namespace: &str, name: &str, uid: &str, active_key_id: &str) -> Observed {
    Observed {
        object: ObjectReference {
            kind: "Secret".into(),
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
            generation: 0,
        },
        deleting: false,
        spec: Value::Null,
        facts: BTreeMap::from([("activeKeyId".to_owned(), active_key_id.to_owned())]),
    }
}

/// What the ledger says about every object, from its entries in order.
pub fn replay<'a>(entries: impl IntoIterator<Item = &'a LedgerEntry>) -> HashMap<AuditKey, Recorded> {
    let mut recorded = HashMap::new();
    for entry in entries {
        remember(&mut recorded, entry, None);
    }
    recorded
}

/// Folds one appended entry into `recorded`.
pub fn remember(recorded: &mut HashMap<AuditKey, Recorded>, entry: &LedgerEntry, spec: Option<Value>) {
    let deleted = entry.facts.get("deleted").is_some_and(|d| d == "true");
    recorded.insert(
        key_of(&entry.object),
        Recorded {
            uid: entry.object.uid.clone(),
            generation: entry.object.generation,
            facts: entry.facts.clone(),
            deleted,
            spec,
        },
    );
}

fn fact<'a>(facts: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    facts.get(name).map_or("", String::as_str)
}

fn draft(action: Action, changed_fields: Vec<String>) -> Draft {
    Draft { action, changed_fields, by_operator: false }
}

/// The actions `observed` represents since `recorded`. Facts of the appended entries are
/// `observed.facts` (plus `deleted` for a deletion).
pub fn decide(recorded: Option<&Recorded>, observed: &Observed) -> Vec<Draft> {
    let kind = observed.object.kind.as_str();
    // A recreated object (same name, new uid) starts afresh.
    let same_object =
        |r: &&Recorded| r.uid == observed.object.uid || r.uid.is_empty() || observed.object.uid.is_empty();
    if recorded.filter(same_object).is_some_and(|r| r.deleted) {
        // Its deletion is already in the ledger (the finalizer may still be on it).
        return vec![];
    }
    let recorded = recorded.filter(same_object).filter(|r| !r.deleted);
    let facts = &observed.facts;
    let Some(before) = recorded else {
        if observed.deleting {
            // Never seen alive: its deletion is still an action on a key or credential.
            return match kind {
                "ApiKey" => vec![draft(Action::ApiKeyDeleted, vec![])],
                "ProviderCredential" => vec![draft(Action::ProviderCredentialDeleted, vec![])],
                _ => vec![],
            };
        }
        return match kind {
            "ApiKey" => vec![draft(Action::ApiKeyCreated, vec![])],
            "ProviderCredential" => vec![draft(Action::ProviderCredentialCreated, vec![])],
            "KillSwitch" if fact(facts, "active") == "true" => {
                vec![draft(Action::KillSwitchActivated, vec!["spec.active".into()])]
            }
            // The first keyring the ledger sees is recorded as the rotation to it.
            "Secret" => vec![draft(Action::MasterKeyRotated, vec!["data.active".into()])],
            _ => vec![],
        };
    };
    let fields = || match &before.spec {
        Some(old) => changed_fields("spec", old, &observed.spec),
        None if before.generation != observed.object.generation => vec!["spec".to_owned()],
        None => vec![],
    };
    let changed = |name: &str| fact(&before.facts, name) != fact(facts, name);
    if observed.deleting {
        return match kind {
            "ApiKey" => vec![draft(Action::ApiKeyDeleted, vec![])],
            "ProviderCredential" => vec![draft(Action::ProviderCredentialDeleted, vec![])],
            "KillSwitch" if fact(&before.facts, "active") == "true" => {
                vec![draft(Action::KillSwitchDeactivated, vec!["metadata.deletionTimestamp".into()])]
            }
            _ => vec![],
        };
    }
    let mut out = Vec::new();
    match kind {
        "ApiKey" => {
            if changed("revoked") && fact(facts, "revoked") == "true" {
                out.push(draft(Action::ApiKeyRevoked, fields()));
            }
            // A value kept raw before long ones stood as their digest is the same rotation.
            let raw_rotation = observed.spec.get("rotation").and_then(Value::as_str);
            if changed("rotation") && raw_rotation != Some(fact(&before.facts, "rotation")) {
                out.push(draft(Action::ApiKeyRotated, fields()));
            }
            if changed("expired") && fact(facts, "expired") == "true" {
                out.push(Draft { action: Action::ApiKeyExpired, changed_fields: vec![], by_operator: true });
            }
        }
        "ProviderCredential" => {
            let version = |f: &BTreeMap<String, String>| f.get("keyVersion").and_then(|v| v.parse::<u64>().ok());
            // Version 1 is the first seal, part of creation; later versions are rotations.
            let known = version(&before.facts).unwrap_or(1);
            if version(facts).is_some_and(|now| now > known) {
                out.push(draft(
                    Action::ProviderCredentialRotated,
                    vec!["secretRef (referenced Secret content)".into()],
                ));
            }
        }
        "KillSwitch" if changed("active") => {
            if fact(facts, "active") == "true" {
                out.push(draft(Action::KillSwitchActivated, fields()));
            } else if fact(facts, "expired") == "true" && fact(&before.facts, "expired") != "true" {
                out.push(Draft { action: Action::KillSwitchExpired, changed_fields: vec![], by_operator: true });
            } else {
                out.push(draft(Action::KillSwitchDeactivated, fields()));
            }
        }
        "Secret" if changed("activeKeyId") => out.push(draft(Action::MasterKeyRotated, vec!["data.active".into()])),
        _ => {}
    }
    out
}

/// Facts to store with a draft's entry.
pub fn entry_facts(observed: &Observed) -> BTreeMap<String, String> {
    let mut facts = observed.facts.clone();
    if observed.deleting {
        facts.insert("deleted".into(), "true".into());
    }
    facts
}

/// The most recent writer of an object other than the operator itself (its status writes and
/// finalizer are not admin actions).
pub fn actor_from_managed_fields(managed: &[ManagedFieldsEntry]) -> Option<Actor> {
    let human: Vec<ManagedFieldsEntry> = managed
        .iter()
        .filter(|m| m.subresource.as_deref().is_none_or(str::is_empty))
        .filter(|m| !matches!(m.manager.as_deref(), Some(crate::issuance::MANAGER | FINALIZER_MANAGER)))
        .cloned()
        .collect();
    Actor::from_managed_fields(&human)
}

/// Actors the admission webhook saw, waiting for the reconciler.
///
/// Keyed by `(kind, namespace, name)`; the newest request wins. Limits, stated plainly: it lives in
/// memory of the replica that served the webhook call. The webhook Service routes to the leader
/// only (`cluster::webhook_leader`), but during a failover a hint can reach a replica that does
/// not append, or die with a restarting leader; the entry then falls back to `managedFields`. A
/// request that a later admission stage rejects still leaves its hint; two changes to one object
/// faster than one reconcile are attributed to the last requester. At most `capacity` hints are
/// kept, oldest dropped first, each bounded in size (`admission::hint_actor`). A hint is what the
/// request said: unless the webhook requires the API server's client certificate
/// (`webhook::ClientAuthSettings`), anyone who reaches its port can say it.
#[derive(Debug)]
pub struct ActorHints {
    capacity: usize,
    hints: Mutex<VecDeque<(AuditKey, Actor)>>,
}

impl Default for ActorHints {
    fn default() -> Self {
        Self::with_capacity(4096)
    }
}

impl ActorHints {
    pub fn with_capacity(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), hints: Mutex::new(VecDeque::new()) }
    }

    pub fn record(&self, key: AuditKey, actor: Actor) {
        let mut hints = self.hints.lock().unwrap_or_else(|p| p.into_inner());
        hints.retain(|(k, _)| *k != key);
        while hints.len() >= self.capacity {
            hints.pop_front();
        }
        hints.push_back((key, actor));
    }

    /// The hint for `key`, if any; it is used once.
    pub fn take(&self, key: &AuditKey) -> Option<Actor> {
        let mut hints = self.hints.lock().unwrap_or_else(|p| p.into_inner());
        let at = hints.iter().position(|(k, _)| k == key)?;
        hints.remove(at).map(|(_, actor)| actor)
    }

    /// What a hint says, without taking it (tests look; the ledger takes).
    #[cfg(test)]
    pub fn peek(&self, key: &AuditKey) -> Option<Actor> {
        let hints = self.hints.lock().unwrap_or_else(|p| p.into_inner());
        hints.iter().find(|(k, _)| k == key).map(|(_, a)| a.clone())
    }

    pub fn len(&self) -> usize {
        self.hints.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[path = "audit/tests.rs"]
mod tests;
