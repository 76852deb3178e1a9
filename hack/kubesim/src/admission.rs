//! Mutating admission webhooks, called as kube-apiserver calls them, from the
//! MutatingWebhookConfiguration objects in the store: rules, namespaceSelector, objectSelector,
//! matchConditions (CEL), AdmissionReview v1 over HTTPS verified against `caBundle`, JSONPatch,
//! failurePolicy, timeoutSeconds, the caller's identity and the dry-run flag.
//!
//! Simplifications (see the README): webhooks run once each, in the order of their configurations'
//! names (no reinvocation); `service` client configs are reached through addresses registered with
//! [`Webhooks::route_service`] (there is no cluster network); the CEL `authorizer` variable is absent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

use crate::api::{Admission, ApiError, Write};
use crate::selector::LabelSelector;
use crate::store::Store;

tokio::task_local! {
    /// Warnings webhooks returned while answering the current API request.
    pub static WARNINGS: std::cell::RefCell<Vec<String>>;
}

/// The mutating webhooks of the cluster.
pub struct Webhooks {
    store: Arc<Store>,
    /// `namespace/name` of a Service → where its webhook server really listens.
    services: RwLock<HashMap<String, SocketAddr>>,
}

/// Why one webhook call failed (subject to its failurePolicy).
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("no address is known for service {0}; register it with route_service")]
    UnknownService(String),
    #[error("the url {0} is not a loopback https address")]
    Url(String),
    #[error("invalid caBundle")]
    CaBundle,
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("context deadline exceeded")]
    Timeout,
    #[error("the webhook answered HTTP {0}")]
    Status(u16),
    #[error("the webhook's answer is not a valid AdmissionReview: {0}")]
    Answer(String),
    #[error("the webhook's JSON patch does not apply: {0}")]
    Patch(String),
}

impl Webhooks {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            services: RwLock::new(HashMap::new()),
        }
    }

    /// Sends calls for Service `namespace/name` to `addr`.
    pub fn route_service(&self, namespace: &str, name: &str, addr: SocketAddr) {
        self.services
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(format!("{namespace}/{name}"), addr);
    }

    fn configurations(&self) -> Vec<Arc<Value>> {
        let (mut items, _) = self.store.list(
            &(
                "admissionregistration.k8s.io".into(),
                "mutatingwebhookconfigurations".into(),
            ),
            None,
        );
        items.sort_by_key(|c| c["metadata"]["name"].as_str().unwrap_or_default().to_owned());
        items
    }

    async fn run(&self, write: Write<'_>) -> Result<Value, ApiError> {
        let configurations = self.configurations();
        if configurations.is_empty() {
            return Ok(write.object);
        }
        let mut object = write.object.clone();
        for config in configurations {
            for hook in config["webhooks"].as_array().into_iter().flatten() {
                let name = hook["name"].as_str().unwrap_or_default();
                if !self.applies(hook, &write, &object) {
                    continue;
                }
                let review = review(&write, &object);
                match matches_conditions(hook, &review) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        if fails_closed(hook) {
                            return Err(ApiError::internal(format!("failed calling webhook \"{name}\": {e}")));
                        }
                        tracing::warn!(webhook = name, error = %e, "matchCondition error; failurePolicy Ignore");
                        continue;
                    }
                }
                match self.call(hook, &review).await {
                    Ok(answer) => {
                        let response = &answer["response"];
                        for w in response["warnings"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                        {
                            let _ = WARNINGS.try_with(|ws| ws.borrow_mut().push(w.to_owned()));
                        }
                        if response["allowed"] != true {
                            let status = &response["status"];
                            let code = status["code"]
                                .as_u64()
                                .and_then(|c| u16::try_from(c).ok())
                                .unwrap_or(400);
                            let message = status["message"].as_str().unwrap_or_default();
                            return Err(ApiError::new(
                                code,
                                "Forbidden",
                                format!("admission webhook \"{name}\" denied the request: {message}"),
                            ));
                        }
                        match apply_patch(response, &object) {
                            Ok(Some(patched)) => object = patched,
                            Ok(None) => {}
                            Err(e) => {
                                if fails_closed(hook) {
                                    return Err(ApiError::internal(format!("failed calling webhook \"{name}\": {e}")));
                                }
                                tracing::warn!(webhook = name, error = %e, "webhook failed; failurePolicy Ignore");
                            }
                        }
                    }
                    Err(e) => {
                        if fails_closed(hook) {
                            return Err(ApiError::internal(format!(
                                "Internal error occurred: failed calling webhook \"{name}\": {e}"
                            )));
                        }
                        tracing::warn!(webhook = name, error = %e, "webhook call failed; failurePolicy Ignore");
                    }
                }
            }
        }
        Ok(object)
    }

    /// Whether the webhook's rules and selectors select this write.
    fn applies(&self, hook: &Value, write: &Write<'_>, object: &Value) -> bool {
        let t = write.resource;
        let resource = match write.subresource {
            Some(sub) => format!("{}/{sub}", t.plural),
            None => t.plural.clone(),
        };
        let one = |list: &Value, v: &str| list.as_array().is_some_and(|a| a.iter().any(|x| x == "*" || x == v));
        let rule_ok = hook["rules"].as_array().into_iter().flatten().any(|r| {
            one(&r["apiGroups"], &t.group)
                && one(&r["apiVersions"], &t.version)
                && (one(&r["resources"], &resource)
                    || (write.subresource.is_some() && one(&r["resources"], &format!("{}/*", t.plural))))
                && one(&r["operations"], write.operation)
                && match r["scope"].as_str() {
                    Some("Namespaced") => t.namespaced,
                    Some("Cluster") => !t.namespaced,
                    _ => true,
                }
        });
        if !rule_ok {
            return false;
        }
        if let Some(selector) = hook.get("namespaceSelector").filter(|s| s.is_object()) {
            let labels = if t.group.is_empty() && t.plural == "namespaces" {
                object["metadata"]["labels"].clone()
            } else if t.namespaced {
                self.store
                    .get(&("".into(), "namespaces".into()), "", write.namespace)
                    .map(|n| n["metadata"]["labels"].clone())
                    .unwrap_or(Value::Null)
            } else {
                Value::Null
            };
            if t.namespaced && !LabelSelector::from_object(selector).matches(&labels) {
                return false;
            }
        }
        if let Some(selector) = hook.get("objectSelector").filter(|s| s.is_object()) {
            let selector = LabelSelector::from_object(selector);
            let old_labels = write.old_object.as_ref().map(|o| o["metadata"]["labels"].clone());
            if !selector.matches(&object["metadata"]["labels"]) && !old_labels.is_some_and(|l| selector.matches(&l)) {
                return false;
            }
        }
        true
    }

    async fn call(&self, hook: &Value, review: &Value) -> Result<Value, CallError> {
        let client = &hook["clientConfig"];
        let (addr, server_name, path) = if let Some(url) = client["url"].as_str() {
            let rest = url.strip_prefix("https://").ok_or_else(|| CallError::Url(url.into()))?;
            let (authority, path) = rest
                .split_once('/')
                .map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
            let addr: SocketAddr = authority.parse().map_err(|_| CallError::Url(url.into()))?;
            (addr, addr.ip().to_string(), path)
        } else {
            let svc = &client["service"];
            let (ns, name) = (
                svc["namespace"].as_str().unwrap_or_default(),
                svc["name"].as_str().unwrap_or_default(),
            );
            let key = format!("{ns}/{name}");
            let addr = self
                .services
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&key)
                .copied()
                .ok_or(CallError::UnknownService(key))?;
            (
                addr,
                format!("{name}.{ns}.svc"),
                svc["path"].as_str().unwrap_or("/").to_owned(),
            )
        };
        if !addr.ip().is_loopback() {
            return Err(CallError::Url(addr.to_string()));
        }
        let ca = client["caBundle"]
            .as_str()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .ok_or(CallError::CaBundle)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca) {
            roots
                .add(cert.map_err(|_| CallError::CaBundle)?)
                .map_err(|_| CallError::CaBundle)?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| CallError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let timeout = Duration::from_secs(hook["timeoutSeconds"].as_u64().unwrap_or(10));
        let body = serde_json::to_vec(review).map_err(|e| CallError::Http(e.to_string()))?;
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| CallError::Connect(e.to_string()))?;
            let name = ServerName::try_from(server_name).map_err(|e| CallError::Tls(e.to_string()))?;
            let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
                .connect(name, tcp)
                .await
                .map_err(|e| CallError::Tls(e.to_string()))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| CallError::Http(e.to_string()))?;
            tokio::spawn(conn);
            let request = http::Request::post(format!("{path}?timeout={}s", timeout.as_secs()))
                .header(http::header::HOST, addr.to_string())
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::ACCEPT, "application/json")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| CallError::Http(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| CallError::Http(e.to_string()))?;
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError::Http(e.to_string()))?
                .to_bytes();
            if status != 200 {
                return Err(CallError::Status(status));
            }
            serde_json::from_slice::<Value>(&bytes).map_err(|e| CallError::Answer(e.to_string()))
        };
        let answer = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| CallError::Timeout)??;
        if answer["response"]["uid"] != review["request"]["uid"] {
            return Err(CallError::Answer("the response uid does not match the request".into()));
        }
        Ok(answer)
    }
}

impl Admission for Webhooks {
    fn admit<'a>(&'a self, write: Write<'a>) -> Pin<Box<dyn Future<Output = Result<Value, ApiError>> + Send + 'a>> {
        Box::pin(self.run(write))
    }
}

fn fails_closed(hook: &Value) -> bool {
    hook["failurePolicy"].as_str() != Some("Ignore")
}

/// The AdmissionReview kube-apiserver sends for `write`.
fn review(write: &Write<'_>, object: &Value) -> Value {
    let t = write.resource;
    let uid = format!("{:032x}", rand_u128());
    let options_kind = match write.operation {
        "CREATE" => "CreateOptions",
        "UPDATE" => "UpdateOptions",
        _ => "DeleteOptions",
    };
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("{}-{}-{}-{}-{}", &uid[..8], &uid[8..12], &uid[12..16], &uid[16..20], &uid[20..]),
            "kind": {"group": t.group, "version": t.version, "kind": t.kind},
            "resource": {"group": t.group, "version": t.version, "resource": t.plural},
            "subResource": write.subresource,
            "requestKind": {"group": t.group, "version": t.version, "kind": t.kind},
            "requestResource": {"group": t.group, "version": t.version, "resource": t.plural},
            "name": write.name,
            "namespace": if t.namespaced { Some(write.namespace) } else { None },
            "operation": write.operation,
            "userInfo": {"username": write.user.name, "groups": write.user.groups},
            "object": object,
            "oldObject": write.old_object.as_deref(),
            "dryRun": write.dry_run,
            "options": {"kind": options_kind, "apiVersion": "meta.k8s.io/v1"},
        }
    })
}

fn rand_u128() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    nanos ^ (u128::from(COUNTER.fetch_add(1, Ordering::Relaxed)) << 64)
}

/// Evaluates the webhook's matchConditions: `Ok(false)` when one is false.
fn matches_conditions(hook: &Value, review: &Value) -> Result<bool, String> {
    let Some(conditions) = hook["matchConditions"].as_array() else {
        return Ok(true);
    };
    let request = &review["request"];
    for c in conditions {
        let expr = c["expression"].as_str().unwrap_or("true");
        let program = cel::Program::compile(expr).map_err(|e| format!("matchCondition {:?}: {e}", c["name"]))?;
        let mut ctx = cel::Context::default();
        for (name, value) in [
            ("object", &request["object"]),
            ("oldObject", &request["oldObject"]),
            ("request", request),
        ] {
            let v = cel::to_value(value).map_err(|e| e.to_string())?;
            ctx.add_variable_from_value(name, v);
        }
        match program.execute(&ctx) {
            Ok(cel::Value::Bool(true)) => {}
            Ok(cel::Value::Bool(false)) => return Ok(false),
            Ok(other) => return Err(format!("matchCondition {:?} is not a boolean: {other:?}", c["name"])),
            Err(e) => return Err(format!("matchCondition {:?}: {e}", c["name"])),
        }
    }
    Ok(true)
}

/// The object after the response's JSONPatch (base64 text, or an array of byte values).
fn apply_patch(response: &Value, object: &Value) -> Result<Option<Value>, CallError> {
    let bytes = match &response["patch"] {
        Value::Null => return Ok(None),
        Value::String(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| CallError::Patch(e.to_string()))?,
        Value::Array(values) => values
            .iter()
            .map(|v| v.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| CallError::Patch("patch bytes out of range".into()))?,
        _ => return Err(CallError::Patch("patch is neither base64 text nor bytes".into())),
    };
    if response["patchType"].as_str().is_some_and(|t| t != "JSONPatch") {
        return Err(CallError::Patch("patchType must be JSONPatch".into()));
    }
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).map_err(|e| CallError::Patch(e.to_string()))?;
    let mut out = object.clone();
    json_patch::patch(&mut out, &patch).map_err(|e| CallError::Patch(e.to_string()))?;
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(expressions: &[&str]) -> Value {
        json!({"matchConditions": expressions.iter().enumerate().map(|(i, e)| json!({"name": format!("c{i}"), "expression": e})).collect::<Vec<_>>()})
    }

    fn update(paused_old: Option<bool>, paused_new: Option<bool>, image_new: &str) -> Value {
        let mut old = json!({"spec": {"template": {"spec": {"containers": [{"image": "a"}]}}}});
        let mut new = json!({"spec": {"template": {"spec": {"containers": [{"image": image_new}]}}}});
        if let Some(p) = paused_old {
            old["spec"]["paused"] = json!(p);
        }
        if let Some(p) = paused_new {
            new["spec"]["paused"] = json!(p);
        }
        json!({"request": {"operation": "UPDATE", "object": new, "oldObject": old, "userInfo": {"username": "alice"}}})
    }

    const TURNOUT: &str = "request.operation == 'CREATE' || object.spec.template != oldObject.spec.template || (has(object.spec.paused) && object.spec.paused) != (has(oldObject.spec.paused) && oldObject.spec.paused)";

    #[test]
    fn turnouts_match_condition_selects_template_and_paused_changes_only() {
        let h = hook(&[
            TURNOUT,
            "request.userInfo.username != 'system:serviceaccount:turnout-system:turnout'",
        ]);
        assert_eq!(
            matches_conditions(&h, &update(None, None, "b")),
            Ok(true),
            "template changed"
        );
        assert_eq!(
            matches_conditions(&h, &update(None, None, "a")),
            Ok(false),
            "nothing changed"
        );
        assert_eq!(
            matches_conditions(&h, &update(Some(true), Some(false), "a")),
            Ok(true),
            "paused changed"
        );
        assert_eq!(
            matches_conditions(&h, &update(None, Some(false), "a")),
            Ok(false),
            "absent paused is false"
        );
    }

    #[test]
    fn a_patch_in_either_encoding_applies() {
        let object = json!({"spec": {}});
        let ops = br#"[{"op":"add","path":"/spec/paused","value":true}]"#;
        let b64 = json!({"patchType": "JSONPatch", "patch": base64::engine::general_purpose::STANDARD.encode(ops)});
        let bytes = json!({"patchType": "JSONPatch", "patch": ops.iter().map(|b| json!(b)).collect::<Vec<_>>()});
        for response in [b64, bytes] {
            assert_eq!(
                apply_patch(&response, &object).unwrap(),
                Some(json!({"spec": {"paused": true}}))
            );
        }
    }
}
