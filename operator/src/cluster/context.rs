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

    pub fn next(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.to_owned()).or_insert(0);
        let delay = Self::BASE.saturating_mul(1u32 << (*n).min(7));
        *n = n.saturating_add(1);
        delay.min(Self::MAX)
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
    pub snapshot_trigger: Notify,
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
