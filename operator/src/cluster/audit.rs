//! The ledger in a running operator: append what reconcilers observe (only the leader runs
//! reconcilers, so replicas never fork the chain), hold deleted objects with a finalizer until
//! their deletion is appended, and publish the head as a checkpoint.
//!
//! ```text
//!   reconcile ─▶ audit::observe_* ─▶ Audit::record ─▶ decide ─▶ LedgerStore ─▶ checkpoint
//!                 (actor: webhook hint ▶ managedFields ▶ operator)   (file, fsync   ConfigMap annotation
//!                                                                     or Redis)     + Event
//! ```
//!
//! With Redis a deposed leader that has not noticed yet can race the new one; the append script
//! refuses the loser (`Forked`), which rereads the ledger and decides again on its next
//! reconcile, so the chain never forks and no action is recorded twice.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference as K8sRef};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};

use super::context::Context;
use super::events::{report, Transition};
use crate::audit::{self, ActorHints, AuditKey, Observed, Recorded};
use crate::error::Error;
use crate::ledger::{Actor, Checkpoint, FileLedger, LedgerEntry, LedgerError, LedgerStore, NewEntry};

/// Annotation (on the checkpoint ConfigMap) holding `SEQUENCE:HASH` of the ledger head.
pub const HEAD_ANNOTATION: &str = "portcullis.dev/ledger-head";
/// Name of the ConfigMap in the operator's namespace that carries the checkpoint.
pub const CHECKPOINT_CONFIGMAP: &str = "portcullis-ledger-head";

struct LedgerState {
    ledger: LedgerStore,
    recorded: HashMap<AuditKey, Recorded>,
}

/// The ledger, what it says about each object, and the webhook's actor hints.
pub struct Audit {
    state: tokio::sync::Mutex<LedgerState>,
    pub hints: Arc<ActorHints>,
    published: Mutex<Option<Checkpoint>>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").field("hints", &self.hints.len()).finish_non_exhaustive()
    }
}

impl Audit {
    /// Opens (verifying) the ledger and replays it, so a restart continues the chain and knows
    /// what it already recorded.
    pub fn open(path: &Path, hints: Arc<ActorHints>) -> Result<Self, LedgerError> {
        let ledger = FileLedger::open(path)?;
        let entries =
            crate::ledger::read_lines(path).map_err(|source| LedgerError::Io { path: path.to_path_buf(), source })?;
        Ok(Self::with_entries(LedgerStore::File(ledger), &entries, hints))
    }

    /// The same over any (already opened, hence verified) store.
    pub async fn from_store(mut ledger: LedgerStore, hints: Arc<ActorHints>) -> Result<Self, LedgerError> {
        let entries = ledger.entries().await?;
        Ok(Self::with_entries(ledger, &entries, hints))
    }

    fn with_entries(ledger: LedgerStore, entries: &[Result<LedgerEntry, usize>], hints: Arc<ActorHints>) -> Self {
        let recorded = audit::replay(entries.iter().filter_map(|e| e.as_ref().ok()));
        Self { state: tokio::sync::Mutex::new(LedgerState { ledger, recorded }), hints, published: Mutex::new(None) }
    }

    /// Where the ledger is (for logs).
    pub async fn describe(&self) -> String {
        self.state.lock().await.ledger.describe()
    }

    pub async fn head(&self) -> Option<Checkpoint> {
        let state = self.state.lock().await;
        state.ledger.head().map(|h| Checkpoint { sequence: h.sequence, hash: h.hash.clone() })
    }

    /// Appends an entry for each action `observed` represents since the ledger last recorded it.
    pub async fn record(
        &self,
        observed: &Observed,
        managed: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry],
        now: DateTime<Utc>,
    ) -> Result<Vec<LedgerEntry>, LedgerError> {
        let key = audit::key_of(&observed.object);
        let mut state = self.state.lock().await;
        let drafts = audit::decide(state.recorded.get(&key), observed);
        if drafts.is_empty() {
            // A hint for a change that was not an admin action (e.g. a limits edit) is spent.
            self.hints.take(&key);
            return Ok(Vec::new());
        }
        let hint = self.hints.take(&key);
        let requester = hint.clone().or_else(|| audit::actor_from_managed_fields(managed));
        let mut appended = Vec::new();
        for draft in drafts {
            let actor =
                if draft.by_operator { Actor::operator() } else { requester.clone().unwrap_or_else(Actor::operator) };
            let appending = state
                .ledger
                .append(NewEntry {
                    time: now,
                    actor,
                    action: draft.action,
                    object: observed.object.clone(),
                    changed_fields: draft.changed_fields,
                    facts: audit::entry_facts(observed),
                })
                .await;
            let entry = match appending {
                Ok(entry) => entry,
                Err(error) => {
                    // The retry needs the requester again.
                    if let Some(actor) = hint {
                        self.hints.record(key.clone(), actor);
                    }
                    if matches!(error, LedgerError::Forked { .. }) {
                        // Someone else extended the ledger: learn what it now says, so the
                        // retry decides from it and repeats nothing the other writer recorded.
                        let entries = state.ledger.entries().await?;
                        state.recorded = audit::replay(entries.iter().filter_map(|e| e.as_ref().ok()));
                    }
                    return Err(error);
                }
            };
            tracing::info!(sequence = entry.sequence, action = ?entry.action, kind = %entry.object.kind,
                namespace = %entry.object.namespace, name = %entry.object.name, "ledger entry appended");
            audit::remember(&mut state.recorded, &entry, Some(observed.spec.clone()));
            appended.push(entry);
        }
        Ok(appended)
    }

    /// The head if it moved since the last successful publish.
    fn unpublished(&self, head: Option<Checkpoint>) -> Option<Checkpoint> {
        let published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        head.filter(|h| published.as_ref() != Some(h))
    }

    /// Forgets the last publish, so the next one repeats the head (the periodic checkpoint).
    pub fn republish(&self) {
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn mark_published(&self, head: Checkpoint) {
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = Some(head);
    }
}

/// `SEQUENCE:HASH`, the form `audit verify --checkpoint` takes.
pub fn checkpoint_text(head: &Checkpoint) -> String {
    format!("{}:{}", head.sequence, head.hash)
}

/// Records `observed` and keeps the finalizer right: on a live object it is added, on a
/// deleted one it is removed only once the deletion is in the ledger. `meta` is the object's
/// metadata as the cache holds it (a malformed object has nothing else).
pub async fn audit_object<K>(ctx: &Context, meta: &ObjectMeta, observed: Observed) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let Some(audit) = &ctx.audit else { return Ok(()) };
    let appended = audit.record(&observed, meta.managed_fields.as_deref().unwrap_or_default(), ctx.now()).await?;
    if !appended.is_empty() {
        ctx.checkpoint_trigger.notify_one();
    }
    let wanted = !observed.deleting;
    if holds_ledger_finalizer(meta) != wanted {
        set_finalizer::<K>(ctx, &observed.object.namespace, &observed.object.name, wanted).await?;
    }
    Ok(())
}

/// Without a ledger: releases the ledger's finalizer an object being deleted still carries
/// from a run with the ledger on (nothing else would, and the object would never go). True
/// when it did.
pub async fn release_leftover_finalizer<K>(ctx: &Context, meta: &ObjectMeta) -> Result<bool, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    if ctx.audit.is_some() || meta.deletion_timestamp.is_none() || !holds_ledger_finalizer(meta) {
        return Ok(false);
    }
    let (namespace, name) = (meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default());
    set_finalizer::<K>(ctx, namespace, name, false).await?;
    tracing::warn!(
        kind = %K::kind(&()),
        namespace,
        name,
        "released the ledger's finalizer of a deleted object; no ledger is configured, so its deletion is not recorded"
    );
    Ok(true)
}

fn holds_ledger_finalizer(meta: &ObjectMeta) -> bool {
    meta.finalizers.as_ref().is_some_and(|f| f.iter().any(|x| x == audit::FINALIZER))
}

/// Adds or removes only the operator's finalizer: finalizers are a set under server-side apply,
/// and this field manager owns nothing else.
async fn set_finalizer<K>(ctx: &Context, namespace: &str, name: &str, present: bool) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let finalizers: Vec<&str> = if present { vec![audit::FINALIZER] } else { vec![] };
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": name, "finalizers": finalizers},
    });
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let what = format!("{} {namespace}/{name} finalizer", K::kind(&()));
    match api.patch_metadata(name, &PatchParams::apply(audit::FINALIZER_MANAGER).force(), &Patch::Apply(&patch)).await {
        Ok(_) => Ok(()),
        // Gone already: nothing left to hold.
        Err(e) if !present && crate::error::status_code(&e) == Some(404) => Ok(()),
        Err(e) => Err(Error::write(what)(e)),
    }
}

/// Publishes the ledger head on the checkpoint ConfigMap (annotation and data) and as an Event,
/// when it moved since the last publish.
pub async fn publish_checkpoint(ctx: &Context) -> Result<Option<Checkpoint>, Error> {
    let Some(audit) = &ctx.audit else { return Ok(None) };
    ctx.ensure_leading()?;
    let Some(head) = audit.unpublished(audit.head().await) else { return Ok(None) };
    let text = checkpoint_text(&head);
    let namespace = &ctx.settings.namespace;
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CHECKPOINT_CONFIGMAP.to_owned()),
            namespace: Some(namespace.clone()),
            annotations: Some([(HEAD_ANNOTATION.to_owned(), text.clone())].into()),
            ..Default::default()
        },
        data: Some([("head".to_owned(), text.clone()), ("publishedAt".to_owned(), ctx.now().to_rfc3339())].into()),
        ..Default::default()
    };
    let mut patch = serde_json::to_value(&config_map).unwrap_or_default();
    patch["apiVersion"] = "v1".into();
    patch["kind"] = "ConfigMap".into();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    api.patch(CHECKPOINT_CONFIGMAP, &super::reconcile::apply_params(), &Patch::Apply(&patch))
        .await
        .map_err(Error::write(format!("ConfigMap {CHECKPOINT_CONFIGMAP}")))?;
    let regarding = K8sRef {
        api_version: Some("v1".into()),
        kind: Some("ConfigMap".into()),
        name: Some(CHECKPOINT_CONFIGMAP.into()),
        namespace: Some(namespace.clone()),
        ..Default::default()
    };
    report(ctx.recorder.as_ref(), &regarding, Transition::LedgerCheckpoint { head: text }).await;
    audit.mark_published(head.clone());
    Ok(Some(head))
}

/// Records a change of the active master key (never key material: only its id).
pub async fn audit_keyring(ctx: &Context) -> Result<(), Error> {
    let Some(audit) = &ctx.audit else { return Ok(()) };
    let settings = &ctx.settings;
    let Some(secret) = ctx.secret_meta(&settings.namespace, &settings.keyring_secret) else { return Ok(()) };
    let keyring = ctx.current_keyring();
    let observed = audit::observe_keyring(
        &settings.namespace,
        &settings.keyring_secret,
        secret.metadata.uid.as_deref().unwrap_or_default(),
        keyring.active_id().as_str(),
    );
    let appended =
        audit.record(&observed, secret.metadata.managed_fields.as_deref().unwrap_or_default(), ctx.now()).await?;
    if !appended.is_empty() {
        ctx.checkpoint_trigger.notify_one();
    }
    Ok(())
}
