//! The three reconcilers. Each one: fetch what the object references (from the caches) →
//! decide (pure: `issuance`, `readiness`, `conditions`) → apply (server-side apply, one field
//! manager) → status (skipped when unchanged; when it moved, the snapshot writer is woken, before
//! anything that may fail after it) → Events for transitions → the ledger.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::core::error_boundary::InvalidObject;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use portcullis_crds::digest::ClientKey;
use portcullis_crds::secret::SecretBytes;
use portcullis_crds::v1alpha1::{
    ApiKey, ApiKeyStatus, KillSwitch, KillSwitchStatus, ObjectRef, ProviderCredential, ProviderCredentialStatus,
};
use serde::Serialize;

use super::acknowledgement;
use super::audit::audit_object;
use super::context::{Context, Guarded};
use super::events::{report, Transition};
use super::secret_values::HeldSecret;
use crate::assemble::KEPT_MESSAGE;
use crate::audit;
use crate::conditions::{ready_reason, with_ready, Readiness, ReadyReason};
use crate::error::{status_code, Error};
use crate::inputs::SecretStore;
use crate::issuance::{self, IssuanceEvent, RevealAction, MANAGER};
use crate::readiness;
use crate::secrets;

/// Server-side apply as the operator's one field manager.
pub fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

fn reference<K: Resource<DynamicType = ()>>(object: &K) -> ObjectReference {
    object.object_ref(&())
}

fn requeue_after(ctx: &Context, now: DateTime<Utc>, at: impl IntoIterator<Item = DateTime<Utc>>) -> Action {
    let next = at.into_iter().filter(|t| *t > now).min().and_then(|t| (t - now).to_std().ok()).map_or(
        ctx.settings.resync,
        |d| {
            // A little after the moment, so the clock has certainly passed it.
            (d + std::time::Duration::from_millis(200)).min(ctx.settings.resync)
        },
    );
    Action::requeue(next)
}

/// Applies a status to the status subresource when it differs from `current`.
async fn apply_status<K, S>(api: &Api<K>, name: &str, current: &S, desired: &S) -> Result<bool, Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if current == desired {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": desired,
    });
    api.patch_status(name, &apply_params(), &Patch::Apply(&patch))
        .await
        .map_err(Error::write(format!("{} {name} status", K::kind(&()))))?;
    Ok(true)
}

/// A malformed object: say so in its status and in an Event, then wait for a change.
async fn malformed<K>(invalid: &InvalidObject, note: Option<&str>, ctx: &Context) -> Result<Action, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    // Being deleted: its deletion is recorded from its metadata (what the ledger needs for it)
    // and the finalizer released, or it would never go.
    let observed = audit::observe_unreadable(&K::kind(&()), &invalid.metadata);
    if let Some(done) = deleted::<K>(ctx, &invalid.metadata, observed).await? {
        return Ok(done);
    }
    let namespace = invalid.metadata.namespace.clone().unwrap_or_default();
    let name = invalid.metadata.name.clone().unwrap_or_default();
    let message = match note {
        Some(note) => format!("{}; {note}", invalid.error),
        None => invalid.error.clone(),
    };
    let readiness = Readiness::new(ReadyReason::InvalidSpec, message.clone());
    let conditions = with_ready(&[], &readiness, invalid.metadata.generation, ctx.now());
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": {"observedGeneration": invalid.metadata.generation, "conditions": conditions},
    });
    api.patch_status(&name, &apply_params(), &Patch::Apply(&patch))
        .await
        .map_err(Error::write(format!("{} {name} status", K::kind(&()))))?;
    let regarding = ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: Some(name),
        namespace: Some(namespace),
        uid: invalid.metadata.uid.clone(),
        ..Default::default()
    };
    report(ctx.recorder.as_ref(), &regarding, Transition::Malformed { message }).await;
    ctx.snapshot_trigger.notify_one();
    Ok(Action::await_change())
}

async fn report_ready(
    ctx: &Context,
    regarding: &ObjectReference,
    before: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    readiness: &Readiness,
) {
    if ready_reason(before) != Some(readiness.reason.as_str()) {
        report(
            ctx.recorder.as_ref(),
            regarding,
            Transition::Ready {
                ready: readiness.reason.is_ready(),
                reason: readiness.reason.as_str(),
                message: readiness.message.clone(),
            },
        )
        .await;
    }
}

/// The one Secret an object references, as compile inputs.
async fn referenced(ctx: &Context, namespace: &str, name: Option<&str>) -> Result<SecretStore, Error> {
    let mut store = SecretStore::default();
    if let Some(name) = name {
        if let Some(secret) = ctx.secret(namespace, name).await? {
            secrets::add_to_store(&mut store, &secret);
        }
    }
    Ok(store)
}

async fn excluded_for(
    ctx: &Context,
    key: &(&'static str, ObjectRef),
) -> BTreeMap<(&'static str, ObjectRef), Vec<crate::compile::CompileError>> {
    let state = ctx.snapshot.lock().await;
    state.excluded.get(key).map(|errors| BTreeMap::from([(key.clone(), errors.clone())])).unwrap_or_default()
}

pub async fn reconcile_api_key(object: Arc<Guarded<ApiKey>>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.with_label_values(&["ApiKey"]).inc();
    ctx.ensure_leading()?;
    let cached = match &object.0 {
        Ok(key) => key,
        Err(invalid) => return malformed::<ApiKey>(invalid, None, &ctx).await,
    };
    let now = ctx.now();
    if let Some(done) = deleted::<ApiKey>(&ctx, &cached.metadata, audit::observe_api_key(cached, now)).await? {
        return Ok(done);
    }
    let namespace = cached.namespace().unwrap_or_default();
    let name = cached.name_any();
    let reveal_name = issuance::reveal_secret_name(&name);
    let api: Api<ApiKey> = Api::namespaced(ctx.client.clone(), &namespace);
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);

    // Decide from the caches; if that says "generate", decide again from the API server itself,
    // so a cache that has not yet seen our last write can never cause a second key.
    let cached_reveal = ctx.secret(&namespace, &reveal_name).await?;
    let view = cached_reveal.as_deref().and_then(|s| secrets::reveal_view(cached, s));
    let mut wants_key = false;
    let preview = issuance::decide(cached, view.as_ref(), &ctx.pepper, now, ctx.settings.reveal_ttl, || {
        wants_key = true;
        Err(portcullis_crds::digest::KeyMaterialError::Rng)
    });
    let (key, issuance) = if wants_key {
        let fresh = api.get(&name).await.map_err(Error::read(format!("ApiKey {namespace}/{name}")))?;
        let reveal = secrets_api
            .get_opt(&reveal_name)
            .await
            .map_err(Error::read(format!("Secret {namespace}/{reveal_name}")))?
            .map(HeldSecret::new);
        let view = reveal.as_ref().and_then(|s| secrets::reveal_view(&fresh, s));
        let issuance =
            issuance::decide(&fresh, view.as_ref(), &ctx.pepper, now, ctx.settings.reveal_ttl, ClientKey::generate)
                .map_err(|e| Error::KeyMaterial(e.to_string()))?;
        (fresh, issuance)
    } else {
        let issuance = preview.map_err(|e| Error::KeyMaterial(e.to_string()))?;
        (cached.clone(), issuance)
    };
    let regarding = reference(&key);

    match &issuance.reveal {
        RevealAction::Keep => {}
        RevealAction::Write { key: client_key } => {
            let secret = HeldSecret::new(secrets::reveal_secret(&key, &reveal_name, client_key));
            secrets_api
                .patch(&reveal_name, &apply_params(), &Patch::Apply(&*secret))
                .await
                .map_err(Error::write(format!("Secret {namespace}/{reveal_name}")))?;
        }
        RevealAction::Delete => {
            match secrets_api.delete(&reveal_name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(e) if status_code(&e) == Some(404) => {}
                Err(e) => return Err(Error::write(format!("Secret {namespace}/{reveal_name}"))(e)),
            }
            report(ctx.recorder.as_ref(), &regarding, Transition::RevealDeleted).await;
        }
    }

    let secret_ref = key.spec.secret_ref.as_ref();
    let store = referenced(&ctx, &namespace, secret_ref.map(|r| r.name.as_str())).await?;
    let excluded = excluded_for(&ctx, &("ApiKey", ObjectRef::new(&namespace, &name))).await;
    let readiness = readiness::api_key(&key, !issuance.digests.is_empty(), &store, &excluded, now);
    let brought_prefix = secret_ref.and_then(|r| {
        let value = store.get(&ObjectRef::new(&namespace, &r.name), &r.key).ok()?;
        Some(ClientKey::from_brought(&SecretBytes::from_slice(value.expose())).ok()?.brought_display(&ctx.pepper))
    });
    let current = key.status.clone().unwrap_or_default();
    let conditions = with_ready(&current.conditions, &readiness, key.metadata.generation, now);
    let (enforcement, conditions) = acknowledgement::api_key(&ctx, &key).apply(
        current.enforcement.as_ref(),
        conditions,
        key.metadata.generation,
        now,
    );
    let desired = ApiKeyStatus {
        key_prefix: brought_prefix.or(issuance.key_prefix.clone()),
        reveal_secret: issuance.reveal_present.then(|| reveal_name.clone()),
        reveal_expires_at: issuance.reveal_expires_at,
        issued_at: issuance.issued_at,
        expires_at: key.spec.expires_at,
        rotation: issuance.rotation.clone(),
        issued_digests: issuance.digests.clone(),
        observed_generation: key.metadata.generation,
        enforcement,
        conditions,
    };
    // A status that moved (digests issued, Ready) wakes the writer, at once: a step that fails
    // after this (an Event, the ledger) is retried on a status that no longer differs.
    if apply_status(&api, &name, &current, &desired).await? {
        ctx.snapshot_trigger.notify_one();
    }

    if let Some(event) = issuance.event {
        let prefix = issuance.key_prefix.clone().unwrap_or_default();
        let transition = match event {
            IssuanceEvent::Issued => Transition::KeyIssued { prefix },
            IssuanceEvent::Rotated => Transition::KeyRotated { prefix },
            IssuanceEvent::Recovered => Transition::KeyRecovered { prefix },
        };
        report(ctx.recorder.as_ref(), &regarding, transition).await;
    }
    report_ready(&ctx, &regarding, &current.conditions, &readiness).await;
    audit_object::<ApiKey>(&ctx, &key.metadata, audit::observe_api_key(&key, now)).await?;
    ctx.backoff.reset(&format!("ApiKey/{namespace}/{name}"));
    Ok(requeue_after(&ctx, now, issuance.requeue_at.into_iter().chain(key.spec.expires_at)))
}

pub async fn reconcile_credential(
    object: Arc<Guarded<ProviderCredential>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    ctx.metrics.reconciles.with_label_values(&["ProviderCredential"]).inc();
    ctx.ensure_leading()?;
    let credential = match &object.0 {
        Ok(c) => c,
        Err(invalid) => return malformed::<ProviderCredential>(invalid, None, &ctx).await,
    };
    let key_version = credential.status.as_ref().and_then(|s| s.key_version);
    if let Some(done) =
        deleted::<ProviderCredential>(&ctx, &credential.metadata, audit::observe_credential(credential, key_version))
            .await?
    {
        return Ok(done);
    }
    let namespace = credential.namespace().unwrap_or_default();
    let name = credential.name_any();
    let now = ctx.now();
    let store = referenced(&ctx, &namespace, credential.spec.secret_ref.as_ref().map(|r| r.name.as_str())).await?;
    let object_key = ("ProviderCredential", ObjectRef::new(&namespace, &name));
    let excluded = excluded_for(&ctx, &object_key).await;
    let readiness = readiness::credential(credential, &store, &excluded);
    let sealed = {
        let state = ctx.snapshot.lock().await;
        state.previous.as_ref().and_then(|p| {
            p.content
                .credentials
                .iter()
                .find(|c| c.credential == object_key.1)
                .map(|c| (c.sealed_key.as_ref().map(|s| s.key_id.to_string()), c.key_version))
        })
    };
    let current = credential.status.clone().unwrap_or_default();
    let desired = ProviderCredentialStatus {
        sealed_with: sealed.as_ref().and_then(|(id, _)| id.clone()),
        key_version: sealed.as_ref().map(|(_, v)| *v),
        observed_generation: credential.metadata.generation,
        conditions: with_ready(&current.conditions, &readiness, credential.metadata.generation, now),
    };
    let api: Api<ProviderCredential> = Api::namespaced(ctx.client.clone(), &namespace);
    // Only a status that moved (a new spec, readiness, a reseal) wakes the writer: a resync of
    // an unchanged credential would cut short the writer's backoff after a failure. A changed
    // Secret value wakes it from the Secret watch.
    if apply_status(&api, &name, &current, &desired).await? {
        ctx.snapshot_trigger.notify_one();
    }
    report_ready(&ctx, &reference(credential), &current.conditions, &readiness).await;
    audit_object::<ProviderCredential>(
        &ctx,
        &credential.metadata,
        audit::observe_credential(credential, desired.key_version),
    )
    .await?;
    ctx.backoff.reset(&format!("ProviderCredential/{namespace}/{name}"));
    Ok(Action::requeue(ctx.settings.resync))
}

pub async fn reconcile_kill_switch(object: Arc<Guarded<KillSwitch>>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.with_label_values(&["KillSwitch"]).inc();
    ctx.ensure_leading()?;
    let switch = match &object.0 {
        Ok(s) => s,
        Err(invalid) => {
            // An unreadable switch keeps its last valid entry (`assemble`); its status says so.
            let key = ("KillSwitch", readiness::object_ref(&invalid.metadata));
            let kept = excluded_for(&ctx, &key).await.values().flatten().any(|e| e.message == KEPT_MESSAGE);
            return malformed::<KillSwitch>(invalid, kept.then_some(KEPT_MESSAGE), &ctx).await;
        }
    };
    let now = ctx.now();
    if let Some(done) = deleted::<KillSwitch>(&ctx, &switch.metadata, audit::observe_kill_switch(switch, now)).await? {
        return Ok(done);
    }
    let namespace = switch.namespace().unwrap_or_default();
    let name = switch.name_any();
    let excluded = excluded_for(&ctx, &("KillSwitch", ObjectRef::new(&namespace, &name))).await;
    let readiness = readiness::kill_switch(switch, &excluded, now);
    let current = switch.status.clone().unwrap_or_default();
    let conditions = with_ready(&current.conditions, &readiness, switch.metadata.generation, now);
    let (enforcement, conditions) = acknowledgement::kill_switch(&ctx, switch, readiness.reason).apply(
        current.enforcement.as_ref(),
        conditions,
        switch.metadata.generation,
        now,
    );
    let desired = KillSwitchStatus { observed_generation: switch.metadata.generation, enforcement, conditions };
    let api: Api<KillSwitch> = Api::namespaced(ctx.client.clone(), &namespace);
    // As for credentials: a flip or an expiry moves the status (observedGeneration, Ready).
    if apply_status(&api, &name, &current, &desired).await? {
        ctx.snapshot_trigger.notify_one();
    }
    report_ready(&ctx, &reference(switch), &current.conditions, &readiness).await;
    audit_object::<KillSwitch>(&ctx, &switch.metadata, audit::observe_kill_switch(switch, now)).await?;
    ctx.backoff.reset(&format!("KillSwitch/{namespace}/{name}"));
    Ok(requeue_after(&ctx, now, switch.spec.expires_at))
}

/// A deleted object, when the ledger is on: append its deletion, then release the finalizer.
/// Without a ledger there is no finalizer (but one left from a run with the ledger on, which is
/// released) and deletion needs nothing from the reconciler here.
async fn deleted<K>(ctx: &Context, meta: &ObjectMeta, observed: audit::Observed) -> Result<Option<Action>, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    if !observed.deleting {
        return Ok(None);
    }
    if ctx.audit.is_none() {
        return Ok(super::audit::release_leftover_finalizer::<K>(ctx, meta).await?.then(Action::await_change));
    }
    audit_object::<K>(ctx, meta, observed).await?;
    ctx.snapshot_trigger.notify_one();
    Ok(Some(Action::await_change()))
}

/// Transient errors retry with per-object exponential backoff; broken key material waits longer.
pub fn error_policy<K: Resource<DynamicType = ()>>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let kind = K::kind(&());
    let category = error.category();
    ctx.metrics.error(&kind, category);
    let key = format!(
        "{kind}/{}/{}",
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default()
    );
    tracing::warn!(%error, category = category.as_str(), object = %key, "reconcile failed");
    match category {
        crate::error::Category::KeyMaterial => Action::requeue(std::time::Duration::from_secs(60)),
        _ => Action::requeue(ctx.backoff.next(&key)),
    }
}
