//! Table tests for `compile` over YAML manifests, as a platform engineer would write them.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use portcullis_crds::digest::Pepper;
use portcullis_crds::sealing::{KeyId, MasterKey, MasterKeyring, SealingError};
use portcullis_crds::secret::SecretBytes;
use portcullis_crds::snapshot::{GatewaySnapshot, SwitchScope};
use portcullis_operator::manifests::{add_yaml, ReadSummary};
use portcullis_operator::{compile, CompileInputs, Tenancy};

const PROVIDER_KEY: &str = "sk-provider-CANARY-7f3e9a";
const CLIENT_KEY: &str = "pcl_client-CANARY-0123456789abcdefghijklmnop";

fn base() -> String {
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: openai-key, namespace: team-a}}
stringData: {{apiKey: "{PROVIDER_KEY}\n"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: alice-key, namespace: team-a}}
data: {{key: "{client_b64}"}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ProviderCredential
metadata: {{name: openai, namespace: team-a}}
spec:
  kind: openai
  secretRef: {{name: openai-key, key: apiKey}}
  models: [{{name: gpt-4o}}, {{name: fast, upstreamName: gpt-4o-mini}}]
---
apiVersion: portcullis.dev/v1alpha1
kind: ProviderCredential
metadata: {{name: mock, namespace: team-a}}
spec:
  kind: mock
  models: [{{name: "mock-*"}}]
---
apiVersion: portcullis.dev/v1alpha1
kind: ApiKey
metadata: {{name: alice, namespace: team-a}}
spec:
  owner: alice@example.com
  allowedModels: ["gpt-*"]
  secretRef: {{name: alice-key, key: key}}
---
apiVersion: portcullis.dev/v1alpha1
kind: KillSwitch
metadata: {{name: stop-openai, namespace: team-a}}
spec:
  scope: {{provider: openai}}
  active: true
  reason: incident 42
---
apiVersion: v1
kind: Namespace
metadata: {{name: ignored}}
"#,
        client_b64 = base64_encode(CLIENT_KEY.as_bytes())
    )
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn inputs(yaml: &str) -> CompileInputs {
    let mut inputs = CompileInputs::default();
    let mut summary = ReadSummary::default();
    add_yaml(&mut inputs, yaml, "test.yaml", &mut summary).expect("parse manifests");
    inputs
}

fn keyring(id: &str) -> MasterKeyring {
    MasterKeyring::generate(KeyId::new(id).expect("id")).expect("keyring")
}

fn pepper() -> Pepper {
    Pepper::new(SecretBytes::from_slice(&[42u8; 32])).expect("pepper")
}

#[test]
fn valid_manifests_compile_into_sorted_entries() {
    let compiled = compile(&inputs(&base()), &keyring("k1"), &pepper(), None).expect("compiles");
    let content = &compiled.snapshot.content;
    assert_eq!(compiled.snapshot.generation, 1);
    assert_eq!(content.api_keys.len(), 1);
    assert_eq!(content.api_keys[0].digests[0].digest, pepper().digest(CLIENT_KEY.as_bytes()));
    let names: Vec<_> = content.credentials.iter().map(|c| c.credential.to_string()).collect();
    assert_eq!(names, ["team-a/mock", "team-a/openai"]);
    let openai = &content.credentials[1];
    assert_eq!(openai.base_url, "https://api.openai.com/v1");
    assert!(openai.sealed_key.is_some());
    assert!(content.credentials[0].sealed_key.is_none(), "mock needs no key");
    assert_eq!(
        content.kill_switches[0].scope,
        SwitchScope::Provider(portcullis_crds::v1alpha1::ObjectRef::new("team-a", "openai"))
    );
    assert!(compiled.warnings.is_empty(), "{:?}", compiled.warnings);
}

#[test]
fn sealed_key_opens_to_the_trimmed_provider_key_and_nothing_leaks() {
    let ring = keyring("k1");
    let compiled = compile(&inputs(&base()), &ring, &pepper(), None).expect("compiles");
    let openai = &compiled.snapshot.content.credentials[1];
    let opened = ring.open(&openai.binding(), openai.sealed_key.as_ref().expect("sealed")).expect("opens");
    assert_eq!(opened.expose(), PROVIDER_KEY.as_bytes());

    let json = String::from_utf8(compiled.snapshot.to_json()).expect("utf8");
    for plaintext in [PROVIDER_KEY, CLIENT_KEY, "CANARY", &base64_encode(CLIENT_KEY.as_bytes())] {
        assert!(!json.contains(plaintext), "snapshot contains {plaintext}");
    }
    let debug = format!("{:?}", compiled.snapshot);
    assert!(!debug.contains("CANARY"));
    assert_eq!(GatewaySnapshot::from_json(json.as_bytes()).expect("parses"), compiled.snapshot);
}

#[test]
fn wrong_master_key_and_moved_ciphertext_are_rejected() {
    let ring = keyring("k1");
    let compiled = compile(&inputs(&base()), &ring, &pepper(), None).expect("compiles");
    let openai = &compiled.snapshot.content.credentials[1];
    let sealed = openai.sealed_key.as_ref().expect("sealed");
    assert_eq!(keyring("k1").open(&openai.binding(), sealed), Err(SealingError::Authentication));
    let mut moved = openai.clone();
    moved.credential.name = "other".into();
    assert_eq!(ring.open(&moved.binding(), sealed), Err(SealingError::Authentication));
}

#[test]
fn recompiling_unchanged_input_is_identical() {
    let ring = keyring("k1");
    let first = compile(&inputs(&base()), &ring, &pepper(), None).expect("compiles").snapshot;
    let again = compile(&inputs(&base()), &ring, &pepper(), Some(&first)).expect("compiles").snapshot;
    assert_eq!(again, first, "no new nonce, no new generation when nothing changed");

    let changed = base().replace(PROVIDER_KEY, "sk-rotated-provider-key");
    let next = compile(&inputs(&changed), &ring, &pepper(), Some(&first)).expect("compiles").snapshot;
    assert_eq!(next.generation, 2);
    assert_eq!(next.content.credentials[1].key_version, 2, "key change bumps the version");
    let opened = ring
        .open(&next.content.credentials[1].binding(), next.content.credentials[1].sealed_key.as_ref().expect("sealed"))
        .expect("opens");
    assert_eq!(opened.expose(), b"sk-rotated-provider-key");
}

#[test]
fn master_key_rotation_reseals_under_the_new_key() {
    let mut ring = keyring("k1");
    let first = compile(&inputs(&base()), &ring, &pepper(), None).expect("compiles").snapshot;
    ring.rotate_to(KeyId::new("k2").expect("id"), MasterKey::generate().expect("key"));
    let next = compile(&inputs(&base()), &ring, &pepper(), Some(&first)).expect("compiles").snapshot;
    let cred = &next.content.credentials[1];
    assert_eq!(cred.sealed_key.as_ref().expect("sealed").key_id.as_str(), "k2");
    assert_eq!(cred.key_version, 1, "same provider key, same version");
    assert_eq!(next.generation, 2);
}

#[test]
fn invalid_manifests_name_object_and_field() {
    let cases: Vec<(&str, String, &str)> = vec![
        ("missing provider secret", base().replace("name: openai-key, key: apiKey", "name: nope, key: apiKey"),
         "ProviderCredential team-a/openai: spec.secretRef: Secret team-a/nope not found"),
        ("missing secret key", base().replace("key: apiKey}", "key: other}"),
         "ProviderCredential team-a/openai: spec.secretRef: Secret team-a/openai-key has no key \"other\""),
        ("missing client secret", base().replace("name: alice-key, key: key", "name: gone, key: key"),
         "ApiKey team-a/alice: spec.secretRef: Secret team-a/gone not found"),
        ("short client key", base().replace(&base64_encode(CLIENT_KEY.as_bytes()), &base64_encode(b"short")),
         "ApiKey team-a/alice: spec.secretRef"),
        ("generated key without operator", base().replace("  secretRef: {name: alice-key, key: key}\n", ""),
         "ApiKey team-a/alice: spec.secretRef: no key has been issued"),
        ("bad glob", base().replace(r#"allowedModels: ["gpt-*"]"#, r#"allowedModels: ["gpt-*", ""]"#),
         "ApiKey team-a/alice: spec.allowedModels[1]: must not be empty"),
        ("compatible without url", base().replace("kind: openai\n", "kind: openai-compatible\n"),
         "ProviderCredential team-a/openai: spec.baseUrl: is required for kind openai-compatible"),
        ("bad url", base().replace("kind: openai\n", "kind: openai\n  baseUrl: ftp://x\n"),
         "ProviderCredential team-a/openai: spec.baseUrl: must start with https://"),
        ("azure without version", base().replace("kind: openai\n", "kind: azure-openai\n  baseUrl: https://x.openai.azure.com/openai\n"),
         "ProviderCredential team-a/openai: spec.azure.apiVersion: is required"),
        ("no models", base().replace("models: [{name: \"mock-*\"}]", "models: []"),
         "ProviderCredential team-a/mock: spec.models: must list at least one model"),
        ("renamed glob", base().replace("models: [{name: \"mock-*\"}]", "models: [{name: \"mock-*\", upstreamName: x}]"),
         "ProviderCredential team-a/mock: spec.models[0].upstreamName: cannot rename a glob pattern"),
        ("scope with two targets", base().replace("scope: {provider: openai}", "scope: {provider: openai, global: true}"),
         "KillSwitch team-a/stop-openai: spec.scope: must name exactly one target"),
        ("empty scope", base().replace("scope: {provider: openai}", "scope: {}"),
         "KillSwitch team-a/stop-openai: spec.scope: must name one target"),
        ("too many patterns", base().replace(r#"allowedModels: ["gpt-*"]"#, &format!("allowedModels: [{}]", vec!["gpt-*"; 257].join(", "))),
         "ApiKey team-a/alice: spec.allowedModels[256]: is one pattern too many: a list holds at most 256"),
        ("too many models", base().replace("models: [{name: \"mock-*\"}]", &format!("models: [{}]", (0..1025).map(|i| format!("{{name: m{i}}}")).collect::<Vec<_>>().join(", "))),
         "ProviderCredential team-a/mock: spec.models: must list at most 1024 models"),
        ("a reference too long", base().replace("scope: {provider: openai}", &format!("scope: {{provider: team-a/{}}}", "x".repeat(311))),
         "KillSwitch team-a/stop-openai: spec.scope: a provider or apiKey reference must be 1-317 characters"),
        ("an empty namespace", base().replace("scope: {provider: openai}", "scope: {namespace: \"\"}"),
         "KillSwitch team-a/stop-openai: spec.scope: namespace must be 1-63 characters"),
        ("a zero limit", base().replace("  owner: alice@example.com\n", "  owner: alice@example.com\n  limits: {requestsPerMinute: 10, tokensPerDay: 0}\n"),
         "ApiKey team-a/alice: spec.limits.tokensPerDay: must be at least 1"),
        ("a zero team limit", base().replace("  owner: alice@example.com\n", "  owner: alice@example.com\n  team: ml\n  teamLimits: {requestsPerMinute: 0}\n"),
         "ApiKey team-a/alice: spec.teamLimits.requestsPerMinute: must be at least 1"),
        ("duplicate", format!("{}---\n{}", base(), "apiVersion: portcullis.dev/v1alpha1\nkind: KillSwitch\nmetadata: {name: stop-openai, namespace: team-a}\nspec: {scope: {global: true}}\n"),
         "KillSwitch team-a/stop-openai: metadata.name: is declared more than once"),
    ];
    for (name, yaml, expected) in cases {
        let errors = compile(&inputs(&yaml), &keyring("k1"), &pepper(), None)
            .err()
            .unwrap_or_else(|| panic!("{name}: expected a compile error"));
        let text = errors.to_string();
        assert!(text.contains(expected), "{name}: got {text}");
        assert!(!text.contains("CANARY"), "{name}: error leaks a secret: {text}");
    }
}

/// Outside the platform namespaces a credential and a switch are the tenant's own: the entries
/// say so, and a switch that names another namespace's key or namespace is refused with the
/// platform namespaces named. Inside them, and with every namespace trusted, nothing is confined.
#[test]
fn objects_outside_the_platform_namespaces_are_confined_to_their_own() {
    let confined = |tenancy: Tenancy, yaml: &str| {
        let mut inputs = inputs(yaml);
        inputs.tenancy = tenancy;
        compile(&inputs, &keyring("k1"), &pepper(), None)
    };
    let platform = || Tenancy::platform(["portcullis-system", "ops"]);

    let content = confined(platform(), &base()).expect("compiles").snapshot.content;
    assert!(content.credentials.iter().all(|c| c.tenant.as_deref() == Some("team-a")), "{:?}", content.credentials);
    assert_eq!(content.kill_switches[0].tenant.as_deref(), Some("team-a"));

    for tenancy in [Tenancy::platform(["team-a"]), Tenancy::Shared, Tenancy::platform(["other", "*"])] {
        let content = confined(tenancy.clone(), &base()).expect("compiles").snapshot.content;
        assert!(content.credentials.iter().all(|c| c.tenant.is_none()), "{tenancy:?}");
        assert!(content.kill_switches.iter().all(|s| s.tenant.is_none()), "{tenancy:?}");
    }

    for (scope, field, named) in [
        ("{apiKey: team-b/bob}", "spec.scope.apiKey", "team-b"),
        ("{namespace: team-b}", "spec.scope.namespace", "team-b"),
    ] {
        let yaml = base().replace("scope: {provider: openai}", &format!("scope: {scope}"));
        let text = confined(platform(), &yaml).expect_err("refused").to_string();
        assert!(
            text.contains(&format!("KillSwitch team-a/stop-openai: {field}: names namespace {named}, but a KillSwitch in team-a stops only the ApiKeys of team-a"))
                && text.contains("(ops, portcullis-system)"),
            "{scope}: {text}"
        );
        // The same switch in a platform namespace, or with every namespace trusted, is fine.
        confined(Tenancy::platform(["team-a"]), &yaml).expect("a platform namespace reaches every namespace");
        confined(Tenancy::Shared, &yaml).expect("every namespace trusted");
    }
    // Its own namespace's key or namespace, and the broad scopes, are the tenant's to stop.
    for scope in
        ["{apiKey: alice}", "{apiKey: team-a/alice}", "{namespace: team-a}", "{global: true}", "{model: \"gpt-*\"}"]
    {
        let yaml = base().replace("scope: {provider: openai}", &format!("scope: {scope}"));
        let content = confined(platform(), &yaml).unwrap_or_else(|e| panic!("{scope}: {e}")).snapshot.content;
        assert_eq!(content.kill_switches[0].tenant.as_deref(), Some("team-a"), "{scope}");
    }
}

/// A generated key whose digests were all made under another pepper is reported on the key
/// (rotate it), not taken for one still being issued.
#[test]
fn a_key_issued_under_another_pepper_asks_for_a_rotation() {
    let mut generated = inputs(&base().replace("  secretRef: {name: alice-key, key: key}\n", ""));
    generated.issued_under_another_pepper.insert(portcullis_crds::v1alpha1::ObjectRef::new("team-a", "alice"));
    let errors = compile(&generated, &keyring("k1"), &pepper(), None).expect_err("stale key");
    let text = errors.to_string();
    assert!(
        text.contains("ApiKey team-a/alice: status.issuedDigests: its key was issued under another pepper"),
        "{text}"
    );
    assert!(text.contains("change spec.rotation"), "{text}");
}

#[test]
fn two_api_keys_with_one_key_are_rejected() {
    let yaml = format!(
        "{}---\napiVersion: portcullis.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: bob, namespace: team-a}}\nspec: {{secretRef: {{name: alice-key, key: key}}}}\n",
        base()
    );
    let errors = compile(&inputs(&yaml), &keyring("k1"), &pepper(), None).expect_err("shared key");
    // Both are left out (a copy cannot keep a revoked key working), and neither names the other.
    let text = errors.to_string();
    for holder in ["team-a/alice", "team-a/bob"] {
        assert!(
            text.contains(&format!("ApiKey {holder}: spec.secretRef: holds the same key as another ApiKey")),
            "{text}"
        );
    }
    assert_eq!(errors.0.len(), 2, "{text}");
}

#[test]
fn kill_switch_naming_a_missing_object_warns_without_blocking() {
    let yaml = base().replace("scope: {provider: openai}", "scope: {apiKey: nobody}");
    let compiled = compile(&inputs(&yaml), &keyring("k1"), &pepper(), None).expect("compiles");
    assert_eq!(compiled.warnings.len(), 1);
    assert!(compiled.warnings[0].to_string().contains("ApiKey team-a/nobody does not exist"));
}

#[test]
fn malformed_yaml_names_the_document() {
    let mut inputs = CompileInputs::default();
    let mut summary = ReadSummary::default();
    let err = add_yaml(
        &mut inputs,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: a}\n---\nkind: [",
        "f.yaml",
        &mut summary,
    )
    .expect_err("malformed");
    assert_eq!(err.source, "f.yaml");
    assert_eq!(err.document, 2);
    let err = add_yaml(
        &mut inputs,
        "apiVersion: portcullis.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: a}\nspec: {revoked: maybe}\n",
        "g.yaml",
        &mut summary,
    )
    .expect_err("bad field type");
    assert!(err.to_string().contains("ApiKey is invalid"), "{err}");
}

#[test]
fn a_malformed_secret_is_refused_without_quoting_its_values() {
    const CANARY: &str = "sk-live-CANARY-7f3a9c1e";
    for doc in [
        format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: a}}\nstringData: {CANARY}\n"),
        format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: a}}\nstringData: [{CANARY}]\n"),
        "apiVersion: v1\nkind: Secret\nmetadata: {name: a}\nstringData: {key: 40961337}\n".to_owned(),
        format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: a}}\ndata: {{key: [{CANARY}]}}\n"),
    ] {
        let err = add_yaml(&mut CompileInputs::default(), &doc, "s.yaml", &mut ReadSummary::default())
            .expect_err("malformed Secret");
        let text = err.to_string();
        assert!(text.contains("Secret is invalid"), "{text}");
        assert!(!text.contains(CANARY) && !text.contains("40961337"), "the value is quoted: {text}");
    }
}

#[test]
fn quickstart_example_compiles() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    let (inputs, summary) = portcullis_operator::manifests::read_dir(&dir).expect("reads");
    assert_eq!(summary.files, 4);
    let compiled = compile(&inputs, &keyring("k1"), &pepper(), None).expect("compiles");
    assert_eq!(compiled.snapshot.content.api_keys.len(), 1);
    assert_eq!(compiled.snapshot.content.credentials.len(), 1);
    assert_eq!(compiled.snapshot.content.kill_switches.len(), 1);
}
