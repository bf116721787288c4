#![allow(clippy::expect_used, clippy::unwrap_used)]

use chrono::{DateTime, Duration, Utc};
use portcullis_crds::digest::{ClientKey, Pepper};
use portcullis_crds::secret::SecretBytes;
use portcullis_crds::v1alpha1::ApiKey;

use super::*;

fn pepper() -> Pepper {
    Pepper::new(SecretBytes::from_slice(&[9u8; 32])).unwrap()
}

fn now() -> DateTime<Utc> {
    "2025-01-01T00:00:00Z".parse().unwrap()
}

fn ttl() -> Duration {
    Duration::hours(1)
}

fn api_key(yaml: &str) -> ApiKey {
    serde_yaml::from_str(yaml).unwrap()
}

const FRESH: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: ApiKey
metadata: {name: alice, namespace: team-a, uid: u1, generation: 1}
spec: {owner: alice@example.com}
"#;

fn issue(key: &ApiKey, reveal: Option<&RevealView>, at: DateTime<Utc>) -> (Issuance, Option<ClientKey>) {
    let mut generated = None;
    let issuance = decide(key, reveal, &pepper(), at, ttl(), || {
        let k = ClientKey::generate()?;
        generated = Some(k.clone());
        Ok(k)
    })
    .unwrap();
    (issuance, generated)
}

/// Applies a decision to the object the way the reconciler writes status.
fn record(key: &mut ApiKey, issuance: &Issuance) {
    let status = key.status.get_or_insert_with(Default::default);
    status.issued_digests = issuance.digests.clone();
    status.rotation = issuance.rotation.clone();
    status.issued_at = issuance.issued_at;
    status.key_prefix = issuance.key_prefix.clone();
    status.reveal_expires_at = issuance.reveal_expires_at;
}

fn reveal_of(key: &ClientKey, rotation: &str) -> RevealView {
    RevealView { rotation: rotation.to_owned(), consumed: false, created_at: Some(now()), key: Some(key.clone()) }
}

#[test]
fn a_fresh_key_is_generated_and_only_its_digest_is_recorded() {
    let mut key = api_key(FRESH);
    let (issuance, generated) = issue(&key, None, now());
    let generated = generated.expect("a key was generated");
    assert!(matches!(&issuance.reveal, RevealAction::Write { key } if key == &generated));
    assert_eq!(issuance.event, Some(IssuanceEvent::Issued));
    assert_eq!(issuance.digests.len(), 1);
    assert_eq!(issuance.digests[0].digest, generated.digest(&pepper()).to_hex());
    assert_eq!(issuance.reveal_expires_at, Some(now() + ttl()));
    record(&mut key, &issuance);
    let status_json = serde_json::to_string(&key.status).unwrap();
    let plaintext = std::str::from_utf8(generated.expose()).unwrap();
    assert!(!status_json.contains(plaintext));
    assert!(!status_json.contains(&plaintext[10..]));
}

#[test]
fn restart_or_deleted_reveal_never_reissues() {
    let mut key = api_key(FRESH);
    let (issuance, generated) = issue(&key, None, now());
    record(&mut key, &issuance);
    let generated = generated.unwrap();
    // Restart: same status, reveal still there.
    let (again, none) = issue(&key, Some(&reveal_of(&generated, "")), now() + Duration::minutes(1));
    assert!(none.is_none());
    assert!(matches!(again.reveal, RevealAction::Keep));
    assert_eq!(again.digests, issuance.digests);
    assert!(again.event.is_none());
    // Reveal Secret deleted by someone: still nothing issued.
    let (gone, none) = issue(&key, None, now() + Duration::minutes(2));
    assert!(none.is_none());
    assert_eq!(gone.digests, issuance.digests);
    assert!(!gone.reveal_present);
}

#[test]
fn interrupted_issuance_adopts_the_revealed_key() {
    let key = api_key(FRESH);
    let orphan = ClientKey::generate().unwrap();
    let (issuance, generated) = issue(&key, Some(&reveal_of(&orphan, "")), now());
    assert!(generated.is_none(), "must not generate a second key");
    assert_eq!(issuance.event, Some(IssuanceEvent::Recovered));
    assert_eq!(issuance.digests[0].digest, orphan.digest(&pepper()).to_hex());
}

#[test]
fn reveal_is_deleted_when_consumed_or_expired() {
    let mut key = api_key(FRESH);
    let (issuance, generated) = issue(&key, None, now());
    record(&mut key, &issuance);
    let mut reveal = reveal_of(&generated.unwrap(), "");
    let (kept, _) = issue(&key, Some(&reveal), now() + Duration::minutes(5));
    assert!(matches!(kept.reveal, RevealAction::Keep));
    assert_eq!(kept.requeue_at, Some(now() + ttl()));
    let (expired, _) = issue(&key, Some(&reveal), now() + ttl());
    assert!(matches!(expired.reveal, RevealAction::Delete));
    assert!(expired.reveal_expires_at.is_none());
    reveal.consumed = true;
    let (consumed, _) = issue(&key, Some(&reveal), now() + Duration::minutes(5));
    assert!(matches!(consumed.reveal, RevealAction::Delete));
}

#[test]
fn rotation_issues_a_new_key_and_keeps_the_old_for_the_grace_period() {
    let mut key = api_key(FRESH);
    let (first, old) = issue(&key, None, now());
    record(&mut key, &first);
    let old = old.unwrap();
    key.spec.rotation = Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(2));
    key.spec.rotation_grace_period_seconds = Some(600);
    let at = now() + Duration::hours(2);
    let (rotated, new) = issue(&key, Some(&reveal_of(&old, "")), at);
    let new = new.expect("rotation generates");
    assert_eq!(rotated.event, Some(IssuanceEvent::Rotated));
    assert_eq!(rotated.rotation.as_deref(), Some("2"));
    assert_eq!(rotated.digests.len(), 2);
    assert_eq!(rotated.digests[0].digest, new.digest(&pepper()).to_hex());
    assert_eq!(rotated.digests[0].valid_until, None);
    assert_eq!(rotated.digests[1].digest, old.digest(&pepper()).to_hex());
    assert_eq!(rotated.digests[1].valid_until, Some(at + Duration::seconds(600)));
    assert_eq!(rotated.requeue_at, Some(at + Duration::seconds(600)));
    record(&mut key, &rotated);
    // After the grace period the old digest is pruned; nothing new is issued.
    let (after, none) = issue(&key, None, at + Duration::seconds(601));
    assert!(none.is_none());
    assert_eq!(after.digests.len(), 1);
    assert_eq!(after.digests[0].digest, new.digest(&pepper()).to_hex());
    // The snapshot view carries the deadline.
    let snap = snapshot_digests(&rotated.digests, &pepper().id());
    assert_eq!(snap[1].valid_until, Some(at + Duration::seconds(600)));
}

/// Each issued digest records the pepper it was made under; the snapshot carries only those of
/// the current pepper (and records from before the pepper was kept).
#[test]
fn digests_under_another_pepper_stay_out_of_the_snapshot() {
    let key = api_key(FRESH);
    let (first, _) = issue(&key, None, now());
    assert_eq!(first.digests[0].pepper_id, Some(pepper().id()));
    assert_eq!(snapshot_digests(&first.digests, &pepper().id()).len(), 1);
    let other = Pepper::new(SecretBytes::from_slice(&[10u8; 32])).unwrap();
    assert!(snapshot_digests(&first.digests, &other.id()).is_empty());
    let mut unrecorded = first.digests.clone();
    unrecorded[0].pepper_id = None;
    assert_eq!(snapshot_digests(&unrecorded, &other.id()).len(), 1);
}

#[test]
fn zero_grace_drops_the_old_key_at_once() {
    let mut key = api_key(FRESH);
    let (first, _) = issue(&key, None, now());
    record(&mut key, &first);
    key.spec.rotation = Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("b".into()));
    key.spec.rotation_grace_period_seconds = Some(0);
    let (rotated, _) = issue(&key, None, now());
    assert_eq!(rotated.digests.len(), 1);
}

/// A rotation longer than the bound now stands as its digest; a key issued when the status kept
/// the value itself is the same rotation, so an upgrade issues nothing new and retires nothing.
#[test]
fn a_long_rotation_recorded_raw_before_the_digest_is_not_a_new_rotation() {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let mut key = api_key(FRESH);
    let long = "r".repeat(300);
    key.spec.rotation = Some(IntOrString::String(long.clone()));
    key.spec.rotation_grace_period_seconds = Some(0);
    let (first, issued) = issue(&key, None, now());
    let issued = issued.expect("a first key");
    record(&mut key, &first);
    assert!(first.rotation.as_deref().is_some_and(|t| t.starts_with("sha256:")));
    // As a status written before the digest holds it, with its reveal Secret annotated so.
    key.status.as_mut().unwrap().rotation = Some(long.clone());
    let (again, none) = issue(&key, Some(&reveal_of(&issued, &long)), now());
    assert!(none.is_none(), "no key issued");
    assert_eq!(again.digests.len(), 1);
    assert_eq!(again.digests[0].digest, issued.digest(&pepper()).to_hex());
    assert!(matches!(again.reveal, RevealAction::Keep), "{:?}", again.reveal);
    // A different value is a rotation.
    key.spec.rotation = Some(IntOrString::String("s".repeat(300)));
    let (rotated, new) = issue(&key, None, now());
    assert!(new.is_some());
    assert_eq!(rotated.event, Some(IssuanceEvent::Rotated));
}

#[test]
fn brought_keys_and_revoked_keys_issue_nothing() {
    let brought = api_key(
        r#"
apiVersion: portcullis.dev/v1alpha1
kind: ApiKey
metadata: {name: bob, namespace: team-a}
spec: {secretRef: {name: bob-key, key: key}}
"#,
    );
    let (issuance, generated) = issue(&brought, None, now());
    assert!(generated.is_none());
    assert!(issuance.digests.is_empty());
    let revoked = api_key(
        r#"
apiVersion: portcullis.dev/v1alpha1
kind: ApiKey
metadata: {name: carol, namespace: team-a}
spec: {revoked: true}
"#,
    );
    let (issuance, generated) = issue(&revoked, None, now());
    assert!(generated.is_none());
    assert!(issuance.digests.is_empty());
}
