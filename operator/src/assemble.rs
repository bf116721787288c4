//! Cluster-side use of the one `compile`: an invalid object must not block the others, so objects
//! `compile` complains about are set aside (and reported as `InvalidSpec`) and the rest is
//! compiled again. There is no second compile here: this only chooses `compile`'s inputs.
//!
//! Setting an object aside fails closed for ApiKeys (the key stops working) and
//! ProviderCredentials (their models stop being served), but would fail open for a KillSwitch:
//! an engaged switch whose spec turned invalid (the admission webhook was down, or the object no
//! longer reads) would let traffic through again. So a KillSwitch set aside, or unreadable,
//! keeps the entry it had in the last snapshot this keyring tagged, until it is fixed or deleted.

use std::collections::BTreeMap;

use portcullis_crds::digest::Pepper;
use portcullis_crds::sealing::MasterKeyring;
use portcullis_crds::snapshot::{GatewaySnapshot, KillSwitchEntry};
use portcullis_crds::v1alpha1::ObjectRef;

use crate::compile::{compile, CompileError, Compiled};
use crate::inputs::CompileInputs;

/// `(kind, namespace/name)`: how an object is named across the three kinds.
pub type ObjectKey = (&'static str, ObjectRef);

/// A snapshot compiled from every valid object, and why the others were left out.
#[derive(Debug)]
pub struct Assembled {
    pub compiled: Compiled,
    pub excluded: BTreeMap<ObjectKey, Vec<CompileError>>,
}

/// Why assembling failed even after setting invalid objects aside (an error `compile` could not
/// attribute to any object).
#[derive(Debug, thiserror::Error)]
#[error("the snapshot could not be compiled: {0}")]
pub struct AssembleError(pub crate::compile::CompileErrors);

fn object_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectRef {
    ObjectRef::new(
        meta.namespace.clone().unwrap_or_else(|| "default".to_owned()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Compiles `inputs`, leaving out every object `compile` rejects, until the rest compiles. A
/// KillSwitch left out, or in `inputs.unreadable_kill_switches`, keeps its entry from `previous`
/// when this keyring tagged `previous` (a snapshot Secret written by anyone else must not decide
/// which switches stay engaged).
pub fn compile_valid(
    mut inputs: CompileInputs,
    keyring: &MasterKeyring,
    pepper: &Pepper,
    previous: Option<&GatewaySnapshot>,
) -> Result<Assembled, AssembleError> {
    let last_valid: BTreeMap<&ObjectRef, &KillSwitchEntry> = previous
        .filter(|p| p.verify_tag(keyring).is_ok())
        .map(|p| p.content.kill_switches.iter().map(|entry| (&entry.switch, entry)).collect())
        .unwrap_or_default();
    let keep = |object: &ObjectRef| last_valid.get(object).map(|entry| (*entry).clone());
    inputs.kept_kill_switches = inputs.unreadable_kill_switches.iter().filter_map(keep).collect();
    let mut excluded: BTreeMap<ObjectKey, Vec<CompileError>> = BTreeMap::new();
    // Each round removes at least one object, so this ends.
    loop {
        match compile(&inputs, keyring, pepper, previous) {
            Ok(compiled) => {
                note_kept(&inputs.kept_kill_switches, &mut excluded);
                return Ok(Assembled { compiled, excluded });
            }
            Err(errors) => {
                let before = inputs.api_keys.len() + inputs.credentials.len() + inputs.kill_switches.len();
                for error in &errors.0 {
                    excluded.entry((error.kind, error.object.clone())).or_default().push(error.clone());
                }
                let bad = |kind: &'static str, object: ObjectRef| excluded.contains_key(&(kind, object));
                inputs.api_keys.retain(|k| !bad("ApiKey", object_of(&k.metadata)));
                inputs.credentials.retain(|c| !bad("ProviderCredential", object_of(&c.metadata)));
                let (kill_switches, kept) = (&mut inputs.kill_switches, &mut inputs.kept_kill_switches);
                kill_switches.retain(|s| {
                    let object = object_of(&s.metadata);
                    if !bad("KillSwitch", object.clone()) {
                        return true;
                    }
                    kept.extend(keep(&object));
                    false
                });
                let after = inputs.api_keys.len() + inputs.credentials.len() + inputs.kill_switches.len();
                if after == before {
                    return Err(AssembleError(errors));
                }
            }
        }
    }
}

/// Records each KillSwitch that kept its last entry as set aside, saying that the entry is still
/// in force (its `Ready` condition shows it beside what is wrong).
fn note_kept(kept: &[KillSwitchEntry], excluded: &mut BTreeMap<ObjectKey, Vec<CompileError>>) {
    for entry in kept {
        excluded.entry(("KillSwitch", entry.switch.clone())).or_default().push(CompileError {
            kind: "KillSwitch",
            object: entry.switch.clone(),
            field: "spec".to_owned(),
            message: KEPT_MESSAGE.to_owned(),
        });
    }
}

/// What a KillSwitch set aside with its last entry kept is told.
pub const KEPT_MESSAGE: &str = "the last valid version of this KillSwitch stays in force until it is fixed or deleted";

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;
    use portcullis_crds::sealing::KeyId;

    const GOOD_AND_BAD: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: openai, namespace: ai}
stringData: {key: sk-test-123}
---
apiVersion: portcullis.dev/v1alpha1
kind: ProviderCredential
metadata: {name: good, namespace: ai}
spec: {kind: openai, secretRef: {name: openai, key: key}, models: [{name: gpt-4o}]}
---
apiVersion: portcullis.dev/v1alpha1
kind: ProviderCredential
metadata: {name: missing-secret, namespace: ai}
spec: {kind: openai, secretRef: {name: nope, key: key}, models: [{name: gpt-4o}]}
---
apiVersion: portcullis.dev/v1alpha1
kind: KillSwitch
metadata: {name: two-targets, namespace: ai}
spec: {scope: {global: true, model: x}, active: true}
"#;

    #[test]
    fn invalid_objects_are_set_aside_and_the_rest_compiles() {
        let (keyring, pepper) = keys();
        let assembled = compile_valid(inputs(GOOD_AND_BAD), &keyring, &pepper, None).expect("compiles");
        let content = &assembled.compiled.snapshot.content;
        assert_eq!(content.credentials.len(), 1);
        assert_eq!(content.credentials[0].credential.name, "good");
        assert!(content.kill_switches.is_empty());
        let keys: Vec<_> = assembled.excluded.keys().cloned().collect();
        assert_eq!(
            keys,
            vec![
                ("KillSwitch", ObjectRef::new("ai", "two-targets")),
                ("ProviderCredential", ObjectRef::new("ai", "missing-secret")),
            ]
        );
    }

    const ENGAGED: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: KillSwitch
metadata: {name: stop, namespace: ops}
spec: {scope: {global: true}, active: true, reason: incident}
"#;

    /// The same switch, set off but with a spec the webhook would have refused.
    const TURNED_INVALID: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: KillSwitch
metadata: {name: stop, namespace: ops}
spec: {scope: {global: true, model: gpt-4o}, active: false}
"#;

    fn inputs(yaml: &str) -> CompileInputs {
        let mut inputs = CompileInputs::default();
        let mut summary = Default::default();
        crate::manifests::add_yaml(&mut inputs, yaml, "fixture", &mut summary).expect("fixture");
        inputs
    }

    /// A fresh keyring (key id `k1`) and pepper.
    fn keys() -> (MasterKeyring, Pepper) {
        (MasterKeyring::generate(KeyId::new("k1").unwrap()).unwrap(), Pepper::generate().unwrap())
    }

    fn engaged_before(keyring: &MasterKeyring, pepper: &Pepper) -> GatewaySnapshot {
        let before = compile_valid(inputs(ENGAGED), keyring, pepper, None).expect("compiles");
        assert!(before.excluded.is_empty());
        before.compiled.snapshot
    }

    fn switches(assembled: &Assembled) -> Vec<(String, bool)> {
        let content = &assembled.compiled.snapshot.content;
        content.kill_switches.iter().map(|s| (s.switch.to_string(), s.active)).collect()
    }

    fn stop() -> ObjectKey {
        ("KillSwitch", ObjectRef::new("ops", "stop"))
    }

    #[test]
    fn a_kill_switch_that_turns_invalid_keeps_its_last_valid_entry() {
        let (keyring, pepper) = keys();
        let before = engaged_before(&keyring, &pepper);

        let after = compile_valid(inputs(TURNED_INVALID), &keyring, &pepper, Some(&before)).expect("compiles");
        assert_eq!(switches(&after), [("ops/stop".to_owned(), true)], "still engaged: it must not fail open");
        assert_eq!(after.compiled.snapshot.content, before.content, "the same content, so nothing is rewritten");
        let said: Vec<_> = after.excluded[&stop()].iter().map(|e| (e.field.as_str(), e.message.as_str())).collect();
        assert_eq!(said.len(), 2, "{said:?}");
        assert_eq!(said[0].0, "spec.scope");
        assert_eq!(said[1], ("spec", KEPT_MESSAGE));

        // Fixed: the new spec (off) is what counts, and nothing is set aside.
        let fixed = ENGAGED.replace("active: true", "active: false");
        let fixed = compile_valid(inputs(&fixed), &keyring, &pepper, Some(&after.compiled.snapshot)).expect("ok");
        assert_eq!(switches(&fixed), [("ops/stop".to_owned(), false)]);
        assert!(fixed.excluded.is_empty());

        // Deleted while invalid: gone, like any deleted switch.
        let deleted = compile_valid(inputs(""), &keyring, &pepper, Some(&after.compiled.snapshot)).expect("ok");
        assert!(switches(&deleted).is_empty());
        assert!(deleted.excluded.is_empty());
    }

    #[test]
    fn an_unreadable_kill_switch_keeps_its_last_valid_entry() {
        let (keyring, pepper) = keys();
        let before = engaged_before(&keyring, &pepper);
        let mut unreadable = inputs("");
        unreadable.unreadable_kill_switches.insert(ObjectRef::new("ops", "stop"));
        unreadable.unreadable_kill_switches.insert(ObjectRef::new("ops", "never-valid"));

        let after = compile_valid(unreadable, &keyring, &pepper, Some(&before)).expect("compiles");
        assert_eq!(switches(&after), [("ops/stop".to_owned(), true)]);
        let keys: Vec<_> = after.excluded.keys().cloned().collect();
        assert_eq!(keys, [stop()], "a switch never valid has nothing to keep");
        assert_eq!(after.excluded[&stop()][0].message, KEPT_MESSAGE);
    }

    /// Only a snapshot this keyring tagged says which switches stay engaged: one written into
    /// the Secret by anyone else (untagged, or tagged under another key) keeps nothing.
    #[test]
    fn only_a_snapshot_this_keyring_tagged_is_kept_from() {
        let (keyring, pepper) = keys();
        let (other, _) = keys();
        let foreign = engaged_before(&other, &pepper);
        let mut untagged = foreign.clone();
        untagged.tag = None;
        for previous in [&foreign, &untagged] {
            let after = compile_valid(inputs(TURNED_INVALID), &keyring, &pepper, Some(previous)).expect("compiles");
            assert!(switches(&after).is_empty());
            let said = &after.excluded[&stop()];
            assert!(said.iter().all(|e| e.message != KEPT_MESSAGE), "{said:?}");
        }
    }
}
