//! The deadline layer inside kube's client, against an API server on a real socket: kube's own
//! calls (a get, a list, a watch as kube writes its URL) are told apart and timed as the layer
//! promises. The layer's own timing is tested in `src/lib.rs` on paused time.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, WatchParams};
use kube::Api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const DEADLINE: Duration = Duration::from_millis(300);
/// How long a call the deadline must not cut is watched: well past the deadline.
const WATCHED: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, Copy)]
enum Server {
    /// Reads each request's head and never answers.
    Silent,
    /// Answers each request's head at once (200, a chunked JSON body) and sends no body.
    HeadOnly,
}

/// An API server on 127.0.0.1 that behaves as `server` on every connection; its address.
async fn serve(server: Server) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buffer = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buffer[..n]),
                    }
                }
                if let Server::HeadOnly = server {
                    let answer =
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
                // Holds the connection open, quiet, until the client leaves.
                while let Ok(n) = stream.read(&mut buffer).await {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{address}")
}

async fn secrets(server: Server) -> Api<Secret> {
    let config = kube::Config::new(serve(server).await.parse().unwrap());
    Api::namespaced(portcullis_apiclient::client_for(config, DEADLINE).unwrap(), "portcullis")
}

/// The error's whole chain, as one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(next) = source {
        text = format!("{text}: {next}");
        source = next.source();
    }
    text
}

/// Runs `call`, which must fail, and asserts the deadline cut it, on time.
async fn assert_cut_by_the_deadline<T: std::fmt::Debug>(
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
    what: &str,
) {
    let started = Instant::now();
    let error = tokio::time::timeout(WATCHED * 4, call)
        .await
        .unwrap_or_else(|_| panic!("{what} still waits: no deadline"))
        .expect_err("answered though the server sent nothing");
    let (text, took) = (chain(&error), started.elapsed());
    assert!(text.contains("the API server did not answer"), "another error: {text}");
    assert!(took >= DEADLINE && took < DEADLINE * 4, "cut after {took:?}, the deadline is {DEADLINE:?}");
}

#[tokio::test]
async fn a_get_with_no_answer_fails_at_the_deadline() {
    let api = secrets(Server::Silent).await;
    assert_cut_by_the_deadline(api.get("portcullis-snapshot"), "the get").await;
}

#[tokio::test]
async fn a_list_whose_body_stops_fails_at_the_deadline() {
    let api = secrets(Server::HeadOnly).await;
    let params = ListParams::default().labels("portcullis.dev/part=snapshot");
    assert_cut_by_the_deadline(api.list(&params), "the list, whose body never comes,").await;
}

#[tokio::test]
async fn a_quiet_watch_is_not_cut() {
    // Waiting for its head: kube's watch URL is told from a get's.
    let api = secrets(Server::Silent).await;
    let params = WatchParams::default().timeout(290);
    let waiting = tokio::time::timeout(WATCHED, api.watch(&params, "0")).await;
    assert!(waiting.is_err(), "a watch waiting for its head ended: {:?}", waiting.map(|r| r.map(|_| ())));
    // Its head come, no events for longer than the deadline.
    let api = secrets(Server::HeadOnly).await;
    let stream = tokio::time::timeout(WATCHED, api.watch(&params, "0"))
        .await
        .expect("the head was sent at once")
        .expect("the watch started");
    let mut stream = std::pin::pin!(stream);
    let next = tokio::time::timeout(WATCHED, stream.next()).await;
    assert!(next.is_err(), "a quiet watch ended: {:?}", next.map(|event| event.map(|e| e.map(|_| ()))));
}
