//! The admission webhook over a real TLS socket: an AdmissionReview posted by an HTTPS client
//! is answered allowed or denied, an allowed change's requester ends up as the actor of the
//! resulting ledger entry, and a renewed certificate is served without a restart. With a client
//! CA, only the caller it names is heard.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portcullis_operator::audit::{observe_api_key, ActorHints};
use portcullis_operator::cluster::audit::Audit;
use portcullis_operator::ledger::{Action, ActorSource};
use portcullis_operator::webhook::{names_one_of, ClientAuthSettings, WebhookServer, WebhookSettings};
use portcullis_operator::Tenancy;
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{json, Value};

struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "portcullis webhook test CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        Pki { ca_pem: ca.pem(), issuer: Issuer::new(params, key) }
    }

    /// Writes a fresh leaf for `localhost`/127.0.0.1 into `dir`; returns its DER.
    fn write_leaf(&self, dir: &Path) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        // Key first, so a reload that catches the pair half-written sees a mismatch, not a mix.
        std::fs::write(dir.join("tls.key.tmp"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("tls.crt.tmp"), cert.pem()).unwrap();
        std::fs::rename(dir.join("tls.key.tmp"), dir.join("tls.key")).unwrap();
        std::fs::rename(dir.join("tls.crt.tmp"), dir.join("tls.crt")).unwrap();
        cert.der().to_vec()
    }

    /// A client certificate from this CA with subject CN `cn` and DNS SANs `dns`.
    fn identity(&self, cn: &str, dns: &[&str]) -> Identity {
        let mut params = CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Identity { cert: cert.der().clone(), key: PrivatePkcs8KeyDer::from(key.serialize_der()).into() }
    }

    fn client(&self) -> tokio_rustls::TlsConnector {
        self.client_as(None)
    }

    fn client_as(&self, identity: Option<&Identity>) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut self.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            Some(identity) => {
                builder.with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key()).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

/// POSTs `body` to `path` over a fresh TLS connection; returns status, body and the server's
/// certificate.
async fn post(pki: &Pki, addr: SocketAddr, path: &str, body: Vec<u8>) -> (u16, Value, Vec<u8>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = pki.client().connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    let presented: Vec<u8> =
        tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c: &CertificateDer| c.to_vec()).unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(path)
        .header(http::header::HOST, "localhost")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, value, presented)
}

fn review(uid: &str, kind: &str, name: &str, spec: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "portcullis.dev", "version": "v1alpha1", "kind": kind},
            "resource": {"group": "portcullis.dev", "version": "v1alpha1", "resource": "apikeys"},
            "name": name, "namespace": "team-a", "operation": "CREATE",
            "userInfo": {"username": "alice@example.com", "uid": "1", "groups": ["key-admins", "system:authenticated"]},
            "object": {"apiVersion": "portcullis.dev/v1alpha1", "kind": kind,
                       "metadata": {"name": name, "namespace": "team-a"}, "spec": spec},
            "dryRun": false
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn reviews_over_tls_attribute_the_ledger_entry_and_certificates_reload() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let first = pki.write_leaf(dir.path());
    let mut settings = WebhookSettings::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        Tenancy::platform(["portcullis-system"]),
    );
    settings.reload_every = Duration::from_millis(100);
    let server = WebhookServer::bind(settings).await.unwrap();
    let addr = server.local_addr().unwrap();
    let hints = Arc::new(ActorHints::default());
    let serving = tokio::spawn(server.serve(hints.clone()));

    // Denied: a kill switch naming two targets. The reason comes back; no hint is left.
    let two_targets = json!({"scope": {"global": true, "model": "gpt-*"}, "active": true});
    let (status, answer, presented) =
        post(&pki, addr, "/validate", review("u-deny", "KillSwitch", "s", two_targets)).await;
    assert_eq!(status, 200);
    assert_eq!(presented, first);
    assert_eq!(answer["response"]["uid"], "u-deny");
    assert_eq!(answer["response"]["allowed"], false);
    assert!(answer["response"]["status"]["message"].as_str().unwrap().contains("spec.scope"), "{answer}");
    assert!(hints.is_empty());

    // Denied: team-a is a tenant's namespace, and its switch names another namespace's key.
    let elsewhere = json!({"scope": {"apiKey": "team-b/bob"}, "active": true});
    let (_, answer, _) = post(&pki, addr, "/validate", review("u-tenant", "KillSwitch", "s", elsewhere)).await;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("spec.scope.apiKey: names namespace team-b, but a KillSwitch in team-a stops only")
            && message.contains("(portcullis-system)"),
        "{answer}"
    );
    assert!(hints.is_empty());
    // Its own namespace's key is its to stop.
    let own = json!({"scope": {"apiKey": "alice"}, "active": true});
    let (_, answer, _) = post(&pki, addr, "/validate", review("u-own", "KillSwitch", "s", own)).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert!(hints.take(&("KillSwitch".into(), "team-a".into(), "s".into())).is_some());

    // Allowed: the requester becomes the actor of the entry the reconciler appends.
    let (status, answer, _) =
        post(&pki, addr, "/validate", review("u-allow", "ApiKey", "ci", json!({"owner": "ci"}))).await;
    assert_eq!(status, 200);
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["allowed"], true);

    let audit = Audit::open(&dir.path().join("ledger.jsonl"), hints.clone()).unwrap();
    let key: portcullis_crds::v1alpha1::ApiKey = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": "ci", "namespace": "team-a", "uid": "u1", "generation": 1},
        "spec": {"owner": "ci"},
    }))
    .unwrap();
    let now = chrono::Utc::now();
    let managed: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry> =
        serde_json::from_value(json!([{"manager": "kubectl-client-side-apply", "operation": "Update"}])).unwrap();
    let appended = audit.record(&observe_api_key(&key, now), &managed, now).await.unwrap();
    assert_eq!(appended.len(), 1);
    assert_eq!(appended[0].action, Action::ApiKeyCreated);
    assert_eq!(appended[0].actor.username, "alice@example.com");
    assert_eq!(appended[0].actor.groups, ["key-admins", "system:authenticated"]);
    assert_eq!(appended[0].actor.source, ActorSource::AdmissionWebhook);
    assert!(hints.is_empty(), "a hint is used once");

    // Errors are answered, not dropped.
    let (status, answer, _) = post(&pki, addr, "/validate", b"not json".to_vec()).await;
    assert_eq!(status, 400);
    assert!(answer.as_str().unwrap().contains("AdmissionReview"), "{answer}");
    let (status, _, _) = post(&pki, addr, "/mutate", vec![]).await;
    assert_eq!(status, 404);

    // A renewed certificate (as cert-manager writes it into the Secret volume) is served to new
    // connections without a restart.
    let second = pki.write_leaf(dir.path());
    assert_ne!(first, second);
    let mut served = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        served = post(&pki, addr, "/validate", review("u-3", "ApiKey", "x", json!({}))).await.2;
        if served == second {
            break;
        }
    }
    assert_eq!(served, second, "the renewed certificate was not picked up");
    serving.abort();
}

#[tokio::test]
async fn bind_fails_clearly_on_unusable_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let missing = WebhookSettings::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("no.crt"),
        dir.path().join("no.key"),
        Tenancy::Shared,
    );
    let error = WebhookServer::bind(missing).await.unwrap_err().to_string();
    assert!(error.contains("no.crt"), "{error}");

    let pki = Pki::new();
    pki.write_leaf(dir.path());
    let other = KeyPair::generate().unwrap();
    std::fs::write(dir.path().join("other.key"), other.serialize_pem()).unwrap();
    let mismatched = WebhookSettings::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("tls.crt"),
        dir.path().join("other.key"),
        Tenancy::Shared,
    );
    let error = WebhookServer::bind(mismatched).await.unwrap_err().to_string();
    assert!(error.contains("unusable together"), "{error}");
    let private = other.serialize_pem();
    assert!(!error.contains(&private[40..80]), "key material in an error");
}

/// Posts a review over a fresh connection as `identity`; the status, or why there was none.
async fn post_as(pki: &Pki, identity: Option<&Identity>, addr: SocketAddr, body: Vec<u8>) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = pki
        .client_as(identity)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = http::Request::post("/validate")
        .header(http::header::HOST, "localhost")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    // Under TLS 1.3 the client finishes its handshake first; a refused certificate shows as the
    // server's alert on the first read.
    let response = sender.send_request(request).await.map_err(|e| format!("request: {e}"))?;
    Ok(response.status().as_u16())
}

#[tokio::test]
async fn with_a_client_ca_only_the_named_caller_is_heard_and_a_new_ca_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let server = Pki::new();
    server.write_leaf(dir.path());
    let callers = Pki::new();
    let ca_file = dir.path().join("client-ca.crt");
    std::fs::write(&ca_file, &callers.ca_pem).unwrap();
    let mut settings = WebhookSettings::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        Tenancy::Shared,
    );
    settings.reload_every = Duration::from_millis(100);
    settings.client_auth =
        Some(ClientAuthSettings { ca: ca_file.clone(), names: vec!["kube-apiserver-webhook-client".into()] });
    let bound = WebhookServer::bind(settings).await.unwrap();
    let addr = bound.local_addr().unwrap();
    let hints = Arc::new(ActorHints::default());
    let serving = tokio::spawn(bound.serve(hints.clone()));
    let key = |name: &str| ("ApiKey".to_owned(), "team-a".to_owned(), name.to_owned());

    let apiserver = callers.identity("kube-apiserver-webhook-client", &[]);
    let by_san = callers.identity("webhook", &["Kube-APIServer-Webhook-Client"]);
    let someone = callers.identity("alice@example.com", &["alice.example.com"]);
    let outsider = server.identity("kube-apiserver-webhook-client", &[]);

    // Refused: no certificate, a certificate from the CA naming someone else, the right name
    // from another CA. None of them leaves a hint.
    for (who, identity) in [("anonymous", None), ("alice", Some(&someone)), ("outsider", Some(&outsider))] {
        let refused = post_as(&server, identity, addr, review("u", "ApiKey", who, json!({"owner": "x"}))).await;
        assert!(refused.is_err(), "{who} was answered: {refused:?}");
        assert!(hints.take(&key(who)).is_none(), "{who} left a hint");
    }
    // Heard: the named caller, by CN or by DNS SAN (case aside).
    for (who, identity) in [("by-cn", &apiserver), ("by-san", &by_san)] {
        let status = post_as(&server, Some(identity), addr, review("u", "ApiKey", who, json!({"owner": "x"}))).await;
        assert_eq!(status, Ok(200), "{who}");
        assert_eq!(hints.take(&key(who)).map(|a| a.username), Some("alice@example.com".to_owned()));
    }

    // The CA is rotated in its file: the new CA's caller is heard without a restart, and the
    // old one no longer is.
    let rotated = Pki::new();
    let successor = rotated.identity("kube-apiserver-webhook-client", &[]);
    std::fs::write(&ca_file, &rotated.ca_pem).unwrap();
    let mut status = Err(String::new());
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = post_as(&server, Some(&successor), addr, review("u", "ApiKey", "next", json!({}))).await;
        if status.is_ok() {
            break;
        }
    }
    assert_eq!(status, Ok(200), "the new client CA was not picked up");
    let old = post_as(&server, Some(&apiserver), addr, review("u", "ApiKey", "old", json!({}))).await;
    assert!(old.is_err(), "the old CA's caller was answered: {old:?}");

    // A file that is no CA leaves the current one deciding.
    std::fs::write(&ca_file, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = post_as(&server, Some(&successor), addr, review("u", "ApiKey", "kept", json!({}))).await;
    assert_eq!(status, Ok(200));
    serving.abort();
}

#[test]
fn a_certificate_names_its_subject_cn_and_dns_sans_only() {
    let pki = Pki::new();
    let names = ["kube-apiserver-webhook-client".to_owned(), "apiserver.example.com".to_owned()];
    let cn = pki.identity("kube-apiserver-webhook-client", &[]);
    let dns = pki.identity("other", &["APIServer.example.com"]);
    let neither = pki.identity("kube-apiserver-webhook-client.evil", &["example.com"]);
    assert!(names_one_of(&cn.cert, &names));
    assert!(names_one_of(&dns.cert, &names));
    assert!(!names_one_of(&neither.cert, &names));
    // A CN is compared exactly.
    assert!(!names_one_of(&pki.identity("Kube-Apiserver-Webhook-Client", &[]).cert, &names));
    assert!(!names_one_of(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01]), &names));
}

#[tokio::test]
async fn bind_fails_clearly_on_an_unusable_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    Pki::new().write_leaf(dir.path());
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    for (file, expected) in [("missing.pem", "missing.pem"), ("empty.pem", "holds no PEM certificate")] {
        let mut settings = WebhookSettings::new(
            "127.0.0.1:0".parse().unwrap(),
            dir.path().join("tls.crt"),
            dir.path().join("tls.key"),
            Tenancy::Shared,
        );
        settings.client_auth = Some(ClientAuthSettings { ca: dir.path().join(file), names: vec![] });
        let error = WebhookServer::bind(settings).await.unwrap_err().to_string();
        assert!(error.contains(expected), "{file}: {error}");
    }
}
