//! A model cluster for the release machine: the webhook, the Deployment controller, candidates that
//! become available after a while, and mesh proxies that each apply routing writes after their own
//! delay (up to the propagation delay). Property tests generate scenarios (delays, verdicts, supersedes,
//! reverts, an agent that crashes before a write) and check the invariants of DESIGN §5 at every tick.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::{Just, ProptestConfig, TestCaseError, any, prop, prop_oneof, proptest};
use proptest::strategy::Strategy as Gen;

use super::*;
use crate::config::{HookKind, ReleaseConfig};

const TICK: Millis = 100;
const SERVICE: &str = "podinfo";
const REPLICAS: i32 = 3;

/// A deterministic random source (the scenario's seed decides every delay).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A whole number of ticks in `0..=max_ms`.
    fn delay(&mut self, max_ms: Millis) -> Millis {
        let ticks = max_ms / TICK;
        (self.next() % (ticks + 1)) * TICK
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 10_000) as f64 / 10_000.0 < p
    }
}

#[derive(Clone, Copy, Debug)]
enum UserAction {
    /// A new image: a good one passes analysis (mostly), a bad one fails every check.
    SetImage { bad: bool },
    /// The template set back to the stable one.
    Revert,
    /// The Deployment resumed without the webhook (down or bypassed).
    Bypass,
    /// `turnout <verb>` on the release in flight (nothing when the CLI would refuse it).
    Request(Verb),
    /// What made the release fail was fixed (a retry passes analysis).
    Heal,
    /// The namespace's opt-in label removed (or the Deployment annotated disabled); nothing the user
    /// does afterwards goes through turnout.
    OptOut,
    /// The paused Deployment's template edited without the webhook (down or bypassed): same revision,
    /// another template.
    UnheldEdit,
}

#[derive(Clone, Debug)]
struct Scenario {
    seed: u64,
    propagation_ms: Millis,
    drain_ms: Millis,
    interval_ms: Millis,
    threshold: u32,
    steps: Vec<u8>,
    proxies: usize,
    crash_rate: f64,
    /// Probability that a check of a good release fails anyway.
    flake_rate: f64,
    /// Longest time a candidate takes to be available; `None`: candidates never become available.
    candidate_ready_ms: Option<Millis>,
    /// The routing provider modelled: what reports propagation (Istio: both objects; Gateway API: the
    /// route, never the per-version Services).
    provider: ProviderKind,
    /// The implementation reports a change once it reached every proxy (Istio `Reconciled`,
    /// HTTPRoute `Accepted`/`ResolvedRefs`).
    route_status: bool,
    /// `pre-rollout` and `confirm-promotion` hooks are configured (they pass or fail like checks).
    gates: bool,
    /// Canary or A/B test (which always has matches).
    strategy: Strategy,
    /// The release has matches (`turnout.dev/match`): their requests go to the candidate.
    matched: bool,
    /// Analyses of an A/B test, and of mirroring.
    iterations: u32,
    /// Copies of this share of the requests to the candidate before the first step.
    mirror: Option<u8>,
    /// Session affinity in a canary.
    sticky: bool,
    events: Vec<(Millis, UserAction)>,
}

/// The matches of a scenario that has some.
fn beta() -> Vec<routing::RequestMatch> {
    routing::parse_matches(r#"[{"headers":[{"name":"x-user-group","value":"beta"}]}]"#).unwrap()
}

/// A routing write as one proxy sees it: from `at` on.
#[derive(Clone, Debug)]
struct Seen<T> {
    at: Millis,
    value: T,
}

struct Proxy {
    routes: Vec<Seen<Route>>,
    rules: Vec<Seen<Vec<Backend>>>,
}

impl Proxy {
    fn view<T: Clone>(history: &[Seen<T>], at: Millis, empty: T) -> T {
        history
            .iter()
            .rev()
            .find(|s| s.at <= at)
            .map_or(empty, |s| s.value.clone())
    }
    fn route(&self, at: Millis) -> Route {
        Self::view(&self.routes, at, Route::Host)
    }
    fn rules(&self, at: Millis) -> Vec<Backend> {
        Self::view(&self.rules, at, Vec::new())
    }
    /// Whether this proxy sends traffic to pods with `hash` at `at`.
    fn selects(&self, at: Millis, hash: &str) -> bool {
        match self.route(at) {
            Route::Host => true,
            Route::Split(split) => {
                let rules = self.rules(at);
                // A backend with weight, or the one the requests that match go to.
                split
                    .weights
                    .iter()
                    .filter(|p| p.weight > 0)
                    .map(|p| p.backend.as_str())
                    .chain(split.matched.as_ref().map(|m| m.backend.as_str()))
                    .chain(split.mirror.as_ref().map(|m| m.backend.as_str()))
                    .chain(split.sticky.as_ref().map(|s| s.backend.as_str()))
                    .any(|b| rules.iter().any(|s| s.name == b && s.hash == hash))
            }
        }
    }
}

struct Candidate {
    view: CandidateView,
    available_at: Option<Millis>,
    gone_at: Option<Millis>,
    /// A held candidate's pods are in the Service (without a mesh), and since when they are out of
    /// it once they have served (`None`: never served, or serving now).
    serving: bool,
    out_since: Option<Millis>,
}

/// The user Deployment's ReplicaSets, by revision.
#[derive(Default)]
struct ReplicaSets {
    ready: BTreeMap<u64, i32>,
    /// Revision the native controller is rolling out, and when it will be complete.
    rolling: Option<(u64, Millis)>,
}

struct World {
    sc: Scenario,
    config: ReleaseConfig,
    rng: Rng,
    now: Millis,
    deployment: DeploymentView,
    counter: u64,
    rs: ReplicaSets,
    candidates: Vec<Candidate>,
    vs: Option<Applied<Route>>,
    dr: Option<Applied<Vec<Backend>>>,
    /// When each backend was last named by a route write (for the drain before its removal).
    last_named: BTreeMap<String, Millis>,
    proxies: Vec<Proxy>,
    bad: BTreeMap<u64, bool>,
    checks: u32,
    actions: u32,
    failures: Vec<String>,
    /// The next rollout was started by a bypass.
    bypassed: bool,
    bypass_seen: bool,
    /// The namespace opted out (turnout lets go of the release).
    opted_out: bool,
    /// The template each revision has now (an unheld edit changes it), for a revert.
    templates: BTreeMap<u64, String>,
    /// Unheld edits so far.
    edits: u32,
    /// Analyses run while the release was paused on request.
    analysed_while_paused: u32,
    /// What each analysis covered.
    stages: Vec<Stage>,
    /// The reasons of the Events recorded, in order.
    reasons: Vec<&'static str>,
    /// The notification hooks sent (release, hook), in order.
    notified: Vec<(u64, HookKind)>,
}

fn rs_hash(revision: u64) -> String {
    format!("rs{revision}")
}

fn candidate_hash(revision: u64) -> String {
    format!("canary{revision}")
}

impl World {
    fn new(sc: Scenario) -> Self {
        let config = ReleaseConfig {
            steps: sc.steps.clone(),
            interval: Duration::from_millis(sc.interval_ms),
            threshold: sc.threshold,
            progress_deadline: Duration::from_secs(60),
            propagation_delay: Duration::from_millis(sc.propagation_ms),
            drain: Duration::from_millis(sc.drain_ms),
            hooks: if sc.gates {
                [HookKind::PreRollout, HookKind::ConfirmPromotion]
                    .map(|k| (k, format!("http://gate/{k}")))
                    .into()
            } else {
                BTreeMap::new()
            },
            strategy: sc.strategy,
            matches: if sc.matched || sc.strategy == Strategy::AB {
                beta()
            } else {
                Vec::new()
            },
            iterations: sc.iterations,
            mirror: sc.mirror,
            session_affinity: (sc.sticky && sc.strategy != Strategy::BlueGreen).then(|| "turnout-canary".to_owned()),
            ..ReleaseConfig::default()
        };
        let mut rs = ReplicaSets::default();
        rs.ready.insert(1, REPLICAS);
        Self {
            rng: Rng(sc.seed | 1),
            proxies: (0..sc.proxies)
                .map(|_| Proxy {
                    routes: Vec::new(),
                    rules: Vec::new(),
                })
                .collect(),
            sc,
            config,
            now: 0,
            deployment: DeploymentView {
                namespace: "shop".into(),
                name: SERVICE.into(),
                replicas: REPLICAS,
                paused: false,
                template_revision: 1,
                stable_revision: None,
                status: StatusView::default(),
                rollout_complete: true,
                rollout_failed: false,
                request: None,
                template_hash: template_hash(1, 0),
            },
            counter: 1,
            rs,
            candidates: Vec::new(),
            vs: None,
            dr: None,
            last_named: BTreeMap::new(),
            bad: BTreeMap::new(),
            checks: 0,
            actions: 0,
            failures: Vec::new(),
            bypassed: false,
            bypass_seen: false,
            opted_out: false,
            templates: BTreeMap::from([(1, template_hash(1, 0))]),
            edits: 0,
            analysed_while_paused: 0,
            stages: Vec::new(),
            reasons: Vec::new(),
            notified: Vec::new(),
        }
    }

    fn fail(&mut self, what: String) {
        if self.failures.len() < 5 {
            self.failures.push(format!("t={}ms: {what}", self.now));
        }
    }

    fn observe(&self, verdict: Option<Verdict>) -> Observed<'_> {
        let d = &self.deployment;
        let rs_view = |revision: u64| {
            self.rs.ready.get(&revision).map(|ready| ReplicaSetView {
                hash: rs_hash(revision),
                ready: *ready,
            })
        };
        Observed {
            now: self.now,
            config: &self.config,
            deployment: d.clone(),
            stable_rs: rs_view(d.stable_revision.unwrap_or(d.template_revision)),
            new_rs: rs_view(d.template_revision),
            candidates: self.candidates.iter().map(|c| c.view.clone()).collect(),
            provider: self.sc.provider,
            hosts: vec![if self.sc.provider == ProviderKind::None {
                HostRouting::absent(SERVICE)
            } else {
                HostRouting {
                    service: SERVICE.into(),
                    route_at_rest: false,
                    route: self.vs.clone().map_or(Managed::Absent, |mut vs| {
                        let everywhere = self
                            .proxies
                            .iter()
                            .all(|p| p.routes.last().is_none_or(|s| s.at <= self.now));
                        vs.synced = if self.sc.route_status && everywhere {
                            Synced::Reported
                        } else {
                            Synced::Unknown
                        };
                        Managed::Ours(vs)
                    }),
                    backends: self.dr.clone().map_or(Managed::Absent, |mut dr| {
                        let everywhere = self
                            .proxies
                            .iter()
                            .all(|p| p.rules.last().is_none_or(|s| s.at <= self.now));
                        // Per-version Services have no status: only Istio reports a rule pushed.
                        let reports = self.sc.route_status && self.sc.provider == ProviderKind::Istio;
                        dr.synced = if reports && everywhere {
                            Synced::Reported
                        } else {
                            Synced::Unknown
                        };
                        Managed::Ours(dr)
                    }),
                }
            }],
            routing_unavailable: None,
            verdict,
            opted_out: self.opted_out,
        }
    }

    /// The user's change, through the webhook's decision.
    fn user(&mut self, action: UserAction) {
        // Known gap, left out of the model: a new template after a bypass whose candidate never became
        // available waits for a baseline that no longer exists (traffic stays on the plain host).
        if self.bypass_seen || self.opted_out {
            return;
        }
        let d = &mut self.deployment;
        let current = d.template_revision;
        match action {
            UserAction::SetImage { bad } => {
                let in_flight = d.stable_revision.filter(|s| *s != current);
                self.counter += 1;
                let revision = self.counter;
                self.bad.insert(revision, bad);
                d.template_hash = template_hash(revision, 0);
                self.templates.insert(revision, d.template_hash.clone());
                d.stable_revision = Some(in_flight.unwrap_or(current));
                d.template_revision = revision;
                d.paused = true;
            }
            UserAction::Revert => {
                let Some(stable) = d.stable_revision.filter(|s| *s != current) else {
                    return;
                };
                d.template_revision = stable;
                d.template_hash = self
                    .templates
                    .get(&stable)
                    .cloned()
                    .unwrap_or_else(|| template_hash(stable, 0));
                d.paused = false;
            }
            UserAction::Bypass => {
                // A resume during a release before hand-off: the safety net's case. (After a failure
                // the route is already the plain host, so a resume there is a plain native rollout.)
                let before_hand_off = matches!(
                    d.status.phase,
                    Some(Phase::Pending | Phase::Progressing | Phase::Promoting)
                ) && d.stable_revision.is_some_and(|s| s != current);
                if d.paused && before_hand_off {
                    self.bypass_seen = true;
                    d.paused = false;
                    // The pods this replaces at once are the user's doing, not turnout's.
                    self.bypassed = true;
                }
            }
            UserAction::Request(verb) => {
                if let Ok(release) = admissible(d, verb) {
                    d.request = Some(Request::Valid { verb, release });
                }
            }
            UserAction::Heal => {
                let revision = d.template_revision;
                self.bad.insert(revision, false);
            }
            UserAction::OptOut => self.opted_out = true,
            UserAction::UnheldEdit => {
                // Unpaused, the edit would roll out at once: the unheld rollout the safety net reports.
                if d.paused {
                    self.edits += 1;
                    d.template_hash = template_hash(current, self.edits);
                    self.templates.insert(current, d.template_hash.clone());
                }
            }
        }
        self.deployment_controller();
    }

    /// Pods of ReplicaSet `hash` stop serving now: no proxy may have routed to them within the drain
    /// window (I3).
    fn terminate(&mut self, hash: &str, what: &str) {
        if self.sc.provider == ProviderKind::None {
            // Without a mesh the Service selects every ready pod: a terminating pod leaves the
            // endpoints only as it terminates, so I3 cannot hold (the README says so); the model checks
            // the rest. A held candidate (every one turnout makes without a mesh) is the exception: its
            // pods leave the Service before they stop, and must have been out of it for the
            // propagation delay and the drain.
            let held = self
                .candidates
                .iter()
                .find(|c| c.view.held && candidate_hash(c.view.revision) == hash);
            if let Some(c) = held {
                let drained = self.sc.propagation_ms + self.sc.drain_ms;
                if c.serving || c.out_since.is_some_and(|at| at + drained > self.now) {
                    self.fail(format!(
                        "I3: held {what} terminated while in the Service or within {drained} ms of leaving it \
                         (serving: {}, out since {:?})",
                        c.serving, c.out_since
                    ));
                }
            }
            return;
        }
        let from = self.now.saturating_sub(self.sc.drain_ms);
        let mut at = from;
        while at <= self.now {
            if let Some(p) = self.proxies.iter().position(|p| p.selects(at, hash)) {
                let route = self.proxies[p].route(at);
                self.fail(format!(
                    "I3: {what} terminated while proxy {p} routed to it at t={at}ms ({route:?})"
                ));
                return;
            }
            at += TICK;
        }
    }

    /// The native Deployment controller: a paused Deployment changes nothing; otherwise the current
    /// ReplicaSet's pods are replaced (the old ones stop serving at once: the worst case).
    fn deployment_controller(&mut self) {
        let d = &self.deployment;
        let target = d.template_revision;
        if d.paused {
            self.deployment.rollout_complete = false;
            return;
        }
        let serving: Vec<u64> = self
            .rs
            .ready
            .iter()
            .filter(|(rev, ready)| **rev != target && **ready > 0)
            .map(|(rev, _)| *rev)
            .collect();
        if !serving.is_empty() || self.rs.ready.get(&target).copied().unwrap_or(0) < REPLICAS {
            if self.rs.rolling.map(|(rev, _)| rev) != Some(target) {
                let bypassed = std::mem::take(&mut self.bypassed);
                for rev in serving {
                    if !bypassed {
                        self.terminate(&rs_hash(rev), &format!("ReplicaSet v{rev}"));
                    }
                    self.rs.ready.insert(rev, 0);
                }
                let done = self.now + TICK + self.rng.delay(3_000);
                self.rs.rolling = Some((target, done));
                self.rs.ready.entry(target).or_insert(0);
            }
            if let Some((rev, done)) = self.rs.rolling
                && self.now >= done
            {
                self.rs.ready.insert(rev, REPLICAS);
                self.rs.rolling = None;
            }
        }
        self.deployment.rollout_complete =
            self.rs.rolling.is_none() && self.rs.ready.get(&target).copied() == Some(REPLICAS);
        if self.deployment.rollout_complete {
            // The controller reports a completed rollout as progressing again.
            self.deployment.rollout_failed = false;
        }
    }

    fn candidates_progress(&mut self) {
        let now = self.now;
        for c in &mut self.candidates {
            if c.view.hash.is_none() {
                c.view.hash = Some(candidate_hash(c.view.revision));
            }
            if let Some(at) = c.available_at.filter(|at| now >= *at && !c.view.deleting)
                && !c.view.available
            {
                c.view.available = true;
                c.view.ready_at = at;
            }
        }
        self.candidates.retain(|c| c.gone_at.is_none_or(|at| now < at));
    }

    /// Every proxy sees a write after its own delay, in order.
    fn propagate<T: Clone>(rng: &mut Rng, max: Millis, now: Millis, histories: Vec<&mut Vec<Seen<T>>>, value: &T) {
        for history in histories {
            let after = history.last().map_or(0, |s| s.at);
            let at = (now + rng.delay(max)).max(after);
            history.push(Seen {
                at,
                value: value.clone(),
            });
        }
    }

    fn apply(&mut self, action: Action) {
        self.actions += 1;
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!(
                "t={} phase={:?} rel={:?} tpl={} stable={:?} rs={:?} {:?}",
                self.now,
                self.deployment.status.phase,
                self.deployment.status.release,
                self.deployment.template_revision,
                self.deployment.stable_revision,
                self.rs.ready,
                action
            );
        }
        match action {
            Action::Routing(RoutingAction::PutBackends { host, backends }) => {
                assert_eq!(host, 0);
                let named = self.vs.as_ref().and_then(|vs| {
                    vs.value
                        .backends()
                        .find(|p| !backends.iter().any(|s| s.name == *p))
                        .map(str::to_owned)
                });
                if let Some(p) = named {
                    self.fail(format!("I2: backend {p} removed while the route names it"));
                }
                let removed: Vec<String> = self.dr.as_ref().map_or(Vec::new(), |dr| {
                    dr.value
                        .iter()
                        .filter(|old| !backends.iter().any(|b| b.name == old.name))
                        .map(|old| old.name.clone())
                        .collect()
                });
                let drained = self.sc.propagation_ms + self.sc.drain_ms;
                for name in removed {
                    if let Some(at) = self.last_named.get(&name)
                        && at + drained > self.now
                    {
                        self.fail(format!(
                            "I2: backend {name} removed {} ms after a route last named it (propagation + drain: {drained} ms)",
                            self.now - at
                        ));
                    }
                }
                let changed = self.dr.as_ref().and_then(|dr| {
                    dr.value
                        .iter()
                        .find(|old| backends.iter().any(|s| s.name == old.name && s.hash != old.hash))
                        .map(|old| old.name.clone())
                });
                if let Some(name) = changed {
                    self.fail(format!("backend {name} changed its selector"));
                }
                let histories = self.proxies.iter_mut().map(|p| &mut p.rules).collect();
                Self::propagate(&mut self.rng, self.sc.propagation_ms, self.now, histories, &backends);
                self.dr = Some(Applied {
                    value: backends,
                    changed_at: self.now,
                    synced: Synced::Unknown,
                });
            }
            Action::Routing(RoutingAction::PutRoute { host, route }) => {
                assert_eq!(host, 0);
                if let Route::Split(split) = &route {
                    let sum: u32 = split.weights.iter().map(|p| u32::from(p.weight)).sum();
                    if sum != 100 {
                        self.fail(format!("I4: weights sum to {sum}: {route:?}"));
                    }
                }
                let histories = self.proxies.iter_mut().map(|p| &mut p.routes).collect();
                Self::propagate(&mut self.rng, self.sc.propagation_ms, self.now, histories, &route);
                // The backends the route named until now were named until this write.
                if let Some(before) = &self.vs {
                    for name in before.value.backends() {
                        self.last_named.insert(name.to_owned(), self.now);
                    }
                }
                for name in route.backends() {
                    self.last_named.insert(name.to_owned(), self.now);
                }
                self.vs = Some(Applied {
                    value: route,
                    changed_at: self.now,
                    synced: Synced::Unknown,
                });
            }
            Action::CreateCandidate {
                revision,
                replicas,
                held,
            } => {
                let no_mesh = self.sc.provider == ProviderKind::None;
                if held != no_mesh {
                    self.fail(format!("candidate held: {held}, with provider {}", self.sc.provider));
                }
                let blue_green = self.config.strategy == Strategy::BlueGreen;
                if no_mesh && blue_green && replicas != Some(candidate_replicas(self.deployment.replicas, 100)) {
                    self.fail(format!("blue/green candidate sized {replicas:?}, not at full size"));
                }
                if no_mesh && !blue_green && replicas != Some(0) {
                    self.fail(format!("canary candidate sized {replicas:?}, not empty"));
                }
                if replicas.is_some() != no_mesh {
                    self.fail(format!(
                        "candidate sized {replicas:?} with provider {}",
                        self.sc.provider
                    ));
                }
                if revision != self.deployment.template_revision {
                    self.fail(format!(
                        "candidate v{revision} created for template v{}",
                        self.deployment.template_revision
                    ));
                }
                let name = crate::names::candidate_name(SERVICE, revision);
                if self.candidates.iter().any(|c| c.view.name == name) {
                    self.fail(format!("candidate {name} created twice"));
                    return;
                }
                let available_at = match replicas {
                    // No pods to wait for.
                    Some(0) => Some(self.now + TICK),
                    _ => self
                        .sc
                        .candidate_ready_ms
                        .map(|max| self.now + TICK + self.rng.delay(max)),
                };
                let scale = replicas.map(|_| Scale {
                    weight: 0,
                    at: self.now,
                });
                self.candidates.push(Candidate {
                    view: CandidateView {
                        name,
                        revision,
                        hash: None,
                        available: false,
                        pods: REPLICAS as u32,
                        restarts: 0,
                        created_at: self.now,
                        deleting: false,
                        template_hash: Some(self.deployment.template_hash.clone()),
                        scale,
                        held,
                        replicas: replicas.unwrap_or(REPLICAS),
                        misplaced: 0,
                        ready_at: 0,
                    },
                    available_at,
                    gone_at: None,
                    serving: false,
                    out_since: None,
                });
            }
            Action::ScaleCandidate { name, replicas, weight } => {
                if self.sc.provider != ProviderKind::None {
                    self.fail(format!("{name} scaled with provider {}", self.sc.provider));
                }
                let Some(i) = self.candidates.iter().position(|c| c.view.name == name) else {
                    self.fail(format!("scaled {name}, which does not exist"));
                    return;
                };
                let view = &self.candidates[i].view;
                let (held, current) = (view.held, view.revision == self.deployment.template_revision);
                // Held pods leave the Service with their candidate's size kept: they stop only once drained.
                let expected = if held && weight == 0 {
                    view.replicas
                } else {
                    candidate_replicas(self.deployment.replicas, weight)
                };
                if replicas != expected || replicas > REPLICAS {
                    self.fail(format!("{name} scaled to {replicas} for weight {weight}"));
                }
                let d = &self.deployment;
                let promoted = d.request
                    == Some(Request::Valid {
                        verb: Verb::Promote,
                        release: d.template_revision,
                    });
                let standing_by =
                    d.status.phase == Some(Phase::Progressing) && d.status.iteration < self.config.iterations;
                let blue_green = self.config.strategy == Strategy::BlueGreen;
                if held && blue_green && weight > 0 && current && standing_by && !promoted && !self.bypass_seen {
                    self.fail(format!("held {name} put in the Service before its iterations passed"));
                }
                if weight != 0 && weight != 100 && !self.config.steps.contains(&weight) {
                    self.fail(format!("{name} scaled for weight {weight}, not a step"));
                }
                let ready_ms = self.sc.candidate_ready_ms;
                let delay = ready_ms.map(|max| self.now + TICK + self.rng.delay(max));
                if self.candidates[i].view.deleting {
                    self.fail(format!("scaled {name} while it is being deleted"));
                }
                let cut_short = self.rng.chance(self.sc.crash_rate);
                let now = self.now;
                let c = &mut self.candidates[i];
                let before = c.view.scale.map_or(100, |s| s.weight);
                let grown = replicas > c.view.replicas;
                c.view.scale = Some(Scale { weight, at: self.now });
                let added = u32::try_from(replicas - c.view.replicas).unwrap_or(0);
                c.view.replicas = replicas;
                if c.view.held {
                    // The weight is recorded, then the pods are placed: a crash may come in between.
                    if cut_short {
                        c.view.misplaced = u32::try_from(replicas).unwrap_or(0);
                    } else {
                        Self::place(c, weight > 0, now);
                        // Pods the ReplicaSet adds start from the template, out of the Service.
                        if weight > 0 {
                            c.view.misplaced = added;
                        }
                    }
                }
                if (c.view.held && grown) || (!c.view.held && weight > before) {
                    // New pods: available once they are ready (never, for a candidate that fails to start).
                    c.view.available = false;
                    c.available_at = delay;
                }
            }
            Action::PlaceCandidatePods { name, serving } => {
                let now = self.now;
                let Some(i) = self.candidates.iter().position(|c| c.view.name == name) else {
                    self.fail(format!("placed the pods of {name}, which does not exist"));
                    return;
                };
                let view = &self.candidates[i].view;
                if !view.held || view.scale.is_none_or(|s| (s.weight > 0) != serving) {
                    self.fail(format!("placed the pods of {name} against its weight: {view:?}"));
                }
                let c = &mut self.candidates[i];
                if let Some(scale) = c.view.scale.as_mut() {
                    // Pods join or leave the Service: the propagation (and the drain before their
                    // deletion) counts from here.
                    scale.at = now;
                }
                Self::place(c, serving, now);
            }
            Action::DeleteCandidate { name } => {
                let Some(i) = self.candidates.iter().position(|c| c.view.name == name) else {
                    self.fail(format!("deleted {name}, which does not exist"));
                    return;
                };
                let revision = self.candidates[i].view.revision;
                self.terminate(&candidate_hash(revision), &format!("candidate {name}"));
                let gone = self.now + TICK + self.rng.delay(2_000);
                let c = &mut self.candidates[i];
                c.view.deleting = true;
                c.view.available = false;
                c.gone_at = Some(gone);
            }
            Action::Status(patch) => {
                if let Some(kind) = patch.notifies(&self.deployment.status) {
                    self.notified.push((patch.release, kind));
                }
                let handed_back = patch.unpause && patch.phase == Phase::HandedBack;
                if handed_back && !self.opted_out {
                    self.fail("handed back while opted in".into());
                }
                if handed_back {
                    // From here the Deployment's own controller replaces the pods: what opting out asks.
                    self.bypassed = true;
                } else if patch.unpause && patch.phase != Phase::HandingOff {
                    // I5: the stable ReplicaSet only shrinks at hand-off.
                    self.fail(format!("unpaused in phase {}", patch.phase));
                } else if patch.unpause {
                    // What the Deployment rolls out is what the candidate ran and was analysed on.
                    let d = &self.deployment;
                    let ran = self
                        .candidates
                        .iter()
                        .find(|c| c.view.revision == d.template_revision)
                        .and_then(|c| c.view.template_hash.clone());
                    if ran.as_ref().is_some_and(|h| *h != d.template_hash) {
                        self.fail(format!(
                            "handed off template {} while the candidate ran {ran:?}",
                            d.template_hash
                        ));
                    }
                    // Without a mesh the stable pods keep serving until they are replaced: a promoted
                    // candidate is at full size and ready by then, to carry the traffic they leave.
                    let promoted = patch.phase == Phase::HandingOff && !self.bypassed && !self.bypass_seen;
                    let revision = self.deployment.template_revision;
                    let unready = self
                        .candidates
                        .iter()
                        .find(|c| c.view.revision == revision)
                        .filter(|c| !c.view.available || c.view.scale.is_none_or(|s| s.weight < 100))
                        .map(|c| c.view.clone());
                    if self.sc.provider == ProviderKind::None
                        && promoted
                        && let Some(c) = unready
                    {
                        self.fail(format!(
                            "handed off while the candidate is not ready at full size: {c:?}"
                        ));
                    }
                }
                let d = &mut self.deployment;
                if patch.unpause {
                    d.paused = false;
                }
                if patch.clear_request {
                    d.request = None;
                }
                match patch.rollout {
                    Rollout::Keep => {}
                    Rollout::Fail => d.rollout_failed = true,
                    Rollout::Restart => d.rollout_failed = false,
                }
                if d.rollout_failed && matches!(patch.phase, Phase::Progressing | Phase::Promoting) {
                    // `kubectl rollout status` would report a release that is moving as failed.
                    self.failures.push(format!(
                        "t={}ms: {} written while the rollout condition says failed",
                        self.now, patch.phase
                    ));
                }
                match patch.intent {
                    Intent::Keep => {}
                    Intent::Clear => d.stable_revision = None,
                    Intent::Stable(n) => d.stable_revision = Some(n),
                }
                d.status = StatusView {
                    phase: Some(patch.phase),
                    release: Some(patch.release),
                    weight: patch.weight,
                    failed_checks: patch.failed_checks,
                    iteration: patch.iteration,
                    paused: patch.paused,
                };
                self.deployment_controller();
            }
            Action::ClearRequest => self.deployment.request = None,
            Action::Analyse { .. } | Action::Wait { .. } => unreachable!("not a write"),
        }
    }

    /// The pods of held candidate `c` join the Service (`serving`) or leave it.
    fn place(c: &mut Candidate, serving: bool, now: Millis) {
        c.view.misplaced = 0;
        if serving != c.serving {
            c.serving = serving;
            c.out_since = (!serving).then_some(now);
        }
    }

    /// A bad image fails every check but readiness: a blue/green standby on readiness alone passes it.
    fn verdict(&mut self, revision: u64, stage: Stage) -> Verdict {
        self.checks += 1;
        if self.deployment.status.paused {
            self.analysed_while_paused += 1;
        }
        let bad = self.bad.get(&revision).copied().unwrap_or(false) && !matches!(stage, Stage::Standby { .. });
        // Without a mesh the candidate's share is measured only once its pods' endpoints have spread.
        let serving = self
            .candidates
            .iter()
            .find(|c| c.view.revision == revision && !c.view.deleting && c.view.scale.is_some_and(|s| s.weight > 0));
        if self.sc.provider == ProviderKind::None
            && matches!(stage, Stage::Step { .. })
            && let Some(c) = serving
            && c.view.ready_at + self.sc.propagation_ms > self.now
        {
            self.fail(format!(
                "analysed {} {} ms after its pods were ready (propagation: {} ms)",
                c.view.name,
                self.now - c.view.ready_at,
                self.sc.propagation_ms
            ));
        }
        let passed = !bad && !self.rng.chance(self.sc.flake_rate);
        Verdict {
            passed,
            message: if passed {
                "checks passed".into()
            } else {
                "success rate 50% < 99%".into()
            },
        }
    }

    /// The agent: plans until it waits; a crash may drop any write (the next pass starts from scratch).
    fn agent(&mut self) {
        for _ in 0..20 {
            let plan = plan(&self.observe(None));
            let (action, event) = match plan.action {
                Action::Wait { .. } => return,
                Action::Analyse { revision, stage } => {
                    self.stages.push(stage);
                    if stage == Stage::PreRollout && self.deployment.status.weight > 0 {
                        self.fail("pre-rollout hook called after the first step".into());
                    }
                    let verdict = self.verdict(revision, stage);
                    let plan = plan_with(self, verdict);
                    match plan.action {
                        Action::Wait { .. } => return,
                        Action::Analyse { .. } => {
                            self.fail("asked for analysis twice".into());
                            return;
                        }
                        action => (action, plan.event),
                    }
                }
                action => (action, plan.event),
            };
            if self.rng.chance(self.sc.crash_rate) {
                return;
            }
            self.apply(action);
            self.reasons.extend(event.map(|e| e.reason));
        }
        self.fail("no wait after 20 actions in one pass".into());
    }

    /// I1 and I2 as every proxy sees them: a route only names backends defined for it.
    fn check_proxies(&mut self) {
        let now = self.now;
        let mut broken = None;
        for (i, p) in self.proxies.iter().enumerate() {
            let route = p.route(now);
            let rules = p.rules(now);
            if let Some(part) = route.backends().find(|part| !rules.iter().any(|s| s.name == *part)) {
                broken = Some(format!("I1/I2: proxy {i} routes to backend {part} it does not know"));
            }
        }
        if let Some(b) = broken {
            self.fail(b);
        }
    }

    fn run(mut self) -> Result<World, String> {
        self.run_to(None)?;
        Ok(self)
    }

    /// Runs the scenario until it comes to rest after its last event, or until `stop`.
    fn run_to(&mut self, stop: Option<Millis>) -> Result<(), String> {
        let mut events = self.sc.events.clone();
        events.sort_by_key(|(at, _)| *at);
        let last = events.last().map_or(0, |(at, _)| *at);
        let end = last + 600_000;
        let mut next = events.iter().filter(|(at, _)| *at < self.now).count();
        while self.now <= end && stop.is_none_or(|stop| self.now < stop) {
            while next < events.len() && events[next].0 <= self.now {
                self.user(events[next].1);
                next += 1;
            }
            self.deployment_controller();
            self.candidates_progress();
            self.agent();
            self.check_proxies();
            let paused = self.deployment.status.paused;
            if next == events.len() && paused && self.deployment.request.is_none() && self.now >= last + 30_000 {
                // A person resumes a paused release in the end.
                self.user(UserAction::Request(Verb::Resume));
            }
            if !self.failures.is_empty() {
                return Err(self.failures.join("\n"));
            }
            if next == events.len() && self.quiet() {
                break;
            }
            self.now += TICK;
        }
        Ok(())
    }

    /// The last release ended and everything is at rest, or (a release that failed after superseding
    /// one during its hand-off) all traffic is on the previous candidate, its baseline.
    fn quiet(&self) -> bool {
        let d = &self.deployment;
        let failed = d.status.phase == Some(Phase::Failed);
        let at_rest = self.candidates.is_empty()
            && self.vs.as_ref().is_none_or(|vs| vs.value == Route::Host)
            && self.dr.as_ref().is_none_or(|dr| dr.value.is_empty())
            && self
                .proxies
                .iter()
                .all(|p| p.route(self.now) == Route::Host && p.rules(self.now).is_empty())
            && self.rs.rolling.is_none();
        d.stable_revision.is_none_or(|_| failed)
            && (d.status.phase.is_some_and(Phase::is_final) || (self.opted_out && d.status.phase.is_none()))
            && (at_rest || (failed && self.on_baseline().is_some_and(|b| Some(b) != d.status.release)))
            && matches!(plan(&self.observe(None)).action, Action::Wait { until: None, .. })
    }

    /// The one candidate left when every proxy sends all traffic to it.
    fn on_baseline(&self) -> Option<u64> {
        let [c] = self.candidates.as_slice() else { return None };
        if self.sc.provider == ProviderKind::None {
            // Without a mesh: the candidate at full size next to the stable side.
            let full = c.view.scale.is_some_and(|s| s.weight == 100);
            return (c.view.available && full).then_some(c.view.revision);
        }
        let all = Route::weights(vec![Weighted {
            backend: crate::names::backends::canary(c.view.revision),
            weight: 100,
        }]);
        let routed = self.vs.as_ref().is_some_and(|vs| vs.value == all);
        (c.view.available && routed && self.proxies.iter().all(|p| p.route(self.now) == all)).then_some(c.view.revision)
    }
}

fn plan_with(w: &World, verdict: Verdict) -> Plan {
    plan(&w.observe(Some(verdict)))
}

/// Checks the end state of a scenario (I6 and liveness).
fn check_end(w: &World) -> Result<(), String> {
    if !w.quiet() {
        return Err(format!(
            "never came to rest: phase {:?}, candidates {:?}, route {:?}, rules {:?}, rolling {:?}, next plan {:?}",
            w.deployment.status.phase,
            w.candidates.iter().map(|c| &c.view).collect::<Vec<_>>(),
            w.vs,
            w.dr,
            w.rs.rolling,
            plan(&w.observe(None)).action
        ));
    }
    let d = &w.deployment;
    // The release that ended was notified with its result, after everything else about it (a retried
    // one may have been notified of a failure before).
    let last = d
        .status
        .release
        .and_then(|r| w.notified.iter().rev().find(|(n, _)| *n == r));
    let expected = match d.status.phase {
        Some(Phase::Succeeded) => Some(HookKind::PostRollout),
        Some(Phase::Failed) => Some(HookKind::Rollback),
        _ => None,
    };
    if expected.is_some() && last.map(|(_, k)| *k) != expected {
        return Err(format!("ended {:?}, last notified {last:?}", d.status.phase));
    }
    let serving: Vec<u64> = w.rs.ready.iter().filter(|(_, r)| **r > 0).map(|(v, _)| *v).collect();
    let expected = match d.status.phase {
        Some(Phase::Succeeded | Phase::RolledBack) => d.template_revision,
        // Handed back: unpaused, the Deployment's own controller rolled its template out.
        Some(Phase::HandedBack) => {
            if d.paused || d.stable_revision.is_some() {
                return Err("handed back, but still paused or with a release intent".into());
            }
            d.template_revision
        }
        // I6: a rolled-back release ends on the stable ReplicaSet, the Deployment paused.
        Some(Phase::Failed) => {
            if !d.paused {
                return Err("failed release left the Deployment unpaused".into());
            }
            if let Some(baseline) = w.on_baseline() {
                // I6 with the previous candidate as the stable backend: the failed candidate is gone.
                if Some(baseline) == d.status.release {
                    return Err(format!("traffic left on the failed candidate v{baseline}"));
                }
                return Ok(());
            }
            d.stable_revision.unwrap_or(0)
        }
        // Opted out before any release: nothing went through turnout.
        None if w.opted_out => d.template_revision,
        other => return Err(format!("ended in phase {other:?}")),
    };
    if serving != [expected] {
        return Err(format!("serving ReplicaSets {serving:?}, expected only v{expected}"));
    }
    Ok(())
}

/// The template hash of revision `revision` after `edits` unheld edits.
fn template_hash(revision: u64, edits: u32) -> String {
    format!("t{revision}-e{edits}")
}

fn scenario() -> impl Gen<Value = Scenario> {
    let steps = prop::collection::btree_set(1u8..100, 0..4).prop_map(|s| {
        let mut v: Vec<u8> = s.into_iter().collect();
        v.push(100);
        v
    });
    let action = prop_oneof![
        6 => any::<bool>().prop_map(|bad| UserAction::SetImage { bad }),
        2 => Just(UserAction::Revert),
        1 => Just(UserAction::Bypass),
        4 => prop::sample::select(Verb::ALL.to_vec()).prop_map(UserAction::Request),
        1 => Just(UserAction::Heal),
        1 => Just(UserAction::OptOut),
        1 => Just(UserAction::UnheldEdit),
    ];
    let events = (any::<bool>(), prop::collection::vec((0u64..400, action), 0..6)).prop_map(|(bad, mut rest)| {
        rest.iter_mut().for_each(|(at, _)| *at *= TICK);
        rest.push((0, UserAction::SetImage { bad }));
        rest
    });
    (
        any::<u64>(),
        (0u64..=20, 0u64..=30, 1u64..=20),
        (1u32..=3, steps, 1usize..=4),
        (
            prop_oneof![3 => Just(0.0), 1 => 0.0f64..0.4],
            prop_oneof![3 => Just(0.0), 1 => 0.0f64..0.3],
        ),
        prop_oneof![10 => (0u64..=50).prop_map(|t| Some(t * TICK)), 1 => Just(None)],
        (
            events,
            any::<bool>(),
            any::<bool>(),
            prop::sample::select(ProviderKind::ALL.to_vec()),
        ),
        (
            prop_oneof![
                3 => Just(Strategy::Canary),
                2 => Just(Strategy::AB),
                2 => Just(Strategy::BlueGreen)
            ],
            prop_oneof![3 => Just(false), 1 => Just(true)],
            1u32..=4,
            prop_oneof![3 => Just(None), 1 => (1u8..=100).prop_map(Some)],
            prop_oneof![3 => Just(false), 1 => Just(true)],
        ),
    )
        .prop_map(
            |(
                seed,
                (prop, drain, interval),
                (threshold, steps, proxies),
                (crash_rate, flake_rate),
                ready,
                (events, route_status, gates, provider),
                (strategy, matched, iterations, mirror, sticky),
            )| {
                Scenario {
                    seed,
                    propagation_ms: prop * TICK,
                    drain_ms: drain * TICK,
                    interval_ms: interval * TICK,
                    threshold,
                    steps,
                    proxies,
                    crash_rate,
                    flake_rate,
                    candidate_ready_ms: ready,
                    provider,
                    route_status,
                    gates,
                    strategy,
                    matched,
                    iterations,
                    mirror,
                    sticky,
                    events,
                }
            },
        )
}

proptest! {
    // PROPTEST_CASES=20000 for a deeper search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300),
        ..ProptestConfig::default()
    })]

    /// I1–I6 hold at every tick of every generated scenario, and every scenario comes to rest.
    #[test]
    fn invariants_hold(sc in scenario()) {
        let world = World::new(sc).run().map_err(TestCaseError::fail)?;
        check_end(&world).map_err(TestCaseError::fail)?;
    }
}

fn single(bad: bool) -> Scenario {
    Scenario {
        seed: 7,
        propagation_ms: 1_000,
        drain_ms: 2_000,
        interval_ms: 1_000,
        threshold: 2,
        steps: vec![10, 50, 100],
        proxies: 3,
        crash_rate: 0.0,
        flake_rate: 0.0,
        candidate_ready_ms: Some(1_000),
        provider: ProviderKind::Istio,
        route_status: false,
        gates: false,
        strategy: Strategy::Canary,
        matched: false,
        iterations: 3,
        mirror: None,
        sticky: false,
        events: vec![(0, UserAction::SetImage { bad })],
    }
}

#[test]
fn a_healthy_release_is_promoted_through_every_step() {
    let w = World::new(single(false)).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
    assert_eq!(w.deployment.template_revision, 2);
    assert_eq!(w.checks, 3, "one analysis per step");
    assert!(!w.deployment.paused);
}

#[test]
fn without_a_mesh_each_step_scales_the_candidate_and_the_stable_side_stays() {
    for bad in [false, true] {
        let mut sc = single(bad);
        sc.provider = ProviderKind::None;
        let mut w = World::new(sc);
        let mut sizes = Vec::new();
        let mut stable_min = i32::MAX;
        while w.now < 120_000 && !w.quiet() {
            w.run_to(Some(w.now + TICK)).unwrap();
            stable_min = stable_min.min(w.rs.ready.get(&1).copied().unwrap_or(0));
            if let Some(s) = w.candidates.first().and_then(|c| c.view.scale)
                && sizes.last() != Some(&s.weight)
            {
                sizes.push(s.weight);
            }
            if w.deployment.paused {
                assert!(
                    stable_min >= REPLICAS,
                    "I5: the stable side keeps its size before hand-off"
                );
            }
        }
        check_end(&w).unwrap();
        if bad {
            assert_eq!(w.deployment.status.phase, Some(Phase::Failed));
            assert_eq!(
                sizes,
                [0, 10, 0],
                "rolled back at the first step: out of the Service, then deleted"
            );
            assert!(w.candidates.is_empty(), "I6: the candidate is gone");
        } else {
            assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
            assert_eq!(
                sizes,
                [0, 10, 50, 100, 0],
                "one size per step, out of the Service before deletion"
            );
        }
    }
}

/// Runs `sc` tick by tick, recording every distinct route turnout wrote.
fn routes_of(sc: Scenario) -> (World, Vec<Route>) {
    let mut w = World::new(sc);
    let mut routes: Vec<Route> = Vec::new();
    while w.now < 300_000 && !w.quiet() {
        w.run_to(Some(w.now + TICK)).unwrap();
        if let Some(vs) = &w.vs
            && routes.last() != Some(&vs.value)
        {
            routes.push(vs.value.clone());
        }
    }
    (w, routes)
}

#[test]
fn an_a_b_test_sends_only_the_requests_that_match_then_everything_after_its_iterations() {
    let mut sc = single(false);
    sc.strategy = Strategy::AB;
    sc.iterations = 4;
    let (w, routes) = routes_of(sc);
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
    assert_eq!(w.checks, 4, "one analysis per iteration, none at 100 %");
    assert_eq!(w.deployment.status.iteration, 4);
    let ab = routes
        .iter()
        .find(|r| r.matched_backend() == Some("v2-canary"))
        .expect("an A/B route");
    assert_eq!(
        ab.weight_of("v1"),
        100,
        "every other request on the stable version: {ab:?}"
    );
    assert_eq!(ab.weight_of("v2-canary"), 0);
    // No step in between: from the A/B route straight to all traffic on the candidate.
    let after = routes
        .iter()
        .skip_while(|r| r.matched_backend().is_none())
        .find(|r| r.matched_backend().is_none())
        .unwrap();
    assert_eq!(after.weight_of("v2-canary"), 100, "{routes:?}");
}

#[test]
fn an_a_b_test_mixes_with_mirroring_and_affinity() {
    let mut sc = single(false);
    sc.strategy = Strategy::AB;
    sc.mirror = Some(30);
    sc.sticky = true;
    let (w, routes) = routes_of(sc);
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
    let ab = routes
        .iter()
        .find(|r| r.matched_backend() == Some("v2-canary"))
        .expect("an A/B route");
    let Route::Split(split) = ab else { unreachable!() };
    assert_eq!(
        split.mirror.as_ref().map(|m| (m.backend.as_str(), m.percent)),
        Some(("v2-canary", 30))
    );
    assert_eq!(split.sticky.as_ref().map(|s| s.backend.as_str()), Some("v2-canary"));
    assert_eq!(ab.weight_of("v1"), 100, "{ab:?}");
    assert_eq!(w.checks, 3, "the test's iterations: no separate mirror stage");
}

#[test]
fn a_failing_a_b_test_is_rolled_back_without_weight_on_the_candidate() {
    let mut sc = single(true);
    sc.strategy = Strategy::AB;
    let (w, routes) = routes_of(sc);
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Failed));
    assert!(routes.iter().all(|r| r.weight_of("v2-canary") == 0), "{routes:?}");
    assert!(routes.iter().any(|r| r.matched_backend() == Some("v2-canary")));
    assert!(w.candidates.is_empty(), "I6: the candidate is gone");
}

#[test]
fn a_canary_with_matches_sends_them_to_the_candidate_from_the_first_step() {
    let mut sc = single(false);
    sc.matched = true;
    let (w, routes) = routes_of(sc);
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
    let steps: Vec<(u8, bool)> = routes
        .iter()
        .filter(|r| r.weight_of("v2-canary") > 0)
        .map(|r| (r.weight_of("v2-canary"), r.matched_backend() == Some("v2-canary")))
        .collect();
    assert_eq!(steps, [(10, true), (50, true), (100, false)]);
}

#[test]
fn a_mirrored_canary_copies_requests_for_its_iterations_before_the_first_step() {
    for bad in [false, true] {
        let mut sc = single(bad);
        sc.mirror = Some(20);
        sc.iterations = 2;
        let (w, routes) = routes_of(sc);
        check_end(&w).unwrap();
        let mirrored: Vec<&Route> = routes
            .iter()
            .filter(|r| r.mirror_backend() == Some("v2-canary"))
            .collect();
        assert!(!mirrored.is_empty(), "{routes:?}");
        assert!(
            mirrored.iter().all(|r| r.weight_of("v1") == 100),
            "every answer from the stable version while mirroring: {mirrored:?}"
        );
        let first_live = routes.iter().position(|r| r.weight_of("v2-canary") > 0);
        let last_mirror = routes.iter().rposition(|r| r.mirror_backend().is_some()).unwrap();
        if bad {
            assert_eq!(w.deployment.status.phase, Some(Phase::Failed));
            assert_eq!(
                first_live, None,
                "a failing candidate never got live traffic: {routes:?}"
            );
            assert_eq!(w.checks, 2, "threshold failed analyses while mirroring");
        } else {
            assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
            assert!(
                first_live.unwrap() > last_mirror,
                "mirroring first, then the steps: {routes:?}"
            );
            assert_eq!(w.checks, 2 + 3, "the mirror's iterations, then one analysis per step");
        }
    }
}

#[test]
fn a_sticky_canary_keeps_its_users_through_the_steps_and_lets_go_at_all_traffic() {
    let mut sc = single(false);
    sc.sticky = true;
    let (w, routes) = routes_of(sc);
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
    let sticky = |r: &Route| matches!(r, Route::Split(routing::Split { sticky: Some(s), .. }) if s.backend == "v2-canary" && s.cookie == "turnout-canary");
    let steps: Vec<(u8, bool)> = routes
        .iter()
        .filter(|r| r.weight_of("v2-canary") > 0)
        .map(|r| (r.weight_of("v2-canary"), sticky(r)))
        .collect();
    assert_eq!(steps, [(10, true), (50, true), (100, false)]);
}

#[test]
fn with_gateway_api_no_candidate_pod_exists_before_an_implementation_accepts_the_route() {
    for reported in [true, false] {
        let mut sc = single(false);
        sc.provider = ProviderKind::GatewayApi;
        sc.route_status = reported;
        let mut w = World::new(sc);
        let mut created = false;
        while w.now < 300_000 && !w.quiet() {
            w.run_to(Some(w.now + TICK)).unwrap();
            created |= !w.candidates.is_empty();
        }
        check_end(&w).unwrap();
        if reported {
            assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
        } else {
            // Nothing serves the route: the release fails before any candidate pod could take traffic
            // straight from the Service.
            assert_eq!(w.deployment.status.phase, Some(Phase::Failed));
            assert!(!created, "no candidate was created");
            assert_eq!(w.checks, 0);
        }
    }
}

#[test]
fn blue_green_switches_all_traffic_in_one_step_after_its_iterations_on_readiness() {
    let mut sc = single(false);
    sc.strategy = Strategy::BlueGreen;
    sc.iterations = 3;
    sc.drain_ms = 4_000;
    let mut w = World::new(sc);
    let mut routes: Vec<Route> = Vec::new();
    let mut full_size_before_switch = false;
    while w.now < 300_000 && !w.quiet() {
        w.run_to(Some(w.now + TICK)).unwrap();
        if let Some(vs) = &w.vs
            && routes.last() != Some(&vs.value)
        {
            routes.push(vs.value.clone());
        }
        if routes.iter().all(|r| r.weight_of("v2-canary") == 0)
            && w.candidates.first().is_some_and(|c| c.view.available)
        {
            full_size_before_switch = true;
        }
    }
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
    assert!(full_size_before_switch, "the candidate stood ready before any traffic");
    let weights: Vec<u8> = routes.iter().map(|r| r.weight_of("v2-canary")).collect();
    assert!(weights.iter().all(|w| *w == 0 || *w == 100), "one step: {weights:?}");
    assert!(weights.contains(&100), "{weights:?}");
    assert!(
        w.stages[..3].iter().all(|s| *s == Stage::Standby { confirm: false }),
        "readiness only while no request reaches it: {:?}",
        w.stages
    );
    // The standby's iterations, then the analyses of the rollback window (4 s at one a second).
    assert!(w.checks >= 3 + 3, "{} analyses", w.checks);
}

#[test]
fn blue_green_rolls_back_within_its_window_when_live_traffic_shows_the_fault() {
    // Readiness passes a bad image; the analyses after the switch catch it while the stable pods wait.
    let mut sc = single(true);
    sc.strategy = Strategy::BlueGreen;
    sc.iterations = 2;
    sc.drain_ms = 6_000;
    let (w, routes) = routes_of(sc);
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Failed));
    let weights: Vec<u8> = routes.iter().map(|r| r.weight_of("v2-canary")).collect();
    let switched = weights.iter().position(|w| *w == 100).expect("switched");
    assert!(
        routes[switched + 1..].iter().any(|r| r.weight_of("v1") == 100),
        "all traffic back on the stable version: {routes:?}"
    );
    assert_eq!(
        w.deployment.template_revision, 2,
        "the template stays for the user to fix"
    );
    assert!(w.candidates.is_empty(), "I6: the candidate is gone");
}

#[test]
fn blue_green_with_matches_measures_them_and_a_failing_candidate_never_gets_the_rest() {
    let mut sc = single(true);
    sc.strategy = Strategy::BlueGreen;
    sc.matched = true;
    let (w, routes) = routes_of(sc);
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Failed));
    assert!(routes.iter().any(|r| r.matched_backend() == Some("v2-canary")));
    assert!(routes.iter().all(|r| r.weight_of("v2-canary") == 0), "{routes:?}");
    assert!(
        w.stages.iter().all(|s| matches!(s, Stage::Step { .. })),
        "{:?}",
        w.stages
    );
}

/// The single release of [`single`], blue/green without a mesh.
fn blue_green_without_a_mesh(bad: bool) -> Scenario {
    let mut sc = single(bad);
    sc.provider = ProviderKind::None;
    sc.strategy = Strategy::BlueGreen;
    sc
}

/// Without a mesh: the candidate at full size out of the Service for its iterations (readiness
/// alone), then all its pods put in the Service in one write; the stable pods stay through the
/// rollback window, and the hand-off follows.
#[test]
fn without_a_mesh_blue_green_holds_the_candidate_out_of_the_service_until_the_switch() {
    let sc = blue_green_without_a_mesh(false);
    let mut w = World::new(sc);
    let mut scales = Vec::new();
    let mut standby_seen = false;
    while w.now < 600_000 {
        w.run_to(Some(w.now + TICK)).unwrap();
        if let Some(c) = w.candidates.first() {
            assert!(c.view.held, "{:?}", c.view);
            let weight = c.view.scale.map(|s| s.weight);
            if scales.last() != Some(&weight) {
                scales.push(weight);
            }
            if weight == Some(0) && c.view.available {
                assert!(!c.serving, "no request reaches the candidate on standby");
                standby_seen = true;
            }
            assert_eq!(c.serving, weight > Some(0), "its pods are where its weight says");
        }
        if w.quiet() {
            break;
        }
    }
    check_end(&w).unwrap();
    assert!(standby_seen);
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
    assert_eq!(
        scales,
        vec![Some(0), Some(100), Some(0)],
        "standby, one switch, out before deletion"
    );
    assert!(
        w.stages.iter().filter(|s| matches!(s, Stage::Standby { .. })).count() >= 3,
        "{:?}",
        w.stages
    );
}

/// Without a mesh, a fault live traffic shows after the switch: the candidate's pods leave the
/// Service, and only after the drain are they deleted (the model checks it: I3 for held candidates).
#[test]
fn without_a_mesh_a_blue_green_rollback_takes_the_candidate_out_of_the_service_before_it_stops() {
    let sc = blue_green_without_a_mesh(true);
    let w = World::new(sc).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Failed));
    assert!(w.candidates.is_empty(), "I6");
    assert!(
        w.stages.iter().any(|s| matches!(s, Stage::Step { .. })),
        "analysed on live traffic"
    );
}

/// A write cut short between the weight and the pods: the next pass places the pods.
#[test]
fn without_a_mesh_misplaced_pods_of_a_held_candidate_are_placed_again() {
    let sc = blue_green_without_a_mesh(false);
    let mut w = World::new(sc);
    let mut placed = Vec::new();
    while w.now < 600_000 && !w.quiet() {
        w.run_to(Some(w.now + TICK)).unwrap();
        let Some(c) = w
            .candidates
            .first_mut()
            .filter(|c| c.view.available && !c.view.deleting)
        else {
            continue;
        };
        c.view.misplaced = 1;
        let serving = c.view.scale.is_some_and(|s| s.weight > 0);
        let name = c.view.name.clone();
        assert_eq!(
            plan(&w.observe(None)).action,
            Action::PlaceCandidatePods { name, serving }
        );
        w.candidates[0].view.misplaced = 0;
        if placed.last() != Some(&serving) {
            placed.push(serving);
        }
    }
    assert_eq!(placed, vec![false, true, false], "on standby, switched, withdrawn");
}

#[test]
fn without_a_mesh_matches_fail_the_release_saying_why() {
    let mut sc = single(false);
    sc.provider = ProviderKind::None;
    sc.strategy = Strategy::AB;
    let w = World::new(sc).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Failed));
    assert_eq!(w.checks, 0);
}

#[test]
fn a_bad_release_is_rolled_back_after_threshold_failed_checks() {
    let w = World::new(single(true)).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Failed));
    assert_eq!(w.deployment.status.failed_checks, 2);
    assert_eq!(w.checks, 2);
    assert!(w.deployment.paused, "D stays paused on the failed template");
}

#[test]
fn a_revert_is_rolled_back_without_analysis() {
    let mut sc = single(false);
    sc.interval_ms = 60_000;
    sc.events.push((3_000, UserAction::Revert));
    let w = World::new(sc).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::RolledBack));
    assert_eq!(w.checks, 0);
}

#[test]
fn a_new_template_supersedes_the_release_in_flight() {
    let mut sc = single(false);
    sc.interval_ms = 5_000;
    sc.events.push((6_000, UserAction::SetImage { bad: false }));
    let w = World::new(sc).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
    assert_eq!(w.deployment.template_revision, 3);
    assert_eq!(w.deployment.status.release, Some(3));
}

#[test]
fn a_candidate_that_never_becomes_available_fails_at_the_deadline() {
    let mut sc = single(false);
    sc.candidate_ready_ms = None;
    let w = World::new(sc).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Failed));
    assert!(w.now >= 60_000);
}

#[test]
fn with_istio_s_reports_a_release_waits_only_as_long_as_the_proxies_take() {
    let slow = World::new(single(false)).run().unwrap();
    let mut sc = single(false);
    sc.route_status = true;
    let reported = World::new(sc).run().unwrap();
    check_end(&reported).unwrap();
    assert_eq!(reported.deployment.status.phase, Some(Phase::Succeeded));
    assert!(
        reported.now < slow.now,
        "{} ms with reports, {} ms with the delay",
        reported.now,
        slow.now
    );
}

#[test]
fn a_new_template_during_hand_off_is_released_from_the_previous_candidate() {
    for bad in [false, true] {
        let mut sc = single(false);
        // The hand-off runs from 11.6 s to 13.9 s.
        sc.events.push((12_000, UserAction::SetImage { bad }));
        let w = World::new(sc).run().unwrap();
        check_end(&w).unwrap();
        assert_eq!(w.deployment.status.release, Some(3));
        if bad {
            assert_eq!(w.deployment.status.phase, Some(Phase::Failed));
            assert_eq!(
                w.on_baseline(),
                Some(2),
                "traffic back on the candidate of v2, which served it"
            );
        } else {
            assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
            assert!(w.candidates.is_empty());
        }
    }
}

#[test]
fn a_new_template_during_finalising_is_released_from_the_new_stable_revision() {
    let mut sc = single(false);
    // Finalising runs from 13.9 s to 20.2 s. By then v2 is the stable revision: there is nothing to
    // revert to (the webhook sees v1's template as a new one), and a new template starts from v2.
    sc.events.push((15_000, UserAction::Revert));
    sc.events.push((15_000, UserAction::SetImage { bad: false }));
    let w = World::new(sc).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
    assert_eq!(w.deployment.status.release, Some(3));
}

#[test]
fn a_deployment_resumed_behind_turnout_s_back_gets_all_traffic_moved_to_the_candidate() {
    let mut sc = single(false);
    sc.interval_ms = 60_000;
    // Progressing at 10 % by 5 s; the stable pods go at once when the Deployment is resumed.
    sc.events.push((5_000, UserAction::Bypass));
    let w = World::new(sc).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
    assert_eq!(w.checks, 0, "no analysis: the Deployment was already rolling out");
    assert!(w.reasons.contains(&reasons::BYPASSED), "{:?}", w.reasons);
}

#[test]
fn without_a_mesh_a_deployment_resumed_behind_turnout_s_back_is_reported_as_its_candidate_takes_over() {
    let mut sc = single(false);
    sc.provider = ProviderKind::None;
    sc.interval_ms = 60_000;
    sc.events.push((5_000, UserAction::Bypass));
    let w = World::new(sc).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
    let bypassed = w.reasons.iter().filter(|r| **r == reasons::BYPASSED).count();
    // When the candidate is scaled to all of the traffic, and when the hand-off is recorded.
    assert_eq!(bypassed, 2, "{:?}", w.reasons);
}

#[test]
fn opting_out_during_a_release_unwinds_it_and_hands_the_deployment_back_unpaused() {
    let mut sc = single(false);
    sc.interval_ms = 60_000;
    // Progressing at 10 % by 5 s, when the namespace's label is removed.
    sc.events.push((5_000, UserAction::OptOut));
    let w = World::new(sc).run().unwrap();
    check_end(&w).unwrap();
    let d = &w.deployment;
    assert_eq!(d.status.phase, Some(Phase::HandedBack));
    assert!(!d.paused, "handed back unpaused");
    assert_eq!(d.stable_revision, None, "no release intent left");
    assert_eq!(w.checks, 0, "no analysis after opting out");
    assert!(w.candidates.is_empty());
    assert!(w.now < 60_000, "no wait for analysis: ended at {} ms", w.now);
}

#[test]
fn opting_out_during_the_hand_off_lets_the_release_finish() {
    let mut sc = single(false);
    // HandingOff runs from 10.6 s to 12.9 s.
    sc.events.push((12_500, UserAction::OptOut));
    let w = World::new(sc).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
}

#[test]
fn an_abort_rolls_the_release_back_at_once() {
    let mut sc = single(false);
    sc.interval_ms = 60_000;
    // At 10 % by 5 s; the first analysis would be due at 60 s.
    sc.events.push((5_000, UserAction::Request(Verb::Abort)));
    let w = World::new(sc).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Failed));
    assert_eq!(w.checks, 0);
    assert!(w.deployment.rollout_failed, "kubectl rollout status reports the abort");
    assert!(w.now < 60_000, "no wait for analysis: ended at {} ms", w.now);
    assert_eq!(w.deployment.request, None, "the request is acted on and removed");
}

#[test]
fn a_pause_holds_the_weight_until_resumed() {
    let mut sc = single(false);
    sc.events.push((4_000, UserAction::Request(Verb::Pause)));
    sc.events.push((100_000, UserAction::Request(Verb::Resume)));
    let mut w = World::new(sc);
    // Just before the resume: still paused at the weight it had, nothing analysed meanwhile.
    w.run_to(Some(99_000)).unwrap();
    let d = &w.deployment;
    assert!(d.status.paused);
    assert_eq!((d.status.phase, d.status.weight), (Some(Phase::Progressing), 10));
    assert_eq!(w.vs.as_ref().unwrap().value.weight_of("v2-canary"), 10);
    assert_eq!(w.analysed_while_paused, 0);
    assert!(w.checks <= 1, "{} analyses", w.checks);

    let w = w.run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
    assert!(w.now > 100_000, "the release went on only after the resume");
    assert_eq!(w.analysed_while_paused, 0);
}

#[test]
fn a_promotion_skips_the_remaining_steps_and_analysis() {
    let mut sc = single(false);
    sc.interval_ms = 60_000;
    sc.events.push((5_000, UserAction::Request(Verb::Promote)));
    let w = World::new(sc).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
    assert_eq!(w.checks, 0);
    assert!(w.now < 60_000, "ended at {} ms", w.now);
}

#[test]
fn a_retry_runs_a_failed_release_again_and_the_rollout_is_followed_again() {
    let mut sc = single(true);
    // Failed and unwound by 20 s; the cause fixed, then retried.
    sc.events.push((30_000, UserAction::Heal));
    sc.events.push((31_000, UserAction::Request(Verb::Retry)));
    let w = World::new(sc).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
    assert_eq!(w.deployment.status.release, Some(2));
    assert_eq!(w.checks, 2 + 3, "two failed checks, then one per step");
    assert!(!w.deployment.rollout_failed);
}

#[test]
fn requests_the_release_cannot_take_are_refused_with_the_reason() {
    let mut d = DeploymentView {
        namespace: "shop".into(),
        name: "podinfo".into(),
        template_revision: 3,
        stable_revision: Some(2),
        status: StatusView {
            phase: Some(Phase::Progressing),
            release: Some(3),
            weight: 25,
            ..StatusView::default()
        },
        ..DeploymentView::default()
    };
    assert_eq!(admissible(&d, Verb::Abort), Ok(3));
    assert_eq!(admissible(&d, Verb::Pause), Ok(3));
    let why = |d: &DeploymentView, verb| admissible(d, verb).unwrap_err();
    assert_eq!(why(&d, Verb::Resume), "release v3 of shop/podinfo is not paused");
    assert_eq!(
        why(&d, Verb::Retry),
        "release v3 of shop/podinfo has not failed: it is Progressing"
    );
    d.status.phase = Some(Phase::HandingOff);
    assert!(why(&d, Verb::Abort).contains("set the template back to roll back"));
    assert_eq!(
        why(&d, Verb::Promote),
        "release v3 of shop/podinfo is already promoted: HandingOff"
    );
    d.status.phase = Some(Phase::Failed);
    assert_eq!(admissible(&d, Verb::Retry), Ok(3));
    assert_eq!(why(&d, Verb::Pause), "release v3 of shop/podinfo has ended: Failed");
    d.stable_revision = None;
    d.status.phase = Some(Phase::Succeeded);
    assert_eq!(
        why(&d, Verb::Abort),
        "shop/podinfo has no release in flight (release v3: Succeeded)"
    );

    // The agent refuses a request that became stale or was never valid, and removes it.
    let config = ReleaseConfig::default();
    let observed = |d: &DeploymentView| Observed {
        now: 0,
        config: &config,
        deployment: d.clone(),
        stable_rs: None,
        new_rs: None,
        candidates: Vec::new(),
        provider: ProviderKind::Istio,
        hosts: Vec::new(),
        routing_unavailable: None,
        verdict: None,
        opted_out: false,
    };
    d.stable_revision = Some(2);
    d.paused = true;
    d.status.phase = Some(Phase::Progressing);
    for (request, why) in [
        (
            Request::parse("abort@2"),
            "abort of v2 ignored: release v3 is in flight",
        ),
        (
            Request::parse("resume@3"),
            "resume of v3 refused: release v3 of shop/podinfo is not paused",
        ),
        (Request::parse("stop"), "invalid request \"stop\""),
    ] {
        d.request = Some(request);
        let plan = plan(&observed(&d));
        assert_eq!(plan.action, Action::ClearRequest);
        let event = plan.event.unwrap();
        assert!(event.warning && event.message.contains(why), "{}", event.message);
    }
}

#[test]
fn request_values_name_a_verb_and_a_release() {
    for verb in Verb::ALL {
        assert_eq!(
            Request::parse(&Request::value(verb, 7)),
            Request::Valid { verb, release: 7 }
        );
    }
    assert_eq!(
        Request::parse("abort@v3"),
        Request::Valid {
            verb: Verb::Abort,
            release: 3
        }
    );
    for bad in ["", "abort", "abort@", "abort@x", "halt@3", "@3"] {
        assert_eq!(Request::parse(bad), Request::Invalid(bad.into()));
    }
}

#[test]
fn gates_run_before_the_first_step_and_before_100_percent() {
    let mut sc = single(false);
    sc.gates = true;
    let w = World::new(sc).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Succeeded));
    // Steps 10, 50, 100: the pass at 50 leads to 100 %, so that analysis carries the confirmation.
    assert_eq!(
        w.stages,
        [
            Stage::PreRollout,
            Stage::Step { confirm: false },
            Stage::Step { confirm: true },
            Stage::Step { confirm: false },
        ]
    );

    let mut sc = single(true);
    sc.gates = true;
    let w = World::new(sc).run().unwrap();
    check_end(&w).unwrap();
    assert_eq!(w.deployment.status.phase, Some(Phase::Failed));
    assert_eq!(
        w.stages,
        [Stage::PreRollout, Stage::PreRollout],
        "a failing gate counts as failed checks: no traffic ever reached the candidate"
    );
    assert!(w.vs.as_ref().unwrap().value.weight_of("v2-canary") == 0);
}

#[test]
fn a_route_a_gateway_needs_is_created_at_rest_and_only_then() {
    let config = ReleaseConfig::default();
    let d = DeploymentView {
        namespace: "shop".into(),
        name: "podinfo".into(),
        replicas: 2,
        template_revision: 1,
        ..DeploymentView::default()
    };
    let observed = |host: HostRouting| Observed {
        now: 1_000,
        config: &config,
        deployment: d.clone(),
        stable_rs: None,
        new_rs: None,
        candidates: Vec::new(),
        provider: ProviderKind::GatewayApi,
        hosts: vec![host],
        routing_unavailable: None,
        verdict: None,
        opted_out: false,
    };
    let mut gateway = HostRouting::absent(SERVICE);
    gateway.route_at_rest = true;
    let p = plan(&observed(gateway.clone()));
    assert_eq!(
        p.action,
        Action::Routing(RoutingAction::PutRoute {
            host: 0,
            route: Route::Host
        })
    );
    assert_eq!(
        p.event.unwrap().message,
        "shop/podinfo: podinfo is routed through gateway-api at rest"
    );
    gateway.route = Managed::Ours(Applied {
        value: Route::Host,
        changed_at: 0,
        synced: Synced::Unknown,
    });
    assert!(matches!(
        plan(&observed(gateway)).action,
        Action::Wait { until: None, .. }
    ));
    // A route on the Service itself is not needed at rest: without one, requests reach every pod.
    assert!(matches!(
        plan(&observed(HostRouting::absent(SERVICE))).action,
        Action::Wait { until: None, .. }
    ));
}
