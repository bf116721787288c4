//! # portcullis-crds — the Portcullis API
//!
//! This crate owns everything the operator and the data plane must agree on, and nothing else:
//! no tokio, no I/O, no clients.
//!
//! ```text
//!   v1alpha1::{ApiKey, ProviderCredential, KillSwitch}     what platform engineers declare
//!                 │  (operator's compile)
//!                 ▼
//!   snapshot::GatewaySnapshot ── carries ──▶ digest::KeyDigest        HMAC-SHA256(pepper, client key)
//!                 │                └──────▶ sealing::SealedCredential AES-256-GCM(master key, provider key)
//!                 ▼
//!   the data plane opens it with the same MasterKeyring and Pepper
//! ```
//!
//! Secret material (`secret::SecretBytes`, `digest::Pepper`, `digest::ClientKey`,
//! `sealing::MasterKey`) never prints in `Debug` and is zeroized on drop.

pub mod acknowledgement;
pub mod digest;
pub mod pattern;
pub mod sealing;
pub mod secret;
pub mod snapshot;
pub mod v1alpha1;

/// API group of every Portcullis custom resource.
pub const GROUP: &str = "portcullis.dev";
/// API version served by this crate's types.
pub const VERSION: &str = "v1alpha1";
