//! # portcullis-operator — custom resources in, one encrypted snapshot out
//!
//! ```text
//!   ApiKey ─┐
//!   ProviderCredential ─┼─▶ inputs::CompileInputs ─▶ compile::compile ─▶ GatewaySnapshot
//!   KillSwitch ─┘            (+ Secret values)         (+ MasterKeyring, Pepper, previous)
//! ```
//!
//! `compile` is pure: no client, no clock, no I/O. It is the only implementation of the
//! resources → snapshot step; the cluster reconciler and the data plane's local mode both call
//! it. `manifests` reads the same YAML you would `kubectl apply` into `CompileInputs`;
//! `crdgen` renders the CRDs from the Rust types.

pub mod compile;
pub mod crdgen;
pub mod inputs;
pub mod ledger;
pub mod manifests;
mod validate;

pub use compile::{compile, CompileError, CompileErrors, Compiled};
pub use inputs::{CompileInputs, SecretStore};
