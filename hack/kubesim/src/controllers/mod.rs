//! Control-plane stand-ins: the Deployment and ReplicaSet controllers, a kubelet, EndpointSlices and
//! garbage collection, driven by the store's changes and by timers (readiness delays, grace periods,
//! progress deadlines).
//!
//! One task runs them all: changes and timers queue keys (each key once while it waits), and the task
//! reconciles the queue one key at a time, yielding every couple of milliseconds, so a long queue never
//! holds up the API or the watches. Controllers write through the API as a system user, like kube-controller-manager.

mod deployment;
mod endpoints;
mod gc;
mod kubelet;
mod replicaset;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::api::{Api, ApiError};
use crate::resources::ResourceType;
use crate::sim::Config;
use crate::store::{Event, EventType};

/// An object to reconcile: (kind, namespace, name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Key {
    Deployment(String, String),
    ReplicaSet(String, String),
    Pod(String, String),
    /// Every Service of a namespace (their EndpointSlices).
    Endpoints(String),
    /// Garbage collection over every object.
    Sweep,
}

/// What the controllers share: the API, the options, and the timers they set.
pub(crate) struct Ctx {
    pub api: Arc<Api>,
    pub config: Config,
    timers: BinaryHeap<Reverse<(Instant, Key)>>,
    next_ip: u32,
    /// Second octet of this instance's pod addresses (1..=100).
    ip_base: u32,
    /// When something happened to an object, precisely (API timestamps have whole seconds):
    /// (namespace, name) → what → instant.
    moments: HashMap<(String, String), Vec<(&'static str, Instant)>>,
}

impl Ctx {
    /// Reconcile `key` again at `at`.
    pub fn after(&mut self, delay: Duration, key: Key) {
        self.timers.push(Reverse((Instant::now() + delay, key)));
    }

    /// A fresh pod IP on the loopback network (127.A.0.1 and up, A chosen per instance so instances
    /// running side by side rarely share addresses), so simulated pods are reachable.
    pub fn pod_ip(&mut self) -> String {
        loop {
            self.next_ip += 1;
            let n = self.next_ip;
            let (a, b, c) = (self.ip_base + ((n >> 16) & 0x7f), (n >> 8) & 0xff, n & 0xff);
            if c != 0 && c != 255 {
                return format!("127.{a}.{b}.{c}");
            }
        }
    }

    /// When `what` first happened to `ns/name` (recorded now if never before).
    pub fn moment(&mut self, ns: &str, name: &str, what: &'static str) -> Instant {
        let moments = self.moments.entry((ns.to_owned(), name.to_owned())).or_default();
        match moments.iter().find(|(w, _)| *w == what) {
            Some((_, at)) => *at,
            None => {
                let at = Instant::now();
                moments.push((what, at));
                at
            }
        }
    }

    /// Forgets the moments of an object that is gone.
    pub fn forget(&mut self, ns: &str, name: &str) {
        self.moments.remove(&(ns.to_owned(), name.to_owned()));
    }

    pub fn resource(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.api.registry().get(group, version, plural)
    }
}

/// Starts every controller.
pub fn start(api: Arc<Api>, config: &Config) -> Vec<JoinHandle<()>> {
    let events = api.store.subscribe();
    let ctx = Ctx {
        api,
        config: config.clone(),
        timers: BinaryHeap::new(),
        next_ip: 0,
        ip_base: 1
            + (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
                % 100),
        moments: Default::default(),
    };
    vec![tokio::spawn(run(ctx, events))]
}

/// How often every Deployment and ReplicaSet is reconciled again, and garbage collected, whatever
/// changed: a safety net (timers cover deadlines and delays, changes cover the rest). The next resync is
/// due a full interval after the previous one was queued, so a slow queue never makes them pile up.
const RESYNC: Duration = Duration::from_secs(10);

/// How long the controllers run before they let the API and the watches have the thread.
const SLICE: Duration = Duration::from_millis(2);

/// Keys waiting to be reconciled, in the order they were first marked, each once: a key marked again
/// while it waits keeps its place (the reconcile will see the newest state anyway).
#[derive(Default)]
pub(crate) struct Queue {
    order: VecDeque<Key>,
    queued: HashSet<Key>,
}

impl Queue {
    pub fn insert(&mut self, key: Key) {
        if !self.queued.contains(&key) {
            self.queued.insert(key.clone());
            self.order.push_back(key);
        }
    }

    fn pop(&mut self) -> Option<Key> {
        let key = self.order.pop_front()?;
        self.queued.remove(&key);
        Some(key)
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

async fn run(mut ctx: Ctx, mut events: broadcast::Receiver<Arc<Event>>) {
    let mut queue = Queue::default();
    let mut next_resync = Instant::now() + RESYNC;
    let mut slice_started = Instant::now();
    loop {
        if queue.is_empty() {
            // Idle: wait for a change, a timer or the resync.
            let next_timer = ctx.timers.peek().map(|Reverse((at, _))| *at);
            let wake = next_timer.map_or(next_resync, |t| t.min(next_resync));
            tokio::select! {
                received = events.recv() => match received {
                    Ok(e) => {
                        slice_started = Instant::now();
                        mark(&mut queue, &e);
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => all(&ctx, &mut queue),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                () = tokio::time::sleep_until(wake) => slice_started = Instant::now(),
            }
        }
        // Take every change already there, so a key changed many times is reconciled once.
        loop {
            match events.try_recv() {
                Ok(e) => mark(&mut queue, &e),
                Err(broadcast::error::TryRecvError::Lagged(_)) => all(&ctx, &mut queue),
                Err(broadcast::error::TryRecvError::Closed) => return,
                Err(broadcast::error::TryRecvError::Empty) => break,
            }
        }
        let now = Instant::now();
        while ctx.timers.peek().is_some_and(|Reverse((at, _))| *at <= now) {
            if let Some(Reverse((_, key))) = ctx.timers.pop() {
                queue.insert(key);
            }
        }
        if now >= next_resync {
            all(&ctx, &mut queue);
            next_resync = now + RESYNC;
        }
        let Some(key) = queue.pop() else {
            continue;
        };
        let result = match &key {
            Key::Deployment(ns, name) => deployment::sync(&mut ctx, ns, name).await,
            Key::ReplicaSet(ns, name) => replicaset::sync(&mut ctx, ns, name).await,
            Key::Pod(ns, name) => kubelet::sync(&mut ctx, ns, name).await,
            Key::Endpoints(ns) => endpoints::sync(&mut ctx, ns).await,
            Key::Sweep => {
                gc::sweep(&ctx);
                Ok(())
            }
        };
        if let Err(e) = result {
            // Conflicts and races with users are normal: try again soon.
            tracing::debug!(?key, code = e.code, message = %e.message, "reconcile failed; retrying");
            ctx.after(Duration::from_millis(100), key);
        }
        // The API's requests and the watches run in between, however long the queue: the task yields
        // once it has run for a slice, not after every key (each yield waits for every other ready task).
        if slice_started.elapsed() >= SLICE {
            tokio::task::yield_now().await;
            slice_started = Instant::now();
        }
    }
}

fn mark(queue: &mut Queue, e: &Event) {
    let (ns, name) = (e.namespace.clone(), e.name.clone());
    let owner = |o: &Value, kind: &str| -> Option<String> {
        o["metadata"]["ownerReferences"]
            .as_array()?
            .iter()
            .find(|r| r["kind"] == kind && r["controller"] == true)
            .and_then(|r| r["name"].as_str().map(str::to_owned))
    };
    match (e.resource.0.as_str(), e.resource.1.as_str()) {
        ("apps", "deployments") => {
            queue.insert(Key::Deployment(ns, name));
        }
        ("apps", "replicasets") => {
            if let Some(d) = owner(&e.object, "Deployment") {
                queue.insert(Key::Deployment(ns.clone(), d));
            }
            queue.insert(Key::ReplicaSet(ns, name));
        }
        ("", "pods") => {
            if let Some(rs) = owner(&e.object, "ReplicaSet") {
                queue.insert(Key::ReplicaSet(ns.clone(), rs));
            }
            queue.insert(Key::Endpoints(ns.clone()));
            if e.kind != EventType::Deleted {
                queue.insert(Key::Pod(ns, name));
            }
        }
        ("", "services") => {
            queue.insert(Key::Endpoints(ns));
        }
        _ => {}
    }
    if e.kind == EventType::Deleted || e.object["metadata"].get("deletionTimestamp").is_some() {
        queue.insert(Key::Sweep);
    }
}

/// Queues every Deployment and ReplicaSet and a garbage collection (the resync, and after a lag).
fn all(ctx: &Ctx, queue: &mut Queue) {
    let store = &ctx.api.store;
    for (group, plural) in [("apps", "deployments"), ("apps", "replicasets")] {
        let (items, _) = store.list(&(group.into(), plural.into()), None);
        for o in items {
            let ns = o["metadata"]["namespace"].as_str().unwrap_or_default().to_owned();
            let name = o["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            queue.insert(if plural == "deployments" {
                Key::Deployment(ns, name)
            } else {
                Key::ReplicaSet(ns, name)
            });
        }
    }
    queue.insert(Key::Sweep);
}

/// The system identity controllers act as.
pub(crate) fn system() -> crate::api::User {
    crate::api::User {
        name: "system:kube-controller-manager".into(),
        groups: vec!["system:masters".into()],
    }
}

/// Objects of `group/plural` in `ns` controlled by the owner with `uid` (from the store's owner index).
pub(crate) fn owned_by(ctx: &Ctx, group: &str, plural: &str, ns: &str, uid: &str) -> Vec<Arc<Value>> {
    ctx.api
        .store
        .dependents_in(&(group.into(), plural.into()), uid)
        .into_iter()
        .filter(|o| {
            o["metadata"]["namespace"].as_str().unwrap_or_default() == ns
                && o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid && r["controller"] == true))
        })
        .collect()
}

/// Writes the status of an object if it changed.
pub(crate) async fn write_status(ctx: &Ctx, t: &ResourceType, current: &Value, status: Value) -> Result<(), ApiError> {
    if current["status"] == status {
        return Ok(());
    }
    // Through `/status` only the status and the resourceVersion (the write's precondition) are read.
    let meta = &current["metadata"];
    let next = json!({"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status});
    let ns = meta["namespace"].as_str().unwrap_or_default();
    let name = meta["name"].as_str().unwrap_or_default();
    ctx.api
        .update_shared(&system(), t, ns, name, Some("status"), next, false)
        .await
        .map(|_| ())
}

/// FNV-1a over the canonical JSON of `v`, encoded like the apiserver's pod-template-hash.
pub(crate) fn template_hash(v: &Value) -> String {
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.to_string()
        .bytes()
        .map(|d| ALPHANUMS[usize::from(d) % ALPHANUMS.len()] as char)
        .collect()
}

/// Whether a pod counts as ready (its Ready condition is True).
pub(crate) fn pod_ready(pod: &Value) -> bool {
    condition(&pod["status"], "Ready").is_some_and(|c| c["status"] == "True")
}

/// The condition of `type` in a status.
pub(crate) fn condition<'a>(status: &'a Value, kind: &str) -> Option<&'a Value> {
    status["conditions"].as_array()?.iter().find(|c| c["type"] == kind)
}

/// Seconds since an RFC 3339 time.
pub(crate) fn seconds_since(t: &Value) -> Option<f64> {
    let t = time::OffsetDateTime::parse(t.as_str()?, &time::format_description::well_known::Rfc3339).ok()?;
    Some((time::OffsetDateTime::now_utc() - t).as_seconds_f64())
}
