use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `previousHash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who made a change, and how we know.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Actor {
    pub username: String,
    #[serde(default)]
    pub groups: Vec<String>,
    pub source: ActorSource,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ActorSource {
    /// The admission webhook saw the request's `userInfo`.
    AdmissionWebhook,
    /// Without the webhook: the field manager that last wrote the object.
    ManagedFields,
    /// The operator itself (expiry, master-key rotation).
    Operator,
}

impl Actor {
    pub fn operator() -> Self {
        Actor { username: "portcullis-operator".to_owned(), groups: Vec::new(), source: ActorSource::Operator }
    }

    /// The manager of the most recent `managedFields` entry (by time), the best available
    /// actor when no admission webhook is installed.
    pub fn from_managed_fields(
        managed: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry],
    ) -> Option<Self> {
        managed
            .iter()
            .filter(|m| m.manager.is_some())
            .max_by_key(|m| m.time.as_ref().map(|t| t.0))
            .and_then(|m| m.manager.clone())
            .map(|username| Actor { username, groups: Vec::new(), source: ActorSource::ManagedFields })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    ApiKeyCreated,
    ApiKeyRotated,
    ApiKeyRevoked,
    ApiKeyExpired,
    ApiKeyDeleted,
    ProviderCredentialCreated,
    ProviderCredentialRotated,
    ProviderCredentialDeleted,
    MasterKeyRotated,
    KillSwitchActivated,
    KillSwitchDeactivated,
    KillSwitchExpired,
}

/// The object an action was about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub generation: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    pub sequence: u64,
    pub time: DateTime<Utc>,
    pub actor: Actor,
    pub action: Action,
    pub object: ObjectReference,
    /// Paths of spec fields that changed (`spec.revoked`), never their values.
    #[serde(default)]
    pub changed_fields: Vec<String>,
    /// Non-secret facts the action was decided from (`revoked`, `active`, `keyVersion`,
    /// `rotation`, `activeKeyId`), so a restarted operator can continue from the ledger alone.
    /// Absent when empty, so entries written before this field hash as they did.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub facts: BTreeMap<String, String>,
    pub previous_hash: String,
    pub hash: String,
}

/// What an entry says before the chain gives it a sequence number and hashes.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub time: DateTime<Utc>,
    pub actor: Actor,
    pub action: Action,
    pub object: ObjectReference,
    pub changed_fields: Vec<String>,
    pub facts: BTreeMap<String, String>,
}

impl LedgerEntry {
    /// A new entry after `previous` (or the first one), hashed.
    pub fn next(previous: Option<&LedgerEntry>, new: NewEntry) -> Self {
        let NewEntry { time, actor, action, object, changed_fields, facts } = new;
        let (sequence, previous_hash) = match previous {
            Some(p) => (p.sequence + 1, p.hash.clone()),
            None => (1, GENESIS_HASH.to_owned()),
        };
        let mut entry = LedgerEntry {
            sequence,
            time,
            actor,
            action,
            object,
            changed_fields,
            facts,
            previous_hash,
            hash: String::new(),
        };
        entry.hash = entry.compute_hash();
        entry
    }

    /// An entry as stored: accepted only in its canonical encoding, byte for byte (what
    /// [`FileLedger`](super::FileLedger) writes and Redis holds). Parsing alone is not enough: a
    /// key renamed where its value equals the default (`"groups":[]`, `"generation":0`), or an
    /// added key, reads back as the same entry with the same hash, so such an edit of the
    /// stored bytes would go unnoticed (seen on a ledger the cluster suite produced).
    pub fn from_stored(bytes: &[u8]) -> Option<Self> {
        let entry: LedgerEntry = serde_json::from_slice(bytes).ok()?;
        (serde_json::to_vec(&entry).ok()? == bytes).then_some(entry)
    }

    /// SHA-256 over the canonical encoding: this struct's JSON, fields in declaration order,
    /// with `hash` empty.
    pub fn compute_hash(&self) -> String {
        let unhashed = LedgerEntry { hash: String::new(), ..self.clone() };
        let bytes = serde_json::to_vec(&unhashed).unwrap_or_default();
        hex::encode(Sha256::digest(&bytes))
    }
}

/// Paths (`spec.a.b`, `spec.list[2]`) where `old` and `new` differ. Values are never returned.
pub fn changed_fields(prefix: &str, old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff(prefix, old, new, &mut out);
    out
}

fn diff(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let child = format!("{path}.{key}");
                diff(&child, a.get(key).unwrap_or(&Value::Null), b.get(key).unwrap_or(&Value::Null), out);
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), x, y, out);
            }
        }
        (a, b) if a != b => out.push(path.to_owned()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn changed_fields_name_paths_only() {
        let old = json!({"revoked": false, "allowedModels": ["a", "b"], "limits": {"requestsPerMinute": 5}, "secretRef": {"name": "s"}});
        let new = json!({"revoked": true, "allowedModels": ["a", "c"], "limits": {"requestsPerMinute": 5, "tokensPerDay": 9}, "secretRef": {"name": "s"}});
        assert_eq!(
            changed_fields("spec", &old, &new),
            ["spec.allowedModels[1]", "spec.limits.tokensPerDay", "spec.revoked"]
        );
        assert_eq!(changed_fields("spec", &json!({"a": [1]}), &json!({"a": [1, 2]})), ["spec.a"]);
        assert!(changed_fields("spec", &old, &old).is_empty());
    }

    #[test]
    fn actor_from_latest_manager() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time};
        let at = |s: &str| Some(Time(s.parse().expect("time")));
        let managed = vec![
            ManagedFieldsEntry {
                manager: Some("kubectl-client-side-apply".into()),
                time: at("2026-01-01T00:00:00Z"),
                ..Default::default()
            },
            ManagedFieldsEntry {
                manager: Some("argocd-controller".into()),
                time: at("2026-02-01T00:00:00Z"),
                ..Default::default()
            },
        ];
        let actor = Actor::from_managed_fields(&managed).expect("actor");
        assert_eq!(actor.username, "argocd-controller");
        assert_eq!(actor.source, ActorSource::ManagedFields);
    }
}
