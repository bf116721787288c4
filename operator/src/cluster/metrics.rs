//! Operator metrics and the admin endpoint that serves them.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;

use crate::error::Category;

#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounterVec,
    pub errors: IntCounterVec,
    pub snapshot_generation: IntGauge,
    pub snapshot_writes: IntCounter,
    pub leader: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("portcullis_operator_reconciles_total", "Reconciles run, by kind"),
            &["kind"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "portcullis_operator_reconcile_errors_total",
                "Reconcile errors, by kind and stable error category",
            ),
            &["kind", "category"],
        )?;
        let snapshot_generation = IntGauge::new(
            "portcullis_operator_snapshot_generation",
            "Generation of the snapshot last written (or found) in the snapshot Secret",
        )?;
        let snapshot_writes = IntCounter::new(
            "portcullis_operator_snapshot_writes_total",
            "Snapshot Secret writes (only when the content digest changed)",
        )?;
        let leader = IntGauge::new("portcullis_operator_leader", "1 while this replica holds the leader Lease")?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(snapshot_generation.clone()))?;
        registry.register(Box::new(snapshot_writes.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Self { registry, reconciles, errors, snapshot_generation, snapshot_writes, leader })
    }

    pub fn error(&self, kind: &str, category: Category) {
        self.errors.with_label_values(&[kind, category.as_str()]).inc();
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        // Encoding into a Vec only fails on inconsistent metric families, which we never build.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// For metrics a module owns (e.g. `acknowledgement`).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Serves `/metrics` and `/healthz` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "admin endpoint listening");
    loop {
        let (stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (200, metrics.render()),
                        "/healthz" | "/readyz" => (200, b"ok\n".to_vec()),
                        _ => (404, b"not found\n".to_vec()),
                    };
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
