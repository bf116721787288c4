//! `portcullis.dev/v1alpha1`: the custom resources platform engineers declare.

mod api_key;
mod common;
mod kill_switch;
mod provider_credential;

pub use api_key::{
    ApiKey, ApiKeyLimits, ApiKeySpec, ApiKeyStatus, FailurePolicy, IssuedKeyDigest, TeamLimits,
    DEFAULT_ROTATION_GRACE_SECONDS,
};
pub use common::{bounds, EnforcementStatus, ObjectRef, SecretKeyRef};
pub use kill_switch::{KillSwitch, KillSwitchScope, KillSwitchSpec, KillSwitchStatus, ScopeTarget};
pub use provider_credential::{
    AzureSettings, ModelMapping, ProviderCredential, ProviderCredentialSpec, ProviderCredentialStatus, ProviderKind,
};
