//! Opens many client connections and holds them, for memory-per-connection figures.
//!
//! `bench-conns ADDR N MODE KEY HOLD_SECS`
//! - MODE `idle`: each connection sends one plain chat completion, reads the whole response,
//!   and then stays open and idle (keep-alive).
//! - MODE `stream`: each connection sends one streaming request with `x-bench-hold: 1`; the
//!   upstream sends one event and keeps the stream open; the connection reads that event and
//!   holds.
//! - MODE `open`: each connection is opened and sends nothing (a client pool's spare
//!   connection before its first request).
//! - MODE `h2-idle`, `h2-stream`: as `idle` and `stream`, over HTTP/2 with prior knowledge
//!   (h2c), one stream per connection.
//! - MODE `h2-streams`: N held streams as in `h2-stream`, [`STREAMS_PER_CONNECTION`] to a
//!   connection (the memory of a stream on a shared connection).
//!
//! Prints `READY <ok> <failed>` once every connection (in `h2-streams`, every stream) is in
//! place, holds for HOLD_SECS, exits.
//!
//! With a sixth argument, `CA_PEM`, every connection is TLS (ALPN `http/1.1`, server name
//! `localhost`), trusting that CA alone; in `open` mode the handshake is done before it holds.
//! The HTTP/2 modes are clear text only.
//!
//! `bench-conns cert DIR` writes a CA (`ca.pem`) and a server certificate for `localhost` and
//! `127.0.0.1` signed by it (`server.pem`, `server-key.pem`) into DIR, for the gateway's
//! `--tls-cert` / `--tls-key`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const PLAIN: &str = r#"{"model":"bench-model","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str = r#"{"model":"bench-model","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#;

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Whether `buf` holds a complete response (idle) or the first SSE event (stream).
fn done(buf: &[u8], stream: bool) -> bool {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let body = &buf[head_end + 4..];
    if stream {
        return find(body, b"\n\n").is_some();
    }
    if let Some(cl) =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok())
    {
        return body.len() >= cl;
    }
    find(body, b"0\r\n\r\n").is_some()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Idle,
    Stream,
    Open,
    H2Idle,
    H2Stream,
    H2Streams,
}

/// Streams to a connection in `h2-streams` (the gateway allows 512).
const STREAMS_PER_CONNECTION: usize = 100;

/// What a task holds open until the hold ends.
type Held = Box<dyn std::any::Any + Send>;

/// A held connection: plain TCP, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn one(addr: String, mode: Mode, key: String, tls: Option<TlsConnector>) -> anyhow::Result<Held> {
    let tcp = TcpStream::connect(&addr).await?;
    tcp.set_nodelay(true)?;
    let mut socket: Box<dyn Io> = match tls {
        Some(connector) => {
            let name = rustls::pki_types::ServerName::try_from("localhost")?;
            let handshake = connector.connect(name, tcp);
            Box::new(tokio::time::timeout(Duration::from_secs(10), handshake).await??)
        }
        None => Box::new(tcp),
    };
    if mode == Mode::Open {
        return Ok(Box::new(socket));
    }
    let stream = mode == Mode::Stream;
    let body = if stream { STREAM } else { PLAIN };
    let hold = if stream { "x-bench-hold: 1\r\n" } else { "" };
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\n{hold}content-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    while !done(&buf, stream) {
        let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut chunk)).await??;
        anyhow::ensure!(n > 0, "connection closed early");
        buf.extend_from_slice(&chunk[..n]);
    }
    anyhow::ensure!(
        buf.starts_with(b"HTTP/1.1 200"),
        "status line: {}",
        String::from_utf8_lossy(&buf[..buf.len().min(40)])
    );
    Ok(Box::new(socket))
}

/// An HTTP/2 connection (prior knowledge) with `streams` requests on it: plain ones read to the
/// end (`stream` false), or held streams read up to their first event. Holds the connection,
/// its driver and the streams' bodies.
async fn one_h2(addr: String, stream: bool, streams: usize, key: String) -> anyhow::Result<Held> {
    let tcp = TcpStream::connect(&addr).await?;
    tcp.set_nodelay(true)?;
    let io = hyper_util::rt::TokioIo::new(tcp);
    let (mut send, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
    let driver = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(connection));
    let body = if stream { STREAM } else { PLAIN };
    let mut bodies = Vec::with_capacity(streams);
    // One after another: each stream is open (its first event read) before the next starts.
    for _ in 0..streams {
        let mut request = http::Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json");
        if stream {
            request = request.header("x-bench-hold", "1");
        }
        let request = request.body(Full::new(Bytes::from_static(body.as_bytes())))?;
        tokio::time::timeout(Duration::from_secs(10), send.ready()).await??;
        let response = tokio::time::timeout(Duration::from_secs(10), send.send_request(request)).await??;
        anyhow::ensure!(response.status() == 200, "status {}", response.status());
        let mut body = response.into_body();
        let mut seen = Vec::new();
        while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), body.frame()).await? {
            if let Some(data) = frame?.data_ref() {
                seen.extend_from_slice(data);
            }
            if stream && find(&seen, b"\n\n").is_some() {
                break;
            }
        }
        anyhow::ensure!(!stream || find(&seen, b"\n\n").is_some(), "the stream ended before its first event");
        bodies.push(body);
    }
    Ok(Box::new((send, bodies, driver)))
}

/// A client config trusting only the CA in `ca_pem`, offering HTTP/1.1 alone.
fn connector(ca_pem: &Path) -> anyhow::Result<TlsConnector> {
    let pem = std::fs::read(ca_pem).with_context(|| format!("reading {}", ca_pem.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Writes a CA and a `localhost` / `127.0.0.1` server certificate signed by it into `dir`.
fn write_certificates(dir: &Path) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "Portcullis bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()])?;
    leaf.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    leaf.distinguished_name.push(DnType::CommonName, "localhost");
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    std::fs::write(dir.join("server.pem"), leaf_cert.pem())?;
    std::fs::write(dir.join("server-key.pem"), leaf_key.serialize_pem())?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("cert") {
        return write_certificates(Path::new(args.get(2).context("usage: bench-conns cert DIR")?));
    }
    let usage = "usage: bench-conns ADDR N idle|stream|open|h2-idle|h2-stream|h2-streams KEY HOLD_SECS [CA_PEM] \
                 | bench-conns cert DIR";
    let addr = args.get(1).context(usage)?.clone();
    let n: usize = args.get(2).context(usage)?.parse()?;
    let mode = match args.get(3).context(usage)?.as_str() {
        "idle" => Mode::Idle,
        "stream" => Mode::Stream,
        "open" => Mode::Open,
        "h2-idle" => Mode::H2Idle,
        "h2-stream" => Mode::H2Stream,
        "h2-streams" => Mode::H2Streams,
        other => anyhow::bail!("unknown mode {other}; {usage}"),
    };
    let key = args.get(4).context(usage)?.clone();
    let hold: u64 = args.get(5).context(usage)?.parse()?;
    let tls = args.get(6).map(|ca| connector(Path::new(ca))).transpose()?;
    let h2 = matches!(mode, Mode::H2Idle | Mode::H2Stream | Mode::H2Streams);
    anyhow::ensure!(!(h2 && tls.is_some()), "the HTTP/2 modes are clear text only");
    // What each task opens: a connection, or in `h2-streams` a connection of several streams.
    let per_task = if mode == Mode::H2Streams { STREAMS_PER_CONNECTION } else { 1 };
    let sizes: Vec<usize> = (0..n.div_ceil(per_task)).map(|i| per_task.min(n - i * per_task)).collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let mut held = Vec::with_capacity(sizes.len());
        let (mut ok, mut failed) = (0usize, 0usize);
        let mut first_error = None;
        // Open in batches so the listener's backlog is never the limit.
        for batch in sizes.chunks(200) {
            let tasks: Vec<_> = batch
                .iter()
                .map(|&size| {
                    let (addr, key) = (addr.clone(), key.clone());
                    let task = match mode {
                        Mode::H2Idle => tokio::spawn(one_h2(addr, false, 1, key)),
                        Mode::H2Stream | Mode::H2Streams => tokio::spawn(one_h2(addr, true, size, key)),
                        _ => tokio::spawn(one(addr, mode, key, tls.clone())),
                    };
                    (size, task)
                })
                .collect();
            for (size, task) in tasks {
                match task.await {
                    Ok(Ok(one)) => {
                        held.push(one);
                        ok += size;
                    }
                    Ok(Err(e)) => {
                        failed += size;
                        first_error.get_or_insert(e.to_string());
                    }
                    Err(e) => {
                        failed += size;
                        first_error.get_or_insert(e.to_string());
                    }
                }
            }
        }
        println!("READY {ok} {failed}");
        if let Some(e) = first_error {
            eprintln!("first error: {e}");
        }
        tokio::time::sleep(Duration::from_secs(hold)).await;
        drop(held);
        anyhow::Ok(())
    })
}
