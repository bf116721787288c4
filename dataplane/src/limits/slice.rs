//! Slices of shared quota: a replica takes a small part of a subject's remaining window from
//! Redis in the same script call that admits a request, and admits what follows from it in
//! process, without a round trip.
//!
//! ```text
//!  granule g (100 ms) ─────────────────────────────────────────────▶ granule g+1
//!  │ miss: script admits the request and records a slice of      │ slice of g expired:
//!  │ R requests / T tokens in granule g                           │ unspent part refunded
//!  │ hits: admitted from the slice in process (no Redis call)     │ to granule g, next miss
//!  │ slice spent: next miss takes another (sized by demand)       │ takes a slice in g+1
//! ```
//!
//! Why the window stays exact. A slice is recorded in Redis in the granule it is taken in, and
//! is spent only until that granule ends (by the local clock, measured from before the call was
//! sent, so never later than Redis's granule end). Every request admitted from it is therefore
//! counted in its own granule, exactly where a request-by-request admission would have put it:
//! no 60-second span admits more than the limit, and there is no double burst at a boundary.
//! What is left unspent when the granule ends goes back to that granule. The only error is
//! under-admission while slices sit unspent: at most `1/SLICE_DIVISOR` of each limit per
//! replica (0.5%), for at most one granule, so two replicas stay inside the ±2% the limits
//! promise. Limits too small for a slice of two requests (under 400 requests or 400 × the cost
//! in tokens per minute or per budget) are decided by Redis request by request, as before.
//!
//! Settlements (real usage against the reservation) of sliced subjects are summed per granule
//! here and sent with the refunds, once per granule, by the store's flusher.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;

/// A slice holds at most `limit / SLICE_DIVISOR` of each limit (0.5%).
pub const SLICE_DIVISOR: u64 = 200;
/// The smallest slice asked for, in requests (and in this many requests' worth of tokens).
const MIN_SLICE_REQUESTS: u64 = 16;
/// A lane idle this long (and holding no slice) is forgotten.
const IDLE_FORGET: Duration = Duration::from_secs(10);

/// Limits of a lane: requests per minute, tokens per minute, day budget, month budget (0 = none).
pub type LaneLimits = [u64; 4];

/// The most of each limit one slice may hold: `(requests, tokens)`, `None` where no such limit is
/// set.
fn caps(limits: &LaneLimits) -> (Option<u64>, Option<u64>) {
    let requests = (limits[0] > 0).then(|| limits[0] / SLICE_DIVISOR);
    let tokens = limits[1..].iter().filter(|&&l| l > 0).map(|l| l / SLICE_DIVISOR).min();
    (requests, tokens)
}

/// Whether requests of this cost on a lane with these limits are admitted from slices: there is
/// a limit, and each limit is large enough for a slice of at least two such requests.
pub fn sliceable(limits: &LaneLimits, cost: u64) -> bool {
    let (requests, tokens) = caps(limits);
    (requests.is_some() || tokens.is_some())
        && requests.is_none_or(|cap| cap >= 2)
        && tokens.is_none_or(|cap| cap >= 2 * cost.max(1))
}

/// A slice's reply trailer from the admit script: what it granted beyond the requests it
/// decided, and the subject's figures after the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub requests: u64,
    pub tokens: u64,
    /// Milliseconds left in `granule` when the script ran.
    pub ms_left: u64,
    pub requests_used: u64,
    pub tokens_used: u64,
    pub day_used: u64,
    pub month_used: u64,
    pub requests_reset_ms: u64,
    pub tokens_reset_ms: u64,
    pub granule: u64,
}

/// Unspent quota to give back to one granule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refund {
    pub granule: u64,
    pub requests: u64,
    pub tokens: u64,
}

/// What an admission from a slice reports, in the admit script's own reply layout: admitted,
/// which, retry-after, requests used, tokens used, granule, day used and month used before this
/// request, requests reset, tokens reset.
pub type Reply = [i64; 10];

#[derive(Debug, Clone)]
struct Slice {
    granule: u64,
    /// Local instant the slice's granule ends (spend nothing from it at or after this).
    until: Instant,
    fetched: Instant,
    requests_left: u64,
    tokens_left: u64,
    figures: Grant,
}

#[derive(Debug)]
struct LaneState {
    slice: Option<Slice>,
    /// Requests and tokens admitted on this lane in granule `taken_in` (slice or not).
    taken: (u64, u64),
    taken_in: u64,
    /// The same for the last granule before it with any: the demand the next slice is sized for.
    last: (u64, u64),
    touched: Instant,
}

impl LaneState {
    fn new(now: Instant) -> Self {
        Self { slice: None, taken: (0, 0), taken_in: 0, last: (0, 0), touched: now }
    }

    /// Ends the current slice and returns its unspent part.
    fn end_slice(&mut self, limits: &LaneLimits) -> Option<Refund> {
        let slice = self.slice.take()?;
        let (requests, tokens) = caps(limits);
        let refund = Refund {
            granule: slice.granule,
            requests: if requests.is_some() { slice.requests_left } else { 0 },
            tokens: if tokens.is_some() { slice.tokens_left } else { 0 },
        };
        (refund.requests > 0 || refund.tokens > 0).then_some(refund)
    }
}

/// The slices this replica holds, one per lane (a subject with one set of limits and periods).
#[derive(Debug)]
pub struct Slices<L> {
    lanes: Mutex<HashMap<L, LaneState, RandomState>>,
}

impl<L> Default for Slices<L> {
    fn default() -> Self {
        Self { lanes: Mutex::new(HashMap::default()) }
    }
}

impl<L: Clone + Eq + Hash> Slices<L> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<L, LaneState, RandomState>> {
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one request of `cost` from the lane's live slice, if it has room.
    pub fn take(&self, lane: &L, limits: &LaneLimits, cost: u64, now: Instant) -> Option<Reply> {
        let mut lanes = self.lock();
        let state = lanes.get_mut(lane)?;
        let slice = state.slice.as_mut().filter(|s| now < s.until)?;
        let (requests, tokens) = caps(limits);
        if (requests.is_some() && slice.requests_left == 0) || (tokens.is_some() && slice.tokens_left < cost) {
            return None;
        }
        let tokens_before = slice.tokens_left;
        if requests.is_some() {
            slice.requests_left -= 1;
        }
        if tokens.is_some() {
            slice.tokens_left -= cost;
        }
        state.taken = (state.taken.0.saturating_add(1), state.taken.1.saturating_add(cost));
        state.touched = now;
        let f = &slice.figures;
        let elapsed = now.saturating_duration_since(slice.fetched).as_millis() as u64;
        let i = |v: u64| v.min(i64::MAX as u64) as i64;
        Some([
            1,
            0,
            0,
            i(f.requests_used.saturating_sub(slice.requests_left)),
            i(f.tokens_used.saturating_sub(slice.tokens_left)),
            i(slice.granule),
            i(f.day_used.saturating_sub(tokens_before)),
            i(f.month_used.saturating_sub(tokens_before)),
            i(f.requests_reset_ms.saturating_sub(elapsed)),
            i(f.tokens_reset_ms.saturating_sub(elapsed)),
        ])
    }

    /// How much to ask for beyond `costs` (the requests the call decides): enough for the demand
    /// the lane saw in its last granule with a quarter to spare, or twice what it has taken in
    /// this one, never less than a small floor, and never so much that the slice would hold more
    /// than its cap. `(0, 0)` when the lane takes no slices.
    pub fn want(&self, lane: &L, limits: &LaneLimits, costs: &[u64], now: Instant) -> (u64, u64) {
        let (request_cap, token_cap) = caps(limits);
        let lanes = self.lock();
        let state = lanes.get(lane);
        let (taken, last) = state.map_or(((0, 0), (0, 0)), |s| (s.taken, s.last));
        let live = state.and_then(|s| s.slice.as_ref()).filter(|s| now < s.until);
        let (held_requests, held_tokens) = live.map_or((0, 0), |s| (s.requests_left, s.tokens_left));
        let asked = costs.len() as u64;
        let asked_tokens = costs.iter().fold(0u64, |sum, &cost| sum.saturating_add(cost));
        let typical = asked_tokens.div_ceil(asked.max(1)).max(1);
        let grown = |last: u64, taken: u64| last.saturating_add(last / 4).max(taken.saturating_mul(2));
        let requests = request_cap.map_or(0, |cap| {
            let demand = grown(last.0, taken.0).max(MIN_SLICE_REQUESTS);
            demand.min(cap.saturating_sub(held_requests.saturating_add(asked)))
        });
        // Whole requests' worth of tokens: a remainder smaller than a request would only be
        // given back unspent.
        let tokens = token_cap.map_or(0, |cap| {
            let demand = grown(last.1, taken.1).max(MIN_SLICE_REQUESTS.saturating_mul(typical));
            let tokens = demand.min(cap.saturating_sub(held_tokens.saturating_add(asked_tokens)));
            tokens - tokens % typical
        });
        (requests, tokens)
    }

    /// Keeps what a call granted beyond its requests. `sent` is when the call was sent: the slice
    /// is spent until its granule ends counted from then, so never past Redis's own granule end.
    /// `decided` is what the call admitted (counted as demand). Returns a refund when an older
    /// slice of the lane is replaced.
    pub fn deposit(
        &self,
        lane: &L,
        limits: &LaneLimits,
        grant: Grant,
        decided: (u64, u64),
        sent: Instant,
    ) -> Option<Refund> {
        // Redis's figures are believed no further than they can be true: a slice is at most the
        // cap and lasts at most one granule (a faulty or hostile Redis must not hand out a
        // slice for centuries, or counts that wrap).
        let (request_cap, token_cap) = caps(limits);
        let grant = Grant {
            requests: grant.requests.min(request_cap.unwrap_or(0)),
            tokens: grant.tokens.min(token_cap.unwrap_or(0)),
            ms_left: grant.ms_left.min(super::window::GRANULE_MS),
            ..grant
        };
        let mut lanes = self.lock();
        let state = lanes.entry(lane.clone()).or_insert_with(|| LaneState::new(sent));
        let mut refund = None;
        if state.slice.as_ref().is_some_and(|s| s.granule != grant.granule) {
            refund = state.end_slice(limits);
        }
        if state.taken_in != grant.granule {
            state.last = state.taken;
            state.taken = (0, 0);
            state.taken_in = grant.granule;
        }
        state.taken = (state.taken.0.saturating_add(decided.0), state.taken.1.saturating_add(decided.1));
        state.touched = sent;
        // Redis reads its clock in whole milliseconds: up to one of the reported milliseconds
        // may already have passed when the script ran.
        let until = sent + Duration::from_millis(grant.ms_left.saturating_sub(1));
        match &mut state.slice {
            Some(slice) => {
                // Not cut to the cap: calls sent at once each sized theirs by what was held before.
                slice.requests_left = slice.requests_left.saturating_add(grant.requests);
                slice.tokens_left = slice.tokens_left.saturating_add(grant.tokens);
                // Both are safe (never past the granule's end): keep the later.
                slice.until = slice.until.max(until);
                slice.fetched = sent;
                slice.figures = grant;
            }
            None if grant.requests > 0 || grant.tokens > 0 => {
                state.slice = Some(Slice {
                    granule: grant.granule,
                    until,
                    fetched: sent,
                    requests_left: grant.requests,
                    tokens_left: grant.tokens,
                    figures: grant,
                });
            }
            None => {}
        }
        refund
    }

    /// Ends every slice whose granule is over and forgets idle lanes; returns what to give back.
    pub fn expire(&self, limits_of: impl Fn(&L) -> LaneLimits, now: Instant) -> Vec<(L, Refund)> {
        let mut refunds = Vec::new();
        let mut lanes = self.lock();
        lanes.retain(|lane, state| {
            if state.slice.as_ref().is_some_and(|s| now >= s.until) {
                if let Some(refund) = state.end_slice(&limits_of(lane)) {
                    refunds.push((lane.clone(), refund));
                }
            }
            state.slice.is_some() || now.saturating_duration_since(state.touched) < IDLE_FORGET
        });
        refunds
    }

    /// Ends every slice now (shutdown): everything unspent goes back.
    pub fn drain(&self, limits_of: impl Fn(&L) -> LaneLimits) -> Vec<(L, Refund)> {
        let mut lanes = self.lock();
        lanes.drain().filter_map(|(lane, mut state)| state.end_slice(&limits_of(&lane)).map(|r| (lane, r))).collect()
    }

    /// Whether any lane holds a slice.
    pub fn is_empty(&self) -> bool {
        self.lock().values().all(|s| s.slice.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::super::window;
    use super::*;

    const RPM: LaneLimits = [10_000, 0, 0, 0];
    const BOTH: LaneLimits = [100_000, 20_000_000, 0, 0];

    fn grant(requests: u64, tokens: u64, granule: u64, ms_left: u64) -> Grant {
        Grant {
            requests,
            tokens,
            ms_left,
            requests_used: 1_000,
            tokens_used: 50_000,
            day_used: 0,
            month_used: 0,
            requests_reset_ms: 59_000,
            tokens_reset_ms: 59_000,
            granule,
        }
    }

    #[test]
    fn only_limits_with_room_for_two_requests_are_sliced() {
        assert!(!sliceable(&[0, 0, 0, 0], 1), "no limit: nothing to slice");
        assert!(!sliceable(&[100, 0, 0, 0], 1), "100 rpm: a slice would be 0.5 requests");
        assert!(sliceable(&[400, 0, 0, 0], 1));
        assert!(!sliceable(&[400, 100_000, 0, 0], 300), "tokens: 500 per slice < 2 × 300");
        assert!(sliceable(&[0, 100_000, 0, 0], 250));
        assert!(!sliceable(&[0, 100_000_000, 50_000, 0], 250), "the day budget is the tightest cap");
        assert!(sliceable(&[1_000_000, 100_000_000, 0, 10_000_000], 250));
    }

    /// A faulty or hostile Redis's grant is believed only as far as it can be true: each no more
    /// than the cap (here 50 requests), for no longer than one granule, and counts never wrap.
    #[test]
    fn a_grant_beyond_the_cap_or_the_granule_is_cut_to_them() {
        let slices = Slices::default();
        let t0 = Instant::now();
        let huge = grant(u64::MAX, u64::MAX, 7, u64::MAX);
        assert_eq!(slices.deposit(&"k", &RPM, huge, (1, 1), t0), None);
        assert_eq!(slices.deposit(&"k", &RPM, huge, (u64::MAX, u64::MAX), t0), None);
        let mut admitted = 0;
        while slices.take(&"k", &RPM, 1, t0 + Duration::from_millis(10)).is_some() {
            admitted += 1;
            assert!(admitted <= 100, "more than two grants of the cap admitted");
        }
        assert_eq!(admitted, 100, "each grant is cut to the cap; two calls at once may each hold one");
        assert_eq!(slices.deposit(&"k", &RPM, huge, (1, 1), t0), None);
        let after_the_granule = t0 + Duration::from_millis(window::GRANULE_MS);
        assert_eq!(slices.take(&"k", &RPM, 1, after_the_granule), None, "the slice outlived its granule");
        assert_eq!(slices.want(&"k", &RPM, &[u64::MAX, u64::MAX], t0), (0, 0));
    }

    #[test]
    fn a_slice_admits_until_spent_then_misses() {
        let slices = Slices::default();
        let t0 = Instant::now();
        assert_eq!(slices.take(&"k", &RPM, 1, t0), None, "no slice yet");
        assert_eq!(slices.deposit(&"k", &RPM, grant(3, 0, 7, 80), (1, 1), t0), None);
        for left in [2i64, 1, 0] {
            let reply = slices.take(&"k", &RPM, 1, t0 + Duration::from_millis(10)).expect("from the slice");
            assert_eq!(reply[0], 1);
            assert_eq!(reply[5], 7, "counted in the slice's granule");
            assert_eq!(reply[3], 1_000 - left, "used: Redis's count less what this replica still holds");
            assert_eq!(reply[8], 59_000 - 10, "reset counts down from the fetch");
        }
        assert_eq!(slices.take(&"k", &RPM, 1, t0 + Duration::from_millis(10)), None, "spent");
    }

    #[test]
    fn a_slice_is_never_spent_after_its_granule_and_its_rest_goes_back() {
        let slices = Slices::default();
        let t0 = Instant::now();
        // Redis said 41 ms were left; its clock has millisecond steps, so 40 are believed.
        slices.deposit(&"k", &BOTH, grant(10, 5_000, 7, 41), (0, 0), t0);
        let reply = slices.take(&"k", &BOTH, 300, t0 + Duration::from_millis(39)).expect("in time");
        assert_eq!(reply[4], 50_000 - 4_700);
        assert_eq!(slices.take(&"k", &BOTH, 300, t0 + Duration::from_millis(40)), None, "granule over");
        let refunds = slices.expire(|_| BOTH, t0 + Duration::from_millis(40));
        assert_eq!(refunds, vec![("k", Refund { granule: 7, requests: 9, tokens: 4_700 })]);
        assert!(slices.is_empty());
        assert!(slices.expire(|_| BOTH, t0 + Duration::from_millis(50)).is_empty(), "refunded once");
    }

    #[test]
    fn a_slice_from_a_newer_granule_replaces_the_old_one() {
        let slices = Slices::default();
        let t0 = Instant::now();
        slices.deposit(&"k", &RPM, grant(10, 0, 7, 100), (0, 0), t0);
        slices.take(&"k", &RPM, 1, t0);
        let refund = slices.deposit(&"k", &RPM, grant(5, 0, 8, 100), (0, 0), t0 + Duration::from_millis(1));
        assert_eq!(refund, Some(Refund { granule: 7, requests: 9, tokens: 0 }), "tokens are not limited: none back");
        // Same granule: grants add up.
        assert_eq!(slices.deposit(&"k", &RPM, grant(5, 0, 8, 99), (0, 0), t0 + Duration::from_millis(1)), None);
        let n = std::iter::from_fn(|| slices.take(&"k", &RPM, 1, t0 + Duration::from_millis(2))).count();
        assert_eq!(n, 10);
    }

    #[test]
    fn slices_are_sized_by_demand_and_capped() {
        let slices = Slices::default();
        let t0 = Instant::now();
        assert_eq!(slices.want(&"k", &BOTH, &[100], t0), (16, 1_600), "the floor, in the asking request's tokens");
        // 40 requests taken in one granule: the next slice is sized for 50 (40 + a quarter).
        slices.deposit(&"k", &BOTH, grant(39, 3_900, 7, 100), (1, 100), t0);
        for _ in 0..39 {
            slices.take(&"k", &BOTH, 100, t0).expect("room");
        }
        assert_eq!(slices.want(&"k", &BOTH, &[100], t0), (80, 8_000), "twice this granule's 40 so far");
        // The next granule's first call: the demand of granule 7 is now the last one's.
        slices.deposit(&"k", &BOTH, grant(0, 0, 8, 100), (0, 0), t0 + Duration::from_millis(100));
        assert_eq!(slices.want(&"k", &BOTH, &[100], t0), (50, 5_000));
        assert_eq!(slices.want(&"k", &BOTH, &[300], t0), (50, 4_800), "whole requests' worth of tokens");
        // The cap: 0.5% of the limit, less what is held and asked.
        let small: LaneLimits = [4_000, 0, 0, 0];
        assert_eq!(slices.want(&"s", &small, &[1, 1], t0), (16, 0));
        slices.deposit(&"s", &small, grant(15, 0, 9, 100), (0, 0), t0);
        assert_eq!(slices.want(&"s", &small, &[1], t0), (4, 0), "cap 20, 15 held, 1 asked");
    }

    #[test]
    fn idle_lanes_are_forgotten_and_drain_returns_everything() {
        let slices = Slices::default();
        let t0 = Instant::now();
        slices.deposit(&"a", &RPM, grant(0, 0, 7, 100), (1, 1), t0);
        slices.deposit(&"b", &RPM, grant(4, 0, 7, 100), (1, 1), t0);
        assert!(slices.expire(|_| RPM, t0 + IDLE_FORGET).iter().any(|(l, _)| *l == "b"));
        assert!(slices.lock().is_empty(), "both idle past the horizon");
        slices.deposit(&"c", &RPM, grant(4, 0, 7, 100), (1, 1), t0);
        assert_eq!(slices.drain(|_| RPM), vec![("c", Refund { granule: 7, requests: 4, tokens: 0 })]);
    }
}
