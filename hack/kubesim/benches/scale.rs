//! Scale benchmark: kubesim with many Deployments, their pods and concurrent watchers.
//!
//! ```text
//!  client runtime (--client-threads)                      kubesim runtime (--sim-threads)
//!  kube-rs: creates, GET/LIST, patches, polls  ─HTTPS─▶   api ─▶ store ─▶ controllers (one task)
//!  N watchers (kube::runtime::watcher, Deployments+Pods) ◀─ watch tasks (one per watch)
//!                                   observer thread ◀──── store.subscribe() (timestamps per object)
//! ```
//!
//! Steps, each timed: start kubesim in-process; start the watchers; create the Deployments (concurrent
//! kube-rs creates); wait until every Deployment is available; steady-state latencies (GET, LIST of
//! every pod, watch round trip, controller reaction); a rolling update of every Deployment at once.
//! The observer thread timestamps every store change, which splits each Deployment's convergence into
//! its controller stages. CPU is read per thread name (`kubesim`, `client`, `observer`) from
//! `/proc/self/task/*/schedstat`, with the time kubesim's threads waited for a CPU ("k waited": other
//! work on the machine), memory from `/proc/self/status`.
//!
//! Creates and image patches go out as fast as the clients can, or evenly spaced with `--create-rate`
//! and `--patch-rate` (per second). Run with `cargo bench -p kubesim --bench scale` (options after
//! `--`, see `--help`). Results are printed, never asserted.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt as _, watcher};
use kubesim::sim::{Config, Sim, admin};
use kubesim::store::{Event, EventType};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

const PROBE_ANNOTATION: &str = "kubesim-bench/probe";
const PROBE_POD_PREFIX: &str = "kubesim-bench-probe-";

/// kubesim at scale: Deployments, pods and concurrent watchers.
#[derive(Debug, Parser)]
#[command(
    name = "scale",
    after_help = "Example:\n  cargo bench -p kubesim --bench scale -- --deployments 1000 --replicas 3 --watchers 10 --namespaces 10"
)]
struct Args {
    /// Deployments to create.
    #[arg(long, default_value_t = 1000)]
    deployments: usize,
    /// Replicas of each Deployment.
    #[arg(long, default_value_t = 3)]
    replicas: i32,
    /// Concurrent watchers (each watches Deployments and Pods in every namespace, with its own client).
    #[arg(long, default_value_t = 10)]
    watchers: usize,
    /// Namespaces the Deployments are spread over.
    #[arg(long, default_value_t = 10)]
    namespaces: usize,
    /// Requests in flight while creating and patching.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Deployments created per second, evenly spaced (at most `--concurrency` in flight); 0: as fast
    /// as the clients can.
    #[arg(long, default_value_t = 0.0)]
    create_rate: f64,
    /// Deployments patched per second in the rolling update; 0: as fast as the clients can. Default:
    /// `--create-rate`.
    #[arg(long)]
    patch_rate: Option<f64>,
    /// kubesim's pod readiness delay, in milliseconds.
    #[arg(long, default_value_t = 200)]
    ready_delay_ms: u64,
    /// Samples of each steady-state latency.
    #[arg(long, default_value_t = 50)]
    samples: usize,
    /// Bare pods created one by one in the steady state to time the controllers' reaction.
    #[arg(long, default_value_t = 100)]
    probes: usize,
    /// Interval between probe pods, in milliseconds.
    #[arg(long, default_value_t = 100)]
    probe_interval_ms: u64,
    /// Interval of the client's convergence polls (LIST of every Deployment), in milliseconds.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
    /// Longest wait for a convergence, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Changes the store keeps for watches to resume from (kubesim's default: 100,000).
    #[arg(long, default_value_t = 100_000)]
    history: usize,
    /// Worker threads of kubesim's runtime.
    #[arg(long, default_value_t = 2)]
    sim_threads: usize,
    /// Worker threads of the clients' runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Skip the rolling update.
    #[arg(long)]
    no_rollout: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sim_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.sim_threads)
        .thread_name("kubesim")
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .thread_name("client")
        .enable_all()
        .build()?;
    println!(
        "kubesim scale: {} Deployments x {} replicas in {} namespaces, {} watchers, readiness delay {} ms, {} CPUs; creates {}, patches {}",
        args.deployments,
        args.replicas,
        args.namespaces,
        args.watchers,
        args.ready_delay_ms,
        std::thread::available_parallelism().map_or(0, usize::from),
        pace(args.create_rate),
        pace(args.patch_rate()),
    );
    let mut report = Report::default();
    let meter = Meter::start();
    let sim = sim_rt.block_on(Sim::start(Config {
        pod_ready_delay: Duration::from_millis(args.ready_delay_ms),
        history: args.history,
        ..Config::default()
    }))?;
    report.phase("start kubesim", meter.stop(), "");
    let observer = Observer::start(&sim, args.replicas);
    let result = client_rt.block_on(run(&args, &sim, &observer, &mut report));
    report.print();
    let seen = observer.lock();
    println!(
        "\nstore changes seen by the observer: {} (lagged: {})",
        seen.changes, seen.lagged
    );
    drop(seen);
    drop(sim);
    // Do not wait for the controllers' current key or the watches' sends.
    sim_rt.shutdown_background();
    client_rt.shutdown_background();
    result
}

async fn run(args: &Args, sim: &Sim, observer: &Observer, report: &mut Report) -> anyhow::Result<()> {
    let client = connect(sim).await?;
    let namespaces: Vec<String> = (0..args.namespaces).map(|i| format!("bench-{i}")).collect();
    let ns_api: Api<Namespace> = Api::all(client.clone());
    for ns in &namespaces {
        let object: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
        ns_api.create(&PostParams::default(), &object).await?;
    }

    // Watchers.
    let meter = Meter::start();
    let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<(usize, u64)>();
    let probe = (namespaces[0].clone(), name(0));
    let mut watchers = Vec::new();
    for w in 0..args.watchers {
        let stats = Arc::new(WatcherStats::default());
        let c = connect(sim).await?;
        let tx = probe_tx.clone();
        let probe = probe.clone();
        let mut last = None;
        tokio::spawn(watch(
            Api::<Deployment>::all(c.clone()),
            stats.clone(),
            true,
            move |d| {
                if d.metadata.name.as_deref() == Some(&probe.1)
                    && d.metadata.namespace.as_deref() == Some(&probe.0)
                    && let Some(v) = d
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(PROBE_ANNOTATION))
                        .and_then(|v| v.parse::<u64>().ok())
                    && last != Some(v)
                {
                    last = Some(v);
                    let _ = tx.send((w, v));
                }
            },
        ));
        tokio::spawn(watch(Api::<Pod>::all(c), stats.clone(), false, |_| {}));
        watchers.push(stats);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while watchers.iter().map(|s| s.synced.load(Ordering::Relaxed)).sum::<u64>() < 2 * args.watchers as u64 {
        anyhow::ensure!(Instant::now() < deadline, "watchers did not start in 30 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    report.phase(
        "start watchers",
        meter.stop(),
        &format!("{} watchers x 2 watches listed and watching", args.watchers),
    );

    // Create.
    let image1 = "example.invalid/app:1";
    observer.begin(0, image1);
    let meter = Meter::start();
    let slots = Slots::new(args.create_rate);
    let latencies: Vec<Duration> = futures::stream::iter(0..args.deployments)
        .map(|i| {
            let api: Api<Deployment> = Api::namespaced(client.clone(), &namespaces[i % namespaces.len()]);
            let object = deployment(&name(i), args.replicas, image1);
            let slot = slots.of(i);
            async move {
                slot.wait().await;
                let t = Instant::now();
                api.create(&PostParams::default(), &object?).await?;
                anyhow::Ok(t.elapsed())
            }
        })
        .buffer_unordered(args.concurrency)
        .try_collect()
        .await?;
    let created = meter.stop();
    let create_wall = created.wall;
    report.phase(
        "create Deployments",
        created,
        &format!(
            "{}/s; latency {}",
            rate(args.deployments, create_wall),
            Stats::of(latencies).short()
        ),
    );

    // Converge.
    let all: Api<Deployment> = Api::all(client.clone());
    let polled = wait_complete(&all, args, image1).await;
    let converged = meter.stop();
    let per = per_deployment(&converged, args.deployments);
    report.phase(
        "converge (from first create)",
        converged,
        &match polled {
            Ok(polls) => format!("all available; {polls} polls; {per}"),
            Err(e) => format!("NOT CONVERGED: {e}"),
        },
    );
    report.stages(
        "create",
        observer.take(),
        create_wall,
        Duration::from_millis(args.ready_delay_ms),
    );
    report.drained(drain(&watchers, observer).await);

    // Steady state.
    let meter = Meter::start();
    let mut gets = Vec::new();
    for i in 0..args.samples {
        let n = (i * 7919) % args.deployments;
        let api: Api<Deployment> = Api::namespaced(client.clone(), &namespaces[n % namespaces.len()]);
        let t = Instant::now();
        api.get(&name(n)).await?;
        gets.push(t.elapsed());
    }
    report.latency("GET Deployment", Stats::of(gets), "");
    let pods: Api<Pod> = Api::all(client.clone());
    let mut lists = Vec::new();
    let mut listed = 0;
    for _ in 0..args.samples.div_ceil(5) {
        let t = Instant::now();
        listed = pods.list(&ListParams::default()).await?.items.len();
        lists.push(t.elapsed());
    }
    report.latency(
        "LIST every pod",
        Stats::of(lists),
        &format!("{listed} pods, decoded by kube-rs"),
    );
    let mut raw = Vec::new();
    let mut bytes = 0;
    for _ in 0..args.samples.div_ceil(5) {
        let request = http::Request::get("/api/v1/pods").body(Vec::new())?;
        let t = Instant::now();
        bytes = client.request_text(request).await?.len();
        raw.push(t.elapsed());
    }
    report.latency(
        "LIST every pod, raw",
        Stats::of(raw),
        &format!("{:.1} MB of JSON, not decoded", bytes as f64 / 1e6),
    );
    let probe_api: Api<Deployment> = Api::namespaced(client.clone(), &probe.0);
    let mut round_trips = Vec::new();
    let mut patches = Vec::new();
    for v in 0..args.samples as u64 {
        let patch = json!({"metadata": {"annotations": {PROBE_ANNOTATION: v.to_string()}}});
        let t = Instant::now();
        probe_api
            .patch(&probe.1, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        patches.push(t.elapsed());
        let mut seen = HashSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while seen.len() < args.watchers {
            match tokio::time::timeout_at(deadline, probe_rx.recv()).await {
                Ok(Some((w, got))) if got == v => {
                    seen.insert(w);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => anyhow::bail!("watchers did not all see probe {v} within 30 s"),
            }
        }
        round_trips.push(t.elapsed());
    }
    report.latency("PATCH Deployment", Stats::of(patches), "metadata annotation");
    report.latency(
        "watch round trip",
        Stats::of(round_trips),
        &format!("PATCH sent -> MODIFIED at all {} watchers", args.watchers),
    );
    observer.begin(2, "");
    let probe_pods: Api<Pod> = Api::namespaced(client.clone(), &namespaces[0]);
    let mut ticker = tokio::time::interval(Duration::from_millis(args.probe_interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe_creates = Vec::new();
    let probes_started = Instant::now();
    for i in 0..args.probes {
        ticker.tick().await;
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("{PROBE_POD_PREFIX}{i}")},
            "spec": {"containers": [{"name": "app", "image": image1}]},
        }))?;
        let t = Instant::now();
        probe_pods.create(&PostParams::default(), &pod).await?;
        probe_creates.push(t.elapsed());
    }
    report.latency(
        "CREATE pod (probes)",
        Stats::of(probe_creates),
        &format!(
            "{} probes sent over {} (planned {})",
            args.probes,
            secs(probes_started.elapsed()),
            secs(Duration::from_millis(args.probe_interval_ms * args.probes as u64))
        ),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reactions = observer.lock().probe_reactions();
    let reacted = reactions.len();
    report.latency(
        "controller reaction",
        Stats::of(reactions),
        &format!(
            "bare pod ADDED -> Running; {reacted}/{} probe pods (one every {} ms) Running 2 s after the last",
            args.probes, args.probe_interval_ms
        ),
    );
    report.phase("steady state (all of the above)", meter.stop(), "");

    // Rolling update.
    if !args.no_rollout {
        let image2 = "example.invalid/app:2";
        observer.begin(1, image2);
        let meter = Meter::start();
        let slots = Slots::new(args.patch_rate());
        let latencies: Vec<Duration> = futures::stream::iter(0..args.deployments)
            .map(|i| {
                let api: Api<Deployment> = Api::namespaced(client.clone(), &namespaces[i % namespaces.len()]);
                let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": image2}]}}}});
                let slot = slots.of(i);
                async move {
                    slot.wait().await;
                    let t = Instant::now();
                    api.patch(&name(i), &PatchParams::default(), &Patch::Strategic(patch))
                        .await?;
                    anyhow::Ok(t.elapsed())
                }
            })
            .buffer_unordered(args.concurrency)
            .try_collect()
            .await?;
        let patched = meter.stop();
        let patch_wall = patched.wall;
        report.phase(
            "patch image of every Deployment",
            patched,
            &format!(
                "{}/s; latency {}",
                rate(args.deployments, patch_wall),
                Stats::of(latencies).short()
            ),
        );
        let polled = wait_complete(&all, args, image2).await;
        let rolled = meter.stop();
        let per = per_deployment(&rolled, args.deployments);
        report.phase(
            "rolling update (from first patch)",
            rolled,
            &match polled {
                Ok(polls) => format!("all updated and available; {polls} polls; {per}"),
                Err(e) => format!("NOT CONVERGED: {e}"),
            },
        );
        report.stages(
            "rolling update",
            observer.take(),
            patch_wall,
            Duration::from_millis(args.ready_delay_ms * args.replicas.max(1) as u64),
        );
        report.drained(drain(&watchers, observer).await);
    }

    let listed_pods = pods.list(&ListParams::default()).await?.items.len();
    report.watchers = watchers
        .iter()
        .map(|s| {
            [
                s.deployments.load(Ordering::Relaxed),
                s.pods.load(Ordering::Relaxed),
                s.inits.load(Ordering::Relaxed),
                s.errors.load(Ordering::Relaxed),
            ]
        })
        .collect();
    report.note(format!("pods at the end: {listed_pods}"));
    Ok(())
}

impl Args {
    fn patch_rate(&self) -> f64 {
        self.patch_rate.unwrap_or(self.create_rate)
    }
}

fn pace(rate: f64) -> String {
    if rate > 0.0 {
        format!("at {rate}/s")
    } else {
        "unpaced".into()
    }
}

/// Evenly spaced send times: request `i` of a phase goes out `i / rate` seconds after the first
/// (open loop: a slow answer does not delay the next request's slot, unless `--concurrency` requests
/// are in flight).
struct Slots {
    start: tokio::time::Instant,
    rate: f64,
}

struct Slot(Option<tokio::time::Instant>);

impl Slots {
    fn new(rate: f64) -> Self {
        Self {
            start: tokio::time::Instant::now(),
            rate,
        }
    }

    fn of(&self, i: usize) -> Slot {
        Slot((self.rate > 0.0).then(|| self.start + Duration::from_secs_f64(i as f64 / self.rate)))
    }
}

impl Slot {
    async fn wait(self) {
        if let Some(at) = self.0 {
            tokio::time::sleep_until(at).await;
        }
    }
}

fn name(i: usize) -> String {
    format!("app-{i:05}")
}

fn deployment(name: &str, replicas: i32, image: &str) -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": image, "ports": [{"containerPort": 8080}]}]},
            },
        },
    }))?)
}

async fn connect(sim: &Sim) -> anyhow::Result<kube::Client> {
    let yaml = sim.kubeconfig(&admin().name)?;
    let kubeconfig = Kubeconfig::from_yaml(&yaml)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// Whether a Deployment runs `image` everywhere and is fully available.
fn complete(d: &Deployment, image: &str) -> bool {
    let (spec, Some(status)) = (&d.spec, &d.status) else {
        return false;
    };
    let want = spec.replicas.unwrap_or(1);
    let runs = spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .is_some_and(|c| c.image.as_deref() == Some(image));
    runs && status.observed_generation.is_some()
        && status.observed_generation == d.metadata.generation
        && status.replicas == Some(want)
        && status.updated_replicas == Some(want)
        && status.available_replicas == Some(want)
}

/// Polls the list of every Deployment until all are complete; the number of polls.
async fn wait_complete(api: &Api<Deployment>, args: &Args, image: &str) -> anyhow::Result<usize> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_s);
    let mut polls = 0;
    let mut shown = started;
    loop {
        polls += 1;
        let list = api.list(&ListParams::default()).await?;
        let done = list.items.iter().filter(|d| complete(d, image)).count();
        if done == args.deployments {
            return Ok(polls);
        }
        if shown.elapsed() >= Duration::from_secs(10) {
            shown = Instant::now();
            println!(
                "    ... {} s: {done}/{} complete",
                started.elapsed().as_secs(),
                args.deployments
            );
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{done}/{} complete after {} s",
            args.deployments,
            args.timeout_s
        );
        tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
    }
}

#[derive(Default)]
struct WatcherStats {
    deployments: AtomicU64,
    pods: AtomicU64,
    /// (Re)starts of a watch: one per watch when nothing goes wrong.
    inits: AtomicU64,
    /// Initial lists done (one per watch).
    synced: AtomicU64,
    errors: AtomicU64,
    /// When the last event arrived.
    last_event: Mutex<Option<Instant>>,
}

/// Waits until the watchers have received everything (no event for 1 s, at most 120 s): how long after
/// the store's last change the last event reached a watcher, and how long the wait was.
async fn drain(watchers: &[Arc<WatcherStats>], observer: &Observer) -> Option<(Duration, Duration)> {
    let total = || {
        watchers
            .iter()
            .map(|s| s.deployments.load(Ordering::Relaxed) + s.pods.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let started = Instant::now();
    let mut last = total();
    let mut quiet_since = started;
    while started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = total();
        if now != last {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_secs(1) {
            break;
        }
    }
    let last_change = observer.lock().last_watched_change?;
    let last_event = watchers
        .iter()
        .filter_map(|s| *s.last_event.lock().unwrap_or_else(PoisonError::into_inner))
        .max()?;
    Some((last_event.saturating_duration_since(last_change), started.elapsed()))
}

async fn watch<K>(api: Api<K>, stats: Arc<WatcherStats>, deployments: bool, mut on_apply: impl FnMut(&K) + Send)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let counter = if deployments { &stats.deployments } else { &stats.pods };
    let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
    while let Some(item) = stream.next().await {
        *stats.last_event.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        match item {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                counter.fetch_add(1, Ordering::Relaxed);
                on_apply(&o);
            }
            Ok(watcher::Event::Delete(_)) => {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Ok(watcher::Event::Init) => {
                stats.inits.fetch_add(1, Ordering::Relaxed);
            }
            Ok(watcher::Event::InitDone) => {
                stats.synced.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("watcher error: {e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The observer: timestamps every store change, per Deployment.

/// When each stage of one Deployment's convergence was first reached in the current phase.
#[derive(Clone, Copy, Debug, Default)]
struct Milestones {
    /// Created (create phase) or first seen with the new image (rolling update).
    start: Option<Instant>,
    rs_created: Option<Instant>,
    pods_created: Option<Instant>,
    pods_running: Option<Instant>,
    pods_ready: Option<Instant>,
    rs_available: Option<Instant>,
    complete: Option<Instant>,
}

const STAGES: [&str; 6] = [
    "ReplicaSet created",
    "its pods created",
    "its pods Running",
    "its pods Ready",
    "ReplicaSet available",
    "Deployment available",
];

impl Milestones {
    fn stages(&self) -> [Option<Instant>; 6] {
        [
            self.rs_created,
            self.pods_created,
            self.pods_running,
            self.pods_ready,
            self.rs_available,
            self.complete,
        ]
    }
}

#[derive(Default)]
struct PodCounts {
    created: i32,
    running: i32,
    ready: i32,
}

#[derive(Default)]
struct Seen {
    phase: u8,
    image: String,
    replicas: i32,
    phase_start: Option<Instant>,
    deployments: HashMap<(String, String), Milestones>,
    /// ReplicaSets created in this phase → their Deployment.
    replicasets: HashMap<(String, String), String>,
    counts: HashMap<(String, String), PodCounts>,
    /// Pods already counted Running / Ready.
    running: HashSet<(String, String)>,
    ready: HashSet<(String, String)>,
    probes: HashMap<String, (Instant, Option<Instant>)>,
    changes: u64,
    lagged: u64,
    last_change: Option<Instant>,
    /// The last change of a Deployment or a Pod (what the watchers watch).
    last_watched_change: Option<Instant>,
}

struct Observer(Arc<Mutex<Seen>>);

impl Observer {
    fn start(sim: &Sim, replicas: i32) -> Self {
        let seen = Arc::new(Mutex::new(Seen {
            replicas,
            ..Seen::default()
        }));
        let mut rx = sim.api.store.subscribe();
        let shared = seen.clone();
        let spawned = std::thread::Builder::new().name("observer".into()).spawn(move || {
            loop {
                match rx.blocking_recv() {
                    Ok(e) => {
                        let now = Instant::now();
                        shared.lock().unwrap_or_else(PoisonError::into_inner).observe(&e, now);
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        shared.lock().unwrap_or_else(PoisonError::into_inner).lagged += n;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        if let Err(e) = spawned {
            eprintln!("cannot start the observer: {e}");
        }
        Self(seen)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a phase: 0 creation, 1 rolling update (to `image`), 2 controller probes.
    fn begin(&self, phase: u8, image: &str) {
        let mut s = self.lock();
        s.phase = phase;
        s.image = image.to_owned();
        s.phase_start = Some(Instant::now());
        s.deployments.clear();
        s.replicasets.clear();
        s.counts.clear();
        s.running.clear();
        s.ready.clear();
    }

    fn take(&self) -> Observed {
        let s = self.lock();
        Observed {
            start: s.phase_start,
            milestones: s.deployments.values().copied().collect(),
            last_change: s.last_change,
        }
    }
}

struct Observed {
    start: Option<Instant>,
    milestones: Vec<Milestones>,
    last_change: Option<Instant>,
}

fn owner(o: &Value, kind: &str) -> Option<String> {
    o["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["kind"] == kind && r["controller"] == true)
        .and_then(|r| r["name"].as_str().map(str::to_owned))
}

fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

impl Seen {
    fn observe(&mut self, e: &Event, now: Instant) {
        self.changes += 1;
        self.last_change = Some(now);
        if matches!(
            (e.resource.0.as_str(), e.resource.1.as_str()),
            ("apps", "deployments") | ("", "pods")
        ) {
            self.last_watched_change = Some(now);
        }
        let o = &e.object;
        let key = (e.namespace.clone(), e.name.clone());
        match (e.resource.0.as_str(), e.resource.1.as_str()) {
            ("apps", "deployments") if self.phase < 2 && e.kind != EventType::Deleted => {
                let spec = &o["spec"];
                let image = spec["template"]["spec"]["containers"][0]["image"].as_str() == Some(&self.image);
                let status = &o["status"];
                let want = spec["replicas"].as_i64().unwrap_or(1);
                let complete = image
                    && !status["observedGeneration"].is_null()
                    && status["observedGeneration"] == o["metadata"]["generation"]
                    && [
                        status["replicas"].as_i64(),
                        status["updatedReplicas"].as_i64(),
                        status["availableReplicas"].as_i64(),
                    ]
                    .iter()
                    .all(|v| *v == Some(want));
                let starts = if self.phase == 0 {
                    e.kind == EventType::Added
                } else {
                    image
                };
                if starts || self.deployments.contains_key(&key) {
                    let m = self.deployments.entry(key).or_default();
                    m.start.get_or_insert(now);
                    if complete {
                        m.complete.get_or_insert(now);
                    }
                }
            }
            ("apps", "replicasets") if self.phase < 2 => {
                let Some(d) = owner(o, "Deployment") else { return };
                let dkey = (e.namespace.clone(), d);
                if e.kind == EventType::Added
                    && let Some(m) = self.deployments.get_mut(&dkey)
                {
                    m.rs_created.get_or_insert(now);
                    self.replicasets.insert(key.clone(), dkey.1.clone());
                }
                if self.replicasets.contains_key(&key)
                    && o["status"]["availableReplicas"].as_i64() >= Some(i64::from(self.replicas))
                    && let Some(m) = self.deployments.get_mut(&dkey)
                {
                    m.rs_available.get_or_insert(now);
                }
            }
            ("", "pods") => {
                if self.phase == 2 && e.name.starts_with(PROBE_POD_PREFIX) {
                    let entry = self.probes.entry(e.name.clone()).or_insert((now, None));
                    if o["status"]["phase"] == "Running" {
                        entry.1.get_or_insert(now);
                    }
                    return;
                }
                if e.kind == EventType::Deleted {
                    return;
                }
                let Some(rs) = owner(o, "ReplicaSet") else { return };
                let rs_key = (e.namespace.clone(), rs);
                let Some(d) = self.replicasets.get(&rs_key) else { return };
                let dkey = (e.namespace.clone(), d.clone());
                let want = self.replicas;
                let counts = self.counts.entry(rs_key).or_default();
                let Some(m) = self.deployments.get_mut(&dkey) else {
                    return;
                };
                if e.kind == EventType::Added {
                    counts.created += 1;
                    if counts.created >= want {
                        m.pods_created.get_or_insert(now);
                    }
                }
                if o["status"]["phase"] == "Running" && self.running.insert(key.clone()) {
                    counts.running += 1;
                    if counts.running >= want {
                        m.pods_running.get_or_insert(now);
                    }
                }
                if ready(o) && self.ready.insert(key) {
                    counts.ready += 1;
                    if counts.ready >= want {
                        m.pods_ready.get_or_insert(now);
                    }
                }
            }
            _ => {}
        }
    }

    fn probe_reactions(&self) -> Vec<Duration> {
        self.probes
            .values()
            .filter_map(|(added, running)| running.map(|r| r - *added))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------------
// Measurements.

/// Wall time, CPU per thread group and memory of a phase.
struct Meter {
    wall: Instant,
    cpu: Cpu,
}

#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    /// utime + stime of the process (`/proc/self/stat`), every thread ever.
    process: Duration,
    /// Time on CPU of the live threads named kubesim / client / observer (`schedstat`).
    kubesim: Duration,
    client: Duration,
    observer: Duration,
    /// Time kubesim's threads were ready to run but waited for a CPU (`schedstat`'s run-queue delay):
    /// how much other work on the machine held kubesim back.
    kubesim_waited: Duration,
}

fn cpu() -> Cpu {
    let mut c = Cpu::default();
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some((_, rest)) = stat.rsplit_once(')')
    {
        // After the command: state (field 3), ..., utime (14), stime (15), in USER_HZ (100 on Linux).
        let fields: Vec<u64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
        if fields.len() > 12 {
            c.process = Duration::from_millis((fields[11] + fields[12]) * 10);
        }
    }
    for entry in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let dir = entry.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let slot = match comm.trim() {
            "kubesim" => &mut c.kubesim,
            "client" => &mut c.client,
            "observer" => &mut c.observer,
            _ => continue,
        };
        let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        let mut fields = stat.split_whitespace().map(|n| n.parse::<u64>().unwrap_or(0));
        *slot += Duration::from_nanos(fields.next().unwrap_or(0));
        if comm.trim() == "kubesim" {
            c.kubesim_waited += Duration::from_nanos(fields.next().unwrap_or(0));
        }
    }
    c
}

/// (VmRSS, VmHWM) in MiB.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct Measured {
    wall: Duration,
    cpu: Cpu,
    rss: f64,
    hwm: f64,
}

impl Meter {
    fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: cpu(),
        }
    }

    fn stop(&self) -> Measured {
        let now = cpu();
        let (rss, hwm) = memory();
        Measured {
            wall: self.wall.elapsed(),
            cpu: Cpu {
                process: now.process.saturating_sub(self.cpu.process),
                kubesim: now.kubesim.saturating_sub(self.cpu.kubesim),
                client: now.client.saturating_sub(self.cpu.client),
                observer: now.observer.saturating_sub(self.cpu.observer),
                kubesim_waited: now.kubesim_waited.saturating_sub(self.cpu.kubesim_waited),
            },
            rss,
            hwm,
        }
    }
}

struct Stats {
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Stats {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let at = |q: f64| {
            if samples.is_empty() {
                Duration::ZERO
            } else {
                samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1]
            }
        };
        Self {
            n: samples.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }

    fn short(&self) -> String {
        format!("p50 {} p99 {} max {}", ms(self.p50), ms(self.p99), ms(self.max))
    }
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 100.0 {
        format!("{ms:.0}ms")
    } else if ms >= 10.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{ms:.2}ms")
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// kubesim's CPU per Deployment in a phase, and what following `n` of them a second would take.
fn per_deployment(m: &Measured, n: usize) -> String {
    let each = m.cpu.kubesim / u32::try_from(n.max(1)).unwrap_or(u32::MAX);
    format!(
        "kubesim CPU {} per Deployment (1,000/s would take {:.1} cores)",
        ms(each),
        each.as_secs_f64() * 1000.0
    )
}

fn rate(n: usize, d: Duration) -> String {
    format!("{:.0}", n as f64 / d.as_secs_f64().max(1e-9))
}

#[derive(Default)]
struct Report {
    phases: Vec<(String, Measured, String)>,
    latencies: Vec<(String, Stats, String)>,
    stages: Vec<String>,
    watchers: Vec<[u64; 4]>,
    notes: Vec<String>,
}

impl Report {
    fn phase(&mut self, what: &str, m: Measured, note: &str) {
        println!(
            "  {what}: {} ({} kubesim CPU) {note}",
            secs(m.wall),
            secs(m.cpu.kubesim)
        );
        self.phases.push((what.to_owned(), m, note.to_owned()));
    }

    fn latency(&mut self, what: &str, s: Stats, note: &str) {
        println!("  {what}: {} {note}", s.short());
        self.latencies.push((what.to_owned(), s, note.to_owned()));
    }

    fn drained(&mut self, lag: Option<(Duration, Duration)>) {
        if let Some((lag, waited)) = lag {
            let line = format!(
                "  watchers: last event received {} after the last Deployment/Pod change (drain waited {})",
                ms(lag),
                secs(waited)
            );
            println!("{line}");
            self.stages.push(line);
        }
    }

    fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// Where each Deployment's time went, stage by stage, from the observer's timestamps.
    fn stages(&mut self, what: &str, observed: Observed, issue_wall: Duration, bound: Duration) {
        let mut out = Vec::new();
        let n = observed.milestones.len();
        out.push(format!(
            "{what}: per Deployment, from its {} (n={n}); lower bound {} (readiness delay{})",
            if what == "create" {
                "creation"
            } else {
                "first write with the new image"
            },
            ms(bound),
            if what == "create" {
                ""
            } else {
                " x replicas, maxSurge 1"
            },
        ));
        out.push(format!(
            "  {:<24} {:>9} {:>9} {:>9} {:>6}",
            "stage reached", "p50", "p99", "max", "n"
        ));
        for (i, stage) in STAGES.iter().enumerate() {
            let d: Vec<Duration> = observed
                .milestones
                .iter()
                .filter_map(|m| Some(m.stages()[i]? - m.start?))
                .collect();
            let s = Stats::of(d);
            out.push(format!(
                "  {stage:<24} {:>9} {:>9} {:>9} {:>6}",
                ms(s.p50),
                ms(s.p99),
                ms(s.max),
                s.n
            ));
        }
        if let Some(start) = observed.start {
            let last_complete = observed.milestones.iter().filter_map(|m| m.complete).max();
            let last_start = observed.milestones.iter().filter_map(|m| m.start).max();
            out.push(format!(
                "  writes issued over {}; last Deployment in store at +{}; last available at +{}; last store change at +{}",
                secs(issue_wall),
                last_start.map_or("-".into(), |t| secs(t - start)),
                last_complete.map_or("-".into(), |t| secs(t - start)),
                observed.last_change.map_or("-".into(), |t| secs(t.saturating_duration_since(start))),
            ));
        }
        for l in &out {
            println!("{l}");
        }
        self.stages.extend(out);
    }

    fn print(&self) {
        println!("\n== phases");
        println!(
            "{:<34} {:>8} {:>9} {:>9} {:>6} {:>9} {:>9} {:>9} {:>8} {:>8}  note",
            "phase", "wall", "cpu proc", "kubesim", "cores", "k waited", "client", "observer", "RSS MiB", "HWM MiB"
        );
        for (what, m, note) in &self.phases {
            println!(
                "{what:<34} {:>8} {:>9} {:>9} {:>6.2} {:>9} {:>9} {:>9} {:>8.0} {:>8.0}  {note}",
                secs(m.wall),
                secs(m.cpu.process),
                secs(m.cpu.kubesim),
                m.cpu.kubesim.as_secs_f64() / m.wall.as_secs_f64().max(1e-9),
                secs(m.cpu.kubesim_waited),
                secs(m.cpu.client),
                secs(m.cpu.observer),
                m.rss,
                m.hwm
            );
        }
        println!("\n== steady-state latencies");
        println!("{:<22} {:>4} {:>9} {:>9} {:>9}  note", "", "n", "p50", "p99", "max");
        for (what, s, note) in &self.latencies {
            println!(
                "{what:<22} {:>4} {:>9} {:>9} {:>9}  {note}",
                s.n,
                ms(s.p50),
                ms(s.p99),
                ms(s.max)
            );
        }
        println!("\n== convergence stages");
        for l in &self.stages {
            println!("{l}");
        }
        if !self.watchers.is_empty() {
            println!("\n== watchers (events received, watch (re)starts, errors)");
            let col = |i: usize| {
                let v: Vec<u64> = self.watchers.iter().map(|w| w[i]).collect();
                let min = v.iter().min().copied().unwrap_or(0);
                let max = v.iter().max().copied().unwrap_or(0);
                let sum: u64 = v.iter().sum();
                format!("min {min} max {max} total {sum}")
            };
            println!("  Deployment events per watcher: {}", col(0));
            println!("  Pod events per watcher:        {}", col(1));
            let restarts: u64 = self.watchers.iter().map(|w| w[2].saturating_sub(2)).sum();
            let errors: u64 = self.watchers.iter().map(|w| w[3]).sum();
            println!("  watch restarts beyond the first list: {restarts}; errors: {errors}");
        }
        for n in &self.notes {
            println!("{n}");
        }
    }
}
