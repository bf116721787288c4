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
///
/// A merge patch, not server-side apply: an apply of a Pod that does not exist would try to
/// create one (an identity that names no Pod, a process run outside the cluster), where a patch
/// only ever changes the Pod that is there, and fails with 404 otherwise.
pub async fn set(client: &Client, namespace: &str, pod: &str, leading: bool) -> Result<(), Error> {
    let patch = serde_json::json!({
        "metadata": {"labels": {LEADER_LABEL: if leading { "true" } else { "false" }}},
    });
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let params = PatchParams { field_manager: Some(MANAGER.to_owned()), ..PatchParams::default() };
    api.patch(pod, &params, &Patch::Merge(&patch))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{json, Value};
    use std::sync::{Arc, Mutex};

    /// `(method and path, query, body)` of each call.
    type Calls = Arc<Mutex<Vec<(String, String, Value)>>>;

    /// A mocked API server that fails the first call, then echoes; returns the calls it saw.
    fn api() -> (Client, Calls) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let content_type = request.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
                let line =
                    format!("{} {} {}", request.method(), request.uri().path(), content_type.unwrap_or_default());
                let query = request.uri().query().unwrap_or_default().to_owned();
                let bytes = http_body_util::BodyExt::collect(request.into_body()).await.unwrap().to_bytes();
                let body: Value = serde_json::from_slice(&bytes).unwrap();
                let first = seen.lock().unwrap().is_empty();
                seen.lock().unwrap().push((line, query, body.clone()));
                let (status, answer) = if first {
                    (
                        500,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500, "message": "etcd"}),
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
            }
        });
        (Client::new(service, "default"), calls)
    }

    #[tokio::test]
    async fn the_leader_labels_its_pod_until_it_sticks_and_clears_it_on_exit() {
        let (client, calls) = api();
        mark_leader(client.clone(), "portcullis".into(), "operator-0".into()).await;
        clear(&client, "portcullis", "operator-0", Duration::from_secs(5)).await;
        let calls = calls.lock().unwrap().clone();
        let labels: Vec<&str> = calls
            .iter()
            .map(|(line, query, body)| {
                // A merge patch: it changes the Pod that exists and never creates one.
                assert_eq!(line, "PATCH /api/v1/namespaces/portcullis/pods/operator-0 application/merge-patch+json");
                assert!(query.contains("fieldManager=portcullis-operator-webhook"), "{query}");
                assert_eq!(
                    *body,
                    json!({"metadata": {"labels": {LEADER_LABEL: body["metadata"]["labels"][LEADER_LABEL]}}})
                );
                body["metadata"]["labels"][LEADER_LABEL].as_str().unwrap()
            })
            .collect();
        // The first attempt failed and was retried.
        assert_eq!(labels, ["true", "true", "false"]);
    }
}
