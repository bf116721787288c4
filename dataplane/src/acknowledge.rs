//! Cluster mode: this replica reports the snapshot it serves in its own Lease, so the operator can
//! say how many replicas enforce a change (the `Enforced` condition).
//!
//! ```text
//!   SnapshotApplier ──(generation, digest)──▶ watch ──▶ ReplicaLease::run ──SSA──▶ Lease portcullis-dp-<replica>
//!                                     heartbeat ┘        on shutdown: delete
//! ```
//!
//! One small object per replica, written only by that replica with server-side apply: on every
//! applied snapshot, and on a heartbeat so the operator can tell a live replica from one that
//! vanished. Reporting never blocks serving: failures are logged and retried with backoff.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};
use portcullis_crds::acknowledgement::{
    lease_name, COMPONENT, COMPONENT_LABEL, DIGEST_ANNOTATION, FIELD_MANAGER, GENERATION_ANNOTATION,
};
use portcullis_crds::snapshot::GatewaySnapshot;
use tokio::sync::watch;

/// The snapshot a replica serves, as it reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedSnapshot {
    pub generation: u64,
    pub content_digest: String,
}

impl AppliedSnapshot {
    pub fn of(snapshot: &GatewaySnapshot) -> Self {
        Self { generation: snapshot.generation, content_digest: snapshot.content_digest.clone() }
    }
}

/// The pod that owns the Lease, so the Lease is garbage-collected with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodOwner {
    pub name: String,
    pub uid: String,
}

/// How this replica reports, and where.
#[derive(Debug, Clone)]
pub struct ReplicaLeaseSettings {
    pub namespace: String,
    /// The pod name (or host name).
    pub replica: String,
    pub owner: Option<PodOwner>,
    /// The operator counts the replica until `renewTime` plus this.
    pub lease_duration: Duration,
    pub heartbeat: Duration,
    /// First retry delay after a failed write; doubles up to `heartbeat`.
    pub retry: Duration,
}

impl ReplicaLeaseSettings {
    pub fn new(namespace: impl Into<String>, replica: impl Into<String>, owner: Option<PodOwner>) -> Self {
        Self {
            namespace: namespace.into(),
            replica: replica.into(),
            owner,
            lease_duration: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            retry: Duration::from_millis(250),
        }
    }

    pub fn lease_name(&self) -> String {
        lease_name(&self.replica)
    }

    /// The Lease this replica applies at `now` (pure).
    pub fn desired(&self, applied: Option<&AppliedSnapshot>, now: Timestamp) -> Lease {
        let mut annotations = BTreeMap::new();
        if let Some(applied) = applied {
            annotations.insert(GENERATION_ANNOTATION.to_owned(), applied.generation.to_string());
            annotations.insert(DIGEST_ANNOTATION.to_owned(), applied.content_digest.clone());
        }
        Lease {
            metadata: ObjectMeta {
                name: Some(self.lease_name()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([
                    (COMPONENT_LABEL.to_owned(), COMPONENT.to_owned()),
                    ("app.kubernetes.io/name".to_owned(), "portcullis-dataplane".to_owned()),
                ])),
                annotations: (!annotations.is_empty()).then_some(annotations),
                owner_references: self.owner.as_ref().map(|pod| {
                    vec![OwnerReference {
                        api_version: "v1".to_owned(),
                        kind: "Pod".to_owned(),
                        name: pod.name.clone(),
                        uid: pod.uid.clone(),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.replica.clone()),
                lease_duration_seconds: Some(i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX)),
                renew_time: Some(MicroTime(now)),
                ..Default::default()
            }),
        }
    }
}

/// Writes this replica's Lease.
#[derive(Clone)]
pub struct ReplicaLease {
    api: Api<Lease>,
    settings: ReplicaLeaseSettings,
}

impl fmt::Debug for ReplicaLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicaLease").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl ReplicaLease {
    pub fn new(client: Client, settings: ReplicaLeaseSettings) -> Self {
        Self { api: Api::namespaced(client, &settings.namespace), settings }
    }

    /// One server-side apply (creates the Lease the first time).
    pub async fn report(&self, applied: Option<&AppliedSnapshot>) -> Result<(), kube::Error> {
        let lease = self.settings.desired(applied, Timestamp::now());
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.api.patch(&self.settings.lease_name(), &params, &Patch::Apply(&lease)).await.map(drop)
    }

    /// Deletes the Lease, so the operator stops counting this replica at once.
    pub async fn withdraw(&self) {
        let name = self.settings.lease_name();
        match self.api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(lease = %name, "acknowledgement Lease deleted"),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => {
                tracing::warn!(%error, lease = %name, "could not delete the acknowledgement Lease; it expires")
            }
        }
    }

    /// Reports every applied snapshot and renews on the heartbeat until `shutdown`, then deletes
    /// the Lease.
    pub async fn run(self, mut applied: watch::Receiver<Option<AppliedSnapshot>>, mut shutdown: watch::Receiver<bool>) {
        let mut failures = 0u32;
        loop {
            let current = applied.borrow_and_update().clone();
            let wait = match self.report(current.as_ref()).await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(lease = %self.settings.lease_name(), "acknowledgement Lease written again");
                    }
                    failures = 0;
                    self.settings.heartbeat
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    // The first failure in a row is worth a warning; the rest are the same story.
                    if failures == 1 {
                        tracing::warn!(%error, lease = %self.settings.lease_name(), "could not write the acknowledgement Lease; retrying");
                    } else {
                        tracing::debug!(%error, failures, "acknowledgement Lease write failed again");
                    }
                    self.settings.retry.saturating_mul(1 << failures.min(10)).min(self.settings.heartbeat)
                }
            };
            let stop = tokio::select! {
                changed = applied.changed() => changed.is_err(),
                _ = tokio::time::sleep(wait) => false,
                _ = shutdown.changed() => true,
            };
            if stop || *shutdown.borrow() {
                break;
            }
        }
        self.withdraw().await;
    }
}

/// This replica's name: the given one (`POD_NAME`), else the host name.
pub fn replica_name(given: Option<&str>) -> String {
    let from_host = || {
        std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
    };
    given
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .or_else(from_host)
        .unwrap_or_else(|| format!("dataplane-{:08x}", fastrand::u32(..)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{json, Value};
    use std::sync::{Arc, Mutex};

    #[test]
    fn the_lease_names_the_replica_and_its_snapshot() {
        let owner = PodOwner { name: "dp-1".into(), uid: "uid-1".into() };
        let settings = ReplicaLeaseSettings::new("portcullis", "dp-1", Some(owner));
        let applied = AppliedSnapshot { generation: 42, content_digest: "ab".repeat(32) };
        let lease = settings.desired(Some(&applied), Timestamp::UNIX_EPOCH);
        let json = serde_json::to_value(&lease).unwrap();
        assert_eq!(json["apiVersion"], "coordination.k8s.io/v1");
        assert_eq!(json["metadata"]["name"], "portcullis-dp-dp-1");
        assert_eq!(json["metadata"]["labels"][COMPONENT_LABEL], COMPONENT);
        assert_eq!(json["metadata"]["annotations"][GENERATION_ANNOTATION], "42");
        assert_eq!(json["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(json["spec"]["holderIdentity"], "dp-1");
        assert_eq!(json["spec"]["leaseDurationSeconds"], 30);
        // Before any snapshot: a live replica that enforces nothing yet.
        let empty = serde_json::to_value(settings.desired(None, Timestamp::UNIX_EPOCH)).unwrap();
        assert!(empty["metadata"].get("annotations").is_none());
        assert_eq!(replica_name(Some(" dp-2 ")), "dp-2");
        assert!(!replica_name(None).is_empty());
    }

    #[derive(Debug, Clone)]
    struct Call {
        method: String,
        path: String,
        query: String,
        body: Value,
    }

    /// Reports each applied snapshot, retries after a failure, deletes the Lease on shutdown.
    #[tokio::test]
    async fn reports_applies_retries_and_withdraws() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let calls = Arc::new(Mutex::new(Vec::<Call>::new()));
        let recorded = calls.clone();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<()>();
        tokio::spawn(async move {
            let mut n = 0;
            while let Some((request, send)) = handle.next_request().await {
                n += 1;
                let method = request.method().to_string();
                let path = request.uri().path().to_owned();
                let query = request.uri().query().unwrap_or_default().to_owned();
                let bytes = http_body_util::BodyExt::collect(request.into_body())
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                recorded.lock().unwrap().push(Call { method, path, query, body: body.clone() });
                // The second write fails once: the writer must retry, not give up.
                let (status, answer) = if n == 2 {
                    (
                        500,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500, "message": "boom"}),
                    )
                } else {
                    (200, body)
                };
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap();
                send.send_response(response);
                let _ = seen_tx.send(());
            }
        });
        let client = Client::new(service, "default");
        let mut settings = ReplicaLeaseSettings::new("portcullis", "dp-1", None);
        settings.heartbeat = Duration::from_secs(3600);
        settings.retry = Duration::from_millis(10);
        let (applied_tx, applied_rx) =
            watch::channel(Some(AppliedSnapshot { generation: 7, content_digest: "d7".into() }));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(ReplicaLease::new(client, settings).run(applied_rx, shutdown_rx));

        seen.recv().await.unwrap();
        applied_tx.send_replace(Some(AppliedSnapshot { generation: 8, content_digest: "d8".into() }));
        seen.recv().await.unwrap(); // fails
        seen.recv().await.unwrap(); // retried
        shutdown_tx.send_replace(true);
        task.await.unwrap();

        let calls = calls.lock().unwrap().clone();
        let path = "/apis/coordination.k8s.io/v1/namespaces/portcullis/leases/portcullis-dp-dp-1";
        let lines: Vec<_> = calls.iter().map(|c| format!("{} {}", c.method, c.path)).collect();
        assert_eq!(
            lines,
            [format!("PATCH {path}"), format!("PATCH {path}"), format!("PATCH {path}"), format!("DELETE {path}")]
        );
        assert!(calls[0].query.contains("fieldManager=portcullis-dataplane"), "{}", calls[0].query);
        assert!(calls[0].query.contains("force=true"), "{}", calls[0].query);
        let generations: Vec<_> =
            calls[..3].iter().map(|c| c.body["metadata"]["annotations"][GENERATION_ANNOTATION].clone()).collect();
        assert_eq!(generations, [json!("7"), json!("8"), json!("8")]);
    }
}
