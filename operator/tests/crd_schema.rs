//! The generated CRD schemas must be structural (what a real API server requires) and their CEL
//! rules must accept good objects and refuse bad ones.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use serde_json::Value;

/// Fields allowed to keep unknown content. None: every field is typed.
const PRESERVE_UNKNOWN_ALLOWED: &[&str] = &[];

fn schemas() -> Vec<(String, Value)> {
    portcullis_operator::crdgen::crds()
        .into_iter()
        .map(|crd| {
            let json = serde_json::to_value(&crd).expect("json");
            (crd.spec.names.kind.clone(), json["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone())
        })
        .collect()
}

/// Walks one schema node, recording every violation of the structural-schema rules
/// (<https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema>).
fn walk(path: &str, node: &Value, problems: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        problems.push(format!("{path}: schema is not an object"));
        return;
    };
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if preserve && !PRESERVE_UNKNOWN_ALLOWED.contains(&path) {
        problems.push(format!("{path}: x-kubernetes-preserve-unknown-fields is not meant here"));
    }
    for forbidden in ["$ref", "$defs", "definitions", "$schema", "not"] {
        if obj.contains_key(forbidden) {
            problems.push(format!("{path}: `{forbidden}` is not allowed"));
        }
    }
    let ty = obj.get("type").and_then(Value::as_str);
    if ty.is_none() && !int_or_string && !preserve {
        problems.push(format!("{path}: has no `type`"));
    }
    if obj.contains_key("enum") && ty.is_none() {
        problems.push(format!("{path}: enum without `type`"));
    }
    if obj.contains_key("properties") && ty != Some("object") {
        problems.push(format!("{path}: properties on a non-object"));
    }
    if obj.contains_key("additionalProperties") {
        if ty != Some("object") {
            problems.push(format!("{path}: additionalProperties on a non-object"));
        }
        if obj.contains_key("properties") {
            problems.push(format!("{path}: properties and additionalProperties together"));
        }
    }
    if ty == Some("array") && !obj.contains_key("items") {
        problems.push(format!("{path}: array without `items`"));
    }
    for junction in ["anyOf", "oneOf", "allOf"] {
        let Some(branches) = obj.get(junction) else {
            continue;
        };
        if ty.is_none() && !int_or_string {
            problems.push(format!("{path}: {junction} without a `type` beside it"));
        }
        for (i, branch) in branches.as_array().into_iter().flatten().enumerate() {
            let Some(branch) = branch.as_object() else {
                continue;
            };
            // int-or-string's `anyOf: [{type: integer}, {type: string}]` is the one permitted
            // typed junction.
            let typed_ok = int_or_string && branch.len() == 1 && branch.contains_key("type");
            for key in [
                "type",
                "description",
                "default",
                "nullable",
                "additionalProperties",
                "x-kubernetes-preserve-unknown-fields",
                "x-kubernetes-validations",
            ] {
                if branch.contains_key(key) && !typed_ok {
                    problems.push(format!("{path}.{junction}[{i}]: `{key}` inside a junction"));
                }
            }
        }
    }
    if let Some(rules) = obj.get("x-kubernetes-validations") {
        for rule in rules.as_array().into_iter().flatten() {
            let text = rule.get("rule").and_then(Value::as_str).unwrap_or_default();
            let message = rule.get("message").and_then(Value::as_str).unwrap_or_default();
            if text.is_empty() || message.is_empty() {
                problems.push(format!("{path}: CEL rule without rule text or message"));
            }
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            // ObjectMeta is the API server's, not ours.
            if path.matches('.').count() == 0 && name == "metadata" {
                continue;
            }
            walk(&format!("{path}.{name}"), child, problems);
        }
    }
    if let Some(items) = obj.get("items") {
        walk(&format!("{path}[]"), items, problems);
    }
    if let Some(Value::Object(_)) = obj.get("additionalProperties") {
        walk(&format!("{path}{{}}"), &obj["additionalProperties"], problems);
    }
}

#[test]
fn every_schema_is_structural() {
    let mut problems = Vec::new();
    for (kind, schema) in schemas() {
        walk(&kind, &schema, &mut problems);
    }
    assert!(problems.is_empty(), "non-structural schema: {problems:#?}");
}

#[test]
fn the_walker_catches_non_structural_schemas() {
    let bad = serde_json::json!({
        "type": "object",
        "properties": {
            "untyped": {"description": "x"},
            "enumNoType": {"enum": ["a"]},
            "junction": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "arr": {"type": "array"},
            "loose": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
        }
    });
    let mut problems = Vec::new();
    walk("Bad", &bad, &mut problems);
    for expected in [
        "Bad.untyped: has no `type`",
        "Bad.enumNoType: enum without `type`",
        "Bad.junction: anyOf without a `type` beside it",
        "Bad.arr: array without `items`",
        "Bad.loose: x-kubernetes-preserve-unknown-fields is not meant here",
    ] {
        assert!(problems.iter().any(|p| p == expected), "missing {expected:?} in {problems:#?}");
    }
}

fn rules_at(kind: &str, pointer: &str) -> Vec<String> {
    let (_, schema) = schemas().into_iter().find(|(k, _)| k == kind).expect("kind");
    schema
        .pointer(pointer)
        .and_then(|node| node.get("x-kubernetes-validations"))
        .and_then(Value::as_array)
        .map(|rules| rules.iter().filter_map(|r| r["rule"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

#[test]
fn cross_field_rules_are_declared() {
    let scope = rules_at("KillSwitch", "/properties/spec/properties/scope");
    assert!(scope.iter().any(|r| r.contains(".size() == 1")), "{scope:?}");
    let credential = rules_at("ProviderCredential", "/properties/spec");
    assert!(credential.iter().any(|r| r.contains("has(self.secretRef)")), "{credential:?}");
    let api_key = rules_at("ApiKey", "/properties/spec");
    assert!(api_key.iter().any(|r| r.contains("has(self.rotation)")), "{api_key:?}");
    let (_, schema) = schemas().into_iter().find(|(k, _)| k == "ApiKey").expect("ApiKey");
    let name = &schema["properties"]["spec"]["properties"]["secretRef"]["properties"]["name"];
    assert_eq!(name["minLength"], 1, "{name}");
}

/// Every string and list under `spec` that a person types must be bounded: the API server
/// refuses an oversized object at the door instead of the operator carrying it into the
/// snapshot. What is exempt has a fixed shape of its own (an enum, a date-time, an int-or-string).
fn unbounded(path: &str, node: &Value, found: &mut Vec<String>) {
    let fixed_shape =
        node.get("enum").is_some() || node.get("format").is_some() || node.get("x-kubernetes-int-or-string").is_some();
    match node.get("type").and_then(Value::as_str) {
        Some("string") if !fixed_shape && node.get("maxLength").is_none() => found.push(path.to_owned()),
        Some("array") => {
            if node.get("maxItems").is_none() {
                found.push(path.to_owned());
            }
            unbounded(&format!("{path}[]"), &node["items"], found);
        }
        _ => {}
    }
    for (name, child) in node.get("properties").and_then(Value::as_object).into_iter().flatten() {
        unbounded(&format!("{path}.{name}"), child, found);
    }
}

#[test]
fn every_spec_string_and_list_is_bounded() {
    let mut found = Vec::new();
    for (kind, schema) in schemas() {
        unbounded(&format!("{kind}.spec"), &schema["properties"]["spec"], &mut found);
    }
    assert!(found.is_empty(), "unbounded spec fields: {found:#?}");

    // The walker itself finds what it must.
    let loose = serde_json::json!({"type": "object", "properties": {
        "text": {"type": "string"},
        "list": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
        "when": {"type": "string", "format": "date-time"},
    }});
    let mut found = Vec::new();
    unbounded("X", &loose, &mut found);
    assert_eq!(found, ["X.list[]", "X.text"]);
}
