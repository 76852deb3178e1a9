//! The routing configuration a proxy holds — Services and their endpoints, pods, VirtualServices,
//! DestinationRules, HTTPRoutes and Gateways — parsed from API objects into plain data.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::gateway;
use super::headers::{self, Headers};

/// The cluster's DNS suffix for Services.
pub const CLUSTER_SUFFIX: &str = "svc.cluster.local";

/// (namespace, name).
pub type Id = (String, String);

/// Entries by namespace, then name. Each namespace's map is shared by every snapshot that holds the
/// same entries, so a new snapshot copies only the namespaces that changed since the previous one.
pub type Namespaced<T> = BTreeMap<String, Arc<BTreeMap<String, Arc<T>>>>;

/// What one proxy knows. Compared as a whole to decide whether a change must be pushed to the proxies
/// (parts shared with the other side compare by address).
///
/// The mesh controller keeps one up to date entry by entry ([`Snapshot::set_service`],
/// [`Snapshot::set_pod`], ...) and publishes a clone of it, which costs one pointer per namespace.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    services: Namespaced<Service>,
    pods: Namespaced<Pod>,
    /// In precedence order: oldest first, then by namespace and name (as Istio orders conflicting rules).
    pub virtual_services: Arc<Vec<VirtualService>>,
    /// In precedence order, as `virtual_services`.
    pub destination_rules: Arc<Vec<DestinationRule>>,
    /// Gateway API HTTPRoutes, in precedence order (oldest first, then namespace and name).
    pub http_routes: Arc<Vec<gateway::Route>>,
    /// The Gateways that exist (HTTPRoutes attach to them).
    pub gateways: Arc<BTreeSet<Id>>,
}

impl PartialEq for Snapshot {
    fn eq(&self, other: &Self) -> bool {
        same(&self.services, &other.services)
            && same(&self.pods, &other.pods)
            && (Arc::ptr_eq(&self.virtual_services, &other.virtual_services)
                || self.virtual_services == other.virtual_services)
            && (Arc::ptr_eq(&self.destination_rules, &other.destination_rules)
                || self.destination_rules == other.destination_rules)
            && (Arc::ptr_eq(&self.http_routes, &other.http_routes) || self.http_routes == other.http_routes)
            && (Arc::ptr_eq(&self.gateways, &other.gateways) || self.gateways == other.gateways)
    }
}

/// Equality of two namespaced maps, skipping the parts they share.
fn same<T: PartialEq>(a: &Namespaced<T>, b: &Namespaced<T>) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((ns_a, a), (ns_b, b))| {
            ns_a == ns_b
                && (Arc::ptr_eq(a, b)
                    || (a.len() == b.len()
                        && a.iter()
                            .zip(b.iter())
                            .all(|((na, a), (nb, b))| na == nb && (Arc::ptr_eq(a, b) || a == b))))
        })
}

fn entry<'a, T>(map: &'a Namespaced<T>, namespace: &str, name: &str) -> Option<&'a T> {
    map.get(namespace)?.get(name).map(AsRef::as_ref)
}

/// Sets or removes (`None`) one entry; returns whether that changed anything.
fn set<T: PartialEq>(map: &mut Namespaced<T>, id: &Id, value: Option<T>) -> bool {
    let (namespace, name) = id;
    match value {
        Some(value) => {
            if entry(map, namespace, name).is_some_and(|old| *old == value) {
                return false;
            }
            let entries = map.entry(namespace.clone()).or_default();
            Arc::make_mut(entries).insert(name.clone(), Arc::new(value));
            true
        }
        None => {
            let Some(entries) = map.get_mut(namespace) else {
                return false;
            };
            if !entries.contains_key(name) {
                return false;
            }
            if entries.len() == 1 {
                map.remove(namespace);
            } else {
                Arc::make_mut(entries).remove(name);
            }
            true
        }
    }
}

impl Snapshot {
    /// The Service (namespace, name).
    pub fn service(&self, id: &Id) -> Option<&Service> {
        entry(&self.services, &id.0, &id.1)
    }

    /// The pod `name` in `namespace`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        entry(&self.pods, namespace, name)
    }

    /// Every pod, by namespace and name.
    pub fn pods(&self) -> impl Iterator<Item = (&str, &str, &Pod)> {
        self.pods.iter().flat_map(|(ns, pods)| {
            pods.iter()
                .map(move |(name, p)| (ns.as_str(), name.as_str(), p.as_ref()))
        })
    }

    /// Sets (or with `None` removes) a Service; returns whether the snapshot changed.
    pub fn set_service(&mut self, id: &Id, service: Option<Service>) -> bool {
        set(&mut self.services, id, service)
    }

    /// Sets (or with `None` removes) a pod; returns whether the snapshot changed.
    pub fn set_pod(&mut self, id: &Id, pod: Option<Pod>) -> bool {
        set(&mut self.pods, id, pod)
    }

    /// Replaces the VirtualServices (in precedence order); returns whether the snapshot changed.
    pub fn set_virtual_services(&mut self, virtual_services: Vec<VirtualService>) -> bool {
        if *self.virtual_services == virtual_services {
            return false;
        }
        self.virtual_services = Arc::new(virtual_services);
        true
    }

    /// Replaces the DestinationRules (in precedence order); returns whether the snapshot changed.
    pub fn set_destination_rules(&mut self, destination_rules: Vec<DestinationRule>) -> bool {
        if *self.destination_rules == destination_rules {
            return false;
        }
        self.destination_rules = Arc::new(destination_rules);
        true
    }

    /// Replaces the HTTPRoutes (in precedence order); returns whether the snapshot changed.
    pub fn set_http_routes(&mut self, http_routes: Vec<gateway::Route>) -> bool {
        if *self.http_routes == http_routes {
            return false;
        }
        self.http_routes = Arc::new(http_routes);
        true
    }

    /// Replaces the set of Gateways; returns whether the snapshot changed.
    pub fn set_gateways(&mut self, gateways: BTreeSet<Id>) -> bool {
        if *self.gateways == gateways {
            return false;
        }
        self.gateways = Arc::new(gateways);
        true
    }
}

/// A Service and its endpoints (from its EndpointSlice).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Service {
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    /// Labelled [`UNSERVED`]: no implementation serves HTTPRoutes attached to this Service (a cluster
    /// whose Gateway API implementation is a north-south gateway only): they are neither applied nor
    /// given a status, and requests to it go straight to its endpoints.
    pub unserved: bool,
}

/// The Service label (value `off`) that takes a Service out of the mesh's Gateway API (GAMMA) support.
pub const UNSERVED: &str = "kubesim.turnout.dev/gamma";

#[derive(Clone, Debug, PartialEq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    /// `targetPort` when it is a number.
    pub target: Option<u16>,
    /// The pods' port for this Service port, from the EndpointSlice (resolves named target ports).
    pub endpoint_port: Option<u16>,
}

impl ServicePort {
    /// The port on the pods.
    pub fn pod_port(&self) -> u16 {
        self.endpoint_port.or(self.target).unwrap_or(self.port)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    /// The pod (the endpoint's `targetRef`), in the Service's namespace.
    pub pod: String,
    pub ip: IpAddr,
    /// `conditions.ready`: only ready endpoints get traffic, as Envoy receives only healthy ones.
    pub ready: bool,
}

/// What routing and telemetry need of a pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pod {
    pub labels: BTreeMap<String, String>,
    /// The owning Deployment (or the pod's own name), as Istio's `destination_workload`.
    pub workload: String,
    /// Where the simulated pod really listens, by declared port (the pod IP and port, unless that
    /// address was taken by another process and a free port on the pod IP was used instead).
    pub listeners: BTreeMap<u16, SocketAddr>,
}

impl Pod {
    /// Istio's `destination_version`: the `version` label (or `app.kubernetes.io/version`), else "unknown".
    pub fn version(&self) -> &str {
        self.labels
            .get("version")
            .or_else(|| self.labels.get("app.kubernetes.io/version"))
            .map_or("unknown", String::as_str)
    }

    /// Istio's `destination_app`: the `app` label (or `app.kubernetes.io/name`), else "unknown".
    pub fn app(&self) -> &str {
        self.labels
            .get("app")
            .or_else(|| self.labels.get("app.kubernetes.io/name"))
            .map_or("unknown", String::as_str)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct VirtualService {
    pub namespace: String,
    pub name: String,
    /// Normalised (see [`normalize_host`]).
    pub hosts: Vec<String>,
    /// False when `gateways` is set without `mesh`: the rule is for gateways only, not for sidecars.
    pub applies_to_mesh: bool,
    pub http: Vec<HttpRoute>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// Any of them (none: everything).
    pub matches: Vec<MatchRequest>,
    pub route: Vec<WeightedDestination>,
    /// The route's `timeout`.
    pub timeout: Option<Duration>,
    /// The route's `headers` (applied after those of the chosen destination).
    pub headers: Headers,
    /// `mirror` (with `mirrorPercentage`) and every `mirrors` entry, in that order.
    pub mirrors: Vec<Mirror>,
}

/// Where copies of a route's requests go, and which share of them.
#[derive(Clone, Debug, PartialEq)]
pub struct Mirror {
    /// Host (normalised relative to the VirtualService's namespace), subset and port; no weight.
    pub destination: WeightedDestination,
    /// The share of requests mirrored, in percent (0–100).
    pub percent: f64,
}

/// One `match` entry: all of its conditions must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MatchRequest {
    pub uri: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub port: Option<u16>,
    pub headers: Vec<(String, StringMatch)>,
    pub without_headers: Vec<(String, StringMatch)>,
    pub query_params: Vec<(String, StringMatch)>,
    pub ignore_uri_case: bool,
    /// A condition kubesim cannot meet (e.g. `sourceLabels`: requests enter from outside any pod) or an
    /// invalid one: the entry never matches.
    pub unsatisfiable: Option<String>,
}

/// Istio's StringMatch.
#[derive(Clone, Debug, PartialEq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(Pattern),
    /// `{}`: present, whatever the value.
    Present,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Regex(p) => p.is_match(value),
            StringMatch::Present => true,
        }
    }

    fn lowercase(&self) -> Self {
        match self {
            StringMatch::Exact(s) => StringMatch::Exact(s.to_lowercase()),
            StringMatch::Prefix(s) => StringMatch::Prefix(s.to_lowercase()),
            other => other.clone(),
        }
    }

    /// As with `ignoreUriCase`: exact and prefix compare case-insensitively.
    pub fn matches_ignoring_case(&self, value: &str) -> bool {
        self.lowercase().matches(&value.to_lowercase())
    }
}

/// A regular expression matching whole strings (Envoy's `safe_regex`, RE2 syntax).
#[derive(Clone, Debug)]
pub struct Pattern(regex::Regex);

impl Pattern {
    /// # Errors
    ///
    /// An invalid expression.
    pub fn new(expression: &str) -> Result<Self, regex::Error> {
        regex::Regex::new(&format!("^(?:{expression})$")).map(Self)
    }

    /// Whether the whole of `value` matches.
    pub fn is_match(&self, value: &str) -> bool {
        self.0.is_match(value)
    }

    /// The expression (anchored).
    pub fn source(&self) -> &str {
        self.0.as_str()
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct WeightedDestination {
    /// Normalised relative to the VirtualService's namespace.
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    /// `None` when absent.
    pub weight: Option<u32>,
    /// The destination's `headers` (applied before those of the route).
    pub headers: Headers,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DestinationRule {
    pub namespace: String,
    pub name: String,
    /// Normalised relative to the DestinationRule's namespace.
    pub host: String,
    /// Subset name → labels the pods must carry.
    pub subsets: BTreeMap<String, BTreeMap<String, String>>,
}

/// A host as a comparable name: `podinfo` (relative to `namespace`), `podinfo.test` and `podinfo.test.svc`
/// all become `podinfo.test.svc.cluster.local`; other names are kept (lowercase, no trailing dot).
/// Wildcards keep their `*`: `*.test` becomes `*.test.svc.cluster.local`.
pub fn normalize_host(host: &str, namespace: &str) -> String {
    let h = host.trim().trim_end_matches('.').to_ascii_lowercase();
    if h == "*" || h.ends_with(&format!(".{CLUSTER_SUFFIX}")) {
        return h;
    }
    match h.matches('.').count() {
        0 if namespace.is_empty() => h,
        0 => format!("{h}.{namespace}.{CLUSTER_SUFFIX}"),
        1 => format!("{h}.{CLUSTER_SUFFIX}"),
        2 if h.ends_with(".svc") => format!("{h}.cluster.local"),
        _ => h,
    }
}

/// The Service (namespace, name) a normalised host names, if it has the Service form.
pub fn service_of(fqdn: &str) -> Option<Id> {
    let prefix = fqdn.strip_suffix(CLUSTER_SUFFIX)?.strip_suffix('.')?;
    let (name, namespace) = prefix.split_once('.')?;
    (!name.is_empty() && !namespace.is_empty() && !namespace.contains('.') && !name.starts_with('*'))
        .then(|| (namespace.to_owned(), name.to_owned()))
}

/// Whether a (normalised) rule host covers a (normalised) request host.
pub fn host_matches(rule: &str, host: &str) -> bool {
    match rule.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => host.ends_with(suffix),
        None => rule == host,
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

fn port_of(v: &Value) -> Option<u16> {
    v.as_u64().and_then(|n| u16::try_from(n).ok())
}

fn labels_of(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// A Service object's ports; the endpoints come from its slice (see [`with_slice`]).
pub fn service(object: &Value) -> Service {
    let ports = object["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(ServicePort {
                name: str_of(p, "name").to_owned(),
                port: port_of(&p["port"])?,
                target: port_of(&p["targetPort"]),
                endpoint_port: None,
            })
        })
        .collect();
    Service {
        ports,
        endpoints: Vec::new(),
        unserved: object["metadata"]["labels"][UNSERVED].as_str() == Some("off"),
    }
}

/// Adds an EndpointSlice's endpoints and ports to its Service.
pub fn with_slice(service: &mut Service, slice: &Value) {
    for p in slice["ports"].as_array().into_iter().flatten() {
        let name = str_of(p, "name");
        if let Some(sp) = service.ports.iter_mut().find(|sp| sp.name == name) {
            sp.endpoint_port = port_of(&p["port"]).or(sp.endpoint_port);
        }
    }
    for e in slice["endpoints"].as_array().into_iter().flatten() {
        let pod = match &e["targetRef"] {
            r if r["kind"] == "Pod" || r["kind"].is_null() => str_of(r, "name").to_owned(),
            _ => String::new(),
        };
        for ip in e["addresses"].as_array().into_iter().flatten() {
            if let Some(ip) = ip.as_str().and_then(|s| s.parse().ok()) {
                service.endpoints.push(Endpoint {
                    pod: pod.clone(),
                    ip,
                    // Absent means ready (EndpointSlice API), as for `serving`.
                    ready: e["conditions"]["ready"].as_bool().unwrap_or(true),
                });
            }
        }
    }
}

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label).
pub fn slice_service(slice: &Value) -> Option<&str> {
    slice["metadata"]["labels"]["kubernetes.io/service-name"].as_str()
}

/// A pod's routing and telemetry data; `workload` and `listeners` are found elsewhere.
pub fn pod(object: &Value, workload: String, listeners: BTreeMap<u16, SocketAddr>) -> Pod {
    Pod {
        labels: labels_of(&object["metadata"]["labels"]),
        workload,
        listeners,
    }
}

/// The workload Istio reports for a pod: the Deployment owning its ReplicaSet, else the controller that
/// owns it, else the pod itself. `replica_set` looks a ReplicaSet up by name in the pod's namespace.
pub fn workload_of(pod: &Value, replica_set: impl Fn(&str) -> Option<std::sync::Arc<Value>>) -> String {
    let controller = |o: &Value| -> Option<(String, String)> {
        o["metadata"]["ownerReferences"]
            .as_array()?
            .iter()
            .find(|r| r["controller"] == true)
            .map(|r| (str_of(r, "kind").to_owned(), str_of(r, "name").to_owned()))
    };
    match controller(pod) {
        Some((kind, rs)) if kind == "ReplicaSet" => {
            if let Some(owner) = replica_set(&rs).and_then(|o| controller(&o)) {
                return owner.1;
            }
            // The ReplicaSet is gone: strip its pod-template-hash suffix, as Istio's injector does.
            let hash = str_of(&pod["metadata"]["labels"], "pod-template-hash");
            match rs.strip_suffix(hash).and_then(|s| s.strip_suffix('-')) {
                Some(deployment) if !hash.is_empty() => deployment.to_owned(),
                _ => rs,
            }
        }
        Some((_, owner)) => owner,
        None => str_of(&pod["metadata"], "name").to_owned(),
    }
}

/// A StringMatch object; `Err` for an invalid regex or an unknown form.
fn string_match(v: &Value) -> Result<StringMatch, String> {
    let Some(m) = v.as_object() else {
        return Err(format!("not a StringMatch: {v}"));
    };
    if let Some(s) = m.get("exact").and_then(Value::as_str) {
        Ok(StringMatch::Exact(s.to_owned()))
    } else if let Some(s) = m.get("prefix").and_then(Value::as_str) {
        Ok(StringMatch::Prefix(s.to_owned()))
    } else if let Some(s) = m.get("regex").and_then(Value::as_str) {
        Pattern::new(s)
            .map(StringMatch::Regex)
            .map_err(|e| format!("invalid regex {s:?}: {e}"))
    } else if m.is_empty() {
        Ok(StringMatch::Present)
    } else {
        Err(format!("unsupported StringMatch {v}"))
    }
}

fn match_map(v: &Value, lowercase_keys: bool) -> Result<Vec<(String, StringMatch)>, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .map(|(k, m)| {
            let key = if lowercase_keys {
                k.to_ascii_lowercase()
            } else {
                k.clone()
            };
            string_match(m).map(|m| (key, m))
        })
        .collect()
}

fn match_request(v: &Value) -> MatchRequest {
    let mut m = MatchRequest {
        ignore_uri_case: v["ignoreUriCase"].as_bool().unwrap_or(false),
        port: port_of(&v["port"]),
        ..MatchRequest::default()
    };
    let mut problems = Vec::new();
    let mut one = |key: &str| -> Option<StringMatch> {
        let field = v.get(key).filter(|f| !f.is_null())?;
        string_match(field)
            .map_err(|e| problems.push(format!("{key}: {e}")))
            .ok()
    };
    m.uri = one("uri");
    m.method = one("method");
    m.authority = one("authority");
    m.scheme = one("scheme");
    for (key, target, lower) in [
        ("headers", &mut m.headers, true),
        ("withoutHeaders", &mut m.without_headers, true),
        ("queryParams", &mut m.query_params, false),
    ] {
        match match_map(&v[key], lower) {
            Ok(list) => *target = list,
            Err(e) => problems.push(format!("{key}: {e}")),
        }
    }
    if v["sourceLabels"].as_object().is_some_and(|l| !l.is_empty()) {
        problems.push("sourceLabels: requests enter the kubesim mesh from outside any pod".into());
    }
    if v["sourceNamespace"].as_str().is_some_and(|s| !s.is_empty()) {
        problems.push("sourceNamespace: requests enter the kubesim mesh from outside any namespace".into());
    }
    if let Some(gateways) = v["gateways"].as_array()
        && !gateways.is_empty()
        && !gateways.iter().any(|g| g == "mesh")
    {
        problems.push("gateways: only for gateways, not for sidecars".into());
    }
    if !problems.is_empty() {
        m.unsatisfiable = Some(problems.join("; "));
    }
    m
}

/// `1s`, `500ms`, `1.5s`, `2m`, `1h` (protobuf Duration as Istio accepts it).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        return None;
    };
    let n: f64 = number.parse().ok()?;
    (n.is_finite() && n >= 0.0).then(|| Duration::from_secs_f64(n * scale))
}

/// An Istio `Destination` (host relative to `namespace`, subset, port), without weight or headers.
fn destination(d: &Value, namespace: &str) -> WeightedDestination {
    WeightedDestination {
        host: normalize_host(str_of(d, "host"), namespace),
        subset: d["subset"].as_str().filter(|s| !s.is_empty()).map(str::to_owned),
        port: port_of(&d["port"]["number"]),
        ..WeightedDestination::default()
    }
}

/// An `http` route's mirrors: `mirror`, its share from `mirrorPercentage` (else the deprecated
/// `mirrorPercent` / `mirror_percent`, else 100 %; an explicit 0 mirrors nothing), then each `mirrors`
/// entry (its `percentage`, else 100 %). Istio configures both fields when both are set, and so does
/// kubesim.
fn mirrors(r: &Value, namespace: &str) -> Vec<Mirror> {
    let mut out = Vec::new();
    if r["mirror"].is_object() {
        let percent = if r["mirrorPercentage"].is_object() {
            headers::istio_percent(&r["mirrorPercentage"])
        } else {
            r["mirrorPercent"]
                .as_f64()
                .or_else(|| r["mirror_percent"].as_f64())
                .map_or(100.0, headers::clamp_percent)
        };
        out.push(Mirror {
            destination: destination(&r["mirror"], namespace),
            percent,
        });
    }
    for m in r["mirrors"].as_array().into_iter().flatten() {
        let percent = if m["percentage"].is_object() {
            headers::istio_percent(&m["percentage"])
        } else {
            100.0
        };
        out.push(Mirror {
            destination: destination(&m["destination"], namespace),
            percent,
        });
    }
    out
}

/// A VirtualService object.
pub fn virtual_service(object: &Value) -> VirtualService {
    let namespace = str_of(&object["metadata"], "namespace").to_owned();
    let spec = &object["spec"];
    let applies_to_mesh = match spec["gateways"].as_array() {
        Some(g) if !g.is_empty() => g.iter().any(|g| g == "mesh"),
        _ => true,
    };
    let http = spec["http"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| HttpRoute {
            name: r["name"].as_str().map(str::to_owned),
            matches: r["match"].as_array().into_iter().flatten().map(match_request).collect(),
            route: r["route"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| WeightedDestination {
                    weight: d["weight"].as_u64().map(|w| u32::try_from(w).unwrap_or(u32::MAX)),
                    headers: Headers::of_istio(&d["headers"]),
                    ..destination(&d["destination"], &namespace)
                })
                .collect(),
            timeout: r["timeout"].as_str().and_then(parse_duration),
            headers: Headers::of_istio(&r["headers"]),
            mirrors: mirrors(r, &namespace),
        })
        .collect();
    VirtualService {
        hosts: spec["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|h| normalize_host(h, &namespace))
            .collect(),
        name: str_of(&object["metadata"], "name").to_owned(),
        namespace,
        applies_to_mesh,
        http,
    }
}

/// A DestinationRule object.
pub fn destination_rule(object: &Value) -> DestinationRule {
    let namespace = str_of(&object["metadata"], "namespace").to_owned();
    DestinationRule {
        host: normalize_host(str_of(&object["spec"], "host"), &namespace),
        subsets: object["spec"]["subsets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| (str_of(s, "name").to_owned(), labels_of(&s["labels"])))
            .collect(),
        name: str_of(&object["metadata"], "name").to_owned(),
        namespace,
    }
}

/// The order Istio resolves conflicting rules in: oldest first, then namespace, then name.
pub fn precedence(object: &Value) -> (String, String, String) {
    let meta = &object["metadata"];
    (
        str_of(meta, "creationTimestamp").to_owned(),
        str_of(meta, "namespace").to_owned(),
        str_of(meta, "name").to_owned(),
    )
}

/// The inputs of a snapshot: API objects as the mesh controller holds them.
#[derive(Default)]
pub struct Objects<'a> {
    pub services: Vec<&'a Value>,
    pub slices: Vec<&'a Value>,
    /// Each pod with its workload and listeners.
    pub pods: Vec<(&'a Value, String, BTreeMap<u16, SocketAddr>)>,
    pub virtual_services: Vec<&'a Value>,
    pub destination_rules: Vec<&'a Value>,
    pub http_routes: Vec<&'a Value>,
    pub gateways: Vec<&'a Value>,
}

/// A Service object with its EndpointSlices (those labelled with its name, in its namespace), in the
/// order of their names.
pub fn service_with_slices<'a>(object: &Value, slices: impl IntoIterator<Item = &'a Value>) -> Service {
    let mut service = service(object);
    for slice in slices {
        with_slice(&mut service, slice);
    }
    service
}

/// VirtualService objects, parsed, in precedence order.
pub fn virtual_services(mut objects: Vec<&Value>) -> Vec<VirtualService> {
    objects.sort_by_key(|o| precedence(o));
    objects.into_iter().map(virtual_service).collect()
}

/// DestinationRule objects, parsed, in precedence order.
pub fn destination_rules(mut objects: Vec<&Value>) -> Vec<DestinationRule> {
    objects.sort_by_key(|o| precedence(o));
    objects.into_iter().map(destination_rule).collect()
}

/// The snapshot of a set of objects.
pub fn build(objects: Objects<'_>) -> Snapshot {
    let id = |o: &Value| -> Id {
        (
            str_of(&o["metadata"], "namespace").to_owned(),
            str_of(&o["metadata"], "name").to_owned(),
        )
    };
    let mut slices: BTreeMap<Id, Vec<(String, &Value)>> = BTreeMap::new();
    for slice in objects.slices {
        let (namespace, name) = id(slice);
        if let Some(service) = slice_service(slice) {
            slices
                .entry((namespace, service.to_owned()))
                .or_default()
                .push((name, slice));
        }
    }
    let mut snapshot = Snapshot::default();
    for object in objects.services {
        let id = id(object);
        let mut own = slices.remove(&id).unwrap_or_default();
        own.sort_by(|a, b| a.0.cmp(&b.0));
        snapshot.set_service(&id, Some(service_with_slices(object, own.into_iter().map(|(_, s)| s))));
    }
    for (object, workload, listeners) in objects.pods {
        snapshot.set_pod(&id(object), Some(pod(object, workload, listeners)));
    }
    snapshot.set_virtual_services(virtual_services(objects.virtual_services));
    snapshot.set_destination_rules(destination_rules(objects.destination_rules));
    snapshot.set_http_routes(gateway::routes(objects.http_routes));
    snapshot.set_gateways(gateway::gateways(objects.gateways));
    snapshot
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hosts_in_every_service_form_normalise_to_the_same_name() {
        for h in [
            "podinfo",
            "podinfo.test",
            "podinfo.test.svc",
            "podinfo.test.svc.cluster.local",
            "PodInfo.Test.",
        ] {
            assert_eq!(normalize_host(h, "test"), "podinfo.test.svc.cluster.local", "{h}");
        }
        assert_eq!(normalize_host("podinfo", ""), "podinfo");
        assert_eq!(normalize_host("api.example.com", "test"), "api.example.com");
        assert_eq!(normalize_host("*.test", "x"), "*.test.svc.cluster.local");
        assert_eq!(
            service_of("podinfo.test.svc.cluster.local"),
            Some(("test".into(), "podinfo".into()))
        );
        assert_eq!(service_of("api.example.com"), None);
        assert!(host_matches(
            "*.test.svc.cluster.local",
            "podinfo.test.svc.cluster.local"
        ));
        assert!(host_matches("*", "anything"));
        assert!(!host_matches(
            "*.prod.svc.cluster.local",
            "podinfo.test.svc.cluster.local"
        ));
    }

    #[test]
    fn the_workload_is_the_deployment_that_owns_the_replica_set() {
        let pod = json!({"metadata": {"name": "podinfo-v2-abc-x", "labels": {"pod-template-hash": "abc"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "podinfo-v2-abc", "controller": true}]}});
        let rs = std::sync::Arc::new(json!({"metadata": {"ownerReferences": [
            {"kind": "Deployment", "name": "podinfo-v2", "controller": true}]}}));
        assert_eq!(workload_of(&pod, |_| Some(rs.clone())), "podinfo-v2");
        assert_eq!(workload_of(&pod, |_| None), "podinfo-v2");
        let bare = json!({"metadata": {"name": "debug"}});
        assert_eq!(workload_of(&bare, |_| None), "debug");
    }

    #[test]
    fn durations_parse_as_istio_writes_them() {
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("soon"), None);
    }

    #[test]
    fn matches_with_conditions_kubesim_cannot_meet_never_match() {
        let vs = virtual_service(&json!({"metadata": {"name": "a", "namespace": "test"}, "spec": {
            "hosts": ["podinfo"],
            "http": [{"match": [{"sourceLabels": {"app": "x"}}, {"uri": {"regex": "("}}, {"uri": {"prefix": "/"}}],
                      "route": [{"destination": {"host": "podinfo", "subset": "v1"}, "weight": 100}]}]}}));
        let m = &vs.http[0].matches;
        assert!(m[0].unsatisfiable.is_some());
        assert!(m[1].unsatisfiable.is_some());
        assert!(m[2].unsatisfiable.is_none());
        assert_eq!(vs.http[0].route[0].host, "podinfo.test.svc.cluster.local");
        assert_eq!(vs.http[0].route[0].weight, Some(100));
    }
}
