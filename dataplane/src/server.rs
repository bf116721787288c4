//! Client-facing listener: TCP or TLS; HTTP/1.1 on our own server (`http1`), HTTP/2 (ALPN `h2`,
//! or prior knowledge on plain TCP) on hyper (`http2`). On shutdown the listener closes at once, in-flight
//! requests and streams run on until they end or the drain deadline passes, then the process
//! exits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::busy_poll::BusyPoll;
use crate::http1::{self, Reclaim};
use crate::http2;
use crate::metrics::Metrics;
use crate::pipeline::Gateway;

/// How often reaching the connection limit is logged while it lasts.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// A listener that serves at most `max` connections at once. It accepts only while a slot is
/// free; each connection holds its slot until it ends. At the limit new connections wait in the
/// kernel's listen backlog (nginx's `worker_connections`), so memory and file descriptors stay
/// bounded under a flood of connections; with a [`Reclaim`], idle connections are asked to
/// close to make room for them.
#[derive(Debug)]
pub struct BoundedListener {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    max: usize,
    /// Named in the logs: which listener reached its limit.
    name: &'static str,
    /// Counts the times the listener waited for a slot.
    waits: Option<IntCounter>,
    /// Asks idle connections to close when no slot is free.
    reclaim: Option<Arc<Reclaim>>,
    warned_full: Option<Instant>,
}

impl BoundedListener {
    pub fn new(listener: TcpListener, max: usize, name: &'static str, waits: Option<IntCounter>) -> Self {
        let slots = Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS)));
        Self { listener, slots, max, name, waits, reclaim: None, warned_full: None }
    }

    /// Asks `reclaim`'s idle connections to close when no slot is free.
    pub fn reclaiming(mut self, reclaim: Arc<Reclaim>) -> Self {
        self.reclaim = Some(reclaim);
        self
    }

    /// The next connection, and the slot it holds until dropped. `None` only if the slots were
    /// closed, which this type never does. Cancel-safe, except that with a [`Reclaim`] a
    /// connection accepted while the listener waits for a slot is dropped with it (at shutdown).
    pub async fn accept(&mut self) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            if let Some(reclaim) = &self.reclaim {
                reclaim.call_off();
            }
            let (stream, peer) = self.next_connection().await;
            return Some((slot, stream, peer));
        }
        self.reached_limit();
        let Some(reclaim) = self.reclaim.clone() else {
            let slot = self.slots.clone().acquire_owned().await.ok()?;
            let (stream, peer) = self.next_connection().await;
            return Some((slot, stream, peer));
        };
        // Idle connections are closed only for a connection that is waiting: take it from the
        // backlog (the descriptor reserve holds this one more), then make room for it.
        let (stream, peer) = self.next_connection().await;
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            // Asked again while no slot comes: connections busy or idle for less than
            // `MIN_IDLE` at one ask may have idled long enough by the next.
            Err(_) => loop {
                reclaim.ask(Reclaim::AT_ONCE);
                tokio::select! {
                    slot = self.slots.clone().acquire_owned() => break slot.ok()?,
                    () = tokio::time::sleep(Reclaim::MIN_IDLE) => {}
                }
            },
        };
        reclaim.call_off();
        Some((slot, stream, peer))
    }

    /// Counts and (at most once a minute) logs that every slot is taken.
    fn reached_limit(&mut self) {
        if let Some(waits) = &self.waits {
            waits.inc();
        }
        if self.warned_full.is_none_or(|at| at.elapsed() >= FULL_WARNING_EVERY) {
            self.warned_full = Some(Instant::now());
            let waiting = if self.reclaim.is_some() {
                "new connections wait in the listen backlog while idle ones are closed to make room"
            } else {
                "new connections wait in the listen backlog"
            };
            tracing::warn!(listener = self.name, max_connections = self.max, "connection limit reached; {waiting}");
        }
    }

    /// The next connection from the backlog, backing off when accepting fails.
    async fn next_connection(&self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => return accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = self.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub header_read_timeout: Duration,
    pub response_write_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub drain_timeout: Duration,
    /// Most client connections served at once (see [`BoundedListener`]); from
    /// [`connection_limit`], so provider connections still find descriptors free.
    pub max_connections: usize,
    /// Told of every request when busy polling is on.
    pub busy_poll: Option<Arc<BusyPoll>>,
}

fn http2_builder() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    // The same head size HTTP/1.1 takes (h2's own default is 16 KiB), so a request does not
    // work over one protocol and fail over the other.
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .max_concurrent_streams(512)
        .max_header_list_size(crate::http1::MAX_HEAD as u32);
    builder
}

/// Accepts until `shutdown` fires, then drains: HTTP/1.1 connections finish the request in
/// flight and close, HTTP/2 connections get a GOAWAY; both within `drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
    settings: ServerSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let reclaim = Reclaim::new(metrics.idle_connections_reclaimed.clone());
    let http1 = Arc::new(http1::Settings {
        header_read_timeout: settings.header_read_timeout,
        response_write_timeout: settings.response_write_timeout,
        busy_poll: settings.busy_poll.clone(),
        reclaim: Some(reclaim.clone()),
    });
    let http2 = http2_builder();
    let connections = TaskTracker::new();
    metrics.max_connections.set(i64::try_from(settings.max_connections).unwrap_or(i64::MAX));
    let mut listener = BoundedListener::new(
        listener,
        settings.max_connections,
        "traffic",
        Some(metrics.connection_limit_waits.clone()),
    )
    .reclaiming(reclaim.clone());
    loop {
        let (slot, stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Some(accepted) => accepted,
                None => break,
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            peer,
            gateway: gateway.clone(),
            http1: http1.clone(),
            http2: http2.clone(),
            shutdown: shutdown.clone(),
        };
        let open = Open::new(slot, metrics.clone());
        // One task body for each: a task is as large as its future's largest state, and a
        // plain connection's then holds no TLS handshake.
        match &tls {
            None => connections.spawn(async move {
                let _open = open;
                connection.serve(stream, true).await;
            }),
            Some(acceptor) => {
                let (acceptor, handshake_timeout) = (acceptor.clone(), settings.tls_handshake_timeout);
                connections.spawn(async move {
                    let _open = open;
                    connection.serve_tls(stream, acceptor, handshake_timeout).await;
                })
            }
        };
    }
    drop(listener);
    connections.close();
    tracing::info!(deadline_secs = settings.drain_timeout.as_secs_f64(), "draining connections");
    tokio::select! {
        () = connections.wait() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(settings.drain_timeout) => tracing::warn!("drain deadline passed; closing remaining connections"),
    }
}

/// A connection's slot and its count in `portcullis_open_connections`, both given back when its
/// task ends or is dropped.
struct Open {
    _slot: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Open {
    fn new(slot: OwnedSemaphorePermit, metrics: Arc<Metrics>) -> Self {
        metrics.open_connections.inc();
        Self { _slot: slot, metrics }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.metrics.open_connections.dec();
    }
}

/// One accepted connection and what serving it needs.
struct Connection {
    peer: std::net::SocketAddr,
    gateway: Arc<Gateway>,
    http1: Arc<http1::Settings>,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    shutdown: watch::Receiver<bool>,
}

impl Connection {
    /// HTTP/1.1 on our own server; HTTP/2 prior knowledge (plain TCP only) on hyper.
    async fn serve<IO>(self, io: IO, detect_h2: bool)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let ended = http1::serve(io, self.peer, &self.gateway, &self.http1, self.shutdown.clone(), detect_h2).await;
        if let http1::Ended::Http2(io) = ended {
            // Boxed: hyper's HTTP/2 connection would otherwise make every HTTP/1.1
            // connection's task as large as its own.
            Box::pin(self.serve_http2(io)).await;
        }
    }

    /// The TLS handshake within `handshake_timeout`, then HTTP/2 when ALPN chose it, else
    /// HTTP/1.1.
    async fn serve_tls(self, stream: TcpStream, acceptor: TlsAcceptor, handshake_timeout: Duration) {
        // Boxed in a statement of its own: a TLS stream (1.2 KB) held by value, or the handshake's
        // result a `match` on it keeps until its end, would stay in this future's state and in
        // each future the stream passes through.
        let tls_stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls_stream)) => Box::new(tls_stream),
            Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
            Err(_) => return tracing::debug!("TLS handshake timed out"),
        };
        if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            Box::pin(self.serve_http2(tls_stream)).await
        } else {
            self.serve(tls_stream, false).await
        }
    }

    async fn serve_http2<IO>(self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        http2::serve(io, self.peer, self.gateway, &self.http2, &self.http1, self.shutdown).await;
    }
}

/// A listening socket on `addr` whose kernel queue holds `backlog` completed handshakes (capped by
/// `net.core.somaxconn`). The standard library's bind asks for 128: at the connection limit,
/// or while the single thread is busy, a burst of new clients beyond that has its handshakes
/// dropped and retried a second later. Must be called within the runtime.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As the standard library's bind does: a restarted gateway rebinds while old connections
    // linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// File descriptors kept free of client connections: listeners, the admin port's connections,
/// Redis, the Kubernetes client, files.
const RESERVED_DESCRIPTORS: u64 = 256;

/// The soft open-file limit set when the hard one is unlimited.
const UNLIMITED_CEILING: u64 = 1 << 20;

/// Client connections served at once when none are asked for.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

/// How many client connections can be served at once: `requested` (or the default), lowered to
/// what the process's open-file limit holds, with a warning when `requested` was lowered.
/// Raises the soft limit to the hard one first (as Go's runtime does): a container's soft limit
/// may be far below what it is allowed. A client connection may need a second descriptor for
/// its provider connection, so the limit holds two per connection beside a reserve; asking for
/// more would end in `accept` failing with `EMFILE` and admitted requests finding no
/// descriptor for their provider.
pub fn connection_limit(requested: Option<usize>) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    let mut open_files = limit.current;
    // `None` is unlimited. An unlimited hard limit raises the soft one to a generous ceiling.
    let raise_to = match (limit.current, limit.maximum) {
        (Some(soft), Some(hard)) if soft < hard => Some(hard),
        (Some(soft), None) if soft < UNLIMITED_CEILING => Some(UNLIMITED_CEILING),
        _ => None,
    };
    if let Some(raised) = raise_to {
        match setrlimit(Resource::Nofile, rustix::process::Rlimit { current: Some(raised), maximum: limit.maximum }) {
            Ok(()) => open_files = Some(raised),
            Err(e) => tracing::debug!(error = %e, "could not raise the open-file limit"),
        }
    }
    let allowed = connections_within(requested.unwrap_or(DEFAULT_MAX_CONNECTIONS), open_files);
    match requested {
        Some(requested) if allowed < requested => tracing::warn!(
            max_connections = requested,
            open_files = open_files.unwrap_or_default(),
            serving = allowed,
            "the open-file limit cannot hold --max-connections (two descriptors each, and a reserve); serving fewer"
        ),
        None if allowed < DEFAULT_MAX_CONNECTIONS => tracing::info!(
            open_files = open_files.unwrap_or_default(),
            serving = allowed,
            "serving as many connections as the open-file limit holds"
        ),
        _ => {}
    }
    allowed
}

/// `requested`, or fewer when `open_files` (`None`: unlimited) cannot hold two descriptors per
/// connection and the reserve; never less than one.
fn connections_within(requested: usize, open_files: Option<u64>) -> usize {
    let Some(open_files) = open_files else { return requested.max(1) };
    let fits = open_files.saturating_sub(RESERVED_DESCRIPTORS) / 2;
    requested.min(usize::try_from(fits).unwrap_or(usize::MAX)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel completes and queues as many handshakes as the backlog asks for (here 1,024,
    /// within this machine's `somaxconn`), none accepted yet; with the standard library's 128,
    /// connections beyond it would have their handshakes dropped and retried a second later.
    #[tokio::test]
    async fn the_listen_backlog_queues_a_burst_of_connections() {
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        if somaxconn < 1024 {
            eprintln!("skipped: net.core.somaxconn is {somaxconn} here, below the 1,024 this test asks for");
            return;
        }
        let listener = bind("127.0.0.1:0".parse().expect("address"), 1024).expect("bind");
        let addr = listener.local_addr().expect("address");
        let connects: Vec<_> = (0..500)
            .map(|_| tokio::spawn(tokio::time::timeout(Duration::from_millis(800), TcpStream::connect(addr))))
            .collect();
        let mut queued = 0;
        for connect in connects {
            if matches!(connect.await, Ok(Ok(Ok(_)))) {
                queued += 1;
            }
        }
        assert_eq!(queued, 500, "every handshake completed without an accept");
        drop(listener);
    }

    #[test]
    fn connections_fit_in_the_open_file_limit_with_two_descriptors_each_and_a_reserve() {
        assert_eq!(connections_within(16_384, None), 16_384, "unlimited");
        assert_eq!(connections_within(16_384, Some(1 << 20)), 16_384, "plenty");
        assert_eq!(connections_within(16_384, Some(1024)), 384, "(1024 - 256) / 2");
        assert_eq!(connections_within(16_384, Some(33_024)), 16_384, "exactly enough");
        assert_eq!(connections_within(16_384, Some(33_023)), 16_383);
        assert_eq!(connections_within(16_384, Some(100)), 1, "never none");
        assert_eq!(connections_within(0, None), 1);
    }
}
