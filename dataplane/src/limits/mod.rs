//! Limits that hold across replicas: per-key and per-team sliding windows (requests and tokens
//! per minute), per-key token budgets over UTC days and months, and brute-force lockout by
//! client address.
//!
//! ```text
//!            ┌───────────── Limiter ──────────────┐
//!  admit ───▶│ shared store healthy? ── Redis ────┼─▶ this replica's slice of the window
//!  settle    │        │ no / slow                 │   (in process), else one atomic script
//!  lockout   │        ▼                           │   per subject, batched
//!            │ failure policy: local │ open │ closed
//!            │   └─▶ MemoryStore (limits ÷ replicas)
//!            └────────────────────────────────────┘
//! ```
//!
//! One limiter, two stores with the same arithmetic (`window`). Local mode uses the memory store
//! alone. On Redis, limits large enough are spent from small per-replica slices (`slice`), so
//! most requests never wait on a round trip. Metrics carry no per-key labels (10k keys would mean 10k series per metric): rejections
//! are counted by limit kind, and per-key counts are on the admin listener's `/limits`.

pub mod batch;
pub mod memory;
pub mod redis_store;
pub mod slice;
pub mod window;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use foldhash::fast::RandomState;
use ipnet::IpNet;
use portcullis_crds::snapshot::ApiKeyEntry;
use portcullis_crds::v1alpha1::FailurePolicy;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use memory::MemoryStore;
pub use redis_store::StoreThread;
use redis_store::{RedisStore, Unanswered};
use window::Exceeded;

/// A source of wall-clock milliseconds, injectable for tests.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_ms(&self) -> u64;
}

/// Wall-clock milliseconds that never go back. Budgets follow the UTC calendar, so the readings
/// are the wall clock's; but a wall clock can be stepped back (NTP, a resumed VM), and windows
/// read from it would then stop sliding for as long as the step (nothing leaves a window whose
/// newest granule lies ahead of the clock). So the reading runs on the monotonic clock from the
/// wall clock's, and follows the wall clock when it is found ahead (a step forward; looked at
/// once a second, so a reading costs one clock read as before): after a step back it stays
/// ahead by the step, until the process restarts.
#[derive(Debug)]
pub struct SystemClock {
    started: Instant,
    /// Wall-clock ms at `started`, moved forward whenever the wall clock is found ahead.
    base_ms: AtomicU64,
    /// Time since `started` at which the wall clock is next looked at.
    next_wall_check_ms: AtomicU64,
}

/// How often the system clock looks at the wall clock.
const WALL_CHECK_EVERY_MS: u64 = 1_000;

impl Default for SystemClock {
    fn default() -> Self {
        Self { started: Instant::now(), base_ms: AtomicU64::new(wall_ms()), next_wall_check_ms: AtomicU64::new(0) }
    }
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl SystemClock {
    /// The reading, given the wall clock's and the time since `started`.
    fn reading(&self, wall_ms: u64, elapsed_ms: u64) -> u64 {
        let monotonic = self.base_ms.load(Ordering::Relaxed).saturating_add(elapsed_ms);
        if wall_ms <= monotonic {
            return monotonic;
        }
        self.base_ms.fetch_max(wall_ms - elapsed_ms, Ordering::Relaxed);
        wall_ms
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let elapsed = self.started.elapsed().as_millis() as u64;
        if elapsed < self.next_wall_check_ms.load(Ordering::Relaxed) {
            return self.base_ms.load(Ordering::Relaxed).saturating_add(elapsed);
        }
        self.next_wall_check_ms.store(elapsed.saturating_add(WALL_CHECK_EVERY_MS), Ordering::Relaxed);
        // Read after `elapsed`, the wall clock is never behind it.
        self.reading(wall_ms(), elapsed)
    }
}

/// Limits of one subject (a key or a team).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubjectLimits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub tokens_per_month: Option<u64>,
}

impl SubjectLimits {
    pub fn is_empty(&self) -> bool {
        *self == SubjectLimits::default()
    }
}

/// Whose counters: `id` is the stable identity (`namespace/name`, or `team:namespace/name`).
#[derive(Debug, Clone)]
pub struct Subject {
    pub id: Arc<str>,
    pub limits: SubjectLimits,
}

/// What limits one ApiKey: its own counters and its team's. Built once per snapshot, so an
/// admission only copies them.
#[derive(Debug, Clone)]
pub struct KeyLimits {
    pub key: Subject,
    pub team: Option<Subject>,
    pub failure_policy: Option<FailurePolicy>,
}

impl KeyLimits {
    /// `None` when neither the key nor its team has a limit.
    pub fn new(key: &ApiKeyEntry, team_limits: Option<SubjectLimits>) -> Option<Self> {
        let limits = &key.limits;
        let key_limits = SubjectLimits {
            requests_per_minute: limits.requests_per_minute,
            tokens_per_minute: limits.tokens_per_minute,
            tokens_per_day: limits.tokens_per_day,
            tokens_per_month: limits.tokens_per_month,
        };
        let team = match (&key.team, team_limits) {
            (Some(team), Some(limits)) if !limits.is_empty() => {
                Some(Subject { id: format!("team:{}/{}", key.key.namespace, team).into(), limits })
            }
            _ => None,
        };
        if key_limits.is_empty() && team.is_none() {
            return None;
        }
        Some(Self {
            key: Subject { id: key.key.to_string().into(), limits: key_limits },
            team,
            failure_policy: limits.failure_policy,
        })
    }
}

/// UTC calendar periods for budgets, and how long until each ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub day: u32,
    pub month: u32,
    pub day_reset_ms: u64,
    pub month_reset_ms: u64,
}

const DAY_MS: u64 = 86_400_000;
/// 9999-12-31, the last day periods are told apart; later instants share it.
const LAST_DAY: u64 = 2_932_896;

impl Period {
    /// The UTC day and month of `now_ms`, by integer arithmetic (no calendar library: this runs
    /// for every admitted request).
    pub fn at(now_ms: u64) -> Period {
        let days = (now_ms / DAY_MS).min(LAST_DAY);
        let (year, month, day) = civil_from_days(days);
        let (next_year, next_month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
        let ms_until = |days: u64| days.saturating_mul(DAY_MS).saturating_sub(now_ms).max(1);
        Period {
            day: year * 10_000 + month * 100 + day,
            month: year * 100 + month,
            day_reset_ms: ms_until(days + 1),
            month_reset_ms: ms_until(days_from_civil(next_year, next_month, 1)),
        }
    }

    /// The `month` of a `day` (`yyyymmdd` -> `yyyymm`).
    pub fn month_of(day: u32) -> u32 {
        day / 100
    }
}

/// (year, month, day) of a count of days since 1970-01-01, after Howard Hinnant's
/// `civil_from_days` (<https://howardhinnant.github.io/date_algorithms.html>).
fn civil_from_days(days: u64) -> (u32, u32, u32) {
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let march_based = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * march_based + 2) / 5 + 1;
    let month = if march_based < 10 { march_based + 3 } else { march_based - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year as u32, month as u32, day as u32)
}

/// Days since 1970-01-01 of a date from 1970 on (the inverse of [`civil_from_days`]).
fn days_from_civil(year: u32, month: u32, day: u32) -> u64 {
    let year = u64::from(year) - u64::from(month <= 2);
    let (era, year_of_era) = (year / 400, year % 400);
    let march_based = u64::from(if month > 2 { month - 3 } else { month + 9 });
    let day_of_year = (153 * march_based + 2) / 5 + u64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// One request asking to be let through.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The key's and its team's limits, shared with the snapshot (cloned from it, each request
    /// would copy two subjects and take two more reference counts).
    pub limits: Arc<KeyLimits>,
    /// Tokens reserved now and settled against real usage when the response ends.
    pub tokens: u64,
    /// When the admission was formed: the in-process store decides at this instant.
    pub at_ms: u64,
    pub period: Period,
    pub policy: FailurePolicy,
}

impl Admission {
    pub fn key(&self) -> &Subject {
        &self.limits.key
    }

    pub fn team(&self) -> Option<&Subject> {
        self.limits.team.as_ref()
    }
}

/// Which limit a refusal is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Requests,
    Tokens,
    DayBudget,
    MonthBudget,
    TeamRequests,
    TeamTokens,
}

impl Which {
    pub fn label(self) -> &'static str {
        match self {
            Which::Requests => "requests_per_minute",
            Which::Tokens => "tokens_per_minute",
            Which::DayBudget => "tokens_per_day",
            Which::MonthBudget => "tokens_per_month",
            Which::TeamRequests => "team_requests_per_minute",
            Which::TeamTokens => "team_tokens_per_minute",
        }
    }

    pub fn is_budget(self) -> bool {
        matches!(self, Which::DayBudget | Which::MonthBudget)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub which: Which,
    pub limit: u64,
    pub used: u64,
    pub retry_after_ms: u64,
}

impl Refusal {
    fn window(which: Which, limit: u64, e: Exceeded) -> Self {
        Refusal { which, limit, used: e.total, retry_after_ms: e.retry_after_ms }
    }

    fn budget(which: Which, limit: u64, reset_ms: u64) -> Self {
        Refusal { which, limit, used: limit, retry_after_ms: reset_ms }
    }
}

/// What a store reports for an admitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// Granule the token reservation was recorded in (to settle it later).
    pub granule: u64,
    pub requests_used: u64,
    pub tokens_used: u64,
    pub requests_reset_ms: u64,
    pub tokens_reset_ms: u64,
    /// Granule of the team's reservation.
    pub team_granule: u64,
    /// Tokens this request may still use before a budget runs out (before its reservation).
    pub budget_remaining: Option<u64>,
    /// Day (as in [`Period`]) the budgets were charged to, and so its month.
    pub budget_day: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Granted(Granted),
    Refused(Refusal),
}

pub(crate) fn budget_remaining(limits: &SubjectLimits, day_used: u64, month_used: u64) -> Option<u64> {
    let day = limits.tokens_per_day.map(|b| b.saturating_sub(day_used));
    let month = limits.tokens_per_month.map(|b| b.saturating_sub(month_used));
    match (day, month) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Where an admission was decided, for settling it in the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreUsed {
    Shared,
    Local,
    Unlimited,
}

/// An admitted request's reservation; settle it when the response ends.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub admission: Admission,
    pub granted: Granted,
    pub store: StoreUsed,
}

/// Limiter configuration.
#[derive(Debug, Clone)]
pub struct LimiterSettings {
    pub default_policy: FailurePolicy,
    /// Replicas sharing the limits; each enforces `limit / replicas` on its own without a shared
    /// store, and under `local` while the shared store is unreachable.
    pub replicas: u64,
    pub redis_url: Option<String>,
    pub redis_timeout: Duration,
    pub lockout_threshold: u64,
    pub lockout_window: Duration,
    pub lockout_backoff: Duration,
    pub trusted_proxies: Vec<IpNet>,
    /// Tokens reserved for the output when a request sets no `max_tokens`.
    pub default_output_tokens: u64,
    /// Where the shared store's connection lives.
    pub redis_thread: StoreThread,
}

#[derive(Debug, Clone)]
pub struct LimiterMetrics {
    pub rejections: IntCounterVec,
    pub mode: IntGaugeVec,
    pub store_errors: IntCounterVec,
}

impl LimiterMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let rejections = IntCounterVec::new(
            Opts::new(
                "portcullis_limit_rejections_total",
                "Requests refused by a limit, by limit kind (no per-key label: see /limits)",
            ),
            &["limit"],
        )?;
        let mode = IntGaugeVec::new(
            Opts::new(
                "portcullis_limiter_mode",
                "1 for the mode this replica's limiter is in: shared, local, open or closed",
            ),
            &["mode"],
        )?;
        let store_errors = IntCounterVec::new(
            Opts::new("portcullis_limiter_store_errors_total", "Shared-store calls that failed or timed out"),
            &["kind"],
        )?;
        registry.register(Box::new(rejections.clone()))?;
        registry.register(Box::new(mode.clone()))?;
        registry.register(Box::new(store_errors.clone()))?;
        Ok(Self { rejections, mode, store_errors })
    }
}

/// The largest token count taken from a client (`max_tokens`) or a provider (`usage`): more is
/// read as this. Far above any model's window, and every sum of a few of them stays an exact
/// integer in the shared store's Lua numbers (doubles, exact to 2^53), where a count of 1e17
/// became a float that Redis refused, failing the whole store over to its failure policy.
pub const MAX_TOKEN_COUNT: u64 = 1 << 40;

/// How long an address the shared store found not locked out is believed so without asking
/// again: a lockout set by another replica reaches this one within this time (its own lockouts
/// at once).
pub const LOCKOUT_RECHECK_MS: u64 = 100;
/// Addresses remembered as not locked out, at most (the memory is cleared when full).
const UNLOCKED_REMEMBERED: usize = 65_536;

/// The one limiter. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Limiter {
    settings: LimiterSettings,
    memory: MemoryStore,
    redis: Option<RedisStore>,
    clock: Arc<dyn Clock>,
    metrics: LimiterMetrics,
    /// Client addresses the shared store found not locked out, and until when (ms).
    unlocked: Mutex<HashMap<IpAddr, u64, RandomState>>,
}

/// Failure to admit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmitError {
    Refused(Refusal),
    /// The shared store is down and the policy is `closed`.
    Unavailable,
    /// The shared store answers, but not this decision within its timeout (the call was answered
    /// late, behind others, or a flood of one key queued it past twice the timeout): refused
    /// whatever the policy, which is for a store that is down.
    Busy,
}

impl Limiter {
    pub fn new(settings: LimiterSettings, clock: Arc<dyn Clock>, metrics: LimiterMetrics) -> anyhow::Result<Arc<Self>> {
        let redis = match &settings.redis_url {
            Some(url) => Some(RedisStore::connect(
                url,
                settings.redis_timeout,
                metrics.store_errors.clone(),
                settings.redis_thread,
            )?),
            None => None,
        };
        let limiter = Arc::new(Self {
            settings,
            memory: MemoryStore::default(),
            redis,
            clock,
            metrics,
            unlocked: Mutex::new(HashMap::default()),
        });
        limiter.publish_mode();
        Ok(limiter)
    }

    /// Starts the background health probe of the shared store (no-op without one).
    pub fn spawn_health_probe(self: &Arc<Self>) {
        if self.redis.is_some() {
            let limiter = self.clone();
            tokio::spawn(async move {
                loop {
                    if let Some(redis) = &limiter.redis {
                        redis.probe().await;
                    }
                    limiter.publish_mode();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
    }

    fn publish_mode(&self) {
        let current = self.mode_name(self.settings.default_policy);
        for mode in ["shared", "local", "open", "closed"] {
            self.metrics.mode.with_label_values(&[mode]).set(i64::from(mode == current));
        }
    }

    /// `shared` while the shared store answers (or `local` without one), else the policy's mode.
    pub fn mode_name(&self, policy: FailurePolicy) -> &'static str {
        match &self.redis {
            None => "local",
            Some(redis) if redis.is_healthy() => "shared",
            Some(_) => match policy {
                FailurePolicy::Local => "local",
                FailurePolicy::Open => "open",
                FailurePolicy::Closed => "closed",
            },
        }
    }

    pub fn settings(&self) -> &LimiterSettings {
        &self.settings
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// An admission of `tokens` under a key's limits, formed at `at_ms`: a reading of this
    /// limiter's clock ([`Self::now_ms`]) the caller has just taken.
    pub fn admission_at(&self, limits: &Arc<KeyLimits>, tokens: u64, at_ms: u64) -> Admission {
        Admission {
            limits: limits.clone(),
            tokens,
            at_ms,
            period: Period::at(at_ms),
            policy: limits.failure_policy.unwrap_or(self.settings.default_policy),
        }
    }

    /// Whether a shared store is configured (healthy or not).
    pub fn is_shared(&self) -> bool {
        self.redis.is_some()
    }

    /// Admits or refuses; never waits on the shared store longer than its timeout.
    pub async fn admit(&self, admission: Admission) -> Result<Ticket, AdmitError> {
        let decided = match &self.redis {
            Some(redis) if redis.is_healthy() => match redis.admit(&admission).await {
                Ok(decision) => Some((decision, StoreUsed::Shared)),
                Err(Unanswered::Busy) => {
                    self.metrics.rejections.with_label_values(&["store_busy"]).inc();
                    return Err(AdmitError::Busy);
                }
                Err(Unanswered::Failed) => None,
            },
            _ => None,
        };
        let (decision, store) = match decided {
            Some(d) => d,
            None if self.redis.is_none() => return self.admit_in_process(admission),
            None => match admission.policy {
                FailurePolicy::Local => {
                    (self.memory.admit(&admission, self.now_ms(), self.settings.replicas.max(1)), StoreUsed::Local)
                }
                FailurePolicy::Open => {
                    let granted = Granted {
                        granule: 0,
                        requests_used: 0,
                        tokens_used: 0,
                        requests_reset_ms: 0,
                        tokens_reset_ms: 0,
                        team_granule: 0,
                        budget_remaining: None,
                        budget_day: admission.period.day,
                    };
                    (Decision::Granted(granted), StoreUsed::Unlimited)
                }
                FailurePolicy::Closed => {
                    self.metrics.rejections.with_label_values(&["store_unavailable"]).inc();
                    return Err(AdmitError::Unavailable);
                }
            },
        };
        self.ticket(admission, decision, store)
    }

    /// Admits or refuses at once when there is no shared store (nothing to wait for; the
    /// pipeline calls this directly rather than building the shared store's future).
    pub fn admit_in_process(&self, admission: Admission) -> Result<Ticket, AdmitError> {
        debug_assert!(self.redis.is_none(), "with a shared store, admission goes through `admit`");
        // Replicas without a shared store each keep their own counts: each takes its share, so
        // that together they admit no more than the key declares. (Each takes at least 1: a
        // limit below the replica count admits up to one per replica.)
        let decision = self.memory.admit(&admission, admission.at_ms, self.settings.replicas);
        self.ticket(admission, decision, StoreUsed::Local)
    }

    fn ticket(&self, admission: Admission, decision: Decision, store: StoreUsed) -> Result<Ticket, AdmitError> {
        match decision {
            Decision::Granted(granted) => Ok(Ticket { admission, granted, store }),
            Decision::Refused(refusal) => {
                self.metrics.rejections.with_label_values(&[refusal.which.label()]).inc();
                Err(AdmitError::Refused(refusal))
            }
        }
    }

    /// Settles at once when nothing needs awaiting (the reservation is in process memory, or
    /// there is nothing to change); false when the shared store must be told through `settle`.
    pub fn settle_now(&self, ticket: &Ticket, actual_tokens: u64) -> bool {
        self.settle_now_at(ticket, actual_tokens, || self.now_ms())
    }

    /// [`Self::settle_now`] at a time the caller knows (asked only when the in-process store
    /// must move its windows).
    pub fn settle_now_at(&self, ticket: &Ticket, actual_tokens: u64, now_ms: impl FnOnce() -> u64) -> bool {
        let delta = actual_tokens as i64 - ticket.admission.tokens as i64;
        match ticket.store {
            _ if delta == 0 => true,
            StoreUsed::Shared => {
                self.redis.as_ref().is_some_and(|r| r.settle_deferred(&ticket.admission, &ticket.granted, delta))
            }
            StoreUsed::Local => {
                self.memory.settle(&ticket.admission, &ticket.granted, delta, now_ms());
                true
            }
            StoreUsed::Unlimited => true,
        }
    }

    /// Replaces the reservation with what the request really used.
    pub async fn settle(&self, ticket: &Ticket, actual_tokens: u64) {
        if self.settle_now(ticket, actual_tokens) {
            return;
        }
        if let Some(redis) = &self.redis {
            let delta = actual_tokens as i64 - ticket.admission.tokens as i64;
            redis.settle(&ticket.admission, &ticket.granted, delta).await;
        }
    }

    /// The client address: the peer, or — when the peer is a trusted proxy — the right-most
    /// `X-Forwarded-For` entry that is not itself a trusted proxy.
    pub fn client_address(&self, peer: Option<IpAddr>, headers: &impl crate::fields::HeaderFields) -> Option<IpAddr> {
        let peer = peer?;
        let trusted = |ip: &IpAddr| self.settings.trusted_proxies.iter().any(|net| net.contains(ip));
        if !trusted(&peer) {
            return Some(peer);
        }
        let mut client = peer;
        // Visible ASCII only, as `HeaderValue::to_str` had it: a line with anything else is not
        // read at all.
        let forwarded = headers
            .all("x-forwarded-for")
            .filter(|v| v.is_ascii())
            .filter_map(|v| std::str::from_utf8(v).ok())
            .collect::<Vec<_>>();
        for hop in forwarded.iter().flat_map(|v| v.split(',')).rev() {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = ip;
                    if !trusted(&ip) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        Some(client)
    }

    /// Remaining lockout known to this replica, without asking the shared store.
    pub fn locked_locally(&self, client: IpAddr) -> Option<u64> {
        self.memory.locked(lockout_subject(client), || self.now_ms())
    }

    /// Remaining lockout according to the shared store: remembered locally when found, and an
    /// address found not locked out is not asked about again for `LOCKOUT_RECHECK_MS`.
    pub async fn locked_shared(&self, client: IpAddr) -> Option<u64> {
        let redis = self.redis.as_ref().filter(|r| r.is_healthy())?;
        let client = lockout_subject(client);
        let now = self.now_ms();
        let recently_unlocked = |unlocked: &HashMap<_, u64, _>| unlocked.get(&client).is_some_and(|&until| now < until);
        if recently_unlocked(&self.unlocked.lock().unwrap_or_else(|p| p.into_inner())) {
            return None;
        }
        let name = client.to_string();
        match redis.locked(&name).await {
            Ok(Some(remaining)) => {
                self.memory.remember_lockout(client, self.now_ms(), remaining);
                Some(remaining)
            }
            Ok(None) => {
                let mut unlocked = self.unlocked.lock().unwrap_or_else(|p| p.into_inner());
                if unlocked.len() >= UNLOCKED_REMEMBERED {
                    unlocked.clear();
                }
                unlocked.insert(client, now + LOCKOUT_RECHECK_MS);
                None
            }
            Err(()) => None,
        }
    }

    /// Sends what this replica owes the shared store and gives back its unspent slices
    /// (shutdown).
    pub async fn flush(&self) {
        if let Some(redis) = self.redis.as_ref().filter(|r| r.is_healthy()) {
            redis.flush_all().await;
        }
    }

    /// Records a failed authentication from `client`; returns the lockout if one began.
    pub async fn auth_failed(&self, client: IpAddr) -> Option<u64> {
        let client = lockout_subject(client);
        let name = client.to_string();
        let s = &self.settings;
        // At least 1 ms: Redis refuses `PX 0` ("invalid expire time"), and a refused call would
        // mark the store down for every key.
        let (window_ms, backoff_ms) =
            (s.lockout_window.as_millis().max(1) as u64, s.lockout_backoff.as_millis().max(1) as u64);
        let shared = match &self.redis {
            Some(redis) if redis.is_healthy() => {
                redis.auth_failed(&name, s.lockout_threshold, window_ms, backoff_ms).await
            }
            _ => None,
        };
        let lockout = match shared {
            Some(result) => {
                if let Some(remaining) = result {
                    self.memory.remember_lockout(client, self.now_ms(), remaining);
                }
                result
            }
            None => self.memory.auth_failed(client, self.now_ms(), s.lockout_threshold, window_ms, backoff_ms),
        };
        if lockout.is_some() {
            self.metrics.rejections.with_label_values(&["lockout"]).inc();
        }
        lockout
    }

    /// Current counts for one subject, for the admin view.
    pub async fn usage(&self, subject: &str) -> (u64, u64, u64, u64, &'static str) {
        let now = self.now_ms();
        let period = Period::at(now);
        if let Some(redis) = self.redis.as_ref().filter(|r| r.is_healthy()) {
            if let Some(counts) = redis.usage(subject, period).await {
                return (counts.0, counts.1, counts.2, counts.3, "shared");
            }
        }
        let (r, t, d, m) = self.memory.usage(subject, now, period);
        (r, t, d, m, "local")
    }
}

/// What failed authentications are counted against: an IPv4 address as it is, also when it
/// arrives inside IPv6 (IPv4-mapped `::ffff:0:0/96`, or NAT64's well-known `64:ff9b::/96`,
/// which would otherwise put every IPv4 client of a NAT64 ingress in one /64); any other IPv6
/// address by its /64, the block a single host or site is given: counted per address, a client
/// holding a /64 would have 2^64 addresses to try from.
pub fn lockout_subject(client: IpAddr) -> IpAddr {
    const NAT64: u128 = 0x0064_ff9b_u128 << 96;
    match client {
        IpAddr::V4(_) => client,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None if v6.to_bits() >> 32 == NAT64 >> 32 => IpAddr::V4((v6.to_bits() as u32).into()),
            None => IpAddr::V6(std::net::Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

/// A limiter on a clock the test moves, and admissions for it.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Debug)]
    pub struct FixedClock(pub AtomicU64);

    impl Clock for FixedClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::Relaxed)
        }
    }

    pub fn limiter(clock: Arc<FixedClock>) -> Arc<Limiter> {
        limiter_of(clock, 1)
    }

    /// [`limiter`] for one of `replicas` replicas that share the limits.
    pub fn limiter_of(clock: Arc<FixedClock>, replicas: u64) -> Arc<Limiter> {
        let settings = LimiterSettings {
            default_policy: FailurePolicy::Local,
            replicas,
            redis_url: None,
            redis_timeout: Duration::from_millis(20),
            lockout_threshold: 3,
            lockout_window: Duration::from_secs(60),
            lockout_backoff: Duration::from_secs(30),
            trusted_proxies: vec!["10.0.0.0/8".parse().expect("net")],
            default_output_tokens: 100,
            redis_thread: StoreThread::Own,
        };
        let metrics = LimiterMetrics::register(&Registry::new()).expect("metrics");
        Limiter::new(settings, clock, metrics).expect("limiter")
    }

    pub fn admission(l: &Limiter, rpm: Option<u64>, tpm: Option<u64>, day: Option<u64>, tokens: u64) -> Admission {
        let key = Subject {
            id: "ns/k".into(),
            limits: SubjectLimits {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                tokens_per_day: day,
                tokens_per_month: None,
            },
        };
        Admission {
            limits: Arc::new(KeyLimits { key, team: None, failure_policy: None }),
            tokens,
            at_ms: l.now_ms(),
            period: Period::at(l.now_ms()),
            policy: FailurePolicy::Local,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{admission, limiter, limiter_of, FixedClock};
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test]
    async fn requests_tokens_and_budgets_with_settlement() {
        let clock = Arc::new(FixedClock(AtomicU64::new(1_700_000_000_000)));
        let l = limiter(clock.clone());
        for _ in 0..3 {
            l.admit(admission(&l, Some(3), None, None, 1)).await.expect("admitted");
        }
        let refused = l.admit(admission(&l, Some(3), None, None, 1)).await.expect_err("4th");
        assert!(matches!(refused, AdmitError::Refused(Refusal { which: Which::Requests, .. })));

        // Usage counts even without a budget: the three requests above used 1 token each.
        // Budget: reserve 80 of the 97 left, settle to 30, then 67 remain.
        let ticket = l.admit(admission(&l, None, None, Some(100), 80)).await.expect("admitted");
        assert_eq!(ticket.granted.budget_remaining, Some(97));
        l.settle(&ticket, 30).await;
        let next = l.admit(admission(&l, None, None, Some(100), 67)).await.expect("admitted");
        assert_eq!(next.granted.budget_remaining, Some(67));
        let over = l.admit(admission(&l, None, None, Some(100), 1)).await.expect_err("spent");
        assert!(matches!(over, AdmitError::Refused(Refusal { which: Which::DayBudget, .. })));
        // The next UTC day starts fresh.
        clock.0.fetch_add(24 * 3600 * 1000, Ordering::Relaxed);
        l.admit(admission(&l, None, None, Some(100), 1)).await.expect("new day");
    }

    /// Threads read the clock before they take a shard's lock, so a request can reach the
    /// in-process store after one that read the clock later. Around midnight the late one must
    /// not wipe the new day's spending, and its settlement must reach the day it was charged to;
    /// its team reservation must be given back or settled where it was recorded.
    #[test]
    fn a_request_that_read_the_clock_earlier_but_arrives_later_is_counted_and_settled() {
        let midnight = 1_700_006_400_000; // a UTC midnight (1_700_006_400 = 19_676 days)
        let clock = Arc::new(FixedClock(AtomicU64::new(midnight)));
        let l = limiter(clock.clone());
        let team = Subject {
            id: "ns/team".into(),
            limits: SubjectLimits { tokens_per_minute: Some(100_000), ..Default::default() },
        };
        let key = |day: Option<u64>| Subject {
            id: "ns/k".into(),
            limits: SubjectLimits { tokens_per_day: day, tokens_per_minute: Some(10_000), ..Default::default() },
        };
        let at = |ms: u64, day: Option<u64>, tokens: u64| Admission {
            limits: Arc::new(KeyLimits { key: key(day), team: Some(team.clone()), failure_policy: None }),
            tokens,
            at_ms: ms,
            period: Period::at(ms),
            policy: FailurePolicy::Local,
        };
        let granted = |d: Decision| match d {
            Decision::Granted(g) => g,
            Decision::Refused(r) => panic!("refused: {r:?}"),
        };
        // 300 tokens spent in the new day, then one that read the clock 50 ms before midnight.
        let today = at(midnight + 200, Some(1_000), 300);
        granted(l.memory.admit(&today, midnight + 200, 1));
        let late = at(midnight - 50, Some(1_000), 100);
        let late_grant = granted(l.memory.admit(&late, midnight - 50, 1));
        assert_eq!(late_grant.budget_remaining, Some(700), "the new day's 300 still count");
        assert_eq!(late_grant.budget_day, today.period.day, "charged to the day the counter is on");
        assert_eq!(late_grant.granule, (midnight + 200) / window::GRANULE_MS, "and the newest granule");
        assert_eq!(late_grant.team_granule, late_grant.granule);
        // It used 40 of its 100: the day and both windows get 60 back.
        l.memory.settle(&late, &late_grant, -60, midnight + 300);
        let (_, tokens, day, _) = l.memory.usage("ns/k", midnight + 300, today.period);
        assert_eq!((tokens, day), (340, 340));
        let (_, team_tokens, _, _) = l.memory.usage("ns/team", midnight + 300, today.period);
        assert_eq!(team_tokens, 340);
        // A late request the team admits and the key refuses gives the team its tokens back.
        let refused = l.memory.admit(&at(midnight - 20, Some(1_000), 20_000), midnight - 20, 1);
        assert!(matches!(refused, Decision::Refused(Refusal { which: Which::Tokens, .. })), "{refused:?}");
        let (_, team_tokens, _, _) = l.memory.usage("ns/team", midnight + 300, today.period);
        assert_eq!(team_tokens, 340, "the refused request's team reservation was given back");
        // The new day's budget spent, a late request is told to wait for the new day's end,
        // not for the old day's (10 ms away).
        granted(l.memory.admit(&at(midnight + 400, Some(1_000), 660), midnight + 400, 1));
        let spent = l.memory.admit(&at(midnight - 10, Some(1_000), 1), midnight - 10, 1);
        assert!(
            matches!(spent, Decision::Refused(Refusal { which: Which::DayBudget, retry_after_ms, .. })
                if retry_after_ms == 10 + DAY_MS),
            "{spent:?}"
        );
    }

    /// Under the `local` policy each of N replicas enforces 1/N of every limit, budgets included
    /// (each spends from zero): here 2 replicas, a day budget of 100, so 50 each.
    #[test]
    fn the_local_policy_divides_budgets_among_replicas() {
        let clock = Arc::new(FixedClock(AtomicU64::new(1_700_000_000_000)));
        let l = limiter(clock.clone());
        let now = clock.now_ms();
        let granted = |tokens| l.memory.admit(&admission(&l, None, None, Some(100), tokens), now, 2);
        assert!(matches!(granted(30), Decision::Granted(g) if g.budget_remaining == Some(50)));
        assert!(matches!(granted(30), Decision::Granted(g) if g.budget_remaining == Some(20)));
        assert!(matches!(granted(1), Decision::Refused(Refusal { which: Which::DayBudget, limit: 50, .. })));
        // One replica (or no shared store at all): the whole budget.
        let alone = limiter(clock.clone());
        let whole = alone.memory.admit(&admission(&alone, None, None, Some(100), 1), now, 1);
        assert!(matches!(whole, Decision::Granted(g) if g.budget_remaining == Some(100)));
    }

    /// Replicas without a shared store (the chart's replicas without Redis) divide the limits
    /// too: two replicas of a key declaring 10 requests a minute admit 5 each.
    #[test]
    fn replicas_without_a_shared_store_each_enforce_their_share() {
        let clock = Arc::new(FixedClock(AtomicU64::new(1_700_000_000_000)));
        let l = limiter_of(clock.clone(), 2);
        assert!(!l.is_shared());
        let admitted = (0..10).filter(|_| l.admit_in_process(admission(&l, Some(10), None, None, 1)).is_ok()).count();
        assert_eq!(admitted, 5);
        let refused = l.admit_in_process(admission(&l, Some(10), None, None, 1)).expect_err("over the share");
        assert!(matches!(refused, AdmitError::Refused(Refusal { which: Which::Requests, limit: 5, .. })));
        // One replica: the whole limit.
        let alone = limiter(clock);
        let admitted =
            (0..11).filter(|_| alone.admit_in_process(admission(&alone, Some(10), None, None, 1)).is_ok()).count();
        assert_eq!(admitted, 10);
    }

    /// Keys of one team admitted from many threads at once never take the team past its limit:
    /// the team is checked and recorded in one critical section, and a key refusal gives the
    /// team's share back.
    #[test]
    fn a_team_limit_holds_under_concurrent_keys() {
        let clock = Arc::new(FixedClock(AtomicU64::new(1_700_000_000_000)));
        let l = limiter(clock.clone());
        let now = clock.now_ms();
        let team = Subject {
            id: "team:ns/t".into(),
            limits: SubjectLimits { requests_per_minute: Some(200), ..SubjectLimits::default() },
        };
        let keyed = |name: &str, rpm: Option<u64>| {
            let mut a = admission(&l, rpm, None, None, 1);
            a.limits = Arc::new(KeyLimits {
                key: Subject { id: name.into(), limits: a.limits.key.limits },
                team: Some(team.clone()),
                failure_policy: None,
            });
            a
        };
        // A key refused on its own limit leaves the team's count as it was.
        let tight = keyed("ns/tight", Some(1));
        assert!(matches!(l.memory.admit(&tight, now, 1), Decision::Granted(_)));
        for _ in 0..50 {
            assert!(matches!(
                l.memory.admit(&tight, now, 1),
                Decision::Refused(Refusal { which: Which::Requests, .. })
            ));
        }
        assert_eq!(l.memory.usage(&team.id, now, Period::at(now)).0, 1);

        // Many rounds, each a fresh team with room for one request, raced by two keys.
        const ROUNDS: usize = 3_000;
        let barrier = std::sync::Barrier::new(2);
        let granted: Vec<AtomicU64> = (0..ROUNDS).map(|_| AtomicU64::new(0)).collect();
        std::thread::scope(|scope| {
            for t in 0..2 {
                let (l, barrier, granted) = (&l, &barrier, &granted);
                scope.spawn(move || {
                    for (round, count) in granted.iter().enumerate() {
                        let mut admission = admission(l, None, None, None, 1);
                        admission.limits = Arc::new(KeyLimits {
                            key: Subject { id: format!("ns/k{t}").into(), limits: SubjectLimits::default() },
                            team: Some(Subject {
                                id: format!("team:ns/t{round}").into(),
                                limits: SubjectLimits { requests_per_minute: Some(1), ..SubjectLimits::default() },
                            }),
                            failure_policy: None,
                        });
                        barrier.wait();
                        if matches!(l.memory.admit(&admission, now, 1), Decision::Granted(_)) {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let overshot = granted.iter().filter(|c| c.load(Ordering::Relaxed) > 1).count();
        assert_eq!(overshot, 0, "rounds in which both keys got the team's one request");
        assert!(granted.iter().all(|c| c.load(Ordering::Relaxed) == 1));
    }

    /// The system clock follows the wall clock forward and never goes back with it.
    #[test]
    fn the_system_clock_follows_steps_forward_and_not_back() {
        let clock = SystemClock {
            started: Instant::now(),
            base_ms: AtomicU64::new(1_000_000),
            next_wall_check_ms: AtomicU64::new(0),
        };
        assert_eq!(clock.reading(1_000_000, 0), 1_000_000);
        assert_eq!(clock.reading(1_000_500, 500), 1_000_500, "in step");
        // Stepped back 10 s: the reading goes on from where it was.
        assert_eq!(clock.reading(990_600, 600), 1_000_600);
        assert_eq!(clock.reading(991_600, 1_600), 1_001_600);
        // Stepped forward past the reading: followed, and kept.
        assert_eq!(clock.reading(1_060_000, 2_000), 1_060_000);
        assert_eq!(clock.reading(1_000_000, 3_000), 1_061_000);
        // The real one moves forward.
        let real = SystemClock::default();
        let (a, b) = (real.now_ms(), real.now_ms());
        assert!(b >= a && a > 1_700_000_000_000);
    }

    #[tokio::test]
    async fn lockout_after_threshold_and_expiry() {
        let clock = Arc::new(FixedClock(AtomicU64::new(1_700_000_000_000)));
        let l = limiter(clock.clone());
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        assert_eq!(l.auth_failed(ip).await, None);
        assert_eq!(l.auth_failed(ip).await, None);
        assert_eq!(l.auth_failed(ip).await, Some(30_000));
        assert!(l.locked_locally(ip).is_some());
        assert!(l.locked_locally("192.0.2.8".parse().expect("ip")).is_none());
        clock.0.fetch_add(30_001, Ordering::Relaxed);
        assert!(l.locked_locally(ip).is_none());
        // A lockout learned from the shared store applies locally at once.
        let other: IpAddr = "192.0.2.9".parse().expect("ip");
        let fresh = limiter(clock.clone());
        assert!(fresh.locked_locally(other).is_none());
        fresh.memory.remember_lockout(other, clock.now_ms(), 5_000);
        assert_eq!(fresh.locked_locally(other), Some(5_000));
    }

    /// IPv6 clients are counted by their /64 (one host or site holds a whole /64, so counting
    /// per address would give it 2^64 tries); an IPv4-mapped address counts as its IPv4 one.
    #[tokio::test]
    async fn an_ipv6_client_is_locked_out_by_its_slash_64() {
        let clock = Arc::new(FixedClock(AtomicU64::new(1_700_000_000_000)));
        let l = limiter(clock.clone());
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(l.auth_failed(ip("2001:db8:1:2::1")).await, None);
        assert_eq!(l.auth_failed(ip("2001:db8:1:2:ffff::9")).await, None);
        assert_eq!(l.auth_failed(ip("2001:db8:1:2:abcd:1234:5678:9abc")).await, Some(30_000));
        assert!(l.locked_locally(ip("2001:db8:1:2::77")).is_some(), "the whole /64");
        assert!(l.locked_locally(ip("2001:db8:1:3::1")).is_none(), "not the next one");
        assert_eq!(lockout_subject(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(lockout_subject(ip("64:ff9b::192.0.2.1")), ip("192.0.2.1"), "NAT64");
        assert_ne!(lockout_subject(ip("64:ff9b::198.51.100.1")), lockout_subject(ip("64:ff9b::192.0.2.1")));
        assert_eq!(lockout_subject(ip("192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(lockout_subject(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
    }

    /// A flood of failures from more addresses than are tracked: the records stay bounded,
    /// every call stays cheap (no scan of the whole map per call), a lockout already in force
    /// stays in force, and once the flood's windows end, new addresses are counted again.
    #[test]
    fn failures_from_a_flood_of_addresses_are_tracked_within_bounds() {
        let clock = Arc::new(FixedClock(AtomicU64::new(1_700_000_000_000)));
        let l = limiter(clock.clone());
        let memory = &l.memory;
        let (window, backoff) = (60_000, 600_000);
        let locked: IpAddr = "198.51.100.1".parse().expect("ip");
        let now = clock.now_ms();
        assert_eq!(memory.auth_failed(locked, now, 1, window, backoff), Some(backoff));
        let flood = 700_000u32;
        let started = std::time::Instant::now();
        for i in 0..flood {
            // One failure each, 100 per millisecond.
            let at = now + u64::from(i) / 100;
            memory.auth_failed(IpAddr::V4((0x0a00_0000 + i).into()), at, 3, window, backoff);
        }
        let took = started.elapsed();
        let tracked = memory.lockout_entries.load(Ordering::Relaxed);
        assert!(tracked <= memory::LOCKOUTS_TRACKED, "{tracked} records");
        assert!(tracked >= memory::LOCKOUTS_TRACKED / 2, "{tracked} records: the bound is used");
        assert!(memory.locked(locked, || now + 10_000).is_some(), "the lockout in force stays");
        eprintln!("{flood} failures in {took:?}, {tracked} tracked");
        // After the flood's windows have ended, a new address is counted (and locked out).
        let later = now + u64::from(flood) / 100 + window + 1;
        let fresh: IpAddr = "203.0.113.5".parse().expect("ip");
        assert_eq!(memory.auth_failed(fresh, later, 1, window, backoff), Some(backoff));
        assert!(memory.lockout_entries.load(Ordering::Relaxed) < tracked, "the stale records were swept");
    }

    #[test]
    fn forwarded_for_is_trusted_only_from_proxies() {
        let clock = Arc::new(FixedClock(AtomicU64::new(0)));
        let l = limiter(clock);
        let mut headers = http::HeaderMap::new();
        headers.insert("x-forwarded-for", http::HeaderValue::from_static("203.0.113.9, 10.1.1.1"));
        let proxy: IpAddr = "10.2.2.2".parse().expect("ip");
        let direct: IpAddr = "198.51.100.1".parse().expect("ip");
        assert_eq!(l.client_address(Some(proxy), &headers), Some("203.0.113.9".parse().expect("ip")));
        assert_eq!(l.client_address(Some(direct), &headers), Some(direct));
    }

    /// The calendar arithmetic agrees with chrono's, every day from 1970 to 9999 and at
    /// instants within a day, and stays sane past the last day.
    #[test]
    fn periods_agree_with_chrono() {
        use chrono::{Datelike, TimeZone, Utc};
        let chrono_period = |now_ms: u64| {
            let date = Utc.timestamp_millis_opt(now_ms as i64).single().expect("in range").date_naive();
            let next_day = date.succ_opt().expect("next day");
            let (ny, nm) = if date.month() == 12 { (date.year() + 1, 1) } else { (date.year(), date.month() + 1) };
            let next_month = chrono::NaiveDate::from_ymd_opt(ny, nm, 1).expect("next month");
            let ms_until = |d: chrono::NaiveDate| {
                (d.and_hms_opt(0, 0, 0).expect("midnight").and_utc().timestamp_millis() - now_ms as i64).max(1) as u64
            };
            Period {
                day: date.year() as u32 * 10_000 + date.month() * 100 + date.day(),
                month: date.year() as u32 * 100 + date.month(),
                day_reset_ms: ms_until(next_day),
                month_reset_ms: ms_until(next_month),
            }
        };
        for days in 0..=LAST_DAY {
            let now_ms = days * DAY_MS + (days * 7_919_993) % DAY_MS;
            let period = Period::at(now_ms);
            assert_eq!(period, chrono_period(now_ms), "day {days}");
            assert_eq!(Period::month_of(period.day), period.month);
        }
        assert_eq!(civil_from_days(LAST_DAY), (9999, 12, 31));
        let last = Period::at(u64::MAX);
        assert_eq!((last.day, last.month, last.day_reset_ms), (99_991_231, 999_912, 1));
    }

    #[test]
    fn periods_roll_over_at_utc_midnight_and_month_end() {
        // 2026-01-31T23:59:59.000Z
        let p = Period::at(1_769_903_999_000);
        assert_eq!(p.day, 20260131);
        assert_eq!(p.month, 202601);
        assert_eq!(p.day_reset_ms, 1_000);
        assert_eq!(p.month_reset_ms, 1_000);
    }
}
