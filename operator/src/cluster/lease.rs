//! Leader election through a `coordination.k8s.io/v1` Lease.
//!
//! The Lease is the one object written with optimistic concurrency (`replace` with the read
//! `resourceVersion`) instead of server-side apply: taking over a lease must fail if anyone else
//! touched it since it was read, and that is exactly what a resourceVersion precondition says.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::Api;

use crate::error::{status_code, Error};

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

fn desired(settings: &LeaseSettings, now: Timestamp, previous: Option<&LeaseSpec>) -> LeaseSpec {
    let same_holder = previous.and_then(|p| p.holder_identity.as_deref()).is_some_and(|h| h == settings.identity);
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(i32::try_from(settings.lease_duration.as_secs()).unwrap_or(i32::MAX)),
        acquire_time: if same_holder { previous.and_then(|p| p.acquire_time.clone()) } else { Some(MicroTime(now)) },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if same_holder || previous.is_none() {
            transitions
        } else {
            transitions.saturating_add(1)
        }),
        ..Default::default()
    }
}

/// Whether a lease held by someone else has run out at `now`.
pub fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = spec.renew_time.as_ref() else {
        return true;
    };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    renewed.0.saturating_add(duration).is_ok_and(|end| end < now)
}

/// One attempt to acquire or renew. `Ok(true)` while this replica holds the lease.
pub async fn try_acquire_or_renew(api: &Api<Lease>, settings: &LeaseSettings) -> Result<bool, Error> {
    let now = Timestamp::now();
    let current = api.get_opt(&settings.name).await.map_err(Error::read(format!("Lease {}", settings.name)))?;
    let result = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(settings.name.clone()), ..Default::default() },
                spec: Some(desired(settings, now, None)),
            };
            api.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            let mine = spec.holder_identity.as_deref() == Some(settings.identity.as_str());
            if !mine && !expired(&spec, now) {
                return Ok(false);
            }
            lease.spec = Some(desired(settings, now, Some(&spec)));
            api.replace(&settings.name, &PostParams::default(), &lease).await
        }
    };
    match result {
        Ok(_) => Ok(true),
        Err(e) if status_code(&e) == Some(409) => Ok(false),
        Err(e) => Err(Error::write(format!("Lease {}", settings.name))(e)),
    }
}

/// Waits until this replica leads.
pub async fn acquire(api: &Api<Lease>, settings: &LeaseSettings) {
    loop {
        match try_acquire_or_renew(api, settings).await {
            Ok(true) => {
                tracing::info!(lease = %settings.name, identity = %settings.identity, "became leader");
                return;
            }
            Ok(false) => tracing::debug!(lease = %settings.name, "another replica leads"),
            Err(error) => tracing::warn!(%error, "leader election attempt failed"),
        }
        tokio::time::sleep(settings.renew_every).await;
    }
}

/// Renews the lease until it is lost; then clears `leading` and returns.
pub async fn hold(api: Api<Lease>, settings: LeaseSettings, leading: Arc<AtomicBool>) {
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(settings.renew_every).await;
        match try_acquire_or_renew(&api, &settings).await {
            Ok(true) => last_renewed = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(lease = %settings.name, "leadership lost to another replica");
                break;
            }
            Err(error) => {
                tracing::warn!(%error, "could not renew the leader lease");
                // Stop writing before anyone else may have taken over.
                if last_renewed.elapsed() + settings.renew_every >= settings.lease_duration {
                    tracing::error!(lease = %settings.name, "leadership lost: lease not renewed in time");
                    break;
                }
            }
        }
    }
    leading.store(false, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_and_transitions() {
        let settings = LeaseSettings {
            name: "l".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        };
        let t0 = Timestamp::from_second(1_000_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let other = LeaseSpec {
            holder_identity: Some("other".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(t0)),
            lease_transitions: Some(3),
            ..Default::default()
        };
        assert!(!expired(&other, t0.saturating_add(SignedDuration::from_secs(10)).unwrap_or(t0)));
        assert!(expired(&other, t0.saturating_add(SignedDuration::from_secs(16)).unwrap_or(t0)));
        let taken = desired(&settings, t0, Some(&other));
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
        assert_eq!(taken.lease_transitions, Some(4));
        let renewed = desired(&settings, t0, Some(&taken));
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(renewed.acquire_time, taken.acquire_time);
    }
}
