//! EndpointSlices for Services: one slice per Service with the addresses of the pods it selects and
//! their ready / serving / terminating conditions.

use serde_json::{Value, json};

use super::Ctx;
use super::{pod_ready, system};
use crate::api::ApiError;
use crate::selector::LabelSelector;

/// The port of `pod` a Service port's `targetPort` names (a number, or a container port's name).
fn target_port(service_port: &Value, pod: &Value) -> Option<i64> {
    match &service_port["targetPort"] {
        Value::Number(n) => n.as_i64(),
        Value::String(name) => pod["spec"]["containers"]
            .as_array()?
            .iter()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_i64()),
        _ => service_port["port"].as_i64(),
    }
}

pub(super) async fn sync(ctx: &mut Ctx, ns: &str) -> Result<(), ApiError> {
    let Some(slice_type) = ctx.resource("discovery.k8s.io", "v1", "endpointslices") else {
        return Ok(());
    };
    let store = &ctx.api.store;
    let (services, _) = store.list(&("".into(), "services".into()), Some(ns));
    if services.is_empty() {
        return Ok(());
    }
    let (pods, _) = store.list(&("".into(), "pods".into()), Some(ns));
    for svc in services {
        let Some(selector) = svc["spec"]["selector"].as_object().filter(|s| !s.is_empty()) else {
            continue;
        };
        let selector = LabelSelector::from_object(&json!({"matchLabels": selector}));
        let svc_name = svc["metadata"]["name"].as_str().unwrap_or_default();
        let ports: Vec<Value> = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
        let mut endpoints = Vec::new();
        let mut slice_ports = Vec::new();
        for pod in pods.iter().filter(|p| selector.matches(&p["metadata"]["labels"])) {
            let Some(ip) = pod["status"]["podIP"].as_str() else {
                continue;
            };
            let terminating = pod["metadata"].get("deletionTimestamp").is_some();
            let ready = pod_ready(pod);
            endpoints.push(json!({
                "addresses": [ip],
                "conditions": {"ready": ready && !terminating, "serving": ready, "terminating": terminating},
                "targetRef": {"kind": "Pod", "namespace": ns, "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]},
            }));
            if slice_ports.is_empty() {
                slice_ports = ports
                    .iter()
                    .map(|p| json!({"name": p["name"].as_str().unwrap_or(""), "protocol": p["protocol"].as_str().unwrap_or("TCP"),
                        "port": target_port(p, pod)}))
                    .collect();
            }
        }
        endpoints.sort_by_key(|e| e["targetRef"]["name"].as_str().unwrap_or_default().to_owned());
        let name = format!("{svc_name}-slice");
        let desired = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {"kubernetes.io/service-name": svc_name, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc_name, "uid": svc["metadata"]["uid"],
                    "controller": true, "blockOwnerDeletion": true}],
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": slice_ports,
        });
        match store.get(&("discovery.k8s.io".into(), "endpointslices".into()), ns, &name) {
            None => {
                ctx.api.create(&system(), &slice_type, ns, desired, false).await?;
            }
            Some(current) if current["endpoints"] != desired["endpoints"] || current["ports"] != desired["ports"] => {
                let mut next = (*current).clone();
                next["endpoints"] = desired["endpoints"].clone();
                next["ports"] = desired["ports"].clone();
                ctx.api
                    .update(&system(), &slice_type, ns, &name, None, next, false)
                    .await?;
            }
            Some(_) => {}
        }
    }
    Ok(())
}
