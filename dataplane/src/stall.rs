//! The write timeout for HTTP/2 streams.
//!
//! hyper polls a response body only while its stream has flow-control window, so a client that
//! stops reading (sends no `WINDOW_UPDATE`, or stops reading the socket) leaves the body
//! unpolled, and the provider request inside it held open, for as long as the connection lives.
//! Each HTTP/2 connection gets a [`Watchdog`]: every response body goes through a
//! [`GuardedBody`] that notes when it last handed hyper data, and a stream that has not come back
//! for more within the write timeout (the same `--response-write-timeout` HTTP/1.1 uses) loses
//! its body. Dropping it closes the provider connection and finishes the request's record
//! (`client_closed`). The stream itself ends with an error (`RST_STREAM`) only when hyper next
//! polls it, that is when the client grants window again, or when the connection closes: until
//! then it keeps one of the connection's stream slots and the chunk h2 holds for it.
//!
//! Data is handed to hyper in pieces of at most [`PIECE`] bytes (small frames that are ready
//! together gathered into one, see [`gather`]), so "came back for more" means "took another
//! 16 KiB", as close to HTTP/1.1's "any progress" as hyper lets a body see. A body hyper has
//! not polled at all counts from when it was handed over with its response head (hyper waits
//! for window before the first poll, so a client that grants none would otherwise hold the
//! stream for ever). A body waiting on its provider (its last poll returned `Pending`) is not
//! stalled: the provider idle timeout covers that. A body that has handed over its last piece
//! is still watched until hyper drops it: hyper holds the piece until the stream has window.
//!
//! Each stream's body carries a ticket (the connection's open-stream count): the sweep drops it
//! with a stalled body, so a connection whose only streams stalled can idle out and close.

use std::mem;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::{BoxError, GatewayBody};

/// Largest piece of data handed to hyper at once.
pub const PIECE: usize = 16 * 1024;

/// Most frames gathered into one piece (a bound however small the frames, even empty).
const GATHERED_FRAMES: usize = 256;

/// One stream's body, shared between the stream and the watchdog.
struct Slot {
    body: Option<GatewayBody>,
    /// What is left of a frame larger than [`PIECE`], or a frame that did not fit in the piece
    /// it was read for.
    rest: Bytes,
    /// What the body returned after the data of the last piece was gathered: trailers, an
    /// error, or (`Some(None)`) its end, handed to hyper next. The end stays once the body is
    /// dropped (at once: its provider connection goes back to the pool), so a body that ended
    /// keeps answering `None`.
    held: Option<Option<Result<Frame<Bytes>, BoxError>>>,
    /// When the body last handed hyper data (or was handed over unpolled), while hyper has not
    /// asked for more since.
    handed_at: Option<Instant>,
    /// Released with the body: when hyper drops it, or when the sweep takes it.
    ticket: Option<Box<dyn std::any::Any + Send>>,
}

impl Slot {
    /// Whether everything has been handed over.
    fn ended(&self) -> bool {
        self.rest.is_empty()
            && match &self.held {
                Some(held) => held.is_none(),
                None => self.body.as_ref().is_some_and(Body::is_end_stream),
            }
    }

    /// Keeps what the body returned after its data (trailers, an error, its end) for hyper's
    /// next poll. At the end the body is let go at once: its provider connection goes back to
    /// the pool then, not when hyper drops the stream.
    fn hold(&mut self, next: Option<Result<Frame<Bytes>, BoxError>>) {
        if next.is_none() {
            self.body = None;
        }
        self.held = Some(next);
    }

    /// Hands hyper what was held (nothing more to watch until it polls again); the end stays,
    /// so a body that ended keeps answering `None`.
    fn hand_held(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.handed_at = None;
        let held = self.held.take().unwrap_or(None);
        if held.is_none() {
            self.held = Some(None);
        }
        Poll::Ready(held)
    }
}

/// The stalled-stream watchdog of one HTTP/2 connection.
pub struct Watchdog {
    timeout: Duration,
    slots: Mutex<Vec<Weak<Mutex<Slot>>>>,
    /// Wakes the parked sweeper when a stream arrives on an idle connection.
    work: Notify,
    /// Sweeps run, for the tests.
    #[cfg(test)]
    sweeps: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Watchdog {
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            timeout,
            slots: Mutex::new(Vec::new()),
            work: Notify::new(),
            #[cfg(test)]
            sweeps: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// `body`, watched from now, holding `ticket` until the body is dropped or taken.
    pub fn guard(&self, body: GatewayBody, ticket: impl Send + 'static) -> GuardedBody {
        let handed_at = (!body.is_end_stream()).then(Instant::now);
        let slot = Slot { body: Some(body), rest: Bytes::new(), held: None, handed_at, ticket: Some(Box::new(ticket)) };
        let slot = Arc::new(Mutex::new(slot));
        let mut slots = lock(&self.slots);
        if slots.is_empty() {
            // Stored as a permit if the sweeper is not parked yet: no wake-up is lost.
            self.work.notify_one();
        }
        slots.push(Arc::downgrade(&slot));
        GuardedBody { slot }
    }

    /// Drops the body of every stream stalled for longer than the timeout; forgets streams that
    /// ended. Returns how many it dropped.
    pub fn sweep(&self, now: Instant) -> usize {
        #[cfg(test)]
        self.sweeps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Bodies are dropped outside the locks (ending one records the request), and so is any
        // slot whose stream went away while this ran.
        let mut stalled = Vec::new();
        let mut tickets = Vec::new();
        let mut seen = Vec::new();
        lock(&self.slots).retain(|weak| {
            let Some(slot) = weak.upgrade() else { return false };
            let keep = {
                let mut slot = lock(&slot);
                if slot.handed_at.is_some_and(|at| now.saturating_duration_since(at) >= self.timeout) {
                    stalled.extend(slot.body.take());
                    tickets.extend(slot.ticket.take());
                    slot.rest = Bytes::new();
                    slot.held = None;
                    slot.handed_at = None;
                }
                slot.body.is_some()
            };
            seen.push(slot);
            keep
        });
        drop(seen);
        drop(tickets);
        let dropped = stalled.len();
        if dropped > 0 {
            tracing::info!(
                streams = dropped,
                timeout_ms = self.timeout.as_millis() as u64,
                "HTTP/2 streams took none of their response within the write timeout; their provider requests were dropped"
            );
        }
        dropped
    }

    /// Sweeps every quarter of the timeout (at most every second) while there are streams to
    /// watch, and parks while there are none, so an idle connection costs no wake-ups. Runs until
    /// aborted (the connection holds it in an `AbortOnDropHandle`).
    pub async fn run(self: Arc<Self>) {
        let every = (self.timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            if lock(&self.slots).is_empty() {
                self.work.notified().await;
            }
            tokio::time::sleep(every).await;
            self.sweep(Instant::now());
        }
    }
}

/// A response body the [`Watchdog`] can take away from a stalled stream.
pub struct GuardedBody {
    slot: Arc<Mutex<Slot>>,
}

impl std::fmt::Debug for GuardedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedBody").finish_non_exhaustive()
    }
}

/// `first`, followed by the data the body has ready now, up to [`PIECE`] bytes in all: a
/// provider's SSE events that one read brought go to hyper as one piece, so out as one `DATA`
/// frame, instead of one frame (and one pass through h2's send queue and the connection's task)
/// each. nginx sends what one read brought the same way. Nothing waits: gathering stops at the
/// first `Pending`. Data that would not fit waits in `rest`; whatever the body returns after
/// the data (trailers, an error, its end) waits in `held`.
fn gather(slot: &mut Slot, cx: &mut Context<'_>, first: Bytes) -> Bytes {
    let Some(body) = slot.body.as_mut() else { return first };
    let mut gathered: Option<BytesMut> = None;
    // The first frame is in hand.
    for _ in 1..GATHERED_FRAMES {
        let len = gathered.as_ref().map_or(first.len(), BytesMut::len);
        if len >= PIECE || body.is_end_stream() {
            break;
        }
        let more = match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => break,
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(more) => more,
                Err(trailers) => {
                    slot.hold(Some(Ok(trailers)));
                    break;
                }
            },
            Poll::Ready(next) => {
                slot.hold(next);
                break;
            }
        };
        if len + more.len() > PIECE {
            slot.rest = more;
            break;
        }
        let gathered = gathered.get_or_insert_with(|| {
            let mut joined = BytesMut::with_capacity((4 * (first.len() + more.len())).min(PIECE));
            joined.extend_from_slice(&first);
            joined
        });
        gathered.extend_from_slice(&more);
    }
    gathered.map_or(first, BytesMut::freeze)
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut slot = lock(&self.slot);
        let slot = &mut *slot;
        let mut data = if !slot.rest.is_empty() {
            mem::take(&mut slot.rest)
        } else if slot.held.is_some() {
            return slot.hand_held();
        } else {
            // Gone with nothing held: the watchdog took it.
            let Some(body) = slot.body.as_mut() else {
                return Poll::Ready(Some(Err("the client took none of the response within the write timeout".into())));
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => {
                    slot.handed_at = None;
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => data,
                    // Trailers: the end.
                    Err(trailers) => {
                        slot.hold(Some(Ok(trailers)));
                        return slot.hand_held();
                    }
                },
                Poll::Ready(next) => {
                    slot.hold(next);
                    return slot.hand_held();
                }
            }
        };
        if data.len() > PIECE {
            slot.rest = data.split_off(PIECE);
        } else {
            data = gather(slot, cx, data);
        }
        // Until hyper comes back for more, or drops the body having sent its last piece (it
        // holds a piece until the stream has window).
        slot.handed_at = Some(Instant::now());
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.slot).ended()
    }

    fn size_hint(&self) -> SizeHint {
        let slot = lock(&self.slot);
        let Some(body) = slot.body.as_ref() else {
            // Ended: nothing more than what is left of the last frame.
            return if matches!(slot.held, Some(None)) {
                SizeHint::with_exact(slot.rest.len() as u64)
            } else {
                SizeHint::default()
            };
        };
        let inner = body.size_hint();
        let rest = slot.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    /// Notes when it is dropped (a stream's ticket).
    struct Ticket(Arc<std::sync::atomic::AtomicBool>);

    impl Drop for Ticket {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A body that hands out one frame and then waits for ever, reporting when it is dropped.
    fn one_frame_then_wait(dropped: Arc<std::sync::atomic::AtomicBool>) -> GatewayBody {
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let flag = Flag(dropped);
        let first = futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"data: 1\n\n")))]);
        let stream = futures_util::StreamExt::chain(
            first,
            futures_util::stream::poll_fn(move |_| {
                let _ = &flag;
                Poll::Pending
            }),
        );
        StreamBody::new(stream).boxed_unsync()
    }

    #[tokio::test]
    async fn a_stream_that_takes_no_more_loses_its_body_and_one_waiting_on_its_provider_does_not() {
        let watchdog = Watchdog::new(Duration::from_secs(1));
        let start = Instant::now();

        // Handed a frame, then not polled again: stalled once the timeout has passed.
        let stalled_dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut stalled = watchdog.guard(one_frame_then_wait(stalled_dropped.clone()), ());
        assert!(stalled.frame().await.is_some());

        // Handed a frame and polled again: waiting on the provider, never stalled.
        let waiting_dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut waiting = watchdog.guard(one_frame_then_wait(waiting_dropped.clone()), ());
        assert!(waiting.frame().await.is_some());
        let again = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut waiting).poll_frame(cx).is_pending())).await;
        assert!(again, "the provider has nothing more yet");

        assert_eq!(watchdog.sweep(start + Duration::from_millis(500)), 0, "not yet");
        assert!(!stalled_dropped.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(watchdog.sweep(Instant::now() + Duration::from_secs(2)), 1);
        assert!(stalled_dropped.load(std::sync::atomic::Ordering::SeqCst), "the stalled body was dropped");
        assert!(!waiting_dropped.load(std::sync::atomic::Ordering::SeqCst), "the waiting one was not");

        // The sweep forgot the stalled stream; polled again, it ends with an error.
        assert_eq!(lock(&watchdog.slots).len(), 1);
        assert!(matches!(stalled.frame().await, Some(Err(_))));
        // So is a stream whose body hyper dropped.
        drop(waiting);
        watchdog.sweep(Instant::now());
        assert!(lock(&watchdog.slots).is_empty());
        assert!(waiting_dropped.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// hyper polls a body only once its stream has window: a client that grants none never
    /// gets it polled. The body counts as stalled from when it was handed over, and its ticket
    /// (the connection's open-stream count) goes with it.
    #[tokio::test]
    async fn a_body_never_polled_is_stalled_from_the_head_and_releases_its_ticket() {
        let watchdog = Watchdog::new(Duration::from_secs(1));
        let start = Instant::now();
        let (dropped, released) =
            (Arc::new(std::sync::atomic::AtomicBool::new(false)), Arc::new(std::sync::atomic::AtomicBool::new(false)));
        let mut unpolled = watchdog.guard(one_frame_then_wait(dropped.clone()), Ticket(released.clone()));
        assert_eq!(watchdog.sweep(start + Duration::from_millis(500)), 0, "not yet");
        assert_eq!(watchdog.sweep(Instant::now() + Duration::from_secs(2)), 1);
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst), "the body was dropped");
        assert!(released.load(std::sync::atomic::Ordering::SeqCst), "and its ticket with it, before hyper lets go");
        assert!(matches!(unpolled.frame().await, Some(Err(_))));

        // A body that is already over is not watched at all; its ticket goes when hyper drops it.
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let empty = watchdog.guard(
            http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync(),
            Ticket(released.clone()),
        );
        assert_eq!(watchdog.sweep(Instant::now() + Duration::from_secs(5)), 0);
        assert!(!released.load(std::sync::atomic::Ordering::SeqCst));
        drop(empty);
        assert!(released.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_parks_while_there_is_nothing_to_watch_and_wakes_for_a_new_stream() {
        let watchdog = Watchdog::new(Duration::from_secs(1));
        let sweeper = tokio::spawn(watchdog.clone().run());
        let sweeps = || watchdog.sweeps.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(sweeps(), 0, "an idle connection's sweeper stays parked");

        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut stalled = watchdog.guard(one_frame_then_wait(dropped.clone()), ());
        assert!(stalled.frame().await.is_some());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst), "woken, it swept the stalled stream");
        assert!(matches!(stalled.frame().await, Some(Err(_))));

        // Nothing left to watch: parked again.
        let before = sweeps();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(sweeps() <= before + 1, "{} sweeps while idle", sweeps() - before);
        sweeper.abort();
    }

    #[tokio::test]
    async fn data_goes_out_in_pieces_and_a_last_piece_hyper_still_holds_can_stall() {
        let watchdog = Watchdog::new(Duration::from_secs(1));
        let big = Bytes::from(vec![b'x'; PIECE * 2 + 5]);
        let body = http_body_util::Full::new(big.clone()).map_err(|never| match never {}).boxed_unsync();
        let mut guarded = watchdog.guard(body, ());
        assert_eq!(guarded.size_hint().exact(), Some(big.len() as u64));
        let mut pieces = Vec::new();
        while let Some(frame) = guarded.frame().await {
            let data = frame.expect("data").into_data().expect("data");
            pieces.push(data.len());
            // hyper not coming back within the timeout is a stall, the last piece included.
            assert!(lock(&guarded.slot).handed_at.is_some(), "{pieces:?}");
        }
        assert_eq!(pieces, [PIECE, PIECE, 5]);
        drop(guarded);
        // A body whose last piece went out but that hyper still holds (waiting for window to
        // send it): stalled once the timeout passes, so its ticket is released.
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut last = watchdog.guard(
            http_body_util::Full::new(Bytes::from_static(b"end")).map_err(|never| match never {}).boxed_unsync(),
            Ticket(released.clone()),
        );
        assert!(last.frame().await.is_some());
        assert!(last.is_end_stream());
        assert_eq!(watchdog.sweep(Instant::now() + Duration::from_millis(500)), 0, "not yet");
        assert_eq!(watchdog.sweep(Instant::now() + Duration::from_secs(5)), 1);
        assert!(released.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// One step of a [`Script`]ed body.
    enum Step {
        Data(Vec<u8>),
        /// `Pending` once (the body wakes itself, as a socket with more to read would).
        Wait,
        Trailers,
        Fail,
    }

    /// A body that returns its steps in order, then ends; `knows_end` makes it say it has ended
    /// as soon as its steps run out (as the metering body does) rather than only when polled.
    struct Script {
        steps: std::collections::VecDeque<Step>,
        knows_end: bool,
    }

    impl Body for Script {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(match self.steps.pop_front() {
                None => None,
                Some(Step::Data(data)) => Some(Ok(Frame::data(Bytes::from(data)))),
                Some(Step::Wait) => {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Some(Step::Trailers) => Some(Ok(Frame::trailers(http::HeaderMap::new()))),
                Some(Step::Fail) => Some(Err("the provider broke off".into())),
            })
        }

        fn is_end_stream(&self) -> bool {
            self.knows_end && self.steps.is_empty()
        }
    }

    /// What a scripted body comes out as through a guard: data pieces as text (`'x'` runs
    /// shortened to their length), "trailers", "error"; and whether the guard said it had ended
    /// once the last piece was out (hyper then sends the end with it, and polls no more).
    async fn pieces(steps: Vec<Step>, knows_end: bool) -> (Vec<String>, bool) {
        let watchdog = Watchdog::new(Duration::from_secs(60));
        let script = Script { steps: steps.into(), knows_end };
        let mut guarded = watchdog.guard(script.boxed_unsync(), ());
        let mut out = Vec::new();
        let mut ended_with_data = false;
        while let Some(frame) = guarded.frame().await {
            match frame {
                Ok(frame) if frame.is_trailers() => out.push("trailers".to_owned()),
                Ok(frame) => {
                    let data = frame.into_data().expect("data");
                    let text = String::from_utf8(data.to_vec()).expect("text");
                    let runs = text.trim_matches('x').len() != text.len();
                    out.push(if runs {
                        format!("{}x{}", text.matches('x').count(), text.replace('x', ""))
                    } else {
                        text
                    });
                    ended_with_data = guarded.is_end_stream();
                    if ended_with_data {
                        break;
                    }
                }
                Err(_) => {
                    out.push("error".to_owned());
                    break;
                }
            }
        }
        (out, ended_with_data)
    }

    fn data(text: &str) -> Step {
        Step::Data(text.as_bytes().to_vec())
    }

    /// Frames a provider sent together (one read's SSE events) go to hyper as one piece; a
    /// frame that comes after a wait is not held back for company; nothing crosses `PIECE`,
    /// and what follows the data (trailers, an error, the end) comes after it, in order.
    #[tokio::test]
    async fn frames_ready_together_go_as_one_piece_and_nothing_waits_for_company() {
        let (out, ended) = pieces(vec![data("a"), data("b"), data("c"), Step::Wait, data("d"), data("e")], true).await;
        assert_eq!(out, ["abc", "de"]);
        assert!(ended, "the last piece carries the end");
        // The end found while gathering, by a body that only tells when polled.
        let (out, ended) = pieces(vec![data("a"), data("b")], false).await;
        assert_eq!(out, ["ab"]);
        assert!(ended, "the end was found while gathering and goes with the data");

        // A frame that would take the piece past PIECE waits for the next one.
        let near = Step::Data(vec![b'x'; PIECE - 10]);
        let (out, _) = pieces(vec![near, data("yy"), Step::Data(vec![b'x'; 9]), data("z")], true).await;
        assert_eq!(out, [format!("{}xyy", PIECE - 10), "9xz".to_owned()]);
        // A frame larger than PIECE is still cut, and the rest gathers what follows.
        let (out, _) = pieces(vec![Step::Data(vec![b'x'; PIECE + 3]), data("a"), data("b")], true).await;
        assert_eq!(out, [format!("{PIECE}x"), "3xab".to_owned()]);

        let (out, _) = pieces(vec![data("a"), data("b"), Step::Trailers], false).await;
        assert_eq!(out, ["ab", "trailers"]);
        let (out, _) = pieces(vec![data("a"), data("b"), Step::Fail, data("never")], false).await;
        assert_eq!(out, ["ab", "error"], "the data read before the error goes first");
        // Empty frames do not keep the gathering going for ever.
        let mut steps: Vec<Step> = (0..10_000).map(|_| data("")).collect();
        steps.push(data("z"));
        let (out, _) = pieces(steps, true).await;
        assert_eq!(out.concat(), "z");
        assert!(out.len() > 1, "gathered in bounded steps: {}", out.len());
    }

    /// A body whose end is found while gathering is let go at once (its provider connection
    /// goes back to the pool then, not when hyper drops the stream), and the guard keeps
    /// answering that it ended.
    #[tokio::test]
    async fn a_body_that_ended_is_let_go_and_stays_ended() {
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Flag(dropped.clone());
        let frames = ["a", "b"].map(|d| Ok::<_, BoxError>(Frame::data(Bytes::from_static(d.as_bytes()))));
        let end = futures_util::stream::poll_fn(move |_| {
            let _ = &flag;
            Poll::Ready(None)
        });
        let body = StreamBody::new(futures_util::StreamExt::chain(futures_util::stream::iter(frames), end));
        let watchdog = Watchdog::new(Duration::from_secs(60));
        let mut guarded = watchdog.guard(body.boxed_unsync(), ());
        let piece = guarded.frame().await.expect("a piece").expect("data").into_data().expect("data");
        assert_eq!(piece, "ab");
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst), "the body went with its end");
        assert!(guarded.is_end_stream());
        assert_eq!(guarded.size_hint().exact(), Some(0));
        assert!(guarded.frame().await.is_none());
        assert!(guarded.frame().await.is_none(), "and stays ended");
        assert_eq!(watchdog.sweep(Instant::now() + Duration::from_secs(120)), 0, "nothing to take");
    }

    /// The gathering stops at the body's first `Pending`, which leaves the stream's waker with
    /// the provider's socket: what arrives later wakes the stream and goes out.
    #[tokio::test]
    async fn data_arriving_after_the_gathering_stopped_wakes_the_stream() {
        let watchdog = Watchdog::new(Duration::from_secs(60));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Frame<Bytes>, BoxError>>();
        let body = StreamBody::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).boxed_unsync();
        let mut guarded = watchdog.guard(body, ());
        for event in ["data: 1\n\n", "data: 2\n\n"] {
            tx.send(Ok(Frame::data(Bytes::from_static(event.as_bytes())))).expect("sent");
        }
        let first = guarded.frame().await.expect("a piece").expect("data").into_data().expect("data");
        assert_eq!(first, "data: 1\n\ndata: 2\n\n");
        let later = tokio::spawn(async move {
            let next = guarded.frame().await.expect("a piece").expect("data").into_data().expect("data");
            (next, guarded.frame().await.is_none())
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send(Ok(Frame::data(Bytes::from_static(b"data: 3\n\n")))).expect("sent");
        drop(tx);
        let (next, ended) = tokio::time::timeout(Duration::from_secs(5), later).await.expect("woken").expect("ran");
        assert_eq!(next, "data: 3\n\n");
        assert!(ended);
    }

    /// A stream that stalls with trailers held after its last piece loses them with its body,
    /// releases its ticket, and ends with the write-timeout error.
    #[tokio::test]
    async fn a_stall_takes_what_was_held_too() {
        let watchdog = Watchdog::new(Duration::from_secs(1));
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let script = Script { steps: vec![data("a"), data("b"), Step::Trailers].into(), knows_end: false };
        let mut guarded = watchdog.guard(script.boxed_unsync(), Ticket(released.clone()));
        let piece = guarded.frame().await.expect("a piece").expect("data").into_data().expect("data");
        assert_eq!(piece, "ab");
        assert!(!guarded.is_end_stream(), "trailers are still to come");
        assert_eq!(watchdog.sweep(Instant::now() + Duration::from_secs(5)), 1);
        assert!(released.load(std::sync::atomic::Ordering::SeqCst));
        assert!(matches!(guarded.frame().await, Some(Err(_))));
    }
}
