//! Admin listener: `/metrics` (Prometheus), `/healthz` (the process is up), `/readyz` (a snapshot
//! is loaded and the gateway is not draining).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::body::{full, GatewayBody};
use crate::metrics::Metrics;
use crate::snapshot::SnapshotHandle;

#[derive(Debug)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub snapshot: Arc<SnapshotHandle>,
    pub limiter: Arc<crate::limits::Limiter>,
    /// Read at each scrape for `portcullis_request_body_bytes_held`.
    pub body_budget: Arc<crate::pipeline::body_budget::BodyBudget>,
    pub draining: AtomicBool,
}

fn text(status: StatusCode, body: &'static str) -> Response<GatewayBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
}

/// Most keys listed on one `/limits` page.
const LIMITS_PAGE: usize = 500;

/// `/limits[?key=namespace/name][&offset=N]`: current window counts and budget use per key that
/// has limits, from the shared store when it is reachable (its counts include the slices replicas
/// hold unspent: at most 0.5% of a limit each, given back within a granule).
async fn limits(state: &AdminState, query: Option<&str>) -> Response<GatewayBody> {
    let Some(snapshot) = state.snapshot.load() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "no snapshot loaded yet\n");
    };
    let mut wanted_key = None;
    let mut offset = 0usize;
    for pair in query.unwrap_or_default().split('&') {
        match pair.split_once('=') {
            Some(("key", v)) => wanted_key = Some(v.replace("%2F", "/").replace("%2f", "/")),
            Some(("offset", v)) => offset = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    let mut keys: Vec<_> = snapshot
        .policies
        .iter()
        .filter(|p| wanted_key.as_deref().is_none_or(|k| p.key.to_string() == k))
        .filter(|p| p.limits != Default::default())
        .collect();
    keys.sort_by(|a, b| a.key.cmp(&b.key));
    let total = keys.len();
    let mut entries = Vec::new();
    for policy in keys.into_iter().skip(offset).take(LIMITS_PAGE) {
        let (requests, tokens, day, month, source) = state.limiter.usage(&policy.key.to_string()).await;
        let l = &policy.limits;
        entries.push(serde_json::json!({
            "key": policy.key.to_string(),
            "source": source,
            "requestsPerMinute": {"used": requests, "limit": l.requests_per_minute},
            "tokensPerMinute": {"used": tokens, "limit": l.tokens_per_minute},
            "tokensPerDay": {"used": day, "limit": l.tokens_per_day},
            "tokensPerMonth": {"used": month, "limit": l.tokens_per_month},
        }));
    }
    let mode = state.limiter.mode_name(state.limiter.settings().default_policy);
    crate::body::json_response(
        StatusCode::OK,
        &serde_json::json!({"mode": mode, "total": total, "offset": offset, "keys": entries}),
    )
}

pub async fn respond<B>(state: &AdminState, request: &Request<B>) -> Response<GatewayBody> {
    if request.method() == Method::GET && request.uri().path() == "/limits" {
        return limits(state, request.uri().query()).await;
    }
    respond_sync(state, request)
}

fn respond_sync<B>(state: &AdminState, request: &Request<B>) -> Response<GatewayBody> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match request.uri().path() {
        "/metrics" => {
            state.metrics.body_bytes_held.set(i64::try_from(state.body_budget.held()).unwrap_or(i64::MAX));
            let mut response = Response::new(full(state.metrics.render()));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.draining.load(Ordering::Relaxed) => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/readyz" if state.snapshot.is_loaded() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "no snapshot loaded yet\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Most admin connections served at once (probes and scrapers need a handful). Beyond it new
/// ones wait in the listen backlog, so a flood of connections to the admin port cannot take the
/// descriptors the traffic listener needs (they are within its reserve, `server::connection_limit`).
pub const MAX_CONNECTIONS: usize = 64;

/// An admin connection's longest life: then it is closed after the answer in progress, given
/// `header_read_timeout` more to finish it. hyper has no write timeout, so without this a client
/// that asks for `/metrics` and never reads the answer would hold its slot for ever. Scrapers and
/// probes reconnect.
pub const CONNECTION_AGE: Duration = Duration::from_secs(60);

/// Serves until the process exits: health and metrics stay visible while the gateway drains.
/// HTTP/1.1 only (probes and scrapers speak it), so every connection is read by a parser with
/// `header_read_timeout` (`--header-read-timeout`, as on the traffic port) from the moment it
/// is read: one that sends no complete request head for that long is closed, silent ones and idle
/// keep-alive ones included. A connection lives at most [`CONNECTION_AGE`].
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, header_read_timeout: Duration) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
    let mut listener = crate::server::BoundedListener::new(listener, MAX_CONNECTIONS, "admin", None);
    while let Some((slot, stream, _)) = listener.accept().await {
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &request).await) }
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = tokio::time::sleep(CONNECTION_AGE) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(header_read_timeout, connection.as_mut()).await;
                }
            }
        });
    }
}
