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
use portcullis_dataplane::limits::redis_store::{RedisStore, StoreThread};
use portcullis_dataplane::limits::{Admission, Decision, KeyLimits, Period, Subject, SubjectLimits, Which};
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
    let store = RedisStore::connect(&redis.url, Duration::from_secs(3), errors, StoreThread::Own).expect("connect");
    store.probe().await;
    assert!(store.is_healthy(), "redis answers PING");
    Arc::new(store)
}

fn admission(id: &str, limits: SubjectLimits, tokens: u64) -> Admission {
    let now_ms = chrono::Utc::now().timestamp_millis() as u64;
    Admission {
        limits: Arc::new(KeyLimits { key: Subject { id: id.into(), limits }, team: None, failure_policy: None }),
        tokens,
        at_ms: now_ms,
        period: Period::at(now_ms),
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

/// Calls of the admit script so far (`INFO commandstats`).
async fn script_calls(url: &str) -> u64 {
    let client = redis::Client::open(url).expect("client");
    let mut connection = client.get_multiplexed_async_connection().await.expect("connection");
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut connection).await.expect("info");
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

/// Sends admissions of `cost` for `id` from 16 tasks per replica until `expected` have been
/// admitted between them (refusals of `which` wait for unspent slices to come back); returns
/// each replica's grants.
async fn spend_until(
    replicas: &[Arc<RedisStore>; 2],
    id: &'static str,
    limits: SubjectLimits,
    cost: u64,
    expected: u64,
    which: Which,
) -> [Vec<portcullis_dataplane::limits::Granted>; 2] {
    let admitted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tasks = Vec::new();
    for i in 0..32 {
        let (store, admitted) = (replicas[i % 2].clone(), admitted.clone());
        tasks.push(tokio::spawn(async move {
            let mut grants = Vec::new();
            while admitted.load(std::sync::atomic::Ordering::SeqCst) < expected && Instant::now() < deadline {
                match store.admit(&admission(id, limits, cost)).await.expect("redis answered") {
                    Decision::Granted(g) => {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        grants.push(g);
                    }
                    Decision::Refused(r) => {
                        assert_eq!(r.which, which);
                        // Spent out: wait for the other replica's unspent slice to come back.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            grants
        }));
    }
    let mut grants = [Vec::new(), Vec::new()];
    for (i, task) in tasks.into_iter().enumerate() {
        grants[i % 2].extend(task.await.expect("task"));
    }
    let total: usize = grants.iter().map(Vec::len).sum();
    assert_eq!(total as u64, expected, "exactly the limit is admitted across both replicas");
    // Nothing more fits, on either replica, once every slice is back.
    for store in replicas {
        store.flush_all().await;
    }
    for store in replicas {
        for _ in 0..50 {
            assert!(matches!(store.admit(&admission(id, limits, cost)).await, Ok(Decision::Refused(_))));
        }
        store.flush_all().await;
    }
    grants
}

/// Large limits are spent from per-replica slices: two replicas sharing one Redis admit exactly
/// the limit between them (what one holds unspent goes back and the other spends it), Redis
/// counts exactly what was admitted, settlements arrive, and far fewer script calls are made
/// than requests admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_spend_slices_and_admit_exactly_the_limit() {
    let Some(redis) = start_redis() else { return };
    let replicas = [store(&redis).await, store(&redis).await];
    const RPM: u64 = 40_000;
    let limits =
        SubjectLimits { requests_per_minute: Some(RPM), tokens_per_minute: Some(4_000_000), ..Default::default() };
    let calls_before = script_calls(&redis.url).await;
    let grants = spend_until(&replicas, "ns/sliced", limits, 10, RPM, Which::Requests).await;
    let calls = script_calls(&redis.url).await - calls_before;
    assert!(calls * 20 < RPM, "{calls} script calls for {RPM} admissions: slices are not being used");
    let period = Period::at(chrono::Utc::now().timestamp_millis() as u64);
    let (requests, tokens, _, _) = replicas[0].usage("ns/sliced", period).await.expect("usage");
    assert_eq!((requests, tokens), (RPM, RPM * 10), "Redis counts exactly what was admitted");

    // Every request used 6 of its 10 tokens: the settlements are summed and sent on flush.
    for (store, list) in replicas.iter().zip(&grants) {
        for g in list {
            store.settle(&admission("ns/sliced", limits, 10), g, -4).await;
        }
    }
    for store in &replicas {
        store.flush_all().await;
    }
    let (_, tokens, _, _) = replicas[1].usage("ns/sliced", period).await.expect("usage");
    assert_eq!(tokens, RPM * 6);
}

/// A day budget large enough is sliced too: exactly the budget is reserved across two replicas,
/// each admission sees what was left before it (less what the other replica holds), and the
/// day's counter in Redis is exact once the slices are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliced_day_budget_is_spent_exactly() {
    let Some(redis) = start_redis() else { return };
    let replicas = [store(&redis).await, store(&redis).await];
    const BUDGET: u64 = 400_000;
    let limits = SubjectLimits { tokens_per_day: Some(BUDGET), ..Default::default() };
    let grants = spend_until(&replicas, "ns/budget-sliced", limits, 100, BUDGET / 100, Which::DayBudget).await;
    for g in grants.iter().flatten() {
        let remaining = g.budget_remaining.expect("a budget");
        assert!((100..=BUDGET).contains(&remaining), "remaining before this request: {remaining}");
    }
    let period = Period::at(chrono::Utc::now().timestamp_millis() as u64);
    let (_, _, day, _) = replicas[0].usage("ns/budget-sliced", period).await.expect("usage");
    assert_eq!(day, BUDGET, "the day's counter holds exactly what was admitted");
}

/// The granules a subject's tokens were recorded in, oldest first, and that list's key.
async fn token_granules(connection: &mut redis::aio::MultiplexedConnection) -> (String, Vec<u64>) {
    let lists: Vec<String> = redis::cmd("KEYS").arg("*:tkl").query_async(connection).await.expect("keys");
    assert_eq!(lists.len(), 1, "one subject in this server: {lists:?}");
    let granules: Vec<u64> =
        redis::cmd("LRANGE").arg(&lists[0]).arg(0).arg(-1).query_async(connection).await.expect("lrange");
    (lists[0].clone(), granules)
}

fn strictly_ascending(granules: &[u64]) -> bool {
    granules.windows(2).all(|w| w[0] < w[1])
}

/// A granule whose reservations were all given back is still listed: a new reservation in it
/// must not list it a second time (a refusal's Retry-After sums the listed granules, so it would
/// count that one twice). And a granule newer than Redis's clock (one that ran ahead, or a
/// failover to a replica behind it) takes the next reservations, so the list stays in order
/// and settlements find their granule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granules_are_listed_once_and_in_order() {
    let Some(redis) = start_redis() else { return };
    let store = store(&redis).await;
    let client = redis::Client::open(redis.url.as_str()).expect("client");
    let mut connection = client.get_multiplexed_async_connection().await.expect("connection");
    let limits = SubjectLimits { tokens_per_minute: Some(1000), ..Default::default() };
    let a = admission("ns/granules", limits, 100);
    let grant = |d: Decision| match d {
        Decision::Granted(g) => g,
        Decision::Refused(r) => panic!("refused: {r:?}"),
    };

    // Reserve, give it all back, reserve again: until both land in one 100 ms granule.
    let mut reused = None;
    for _ in 0..20 {
        let first = grant(store.admit(&a).await.expect("answered"));
        store.settle(&a, &first, -100).await;
        let second = grant(store.admit(&a).await.expect("answered"));
        if second.granule == first.granule {
            reused = Some(second);
            break;
        }
        store.settle(&a, &second, -100).await;
    }
    let reused = reused.expect("two reservations within one 100 ms granule in 20 tries");
    let (list, granules) = token_granules(&mut connection).await;
    assert!(strictly_ascending(&granules), "each granule listed once, in order: {granules:?}");
    assert_eq!(granules.last(), Some(&reused.granule));

    // A granule 5 s ahead of Redis's clock is the newest listed.
    let ahead = reused.granule + 50;
    let hash = list.trim_end_matches('l').to_owned();
    let _: () = redis::cmd("RPUSH").arg(&list).arg(ahead).query_async(&mut connection).await.expect("rpush");
    let _: () = redis::cmd("HSET").arg(&hash).arg(ahead).arg(0).query_async(&mut connection).await.expect("hset");
    let third = grant(store.admit(&a).await.expect("answered"));
    assert_eq!(third.granule, ahead, "recorded in the newest granule, not behind it");
    let (_, granules) = token_granules(&mut connection).await;
    assert!(strictly_ascending(&granules), "still in order: {granules:?}");
    assert_eq!(granules.last(), Some(&ahead));

    // Its settlement finds it: 100 + 100 reserved, 60 of the second given back.
    store.settle(&a, &third, -60).await;
    let (_, tokens, _, _) = store.usage("ns/granules", a.period).await.expect("usage");
    assert_eq!(tokens, 140);
}
