//! The Gateway API provider: an HTTPRoute per host, named after the Service, whose rule `turnout`
//! carries the weights on `backendRefs` (after a rule `turnout-match` sending the requests that match
//! to one backend, when a release has matches: it wins by the API's precedence, having more header or
//! query matches than the catch-all); and per-version Services (the backends: an HTTPRoute has no
//! subsets), each selecting one ReplicaSet by `pod-template-hash`, named `<service>-<backend>`.
//!
//! The route attaches to the Service itself (GAMMA: Istio ambient waypoints, Linkerd, Cilium's mesh)
//! or, with `turnout.dev/gateway`, to a Gateway with the hostnames of `turnout.dev/hostnames`
//! (north-south). At rest it sends everything to the plain Service. Propagation is read from
//! `status.parents[].conditions` (`Accepted` and `ResolvedRefs` for the current generation on every
//! parent) when the implementation writes them; otherwise the propagation delay bounds it. Services
//! report nothing, so a backend is usable the propagation delay after it was created and once its
//! EndpointSlice lists a ready endpoint.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::{Written, changed_at, is_ours, managed_meta, rfc3339, timestamp};
use crate::agent::cache::Kind;
use crate::config::ReleaseConfig;
use crate::gateway::http_route::{
    HttpRoute, HttpRouteParentRefs, HttpRouteRules, HttpRouteRulesBackendRefs, HttpRouteRulesBackendRefsFilters,
    HttpRouteRulesBackendRefsFiltersResponseHeaderModifier, HttpRouteRulesBackendRefsFiltersResponseHeaderModifierAdd,
    HttpRouteRulesBackendRefsFiltersType, HttpRouteRulesFilters, HttpRouteRulesFiltersRequestMirror,
    HttpRouteRulesFiltersRequestMirrorBackendRef, HttpRouteRulesFiltersType, HttpRouteRulesMatches,
    HttpRouteRulesMatchesHeaders, HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesQueryParams,
    HttpRouteRulesMatchesQueryParamsType, HttpRouteSpec,
};
use crate::names::{agent, backends};
use crate::release::routing::{MatchKind, Matched, Mirror, RequestMatch, Split, Sticky, ValueMatch};
use crate::release::{Applied, Backend, HostRouting, Managed, Millis, Route, RoutingAction, Synced, Weighted};

/// The name of the rule that sends the requests that match to one backend.
const MATCH_RULE: &str = "turnout-match";

/// The name of the rule that keeps the requests carrying the affinity cookie on its backend.
const STICKY_RULE: &str = "turnout-sticky";

/// The API group of the Gateway API.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// The label on a per-version Service naming the Service it is a backend of.
pub const BACKEND_OF: &str = "turnout.dev/backend-of";
/// The annotation on a per-version Service naming its backend (`v3-canary`).
pub const BACKEND: &str = "turnout.dev/backend";
/// The annotation on the HTTPRoute: when its backends last changed (a per-version Service deleted
/// leaves no object to carry the time).
pub const BACKENDS_CHANGED_AT: &str = "turnout.dev/backends-changed-at";

/// What is stored for a host, for writes.
#[derive(Clone, Debug, Default)]
pub struct Stored {
    /// The plain Service (its ports and selector are the per-version Services').
    pub service: Option<Service>,
    pub route: Option<HttpRoute>,
    /// turnout's per-version Services of this host.
    pub backends: Vec<Service>,
}

/// What the provider reads of a namespace.
#[derive(Clone, Debug, Default)]
pub struct Objects<'a> {
    pub services: &'a [Arc<Service>],
    pub http_routes: &'a [Arc<HttpRoute>],
    /// EndpointSlices of turnout's per-version Services.
    pub slices: &'a [Arc<EndpointSlice>],
}

/// The routing of Service `service`, what is stored for it, and why the implementation refuses the
/// route, if it does.
pub fn observe(service: &str, config: &ReleaseConfig, objects: &Objects<'_>) -> (HostRouting, Stored, Option<String>) {
    let plain = objects.services.iter().find(|s| s.name_any() == service);
    let ns = plain.and_then(|s| s.namespace()).unwrap_or_default();
    let route = objects.http_routes.iter().find(|r| r.name_any() == service);
    let own: Vec<Service> = objects
        .services
        .iter()
        .filter(|s| s.labels().get(BACKEND_OF).map(String::as_str) == Some(service) && is_ours(&s.metadata))
        .map(|s| (**s).clone())
        .collect();
    let stored = Stored {
        service: plain.map(|s| (**s).clone()),
        route: route.map(|r| (**r).clone()),
        backends: own,
    };
    let parent = parent_of(service, config);
    let conflict = objects
        .http_routes
        .iter()
        .filter(|r| r.name_any() != service && !is_ours(&r.metadata))
        .find(|r| attaches_like(r, &parent, &ns, config));
    // Our own route stays ours even when another one competes with it: the release fails with the
    // reason, and is unwound through our route (taking traffic off the candidate, draining, then
    // removing the backends once no route of ours names them).
    let route_view = match (route, conflict) {
        (Some(r), _) if is_ours(&r.metadata) => Managed::Ours(route_of(r, service, &stored.backends)),
        (Some(r), _) => Managed::Foreign {
            kind: "HTTPRoute",
            name: format!("{ns}/{}", r.name_any()),
        },
        (None, Some(other)) => Managed::Foreign {
            kind: "HTTPRoute",
            name: format!("{ns}/{}", other.name_any()),
        },
        (None, None) => Managed::Absent,
    };
    let backends_view = backends_of(route, &stored.backends, objects.slices);
    let competing = conflict
        .filter(|_| matches!(route_view, Managed::Ours(_)))
        .map(|other| {
            format!(
                "HTTPRoute {ns}/{} for Service {service} is not managed by turnout; it was left untouched (label it \
             app.kubernetes.io/managed-by=turnout or delete it to let turnout manage the host)",
                other.name_any()
            )
        });
    let refused = route
        .filter(|r| is_ours(&r.metadata))
        .and_then(|r| refused(r))
        .or(competing);
    let host = HostRouting {
        service: service.to_owned(),
        backends: backends_view,
        route: route_view,
        // Attached to a Gateway, the route is what lets requests in at all.
        route_at_rest: config.gateway.is_some(),
    };
    (host, stored, refused)
}

/// The parentRef of a host's route: the Gateway named in the configuration, else the Service.
fn parent_of(service: &str, config: &ReleaseConfig) -> HttpRouteParentRefs {
    match &config.gateway {
        Some(gw) => HttpRouteParentRefs {
            group: Some(GROUP.into()),
            kind: Some("Gateway".into()),
            name: gw.name.clone(),
            namespace: gw.namespace.clone(),
            ..HttpRouteParentRefs::default()
        },
        None => HttpRouteParentRefs {
            group: Some(String::new()),
            kind: Some("Service".into()),
            name: service.to_owned(),
            ..HttpRouteParentRefs::default()
        },
    }
}

/// Whether route `r` attaches to the same parent as `parent` (and, on a Gateway, shares a hostname
/// with the configured ones, or either has none): two routes would then compete for the same requests.
fn attaches_like(r: &HttpRoute, parent: &HttpRouteParentRefs, ns: &str, config: &ReleaseConfig) -> bool {
    let same = |p: &HttpRouteParentRefs| {
        let group = |g: &Option<String>| g.clone().unwrap_or_else(|| GROUP.into());
        let kind = |k: &Option<String>| k.clone().unwrap_or_else(|| "Gateway".into());
        let pns = |n: &Option<String>, own: &str| n.clone().unwrap_or_else(|| own.to_owned());
        group(&p.group) == group(&parent.group)
            && kind(&p.kind) == kind(&parent.kind)
            && p.name == parent.name
            && pns(&p.namespace, &r.namespace().unwrap_or_default()) == pns(&parent.namespace, ns)
    };
    if !r.spec.parent_refs.iter().flatten().any(same) {
        return false;
    }
    if config.gateway.is_none() {
        return true;
    }
    let theirs = r.spec.hostnames.clone().unwrap_or_default();
    theirs.is_empty() || config.hostnames.is_empty() || theirs.iter().any(|h| config.hostnames.contains(h))
}

/// The route of a managed HTTPRoute: the rule `turnout-match` if there is one, and the weights of
/// the last rule's `backendRefs`, by backend name.
fn route_of(r: &HttpRoute, service: &str, own: &[Service]) -> Applied<Route> {
    let rules = r.spec.rules.as_deref().unwrap_or_default();
    let matched = rules
        .iter()
        .find(|rule| rule.name.as_deref() == Some(MATCH_RULE))
        .and_then(|rule| {
            let to = rule.backend_refs.as_ref()?.first()?;
            Some(Matched {
                matches: rule.matches.iter().flatten().map(request_match_of).collect(),
                backend: backend_name(&to.name, service, own),
            })
        });
    let weighted = rules
        .iter()
        .rfind(|rule| !matches!(rule.name.as_deref(), Some(MATCH_RULE | STICKY_RULE)));
    // The sticky rule's backend, and the cookie its answers set (a filter on its backendRef in the
    // weighted rule or, in an A/B test, in the rule of the requests that match).
    let sticky = rules
        .iter()
        .find(|rule| rule.name.as_deref() == Some(STICKY_RULE))
        .and_then(|rule| rule.backend_refs.as_ref()?.first())
        .and_then(|to| {
            let set = weighted
                .into_iter()
                .chain(rules.iter().find(|rule| rule.name.as_deref() == Some(MATCH_RULE)))
                .flat_map(|rule| rule.backend_refs.iter().flatten())
                .filter(|b| b.name == to.name)
                .flat_map(|b| b.filters.iter().flatten())
                .filter_map(|f| f.response_header_modifier.as_ref())
                .flat_map(|m| m.add.iter().flatten())
                .find(|h| h.name.eq_ignore_ascii_case("set-cookie"))?;
            Sticky::from_set_cookie(&set.value).filter(|s| s.backend == backend_name(&to.name, service, own))
        });
    let refs: Vec<&HttpRouteRulesBackendRefs> = weighted
        .and_then(|rule| rule.backend_refs.as_ref())
        .map(|refs| refs.iter().collect())
        .unwrap_or_default();
    let mirror = weighted
        .and_then(|rule| rule.filters.as_ref())
        .into_iter()
        .flatten()
        .find_map(|f| f.request_mirror.as_ref())
        .map(|m| Mirror {
            backend: backend_name(&m.backend_ref.name, service, own),
            percent: match (m.percent, &m.fraction) {
                (Some(p), _) => u8::try_from(p.clamp(0, 100)).unwrap_or(100),
                (None, Some(f)) => {
                    let share = 100 * i64::from(f.numerator) / i64::from(f.denominator.unwrap_or(100).max(1));
                    u8::try_from(share.clamp(0, 100)).unwrap_or(100)
                }
                (None, None) => 100,
            },
        });
    let to_host = (refs.is_empty() || refs.iter().all(|b| b.name == service))
        && matched.is_none()
        && mirror.is_none()
        && sticky.is_none();
    let value = if to_host {
        Route::Host
    } else {
        Route::Split(Split {
            weights: refs
                .iter()
                .map(|b| Weighted {
                    backend: backend_name(&b.name, service, own),
                    weight: u8::try_from(b.weight.unwrap_or(1).clamp(0, 100)).unwrap_or(0),
                })
                .collect(),
            matched,
            mirror,
            sticky,
        })
    };
    Applied {
        value,
        changed_at: changed_at(&r.metadata),
        synced: if accepted(r) { Synced::Reported } else { Synced::Unknown },
    }
}

/// The backend per-version Service `svc` of Service `service` stands for, by its name (`podinfo-v3-canary`
/// → `v3-canary`).
pub fn backend_of(service: &str, svc: &str) -> String {
    svc.strip_prefix(service)
        .and_then(|rest| rest.strip_prefix('-'))
        .unwrap_or(svc)
        .to_owned()
}

/// The backend a per-version Service stands for: its annotation, else its name without the prefix.
fn backend_name(svc: &str, service: &str, own: &[Service]) -> String {
    own.iter()
        .find(|s| s.name_any() == svc)
        .and_then(|s| s.annotations().get(BACKEND).cloned())
        .unwrap_or_else(|| backend_of(service, svc))
}

/// Every parent reports the current generation `Accepted` and `ResolvedRefs`.
fn accepted(r: &HttpRoute) -> bool {
    let generation = r.metadata.generation;
    let parents = r.status.as_ref().map(|s| s.parents.as_slice()).unwrap_or_default();
    !parents.is_empty()
        && parents.iter().all(|p| {
            ["Accepted", "ResolvedRefs"].iter().all(|t| {
                p.conditions
                    .iter()
                    .any(|c| c.type_ == *t && c.status == "True" && c.observed_generation == generation)
            })
        })
}

/// An implementation refuses the current generation of the route (`Accepted=False`), with its reason.
fn refused(r: &HttpRoute) -> Option<String> {
    let generation = r.metadata.generation;
    r.status.as_ref()?.parents.iter().find_map(|p| {
        let c = p
            .conditions
            .iter()
            .find(|c| c.type_ == "Accepted" && c.status == "False" && c.observed_generation == generation)?;
        Some(format!(
            "HTTPRoute {}/{} is not accepted by {} for parent {}: {} ({})",
            r.namespace().unwrap_or_default(),
            r.name_any(),
            p.controller_name,
            p.parent_ref.name,
            c.message,
            c.reason
        ))
    })
}

/// The backends: turnout's per-version Services. They changed when the newest was created or when
/// the route's annotation says (a deletion). Until a Service created after the route last changed
/// has a ready endpoint, nothing may name it.
fn backends_of(
    route: Option<&Arc<HttpRoute>>,
    own: &[Service],
    slices: &[Arc<EndpointSlice>],
) -> Managed<Applied<Vec<Backend>>> {
    let route_ours = route.filter(|r| is_ours(&r.metadata));
    if own.is_empty() && route_ours.is_none() {
        return Managed::Absent;
    }
    let removed_at = route_ours
        .and_then(|r| r.annotations().get(BACKENDS_CHANGED_AT).map(|v| timestamp(v)))
        .unwrap_or(0);
    let routed_at = route_ours.map_or(0, |r| changed_at(&r.metadata));
    let mut value: Vec<Backend> = own
        .iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .filter_map(|s| {
            Some(Backend {
                name: s.annotations().get(BACKEND)?.clone(),
                hash: s
                    .spec
                    .as_ref()?
                    .selector
                    .as_ref()?
                    .get(agent::POD_TEMPLATE_HASH)?
                    .clone(),
            })
        })
        .collect();
    value.sort();
    let created = own.iter().map(|s| changed_at(&s.metadata)).max().unwrap_or(0);
    let not_yet = own
        .iter()
        .filter(|s| changed_at(&s.metadata) >= routed_at)
        .any(|s| !has_ready_endpoint(&s.name_any(), slices));
    Managed::Ours(Applied {
        value,
        changed_at: created.max(removed_at),
        synced: if not_yet { Synced::NotYet } else { Synced::Unknown },
    })
}

fn has_ready_endpoint(service: &str, slices: &[Arc<EndpointSlice>]) -> bool {
    slices
        .iter()
        .filter(|s| s.labels().get("kubernetes.io/service-name").map(String::as_str) == Some(service))
        .flat_map(|s| s.endpoints.iter().flatten())
        .any(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
}

/// Carries out `action` on the host's per-version Services or HTTPRoute.
pub async fn apply(
    client: &Client,
    d: &Deployment,
    config: &ReleaseConfig,
    host: &HostRouting,
    stored: &Stored,
    action: &RoutingAction,
    now: Millis,
) -> kube::Result<Vec<Written>> {
    let ns = d.namespace().unwrap_or_default();
    let service = &host.service;
    let mut written = Vec::new();
    match action {
        RoutingAction::PutBackends { backends: want, .. } => {
            let services: Api<Service> = Api::namespaced(client.clone(), &ns);
            let Some(plain) = &stored.service else {
                return Err(missing(&ns, service));
            };
            for b in want {
                let name = backends::service(service, &b.name);
                if stored.backends.iter().any(|s| s.name_any() == name) {
                    continue;
                }
                let svc = per_version(d, plain, service, b, now);
                match services.create(&PostParams::default(), &svc).await {
                    Ok(_) => written.push(Written::of(Kind::Service, &ns, &name, None)),
                    Err(kube::Error::Api(mut e)) if e.code == 409 => {
                        e.message = format!(
                            "cannot create the per-version Service {ns}/{name}: a Service of that name exists \
                             that turnout does not manage"
                        );
                        return Err(kube::Error::Api(e));
                    }
                    Err(e) => return Err(e),
                }
            }
            // The time of the change goes on the route before anything is deleted: a crash in between
            // leaves a later time, which only waits longer.
            if let Some(route) = stored.route.as_ref().filter(|r| is_ours(&r.metadata)) {
                let routes: Api<HttpRoute> = Api::namespaced(client.clone(), &ns);
                let body = json!({ "metadata": { "annotations": { BACKENDS_CHANGED_AT: rfc3339(now) } } });
                routes
                    .patch(service, &PatchParams::default(), &Patch::Merge(&body))
                    .await?;
                written.push(Written::of(Kind::HttpRoute, &ns, service, Some(&route.metadata)));
            }
            for old in &stored.backends {
                let keep = want
                    .iter()
                    .any(|b| backends::service(service, &b.name) == old.name_any());
                if keep {
                    continue;
                }
                match services.delete(&old.name_any(), &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
                let mut w = Written::of(Kind::Service, &ns, &old.name_any(), Some(&old.metadata));
                w.deleted = true;
                written.push(w);
            }
        }
        RoutingAction::PutRoute { route, .. } => {
            let Some(plain) = &stored.service else {
                return Err(missing(&ns, service));
            };
            let api: Api<HttpRoute> = Api::namespaced(client.clone(), &ns);
            let before = stored.route.as_ref().map(|o| &o.metadata);
            let mut r = HttpRoute::new(service, route_spec(service, plain, config, route));
            r.metadata = managed_meta(d, service, before, now);
            if before.is_some() {
                api.replace(service, &PostParams::default(), &r).await?;
            } else {
                api.create(&PostParams::default(), &r).await?;
            }
            written.push(Written::of(Kind::HttpRoute, &ns, service, before));
        }
    }
    Ok(written)
}

fn missing(ns: &str, service: &str) -> kube::Error {
    kube::Error::Api(
        kube::core::Status::failure(&format!("Service {ns}/{service} is gone"), "NotFound")
            .with_code(404)
            .boxed(),
    )
}

/// The port routes use: the plain Service's first.
fn port_of(plain: &Service) -> Option<i32> {
    plain.spec.as_ref()?.ports.as_ref()?.first().map(|p| p.port)
}

/// The per-version Service of backend `b`: the plain Service's ports, its selector narrowed to one
/// ReplicaSet by `pod-template-hash`, labelled as turnout's, owned by the Deployment.
pub fn per_version(d: &Deployment, plain: &Service, service: &str, b: &Backend, now: Millis) -> Service {
    let spec = plain.spec.clone().unwrap_or_default();
    let mut selector = spec.selector.clone().unwrap_or_default();
    selector.insert(agent::POD_TEMPLATE_HASH.into(), b.hash.clone());
    let ports = spec.ports.map(|ports| {
        ports
            .into_iter()
            .map(|p| ServicePort { node_port: None, ..p })
            .collect()
    });
    let name = backends::service(service, &b.name);
    let mut meta = managed_meta(d, &name, None, now);
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(BACKEND_OF.into(), service.to_owned());
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(BACKEND.into(), b.name.clone());
    Service {
        metadata: ObjectMeta {
            namespace: d.namespace(),
            ..meta
        },
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports,
            type_: Some("ClusterIP".into()),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The HTTPRoute of a host: attached to its parent, one rule whose `backendRefs` carry the weights.
fn route_spec(service: &str, plain: &Service, config: &ReleaseConfig, route: &Route) -> HttpRouteSpec {
    let port = port_of(plain);
    let mut parent = parent_of(service, config);
    if config.gateway.is_none() {
        parent.port = port;
    }
    let backend_ref = |name: String, weight: i32| HttpRouteRulesBackendRefs {
        group: Some(String::new()),
        kind: Some("Service".into()),
        name,
        port,
        weight: Some(weight),
        ..HttpRouteRulesBackendRefs::default()
    };
    let mut rules = Vec::new();
    let refs = match route {
        Route::Host => vec![backend_ref(service.to_owned(), 1)],
        Route::Split(split) => {
            // The sticky backend's answers set the cookie, wherever they come from.
            let set_cookie = |to: &mut HttpRouteRulesBackendRefs, backend: &str| {
                if let Some(s) = split.sticky.as_ref().filter(|s| s.backend == backend) {
                    to.filters = Some(vec![HttpRouteRulesBackendRefsFilters {
                        cors: None,
                        extension_ref: None,
                        request_header_modifier: None,
                        request_mirror: None,
                        request_redirect: None,
                        response_header_modifier: Some(HttpRouteRulesBackendRefsFiltersResponseHeaderModifier {
                            add: Some(vec![HttpRouteRulesBackendRefsFiltersResponseHeaderModifierAdd {
                                name: "Set-Cookie".into(),
                                value: s.set_cookie(),
                            }]),
                            remove: None,
                            set: None,
                        }),
                        r#type: HttpRouteRulesBackendRefsFiltersType::ResponseHeaderModifier,
                        url_rewrite: None,
                    }]);
                }
            };
            if let Some(m) = &split.matched {
                let mut to = backend_ref(backends::service(service, &m.backend), 1);
                set_cookie(&mut to, &m.backend);
                rules.push(HttpRouteRules {
                    name: Some(MATCH_RULE.into()),
                    matches: Some(m.matches.iter().map(route_match).collect()),
                    backend_refs: Some(vec![to]),
                    ..HttpRouteRules::default()
                });
            }
            if let Some(s) = &split.sticky {
                rules.push(HttpRouteRules {
                    name: Some(STICKY_RULE.into()),
                    matches: Some(vec![HttpRouteRulesMatches {
                        headers: Some(vec![HttpRouteRulesMatchesHeaders {
                            name: "cookie".into(),
                            r#type: Some(HttpRouteRulesMatchesHeadersType::RegularExpression),
                            value: s.cookie_regex(),
                        }]),
                        ..HttpRouteRulesMatches::default()
                    }]),
                    backend_refs: Some(vec![backend_ref(backends::service(service, &s.backend), 1)]),
                    ..HttpRouteRules::default()
                });
            }
            split
                .weights
                .iter()
                .map(|p| {
                    let mut to = backend_ref(backends::service(service, &p.backend), i32::from(p.weight));
                    set_cookie(&mut to, &p.backend);
                    to
                })
                .collect()
        }
    };
    // Copies of a share of the requests the weights route: a RequestMirror filter on that rule.
    let filters = match route {
        Route::Split(Split { mirror: Some(m), .. }) => Some(vec![HttpRouteRulesFilters {
            cors: None,
            extension_ref: None,
            request_header_modifier: None,
            request_mirror: Some(HttpRouteRulesFiltersRequestMirror {
                backend_ref: HttpRouteRulesFiltersRequestMirrorBackendRef {
                    group: Some(String::new()),
                    kind: Some("Service".into()),
                    name: backends::service(service, &m.backend),
                    namespace: None,
                    port,
                },
                fraction: None,
                percent: Some(i32::from(m.percent)),
            }),
            request_redirect: None,
            response_header_modifier: None,
            r#type: HttpRouteRulesFiltersType::RequestMirror,
            url_rewrite: None,
        }]),
        _ => None,
    };
    rules.push(HttpRouteRules {
        name: Some("turnout".into()),
        backend_refs: Some(refs),
        filters,
        ..HttpRouteRules::default()
    });
    HttpRouteSpec {
        hostnames: (config.gateway.is_some() && !config.hostnames.is_empty()).then(|| config.hostnames.clone()),
        parent_refs: Some(vec![parent]),
        rules: Some(rules),
    }
}

/// A match as an `HTTPRouteMatch` (the path left to its default, a prefix of `/`).
fn route_match(m: &RequestMatch) -> HttpRouteRulesMatches {
    let regex = |v: &ValueMatch| v.kind == MatchKind::RegularExpression;
    HttpRouteRulesMatches {
        headers: (!m.headers.is_empty()).then(|| {
            m.headers
                .iter()
                .map(|v| HttpRouteRulesMatchesHeaders {
                    name: v.name.clone(),
                    r#type: Some(if regex(v) {
                        HttpRouteRulesMatchesHeadersType::RegularExpression
                    } else {
                        HttpRouteRulesMatchesHeadersType::Exact
                    }),
                    value: v.value.clone(),
                })
                .collect()
        }),
        query_params: (!m.query_params.is_empty()).then(|| {
            m.query_params
                .iter()
                .map(|v| HttpRouteRulesMatchesQueryParams {
                    name: v.name.clone(),
                    r#type: Some(if regex(v) {
                        HttpRouteRulesMatchesQueryParamsType::RegularExpression
                    } else {
                        HttpRouteRulesMatchesQueryParamsType::Exact
                    }),
                    value: v.value.clone(),
                })
                .collect()
        }),
        ..HttpRouteRulesMatches::default()
    }
}

/// The match an `HTTPRouteMatch` of turnout's stands for.
fn request_match_of(m: &HttpRouteRulesMatches) -> RequestMatch {
    RequestMatch {
        headers: m
            .headers
            .iter()
            .flatten()
            .map(|h| ValueMatch {
                name: h.name.clone(),
                value: h.value.clone(),
                kind: match h.r#type {
                    Some(HttpRouteRulesMatchesHeadersType::RegularExpression) => MatchKind::RegularExpression,
                    _ => MatchKind::Exact,
                },
            })
            .collect(),
        query_params: m
            .query_params
            .iter()
            .flatten()
            .map(|q| ValueMatch {
                name: q.name.clone(),
                value: q.value.clone(),
                kind: match q.r#type {
                    Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression) => MatchKind::RegularExpression,
                    _ => MatchKind::Exact,
                },
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::GatewayRef;

    fn plain() -> Arc<Service> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": { "name": "podinfo", "namespace": "shop" },
                "spec": { "selector": { "app": "podinfo" }, "ports": [{ "name": "http", "port": 9898, "targetPort": 9898 }] }
            }))
            .unwrap(),
        )
    }

    fn deployment() -> Deployment {
        serde_json::from_value(json!({
            "metadata": { "name": "podinfo", "namespace": "shop", "uid": "u1" },
            "spec": { "selector": { "matchLabels": { "app": "podinfo" } }, "template": {} }
        }))
        .unwrap()
    }

    fn slice(service: &str, ready: bool) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": { "name": format!("{service}-x"), "namespace": "shop",
                              "labels": { "kubernetes.io/service-name": service } },
                "addressType": "IPv4",
                "endpoints": [{ "addresses": ["10.244.0.9"], "conditions": { "ready": ready } }]
            }))
            .unwrap(),
        )
    }

    fn route_at(route: &Route, config: &ReleaseConfig, at: Millis) -> HttpRoute {
        let mut r = HttpRoute::new("podinfo", route_spec("podinfo", &plain(), config, route));
        r.metadata = managed_meta(&deployment(), "podinfo", None, at);
        r.metadata.namespace = Some("shop".into());
        r.metadata.generation = Some(2);
        r
    }

    #[test]
    fn weights_go_on_backend_refs_to_per_version_services_and_read_back() {
        let config = ReleaseConfig::default();
        let split = Route::weights(vec![
            Weighted {
                backend: "v1".into(),
                weight: 90,
            },
            Weighted {
                backend: "v2-canary".into(),
                weight: 10,
            },
        ]);
        let r = route_at(&split, &config, 1_000);
        let rule = &r.spec.rules.as_ref().unwrap()[0];
        let refs: Vec<(&str, Option<i32>, Option<i32>)> = rule
            .backend_refs
            .iter()
            .flatten()
            .map(|b| (b.name.as_str(), b.weight, b.port))
            .collect();
        assert_eq!(
            refs,
            [
                ("podinfo-v1", Some(90), Some(9898)),
                ("podinfo-v2-canary", Some(10), Some(9898))
            ]
        );
        let parent = &r.spec.parent_refs.as_ref().unwrap()[0];
        assert_eq!(
            (parent.kind.as_deref(), parent.name.as_str(), parent.port),
            (Some("Service"), "podinfo", Some(9898)),
            "GAMMA: attached to the Service"
        );
        assert_eq!(route_of(&r, "podinfo", &[]).value, split);
        let at_rest = route_at(&Route::Host, &config, 1_000);
        assert_eq!(route_of(&at_rest, "podinfo", &[]).value, Route::Host);
    }

    #[test]
    fn requests_that_match_get_a_rule_of_their_own_before_the_weights_and_read_back() {
        let matches = crate::release::routing::parse_matches(
            r#"[{"headers":[{"name":"x-user-group","value":"beta"}]},
                {"headers":[{"name":"cookie","value":"^(.*;)?beta=1(;.*)?$","type":"RegularExpression"}],
                 "queryParams":[{"name":"tier","value":"gold"}]}]"#,
        )
        .unwrap();
        let route = Route::Split(Split {
            weights: vec![Weighted {
                backend: "v1".into(),
                weight: 100,
            }],
            matched: Some(Matched {
                matches,
                backend: "v2-canary".into(),
            }),
            mirror: None,
            sticky: None,
        });
        let r = route_at(&route, &ReleaseConfig::default(), 1_000);
        let json = serde_json::to_value(&r.spec).unwrap();
        let rules = json["rules"].as_array().unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0]["name"], "turnout-match");
        assert_eq!(
            rules[0]["matches"][0]["headers"][0],
            json!({ "name": "x-user-group", "type": "Exact", "value": "beta" })
        );
        assert_eq!(rules[0]["matches"][1]["headers"][0]["type"], "RegularExpression");
        assert_eq!(rules[0]["matches"][1]["queryParams"][0]["name"], "tier");
        assert_eq!(rules[0]["backendRefs"][0]["name"], "podinfo-v2-canary");
        assert_eq!(rules[1]["name"], "turnout");
        assert_eq!(rules[1]["backendRefs"][0]["name"], "podinfo-v1");
        assert!(rules[1]["matches"].is_null(), "the weights catch every other request");
        assert_eq!(route_of(&r, "podinfo", &[]).value, route);
    }

    #[test]
    fn copies_go_to_a_request_mirror_filter_at_its_percentage_and_read_back() {
        let route = Route::Split(Split {
            weights: vec![Weighted {
                backend: "v1".into(),
                weight: 100,
            }],
            matched: None,
            mirror: Some(Mirror {
                backend: "v2-canary".into(),
                percent: 20,
            }),
            sticky: None,
        });
        let r = route_at(&route, &ReleaseConfig::default(), 1_000);
        let json = serde_json::to_value(&r.spec).unwrap();
        let filter = &json["rules"][0]["filters"][0];
        assert_eq!(filter["type"], "RequestMirror");
        assert_eq!(filter["requestMirror"]["backendRef"]["name"], "podinfo-v2-canary");
        assert_eq!(filter["requestMirror"]["backendRef"]["port"], 9898);
        assert_eq!(filter["requestMirror"]["percent"], 20);
        assert_eq!(route_of(&r, "podinfo", &[]).value, route);
    }

    #[test]
    fn an_a_b_test_with_affinity_sets_the_cookie_on_the_matched_rule_and_reads_back() {
        let matches =
            crate::release::routing::parse_matches(r#"[{"queryParams":[{"name":"beta","value":"1"}]}]"#).unwrap();
        let route = Route::Split(Split {
            weights: vec![Weighted {
                backend: "v1".into(),
                weight: 100,
            }],
            matched: Some(Matched {
                matches,
                backend: "v2-canary".into(),
            }),
            mirror: None,
            sticky: Some(Sticky {
                cookie: "turnout-canary".into(),
                backend: "v2-canary".into(),
            }),
        });
        let r = route_at(&route, &ReleaseConfig::default(), 1_000);
        let json = serde_json::to_value(&r.spec).unwrap();
        let rules = json["rules"].as_array().unwrap();
        let matched = rules
            .iter()
            .find(|r| r["name"] == "turnout-match")
            .expect("a match rule");
        let filter = &matched["backendRefs"][0]["filters"][0];
        assert_eq!(filter["type"], "ResponseHeaderModifier");
        assert_eq!(
            filter["responseHeaderModifier"]["add"][0]["value"],
            "turnout-canary=v2-canary; Path=/"
        );
        assert!(rules.iter().any(|r| r["name"] == "turnout-sticky"));
        assert_eq!(route_of(&r, "podinfo", &[]).value, route);
    }

    #[test]
    fn a_blue_green_standby_sends_its_matches_and_copies_of_the_rest_and_reads_back() {
        let matches =
            crate::release::routing::parse_matches(r#"[{"headers":[{"name":"x-user-group","value":"beta"}]}]"#)
                .unwrap();
        let route = Route::Split(Split {
            weights: vec![Weighted {
                backend: "v1".into(),
                weight: 100,
            }],
            matched: Some(Matched {
                matches,
                backend: "v2-canary".into(),
            }),
            mirror: Some(Mirror {
                backend: "v2-canary".into(),
                percent: 50,
            }),
            sticky: None,
        });
        let r = route_at(&route, &ReleaseConfig::default(), 1_000);
        let json = serde_json::to_value(&r.spec).unwrap();
        let rules = json["rules"].as_array().unwrap();
        let matched = rules
            .iter()
            .find(|r| r["name"] == "turnout-match")
            .expect("a match rule");
        assert_eq!(matched["backendRefs"][0]["name"], "podinfo-v2-canary");
        let rest = rules.iter().find(|r| r["name"] != "turnout-match").unwrap();
        assert_eq!(rest["filters"][0]["requestMirror"]["percent"], 50);
        assert_eq!(rest["backendRefs"][0]["name"], "podinfo-v1");
        assert_eq!(route_of(&r, "podinfo", &[]).value, route);
    }

    #[test]
    fn a_sticky_canary_sets_its_cookie_by_a_backend_filter_and_a_rule_keeps_it_and_reads_back() {
        let route = Route::Split(Split {
            weights: vec![
                Weighted {
                    backend: "v1".into(),
                    weight: 80,
                },
                Weighted {
                    backend: "v2-canary".into(),
                    weight: 20,
                },
            ],
            matched: None,
            mirror: None,
            sticky: Some(Sticky {
                cookie: "turnout-canary".into(),
                backend: "v2-canary".into(),
            }),
        });
        let r = route_at(&route, &ReleaseConfig::default(), 1_000);
        let json = serde_json::to_value(&r.spec).unwrap();
        let rules = json["rules"].as_array().unwrap();
        assert_eq!(rules[0]["name"], "turnout-sticky");
        assert_eq!(rules[0]["matches"][0]["headers"][0]["name"], "cookie");
        assert_eq!(rules[0]["matches"][0]["headers"][0]["type"], "RegularExpression");
        assert_eq!(rules[0]["backendRefs"][0]["name"], "podinfo-v2-canary");
        let canary = &rules[1]["backendRefs"][1];
        assert_eq!(canary["filters"][0]["type"], "ResponseHeaderModifier");
        assert_eq!(
            canary["filters"][0]["responseHeaderModifier"]["add"][0],
            json!({ "name": "Set-Cookie", "value": "turnout-canary=v2-canary; Path=/" })
        );
        assert!(rules[1]["backendRefs"][0]["filters"].is_null());
        assert_eq!(route_of(&r, "podinfo", &[]).value, route);
    }

    #[test]
    fn a_gateway_attachment_names_the_gateway_and_the_hostnames() {
        let config = ReleaseConfig {
            gateway: Some(GatewayRef {
                namespace: Some("infra".into()),
                name: "public".into(),
            }),
            hostnames: vec!["shop.example.com".into()],
            ..ReleaseConfig::default()
        };
        let r = route_at(&Route::Host, &config, 0);
        let parent = &r.spec.parent_refs.as_ref().unwrap()[0];
        assert_eq!(
            (
                parent.group.as_deref(),
                parent.kind.as_deref(),
                parent.namespace.as_deref(),
                parent.name.as_str()
            ),
            (Some(GROUP), Some("Gateway"), Some("infra"), "public")
        );
        assert_eq!(r.spec.hostnames.as_deref(), Some(&["shop.example.com".to_owned()][..]));
    }

    #[test]
    fn the_route_is_reported_propagated_only_when_every_parent_accepts_this_generation() {
        let config = ReleaseConfig::default();
        let with_status = |conditions: serde_json::Value| {
            let mut r = route_at(&Route::Host, &config, 5_000);
            r.status = Some(
                serde_json::from_value(json!({ "parents": [{
                    "parentRef": { "name": "podinfo", "kind": "Service", "group": "" },
                    "controllerName": "example.com/mesh", "conditions": conditions }] }))
                .unwrap(),
            );
            r
        };
        let cond = |t: &str, s: &str, g: i64| {
            json!({ "type": t, "status": s, "observedGeneration": g, "reason": "R", "message": "m",
                    "lastTransitionTime": "2026-12-07T00:00:00Z" })
        };
        let ok = with_status(json!([cond("Accepted", "True", 2), cond("ResolvedRefs", "True", 2)]));
        assert_eq!(route_of(&ok, "podinfo", &[]).synced, Synced::Reported);
        let old = with_status(json!([cond("Accepted", "True", 1), cond("ResolvedRefs", "True", 1)]));
        assert_eq!(route_of(&old, "podinfo", &[]).synced, Synced::Unknown);
        let unresolved = with_status(json!([cond("Accepted", "True", 2), cond("ResolvedRefs", "False", 2)]));
        assert_eq!(route_of(&unresolved, "podinfo", &[]).synced, Synced::Unknown);
        let refused_route = with_status(json!([cond("Accepted", "False", 2)]));
        assert_eq!(
            refused(&refused_route).as_deref(),
            Some("HTTPRoute shop/podinfo is not accepted by example.com/mesh for parent podinfo: m (R)")
        );
        assert_eq!(refused(&ok), None);
    }

    #[test]
    fn a_new_per_version_service_is_not_usable_before_it_has_a_ready_endpoint() {
        let config = ReleaseConfig::default();
        let d = deployment();
        let backend = Backend {
            name: "v2-canary".into(),
            hash: "abc".into(),
        };
        let svc = per_version(&d, &plain(), "podinfo", &backend, 2_000);
        assert_eq!(svc.metadata.name.as_deref(), Some("podinfo-v2-canary"));
        let selector = svc.spec.as_ref().unwrap().selector.clone().unwrap();
        assert_eq!(
            selector,
            BTreeMap::from([
                ("app".into(), "podinfo".into()),
                ("pod-template-hash".into(), "abc".into())
            ])
        );
        let route = Arc::new(route_at(&Route::Host, &config, 1_000));
        let services = vec![plain(), Arc::new(svc)];
        let routes = vec![route];
        let view = |slices: &[Arc<EndpointSlice>]| {
            let objects = Objects {
                services: &services,
                http_routes: &routes,
                slices,
            };
            observe("podinfo", &config, &objects).0.backends
        };
        let Managed::Ours(waiting) = view(&[slice("podinfo-v2-canary", false)]) else {
            panic!("ours")
        };
        assert_eq!(waiting.value, std::slice::from_ref(&backend));
        assert_eq!(waiting.synced, Synced::NotYet);
        let Managed::Ours(ready) = view(&[slice("podinfo-v2-canary", true)]) else {
            panic!("ours")
        };
        assert_eq!((ready.synced, ready.changed_at), (Synced::Unknown, 2_000));
    }

    #[test]
    fn a_route_of_someone_else_for_the_same_service_is_reported_not_touched() {
        let config = ReleaseConfig::default();
        let theirs: HttpRoute = serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": { "name": "podinfo-canary", "namespace": "shop" },
            "spec": { "parentRefs": [{ "group": "", "kind": "Service", "name": "podinfo" }],
                      "rules": [{ "backendRefs": [{ "name": "podinfo", "port": 9898 }] }] }
        }))
        .unwrap();
        let services = vec![plain()];
        let routes = vec![Arc::new(theirs)];
        let objects = Objects {
            services: &services,
            http_routes: &routes,
            slices: &[],
        };
        let (host, _, _) = observe("podinfo", &config, &objects);
        assert_eq!(
            host.route,
            Managed::Foreign {
                kind: "HTTPRoute",
                name: "shop/podinfo-canary".into()
            }
        );
        let elsewhere = ReleaseConfig {
            gateway: Some(GatewayRef {
                namespace: None,
                name: "public".into(),
            }),
            ..ReleaseConfig::default()
        };
        let (host, _, _) = observe("podinfo", &elsewhere, &objects);
        assert_eq!(host.route, Managed::Absent, "attached elsewhere: no conflict");

        // With our own route in place the conflict fails the release, but our route stays ours so
        // that the release is unwound through it (never leaving its split pointing at deleted Services).
        let ours = Arc::new(route_at(
            &Route::weights(vec![
                Weighted {
                    backend: "v1".into(),
                    weight: 80,
                },
                Weighted {
                    backend: "v2-canary".into(),
                    weight: 20,
                },
            ]),
            &config,
            1_000,
        ));
        let both = vec![ours, routes[0].clone()];
        let objects = Objects {
            services: &services,
            http_routes: &both,
            slices: &[],
        };
        let (host, _, why) = observe("podinfo", &config, &objects);
        assert!(matches!(host.route, Managed::Ours(ref r) if r.value.weight_of("v2-canary") == 20));
        assert_eq!(
            why.as_deref(),
            Some(
                "HTTPRoute shop/podinfo-canary for Service podinfo is not managed by turnout; it was left untouched \
                 (label it app.kubernetes.io/managed-by=turnout or delete it to let turnout manage the host)"
            )
        );
    }
}
