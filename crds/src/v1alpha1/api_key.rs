use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{bounds, EnforcementStatus, SecretKeyRef};

/// A client API key that applications present to the gateway.
///
/// By default the operator generates the key and reveals it once in a Secret named in the
/// status; with `secretRef` the key comes from a Secret you manage (sealed or external secrets).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "ApiKey",
    plural = "apikeys",
    shortname = "ak",
    namespaced,
    status = "ApiKeyStatus",
    printcolumn = r#"{"name":"Owner","type":"string","jsonPath":".spec.owner"}"#,
    printcolumn = r#"{"name":"Team","type":"string","jsonPath":".spec.team"}"#,
    printcolumn = r#"{"name":"Prefix","type":"string","jsonPath":".status.keyPrefix"}"#,
    printcolumn = r#"{"name":"Revoked","type":"boolean","jsonPath":".spec.revoked"}"#,
    printcolumn = r#"{"name":"Expires","type":"date","jsonPath":".spec.expiresAt"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Enforced","type":"string","jsonPath":".status.enforcement.summary"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.rotation) || !has(self.secretRef)",
        "message": "rotation applies to generated keys; rotate a secretRef key by changing its Secret"
    },
    {
        "rule": "!has(self.rotationGracePeriodSeconds) || !has(self.secretRef)",
        "message": "rotationGracePeriodSeconds applies to generated keys only"
    },
    {
        // An int-or-string is `dyn` to CEL: `string()` of an int is its digits, of a string itself.
        "rule": "!has(self.rotation) || string(self.rotation).size() <= 253",
        "message": "rotation is at most 253 characters"
    }
]))]
pub struct ApiKeySpec {
    /// Person or service accountable for this key, e.g. an e-mail address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bounds::TEXT_LEN))]
    pub owner: Option<String>,
    /// Team the key belongs to; team-wide limits apply across all of a team's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bounds::TEXT_LEN))]
    pub team: Option<String>,
    /// Glob patterns (`*`, `?`) of model names this key may call. Empty allows every model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bounds::PATTERNS), inner(length(min = 1, max = bounds::PATTERN_LEN)))]
    pub allowed_models: Vec<String>,
    /// Glob patterns of ProviderCredential names this key may be routed to. Empty allows all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bounds::PATTERNS), inner(length(min = 1, max = bounds::PATTERN_LEN)))]
    pub allowed_providers: Vec<String>,
    /// Moment after which the key is refused (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Set to true to refuse the key everywhere within a second.
    #[serde(default)]
    pub revoked: bool,
    /// Request and token limits for this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ApiKeyLimits>,
    /// Limits shared by every key of `team`. When keys of one team declare different values,
    /// the strictest applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_limits: Option<TeamLimits>,
    /// Use the key held in this Secret instead of having the operator generate one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// Any string (at most 253 characters) or number. Changing it makes the operator issue a new
    /// generated key; the previous key keeps working for `rotationGracePeriodSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<IntOrString>,
    /// Seconds the previous key stays valid after a rotation. Defaults to 3600; 0 refuses the
    /// previous key at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 31_536_000))]
    pub rotation_grace_period_seconds: Option<u32>,
}

/// Grace period applied when `rotationGracePeriodSeconds` is unset.
pub const DEFAULT_ROTATION_GRACE_SECONDS: u32 = 3600;

impl ApiKeySpec {
    /// The rotation token as text (`2` and `"2"` are the same rotation); empty when unset. The
    /// token is kept in the key's status, an annotation and the audit ledger, so one longer than
    /// [`bounds::ROTATION_LEN`] characters (stored before the schema bounded it, or where no API
    /// server checked) stands as `sha256:` and its digest: still a new token for every new value.
    /// Compare a recorded token with [`ApiKeySpec::rotation_is`].
    pub fn rotation_token(&self) -> String {
        match &self.rotation {
            Some(IntOrString::Int(n)) => n.to_string(),
            Some(IntOrString::String(s)) if self.rotation_too_long() => {
                use sha2::Digest as _;
                format!("sha256:{}", hex::encode(sha2::Sha256::digest(s.as_bytes())))
            }
            Some(IntOrString::String(s)) => s.clone(),
            None => String::new(),
        }
    }

    /// Whether `rotation` is a string longer than [`bounds::ROTATION_LEN`] characters (as the
    /// schema counts them).
    pub fn rotation_too_long(&self) -> bool {
        matches!(&self.rotation, Some(IntOrString::String(s)) if s.chars().count() > bounds::ROTATION_LEN)
    }

    /// Whether `recorded` (a token kept in a status or an annotation) is this spec's rotation:
    /// its token, or the value itself as kept before long values stood as their digest (so an
    /// upgrade rotates no key nobody asked to rotate).
    pub fn rotation_is(&self, recorded: &str) -> bool {
        recorded == self.rotation_token() || matches!(&self.rotation, Some(IntOrString::String(s)) if s == recorded)
    }

    /// The declared grace period for the previous key after a rotation.
    pub fn rotation_grace(&self) -> chrono::Duration {
        chrono::Duration::seconds(i64::from(
            self.rotation_grace_period_seconds.unwrap_or(DEFAULT_ROTATION_GRACE_SECONDS),
        ))
    }
}

/// Limits enforced per key (and per team, where the key names one). Each is at least 1: to stop
/// a key, revoke it or engage a KillSwitch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyLimits {
    /// Requests admitted in any sliding 60-second window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u64>,
    /// Tokens (input + output) admitted in any sliding 60-second window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u64>,
    /// Token budget per UTC calendar day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_day: Option<u64>,
    /// Token budget per UTC calendar month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_month: Option<u64>,
    /// What to do when the shared limit store (Redis) is unreachable; the gateway's setting
    /// applies when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_policy: Option<FailurePolicy>,
}

/// Behaviour of limits while the shared store is unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Each replica enforces the limits alone, divided by the configured replica count.
    Local,
    /// Admit requests without limiting.
    Open,
    /// Refuse requests with 503 until the store is back.
    Closed,
}

/// Limits shared across all keys of one team.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TeamLimits {
    /// Requests admitted for the whole team in any sliding 60-second window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u64>,
    /// Tokens admitted for the whole team in any sliding 60-second window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u64>,
}

/// Observed state of an ApiKey. Never holds the key itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyStatus {
    /// Short non-secret beginning of the key, to tell keys apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// Name of the Secret that reveals a generated key once. It is deleted after a while or
    /// when annotated `portcullis.dev/consumed: "true"`; the key stays valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reveal_secret: Option<String>,
    /// When the reveal Secret is deleted if nobody marks it consumed first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reveal_expires_at: Option<DateTime<Utc>>,
    /// When the current key was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<DateTime<Utc>>,
    /// When the key stops being accepted (copied from `spec.expiresAt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The `spec.rotation` value the current generated key was issued for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<String>,
    /// HMAC-SHA256 digests (under the gateway's secret pepper) of the generated keys that
    /// authenticate as this ApiKey: the current one, and the previous one during a rotation's
    /// grace period. The operator's durable record of what it issued; the key itself is never
    /// stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub issued_digests: Vec<IssuedKeyDigest>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// While revoked: how many data-plane replicas refuse the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<EnforcementStatus>,
    /// Current conditions; `Ready` says whether the key is accepted, and while revoked
    /// `Enforced` says whether every live data-plane replica refuses it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One issued key, by digest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuedKeyDigest {
    /// Hex HMAC-SHA256 of the key under the pepper.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub digest: String,
    /// Short non-secret beginning of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// End of the rotation grace period; unset for the current key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<DateTime<Utc>>,
    /// Names the pepper the digest was made under (16 hex characters of an HMAC, never the
    /// pepper); unset in records written before it was kept. A digest under another pepper
    /// matches no key: the key must be rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{16}$"))]
    pub pepper_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_rotation(rotation: Option<IntOrString>) -> ApiKeySpec {
        ApiKeySpec { rotation, ..Default::default() }
    }

    #[test]
    fn a_rotation_token_is_bounded_and_still_tells_values_apart() {
        assert_eq!(with_rotation(None).rotation_token(), "");
        assert_eq!(with_rotation(Some(IntOrString::Int(2))).rotation_token(), "2");
        assert_eq!(with_rotation(Some(IntOrString::String("2".into()))).rotation_token(), "2");
        let longest = "r".repeat(bounds::ROTATION_LEN);
        assert_eq!(with_rotation(Some(IntOrString::String(longest.clone()))).rotation_token(), longest);
        let long = |c: &str| with_rotation(Some(IntOrString::String(c.repeat(1 << 20)))).rotation_token();
        let (a, b) = (long("a"), long("b"));
        assert!(a.starts_with("sha256:") && a.len() == 7 + 64, "{a}");
        assert_ne!(a, b);
        assert_eq!(a, long("a"));
        // Counted in characters, as the schema does: 253 two-byte characters are kept as they are.
        let wide = "é".repeat(bounds::ROTATION_LEN);
        assert_eq!(with_rotation(Some(IntOrString::String(wide.clone()))).rotation_token(), wide);
        // A token recorded before the digest (the raw value) is still this rotation; another is not.
        let spec = with_rotation(Some(IntOrString::String("a".repeat(1 << 20))));
        assert!(spec.rotation_is(&"a".repeat(1 << 20)));
        assert!(spec.rotation_is(&a));
        assert!(!spec.rotation_is(&b));
        assert!(!spec.rotation_is("2"));
        assert!(with_rotation(Some(IntOrString::Int(2))).rotation_is("2"));
    }
}
