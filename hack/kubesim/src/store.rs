//! The object store: every object as JSON, one resourceVersion counter for all of them (as etcd's
//! revision), a bounded history of changes that watches replay from, and an index of dependents by
//! the uid of their owners (`metadata.ownerReferences`), which controllers and garbage collection read.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::broadcast;

/// Where a resource's objects live: (group, plural); versions of one resource share their objects.
pub type ResourceKey = (String, String);

/// The kind of a change, as in a watch event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

tokio::task_local! {
    /// Set while kubesim's controllers reconcile: the changes they make are marked as theirs.
    static CONTROLLERS: ();
}

/// Runs `f` as kubesim's controllers: the changes it makes carry [`Event::by_controllers`].
pub async fn as_controllers<F: Future>(f: F) -> F::Output {
    CONTROLLERS.scope((), f).await
}

/// Runs `f` as kubesim's controllers (see [`as_controllers`]).
pub fn as_controllers_sync<R>(f: impl FnOnce() -> R) -> R {
    CONTROLLERS.sync_scope((), f)
}

/// One change of one object.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub kind: EventType,
    pub resource: ResourceKey,
    pub namespace: String,
    pub name: String,
    /// The object after the change (before it, for a deletion, with the deletion's resourceVersion).
    pub object: Arc<Value>,
    /// The object before a modification (watches with selectors need both sides).
    pub previous: Option<Arc<Value>>,
    /// The change was made by kubesim's controllers (within [`as_controllers`]).
    pub by_controllers: bool,
    /// `object` as JSON with its `apiVersion` and `kind`, encoded once for every watch that serves it
    /// at that apiVersion (see [`Event::encoded`]).
    encoded: OnceLock<(String, Bytes)>,
}

impl Event {
    /// `object` encoded as JSON with `apiVersion` and `kind` set. The encoding at the first apiVersion
    /// asked for is kept and shared by every later caller (watches of one resource at one version);
    /// another apiVersion is encoded afresh.
    pub fn encoded(&self, api_version: &str, kind: &str) -> Bytes {
        if let Some((v, bytes)) = self.encoded.get() {
            if v == api_version {
                return bytes.clone();
            }
            return encode_served(&self.object, api_version, kind);
        }
        let (v, bytes) = self
            .encoded
            .get_or_init(|| (api_version.to_owned(), encode_served(&self.object, api_version, kind)));
        if v == api_version {
            bytes.clone()
        } else {
            encode_served(&self.object, api_version, kind)
        }
    }
}

/// An object as served at a version: its `apiVersion` and `kind` first, then its other fields, written
/// without copying the object.
pub struct Served<'a> {
    pub object: &'a Value,
    pub api_version: &'a str,
    pub kind: &'a str,
}

impl serde::Serialize for Served<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let Some(fields) = self.object.as_object() else {
            return self.object.serialize(serializer);
        };
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("apiVersion", self.api_version)?;
        map.serialize_entry("kind", self.kind)?;
        for (k, v) in fields {
            if k != "apiVersion" && k != "kind" {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

/// [`Served`] as JSON bytes.
pub fn encode_served(object: &Value, api_version: &str, kind: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&Served {
            object,
            api_version,
            kind,
        })
        .unwrap_or_default(),
    )
}

/// The changes a watch replays, and the receiver of those to come.
pub type WatchStart = (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>);

/// Why a store operation failed; the API maps each to its HTTP status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    /// The object was changed since the resourceVersion the write was based on.
    #[error("the object has been modified; please apply your changes to the latest version and try again")]
    Conflict,
    /// A watch asked for a resourceVersion older than the history kept.
    #[error("too old resource version: {requested} ({oldest})")]
    Gone { requested: u64, oldest: u64 },
}

type Objects = BTreeMap<(String, String), Arc<Value>>;

/// A dependent in the owner index: its resource, namespace and name.
type Dependent = (ResourceKey, String, String);

struct State {
    rv: u64,
    objects: HashMap<ResourceKey, Objects>,
    history: VecDeque<Arc<Event>>,
    /// Owner uid → the objects whose `ownerReferences` name it (once each, however many references).
    dependents: HashMap<String, BTreeSet<Dependent>>,
    /// The uid of every stored object, with how many objects have it (one, unless written so).
    uids: HashMap<String, usize>,
}

impl State {
    /// Keeps the uid and owner indexes in line with a change of one object from `before` to `after`.
    fn index(
        &mut self,
        resource: &ResourceKey,
        namespace: &str,
        name: &str,
        before: Option<&Value>,
        after: Option<&Value>,
    ) {
        let (old_uid, new_uid) = (before.and_then(uid), after.and_then(uid));
        if old_uid != new_uid {
            if let Some(u) = old_uid
                && let Some(n) = self.uids.get_mut(u)
            {
                *n -= 1;
                if *n == 0 {
                    self.uids.remove(u);
                }
            }
            if let Some(u) = new_uid {
                *self.uids.entry(u.to_owned()).or_default() += 1;
            }
        }
        let old = before.map(owner_uids).unwrap_or_default();
        let new = after.map(owner_uids).unwrap_or_default();
        if old == new {
            return;
        }
        let dependent = || (resource.clone(), namespace.to_owned(), name.to_owned());
        for uid in old.iter().filter(|u| !new.contains(u)) {
            if let Some(set) = self.dependents.get_mut(*uid) {
                set.remove(&dependent());
                if set.is_empty() {
                    self.dependents.remove(*uid);
                }
            }
        }
        for uid in new.iter().filter(|u| !old.contains(u)) {
            self.dependents
                .entry((*uid).to_owned())
                .or_default()
                .insert(dependent());
        }
    }
}

fn uid(object: &Value) -> Option<&str> {
    object["metadata"]["uid"].as_str()
}

/// The distinct owner uids an object's `ownerReferences` name.
fn owner_uids(object: &Value) -> Vec<&str> {
    let mut uids: Vec<&str> = object["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["uid"].as_str())
        .collect();
    uids.sort_unstable();
    uids.dedup();
    uids
}

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    state: Mutex<State>,
    events: broadcast::Sender<Arc<Event>>,
    history_limit: usize,
    uid_counter: AtomicU64,
    uid_prefix: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("rv", &self.resource_version())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store keeping the last `history_limit` changes for watches to resume from.
    pub fn new(history_limit: usize) -> Self {
        let (events, _) = broadcast::channel(65_536);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Self {
            state: Mutex::new(State {
                rv: 1,
                objects: HashMap::new(),
                history: VecDeque::new(),
                dependents: HashMap::new(),
                uids: HashMap::new(),
            }),
            events,
            history_limit,
            uid_counter: AtomicU64::new(1),
            uid_prefix: (nanos as u64) & 0xffff_ffff,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// A fresh object uid.
    pub fn new_uid(&self) -> String {
        let n = self.uid_counter.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}-0000-4000-8000-{n:012x}", self.uid_prefix)
    }

    pub fn get(&self, resource: &ResourceKey, namespace: &str, name: &str) -> Option<Arc<Value>> {
        self.lock()
            .objects
            .get(resource)?
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every object of `resource` (in `namespace` if given) and the resourceVersion of the list.
    pub fn list(&self, resource: &ResourceKey, namespace: Option<&str>) -> (Vec<Arc<Value>>, u64) {
        let state = self.lock();
        let items = match state.objects.get(resource) {
            None => Vec::new(),
            Some(objects) => match namespace {
                Some(ns) => objects
                    .range((ns.to_owned(), String::new())..)
                    .take_while(|((n, _), _)| n == ns)
                    .map(|(_, o)| o.clone())
                    .collect(),
                None => objects.values().cloned().collect(),
            },
        };
        (items, state.rv)
    }

    /// Every object with an `ownerReferences` entry naming `owner_uid`, with its resource, in the order
    /// of (resource, namespace, name). Proportional to what the owner owns, not to the store.
    pub fn dependents(&self, owner_uid: &str) -> Vec<(ResourceKey, Arc<Value>)> {
        let state = self.lock();
        let Some(set) = state.dependents.get(owner_uid) else {
            return Vec::new();
        };
        set.iter()
            .filter_map(|(resource, ns, name)| {
                let o = state.objects.get(resource)?.get(&(ns.clone(), name.clone()))?;
                Some((resource.clone(), o.clone()))
            })
            .collect()
    }

    /// Whether some object names `owner_uid` in its `ownerReferences`.
    pub fn has_dependents(&self, owner_uid: &str) -> bool {
        self.lock().dependents.contains_key(owner_uid)
    }

    /// Whether an object with this uid is stored.
    pub fn has_uid(&self, uid: &str) -> bool {
        self.lock().uids.contains_key(uid)
    }

    /// The objects of `resource` with an `ownerReferences` entry naming `owner_uid`.
    pub fn dependents_in(&self, resource: &ResourceKey, owner_uid: &str) -> Vec<Arc<Value>> {
        let state = self.lock();
        let (Some(set), Some(objects)) = (state.dependents.get(owner_uid), state.objects.get(resource)) else {
            return Vec::new();
        };
        set.range((resource.clone(), String::new(), String::new())..)
            .take_while(|(r, _, _)| r == resource)
            .filter_map(|(_, ns, name)| objects.get(&(ns.clone(), name.clone())).cloned())
            .collect()
    }

    /// Stores a new object; sets its `metadata.resourceVersion`.
    ///
    /// # Errors
    ///
    /// [`StoreError::AlreadyExists`].
    pub fn create(&self, resource: &ResourceKey, object: Value) -> Result<Arc<Value>, StoreError> {
        let (namespace, name) = ids(&object);
        let mut state = self.lock();
        let objects = state.objects.entry(resource.clone()).or_default();
        if objects.contains_key(&(namespace.clone(), name.clone())) {
            return Err(StoreError::AlreadyExists);
        }
        Ok(self.put(&mut state, resource, object, EventType::Added, None))
    }

    /// Replaces an object. With `expected_rv`, fails if the stored object has another resourceVersion.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`], [`StoreError::Conflict`].
    pub fn update(
        &self,
        resource: &ResourceKey,
        object: Value,
        expected_rv: Option<&str>,
    ) -> Result<Arc<Value>, StoreError> {
        let (namespace, name) = ids(&object);
        let mut state = self.lock();
        let current = state
            .objects
            .get(resource)
            .and_then(|o| o.get(&(namespace.clone(), name.clone())))
            .ok_or(StoreError::NotFound)?;
        if let Some(expected) = expected_rv
            && current["metadata"]["resourceVersion"].as_str() != Some(expected)
        {
            return Err(StoreError::Conflict);
        }
        if object_eq_ignoring_rv(current, &object) {
            // No-op writes do not bump the resourceVersion, as upstream.
            return Ok(current.clone());
        }
        let previous = current.clone();
        Ok(self.put(&mut state, resource, object, EventType::Modified, Some(previous)))
    }

    /// Stores `object` under the next resourceVersion and records the change.
    fn put(
        &self,
        state: &mut State,
        resource: &ResourceKey,
        mut object: Value,
        kind: EventType,
        previous: Option<Arc<Value>>,
    ) -> Arc<Value> {
        let (namespace, name) = ids(&object);
        state.rv += 1;
        object["metadata"]["resourceVersion"] = Value::String(state.rv.to_string());
        let object = Arc::new(object);
        state
            .objects
            .entry(resource.clone())
            .or_default()
            .insert((namespace.clone(), name.clone()), object.clone());
        state.index(resource, &namespace, &name, previous.as_deref(), Some(&object));
        self.record(state, kind, resource, namespace, name, object.clone(), previous);
        object
    }

    /// Removes an object. With `expected_rv` or `expected_uid`, fails if the stored object differs.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`], [`StoreError::Conflict`].
    pub fn delete(
        &self,
        resource: &ResourceKey,
        namespace: &str,
        name: &str,
        expected_uid: Option<&str>,
    ) -> Result<Arc<Value>, StoreError> {
        let mut state = self.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let current = state
            .objects
            .get(resource)
            .and_then(|o| o.get(&key))
            .ok_or(StoreError::NotFound)?;
        if let Some(uid) = expected_uid
            && current["metadata"]["uid"].as_str() != Some(uid)
        {
            return Err(StoreError::Conflict);
        }
        let rv = state.rv + 1;
        state.rv = rv;
        let removed = state
            .objects
            .get_mut(resource)
            .and_then(|o| o.remove(&key))
            .ok_or(StoreError::NotFound)?;
        state.index(resource, namespace, name, Some(&removed), None);
        let mut last = (*removed).clone();
        last["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let last = Arc::new(last);
        self.record(
            &mut state,
            EventType::Deleted,
            resource,
            key.0,
            key.1,
            last.clone(),
            None,
        );
        Ok(last)
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        state: &mut State,
        kind: EventType,
        resource: &ResourceKey,
        namespace: String,
        name: String,
        object: Arc<Value>,
        previous: Option<Arc<Value>>,
    ) {
        let event = Arc::new(Event {
            rv: state.rv,
            kind,
            resource: resource.clone(),
            namespace,
            name,
            object,
            previous,
            by_controllers: CONTROLLERS.try_with(|()| ()).is_ok(),
            encoded: OnceLock::new(),
        });
        state.history.push_back(event.clone());
        while state.history.len() > self.history_limit {
            state.history.pop_front();
        }
        // No receiver is fine: nobody watches.
        let _ = self.events.send(event);
    }

    /// Starts a watch of every change after `after_rv`: the kept changes since then, and a receiver of
    /// the changes to come. The two never overlap or leave a gap.
    ///
    /// # Errors
    ///
    /// [`StoreError::Gone`] when changes after `after_rv` are no longer kept.
    pub fn watch_from(&self, after_rv: u64) -> Result<WatchStart, StoreError> {
        let state = self.lock();
        let receiver = self.events.subscribe();
        let oldest_kept = state.history.front().map_or(state.rv, |e| e.rv);
        if after_rv + 1 < oldest_kept && after_rv < state.rv {
            return Err(StoreError::Gone {
                requested: after_rv,
                oldest: oldest_kept,
            });
        }
        let backlog = state.history.iter().filter(|e| e.rv > after_rv).cloned().collect();
        Ok((backlog, receiver))
    }

    /// Starts a watch from the current state: every object of `resource` as if just added (with the
    /// current resourceVersion), and a receiver of the changes to come.
    pub fn watch_now(&self, resource: &ResourceKey) -> (Vec<Arc<Value>>, broadcast::Receiver<Arc<Event>>) {
        let state = self.lock();
        let receiver = self.events.subscribe();
        let items = state
            .objects
            .get(resource)
            .map(|o| o.values().cloned().collect())
            .unwrap_or_default();
        (items, receiver)
    }

    /// A receiver of every change from now on (controllers use it).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }
}

fn ids(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_owned(),
        meta["name"].as_str().unwrap_or_default().to_owned(),
    )
}

fn object_eq_ignoring_rv(a: &Value, b: &Value) -> bool {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return a == b;
    };
    a.len() == b.len()
        && a.iter().all(|(k, v)| {
            if k == "metadata" {
                let (Some(ma), Some(mb)) = (v.as_object(), b.get(k).and_then(Value::as_object)) else {
                    return Some(v) == b.get(k);
                };
                ma.iter()
                    .filter(|(mk, _)| *mk != "resourceVersion")
                    .all(|(mk, mv)| mb.get(mk) == Some(mv))
                    && mb
                        .keys()
                        .filter(|mk| *mk != "resourceVersion")
                        .all(|mk| ma.contains_key(mk))
            } else {
                b.get(k) == Some(v)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> ResourceKey {
        ("apps".into(), "deployments".into())
    }

    #[tokio::test]
    async fn changes_made_as_the_controllers_are_marked_as_theirs() {
        let store = Store::new(10);
        let mut events = store.subscribe();
        let object = |name: &str| json!({"metadata": {"name": name, "namespace": "ns"}});
        store.create(&key(), object("by-client")).unwrap();
        as_controllers(async { store.create(&key(), object("by-controllers")).unwrap() }).await;
        as_controllers_sync(|| store.delete(&key(), "ns", "by-client", None).unwrap());
        let marks: Vec<(String, EventType, bool)> = (0..3)
            .map(|_| {
                let e = events.try_recv().unwrap();
                (e.name.clone(), e.kind, e.by_controllers)
            })
            .collect();
        assert_eq!(
            marks,
            vec![
                ("by-client".to_owned(), EventType::Added, false),
                ("by-controllers".to_owned(), EventType::Added, true),
                ("by-client".to_owned(), EventType::Deleted, true),
            ]
        );
    }

    fn obj(name: &str, image: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "test"}, "spec": {"image": image}})
    }

    #[test]
    fn every_write_gets_a_higher_resource_version_and_no_op_writes_none() {
        let s = Store::new(100);
        let a = s.create(&key(), obj("a", "1")).unwrap();
        let rv_a: u64 = a["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
        let same = s.update(&key(), (*a).clone(), None).unwrap();
        assert_eq!(same["metadata"]["resourceVersion"], a["metadata"]["resourceVersion"]);
        let mut changed = (*a).clone();
        changed["spec"]["image"] = json!("2");
        let b = s.update(&key(), changed, Some(&rv_a.to_string())).unwrap();
        assert!(
            b["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                > rv_a
        );
    }

    #[test]
    fn a_write_based_on_a_stale_version_conflicts() {
        let s = Store::new(100);
        let a = s.create(&key(), obj("a", "1")).unwrap();
        let stale = a["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
        s.update(&key(), obj("a", "2"), None).unwrap();
        assert_eq!(s.update(&key(), obj("a", "3"), Some(&stale)), Err(StoreError::Conflict));
        assert_eq!(s.create(&key(), obj("a", "4")), Err(StoreError::AlreadyExists));
    }

    #[test]
    fn a_watch_resumes_exactly_after_its_version_and_too_old_is_gone() {
        let s = Store::new(3);
        let a = s.create(&key(), obj("a", "1")).unwrap();
        let after: u64 = a["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
        s.create(&key(), obj("b", "1")).unwrap();
        s.delete(&key(), "test", "a", None).unwrap();
        let (backlog, _rx) = s.watch_from(after).unwrap();
        let kinds: Vec<_> = backlog.iter().map(|e| (e.kind, e.name.clone())).collect();
        assert_eq!(
            kinds,
            vec![(EventType::Added, "b".into()), (EventType::Deleted, "a".into())]
        );
        for n in 0..5 {
            s.create(&key(), obj(&format!("x{n}"), "1")).unwrap();
        }
        assert!(matches!(s.watch_from(after), Err(StoreError::Gone { .. })));
    }

    #[test]
    fn lists_are_scoped_to_a_namespace() {
        let s = Store::new(10);
        s.create(&key(), obj("a", "1")).unwrap();
        let mut other = obj("b", "1");
        other["metadata"]["namespace"] = json!("prod");
        s.create(&key(), other).unwrap();
        assert_eq!(s.list(&key(), Some("test")).0.len(), 1);
        assert_eq!(s.list(&key(), None).0.len(), 2);
    }

    fn owned(name: &str, owners: &[&str]) -> Value {
        let refs: Vec<Value> = owners
            .iter()
            .map(|uid| json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": uid, "controller": true}))
            .collect();
        json!({"metadata": {"name": name, "namespace": "test", "ownerReferences": refs}})
    }

    fn pods() -> ResourceKey {
        (String::new(), "pods".into())
    }

    fn names(objects: &[Arc<Value>]) -> Vec<String> {
        objects
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn the_owner_index_follows_creates_updates_and_deletes() {
        let s = Store::new(100);
        s.create(&pods(), owned("a", &["u1"])).unwrap();
        s.create(&pods(), owned("b", &["u1", "u2"])).unwrap();
        s.create(&pods(), owned("c", &[])).unwrap();
        s.create(&key(), owned("d", &["u1"])).unwrap();
        assert_eq!(names(&s.dependents_in(&pods(), "u1")), ["a", "b"]);
        assert_eq!(names(&s.dependents_in(&key(), "u1")), ["d"]);
        assert_eq!(names(&s.dependents_in(&pods(), "u2")), ["b"]);
        let all: Vec<_> = s
            .dependents("u1")
            .into_iter()
            .map(|(r, o)| (r, o["metadata"]["name"].clone()))
            .collect();
        assert_eq!(
            all,
            vec![(pods(), json!("a")), (pods(), json!("b")), (key(), json!("d"))]
        );

        // An update that changes the owners moves the object; one that keeps them changes nothing,
        // and the index serves the newest version of the object.
        s.update(&pods(), owned("a", &["u2"]), None).unwrap();
        let mut b = owned("b", &["u1", "u2"]);
        b["spec"] = json!({"image": "2"});
        s.update(&pods(), b, None).unwrap();
        assert_eq!(names(&s.dependents_in(&pods(), "u1")), ["b"]);
        assert_eq!(names(&s.dependents_in(&pods(), "u2")), ["a", "b"]);
        assert_eq!(s.dependents_in(&pods(), "u1")[0]["spec"]["image"], "2");

        // Released from every owner, then owned again.
        s.update(&pods(), owned("c", &["u3"]), None).unwrap();
        s.update(&pods(), owned("c", &[]), None).unwrap();
        assert!(s.dependents("u3").is_empty());

        s.delete(&pods(), "test", "b", None).unwrap();
        assert!(s.dependents_in(&pods(), "u1").is_empty());
        assert_eq!(names(&s.dependents_in(&pods(), "u2")), ["a"]);
        s.delete(&pods(), "test", "a", None).unwrap();
        assert!(s.dependents("u2").is_empty());
        assert!(
            s.lock().dependents.keys().all(|uid| uid == "u1"),
            "no empty entries are left"
        );
        assert!(s.dependents("unknown").is_empty());
    }

    #[test]
    fn the_uid_index_follows_creates_updates_and_deletes() {
        let s = Store::new(100);
        let with_uid = |name: &str, uid: &str| {
            let mut o = owned(name, &[]);
            o["metadata"]["uid"] = json!(uid);
            o
        };
        s.create(&pods(), with_uid("a", "u1")).unwrap();
        s.create(&key(), owned("d", &["u1"])).unwrap();
        assert!(s.has_uid("u1") && s.has_dependents("u1"));
        assert!(!s.has_uid("u2") && !s.has_dependents("u2"));
        s.update(&pods(), with_uid("a", "u2"), None).unwrap();
        assert!(!s.has_uid("u1") && s.has_uid("u2"));
        // Two objects with one uid: it stays known until both are gone.
        s.create(&pods(), with_uid("b", "u2")).unwrap();
        s.delete(&pods(), "test", "a", None).unwrap();
        assert!(s.has_uid("u2"));
        s.delete(&pods(), "test", "b", None).unwrap();
        assert!(!s.has_uid("u2"));
        assert!(s.lock().uids.is_empty());
    }

    #[test]
    fn a_dependent_that_names_its_owner_twice_is_indexed_once() {
        let s = Store::new(100);
        s.create(&pods(), owned("a", &["u1", "u1"])).unwrap();
        assert_eq!(names(&s.dependents_in(&pods(), "u1")), ["a"]);
        s.update(&pods(), owned("a", &["u1"]), None).unwrap();
        assert_eq!(names(&s.dependents_in(&pods(), "u1")), ["a"]);
        s.delete(&pods(), "test", "a", None).unwrap();
        assert!(s.dependents("u1").is_empty());
    }

    #[test]
    fn an_event_is_encoded_once_per_version_with_its_api_version_and_kind() {
        let s = Store::new(100);
        let mut rx = s.subscribe();
        let mut o = obj("a", "1");
        o["apiVersion"] = json!("apps/v1beta1");
        o["kind"] = json!("Old");
        s.create(&key(), o).unwrap();
        let e = rx.try_recv().unwrap();
        let first = e.encoded("apps/v1", "Deployment");
        let again = e.encoded("apps/v1", "Deployment");
        assert_eq!(first.as_ptr(), again.as_ptr(), "shared, not encoded again");
        let v: Value = serde_json::from_slice(&first).unwrap();
        assert_eq!(v["apiVersion"], "apps/v1");
        assert_eq!(v["kind"], "Deployment");
        assert_eq!(v["spec"], json!({"image": "1"}));
        assert_eq!(v["metadata"]["name"], "a");
        let text = std::str::from_utf8(&first).unwrap();
        assert_eq!(text.matches("apiVersion").count(), 1, "{text}");
        let other: Value = serde_json::from_slice(&e.encoded("apps/v2", "Deployment")).unwrap();
        assert_eq!(other["apiVersion"], "apps/v2");
    }
}
