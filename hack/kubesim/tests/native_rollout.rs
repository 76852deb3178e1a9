//! A measurement, not a pass/fail check: requests that fail during a native rolling update under load
//! when proxies apply endpoint changes late — the problem turnout exists to solve. The figures are
//! printed (run with `--nocapture`) and recorded in BENCHMARKS.md; the test fails only if the
//! measurement itself could not be made.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use kubesim::sim::{Config, Sim, admin};
use serde_json::{Value, json};
use tokio::time::Instant;

const NS: &str = "test";

async fn create(sim: &Sim, plural: &str, group: &str, object: Value) {
    let t = sim
        .api
        .registry()
        .all()
        .find(|t| t.group == group && t.plural == plural)
        .cloned()
        .unwrap();
    let ns = if t.namespaced { NS } else { "" };
    if let Err(e) = sim.api.create(&admin(), &t, ns, object, false).await {
        panic!("create {plural}: {}", e.message);
    }
}

async fn one_request(sim: &Sim) -> u16 {
    let Ok(tcp) = tokio::net::TcpStream::connect(sim.mesh_addr).await else {
        return 0;
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await else {
        return 0;
    };
    tokio::spawn(conn);
    let request = http::Request::get("/")
        .header("host", "podinfo.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    match sender.send_request(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.into_body().collect().await;
            status
        }
        Err(_) => 0,
    }
}

/// Runs a native rolling update of 3 replicas under `rate` requests/s with proxies up to `delay`
/// behind, and returns (requests, failed).
async fn measure(delay: Duration, rate: u64) -> (u64, u64) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sim = Arc::new(
        Sim::start(Config {
            pod_ready_delay: Duration::from_millis(200),
            max_propagation_delay: delay,
            ..Config::default()
        })
        .await
        .unwrap(),
    );
    create(&sim, "namespaces", "", json!({"metadata": {"name": NS}})).await;
    create(
        &sim,
        "services",
        "",
        json!({"metadata": {"name": "podinfo"}, "spec": {"selector": {"app": "podinfo"},
        "ports": [{"name": "http", "port": 80, "targetPort": 9898}]}}),
    )
    .await;
    let deployment = |image: &str| {
        json!({"metadata": {"name": "podinfo"}, "spec": {"replicas": 3, "minReadySeconds": 0,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "selector": {"matchLabels": {"app": "podinfo"}},
            "template": {"metadata": {"labels": {"app": "podinfo"}},
                "spec": {"containers": [{"name": "podinfod", "image": image, "ports": [{"containerPort": 9898}]}]}}}})
    };
    create(&sim, "deployments", "apps", deployment("podinfo:1")).await;
    let available = |sim: &Sim| {
        sim.api
            .store
            .get(&("apps".into(), "deployments".into()), NS, "podinfo")
            .is_some_and(|d| {
                d["status"]["updatedReplicas"] == 3
                    && d["status"]["availableReplicas"] == 3
                    && d["status"]["replicas"] == 3
                    && d["status"]["observedGeneration"] == d["metadata"]["generation"]
            })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !available(&sim) {
        assert!(Instant::now() < deadline, "the first version never became available");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sim.mesh.converged().await;

    let (sent, failed, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let load = {
        let (sim, sent, failed, stop) = (sim.clone(), sent.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            let mut inflight = tokio::task::JoinSet::new();
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                let (sim, sent, failed) = (sim.clone(), sent.clone(), failed.clone());
                inflight.spawn(async move {
                    let status = one_request(&sim).await;
                    sent.fetch_add(1, Ordering::SeqCst);
                    if status != 200 {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
            while inflight.join_next().await.is_some() {}
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = sim.api.registry().get("apps", "v1", "deployments").unwrap();
    let mut next = (*sim
        .api
        .store
        .get(&("apps".into(), "deployments".into()), NS, "podinfo")
        .unwrap())
    .clone();
    next["spec"]["template"]["spec"]["containers"][0]["image"] = json!("podinfo:2");
    sim.api
        .update(&admin(), &t, NS, "podinfo", None, next, false)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !available(&sim) {
        assert!(Instant::now() < deadline, "the rolling update never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let every proxy catch up before the load stops, so late failures are counted.
    sim.mesh.converged().await;
    tokio::time::sleep(delay).await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    (sent.load(Ordering::SeqCst), failed.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_requests_during_a_native_rolling_update_with_slow_propagation() {
    for delay_ms in [0u64, 1_000] {
        let (sent, failed) = measure(Duration::from_millis(delay_ms), 100).await;
        println!(
            "native rolling update, 3 replicas, maxSurge 1, ~100 req/s, propagation up to {delay_ms} ms: {failed} of {sent} requests failed ({:.2} %)",
            100.0 * failed as f64 / sent.max(1) as f64
        );
        assert!(sent > 50, "the load ran ({sent} requests)");
    }
}
