//! The agent's figures (BENCHMARKS.md): reaction time, cost per reconcile, and memory.
//!
//! `cargo bench --bench agent [-- --deployments 1000 --releases 5 --admissions 200]`
//!
//! The test bed (the real control plane, with the node agent and mesh in this process) has no
//! readiness or propagation delays; `turnout run` runs as a separate
//! process (as its ServiceAccount) with zero propagation, drain and analysis waits, so what is measured is
//! turnout's own reaction, not configured waits. Side by side in the same run, the baseline: the native
//! Deployment controller (the real kube-controller-manager's) reacting to the same update in a namespace that did not opt in.
//!
//! 1. From an update admitted (the held Deployment seen on a watch) to the candidate created, and to the
//!    first weight change on the VirtualService; baseline: update to the new ReplicaSet, natively. The
//!    API requests the agent's ServiceAccount made during the releases, from the API server's audit log.
//! 2. The API server's own timing of admission calls (`apiserver_admission_webhook_admission_duration_seconds`)
//!    for turnout's webhook and, registered the same way in the same run, a no-op webhook: dry-run
//!    updates of the pod template reach both. The agent's reconcile passes: count and mean time.
//! 3. The agent's resident memory idle and with N Deployments in opted-in namespaces.

// A test stops at the first thing that is not as it expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Cluster;
use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;
use turnout::istio::virtual_service::VirtualService;

struct Options {
    deployments: usize,
    releases: usize,
    admissions: usize,
}

fn options() -> Options {
    let mut o = Options {
        deployments: 1000,
        releases: 5,
        admissions: 200,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = || args.get(i + 1).and_then(|v| v.parse().ok());
        match args[i].as_str() {
            "--deployments" => o.deployments = value().expect("--deployments N"),
            "--releases" => o.releases = value().expect("--releases N"),
            "--admissions" => o.admissions = value().expect("--admissions N"),
            _ => {}
        }
        i += 1;
    }
    o
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn deployment(name: &str, image: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": { "containers": [{ "name": "app", "image": image, "ports": [{ "containerPort": 8080 }] }] }
            }
        }
    }))
    .unwrap()
}

async fn metric(admin: &str, name: &str) -> f64 {
    let body = reqwest_lite(&format!("http://{admin}/metrics")).await;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn reqwest_lite(url: &str) -> String {
    use http_body_util::BodyExt as _;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let Ok(response) = client.get(url.parse().unwrap()).await else {
        return String::new();
    };
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    String::from_utf8_lossy(&body).into_owned()
}

/// A webhook that admits everything unchanged, over HTTPS: the baseline of the API server's own
/// measurement of an admission call. Returns its address.
async fn noop_webhook(dir: &std::path::Path) -> (std::net::SocketAddr, String) {
    use http_body_util::BodyExt as _;
    let bundle = turnout::certs::generate(&["127.0.0.1".into()]).unwrap();
    turnout::certs::write(&dir.join("noop-certs"), &bundle, false).unwrap();
    let certs: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls::pki_types::pem::PemObject::pem_slice_iter(bundle.cert_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
    let key = rustls::pki_types::pem::PemObject::from_pem_slice(bundle.key_pem.as_bytes()).unwrap();
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let review: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    let answer = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                        "response": {"uid": review["request"]["uid"], "allowed": true}});
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(answer.to_string()),
                    )))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, bundle.ca_pem)
}

/// (sum, count) of a histogram of the API server's `/metrics` over the series with `label`.
fn histogram(metrics: &str, name: &str, label: &str) -> (f64, f64) {
    let total = |suffix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{name}_{suffix}{{")) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (total("sum"), total("count"))
}

/// Requests in the API server's audit log made by `user`, by verb, from line `from` on.
fn audited(log: &std::path::Path, user: &str, from: usize) -> (usize, std::collections::BTreeMap<String, usize>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut by_verb = std::collections::BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines[from.min(lines.len())..] {
        let event: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        if event["user"]["username"] == user {
            let key = format!(
                "{} {}",
                event["verb"].as_str().unwrap_or("?"),
                event["objectRef"]["resource"].as_str().unwrap_or("?")
            );
            *by_verb.entry(key).or_insert(0) += 1;
        }
    }
    (lines.len(), by_verb)
}

/// Waits until `pred` holds for an object seen by a watch on `api`; returns when it was seen.
async fn seen<K>(api: Api<K>, pred: impl Fn(&K) -> bool) -> Instant
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    while let Some(event) = stream.next().await {
        let hit = match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => pred(&o),
            _ => false,
        };
        if hit {
            return Instant::now();
        }
    }
    panic!("watch ended");
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let o = options();
    common::configure(Duration::ZERO, Duration::ZERO, true);
    let cluster = Cluster::exclusive().await;
    let client = cluster.admin_client().await;

    let dir = cluster.dir.path().to_owned();
    let bundle = turnout::certs::generate(&["turnout-webhook.turnout-system.svc".into(), "127.0.0.1".into()]).unwrap();
    turnout::certs::write(&dir.join("certs"), &bundle, false).unwrap();
    let port = |_: ()| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (listen, admin_addr) = (port(()), port(()));
    // RBAC and CRDs first, as on a cluster where turnout is installed before it starts.
    cluster.install(bundle.ca_pem.as_bytes(), listen).await;
    cluster.istio_crds().await;
    // The baseline webhook: registered as turnout's is, answering at once with no patch.
    let (noop, noop_ca) = noop_webhook(&dir).await;
    let registration: serde_json::Value = serde_json::from_str(
        &cluster
            .ok(&["get", "mutatingwebhookconfiguration", "turnout", "-o", "json"])
            .await
            .stdout,
    )
    .unwrap();
    let mut webhook = registration["webhooks"][0].clone();
    webhook["name"] = json!("noop.turnout.dev");
    webhook["clientConfig"] = json!({"url": format!("https://{noop}/"),
        "caBundle": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, noop_ca)});
    let noop_registration = json!({"apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration", "metadata": {"name": "noop"}, "webhooks": [webhook]});
    cluster.apply(&noop_registration.to_string()).await;
    let mut turnout = tokio::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args([
            "run",
            "--listen",
            &listen.to_string(),
            "--admin-listen",
            &admin_addr.to_string(),
        ])
        .arg("--tls-cert")
        .arg(dir.join("certs/tls.crt"))
        .arg("--tls-key")
        .arg(dir.join("certs/tls.key"))
        .args(["--agent-username", common::AGENT_USER, "--drain-delay", "0s"])
        .args([
            "--steps",
            "50,100",
            "--interval",
            "1ms",
            "--propagation-delay",
            "0s",
            "--drain",
            "0s",
        ])
        .env("KUBECONFIG", cluster.agent_kubeconfig())
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stderr(match std::env::var_os("TURNOUT_LOG") {
            Some(path) => std::process::Stdio::from(std::fs::File::create(path).unwrap()),
            None => std::process::Stdio::null(),
        })
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = turnout.id().unwrap();
    let admin = admin_addr.to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest_lite(&format!("http://{admin}/ready")).await.trim() != "ready" {
        assert!(Instant::now() < deadline, "turnout did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_kib(pid);

    // 1. Reaction times, turnout and native side by side.
    cluster.namespace("bench", true).await;
    cluster.namespace("plain", false).await;
    let service = |ns: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: app\n  namespace: {ns}\nspec:\n  selector:\n    app: app\n  ports:\n    - port: 8080\n"
        )
    };
    for ns in ["bench", "plain"] {
        Api::<Deployment>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &deployment("app", "app:0"))
            .await
            .unwrap();
        cluster.apply(&service(ns)).await;
        cluster
            .ok(&["rollout", "status", "-n", ns, "deployment/app", "--timeout=60s"])
            .await;
    }
    let audit_log = cluster.bed.audit_log();
    let (audit_start, _) = audited(&audit_log, common::AGENT_USER, usize::MAX);
    let mut agent_requests = 0;
    let mut agent_by_verb: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    let (mut to_candidate, mut to_weight, mut native) = (Vec::new(), Vec::new(), Vec::new());
    for r in 1..=o.releases {
        let image = format!("app:{r}");
        let patch =
            json!({ "spec": { "template": { "spec": { "containers": [{ "name": "app", "image": image }] } } } });
        let revision = (r + 1).to_string();
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), "bench");
        let rev = revision.clone();
        let held = tokio::spawn(seen(deployments.clone(), move |d| {
            d.name_any() == "app"
                && d.spec.paused == Some(true)
                && d.annotations().get("turnout.dev/revision") == Some(&rev)
        }));
        let candidate_name = format!("app-v{revision}");
        let created = tokio::spawn(seen(deployments.clone(), move |d| d.name_any() == candidate_name));
        let canary = format!("v{revision}-canary");
        let weighted = tokio::spawn(seen(
            Api::<VirtualService>::namespaced(client.clone(), "bench"),
            move |vs| {
                vs.spec
                    .http
                    .iter()
                    .flatten()
                    .flat_map(|h| h.route.iter().flatten())
                    .any(|d| d.destination.subset.as_deref() == Some(canary.as_str()) && d.weight.unwrap_or(0) > 0)
            },
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        deployments
            .patch("app", &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .unwrap();
        let t0 = held.await.unwrap();
        to_candidate.push(millis(created.await.unwrap() - t0));
        to_weight.push(millis(weighted.await.unwrap() - t0));
        let d = deployments.clone();
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let phase = d
                .get("app")
                .await
                .unwrap()
                .annotations()
                .get("turnout.dev/phase")
                .cloned();
            if phase.as_deref() == Some("Succeeded") {
                break;
            }
            assert!(Instant::now() < until, "release {r} did not succeed: {phase:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (_, by_verb) = audited(&audit_log, common::AGENT_USER, audit_start);
        agent_requests = by_verb.values().sum();
        agent_by_verb = by_verb;

        // The native controller, same update.
        let plain: Api<Deployment> = Api::namespaced(client.clone(), "plain");
        let generation = plain.get("app").await.unwrap().metadata.generation.unwrap_or(0) + 1;
        let updated = tokio::spawn(seen(plain.clone(), move |d| d.metadata.generation == Some(generation)));
        let image2 = format!("app:{r}");
        let new_rs = tokio::spawn(seen(
            Api::<ReplicaSet>::namespaced(client.clone(), "plain"),
            move |rs| {
                rs.spec
                    .template
                    .as_ref()
                    .and_then(|t| t.spec.as_ref())
                    .map(|s| s.containers[0].image.clone())
                    == Some(Some(image2.clone()))
            },
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        plain
            .patch("app", &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .unwrap();
        let t0 = updated.await.unwrap();
        native.push(millis(new_rs.await.unwrap() - t0));
        cluster
            .ok(&["rollout", "status", "-n", "plain", "deployment/app", "--timeout=60s"])
            .await;
    }
    // 2. Admission as the API server times it: dry-run updates of the pod template reach both webhooks
    // (their side effects are none) and change nothing.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "bench");
    for i in 0..o.admissions {
        let patch = json!({ "spec": { "template": { "spec": { "containers": [{ "name": "app", "image": format!("app:dry-{i}") }] } } } });
        deployments
            .patch("app", &PatchParams::default().dry_run(), &Patch::Strategic(&patch))
            .await
            .unwrap();
    }
    let apiserver_metrics = client
        .request_text(http::Request::get("/metrics").body(Vec::new()).unwrap())
        .await
        .unwrap();
    let metric_name = "apiserver_admission_webhook_admission_duration_seconds";
    let (turnout_sum, turnout_count) = histogram(&apiserver_metrics, metric_name, r#"name="deployments.turnout.dev""#);
    let (noop_sum, noop_count) = histogram(&apiserver_metrics, metric_name, r#"name="noop.turnout.dev""#);
    let passes = metric(&admin, "turnout_reconcile_duration_seconds_count").await;
    let seconds = metric(&admin, "turnout_reconcile_duration_seconds_sum").await;
    let after_releases = rss_kib(pid);

    println!(
        "agent benchmark ({} releases; {} Deployments)",
        o.releases, o.deployments
    );
    println!("  reaction, median of {} (min..max):", o.releases);
    let range = |v: &[f64]| {
        format!(
            "{:7.1} ms ({:.1}..{:.1})",
            median(v.to_vec()),
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max)
        )
    };
    println!(
        "    update admitted -> candidate Deployment created   {}",
        range(&to_candidate)
    );
    println!(
        "    update admitted -> first canary weight routed     {}",
        range(&to_weight)
    );
    println!(
        "    baseline: update -> new ReplicaSet (native)       {}",
        range(&native)
    );
    println!("  admission calls timed by the API server (apiserver_admission_webhook_admission_duration_seconds):");
    println!(
        "    turnout's webhook   {:6.2} ms mean over {turnout_count:.0} calls",
        1000.0 * turnout_sum / turnout_count.max(1.0)
    );
    println!(
        "    no-op webhook       {:6.2} ms mean over {noop_count:.0} calls (registered the same way)",
        1000.0 * noop_sum / noop_count.max(1.0)
    );
    println!(
        "    ratio               {:6.2}",
        (turnout_sum / turnout_count.max(1.0)) / (noop_sum / noop_count.max(1.0)).max(f64::MIN_POSITIVE)
    );
    println!(
        "  API requests of the agent's ServiceAccount (audit log) during the {} releases: {agent_requests} ({:.1} per release)",
        o.releases,
        agent_requests as f64 / o.releases.max(1) as f64
    );
    for (verb, n) in &agent_by_verb {
        println!("    {n:5}  {verb}");
    }
    println!(
        "  reconcile passes during the releases: {passes:.0}, mean {:.2} ms",
        1000.0 * seconds / passes.max(1.0)
    );
    // 3. Memory with many opted-in Deployments.
    let namespaces = 10;
    for n in 0..namespaces {
        cluster.namespace(&format!("scale-{n}"), true).await;
    }
    let before_passes = passes;
    let started = Instant::now();
    let mut peak = 0;
    for i in 0..o.deployments {
        let ns = format!("scale-{}", i % namespaces);
        Api::<Deployment>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &deployment(&format!("d{i}"), "app:0"))
            .await
            .unwrap();
        if i % 50 == 0 {
            peak = peak.max(rss_kib(pid));
        }
    }
    // Every new Deployment is reconciled at least once (a CREATE, a status update or two).
    let until = Instant::now() + Duration::from_secs(600);
    loop {
        peak = peak.max(rss_kib(pid));
        let now = metric(&admin, "turnout_reconcile_duration_seconds_count").await;
        if now >= before_passes + o.deployments as f64 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the agent did not reconcile every Deployment: {} passes of {}",
            now - before_passes,
            o.deployments
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let with_many = rss_kib(pid);
    let all_passes = metric(&admin, "turnout_reconcile_duration_seconds_count").await;
    let all_seconds = metric(&admin, "turnout_reconcile_duration_seconds_sum").await;

    println!(
        "  reconcile passes for {} new Deployments: {:.0} in {:.1} s, mean {:.2} ms",
        o.deployments,
        all_passes - before_passes,
        started.elapsed().as_secs_f64(),
        1000.0 * (all_seconds - seconds) / (all_passes - before_passes).max(1.0)
    );
    println!(
        "  agent RSS: idle {:.1} MiB, after the releases {:.1} MiB, with {} Deployments {:.1} MiB (peak {:.1} MiB)",
        idle as f64 / 1024.0,
        after_releases as f64 / 1024.0,
        o.deployments,
        with_many as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    let _ = turnout.start_kill();
}
