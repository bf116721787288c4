//! Limits with a real Redis shared by real gateway processes: exactness and the sliding
//! property, token budgets (stream cut, settlement, restart), brute-force lockout, and the
//! failure policies when Redis dies under load.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_e2e::manifests::{self as m, Manifests};
use portcullis_e2e::redis_server::RedisServer;
use portcullis_e2e::{Gateway, GatewayOptions, TestClient, Upstream, UpstreamOptions};
use serde_json::{json, Value};

const KEY_A: &str = "pcl_limits_key_a_0123456789abcdefghijklmnop";
const KEY_B: &str = "pcl_limits_key_b_0123456789abcdefghijklmnop";
const KEY_C: &str = "pcl_limits_key_c_0123456789abcdefghijklmnop";

fn keyed(name: &str, secret: &str, limits: Value) -> Value {
    let mut key = m::api_key(name, secret, &[]);
    key["spec"]["limits"] = limits;
    key
}

/// A mock provider (or a loopback upstream) and up to three limited keys.
fn manifests(upstream: Option<&Upstream>, keys: &[(&str, &str, Value)]) -> Manifests {
    let mut ms = Manifests::new();
    match upstream {
        Some(u) => {
            ms.add("providers.yaml", m::secret("upstream-key", "key", "sk-limits-upstream"));
            ms.add(
                "providers.yaml",
                m::provider(
                    "up",
                    "openai-compatible",
                    Some(&u.base_url_v1()),
                    Some(("upstream-key", "key")),
                    &[("m", None)],
                ),
            );
        }
        None => {
            ms.add("providers.yaml", m::provider("mock", "mock", None, None, &[("m", None)]));
        }
    }
    for (name, key, limits) in keys {
        let secret = format!("{name}-key");
        ms.add("keys.yaml", m::secret(&secret, "key", key));
        ms.add("keys.yaml", keyed(name, &secret, limits.clone()));
    }
    ms
}

fn redis_options(redis: &RedisServer, extra: &[&str]) -> GatewayOptions {
    let mut args = vec!["--redis-url".to_string(), redis.url()];
    args.extend(extra.iter().map(|s| s.to_string()));
    GatewayOptions { extra_args: args, log_level: "warn".into(), ..Default::default() }
}

async fn chat(client: &TestClient, gw: &Gateway, key: &str, extra: &[(&str, &str)]) -> portcullis_e2e::Response {
    let auth = format!("Bearer {key}");
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    client
        .post_json(
            &gw.url("/v1/chat/completions"),
            &headers,
            &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await
        .expect("request")
}

async fn metric(gw: &Gateway, line_prefix: &str) -> Option<f64> {
    let text = gw.metrics_text().await.ok()?;
    text.lines().find(|l| l.starts_with(line_prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

/// Two gateways, one Redis, 16 clients offering ~1000 req/s for a minute and a bit to each of
/// two keys. Key A (100 requests/minute) is decided by Redis request by request; key B (2,000)
/// is spent from per-gateway slices. For both, one limit's worth is admitted per sliding minute
/// across both gateways together (never more, and within 2% of it), no 60-second span admits
/// more than the limit, and admission resumes only once the first batch has left the window —
/// not at a fixed minute boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_window_is_exact_across_two_gateways_and_slides() {
    const LIMITS: [usize; 2] = [100, 2_000];
    let redis = RedisServer::start().await.expect("redis");
    let ms = manifests(
        None,
        &[("a", KEY_A, json!({"requestsPerMinute": LIMITS[0]})), ("b", KEY_B, json!({"requestsPerMinute": LIMITS[1]}))],
    );
    // This test is about exactness while Redis is healthy. On a loaded CI machine a Redis call
    // can exceed the production 50 ms timeout, and the `local` policy would then (correctly)
    // limit each replica on its own; `closed` plus a generous timeout turns any such outage into
    // visible 503s instead.
    let opts = redis_options(&redis, &["--redis-timeout", "3", "--limiter-failure-policy", "closed"]);
    let a = Gateway::start(&ms, opts.clone()).await.expect("gateway a");
    let b = Gateway::start(&ms, opts).await.expect("gateway b");
    let gateways = Arc::new([a, b]);
    let client = TestClient::plain();
    let started = Instant::now();
    let run_for = Duration::from_millis(62_500);
    let mut tasks = Vec::new();
    for worker in 0..32 {
        let gateways = gateways.clone();
        let client = client.clone();
        let key = worker / 16;
        tasks.push(tokio::spawn(async move {
            let gw = &gateways[worker % 2];
            let mut admitted = Vec::new();
            let mut others = Vec::new();
            while started.elapsed() < run_for {
                let response = chat(&client, gw, [KEY_A, KEY_B][key], &[]).await;
                match response.status.as_u16() {
                    200 => admitted.push((started.elapsed(), worker % 2)),
                    429 => {}
                    other => others.push(other),
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            (key, admitted, others)
        }));
    }
    let mut admitted = [Vec::new(), Vec::new()];
    for task in tasks {
        let (key, a, others) = task.await.expect("worker");
        assert!(others.is_empty(), "unexpected statuses: {others:?}");
        admitted[key].extend(a);
    }
    for gw in gateways.iter() {
        let errors = gw.metrics_text().await.expect("metrics");
        assert!(!errors.contains("portcullis_limiter_store_errors_total{"), "Redis calls failed during the run");
    }
    for (admitted, limit) in admitted.iter_mut().zip(LIMITS) {
        admitted.sort();
        let first = admitted.first().expect("something admitted").0;
        let within = |from: Duration, to: Duration| {
            admitted.iter().filter(|(t, _)| *t >= first + from && *t < first + to).count()
        };
        let first_minute = within(Duration::ZERO, Duration::from_millis(59_500));
        let lull = within(Duration::from_secs(5), Duration::from_millis(59_500));
        let second = within(Duration::from_millis(59_500), Duration::from_secs(120));
        // The busiest span of 59.5 s (client-side times: half a second allowed for latency).
        let busiest = admitted
            .iter()
            .enumerate()
            .map(|(i, (t, _))| {
                admitted[i..].iter().take_while(|(u, _)| *u < *t + Duration::from_millis(59_500)).count()
            })
            .max()
            .unwrap_or(0);
        let by_gateway = [0, 1].map(|g| admitted.iter().filter(|(_, gw)| *gw == g).count());
        println!(
            "limit {limit}: first window {first_minute}, lull {lull}, second window {second}, busiest span \
             {busiest}, per gateway {by_gateway:?}"
        );
        assert!(
            (limit * 98 / 100..=limit).contains(&first_minute),
            "limit {limit}: first window admitted {first_minute}"
        );
        assert!(busiest <= limit, "limit {limit}: {busiest} admitted within one minute");
        assert_eq!(lull, 0, "limit {limit}: admitted again before the first batch left the window");
        assert!(second > 0, "limit {limit}: nothing admitted once the first batch left the window");
        assert!(by_gateway.iter().all(|&n| n > 0), "both gateways admitted traffic: {by_gateway:?}");
    }
    let second_a = admitted[0].iter().filter(|(t, _)| *t >= admitted[0][0].0 + Duration::from_millis(59_500)).count();
    assert!((LIMITS[0] * 98 / 100..=LIMITS[0]).contains(&second_a), "limit 100: second window admitted {second_a}");
}

/// A stream that runs past the remaining daily budget is ended with an error event; the budget
/// stays spent after a gateway restart; reservations are settled to real usage.
#[tokio::test]
async fn token_budget_cuts_streams_settles_and_survives_restart() {
    let redis = RedisServer::start().await.expect("redis");
    let upstream = Upstream::start(UpstreamOptions { chunks: 200, output_tokens: 200, ..Default::default() })
        .await
        .expect("upstream");
    let ms = manifests(
        Some(&upstream),
        &[("a", KEY_A, json!({"tokensPerDay": 60})), ("b", KEY_B, json!({"tokensPerDay": 100000}))],
    );
    let mut gw = Gateway::start(&ms, redis_options(&redis, &[])).await.expect("gateway");
    let client = TestClient::plain();

    // Settlement: 1,000 output tokens reserved, 17 + 9 used.
    upstream.set(|o| o.output_tokens = 9);
    let auth_b = format!("Bearer {KEY_B}");
    let body = json!({"model": "m", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]});
    let ok =
        client.post_json(&gw.url("/v1/chat/completions"), &[("authorization", &auth_b)], &body).await.expect("request");
    assert_eq!(ok.status, 200, "{}", ok.describe());
    let mut day_used = 0;
    for _ in 0..50 {
        let limits = client.get(&gw.admin_url("/limits?key=default/b"), &[]).await.expect("limits").json();
        day_used = limits["keys"][0]["tokensPerDay"]["used"].as_u64().unwrap_or(0);
        if day_used == 26 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(day_used, 26, "the reservation was settled to the real usage");

    // The cut: 200 content events against 60 tokens.
    upstream.set(|o| o.output_tokens = 200);
    let auth_a = format!("Bearer {KEY_A}");
    let stream_body = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let mut stream = client
        .post_json_streaming(&gw.url("/v1/chat/completions"), &[("authorization", &auth_a)], &stream_body)
        .await
        .expect("stream");
    assert_eq!(stream.status, 200);
    let mut events = Vec::new();
    while let Some(event) = stream.next_event(Duration::from_secs(5)).await.expect("event") {
        events.push(event);
    }
    let last = events.last().expect("events").json();
    assert_eq!(last["error"]["code"], "token_budget_exceeded", "last event: {last}");
    assert!(events.len() < 100, "the stream was cut early, after {} events", events.len());
    assert!(!events.iter().any(|e| e.is_done()), "a cut stream does not claim to be done");

    let refused = chat(&client, &gw, KEY_A, &[]).await;
    assert_eq!(refused.status, 429, "{}", refused.describe());
    assert_eq!(refused.error_code(), Some("token_budget_exceeded"));
    assert!(refused.header("retry-after").is_some());

    gw.shutdown(Duration::from_secs(10)).await.expect("stop");
    let gw = Gateway::start(&ms, redis_options(&redis, &[])).await.expect("gateway again");
    let still = chat(&client, &gw, KEY_A, &[]).await;
    assert_eq!(still.status, 429, "a restart does not reset the budget: {}", still.describe());
}

/// A client's absurd `max_tokens` (1e17) reaches Redis as a count it takes. It used to reach
/// the admit script as a float Redis refuses, and the failed call sent the whole replica to its
/// failure policy (here `open`: no limits for any key) until the next probe.
#[tokio::test]
async fn an_absurd_max_tokens_leaves_the_shared_store_in_charge() {
    let redis = RedisServer::start().await.expect("redis");
    let ms = manifests(None, &[("a", KEY_A, json!({"tokensPerDay": 1000}))]);
    let gw = Gateway::start(&ms, redis_options(&redis, &["--limiter-failure-policy", "open"])).await.expect("gateway");
    let client = TestClient::plain();
    let auth = format!("Bearer {KEY_A}");
    let body = json!({"model": "m", "max_tokens": 100_000_000_000_000_000u64, "messages": [{"role": "user", "content": "hi"}]});
    let response =
        client.post_json(&gw.url("/v1/chat/completions"), &[("authorization", &auth)], &body).await.expect("request");
    assert_eq!(response.status, 200, "{}", response.describe());
    let errors = metric(&gw, "portcullis_limiter_store_errors_total").await.unwrap_or(0.0);
    assert_eq!(errors, 0.0, "the shared store refused a call");
    assert_eq!(metric(&gw, "portcullis_limiter_mode{mode=\"shared\"}").await, Some(1.0));
    // Reserved as the largest count, then settled to what the mock provider used: the
    // settlement follows the response's last byte, so the client may ask before it is in.
    let read_limits =
        || async { client.get(&gw.admin_url("/limits?key=default/a"), &[]).await.expect("limits").json() };
    let settled = portcullis_e2e::eventually(Duration::from_secs(5), "the settlement", || async {
        let limits = read_limits().await;
        (limits["keys"][0]["tokensPerDay"]["used"].as_u64() < Some(1000)).then_some(limits)
    })
    .await;
    let limits = match settled {
        Ok(limits) => limits,
        Err(_) => read_limits().await,
    };
    let used = limits["keys"][0]["tokensPerDay"]["used"].as_u64().expect("used");
    assert!(used < 1000, "settled to the real usage: {limits}");
    assert_eq!(limits["keys"][0]["source"], "shared", "{limits}");
}

/// A request larger than its key's tokens-per-minute limit is refused with a 429 that says so and
/// tells the SDKs not to retry (no wait lets it through), in process and on Redis alike; one that
/// fits is admitted.
#[tokio::test]
async fn a_request_larger_than_its_limit_is_told_not_to_retry() {
    let redis = RedisServer::start().await.expect("redis");
    let ms = manifests(None, &[("a", KEY_A, json!({"tokensPerMinute": 500}))]);
    let in_process = Gateway::start(&ms, GatewayOptions::default()).await.expect("gateway");
    let shared = Gateway::start(&ms, redis_options(&redis, &[])).await.expect("gateway");
    let client = TestClient::plain();
    let auth = format!("Bearer {KEY_A}");
    let body = |max_tokens: u64| json!({"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]});
    for gw in [&in_process, &shared] {
        let too_large =
            client.post_json(&gw.url("/v1/chat/completions"), &[("authorization", &auth)], &body(4096)).await.unwrap();
        assert_eq!(too_large.status, 429, "{}", too_large.describe());
        assert_eq!(too_large.header("x-should-retry"), Some("false"), "{}", too_large.describe());
        let message = too_large.json()["error"]["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains("Request too large") && message.contains("500"), "{message}");
        let fits =
            client.post_json(&gw.url("/v1/chat/completions"), &[("authorization", &auth)], &body(100)).await.unwrap();
        assert_eq!(fits.status, 200, "{}", fits.describe());
        assert_eq!(fits.header("x-should-retry"), None);
    }
}

/// A provider that cannot be reached never had the request: its reservation is given back.
#[tokio::test]
async fn a_request_that_never_reached_its_provider_is_not_charged() {
    let mut ms = Manifests::new();
    ms.add("providers.yaml", m::secret("upstream-key", "key", "sk-limits-upstream"));
    // Nothing listens on port 1: every connect is refused.
    ms.add(
        "providers.yaml",
        m::provider(
            "down",
            "openai-compatible",
            Some("http://127.0.0.1:1/v1"),
            Some(("upstream-key", "key")),
            &[("m", None)],
        ),
    );
    ms.add("keys.yaml", m::secret("a-key", "key", KEY_A));
    ms.add("keys.yaml", keyed("a", "a-key", json!({"tokensPerDay": 100000})));
    let gw =
        Gateway::start(&ms, GatewayOptions { log_level: "warn".into(), ..Default::default() }).await.expect("gateway");
    let client = TestClient::plain();
    let response = chat(&client, &gw, KEY_A, &[]).await;
    assert_eq!(response.status, 502, "{}", response.describe());
    let limits = client.get(&gw.admin_url("/limits?key=default/a"), &[]).await.expect("limits").json();
    assert_eq!(limits["keys"][0]["tokensPerDay"]["used"], 0, "{limits}");
}

/// Failed authentications from one address lock it out on every gateway sharing Redis; other
/// addresses are unaffected; the lockout expires.
#[tokio::test]
async fn lockout_is_shared_by_address_and_expires() {
    let redis = RedisServer::start().await.expect("redis");
    let ms = manifests(None, &[("a", KEY_A, json!({"requestsPerMinute": 1000}))]);
    let opts = redis_options(
        &redis,
        &["--trusted-proxies", "127.0.0.1/32", "--lockout-threshold", "3", "--lockout-backoff", "2"],
    );
    let a = Gateway::start(&ms, opts.clone()).await.expect("gateway a");
    let b = Gateway::start(&ms, opts).await.expect("gateway b");
    let client = TestClient::plain();
    let attacker = [("x-forwarded-for", "198.51.100.7")];
    let bystander = [("x-forwarded-for", "198.51.100.8")];
    // b has seen the attacker's address before the lockout (and remembers it was not locked).
    let before = chat(&client, &b, KEY_A, &attacker).await;
    assert_eq!(before.status, 200, "{}", before.describe());

    for _ in 0..3 {
        let r = chat(&client, &a, "pcl_wrong_key_000000000000000000000000000000", &attacker).await;
        assert_eq!(r.status, 401, "{}", r.describe());
    }
    let locked = chat(&client, &a, KEY_A, &attacker).await;
    assert_eq!(locked.status, 429, "{}", locked.describe());
    assert_eq!(locked.error_code(), Some("too_many_failed_authentications"));
    // A lockout set elsewhere reaches b within its recheck interval (`LOCKOUT_RECHECK_MS`, 100 ms).
    tokio::time::sleep(Duration::from_millis(120)).await;
    let elsewhere = chat(&client, &b, KEY_A, &attacker).await;
    assert_eq!(elsewhere.status, 429, "the lockout is shared: {}", elsewhere.describe());
    let other = chat(&client, &b, KEY_A, &bystander).await;
    assert_eq!(other.status, 200, "another address still works: {}", other.describe());

    tokio::time::sleep(Duration::from_millis(2_300)).await;
    for gw in [&a, &b] {
        let r = chat(&client, gw, KEY_A, &attacker).await;
        assert_eq!(r.status, 200, "the lockout expired: {}", r.describe());
    }
}

/// A response that ends while Redis is unreachable still settles: the correction of its
/// reservation waits with what the replica owes and goes out once Redis answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_made_while_redis_is_unreachable_is_sent_when_it_returns() {
    let redis = RedisServer::start().await.expect("redis");
    let upstream = Upstream::start(UpstreamOptions {
        response_delay: Duration::from_millis(1_500),
        input_tokens: 17,
        output_tokens: 2_000,
        ..Default::default()
    })
    .await
    .expect("upstream");
    // A budget too small for this replica to take a slice of: every request goes to Redis.
    let ms = manifests(Some(&upstream), &[("a", KEY_A, json!({"tokensPerDay": 5000}))]);
    let gw = Arc::new(Gateway::start(&ms, redis_options(&redis, &[])).await.expect("gateway"));
    let client = TestClient::plain();
    let day_used = |client: TestClient, gw: Arc<Gateway>| async move {
        let limits = client.get(&gw.admin_url("/limits?key=default/a"), &[]).await.expect("limits").json();
        limits["keys"][0]["tokensPerDay"]["used"].as_u64()
    };

    let slow = {
        let (client, gw) = (client.clone(), gw.clone());
        tokio::spawn(async move { chat(&client, &gw, KEY_A, &[]).await })
    };
    let mut reserved = None;
    for _ in 0..50 {
        reserved = day_used(client.clone(), gw.clone()).await.filter(|&used| used > 0);
        if reserved.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reserved = reserved.expect("the admission reserved tokens in Redis");
    assert!(reserved < 2_017, "reserved {reserved}: the answer will use more");
    redis.pause().expect("pause redis");
    let answer = slow.await.expect("request");
    assert_eq!(answer.status, 200, "{}", answer.describe());
    // Well after the response: the settlement was made while Redis was unreachable.
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.resume().expect("resume redis");

    let mut used = None;
    for _ in 0..100 {
        used = day_used(client.clone(), gw.clone()).await;
        if used == Some(2_017) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(used, Some(2_017), "the day budget counts the real usage, not the reservation of {reserved}");
}

/// Redis dies under load: `local` keeps limiting per replica (limit ÷ replicas), `open` admits,
/// `closed` refuses with 503; `local` and `open` never answer 5xx. When Redis returns, limits
/// are shared again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_policies_when_redis_stops_and_returns() {
    let mut redis = RedisServer::start().await.expect("redis");
    let ms = manifests(
        None,
        &[
            ("local", KEY_A, json!({"requestsPerMinute": 10, "failurePolicy": "local"})),
            ("open", KEY_B, json!({"requestsPerMinute": 10, "failurePolicy": "open"})),
            ("closed", KEY_C, json!({"requestsPerMinute": 10, "failurePolicy": "closed"})),
        ],
    );
    let gw = Arc::new(
        Gateway::start(&ms, redis_options(&redis, &["--limiter-replicas", "2", "--limiter-failure-policy", "local"]))
            .await
            .expect("gateway"),
    );
    let client = TestClient::plain();
    let statuses = |v: &[u16]| (v.iter().filter(|&&s| s == 200).count(), v.iter().filter(|&&s| s == 429).count());
    let run = |key: &'static str, n: usize| {
        let client = client.clone();
        let gw = gw.clone();
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(chat(&client, &gw, key, &[]).await.status.as_u16());
            }
            out
        }
    };
    assert_eq!(statuses(&run(KEY_A, 12).await), (10, 2), "shared limit while Redis is up");
    assert_eq!(metric(&gw, "portcullis_limiter_mode{mode=\"shared\"}").await, Some(1.0));

    // Background load on the `open` key across the outage: never a 5xx.
    let open_5xx = Arc::new(AtomicUsize::new(0));
    let open_total = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicUsize::new(0));
    let load = {
        let (client, gw, open_5xx, open_total, stop) =
            (client.clone(), gw.clone(), open_5xx.clone(), open_total.clone(), stop.clone());
        tokio::spawn(async move {
            while stop.load(Ordering::Relaxed) == 0 {
                let s = chat(&client, &gw, KEY_B, &[]).await.status.as_u16();
                open_total.fetch_add(1, Ordering::Relaxed);
                if s >= 500 {
                    open_5xx.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.kill();

    let local = run(KEY_A, 8).await;
    assert!(local.iter().all(|&s| s == 200 || s == 429), "local policy answered {local:?}");
    assert_eq!(statuses(&local), (5, 3), "local policy enforces 10 ÷ 2 replicas on its own");
    let closed = run(KEY_C, 3).await;
    assert_eq!(closed, vec![503, 503, 503], "closed policy refuses while the store is down");
    let mut mode_local = None;
    for _ in 0..20 {
        mode_local = metric(&gw, "portcullis_limiter_mode{mode=\"local\"}").await;
        if mode_local == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mode_local, Some(1.0), "the gauge says the replica runs on local limits");

    redis.start_again().await.expect("redis back");
    let mut shared = None;
    for _ in 0..100 {
        shared = metric(&gw, "portcullis_limiter_mode{mode=\"shared\"}").await;
        if shared == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(shared, Some(1.0), "limits are shared again once Redis answers");
    stop.store(1, Ordering::Relaxed);
    load.await.expect("load");
    assert_eq!(
        open_5xx.load(Ordering::Relaxed),
        0,
        "open policy never answered 5xx ({} requests)",
        open_total.load(Ordering::Relaxed)
    );
    assert!(open_total.load(Ordering::Relaxed) > 20);
    // The restarted Redis is empty: the shared window starts over and holds at 10 again.
    assert_eq!(statuses(&run(KEY_A, 12).await), (10, 2), "shared limiting resumed");
}
