//! The generated CRD schemas must be structural (what a real API server requires) and their CEL
//! rules must accept good objects and refuse bad ones.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use serde_json::{json, Value};

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

/// Every CEL rule in the CRDs, with where it sits: `(kind, JSON pointer, rule)`.
fn cel_rules() -> Vec<(String, String, String)> {
    fn walk(kind: &str, pointer: &str, node: &Value, out: &mut Vec<(String, String, String)>) {
        for rule in node.get("x-kubernetes-validations").and_then(Value::as_array).into_iter().flatten() {
            out.push((kind.to_owned(), pointer.to_owned(), rule["rule"].as_str().unwrap_or_default().to_owned()));
        }
        for (name, child) in node.get("properties").and_then(Value::as_object).into_iter().flatten() {
            walk(kind, &format!("{pointer}/properties/{name}"), child, out);
        }
        if let Some(items) = node.get("items") {
            walk(kind, &format!("{pointer}/items"), items, out);
        }
    }
    let mut out = Vec::new();
    for (kind, schema) in schemas() {
        walk(&kind, "", &schema, &mut out);
    }
    out
}

/// `value` as the API server shows it to CEL: property names that are CEL reserved words are
/// escaped as `__name__` (`namespace` is one).
fn escaped(value: &Value) -> Value {
    const RESERVED: &[&str] = &[
        "as",
        "break",
        "const",
        "continue",
        "else",
        "false",
        "for",
        "function",
        "if",
        "import",
        "in",
        "let",
        "loop",
        "package",
        "namespace",
        "null",
        "return",
        "true",
        "var",
        "void",
        "while",
    ];
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = if RESERVED.contains(&k.as_str()) { format!("__{k}__") } else { k.clone() };
                    (key, escaped(v))
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(escaped).collect()),
        other => other.clone(),
    }
}

/// Whether every rule at `pointer` of `kind` holds with `self` bound to `object`.
fn admitted(rules: &[(String, String, String)], kind: &str, pointer: &str, object: &Value) -> bool {
    let at: Vec<&String> = rules.iter().filter(|(k, p, _)| k == kind && p == pointer).map(|(_, _, r)| r).collect();
    assert!(!at.is_empty(), "no rules at {kind}{pointer}");
    at.iter().all(|rule| {
        let program = cel_interpreter::Program::compile(rule).unwrap_or_else(|e| panic!("{rule}: {e}"));
        let mut context = cel_interpreter::Context::default();
        context.add_variable("self", cel_interpreter::to_value(escaped(object)).unwrap()).unwrap();
        match program.execute(&context) {
            Ok(cel_interpreter::Value::Bool(holds)) => holds,
            other => panic!("{rule} on {object}: {other:?}"),
        }
    })
}

/// The rules parse as CEL, and each admits the objects it should and refuses the others, with
/// `self` bound the way the API server binds it. No API server here is new enough to enforce
/// them (1.25+); this is the evidence they say what they mean. It is not the API server's own
/// CEL (cel-go with the Kubernetes libraries, and its cost estimate).
#[test]
fn cel_rules_admit_good_objects_and_refuse_bad_ones() {
    let rules = cel_rules();
    for (kind, pointer, rule) in &rules {
        assert!(cel_interpreter::Program::compile(rule).is_ok(), "{kind}{pointer}: {rule} does not parse");
    }
    let secret = json!({"name": "s", "key": "k"});
    let cases: Vec<(&str, &str, Value, bool)> = vec![
        // A KillSwitch scope names exactly one target, and `global` only as true.
        ("KillSwitch", "/properties/spec/properties/scope", json!({"global": true}), true),
        ("KillSwitch", "/properties/spec/properties/scope", json!({"provider": "openai"}), true),
        ("KillSwitch", "/properties/spec/properties/scope", json!({"model": "gpt-*"}), true),
        ("KillSwitch", "/properties/spec/properties/scope", json!({"apiKey": "team-a/app"}), true),
        ("KillSwitch", "/properties/spec/properties/scope", json!({"namespace": "team-a"}), true),
        ("KillSwitch", "/properties/spec/properties/scope", json!({}), false),
        ("KillSwitch", "/properties/spec/properties/scope", json!({"global": true, "model": "m"}), false),
        ("KillSwitch", "/properties/spec/properties/scope", json!({"namespace": "a", "provider": "p"}), false),
        ("KillSwitch", "/properties/spec/properties/scope", json!({"global": false}), false),
        // A provider's key comes from a Secret except for `mock`; some kinds need more.
        ("ProviderCredential", "/properties/spec", json!({"kind": "mock"}), true),
        ("ProviderCredential", "/properties/spec", json!({"kind": "openai", "secretRef": secret}), true),
        ("ProviderCredential", "/properties/spec", json!({"kind": "openai"}), false),
        (
            "ProviderCredential",
            "/properties/spec",
            json!({"kind": "openai-compatible", "secretRef": secret, "baseUrl": "https://llm.internal"}),
            true,
        ),
        ("ProviderCredential", "/properties/spec", json!({"kind": "openai-compatible", "secretRef": secret}), false),
        (
            "ProviderCredential",
            "/properties/spec",
            json!({"kind": "azure-openai", "secretRef": secret, "baseUrl": "https://x.openai.azure.com", "azure": {}}),
            true,
        ),
        (
            "ProviderCredential",
            "/properties/spec",
            json!({"kind": "azure-openai", "secretRef": secret, "baseUrl": "https://x.openai.azure.com"}),
            false,
        ),
        // Rotation applies to generated keys only.
        ("ApiKey", "/properties/spec", json!({"owner": "a@example.com"}), true),
        ("ApiKey", "/properties/spec", json!({"rotation": "2", "rotationGracePeriodSeconds": 60}), true),
        ("ApiKey", "/properties/spec", json!({"secretRef": secret}), true),
        ("ApiKey", "/properties/spec", json!({"rotation": "2", "secretRef": secret}), false),
        ("ApiKey", "/properties/spec", json!({"rotationGracePeriodSeconds": 60, "secretRef": secret}), false),
        // A rotation is at most 253 characters; a number is its digits.
        ("ApiKey", "/properties/spec", json!({"rotation": "r".repeat(253)}), true),
        ("ApiKey", "/properties/spec", json!({"rotation": 9_223_372_036_854_775_807_i64}), true),
        ("ApiKey", "/properties/spec", json!({"rotation": "r".repeat(254)}), false),
    ];
    for (kind, pointer, object, expected) in &cases {
        assert_eq!(admitted(&rules, kind, pointer, object), *expected, "{kind}{pointer}: {object}");
    }
    // Each rule is the one that refuses at least one case on its own: none is untested.
    for (kind, pointer, rule) in &rules {
        let alone = [(kind.clone(), pointer.clone(), rule.clone())];
        let refuses = cases.iter().any(|(k, p, object, expected)| {
            !expected && k == kind && p == pointer && !admitted(&alone, kind, pointer, object)
        });
        assert!(refuses, "{kind}{pointer}: no case is refused by {rule}");
    }
}
