//! Acknowledgements in the cluster: the data-plane replicas' Leases, followed with one
//! label-selected watch, turned into the `Enforced` status of KillSwitches and revoked ApiKeys.
//!
//! ```text
//!   Lease watch (component=dataplane-ack) ─▶ Store<Lease> ─┐
//!   snapshot writer ─▶ InclusionIndex (record) ────────────┼─▶ stale(): objects whose status
//!   every few seconds (Leases expire silently) ────────────┘   differs ─▶ retrigger their reconcile
//!   reconcile ─▶ Report::apply ─▶ status.enforcement + `Enforced` (written only when it changed)
//! ```
//!
//! Heartbeats change nothing: an object is reconciled again only when its count would change.

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::Store;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use portcullis_crds::acknowledgement::LABEL_SELECTOR;
use portcullis_crds::snapshot::{GatewaySnapshot, SnapshotContent};
use portcullis_crds::v1alpha1::{ApiKey, EnforcementStatus, KillSwitch};
use prometheus::{Histogram, HistogramOpts, IntGauge, Registry};

use super::context::Context;
use crate::assemble::ObjectKey;
use crate::conditions::{ready_reason, ReadyReason};
use crate::enforcement::{verdict, with_enforced, CompiledObject, InclusionIndex, ReplicaAck, Verdict, ENFORCED};
use crate::inputs::CompileInputs;
use crate::readiness::object_ref;

/// How the data plane keeps up, as metrics.
#[derive(Clone, Debug)]
pub struct AckMetrics {
    replicas: IntGauge,
    current: IntGauge,
    propagation: Histogram,
}

impl AckMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let replicas = IntGauge::new(
            "portcullis_operator_dataplane_replicas",
            "Live data-plane replicas (each renews its acknowledgement Lease)",
        )?;
        let current = IntGauge::new(
            "portcullis_operator_dataplane_replicas_current",
            "Live data-plane replicas serving the latest snapshot the operator wrote",
        )?;
        let propagation = Histogram::with_opts(
            HistogramOpts::new(
                "portcullis_operator_snapshot_propagation_seconds",
                "From writing a snapshot to every live data-plane replica reporting it applied",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
        )?;
        registry.register(Box::new(replicas.clone()))?;
        registry.register(Box::new(current.clone()))?;
        registry.register(Box::new(propagation.clone()))?;
        Ok(Self { replicas, current, propagation })
    }
}

/// The replicas' Leases and, per object, where its current state entered a snapshot.
pub struct Acknowledgements {
    replicas: Store<Lease>,
    /// Set once the Lease cache holds a complete list; until then status keeps what it says.
    synced: AtomicBool,
    included: Mutex<InclusionIndex>,
    metrics: Option<AckMetrics>,
    /// The latest generation written and when, until every live replica reports it.
    propagating: Mutex<Option<(u64, Instant)>>,
}

impl std::fmt::Debug for Acknowledgements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acknowledgements")
            .field("replicas", &self.replicas.len())
            .field("synced", &self.synced.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for Acknowledgements {
    /// No Lease cache: enforcement is never reported.
    fn default() -> Self {
        Self::new(Writer::default().as_reader())
    }
}

impl Acknowledgements {
    pub fn new(replicas: Store<Lease>) -> Self {
        Self {
            replicas,
            synced: AtomicBool::new(false),
            included: Mutex::new(InclusionIndex::default()),
            metrics: None,
            propagating: Mutex::new(None),
        }
    }

    pub fn with_metrics(mut self, metrics: AckMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Updates the metrics from the Leases at `now`.
    pub fn observe(&self, now: DateTime<Utc>) {
        let Some(metrics) = &self.metrics else { return };
        let acks = self.replicas();
        let latest = self.included.lock().unwrap_or_else(|p| p.into_inner()).latest().cloned();
        let live = acks.iter().filter(|a| a.is_live(now)).count();
        let current = match &latest {
            Some(l) => acks.iter().filter(|a| a.is_live(now) && a.serves(l.generation, Some(l))).count(),
            None => 0,
        };
        metrics.replicas.set(i64::try_from(live).unwrap_or(i64::MAX));
        metrics.current.set(i64::try_from(current).unwrap_or(i64::MAX));
        let mut propagating = self.propagating.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some((generation, since)), Some(l)) = (*propagating, &latest) {
            if generation == l.generation && live > 0 && current == live {
                metrics.propagation.observe(since.elapsed().as_secs_f64());
                *propagating = None;
            }
        }
    }

    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    pub fn replicas(&self) -> Vec<ReplicaAck> {
        self.replicas.state().iter().map(|lease| ReplicaAck::from_lease(lease)).collect()
    }

    /// See [`InclusionIndex::record`].
    pub fn record(
        &self,
        previous: Option<&SnapshotContent>,
        current: &GatewaySnapshot,
        objects: &BTreeMap<ObjectKey, CompiledObject>,
    ) -> Vec<ObjectKey> {
        let mut index = self.included.lock().unwrap_or_else(|p| p.into_inner());
        if index.latest().is_some_and(|l| l.generation != current.generation) {
            *self.propagating.lock().unwrap_or_else(|p| p.into_inner()) = Some((current.generation, Instant::now()));
        }
        index.record(previous, current, objects)
    }

    fn verdict(
        &self,
        key: &ObjectKey,
        object_generation: Option<i64>,
        acks: &[ReplicaAck],
        now: DateTime<Utc>,
    ) -> Verdict {
        let index = self.included.lock().unwrap_or_else(|p| p.into_inner());
        verdict(index.get(key), object_generation, acks, index.latest(), now)
    }
}

/// The snapshot generation `status` reports for spec `generation`, if it reports one.
fn reported(generation: Option<i64>, conditions: &[Condition], enforcement: Option<&EnforcementStatus>) -> Option<u64> {
    let condition = conditions.iter().find(|c| c.type_ == ENFORCED)?;
    if condition.observed_generation != generation {
        return None;
    }
    enforcement?.snapshot_generation
}

/// The objects a compile starts from that report enforcement (every KillSwitch, revoked
/// ApiKeys), for [`Acknowledgements::record`].
pub fn compiled_objects(inputs: &CompileInputs) -> BTreeMap<ObjectKey, CompiledObject> {
    let keys = inputs.api_keys.iter().filter(|k| k.spec.revoked).map(|k| {
        let generation = k.metadata.generation;
        let status = k.status.as_ref();
        let reported = status.and_then(|s| reported(generation, &s.conditions, s.enforcement.as_ref()));
        (("ApiKey", object_ref(&k.metadata)), CompiledObject { generation, reported })
    });
    let switches = inputs.kill_switches.iter().map(|k| {
        let generation = k.metadata.generation;
        let status = k.status.as_ref();
        let reported = status.and_then(|s| reported(generation, &s.conditions, s.enforcement.as_ref()));
        (("KillSwitch", object_ref(&k.metadata)), CompiledObject { generation, reported })
    });
    keys.chain(switches).collect()
}

/// What an object's status should say about enforcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Not known yet (the Lease cache is still filling): leave status as it is.
    Keep,
    /// Nothing to report for this object: no `Enforced`, no `enforcement`.
    Clear,
    Set(Verdict),
}

impl Report {
    /// `status.enforcement` and the conditions (`Ready` already merged in) to write.
    pub fn apply(
        &self,
        current: Option<&EnforcementStatus>,
        conditions: Vec<Condition>,
        generation: Option<i64>,
        now: DateTime<Utc>,
    ) -> (Option<EnforcementStatus>, Vec<Condition>) {
        match self {
            Report::Keep => (current.cloned(), conditions),
            Report::Clear => (None, with_enforced(&conditions, None, generation, now)),
            Report::Set(v) => (Some(v.status.clone()), with_enforced(&conditions, Some(v), generation, now)),
        }
    }

    fn enforcement(&self) -> Option<Option<&EnforcementStatus>> {
        match self {
            Report::Keep => None,
            Report::Clear => Some(None),
            Report::Set(v) => Some(Some(&v.status)),
        }
    }
}

/// `acks` is `None` until the Lease cache is complete.
fn report(
    ctx: &Context,
    acks: Option<&[ReplicaAck]>,
    key: &ObjectKey,
    generation: Option<i64>,
    wanted: bool,
) -> Report {
    match acks {
        _ if !wanted => Report::Clear,
        None => Report::Keep,
        Some(acks) => Report::Set(ctx.acknowledgements.verdict(key, generation, acks, ctx.now())),
    }
}

fn acks(ctx: &Context) -> Option<Vec<ReplicaAck>> {
    ctx.acknowledgements.is_synced().then(|| ctx.acknowledgements.replicas())
}

/// A switch left out of the snapshot (its Ready says why) has nothing enforced to count.
fn switch_reported(ready: Option<&str>) -> bool {
    !matches!(ready, Some(r) if r == ReadyReason::InvalidSpec.as_str() || r == ReadyReason::SecretNotFound.as_str())
}

/// Every KillSwitch in the snapshot reports how far its current spec has reached.
pub fn kill_switch(ctx: &Context, switch: &KillSwitch, ready: ReadyReason) -> Report {
    let key = ("KillSwitch", object_ref(&switch.metadata));
    report(ctx, acks(ctx).as_deref(), &key, switch.metadata.generation, switch_reported(Some(ready.as_str())))
}

/// An ApiKey reports it only while revoked: how many replicas refuse it.
pub fn api_key(ctx: &Context, key: &ApiKey) -> Report {
    api_key_with(ctx, acks(ctx).as_deref(), key)
}

fn api_key_with(ctx: &Context, acks: Option<&[ReplicaAck]>, key: &ApiKey) -> Report {
    let object = ("ApiKey", object_ref(&key.metadata));
    report(ctx, acks, &object, key.metadata.generation, key.spec.revoked)
}

/// Objects whose status no longer says what the replicas report.
pub fn stale(ctx: &Context) -> Vec<ObjectKey> {
    let mut out = Vec::new();
    let Some(acks) = acks(ctx) else {
        return out;
    };
    for guarded in ctx.stores.kill_switches.state() {
        let Ok(switch) = &guarded.0 else { continue };
        let status = switch.status.as_ref();
        let ready = status.and_then(|s| ready_reason(&s.conditions));
        let key = ("KillSwitch", object_ref(&switch.metadata));
        let desired = report(ctx, Some(&acks), &key, switch.metadata.generation, switch_reported(ready));
        if desired.enforcement() != Some(status.and_then(|s| s.enforcement.as_ref())) {
            out.push(key);
        }
    }
    for guarded in ctx.stores.api_keys.state() {
        let Ok(key) = &guarded.0 else { continue };
        let current = key.status.as_ref().and_then(|s| s.enforcement.as_ref());
        if api_key_with(ctx, Some(&acks), key).enforcement() != Some(current) {
            out.push(("ApiKey", object_ref(&key.metadata)));
        }
    }
    out
}

fn recheck(ctx: &Context) {
    if ctx.ensure_leading().is_err() {
        return;
    }
    ctx.acknowledgements.observe(ctx.now());
    for key in stale(ctx) {
        ctx.retrigger.object(&key);
    }
}

/// Follows the replicas' Leases in the operator's namespace; reconciles the objects whose count
/// changed, on every Lease change and every `recheck_every` (a replica that vanished stops
/// counting when its Lease runs out, which no event announces).
pub async fn follow(ctx: Arc<Context>, writer: Writer<Lease>, recheck_every: Duration) {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let events = watcher(api, watcher::Config::default().labels(LABEL_SELECTOR).any_semantic())
        .default_backoff()
        .reflect(writer);
    let mut events = pin!(events);
    let mut tick = tokio::time::interval(recheck_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.next() => match event {
                None => return,
                Some(Ok(watcher::Event::InitDone)) => {
                    ctx.acknowledgements.mark_synced();
                    recheck(&ctx);
                }
                Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) => recheck(&ctx),
                Some(Ok(_)) => {}
                Some(Err(error)) => tracing::warn!(%error, "data-plane Lease watch error"),
            },
            _ = tick.tick() => recheck(&ctx),
        }
    }
}
