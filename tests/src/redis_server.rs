//! A real `redis-server` on a free loopback port, one per test, that tests can stop and start
//! again on the same port (to exercise the limiter's failure policies).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `redis-server` from `PORTCULLIS_REDIS_SERVER` or the PATH. `scripts/test.sh` installs it.
pub fn redis_server_bin() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("PORTCULLIS_REDIS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/bin", "/usr/local/bin"]) {
        let candidate = PathBuf::from(dir).join("redis-server");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("redis-server not found: run scripts/test.sh (it installs it with apt-get) or set PORTCULLIS_REDIS_SERVER")
}

#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("portcullis-redis-").tempdir()?;
        let mut server = Self { port: 0, dir, child: None };
        let mut last = None;
        // A free port can be taken between choosing it and binding it: try a few.
        for _ in 0..4 {
            server.port = crate::free_port()?;
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(e) => {
                    server.kill();
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let child = Command::new(redis_server_bin()?)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping().await {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("redis-server exited early: {status}");
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("redis-server did not answer PING on port {}", self.port)
    }

    async fn ping(&self) -> bool {
        let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(("127.0.0.1", self.port)))
                .await
        else {
            return false;
        };
        if stream.write_all(b"PING\r\n").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        matches!(tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut buf)).await, Ok(Ok(_)))
            && &buf == b"+PONG\r\n"
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (as a crash would); the port stays reserved for `start_again`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server without ending it (`SIGSTOP`): it keeps its data and its connections
    /// but answers nothing, as a Redis cut off by the network, until [`Self::resume`].
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.child.as_ref().context("redis-server is not running")?.id();
        let status = Command::new("kill").args([signal, &pid.to_string()]).status().context("running kill")?;
        anyhow::ensure!(status.success(), "kill {signal} {pid}: {status}");
        Ok(())
    }

    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.launch().await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
