//! Writes HTTPRoute `status.parents` as a Gateway API implementation does, once the configuration that
//! holds a route's generation has been adopted by every proxy (so a client that waits for
//! `observedGeneration` knows the route is in force everywhere). Runs beside routing and never holds it
//! up: the controller hands each published configuration over and moves on; a failed write is logged
//! at debug and tried again with the next configuration.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::gateway::{self, CONTROLLER_NAME, ParentStatus};
use super::snapshot::{Id, Snapshot};

/// Writes one route's status: (namespace, name) and the merge patch `{"status": ...}`.
pub type Writer = Arc<dyn Fn(Id, Value) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A published configuration, with the HTTPRoute objects it was built from.
#[derive(Debug)]
pub struct Work {
    /// When every proxy holds it (or a newer one).
    pub settled_at: Instant,
    pub snapshot: Arc<Snapshot>,
    pub routes: Vec<Arc<Value>>,
}

/// Writes through the API server's status subresource (a JSON merge patch, as a controller does).
pub fn api_writer(client: kube::Client) -> Writer {
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(gateway::GROUP, "v1", "HTTPRoute"), "httproutes");
    Arc::new(move |(namespace, name): Id, patch: Value| {
        let api: kube::Api<DynamicObject> = kube::Api::namespaced_with(client.clone(), &namespace, &resource);
        Box::pin(async move {
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
                .map_err(|e| crate::report(&e))
        })
    })
}

/// What was last written for a route: its uid, generation and the mesh's entries.
type Written = HashMap<Id, (String, i64, Vec<ParentStatus>)>;

/// Writes the status of every route of the newest configuration all proxies hold, until `work` closes.
pub async fn run(mut work: mpsc::UnboundedReceiver<Work>, writer: Writer) {
    let mut queue: VecDeque<Work> = VecDeque::new();
    let mut written = Written::new();
    loop {
        while let Ok(more) = work.try_recv() {
            queue.push_back(more);
        }
        // A proxy adopts generations in order and never goes back, so once a configuration is held
        // everywhere, so is every earlier one: the newest settled one is what counts.
        let now = Instant::now();
        if let Some(i) = queue.iter().rposition(|w| w.settled_at <= now) {
            queue.drain(..i);
            if let Some(settled) = queue.pop_front() {
                write(&settled, &writer, &mut written).await;
            }
            continue;
        }
        let next = queue.iter().map(|w| w.settled_at).min();
        tokio::select! {
            more = work.recv() => match more {
                Some(more) => queue.push_back(more),
                None => return,
            },
            () = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Brings every route's status in line with `work`, skipping those already written so.
async fn write(work: &Work, writer: &Writer, written: &mut Written) {
    let now = now_rfc3339();
    let mut live = HashSet::with_capacity(work.routes.len());
    for object in &work.routes {
        let meta = &object["metadata"];
        let id: Id = (
            meta["namespace"].as_str().unwrap_or_default().to_owned(),
            meta["name"].as_str().unwrap_or_default().to_owned(),
        );
        live.insert(id.clone());
        let uid = meta["uid"].as_str().unwrap_or_default().to_owned();
        let route = gateway::route(object);
        let ours = gateway::parent_statuses(&route, &work.snapshot);
        let want = (uid, route.generation, ours);
        if written.get(&id) == Some(&want) {
            continue;
        }
        let has_ours = object["status"]["parents"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["controllerName"] == CONTROLLER_NAME));
        if want.2.is_empty() && !has_ours {
            written.insert(id, want);
            continue;
        }
        let status = gateway::status(object, &want.2, route.generation, &now);
        match writer(id.clone(), json!({ "status": status })).await {
            Ok(()) => {
                tracing::debug!(route = %route.key(), generation = route.generation, "mesh: HTTPRoute status written");
                written.insert(id, want);
            }
            Err(error) => {
                tracing::debug!(route = %route.key(), %error, "mesh: cannot write HTTPRoute status; retrying with the next change");
                written.remove(&id);
            }
        }
    }
    written.retain(|id, _| live.contains(id));
}
