//! The Secrets the operator reads and writes, built and parsed without a client: the master
//! keyring and the pepper (created on first start), the snapshot Secret, and reveal Secrets.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::ByteString;
use kube::Resource;
use portcullis_crds::digest::{ClientKey, KeyMaterialError, Pepper, PEPPER_SECRET_KEY};
use portcullis_crds::sealing::{KeyId, MasterKeyring, SealingError};
use portcullis_crds::secret::SecretBytes;
use portcullis_crds::snapshot::{GatewaySnapshot, SnapshotContent, SNAPSHOT_SECRET_GZIP_KEY};
use portcullis_crds::v1alpha1::{ApiKey, ObjectRef};

use crate::enforcement::MAX_GENERATION_FOLLOWED;
use crate::inputs::SecretStore;
use crate::issuance::{
    RevealView, CONSUMED_ANNOTATION, MANAGED_BY_LABEL, MANAGER, REVEAL_KEY_FIELD, ROTATION_ANNOTATION,
};

/// Annotation on the snapshot Secret: its generation (not secret; lets a restarted operator keep
/// generations growing even if the stored snapshot cannot be read).
pub const GENERATION_ANNOTATION: &str = "portcullis.dev/generation";
/// Annotation on the snapshot Secret: its content digest.
pub const CONTENT_DIGEST_ANNOTATION: &str = "portcullis.dev/content-digest";
/// Id of the master key created on first start.
pub const FIRST_MASTER_KEY_ID: &str = "k1";

fn managed_meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(BTreeMap::from([(MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned())])),
        ..Default::default()
    }
}

fn opaque(meta: ObjectMeta, data: BTreeMap<String, SecretBytes>) -> Secret {
    Secret {
        metadata: meta,
        type_: Some("Opaque".to_owned()),
        data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v.expose().to_vec()))).collect()),
        ..Default::default()
    }
}

/// Secret data as `(key, bytes)` pairs (`stringData` is write-only; the API server folds it in).
pub fn secret_data(secret: &Secret) -> impl Iterator<Item = (&str, &[u8])> {
    secret.data.iter().flatten().map(|(k, v)| (k.as_str(), v.0.as_slice()))
}

/// A fresh keyring and the Secret holding it, for the operator's first start.
pub fn new_keyring_secret(namespace: &str, name: &str) -> Result<(MasterKeyring, Secret), SealingError> {
    let keyring = MasterKeyring::generate(KeyId::new(FIRST_MASTER_KEY_ID)?)?;
    let secret = opaque(managed_meta(namespace, name), keyring.to_secret_data());
    Ok((keyring, secret))
}

pub fn keyring_from_secret(secret: &Secret) -> Result<MasterKeyring, SealingError> {
    MasterKeyring::from_secret_data(secret_data(secret))
}

/// A fresh pepper and the Secret holding it, for the operator's first start.
pub fn new_pepper_secret(namespace: &str, name: &str) -> Result<(Pepper, Secret), KeyMaterialError> {
    let pepper = Pepper::generate()?;
    let data = BTreeMap::from([(PEPPER_SECRET_KEY.to_owned(), SecretBytes::from_slice(pepper.expose()))]);
    Ok((pepper, opaque(managed_meta(namespace, name), data)))
}

pub fn pepper_from_secret(secret: &Secret) -> Result<Pepper, KeyMaterialError> {
    let bytes = secret_data(secret)
        .find(|(k, _)| *k == PEPPER_SECRET_KEY)
        .map(|(_, v)| SecretBytes::from_slice(v))
        .unwrap_or_default();
    Pepper::new(bytes)
}

/// The desired snapshot Secret for `snapshot`: gzipped JSON. Applied server-side, it takes the
/// plain-JSON key an older operator wrote away with it (the field manager owns only this one).
pub fn snapshot_secret(namespace: &str, name: &str, snapshot: &GatewaySnapshot) -> Secret {
    let mut meta = managed_meta(namespace, name);
    meta.annotations = Some(BTreeMap::from([
        (GENERATION_ANNOTATION.to_owned(), snapshot.generation.to_string()),
        (CONTENT_DIGEST_ANNOTATION.to_owned(), snapshot.content_digest.clone()),
    ]));
    let data = BTreeMap::from([(SNAPSHOT_SECRET_GZIP_KEY.to_owned(), SecretBytes::new(snapshot.to_secret_data()))]);
    opaque(meta, data)
}

/// The generation and content digest a snapshot Secret's annotations name, if both are there.
pub fn named_snapshot(meta: &ObjectMeta) -> Option<(u64, String)> {
    let digest = meta.annotations.as_ref()?.get(CONTENT_DIGEST_ANNOTATION)?;
    Some((annotated_generation(meta)?, digest.clone()))
}

fn annotated_generation(meta: &ObjectMeta) -> Option<u64> {
    meta.annotations.as_ref()?.get(GENERATION_ANNOTATION)?.parse().ok()
}

/// The size of a snapshot Secret's data, to check against what the API server takes.
pub fn data_bytes(secret: &Secret) -> usize {
    secret_data(secret).map(|(k, v)| k.len() + v.len()).sum()
}

/// The snapshot stored in the snapshot Secret, as `compile`'s `previous`. When it cannot be read,
/// a stand-in carrying only the annotated generation keeps generations growing.
///
/// Its generation is taken before any tag is checked (a snapshot under a lost keyring must still
/// be followed by a higher one), so whoever can write the Secret picks it: it is taken no higher
/// than [`MAX_GENERATION_FOLLOWED`]. Without the cap, a generation of `u64::MAX` would have every
/// later snapshot keep that number, and replicas refuse a generation they have applied.
pub fn previous_snapshot(secret: &Secret) -> Option<GatewaySnapshot> {
    let mut previous = read_previous(secret)?;
    previous.generation = previous.generation.min(MAX_GENERATION_FOLLOWED);
    Some(previous)
}

fn read_previous(secret: &Secret) -> Option<GatewaySnapshot> {
    let parsed =
        GatewaySnapshot::from_secret_data(|key| secret_data(secret).find(|(k, _)| *k == key).map(|(_, v)| v)).ok();
    parsed.or_else(|| {
        let generation = annotated_generation(&secret.metadata)?;
        Some(GatewaySnapshot {
            schema_version: portcullis_crds::snapshot::SCHEMA_VERSION,
            generation,
            content_digest: String::new(),
            tag: None,
            content: SnapshotContent::default(),
        })
    })
}

fn owner_reference(api_key: &ApiKey) -> Option<OwnerReference> {
    let mut owner = api_key.controller_owner_ref(&())?;
    owner.block_owner_deletion = Some(true);
    Some(owner)
}

/// The reveal Secret for `key`, owned by `api_key` so it goes when the ApiKey goes.
pub fn reveal_secret(api_key: &ApiKey, name: &str, key: &ClientKey) -> Secret {
    let namespace = api_key.metadata.namespace.clone().unwrap_or_default();
    let mut meta = managed_meta(&namespace, name);
    meta.annotations = Some(BTreeMap::from([(ROTATION_ANNOTATION.to_owned(), api_key.spec.rotation_token())]));
    meta.owner_references = owner_reference(api_key).map(|o| vec![o]);
    let data = BTreeMap::from([(REVEAL_KEY_FIELD.to_owned(), SecretBytes::from_slice(key.expose()))]);
    opaque(meta, data)
}

/// What a reveal Secret found in the cluster says, if it belongs to `api_key`.
pub fn reveal_view(api_key: &ApiKey, secret: &Secret) -> Option<RevealView> {
    let owned =
        secret.metadata.owner_references.iter().flatten().any(|o| Some(&o.uid) == api_key.metadata.uid.as_ref());
    if !owned {
        return None;
    }
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let key = secret_data(secret)
        .find(|(k, _)| *k == REVEAL_KEY_FIELD)
        .and_then(|(_, v)| ClientKey::from_brought(&SecretBytes::from_slice(v)).ok());
    Some(RevealView {
        rotation: annotations.get(ROTATION_ANNOTATION).cloned().unwrap_or_default(),
        consumed: annotations.get(CONSUMED_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("true")),
        created_at: secret
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(|t| chrono::DateTime::from_timestamp(t.0.as_second(), 0)),
        key,
    })
}

/// Adds a Secret's values to the compile inputs.
pub fn add_to_store(store: &mut SecretStore, secret: &Secret) {
    let Some(name) = secret.metadata.name.clone() else {
        return;
    };
    let namespace = secret.metadata.namespace.clone().unwrap_or_default();
    let data = secret_data(secret).map(|(k, v)| (k.to_owned(), SecretBytes::from_slice(v))).collect();
    store.insert(ObjectRef::new(namespace, name), data);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;
    use portcullis_crds::snapshot::SNAPSHOT_SECRET_KEY;

    #[test]
    fn key_material_round_trips_through_its_secrets() {
        let (keyring, secret) = new_keyring_secret("portcullis", "portcullis-keyring").unwrap();
        let read = keyring_from_secret(&secret).unwrap();
        assert_eq!(read.active_id(), keyring.active_id());
        let (pepper, secret) = new_pepper_secret("portcullis", "portcullis-pepper").unwrap();
        assert_eq!(pepper_from_secret(&secret).unwrap(), pepper);
        let short = opaque(
            managed_meta("x", "y"),
            BTreeMap::from([(PEPPER_SECRET_KEY.to_owned(), SecretBytes::from_slice(b"short"))]),
        );
        assert!(pepper_from_secret(&short).is_err());
    }

    /// The snapshot goes in its Secret gzipped, under its own key only, and is read back.
    #[test]
    fn the_snapshot_is_written_gzipped() {
        let snap = GatewaySnapshot::new(SnapshotContent::default(), None);
        let secret = snapshot_secret("ns", "snap", &snap);
        let keys: Vec<&str> = secret_data(&secret).map(|(k, _)| k).collect();
        assert_eq!(keys, [SNAPSHOT_SECRET_GZIP_KEY]);
        assert!(secret_data(&secret).all(|(_, v)| v.starts_with(&[0x1f, 0x8b])));
        assert_eq!(data_bytes(&secret), SNAPSHOT_SECRET_GZIP_KEY.len() + snap.to_secret_data().len());
        assert_eq!(previous_snapshot(&secret), Some(snap));
    }

    #[test]
    fn unreadable_snapshot_still_keeps_the_generation() {
        let snap = GatewaySnapshot::new(SnapshotContent::default(), None);
        let mut secret = snapshot_secret("ns", "snap", &snap);
        assert_eq!(previous_snapshot(&secret), Some(snap.clone()));
        secret.data = Some(BTreeMap::from([(SNAPSHOT_SECRET_KEY.to_owned(), ByteString(b"garbage".to_vec()))]));
        let stand_in = previous_snapshot(&secret).unwrap();
        assert_eq!(stand_in.generation, snap.generation);
        let next = GatewaySnapshot::new(SnapshotContent::default(), Some(&stand_in));
        assert_eq!(next.generation, snap.generation + 1);
    }

    /// Whoever can write the snapshot Secret picks its generation annotation: the largest one
    /// is taken as the most the operator follows, so snapshots after it still grow.
    #[test]
    fn a_previous_generation_is_taken_no_higher_than_the_followed_maximum() {
        let mut snap = GatewaySnapshot::new(SnapshotContent::default(), None);
        snap.generation = u64::MAX;
        let mut secret = snapshot_secret("ns", "snap", &snap);
        assert_eq!(previous_snapshot(&secret).unwrap().generation, MAX_GENERATION_FOLLOWED);
        secret.data = Some(BTreeMap::from([(SNAPSHOT_SECRET_KEY.to_owned(), ByteString(b"garbage".to_vec()))]));
        let stand_in = previous_snapshot(&secret).unwrap();
        assert_eq!(stand_in.generation, MAX_GENERATION_FOLLOWED);
        let content = SnapshotContent { pepper_id: Some("changed".into()), ..Default::default() };
        let next = GatewaySnapshot::new(content, Some(&stand_in));
        assert_eq!(next.generation, MAX_GENERATION_FOLLOWED + 1);
    }
}
