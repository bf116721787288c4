//! Batched admission against a real Redis: concurrent requests of one subject share script
//! calls, and every one of them is still decided exactly as if it had come alone.
//!
//! Needs `redis-server` (installed by `scripts/test.sh`); without it each test says so and
//! returns.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_crds::v1alpha1::FailurePolicy;
use portcullis_dataplane::limits::redis_store::RedisStore;
use portcullis_dataplane::limits::{Admission, Decision, Period, Subject, SubjectLimits, Which};
use prometheus::{IntCounterVec, Opts};

struct Redis {
    child: Child,
    url: String,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> Option<Redis> {
    let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .map(str::to_owned)
        .or_else(|| {
            let found = Command::new("sh").args(["-c", "command -v redis-server"]).output().ok()?;
            let path = String::from_utf8(found.stdout).ok()?.trim().to_owned();
            (!path.is_empty()).then_some(path)
        });
    let Some(bin) = bin else {
        eprintln!("SKIP: redis-server is not installed (scripts/test.sh installs it)");
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
    let child = Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server");
    let redis = Redis { child, url: format!("redis://127.0.0.1:{port}/") };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(redis);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("redis-server did not start on port {port}");
}

async fn store(redis: &Redis) -> Arc<RedisStore> {
    let errors = IntCounterVec::new(Opts::new("errors", "errors"), &["kind"]).expect("counter");
    let store = RedisStore::connect(&redis.url, Duration::from_secs(3), errors).expect("connect");
    store.probe().await;
    assert!(store.is_healthy(), "redis answers PING");
    Arc::new(store)
}

fn admission(id: &str, limits: SubjectLimits, tokens: u64) -> Admission {
    Admission {
        key: Subject { id: id.to_owned(), limits },
        team: None,
        tokens,
        period: Period::at(chrono::Utc::now().timestamp_millis() as u64),
        policy: FailurePolicy::Closed,
    }
}

/// Sends `n` admissions at once and returns the decisions.
async fn admit_all(store: &Arc<RedisStore>, n: usize, make: impl Fn() -> Admission) -> Vec<Decision> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (store, a) = (store.clone(), make());
            tokio::spawn(async move { store.admit(&a).await.expect("redis answered") })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

fn granted(decisions: &[Decision]) -> Vec<u64> {
    decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Granted(g) => Some(g.requests_used),
            Decision::Refused(_) => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_each_decided_in_order() {
    let Some(redis) = start_redis() else { return };
    let store = store(&redis).await;

    // Requests per minute: exactly the limit is admitted, each with its own place in the count.
    let rpm = SubjectLimits { requests_per_minute: Some(25), ..Default::default() };
    let decisions = admit_all(&store, 40, || admission("ns/rpm", rpm, 1)).await;
    let mut used = granted(&decisions);
    used.sort_unstable();
    assert_eq!(used, (1..=25).collect::<Vec<_>>(), "25 admitted, counted 1..=25");
    for d in &decisions {
        if let Decision::Refused(r) = d {
            assert_eq!(r.which, Which::Requests);
            assert!(r.retry_after_ms > 0 && r.retry_after_ms <= 61_000, "retry after {} ms", r.retry_after_ms);
        }
    }

    // Tokens per minute: 10 of 30 fit; the refusals say tokens and when to retry.
    let tpm = SubjectLimits { tokens_per_minute: Some(1000), ..Default::default() };
    let decisions = admit_all(&store, 30, || admission("ns/tpm", tpm, 100)).await;
    assert_eq!(granted(&decisions).len(), 10);
    assert!(decisions.iter().all(|d| match d {
        Decision::Granted(g) => g.tokens_used % 100 == 0 && g.tokens_used <= 1000 && g.tokens_reset_ms > 0,
        Decision::Refused(r) => r.which == Which::Tokens && r.retry_after_ms > 0,
    }));

    // Settling all ten at once (each used 50 of its 100) frees 500 tokens.
    let settles: Vec<_> = decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Granted(g) => Some(*g),
            Decision::Refused(_) => None,
        })
        .map(|g| {
            let (store, a) = (store.clone(), admission("ns/tpm", tpm, 100));
            tokio::spawn(async move { store.settle(&a, &g, -50).await })
        })
        .collect();
    for s in settles {
        s.await.expect("settle");
    }
    let period = Period::at(chrono::Utc::now().timestamp_millis() as u64);
    let (_, tokens, _, _) = store.usage("ns/tpm", period).await.expect("usage");
    assert_eq!(tokens, 500, "ten settlements of -50 each");
    let decisions = admit_all(&store, 8, || admission("ns/tpm", tpm, 100)).await;
    assert_eq!(granted(&decisions).len(), 5, "the freed 500 tokens admit five more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_budget_stops_admitting_once_spent() {
    let Some(redis) = start_redis() else { return };
    let store = store(&redis).await;
    let limits = SubjectLimits { tokens_per_day: Some(300), ..Default::default() };
    let decisions = admit_all(&store, 6, || admission("ns/budget", limits, 100)).await;
    assert_eq!(granted(&decisions).len(), 3, "0, 100 and 200 used: admitted; at 300: refused");
    let mut remaining: Vec<_> = decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Granted(g) => g.budget_remaining,
            Decision::Refused(r) => {
                assert_eq!(r.which, Which::DayBudget);
                None
            }
        })
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, vec![100, 200, 300], "each admitted request sees the budget before its own reservation");
}
