//! Reconcile scenarios against a mocked API server (tower-test): each asserts the exact sequence
//! of API calls the operator makes.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use portcullis_crds::sealing::{KeyId, MasterKey};
use portcullis_crds::snapshot::GatewaySnapshot;
use portcullis_crds::v1alpha1::{ApiKey, ProviderCredential};
use portcullis_operator::cluster::context::{Cache, Context};
use portcullis_operator::cluster::metrics::Metrics;
use portcullis_operator::cluster::{reconcile, snapshot};
use portcullis_operator::error::Category;
use serde_json::{json, Value};
use support::{keyring, pepper, ApiServer, Call, Responder};

const PROVIDER_KEY: &str = "sk-provider-canary-0123456789";

struct World {
    ctx: Arc<Context>,
    server: ApiServer,
    api_keys: Writer<DeserializeGuard<ApiKey>>,
    credentials: Writer<DeserializeGuard<ProviderCredential>>,
    kill_switches: Writer<DeserializeGuard<portcullis_crds::v1alpha1::KillSwitch>>,
    secrets: Writer<PartialObjectMeta<Secret>>,
    served: ServedSecrets,
}

/// The Secrets the mocked API server holds, whole, by path: a GET of one is answered with it.
#[derive(Clone, Default)]
struct ServedSecrets {
    by_path: Arc<Mutex<HashMap<String, Value>>>,
    versions: Arc<AtomicU64>,
}

impl ServedSecrets {
    fn answer(&self, call: &Call) -> Option<(u16, Value)> {
        (call.method == "GET")
            .then(|| self.by_path.lock().unwrap().get(&call.path).cloned())
            .flatten()
            .map(|s| (200, s))
    }

    /// Stores `secret` under a new resourceVersion, as the API server would.
    fn put(&self, secret: &mut Secret) {
        let version = self.versions.fetch_add(1, Ordering::SeqCst) + 1;
        secret.metadata.resource_version = Some(version.to_string());
        let path = format!(
            "/api/v1/namespaces/{}/secrets/{}",
            secret.metadata.namespace.as_deref().unwrap(),
            secret.metadata.name.as_deref().unwrap()
        );
        self.by_path.lock().unwrap().insert(path, serde_json::to_value(&*secret).unwrap());
    }
}

fn not_found() -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

/// Echoes writes back (what the API server returns for an apply) and 404s reads.
fn echo() -> Responder {
    Arc::new(|call: &Call| match call.method.as_str() {
        "GET" => not_found(),
        _ => (200, call.body.clone()),
    })
}

fn world(respond: Responder, previous: Option<GatewaySnapshot>) -> World {
    world_with(respond, previous, None)
}

fn world_with(
    respond: Responder,
    previous: Option<GatewaySnapshot>,
    audit: Option<Arc<portcullis_operator::cluster::audit::Audit>>,
) -> World {
    let served = ServedSecrets::default();
    let held = served.clone();
    let server = ApiServer::start(Arc::new(move |call: &Call| {
        if let Some(answer) = held.answer(call) {
            return answer;
        }
        let (status, mut answer) = respond(call);
        // The API server answers with the whole object; an apply body may lack metadata.
        if answer.get("metadata").is_none() && status == 200 {
            answer["metadata"] = json!({"name": "echo"});
        }
        if answer.get("status").is_some() && answer.get("spec").is_none() {
            answer["spec"] = json!({"kind": "mock", "models": [], "scope": {}});
        }
        (status, answer)
    }));
    let (stores, feeds) = support::stores();
    let metrics = Arc::new(Metrics::new().unwrap());
    let ctx = support::context(server.client.clone(), stores, metrics, previous, audit, Default::default());
    World {
        ctx,
        server,
        api_keys: feeds.api_keys,
        credentials: feeds.credentials,
        kill_switches: feeds.kill_switches,
        secrets: feeds.secrets,
        served,
    }
}

impl World {
    fn take_calls(&self) -> Vec<Call> {
        self.server.take()
    }

    fn put_api_key(&mut self, key: &ApiKey) {
        self.api_keys.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(key.clone()))));
    }

    /// The API server now holds `secret`; its metadata reaches the operator's watch.
    fn put_secret(&mut self, mut secret: Secret) {
        self.served.put(&mut secret);
        self.watch_sees(watcher::Event::Apply(PartialObjectMeta { metadata: secret.metadata, ..Default::default() }));
    }

    /// The operator's Secret watch delivers `event` (whatever the API server serves).
    fn watch_sees(&mut self, event: watcher::Event<PartialObjectMeta<Secret>>) {
        self.secrets.apply_watcher_event(&event);
        portcullis_operator::cluster::secret_event(&self.ctx, &event);
    }

    async fn reconcile_key(
        &self,
        key: &ApiKey,
    ) -> Result<kube::runtime::controller::Action, portcullis_operator::Error> {
        reconcile::reconcile_api_key(Arc::new(DeserializeGuard(Ok(key.clone()))), self.ctx.clone()).await
    }
}

fn api_key(spec: Value, status: Option<Value>) -> ApiKey {
    let mut object = json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "ApiKey",
        "metadata": {"name": "alice", "namespace": "team-a", "uid": "uid-alice", "generation": 1},
        "spec": spec,
    });
    if let Some(status) = status {
        object["status"] = status;
    }
    serde_json::from_value(object).unwrap()
}

/// Answers a fresh GET of the ApiKey with `key`, 404s the reveal Secret, echoes writes.
fn serving(key: &ApiKey) -> Responder {
    let body = serde_json::to_value(key).unwrap();
    Arc::new(move |call: &Call| match (call.method.as_str(), call.path.as_str()) {
        ("GET", "/apis/portcullis.dev/v1alpha1/namespaces/team-a/apikeys/alice") => (200, body.clone()),
        ("GET", _) => not_found(),
        _ => (200, call.body.clone()),
    })
}

const KEY_PATH: &str = "/apis/portcullis.dev/v1alpha1/namespaces/team-a/apikeys/alice";
const REVEAL_PATH: &str = "/api/v1/namespaces/team-a/secrets/alice-apikey-reveal";
const SNAPSHOT_PATH: &str = "/api/v1/namespaces/portcullis/secrets/portcullis-snapshot";
const PROVIDER_SECRET_PATH: &str = "/api/v1/namespaces/ai/secrets/openai";

fn lines(calls: &[Call]) -> Vec<String> {
    calls.iter().map(Call::line).collect()
}

/// Runs a first issuance and returns the key as the API server would then hold it, plus the
/// plaintext that was revealed.
async fn issued() -> (ApiKey, String, Vec<Call>) {
    let key = api_key(json!({"owner": "alice@example.com"}), None);
    let w = world(serving(&key), None);
    w.reconcile_key(&key).await.expect("reconcile");
    let calls = w.take_calls();
    let reveal = calls.iter().find(|c| c.method == "PATCH" && c.path == REVEAL_PATH).expect("reveal written");
    let plaintext =
        base64::engine::general_purpose::STANDARD.decode(reveal.body["data"]["key"].as_str().unwrap()).unwrap();
    let status =
        calls.iter().find(|c| c.path == format!("{KEY_PATH}/status")).expect("status written").body["status"].clone();
    (api_key(json!({"owner": "alice@example.com"}), Some(status)), String::from_utf8(plaintext).unwrap(), calls)
}

#[tokio::test]
async fn issue_writes_reveal_first_then_a_digest_only_status() {
    let (key, plaintext, calls) = issued().await;
    assert_eq!(
        lines(&calls),
        vec![
            format!("GET {KEY_PATH}"),
            format!("GET {REVEAL_PATH}"),
            format!("PATCH {REVEAL_PATH}"),
            format!("PATCH {KEY_PATH}/status"),
        ]
    );
    assert!(plaintext.starts_with("pcl_") && plaintext.len() >= 58);
    let status = key.status.expect("status");
    assert_eq!(status.issued_digests.len(), 1);
    assert_eq!(status.issued_digests[0].digest, pepper().digest(plaintext.as_bytes()).to_hex());
    assert_eq!(status.reveal_secret.as_deref(), Some("alice-apikey-reveal"));
    assert_eq!(status.conditions[0].reason, "Active");
    // Server-side apply with the operator's one field manager.
    let reveal = &calls[2];
    assert_eq!(reveal.body["metadata"]["ownerReferences"][0]["uid"], "uid-alice");
}

#[tokio::test]
async fn restart_does_not_reissue_or_write() {
    let (key, _, calls) = issued().await;
    let reveal: Secret = serde_json::from_value(calls[2].body.clone()).unwrap();
    // A new operator process: fresh caches holding what the API server holds.
    let mut w = world(echo(), None);
    w.put_api_key(&key);
    w.put_secret(reveal);
    w.reconcile_key(&key).await.expect("reconcile");
    // The watch carries metadata only: the reveal Secret's value is read once, nothing written.
    assert_eq!(lines(&w.take_calls()), vec![format!("GET {REVEAL_PATH}")], "nothing to do after a restart");
    w.reconcile_key(&key).await.expect("reconcile");
    assert!(w.take_calls().is_empty(), "the value read is held while the Secret is unchanged");

    // Someone deletes the reveal Secret: status notes it, no key is issued or revealed again.
    let w = world(echo(), None);
    w.reconcile_key(&key).await.expect("reconcile");
    let calls = w.take_calls();
    assert_eq!(lines(&calls), vec![format!("PATCH {KEY_PATH}/status")]);
    assert!(calls[0].body["status"].get("revealSecret").is_none());
    assert_eq!(
        calls[0].body["status"]["issuedDigests"],
        serde_json::to_value(&key.status.as_ref().unwrap().issued_digests).unwrap()
    );
}

#[tokio::test]
async fn revoke_and_expire_show_in_status_and_snapshot() {
    let (key, _, _) = issued().await;
    let status = serde_json::to_value(&key.status).unwrap();
    let revoked = api_key(json!({"owner": "alice@example.com", "revoked": true}), Some(status.clone()));
    let mut w = world(echo(), None);
    w.put_api_key(&revoked);
    w.reconcile_key(&revoked).await.expect("reconcile");
    let calls = w.take_calls();
    assert_eq!(lines(&calls), vec![format!("PATCH {KEY_PATH}/status")]);
    assert_eq!(calls[0].body["status"]["conditions"][0]["reason"], "Revoked");
    assert_eq!(calls[0].body["status"]["conditions"][0]["status"], "False");
    let generation = snapshot::sync_snapshot(&w.ctx).await.expect("sync");
    assert_eq!(generation, Some(1));
    let calls = w.take_calls();
    assert_eq!(lines(&calls), vec![format!("PATCH {SNAPSHOT_PATH}")]);
    let snap = snapshot_in(&calls[0]);
    assert!(snap.content.api_keys[0].revoked);

    let expired = api_key(json!({"owner": "alice@example.com", "expiresAt": "2025-03-01T11:00:00Z"}), Some(status));
    w.reconcile_key(&expired).await.expect("reconcile");
    let calls = w.take_calls();
    assert_eq!(calls[0].body["status"]["conditions"][0]["reason"], "Expired");
}

/// A generated key recorded under another pepper (its Secret was made again) matches nothing:
/// the snapshot names the current pepper and leaves the key out instead of carrying a dead digest.
#[tokio::test]
async fn a_key_issued_under_another_pepper_is_left_out_of_the_snapshot() {
    let (key, _, _) = issued().await;
    assert_eq!(key.status.as_ref().unwrap().issued_digests[0].pepper_id, Some(pepper().id()));
    let mut w = world(echo(), None);
    w.put_api_key(&key);
    snapshot::sync_snapshot(&w.ctx).await.expect("sync");
    let snap = snapshot_in(&w.take_calls()[0]);
    assert_eq!(snap.content.pepper_id, Some(pepper().id()));
    assert_eq!(snap.content.api_keys.len(), 1);

    let mut stale = key.clone();
    stale.status.as_mut().unwrap().issued_digests[0].pepper_id = Some("0123456789abcdef".into());
    w.put_api_key(&stale);
    let inputs = snapshot::gather_inputs(&w.ctx).await.expect("inputs");
    let alice = portcullis_crds::v1alpha1::ObjectRef::new("team-a", "alice");
    assert!(inputs.issued_under_another_pepper.contains(&alice), "reported on the key, not left out silently");
    snapshot::sync_snapshot(&w.ctx).await.expect("sync");
    let calls = w.take_calls();
    let written = calls.iter().find(|c| c.path == SNAPSHOT_PATH).expect("snapshot written");
    assert!(snapshot_in(written).content.api_keys.is_empty(), "the dead digest is not carried");
}

/// The snapshot a write carries: gzipped, under its own key only.
fn snapshot_in(call: &Call) -> GatewaySnapshot {
    let data = call.body["data"].as_object().unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["snapshot.json.gz"]);
    let bytes = base64::engine::general_purpose::STANDARD.decode(data["snapshot.json.gz"].as_str().unwrap()).unwrap();
    GatewaySnapshot::from_secret_data(|key| (key == "snapshot.json.gz").then_some(bytes.as_slice())).unwrap()
}

#[tokio::test]
async fn rotation_issues_a_new_key_and_keeps_the_old_for_the_grace_period() {
    let (key, old_plaintext, _) = issued().await;
    let status = serde_json::to_value(&key.status).unwrap();
    let rotated =
        api_key(json!({"owner": "alice@example.com", "rotation": 2, "rotationGracePeriodSeconds": 600}), Some(status));
    let w = world(serving(&rotated), None);
    let action = w.reconcile_key(&rotated).await.expect("reconcile");
    let calls = w.take_calls();
    assert_eq!(
        lines(&calls),
        vec![
            format!("GET {KEY_PATH}"),
            format!("GET {REVEAL_PATH}"),
            format!("PATCH {REVEAL_PATH}"),
            format!("PATCH {KEY_PATH}/status"),
        ]
    );
    let digests = calls[3].body["status"]["issuedDigests"].as_array().unwrap().clone();
    assert_eq!(digests.len(), 2);
    assert_eq!(digests[1]["digest"], pepper().digest(old_plaintext.as_bytes()).to_hex());
    assert_eq!(digests[1]["validUntil"], "2025-03-01T12:10:00Z");
    assert!(digests[0].get("validUntil").is_none());
    // Comes back by the time the grace period ends (capped by the resync interval).
    assert_eq!(action, kube::runtime::controller::Action::requeue(Duration::from_secs(300)));
}

fn provider_secret(value: &str) -> Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "openai", "namespace": "ai"},
        "data": {"key": base64::engine::general_purpose::STANDARD.encode(value)},
    }))
    .unwrap()
}

/// The operator's keyring Secret holding `keyring`.
fn keyring_secret(keyring: &portcullis_crds::sealing::MasterKeyring) -> Secret {
    let data: serde_json::Map<String, Value> = keyring
        .to_secret_data()
        .into_iter()
        .map(|(k, v)| (k, json!(base64::engine::general_purpose::STANDARD.encode(v.expose()))))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "portcullis-master-keyring", "namespace": "portcullis"},
        "data": data,
    }))
    .unwrap()
}

fn credential() -> ProviderCredential {
    serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ProviderCredential",
        "metadata": {"name": "openai", "namespace": "ai", "uid": "uid-openai", "generation": 1},
        "spec": {"kind": "openai", "secretRef": {"name": "openai", "key": "key"}, "models": [{"name": "gpt-4o"}]},
    }))
    .unwrap()
}

#[tokio::test]
async fn secret_change_reseals_nothing_changed_writes_nothing_master_key_rotation_reseals() {
    let mut w = world(echo(), None);
    w.credentials.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(credential()))));
    w.put_secret(provider_secret(PROVIDER_KEY));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(1));
    let calls = w.take_calls();
    // The provider key is read when a reference first needs it (the watch carries metadata only).
    assert_eq!(lines(&calls), vec![format!("GET {PROVIDER_SECRET_PATH}"), format!("PATCH {SNAPSHOT_PATH}")]);
    let first = snapshot_in(&calls[1]);
    assert_eq!(first.content.credentials[0].key_version, 1);
    // Outside the operator's namespace (the one platform namespace here), it serves only its own.
    assert_eq!(first.content.credentials[0].tenant.as_deref(), Some("ai"));

    // Nothing changed: no call at all (the value read is held).
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), None);
    assert!(w.take_calls().is_empty());

    // The provider Secret changed: read again, re-sealed, version bumped.
    w.put_secret(provider_secret("sk-provider-rotated-987654321"));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(2));
    let calls = w.take_calls();
    assert_eq!(lines(&calls), vec![format!("GET {PROVIDER_SECRET_PATH}"), format!("PATCH {SNAPSHOT_PATH}")]);
    let second = snapshot_in(&calls[1]);
    assert_eq!(second.content.credentials[0].key_version, 2);
    assert_ne!(second.content.credentials[0].sealed_key, first.content.credentials[0].sealed_key);

    // Master-key rotation: the keyring Secret gains k2 and makes it active.
    let mut rotated = keyring();
    rotated.rotate_to(KeyId::new("k2").unwrap(), MasterKey::from_bytes(&[2u8; 32]).unwrap());
    w.put_secret(keyring_secret(&rotated));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(3));
    let calls = w.take_calls();
    assert_eq!(
        lines(&calls),
        vec![
            "GET /api/v1/namespaces/portcullis/secrets/portcullis-master-keyring".to_owned(),
            format!("PATCH {SNAPSHOT_PATH}")
        ]
    );
    let third = snapshot_in(&calls[1]);
    let sealed = third.content.credentials[0].sealed_key.as_ref().unwrap();
    assert_eq!(sealed.key_id.as_str(), "k2");
    assert_eq!(third.content.credentials[0].key_version, 2, "same key, new master key");
}

/// A credential's or a KillSwitch's reconcile wakes the snapshot writer when its status moves
/// (a new spec, a flip), not at a resync of an unchanged object: that would cut the writer's
/// backoff short after a failure.
#[tokio::test]
async fn only_a_reconcile_that_moves_the_status_wakes_the_snapshot_writer() {
    use futures_util::FutureExt as _;
    let mut w = world(echo(), None);
    let woken = |w: &World| w.ctx.snapshot_trigger.notified().now_or_never().is_some();
    w.credentials.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(credential()))));
    w.put_secret(provider_secret(PROVIDER_KEY));
    snapshot::sync_snapshot(&w.ctx).await.unwrap();
    let _ = woken(&w);
    let mut current = credential();
    reconcile::reconcile_credential(Arc::new(DeserializeGuard(Ok(current.clone()))), w.ctx.clone()).await.unwrap();
    assert!(woken(&w), "a first status did not wake the writer");
    let status = w.take_calls().into_iter().rfind(|c| c.path.ends_with("/status")).expect("status written");
    current.status = Some(serde_json::from_value(status.body["status"].clone()).unwrap());
    reconcile::reconcile_credential(Arc::new(DeserializeGuard(Ok(current.clone()))), w.ctx.clone()).await.unwrap();
    assert!(w.take_calls().is_empty(), "an unchanged credential wrote something");
    assert!(!woken(&w), "a resync of an unchanged credential woke the writer");

    let mut switch: portcullis_crds::v1alpha1::KillSwitch = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "KillSwitch", "metadata": metadata_of_stop(),
        "spec": {"scope": {"global": true}, "active": true, "reason": "incident"},
    }))
    .unwrap();
    reconcile::reconcile_kill_switch(Arc::new(DeserializeGuard(Ok(switch.clone()))), w.ctx.clone()).await.unwrap();
    assert!(woken(&w));
    let status = w.take_calls().into_iter().rfind(|c| c.path.ends_with("/status")).expect("status written");
    switch.status = Some(serde_json::from_value(status.body["status"].clone()).unwrap());
    reconcile::reconcile_kill_switch(Arc::new(DeserializeGuard(Ok(switch.clone()))), w.ctx.clone()).await.unwrap();
    assert!(!woken(&w), "a resync of an unchanged switch woke the writer");
    // Flipped off: a new generation.
    switch.spec.active = false;
    switch.metadata.generation = Some(2);
    reconcile::reconcile_kill_switch(Arc::new(DeserializeGuard(Ok(switch))), w.ctx.clone()).await.unwrap();
    assert!(woken(&w), "a flipped switch did not wake the writer");
}

#[tokio::test]
async fn conflicts_and_errors_back_off() {
    let key = api_key(json!({}), None);
    let fail: Responder = Arc::new(|call: &Call| {
        if call.path.ends_with("/status") {
            (
                409,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "conflict"}),
            )
        } else if call.method == "GET" && call.path == KEY_PATH {
            (200, serde_json::to_value(api_key(json!({}), None)).unwrap())
        } else if call.method == "GET" {
            not_found()
        } else {
            (200, call.body.clone())
        }
    });
    let w = world(fail, None);
    let error = w.reconcile_key(&key).await.expect_err("conflict");
    assert_eq!(error.category(), Category::Conflict);
    let object = Arc::new(DeserializeGuard(Ok(key.clone())));
    let first = reconcile::error_policy(object.clone(), &error, w.ctx.clone());
    let second = reconcile::error_policy(object.clone(), &error, w.ctx.clone());
    assert_eq!(first, kube::runtime::controller::Action::requeue(Duration::from_millis(500)));
    assert_eq!(second, kube::runtime::controller::Action::requeue(Duration::from_secs(1)));
    let rendered = String::from_utf8(w.ctx.metrics.render()).unwrap();
    assert!(
        rendered.contains(r#"portcullis_operator_reconcile_errors_total{category="conflict",kind="ApiKey"} 2"#),
        "{rendered}"
    );

    // Not leading: no API call at all.
    w.take_calls();
    w.ctx.leading.store(false, std::sync::atomic::Ordering::SeqCst);
    let error = w.reconcile_key(&key).await.expect_err("not leading");
    assert_eq!(error.category(), Category::NotLeader);
    assert!(snapshot::sync_snapshot(&w.ctx).await.is_err());
    assert!(w.take_calls().is_empty());
}

/// The Secret watch carries metadata only: a Secret's value is read only when a reference needs
/// it, and dropped once nothing references it or the Secret goes.
#[tokio::test]
async fn only_referenced_secret_values_are_read_and_held() {
    let mut w = world(echo(), None);
    let unrelated: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "database", "namespace": "ai"},
        "data": {"password": base64::engine::general_purpose::STANDARD.encode("db-password-canary")},
    }))
    .unwrap();
    w.put_secret(unrelated);
    w.put_secret(provider_secret(PROVIDER_KEY));
    // Nothing references either yet: no read, nothing held.
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(1));
    assert_eq!(lines(&w.take_calls()), vec![format!("PATCH {SNAPSHOT_PATH}")]);
    assert!(w.ctx.secret_values.is_empty());

    w.credentials.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(credential()))));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(2));
    assert_eq!(lines(&w.take_calls()), vec![format!("GET {PROVIDER_SECRET_PATH}"), format!("PATCH {SNAPSHOT_PATH}")]);
    assert_eq!(w.ctx.secret_values.len(), 1);

    // The credential goes: its Secret's value goes with the next sync.
    w.credentials.apply_watcher_event(&watcher::Event::Delete(DeserializeGuard(Ok(credential()))));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(3));
    assert!(w.ctx.secret_values.is_empty());

    // A Secret deleted under a held value: the watch's delete drops it at once.
    w.credentials.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(credential()))));
    snapshot::sync_snapshot(&w.ctx).await.unwrap();
    assert_eq!(w.ctx.secret_values.len(), 1);
    let meta = w.ctx.secret_meta("ai", "openai").unwrap();
    w.watch_sees(watcher::Event::Delete((*meta).clone()));
    assert!(w.ctx.secret_values.is_empty());
}

/// Promise 4 (revocation within a second): an ApiKey or ProviderCredential being deleted (the
/// ledger's finalizer holds it in the API server until its deletion is appended) leaves the
/// snapshot at once; a KillSwitch being deleted stays engaged until it is gone.
#[tokio::test]
async fn objects_being_deleted_leave_the_snapshot_at_once_but_a_kill_switch_stays_until_gone() {
    let (key, _, _) = issued().await;
    let mut w = world(echo(), None);
    w.put_api_key(&key);
    w.credentials.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(credential()))));
    w.put_secret(provider_secret(PROVIDER_KEY));
    let engaged: portcullis_crds::v1alpha1::KillSwitch = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "KillSwitch", "metadata": metadata_of_stop(),
        "spec": {"scope": {"global": true}, "active": true, "reason": "incident"},
    }))
    .unwrap();
    w.kill_switches.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(engaged.clone()))));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(1));
    let first = snapshot_in(&w.take_calls()[1]);
    assert_eq!((first.content.api_keys.len(), first.content.credentials.len()), (1, 1));
    assert_eq!(first.content.kill_switches.len(), 1);

    let deleting = |meta: &mut kube::api::ObjectMeta| {
        meta.deletion_timestamp = Some(serde_json::from_value(json!("2025-03-01T12:00:00Z")).unwrap());
        meta.finalizers = Some(vec![portcullis_operator::audit::FINALIZER.into()]);
    };
    let (mut key, mut credential, mut switch) = (key, credential(), engaged);
    deleting(&mut key.metadata);
    deleting(&mut credential.metadata);
    deleting(&mut switch.metadata);
    w.put_api_key(&key);
    w.credentials.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(credential))));
    w.kill_switches.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(switch))));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(2));
    let second = snapshot_in(&w.take_calls()[0]);
    assert!(second.content.api_keys.is_empty(), "a key being deleted still authenticates");
    assert!(second.content.credentials.is_empty(), "a credential being deleted still forwards");
    assert!(second.content.kill_switches[0].active, "a kill switch being deleted let traffic through");
}

/// A referenced Secret's new value wakes the snapshot writer itself: a brought key replaced in
/// its Secret changes nothing in its object's status, so its reconcile would not. An unrelated
/// Secret wakes nothing.
#[tokio::test]
async fn a_referenced_secret_changing_wakes_the_snapshot_writer() {
    use futures_util::FutureExt as _;
    let mut w = world(echo(), None);
    let woken = |w: &World| w.ctx.snapshot_trigger.notified().now_or_never().is_some();
    let brought = api_key(json!({"secretRef": {"name": "alice-key", "key": "key"}}), None);
    w.put_api_key(&brought);
    let mut unrelated = provider_secret("unrelated-value-0123456789");
    unrelated.metadata.name = Some("database".into());
    w.put_secret(unrelated);
    assert!(!woken(&w), "an unrelated Secret woke the writer");
    let mut value = provider_secret("pcl_brought_key_value_0123456789abcdef");
    value.metadata.namespace = Some("team-a".into());
    value.metadata.name = Some("alice-key".into());
    w.put_secret(value.clone());
    assert!(woken(&w), "a brought key's Secret changed and the writer slept");
    w.credentials.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(credential()))));
    w.put_secret(provider_secret(PROVIDER_KEY));
    assert!(woken(&w), "a credential's Secret changed and the writer slept");
    // A relist of the Secrets (some may have gone while the watch was down) wakes it too.
    assert!(!woken(&w));
    w.watch_sees(watcher::Event::InitDone);
    assert!(woken(&w));
}

/// The snapshot Secret deleted (seen by the watch or at a relist's end), or replaced by an older
/// copy, is written again at once with what the writer holds, past the generation it carries
/// when that is later; the writer's own write coming back through the watch wakes nothing; a
/// repair whose write fails is still owed at the retry.
#[tokio::test]
async fn a_snapshot_secret_deleted_or_rolled_back_is_written_again() {
    use futures_util::FutureExt as _;
    use std::sync::atomic::AtomicBool;
    let refuse = Arc::new(AtomicBool::new(false));
    let refusing = refuse.clone();
    let respond: Responder = Arc::new(move |call: &Call| match call.method.as_str() {
        "GET" => not_found(),
        "PATCH" if refusing.load(Ordering::SeqCst) => (
            503,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "ServiceUnavailable", "code": 503, "message": "etcd down"}),
        ),
        _ => (200, call.body.clone()),
    });
    let mut w = world(respond, None);
    let woken = |w: &World| w.ctx.snapshot_trigger.notified().now_or_never().is_some();
    w.put_api_key(&api_key(json!({"secretRef": {"name": "alice-key", "key": "key"}}), None));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(1));
    let calls = w.take_calls();
    let write = calls.iter().find(|c| c.method == "PATCH" && c.path == SNAPSHOT_PATH).expect("written");
    let first = snapshot_in(write);
    let written: Secret = serde_json::from_value(write.body.clone()).unwrap();
    let meta_of = |s: &Secret| PartialObjectMeta { metadata: s.metadata.clone(), ..Default::default() };

    // Its own write, back through the watch.
    w.put_secret(written.clone());
    assert!(!woken(&w), "the writer's own write woke it");
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), None);
    assert!(w.take_calls().iter().all(|c| c.path != SNAPSHOT_PATH));

    // Deleted: written again, the same generation and content.
    w.watch_sees(watcher::Event::Delete(meta_of(&written)));
    assert!(woken(&w), "the snapshot Secret went and the writer slept");
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(1));
    let calls = w.take_calls();
    let again = snapshot_in(calls.iter().find(|c| c.method == "PATCH" && c.path == SNAPSHOT_PATH).expect("rewritten"));
    assert_eq!((again.generation, &again.content_digest), (first.generation, &first.content_digest));
    w.put_secret(written.clone());
    assert!(!woken(&w));

    // Rolled back to an older copy, while the API server refuses writes: the repair waits for
    // the retry instead of being forgotten.
    let mut older = written.clone();
    let annotations = older.metadata.annotations.as_mut().unwrap();
    annotations.insert("portcullis.dev/generation".into(), "0".into());
    annotations.insert("portcullis.dev/content-digest".into(), "sha256:older".into());
    refuse.store(true, Ordering::SeqCst);
    w.put_secret(older);
    assert!(woken(&w), "the snapshot Secret was rolled back and the writer slept");
    assert!(snapshot::sync_snapshot(&w.ctx).await.is_err());
    refuse.store(false, Ordering::SeqCst);
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(1), "the repair was forgotten");
    w.take_calls();
    w.put_secret(written.clone());
    assert!(!woken(&w));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), None, "nothing left to repair");

    // Overwritten with a later generation of other content (a deposed leader): replicas that took
    // it refuse anything not later, so ours goes past it.
    let mut later = written.clone();
    let annotations = later.metadata.annotations.as_mut().unwrap();
    annotations.insert("portcullis.dev/generation".into(), "7".into());
    annotations.insert("portcullis.dev/content-digest".into(), "sha256:other".into());
    w.put_secret(later);
    assert!(woken(&w));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(8));
    let calls = w.take_calls();
    let write = calls.iter().find(|c| c.method == "PATCH" && c.path == SNAPSHOT_PATH).expect("written");
    let past = snapshot_in(write);
    assert_eq!((past.generation, &past.content_digest), (8, &first.content_digest));
    w.put_secret(serde_json::from_value(write.body.clone()).unwrap());
    assert!(!woken(&w));

    // Deleted while the watch was down: the relist's end shows it gone.
    w.watch_sees(watcher::Event::Init);
    w.watch_sees(watcher::Event::InitDone);
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(8), "a relist without it repaired nothing");

    // Another writer's, there before this writer's first (none was there at its start): the
    // first goes past it too.
    let mut w = world(echo(), None);
    let mut theirs = written.clone();
    let annotations = theirs.metadata.annotations.as_mut().unwrap();
    annotations.insert("portcullis.dev/generation".into(), "7".into());
    annotations.insert("portcullis.dev/content-digest".into(), "sha256:other".into());
    w.put_secret(theirs);
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(8));
}

/// Echoes writes, 404s reads, and answers reads of the provider Secret with a 503 (etcd down).
fn provider_secret_unreadable() -> Responder {
    Arc::new(|call: &Call| match (call.method.as_str(), call.path.as_str()) {
        ("GET", PROVIDER_SECRET_PATH) => (
            503,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "ServiceUnavailable", "code": 503, "message": "etcd unavailable"}),
        ),
        ("GET", _) => not_found(),
        _ => (200, call.body.clone()),
    })
}

/// A Secret changed while the API server errs: the value read before serves on, so the sync
/// (and every other change it carries) is not held up, and nothing is dropped.
#[tokio::test]
async fn a_changed_secret_that_cannot_be_read_now_serves_on_its_last_value() {
    let mut w = world(provider_secret_unreadable(), None);
    w.credentials.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(credential()))));
    w.put_secret(provider_secret(PROVIDER_KEY));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(1));
    assert!(!w.ctx.secret_values.take_stale_served());
    let first = snapshot_in(&w.take_calls()[1]);
    // The Secret changes; the API server now fails reads of it.
    w.served.by_path.lock().unwrap().remove(PROVIDER_SECRET_PATH);
    let mut changed = provider_secret("sk-provider-rotated-987654321");
    changed.metadata.resource_version = Some("99".into());
    w.watch_sees(watcher::Event::Apply(PartialObjectMeta { metadata: changed.metadata, ..Default::default() }));
    // A kill switch set meanwhile still reaches a snapshot.
    w.kill_switches.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "KillSwitch",
        "metadata": {"name": "stop", "namespace": "ai", "uid": "uid-stop", "generation": 1},
        "spec": {"scope": {"global": true}, "active": true, "reason": "incident"},
    }))
    .unwrap()))));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(2));
    let calls = w.take_calls();
    assert_eq!(lines(&calls), vec![format!("GET {PROVIDER_SECRET_PATH}"), format!("PATCH {SNAPSHOT_PATH}")]);
    let second = snapshot_in(&calls[1]);
    assert_eq!(second.content.kill_switches.len(), 1);
    assert_eq!(second.content.credentials.len(), 1, "the credential is kept");
    assert_eq!(second.content.credentials[0].sealed_key, first.content.credentials[0].sealed_key, "on its last value");
    // The writer is told, to read it again soon (not at the next resync); told once.
    assert!(w.ctx.secret_values.take_stale_served());
    assert!(!w.ctx.secret_values.take_stale_served());
}

/// A Secret that cannot be read right now, and was never read, fails the sync (retried with
/// backoff) rather than writing a snapshot without the credential that references it.
#[tokio::test]
async fn a_secret_read_that_fails_fails_the_sync_instead_of_dropping_the_credential() {
    let mut w = world(provider_secret_unreadable(), None);
    w.credentials.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(credential()))));
    // The watch shows the Secret; the mocked API server does not serve it.
    w.watch_sees(watcher::Event::Apply(PartialObjectMeta {
        metadata: provider_secret(PROVIDER_KEY).metadata,
        ..Default::default()
    }));
    let error = snapshot::sync_snapshot(&w.ctx).await.expect_err("the read failed");
    assert_eq!(error.category(), Category::Read, "{error}");
    let calls = w.take_calls();
    assert!(calls.iter().all(|c| c.method == "GET"), "nothing written: {:?}", lines(&calls));
}

/// Promise 1 and 2: no plaintext client or provider key in anything the operator writes, except
/// the reveal Secret.
#[tokio::test]
async fn no_plaintext_key_outside_the_reveal_secret() {
    let (key, client_plaintext, mut calls) = issued().await;
    let mut w = world(echo(), None);
    w.put_api_key(&key);
    w.credentials.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(credential()))));
    w.put_secret(provider_secret(PROVIDER_KEY));
    snapshot::sync_snapshot(&w.ctx).await.unwrap();
    reconcile::reconcile_credential(Arc::new(DeserializeGuard(Ok(credential()))), w.ctx.clone()).await.unwrap();
    calls.extend(w.take_calls());
    assert!(calls.iter().any(|c| c.path == SNAPSHOT_PATH));
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for call in calls.iter().filter(|c| c.method != "GET") {
        let text = call.body.to_string();
        if call.path != REVEAL_PATH {
            assert!(!text.contains(&client_plaintext), "client key in {}", call.line());
            assert!(!text.contains(&b64(&client_plaintext)), "client key in {}", call.line());
        }
        assert!(!text.contains(PROVIDER_KEY), "provider key in {}", call.line());
        assert!(!text.contains(&b64(PROVIDER_KEY)), "provider key in {}", call.line());
        // The snapshot is base64 inside the Secret: look inside it too.
        if call.path == SNAPSHOT_PATH {
            let inner = String::from_utf8(snapshot_in(call).to_json()).unwrap();
            assert!(!inner.contains(&client_plaintext));
            assert!(!inner.contains(PROVIDER_KEY));
        }
    }
    // A credential's status says which master key seals it, never the key.
    let status = calls.iter().rev().find(|c| c.path.ends_with("/providercredentials/openai/status")).unwrap();
    assert_eq!(status.body["status"]["sealedWith"], "k1");
}

/// The ledger in the reconcilers: one entry per admin action with the best actor available, a
/// finalizer held until the deletion is appended, a checkpoint published, no repeats after a
/// restart, no secret anywhere in the file.
#[tokio::test]
async fn ledger_records_actions_with_actors_and_releases_the_finalizer_after_appending() {
    use portcullis_operator::audit::{ActorHints, FINALIZER};
    use portcullis_operator::cluster::audit::{publish_checkpoint, Audit};
    use portcullis_operator::ledger::{self, Action, Actor, ActorSource};

    let (key, plaintext, calls) = issued().await;
    let reveal: Secret = serde_json::from_value(calls[2].body.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let hints = Arc::new(ActorHints::default());
    let audit = Arc::new(Audit::open(&path, hints.clone()).unwrap());
    let mut w = world_with(echo(), None, Some(audit.clone()));
    w.put_api_key(&key);
    w.put_secret(reveal);

    // Created, as the admission webhook saw it: the finalizer is added.
    let webhook_actor = Actor {
        username: "alice@example.com".into(),
        groups: vec!["key-admins".into()],
        source: ActorSource::AdmissionWebhook,
    };
    hints.record(("ApiKey".into(), "team-a".into(), "alice".into()), webhook_actor.clone());
    w.reconcile_key(&key).await.expect("reconcile");
    let calls = w.take_calls();
    // The reveal Secret's value is read once (the watch carries only metadata), then held.
    assert_eq!(lines(&calls), vec![format!("GET {REVEAL_PATH}"), format!("PATCH {KEY_PATH}")]);
    assert_eq!(calls[1].body["metadata"]["finalizers"], json!([FINALIZER]));

    // Revoked, no webhook: the managedFields manager (not the operator's own writes).
    let mut revoked = key.clone();
    revoked.spec.revoked = true;
    revoked.metadata.generation = Some(2);
    revoked.metadata.finalizers = Some(vec![FINALIZER.into()]);
    revoked.metadata.managed_fields = Some(
        serde_json::from_value(json!([
            {"manager": "kubectl-edit", "operation": "Update", "time": "2025-03-01T11:00:00Z"},
            {"manager": "portcullis-operator", "operation": "Apply", "subresource": "status", "time": "2025-03-01T11:30:00Z"},
        ]))
        .unwrap(),
    );
    w.put_api_key(&revoked);
    w.reconcile_key(&revoked).await.expect("reconcile");
    assert_eq!(lines(&w.take_calls()), vec![format!("PATCH {KEY_PATH}/status")]);

    // Deleted: appended first, then only the finalizer is released.
    let mut deleting = revoked.clone();
    deleting.metadata.deletion_timestamp = Some(serde_json::from_value(json!("2025-03-01T12:00:00Z")).unwrap());
    w.reconcile_key(&deleting).await.expect("reconcile");
    let calls = w.take_calls();
    assert_eq!(lines(&calls), vec![format!("PATCH {KEY_PATH}")]);
    assert_eq!(calls[0].body["metadata"]["finalizers"], json!([]));

    let entries: Vec<_> = ledger::read_lines(&path).unwrap().into_iter().map(Result::unwrap).collect();
    let actions: Vec<_> = entries.iter().map(|e| e.action).collect();
    assert_eq!(actions, [Action::ApiKeyCreated, Action::ApiKeyRevoked, Action::ApiKeyDeleted]);
    assert_eq!(entries[0].actor, webhook_actor);
    assert_eq!(entries[1].actor.username, "kubectl-edit");
    assert_eq!(entries[1].actor.source, ActorSource::ManagedFields);
    assert_eq!(entries[1].changed_fields, ["spec.revoked"]);
    assert_eq!(entries[1].object.generation, 2);
    assert_eq!(entries[0].object.uid, "uid-alice");

    // The head is published once per move, as `SEQ:HASH` on the checkpoint ConfigMap.
    let head = publish_checkpoint(&w.ctx).await.unwrap().expect("published");
    assert_eq!(head.sequence, 3);
    let calls = w.take_calls();
    assert_eq!(lines(&calls), vec!["PATCH /api/v1/namespaces/portcullis/configmaps/portcullis-ledger-head".to_owned()]);
    let text = format!("3:{}", entries[2].hash);
    assert_eq!(calls[0].body["metadata"]["annotations"]["portcullis.dev/ledger-head"], json!(text));
    assert!(publish_checkpoint(&w.ctx).await.unwrap().is_none());

    // A restarted operator (the finalizer patch had failed): no second entry, finalizer released.
    let reopened = Arc::new(Audit::open(&path, Arc::new(ActorHints::default())).unwrap());
    let w = world_with(echo(), None, Some(reopened));
    w.reconcile_key(&deleting).await.expect("reconcile");
    assert_eq!(lines(&w.take_calls()), vec![format!("PATCH {KEY_PATH}")]);
    let entries = ledger::read_lines(&path).unwrap();
    assert_eq!(entries.len(), 3);
    let checkpoint = ledger::Checkpoint { sequence: 3, hash: head.hash };
    assert!(ledger::verify(&entries, Some(&checkpoint)).is_ok());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(&plaintext));
    assert!(!text.contains(&plaintext[4..]));
}

/// An operator run without the ledger after one with it: an object being deleted that still
/// carries the ledger's finalizer has it released (nothing else would; it would never go).
#[tokio::test]
async fn without_a_ledger_a_finalizer_left_from_one_is_released() {
    let (mut key, _, _) = issued().await;
    key.metadata.deletion_timestamp = Some(serde_json::from_value(json!("2025-03-01T12:00:00Z")).unwrap());
    key.metadata.finalizers = Some(vec![portcullis_operator::audit::FINALIZER.into()]);
    let mut w = world(echo(), None);
    w.put_api_key(&key);
    w.reconcile_key(&key).await.expect("reconcile");
    let calls = w.take_calls();
    assert_eq!(lines(&calls), vec![format!("PATCH {KEY_PATH}")]);
    assert_eq!(calls[0].body["metadata"]["finalizers"], json!([]));
    // Released (the API server now deletes it): nothing more to do for it.
    key.metadata.finalizers = Some(vec!["example.com/someone-elses".into()]);
    w.reconcile_key(&key).await.expect("reconcile");
    assert!(w.take_calls().iter().all(|c| c.path != KEY_PATH || c.body["metadata"]["finalizers"].is_null()));
}

/// Promise 4 (never fail open): an engaged KillSwitch that no longer reads (its stored object
/// does not deserialize, which the admission webhook would have refused had it been up) keeps
/// the entry it had, and its status says so. Only deleting or fixing it lets traffic through.
#[tokio::test]
async fn an_engaged_kill_switch_that_no_longer_reads_stays_engaged() {
    let mut w = world(echo(), None);
    w.kill_switches.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "KillSwitch", "metadata": metadata_of_stop(),
        "spec": {"scope": {"global": true}, "active": true, "reason": "incident"},
    }))
    .unwrap()))));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(1));
    let engaged = snapshot_in(&w.take_calls()[0]);
    assert!(engaged.content.kill_switches[0].active);

    let unreadable = kube::core::error_boundary::InvalidObject {
        error: "spec.active: invalid type: string \"no\", expected a boolean".into(),
        metadata: serde_json::from_value(metadata_of_stop()).unwrap(),
    };
    w.kill_switches.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Err(unreadable.clone()))));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), None, "the same content: nothing to write");
    assert!(w.take_calls().is_empty());
    let inputs = snapshot::gather_inputs(&w.ctx).await.unwrap();
    assert!(inputs.kill_switches.is_empty() && inputs.unreadable_kill_switches.len() == 1);

    reconcile::reconcile_kill_switch(Arc::new(DeserializeGuard(Err(unreadable))), w.ctx.clone()).await.unwrap();
    let calls = w.take_calls();
    let status = calls.iter().find(|c| c.path.ends_with("/killswitches/stop/status")).expect("status written");
    let condition = &status.body["status"]["conditions"][0];
    assert_eq!(condition["reason"], "InvalidSpec");
    let message = condition["message"].as_str().unwrap();
    assert!(message.contains("expected a boolean"), "{message}");
    assert!(message.contains(portcullis_operator::assemble::KEPT_MESSAGE), "{message}");

    // Deleted: gone from the snapshot.
    w.kill_switches.apply_watcher_event(&watcher::Event::Delete(DeserializeGuard(Ok(serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "KillSwitch", "metadata": metadata_of_stop(),
        "spec": {"scope": {"global": true}, "active": true},
    }))
    .unwrap()))));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(2));
    assert!(snapshot_in(&w.take_calls()[0]).content.kill_switches.is_empty());
}

/// A malformed object being deleted (its stored spec does not read) still goes: its deletion
/// is appended from its metadata, then the ledger's finalizer released; without a ledger, a
/// finalizer left from a run with one is released.
#[tokio::test]
async fn a_malformed_object_being_deleted_is_recorded_and_released() {
    use portcullis_operator::audit::{ActorHints, FINALIZER};
    use portcullis_operator::cluster::audit::Audit;
    use portcullis_operator::ledger::{self, Action};
    const STOP_PATH: &str = "/apis/portcullis.dev/v1alpha1/namespaces/ai/killswitches/stop";

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let audit = Arc::new(Audit::open(&path, Arc::new(ActorHints::default())).unwrap());
    let w = world_with(echo(), None, Some(audit));
    let engaged: portcullis_crds::v1alpha1::KillSwitch = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "KillSwitch", "metadata": metadata_of_stop(),
        "spec": {"scope": {"global": true}, "active": true, "reason": "incident"},
    }))
    .unwrap();
    reconcile::reconcile_kill_switch(Arc::new(DeserializeGuard(Ok(engaged))), w.ctx.clone()).await.unwrap();
    w.take_calls();

    let mut metadata: kube::api::ObjectMeta = serde_json::from_value(metadata_of_stop()).unwrap();
    metadata.deletion_timestamp = Some(serde_json::from_value(json!("2025-03-01T12:00:00Z")).unwrap());
    metadata.finalizers = Some(vec![FINALIZER.into()]);
    let unreadable = kube::core::error_boundary::InvalidObject {
        error: "spec.active: invalid type: string \"no\", expected a boolean".into(),
        metadata,
    };
    reconcile::reconcile_kill_switch(Arc::new(DeserializeGuard(Err(unreadable.clone()))), w.ctx.clone()).await.unwrap();
    let calls = w.take_calls();
    assert_eq!(lines(&calls), vec![format!("PATCH {STOP_PATH}")], "only the finalizer, released");
    assert_eq!(calls[0].body["metadata"]["finalizers"], json!([]));
    let actions: Vec<_> = ledger::read_lines(&path).unwrap().into_iter().map(|e| e.unwrap().action).collect();
    assert_eq!(actions, [Action::KillSwitchActivated, Action::KillSwitchDeactivated]);

    // No ledger now, the finalizer still on it from the run with one.
    let w = world(echo(), None);
    reconcile::reconcile_kill_switch(Arc::new(DeserializeGuard(Err(unreadable))), w.ctx.clone()).await.unwrap();
    let calls = w.take_calls();
    assert_eq!(lines(&calls), vec![format!("PATCH {STOP_PATH}")]);
    assert_eq!(calls[0].body["metadata"]["finalizers"], json!([]));
}

/// A new active master key re-tags an unchanged snapshot (same generation), so that once the
/// old key is dropped, the stored snapshot still verifies and an engaged KillSwitch that no
/// longer reads keeps its entry.
#[tokio::test]
async fn a_new_master_key_tags_the_snapshot_again_and_an_unreadable_switch_survives_the_old_one() {
    let mut w = world(echo(), None);
    let engaged: portcullis_crds::v1alpha1::KillSwitch = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "KillSwitch", "metadata": metadata_of_stop(),
        "spec": {"scope": {"global": true}, "active": true, "reason": "incident"},
    }))
    .unwrap();
    w.kill_switches.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(engaged))));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(1));
    w.take_calls();

    let k2 = || (KeyId::new("k2").unwrap(), MasterKey::from_bytes(&[2u8; 32]).unwrap());
    let mut rotated = keyring();
    rotated.rotate_to(k2().0, k2().1);
    w.put_secret(keyring_secret(&rotated));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(1), "the new key did not tag it");
    let calls = w.take_calls();
    let retagged = snapshot_in(calls.iter().find(|c| c.path == SNAPSHOT_PATH).expect("written"));
    assert_eq!(retagged.tag.as_ref().unwrap().key_id.as_str(), "k2");
    assert!(retagged.verify_tag(&rotated).is_ok());
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), None, "tagged once");

    // k1 dropped, and the switch no longer reads: its entry stays (the content is unchanged).
    let only_k2 = portcullis_crds::sealing::MasterKeyring::new(k2().0, [k2()].into()).unwrap();
    w.put_secret(keyring_secret(&only_k2));
    let unreadable = kube::core::error_boundary::InvalidObject {
        error: "spec.active: invalid type: string \"no\", expected a boolean".into(),
        metadata: serde_json::from_value(metadata_of_stop()).unwrap(),
    };
    w.kill_switches.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Err(unreadable))));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), None, "the engaged switch was dropped");
    let state = w.ctx.snapshot.lock().await;
    assert!(state.previous.as_ref().unwrap().content.kill_switches[0].active);
}

fn metadata_of_stop() -> Value {
    json!({"name": "stop", "namespace": "ai", "uid": "uid-stop", "generation": 1})
}

/// Promise 4 (never fail open), at start-up and on every change of leader: the first snapshot
/// waits for every cache's first full listing. Written from a half-filled cache it would leave
/// out an engaged KillSwitch (seen on a real API server: a new leader's first snapshot held no
/// kill switches) or ApiKeys, until the next write.
#[tokio::test]
async fn nothing_is_written_until_every_cache_has_its_first_listing() {
    let server = ApiServer::start(echo());
    let (stores, mut feeds) = support::unlisted_stores();
    let listings = stores.listings.clone();
    let ctx = support::context(
        server.client.clone(),
        stores,
        Arc::new(Metrics::new().unwrap()),
        None,
        None,
        Default::default(),
    );
    let writing = tokio::spawn({
        let ctx = ctx.clone();
        async move { snapshot::sync_snapshot(&ctx).await }
    });
    let settle = || tokio::time::sleep(Duration::from_millis(100));

    // Every cache but the KillSwitches' has listed; that one holds part of its listing: nothing
    // is written, nothing even read.
    listings.mark(Cache::ApiKeys);
    listings.mark(Cache::Credentials);
    listings.mark(Cache::Secrets);
    let engaged = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "KillSwitch", "metadata": metadata_of_stop(),
        "spec": {"scope": {"global": true}, "active": true, "reason": "incident"},
    }))
    .unwrap();
    feeds.kill_switches.apply_watcher_event(&watcher::Event::Init);
    feeds.kill_switches.apply_watcher_event(&watcher::Event::InitApply(DeserializeGuard(Ok(engaged))));
    settle().await;
    assert!(!writing.is_finished(), "a snapshot was compiled before the KillSwitch listing was complete");
    assert!(server.take().is_empty());

    // The listing completes: the snapshot is written, with the engaged switch in it.
    feeds.kill_switches.apply_watcher_event(&watcher::Event::InitDone);
    listings.mark(Cache::KillSwitches);
    let generation = tokio::time::timeout(Duration::from_secs(5), writing).await.unwrap().unwrap().unwrap();
    assert_eq!(generation, Some(1));
    let calls = server.take();
    assert_eq!(lines(&calls), vec![format!("PATCH {SNAPSHOT_PATH}")]);
    let snapshot = snapshot_in(&calls[0]);
    assert_eq!(snapshot.content.kill_switches.len(), 1);
    assert!(snapshot.content.kill_switches[0].active);
}
