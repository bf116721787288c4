//! The snapshot writer and the operator's own Secrets (keyring, pepper) on first start.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PostParams};
use kube::{Api, Client, ResourceExt};
use portcullis_crds::digest::Pepper;
use portcullis_crds::sealing::MasterKeyring;
use portcullis_crds::snapshot::GatewaySnapshot;
use portcullis_crds::v1alpha1::ObjectRef;

use super::context::Context;
use super::reconcile::apply_params;
use super::secret_values::HeldSecret;
use crate::assemble::compile_valid;
use crate::error::{status_code, Error};
use crate::inputs::CompileInputs;
use crate::{issuance, secrets};

/// Reads `name`, or creates it from `make` if it does not exist. Creation is a plain create (not
/// an apply): if another replica created it first, its content wins and is read back.
async fn get_or_create<T>(
    api: &Api<Secret>,
    name: &str,
    make: impl FnOnce() -> Result<(T, Secret), Error>,
    read: impl Fn(&Secret) -> Result<T, Error>,
) -> Result<T, Error> {
    if let Some(existing) = api.get_opt(name).await.map_err(Error::read(format!("Secret {name}")))? {
        return read(&HeldSecret::new(existing));
    }
    let (value, secret) = make()?;
    let secret = HeldSecret::new(secret);
    match api.create(&PostParams::default(), &*secret).await {
        Ok(_) => {
            tracing::info!(secret = name, "created on first start");
            Ok(value)
        }
        Err(e) if status_code(&e) == Some(409) => {
            let existing = api.get(name).await.map_err(Error::read(format!("Secret {name}")))?;
            read(&HeldSecret::new(existing))
        }
        Err(e) => Err(Error::write(format!("Secret {name}"))(e)),
    }
}

/// The keyring and pepper, created on first start if absent, and the snapshot already stored.
pub async fn bootstrap(
    client: &Client,
    namespace: &str,
    keyring_secret: &str,
    pepper_secret: &str,
    snapshot_secret: &str,
) -> Result<(MasterKeyring, Pepper, Option<GatewaySnapshot>), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let keyring = get_or_create(
        &api,
        keyring_secret,
        || secrets::new_keyring_secret(namespace, keyring_secret).map_err(|e| Error::KeyMaterial(e.to_string())),
        |s| secrets::keyring_from_secret(s).map_err(|e| Error::KeyMaterial(e.to_string())),
    )
    .await?;
    let pepper = get_or_create(
        &api,
        pepper_secret,
        || secrets::new_pepper_secret(namespace, pepper_secret).map_err(|e| Error::KeyMaterial(e.to_string())),
        |s| secrets::pepper_from_secret(s).map_err(|e| Error::KeyMaterial(e.to_string())),
    )
    .await?;
    let previous = api
        .get_opt(snapshot_secret)
        .await
        .map_err(Error::read(format!("Secret {snapshot_secret}")))?
        .as_ref()
        .and_then(secrets::previous_snapshot);
    Ok((keyring, pepper, previous))
}

/// Follows the keyring Secret: a valid new keyring replaces the last good one.
async fn refresh_keyring(ctx: &Context) -> Result<MasterKeyring, Error> {
    let settings = &ctx.settings;
    if let Some(secret) = ctx.secret(&settings.namespace, &settings.keyring_secret).await? {
        match secrets::keyring_from_secret(&secret) {
            Ok(keyring) => {
                *ctx.keyring.lock().unwrap_or_else(|p| p.into_inner()) = keyring;
            }
            Err(error) => {
                ctx.metrics.error("Snapshot", crate::error::Category::KeyMaterial);
                tracing::error!(%error, "the keyring Secret is invalid; keeping the last good keyring");
            }
        }
    }
    Ok(ctx.current_keyring())
}

/// Everything in the caches, as compile inputs, reading the referenced Secrets' values that are
/// not held yet. Generated keys without a recorded digest (still being issued) are left out
/// rather than reported, and so are ApiKeys and ProviderCredentials being deleted. Values
/// nothing references any more are dropped.
pub async fn gather_inputs(ctx: &Context) -> Result<CompileInputs, Error> {
    let now = ctx.now();
    let pepper_id = ctx.pepper.id();
    let mut inputs = CompileInputs { tenancy: ctx.settings.tenancy.clone(), ..Default::default() };
    let mut wanted: BTreeSet<ObjectRef> = BTreeSet::new();
    // Values kept besides `wanted`: the keyring and the reveal Secrets of generated keys.
    let mut also_held: BTreeSet<ObjectRef> = BTreeSet::new();
    also_held.insert(ObjectRef::new(&ctx.settings.namespace, &ctx.settings.keyring_secret));
    for guarded in ctx.stores.api_keys.state() {
        let Ok(key) = &guarded.0 else { continue };
        // Being deleted (held by the ledger's finalizer until its deletion is appended): it
        // stops working now, not once the API server lets it go.
        if key.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let object = crate::readiness::object_ref(&key.metadata);
        match &key.spec.secret_ref {
            Some(r) => {
                wanted.insert(ObjectRef::new(object.namespace.clone(), r.name.clone()));
            }
            None => {
                also_held.insert(ObjectRef::new(object.namespace.clone(), issuance::reveal_secret_name(&object.name)));
                let record = key.status.as_ref().map(|s| s.issued_digests.as_slice()).unwrap_or_default();
                let digests: Vec<_> = issuance::snapshot_digests(record, &pepper_id)
                    .into_iter()
                    .filter(|d| d.valid_until.is_none_or(|until| until > now))
                    .collect();
                if digests.is_empty() {
                    // Live digests under another pepper only: reported on the key, not left out.
                    if record.iter().any(|d| d.valid_until.is_none_or(|until| until > now)) {
                        inputs.issued_under_another_pepper.insert(object);
                        inputs.api_keys.push(key.clone());
                    }
                    continue;
                }
                inputs.issued_digests.insert(object, digests);
            }
        }
        inputs.api_keys.push(key.clone());
    }
    for guarded in ctx.stores.credentials.state() {
        let Ok(credential) = &guarded.0 else { continue };
        if credential.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if let Some(r) = &credential.spec.secret_ref {
            wanted.insert(ObjectRef::new(credential.namespace().unwrap_or_default(), r.name.clone()));
        }
        inputs.credentials.push(credential.clone());
    }
    // A KillSwitch being deleted stays as it is until it is gone: releasing traffic waits for
    // its deletion to be in the ledger, never the other way round.
    for guarded in ctx.stores.kill_switches.state() {
        match &guarded.0 {
            Ok(switch) => inputs.kill_switches.push(switch.clone()),
            // Kept as it was in the last snapshot (see `assemble`): a switch never fails open.
            Err(unreadable) => {
                inputs.unreadable_kill_switches.insert(crate::readiness::object_ref(&unreadable.metadata));
            }
        }
    }
    let reads: Vec<_> = wanted.iter().map(|secret| ctx.secret(&secret.namespace, &secret.name)).collect();
    let mut reads = futures_util::stream::iter(reads).buffer_unordered(super::secret_values::CONCURRENT_READS);
    while let Some(found) = reads.next().await {
        if let Some(found) = found? {
            secrets::add_to_store(&mut inputs.secrets, &found);
        }
    }
    drop(reads);
    ctx.secret_values.retain(|namespace, name| {
        let secret = ObjectRef::new(namespace, name);
        wanted.contains(&secret) || also_held.contains(&secret)
    });
    Ok(inputs)
}

/// Refuses a snapshot Secret the API server would refuse for its size, saying so in the
/// operator's own terms (the last snapshot written stays in force meanwhile).
fn check_size(secret: &Secret, snapshot: &GatewaySnapshot) -> Result<(), Error> {
    let bytes = secrets::data_bytes(secret);
    let limit = portcullis_crds::snapshot::MAX_SECRET_DATA_BYTES;
    if bytes <= limit {
        return Ok(());
    }
    Err(Error::SnapshotTooLarge {
        bytes,
        limit,
        api_keys: snapshot.content.api_keys.len(),
        credentials: snapshot.content.credentials.len(),
    })
}

/// Compiles everything and writes the snapshot Secret if, and only if, its content changed.
/// Returns the generation written.
pub async fn sync_snapshot(ctx: &Context) -> Result<Option<u64>, Error> {
    ctx.ensure_leading()?;
    ctx.stores.listed().await;
    let keyring = refresh_keyring(ctx).await?;
    let inputs = gather_inputs(ctx).await?;
    let objects = super::acknowledgement::compiled_objects(&inputs);
    let mut state = ctx.snapshot.lock().await;
    let assembled = compile_valid(inputs, &keyring, &ctx.pepper, state.previous.as_ref())?;
    for warning in &assembled.compiled.warnings {
        tracing::debug!(%warning, "compile warning");
    }
    let mut snapshot = assembled.compiled.snapshot;
    let replicas = ctx.acknowledgements.replicas();
    for liar in
        replicas.iter().filter(|a| a.generation.is_some_and(|g| g > crate::enforcement::MAX_GENERATION_FOLLOWED))
    {
        tracing::warn!(
            replica = %liar.replica,
            generation = liar.generation,
            "a data-plane replica's Lease reports a generation no operator can have written; not following it"
        );
    }
    // Deleted or replaced since it was written (the Secret watch raised the check): written
    // again, even with nothing changed. The check stays owed until a run gets through.
    let stored = stored_snapshot(ctx);
    let mut check = CheckOwed { flag: &ctx.snapshot_check, owed: ctx.snapshot_check.swap(false, Ordering::SeqCst) };
    let repair = check.owed && !as_written(stored.as_ref(), state.previous.as_ref());
    if repair {
        tracing::warn!(
            generation = snapshot.generation,
            stored = ?stored.as_ref().map(|named| named.as_ref().map(|(generation, _)| generation)),
            "the snapshot Secret was deleted or is not the one last written; writing it again"
        );
    }
    // Whatever the check: a later generation there (a deposed leader's, or one written before
    // this writer's first) would have replicas that took it refuse ours, so ours goes past it.
    let stored_ahead = stored.flatten().and_then(|(generation, digest)| {
        let followed = generation <= crate::enforcement::MAX_GENERATION_FOLLOWED;
        let ahead = generation > snapshot.generation
            || (generation == snapshot.generation && digest != snapshot.content_digest);
        (followed && ahead).then_some(generation)
    });
    let floor =
        crate::enforcement::generation_floor(&replicas, snapshot.generation, &snapshot.content_digest, ctx.now());
    // At most `MAX_GENERATION_FOLLOWED`, so one more never overflows.
    let raised = if let Some(served) = floor.max(stored_ahead) {
        tracing::warn!(
            generation = snapshot.generation,
            served,
            "data-plane replicas serve, or the snapshot Secret holds, a later generation than the one \
             written last (it was deleted, reset or overwritten); continuing past it"
        );
        snapshot.generation = served + 1;
        snapshot = snapshot.tag(&keyring).map_err(|e| Error::KeyMaterial(e.to_string()))?;
        true
    } else {
        false
    };
    // A new active master key tags the snapshot again even when nothing else moved: once the
    // old key leaves the keyring, a replica starting could not verify the stored snapshot, and
    // the writer itself would no longer trust it to keep an unreadable KillSwitch engaged.
    fn tag_key(s: &GatewaySnapshot) -> Option<&str> {
        s.tag.as_ref().map(|t| t.key_id.as_str())
    }
    let changed = raised
        || repair
        || state
            .previous
            .as_ref()
            .is_none_or(|p| p.content_digest != snapshot.content_digest || tag_key(p) != tag_key(&snapshot));
    let mut written = None;
    if changed {
        let settings = &ctx.settings;
        let secret = secrets::snapshot_secret(&settings.namespace, &settings.snapshot_secret, &snapshot);
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &settings.namespace);
        check_size(&secret, &snapshot)?;
        api.patch(&settings.snapshot_secret, &apply_params(), &Patch::Apply(&secret))
            .await
            .map_err(Error::write(format!("Secret {}", settings.snapshot_secret)))?;
        ctx.metrics.snapshot_writes.inc();
        ctx.metrics.snapshot_generation.set(i64::try_from(snapshot.generation).unwrap_or(i64::MAX));
        tracing::info!(
            generation = snapshot.generation,
            api_keys = snapshot.content.api_keys.len(),
            credentials = snapshot.content.credentials.len(),
            kill_switches = snapshot.content.kill_switches.len(),
            excluded = assembled.excluded.len(),
            "snapshot written"
        );
        // Credential status shows the key version and master key; they may have moved.
        let before = state.previous.as_ref().map(|p| &p.content.credentials);
        for entry in &snapshot.content.credentials {
            let moved = before.and_then(|b| b.iter().find(|c| c.credential == entry.credential)).is_none_or(|old| {
                old.key_version != entry.key_version
                    || old.sealed_key.as_ref().map(|s| &s.key_id) != entry.sealed_key.as_ref().map(|s| &s.key_id)
            });
            if moved {
                ctx.retrigger.object(&("ProviderCredential", entry.credential.clone()));
            }
        }
        written = Some(snapshot.generation);
        note_inclusion(ctx, state.previous.as_ref(), &snapshot, &objects);
        state.previous = Some(snapshot);
    } else {
        note_inclusion(ctx, state.previous.as_ref(), &snapshot, &objects);
    }
    // Objects whose exclusion changed need their status redone.
    let old: BTreeSet<_> = state.excluded.keys().cloned().collect();
    let new: BTreeSet<_> = assembled.excluded.keys().cloned().collect();
    for key in old.symmetric_difference(&new) {
        ctx.retrigger.object(key);
    }
    state.excluded = assembled.excluded;
    check.owed = false;
    Ok(written)
}

/// The generation and content digest a snapshot Secret's annotations name, when they do.
type Named = Option<(u64, String)>;

/// The snapshot Secret as the Secret watch shows it: `None` when it shows none, else what its
/// annotations name.
fn stored_snapshot(ctx: &Context) -> Option<Named> {
    let settings = &ctx.settings;
    let stored = ctx.secret_meta(&settings.namespace, &settings.snapshot_secret)?;
    Some(secrets::named_snapshot(&stored.metadata))
}

/// Whether `stored` is `previous`, the snapshot last written (or read at start). With none
/// yet there is nothing to repair: the first run writes anyway.
fn as_written(stored: Option<&Named>, previous: Option<&GatewaySnapshot>) -> bool {
    match (stored, previous) {
        (_, None) => true,
        (Some(Some((generation, digest))), Some(previous)) => {
            *generation == previous.generation && *digest == previous.content_digest
        }
        _ => false,
    }
}

/// The snapshot Secret's check, put back for the writer's next run unless this one got through
/// (a failed write, a refused tag, anything that returns early).
struct CheckOwed<'a> {
    flag: &'a std::sync::atomic::AtomicBool,
    owed: bool,
}

impl Drop for CheckOwed<'_> {
    fn drop(&mut self) {
        if self.owed {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
}

/// The Secret watch saw the snapshot Secret change or go, or finished a relist (its cache shows
/// the result): the writer is woken to write it again unless the cache shows what was last
/// written. The writer's own write comes back this way too; while the writer runs, the check is
/// left to its next run.
pub fn stored_snapshot_seen(ctx: &Context) {
    let elsewise = match ctx.snapshot.try_lock() {
        Ok(state) => !as_written(stored_snapshot(ctx).as_ref(), state.previous.as_ref()),
        Err(_) => true,
    };
    if elsewise {
        ctx.snapshot_check.store(true, Ordering::SeqCst);
        ctx.snapshot_trigger.notify_one();
    }
}

/// Records which generation holds each object's current state (after a successful write, or
/// when nothing changed) and redoes the status of the objects whose inclusion moved.
fn note_inclusion(
    ctx: &Context,
    previous: Option<&GatewaySnapshot>,
    snapshot: &GatewaySnapshot,
    objects: &std::collections::BTreeMap<crate::assemble::ObjectKey, crate::enforcement::CompiledObject>,
) {
    for key in ctx.acknowledgements.record(previous.map(|p| &p.content), snapshot, objects) {
        ctx.retrigger.object(&key);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;
    use portcullis_crds::snapshot::{SnapshotContent, MAX_SECRET_DATA_BYTES};

    /// A snapshot Secret the API server would refuse for its size is refused here first, with
    /// the sizes and counts (never the content) in the message.
    #[test]
    fn a_snapshot_over_what_a_secret_holds_is_not_written() {
        let snapshot = GatewaySnapshot::new(SnapshotContent::default(), None);
        let fits = secrets::snapshot_secret("ns", "snap", &snapshot);
        assert!(check_size(&fits, &snapshot).is_ok());
        let mut over = fits.clone();
        over.data =
            Some([("snapshot.json.gz".to_owned(), k8s_openapi::ByteString(vec![0; MAX_SECRET_DATA_BYTES]))].into());
        let error = check_size(&over, &snapshot).unwrap_err();
        assert!(matches!(error, Error::SnapshotTooLarge { bytes, .. } if bytes == MAX_SECRET_DATA_BYTES + 16));
        let message = error.to_string();
        assert!(message.contains("over the 1048576 bytes a Secret holds"), "{message}");
        assert!(message.contains("0 ApiKeys"), "{message}");
    }
}
