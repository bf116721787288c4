//! What every reconcile shares: the client, the caches, key material, the clock and the leader
//! flag.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use portcullis_crds::digest::Pepper;
use portcullis_crds::sealing::MasterKeyring;
use portcullis_crds::snapshot::GatewaySnapshot;
use portcullis_crds::v1alpha1::{ApiKey, KillSwitch, ProviderCredential};
use tokio::sync::{mpsc, Notify};

use super::secret_values::{HeldSecret, SecretValues};
use crate::assemble::ObjectKey;
use crate::compile::CompileError;
use crate::error::Error;

/// Where the operator keeps its own Secrets and how long reveals live.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The operator's namespace: snapshot, keyring, pepper and Lease live here.
    pub namespace: String,
    pub snapshot_secret: String,
    pub keyring_secret: String,
    pub pepper_secret: String,
    pub reveal_ttl: chrono::Duration,
    /// Reconcile every object at least this often.
    pub resync: Duration,
    /// Which namespaces' ProviderCredentials and KillSwitches reach every namespace's keys.
    pub tenancy: crate::inputs::Tenancy,
}

pub type Guarded<K> = DeserializeGuard<K>;

/// The controllers' caches.
#[derive(Clone)]
pub struct Stores {
    pub api_keys: Store<Guarded<ApiKey>>,
    pub credentials: Store<Guarded<ProviderCredential>>,
    pub kill_switches: Store<Guarded<KillSwitch>>,
    /// Every watched Secret's metadata; values are read on demand into [`Context::secret_values`].
    pub secrets: Store<PartialObjectMeta<Secret>>,
    /// Which of the four hold their first full listing.
    pub listings: Arc<Listings>,
}

impl Stores {
    /// Waits until every cache holds its first full listing (at once, after that). A snapshot
    /// compiled from a cache still filling leaves out what has not arrived: ApiKeys (their
    /// callers get 401) or an engaged KillSwitch (traffic flows again in an emergency), until the
    /// next write. Seen on a real API server: a new leader's first snapshot, written before its
    /// KillSwitch listing came in, held no kill switches.
    pub async fn listed(&self) {
        self.listings.wait().await;
    }
}

/// The caches the snapshot is compiled from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    ApiKeys,
    Credentials,
    KillSwitches,
    Secrets,
}

/// Which caches hold their first full listing, flagged by the streams that fill them once the
/// cache has taken the listing in ([`applied_and_listed`]).
///
/// Why not kube-runtime's `Store::wait_until_ready`: its future keeps one waker per store, and
/// each controller already waits on its own store, so a second waiter leaves one of the two
/// asleep for good. Seen on a real API server: no snapshot was ever written.
#[derive(Debug, Default)]
pub struct Listings {
    listed: [AtomicBool; 4],
    changed: Notify,
}

impl Listings {
    /// Every cache listed; for tests and for a process that fills its caches itself.
    pub fn all_listed() -> Self {
        let listings = Self::default();
        for cache in [Cache::ApiKeys, Cache::Credentials, Cache::KillSwitches, Cache::Secrets] {
            listings.mark(cache);
        }
        listings
    }

    pub fn mark(&self, cache: Cache) {
        self.listed[cache as usize].store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Notes a watch event of `cache`'s stream: an `InitDone` (a full listing taken in) marks it listed.
    pub fn saw<K>(&self, event: &kube::runtime::watcher::Event<K>, cache: Cache) {
        if matches!(event, kube::runtime::watcher::Event::InitDone) {
            self.mark(cache);
        }
    }

    pub fn is_listed(&self, cache: Cache) -> bool {
        self.listed[cache as usize].load(Ordering::SeqCst)
    }

    fn all(&self) -> bool {
        self.listed.iter().all(|flag| flag.load(Ordering::SeqCst))
    }

    pub async fn wait(&self) {
        loop {
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a mark in between is not missed.
            notified.as_mut().enable();
            if self.all() {
                return;
            }
            notified.await;
        }
    }
}

/// The objects a cache-filling stream (a `reflector`) applies, flagging `cache` in `listings`
/// when its first full listing is in: the reflector has swapped it into the cache by the time
/// its `InitDone` passes here.
///
/// What leaves the cache wakes `snapshot_trigger`, since no reconcile runs for it: a deletion,
/// and every listing's end (a relist drops what was deleted while the watch was down). Without
/// this, a deleted ApiKey or ProviderCredential stayed in the snapshot until the next resync.
pub fn applied_and_listed<K, S>(
    events: S,
    listings: Arc<Listings>,
    cache: Cache,
    snapshot_trigger: Arc<Notify>,
) -> impl futures_util::Stream<Item = Result<K, kube::runtime::watcher::Error>>
where
    S: futures_util::Stream<Item = Result<kube::runtime::watcher::Event<K>, kube::runtime::watcher::Error>>,
{
    use futures_util::StreamExt as _;
    use kube::runtime::watcher::Event;
    use kube::runtime::WatchStreamExt as _;
    events
        .inspect(move |event| {
            if let Ok(event) = event {
                listings.saw(event, cache);
                if matches!(event, Event::Delete(_) | Event::InitDone) {
                    snapshot_trigger.notify_one();
                }
            }
        })
        .applied_objects()
}

impl fmt::Debug for Stores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stores")
            .field("api_keys", &self.api_keys.len())
            .field("credentials", &self.credentials.len())
            .field("kill_switches", &self.kill_switches.len())
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

/// Asks a controller to reconcile objects again (e.g. after the snapshot changed their status).
#[derive(Debug, Clone, Default)]
pub struct Retrigger {
    pub api_keys: Option<mpsc::UnboundedSender<ObjectRef<Guarded<ApiKey>>>>,
    pub credentials: Option<mpsc::UnboundedSender<ObjectRef<Guarded<ProviderCredential>>>>,
    pub kill_switches: Option<mpsc::UnboundedSender<ObjectRef<Guarded<KillSwitch>>>>,
}

impl Retrigger {
    pub fn object(&self, key: &ObjectKey) {
        let (kind, object) = key;
        // A closed channel means the controller is shutting down; nothing to do.
        let _ = match *kind {
            "ApiKey" => {
                self.api_keys.as_ref().map(|tx| tx.send(ObjectRef::new(&object.name).within(&object.namespace)).is_ok())
            }
            "ProviderCredential" => self
                .credentials
                .as_ref()
                .map(|tx| tx.send(ObjectRef::new(&object.name).within(&object.namespace)).is_ok()),
            _ => self
                .kill_switches
                .as_ref()
                .map(|tx| tx.send(ObjectRef::new(&object.name).within(&object.namespace)).is_ok()),
        };
    }
}

/// What the snapshot writer last produced.
#[derive(Debug, Default)]
pub struct SnapshotState {
    pub previous: Option<GatewaySnapshot>,
    pub excluded: BTreeMap<ObjectKey, Vec<CompileError>>,
}

pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// Per-object exponential backoff for transient errors.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    pub const BASE: Duration = Duration::from_millis(500);
    pub const MAX: Duration = Duration::from_secs(60);

    /// [`Self::BASE`] doubled `n` times, at most [`Self::MAX`].
    pub fn delay(n: u32) -> Duration {
        Self::BASE.saturating_mul(1u32 << n.min(7)).min(Self::MAX)
    }

    pub fn next(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.to_owned()).or_insert(0);
        let delay = Self::delay(*n);
        *n = n.saturating_add(1);
        delay
    }

    pub fn reset(&self, key: &str) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub stores: Stores,
    pub pepper: Pepper,
    /// The last keyring that parsed; a broken keyring Secret never replaces it.
    pub keyring: Mutex<MasterKeyring>,
    pub metrics: Arc<super::metrics::Metrics>,
    pub recorder: Option<Recorder>,
    pub clock: Clock,
    pub leading: Arc<AtomicBool>,
    pub snapshot: tokio::sync::Mutex<SnapshotState>,
    /// Wakes the snapshot writer; shared with the caches' streams (see [`applied_and_listed`]).
    pub snapshot_trigger: Arc<Notify>,
    /// Set by the Secret watch when the snapshot Secret it shows is not the one last written
    /// (deleted, rolled back, edited): the writer's next run writes it again.
    pub snapshot_check: AtomicBool,
    pub retrigger: Retrigger,
    pub backoff: Backoff,
    /// The audit ledger, when `--ledger-file` is given.
    pub audit: Option<Arc<super::audit::Audit>>,
    /// Wakes the checkpoint publisher after an append.
    pub checkpoint_trigger: Notify,
    /// The data-plane replicas' reports, for the `Enforced` status.
    pub acknowledgements: super::acknowledgement::Acknowledgements,
    /// The values of the Secrets references need, read on demand.
    pub secret_values: SecretValues,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .field("stores", &self.stores)
            .field("leading", &self.leading.load(Ordering::Relaxed))
            .field("secret_values", &self.secret_values)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// Writes only while leading.
    pub fn ensure_leading(&self) -> Result<(), Error> {
        if self.leading.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Error::NotLeader)
        }
    }

    /// The watch's metadata of a Secret.
    pub fn secret_meta(&self, namespace: &str, name: &str) -> Option<Arc<PartialObjectMeta<Secret>>> {
        self.stores.secrets.get(&ObjectRef::new(name).within(namespace))
    }

    /// A Secret with its values: absent when the watch does not show it, read from the API
    /// server the first time it is needed at the version the watch shows, then kept.
    pub async fn secret(&self, namespace: &str, name: &str) -> Result<Option<Arc<HeldSecret>>, Error> {
        let Some(meta) = self.secret_meta(namespace, name) else {
            self.secret_values.forget(namespace, name);
            return Ok(None);
        };
        let seen = (meta.metadata.resource_version.as_deref(), meta.metadata.uid.as_deref());
        // The client is only built for a read: a value held answers without it.
        self.secret_values
            .read(namespace, name, seen, || async {
                let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
                api.get_opt(name).await.map_err(Error::read(format!("Secret {namespace}/{name}")))
            })
            .await
    }

    pub fn current_keyring(&self) -> MasterKeyring {
        self.keyring.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;
    use futures_util::StreamExt as _;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector::{self, reflector};
    use kube::runtime::watcher::Event;

    fn named(name: &str) -> ConfigMap {
        ConfigMap {
            metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
            ..Default::default()
        }
    }

    /// The flag goes up with the listing's end, and by then the cache holds the whole listing.
    #[tokio::test]
    async fn a_cache_is_flagged_listed_once_its_first_listing_is_in_it() {
        let (store, writer) = reflector::store::<ConfigMap>();
        let listings = Arc::new(Listings::default());
        let events = futures_util::stream::iter([
            Ok(Event::Init),
            Ok(Event::InitApply(named("a"))),
            Ok(Event::InitApply(named("b"))),
            Ok(Event::InitDone),
            Ok(Event::Apply(named("c"))),
        ]);
        let trigger = Arc::new(Notify::new());
        let objects =
            applied_and_listed(reflector(writer, events), listings.clone(), Cache::KillSwitches, trigger.clone());
        let mut objects = std::pin::pin!(objects);
        for name in ["a", "b"] {
            assert_eq!(objects.next().await.unwrap().unwrap().metadata.name.as_deref(), Some(name));
            assert!(!listings.is_listed(Cache::KillSwitches), "flagged before the listing ended");
            assert!(store.is_empty(), "the listing is taken in whole, at its end");
        }
        assert_eq!(objects.next().await.unwrap().unwrap().metadata.name.as_deref(), Some("c"));
        assert!(listings.is_listed(Cache::KillSwitches));
        assert!(!listings.is_listed(Cache::ApiKeys));
        assert_eq!(store.len(), 3);
    }

    /// No reconcile runs for what leaves a cache: a deletion and a listing's end (a relist
    /// drops what went while the watch was down) wake the snapshot writer themselves.
    #[tokio::test]
    async fn what_leaves_a_cache_wakes_the_snapshot_writer() {
        use futures_util::FutureExt as _;
        let (_store, writer) = reflector::store::<ConfigMap>();
        let trigger = Arc::new(Notify::new());
        let events = futures_util::stream::iter([
            Ok(Event::Init),
            Ok(Event::InitApply(named("a"))),
            Ok(Event::InitDone),
            Ok(Event::Apply(named("b"))),
            Ok(Event::Delete(named("a"))),
            Ok(Event::Apply(named("c"))),
            Ok(Event::Init),
            Ok(Event::InitApply(named("c"))),
            Ok(Event::InitDone),
        ]);
        let objects = applied_and_listed(
            reflector(writer, events),
            Arc::new(Listings::default()),
            Cache::ApiKeys,
            trigger.clone(),
        );
        let mut objects = std::pin::pin!(objects);
        let woken = || trigger.notified().now_or_never().is_some();
        // The first listing's end: what came in before it passes before it.
        assert_eq!(objects.next().await.unwrap().unwrap().metadata.name.as_deref(), Some("a"));
        assert!(!woken());
        assert_eq!(objects.next().await.unwrap().unwrap().metadata.name.as_deref(), Some("b"));
        assert!(woken(), "a listing's end");
        assert!(!woken(), "an applied object wakes nothing here (its reconcile does)");
        // `c` comes after the deletion of `a`.
        assert_eq!(objects.next().await.unwrap().unwrap().metadata.name.as_deref(), Some("c"));
        assert!(woken(), "a deletion");
        assert_eq!(objects.next().await.unwrap().unwrap().metadata.name.as_deref(), Some("c"));
        assert!(objects.next().await.is_none());
        assert!(woken(), "a relist's end");
    }

    #[tokio::test]
    async fn waiting_for_the_listings_ends_with_the_last_one_and_not_before() {
        let listings = Arc::new(Listings::default());
        let waiting = tokio::spawn({
            let listings = listings.clone();
            async move { listings.wait().await }
        });
        for cache in [Cache::ApiKeys, Cache::Credentials, Cache::Secrets] {
            listings.mark(cache);
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!waiting.is_finished());
        }
        listings.mark(Cache::KillSwitches);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
        // After that, at once.
        tokio::time::timeout(Duration::from_millis(100), listings.wait()).await.unwrap();
    }
}
