//! The validating admission webhook's decision — pure: AdmissionReview JSON in, AdmissionReview
//! JSON out, and the requester recorded as an actor hint for the ledger.
//!
//! ```text
//!   API server ──AdmissionReview──▶ review() ─┬─ allowed / denied with a message a person can act on
//!                                             └─ userInfo ─▶ ActorHints ─▶ (reconcile) ─▶ ledger entry
//! ```
//!
//! Only allowed requests that are not dry runs and that create, delete or change the spec leave
//! a hint. See [`ActorHints`] for what the hints can and cannot promise.

use portcullis_crds::v1alpha1::{bounds, ApiKeySpec, KillSwitchSpec, ProviderCredentialSpec};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::audit::ActorHints;
use crate::inputs::Tenancy;
use crate::ledger::{Actor, ActorSource};
use crate::validate;

/// The AdmissionReview the webhook answers with.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    pub api_version: String,
    pub kind: String,
    pub response: AdmissionResponse,
}

/// The AdmissionReview the API server sends, read without building a tree of it: the objects
/// stay raw text borrowed from the body until the one `spec` of a kind this webhook knows is
/// read into its typed struct. A caller who can reach the webhook picks every byte of this, so
/// what a review costs is about its size, not many times it (`serde_json::Value` spends 32
/// bytes or more per element).
#[derive(Debug, Deserialize)]
struct ReviewIn<'a> {
    #[serde(default, borrow)]
    request: Option<AdmissionRequest<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdmissionRequest<'a> {
    uid: String,
    kind: GroupVersionKind,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    operation: String,
    #[serde(default)]
    user_info: UserInfo,
    #[serde(default, borrow)]
    object: Option<&'a RawValue>,
    /// The object before an UPDATE or DELETE.
    #[serde(default, borrow)]
    old_object: Option<&'a RawValue>,
    /// A dry run persists nothing, so it leaves no hint.
    #[serde(default)]
    dry_run: bool,
}

#[derive(Debug, Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    kind: String,
}

#[derive(Debug, Default, Deserialize)]
struct UserInfo {
    #[serde(default)]
    username: String,
    #[serde(default)]
    groups: Vec<String>,
}

/// What the webhook reads of an object: its name and its spec, still raw.
#[derive(Debug, Default, Deserialize)]
struct ObjectIn<'a> {
    #[serde(default)]
    metadata: MetadataIn,
    #[serde(default, borrow)]
    spec: Option<&'a RawValue>,
}

#[derive(Debug, Default, Deserialize)]
struct MetadataIn {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<ResponseStatus>,
}

#[derive(Debug, Serialize)]
pub struct ResponseStatus {
    pub code: u16,
    pub message: String,
}

/// Why a body is not an AdmissionReview at all (the server answers 400).
#[derive(Debug, thiserror::Error)]
#[error("not an admission.k8s.io/v1 AdmissionReview: {0}")]
pub struct NotAReview(String);

/// The API group of the kinds this webhook decides.
const GROUP: &str = "portcullis.dev";
/// The kinds it decides; a review of anything else is allowed and leaves no hint.
const KINDS: [&str; 3] = ["ApiKey", "ProviderCredential", "KillSwitch"];
/// The longest request uid taken: the API server's are UUIDs (36 characters). It is echoed in
/// the answer and logged, so a caller cannot make either long or put line breaks in the log.
const UID_LEN: usize = 128;

fn plausible_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= UID_LEN && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The name and raw spec of an object in a review (an absent one has neither).
fn object(raw: Option<&RawValue>) -> Result<ObjectIn<'_>, NotAReview> {
    let Some(raw) = raw else { return Ok(ObjectIn::default()) };
    serde_json::from_str(raw.get()).map_err(|e| NotAReview(format!("object: {e}")))
}

/// `spec` read as `T`, or why it cannot be.
fn typed<'a, T: Deserialize<'a>>(spec: Option<&'a RawValue>) -> Result<T, String> {
    let spec = spec.ok_or_else(|| "spec: required".to_owned())?;
    serde_json::from_str(spec.get()).map_err(|e| format!("spec: {e}"))
}

/// Problems with a spec (raw JSON, `None` when the object has none), each naming its field and
/// what to do.
pub fn validate_object(kind: &str, namespace: &str, spec: Option<&RawValue>, tenancy: &Tenancy) -> Vec<String> {
    let mut problems = Vec::new();
    match kind {
        "KillSwitch" => match typed::<KillSwitchSpec>(spec) {
            Ok(spec) => {
                if let Err(why) = spec.scope.target() {
                    problems.push(format!("spec.scope {why}; e.g. `scope: {{model: \"gpt-4o*\"}}`"));
                }
                if let Err((field, why)) = validate::switch_within_tenant(&spec.scope, namespace, tenancy) {
                    problems.push(format!("{field}: {why}"));
                }
                if let Some(model) = &spec.scope.model {
                    if let Err(why) = portcullis_crds::pattern::validate(model) {
                        problems.push(format!("spec.scope.model {model:?}: {why}"));
                    }
                }
                if let Some(reason) = &spec.reason {
                    if let Err(why) = validate::text(reason) {
                        problems.push(format!("spec.reason: {why}"));
                    }
                }
            }
            Err(why) => problems.push(why),
        },
        "ApiKey" => match typed::<ApiKeySpec>(spec) {
            Ok(spec) => {
                for (field, list) in
                    [("allowedModels", &spec.allowed_models), ("allowedProviders", &spec.allowed_providers)]
                {
                    if let Err((i, why)) = validate::pattern_list(list) {
                        problems.push(format!("spec.{field}[{i}]: {why}"));
                    }
                }
                if spec.rotation.is_some() && spec.secret_ref.is_some() {
                    problems.push(
                        "spec.rotation applies to generated keys; rotate a secretRef key by changing its Secret".into(),
                    );
                }
                if let Err(why) = validate::rotation(&spec) {
                    problems.push(format!("spec.rotation: {why}"));
                }
            }
            Err(why) => problems.push(why),
        },
        "ProviderCredential" => match typed::<ProviderCredentialSpec>(spec) {
            Ok(spec) => {
                if let Some(url) = &spec.base_url {
                    if let Err(why) = validate::base_url(url) {
                        problems.push(format!("spec.baseUrl: {why}"));
                    }
                }
                if spec.kind.needs_secret() && spec.secret_ref.is_none() {
                    problems.push(format!(
                        "spec.secretRef is required for kind {}: name the Secret key holding the provider API key",
                        spec.kind.as_str()
                    ));
                }
                for (i, model) in spec.models.iter().enumerate() {
                    if let Err(why) = portcullis_crds::pattern::validate(&model.name) {
                        problems.push(format!("spec.models[{i}].name {:?}: {why}", model.name));
                    }
                }
            }
            Err(why) => problems.push(why),
        },
        _ => {}
    }
    problems
}

/// Bounds of what one hint keeps of the requester: enough for any real username (a service
/// account's is `system:serviceaccount:` + namespace + name, under 350 bytes) and group list,
/// while a review of several MiB cannot make 4,096 kept hints hold gigabytes.
const HINT_TEXT_LEN: usize = 512;
const HINT_GROUPS: usize = 32;

/// `text` cut to [`HINT_TEXT_LEN`] bytes at a character boundary, marked when cut.
fn clipped(text: &str) -> String {
    if text.len() <= HINT_TEXT_LEN {
        return text.to_owned();
    }
    format!("{}…", &text[..text.floor_char_boundary(HINT_TEXT_LEN)])
}

/// The requester as a hint: bounded, and saying when something was left out.
fn hint_actor(user: &UserInfo) -> Actor {
    let mut groups: Vec<String> = user.groups.iter().take(HINT_GROUPS).map(|g| clipped(g)).collect();
    if user.groups.len() > HINT_GROUPS {
        groups.push(format!("…and {} more", user.groups.len() - HINT_GROUPS));
    }
    Actor { username: clipped(&user.username), groups, source: ActorSource::AdmissionWebhook }
}

/// Answers one AdmissionReview. Allowed changes to the kinds this webhook decides leave the
/// requester as an actor hint.
pub fn review(body: &[u8], hints: &ActorHints, tenancy: &Tenancy) -> Result<AdmissionReview, NotAReview> {
    let review: ReviewIn<'_> = serde_json::from_slice(body).map_err(|e| NotAReview(e.to_string()))?;
    let request = review.request.ok_or_else(|| NotAReview("no request".into()))?;
    if !plausible_uid(&request.uid) {
        return Err(NotAReview(format!("request.uid must be 1 to {UID_LEN} letters, digits and '-'")));
    }
    let ours = request.kind.group == GROUP && KINDS.contains(&request.kind.kind.as_str());
    let kind = if ours { request.kind.kind.as_str() } else { "" };
    let (new, old) = if ours { (object(request.object)?, object(request.old_object)?) } else { Default::default() };
    // Metadata-only updates (the operator's own finalizer, labels, annotations) are no admin
    // action: a hint from them would outlive the object and misname the next requester. The API
    // server encodes the old and the new object alike, so equal specs are equal text.
    let changes_spec = request.operation != "UPDATE" || new.spec.map(RawValue::get) != old.spec.map(RawValue::get);
    // A spec left as it was is not checked again: an object stored before a check existed (a
    // longer `rotation`, say) must still take its finalizer's removal and be deleted.
    let problems = match request.operation.as_str() {
        "CREATE" | "UPDATE" if request.object.is_some() && changes_spec => {
            validate_object(kind, &request.namespace, new.spec, tenancy)
        }
        _ => Vec::new(),
    };
    let allowed = problems.is_empty();
    if ours && allowed && !request.dry_run && changes_spec {
        let name = match new.metadata.name {
            Some(n) if request.name.is_empty() => n,
            _ => request.name.clone(),
        };
        // Names the API server would refuse cannot be objects it asks about: no hint for them.
        if request.namespace.len() <= bounds::NAMESPACE_LEN && name.len() <= bounds::NAME_LEN {
            hints.record((kind.to_owned(), request.namespace.clone(), name), hint_actor(&request.user_info));
        }
    }
    let status = (!allowed).then(|| ResponseStatus {
        code: 422,
        message: format!("{kind} {}/{} is invalid: {}", request.namespace, request.name, problems.join("; ")),
    });
    Ok(AdmissionReview {
        api_version: "admission.k8s.io/v1".into(),
        kind: "AdmissionReview".into(),
        response: AdmissionResponse { uid: request.uid, allowed, status },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;
    use serde_json::{json, Value};

    fn request(kind: &str, operation: &str, spec: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "portcullis.dev", "version": "v1alpha1", "kind": kind},
                "resource": {"group": "portcullis.dev", "version": "v1alpha1", "resource": "killswitches"},
                "name": "stop-gpt",
                "namespace": "ops",
                "operation": operation,
                "userInfo": {"username": "oncall@example.com", "uid": "42", "groups": ["sre", "system:authenticated"]},
                "object": {"apiVersion": "portcullis.dev/v1alpha1", "kind": kind,
                           "metadata": {"name": "stop-gpt", "namespace": "ops"}, "spec": spec},
                "dryRun": false
            }
        }))
        .unwrap()
    }

    /// The answer to `body`, every namespace trusted (tenancy is covered by `webhook_tls`).
    fn answer(body: &[u8], hints: &ActorHints) -> AdmissionResponse {
        review(body, hints, &Tenancy::Shared).unwrap().response
    }

    fn allowed(body: &Value, hints: &ActorHints) -> bool {
        answer(&serde_json::to_vec(body).unwrap(), hints).allowed
    }

    #[test]
    fn allowed_change_records_the_requester() {
        let hints = ActorHints::default();
        let body = request("KillSwitch", "UPDATE", json!({"scope": {"model": "gpt-*"}, "active": true}));
        let response = answer(&body, &hints);
        assert!(response.allowed);
        assert_eq!(response.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
        let wire = serde_json::to_value(review(&body, &hints, &Tenancy::Shared).unwrap()).unwrap();
        assert_eq!(wire["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(wire["response"]["allowed"], true);
        let actor = hints.take(&("KillSwitch".into(), "ops".into(), "stop-gpt".into())).unwrap();
        assert_eq!(actor.username, "oncall@example.com");
        assert_eq!(actor.groups, ["sre", "system:authenticated"]);
        assert_eq!(actor.source, ActorSource::AdmissionWebhook);
    }

    /// A caller of the webhook picks the `userInfo` it sends: what a hint keeps of it is
    /// bounded, and a name no object can have leaves no hint.
    #[test]
    fn hints_keep_a_bounded_requester() {
        let hints = ActorHints::default();
        let mut body: Value =
            serde_json::from_slice(&request("KillSwitch", "UPDATE", json!({"scope": {"global": true}}))).unwrap();
        let long = format!("{}é{}", "u".repeat(511), "x".repeat(100_000));
        body["request"]["userInfo"]["username"] = json!(long);
        body["request"]["userInfo"]["groups"] = json!(vec!["g".repeat(600); 40]);
        assert!(allowed(&body, &hints));
        let actor = hints.take(&("KillSwitch".into(), "ops".into(), "stop-gpt".into())).unwrap();
        assert_eq!(actor.username, format!("{}…", "u".repeat(511)), "cut at a character boundary");
        assert_eq!(actor.groups.len(), 33);
        assert_eq!(actor.groups[0], format!("{}…", "g".repeat(512)));
        assert_eq!(actor.groups[32], "…and 8 more");

        for (namespace, name) in [("n".repeat(64), "stop-gpt".to_owned()), ("ops".to_owned(), "x".repeat(254))] {
            body["request"]["namespace"] = json!(namespace);
            body["request"]["name"] = json!(name);
            assert!(allowed(&body, &hints));
            assert!(hints.is_empty(), "no hint for {namespace}/{name}");
        }
    }

    /// Only the kinds this webhook decides leave a hint: a caller cannot fill the hints with
    /// kinds of its own making (one of several MiB each).
    #[test]
    fn other_kinds_and_groups_are_allowed_and_leave_no_hint() {
        let hints = ActorHints::default();
        let mut body: Value = serde_json::from_slice(&request("KillSwitch", "DELETE", Value::Null)).unwrap();
        body["request"]["kind"]["kind"] = json!("k".repeat(1 << 20));
        assert!(allowed(&body, &hints));
        body["request"]["kind"] = json!({"group": "other.example", "version": "v1", "kind": "KillSwitch"});
        assert!(allowed(&body, &hints));
        assert!(hints.is_empty());
        body["request"]["kind"]["group"] = json!("portcullis.dev");
        assert!(allowed(&body, &hints));
        assert_eq!(hints.len(), 1);
    }

    /// The uid is echoed and logged: a long one, or one that could break a log line, is no review.
    #[test]
    fn a_uid_that_is_not_short_and_plain_is_refused() {
        let hints = ActorHints::default();
        let mut body: Value = serde_json::from_slice(&request("ApiKey", "DELETE", Value::Null)).unwrap();
        for uid in [String::new(), "u".repeat(UID_LEN + 1), "u-1\nlevel=ERROR forged".into(), "u 1".into()] {
            body["request"]["uid"] = json!(uid);
            let refused = review(&serde_json::to_vec(&body).unwrap(), &hints, &Tenancy::Shared);
            assert!(refused.is_err(), "{uid:?}");
        }
        body["request"]["uid"] = json!("u".repeat(UID_LEN));
        assert!(allowed(&body, &hints));
    }

    /// Specs are read straight into their types: what is not one is refused with the reason,
    /// an object without a spec too, and an unknown member is ignored as the API server prunes it.
    #[test]
    fn specs_are_read_into_their_types() {
        let hints = ActorHints::default();
        let numbers = format!("[{}0]", "0,".repeat(1 << 20));
        let body = request("ApiKey", "CREATE", serde_json::from_str(&numbers).unwrap());
        let message = answer(&body, &hints).status.unwrap().message;
        assert!(message.contains("spec: invalid type"), "{message}");
        let mut body: Value = serde_json::from_slice(&request("ApiKey", "CREATE", json!({}))).unwrap();
        body["request"]["object"].as_object_mut().unwrap().remove("spec");
        let message = answer(&serde_json::to_vec(&body).unwrap(), &hints).status.unwrap().message;
        assert!(message.contains("spec: required"), "{message}");
        let body = request("KillSwitch", "CREATE", json!({"scope": {"global": true}, "unknown": [1, 2]}));
        assert!(answer(&body, &hints).allowed);
        let long = json!({"rotation": "r".repeat(254)});
        let message = answer(&request("ApiKey", "CREATE", long), &hints).status.unwrap().message;
        assert!(message.contains("spec.rotation: must be at most 253 characters"), "{message}");
        assert!(answer(&request("ApiKey", "CREATE", json!({"rotation": "é".repeat(253)})), &hints).allowed);
    }

    #[test]
    fn invalid_specs_are_denied_with_actionable_messages_and_leave_no_hint() {
        let hints = ActorHints::default();
        let two = json!({"scope": {"global": true, "model": "x"}, "active": true});
        let response = answer(&request("KillSwitch", "CREATE", two), &hints);
        assert!(!response.allowed);
        let message = response.status.unwrap().message;
        assert!(message.contains("spec.scope must name exactly one target"), "{message}");
        assert!(hints.is_empty());

        let credential = json!({"kind": "openai", "models": [{"name": "gpt-4o"}]});
        let response = answer(&request("ProviderCredential", "CREATE", credential), &hints);
        assert!(response.status.unwrap().message.contains("spec.secretRef is required for kind openai"));

        let key = json!({"allowedModels": ["gpt 4"], "rotation": 1, "secretRef": {"name": "s", "key": "k"}});
        let response = answer(&request("ApiKey", "CREATE", key), &hints);
        let message = response.status.unwrap().message;
        assert!(message.contains("spec.allowedModels[0]"), "{message}");
        assert!(message.contains("spec.rotation applies to generated keys"), "{message}");
    }

    #[test]
    fn deletes_are_allowed_and_attributed_and_garbage_is_rejected() {
        let hints = ActorHints::default();
        let response = answer(&request("ApiKey", "DELETE", Value::Null), &hints);
        assert!(response.allowed);
        assert!(hints.peek(&("ApiKey".into(), "ops".into(), "stop-gpt".into())).is_some());
        // As the API server sends a DELETE: no object, the old one beside it.
        let mut delete: Value = serde_json::from_slice(&request("ApiKey", "DELETE", Value::Null)).unwrap();
        delete["request"]["oldObject"] = delete["request"]["object"].take();
        delete["request"]["name"] = "gone".into();
        assert!(delete["request"]["object"].is_null());
        assert!(allowed(&delete, &hints));
        assert!(hints.peek(&("ApiKey".into(), "ops".into(), "gone".into())).is_some());
        let mut dry: Value = serde_json::from_slice(&request("ApiKey", "CREATE", json!({}))).unwrap();
        dry["request"]["dryRun"] = true.into();
        dry["request"]["name"] = "dry".into();
        assert!(allowed(&dry, &hints));
        assert!(hints.peek(&("ApiKey".into(), "ops".into(), "dry".into())).is_none());
        // The operator adding its finalizer (spec unchanged) leaves no hint.
        let mut finalizer: Value = serde_json::from_slice(&request("ApiKey", "UPDATE", json!({"owner": "a"}))).unwrap();
        finalizer["request"]["name"] = "fin".into();
        finalizer["request"]["oldObject"] = finalizer["request"]["object"].clone();
        finalizer["request"]["object"]["metadata"]["finalizers"] = json!(["portcullis.dev/audit-ledger"]);
        assert!(allowed(&finalizer, &hints));
        assert!(hints.peek(&("ApiKey".into(), "ops".into(), "fin".into())).is_none());
        // Nor is such an update refused when the spec it leaves alone fails a check added since
        // it was stored: the operator must still be able to remove its finalizer.
        let mut stored = finalizer.clone();
        stored["request"]["name"] = "stored".into();
        for object in ["object", "oldObject"] {
            stored["request"][object]["spec"]["rotation"] = json!("r".repeat(300));
        }
        assert!(allowed(&stored, &hints));
        stored["request"]["object"]["spec"]["owner"] = json!("b");
        assert!(!allowed(&stored, &hints), "a changed spec is checked whole");
        finalizer["request"]["object"]["spec"]["revoked"] = true.into();
        assert!(allowed(&finalizer, &hints));
        assert!(hints.peek(&("ApiKey".into(), "ops".into(), "fin".into())).is_some());
        assert!(review(b"{not json", &hints, &Tenancy::Shared).is_err());
        assert!(review(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#, &hints, &Tenancy::Shared)
            .is_err());
    }
}
