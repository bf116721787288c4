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
/// A shard of counters is swept once it holds this many subjects (subjects come from the
/// snapshot, so this is rarely reached).
const COUNTERS_SWEEP_FROM: usize = 50_000;
/// A shard of lockouts is swept of expired records once it holds this many addresses.
const LOCKOUTS_SWEEP_FROM: usize = 4_096;
/// At most this many addresses are tracked per shard: 7/8 of 16,384, so a shard's table never
/// grows past 16,384 slots of 49 bytes (32 shards: about 460k addresses in 26 MB). Past it, a
/// new address's failures are not counted until a sweep frees room; the addresses already
/// locked out stay locked out.
const LOCKOUTS_MAX: usize = 14_336;
/// Addresses tracked at most, all shards together.
pub const LOCKOUTS_TRACKED: usize = LOCKOUTS_MAX * SHARDS;
/// However full a shard stays, it is swept at most this often.
const SWEEP_EVERY_MS: u64 = 1_000;

/// A map swept of stale entries when it has grown past a mark. The mark then moves to twice what
/// is left, and a sweep waits `SWEEP_EVERY_MS` after the last: however many entries stay live (a
/// flood of failing addresses), sweeping costs amortized O(1) per insertion instead of a scan
/// of the whole map per call.
#[derive(Debug)]
struct SweptMap<K, V> {
    map: HashMap<K, V, RandomState>,
    /// The first sweep's mark, and the most entries held.
    sweep_from: usize,
    max: usize,
    sweep_at: usize,
    next_sweep_ms: u64,
}

impl<K: std::hash::Hash + Eq, V> SweptMap<K, V> {
    /// Entries the table holds without growing.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.map.capacity()
    }

    fn new(sweep_from: usize, max: usize) -> Self {
        Self { map: HashMap::default(), sweep_from, max, sweep_at: sweep_from, next_sweep_ms: 0 }
    }

    /// Sweeps the entries `stale` picks when due; whether one more entry fits under the bound.
    fn make_room(&mut self, now_ms: u64, mut stale: impl FnMut(&V) -> bool) -> bool {
        if self.map.len() >= self.sweep_at && now_ms >= self.next_sweep_ms {
            // Into a new table rather than `retain`: removing from a nearly full table leaves
            // tombstones that make the next insertions double it, whatever the entry count.
            let hasher = self.map.hasher().clone();
            let kept: Vec<(K, V)> = self.map.drain().filter(|(_, v)| !stale(v)).collect();
            self.map = HashMap::with_capacity_and_hasher(kept.len(), hasher);
            self.map.extend(kept);
            self.sweep_at = self.map.len().saturating_mul(2).clamp(self.sweep_from, self.max);
            self.next_sweep_ms = now_ms.saturating_add(SWEEP_EVERY_MS);
        }
        self.map.len() < self.max
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: SlidingWindow,
    tokens: SlidingWindow,
    day: (u32, u64),
    month: (u32, u64),
    touched_ms: u64,
}

impl Counters {
    /// The day's and month's spending, counters moved on to `period` first. They only move
    /// forward: a request that read the clock just before midnight and takes the lock just after
    /// another has started the new day is counted in the new day, instead of wiping it.
    fn budget_used(&mut self, period: Period) -> (u64, u64) {
        if self.day.0 < period.day {
            self.day = (period.day, 0);
        }
        if self.month.0 < period.month {
            self.month = (period.month, 0);
        }
        (self.day.1, self.month.1)
    }

    /// Until the counters' day ends, for an admission of `period` formed at `at_ms`: the next
    /// day's end when another request has already moved the counters on to it.
    fn day_reset_ms(&self, period: Period, at_ms: u64) -> u64 {
        if self.day.0 > period.day {
            return period.day_reset_ms + Period::at(at_ms + period.day_reset_ms).day_reset_ms;
        }
        period.day_reset_ms
    }

    /// As [`Self::day_reset_ms`], for the month.
    fn month_reset_ms(&self, period: Period, at_ms: u64) -> u64 {
        if self.month.0 > period.month {
            return period.month_reset_ms + Period::at(at_ms + period.month_reset_ms).month_reset_ms;
        }
        period.month_reset_ms
    }
}

/// Failed authentications from one client address.
#[derive(Debug, Default, Clone, Copy)]
struct AuthFailures {
    /// When the failures counted so far stop counting.
    window_end_ms: u64,
    failures: u64,
    locked_until_ms: u64,
}

impl AuthFailures {
    fn stale(&self, now_ms: u64) -> bool {
        self.locked_until_ms <= now_ms && self.window_end_ms <= now_ms
    }
}

#[derive(Debug)]
pub struct MemoryStore {
    shards: Vec<Mutex<SweptMap<Arc<str>, Counters>>>,
    hasher: RandomState,
    /// Keyed by address, not its text: checked on every request. Sharded like the counters, so
    /// that while some address has failed, requests do not all take one lock.
    lockouts: Vec<Mutex<SweptMap<IpAddr, AuthFailures>>>,
    /// How many addresses `lockouts` holds, changed under a shard's lock: while none has
    /// failed, the check on every request reads this instead of taking a lock.
    pub(super) lockout_entries: AtomicUsize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(SweptMap::new(COUNTERS_SWEEP_FROM, usize::MAX))).collect(),
            hasher: RandomState::default(),
            lockouts: (0..SHARDS).map(|_| Mutex::new(SweptMap::new(LOCKOUTS_SWEEP_FROM, LOCKOUTS_MAX))).collect(),
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
        let mut shard = self.shards[shard].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Look up before inserting so the common case allocates nothing.
        if let Some(counters) = shard.map.get_mut(subject) {
            counters.touched_ms = now_ms;
            return f(counters);
        }
        shard.make_room(now_ms, |c| c.touched_ms + IDLE_SWEEP_MS <= now_ms);
        let counters = shard.map.entry(Arc::from(subject)).or_default();
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
        // The granules the team's request and tokens went into (not always the clock's: see
        // `SlidingWindow::add`), to give them back or settle them there.
        let current = now_ms / super::window::GRANULE_MS;
        let mut team_granules = (current, current);
        if let Some((team, rpm, tpm)) = team {
            let recorded = self.with(&team.id, now_ms, |c| {
                if let Some(limit) = rpm {
                    if let Err(e) = c.requests.check(now_ms, 1, limit) {
                        return Err(Refusal::window(Which::TeamRequests, limit, e));
                    }
                }
                if let Some(limit) = tpm {
                    if let Err(e) = c.tokens.check(now_ms, cost, limit) {
                        return Err(Refusal::window(Which::TeamTokens, limit, e));
                    }
                }
                let requests = rpm.map_or(current, |_| c.requests.add(now_ms, 1));
                let tokens = tpm.map_or(current, |_| c.tokens.add(now_ms, cost));
                Ok((requests, tokens))
            });
            match recorded {
                Ok(granules) => team_granules = granules,
                Err(refusal) => return Decision::Refused(refusal),
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
                return Decision::Refused(Refusal::budget(
                    Which::DayBudget,
                    budget,
                    c.day_reset_ms(admission.period, admission.at_ms),
                ));
            }
            if let Some(budget) = key_limits.tokens_per_month.filter(|&b| month_used >= b) {
                return Decision::Refused(Refusal::budget(
                    Which::MonthBudget,
                    budget,
                    c.month_reset_ms(admission.period, admission.at_ms),
                ));
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
                granule: granule.unwrap_or(current),
                team_granule: team_granules.1,
                budget_day: c.day.0,
                requests_used: requests_total.unwrap_or(0),
                tokens_used: tokens_total.unwrap_or(0),
                requests_reset_ms: c.requests.reset_after_ms(now_ms),
                tokens_reset_ms: c.tokens.reset_after_ms(now_ms),
                budget_remaining: super::budget_remaining(&key_limits, day_used, month_used),
            })
        });
        if let (Decision::Refused(_), Some((team, rpm, tpm))) = (&decision, team) {
            let (requests, tokens) = team_granules;
            self.with(&team.id, now_ms, |c| {
                if rpm.is_some() {
                    c.requests.adjust(now_ms, requests, -1);
                }
                if tpm.is_some() {
                    c.tokens.adjust(now_ms, tokens, -(cost as i64));
                }
            });
        }
        decision
    }

    /// Applies the difference between reserved and actual tokens, in the granules `granted`
    /// recorded them in.
    pub fn settle(&self, admission: &Admission, granted: &Granted, delta: i64, now_ms: u64) {
        self.with(&admission.key().id, now_ms, |c| {
            c.tokens.adjust(now_ms, granted.granule, delta);
            // To the day and month the budgets were charged to (the counters move on together,
            // so that day's month); one that has ended since keeps what it was charged.
            if c.day.0 == granted.budget_day {
                c.day.1 = (c.day.1 as i64 + delta).max(0) as u64;
            }
            if c.month.0 == Period::month_of(granted.budget_day) {
                c.month.1 = (c.month.1 as i64 + delta).max(0) as u64;
            }
        });
        if let Some(team) = admission.team() {
            self.with(&team.id, now_ms, |c| c.tokens.adjust(now_ms, granted.team_granule, delta));
        }
    }

    /// Current counts for the admin view: (requests, tokens, day used, month used).
    pub fn usage(&self, subject: &str, now_ms: u64, period: Period) -> (u64, u64, u64, u64) {
        self.with(subject, now_ms, |c| {
            let (day, month) = c.budget_used(period);
            (c.requests.total(now_ms), c.tokens.total(now_ms), day, month)
        })
    }

    fn lockout_shard(&self, client: &IpAddr) -> std::sync::MutexGuard<'_, SweptMap<IpAddr, AuthFailures>> {
        let shard = (self.hasher.hash_one(client) as usize) % SHARDS;
        self.lockouts[shard].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remaining lockout for `client`, if any. The clock is read only for an address with a
    /// record (this runs on every request).
    pub fn locked(&self, client: IpAddr, now_ms: impl FnOnce() -> u64) -> Option<u64> {
        if self.lockout_entries.load(Ordering::Acquire) == 0 {
            return None;
        }
        let until = self.lockout_shard(&client).map.get(&client)?.locked_until_ms;
        let now_ms = now_ms();
        (until > now_ms).then(|| until - now_ms)
    }

    /// Runs `f` on `client`'s record, made if there is room (None if not), and keeps
    /// `lockout_entries` in step.
    fn with_record<R>(&self, client: IpAddr, now_ms: u64, f: impl FnOnce(&mut AuthFailures) -> R) -> Option<R> {
        let mut shard = self.lockout_shard(&client);
        let before = shard.map.len();
        let fits = shard.map.contains_key(&client) || shard.make_room(now_ms, |f| f.stale(now_ms));
        let result = fits.then(|| f(shard.map.entry(client).or_default()));
        let after = shard.map.len();
        if after >= before {
            self.lockout_entries.fetch_add(after - before, Ordering::AcqRel);
        } else {
            self.lockout_entries.fetch_sub(before - after, Ordering::AcqRel);
        }
        result
    }

    /// Records a failed authentication; returns the lockout when this one reached the threshold.
    /// An address that finds every record in use (a flood from ~460k addresses) is not counted.
    pub fn auth_failed(
        &self,
        client: IpAddr,
        now_ms: u64,
        threshold: u64,
        window_ms: u64,
        backoff_ms: u64,
    ) -> Option<u64> {
        let window_end_ms = now_ms.saturating_add(window_ms);
        self.with_record(client, now_ms, |entry| {
            if entry.locked_until_ms > now_ms {
                return Some(entry.locked_until_ms - now_ms);
            }
            if now_ms >= entry.window_end_ms {
                *entry = AuthFailures { window_end_ms, failures: 0, locked_until_ms: 0 };
            }
            entry.failures += 1;
            if entry.failures >= threshold {
                *entry = AuthFailures { window_end_ms, failures: 0, locked_until_ms: now_ms + backoff_ms };
                return Some(backoff_ms);
            }
            None
        })
        .flatten()
    }

    /// Stores a lockout learned from the shared store.
    pub fn remember_lockout(&self, client: IpAddr, now_ms: u64, remaining_ms: u64) {
        self.with_record(client, now_ms, |entry| {
            *entry = AuthFailures { window_end_ms: now_ms, failures: 0, locked_until_ms: now_ms + remaining_ms };
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard kept full by a steady flood, a part of it going stale before each sweep, never
    /// grows its table past the bound.
    #[test]
    fn a_full_shard_swept_again_and_again_keeps_its_table_size() {
        let mut shard: SweptMap<u32, u64> = SweptMap::new(LOCKOUTS_SWEEP_FROM, LOCKOUTS_MAX);
        let mut next_key = 0u32;
        for second in 0..30u64 {
            let now_ms = second * SWEEP_EVERY_MS;
            // Each value is the time it goes stale: ten seconds after it was written.
            for _ in 0..2_000 {
                if shard.make_room(now_ms, |&until| until <= now_ms) {
                    shard.map.insert(next_key, now_ms + 10_000);
                }
                next_key += 1;
            }
            assert!(shard.map.len() <= LOCKOUTS_MAX);
            assert!(shard.capacity() <= LOCKOUTS_MAX, "second {second}: room for {}", shard.capacity());
        }
        assert!(shard.map.len() > LOCKOUTS_MAX / 2, "the bound is used: {}", shard.map.len());
    }
}
