//! Client-facing listener: TCP or TLS; HTTP/1.1 on our own server (`http1`), HTTP/2 (ALPN `h2`,
//! or prior knowledge on plain TCP) on hyper. On shutdown the listener closes at once, in-flight
//! requests and streams run on until they end or the drain deadline passes, then the process
//! exits.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::busy_poll::BusyPoll;
use crate::http1;
use crate::metrics::Metrics;
use crate::pipeline::Gateway;
use crate::stall::Watchdog;

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub header_read_timeout: Duration,
    pub response_write_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub drain_timeout: Duration,
    /// Told of every request when busy polling is on.
    pub busy_poll: Option<Arc<BusyPoll>>,
}

fn http2_builder() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new()).keep_alive_interval(Duration::from_secs(30)).max_concurrent_streams(512);
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
    let http1 = Arc::new(http1::Settings {
        header_read_timeout: settings.header_read_timeout,
        response_write_timeout: settings.response_write_timeout,
    });
    let http2 = http2_builder();
    let graceful = GracefulShutdown::new();
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            peer,
            gateway: gateway.clone(),
            http1: http1.clone(),
            http2: http2.clone(),
            watcher: graceful.watcher(),
            shutdown: shutdown.clone(),
            busy_poll: settings.busy_poll.clone(),
        };
        let metrics = metrics.clone();
        let tls = tls.clone();
        let handshake_timeout = settings.tls_handshake_timeout;
        connections.spawn(async move {
            metrics.open_connections.inc();
            match tls {
                None => connection.serve(stream, true).await,
                Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") => {
                        connection.serve_http2(tls_stream).await
                    }
                    Ok(Ok(tls_stream)) => connection.serve(tls_stream, false).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                },
            }
            metrics.open_connections.dec();
        });
    }
    drop(listener);
    connections.close();
    tracing::info!(deadline_secs = settings.drain_timeout.as_secs_f64(), "draining connections");
    tokio::select! {
        _ = async { tokio::join!(graceful.shutdown(), connections.wait()) } => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(settings.drain_timeout) => tracing::warn!("drain deadline passed; closing remaining connections"),
    }
}

/// One accepted connection and what serving it needs.
struct Connection {
    peer: std::net::SocketAddr,
    gateway: Arc<Gateway>,
    http1: Arc<http1::Settings>,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    watcher: Watcher,
    shutdown: watch::Receiver<bool>,
    busy_poll: Option<Arc<BusyPoll>>,
}

impl Connection {
    /// HTTP/1.1 on our own server; HTTP/2 prior knowledge (plain TCP only) on hyper.
    async fn serve<IO>(self, io: IO, detect_h2: bool)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let ended = http1::serve(
            io,
            self.peer,
            &self.gateway,
            &self.http1,
            self.shutdown.clone(),
            self.busy_poll.as_deref(),
            detect_h2,
        )
        .await;
        if let http1::Ended::Http2(io) = ended {
            self.serve_http2(io).await;
        }
    }

    async fn serve_http2<IO>(self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection { peer, gateway, busy_poll, http2, watcher, http1, .. } = self;
        // hyper polls a body only while its stream has window: the watchdog is the write
        // timeout for a client that stops taking one (see `stall`).
        let watchdog = Watchdog::new(http1.response_write_timeout);
        let _sweeper = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(watchdog.clone().run()));
        let service = service_fn(move |request| {
            if let Some(busy) = &busy_poll {
                busy.touch();
            }
            let gateway = gateway.clone();
            let watchdog = watchdog.clone();
            async move {
                let response = gateway.handle(request.into(), Some(peer)).await.into_response();
                Ok::<_, Infallible>(response.map(|body| watchdog.guard(body)))
            }
        });
        let connection = http2.serve_connection(TokioIo::new(io), service);
        if let Err(e) = watcher.watch(connection).await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}
