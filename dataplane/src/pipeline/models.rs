//! `GET /v1/models`: the models this key may use, in OpenAI's format, or Anthropic's when the
//! client sends `anthropic-version` (as the Anthropic SDK does).

use http::{Response, StatusCode};
use portcullis_crds::pattern;
use portcullis_crds::snapshot::ApiKeyEntry;
use serde_json::json;

use crate::body::{json_response, GatewayBody};
use crate::fields::HeaderFields;
use crate::snapshot::{ModelRoute, RuntimeSnapshot};

pub fn list(snapshot: &RuntimeSnapshot, key: &ApiKeyEntry, headers: &impl HeaderFields) -> Response<GatewayBody> {
    let anthropic = headers.has("anthropic-version");
    let usable = |r: &ModelRoute| {
        r.upstream.serves(key)
            && pattern::any_matches_or_empty(&key.allowed_providers, &r.upstream.id.name)
            && (!anthropic || r.upstream.kind.serves_anthropic_routes())
    };
    let mut models: Vec<(&str, &str)> = snapshot
        .listed_models()
        .filter(|(name, _)| pattern::any_matches_or_empty(&key.allowed_models, name))
        .filter_map(|(name, routes)| routes.iter().find(|r| usable(r)).map(|r| (name, r.upstream.kind.as_str())))
        .collect();
    models.sort_unstable();
    let body = if anthropic {
        let data: Vec<_> = models
            .iter()
            .map(|(id, _)| json!({"type": "model", "id": id, "display_name": id, "created_at": "1970-01-01T00:00:00Z"}))
            .collect();
        json!({"data": data, "has_more": false, "first_id": models.first().map(|m| m.0), "last_id": models.last().map(|m| m.0)})
    } else {
        let data: Vec<_> = models
            .iter()
            .map(|(id, owner)| json!({"id": id, "object": "model", "created": 0, "owned_by": owner}))
            .collect();
        json!({"object": "list", "data": data})
    };
    json_response(StatusCode::OK, &body)
}
