//! Acknowledgement counting against a mocked API server (tower-test): data-plane Leases in, the
//! `Enforced` status out, written only when the count changes.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use portcullis_crds::acknowledgement::{COMPONENT, COMPONENT_LABEL, GENERATION_ANNOTATION};
use portcullis_crds::snapshot::GatewaySnapshot;
use portcullis_crds::v1alpha1::{ApiKey, KillSwitch};
use portcullis_operator::cluster::acknowledgement::{self, AckMetrics, Acknowledgements};
use portcullis_operator::cluster::context::Context;
use portcullis_operator::cluster::metrics::Metrics;
use portcullis_operator::cluster::{reconcile, snapshot};
use serde_json::{json, Value};
use support::{now, ApiServer, Call};

struct World {
    ctx: Arc<Context>,
    server: ApiServer,
    kill_switches: Writer<DeserializeGuard<KillSwitch>>,
    api_keys: Writer<DeserializeGuard<ApiKey>>,
    leases: Writer<Lease>,
}

fn world() -> World {
    world_from(None)
}

/// A world whose snapshot writer starts from `previous` (the Secret a restarted operator reads).
fn world_from(previous: Option<GatewaySnapshot>) -> World {
    // Writes are echoed back as the API server would answer an apply.
    let server = ApiServer::start(Arc::new(|call: &Call| {
        let mut answer = call.body.clone();
        if answer.get("metadata").is_none() {
            answer["metadata"] = json!({"name": "echo"});
        }
        if answer.get("spec").is_none() {
            answer["spec"] = json!({"scope": {"global": true}});
        }
        (200, answer)
    }));
    let (stores, feeds) = support::stores();
    let (lease_store, leases) = reflector::store();
    let metrics = Arc::new(Metrics::new().unwrap());
    let acknowledgements =
        Acknowledgements::new(lease_store).with_metrics(AckMetrics::register(metrics.registry()).unwrap());
    let ctx = support::context(server.client.clone(), stores, metrics, previous, None, acknowledgements);
    World { ctx, server, kill_switches: feeds.kill_switches, api_keys: feeds.api_keys, leases }
}

const SWITCHES: &str = "/apis/portcullis.dev/v1alpha1/namespaces/ops/killswitches";
const KEY_STATUS: &str = "/apis/portcullis.dev/v1alpha1/namespaces/team-a/apikeys/alice/status";
const SNAPSHOT: &str = "/api/v1/namespaces/portcullis/secrets/portcullis-snapshot";

fn switch(active: bool, generation: i64, status: Option<Value>) -> KillSwitch {
    let mut object = json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "KillSwitch",
        "metadata": {"name": "stop", "namespace": "ops", "uid": "uid-stop", "generation": generation},
        "spec": {"scope": {"global": true}, "active": active},
    });
    if let Some(status) = status {
        object["status"] = status;
    }
    serde_json::from_value(object).unwrap()
}

/// A replica's Lease as the data plane writes it, renewed `age` seconds before `now()`.
fn lease(replica: &str, generation: Option<u64>, age: i64) -> Lease {
    let renewed = now() - chrono::Duration::seconds(age);
    let mut annotations = serde_json::Map::new();
    if let Some(g) = generation {
        annotations.insert(GENERATION_ANNOTATION.into(), json!(g.to_string()));
    }
    serde_json::from_value(json!({
        "metadata": {"name": format!("portcullis-dp-{replica}"), "namespace": "portcullis",
            "labels": {COMPONENT_LABEL: COMPONENT}, "annotations": annotations},
        "spec": {"holderIdentity": replica, "leaseDurationSeconds": 30,
            "renewTime": renewed.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()},
    }))
    .unwrap()
}

impl World {
    fn take(&self) -> Vec<Call> {
        self.server.take()
    }

    fn put_switch(&mut self, switch: &KillSwitch) {
        self.kill_switches.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(switch.clone()))));
    }

    fn put_lease(&mut self, lease: Lease) {
        self.leases.apply_watcher_event(&watcher::Event::Apply(lease));
    }

    /// Reconciles `switch`; returns the status written (if any) and keeps the cache in step, as
    /// the watch would.
    async fn reconcile(&mut self, switch: &KillSwitch) -> (Option<Value>, KillSwitch) {
        self.put_switch(switch);
        reconcile::reconcile_kill_switch(Arc::new(DeserializeGuard(Ok(switch.clone()))), self.ctx.clone())
            .await
            .unwrap();
        let calls = self.take();
        let path = format!("{SWITCHES}/{}/status", switch.metadata.name.as_deref().unwrap());
        let written = calls.iter().find(|c| c.path == path).map(|c| c.body["status"].clone());
        assert!(calls.iter().all(|c| c.method == "PATCH" && c.path == path), "{calls:?}");
        let mut next = switch.clone();
        if let Some(status) = &written {
            next.status = Some(serde_json::from_value(status.clone()).unwrap());
            self.put_switch(&next);
        }
        (written, next)
    }

    async fn sync(&self) -> Option<u64> {
        let generation = snapshot::sync_snapshot(&self.ctx).await.unwrap();
        let calls = self.take();
        assert!(calls.iter().all(|c| c.method == "PATCH" && c.path == SNAPSHOT), "{calls:?}");
        generation
    }
}

fn enforced(status: &Value) -> (String, String, String) {
    let condition = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Enforced").unwrap();
    (
        condition["status"].as_str().unwrap().to_owned(),
        condition["reason"].as_str().unwrap().to_owned(),
        status["enforcement"]["summary"].as_str().unwrap().to_owned(),
    )
}

fn stale(w: &World) -> Vec<String> {
    acknowledgement::stale(&w.ctx).into_iter().map(|(kind, o)| format!("{kind} {o}")).collect()
}

#[tokio::test]
async fn leases_become_the_enforced_count_written_only_when_it_changes() {
    let mut w = world();
    let ks = switch(false, 1, None);
    w.put_switch(&ks);
    assert_eq!(w.sync().await, Some(1));

    // Until the Lease cache is complete nothing is claimed or written about enforcement.
    let (written, ks) = w.reconcile(&ks).await;
    let written = written.expect("Ready is written");
    assert!(written.get("enforcement").is_none());
    assert!(stale(&w).is_empty());

    // Two replicas: one serves generation 1, one is still on nothing.
    w.put_lease(lease("dp-a", Some(1), 2));
    w.put_lease(lease("dp-b", None, 2));
    w.ctx.acknowledgements.mark_synced();
    assert_eq!(stale(&w), ["KillSwitch ops/stop"]);
    let (written, ks) = w.reconcile(&ks).await;
    let written = written.expect("count written");
    assert_eq!(enforced(&written), ("False".into(), "Propagating".into(), "1/2".into()));
    assert_eq!(
        written["enforcement"],
        json!({"snapshotGeneration": 1, "enforcedReplicas": 1, "replicas": 2, "summary": "1/2"})
    );
    let message =
        written["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Enforced").unwrap()["message"].clone();
    assert_eq!(message, "1/2 data-plane replicas applied snapshot generation 1");

    // A heartbeat that changes nothing: no reconcile wanted, and a reconcile writes nothing.
    w.put_lease(lease("dp-a", Some(1), 0));
    assert!(stale(&w).is_empty());
    assert_eq!(w.reconcile(&ks).await.0, None);

    // The second replica catches up.
    w.put_lease(lease("dp-b", Some(1), 0));
    assert_eq!(stale(&w), ["KillSwitch ops/stop"]);
    let (written, ks) = w.reconcile(&ks).await;
    assert_eq!(enforced(&written.unwrap()), ("True".into(), "Applied".into(), "2/2".into()));

    // Flip the switch: pending until a snapshot holds it, then counted against generation 2.
    let mut flipped = switch(true, 2, serde_json::to_value(&ks.status).ok());
    let (written, next) = w.reconcile(&flipped).await;
    assert_eq!(enforced(&written.unwrap()), ("False".into(), "SnapshotPending".into(), "0/2".into()));
    flipped = next;
    assert_eq!(w.sync().await, Some(2));
    assert_eq!(stale(&w), ["KillSwitch ops/stop"]);
    let (written, next) = w.reconcile(&flipped).await;
    let written = written.unwrap();
    assert_eq!(enforced(&written), ("False".into(), "Propagating".into(), "0/2".into()));
    assert_eq!(written["enforcement"]["snapshotGeneration"], 2);
    flipped = next;
    w.put_lease(lease("dp-a", Some(2), 0));
    w.put_lease(lease("dp-b", Some(2), 0));
    let (written, next) = w.reconcile(&flipped).await;
    assert_eq!(enforced(&written.unwrap()), ("True".into(), "Applied".into(), "2/2".into()));
    flipped = next;
    // Metrics: both replicas live and current; generation 2 reached everyone once.
    w.ctx.acknowledgements.observe(now());
    let rendered = String::from_utf8(w.ctx.metrics.render()).unwrap();
    for line in [
        "portcullis_operator_dataplane_replicas 2",
        "portcullis_operator_dataplane_replicas_current 2",
        "portcullis_operator_snapshot_propagation_seconds_count 1",
    ] {
        assert!(rendered.contains(line), "{line} in {rendered}");
    }

    // A replica vanishes without deleting its Lease: it stops counting once the Lease runs out.
    w.put_lease(lease("dp-b", Some(2), 31));
    assert_eq!(stale(&w), ["KillSwitch ops/stop"]);
    let (written, next) = w.reconcile(&flipped).await;
    assert_eq!(enforced(&written.unwrap()), ("True".into(), "Applied".into(), "1/1".into()));
    flipped = next;

    // A new replica that applied an older generation only: not enforced everywhere.
    w.put_lease(lease("dp-c", Some(1), 0));
    let (written, _) = w.reconcile(&flipped).await;
    assert_eq!(enforced(&written.unwrap()), ("False".into(), "Propagating".into(), "1/2".into()));

    // Nothing else in the snapshot moved: other snapshot writes leave this switch's G alone.
    assert_eq!(w.sync().await, None);
}

#[tokio::test]
async fn revoked_keys_report_how_many_replicas_refuse_them() {
    let mut w = world();
    let status = json!({
        "keyPrefix": "pcl_abcd",
        "issuedAt": "2025-03-01T10:00:00Z",
        "issuedDigests": [{"digest": "ab".repeat(32), "keyPrefix": "pcl_abcd"}],
        "observedGeneration": 1,
    });
    let key = |revoked: bool, generation: i64| -> ApiKey {
        serde_json::from_value(json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "alice", "namespace": "team-a", "uid": "uid-alice", "generation": generation},
            "spec": {"owner": "alice@example.com", "revoked": revoked},
            "status": status,
        }))
        .unwrap()
    };
    let active = key(false, 1);
    w.api_keys.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(active.clone()))));
    w.put_lease(lease("dp-a", Some(1), 0));
    w.ctx.acknowledgements.mark_synced();
    assert_eq!(w.sync().await, Some(1));
    // Not revoked: nothing to report.
    assert!(stale(&w).is_empty());

    let revoked = key(true, 2);
    w.api_keys.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(revoked.clone()))));
    assert_eq!(stale(&w), ["ApiKey team-a/alice"]);
    assert_eq!(w.sync().await, Some(2));
    reconcile::reconcile_api_key(Arc::new(DeserializeGuard(Ok(revoked.clone()))), w.ctx.clone()).await.unwrap();
    let calls = w.take();
    let status = &calls.iter().find(|c| c.path == KEY_STATUS).expect("status").body["status"];
    assert_eq!(enforced(status), ("False".into(), "Propagating".into(), "0/1".into()));

    w.put_lease(lease("dp-a", Some(2), 0));
    reconcile::reconcile_api_key(Arc::new(DeserializeGuard(Ok(revoked))), w.ctx.clone()).await.unwrap();
    let calls = w.take();
    let status = &calls.iter().find(|c| c.path == KEY_STATUS).expect("status").body["status"];
    assert_eq!(enforced(status), ("True".into(), "Applied".into(), "1/1".into()));
    assert_eq!(status["enforcement"]["snapshotGeneration"], 2);
}

/// A new leader (restart or failover) keeps what status says when nothing moved: no rewrite of
/// every object's status, no false "Propagating".
#[tokio::test]
async fn a_restarted_operator_keeps_the_reported_generation() {
    let mut w = world();
    let ks = switch(true, 1, None);
    let other = |active: bool| -> KillSwitch {
        let mut s = switch(active, 1, None);
        s.metadata.name = Some("other".into());
        s
    };
    w.put_switch(&ks);
    w.put_switch(&other(false));
    assert_eq!(w.sync().await, Some(1));
    w.put_switch(&other(true));
    assert_eq!(w.sync().await, Some(2));
    w.put_lease(lease("dp-a", Some(2), 0));
    w.ctx.acknowledgements.mark_synced();
    let (written, ks) = w.reconcile(&ks).await;
    let written = written.unwrap();
    assert_eq!(enforced(&written), ("True".into(), "Applied".into(), "1/1".into()));
    assert_eq!(written["enforcement"]["snapshotGeneration"], 1, "G is where this switch last changed");
    let (written, other_now) = w.reconcile(&other(true)).await;
    assert_eq!(written.unwrap()["enforcement"]["snapshotGeneration"], 2);
    let stored = w.ctx.snapshot.lock().await.previous.clone();

    let mut w = world_from(stored);
    w.put_switch(&ks);
    w.put_switch(&other_now);
    w.put_lease(lease("dp-a", Some(2), 0));
    w.ctx.acknowledgements.mark_synced();
    assert_eq!(w.sync().await, None, "nothing changed: no snapshot write");
    assert!(stale(&w).is_empty());
    assert_eq!(w.reconcile(&ks).await.0, None, "no status rewrite after a restart");
}

/// A switch the snapshot leaves out (invalid) has nothing enforced to count: no `Enforced`, and
/// Lease changes do not keep reconciling it.
#[tokio::test]
async fn a_switch_left_out_of_the_snapshot_reports_no_enforcement() {
    let mut w = world();
    let mut broken = switch(true, 1, None);
    broken.metadata.name = Some("broken".into());
    broken.spec.scope = Default::default();
    w.put_switch(&broken);
    w.put_lease(lease("dp-a", Some(1), 0));
    w.ctx.acknowledgements.mark_synced();
    assert_eq!(w.sync().await, Some(1));
    let (written, broken) = w.reconcile(&broken).await;
    let written = written.unwrap();
    let reasons: Vec<_> = written["conditions"].as_array().unwrap().iter().map(|c| c["type"].clone()).collect();
    assert_eq!(reasons, [json!("Ready")]);
    assert!(written.get("enforcement").is_none());
    assert_eq!(broken.status.unwrap().conditions[0].reason, "InvalidSpec");
    w.put_lease(lease("dp-a", Some(1), 1));
    assert!(stale(&w).is_empty());
}

/// The snapshot Secret was deleted while replicas kept serving generation 41: a new operator
/// would start the numbering again at 1, which every replica refuses (they never go back), so
/// no change (a revocation, a kill switch) would reach them until the count caught up. The
/// operator continues past the generation live replicas serve instead; a replica whose Lease
/// lapsed does not count.
#[tokio::test]
async fn a_deleted_snapshot_secret_does_not_restart_the_numbering_under_serving_replicas() {
    let mut w = world();
    w.put_lease(lease("dp-1", Some(41), 1));
    w.put_lease(lease("dp-2", Some(40), 2));
    w.put_lease(lease("dp-gone", Some(900), 120));
    w.put_switch(&switch(true, 1, None));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), Some(42));
    let calls = w.take();
    let written = calls.iter().find(|c| c.path == SNAPSHOT).expect("snapshot written");
    let snapshot = snapshot_of(written);
    assert_eq!(snapshot.generation, 42);
    snapshot.verify_tag(&support::keyring()).expect("tagged at the generation it carries");

    // Replicas take it; nothing changes; nothing is written again.
    w.put_lease(lease("dp-1", Some(42), 0));
    w.put_lease(lease("dp-2", Some(42), 0));
    assert_eq!(snapshot::sync_snapshot(&w.ctx).await.unwrap(), None);
    assert!(w.take().iter().all(|c| c.path != SNAPSHOT));
}

/// The snapshot a write carries.
fn snapshot_of(call: &Call) -> GatewaySnapshot {
    use base64::Engine as _;
    let gz = call.body["data"]["snapshot.json.gz"].as_str().expect("gzipped snapshot");
    let bytes = base64::engine::general_purpose::STANDARD.decode(gz).unwrap();
    GatewaySnapshot::from_secret_data(|key| (key == "snapshot.json.gz").then_some(bytes.as_slice())).unwrap()
}
