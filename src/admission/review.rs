//! AdmissionReview in, AdmissionReview out: decoding, who and what turnout leaves alone, the patch.

use json_patch::Patch;
use k8s_openapi::api::apps::v1::Deployment;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::Value;

use super::decide::{Action, Change, Target, decide};

/// What the review needs to know about the installation.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Requests from this user (the agent's service account) are admitted unchanged.
    pub agent_username: Option<String>,
}

/// A request body that is not an AdmissionReview turnout can answer (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("request body is not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error(
        "expected an AdmissionReview of apiVersion admission.k8s.io/v1, got kind {kind:?} of apiVersion {api_version:?}"
    )]
    NotAdmissionReview { api_version: String, kind: String },
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("the AdmissionReview request is malformed")]
    MalformedRequest(#[source] serde_json::Error),
}

/// Why a review ended as it did; a bounded set, used as a metrics label and a log field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// CREATE stamped with revision 1.
    Stamped,
    /// UPDATE with the template unchanged.
    Kept,
    /// A release was started (update held).
    Held,
    /// A release in flight was superseded by a newer template.
    Superseded,
    /// The template went back to the stable one during a release.
    Reverted,
    /// The Deployment opted out.
    OptedOut,
    /// The request came from the agent itself.
    Agent,
    /// Not a Deployment CREATE or UPDATE (DELETE, another kind, a subresource).
    Ignored,
    /// The object inside the review could not be read as a Deployment: admitted unchanged.
    Undecodable,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Stamped => "stamped",
            Outcome::Kept => "kept",
            Outcome::Held => "held",
            Outcome::Superseded => "superseded",
            Outcome::Reverted => "reverted",
            Outcome::OptedOut => "opted_out",
            Outcome::Agent => "agent",
            Outcome::Ignored => "ignored",
            Outcome::Undecodable => "undecodable",
        }
    }
}

/// The facts of one review, for the request's span and metrics.
#[derive(Clone, Debug)]
pub struct Facts {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub operation: Operation,
    pub dry_run: bool,
    pub outcome: Outcome,
    /// Whether the response carries a patch.
    pub patched: bool,
}

/// A decided review.
#[derive(Debug)]
pub struct Reviewed {
    pub response: AdmissionReview<DynamicObject>,
    pub facts: Facts,
}

impl Reviewed {
    /// The response as JSON, with the patch as base64 text, the way Kubernetes encodes bytes (kube's
    /// type would write an array of numbers, which the apiserver also reads but people and tools
    /// do not expect).
    ///
    /// # Errors
    ///
    /// Serialisation failed (never for these types).
    pub fn to_json(&self, pretty: bool) -> serde_json::Result<Vec<u8>> {
        use base64::Engine as _;
        let mut value = serde_json::to_value(&self.response)?;
        let patch = self.response.response.as_ref().and_then(|r| r.patch.as_ref());
        if let (Some(bytes), Some(slot)) = (patch, value.pointer_mut("/response/patch")) {
            *slot = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        if pretty {
            serde_json::to_vec_pretty(&value)
        } else {
            serde_json::to_vec(&value)
        }
    }
}

/// Answers one AdmissionReview body.
///
/// # Errors
///
/// A body that is not an `admission.k8s.io/v1` AdmissionReview with a request. A review whose object
/// cannot be read as a Deployment is not an error: it is admitted unchanged with a warning.
pub fn review(body: &[u8], config: &Config) -> Result<Reviewed, ReviewError> {
    // Fast path: a well-formed review of Deployments decodes in one pass, straight into typed objects.
    if let Ok(review) = serde_json::from_slice::<AdmissionReview<Deployment>>(body)
        && is_v1_review(&review.types)
        && let Ok::<AdmissionRequest<Deployment>, _>(mut request) = review.try_into()
    {
        let (object, old_object) = (request.object.take(), request.old_object.take());
        let verdict = admit(&request, config, || {
            Ok((object.ok_or("the request has no object")?, old_object))
        });
        return Ok(respond(&request, verdict));
    }
    // Anything else is read step by step, to tell a body that is not a review (an error) from a review
    // whose object turnout cannot read (answered: admitted unchanged, fail open).
    let mut value: Value = serde_json::from_slice(body).map_err(ReviewError::NotJson)?;
    let field = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    let (api_version, kind) = (field(&value, "apiVersion"), field(&value, "kind"));
    if api_version != "admission.k8s.io/v1" || kind != "AdmissionReview" {
        return Err(ReviewError::NotAdmissionReview { api_version, kind });
    }
    let request = value
        .get_mut("request")
        .and_then(Value::as_object_mut)
        .ok_or(ReviewError::NoRequest)?;
    let object = request.remove("object").filter(|v| !v.is_null());
    let old_object = request.remove("oldObject").filter(|v| !v.is_null());
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_value(value).map_err(ReviewError::MalformedRequest)?;
    let request: AdmissionRequest<DynamicObject> = review.try_into().map_err(|_| ReviewError::NoRequest)?;
    let verdict = admit(&request, config, || {
        let new = decode(object, "object")?;
        let old = old_object.map(|old| decode(Some(old), "oldObject")).transpose()?;
        Ok((new, old))
    });
    Ok(respond(&request, verdict))
}

fn is_v1_review(types: &kube::core::TypeMeta) -> bool {
    types.api_version == "admission.k8s.io/v1" && types.kind == "AdmissionReview"
}

fn respond<T: kube::Resource>(request: &AdmissionRequest<T>, verdict: Verdict) -> Reviewed {
    let mut response = AdmissionResponse::from(request);
    if !verdict.warnings.is_empty() {
        response.warnings = Some(verdict.warnings);
    }
    if !verdict.patch.0.is_empty() {
        // Serialising a patch of JSON values cannot fail; if it ever did, admit without a patch.
        response = match response.clone().with_patch(verdict.patch) {
            Ok(r) => r,
            Err(error) => {
                tracing::error!(%error, "could not encode the patch; admitting unchanged");
                response
            }
        };
    }
    let facts = Facts {
        uid: request.uid.clone(),
        namespace: request.namespace.clone().unwrap_or_default(),
        name: request.name.clone(),
        operation: request.operation.clone(),
        dry_run: request.dry_run,
        outcome: verdict.outcome,
        patched: response.patch.is_some(),
    };
    Reviewed {
        response: response.into_review(),
        facts,
    }
}

struct Verdict {
    outcome: Outcome,
    patch: Patch,
    warnings: Vec<String>,
}

impl Verdict {
    fn unchanged(outcome: Outcome) -> Self {
        Self {
            outcome,
            patch: Patch(Vec::new()),
            warnings: Vec::new(),
        }
    }
}

/// The request's objects, decoded: the new one and, on UPDATE, the stored one; or why they cannot be.
type Objects = Result<(Deployment, Option<Deployment>), String>;

fn admit<T: kube::Resource>(
    request: &AdmissionRequest<T>,
    config: &Config,
    objects: impl FnOnce() -> Objects,
) -> Verdict {
    if config
        .agent_username
        .as_deref()
        .is_some_and(|u| u == request.user_info.username.as_deref().unwrap_or_default())
    {
        return Verdict::unchanged(Outcome::Agent);
    }
    let is_deployment = request.kind.group == "apps"
        && request.kind.version == "v1"
        && request.kind.kind == "Deployment"
        && request.sub_resource.as_deref().unwrap_or_default().is_empty();
    let is_write = matches!(request.operation, Operation::Create | Operation::Update);
    if !is_deployment || !is_write {
        return Verdict::unchanged(Outcome::Ignored);
    }
    let (new, old) = match objects() {
        Ok(objects) => objects,
        Err(reason) => return undecodable(request, reason),
    };
    let change = match (&request.operation, &old) {
        (Operation::Update, Some(old)) => Change::Update { old },
        (Operation::Update, None) => return undecodable(request, "the UPDATE request has no oldObject".into()),
        _ => Change::Create,
    };
    let name = if request.name.is_empty() {
        new.metadata
            .name
            .as_deref()
            .or(new.metadata.generate_name.as_deref())
            .unwrap_or_default()
    } else {
        request.name.as_str()
    };
    let target = Target {
        namespace: request.namespace.as_deref().unwrap_or_default(),
        name,
    };
    let decision = decide(change, target, &new);
    let outcome = match decision.action {
        Action::OptedOut => Outcome::OptedOut,
        Action::Stamped => Outcome::Stamped,
        Action::Kept => Outcome::Kept,
        Action::Held { .. } => Outcome::Held,
        Action::Superseded { .. } => Outcome::Superseded,
        Action::Reverted { .. } => Outcome::Reverted,
    };
    Verdict {
        outcome,
        patch: json_patch::diff(&touched(&new), &touched(&decision.object)),
        warnings: decision.warnings,
    }
}

/// The parts of a Deployment a decision may change: its annotations, `spec.paused` and the pod
/// template's metadata (a decision changes the template only in its labels). The patch is the
/// difference between these parts as received and as decided, so it touches only what the decision
/// changed and applies to the request's object as sent; diffing the parts rather than the whole
/// objects spares serialising two Deployments per request.
fn touched(d: &Deployment) -> Value {
    let mut metadata = serde_json::Map::new();
    if let Some(annotations) = &d.metadata.annotations {
        metadata.insert("annotations".into(), serde_json::json!(annotations));
    }
    let mut spec = serde_json::Map::new();
    if let Some(paused) = d.spec.paused {
        spec.insert("paused".into(), Value::Bool(paused));
    }
    if let Some(template_meta) = &d.spec.template.metadata {
        // ObjectMeta serialises without failing; an error would only drop this part from the diff.
        let meta = serde_json::to_value(template_meta).unwrap_or_default();
        spec.insert("template".into(), serde_json::json!({ "metadata": meta }));
    }
    serde_json::json!({ "metadata": metadata, "spec": spec })
}

fn decode(value: Option<Value>, field: &str) -> Result<Deployment, String> {
    let value = value.ok_or_else(|| format!("the request has no {field}"))?;
    serde_json::from_value(value).map_err(|e| format!("{field} is not a valid apps/v1 Deployment: {e}"))
}

fn undecodable<T: kube::Resource>(request: &AdmissionRequest<T>, reason: String) -> Verdict {
    tracing::warn!(%reason, "admitting a Deployment turnout cannot read, unchanged");
    let who = format!("{}/{}", request.namespace.as_deref().unwrap_or_default(), request.name);
    Verdict {
        warnings: vec![format!(
            "turnout: {who} admitted unchanged, no release started: {reason}"
        )],
        ..Verdict::unchanged(Outcome::Undecodable)
    }
}
