//! Applying snapshots: the single writer behind `SnapshotHandle`, and local mode, which compiles
//! a folder of manifests with the operator's `compile` and re-applies it when files change.
//!
//! Local mode polls file names, sizes and modification times every `interval`. A folder is small,
//! polling needs no platform watcher, and it sees editors' atomic renames and ConfigMap-style
//! symlink swaps alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use portcullis_crds::digest::Pepper;
use portcullis_crds::sealing::MasterKeyring;
use portcullis_crds::snapshot::GatewaySnapshot;
use portcullis_operator::{manifests, Tenancy};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::snapshot::{RuntimeSnapshot, SnapshotHandle};

/// Validates, opens and swaps in snapshots; keeps the last good one on any failure.
#[derive(Debug)]
pub struct SnapshotApplier {
    handle: Arc<SnapshotHandle>,
    metrics: Metrics,
    keyring: MasterKeyring,
    pepper: Pepper,
    /// The pepper before the last change of `pepper`: a snapshot that names it (the operator
    /// still holds it, or its new snapshot has not arrived yet) opens under it.
    previous_pepper: Option<Pepper>,
    /// What the next compile and apply need of the last snapshot: generation, content digest
    /// and sealed credentials. Its keys and kill switches (with 10k keys, most of the snapshot)
    /// moved into the serving `RuntimeSnapshot` when it was opened.
    last_applied: Option<GatewaySnapshot>,
    /// Snapshots swapped out while requests still held them. Whoever drops the last reference
    /// frees a snapshot, and freeing 10k keys' maps takes milliseconds: kept here, they are
    /// freed by [`SnapshotApplier::reap`] on a blocking-pool thread once no request holds them,
    /// instead of by the last request, on an async worker.
    retired: Vec<Arc<RuntimeSnapshot>>,
}

impl SnapshotApplier {
    pub fn new(handle: Arc<SnapshotHandle>, metrics: Metrics, keyring: MasterKeyring, pepper: Pepper) -> Self {
        Self { handle, metrics, keyring, pepper, previous_pepper: None, last_applied: None, retired: Vec::new() }
    }

    /// Whether swapped-out snapshots are still waiting to be freed.
    pub fn holds_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// Whether a retired snapshot is held by nothing else any more (cheap; for the loops to
    /// decide whether to call [`SnapshotApplier::reap`] off the workers).
    pub fn can_reap(&self) -> bool {
        self.retired.iter().any(|snapshot| Arc::strong_count(snapshot) == 1)
    }

    /// Frees the retired snapshots no request holds any more; returns how many. A snapshot
    /// swapped out is out of the handle, so once only this list holds it, nothing else can
    /// take it again.
    pub fn reap(&mut self) -> usize {
        let before = self.retired.len();
        self.retired.retain(|snapshot| Arc::strong_count(snapshot) > 1);
        before - self.retired.len()
    }

    pub fn keyring(&self) -> &MasterKeyring {
        &self.keyring
    }

    pub fn pepper(&self) -> &Pepper {
        &self.pepper
    }

    /// New key material (cluster mode follows the keyring and pepper Secrets). Takes effect with
    /// the next snapshot applied; the pepper replaced stays at hand for snapshots that name it.
    pub fn set_key_material(&mut self, keyring: MasterKeyring, pepper: Pepper) {
        self.keyring = keyring;
        if pepper != self.pepper {
            self.previous_pepper = Some(std::mem::replace(&mut self.pepper, pepper));
        }
    }

    /// The pepper `snapshot`'s digests were made under, of the two at hand; the current one when
    /// it names neither (opening it then says so) or none (written before snapshots named it).
    fn pepper_for(&self, snapshot: &GatewaySnapshot) -> &Pepper {
        match (&snapshot.content.pepper_id, &self.previous_pepper) {
            (Some(id), Some(previous)) if *id != self.pepper.id() && *id == previous.id() => previous,
            _ => &self.pepper,
        }
    }

    /// The last snapshot applied, without its API keys and kill switches (see `last_applied`).
    pub fn last_applied(&self) -> Option<&GatewaySnapshot> {
        self.last_applied.as_ref()
    }

    /// Opens `snapshot` completely, then swaps it in. Returns false (and counts a failure) when
    /// it cannot be opened; the previous snapshot keeps serving.
    pub fn apply(&mut self, mut snapshot: GatewaySnapshot) -> bool {
        if self.last_applied.as_ref().is_some_and(|last| last.content_digest == snapshot.content_digest) {
            self.metrics.snapshot_valid.set(1);
            return true;
        }
        if let Some(last) = &self.last_applied {
            // Other content never comes at the applied generation: the operator moves the
            // generation with every change, so that is a replay of another snapshot (or a fork).
            if snapshot.generation <= last.generation {
                let relation = if snapshot.generation < last.generation { "older than" } else { "the same as" };
                self.reject(&format!(
                    "snapshot generation {} is {relation} the applied generation {}, with other content",
                    snapshot.generation, last.generation
                ));
                return false;
            }
        }
        let pepper = self.pepper_for(&snapshot);
        match RuntimeSnapshot::open(&mut snapshot, &self.keyring, pepper) {
            Ok(runtime) => {
                tracing::info!(
                    generation = runtime.generation,
                    api_keys = runtime.api_key_count,
                    providers = runtime.upstream_count,
                    kill_switches = runtime.kill_switches.len(),
                    "snapshot applied"
                );
                self.metrics.snapshot_generation.set(i64::try_from(runtime.generation).unwrap_or(i64::MAX));
                self.metrics.snapshot_valid.set(1);
                self.metrics.snapshot_reloads.inc();
                if let Some(previous) = self.handle.store(Arc::new(runtime)) {
                    self.retired.push(previous);
                }
                self.reap();
                // Its keys and kill switches have moved into the serving snapshot.
                self.last_applied = Some(snapshot);
                true
            }
            Err(e) => {
                self.reject(&e.to_string());
                false
            }
        }
    }

    /// Records a configuration that was refused before it became a snapshot.
    pub fn reject(&self, reason: &str) {
        self.metrics.snapshot_valid.set(0);
        self.metrics.snapshot_reload_failures.inc();
        tracing::error!(
            reason,
            serving_generation = self.last_applied.as_ref().map(|s| s.generation),
            "configuration rejected; the last good snapshot keeps serving"
        );
    }
}

/// Runs `work` with the applier on a blocking-pool thread, then hands the applier back.
/// Compiling a folder and opening a snapshot of 10k keys take tens of milliseconds each; on an
/// async worker that is a stall of every request queued behind them (all of them, with one
/// worker). The swapped-out snapshot is usually dropped there too. `None` when `work` panicked
/// (a bug): the applier went with it, so the caller stops following changes and the snapshot
/// last applied keeps serving.
pub async fn off_workers<T: Send + 'static>(
    mut applier: SnapshotApplier,
    work: impl FnOnce(&mut SnapshotApplier) -> T + Send + 'static,
) -> Option<(SnapshotApplier, T)> {
    match tokio::task::spawn_blocking(move || {
        let out = work(&mut applier);
        (applier, out)
    })
    .await
    {
        Ok(pair) => Some(pair),
        Err(_) => {
            tracing::error!("applying a snapshot failed unexpectedly; no further changes will be applied");
            None
        }
    }
}

/// Compiles the folder once. Errors name the file or the object and field.
pub fn compile_dir(dir: &Path, tenancy: &Tenancy, applier: &SnapshotApplier) -> Result<GatewaySnapshot, String> {
    let (mut inputs, _) = manifests::read_dir(dir).map_err(|e| e.to_string())?;
    inputs.tenancy = tenancy.clone();
    let compiled = portcullis_operator::compile(&inputs, applier.keyring(), applier.pepper(), applier.last_applied())
        .map_err(|e| e.to_string())?;
    for warning in &compiled.warnings {
        tracing::warn!(%warning, "manifest warning");
    }
    Ok(compiled.snapshot)
}

/// Identity of a folder's contents: each manifest file's path, length and modification time.
pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// The folder's current fingerprint, to notice changes cheaply.
pub fn fingerprint(dir: &Path) -> Fingerprint {
    let mut seen = Vec::new();
    if let Ok(files) = manifests::manifest_files(dir) {
        for path in files {
            let meta = std::fs::metadata(&path).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let modified = meta.and_then(|m| m.modified().ok());
            seen.push((path, len, modified));
        }
    }
    seen
}

/// The folder's fingerprint. On the single-threaded runtime it is taken on the runtime's own
/// thread: a listing and a `stat` per file take tens of microseconds, and a blocking-pool thread
/// kept alive by this poll every 250 ms would leave a single-worker data plane with two threads
/// for good (the kernel then takes a reference on the socket's file in every syscall; it skips
/// that only while one thread uses the file table). With several workers the process is
/// multi-threaded anyway, and a slow filesystem should not stall one of them.
async fn scan(dir: &Path) -> Fingerprint {
    if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
        return fingerprint(dir);
    }
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || fingerprint(&dir)).await.unwrap_or_default()
}

/// Follows the folder's changes until `shutdown` fires. `loaded` is the fingerprint of what the
/// applier already holds (taken before it was read), so start-up does not compile the folder a
/// second time; `None` loads it first.
pub async fn run_local(
    dir: PathBuf,
    tenancy: Tenancy,
    interval: Duration,
    mut applier: SnapshotApplier,
    mut shutdown: watch::Receiver<bool>,
    loaded: Option<Fingerprint>,
) {
    let mut last_seen = loaded;
    loop {
        let mut seen = scan(&dir).await;
        if last_seen.as_ref() != Some(&seen) {
            if last_seen.is_some() {
                // A writer may still be mid-way through a file: wait a beat and look again.
                tokio::time::sleep(interval.min(Duration::from_millis(50))).await;
                seen = scan(&dir).await;
            }
            let (dir_for_compile, tenancy) = (dir.clone(), tenancy.clone());
            let Some((next, ())) =
                off_workers(applier, move |applier| match compile_dir(&dir_for_compile, &tenancy, applier) {
                    Ok(snapshot) => {
                        applier.apply(snapshot);
                    }
                    Err(reason) => applier.reject(&reason),
                })
                .await
            else {
                return;
            };
            applier = next;
            // Changes made while compiling show up as a new fingerprint on the next turn.
            last_seen = Some(seen);
        }
        if applier.can_reap() {
            let Some((next, _)) = off_workers(applier, SnapshotApplier::reap).await else {
                return;
            };
            applier = next;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}
