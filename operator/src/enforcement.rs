//! Acknowledgement counting (pure): which data-plane replicas enforce an object's current spec.
//!
//! ```text
//!   snapshot writer ──record──▶ InclusionIndex   object → first snapshot generation G holding
//!                                                its current state, and the spec generation it came from
//!   replica Leases  ──parse───▶ ReplicaAck       replica → applied generation, live until
//!                      │
//!                      └──▶ verdict(inclusion, object generation, acks, now) ──▶ status.enforcement
//!                                                                                 + condition `Enforced`
//! ```
//!
//! A replica counts when its Lease is live (renewed within its duration) and it reports a
//! generation ≥ G. Generations only grow, so a replica past G enforces the object's current state
//! (or something newer). An object whose current spec generation is not yet in any snapshot is
//! `SnapshotPending`; nothing is claimed for it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use portcullis_crds::acknowledgement::{DIGEST_ANNOTATION, GENERATION_ANNOTATION};
use portcullis_crds::snapshot::{ApiKeyEntry, GatewaySnapshot, KillSwitchEntry, SnapshotContent};
use portcullis_crds::v1alpha1::EnforcementStatus;

use crate::assemble::ObjectKey;
use crate::conditions::{with_condition, ConditionSet};

/// The condition type.
pub const ENFORCED: &str = "Enforced";

/// What one replica's Lease says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaAck {
    /// The Lease's holder (the pod name), or the Lease name.
    pub replica: String,
    /// The snapshot generation the replica serves; `None` before it applied any.
    pub generation: Option<u64>,
    pub digest: Option<String>,
    /// `renewTime + leaseDurationSeconds`: the replica counts until then.
    pub live_until: Option<DateTime<Utc>>,
}

impl ReplicaAck {
    pub fn from_lease(lease: &Lease) -> Self {
        let annotations = lease.metadata.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
        let spec = lease.spec.as_ref();
        let live_until = spec.and_then(|s| {
            let renewed = DateTime::from_timestamp_millis(s.renew_time.as_ref()?.0.as_millisecond())?;
            Some(renewed + chrono::Duration::seconds(i64::from(s.lease_duration_seconds?)))
        });
        Self {
            replica: spec
                .and_then(|s| s.holder_identity.clone())
                .or_else(|| lease.metadata.name.clone())
                .unwrap_or_default(),
            generation: annotation(GENERATION_ANNOTATION).and_then(|g| g.trim().parse().ok()),
            digest: annotation(DIGEST_ANNOTATION).map(str::to_owned),
            live_until,
        }
    }

    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.live_until.is_some_and(|until| until > now)
    }

    /// Whether this replica serves generation `needed` or a later one that the operator wrote. A
    /// generation past `latest`, or `latest`'s number with another digest, is not one of ours (a
    /// snapshot Secret recreated from scratch restarts the numbering, and replicas refuse to go
    /// back): it counts for nothing rather than for everything.
    pub fn serves(&self, needed: u64, latest: Option<&Latest>) -> bool {
        let Some(generation) = self.generation else {
            return false;
        };
        let ours = latest.is_none_or(|l| {
            generation < l.generation
                || (generation == l.generation && self.digest.as_deref().is_none_or(|d| d == l.digest))
        });
        generation >= needed && ours
    }
}

/// The highest replica-reported generation [`generation_floor`] follows.
pub const MAX_GENERATION_FOLLOWED: u64 = 1 << 48;

/// The generation a snapshot just compiled at `generation` with `digest` must go past for the
/// live replicas to take it, when it would not: the highest one a live replica serves, if that
/// is above `generation`, or equal with other content. That happens when the snapshot Secret was
/// deleted or reset (the numbering restarted) while replicas kept serving; replicas refuse to go
/// back, so without this every later snapshot, revocations included, would be refused until the
/// count caught up.
///
/// A replica's Lease is the replica's word, not proof: one reporting more than
/// [`MAX_GENERATION_FOLLOWED`] is not followed, so no Lease can push the numbering near its end
/// (where no later snapshot could be written). Real generations stay far below it: a snapshot a
/// millisecond for a thousand years is 2^45.
pub fn generation_floor(acks: &[ReplicaAck], generation: u64, digest: &str, now: DateTime<Utc>) -> Option<u64> {
    let live = acks.iter().filter(|a| a.is_live(now));
    let ahead = live.filter_map(|a| {
        let served = a.generation.filter(|&g| g <= MAX_GENERATION_FOLLOWED)?;
        let other_content = served == generation && a.digest.as_deref().is_some_and(|d| d != digest);
        (served > generation || other_content).then_some(served)
    });
    ahead.max()
}

/// The snapshot the operator last compiled (written, or found unchanged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latest {
    pub generation: u64,
    pub digest: String,
}

/// Where an object's current state first appeared in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inclusion {
    /// The first snapshot generation holding the object as it is now (its entry, or its absence
    /// when compile left it out).
    pub snapshot_generation: u64,
    /// The object's `metadata.generation` when that snapshot was compiled.
    pub object_generation: Option<i64>,
}

/// An object a snapshot is compiled from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompiledObject {
    /// Its `metadata.generation`.
    pub generation: Option<i64>,
    /// The snapshot generation its status reports for this same spec generation (written by
    /// an earlier leader). Trusted only while the snapshot still carries the object unchanged.
    pub reported: Option<u64>,
}

/// An object as a snapshot carries it, to tell whether it changed between two snapshots.
#[derive(Debug, PartialEq)]
enum Entry<'a> {
    ApiKey(&'a ApiKeyEntry),
    KillSwitch(&'a KillSwitchEntry),
}

fn entries(content: &SnapshotContent) -> BTreeMap<ObjectKey, Entry<'_>> {
    let keys = content.api_keys.iter().map(|e| (("ApiKey", e.key.clone()), Entry::ApiKey(e)));
    let switches = content.kill_switches.iter().map(|e| (("KillSwitch", e.switch.clone()), Entry::KillSwitch(e)));
    keys.chain(switches).collect()
}

/// Per object, the first snapshot generation that holds its current state. Kept by the snapshot
/// writer, in memory. After a restart an object the snapshot still carries unchanged takes the
/// generation its status reported for the same spec, else the current generation: cautious, never
/// claiming enforcement too early, and no status rewrite on every failover.
#[derive(Debug, Default)]
pub struct InclusionIndex {
    entries: BTreeMap<ObjectKey, Inclusion>,
    latest: Option<Latest>,
}

impl InclusionIndex {
    /// Records a compiled `current` snapshot (whether newly written or unchanged), `previous`
    /// being the content the data plane had been sent before it, and `objects` the objects (with
    /// their `metadata.generation`) it was compiled from. Returns the objects whose inclusion
    /// moved, so their status can be redone.
    pub fn record(
        &mut self,
        previous: Option<&SnapshotContent>,
        current: &GatewaySnapshot,
        objects: &BTreeMap<ObjectKey, CompiledObject>,
    ) -> Vec<ObjectKey> {
        let before = previous.map(entries);
        let now = entries(&current.content);
        let mut next = BTreeMap::new();
        let mut moved = Vec::new();
        for (key, object) in objects {
            let unchanged = before.as_ref().is_some_and(|b| b.get(key) == now.get(key));
            let snapshot_generation = match self.entries.get(key) {
                Some(old) if unchanged => old.snapshot_generation,
                None if unchanged => object.reported.filter(|g| *g <= current.generation).unwrap_or(current.generation),
                _ => current.generation,
            };
            let inclusion = Inclusion { snapshot_generation, object_generation: object.generation };
            if self.entries.get(key) != Some(&inclusion) {
                moved.push(key.clone());
            }
            next.insert(key.clone(), inclusion);
        }
        self.entries = next;
        self.latest = Some(Latest { generation: current.generation, digest: current.content_digest.clone() });
        moved
    }

    pub fn latest(&self) -> Option<&Latest> {
        self.latest.as_ref()
    }

    pub fn get(&self, key: &ObjectKey) -> Option<Inclusion> {
        self.entries.get(key).copied()
    }
}

/// Live replicas, and how many of them serve generation `needed` or later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    pub enforced: u32,
    pub replicas: u32,
}

pub fn tally<'a>(
    acks: impl IntoIterator<Item = &'a ReplicaAck>,
    needed: u64,
    latest: Option<&Latest>,
    now: DateTime<Utc>,
) -> Tally {
    let mut tally = Tally::default();
    for ack in acks.into_iter().filter(|a| a.is_live(now)) {
        tally.replicas = tally.replicas.saturating_add(1);
        if ack.serves(needed, latest) {
            tally.enforced = tally.enforced.saturating_add(1);
        }
    }
    tally
}

/// Why `Enforced` has the status it has. The string forms are part of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnforcedReason {
    /// Every live replica applied the snapshot holding the current spec.
    Applied,
    /// Some live replicas have not applied it yet.
    Propagating,
    /// The current spec is not in a written snapshot yet.
    SnapshotPending,
    /// No live data-plane replica reports anything.
    NoReplicas,
}

impl EnforcedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EnforcedReason::Applied => "Applied",
            EnforcedReason::Propagating => "Propagating",
            EnforcedReason::SnapshotPending => "SnapshotPending",
            EnforcedReason::NoReplicas => "NoReplicas",
        }
    }

    fn status(self) -> &'static str {
        match self {
            EnforcedReason::Applied => "True",
            EnforcedReason::Propagating | EnforcedReason::SnapshotPending => "False",
            EnforcedReason::NoReplicas => "Unknown",
        }
    }
}

/// What status says about enforcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub status: EnforcementStatus,
    pub reason: EnforcedReason,
    pub message: String,
}

/// The verdict for an object at `object_generation`, given where its state was included and what
/// the replicas report.
pub fn verdict(
    inclusion: Option<Inclusion>,
    object_generation: Option<i64>,
    acks: &[ReplicaAck],
    latest: Option<&Latest>,
    now: DateTime<Utc>,
) -> Verdict {
    let included = inclusion.filter(|i| i.object_generation == object_generation);
    let needed = included.map(|i| i.snapshot_generation);
    let tally = match needed {
        Some(g) => tally(acks, g, latest, now),
        None => Tally { enforced: 0, ..tally(acks, u64::MAX, latest, now) },
    };
    let summary = format!("{}/{}", tally.enforced, tally.replicas);
    let (reason, message) = match needed {
        None => (
            EnforcedReason::SnapshotPending,
            format!("the current spec is not in a snapshot yet ({} live data-plane replicas)", tally.replicas),
        ),
        Some(_) if tally.replicas == 0 => {
            (EnforcedReason::NoReplicas, "no live data-plane replica reports an applied snapshot".to_owned())
        }
        Some(g) => (
            if tally.enforced == tally.replicas { EnforcedReason::Applied } else { EnforcedReason::Propagating },
            format!("{summary} data-plane replicas applied snapshot generation {g}"),
        ),
    };
    Verdict {
        status: EnforcementStatus {
            snapshot_generation: needed,
            enforced_replicas: tally.enforced,
            replicas: tally.replicas,
            summary,
        },
        reason,
        message,
    }
}

/// Returns `existing` with `Enforced` set from `verdict`, or removed when `None`. Keeps
/// `lastTransitionTime` when the condition's status did not change, so an unchanged verdict gives
/// an identical list (and no write).
pub fn with_enforced(
    existing: &[Condition],
    verdict: Option<&Verdict>,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Vec<Condition> {
    let set =
        verdict.map(|v| ConditionSet { status: v.reason.status(), reason: v.reason.as_str(), message: &v.message });
    with_condition(existing, ENFORCED, set, generation, now)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;
    use portcullis_crds::snapshot::SwitchScope;
    use portcullis_crds::v1alpha1::ObjectRef;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn ack(replica: &str, generation: Option<u64>, live_until: &str) -> ReplicaAck {
        ReplicaAck { replica: replica.into(), generation, digest: None, live_until: Some(t(live_until)) }
    }

    #[test]
    fn the_floor_is_the_highest_generation_live_replicas_serve_past_ours() {
        let now = t("2025-06-01T12:00:00Z");
        let live = "2025-06-01T12:00:30Z";
        let with_digest = |generation, digest: &str, until: &str| ReplicaAck {
            digest: Some(digest.into()),
            ..ack("r", Some(generation), until)
        };
        // Behind or level with ours, same content: nothing to go past.
        assert_eq!(generation_floor(&[ack("a", Some(3), live), ack("b", None, live)], 5, "d5", now), None);
        assert_eq!(generation_floor(&[with_digest(5, "d5", live)], 5, "d5", now), None);
        // Ahead (the snapshot Secret was deleted and the numbering restarted): theirs.
        assert_eq!(generation_floor(&[ack("a", Some(40), live), ack("b", Some(42), live)], 1, "d1", now), Some(42));
        // Level with other content: a generation is never reused for other content.
        assert_eq!(generation_floor(&[with_digest(5, "other", live)], 5, "d5", now), Some(5));
        // A replica that stopped renewing its Lease counts for nothing.
        assert_eq!(generation_floor(&[ack("gone", Some(99), "2025-06-01T11:59:59Z")], 1, "d1", now), None);
        // A Lease claiming a generation no operator can have written is not followed: the
        // numbering cannot be pinned at its end.
        let liar = ack("liar", Some(u64::MAX - 1), live);
        assert_eq!(generation_floor(&[liar.clone(), ack("a", Some(42), live)], 1, "d1", now), Some(42));
        assert_eq!(generation_floor(&[liar], 1, "d1", now), None);
        let edge = |g| generation_floor(&[ack("a", Some(g), live)], 1, "d1", now);
        assert_eq!(
            (edge(MAX_GENERATION_FOLLOWED), edge(MAX_GENERATION_FOLLOWED + 1)),
            (Some(MAX_GENERATION_FOLLOWED), None)
        );
    }

    fn switch(active: bool) -> KillSwitchEntry {
        KillSwitchEntry {
            switch: ObjectRef::new("ops", "stop"),
            scope: SwitchScope::Global,
            active,
            reason: None,
            expires_at: None,
            tenant: None,
        }
    }

    fn at(generation: i64) -> CompiledObject {
        CompiledObject { generation: Some(generation), reported: None }
    }

    fn snapshot(switches: Vec<KillSwitchEntry>, previous: Option<&GatewaySnapshot>) -> GatewaySnapshot {
        GatewaySnapshot::new(SnapshotContent { kill_switches: switches, ..Default::default() }, previous)
    }

    const NOW: &str = "2025-03-01T12:00:00Z";

    #[test]
    fn only_live_replicas_at_or_past_the_generation_count() {
        let acks = [
            ack("a", Some(42), "2025-03-01T12:00:20Z"),
            ack("b", Some(43), "2025-03-01T12:00:20Z"),
            ack("c", Some(41), "2025-03-01T12:00:20Z"),
            ack("d", None, "2025-03-01T12:00:20Z"),
            // Expired: gone without deleting its Lease.
            ack("e", Some(50), "2025-03-01T11:59:59Z"),
        ];
        assert_eq!(tally(&acks, 42, None, t(NOW)), Tally { enforced: 2, replicas: 4 });
        assert_eq!(tally(&acks, 44, None, t(NOW)), Tally { enforced: 0, replicas: 4 });
        assert_eq!(tally(&acks[..0], 1, None, t(NOW)), Tally::default());

        // Checked against what the operator wrote: past it, or the same number with another
        // digest, is someone else's snapshot.
        let latest = Latest { generation: 42, digest: "d42".into() };
        let with_digest =
            |g: u64, d: &str| ReplicaAck { digest: Some(d.into()), ..ack("x", Some(g), "2025-03-01T12:00:20Z") };
        assert!(with_digest(42, "d42").serves(42, Some(&latest)));
        assert!(with_digest(41, "d41").serves(40, Some(&latest)));
        assert!(!with_digest(42, "other").serves(42, Some(&latest)));
        assert!(!with_digest(43, "d43").serves(42, Some(&latest)));
        assert_eq!(tally(&acks, 42, Some(&latest), t(NOW)), Tally { enforced: 1, replicas: 4 });
    }

    #[test]
    fn verdicts_say_how_many_of_how_many() {
        let inclusion = Some(Inclusion { snapshot_generation: 42, object_generation: Some(3) });
        let all = [ack("a", Some(42), "2025-03-01T12:00:20Z"), ack("b", Some(44), "2025-03-01T12:00:20Z")];
        let v = verdict(inclusion, Some(3), &all, None, t(NOW));
        assert_eq!(v.reason, EnforcedReason::Applied);
        assert_eq!(v.message, "2/2 data-plane replicas applied snapshot generation 42");
        assert_eq!(
            v.status,
            EnforcementStatus {
                snapshot_generation: Some(42),
                enforced_replicas: 2,
                replicas: 2,
                summary: "2/2".into()
            }
        );

        let behind = [all[0].clone(), ack("c", Some(41), "2025-03-01T12:00:20Z")];
        let v = verdict(inclusion, Some(3), &behind, None, t(NOW));
        assert_eq!((v.reason, v.status.summary.as_str()), (EnforcedReason::Propagating, "1/2"));

        // The spec moved on (generation 4) and no snapshot holds it yet: nothing is claimed.
        let v = verdict(inclusion, Some(4), &all, None, t(NOW));
        assert_eq!((v.reason, v.status.summary.as_str()), (EnforcedReason::SnapshotPending, "0/2"));
        assert_eq!(v.status.snapshot_generation, None);
        let v = verdict(None, Some(1), &all, None, t(NOW));
        assert_eq!(v.reason, EnforcedReason::SnapshotPending);

        let v = verdict(inclusion, Some(3), &[], None, t(NOW));
        assert_eq!((v.reason, v.status.summary.as_str()), (EnforcedReason::NoReplicas, "0/0"));
    }

    #[test]
    fn inclusion_moves_only_with_the_objects_own_entry() {
        let key: ObjectKey = ("KillSwitch", ObjectRef::new("ops", "stop"));
        let other: ObjectKey = ("KillSwitch", ObjectRef::new("ops", "other"));
        let mut index = InclusionIndex::default();
        let objects = BTreeMap::from([(key.clone(), at(1))]);
        let g1 = snapshot(vec![switch(false)], None);
        assert_eq!(index.record(None, &g1, &objects), vec![key.clone()]);
        assert_eq!(index.get(&key), Some(Inclusion { snapshot_generation: 1, object_generation: Some(1) }));

        // Unchanged compile: nothing moves.
        assert!(index.record(Some(&g1.content), &g1, &objects).is_empty());

        // Another object changes: generation 2, but this switch's state was already in 1.
        let mut other_switch = switch(true);
        other_switch.switch = other.1.clone();
        let g2 = snapshot(vec![other_switch.clone(), switch(false)], Some(&g1));
        assert_eq!(g2.generation, 2);
        let both = BTreeMap::from([(key.clone(), at(1)), (other.clone(), at(1))]);
        assert_eq!(index.record(Some(&g1.content), &g2, &both), vec![other.clone()]);
        assert_eq!(index.get(&key).map(|i| i.snapshot_generation), Some(1));
        assert_eq!(index.get(&other).map(|i| i.snapshot_generation), Some(2));

        // The switch flips (spec generation 2): generation 3 holds it.
        let g3 = snapshot(vec![other_switch, switch(true)], Some(&g2));
        let flipped = BTreeMap::from([(key.clone(), at(2)), (other.clone(), at(1))]);
        assert_eq!(index.record(Some(&g2.content), &g3, &flipped), vec![key.clone()]);
        assert_eq!(index.get(&key), Some(Inclusion { snapshot_generation: 3, object_generation: Some(2) }));

        // A spec edit that compiles to the same entry: the spec generation moves, G does not.
        let edited = BTreeMap::from([(key.clone(), at(3)), (other.clone(), at(1))]);
        assert_eq!(index.record(Some(&g3.content), &g3, &edited), vec![key.clone()]);
        assert_eq!(index.get(&key), Some(Inclusion { snapshot_generation: 3, object_generation: Some(3) }));

        // A fresh index (operator restart) is cautious: the current generation, unless status
        // reported one for the same spec and the snapshot still carries the object unchanged.
        let mut fresh = InclusionIndex::default();
        let restarted = BTreeMap::from([
            (key.clone(), CompiledObject { generation: Some(3), reported: Some(3) }),
            (other.clone(), at(1)),
        ]);
        fresh.record(Some(&g3.content), &g3, &restarted);
        assert_eq!(fresh.get(&other).map(|i| i.snapshot_generation), Some(3));
        assert_eq!(fresh.get(&key).map(|i| i.snapshot_generation), Some(3));
        let mut fresh = InclusionIndex::default();
        let reported = BTreeMap::from([(other.clone(), CompiledObject { generation: Some(1), reported: Some(2) })]);
        fresh.record(Some(&g3.content), &g3, &reported);
        assert_eq!(fresh.get(&other).map(|i| i.snapshot_generation), Some(2));
        // A report from the future (a snapshot Secret recreated from scratch) is not trusted.
        let mut fresh = InclusionIndex::default();
        let future = BTreeMap::from([(other.clone(), CompiledObject { generation: Some(1), reported: Some(9) })]);
        fresh.record(Some(&g3.content), &g3, &future);
        assert_eq!(fresh.get(&other).map(|i| i.snapshot_generation), Some(3));
    }

    #[test]
    fn leases_parse_and_conditions_keep_their_transition_time() {
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "portcullis-dp-pod-1", "annotations": {
                GENERATION_ANNOTATION: "42", DIGEST_ANNOTATION: "abc"}},
            "spec": {"holderIdentity": "pod-1", "leaseDurationSeconds": 30, "renewTime": "2025-03-01T11:59:45.000000Z"},
        }))
        .unwrap();
        let parsed = ReplicaAck::from_lease(&lease);
        assert_eq!(parsed.replica, "pod-1");
        assert_eq!(parsed.generation, Some(42));
        assert_eq!(parsed.digest.as_deref(), Some("abc"));
        assert!(parsed.is_live(t(NOW)));
        assert!(!parsed.is_live(t("2025-03-01T12:00:15Z")));
        assert!(!ReplicaAck::from_lease(&Lease::default()).is_live(t(NOW)));

        let inclusion = Some(Inclusion { snapshot_generation: 42, object_generation: Some(1) });
        let v = verdict(inclusion, Some(1), &[parsed], None, t(NOW));
        let first = with_enforced(&[], Some(&v), Some(1), t(NOW));
        let later = with_enforced(&first, Some(&v), Some(1), t("2025-03-01T12:05:00Z"));
        assert_eq!(first, later);
        assert_eq!(first[0].status, "True");
        assert!(with_enforced(&first, None, Some(1), t(NOW)).is_empty());
    }
}
