//! The `Ready` verdict for each kind, from the object, the Secret values, and what
//! [`crate::assemble`] set aside. Pure.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use portcullis_crds::v1alpha1::{ApiKey, KillSwitch, ObjectRef, ProviderCredential, SecretKeyRef};

use crate::assemble::ObjectKey;
use crate::compile::CompileError;
use crate::conditions::{Readiness, ReadyReason};
use crate::inputs::SecretStore;

pub fn object_ref(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectRef {
    ObjectRef::new(
        meta.namespace.clone().unwrap_or_else(|| "default".to_owned()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn missing_secret(object: &ObjectRef, secret_ref: Option<&SecretKeyRef>, secrets: &SecretStore) -> Option<Readiness> {
    let secret_ref = secret_ref?;
    let secret = ObjectRef::new(object.namespace.clone(), secret_ref.name.clone());
    secrets.get(&secret, &secret_ref.key).err().map(|why| {
        let message = match why {
            crate::inputs::SecretLookupError::SecretNotFound => {
                format!("Secret {secret} not found")
            }
            crate::inputs::SecretLookupError::KeyNotFound => {
                format!("Secret {secret} has no key {:?}", secret_ref.key)
            }
        };
        Readiness::new(ReadyReason::SecretNotFound, message)
    })
}

fn invalid(errors: Option<&Vec<CompileError>>) -> Option<Readiness> {
    let errors = errors?;
    let message = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ");
    Some(Readiness::new(ReadyReason::InvalidSpec, message))
}

pub fn api_key(
    key: &ApiKey,
    has_digest: bool,
    secrets: &SecretStore,
    excluded: &BTreeMap<ObjectKey, Vec<CompileError>>,
    now: DateTime<Utc>,
) -> Readiness {
    let object = object_ref(&key.metadata);
    if let Some(r) = missing_secret(&object, key.spec.secret_ref.as_ref(), secrets) {
        return r;
    }
    if let Some(r) = invalid(excluded.get(&("ApiKey", object))) {
        return r;
    }
    if key.spec.revoked {
        return Readiness::new(ReadyReason::Revoked, "spec.revoked is true");
    }
    if let Some(at) = key.spec.expires_at.filter(|at| *at <= now) {
        return Readiness::new(ReadyReason::Expired, format!("expired at {}", at.to_rfc3339()));
    }
    if key.spec.secret_ref.is_none() && !has_digest {
        return Readiness::new(ReadyReason::Pending, "a key is being issued");
    }
    Readiness::new(ReadyReason::Active, "the key is accepted by the gateway")
}

pub fn credential(
    credential: &ProviderCredential,
    secrets: &SecretStore,
    excluded: &BTreeMap<ObjectKey, Vec<CompileError>>,
) -> Readiness {
    let object = object_ref(&credential.metadata);
    if let Some(r) = missing_secret(&object, credential.spec.secret_ref.as_ref(), secrets) {
        return r;
    }
    if let Some(r) = invalid(excluded.get(&("ProviderCredential", object))) {
        return r;
    }
    Readiness::new(ReadyReason::Active, "the credential is in the snapshot")
}

pub fn kill_switch(
    switch: &KillSwitch,
    excluded: &BTreeMap<ObjectKey, Vec<CompileError>>,
    now: DateTime<Utc>,
) -> Readiness {
    let object = object_ref(&switch.metadata);
    if let Some(r) = invalid(excluded.get(&("KillSwitch", object))) {
        return r;
    }
    if let Some(at) = switch.spec.expires_at.filter(|at| *at <= now) {
        return Readiness::new(ReadyReason::Expired, format!("expired at {}", at.to_rfc3339()));
    }
    let state = if switch.spec.active { "engaged" } else { "inert" };
    Readiness::new(ReadyReason::Active, format!("the switch is {state}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;

    fn key(yaml: &str) -> ApiKey {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn api_key_reasons() {
        let now: DateTime<Utc> = "2025-06-01T00:00:00Z".parse().unwrap();
        let none = BTreeMap::new();
        let secrets = SecretStore::default();
        let base = "apiVersion: portcullis.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: a, namespace: n}\n";
        let reason = |spec: &str, has_digest: bool| {
            api_key(&key(&format!("{base}spec: {spec}")), has_digest, &secrets, &none, now).reason
        };
        assert_eq!(reason("{}", true), ReadyReason::Active);
        assert_eq!(reason("{}", false), ReadyReason::Pending);
        assert_eq!(reason("{revoked: true}", true), ReadyReason::Revoked);
        assert_eq!(reason("{expiresAt: '2025-01-01T00:00:00Z'}", true), ReadyReason::Expired);
        assert_eq!(reason("{secretRef: {name: s, key: k}}", false), ReadyReason::SecretNotFound);
        let mut excluded = BTreeMap::new();
        excluded.insert(
            ("ApiKey", ObjectRef::new("n", "a")),
            vec![CompileError {
                kind: "ApiKey",
                object: ObjectRef::new("n", "a"),
                field: "spec.allowedModels[0]".into(),
                message: "bad".into(),
            }],
        );
        let r = api_key(&key(&format!("{base}spec: {{}}")), true, &secrets, &excluded, now);
        assert_eq!(r.reason, ReadyReason::InvalidSpec);
        assert_eq!(r.message, "spec.allowedModels[0]: bad");
    }
}
