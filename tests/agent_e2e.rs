//! Releases end to end (issue scenarios a–f): the real control plane with the test bed's node agent and
//! mesh under constant HTTP load, a real Prometheus scraping the mesh's Istio metrics, `turnout run` as a
//! separate process with a token of deploy/'s ServiceAccount (so deploy/'s RBAC is enforced), its webhook
//! called by the API server through deploy/'s registration, and the pinned kubectl making the changes a
//! user makes.
//!
//! The scenarios run side by side, one namespace each, on one cluster.

// A test stops at the first thing that is not as it expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Cluster, eventually};
use http_body_util::{BodyExt as _, Empty};
use serde_json::Value;

const V1: &str = "podinfod=ghcr.io/stefanprodan/podinfo:6.0.0";
const V2: &str = "podinfod=ghcr.io/stefanprodan/podinfo:6.1.0";
const V3: &str = "podinfod=ghcr.io/stefanprodan/podinfo:6.2.0";
/// Requests per second of each namespace's load.
const RATE: u64 = 40;

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A child process killed when dropped.
struct Process {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Process {
    fn spawn(cmd: &mut tokio::process::Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Self { child, log }
    }

    fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

struct Env {
    cluster: Cluster,
    turnout: Process,
    _prometheus: Option<Process>,
    /// turnout's admin port.
    admin: SocketAddr,
    listen: SocketAddr,
    prometheus_url: String,
    /// How many times turnout was started.
    starts: u32,
}

/// `turnout run` as the agent's ServiceAccount, ready; its log goes to `turnout-<start>.log`.
async fn spawn_turnout(
    cluster: &Cluster,
    listen: SocketAddr,
    admin: SocketAddr,
    prometheus: &str,
    start: u32,
) -> Process {
    let dir = cluster.dir.path();
    let turnout = Process::spawn(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
            .args([
                "run",
                "--listen",
                &listen.to_string(),
                "--admin-listen",
                &admin.to_string(),
            ])
            .arg("--tls-cert")
            .arg(dir.join("certs/tls.crt"))
            .arg("--tls-key")
            .arg(dir.join("certs/tls.key"))
            .args(["--agent-username", common::AGENT_USER, "--drain-delay", "0s"])
            .args(["--steps", "20,50,100", "--interval", "2s", "--threshold", "2"])
            .args([
                "--propagation-delay",
                "1s",
                "--drain",
                "1s",
                "--progress-deadline",
                "60s",
            ])
            .args(["--latency-p99-max", "200ms", "--prometheus", prometheus])
            .args(["--lease-duration", "3s", "--identity", &format!("turnout-{start}")])
            .env("KUBECONFIG", cluster.agent_kubeconfig())
            .env("RUST_LOG", "info"),
        dir.join(format!("turnout-{start}.log")),
    );
    let ready = format!("http://{admin}/ready");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while http_get(&ready).await.is_none_or(|(s, _)| s != 200) {
        assert!(
            std::time::Instant::now() < deadline,
            "turnout is not ready after 30 s; its log:\n{}",
            turnout.tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    turnout
}

impl std::ops::Deref for Env {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- turnout's log, last lines ---\n{}", self.turnout.tail(80));
        }
        let _ = self.turnout.child.start_kill();
    }
}

async fn http_get(url: &str) -> Option<(u16, String)> {
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = tokio::time::timeout(Duration::from_secs(2), client.get(url.parse().ok()?))
        .await
        .ok()?
        .ok()?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into()))
}

/// A real Prometheus scraping the mesh's metrics every second.
/// A Prometheus scraping the mesh and turnout's admin port (`admin`) every second.
async fn prometheus(cluster: &Cluster, admin: SocketAddr) -> (Process, String) {
    let dir = cluster.dir.path().to_owned();
    let prometheus_addr = free_port();
    std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: kubesim-mesh\n    \
                 static_configs:\n      - targets: ['{}']\n  - job_name: turnout\n    static_configs:\n      - targets: ['{admin}']\n",
                cluster.metrics_addr()
            ),
        )
        .unwrap();
    let binary = std::env::var("PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    let prometheus = Process::spawn(
        tokio::process::Command::new(&binary)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={prometheus_addr}"))
            .arg("--log.level=warn"),
        dir.join("prometheus.log"),
    );
    let prometheus_url = format!("http://{prometheus_addr}");
    eventually(Duration::from_secs(30), "Prometheus to be ready", || {
        let url = format!("{prometheus_url}/-/ready");
        async move { http_get(&url).await.filter(|(s, _)| *s == 200) }
    })
    .await;

    (prometheus, prometheus_url)
}

impl Env {
    /// A cluster with turnout installed; `istio`: the Istio and Gateway API CRDs and a Prometheus
    /// scraping the mesh.
    async fn start(istio: bool) -> Self {
        Self::start_with(istio, istio).await
    }

    /// A cluster with turnout installed; `crds`: the Istio and Gateway API CRDs (without, neither);
    /// `prometheus`: a Prometheus scraping the mesh (its pods' metrics, without a mesh).
    async fn start_with(istio: bool, with_prometheus: bool) -> Self {
        let cluster = Cluster::exclusive().await;
        let dir = cluster.dir.path().to_owned();

        let listen = free_port();
        let admin = free_port();
        // Prometheus scraping the mesh and turnout every second.
        let (prometheus, prometheus_url) = if with_prometheus {
            let (p, url) = prometheus(&cluster, admin).await;
            (Some(p), url)
        } else {
            (None, "http://127.0.0.1:9".to_owned())
        };

        // turnout run, as the agent's ServiceAccount.
        let bundle =
            turnout::certs::generate(&["turnout-webhook.turnout-system.svc".into(), "127.0.0.1".into()]).unwrap();
        turnout::certs::write(&dir.join("certs"), &bundle, false).unwrap();
        // Installed before it starts, as on a cluster: the agent's watches find their RBAC in place.
        cluster.install(bundle.ca_pem.as_bytes(), listen).await;
        // With `istio`, both providers are installed (a release uses Istio unless it asks for
        // gateway-api); without, neither is.
        if istio {
            cluster.istio_crds().await;
            cluster.gateway_api_crds().await;
        } else {
            for crds in ["istio", "gateway-api"] {
                cluster
                    .ok(&[
                        "delete",
                        "--ignore-not-found",
                        "--wait",
                        "-f",
                        &format!("{}/../shared/crds/{crds}", env!("CARGO_MANIFEST_DIR")),
                    ])
                    .await;
            }
        }
        let turnout = spawn_turnout(&cluster, listen, admin, &prometheus_url, 1).await;
        Self {
            cluster,
            turnout,
            _prometheus: prometheus,
            admin,
            listen,
            prometheus_url,
            starts: 1,
        }
    }

    /// Kills turnout (SIGKILL, no chance to clean up) and starts it again.
    async fn restart(&mut self) {
        let _ = self.turnout.child.start_kill();
        let _ = self.turnout.child.wait().await;
        self.starts += 1;
        self.turnout = spawn_turnout(
            &self.cluster,
            self.listen,
            self.admin,
            &self.prometheus_url,
            self.starts,
        )
        .await;
    }

    fn mesh(&self) -> SocketAddr {
        self.mesh_addr()
    }

    async fn annotation(&self, ns: &str, key: &str) -> Option<String> {
        let d = self.get(ns, "deployment/podinfo").await;
        d["metadata"]["annotations"][key].as_str().map(str::to_owned)
    }

    async fn wait_phase(&self, ns: &str, phase: &str, timeout: Duration) {
        eventually(timeout, &format!("{ns}/podinfo to reach phase {phase}"), || async {
            (self.annotation(ns, "turnout.dev/phase").await.as_deref() == Some(phase)).then_some(())
        })
        .await;
    }

    /// Waits for the safety net's Event about an update that rolled out without the webhook.
    async fn unheld_reported(&self, ns: &str) {
        let reported = eventually(Duration::from_secs(30), "an UnheldRollout Event", || async {
            self.events(ns)
                .await
                .into_iter()
                .find(|e| e.starts_with("Warning UnheldRollout"))
        })
        .await;
        assert!(reported.contains("the webhook was down or bypassed"), "{reported}");
    }

    async fn events(&self, ns: &str) -> Vec<String> {
        let list = self.get(ns, "events").await;
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["source"]["component"] == "turnout")
            .map(|e| {
                format!(
                    "{} {}: {}",
                    e["type"].as_str().unwrap_or(""),
                    e["reason"].as_str().unwrap_or(""),
                    e["message"].as_str().unwrap_or("")
                )
            })
            .collect()
    }

    /// The pods serving in `ns`: (name, revision label, candidate?) of those not being deleted.
    async fn pods(&self, ns: &str) -> Vec<(String, String, bool)> {
        let list = self.get(ns, "pods").await;
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| {
                let labels = &p["metadata"]["labels"];
                (
                    p["metadata"]["name"].as_str().unwrap().to_owned(),
                    labels["turnout.dev/revision"].as_str().unwrap_or("").to_owned(),
                    labels["turnout.dev/track"] == "candidate",
                )
            })
            .collect()
    }

    /// A namespace with podinfo (2 replicas) behind a Service, rolled out, under load.
    async fn prepare(&self, ns: &str, opted_in: bool, annotations: &[&str]) -> Load {
        self.prepare_as(ns, opted_in, annotations, false).await
    }

    /// As [`Env::prepare`]; `graceful`: podinfo's pods keep serving for 1.5 s after SIGTERM (longer
    /// than any proxy takes to drop their endpoints), as a preStop sleep makes them.
    async fn prepare_as(&self, ns: &str, opted_in: bool, annotations: &[&str], graceful: bool) -> Load {
        self.namespace(ns, opted_in).await;
        if graceful {
            let sample = format!(
                "{}/../shared/fixtures/podinfo/deployment.yaml",
                env!("CARGO_MANIFEST_DIR")
            );
            let manifest = self
                .ok(&[
                    "set",
                    "env",
                    "--local",
                    "-f",
                    &sample,
                    "KUBESIM_SHUTDOWN_DELAY_MS=1500",
                    "-o",
                    "yaml",
                ])
                .await;
            let applied = self
                .kubectl(&["apply", "-n", ns, "-f", "-"], Some(&manifest.stdout))
                .await;
            assert!(applied.ok, "{}", applied.stderr);
        } else {
            self.podinfo(ns).await;
        }
        self.apply(&format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: podinfo\n  namespace: {ns}\nspec:\n  selector:\n    app: podinfo\n  \
             ports:\n    - name: http\n      port: 9898\n      targetPort: 9898\n"
        ))
        .await;
        self.ok(&["scale", "-n", ns, "deployment/podinfo", "--replicas=2"])
            .await;
        if !annotations.is_empty() {
            let mut args = vec!["annotate", "-n", ns, "deployment/podinfo", "--overwrite"];
            args.extend_from_slice(annotations);
            self.ok(&args).await;
        }
        self.ok(&["rollout", "status", "-n", ns, "deployment/podinfo", "--timeout=60s"])
            .await;
        let load = Load::start(self.mesh(), ns);
        eventually(
            Duration::from_secs(20),
            &format!("{ns}: answers through the mesh"),
            || async { (load.stats().ok > 20).then_some(()) },
        )
        .await;
        load
    }
}

#[derive(Clone, Debug, Default)]
struct Stats {
    ok: u64,
    failed: u64,
    /// Failed requests no pod answered (refused, reset, timed out: sent to a pod that was going),
    /// unlike a pod's own error answers (500).
    lost: u64,
    versions: BTreeMap<String, u64>,
    samples: Vec<String>,
}

impl Stats {
    /// The versions that answered since `before`, with how many answers each.
    fn served_since(&self, before: &Stats) -> BTreeMap<String, u64> {
        self.versions
            .iter()
            .map(|(v, n)| (v.clone(), n - before.versions.get(v).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// The requests the candidate `podinfo-v2` of `ns` has counted at its destination, from Prometheus.
async fn candidate_requests(env: &Env, ns: &str) -> Option<f64> {
    let query = format!(
        r#"sum(istio_requests_total{{reporter="destination",destination_workload_namespace="{ns}",destination_workload="podinfo-v2"}})"#
    );
    let url = format!(
        "{}/api/v1/query?query={}",
        env.prometheus_url,
        turnout::agent::analysis::encode(&query)
    );
    let (_, body) = http_get(&url).await?;
    let answer: Value = serde_json::from_str(&body).ok()?;
    answer["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// Constant load through the mesh: `RATE` requests per second, each on its own, counted.
struct Load {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<Stats>>,
}

impl Load {
    fn start(mesh: SocketAddr, ns: &str) -> Self {
        Self::start_for(mesh, format!("podinfo.{ns}"))
    }

    /// Load on `host` (a Service as `name.namespace`, or a hostname a Gateway's routes name).
    fn start_for(mesh: SocketAddr, host: String) -> Self {
        Self::start_with(mesh, host, None)
    }

    /// Load on `host`, every request with the header `header` if given.
    fn start_with(mesh: SocketAddr, host: String, header: Option<(&'static str, &'static str)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(Stats::default()));
        let (stop2, stats2) = (stop.clone(), stats.clone());
        tokio::spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<Bytes>>();
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            while !stop2.load(Ordering::Relaxed) {
                tick.tick().await;
                let mut request = http::Request::get(format!("http://{mesh}/")).header("host", &host);
                if let Some((name, value)) = header {
                    request = request.header(name, value);
                }
                let request = request.body(Empty::new()).unwrap();
                let (client, stats) = (client.clone(), stats2.clone());
                tokio::spawn(async move {
                    let answer = tokio::time::timeout(Duration::from_secs(5), async {
                        let response = client.request(request).await.map_err(|e| e.to_string())?;
                        let status = response.status();
                        let flags = response
                            .headers()
                            .get("x-kubesim-response-flags")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        let body = response
                            .into_body()
                            .collect()
                            .await
                            .map_err(|e| e.to_string())?
                            .to_bytes();
                        Ok::<_, String>((status, flags, body))
                    })
                    .await;
                    let mut s = stats.lock().unwrap();
                    match answer {
                        Ok(Ok((status, _, body))) if status.is_success() => {
                            s.ok += 1;
                            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                            *s.versions
                                .entry(v["version"].as_str().unwrap_or("?").to_owned())
                                .or_default() += 1;
                        }
                        other => {
                            s.failed += 1;
                            if !matches!(&other, Ok(Ok((status, ..))) if *status == http::StatusCode::INTERNAL_SERVER_ERROR)
                            {
                                s.lost += 1;
                            }
                            if s.samples.len() < 5 {
                                s.samples.push(match other {
                                    Ok(Ok((status, flags, _))) => format!("{status} {flags}"),
                                    Ok(Err(e)) => e,
                                    Err(_) => "timeout".into(),
                                });
                            }
                        }
                    }
                });
            }
        });
        Self { stop, stats }
    }

    fn stats(&self) -> Stats {
        self.stats.lock().unwrap().clone()
    }

    /// Stops the load after letting requests in flight finish.
    async fn finish(self) -> Stats {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        self.stats()
    }
}

async fn rollout_status(env: &Env, ns: &str) -> common::Out {
    env.kubectl(
        &["rollout", "status", "-n", ns, "deployment/podinfo", "--timeout=180s"],
        None,
    )
    .await
}

/// At rest: only D's pods of `revision`, no candidate, the route on the host, no backends left (no
/// subsets; no per-version Services).
async fn assert_at_rest(env: &Env, ns: &str, revision: &str) {
    assert_at_rest_within(env, ns, revision, Duration::from_secs(30)).await;
}

/// As [`assert_at_rest`], for a release whose drain window is longer than usual (the rest comes two
/// drains after the last route change: the candidate's, then the backends').
async fn assert_at_rest_within(env: &Env, ns: &str, revision: &str, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let Err(why) = at_rest(env, ns, revision).await else {
            return;
        };
        assert!(
            std::time::Instant::now() < deadline,
            "{ns}: not at rest after {within:?}: {why}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn at_rest(env: &Env, ns: &str, revision: &str) -> Result<(), String> {
    let pods = env.pods(ns).await;
    if !pods.iter().all(|(_, r, candidate)| r == revision && !candidate) {
        return Err(format!("pods {pods:?}, expected only v{revision} of podinfo"));
    }
    let deployments = env.get(ns, "deployments").await;
    let names: Vec<&str> = deployments["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    if names != ["podinfo"] {
        return Err(format!("Deployments {names:?}: the candidate is still there"));
    }
    let routing = env.annotation(ns, "turnout.dev/routing").await;
    if routing.as_deref() == Some("none") {
        // No routing objects without a mesh: the pods and Deployments above are all there is.
        return Ok(());
    }
    if routing.as_deref() == Some("gateway-api") {
        let route = env.get(ns, "httproute/podinfo").await;
        let refs = &route["spec"]["rules"][0]["backendRefs"];
        if refs.as_array().map(Vec::len) != Some(1) || refs[0]["name"] != "podinfo" {
            return Err(format!("the HTTPRoute does not route to the plain Service: {refs}"));
        }
        let services = env.get(ns, "services").await;
        let names: Vec<&str> = services["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["metadata"]["name"].as_str().unwrap())
            .collect();
        if names != ["podinfo"] {
            return Err(format!("per-version Services left: {names:?}"));
        }
        return Ok(());
    }
    let vs = env.get(ns, "virtualservice/podinfo").await;
    let route = &vs["spec"]["http"][0]["route"];
    if route.as_array().map(Vec::len) != Some(1) || !route[0]["destination"]["subset"].is_null() {
        return Err(format!("the VirtualService does not route to the host: {route}"));
    }
    let dr = env.get(ns, "destinationrule/podinfo").await;
    if !dr["spec"]["subsets"].is_null() {
        return Err(format!("subsets left: {}", dr["spec"]["subsets"]));
    }
    Ok(())
}

/// A custom check that passes once the canary gets traffic: its request rate.
const CANARY_RPS: &str = r#"check.turnout.dev/canary-rps={"query": "sum(rate(istio_requests_total{reporter=\"destination\",destination_workload_namespace=\"{{ namespace }}\",destination_workload=\"{{ candidate }}\"}[{{ interval }}]))", "min": 0.5}"#;
/// The same query, with a range no canary that gets traffic can meet.
const NO_CANARY_TRAFFIC: &str = r#"check.turnout.dev/no-traffic={"query": "sum(rate(istio_requests_total{reporter=\"destination\",destination_workload_namespace=\"{{ namespace }}\",destination_workload=\"{{ candidate }}\"}[{{ interval }}]))", "max": 0}"#;

/// The annotation that makes a release use Gateway API (both providers are installed).
const GATEWAY_API: &str = "turnout.dev/provider=gateway-api";

async fn healthy_release(env: &Env, ns: &str, annotations: &[&str]) -> Stats {
    let mut annotations = annotations.to_vec();
    annotations.push(CANARY_RPS);
    let load = env.prepare(ns, true, &annotations).await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    let status = rollout_status(env, ns).await;
    assert!(
        status.ok,
        "{ns}: rollout status fails: {}\n{}",
        status.stdout, status.stderr
    );
    env.wait_phase(ns, "Succeeded", Duration::from_secs(60)).await;
    assert_at_rest(env, ns, "2").await;
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{ns}: zero failed requests: {stats:?}");
    assert!(
        stats.versions.get("v2").is_some_and(|n| *n > 0),
        "{ns}: v2 served: {stats:?}"
    );
    let events = env.events(ns).await.join("\n");
    for expected in [
        &format!("Advance {ns}/podinfo canary weight 20"),
        "canary weight 50",
        "Promotion completed",
    ] {
        assert!(events.contains(expected), "{ns}: event {expected:?} in:\n{events}");
    }
    let d = env.get(ns, "deployment/podinfo").await;
    assert!(
        d["metadata"]["annotations"]["turnout.dev/stable-revision"].is_null(),
        "intent cleared"
    );
    stats
}

async fn rolled_back(env: &Env, ns: &str, annotations: &[&str], change: &str, reason: &str) -> Stats {
    // Analysis 3 s after each step (not 2): a candidate's error series must have been scraped twice
    // (every second) before a rate over it exists; one scrape short, a failing candidate reads as
    // 100 % successful and passes its first analysis.
    let mut annotations = annotations.to_vec();
    annotations.insert(0, "turnout.dev/interval=3s");
    let load = env.prepare(ns, true, &annotations).await;
    let stable: Vec<String> = env.pods(ns).await.into_iter().map(|(name, ..)| name).collect();
    env.ok(&["set", "env", "-n", ns, "deployment/podinfo", change]).await;
    let status = rollout_status(env, ns).await;
    assert!(!status.ok, "{ns}: rollout status must fail");
    assert!(
        status.stderr.contains("exceeded its progress deadline"),
        "{ns}: {}",
        status.stderr
    );
    env.wait_phase(ns, "Failed", Duration::from_secs(10)).await;
    let message = env.annotation(ns, "turnout.dev/message").await.unwrap_or_default();
    assert!(message.contains(reason), "{ns}: message {message:?} names {reason:?}");
    let d = env.get(ns, "deployment/podinfo").await;
    let conditions = d["status"]["conditions"].as_array().unwrap();
    let progressing = conditions.iter().find(|c| c["type"] == "Progressing").unwrap();
    assert_eq!(progressing["reason"], "ProgressDeadlineExceeded");
    assert!(
        progressing["message"]
            .as_str()
            .unwrap()
            .starts_with("turnout: release v2 rolled back")
    );
    assert_eq!(d["spec"]["paused"], true, "{ns}: stays paused on the failed template");
    assert_at_rest(env, ns, "1").await;
    let now: Vec<String> = env.pods(ns).await.into_iter().map(|(name, ..)| name).collect();
    assert_eq!(now, stable, "{ns}: the stable pods were never touched");
    let stats = load.finish().await;
    let events = env.events(ns).await.join("\n");
    assert!(events.contains("Rolling back"), "{ns}: {events}");
    assert!(
        !events.contains("canary weight 50"),
        "{ns}: never went past the first step: {events}"
    );
    // The canary carried its share of the requests (20 %; without a mesh its one pod of three) for
    // at most two intervals, and half of its answers fail: only those could.
    let no_mesh = env.annotation(ns, "turnout.dev/routing").await.as_deref() == Some("none");
    let total = stats.ok + stats.failed;
    let bound = if no_mesh { total / 6 } else { total / 10 };
    assert!(
        stats.failed < bound,
        "{ns}: failed requests bounded by the canary's share: {stats:?}"
    );
    stats
}

async fn reverted(env: &Env, ns: &str, annotations: &[&str], graceful: bool) -> Stats {
    // Analysis an hour away: a rollback that happens at all happened without one.
    let mut annotations = annotations.to_vec();
    annotations.push("turnout.dev/interval=1h");
    let load = env.prepare_as(ns, true, &annotations, graceful).await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    env.wait_phase(ns, "Progressing", Duration::from_secs(60)).await;
    let out = env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V1]).await;
    assert!(out.stderr.contains("is back to stable v1"), "{ns}: {}", out.stderr);
    env.wait_phase(ns, "RolledBack", Duration::from_secs(30)).await;
    assert_at_rest(env, ns, "1").await;
    let status = rollout_status(env, ns).await;
    assert!(status.ok, "{ns}: {}", status.stderr);
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{ns}: {stats:?}");
    stats
}

async fn superseded(env: &Env, ns: &str, annotations: &[&str], graceful: bool) -> Stats {
    let mut annotations = annotations.to_vec();
    annotations.push("turnout.dev/threshold=zero");
    let load = env.prepare_as(ns, true, &annotations, graceful).await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    env.wait_phase(ns, "Progressing", Duration::from_secs(60)).await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V3]).await;
    let status = rollout_status(env, ns).await;
    assert!(status.ok, "{ns}: {}", status.stderr);
    env.wait_phase(ns, "Succeeded", Duration::from_secs(60)).await;
    assert_eq!(env.annotation(ns, "turnout.dev/release").await.as_deref(), Some("3"));
    assert_at_rest(env, ns, "3").await;
    let events = env.events(ns).await.join("\n");
    assert!(events.contains("release v3 supersedes v2"), "{ns}: {events}");
    assert!(
        events.contains(r#"Warning InvalidConfiguration: ignoring deployment annotation turnout.dev/threshold="zero""#),
        "{ns}: an invalid value is reported: {events}"
    );
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{ns}: {stats:?}");
    stats
}

/// A competing HTTPRoute appears in the middle of a release: the release fails saying so, and is unwound
/// through turnout's own route (the competitor is older-second, ours keeps routing), losing nothing.
async fn competitor_mid_release(env: &Env) -> Stats {
    let ns = "gw-c";
    let load = env.prepare(ns, true, &[GATEWAY_API, "turnout.dev/interval=1h"]).await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    wait_weight(env, ns, "20").await;
    env.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: podinfo-mine\n  namespace: {ns}\nspec:\n  \
         parentRefs: [{{group: '', kind: Service, name: podinfo, port: 9898}}]\n  rules:\n    - backendRefs: [{{name: podinfo, port: 9898}}]\n"
    ))
    .await;
    env.wait_phase(ns, "Failed", Duration::from_secs(30)).await;
    let message = env.annotation(ns, "turnout.dev/message").await.unwrap_or_default();
    assert!(
        message.contains(&format!(
            "HTTPRoute {ns}/podinfo-mine for Service podinfo is not managed by turnout"
        )),
        "{ns}: {message}"
    );
    assert_at_rest(env, ns, "1").await;
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{ns}: unwound through our route: {stats:?}");
    stats
}

/// North-south: the route attached to a Gateway with a hostname. turnout creates it at rest (the Gateway
/// lets in only what a route names), then a release moves the weights on it, under load on the hostname.
async fn north_south(env: &Env) -> Stats {
    let ns = "gw-n";
    env.namespace(ns, true).await;
    env.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: public\n  namespace: {ns}\nspec:\n  \
         gatewayClassName: kubesim\n  listeners: [{{name: http, port: 80, protocol: HTTP}}]\n"
    ))
    .await;
    let service_load = env
        .prepare(
            ns,
            true,
            &[
                GATEWAY_API,
                "turnout.dev/gateway=public",
                "turnout.dev/hostnames=podinfo.example.com",
            ],
        )
        .await;
    let load = Load::start_for(env.mesh(), "podinfo.example.com".into());
    eventually(
        Duration::from_secs(30),
        "gw-n: answers on podinfo.example.com through the Gateway",
        || async { (load.stats().ok > 20).then_some(()) },
    )
    .await;
    // East-west requests (to the Service itself) are not this route's: no load on them through the release.
    service_load.finish().await;
    let route = env.get(ns, "httproute/podinfo").await;
    assert_eq!(route["spec"]["parentRefs"][0]["kind"], "Gateway", "{route}");
    assert_eq!(route["spec"]["hostnames"][0], "podinfo.example.com", "{route}");
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    let status = rollout_status(env, ns).await;
    assert!(status.ok, "{ns}: {}", status.stderr);
    env.wait_phase(ns, "Succeeded", Duration::from_secs(60)).await;
    assert_at_rest(env, ns, "2").await;
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{ns}: {stats:?}");
    assert!(stats.versions.get("v2").is_some_and(|n| *n > 0), "{ns}: {stats:?}");
    stats
}

/// The Grafana dashboard shipped in deploy/grafana: every panel's and annotation's PromQL, with the
/// dashboard's variables set to a release in flight, returns data from the real Prometheus (the mesh's
/// Istio metrics and turnout's own), and the requests panel shows both versions.
async fn dashboard(env: &Env) {
    let ns = "grafana";
    let load = env
        .prepare(ns, true, &["turnout.dev/interval=1h", "turnout.dev/steps=50,100"])
        .await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    wait_weight(env, ns, "50").await;
    let path = format!("{}/deploy/grafana/turnout-releases.json", env!("CARGO_MANIFEST_DIR"));
    let board: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries: Vec<(String, String)> = board["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap().to_owned();
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap().to_owned()))
        })
        .collect();
    for a in board["annotations"]["list"].as_array().unwrap() {
        queries.push((
            a["name"].as_str().unwrap().to_owned(),
            a["expr"].as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(queries.len(), 6, "{queries:?}");
    for (title, expr) in &queries {
        let expr = expr
            .replace("$namespace", ns)
            .replace("$deployment", "podinfo")
            .replace("$__rate_interval", "1m");
        let url = format!(
            "{}/api/v1/query?query={}",
            env.prometheus_url,
            turnout::agent::analysis::encode(&expr)
        );
        // The requests panel must show both versions: the stable pods and the candidate.
        let versions = title.starts_with("Requests per second");
        eventually(
            Duration::from_secs(60),
            &format!("dashboard panel {title:?}: {expr}"),
            || async {
                let (status, body) = http_get(&url).await?;
                let answer: Value = serde_json::from_str(&body).ok()?;
                let result = answer["data"]["result"].as_array()?.clone();
                let workloads: std::collections::BTreeSet<&str> = result
                    .iter()
                    .filter_map(|s| s["metric"]["destination_workload"].as_str())
                    .collect();
                let both = workloads.contains("podinfo") && workloads.contains("podinfo-v2");
                (status == 200 && !result.is_empty() && (both || !versions)).then_some(())
            },
        )
        .await;
    }
    load.finish().await;
}

/// An HTTPRoute turnout does not manage, attached to the same Service: left untouched, the release
/// fails saying why.
async fn foreign_route(env: &Env) {
    let ns = "gw-g";
    let load = env.prepare(ns, true, &[GATEWAY_API]).await;
    env.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: podinfo-mine\n  namespace: {ns}\nspec:\n  \
         parentRefs: [{{group: '', kind: Service, name: podinfo, port: 9898}}]\n  rules:\n    - backendRefs: [{{name: podinfo, port: 9898}}]\n"
    ))
    .await;
    let before = env.get(ns, "httproute/podinfo-mine").await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    let status = rollout_status(env, ns).await;
    assert!(!status.ok, "{ns}: rollout status must fail");
    let message = env.annotation(ns, "turnout.dev/message").await.unwrap_or_default();
    assert!(
        message.contains(&format!(
            "HTTPRoute {ns}/podinfo-mine for Service podinfo is not managed by turnout"
        )),
        "{ns}: {message}"
    );
    let after = env.get(ns, "httproute/podinfo-mine").await;
    assert_eq!(after["spec"], before["spec"], "{ns}: the HTTPRoute is untouched");
    assert_eq!(after["metadata"]["labels"], before["metadata"]["labels"]);
    assert!(
        env.pods(ns).await.iter().all(|(_, r, c)| r == "1" && !c),
        "{ns}: no candidate"
    );
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{ns}: {stats:?}");
}

/// A VirtualService turnout does not manage: left untouched, the release fails saying why.
async fn foreign(env: &Env) {
    let ns = "g";
    let load = env.prepare(ns, true, &[]).await;
    env.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: podinfo\n  namespace: {ns}\nspec:\n  \
         hosts: [podinfo.{ns}.svc.cluster.local]\n  http:\n    - route:\n        - destination:\n            host: podinfo.{ns}.svc.cluster.local\n"
    ))
    .await;
    let before = env.get(ns, "virtualservice/podinfo").await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    let status = rollout_status(env, ns).await;
    assert!(!status.ok, "g: rollout status must fail");
    let message = env.annotation(ns, "turnout.dev/message").await.unwrap_or_default();
    assert!(
        message.contains(&format!(
            "VirtualService {ns}/podinfo for Service podinfo is not managed by turnout"
        )),
        "g: {message}"
    );
    let after = env.get(ns, "virtualservice/podinfo").await;
    assert_eq!(
        after["metadata"], before["metadata"],
        "g: the VirtualService is untouched"
    );
    assert_eq!(after["spec"], before["spec"]);
    assert!(
        env.pods(ns).await.iter().all(|(_, r, c)| r == "1" && !c),
        "g: no candidate"
    );
    let events = env.events(ns).await.join("\n");
    assert!(events.contains("not managed by turnout"), "g: {events}");
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "g: {stats:?}");
}

async fn native(env: &Env) -> Stats {
    let ns = "f";
    let load = env.prepare(ns, false, &[]).await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    let status = rollout_status(env, ns).await;
    assert!(status.ok, "f: {}", status.stderr);
    // Let the proxies catch up before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.finish().await
}

/// `turnout <args>`, expecting exit code `code`.
async fn turnout(env: &Env, code: i32, args: &[&str]) -> common::Out {
    let out = env.turnout(args).await;
    assert_eq!(
        out.code, code,
        "turnout {args:?}: exit code {} (expected {code}):\n{}\n{}",
        out.code, out.stdout, out.stderr
    );
    out
}

async fn wait_weight(env: &Env, ns: &str, weight: &str) {
    eventually(
        Duration::from_secs(60),
        &format!("{ns}: canary weight {weight}"),
        || async {
            let phase = env.annotation(ns, "turnout.dev/phase").await;
            let at = env.annotation(ns, "turnout.dev/weight").await;
            (phase.as_deref() == Some("Progressing") && at.as_deref() == Some(weight)).then_some(())
        },
    )
    .await;
}

/// A person steering releases with `turnout pause|resume|promote|abort|retry`, under load.
async fn requests(env: &Env) -> Stats {
    let ns = "r";
    // No analysis for an hour: whatever moves a release on here is a request.
    let load = env
        .prepare(ns, true, &["turnout.dev/interval=1h", "turnout.dev/steps=10,50,100"])
        .await;
    let none = turnout(env, 4, &["pause", "podinfo", "-n", ns]).await;
    assert!(
        none.stderr.contains("r/podinfo has no release in flight"),
        "{}",
        none.stderr
    );
    turnout(env, 3, &["abort", "nosuch", "-n", ns]).await;

    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    wait_weight(env, ns, "10").await;
    let paused = turnout(env, 0, &["pause", "podinfo", "-n", ns, "--wait"]).await;
    assert_eq!(
        paused.stdout,
        "requested: pause release v2 of r/podinfo\ndone: paused on request at canary weight 10\n"
    );
    let status = turnout(env, 0, &["status", "podinfo", "-n", ns]).await;
    assert!(status.stdout.contains("Progressing (paused)"), "{}", status.stdout);
    let again = turnout(env, 4, &["pause", "podinfo", "-n", ns]).await;
    assert!(
        again.stderr.contains("release v2 of r/podinfo is already paused"),
        "{}",
        again.stderr
    );
    turnout(env, 0, &["resume", "podinfo", "-n", ns, "--wait"]).await;
    let promoted = turnout(env, 0, &["promote", "podinfo", "-n", ns, "--wait"]).await;
    assert!(
        promoted.stdout.contains("done: release v2 promoted on request"),
        "{}",
        promoted.stdout
    );
    let status = rollout_status(env, ns).await;
    assert!(status.ok, "r: {}", status.stderr);
    env.wait_phase(ns, "Succeeded", Duration::from_secs(60)).await;
    assert_at_rest(env, ns, "2").await;

    // The next release is aborted (kubectl rollout status fails), retried, and promoted.
    env.ok(&["set", "env", "-n", ns, "deployment/podinfo", "ATTEMPT=1"])
        .await;
    wait_weight(env, ns, "10").await;
    let aborted = turnout(env, 0, &["abort", "podinfo", "-n", ns, "--wait"]).await;
    assert!(
        aborted
            .stdout
            .contains("done: release v3 rolled back: aborted on request"),
        "{}",
        aborted.stdout
    );
    let status = rollout_status(env, ns).await;
    assert!(
        !status.ok && status.stderr.contains("exceeded its progress deadline"),
        "r: {}",
        status.stderr
    );
    assert_at_rest(env, ns, "2").await;
    let late = turnout(env, 4, &["abort", "podinfo", "-n", ns]).await;
    assert!(
        late.stderr.contains("release v3 of r/podinfo has ended: Failed"),
        "{}",
        late.stderr
    );
    turnout(env, 0, &["retry", "podinfo", "-n", ns, "--wait"]).await;
    wait_weight(env, ns, "10").await;
    turnout(env, 0, &["promote", "podinfo", "-n", ns, "--wait"]).await;
    let status = rollout_status(env, ns).await;
    assert!(status.ok, "r: the retried release is followed again: {}", status.stderr);
    env.wait_phase(ns, "Succeeded", Duration::from_secs(60)).await;
    assert_at_rest(env, ns, "3").await;

    let events = env.events(ns).await.join("\n");
    for expected in [
        "Paused",
        "Resumed",
        "Retrying",
        "aborted on request",
        "promoted on request",
    ] {
        assert!(events.contains(expected), "r: event {expected:?} in:\n{events}");
    }
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "r: {stats:?}");
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_end_to_end() {
    let env = Env::start(true).await;
    let (a, b, c, h, d, e, f, ()) = tokio::join!(
        healthy_release(&env, "a", &[]),
        rolled_back(&env, "b", &[], "KUBESIM_ERROR_RATE=0.5", "success rate"),
        rolled_back(&env, "c", &[], "KUBESIM_LATENCY_MS=400", "P99 latency"),
        rolled_back(&env, "h", &[NO_CANARY_TRAFFIC], "GREETING=hello", "no-traffic "),
        reverted(&env, "d", &[], false),
        superseded(&env, "e", &[], false),
        native(&env),
        foreign(&env),
    );
    let line = |name: &str, s: &Stats| {
        eprintln!(
            "{name}: {} requests, {} failed ({:.2} %), by version {:?}, sample failures {:?}",
            s.ok + s.failed,
            s.failed,
            100.0 * s.failed as f64 / (s.ok + s.failed).max(1) as f64,
            s.versions,
            s.samples
        );
    };
    line("a (turnout, healthy)", &a);
    line("b (turnout, erroring)", &b);
    line("c (turnout, slow)", &c);
    line("h (turnout, custom check failing)", &h);
    line("d (turnout, reverted)", &d);
    line("e (turnout, superseded)", &e);
    line("f (native rolling update)", &f);
}

/// The same releases with the Gateway API provider: an HTTPRoute attached to the Service (GAMMA, as
/// Istio ambient waypoints and Linkerd apply it) and per-version Services, side by side with a
/// native rolling update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_releases_end_to_end() {
    let env = Env::start(true).await;
    let (a, b, d, e, f, (), n, c) = tokio::join!(
        healthy_release(&env, "gw-a", &[GATEWAY_API]),
        rolled_back(&env, "gw-b", &[GATEWAY_API], "KUBESIM_ERROR_RATE=0.5", "success rate"),
        reverted(&env, "gw-d", &[GATEWAY_API], false),
        superseded(&env, "gw-e", &[GATEWAY_API], false),
        native(&env),
        foreign_route(&env),
        north_south(&env),
        competitor_mid_release(&env),
    );
    // The route was written by turnout and accepted by the mesh for its last generation.
    let route = env.get("gw-a", "httproute/podinfo").await;
    assert_eq!(route["metadata"]["labels"]["app.kubernetes.io/managed-by"], "turnout");
    let parents = route["status"]["parents"].as_array().cloned().unwrap_or_default();
    assert!(
        parents.iter().any(|p| p["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Accepted"
                && c["status"] == "True"
                && c["observedGeneration"] == route["metadata"]["generation"])),
        "{route}"
    );
    let events = env.events("gw-a").await.join("\n");
    assert!(events.contains("(routing: gateway-api)"), "gw-a: {events}");
    let status = env.turnout(&["status", "podinfo", "-n", "gw-a"]).await;
    assert!(status.stdout.contains("gateway-api"), "{}", status.stdout);
    for (name, s) in [
        ("gw-a (gateway-api, healthy)", &a),
        ("gw-b (gateway-api, erroring)", &b),
        ("gw-d (gateway-api, reverted)", &d),
        ("gw-e (gateway-api, superseded)", &e),
        ("gw-n (gateway-api on a Gateway, north-south)", &n),
        ("gw-c (gateway-api, a competing route mid-release)", &c),
        ("f (native rolling update)", &f),
    ] {
        eprintln!(
            "{name}: {} requests, {} failed ({:.2} %), by version {:?}, sample failures {:?}",
            s.ok + s.failed,
            s.failed,
            100.0 * s.failed as f64 / (s.ok + s.failed).max(1) as f64,
            s.versions,
            s.samples
        );
    }
}

/// Gateway API chosen, but nothing serves routes attached to the Service (the test bed's mesh told
/// so by a label on the Service, as a cluster whose only Gateway API implementation is a north-south
/// gateway): the route is never accepted, so the release fails before any candidate exists — its pods
/// would have taken traffic straight from the Service — and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_without_an_implementation_for_the_service_creates_no_candidate() {
    let env = Env::start(true).await;
    let ns = "gw-u";
    let load = env.prepare(ns, true, &[GATEWAY_API]).await;
    env.ok(&["label", "-n", ns, "service/podinfo", "kubesim.turnout.dev/gamma=off"])
        .await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    env.wait_phase(ns, "Failed", Duration::from_secs(60)).await;
    let message = env.annotation(ns, "turnout.dev/message").await.unwrap_or_default();
    assert!(
        message.contains(&format!(
            "no Gateway API implementation accepted HTTPRoute {ns}/podinfo"
        )),
        "{ns}: {message}"
    );
    let events = env.events(ns).await.join("\n");
    assert!(
        !events.contains("creating candidate"),
        "{ns}: no candidate was ever created: {events}"
    );
    let status = rollout_status(&env, ns).await;
    assert!(!status.ok, "{ns}: kubectl rollout status reports the failure");
    assert_at_rest(&env, ns, "1").await;
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{ns}: {stats:?}");
    assert_eq!(stats.versions.keys().collect::<Vec<_>>(), ["v1"], "{ns}: {stats:?}");
}

/// A hook receiver: records every call and answers each kind with the status set for it (200 unless
/// told otherwise).
#[derive(Clone, Default)]
struct Hooks {
    calls: Arc<Mutex<Vec<Value>>>,
    answers: Arc<Mutex<BTreeMap<String, u16>>>,
}

impl Hooks {
    async fn start(&self) -> String {
        use hyper::body::Incoming;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        let hooks = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let hooks = hooks.clone();
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let hooks = hooks.clone();
                    async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let call: Value = serde_json::from_slice(&body).unwrap();
                        let kind = call["hook"].as_str().unwrap_or("").to_owned();
                        let status = hooks.answers.lock().unwrap().get(&kind).copied().unwrap_or(200);
                        hooks.calls.lock().unwrap().push(call);
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(http_body_util::Full::new(Bytes::from(format!("{kind}: {status}"))))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        url
    }

    /// The calls of `kind` so far.
    fn of(&self, kind: &str) -> Vec<Value> {
        let calls = self.calls.lock().unwrap();
        calls.iter().filter(|c| c["hook"] == kind).cloned().collect()
    }
}

/// A chat receiver: records each request's path and JSON body; `/broken` answers 500.
#[derive(Clone, Default)]
struct Chat {
    got: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Chat {
    async fn start(&self) -> String {
        use hyper::body::Incoming;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let chat = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let chat = chat.clone();
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let chat = chat.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let status = if path == "/broken" { 500 } else { 200 };
                        chat.got
                            .lock()
                            .unwrap()
                            .push((path, serde_json::from_slice(&body).unwrap_or_default()));
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(http_body_util::Full::new(Bytes::from_static(b"ok")))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        base
    }

    fn at(&self, path: &str) -> Vec<Value> {
        let got = self.got.lock().unwrap();
        got.iter().filter(|(p, _)| p == path).map(|(_, b)| b.clone()).collect()
    }
}

impl Env {
    /// A Secret `chat` of webhook URLs in `ns`, readable by turnout there (the documented RoleBinding),
    /// named by the namespace's `turnout.dev/notify`.
    async fn chat_secret(&self, ns: &str, urls: &[(&str, String)], annotations: &[&str]) {
        let mut args = vec!["create", "secret", "generic", "chat", "-n", ns];
        let literals: Vec<String> = urls.iter().map(|(k, u)| format!("--from-literal={k}={u}")).collect();
        args.extend(literals.iter().map(String::as_str));
        self.ok(&args).await;
        self.ok(&[
            "create",
            "rolebinding",
            "turnout-notify",
            "-n",
            ns,
            "--clusterrole=turnout-notifications",
            "--serviceaccount=turnout-system:turnout",
        ])
        .await;
        let mut args = vec!["annotate", "namespace", ns, "turnout.dev/notify=chat"];
        args.extend_from_slice(annotations);
        self.ok(&args).await;
    }
}

/// Notifications: a release's start and promotion reach Slack, Teams, Discord and a generic webhook,
/// each in its own format; a minimum severity leaves out the good news; a delivery that fails is an
/// Event (without the URL, a credential) and a metric, and the release goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_each_chat_service() {
    let env = Env::start(true).await;
    let chat = Chat::default();
    let base = chat.start().await;
    let released = async {
        let ns = "notify";
        let load = env.prepare(ns, true, &[]).await;
        let urls: Vec<(&str, String)> = ["slack", "teams", "discord", "webhook"]
            .into_iter()
            .map(|k| (k, format!("{base}/{k}")))
            .collect();
        env.chat_secret(ns, &urls, &[]).await;
        env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
        env.wait_phase(ns, "Succeeded", Duration::from_secs(90)).await;
        load.finish().await;
    };
    let quiet = async {
        // Warnings only, and a release that fails: halted and rolled back, never started.
        let ns = "notify-quiet";
        let load = env.prepare(ns, true, &[]).await;
        env.chat_secret(
            ns,
            &[("webhook", format!("{base}/quiet"))],
            &["turnout.dev/notify-severity=warning"],
        )
        .await;
        env.ok(&["set", "env", "-n", ns, "deployment/podinfo", "KUBESIM_ERROR_RATE=0.5"])
            .await;
        env.wait_phase(ns, "Failed", Duration::from_secs(90)).await;
        load.finish().await;
    };
    let broken = async {
        let ns = "notify-broken";
        let load = env.prepare(ns, true, &[]).await;
        env.chat_secret(ns, &[("webhook", format!("{base}/broken"))], &[]).await;
        env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
        env.wait_phase(ns, "Succeeded", Duration::from_secs(90)).await;
        load.finish().await;
    };
    tokio::join!(released, quiet, broken);

    let chat = &chat;
    let kinds = |path: &'static str| async move {
        eventually(
            Duration::from_secs(30),
            "a started and a promoted notification",
            || async {
                let got = chat.at(path);
                (got.len() >= 2).then_some(got)
            },
        )
        .await
    };
    let slack = kinds("/slack").await;
    assert_eq!(slack[0]["blocks"][0]["type"], "header", "{slack:?}");
    assert_eq!(
        slack[0]["blocks"][0]["text"]["text"],
        "Release started: notify/podinfo v2"
    );
    assert_eq!(
        slack[1]["blocks"][0]["text"]["text"],
        "Release promoted: notify/podinfo v2"
    );
    let teams = kinds("/teams").await;
    assert_eq!(
        teams[0]["attachments"][0]["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    assert_eq!(teams[1]["attachments"][0]["content"]["type"], "AdaptiveCard");
    let discord = kinds("/discord").await;
    assert_eq!(discord[1]["embeds"][0]["title"], "Release promoted: notify/podinfo v2");
    let webhook = kinds("/webhook").await;
    let seen: Vec<&str> = webhook.iter().map(|b| b["kind"].as_str().unwrap()).collect();
    assert_eq!(seen, ["started", "promoted"]);

    let quiet = eventually(Duration::from_secs(30), "notify-quiet: rolled back", || async {
        let got = chat.at("/quiet");
        got.iter().any(|b| b["kind"] == "rolled-back").then_some(got)
    })
    .await;
    assert!(
        quiet.iter().all(|b| b["severity"] == "warning"),
        "only warnings: {quiet:?}"
    );

    let failed = eventually(Duration::from_secs(30), "a NotificationFailed Event", || async {
        env.events("notify-broken")
            .await
            .into_iter()
            .find(|e| e.starts_with("Warning NotificationFailed"))
    })
    .await;
    assert!(failed.contains("webhook of Secret chat"), "{failed}");
    assert!(failed.contains("answered 500"), "{failed}");
    assert!(!failed.contains(&base), "the URL is a credential: {failed}");
    let metrics = format!("http://{}/metrics", env.admin);
    eventually(Duration::from_secs(10), "turnout_notifications_total fail", || async {
        http_get(&metrics)
            .await
            .filter(|(_, body)| body.contains(r#"turnout_notifications_total{service="webhook",result="fail"}"#))
    })
    .await;
}

/// Hooks configured by annotation: gates before traffic, at each step and before 100 %, and
/// notifications; then a failing gate rolls a release back before any traffic reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_gate_releases_and_are_told_how_they_end() {
    let env = Env::start(true).await;
    let hooks = Hooks::default();
    let url = hooks.start().await;
    let ns = "k";
    let mut annotations: Vec<String> = [
        "pre-rollout",
        "rollout",
        "confirm-promotion",
        "post-rollout",
        "rollback",
    ]
    .iter()
    .map(|kind| format!("hook.turnout.dev/{kind}={url}"))
    .collect();
    annotations.push("turnout.dev/hook-retries=0".into());
    let annotations: Vec<&str> = annotations.iter().map(String::as_str).collect();
    let load = env.prepare(ns, true, &annotations).await;
    env.ok(&["annotate", "namespace", ns, &format!("hook.turnout.dev/event={url}")])
        .await;

    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    let status = rollout_status(&env, ns).await;
    assert!(status.ok, "k: {}", status.stderr);
    env.wait_phase(ns, "Succeeded", Duration::from_secs(60)).await;
    let pre = hooks.of("pre-rollout");
    assert_eq!(pre.len(), 1, "{pre:?}");
    assert_eq!(
        pre[0],
        serde_json::json!({ "hook": "pre-rollout", "name": "podinfo", "namespace": "k", "phase": "Pending",
                            "revision": 2, "weight": 0, "candidate": "podinfo-v2" })
    );
    let weights = |kind: &str| -> Vec<u64> { hooks.of(kind).iter().map(|c| c["weight"].as_u64().unwrap()).collect() };
    assert_eq!(weights("rollout"), [20, 50, 100], "one call per step's analysis");
    assert_eq!(weights("confirm-promotion"), [50], "asked once, before 100 %");
    let post = eventually(Duration::from_secs(10), "the post-rollout hook", || async {
        let post = hooks.of("post-rollout");
        (!post.is_empty()).then_some(post)
    })
    .await;
    assert_eq!(
        (post.len(), &post[0]["phase"], &post[0]["revision"]),
        (1, &"Succeeded".into(), &2.into())
    );
    let told = eventually(
        Duration::from_secs(10),
        "the event hook told of the promotion",
        || async {
            let events = hooks.of("event");
            let reasons: Vec<String> = events
                .iter()
                .map(|e| e["event"]["reason"].as_str().unwrap().to_owned())
                .collect();
            reasons.contains(&"Promoted".to_owned()).then_some(reasons)
        },
    )
    .await;
    assert!(told.starts_with(&["Started".to_owned()]), "{told:?}");
    assert!(told.contains(&"Advance".to_owned()), "{told:?}");
    assert!(hooks.of("rollback").is_empty());

    // The gate says no: two failed checks (threshold 2), rolled back, no request ever reaches v3.
    hooks.answers.lock().unwrap().insert("pre-rollout".into(), 503);
    // And the rollback notification fails: a Warning Event says so.
    hooks.answers.lock().unwrap().insert("rollback".into(), 500);
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V3]).await;
    env.wait_phase(ns, "Failed", Duration::from_secs(60)).await;
    let message = env.annotation(ns, "turnout.dev/message").await.unwrap();
    assert_eq!(
        message,
        format!(
            "release v3 rolled back: 2 failed checks: hook pre-rollout ({url}) answered 503 Service Unavailable: pre-rollout: 503"
        )
    );
    assert_eq!(hooks.of("pre-rollout").len(), 3);
    let rollback = eventually(Duration::from_secs(10), "the rollback hook", || async {
        let calls = hooks.of("rollback");
        (!calls.is_empty()).then_some(calls)
    })
    .await;
    assert_eq!(
        (&rollback[0]["phase"], &rollback[0]["revision"]),
        (&"Failed".into(), &3.into())
    );
    let warned = eventually(Duration::from_secs(10), "a HookFailed Event", || async {
        let events = env.events(ns).await;
        events.into_iter().find(|e| e.starts_with("Warning HookFailed"))
    })
    .await;
    assert_eq!(
        warned,
        format!(
            "Warning HookFailed: k/podinfo: hook rollback ({url}) answered 500 Internal Server Error: rollback: 500"
        )
    );
    assert_at_rest(&env, ns, "2").await;
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "k: {stats:?}");
    assert!(
        !stats.versions.contains_key("v3"),
        "k: the gate kept all traffic off v3: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_steered_by_requests() {
    let env = Env::start(true).await;
    // The dashboard's queries run beside it (the busiest test, releases_end_to_end, has enough load).
    let (stats, ()) = tokio::join!(requests(&env), dashboard(&env));
    eprintln!("r: {stats:?}");
}

/// `turnout.dev/match` of the A/B scenarios: the header a user of plain Istio would match by hand.
const BETA: &str = r#"turnout.dev/match=[{"headers":[{"name":"x-user-group","value":"beta"}]}]"#;

/// An A/B test under load from beta users (the header) and everyone else: during the test each
/// group reaches only its version (checked by the version in every answer), then all traffic moves
/// at once. `failing`: the candidate answers 5xx half the time; it is rolled back and no request of
/// the others fails or reaches it.
async fn a_b_test(env: &Env, ns: &str, provider: &'static str, failing: bool) -> (Stats, Stats) {
    let mut annotations = vec![
        "turnout.dev/strategy=ab",
        BETA,
        "turnout.dev/iterations=3",
        "turnout.dev/interval=3s",
    ];
    if provider == "gateway-api" {
        annotations.push(GATEWAY_API);
    }
    let others = env.prepare(ns, true, &annotations).await;
    let beta = Load::start_with(env.mesh(), format!("podinfo.{ns}"), Some(("x-user-group", "beta")));
    if failing {
        env.ok(&["set", "env", "-n", ns, "deployment/podinfo", "KUBESIM_ERROR_RATE=0.5"])
            .await;
        env.wait_phase(ns, "Failed", Duration::from_secs(60)).await;
        let message = env.annotation(ns, "turnout.dev/message").await.unwrap_or_default();
        assert!(message.contains("success rate"), "{ns}: {message}");
        assert_at_rest(env, ns, "1").await;
        let (others, beta) = (others.finish().await, beta.finish().await);
        assert_eq!(others.failed, 0, "{ns}: no request of the others fails: {others:?}");
        assert_eq!(
            others.versions.keys().collect::<Vec<_>>(),
            ["v1"],
            "{ns}: the others never reach the candidate: {others:?}"
        );
        assert!(
            beta.failed > 0,
            "{ns}: the beta users met the failing candidate: {beta:?}"
        );
        let events = env.events(ns).await.join("\n");
        assert!(events.contains("A/B test of"), "{ns}: {events}");
        return (others, beta);
    }
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    // A window inside the test: from its first passed analysis to its second (the switch to all
    // traffic comes an interval after the last).
    let (others_ref, beta_ref) = (&others, &beta);
    let iteration = |n: u32| async move {
        eventually(Duration::from_secs(60), &format!("{ns}: A/B iteration {n}"), || async {
            let at = env.annotation(ns, "turnout.dev/iteration").await?.parse::<u32>().ok()?;
            (at >= n).then_some(())
        })
        .await;
        (others_ref.stats(), beta_ref.stats())
    };
    let (others_before, beta_before) = iteration(1).await;
    let message = env.annotation(ns, "turnout.dev/message").await.unwrap_or_default();
    assert!(
        message.starts_with("A/B iteration") && message.ends_with("for x-user-group=beta"),
        "{ns}: {message}"
    );
    // The route a user of plain Istio would write by hand: the header match first, then the rest.
    if provider == "istio" {
        let vs = env.get(ns, "virtualservice/podinfo").await;
        assert_eq!(
            vs["spec"]["http"][0]["match"][0]["headers"]["x-user-group"]["exact"], "beta",
            "{vs}"
        );
        assert_eq!(vs["spec"]["http"][0]["route"][0]["destination"]["subset"], "v2-canary");
        assert_eq!(vs["spec"]["http"][1]["route"][0]["destination"]["subset"], "v1");
    } else {
        let route = env.get(ns, "httproute/podinfo").await;
        assert_eq!(
            route["spec"]["rules"][0]["matches"][0]["headers"][0]["value"], "beta",
            "{route}"
        );
        assert_eq!(route["spec"]["rules"][0]["backendRefs"][0]["name"], "podinfo-v2-canary");
    }
    let (others_after, beta_after) = iteration(2).await;
    let (o, b) = (
        others_after.served_since(&others_before),
        beta_after.served_since(&beta_before),
    );
    assert_eq!(
        o.keys().collect::<Vec<_>>(),
        ["v1"],
        "{ns}: the others on the stable version: {o:?}"
    );
    assert_eq!(
        b.keys().collect::<Vec<_>>(),
        ["v2"],
        "{ns}: beta users on the candidate: {b:?}"
    );
    env.wait_phase(ns, "Succeeded", Duration::from_secs(60)).await;
    assert_at_rest(env, ns, "2").await;
    let (others, beta) = (others.finish().await, beta.finish().await);
    for s in [&others, &beta] {
        assert_eq!(s.failed, 0, "{ns}: {s:?}");
    }
    assert!(
        others.versions.get("v2").is_some_and(|n| *n > 0),
        "{ns}: then everyone on v2"
    );
    let events = env.events(ns).await.join("\n");
    for expected in [
        "A/B test of",
        "A/B iteration 1/3 for x-user-group=beta",
        "A/B test passed 3",
    ] {
        assert!(events.contains(expected), "{ns}: {expected:?} in {events}");
    }
    (others, beta)
}

/// Blue/green on readiness alone: the candidate stands at the stable side's full size with no live
/// request (every answer from v1), then all traffic switches in one route change with no request
/// failed, and the stable pods stay at full size through the rollback window. A failing candidate
/// (ready, but answering half its requests with errors) is caught by the analyses after the switch
/// and rolled back within the window: traffic back on the stable pods, which never left.
async fn blue_green(env: &Env, ns: &str, provider: &'static str, failing: bool) -> Stats {
    let mut annotations = vec![
        "turnout.dev/strategy=blue-green",
        "turnout.dev/iterations=3",
        "turnout.dev/interval=3s",
    ];
    annotations.push(if failing {
        "turnout.dev/drain=20s"
    } else {
        "turnout.dev/drain=9s"
    });
    if provider == "gateway-api" {
        annotations.push(GATEWAY_API);
    }
    let mesh = provider != "none";
    if !mesh {
        annotations.push("turnout.dev/provider=none");
    }
    // Without a mesh the hand-off replaces the stable pods while the Service still selects them: they
    // drain as a preStop sleep makes them. A rollback takes the candidate's pods out of the Service
    // before they stop, so the failing release runs with pods that exit at once.
    let load = env.prepare_as(ns, true, &annotations, !mesh && !failing).await;
    if failing {
        env.ok(&["set", "env", "-n", ns, "deployment/podinfo", "KUBESIM_ERROR_RATE=0.5"])
            .await;
    } else {
        env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    }
    let iteration = |n: u32| async move {
        eventually(
            Duration::from_secs(60),
            &format!("{ns}: blue/green iteration {n}"),
            || async {
                let at = env.annotation(ns, "turnout.dev/iteration").await?.parse::<u32>().ok()?;
                let message = env.annotation(ns, "turnout.dev/message").await?;
                (at >= n && message.starts_with("Blue/green iteration")).then_some(message)
            },
        )
        .await
    };
    let message = iteration(1).await;
    assert!(
        message.contains("podinfo-v2 at full size, on its readiness alone"),
        "{ns}: {message}"
    );
    let before = load.stats();
    assert_eq!(
        env.annotation(ns, "turnout.dev/release-strategy").await.as_deref(),
        Some("blue-green")
    );
    if !failing {
        // Changed under the release: the release keeps its strategy (the next one takes the new one).
        env.ok(&[
            "annotate",
            "--overwrite",
            "-n",
            ns,
            "deployment/podinfo",
            "turnout.dev/strategy=canary",
        ])
        .await;
    }
    // The candidate at the stable side's full size, before any request reaches it.
    let candidate = env.get(ns, "deployment/podinfo-v2").await;
    assert_eq!(candidate["spec"]["replicas"], 2, "{ns}: full size: {candidate}");
    assert_eq!(candidate["status"]["readyReplicas"], 2, "{ns}: {candidate}");
    if !mesh {
        // Out of the Service: its pods lack the label the Service selects, which is recorded.
        let withheld = &candidate["metadata"]["annotations"]["turnout.dev/withheld-labels"];
        assert_eq!(withheld, r#"{"app":"podinfo"}"#, "{ns}: {candidate}");
        let pods = env.get(ns, "pods").await;
        let held: Vec<&Value> = pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["labels"]["turnout.dev/track"] == "candidate")
            .collect();
        assert_eq!(held.len(), 2, "{ns}: {pods}");
        assert!(
            held.iter().all(|p| p["metadata"]["labels"]["app"].is_null()),
            "{ns}: {held:?}"
        );
    }
    iteration(2).await;
    let during = load.stats();
    assert_eq!(during.failed, 0, "{ns}: no request fails on standby: {during:?}");
    let served = during.served_since(&before);
    assert_eq!(
        served.keys().collect::<Vec<_>>(),
        ["v1"],
        "{ns}: every answer from the stable version on standby: {served:?}"
    );
    // Switched: the stable side keeps its pods for the rollback window.
    let switched = eventually(Duration::from_secs(30), &format!("{ns}: switched"), || async {
        let message = env.annotation(ns, "turnout.dev/message").await?;
        message.starts_with(switched_prefix(mesh)).then_some(message)
    })
    .await;
    if !mesh {
        assert!(
            switched.contains("all of podinfo-v2's pods joined the Service beside v1's"),
            "{ns}: {switched}"
        );
        // Every pod of the candidate is in the Service, and its answers come.
        let pods = env.get(ns, "pods").await;
        let joined = pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["labels"]["turnout.dev/track"] == "candidate")
            .filter(|p| p["metadata"]["labels"]["app"] == "podinfo")
            .count();
        assert_eq!(joined, 2, "{ns}: {pods}");
        let at_switch = load.stats();
        eventually(
            Duration::from_secs(20),
            &format!("{ns}: the candidate answers"),
            || async { load.stats().served_since(&at_switch).contains_key("v2").then_some(()) },
        )
        .await;
    }
    assert!(
        switched.contains("stays at full size for a rollback"),
        "{ns}: {switched}"
    );
    let stable = env.get(ns, "deployment/podinfo").await;
    assert_eq!(
        stable["status"]["readyReplicas"], 2,
        "{ns}: the stable pods stay: {stable}"
    );
    if failing {
        env.wait_phase(ns, "Failed", Duration::from_secs(60)).await;
        let message = env.annotation(ns, "turnout.dev/message").await.unwrap_or_default();
        assert!(message.contains("success rate"), "{ns}: {message}");
        assert_at_rest_within(env, ns, "1", Duration::from_secs(75)).await;
        // Back on the stable pods: no request fails any more.
        let back = load.stats();
        eventually(
            Duration::from_secs(20),
            &format!("{ns}: load after the rollback"),
            || async { (load.stats().ok >= back.ok + RATE).then_some(()) },
        )
        .await;
        let after = load.stats();
        assert_eq!(
            after.failed, back.failed,
            "{ns}: failures stop with the rollback: {after:?}"
        );
        assert!(after.failed > 0, "{ns}: the fault showed on live traffic: {after:?}");
        // The candidate's own errors, not requests sent to pods that were going (its pods left the
        // Service before they stopped, with a mesh or without).
        assert_eq!(after.lost, 0, "{ns}: {after:?}");
    } else {
        env.wait_phase(ns, "Succeeded", Duration::from_secs(90)).await;
        assert_at_rest(env, ns, "2").await;
    }
    let events = env.events(ns).await.join("\n");
    for expected in ["Blue/green of", "blue/green iteration 3/3", switched_prefix(mesh)] {
        assert!(events.contains(expected), "{ns}: {expected:?} in {events}");
    }
    // One step: no canary weight in between.
    assert!(!events.contains("canary weight"), "{ns}: {events}");
    let stats = load.finish().await;
    if !failing {
        assert_eq!(stats.failed, 0, "{ns}: {stats:?}");
        assert!(stats.versions.get("v2").is_some_and(|n| *n > 0), "{ns}: {stats:?}");
    }
    stats
}

/// How the switch's status and Event begin: all traffic with a router; without a mesh the candidate's
/// pods join the stable ones in the Service.
fn switched_prefix(mesh: bool) -> &'static str {
    if mesh {
        "Switched all traffic (blue/green)"
    } else {
        "Switched (blue/green)"
    }
}

/// Blue/green on Istio, on Gateway API and without a mesh, a healthy and a failing release on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_switches_in_one_step_and_rolls_back_within_its_window() {
    let env = Env::start(true).await;
    let (i, g, n) = tokio::join!(
        blue_green(&env, "bg-i", "istio", false),
        blue_green(&env, "bg-g", "gateway-api", true),
        blue_green(&env, "bg-n", "none", false)
    );
    let (gi, ig, nf) = tokio::join!(
        blue_green(&env, "bg-h", "gateway-api", false),
        blue_green(&env, "bg-j", "istio", true),
        blue_green(&env, "bg-m", "none", true)
    );
    for (name, stats) in [
        ("bg-i (istio)", i),
        ("bg-g (gateway-api, failing)", g),
        ("bg-n (none)", n),
        ("bg-h (gateway-api)", gi),
        ("bg-j (istio, failing)", ig),
        ("bg-m (none, failing)", nf),
    ] {
        eprintln!("{name}: {stats:?}");
    }
}

/// A canary that first mirrors half of the requests to the candidate: while it mirrors every answer
/// comes from the stable version and the candidate's metrics fill (from the copies alone: its
/// analyses pass on them); then the steps.
async fn mirrored_release(env: &Env, ns: &str, provider: &'static str) -> Stats {
    let mut annotations = vec![
        "turnout.dev/mirror=50",
        "turnout.dev/iterations=3",
        "turnout.dev/interval=3s",
        "turnout.dev/steps=50,100",
    ];
    if provider == "gateway-api" {
        annotations.push(GATEWAY_API);
    }
    let load = env.prepare(ns, true, &annotations).await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    let iteration = |n: u32| async move {
        eventually(
            Duration::from_secs(60),
            &format!("{ns}: mirroring iteration {n}"),
            || async {
                let at = env.annotation(ns, "turnout.dev/iteration").await?.parse::<u32>().ok()?;
                (at >= n).then_some(())
            },
        )
        .await;
    };
    iteration(1).await;
    let before = load.stats();
    let message = env.annotation(ns, "turnout.dev/message").await.unwrap_or_default();
    assert!(message.starts_with("Mirroring 50 % to podinfo-v2"), "{ns}: {message}");
    // The candidate serves copies only: counted at the destination, by the copies alone.
    eventually(
        Duration::from_secs(30),
        &format!("{ns}: the candidate's metrics fill"),
        || async { (candidate_requests(env, ns).await? > 0.0).then_some(()) },
    )
    .await;
    iteration(2).await;
    let served = load.stats().served_since(&before);
    assert_eq!(
        served.keys().collect::<Vec<_>>(),
        ["v1"],
        "{ns}: answers while mirroring: {served:?}"
    );
    env.wait_phase(ns, "Succeeded", Duration::from_secs(60)).await;
    assert_at_rest(env, ns, "2").await;
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{ns}: {stats:?}");
    let events = env.events(ns).await.join("\n");
    for expected in [
        "Mirroring 50 % of",
        "mirroring to podinfo-v2, iteration 3/3",
        "canary weight 50",
    ] {
        assert!(events.contains(expected), "{ns}: {expected:?} in {events}");
    }
    stats
}

/// Users who keep the cookies they are given, each sending a request every 250 ms: the versions
/// that answered each of them, in order, and the requests that failed.
struct Users {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Vec<String>>>>,
    failed: Arc<Mutex<u64>>,
}

impl Users {
    fn start(mesh: SocketAddr, host: String, count: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(vec![Vec::new(); count]));
        let failed = Arc::new(Mutex::new(0));
        for user in 0..count {
            let (stop, seen, failed, host) = (stop.clone(), seen.clone(), failed.clone(), host.clone());
            tokio::spawn(async move {
                let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<Empty<Bytes>>();
                let mut jar: BTreeMap<String, String> = BTreeMap::new();
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let mut request = http::Request::get(format!("http://{mesh}/")).header("host", &host);
                    if !jar.is_empty() {
                        let cookies: Vec<String> = jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        request = request.header("cookie", cookies.join("; "));
                    }
                    let answer = tokio::time::timeout(Duration::from_secs(5), async {
                        let response = client
                            .request(request.body(Empty::new()).unwrap())
                            .await
                            .map_err(|e| e.to_string())?;
                        let status = response.status();
                        let cookies: Vec<String> = response
                            .headers()
                            .get_all("set-cookie")
                            .iter()
                            .filter_map(|v| v.to_str().ok().map(str::to_owned))
                            .collect();
                        let body = response
                            .into_body()
                            .collect()
                            .await
                            .map_err(|e| e.to_string())?
                            .to_bytes();
                        Ok::<_, String>((status, cookies, body))
                    })
                    .await;
                    match answer {
                        Ok(Ok((status, cookies, body))) if status.is_success() => {
                            for c in cookies {
                                if let Some((k, v)) = c.split(';').next().and_then(|p| p.split_once('=')) {
                                    jar.insert(k.trim().to_owned(), v.trim().to_owned());
                                }
                            }
                            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                            seen.lock().unwrap()[user].push(v["version"].as_str().unwrap_or("?").to_owned());
                        }
                        _ => *failed.lock().unwrap() += 1,
                    }
                }
            });
        }
        Self { stop, seen, failed }
    }

    async fn finish(self) -> (Vec<Vec<String>>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let seen = self.seen.lock().unwrap().clone();
        let failed = *self.failed.lock().unwrap();
        (seen, failed)
    }
}

/// A sticky canary: users who reached the candidate stay on it through the steps (checked by the
/// version of every answer each user got), while the weights still move the others.
async fn sticky_release(env: &Env, ns: &str, provider: &'static str) -> (Vec<Vec<String>>, u64) {
    let mut annotations = vec![
        "turnout.dev/session-affinity=turnout-canary",
        "turnout.dev/steps=20,60,100",
        "turnout.dev/interval=4s",
    ];
    if provider == "gateway-api" {
        annotations.push(GATEWAY_API);
    }
    let load = env.prepare(ns, true, &annotations).await;
    let users = Users::start(env.mesh(), format!("podinfo.{ns}"), 10);
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    env.wait_phase(ns, "Succeeded", Duration::from_secs(90)).await;
    assert_at_rest(env, ns, "2").await;
    let (seen, failed) = users.finish().await;
    let stats = load.finish().await;
    assert_eq!((failed, stats.failed), (0, 0), "{ns}: no request fails");
    for (user, versions) in seen.iter().enumerate() {
        let first_v2 = versions.iter().position(|v| v == "v2");
        if let Some(at) = first_v2 {
            assert!(
                versions[at..].iter().all(|v| v == "v2"),
                "{ns}: user {user} went back to v1 after reaching v2: {versions:?}"
            );
        }
    }
    // The weights still moved users over: some reached v2 while others were still on v1.
    let switched = seen
        .iter()
        .filter(|v| v.first().map(String::as_str) == Some("v1") && v.last().map(String::as_str) == Some("v2"))
        .count();
    assert!(switched > 0, "{ns}: users moved to v2: {seen:?}");
    let events = env.events(ns).await.join("\n");
    assert!(
        events.contains("sticky: whoever reaches it keeps cookie turnout-canary"),
        "{ns}: {events}"
    );
    (seen, failed)
}

/// Sticky canaries on Istio and on Gateway API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_canary_keeps_each_user_on_the_version_they_reached() {
    let env = Env::start(true).await;
    let ((i, _), (g, _)) = tokio::join!(
        sticky_release(&env, "sticky-i", "istio"),
        sticky_release(&env, "sticky-g", "gateway-api")
    );
    let first_v2 = |seen: &[Vec<String>]| -> Vec<Option<usize>> {
        seen.iter().map(|v| v.iter().position(|x| x == "v2")).collect()
    };
    eprintln!("sticky-i (istio): first v2 per user {:?}", first_v2(&i));
    eprintln!("sticky-g (gateway-api): first v2 per user {:?}", first_v2(&g));
}

/// Mirroring before any live traffic, on Istio and on Gateway API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_canary_serves_only_the_stable_version_while_copies_fill_the_candidate_s_metrics() {
    let env = Env::start(true).await;
    let (i, g) = tokio::join!(
        mirrored_release(&env, "mirror-i", "istio"),
        mirrored_release(&env, "mirror-g", "gateway-api")
    );
    eprintln!("mirror-i (istio): {i:?}\nmirror-g (gateway-api): {g:?}");
}

/// One request through the mesh to `host` at `path` with `cookie`: the version that answered and the
/// cookie its answer set, if any.
async fn visit(mesh: SocketAddr, host: &str, path: &str, cookie: Option<&str>) -> Option<(String, Option<String>)> {
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut request = http::Request::get(format!("http://{mesh}{path}")).header("host", host);
    if let Some(c) = cookie {
        request = request.header("cookie", c);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(request.body(Empty::new()).unwrap()),
    )
    .await
    .ok()?
    .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let set = response
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned);
    let body = response.into_body().collect().await.ok()?.to_bytes();
    let v: Value = serde_json::from_slice(&body).ok()?;
    Some((v["version"].as_str()?.to_owned(), set))
}

/// An A/B test mixed with affinity and mirroring: a user who came once with `?beta=1` is given the
/// cookie and stays on the candidate without the parameter; every other request is answered by the
/// stable version while copies of half of them reach the candidate (its request count outgrows what
/// the beta user sent).
async fn mixed_a_b_test(env: &Env, ns: &str, provider: &'static str) -> u64 {
    let mut annotations = vec![
        "turnout.dev/strategy=ab",
        r#"turnout.dev/match=[{"queryParams":[{"name":"beta","value":"1"}]}]"#,
        "turnout.dev/session-affinity=turnout-ab",
        "turnout.dev/mirror=50",
        "turnout.dev/iterations=3",
        "turnout.dev/interval=3s",
    ];
    if provider == "gateway-api" {
        annotations.push(GATEWAY_API);
    }
    let load = env.prepare(ns, true, &annotations).await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    eventually(Duration::from_secs(60), &format!("{ns}: A/B iteration 1"), || async {
        let at = env.annotation(ns, "turnout.dev/iteration").await?.parse::<u32>().ok()?;
        (at >= 1).then_some(())
    })
    .await;
    let host = format!("podinfo.{ns}");
    let before = load.stats();
    let (version, cookie) = visit(env.mesh(), &host, "/?beta=1", None)
        .await
        .expect("the beta visit answers");
    assert_eq!(version, "v2", "{ns}: ?beta=1 goes to the candidate");
    let cookie = cookie.expect("the candidate's answer sets the cookie");
    assert_eq!(cookie, "turnout-ab=v2-canary", "{ns}");
    let mut sent: u32 = 1;
    for _ in 0..20 {
        let (version, _) = visit(env.mesh(), &host, "/", Some(&cookie)).await.expect("answers");
        assert_eq!(version, "v2", "{ns}: the cookie keeps the user on the candidate");
        sent += 1;
    }
    let (version, _) = visit(env.mesh(), &host, "/", None).await.expect("answers");
    assert_eq!(
        version, "v1",
        "{ns}: without the cookie or the parameter: the stable version"
    );
    let others = load.stats().served_since(&before);
    assert_eq!(
        others.keys().collect::<Vec<_>>(),
        ["v1"],
        "{ns}: the others on the stable version: {others:?}"
    );
    // The copies: the candidate counted more requests than the beta user sent.
    eventually(
        Duration::from_secs(30),
        &format!("{ns}: copies reach the candidate"),
        || async { (candidate_requests(env, ns).await? > f64::from(sent) + 20.0).then_some(()) },
    )
    .await;
    env.wait_phase(ns, "Succeeded", Duration::from_secs(60)).await;
    assert_at_rest(env, ns, "2").await;
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{ns}: {stats:?}");
    let events = env.events(ns).await.join("\n");
    for expected in [
        "and copies of 50 % of them",
        "sticky: whoever reaches it keeps cookie turnout-ab",
    ] {
        assert!(events.contains(expected), "{ns}: {expected:?} in {events}");
    }
    u64::from(sent)
}

/// A/B tests mixed with affinity and mirroring, on Istio and on Gateway API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_a_b_test_keeps_its_users_by_cookie_and_mirrors_the_others() {
    let env = Env::start(true).await;
    let (i, g) = tokio::join!(
        mixed_a_b_test(&env, "abm-i", "istio"),
        mixed_a_b_test(&env, "abm-g", "gateway-api")
    );
    eprintln!("abm-i (istio): {i} beta requests; abm-g (gateway-api): {g}");
}

/// A/B tests on Istio and on Gateway API, a healthy and a failing one on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_b_tests_send_only_the_matching_requests_to_the_candidate() {
    let env = Env::start(true).await;
    let (i, g) = tokio::join!(
        a_b_test(&env, "ab-i", "istio", false),
        a_b_test(&env, "ab-g", "gateway-api", true)
    );
    let (gi, ig) = tokio::join!(
        a_b_test(&env, "ab-h", "gateway-api", false),
        a_b_test(&env, "ab-j", "istio", true)
    );
    for (name, (others, beta)) in [
        ("ab-i (istio)", i),
        ("ab-g (gateway-api, failing)", g),
        ("ab-h (gateway-api)", gi),
        ("ab-j (istio, failing)", ig),
    ] {
        eprintln!("{name}: others {others:?}; beta {beta:?}");
    }
}

/// The release page in a real browser (Debian's chromium driven by Playwright): it shows a release in
/// flight, follows its weights as they move without a reload, charts requests of both versions from
/// Prometheus and shows the analysis values. The screenshots are kept in target/artifacts/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_page_follows_a_release_in_a_browser() {
    let root = env!("CARGO_MANIFEST_DIR");
    let setup = std::process::Command::new(format!("{root}/hack/browser/setup.sh"))
        .status()
        .expect("hack/browser/setup.sh runs");
    assert!(setup.success(), "hack/browser/setup.sh: chromium and playwright-core");
    let env = Env::start(true).await;
    let ns = "page";
    // Analysis 8 s after each step: the browser sees each weight for a while.
    let load = env
        .prepare(ns, true, &["turnout.dev/steps=20,60,100", "turnout.dev/interval=8s"])
        .await;
    // Served to loopback peers (as kubectl port-forward arrives), the default.
    let (status, _) = http_get(&format!("http://{}/releases", env.admin)).await.unwrap();
    assert_eq!(status, 200);
    let (status, data) = http_get(&format!("http://{}/releases/data", env.admin)).await.unwrap();
    assert_eq!(status, 200, "{data}");
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../artifacts");
    let browser = tokio::process::Command::new("node")
        .arg(format!("{root}/hack/browser/release-page.mjs"))
        .arg(format!("http://{}/releases", env.admin))
        .arg(format!("{ns}/podinfo"))
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    let seen = tokio::time::timeout(Duration::from_secs(240), browser.wait_with_output())
        .await
        .expect("the browser test ends")
        .unwrap();
    let stdout = String::from_utf8_lossy(&seen.stdout);
    assert!(
        seen.status.success(),
        "the browser test: {stdout}\n{}",
        String::from_utf8_lossy(&seen.stderr)
    );
    let line = |what: &str| -> Value {
        let json = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{what} ")))
            .unwrap_or_else(|| panic!("no {what:?} line in {stdout}"));
        serde_json::from_str(json).unwrap()
    };
    let (first, moved, charted) = (line("seen"), line("moved"), line("charted"));
    // The page showed a step's weight, then another one, both as the release set them.
    let canary = |s: &Value| s["weights"]["v2-canary"].as_u64();
    assert!(matches!(canary(&first), Some(20 | 60 | 100)), "first weights: {first}");
    assert_ne!(
        first["weights"], moved["weights"],
        "the weights moved: {first} then {moved}"
    );
    // Requests of both versions on the chart, and the success rate measured against its bound.
    let versions: Vec<&str> = charted["charted"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert!(
        versions.contains(&"podinfo") && versions.contains(&"podinfo-v2"),
        "charted: {charted}"
    );
    let checks = charted["checks"].as_array().unwrap();
    assert!(
        checks
            .iter()
            .any(|c| c[0] == "success-rate" && c[2] == ">= 99%" && c[3] == "pass"),
        "checks: {charted}"
    );
    assert!(charted["events"].as_u64().unwrap() > 0, "Events shown: {charted}");
    assert_eq!(line("done")["errors"], serde_json::json!([]), "no page errors");
    for shot in ["release-page.png", "release-chart.png"] {
        let png = std::fs::read(out.join(shot)).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 5_000, "{shot} is a picture");
    }
    env.wait_phase(ns, "Succeeded", Duration::from_secs(90)).await;
    // The ended release stays on the page, with its end.
    let (_, data) = http_get(&format!("http://{}/releases/data", env.admin)).await.unwrap();
    let data: Value = serde_json::from_str(&data).unwrap();
    let row = data["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["namespace"] == ns)
        .unwrap_or_else(|| panic!("the ended release is listed: {data}"));
    assert_eq!(row["phase"], "Succeeded");
    assert_eq!(row["in_flight"], false);
    assert!(row["ended"].is_string(), "{row}");
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{stats:?}");
}

/// Without the Istio CRDs the agent keeps running, says so (log, metric), and fails each release with
/// the reason instead of hanging. Then, with the webhook removed, an update that rolls out unheld is
/// reported once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_istio_releases_fail_with_the_reason() {
    let env = Env::start(false).await;
    let metrics = format!("http://{}/metrics", env.admin);
    eventually(Duration::from_secs(10), "turnout_istio_crds_present 0", || async {
        http_get(&metrics)
            .await
            .filter(|(_, body)| body.contains("turnout_istio_crds_present 0"))
    })
    .await;
    // Istio asked for by name: without its CRDs the release fails saying so (with no provider named,
    // it would run without a mesh).
    let ns = "no-istio";
    env.namespace(ns, true).await;
    env.podinfo(ns).await;
    env.ok(&["annotate", "-n", ns, "deployment/podinfo", "turnout.dev/provider=istio"])
        .await;
    env.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: podinfo\n  namespace: {ns}\nspec:\n  selector:\n    app: podinfo\n  \
         ports:\n    - port: 9898\n"
    ))
    .await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    let status = rollout_status(&env, ns).await;
    assert!(!status.ok, "rollout status must fail");
    let message = env.annotation(ns, "turnout.dev/message").await.unwrap_or_default();
    assert!(message.contains("the Istio CRDs"), "{message}");
    assert!(env.turnout.tail(200).contains("are not installed"), "logged");

    // The safety net: with the webhook gone, an update rolls out unheld, and the agent reports it.
    let ns = "bypass";
    env.namespace(ns, true).await;
    env.podinfo(ns).await;
    env.ok(&["rollout", "status", "-n", ns, "deployment/podinfo", "--timeout=60s"])
        .await;
    env.ok(&["delete", "mutatingwebhookconfiguration", "turnout"]).await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    env.unheld_reported(ns).await;
    eventually(Duration::from_secs(10), "turnout_unheld_rollouts_total 1", || async {
        http_get(&metrics)
            .await
            .filter(|(_, body)| body.contains("turnout_unheld_rollouts_total 1"))
    })
    .await;
    env.ok(&["rollout", "status", "-n", ns, "deployment/podinfo", "--timeout=60s"])
        .await;
    assert_eq!(
        env.events(ns)
            .await
            .iter()
            .filter(|e| e.contains("UnheldRollout"))
            .count(),
        1,
        "reported once"
    );
}

/// A release without a mesh under load: the candidate scaled step by step to its share of the
/// Service's pods, the stable side kept at its size, the hand-off as with a mesh. `graceful`: the pods
/// keep serving for 1.5 s after SIGTERM (longer than any proxy takes to drop their endpoints), as a
/// preStop sleep makes them.
async fn no_mesh_release(env: &Env, ns: &str, graceful: bool) -> Stats {
    env.namespace(ns, false).await;
    env.podinfo(ns).await;
    env.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: podinfo\n  namespace: {ns}\nspec:\n  selector:\n    app: podinfo\n  \
         ports:\n    - name: http\n      port: 9898\n      targetPort: 9898\n"
    ))
    .await;
    env.ok(&["scale", "-n", ns, "deployment/podinfo", "--replicas=2"]).await;
    if graceful {
        env.ok(&[
            "set",
            "env",
            "-n",
            ns,
            "deployment/podinfo",
            "KUBESIM_SHUTDOWN_DELAY_MS=1500",
        ])
        .await;
    }
    env.ok(&["rollout", "status", "-n", ns, "deployment/podinfo", "--timeout=60s"])
        .await;
    env.ok(&["annotate", "-n", ns, "deployment/podinfo", CANARY_RPS]).await;
    env.ok(&["label", "namespace", ns, "turnout.dev/rollout=enabled", "--overwrite"])
        .await;
    let load = Load::start(env.mesh(), ns);
    eventually(Duration::from_secs(20), &format!("{ns}: answers"), || async {
        (load.stats().ok > 20).then_some(())
    })
    .await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    // The namespace opted in after podinfo was created: its template was v0, this release is v1.
    let candidate = "deployment/podinfo-v1";
    // At the first step (20 %) the candidate has one pod beside the two stable ones.
    let sizes = eventually(Duration::from_secs(60), &format!("{ns}: the first step"), || async {
        let list = env.get(ns, "deployments").await;
        let c = list["items"]
            .as_array()?
            .iter()
            .find(|d| d["metadata"]["name"] == "podinfo-v1")?
            .clone();
        (c["metadata"]["annotations"]["turnout.dev/weight"] == "20").then(|| c["spec"]["replicas"].clone())
    })
    .await;
    assert_eq!(sizes, 1, "{ns}: one {candidate} pod at 20 %");
    eventually(
        Duration::from_secs(30),
        &format!("{ns}: turnout status shows the step"),
        || async {
            let out = env.turnout(&["status", "podinfo", "-n", ns]).await;
            (out.stdout.contains("none     canary    v0=80,v1-canary=20")).then_some(())
        },
    )
    .await;
    let stable: Vec<String> = env
        .pods(ns)
        .await
        .into_iter()
        .filter(|(_, _, c)| !c)
        .map(|(name, ..)| name)
        .collect();
    assert_eq!(stable.len(), 2, "{ns}: the stable side keeps its size: {stable:?}");
    let status = rollout_status(env, ns).await;
    assert!(status.ok, "{ns}: {}\n{}", status.stdout, status.stderr);
    env.wait_phase(ns, "Succeeded", Duration::from_secs(60)).await;
    assert_at_rest(env, ns, "1").await;
    assert_eq!(env.annotation(ns, "turnout.dev/routing").await.as_deref(), Some("none"));
    let events = env.events(ns).await.join("\n");
    for expected in [
        "(routing: none)",
        &format!("Advance {ns}/podinfo canary weight 20"),
        "Promotion completed",
    ] {
        assert!(events.contains(expected), "{ns}: event {expected:?} in:\n{events}");
    }
    let stats = load.finish().await;
    assert!(
        stats.versions.get("v1").is_some_and(|n| *n > 0),
        "{ns}: the new version served: {stats:?}"
    );
    stats
}

/// Without a mesh (no Istio, no Gateway API): releases move traffic by replica counts, roll back on
/// failed analysis of the candidate's own pods' metrics, and are measured beside native rolling
/// updates, with pods that shut down at once and with graceful ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_mesh_releases_move_traffic_by_replica_counts() {
    let env = Env::start_with(false, true).await;
    // Without a mesh a pod that goes is dropped from the endpoints only as it shuts down: the revert
    // and the supersede, which delete a candidate, run with pods that drain.
    let (graceful, abrupt, d, e, b, f) = tokio::join!(
        no_mesh_release(&env, "nm-a", true),
        no_mesh_release(&env, "nm-c", false),
        reverted(&env, "nm-d", &[], true),
        superseded(&env, "nm-e", &[], true),
        // One pod in three is the candidate's at the first step: one failed check rolls it back.
        rolled_back(
            &env,
            "nm-b",
            &["turnout.dev/threshold=1"],
            "KUBESIM_ERROR_RATE=0.5",
            "success rate"
        ),
        native(&env),
    );
    assert_eq!(graceful.failed, 0, "nm-a: pods that drain lose nothing: {graceful:?}");
    for (name, s) in [
        ("nm-a (no mesh, graceful pods)", &graceful),
        ("nm-c (no mesh, pods exit at once)", &abrupt),
        ("nm-b (no mesh, erroring, rolled back)", &b),
        ("nm-d (no mesh, reverted, graceful pods)", &d),
        ("nm-e (no mesh, superseded, graceful pods)", &e),
        ("f (native rolling update, pods exit at once)", &f),
    ] {
        eprintln!(
            "{name}: {} requests, {} failed ({:.2} %), by version {:?}, sample failures {:?}",
            s.ok + s.failed,
            s.failed,
            100.0 * s.failed as f64 / (s.ok + s.failed).max(1) as f64,
            s.versions,
            s.samples
        );
    }
}

/// The agent killed (SIGKILL) and started again at several points of a release under load: the release
/// carries on from what is in the cluster and completes without a failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_survives_the_agent_being_killed_at_every_phase() {
    let mut env = Env::start(true).await;
    // The Istio release's phases time the kills; the Gateway API and no-mesh releases beside it are
    // hit wherever they are then (a blue/green one without a mesh among them: its candidate's pods out
    // of the Service on standby, in it after the switch).
    let (ns, gw, nm, bg) = ("restarts", "restarts-gw", "restarts-nm", "restarts-bg");
    let (load, gw_load, nm_load, bg_load) = tokio::join!(
        env.prepare(ns, true, &[]),
        env.prepare(gw, true, &[GATEWAY_API]),
        env.prepare_as(nm, true, &["turnout.dev/provider=none"], true),
        env.prepare_as(
            bg,
            true,
            &[
                "turnout.dev/provider=none",
                "turnout.dev/strategy=blue-green",
                "turnout.dev/iterations=2"
            ],
            true
        ),
    );
    for ns in [ns, gw, nm, bg] {
        env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    }
    for phase in ["Pending", "Progressing", "HandingOff", "Finalising"] {
        env.wait_phase(ns, phase, Duration::from_secs(90)).await;
        env.restart().await;
    }
    for ns in [ns, gw, nm, bg] {
        env.wait_phase(ns, "Succeeded", Duration::from_secs(90)).await;
        assert_at_rest(&env, ns, "2").await;
    }
    for (ns, load) in [(ns, load), (gw, gw_load), (nm, nm_load), (bg, bg_load)] {
        let stats = load.finish().await;
        assert_eq!(stats.failed, 0, "{ns}: {stats:?}");
        assert!(stats.versions.get("v2").is_some_and(|n| *n > 0), "{ns}: {stats:?}");
    }
    assert_eq!(env.starts, 5);
}

/// Two agents: only the Lease holder acts; when it is killed in the middle of a release under load,
/// the other takes over within the lease duration and completes it without a failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_follower_takes_over_when_the_leader_is_killed() {
    let mut env = Env::start(true).await;
    let follower = spawn_turnout(&env.cluster, free_port(), free_port(), &env.prometheus_url, 100).await;
    let holder = async |env: &Env| {
        let out = env
            .ok(&[
                "get",
                "lease",
                "-n",
                "turnout-system",
                "turnout-agent",
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ])
            .await;
        out.stdout
    };
    assert_eq!(holder(&env).await, "turnout-1", "the first agent leads");
    let ns = "ha";
    let load = env.prepare(ns, true, &[]).await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    env.wait_phase(ns, "Progressing", Duration::from_secs(60)).await;
    assert!(
        !follower.tail(10_000).contains("release step"),
        "the follower does not act"
    );

    let _ = env.turnout.child.start_kill();
    let _ = env.turnout.child.wait().await;
    env.wait_phase(ns, "Succeeded", Duration::from_secs(90)).await;
    assert_at_rest(&env, ns, "2").await;
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert_eq!(holder(&env).await, "turnout-100");
    let log = follower.tail(10_000);
    assert!(log.contains("taking over the leader Lease"), "{log}");
    assert!(log.contains("release step"), "the new leader completed the release");
}

/// The podinfo sample as a file for `ns` with `image`, and the Service in front of it.
fn manifest(env: &Env, ns: &str, image: &str, file: &str) -> String {
    let sample = std::fs::read_to_string(format!(
        "{}/../shared/fixtures/podinfo/deployment.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let text = sample
        .replace("ghcr.io/stefanprodan/podinfo:6.0.0", image)
        .replace("  name: podinfo\n", &format!("  name: podinfo\n  namespace: {ns}\n"))
        .replace("spec:\n  minReadySeconds", "spec:\n  replicas: 2\n  minReadySeconds");
    let path = env.dir.path().join(file);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// What only a real API server can tell: protobuf requests from kubectl's generators, server-side apply
/// as GitOps tools use it (a release that succeeds, then no drift but turnout's stamps), a dry run that
/// gets the same patch, and a Deployment deleted in the middle of a release leaving nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitops_protobuf_dry_run_and_deletion_on_the_real_api_server() {
    let env = Env::start(true).await;

    // kubectl's generators send protobuf; the webhook still sees JSON and stamps revision 1.
    env.ok(&["create", "namespace", "protobuf"]).await;
    env.ok(&["label", "namespace", "protobuf", "turnout.dev/rollout=enabled"])
        .await;
    eventually(Duration::from_secs(30), "protobuf's default ServiceAccount", || async {
        env.kubectl(&["get", "serviceaccount", "default", "-n", "protobuf"], None)
            .await
            .ok
            .then_some(())
    })
    .await;
    env.ok(&["create", "deployment", "web", "-n", "protobuf", "--image=web:1"])
        .await;
    let web = env.get("protobuf", "deployment/web").await;
    assert_eq!(web["metadata"]["annotations"]["turnout.dev/revision"], "1", "{web}");

    // A dry run gets the patch the update gets.
    let dry = env
        .ok(&[
            "set",
            "image",
            "-n",
            "protobuf",
            "deployment/web",
            "web=web:2",
            "--dry-run=server",
            "-o",
            "json",
        ])
        .await;
    let dry: Value = serde_json::from_str(&dry.stdout).unwrap();
    // The object as the update stored it (the agent may move on from it at once).
    let real = env
        .ok(&[
            "set",
            "image",
            "-n",
            "protobuf",
            "deployment/web",
            "web=web:2",
            "-o",
            "json",
        ])
        .await;
    let real: Value = serde_json::from_str(&real.stdout).unwrap();
    assert_eq!(dry["spec"]["paused"], true, "held in the dry run: {dry}");
    assert_eq!(dry["spec"], real["spec"], "the same patch");
    for key in [
        "turnout.dev/revision",
        "turnout.dev/stable-revision",
        "turnout.dev/stable-hash",
    ] {
        assert_eq!(
            dry["metadata"]["annotations"][key], real["metadata"]["annotations"][key],
            "{key}"
        );
    }

    // Server-side apply, as Flux applies: the first apply, then a new image is a release that succeeds.
    let ns = "gitops";
    env.namespace(ns, true).await;
    let v1 = manifest(&env, ns, "ghcr.io/stefanprodan/podinfo:6.0.0", "podinfo-v1.yaml");
    let v2 = manifest(&env, ns, "ghcr.io/stefanprodan/podinfo:6.1.0", "podinfo-v2.yaml");
    let ssa = ["apply", "--server-side", "--field-manager=flux"];
    env.ok(&[&ssa[..], &["-f", &v1]].concat()).await;
    env.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: podinfo\n  namespace: {ns}\nspec:\n  selector:\n    app: podinfo\n  \
         ports:\n    - name: http\n      port: 9898\n      targetPort: 9898\n"
    ))
    .await;
    env.ok(&["rollout", "status", "-n", ns, "deployment/podinfo", "--timeout=60s"])
        .await;
    let load = Load::start(env.mesh(), ns);
    eventually(Duration::from_secs(20), "answers through the mesh", || async {
        (load.stats().ok > 20).then_some(())
    })
    .await;
    env.ok(&[&ssa[..], &["-f", &v2]].concat()).await;
    let status = rollout_status(&env, ns).await;
    assert!(status.ok, "{}\n{}", status.stdout, status.stderr);
    env.wait_phase(ns, "Succeeded", Duration::from_secs(60)).await;
    assert_at_rest(&env, ns, "2").await;
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert!(stats.versions.get("v2").is_some_and(|n| *n > 0), "{stats:?}");

    // No drift: what Git holds, applied again, changes nothing (the webhook keeps its stamps on the
    // re-apply, dry run included).
    let diff = env
        .kubectl(&["diff", "--server-side", "--field-manager=flux", "-f", &v2], None)
        .await;
    assert_eq!(
        (diff.code, diff.stdout.as_str()),
        (0, ""),
        "kubectl diff --server-side shows drift: {}",
        diff.stderr
    );

    // Deleted in the middle of a release: the candidate, the routing objects and every pod go with it.
    env.ok(&["annotate", "-n", ns, "deployment/podinfo", "turnout.dev/interval=1h"])
        .await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V3]).await;
    env.wait_phase(ns, "Progressing", Duration::from_secs(60)).await;
    env.ok(&["delete", "-n", ns, "deployment/podinfo", "--wait=false"])
        .await;
    eventually(Duration::from_secs(60), "nothing left of podinfo", || async {
        let left = env
            .ok(&[
                "get",
                "-n",
                ns,
                "deployments,replicasets,pods,virtualservices,destinationrules",
                "-l",
                "app=podinfo",
                "-o",
                "name",
            ])
            .await
            .stdout;
        let routing = env
            .ok(&["get", "-n", ns, "virtualservices,destinationrules", "-o", "name"])
            .await
            .stdout;
        (left.trim().is_empty() && routing.trim().is_empty()).then_some(())
    })
    .await;
    // And its metric series.
    let metrics = format!("http://{}/metrics", env.admin);
    eventually(
        Duration::from_secs(10),
        "the deleted Deployment's series dropped",
        || async {
            http_get(&metrics)
                .await
                .filter(|(_, m)| !m.contains(r#"namespace="gitops",deployment="podinfo""#))
                .map(|_| ())
        },
    )
    .await;
}

/// The API server killed and started again in the middle of a release under load (every watch of the
/// agent, the node agent and the mesh cut; etcd keeps the data): the release completes, nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_survives_an_api_server_restart() {
    let env = Env::start(true).await;
    let ns = "apiserver";
    let load = env.prepare(ns, true, &[]).await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    env.wait_phase(ns, "Progressing", Duration::from_secs(60)).await;
    env.restart_apiserver().await;
    env.wait_phase(ns, "Succeeded", Duration::from_secs(120)).await;
    assert_at_rest(&env, ns, "2").await;
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert!(stats.versions.get("v2").is_some_and(|n| *n > 0), "{stats:?}");
}

/// The webhook unreachable in the middle of a release (failurePolicy Ignore): the agent completes the
/// release; an update made while the webhook is down rolls out unheld, and the safety net reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_down_during_a_release() {
    let env = Env::start(true).await;
    let ns = "nowebhook";
    let load = env.prepare(ns, true, &[]).await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    env.wait_phase(ns, "Progressing", Duration::from_secs(60)).await;
    // The registration now points at a port nobody listens on.
    let dead = free_port();
    let patch =
        format!(r#"[{{"op":"replace","path":"/webhooks/0/clientConfig/url","value":"https://{dead}/mutate"}}]"#);
    env.patch_webhook(&patch).await;
    env.wait_phase(ns, "Succeeded", Duration::from_secs(90)).await;
    assert_at_rest(&env, ns, "2").await;
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{stats:?}");

    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V3]).await;
    env.unheld_reported(ns).await;
    env.ok(&["rollout", "status", "-n", ns, "deployment/podinfo", "--timeout=60s"])
        .await;
}

/// The pod template edited while the webhook is down in the middle of a release: the change keeps the
/// release's revision, so the candidate no longer runs what the Deployment holds. The release is rolled
/// back with the reason and the Deployment stays paused (nothing unverified gets traffic); with the
/// webhook back, `turnout retry` releases the new template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_edited_without_the_webhook_during_a_release_is_not_handed_off() {
    let env = Env::start(true).await;
    let ns = "unheld";
    // No analysis for an hour: the release sits at its first step.
    let load = env.prepare(ns, true, &["turnout.dev/interval=1h"]).await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    wait_weight(&env, ns, "20").await;
    let dead = free_port();
    let down = format!(r#"[{{"op":"replace","path":"/webhooks/0/clientConfig/url","value":"https://{dead}/mutate"}}]"#);
    env.patch_webhook(&down).await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V3]).await;

    env.wait_phase(ns, "Failed", Duration::from_secs(60)).await;
    let message = env.annotation(ns, "turnout.dev/message").await.unwrap();
    assert!(
        message.starts_with("release v2 rolled back: the pod template of unheld/podinfo changed during the release without turnout's hold"),
        "{message}"
    );
    let d = env.get(ns, "deployment/podinfo").await;
    assert_eq!(d["spec"]["paused"], true, "stays paused: {}", d["spec"]);
    let image = &d["spec"]["template"]["spec"]["containers"][0]["image"];
    assert_eq!(image, V3.split_once('=').unwrap().1, "on the edited template");
    assert_at_rest(&env, ns, "1").await;

    let up = format!(
        r#"[{{"op":"replace","path":"/webhooks/0/clientConfig/url","value":"https://{}/mutate"}}]"#,
        env.listen
    );
    env.patch_webhook(&up).await;
    env.ok(&["annotate", "-n", ns, "deployment/podinfo", "turnout.dev/interval-"])
        .await;
    turnout(&env, 0, &["retry", "podinfo", "-n", ns]).await;
    env.wait_phase(ns, "Succeeded", Duration::from_secs(90)).await;
    assert_at_rest(&env, ns, "2").await;
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{stats:?}");
    // Released under revision 2 (the edit kept it), now with the edited image.
    assert!(stats.versions.get("v2").is_some_and(|n| *n > 0), "{stats:?}");
    let d = env.get(ns, "deployment/podinfo").await;
    assert_ne!(d["spec"]["paused"], true);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        V3.split_once('=').unwrap().1
    );
    let status = rollout_status(&env, ns).await;
    assert!(status.ok, "{}", status.stderr);
    let events = env.events(ns).await.join("\n");
    assert!(events.contains("Warning RollingBack"), "{events}");
}

/// Undo during a release: the real kubectl refuses `rollout undo` on the paused Deployment; `turnout
/// undo` writes the stable template back, which the webhook takes as a revert, and the release is
/// rolled back with the Deployment resumed on its stable template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_during_a_release_where_kubectl_rollout_undo_is_refused() {
    let env = Env::start(true).await;
    let ns = "undo";
    let load = env.prepare(ns, true, &["turnout.dev/interval=1h"]).await;
    let before = env.get(ns, "deployment/podinfo").await;
    let image = before["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    let held = env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    assert!(
        held.stderr.contains("undo it with: turnout undo podinfo -n undo"),
        "the webhook's warning names the command: {}",
        held.stderr
    );
    wait_weight(&env, ns, "20").await;

    let kubectl = env
        .kubectl(&["rollout", "undo", "-n", ns, "deployment/podinfo"], None)
        .await;
    assert!(
        !kubectl.ok,
        "kubectl rollout undo on a paused Deployment: {}",
        kubectl.stdout
    );
    // The held update made no ReplicaSet (the Deployment is paused), so kubectl finds no revision to go
    // back to; with one, it refuses a paused Deployment.
    assert!(
        kubectl.stderr.contains("no rollout history") || kubectl.stderr.contains("paused"),
        "{}",
        kubectl.stderr
    );

    let undone = turnout(&env, 0, &["undo", "podinfo", "-n", ns, "--wait"]).await;
    assert!(
        undone.stdout.starts_with(
            "undone: undo/podinfo set back to its stable template (v1); release v2 is rolled back\ndone: "
        ),
        "{}",
        undone.stdout
    );
    assert_at_rest(&env, ns, "1").await;
    let d = env.get(ns, "deployment/podinfo").await;
    assert_ne!(d["spec"]["paused"], true, "resumed: {}", d["spec"]);
    assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["image"], image);
    let status = rollout_status(&env, ns).await;
    assert!(status.ok, "{}", status.stderr);
    let again = turnout(&env, 4, &["undo", "podinfo", "-n", ns]).await;
    assert!(again.stderr.contains("has no release to undo"), "{}", again.stderr);

    // After a failed release (aborted here): paused on the failed template, undone the same way.
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V3]).await;
    wait_weight(&env, ns, "20").await;
    turnout(&env, 0, &["abort", "podinfo", "-n", ns, "--wait"]).await;
    let events = env.events(ns).await.join("\n");
    assert!(
        events.contains("podinfo stays paused on v3: `turnout undo podinfo -n undo` sets it back to stable"),
        "the failure Event names the command: {events}"
    );
    turnout(&env, 0, &["undo", "podinfo", "-n", ns, "--wait"]).await;
    assert_at_rest(&env, ns, "1").await;
    let d = env.get(ns, "deployment/podinfo").await;
    assert_ne!(d["spec"]["paused"], true, "resumed: {}", d["spec"]);
    assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["image"], image);
    let stats = load.finish().await;
    assert_eq!(stats.failed, 0, "{stats:?}");
}

/// The namespace's opt-in label removed in the middle of a release: the release is unwound, the
/// Deployment handed back unpaused (its own controller rolls the new template out), nothing of turnout's
/// is left, and the Deployment's metric series are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opting_out_in_the_middle_of_a_release_hands_the_deployment_back() {
    let env = Env::start(true).await;
    let ns = "optout";
    // No analysis for an hour: the release would sit at its first step.
    let load = env.prepare(ns, true, &["turnout.dev/interval=1h"]).await;
    env.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    env.wait_phase(ns, "Progressing", Duration::from_secs(60)).await;
    let metrics = format!("http://{}/metrics", env.admin);
    let series = format!(r#"turnout_release_phase{{namespace="{ns}",deployment="podinfo"}}"#);
    assert!(http_get(&metrics).await.unwrap().1.contains(&series));

    env.ok(&["label", "namespace", ns, "turnout.dev/rollout-"]).await;
    env.wait_phase(ns, "HandedBack", Duration::from_secs(60)).await;
    let d = env.get(ns, "deployment/podinfo").await;
    assert_ne!(d["spec"]["paused"], true, "handed back unpaused: {}", d["spec"]);
    assert!(d["metadata"]["annotations"]["turnout.dev/stable-revision"].is_null());
    let status = rollout_status(&env, ns).await;
    assert!(status.ok, "its own controller rolls v2 out: {}", status.stderr);
    assert_at_rest(&env, ns, "2").await;
    let events = env.events(ns).await.join("\n");
    assert!(events.contains("Warning HandedBack"), "{events}");
    eventually(Duration::from_secs(10), "the series dropped", || async {
        http_get(&metrics)
            .await
            .filter(|(_, m)| !m.contains(&series))
            .map(|_| ())
    })
    .await;
    let stats = load.finish().await;
    eprintln!("optout: {stats:?}");
}
