//! The mesh end to end on the test bed (the real control plane, the node agent, the mesh following the
//! API server): pods answering HTTP, proxies routing by VirtualService/DestinationRule or Gateway API
//! HTTPRoute after their propagation delay, HTTPRoute status, stale endpoints failing with 503, Istio
//! metrics, and what release strategies use: mirrors, header changes and cookie matches.

// A test stops at the first thing that is not as it expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::{Api, ResourceExt};
use kubesim::testbed::{self, Testbed};
use serde_json::{Value, json};
use tokio::time::Instant;

const NS: &str = "test";

struct Answer {
    status: u16,
    body: Value,
    text: String,
    flags: String,
    headers: http::HeaderMap,
}

impl Answer {
    fn version(&self) -> &str {
        self.body["version"].as_str().unwrap_or("-")
    }

    /// Every value of header `name`, in order.
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("?"))
            .collect()
    }
}

struct Bed {
    bed: Testbed,
    client: kube::Client,
    _dir: tempfile::TempDir,
    /// One bed at a time: every node agent hands out the same pod addresses, so two beds would serve
    /// their pods on the same loopback addresses.
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Polls `check` until it gives a value (every 50 ms, at most `within`).
async fn poll<T, F: Future<Output = Option<T>>>(within: Duration, what: &str, check: impl Fn() -> F) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "never {what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A test bed of its own (proxies up to `max_propagation_delay` behind), the Istio CRDs, namespace
/// `test` and Service `podinfo`.
async fn start(max_propagation_delay: Duration) -> Bed {
    start_with(max_propagation_delay, true).await
}

/// [`start`], writing HTTPRoute status or not.
async fn start_with(max_propagation_delay: Duration, route_status: bool) -> Bed {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = testbed::config(dir.path());
    testbed::ensure_built(&config.control_plane.bin_dir).expect("the control plane builds (hack/k8s/build.sh)");
    config.node.pod_ready_delay = Duration::from_millis(100);
    config.mesh.max_propagation_delay = max_propagation_delay;
    config.mesh.route_status = route_status;
    let bed = Testbed::start(&config).await.expect("the test bed starts");
    let client = bed.control_plane.client().await.unwrap();
    let bed = Bed {
        bed,
        client,
        _dir: dir,
        _turn: turn,
    };
    install_istio_crds(&bed).await;
    let namespaces: Api<Namespace> = Api::all(bed.client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap();
    namespaces.create(&PostParams::default(), &ns).await.unwrap();
    // Pods are admitted once the namespace's default ServiceAccount exists.
    let accounts: Api<ServiceAccount> = Api::namespaced(bed.client.clone(), NS);
    poll(Duration::from_secs(30), "the default ServiceAccount", || async {
        accounts.get_opt("default").await.ok().flatten()
    })
    .await;
    create(
        &bed,
        ("", "v1", "Service", "services"),
        json!({"metadata": {"name": "podinfo"}, "spec": {"selector": {"app": "podinfo"},
            "ports": [{"name": "http", "port": 80, "targetPort": 9898}]}}),
    )
    .await;
    bed
}

/// The real Istio CRDs, applied with the pinned kubectl, then established.
async fn install_istio_crds(bed: &Bed) {
    let crds = format!("{}/../../../shared/crds/istio", env!("CARGO_MANIFEST_DIR"));
    let kubectl = bed.bed.control_plane.bin_dir.join("kubectl");
    let out = tokio::process::Command::new(kubectl)
        .args(["apply", "-f", &crds])
        .env("KUBECONFIG", bed.bed.control_plane.dir.join("kubeconfig"))
        .output()
        .await
        .expect("kubectl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rules = resource(("networking.istio.io", "v1", "DestinationRule", "destinationrules"));
    let services = resource(("networking.istio.io", "v1", "VirtualService", "virtualservices"));
    for r in [rules, services] {
        let api: Api<DynamicObject> = Api::namespaced_with(bed.client.clone(), NS, &r);
        poll(Duration::from_secs(30), "the Istio CRDs served", || async {
            api.list(&ListParams::default()).await.ok()
        })
        .await;
    }
}

/// The real Gateway API CRDs (GatewayClass, Gateway, HTTPRoute), applied with the pinned kubectl, then
/// established and served.
async fn install_gateway_api_crds(bed: &Bed) {
    let crds = format!("{}/../../../shared/crds/gateway-api", env!("CARGO_MANIFEST_DIR"));
    let kubectl = bed.bed.control_plane.bin_dir.join("kubectl");
    let out = tokio::process::Command::new(kubectl)
        .args(["apply", "--server-side", "-f", &crds])
        .env("KUBECONFIG", bed.bed.control_plane.dir.join("kubeconfig"))
        .output()
        .await
        .expect("kubectl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let crds: Api<CustomResourceDefinition> = Api::all(bed.client.clone());
    for name in ["gatewayclasses", "gateways", "httproutes"] {
        let name = format!("{name}.gateway.networking.k8s.io");
        poll(Duration::from_secs(30), &format!("{name} Established"), || async {
            let crd = crds.get_opt(&name).await.ok().flatten()?;
            let conditions = crd.status?.conditions?;
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        })
        .await;
    }
    for kind in [GATEWAYS, HTTP_ROUTES] {
        let api: Api<DynamicObject> = Api::namespaced_with(bed.client.clone(), NS, &resource(kind));
        poll(Duration::from_secs(30), "the Gateway API served", || async {
            api.list(&ListParams::default()).await.ok()
        })
        .await;
    }
}

type Kind = (&'static str, &'static str, &'static str, &'static str);

fn resource((group, version, kind, plural): Kind) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

fn rv_of(object: &DynamicObject) -> u64 {
    object.resource_version().and_then(|v| v.parse().ok()).unwrap()
}

/// Creates `object` in namespace `test`; returns its resourceVersion.
async fn create(bed: &Bed, kind: Kind, object: Value) -> u64 {
    let r = resource(kind);
    let api: Api<DynamicObject> = Api::namespaced_with(bed.client.clone(), NS, &r);
    let mut object: DynamicObject = serde_json::from_value(object).unwrap();
    object.types = Some(kube::api::TypeMeta {
        api_version: r.api_version.clone(),
        kind: r.kind.clone(),
    });
    match api.create(&PostParams::default(), &object).await {
        Ok(created) => rv_of(&created),
        Err(e) => panic!("create {}: {e}", kind.3),
    }
}

/// Replaces an object after `edit`; returns its new resourceVersion.
async fn update(bed: &Bed, kind: Kind, name: &str, edit: impl Fn(&mut Value)) -> u64 {
    let api: Api<DynamicObject> = Api::namespaced_with(bed.client.clone(), NS, &resource(kind));
    loop {
        let mut object = serde_json::to_value(api.get(name).await.unwrap()).unwrap();
        edit(&mut object);
        let object: DynamicObject = serde_json::from_value(object).unwrap();
        match api.replace(name, &PostParams::default(), &object).await {
            Ok(replaced) => return rv_of(&replaced),
            // Changed meanwhile (a controller's status write): read again.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("update {}/{name}: {e}", kind.3),
        }
    }
}

const DEPLOYMENTS: Kind = ("apps", "v1", "Deployment", "deployments");
const RULES: Kind = ("networking.istio.io", "v1", "DestinationRule", "destinationrules");
const ROUTES: Kind = ("networking.istio.io", "v1", "VirtualService", "virtualservices");
const SERVICES: Kind = ("", "v1", "Service", "services");
const HTTP_ROUTES: Kind = ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes");
const GATEWAYS: Kind = ("gateway.networking.k8s.io", "v1", "Gateway", "gateways");
fn deployment(name: &str, version: &str, replicas: u32, env: Value) -> Value {
    json!({"metadata": {"name": name}, "spec": {"replicas": replicas,
        "selector": {"matchLabels": {"app": "podinfo", "version": version}},
        "template": {"metadata": {"labels": {"app": "podinfo", "version": version}},
            "spec": {"containers": [{"name": "podinfod", "image": format!("podinfo:{version}"), "env": env,
                "ports": [{"name": "http", "containerPort": 9898}]}]}}}})
}

/// Waits until the Service has `n` ready endpoints (none of them pod `gone`) and every proxy knows it.
async fn wait_ready_endpoints(bed: &Bed, n: usize, gone: &str) {
    wait_service_endpoints(bed, "podinfo", n, gone).await;
}

/// [`wait_ready_endpoints`] for Service `service`.
async fn wait_service_endpoints(bed: &Bed, service: &str, n: usize, gone: &str) {
    let slices: Api<EndpointSlice> = Api::namespaced(bed.client.clone(), NS);
    let params = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let rv = poll(Duration::from_secs(30), &format!("{n} ready endpoints"), || async {
        let list = slices.list(&params).await.ok()?;
        let slice = list.items.into_iter().next()?;
        let ready = slice
            .endpoints
            .iter()
            .flatten()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .filter(|e| e.target_ref.as_ref().and_then(|t| t.name.as_deref()) != Some(gone))
            .count();
        (ready == n)
            .then(|| slice.resource_version()?.parse::<u64>().ok())
            .flatten()
    })
    .await;
    assert!(bed.bed.mesh.converged("endpointslices", rv).await);
}

/// One request through the mesh entry, through proxy `proxy` if given.
async fn send(bed: &Bed, host: &str, path: &str, proxy: Option<usize>) -> Answer {
    send_with(bed, host, path, proxy, &[]).await
}

/// [`send`] with more request headers.
async fn send_with(bed: &Bed, host: &str, path: &str, proxy: Option<usize>, headers: &[(&str, &str)]) -> Answer {
    let tcp = tokio::net::TcpStream::connect(bed.bed.mesh_addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut request = http::Request::get(path).header("host", host);
    if let Some(p) = proxy {
        request = request.header("x-kubesim-proxy", p.to_string());
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
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
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Answer {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
        flags,
        headers,
    }
}

/// `n` requests, spread over the proxies in turn.
async fn batch(bed: &Bed, n: usize) -> Vec<Answer> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(send(bed, "podinfo.test", "/", None).await);
    }
    out
}

/// Sends batches until `pred` holds for a whole batch (at most 10 s).
async fn eventually(bed: &Bed, what: &str, pred: impl Fn(&Answer) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answers = batch(bed, 12).await;
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

async fn metrics(bed: &Bed) -> String {
    let tcp = tokio::net::TcpStream::connect(bed.bed.metrics_addr()).await.unwrap();
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
    let bed = start(Duration::from_millis(200)).await;
    create(&bed, DEPLOYMENTS, deployment("podinfo", "v1", 2, json!([]))).await;
    create(&bed, DEPLOYMENTS, deployment("podinfo-v2", "v2", 1, json!([]))).await;
    wait_ready_endpoints(&bed, 3, "").await;

    // (a) No VirtualService: the plain host reaches every pod, by any form of the Service's name.
    let answers = batch(&bed, 40).await;
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
        assert_eq!(send(&bed, host, "/x", None).await.status, 200, "{host}");
    }
    let unknown = send(&bed, "nothing.test", "/", None).await;
    assert_eq!(
        (unknown.status, unknown.flags.as_str()),
        (404, "NR"),
        "{}",
        unknown.text
    );

    // (b) Subsets, then weights 100/0 and 0/100.
    let rv = create(
        &bed,
        RULES,
        json!({"metadata": {"name": "podinfo"}, "spec": {"host": "podinfo", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}),
    )
    .await;
    // I1: the subsets are everywhere before a route names them.
    assert!(bed.bed.mesh.converged("destinationrules", rv).await);
    let rv = create(
        &bed,
        ROUTES,
        json!({"metadata": {"name": "podinfo"}, "spec": {"hosts": ["podinfo"], "http": weights(100, 0, "v2")}}),
    )
    .await;
    assert!(bed.bed.mesh.converged("virtualservices", rv).await);
    let answers = batch(&bed, 24).await;
    assert!(answers.iter().all(|a| a.status == 200 && a.version() == "v1"));

    let rv = update(&bed, ROUTES, "podinfo", |vs| {
        vs["spec"]["http"] = weights(0, 100, "v2");
    })
    .await;
    eventually(&bed, "all v2", |a| a.status == 200 && a.version() == "v2").await;
    assert!(bed.bed.mesh.converged("virtualservices", rv).await);
    assert!(
        bed.bed.mesh.generations().windows(2).all(|g| g[0] == g[1]),
        "every proxy holds the newest"
    );

    // (c) The canary fails: its pods answer 500, counted for its workload.
    update(&bed, DEPLOYMENTS, "podinfo-v2", |d| {
        d["spec"]["template"]["spec"]["containers"][0]["env"] = json!([{"name": "KUBESIM_ERROR_RATE", "value": "1"}]);
    })
    .await;
    eventually(&bed, "all 500 from v2", |a| a.status == 500 && a.version() == "v2").await;
    let text = metrics(&bed).await;
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
    let rv = update(&bed, ROUTES, "podinfo", |vs| {
        vs["spec"]["http"] = weights(0, 100, "v3");
    })
    .await;
    assert!(bed.bed.mesh.converged("virtualservices", rv).await);
    let answers = batch(&bed, 8).await;
    for a in &answers {
        assert_eq!(
            (a.status, a.text.as_str(), a.flags.as_str()),
            (503, "no healthy upstream", "NC")
        );
    }
    let text = metrics(&bed).await;
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
    // Long propagation: right after the pod goes, no proxy knows yet (each adopts a change after its
    // own delay in [0, 3 s]; the probe comes within a fraction of a second of the pod's exit).
    let bed = start(Duration::from_secs(3)).await;
    create(&bed, DEPLOYMENTS, deployment("podinfo", "v1", 1, json!([]))).await;
    wait_ready_endpoints(&bed, 1, "").await;
    let before = send(&bed, "podinfo.test", "/", Some(0)).await;
    assert_eq!(before.status, 200);
    let pod = before.body["pod"].as_str().unwrap().to_owned();

    let pods: Api<Pod> = Api::namespaced(bed.client.clone(), NS);
    let ip = pods.get(&pod).await.unwrap().status.unwrap().pod_ip.unwrap();
    let addr = std::net::SocketAddr::new(kubesim::mesh::pod::loopback_of(ip.parse().unwrap()).unwrap(), 9898);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_ok(),
        "the pod listens on {addr}"
    );
    pods.delete(&pod, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    poll(Duration::from_secs(10), "the pod's process exited", || async {
        tokio::net::TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
    let mut flags = Vec::new();
    for proxy in 0..4 {
        let a = send(&bed, "podinfo.test", "/", Some(proxy)).await;
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
    wait_ready_endpoints(&bed, 1, &pod).await;
    for proxy in 0..4 {
        let a = send(&bed, "podinfo.test", "/", Some(proxy)).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_ne!(a.body["pod"], pod.as_str());
    }
}

/// A Service `name` for the pods of one version.
fn version_service(name: &str, version: &str) -> Value {
    json!({"metadata": {"name": name}, "spec": {"selector": {"app": "podinfo", "version": version},
        "ports": [{"name": "http", "port": 80, "targetPort": 9898}]}})
}

/// Rules sending everything to `podinfo-a` and `podinfo-b` with these weights.
fn backend_weights(a: u32, b: u32) -> Value {
    json!([{"backendRefs": [{"name": "podinfo-a", "port": 80, "weight": a},
                            {"name": "podinfo-b", "port": 80, "weight": b}]}])
}

/// The HTTPRoute `name` as the API server holds it.
async fn get_route(bed: &Bed, name: &str) -> Value {
    let api: Api<DynamicObject> = Api::namespaced_with(bed.client.clone(), NS, &resource(HTTP_ROUTES));
    serde_json::to_value(api.get(name).await.unwrap()).unwrap()
}

/// The mesh's `status.parents` entry for the route's parentRef named `parent`, once its conditions
/// observe the route's current generation.
async fn current_route_status(bed: &Bed, route: &str, parent: &str) -> Value {
    poll(
        Duration::from_secs(10),
        &format!("HTTPRoute {route} status for its generation"),
        || async {
            let object = get_route(bed, route).await;
            let generation = object["metadata"]["generation"].clone();
            let entry = object["status"]["parents"]
                .as_array()?
                .iter()
                .find(|p| p["controllerName"] == "kubesim.turnout.dev/mesh" && p["parentRef"]["name"] == parent)?
                .clone();
            let conditions = entry["conditions"].as_array()?;
            (conditions.len() == 2 && conditions.iter().all(|c| c["observedGeneration"] == generation)).then_some(entry)
        },
    )
    .await
}

fn route_condition<'a>(entry: &'a Value, kind: &str) -> (&'a str, &'a str) {
    let c = entry["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind}: {entry}"));
    assert!(c["lastTransitionTime"].is_string(), "{c}");
    (c["status"].as_str().unwrap(), c["reason"].as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_http_route_weights_and_the_mesh_writes_route_status() {
    let bed = start(Duration::from_millis(200)).await;
    install_gateway_api_crds(&bed).await;
    create(&bed, SERVICES, version_service("podinfo-a", "v1")).await;
    create(&bed, SERVICES, version_service("podinfo-b", "v2")).await;
    create(&bed, DEPLOYMENTS, deployment("podinfo", "v1", 1, json!([]))).await;
    create(&bed, DEPLOYMENTS, deployment("podinfo-v2", "v2", 1, json!([]))).await;
    wait_service_endpoints(&bed, "podinfo-a", 1, "").await;
    wait_service_endpoints(&bed, "podinfo-b", 1, "").await;
    wait_ready_endpoints(&bed, 2, "").await;

    // No routing object: the plain Service spreads over both versions.
    let answers = batch(&bed, 40).await;
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(versions(&answers), BTreeSet::from(["v1".into(), "v2".into()]));

    // (a) An HTTPRoute on Service podinfo, 100/0: only podinfo-a's pods, once every proxy holds it.
    let rv = create(
        &bed,
        HTTP_ROUTES,
        json!({"metadata": {"name": "podinfo"}, "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "podinfo", "port": 80}],
            "rules": backend_weights(100, 0)}}),
    )
    .await;
    assert!(bed.bed.mesh.converged("httproutes", rv).await);
    let answers = batch(&bed, 24).await;
    assert!(
        answers.iter().all(|a| a.status == 200 && a.version() == "v1"),
        "{:?}",
        answers.iter().map(|a| (a.status, a.version())).collect::<Vec<_>>()
    );
    let entry = current_route_status(&bed, "podinfo", "podinfo").await;
    assert_eq!(route_condition(&entry, "Accepted"), ("True", "Accepted"));
    assert_eq!(route_condition(&entry, "ResolvedRefs"), ("True", "ResolvedRefs"));
    assert_eq!(
        (&entry["parentRef"]["kind"], &entry["parentRef"]["port"]),
        (&json!("Service"), &json!(80))
    );

    // (b) 0/100: only podinfo-b's; the status follows the new generation.
    let rv = update(&bed, HTTP_ROUTES, "podinfo", |r| {
        r["spec"]["rules"] = backend_weights(0, 100);
    })
    .await;
    eventually(&bed, "all podinfo-b", |a| a.status == 200 && a.version() == "v2").await;
    assert!(bed.bed.mesh.converged("httproutes", rv).await);
    let answers = batch(&bed, 24).await;
    assert!(answers.iter().all(|a| a.status == 200 && a.version() == "v2"));
    let entry = current_route_status(&bed, "podinfo", "podinfo").await;
    assert_eq!(entry["conditions"][0]["observedGeneration"], 2);
    assert_eq!(route_condition(&entry, "Accepted").0, "True");

    // Istio's metrics name the backend Service used and the pod's workload and version, on both sides.
    let text = metrics(&bed).await;
    for reporter in ["source", "destination"] {
        let routed = sample(
            &text,
            "istio_requests_total",
            &[
                &format!(r#"reporter="{reporter}""#),
                r#"destination_service="podinfo-b.test.svc.cluster.local""#,
                r#"destination_service_name="podinfo-b""#,
                r#"destination_workload="podinfo-v2""#,
                r#"destination_version="v2""#,
                r#"response_code="200""#,
            ],
        );
        assert!(routed.is_some_and(|n| n >= 24.0), "{reporter}: {routed:?}\n{text}");
    }

    // (c) A backend Service that does not exist: 500, and ResolvedRefs False.
    let rv = update(&bed, HTTP_ROUTES, "podinfo", |r| {
        r["spec"]["rules"] = json!([{"backendRefs": [{"name": "podinfo-c", "port": 80}]}]);
    })
    .await;
    assert!(bed.bed.mesh.converged("httproutes", rv).await);
    for a in batch(&bed, 8).await {
        assert_eq!((a.status, a.flags.as_str()), (500, "NC"), "{}", a.text);
    }
    let entry = current_route_status(&bed, "podinfo", "podinfo").await;
    assert_eq!(route_condition(&entry, "ResolvedRefs"), ("False", "BackendNotFound"));
    assert_eq!(route_condition(&entry, "Accepted"), ("True", "Accepted"));

    // (d) North-south: a Gateway and a route for a host that is no Service.
    let gw_rv = create(
        &bed,
        GATEWAYS,
        json!({"metadata": {"name": "web"}, "spec": {"gatewayClassName": "kubesim",
            "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}}),
    )
    .await;
    let rv = create(
        &bed,
        HTTP_ROUTES,
        json!({"metadata": {"name": "web"}, "spec": {"parentRefs": [{"name": "web"}],
            "hostnames": ["podinfo.example.com"],
            "rules": [{"backendRefs": [{"name": "podinfo-a", "port": 80}]}]}}),
    )
    .await;
    assert!(bed.bed.mesh.converged("gateways", gw_rv).await);
    assert!(bed.bed.mesh.converged("httproutes", rv).await);
    let a = send(&bed, "podinfo.example.com", "/", None).await;
    assert_eq!((a.status, a.version()), (200, "v1"), "{}", a.text);
    let entry = current_route_status(&bed, "web", "web").await;
    assert_eq!(route_condition(&entry, "Accepted"), ("True", "Accepted"));
    assert_eq!(entry["parentRef"]["kind"], "Gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_with_route_status_off_routes_by_http_routes_and_writes_no_status() {
    let bed = start_with(Duration::from_millis(100), false).await;
    install_gateway_api_crds(&bed).await;
    create(&bed, SERVICES, version_service("podinfo-a", "v1")).await;
    create(&bed, DEPLOYMENTS, deployment("podinfo", "v1", 1, json!([]))).await;
    create(&bed, DEPLOYMENTS, deployment("podinfo-v2", "v2", 1, json!([]))).await;
    wait_service_endpoints(&bed, "podinfo-a", 1, "").await;
    wait_ready_endpoints(&bed, 2, "").await;
    let rv = create(
        &bed,
        HTTP_ROUTES,
        json!({"metadata": {"name": "podinfo"}, "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "podinfo"}],
            "rules": [{"backendRefs": [{"name": "podinfo-a", "port": 80}]}]}}),
    )
    .await;
    assert!(bed.bed.mesh.converged("httproutes", rv).await);
    let answers = batch(&bed, 16).await;
    assert!(
        answers.iter().all(|a| a.status == 200 && a.version() == "v1"),
        "the route is served"
    );
    // Absence can only be watched for: a mesh writing status writes within moments of every proxy
    // holding the route (above); watch twenty times the propagation delay.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let object = get_route(&bed, "podinfo").await;
        assert!(
            object["status"]["parents"].as_array().is_none_or(Vec::is_empty),
            "status written: {}",
            object["status"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A sticky canary's cookie match: the `canary=always` cookie among any others.
const STICKY: &str = r"^(.*?;\s*)?canary=always(;.*)?$";

/// Waits (at most 10 s) until every mirrored copy sent so far is answered, then reads the metrics.
async fn metrics_after_mirrors(bed: &Bed) -> String {
    tokio::time::timeout(Duration::from_secs(10), bed.bed.mesh.mirrors_done())
        .await
        .expect("the mirrored copies complete within 10 s");
    metrics(bed).await
}

/// How many requests pods of `workload` answered 200 for Service `service` (`reporter="destination"`),
/// and how many the proxies counted for them (`reporter="source"`).
fn counted(text: &str, service: &str, workload: &str) -> (f64, f64) {
    let count = |reporter: &str| {
        sample(
            text,
            "istio_requests_total",
            &[
                &format!(r#"reporter="{reporter}""#),
                &format!(r#"destination_service="{service}.test.svc.cluster.local""#),
                &format!(r#"destination_workload="{workload}""#),
                r#"response_code="200""#,
            ],
        )
        .unwrap_or(0.0)
    };
    (count("destination"), count("source"))
}

/// `n` requests to `podinfo.test`, without cookie: every answer must be a 200 from v1 (the primary),
/// whatever is mirrored.
async fn primary_batch(bed: &Bed, n: usize) -> Vec<Answer> {
    let answers = batch(bed, n).await;
    let wrong: Vec<_> = answers
        .iter()
        .filter(|a| a.status != 200 || a.version() != "v1")
        .map(|a| (a.status, a.version().to_owned(), a.text.clone()))
        .collect();
    assert!(wrong.is_empty(), "answers not from the primary: {wrong:?}");
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_service_mirrors_header_changes_and_cookie_matches_make_a_sticky_canary() {
    let bed = start(Duration::from_millis(200)).await;
    create(&bed, DEPLOYMENTS, deployment("podinfo", "v1", 1, json!([]))).await;
    create(&bed, DEPLOYMENTS, deployment("podinfo-v2", "v2", 1, json!([]))).await;
    wait_ready_endpoints(&bed, 2, "").await;
    let rv = create(
        &bed,
        RULES,
        json!({"metadata": {"name": "podinfo"}, "spec": {"host": "podinfo", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}),
    )
    .await;
    assert!(bed.bed.mesh.converged("destinationrules", rv).await);
    let sticky = json!({"name": "sticky", "match": [{"headers": {"cookie": {"regex": STICKY}}}],
        "route": [{"destination": {"host": "podinfo", "subset": "v2"}}],
        "headers": {"response": {"set": {"x-route": "sticky"}}}});
    let primary = |mirrors: Value| {
        let mut route = json!({"name": "primary",
            "route": [{"destination": {"host": "podinfo", "subset": "v1"},
                "headers": {"response": {"add": {"set-cookie": "canary=never; Path=/"}, "set": {"x-level": "destination"}}}}],
            "headers": {"response": {"add": {"x-level": "route"}, "remove": ["content-type"]}}});
        for (k, v) in mirrors.as_object().unwrap() {
            route[k] = v.clone();
        }
        json!([sticky, route])
    };
    let rv = create(
        &bed,
        ROUTES,
        json!({"metadata": {"name": "podinfo"}, "spec": {"hosts": ["podinfo"],
            "http": primary(json!({"mirror": {"host": "podinfo", "subset": "v2"}}))}}),
    )
    .await;
    assert!(bed.bed.mesh.converged("virtualservices", rv).await);

    // (a) `mirror`, 100 %: every answer from v1 with the headers of both levels (the destination's
    // first); every request copied to v2, counted by v2's pod only, never by the proxy.
    let answers = primary_batch(&bed, 40).await;
    for a in &answers {
        assert_eq!(a.header("set-cookie"), ["canary=never; Path=/"]);
        assert_eq!(a.header("x-level"), ["destination", "route"]);
        assert!(a.header("content-type").is_empty(), "removed: {:?}", a.headers);
        assert!(a.header("x-route").is_empty());
    }
    let text = metrics_after_mirrors(&bed).await;
    assert_eq!(
        counted(&text, "podinfo", "podinfo-v2"),
        (40.0, 0.0),
        "mirrored:\n{text}"
    );
    assert_eq!(counted(&text, "podinfo", "podinfo"), (40.0, 40.0), "served:\n{text}");
    assert!(text.contains("\nkubesim_mesh_mirrors_in_flight 0\n"), "{text}");

    // (b) The sticky cookie, among others: always v2, by the first route, which mirrors nothing.
    for cookie in ["canary=always", "session=1; canary=always", "a=1;canary=always; b=2"] {
        for _ in 0..4 {
            let a = send_with(&bed, "podinfo.test", "/", None, &[("cookie", cookie)]).await;
            assert_eq!((a.status, a.version()), (200, "v2"), "{cookie}: {}", a.text);
            assert_eq!(a.header("x-route"), ["sticky"]);
            assert!(a.header("set-cookie").is_empty());
            assert_eq!(a.header("content-type"), ["application/json"], "the pod's own");
        }
    }
    let a = send_with(&bed, "podinfo.test", "/", None, &[("cookie", "canary=never")]).await;
    assert_eq!(a.version(), "v1");
    let text = metrics_after_mirrors(&bed).await;
    // 40 + 12 copies and sticky requests, + the copy of the `canary=never` request.
    assert_eq!(counted(&text, "podinfo", "podinfo-v2"), (53.0, 12.0), "{text}");

    // (c) `mirrors`: 50 % to v2, and a copy to a host that is no Service, dropped.
    let rv = update(&bed, ROUTES, "podinfo", |vs| {
        vs["spec"]["http"] = primary(json!({"mirrors": [
            {"destination": {"host": "podinfo", "subset": "v2"}, "percentage": {"value": 50.0}},
            {"destination": {"host": "nothing"}}]}));
    })
    .await;
    assert!(bed.bed.mesh.converged("virtualservices", rv).await);
    let before = counted(&metrics_after_mirrors(&bed).await, "podinfo", "podinfo-v2");
    primary_batch(&bed, 200).await;
    let text = metrics_after_mirrors(&bed).await;
    let after = counted(&text, "podinfo", "podinfo-v2");
    let mirrored = after.0 - before.0;
    assert!((60.0..=140.0).contains(&mirrored), "{mirrored} of 200 mirrored at 50 %");
    assert_eq!(after.1, before.1, "copies are no source requests");
    assert_eq!(counted(&text, "podinfo", "podinfo").1, 241.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_route_filters_mirror_and_change_headers_and_cookie_matches_select_a_rule() {
    let bed = start(Duration::from_millis(200)).await;
    install_gateway_api_crds(&bed).await;
    create(&bed, SERVICES, version_service("podinfo-a", "v1")).await;
    create(&bed, SERVICES, version_service("podinfo-b", "v2")).await;
    create(&bed, DEPLOYMENTS, deployment("podinfo", "v1", 1, json!([]))).await;
    create(&bed, DEPLOYMENTS, deployment("podinfo-v2", "v2", 1, json!([]))).await;
    wait_service_endpoints(&bed, "podinfo-a", 1, "").await;
    wait_service_endpoints(&bed, "podinfo-b", 1, "").await;
    wait_ready_endpoints(&bed, 2, "").await;
    let response_filter = |ops: Value| json!({"type": "ResponseHeaderModifier", "responseHeaderModifier": ops});
    let sticky = json!({"matches": [{"headers": [{"type": "RegularExpression", "name": "Cookie", "value": STICKY}]}],
        "backendRefs": [{"name": "podinfo-b", "port": 80}],
        "filters": [response_filter(json!({"set": [{"name": "x-route", "value": "sticky"}]}))]});
    let rules = |mirrors: Value| {
        let mut filters = vec![response_filter(
            json!({"add": [{"name": "x-level", "value": "rule"}], "remove": ["content-type"]}),
        )];
        filters.extend(mirrors.as_array().unwrap().iter().cloned());
        json!([sticky, {"filters": filters, "backendRefs": [{"name": "podinfo-a", "port": 80, "filters": [
            response_filter(json!({"add": [{"name": "Set-Cookie", "value": "canary=never; Path=/"}],
                "set": [{"name": "x-level", "value": "backend"}]}))]}]}])
    };
    let mirror = |name: &str, share: Value| {
        let mut filter = json!({"type": "RequestMirror", "requestMirror": {"backendRef": {"name": name, "port": 80}}});
        for (k, v) in share.as_object().unwrap() {
            filter["requestMirror"][k] = v.clone();
        }
        filter
    };
    let rv = create(
        &bed,
        HTTP_ROUTES,
        json!({"metadata": {"name": "podinfo"}, "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "podinfo", "port": 80}],
            "rules": rules(json!([mirror("podinfo-b", json!({}))]))}}),
    )
    .await;
    assert!(bed.bed.mesh.converged("httproutes", rv).await);

    // (a) A RequestMirror without a share: every request copied to podinfo-b, counted by its pod only;
    // answers from podinfo-a with the backendRef's then the rule's response headers.
    let answers = primary_batch(&bed, 40).await;
    for a in &answers {
        assert_eq!(a.header("set-cookie"), ["canary=never; Path=/"]);
        assert_eq!(a.header("x-level"), ["backend", "rule"]);
        assert!(a.header("content-type").is_empty(), "removed: {:?}", a.headers);
    }
    let text = metrics_after_mirrors(&bed).await;
    assert_eq!(
        counted(&text, "podinfo-b", "podinfo-v2"),
        (40.0, 0.0),
        "mirrored:\n{text}"
    );
    assert_eq!(counted(&text, "podinfo-a", "podinfo"), (40.0, 40.0), "served:\n{text}");
    let entry = current_route_status(&bed, "podinfo", "podinfo").await;
    assert_eq!(route_condition(&entry, "ResolvedRefs"), ("True", "ResolvedRefs"));

    // (b) The sticky cookie selects the rule with the header match.
    for cookie in ["canary=always", "session=1; canary=always"] {
        for _ in 0..4 {
            let a = send_with(&bed, "podinfo.test", "/", None, &[("cookie", cookie)]).await;
            assert_eq!((a.status, a.version()), (200, "v2"), "{cookie}: {}", a.text);
            assert_eq!(a.header("x-route"), ["sticky"]);
            assert!(a.header("set-cookie").is_empty());
        }
    }
    let a = send_with(&bed, "podinfo.test", "/", None, &[("cookie", "canary=alwaysx")]).await;
    assert_eq!(a.version(), "v1");
    let text = metrics_after_mirrors(&bed).await;
    // 40 + 8 copies and sticky requests, + the copy of the `canary=alwaysx` request.
    assert_eq!(counted(&text, "podinfo-b", "podinfo-v2"), (49.0, 8.0), "{text}");

    // (c) Half the requests by `fraction`, and a mirror to a Service that does not exist: its copies
    // are dropped, and the route's refs do not resolve.
    let rv = update(&bed, HTTP_ROUTES, "podinfo", |r| {
        r["spec"]["rules"] = rules(json!([
            mirror("podinfo-b", json!({"fraction": {"numerator": 1, "denominator": 2}})),
            mirror("podinfo-c", json!({"percent": 100}))
        ]));
    })
    .await;
    assert!(bed.bed.mesh.converged("httproutes", rv).await);
    let before = counted(&metrics_after_mirrors(&bed).await, "podinfo-b", "podinfo-v2");
    primary_batch(&bed, 200).await;
    let text = metrics_after_mirrors(&bed).await;
    let after = counted(&text, "podinfo-b", "podinfo-v2");
    let mirrored = after.0 - before.0;
    assert!((60.0..=140.0).contains(&mirrored), "{mirrored} of 200 mirrored at 1/2");
    assert_eq!(after.1, before.1, "copies are no source requests");
    assert_eq!(counted(&text, "podinfo-a", "podinfo").1, 241.0, "{text}");
    let entry = current_route_status(&bed, "podinfo", "podinfo").await;
    assert_eq!(route_condition(&entry, "ResolvedRefs"), ("False", "BackendNotFound"));
}
