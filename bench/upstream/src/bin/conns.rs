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

use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

async fn one(addr: String, mode: Mode, key: String) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut socket = TcpStream::connect(&addr).await?;
    socket.set_nodelay(true)?;
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

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: bench-conns ADDR N idle|stream|open KEY HOLD_SECS";
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
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let mut held = Vec::with_capacity(n);
        let mut failed = 0usize;
        let mut first_error = None;
        // Open in batches so the listener's backlog is never the limit.
        for batch in (0..n).collect::<Vec<_>>().chunks(200) {
            let tasks: Vec<_> = batch.iter().map(|_| tokio::spawn(one(addr.clone(), mode, key.clone()))).collect();
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
