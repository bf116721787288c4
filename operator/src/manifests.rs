//! Reads Kubernetes YAML — the files you would `kubectl apply` — into `CompileInputs`.
//!
//! Multi-document files, `v1` Secrets (`data` and `stringData`), the three Portcullis kinds, and
//! `v1 List`. Other kinds (Namespaces, Deployments …) are skipped so a GitOps folder can be read
//! as it is. Objects without a namespace land in `default`, as `kubectl apply` would put them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use portcullis_crds::secret::SecretBytes;
use portcullis_crds::v1alpha1::{ApiKey, KillSwitch, ObjectRef, ProviderCredential};
use serde::Deserialize;

use crate::inputs::CompileInputs;

/// Largest manifest file read.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Most files read from one folder.
pub const MAX_FILES: usize = 10_000;
const PORTCULLIS_API: &str = "portcullis.dev/v1alpha1";

/// A document that could not be read, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub source: String,
    /// 1-based document number within the file, 0 for the file as a whole.
    pub document: usize,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document == 0 {
            write!(f, "{}: {}", self.source, self.message)
        } else {
            write!(f, "{} (document {}): {}", self.source, self.document, self.message)
        }
    }
}

impl std::error::Error for ManifestError {}

/// Counts of what was read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadSummary {
    pub files: usize,
    pub objects: usize,
    pub skipped: usize,
}

/// Adds every object in `text` (one file) to `inputs`.
pub fn add_yaml(
    inputs: &mut CompileInputs,
    text: &str,
    source: &str,
    summary: &mut ReadSummary,
) -> Result<(), ManifestError> {
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let fail = |message: String| ManifestError { source: source.to_owned(), document: index + 1, message };
        let value = serde_yaml::Value::deserialize(document).map_err(|e| fail(e.to_string()))?;
        add_value(inputs, value, summary).map_err(fail)?;
    }
    Ok(())
}

/// Why a Secret document cannot be read, without its values: serde's type errors quote the value
/// they refused (`invalid type: string "sk-…", expected a map`), and this text reaches logs and
/// CI output. Messages that only name a field are kept.
fn secret_invalid(error: &serde_yaml::Error) -> String {
    let message = error.to_string();
    let names_a_field =
        ["missing field `", "unknown field `", "duplicate field `"].iter().any(|p| message.starts_with(p));
    if names_a_field {
        format!("Secret is invalid: {message}")
    } else {
        "Secret is invalid: a field does not have the expected type or shape (data and stringData map key \
         names to string values); the value is not shown"
            .to_owned()
    }
}

fn add_value(inputs: &mut CompileInputs, value: serde_yaml::Value, summary: &mut ReadSummary) -> Result<(), String> {
    if value.is_null() {
        return Ok(());
    }
    let api_version = value.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let described = |e: serde_yaml::Error| format!("{kind} is invalid: {e}");
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = value.get("items").and_then(|v| v.as_sequence()).cloned().unwrap_or_default();
            for item in items {
                add_value(inputs, item, summary)?;
            }
            return Ok(());
        }
        ("v1", "Secret") => {
            let secret: Secret = serde_yaml::from_value(value).map_err(|e| secret_invalid(&e))?;
            add_secret(inputs, secret)?;
        }
        (PORTCULLIS_API, "ApiKey") => {
            let mut object: ApiKey = serde_yaml::from_value(value).map_err(described)?;
            object.metadata.namespace.get_or_insert_with(|| "default".to_owned());
            inputs.api_keys.push(object);
        }
        (PORTCULLIS_API, "ProviderCredential") => {
            let mut object: ProviderCredential = serde_yaml::from_value(value).map_err(described)?;
            object.metadata.namespace.get_or_insert_with(|| "default".to_owned());
            inputs.credentials.push(object);
        }
        (PORTCULLIS_API, "KillSwitch") => {
            let mut object: KillSwitch = serde_yaml::from_value(value).map_err(described)?;
            object.metadata.namespace.get_or_insert_with(|| "default".to_owned());
            inputs.kill_switches.push(object);
        }
        (api, kind) if api.starts_with("portcullis.dev/") => {
            return Err(format!("unknown Portcullis resource {api} {kind}"));
        }
        _ => {
            summary.skipped += 1;
            return Ok(());
        }
    }
    summary.objects += 1;
    Ok(())
}

fn add_secret(inputs: &mut CompileInputs, secret: Secret) -> Result<(), String> {
    let name = secret.metadata.name.clone().ok_or("Secret has no metadata.name")?;
    let namespace = secret.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned());
    let mut data: BTreeMap<String, SecretBytes> = BTreeMap::new();
    for (key, value) in secret.data.unwrap_or_default() {
        data.insert(key, SecretBytes::new(value.0));
    }
    // As in the API server, stringData wins over data for the same key.
    for (key, value) in secret.string_data.unwrap_or_default() {
        data.insert(key, SecretBytes::new(value.into_bytes()));
    }
    inputs.secrets.insert(ObjectRef::new(namespace, name), data);
    Ok(())
}

/// The `.yaml`/`.yml` files directly in `dir`, sorted, so reads are repeatable.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let fail = |message: String| ManifestError { source: dir.display().to_string(), document: 0, message };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| fail(e.to_string()))? {
        let path = entry.map_err(|e| fail(e.to_string()))?.path();
        let is_yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
        let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        if is_yaml && !hidden && path.is_file() {
            files.push(path);
        }
    }
    if files.len() > MAX_FILES {
        return Err(fail(format!("more than {MAX_FILES} manifest files")));
    }
    files.sort();
    Ok(files)
}

/// Reads every manifest file in `dir` into fresh inputs.
pub fn read_dir(dir: &Path) -> Result<(CompileInputs, ReadSummary), ManifestError> {
    let mut inputs = CompileInputs::default();
    let mut summary = ReadSummary::default();
    for path in manifest_files(dir)? {
        let source = path.display().to_string();
        let fail = |message: String| ManifestError { source: source.clone(), document: 0, message };
        let size = std::fs::metadata(&path).map_err(|e| fail(e.to_string()))?.len();
        if size > MAX_FILE_BYTES {
            return Err(fail(format!("file is larger than {MAX_FILE_BYTES} bytes")));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| fail(e.to_string()))?;
        add_yaml(&mut inputs, &text, &source, &mut summary)?;
        summary.files += 1;
    }
    Ok((inputs, summary))
}
