//! Client-facing listener: TCP or TLS, HTTP/1.1 and HTTP/2, one drain handle for every
//! connection. On shutdown the listener closes at once, in-flight requests and streams run on
//! until they end or the drain deadline passes, then the process exits.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::busy_poll::BusyPoll;
use crate::metrics::Metrics;
use crate::pipeline::Gateway;

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub header_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub drain_timeout: Duration,
    /// Told of every request when busy polling is on.
    pub busy_poll: Option<Arc<BusyPoll>>,
}

fn connection_builder(settings: &ServerSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(settings.header_read_timeout).keep_alive(true);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Duration::from_secs(30)).max_concurrent_streams(512);
    builder
}

/// Accepts until `shutdown` fires, then drains.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
    settings: ServerSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let builder = connection_builder(&settings);
    let graceful = GracefulShutdown::new();
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
        let builder = builder.clone();
        let gateway = gateway.clone();
        let metrics = metrics.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let busy_poll = settings.busy_poll.clone();
        let handshake_timeout = settings.tls_handshake_timeout;
        tokio::spawn(async move {
            metrics.open_connections.inc();
            match tls {
                None => serve_connection(&builder, stream, peer, gateway, watcher, busy_poll).await,
                Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => {
                        serve_connection(&builder, tls_stream, peer, gateway, watcher, busy_poll).await
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                },
            }
            metrics.open_connections.dec();
        });
    }
    drop(listener);
    tracing::info!(deadline_secs = settings.drain_timeout.as_secs_f64(), "draining connections");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(settings.drain_timeout) => tracing::warn!("drain deadline passed; closing remaining connections"),
    }
}

async fn serve_connection<IO>(
    builder: &auto::Builder<TokioExecutor>,
    io: IO,
    peer: std::net::SocketAddr,
    gateway: Arc<Gateway>,
    watcher: hyper_util::server::graceful::Watcher,
    busy_poll: Option<Arc<BusyPoll>>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        if let Some(busy) = &busy_poll {
            busy.touch();
        }
        let gateway = gateway.clone();
        async move { Ok::<_, Infallible>(gateway.handle(request, Some(peer)).await) }
    });
    let connection = builder.serve_connection(TokioIo::new(io), service).into_owned();
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
