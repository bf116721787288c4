//! Kill switches: global, provider-, model- and key-scoped; 503 `kill_switch_active` naming the
//! switch, in both formats, before any upstream call; flipping one takes effect within a second.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use portcullis_e2e::client::Response;
use portcullis_e2e::fixture::*;
use portcullis_e2e::manifests as m;
use portcullis_e2e::{assert, eventually, Fixture};
use serde_json::{json, Value};

#[track_caller]
fn assert_killed(resp: &Response, switch: &str) {
    assert::openai_error(resp, 503, "kill_switch_active");
    let msg = resp.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains(switch), "message should name the switch {switch}: {msg}");
}

#[track_caller]
fn assert_killed_anthropic(resp: &Response, switch: &str) {
    assert::anthropic_error(resp, 503, "kill_switch_active", None);
    let msg = resp.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains(switch), "message should name the switch {switch}: {msg}");
}

async fn with_switch(name: &str, scope: Value) -> Fixture {
    let name = name.to_string();
    Fixture::start_with(Default::default(), move |ms| {
        ms.add(SWITCHES_FILE, m::kill_switch(&name, scope, true, "e2e incident 42"));
    })
    .await
    .expect("fixture")
}

#[tokio::test]
async fn active_global_switch_refuses_everything_and_names_itself() {
    let fx = Fixture::start_with(Default::default(), |ms| {
        ms.update("KillSwitch", "emergency-stop", |d| d["spec"]["active"] = json!(true));
    })
    .await
    .expect("fixture");

    assert_killed(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap(), "emergency-stop");
    assert_killed(&fx.chat(BOB_KEY, "gpt-4o-mini").await.unwrap(), "emergency-stop");
    assert_killed(&fx.chat(ALICE_KEY, "gpt-azure").await.unwrap(), "emergency-stop");
    let msg = messages_body("claude-3-5-haiku-latest", "hi", false);
    assert_killed_anthropic(&fx.messages(ALICE_KEY, &msg, &[]).await.unwrap(), "emergency-stop");
    let auth = format!("Bearer {ALICE_KEY}");
    let emb = fx
        .client
        .post_json(
            &fx.url("/v1/embeddings"),
            &[("authorization", &auth)],
            &json!({"model": "text-embedding-3-small", "input": "x"}),
        )
        .await
        .unwrap();
    assert_killed(&emb, "emergency-stop");
    let mut stream = chat_body("gpt-4o-mini", "hi", true);
    stream["stream"] = json!(true);
    assert_killed(&fx.chat_with(ALICE_KEY, &stream, &[]).await.unwrap(), "emergency-stop");

    // Authentication still comes first.
    assert::openai_error(&fx.chat(UNKNOWN_KEY, "gpt-4o-mini").await.unwrap(), 401, "invalid_api_key");

    assert_eq!(fx.openai.request_count() + fx.anthropic.request_count() + fx.azure.request_count(), 0);
}

#[tokio::test]
async fn provider_scoped_switch_stops_only_that_provider() {
    let fx = with_switch("stop-openai", json!({"provider": "openai-main"})).await;
    assert_killed(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap(), "stop-openai");
    assert_killed(&fx.chat(ALICE_KEY, "gpt-alias").await.unwrap(), "stop-openai");
    assert::ok(&fx.chat(ALICE_KEY, "gpt-azure").await.unwrap());
    assert::ok(&fx.messages(ALICE_KEY, &messages_body("claude-3-5-haiku-latest", "hi", false), &[]).await.unwrap());
    assert_eq!(fx.openai.request_count(), 0);
}

#[tokio::test]
async fn model_scoped_switch_stops_matching_models() {
    let fx = Fixture::start_with(Default::default(), |ms| {
        ms.add(SWITCHES_FILE, m::kill_switch("stop-mini", json!({"model": "gpt-4o-mini"}), true, "e2e"));
        ms.add(SWITCHES_FILE, m::kill_switch("stop-claude", json!({"model": "claude-*"}), true, "e2e"));
    })
    .await
    .expect("fixture");
    assert_killed(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap(), "stop-mini");
    assert_killed(&fx.chat(BOB_KEY, "gpt-4o-mini").await.unwrap(), "stop-mini");
    assert::ok(&fx.chat(ALICE_KEY, "gpt-4o").await.unwrap());
    let msg = messages_body("claude-sonnet-4-0", "hi", false);
    assert_killed_anthropic(&fx.messages(ALICE_KEY, &msg, &[]).await.unwrap(), "stop-claude");
    assert_eq!(fx.anthropic.request_count(), 0);
    assert_eq!(fx.openai.request_count(), 1);
}

/// A model switch also stops the model under the name a provider is sent: a request for an
/// alias of the stopped model does not reach it.
#[tokio::test]
async fn model_scoped_switch_stops_aliases_of_the_model() {
    let fx = with_switch("stop-snapshot", json!({"model": ALIAS_UPSTREAM_NAME})).await;
    assert_killed(&fx.chat(ALICE_KEY, "gpt-alias").await.unwrap(), "stop-snapshot");
    assert::ok(&fx.chat(ALICE_KEY, "gpt-4o").await.unwrap());
    assert_eq!(fx.openai.request_count(), 1);
    // A pattern too, and on a stream.
    let fx = with_switch("stop-dated", json!({"model": "gpt-4o-2024-*"})).await;
    let mut stream = chat_body("gpt-alias", "hi", true);
    stream["stream"] = json!(true);
    assert_killed(&fx.chat_with(ALICE_KEY, &stream, &[]).await.unwrap(), "stop-dated");
    assert_eq!(fx.openai.request_count(), 0);
}

#[tokio::test]
async fn key_scoped_switch_stops_only_that_key() {
    let fx = with_switch("stop-bob", json!({"apiKey": "bob"})).await;
    assert_killed(&fx.chat(BOB_KEY, "gpt-4o-mini").await.unwrap(), "stop-bob");
    assert::ok(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap());
}

#[tokio::test]
async fn namespace_scoped_switch_stops_every_key_in_it() {
    let fx = with_switch("stop-default-ns", json!({"namespace": "default"})).await;
    assert_killed(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap(), "stop-default-ns");
    assert_killed(&fx.chat(BOB_KEY, "gpt-4o-mini").await.unwrap(), "stop-default-ns");
    assert_eq!(fx.openai.request_count(), 0);
}

#[tokio::test]
async fn flipping_a_switch_takes_effect_within_a_second_both_ways() {
    let mut fx = Fixture::start().await.expect("fixture");
    assert::ok(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap());

    fx.manifests.update("KillSwitch", "emergency-stop", |d| d["spec"]["active"] = json!(true));
    let started = tokio::time::Instant::now();
    fx.gateway.write_manifests(&fx.manifests).unwrap();
    let killed = eventually(Duration::from_secs(5), "kill switch to take effect", || async {
        let r = fx.chat(ALICE_KEY, "gpt-4o-mini").await.ok()?;
        (r.status == 503).then_some(r)
    })
    .await
    .unwrap();
    let on = started.elapsed();
    assert_killed(&killed, "emergency-stop");

    fx.manifests.update("KillSwitch", "emergency-stop", |d| d["spec"]["active"] = json!(false));
    let started = tokio::time::Instant::now();
    fx.gateway.write_manifests(&fx.manifests).unwrap();
    eventually(Duration::from_secs(5), "kill switch to be lifted", || async {
        let r = fx.chat(ALICE_KEY, "gpt-4o-mini").await.ok()?;
        (r.status == 200).then_some(())
    })
    .await
    .unwrap();
    let off = started.elapsed();
    eprintln!("kill switch on after {on:?}, off after {off:?}");
    assert!(on <= Duration::from_millis(1500), "switching on took {on:?}");
    assert!(off <= Duration::from_millis(1500), "switching off took {off:?}");
}
