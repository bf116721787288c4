//! What the mocked-API-server tests share: a tower-test API server that records every call, and
//! an operator `Context` around it with fixed keys, pepper and clock.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use http::{Request, Response};
use k8s_openapi::api::core::v1::Secret;
use kube::client::Body;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, store::Writer};
use kube::Client;
use portcullis_crds::digest::Pepper;
use portcullis_crds::sealing::{KeyId, MasterKey, MasterKeyring};
use portcullis_crds::secret::SecretBytes;
use portcullis_crds::snapshot::GatewaySnapshot;
use portcullis_crds::v1alpha1::{ApiKey, KillSwitch, ProviderCredential};
use portcullis_operator::cluster::acknowledgement::Acknowledgements;
use portcullis_operator::cluster::audit::Audit;
use portcullis_operator::cluster::context::{
    Backoff, Context, Guarded, Listings, Retrigger, Settings, SnapshotState, Stores,
};
use portcullis_operator::cluster::metrics::Metrics;
use serde_json::Value;

/// One API call as the operator made it.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub body: Value,
}

impl Call {
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// Answers an API call: status and JSON body.
pub type Responder = Arc<dyn Fn(&Call) -> (u16, Value) + Send + Sync>;

/// The mocked API server: every call is recorded, then answered by `respond`.
pub struct ApiServer {
    pub client: Client,
    pub calls: Arc<Mutex<Vec<Call>>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    pub fn start(respond: Responder) -> Self {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let recorded = calls.clone();
        let task = tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().to_string();
                let path = request.uri().path().to_owned();
                let bytes = http_body_util::BodyExt::collect(request.into_body())
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let call = Call { method, path, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
                let (status, answer) = respond(&call);
                recorded.lock().unwrap().push(call);
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap();
                send.send_response(response);
            }
        });
        Self { client: Client::new(service, "default"), calls, task }
    }

    /// The calls made since the last `take`.
    pub fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

pub fn now() -> DateTime<Utc> {
    "2025-03-01T12:00:00Z".parse().unwrap()
}

pub fn pepper() -> Pepper {
    Pepper::new(SecretBytes::from_slice(&[5u8; 32])).unwrap()
}

pub fn keyring() -> MasterKeyring {
    let mut keys = std::collections::BTreeMap::new();
    keys.insert(KeyId::new("k1").unwrap(), MasterKey::from_bytes(&[1u8; 32]).unwrap());
    MasterKeyring::new(KeyId::new("k1").unwrap(), keys).unwrap()
}

/// The writers behind empty operator stores: tests feed objects through them as watchers would.
pub struct Feeds {
    pub api_keys: Writer<Guarded<ApiKey>>,
    pub credentials: Writer<Guarded<ProviderCredential>>,
    pub kill_switches: Writer<Guarded<KillSwitch>>,
    /// Secret metadata, as the metadata-only Secret watch delivers it.
    pub secrets: Writer<PartialObjectMeta<Secret>>,
}

/// Empty stores for a `Context`, and the writers that fill them.
pub fn stores() -> (Stores, Feeds) {
    let (mut stores, feeds) = unlisted_stores();
    stores.listings = Arc::new(Listings::all_listed());
    (stores, feeds)
}

/// Stores whose first listings have not come in yet (`stores.listings` flags them): nothing is
/// written from them until they have.
pub fn unlisted_stores() -> (Stores, Feeds) {
    let (api_keys, api_keys_feed) = reflector::store();
    let (credentials, credentials_feed) = reflector::store();
    let (kill_switches, kill_switches_feed) = reflector::store();
    let (secrets, secrets_feed) = reflector::store();
    let feeds = Feeds {
        api_keys: api_keys_feed,
        credentials: credentials_feed,
        kill_switches: kill_switches_feed,
        secrets: secrets_feed,
    };
    let listings = Arc::new(Listings::default());
    (Stores { api_keys, credentials, kill_switches, secrets, listings }, feeds)
}

/// The operator's context, leading, in namespace `portcullis`, with the fixed keys and clock.
pub fn context(
    client: Client,
    stores: Stores,
    metrics: Arc<Metrics>,
    previous: Option<GatewaySnapshot>,
    audit: Option<Arc<Audit>>,
    acknowledgements: Acknowledgements,
) -> Arc<Context> {
    Arc::new(Context {
        client,
        settings: Settings {
            namespace: "portcullis".into(),
            snapshot_secret: "portcullis-snapshot".into(),
            keyring_secret: "portcullis-master-keyring".into(),
            pepper_secret: "portcullis-pepper".into(),
            reveal_ttl: chrono::Duration::hours(1),
            resync: Duration::from_secs(300),
            tenancy: portcullis_operator::Tenancy::platform(["portcullis"]),
        },
        stores,
        pepper: pepper(),
        keyring: Mutex::new(keyring()),
        metrics,
        recorder: None,
        clock: Arc::new(now),
        leading: Arc::new(AtomicBool::new(true)),
        snapshot: tokio::sync::Mutex::new(SnapshotState { previous, excluded: Default::default() }),
        snapshot_trigger: Arc::new(tokio::sync::Notify::new()),
        snapshot_check: Default::default(),
        retrigger: Retrigger::default(),
        backoff: Backoff::default(),
        audit,
        checkpoint_trigger: tokio::sync::Notify::new(),
        acknowledgements,
        secret_values: Default::default(),
    })
}
