//! Routing providers: the IO side of [`crate::release::routing`]. Each provider reads its objects
//! into [`HostRouting`] and carries out a [`RoutingAction`]; the release plan never sees which one.
//! Dispatch is by enum ([`Stored`]): async functions in traits are not object-safe, and there are few
//! providers.
//!
//! Which provider a Deployment uses ([`select`]): `turnout.dev/provider` on the Deployment or its
//! namespace; else an ambient namespace (`istio.io/dataplane-mode: ambient`) uses Gateway API; else
//! Istio when its CRDs are installed, else Gateway API when its CRDs are, else no mesh (`none`: the
//! plan scales the candidate instead of writing routes). A provider whose CRDs are missing fails the
//! release with the reason.

pub mod gateway_api;
pub mod istio;

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ListParams, ObjectMeta};
use kube::{Api, Client, ResourceExt};

pub use super::cache::Written;
use crate::config::ReleaseConfig;
use crate::gateway::http_route::HttpRoute;
use crate::istio::destination_rule::DestinationRule;
use crate::istio::virtual_service::VirtualService;
use crate::names::agent;
use crate::release::{HostRouting, Managed, Millis, ProviderKind, RoutingAction};

/// The label of an ambient namespace.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// Which providers' CRDs the API server serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Installed {
    pub istio: bool,
    pub gateway_api: bool,
}

impl Installed {
    fn has(self, provider: ProviderKind) -> bool {
        match provider {
            ProviderKind::Istio => self.istio,
            ProviderKind::GatewayApi => self.gateway_api,
            ProviderKind::None => true,
        }
    }
}

/// The provider of a Deployment in namespace `ns`, and why it cannot route if its CRDs are missing.
/// `pinned`: the provider a release in flight uses (`turnout.dev/routing`); it keeps it to the end,
/// whatever changes meanwhile (a namespace turned ambient, CRDs installed or removed, the annotation
/// edited): another provider would not see, nor unwind, the routing objects the release has written.
pub fn select(
    config: &ReleaseConfig,
    ns: &Namespace,
    installed: Installed,
    pinned: Option<ProviderKind>,
) -> (ProviderKind, Option<String>) {
    let ambient = ns.labels().get(DATAPLANE_MODE).map(String::as_str) == Some("ambient");
    let (provider, why) = match (pinned, config.provider) {
        (Some(p), _) => (p, format!("the release in flight routes with {p}")),
        (None, Some(p)) => (p, format!("turnout.dev/provider is {p}")),
        (None, None) if ambient => (
            ProviderKind::GatewayApi,
            format!("namespace {} is ambient ({DATAPLANE_MODE}=ambient)", ns.name_any()),
        ),
        (None, None) if installed.istio => (ProviderKind::Istio, String::new()),
        (None, None) if installed.gateway_api => (ProviderKind::GatewayApi, String::new()),
        (None, None) => (ProviderKind::None, String::new()),
    };
    if installed.has(provider) {
        return (provider, None);
    }
    let missing = match provider {
        ProviderKind::Istio => "the Istio CRDs (VirtualService, DestinationRule) are not installed",
        ProviderKind::GatewayApi => "the Gateway API CRD (HTTPRoute, gateway.networking.k8s.io/v1) is not installed",
        ProviderKind::None => unreachable!("no mesh needs no CRD"),
    };
    (
        provider,
        Some(format!("{why} but {missing}; traffic cannot be shifted")),
    )
}

/// What the providers read of a namespace, from the caches or the API server.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub virtual_services: Vec<Arc<VirtualService>>,
    pub destination_rules: Vec<Arc<DestinationRule>>,
    pub http_routes: Vec<Arc<HttpRoute>>,
    /// EndpointSlices of turnout's per-version Services.
    pub slices: Vec<Arc<EndpointSlice>>,
}

impl Objects {
    /// Lists `provider`'s objects in namespace `ns` from the API server.
    ///
    /// # Errors
    ///
    /// A request fails.
    pub async fn list(client: &Client, ns: &str, provider: ProviderKind) -> kube::Result<Self> {
        let all = ListParams::default();
        Ok(match provider {
            ProviderKind::Istio => Objects {
                virtual_services: arcs(
                    Api::<VirtualService>::namespaced(client.clone(), ns)
                        .list(&all)
                        .await?
                        .items,
                ),
                destination_rules: arcs(
                    Api::<DestinationRule>::namespaced(client.clone(), ns)
                        .list(&all)
                        .await?
                        .items,
                ),
                ..Objects::default()
            },
            ProviderKind::None => Objects::default(),
            ProviderKind::GatewayApi => {
                let backends = ListParams::default().labels(gateway_api::BACKEND_OF);
                let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns)
                    .list(&backends)
                    .await?
                    .items;
                Objects {
                    http_routes: arcs(Api::<HttpRoute>::namespaced(client.clone(), ns).list(&all).await?.items),
                    slices: arcs(slices),
                    ..Objects::default()
                }
            }
        })
    }
}

fn arcs<K>(items: Vec<K>) -> Vec<Arc<K>> {
    items.into_iter().map(Arc::new).collect()
}

/// What a provider stored for a host, for its writes.
#[derive(Clone, Debug)]
pub enum Stored {
    Istio(Box<istio::Stored>),
    GatewayApi(Box<gateway_api::Stored>),
    /// No mesh: no routing objects.
    None,
}

/// The routing of each of `hosts` with `provider`; a reason the implementation refuses a route, if it
/// does (the release fails with it).
pub fn observe(
    provider: ProviderKind,
    config: &ReleaseConfig,
    hosts: Vec<String>,
    services: &[Arc<Service>],
    objects: &Objects,
) -> (Vec<HostRouting>, Vec<Stored>, Option<String>) {
    let mut views = Vec::new();
    let mut stored = Vec::new();
    let mut refused = None;
    for service in hosts {
        match provider {
            ProviderKind::Istio => {
                let s = istio::Stored {
                    virtual_service: named(&objects.virtual_services, &service),
                    destination_rule: named(&objects.destination_rules, &service),
                };
                views.push(istio::observe(&service, &s));
                stored.push(Stored::Istio(Box::new(s)));
            }
            ProviderKind::GatewayApi => {
                let objects = gateway_api::Objects {
                    services,
                    http_routes: &objects.http_routes,
                    slices: &objects.slices,
                };
                let (view, s, why) = gateway_api::observe(&service, config, &objects);
                refused = refused.or(why);
                views.push(view);
                stored.push(Stored::GatewayApi(Box::new(s)));
            }
            ProviderKind::None => {
                views.push(HostRouting::absent(service));
                stored.push(Stored::None);
            }
        }
    }
    (views, stored, refused)
}

fn named<K: kube::Resource + Clone>(objects: &[Arc<K>], name: &str) -> Option<K> {
    objects
        .iter()
        .find(|o| o.meta().name.as_deref() == Some(name))
        .map(|o| (**o).clone())
}

/// Carries out a routing action for Deployment `d`; says which objects were written.
pub async fn apply(
    client: &Client,
    d: &Deployment,
    config: &ReleaseConfig,
    hosts: &[HostRouting],
    stored: &[Stored],
    action: &RoutingAction,
    now: Millis,
) -> kube::Result<Vec<Written>> {
    let (RoutingAction::PutBackends { host, .. } | RoutingAction::PutRoute { host, .. }) = action;
    match &stored[*host] {
        Stored::Istio(s) => istio::apply(client, d, &hosts[*host], s, action, now).await,
        Stored::GatewayApi(s) => gateway_api::apply(client, d, config, &hosts[*host], s, action, now).await,
        // The plan scales candidates instead; nothing to write.
        Stored::None => Ok(Vec::new()),
    }
}

/// Whether an object carries turnout's `managed-by` label.
pub fn is_ours(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(agent::MANAGED_BY))
        .map(String::as_str)
        == Some(agent::TURNOUT)
}

/// A routing object as far as turnout may touch it.
fn managed<T: kube::Resource, V>(kind: &'static str, obj: Option<&T>, view: impl Fn(&T) -> V) -> Managed<V> {
    match obj {
        None => Managed::Absent,
        Some(o) if is_ours(o.meta()) => Managed::Ours(view(o)),
        Some(o) => Managed::Foreign {
            kind,
            name: format!(
                "{}/{}",
                o.meta().namespace.clone().unwrap_or_default(),
                o.meta().name.clone().unwrap_or_default()
            ),
        },
    }
}

/// The time of turnout's last change to an object (`turnout.dev/changed-at`; 0 when unstamped).
pub fn changed_at(meta: &ObjectMeta) -> Millis {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(agent::CHANGED_AT))
        .map_or(0, |v| timestamp(v))
}

/// An RFC 3339 time in milliseconds since the epoch (0 when it is not one).
pub fn timestamp(value: &str) -> Millis {
    value
        .parse::<k8s_openapi::jiff::Timestamp>()
        .map_or(0, |t| u64::try_from(t.as_millisecond()).unwrap_or(0))
}

/// `now` as RFC 3339.
pub fn rfc3339(now: Millis) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(i64::try_from(now).unwrap_or(i64::MAX))
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
        .to_string()
}

/// Metadata of a routing object turnout manages: named `name`, labelled as turnout's, owned by the
/// Deployment, stamped with the time of the change.
pub fn managed_meta(d: &Deployment, name: &str, stored: Option<&ObjectMeta>, now: Millis) -> ObjectMeta {
    let mut meta = stored.cloned().unwrap_or_default();
    meta.name = Some(name.to_owned());
    meta.namespace = d.namespace();
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(agent::MANAGED_BY.into(), agent::TURNOUT.into());
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(agent::CHANGED_AT.into(), rfc3339(now));
    let owner = owner(d);
    let owners = meta.owner_references.get_or_insert_with(Vec::new);
    if !owners.iter().any(|o| o.uid == owner.uid) {
        owners.push(owner);
    }
    meta.managed_fields = None;
    meta
}

fn owner(d: &Deployment) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: d.name_any(),
        uid: d.uid().unwrap_or_default(),
        controller: Some(false),
        block_owner_deletion: Some(true),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn podinfo() -> Deployment {
        serde_json::from_value(json!({
            "metadata": { "name": "podinfo", "namespace": "shop", "uid": "u1" },
            "spec": { "selector": { "matchLabels": { "app": "podinfo" } }, "template": {} }
        }))
        .unwrap()
    }

    fn ns(labels: serde_json::Value) -> Namespace {
        serde_json::from_value(json!({ "metadata": { "name": "shop", "labels": labels } })).unwrap()
    }

    #[test]
    fn the_provider_is_asked_for_else_ambient_else_istio_else_gateway_api_else_none() {
        let both = Installed {
            istio: true,
            gateway_api: true,
        };
        let none = Installed::default();
        let gw_only = Installed {
            istio: false,
            gateway_api: true,
        };
        let default = ReleaseConfig::default();
        let plain = ns(json!({}));
        let ambient = ns(json!({ "istio.io/dataplane-mode": "ambient" }));
        assert_eq!(select(&default, &plain, both, None), (ProviderKind::Istio, None));
        assert_eq!(select(&default, &ambient, both, None), (ProviderKind::GatewayApi, None));
        assert_eq!(
            select(&default, &plain, gw_only, None),
            (ProviderKind::GatewayApi, None)
        );
        let asked = ReleaseConfig {
            provider: Some(ProviderKind::GatewayApi),
            ..ReleaseConfig::default()
        };
        assert_eq!(select(&asked, &plain, both, None), (ProviderKind::GatewayApi, None));
        let (p, why) = select(&asked, &plain, none, None);
        assert_eq!(p, ProviderKind::GatewayApi);
        assert_eq!(
            why.as_deref(),
            Some(
                "turnout.dev/provider is gateway-api but the Gateway API CRD (HTTPRoute, \
                 gateway.networking.k8s.io/v1) is not installed; traffic cannot be shifted"
            )
        );
        let (p, why) = select(&default, &ambient, none, None);
        assert_eq!(p, ProviderKind::GatewayApi);
        assert!(why.unwrap().starts_with("namespace shop is ambient"));
        assert_eq!(
            select(&default, &plain, none, None),
            (ProviderKind::None, None),
            "no mesh"
        );
        let istio = ReleaseConfig {
            provider: Some(ProviderKind::Istio),
            ..ReleaseConfig::default()
        };
        let (p, why) = select(&istio, &plain, gw_only, None);
        assert_eq!(p, ProviderKind::Istio);
        assert_eq!(
            why.as_deref(),
            Some(
                "turnout.dev/provider is istio but the Istio CRDs (VirtualService, DestinationRule) are not \
                 installed; traffic cannot be shifted"
            )
        );
        let nomesh = ReleaseConfig {
            provider: Some(ProviderKind::None),
            ..ReleaseConfig::default()
        };
        assert_eq!(select(&nomesh, &plain, both, None), (ProviderKind::None, None));
        // A release in flight keeps its provider, whatever the namespace or the annotation says now.
        assert_eq!(
            select(&nomesh, &ambient, both, Some(ProviderKind::Istio)),
            (ProviderKind::Istio, None)
        );
        let (p, why) = select(&default, &plain, gw_only, Some(ProviderKind::Istio));
        assert_eq!(p, ProviderKind::Istio);
        assert!(
            why.unwrap()
                .starts_with("the release in flight routes with istio but the Istio CRDs")
        );
    }

    #[test]
    fn a_rewrite_keeps_the_stored_metadata_and_owners_once() {
        let d = podinfo();
        let stored = ObjectMeta {
            name: Some("podinfo".into()),
            resource_version: Some("42".into()),
            labels: Some(BTreeMap::from([("team".into(), "shop".into())])),
            ..ObjectMeta::default()
        };
        let once = managed_meta(&d, "podinfo", Some(&stored), 1);
        let twice = managed_meta(&d, "podinfo", Some(&once), 2);
        assert_eq!(twice.resource_version.as_deref(), Some("42"), "replace is conditional");
        assert_eq!(twice.owner_references.as_ref().unwrap().len(), 1);
        assert_eq!(
            twice.labels.as_ref().unwrap().get("team").map(String::as_str),
            Some("shop")
        );
        assert_eq!(
            twice
                .labels
                .as_ref()
                .unwrap()
                .get(agent::MANAGED_BY)
                .map(String::as_str),
            Some(agent::TURNOUT)
        );
        assert_eq!(
            twice
                .annotations
                .as_ref()
                .unwrap()
                .get(agent::CHANGED_AT)
                .map(String::as_str),
            Some("1970-01-01T00:00:00.002Z")
        );
    }
}
