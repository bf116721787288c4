//! CRD manifests rendered from the Rust types. The committed copy under
//! `charts/portcullis-crds/` is checked against this by a test.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use portcullis_crds::v1alpha1::{ApiKey, KillSwitch, ProviderCredential};

/// Where the generated YAML is committed, relative to the workspace root.
pub const COMMITTED_PATH: &str = "charts/portcullis-crds/templates/crds.yaml";
/// The one command that regenerates it.
pub const REGENERATE_COMMAND: &str =
    "cargo run -p portcullis-operator -- crds --output charts/portcullis-crds/templates/crds.yaml";

pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![ApiKey::crd(), ProviderCredential::crd(), KillSwitch::crd()]
}

/// All CRDs as one multi-document YAML file.
pub fn render() -> Result<String, serde_yaml::Error> {
    let mut out = format!("# Generated from the Rust types by:\n#   {REGENERATE_COMMAND}\n# Do not edit by hand.\n");
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
