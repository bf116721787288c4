use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{bounds, SecretKeyRef};

/// An upstream LLM provider account: where to send traffic and which Secret holds its key.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "ProviderCredential",
    plural = "providercredentials",
    shortname = "pcred",
    namespaced,
    status = "ProviderCredentialStatus",
    printcolumn = r#"{"name":"Kind","type":"string","jsonPath":".spec.kind"}"#,
    printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.kind == 'mock' || has(self.secretRef)",
        "message": "secretRef is required for every kind but mock"
    },
    {
        "rule": "!(self.kind in ['openai-compatible', 'azure-openai']) || has(self.baseUrl)",
        "message": "baseUrl is required for kinds openai-compatible and azure-openai"
    },
    {
        "rule": "self.kind != 'azure-openai' || has(self.azure)",
        "message": "azure.apiVersion is required for kind azure-openai"
    }
]))]
pub struct ProviderCredentialSpec {
    /// Which API the provider speaks.
    pub kind: ProviderKind,
    /// Base URL including the API prefix, e.g. `https://api.openai.com/v1`. Defaults per kind;
    /// required for `openai-compatible` and `azure-openai`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bounds::BASE_URL_LEN))]
    pub base_url: Option<String>,
    /// Secret key holding the provider API key. Required for every kind but `mock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// Models served through this credential.
    #[schemars(length(min = 1, max = bounds::MODELS))]
    pub models: Vec<ModelMapping>,
    /// Higher priority credentials are used first when several serve a model.
    #[serde(default)]
    pub priority: i32,
    /// Relative share of traffic among credentials of equal priority.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Settings for `azure-openai`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureSettings>,
}

fn default_weight() -> u32 {
    100
}

/// The wire protocol and authentication style of a provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub enum ProviderKind {
    /// OpenAI's API, `Authorization: Bearer`.
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic's Messages API, `x-api-key`.
    #[serde(rename = "anthropic")]
    Anthropic,
    /// Any server speaking the OpenAI API (vLLM, Ollama, LiteLLM …), `Authorization: Bearer`.
    #[serde(rename = "openai-compatible")]
    OpenAiCompatible,
    /// Azure OpenAI: `api-key` header and deployment URLs.
    #[serde(rename = "azure-openai")]
    AzureOpenAi,
    /// In-process provider answering in OpenAI and Anthropic formats, for testing a setup offline.
    #[serde(rename = "mock")]
    Mock,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::OpenAiCompatible => "openai-compatible",
            ProviderKind::AzureOpenAi => "azure-openai",
            ProviderKind::Mock => "mock",
        }
    }

    /// Base URL used when the spec gives none.
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            ProviderKind::OpenAi => Some("https://api.openai.com/v1"),
            ProviderKind::Anthropic => Some("https://api.anthropic.com/v1"),
            ProviderKind::OpenAiCompatible | ProviderKind::AzureOpenAi | ProviderKind::Mock => None,
        }
    }

    pub fn needs_secret(self) -> bool {
        !matches!(self, ProviderKind::Mock)
    }

    pub fn serves_openai_routes(self) -> bool {
        !matches!(self, ProviderKind::Anthropic)
    }

    pub fn serves_anthropic_routes(self) -> bool {
        matches!(self, ProviderKind::Anthropic | ProviderKind::Mock)
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A model served by a credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelMapping {
    /// Model name clients ask for. May be a glob pattern (`gpt-4o*`) to pass a family through.
    #[schemars(length(min = 1, max = bounds::MODEL_NAME_LEN))]
    pub name: String,
    /// Name sent upstream instead (for Azure, the deployment name). Defaults to `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = bounds::MODEL_NAME_LEN))]
    pub upstream_name: Option<String>,
}

/// Azure OpenAI settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureSettings {
    /// The `api-version` query parameter, e.g. `2024-10-21`.
    #[schemars(length(min = 1, max = bounds::API_VERSION_LEN))]
    pub api_version: String,
}

/// Observed state of a ProviderCredential. Never holds the key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderCredentialStatus {
    /// Master key id the provider key is currently sealed under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_with: Option<String>,
    /// Increments each time the provider key changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u64>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current conditions; `Ready` says whether the credential is in the snapshot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
