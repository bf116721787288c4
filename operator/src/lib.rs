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
//!
//! In a cluster (`cluster`), the pure steps are `issuance` (when to generate a key, what is kept),
//! `readiness` + `conditions` (status), `assemble` (set invalid objects aside, then `compile`) and
//! `secrets` (the Secrets the operator reads and writes), `enforcement` (how many data-plane
//! replicas have applied an object's current state); `cluster` only fetches and applies.
//! `admission` decides AdmissionReviews (pure) and `webhook` serves them over HTTPS.

pub mod admission;
pub mod assemble;
pub mod audit;
pub mod cluster;
pub mod compile;
pub mod conditions;
pub mod crdgen;
pub mod enforcement;
pub mod error;
pub mod inputs;
pub mod issuance;
pub mod ledger;
pub mod manifests;
pub mod readiness;
pub mod secrets;
mod validate;
pub mod webhook;

pub use compile::{compile, CompileError, CompileErrors, Compiled};
pub use error::Error;
pub use inputs::{CompileInputs, SecretStore, Tenancy};
