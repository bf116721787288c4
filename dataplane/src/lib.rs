//! # portcullis-dataplane — the request path
//!
//! ```text
//!  client ──TLS──▶ server ──▶ pipeline::Gateway ──────────────────────────────▶ upstream / mock
//!                              authenticate → kill switch → route → forward
//!                              ◀── meter (usage from JSON / SSE, one log line, metrics) ◀──
//!
//!  cluster::ClusterSource (watches the snapshot Secret) ──┐      acknowledge: applied generation ─▶ own Lease
//!  reload (local manifests) ──compile──▶ SnapshotApplier ──swap──▶ SnapshotHandle (Arc, lock-free)
//!  admin: /metrics /healthz /readyz
//! ```
//!
//! Content passes through and is never logged, labelled or kept: the pipeline reads only the
//! `model`, `stream` and `stream_options` fields of a request, and only the usage counts of a
//! response.

pub mod acknowledge;
pub mod admin;
pub mod api;
pub mod app;
pub mod body;
pub mod busy_poll;
pub mod cluster;
pub mod config;
pub mod error;
pub mod fields;
pub mod http1;
pub mod http2;
pub mod json_scan;
pub mod limits;
pub mod metrics;
pub mod mock;
pub mod pipeline;
pub mod reload;
pub mod server;
pub mod snapshot;
pub mod stall;
pub mod tls;
pub mod upstream;
