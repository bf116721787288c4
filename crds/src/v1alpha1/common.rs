use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Size bounds of the custom resources' fields: the CRD schema has the API server refuse what
/// exceeds them, and the operator checks them again (manifests read without an API server, and
/// objects stored before a bound existed). Lengths are in bytes for the operator, in characters
/// for the API server.
pub mod bounds {
    /// Free text: `owner`, `team`, a KillSwitch's `reason`.
    pub const TEXT_LEN: usize = 1024;
    /// A model name, or the name sent upstream.
    pub const MODEL_NAME_LEN: usize = 256;
    /// A glob pattern of model or provider names.
    pub const PATTERN_LEN: usize = crate::pattern::MAX_PATTERN_LEN;
    /// Patterns in `allowedModels` or `allowedProviders`.
    pub const PATTERNS: usize = 256;
    /// Models one ProviderCredential serves.
    pub const MODELS: usize = 1024;
    /// A provider's base URL.
    pub const BASE_URL_LEN: usize = 2048;
    /// `name` or `namespace/name`.
    pub const OBJECT_REF_LEN: usize = NAMESPACE_LEN + 1 + NAME_LEN;
    /// A namespace name (the API server's limit).
    pub const NAMESPACE_LEN: usize = 63;
    /// An object name (the API server's limit).
    pub const NAME_LEN: usize = 253;
    /// Azure's `api-version`.
    pub const API_VERSION_LEN: usize = 64;
    /// An ApiKey's `rotation` as text (an annotation value and a ledger fact carry it).
    pub const ROTATION_LEN: usize = 253;
}

/// Selects one key of a Secret in the same namespace as the object that names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Namespace and name of a Portcullis object; the identity used in the snapshot, logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }

    /// Resolves `name` or `namespace/name` relative to `default_namespace`.
    pub fn parse_relative(reference: &str, default_namespace: &str) -> Self {
        match reference.split_once('/') {
            Some((ns, name)) => Self::new(ns, name),
            None => Self::new(default_namespace, reference),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How far an object's current spec has reached the data plane: each replica reports the
/// snapshot generation it applied (see `acknowledgement`), and the operator counts the live
/// replicas at or past the first generation that holds this spec.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnforcementStatus {
    /// The first snapshot generation that holds the current spec; unset until one is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_generation: Option<u64>,
    /// Live data-plane replicas that have applied `snapshotGeneration` or a later one.
    pub enforced_replicas: u32,
    /// Live data-plane replicas (each renews its own Lease).
    pub replicas: u32,
    /// `enforcedReplicas/replicas`, for `kubectl get`.
    pub summary: String,
}
