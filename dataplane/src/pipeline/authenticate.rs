//! Phase 1: who is calling. Unknown, expired, revoked and rotated-out keys are refused.

use chrono::{DateTime, Utc};

use crate::api::presented_key;
use crate::error::GatewayError;
use crate::fields::HeaderFields;
use crate::snapshot::{KeyGrant, RuntimeSnapshot};

pub fn authenticate<'s>(
    snapshot: &'s RuntimeSnapshot,
    headers: &impl HeaderFields,
    now: DateTime<Utc>,
) -> Result<&'s KeyGrant, GatewayError> {
    let presented = presented_key(headers).filter(|k| !k.is_empty()).ok_or(GatewayError::MissingApiKey)?;
    let grant = snapshot.lookup_key(presented).ok_or(GatewayError::InvalidApiKey)?;
    if grant.policy.revoked {
        return Err(GatewayError::ApiKeyRevoked);
    }
    if grant.policy.expires_at.is_some_and(|at| now >= at) {
        return Err(GatewayError::ApiKeyExpired);
    }
    // The old key of a finished rotation is simply unknown from now on.
    if grant.valid_until.is_some_and(|until| now >= until) {
        return Err(GatewayError::InvalidApiKey);
    }
    Ok(grant)
}
