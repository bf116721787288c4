//! Phase 2: emergency stops. Gateway-wide, per-namespace and per-key switches are checked as soon
//! as the caller is known; model switches once the model is read; provider switches, and model
//! switches on the name a provider is sent, while routing, so traffic fails over to providers
//! that are not stopped.

use chrono::{DateTime, Utc};
use portcullis_crds::pattern;
use portcullis_crds::snapshot::{ApiKeyEntry, KillSwitchEntry, SwitchScope};

use crate::error::GatewayError;
use crate::snapshot::{ModelRoute, RuntimeSnapshot};

fn stopped(switch: &KillSwitchEntry) -> GatewayError {
    GatewayError::KillSwitchActive { switch: switch.switch.to_string(), reason: switch.reason.clone() }
}

/// The first switch engaged at `now` that reaches `key` (a tenant's switch reaches only its own
/// namespace's keys) and whose scope `applies`.
fn engaged<'s>(
    snapshot: &'s RuntimeSnapshot,
    key: &ApiKeyEntry,
    now: DateTime<Utc>,
    applies: impl Fn(&SwitchScope) -> bool,
) -> Option<&'s KillSwitchEntry> {
    snapshot.kill_switches.iter().find(|s| s.stops(&key.key.namespace, now) && applies(&s.scope))
}

fn first_engaged(
    snapshot: &RuntimeSnapshot,
    key: &ApiKeyEntry,
    now: DateTime<Utc>,
    applies: impl Fn(&SwitchScope) -> bool,
) -> Result<(), GatewayError> {
    engaged(snapshot, key, now, applies).map_or(Ok(()), |switch| Err(stopped(switch)))
}

/// Global, namespace and key switches.
pub fn check_caller(snapshot: &RuntimeSnapshot, key: &ApiKeyEntry, now: DateTime<Utc>) -> Result<(), GatewayError> {
    first_engaged(snapshot, key, now, |scope| match scope {
        SwitchScope::Global => true,
        SwitchScope::ApiKey(target) => target == &key.key,
        SwitchScope::Namespace(ns) => ns == &key.key.namespace,
        SwitchScope::Provider(_) | SwitchScope::Model(_) => false,
    })
}

/// Model switches (name or glob pattern) on the model the client asked for.
pub fn check_model(
    snapshot: &RuntimeSnapshot,
    key: &ApiKeyEntry,
    model: &str,
    now: DateTime<Utc>,
) -> Result<(), GatewayError> {
    first_engaged(snapshot, key, now, |scope| model_matches(scope, model))
}

fn model_matches(scope: &SwitchScope, model: &str) -> bool {
    matches!(scope, SwitchScope::Model(p) if pattern::matches(p, model))
}

/// The engaged switch stopping one route for `key`, if any: a switch on its provider, or a
/// model switch on the name it sends upstream (a switch on `gpt-4o-mini` stops the alias
/// `fast` that a provider serves as `gpt-4o-mini`, while another provider may still serve
/// `fast`).
pub fn route_switch<'s>(
    snapshot: &'s RuntimeSnapshot,
    key: &ApiKeyEntry,
    route: &ModelRoute,
    now: DateTime<Utc>,
) -> Option<&'s KillSwitchEntry> {
    let upstream_model = route.upstream_model.as_deref();
    engaged(snapshot, key, now, |scope| match scope {
        SwitchScope::Provider(p) => p == &route.upstream.id,
        _ => upstream_model.is_some_and(|model| model_matches(scope, model)),
    })
}

/// The switch error for a route switch found while routing.
pub fn route_stopped(switch: &KillSwitchEntry) -> GatewayError {
    stopped(switch)
}

/// The kill switch that ends an open stream after a snapshot change, if any. Only kill switches
/// reach into requests in flight — an emergency stop must stop streams too. Revocation and
/// expiry, like every other change, apply to new requests: in-flight ones finish on the snapshot
/// they started with.
pub fn stream_must_stop(
    snapshot: &RuntimeSnapshot,
    key: &ApiKeyEntry,
    route: &ModelRoute,
    model: &str,
    now: DateTime<Utc>,
) -> Option<GatewayError> {
    if let Err(stop) = check_caller(snapshot, key, now).and_then(|()| check_model(snapshot, key, model, now)) {
        return Some(stop);
    }
    route_switch(snapshot, key, route, now).map(route_stopped)
}
