//! The webhook server end to end, in process: HTTPS verified against the generated CA, HTTP/1.1
//! keep-alive and h2 by ALPN, certificate rotation, request limits, the admin port, graceful stop and
//! start-up errors. Every test starts its own server on random ports.

// A test stops at the first thing that is not as it expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use turnout::certs::Bundle;
use turnout::webhook::{Args, Server};

/// How long anything polled may take.
const DEADLINE: Duration = Duration::from_secs(10);
const RELOAD_INTERVAL: Duration = Duration::from_millis(50);
const H1: &[&[u8]] = &[b"http/1.1"];
const HELD: &str = r#"turnout_admission_requests_total{operation="UPDATE",outcome="held"}"#;
const RELOAD_FAILED: &str = r#"turnout_tls_reloads_total{result="failed"}"#;

// --- certificates and the server --------------------------------------------------------------------

fn bundle() -> Bundle {
    turnout::certs::generate(&["localhost".into(), "127.0.0.1".into()]).expect("certificates")
}

/// Writes through a temporary file and a rename, as a Secret update would, so the server never reads
/// half a file.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn write_pair(dir: &Path, bundle: &Bundle) {
    replace(&dir.join("tls.crt"), bundle.cert_pem.as_bytes());
    replace(&dir.join("tls.key"), bundle.key_pem.as_bytes());
}

fn args(dir: &Path) -> Args {
    let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Args {
        listen: any_port,
        tls_cert: dir.join("tls.crt"),
        tls_key: dir.join("tls.key"),
        admin_listen: any_port,
        agent_username: Some("system:serviceaccount:turnout-system:turnout".into()),
        tls_reload_interval: RELOAD_INTERVAL,
        max_body_bytes: 1 << 20,
        header_read_timeout: Duration::from_secs(5),
        drain_delay: Duration::ZERO,
        shutdown_timeout: Duration::from_secs(5),
    }
}

/// A started server, the certificates it serves, and the switch that stops it (dropping `stop` stops
/// the server too).
struct Running {
    server: Server,
    stop: oneshot::Sender<()>,
    dir: TempDir,
    bundle: Bundle,
}

async fn start(configure: impl FnOnce(&mut Args)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle();
    write_pair(dir.path(), &bundle);
    let mut args = args(dir.path());
    configure(&mut args);
    let (stop, stopped) = oneshot::channel::<()>();
    let server = Server::start(&args, async move {
        let _ = stopped.await;
    })
    .await
    .expect("the server starts");
    Running {
        server,
        stop,
        dir,
        bundle,
    }
}

/// Retries `attempt` until it yields a value, failing the test after [`DEADLINE`].
async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, mut attempt: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --- clients ----------------------------------------------------------------------------------------

/// A TLS connection to `addr` as "localhost", trusting only `ca_pem`, offering `alpn`.
async fn connect(addr: SocketAddr, ca_pem: &str, alpn: &[&[u8]]) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// An HTTP/1.1 connection over verified TLS, and the task driving it (it ends when the connection does).
async fn h1<B>(addr: SocketAddr, ca_pem: &str) -> (http1::SendRequest<B>, JoinHandle<hyper::Result<()>>)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = connect(addr, ca_pem, H1).await.expect("TLS handshake");
    let (sender, conn) = http1::handshake(TokioIo::new(tls)).await.expect("HTTP/1.1 handshake");
    (sender, tokio::spawn(conn))
}

/// Sends `req` once the connection is free and reads the whole response.
async fn exchange<B: Body + 'static>(sender: &mut http1::SendRequest<B>, req: Request<B>) -> (StatusCode, Bytes) {
    sender.ready().await.expect("the connection stays open");
    read(sender.send_request(req).await.expect("a response")).await
}

async fn read(response: Response<Incoming>) -> (StatusCode, Bytes) {
    let status = response.status();
    (
        status,
        response.into_body().collect().await.expect("the body").to_bytes(),
    )
}

fn request(method: &str, uri: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "localhost")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

fn post(body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    request("POST", "/mutate", body)
}

/// GET `path` on the plain-HTTP admin port.
async fn admin_get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let tcp = TcpStream::connect(addr).await.expect("the admin port accepts");
    let (mut sender, conn) = http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (status, body) = exchange(&mut sender, req).await;
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// The value of one series in an OpenMetrics text, e.g. `name_total{label="x"}`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

// --- admission reviews ------------------------------------------------------------------------------

/// podinfo at revision 1, as turnout stamped it, running `image`.
fn deployment(image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "podinfo",
            "namespace": "test",
            "labels": { "app": "podinfo" },
            "annotations": { "turnout.dev/revision": "1", "turnout.dev/version-stamped": "true" }
        },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "podinfo" } },
            "template": {
                "metadata": { "labels": { "app": "podinfo", "turnout.dev/revision": "1", "version": "v1" } },
                "spec": { "containers": [{ "name": "podinfod", "image": image }] }
            }
        }
    })
}

/// Alice changes podinfo's image: an update turnout holds as release 2.
fn image_update(uid: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": { "group": "apps", "version": "v1", "kind": "Deployment" },
            "resource": { "group": "apps", "version": "v1", "resource": "deployments" },
            "operation": "UPDATE",
            "namespace": "test",
            "name": "podinfo",
            "userInfo": { "username": "alice" },
            "object": deployment("ghcr.io/stefanprodan/podinfo:6.1.0"),
            "oldObject": deployment("ghcr.io/stefanprodan/podinfo:6.0.0"),
            "dryRun": false
        }
    })
}

fn body_of(review: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(review).unwrap())
}

/// Checks a held image update's response and returns the request's object with the patch applied.
fn assert_held(review: &Value, status: StatusCode, body: &[u8]) -> Value {
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(body));
    let answer: Value = serde_json::from_slice(body).expect("the response is JSON");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], review["request"]["uid"]);
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let encoded = response["patch"].as_str().expect("the patch is base64 text");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("the patch is valid base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("the patch is a JSON patch");
    let warnings = response["warnings"].as_array().expect("warnings");
    assert!(
        warnings.iter().any(|w| w
            .as_str()
            .is_some_and(|w| w.contains("kubectl rollout status deployment/podinfo -n test"))),
        "{warnings:?}"
    );
    let mut object = review["request"]["object"].clone();
    json_patch::patch(&mut object, &patch.0).expect("the patch applies to the request's object");
    object
}

// --- tests ------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_image_update_is_held_as_a_new_revision_and_keep_alive_serves_two_reviews_on_one_connection() {
    let running = start(|_| {}).await;
    let (mut conn, _) = h1(running.server.addr, &running.bundle.ca_pem).await;
    for uid in ["4b6c0a52-0001", "4b6c0a52-0002"] {
        let review = image_update(uid);
        let (status, body) = exchange(&mut conn, post(body_of(&review))).await;
        let patched = assert_held(&review, status, &body);
        assert_eq!(patched["spec"]["paused"], true);
        assert_eq!(patched["metadata"]["annotations"]["turnout.dev/revision"], "2");
        assert_eq!(
            patched["spec"]["template"]["metadata"]["labels"]["turnout.dev/revision"],
            "2"
        );
        assert_eq!(
            patched["spec"]["template"]["spec"]["containers"][0]["image"],
            "ghcr.io/stefanprodan/podinfo:6.1.0"
        );
    }
}

#[tokio::test]
async fn a_client_offering_only_h2_negotiates_h2_and_gets_a_review_answered() {
    let running = start(|_| {}).await;
    let tls = connect(running.server.addr, &running.bundle.ca_pem, &[b"h2"])
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    let review = image_update("h2-0001");
    let response = sender
        .send_request(request("POST", "https://localhost/mutate", body_of(&review)))
        .await
        .expect("a response");
    assert_eq!(response.version(), http::Version::HTTP_2);
    let (status, body) = read(response).await;
    assert_held(&review, status, &body);
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections_without_a_restart() {
    let running = start(|_| {}).await;
    let addr = running.server.addr;
    let old = running.bundle.clone();
    let new = bundle();
    assert!(
        connect(addr, &new.ca_pem, H1).await.is_err(),
        "the new CA is not trusted yet"
    );

    write_pair(running.dir.path(), &new);
    let ca = new.ca_pem.as_str();
    eventually("the new certificate to be served", || async move {
        connect(addr, ca, H1).await.ok()
    })
    .await;
    let error = connect(addr, &old.ca_pem, H1)
        .await
        .expect_err("a client trusting only the old CA is refused");
    assert!(error.to_string().contains("invalid peer certificate"), "{error}");

    let (mut conn, _) = h1(addr, &new.ca_pem).await;
    let (status, _) = exchange(&mut conn, request("GET", "/other", "")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, metrics) = admin_get(running.server.admin_addr, "/metrics").await;
    assert!(
        metric(&metrics, r#"turnout_tls_reloads_total{result="updated"}"#).is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_key_file_that_turns_to_garbage_keeps_the_last_good_pair_in_service() {
    let running = start(|_| {}).await;
    let (addr, admin) = (running.server.addr, running.server.admin_addr);
    replace(&running.dir.path().join("tls.key"), b"not a key\n");

    eventually("a failed reload to be counted", || async move {
        let (_, metrics) = admin_get(admin, "/metrics").await;
        metric(&metrics, RELOAD_FAILED)
    })
    .await;
    let (mut conn, _) = h1(addr, &running.bundle.ca_pem).await;
    let review = image_update("after-garbage");
    let (status, body) = exchange(&mut conn, post(body_of(&review))).await;
    assert_held(&review, status, &body);
}

#[tokio::test]
async fn a_body_that_is_not_a_v1_admission_review_is_refused_with_400() {
    let running = start(|_| {}).await;
    let (mut conn, _) = h1(running.server.addr, &running.bundle.ca_pem).await;
    let mut v1beta1 = image_update("beta");
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let cases = [
        (Bytes::from_static(br#"{"not":"a review"}"#), "AdmissionReview"),
        (Bytes::from_static(b"\x00 this is not JSON"), "not JSON"),
        (body_of(&v1beta1), "v1beta1"),
    ];
    for (body, mentions) in cases {
        let (status, answer) = exchange(&mut conn, post(body)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert!(answer.starts_with("turnout:"), "{answer}");
        assert!(answer.contains(mentions), "{answer:?} should mention {mentions:?}");
        if mentions == "v1beta1" {
            let expected = answer.replace("v1beta1", "");
            assert!(
                expected.contains("admission.k8s.io/v1"),
                "{answer:?} should name the version served"
            );
        }
    }
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_with_413_with_or_without_a_content_length() {
    let running = start(|args| args.max_body_bytes = 1024).await;
    let (addr, ca) = (running.server.addr, running.bundle.ca_pem.as_str());
    let oversized = Bytes::from(vec![b' '; 4096]);

    let (mut conn, _) = h1(addr, ca).await;
    let (status, body) = exchange(&mut conn, post(oversized.clone())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(String::from_utf8_lossy(&body).starts_with("turnout:"));

    // A body of unknown length is sent chunked, so the limit must hold while reading.
    let (mut tx, chunked) = http_body_util::channel::Channel::<Bytes>::new(1);
    tx.try_send(hyper::body::Frame::data(oversized)).unwrap();
    drop(tx);
    assert!(chunked.size_hint().exact().is_none());
    let req = Request::post("/mutate")
        .header(header::HOST, "localhost")
        .body(chunked)
        .unwrap();
    let (mut conn, _) = h1(addr, ca).await;
    let (status, body) = exchange(&mut conn, req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(String::from_utf8_lossy(&body).starts_with("turnout:"));
}

#[tokio::test]
async fn mutate_takes_only_post_and_other_paths_are_not_found() {
    let running = start(|_| {}).await;
    let (mut conn, _) = h1(running.server.addr, &running.bundle.ca_pem).await;
    let (status, _) = exchange(&mut conn, request("GET", "/mutate", "")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _) = exchange(&mut conn, request("GET", "/other", "")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_admin_port_reports_live_ready_and_the_metrics_of_a_held_review() {
    let running = start(|_| {}).await;
    let admin = running.server.admin_addr;
    assert_eq!(admin_get(admin, "/live").await.0, StatusCode::OK);
    assert_eq!(admin_get(admin, "/ready").await.0, StatusCode::OK);

    let (mut conn, _) = h1(running.server.addr, &running.bundle.ca_pem).await;
    let review = image_update("metrics");
    let (status, body) = exchange(&mut conn, post(body_of(&review))).await;
    assert_held(&review, status, &body);

    let (status, metrics) = admin_get(admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(metric(&metrics, HELD), Some(1.0), "{metrics}");
    assert_eq!(
        metric(&metrics, "turnout_admission_duration_seconds_count"),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn stopping_turns_unready_closes_idle_connections_and_releases_the_port() {
    let Running {
        server,
        stop,
        bundle,
        dir: _dir,
    } = start(|_| {}).await;
    let (addr, health) = (server.addr, server.health.clone());
    let (mut conn, driver) = h1(addr, &bundle.ca_pem).await;
    let (status, _) = exchange(&mut conn, request("GET", "/other", "")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    stop.send(()).expect("the server is running");
    eventually("readiness to turn off", || {
        let health = health.clone();
        async move { health.ready().is_err().then_some(()) }
    })
    .await;
    tokio::time::timeout(DEADLINE, server.wait())
        .await
        .expect("the server stops in time")
        .expect("the server task ends cleanly");
    tokio::time::timeout(DEADLINE, driver)
        .await
        .expect("the idle keep-alive connection is closed")
        .unwrap()
        .ok();
    let refused = TcpStream::connect(addr).await.expect_err("the port is closed");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn start_up_fails_naming_the_flag_and_file_of_an_unusable_certificate_pair() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (bundle(), bundle());
    write_pair(dir.path(), &a);

    let mut missing = args(dir.path());
    missing.tls_cert = dir.path().join("missing.crt");
    let error = Server::start(&missing, std::future::pending()).await.unwrap_err();
    let chain = turnout::report::chain(error.as_ref());
    assert!(chain.contains("--tls-cert"), "{chain}");
    assert!(chain.contains(&missing.tls_cert.display().to_string()), "{chain}");

    replace(&dir.path().join("tls.key"), b.key_pem.as_bytes());
    let mismatched = args(dir.path());
    let error = Server::start(&mismatched, std::future::pending()).await.unwrap_err();
    let chain = turnout::report::chain(error.as_ref());
    assert!(chain.contains("--tls-key"), "{chain}");
    assert!(chain.contains(&mismatched.tls_key.display().to_string()), "{chain}");
}
