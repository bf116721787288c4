//! The committed CRD YAML must match the Rust types.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use portcullis_operator::crdgen::{render, COMMITTED_PATH, REGENERATE_COMMAND};

#[test]
fn committed_crds_match_the_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(COMMITTED_PATH);
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = render().expect("render CRDs");
    assert!(
        committed == generated,
        "{COMMITTED_PATH} is out of date with the Rust types. Regenerate it with:\n    {REGENERATE_COMMAND}"
    );
}

#[test]
fn every_schema_field_has_a_description() {
    // `kubectl explain` shows these; an undocumented field is a bug.
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, child) in props {
                let child_path = format!("{path}.{name}");
                let documented = child.get("description").and_then(|d| d.as_str()).is_some_and(|d| !d.is_empty());
                if !documented && !["metadata", "apiVersion", "kind"].contains(&name.as_str()) {
                    missing.push(child_path.clone());
                }
                walk(&child_path, child, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for crd in portcullis_operator::crdgen::crds() {
        let json = serde_json::to_value(&crd).expect("json");
        let schema = &json["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        walk(&crd.spec.names.kind, schema, &mut missing);
    }
    assert!(missing.is_empty(), "fields without a description: {missing:#?}");
}
