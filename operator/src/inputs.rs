//! What `compile` reads: the custom resources, the Secret values they reference, and the
//! digests of operator-generated keys.

use std::collections::{BTreeMap, BTreeSet};

use portcullis_crds::secret::SecretBytes;
use portcullis_crds::snapshot::IssuedDigest;
use portcullis_crds::v1alpha1::{ApiKey, KillSwitch, ObjectRef, ProviderCredential};

/// Secret values by namespace/name, then data key. Values are redacted in `Debug`.
#[derive(Clone, Debug, Default)]
pub struct SecretStore {
    secrets: BTreeMap<ObjectRef, BTreeMap<String, SecretBytes>>,
}

/// Why a Secret reference could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretLookupError {
    SecretNotFound,
    KeyNotFound,
}

impl SecretStore {
    pub fn insert(&mut self, secret: ObjectRef, data: BTreeMap<String, SecretBytes>) {
        self.secrets.insert(secret, data);
    }

    pub fn get(&self, secret: &ObjectRef, key: &str) -> Result<&SecretBytes, SecretLookupError> {
        self.secrets
            .get(secret)
            .ok_or(SecretLookupError::SecretNotFound)?
            .get(key)
            .ok_or(SecretLookupError::KeyNotFound)
    }

    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }
}

/// Everything `compile` needs besides key material.
#[derive(Clone, Debug, Default)]
pub struct CompileInputs {
    pub api_keys: Vec<ApiKey>,
    pub credentials: Vec<ProviderCredential>,
    pub kill_switches: Vec<KillSwitch>,
    pub secrets: SecretStore,
    /// Digests of keys the operator generated, by ApiKey. Keys brought through `secretRef` are
    /// digested from `secrets` instead.
    pub issued_digests: BTreeMap<ObjectRef, Vec<IssuedDigest>>,
    /// Generated keys whose every live digest was made under another pepper (its Secret was
    /// recreated): they match no key until rotated.
    pub issued_under_another_pepper: BTreeSet<ObjectRef>,
}
