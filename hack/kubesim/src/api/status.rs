//! API errors as the apiserver writes them: a `Status` object with a reason and an HTTP code.

use serde_json::{Value, json};

use crate::resources::ResourceType;
use crate::store::StoreError;

/// An error answer of the API.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: Value::Null,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn not_found(t: &ResourceType, name: &str) -> Self {
        Self {
            details: json!({"name": name, "group": t.group, "kind": t.plural}),
            ..Self::new(404, "NotFound", format!("{} \"{name}\" not found", t.group_resource()))
        }
    }

    pub fn path_not_found() -> Self {
        Self::new(404, "NotFound", "the server could not find the requested resource")
    }

    pub fn already_exists(t: &ResourceType, name: &str) -> Self {
        Self {
            details: json!({"name": name, "group": t.group, "kind": t.plural}),
            ..Self::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", t.group_resource()),
            )
        }
    }

    pub fn conflict(t: &ResourceType, name: &str) -> Self {
        Self {
            details: json!({"name": name, "group": t.group, "kind": t.plural}),
            ..Self::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    t.group_resource()
                ),
            )
        }
    }

    /// 422 with field causes `(reason, field, message)`.
    pub fn invalid(t: &ResourceType, name: &str, causes: Vec<(String, String, String)>) -> Self {
        let summary: Vec<String> = causes.iter().map(|(_, field, msg)| format!("{field}: {msg}")).collect();
        let summary = if summary.len() == 1 {
            summary[0].clone()
        } else {
            format!("[{}]", summary.join(", "))
        };
        let kind = if t.group.is_empty() {
            t.kind.clone()
        } else {
            format!("{}.{}", t.kind, t.group)
        };
        let causes: Vec<Value> = causes
            .into_iter()
            .map(|(reason, field, message)| json!({"reason": reason, "field": field, "message": message}))
            .collect();
        Self {
            details: json!({"name": name, "group": t.group, "kind": t.kind, "causes": causes}),
            ..Self::new(422, "Invalid", format!("{kind} \"{name}\" is invalid: {summary}"))
        }
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml ({content_type})"
            ),
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    pub fn from_store(e: StoreError, t: &ResourceType, name: &str) -> Self {
        match e {
            StoreError::NotFound => Self::not_found(t, name),
            StoreError::AlreadyExists => Self::already_exists(t, name),
            StoreError::Conflict => Self::conflict(t, name),
            StoreError::Gone { .. } => Self::new(410, "Expired", e.to_string()),
        }
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if !self.details.is_null() {
            s["details"] = self.details.clone();
        }
        s
    }
}

/// A `Status` of success (some deletes answer it).
pub fn success(details: Value) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details})
}
