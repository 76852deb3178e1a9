//! Gateway API `HTTPRoute`s (gateway.networking.k8s.io/v1) as the mesh applies them: attached to a
//! Service (GAMMA, as Istio ambient waypoints and Linkerd do) or to a Gateway (north-south), parsed into
//! plain data, matched against requests with the API's precedence rules, and the `status.parents`
//! entries an implementation writes for them.

use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use super::headers::{self, HeaderOps, Headers, Side};
use super::snapshot::{CLUSTER_SUFFIX, Id, Pattern, Snapshot, StringMatch, parse_duration};

/// The Gateway API's group.
pub const GROUP: &str = "gateway.networking.k8s.io";

/// The `controllerName` of the `status.parents` entries the mesh writes.
pub const CONTROLLER_NAME: &str = "kubesim.turnout.dev/mesh";

/// What a `parentRef` or `backendRef` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefKind {
    /// A core Service (group `""` or `core`, kind `Service`).
    Service,
    /// A Gateway of the Gateway API's group.
    Gateway,
    /// Anything else, as `group/kind`.
    Other(String),
}

impl RefKind {
    fn of(group: &str, kind: &str) -> Self {
        match (group, kind) {
            ("" | "core", "Service") => RefKind::Service,
            (GROUP, "Gateway") => RefKind::Gateway,
            _ => RefKind::Other(format!("{group}/{kind}")),
        }
    }
}

/// One `spec.parentRefs` entry, with the API's defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ParentRef {
    pub kind: RefKind,
    /// (namespace, name); the namespace defaults to the route's.
    pub id: Id,
    pub port: Option<u16>,
    pub section_name: Option<String>,
    /// The entry as written, echoed in `status.parents[].parentRef`.
    pub raw: Value,
}

/// One `backendRefs` entry of a rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Backend {
    pub kind: RefKind,
    /// (namespace, name); the namespace defaults to the route's.
    pub id: Id,
    pub port: Option<u16>,
    /// Default 1.
    pub weight: u32,
    /// The backendRef's own `filters` (applied before the rule's).
    pub filters: Filters,
}

/// The `filters` kubesim applies, of a rule or of a backendRef: `RequestHeaderModifier`,
/// `ResponseHeaderModifier` and `RequestMirror` (the others — redirects, rewrites, CORS, extensions —
/// are ignored).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filters {
    pub headers: Headers,
    /// Every `RequestMirror`, in order.
    pub mirrors: Vec<RequestMirror>,
}

/// A `RequestMirror` filter: where copies go and which share of requests.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestMirror {
    /// Its `backendRef` (weight and filters unused).
    pub backend: Backend,
    /// The share mirrored, in percent (0–100): `percent`, or `fraction`, else 100.
    pub percent: f64,
}

impl Backend {
    /// `namespace/name` (with the kind when it is not a Service).
    pub fn describe(&self) -> String {
        match &self.kind {
            RefKind::Other(kind) => format!("{kind} {}/{}", self.id.0, self.id.1),
            _ => format!("Service {}/{}", self.id.0, self.id.1),
        }
    }

    /// The Service's host, e.g. `podinfo-a.test.svc.cluster.local`.
    pub fn host(&self) -> String {
        format!("{}.{}.{CLUSTER_SUFFIX}", self.id.1, self.id.0)
    }
}

/// A path condition.
#[derive(Clone, Debug, PartialEq)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise prefix, without its trailing `/` (`/` itself kept): `/api` matches `/api` and
    /// `/api/x`, not `/apix`.
    Prefix(String),
    Regex(Pattern),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) if p == "/" => true,
            PathMatch::Prefix(p) => path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            PathMatch::Regex(p) => p.is_match(path),
        }
    }
}

/// One `matches` entry: every condition must hold.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub method: Option<String>,
    /// Lowercase header names.
    pub headers: Vec<(String, StringMatch)>,
    pub query_params: Vec<(String, StringMatch)>,
    /// An invalid condition (e.g. a bad regex): the entry never matches.
    pub invalid: Option<String>,
}

/// The precedence of a match among all rules of the routes that apply, highest first: an exact path,
/// then the longest prefix (regular expressions after every prefix, longest first: the API leaves them
/// to the implementation), a method, the most header conditions, the most query conditions.
pub type Specificity = (u8, usize, bool, usize, usize);

impl RouteMatch {
    /// The default entry: every request (`PathPrefix /`).
    fn everything() -> Self {
        Self {
            path: PathMatch::Prefix("/".into()),
            method: None,
            headers: Vec::new(),
            query_params: Vec::new(),
            invalid: None,
        }
    }

    pub fn specificity(&self) -> Specificity {
        let (class, len) = match &self.path {
            PathMatch::Exact(p) => (2, p.len()),
            PathMatch::Prefix(p) => (1, p.len()),
            PathMatch::Regex(p) => (0, p.source().len()),
        };
        (
            class,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query_params.len(),
        )
    }

    /// Whether a request (method, path without query, query string, header lookup) meets every condition.
    pub fn matches<'a>(&self, method: &str, path: &str, query: &str, header: impl Fn(&str) -> Option<&'a str>) -> bool {
        let query_value = |name: &str| {
            query.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name).then_some(v)
            })
        };
        self.invalid.is_none()
            && self.path.matches(path)
            && self.method.as_deref().is_none_or(|m| m == method)
            && self
                .headers
                .iter()
                .all(|(name, m)| header(name).is_some_and(|v| m.matches(v)))
            && self
                .query_params
                .iter()
                .all(|(name, m)| query_value(name).is_some_and(|v| m.matches(v)))
    }
}

/// One `rules` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// Any of them; never empty (absent: every request).
    pub matches: Vec<RouteMatch>,
    pub backends: Vec<Backend>,
    /// `timeouts.request` (absent or zero: none).
    pub timeout: Option<Duration>,
    /// The rule's `filters` (applied after those of the chosen backendRef).
    pub filters: Filters,
}

/// An HTTPRoute.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub namespace: String,
    pub name: String,
    /// `metadata.generation`: the status written for the snapshot holding it observes this generation.
    pub generation: i64,
    pub parents: Vec<ParentRef>,
    /// Lowercase; `*.` wildcards kept.
    pub hostnames: Vec<String>,
    pub rules: Vec<Rule>,
}

impl Route {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the route attaches to Service `service` (on Service port `port`) for requests from
    /// outside any namespace: a parentRef to the Service, and the route in the Service's namespace
    /// (a "producer" route; "consumer" routes in other namespaces apply only to clients in their own
    /// namespace, and kubesim's clients are in none).
    pub fn attaches_to_service(&self, service: &Id, port: u16) -> bool {
        self.namespace == service.0
            && self
                .parents
                .iter()
                .any(|p| p.kind == RefKind::Service && p.id == *service && p.port.is_none_or(|p| p == port))
    }

    /// Whether the route attaches to a Gateway that exists.
    pub fn attaches_to_gateway(&self, gateways: &BTreeSet<Id>) -> bool {
        self.parents
            .iter()
            .any(|p| p.kind == RefKind::Gateway && gateways.contains(&p.id))
    }

    /// How specifically the route's hostnames cover `host` (lowercase, no port): (characters of a
    /// matching exact hostname, characters of a matching hostname); no hostnames: every host, least
    /// specifically. `None`: not covered.
    pub fn hostname_specificity(&self, host: &str) -> Option<(usize, usize)> {
        if self.hostnames.is_empty() {
            return Some((0, 0));
        }
        self.hostnames
            .iter()
            .filter_map(|h| match h.strip_prefix('*') {
                Some(suffix) => (host.len() > suffix.len() && host.ends_with(suffix)).then_some((0, h.len())),
                None => (h == host).then_some((h.len(), h.len())),
            })
            .max()
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

fn port_of(v: &Value) -> Option<u16> {
    v.as_u64().and_then(|n| u16::try_from(n).ok())
}

/// The (namespace, name) a reference names, its namespace defaulting to `namespace`.
fn ref_id(r: &Value, namespace: &str) -> Id {
    let ns = r["namespace"].as_str().filter(|s| !s.is_empty()).unwrap_or(namespace);
    (ns.to_owned(), str_of(r, "name").to_owned())
}

/// A header or query condition (`type` Exact, the default, or RegularExpression).
fn value_match(v: &Value) -> Result<(String, StringMatch), String> {
    let name = str_of(v, "name").to_owned();
    let value = str_of(v, "value");
    match v["type"].as_str().unwrap_or("Exact") {
        "Exact" => Ok((name, StringMatch::Exact(value.to_owned()))),
        "RegularExpression" => Pattern::new(value)
            .map(|p| (name, StringMatch::Regex(p)))
            .map_err(|e| format!("invalid regex {value:?}: {e}")),
        other => Err(format!("unsupported match type {other}")),
    }
}

fn route_match(v: &Value) -> RouteMatch {
    let mut m = RouteMatch::everything();
    let mut problems = Vec::new();
    if let Some(path) = v.get("path").filter(|p| p.is_object()) {
        let value = path["value"].as_str().unwrap_or("/");
        match path["type"].as_str().unwrap_or("PathPrefix") {
            "Exact" => m.path = PathMatch::Exact(value.to_owned()),
            "PathPrefix" => {
                let trimmed = value.trim_end_matches('/');
                m.path = PathMatch::Prefix(if trimmed.is_empty() { "/" } else { trimmed }.to_owned());
            }
            "RegularExpression" => match Pattern::new(value) {
                Ok(p) => m.path = PathMatch::Regex(p),
                Err(e) => problems.push(format!("path: invalid regex {value:?}: {e}")),
            },
            other => problems.push(format!("path: unsupported type {other}")),
        }
    }
    m.method = v["method"].as_str().map(str::to_owned);
    for (key, target, lowercase) in [
        ("headers", &mut m.headers, true),
        ("queryParams", &mut m.query_params, false),
    ] {
        for entry in v[key].as_array().into_iter().flatten() {
            match value_match(entry) {
                Ok((name, matcher)) => {
                    let name = if lowercase { name.to_ascii_lowercase() } else { name };
                    target.push((name, matcher));
                }
                Err(e) => problems.push(format!("{key}: {e}")),
            }
        }
    }
    if !problems.is_empty() {
        m.invalid = Some(problems.join("; "));
    }
    m
}

/// A `backendRef` (of a rule or of a `RequestMirror`), with the API's defaults, without filters.
fn backend_ref(b: &Value, namespace: &str) -> Backend {
    Backend {
        kind: RefKind::of(
            b["group"].as_str().unwrap_or(""),
            b["kind"].as_str().unwrap_or("Service"),
        ),
        id: ref_id(b, namespace),
        port: port_of(&b["port"]),
        weight: b["weight"].as_u64().map_or(1, |w| u32::try_from(w).unwrap_or(u32::MAX)),
        filters: Filters::default(),
    }
}

/// The filters kubesim applies among a `filters` list.
fn filters(list: &Value, namespace: &str) -> Filters {
    let mut out = Filters::default();
    for f in list.as_array().into_iter().flatten() {
        match f["type"].as_str().unwrap_or_default() {
            "RequestHeaderModifier" => {
                out.headers.request = HeaderOps::of(&f["requestHeaderModifier"], Side::Request);
            }
            "ResponseHeaderModifier" => {
                out.headers.response = HeaderOps::of(&f["responseHeaderModifier"], Side::Response);
            }
            "RequestMirror" => {
                let mirror = &f["requestMirror"];
                out.mirrors.push(RequestMirror {
                    backend: backend_ref(&mirror["backendRef"], namespace),
                    percent: headers::gateway_percent(mirror),
                });
            }
            _ => {}
        }
    }
    out
}

/// An HTTPRoute object.
pub fn route(object: &Value) -> Route {
    let meta = &object["metadata"];
    let namespace = str_of(meta, "namespace").to_owned();
    let spec = &object["spec"];
    let parents = spec["parentRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| ParentRef {
            kind: RefKind::of(
                p["group"].as_str().unwrap_or(GROUP),
                p["kind"].as_str().unwrap_or("Gateway"),
            ),
            id: ref_id(p, &namespace),
            port: port_of(&p["port"]),
            section_name: p["sectionName"].as_str().map(str::to_owned),
            raw: p.clone(),
        })
        .collect();
    let rules = spec["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let mut matches: Vec<RouteMatch> = r["matches"].as_array().into_iter().flatten().map(route_match).collect();
            if matches.is_empty() {
                matches.push(RouteMatch::everything());
            }
            Rule {
                matches,
                backends: r["backendRefs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| Backend {
                        filters: filters(&b["filters"], &namespace),
                        ..backend_ref(b, &namespace)
                    })
                    .collect(),
                timeout: r["timeouts"]["request"]
                    .as_str()
                    .and_then(parse_gateway_duration)
                    .filter(|d| !d.is_zero()),
                filters: filters(&r["filters"], &namespace),
            }
        })
        .collect();
    Route {
        name: str_of(meta, "name").to_owned(),
        generation: meta["generation"].as_i64().unwrap_or_default(),
        parents,
        hostnames: spec["hostnames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
            .collect(),
        rules,
        namespace,
    }
}

/// A Gateway API Duration (`1h`, `30s`, `500ms`, `1h30m`, ...).
fn parse_gateway_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let unit_len = if rest[digits..].starts_with("ms") { 2 } else { 1 };
        let (part, tail) = rest.split_at((digits + unit_len).min(rest.len()));
        total += parse_duration(part)?;
        rest = tail;
    }
    Some(total)
}

/// The Gateways that exist, as (namespace, name).
pub fn gateways<'a>(objects: impl IntoIterator<Item = &'a Value>) -> BTreeSet<Id> {
    objects.into_iter().map(|o| ref_id(&o["metadata"], "")).collect()
}

/// The order in which routes tie-break: oldest first, then `namespace/name`.
pub fn precedence(object: &Value) -> (String, String, String) {
    super::snapshot::precedence(object)
}

/// Routes in precedence order.
pub fn routes(mut objects: Vec<&Value>) -> Vec<Route> {
    objects.sort_by_key(|o| precedence(o));
    objects.into_iter().map(route).collect()
}

/// The rule that decides a request among `routes` (each with its precedence position in the snapshot):
/// the match of highest [`Specificity`], then the oldest route, then the first rule of it.
pub fn decide<'r, 'a>(
    routes: impl IntoIterator<Item = (usize, &'r Route)>,
    method: &str,
    path: &str,
    query: &str,
    header: impl Fn(&str) -> Option<&'a str> + Copy,
) -> Option<(&'r Route, &'r Rule)> {
    type Rank = (Specificity, Reverse<usize>, Reverse<usize>);
    let mut best: Option<(Rank, &Route, &Rule)> = None;
    for (position, route) in routes {
        for (index, rule) in route.rules.iter().enumerate() {
            for m in rule.matches.iter().filter(|m| m.matches(method, path, query, header)) {
                let key = (m.specificity(), Reverse(position), Reverse(index));
                if best.as_ref().is_none_or(|(k, _, _)| key > *k) {
                    best = Some((key, route, rule));
                }
            }
        }
    }
    best.map(|(_, route, rule)| (route, rule))
}

/// One condition of a `status.parents` entry, before its transition time is known.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub kind: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// What the mesh reports for one parentRef it serves.
#[derive(Clone, Debug, PartialEq)]
pub struct ParentStatus {
    pub parent_ref: Value,
    pub conditions: [Condition; 2],
}

/// The `status.parents` entries of the mesh for a route as `snapshot` holds the cluster: one per
/// parentRef to a Service or Gateway, `Accepted` (the parent exists, and for a Service has the port
/// named) and `ResolvedRefs` (every backendRef names a Service that exists, on a port it has).
pub fn parent_statuses(route: &Route, snapshot: &Snapshot) -> Vec<ParentStatus> {
    let resolved = resolved_refs(route, snapshot);
    route
        .parents
        .iter()
        .filter(|p| !matches!(p.kind, RefKind::Other(_)))
        // A Service nothing serves routes for gets no status from anyone.
        .filter(|p| p.kind != RefKind::Service || !snapshot.service(&p.id).is_some_and(|s| s.unserved))
        .map(|p| {
            let (ns, name) = &p.id;
            let accepted = match p.kind {
                RefKind::Service => match snapshot.service(&p.id) {
                    None => Err(format!("Service {ns}/{name} does not exist")),
                    Some(s) => match p.port {
                        Some(port) if !s.ports.iter().any(|sp| sp.port == port) => {
                            Err(format!("Service {ns}/{name} has no port {port}"))
                        }
                        _ => Ok(format!("attached to Service {ns}/{name}")),
                    },
                },
                _ => {
                    if snapshot.gateways.contains(&p.id) {
                        Ok(format!("attached to Gateway {ns}/{name}"))
                    } else {
                        Err(format!("Gateway {ns}/{name} does not exist"))
                    }
                }
            };
            let accepted = match accepted {
                Ok(message) => Condition {
                    kind: "Accepted",
                    status: true,
                    reason: "Accepted",
                    message,
                },
                Err(message) => Condition {
                    kind: "Accepted",
                    status: false,
                    reason: "NoMatchingParent",
                    message,
                },
            };
            ParentStatus {
                parent_ref: p.raw.clone(),
                conditions: [accepted, resolved.clone()],
            }
        })
        .collect()
}

/// The `ResolvedRefs` condition of a route: every backendRef, of the rules and of their
/// `RequestMirror` filters (which the API requires to be resolved too).
fn resolved_refs(route: &Route, snapshot: &Snapshot) -> Condition {
    fn mirrors(f: &Filters) -> impl Iterator<Item = (&'static str, &Backend)> {
        f.mirrors.iter().map(|m| ("RequestMirror backendRef", &m.backend))
    }
    let refs = route.rules.iter().flat_map(|r| {
        let mut refs: Vec<_> = mirrors(&r.filters).collect();
        for b in &r.backends {
            refs.push(("backendRef", b));
            refs.extend(mirrors(&b.filters));
        }
        refs
    });
    for (what, backend) in refs {
        let (ns, name) = &backend.id;
        if let RefKind::Other(kind) = &backend.kind {
            return Condition {
                kind: "ResolvedRefs",
                status: false,
                reason: "InvalidKind",
                message: format!("{what} {kind} {ns}/{name}: only Services are supported"),
            };
        }
        let problem = match snapshot.service(&backend.id) {
            None => Some(format!("{what} Service {ns}/{name} does not exist")),
            Some(s) => backend
                .port
                .filter(|port| !s.ports.iter().any(|sp| sp.port == *port))
                .map(|port| format!("{what} Service {ns}/{name} has no port {port}")),
        };
        if let Some(message) = problem {
            return Condition {
                kind: "ResolvedRefs",
                status: false,
                reason: "BackendNotFound",
                message,
            };
        }
    }
    Condition {
        kind: "ResolvedRefs",
        status: true,
        reason: "ResolvedRefs",
        message: "every backendRef resolved".into(),
    }
}

/// The route's `status` with the mesh's entries (`ours`) for generation `generation`, keeping the
/// entries of other controllers from `object` and, where a condition's status did not change, its
/// `lastTransitionTime`. `now` (RFC 3339) is the time of the conditions that changed.
pub fn status(object: &Value, ours: &[ParentStatus], generation: i64, now: &str) -> Value {
    let existing: Vec<&Value> = object["status"]["parents"].as_array().into_iter().flatten().collect();
    let mut parents: Vec<Value> = existing
        .iter()
        .filter(|p| p["controllerName"] != CONTROLLER_NAME)
        .map(|p| (*p).clone())
        .collect();
    for parent in ours {
        let before = existing
            .iter()
            .find(|p| p["controllerName"] == CONTROLLER_NAME && p["parentRef"] == parent.parent_ref);
        let conditions: Vec<Value> = parent
            .conditions
            .iter()
            .map(|c| {
                let status = if c.status { "True" } else { "False" };
                let since = before
                    .and_then(|p| p["conditions"].as_array())
                    .into_iter()
                    .flatten()
                    .find(|old| old["type"] == c.kind && old["status"] == status)
                    .and_then(|old| old["lastTransitionTime"].as_str())
                    .unwrap_or(now);
                json!({"type": c.kind, "status": status, "reason": c.reason, "message": c.message,
                    "observedGeneration": generation, "lastTransitionTime": since})
            })
            .collect();
        parents.push(
            json!({"parentRef": parent.parent_ref, "controllerName": CONTROLLER_NAME,
            "conditions": conditions}),
        );
    }
    json!({"parents": parents})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_take_the_api_defaults() {
        let r = route(&json!({"metadata": {"name": "r", "namespace": "test", "generation": 3},
            "spec": {"parentRefs": [{"name": "podinfo", "kind": "Service", "group": "", "port": 80},
                                    {"name": "web", "namespace": "edge", "sectionName": "http"},
                                    {"name": "x", "kind": "ServiceImport", "group": "multicluster.x-k8s.io"}],
                "hostnames": ["Podinfo.Example.com."],
                "rules": [{"backendRefs": [{"name": "podinfo-a", "port": 80},
                                           {"name": "podinfo-b", "namespace": "other", "weight": 0}],
                           "timeouts": {"request": "1m30s"}},
                          {"matches": [{"path": {"type": "Exact", "value": "/x"}}]}]}}));
        assert_eq!(r.generation, 3);
        assert_eq!(r.parents[0].kind, RefKind::Service);
        assert_eq!(r.parents[0].id, ("test".to_owned(), "podinfo".to_owned()));
        assert_eq!(r.parents[0].port, Some(80));
        assert_eq!(r.parents[1].kind, RefKind::Gateway);
        assert_eq!(r.parents[1].id, ("edge".to_owned(), "web".to_owned()));
        assert_eq!(r.parents[1].section_name.as_deref(), Some("http"));
        assert!(matches!(r.parents[2].kind, RefKind::Other(_)));
        assert_eq!(r.hostnames, ["podinfo.example.com"]);
        let backends = &r.rules[0].backends;
        assert_eq!(
            (backends[0].kind.clone(), backends[0].weight, backends[0].port),
            (RefKind::Service, 1, Some(80))
        );
        assert_eq!(backends[1].id, ("other".to_owned(), "podinfo-b".to_owned()));
        assert_eq!(backends[1].weight, 0);
        assert_eq!(backends[0].host(), "podinfo-a.test.svc.cluster.local");
        assert_eq!(r.rules[0].timeout, Some(Duration::from_secs(90)));
        assert_eq!(
            r.rules[0].matches,
            [RouteMatch::everything()],
            "no matches: every request"
        );
        assert_eq!(r.rules[1].matches[0].path, PathMatch::Exact("/x".into()));
        assert_eq!(r.rules[1].timeout, None);
    }

    #[test]
    fn path_prefixes_match_whole_path_elements() {
        let prefix = |p: &str| route_match(&json!({"path": {"type": "PathPrefix", "value": p}})).path;
        assert!(prefix("/api").matches("/api"));
        assert!(prefix("/api/").matches("/api/v1"));
        assert!(prefix("/api").matches("/api/v1"));
        assert!(!prefix("/api").matches("/apiv1"));
        assert!(prefix("/").matches("/anything"));
        let regex = route_match(&json!({"path": {"type": "RegularExpression", "value": "/v[0-9]+"}})).path;
        assert!(regex.matches("/v12"));
        assert!(!regex.matches("/v12/x"), "a regex matches the whole path");
        let bad = route_match(&json!({"path": {"type": "RegularExpression", "value": "("}}));
        assert!(bad.invalid.is_some());
        assert!(!bad.matches("GET", "/", "", |_| None));
    }

    #[test]
    fn headers_query_parameters_and_method_must_all_hold() {
        let m = route_match(&json!({"method": "POST",
            "headers": [{"name": "X-Canary", "value": "yes"}, {"type": "RegularExpression", "name": "x-user", "value": "a.*"}],
            "queryParams": [{"name": "debug", "value": "1"}]}));
        let headers = |name: &str| match name {
            "x-canary" => Some("yes"),
            "x-user" => Some("alice"),
            _ => None,
        };
        assert!(m.matches("POST", "/x", "a=2&debug=1", headers));
        assert!(!m.matches("GET", "/x", "debug=1", headers));
        assert!(!m.matches("POST", "/x", "debug=2", headers));
        assert!(!m.matches("POST", "/x", "debug=1", |n| (n == "x-canary").then_some("yes")));
        assert_eq!(m.specificity(), (1, 1, true, 2, 1));
    }

    #[test]
    fn hostnames_match_exactly_or_by_wildcard_the_exact_one_first() {
        let with =
            |hosts: Value| route(&json!({"metadata": {"name": "r", "namespace": "t"}, "spec": {"hostnames": hosts}}));
        let exact = with(json!(["api.example.com"]));
        let wildcard = with(json!(["*.example.com"]));
        assert!(exact.hostname_specificity("api.example.com") > wildcard.hostname_specificity("api.example.com"));
        assert!(wildcard.hostname_specificity("a.b.example.com").is_some());
        assert!(wildcard.hostname_specificity("example.com").is_none());
        assert!(exact.hostname_specificity("www.example.com").is_none());
        assert_eq!(with(json!([])).hostname_specificity("anything"), Some((0, 0)));
    }

    #[test]
    fn gateway_durations_add_up() {
        assert_eq!(parse_gateway_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_gateway_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_gateway_duration("2s500ms"), Some(Duration::from_millis(2500)));
        assert_eq!(parse_gateway_duration("soon"), None);
        assert_eq!(parse_gateway_duration(""), None);
    }

    #[test]
    fn status_keeps_other_controllers_and_unchanged_transition_times() {
        let parent = json!({"group": "", "kind": "Service", "name": "podinfo"});
        let ours = |accepted: bool| ParentStatus {
            parent_ref: parent.clone(),
            conditions: [
                Condition {
                    kind: "Accepted",
                    status: accepted,
                    reason: if accepted { "Accepted" } else { "NoMatchingParent" },
                    message: String::new(),
                },
                Condition {
                    kind: "ResolvedRefs",
                    status: true,
                    reason: "ResolvedRefs",
                    message: String::new(),
                },
            ],
        };
        let foreign = json!({"parentRef": parent, "controllerName": "example.com/other", "conditions": []});
        let mut object = json!({"status": {"parents": [foreign]}});
        let first = status(&object, &[ours(true)], 1, "2025-01-01T00:00:00Z");
        assert_eq!(first["parents"][0], foreign);
        let mine = &first["parents"][1];
        assert_eq!(mine["controllerName"], CONTROLLER_NAME);
        assert_eq!(mine["conditions"][0]["observedGeneration"], 1);
        object["status"] = first.clone();
        let second = status(&object, &[ours(false)], 2, "2025-02-02T00:00:00Z");
        let conditions = &second["parents"][1]["conditions"];
        assert_eq!(
            (&conditions[0]["status"], &conditions[0]["lastTransitionTime"]),
            (&json!("False"), &json!("2025-02-02T00:00:00Z"))
        );
        assert_eq!(conditions[1]["lastTransitionTime"], "2025-01-01T00:00:00Z", "unchanged");
        assert_eq!(conditions[1]["observedGeneration"], 2);
    }

    #[test]
    fn filters_are_read_at_rule_and_backend_level_and_mirror_refs_must_resolve() {
        let object = json!({"metadata": {"name": "r", "namespace": "test", "generation": 1},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "podinfo"}],
                "rules": [{
                    "filters": [
                        {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 80},
                            "fraction": {"numerator": 1, "denominator": 3}}},
                        {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                            "add": [{"name": "Set-Cookie", "value": "canary=always"}]}},
                        {"type": "RequestRedirect", "requestRedirect": {"statusCode": 302}}],
                    "backendRefs": [{"name": "podinfo", "port": 80, "filters": [
                        {"type": "RequestHeaderModifier", "requestHeaderModifier": {"remove": ["x-debug"]}},
                        {"type": "RequestMirror", "requestMirror": {
                            "backendRef": {"name": "audit", "namespace": "other", "port": 8080}, "percent": 10}}]}]}]}});
        let r = route(&object);
        let rule = &r.rules[0];
        assert_eq!(rule.filters.mirrors.len(), 1);
        let m = &rule.filters.mirrors[0];
        assert_eq!((m.backend.id.1.as_str(), m.backend.port), ("shadow", Some(80)));
        assert!((m.percent - 100.0 / 3.0).abs() < 1e-9, "{}", m.percent);
        assert_eq!(rule.filters.headers.response.add.len(), 1);
        assert!(rule.filters.headers.request.is_empty());
        let b = &rule.backends[0];
        assert_eq!(b.filters.headers.request.remove, ["x-debug"]);
        assert_eq!(
            (b.filters.mirrors[0].backend.id.clone(), b.filters.mirrors[0].percent),
            (("other".to_owned(), "audit".to_owned()), 10.0)
        );

        // ResolvedRefs checks the mirrors' backendRefs too.
        let service = json!({"metadata": {"name": "podinfo", "namespace": "test"}, "spec": {"ports": [{"port": 80}]}});
        let mut snapshot = Snapshot::default();
        let id = |ns: &str, name: &str| (ns.to_owned(), name.to_owned());
        snapshot.set_service(&id("test", "podinfo"), Some(super::super::snapshot::service(&service)));
        let resolved = |s: &Snapshot| resolved_refs(&r, s);
        let c = resolved(&snapshot);
        assert_eq!((c.status, c.reason), (false, "BackendNotFound"));
        assert_eq!(c.message, "RequestMirror backendRef Service test/shadow does not exist");
        snapshot.set_service(&id("test", "shadow"), Some(super::super::snapshot::service(&service)));
        let c = resolved(&snapshot);
        assert_eq!(c.message, "RequestMirror backendRef Service other/audit does not exist");
        let mut audit = service.clone();
        audit["spec"]["ports"][0]["port"] = json!(8080);
        snapshot.set_service(&id("other", "audit"), Some(super::super::snapshot::service(&audit)));
        assert!(resolved(&snapshot).status);
    }
}
