#![allow(clippy::expect_used, clippy::unwrap_used)]

use super::*;
use crate::ledger::{ActorSource, FileLedger, NewEntry};
use serde_json::json;

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn api_key(spec: Value, generation: i64, deleting: bool) -> ApiKey {
    let mut metadata = json!({"name": "k", "namespace": "team-a", "uid": "u1", "generation": generation});
    if deleting {
        metadata["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    serde_json::from_value(
        json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey", "metadata": metadata, "spec": spec}),
    )
    .unwrap()
}

fn switch(spec: Value, generation: i64) -> KillSwitch {
    serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "KillSwitch",
        "metadata": {"name": "s", "namespace": "ops", "uid": "s1", "generation": generation},
        "spec": spec,
    }))
    .unwrap()
}

/// Drives `decide` like the operator does, keeping the state in memory.
struct Run {
    recorded: HashMap<AuditKey, Recorded>,
    entries: Vec<LedgerEntry>,
}

impl Run {
    fn new(entries: Vec<LedgerEntry>) -> Self {
        Run { recorded: replay(&entries), entries }
    }

    fn see(&mut self, observed: &Observed) -> Vec<Action> {
        let drafts = decide(self.recorded.get(&key_of(&observed.object)), observed);
        for d in &drafts {
            let new = NewEntry {
                time: at("2026-01-01T00:00:00Z"),
                actor: Actor::operator(),
                action: d.action,
                object: observed.object.clone(),
                changed_fields: d.changed_fields.clone(),
                facts: entry_facts(observed),
            };
            let entry = LedgerEntry::next(self.entries.last(), new);
            remember(&mut self.recorded, &entry, Some(observed.spec.clone()));
            self.entries.push(entry);
        }
        drafts.into_iter().map(|d| d.action).collect()
    }
}

#[test]
fn api_key_lifecycle_is_one_entry_per_action_and_never_repeats() {
    let now = at("2026-01-01T00:00:00Z");
    let mut run = Run::new(vec![]);
    let spec = json!({"owner": "a"});
    assert_eq!(run.see(&observe_api_key(&api_key(spec.clone(), 1, false), now)), [Action::ApiKeyCreated]);
    assert_eq!(run.see(&observe_api_key(&api_key(spec, 1, false), now)), []);
    let rotated = json!({"owner": "a", "rotation": 2});
    assert_eq!(run.see(&observe_api_key(&api_key(rotated, 2, false), now)), [Action::ApiKeyRotated]);
    assert_eq!(run.entries[1].changed_fields, ["spec.rotation"]);
    let revoked = json!({"owner": "a", "rotation": 2, "revoked": true});
    assert_eq!(run.see(&observe_api_key(&api_key(revoked.clone(), 3, false), now)), [Action::ApiKeyRevoked]);
    assert_eq!(run.entries[2].changed_fields, ["spec.revoked"]);
    assert_eq!(run.see(&observe_api_key(&api_key(revoked.clone(), 3, true), now)), [Action::ApiKeyDeleted]);
    // The finalizer removal failed and the object is seen again: nothing new.
    assert_eq!(run.see(&observe_api_key(&api_key(revoked, 3, true), now)), []);
}

/// A long rotation recorded raw (before such values stood as their digest) is not a rotation
/// when the same value is seen as its digest; another value is.
#[test]
fn a_long_rotation_recorded_raw_is_not_rotated_again_by_its_digest() {
    let now = at("2026-01-01T00:00:00Z");
    let mut run = Run::new(vec![]);
    let long = "r".repeat(300);
    let key = api_key(json!({"rotation": long}), 1, false);
    assert_eq!(run.see(&observe_api_key(&key, now)), [Action::ApiKeyCreated]);
    let recorded = run.recorded.get_mut(&key_of(&observe_api_key(&key, now).object)).unwrap();
    assert!(fact(&recorded.facts, "rotation").starts_with("sha256:"));
    recorded.facts.insert("rotation".into(), long.clone());
    let edited = api_key(json!({"rotation": long, "owner": "b"}), 2, false);
    assert_eq!(run.see(&observe_api_key(&edited, now)), []);
    let rotated = api_key(json!({"rotation": "s".repeat(300), "owner": "b"}), 3, false);
    assert_eq!(run.see(&observe_api_key(&rotated, now)), [Action::ApiKeyRotated]);
}

#[test]
fn expiry_is_recorded_once_by_the_operator() {
    let mut run = Run::new(vec![]);
    let spec = json!({"expiresAt": "2026-01-02T00:00:00Z"});
    let key = api_key(spec, 1, false);
    assert_eq!(run.see(&observe_api_key(&key, at("2026-01-01T00:00:00Z"))), [Action::ApiKeyCreated]);
    let later = observe_api_key(&key, at("2026-01-03T00:00:00Z"));
    let drafts = decide(run.recorded.get(&key_of(&later.object)), &later);
    assert!(drafts[0].by_operator);
    assert_eq!(run.see(&later), [Action::ApiKeyExpired]);
    assert_eq!(run.see(&later), []);
}

#[test]
fn a_restart_replays_the_ledger_and_neither_repeats_nor_skips() {
    let now = at("2026-01-01T00:00:00Z");
    let mut first = Run::new(vec![]);
    first.see(&observe_api_key(&api_key(json!({}), 1, false), now));
    first.see(&observe_kill_switch(&switch(json!({"scope": {"global": true}, "active": true}), 1), now));
    // A fresh process knows only the ledger.
    let mut second = Run::new(first.entries.clone());
    assert_eq!(second.see(&observe_api_key(&api_key(json!({}), 1, false), now)), []);
    assert_eq!(
        second.see(&observe_kill_switch(&switch(json!({"scope": {"global": true}, "active": true}), 1), now)),
        []
    );
    // A change made while it was down is still recorded, summarised as `spec`.
    assert_eq!(
        second.see(&observe_kill_switch(&switch(json!({"scope": {"global": true}, "active": false}), 2), now)),
        [Action::KillSwitchDeactivated]
    );
    assert_eq!(second.entries.last().unwrap().changed_fields, ["spec"]);
}

#[test]
fn kill_switch_activation_deactivation_and_expiry() {
    let mut run = Run::new(vec![]);
    let now = at("2026-01-01T00:00:00Z");
    let inert = json!({"scope": {"model": "gpt-*"}, "active": false});
    assert_eq!(run.see(&observe_kill_switch(&switch(inert, 1), now)), []);
    let on = json!({"scope": {"model": "gpt-*"}, "active": true, "expiresAt": "2026-01-01T01:00:00Z"});
    assert_eq!(run.see(&observe_kill_switch(&switch(on.clone(), 2), now)), [Action::KillSwitchActivated]);
    assert_eq!(run.entries[0].changed_fields, ["spec.active"]);
    let off = json!({"scope": {"model": "gpt-*"}, "active": false, "expiresAt": "2026-01-01T01:00:00Z"});
    assert_eq!(run.see(&observe_kill_switch(&switch(off, 3), now)), [Action::KillSwitchDeactivated]);
    assert_eq!(run.entries[1].changed_fields, ["spec.active"]);
    let on = json!({"scope": {"model": "gpt-*"}, "active": true, "expiresAt": "2026-01-01T01:00:00Z"});
    assert_eq!(run.see(&observe_kill_switch(&switch(on.clone(), 4), now)), [Action::KillSwitchActivated]);
    assert_eq!(run.see(&observe_kill_switch(&switch(on, 2), at("2026-01-01T02:00:00Z"))), [Action::KillSwitchExpired]);
    let off = json!({"scope": {"model": "gpt-*"}, "active": false});
    assert_eq!(run.see(&observe_kill_switch(&switch(off, 5), now)), []);
}

#[test]
fn credential_rotation_follows_the_key_version() {
    let credential: ProviderCredential = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ProviderCredential",
        "metadata": {"name": "openai", "namespace": "team-a", "uid": "c1", "generation": 1},
        "spec": {"kind": "openai", "secretRef": {"name": "openai", "key": "apiKey"}, "models": [{"name": "gpt-4o"}]},
    }))
    .unwrap();
    let mut run = Run::new(vec![]);
    assert_eq!(run.see(&observe_credential(&credential, None)), [Action::ProviderCredentialCreated]);
    assert_eq!(run.see(&observe_credential(&credential, Some(1))), []);
    assert_eq!(run.see(&observe_credential(&credential, Some(2))), [Action::ProviderCredentialRotated]);
    assert_eq!(run.see(&observe_credential(&credential, Some(2))), []);
    assert_eq!(run.see(&observe_credential(&credential, Some(3))), [Action::ProviderCredentialRotated]);
}

#[test]
fn keyring_rotation() {
    let mut run = Run::new(vec![]);
    assert_eq!(run.see(&observe_keyring("p", "ring", "r1", "k1")), [Action::MasterKeyRotated]);
    assert_eq!(run.see(&observe_keyring("p", "ring", "r1", "k1")), []);
    assert_eq!(run.see(&observe_keyring("p", "ring", "r1", "k2")), [Action::MasterKeyRotated]);
}

#[test]
fn entries_hold_no_secret_value_and_chain_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let mut ledger = FileLedger::open(&path).unwrap();
    let canary = "sk-canary-secret-value-0123456789";
    // A spec only names Secrets; even a careless spec value must not reach an entry.
    let key = api_key(json!({"owner": canary, "secretRef": {"name": "mine", "key": "k"}}), 1, false);
    let observed = observe_api_key(&key, at("2026-01-01T00:00:00Z"));
    for d in decide(None, &observed) {
        ledger
            .append_entry(NewEntry {
                time: at("2026-01-01T00:00:00Z"),
                actor: Actor::operator(),
                action: d.action,
                object: observed.object.clone(),
                changed_fields: d.changed_fields,
                facts: entry_facts(&observed),
            })
            .unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(canary), "{text}");
    assert!(text.contains("apiKeyCreated"));
    drop(ledger);
    let entries = crate::ledger::read_lines(&path).unwrap();
    assert!(crate::ledger::verify(&entries, None).is_ok());
}

#[test]
fn managed_fields_skip_the_operator_and_status_writes() {
    let managed: Vec<ManagedFieldsEntry> = serde_json::from_value(json!([
        {"manager": "kubectl-client-side-apply", "operation": "Update", "time": "2026-01-01T00:00:00Z"},
        {"manager": crate::issuance::MANAGER, "operation": "Apply", "subresource": "status", "time": "2026-01-02T00:00:00Z"},
        {"manager": FINALIZER_MANAGER, "operation": "Apply", "time": "2026-01-03T00:00:00Z"},
    ]))
    .unwrap();
    let actor = actor_from_managed_fields(&managed).unwrap();
    assert_eq!(actor.username, "kubectl-client-side-apply");
    assert_eq!(actor.source, ActorSource::ManagedFields);
}

#[test]
fn hints_are_bounded_and_used_once() {
    let hints = ActorHints::with_capacity(2);
    let actor = |u: &str| Actor { username: u.into(), groups: vec![], source: ActorSource::AdmissionWebhook };
    let key = |n: &str| ("ApiKey".to_owned(), "ns".to_owned(), n.to_owned());
    hints.record(key("a"), actor("alice"));
    hints.record(key("b"), actor("bob"));
    hints.record(key("c"), actor("carol"));
    assert_eq!(hints.len(), 2);
    assert_eq!(hints.take(&key("a")), None);
    assert_eq!(hints.take(&key("c")).unwrap().username, "carol");
    assert_eq!(hints.take(&key("c")), None);
}
