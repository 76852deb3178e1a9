//! The routing decision of one proxy, as a pure function: a snapshot and a request in, the pod to send it
//! to (or why there is none, with Envoy's status, body and response flag) out.
//!
//! A host's routing object, in order: a VirtualService covering it; else, for a Service's host, the
//! HTTPRoutes attached to that Service (GAMMA); else, for any other host, the HTTPRoutes attached to a
//! Gateway whose hostnames cover it; else the plain Service.

use std::net::SocketAddr;
use std::time::Duration;

use http::HeaderMap;

use super::gateway::{self, RefKind};
use super::headers::{self, HeaderOps};
use super::rng::Rng;
use super::snapshot::{
    DestinationRule, HttpRoute, Id, MatchRequest, Mirror, Service, ServicePort, Snapshot, VirtualService,
    WeightedDestination, host_matches, normalize_host, service_of,
};

/// What routing looks at in a request.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The `Host` header (or the URI's authority), with an optional port.
    pub authority: &'a str,
    pub method: &'a str,
    /// Path and query, e.g. `/api/info?x=1`.
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
}

/// Where a request goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Upstream {
    /// The destination Service's host, e.g. `podinfo.test.svc.cluster.local`.
    pub service_host: String,
    /// (namespace, name) of the destination Service.
    pub service: Id,
    pub subset: Option<String>,
    /// The chosen pod, in the Service's namespace.
    pub pod: String,
    pub workload: String,
    pub version: String,
    pub app: String,
    /// Where to connect.
    pub addr: SocketAddr,
    /// The route's timeout, if any.
    pub timeout: Option<Duration>,
    /// The VirtualService that decided, as `namespace/name`.
    pub virtual_service: Option<String>,
    /// The HTTPRoute that decided, as `namespace/name`.
    pub http_route: Option<String>,
    /// Changes to the forwarded request (and to its mirrored copies), level by level, most specific
    /// first as Envoy applies them: the chosen destination's (backendRef's), then the route's (rule's) —
    /// so for one name the route's `set` wins.
    pub request_headers: Vec<HeaderOps>,
    /// Changes to the answer, in the same order.
    pub response_headers: Vec<HeaderOps>,
    /// The copies of this request to send besides it: each mirror whose share drew this request, with
    /// its endpoint picked, or why the copy is dropped (no such Service or subset, no ready endpoint).
    pub mirrors: Vec<Result<Upstream, Refusal>>,
}

/// Why a request gets no upstream. Each is answered locally by the proxy, as Envoy would.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The host names no Service and no VirtualService (Envoy: no virtual host, `NR`).
    #[error("no Service or VirtualService for host {host:?}: send `Host: <service>.<namespace>`")]
    UnknownHost { host: String },
    /// The host's Service has no such port.
    #[error("Service {service} has no port {port}")]
    UnknownPort { service: String, port: u16 },
    /// A VirtualService covers the host but none of its `http` routes matches (Envoy: 404 `NR`).
    #[error("no route of VirtualService {virtual_service} matches the request")]
    NoRoute { virtual_service: String },
    /// The matched route has no destination (redirects, direct responses and delegation are not simulated).
    #[error("route of VirtualService {virtual_service} has no destination (not simulated by kubesim)")]
    NoDestination { virtual_service: String },
    /// A destination host that is no Service (Envoy: the cluster does not exist, `NC`).
    #[error("no healthy upstream")]
    UnknownService { host: String },
    /// A subset no DestinationRule defines, as far as this proxy knows (Envoy: the cluster does not exist, `NC`).
    #[error("no healthy upstream")]
    UnknownSubset { service: Id, subset: String },
    /// No ready endpoint (in the subset) (Envoy: `UH`).
    #[error("no healthy upstream")]
    NoHealthyUpstream { service: Id, subset: Option<String> },
    /// HTTPRoutes are attached to the Service or host, but no rule of them matches (404, `NR`).
    #[error("no rule of the HTTPRoutes attached to {target} matches the request")]
    NoHttpRouteRule { target: String },
    /// The chosen backendRef is invalid (no such Service or port, not a Service), the rule has none,
    /// or all of its weights are 0: the Gateway API prescribes 500 (Envoy: no cluster, `NC`).
    #[error("HTTPRoute {http_route}: {reason}")]
    InvalidBackend { http_route: String, reason: String },
}

impl Refusal {
    /// The HTTP status Envoy answers with.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::UnknownHost { .. }
            | Refusal::UnknownPort { .. }
            | Refusal::NoRoute { .. }
            | Refusal::NoDestination { .. }
            | Refusal::NoHttpRouteRule { .. } => 404,
            Refusal::InvalidBackend { .. } => 500,
            Refusal::UnknownService { .. } | Refusal::UnknownSubset { .. } | Refusal::NoHealthyUpstream { .. } => 503,
        }
    }

    /// Envoy's response flag, as in access logs and the `response_flags` metric label.
    pub fn flags(&self) -> &'static str {
        match self {
            Refusal::UnknownHost { .. }
            | Refusal::UnknownPort { .. }
            | Refusal::NoRoute { .. }
            | Refusal::NoDestination { .. }
            | Refusal::NoHttpRouteRule { .. } => "NR",
            Refusal::UnknownService { .. } | Refusal::UnknownSubset { .. } | Refusal::InvalidBackend { .. } => "NC",
            Refusal::NoHealthyUpstream { .. } => "UH",
        }
    }

    /// The destination Service, when the refusal is about a known one.
    pub fn service(&self) -> Option<&Id> {
        match self {
            Refusal::UnknownSubset { service, .. } | Refusal::NoHealthyUpstream { service, .. } => Some(service),
            Refusal::UnknownHost { .. }
            | Refusal::UnknownPort { .. }
            | Refusal::NoRoute { .. }
            | Refusal::NoDestination { .. }
            | Refusal::UnknownService { .. }
            | Refusal::NoHttpRouteRule { .. }
            | Refusal::InvalidBackend { .. } => None,
        }
    }
}

/// Splits `host[:port]` (IPv6 literals in brackets keep their colons).
pub fn split_authority(authority: &str) -> (&str, Option<u16>) {
    if let Some((host, port)) = authority.rsplit_once(':')
        && !host.is_empty()
        && (!host.contains(':') || host.ends_with(']'))
        && let Ok(port) = port.parse()
    {
        return (host, Some(port));
    }
    (authority, None)
}

/// Decides where `request` goes, as the proxy holding `snapshot` would; `rng` picks weighted destinations
/// and endpoints.
///
/// # Errors
///
/// [`Refusal`]: what the proxy answers instead of forwarding.
pub fn route(snapshot: &Snapshot, request: &Request<'_>, rng: &mut Rng) -> Result<Upstream, Refusal> {
    let (raw_host, port) = split_authority(request.authority);
    let host = normalize_host(raw_host, "");
    let service = service_of(&host).filter(|id| snapshot.service(id).is_some());
    let vs = virtual_service_for(snapshot, &host, service.as_ref());
    let Some(vs) = vs else {
        // A VirtualService for the host takes precedence over HTTPRoutes (as when Istio's own API and the
        // Gateway API both configure a host); without one, the HTTPRoutes attached to it decide.
        if let Some(decision) = by_http_route(snapshot, request, raw_host, port, service.as_ref(), rng) {
            return decision;
        }
        let Some(service) = service else {
            return Err(Refusal::UnknownHost {
                host: raw_host.to_owned(),
            });
        };
        // No VirtualService: the plain host, every ready endpoint of the Service.
        let plain = WeightedDestination {
            host: host.clone(),
            port,
            ..WeightedDestination::default()
        };
        return destination(snapshot, &plain, service, None, None, rng);
    };
    let vs_name = format!("{}/{}", vs.namespace, vs.name);
    let Some(http) = vs.http.iter().find(|r| route_matches(r, request, port)) else {
        return Err(Refusal::NoRoute {
            virtual_service: vs_name,
        });
    };
    let Some(chosen) = pick_weighted(&http.route, rng) else {
        return Err(Refusal::NoDestination {
            virtual_service: vs_name,
        });
    };
    let Some(target) = service_of(&chosen.host).filter(|id| snapshot.service(id).is_some()) else {
        return Err(Refusal::UnknownService {
            host: chosen.host.clone(),
        });
    };
    // The request's port carries over only to its own host; another destination needs `port` or one port.
    let mut chosen = chosen.clone();
    if chosen.port.is_none() && chosen.host == host {
        chosen.port = port;
    }
    let mut upstream = destination(snapshot, &chosen, target, Some(vs_name.clone()), http.timeout, rng)?;
    upstream.request_headers = headers::levels([&chosen.headers.request, &http.headers.request]);
    upstream.response_headers = headers::levels([&chosen.headers.response, &http.headers.response]);
    for m in &http.mirrors {
        if headers::mirrored(m.percent, rng) {
            let copy = mirror_to(snapshot, m, &host, port, &vs_name, http.timeout, rng);
            upstream.mirrors.push(copy);
        }
    }
    Ok(upstream)
}

/// Where a VirtualService's mirrored copy goes: its destination as a route's would be resolved.
fn mirror_to(
    snapshot: &Snapshot,
    mirror: &Mirror,
    host: &str,
    port: Option<u16>,
    vs_name: &str,
    timeout: Option<Duration>,
    rng: &mut Rng,
) -> Result<Upstream, Refusal> {
    let mut dest = mirror.destination.clone();
    let Some(target) = service_of(&dest.host).filter(|id| snapshot.service(id).is_some()) else {
        return Err(Refusal::UnknownService { host: dest.host });
    };
    if dest.port.is_none() && dest.host == host {
        dest.port = port;
    }
    destination(snapshot, &dest, target, Some(vs_name.to_owned()), timeout, rng)
}

/// Routes by the HTTPRoutes attached to the request's Service (GAMMA: a `parentRef` to the Service, in
/// its namespace, on its port if one is named) or, for a host that names no Service, to an existing
/// Gateway with `hostnames` covering it (the most specific hostname first). `None`: no HTTPRoute applies.
fn by_http_route(
    snapshot: &Snapshot,
    request: &Request<'_>,
    raw_host: &str,
    port: Option<u16>,
    service: Option<&Id>,
    rng: &mut Rng,
) -> Option<Result<Upstream, Refusal>> {
    if snapshot.http_routes.is_empty() {
        return None;
    }
    let routes = snapshot.http_routes.iter().enumerate();
    let (candidates, target): (Vec<(usize, &gateway::Route)>, String) = match service {
        Some(id) => {
            let service = snapshot.service(id)?;
            // Nothing serves routes attached to it: the plain Service answers.
            if service.unserved {
                return None;
            }
            // No such port: the plain Service answers that.
            let service_port = service_port(service, port)?.port;
            let attached = routes
                .filter(|(_, r)| r.attaches_to_service(id, service_port))
                .collect();
            (attached, format!("Service {}/{}", id.0, id.1))
        }
        None => {
            let host = raw_host.trim_end_matches('.').to_ascii_lowercase();
            let covering: Vec<_> = routes
                .filter(|(_, r)| r.attaches_to_gateway(&snapshot.gateways))
                .filter_map(|(i, r)| Some((i, r, r.hostname_specificity(&host)?)))
                .collect();
            let best = covering.iter().map(|(_, _, s)| *s).max()?;
            let attached = covering
                .into_iter()
                .filter(|(_, _, s)| *s == best)
                .map(|(i, r, _)| (i, r))
                .collect();
            (attached, format!("host {host}"))
        }
    };
    if candidates.is_empty() {
        return None;
    }
    let (path, query) = request
        .path_and_query
        .split_once('?')
        .unwrap_or((request.path_and_query, ""));
    let headers = request.headers;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some((route, rule)) = gateway::decide(candidates, request.method, path, query, header) else {
        return Some(Err(Refusal::NoHttpRouteRule { target }));
    };
    Some(to_backend(snapshot, route, rule, rng))
}

/// Picks one of the rule's backendRefs by weight and an endpoint of its Service; rolls the rule's and
/// the backendRef's mirrors.
fn to_backend(
    snapshot: &Snapshot,
    route: &gateway::Route,
    rule: &gateway::Rule,
    rng: &mut Rng,
) -> Result<Upstream, Refusal> {
    let invalid = |reason: String| Refusal::InvalidBackend {
        http_route: route.key(),
        reason,
    };
    let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    if rule.backends.is_empty() {
        return Err(invalid("the matching rule has no backendRefs".into()));
    }
    if total == 0 {
        return Err(invalid("every backendRef of the matching rule has weight 0".into()));
    }
    let mut at = rng.below(total);
    let backend = rule
        .backends
        .iter()
        .find(|b| {
            let w = u64::from(b.weight);
            if at < w {
                return true;
            }
            at -= w;
            false
        })
        .ok_or_else(|| invalid("no backendRef picked".into()))?;
    let mut upstream = to_service(snapshot, route, backend, "backendRef", rule.timeout, rng)?;
    let (own, shared) = (&backend.filters, &rule.filters);
    upstream.request_headers = headers::levels([&own.headers.request, &shared.headers.request]);
    upstream.response_headers = headers::levels([&own.headers.response, &shared.headers.response]);
    for m in shared.mirrors.iter().chain(&own.mirrors) {
        if headers::mirrored(m.percent, rng) {
            let copy = to_service(
                snapshot,
                route,
                &m.backend,
                "RequestMirror backendRef",
                rule.timeout,
                rng,
            );
            upstream.mirrors.push(copy);
        }
    }
    Ok(upstream)
}

/// An endpoint of the Service a backendRef names (`what` names the reference in refusals).
fn to_service(
    snapshot: &Snapshot,
    route: &gateway::Route,
    backend: &gateway::Backend,
    what: &str,
    timeout: Option<Duration>,
    rng: &mut Rng,
) -> Result<Upstream, Refusal> {
    let invalid = |reason: String| Refusal::InvalidBackend {
        http_route: route.key(),
        reason,
    };
    if let RefKind::Other(_) = backend.kind {
        return Err(invalid(format!("{what} {} is not a Service", backend.describe())));
    }
    let Some(service) = snapshot.service(&backend.id) else {
        return Err(invalid(format!("{what} {} does not exist", backend.describe())));
    };
    if let Some(p) = backend.port
        && !service.ports.iter().any(|sp| sp.port == p)
    {
        return Err(invalid(format!("{what} {} has no port {p}", backend.describe())));
    }
    let dest = WeightedDestination {
        host: backend.host(),
        port: backend.port,
        ..WeightedDestination::default()
    };
    let mut upstream = destination(snapshot, &dest, backend.id.clone(), None, timeout, rng)?;
    upstream.http_route = Some(route.key());
    Ok(upstream)
}

/// The VirtualService for a host: one applying to sidecars whose hosts cover it, preferring the Service's
/// namespace, then precedence order.
fn virtual_service_for<'a>(snapshot: &'a Snapshot, host: &str, service: Option<&Id>) -> Option<&'a VirtualService> {
    let mut candidates = snapshot
        .virtual_services
        .iter()
        .filter(|vs| vs.applies_to_mesh && vs.hosts.iter().any(|h| host_matches(h, host)));
    let first = candidates.clone().next();
    match service {
        Some((ns, _)) => candidates.find(|vs| &vs.namespace == ns).or(first),
        None => first,
    }
}

/// The DestinationRule for a Service host: the Service's namespace first, then precedence order.
fn destination_rule_for<'a>(snapshot: &'a Snapshot, host: &str, namespace: &str) -> Option<&'a DestinationRule> {
    let mut candidates = snapshot
        .destination_rules
        .iter()
        .filter(|dr| host_matches(&dr.host, host));
    let first = candidates.clone().next();
    candidates.find(|dr| dr.namespace == namespace).or(first)
}

fn destination(
    snapshot: &Snapshot,
    dest: &WeightedDestination,
    service_id: Id,
    virtual_service: Option<String>,
    timeout: Option<Duration>,
    rng: &mut Rng,
) -> Result<Upstream, Refusal> {
    let Some(service) = snapshot.service(&service_id) else {
        return Err(Refusal::UnknownService {
            host: dest.host.clone(),
        });
    };
    let subset_labels = match &dest.subset {
        None => None,
        Some(subset) => {
            let labels = destination_rule_for(snapshot, &dest.host, &service_id.0)
                .and_then(|dr| dr.subsets.get(subset))
                .ok_or_else(|| Refusal::UnknownSubset {
                    service: service_id.clone(),
                    subset: subset.clone(),
                })?;
            Some(labels)
        }
    };
    let service_port = service_port(service, dest.port).ok_or_else(|| Refusal::UnknownPort {
        service: format!("{}/{}", service_id.0, service_id.1),
        port: dest.port.unwrap_or_default(),
    })?;
    let pod_port = service_port.pod_port();
    let candidates: Vec<_> = service
        .endpoints
        .iter()
        .filter(|e| e.ready)
        .filter_map(|e| {
            let pod = snapshot.pod(&service_id.0, &e.pod);
            match (subset_labels, pod) {
                (None, _) => Some((e, pod)),
                (Some(labels), Some(p)) if labels.iter().all(|(k, v)| p.labels.get(k) == Some(v)) => Some((e, pod)),
                (Some(_), _) => None,
            }
        })
        .collect();
    // Random choice (Envoy's default is round robin; over many requests both spread evenly).
    let index = usize::try_from(rng.below(candidates.len() as u64)).unwrap_or_default();
    let Some(&(endpoint, pod)) = candidates.get(index) else {
        return Err(Refusal::NoHealthyUpstream {
            service: service_id,
            subset: dest.subset.clone(),
        });
    };
    let addr = pod
        .and_then(|p| p.listeners.get(&pod_port).copied())
        .unwrap_or(SocketAddr::new(endpoint.ip, pod_port));
    Ok(Upstream {
        service_host: dest.host.clone(),
        subset: dest.subset.clone(),
        pod: endpoint.pod.clone(),
        workload: pod.map_or_else(|| "unknown".to_owned(), |p| p.workload.clone()),
        version: pod.map_or("unknown", |p| p.version()).to_owned(),
        app: pod.map_or("unknown", |p| p.app()).to_owned(),
        addr,
        timeout,
        virtual_service,
        http_route: None,
        service: service_id,
        request_headers: Vec::new(),
        response_headers: Vec::new(),
        mirrors: Vec::new(),
    })
}

/// The Service port a destination names, or the only / `http` / port-80 / first one.
fn service_port(service: &Service, port: Option<u16>) -> Option<&ServicePort> {
    match port {
        Some(p) => service.ports.iter().find(|sp| sp.port == p),
        None => service
            .ports
            .iter()
            .find(|sp| service.ports.len() == 1 || sp.name == "http" || sp.port == 80)
            .or_else(|| service.ports.first()),
    }
}

/// Picks a destination by weight. Absent weights everywhere: an equal split (a single destination gets
/// everything); otherwise proportional to the weights (Envoy normalises by their sum), zero never picked.
pub fn pick_weighted<'a>(route: &'a [WeightedDestination], rng: &mut Rng) -> Option<&'a WeightedDestination> {
    pick_weighted_at(route, |total| rng.below(total))
}

/// [`pick_weighted`] with the random draw in `0..total` given by `draw`.
pub fn pick_weighted_at(route: &[WeightedDestination], draw: impl FnOnce(u64) -> u64) -> Option<&WeightedDestination> {
    if route.iter().all(|d| d.weight.unwrap_or(0) == 0) {
        let n = u64::try_from(route.len()).ok()?;
        return route.get(usize::try_from(draw(n)).ok()?);
    }
    let total: u64 = route.iter().map(|d| u64::from(d.weight.unwrap_or(0))).sum();
    let mut at = draw(total);
    for d in route {
        let w = u64::from(d.weight.unwrap_or(0));
        if at < w {
            return Some(d);
        }
        at -= w;
    }
    None
}

fn route_matches(route: &HttpRoute, request: &Request<'_>, port: Option<u16>) -> bool {
    route.matches.is_empty() || route.matches.iter().any(|m| request_matches(m, request, port))
}

/// Whether every condition of one `match` entry holds.
pub fn request_matches(m: &MatchRequest, request: &Request<'_>, port: Option<u16>) -> bool {
    if m.unsatisfiable.is_some() {
        return false;
    }
    let (path, query) = request
        .path_and_query
        .split_once('?')
        .unwrap_or((request.path_and_query, ""));
    let header = |name: &str| request.headers.get(name).and_then(|v| v.to_str().ok());
    let uri_ok = m.uri.as_ref().is_none_or(|u| {
        if m.ignore_uri_case {
            u.matches_ignoring_case(path)
        } else {
            u.matches(path)
        }
    });
    let query_value = |name: &str| {
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then_some(v)
        })
    };
    uri_ok
        && m.method.as_ref().is_none_or(|s| s.matches(request.method))
        && m.authority.as_ref().is_none_or(|s| s.matches(request.authority))
        && m.scheme.as_ref().is_none_or(|s| s.matches("http"))
        && m.port.is_none_or(|p| Some(p) == port.or(Some(80)))
        && m.headers
            .iter()
            .all(|(name, s)| header(name).is_some_and(|v| s.matches(v)))
        && m.without_headers
            .iter()
            .all(|(name, s)| !header(name).is_some_and(|v| s.matches(v)))
        && m.query_params
            .iter()
            .all(|(name, s)| query_value(name).is_some_and(|v| s.matches(v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::snapshot::{Objects, Pod, build};
    use serde_json::{Value, json};
    use std::collections::BTreeMap;

    fn service() -> Value {
        json!({"metadata": {"name": "podinfo", "namespace": "test"},
            "spec": {"selector": {"app": "podinfo"}, "ports": [{"name": "http", "port": 80, "targetPort": 9898}]}})
    }

    fn slice(endpoints: &[(&str, &str, bool)]) -> Value {
        json!({"metadata": {"name": "podinfo-slice", "namespace": "test", "labels": {"kubernetes.io/service-name": "podinfo"}},
            "endpoints": endpoints.iter().map(|(pod, ip, ready)| json!({"addresses": [ip],
                "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": pod}})).collect::<Vec<_>>(),
            "ports": [{"name": "http", "port": 9898}]})
    }

    fn pod(name: &str, version: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "test", "labels": {"app": "podinfo", "version": version}}})
    }

    fn dr(subsets: &[(&str, &str)]) -> Value {
        json!({"metadata": {"name": "podinfo", "namespace": "test"}, "spec": {"host": "podinfo",
            "subsets": subsets.iter().map(|(n, v)| json!({"name": n, "labels": {"version": v}})).collect::<Vec<_>>()}})
    }

    fn vs(http: Value) -> Value {
        json!({"metadata": {"name": "podinfo", "namespace": "test", "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"hosts": ["podinfo"], "http": http}})
    }

    fn weights(v1: u32, v2: u32) -> Value {
        json!([{"route": [
            {"destination": {"host": "podinfo", "subset": "v1"}, "weight": v1},
            {"destination": {"host": "podinfo.test.svc.cluster.local", "subset": "v2"}, "weight": v2}]}])
    }

    /// Two v1 pods and one v2 pod, all ready, plus an unready v2 pod.
    fn cluster(vss: &[Value], drs: &[Value]) -> Snapshot {
        let (svc, sl) = (
            service(),
            slice(&[
                ("a-1", "127.1.0.1", true),
                ("a-2", "127.1.0.2", true),
                ("b-1", "127.1.0.3", true),
                ("b-2", "127.1.0.4", false),
            ]),
        );
        let pods = [pod("a-1", "v1"), pod("a-2", "v1"), pod("b-1", "v2"), pod("b-2", "v2")];
        build(Objects {
            services: vec![&svc],
            slices: vec![&sl],
            pods: pods
                .iter()
                .map(|p| {
                    let workload = if p["metadata"]["labels"]["version"] == "v1" {
                        "podinfo"
                    } else {
                        "podinfo-v2"
                    };
                    (p, workload.to_owned(), BTreeMap::new())
                })
                .collect(),
            virtual_services: vss.iter().collect(),
            destination_rules: drs.iter().collect(),
            ..Objects::default()
        })
    }

    fn send(
        s: &Snapshot,
        host: &str,
        path: &str,
        headers: &[(&'static str, &str)],
        rng: &mut Rng,
    ) -> Result<Upstream, Refusal> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, v.parse().unwrap());
        }
        route(
            s,
            &Request {
                authority: host,
                method: "GET",
                path_and_query: path,
                headers: &map,
            },
            rng,
        )
    }

    /// How many of `n` requests reach each pod.
    fn spread(s: &Snapshot, host: &str, n: usize) -> BTreeMap<String, usize> {
        let mut rng = Rng::new(3);
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let up = send(s, host, "/", &[], &mut rng).unwrap();
            *counts.entry(up.pod).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn without_a_virtual_service_the_plain_host_reaches_every_ready_endpoint() {
        let s = cluster(&[], &[]);
        for host in [
            "podinfo.test",
            "podinfo.test:80",
            "podinfo.test.svc",
            "podinfo.test.svc.cluster.local",
        ] {
            let counts = spread(&s, host, 300);
            assert_eq!(counts.keys().collect::<Vec<_>>(), ["a-1", "a-2", "b-1"], "{host}");
            assert!(counts.values().all(|&n| n > 60), "{counts:?}");
        }
        let up = send(&s, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap();
        assert_eq!(up.addr.port(), 9898, "the slice's port for the Service port");
        assert_eq!(up.service, ("test".to_owned(), "podinfo".to_owned()));
        assert_eq!(up.virtual_service, None);
    }

    #[test]
    fn an_unknown_host_or_port_is_not_found() {
        let s = cluster(&[], &[]);
        let err = send(&s, "nothing.test", "/", &[], &mut Rng::new(1)).unwrap_err();
        assert_eq!((err.status(), err.flags()), (404, "NR"));
        assert!(err.to_string().contains("nothing.test"));
        assert_eq!(
            send(&s, "podinfo", "/", &[], &mut Rng::new(1)).unwrap_err().status(),
            404
        );
        let err = send(&s, "podinfo.test:8080", "/", &[], &mut Rng::new(1)).unwrap_err();
        assert!(matches!(err, Refusal::UnknownPort { port: 8080, .. }), "{err:?}");
    }

    #[test]
    fn weights_split_traffic_between_subsets() {
        let d = dr(&[("v1", "v1"), ("v2", "v2")]);
        let all_v1 = cluster(&[vs(weights(100, 0))], std::slice::from_ref(&d));
        assert_eq!(
            spread(&all_v1, "podinfo.test", 200).keys().collect::<Vec<_>>(),
            ["a-1", "a-2"]
        );
        let all_v2 = cluster(&[vs(weights(0, 100))], std::slice::from_ref(&d));
        assert_eq!(spread(&all_v2, "podinfo.test", 200).keys().collect::<Vec<_>>(), ["b-1"]);
        let split = cluster(&[vs(weights(75, 25))], std::slice::from_ref(&d));
        let counts = spread(&split, "podinfo.test", 4000);
        let v2 = counts.get("b-1").copied().unwrap_or_default();
        assert!((850..1150).contains(&v2), "{counts:?}");
        let up = send(&split, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap();
        assert_eq!(up.virtual_service.as_deref(), Some("test/podinfo"));
    }

    #[test]
    fn weighted_choice_is_proportional_and_absent_weights_split_equally() {
        let d = |w: Option<u32>| WeightedDestination {
            host: "h".into(),
            subset: Some(format!("{w:?}")),
            weight: w,
            ..WeightedDestination::default()
        };
        let route = [d(Some(10)), d(Some(0)), d(Some(30))];
        assert_eq!(
            pick_weighted_at(&route, |t| {
                assert_eq!(t, 40);
                9
            })
            .unwrap()
            .weight,
            Some(10)
        );
        assert_eq!(pick_weighted_at(&route, |_| 10).unwrap().weight, Some(30));
        assert_eq!(pick_weighted_at(&route, |_| 39).unwrap().weight, Some(30));
        let equal = [d(None), d(None)];
        assert_eq!(
            pick_weighted_at(&equal, |t| {
                assert_eq!(t, 2);
                1
            })
            .map(|x| x as *const _),
            Some(&equal[1] as *const _)
        );
        assert!(pick_weighted_at(&[], |_| 0).is_none());
    }

    #[test]
    fn a_subset_no_destination_rule_defines_gets_no_healthy_upstream() {
        let s = cluster(&[vs(weights(0, 100))], &[dr(&[("v1", "v1")])]);
        let err = send(&s, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap_err();
        assert_eq!(
            (err.status(), err.flags(), err.to_string().as_str()),
            (503, "NC", "no healthy upstream")
        );
        let none = cluster(&[vs(weights(0, 100))], &[]);
        assert!(matches!(
            send(&none, "podinfo.test", "/", &[], &mut Rng::new(1)),
            Err(Refusal::UnknownSubset { .. })
        ));
    }

    #[test]
    fn subsets_select_ready_endpoints_by_pod_labels() {
        let s = cluster(&[vs(weights(0, 100))], &[dr(&[("v1", "v1"), ("v2", "v2")])]);
        // b-2 is a v2 pod too, but not ready.
        assert_eq!(spread(&s, "podinfo.test", 100).keys().collect::<Vec<_>>(), ["b-1"]);
        let only_unready = cluster(&[vs(weights(0, 100))], &[dr(&[("v1", "v1"), ("v2", "v3")])]);
        let err = send(&only_unready, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap_err();
        assert_eq!((err.status(), err.flags()), (503, "UH"));
        let up = send(&s, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap();
        assert_eq!(
            (up.workload.as_str(), up.version.as_str(), up.subset.as_deref()),
            ("podinfo-v2", "v2", Some("v2"))
        );
    }

    #[test]
    fn the_first_matching_route_decides() {
        let http = json!([
            {"match": [{"headers": {"x-canary": {"exact": "yes"}}}],
             "route": [{"destination": {"host": "podinfo", "subset": "v2"}}]},
            {"match": [{"uri": {"prefix": "/api"}, "method": {"exact": "GET"}}, {"uri": {"regex": "/v2/.*"}}],
             "route": [{"destination": {"host": "podinfo", "subset": "v2"}}]},
            {"match": [{"uri": {"exact": "/only-v1"}}],
             "route": [{"destination": {"host": "podinfo", "subset": "v1"}}]},
        ]);
        let s = cluster(&[vs(http)], &[dr(&[("v1", "v1"), ("v2", "v2")])]);
        let mut rng = Rng::new(9);
        let subset = |path: &str, headers: &[(&'static str, &str)], rng: &mut Rng| {
            send(&s, "podinfo.test", path, headers, rng).map(|u| u.subset.unwrap_or_default())
        };
        assert_eq!(subset("/", &[("x-canary", "yes")], &mut rng).unwrap(), "v2");
        assert_eq!(subset("/api/info?x=1", &[], &mut rng).unwrap(), "v2");
        assert_eq!(subset("/v2/anything", &[], &mut rng).unwrap(), "v2");
        assert_eq!(subset("/only-v1", &[("x-canary", "no")], &mut rng).unwrap(), "v1");
        let err = send(&s, "podinfo.test", "/other", &[], &mut rng).unwrap_err();
        assert_eq!((err.status(), err.flags()), (404, "NR"));
    }

    #[test]
    fn match_conditions_follow_istio() {
        let m = |v: Value| {
            crate::mesh::snapshot::virtual_service(&vs(json!([{"match": [v], "route": []}]))).http[0].matches[0].clone()
        };
        let headers = HeaderMap::new();
        let req = |path: &'static str, method: &'static str| Request {
            authority: "podinfo.test",
            method,
            path_and_query: path,
            headers: &headers,
        };
        assert!(request_matches(
            &m(json!({"uri": {"prefix": "/API"}, "ignoreUriCase": true})),
            &req("/api/x", "GET"),
            None
        ));
        assert!(!request_matches(
            &m(json!({"uri": {"exact": "/api"}})),
            &req("/api/x", "GET"),
            None
        ));
        assert!(request_matches(
            &m(json!({"uri": {"exact": "/api"}})),
            &req("/api?q=1", "GET"),
            None
        ));
        assert!(!request_matches(
            &m(json!({"method": {"exact": "POST"}})),
            &req("/", "GET"),
            None
        ));
        assert!(request_matches(
            &m(json!({"queryParams": {"q": {"exact": "1"}}})),
            &req("/a?p=2&q=1", "GET"),
            None
        ));
        assert!(request_matches(
            &m(json!({"withoutHeaders": {"x-canary": {}}})),
            &req("/", "GET"),
            None
        ));
        assert!(!request_matches(
            &m(json!({"headers": {"X-Canary": {}}})),
            &req("/", "GET"),
            None
        ));
        assert!(
            !request_matches(&m(json!({"uri": {"regex": "/a"}})), &req("/ab", "GET"), None),
            "regexes match whole paths"
        );
    }

    #[test]
    fn a_virtual_service_for_gateways_only_does_not_apply_to_sidecars() {
        let mut gw = vs(weights(0, 100));
        gw["spec"]["gateways"] = json!(["istio-system/ingress"]);
        let s = cluster(&[gw], &[dr(&[("v1", "v1"), ("v2", "v2")])]);
        assert_eq!(spread(&s, "podinfo.test", 300).len(), 3, "the plain host");
    }

    #[test]
    fn a_virtual_service_host_that_is_no_service_routes_to_its_destinations() {
        let mut external = vs(json!([{"route": [{"destination": {"host": "podinfo.test.svc.cluster.local"}}]}]));
        external["spec"]["hosts"] = json!(["podinfo.example.com"]);
        let s = cluster(&[external], &[]);
        let up = send(&s, "podinfo.example.com", "/", &[], &mut Rng::new(1)).unwrap();
        assert_eq!(up.service.1, "podinfo");
        let mut missing = vs(json!([{"route": [{"destination": {"host": "nothing"}}]}]));
        missing["metadata"]["name"] = json!("other");
        let s = cluster(&[missing], &[]);
        let err = send(&s, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap_err();
        assert_eq!((err.status(), err.flags()), (503, "NC"));
    }

    #[test]
    fn listeners_that_moved_are_used() {
        let mut s = cluster(&[], &[]);
        let moved: SocketAddr = "127.1.0.1:40000".parse().unwrap();
        let pods: Vec<(Id, Pod)> = s
            .pods()
            .map(|(ns, name, p)| ((ns.to_owned(), name.to_owned()), p.clone()))
            .collect();
        for (id, mut p) in pods {
            p.listeners.insert(9898, moved);
            s.set_pod(&id, Some(p));
        }
        assert_eq!(
            send(&s, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap().addr,
            moved
        );
    }

    // HTTPRoutes: two per-version Services beside `podinfo`, selecting the same pods by version.

    fn version_service(name: &str, endpoints: &[(&str, &str, bool)]) -> (Value, Value) {
        let mut svc = service();
        svc["metadata"]["name"] = json!(name);
        let mut sl = slice(endpoints);
        sl["metadata"]["name"] = json!(format!("{name}-slice"));
        sl["metadata"]["labels"]["kubernetes.io/service-name"] = json!(name);
        (svc, sl)
    }

    /// `cluster()` plus Services `podinfo-a` (a-1, a-2) and `podinfo-b` (b-1; b-2 unready), HTTPRoutes,
    /// Gateways and VirtualServices.
    fn routed(routes: &[Value], gateways: &[Value], vss: &[Value], drs: &[Value]) -> Snapshot {
        let base = service();
        let all = slice(&[
            ("a-1", "127.1.0.1", true),
            ("a-2", "127.1.0.2", true),
            ("b-1", "127.1.0.3", true),
            ("b-2", "127.1.0.4", false),
        ]);
        let (a, a_slice) = version_service("podinfo-a", &[("a-1", "127.1.0.1", true), ("a-2", "127.1.0.2", true)]);
        let (b, b_slice) = version_service("podinfo-b", &[("b-1", "127.1.0.3", true), ("b-2", "127.1.0.4", false)]);
        let pods = [pod("a-1", "v1"), pod("a-2", "v1"), pod("b-1", "v2"), pod("b-2", "v2")];
        build(Objects {
            services: vec![&base, &a, &b],
            slices: vec![&all, &a_slice, &b_slice],
            pods: pods
                .iter()
                .map(|p| {
                    let v = p["metadata"]["labels"]["version"].as_str().unwrap();
                    (p, format!("podinfo-{v}"), BTreeMap::new())
                })
                .collect(),
            virtual_services: vss.iter().collect(),
            destination_rules: drs.iter().collect(),
            http_routes: routes.iter().collect(),
            gateways: gateways.iter().collect(),
        })
    }

    fn backend(name: &str, weight: u32) -> Value {
        json!({"name": name, "port": 80, "weight": weight})
    }

    /// An HTTPRoute `name` attached to Service podinfo with `rules`.
    fn http_route(name: &str, created: &str, rules: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "test", "generation": 1, "creationTimestamp": created},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "podinfo", "port": 80}], "rules": rules}})
    }

    fn split(a: u32, b: u32) -> Value {
        json!([{"backendRefs": [backend("podinfo-a", a), backend("podinfo-b", b)]}])
    }

    const T0: &str = "2024-01-01T00:00:00Z";

    #[test]
    fn an_http_route_on_a_service_sends_each_request_to_a_backend_service_by_weight() {
        let all_a = routed(&[http_route("podinfo", T0, split(100, 0))], &[], &[], &[]);
        for host in ["podinfo.test", "podinfo.test.svc.cluster.local:80"] {
            assert_eq!(
                spread(&all_a, host, 200).keys().collect::<Vec<_>>(),
                ["a-1", "a-2"],
                "{host}"
            );
        }
        let all_b = routed(&[http_route("podinfo", T0, split(0, 100))], &[], &[], &[]);
        assert_eq!(spread(&all_b, "podinfo.test", 200).keys().collect::<Vec<_>>(), ["b-1"]);
        let up = send(&all_b, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap();
        assert_eq!(
            up.service,
            ("test".to_owned(), "podinfo-b".to_owned()),
            "the backend Service"
        );
        assert_eq!(up.service_host, "podinfo-b.test.svc.cluster.local");
        assert_eq!((up.workload.as_str(), up.version.as_str()), ("podinfo-v2", "v2"));
        assert_eq!(up.http_route.as_deref(), Some("test/podinfo"));
        assert_eq!(up.addr.port(), 9898);

        let quarter = routed(&[http_route("podinfo", T0, split(3, 1))], &[], &[], &[]);
        let counts = spread(&quarter, "podinfo.test", 4000);
        let b = counts.get("b-1").copied().unwrap_or_default();
        assert!((850..1150).contains(&b), "{counts:?}");
        let unweighted = routed(
            &[http_route(
                "podinfo",
                T0,
                json!([{"backendRefs": [{"name": "podinfo-a"}, {"name": "podinfo-b"}]}]),
            )],
            &[],
            &[],
            &[],
        );
        let counts = spread(&unweighted, "podinfo.test", 3000);
        assert!(
            counts["b-1"] > 1300 && counts["b-1"] < 1700,
            "weight 1 each: {counts:?}"
        );
    }

    #[test]
    fn routes_on_a_service_nothing_serves_are_ignored_and_get_no_status() {
        let route = http_route("podinfo", T0, split(100, 0));
        let mut snapshot = routed(std::slice::from_ref(&route), &[], &[], &[]);
        let id = ("test".to_owned(), "podinfo".to_owned());
        let mut unserved = snapshot.service(&id).unwrap().clone();
        unserved.unserved = true;
        snapshot.set_service(&id, Some(unserved));
        // Straight to the plain Service's ready endpoints, the candidate's among them.
        assert_eq!(
            spread(&snapshot, "podinfo.test", 300).keys().collect::<Vec<_>>(),
            ["a-1", "a-2", "b-1"]
        );
        assert!(gateway::parent_statuses(&gateway::route(&route), &snapshot).is_empty());
    }

    #[test]
    fn the_most_specific_match_decides_then_the_oldest_route_then_the_first_rule() {
        let to = |service: &str, matches: Value| json!({"matches": matches, "backendRefs": [backend(service, 1)]});
        let rules = json!([
            to("podinfo-a", json!([{"path": {"type": "PathPrefix", "value": "/"}}])),
            to("podinfo-b", json!([{"path": {"type": "PathPrefix", "value": "/api"}}])),
            to("podinfo-a", json!([{"path": {"type": "Exact", "value": "/api/info"}}])),
            to(
                "podinfo-a",
                json!([{"path": {"type": "PathPrefix", "value": "/api"},
                "headers": [{"name": "x-canary", "value": "no"}]}])
            ),
            to(
                "podinfo-b",
                json!([{"path": {"type": "PathPrefix", "value": "/"}, "method": "POST"}])
            ),
            to(
                "podinfo-b",
                json!([{"path": {"type": "PathPrefix", "value": "/"},
                "queryParams": [{"type": "RegularExpression", "name": "v", "value": "b|two"}]}])
            ),
        ]);
        let s = routed(&[http_route("podinfo", T0, rules)], &[], &[], &[]);
        let version = |method: &str, path: &str, headers: &[(&'static str, &str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                map.insert(*k, v.parse().unwrap());
            }
            let request = Request {
                authority: "podinfo.test",
                method,
                path_and_query: path,
                headers: &map,
            };
            route(&s, &request, &mut Rng::new(5)).unwrap().version
        };
        assert_eq!(version("GET", "/", &[]), "v1");
        assert_eq!(version("GET", "/api/x", &[]), "v2", "the longer prefix");
        assert_eq!(version("GET", "/apix", &[]), "v1", "prefixes match whole path elements");
        assert_eq!(version("GET", "/api/info", &[]), "v1", "an exact path first");
        assert_eq!(version("GET", "/api/x", &[("x-canary", "no")]), "v1", "more headers");
        assert_eq!(version("POST", "/x", &[]), "v2", "a method");
        assert_eq!(version("GET", "/x?v=two", &[]), "v2", "more query parameters");
        assert_eq!(version("GET", "/x?v=three", &[]), "v1");

        // Equal matches in two routes: the older route; equally old, the first by namespace/name; then
        // the first rule.
        let older = http_route("zeta", "2023-01-01T00:00:00Z", split(1, 0));
        let newer = http_route("alpha", T0, split(0, 1));
        let s = routed(&[newer.clone(), older], &[], &[], &[]);
        let up = send(&s, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap();
        assert_eq!(up.http_route.as_deref(), Some("test/zeta"));
        let same_age = http_route("beta", T0, split(1, 0));
        let s = routed(&[same_age, newer], &[], &[], &[]);
        let up = send(&s, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap();
        assert_eq!(
            (up.http_route.as_deref(), up.version.as_str()),
            (Some("test/alpha"), "v2")
        );
        let two_rules = json!([{"backendRefs": [backend("podinfo-b", 1)]}, {"backendRefs": [backend("podinfo-a", 1)]}]);
        let s = routed(&[http_route("podinfo", T0, two_rules)], &[], &[], &[]);
        assert_eq!(
            send(&s, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap().version,
            "v2"
        );
    }

    #[test]
    fn a_request_no_rule_matches_is_not_found() {
        let rules = json!([{"matches": [{"path": {"type": "Exact", "value": "/only"}}],
            "backendRefs": [backend("podinfo-a", 1)]}]);
        let s = routed(&[http_route("podinfo", T0, rules)], &[], &[], &[]);
        assert!(send(&s, "podinfo.test", "/only?x=1", &[], &mut Rng::new(1)).is_ok());
        let err = send(&s, "podinfo.test", "/other", &[], &mut Rng::new(1)).unwrap_err();
        assert_eq!((err.status(), err.flags()), (404, "NR"));
        assert!(matches!(err, Refusal::NoHttpRouteRule { .. }), "{err:?}");
        assert!(err.to_string().contains("Service test/podinfo"), "{err}");
    }

    #[test]
    fn invalid_backends_and_zero_weights_answer_500() {
        let zero = routed(&[http_route("podinfo", T0, split(0, 0))], &[], &[], &[]);
        let err = send(&zero, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap_err();
        assert_eq!((err.status(), err.flags()), (500, "NC"));
        assert!(err.to_string().contains("weight 0"), "{err}");

        let missing = json!([{"backendRefs": [backend("podinfo-a", 1), backend("podinfo-c", 1)]}]);
        let s = routed(&[http_route("podinfo", T0, missing)], &[], &[], &[]);
        let mut rng = Rng::new(2);
        let outcomes: Vec<u16> = (0..2000)
            .map(|_| match send(&s, "podinfo.test", "/", &[], &mut rng) {
                Ok(up) => {
                    assert_eq!(up.service.1, "podinfo-a");
                    200
                }
                Err(err) => {
                    assert!(err.to_string().contains("podinfo-c does not exist"), "{err}");
                    err.status()
                }
            })
            .collect();
        let failed = outcomes.iter().filter(|&&s| s == 500).count();
        assert!(
            (850..1150).contains(&failed),
            "the missing backend's share fails: {failed}"
        );

        for rules in [
            json!([{"backendRefs": [{"name": "podinfo-a", "port": 8080}]}]),
            json!([{"backendRefs": [{"group": "example.com", "kind": "Bucket", "name": "podinfo-a"}]}]),
            json!([{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}]),
        ] {
            let s = routed(&[http_route("podinfo", T0, rules.clone())], &[], &[], &[]);
            let err = send(&s, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap_err();
            assert_eq!(err.status(), 500, "{rules}: {err}");
        }

        // A backend without ready endpoints: Envoy's 503.
        let (c, c_slice) = version_service("podinfo-c", &[("b-2", "127.1.0.4", false)]);
        let mut s = routed(&[http_route("podinfo", T0, split(0, 0))], &[], &[], &[]);
        let mut svc = crate::mesh::snapshot::service(&c);
        crate::mesh::snapshot::with_slice(&mut svc, &c_slice);
        s.set_service(&("test".into(), "podinfo-c".into()), Some(svc));
        s.set_http_routes(crate::mesh::gateway::routes(vec![&http_route(
            "podinfo",
            T0,
            json!([{"backendRefs": [backend("podinfo-c", 1)]}]),
        )]));
        let err = send(&s, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap_err();
        assert_eq!((err.status(), err.flags()), (503, "UH"));
    }

    #[test]
    fn a_virtual_service_for_the_host_wins_over_an_http_route() {
        let d = dr(&[("v1", "v1"), ("v2", "v2")]);
        let route = http_route("podinfo", T0, split(100, 0));
        let s = routed(std::slice::from_ref(&route), &[], &[vs(weights(0, 100))], &[d]);
        let up = send(&s, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap();
        assert_eq!(
            (
                up.virtual_service.as_deref(),
                up.http_route.as_deref(),
                up.version.as_str()
            ),
            (Some("test/podinfo"), None, "v2")
        );
        let s = routed(&[route], &[], &[], &[]);
        let up = send(&s, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap();
        assert_eq!((up.virtual_service, up.version.as_str()), (None, "v1"));
    }

    #[test]
    fn routes_attach_to_a_service_only_from_its_namespace_and_on_its_port() {
        let mut consumer = http_route("podinfo", T0, split(0, 1));
        consumer["metadata"]["namespace"] = json!("clients");
        consumer["spec"]["parentRefs"][0]["namespace"] = json!("test");
        consumer["spec"]["rules"][0]["backendRefs"][0]["namespace"] = json!("test");
        consumer["spec"]["rules"][0]["backendRefs"][1]["namespace"] = json!("test");
        let s = routed(&[consumer], &[], &[], &[]);
        assert_eq!(spread(&s, "podinfo.test", 300).len(), 3, "the plain Service");
        let mut other_port = http_route("podinfo", T0, split(0, 1));
        other_port["spec"]["parentRefs"][0]["port"] = json!(8080);
        let s = routed(&[other_port], &[], &[], &[]);
        assert_eq!(spread(&s, "podinfo.test", 300).len(), 3, "the plain Service");
        let mut any_port = http_route("podinfo", T0, split(0, 1));
        any_port["spec"]["parentRefs"][0]
            .as_object_mut()
            .unwrap()
            .remove("port");
        let s = routed(&[any_port], &[], &[], &[]);
        assert_eq!(spread(&s, "podinfo.test", 100).keys().collect::<Vec<_>>(), ["b-1"]);
    }

    #[test]
    fn a_host_that_is_no_service_is_routed_by_the_routes_of_an_existing_gateway() {
        let gateway =
            json!({"metadata": {"name": "web", "namespace": "edge"}, "spec": {"gatewayClassName": "kubesim"}});
        let on_gateway = |name: &str, hostnames: Value, to: &str| {
            json!({"metadata": {"name": name, "namespace": "test", "creationTimestamp": T0},
                "spec": {"parentRefs": [{"name": "web", "namespace": "edge"}], "hostnames": hostnames,
                    "rules": [{"backendRefs": [backend(to, 1)]}]}})
        };
        let routes = [
            on_gateway("exact", json!(["podinfo.example.com"]), "podinfo-a"),
            on_gateway("wildcard", json!(["*.example.com"]), "podinfo-b"),
        ];
        let s = routed(&routes, std::slice::from_ref(&gateway), &[], &[]);
        let version = |host: &str| send(&s, host, "/", &[], &mut Rng::new(1)).map(|u| u.version);
        assert_eq!(version("podinfo.example.com").unwrap(), "v1");
        assert_eq!(version("PodInfo.Example.com:8080").unwrap(), "v1");
        assert_eq!(version("other.example.com").unwrap(), "v2");
        assert_eq!(version("a.b.example.com").unwrap(), "v2");
        let err = version("example.com").unwrap_err();
        assert!(matches!(err, Refusal::UnknownHost { .. }), "{err:?}");
        // A Service's host is the Service's, whatever a Gateway's route covers.
        let everything = on_gateway("everything", json!([]), "podinfo-b");
        let s = routed(&[everything], std::slice::from_ref(&gateway), &[], &[]);
        assert_eq!(
            send(&s, "anything.example.org", "/", &[], &mut Rng::new(1))
                .unwrap()
                .version,
            "v2"
        );
        assert_eq!(spread(&s, "podinfo.test", 300).len(), 3);
        // No such Gateway: nothing attached.
        let s = routed(&routes, &[], &[], &[]);
        let err = send(&s, "podinfo.example.com", "/", &[], &mut Rng::new(1)).unwrap_err();
        assert_eq!((err.status(), err.flags()), (404, "NR"));
    }

    // Mirrors and header changes.

    const STICKY: &str = r"^(.*?;\s*)?canary=always(;.*)?$";

    fn names(up: &Upstream) -> Vec<Result<(String, String), u16>> {
        up.mirrors
            .iter()
            .map(|m| match m {
                Ok(m) => Ok((m.service.1.clone(), m.version.clone())),
                Err(e) => Err(e.status()),
            })
            .collect()
    }

    #[test]
    fn a_virtual_service_mirror_copies_the_share_it_names_to_its_destination() {
        let d = dr(&[("v1", "v1"), ("v2", "v2"), ("v3", "v3")]);
        let with = |extra: Value| {
            let mut http = weights(100, 0);
            for (k, v) in extra.as_object().unwrap() {
                http[0][k] = v.clone();
            }
            cluster(&[vs(http)], std::slice::from_ref(&d))
        };
        // `mirror` alone: every request, to the mirror's subset; the request itself is unchanged.
        let s = with(json!({"mirror": {"host": "podinfo", "subset": "v2"}}));
        let mut rng = Rng::new(4);
        for _ in 0..50 {
            let up = send(&s, "podinfo.test", "/", &[], &mut rng).unwrap();
            assert_eq!(up.version, "v1");
            assert_eq!(names(&up), [Ok(("podinfo".to_owned(), "v2".to_owned()))]);
            let copy = up.mirrors[0].as_ref().unwrap();
            assert_eq!((copy.pod.as_str(), copy.subset.as_deref()), ("b-1", Some("v2")));
            assert_eq!(copy.virtual_service.as_deref(), Some("test/podinfo"));
        }
        // Its share: `mirrorPercentage`, else the deprecated integer fields; an explicit 0: none.
        let share = |s: &Snapshot| {
            let mut rng = Rng::new(8);
            (0..4000)
                .filter(|_| !send(s, "podinfo.test", "/", &[], &mut rng).unwrap().mirrors.is_empty())
                .count()
        };
        let mirror = json!({"host": "podinfo", "subset": "v2"});
        let n = share(&with(json!({"mirror": mirror, "mirrorPercentage": {"value": 25.0}})));
        assert!((850..1150).contains(&n), "25 %: {n}");
        let n = share(&with(json!({"mirror": mirror, "mirrorPercent": 50})));
        assert!((1800..2200).contains(&n), "50 %: {n}");
        assert_eq!(
            share(&with(json!({"mirror": mirror, "mirrorPercentage": {"value": 0}}))),
            0
        );
        assert_eq!(share(&with(json!({"mirror": mirror, "mirrorPercentage": {}}))), 0);

        // `mirrors`: each entry drawn on its own; copies with nowhere to go are refused, not the request.
        let s = with(json!({"mirrors": [
            {"destination": {"host": "podinfo", "subset": "v2"}, "percentage": {"value": 50}},
            {"destination": {"host": "nothing"}},
            {"destination": {"host": "podinfo", "subset": "v3"}},
            {"destination": {"host": "podinfo", "subset": "v9"}}]}));
        let mut rng = Rng::new(6);
        let mut to_v2 = 0;
        for _ in 0..2000 {
            let up = send(&s, "podinfo.test", "/", &[], &mut rng).unwrap();
            assert_eq!(up.version, "v1");
            let outcomes = names(&up);
            let refused: Vec<_> = up.mirrors.iter().filter_map(|m| m.as_ref().err()).collect();
            assert!(matches!(refused[0], Refusal::UnknownService { .. }), "{refused:?}");
            assert!(matches!(refused[1], Refusal::NoHealthyUpstream { .. }), "{refused:?}");
            assert!(matches!(refused[2], Refusal::UnknownSubset { .. }), "{refused:?}");
            to_v2 += usize::from(outcomes.len() == 4);
        }
        assert!((850..1150).contains(&to_v2), "{to_v2}");

        // A request that is refused sends no copy (Envoy shadows only what it forwards).
        let s = cluster(
            &[vs(
                json!([{"route": [{"destination": {"host": "podinfo", "subset": "v3"}}],
                "mirror": {"host": "podinfo", "subset": "v2"}}]),
            )],
            std::slice::from_ref(&d),
        );
        let err = send(&s, "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap_err();
        assert_eq!(err.flags(), "UH");
    }

    #[test]
    fn virtual_service_header_changes_come_destination_first_then_route() {
        let d = dr(&[("v1", "v1"), ("v2", "v2")]);
        let http = json!([{"route": [
                {"destination": {"host": "podinfo", "subset": "v1"}, "weight": 50,
                 "headers": {"response": {"add": {"set-cookie": "canary=never"}}}},
                {"destination": {"host": "podinfo", "subset": "v2"}, "weight": 50,
                 "headers": {"request": {"set": {"x-to": "v2"}},
                             "response": {"add": {"set-cookie": "canary=always"}, "set": {"x-v": "dest"}}}}],
            "headers": {"request": {"add": {"x-route": "1"}, "remove": ["x-secret"]},
                        "response": {"set": {"x-v": "route"}, "remove": ["x-powered-by"]}}}]);
        let s = cluster(&[vs(http)], &[d]);
        let mut rng = Rng::new(2);
        let mut seen = BTreeMap::new();
        for _ in 0..100 {
            let up = send(&s, "podinfo.test", "/", &[], &mut rng).unwrap();
            let mut response = HeaderMap::new();
            response.insert("x-powered-by", "podinfo".parse().unwrap());
            headers::apply_all(&up.response_headers, &mut response);
            let mut request = HeaderMap::new();
            request.insert("x-secret", "s".parse().unwrap());
            headers::apply_all(&up.request_headers, &mut request);
            let get = |h: &HeaderMap, n: &str| {
                h.get_all(n)
                    .iter()
                    .map(|v| v.to_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
            };
            assert!(response.get("x-powered-by").is_none());
            assert!(request.get("x-secret").is_none());
            assert_eq!(get(&request, "x-route"), ["1"]);
            seen.insert(
                up.version.clone(),
                (
                    get(&response, "set-cookie"),
                    get(&response, "x-v"),
                    get(&request, "x-to"),
                ),
            );
        }
        assert_eq!(
            seen["v1"],
            (vec!["canary=never".to_owned()], vec!["route".to_owned()], vec![])
        );
        assert_eq!(
            seen["v2"],
            (
                vec!["canary=always".to_owned()],
                vec!["route".to_owned()],
                vec!["v2".to_owned()]
            ),
            "the route's set is applied last"
        );
        // Without changes there are no levels to apply.
        let plain = send(&cluster(&[], &[]), "podinfo.test", "/", &[], &mut Rng::new(1)).unwrap();
        assert!(plain.request_headers.is_empty() && plain.response_headers.is_empty() && plain.mirrors.is_empty());
    }

    #[test]
    fn a_cookie_regex_match_selects_the_sticky_route_in_both_apis() {
        let d = dr(&[("v1", "v1"), ("v2", "v2")]);
        let http = json!([
            {"match": [{"headers": {"cookie": {"regex": STICKY}}}],
             "route": [{"destination": {"host": "podinfo", "subset": "v2"}}]},
            {"route": [{"destination": {"host": "podinfo", "subset": "v1"}}]}]);
        let by_vs = cluster(&[vs(http)], &[d]);
        let rules = json!([
            {"matches": [{"headers": [{"type": "RegularExpression", "name": "Cookie", "value": STICKY}]}],
             "backendRefs": [backend("podinfo-b", 1)]},
            {"backendRefs": [backend("podinfo-a", 1)]}]);
        let by_route = routed(&[http_route("podinfo", T0, rules)], &[], &[], &[]);
        for s in [&by_vs, &by_route] {
            let version = |cookie: Option<&str>| {
                let headers: Vec<(&'static str, &str)> = cookie.map(|c| ("cookie", c)).into_iter().collect();
                send(s, "podinfo.test", "/", &headers, &mut Rng::new(3))
                    .unwrap()
                    .version
            };
            assert_eq!(version(Some("canary=always")), "v2");
            assert_eq!(version(Some("session=abc; canary=always")), "v2");
            assert_eq!(version(Some("a=1;canary=always; b=2")), "v2");
            assert_eq!(version(Some("canary=never")), "v1");
            assert_eq!(version(Some("canary=alwaysx")), "v1");
            assert_eq!(version(Some("xcanary=always")), "v1");
            assert_eq!(version(None), "v1");
        }
    }

    #[test]
    fn http_route_filters_mirror_and_change_headers_at_rule_and_backend_level() {
        let filter_headers = |kind: &str, field: &str, ops: Value| json!({"type": kind, field: ops});
        let rules = json!([{
            "filters": [
                {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "podinfo-b", "port": 80}}},
                {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "podinfo-c", "port": 80},
                    "fraction": {"numerator": 1, "denominator": 4}}},
                filter_headers("RequestHeaderModifier", "requestHeaderModifier",
                    json!({"set": [{"name": "x-rule", "value": "1"}]})),
                filter_headers("ResponseHeaderModifier", "responseHeaderModifier",
                    json!({"set": [{"name": "x-v", "value": "rule"}], "remove": ["x-powered-by"]})),
                {"type": "URLRewrite", "urlRewrite": {"hostname": "ignored"}}],
            "backendRefs": [{"name": "podinfo-a", "port": 80, "filters": [
                filter_headers("ResponseHeaderModifier", "responseHeaderModifier",
                    json!({"add": [{"name": "Set-Cookie", "value": "canary=never"}],
                           "set": [{"name": "x-v", "value": "backend"}]})),
                {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "podinfo-b", "port": 80},
                    "percent": 50}}]}]}]);
        let s = routed(&[http_route("podinfo", T0, rules)], &[], &[], &[]);
        let mut rng = Rng::new(12);
        let (mut rule_copies, mut refused, mut backend_copies) = (0, 0, 0);
        for _ in 0..2000 {
            let up = send(&s, "podinfo.test", "/", &[], &mut rng).unwrap();
            assert_eq!(up.service.1, "podinfo-a");
            let outcomes = names(&up);
            // The rule's mirrors first (100 %: podinfo-b; 25 %: podinfo-c, which does not exist), then
            // the backendRef's (50 %: podinfo-b).
            assert_eq!(outcomes[0], Ok(("podinfo-b".to_owned(), "v2".to_owned())));
            rule_copies += 1;
            for (i, m) in up.mirrors.iter().enumerate().skip(1) {
                match m {
                    Err(e) => {
                        assert!(
                            e.to_string()
                                .contains("RequestMirror backendRef Service test/podinfo-c does not exist"),
                            "{e}"
                        );
                        refused += 1;
                    }
                    Ok(m) => {
                        assert_eq!(
                            (m.service.1.as_str(), m.http_route.as_deref()),
                            ("podinfo-b", Some("test/podinfo")),
                            "{i}"
                        );
                        backend_copies += 1;
                    }
                }
            }
            let mut response = HeaderMap::new();
            response.insert("x-powered-by", "podinfo".parse().unwrap());
            headers::apply_all(&up.response_headers, &mut response);
            assert_eq!(response["x-v"], "rule", "the rule's set after the backendRef's");
            assert_eq!(response["set-cookie"], "canary=never");
            assert!(response.get("x-powered-by").is_none());
            let mut request = HeaderMap::new();
            headers::apply_all(&up.request_headers, &mut request);
            assert_eq!(request["x-rule"], "1");
        }
        assert_eq!(rule_copies, 2000);
        assert!((400..600).contains(&refused), "25 %: {refused}");
        assert!((850..1150).contains(&backend_copies), "50 %: {backend_copies}");
    }
}
