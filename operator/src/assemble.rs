//! Cluster-side use of the one `compile`: an invalid object must not block the others, so objects
//! `compile` complains about are set aside (and reported as `InvalidSpec`) and the rest is
//! compiled again. There is no second compile here: this only chooses `compile`'s inputs.

use std::collections::BTreeMap;

use portcullis_crds::digest::Pepper;
use portcullis_crds::sealing::MasterKeyring;
use portcullis_crds::snapshot::GatewaySnapshot;
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

/// Compiles `inputs`, leaving out every object `compile` rejects, until the rest compiles.
pub fn compile_valid(
    mut inputs: CompileInputs,
    keyring: &MasterKeyring,
    pepper: &Pepper,
    previous: Option<&GatewaySnapshot>,
) -> Result<Assembled, AssembleError> {
    let mut excluded: BTreeMap<ObjectKey, Vec<CompileError>> = BTreeMap::new();
    // Each round removes at least one object, so this ends.
    loop {
        match compile(&inputs, keyring, pepper, previous) {
            Ok(compiled) => return Ok(Assembled { compiled, excluded }),
            Err(errors) => {
                let before = inputs.api_keys.len() + inputs.credentials.len() + inputs.kill_switches.len();
                for error in &errors.0 {
                    excluded.entry((error.kind, error.object.clone())).or_default().push(error.clone());
                }
                let bad = |kind: &'static str, object: ObjectRef| excluded.contains_key(&(kind, object));
                inputs.api_keys.retain(|k| !bad("ApiKey", object_of(&k.metadata)));
                inputs.credentials.retain(|c| !bad("ProviderCredential", object_of(&c.metadata)));
                inputs.kill_switches.retain(|s| !bad("KillSwitch", object_of(&s.metadata)));
                let after = inputs.api_keys.len() + inputs.credentials.len() + inputs.kill_switches.len();
                if after == before {
                    return Err(AssembleError(errors));
                }
            }
        }
    }
}

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
        let mut inputs = CompileInputs::default();
        let mut summary = Default::default();
        crate::manifests::add_yaml(&mut inputs, GOOD_AND_BAD, "fixture", &mut summary).expect("fixture");
        let keyring = MasterKeyring::generate(KeyId::new("k1").unwrap()).unwrap();
        let pepper = Pepper::generate().unwrap();
        let assembled = compile_valid(inputs, &keyring, &pepper, None).expect("compiles");
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
}
