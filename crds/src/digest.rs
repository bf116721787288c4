//! Client API keys and their digests.
//!
//! A client key is shown to its owner once; everything else holds `KeyDigest =
//! HMAC-SHA256(pepper, key)`. The pepper is a server-side secret, so a leaked snapshot does not
//! allow offline guessing, and digests compare in constant time.

use std::fmt;
use std::hash::{Hash, Hasher};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::secret::{random_bytes, SecretBytes};

/// Prefix of every key the operator generates, so leaked keys are recognisable by scanners.
pub const GENERATED_KEY_PREFIX: &str = "pcl_";
/// Random bytes in a generated key: 320 bits, so the short display prefix still leaves > 256
/// unknown bits.
pub const GENERATED_KEY_BYTES: usize = 40;
/// Characters after [`GENERATED_KEY_PREFIX`] shown in status to tell keys apart.
pub const DISPLAY_PREFIX_CHARS: usize = 6;
/// Keys shorter than this are refused everywhere (brought keys included).
pub const MIN_CLIENT_KEY_LEN: usize = 32;
/// Longest key accepted from a client or a Secret.
pub const MAX_CLIENT_KEY_LEN: usize = 512;
/// Data key of the pepper Secret that holds the pepper bytes.
pub const PEPPER_SECRET_KEY: &str = "pepper";
/// Minimum pepper length in bytes.
pub const MIN_PEPPER_LEN: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyMaterialError {
    #[error("the pepper must be at least {MIN_PEPPER_LEN} bytes, got {0}")]
    PepperTooShort(usize),
    #[error("a client key must be between {MIN_CLIENT_KEY_LEN} and {MAX_CLIENT_KEY_LEN} bytes of printable ASCII without spaces")]
    MalformedClientKey,
    #[error("the operating system's random number generator failed")]
    Rng,
    #[error("a key digest must be 64 hex characters")]
    MalformedDigest,
}

/// Server-side secret mixed into every key digest.
///
/// Keeps the HMAC's keyed state beside the bytes: the pepper's inner and outer pads are hashed
/// once here instead of on every request, so a digest costs two SHA-256 blocks instead of four.
/// That state is as secret as the pepper: it sits on the heap, so moving a pepper does not copy
/// it, and it is overwritten when the pepper is dropped.
#[derive(Clone)]
pub struct Pepper {
    bytes: SecretBytes,
    keyed: Box<Hmac<Sha256>>,
}

impl Pepper {
    pub fn new(bytes: SecretBytes) -> Result<Self, KeyMaterialError> {
        if bytes.len() < MIN_PEPPER_LEN {
            return Err(KeyMaterialError::PepperTooShort(bytes.len()));
        }
        let keyed = Box::new(keyed_hmac(bytes.expose()));
        Ok(Self { bytes, keyed })
    }

    pub fn generate() -> Result<Self, KeyMaterialError> {
        let bytes = random_bytes::<32>().map_err(|_| KeyMaterialError::Rng)?;
        Self::new(SecretBytes::from_slice(&bytes))
    }

    pub fn expose(&self) -> &[u8] {
        self.bytes.expose()
    }

    /// Digest of a client key under this pepper.
    pub fn digest(&self, client_key: &[u8]) -> KeyDigest {
        let mut mac = (*self.keyed).clone();
        mac.update(client_key);
        KeyDigest(mac.finalize().into_bytes().into())
    }

    /// Names this pepper without revealing it: 16 hex characters of its HMAC over a label no
    /// client key can equal (keys have no spaces). Operator and data plane compare it to tell
    /// that a snapshot's digests were made under the pepper the data plane holds.
    pub fn id(&self) -> String {
        hex::encode(&self.digest(PEPPER_ID_LABEL).as_bytes()[..8])
    }
}

/// What [`Pepper::id`] digests.
const PEPPER_ID_LABEL: &[u8] = b"portcullis pepper id v1";

fn keyed_hmac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
}

impl Drop for Pepper {
    fn drop(&mut self) {
        // The keyed state has no `Zeroize`: overwrite it in place with the state of an empty
        // key, and keep the store from being elided as dead.
        *self.keyed = keyed_hmac(&[]);
        std::hint::black_box(&mut *self.keyed);
    }
}

impl PartialEq for Pepper {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for Pepper {}

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pepper(<redacted>)")
    }
}

/// A client API key in plaintext. Exists only while being issued or checked.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientKey(SecretBytes);

impl ClientKey {
    /// A fresh key: `pcl_` + base64url of 320 bits from the OS CSPRNG.
    pub fn generate() -> Result<Self, KeyMaterialError> {
        let raw = random_bytes::<GENERATED_KEY_BYTES>().map_err(|_| KeyMaterialError::Rng)?;
        let mut text = String::with_capacity(GENERATED_KEY_PREFIX.len() + 54);
        text.push_str(GENERATED_KEY_PREFIX);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(raw, &mut text);
        Ok(Self(SecretBytes::new(text.into_bytes())))
    }

    /// A key the user brings (from their own Secret). Surrounding whitespace is ignored.
    pub fn from_brought(bytes: &SecretBytes) -> Result<Self, KeyMaterialError> {
        let trimmed = bytes.trimmed();
        if !is_well_formed_key(trimmed.expose()) {
            return Err(KeyMaterialError::MalformedClientKey);
        }
        Ok(Self(trimmed))
    }

    pub fn expose(&self) -> &[u8] {
        self.0.expose()
    }

    /// A short non-secret identifier, e.g. `pcl_AbC123…`, for status and logs.
    pub fn display_prefix(&self) -> String {
        let bytes = self.0.expose();
        let start = if bytes.starts_with(GENERATED_KEY_PREFIX.as_bytes()) { GENERATED_KEY_PREFIX.len() } else { 0 };
        let end = (start + DISPLAY_PREFIX_CHARS).min(bytes.len());
        format!("{}…", String::from_utf8_lossy(&bytes[..end]))
    }

    pub fn digest(&self, pepper: &Pepper) -> KeyDigest {
        pepper.digest(self.0.expose())
    }

    /// What status shows of a key its owner brought: `digest:` and the first eight hex digits of
    /// its peppered digest. None of its own characters: unlike a generated key, whose first
    /// characters after `pcl_` leave hundreds of random bits unshown, a brought key may be as
    /// short as the minimum and its start may be all there is to guess.
    pub fn brought_display(&self, pepper: &Pepper) -> String {
        let hex = self.digest(pepper).to_hex();
        format!("digest:{}…", hex.get(..8).unwrap_or_default())
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientKey(<redacted>)")
    }
}

/// True for a plausible client key: bounded length, visible ASCII only.
pub fn is_well_formed_key(bytes: &[u8]) -> bool {
    (MIN_CLIENT_KEY_LEN..=MAX_CLIENT_KEY_LEN).contains(&bytes.len()) && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// HMAC-SHA256 of a client key under the pepper. Equality is constant-time.
#[derive(Clone, Copy, Eq)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Result<Self, KeyMaterialError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).map_err(|_| KeyMaterialError::MalformedDigest)?;
        Ok(Self(out))
    }
}

impl PartialEq for KeyDigest {
    /// Constant-time: the differences of all 32 bytes are folded into one word, which goes
    /// through one optimizer barrier before `subtle` compares it, so the fold cannot be turned
    /// into an early-exit comparison. (`subtle`'s slice comparison puts every byte behind a
    /// barrier: 33 per comparison, and a key lookup makes one or more per request.)
    fn eq(&self, other: &Self) -> bool {
        let word = |digest: &[u8; 32], i: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&digest[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(bytes)
        };
        let difference = (0..4).fold(0u64, |acc, i| acc | (word(&self.0, i) ^ word(&other.0, i)));
        std::hint::black_box(difference).ct_eq(&0).into()
    }
}

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialOrd for KeyDigest {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for KeyDigest {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A digest is not secret, but a short form keeps logs readable.
        write!(f, "KeyDigest({}…)", &self.to_hex()[..12])
    }
}

impl Serialize for KeyDigest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for KeyDigest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        KeyDigest::from_hex(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pepper() -> Pepper {
        Pepper::new(SecretBytes::from_slice(&[7u8; 32])).expect("valid pepper")
    }

    #[test]
    fn generated_keys_are_long_unique_and_prefixed() {
        let a = ClientKey::generate().expect("rng");
        let b = ClientKey::generate().expect("rng");
        assert_ne!(a, b);
        assert!(a.expose().starts_with(b"pcl_"));
        // 40 random bytes in unpadded base64url.
        assert_eq!(a.expose().len(), 4 + 54);
        assert!(is_well_formed_key(a.expose()));
        assert_eq!(a.display_prefix(), format!("{}…", std::str::from_utf8(&a.expose()[..10]).unwrap_or("?")));
        let pepper = Pepper::generate().expect("pepper");
        let brought =
            ClientKey::from_brought(&SecretBytes::from_slice(b"my-own-service-key-0123456789abcdef")).expect("brought");
        let shown = brought.brought_display(&pepper);
        assert_eq!(shown, format!("digest:{}…", &brought.digest(&pepper).to_hex()[..8]));
        assert!(!shown.contains("my-own"), "{shown}");
    }

    #[test]
    fn a_pepper_id_names_the_pepper_and_is_no_key_digest() {
        let other = Pepper::new(SecretBytes::from_slice(&[8u8; 32])).expect("valid pepper");
        assert_eq!(pepper().id(), pepper().id());
        assert_ne!(pepper().id(), other.id());
        assert_eq!(pepper().id().len(), 16);
        assert!(pepper().id().bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!is_well_formed_key(PEPPER_ID_LABEL));
    }

    #[test]
    fn digest_depends_on_pepper_and_key() {
        let key = b"pcl_0123456789abcdefghijklmnopqrstuvwxyz";
        let other = Pepper::new(SecretBytes::from_slice(&[8u8; 32])).expect("valid pepper");
        assert_eq!(pepper().digest(key), pepper().digest(key));
        assert_ne!(pepper().digest(key), other.digest(key));
        assert_ne!(pepper().digest(key), pepper().digest(b"pcl_0123456789abcdefghijklmnopqrstuvwxyZ"));
    }

    #[test]
    fn digest_matches_rfc4231_hmac_sha256() {
        // RFC 4231 test case 2 with a padded key would not satisfy the pepper minimum, so check
        // against an independent computation of HMAC-SHA256 instead.
        let pepper = pepper();
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&[7u8; 32]).expect("hmac");
        mac.update(b"hello");
        let expected: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(pepper.digest(b"hello").as_bytes(), &expected);
    }

    #[test]
    fn a_prepared_pepper_matches_rfc4231_on_every_use() {
        // RFC 4231 test cases 6 and 7: a 131-byte key (hashed first) and data shorter and
        // longer than a block. The keyed state is reused, so each digest is taken twice, and
        // once more from a clone.
        let pepper = Pepper::new(SecretBytes::from_slice(&[0xaa; 131])).expect("valid pepper");
        let cases: [(&[u8], &str); 2] = [
            (b"Test Using Larger Than Block-Size Key - Hash Key First", "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
            (
                b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm.",
                "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
            ),
        ];
        let copy = pepper.clone();
        for _ in 0..2 {
            for (data, expected) in cases {
                assert_eq!(pepper.digest(data).to_hex(), expected);
                assert_eq!(copy.digest(data).to_hex(), expected);
            }
        }
        assert_eq!(pepper, copy);
        assert_ne!(pepper, Pepper::new(SecretBytes::from_slice(&[0xab; 131])).expect("valid pepper"));
    }

    #[test]
    fn digests_equal_only_when_every_byte_does() {
        let digest = KeyDigest::from_bytes(std::array::from_fn(|i| i as u8));
        assert_eq!(digest, KeyDigest::from_bytes(*digest.as_bytes()));
        for at in 0..32 {
            for bit in (0..8).map(|shift| 1u8 << shift) {
                let mut bytes = *digest.as_bytes();
                bytes[at] ^= bit;
                assert_ne!(digest, KeyDigest::from_bytes(bytes), "byte {at}, bit {bit:#x}");
            }
        }
    }

    #[test]
    fn short_pepper_and_malformed_keys_are_refused() {
        assert_eq!(Pepper::new(SecretBytes::from_slice(&[1u8; 16])).err(), Some(KeyMaterialError::PepperTooShort(16)));
        for bad in [&b"short"[..], b"has a space in the middle of the key....", &[0xffu8; 40]] {
            assert!(ClientKey::from_brought(&SecretBytes::from_slice(bad)).is_err());
        }
        let brought = ClientKey::from_brought(&SecretBytes::from_slice(b"demo-key-0123456789-0123456789-0123456789\n"))
            .expect("well formed");
        assert!(!brought.expose().ends_with(b"\n"));
    }

    #[test]
    fn digest_hex_round_trip_and_redacted_debug() {
        let d = pepper().digest(b"x");
        let json = serde_json::to_string(&d).expect("serialize");
        let back: KeyDigest = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(d, back);
        assert!(KeyDigest::from_hex("zz").is_err());
        let key = ClientKey::generate().expect("rng");
        let text = std::str::from_utf8(key.expose()).unwrap_or_default().to_owned();
        assert!(!format!("{key:?} {:?}", pepper()).contains(&text));
    }
}
