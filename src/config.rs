//! Release configuration (DESIGN §7): defaults from the agent's flags, overridden by namespace
//! annotations, overridden by Deployment annotations. An invalid value is reported and the value of
//! the level below is used: a typo never wedges a release.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::agent::notify::Severity;
use crate::release::routing::{RequestMatch, parse_matches};
use crate::release::{ProviderKind, Strategy};

/// Annotation keys of the release configuration.
pub mod keys {
    pub const STEPS: &str = "turnout.dev/steps";
    pub const INTERVAL: &str = "turnout.dev/interval";
    pub const THRESHOLD: &str = "turnout.dev/threshold";
    pub const PROGRESS_DEADLINE: &str = "turnout.dev/progress-deadline";
    pub const PROPAGATION_DELAY: &str = "turnout.dev/propagation-delay";
    pub const DRAIN: &str = "turnout.dev/drain";
    pub const SUCCESS_RATE_MIN: &str = "turnout.dev/success-rate-min";
    pub const LATENCY_P99_MAX: &str = "turnout.dev/latency-p99-max";
    pub const PROMETHEUS: &str = "turnout.dev/prometheus";
    pub const NO_DATA: &str = "turnout.dev/no-data";
    pub const HOOK_TIMEOUT: &str = "turnout.dev/hook-timeout";
    pub const HOOK_RETRIES: &str = "turnout.dev/hook-retries";
    pub const PROVIDER: &str = "turnout.dev/provider";
    pub const GATEWAY: &str = "turnout.dev/gateway";
    pub const HOSTNAMES: &str = "turnout.dev/hostnames";
    pub const NOTIFY: &str = "turnout.dev/notify";
    pub const NOTIFY_SEVERITY: &str = "turnout.dev/notify-severity";
    pub const STRATEGY: &str = "turnout.dev/strategy";
    pub const MATCH: &str = "turnout.dev/match";
    pub const ITERATIONS: &str = "turnout.dev/iterations";
    pub const MIRROR: &str = "turnout.dev/mirror";
    pub const SESSION_AFFINITY: &str = "turnout.dev/session-affinity";

    /// Every key, for documentation and for tests that keep the docs in step with the code.
    pub const ALL: [&str; 22] = [
        STEPS,
        INTERVAL,
        THRESHOLD,
        PROGRESS_DEADLINE,
        PROPAGATION_DELAY,
        DRAIN,
        SUCCESS_RATE_MIN,
        LATENCY_P99_MAX,
        PROMETHEUS,
        NO_DATA,
        HOOK_TIMEOUT,
        HOOK_RETRIES,
        PROVIDER,
        GATEWAY,
        HOSTNAMES,
        NOTIFY,
        NOTIFY_SEVERITY,
        STRATEGY,
        MATCH,
        ITERATIONS,
        MIRROR,
        SESSION_AFFINITY,
    ];
}

/// The HTTP hooks a release calls (`hook.turnout.dev/<kind>: <URL>`, or `--hook <kind>=<URL>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HookKind {
    /// A gate before any traffic reaches the candidate.
    PreRollout,
    /// Called at each step's analysis (to drive a load test, say); a gate like any check.
    Rollout,
    /// A gate before the candidate gets 100 %.
    ConfirmPromotion,
    /// Told when a release succeeded.
    PostRollout,
    /// Told when a release is rolled back.
    Rollback,
    /// Told of every Event turnout records (chat notifications).
    Event,
}

impl HookKind {
    pub const ALL: [HookKind; 6] = [
        HookKind::PreRollout,
        HookKind::Rollout,
        HookKind::ConfirmPromotion,
        HookKind::PostRollout,
        HookKind::Rollback,
        HookKind::Event,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HookKind::PreRollout => "pre-rollout",
            HookKind::Rollout => "rollout",
            HookKind::ConfirmPromotion => "confirm-promotion",
            HookKind::PostRollout => "post-rollout",
            HookKind::Rollback => "rollback",
            HookKind::Event => "event",
        }
    }

    pub fn parse(s: &str) -> Option<HookKind> {
        HookKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// [`HookKind::parse`], with an error that lists the kinds.
    ///
    /// # Errors
    ///
    /// `s` names no hook.
    pub fn named(s: &str) -> Result<HookKind, String> {
        HookKind::parse(s).ok_or_else(|| {
            let kinds: Vec<&str> = HookKind::ALL.iter().map(|k| k.as_str()).collect();
            format!("unknown hook {s:?}: use one of {}", kinds.join(", "))
        })
    }
}

impl std::fmt::Display for HookKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Prefix of the annotations that set hook URLs: `hook.turnout.dev/<kind>`.
pub const HOOK_PREFIX: &str = "hook.turnout.dev/";

/// Checks a hook URL.
///
/// # Errors
///
/// Why the URL cannot be used.
pub fn parse_hook_url(value: &str) -> Result<String, String> {
    let value = value.trim();
    let uri: http::Uri = value.parse().map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err("not an http:// or https:// URL".into());
    }
    Ok(value.to_owned())
}

/// What a metric query that returns no data counts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NoData {
    /// A failed check (the default: silence is not health).
    Fail,
    /// A passed check (for services whose canary may see no traffic).
    Pass,
}

/// How one release runs.
#[derive(Clone, Debug, PartialEq)]
pub struct ReleaseConfig {
    /// Candidate weights in percent, strictly increasing, ending at 100.
    pub steps: Vec<u8>,
    /// Time between a step's propagation and its analysis.
    pub interval: Duration,
    /// Failed checks that roll the release back.
    pub threshold: u32,
    /// Longest a release may go without progress before it is rolled back.
    pub progress_deadline: Duration,
    /// How long a routing change takes to reach every proxy when Istio does not report it.
    pub propagation_delay: Duration,
    /// How long a route must carry no weight before pods it could select may be terminated.
    pub drain: Duration,
    /// Lowest acceptable request success rate of the candidate, in percent.
    pub success_rate_min: f64,
    /// Highest acceptable P99 latency of the candidate.
    pub latency_p99_max: Duration,
    /// Prometheus base URL; `None`: metric checks are skipped (readiness checks still run).
    pub prometheus: Option<String>,
    /// What a metric query without data counts as.
    pub no_data: NoData,
    /// Custom PromQL checks, by name.
    pub checks: Vec<CustomCheck>,
    /// Hook URLs by kind.
    pub hooks: BTreeMap<HookKind, String>,
    /// How long one hook call may take.
    pub hook_timeout: Duration,
    /// Further attempts after a hook call failed.
    pub hook_retries: u32,
    /// The routing provider asked for; `None`: chosen per namespace (ambient → Gateway API, else
    /// whichever CRDs are installed, Istio first).
    pub provider: Option<ProviderKind>,
    /// Gateway API: the Gateway the HTTPRoute attaches to (north-south); `None`: the Service itself
    /// (GAMMA, east-west in a mesh).
    pub gateway: Option<GatewayRef>,
    /// Gateway API: the hostnames of a route attached to a Gateway.
    pub hostnames: Vec<String>,
    /// The Secret (in the Deployment's namespace) with the chat webhook URLs to notify.
    pub notify: Option<String>,
    /// The least severity notified.
    pub notify_severity: Severity,
    /// How the release moves traffic: weighted steps, or an A/B test.
    pub strategy: Strategy,
    /// Requests sent to the candidate from the start (a canary's early users; an A/B test's group).
    pub matches: Vec<RequestMatch>,
    /// Analyses an A/B test must pass before promotion, and analyses while mirroring.
    pub iterations: u32,
    /// Before the first step, copy this percentage of the requests to the candidate (answers dropped)
    /// for `iterations` analyses.
    pub mirror: Option<u8>,
    /// In a canary, the cookie the candidate's answers set, which keeps whoever carries it on the
    /// candidate.
    pub session_affinity: Option<String>,
}

/// A Gateway named by `turnout.dev/gateway`: `name` or `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRef {
    /// `None`: the Deployment's namespace.
    pub namespace: Option<String>,
    pub name: String,
}

/// Prefix of the annotations that define custom checks: `check.turnout.dev/<name>`.
pub const CHECK_PREFIX: &str = "check.turnout.dev/";

/// A custom analysis check: a PromQL template whose value must lie in `[min, max]`.
///
/// Written as an annotation `check.turnout.dev/<name>` whose value is JSON:
/// `{"query": "...", "min": 0, "max": 5}` (either bound may be left out). The query may use
/// `{{ namespace }}`, `{{ target }}` (the Deployment), `{{ candidate }}` (`<target>-v<N>`) and
/// `{{ interval }}` (the analysis interval as a PromQL duration, e.g. `30s`).
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomCheck {
    #[serde(skip)]
    pub name: String,
    pub query: String,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

impl CustomCheck {
    /// The query with its placeholders filled in.
    pub fn render(&self, namespace: &str, target: &str, candidate: &str, interval: &str) -> String {
        let mut query = self.query.clone();
        for (name, value) in [
            ("namespace", namespace),
            ("target", target),
            ("candidate", candidate),
            ("interval", interval),
        ] {
            for form in [format!("{{{{ {name} }}}}"), format!("{{{{{name}}}}}")] {
                query = query.replace(&form, value);
            }
        }
        query
    }
}

/// Parses the value of a `check.turnout.dev/<name>` annotation.
///
/// # Errors
///
/// Why the check cannot be used.
pub fn parse_check(name: &str, value: &str) -> Result<CustomCheck, String> {
    if name.is_empty() {
        return Err("the check needs a name after check.turnout.dev/".into());
    }
    let mut check: CustomCheck = serde_json::from_str(value)
        .map_err(|e| format!(r#"not JSON like {{"query": "...", "min": 0, "max": 5}} ({e})"#))?;
    if check.query.trim().is_empty() {
        return Err("the query is empty".into());
    }
    match (check.min, check.max) {
        (None, None) => return Err("give min, max or both".into()),
        (Some(min), Some(max)) if min > max => return Err(format!("min {min} is above max {max}")),
        _ => {}
    }
    if let Some(unknown) = unknown_placeholder(&check.query) {
        return Err(format!(
            "unknown placeholder {{{{ {unknown} }}}}: use namespace, target, candidate or interval"
        ));
    }
    check.name = name.to_owned();
    Ok(check)
}

fn unknown_placeholder(query: &str) -> Option<String> {
    let mut rest = query;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after.find("}}")?;
        let name = after[..end].trim();
        if !["namespace", "target", "candidate", "interval"].contains(&name) {
            return Some(name.to_owned());
        }
        rest = &after[end + 2..];
    }
    None
}

impl Default for ReleaseConfig {
    fn default() -> Self {
        Self {
            steps: vec![10, 25, 50, 100],
            interval: Duration::from_secs(30),
            threshold: 3,
            progress_deadline: Duration::from_secs(600),
            propagation_delay: Duration::from_secs(5),
            drain: Duration::from_secs(10),
            success_rate_min: 99.0,
            latency_p99_max: Duration::from_millis(500),
            prometheus: None,
            no_data: NoData::Fail,
            checks: Vec::new(),
            hooks: BTreeMap::new(),
            hook_timeout: Duration::from_secs(10),
            hook_retries: 2,
            provider: None,
            gateway: None,
            hostnames: Vec::new(),
            notify: None,
            notify_severity: Severity::Info,
            strategy: Strategy::Canary,
            matches: Vec::new(),
            iterations: 10,
            mirror: None,
            session_affinity: None,
        }
    }
}

/// An annotation whose value was not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// `namespace` or `deployment`: where the annotation is.
    pub on: &'static str,
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ignoring {} annotation {}={:?}: {}; using the level below",
            self.on, self.key, self.value, self.reason
        )
    }
}

/// The configuration for a Deployment: `defaults` (the agent's flags), then the namespace's
/// annotations, then the Deployment's, with every value that could not be used.
pub fn resolve(
    defaults: &ReleaseConfig,
    namespace: &BTreeMap<String, String>,
    deployment: &BTreeMap<String, String>,
) -> (ReleaseConfig, Vec<Problem>) {
    let mut config = defaults.clone();
    let mut problems = Vec::new();
    for (on, annotations) in [("namespace", namespace), ("deployment", deployment)] {
        for (key, value) in annotations.range(CHECK_PREFIX.to_owned()..) {
            let Some(name) = key.strip_prefix(CHECK_PREFIX) else {
                break;
            };
            match parse_check(name, value) {
                Ok(check) => {
                    // The Deployment's check replaces the namespace's of the same name.
                    config.checks.retain(|c| c.name != check.name);
                    config.checks.push(check);
                }
                Err(reason) => problems.push(Problem {
                    on,
                    key: key.clone(),
                    value: value.clone(),
                    reason,
                }),
            }
        }
        for (key, value) in annotations.range(HOOK_PREFIX.to_owned()..) {
            let Some(kind) = key.strip_prefix(HOOK_PREFIX) else {
                break;
            };
            let parsed = match HookKind::named(kind) {
                // An empty value (on the Deployment, say) turns off the level below's hook.
                Ok(kind) if value.trim().is_empty() => {
                    config.hooks.remove(&kind);
                    continue;
                }
                Ok(kind) => parse_hook_url(value).map(|url| (kind, url)),
                Err(e) => Err(e),
            };
            match parsed {
                Ok((kind, url)) => {
                    config.hooks.insert(kind, url);
                }
                Err(reason) => problems.push(Problem {
                    on,
                    key: key.clone(),
                    value: value.clone(),
                    reason,
                }),
            }
        }
        for key in keys::ALL {
            let Some(value) = annotations.get(key) else { continue };
            if let Err(reason) = apply(&mut config, key, value) {
                problems.push(Problem {
                    on,
                    key: key.to_owned(),
                    value: value.clone(),
                    reason,
                });
            }
        }
    }
    // An A/B test routes by the matches: without them it would never send a request to the
    // candidate.
    if config.strategy == Strategy::AB && config.matches.is_empty() {
        let (on, value) = [("deployment", deployment), ("namespace", namespace)]
            .into_iter()
            .find_map(|(on, a)| a.get(keys::STRATEGY).map(|v| (on, v.clone())))
            .unwrap_or(("deployment", "ab".into()));
        problems.push(Problem {
            on,
            key: keys::STRATEGY.to_owned(),
            value,
            reason: format!(
                "an A/B test needs {} (the requests that go to the candidate)",
                keys::MATCH
            ),
        });
        config.strategy = defaults.strategy;
        if config.strategy == Strategy::AB {
            config.strategy = Strategy::Canary;
        }
    }
    // Affinity keeps users on a candidate that shares the traffic (a canary's steps, an A/B test's
    // users); blue/green switches everyone at once.
    if config.strategy == Strategy::BlueGreen
        && let Some(cookie) = config.session_affinity.take()
    {
        problems.push(Problem {
            on: "deployment",
            key: keys::SESSION_AFFINITY.to_owned(),
            value: cookie,
            reason: "session affinity goes with a canary or an A/B test; blue/green switches every user at once".into(),
        });
    }
    (config, problems)
}

/// Sets one configuration value from its annotation.
///
/// # Errors
///
/// Why the value cannot be used.
fn apply(config: &mut ReleaseConfig, key: &str, value: &str) -> Result<(), String> {
    let value = value.trim();
    match key {
        keys::STEPS => config.steps = parse_steps(value)?,
        keys::INTERVAL => config.interval = positive_duration(value)?,
        keys::THRESHOLD => {
            config.threshold = value
                .parse::<u32>()
                .ok()
                .filter(|t| *t >= 1)
                .ok_or("not a whole number of at least 1")?;
        }
        keys::PROGRESS_DEADLINE => config.progress_deadline = positive_duration(value)?,
        keys::PROPAGATION_DELAY => config.propagation_delay = duration(value)?,
        keys::DRAIN => config.drain = duration(value)?,
        keys::SUCCESS_RATE_MIN => {
            config.success_rate_min = value
                .trim_end_matches('%')
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=100.0).contains(r))
                .ok_or("not a percentage from 0 to 100")?;
        }
        keys::LATENCY_P99_MAX => config.latency_p99_max = positive_duration(value)?,
        keys::PROMETHEUS => {
            if !(value.starts_with("http://") || value.starts_with("https://")) || value.len() <= "https://".len() {
                return Err("not an http:// or https:// URL".into());
            }
            config.prometheus = Some(value.trim_end_matches('/').to_owned());
        }
        keys::NO_DATA => {
            config.no_data = match value {
                "fail" => NoData::Fail,
                "pass" => NoData::Pass,
                _ => return Err("not fail or pass".into()),
            };
        }
        keys::HOOK_TIMEOUT => config.hook_timeout = positive_duration(value)?,
        keys::HOOK_RETRIES => {
            config.hook_retries = value
                .parse::<u32>()
                .ok()
                .filter(|r| *r <= 10)
                .ok_or("not a whole number from 0 to 10")?;
        }
        keys::PROVIDER => {
            config.provider = Some(ProviderKind::parse(value).ok_or_else(|| {
                let known: Vec<&str> = ProviderKind::ALL.iter().map(|p| p.as_str()).collect();
                format!("not one of {}", known.join(", "))
            })?);
        }
        keys::GATEWAY => config.gateway = Some(parse_gateway(value)?),
        keys::HOSTNAMES => config.hostnames = parse_hostnames(value)?,
        keys::NOTIFY => {
            // A Secret's name: a DNS subdomain. An empty value turns off the level below's.
            let valid = value.len() <= 253
                && value
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
            if !valid {
                return Err("not a Secret name".into());
            }
            config.notify = (!value.is_empty()).then(|| value.to_owned());
        }
        keys::NOTIFY_SEVERITY => {
            config.notify_severity = Severity::parse(value).ok_or("not info or warning")?;
        }
        keys::STRATEGY => {
            config.strategy = Strategy::parse(value).ok_or("not canary, ab or blue-green")?;
        }
        // An empty value turns off the level below's matches.
        keys::MATCH if value.is_empty() => config.matches.clear(),
        keys::MATCH => config.matches = parse_matches(value)?,
        // An empty value turns off the level below's affinity.
        keys::SESSION_AFFINITY if value.is_empty() => config.session_affinity = None,
        keys::SESSION_AFFINITY => {
            if !crate::release::routing::is_cookie_name(value) {
                return Err("not a cookie name (letters, digits and !#$%&'*+-.^_`|~, at most 64)".into());
            }
            config.session_affinity = Some(value.to_owned());
        }
        // An empty value turns off the level below's mirroring.
        keys::MIRROR if value.is_empty() => config.mirror = None,
        keys::MIRROR => {
            config.mirror = Some(
                value
                    .trim_end_matches('%')
                    .trim()
                    .parse::<u8>()
                    .ok()
                    .filter(|p| (1..=100).contains(p))
                    .ok_or("not a percentage from 1 to 100")?,
            );
        }
        keys::ITERATIONS => {
            config.iterations = value
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or("not a whole number from 1 to 1000")?;
        }
        _ => return Err("unknown key".into()),
    }
    Ok(())
}

/// `name` or `namespace/name`, each a DNS label.
fn parse_gateway(value: &str) -> Result<GatewayRef, String> {
    let (namespace, name) = match value.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, value),
    };
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    if !label(name) || namespace.is_some_and(|ns| !label(ns)) {
        return Err("not a Gateway name or namespace/name".into());
    }
    Ok(GatewayRef {
        namespace: namespace.map(str::to_owned),
        name: name.to_owned(),
    })
}

/// `shop.example.com,*.example.org`: hostnames as an HTTPRoute takes them.
fn parse_hostnames(value: &str) -> Result<Vec<String>, String> {
    value
        .split(',')
        .map(str::trim)
        .map(|h| {
            let bare = h.strip_prefix("*.").unwrap_or(h);
            let valid = !bare.is_empty()
                && h.len() <= 253
                && bare.split('.').all(|l| {
                    !l.is_empty()
                        && l.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                });
            if valid {
                Ok(h.to_owned())
            } else {
                Err(format!(
                    "{h:?} is not a hostname (lower-case DNS names, an optional leading *.)"
                ))
            }
        })
        .collect()
}

/// `10,25,50,100`: whole percentages from 1 to 100, strictly increasing, the last 100.
///
/// # Errors
///
/// Why the list cannot be used.
pub fn parse_steps(value: &str) -> Result<Vec<u8>, String> {
    let steps = value
        .split(',')
        .map(|s| s.trim().parse::<u8>().ok().filter(|w| (1..=100).contains(w)))
        .collect::<Option<Vec<u8>>>()
        .ok_or("steps must be whole percentages from 1 to 100, separated by commas")?;
    if !steps.windows(2).all(|w| w[0] < w[1]) {
        return Err("steps must increase".into());
    }
    if steps.last() != Some(&100) {
        return Err("the last step must be 100".into());
    }
    Ok(steps)
}

fn duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| format!("not a duration like 30s or 2m ({e})"))
}

fn positive_duration(value: &str) -> Result<Duration, String> {
    let d = duration(value)?;
    if d.is_zero() {
        Err("must be longer than zero".into())
    } else {
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn an_a_b_test_takes_its_matches_and_iterations_and_needs_matches() {
        let beta = r#"[{"headers":[{"name":"x-user-group","value":"beta"}]}]"#;
        let ns = ann(&[(keys::MATCH, beta), (keys::ITERATIONS, "5")]);
        let d = ann(&[(keys::STRATEGY, "ab")]);
        let (config, problems) = resolve(&ReleaseConfig::default(), &ns, &d);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(config.strategy, Strategy::AB);
        assert_eq!(config.iterations, 5);
        assert_eq!(config.matches[0].headers[0].name, "x-user-group");
        // Without matches an A/B test would send nothing to the candidate: reported, canary used.
        let (config, problems) = resolve(&ReleaseConfig::default(), &ann(&[]), &d);
        assert_eq!(config.strategy, Strategy::Canary);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].reason.contains("needs turnout.dev/match"),
            "{}",
            problems[0]
        );
        // The Deployment's empty match turns off the namespace's.
        let d = ann(&[(keys::MATCH, "")]);
        let (config, problems) = resolve(&ReleaseConfig::default(), &ns, &d);
        assert!(config.matches.is_empty() && problems.is_empty());
        // Mirroring, alone or with an A/B test (copies of the other requests).
        let (config, problems) = resolve(&ReleaseConfig::default(), &ann(&[]), &ann(&[(keys::MIRROR, "20%")]));
        assert_eq!((config.mirror, problems.len()), (Some(20), 0));
        let both = ann(&[(keys::MIRROR, "20"), (keys::STRATEGY, "ab")]);
        let (config, problems) = resolve(&ReleaseConfig::default(), &ns, &both);
        assert_eq!((config.mirror, config.strategy), (Some(20), Strategy::AB));
        assert!(problems.is_empty(), "{problems:?}");
        // Session affinity: a cookie's name, with a canary or an A/B test.
        let sticky = ann(&[(keys::SESSION_AFFINITY, "turnout-canary")]);
        let (config, problems) = resolve(&ReleaseConfig::default(), &ann(&[]), &sticky);
        assert_eq!(
            (config.session_affinity.as_deref(), problems.len()),
            (Some("turnout-canary"), 0)
        );
        let (config, problems) = resolve(
            &ReleaseConfig::default(),
            &ns,
            &ann(&[(keys::SESSION_AFFINITY, "c"), (keys::STRATEGY, "ab")]),
        );
        assert_eq!(config.session_affinity.as_deref(), Some("c"));
        assert!(problems.is_empty(), "{problems:?}");
        // Blue/green: with its matches and mirroring; affinity reported and left out.
        let (config, problems) = resolve(
            &ReleaseConfig::default(),
            &ns,
            &ann(&[
                (keys::STRATEGY, "blue-green"),
                (keys::MIRROR, "20"),
                (keys::SESSION_AFFINITY, "c"),
            ]),
        );
        assert_eq!(
            (config.strategy, config.mirror, config.session_affinity.as_deref()),
            (Strategy::BlueGreen, Some(20), None)
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].reason.contains("blue/green switches"), "{problems:?}");
        for (key, bad) in [
            (keys::SESSION_AFFINITY, "a cookie"),
            (keys::SESSION_AFFINITY, "a=b"),
            (keys::MIRROR, "0"),
            (keys::MIRROR, "150"),
            (keys::STRATEGY, "linear"),
            (keys::STRATEGY, "blue/green"),
            (keys::ITERATIONS, "0"),
            (keys::MATCH, "x-user-group=beta"),
        ] {
            let (config, problems) = resolve(&ReleaseConfig::default(), &ann(&[]), &ann(&[(key, bad)]));
            assert_eq!(problems.len(), 1, "{key}={bad}");
            assert_eq!(config.iterations, 10);
            assert_eq!(config.strategy, Strategy::Canary);
        }
    }

    #[test]
    fn the_deployment_overrides_the_namespace_which_overrides_the_flags() {
        let ns = ann(&[(keys::STEPS, "20,100"), (keys::INTERVAL, "1m"), (keys::THRESHOLD, "5")]);
        let d = ann(&[(keys::STEPS, "5,50,100"), (keys::PROMETHEUS, "http://prometheus:9090/")]);
        let (config, problems) = resolve(&ReleaseConfig::default(), &ns, &d);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(config.steps, vec![5, 50, 100]);
        assert_eq!(config.interval, Duration::from_secs(60));
        assert_eq!(config.threshold, 5);
        assert_eq!(config.prometheus.as_deref(), Some("http://prometheus:9090"));
        assert_eq!(config.drain, ReleaseConfig::default().drain);
    }

    #[test]
    fn hooks_come_from_annotations_layered_like_the_rest() {
        let ns = ann(&[
            ("hook.turnout.dev/event", "https://chat.example/turnout"),
            ("hook.turnout.dev/pre-rollout", "http://gate.shop/check"),
            (keys::HOOK_TIMEOUT, "3s"),
        ]);
        let d = ann(&[
            ("hook.turnout.dev/event", ""),
            ("hook.turnout.dev/rollout", "http://loadtest.shop/run"),
            ("hook.turnout.dev/confirm", "http://x/"),
            ("hook.turnout.dev/rollback", "ftp://x/"),
            (keys::HOOK_RETRIES, "11"),
        ]);
        let (config, problems) = resolve(&ReleaseConfig::default(), &ns, &d);
        let hooks: Vec<(&str, &str)> = config.hooks.iter().map(|(k, u)| (k.as_str(), u.as_str())).collect();
        assert_eq!(
            hooks,
            [
                ("pre-rollout", "http://gate.shop/check"),
                ("rollout", "http://loadtest.shop/run")
            ],
            "the Deployment's empty event hook turns off the namespace's"
        );
        assert_eq!(config.hook_timeout, Duration::from_secs(3));
        assert_eq!(config.hook_retries, 2);
        let reasons: Vec<String> = problems.iter().map(|p| format!("{}: {}", p.key, p.reason)).collect();
        assert_eq!(
            reasons,
            [
                "hook.turnout.dev/confirm: unknown hook \"confirm\": use one of pre-rollout, rollout, \
                 confirm-promotion, post-rollout, rollback, event",
                "hook.turnout.dev/rollback: not an http:// or https:// URL",
                "turnout.dev/hook-retries: not a whole number from 0 to 10",
            ]
        );
    }

    #[test]
    fn routing_settings_are_parsed_and_bad_ones_reported() {
        let ns = ann(&[(keys::PROVIDER, "gateway-api"), (keys::GATEWAY, "infra/public")]);
        let d = ann(&[(keys::HOSTNAMES, "shop.example.com, *.shop.example.org")]);
        let (config, problems) = resolve(&ReleaseConfig::default(), &ns, &d);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(config.provider, Some(ProviderKind::GatewayApi));
        assert_eq!(
            config.gateway,
            Some(GatewayRef {
                namespace: Some("infra".into()),
                name: "public".into()
            })
        );
        assert_eq!(config.hostnames, ["shop.example.com", "*.shop.example.org"]);
        let bad = ann(&[
            (keys::PROVIDER, "linkerd"),
            (keys::GATEWAY, "Infra/Public"),
            (keys::HOSTNAMES, "shop..example"),
        ]);
        let (config, problems) = resolve(&ReleaseConfig::default(), &ns, &bad);
        assert_eq!(
            config.provider,
            Some(ProviderKind::GatewayApi),
            "the namespace's stands"
        );
        let reasons: Vec<String> = problems.iter().map(|p| format!("{}: {}", p.key, p.reason)).collect();
        assert_eq!(
            reasons,
            [
                "turnout.dev/provider: not one of istio, gateway-api, none",
                "turnout.dev/gateway: not a Gateway name or namespace/name",
                "turnout.dev/hostnames: \"shop..example\" is not a hostname (lower-case DNS names, an optional leading *.)",
            ]
        );
    }

    #[test]
    fn the_no_data_policy_is_fail_unless_set_to_pass() {
        assert_eq!(ReleaseConfig::default().no_data, NoData::Fail);
        let (config, problems) = resolve(
            &ReleaseConfig::default(),
            &ann(&[(keys::NO_DATA, "pass")]),
            &BTreeMap::new(),
        );
        assert_eq!((config.no_data, problems.len()), (NoData::Pass, 0));
        let (config, problems) = resolve(
            &ReleaseConfig::default(),
            &BTreeMap::new(),
            &ann(&[(keys::NO_DATA, "ok")]),
        );
        assert_eq!(
            (config.no_data, problems[0].reason.as_str()),
            (NoData::Fail, "not fail or pass")
        );
    }

    #[test]
    fn an_invalid_value_is_reported_and_the_level_below_is_used() {
        let ns = ann(&[(keys::STEPS, "20,100")]);
        let d = ann(&[
            (keys::STEPS, "50,25,100"),
            (keys::THRESHOLD, "0"),
            (keys::INTERVAL, "soon"),
            (keys::SUCCESS_RATE_MIN, "101"),
            (keys::PROMETHEUS, "prometheus:9090"),
        ]);
        let (config, problems) = resolve(&ReleaseConfig::default(), &ns, &d);
        assert_eq!(config.steps, vec![20, 100], "the namespace's value stands");
        assert_eq!(config.threshold, 3);
        assert_eq!(config.interval, Duration::from_secs(30));
        assert_eq!(config.success_rate_min, 99.0);
        assert_eq!(config.prometheus, None);
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                keys::STEPS,
                keys::INTERVAL,
                keys::THRESHOLD,
                keys::SUCCESS_RATE_MIN,
                keys::PROMETHEUS
            ]
        );
        assert_eq!(
            problems[0].to_string(),
            "ignoring deployment annotation turnout.dev/steps=\"50,25,100\": steps must increase; using the level below"
        );
    }

    #[test]
    fn custom_checks_come_from_both_levels_and_are_validated() {
        let ns = ann(&[
            (
                "check.turnout.dev/errors",
                r#"{"query": "sum(x{ns=\"{{ namespace }}\"})", "max": 1}"#,
            ),
            (
                "check.turnout.dev/rps",
                r#"{"query": "rate(y[{{interval}}])", "min": 1}"#,
            ),
        ]);
        let d = ann(&[
            (
                "check.turnout.dev/errors",
                r#"{"query": "sum(z{pod=~\"{{ candidate }}-.*\"})", "min": 0, "max": 2}"#,
            ),
            ("check.turnout.dev/bad", r#"{"query": "q", "min": 3, "max": 2}"#),
            (
                "check.turnout.dev/typo",
                r#"{"query": "q{x=\"{{ canidate }}\"}", "max": 2}"#,
            ),
            ("check.turnout.dev/none", r#"{"query": "q"}"#),
            ("check.turnout.dev/garbage", "max 5"),
        ]);
        let (config, problems) = resolve(&ReleaseConfig::default(), &ns, &d);
        let names: Vec<&str> = config.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["rps", "errors"]);
        assert_eq!(config.checks[1].max, Some(2.0), "the Deployment's check wins");
        assert_eq!(
            config.checks[1].render("shop", "podinfo", "podinfo-v3", "30s"),
            r#"sum(z{pod=~"podinfo-v3-.*"})"#
        );
        assert_eq!(
            config.checks[0].render("shop", "podinfo", "podinfo-v3", "30s"),
            "rate(y[30s])"
        );
        let reasons: Vec<(&str, &str)> = problems.iter().map(|p| (p.key.as_str(), p.reason.as_str())).collect();
        assert_eq!(reasons[0], ("check.turnout.dev/bad", "min 3 is above max 2"));
        assert!(reasons[1].1.starts_with("not JSON"), "{reasons:?}");
        assert_eq!(reasons[2], ("check.turnout.dev/none", "give min, max or both"));
        assert!(
            reasons[3].1.contains("unknown placeholder {{ canidate }}"),
            "{reasons:?}"
        );
        assert_eq!(problems.len(), 4);
    }

    #[test]
    fn steps_are_checked() {
        assert_eq!(parse_steps("10, 25,50 ,100"), Ok(vec![10, 25, 50, 100]));
        assert_eq!(parse_steps("100"), Ok(vec![100]));
        assert!(parse_steps("10,50").unwrap_err().contains("last step must be 100"));
        assert!(parse_steps("0,100").is_err());
        assert!(parse_steps("10,10,100").is_err());
        assert!(parse_steps("ten,100").is_err());
        assert!(parse_steps("").is_err());
    }

    #[test]
    fn durations_and_percentages_take_the_usual_forms() {
        let d = ann(&[
            (keys::LATENCY_P99_MAX, "250ms"),
            (keys::SUCCESS_RATE_MIN, "99.5%"),
            (keys::DRAIN, "0s"),
            (keys::PROGRESS_DEADLINE, "0s"),
        ]);
        let (config, problems) = resolve(&ReleaseConfig::default(), &BTreeMap::new(), &d);
        assert_eq!(config.latency_p99_max, Duration::from_millis(250));
        assert_eq!(config.success_rate_min, 99.5);
        assert_eq!(config.drain, Duration::ZERO, "no drain is allowed");
        assert_eq!(problems.len(), 1, "a zero progress deadline is not: {problems:?}");
        assert_eq!(problems[0].key, keys::PROGRESS_DEADLINE);
    }
}
