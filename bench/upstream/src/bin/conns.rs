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
//!
//! Prints `READY <ok> <failed>` once every connection is in place, holds for HOLD_SECS, exits.
//!
//! With a sixth argument, `CA_PEM`, every connection is TLS (ALPN `http/1.1`, server name
//! `localhost`), trusting that CA alone; in `open` mode the handshake is done before it holds.
//!
//! `bench-conns cert DIR` writes a CA (`ca.pem`) and a server certificate for `localhost` and
//! `127.0.0.1` signed by it (`server.pem`, `server-key.pem`) into DIR, for the gateway's
//! `--tls-cert` / `--tls-key`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
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
}

/// A held connection: plain TCP, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn one(
    addr: String,
    mode: Mode,
    key: String,
    tls: Option<TlsConnector>,
) -> anyhow::Result<(Box<dyn Io>, Vec<u8>)> {
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
        return Ok((socket, Vec::new()));
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
    Ok((socket, buf))
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
    let usage = "usage: bench-conns ADDR N idle|stream|open KEY HOLD_SECS [CA_PEM] | bench-conns cert DIR";
    let addr = args.get(1).context(usage)?.clone();
    let n: usize = args.get(2).context(usage)?.parse()?;
    let mode = match args.get(3).context(usage)?.as_str() {
        "idle" => Mode::Idle,
        "stream" => Mode::Stream,
        "open" => Mode::Open,
        other => anyhow::bail!("unknown mode {other}; {usage}"),
    };
    let key = args.get(4).context(usage)?.clone();
    let hold: u64 = args.get(5).context(usage)?.parse()?;
    let tls = args.get(6).map(|ca| connector(Path::new(ca))).transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let mut held = Vec::with_capacity(n);
        let mut failed = 0usize;
        let mut first_error = None;
        // Open in batches so the listener's backlog is never the limit.
        for batch in (0..n).collect::<Vec<_>>().chunks(200) {
            let tasks: Vec<_> =
                batch.iter().map(|_| tokio::spawn(one(addr.clone(), mode, key.clone(), tls.clone()))).collect();
            for task in tasks {
                match task.await {
                    Ok(Ok(pair)) => held.push(pair),
                    Ok(Err(e)) => {
                        failed += 1;
                        first_error.get_or_insert(e.to_string());
                    }
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert(e.to_string());
                    }
                }
            }
        }
        println!("READY {} {}", held.len(), failed);
        if let Some(e) = first_error {
            eprintln!("first error: {e}");
        }
        tokio::time::sleep(Duration::from_secs(hold)).await;
        drop(held);
        anyhow::Ok(())
    })
}
