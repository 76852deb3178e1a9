//! The mesh end to end: pods answering HTTP, proxies routing by VirtualService/DestinationRule after their
//! propagation delay, stale endpoints failing with 503, and Istio metrics.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use kubesim::sim::{Config, Sim, admin};
use serde_json::{Value, json};
use tokio::time::Instant;

const NS: &str = "test";

struct Answer {
    status: u16,
    body: Value,
    text: String,
    flags: String,
}

impl Answer {
    fn version(&self) -> &str {
        self.body["version"].as_str().unwrap_or("-")
    }
}

async fn start(max_propagation_delay: Duration) -> Sim {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sim = Sim::start(Config {
        pod_ready_delay: Duration::from_millis(100),
        max_propagation_delay,
        ..Config::default()
    })
    .await
    .expect("kubesim starts");
    install_istio_crds(&sim).await;
    create(&sim, "", "v1", "namespaces", json!({"metadata": {"name": NS}})).await;
    create(
        &sim,
        "",
        "v1",
        "services",
        json!({"metadata": {"name": "podinfo"}, "spec": {"selector": {"app": "podinfo"},
            "ports": [{"name": "http", "port": 80, "targetPort": 9898}]}}),
    )
    .await;
    sim
}

/// The real Istio CRDs, applied with the real kubectl.
async fn install_istio_crds(sim: &Sim) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig, &admin().name).unwrap();
    let crds = format!("{}/../../../shared/crds/istio", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new("kubectl")
        .args(["apply", "-f", &crds])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .await
        .expect("kubectl is installed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

async fn create(sim: &Sim, group: &str, version: &str, plural: &str, object: Value) {
    let t = sim.api.registry().get(group, version, plural).unwrap();
    let ns = if t.namespaced { NS } else { "" };
    if let Err(e) = sim.api.create(&admin(), &t, ns, object, false).await {
        panic!("create {plural}: {}", e.message);
    }
}

/// Replaces the spec of an object (read from the store, so with its resourceVersion).
async fn update(sim: &Sim, group: &str, plural: &str, name: &str, edit: impl FnOnce(&mut Value)) {
    let t = sim
        .api
        .registry()
        .all()
        .find(|t| t.group == group && t.plural == plural)
        .cloned()
        .unwrap();
    let mut object = (*sim.api.store.get(&(group.into(), plural.into()), NS, name).unwrap()).clone();
    edit(&mut object);
    if let Err(e) = sim.api.update(&admin(), &t, NS, name, None, object, false).await {
        panic!("update {plural}/{name}: {}", e.message);
    }
}

fn deployment(name: &str, version: &str, replicas: u32, env: Value) -> Value {
    json!({"metadata": {"name": name}, "spec": {"replicas": replicas,
        "selector": {"matchLabels": {"app": "podinfo", "version": version}},
        "template": {"metadata": {"labels": {"app": "podinfo", "version": version}},
            "spec": {"containers": [{"name": "podinfod", "image": format!("podinfo:{version}"), "env": env,
                "ports": [{"name": "http", "containerPort": 9898}]}]}}}})
}

/// Waits until the Service has `n` ready endpoints (none of them pod `gone`) and every proxy knows it.
async fn wait_ready_endpoints(sim: &Sim, n: usize, gone: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let slice = sim.api.store.get(
            &("discovery.k8s.io".into(), "endpointslices".into()),
            NS,
            "podinfo-slice",
        );
        let ready = slice.as_ref().map_or(0, |s| {
            s["endpoints"].as_array().map_or(0, |e| {
                e.iter()
                    .filter(|e| e["conditions"]["ready"] == true && e["targetRef"]["name"] != gone)
                    .count()
            })
        });
        if ready == n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never {n} ready endpoints; last slice: {slice:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sim.mesh.converged().await;
}

/// One request through the mesh entry, through proxy `proxy` if given.
async fn send(sim: &Sim, host: &str, path: &str, proxy: Option<usize>) -> Answer {
    let tcp = tokio::net::TcpStream::connect(sim.mesh_addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut request = http::Request::get(path).header("host", host);
    if let Some(p) = proxy {
        request = request.header("x-kubesim-proxy", p.to_string());
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let flags = response
        .headers()
        .get("x-kubesim-response-flags")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Answer {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
        flags,
    }
}

/// `n` requests, spread over the proxies in turn.
async fn batch(sim: &Sim, n: usize) -> Vec<Answer> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(send(sim, "podinfo.test", "/", None).await);
    }
    out
}

/// Sends batches until `pred` holds for a whole batch (at most 10 s).
async fn eventually(sim: &Sim, what: &str, pred: impl Fn(&Answer) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answers = batch(sim, 12).await;
        if answers.iter().all(&pred) {
            return;
        }
        let seen: Vec<_> = answers.iter().map(|a| (a.status, a.version().to_owned())).collect();
        assert!(Instant::now() < deadline, "never {what}; last batch: {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn versions(answers: &[Answer]) -> BTreeSet<String> {
    answers.iter().map(|a| a.version().to_owned()).collect()
}

async fn metrics(sim: &Sim) -> String {
    let tcp = tokio::net::TcpStream::connect(sim.metrics_addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let request = http::Request::get("/metrics")
        .header("host", "kubesim")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// The value of the first series of `name` whose line contains every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn weights(v1: u32, v2: u32, v2_subset: &str) -> Value {
    json!([{"route": [
        {"destination": {"host": "podinfo", "subset": "v1"}, "weight": v1},
        {"destination": {"host": "podinfo.test.svc.cluster.local", "subset": v2_subset}, "weight": v2}]}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_virtual_service_weights_and_failures_show_in_istio_metrics() {
    let sim = start(Duration::from_millis(200)).await;
    create(
        &sim,
        "apps",
        "v1",
        "deployments",
        deployment("podinfo", "v1", 2, json!([])),
    )
    .await;
    create(
        &sim,
        "apps",
        "v1",
        "deployments",
        deployment("podinfo-v2", "v2", 1, json!([])),
    )
    .await;
    wait_ready_endpoints(&sim, 3, "").await;

    // (a) No VirtualService: the plain host reaches every pod, by any form of the Service's name.
    let answers = batch(&sim, 40).await;
    assert!(
        answers.iter().all(|a| a.status == 200),
        "{:?}",
        answers.iter().map(|a| &a.text).collect::<Vec<_>>()
    );
    assert_eq!(versions(&answers), BTreeSet::from(["v1".into(), "v2".into()]));
    let a = &answers[0];
    assert_eq!(
        (a.body["namespace"].as_str(), a.body["path"].as_str()),
        (Some(NS), Some("/"))
    );
    assert!(a.body["pod"].as_str().unwrap().starts_with("podinfo-"));
    for host in [
        "podinfo.test.svc.cluster.local",
        "podinfo.test.svc:80",
        "podinfo.test:80",
    ] {
        assert_eq!(send(&sim, host, "/x", None).await.status, 200, "{host}");
    }
    let unknown = send(&sim, "nothing.test", "/", None).await;
    assert_eq!(
        (unknown.status, unknown.flags.as_str()),
        (404, "NR"),
        "{}",
        unknown.text
    );

    // (b) Subsets, then weights 100/0 and 0/100.
    create(
        &sim,
        "networking.istio.io",
        "v1",
        "destinationrules",
        json!({"metadata": {"name": "podinfo"}, "spec": {"host": "podinfo", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}),
    )
    .await;
    sim.mesh.converged().await; // I1: the subsets are everywhere before a route names them.
    create(
        &sim,
        "networking.istio.io",
        "v1",
        "virtualservices",
        json!({"metadata": {"name": "podinfo"}, "spec": {"hosts": ["podinfo"], "http": weights(100, 0, "v2")}}),
    )
    .await;
    sim.mesh.converged().await;
    let answers = batch(&sim, 24).await;
    assert!(answers.iter().all(|a| a.status == 200 && a.version() == "v1"));

    update(&sim, "networking.istio.io", "virtualservices", "podinfo", |vs| {
        vs["spec"]["http"] = weights(0, 100, "v2");
    })
    .await;
    eventually(&sim, "all v2", |a| a.status == 200 && a.version() == "v2").await;
    sim.mesh.converged().await;
    assert!(
        sim.mesh.generations().windows(2).all(|g| g[0] == g[1]),
        "every proxy holds the newest"
    );

    // (c) The canary fails: its pods answer 500, counted for its workload.
    update(&sim, "apps", "deployments", "podinfo-v2", |d| {
        d["spec"]["template"]["spec"]["containers"][0]["env"] = json!([{"name": "KUBESIM_ERROR_RATE", "value": "1"}]);
    })
    .await;
    eventually(&sim, "all 500 from v2", |a| a.status == 500 && a.version() == "v2").await;
    let text = metrics(&sim).await;
    for reporter in ["source", "destination"] {
        let failed = sample(
            &text,
            "istio_requests_total",
            &[
                &format!(r#"reporter="{reporter}""#),
                r#"destination_workload="podinfo-v2""#,
                r#"destination_workload_namespace="test""#,
                r#"destination_version="v2""#,
                r#"destination_service="podinfo.test.svc.cluster.local""#,
                r#"response_code="500""#,
            ],
        );
        assert!(failed.is_some_and(|n| n >= 12.0), "{reporter}: {failed:?}\n{text}");
    }
    let ok_v1 = sample(
        &text,
        "istio_requests_total",
        &[
            r#"reporter="source""#,
            r#"destination_workload="podinfo""#,
            r#"response_code="200""#,
        ],
    );
    assert!(ok_v1.is_some_and(|n| n >= 24.0), "{ok_v1:?}");
    let buckets = sample(
        &text,
        "istio_request_duration_milliseconds_bucket",
        &[
            r#"destination_workload="podinfo-v2""#,
            r#"response_code="500""#,
            r#"le="+Inf""#,
        ],
    );
    assert!(buckets.is_some_and(|n| n >= 12.0), "{buckets:?}");

    // (d) A route to a subset no DestinationRule defines: Envoy has no such cluster.
    update(&sim, "networking.istio.io", "virtualservices", "podinfo", |vs| {
        vs["spec"]["http"] = weights(0, 100, "v3");
    })
    .await;
    sim.mesh.converged().await;
    let answers = batch(&sim, 8).await;
    for a in &answers {
        assert_eq!(
            (a.status, a.text.as_str(), a.flags.as_str()),
            (503, "no healthy upstream", "NC")
        );
    }
    let text = metrics(&sim).await;
    let refused = sample(
        &text,
        "istio_requests_total",
        &[
            r#"destination_workload="unknown""#,
            r#"response_code="503""#,
            r#"response_flags="NC""#,
        ],
    );
    assert!(refused.is_some_and(|n| n >= 8.0), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_with_stale_endpoints_fails_requests_to_a_pod_that_is_gone() {
    // Long propagation: right after the pod goes, no proxy knows yet.
    let sim = start(Duration::from_secs(2)).await;
    create(
        &sim,
        "apps",
        "v1",
        "deployments",
        deployment("podinfo", "v1", 1, json!([])),
    )
    .await;
    wait_ready_endpoints(&sim, 1, "").await;
    let before = send(&sim, "podinfo.test", "/", Some(0)).await;
    assert_eq!(before.status, 200);
    let pod = before.body["pod"].as_str().unwrap().to_owned();

    let pods = sim.api.registry().get("", "v1", "pods").unwrap();
    sim.api
        .delete(
            &pods,
            NS,
            &pod,
            &json!({"gracePeriodSeconds": 0}),
            &Default::default(),
            false,
        )
        .unwrap();
    assert!(sim.mesh.observed().await, "the pod's process has exited");
    let mut flags = Vec::new();
    for proxy in 0..4 {
        let a = send(&sim, "podinfo.test", "/", Some(proxy)).await;
        // Never the old pod; the replacement only if this proxy already knows it is ready.
        let replacement = a.status == 200 && a.body["pod"] != pod.as_str();
        assert!(a.status == 503 || replacement, "{} {}", a.status, a.text);
        flags.push(a.flags);
    }
    assert!(
        flags.iter().any(|f| f == "UF"),
        "a proxy still sent traffic to the old pod: {flags:?}"
    );

    // The ReplicaSet's replacement takes over once every proxy knows it.
    wait_ready_endpoints(&sim, 1, &pod).await;
    for proxy in 0..4 {
        let a = send(&sim, "podinfo.test", "/", Some(proxy)).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_ne!(a.body["pod"], pod.as_str());
    }
}
