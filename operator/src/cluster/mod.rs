//! `portcullis-operator run`: the operator in a cluster.
//!
//! ```text
//!   Lease ──(leading?)──────────────────────────────────────────────┐
//!   ApiKey ─────────────▶ Controller ─▶ reconcile_api_key ─┐        │ writes only while leading
//!   ProviderCredential ─▶ Controller ─▶ reconcile_credential ├─notify─▶ sync_snapshot ─▶ snapshot Secret
//!   KillSwitch ─────────▶ Controller ─▶ reconcile_kill_switch┘            (SSA, only on a new digest)
//!   Secret metadata (one reflector) ─▶ fan-out to the objects that reference it, keyring changes ─▶ re-seal
//!                                      (values read on demand, only those referenced: `secret_values`)
//!   data-plane Leases ─▶ acknowledgement ─▶ reconcile objects whose `Enforced` count changed
//! ```

pub mod acknowledgement;
pub mod audit;
pub mod context;
pub mod events;
pub mod lease;
pub mod metrics;
pub mod reconcile;
pub mod secret_values;
pub mod snapshot;
pub mod webhook_leader;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, reflector, ObjectRef};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use portcullis_crds::v1alpha1::{ApiKey, KillSwitch, ProviderCredential};
use tokio::sync::{mpsc, Notify};

use self::context::{
    applied_and_listed, Backoff, Cache, Context, Guarded, Listings, Retrigger, Settings, SnapshotState, Stores,
};
use self::secret_values::SecretValues;
use crate::issuance::MANAGER;

/// Everything `run` needs besides the client.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub settings: Settings,
    /// Lease name, or `None` to run without leader election (a single replica).
    pub lease: Option<String>,
    pub identity: String,
    pub admin_listen: SocketAddr,
    /// The audit ledger file (on a PersistentVolume), or `None` to keep no ledger.
    pub ledger_file: Option<std::path::PathBuf>,
    /// The audit ledger in a Redis Stream instead of a file.
    pub ledger_redis: Option<crate::ledger::RedisLedgerSettings>,
    /// The validating admission webhook, served on every replica, routed to the leader.
    pub webhook: Option<crate::webhook::WebhookSettings>,
    /// How often the ledger head is republished even without appends.
    pub checkpoint_every: Duration,
}

fn channel_stream<T: Send + 'static>(rx: mpsc::UnboundedReceiver<T>) -> impl Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// The objects that reference `secret` (by secretRef, or as the owner of a reveal Secret) are
/// reconciled again, and the snapshot writer woken: a brought key's or a credential's new value
/// changes the snapshot even when it changes nothing in the object's status (a leaked brought
/// key replaced in its Secret stopped working only at the next resync).
fn referencing(ctx: &Context, secret: &ObjectMeta) {
    let namespace = secret.namespace.clone().unwrap_or_default();
    let name = secret.name.clone().unwrap_or_default();
    let settings = &ctx.settings;
    if namespace == settings.namespace && name == settings.keyring_secret {
        ctx.snapshot_trigger.notify_one();
    }
    // During a relist (`InitApply`) the cache still shows the old listing: checked at `InitDone`.
    if namespace == settings.namespace && name == settings.snapshot_secret {
        snapshot::stored_snapshot_seen(ctx);
    }
    for guarded in ctx.stores.api_keys.state() {
        let Ok(key) = &guarded.0 else { continue };
        if key.namespace().as_deref() != Some(namespace.as_str()) {
            continue;
        }
        let by_ref = key.spec.secret_ref.as_ref().is_some_and(|r| r.name == name);
        let owned = secret.owner_references.iter().flatten().any(|o| Some(&o.uid) == key.metadata.uid.as_ref());
        if by_ref || owned {
            ctx.retrigger.object(&("ApiKey", portcullis_crds::v1alpha1::ObjectRef::new(&namespace, key.name_any())));
        }
        if by_ref {
            ctx.snapshot_trigger.notify_one();
        }
    }
    for guarded in ctx.stores.credentials.state() {
        let Ok(credential) = &guarded.0 else { continue };
        if credential.namespace().as_deref() == Some(namespace.as_str())
            && credential.spec.secret_ref.as_ref().is_some_and(|r| r.name == name)
        {
            ctx.retrigger.object(&(
                "ProviderCredential",
                portcullis_crds::v1alpha1::ObjectRef::new(&namespace, credential.name_any()),
            ));
            ctx.snapshot_trigger.notify_one();
        }
    }
}

/// A Secret watch event, after the reflector has applied it: values read at another version
/// go, and the objects that reference the Secret are reconciled again.
pub fn secret_event(ctx: &Context, event: &watcher::Event<PartialObjectMeta<Secret>>) {
    match event {
        // A value read at an older version stays until a read at the new one succeeds.
        watcher::Event::Apply(secret) | watcher::Event::InitApply(secret) => referencing(ctx, &secret.metadata),
        watcher::Event::Delete(secret) => {
            let meta = &secret.metadata;
            ctx.secret_values
                .forget(meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default());
            referencing(ctx, meta);
        }
        // A relist replaced the store: Secrets deleted while the watch was down are gone from it.
        watcher::Event::InitDone => {
            ctx.secret_values.retain(|namespace, name| ctx.secret_meta(namespace, name).is_some());
            ctx.snapshot_trigger.notify_one();
            // The snapshot Secret may have gone or changed while the watch was down.
            snapshot::stored_snapshot_seen(ctx);
        }
        watcher::Event::Init => {}
    }
}

fn log_result<T, E: std::fmt::Display>(
    kind: &'static str,
) -> impl FnMut(Result<T, E>) -> futures_util::future::Ready<()> {
    move |result| {
        if let Err(error) = result {
            tracing::debug!(kind, %error, "controller event");
        }
        futures_util::future::ready(())
    }
}

/// Runs until leadership is lost (an error) or the process is told to stop.
pub async fn run(client: Client, run: RunSettings) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::new()?);
    let admin = tokio::spawn(metrics::serve(run.admin_listen, metrics.clone()));
    let settings = run.settings.clone();
    let leading = Arc::new(AtomicBool::new(false));
    let hints = Arc::new(crate::audit::ActorHints::default());
    let webhook = match &run.webhook {
        Some(webhook) => {
            let server = crate::webhook::WebhookServer::bind(webhook.clone()).await?;
            webhook_leader::clear(&client, &settings.namespace, &run.identity, Duration::from_secs(10)).await;
            Some(tokio::spawn(server.serve(hints.clone())))
        }
        None => None,
    };

    let mut lease_task = match &run.lease {
        Some(name) => {
            let api: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
            let lease = lease::LeaseSettings {
                name: name.clone(),
                identity: run.identity.clone(),
                lease_duration: Duration::from_secs(15),
                renew_every: Duration::from_secs(4),
            };
            lease::acquire(&api, &lease).await;
            leading.store(true, Ordering::SeqCst);
            let holding = tokio::spawn(lease::hold(api.clone(), lease.clone(), leading.clone()));
            Some((holding, api, lease))
        }
        None => {
            leading.store(true, Ordering::SeqCst);
            None
        }
    };
    metrics.leader.set(1);
    let webhook_label = webhook.is_some().then(|| {
        tokio::spawn(webhook_leader::mark_leader(client.clone(), settings.namespace.clone(), run.identity.clone()))
    });

    let (keyring, pepper, previous) = snapshot::bootstrap(
        &client,
        &settings.namespace,
        &settings.keyring_secret,
        &settings.pepper_secret,
        &settings.snapshot_secret,
    )
    .await?;
    if let Some(p) = &previous {
        metrics.snapshot_generation.set(i64::try_from(p.generation).unwrap_or(i64::MAX));
    }

    // Opened only once leading: one writer (and Redis refuses a racing deposed one).
    let audit = match (&run.ledger_file, &run.ledger_redis) {
        (Some(path), _) => Some(audit::Audit::open(path, hints.clone())?),
        (None, Some(redis)) => {
            let store = crate::ledger::LedgerStore::Redis(crate::ledger::RedisLedger::open(redis).await?);
            Some(audit::Audit::from_store(store, hints.clone()).await?)
        }
        (None, None) => None,
    };
    if let Some(opened) = &audit {
        tracing::info!(ledger = %opened.describe().await, head = ?opened.head().await.map(|h| h.sequence), "audit ledger open");
    }
    let audit = audit.map(Arc::new);

    // What Controller::new builds, with the caches' first listings flagged for the snapshot writer.
    let listings = Arc::new(Listings::default());
    let snapshot_trigger = Arc::new(Notify::new());
    let api_keys = controller::<ApiKey>(&client, &listings, Cache::ApiKeys, &snapshot_trigger);
    let credentials = controller::<ProviderCredential>(&client, &listings, Cache::Credentials, &snapshot_trigger);
    let kill_switches = controller::<KillSwitch>(&client, &listings, Cache::KillSwitches, &snapshot_trigger);
    let (secret_store, secret_writer) = reflector::store::<PartialObjectMeta<Secret>>();
    let (ak_tx, ak_rx) = mpsc::unbounded_channel();
    let (pc_tx, pc_rx) = mpsc::unbounded_channel();
    let (ks_tx, ks_rx) = mpsc::unbounded_channel();
    let (lease_store, lease_writer) = reflector::store::<Lease>();
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: settings.clone(),
        stores: Stores {
            api_keys: api_keys.store(),
            credentials: credentials.store(),
            kill_switches: kill_switches.store(),
            secrets: secret_store,
            listings: listings.clone(),
        },
        pepper,
        keyring: Mutex::new(keyring),
        metrics: metrics.clone(),
        recorder: Some(Recorder::new(
            client.clone(),
            Reporter { controller: MANAGER.to_owned(), instance: Some(run.identity.clone()) },
        )),
        clock: Arc::new(chrono::Utc::now),
        leading: leading.clone(),
        snapshot: tokio::sync::Mutex::new(SnapshotState { previous, excluded: Default::default() }),
        snapshot_trigger,
        snapshot_check: AtomicBool::new(false),
        retrigger: Retrigger { api_keys: Some(ak_tx), credentials: Some(pc_tx), kill_switches: Some(ks_tx) },
        backoff: Backoff::default(),
        audit,
        checkpoint_trigger: Notify::new(),
        acknowledgements: acknowledgement::Acknowledgements::new(lease_store)
            .with_metrics(acknowledgement::AckMetrics::register(metrics.registry())?),
        secret_values: SecretValues::default(),
    });
    let acknowledgement_task = tokio::spawn(acknowledgement::follow(ctx.clone(), lease_writer, Duration::from_secs(5)));

    // Checkpoints: after appends, and periodically so a fresh Event keeps showing the head.
    let checkpoint_ctx = ctx.clone();
    let checkpoint_every = run.checkpoint_every;
    let checkpoint_task = tokio::spawn(async move {
        loop {
            if let Err(error) = audit::publish_checkpoint(&checkpoint_ctx).await {
                tracing::warn!(%error, "publishing the ledger checkpoint failed");
            }
            tokio::select! {
                _ = checkpoint_ctx.checkpoint_trigger.notified() => {}
                _ = tokio::time::sleep(checkpoint_every) => {
                    if let Some(audit) = &checkpoint_ctx.audit {
                        audit.republish();
                    }
                }
            }
        }
    });

    // One Secret reflector, metadata only: triggers for the objects that reference a Secret, and
    // the versions that tell when a value read earlier is stale.
    let secret_ctx = ctx.clone();
    let secrets_task =
        tokio::spawn(secret_watch(client.clone()).default_backoff().reflect(secret_writer).for_each(move |event| {
            match event {
                Ok(event) => {
                    listings.saw(&event, Cache::Secrets);
                    secret_event(&secret_ctx, &event)
                }
                Err(error) => tracing::warn!(%error, "Secret watch error"),
            }
            futures_util::future::ready(())
        }));

    // The snapshot writer: coalesces notifications; retries with backoff.
    let writer_ctx = ctx.clone();
    let writer_task = tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let retry = match snapshot::sync_snapshot(&writer_ctx).await {
                Ok(_) => {
                    if let Err(error) = audit::audit_keyring(&writer_ctx).await {
                        tracing::warn!(%error, "recording the master keyring in the ledger failed");
                    }
                    // Written on a changed Secret's last value (its read failed): read it again soon.
                    writer_ctx.secret_values.take_stale_served()
                }
                Err(error) => {
                    writer_ctx.metrics.error("Snapshot", error.category());
                    tracing::warn!(%error, "snapshot sync failed");
                    true
                }
            };
            let wait = if retry {
                failures = failures.saturating_add(1);
                Backoff::delay(failures)
            } else {
                failures = 0;
                writer_ctx.settings.resync
            };
            // A change (a kill switch flipped, say) does not wait out the backoff.
            tokio::select! {
                _ = writer_ctx.snapshot_trigger.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });

    let api_keys = api_keys
        .reconcile_on(channel_stream::<ObjectRef<Guarded<ApiKey>>>(ak_rx))
        .run(reconcile::reconcile_api_key, reconcile::error_policy, ctx.clone())
        .for_each(log_result("ApiKey"));
    let credentials = credentials
        .reconcile_on(channel_stream::<ObjectRef<Guarded<ProviderCredential>>>(pc_rx))
        .run(reconcile::reconcile_credential, reconcile::error_policy, ctx.clone())
        .for_each(log_result("ProviderCredential"));
    let kill_switches = kill_switches
        .reconcile_on(channel_stream::<ObjectRef<Guarded<KillSwitch>>>(ks_rx))
        .run(reconcile::reconcile_kill_switch, reconcile::error_policy, ctx.clone())
        .for_each(log_result("KillSwitch"));
    tracing::info!(namespace = %settings.namespace, snapshot = %settings.snapshot_secret, "operator running");

    let lease_lost = async {
        match lease_task.as_mut() {
            Some((holding, _, _)) => {
                let _ = holding.await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    let result = tokio::select! {
        _ = lease_lost => Err(anyhow::anyhow!("leadership lost; exiting so a fresh process can campaign again")),
        _ = futures_util::future::join3(api_keys, credentials, kill_switches) => Ok(()),
        _ = shutdown_signal() => Ok(()),
    };
    leading.store(false, Ordering::SeqCst);
    metrics.leader.set(0);
    writer_task.abort();
    checkpoint_task.abort();
    acknowledgement_task.abort();
    secrets_task.abort();
    admin.abort();
    if let Some((holding, api, lease)) = lease_task {
        holding.abort();
        if result.is_ok() {
            // The reconcilers went with the select above; the writers are stopped before the
            // Lease is given up, so the next leader never writes beside this one.
            let _ = tokio::join!(writer_task, checkpoint_task, acknowledgement_task);
            match tokio::time::timeout(Duration::from_secs(3), lease::release(&api, &lease)).await {
                Ok(Ok(true)) => tracing::info!(lease = %lease.name, "leader Lease released"),
                Ok(Ok(false)) => tracing::info!(lease = %lease.name, "leader Lease no longer held; left alone"),
                Ok(Err(error)) => tracing::warn!(%error, "could not release the leader Lease; it runs out by itself"),
                Err(_) => tracing::warn!("releasing the leader Lease timed out; it runs out by itself"),
            }
        }
    }
    // After the Lease: the next leader labels its own Pod as soon as it leads.
    if let Some(task) = webhook {
        task.abort();
        if let Some(label) = webhook_label {
            label.abort();
        }
        webhook_leader::clear(&client, &settings.namespace, &run.identity, Duration::from_secs(3)).await;
    }
    result
}

/// A controller of every `K` in the cluster, whose cache flags `cache` in `listings` once its
/// first full listing is in, and wakes the snapshot writer when objects leave it.
fn controller<K>(
    client: &Client,
    listings: &Arc<Listings>,
    cache: Cache,
    snapshot_trigger: &Arc<Notify>,
) -> Controller<Guarded<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store::<Guarded<K>>();
    let events =
        reflector(writer, watcher(Api::<Guarded<K>>::all(client.clone()), watcher::Config::default().any_semantic()));
    Controller::for_stream(applied_and_listed(events, listings.clone(), cache, snapshot_trigger.clone()), store)
}

/// SIGTERM (how Kubernetes stops a pod) or Ctrl-C. Shared with the data plane.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// Secret types the operator never reads: service account and bootstrap tokens, image pull
/// credentials and Helm release records. The API server leaves them out of the operator's Secret
/// watch, so its cache holds not even their metadata (for Helm, one Secret per release
/// revision). A credential or key stored in one of them is not found.
pub const UNWATCHED_SECRET_TYPES: [&str; 5] = [
    "kubernetes.io/service-account-token",
    "bootstrap.kubernetes.io/token",
    "kubernetes.io/dockercfg",
    "kubernetes.io/dockerconfigjson",
    "helm.sh/release.v1",
];

/// The cluster-wide Secret watch, without [`UNWATCHED_SECRET_TYPES`] (a field selector on `type`).
pub fn secret_watch_config() -> watcher::Config {
    let selector: Vec<String> = UNWATCHED_SECRET_TYPES.iter().map(|t| format!("type!={t}")).collect();
    watcher::Config::default().any_semantic().fields(&selector.join(","))
}

/// The operator's Secret watch: metadata only (values are read on demand, see
/// [`secret_values`]), without [`UNWATCHED_SECRET_TYPES`], and without the annotation `kubectl
/// apply` leaves with a copy of the whole Secret.
pub fn secret_watch(
    client: Client,
) -> impl Stream<Item = Result<watcher::Event<PartialObjectMeta<Secret>>, watcher::Error>> + Send {
    watcher(Api::<PartialObjectMeta<Secret>>::all(client), secret_watch_config()).modify(secret_values::strip_metadata)
}

#[cfg(test)]
mod secret_watch_tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;
    use kube::client::Body;
    use serde_json::json;

    #[tokio::test]
    async fn the_secret_watch_asks_for_metadata_only_and_keeps_no_applied_copy() {
        let (service, mut handle) = tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("the first list");
            let accept = request.headers().get(http::header::ACCEPT).map(|v| v.to_str().unwrap().to_owned());
            let uri = request.uri().to_string();
            let list = json!({
                "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                "metadata": {"resourceVersion": "10"},
                "items": [{
                    "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                    "metadata": {"name": "db", "namespace": "app", "resourceVersion": "9", "annotations": {
                        secret_values::LAST_APPLIED_ANNOTATION: r#"{"data":{"password":"Y2FuYXJ5"}}"#,
                        "team": "payments",
                    }},
                }],
            });
            let response = http::Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&list).unwrap()))
                .unwrap();
            send.send_response(response);
            (accept, uri)
        });
        let mut stream = std::pin::pin!(secret_watch(Client::new(service, "default")));
        let mut listed = Vec::new();
        while let Some(event) = stream.next().await {
            match event.expect("list") {
                watcher::Event::InitApply(secret) => listed.push(secret),
                watcher::Event::InitDone => break,
                _ => {}
            }
        }
        let (accept, uri) = server.await.unwrap();
        let accept = accept.expect("an Accept header");
        assert!(accept.contains("as=PartialObjectMetadataList"), "{accept}");
        assert!(uri.starts_with("/api/v1/secrets?"), "{uri}");
        assert!(uri.contains("fieldSelector=type%21%3Dkubernetes.io%2Fservice-account-token"), "{uri}");
        assert_eq!(listed.len(), 1);
        let annotations = listed[0].metadata.annotations.clone().unwrap_or_default();
        assert_eq!(annotations.keys().collect::<Vec<_>>(), vec!["team"]);
    }

    #[test]
    fn the_secret_watch_leaves_out_token_pull_and_release_secrets() {
        let config = secret_watch_config();
        assert_eq!(
            config.field_selector.as_deref(),
            Some(
                "type!=kubernetes.io/service-account-token,type!=bootstrap.kubernetes.io/token,\
                 type!=kubernetes.io/dockercfg,type!=kubernetes.io/dockerconfigjson,type!=helm.sh/release.v1"
            )
        );
        assert!(!UNWATCHED_SECRET_TYPES.contains(&"Opaque") && !UNWATCHED_SECRET_TYPES.contains(&"kubernetes.io/tls"));
    }
}
