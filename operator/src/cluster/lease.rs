//! Leader election through a `coordination.k8s.io/v1` Lease.
//!
//! The Lease is the one object written with optimistic concurrency (`replace` with the read
//! `resourceVersion`) instead of server-side apply: taking over a lease must fail if anyone else
//! touched it since it was read, and that is exactly what a resourceVersion precondition says.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::runtime::{watcher, WatchStreamExt as _};
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

/// Whether anyone may take the lease at `now`: its holder gave it up ([`release`]), or its term
/// ran out.
pub fn free(spec: &LeaseSpec, now: Timestamp) -> bool {
    spec.holder_identity.as_deref().is_none_or(str::is_empty) || expired(spec, now)
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
            if !mine && !free(&spec, now) {
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
///
/// A standby tries again every `renew_every`, and at once when the Lease changes: a leader that
/// stops cleanly gives the Lease up ([`release`]), and the standby that sees it go takes over
/// within a round trip instead of when the term would have run out (a rolling update, a drained
/// node). The watch is a shortcut only: without it (an error, RBAC without `watch`) the retries
/// on the timer still take over.
pub async fn acquire(api: &Api<Lease>, settings: &LeaseSettings) {
    let config = watcher::Config::default().fields(&format!("metadata.name={}", settings.name));
    let changes = watcher(api.clone(), config).default_backoff();
    let mut changes = std::pin::pin!(changes);
    loop {
        match try_acquire_or_renew(api, settings).await {
            Ok(true) => {
                tracing::info!(lease = %settings.name, identity = %settings.identity, "became leader");
                return;
            }
            Ok(false) => tracing::debug!(lease = %settings.name, "another replica leads"),
            Err(error) => tracing::warn!(%error, "leader election attempt failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.renew_every) => {}
            _ = changed(&mut changes) => {}
        }
    }
}

/// Resolves when the watched Lease is changed or deleted (the initial listing does not count).
/// Errors are the watcher's to retry, with its backoff; they wake nobody.
async fn changed<S>(changes: &mut std::pin::Pin<&mut S>)
where
    S: futures_util::Stream<Item = Result<watcher::Event<Lease>, watcher::Error>>,
{
    loop {
        match changes.next().await {
            Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) => return,
            Some(Ok(_)) => {}
            Some(Err(error)) => tracing::debug!(%error, "leader Lease watch"),
            None => std::future::pending::<()>().await,
        }
    }
}

/// Gives the lease up, for a clean shutdown: call it only once this replica has stopped
/// writing. The holder is cleared and the term shortened to a second (what client-go's
/// `ReleaseOnCancel` writes), so a standby takes over at once. `Ok(false)` when the lease was
/// no longer this replica's (or changed under it) and was left alone.
pub async fn release(api: &Api<Lease>, settings: &LeaseSettings) -> Result<bool, Error> {
    let read = api.get_opt(&settings.name).await.map_err(Error::read(format!("Lease {}", settings.name)))?;
    let Some(mut lease) = read else {
        return Ok(false);
    };
    let Some(spec) = released(lease.spec.as_ref(), &settings.identity, Timestamp::now()) else {
        return Ok(false);
    };
    lease.spec = Some(spec);
    // The read resourceVersion is the precondition: a lease taken over meanwhile is not touched.
    match api.replace(&settings.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(e) if status_code(&e) == Some(409) => Ok(false),
        Err(e) => Err(Error::write(format!("Lease {}", settings.name))(e)),
    }
}

/// The spec that gives up a lease `identity` holds; `None` when someone else holds it.
fn released(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Option<LeaseSpec> {
    let spec = spec?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    Some(LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        renew_time: Some(MicroTime(now)),
        ..spec.clone()
    })
}

/// Renews the lease until it is lost; then clears `leading` and returns.
///
/// Leadership is dropped once the lease has gone unrenewed for its term less one renewal period,
/// before another replica may take it. A renewal the API server does not answer counts as a
/// failed one at that moment: the client's call deadline (`portcullis_apiclient`) is longer than
/// a term, and waiting on it kept this replica writing beside the next leader.
pub async fn hold(api: Api<Lease>, settings: LeaseSettings, leading: Arc<AtomicBool>) {
    // When the last renewal was sent: the renewTime it wrote is no later than that.
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(settings.renew_every).await;
        let stop_by = last_renewed + settings.lease_duration.saturating_sub(settings.renew_every);
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout_at(stop_by, try_acquire_or_renew(&api, &settings)).await {
            Ok(Ok(true)) => last_renewed = sent,
            Ok(Ok(false)) => {
                tracing::error!(lease = %settings.name, "leadership lost to another replica");
                break;
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not renew the leader lease");
                // Stop writing before anyone else may have taken over.
                if tokio::time::Instant::now() >= stop_by {
                    tracing::error!(lease = %settings.name, "leadership lost: lease not renewed in time");
                    break;
                }
            }
            Err(_) => {
                tracing::error!(lease = %settings.name, "leadership lost: the lease renewal was not answered in time");
                break;
            }
        }
    }
    leading.store(false, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A renewal the API server never answers: leadership goes before the lease's term is out
    /// (15 s here, renewed every 5 s), not never.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_renewal_gives_up_leadership_in_time() {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let unanswered = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(call) = handle.next_request().await {
                held.push(call);
            }
        });
        let api: Api<Lease> = Api::namespaced(kube::Client::new(service, "default"), "portcullis");
        let settings = LeaseSettings {
            name: "portcullis-operator".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        };
        let leading = Arc::new(AtomicBool::new(true));
        let holding = tokio::spawn(hold(api, settings, leading.clone()));
        tokio::time::sleep(Duration::from_millis(9_900)).await;
        assert!(leading.load(Ordering::SeqCst), "gave up before a renewal could be late");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!leading.load(Ordering::SeqCst), "still leading 10 s after the last renewal");
        assert!(holding.is_finished());
        unanswered.abort();
    }

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

    #[test]
    fn a_released_lease_is_free_at_once_and_only_the_holder_releases() {
        let t0 = Timestamp::from_second(1_000_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let held = LeaseSpec {
            holder_identity: Some("me".into()),
            lease_duration_seconds: Some(15),
            acquire_time: Some(MicroTime(t0)),
            renew_time: Some(MicroTime(t0)),
            lease_transitions: Some(2),
            ..Default::default()
        };
        assert!(!free(&held, t0));
        assert_eq!(released(Some(&held), "other", t0), None, "only the holder gives a lease up");
        assert_eq!(released(None, "me", t0), None);

        let given_up = released(Some(&held), "me", t0).unwrap_or_default();
        assert_eq!(given_up.holder_identity, None);
        assert_eq!(given_up.lease_transitions, Some(2));
        assert!(free(&given_up, t0), "free the moment it is released, not when the term ends");
        let blank = LeaseSpec { holder_identity: Some(String::new()), ..held.clone() };
        assert!(free(&blank, t0), "client-go's empty holder counts as released too");

        let settings = LeaseSettings {
            name: "l".into(),
            identity: "next".into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(4),
        };
        let taken = desired(&settings, t0, Some(&given_up));
        assert_eq!(taken.holder_identity.as_deref(), Some("next"));
        assert_eq!(taken.lease_transitions, Some(3));
        assert_eq!(taken.lease_duration_seconds, Some(15));
    }
}
