//! The routing layer as the release machine sees it: who gets what share of a Service's requests, in
//! terms that do not depend on how the traffic is routed. A *provider* (`agent::routing`) turns these
//! into its own objects and reads back whether a change has propagated:
//!
//! | provider      | a [`Backend`] is                                   | the [`Route`] is                  |
//! |---------------|----------------------------------------------------|-----------------------------------|
//! | `istio`       | a DestinationRule subset (`pod-template-hash`)     | the VirtualService's weights      |
//! | `gateway-api` | a per-version Service (`pod-template-hash`)        | the HTTPRoute's `backendRefs`     |
//! | `none`        | —                                                  | the candidate's share of the pods |
//!
//! Without a mesh (`none`) the Service spreads requests over its ready pods, so there is no route to
//! write: a step scales the candidate to about its weight's share of the pods, the stable side kept
//! at its size (I5), and the plan's route writes become candidate scalings (`Action::ScaleCandidate`).
//! Every candidate is *held*: made with a label the Service selects withheld from its pods, which
//! turnout puts on as the weight says (all of a blue/green candidate's pods at the switch: none on
//! standby) and takes off again before they stop, so they drain out of the endpoints first.
//!
//! The invariants (DESIGN §5) are kept by the plan once for every provider: a backend is defined and
//! propagated before a route names it (I1), a route names only defined backends with weights summing
//! to 100 (I4), and a backend leaves only once no route has named it for the propagation delay and
//! the drain window (I2). A provider that cannot do what a release asks says so ([`Caps`],
//! [`Observed::routing_unavailable`](super::Observed)) and the release fails with the reason — never a
//! silent no-op.

use super::Millis;

/// How a release moves traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    /// Istio VirtualService and DestinationRule subsets (sidecar meshes).
    #[default]
    Istio,
    /// Gateway API HTTPRoute with per-version Services (ambient waypoints, Linkerd, any gateway).
    GatewayApi,
    /// No mesh: the traffic share is the candidate's share of the Service's ready pods.
    None,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 3] = [ProviderKind::Istio, ProviderKind::GatewayApi, ProviderKind::None];

    /// The value of `turnout.dev/provider`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Istio => "istio",
            ProviderKind::GatewayApi => "gateway-api",
            ProviderKind::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<ProviderKind> {
        ProviderKind::ALL.into_iter().find(|p| p.as_str() == s.trim())
    }

    /// What the provider can do.
    pub fn caps(self) -> Caps {
        match self {
            ProviderKind::Istio | ProviderKind::GatewayApi => Caps {
                weights: true,
                matches: true,
                mirror: true,
            },
            ProviderKind::None => Caps {
                weights: false,
                matches: false,
                mirror: false,
            },
        }
    }

    /// The kinds of the objects the provider writes, for messages.
    pub fn objects(self) -> &'static str {
        match self {
            ProviderKind::Istio => "VirtualService and DestinationRule",
            ProviderKind::GatewayApi => "HTTPRoute and per-version Services",
            ProviderKind::None => "candidate replica counts",
        }
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a provider can express.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Weighted splits between backends (else the share is set by replica counts).
    pub weights: bool,
    /// Requests sent to one backend by their headers and query parameters.
    pub matches: bool,
    /// A share of the requests copied to one backend, the answers dropped.
    pub mirror: bool,
}

/// Without a mesh: the candidate's replicas for canary `weight` next to `stable` replicas, so that its
/// share of the ready pods, `c / (c + stable)`, is the nearest to the weight (at least one pod for any
/// weight above 0; the stable side's size at 100).
pub fn candidate_replicas(stable: i32, weight: u8) -> i32 {
    let n = stable.max(1);
    match weight {
        0 => 0,
        100.. => n,
        w => {
            let exact = f64::from(w) * f64::from(n) / f64::from(100 - w);
            // At most a few hundred replicas: the conversion is exact.
            #[allow(clippy::cast_possible_truncation)]
            let c = exact.round() as i32;
            c.clamp(1, n)
        }
    }
}

/// A set of pods a route can name: one ReplicaSet, by its `pod-template-hash`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backend {
    /// Its name in the route: `v<N>` (a revision of the Deployment) or `v<N>-canary` (a candidate).
    pub name: String,
    pub hash: String,
}

/// Where a host's traffic goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// To the plain Service, every ready pod it selects (the state at rest).
    Host,
    /// To backends: the requests that match to one of them, the rest by weights summing to 100.
    Split(Split),
}

impl Route {
    /// A split by weights alone.
    pub fn weights(weights: Vec<Weighted>) -> Route {
        Route::Split(Split {
            weights,
            matched: None,
            mirror: None,
            sticky: None,
        })
    }

    /// Weight the route gives to `backend` (requests that match a condition aside).
    pub fn weight_of(&self, backend: &str) -> u8 {
        match self {
            Route::Host => 0,
            Route::Split(split) => split
                .weights
                .iter()
                .filter(|p| p.backend == backend)
                .map(|p| p.weight)
                .sum(),
        }
    }

    /// Backends the route names: by weight, for the requests that match, or as the mirror.
    pub fn backends(&self) -> impl Iterator<Item = &str> {
        let (parts, matched, mirror, sticky): (&[Weighted], _, _, _) = match self {
            Route::Host => (&[], None, None, None),
            Route::Split(split) => (
                &split.weights,
                split.matched.as_ref(),
                split.mirror.as_ref(),
                split.sticky.as_ref(),
            ),
        };
        parts
            .iter()
            .map(|p| p.backend.as_str())
            .chain(matched.map(|m| m.backend.as_str()))
            .chain(mirror.map(|m| m.backend.as_str()))
            .chain(sticky.map(|s| s.backend.as_str()))
    }

    /// Whether the route sends requests to `backend`: by weight, those that match or carry its
    /// cookie, or copies.
    pub fn sends_to(&self, backend: &str) -> bool {
        self.weight_of(backend) > 0
            || self.matched_backend() == Some(backend)
            || self.mirror_backend() == Some(backend)
            || matches!(self, Route::Split(Split { sticky: Some(s), .. }) if s.backend == backend)
    }

    /// The backend that gets copies of the requests, if the route mirrors.
    pub fn mirror_backend(&self) -> Option<&str> {
        match self {
            Route::Split(Split { mirror: Some(m), .. }) => Some(&m.backend),
            _ => None,
        }
    }

    /// The backend the requests matching a condition go to, if the route has one.
    pub fn matched_backend(&self) -> Option<&str> {
        match self {
            Route::Split(Split { matched: Some(m), .. }) => Some(&m.backend),
            _ => None,
        }
    }
}

/// A split route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// Where the requests go that do not match (all of them without `matched`).
    pub weights: Vec<Weighted>,
    /// Requests matching a condition go to one backend whatever the weights (an A/B test, a canary's
    /// early users).
    pub matched: Option<Matched>,
    /// A share of the requests the weights route is copied to one backend, its answers dropped.
    pub mirror: Option<Mirror>,
    /// Session affinity: the backend's answers set a cookie, and requests that carry it go to the
    /// backend whatever the weights.
    pub sticky: Option<Sticky>,
}

/// Answers of `backend` set the cookie `cookie=<backend>`; requests carrying it go to `backend`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sticky {
    pub cookie: String,
    pub backend: String,
}

impl Sticky {
    /// The `Set-Cookie` value of the backend's answers (a session cookie for the whole site).
    pub fn set_cookie(&self) -> String {
        format!("{}={}; Path=/", self.cookie, self.backend)
    }

    /// The `cookie` header of a request that carries it (RE2, matching the whole value).
    pub fn cookie_regex(&self) -> String {
        format!(
            r"^(.*?;\s*)?{}={}(;.*)?$",
            regex::escape(&self.cookie),
            regex::escape(&self.backend)
        )
    }

    /// The affinity a `Set-Cookie` value of [`Sticky::set_cookie`] stands for.
    pub fn from_set_cookie(value: &str) -> Option<Sticky> {
        let pair = value.split(';').next()?;
        let (cookie, backend) = pair.split_once('=')?;
        Some(Sticky {
            cookie: cookie.trim().to_owned(),
            backend: backend.trim().to_owned(),
        })
    }
}

/// Whether `name` can be a cookie's name (an HTTP token).
pub fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Copies of `percent` % of the requests go to `backend`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub backend: String,
    pub percent: u8,
}

/// Requests that match go to `backend`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matched {
    /// Any one of them (each a set of conditions that must all hold).
    pub matches: Vec<RequestMatch>,
    pub backend: String,
}

/// Conditions on a request that must all hold, in the shape of the Gateway API's `HTTPRouteMatch`
/// (headers and query parameters; a cookie is a header match on `cookie`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatch>,
}

/// One header or query parameter and the value it must have.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    pub name: String,
    pub value: String,
    #[serde(default, rename = "type")]
    pub kind: MatchKind,
}

/// How a value is compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub enum MatchKind {
    /// The whole value, exactly.
    #[default]
    Exact,
    /// A regular expression that must match the whole value (RE2 syntax, as Envoy reads it).
    RegularExpression,
}

/// Parses `turnout.dev/match`: a JSON list of matches in the Gateway API `HTTPRouteMatch` shape, e.g.
/// `[{"headers":[{"name":"x-user-group","value":"beta"}]}]`.
///
/// # Errors
///
/// Not such a list, an empty list or match, an empty name, or a regular expression that does not
/// compile.
pub fn parse_matches(value: &str) -> Result<Vec<RequestMatch>, String> {
    let mut matches: Vec<RequestMatch> = serde_json::from_str(value).map_err(|e| {
        format!(
            r#"not a JSON list of matches like [{{"headers":[{{"name":"x-user-group","value":"beta"}}]}}] (only headers and queryParams, type Exact or RegularExpression): {e}"#
        )
    })?;
    if matches.is_empty() {
        return Err("the list of matches is empty".into());
    }
    for m in &mut matches {
        if m.headers.is_empty() && m.query_params.is_empty() {
            return Err("a match without headers or queryParams would match every request".into());
        }
        // Header names are case-insensitive (Istio takes them in lower case); one order for all, so a
        // route reads back as it was written.
        for h in &mut m.headers {
            h.name = h.name.trim().to_ascii_lowercase();
        }
        m.headers.sort_by(|a, b| a.name.cmp(&b.name));
        m.query_params.sort_by(|a, b| a.name.cmp(&b.name));
        for list in [&m.headers, &m.query_params] {
            if let Some(twice) = list.windows(2).find(|w| w[0].name == w[1].name) {
                return Err(format!("{} is named twice in one match", twice[0].name));
            }
        }
        for v in m.headers.iter().chain(&m.query_params) {
            if v.name.trim().is_empty() {
                return Err("a header or query parameter without a name".into());
            }
            if v.kind == MatchKind::RegularExpression {
                regex::Regex::new(&v.value).map_err(|e| format!("{:?} is not a regular expression: {e}", v.value))?;
            }
        }
    }
    Ok(matches)
}

/// The matches as people read them: `x-user-group=beta`, `cookie~^.*beta.*$`, `?tier=gold`; `or`
/// between matches, `,` between the conditions of one.
pub fn describe_matches(matches: &[RequestMatch]) -> String {
    let one = |m: &RequestMatch| {
        let op = |v: &ValueMatch| if v.kind == MatchKind::Exact { "=" } else { "~" };
        m.headers
            .iter()
            .map(|v| format!("{}{}{}", v.name, op(v), v.value))
            .chain(
                m.query_params
                    .iter()
                    .map(|v| format!("?{}{}{}", v.name, op(v), v.value)),
            )
            .collect::<Vec<_>>()
            .join(",")
    };
    matches.iter().map(one).collect::<Vec<_>>().join(" or ")
}

/// One destination of a split route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Weighted {
    pub backend: String,
    pub weight: u8,
}

/// Whether the implementation reports a change as propagated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Synced {
    /// Reported applied for the current generation (Istio `Reconciled`; HTTPRoute `Accepted` and
    /// `ResolvedRefs` on every parent).
    Reported,
    /// Known not to be usable yet (a per-version Service without ready endpoints): nothing may name it.
    NotYet,
    /// Nothing reported: the propagation delay bounds it.
    Unknown,
}

/// A routing object's value, when it last changed, and whether that change is reported propagated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied<T> {
    pub value: T,
    pub changed_at: Millis,
    pub synced: Synced,
}

impl<T> Applied<T> {
    /// When the last change reached every proxy: reported, or bounded by the delay `prop`;
    /// [`Millis::MAX`] while it cannot be used.
    pub fn propagated(&self, prop: Millis) -> Millis {
        match self.synced {
            Synced::Reported => self.changed_at,
            Synced::Unknown => self.changed_at.saturating_add(prop),
            Synced::NotYet => Millis::MAX,
        }
    }
}

/// A routing object for a host, as far as turnout may touch it.
#[derive(Clone, Debug, PartialEq)]
pub enum Managed<T> {
    /// None exists: turnout creates one when it needs it.
    Absent,
    /// turnout manages it.
    Ours(T),
    /// Someone else's: left untouched, and the release cannot route.
    Foreign { kind: &'static str, name: String },
}

/// Routing for one Service that selects the Deployment's pods.
#[derive(Clone, Debug, PartialEq)]
pub struct HostRouting {
    /// The Service's name; the routing objects are named after it.
    pub service: String,
    /// The backends defined for the host.
    pub backends: Managed<Applied<Vec<Backend>>>,
    /// The route of the host.
    pub route: Managed<Applied<Route>>,
    /// The route must exist even at rest: a gateway routes only what a route names (a route on the
    /// Service itself, or a mesh's default, routes to every pod without one).
    pub route_at_rest: bool,
}

impl HostRouting {
    /// A host with no routing object yet.
    pub fn absent(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            backends: Managed::Absent,
            route: Managed::Absent,
            route_at_rest: false,
        }
    }
}

/// A routing write.
#[derive(Clone, Debug, PartialEq)]
pub enum RoutingAction {
    /// Define exactly these backends for `hosts[host]` (and stamp the change, even when they are the
    /// same: the plan uses the write as the time the candidate's endpoints went away).
    PutBackends { host: usize, backends: Vec<Backend> },
    /// Route `hosts[host]` this way.
    PutRoute { host: usize, route: Route },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_parse_in_the_gateway_api_shape_and_bad_ones_say_why() {
        let m = parse_matches(
            r#"[{"headers":[{"name":"x-user-group","value":"beta"},{"name":"cookie","value":"^.*canary=1.*$","type":"RegularExpression"}]},
                {"queryParams":[{"name":"tier","value":"gold"}]}]"#,
        )
        .unwrap();
        assert_eq!(m.len(), 2);
        // Sorted by name, so that a route reads back as written.
        assert_eq!(m[0].headers[0].kind, MatchKind::RegularExpression);
        assert_eq!(m[0].headers[1].kind, MatchKind::Exact);
        assert_eq!(
            describe_matches(&m),
            "cookie~^.*canary=1.*$,x-user-group=beta or ?tier=gold"
        );
        for (bad, why) in [
            ("[]", "empty"),
            ("[{}]", "every request"),
            (r#"[{"path":{"value":"/"}}]"#, "only headers and queryParams"),
            (r#"[{"headers":[{"name":"","value":"x"}]}]"#, "without a name"),
            (
                r#"[{"headers":[{"name":"a","value":"(","type":"RegularExpression"}]}]"#,
                "not a regular expression",
            ),
            (
                r#"[{"headers":[{"name":"a","value":"b","type":"Prefix"}]}]"#,
                "Exact or RegularExpression",
            ),
            ("x-user-group: beta", "not a JSON list"),
        ] {
            let e = parse_matches(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_route_names_its_matched_backend_too() {
        let route = Route::Split(Split {
            weights: vec![Weighted {
                backend: "v1".into(),
                weight: 100,
            }],
            matched: Some(Matched {
                matches: vec![RequestMatch::default()],
                backend: "v2-canary".into(),
            }),
            mirror: Some(Mirror {
                backend: "v3-canary".into(),
                percent: 10,
            }),
            sticky: None,
        });
        assert_eq!(route.backends().collect::<Vec<_>>(), ["v1", "v2-canary", "v3-canary"]);
        assert!(route.sends_to("v3-canary") && !route.sends_to("v4-canary"));
        assert_eq!(route.weight_of("v2-canary"), 0);
        assert_eq!(route.matched_backend(), Some("v2-canary"));
    }

    #[test]
    fn a_sticky_backend_sets_its_cookie_and_the_cookie_is_matched_among_others() {
        let sticky = Sticky {
            cookie: "canary".into(),
            backend: "v2-canary".into(),
        };
        assert_eq!(sticky.set_cookie(), "canary=v2-canary; Path=/");
        assert_eq!(Sticky::from_set_cookie(&sticky.set_cookie()), Some(sticky.clone()));
        let re = regex::Regex::new(&sticky.cookie_regex()).unwrap();
        for carries in [
            "canary=v2-canary",
            "a=1; canary=v2-canary",
            "canary=v2-canary; b=2",
            "a=1;canary=v2-canary;b=2",
        ] {
            assert!(re.is_match(carries), "{carries}");
        }
        for not in [
            "canary=v2-canaryx",
            "xcanary=v2-canary",
            "canary=v3-canary",
            "canary=v2Xcanary",
        ] {
            assert!(!re.is_match(not), "{not}");
        }
        assert!(is_cookie_name("turnout-canary") && !is_cookie_name("a b") && !is_cookie_name("a=b"));
    }

    #[test]
    fn a_provider_name_parses_back() {
        for p in ProviderKind::ALL {
            assert_eq!(ProviderKind::parse(p.as_str()), Some(p));
        }
        assert_eq!(ProviderKind::parse(" gateway-api "), Some(ProviderKind::GatewayApi));
        assert_eq!(ProviderKind::parse("linkerd"), None);
    }

    #[test]
    fn without_a_mesh_the_candidate_gets_its_weight_s_share_of_the_pods() {
        assert_eq!(candidate_replicas(4, 0), 0);
        assert_eq!(candidate_replicas(4, 20), 1, "1 of 5 pods");
        assert_eq!(candidate_replicas(4, 50), 4, "half of the pods");
        assert_eq!(candidate_replicas(4, 100), 4, "the stable side's size");
        assert_eq!(candidate_replicas(2, 10), 1, "at least one pod");
        assert_eq!(candidate_replicas(10, 25), 3, "3 of 13 pods, 23 %");
        assert_eq!(candidate_replicas(10, 75), 10, "never above the stable side");
        for n in 1..20 {
            let mut last = 0;
            for w in 0..=100u8 {
                let c = candidate_replicas(n, w);
                assert!(c >= last && c <= n, "monotonic and bounded: n={n} w={w}");
                last = c;
            }
        }
    }

    #[test]
    fn propagation_is_reported_bounded_by_the_delay_or_not_yet() {
        let at = |synced| {
            Applied {
                value: (),
                changed_at: 1_000,
                synced,
            }
            .propagated(500)
        };
        assert_eq!(at(Synced::Reported), 1_000);
        assert_eq!(at(Synced::Unknown), 1_500);
        assert_eq!(at(Synced::NotYet), Millis::MAX);
    }
}
