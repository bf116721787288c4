//! What `compile` reads: the custom resources, the Secret values they reference, and the
//! digests of operator-generated keys.

use std::collections::{BTreeMap, BTreeSet};

use portcullis_crds::secret::SecretBytes;
use portcullis_crds::snapshot::{IssuedDigest, KillSwitchEntry};
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

/// Which namespaces' ProviderCredentials and KillSwitches reach the ApiKeys of every namespace.
///
/// Anyone who may create a ProviderCredential that serves a model also decides where that
/// model's prompts go; anyone who may create a KillSwitch decides whose traffic stops. In a
/// cluster where teams manage their own namespace, neither may reach past it: a credential or a
/// switch outside the platform namespaces applies only to the ApiKeys of its own namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Tenancy {
    /// Every namespace is trusted, as when one person's folder of manifests is the whole
    /// configuration (local mode unless told otherwise).
    #[default]
    Shared,
    /// Only these namespaces (the operator's own, and any named with `--platform-namespace`)
    /// hold objects that reach every namespace.
    Platform(BTreeSet<String>),
}

impl Tenancy {
    /// `namespaces` as the platform namespaces; `*` among them trusts every namespace (a
    /// cluster where one team manages everything).
    pub fn platform<I: IntoIterator<Item = S>, S: Into<String>>(namespaces: I) -> Self {
        let platform: BTreeSet<String> = namespaces.into_iter().map(Into::into).collect();
        if platform.contains("*") {
            Tenancy::Shared
        } else {
            Tenancy::Platform(platform)
        }
    }

    /// The tenant an object in `namespace` is confined to: `None` in a platform namespace.
    pub fn tenant_of(&self, namespace: &str) -> Option<String> {
        match self {
            Tenancy::Shared => None,
            Tenancy::Platform(platform) if platform.contains(namespace) => None,
            Tenancy::Platform(_) => Some(namespace.to_owned()),
        }
    }

    /// The platform namespaces, for messages: `a, b`.
    pub fn describe(&self) -> String {
        match self {
            Tenancy::Shared => "every namespace".to_owned(),
            Tenancy::Platform(platform) => platform.iter().map(String::as_str).collect::<Vec<_>>().join(", "),
        }
    }
}

/// Everything `compile` needs besides key material.
#[derive(Clone, Debug, Default)]
pub struct CompileInputs {
    pub api_keys: Vec<ApiKey>,
    pub credentials: Vec<ProviderCredential>,
    pub kill_switches: Vec<KillSwitch>,
    pub secrets: SecretStore,
    /// Which namespaces' credentials and kill switches reach every namespace's keys.
    pub tenancy: Tenancy,
    /// Digests of keys the operator generated, by ApiKey. Keys brought through `secretRef` are
    /// digested from `secrets` instead.
    pub issued_digests: BTreeMap<ObjectRef, Vec<IssuedDigest>>,
    /// Generated keys whose every live digest was made under another pepper (its Secret was
    /// recreated): they match no key until rotated.
    pub issued_under_another_pepper: BTreeSet<ObjectRef>,
    /// KillSwitches in the cluster that could not be read (their object does not deserialize).
    /// Like an invalid one, each keeps its last valid entry (see [`crate::assemble`]).
    pub unreadable_kill_switches: BTreeSet<ObjectRef>,
    /// Entries from the last valid snapshot kept for KillSwitches that turned invalid or
    /// unreadable: a kill switch never fails open. Set by [`crate::assemble`], never by callers.
    pub kept_kill_switches: Vec<KillSwitchEntry>,
}
