//! Cluster mode: follow the snapshot Secret the operator writes, through the Kubernetes API.
//!
//! Three single-object watches (field selector `metadata.name=…`): the snapshot, the master
//! keyring and the pepper. Each new snapshot goes to the one `SnapshotApplier`, which opens it
//! completely before swapping; anything it cannot open is rejected whole and the last good
//! snapshot keeps serving. A snapshot sealed under a master key this replica has not seen yet is
//! retried as soon as the keyring Secret catches up. Only these three Secrets are read, so RBAC
//! can name them by `resourceNames`.

use std::fmt;
use std::pin::pin;

use anyhow::{bail, Context as _};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, Client};
use portcullis_crds::digest::{Pepper, PEPPER_SECRET_KEY};
use portcullis_crds::sealing::MasterKeyring;
use portcullis_crds::secret::SecretBytes;
use portcullis_crds::snapshot::GatewaySnapshot;
use portcullis_crds::v1alpha1::ObjectRef;
use tokio::sync::watch;

use crate::acknowledge::{replica_name, AppliedSnapshot, PodOwner, ReplicaLease, ReplicaLeaseSettings};
use crate::config::DataplaneArgs;
use crate::reload::{off_workers, SnapshotApplier};

/// How often cluster mode looks whether a swapped-out snapshot can be freed.
const REAP_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// The three Secrets cluster mode reads.
#[derive(Clone)]
pub struct ClusterSource {
    client: Client,
    pub snapshot: ObjectRef,
    pub keyring: ObjectRef,
    pub pepper: ObjectRef,
}

impl fmt::Debug for ClusterSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterSource")
            .field("snapshot", &self.snapshot.to_string())
            .field("keyring", &self.keyring.to_string())
            .field("pepper", &self.pepper.to_string())
            .finish()
    }
}

/// `NAMESPACE/NAME` → object reference.
pub fn parse_secret_ref(text: &str) -> anyhow::Result<ObjectRef> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok(ObjectRef::new(ns, name)),
        _ => bail!("{text:?} must be NAMESPACE/NAME"),
    }
}

fn data<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret.data.as_ref()?.get(key).map(|v| v.0.as_slice())
}

fn keyring_of(secret: &Secret) -> anyhow::Result<MasterKeyring> {
    let pairs = secret.data.iter().flatten().map(|(k, v)| (k.as_str(), v.0.as_slice()));
    Ok(MasterKeyring::from_secret_data(pairs)?)
}

fn pepper_of(secret: &Secret) -> anyhow::Result<Pepper> {
    let bytes = data(secret, PEPPER_SECRET_KEY).unwrap_or_default();
    Ok(Pepper::new(SecretBytes::from_slice(bytes))?)
}

/// Parses a snapshot Secret; the error says why it cannot be used (never what it holds).
pub fn snapshot_of(secret: &Secret) -> Result<GatewaySnapshot, String> {
    GatewaySnapshot::from_secret_data(|key| data(secret, key)).map_err(|e| e.to_string())
}

impl ClusterSource {
    /// Cluster mode if `--snapshot-secret` is given.
    pub async fn from_args(args: &DataplaneArgs) -> anyhow::Result<Option<Self>> {
        let Some(snapshot) = &args.snapshot_secret else {
            return Ok(None);
        };
        let snapshot = parse_secret_ref(snapshot)?;
        let relative = |text: &str| ObjectRef::parse_relative(text, &snapshot.namespace);
        let client = portcullis_apiclient::client()
            .await
            .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
        Ok(Some(Self {
            client,
            keyring: relative(&args.keyring_secret),
            pepper: relative(&args.pepper_secret),
            snapshot,
        }))
    }

    fn api(&self, secret: &ObjectRef) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &secret.namespace)
    }

    async fn get(&self, secret: &ObjectRef) -> anyhow::Result<Option<Secret>> {
        self.api(secret).get_opt(&secret.name).await.with_context(|| format!("reading Secret {secret}"))
    }

    /// The keyring and pepper, read once before serving.
    pub async fn key_material(&self) -> anyhow::Result<(MasterKeyring, Pepper)> {
        let keyring = self
            .get(&self.keyring)
            .await?
            .with_context(|| format!("Secret {} not found (the operator creates it)", self.keyring))?;
        let pepper = self
            .get(&self.pepper)
            .await?
            .with_context(|| format!("Secret {} not found (the operator creates it)", self.pepper))?;
        Ok((
            keyring_of(&keyring).with_context(|| format!("Secret {}", self.keyring))?,
            pepper_of(&pepper).with_context(|| format!("Secret {}", self.pepper))?,
        ))
    }

    /// Applies the current snapshot once, so the first request is served.
    pub async fn load_initial(&self, applier: &mut SnapshotApplier) -> anyhow::Result<()> {
        match self.get(&self.snapshot).await? {
            Some(secret) => offer(applier, &secret),
            None => applier.reject(&format!("Secret {} not found yet", self.snapshot)),
        }
        Ok(())
    }

    /// This replica's acknowledgement Lease, in the snapshot's namespace; `None` when turned off.
    pub fn replica_lease(&self, args: &DataplaneArgs) -> Option<ReplicaLease> {
        if !args.ack_lease {
            return None;
        }
        let replica = replica_name(args.replica_name.as_deref());
        // An owner must live in the Lease's namespace; elsewhere the Lease just expires.
        let owner = match (&args.pod_uid, &args.pod_namespace) {
            (Some(uid), Some(ns)) if *ns == self.snapshot.namespace && !uid.is_empty() => {
                Some(PodOwner { name: replica.clone(), uid: uid.clone() })
            }
            _ => None,
        };
        let settings = ReplicaLeaseSettings::new(self.snapshot.namespace.clone(), replica, owner);
        tracing::info!(lease = %settings.lease_name(), namespace = %settings.namespace, "reporting applied snapshots");
        Some(ReplicaLease::new(self.client.clone(), settings))
    }

    /// Follows the three Secrets until `shutdown` fires, publishing each snapshot applied on
    /// `applied`.
    pub async fn run(
        self,
        mut applier: SnapshotApplier,
        mut shutdown: watch::Receiver<bool>,
        applied: watch::Sender<Option<AppliedSnapshot>>,
    ) {
        enum Change {
            Snapshot(Option<Secret>),
            Keyring(Option<Secret>),
            Pepper(Option<Secret>),
        }
        // Each watch waits out its own backoff after an error (0.8 s doubling to 30 s, with
        // jitter), so replicas do not relist twice a second through an API server outage.
        let watch = |secret: &ObjectRef| watcher::watch_object(self.api(secret), &secret.name).default_backoff();
        let snapshots = watch(&self.snapshot).map(|r| r.map(Change::Snapshot));
        let keyrings = watch(&self.keyring).map(|r| r.map(Change::Keyring));
        let peppers = watch(&self.pepper).map(|r| r.map(Change::Pepper));
        let mut changes =
            pin!(futures_util::stream::select(snapshots, futures_util::stream::select(keyrings, peppers)));
        // The latest snapshot Secret seen, to retry when the key material catches up.
        let mut latest: Option<Secret> = None;
        let mut pepper: Pepper = applier.pepper().clone();
        let mut keyring: MasterKeyring = applier.keyring().clone();
        loop {
            publish(&applier, &applied);
            let change = tokio::select! {
                change = changes.next() => change,
                _ = shutdown.changed() => return,
                // Snapshots swapped out while requests held them: freed off the workers once
                // the last of those requests is done.
                () = tokio::time::sleep(REAP_EVERY), if applier.holds_retired() => {
                    if applier.can_reap() {
                        let Some((next, _)) = off_workers(applier, SnapshotApplier::reap).await else {
                            return;
                        };
                        applier = next;
                    }
                    continue;
                }
            };
            match change {
                None => return,
                Some(Err(error)) => tracing::warn!(%error, "watch error; retrying after a backoff"),
                Some(Ok(Change::Snapshot(Some(secret)))) => {
                    let Some((next, secret)) = offer_off_workers(applier, secret).await else {
                        return;
                    };
                    applier = next;
                    latest = Some(secret);
                }
                Some(Ok(Change::Snapshot(None))) => {
                    applier.reject(&format!("Secret {} was deleted", self.snapshot));
                }
                Some(Ok(Change::Keyring(Some(secret)))) => match keyring_of(&secret) {
                    Ok(next) => {
                        keyring = next;
                        let Some(next) = rekey(applier, &keyring, &pepper, &mut latest).await else {
                            return;
                        };
                        applier = next;
                    }
                    Err(error) => applier.reject(&format!("Secret {}: {error}", self.keyring)),
                },
                Some(Ok(Change::Pepper(Some(secret)))) => match pepper_of(&secret) {
                    Ok(next) if next == pepper => {}
                    Ok(next) => {
                        pepper = next;
                        let Some(next) = rekey(applier, &keyring, &pepper, &mut latest).await else {
                            return;
                        };
                        applier = next;
                    }
                    Err(error) => applier.reject(&format!("Secret {}: {error}", self.pepper)),
                },
                Some(Ok(Change::Keyring(None) | Change::Pepper(None))) => {
                    tracing::warn!("a key material Secret was deleted; keeping the key material in memory");
                }
            }
        }
    }
}

/// Tells the acknowledgement Lease writer what is served now, if that changed.
fn publish(applier: &SnapshotApplier, applied: &watch::Sender<Option<AppliedSnapshot>>) {
    let now = applier.last_applied().map(AppliedSnapshot::of);
    applied.send_if_modified(|current| {
        if *current == now {
            return false;
        }
        *current = now;
        true
    });
}

/// New key material: the applier takes it, and the latest snapshot Secret seen is offered again,
/// since it may have been refused for want of it (sealed under a master key not yet seen, or
/// digested under a pepper not yet seen). `None`: see [`off_workers`].
async fn rekey(
    mut applier: SnapshotApplier,
    keyring: &MasterKeyring,
    pepper: &Pepper,
    latest: &mut Option<Secret>,
) -> Option<SnapshotApplier> {
    applier.set_key_material(keyring.clone(), pepper.clone());
    let Some(secret) = latest.take() else {
        return Some(applier);
    };
    let (applier, secret) = offer_off_workers(applier, secret).await?;
    *latest = Some(secret);
    Some(applier)
}

/// Hands one snapshot Secret to the applier (which rejects it whole if it cannot be opened).
fn offer(applier: &mut SnapshotApplier, secret: &Secret) {
    match snapshot_of(secret) {
        Ok(snapshot) => {
            applier.apply(snapshot);
        }
        Err(reason) => applier.reject(&reason),
    }
}

/// [`offer`] on a blocking-pool thread (decoding and opening a large snapshot takes tens of
/// milliseconds); the applier and the Secret come back. `None`: see [`off_workers`].
async fn offer_off_workers(applier: SnapshotApplier, secret: Secret) -> Option<(SnapshotApplier, Secret)> {
    off_workers(applier, move |applier| {
        offer(applier, &secret);
        secret
    })
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::ByteString;
    use portcullis_crds::snapshot::{SNAPSHOT_SECRET_GZIP_KEY, SNAPSHOT_SECRET_KEY};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn secret(key: &str, value: &[u8]) -> Secret {
        Secret { data: Some(BTreeMap::from([(key.to_owned(), ByteString(value.to_vec()))])), ..Default::default() }
    }

    /// An API server that fails every call: each watch backs off (0.8 s doubling to 30 s), so
    /// the three watches make a few calls a minute, not two a second for as long as it lasts.
    #[tokio::test(start_paused = true)]
    async fn watches_back_off_while_the_api_server_fails() {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        tokio::spawn(async move {
            while let Some((_, send)) = handle.next_request().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let status =
                    br#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":500,"message":"etcd down"}"#;
                send.send_response(
                    Response::builder()
                        .status(500)
                        .header("content-type", "application/json")
                        .body(Body::from(status.to_vec()))
                        .unwrap(),
                );
            }
        });
        let source = ClusterSource {
            client: Client::new(service, "default"),
            snapshot: ObjectRef::new("portcullis", "portcullis-snapshot"),
            keyring: ObjectRef::new("portcullis", "portcullis-master-keyring"),
            pepper: ObjectRef::new("portcullis", "portcullis-pepper"),
        };
        let (_, _, _, applier) = applier_under(Pepper::generate().unwrap());
        let (shutdown_tx, shutdown) = watch::channel(false);
        let task = tokio::spawn(source.run(applier, shutdown, watch::channel(None).0));
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        shutdown_tx.send_replace(true);
        task.await.unwrap();
        let calls = calls.load(std::sync::atomic::Ordering::SeqCst);
        // Each watch: its first call and about six retries in a minute (a fixed 0.5 s made 120).
        assert!((6..=30).contains(&calls), "{calls} calls in a minute");
    }

    #[test]
    fn refs_parse() {
        assert_eq!(parse_secret_ref("ns/snap").unwrap(), ObjectRef::new("ns", "snap"));
        for bad in ["snap", "/snap", "ns/", "a/b/c"] {
            assert!(parse_secret_ref(bad).is_err(), "{bad}");
        }
    }

    /// A snapshot whose one kill switch stops everything (or not).
    fn stop_everything(active: bool) -> portcullis_crds::snapshot::SnapshotContent {
        let switch = portcullis_crds::snapshot::KillSwitchEntry {
            switch: ObjectRef::new("ops", "stop"),
            scope: portcullis_crds::snapshot::SwitchScope::Global,
            active,
            reason: None,
            expires_at: None,
            tenant: None,
        };
        portcullis_crds::snapshot::SnapshotContent { kill_switches: vec![switch], ..Default::default() }
    }

    /// A keyring, the metrics and handle an applier reports to, and the applier (under `pepper`).
    fn applier_under(
        pepper: Pepper,
    ) -> (MasterKeyring, crate::metrics::Metrics, Arc<crate::snapshot::SnapshotHandle>, SnapshotApplier) {
        let keyring = MasterKeyring::generate(portcullis_crds::sealing::KeyId::new("k1").unwrap()).unwrap();
        let metrics = crate::metrics::Metrics::new().unwrap();
        let handle = Arc::new(crate::snapshot::SnapshotHandle::default());
        let applier = SnapshotApplier::new(handle.clone(), metrics.clone(), keyring.clone(), pepper);
        (keyring, metrics, handle, applier)
    }

    #[test]
    fn a_snapshot_swapped_out_under_a_request_is_freed_by_the_applier_not_the_request() {
        let (keyring, _, handle, mut applier) = applier_under(Pepper::generate().unwrap());
        let first = GatewaySnapshot::new(stop_everything(false), None).tag(&keyring).unwrap();
        assert!(applier.apply(first.clone()));
        let in_flight = handle.load().unwrap();
        let first_runtime = Arc::downgrade(&in_flight);

        let second = GatewaySnapshot::new(stop_everything(true), Some(&first)).tag(&keyring).unwrap();
        assert!(applier.apply(second.clone()));
        assert_eq!(handle.load().map(|s| s.generation), Some(2));
        assert!(applier.holds_retired() && !applier.can_reap(), "a request still holds generation 1");
        drop(in_flight);
        assert!(first_runtime.upgrade().is_some(), "the request's end did not free it");
        assert!(applier.can_reap());
        assert_eq!(applier.reap(), 1);
        assert!(first_runtime.upgrade().is_none() && !applier.holds_retired());

        // Nothing in flight at the swap: the applier frees the old snapshot at once.
        let third = GatewaySnapshot::new(stop_everything(false), Some(&second)).tag(&keyring).unwrap();
        let second_runtime = Arc::downgrade(&handle.load().unwrap());
        assert!(applier.apply(third));
        assert!(second_runtime.upgrade().is_none() && !applier.holds_retired());
        // What the applier keeps of the applied snapshot holds no kill switches (nor keys): they
        // moved into the serving snapshot, which is not copied for it.
        assert!(applier.last_applied().is_some_and(|kept| kept.content.kill_switches.is_empty()));
        assert_eq!(handle.load().map(|s| s.kill_switches.len()), Some(1));
    }

    #[test]
    fn an_invalid_snapshot_is_rejected_and_the_last_good_keeps_serving() {
        let (keyring, metrics, handle, mut applier) = applier_under(Pepper::generate().unwrap());
        let good = GatewaySnapshot::new(Default::default(), None).tag(&keyring).unwrap();
        offer(&mut applier, &secret(SNAPSHOT_SECRET_KEY, &good.to_json()));
        assert_eq!(metrics.snapshot_generation.get(), 1);
        assert_eq!(metrics.snapshot_valid.get(), 1);
        offer(&mut applier, &secret(SNAPSHOT_SECRET_KEY, b"{not json"));
        offer(&mut applier, &secret("other", b"{}"));
        // Well formed, with a right digest and a newer generation, but not tagged by a holder
        // of the master key (or tagged by another one): refused before anything in it is used.
        let mut forged = GatewaySnapshot::new(stop_everything(true), Some(&good));
        forged.generation = 7;
        offer(&mut applier, &secret(SNAPSHOT_SECRET_KEY, &forged.to_json()));
        let stranger = MasterKeyring::generate(portcullis_crds::sealing::KeyId::new("k1").unwrap()).unwrap();
        let foreign = forged.clone().tag(&stranger).unwrap();
        offer(&mut applier, &secret(SNAPSHOT_SECRET_KEY, &foreign.to_json()));
        assert_eq!(metrics.snapshot_valid.get(), 0);
        assert_eq!(metrics.snapshot_reload_failures.get(), 4);
        assert_eq!(applier.last_applied().map(|s| s.generation), Some(1));
        assert_eq!(handle.load().map(|s| s.generation), Some(1));
    }

    /// What the operator writes: the snapshot gzipped under its own key. A broken gzip stream is
    /// refused like any invalid snapshot.
    #[test]
    fn a_gzipped_snapshot_is_applied() {
        let (keyring, metrics, handle, mut applier) = applier_under(Pepper::generate().unwrap());
        let good = GatewaySnapshot::new(Default::default(), None).tag(&keyring).unwrap();
        offer(&mut applier, &secret(SNAPSHOT_SECRET_GZIP_KEY, &good.to_secret_data()));
        assert_eq!((metrics.snapshot_generation.get(), metrics.snapshot_valid.get()), (1, 1));
        let next = GatewaySnapshot::new(stop_everything(true), Some(&good)).tag(&keyring).unwrap();
        let mut broken = next.to_secret_data();
        broken.truncate(broken.len() - 8);
        offer(&mut applier, &secret(SNAPSHOT_SECRET_GZIP_KEY, &broken));
        assert_eq!(metrics.snapshot_valid.get(), 0);
        assert_eq!(handle.load().map(|s| s.generation), Some(1));
        offer(&mut applier, &secret(SNAPSHOT_SECRET_GZIP_KEY, &next.to_secret_data()));
        assert_eq!((metrics.snapshot_generation.get(), metrics.snapshot_valid.get()), (2, 1));
        assert_eq!(handle.load().map(|s| s.generation), Some(2));
    }

    /// Promise 4: a tagged snapshot at the applied generation (or an older one) with other
    /// content is a replay, e.g. of one from before a key was revoked: refused, and the revocation
    /// keeps serving. The same snapshot again is no change.
    #[test]
    fn other_content_at_the_applied_generation_is_a_replay_and_refused() {
        let (keyring, metrics, handle, mut applier) = applier_under(Pepper::generate().unwrap());
        let open = GatewaySnapshot::new(stop_everything(false), None).tag(&keyring).unwrap();
        let stopped = GatewaySnapshot::new(stop_everything(true), Some(&open)).tag(&keyring).unwrap();
        offer(&mut applier, &secret(SNAPSHOT_SECRET_KEY, &stopped.to_json()));
        assert_eq!(handle.load().map(|s| s.generation), Some(2));

        let mut replay = open.clone();
        replay.generation = 2;
        let replay = replay.tag(&keyring).unwrap();
        for replayed in [&replay, &open] {
            offer(&mut applier, &secret(SNAPSHOT_SECRET_KEY, &replayed.to_json()));
            assert_eq!(metrics.snapshot_valid.get(), 0);
            assert_eq!(
                applier.last_applied().map(|s| s.content_digest.as_str()),
                Some(stopped.content_digest.as_str())
            );
            let serving = handle.load().unwrap();
            assert!(serving.kill_switches.iter().any(|s| s.active), "the switch stays engaged");
        }
        offer(&mut applier, &secret(SNAPSHOT_SECRET_KEY, &stopped.to_json()));
        assert_eq!(metrics.snapshot_valid.get(), 1, "the applied one again is no change");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn snapshots_are_opened_off_the_async_workers_and_the_applier_comes_back() {
        let (keyring, metrics, handle, applier) = applier_under(Pepper::generate().unwrap());

        // While the work runs, this (single-threaded) runtime keeps serving its other tasks: the
        // work waits for one of them, which could never run if the work held the runtime's thread.
        let (tx, rx) = std::sync::mpsc::channel();
        let other_task = tokio::spawn(async move { tx.send(()).is_ok() });
        let (applier, waited) =
            off_workers(applier, move |_| rx.recv_timeout(std::time::Duration::from_secs(10))).await.unwrap();
        assert!(waited.is_ok(), "the runtime stood still while the work ran");
        assert!(other_task.await.unwrap());

        let good = GatewaySnapshot::new(Default::default(), None).tag(&keyring).unwrap();
        let (applier, kept) = offer_off_workers(applier, secret(SNAPSHOT_SECRET_KEY, &good.to_json())).await.unwrap();
        assert_eq!(handle.load().map(|s| s.generation), Some(1));
        assert_eq!(metrics.snapshot_valid.get(), 1);
        assert_eq!(applier.last_applied().map(|s| s.generation), Some(1));
        assert_eq!(
            data(&kept, SNAPSHOT_SECRET_KEY),
            Some(good.to_json().as_slice()),
            "the Secret comes back as it was"
        );

        // A panic while applying (a bug) loses the applier, not the snapshot being served.
        assert!(off_workers(applier, |_| -> () { panic!("a bug") }).await.is_none());
        assert_eq!(handle.load().map(|s| s.generation), Some(1));
    }

    /// The operator made a new pepper (its Secret was recreated) and wrote a snapshot under it.
    /// When the snapshot's watch event comes first, opened under the old pepper every key would
    /// be refused: it is refused instead, the last good snapshot serves, and the pepper's event
    /// applies it. When the pepper's comes first, snapshots still made under the old pepper open
    /// under it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_snapshot_opens_under_the_pepper_it_names_whichever_event_comes_first() {
        let (old, new) = (Pepper::generate().unwrap(), Pepper::generate().unwrap());
        let (keyring, metrics, handle, mut applier) = applier_under(old.clone());
        let under = |pepper: &Pepper, previous: Option<&GatewaySnapshot>| {
            let content = portcullis_crds::snapshot::SnapshotContent {
                pepper_id: Some(pepper.id()),
                ..stop_everything(previous.is_some())
            };
            GatewaySnapshot::new(content, previous).tag(&keyring).unwrap()
        };
        let first = under(&old, None);
        assert!(applier.apply(first.clone()));

        let second = under(&new, Some(&first));
        let (applier, kept) = offer_off_workers(applier, secret(SNAPSHOT_SECRET_KEY, &second.to_json())).await.unwrap();
        assert_eq!(handle.load().map(|s| s.generation), Some(1), "refused under the old pepper");
        assert_eq!(metrics.snapshot_valid.get(), 0);

        // The keyring's event (same keys) re-offers it, still refused; the pepper's applies it.
        let mut latest = Some(kept);
        let applier = rekey(applier, &keyring, &old, &mut latest).await.unwrap();
        assert_eq!(handle.load().map(|s| s.generation), Some(1));
        let applier = rekey(applier, &keyring, &new, &mut latest).await.unwrap();
        assert_eq!(handle.load().map(|s| s.generation), Some(2));
        assert_eq!(metrics.snapshot_valid.get(), 1);
        assert_eq!(applier.pepper(), &new);
        assert!(latest.is_some(), "the Secret is kept for the next change of key material");

        // The other order: the pepper changes first while the operator still digests under the
        // old one (it reads its pepper when it starts). Its snapshots open under the old pepper.
        let third = under(&old, Some(&second));
        let (mut applier, _) = offer_off_workers(applier, secret(SNAPSHOT_SECRET_KEY, &third.to_json())).await.unwrap();
        assert_eq!(handle.load().map(|s| s.generation), Some(3));
        // A third pepper pushes the oldest out: a snapshot under it is refused.
        let newest = Pepper::generate().unwrap();
        applier.set_key_material(keyring.clone(), newest);
        let content =
            portcullis_crds::snapshot::SnapshotContent { pepper_id: Some(old.id()), ..stop_everything(false) };
        let fourth = GatewaySnapshot::new(content, Some(&third)).tag(&keyring).unwrap();
        assert!(!applier.apply(fourth));
        assert_eq!(handle.load().map(|s| s.generation), Some(3));
    }

    #[test]
    fn key_material_parses_from_the_operator_formats() {
        let pepper = Pepper::generate().unwrap();
        let read = pepper_of(&secret(PEPPER_SECRET_KEY, pepper.expose())).unwrap();
        assert_eq!(read, pepper);
        assert!(pepper_of(&secret(PEPPER_SECRET_KEY, b"short")).is_err());
    }
}
