//! Client authentication: Bearer and x-api-key; missing, unknown, revoked and expired keys in
//! OpenAI and Anthropic error formats; expiry taking effect without a reload.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use portcullis_e2e::assert;
use portcullis_e2e::fixture::*;
use portcullis_e2e::manifests as m;
use portcullis_e2e::Fixture;
use serde_json::json;

#[tokio::test]
async fn bearer_and_x_api_key_both_authenticate_on_both_apis() {
    let fx = Fixture::start().await.expect("fixture");
    let body = chat_body("gpt-4o-mini", "hi", false);

    let bearer = fx.chat_with(ALICE_KEY, &body, &[]).await.unwrap();
    assert::ok(&bearer);
    assert_eq!(bearer.json()["choices"][0]["message"]["content"], "Hello from the loopback upstream.");

    let url = fx.url("/v1/chat/completions");
    let x_api_key = fx.client.post_json(&url, &[("x-api-key", ALICE_KEY)], &body).await.unwrap();
    assert::ok(&x_api_key);

    let msg = messages_body("claude-3-5-haiku-latest", "hi", false);
    let anthropic = fx.messages(ALICE_KEY, &msg, &[]).await.unwrap();
    assert::ok(&anthropic);
    assert_eq!(anthropic.json()["content"][0]["text"], "Hello from the loopback upstream.");

    let bearer_auth = format!("Bearer {ALICE_KEY}");
    let anthropic_bearer = fx
        .client
        .post_json(
            &fx.url("/v1/messages"),
            &[("authorization", &bearer_auth), ("anthropic-version", "2023-06-01")],
            &msg,
        )
        .await
        .unwrap();
    assert::ok(&anthropic_bearer);

    assert_eq!(fx.openai.request_count(), 2);
    assert_eq!(fx.anthropic.request_count(), 2);
}

const MISSING_KEY_CODES: [&str; 2] = ["invalid_api_key", "missing_api_key"];

#[tokio::test]
async fn missing_and_unknown_keys_are_401_invalid_api_key() {
    let fx = Fixture::start().await.expect("fixture");
    let chat = chat_body("gpt-4o-mini", "hi", false);
    let msg = messages_body("claude-3-5-haiku-latest", "hi", false);
    let chat_url = fx.url("/v1/chat/completions");
    let msg_url = fx.url("/v1/messages");

    // The contract names codes for unknown, expired and revoked keys; a missing key may use the
    // unknown-key code or the more specific `missing_api_key`.
    let none = fx.client.post_json(&chat_url, &[], &chat).await.unwrap();
    let code = none.error_code().unwrap_or_default().to_string();
    assert!(MISSING_KEY_CODES.contains(&code.as_str()), "{}", none.describe());
    assert::openai_error(&none, 401, &code);

    let unknown = fx.chat_with(UNKNOWN_KEY, &chat, &[]).await.unwrap();
    assert::openai_error(&unknown, 401, "invalid_api_key");
    assert!(!unknown.text().contains(UNKNOWN_KEY), "error must not echo the presented key: {}", unknown.text());

    let garbage = fx.client.post_json(&chat_url, &[("authorization", "Bearer x")], &chat).await.unwrap();
    assert::openai_error(&garbage, 401, "invalid_api_key");

    let basic = fx.client.post_json(&chat_url, &[("authorization", "Basic dXNlcjpwYXNz")], &chat).await.unwrap();
    let code = basic.error_code().unwrap_or_default().to_string();
    assert!(MISSING_KEY_CODES.contains(&code.as_str()), "{}", basic.describe());
    assert::openai_error(&basic, 401, &code);

    let models = fx.client.get(&fx.url("/v1/models"), &[]).await.unwrap();
    let code = models.error_code().unwrap_or_default().to_string();
    assert!(MISSING_KEY_CODES.contains(&code.as_str()), "{}", models.describe());
    assert::openai_error(&models, 401, &code);

    let none = fx.client.post_json(&msg_url, &[("anthropic-version", "2023-06-01")], &msg).await.unwrap();
    let code = none.error_code().unwrap_or_default().to_string();
    assert!(MISSING_KEY_CODES.contains(&code.as_str()), "{}", none.describe());
    assert::anthropic_error(&none, 401, &code, Some("authentication_error"));

    let unknown = fx.messages(UNKNOWN_KEY, &msg, &[]).await.unwrap();
    assert::anthropic_error(&unknown, 401, "invalid_api_key", Some("authentication_error"));
    assert!(!unknown.text().contains(UNKNOWN_KEY));

    // A provider key is not a client key.
    let provider_key = fx.chat_with(OPENAI_PROVIDER_KEY, &chat, &[]).await.unwrap();
    assert::openai_error(&provider_key, 401, "invalid_api_key");

    assert_eq!(fx.openai.request_count(), 0, "rejected requests must not reach upstream");
    assert_eq!(fx.anthropic.request_count(), 0, "rejected requests must not reach upstream");
}

#[tokio::test]
async fn revoked_and_expired_keys_are_401_with_specific_codes() {
    let fx = Fixture::start().await.expect("fixture");
    let chat = chat_body("gpt-4o-mini", "hi", false);
    let msg = messages_body("claude-3-5-haiku-latest", "hi", false);

    let revoked = fx.chat_with(CAROL_REVOKED_KEY, &chat, &[]).await.unwrap();
    assert::openai_error(&revoked, 401, "api_key_revoked");
    let revoked = fx.messages(CAROL_REVOKED_KEY, &msg, &[]).await.unwrap();
    assert::anthropic_error(&revoked, 401, "api_key_revoked", Some("authentication_error"));

    let expired = fx.chat_with(DAVE_EXPIRED_KEY, &chat, &[]).await.unwrap();
    assert::openai_error(&expired, 401, "api_key_expired");
    let expired = fx.messages(DAVE_EXPIRED_KEY, &msg, &[]).await.unwrap();
    assert::anthropic_error(&expired, 401, "api_key_expired", Some("authentication_error"));

    let url = fx.url("/v1/chat/completions");
    let via_header = fx.client.post_json(&url, &[("x-api-key", CAROL_REVOKED_KEY)], &chat).await.unwrap();
    assert::openai_error(&via_header, 401, "api_key_revoked");

    assert_eq!(fx.openai.request_count() + fx.anthropic.request_count(), 0);
}

#[tokio::test]
async fn key_expires_while_running_without_any_reload() {
    const EPHEMERAL_KEY: &str = "pcl_e2e_erin_CLIENTKEY_ephemeral_5d7f9b1c3e5a7092";
    let expires = chrono::Utc::now() + chrono::Duration::seconds(3);
    let expires = expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let fx = Fixture::start_with(Default::default(), |ms| {
        ms.add(SECRETS_FILE, m::secret("erin-key", "key", EPHEMERAL_KEY));
        let mut key = m::api_key("erin", "erin-key", &["gpt-*"]);
        key["spec"]["expiresAt"] = json!(expires);
        ms.add(KEYS_FILE, key);
    })
    .await
    .expect("fixture");

    let first = fx.chat(EPHEMERAL_KEY, "gpt-4o-mini").await.unwrap();
    assert::ok(&first);
    let generation = fx.gateway.generation().await.unwrap();

    let started = tokio::time::Instant::now();
    let expired = portcullis_e2e::eventually(Duration::from_secs(8), "key expiry", || async {
        let r = fx.chat(EPHEMERAL_KEY, "gpt-4o-mini").await.ok()?;
        (r.status == 401).then_some(r)
    })
    .await
    .expect("the key must stop working after expiresAt");
    assert::openai_error(&expired, 401, "api_key_expired");
    assert!(started.elapsed() < Duration::from_secs(6), "expiry took {:?}", started.elapsed());
    assert_eq!(fx.gateway.generation().await.unwrap(), generation, "expiry must not need a new snapshot");
}

#[tokio::test]
async fn yml_files_and_base64_secret_data_are_read() {
    const YML_KEY: &str = "pcl_e2e_frank_CLIENTKEY_yml_file_8c0e2a4b6d8f1379";
    let fx = Fixture::start_with(Default::default(), |ms| {
        ms.add("50-frank.yml", m::secret_data("frank-key", "key", YML_KEY));
        ms.add("50-frank.yml", m::api_key("frank", "frank-key", &["gpt-4o-mini"]));
    })
    .await
    .expect("fixture");
    assert::ok(&fx.chat(YML_KEY, "gpt-4o-mini").await.unwrap());
    // bob's key and the Anthropic provider key come from base64 `data` too.
    assert::ok(&fx.chat(BOB_KEY, "gpt-4o-mini").await.unwrap());
}
