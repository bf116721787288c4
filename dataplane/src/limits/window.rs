//! Sliding-window arithmetic shared by both stores (the Redis script mirrors it line for line).
//!
//! Why granules: a sliding log is exact but costs memory per request and cannot sum tokens
//! cheaply; a weighted two-window counter assumes the previous window's traffic was spread evenly
//! and lets a burst at its end through a second time. Here the 60-second window is cut into
//! 100 ms granules with a running total. A granule is counted in full until it has left the
//! window entirely, so no 60-second span ever admits more than the limit (no double burst), and a
//! steady stream is held back by at most one granule — 1/600 of the window, 0.17%.

use std::collections::VecDeque;

/// Length of every per-minute window.
pub const WINDOW_MS: u64 = 60_000;
/// Resolution of the window.
pub const GRANULE_MS: u64 = 100;
/// Granules in a window.
pub const GRANULES: u64 = WINDOW_MS / GRANULE_MS;

/// Admission refused: how long until `cost` could fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub retry_after_ms: u64,
    pub total: u64,
}

/// One limit's window.
#[derive(Debug, Default, Clone)]
pub struct SlidingWindow {
    granules: VecDeque<(u64, u64)>,
    total: u64,
}

impl SlidingWindow {
    fn expire(&mut self, now_ms: u64) {
        let current = now_ms / GRANULE_MS;
        // Granule g is dropped once it ends at or before the window's start.
        while let Some(&(granule, count)) = self.granules.front() {
            if granule + GRANULES >= current {
                break;
            }
            self.total = self.total.saturating_sub(count);
            self.granules.pop_front();
        }
    }

    /// Units counted in the window ending at `now_ms`.
    pub fn total(&mut self, now_ms: u64) -> u64 {
        self.expire(now_ms);
        self.total
    }

    /// Time until the oldest counted granule leaves the window (when capacity next frees up).
    pub fn reset_after_ms(&self, now_ms: u64) -> u64 {
        self.granules.front().map_or(0, |&(granule, _)| ((granule + GRANULES + 1) * GRANULE_MS).saturating_sub(now_ms))
    }

    /// Whether `cost` more fits under `limit`; nothing is recorded.
    pub fn check(&mut self, now_ms: u64, cost: u64, limit: u64) -> Result<(), Exceeded> {
        self.expire(now_ms);
        if self.total.saturating_add(cost) <= limit {
            return Ok(());
        }
        // Walk from the oldest granule until enough has left the window for `cost` to fit.
        let mut freed = 0u64;
        for &(granule, count) in &self.granules {
            freed += count;
            if self.total - freed + cost <= limit {
                let at = (granule + GRANULES + 1) * GRANULE_MS;
                return Err(Exceeded { retry_after_ms: at.saturating_sub(now_ms), total: self.total });
            }
        }
        // Larger than the limit itself: it will never fit; say "a full window".
        Err(Exceeded { retry_after_ms: WINDOW_MS, total: self.total })
    }

    /// Records `cost` in the current granule; returns the granule it went into, for later
    /// adjustment. A reading older than the newest granule (threads read the clock before they
    /// take the lock, so they can arrive out of order; a wall clock can step back) is recorded in
    /// that newest granule: granules stay in ascending order, which `expire` and `adjust` rely
    /// on, and the cost is counted slightly later than it happened, never dropped.
    pub fn add(&mut self, now_ms: u64, cost: u64) -> u64 {
        let current = now_ms / GRANULE_MS;
        self.total += cost;
        match self.granules.back_mut() {
            Some((granule, count)) if *granule >= current => {
                *count += cost;
                *granule
            }
            _ => {
                self.granules.push_back((current, cost));
                current
            }
        }
    }

    /// Corrects a reservation made in `granule` by `delta` (refund or charge). A granule that has
    /// already left the window is left alone: it no longer counts either way.
    pub fn adjust(&mut self, now_ms: u64, granule: u64, delta: i64) {
        self.expire(now_ms);
        // Granules are in ascending order and a full window holds 600: search, do not scan
        // (this runs once per request, usually for one of the newest).
        let found = self.granules.binary_search_by_key(&granule, |&(g, _)| g).ok();
        if let Some((_, count)) = found.and_then(|at| self.granules.get_mut(at)) {
            let new = (*count as i64 + delta).max(0) as u64;
            self.total = self.total - *count + new;
            *count = new;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn admits_up_to_the_limit_then_refuses() {
        let mut w = SlidingWindow::default();
        for i in 0..10 {
            assert!(w.check(T0 + i, 1, 10).is_ok());
            w.add(T0 + i, 1);
        }
        let refused = w.check(T0 + 10, 1, 10).expect_err("full");
        assert_eq!(refused.total, 10);
        // The burst sits in granule T0/100; it leaves the window one granule after 60 s.
        assert_eq!(refused.retry_after_ms, (T0 / GRANULE_MS + GRANULES + 1) * GRANULE_MS - (T0 + 10));
    }

    #[test]
    fn no_double_burst_across_any_boundary() {
        let mut w = SlidingWindow::default();
        let burst_at = T0 + 37; // anywhere inside a granule
        for _ in 0..100 {
            w.add(burst_at, 1);
        }
        // At every moment up to 60 s after the burst, nothing more fits.
        let mut t = burst_at;
        while t < burst_at + WINDOW_MS {
            assert!(w.check(t, 1, 100).is_err(), "admitted at +{} ms", t - burst_at);
            t += 10;
        }
        // Within one granule after the window has passed, the whole limit is available again.
        let free_at = burst_at + WINDOW_MS + GRANULE_MS;
        assert!(w.check(free_at, 100, 100).is_ok());
    }

    #[test]
    fn steady_stream_gets_the_limit_within_two_percent() {
        // 50 requests/s offered against 600/min for two minutes: every 60-second span admits
        // between 98% and 100% of the limit.
        let mut w = SlidingWindow::default();
        let mut admitted_at = Vec::new();
        let mut t = T0;
        while t < T0 + 2 * WINDOW_MS {
            if w.check(t, 1, 600).is_ok() {
                w.add(t, 1);
                admitted_at.push(t);
            }
            t += 20;
        }
        for start in (T0..T0 + WINDOW_MS).step_by(1_000) {
            let n = admitted_at.iter().filter(|&&a| a >= start && a < start + WINDOW_MS).count();
            assert!(n <= 600, "window at {start}: {n}");
            assert!(n >= 588, "window at {start}: {n}");
        }
    }

    #[test]
    fn adjust_refunds_and_charges_within_the_window_only() {
        let mut w = SlidingWindow::default();
        let g = w.add(T0, 500);
        w.adjust(T0 + 1_000, g, -300);
        assert_eq!(w.total(T0 + 1_000), 200);
        w.adjust(T0 + 1_000, g, 50);
        assert_eq!(w.total(T0 + 1_000), 250);
        w.adjust(T0 + 1_000, g, -10_000);
        assert_eq!(w.total(T0 + 1_000), 0, "never below zero");
        let g2 = w.add(T0 + 2_000, 10);
        w.adjust(T0 + 2 * WINDOW_MS, g2, 100);
        assert_eq!(w.total(T0 + 2 * WINDOW_MS), 0, "expired granule is not charged");
    }

    #[test]
    fn adjust_finds_its_granule_among_a_full_window_with_gaps() {
        let mut w = SlidingWindow::default();
        // Every third granule of a minute holds 10 units.
        let granules: Vec<u64> = (0..GRANULES).step_by(3).map(|i| w.add(T0 + i * GRANULE_MS, 10)).collect();
        let now = T0 + (GRANULES - 1) * GRANULE_MS;
        let before = w.total(now);
        for (n, &g) in granules.iter().enumerate() {
            w.adjust(now, g, n as i64 % 3 - 1);
        }
        let expected: i64 = (0..granules.len() as i64).map(|n| n % 3 - 1).sum();
        assert_eq!(w.total(now) as i64, before as i64 + expected);
        // A granule that was never recorded changes nothing.
        w.adjust(now, granules[1] + 1, 1_000);
        assert_eq!(w.total(now) as i64, before as i64 + expected);
    }

    #[test]
    fn a_late_reading_is_recorded_in_the_newest_granule_and_can_be_refunded() {
        let mut w = SlidingWindow::default();
        let newest = w.add(T0 + 1_000, 100);
        // A thread that read the clock 500 ms earlier takes the lock second.
        let late = w.add(T0 + 500, 40);
        assert_eq!(late, newest, "recorded where the granules stay in order");
        let after = w.add(T0 + 1_200, 1);
        assert!(after > newest);
        assert_eq!(w.total(T0 + 1_200), 141);
        // Both reservations are found again and refunded.
        w.adjust(T0 + 1_300, late, -40);
        w.adjust(T0 + 1_300, newest, -100);
        assert_eq!(w.total(T0 + 1_300), 1);
        // And everything leaves the window on time.
        assert_eq!(w.total(T0 + 1_200 + WINDOW_MS + GRANULE_MS), 0);
    }

    #[test]
    fn oversized_cost_never_fits() {
        let mut w = SlidingWindow::default();
        assert_eq!(w.check(T0, 11, 10).expect_err("too big").retry_after_ms, WINDOW_MS);
    }
}
