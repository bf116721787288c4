//! The in-process store: the quickstart's limiter, and every replica's fallback under the
//! `local` failure policy. Sharded maps, one short critical section per admission.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use foldhash::fast::RandomState;
use std::sync::Mutex;

use super::window::SlidingWindow;
use super::{Admission, Decision, Granted, Period, Refusal, SubjectLimits, Which};

const SHARDS: usize = 32;
/// Entries untouched for this long are swept (longer than the longest window a count matters in
/// besides budgets, which a memory store keeps only for the process's life anyway).
const IDLE_SWEEP_MS: u64 = 3 * 24 * 3600 * 1000;

#[derive(Debug, Default)]
struct Counters {
    requests: SlidingWindow,
    tokens: SlidingWindow,
    day: (u32, u64),
    month: (u32, u64),
    touched_ms: u64,
}

impl Counters {
    fn budget_used(&mut self, period: Period) -> (u64, u64) {
        if self.day.0 != period.day {
            self.day = (period.day, 0);
        }
        if self.month.0 != period.month {
            self.month = (period.month, 0);
        }
        (self.day.1, self.month.1)
    }
}

/// Failed authentications from one client address.
#[derive(Debug, Default, Clone, Copy)]
struct AuthFailures {
    window_start_ms: u64,
    failures: u64,
    locked_until_ms: u64,
}

#[derive(Debug)]
pub struct MemoryStore {
    shards: Vec<Mutex<HashMap<Arc<str>, Counters, RandomState>>>,
    hasher: RandomState,
    /// Keyed by address, not its text: checked on every request.
    lockouts: Mutex<HashMap<IpAddr, AuthFailures, RandomState>>,
    /// How many addresses `lockouts` holds, stored under its lock: while none has failed, the
    /// check on every request reads this instead of taking the lock.
    lockout_entries: AtomicUsize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
            hasher: RandomState::default(),
            lockouts: Mutex::new(HashMap::default()),
            lockout_entries: AtomicUsize::new(0),
        }
    }
}

fn scaled(limit: Option<u64>, divisor: u64) -> Option<u64> {
    // One replica, the common case: no division per limit per request.
    if divisor <= 1 {
        return limit.map(|l| l.max(1));
    }
    limit.map(|l| (l / divisor).max(1))
}

impl MemoryStore {
    fn with<R>(&self, subject: &str, now_ms: u64, f: impl FnOnce(&mut Counters) -> R) -> R {
        let shard = (self.hasher.hash_one(subject) as usize) % SHARDS;
        let mut map = self.shards[shard].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if map.len() > 50_000 {
            map.retain(|_, c| c.touched_ms + IDLE_SWEEP_MS > now_ms);
        }
        // Look up before inserting so the common case allocates nothing.
        if let Some(counters) = map.get_mut(subject) {
            counters.touched_ms = now_ms;
            return f(counters);
        }
        let counters = map.entry(Arc::from(subject)).or_default();
        counters.touched_ms = now_ms;
        f(counters)
    }

    /// Checks every limit of the key and its team, then records all of them, or none.
    pub fn admit(&self, admission: &Admission, now_ms: u64, divisor: u64) -> Decision {
        let key = admission.key();
        let cost = admission.tokens;
        let key_limits = SubjectLimits {
            requests_per_minute: scaled(key.limits.requests_per_minute, divisor),
            tokens_per_minute: scaled(key.limits.tokens_per_minute, divisor),
            // Budgets too: under the `local` policy every replica spends from zero, so each
            // takes its share, not the whole.
            tokens_per_day: scaled(key.limits.tokens_per_day, divisor),
            tokens_per_month: scaled(key.limits.tokens_per_month, divisor),
        };
        // Team first, checked and recorded in one critical section (two keys of one team may be
        // admitted on two threads at once); a key refusal below gives the team's share back.
        let team = admission.team().map(|team| {
            (team, scaled(team.limits.requests_per_minute, divisor), scaled(team.limits.tokens_per_minute, divisor))
        });
        if let Some((team, rpm, tpm)) = team {
            let refusal = self.with(&team.id, now_ms, |c| {
                if let Some(limit) = rpm {
                    if let Err(e) = c.requests.check(now_ms, 1, limit) {
                        return Some(Refusal::window(Which::TeamRequests, limit, e));
                    }
                }
                if let Some(limit) = tpm {
                    if let Err(e) = c.tokens.check(now_ms, cost, limit) {
                        return Some(Refusal::window(Which::TeamTokens, limit, e));
                    }
                }
                if rpm.is_some() {
                    c.requests.add(now_ms, 1);
                }
                if tpm.is_some() {
                    c.tokens.add(now_ms, cost);
                }
                None
            });
            if let Some(refusal) = refusal {
                return Decision::Refused(refusal);
            }
        }
        let decision = self.with(&key.id, now_ms, |c| {
            if let Some(limit) = key_limits.requests_per_minute {
                if let Err(e) = c.requests.check(now_ms, 1, limit) {
                    return Decision::Refused(Refusal::window(Which::Requests, limit, e));
                }
            }
            if let Some(limit) = key_limits.tokens_per_minute {
                if let Err(e) = c.tokens.check(now_ms, cost, limit) {
                    return Decision::Refused(Refusal::window(Which::Tokens, limit, e));
                }
            }
            let (day_used, month_used) = c.budget_used(admission.period);
            if let Some(budget) = key_limits.tokens_per_day.filter(|&b| day_used >= b) {
                return Decision::Refused(Refusal::budget(Which::DayBudget, budget, admission.period.day_reset_ms));
            }
            if let Some(budget) = key_limits.tokens_per_month.filter(|&b| month_used >= b) {
                return Decision::Refused(Refusal::budget(Which::MonthBudget, budget, admission.period.month_reset_ms));
            }
            let requests_total = key_limits.requests_per_minute.map(|_| {
                c.requests.add(now_ms, 1);
                c.requests.total(now_ms)
            });
            let granule = key_limits.tokens_per_minute.map(|_| c.tokens.add(now_ms, cost));
            let tokens_total = key_limits.tokens_per_minute.map(|_| c.tokens.total(now_ms));
            c.day.1 += cost;
            c.month.1 += cost;
            Decision::Granted(Granted {
                granule: granule.unwrap_or(now_ms / super::window::GRANULE_MS),
                team_granule: now_ms / super::window::GRANULE_MS,
                requests_used: requests_total.unwrap_or(0),
                tokens_used: tokens_total.unwrap_or(0),
                requests_reset_ms: c.requests.reset_after_ms(now_ms),
                tokens_reset_ms: c.tokens.reset_after_ms(now_ms),
                budget_remaining: super::budget_remaining(&key_limits, day_used, month_used),
            })
        });
        if let (Decision::Refused(_), Some((team, rpm, tpm))) = (&decision, team) {
            let granule = now_ms / super::window::GRANULE_MS;
            self.with(&team.id, now_ms, |c| {
                if rpm.is_some() {
                    c.requests.adjust(now_ms, granule, -1);
                }
                if tpm.is_some() {
                    c.tokens.adjust(now_ms, granule, -(cost as i64));
                }
            });
        }
        decision
    }

    /// Applies the difference between reserved and actual tokens.
    pub fn settle(&self, admission: &Admission, granule: u64, delta: i64, now_ms: u64) {
        let apply = |c: &mut Counters, budgets: bool| {
            c.tokens.adjust(now_ms, granule, delta);
            if budgets {
                if c.day.0 == admission.period.day {
                    c.day.1 = (c.day.1 as i64 + delta).max(0) as u64;
                }
                if c.month.0 == admission.period.month {
                    c.month.1 = (c.month.1 as i64 + delta).max(0) as u64;
                }
            }
        };
        self.with(&admission.key().id, now_ms, |c| apply(c, true));
        if let Some(team) = admission.team() {
            self.with(&team.id, now_ms, |c| apply(c, false));
        }
    }

    /// Current counts for the admin view: (requests, tokens, day used, month used).
    pub fn usage(&self, subject: &str, now_ms: u64, period: Period) -> (u64, u64, u64, u64) {
        self.with(subject, now_ms, |c| {
            let (day, month) = c.budget_used(period);
            (c.requests.total(now_ms), c.tokens.total(now_ms), day, month)
        })
    }

    /// Remaining lockout for `client`, if any. The clock is read only for an address with a
    /// record (this runs on every request).
    pub fn locked(&self, client: IpAddr, now_ms: impl FnOnce() -> u64) -> Option<u64> {
        if self.lockout_entries.load(Ordering::Acquire) == 0 {
            return None;
        }
        let map = self.lockouts.lock().unwrap_or_else(|p| p.into_inner());
        let until = map.get(&client)?.locked_until_ms;
        let now_ms = now_ms();
        (until > now_ms).then(|| until - now_ms)
    }

    /// Records a failed authentication; returns the lockout when this one reached the threshold.
    pub fn auth_failed(
        &self,
        client: IpAddr,
        now_ms: u64,
        threshold: u64,
        window_ms: u64,
        backoff_ms: u64,
    ) -> Option<u64> {
        let mut map = self.lockouts.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.retain(|_, f| f.locked_until_ms > now_ms || f.window_start_ms + window_ms > now_ms);
        }
        let entries = map.len() + usize::from(!map.contains_key(&client));
        self.lockout_entries.store(entries, Ordering::Release);
        let entry = map.entry(client).or_default();
        if entry.locked_until_ms > now_ms {
            return Some(entry.locked_until_ms - now_ms);
        }
        if now_ms.saturating_sub(entry.window_start_ms) >= window_ms {
            *entry = AuthFailures { window_start_ms: now_ms, failures: 0, locked_until_ms: 0 };
        }
        entry.failures += 1;
        if entry.failures >= threshold {
            *entry = AuthFailures { window_start_ms: now_ms, failures: 0, locked_until_ms: now_ms + backoff_ms };
            return Some(backoff_ms);
        }
        None
    }

    /// Stores a lockout learned from the shared store.
    pub fn remember_lockout(&self, client: IpAddr, now_ms: u64, remaining_ms: u64) {
        let mut map = self.lockouts.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(
            client,
            AuthFailures { window_start_ms: now_ms, failures: 0, locked_until_ms: now_ms + remaining_ms },
        );
        self.lockout_entries.store(map.len(), Ordering::Release);
    }
}
