//! `turnout agent`: the routing agent, a kube-runtime controller that runs releases.
//!
//! ```text
//!  watch Deployments ─▶ reconcile(D) ◀─ cache: watches of candidates, ReplicaSets, candidate pods,
//!                                             Services, Namespaces, VirtualServices, DestinationRules
//!    GET D + cache::Caches::snapshot ─▶ release::plan (pure) ─▶ one action: act::apply / analysis / wait
//!                                                             └▶ Event on D, metrics, requeue
//! ```
//!
//! Each pass reads D fresh and the rest from the caches, and takes at most one step, so a conflict, a
//! crash or a restart costs nothing but a pass.

pub mod act;
pub mod analysis;
pub mod cache;
pub mod hooks;
pub mod leader;
pub mod notify;
pub mod observe;
pub mod page;
pub mod routing;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::config::{self, HookKind, NoData, ReleaseConfig};
use crate::names::{agent as agent_names, annotations, labels, values};
use crate::release::{self, Action, DeploymentView, Millis, Observed, Phase, ProviderKind};
use hooks::Payload;

/// Deployments reconciled at the same time.
const WORKERS: u16 = 8;

/// Release defaults, overridden per namespace and per Deployment by annotations (DESIGN §7).
#[derive(Clone, Debug, clap::Args)]
#[group(id = "release-defaults")]
#[command(next_help_heading = "Release defaults (overridden by turnout.dev/* annotations)")]
pub struct Args {
    /// Canary weights in percent, increasing, ending at 100 (annotation `turnout.dev/steps`).
    #[arg(long, env = "TURNOUT_STEPS", default_value = "10,25,50,100", value_parser = parse_steps)]
    pub steps: Steps,
    /// Time between a step's propagation and its analysis (`turnout.dev/interval`).
    #[arg(long, env = "TURNOUT_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Failed checks at one step that roll the release back (`turnout.dev/threshold`).
    #[arg(long, env = "TURNOUT_THRESHOLD", default_value_t = 3)]
    pub threshold: u32,
    /// Longest a candidate may take to become available (`turnout.dev/progress-deadline`).
    #[arg(long, env = "TURNOUT_PROGRESS_DEADLINE", default_value = "10m", value_parser = humantime::parse_duration)]
    pub progress_deadline: Duration,
    /// Time for a routing change to reach every proxy (`turnout.dev/propagation-delay`).
    #[arg(long, env = "TURNOUT_PROPAGATION_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub propagation_delay: Duration,
    /// Time a route must carry no traffic before pods it selects are terminated (`turnout.dev/drain`).
    #[arg(long, env = "TURNOUT_DRAIN", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
    /// Lowest request success rate of the candidate, in percent (`turnout.dev/success-rate-min`).
    #[arg(long, env = "TURNOUT_SUCCESS_RATE_MIN", default_value_t = 99.0)]
    pub success_rate_min: f64,
    /// Highest P99 latency of the candidate (`turnout.dev/latency-p99-max`).
    #[arg(long, env = "TURNOUT_LATENCY_P99_MAX", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub latency_p99_max: Duration,
    /// Prometheus base URL for the metric checks; without it only readiness is checked
    /// (`turnout.dev/prometheus`).
    #[arg(long, env = "TURNOUT_PROMETHEUS", value_name = "URL")]
    pub prometheus: Option<String>,
    /// What a metric query without data counts as (`turnout.dev/no-data`).
    #[arg(long, env = "TURNOUT_NO_DATA", value_enum, default_value_t = NoData::Fail)]
    pub no_data: NoData,
    /// An HTTP hook, as KIND=URL; repeat for several. Kinds: pre-rollout, rollout, confirm-promotion,
    /// post-rollout, rollback, event (`hook.turnout.dev/<kind>`).
    #[arg(long = "hook", env = "TURNOUT_HOOKS", value_name = "KIND=URL", value_delimiter = ',', value_parser = parse_hook)]
    pub hooks: Vec<(HookKind, String)>,
    /// How long one hook call may take (`turnout.dev/hook-timeout`).
    #[arg(long, env = "TURNOUT_HOOK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub hook_timeout: Duration,
    /// Further attempts after a hook call failed (`turnout.dev/hook-retries`).
    #[arg(long, env = "TURNOUT_HOOK_RETRIES", default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=10))]
    pub hook_retries: u32,
    /// How releases move traffic: istio (VirtualService and DestinationRule), gateway-api (HTTPRoute
    /// and per-version Services) or none (no mesh: the candidate's share of the pods). Without it, per
    /// namespace: an ambient namespace uses gateway-api, else istio when its CRDs are installed, else
    /// gateway-api when its CRDs are, else none (`turnout.dev/provider`).
    #[arg(long, env = "TURNOUT_PROVIDER", value_name = "PROVIDER", value_parser = parse_provider)]
    pub provider: Option<ProviderKind>,
}

fn parse_provider(value: &str) -> Result<ProviderKind, String> {
    ProviderKind::parse(value).ok_or_else(|| format!("{value:?} is not istio, gateway-api or none"))
}

fn parse_hook(value: &str) -> Result<(HookKind, String), String> {
    let (kind, url) = value.split_once('=').ok_or("expected KIND=URL")?;
    Ok((HookKind::named(kind.trim())?, config::parse_hook_url(url)?))
}

/// Canary weights, parsed as one comma-separated value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Steps(pub Vec<u8>);

fn parse_steps(value: &str) -> Result<Steps, String> {
    config::parse_steps(value).map(Steps)
}

impl Args {
    /// The release defaults these flags give.
    pub fn defaults(&self) -> ReleaseConfig {
        ReleaseConfig {
            steps: self.steps.0.clone(),
            interval: self.interval,
            threshold: self.threshold.max(1),
            progress_deadline: self.progress_deadline,
            propagation_delay: self.propagation_delay,
            drain: self.drain,
            success_rate_min: self.success_rate_min,
            latency_p99_max: self.latency_p99_max,
            prometheus: self.prometheus.as_ref().map(|p| p.trim_end_matches('/').to_owned()),
            no_data: self.no_data,
            checks: Vec::new(),
            hooks: self.hooks.iter().cloned().collect(),
            hook_timeout: self.hook_timeout,
            hook_retries: self.hook_retries,
            provider: self.provider,
            gateway: None,
            hostnames: Vec::new(),
            notify: None,
            notify_severity: notify::Severity::Info,
            strategy: release::Strategy::Canary,
            matches: Vec::new(),
            iterations: 10,
            mirror: None,
            session_affinity: None,
        }
    }
}

/// `turnout agent` alone: release flags and its own admin port.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentCommand {
    #[command(flatten)]
    pub release: Args,
    #[command(flatten)]
    pub election: leader::ElectionArgs,
    #[command(flatten)]
    pub page: page::Args,
    /// Address of the plain-HTTP admin port (`/live`, `/ready`, `/metrics`, `/releases`).
    #[arg(long, env = "TURNOUT_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    pub admin_listen: SocketAddr,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReleaseLabels {
    namespace: String,
    deployment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
    strategy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabels {
    hook: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NotificationLabels {
    service: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    step: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    check: &'static str,
    result: &'static str,
}

/// The agent's metrics (DESIGN §8).
#[derive(Debug)]
pub struct AgentMetrics {
    phase: Family<ReleaseLabels, Gauge>,
    weight: Family<ReleaseLabels, Gauge>,
    releases: Family<ResultLabels, Counter>,
    checks: Family<CheckLabels, Counter>,
    duration: Histogram,
    reconcile: Histogram,
    istio: Gauge,
    gateway_api: Gauge,
    leader: Gauge,
    unheld: Counter,
    hooks: Family<HookLabels, Counter>,
    notifications: Family<NotificationLabels, Counter>,
    reads: Family<SourceLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
}

impl AgentMetrics {
    /// Drops the series of one Deployment (deleted, or no longer managed): the label sets stay bounded
    /// by the Deployments turnout manages.
    fn forget(&self, namespace: &str, deployment: &str) {
        let labels = ReleaseLabels {
            namespace: namespace.to_owned(),
            deployment: deployment.to_owned(),
        };
        self.phase.remove(&labels);
        self.weight.remove(&labels);
    }

    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            phase: Family::default(),
            weight: Family::default(),
            releases: Family::default(),
            checks: Family::default(),
            duration: Histogram::new(exponential_buckets(10.0, 2.0, 12)),
            reconcile: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            istio: Gauge::default(),
            gateway_api: Gauge::default(),
            leader: Gauge::default(),
            unheld: Counter::default(),
            hooks: Family::default(),
            notifications: Family::default(),
            reads: Family::default(),
            errors: Family::default(),
        };
        registry.register(
            "turnout_release_phase",
            "Phase of each Deployment's latest release: 0 Pending, 1 Progressing, 2 Promoting, 3 HandingOff, \
             4 Finalising, 5 Succeeded, 6 Failed, 7 RolledBack, 8 HandedBack",
            m.phase.clone(),
        );
        registry.register(
            "turnout_release_weight",
            "Traffic weight of each release's candidate, in percent",
            m.weight.clone(),
        );
        registry.register(
            "turnout_releases",
            "Releases ended, by result (succeeded, failed, rolled_back) and strategy (canary, ab, blue-green)",
            m.releases.clone(),
        );
        registry.register(
            "turnout_analysis_checks",
            "Analysis checks run, by check and result",
            m.checks.clone(),
        );
        registry.register(
            "turnout_release_duration_seconds",
            "Time from a release's start to its end, as seen by one agent",
            m.duration.clone(),
        );
        registry.register(
            "turnout_reconcile_duration_seconds",
            "Time of one reconcile pass",
            m.reconcile.clone(),
        );
        registry.register(
            "turnout_unheld_rollouts",
            "Template changes of opted-in Deployments that rolled out without turnout's hold (webhook down or bypassed)",
            m.unheld.clone(),
        );
        registry.register(
            "turnout_hook_notifications",
            "Notification hooks sent (post-rollout, rollback, event), by hook and result (ok, fail)",
            m.hooks.clone(),
        );
        registry.register(
            "turnout_notifications",
            "Chat notifications sent (turnout.dev/notify), by service (slack, teams, discord, webhook) and result (ok, fail)",
            m.notifications.clone(),
        );
        registry.register(
            "turnout_agent_reads",
            "Reconcile passes by where they read the cluster: cache (the agent's watch caches) or api (LIST and GET, until the caches have listed once)",
            m.reads.clone(),
        );
        registry.register(
            "turnout_reconcile_errors",
            "Reconcile passes that failed and were retried, by step (read, routing, create-candidate, \
             scale-candidate, place-pods, delete-candidate, status, clear-request) and reason (conflict, \
             forbidden, not-found, invalid, throttled, server, other, unavailable)",
            m.errors.clone(),
        );
        registry.register(
            "turnout_agent_leader",
            "1 while this replica holds the leader Lease and runs releases",
            m.leader.clone(),
        );
        registry.register(
            "turnout_istio_crds_present",
            "1 when the VirtualService and DestinationRule CRDs are installed",
            m.istio.clone(),
        );
        registry.register(
            "turnout_gateway_api_crds_present",
            "1 when the Gateway API HTTPRoute CRD (gateway.networking.k8s.io/v1) is installed",
            m.gateway_api.clone(),
        );
        m
    }
}

struct Context {
    client: Client,
    defaults: ReleaseConfig,
    analyser: analysis::Analyser,
    metrics: Arc<AgentMetrics>,
    istio: AtomicBool,
    gateway_api: AtomicBool,
    started: Mutex<HashMap<(String, String, u64), Instant>>,
    /// Unheld rollouts already reported: (Deployment uid, generation).
    unheld: Mutex<std::collections::HashSet<(String, i64)>>,
    /// The watch caches of the running controller (none between leadership terms).
    caches: std::sync::RwLock<Option<cache::Caches>>,
    /// The controller's Deployments, while it runs.
    deployments: std::sync::RwLock<Option<kube::runtime::reflector::Store<Deployment>>>,
    /// The last checks of each release, for the release page.
    board: page::Board,
}

impl Context {
    /// Drops what is kept of one Deployment (deleted, or no longer managed).
    fn forget(&self, namespace: &str, deployment: &str) {
        self.metrics.forget(namespace, deployment);
        self.board.forget(namespace, deployment);
    }
}

/// Errors of one pass, by what failed; the pass is retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the Deployment, its namespace or what a snapshot is made of.
    #[error("reading the cluster: {0}")]
    Read(#[source] kube::Error),
    /// Carrying out the planned action.
    #[error("{}: {source}", step.as_str())]
    Write {
        step: Step,
        #[source]
        source: kube::Error,
    },
}

/// The write a pass failed at: a bounded label of `turnout_reconcile_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Routing,
    CreateCandidate,
    ScaleCandidate,
    PlacePods,
    DeleteCandidate,
    Status,
    ClearRequest,
}

impl Step {
    /// The step of `action`; `None` for what writes nothing.
    fn of(action: &release::Action) -> Option<Self> {
        use release::Action as A;
        Some(match action {
            A::Routing(_) => Self::Routing,
            A::CreateCandidate { .. } => Self::CreateCandidate,
            A::ScaleCandidate { .. } => Self::ScaleCandidate,
            A::PlaceCandidatePods { .. } => Self::PlacePods,
            A::DeleteCandidate { .. } => Self::DeleteCandidate,
            A::Status(_) => Self::Status,
            A::ClearRequest => Self::ClearRequest,
            A::Analyse { .. } | A::Wait { .. } => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Routing => "routing",
            Self::CreateCandidate => "create-candidate",
            Self::ScaleCandidate => "scale-candidate",
            Self::PlacePods => "place-pods",
            Self::DeleteCandidate => "delete-candidate",
            Self::Status => "status",
            Self::ClearRequest => "clear-request",
        }
    }
}

impl Error {
    /// Where the pass failed: `read` or the write's step.
    fn step(&self) -> &'static str {
        match self {
            Self::Read(_) => "read",
            Self::Write { step, .. } => step.as_str(),
        }
    }

    fn source(&self) -> &kube::Error {
        match self {
            Self::Read(e) | Self::Write { source: e, .. } => e,
        }
    }

    /// Why, as a bounded label: the API server's answer, or `unavailable` when it gave none.
    fn reason(&self) -> &'static str {
        match self.source() {
            kube::Error::Api(s) => match s.code {
                409 => "conflict",
                403 | 401 => "forbidden",
                404 => "not-found",
                400 | 422 => "invalid",
                429 => "throttled",
                500.. => "server",
                _ => "other",
            },
            _ => "unavailable",
        }
    }
}

fn now_millis() -> Millis {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn reconcile(d: Arc<Deployment>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&d, &ctx).await;
    ctx.metrics.reconcile.observe(started.elapsed().as_secs_f64());
    result
}

/// A release in flight keeps the strategy it started with (recorded in `turnout.dev/release-strategy`):
/// an annotation changed under it applies to the next release. An A/B test whose matches were
/// removed cannot go on as one and takes the strategy now configured.
fn pin_strategy(config: &mut config::ReleaseConfig, d: &Deployment) {
    let ann = d.annotations();
    // The recorded release is the template's (a new template starts with the strategy configured).
    let in_flight = ann.contains_key(annotations::STABLE_REVISION)
        && ann
            .get(annotations::RELEASE)
            .and_then(|r| r.parse::<u64>().ok())
            .is_some_and(|r| Some(r) == observe::template_revision_of(d));
    if !in_flight {
        return;
    }
    let Some(pinned) = ann
        .get(annotations::RELEASE_STRATEGY)
        .and_then(|s| release::Strategy::parse(s))
    else {
        return;
    };
    if pinned != release::Strategy::AB || !config.matches.is_empty() {
        config.strategy = pinned;
    }
}

async fn reconcile_inner(cached: &Deployment, ctx: &Context) -> Result<Requeue, Error> {
    if cached.labels().contains_key(agent_names::RELEASE_OF) {
        return Ok(Requeue::await_change());
    }
    // Plan from a fresh read: the cache may not have seen the previous pass's write yet.
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &cached.namespace().unwrap_or_default());
    let Some(fresh) = api.get_opt(&cached.name_any()).await.map_err(Error::Read)? else {
        ctx.forget(&cached.namespace().unwrap_or_default(), &cached.name_any());
        return Ok(Requeue::await_change());
    };
    let d = &fresh;
    // A candidate's labels never change: the cached check above stands for the fresh object too.
    let ns_name = d.namespace().unwrap_or_default();
    let installed = routing::Installed {
        istio: ctx.istio.load(Ordering::Relaxed),
        gateway_api: ctx.gateway_api.load(Ordering::Relaxed),
    };
    let caches = ctx
        .caches
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let ns = match caches.as_ref().and_then(|c| c.namespace(&ns_name)) {
        Some(ns) => ns,
        None => match Api::<Namespace>::all(ctx.client.clone())
            .get_opt(&ns_name)
            .await
            .map_err(Error::Read)?
        {
            Some(ns) => Arc::new(ns),
            None => return Ok(Requeue::await_change()),
        },
    };
    let opted_out = d.annotations().get(annotations::ROLLOUT).map(String::as_str) == Some(values::DISABLED)
        || ns.labels().get(labels::ROLLOUT).map(String::as_str) != Some(values::ENABLED);
    // Opted out: nothing more to do unless a release is in flight, which must still end.
    if opted_out && !d.annotations().contains_key(annotations::STABLE_REVISION) {
        ctx.forget(&ns_name, &d.name_any());
        return Ok(Requeue::await_change());
    }
    let (mut config, problems) = config::resolve(&ctx.defaults, ns.annotations(), d.annotations());
    pin_strategy(&mut config, d);
    // A release in flight keeps the provider it started with.
    let pinned = d
        .annotations()
        .contains_key(annotations::STABLE_REVISION)
        .then(|| {
            d.annotations()
                .get(annotations::ROUTING)
                .and_then(|p| ProviderKind::parse(p))
        })
        .flatten();
    let (provider, unavailable) = routing::select(&config, &ns, installed, pinned);
    let has_crds = unavailable.is_none();
    // Read from the watch caches once they have listed; from the API server until then.
    let caches = caches.filter(|c| c.synced(provider, has_crds));
    let snap = match &caches {
        Some(c) => c.snapshot(d, &config, provider, has_crds),
        None => observe::snapshot(&ctx.client, d, &config, provider, has_crds)
            .await
            .map_err(Error::Read)?,
    };
    let source = if caches.is_some() { "cache" } else { "api" };
    ctx.metrics.reads.get_or_create(&SourceLabels { source }).inc();
    if snap.unheld_rollout() {
        report_unheld(ctx, d, &config).await;
    }
    let now = now_millis();
    let mut verdict = None;
    loop {
        let observed = Observed {
            now,
            config: &config,
            deployment: snap.deployment.clone(),
            stable_rs: snap.stable_rs.clone(),
            new_rs: snap.new_rs.clone(),
            candidates: snap.candidates.clone(),
            provider,
            hosts: snap.hosts.clone(),
            routing_unavailable: unavailable.clone().or_else(|| snap.refused.clone()),
            verdict: verdict.take(),
            opted_out,
        };
        let plan = release::plan(&observed);
        let name = d.name_any();
        match &plan.action {
            Action::Analyse { revision, stage } => {
                let Some(candidate) = snap.candidates.iter().find(|c| c.revision == *revision) else {
                    return Ok(Requeue::requeue(Duration::from_secs(1)));
                };
                let checks = ctx
                    .analyser
                    .analyse_stage(&config, &snap.deployment, candidate, *stage)
                    .await;
                for c in &checks {
                    let result = if c.passed { "pass" } else { "fail" };
                    ctx.metrics
                        .checks
                        .get_or_create(&CheckLabels { check: c.name, result })
                        .inc();
                }
                ctx.board
                    .checked(&ns_name, &name, *revision, &checks, SystemTime::now());
                let v = analysis::verdict(&checks);
                tracing::info!(namespace = %ns_name, deployment = %name, passed = v.passed, checks = %v.message, "analysis");
                verdict = Some(v);
            }
            Action::Wait { until, reason } => {
                tracing::debug!(namespace = %ns_name, deployment = %name, %reason, "waiting");
                return Ok(match until {
                    Some(at) => {
                        Requeue::requeue(Duration::from_millis(at.saturating_sub(now_millis()).clamp(50, 30_000)))
                    }
                    None => Requeue::requeue(Duration::from_secs(30)),
                });
            }
            action => {
                tracing::info!(namespace = %ns_name, deployment = %name, ?action, "release step");
                let written = act::apply(&ctx.client, d, &config, &snap, action, now)
                    .await
                    .map_err(|source| Error::Write {
                        step: Step::of(action).unwrap_or(Step::Status),
                        source,
                    })?;
                // The next pass plans from the caches: they must show these writes first.
                if let Some(c) = &caches {
                    for w in &written {
                        if !c.caught_up(w, Duration::from_secs(2)).await {
                            tracing::debug!(namespace = %ns_name, deployment = %name, ?w, "the cache does not show the write yet");
                        }
                    }
                }
                let mut view = snap.deployment.clone();
                if let Action::Status(p) = action {
                    observe_status(ctx, &ns_name, &name, p, config.strategy);
                    let ended = p.notifies(&view.status);
                    view.status.phase = Some(p.phase);
                    view.status.release = Some(p.release);
                    view.status.weight = p.weight;
                    if let Some(kind) = ended {
                        notify(ctx, &config, kind, d, Payload::about(kind, &view, None));
                    }
                    if p.phase == Phase::Pending {
                        for problem in &problems {
                            tracing::warn!(namespace = %ns_name, deployment = %name, %problem, "configuration");
                            let event = release::Event {
                                warning: true,
                                reason: release::reasons::INVALID_CONFIGURATION,
                                message: problem.to_string(),
                            };
                            record(ctx, d, &config, &view, &event).await;
                        }
                    }
                }
                if let Some(event) = &plan.event {
                    record(ctx, d, &config, &view, event).await;
                }
                // Straight on to the next step, planned from a fresh read.
                return Ok(Requeue::requeue(Duration::from_millis(1)));
            }
        }
    }
}

/// The safety net: a template change that reached the Deployment without turnout's hold is reported
/// once per generation (Event, metric, log). Traffic is safe: at rest the route is the plain host.
async fn report_unheld(ctx: &Context, d: &Deployment, config: &ReleaseConfig) {
    let key = (d.uid().unwrap_or_default(), d.metadata.generation.unwrap_or(0));
    if !ctx
        .unheld
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(key)
    {
        return;
    }
    ctx.metrics.unheld.inc();
    let message = format!(
        "{}/{}: the pod template changed without turnout holding it (the webhook was down or bypassed); \
         it is rolling out natively. Check the webhook: kubectl -n turnout-system get pods",
        d.namespace().unwrap_or_default(),
        d.name_any()
    );
    tracing::warn!(namespace = ?d.namespace(), deployment = %d.name_any(), "{message}");
    let event = release::Event {
        warning: true,
        reason: release::reasons::UNHELD_ROLLOUT,
        message,
    };
    record(ctx, d, config, &observe::deployment_view(d), &event).await;
}

/// Records `event` on `d`, and tells the `event` hook of it.
async fn record(ctx: &Context, d: &Deployment, config: &ReleaseConfig, view: &DeploymentView, event: &release::Event) {
    if let Err(e) = act::record(&ctx.client, d, event).await {
        tracing::warn!(error = %e, reason = event.reason, "could not record an Event");
    }
    notify(
        ctx,
        config,
        HookKind::Event,
        d,
        Payload::about(HookKind::Event, view, Some(event)),
    );
    if let (Some(secret), Some(notice)) = (&config.notify, notify::Notice::of(event, view))
        && notice.kind.severity() >= config.notify_severity
    {
        chat(ctx, config, d, secret.clone(), notice);
    }
}

/// Sends `notice` to every chat service whose URL the Secret `secret` holds, in the background: it
/// never holds a release. Each delivery is retried (three more attempts, growing pauses); one that
/// still fails, or a Secret that cannot be read, is a Warning Event `NotificationFailed`, and every
/// delivery is counted by service and result.
fn chat(ctx: &Context, config: &ReleaseConfig, d: &Deployment, secret: String, notice: notify::Notice) {
    let caller = ctx.analyser.hooks().clone();
    let (client, d, timeout) = (ctx.client.clone(), d.clone(), config.hook_timeout);
    let counter = ctx.metrics.notifications.clone();
    tokio::spawn(async move {
        let ns = d.namespace().unwrap_or_default();
        let failed = |why: String| release::Event {
            warning: true,
            reason: release::reasons::NOTIFICATION_FAILED,
            message: format!("{ns}/{}: {why}", d.name_any()),
        };
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
        let urls = match secrets.get_opt(&secret).await {
            Ok(Some(s)) => s.data.unwrap_or_default(),
            Ok(None) => {
                let event = failed(format!("Secret {ns}/{secret} (turnout.dev/notify) not found"));
                if let Err(e) = act::record(&client, &d, &event).await {
                    tracing::warn!(error = %e, "could not record an Event");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, %secret, "cannot read the notification Secret");
                let event = failed(format!("cannot read Secret {ns}/{secret}: {e}"));
                if let Err(e) = act::record(&client, &d, &event).await {
                    tracing::warn!(error = %e, "could not record an Event");
                }
                return;
            }
        };
        for service in notify::Service::ALL {
            let Some(url) = urls.get(service.key()) else { continue };
            let url = String::from_utf8_lossy(&url.0).trim().to_owned();
            if url.is_empty() {
                continue;
            }
            let result = caller.post(&url, &notice.payload(service), timeout, 3).await;
            let outcome = if result.is_ok() { "ok" } else { "fail" };
            counter
                .get_or_create(&NotificationLabels {
                    service: service.key(),
                    result: outcome,
                })
                .inc();
            if let Err(why) = result {
                // The URL is a credential: the Event names the service and the Secret, not the URL.
                let why = why.replace(&url, "<url>");
                tracing::warn!(namespace = %ns, deployment = %d.name_any(), service = service.key(), "notification failed: {why}");
                let event = failed(format!(
                    "{} notification ({} of Secret {secret}) failed: {why}",
                    notice.kind.as_str(),
                    service.key()
                ));
                if let Err(e) = act::record(&client, &d, &event).await {
                    tracing::warn!(error = %e, "could not record an Event");
                }
            }
        }
    });
}

/// Sends a notification hook (`post-rollout`, `rollback`, `event`) in the background, if configured:
/// it never holds a release. A failure is logged and counted, and for `post-rollout` and `rollback`
/// also recorded as a Warning Event `HookFailed` (not for `event`, which that Event would call again).
fn notify(ctx: &Context, config: &ReleaseConfig, kind: HookKind, d: &Deployment, payload: Payload) {
    if !config.hooks.contains_key(&kind) {
        return;
    }
    let caller = ctx.analyser.hooks().clone();
    let (config, client, d) = (config.clone(), ctx.client.clone(), d.clone());
    let counter = ctx.metrics.hooks.clone();
    tokio::spawn(async move {
        let Some(result) = caller.call(&config, kind, &payload).await else {
            return;
        };
        let outcome = if result.is_ok() { "ok" } else { "fail" };
        counter
            .get_or_create(&HookLabels {
                hook: kind.as_str(),
                result: outcome,
            })
            .inc();
        let Err(why) = result else { return };
        tracing::warn!(namespace = %payload.namespace, deployment = %payload.name, "{why}");
        if kind != HookKind::Event {
            let event = release::Event {
                warning: true,
                reason: release::reasons::HOOK_FAILED,
                message: format!("{}/{}: {why}", payload.namespace, payload.name),
            };
            if let Err(e) = act::record(&client, &d, &event).await {
                tracing::warn!(error = %e, "could not record an Event");
            }
        }
    });
}

fn observe_status(ctx: &Context, ns: &str, name: &str, p: &release::StatusPatch, strategy: release::Strategy) {
    let labels = ReleaseLabels {
        namespace: ns.to_owned(),
        deployment: name.to_owned(),
    };
    let code = Phase::ALL.iter().position(|x| *x == p.phase).unwrap_or(0);
    ctx.metrics
        .phase
        .get_or_create(&labels)
        .set(i64::try_from(code).unwrap_or(0));
    ctx.metrics.weight.get_or_create(&labels).set(i64::from(p.weight));
    let key = (ns.to_owned(), name.to_owned(), p.release);
    let mut started = ctx.started.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if p.phase == Phase::Pending {
        started.insert(key, Instant::now());
    } else if p.phase.is_final() {
        let result = match p.phase {
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
            _ => "rolled_back",
        };
        ctx.metrics
            .releases
            .get_or_create(&ResultLabels {
                result,
                strategy: strategy.as_str(),
            })
            .inc();
        if let Some(at) = started.remove(&key) {
            ctx.metrics.duration.observe(at.elapsed().as_secs_f64());
        }
    }
}

fn error_policy(d: Arc<Deployment>, error: &Error, ctx: Arc<Context>) -> Requeue {
    let (step, reason) = (error.step(), error.reason());
    ctx.metrics.errors.get_or_create(&ErrorLabels { step, reason }).inc();
    if reason == "conflict" {
        tracing::debug!(deployment = %d.name_any(), step, "conflict; planning again from a fresh read");
        return Requeue::requeue(Duration::from_millis(50));
    }
    tracing::warn!(namespace = ?d.namespace(), deployment = %d.name_any(), step, reason, error = %error, "reconcile failed; retrying");
    Requeue::requeue(Duration::from_secs(2))
}

/// Checks for the providers' CRDs now and every 30 s; says so loudly when neither is installed.
async fn watch_crds(ctx: Arc<Context>) {
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    let mut last = None;
    loop {
        let found = async {
            let istio = crds.get_opt("virtualservices.networking.istio.io").await?.is_some()
                && crds.get_opt("destinationrules.networking.istio.io").await?.is_some();
            let gateway_api = crds.get_opt("httproutes.gateway.networking.k8s.io").await?.is_some();
            Ok::<_, kube::Error>(routing::Installed { istio, gateway_api })
        };
        match found.await {
            Ok(installed) => {
                ctx.istio.store(installed.istio, Ordering::Relaxed);
                ctx.gateway_api.store(installed.gateway_api, Ordering::Relaxed);
                ctx.metrics.istio.set(i64::from(installed.istio));
                ctx.metrics.gateway_api.set(i64::from(installed.gateway_api));
                if last != Some(installed) {
                    if !installed.istio && !installed.gateway_api {
                        tracing::error!(
                            "the Istio CRDs (virtualservices and destinationrules.networking.istio.io) and the \
                             Gateway API's (httproutes.gateway.networking.k8s.io) are not installed: releases cannot \
                             shift traffic and will fail until one is"
                        );
                    } else {
                        tracing::info!(
                            istio = installed.istio,
                            gateway_api = installed.gateway_api,
                            "routing providers installed"
                        );
                    }
                }
                last = Some(installed);
            }
            Err(e) => tracing::warn!(error = %e, "cannot check for the routing providers' CRDs"),
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
}

/// Runs the agent until `stop` completes.
///
/// # Errors
///
/// No Kubernetes client configuration.
pub async fn run_agent<S>(
    args: &Args,
    election: &leader::ElectionArgs,
    page_access: page::Access,
    registry: &mut Registry,
    health: Arc<crate::admin::Health>,
    stop: S,
) -> anyhow::Result<(impl Future<Output = ()> + use<S>, Arc<page::Page>)>
where
    S: Future<Output = ()> + Send + Sync + 'static,
{
    let config = kube::Config::infer()
        .await
        .map_err(|e| anyhow::anyhow!("no Kubernetes client configuration: set KUBECONFIG or run in a cluster ({e})"))?;
    let client = Client::try_from(config).context("cannot build the Kubernetes client")?;
    health.expect_agent();
    let metrics = Arc::new(AgentMetrics::register(registry));
    let ctx = Arc::new(Context {
        client: client.clone(),
        defaults: args.defaults(),
        analyser: analysis::Analyser::default(),
        metrics,
        istio: AtomicBool::new(true),
        // Until the first check answers, as if installed: a release is not failed for a CRD that
        // has merely not been looked for yet (a read of a kind not served fails and is retried).
        gateway_api: AtomicBool::new(true),
        started: Mutex::new(HashMap::new()),
        unheld: Mutex::new(std::collections::HashSet::new()),
        caches: std::sync::RwLock::new(None),
        deployments: std::sync::RwLock::new(None),
        board: page::Board::default(),
    });
    let page = Arc::new(page::Page::new(ctx.clone(), page_access));
    let istio_task = tokio::spawn(watch_crds(ctx.clone()));
    tracing::info!(defaults = ?args.defaults(), "agent running");
    let stop = stop.shared();
    let mut elector = election
        .leader_elect
        .then(|| leader::Elector::new(client.clone(), election));
    let agent = async move {
        match &mut elector {
            None => controller(client, ctx, health, stop).await,
            Some(elector) => loop {
                tracing::info!(identity = elector.identity(), "waiting for the leader Lease");
                // A follower has nothing to sync: it is ready once it knows it follows.
                tokio::select! {
                    () = elector.acquire_following(|| health.set_agent_synced()) => {}
                    () = stop.clone() => break,
                }
                tracing::info!(identity = elector.identity(), "leading: running releases");
                ctx.metrics.leader.set(1);
                tokio::select! {
                    () = controller(client.clone(), ctx.clone(), health.clone(), stop.clone()) => break,
                    () = elector.hold() => {
                        tracing::warn!("lost the leader Lease: no longer running releases");
                    }
                }
                // The controller is gone, and with it the watches that kept its caches current.
                *ctx.caches.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                *ctx.deployments
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                ctx.metrics.leader.set(0);
            },
        }
        istio_task.abort();
    };
    Ok((agent, page))
}

/// The controller, until `stop`.
async fn controller(
    client: Client,
    ctx: Arc<Context>,
    health: Arc<crate::admin::Health>,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let deployments: Api<Deployment> = Api::all(client.clone());
    let controller = Controller::new(deployments, watcher::Config::default());
    let (caches, streams) = cache::start(&client);
    let services = caches.services.clone();
    *ctx.caches.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(caches);
    let in_flight = controller.store();
    *ctx.deployments
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(controller.store());
    // Ready once the Deployments have been listed: until then the agent knows of no release.
    let listed = controller.store();
    let synced = tokio::spawn(async move {
        // Polled again and again: kube-runtime's readiness signal wakes only the last of several
        // waiters, and the controller waits on it too.
        loop {
            match tokio::time::timeout(Duration::from_millis(100), listed.wait_until_ready()).await {
                Ok(Ok(())) => {
                    tracing::info!("agent synced: the Deployments are listed");
                    health.set_agent_synced();
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => {}
            }
        }
    });
    // One watch per kind, shared by the caches and the controller's triggers.
    controller
        .owns_stream(streams.candidates)
        .watches_stream(streams.replica_sets, |rs| owner_of(&rs))
        .watches_stream(streams.pods, |pod| owner_of(&pod))
        // A namespace changed (its opt-in label, its settings): its releases in flight look again.
        .watches_stream(streams.namespaces, {
            let in_flight = in_flight.clone();
            move |ns| releases_in(&in_flight, &ns.name_any())
        })
        // A routing object changed (the implementation's status, someone else's edit): the
        // Deployments that own it look again; one nobody of turnout's owns (a competing route
        // appearing) may take a host from a release in flight: those of its namespace look again.
        .watches_stream(streams.virtual_services, {
            let in_flight = in_flight.clone();
            move |vs| owners_or_releases_in(&vs, &in_flight)
        })
        .watches_stream(streams.destination_rules, {
            let in_flight = in_flight.clone();
            move |dr| owners_or_releases_in(&dr, &in_flight)
        })
        .watches_stream(streams.http_routes, move |r| owners_or_releases_in(&r, &in_flight))
        // A per-version Service's endpoints became ready: the Deployment owning the Service.
        .watches_stream(streams.slices, move |slice| {
            let ns = slice.namespace()?;
            let service = slice.labels().get("kubernetes.io/service-name")?;
            let owner = services.get(&ObjectRef::new(service).within(&ns))?;
            owners_of(&*owner).into_iter().next()
        })
        .watches_stream(streams.services, |svc| owners_of(&svc))
        // Bounded so that a burst (start-up, a namespace opting in) costs memory in proportion to the
        // workers, not to the number of Deployments.
        .with_config(kube::runtime::controller::Config::default().concurrency(WORKERS))
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| {
            let ctx = ctx.clone();
            async move {
                match result {
                    // A Deployment deleted: its series go with it.
                    Err(kube::runtime::controller::Error::ObjectNotFound(gone)) => {
                        ctx.forget(gone.namespace.as_deref().unwrap_or_default(), &gone.name);
                    }
                    Err(e) => tracing::debug!(error = %e, "controller"),
                    Ok(_) => {}
                }
            }
        })
        .await;
    synced.abort();
}

/// The Deployments of namespace `ns` with a release in flight.
fn releases_in(in_flight: &kube::runtime::reflector::Store<Deployment>, ns: &str) -> Vec<ObjectRef<Deployment>> {
    in_flight
        .state_filter(|d| {
            d.namespace().as_deref() == Some(ns) && d.annotations().contains_key(annotations::STABLE_REVISION)
        })
        .into_iter()
        .map(|d| ObjectRef::from_obj(&*d))
        .collect()
}

/// The Deployments that own a routing object; for one no Deployment owns, the releases in flight of
/// its namespace.
fn owners_or_releases_in<K: kube::Resource>(
    obj: &K,
    in_flight: &kube::runtime::reflector::Store<Deployment>,
) -> Vec<ObjectRef<Deployment>> {
    let owners = owners_of(obj);
    match obj.meta().namespace.as_deref() {
        Some(ns) if owners.is_empty() => releases_in(in_flight, ns),
        _ => owners,
    }
}

/// Every Deployment that owns an object.
fn owners_of<K: kube::Resource>(obj: &K) -> Vec<ObjectRef<Deployment>> {
    let Some(ns) = obj.meta().namespace.as_deref() else {
        return Vec::new();
    };
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.kind == "Deployment")
        .map(|o| ObjectRef::new(&o.name).within(ns))
        .collect()
}

/// The user Deployment an object belongs to: a candidate's pods and ReplicaSets name it in a label,
/// the Deployment's own ReplicaSets through their owner.
fn owner_of<K: kube::Resource>(obj: &K) -> Option<ObjectRef<Deployment>> {
    let meta = obj.meta();
    let ns = meta.namespace.as_deref()?;
    if let Some(owner) = meta.labels.as_ref().and_then(|l| l.get(agent_names::RELEASE_OF)) {
        return Some(ObjectRef::new(owner).within(ns));
    }
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|o| o.kind == "Deployment")
        .map(|o| ObjectRef::new(&o.name).within(ns))
}

/// `turnout agent`: the agent with its own admin port.
///
/// # Errors
///
/// The admin port cannot be bound, or no Kubernetes client configuration.
pub async fn run(cmd: AgentCommand) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let health = Arc::new(crate::admin::Health::default());
    // No serving certificate in the agent alone.
    health.set_tls_loaded();
    let (agent, page) = run_agent(
        &cmd.release,
        &cmd.election,
        cmd.page.release_page,
        &mut registry,
        health.clone(),
        crate::signals::terminated(),
    )
    .await?;
    let listener = crate::admin::bind("--admin-listen", cmd.admin_listen).await?;
    tracing::info!(admin = %listener.local_addr()?, "admin serving");
    let admin = tokio::spawn(crate::admin::serve(
        listener,
        Arc::new(crate::admin::AdminState {
            health,
            registry,
            page: Some(page),
        }),
    ));
    agent.await;
    admin.abort();
    Ok(())
}

/// `turnout run`: the webhook and the agent in one process, one admin port.
#[derive(Clone, Debug, clap::Args)]
pub struct RunCommand {
    #[command(flatten)]
    pub webhook: crate::webhook::Args,
    #[command(flatten)]
    pub release: Args,
    #[command(flatten)]
    pub election: leader::ElectionArgs,
    #[command(flatten)]
    pub page: page::Args,
}

/// Runs `turnout run`.
///
/// # Errors
///
/// As the webhook and the agent.
pub async fn run_both(cmd: RunCommand) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let health = Arc::new(crate::admin::Health::default());
    let (agent, page) = run_agent(
        &cmd.release,
        &cmd.election,
        cmd.page.release_page,
        &mut registry,
        health.clone(),
        stopped(stop_rx.clone()),
    )
    .await?;
    let server =
        crate::webhook::Server::start_with(&cmd.webhook, stopped(stop_rx), registry, health, Some(page)).await?;
    tokio::spawn(async move {
        crate::signals::terminated().await;
        let _ = stop_tx.send(true);
    });
    agent.await;
    server.wait().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(release: &str, recorded: &str) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "podinfo", "namespace": "shop", "annotations": {
                "turnout.dev/stable-revision": "1", "turnout.dev/release": release,
                "turnout.dev/release-strategy": recorded } },
            "spec": { "selector": {}, "template": { "metadata": { "labels": { "turnout.dev/revision": "2" } } } }
        }))
        .unwrap()
    }

    #[test]
    fn a_failed_pass_is_labelled_by_its_step_and_the_api_server_s_answer() {
        let api = |code: u16| {
            kube::Error::Api(Box::new(
                serde_json::from_value(serde_json::json!({ "code": code, "status": "Failure" })).unwrap(),
            ))
        };
        let place = release::Action::PlaceCandidatePods {
            name: "podinfo-v2".into(),
            serving: true,
        };
        let forbidden = Error::Write {
            step: Step::of(&place).unwrap(),
            source: api(403),
        };
        assert_eq!((forbidden.step(), forbidden.reason()), ("place-pods", "forbidden"));
        assert!(forbidden.to_string().starts_with("place-pods: "), "{forbidden}");
        let read = Error::Read(api(409));
        assert_eq!((read.step(), read.reason()), ("read", "conflict"));
        assert_eq!(Error::Read(api(503)).reason(), "server");
        assert_eq!(
            Error::Read(kube::Error::LinesCodecMaxLineLengthExceeded).reason(),
            "unavailable"
        );
        let wait = release::Action::Wait {
            until: None,
            reason: String::new(),
        };
        assert_eq!(Step::of(&wait), None, "a wait writes nothing");
    }

    #[test]
    fn a_release_in_flight_keeps_its_strategy_and_the_next_one_takes_the_configured_one() {
        let canary = config::ReleaseConfig::default();
        let mut config = canary.clone();
        pin_strategy(&mut config, &deployment("2", "blue-green"));
        assert_eq!(config.strategy, release::Strategy::BlueGreen, "in flight: kept");
        let mut config = canary.clone();
        pin_strategy(&mut config, &deployment("1", "blue-green"));
        assert_eq!(
            config.strategy,
            release::Strategy::Canary,
            "a new template: as configured"
        );
        // An A/B test whose matches were removed cannot go on as one.
        let mut config = canary.clone();
        pin_strategy(&mut config, &deployment("2", "ab"));
        assert_eq!(config.strategy, release::Strategy::Canary);
        let mut config = canary;
        config.matches = crate::release::routing::parse_matches(r#"[{"headers":[{"name":"x","value":"1"}]}]"#).unwrap();
        pin_strategy(&mut config, &deployment("2", "ab"));
        assert_eq!(config.strategy, release::Strategy::AB);
    }
}
