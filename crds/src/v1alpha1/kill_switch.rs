use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{bounds, EnforcementStatus};

/// An emergency stop: while active, matching requests are refused with 503 before any upstream
/// call.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "KillSwitch",
    plural = "killswitches",
    shortname = "ks",
    namespaced,
    status = "KillSwitchStatus",
    printcolumn = r#"{"name":"Active","type":"boolean","jsonPath":".spec.active"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".spec.reason"}"#,
    printcolumn = r#"{"name":"Expires","type":"date","jsonPath":".spec.expiresAt"}"#,
    printcolumn = r#"{"name":"Enforced","type":"string","jsonPath":".status.enforcement.summary"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct KillSwitchSpec {
    /// What the switch stops. Exactly one target.
    pub scope: KillSwitchScope,
    /// True stops matching traffic; false leaves the switch armed but inert.
    #[serde(default)]
    pub active: bool,
    /// Why traffic is stopped; shown to clients in the error message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bounds::TEXT_LEN))]
    pub reason: Option<String>,
    /// The switch turns itself off at this moment (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// The target of a kill switch. Set exactly one field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "[has(self.global), has(self.provider), has(self.model), has(self.apiKey), has(self.__namespace__)].filter(x, x).size() == 1",
        "message": "scope must name exactly one target: global, provider, model, apiKey or namespace"
    },
    {
        "rule": "!has(self.global) || self.global",
        "message": "global may only be set to true"
    }
]))]
pub struct KillSwitchScope {
    /// Stop all traffic through the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global: Option<bool>,
    /// Stop traffic to one ProviderCredential (`name` in this namespace, or `namespace/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = bounds::OBJECT_REF_LEN))]
    pub provider: Option<String>,
    /// Stop traffic for models matching this name or glob pattern: the name a client asks for,
    /// or the name a provider is sent (`upstreamName`), so aliases of a stopped model stop too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = bounds::PATTERN_LEN))]
    pub model: Option<String>,
    /// Stop traffic from one ApiKey (`name` in this namespace, or `namespace/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = bounds::OBJECT_REF_LEN))]
    pub api_key: Option<String>,
    /// Stop traffic from every ApiKey in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = bounds::NAMESPACE_LEN))]
    pub namespace: Option<String>,
}

/// A validated kill switch target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScopeTarget<'a> {
    Global,
    Provider(&'a str),
    Model(&'a str),
    ApiKey(&'a str),
    Namespace(&'a str),
}

impl KillSwitchScope {
    /// The one target this scope names, or why it does not name exactly one.
    pub fn target(&self) -> Result<ScopeTarget<'_>, &'static str> {
        let mut targets = Vec::with_capacity(1);
        match self.global {
            Some(true) => targets.push(ScopeTarget::Global),
            Some(false) => return Err("`global` may only be set to true"),
            None => {}
        }
        if let Some(p) = &self.provider {
            targets.push(ScopeTarget::Provider(p));
        }
        if let Some(m) = &self.model {
            targets.push(ScopeTarget::Model(m));
        }
        if let Some(k) = &self.api_key {
            targets.push(ScopeTarget::ApiKey(k));
        }
        if let Some(n) = &self.namespace {
            targets.push(ScopeTarget::Namespace(n));
        }
        // Characters, as the API server counts `maxLength`.
        let within = |text: &str, max: usize| !text.is_empty() && text.chars().count() <= max;
        match targets.len() {
            1 => match targets.remove(0) {
                ScopeTarget::Provider(r) | ScopeTarget::ApiKey(r) if !within(r, bounds::OBJECT_REF_LEN) => {
                    Err("a provider or apiKey reference must be 1-317 characters (`name` or `namespace/name`)")
                }
                ScopeTarget::Namespace(n) if !within(n, bounds::NAMESPACE_LEN) => {
                    Err("namespace must be 1-63 characters")
                }
                target => Ok(target),
            },
            0 => Err("must name one target: global, provider, model, apiKey or namespace"),
            _ => Err("must name exactly one target, not several"),
        }
    }
}

/// Observed state of a KillSwitch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KillSwitchStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many data-plane replicas enforce the current spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<EnforcementStatus>,
    /// Current conditions; `Enforced` is True once every live data-plane replica applies the
    /// current spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_names_exactly_one_target() {
        let global = KillSwitchScope { global: Some(true), ..Default::default() };
        assert_eq!(global.target(), Ok(ScopeTarget::Global));
        let model = KillSwitchScope { model: Some("gpt-*".into()), ..Default::default() };
        assert_eq!(model.target(), Ok(ScopeTarget::Model("gpt-*")));
        assert!(KillSwitchScope::default().target().is_err());
        let two = KillSwitchScope { global: Some(true), model: Some("x".into()), ..Default::default() };
        assert!(two.target().is_err());
        let off = KillSwitchScope { global: Some(false), ..Default::default() };
        assert!(off.target().is_err());
    }

    #[test]
    fn references_are_bounded_like_the_schema() {
        let longest = format!("{}/{}", "n".repeat(63), "x".repeat(253));
        assert_eq!(longest.len(), bounds::OBJECT_REF_LEN);
        let provider = |r: &str| KillSwitchScope { provider: Some(r.to_owned()), ..Default::default() };
        let api_key = |r: &str| KillSwitchScope { api_key: Some(r.to_owned()), ..Default::default() };
        assert_eq!(provider(&longest).target(), Ok(ScopeTarget::Provider(&longest)));
        assert_eq!(api_key(&longest).target(), Ok(ScopeTarget::ApiKey(&longest)));
        for scope in [provider(&format!("{longest}x")), api_key(&format!("{longest}x")), provider(""), api_key("")] {
            assert!(scope.target().is_err_and(|why| why.contains("1-317")), "{scope:?}");
        }
        let namespace = |n: &str| KillSwitchScope { namespace: Some(n.to_owned()), ..Default::default() };
        assert_eq!(namespace(&"n".repeat(63)).target(), Ok(ScopeTarget::Namespace(&"n".repeat(63))));
        for bad in ["", &"n".repeat(64)] {
            assert!(namespace(bad).target().is_err_and(|why| why.contains("1-63")), "{bad:?}");
        }
    }
}
