//! The standard setup: a test PKI, HTTPS upstreams for OpenAI, Anthropic and Azure OpenAI,
//! a manifest set with several keys, and a gateway trusting the test CA for upstream TLS.

use std::time::Duration;

use serde_json::{json, Value};

use crate::client::{Response, StreamingResponse, TestClient};
use crate::gateway::{Gateway, GatewayOptions};
use crate::manifests::{self as m, Manifests};
use crate::pki::TestPki;
use crate::upstream::{Upstream, UpstreamOptions};

/// Provider key the OpenAI upstream expects (`Authorization: Bearer …`).
pub const OPENAI_PROVIDER_KEY: &str = "sk-e2e-openai-PROVIDERKEY-7f3a9c21d4e8b650a1c2";
/// Provider key the Anthropic upstream expects (`x-api-key`).
pub const ANTHROPIC_PROVIDER_KEY: &str = "sk-ant-e2e-PROVIDERKEY-2b8e41c09d7f3a65e0f1";
/// Provider key the Azure upstream expects (`api-key`).
pub const AZURE_PROVIDER_KEY: &str = "azure-e2e-PROVIDERKEY-5c1d9e7a3b2f8064d4c3";

/// Client key of `alice`: models `gpt-*`, `claude-*`, `text-embedding-*`.
pub const ALICE_KEY: &str = "pcl_e2e_alice_CLIENTKEY_3f9a1c7e5b2d8046a9c1e3f5";
/// Client key of `bob`: only `gpt-4o-mini`.
pub const BOB_KEY: &str = "pcl_e2e_bob_CLIENTKEY_8e2c4a6f1d3b5079e2d4f6a8b0";
/// Client key of `carol`: revoked.
pub const CAROL_REVOKED_KEY: &str = "pcl_e2e_carol_CLIENTKEY_1a3c5e7f9b2d4068c1e3a5b7";
/// Client key of `dave`: expired.
pub const DAVE_EXPIRED_KEY: &str = "pcl_e2e_dave_CLIENTKEY_6b8d0f2a4c6e8013f5a7c9e1";
/// A well-formed key nobody holds.
pub const UNKNOWN_KEY: &str = "pcl_e2e_nobody_CLIENTKEY_0000111122223333444455";

pub const SECRETS_FILE: &str = "00-secrets.yaml";
pub const PROVIDERS_FILE: &str = "10-providers.yaml";
pub const KEYS_FILE: &str = "20-keys.yaml";
pub const SWITCHES_FILE: &str = "30-killswitches.yaml";

/// Upstream name the alias `gpt-alias` is rewritten to.
pub const ALIAS_UPSTREAM_NAME: &str = "gpt-4o-2024-08-06";
/// Azure deployment behind `gpt-azure`.
pub const AZURE_DEPLOYMENT: &str = "e2e-azure-deployment";
pub const AZURE_API_VERSION: &str = "2024-10-21";

/// Knobs for [`Fixture::start_with`].
#[derive(Clone, Debug, Default)]
pub struct FixtureOptions {
    pub gateway: GatewayOptions,
    /// Serve HTTPS on the gateway listener with the test certificate.
    pub listener_tls: bool,
    /// Do not pass `--upstream-ca` (the upstreams' certificate is then untrusted).
    pub no_upstream_ca: bool,
    pub upstream: UpstreamOptions,
}

impl FixtureOptions {
    /// The defaults, with these command-line flags added to the gateway's.
    pub fn with_args(args: &[&str]) -> Self {
        Self { gateway: GatewayOptions::with_args(args), ..Self::default() }
    }
}

/// A running standard setup.
#[derive(Debug)]
pub struct Fixture {
    pub pki: TestPki,
    pub openai: Upstream,
    pub anthropic: Upstream,
    pub azure: Upstream,
    pub manifests: Manifests,
    pub gateway: Gateway,
    pub client: TestClient,
}

/// The standard manifest set for the given upstreams.
pub fn standard_manifests(openai: &Upstream, anthropic: &Upstream, azure: &Upstream) -> Manifests {
    let mut ms = Manifests::new();
    ms.add(SECRETS_FILE, m::secret("openai-upstream-key", "key", OPENAI_PROVIDER_KEY))
        .add(SECRETS_FILE, m::secret_data("anthropic-upstream-key", "key", ANTHROPIC_PROVIDER_KEY))
        .add(SECRETS_FILE, m::secret("azure-upstream-key", "key", AZURE_PROVIDER_KEY))
        .add(SECRETS_FILE, m::secret("alice-key", "key", ALICE_KEY))
        .add(SECRETS_FILE, m::secret_data("bob-key", "key", BOB_KEY))
        .add(SECRETS_FILE, m::secret("carol-key", "key", CAROL_REVOKED_KEY))
        .add(SECRETS_FILE, m::secret("dave-key", "key", DAVE_EXPIRED_KEY));
    ms.add(
        PROVIDERS_FILE,
        m::provider(
            "openai-main",
            "openai",
            Some(&openai.base_url_v1()),
            Some(("openai-upstream-key", "key")),
            &[
                ("gpt-4o", None),
                ("gpt-4o-mini", None),
                ("gpt-alias", Some(ALIAS_UPSTREAM_NAME)),
                ("gpt-3.5-turbo-instruct", None),
                ("text-embedding-3-small", None),
                ("internal-only-model", None),
            ],
        ),
    )
    .add(
        PROVIDERS_FILE,
        m::provider(
            "anthropic-main",
            "anthropic",
            Some(&anthropic.base_url_v1()),
            Some(("anthropic-upstream-key", "key")),
            &[("claude-3-5-haiku-latest", None), ("claude-sonnet-4-0", None)],
        ),
    )
    .add(PROVIDERS_FILE, {
        let mut p = m::provider(
            "azure-main",
            "azure-openai",
            Some(&format!("{}/openai", azure.origin())),
            Some(("azure-upstream-key", "key")),
            &[("gpt-azure", Some(AZURE_DEPLOYMENT))],
        );
        p["spec"]["azure"] = json!({"apiVersion": AZURE_API_VERSION});
        p
    });
    ms.add(KEYS_FILE, m::api_key("alice", "alice-key", &["gpt-*", "claude-*", "text-embedding-*"]))
        .add(KEYS_FILE, m::api_key("bob", "bob-key", &["gpt-4o-mini"]))
        .add(KEYS_FILE, {
            let mut k = m::api_key("carol", "carol-key", &[]);
            k["spec"]["revoked"] = json!(true);
            k
        })
        .add(KEYS_FILE, {
            let mut k = m::api_key("dave", "dave-key", &[]);
            k["spec"]["expiresAt"] = json!("2020-01-01T00:00:00Z");
            k
        });
    ms.add(SWITCHES_FILE, m::kill_switch("emergency-stop", json!({"global": true}), false, "e2e standby"));
    ms
}

impl Fixture {
    /// Standard setup with default options.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(FixtureOptions::default(), |_| {}).await
    }

    /// Standard setup; `customize` may edit the manifests before the gateway starts.
    pub async fn start_with(options: FixtureOptions, customize: impl FnOnce(&mut Manifests)) -> anyhow::Result<Self> {
        let pki = TestPki::new()?;
        let tls = pki.server_config(&[b"h2", b"http/1.1"])?;
        let openai = Upstream::start_tls(options.upstream.clone(), tls.clone()).await?;
        let anthropic = Upstream::start_tls(options.upstream.clone(), tls.clone()).await?;
        let azure = Upstream::start_tls(options.upstream.clone(), tls).await?;
        let mut manifests = standard_manifests(&openai, &anthropic, &azure);
        customize(&mut manifests);
        let mut gw_options = options.gateway.clone();
        if !options.no_upstream_ca {
            gw_options.upstream_ca = Some(pki.ca_path());
        }
        if options.listener_tls {
            gw_options.tls = Some((pki.server_cert_path(), pki.server_key_path()));
        }
        let gateway = Gateway::start(&manifests, gw_options).await?;
        let client = TestClient::with_ca(&pki)?;
        Ok(Self { pki, openai, anthropic, azure, manifests, gateway, client })
    }

    pub fn url(&self, path: &str) -> String {
        self.gateway.url(path)
    }

    /// Edits the manifests, writes them and waits for the new snapshot.
    pub async fn reload(&mut self, edit: impl FnOnce(&mut Manifests)) -> anyhow::Result<Duration> {
        edit(&mut self.manifests);
        self.gateway.reload(&self.manifests).await
    }

    /// `POST /v1/chat/completions` with `Authorization: Bearer key`.
    pub async fn chat(&self, key: &str, model: &str) -> anyhow::Result<Response> {
        self.chat_with(key, &chat_body(model, "Say hello.", false), &[]).await
    }

    /// `POST /v1/chat/completions` with a given body and extra headers.
    pub async fn chat_with(&self, key: &str, body: &Value, extra: &[(&str, &str)]) -> anyhow::Result<Response> {
        let auth = format!("Bearer {key}");
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        self.client.post_json(&self.url("/v1/chat/completions"), &headers, body).await
    }

    /// `POST /v1/messages` with `x-api-key: key` and `anthropic-version`.
    pub async fn messages(&self, key: &str, body: &Value, extra: &[(&str, &str)]) -> anyhow::Result<Response> {
        let mut headers = vec![("x-api-key", key), ("anthropic-version", "2023-06-01")];
        headers.extend_from_slice(extra);
        self.client.post_json(&self.url("/v1/messages"), &headers, body).await
    }

    /// Opens a streaming `POST /v1/chat/completions` ("hi" to `model`); the caller checks the status.
    pub async fn chat_stream(&self, key: &str, model: &str) -> anyhow::Result<StreamingResponse> {
        let auth = format!("Bearer {key}");
        let url = self.url("/v1/chat/completions");
        self.client.post_json_streaming(&url, &[("authorization", &auth)], &chat_body(model, "hi", true)).await
    }

    /// Opens a streaming `POST /v1/messages` ("hi" to `model`); the caller checks the status.
    pub async fn messages_stream(&self, key: &str, model: &str) -> anyhow::Result<StreamingResponse> {
        let headers = [("x-api-key", key), ("anthropic-version", "2023-06-01")];
        self.client.post_json_streaming(&self.url("/v1/messages"), &headers, &messages_body(model, "hi", true)).await
    }
}

/// An OpenAI chat request body.
pub fn chat_body(model: &str, prompt: &str, stream: bool) -> Value {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": prompt}]});
    if stream {
        body["stream"] = json!(true);
    }
    body
}

/// An Anthropic messages request body.
pub fn messages_body(model: &str, prompt: &str, stream: bool) -> Value {
    let mut body = json!({"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": prompt}]});
    if stream {
        body["stream"] = json!(true);
    }
    body
}
