//! Optional busy polling: after traffic, keep the single-threaded runtime polling its sockets
//! for a short window instead of sleeping in `epoll_wait`.
//!
//! On a VM, a core that went idle takes tens of microseconds to wake when a packet arrives
//! (an inter-processor interrupt, a VM exit, the host scheduling the vCPU again). At low
//! concurrency every request pays that twice in the proxy: once when the client's request
//! arrives, once when the provider's response does. A task that yields in a loop keeps the
//! runtime awake: tokio's current-thread scheduler, finding only a yielded task to run, polls
//! the I/O driver with a zero timeout instead of blocking, so a readable socket is seen within
//! one turn. The price is a busy core while traffic flows, so it is off by default and meant
//! for a data plane pinned to its own core (`--worker-threads 1`).
//!
//! The spinner is adaptive: it spins only while requests keep starting. `window` after the last
//! one it parks on a [`Notify`], costing nothing until the next request wakes it. Under load it
//! changes nothing: the runtime is busy anyway, and the spinner's turn is one atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio::sync::{watch, Notify};

/// Upper bound on the window: beyond this, spinning is just a busy core.
pub const MAX_WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct BusyPoll {
    window: Duration,
    /// Bumped by every request; the spinner watches it change.
    activity: AtomicU64,
    /// The spinner is parked and waits for `wake`.
    asleep: AtomicBool,
    wake: Notify,
    /// Turns spun: `portcullis_busy_poll_turns_total`.
    turns: IntCounter,
}

impl BusyPoll {
    pub fn new(window: Duration, turns: IntCounter) -> Arc<Self> {
        Arc::new(Self {
            window: window.min(MAX_WINDOW),
            activity: AtomicU64::new(0),
            asleep: AtomicBool::new(false),
            wake: Notify::new(),
            turns,
        })
    }

    /// A request started: spin for another window, waking the spinner if it parked.
    #[inline]
    pub fn touch(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
        if self.asleep.load(Ordering::Relaxed) && self.asleep.swap(false, Ordering::AcqRel) {
            // Stores a permit if the spinner has not started waiting yet: no wake-up is lost.
            self.wake.notify_one();
        }
    }

    pub fn turns(&self) -> u64 {
        self.turns.get()
    }

    pub fn is_parked(&self) -> bool {
        self.asleep.load(Ordering::Acquire)
    }

    /// Spins while requests keep starting, parks after `window` without one, until shutdown.
    /// Must run on the runtime that serves traffic (the current-thread runtime).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut seen = self.activity.load(Ordering::Relaxed);
        let mut quiet_since: Option<Instant> = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let now_seen = self.activity.load(Ordering::Relaxed);
            if now_seen != seen {
                // Traffic: no clock read; the window starts when it goes quiet.
                seen = now_seen;
                quiet_since = None;
            } else {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.window {
                    self.asleep.store(true, Ordering::Release);
                    // A request that came in between is not missed: it swapped `asleep` back
                    // and left a permit, so `notified` returns at once.
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = shutdown.changed() => return,
                    }
                    self.asleep.store(false, Ordering::Release);
                    // Woken by a request: spin at least one turn before looking at the clock.
                    seen = self.activity.load(Ordering::Relaxed);
                    quiet_since = None;
                }
            }
            self.turns.inc();
            tokio::task::yield_now().await;
        }
    }
}

/// The window an idle vCPU of a KVM guest polls before it halts (the haltpoll cpuidle governor).
pub const HALT_POLL_NS: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

/// Whether the machine's idle CPUs halt without polling first, from [`HALT_POLL_NS`]'s text
/// (`None`: no such file, not a guest with that governor). On such a VM a packet for an idle
/// vCPU waits for the host to run it again; at low concurrency every request pays that twice
/// in the proxy, which busy polling spares.
pub fn halts_without_polling(halt_poll_ns: Option<&str>) -> bool {
    halt_poll_ns.is_some_and(|ns| ns.trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(window: Duration) -> Arc<BusyPoll> {
        BusyPoll::new(window, IntCounter::new("turns", "turns").expect("counter"))
    }

    /// Waits (real time) until `check` holds, up to two seconds.
    async fn eventually(mut check: impl FnMut() -> bool) -> bool {
        for _ in 0..400 {
            if check() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        check()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn spins_after_a_request_and_parks_once_traffic_stops() {
        let busy = busy(Duration::from_millis(20));
        let (stop, stopped) = watch::channel(false);
        let spinner = tokio::spawn(busy.clone().run(stopped));

        // No traffic yet: it parks after one window and stops turning.
        assert!(eventually(|| busy.is_parked()).await, "parks without traffic");
        let parked_at = busy.turns();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(busy.turns(), parked_at, "a parked spinner does not turn");

        // A request wakes it; it spins (turns grow while this task sleeps), then parks again.
        busy.touch();
        assert!(!busy.is_parked());
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(busy.turns() > parked_at + 10, "spins after a request: {} turns", busy.turns() - parked_at);
        assert!(eventually(|| busy.is_parked()).await, "parks again once quiet");
        let parked_again = busy.turns();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(busy.turns(), parked_again);

        let _ = stop.send(true);
        tokio::time::timeout(Duration::from_secs(2), spinner).await.expect("stops on shutdown").expect("joined");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_touch_just_before_parking_is_not_lost() {
        let busy = busy(Duration::from_micros(200));
        let (_stop, stopped) = watch::channel(false);
        let _spinner = tokio::spawn(busy.clone().run(stopped));
        for _ in 0..100 {
            assert!(eventually(|| busy.is_parked()).await);
            let before = busy.turns();
            // Touch, then let the spinner run: it must wake and turn at least once.
            busy.touch();
            assert!(eventually(|| busy.turns() > before).await, "woken by the touch");
        }
    }

    #[test]
    fn the_window_is_capped() {
        assert_eq!(busy(Duration::from_secs(60)).window, MAX_WINDOW);
    }

    #[test]
    fn only_a_zero_halt_poll_window_counts_as_halting_without_polling() {
        assert!(halts_without_polling(Some("0\n")));
        assert!(!halts_without_polling(Some("200000\n")), "the kernel's default polls");
        assert!(!halts_without_polling(None), "no haltpoll governor: nothing known");
        assert!(!halts_without_polling(Some("")));
    }
}
