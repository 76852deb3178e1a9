//! A minimal OpenAPI v3 for kubectl: per group/version, the PATCH operation of every resource with
//! its `fieldValidation` parameter, which is how kubectl learns that the server validates fields
//! itself (so it sends `fieldValidation=Strict` instead of downloading schemas). No schemas are
//! published: kubectl then merges built-in types with its own compiled-in knowledge.

use serde_json::{Value, json};

use crate::resources::Registry;

/// `/openapi/v3`: the group/versions and where their documents are.
pub fn root(registry: &Registry) -> Value {
    let mut paths = serde_json::Map::new();
    for t in registry.all() {
        let gv = gv_path(&t.group, &t.version);
        paths.insert(
            gv.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash=kubesim")}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v3/api/v1` or `/openapi/v3/apis/GROUP/VERSION`.
pub fn group_version(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    for t in registry.all().filter(|t| t.group == group && t.version == version) {
        let base = format!("/{}", gv_path(group, version));
        let path = if t.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
        } else {
            format!("{base}/{}/{{name}}", t.plural)
        };
        let gvk = json!({"group": t.group, "version": t.version, "kind": t.kind});
        let parameters = json!([
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        ]);
        paths.insert(
            path,
            json!({
                "patch": {
                    "operationId": format!("patch{}", t.kind),
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": gvk,
                    "parameters": parameters,
                    "responses": {"200": {"description": "OK"}},
                },
            }),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0-kubesim"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}
