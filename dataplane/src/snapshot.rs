//! The snapshot as the data plane serves it: provider keys opened into memory, key digests and
//! models indexed, all behind one `SnapshotHandle` that swaps atomically.
//!
//! A request loads the current `Arc<RuntimeSnapshot>` once and keeps it to the end, streams
//! included, so a reload never changes the rules under a request in flight.

use std::collections::HashMap;

/// Maps built from configuration and read per request: seeded, and much cheaper to hash
/// than SipHash.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use chrono::{DateTime, Utc};
use portcullis_crds::digest::{is_well_formed_key, KeyDigest, Pepper};
use portcullis_crds::pattern;
use portcullis_crds::sealing::{MasterKeyring, SealingError};
use portcullis_crds::secret::SecretBytes;
use portcullis_crds::snapshot::{ApiKeyEntry, GatewaySnapshot, KillSwitchEntry, SnapshotError};
use portcullis_crds::v1alpha1::{ObjectRef, ProviderKind};

use crate::limits::{KeyLimits, SubjectLimits};

/// A provider endpoint with its key in memory (zeroized when the last snapshot using it drops).
pub struct Upstream {
    pub id: ObjectRef,
    /// `namespace/name`, the provider's identity in logs and metrics.
    pub label: String,
    pub kind: ProviderKind,
    pub base_url: String,
    /// `base_url` parsed once: where to connect and the path of each route. `None` for the
    /// mock provider (and for a URL the operator would have refused).
    pub endpoint: Option<crate::upstream::Endpoint>,
    pub azure_api_version: Option<String>,
    pub priority: i32,
    pub weight: u32,
    /// The only namespace whose ApiKeys this provider serves, when it is a tenant's own.
    pub tenant: Option<String>,
    credential: Option<CredentialHeader>,
}

/// The header that carries a provider's key, name and whole value (`Bearer sk-...` for OpenAI),
/// built once when the snapshot is opened instead of in a buffer per request; zeroized when the
/// last snapshot using it drops, as the key was.
pub struct CredentialHeader {
    pub name: &'static [u8],
    pub value: SecretBytes,
}

impl fmt::Debug for CredentialHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialHeader")
            .field("name", &String::from_utf8_lossy(self.name))
            .field("value", &self.value)
            .finish()
    }
}

impl CredentialHeader {
    fn new(kind: ProviderKind, key: SecretBytes) -> Option<Self> {
        let (name, prefix): (&'static [u8], &[u8]) = match kind {
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => (b"authorization", b"Bearer "),
            ProviderKind::Anthropic => (b"x-api-key", b""),
            ProviderKind::AzureOpenAi => (b"api-key", b""),
            ProviderKind::Mock => return None,
        };
        if prefix.is_empty() {
            return Some(Self { name, value: key });
        }
        let mut value = Vec::with_capacity(prefix.len() + key.expose().len());
        value.extend_from_slice(prefix);
        value.extend_from_slice(key.expose());
        Some(Self { name, value: SecretBytes::new(value) })
    }
}

impl Upstream {
    /// Whether requests of `key` may be routed here.
    pub fn serves(&self, key: &ApiKeyEntry) -> bool {
        portcullis_crds::snapshot::reaches(self.tenant.as_deref(), &key.key.namespace)
    }

    /// The provider key's header, if this provider takes one.
    pub fn credential(&self) -> Option<&CredentialHeader> {
        self.credential.as_ref()
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("id", &self.label)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("credential", &self.credential)
            .finish()
    }
}

/// One way to serve a model. Every request's access record keeps a clone: one reference count.
#[derive(Clone, Debug)]
pub struct ModelRoute(Arc<RouteData>);

#[derive(Debug)]
pub struct RouteData {
    pub upstream: Arc<Upstream>,
    /// The model name or pattern as declared; the metric label for this route.
    pub declared: Arc<str>,
    /// Name to send upstream instead of the requested one.
    pub upstream_model: Option<Arc<str>>,
    /// This route's metric series, per API route, filled on first use.
    pub metrics: [std::sync::OnceLock<crate::metrics::RouteMetrics>; 6],
}

impl std::ops::Deref for ModelRoute {
    type Target = RouteData;

    fn deref(&self) -> &RouteData {
        &self.0
    }
}

/// What a presented key grants.
#[derive(Clone, Debug)]
pub struct KeyGrant {
    pub policy: Arc<ApiKeyEntry>,
    /// The counters the key's requests count against; `None` when nothing limits it.
    pub limits: Option<Arc<KeyLimits>>,
    /// Set while this digest is the old half of a rotation.
    pub valid_until: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("ProviderCredential {credential}: sealed key cannot be opened: {source}")]
    Unseal { credential: ObjectRef, source: SealingError },
    #[error("ProviderCredential {credential}: kind {kind} needs a key and the snapshot has none")]
    MissingKey { credential: ObjectRef, kind: ProviderKind },
    #[error(transparent)]
    Tag(#[from] SnapshotError),
    #[error(
        "the snapshot's key digests were made under pepper {snapshot}, this data plane holds pepper {held}: \
         check --pepper-secret (or --pepper-file); the snapshot is applied once the pepper matches"
    )]
    PepperMismatch { snapshot: String, held: String },
}

pub struct RuntimeSnapshot {
    pub generation: u64,
    pub content_digest: String,
    pepper: Pepper,
    keys: FastMap<KeyDigest, KeyGrant>,
    exact_models: FastMap<String, Vec<ModelRoute>>,
    glob_models: Vec<ModelRoute>,
    pub kill_switches: Vec<KillSwitchEntry>,
    /// Every ApiKey once, in the snapshot's order (by identity); a rotating key has two
    /// digests in `keys`.
    pub policies: Vec<Arc<ApiKeyEntry>>,
    pub api_key_count: usize,
    pub upstream_count: usize,
}

impl fmt::Debug for RuntimeSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeSnapshot")
            .field("generation", &self.generation)
            .field("api_keys", &self.api_key_count)
            .field("upstreams", &self.upstream_count)
            .finish_non_exhaustive()
    }
}

impl RuntimeSnapshot {
    /// Opens every sealed key. Any failure rejects the whole snapshot and leaves it as it was.
    /// Once opened, its API keys and kill switches have moved into what is returned (10,000
    /// keys are not copied); its header and credentials stay in `snapshot`.
    pub fn open(snapshot: &mut GatewaySnapshot, keyring: &MasterKeyring, pepper: &Pepper) -> Result<Self, OpenError> {
        // Whoever wrote it held a master key: nothing in it is used before this holds.
        snapshot.verify_tag(keyring)?;
        let content = &snapshot.content;
        // Under another pepper every presented key would digest to nothing known: refuse the
        // snapshot (the last good one keeps serving) rather than answer every key with 401.
        if let Some(id) = &content.pepper_id {
            let held = pepper.id();
            if *id != held {
                return Err(OpenError::PepperMismatch { snapshot: id.clone(), held });
            }
        }
        let mut exact_models: FastMap<String, Vec<ModelRoute>> = FastMap::default();
        let mut glob_models = Vec::new();
        for entry in &content.credentials {
            let api_key = match (&entry.sealed_key, entry.kind.needs_secret()) {
                (Some(sealed), _) => Some(
                    keyring
                        .open(&entry.binding(), sealed)
                        .map_err(|source| OpenError::Unseal { credential: entry.credential.clone(), source })?,
                ),
                (None, true) => {
                    return Err(OpenError::MissingKey { credential: entry.credential.clone(), kind: entry.kind })
                }
                (None, false) => None,
            };
            let upstream = Arc::new(Upstream {
                id: entry.credential.clone(),
                label: entry.credential.to_string(),
                kind: entry.kind,
                base_url: entry.base_url.clone(),
                endpoint: crate::upstream::Endpoint::parse(&entry.base_url),
                azure_api_version: entry.azure_api_version.clone(),
                priority: entry.priority,
                weight: entry.weight,
                tenant: entry.tenant.clone(),
                credential: api_key.and_then(|key| CredentialHeader::new(entry.kind, key)),
            });
            for model in &entry.models {
                let route = ModelRoute(Arc::new(RouteData {
                    upstream: upstream.clone(),
                    declared: Arc::from(model.name.as_str()),
                    upstream_model: model.upstream_name.as_deref().map(Arc::from),
                    metrics: Default::default(),
                }));
                if pattern::is_glob(&model.name) {
                    glob_models.push(route);
                } else {
                    exact_models.entry(model.name.clone()).or_default().push(route);
                }
            }
        }

        // Nothing fails from here on.
        let api_keys = std::mem::take(&mut snapshot.content.api_keys);
        let mut keys =
            FastMap::with_capacity_and_hasher(api_keys.iter().map(|k| k.digests.len()).sum(), Default::default());
        // Team limits by (namespace, team): the strictest any of the team's keys declares.
        let mut team_limits: HashMap<(&str, &str), SubjectLimits> = HashMap::new();
        for entry in &api_keys {
            if let (Some(team), Some(limits)) = (&entry.team, &entry.team_limits) {
                let merged = team_limits.entry((entry.key.namespace.as_str(), team.as_str())).or_default();
                let strictest = |a: Option<u64>, b: Option<u64>| match (a, b) {
                    (Some(x), Some(y)) => Some(x.min(y)),
                    (x, y) => x.or(y),
                };
                merged.requests_per_minute = strictest(merged.requests_per_minute, limits.requests_per_minute);
                merged.tokens_per_minute = strictest(merged.tokens_per_minute, limits.tokens_per_minute);
            }
        }
        let team_limits: Vec<_> = api_keys
            .iter()
            .map(|entry| {
                entry
                    .team
                    .as_ref()
                    .and_then(|team| team_limits.get(&(entry.key.namespace.as_str(), team.as_str())).copied())
            })
            .collect();

        let api_key_count = api_keys.len();
        let mut policies = Vec::with_capacity(api_key_count);
        for (entry, team) in api_keys.into_iter().zip(team_limits) {
            let limits = KeyLimits::new(&entry, team).map(Arc::new);
            let policy = Arc::new(entry);
            for issued in &policy.digests {
                keys.insert(
                    issued.digest,
                    KeyGrant { policy: policy.clone(), limits: limits.clone(), valid_until: issued.valid_until },
                );
            }
            policies.push(policy);
        }

        Ok(Self {
            generation: snapshot.generation,
            content_digest: snapshot.content_digest.clone(),
            pepper: pepper.clone(),
            keys,
            exact_models,
            glob_models,
            kill_switches: std::mem::take(&mut snapshot.content.kill_switches),
            policies,
            api_key_count,
            upstream_count: snapshot.content.credentials.len(),
        })
    }

    /// The grant for a presented key, if any. Malformed keys are refused before hashing.
    pub fn lookup_key(&self, presented: &[u8]) -> Option<&KeyGrant> {
        if !is_well_formed_key(presented) {
            return None;
        }
        self.keys.get(&self.pepper.digest(presented))
    }

    /// Every route that serves `model`: exact declarations first, then matching patterns.
    pub fn routes_for<'s, 'm>(&'s self, model: &'m str) -> impl Iterator<Item = &'s ModelRoute> + use<'s, 'm> {
        let exact = self.exact_models.get(model).map_or(&[][..], Vec::as_slice);
        exact.iter().chain(self.glob_models.iter().filter(move |r| pattern::matches(&r.declared, model)))
    }

    /// Concrete model names (patterns excluded) with the routes that serve them.
    pub fn listed_models(&self) -> impl Iterator<Item = (&str, &[ModelRoute])> {
        self.exact_models.iter().map(|(name, routes)| (name.as_str(), routes.as_slice()))
    }
}

/// The one cheap handle every request reads the current snapshot through.
#[derive(Debug)]
pub struct SnapshotHandle {
    current: ArcSwapOption<RuntimeSnapshot>,
    /// The applied generation, for open streams that must re-check their scope on a change.
    applied: tokio::sync::watch::Sender<u64>,
}

impl Default for SnapshotHandle {
    fn default() -> Self {
        Self { current: ArcSwapOption::empty(), applied: tokio::sync::watch::channel(0).0 }
    }
}

impl SnapshotHandle {
    pub fn load(&self) -> Option<Arc<RuntimeSnapshot>> {
        self.current.load_full()
    }

    /// Swaps `snapshot` in; returns the one it replaces.
    pub fn store(&self, snapshot: Arc<RuntimeSnapshot>) -> Option<Arc<RuntimeSnapshot>> {
        let generation = snapshot.generation;
        let previous = self.current.swap(Some(snapshot));
        self.applied.send_replace(generation);
        previous
    }

    /// Notified after every swap.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    pub fn is_loaded(&self) -> bool {
        self.current.load().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_crds::sealing::KeyId;
    use portcullis_crds::snapshot::SnapshotContent;

    #[test]
    fn each_provider_kind_gets_its_credential_header_and_debug_hides_it() {
        let key = || SecretBytes::from_slice(b"sk-CANARY-credential-42");
        let cases = [
            (ProviderKind::OpenAi, Some((&b"authorization"[..], &b"Bearer sk-CANARY-credential-42"[..]))),
            (ProviderKind::OpenAiCompatible, Some((&b"authorization"[..], &b"Bearer sk-CANARY-credential-42"[..]))),
            (ProviderKind::Anthropic, Some((&b"x-api-key"[..], &b"sk-CANARY-credential-42"[..]))),
            (ProviderKind::AzureOpenAi, Some((&b"api-key"[..], &b"sk-CANARY-credential-42"[..]))),
            (ProviderKind::Mock, None),
        ];
        for (kind, expected) in cases {
            let header = CredentialHeader::new(kind, key());
            assert_eq!(header.as_ref().map(|h| (h.name, h.value.expose())), expected, "{kind:?}");
            assert!(!format!("{header:?}").contains("CANARY"), "{header:?}");
        }
    }

    const KEYS: [&str; 3] = [
        "pcl_snapshot_test_key_a_0123456789abcdef",
        "pcl_snapshot_test_key_b_0123456789abcdef",
        "pcl_snapshot_test_key_c_0123456789abcdef",
    ];

    /// Keys `a` and `b` in team `red` declaring different team limits, `c` without any limits.
    fn opened(pepper: &Pepper) -> RuntimeSnapshot {
        let keyring = MasterKeyring::generate(KeyId::new("k1").expect("id")).expect("keyring");
        RuntimeSnapshot::open(&mut teams_snapshot(pepper, &keyring), &keyring, pepper).expect("open")
    }

    /// The snapshot [`opened`] opens, its digests and pepper id made under `pepper`.
    fn teams_snapshot(pepper: &Pepper, keyring: &MasterKeyring) -> GatewaySnapshot {
        let entry = |name: &str, key: &str, extra: serde_json::Value| {
            let mut value = serde_json::json!({
                "key": {"namespace": "apps", "name": name},
                "digests": [{"digest": pepper.digest(key.as_bytes())}],
            });
            if let (Some(value), serde_json::Value::Object(extra)) = (value.as_object_mut(), extra) {
                value.extend(extra);
            }
            serde_json::from_value::<ApiKeyEntry>(value).expect("entry")
        };
        let content = SnapshotContent {
            api_keys: vec![
                entry(
                    "a",
                    KEYS[0],
                    serde_json::json!({"team": "red", "limits": {"requestsPerMinute": 10},
                        "teamLimits": {"requestsPerMinute": 100, "tokensPerMinute": 5000}}),
                ),
                entry("b", KEYS[1], serde_json::json!({"team": "red", "teamLimits": {"requestsPerMinute": 40}})),
                entry("c", KEYS[2], serde_json::json!({})),
            ],
            credentials: Vec::new(),
            kill_switches: Vec::new(),
            pepper_id: Some(pepper.id()),
        };
        GatewaySnapshot::new(content, None).tag(keyring).expect("tag")
    }

    #[test]
    fn a_snapshot_made_under_another_pepper_is_refused_and_one_without_an_id_opens() {
        let keyring = MasterKeyring::generate(KeyId::new("k1").expect("id")).expect("keyring");
        let ours = Pepper::generate().expect("pepper");
        let theirs = Pepper::generate().expect("pepper");
        let mut snapshot = teams_snapshot(&theirs, &keyring);
        let written = snapshot.clone();
        match RuntimeSnapshot::open(&mut snapshot, &keyring, &ours) {
            Err(OpenError::PepperMismatch { snapshot, held }) => {
                assert_eq!((snapshot, held), (theirs.id(), ours.id()));
            }
            other => panic!("expected a pepper mismatch, got {other:?}"),
        }
        // Refused, it is left as it was; opened, its keys have moved into the opened snapshot.
        assert_eq!(snapshot, written);
        let opened = RuntimeSnapshot::open(&mut snapshot, &keyring, &theirs).expect("opens");
        assert!(opened.lookup_key(KEYS[0].as_bytes()).is_some());
        assert_eq!(opened.policies.len(), 3);
        assert!(opened.policies.iter().map(|p| &p.key).eq(written.content.api_keys.iter().map(|k| &k.key)));
        assert!(snapshot.content.api_keys.is_empty());
        // Written before the id existed: opened as before (its keys simply do not match).
        let mut content = written.content.clone();
        content.pepper_id = None;
        let mut untagged_id = GatewaySnapshot::new(content, None).tag(&keyring).expect("tag");
        let opened = RuntimeSnapshot::open(&mut untagged_id, &keyring, &ours).expect("opens");
        assert!(opened.lookup_key(KEYS[0].as_bytes()).is_none());
    }

    #[test]
    fn limit_subjects_are_built_once_with_the_strictest_team_limits() {
        let pepper = Pepper::generate().expect("pepper");
        let snapshot = opened(&pepper);
        let limits = |key: &str| snapshot.lookup_key(key.as_bytes()).expect("known key").limits.clone();

        let a = limits(KEYS[0]).expect("a is limited");
        assert_eq!(&*a.key.id, "apps/a");
        assert_eq!(a.key.limits.requests_per_minute, Some(10));
        let team = a.team.as_ref().expect("a's team");
        assert_eq!(&*team.id, "team:apps/red");
        assert_eq!((team.limits.requests_per_minute, team.limits.tokens_per_minute), (Some(40), Some(5000)));

        // `b` has no limits of its own but counts against the same team.
        let b = limits(KEYS[1]).expect("b is limited through its team");
        assert!(b.key.limits.is_empty());
        assert_eq!(b.team.as_ref().map(|t| (&*t.id, t.limits)), Some((&*team.id, team.limits)));

        assert!(limits(KEYS[2]).is_none(), "nothing limits c");
    }
}
