//! A `portcullis-dataplane` process for one test: manifests in a temp dir, chosen flags,
//! captured output, readiness, hot-reload helpers, SIGTERM and exit status.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tempfile::TempDir;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::client::TestClient;
use crate::manifests::Manifests;
use crate::metrics::Metrics;

/// How long a gateway may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a manifest change may take to show up as a new snapshot generation.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Path of the data plane binary: `$PORTCULLIS_DATAPLANE_BIN`, else
/// `$CARGO_TARGET_DIR` or `<workspace>/target`, then `debug` (or `release`) `/portcullis-dataplane`.
pub fn dataplane_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("PORTCULLIS_DATAPLANE_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("PORTCULLIS_DATAPLANE_BIN={} does not exist", p.display());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { crate::workspace_root().join(p) })
        .unwrap_or_else(|| crate::workspace_root().join("target"));
    let profiles: [&str; 2] = if cfg!(debug_assertions) { ["debug", "release"] } else { ["release", "debug"] };
    for profile in profiles {
        let candidate = target.join(profile).join("portcullis-dataplane");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "portcullis-dataplane binary not found under {}; run `cargo build -p portcullis-dataplane` \
         or set PORTCULLIS_DATAPLANE_BIN",
        target.display()
    )
}

/// Flags for one gateway process.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// `(cert, key)` PEM paths: serve HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub upstream_ca: Option<PathBuf>,
    pub log_level: String,
    pub log_format: Option<String>,
    pub drain_timeout_secs: Option<u64>,
    pub max_request_body_bytes: Option<u64>,
    pub extra_args: Vec<String>,
    /// Wait for `/readyz` = 200 before returning from `start`.
    pub wait_ready: bool,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            tls: None,
            upstream_ca: None,
            log_level: "info".to_string(),
            log_format: None,
            drain_timeout_secs: None,
            max_request_body_bytes: None,
            extra_args: Vec::new(),
            wait_ready: true,
        }
    }
}

impl GatewayOptions {
    /// The defaults, with these command-line flags added.
    pub fn with_args(args: &[&str]) -> Self {
        Self { extra_args: args.iter().map(|arg| (*arg).to_owned()).collect(), ..Self::default() }
    }
}

/// A running data plane. Killed when dropped; its output is printed if the test is panicking.
#[derive(Debug)]
pub struct Gateway {
    child: Option<Child>,
    pid: u32,
    _dir: Option<TempDir>,
    manifests_dir: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
    tls: bool,
    logs: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    admin_client: TestClient,
    exit: Option<ExitStatus>,
}

impl Gateway {
    /// Writes `manifests` into a fresh temp dir and starts a gateway on it.
    pub async fn start(manifests: &Manifests, options: GatewayOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("portcullis-manifests-").tempdir()?;
        manifests.write_to(dir.path())?;
        let path = dir.path().to_path_buf();
        Self::spawn(path, Some(dir), options).await
    }

    /// Starts a gateway reading an existing manifest directory (e.g. `examples/quickstart`).
    pub async fn start_in_dir(dir: &Path, options: GatewayOptions) -> anyhow::Result<Self> {
        Self::spawn(dir.to_path_buf(), None, options).await
    }

    async fn spawn(manifests_dir: PathBuf, dir: Option<TempDir>, options: GatewayOptions) -> anyhow::Result<Self> {
        let bin = dataplane_bin()?;
        let mut dir = dir;
        let mut last_err = None;
        for _attempt in 0..4 {
            let listen = crate::free_addr()?;
            let admin = crate::free_addr()?;
            let mut cmd = Command::new(&bin);
            cmd.arg("--manifests")
                .arg(&manifests_dir)
                .arg("--listen")
                .arg(listen.to_string())
                .arg("--admin-listen")
                .arg(admin.to_string())
                .arg("--log-level")
                .arg(&options.log_level);
            if let Some(format) = &options.log_format {
                cmd.arg("--log-format").arg(format);
            }
            if let Some((cert, key)) = &options.tls {
                cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
            }
            if let Some(ca) = &options.upstream_ca {
                cmd.arg("--upstream-ca").arg(ca);
            }
            if let Some(secs) = options.drain_timeout_secs {
                cmd.arg("--drain-timeout").arg(secs.to_string());
            }
            if let Some(n) = options.max_request_body_bytes {
                cmd.arg("--max-request-body-bytes").arg(n.to_string());
            }
            cmd.args(&options.extra_args)
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            let mut child = cmd.spawn().with_context(|| format!("spawning {}", bin.display()))?;
            let pid = child.id().context("child has no pid")?;
            let logs = Arc::new(Mutex::new(Vec::new()));
            let mut readers = Vec::new();
            if let Some(out) = child.stdout.take() {
                readers.push(tokio::spawn(pump(out, logs.clone())));
            }
            if let Some(err) = child.stderr.take() {
                readers.push(tokio::spawn(pump(err, logs.clone())));
            }
            let mut gw = Self {
                child: Some(child),
                pid,
                _dir: dir.take(),
                manifests_dir: manifests_dir.clone(),
                listen,
                admin,
                tls: options.tls.is_some(),
                logs,
                readers,
                admin_client: TestClient::plain(),
                exit: None,
            };
            if !options.wait_ready {
                return Ok(gw);
            }
            match gw.wait_ready(READY_TIMEOUT).await {
                Ok(()) => return Ok(gw),
                Err(e) => {
                    let logs = gw.logs();
                    let exited = gw.try_exit_status().is_some();
                    let bind_problem = logs.to_ascii_lowercase().contains("address already in use")
                        || logs.to_ascii_lowercase().contains("addrinuse");
                    dir = gw._dir.take();
                    drop(gw);
                    if exited && bind_problem {
                        last_err = Some(e);
                        continue;
                    }
                    return Err(e.context(format!("gateway output:\n{logs}")));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("gateway did not start")))
    }

    /// Polls `/readyz` until 200; fails early if the process exits.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                bail!("gateway exited before becoming ready: {status}");
            }
            if let Ok(resp) = self.admin_client.get(&self.admin_url("/readyz"), &[]).await {
                if resp.status == 200 && tokio::net::TcpStream::connect(self.listen).await.is_ok() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("gateway not ready within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn manifests_dir(&self) -> &Path {
        &self.manifests_dir
    }

    /// `http(s)://127.0.0.1:PORT`; for TLS gateways `https://localhost:PORT` (the cert's DNS name).
    pub fn base_url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.listen.port())
        } else {
            format!("http://{}", self.listen)
        }
    }

    /// `base_url` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Everything the process wrote to stdout and stderr so far, ANSI colour codes removed.
    pub fn logs(&self) -> String {
        strip_ansi(&self.raw_logs())
    }

    /// Everything the process wrote to stdout and stderr so far, byte for byte.
    pub fn raw_logs(&self) -> String {
        let buf = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// The raw `/metrics` text.
    pub async fn metrics_text(&self) -> anyhow::Result<String> {
        let resp = self.admin_client.get(&self.admin_url("/metrics"), &[]).await?;
        if resp.status != 200 {
            bail!("/metrics returned {}", resp.status);
        }
        Ok(resp.text())
    }

    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        Ok(Metrics::parse(&self.metrics_text().await?))
    }

    /// `portcullis_snapshot_generation`.
    pub async fn generation(&self) -> anyhow::Result<f64> {
        self.metrics()
            .await?
            .get("portcullis_snapshot_generation", &[])
            .context("metric portcullis_snapshot_generation missing")
    }

    /// Rewrites the manifest directory without waiting.
    pub fn write_manifests(&self, manifests: &Manifests) -> anyhow::Result<()> {
        manifests.write_to(&self.manifests_dir)
    }

    /// Rewrites the manifests and waits until the snapshot generation moves past the current one.
    pub async fn reload(&self, manifests: &Manifests) -> anyhow::Result<Duration> {
        let before = self.generation().await?;
        let started = tokio::time::Instant::now();
        self.write_manifests(manifests)?;
        self.wait_generation_above(before, RELOAD_TIMEOUT).await?;
        Ok(started.elapsed())
    }

    /// Waits until `portcullis_snapshot_generation` > `generation`.
    pub async fn wait_generation_above(&self, generation: f64, timeout: Duration) -> anyhow::Result<f64> {
        crate::eventually(timeout, "a new snapshot generation", || async {
            self.generation().await.ok().filter(|g| *g > generation)
        })
        .await
        .map_err(|e| e.context(format!("gateway output:\n{}", tail(&self.logs(), 4000))))
    }

    /// Sends SIGTERM (via `kill -TERM`).
    pub fn sigterm(&self) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -TERM {} failed: {status}", self.pid);
        }
        Ok(())
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_some() {
            return self.exit;
        }
        let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if status.is_some() {
            self.exit = status;
        }
        status
    }

    /// Waits for the process to exit, then for its output to be fully captured.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        let child = self.child.as_mut().context("no child process")?;
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .map_err(|_| anyhow::anyhow!("gateway did not exit within {timeout:?}"))??;
        self.exit = Some(status);
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        Ok(status)
    }

    /// SIGTERM, then wait for exit (all output captured afterwards).
    pub async fn shutdown(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if self.exit.is_none() {
            self.sigterm()?;
        }
        self.wait_exit(timeout).await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- portcullis-dataplane output (pid {}) -----\n{}", self.pid, tail(&self.logs(), 20_000));
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// Removes ANSI escape sequences (`ESC [ … final-byte`) such as colour codes.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The last `max` bytes of `s` (on a char boundary).
pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

async fn pump<R: tokio::io::AsyncRead + Unpin>(mut reader: R, sink: Arc<Mutex<Vec<u8>>>) {
    let echo = std::env::var_os("PORTCULLIS_E2E_ECHO_LOGS").is_some();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if echo {
                    eprint!("{}", String::from_utf8_lossy(&buf[..n]));
                }
                sink.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&buf[..n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::strip_ansi;

    #[test]
    fn strips_colour_codes() {
        assert_eq!(strip_ansi("\u{1b}[2mstatus\u{1b}[0m\u{1b}[2m=\u{1b}[0m200"), "status=200");
        assert_eq!(strip_ansi("plain"), "plain");
    }
}
