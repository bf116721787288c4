//! Admin listener: `/metrics` (Prometheus), `/healthz` (the process is up), `/readyz` (a snapshot
//! is loaded and the gateway is not draining).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::body::{full, GatewayBody};
use crate::metrics::Metrics;
use crate::snapshot::SnapshotHandle;

#[derive(Debug)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub snapshot: Arc<SnapshotHandle>,
    pub draining: AtomicBool,
}

fn text(status: StatusCode, body: &'static str) -> Response<GatewayBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
}

pub fn respond<B>(state: &AdminState, request: &Request<B>) -> Response<GatewayBody> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match request.uri().path() {
        "/metrics" => {
            let mut response = Response::new(full(state.metrics.render()));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.draining.load(Ordering::Relaxed) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        "/readyz" if state.snapshot.is_loaded() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "no snapshot loaded yet\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Serves until the process exits: health and metrics stay visible while the gateway drains.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &request)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
