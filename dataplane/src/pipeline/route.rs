//! Phase 3: which credential serves this request. Unknown model (or one only another
//! namespace's own provider serves) → 404; a model or provider this
//! key may not use → 403; every permitted provider stopped → 503. Among what is left, the
//! highest priority wins and equal priorities share traffic by weight.

use chrono::{DateTime, Utc};
use portcullis_crds::pattern;
use portcullis_crds::snapshot::ApiKeyEntry;
use smallvec::SmallVec;

use crate::api::ApiRoute;
use crate::error::{echoable_model, GatewayError};
use crate::pipeline::kill_switch;
use crate::snapshot::{ModelRoute, RuntimeSnapshot};

pub fn choose<'s>(
    snapshot: &'s RuntimeSnapshot,
    key: &ApiKeyEntry,
    route: ApiRoute,
    model: &str,
    now: DateTime<Utc>,
) -> Result<&'s ModelRoute, GatewayError> {
    let serves_route = |r: &ModelRoute| match route {
        ApiRoute::Messages => r.upstream.kind.serves_anthropic_routes(),
        ApiRoute::ChatCompletions
        | ApiRoute::Completions
        | ApiRoute::Embeddings
        | ApiRoute::Responses
        | ApiRoute::Models => r.upstream.kind.serves_openai_routes(),
    };
    // References into the snapshot, on the stack for the usual few: the one chosen is cloned by
    // the caller, the others never.
    // A tenant's provider serves only its own namespace's keys: to any other key its models do
    // not exist.
    let mut candidates: Candidates<'s> =
        snapshot.routes_for(model).filter(|r| serves_route(r) && r.upstream.serves(key)).collect();
    if candidates.is_empty() {
        return Err(GatewayError::ModelNotFound { model: echoable_model(model) });
    }
    let not_allowed =
        || GatewayError::ModelNotAllowed { model: echoable_model(model).unwrap_or_else(|| "requested".to_owned()) };
    if !pattern::any_matches_or_empty(&key.allowed_models, model) {
        return Err(not_allowed());
    }
    candidates.retain(|r| pattern::any_matches_or_empty(&key.allowed_providers, &r.upstream.id.name));
    if candidates.is_empty() {
        return Err(not_allowed());
    }
    let mut first_stop = None;
    candidates.retain(|r| match kill_switch::route_switch(snapshot, key, r, now) {
        Some(switch) => {
            first_stop.get_or_insert(switch);
            false
        }
        None => true,
    });
    if let Some(switch) = first_stop.filter(|_| candidates.is_empty()) {
        return Err(kill_switch::route_stopped(switch));
    }
    Ok(pick(candidates))
}

type Candidates<'s> = SmallVec<[&'s ModelRoute; 4]>;

/// Highest priority first; weighted random among equals (weight 0 only when all are 0).
fn pick(mut candidates: Candidates<'_>) -> &ModelRoute {
    let top = candidates.iter().map(|r| r.upstream.priority).max().unwrap_or_default();
    candidates.retain(|r| r.upstream.priority == top);
    if candidates.len() == 1 {
        return candidates.swap_remove(0);
    }
    let total: u64 = candidates.iter().map(|r| u64::from(r.upstream.weight)).sum();
    if total == 0 {
        let i = fastrand::usize(..candidates.len());
        return candidates.swap_remove(i);
    }
    let mut ticket = fastrand::u64(..total);
    for (i, r) in candidates.iter().enumerate() {
        let w = u64::from(r.upstream.weight);
        if ticket < w {
            return candidates.swap_remove(i);
        }
        ticket -= w;
    }
    candidates.swap_remove(0)
}
