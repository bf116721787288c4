//! Routes admission webhook calls to the leader: the leader labels its own Pod, and the
//! webhook Service selects only Pods with that label.
//!
//! Why: actor hints live in the memory of the replica that answered the webhook, and only the
//! leader appends to the ledger. A hint that reached another replica would be lost and the entry
//! would fall back to `managedFields`.
//!
//! ```text
//!   start ──▶ label "false" (a restarted container must not keep an old "true")
//!   leading ──▶ label "true" (retried until it sticks) ──▶ Service endpoints = this Pod
//!   exit ──▶ label "false" (best effort; a crashed Pod is NotReady and leaves the endpoints anyway)
//! ```
//!
//! During a failover no Pod (or, briefly, the old and the new leader) carries the label: calls
//! then fail (the API server applies the webhook's `failurePolicy`) or reach the old leader,
//! whose hint is lost. Entries made then name the `managedFields` manager instead.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use crate::error::Error;

/// The Pod label the webhook Service selects on.
pub const LEADER_LABEL: &str = "portcullis.dev/webhook-leader";
/// Field manager that owns only this label.
pub const MANAGER: &str = "portcullis-operator-webhook";

/// Sets this Pod's label to `leading`.
pub async fn set(client: &Client, namespace: &str, pod: &str, leading: bool) -> Result<(), Error> {
    let patch = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod, "labels": {LEADER_LABEL: if leading { "true" } else { "false" }}},
    });
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    api.patch(pod, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map(|_| ())
        .map_err(Error::write(format!("Pod {namespace}/{pod} label {LEADER_LABEL}")))
}

/// Marks this Pod as the leader, retrying until it succeeds (until then the webhook has no
/// endpoint, and the API server applies the `failurePolicy`).
pub async fn mark_leader(client: Client, namespace: String, pod: String) {
    let mut delay = Duration::from_millis(500);
    loop {
        match set(&client, &namespace, &pod, true).await {
            Ok(()) => {
                tracing::info!(%pod, label = LEADER_LABEL, "webhook now routed to this replica");
                return;
            }
            Err(error) => tracing::warn!(%error, "could not label this Pod as the webhook leader; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Clears the label, giving up after `within` (at start and on exit: best effort).
pub async fn clear(client: &Client, namespace: &str, pod: &str, within: Duration) {
    match tokio::time::timeout(within, set(client, namespace, pod, false)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "could not clear the webhook leader label"),
        Err(_) => tracing::warn!("clearing the webhook leader label timed out"),
    }
}
