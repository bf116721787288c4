//! Builders for the Kubernetes manifests the data plane reads in local mode, and a set of
//! manifest files that can be written (atomically) into a directory and edited for hot reload.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use serde_json::{json, Value};

pub const NAMESPACE: &str = "default";
pub const API_VERSION: &str = "portcullis.dev/v1alpha1";

/// A Secret with one `stringData` entry.
pub fn secret(name: &str, key: &str, value: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "type": "Opaque",
        "stringData": {key: value}
    })
}

/// A Secret with one base64 `data` entry.
pub fn secret_data(name: &str, key: &str, value: &str) -> Value {
    let encoded = base64::engine::general_purpose::STANDARD.encode(value.as_bytes());
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "type": "Opaque",
        "data": {key: encoded}
    })
}

/// A model mapping: `(name, upstreamName)`.
pub type Model<'a> = (&'a str, Option<&'a str>);

/// A ProviderCredential. `secret` is `(secret name, key)`.
pub fn provider(
    name: &str,
    kind: &str,
    base_url: Option<&str>,
    secret: Option<(&str, &str)>,
    models: &[Model<'_>],
) -> Value {
    let models: Vec<Value> = models
        .iter()
        .map(|(name, upstream)| match upstream {
            Some(up) => json!({"name": name, "upstreamName": up}),
            None => json!({"name": name}),
        })
        .collect();
    let mut spec = json!({"kind": kind, "models": models, "priority": 0, "weight": 100});
    if let Some(url) = base_url {
        spec["baseUrl"] = json!(url);
    }
    if let Some((secret_name, key)) = secret {
        spec["secretRef"] = json!({"name": secret_name, "key": key});
    }
    json!({
        "apiVersion": API_VERSION,
        "kind": "ProviderCredential",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec
    })
}

/// An ApiKey bringing its own key from Secret `secret_name` (key `key`).
pub fn api_key(name: &str, secret_name: &str, allowed_models: &[&str]) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": "ApiKey",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "owner": format!("{name}@example.com"),
            "allowedModels": allowed_models,
            "allowedProviders": ["*"],
            "revoked": false,
            "expiresAt": "2099-01-01T00:00:00Z",
            "secretRef": {"name": secret_name, "key": "key"}
        }
    })
}

/// A KillSwitch. `scope` is e.g. `json!({"global": true})` or `json!({"provider": "openai-main"})`.
pub fn kill_switch(name: &str, scope: Value, active: bool, reason: &str) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": "KillSwitch",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"scope": scope, "active": active, "reason": reason}
    })
}

/// Renders documents as one multi-document YAML stream.
pub fn render_yaml(docs: &[Value]) -> anyhow::Result<String> {
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(doc)?);
    }
    Ok(out)
}

/// Manifest files by file name, each a list of documents.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    files: BTreeMap<String, Vec<Value>>,
    /// Files written verbatim (e.g. deliberately malformed YAML).
    raw: BTreeMap<String, String>,
}

impl Manifests {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a document to `file`.
    pub fn add(&mut self, file: &str, doc: Value) -> &mut Self {
        self.files.entry(file.to_string()).or_default().push(doc);
        self
    }

    /// Writes `content` verbatim as `file` (replacing any documents of that file).
    pub fn set_raw(&mut self, file: &str, content: &str) -> &mut Self {
        self.files.remove(file);
        self.raw.insert(file.to_string(), content.to_string());
        self
    }

    /// Drops a whole file.
    pub fn remove_file(&mut self, file: &str) -> &mut Self {
        self.files.remove(file);
        self.raw.remove(file);
        self
    }

    /// Mutable access to the document of `kind` named `name`.
    pub fn get_mut(&mut self, kind: &str, name: &str) -> Option<&mut Value> {
        self.files
            .values_mut()
            .flat_map(|docs| docs.iter_mut())
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    }

    /// Applies `f` to the document of `kind` named `name`; panics if there is none.
    pub fn update(&mut self, kind: &str, name: &str, f: impl FnOnce(&mut Value)) -> &mut Self {
        match self.get_mut(kind, name) {
            Some(doc) => f(doc),
            None => panic!("no {kind} named {name} in the test manifests"),
        }
        self
    }

    /// Removes the document of `kind` named `name` wherever it is.
    pub fn remove_object(&mut self, kind: &str, name: &str) -> &mut Self {
        for docs in self.files.values_mut() {
            docs.retain(|d| !(d["kind"] == kind && d["metadata"]["name"] == name));
        }
        self
    }

    /// `(file name, YAML)` for every file.
    pub fn render(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for (file, docs) in &self.files {
            out.push((file.clone(), render_yaml(docs)?));
        }
        for (file, content) in &self.raw {
            out.push((file.clone(), content.clone()));
        }
        Ok(out)
    }

    /// Writes every file into `dir`, each atomically (temp file + rename), and deletes YAML files
    /// in `dir` that are no longer part of the set.
    pub fn write_to(&self, dir: &Path) -> anyhow::Result<()> {
        let rendered = self.render()?;
        for (file, content) in &rendered {
            let tmp = dir.join(format!(".{file}.tmp"));
            std::fs::write(&tmp, content)?;
            std::fs::rename(&tmp, dir.join(file))?;
        }
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            if is_yaml && !rendered.iter().any(|(f, _)| *f == name) {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_multi_document_yaml() {
        let mut m = Manifests::new();
        m.add("a.yaml", secret("s", "key", "v"));
        m.add("a.yaml", api_key("alice", "s", &["gpt-*"]));
        m.update("ApiKey", "alice", |d| d["spec"]["revoked"] = json!(true));
        let files = m.render().expect("render");
        assert_eq!(files.len(), 1);
        let yaml = &files[0].1;
        assert_eq!(yaml.matches("---\n").count(), 2);
        assert!(yaml.contains("revoked: true"));
        assert!(yaml.contains("gpt-*"));
    }
}
