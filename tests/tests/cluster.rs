//! Cluster suite: the operator and the data plane as local processes against the API server named
//! by `PORTCULLIS_TEST_KUBECONFIG` (only an API server and etcd are assumed: no kubelet,
//! scheduler or controller-manager). Skips, saying why, when the variable is unset.
//!
//! Needs `kubectl` on PATH and the binaries built (`cargo build -p portcullis-operator -p
//! portcullis-dataplane`).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MODEL: &str = "mock-model";

struct Cluster {
    kubeconfig: PathBuf,
    namespace: String,
}

impl Cluster {
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

    fn get(&self, what: &str, jsonpath: &str) -> String {
        let path = format!("jsonpath={jsonpath}");
        self.kubectl(&["get", "-n", &self.namespace, what, "-o", &path], None)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["delete", "namespace", &self.namespace, "--wait=false"])
            .output();
    }
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn operator_bin(dataplane: &Path) -> PathBuf {
    dataplane.with_file_name("portcullis-operator")
}

fn start_operator(bin: &Path, cluster: &Cluster) -> Process {
    Process(
        Command::new(bin)
            .args(["run", "--namespace", &cluster.namespace, "--lease", "portcullis-test"])
            .args(["--admin-listen", &free_addr().to_string()])
            .env("KUBECONFIG", &cluster.kubeconfig)
            .stdout(Stdio::null())
            .spawn()
            .expect("start operator"),
    )
}

/// One OpenAI-style request; the HTTP status (0 when there was no answer).
fn call(addr: SocketAddr, key: &str) -> u16 {
    call_body(addr, key).split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// One OpenAI-style request; the whole response (status line, headers and body).
fn call_body(addr: SocketAddr, key: &str) -> String {
    let body = format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(request.as_bytes());
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
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

#[test]
fn cluster_suite() {
    let Some(kubeconfig) = std::env::var_os("PORTCULLIS_TEST_KUBECONFIG") else {
        println!("skipping the cluster suite: PORTCULLIS_TEST_KUBECONFIG is not set (point it at a kubeconfig for any API server)");
        return;
    };
    let dataplane = portcullis_e2e::gateway::dataplane_bin().expect("build the binaries first");
    let operator = operator_bin(&dataplane);
    let namespace = format!("portcullis-test-{}", std::process::id());
    let cluster = Cluster { kubeconfig: PathBuf::from(kubeconfig), namespace: namespace.clone() };
    let root = portcullis_e2e::workspace_root();
    cluster.kubectl(
        &["apply", "--server-side", "-f", root.join("charts/portcullis-crds/templates/crds.yaml").to_str().unwrap()],
        None,
    );
    cluster.kubectl(&["create", "namespace", &namespace], None);

    let manifests = format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: mock-provider}}
stringData: {{key: sk-mock-provider-1}}
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
    );
    cluster.apply(&manifests);
    let _operator = start_operator(&operator, &cluster);

    // The reveal Secret appears; read the key.
    let started = Instant::now();
    let key = loop {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&cluster.kubeconfig)
            .args(["get", "secret", "-n", &namespace, "app-apikey-reveal", "-o", "jsonpath={.data.key}"])
            .output()
            .unwrap();
        if out.status.success() && !out.stdout.is_empty() {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD.decode(&out.stdout).unwrap();
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
                    .env("KUBECONFIG", &cluster.kubeconfig)
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
    for i in 2..5 {
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
            cluster.kubectl(&["patch", "-n", &namespace, "killswitch", "stop", "--type=merge", "-p", &patch], None);
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

    // Restart the operator: nothing re-issued, and re-applying everything writes nothing.
    let digests = cluster.get("apikey/app", "{.status.issuedDigests}");
    drop(_operator);
    let _operator = start_operator(&operator, &cluster);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(cluster.get("apikey/app", "{.status.issuedDigests}"), digests, "re-issued after restart");
    let version = cluster.get("secret/portcullis-snapshot", "{.metadata.resourceVersion}");
    cluster.apply(&manifests);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        cluster.get("secret/portcullis-snapshot", "{.metadata.resourceVersion}"),
        version,
        "snapshot rewritten without a change"
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
    let terminated = Command::new("kill").args(["-TERM", &stopped.0.id().to_string()]).status().unwrap();
    assert!(terminated.success());
    stopped.0.wait().unwrap();
    let one = format!("{0}/{0}", gateways.len() - 1);
    let (took, message) = until_enforced(&cluster, "killswitch/stop", &one, Instant::now());
    println!("after one replica stopped, Enforced={one} reported after {took:?}: {message}");
    drop(running);
}
