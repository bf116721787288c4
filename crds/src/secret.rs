//! Secret byte strings: redacting `Debug`, zeroized on drop, constant-time equality.

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Bytes that must never be printed, logged or left behind in freed memory.
#[derive(Clone, Default, Zeroize, ZeroizeOnDrop)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// Copies `bytes`; the caller remains responsible for its own copy.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    /// The secret itself. Keep the borrow short and never format it.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Same bytes with surrounding ASCII whitespace removed (Secrets written with `echo` carry a
    /// trailing newline that no provider accepts).
    pub fn trimmed(&self) -> SecretBytes {
        SecretBytes::from_slice(self.0.trim_ascii())
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<redacted {} bytes>)", self.0.len())
    }
}

impl PartialEq for SecretBytes {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for SecretBytes {}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

/// Fills a fresh buffer from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_bytes() {
        let secret = SecretBytes::from_slice(b"sk-live-canary-123");
        let shown = format!("{secret:?} {secret:#?}");
        assert!(!shown.contains("canary"), "{shown}");
        assert!(shown.contains("redacted 18 bytes"));
    }

    #[test]
    fn equality_compares_content() {
        assert_eq!(SecretBytes::from_slice(b"abc"), SecretBytes::from_slice(b"abc"));
        assert_ne!(SecretBytes::from_slice(b"abc"), SecretBytes::from_slice(b"abd"));
        assert_ne!(SecretBytes::from_slice(b"abc"), SecretBytes::from_slice(b"abcd"));
    }

    #[test]
    fn trimmed_drops_newlines() {
        assert_eq!(SecretBytes::from_slice(b"key\n").trimmed().expose(), b"key");
    }
}
