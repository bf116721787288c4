//! Hot reload: no request dropped while manifests change under load; revocation within about a
//! second; in-flight streams finish on their snapshot; an invalid set is rejected whole while
//! the last good snapshot keeps serving; readiness before the first snapshot.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_e2e::client::SseEvent;
use portcullis_e2e::fixture::*;
use portcullis_e2e::manifests as m;
use portcullis_e2e::{
    assert, eventually, Fixture, FixtureOptions, Gateway, GatewayOptions, TestClient, UpstreamOptions,
};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

fn toggle_model(ms: &mut m::Manifests, round: usize) {
    ms.update("ProviderCredential", "openai-main", |d| {
        let models = d["spec"]["models"].as_array_mut().unwrap();
        models.retain(|m| !m["name"].as_str().unwrap_or_default().starts_with("gpt-toggle-"));
        if round % 2 == 1 {
            models.push(json!({"name": format!("gpt-toggle-{round}")}));
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_drops_nothing_and_revocation_is_fast() {
    let opts = FixtureOptions {
        upstream: UpstreamOptions { event_delay: Duration::from_millis(40), ..Default::default() },
        ..Default::default()
    };
    let mut fx = Fixture::start_with(opts, |_| {}).await.expect("fixture");
    let client = Arc::new(TestClient::with_ca(&fx.pki).unwrap());
    let chat_url = fx.url("/v1/chat/completions");
    let msg_url = fx.url("/v1/messages");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));

    let mut workers = Vec::new();
    for worker in 0..8 {
        let (client, stop, ok, failures) = (client.clone(), stop.clone(), ok.clone(), failures.clone());
        let (chat_url, msg_url) = (chat_url.clone(), msg_url.clone());
        workers.push(tokio::spawn(async move {
            let auth = format!("Bearer {ALICE_KEY}");
            while !stop.load(Ordering::Relaxed) {
                let outcome: Result<(), String> = match worker % 4 {
                    // Streaming chat: must complete with [DONE].
                    0 => {
                        async {
                            let mut s = client
                                .post_json_streaming(
                                    &chat_url,
                                    &[("authorization", &auth)],
                                    &chat_body("gpt-4o-mini", "hi", true),
                                )
                                .await
                                .map_err(|e| e.to_string())?;
                            if s.status != 200 {
                                return Err(format!("stream status {}", s.status));
                            }
                            let events = s.collect_events(T).await.map_err(|e| e.to_string())?;
                            events
                                .last()
                                .filter(|e| e.is_done())
                                .map(|_| ())
                                .ok_or_else(|| format!("stream cut short: {events:?}"))
                        }
                        .await
                    }
                    // Anthropic streaming.
                    1 => {
                        async {
                            let mut s = client
                                .post_json_streaming(
                                    &msg_url,
                                    &[("x-api-key", ALICE_KEY), ("anthropic-version", "2023-06-01")],
                                    &messages_body("claude-3-5-haiku-latest", "hi", true),
                                )
                                .await
                                .map_err(|e| e.to_string())?;
                            let events = s.collect_events(T).await.map_err(|e| e.to_string())?;
                            (events.last().and_then(|e: &SseEvent| e.event.as_deref()) == Some("message_stop"))
                                .then_some(())
                                .ok_or_else(|| format!("anthropic stream cut short ({}): {events:?}", s.status))
                        }
                        .await
                    }
                    _ => match client
                        .post_json(&chat_url, &[("authorization", &auth)], &chat_body("gpt-4o", "hi", false))
                        .await
                    {
                        Ok(r) if r.status == 200 => Ok(()),
                        Ok(r) => Err(r.describe()),
                        Err(e) => Err(e.to_string()),
                    },
                };
                match outcome {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }

    let g0 = fx.gateway.generation().await.unwrap();
    let load_started = tokio::time::Instant::now();
    let mut reloads = 0;
    while load_started.elapsed() < Duration::from_secs(3) {
        reloads += 1;
        fx.reload(|ms| toggle_model(ms, reloads)).await.expect("reload under load");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        tokio::time::timeout(Duration::from_secs(20), w).await.expect("worker finished").unwrap();
    }
    let g1 = fx.gateway.generation().await.unwrap();
    let failures = failures.lock().unwrap().clone();
    let ok = ok.load(Ordering::Relaxed);
    eprintln!("{ok} requests ok, {} failed, {reloads} reloads, generation {g0} -> {g1}", failures.len());
    assert!(failures.is_empty(), "requests failed during hot reload: {failures:#?}");
    assert!(ok >= 40, "too little load to prove anything: {ok}");
    assert!(
        reloads >= 4 && g1 >= g0 + reloads as f64,
        "each rewrite should produce a snapshot ({g0} -> {g1}, {reloads})"
    );

    // The toggled model really changed with the reloads.
    let last_toggle_present = reloads % 2 == 1;
    let r = fx.chat(ALICE_KEY, &format!("gpt-toggle-{reloads}")).await.unwrap();
    assert_eq!(r.status == 200, last_toggle_present, "{}", r.describe());

    // Revocation through a manifest edit takes effect within about a second.
    fx.manifests.update("ApiKey", "alice", |d| d["spec"]["revoked"] = json!(true));
    let started = tokio::time::Instant::now();
    fx.gateway.write_manifests(&fx.manifests).unwrap();
    let revoked = eventually(Duration::from_secs(5), "revocation", || async {
        let r = fx.chat(ALICE_KEY, "gpt-4o").await.ok()?;
        (r.status == 401).then_some(r)
    })
    .await
    .unwrap();
    let took = started.elapsed();
    eprintln!("revocation effective after {took:?}");
    assert::openai_error(&revoked, 401, "api_key_revoked");
    assert!(took <= Duration::from_millis(1500), "revocation took {took:?}");
    assert::ok(&fx.chat(BOB_KEY, "gpt-4o-mini").await.unwrap());
}

#[tokio::test]
async fn inflight_stream_finishes_on_its_snapshot_after_revocation() {
    let mut fx = Fixture::start().await.expect("fixture");
    fx.openai.hold_last_event();
    let mut stream = fx.chat_stream(ALICE_KEY, "gpt-4o-mini").await.unwrap();
    assert_eq!(stream.status, 200);
    stream.next_event(T).await.unwrap().expect("first event");
    fx.openai.wait_held(1, T).await.unwrap();

    fx.reload(|ms| {
        ms.update("ApiKey", "alice", |d| d["spec"]["revoked"] = json!(true));
    })
    .await
    .unwrap();
    assert::openai_error(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap(), 401, "api_key_revoked");

    fx.openai.release();
    let rest = stream.collect_events(T).await.unwrap();
    assert!(rest.last().is_some_and(SseEvent::is_done), "the in-flight stream must complete: {rest:?}");
}

#[tokio::test]
async fn invalid_manifests_are_rejected_whole_and_last_good_keeps_serving() {
    let mut fx = Fixture::start().await.expect("fixture");
    let before = fx.gateway.metrics().await.unwrap();
    let g0 = before.get("portcullis_snapshot_generation", &[]).unwrap();
    let f0 = before.get("portcullis_snapshot_reload_failures_total", &[]).unwrap_or(0.0);
    assert_eq!(before.get("portcullis_snapshot_valid", &[]), Some(1.0));

    // A valid change (new model) bundled with an invalid object (missing Secret).
    fx.manifests.update("ProviderCredential", "openai-main", |d| {
        d["spec"]["models"].as_array_mut().unwrap().push(json!({"name": "gpt-brand-new"}));
    });
    fx.manifests.add(
        PROVIDERS_FILE,
        m::provider(
            "broken-provider",
            "openai",
            Some("https://127.0.0.1:1/v1"),
            Some(("no-such-secret", "key")),
            &[("gpt-broken", None)],
        ),
    );
    fx.gateway.write_manifests(&fx.manifests).unwrap();

    let after = eventually(Duration::from_secs(5), "reload failure to be counted", || async {
        let m = fx.gateway.metrics().await.ok()?;
        (m.get("portcullis_snapshot_reload_failures_total", &[]).unwrap_or(0.0) > f0).then_some(m)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", fx.gateway.logs()));
    assert_eq!(after.get("portcullis_snapshot_valid", &[]), Some(0.0), "snapshot_valid must drop to 0");
    assert_eq!(after.get("portcullis_snapshot_generation", &[]), Some(g0), "generation must not move");

    assert::ok(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap());
    assert::openai_error(&fx.chat(ALICE_KEY, "gpt-brand-new").await.unwrap(), 404, "model_not_found");
    assert::openai_error(&fx.chat(ALICE_KEY, "gpt-broken").await.unwrap(), 404, "model_not_found");
    let ready = fx.client.get(&fx.gateway.admin_url("/readyz"), &[]).await.unwrap();
    assert_eq!(ready.status, 200, "a gateway serving its last good snapshot stays ready");

    let logs = fx.gateway.logs();
    assert!(
        logs.lines().any(|l| l.contains("broken-provider") && l.contains("secretRef")),
        "a log line must name the object and field; logs:\n{logs}"
    );

    // Malformed YAML is rejected too.
    let f1 = after.get("portcullis_snapshot_reload_failures_total", &[]).unwrap();
    fx.manifests.set_raw("99-garbage.yaml", "apiVersion: v1\nkind: [unterminated\n  : :\n");
    fx.gateway.write_manifests(&fx.manifests).unwrap();
    eventually(Duration::from_secs(5), "second reload failure", || async {
        let m = fx.gateway.metrics().await.ok()?;
        (m.get("portcullis_snapshot_reload_failures_total", &[]).unwrap_or(0.0) > f1).then_some(())
    })
    .await
    .unwrap();
    assert::ok(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap());

    // Fixing everything brings the new model and a valid snapshot.
    fx.manifests.remove_file("99-garbage.yaml");
    fx.manifests.remove_object("ProviderCredential", "broken-provider");
    fx.gateway.write_manifests(&fx.manifests).unwrap();
    fx.gateway.wait_generation_above(g0, Duration::from_secs(5)).await.unwrap();
    let fixed = fx.gateway.metrics().await.unwrap();
    assert_eq!(fixed.get("portcullis_snapshot_valid", &[]), Some(1.0));
    assert::ok(&fx.chat(ALICE_KEY, "gpt-brand-new").await.unwrap());
}

#[tokio::test]
async fn not_ready_until_a_valid_snapshot_loads() {
    let mut ms = m::Manifests::new();
    ms.add("00-secrets.yaml", m::secret("alice-key", "key", ALICE_KEY));
    ms.add("10-keys.yaml", m::api_key("alice", "alice-key", &[]));
    ms.add("20-providers.yaml", m::provider("mock", "mock", None, None, &[("gpt-4o-mini", None)]));
    // The referenced Secret is missing: the first snapshot cannot compile.
    ms.add("10-keys.yaml", m::api_key("ghost", "ghost-key", &[]));
    let mut gw = Gateway::start(&ms, GatewayOptions { wait_ready: false, ..Default::default() }).await.unwrap();
    let client = TestClient::plain();

    let health =
        eventually(T, "healthz", || async { client.get(&gw.admin_url("/healthz"), &[]).await.ok() }).await.unwrap();
    assert_eq!(health.status, 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let ready = client.get(&gw.admin_url("/readyz"), &[]).await.unwrap();
    assert_eq!(ready.status, 503, "not ready without any valid snapshot");

    ms.remove_object("ApiKey", "ghost");
    gw.write_manifests(&ms).unwrap();
    gw.wait_ready(Duration::from_secs(5)).await.unwrap();
    let auth = format!("Bearer {ALICE_KEY}");
    let r = client
        .post_json(&gw.url("/v1/chat/completions"), &[("authorization", &auth)], &chat_body("gpt-4o-mini", "hi", false))
        .await
        .unwrap();
    assert::ok(&r);
}

/// The threads of a running process, from `/proc` (Linux).
fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count)
}

/// A single-worker data plane is one thread once start-up is over, while local mode goes on
/// watching its folder and a reload's compile borrows a blocking thread only for a moment. (A
/// second thread sharing the file table makes the kernel take a reference on the socket's file
/// in every syscall.)
#[tokio::test]
async fn a_single_worker_watching_its_folder_runs_on_one_thread() {
    let options = FixtureOptions::with_args(&["--worker-threads", "1"]);
    let mut fx = Fixture::start_with(options, |_| {}).await.expect("fixture");
    let pid = fx.gateway.pid();
    let one_thread = |what: &'static str| {
        eventually(Duration::from_secs(8), what, move || async move { (thread_count(pid) == 1).then_some(()) })
    };
    one_thread("one thread after start-up").await.unwrap_or_else(|e| panic!("{e}: {} threads", thread_count(pid)));
    assert::ok(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap());

    // A reload still happens (compiled on a blocking thread), and that thread leaves again.
    fx.manifests.update("ProviderCredential", "openai-main", |d| {
        d["spec"]["models"].as_array_mut().unwrap().push(json!({"name": "gpt-one-thread"}));
    });
    fx.gateway.reload(&fx.manifests).await.unwrap_or_else(|e| panic!("{e}; logs:\n{}", fx.gateway.logs()));
    assert::ok(&fx.chat(ALICE_KEY, "gpt-one-thread").await.unwrap());
    one_thread("one thread again after a reload")
        .await
        .unwrap_or_else(|e| panic!("{e}: {} threads", thread_count(pid)));
}
