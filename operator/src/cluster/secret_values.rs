//! Secret values, read only when a reference needs them and kept only while they are needed.
//!
//! The operator watches the cluster's Secrets by metadata alone (name, version, owners,
//! annotations), so the values of Secrets nothing references never enter its memory. A value is
//! read with a GET the first time a reference needs it and kept, wiped on drop, until the watch
//! shows the Secret changed or went away, or until nothing references it any more.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use zeroize::Zeroize;

/// Annotation `kubectl apply` writes with the whole applied object, `data` included: it is
/// dropped from the metadata the operator keeps.
pub const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A Secret as read from the API server, its values wiped when the last holder drops it.
pub struct HeldSecret(Secret);

impl HeldSecret {
    pub fn new(secret: Secret) -> Self {
        Self(secret)
    }
}

impl Deref for HeldSecret {
    type Target = Secret;

    fn deref(&self) -> &Secret {
        &self.0
    }
}

impl Drop for HeldSecret {
    fn drop(&mut self) {
        for value in self.0.data.iter_mut().flat_map(BTreeMap::values_mut) {
            value.0.zeroize();
        }
        for value in self.0.string_data.iter_mut().flat_map(BTreeMap::values_mut) {
            value.zeroize();
        }
        if let Some(annotations) = self.0.metadata.annotations.as_mut() {
            if let Some(applied) = annotations.get_mut(LAST_APPLIED_ANNOTATION) {
                applied.zeroize();
            }
        }
    }
}

impl fmt::Debug for HeldSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldSecret")
            .field("namespace", &self.0.metadata.namespace)
            .field("name", &self.0.metadata.name)
            .field("resource_version", &self.0.metadata.resource_version)
            .field("keys", &self.0.data.iter().flat_map(BTreeMap::keys).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// What the metadata watch keeps of a Secret: its metadata without the annotation that can
/// carry the whole Secret.
pub fn strip_metadata(secret: &mut PartialObjectMeta<Secret>) {
    if let Some(annotations) = secret.metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED_ANNOTATION);
    }
}

type Key = (String, String);

fn key(namespace: &str, name: &str) -> Key {
    (namespace.to_owned(), name.to_owned())
}

struct Held {
    secret: Arc<HeldSecret>,
    /// The resource versions this read is current for: the one the watch showed when it was
    /// read, and the one the read returned (newer, when the watch lags behind).
    versions: [Option<String>; 2],
}

/// How many Secret values are read from the API server at once, whoever asks (a restart
/// reconciles every object and syncs the snapshot together).
pub const CONCURRENT_READS: usize = 16;

/// The values read so far, by namespace and name.
pub struct SecretValues {
    held: Mutex<HashMap<Key, Held>>,
    /// One read at a time per Secret: who waits finds the value the first read brought.
    pending: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    reads: tokio::sync::Semaphore,
    /// A read failed and the value read before was used instead (see [`SecretValues::read`]).
    stale_served: std::sync::atomic::AtomicBool,
}

impl Default for SecretValues {
    fn default() -> Self {
        Self {
            held: Mutex::default(),
            pending: Mutex::default(),
            reads: tokio::sync::Semaphore::new(CONCURRENT_READS),
            stale_served: Default::default(),
        }
    }
}

impl fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretValues").field("held", &self.len()).finish()
    }
}

impl SecretValues {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of a Secret the watch shows at `seen`: the one held if it was read at that
    /// version, else what `fetch` reads (`None`: the Secret is gone). Reads of one Secret are not
    /// repeated by concurrent callers, and at most [`CONCURRENT_READS`] run at once.
    ///
    /// A read that fails returns the value read before, at an older version, if one is held for
    /// the same object (`uid`, as the watch shows it: not one deleted and made again under the
    /// name): a Secret changed while the API server errs keeps its credential (and every other
    /// change) flowing into snapshots on its last value, instead of failing them all. With none
    /// held, the error is returned.
    pub async fn read<E, F>(
        &self,
        namespace: &str,
        name: &str,
        (seen, uid): (Option<&str>, Option<&str>),
        fetch: impl FnOnce() -> F,
    ) -> Result<Option<Arc<HeldSecret>>, E>
    where
        F: std::future::Future<Output = Result<Option<Secret>, E>>,
        E: fmt::Display,
    {
        if let Some(held) = self.current(namespace, name, seen) {
            return Ok(Some(held));
        }
        let entry_key = key(namespace, name);
        let gate = self.pending.lock().unwrap_or_else(|p| p.into_inner()).entry(entry_key.clone()).or_default().clone();
        let result = async {
            let _one = gate.lock().await;
            if let Some(held) = self.current(namespace, name, seen) {
                return Ok(Some(held));
            }
            // The semaphore is never closed; without a permit the read goes ahead regardless.
            let _permit = self.reads.acquire().await.ok();
            let fetched = match fetch().await {
                Ok(fetched) => fetched,
                Err(error) => {
                    let same = |held: &Arc<HeldSecret>| held.metadata.uid.as_deref() == uid;
                    let Some(held) = self.held(namespace, name).filter(same) else { return Err(error) };
                    tracing::warn!(namespace, name, %error, "reading a Secret failed; its last value read is used");
                    self.stale_served.store(true, std::sync::atomic::Ordering::SeqCst);
                    return Ok(Some(held));
                }
            };
            match fetched {
                Some(secret) => {
                    let held = Arc::new(HeldSecret::new(secret));
                    self.keep(seen, held.clone());
                    Ok(Some(held))
                }
                None => {
                    self.forget(namespace, name);
                    Ok(None)
                }
            }
        }
        .await;
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        // The map's and this caller's: nobody else is waiting on this Secret.
        if Arc::strong_count(&gate) == 2 {
            pending.remove(&entry_key);
        }
        result
    }

    /// Whether a value read before was used for a newer version since the last call: the
    /// snapshot writer then tries again soon instead of at the next resync, or a brought key
    /// replaced in its Secret while reads fail would keep working for as long as that.
    pub fn take_stale_served(&self) -> bool {
        self.stale_served.swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    /// The value held for a Secret the watch shows at `version`, if it was read at that version.
    pub fn current(&self, namespace: &str, name: &str, version: Option<&str>) -> Option<Arc<HeldSecret>> {
        let held = self.lock();
        let entry = held.get(&key(namespace, name))?;
        entry.versions.iter().any(|v| v.as_deref() == version).then(|| entry.secret.clone())
    }

    /// The value held for a Secret, whatever its version.
    fn held(&self, namespace: &str, name: &str) -> Option<Arc<HeldSecret>> {
        self.lock().get(&key(namespace, name)).map(|entry| entry.secret.clone())
    }

    /// Keeps a value read while the watch showed `seen`.
    pub fn keep(&self, seen: Option<&str>, secret: Arc<HeldSecret>) {
        let meta = &secret.metadata;
        let entry_key = key(meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default());
        let versions = [seen.map(str::to_owned), meta.resource_version.clone()];
        self.lock().insert(entry_key, Held { secret, versions });
    }

    pub fn forget(&self, namespace: &str, name: &str) {
        self.lock().remove(&key(namespace, name));
    }

    /// Drops every value `keep` does not name.
    pub fn retain(&self, mut keep: impl FnMut(&str, &str) -> bool) {
        self.lock().retain(|(namespace, name), _| keep(namespace, name));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::ByteString;

    fn secret(name: &str, version: &str, value: &[u8]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("key".to_owned(), ByteString(value.to_vec()))])),
            ..Default::default()
        }
    }

    #[test]
    fn a_value_is_current_for_the_versions_it_was_read_at() {
        let values = SecretValues::default();
        // Read while the watch still showed version 4; the read returned 5.
        values.keep(Some("4"), Arc::new(HeldSecret::new(secret("a", "5", b"v"))));
        assert!(values.current("ns", "a", Some("4")).is_some());
        assert!(values.current("ns", "a", Some("5")).is_some());
        assert!(values.current("ns", "a", Some("6")).is_none());
        assert!(values.current("ns", "b", Some("5")).is_none());

        values.keep(None, Arc::new(HeldSecret::new(secret("a", "7", b"v"))));
        values.keep(None, Arc::new(HeldSecret::new(secret("b", "1", b"v"))));
        values.retain(|_, name| name == "b");
        assert!(values.current("ns", "a", Some("7")).is_none());
        assert!(values.current("ns", "b", Some("1")).is_some());
        values.forget("ns", "b");
        assert!(values.is_empty());
    }

    #[tokio::test]
    async fn concurrent_reads_of_one_secret_fetch_it_once_and_reads_are_bounded() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let values = SecretValues::default();
        let fetches = AtomicUsize::new(0);
        let (now, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let fetch = |name: String| {
            let (fetches, now, most) = (&fetches, &now, &most);
            move || async move {
                fetches.fetch_add(1, Ordering::SeqCst);
                let running = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, String>(Some(secret(&name, "1", b"v")))
            }
        };
        let same = (0..10).map(|_| values.read("ns", "a", (Some("1"), None), fetch("a".into())));
        let read = futures_util::future::join_all(same).await;
        assert!(read.iter().all(|r| r.as_ref().unwrap().is_some()));
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert!(values.pending.lock().unwrap().is_empty());

        let names: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
        let many = names.iter().map(|n| values.read("ns", n, (Some("1"), None), fetch(n.clone())));
        futures_util::future::join_all(many).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 41);
        assert_eq!(most.load(Ordering::SeqCst), CONCURRENT_READS);
        assert_eq!(values.len(), 41);
        assert!(values.pending.lock().unwrap().is_empty());

        // A Secret gone by the time it is read is not held.
        let gone = values.read("ns", "s0", (Some("2"), None), || async { Ok::<_, String>(None) }).await;
        assert!(gone.unwrap().is_none());
        assert_eq!(values.len(), 40);
    }

    /// A failed read serves the last value only for the same object, not for one deleted and
    /// made again under the name.
    #[tokio::test]
    async fn a_failed_read_serves_the_last_value_of_the_same_object_only() {
        let values = SecretValues::default();
        let mut first = secret("a", "1", b"old");
        first.metadata.uid = Some("uid-1".into());
        values.keep(Some("1"), Arc::new(HeldSecret::new(first)));
        let failing = || async { Err::<Option<Secret>, String>("etcd unavailable".into()) };
        let same = values.read("ns", "a", (Some("2"), Some("uid-1")), failing).await.expect("served");
        assert_eq!(same.expect("held").metadata.uid.as_deref(), Some("uid-1"));
        let recreated = values.read("ns", "a", (Some("3"), Some("uid-2")), failing).await;
        assert_eq!(recreated.expect_err("not the same object"), "etcd unavailable");
    }

    #[test]
    fn debug_names_keys_never_values() {
        let canary = b"sk-held-canary-5f1e";
        let held = HeldSecret::new(secret("a", "1", canary));
        let shown = format!("{held:?} {:?}", SecretValues::default());
        assert!(shown.contains("key"), "{shown}");
        assert!(!shown.contains("sk-held-canary"), "{shown}");
    }

    #[test]
    fn the_metadata_kept_drops_the_last_applied_copy() {
        let mut meta = PartialObjectMeta::<Secret> {
            metadata: ObjectMeta {
                annotations: Some(BTreeMap::from([
                    (LAST_APPLIED_ANNOTATION.to_owned(), r#"{"data":{"key":"c2stY2FuYXJ5"}}"#.to_owned()),
                    ("portcullis.dev/consumed".to_owned(), "true".to_owned()),
                ])),
                ..Default::default()
            },
            ..Default::default()
        };
        strip_metadata(&mut meta);
        let annotations = meta.metadata.annotations.unwrap();
        assert_eq!(annotations.keys().collect::<Vec<_>>(), vec!["portcullis.dev/consumed"]);
    }
}
