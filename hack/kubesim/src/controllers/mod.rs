//! Control-plane stand-ins: the Deployment and ReplicaSet controllers, a kubelet, EndpointSlices and
//! garbage collection, driven by the store's changes and by timers (readiness delays, grace periods,
//! progress deadlines).
//!
//! One task runs them all: changes and timers queue keys (each key once while it waits), and the task
//! reconciles the queue one key at a time, yielding every couple of milliseconds, so a long queue never
//! holds up the API or the watches. Controllers write through the API as a system user, like kube-controller-manager.
//!
//! The queue has two lanes (see [`Queue`]): keys that changed through the controllers' own writes, or
//! whose timer is due, go first, so each Deployment goes from one stage to the next (its ReplicaSet,
//! its pods, their readiness, its status) without waiting behind every key queued; clients' changes and
//! resyncs wait in the other lane, which still gets a turn after every few follow-ups.

mod deployment;
mod endpoints;
mod gc;
mod kubelet;
mod replicaset;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::api::{Api, ApiError};
use crate::resources::ResourceType;
use crate::sim::Config;
use crate::store::{Event, EventType, Store, as_controllers, as_controllers_sync};

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
    /// (when, key, root of the reconcile that set it: see [`Queue`]).
    timers: BinaryHeap<Reverse<(Instant, Key, u64)>>,
    /// The root of the reconcile running (see [`Queue`]).
    root: u64,
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
        self.timers.push(Reverse((Instant::now() + delay, key, self.root)));
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
        self.api.resource_type(group, version, plural)
    }
}

/// Starts every controller.
pub fn start(api: Arc<Api>, config: &Config) -> Vec<JoinHandle<()>> {
    let events = api.store.subscribe();
    let ctx = Ctx {
        api,
        config: config.clone(),
        timers: BinaryHeap::new(),
        root: 0,
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

/// How many follow-ups are taken in a row while fresh keys wait: the fresh lane gets at least one turn
/// in `FOLLOW_UP_BURST + 1`, so it is never starved; the follow-ups (a handful per Deployment in
/// progress) still go before most of what is fresh.
const FOLLOW_UP_BURST: usize = 16;

/// The shortest time between two garbage collections: a sweep reads every object (a few milliseconds
/// with 1,000 Deployments), and deleting many owners marks one each (see [`gc_concerns`]). The first
/// sweep after a quiet spell runs at once.
const SWEEP_GAP: Duration = Duration::from_millis(100);

/// Which lane a key waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    /// The next stage of work in progress, with the root it descends from: the key's object (or one
    /// it owns) changed through the controllers' own writes, or its timer is due.
    FollowUp(u64),
    /// Everything else: clients' changes, resyncs, garbage collection.
    Fresh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Waiting {
    lane: Lane,
    /// When it was queued there (entries of a key queued again elsewhere are stale and skipped).
    seq: u64,
}

/// Keys waiting to be reconciled, each once, in two lanes.
///
/// A fresh key taken from the queue starts a new *root* (a number, in the order they are taken); the
/// keys its reconcile marks (the objects it wrote, and their owners), their own follow-ups and the
/// timers they set descend from that root. Follow-ups are taken first, the oldest root first, so work
/// started first finishes first: a Deployment's ReplicaSet, its pods, their readiness and its status
/// follow each other instead of each waiting behind every key queued. Fresh keys wait in the order
/// they were first marked, and one is taken after [`FOLLOW_UP_BURST`] follow-ups in a row, so they are
/// never starved. A key marked again while it waits keeps its place (the reconcile will see the newest
/// state anyway), unless the new mark puts it earlier: a fresh key becoming a follow-up, a follow-up
/// of an older root.
#[derive(Default)]
pub(crate) struct Queue {
    /// (root, seq, key): the smallest first.
    follow_ups: BinaryHeap<Reverse<(u64, u64, Key)>>,
    fresh: VecDeque<(u64, Key)>,
    queued: HashMap<Key, Waiting>,
    /// Follow-ups taken in a row.
    streak: usize,
    seq: u64,
    roots: u64,
}

impl Queue {
    pub fn insert(&mut self, key: Key, lane: Lane) {
        let earlier = match (self.queued.get(&key).map(|w| w.lane), lane) {
            (None, _) | (Some(Lane::Fresh), Lane::FollowUp(_)) => true,
            (Some(Lane::FollowUp(waiting)), Lane::FollowUp(root)) => root < waiting,
            (Some(_), Lane::Fresh) => false,
        };
        if !earlier {
            return;
        }
        self.seq += 1;
        let seq = self.seq;
        self.queued.insert(key.clone(), Waiting { lane, seq });
        match lane {
            Lane::FollowUp(root) => self.follow_ups.push(Reverse((root, seq, key))),
            Lane::Fresh => self.fresh.push_back((seq, key)),
        }
    }

    /// The next key, and the root it descends from (a new one for a fresh key).
    fn pop(&mut self) -> Option<(Key, u64)> {
        loop {
            let fresh_turn = self.follow_ups.is_empty() || self.streak >= FOLLOW_UP_BURST;
            if fresh_turn && let Some((seq, key)) = self.fresh.pop_front() {
                if self.queued.get(&key).is_some_and(|w| w.seq == seq) {
                    self.queued.remove(&key);
                    self.streak = 0;
                    self.roots += 1;
                    return Some((key, self.roots));
                }
                continue;
            }
            let Reverse((root, seq, key)) = self.follow_ups.pop()?;
            if self.queued.get(&key).is_some_and(|w| w.seq == seq) {
                self.queued.remove(&key);
                self.streak += 1;
                return Some((key, root));
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }
}

async fn run(mut ctx: Ctx, mut events: broadcast::Receiver<Arc<Event>>) {
    let mut queue = Queue::default();
    let mut next_resync = Instant::now() + RESYNC;
    let mut slice_started = Instant::now();
    let mut last_sweep: Option<Instant> = None;
    // Whether the last garbage collection left work waiting on deletions (see `gc::sweep`).
    let mut gc_waiting = false;
    loop {
        if queue.is_empty() {
            // Idle: wait for a change, a timer or the resync.
            let next_timer = ctx.timers.peek().map(|Reverse((at, ..))| *at);
            let wake = next_timer.map_or(next_resync, |t| t.min(next_resync));
            tokio::select! {
                received = events.recv() => match received {
                    Ok(e) => {
                        slice_started = Instant::now();
                        mark(&mut queue, &e, ctx.root, &ctx.api.store, gc_waiting);
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
                Ok(e) => mark(&mut queue, &e, ctx.root, &ctx.api.store, gc_waiting),
                Err(broadcast::error::TryRecvError::Lagged(_)) => all(&ctx, &mut queue),
                Err(broadcast::error::TryRecvError::Closed) => return,
                Err(broadcast::error::TryRecvError::Empty) => break,
            }
        }
        let now = Instant::now();
        while ctx.timers.peek().is_some_and(|Reverse((at, ..))| *at <= now) {
            if let Some(Reverse((_, key, root))) = ctx.timers.pop() {
                let lane = if key == Key::Sweep {
                    Lane::Fresh
                } else {
                    Lane::FollowUp(root)
                };
                queue.insert(key, lane);
            }
        }
        if now >= next_resync {
            all(&ctx, &mut queue);
            next_resync = now + RESYNC;
        }
        let Some((key, root)) = queue.pop() else {
            continue;
        };
        ctx.root = root;
        // What the reconcile writes is marked as the controllers' (see `mark`).
        let result = match &key {
            Key::Deployment(ns, name) => as_controllers(deployment::sync(&mut ctx, ns, name)).await,
            Key::ReplicaSet(ns, name) => as_controllers(replicaset::sync(&mut ctx, ns, name)).await,
            Key::Pod(ns, name) => as_controllers(kubelet::sync(&mut ctx, ns, name)).await,
            Key::Endpoints(ns) => as_controllers(endpoints::sync(&mut ctx, ns)).await,
            Key::Sweep => {
                match last_sweep.map(|at| at + SWEEP_GAP).filter(|due| *due > now) {
                    Some(due) => ctx.timers.push(Reverse((due, Key::Sweep, root))),
                    None => {
                        gc_waiting = as_controllers_sync(|| gc::sweep(&ctx));
                        last_sweep = Some(Instant::now());
                    }
                }
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

/// Queues the keys a change concerns: follow-ups of `root` if the controllers made it (changes are
/// taken in right after the reconcile that made them, whose root is `root`), else fresh; and a garbage
/// collection if the change may give it work (see [`gc_concerns`]).
fn mark(queue: &mut Queue, e: &Event, root: u64, store: &Store, gc_waiting: bool) {
    let lane = if e.by_controllers {
        Lane::FollowUp(root)
    } else {
        Lane::Fresh
    };
    let mut insert = |key| queue.insert(key, lane);
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
            insert(Key::Deployment(ns, name));
        }
        ("apps", "replicasets") => {
            if let Some(d) = owner(&e.object, "Deployment") {
                insert(Key::Deployment(ns.clone(), d));
            }
            insert(Key::ReplicaSet(ns, name));
        }
        ("", "pods") => {
            if let Some(rs) = owner(&e.object, "ReplicaSet") {
                insert(Key::ReplicaSet(ns.clone(), rs));
            }
            insert(Key::Endpoints(ns.clone()));
            if e.kind != EventType::Deleted {
                insert(Key::Pod(ns, name));
            }
        }
        ("", "services") => {
            insert(Key::Endpoints(ns));
        }
        _ => {}
    }
    if gc_concerns(e, store, gc_waiting) {
        queue.insert(Key::Sweep, Lane::Fresh);
    }
}

/// Whether a change may give garbage collection work, so that a sweep (which reads every object) runs
/// only then, not for every pod a rolling update deletes: an owner deleted while something names it
/// among its owners; an object marked for deletion in the foreground, with orphans, or a namespace; an
/// object whose owners are all gone (created or re-owned after they went); and while a sweep left work
/// waiting (a foreground deletion or a namespace waiting for its dependents), any deletion. The resync
/// sweeps anyway.
fn gc_concerns(e: &Event, store: &Store, gc_waiting: bool) -> bool {
    let meta = &e.object["metadata"];
    let marked = meta.get("deletionTimestamp").is_some();
    if e.kind == EventType::Deleted {
        return gc_waiting || meta["uid"].as_str().is_some_and(|uid| store.has_dependents(uid));
    }
    if marked {
        let finalizers = meta["finalizers"].as_array().into_iter().flatten();
        let namespace = e.resource.0.is_empty() && e.resource.1 == "namespaces";
        if gc_waiting
            || namespace
            || finalizers
                .into_iter()
                .any(|f| f == "foregroundDeletion" || f == "orphan")
        {
            return true;
        }
    }
    let refs = &meta["ownerReferences"];
    let changed = e
        .previous
        .as_ref()
        .is_none_or(|p| p["metadata"]["ownerReferences"] != *refs);
    changed
        && refs.as_array().is_some_and(|refs| {
            !refs.is_empty()
                && refs
                    .iter()
                    .all(|r| r["uid"].as_str().is_none_or(|uid| !store.has_uid(uid)))
        })
}

/// Queues every Deployment and ReplicaSet and a garbage collection (the resync, and after a lag).
fn all(ctx: &Ctx, queue: &mut Queue) {
    let store = &ctx.api.store;
    for (group, plural) in [("apps", "deployments"), ("apps", "replicasets")] {
        let (items, _) = store.list(&(group.into(), plural.into()), None);
        for o in items {
            let ns = o["metadata"]["namespace"].as_str().unwrap_or_default().to_owned();
            let name = o["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            let key = if plural == "deployments" {
                Key::Deployment(ns, name)
            } else {
                Key::ReplicaSet(ns, name)
            };
            queue.insert(key, Lane::Fresh);
        }
    }
    queue.insert(Key::Sweep, Lane::Fresh);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn d(name: &str) -> Key {
        Key::Deployment("ns".into(), name.into())
    }

    fn drain(queue: &mut Queue) -> Vec<Key> {
        std::iter::from_fn(|| queue.pop().map(|(key, _)| key)).collect()
    }

    #[test]
    fn follow_ups_go_first_oldest_root_first_and_each_key_waits_once() {
        let mut queue = Queue::default();
        queue.insert(d("a"), Lane::Fresh);
        queue.insert(d("b"), Lane::Fresh);
        queue.insert(d("c"), Lane::FollowUp(2));
        queue.insert(d("c"), Lane::Fresh);
        queue.insert(d("a"), Lane::Fresh);
        // A fresh key that becomes a follow-up moves up, once.
        queue.insert(d("b"), Lane::FollowUp(3));
        queue.insert(d("b"), Lane::FollowUp(3));
        // A follow-up of an older root goes before.
        queue.insert(d("e"), Lane::FollowUp(3));
        queue.insert(d("e"), Lane::FollowUp(1));
        queue.insert(d("e"), Lane::FollowUp(4));
        assert_eq!(drain(&mut queue), vec![d("e"), d("c"), d("b"), d("a")]);
        assert!(queue.is_empty());
        // Taken, a key can wait again; fresh keys start new roots.
        queue.insert(d("a"), Lane::Fresh);
        queue.insert(d("b"), Lane::Fresh);
        let (_, first) = queue.pop().unwrap();
        let (_, second) = queue.pop().unwrap();
        assert!(first < second);
    }

    #[test]
    fn garbage_collection_is_queued_only_for_changes_that_can_give_it_work() {
        let store = Store::new(100);
        let mut events = store.subscribe();
        let pods: crate::store::ResourceKey = (String::new(), "pods".into());
        let rs: crate::store::ResourceKey = ("apps".into(), "replicasets".into());
        let object = |name: &str, uid: &str, owner: Option<&str>| {
            let refs: Vec<Value> = owner
                .map(|o| json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": o, "controller": true}))
                .into_iter()
                .collect();
            json!({"metadata": {"name": name, "namespace": "ns", "uid": uid, "ownerReferences": refs}})
        };
        let mut next = |waiting: bool| gc_concerns(&events.try_recv().unwrap(), &store, waiting);
        store.create(&rs, object("rs", "u-rs", None)).unwrap();
        assert!(!next(false), "an object without owners");
        store.create(&pods, object("a", "u-a", Some("u-rs"))).unwrap();
        assert!(!next(false), "a dependent whose owner is there");
        store.create(&pods, object("b", "u-b", Some("u-gone"))).unwrap();
        assert!(next(false), "a dependent whose owner is gone");
        let mut marked = object("a", "u-a", Some("u-rs"));
        marked["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        store.update(&pods, marked.clone(), None).unwrap();
        assert!(!next(false), "a pod marked for deletion, without dependents");
        marked["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
        store.update(&pods, marked, None).unwrap();
        assert!(next(false), "an object deleted in the foreground");
        store.delete(&pods, "ns", "b", None).unwrap();
        assert!(!next(false), "the deletion of an object nothing owns");
        store.create(&pods, object("c", "u-c", None)).unwrap();
        assert!(!next(false));
        store.delete(&pods, "ns", "c", None).unwrap();
        assert!(next(true), "any deletion while a collection waits for one");
        store.delete(&rs, "ns", "rs", None).unwrap();
        assert!(next(false), "the deletion of an owner with dependents");
    }

    #[test]
    fn fresh_keys_get_a_turn_however_many_follow_ups_wait() {
        let mut queue = Queue::default();
        queue.insert(d("fresh-1"), Lane::Fresh);
        queue.insert(d("fresh-2"), Lane::Fresh);
        for i in 0..40 {
            queue.insert(d(&format!("f{i}")), Lane::FollowUp(1));
        }
        let order = drain(&mut queue);
        let position = |k: &str| order.iter().position(|x| *x == d(k)).unwrap();
        assert_eq!(position("fresh-1"), FOLLOW_UP_BURST);
        assert_eq!(position("fresh-2"), 2 * FOLLOW_UP_BURST + 1);
        assert_eq!(order.len(), 42);
    }
}
