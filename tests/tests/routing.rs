//! Routing and forwarding: provider keys replace client keys, model rewrites, unknown and
//! disallowed models, `/v1/models`, the Anthropic and Azure upstream shapes, other OpenAI routes,
//! hop-by-hop headers.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use portcullis_e2e::assert;
use portcullis_e2e::fixture::*;
use portcullis_e2e::upstream::RecordedRequest;
use portcullis_e2e::Fixture;
use serde_json::{json, Value};

fn assert_no_client_key(req: &RecordedRequest) {
    for key in [ALICE_KEY, BOB_KEY] {
        assert!(!req.contains_anywhere(key), "client key leaked upstream: {req:?}");
    }
}

#[tokio::test]
async fn openai_upstream_gets_provider_key_and_never_the_client_key() {
    let fx = Fixture::start().await.expect("fixture");
    let body = chat_body("gpt-4o-mini", "hi", false);
    let resp = fx.chat_with(ALICE_KEY, &body, &[]).await.unwrap();
    assert::ok(&resp);
    assert_eq!(resp.json()["choices"][0]["message"]["content"], "Hello from the loopback upstream.");
    assert_eq!(resp.json()["usage"]["prompt_tokens"], 17);

    let url = fx.url("/v1/chat/completions");
    let resp = fx.client.post_json(&url, &[("x-api-key", ALICE_KEY)], &body).await.unwrap();
    assert::ok(&resp);

    let reqs = fx.openai.requests();
    assert_eq!(reqs.len(), 2);
    for req in &reqs {
        assert_eq!(req.method, "POST");
        assert_eq!(req.path_and_query, "/v1/chat/completions");
        assert_eq!(req.header("authorization"), Some(format!("Bearer {OPENAI_PROVIDER_KEY}").as_str()));
        assert!(req.header("x-api-key").is_none(), "x-api-key must not reach an OpenAI upstream: {req:?}");
        assert_no_client_key(req);
        assert_eq!(req.json()["model"], "gpt-4o-mini");
        assert_eq!(req.json()["messages"][0]["content"], "hi", "content passes through unchanged");
    }
    assert_eq!(fx.anthropic.request_count() + fx.azure.request_count(), 0);
}

#[tokio::test]
async fn upstream_name_rewrites_the_model_sent_upstream() {
    let fx = Fixture::start().await.expect("fixture");
    let resp = fx.chat(ALICE_KEY, "gpt-alias").await.unwrap();
    assert::ok(&resp);
    let req = fx.openai.last_request().expect("upstream request");
    assert_eq!(req.json()["model"], ALIAS_UPSTREAM_NAME);
    assert!(!req.contains_anywhere("gpt-alias"), "the alias must not reach upstream: {req:?}");

    let plain = fx.chat(ALICE_KEY, "gpt-4o").await.unwrap();
    assert::ok(&plain);
    assert_eq!(fx.openai.last_request().unwrap().json()["model"], "gpt-4o");
}

#[tokio::test]
async fn unknown_model_is_404_and_disallowed_model_is_403() {
    let fx = Fixture::start().await.expect("fixture");

    let unknown = fx.chat(ALICE_KEY, "gpt-does-not-exist").await.unwrap();
    assert::openai_error(&unknown, 404, "model_not_found");

    let not_allowed = fx.chat(BOB_KEY, "gpt-4o").await.unwrap();
    assert::openai_error(&not_allowed, 403, "model_not_allowed");

    let internal = fx.chat(ALICE_KEY, "internal-only-model").await.unwrap();
    assert::openai_error(&internal, 403, "model_not_allowed");

    let allowed = fx.chat(BOB_KEY, "gpt-4o-mini").await.unwrap();
    assert::ok(&allowed);

    let unknown = fx.messages(ALICE_KEY, &messages_body("claude-nope-9", "hi", false), &[]).await.unwrap();
    assert::anthropic_error(&unknown, 404, "model_not_found", Some("not_found_error"));

    let not_allowed = fx.messages(BOB_KEY, &messages_body("claude-3-5-haiku-latest", "hi", false), &[]).await.unwrap();
    assert::anthropic_error(&not_allowed, 403, "model_not_allowed", Some("permission_error"));

    assert_eq!(fx.openai.request_count(), 1, "only the allowed request reaches upstream");
    assert_eq!(fx.anthropic.request_count(), 0);
}

/// A model name longer than any model can be named is refused in the API's own format, before
/// any model pattern runs against it, and reaches no provider.
#[tokio::test]
async fn a_model_name_longer_than_any_is_refused_before_routing() {
    let fx = Fixture::start().await.expect("fixture");
    let longest = "m".repeat(256);
    assert::openai_error(&fx.chat(ALICE_KEY, &longest).await.unwrap(), 404, "model_not_found");
    let long = fx.chat(ALICE_KEY, &format!("gpt-4o-{}", "m".repeat(250))).await.unwrap();
    assert::openai_error(&long, 400, "invalid_request");
    assert!(long.json()["error"]["message"].as_str().unwrap().contains("at most 256 bytes"), "{}", long.text());
    let long = fx.messages(ALICE_KEY, &messages_body(&"c".repeat(300), "hi", false), &[]).await.unwrap();
    assert::anthropic_error(&long, 400, "invalid_request", Some("invalid_request_error"));
    assert_eq!(fx.openai.request_count() + fx.anthropic.request_count(), 0);
}

fn model_ids(body: &Value) -> Vec<String> {
    let mut ids: Vec<String> = body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("models list needs data[]: {body}"))
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn models_list_shows_only_the_models_the_key_may_use() {
    let fx = Fixture::start().await.expect("fixture");
    let url = fx.url("/v1/models");

    let bob = fx.client.get(&url, &[("authorization", &format!("Bearer {BOB_KEY}"))]).await.unwrap();
    assert::ok(&bob);
    let body = bob.json();
    assert_eq!(body["object"], "list", "{body}");
    assert_eq!(model_ids(&body), vec!["gpt-4o-mini".to_string()]);
    for entry in body["data"].as_array().unwrap() {
        assert_eq!(entry["object"], "model", "{entry}");
    }

    let alice = fx.client.get(&url, &[("x-api-key", ALICE_KEY)]).await.unwrap();
    assert::ok(&alice);
    let ids = model_ids(&alice.json());
    for expected in
        ["gpt-4o", "gpt-4o-mini", "gpt-alias", "gpt-azure", "claude-3-5-haiku-latest", "text-embedding-3-small"]
    {
        assert!(ids.iter().any(|id| id == expected), "alice should see {expected}: {ids:?}");
    }
    assert!(!ids.iter().any(|id| id == "internal-only-model"), "alice must not see internal-only-model: {ids:?}");
    assert!(!ids.iter().any(|id| id == ALIAS_UPSTREAM_NAME), "upstream names stay hidden: {ids:?}");
    assert!(!ids.iter().any(|id| id == AZURE_DEPLOYMENT), "upstream names stay hidden: {ids:?}");

    // Counted as served, once each: not as clients gone away.
    let metrics = fx.gateway.metrics().await.expect("metrics");
    assert_eq!(metrics.sum("portcullis_requests_total", &[("route", "models"), ("outcome", "ok")]), 2.0);
    assert_eq!(metrics.sum("portcullis_requests_total", &[("outcome", "client_closed")]), 0.0);
}

#[tokio::test]
async fn anthropic_upstream_gets_x_api_key_and_version_headers() {
    let fx = Fixture::start().await.expect("fixture");
    let beta = "prompt-caching-2024-07-31";
    let resp = fx
        .messages(ALICE_KEY, &messages_body("claude-3-5-haiku-latest", "hi", false), &[("anthropic-beta", beta)])
        .await
        .unwrap();
    assert::ok(&resp);
    let body = resp.json();
    assert_eq!(body["type"], "message");
    assert_eq!(body["content"][0]["text"], "Hello from the loopback upstream.");
    assert_eq!(body["usage"]["input_tokens"], 17);

    let req = fx.anthropic.last_request().expect("anthropic upstream request");
    assert_eq!(req.path_and_query, "/v1/messages");
    assert_eq!(req.header("x-api-key"), Some(ANTHROPIC_PROVIDER_KEY));
    assert_eq!(req.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(req.header("anthropic-beta"), Some(beta));
    assert!(req.header("authorization").is_none(), "no Authorization to Anthropic: {req:?}");
    assert_no_client_key(&req);
    assert_eq!(req.json()["model"], "claude-3-5-haiku-latest");
    assert_eq!(req.json()["max_tokens"], 64);
    assert_eq!(fx.openai.request_count() + fx.azure.request_count(), 0);
}

#[tokio::test]
async fn azure_uses_deployment_url_api_version_and_api_key_header() {
    let fx = Fixture::start().await.expect("fixture");
    let resp = fx.chat(ALICE_KEY, "gpt-azure").await.unwrap();
    assert::ok(&resp);
    let req = fx.azure.last_request().expect("azure upstream request");
    assert_eq!(
        req.path_and_query,
        format!("/openai/deployments/{AZURE_DEPLOYMENT}/chat/completions?api-version={AZURE_API_VERSION}")
    );
    assert_eq!(req.header("api-key"), Some(AZURE_PROVIDER_KEY));
    assert!(req.header("authorization").is_none(), "Azure auth is the api-key header only: {req:?}");
    assert_no_client_key(&req);
    assert_eq!(fx.openai.request_count() + fx.anthropic.request_count(), 0);
}

#[tokio::test]
async fn a_client_model_under_an_azure_glob_is_one_plain_deployment_segment() {
    // Under a glob the client's `model` is the deployment name, so it goes into the URL path.
    let fx = Fixture::start_with(Default::default(), |ms| {
        ms.update("ProviderCredential", "azure-main", |p| {
            p["spec"]["models"].as_array_mut().expect("models").push(json!({"name": "gpt-azdep-*"}));
        });
    })
    .await
    .expect("fixture");
    let resp = fx.chat(ALICE_KEY, "gpt-azdep-mini.2024_08").await.unwrap();
    assert::ok(&resp);
    let req = fx.azure.last_request().expect("azure upstream request");
    assert_eq!(
        req.path_and_query,
        format!("/openai/deployments/gpt-azdep-mini.2024_08/chat/completions?api-version={AZURE_API_VERSION}")
    );
    for model in [
        "gpt-azdep-x/../../other/chat/completions",
        "gpt-azdep-x?api-version=2099-01-01-preview#",
        "gpt-azdep-x%2F..",
        "gpt-azdep-x:y",
    ] {
        let resp = fx.chat(ALICE_KEY, model).await.unwrap();
        assert::openai_error(&resp, 400, "invalid_request");
        assert!(!resp.text().contains(model), "the error does not echo the model: {model}");
    }
    assert_eq!(fx.azure.request_count(), 1, "only the plain name reached the provider");
}

#[tokio::test]
async fn embeddings_completions_and_responses_are_forwarded() {
    let fx = Fixture::start().await.expect("fixture");
    let auth = format!("Bearer {ALICE_KEY}");
    let h = [("authorization", auth.as_str())];

    let emb = fx
        .client
        .post_json(&fx.url("/v1/embeddings"), &h, &json!({"model": "text-embedding-3-small", "input": "hello"}))
        .await
        .unwrap();
    assert::ok(&emb);
    assert_eq!(emb.json()["data"][0]["object"], "embedding");
    assert_eq!(fx.openai.last_request().unwrap().path_and_query, "/v1/embeddings");

    let cmpl = fx
        .client
        .post_json(&fx.url("/v1/completions"), &h, &json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi"}))
        .await
        .unwrap();
    assert::ok(&cmpl);
    assert_eq!(cmpl.json()["choices"][0]["text"], "Hello from the loopback upstream.");
    assert_eq!(fx.openai.last_request().unwrap().path_and_query, "/v1/completions");

    let resp = fx
        .client
        .post_json(&fx.url("/v1/responses"), &h, &json!({"model": "gpt-4o", "input": "Say hi"}))
        .await
        .unwrap();
    assert::ok(&resp);
    assert_eq!(resp.json()["object"], "response");
    assert_eq!(fx.openai.last_request().unwrap().path_and_query, "/v1/responses");

    for req in fx.openai.requests() {
        assert_eq!(req.header("authorization"), Some(format!("Bearer {OPENAI_PROVIDER_KEY}").as_str()));
        assert_no_client_key(&req);
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let fx = Fixture::start().await.expect("fixture");
    let body = chat_body("gpt-4o-mini", "hi", false);
    let extra = [
        ("keep-alive", "timeout=5"),
        ("proxy-authorization", "Basic cHJveHk6c2VjcmV0"),
        ("connection", "keep-alive, X-E2E-Hop"),
        ("x-e2e-hop", "drop-me"),
    ];
    let resp = fx.chat_with(ALICE_KEY, &body, &extra).await.unwrap();
    assert::ok(&resp);
    let req = fx.openai.last_request().expect("upstream request");
    for name in ["keep-alive", "proxy-authorization", "x-e2e-hop"] {
        assert!(req.header(name).is_none(), "hop-by-hop header {name} was forwarded: {:?}", req.headers);
    }
    assert!(!req.contains_anywhere("cHJveHk6c2VjcmV0"));
    // Response side: no hop-by-hop headers from the gateway either.
    assert!(resp.header("keep-alive").is_none() && resp.header("proxy-authenticate").is_none());
}
