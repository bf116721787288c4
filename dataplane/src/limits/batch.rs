//! Coalescing calls to the shared store: at most one call in flight per lane, and whatever
//! arrives for that lane while it is in flight goes out together as the next call.
//!
//! ```text
//!   request ─┐                    ┌─ lane "key A": [in flight: 1 item]  queue: 31 items ─▶ next call
//!   request ─┼─▶ submit(lane) ────┤
//!   request ─┘                    └─ lane "key B": idle ─▶ a drainer is spawned for it
//! ```
//!
//! Nothing is delayed to wait for company: an idle lane sends at once, so one client alone
//! sees one round trip as before. Under concurrency the queue fills by itself while the
//! previous call is out, and N requests cost one script call instead of N. The store still
//! decides every item on its own, in arrival order, inside one atomic script, so batching does
//! not change what is admitted. The drainer is a task of its own: a request that goes away
//! (client disconnect, timeout) never strands the items queued behind it.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// A batch call: one output per input item, in order, or `None` when the store failed.
pub type BatchFuture<O> = Pin<Box<dyn Future<Output = Option<Vec<O>>> + Send>>;

type Runner<K, I, O> = Box<dyn Fn(K, Vec<I>) -> BatchFuture<O> + Send + Sync>;
type Unclaimed<K, I, O> = Box<dyn Fn(&K, I, O) + Send + Sync>;
type Waiting<I, O> = Vec<(I, oneshot::Sender<Option<O>>)>;

pub struct Batcher<K, I, O> {
    /// A lane present in the map has a drainer running; its vector is what waits for the next call.
    lanes: Mutex<HashMap<K, Waiting<I, O>>>,
    run: Runner<K, I, O>,
    max_batch: usize,
    /// Set for admissions: an item whose submitter stopped waiting is dropped unsent (the
    /// store would count it for nobody), and one whose submitter stopped waiting while its call
    /// was out is handed here with its answer (to be given back). Unset, every item is sent (a
    /// settlement must land whoever waits for it).
    unclaimed: Option<Unclaimed<K, I, O>>,
}

impl<K, I, O> fmt::Debug for Batcher<K, I, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher").field("max_batch", &self.max_batch).finish_non_exhaustive()
    }
}

impl<K, I, O> Batcher<K, I, O>
where
    K: Clone + Eq + Hash + Send + 'static,
    I: Clone + Send + 'static,
    O: Send + 'static,
{
    pub fn new(max_batch: usize, run: impl Fn(K, Vec<I>) -> BatchFuture<O> + Send + Sync + 'static) -> Arc<Self> {
        Self::with(max_batch, run, None)
    }

    /// As [`Self::new`], for admissions: items whose submitter stopped waiting before their
    /// call went out are not sent (the store would count them for nobody), and the answers of
    /// those whose submitter stopped waiting while their call was out go to `unclaimed`.
    pub fn for_admissions(
        max_batch: usize,
        run: impl Fn(K, Vec<I>) -> BatchFuture<O> + Send + Sync + 'static,
        unclaimed: impl Fn(&K, I, O) + Send + Sync + 'static,
    ) -> Arc<Self> {
        Self::with(max_batch, run, Some(Box::new(unclaimed)))
    }

    fn with(
        max_batch: usize,
        run: impl Fn(K, Vec<I>) -> BatchFuture<O> + Send + Sync + 'static,
        unclaimed: Option<Unclaimed<K, I, O>>,
    ) -> Arc<Self> {
        Arc::new(Self { lanes: Mutex::new(HashMap::new()), run: Box::new(run), max_batch: max_batch.max(1), unclaimed })
    }

    /// Queues `item` on `lane` and waits for its answer (`None`: the store failed).
    pub async fn submit(self: &Arc<Self>, lane: K, item: I) -> Option<O> {
        let (tx, rx) = oneshot::channel();
        // For admissions, the item and its lane are kept until the answer is taken: a submitter
        // that goes away just as its answer lands (a timeout that fired, a request cancelled
        // before its next poll) hands that answer to `unclaimed` on drop.
        let claim = self.unclaimed.as_ref().map(|_| (lane.clone(), item.clone()));
        let start = {
            let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            match lanes.get_mut(&lane) {
                Some(waiting) => {
                    waiting.push((item, tx));
                    false
                }
                None => {
                    lanes.insert(lane.clone(), vec![(item, tx)]);
                    true
                }
            }
        };
        if start {
            let this = Arc::clone(self);
            tokio::spawn(async move { this.drain(lane).await });
        }
        let mut pending = Pending { batcher: self, rx, claim };
        let answer = (&mut pending.rx).await.ok().flatten();
        pending.claim = None;
        answer
    }

    async fn drain(&self, lane: K) {
        loop {
            let batch: Waiting<I, O> = {
                let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
                let Some(waiting) = lanes.get_mut(&lane) else { return };
                if waiting.is_empty() {
                    lanes.remove(&lane);
                    return;
                }
                // An admission whose request stopped waiting (it timed out: refused as busy, or
                // handed to the failure policy; or its client left) is not sent: the store would
                // count it.
                if self.unclaimed.is_some() {
                    waiting.retain(|(_, tx)| !tx.is_closed());
                }
                if waiting.is_empty() {
                    lanes.remove(&lane);
                    return;
                }
                let take = waiting.len().min(self.max_batch);
                waiting.drain(..take).collect()
            };
            let (items, senders): (Vec<I>, Vec<_>) = batch.into_iter().unzip();
            let count = items.len();
            // Kept for `unclaimed` (admission items are a few numbers).
            let kept = self.unclaimed.as_ref().map(|_| items.clone());
            match (self.run)(lane.clone(), items).await {
                Some(outputs) if outputs.len() == count => {
                    for (at, (sender, output)) in senders.into_iter().zip(outputs).enumerate() {
                        if let Err(Some(output)) = sender.send(Some(output)) {
                            if let (Some(unclaimed), Some(item)) =
                                (&self.unclaimed, kept.as_ref().and_then(|k| k.get(at)))
                            {
                                unclaimed(&lane, item.clone(), output);
                            }
                        }
                    }
                }
                _ => {
                    for sender in senders {
                        let _ = sender.send(None);
                    }
                }
            }
        }
    }
}

/// A submitter's wait for its answer. Dropped before the answer was taken, it closes the
/// channel and takes an answer already sent to hand it to `unclaimed`: with the drainer's
/// failed send (an answer that comes after the close), every answer nobody takes reaches
/// `unclaimed` exactly once.
struct Pending<'a, K, I, O> {
    batcher: &'a Batcher<K, I, O>,
    rx: oneshot::Receiver<Option<O>>,
    claim: Option<(K, I)>,
}

impl<K, I, O> Drop for Pending<'_, K, I, O> {
    fn drop(&mut self) {
        let (Some((lane, item)), Some(unclaimed)) = (self.claim.take(), &self.batcher.unclaimed) else { return };
        self.rx.close();
        if let Ok(Some(output)) = self.rx.try_recv() {
            unclaimed(&lane, item, output);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A runner that records batch sizes and answers each item with `item * 10`.
    fn recording(sizes: Arc<Mutex<Vec<usize>>>, fail: bool) -> Arc<Batcher<u8, u32, u32>> {
        Batcher::new(8, recorder(sizes, fail))
    }

    fn recorder(sizes: Arc<Mutex<Vec<usize>>>, fail: bool) -> impl Fn(u8, Vec<u32>) -> BatchFuture<u32> {
        move |_lane, items: Vec<u32>| -> BatchFuture<u32> {
            let sizes = sizes.clone();
            Box::pin(async move {
                sizes.lock().expect("sizes").push(items.len());
                tokio::time::sleep(Duration::from_millis(20)).await;
                (!fail).then(|| items.iter().map(|i| i * 10).collect())
            })
        }
    }

    /// An item queued behind a call in flight whose submitter stopped waiting: never sent by an
    /// admissions batcher, still sent by a settlements one.
    #[tokio::test]
    async fn an_abandoned_item_is_dropped_only_where_asked() {
        for drop_abandoned in [true, false] {
            let sizes = Arc::new(Mutex::new(Vec::new()));
            let batcher = if drop_abandoned {
                Batcher::for_admissions(8, recorder(sizes.clone(), false), |_, _, _| {})
            } else {
                Batcher::new(8, recorder(sizes.clone(), false))
            };
            let first = tokio::spawn({
                let b = batcher.clone();
                async move { b.submit(1, 1).await }
            });
            tokio::time::sleep(Duration::from_millis(5)).await;
            // Queued while the first call is out, then given up on (its answer timed out).
            let gave_up = tokio::time::timeout(Duration::from_millis(1), batcher.submit(1, 2)).await;
            assert!(gave_up.is_err());
            assert_eq!(first.await.expect("task"), Some(10));
            tokio::time::sleep(Duration::from_millis(50)).await;
            let sent = if drop_abandoned { vec![1] } else { vec![1, 1] };
            assert_eq!(*sizes.lock().expect("sizes"), sent, "drop_abandoned: {drop_abandoned}");
            assert_eq!(batcher.submit(1, 3).await, Some(30), "the lane still serves");
        }
    }

    type Recorded<T> = Arc<Mutex<Vec<T>>>;
    /// (lane, item, answer) handed to `unclaimed`.
    type UnclaimedSeen = Recorded<(u8, u32, u32)>;

    /// An admissions batcher over [`recorder`], and what it hands to `unclaimed`.
    fn admissions_recording_unclaimed() -> (Arc<Batcher<u8, u32, u32>>, Recorded<usize>, UnclaimedSeen) {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let unclaimed = Arc::new(Mutex::new(Vec::new()));
        let seen = unclaimed.clone();
        let batcher = Batcher::for_admissions(8, recorder(sizes.clone(), false), move |lane: &u8, item, output| {
            seen.lock().expect("unclaimed").push((*lane, item, output));
        });
        (batcher, sizes, unclaimed)
    }

    /// An admission given up on while its call was out: its answer is handed back with its
    /// item (the store counted it; nobody will use it), and only those.
    #[tokio::test]
    async fn an_answer_nobody_waits_for_any_more_goes_to_unclaimed() {
        let (batcher, sizes, unclaimed) = admissions_recording_unclaimed();
        // Given up on 5 ms into its 20 ms call.
        let gave_up = tokio::time::timeout(Duration::from_millis(5), batcher.submit(7, 4)).await;
        assert!(gave_up.is_err());
        assert_eq!(batcher.submit(7, 5).await, Some(50), "answered to whoever still waits");
        assert_eq!(*unclaimed.lock().expect("unclaimed"), vec![(7, 4, 40)]);
        assert_eq!(*sizes.lock().expect("sizes"), vec![1, 1]);
    }

    /// The answer has landed but its submitter is dropped before it looks (a timeout that fired
    /// at the same moment, a request cancelled between polls): it goes to `unclaimed` too.
    #[tokio::test]
    async fn an_answer_that_landed_but_was_never_taken_goes_to_unclaimed() {
        let (batcher, _sizes, unclaimed) = admissions_recording_unclaimed();
        let mut waiting = Box::pin(batcher.submit(9, 6));
        // Polled once (queued, call out), then left alone while the 20 ms call answers it.
        std::future::poll_fn(|cx| {
            assert!(waiting.as_mut().poll(cx).is_pending());
            std::task::Poll::Ready(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(unclaimed.lock().expect("unclaimed").is_empty(), "the send succeeded: nothing unclaimed yet");
        drop(waiting);
        assert_eq!(*unclaimed.lock().expect("unclaimed"), vec![(9, 6, 60)]);
        // An answer that was taken is not handed on.
        assert_eq!(batcher.submit(9, 7).await, Some(70));
        assert_eq!(unclaimed.lock().expect("unclaimed").len(), 1);
    }

    #[tokio::test]
    async fn an_idle_lane_sends_at_once_and_concurrent_items_share_calls() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let batcher = recording(sizes.clone(), false);
        assert_eq!(batcher.submit(1, 7).await, Some(70));
        assert_eq!(*sizes.lock().expect("sizes"), vec![1]);

        let mut tasks = Vec::new();
        for i in 0..20u32 {
            let b = batcher.clone();
            tasks.push(tokio::spawn(async move { (i, b.submit(1, i).await) }));
        }
        for task in tasks {
            let (i, out) = task.await.expect("task");
            assert_eq!(out, Some(i * 10), "each item gets its own answer");
        }
        let sizes = sizes.lock().expect("sizes").clone();
        assert_eq!(sizes.iter().sum::<usize>(), 21);
        assert!(sizes.len() <= 5, "20 concurrent items took {} calls: {sizes:?}", sizes.len());
        assert!(sizes.iter().all(|&s| s <= 8), "batches are capped: {sizes:?}");
        assert!(batcher.lanes.lock().expect("lanes").is_empty(), "an idle lane is removed");
    }

    #[tokio::test]
    async fn lanes_are_independent_and_failures_reach_every_item() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let batcher = Batcher::new(8, move |lane: u8, items: Vec<u32>| -> BatchFuture<u32> {
            counted.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { (lane != 2).then(|| items.iter().map(|i| i + u32::from(lane)).collect()) })
        });
        let (a, b) = tokio::join!(batcher.submit(1, 5), batcher.submit(2, 5));
        assert_eq!((a, b), (Some(6), None));
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let failing = recording(Arc::new(Mutex::new(Vec::new())), true);
        let (x, y) = tokio::join!(failing.submit(0, 1), failing.submit(0, 2));
        assert_eq!((x, y), (None, None));
    }

    #[tokio::test]
    async fn an_abandoned_submitter_does_not_strand_the_queue() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let batcher = recording(sizes, false);
        let first = batcher.clone();
        let abandoned = tokio::spawn(async move { first.submit(3, 1).await });
        tokio::task::yield_now().await;
        abandoned.abort();
        assert_eq!(batcher.submit(3, 2).await, Some(20));
    }

    #[tokio::test]
    async fn a_runner_answering_the_wrong_count_fails_the_batch() {
        let batcher = Batcher::new(8, |_lane: u8, _items: Vec<u32>| -> BatchFuture<u32> {
            Box::pin(async { Some(vec![1, 2, 3]) })
        });
        assert_eq!(batcher.submit(0, 1).await, None);
    }
}
