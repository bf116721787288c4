//! The one compile step: custom resources + Secret values + master keyring + pepper →
//! `GatewaySnapshot`.
//!
//! Pure and deterministic for equal inputs: a provider key that did not change keeps its previous
//! ciphertext (found by opening the previous snapshot), so re-applying the same manifests yields
//! the same content digest and generation — no write, no churn.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use portcullis_crds::digest::{ClientKey, KeyDigest, Pepper};
use portcullis_crds::sealing::MasterKeyring;
use portcullis_crds::secret::SecretBytes;
use portcullis_crds::snapshot::{
    ApiKeyEntry, CredentialEntry, GatewaySnapshot, IssuedDigest, KillSwitchEntry, SnapshotContent, SwitchScope,
};
use portcullis_crds::v1alpha1::{ApiKey, KillSwitch, ObjectRef, ProviderCredential, ProviderKind, ScopeTarget};
use portcullis_crds::{pattern, sealing::SealedCredential};

use crate::inputs::{CompileInputs, SecretLookupError};
use crate::validate;

/// One problem with one field of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileError {
    pub kind: &'static str,
    pub object: ObjectRef,
    pub field: String,
    pub message: String,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}: {}", self.kind, self.object, self.field, self.message)
    }
}

/// Every problem found; a snapshot with any of them is rejected whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileErrors(pub Vec<CompileError>);

impl fmt::Display for CompileErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CompileErrors {}

/// A compiled snapshot and the problems that did not block it (e.g. a kill switch naming an
/// object that does not exist yet).
#[derive(Debug)]
pub struct Compiled {
    pub snapshot: GatewaySnapshot,
    pub warnings: Vec<CompileError>,
}

/// Collects errors against one object.
struct Report<'a> {
    kind: &'static str,
    object: ObjectRef,
    errors: &'a mut Vec<CompileError>,
}

impl Report<'_> {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(CompileError {
            kind: self.kind,
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        });
    }
}

fn identity(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectRef {
    ObjectRef::new(
        meta.namespace.clone().unwrap_or_else(|| "default".to_owned()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Compiles `inputs` into a snapshot whose generation follows `previous`.
pub fn compile(
    inputs: &CompileInputs,
    keyring: &MasterKeyring,
    pepper: &Pepper,
    previous: Option<&GatewaySnapshot>,
) -> Result<Compiled, CompileErrors> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();

    let mut api_keys: Vec<ApiKeyEntry> =
        inputs.api_keys.iter().filter_map(|k| compile_api_key(k, inputs, pepper, &mut errors)).collect();
    api_keys.sort_by(|a, b| a.key.cmp(&b.key));
    reject_duplicates("ApiKey", api_keys.iter().map(|k| &k.key), &mut errors);
    reject_shared_digests(&api_keys, &mut errors);

    let previous_credentials: BTreeMap<&ObjectRef, &CredentialEntry> =
        previous.map(|p| p.content.credentials.iter().map(|c| (&c.credential, c)).collect()).unwrap_or_default();
    let mut credentials: Vec<CredentialEntry> = inputs
        .credentials
        .iter()
        .filter_map(|c| {
            let prev = previous_credentials.get(&identity(&c.metadata)).copied();
            compile_credential(c, inputs, keyring, prev, &mut errors)
        })
        .collect();
    credentials.sort_by(|a, b| a.credential.cmp(&b.credential));
    reject_duplicates("ProviderCredential", credentials.iter().map(|c| &c.credential), &mut errors);

    let mut kill_switches: Vec<KillSwitchEntry> = inputs
        .kill_switches
        .iter()
        .filter_map(|s| compile_kill_switch(s, inputs, &api_keys, &credentials, &mut errors, &mut warnings))
        .chain(inputs.kept_kill_switches.iter().cloned())
        .collect();
    kill_switches.sort_by(|a, b| a.switch.cmp(&b.switch));
    reject_duplicates("KillSwitch", kill_switches.iter().map(|s| &s.switch), &mut errors);

    if !errors.is_empty() {
        return Err(CompileErrors(errors));
    }
    let content = SnapshotContent { api_keys, credentials, kill_switches, pepper_id: Some(pepper.id()) };
    // Tagging fails only for a keyring whose active key is missing, which `MasterKeyring` rules out.
    let snapshot = GatewaySnapshot::new(content, previous).tag(keyring).map_err(|e| {
        CompileErrors(vec![CompileError {
            kind: "Snapshot",
            object: ObjectRef::new("", "snapshot"),
            field: "tag".to_owned(),
            message: e.to_string(),
        }])
    })?;
    Ok(Compiled { snapshot, warnings })
}

fn check_name(report: &mut Report<'_>) -> bool {
    if report.object.name.is_empty() {
        report.error("metadata.name", "is required");
        return false;
    }
    true
}

fn compile_api_key(
    key: &ApiKey,
    inputs: &CompileInputs,
    pepper: &Pepper,
    errors: &mut Vec<CompileError>,
) -> Option<ApiKeyEntry> {
    let object = identity(&key.metadata);
    let before = errors.len();
    let mut report = Report { kind: "ApiKey", object: object.clone(), errors };
    if !check_name(&mut report) {
        return None;
    }
    let spec = &key.spec;
    for (field, value) in [("spec.owner", &spec.owner), ("spec.team", &spec.team)] {
        if let Some(Err(why)) = value.as_deref().map(validate::text) {
            report.error(field, why);
        }
    }
    for (field, patterns) in
        [("spec.allowedModels", &spec.allowed_models), ("spec.allowedProviders", &spec.allowed_providers)]
    {
        if let Err((i, why)) = validate::pattern_list(patterns) {
            report.error(format!("{field}[{i}]"), why);
        }
    }

    if spec.team_limits.is_some() && spec.team.is_none() {
        report.error("spec.teamLimits", "needs spec.team: team limits apply to a named team");
    }
    // The CRD's schema says so too; local mode's manifests meet no API server.
    let (limits, team) = (spec.limits.clone().unwrap_or_default(), spec.team_limits.clone().unwrap_or_default());
    for (field, value) in [
        ("spec.limits.requestsPerMinute", limits.requests_per_minute),
        ("spec.limits.tokensPerMinute", limits.tokens_per_minute),
        ("spec.limits.tokensPerDay", limits.tokens_per_day),
        ("spec.limits.tokensPerMonth", limits.tokens_per_month),
        ("spec.teamLimits.requestsPerMinute", team.requests_per_minute),
        ("spec.teamLimits.tokensPerMinute", team.tokens_per_minute),
    ] {
        if value == Some(0) {
            report.error(field, "must be at least 1 (to stop a key, set spec.revoked or engage a KillSwitch)");
        }
    }

    let digests = match &spec.secret_ref {
        Some(secret_ref) => {
            let secret = ObjectRef::new(object.namespace.clone(), secret_ref.name.clone());
            match inputs.secrets.get(&secret, &secret_ref.key) {
                Ok(value) => match ClientKey::from_brought(value) {
                    Ok(client_key) => vec![IssuedDigest { digest: client_key.digest(pepper), valid_until: None }],
                    Err(why) => {
                        report.error("spec.secretRef", format!("Secret {secret} key {:?}: {why}", secret_ref.key));
                        Vec::new()
                    }
                },
                Err(missing) => {
                    report.error("spec.secretRef", secret_lookup_message(&secret, &secret_ref.key, missing));
                    Vec::new()
                }
            }
        }
        None if inputs.issued_under_another_pepper.contains(&object) => {
            report.error(
                "status.issuedDigests",
                "its key was issued under another pepper (the pepper Secret was made again) and matches nothing \
                 now; change spec.rotation to issue a new key",
            );
            Vec::new()
        }
        None => match inputs.issued_digests.get(&object) {
            Some(issued) if !issued.is_empty() => issued.clone(),
            _ => {
                report.error(
                    "spec.secretRef",
                    "no key has been issued for this ApiKey yet; the operator generates one in a cluster, and local mode needs a secretRef",
                );
                Vec::new()
            }
        },
    };

    if report.errors.len() > before {
        return None;
    }
    Some(ApiKeyEntry {
        key: object,
        uid: key.metadata.uid.clone().unwrap_or_default(),
        owner: spec.owner.clone(),
        team: spec.team.clone(),
        digests,
        allowed_models: spec.allowed_models.clone(),
        allowed_providers: spec.allowed_providers.clone(),
        expires_at: spec.expires_at,
        revoked: spec.revoked,
        limits: spec.limits.clone().unwrap_or_default(),
        team_limits: spec.team_limits.clone(),
    })
}

fn secret_lookup_message(secret: &ObjectRef, key: &str, missing: SecretLookupError) -> String {
    match missing {
        SecretLookupError::SecretNotFound => format!("Secret {secret} not found"),
        SecretLookupError::KeyNotFound => format!("Secret {secret} has no key {key:?}"),
    }
}

fn compile_credential(
    credential: &ProviderCredential,
    inputs: &CompileInputs,
    keyring: &MasterKeyring,
    previous: Option<&CredentialEntry>,
    errors: &mut Vec<CompileError>,
) -> Option<CredentialEntry> {
    let object = identity(&credential.metadata);
    let before = errors.len();
    let mut report = Report { kind: "ProviderCredential", object: object.clone(), errors };
    if !check_name(&mut report) {
        return None;
    }
    let spec = &credential.spec;

    let base_url = match (spec.kind, spec.base_url.as_deref()) {
        (ProviderKind::Mock, _) => String::new(),
        (kind, url) => match url.or(kind.default_base_url()) {
            Some(url) => validate::base_url(url).unwrap_or_else(|why| {
                report.error("spec.baseUrl", why);
                String::new()
            }),
            None => {
                report.error("spec.baseUrl", format!("is required for kind {kind}"));
                String::new()
            }
        },
    };

    let azure_api_version = match (spec.kind, &spec.azure) {
        (ProviderKind::AzureOpenAi, Some(azure)) => {
            let ok = !azure.api_version.is_empty()
                && azure.api_version.len() <= portcullis_crds::v1alpha1::bounds::API_VERSION_LEN
                && azure.api_version.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !ok {
                report.error("spec.azure.apiVersion", "must look like 2024-10-21");
            }
            Some(azure.api_version.clone())
        }
        (ProviderKind::AzureOpenAi, None) => {
            report.error("spec.azure.apiVersion", "is required for kind azure-openai");
            None
        }
        _ => None,
    };

    if spec.models.is_empty() {
        report.error("spec.models", "must list at least one model");
    }
    let most = portcullis_crds::v1alpha1::bounds::MODELS;
    if spec.models.len() > most {
        report.error("spec.models", format!("must list at most {most} models"));
    }
    for (i, model) in spec.models.iter().enumerate() {
        if let Err(why) = validate::model_name(&model.name) {
            report.error(format!("spec.models[{i}].name"), why);
        }
        if let Some(upstream) = &model.upstream_name {
            if pattern::is_glob(&model.name) {
                report.error(format!("spec.models[{i}].upstreamName"), "cannot rename a glob pattern");
            } else if let Err(why) = validate::model_name(upstream).and_then(|()| {
                if pattern::is_glob(upstream) {
                    Err("must not be a glob pattern".to_owned())
                } else {
                    Ok(())
                }
            }) {
                report.error(format!("spec.models[{i}].upstreamName"), why);
            }
        }
    }
    if spec.weight > 1_000_000 {
        report.error("spec.weight", "must be at most 1000000");
    }

    let provider_key: Option<SecretBytes> = match (&spec.secret_ref, spec.kind.needs_secret()) {
        (Some(secret_ref), _) => {
            let secret = ObjectRef::new(object.namespace.clone(), secret_ref.name.clone());
            match inputs.secrets.get(&secret, &secret_ref.key) {
                Ok(value) => {
                    let value = value.trimmed();
                    match validate::header_secret(value.expose()) {
                        Ok(()) => Some(value),
                        Err(why) => {
                            report.error("spec.secretRef", format!("Secret {secret} key {:?} {why}", secret_ref.key));
                            None
                        }
                    }
                }
                Err(missing) => {
                    report.error("spec.secretRef", secret_lookup_message(&secret, &secret_ref.key, missing));
                    None
                }
            }
        }
        (None, true) => {
            report.error("spec.secretRef", format!("is required for kind {}", spec.kind));
            None
        }
        (None, false) => None,
    };

    if report.errors.len() > before {
        return None;
    }

    let uid = credential.metadata.uid.clone().unwrap_or_default();
    let (key_version, sealed_key) = match provider_key {
        None => (previous.map_or(1, |p| p.key_version), None),
        Some(plaintext) => match seal_reusing(&object, &uid, &plaintext, keyring, previous) {
            Ok((version, sealed)) => (version, Some(sealed)),
            Err(why) => {
                report.error("spec.secretRef", format!("could not seal the provider key: {why}"));
                return None;
            }
        },
    };

    Some(CredentialEntry {
        tenant: inputs.tenancy.tenant_of(&object.namespace),
        credential: object,
        uid,
        kind: spec.kind,
        base_url,
        models: spec.models.clone(),
        priority: spec.priority,
        weight: spec.weight,
        azure_api_version,
        key_version,
        sealed_key,
    })
}

/// Keeps the previous ciphertext when the key and the active master key are unchanged; re-seals
/// under the active key after a master-key rotation; bumps the version when the key changed.
fn seal_reusing(
    object: &ObjectRef,
    uid: &str,
    plaintext: &SecretBytes,
    keyring: &MasterKeyring,
    previous: Option<&CredentialEntry>,
) -> Result<(u64, SealedCredential), portcullis_crds::sealing::SealingError> {
    let mut version = 1;
    if let Some(prev) = previous.filter(|p| p.uid == uid) {
        let unchanged = prev
            .sealed_key
            .as_ref()
            .and_then(|sealed| keyring.open(&prev.binding(), sealed).ok().map(|old| (sealed, old)))
            .filter(|(_, old)| old == plaintext);
        match unchanged {
            Some((sealed, _)) if &sealed.key_id == keyring.active_id() => {
                return Ok((prev.key_version, sealed.clone()));
            }
            Some(_) => version = prev.key_version,
            None => version = prev.key_version.saturating_add(1),
        }
    }
    let binding = portcullis_crds::sealing::SealBinding {
        namespace: &object.namespace,
        name: &object.name,
        uid,
        key_version: version,
    };
    Ok((version, keyring.seal(&binding, plaintext)?))
}

fn compile_kill_switch(
    switch: &KillSwitch,
    inputs: &CompileInputs,
    api_keys: &[ApiKeyEntry],
    credentials: &[CredentialEntry],
    errors: &mut Vec<CompileError>,
    warnings: &mut Vec<CompileError>,
) -> Option<KillSwitchEntry> {
    let object = identity(&switch.metadata);
    let mut report = Report { kind: "KillSwitch", object: object.clone(), errors };
    if !check_name(&mut report) {
        return None;
    }
    let spec = &switch.spec;
    if let Some(Err(why)) = spec.reason.as_deref().map(validate::text) {
        report.error("spec.reason", why);
        return None;
    }
    let mut warn = |field: &str, message: String| {
        warnings.push(CompileError { kind: "KillSwitch", object: object.clone(), field: field.to_owned(), message });
    };
    let scope = match spec.scope.target() {
        Err(why) => {
            report.error("spec.scope", why);
            return None;
        }
        Ok(ScopeTarget::Global) => SwitchScope::Global,
        Ok(ScopeTarget::Provider(reference)) => {
            let target = ObjectRef::parse_relative(reference, &object.namespace);
            if !credentials.iter().any(|c| c.credential == target) {
                warn("spec.scope.provider", format!("ProviderCredential {target} does not exist (yet)"));
            }
            SwitchScope::Provider(target)
        }
        Ok(ScopeTarget::ApiKey(reference)) => {
            let target = ObjectRef::parse_relative(reference, &object.namespace);
            if !api_keys.iter().any(|k| k.key == target) {
                warn("spec.scope.apiKey", format!("ApiKey {target} does not exist (yet)"));
            }
            SwitchScope::ApiKey(target)
        }
        Ok(ScopeTarget::Model(model)) => {
            if let Err(why) = pattern::validate(model) {
                report.error("spec.scope.model", why);
                return None;
            }
            SwitchScope::Model(model.to_owned())
        }
        Ok(ScopeTarget::Namespace(namespace)) => SwitchScope::Namespace(namespace.to_owned()),
    };
    if let Err((field, why)) = validate::switch_within_tenant(&spec.scope, &object.namespace, &inputs.tenancy) {
        report.error(field, why);
        return None;
    }
    let tenant = inputs.tenancy.tenant_of(&object.namespace);
    Some(KillSwitchEntry {
        switch: object,
        scope,
        active: spec.active,
        reason: spec.reason.clone(),
        expires_at: spec.expires_at,
        tenant,
    })
}

fn reject_duplicates<'a>(
    kind: &'static str,
    objects: impl Iterator<Item = &'a ObjectRef>,
    errors: &mut Vec<CompileError>,
) {
    let mut last: Option<&ObjectRef> = None;
    for object in objects {
        if last == Some(object) {
            errors.push(CompileError {
                kind,
                object: object.clone(),
                field: "metadata.name".to_owned(),
                message: "is declared more than once".to_owned(),
            });
        }
        last = Some(object);
    }
}

/// Two ApiKeys holding the same key would make authentication ambiguous. Every holder is left
/// out, not all but the first: otherwise an ApiKey made to point at a revoked key's Secret could
/// keep that key working under its own name. The message names no other object, so holding a
/// key does not tell whose it is.
fn reject_shared_digests(api_keys: &[ApiKeyEntry], errors: &mut Vec<CompileError>) {
    let mut owners: BTreeMap<&KeyDigest, &ObjectRef> = BTreeMap::new();
    let mut shared: BTreeSet<&ObjectRef> = BTreeSet::new();
    for entry in api_keys {
        for issued in &entry.digests {
            if let Some(first) = owners.insert(&issued.digest, &entry.key) {
                if first != &entry.key {
                    shared.insert(first);
                    shared.insert(&entry.key);
                }
            }
        }
    }
    errors.extend(shared.into_iter().map(|object| CompileError {
        kind: "ApiKey",
        object: object.clone(),
        field: "spec.secretRef".to_owned(),
        message: "holds the same key as another ApiKey; every ApiKey needs its own key".to_owned(),
    }));
}
