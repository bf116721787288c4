//! The snapshot contract between operator and data plane.
//!
//! One `GatewaySnapshot` describes everything the data plane enforces. It is versioned three ways:
//! `schema_version` (the format; unknown versions are refused), `generation` (only ever grows, so
//! replicas can report what they have applied) and `content_digest` (SHA-256 over the canonical
//! JSON of `content`, so an unchanged configuration produces an identical snapshot and no write).
//! `tag` authenticates those three under a key derived from the active master key: who can write
//! the snapshot Secret but cannot read the keyring cannot change what is enforced (point a
//! credential's `baseUrl` elsewhere, drop a revocation or a kill switch, replay an older
//! snapshot under a higher generation). It holds key digests and sealed credentials only, never
//! a plaintext secret.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::digest::KeyDigest;
use crate::sealing::{KeyId, MasterKeyring, SealBinding, SealedCredential, SealingError};
use crate::v1alpha1::{ApiKeyLimits, ModelMapping, ObjectRef, ProviderKind, TeamLimits};

/// Format version written by this crate. 3 added `content.pepperId`; 4 added `tenant` on
/// credentials and kill switches, which a format-3 reader would ignore (serving a tenant's
/// provider to every namespace), so such a reader refuses format 4 by its version instead.
pub const SCHEMA_VERSION: u32 = 4;
/// The oldest format this crate reads: a data plane upgraded first reads what the operator
/// before it wrote. (A data plane older than the writer refuses the newer format by its version,
/// and keeps serving its last good snapshot.)
pub const OLDEST_READABLE_SCHEMA: u32 = 2;
/// Data key of a snapshot Secret that holds the serialized `GatewaySnapshot` as it is (what
/// operators before the gzip key wrote; still read).
pub const SNAPSHOT_SECRET_KEY: &str = "snapshot.json";
/// Data key of the snapshot Secret that holds the serialized `GatewaySnapshot`, gzipped: what
/// the operator writes. Key digests and sealed credentials are random, but the JSON around them
/// is not: 10,000 ApiKeys take 3.2 MiB as JSON and about 0.4 MiB gzipped.
pub const SNAPSHOT_SECRET_GZIP_KEY: &str = "snapshot.json.gz";
/// Largest serialized snapshot a reader accepts (after decompression).
pub const MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;
/// The most a Kubernetes Secret's data may hold (the API server refuses more).
pub const MAX_SECRET_DATA_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot is {0} bytes, more than the {MAX_SNAPSHOT_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("snapshot is not valid JSON for schema version {SCHEMA_VERSION}: {0}")]
    Malformed(String),
    #[error(
        "snapshot schema version {0} is not supported (this build reads {OLDEST_READABLE_SCHEMA} to {SCHEMA_VERSION})"
    )]
    UnsupportedSchema(u32),
    #[error("snapshot content digest does not match its content")]
    DigestMismatch,
    #[error("snapshot carries no authentication tag")]
    Untagged,
    #[error("snapshot authentication failed: {0}")]
    Tag(SealingError),
    #[error("the Secret has neither a {SNAPSHOT_SECRET_GZIP_KEY:?} nor a {SNAPSHOT_SECRET_KEY:?} key")]
    Missing,
    #[error("the snapshot's gzip stream is broken: {0}")]
    Compression(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySnapshot {
    pub schema_version: u32,
    pub generation: u64,
    pub content_digest: String,
    /// See the module documentation; set by [`GatewaySnapshot::tag`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<SnapshotTag>,
    pub content: SnapshotContent,
}

/// HMAC-SHA256 over a snapshot's schema version, generation and content digest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotTag {
    /// The master key the tag key was derived from.
    pub key_id: KeyId,
    /// Hex.
    pub mac: String,
}

impl GatewaySnapshot {
    /// Wraps `content`, keeping `previous`'s generation when nothing changed and bumping it
    /// otherwise.
    pub fn new(content: SnapshotContent, previous: Option<&GatewaySnapshot>) -> Self {
        let content_digest = content.digest();
        let generation = match previous {
            Some(p) if p.content_digest == content_digest => p.generation,
            Some(p) => p.generation.saturating_add(1),
            None => 1,
        };
        Self { schema_version: SCHEMA_VERSION, generation, content_digest, tag: None, content }
    }

    /// What the tag covers. The digest stands for the content: readers check it against the
    /// content before anything else (`from_json`).
    fn tagged_header(&self) -> Vec<u8> {
        format!("portcullis.dev/snapshot\n{}\n{}\n{}", self.schema_version, self.generation, self.content_digest)
            .into_bytes()
    }

    /// Tags the snapshot under the keyring's active key (the operator, after compiling).
    pub fn tag(mut self, keyring: &MasterKeyring) -> Result<Self, SnapshotError> {
        let (key_id, mac) = keyring.tag(&self.tagged_header()).map_err(SnapshotError::Tag)?;
        self.tag = Some(SnapshotTag { key_id, mac: hex::encode(mac) });
        Ok(self)
    }

    /// Checks the tag (the data plane, before opening). A snapshot tagged under a master key
    /// this keyring lacks fails with `UnknownKeyId`, to be retried when the keyring catches up.
    pub fn verify_tag(&self, keyring: &MasterKeyring) -> Result<(), SnapshotError> {
        let tag = self.tag.as_ref().ok_or(SnapshotError::Untagged)?;
        let mac = hex::decode(&tag.mac).map_err(|_| SnapshotError::Tag(SealingError::Authentication))?;
        keyring.verify_tag(&tag.key_id, &self.tagged_header(), &mac).map_err(SnapshotError::Tag)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The snapshot as the operator stores it in its Secret: gzipped JSON under
    /// [`SNAPSHOT_SECRET_GZIP_KEY`].
    pub fn to_secret_data(&self) -> Vec<u8> {
        use std::io::Write as _;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        // Writing to a Vec cannot fail.
        let _ = encoder.write_all(&self.to_json());
        encoder.finish().unwrap_or_default()
    }

    /// Reads and verifies the snapshot a Secret holds (`data` looks a data key up): gzipped under
    /// [`SNAPSHOT_SECRET_GZIP_KEY`], else as it is under [`SNAPSHOT_SECRET_KEY`]. Decompression
    /// stops past [`MAX_SNAPSHOT_BYTES`]: a small Secret cannot make a reader hold more.
    pub fn from_secret_data<'a>(data: impl Fn(&str) -> Option<&'a [u8]>) -> Result<Self, SnapshotError> {
        use std::io::Read as _;
        let Some(compressed) = data(SNAPSHOT_SECRET_GZIP_KEY) else {
            return Self::from_json(data(SNAPSHOT_SECRET_KEY).ok_or(SnapshotError::Missing)?);
        };
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(compressed)
            .take(MAX_SNAPSHOT_BYTES as u64 + 1)
            .read_to_end(&mut json)
            .map_err(|e| SnapshotError::Compression(e.to_string()))?;
        Self::from_json(&json)
    }

    /// Parses and verifies a snapshot: size, schema version and content digest. The JSON is read
    /// once; only when that fails is it read again for its version alone, so that a format this
    /// build does not read is refused as such rather than as malformed.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SnapshotError> {
        if bytes.len() > MAX_SNAPSHOT_BYTES {
            return Err(SnapshotError::TooLarge(bytes.len()));
        }
        let snapshot: GatewaySnapshot = match serde_json::from_slice(bytes) {
            Ok(snapshot) => snapshot,
            Err(e) => {
                #[derive(Deserialize)]
                #[serde(rename_all = "camelCase")]
                struct Header {
                    schema_version: u32,
                }
                return Err(match serde_json::from_slice::<Header>(bytes) {
                    Ok(header) if !readable(header.schema_version) => {
                        SnapshotError::UnsupportedSchema(header.schema_version)
                    }
                    _ => SnapshotError::Malformed(e.to_string()),
                });
            }
        };
        if !readable(snapshot.schema_version) {
            return Err(SnapshotError::UnsupportedSchema(snapshot.schema_version));
        }
        if snapshot.content.digest() != snapshot.content_digest {
            return Err(SnapshotError::DigestMismatch);
        }
        Ok(snapshot)
    }
}

fn readable(schema_version: u32) -> bool {
    (OLDEST_READABLE_SCHEMA..=SCHEMA_VERSION).contains(&schema_version)
}

/// Everything enforced, sorted by object identity so equal inputs serialize identically.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotContent {
    pub api_keys: Vec<ApiKeyEntry>,
    pub credentials: Vec<CredentialEntry>,
    pub kill_switches: Vec<KillSwitchEntry>,
    /// [`crate::digest::Pepper::id`] of the pepper the key digests were made under: a data plane
    /// holding another pepper refuses the snapshot instead of answering every key with 401.
    /// Absent in snapshots written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pepper_id: Option<String>,
}

impl SnapshotContent {
    /// Hex SHA-256 over the canonical JSON encoding.
    pub fn digest(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(&bytes))
    }
}

/// An ApiKey as the data plane enforces it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyEntry {
    pub key: ObjectRef,
    #[serde(default)]
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Digests that authenticate as this key; during a rotation the old one carries a deadline.
    pub digests: Vec<IssuedDigest>,
    #[serde(default)]
    pub allowed_models: Vec<String>,
    #[serde(default)]
    pub allowed_providers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub revoked: bool,
    #[serde(default)]
    pub limits: ApiKeyLimits,
    /// Limits shared by the key's team, as this key declares them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_limits: Option<TeamLimits>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedDigest {
    pub digest: KeyDigest,
    /// End of a rotation grace period; `None` for the current key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<DateTime<Utc>>,
}

/// A ProviderCredential as the data plane uses it, key sealed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialEntry {
    pub credential: ObjectRef,
    #[serde(default)]
    pub uid: String,
    pub kind: ProviderKind,
    /// Resolved base URL, without a trailing slash; empty for `mock`.
    pub base_url: String,
    pub models: Vec<ModelMapping>,
    pub priority: i32,
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_api_version: Option<String>,
    pub key_version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_key: Option<SealedCredential>,
    /// Set for a credential outside the platform namespaces: only ApiKeys of this namespace are
    /// routed to it. `None`: it serves every namespace's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// Whether an entry whose tenant is `tenant` reaches an ApiKey in `namespace`.
pub fn reaches(tenant: Option<&str>, namespace: &str) -> bool {
    tenant.is_none_or(|t| t == namespace)
}

impl CredentialEntry {
    pub fn binding(&self) -> SealBinding<'_> {
        SealBinding {
            namespace: &self.credential.namespace,
            name: &self.credential.name,
            uid: &self.uid,
            key_version: self.key_version,
        }
    }
}

/// A KillSwitch with its scope resolved to object identities.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KillSwitchEntry {
    pub switch: ObjectRef,
    pub scope: SwitchScope,
    pub active: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Set for a switch outside the platform namespaces: it stops only requests of ApiKeys in
    /// this namespace, whatever its scope. `None`: its scope reaches every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl KillSwitchEntry {
    /// Active and not past its expiry at `now`.
    pub fn is_engaged(&self, now: DateTime<Utc>) -> bool {
        self.active && self.expires_at.is_none_or(|at| now < at)
    }

    /// Engaged at `now` and reaching ApiKeys of `namespace`.
    pub fn stops(&self, namespace: &str, now: DateTime<Utc>) -> bool {
        self.is_engaged(now) && reaches(self.tenant.as_deref(), namespace)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "target", rename_all = "camelCase")]
pub enum SwitchScope {
    Global,
    Provider(ObjectRef),
    /// A model name or glob pattern.
    Model(String),
    ApiKey(ObjectRef),
    Namespace(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content() -> SnapshotContent {
        SnapshotContent {
            kill_switches: vec![KillSwitchEntry {
                switch: ObjectRef::new("ops", "stop"),
                scope: SwitchScope::Global,
                active: false,
                reason: None,
                expires_at: None,
                tenant: None,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn generation_only_grows_when_content_changes() {
        let first = GatewaySnapshot::new(content(), None);
        assert_eq!(first.generation, 1);
        let same = GatewaySnapshot::new(content(), Some(&first));
        assert_eq!(same, first);
        let mut changed = content();
        changed.kill_switches[0].active = true;
        let next = GatewaySnapshot::new(changed, Some(&same));
        assert_eq!(next.generation, 2);
        assert_ne!(next.content_digest, first.content_digest);
    }

    /// The Secret holds the snapshot gzipped; one written as plain JSON (by an older operator)
    /// is still read; a broken or oversized gzip stream is refused, never read past the limit.
    #[test]
    fn a_snapshot_round_trips_through_its_secret_gzipped_or_not() {
        use std::io::Write as _;
        let snap = GatewaySnapshot::new(content(), None);
        let gz = snap.to_secret_data();
        assert!(gz.starts_with(&[0x1f, 0x8b]), "gzip magic");
        let json = snap.to_json();
        let read = |entries: &[(&str, &[u8])]| {
            let entries = entries.to_vec();
            GatewaySnapshot::from_secret_data(move |key| entries.iter().find(|(k, _)| *k == key).map(|(_, v)| *v))
        };
        assert_eq!(read(&[(SNAPSHOT_SECRET_GZIP_KEY, &gz)]).expect("gzip"), snap);
        assert_eq!(read(&[(SNAPSHOT_SECRET_KEY, &json)]).expect("plain"), snap);
        // Both present (a Secret patched by the new operator over an old one's): the gzip wins.
        let other = GatewaySnapshot::new(SnapshotContent::default(), Some(&snap));
        assert_eq!(
            read(&[(SNAPSHOT_SECRET_KEY, &json), (SNAPSHOT_SECRET_GZIP_KEY, &other.to_secret_data())]).unwrap(),
            other
        );
        assert!(matches!(read(&[]), Err(SnapshotError::Missing)));
        assert!(matches!(read(&[(SNAPSHOT_SECRET_GZIP_KEY, b"not gzip")]), Err(SnapshotError::Compression(_))));
        assert!(matches!(read(&[(SNAPSHOT_SECRET_GZIP_KEY, &gz[..gz.len() / 2])]), Err(SnapshotError::Compression(_))));
        // 65 MiB of spaces gzip to about 64 KiB: refused at the limit, not inflated whole.
        let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let spaces = vec![b' '; 1024 * 1024];
        for _ in 0..65 {
            bomb.write_all(&spaces).expect("write");
        }
        let bomb = bomb.finish().expect("gzip");
        assert!(bomb.len() < MAX_SECRET_DATA_BYTES, "{}", bomb.len());
        assert!(
            matches!(read(&[(SNAPSHOT_SECRET_GZIP_KEY, &bomb)]), Err(SnapshotError::TooLarge(n)) if n == MAX_SNAPSHOT_BYTES + 1)
        );
    }

    #[test]
    fn parse_verifies_schema_and_digest() {
        let snap = GatewaySnapshot::new(content(), None);
        let json = snap.to_json();
        assert_eq!(GatewaySnapshot::from_json(&json).expect("parse"), snap);

        let tampered = String::from_utf8(json.clone()).expect("utf8").replace("\"active\":false", "\"active\":true");
        assert!(matches!(GatewaySnapshot::from_json(tampered.as_bytes()), Err(SnapshotError::DigestMismatch)));

        let version = |v: u32| {
            String::from_utf8(json.clone())
                .expect("utf8")
                .replace(&format!("\"schemaVersion\":{SCHEMA_VERSION}"), &format!("\"schemaVersion\":{v}"))
        };
        assert!(matches!(GatewaySnapshot::from_json(version(9).as_bytes()), Err(SnapshotError::UnsupportedSchema(9))));
        assert!(matches!(GatewaySnapshot::from_json(version(1).as_bytes()), Err(SnapshotError::UnsupportedSchema(1))));
        assert!(matches!(GatewaySnapshot::from_json(b"{"), Err(SnapshotError::Malformed(_))));
        // A format this build does not read is refused by its version whatever else it holds;
        // a readable version that does not parse is malformed.
        let other = |v: u32| format!("{{\"schemaVersion\":{v},\"entries\":[]}}");
        assert!(matches!(GatewaySnapshot::from_json(other(1).as_bytes()), Err(SnapshotError::UnsupportedSchema(1))));
        assert!(matches!(GatewaySnapshot::from_json(other(9).as_bytes()), Err(SnapshotError::UnsupportedSchema(9))));
        assert!(matches!(
            GatewaySnapshot::from_json(other(SCHEMA_VERSION).as_bytes()),
            Err(SnapshotError::Malformed(_))
        ));
    }

    /// A tenant is part of the content: written only when set, digested like the rest, and what
    /// `reaches` and `stops` decide by.
    #[test]
    fn a_tenant_is_digested_and_confines_its_entry() {
        let plain = GatewaySnapshot::new(content(), None);
        assert!(!String::from_utf8_lossy(&plain.to_json()).contains("tenant"));
        let mut confined = content();
        confined.kill_switches[0].tenant = Some("team-a".into());
        confined.kill_switches[0].active = true;
        let snap = GatewaySnapshot::new(confined, None);
        assert_ne!(snap.content_digest, plain.content_digest);
        let moved = String::from_utf8(snap.to_json()).expect("utf8").replace("\"team-a\"", "\"team-b\"");
        assert!(matches!(GatewaySnapshot::from_json(moved.as_bytes()), Err(SnapshotError::DigestMismatch)));

        let switch = &snap.content.kill_switches[0];
        let now = Utc::now();
        assert!(switch.stops("team-a", now) && !switch.stops("team-b", now));
        assert!(reaches(None, "anyone") && reaches(Some("x"), "x") && !reaches(Some("x"), "y"));
    }

    /// What an operator of format 2 wrote (no `pepperId`) still parses, its digest intact; the
    /// id, when present, is covered by the digest like the rest of the content.
    #[test]
    fn a_format_2_snapshot_is_read_and_the_pepper_id_is_digested() {
        let mut old = GatewaySnapshot::new(content(), None);
        old.schema_version = 2;
        let json = old.to_json();
        assert!(!String::from_utf8_lossy(&json).contains("pepperId"));
        let parsed = GatewaySnapshot::from_json(&json).expect("format 2 parses");
        assert_eq!((parsed.schema_version, parsed.content.pepper_id), (2, None));

        let mut named = content();
        named.pepper_id = Some("0123456789abcdef".into());
        let snap = GatewaySnapshot::new(named, None);
        assert_ne!(snap.content_digest, old.content_digest);
        let swapped = String::from_utf8(snap.to_json()).expect("utf8").replace("0123456789abcdef", "fedcba9876543210");
        assert!(matches!(GatewaySnapshot::from_json(swapped.as_bytes()), Err(SnapshotError::DigestMismatch)));
    }

    #[test]
    fn only_a_master_key_holder_can_change_a_tagged_snapshot() {
        let keyring = MasterKeyring::generate(KeyId::new("k1").expect("id")).expect("keyring");
        let tagged = GatewaySnapshot::new(content(), None).tag(&keyring).expect("tag");
        let json = tagged.to_json();
        let parsed = GatewaySnapshot::from_json(&json).expect("parse");
        parsed.verify_tag(&keyring).expect("the writer's own tag verifies");

        // Whoever can write the Secret but cannot read the keyring: a new content with its own
        // (correct) digest, a higher generation, the tag dropped, another keyring's tag.
        let mut edited = content();
        edited.kill_switches.clear();
        let mut forged = GatewaySnapshot::new(edited, Some(&parsed));
        forged.tag = parsed.tag.clone();
        let mut replayed = parsed.clone();
        replayed.generation = u64::MAX;
        let mut untagged = parsed.clone();
        untagged.tag = None;
        let stranger = MasterKeyring::generate(KeyId::new("k1").expect("id")).expect("keyring");
        let foreign = GatewaySnapshot::new(content(), None).tag(&stranger).expect("tag");
        for (what, snapshot) in [("edited", &forged), ("replayed", &replayed), ("foreign", &foreign)] {
            let reread = GatewaySnapshot::from_json(&snapshot.to_json()).expect("parses: the digest is right");
            assert!(
                matches!(reread.verify_tag(&keyring), Err(SnapshotError::Tag(SealingError::Authentication))),
                "{what}"
            );
        }
        assert!(matches!(untagged.verify_tag(&keyring), Err(SnapshotError::Untagged)));

        // Tagged under a key this keyring does not hold yet: told apart, so it can be retried.
        let rotated = MasterKeyring::generate(KeyId::new("k2").expect("id")).expect("keyring");
        let newer = GatewaySnapshot::new(content(), None).tag(&rotated).expect("tag");
        assert!(matches!(newer.verify_tag(&keyring), Err(SnapshotError::Tag(SealingError::UnknownKeyId(_)))));
    }

    #[test]
    fn engaged_respects_expiry() {
        let now = Utc::now();
        let mut ks = content().kill_switches.remove(0);
        assert!(!ks.is_engaged(now));
        ks.active = true;
        assert!(ks.is_engaged(now));
        ks.expires_at = Some(now - chrono::Duration::seconds(1));
        assert!(!ks.is_engaged(now));
    }
}
