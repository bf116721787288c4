//! Field checks shared by `compile` and the admission webhook. Each returns a message a
//! person can act on; the caller attaches the object and field.

use portcullis_crds::pattern;
use portcullis_crds::v1alpha1::{bounds, KillSwitchScope, ObjectRef};

use crate::inputs::Tenancy;

/// Longest free-text field (owner, team, reason) accepted.
pub const MAX_TEXT_LEN: usize = bounds::TEXT_LEN;
/// Longest model or upstream model name.
pub const MAX_MODEL_NAME_LEN: usize = bounds::MODEL_NAME_LEN;

pub fn pattern_list(patterns: &[String]) -> Result<(), (usize, &'static str)> {
    if patterns.len() > bounds::PATTERNS {
        return Err((bounds::PATTERNS, "is one pattern too many: a list holds at most 256"));
    }
    for (i, p) in patterns.iter().enumerate() {
        pattern::validate(p).map_err(|why| (i, why))?;
    }
    Ok(())
}

pub fn text(value: &str) -> Result<(), String> {
    // Characters, as the API server counts `maxLength`.
    if value.chars().count() > MAX_TEXT_LEN {
        return Err(format!("must be at most {MAX_TEXT_LEN} characters"));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err("must not contain control characters".to_owned());
    }
    Ok(())
}

/// An ApiKey's `rotation`: at most [`bounds::ROTATION_LEN`] characters, as the CRD says.
pub fn rotation(spec: &portcullis_crds::v1alpha1::ApiKeySpec) -> Result<(), String> {
    if spec.rotation_too_long() {
        return Err(format!("must be at most {} characters", bounds::ROTATION_LEN));
    }
    Ok(())
}

/// Model names travel in URLs (Azure deployments) and metric labels: keep them plain.
pub fn model_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_MODEL_NAME_LEN {
        return Err(format!("must be 1-{MAX_MODEL_NAME_LEN} characters"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:/@*?".contains(&b)) {
        return Err("may contain only letters, digits and - _ . : / @ (and * ? as globs)".to_owned());
    }
    Ok(())
}

/// An absolute http(s) URL without query or fragment; returns it without a trailing slash.
pub fn base_url(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| "must start with https:// or http://".to_owned())?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err("must name a host".to_owned());
    }
    if url.len() > bounds::BASE_URL_LEN {
        return Err("must be at most 2048 characters".to_owned());
    }
    if url.bytes().any(|b| !b.is_ascii_graphic()) || url.contains(['?', '#', '@']) {
        return Err("must not contain spaces, a query, a fragment or user info".to_owned());
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// A provider key goes into an HTTP header: visible ASCII only.
pub fn header_secret(value: &[u8]) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("is empty");
    }
    if value.len() > portcullis_crds::sealing::MAX_PLAINTEXT_LEN {
        return Err("is longer than 16 KiB");
    }
    if !value.iter().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces (it is sent as an HTTP header)");
    }
    Ok(())
}

/// A KillSwitch in `namespace` that names another namespace's key or the other namespace
/// itself, when `namespace` is a tenant's: `(field, message)`. A tenant's switch stops only its
/// own namespace's keys; one that reaches further belongs in a platform namespace.
pub fn switch_within_tenant(
    scope: &KillSwitchScope,
    namespace: &str,
    tenancy: &Tenancy,
) -> Result<(), (&'static str, String)> {
    let tenant = match tenancy.tenant_of(namespace) {
        Some(tenant) => tenant,
        None => return Ok(()),
    };
    let key = scope.api_key.as_deref().map(|r| ObjectRef::parse_relative(r, namespace).namespace);
    let named = [("spec.scope.apiKey", key), ("spec.scope.namespace", scope.namespace.clone())];
    match named.into_iter().find_map(|(field, other)| other.filter(|o| *o != tenant).map(|o| (field, o))) {
        None => Ok(()),
        Some((field, other)) => Err((
            field,
            format!(
                "names namespace {other}, but a KillSwitch in {tenant} stops only the ApiKeys of {tenant}; one that \
                 reaches other namespaces belongs in a platform namespace ({})",
                tenancy.describe()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(base_url("https://api.openai.com/v1/").as_deref(), Ok("https://api.openai.com/v1"));
        assert_eq!(base_url("http://127.0.0.1:8000").as_deref(), Ok("http://127.0.0.1:8000"));
        for bad in ["ftp://x", "https://", "https://x/v1?x=1", "https://u:p@x", "https://x y", "api.openai.com"] {
            assert!(base_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn model_names_and_secrets() {
        assert!(model_name("gpt-4o-2024-08-06").is_ok());
        assert!(model_name("meta-llama/Llama-3.1-8B-Instruct").is_ok());
        assert!(model_name("bad name").is_err());
        assert!(model_name("").is_err());
        assert!(header_secret(b"sk-abc").is_ok());
        assert!(header_secret(b"sk abc").is_err());
        assert!(header_secret(b"sk\r\nx: y").is_err());
        assert!(text("ok").is_ok());
        assert!(text("bad\u{7}").is_err());
    }

    /// Lengths count characters, as the API server's `maxLength` does: a multi-byte string it
    /// admitted at the limit is not refused here, and one past it is.
    #[test]
    fn lengths_count_characters_like_the_api_server() {
        let at = |n: usize| "é".repeat(n);
        assert!(text(&at(MAX_TEXT_LEN)).is_ok());
        assert!(text(&at(MAX_TEXT_LEN + 1)).is_err());
        assert!(pattern_list(&[at(bounds::PATTERN_LEN)]).is_ok());
        assert!(pattern_list(&[at(bounds::PATTERN_LEN + 1)]).is_err());
        let scope = |r: String| KillSwitchScope { provider: Some(r), ..Default::default() };
        assert!(scope(at(bounds::OBJECT_REF_LEN)).target().is_ok());
        assert!(scope(at(bounds::OBJECT_REF_LEN + 1)).target().is_err());
    }
}
