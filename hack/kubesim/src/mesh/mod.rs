//! The mesh data plane: simulated pods that answer HTTP, client proxies that route by the applied
//! VirtualServices and DestinationRules or Gateway API HTTPRoutes and adopt changes after their own
//! delay, Istio metrics, and the HTTPRoutes' status.
//!
//! ```text
//!  watch events ──▶ controller ──▶ pod servers (podIP:containerPort, started/stopped with the pods)
//!                        │
//!                        └─ snapshot (Services+EndpointSlices, pods, VirtualServices, DestinationRules,
//!                              │       HTTPRoutes, Gateways)
//!                              │  each proxy adopts it after its own delay in [0, max]
//!                              ├──▶ once every proxy holds it: HTTPRoute status.parents (status.rs)
//!                              ▼
//!  HTTP (Host: svc.ns) ──▶ entry ──▶ proxy N: route() ──▶ connect podIP:port, forward ──▶ pod
//!                                        ├─ istio_requests_total / _duration (reporter="source")
//!                                        └─ mirrored copies (Host: …-shadow), answers dropped ──▶ pod
//!  GET /metrics ──▶ metrics server (pods report reporter="destination")
//! ```
//!
//! Routing is a pure function ([`route::route`]) over a [`snapshot::Snapshot`]; the rest is IO.

pub mod feed;
pub mod gateway;
pub mod headers;
pub mod metrics;
pub mod pod;
pub mod proxy;
pub mod rng;
pub mod route;
pub mod snapshot;
pub mod status;

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
    /// Write HTTPRoute `status.parents` (controller [`gateway::CONTROLLER_NAME`]) once every proxy has
    /// adopted a route's generation, as a Gateway API implementation does; off: an implementation that
    /// writes no status. Only for a mesh following an API server ([`Mesh::start_on_api`]).
    pub route_status: bool,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            entry_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            proxies: 4,
            max_propagation_delay: Duration::from_millis(500),
            seed: None,
            route_status: true,
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
    /// ReplicaSets, VirtualServices, DestinationRules, HTTPRoutes, Gateways); it routes once every
    /// resource was listed, and writes HTTPRoute status if `config.route_status`.
    ///
    /// # Errors
    ///
    /// An address cannot be bound.
    pub async fn start_on_api(client: kube::Client, config: &MeshConfig) -> Result<Self, MeshError> {
        let fed = feed::from_api(client.clone(), Duration::from_millis(250));
        let writer = config.route_status.then(|| status::api_writer(client));
        let mesh = Self::start_writing_status(fed, config, writer).await?;
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
    pub async fn start(fed: mpsc::UnboundedReceiver<Fed>, config: &MeshConfig) -> Result<Self, MeshError> {
        Self::start_writing_status(fed, config, None).await
    }

    /// [`Self::start`], writing HTTPRoute status with `writer` (if given and `config.route_status`).
    pub(crate) async fn start_writing_status(
        mut fed: mpsc::UnboundedReceiver<Fed>,
        config: &MeshConfig,
        writer: Option<status::Writer>,
    ) -> Result<Self, MeshError> {
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
        let mut tasks = Vec::new();
        let status = match writer.filter(|_| config.route_status) {
            Some(writer) => {
                let (tx, rx) = mpsc::unbounded_channel();
                tasks.push(AbortOnDrop(tokio::spawn(status::run(rx, writer))));
                Some(tx)
            }
            None => None,
        };
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
            status,
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
        controller.report_status(Instant::now());

        tasks.extend([
            AbortOnDrop(tokio::spawn(controller.run(fed))),
            AbortOnDrop(tokio::spawn(proxy::serve(entry, shared.clone()))),
            AbortOnDrop(tokio::spawn(serve_metrics(metrics_listener, shared.clone()))),
        ]);
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

    /// Waits until every mirrored copy sent so far has been answered or has failed, so the
    /// `reporter="destination"` metrics of the pods they reached count them. A copy is counted as sent
    /// before the answer to its request leaves the proxy: once a client has its answers, this waits for
    /// all of their copies.
    pub async fn mirrors_done(&self) {
        self.shared.mirrors_done().await;
    }
}

/// The resources the mesh follows, as [`feed::FOLLOWED`] names them.
const SERVICES: usize = 0;
const SLICES: usize = 1;
const PODS: usize = 2;
const VIRTUAL_SERVICES: usize = 3;
const DESTINATION_RULES: usize = 4;
const REPLICA_SETS: usize = 5;
const HTTP_ROUTES: usize = 6;
const GATEWAYS: usize = 7;

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
    /// Where published configurations go for HTTPRoute status (`None`: no status written).
    status: Option<mpsc::UnboundedSender<status::Work>>,
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
            HTTP_ROUTES => {
                let parsed = gateway::routes(self.all(HTTP_ROUTES));
                self.next.set_http_routes(parsed)
            }
            GATEWAYS => {
                let parsed = gateway::gateways(self.all(GATEWAYS));
                self.next.set_gateways(parsed)
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
            http_routes: self.all(HTTP_ROUTES),
            gateways: self.all(GATEWAYS),
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
        self.report_status(self.shared.proxies.settled_at());
    }

    /// Hands the current configuration to the status writer, to be reported once every proxy holds it
    /// (at `settled_at`).
    fn report_status(&self, settled_at: Instant) {
        let Some(status) = &self.status else { return };
        let routes = self
            .objects
            .get(&key(HTTP_ROUTES))
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        let _ = status.send(status::Work {
            settled_at,
            snapshot: self.current.1.clone(),
            routes,
        });
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
    out.push_str("# HELP kubesim_mesh_mirrors_in_flight Mirrored requests sent and not yet answered.\n");
    out.push_str("# TYPE kubesim_mesh_mirrors_in_flight gauge\n");
    let _ = writeln!(out, "kubesim_mesh_mirrors_in_flight {}", shared.mirrors_in_flight());
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
        let (services, slices, pods, vss, drs, routes, gateways) = (
            list("", "services"),
            list("discovery.k8s.io", "endpointslices"),
            list("", "pods"),
            list("networking.istio.io", "virtualservices"),
            list("networking.istio.io", "destinationrules"),
            list("gateway.networking.k8s.io", "httproutes"),
            list("gateway.networking.k8s.io", "gateways"),
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
            http_routes: routes.iter().map(AsRef::as_ref).collect(),
            gateways: gateways.iter().map(AsRef::as_ref).collect(),
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
                let (resource, object) = match pick(7) {
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
                    5 => (
                        res("gateway.networking.k8s.io", "httproutes"),
                        json!({"metadata": {"name": format!("route-{n}"), "namespace": ns, "generation": pick(3) + 1,
                                "creationTimestamp": format!("2024-01-0{}T00:00:00Z", pick(3) + 1)},
                            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": format!("svc-{}", pick(4))},
                                    {"name": format!("gw-{}", pick(2))}],
                                "hostnames": [format!("h{}.example.com", pick(2))],
                                "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": format!("/p{}", pick(3))}}],
                                    "backendRefs": [{"name": format!("svc-{}", pick(4)), "port": 80, "weight": pick(3)}]}]}}),
                    ),
                    6 => (
                        res("gateway.networking.k8s.io", "gateways"),
                        json!({"metadata": {"name": format!("gw-{n}"), "namespace": ns},
                            "spec": {"gatewayClassName": "kubesim"}}),
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
        // The plain Service's requests carry the pod's workload and version, as both sides report them.
        for reporter in ["source", "destination"] {
            let line = text.lines().find(|l| {
                l.starts_with("istio_requests_total{")
                    && [
                        format!(r#"reporter="{reporter}""#),
                        r#"destination_service="web.demo.svc.cluster.local""#.to_owned(),
                        r#"destination_workload="web-0""#.to_owned(),
                        r#"destination_version="v7""#.to_owned(),
                        r#"response_code="200""#.to_owned(),
                    ]
                    .iter()
                    .all(|want| l.contains(want.as_str()))
            });
            assert!(line.is_some_and(|l| l.ends_with(" 1")), "{reporter}:\n{text}");
        }
        assert!(text.contains(r#"kubesim_mesh_proxy_generation{proxy="3"} 3"#), "{text}");
    }

    /// Sends `GET path` with `Host: host` through the mesh; (status, body, flags).
    async fn request(mesh: &Mesh, host: &str, path: &str) -> (u16, String, String) {
        let request = http::Request::get(path)
            .header("host", host)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = proxy::handle(&mesh.shared, request).await;
        let flags = response.headers()[proxy::FLAGS_HEADER].to_str().unwrap().to_owned();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned(), flags)
    }

    type Writes = mpsc::UnboundedReceiver<(Id, Value, Instant)>;

    /// A status writer that hands every write to the test.
    fn recording_writer() -> (status::Writer, Writes) {
        let (tx, rx) = mpsc::unbounded_channel();
        let writer: status::Writer = Arc::new(move |id, patch| {
            let _ = tx.send((id, patch, Instant::now()));
            Box::pin(async { Ok(()) })
        });
        (writer, rx)
    }

    async fn next_write(writes: &mut Writes) -> (Id, Value, Instant) {
        tokio::time::timeout(Duration::from_secs(10), writes.recv())
            .await
            .expect("a status write within 10 s")
            .expect("the writer is alive")
    }

    fn condition<'a>(patch: &'a Value, kind: &str) -> &'a Value {
        let parents = patch["status"]["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 1, "{patch}");
        assert_eq!(parents[0]["controllerName"], gateway::CONTROLLER_NAME);
        parents[0]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in {patch}"))
    }

    fn demo_route(generation: i64, backend: &str) -> Value {
        json!({"metadata": {"name": "web", "namespace": "demo", "uid": "r1", "generation": generation},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                "rules": [{"backendRefs": [{"name": backend, "port": 80}]}]}})
    }

    #[tokio::test]
    async fn http_routes_route_to_backend_services_and_get_status_once_every_proxy_holds_them() {
        let (mut store, fed) = Objects::new();
        let service = |name: &str| {
            json!({"metadata": {"name": name, "namespace": "demo"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 18081}]}})
        };
        store.put(&res("", "services"), service("web"));
        store.put(&res("", "services"), service("web-a"));
        store.put(
            &res("discovery.k8s.io", "endpointslices"),
            json!({"metadata": {"name": "web-a-slice", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web-a"}},
                "endpoints": [{"addresses": ["127.77.0.2"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "a-0"}}],
                "ports": [{"name": "http", "port": 18081}]}),
        );
        store.put(
            &res("", "pods"),
            json!({"metadata": {"name": "a-0", "namespace": "demo", "uid": "ua", "labels": {"app": "web", "version": "v1"}},
                "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 18081}]}]},
                "status": {"podIP": "127.77.0.2"}}),
        );
        let routes = res("gateway.networking.k8s.io", "httproutes");
        store.put(&routes, demo_route(1, "web-a"));
        let config = MeshConfig {
            max_propagation_delay: Duration::from_millis(300),
            seed: Some(5),
            ..MeshConfig::default()
        };
        let (writer, mut writes) = recording_writer();
        let mesh = Mesh::start_writing_status(fed, &config, Some(writer)).await.unwrap();

        // The route holds at start: the backend Service's pod answers, and the status follows at once.
        let (status, body, flags) = request(&mesh, "web.demo", "/x").await;
        assert_eq!((status, flags.as_str()), (200, "-"), "{body}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["pod"], "a-0");
        let (id, patch, _) = next_write(&mut writes).await;
        assert_eq!(id, ("demo".to_owned(), "web".to_owned()));
        for kind in ["Accepted", "ResolvedRefs"] {
            let c = condition(&patch, kind);
            assert_eq!(
                (&c["status"], &c["reason"], &c["observedGeneration"]),
                (&json!("True"), &json!(kind), &json!(1))
            );
        }
        assert_eq!(
            patch["status"]["parents"][0]["parentRef"],
            json!({"group": "", "kind": "Service", "name": "web", "port": 80})
        );
        let text = mesh.metrics_text();
        for reporter in ["source", "destination"] {
            let routed = [
                format!(r#"reporter="{reporter}""#),
                r#"destination_service="web-a.demo.svc.cluster.local""#.to_owned(),
                r#"destination_service_name="web-a""#.to_owned(),
                r#"destination_workload="a-0""#.to_owned(),
                r#"destination_version="v1""#.to_owned(),
                r#"response_code="200""#.to_owned(),
            ];
            assert!(
                text.lines()
                    .any(|l| l.starts_with("istio_requests_total{") && routed.iter().all(|w| l.contains(w.as_str()))),
                "{reporter}:\n{text}"
            );
        }

        // A new generation naming a missing backend: reported only once every proxy holds it.
        let rv = store.put(&routes, demo_route(2, "web-b"));
        assert!(mesh.seen("httproutes", rv).await);
        let settled_at = mesh.shared.proxies.settled_at();
        let (_, patch, written_at) = next_write(&mut writes).await;
        assert!(written_at >= settled_at, "written before every proxy held the route");
        assert!(mesh.generations().iter().all(|&g| g == 2), "{:?}", mesh.generations());
        let resolved = condition(&patch, "ResolvedRefs");
        assert_eq!(
            (
                &resolved["status"],
                &resolved["reason"],
                &resolved["observedGeneration"]
            ),
            (&json!("False"), &json!("BackendNotFound"), &json!(2))
        );
        assert_eq!(condition(&patch, "Accepted")["observedGeneration"], 2);
        let (status, body, flags) = request(&mesh, "web.demo", "/").await;
        assert_eq!((status, flags.as_str()), (500, "NC"), "{body}");

        // The backend appears: the same generation resolves.
        let rv = store.put(&res("", "services"), service("web-b"));
        assert!(mesh.converged("services", rv).await);
        let (_, patch, _) = next_write(&mut writes).await;
        let resolved = condition(&patch, "ResolvedRefs");
        assert_eq!(
            (&resolved["status"], &resolved["observedGeneration"]),
            (&json!("True"), &json!(2))
        );

        // The parent Service goes: not accepted.
        let rv = store.delete(&res("", "services"), "demo", "web").unwrap();
        assert!(mesh.converged("services", rv).await);
        let (_, patch, _) = next_write(&mut writes).await;
        let accepted = condition(&patch, "Accepted");
        assert_eq!(
            (&accepted["status"], &accepted["reason"]),
            (&json!("False"), &json!("NoMatchingParent"))
        );
        assert!(writes.try_recv().is_err(), "one write per change");
    }

    #[tokio::test]
    async fn a_mesh_with_route_status_off_writes_none() {
        let (mut store, fed) = Objects::new();
        store.put(&res("gateway.networking.k8s.io", "httproutes"), demo_route(1, "web-a"));
        let config = MeshConfig {
            route_status: false,
            max_propagation_delay: Duration::from_millis(5),
            ..MeshConfig::default()
        };
        let (writer, mut writes) = recording_writer();
        let _mesh = Mesh::start_writing_status(fed, &config, Some(writer)).await.unwrap();
        // The writer was dropped unused: nothing can ever be written.
        assert!(writes.recv().await.is_none());
    }
}
