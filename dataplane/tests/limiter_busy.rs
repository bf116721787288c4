//! The shared store answering slowly is not the shared store being down. A flood of one key
//! queues its decisions behind the lane's earlier script calls; those queued past twice the
//! store's timeout are refused (`rate_limiter_busy`), whatever the key's failure policy, since
//! that policy (here `open`) is for a store that is down and would let the flood through
//! unlimited. A store that stops answering still gets the policy; one that answers some calls
//! after the timeout while it answers others is not down either.
//!
//! The store is a fake Redis on a loopback port that speaks just enough RESP for the client and
//! answers every script call after a fixed delay (and, when asked, every reply after a latency),
//! admitting everything and granting the slices asked for: the queueing, not
//! Redis's arithmetic, is under test (`redis_batch.rs` covers that against a real Redis). It
//! also sums the settlements it is sent: what it admitted after the request stopped waiting
//! must come back.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_crds::v1alpha1::FailurePolicy;
use portcullis_dataplane::limits::{
    AdmitError, KeyLimits, Limiter, LimiterMetrics, LimiterSettings, StoreThread, Subject, SubjectLimits, SystemClock,
};
use prometheus::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Each script call is answered after this long (a single connection answers in order, as
/// Redis does).
const SCRIPT_DELAY: Duration = Duration::from_millis(900);
/// The store's timeout: every call is answered well within it, even on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Requests of one key sent at once: calls of up to 128 (the batch limit) each `SCRIPT_DELAY`
/// after the last, so the later ones would wait past `2 * TIMEOUT`, and one call is out when
/// they stop waiting (calls end at 0.9, 1.8, 2.7, 3.6, 4.5 s...; they stop at 4 s).
const FLOOD: usize = 1 + 128 * 6;

#[derive(Debug, Default)]
struct Seen {
    /// Each script call is answered after this long.
    script_delay: Duration,
    /// Every reply is sent this many ms after its command was read, in order, whatever else is
    /// out (a store further away, or behind, not a busier one).
    latency_ms: AtomicU64,
    /// While false, nothing is answered any more (a store that stopped, not a slow one).
    answering: AtomicBool,
    /// Requests the fake admitted in its replies.
    admitted: AtomicI64,
    /// Requests given back by settlements.
    given_back: AtomicI64,
    /// Requests granted as per-replica slices in admit replies.
    sliced: AtomicI64,
}

struct FakeRedis {
    port: u16,
    seen: Arc<Seen>,
}

impl FakeRedis {
    async fn start() -> Self {
        Self::answering_after(SCRIPT_DELAY).await
    }

    async fn answering_after(script_delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Seen { script_delay, answering: AtomicBool::new(true), ..Default::default() });
        let shared = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, shared.clone()));
            }
        });
        Self { port, seen }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

/// One command: `*N` then N bulk strings. None until the buffer holds a whole one.
fn parse_command(buf: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = buf.get(at..)?.windows(2).position(|w| w == b"\r\n")? + at;
        Some((&buf[at..end], end + 2))
    }
    let (head, mut at) = line(buf, 0)?;
    assert_eq!(head.first(), Some(&b'*'), "the client sends arrays");
    let n: usize = std::str::from_utf8(&head[1..]).ok()?.parse().ok()?;
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        let (len, next) = line(buf, at)?;
        assert_eq!(len.first(), Some(&b'$'), "of bulk strings");
        let len: usize = std::str::from_utf8(&len[1..]).ok()?.parse().ok()?;
        let part = buf.get(next..next + len)?;
        parts.push(part.to_vec());
        at = next + len + 2;
        if buf.len() < at {
            return None;
        }
    }
    Some((parts, at))
}

fn number(part: &[u8]) -> i64 {
    std::str::from_utf8(part).unwrap().parse().unwrap()
}

/// A script call: EVALSHA, its digest, 6 keys, then ARGV. The settle script's third argument is
/// a granule (a count of 100 ms since 1970); the admit script's is a requests-per-minute limit.
fn is_settlement(command: &[Vec<u8>]) -> bool {
    number(&command[2]) == 6 && number(&command[9 + 2]) > 1_000_000_000
}

/// The settle script's arguments: granule ms, granules, then granule, requests, tokens, budget
/// per settlement. Returns the requests given back.
fn requests_given_back(command: &[Vec<u8>]) -> i64 {
    command[9 + 2..].chunks(4).map(|s| -number(&s[1])).sum()
}

/// The admit script's reply: ten numbers per request (all admitted), then ten for the slice:
/// the requests it asked for (`ARGV[9]`, after `EVALSHA`, the digest, the key count and 6 keys),
/// no tokens. Returns the reply, the requests admitted and the requests granted as a slice.
fn admit_reply(command: &[Vec<u8>]) -> (Vec<u8>, i64, i64) {
    let keys = number(&command[2]) as usize;
    let costs = command.len() - 3 - keys - 10;
    let slice = number(&command[3 + keys + 8]) as usize;
    let granule = (chrono::Utc::now().timestamp_millis() / 100) as usize;
    let mut values: Vec<usize> = Vec::new();
    for i in 0..costs {
        values.extend([1, 0, 0, i + 1, 0, granule, 0, 0, 60_000, 60_000]);
    }
    values.extend([slice, 0, 100, costs, 0, 0, 0, 60_000, 60_000, granule]);
    let mut out = format!("*{}\r\n", values.len()).into_bytes();
    for v in values {
        out.extend(format!(":{v}\r\n").as_bytes());
    }
    (out, costs as i64, slice as i64)
}

async fn serve(stream: TcpStream, seen: Arc<Seen>) {
    let (mut reader, mut writer) = stream.into_split();
    // Replies with the instant each may go out, written in order.
    let (replies, mut due) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((at, reply)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if writer.write_all(&reply).await.is_err() {
                return;
            }
        }
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        while let Some((command, used)) = parse_command(&buf) {
            buf.drain(..used);
            let read = tokio::time::Instant::now();
            if !seen.answering.load(Ordering::SeqCst) {
                continue;
            }
            let name = String::from_utf8_lossy(&command[0]).to_ascii_uppercase();
            let reply = match name.as_str() {
                "PING" => b"+PONG\r\n".to_vec(),
                "EVALSHA" | "EVAL" if is_settlement(&command) => {
                    seen.given_back.fetch_add(requests_given_back(&command), Ordering::SeqCst);
                    b":1\r\n".to_vec()
                }
                "EVALSHA" | "EVAL" => {
                    tokio::time::sleep(seen.script_delay).await;
                    if !seen.answering.load(Ordering::SeqCst) {
                        continue;
                    }
                    let (reply, admitted, sliced) = admit_reply(&command);
                    seen.admitted.fetch_add(admitted, Ordering::SeqCst);
                    seen.sliced.fetch_add(sliced, Ordering::SeqCst);
                    reply
                }
                // CLIENT SETINFO and the like at connection setup.
                _ => b"+OK\r\n".to_vec(),
            };
            let latency = Duration::from_millis(seen.latency_ms.load(Ordering::SeqCst));
            if replies.send(((read + latency).max(tokio::time::Instant::now()), reply)).is_err() {
                return;
            }
        }
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn limiter(store: &FakeRedis, policy: FailurePolicy) -> (Arc<Limiter>, Registry) {
    limiter_with_timeout(store, policy, TIMEOUT).await
}

async fn limiter_with_timeout(store: &FakeRedis, policy: FailurePolicy, timeout: Duration) -> (Arc<Limiter>, Registry) {
    let registry = Registry::new();
    let settings = LimiterSettings {
        default_policy: policy,
        replicas: 1,
        redis_url: Some(store.url()),
        redis_timeout: timeout,
        lockout_threshold: 10,
        lockout_window: Duration::from_secs(60),
        lockout_backoff: Duration::from_secs(60),
        trusted_proxies: Vec::new(),
        default_output_tokens: 100,
        redis_thread: StoreThread::Own,
    };
    let metrics = LimiterMetrics::register(&registry).expect("metrics");
    let limiter = Limiter::new(settings, Arc::new(SystemClock::default()), metrics).expect("limiter");
    limiter.spawn_health_probe();
    let deadline = Instant::now() + Duration::from_secs(10);
    while limiter.mode_name(policy) != "shared" {
        assert!(Instant::now() < deadline, "the fake store never answered the health probe");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (limiter, registry)
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Outcomes {
    admitted: usize,
    busy: usize,
    unavailable: usize,
    /// Refused by a limit (only the in-process limits of the `local` policy refuse: the fake
    /// store admits everything).
    refused: usize,
}

fn key(id: &str) -> Arc<KeyLimits> {
    key_limited(id, 100)
}

/// A key limited to `rpm` requests a minute: from 400 it is admitted from slices.
fn key_limited(id: &str, rpm: u64) -> Arc<KeyLimits> {
    Arc::new(KeyLimits {
        key: Subject { id: id.into(), limits: SubjectLimits { requests_per_minute: Some(rpm), ..Default::default() } },
        team: None,
        failure_policy: None,
    })
}

/// Sends `FLOOD` admissions of one key at once.
async fn flood(limiter: &Arc<Limiter>) -> Outcomes {
    admit_at_once(limiter, vec![key("ns/flooded"); FLOOD]).await
}

/// Sends one admission per entry at once and sorts their outcomes.
async fn admit_at_once(limiter: &Arc<Limiter>, keys: Vec<Arc<KeyLimits>>) -> Outcomes {
    let tasks: Vec<_> = keys
        .into_iter()
        .map(|limits| {
            let limiter = limiter.clone();
            tokio::spawn(async move {
                let admission = limiter.admission_at(&limits, 1, limiter.now_ms());
                limiter.admit(admission).await
            })
        })
        .collect();
    let mut out = Outcomes::default();
    for task in tasks {
        out.count(task.await.expect("task"));
    }
    out
}

impl Outcomes {
    fn count<T>(&mut self, outcome: Result<T, AdmitError>) {
        match outcome {
            Ok(_) => self.admitted += 1,
            Err(AdmitError::Busy) => self.busy += 1,
            Err(AdmitError::Unavailable) => self.unavailable += 1,
            Err(AdmitError::Refused(_)) => self.refused += 1,
        }
    }
}

/// Waits (up to 5 s) until the store has been given back every admission it made that no
/// request took, and every slice it granted (each test's keys take one request at most, so every
/// slice ends unspent); returns the admissions no request took.
async fn unclaimed_given_back(seen: &Seen, taken: usize) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    let unclaimed = || seen.admitted.load(Ordering::SeqCst) - taken as i64;
    let owed = || unclaimed() + seen.sliced.load(Ordering::SeqCst);
    while seen.given_back.load(Ordering::SeqCst) < owed() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.given_back.load(Ordering::SeqCst), owed(), "every unclaimed admission and slice is given back");
    unclaimed()
}

fn rejections(registry: &Registry, reason: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == "portcullis_limit_rejections_total")
        .flat_map(|family| family.get_metric())
        .filter(|m| m.get_label().iter().any(|l| l.value() == reason))
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_queued_past_the_timeout_is_refused_not_let_through_by_the_open_policy() {
    let store = FakeRedis::start().await;
    let (limiter, registry) = limiter(&store, FailurePolicy::Open).await;
    let started = Instant::now();
    let out = flood(&limiter).await;
    let took = started.elapsed();
    eprintln!("{out:?} in {took:?}");
    // What was decided within 4 s (twice the timeout) was admitted, the rest refused as busy. Nothing went to the
    // open policy: the store answered every call.
    assert!(out.busy > 0, "nothing was refused as busy: {out:?}");
    assert!(out.admitted > 0, "the first calls' requests were decided: {out:?}");
    assert_eq!(out.unavailable, 0);
    assert_eq!(limiter.mode_name(FailurePolicy::Open), "shared", "a slow store is not marked down");
    assert_eq!(rejections(&registry, "store_busy"), out.busy as u64);
    // The call out when they stopped waiting was answered and counted by the store: what it
    // admitted for nobody is given back (settlements flush every 50 ms).
    tokio::time::sleep(SCRIPT_DELAY * 2).await;
    let unclaimed = unclaimed_given_back(&store.seen, out.admitted).await;
    assert!(unclaimed > 0, "a call was out when the requests stopped waiting: {out:?}");
}

/// A store that answers each call a quarter of its timeout after the last, sent calls of many
/// keys at once: the first few are answered in time, the rest late, while the store is
/// answering (as when the store is slow, or the gateway too busy to read its answers at once).
/// A late call is not a store that is down: those requests are refused as busy, the store stays
/// shared for every key (the `open` policy would have let them all through), and what the late
/// answers admitted is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_answered_late_while_the_store_answers_are_busy_not_a_store_that_is_down() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    const KEYS: usize = 12;
    let store = FakeRedis::answering_after(TIMEOUT / 4).await;
    let (limiter, registry) = limiter_with_timeout(&store, FailurePolicy::Open, TIMEOUT).await;
    // Limits large enough to be admitted from slices: each call also asks for one.
    let keys = (0..KEYS).map(|i| key_limited(&format!("ns/key-{i}"), 1_000)).collect();
    let out = admit_at_once(&limiter, keys).await;
    eprintln!("{out:?}");
    assert!(out.admitted > 0, "the first calls were answered in time: {out:?}");
    assert!(out.busy > 0, "the calls answered after the timeout are refused as busy: {out:?}");
    assert_eq!(out.unavailable, 0);
    assert_eq!(rejections(&registry, "store_busy"), out.busy as u64);
    assert_eq!(limiter.mode_name(FailurePolicy::Open), "shared", "a store that answers is not marked down");
    // The last answer lands 12 quarter-timeouts after the calls went out.
    tokio::time::sleep(TIMEOUT * 2).await;
    let unclaimed = unclaimed_given_back(&store.seen, out.admitted).await;
    assert_eq!(unclaimed, out.busy as i64, "each late answer's admission is given back: {out:?}");
    assert!(store.seen.sliced.load(Ordering::SeqCst) >= KEYS as i64, "every call granted a slice");
    assert_eq!(limiter.mode_name(FailurePolicy::Open), "shared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_stops_answering_gets_the_failure_policy_not_busy() {
    let store = FakeRedis::start().await;
    let (limiter, registry) = limiter(&store, FailurePolicy::Closed).await;
    store.seen.answering.store(false, Ordering::SeqCst);
    // A probe's answer sent just before is read before the flood's calls go out (an answer read
    // after they went out would count as the store answering).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = flood(&limiter).await;
    eprintln!("{out:?}");
    assert_eq!(out, Outcomes { unavailable: FLOOD, ..Default::default() }, "every request gets the closed policy");
    assert_eq!(rejections(&registry, "store_busy"), 0);
    assert_eq!(limiter.mode_name(FailurePolicy::Closed), "closed");
}

/// A request that goes away while its key's decision is out (its client left) has already
/// reserved its team's share: both reservations come back, the team's and, once its answer
/// lands, the key's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_goes_away_gives_back_its_team_and_key_reservations() {
    let store = FakeRedis::start().await;
    let (limiter, _registry) = limiter(&store, FailurePolicy::Closed).await;
    let small = |rpm| SubjectLimits { requests_per_minute: Some(rpm), ..Default::default() };
    let limits = Arc::new(KeyLimits {
        key: Subject { id: "ns/left".into(), limits: small(10) },
        team: Some(Subject { id: "team:ns/t".into(), limits: small(20) }),
        failure_policy: None,
    });
    let waiting = limiter.clone();
    let request = tokio::spawn(async move {
        let admission = waiting.admission_at(&limits, 1, waiting.now_ms());
        waiting.admit(admission).await
    });
    // The team's call answers at 0.9 s; the key's is out until 1.8 s.
    tokio::time::sleep(SCRIPT_DELAY * 3 / 2).await;
    request.abort();
    assert!(request.await.expect_err("aborted").is_cancelled());
    let seen = &store.seen;
    let deadline = Instant::now() + SCRIPT_DELAY + Duration::from_secs(5);
    while seen.given_back.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.admitted.load(Ordering::SeqCst), 2, "the team and the key were each admitted once");
    assert_eq!(seen.given_back.load(Ordering::SeqCst), 2, "and both given back");
}

/// A store that falls further and further behind until it answers every call well after the
/// timeout, under steady traffic: late answers keep arriving, so each call alone looks late,
/// not lost. But once nothing has been answered within the timeout for max(20 × it, 1 s), the
/// store is as good as down: the failure policy (here `local`) decides, instead of every
/// request being refused as busy for as long as the store stays slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_answers_everything_late_gets_the_failure_policy() {
    const TIMEOUT: Duration = Duration::from_millis(50);
    let store = FakeRedis::answering_after(Duration::ZERO).await;
    let (limiter, _registry) = limiter_with_timeout(&store, FailurePolicy::Local, TIMEOUT).await;
    let started = Instant::now();
    let run_for = Duration::from_millis(4_000);
    let workers: Vec<_> = (0..8)
        .map(|i| {
            let (limiter, limits) = (limiter.clone(), key(&format!("ns/steady-{i}")));
            tokio::spawn(async move {
                // (when, outcome) of each request, while the run lasts.
                let mut seen = Vec::new();
                while started.elapsed() < run_for {
                    let admission = limiter.admission_at(&limits, 1, limiter.now_ms());
                    let mut one = Outcomes::default();
                    one.count(limiter.admit(admission).await);
                    seen.push((started.elapsed(), one));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen
            })
        })
        .collect();
    // Latency from 10 to 120 ms over 1.5 s, in 5 ms steps, then held: well past the timeout and
    // its grace (55 ms), so that no answer counts as in time even on a loaded machine.
    for ms in (10..=120).step_by(5) {
        store.seen.latency_ms.store(ms, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(65)).await;
    }
    let mut last_second = Outcomes::default();
    for worker in workers {
        for (at, one) in worker.await.expect("worker") {
            if at >= run_for - Duration::from_secs(1) {
                last_second.admitted += one.admitted;
                last_second.busy += one.busy;
                last_second.unavailable += one.unavailable;
                last_second.refused += one.refused;
            }
        }
    }
    eprintln!("last second: {last_second:?}");
    assert_eq!(limiter.mode_name(FailurePolicy::Local), "local", "the store is down");
    assert_eq!(last_second.busy, 0, "nothing is refused as busy once the store is down: {last_second:?}");
    // Decided in process (each key's 100 a minute are soon spent at this pace: refused by its
    // limit, not as busy).
    assert!(last_second.admitted + last_second.refused > 0, "the local policy decides: {last_second:?}");
    assert_eq!(last_second.unavailable, 0);
}
