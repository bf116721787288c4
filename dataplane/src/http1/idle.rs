//! What a keep-alive connection waits on between requests besides its socket: the header
//! deadline, the server's drain signal, and the listener's asks to close idle connections.
//!
//! All are polled every time the connection waits for a request head, which on a busy
//! connection is once or twice per request. Registering the task's waker again each time would
//! cost a timer-wheel waker swap and, for the drain signal, a waiter-list lock to register and
//! another to deregister per request. Instead each remembers the waker it was left pending with
//! ([`Armed`]) and, while that waker is the current task's, answers with one atomic load: has
//! the timer left the wheel, has the channel's version moved.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::watch;
use tokio::task::coop;
use tokio::time::{Instant, Sleep};

/// The task waker a future was last left pending with. A pending poll that ran out of the
/// task's coop budget registered nothing, so it does not arm.
#[derive(Debug, Default)]
struct Armed(Option<Waker>);

impl Armed {
    fn holds(&self, cx: &Context<'_>) -> bool {
        self.0.as_ref().is_some_and(|waker| waker.will_wake(cx.waker()))
    }

    /// Polls `poll`, and arms with this task's waker when it stays pending with budget left.
    /// A ready poll disarms: whatever the future does next must be polled to register.
    fn poll<T>(&mut self, cx: &mut Context<'_>, poll: impl FnOnce(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
        let budget = coop::has_budget_remaining();
        let polled = poll(cx);
        if polled.is_ready() {
            self.disarm();
        } else if budget && !self.holds(cx) {
            self.0 = Some(cx.waker().clone());
        }
        polled
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

/// A deadline that moves later with every request: the keep-alive and header-read limit of one
/// connection. Moving it later only records it; the timer is re-armed when it fires before the
/// deadline, so a busy connection touches the timer wheel about once per timeout instead of
/// registering and cancelling a timer for every request.
#[derive(Debug)]
pub(super) struct Deadline {
    at: Instant,
    /// Created on the first wait; its own deadline is never later than `at`.
    timer: Option<Pin<Box<Sleep>>>,
    armed: Armed,
}

impl Deadline {
    pub(super) fn new() -> Self {
        Self { at: Instant::now(), timer: None, armed: Armed::default() }
    }

    pub(super) fn set(&mut self, at: Instant) {
        self.at = at;
        if let Some(timer) = self.timer.as_mut().filter(|timer| at < timer.deadline()) {
            timer.as_mut().reset(at);
            self.armed.disarm();
        }
    }

    /// Ready once `at` has passed.
    pub(super) fn poll_passed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let at = self.at;
        let Self { timer, armed, .. } = self;
        if timer.as_ref().is_some_and(|timer| !timer.is_elapsed()) && armed.holds(cx) {
            // Still in the wheel, holding this task's waker: its firing wakes us.
            return Poll::Pending;
        }
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        loop {
            ready!(armed.poll(cx, |cx| timer.as_mut().poll(cx)));
            if timer.deadline() >= at {
                return Poll::Ready(());
            }
            // Re-armed for the later deadline: registered again by the next poll in this loop,
            // which may still come back pending without budget.
            timer.as_mut().reset(at);
            armed.disarm();
        }
    }
}

/// The server's drain signal as one connection watches it. The waiter joins the channel's list
/// once per connection rather than once per request.
pub(super) struct Drain {
    signal: watch::Receiver<bool>,
    /// Ready once the server drains (or is gone).
    wait: Pin<Box<dyn Future<Output = ()> + Send>>,
    armed: Armed,
    draining: bool,
}

impl Drain {
    pub(super) fn new(signal: watch::Receiver<bool>) -> Self {
        let mut waiting = signal.clone();
        let wait = Box::pin(async move {
            // A dropped sender means the server is gone: drain as well.
            let _ = waiting.wait_for(|draining| *draining).await;
        });
        let draining = *signal.borrow();
        Self { signal, wait, armed: Armed::default(), draining }
    }

    /// True once the server drains. One atomic load while nothing has changed.
    pub(super) fn draining(&mut self) -> bool {
        if !self.draining {
            match self.signal.has_changed() {
                Ok(false) => {}
                Ok(true) => {
                    self.draining = *self.signal.borrow_and_update();
                    // The change woke the wait (and unlinked it): it must be polled again.
                    self.armed.disarm();
                }
                Err(_) => self.draining = true,
            }
        }
        self.draining
    }

    /// Ready once the server drains.
    pub(super) fn poll_draining(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.draining() {
            return Poll::Ready(());
        }
        if self.armed.holds(cx) {
            return Poll::Pending;
        }
        let Self { wait, armed, .. } = self;
        ready!(armed.poll(cx, |cx| wait.as_mut().poll(cx)));
        self.draining = true;
        Poll::Ready(())
    }
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain").field("draining", &self.draining).finish_non_exhaustive()
    }
}

/// Idle connections asked to close so that connections waiting at the connection limit can be
/// served: nginx's "reusable" connections. An HTTP/1.1 connection is idle while it waits for a
/// request head of which no byte has come: a new connection, or a keep-alive one between
/// requests. An HTTP/2 one is idle while no stream is open, and goes with a GOAWAY (`http2`).
/// Without this, connections that only sit open (a flood of them, or many clients' pools)
/// would hold every slot until the header timeout closes them, while clients with requests
/// wait in the backlog.
///
/// When the listener finds no free slot it asks for up to [`Reclaim::AT_ONCE`] closes and
/// wakes every idle connection; each that has been idle for [`Reclaim::MIN_IDLE`] takes one of
/// the closes while any are left and closes. A younger one is left alone, as nginx closes the
/// longest idle first: its client may be about to send (a new connection's first request, a
/// keep-alive client's next one), and closing it would fail that request. The listener asks
/// again every `MIN_IDLE` while it waits, so connections that were busy or young at the first
/// ask go once they have idled that long, and the slots go to the waiting connections rather
/// than to keep-alive. Closing an idle
/// connection is always allowed (RFC 9112 §9.5); clients' pools see it and connect again. The
/// listener calls the closes still wanted off once it has the slot it needed, so a connection
/// that goes idle later is not closed for nobody.
#[derive(Debug)]
pub struct Reclaim {
    /// Closes still wanted by the last ask.
    wanted: AtomicUsize,
    /// Bumped by every ask; idle connections follow it.
    asks: watch::Sender<u64>,
    /// `portcullis_idle_connections_reclaimed_total`.
    reclaimed: IntCounter,
}

impl Reclaim {
    /// Closes asked for at once, as nginx does: enough that a burst of waiting connections is
    /// served without one ask (and one wake-up of every idle connection) per connection.
    pub const AT_ONCE: usize = 32;

    /// How long a connection must have been idle to be closed for an ask.
    pub const MIN_IDLE: Duration = Duration::from_millis(100);

    pub fn new(reclaimed: IntCounter) -> Arc<Self> {
        Arc::new(Self { wanted: AtomicUsize::new(0), asks: watch::Sender::new(0), reclaimed })
    }

    /// Asks up to `closes` idle connections to close.
    pub fn ask(&self, closes: usize) {
        self.wanted.store(closes, Ordering::Release);
        self.asks.send_modify(|asks| *asks = asks.wrapping_add(1));
    }

    /// The listener has its slot: the closes still wanted are called off.
    #[inline]
    pub fn call_off(&self) {
        if self.wanted.load(Ordering::Relaxed) != 0 {
            self.wanted.store(0, Ordering::Release);
        }
    }

    /// Closes still wanted.
    #[cfg(test)]
    fn wanted(&self) -> usize {
        self.wanted.load(Ordering::Acquire)
    }

    /// Takes one of the closes wanted, if any is left.
    fn take(&self) -> bool {
        let took = self.wanted.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| left.checked_sub(1)).is_ok();
        if took {
            self.reclaimed.inc();
        }
        took
    }

    /// One connection's view of the asks, from now on.
    pub(crate) fn follow(self: &Arc<Self>) -> Reclaimable {
        let asks = self.asks.subscribe();
        Reclaimable { next: Some(next_ask(asks.clone())), asks, reclaim: self.clone(), armed: Armed::default() }
    }
}

/// Ready at the first ask after `asks`' last seen one.
fn next_ask(mut asks: watch::Receiver<u64>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        // The sender lives as long as this connection's `Reclaimable`: never an error here.
        let _ = asks.changed().await;
    })
}

/// The asks to close idle connections as one connection follows them. Like [`Drain`], its
/// waiter joins the channel's list once per connection (and again after each ask), not once
/// per request.
pub(crate) struct Reclaimable {
    reclaim: Arc<Reclaim>,
    asks: watch::Receiver<u64>,
    /// Ready at the next ask; `None` once it was, until [`Self::asked`] looks at the ask.
    next: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    armed: Armed,
}

impl Reclaimable {
    /// Whether an ask came since the last look. One atomic load.
    #[inline]
    pub(crate) fn ask_came(&self) -> bool {
        self.asks.has_changed().unwrap_or(false)
    }

    /// Whether this connection, idle since `idle_since`, is to close: an ask came since the
    /// last look, it has been idle for [`Reclaim::MIN_IDLE`], and one of the closes was left.
    pub(crate) fn asked(&mut self, idle_since: Instant) -> bool {
        if !self.ask_came() {
            return false;
        }
        self.asks.mark_unchanged();
        self.next = Some(next_ask(self.asks.clone()));
        self.armed.disarm();
        idle_since.elapsed() >= Reclaim::MIN_IDLE && self.reclaim.take()
    }

    /// Ready when an ask comes; [`Self::asked`] says whether to close.
    pub(crate) fn poll_ask(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // An ask that woke this task is seen here, without a poll of the wait it completed.
        let Some(next) = self.next.as_mut().filter(|_| !self.asks.has_changed().unwrap_or(true)) else {
            return Poll::Ready(());
        };
        if self.armed.holds(cx) {
            return Poll::Pending;
        }
        ready!(self.armed.poll(cx, |cx| next.as_mut().poll(cx)));
        self.next = None;
        Poll::Ready(())
    }
}

impl std::fmt::Debug for Reclaimable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reclaimable").field("reclaim", &self.reclaim).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;
    use std::time::Duration;

    use super::*;

    async fn passed_now(deadline: &mut Deadline) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(deadline.poll_passed(cx).is_ready())).await
    }

    #[tokio::test]
    async fn a_deadline_moved_later_waits_for_the_later_one_and_earlier_takes_effect() {
        let start = Instant::now();
        let mut deadline = Deadline::new();
        deadline.set(start + Duration::from_millis(50));
        assert!(!passed_now(&mut deadline).await, "armed, not passed");
        // Later: the timer armed for 50 ms fires early and is re-armed, not reported.
        deadline.set(start + Duration::from_millis(150));
        std::future::poll_fn(|cx| deadline.poll_passed(cx)).await;
        assert!(start.elapsed() >= Duration::from_millis(150), "{:?}", start.elapsed());

        // Earlier than the armed timer: honoured at once, not after the old one.
        deadline.set(Instant::now() + Duration::from_secs(60));
        assert!(!passed_now(&mut deadline).await);
        deadline.set(Instant::now() + Duration::from_millis(20));
        tokio::time::timeout(Duration::from_secs(10), std::future::poll_fn(|cx| deadline.poll_passed(cx)))
            .await
            .expect("the earlier deadline is kept");
    }

    /// Counts its wakes, so a test can see who was woken.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A waker that counts its wakes, and the count.
    fn counting_waker() -> (Arc<Counter>, Waker) {
        let counter = Arc::new(Counter::default());
        (counter.clone(), Waker::from(counter))
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_polled_again_by_its_task_is_not_reregistered_but_still_fires() {
        let mut deadline = Deadline::new();
        deadline.set(Instant::now() + Duration::from_secs(5));
        let (first, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(deadline.poll_passed(&mut cx).is_pending());
        assert!(deadline.armed.holds(&cx));
        // Polled again by the same task: pending at once, nothing registered again.
        assert!(deadline.poll_passed(&mut cx).is_pending());
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(first.0.load(Ordering::SeqCst), 1, "the timer woke the task it held");
        assert!(deadline.poll_passed(&mut cx).is_ready(), "an elapsed timer is polled, not skipped");

        // Moved earlier after being armed: the skip is off until the timer is polled again.
        deadline.set(Instant::now() + Duration::from_secs(60));
        let (second, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(deadline.poll_passed(&mut cx).is_pending(), "re-armed for the new deadline");
        deadline.set(Instant::now() + Duration::from_secs(1));
        assert!(!deadline.armed.holds(&cx));
        assert!(deadline.poll_passed(&mut cx).is_pending());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert!(deadline.poll_passed(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn a_pending_poll_without_budget_does_not_arm() {
        let mut deadline = Deadline::new();
        deadline.set(Instant::now() + Duration::from_secs(60));
        // Spend the task's budget, as a connection that served many buffered requests in one
        // poll would have.
        std::future::poll_fn(|cx| {
            while coop::has_budget_remaining() {
                if let Poll::Ready(progress) = coop::poll_proceed(cx) {
                    progress.made_progress();
                }
            }
            assert!(deadline.poll_passed(cx).is_pending());
            assert!(!deadline.armed.holds(cx), "out of budget: nothing registered, nothing armed");
            Poll::Ready(())
        })
        .await;
        // The next poll of the task starts with a fresh budget.
        tokio::task::yield_now().await;
        std::future::poll_fn(|cx| {
            assert!(deadline.poll_passed(cx).is_pending());
            assert!(deadline.armed.holds(cx), "armed once a poll could register");
            Poll::Ready(())
        })
        .await;
    }

    #[tokio::test]
    async fn a_ready_poll_disarms() {
        // After a ready poll the future may go on to something that still has to register (a
        // timer reset for a later deadline): the next poll must not be skipped. With the
        // budget check above, a re-armed timer that could not register stays unarmed.
        let (_, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut armed = Armed::default();
        assert!(armed.poll(&mut cx, |_| Poll::<()>::Pending).is_pending());
        assert!(armed.holds(&cx));
        assert!(armed.poll(&mut cx, |_| Poll::Ready(())).is_ready());
        assert!(!armed.holds(&cx), "a ready poll disarms");
    }

    #[tokio::test]
    async fn a_drain_wakes_the_waiting_connection_once_and_is_seen_without_a_poll() {
        let (tx, rx) = watch::channel(false);
        let mut drain = Drain::new(rx);
        let (woken, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(drain.poll_draining(&mut cx).is_pending());
        assert!(drain.poll_draining(&mut cx).is_pending(), "still pending, nothing registered twice");
        assert!(!drain.draining());

        tx.send(true).expect("receiver alive");
        assert_eq!(woken.0.load(Ordering::SeqCst), 1, "the waiting connection was woken");
        assert!(drain.draining(), "seen from the channel's version alone");
        assert!(drain.poll_draining(&mut cx).is_ready());

        // A server that goes away without a word drains its connections as well.
        let (tx, rx) = watch::channel(false);
        let mut drain = Drain::new(rx);
        assert!(drain.poll_draining(&mut cx).is_pending());
        drop(tx);
        assert!(drain.poll_draining(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn a_change_that_is_not_a_drain_re_registers_the_wait() {
        let (tx, rx) = watch::channel(false);
        let mut drain = Drain::new(rx);
        let (woken, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(drain.poll_draining(&mut cx).is_pending());
        tx.send(false).expect("receiver alive");
        assert!(drain.poll_draining(&mut cx).is_pending(), "not draining");
        tx.send(true).expect("receiver alive");
        assert_eq!(woken.0.load(Ordering::SeqCst), 2, "the second change woke the connection too");
        assert!(drain.poll_draining(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn an_ask_closes_as_many_idle_connections_as_it_wants_and_no_more() {
        let reclaim = Reclaim::new(IntCounter::new("reclaimed", "test").expect("counter"));
        let mut waiting: Vec<_> = (0..3).map(|_| reclaim.follow()).collect();
        let (woken, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let long_idle = Instant::now() - Reclaim::MIN_IDLE;
        for follower in &mut waiting {
            assert!(follower.poll_ask(&mut cx).is_pending());
            assert!(!follower.asked(long_idle), "no ask yet");
        }
        // A connection busy with a request: not waiting, it looks when it next goes idle.
        let mut busy = reclaim.follow();

        reclaim.ask(2);
        assert_eq!(woken.0.load(Ordering::SeqCst), 3, "every waiting connection was woken");
        let closing: Vec<bool> = waiting
            .iter_mut()
            .map(|follower| {
                assert!(follower.poll_ask(&mut cx).is_ready());
                follower.asked(long_idle)
            })
            .collect();
        assert_eq!(closing, [true, true, false], "two closes asked for");
        assert_eq!(reclaim.reclaimed.get(), 2);
        // The one left waits for the next ask, and sees this one only once.
        assert!(waiting[2].poll_ask(&mut cx).is_pending());
        assert!(!waiting[2].asked(long_idle));

        reclaim.ask(1);
        // A connection made after the ask does not see it.
        let mut late = reclaim.follow();
        assert!(!late.asked(long_idle));
        reclaim.call_off();
        assert_eq!(reclaim.wanted(), 0);
        assert!(!waiting[2].asked(long_idle), "called off before it looked");
        reclaim.ask(1);
        // One idle for less than MIN_IDLE is left alone; the close stays for another.
        assert!(!late.asked(Instant::now()), "too young to close");
        assert_eq!(reclaim.wanted(), 1);
        assert!(busy.asked(long_idle), "seen without waiting, from the channel's version");
        assert!(!waiting[2].asked(long_idle), "the one close was taken");
        assert_eq!(reclaim.reclaimed.get(), 3);
    }
}
