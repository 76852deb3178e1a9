//! The agent's watch caches: one watch per kind, shared by the controller (which reconciles on their
//! changes) and the passes (which read from them instead of listing).
//!
//! ```text
//!  watch ReplicaSets, candidates, candidate pods, Services, Namespaces, VirtualServices, DestinationRules,
//!        HTTPRoutes, EndpointSlices of per-version Services
//!     └─▶ reflector (trimmed objects) ─▶ Store ─▶ Caches::snapshot (no request)
//!                                    └─▶ Controller: reconcile the Deployment they belong to
//! ```
//!
//! A cache may lag the cluster by a watch event. That is safe: every write is conditional on the
//! resource version read (a stale read costs a 409 and a new pass, never a lost change), and after its
//! own write a pass waits for the cache to show it ([`Caches::caught_up`]) so the next pass does not plan
//! from before it. Until every cache has listed once, passes read from the API server as before.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::observe::{self, Reads, Snapshot};
use super::routing::{self, gateway_api};
use crate::config::ReleaseConfig;
use crate::gateway::http_route::HttpRoute;
use crate::istio::destination_rule::DestinationRule;
use crate::istio::virtual_service::VirtualService;
use crate::names::agent;
use crate::release::ProviderKind;

/// A watch stream of one kind, as the controller takes it.
pub type Changes<K> = BoxStream<'static, Result<K, watcher::Error>>;

/// The caches, read by the passes.
#[derive(Clone)]
pub struct Caches {
    pub namespaces: Store<Namespace>,
    pub replica_sets: Store<ReplicaSet>,
    pub candidates: Store<Deployment>,
    pub pods: Store<Pod>,
    pub services: Store<Service>,
    pub virtual_services: Store<VirtualService>,
    pub destination_rules: Store<DestinationRule>,
    pub http_routes: Store<HttpRoute>,
    /// EndpointSlices of turnout's per-version Services (Gateway API backends).
    pub slices: Store<EndpointSlice>,
}

/// The watch streams that fill [`Caches`]; whoever polls them (the controller) keeps the caches current.
pub struct Streams {
    pub namespaces: Changes<Namespace>,
    pub replica_sets: Changes<ReplicaSet>,
    pub candidates: Changes<Deployment>,
    pub pods: Changes<Pod>,
    pub services: Changes<Service>,
    pub virtual_services: Changes<VirtualService>,
    pub destination_rules: Changes<DestinationRule>,
    pub http_routes: Changes<HttpRoute>,
    pub slices: Changes<EndpointSlice>,
}

/// A write of a pass, for [`Caches::caught_up`]: the object of `kind` now has a resource version other
/// than `before` (`None`: it did not exist), or is gone (`deleted`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub before: Option<String>,
    pub deleted: bool,
}

impl Written {
    /// A create or change of `kind` `ns/name`, which had `before` (`None`: it did not exist).
    pub fn of(kind: Kind, ns: &str, name: &str, before: Option<&kube::api::ObjectMeta>) -> Self {
        Self {
            kind,
            namespace: ns.to_owned(),
            name: name.to_owned(),
            before: before.and_then(|m| m.resource_version.clone()),
            deleted: false,
        }
    }
}

/// The kinds a pass writes and reads back from a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Candidate,
    VirtualService,
    DestinationRule,
    HttpRoute,
    Service,
    Pod,
}

/// One cache and its stream: every object of `api` matching `config`, trimmed by `trim` (fields no pass
/// reads, so that the cache costs little memory).
fn cache<K>(api: Api<K>, config: watcher::Config, trim: fn(&mut K)) -> (Store<K>, Changes<K>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config)
        // Each watch backs off on its own: the controller would back off all its triggers together
        // for one failing watch (the Istio kinds fail until their CRDs are installed).
        .default_backoff()
        .modify(move |o: &mut K| {
            o.meta_mut().managed_fields = None;
            trim(o);
        })
        .reflect(writer)
        .touched_objects()
        .filter_map(|event| async move {
            match event {
                Ok(object) => Some(Ok(object)),
                Err(error) => {
                    let kind = K::kind(&());
                    if not_served(&error) {
                        tracing::debug!(%kind, %error, "watch: not served (yet); retrying");
                    } else {
                        tracing::warn!(%kind, %error, "watch failed; retrying");
                    }
                    None
                }
            }
        })
        .boxed();
    (reader, stream)
}

/// A kind the API server does not serve (404): a CRD not installed.
fn not_served(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 404,
        _ => false,
    }
}

/// The caches of the whole cluster and the streams that fill them.
pub fn start(client: &Client) -> (Caches, Streams) {
    let all = watcher::Config::default;
    let candidates = || watcher::Config::default().labels(agent::RELEASE_OF);
    let (namespaces, ns_stream) = cache(Api::all(client.clone()), all(), |_: &mut Namespace| {});
    let (replica_sets, rs_stream) = cache(Api::all(client.clone()), all(), |rs: &mut ReplicaSet| {
        // A pass reads the template's labels, never its pod spec.
        if let Some(template) = rs.spec.template.as_mut() {
            template.spec = None;
        }
    });
    let (candidate_store, candidate_stream) = cache(Api::all(client.clone()), candidates(), |d: &mut Deployment| {
        d.spec.template.spec = None
    });
    let (pods, pod_stream) = cache(Api::all(client.clone()), candidates(), |p: &mut Pod| p.spec = None);
    let (services, svc_stream) = cache(Api::all(client.clone()), all(), |_: &mut Service| {});
    let (virtual_services, vs_stream) = cache(Api::all(client.clone()), all(), |_: &mut VirtualService| {});
    let (destination_rules, dr_stream) = cache(Api::all(client.clone()), all(), |_: &mut DestinationRule| {});
    let (http_routes, route_stream) = cache(Api::all(client.clone()), all(), |_: &mut HttpRoute| {});
    let backends = watcher::Config::default().labels(gateway_api::BACKEND_OF);
    let (slices, slice_stream) = cache(Api::all(client.clone()), backends, |_: &mut EndpointSlice| {});
    let caches = Caches {
        namespaces,
        replica_sets,
        candidates: candidate_store,
        pods,
        services,
        virtual_services,
        destination_rules,
        http_routes,
        slices,
    };
    let streams = Streams {
        namespaces: ns_stream,
        replica_sets: rs_stream,
        candidates: candidate_stream,
        pods: pod_stream,
        services: svc_stream,
        virtual_services: vs_stream,
        destination_rules: dr_stream,
        http_routes: route_stream,
        slices: slice_stream,
    };
    (caches, streams)
}

/// The resource version of object `ns/name` in `store`, and whether it is being deleted; `None` when
/// the cache does not hold it.
fn version_in<K: Resource<DynamicType = ()> + Clone + 'static>(
    store: &Store<K>,
    ns: &str,
    name: &str,
) -> Option<(Option<String>, bool)> {
    let o = store.get(&ObjectRef::new(name).within(ns))?;
    Some((o.meta().resource_version.clone(), o.meta().deletion_timestamp.is_some()))
}

fn ready<K: Resource<DynamicType = ()> + Clone + 'static>(store: &Store<K>) -> bool {
    matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
}

impl Caches {
    /// Whether every cache a pass reads has listed once: the provider's only when its CRDs are
    /// `installed` (a watch of a kind not served never lists).
    pub fn synced(&self, provider: ProviderKind, installed: bool) -> bool {
        let routing = !installed
            || match provider {
                ProviderKind::Istio => ready(&self.virtual_services) && ready(&self.destination_rules),
                ProviderKind::GatewayApi => ready(&self.http_routes) && ready(&self.slices),
                ProviderKind::None => true,
            };
        ready(&self.namespaces)
            && ready(&self.replica_sets)
            && ready(&self.candidates)
            && ready(&self.pods)
            && ready(&self.services)
            && routing
    }

    /// The namespace `name`, if cached.
    pub fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.namespaces.get(&ObjectRef::new(name))
    }

    /// What a snapshot of `d` is made of, from the caches.
    pub fn reads(&self, d: &Deployment) -> Reads {
        let ns = d.namespace().unwrap_or_default();
        let name = d.name_any();
        let in_ns = |meta: &kube::api::ObjectMeta| meta.namespace.as_deref() == Some(ns.as_str());
        let selector: Vec<(&String, &String)> = observe::match_labels(d).collect();
        let release_of =
            |meta: &kube::api::ObjectMeta| meta.labels.as_ref().and_then(|l| l.get(agent::RELEASE_OF)) == Some(&name);
        Reads {
            replica_sets: self.replica_sets.state_filter(|rs| {
                let labels = rs.labels();
                // A held candidate's ReplicaSet lacks a label of the Deployment's selector.
                in_ns(&rs.metadata)
                    && (selector.iter().all(|(k, v)| labels.get(*k) == Some(*v)) || release_of(&rs.metadata))
            }),
            candidates: self
                .candidates
                .state_filter(|c| in_ns(&c.metadata) && release_of(&c.metadata)),
            pods: self
                .pods
                .state_filter(|p| in_ns(&p.metadata) && release_of(&p.metadata)),
            services: self.services.state_filter(|s| in_ns(&s.metadata)),
        }
    }

    /// The snapshot of `d` routed by `provider`, read from the caches alone (nothing of the
    /// provider's when its CRDs are not `installed`).
    pub fn snapshot(
        &self,
        d: &Deployment,
        config: &ReleaseConfig,
        provider: ProviderKind,
        installed: bool,
    ) -> Snapshot {
        let reads = self.reads(d);
        let ns = d.namespace().unwrap_or_default();
        let in_ns = |meta: &kube::api::ObjectMeta| meta.namespace.as_deref() == Some(ns.as_str());
        let objects = match (installed, provider) {
            (false, _) | (_, ProviderKind::None) => routing::Objects::default(),
            (true, ProviderKind::Istio) => routing::Objects {
                virtual_services: self.virtual_services.state_filter(|o| in_ns(&o.metadata)),
                destination_rules: self.destination_rules.state_filter(|o| in_ns(&o.metadata)),
                ..routing::Objects::default()
            },
            (true, ProviderKind::GatewayApi) => routing::Objects {
                http_routes: self.http_routes.state_filter(|o| in_ns(&o.metadata)),
                slices: self.slices.state_filter(|o| in_ns(&o.metadata)),
                ..routing::Objects::default()
            },
        };
        observe::assemble(d, &reads, config, provider, &objects)
    }

    /// Whether the cache shows `written` now.
    fn shows(&self, written: &Written) -> bool {
        let (ns, name) = (&written.namespace, &written.name);
        let meta = match written.kind {
            Kind::Candidate => version_in(&self.candidates, ns, name),
            Kind::VirtualService => version_in(&self.virtual_services, ns, name),
            Kind::DestinationRule => version_in(&self.destination_rules, ns, name),
            Kind::HttpRoute => version_in(&self.http_routes, ns, name),
            Kind::Service => version_in(&self.services, ns, name),
            Kind::Pod => version_in(&self.pods, ns, name),
        };
        match meta {
            None => written.deleted,
            Some((_, deleting)) if written.deleted => deleting,
            Some((rv, _)) => written.before.is_none() || rv != written.before,
        }
    }

    /// Waits (polling every 5 ms, at most `within`) until the cache shows `written`; false if it did
    /// not by then (the next pass then plans from an older view, and its conditional write fails).
    pub async fn caught_up(&self, written: &Written, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.shows(written) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::reflector::store::Writer;
    use serde_json::json;

    use super::*;

    struct Writers {
        namespaces: Writer<Namespace>,
        replica_sets: Writer<ReplicaSet>,
        candidates: Writer<Deployment>,
        pods: Writer<Pod>,
        services: Writer<Service>,
        virtual_services: Writer<VirtualService>,
        destination_rules: Writer<DestinationRule>,
        http_routes: Writer<HttpRoute>,
        slices: Writer<EndpointSlice>,
    }

    fn writers() -> (Writers, Caches) {
        let w = Writers {
            namespaces: Writer::default(),
            replica_sets: Writer::default(),
            candidates: Writer::default(),
            pods: Writer::default(),
            services: Writer::default(),
            virtual_services: Writer::default(),
            destination_rules: Writer::default(),
            http_routes: Writer::default(),
            slices: Writer::default(),
        };
        let caches = Caches {
            namespaces: w.namespaces.as_reader(),
            replica_sets: w.replica_sets.as_reader(),
            candidates: w.candidates.as_reader(),
            pods: w.pods.as_reader(),
            services: w.services.as_reader(),
            virtual_services: w.virtual_services.as_reader(),
            destination_rules: w.destination_rules.as_reader(),
            http_routes: w.http_routes.as_reader(),
            slices: w.slices.as_reader(),
        };
        (w, caches)
    }

    fn listed<K: Resource<DynamicType = ()> + Clone + 'static>(w: &mut Writer<K>, objects: Vec<K>) {
        w.apply_watcher_event(&watcher::Event::Init);
        for o in objects {
            w.apply_watcher_event(&watcher::Event::InitApply(o));
        }
        w.apply_watcher_event(&watcher::Event::InitDone);
    }

    fn object<K: DeserializeOwned>(value: serde_json::Value) -> K {
        serde_json::from_value(value).unwrap()
    }

    fn podinfo() -> Deployment {
        object(json!({
            "metadata": { "name": "podinfo", "namespace": "shop", "uid": "u1" },
            "spec": { "selector": { "matchLabels": { "app": "podinfo" } },
                      "template": { "metadata": { "labels": { "app": "podinfo", "version": "v1" } } } }
        }))
    }

    fn replica_set(ns: &str, name: &str, app: &str) -> ReplicaSet {
        object(json!({
            "metadata": { "name": name, "namespace": ns, "labels": { "app": app },
                          "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "Deployment", "name": "podinfo", "uid": "u1" }] },
            "spec": { "selector": {} }
        }))
    }

    fn labelled<K: DeserializeOwned>(ns: &str, name: &str, of: &str) -> K {
        object(json!({
            "metadata": { "name": name, "namespace": ns, "labels": { "turnout.dev/release-of": of, "turnout.dev/revision": "2" } },
            "spec": { "selector": {}, "template": {}, "containers": [] }
        }))
    }

    fn service(ns: &str, name: &str) -> Service {
        object(json!({ "metadata": { "name": name, "namespace": ns }, "spec": { "selector": { "app": "podinfo" } } }))
    }

    fn virtual_service(rv: &str) -> VirtualService {
        object(json!({ "metadata": { "name": "podinfo", "namespace": "shop", "resourceVersion": rv }, "spec": {} }))
    }

    fn names<K: Resource>(objects: &[Arc<K>]) -> Vec<String> {
        let mut names: Vec<String> = objects
            .iter()
            .map(|o| o.meta().name.clone().unwrap_or_default())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_pass_reads_only_the_objects_of_its_deployment() {
        let (mut w, caches) = writers();
        listed(
            &mut w.replica_sets,
            vec![
                replica_set("shop", "podinfo-1", "podinfo"),
                replica_set("shop", "other-1", "other"),
                replica_set("blog", "podinfo-1", "podinfo"),
            ],
        );
        listed(
            &mut w.candidates,
            vec![
                labelled("shop", "podinfo-v2", "podinfo"),
                labelled("shop", "other-v2", "other"),
                labelled("blog", "podinfo-v2", "podinfo"),
            ],
        );
        listed(
            &mut w.pods,
            vec![
                labelled("shop", "podinfo-v2-x", "podinfo"),
                labelled("shop", "other-v2-x", "other"),
            ],
        );
        listed(
            &mut w.services,
            vec![service("shop", "podinfo"), service("blog", "podinfo")],
        );
        let reads = caches.reads(&podinfo());
        assert_eq!(names(&reads.replica_sets), ["podinfo-1"]);
        assert_eq!(reads.replica_sets[0].metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(names(&reads.candidates), ["podinfo-v2"]);
        assert_eq!(reads.candidates[0].metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(names(&reads.pods), ["podinfo-v2-x"]);
        assert_eq!(reads.services.len(), 1);
        assert_eq!(reads.services[0].metadata.namespace.as_deref(), Some("shop"));

        listed(&mut w.virtual_services, vec![virtual_service("7")]);
        listed(&mut w.destination_rules, vec![]);
        let config = ReleaseConfig::default();
        let snap = caches.snapshot(&podinfo(), &config, ProviderKind::Istio, true);
        assert_eq!(snap.hosts.len(), 1, "the Service that selects the pods");
        let routing::Stored::Istio(stored) = &snap.stored[0] else {
            panic!("{:?}", snap.stored[0])
        };
        let version = stored
            .virtual_service
            .as_ref()
            .map(|vs| vs.metadata.resource_version.clone());
        assert_eq!(version, Some(Some("7".into())), "with the version a replace names");
        assert!(stored.destination_rule.is_none());
        let without_istio = caches.snapshot(&podinfo(), &config, ProviderKind::Istio, false);
        let routing::Stored::Istio(stored) = &without_istio.stored[0] else {
            panic!("istio")
        };
        assert!(stored.virtual_service.is_none());
    }

    #[test]
    fn passes_read_from_the_caches_once_every_one_has_listed() {
        let (mut w, caches) = writers();
        let (istio, gateway) = (ProviderKind::Istio, ProviderKind::GatewayApi);
        assert!(!caches.synced(istio, false));
        listed(
            &mut w.namespaces,
            vec![object(json!({ "metadata": { "name": "shop" } }))],
        );
        listed(&mut w.replica_sets, vec![]);
        listed(&mut w.candidates, vec![]);
        listed(&mut w.pods, vec![]);
        assert!(!caches.synced(istio, false), "the Services are not listed yet");
        listed(&mut w.services, vec![]);
        assert!(caches.synced(istio, false));
        assert!(!caches.synced(istio, true), "the Istio objects are not listed yet");
        listed(&mut w.virtual_services, vec![]);
        listed(&mut w.destination_rules, vec![]);
        assert!(caches.synced(istio, true));
        assert!(!caches.synced(gateway, true), "the HTTPRoutes are not listed yet");
        listed(&mut w.http_routes, vec![]);
        listed(&mut w.slices, vec![]);
        assert!(caches.synced(gateway, true));
        assert!(caches.namespace("shop").is_some());
        assert!(caches.namespace("blog").is_none());
    }

    #[tokio::test]
    async fn a_write_counts_as_seen_once_the_cache_shows_it() {
        let (mut w, caches) = writers();
        let replaced = Written {
            kind: Kind::VirtualService,
            namespace: "shop".into(),
            name: "podinfo".into(),
            before: Some("7".into()),
            deleted: false,
        };
        let created = Written {
            before: None,
            ..replaced.clone()
        };
        let deleted = Written {
            deleted: true,
            ..created.clone()
        };
        let soon = Duration::from_millis(20);
        assert!(!caches.caught_up(&created, soon).await, "not there yet");
        assert!(caches.caught_up(&deleted, soon).await, "absent");
        w.virtual_services
            .apply_watcher_event(&watcher::Event::Apply(virtual_service("7")));
        assert!(caches.caught_up(&created, soon).await);
        assert!(!caches.caught_up(&replaced, soon).await, "still the version replaced");
        assert!(!caches.caught_up(&deleted, soon).await, "still there");
        w.virtual_services
            .apply_watcher_event(&watcher::Event::Apply(virtual_service("8")));
        assert!(caches.caught_up(&replaced, soon).await);
        let mut deleting = virtual_service("9");
        deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        w.virtual_services.apply_watcher_event(&watcher::Event::Apply(deleting));
        assert!(caches.caught_up(&deleted, soon).await, "being deleted");
        // The candidate and the DestinationRule are read from their own caches.
        let candidate = Written {
            kind: Kind::Candidate,
            name: "podinfo-v2".into(),
            ..created.clone()
        };
        assert!(!caches.caught_up(&candidate, soon).await);
        w.candidates
            .apply_watcher_event(&watcher::Event::Apply(labelled("shop", "podinfo-v2", "podinfo")));
        assert!(caches.caught_up(&candidate, soon).await);
        let rule = Written {
            kind: Kind::DestinationRule,
            ..created
        };
        assert!(!caches.caught_up(&rule, soon).await);
    }
}
