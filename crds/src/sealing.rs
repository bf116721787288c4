//! Sealing provider keys with AES-256-GCM under a rotating master keyring.
//!
//! Every seal uses a fresh random 96-bit nonce. The additional authenticated data binds the
//! ciphertext to the credential it belongs to (namespace, name, uid), to the credential's key
//! version and to the master key id, so a ciphertext moved to another credential, replayed from an
//! older version, or relabelled with another key id fails to open.

use std::collections::BTreeMap;
use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::secret::{random_bytes, SecretBytes};

/// Secret data key naming the active master key id.
pub const ACTIVE_KEY_FIELD: &str = "active";
/// Secret data keys holding master keys are `key.<id>`.
pub const KEY_FIELD_PREFIX: &str = "key.";
const AAD_DOMAIN: &[u8] = b"portcullis.dev/sealed-credential/v1";
const SNAPSHOT_TAG_LABEL: &[u8] = b"portcullis.dev/snapshot-tag/v1";
const NONCE_LEN: usize = 12;
/// Longest provider key we agree to seal.
pub const MAX_PLAINTEXT_LEN: usize = 16 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealingError {
    #[error("master key id {0:?} is not in the keyring")]
    UnknownKeyId(String),
    #[error("sealed credential failed authentication (wrong master key, tampered ciphertext or wrong binding)")]
    Authentication,
    #[error("sealed credential is malformed: {0}")]
    Malformed(&'static str),
    #[error("master keyring is invalid: {0}")]
    InvalidKeyring(String),
    #[error("provider key is empty or longer than {MAX_PLAINTEXT_LEN} bytes")]
    PlaintextSize,
    #[error("the operating system's random number generator failed")]
    Rng,
}

/// A master key id: 1–32 characters of `[a-z0-9-]`, safe in a Secret data key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(String);

impl KeyId {
    pub fn new(id: impl Into<String>) -> Result<Self, SealingError> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= 32
            && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(id))
        } else {
            // Not the value: it is what a keyring's `active` field holds, where key material
            // pasted by mistake would then reach the logs of the operator and every replica.
            Err(SealingError::InvalidKeyring(format!(
                "a key id ({} bytes) must be 1-32 characters of [a-z0-9-]",
                id.len()
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for KeyId {
    type Error = SealingError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        KeyId::new(value)
    }
}

impl From<KeyId> for String {
    fn from(value: KeyId) -> Self {
        value.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One 256-bit AES key.
#[derive(Clone)]
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl MasterKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealingError> {
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| SealingError::InvalidKeyring(format!("a master key must be 32 bytes, got {}", bytes.len())))?;
        Ok(Self(Zeroizing::new(array)))
    }

    pub fn generate() -> Result<Self, SealingError> {
        Ok(Self(Zeroizing::new(random_bytes::<32>().map_err(|_| SealingError::Rng)?)))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.0.as_ref().into())
    }

    /// HMAC-SHA256 of `message` under this key's snapshot-tag key (itself HMAC-SHA256 of a label
    /// under the master key, so the AES key is never used as a MAC key).
    fn snapshot_mac(&self) -> Hmac<Sha256> {
        let any_length = |_| unreachable!("HMAC takes keys of any length");
        let mut derive = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref()).unwrap_or_else(any_length);
        derive.update(SNAPSHOT_TAG_LABEL);
        let key = Zeroizing::new(<[u8; 32]>::from(derive.finalize().into_bytes()));
        <Hmac<Sha256> as Mac>::new_from_slice(key.as_ref()).unwrap_or_else(any_length)
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// The master keys known to this deployment and which one seals new ciphertexts. Older keys stay
/// so existing ciphertexts still open during a rotation.
#[derive(Clone, Debug)]
pub struct MasterKeyring {
    active: KeyId,
    keys: BTreeMap<KeyId, MasterKey>,
}

impl MasterKeyring {
    pub fn new(active: KeyId, keys: BTreeMap<KeyId, MasterKey>) -> Result<Self, SealingError> {
        if !keys.contains_key(&active) {
            return Err(SealingError::InvalidKeyring(format!("active key id {active} has no key")));
        }
        Ok(Self { active, keys })
    }

    /// A keyring with one freshly generated key, e.g. for local mode or the operator's first start.
    pub fn generate(id: KeyId) -> Result<Self, SealingError> {
        let mut keys = BTreeMap::new();
        keys.insert(id.clone(), MasterKey::generate()?);
        Self::new(id, keys)
    }

    pub fn active_id(&self) -> &KeyId {
        &self.active
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }

    /// Adds a new key and makes it active (master-key rotation).
    pub fn rotate_to(&mut self, id: KeyId, key: MasterKey) {
        self.keys.insert(id.clone(), key);
        self.active = id;
    }

    /// Reads a keyring from Secret data: `active: <id>` and `key.<id>: <32 raw bytes>`.
    pub fn from_secret_data<'a>(data: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Result<Self, SealingError> {
        let mut active = None;
        let mut keys = BTreeMap::new();
        for (field, value) in data {
            if field == ACTIVE_KEY_FIELD {
                let text = std::str::from_utf8(value)
                    .map_err(|_| SealingError::InvalidKeyring("`active` is not UTF-8".to_owned()))?;
                active = Some(KeyId::new(text.trim())?);
            } else if let Some(id) = field.strip_prefix(KEY_FIELD_PREFIX) {
                keys.insert(KeyId::new(id)?, MasterKey::from_bytes(value)?);
            }
        }
        let active = active.ok_or_else(|| SealingError::InvalidKeyring("missing `active`".to_owned()))?;
        Self::new(active, keys)
    }

    /// The inverse of [`MasterKeyring::from_secret_data`]; values are secret.
    pub fn to_secret_data(&self) -> BTreeMap<String, SecretBytes> {
        let mut out = BTreeMap::new();
        out.insert(ACTIVE_KEY_FIELD.to_owned(), SecretBytes::from_slice(self.active.as_str().as_bytes()));
        for (id, key) in &self.keys {
            out.insert(format!("{KEY_FIELD_PREFIX}{id}"), SecretBytes::from_slice(key.0.as_ref()));
        }
        out
    }

    /// Seals `plaintext` under the active key with a fresh nonce.
    pub fn seal(&self, binding: &SealBinding<'_>, plaintext: &SecretBytes) -> Result<SealedCredential, SealingError> {
        if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(SealingError::PlaintextSize);
        }
        let key = self.keys.get(&self.active).ok_or_else(|| SealingError::UnknownKeyId(self.active.to_string()))?;
        let nonce = random_bytes::<NONCE_LEN>().map_err(|_| SealingError::Rng)?;
        let aad = binding.aad(&self.active);
        let ciphertext = key
            .cipher()
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext.expose(), aad: &aad })
            .map_err(|_| SealingError::Authentication)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(SealedCredential {
            key_id: self.active.clone(),
            nonce: b64.encode(nonce),
            ciphertext: b64.encode(ciphertext),
        })
    }

    /// A tag over `message` (a snapshot's header) under the active key.
    pub fn tag(&self, message: &[u8]) -> Result<(KeyId, [u8; 32]), SealingError> {
        let key = self.keys.get(&self.active).ok_or_else(|| SealingError::UnknownKeyId(self.active.to_string()))?;
        let mut mac = key.snapshot_mac();
        mac.update(message);
        Ok((self.active.clone(), mac.finalize().into_bytes().into()))
    }

    /// Checks a tag made by [`MasterKeyring::tag`], in constant time.
    pub fn verify_tag(&self, key_id: &KeyId, message: &[u8], tag: &[u8]) -> Result<(), SealingError> {
        let key = self.keys.get(key_id).ok_or_else(|| SealingError::UnknownKeyId(key_id.to_string()))?;
        let mut mac = key.snapshot_mac();
        mac.update(message);
        mac.verify_slice(tag).map_err(|_| SealingError::Authentication)
    }

    /// Opens a sealed credential; fails unless key id, binding and ciphertext all match.
    pub fn open(&self, binding: &SealBinding<'_>, sealed: &SealedCredential) -> Result<SecretBytes, SealingError> {
        let key = self.keys.get(&sealed.key_id).ok_or_else(|| SealingError::UnknownKeyId(sealed.key_id.to_string()))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let nonce = b64.decode(&sealed.nonce).map_err(|_| SealingError::Malformed("nonce is not base64"))?;
        if nonce.len() != NONCE_LEN {
            return Err(SealingError::Malformed("nonce is not 96 bits"));
        }
        let ciphertext =
            b64.decode(&sealed.ciphertext).map_err(|_| SealingError::Malformed("ciphertext is not base64"))?;
        let aad = binding.aad(&sealed.key_id);
        let plaintext = key
            .cipher()
            .decrypt(Nonce::from_slice(&nonce), Payload { msg: &ciphertext, aad: &aad })
            .map_err(|_| SealingError::Authentication)?;
        Ok(SecretBytes::new(plaintext))
    }
}

/// What a sealed credential is bound to. Changing any field makes the ciphertext unopenable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealBinding<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// The object's uid when known; a recreated object with the same name gets a new one.
    pub uid: &'a str,
    /// Increments whenever the provider key behind the credential changes.
    pub key_version: u64,
}

impl SealBinding<'_> {
    fn aad(&self, key_id: &KeyId) -> Vec<u8> {
        // Length-prefixed fields: no two different bindings encode to the same bytes.
        let mut aad = Vec::with_capacity(128);
        aad.extend_from_slice(AAD_DOMAIN);
        for field in [self.namespace.as_bytes(), self.name.as_bytes(), self.uid.as_bytes(), key_id.as_str().as_bytes()]
        {
            aad.extend_from_slice(&(field.len() as u32).to_be_bytes());
            aad.extend_from_slice(field);
        }
        aad.extend_from_slice(&self.key_version.to_be_bytes());
        aad
    }
}

/// A provider key as it travels in the snapshot: AES-256-GCM ciphertext (tag appended), its
/// nonce, and the id of the master key that sealed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SealedCredential {
    pub key_id: KeyId,
    pub nonce: String,
    pub ciphertext: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding() -> SealBinding<'static> {
        SealBinding { namespace: "team-a", name: "openai", uid: "u-1", key_version: 1 }
    }

    fn keyring(id: &str) -> MasterKeyring {
        MasterKeyring::generate(KeyId::new(id).expect("id")).expect("keyring")
    }

    #[test]
    fn round_trip_with_fresh_nonces() {
        let ring = keyring("k1");
        let secret = SecretBytes::from_slice(b"sk-provider-secret");
        let a = ring.seal(&binding(), &secret).expect("seal");
        let b = ring.seal(&binding(), &secret).expect("seal");
        assert_ne!(a.nonce, b.nonce, "nonces must never repeat");
        assert_ne!(a.ciphertext, b.ciphertext);
        assert_eq!(ring.open(&binding(), &a).expect("open"), secret);
        let json = serde_json::to_string(&a).expect("json");
        assert!(!json.contains("sk-provider-secret"));
    }

    #[test]
    fn wrong_key_tampering_and_wrong_binding_are_rejected() {
        let ring = keyring("k1");
        let sealed = ring.seal(&binding(), &SecretBytes::from_slice(b"sk-x")).expect("seal");

        // Same id, different key material.
        assert_eq!(keyring("k1").open(&binding(), &sealed), Err(SealingError::Authentication));
        // Unknown key id.
        assert!(matches!(keyring("k2").open(&binding(), &sealed), Err(SealingError::UnknownKeyId(_))));

        // One flipped ciphertext bit.
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut raw = b64.decode(&sealed.ciphertext).expect("b64");
        raw[0] ^= 1;
        let tampered = SealedCredential { ciphertext: b64.encode(&raw), ..sealed.clone() };
        assert_eq!(ring.open(&binding(), &tampered), Err(SealingError::Authentication));

        // Each binding field matters.
        for other in [
            SealBinding { namespace: "team-b", ..binding() },
            SealBinding { name: "openai2", ..binding() },
            SealBinding { uid: "u-2", ..binding() },
            SealBinding { key_version: 2, ..binding() },
        ] {
            assert_eq!(ring.open(&other, &sealed), Err(SealingError::Authentication), "{other:?}");
        }
        // Relabelling the key id is caught by the AAD even if the key exists.
        let mut two = ring.clone();
        two.rotate_to(KeyId::new("k2").expect("id"), MasterKey::from_bytes(&[1u8; 32]).expect("key"));
        let relabelled = SealedCredential { key_id: KeyId::new("k2").expect("id"), ..sealed.clone() };
        assert_eq!(two.open(&binding(), &relabelled), Err(SealingError::Authentication));
        // Bad nonce.
        let short = SealedCredential { nonce: b64.encode([0u8; 8]), ..sealed };
        assert!(matches!(ring.open(&binding(), &short), Err(SealingError::Malformed(_))));
    }

    #[test]
    fn rotation_keeps_old_ciphertexts_readable() {
        let mut ring = keyring("k1");
        let old = ring.seal(&binding(), &SecretBytes::from_slice(b"sk-old")).expect("seal");
        ring.rotate_to(KeyId::new("k2").expect("id"), MasterKey::generate().expect("key"));
        let new = ring.seal(&binding(), &SecretBytes::from_slice(b"sk-new")).expect("seal");
        assert_eq!(new.key_id.as_str(), "k2");
        assert_eq!(ring.open(&binding(), &old).expect("open").expose(), b"sk-old");
        assert_eq!(ring.open(&binding(), &new).expect("open").expose(), b"sk-new");
    }

    #[test]
    fn secret_data_round_trip() {
        let ring = keyring("k1");
        let data = ring.to_secret_data();
        let back = MasterKeyring::from_secret_data(data.iter().map(|(k, v)| (k.as_str(), v.expose()))).expect("parse");
        let sealed = ring.seal(&binding(), &SecretBytes::from_slice(b"sk")).expect("seal");
        assert_eq!(back.open(&binding(), &sealed).expect("open").expose(), b"sk");
        assert!(MasterKeyring::from_secret_data([("active", &b"k1"[..])]).is_err());
        assert!(MasterKeyring::from_secret_data([("active", &b"k1"[..]), ("key.k1", &[0u8; 31][..])]).is_err());
        assert!(!format!("{ring:?}").contains("key.k1") || format!("{ring:?}").contains("redacted"));
    }

    /// Key material pasted into `active` by mistake is not repeated in the error (which the
    /// operator and every replica log).
    #[test]
    fn a_refused_key_id_is_not_repeated_in_the_error() {
        let pasted = "c2stQ0FOQVJZLW1hc3Rlci1rZXktbWF0ZXJpYWw=";
        let error = MasterKeyring::from_secret_data([("active", pasted.as_bytes()), ("key.k1", &[0u8; 32][..])])
            .expect_err("refused");
        let message = error.to_string();
        assert!(!message.contains(pasted), "{message}");
        assert!(message.contains("40 bytes"), "{message}");
    }
}
