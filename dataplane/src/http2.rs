//! HTTP/2 client connections, served by hyper: the pipeline behind each stream, and the
//! connection's life around them. hyper closes an HTTP/2 connection only when the client does,
//! or when told to; this module tells it (with a GOAWAY, letting open streams finish) when the
//! server drains, when the connection has had no open stream for the idle timeout (the HTTP/1.1
//! keep-alive limit, `--header-read-timeout`), and when the listener asks idle connections to
//! make room at the connection limit (see [`Reclaim`]). Without the last two, a connection that
//! opens no stream would hold its slot for as long as it answers pings.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

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
    let streams = Arc::new(OpenStreams(watch::Sender::new(0)));
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
            () = idle_out(&streams, &mut reclaim, settings.header_read_timeout) => {}
        }
    };
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        () = told => {
            connection.as_mut().graceful_shutdown();
            // hyper closes once its streams are done, but it waits for ever for a client that
            // never sent its preface (the GOAWAY waits for it), or for window to send a
            // stream's last bytes. Once no stream has been open for the idle timeout, the
            // connection is dropped instead.
            let mut no_reclaim = None;
            tokio::select! {
                ended = connection.as_mut() => ended,
                () = idle_out(&streams, &mut no_reclaim, settings.header_read_timeout) => {
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

/// Ready when the connection should go away: it has had no open stream for `idle_timeout`, or
/// the listener asked for a slot (and one of its closes was left) while it had had none for
/// [`Reclaim::MIN_IDLE`]. The listener asks again while it waits, so a connection busy or young
/// at one ask can go at the next.
async fn idle_out(streams: &OpenStreams, reclaim: &mut Option<Reclaimable>, idle_timeout: Duration) {
    let mut open = streams.0.subscribe();
    loop {
        // The sender lives in `streams`, as long as this future: never an error.
        let _ = open.wait_for(|open| *open == 0).await;
        let idle_since = tokio::time::Instant::now();
        loop {
            if reclaim.as_mut().is_some_and(|r| r.asked(idle_since)) {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(idle_since + idle_timeout) => return,
                _ = open.wait_for(|open| *open > 0) => break,
                // Looked at by the next turn, if the connection is still idle then.
                () = std::future::poll_fn(|cx| reclaim.as_mut().map_or(Poll::Pending, |r| r.poll_ask(cx))) => {}
            }
        }
    }
}

/// How many streams of one connection are open.
#[derive(Debug)]
struct OpenStreams(watch::Sender<usize>);

impl OpenStreams {
    fn open(self: &Arc<Self>) -> OpenStream {
        self.0.send_modify(|open| *open += 1);
        OpenStream(self.clone())
    }
}

/// One open stream, counted until dropped.
#[derive(Debug)]
struct OpenStream(Arc<OpenStreams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0 .0.send_modify(|open| *open = open.saturating_sub(1));
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
        let streams = Arc::new(OpenStreams(watch::Sender::new(0)));
        let timeout = Duration::from_secs(10);
        let started = tokio::time::Instant::now();
        let stream = streams.open();
        let mut none = None;
        let idling = idle_out(&streams, &mut none, timeout);
        tokio::pin!(idling);
        // Open for 30 s: not idle meanwhile.
        still_waiting(&mut idling, 30, "idled out with a stream open").await;
        // Closed: idle 10 s later, counted from then.
        drop(stream);
        idling.await;
        assert_eq!(started.elapsed(), Duration::from_secs(40));

        // A stream opened during the idle wait starts the count again when it ends.
        let started = tokio::time::Instant::now();
        let mut none = None;
        let idling = idle_out(&streams, &mut none, timeout);
        tokio::pin!(idling);
        still_waiting(&mut idling, 5, "idled out early").await;
        let stream = streams.open();
        still_waiting(&mut idling, 5, "idled out with a stream open").await;
        drop(stream);
        idling.await;
        assert_eq!(started.elapsed(), Duration::from_secs(20));
    }
}
