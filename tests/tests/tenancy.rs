//! Tenancy: a team that may manage objects in its own namespace reaches no further. Its
//! ProviderCredential serves only its own keys (it cannot take another team's prompts by serving
//! their model at a higher priority), and its KillSwitch stops only its own keys. Objects in a
//! platform namespace (`--platform-namespace`, here `default`, where the standard set lives)
//! reach every namespace. Without the flag, local mode trusts every namespace in the folder: the
//! contrast shows the test would see a leak.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use portcullis_e2e::client::Response;
use portcullis_e2e::fixture::*;
use portcullis_e2e::manifests::{self as m, Manifests};
use portcullis_e2e::{assert, Fixture, FixtureOptions};
use serde_json::{json, Value};

const TENANT: &str = "team-a";
const TENANT_KEY: &str = "pcl_e2e_tenant_CLIENTKEY_4d6f8a0c2e4b6d8f0a2c4e6a8c";
const TENANT_ONLY_MODEL: &str = "team-a-private-model";
const TENANT_FILE: &str = "40-team-a.yaml";

fn in_tenant(mut doc: Value) -> Value {
    doc["metadata"]["namespace"] = json!(TENANT);
    doc
}

/// Team A's own key, and a mock provider of its own that claims `gpt-4o` at a priority above
/// the platform's OpenAI credential.
fn add_tenant(ms: &mut Manifests) {
    ms.add(TENANT_FILE, in_tenant(m::secret("tenant-key", "key", TENANT_KEY)))
        .add(TENANT_FILE, in_tenant(m::api_key("tenant", "tenant-key", &[])))
        .add(TENANT_FILE, {
            let mut p =
                in_tenant(m::provider("rogue", "mock", None, None, &[("gpt-4o", None), (TENANT_ONLY_MODEL, None)]));
            p["spec"]["priority"] = json!(100);
            p
        });
}

async fn start(platform: bool, customize: impl FnOnce(&mut Manifests)) -> Fixture {
    let args: &[&str] = if platform { &["--platform-namespace", "default"] } else { &[] };
    Fixture::start_with(FixtureOptions::with_args(args), |ms| {
        add_tenant(ms);
        customize(ms);
    })
    .await
    .expect("fixture")
}

fn from_mock(resp: &Response) -> bool {
    resp.headers.get("x-portcullis-mock").is_some()
}

async fn model_ids(fx: &Fixture, key: &str) -> Vec<String> {
    let resp = fx.client.get(&fx.url("/v1/models"), &[("authorization", &format!("Bearer {key}"))]).await.unwrap();
    assert::ok(&resp);
    resp.json()["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn a_tenants_provider_serves_only_its_own_namespace() {
    let fx = start(true, |_| {}).await;

    // Another namespace's key reaches the platform's provider, never the tenant's.
    let alice = fx.chat(ALICE_KEY, "gpt-4o").await.unwrap();
    assert::ok(&alice);
    assert!(!from_mock(&alice), "alice's prompt went to team-a's provider");
    assert_eq!(fx.openai.request_count(), 1);
    let unknown = fx.chat(ALICE_KEY, TENANT_ONLY_MODEL).await.unwrap();
    assert::openai_error(&unknown, 404, "model_not_found");
    let listed = model_ids(&fx, ALICE_KEY).await;
    assert!(listed.iter().any(|m| m == "gpt-4o"), "{listed:?}");
    assert!(!listed.iter().any(|m| m == TENANT_ONLY_MODEL), "alice sees team-a's model: {listed:?}");

    // The tenant's own key is routed to its own provider, which wins on priority.
    let tenant = fx.chat(TENANT_KEY, "gpt-4o").await.unwrap();
    assert::ok(&tenant);
    assert!(from_mock(&tenant), "team-a's key should reach team-a's provider");
    assert::ok(&fx.chat(TENANT_KEY, TENANT_ONLY_MODEL).await.unwrap());
    assert!(model_ids(&fx, TENANT_KEY).await.iter().any(|m| m == TENANT_ONLY_MODEL));
    // ... and still to the platform's providers for what it does not serve itself.
    let mini = fx.chat(TENANT_KEY, "gpt-4o-mini").await.unwrap();
    assert::ok(&mini);
    assert!(!from_mock(&mini));
    assert_eq!(fx.openai.request_count(), 2);
}

#[tokio::test]
async fn without_platform_namespaces_every_namespace_is_trusted() {
    // The contrast: the same manifests, every namespace trusted. Team A's provider now takes
    // alice's `gpt-4o` prompts; that is what the flag prevents.
    let fx = start(false, |_| {}).await;
    let alice = fx.chat(ALICE_KEY, "gpt-4o").await.unwrap();
    assert::ok(&alice);
    assert!(from_mock(&alice));
    assert_eq!(fx.openai.request_count(), 0);
    // Team A's model exists for alice here (alice's allowedModels refuse it).
    assert::openai_error(&fx.chat(ALICE_KEY, TENANT_ONLY_MODEL).await.unwrap(), 403, "model_not_allowed");
}

#[tokio::test]
async fn a_tenants_kill_switch_stops_only_its_own_namespace() {
    let fx = start(true, |ms| {
        ms.add(TENANT_FILE, in_tenant(m::kill_switch("team-a-stop", json!({"global": true}), true, "team-a incident")));
        ms.add(TENANT_FILE, in_tenant(m::kill_switch("team-a-mini", json!({"model": "gpt-4o-mini"}), false, "")));
    })
    .await;

    let stopped = fx.chat(TENANT_KEY, "gpt-4o-mini").await.unwrap();
    assert::openai_error(&stopped, 503, "kill_switch_active");
    assert!(stopped.json()["error"]["message"].as_str().unwrap().contains("team-a-stop"), "{}", stopped.text());
    assert::ok(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap());
    assert::ok(&fx.chat(BOB_KEY, "gpt-4o-mini").await.unwrap());

    // A model switch of the tenant's, and one on the platform's provider, likewise stop only it.
    let mut fx = fx;
    fx.reload(|ms| {
        ms.update("KillSwitch", "team-a-stop", |d| {
            d["spec"]["scope"] = json!({"provider": "default/openai-main"});
        });
        ms.update("KillSwitch", "team-a-mini", |d| d["spec"]["active"] = json!(true));
    })
    .await
    .expect("reload");
    let stopped = fx.chat(TENANT_KEY, "gpt-4o-mini").await.unwrap();
    assert::openai_error(&stopped, 503, "kill_switch_active");
    assert::ok(&fx.chat(ALICE_KEY, "gpt-4o-mini").await.unwrap());
    fx.reload(|ms| {
        ms.remove_object("KillSwitch", "team-a-mini");
    })
    .await
    .expect("reload");
    let stopped = fx.chat(TENANT_KEY, "gpt-4o").await.unwrap();
    assert::ok(&stopped);
    assert!(from_mock(&stopped), "team-a's own provider is not stopped");
    let stopped = fx.chat(TENANT_KEY, "gpt-4o-mini").await.unwrap();
    assert::openai_error(&stopped, 503, "kill_switch_active");
    assert!(stopped.json()["error"]["message"].as_str().unwrap().contains("team-a-stop"), "{}", stopped.text());
    assert::ok(&fx.chat(ALICE_KEY, "gpt-4o").await.unwrap());
    assert::ok(&fx.chat(BOB_KEY, "gpt-4o-mini").await.unwrap());
}
