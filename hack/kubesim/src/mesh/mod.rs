//! The mesh data plane: simulated pods that answer HTTP, client proxies that route by the applied
//! VirtualServices and DestinationRules and adopt changes after their own delay, and Istio metrics.
//!
//! ```text
//!  watch events ──▶ controller ──▶ pod servers (podIP:containerPort, started/stopped with the pods)
//!                        │
//!                        └─ snapshot (Services+EndpointSlices, pods, VirtualServices, DestinationRules)
//!                              │  each proxy adopts it after its own delay in [0, max]
//!                              ▼
//!  HTTP (Host: svc.ns) ──▶ entry ──▶ proxy N: route() ──▶ connect podIP:port, forward ──▶ pod
//!                                        └─ istio_requests_total / _duration (reporter="source")
//!  GET /metrics ──▶ metrics server (pods report reporter="destination")
//! ```
//!
//! Routing is a pure function ([`route::route`]) over a [`snapshot::Snapshot`]; the rest is IO.

pub mod feed;
pub mod metrics;
pub mod pod;
pub mod proxy;
pub mod rng;
pub mod route;
pub mod snapshot;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use feed::{Fed, ResourceKey};
use metrics::Metrics;
use pod::{AbortOnDrop, PodServer};
use proxy::{Proxies, Published, Shared};
use rng::Rng;
use snapshot::{Id, Snapshot};

/// Options of the mesh.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// Where requests enter the mesh (port 0: any free port).
    pub entry_addr: SocketAddr,
    /// Where `/metrics` is served (port 0: any free port).
    pub metrics_addr: SocketAddr,
    /// How many client proxies (at least one).
    pub proxies: usize,
    /// The longest a proxy takes to adopt a configuration or endpoint change.
    pub max_propagation_delay: Duration,
    /// Seed of the random choices (delays, weights, endpoints, error rates); `None`: from the clock.
    pub seed: Option<u64>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            entry_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            proxies: 4,
            max_propagation_delay: Duration::from_millis(500),
            seed: None,
        }
    }
}

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot listen on {addr} for the mesh entry")]
    BindEntry {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} for the mesh metrics")]
    BindMetrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running mesh; stops (listeners, pods, proxies) when dropped.
pub struct Mesh {
    entry_addr: SocketAddr,
    metrics_addr: SocketAddr,
    shared: Arc<Shared>,
    /// Per resource, the newest version taken in (0 until a change with one).
    processed: watch::Receiver<HashMap<ResourceKey, u64>>,
    synced: watch::Receiver<bool>,
    _tasks: Vec<AbortOnDrop>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("entry_addr", &self.entry_addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// Starts the mesh following an API server with watches (Services, EndpointSlices, pods,
    /// ReplicaSets, VirtualServices, DestinationRules); it routes once every resource was listed.
    ///
    /// # Errors
    ///
    /// An address cannot be bound.
    pub async fn start_on_api(client: kube::Client, config: &MeshConfig) -> Result<Self, MeshError> {
        let fed = feed::from_api(client, Duration::from_millis(250));
        let mesh = Self::start(fed, config).await?;
        let mut synced = mesh.synced.clone();
        let _ = synced.wait_for(|s| *s).await;
        Ok(mesh)
    }

    /// Starts the mesh on what `fed` tells (a watch of an API server, or a test's own feed): its pods
    /// start answering, and the entry and metrics listen. What `fed` told before this returns is what
    /// every proxy holds from the start.
    ///
    /// # Errors
    ///
    /// An address cannot be bound.
    pub async fn start(mut fed: mpsc::UnboundedReceiver<Fed>, config: &MeshConfig) -> Result<Self, MeshError> {
        let bind_entry = |source| MeshError::BindEntry {
            addr: config.entry_addr,
            source,
        };
        let bind_metrics = |source| MeshError::BindMetrics {
            addr: config.metrics_addr,
            source,
        };
        let entry = TcpListener::bind(config.entry_addr).await.map_err(bind_entry)?;
        let entry_addr = entry.local_addr().map_err(bind_entry)?;
        let metrics_listener = TcpListener::bind(config.metrics_addr).await.map_err(bind_metrics)?;
        let metrics_addr = metrics_listener.local_addr().map_err(bind_metrics)?;

        let mut seeds = config.seed.map_or_else(Rng::from_entropy, Rng::new);
        let empty: Published = (0, Arc::new(Snapshot::default()));
        let proxies = Proxies::new(config.proxies, config.max_propagation_delay, empty, seeds.next_u64());
        let shared = Arc::new(Shared::new(proxies, Arc::new(Metrics::default()), seeds.next_u64()));

        let (processed_tx, processed) = watch::channel(HashMap::new());
        let (synced_tx, synced) = watch::channel(false);
        let mut controller = Controller {
            shared: shared.clone(),
            objects: HashMap::new(),
            list_rv: HashMap::new(),
            workloads: HashMap::new(),
            servers: BTreeMap::new(),
            refused: HashSet::new(),
            slices_of: HashMap::new(),
            next: Snapshot::default(),
            current: (0, Arc::new(Snapshot::default())),
            processed: processed_tx,
            synced: synced_tx,
            seeds,
        };
        // Take in what is already told, as the state every proxy starts with.
        let mut seen = HashMap::new();
        while let Ok(first) = fed.try_recv() {
            controller.take(first, &mut seen).await;
        }
        controller.next = controller.snapshot();
        controller.processed.send_replace(seen);
        controller.current = (1, Arc::new(controller.next.clone()));
        shared.proxies.install(&controller.current);

        let tasks = vec![
            AbortOnDrop(tokio::spawn(controller.run(fed))),
            AbortOnDrop(tokio::spawn(proxy::serve(entry, shared.clone()))),
            AbortOnDrop(tokio::spawn(serve_metrics(metrics_listener, shared.clone()))),
        ];
        tracing::info!(entry = %entry_addr, metrics = %metrics_addr, proxies = shared.proxies.len(), "mesh is up");
        Ok(Self {
            entry_addr,
            metrics_addr,
            shared,
            processed,
            synced,
            _tasks: tasks,
        })
    }

    /// Where requests enter the mesh (`Host: <service>.<namespace>`).
    pub fn entry_addr(&self) -> SocketAddr {
        self.entry_addr
    }

    /// Where `/metrics` is served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The configuration generation each proxy holds.
    pub fn generations(&self) -> Vec<u64> {
        self.shared.proxies.generations()
    }

    /// The metrics, as `/metrics` serves them.
    pub fn metrics_text(&self) -> String {
        render_metrics(&self.shared)
    }

    /// Waits until the mesh has taken in the change of `resource` (its plural, e.g. `pods`) at
    /// resourceVersion `rv`, or a later one: pods started or stopped, the new configuration sent to the
    /// proxies (which may not hold it yet). Each resource's changes arrive in order, so every earlier
    /// change of it is in too. False if the mesh stopped.
    pub async fn seen(&self, resource: &str, rv: u64) -> bool {
        let mut processed = self.processed.clone();
        processed
            .wait_for(|seen| seen.iter().any(|((_, plural), at)| plural == resource && *at >= rv))
            .await
            .is_ok()
    }

    /// Waits until every proxy has adopted the newest configuration the mesh has built (at most the
    /// propagation delay after it was built).
    pub async fn settled(&self) {
        tokio::time::sleep_until(self.shared.proxies.settled_at()).await;
    }

    /// [`Self::seen`], then [`Self::settled`]: the change is routed by every proxy.
    pub async fn converged(&self, resource: &str, rv: u64) -> bool {
        let seen = self.seen(resource, rv).await;
        self.settled().await;
        seen
    }
}

/// The resources the mesh follows, as [`feed::FOLLOWED`] names them.
const SERVICES: usize = 0;
const SLICES: usize = 1;
const PODS: usize = 2;
const VIRTUAL_SERVICES: usize = 3;
const DESTINATION_RULES: usize = 4;
const REPLICA_SETS: usize = 5;

fn key(i: usize) -> ResourceKey {
    (feed::FOLLOWED[i].0.to_owned(), feed::FOLLOWED[i].3.to_owned())
}

fn id_of(object: &Value) -> Id {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_owned(),
        meta["name"].as_str().unwrap_or_default().to_owned(),
    )
}

fn uid_of(object: &Value) -> &str {
    object["metadata"]["uid"].as_str().unwrap_or_default()
}

/// Follows the cluster: keeps the objects routing needs, runs the pods, publishes snapshots.
///
/// The next snapshot is kept up to date change by change (the entry of the Service, pod, ... that
/// changed, not the whole configuration), and published as a clone that shares every namespace that
/// did not change with the previous one: a batch of changes costs what it changed, not the cluster's size.
struct Controller {
    shared: Arc<Shared>,
    objects: HashMap<ResourceKey, BTreeMap<Id, Arc<Value>>>,
    /// The resourceVersion of each resource's last list: older changes are already in it.
    list_rv: HashMap<ResourceKey, u64>,
    /// Pod uid → workload.
    workloads: HashMap<String, String>,
    servers: BTreeMap<Id, PodServer>,
    /// Pod uids that cannot be served (reported once).
    refused: HashSet<String>,
    /// EndpointSlice names by the Service (namespace, name) they belong to.
    slices_of: HashMap<Id, BTreeSet<String>>,
    /// The configuration as the objects are now.
    next: Snapshot,
    /// The configuration last sent to the proxies.
    current: Published,
    processed: watch::Sender<HashMap<ResourceKey, u64>>,
    /// Every followed resource has been listed.
    synced: watch::Sender<bool>,
    seeds: Rng,
}

impl Controller {
    async fn run(mut self, mut fed: mpsc::UnboundedReceiver<Fed>) {
        loop {
            let Some(first) = fed.recv().await else { return };
            let mut seen = HashMap::new();
            let mut dirty = self.take(first, &mut seen).await;
            // Take whatever else is queued, to publish one snapshot for the batch.
            while let Ok(more) = fed.try_recv() {
                dirty |= self.take(more, &mut seen).await;
            }
            if dirty {
                self.publish();
            }
            self.processed.send_if_modified(|processed| {
                let mut newer = false;
                for (resource, rv) in seen {
                    let at = processed.entry(resource).or_default();
                    newer |= rv > *at;
                    *at = (*at).max(rv);
                }
                newer
            });
        }
    }

    /// Takes one thing learnt in; returns whether the next snapshot changed. `seen`: the newest version
    /// of each resource.
    async fn take(&mut self, fed: Fed, seen: &mut HashMap<ResourceKey, u64>) -> bool {
        match fed {
            Fed::Reset { resource, objects, rv } => {
                let at = seen.entry(resource.clone()).or_default();
                *at = (*at).max(rv);
                self.reset(resource, objects, rv).await;
                true
            }
            Fed::Change {
                resource,
                deleted,
                object,
                rv,
            } => {
                let at = seen.entry(resource.clone()).or_default();
                *at = (*at).max(rv);
                self.apply(&resource, deleted, object, rv).await
            }
        }
    }

    /// Replaces every object of one resource (after a list) and brings the pods in line.
    async fn reset(&mut self, resource: ResourceKey, objects: Vec<Arc<Value>>, rv: u64) {
        let objects: BTreeMap<Id, Arc<Value>> = objects.into_iter().map(|o| (id_of(&o), o)).collect();
        self.objects.insert(resource.clone(), objects);
        self.list_rv.insert(resource.clone(), rv);
        if resource == key(PODS) {
            let ids: HashSet<Id> = self.servers.keys().chain(self.pods().keys()).cloned().collect();
            for id in ids {
                self.sync_pod(&id).await;
            }
            let live: HashSet<String> = self.pods().values().map(|p| uid_of(p).to_owned()).collect();
            self.workloads.retain(|uid, _| live.contains(uid));
            self.refused.retain(|uid| live.contains(uid));
        }
        if resource == key(REPLICA_SETS) {
            self.workloads.clear();
        }
        if resource == key(SLICES) {
            self.slices_of.clear();
            for slice in self.objects.get(&key(SLICES)).into_iter().flat_map(BTreeMap::values) {
                if let Some(service) = snapshot::slice_service(slice) {
                    let (ns, name) = id_of(slice);
                    self.slices_of.entry((ns, service.to_owned())).or_default().insert(name);
                }
            }
        }
        if self.objects.len() == feed::FOLLOWED.len() {
            self.synced.send_if_modified(|s| !std::mem::replace(s, true));
        }
        self.next = self.snapshot();
    }

    fn pods(&self) -> &BTreeMap<Id, Arc<Value>> {
        static EMPTY: BTreeMap<Id, Arc<Value>> = BTreeMap::new();
        self.objects.get(&key(PODS)).unwrap_or(&EMPTY)
    }

    /// Takes one change in and brings the next snapshot in line; returns whether that changed it.
    async fn apply(&mut self, resource: &ResourceKey, deleted: bool, object: Arc<Value>, rv: u64) -> bool {
        let Some(i) = feed::FOLLOWED
            .iter()
            .position(|(g, _, _, p)| resource.0 == *g && resource.1 == *p)
        else {
            return false;
        };
        if rv != 0 && rv <= self.list_rv.get(resource).copied().unwrap_or_default() {
            return false;
        }
        let id = id_of(&object);
        let objects = self.objects.entry(key(i)).or_default();
        let previous = if deleted {
            objects.remove(&id)
        } else {
            objects.insert(id.clone(), object.clone())
        };
        match i {
            SERVICES => self.update_service(&id),
            SLICES => {
                let before = previous.as_deref().and_then(snapshot::slice_service);
                let after = (!deleted).then(|| snapshot::slice_service(&object)).flatten();
                let mut changed = false;
                for (service, member) in [(before, false), (after, true)] {
                    let Some(service) = service else { continue };
                    let service = (id.0.clone(), service.to_owned());
                    let names = self.slices_of.entry(service.clone()).or_default();
                    if member {
                        names.insert(id.1.clone());
                    } else {
                        names.remove(&id.1);
                    }
                    if names.is_empty() {
                        self.slices_of.remove(&service);
                    }
                    changed |= self.update_service(&service);
                }
                changed
            }
            PODS => {
                if deleted {
                    self.workloads.remove(uid_of(&object));
                    self.refused.remove(uid_of(&object));
                }
                self.sync_pod(&id).await;
                self.update_pod(&id)
            }
            VIRTUAL_SERVICES => {
                let parsed = snapshot::virtual_services(self.all(VIRTUAL_SERVICES));
                self.next.set_virtual_services(parsed)
            }
            DESTINATION_RULES => {
                let parsed = snapshot::destination_rules(self.all(DESTINATION_RULES));
                self.next.set_destination_rules(parsed)
            }
            // A pod's workload is read from its ReplicaSet when the pod is first seen.
            REPLICA_SETS => false,
            _ => false,
        }
    }

    /// Every object of followed resource `i`.
    fn all(&self, i: usize) -> Vec<&Value> {
        self.objects
            .get(&key(i))
            .map(|m| m.values().map(|o| o.as_ref()).collect())
            .unwrap_or_default()
    }

    /// Brings a Service's entry in the next snapshot in line with it and its slices.
    fn update_service(&mut self, id: &Id) -> bool {
        let service = self.objects.get(&key(SERVICES)).and_then(|m| m.get(id)).map(|object| {
            let slices = self.objects.get(&key(SLICES));
            let own = self.slices_of.get(id).into_iter().flatten().filter_map(|name| {
                slices
                    .and_then(|m| m.get(&(id.0.clone(), name.clone())))
                    .map(|s| s.as_ref())
            });
            snapshot::service_with_slices(object, own)
        });
        self.next.set_service(id, service)
    }

    /// Brings a pod's entry in the next snapshot in line with it and its server.
    fn update_pod(&mut self, id: &Id) -> bool {
        let pod = match self.pods().get(id).cloned() {
            Some(object) => {
                let workload = self.workload(&object);
                let listeners = self.servers.get(id).map(|s| s.listeners.clone()).unwrap_or_default();
                Some(snapshot::pod(&object, workload, listeners))
            }
            None => None,
        };
        self.next.set_pod(id, pod)
    }

    /// Starts the pod's server once it has an IP, replaces it if the pod was recreated, stops it when
    /// the pod is gone (its process exited: open connections are cut).
    async fn sync_pod(&mut self, id: &Id) {
        let Some(pod) = self.pods().get(id).cloned() else {
            if let Some(server) = self.servers.remove(id) {
                server.stop().await;
                tracing::debug!(pod = %id.1, namespace = %id.0, "mesh: pod stopped");
            }
            return;
        };
        let uid = uid_of(&pod).to_owned();
        if self.servers.get(id).is_some_and(|s| s.uid == uid) {
            return;
        }
        if let Some(replaced) = self.servers.remove(id) {
            replaced.stop().await;
        }
        if pod["status"]["podIP"].as_str().is_none_or(str::is_empty) || self.refused.contains(&uid) {
            return;
        }
        let workload = self.workload(&pod);
        match PodServer::start(&pod, &workload, self.shared.metrics.clone(), self.seeds.next_u64()) {
            Ok(server) => {
                tracing::debug!(pod = %id.1, namespace = %id.0, listeners = ?server.listeners, "mesh: pod serving");
                self.servers.insert(id.clone(), server);
            }
            Err(error) => {
                tracing::warn!(pod = %id.1, namespace = %id.0, error = %crate::report(&error), "mesh: pod cannot serve");
                self.refused.insert(uid);
            }
        }
    }

    fn workload(&mut self, pod: &Value) -> String {
        let uid = uid_of(pod).to_owned();
        if let Some(w) = self.workloads.get(&uid) {
            return w.clone();
        }
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default().to_owned();
        let replica_sets = self.objects.get(&key(REPLICA_SETS));
        let workload = snapshot::workload_of(pod, |name| {
            replica_sets
                .and_then(|m| m.get(&(ns.clone(), name.to_owned())))
                .cloned()
        });
        self.workloads.insert(uid, workload.clone());
        workload
    }

    /// The routing configuration as the objects are now, built from scratch (at start and after a relist).
    fn snapshot(&mut self) -> Snapshot {
        let pods: Vec<Arc<Value>> = self.pods().values().cloned().collect();
        let pods: Vec<(Arc<Value>, String, BTreeMap<u16, SocketAddr>)> = pods
            .into_iter()
            .map(|p| {
                let workload = self.workload(&p);
                let listeners = self
                    .servers
                    .get(&id_of(&p))
                    .map(|s| s.listeners.clone())
                    .unwrap_or_default();
                (p, workload, listeners)
            })
            .collect();
        snapshot::build(snapshot::Objects {
            services: self.all(SERVICES),
            slices: self.all(SLICES),
            pods: pods
                .iter()
                .map(|(p, w, l)| (p.as_ref(), w.clone(), l.clone()))
                .collect(),
            virtual_services: self.all(VIRTUAL_SERVICES),
            destination_rules: self.all(DESTINATION_RULES),
        })
    }

    /// Sends the configuration to the proxies if it changed.
    fn publish(&mut self) {
        if self.next == *self.current.1 {
            return;
        }
        self.current = (self.current.0 + 1, Arc::new(self.next.clone()));
        tracing::debug!(generation = self.current.0, "mesh: configuration changed");
        self.shared.proxies.publish(&self.current, Instant::now());
    }
}

/// `/metrics`: Istio's metrics and the proxies' generations.
fn render_metrics(shared: &Shared) -> String {
    let mut out = shared.metrics.render();
    out.push_str("# HELP kubesim_mesh_proxy_generation The configuration generation a simulated proxy holds.\n");
    out.push_str("# TYPE kubesim_mesh_proxy_generation gauge\n");
    for (i, g) in shared.proxies.generations().iter().enumerate() {
        let _ = writeln!(out, "kubesim_mesh_proxy_generation{{proxy=\"{i}\"}} {g}");
    }
    out
}

/// Serves `/metrics` until dropped.
async fn serve_metrics(listener: TcpListener, shared: Arc<Shared>) {
    serve_http1(listener, "metrics", move |req| {
        let shared = shared.clone();
        async move {
            let (status, content_type, body) = if req.uri().path() == "/metrics" {
                (
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    render_metrics(&shared),
                )
            } else {
                (StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".to_owned())
            };
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            response
        }
    })
    .await;
}

/// Accepts HTTP/1.1 connections on `listener` and answers them with `handler` until dropped;
/// dropping also drops (closes) every open connection. `what` names the server in logs.
pub(crate) async fn serve_http1<H, F>(listener: TcpListener, what: &'static str, handler: H)
where
    H: Fn(http::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                tracing::debug!(%error, server = what, "mesh: accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let handler = handler.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use serde_json::json;

    fn res(group: &str, plural: &str) -> ResourceKey {
        (group.into(), plural.into())
    }

    /// What an API server's watches would tell the mesh, kept by hand: objects and versions.
    struct Objects {
        tx: mpsc::UnboundedSender<Fed>,
        objects: BTreeMap<(ResourceKey, String, String), Arc<Value>>,
        rv: u64,
    }

    impl Objects {
        fn new() -> (Self, mpsc::UnboundedReceiver<Fed>) {
            let (tx, rx) = mpsc::unbounded_channel();
            let objects = Self {
                tx,
                objects: BTreeMap::new(),
                rv: 0,
            };
            (objects, rx)
        }

        fn id(object: &Value) -> (String, String) {
            let name = |k: &str| object["metadata"][k].as_str().unwrap_or_default().to_owned();
            (name("namespace"), name("name"))
        }

        /// Creates or replaces `object`; returns its new version.
        fn put(&mut self, resource: &ResourceKey, mut object: Value) -> u64 {
            self.rv += 1;
            object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
            let (ns, name) = Self::id(&object);
            let object = Arc::new(object);
            self.objects.insert((resource.clone(), ns, name), object.clone());
            self.send(resource, false, object)
        }

        /// Deletes an object if it exists; returns the version of the deletion.
        fn delete(&mut self, resource: &ResourceKey, ns: &str, name: &str) -> Option<u64> {
            let object = self.objects.remove(&(resource.clone(), ns.into(), name.into()))?;
            self.rv += 1;
            let mut gone = (*object).clone();
            gone["metadata"]["resourceVersion"] = json!(self.rv.to_string());
            Some(self.send(resource, true, Arc::new(gone)))
        }

        fn send(&self, resource: &ResourceKey, deleted: bool, object: Arc<Value>) -> u64 {
            let change = Fed::Change {
                resource: resource.clone(),
                deleted,
                object,
                rv: self.rv,
            };
            self.tx.send(change).unwrap();
            self.rv
        }

        fn get(&self, resource: &ResourceKey, ns: &str, name: &str) -> Option<Arc<Value>> {
            self.objects.get(&(resource.clone(), ns.into(), name.into())).cloned()
        }

        fn list(&self, resource: &ResourceKey) -> Vec<Arc<Value>> {
            let of = |(r, _, _): &&(ResourceKey, String, String)| r == resource;
            self.objects
                .iter()
                .filter(|(k, _)| of(k))
                .map(|(_, v)| v.clone())
                .collect()
        }
    }

    fn slice(ready: bool) -> Value {
        json!({"metadata": {"name": "web-slice", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
            "endpoints": [{"addresses": ["127.77.0.1"], "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": "web-0"}}],
            "ports": [{"name": "", "port": 18080}]})
    }

    async fn get(mesh: &Mesh) -> (u16, String, String) {
        let request = http::Request::get("/hi")
            .header("host", "web.demo")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = proxy::handle(&mesh.shared, request).await;
        let flags = response.headers()[proxy::FLAGS_HEADER].to_str().unwrap().to_owned();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned(), flags)
    }

    /// The snapshot of what `objects` holds, built from scratch (pods without addresses: no listeners).
    fn from_scratch(store: &Objects) -> Snapshot {
        let list = |group: &str, plural: &str| store.list(&res(group, plural));
        let (services, slices, pods, vss, drs) = (
            list("", "services"),
            list("discovery.k8s.io", "endpointslices"),
            list("", "pods"),
            list("networking.istio.io", "virtualservices"),
            list("networking.istio.io", "destinationrules"),
        );
        let rs = res("apps", "replicasets");
        snapshot::build(snapshot::Objects {
            services: services.iter().map(AsRef::as_ref).collect(),
            slices: slices.iter().map(AsRef::as_ref).collect(),
            pods: pods
                .iter()
                .map(|p| {
                    let ns = p["metadata"]["namespace"].as_str().unwrap();
                    let workload = snapshot::workload_of(p, |name| store.get(&rs, ns, name));
                    (p.as_ref(), workload, BTreeMap::new())
                })
                .collect(),
            virtual_services: vss.iter().map(AsRef::as_ref).collect(),
            destination_rules: drs.iter().map(AsRef::as_ref).collect(),
        })
    }

    #[tokio::test]
    async fn the_snapshot_kept_change_by_change_is_the_one_built_from_scratch() {
        let (mut store, fed) = Objects::new();
        let config = MeshConfig {
            max_propagation_delay: Duration::from_millis(5),
            seed: Some(7),
            ..MeshConfig::default()
        };
        let mesh = Mesh::start(fed, &config).await.unwrap();
        let mut last = ("pods".to_owned(), 0);
        let mut rng = Rng::new(11);
        let mut pick = |n: u64| rng.below(n);
        for round in 0..30 {
            for _ in 0..25 {
                let ns = ["a", "b"][pick(2) as usize];
                let n = pick(4);
                let (resource, object) = match pick(5) {
                    0 => (
                        res("", "services"),
                        json!({"metadata": {"name": format!("svc-{n}"), "namespace": ns},
                            "spec": {"ports": [{"name": "http", "port": 80 + pick(2), "targetPort": 8080}]}}),
                    ),
                    1 => (
                        res("discovery.k8s.io", "endpointslices"),
                        json!({"metadata": {"name": format!("slice-{n}"), "namespace": ns,
                                "labels": {"kubernetes.io/service-name": format!("svc-{}", pick(4))}},
                            "endpoints": [{"addresses": [format!("127.77.0.{}", pick(9) + 1)],
                                "conditions": {"ready": pick(2) == 0},
                                "targetRef": {"kind": "Pod", "name": format!("pod-{}", pick(4))}}],
                            "ports": [{"name": "http", "port": 8080 + pick(2)}]}),
                    ),
                    2 => (
                        res("", "pods"),
                        json!({"metadata": {"name": format!("pod-{n}"), "namespace": ns, "uid": format!("{ns}-{n}-{round}"),
                                "labels": {"app": "web", "version": format!("v{}", pick(3))}},
                            "spec": {"containers": [{"name": "c"}]}}),
                    ),
                    3 => (
                        res("networking.istio.io", "virtualservices"),
                        json!({"metadata": {"name": format!("vs-{n}"), "namespace": ns},
                            "spec": {"hosts": [format!("svc-{}", pick(4))],
                                "http": [{"route": [{"destination": {"host": "svc-0", "subset": "v1"}, "weight": pick(101)}]}]}}),
                    ),
                    _ => (
                        res("networking.istio.io", "destinationrules"),
                        json!({"metadata": {"name": format!("dr-{n}"), "namespace": ns},
                            "spec": {"host": format!("svc-{}", pick(4)),
                                "subsets": [{"name": "v1", "labels": {"version": format!("v{}", pick(3))}}]}}),
                    ),
                };
                let name = object["metadata"]["name"].as_str().unwrap().to_owned();
                let rv = if pick(4) == 0 {
                    store.delete(&resource, ns, &name)
                } else {
                    Some(store.put(&resource, object))
                };
                if let Some(rv) = rv {
                    last = (resource.1.clone(), rv);
                }
            }
            // One channel in order: the last change taken in means every earlier one is too.
            assert!(mesh.converged(&last.0, last.1).await);
            let held = mesh.shared.proxies.view(0, Instant::now()).1;
            assert!(*held == from_scratch(&store), "round {round}: {held:#?}");
        }
    }

    #[tokio::test]
    async fn pods_serve_while_they_exist_and_proxies_follow_endpoint_changes() {
        let (mut store, fed) = Objects::new();
        store.put(
            &res("", "services"),
            json!({"metadata": {"name": "web", "namespace": "demo"},
                "spec": {"ports": [{"port": 80, "targetPort": 18080}]}}),
        );
        store.put(&res("discovery.k8s.io", "endpointslices"), slice(true));
        store.put(
            &res("", "pods"),
            json!({"metadata": {"name": "web-0", "namespace": "demo", "uid": "u1",
                "labels": {"app": "web", "version": "v7"}},
                "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 18080}]}]},
                "status": {"podIP": "127.77.0.1"}}),
        );
        let config = MeshConfig {
            max_propagation_delay: Duration::from_millis(50),
            seed: Some(1),
            ..MeshConfig::default()
        };
        let mesh = Mesh::start(fed, &config).await.unwrap();

        // What exists at start is known to every proxy at once.
        let (status, body, flags) = get(&mesh).await;
        assert_eq!((status, flags.as_str()), (200, "-"), "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body,
            json!({"pod": "web-0", "namespace": "demo", "version": "v7", "path": "/hi"})
        );

        // An unready endpoint gets no traffic, once the proxies know.
        let mut unready = (*store
            .get(&res("discovery.k8s.io", "endpointslices"), "demo", "web-slice")
            .unwrap())
        .clone();
        unready["endpoints"] = slice(false)["endpoints"].clone();
        let rv = store.put(&res("discovery.k8s.io", "endpointslices"), unready);
        assert!(mesh.converged("endpointslices", rv).await);
        assert_eq!(mesh.generations(), vec![2; 4]);
        let (status, body, flags) = get(&mesh).await;
        assert_eq!(
            (status, body.as_str(), flags.as_str()),
            (503, "no healthy upstream", "UH")
        );

        // A deleted pod stops listening.
        let addr = mesh
            .shared
            .proxies
            .view(0, Instant::now())
            .1
            .pod("demo", "web-0")
            .unwrap()
            .listeners[&18080];
        assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
        let rv = store.delete(&res("", "pods"), "demo", "web-0").unwrap();
        assert!(mesh.seen("pods", rv).await);
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{addr} still accepts"
        );

        mesh.settled().await;
        let text = mesh.metrics_text();
        assert!(
            text.contains(r#"destination_workload="web-0""#),
            "a bare pod is its own workload"
        );
        assert!(text.contains(r#"kubesim_mesh_proxy_generation{proxy="3"} 3"#), "{text}");
    }
}
