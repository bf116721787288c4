//! HTTP/2 client connections, served by hyper: the pipeline behind each stream, and the
//! connection's life around them. hyper closes an HTTP/2 connection only when the client does,
//! or when told to; this module tells it (with a GOAWAY, letting open streams finish) when the
//! server drains, when the connection has had no open stream for the idle timeout (the HTTP/1.1
//! keep-alive limit, `--header-read-timeout`), and when the listener asks idle connections to
//! make room at the connection limit (see [`Reclaim`]). Without the last two, a connection that
//! opens no stream would hold its slot for as long as it answers pings.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::http1::{self, Reclaim, Reclaimable};
use crate::pipeline::Gateway;
use crate::stall::Watchdog;

/// Serves HTTP/2 on `io` until the client goes, or the connection is told to and its open
/// streams have ended.
pub async fn serve<IO>(
    io: IO,
    peer: SocketAddr,
    gateway: Arc<Gateway>,
    builder: &hyper::server::conn::http2::Builder<TokioExecutor>,
    settings: &http1::Settings,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let busy_poll = settings.busy_poll.clone();
    // hyper polls a body only while its stream has window: the watchdog is the write timeout
    // for a client that stops taking one (see `stall`).
    let watchdog = Watchdog::new(settings.response_write_timeout);
    let _sweeper = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(watchdog.clone().run()));
    let streams = Arc::new(OpenStreams::new());
    let counted = streams.clone();
    let service = service_fn(move |request| {
        if let Some(busy) = &busy_poll {
            busy.touch();
        }
        let gateway = gateway.clone();
        let watchdog = watchdog.clone();
        // Open from the request head until hyper drops the response body or the watchdog takes
        // it from a stalled stream (or this future goes, if the client resets the stream first).
        let open = counted.open();
        async move {
            let response = gateway.handle(request.into(), Some(peer)).await.into_response();
            Ok::<_, Infallible>(response.map(|body| watchdog.guard(body, open)))
        }
    });
    let mut connection = std::pin::pin!(builder.serve_connection(TokioIo::new(io), service));
    let mut reclaim = settings.reclaim.as_ref().map(Reclaim::follow);
    let told = async {
        tokio::select! {
            // A dropped sender means the server is gone: drain as well.
            _ = shutdown.wait_for(|draining| *draining) => {}
            () = idle_out(&streams, &mut reclaim, settings.header_read_timeout, streams.epoch) => {}
        }
    };
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        () = told => {
            connection.as_mut().graceful_shutdown();
            // hyper closes once its streams are done, but it waits for ever for a client that
            // never sent its preface (the GOAWAY waits for it), or for window to send a
            // stream's last bytes. Once no stream has been open for the idle timeout, counted
            // from now at the earliest (so the GOAWAY goes out first), the connection is
            // dropped instead.
            let mut no_reclaim = None;
            let told_at = Instant::now();
            tokio::select! {
                ended = connection.as_mut() => ended,
                () = idle_out(&streams, &mut no_reclaim, settings.header_read_timeout, told_at) => {
                    tracing::debug!("an HTTP/2 connection told to close did not; dropped");
                    Ok(())
                }
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Ready when the connection should go away: it has had no open stream for `idle_timeout` (and
/// not since before `not_before`), or the listener asked for a slot (and one of its closes was
/// left) while it had had none for [`Reclaim::MIN_IDLE`]. The listener asks again while it
/// waits, so a connection busy or young at one ask can go at the next.
///
/// Streams do not wake it: it looks when its timer fires or an ask comes. While streams are open
/// the timer is a whole timeout away (a second at least), so a busy connection is looked at once
/// per timeout; if its last stream closed by then, it waits out the rest of the timeout from
/// that close. (Woken by each stream's open and close instead, the connection's task, and
/// hyper's connection with it, was polled twice more per request.)
async fn idle_out(
    streams: &OpenStreams,
    reclaim: &mut Option<Reclaimable>,
    idle_timeout: Duration,
    not_before: Instant,
) {
    loop {
        let (idle_since, deadline, idle) = match streams.idle_since() {
            Some(since) => {
                let since = since.max(not_before);
                (since, since + idle_timeout, true)
            }
            // Busy: as if idle from now, too young for an ask (which is seen, and let go).
            None => {
                let now = Instant::now();
                (now, now + idle_timeout.max(Duration::from_secs(1)), false)
            }
        };
        if reclaim.as_mut().is_some_and(|r| r.asked(idle_since)) {
            return;
        }
        if idle && Instant::now() >= deadline {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {}
            // Looked at by the next turn.
            () = std::future::poll_fn(|cx| reclaim.as_mut().map_or(Poll::Pending, |r| r.poll_ask(cx))) => {}
        }
    }
}

/// How many streams of one connection are open, and since when none has been: counters, not a
/// channel, so opening and closing a stream wakes nothing.
#[derive(Debug)]
struct OpenStreams {
    open: AtomicUsize,
    /// Milliseconds from `epoch` to the last close (0 before any stream: idle since `epoch`).
    last_close_ms: AtomicU64,
    epoch: Instant,
}

impl OpenStreams {
    fn new() -> Self {
        Self { open: AtomicUsize::new(0), last_close_ms: AtomicU64::new(0), epoch: Instant::now() }
    }

    fn open(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::AcqRel);
        OpenStream(self.clone())
    }

    /// Since when no stream has been open; `None` while one is.
    fn idle_since(&self) -> Option<Instant> {
        if self.open.load(Ordering::Acquire) != 0 {
            return None;
        }
        Some(self.epoch + Duration::from_millis(self.last_close_ms.load(Ordering::Acquire)))
    }
}

/// One open stream, counted until dropped.
#[derive(Debug)]
struct OpenStream(Arc<OpenStreams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let streams = &self.0;
        // The time first: whoever sees the count reach zero sees this close's time with it.
        let since_epoch = u64::try_from(streams.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        streams.last_close_ms.fetch_max(since_epoch, Ordering::AcqRel);
        streams.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;

    /// Drives `idling` for `seconds` (paused time), failing with `why` if it finishes.
    async fn still_waiting(idling: &mut Pin<&mut impl std::future::Future<Output = ()>>, seconds: u64, why: &str) {
        tokio::select! {
            () = idling.as_mut() => panic!("{why}"),
            () = tokio::time::sleep(Duration::from_secs(seconds)) => {}
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_idles_out_only_with_no_stream_open_for_the_whole_timeout() {
        let streams = Arc::new(OpenStreams::new());
        let timeout = Duration::from_secs(10);
        let started = tokio::time::Instant::now();
        let stream = streams.open();
        let mut none = None;
        let idling = idle_out(&streams, &mut none, timeout, streams.epoch);
        tokio::pin!(idling);
        // Open for 30 s: not idle meanwhile.
        still_waiting(&mut idling, 30, "idled out with a stream open").await;
        // Closed: idle 10 s later, counted from then.
        drop(stream);
        idling.await;
        assert_eq!(started.elapsed(), Duration::from_secs(40));

        // Told to close when it already had no stream for the timeout: the wait for its close
        // is a whole timeout again, from then.
        let told = tokio::time::Instant::now();
        let mut none = None;
        let idling = idle_out(&streams, &mut none, timeout, told);
        tokio::pin!(idling);
        still_waiting(&mut idling, 9, "dropped before its GOAWAY could close it").await;
        idling.await;
        assert_eq!(told.elapsed(), timeout);

        // A stream opened during the idle wait starts the count again when it ends.
        let started = tokio::time::Instant::now();
        let mut none = None;
        let idling = idle_out(&streams, &mut none, timeout, started);
        tokio::pin!(idling);
        still_waiting(&mut idling, 5, "idled out early").await;
        let stream = streams.open();
        still_waiting(&mut idling, 5, "idled out with a stream open").await;
        drop(stream);
        idling.await;
        assert_eq!(started.elapsed(), Duration::from_secs(20));
    }

    /// Streams come and go without waking the connection's task (which polls hyper's
    /// connection whenever it wakes).
    #[tokio::test(start_paused = true)]
    async fn streams_opening_and_closing_wake_nothing() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl futures_util::task::ArcWake for Count {
            fn wake_by_ref(count: &Arc<Self>) {
                count.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = futures_util::task::waker(woken.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let streams = Arc::new(OpenStreams::new());
        let mut none = None;
        let idling = idle_out(&streams, &mut none, Duration::from_secs(10), streams.epoch);
        tokio::pin!(idling);
        assert!(std::future::Future::poll(idling.as_mut(), &mut cx).is_pending());
        let held = streams.open();
        for _ in 0..100 {
            drop(streams.open());
        }
        drop(held);
        assert!(std::future::Future::poll(idling.as_mut(), &mut cx).is_pending());
        assert_eq!(woken.0.load(Ordering::SeqCst), 0);
    }
}
