//! What the mesh is told of the cluster: every object of a followed resource after a (re)list, then
//! each change, from watches against the API server (kube-rs, as istiod and kube-proxy follow a
//! cluster). Tests of the mesh alone feed it through the same channel.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use serde_json::Value;
use tokio::sync::mpsc;

/// A resource: (API group, plural).
pub type ResourceKey = (String, String);

/// One thing the mesh learns.
#[derive(Debug)]
pub enum Fed {
    /// Every object of `resource` as it is now; `rv`: changes at or before it are already in (0: unknown;
    /// from an API server, the newest resourceVersion among the objects listed).
    Reset {
        resource: ResourceKey,
        objects: Vec<Arc<Value>>,
        rv: u64,
    },
    /// One object was created or changed (`deleted`: removed; `object` is its last state).
    Change {
        resource: ResourceKey,
        deleted: bool,
        object: Arc<Value>,
        rv: u64,
    },
}

/// The resources the mesh follows: (group, version, kind, plural).
pub const FOLLOWED: [(&str, &str, &str, &str); 8] = [
    ("", "v1", "Service", "services"),
    ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    ("", "v1", "Pod", "pods"),
    ("networking.istio.io", "v1", "VirtualService", "virtualservices"),
    ("networking.istio.io", "v1", "DestinationRule", "destinationrules"),
    ("apps", "v1", "ReplicaSet", "replicasets"),
    ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
    ("gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
];

/// Retries a failed watch at a steady pace: a resource whose CRD is installed later (Istio's, the
/// Gateway API's) is seen within this delay, as istiod would.
struct Steady(Duration);

impl Iterator for Steady {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(self.0)
    }
}

impl kube::runtime::utils::Backoff for Steady {
    fn reset(&mut self) {}
}

/// Follows an API server with one watch per followed resource. A resource that cannot be listed
/// (its CRD not installed) counts as empty until it can.
pub fn from_api(client: kube::Client, retry: Duration) -> mpsc::UnboundedReceiver<Fed> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (group, version, kind, plural) in FOLLOWED {
        let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api: kube::Api<DynamicObject> = kube::Api::all_with(client.clone(), &resource);
        let key: ResourceKey = (group.into(), plural.into());
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default()).backoff(Steady(retry)).boxed();
            let mut listing: Vec<Arc<Value>> = Vec::new();
            let mut synced = false;
            while let Some(item) = stream.next().await {
                let fed = match item {
                    Ok(watcher::Event::Init) => {
                        listing.clear();
                        continue;
                    }
                    Ok(watcher::Event::InitApply(o)) => {
                        if let Some(v) = value_of(o, group, version, kind) {
                            listing.push(v);
                        }
                        continue;
                    }
                    Ok(watcher::Event::InitDone) => {
                        synced = true;
                        // The list holds every change up to its own version, so at least up to the
                        // newest object in it: an object written before the watch started is seen.
                        let rv = listing.iter().map(|o| rv_of(o)).max().unwrap_or_default();
                        Fed::Reset {
                            resource: key.clone(),
                            objects: std::mem::take(&mut listing),
                            rv,
                        }
                    }
                    Ok(watcher::Event::Apply(o)) => match value_of(o, group, version, kind) {
                        Some(object) => change(&key, false, object),
                        None => continue,
                    },
                    Ok(watcher::Event::Delete(o)) => match value_of(o, group, version, kind) {
                        Some(object) => change(&key, true, object),
                        None => continue,
                    },
                    Err(error) => {
                        tracing::debug!(resource = plural, error = %crate::report(&error), "mesh: watch failed; retrying");
                        if synced {
                            continue;
                        }
                        // Not listable yet: empty for now, so the mesh is not held up by it.
                        synced = true;
                        Fed::Reset {
                            resource: key.clone(),
                            objects: Vec::new(),
                            rv: 0,
                        }
                    }
                };
                if tx.send(fed).is_err() {
                    return;
                }
            }
        });
    }
    rx
}

fn rv_of(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn change(resource: &ResourceKey, deleted: bool, object: Arc<Value>) -> Fed {
    let rv = rv_of(&object);
    Fed::Change {
        resource: resource.clone(),
        deleted,
        object,
        rv,
    }
}

/// The object as JSON with its apiVersion and kind (watch events of a list carry neither).
fn value_of(object: DynamicObject, group: &str, version: &str, kind: &str) -> Option<Arc<Value>> {
    let mut value = serde_json::to_value(object).ok()?;
    let api_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    value["apiVersion"] = Value::String(api_version);
    value["kind"] = Value::String(kind.to_owned());
    Some(Arc::new(value))
}
