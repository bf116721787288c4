//! Assertions shared by the integration tests: error bodies in OpenAI and Anthropic style, and
//! the headers every response must carry.

use crate::client::Response;

/// Asserts an OpenAI-style error: status, `x-portcullis-error-code`, `x-request-id`, and
/// `{"error":{"message":…,"type":…,"param":null,"code":code}}`.
#[track_caller]
pub fn openai_error(resp: &Response, status: u16, code: &str) {
    assert_eq!(resp.status.as_u16(), status, "status; response: {}", resp.describe());
    assert_eq!(resp.error_code(), Some(code), "x-portcullis-error-code; response: {}", resp.describe());
    has_request_id(resp);
    let body = resp.json();
    let err = &body["error"];
    assert!(err.is_object(), "OpenAI error body must have an `error` object: {}", resp.describe());
    assert_eq!(err["code"], code, "error.code; response: {}", resp.describe());
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "error.message; response: {}", resp.describe());
    assert!(err["type"].as_str().is_some_and(|t| !t.is_empty()), "error.type; response: {}", resp.describe());
    assert!(err.get("param").is_some(), "error.param must be present (null); response: {}", resp.describe());
    assert!(
        resp.header("content-type").is_some_and(|c| c.starts_with("application/json")),
        "content-type of error; response: {}",
        resp.describe()
    );
}

/// Asserts an Anthropic-style error: status, `x-portcullis-error-code`, `x-request-id`, and
/// `{"type":"error","error":{"type":error_type,"message":…}}`. `error_type` `None` accepts any.
#[track_caller]
pub fn anthropic_error(resp: &Response, status: u16, code: &str, error_type: Option<&str>) {
    assert_eq!(resp.status.as_u16(), status, "status; response: {}", resp.describe());
    assert_eq!(resp.error_code(), Some(code), "x-portcullis-error-code; response: {}", resp.describe());
    has_request_id(resp);
    let body = resp.json();
    assert_eq!(body["type"], "error", "Anthropic error body type; response: {}", resp.describe());
    let ty = body["error"]["type"].as_str().unwrap_or_default();
    assert!(!ty.is_empty(), "error.type; response: {}", resp.describe());
    if let Some(expected) = error_type {
        assert_eq!(ty, expected, "error.type; response: {}", resp.describe());
    }
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error.message; response: {}",
        resp.describe()
    );
}

/// Asserts a non-empty `x-request-id`.
#[track_caller]
pub fn has_request_id(resp: &Response) {
    assert!(
        resp.request_id().is_some_and(|id| !id.trim().is_empty()),
        "every response needs x-request-id; response: {}",
        resp.describe()
    );
}

/// Asserts a 200 with a request id.
#[track_caller]
pub fn ok(resp: &Response) {
    assert_eq!(resp.status.as_u16(), 200, "expected 200; response: {}", resp.describe());
    has_request_id(resp);
}
