//! `turnout status` on the real control plane, with the real kubectl setting up what the agent would have written.

// A test stops at the first thing that is not as it expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Output;

use common::Cluster;
use serde_json::Value;

async fn status(cluster: &Cluster, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
        .arg("status")
        .args(args)
        .env("KUBECONFIG", cluster.kubeconfig())
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_phase_weights_and_events_with_exit_codes_scripts_can_use() {
    let cluster = Cluster::start().await;
    cluster.istio_crds().await;
    cluster.gateway_api_crds().await;
    for ns in ["shop", "blog"] {
        cluster.namespace(ns, false).await;
        cluster.podinfo(ns).await;
        cluster
            .ok(&["annotate", "-n", ns, "deployment/podinfo", "turnout.dev/revision=2"])
            .await;
    }
    cluster
        .ok(&[
            "annotate",
            "-n",
            "shop",
            "deployment/podinfo",
            "turnout.dev/phase=Progressing",
            "turnout.dev/release=2",
            "turnout.dev/stable-revision=1",
            "turnout.dev/failed-checks=1",
            "turnout.dev/message=Halt advancement: success rate 53.4% < 99%",
        ])
        .await;
    let d = cluster.get("shop", "deployment/podinfo").await;
    let uid = d["metadata"]["uid"].as_str().unwrap();
    cluster
        .apply(&format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: podinfo
  namespace: shop
  labels: {{app.kubernetes.io/managed-by: turnout}}
  ownerReferences: [{{apiVersion: apps/v1, kind: Deployment, name: podinfo, uid: {uid}}}]
spec:
  hosts: [podinfo.shop.svc.cluster.local]
  http:
    - route:
        - {{destination: {{host: podinfo.shop.svc.cluster.local, subset: v1}}, weight: 80}}
        - {{destination: {{host: podinfo.shop.svc.cluster.local, subset: v2-canary}}, weight: 20}}
"
        ))
        .await;
    // blog's release moves traffic with Gateway API: the weights come from its HTTPRoute.
    let blog = cluster.get("blog", "deployment/podinfo").await;
    let blog_uid = blog["metadata"]["uid"].as_str().unwrap();
    cluster
        .ok(&[
            "annotate",
            "-n",
            "blog",
            "deployment/podinfo",
            "turnout.dev/phase=Progressing",
            "turnout.dev/release=2",
            "turnout.dev/stable-revision=1",
            "turnout.dev/routing=gateway-api",
            "turnout.dev/release-strategy=blue-green",
        ])
        .await;
    cluster
        .apply(&format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: podinfo
  namespace: blog
  labels: {{app.kubernetes.io/managed-by: turnout}}
  ownerReferences: [{{apiVersion: apps/v1, kind: Deployment, name: podinfo, uid: {blog_uid}}}]
spec:
  parentRefs: [{{group: '', kind: Service, name: podinfo}}]
  rules:
    - backendRefs:
        - {{name: podinfo-v1, port: 9898, weight: 75}}
        - {{name: podinfo-v2-canary, port: 9898, weight: 25}}
"
        ))
        .await;
    cluster
        .apply(&format!(
            "apiVersion: v1
kind: Event
metadata: {{name: podinfo.advance, namespace: shop}}
involvedObject: {{apiVersion: apps/v1, kind: Deployment, name: podinfo, namespace: shop, uid: {uid}}}
reason: Advance
message: Advance shop/podinfo canary weight 20
type: Normal
source: {{component: turnout}}
"
        ))
        .await;

    let out = status(&cluster, &["-n", "shop"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let row = text.lines().nth(1).unwrap();
    for cell in [
        "shop/podinfo",
        "Progressing",
        "v2",
        "v1",
        "v1=80,v2-canary=20",
        "Halt advancement",
    ] {
        assert!(row.contains(cell), "{cell} in {row:?}");
    }
    assert!(!text.contains("Events"), "no events in a list");

    let one = status(&cluster, &["podinfo", "-n", "shop"]).await;
    let text = String::from_utf8(one.stdout).unwrap();
    assert!(
        text.contains("Events:\n  Normal Advance: Advance shop/podinfo canary weight 20"),
        "{text}"
    );

    let json = status(&cluster, &["-A", "-o", "json"]).await;
    assert!(json.status.success());
    let all: Value = serde_json::from_slice(&json.stdout).unwrap();
    let names: Vec<String> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}/{} {}", r["namespace"], r["name"], r["phase"]))
        .collect();
    assert_eq!(
        names,
        [r#""blog"/"podinfo" "Progressing""#, r#""shop"/"podinfo" "Progressing""#]
    );
    assert_eq!(all[1]["weights"]["v2-canary"], 20);
    assert_eq!(all[0]["routing"], "gateway-api");
    assert_eq!(all[0]["strategy"], "blue-green");
    assert!(all[1].get("strategy").is_none(), "no strategy recorded: {}", all[1]);
    assert_eq!(all[0]["weights"], serde_json::json!({"v1": 75, "v2-canary": 25}));
    let blog = status(&cluster, &["-n", "blog"]).await;
    let text = String::from_utf8(blog.stdout).unwrap();
    assert!(text.contains("gateway-api  blue-green  v1=75,v2-canary=25"), "{text}");
    assert_eq!(all[1]["failed_checks"], 1);

    let missing = status(&cluster, &["nope", "-n", "shop"]).await;
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("deployment nope not found in namespace shop"));

    let usage = status(&cluster, &["-A", "-n", "shop"]).await;
    assert_eq!(usage.status.code(), Some(2), "-A and -n conflict");

    // As a kubectl plugin: `kubectl turnout ...` runs `kubectl-turnout` from the PATH.
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_turnout"), bin.path().join("kubectl-turnout")).unwrap();
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
    let plugin = tokio::process::Command::new(cluster.kubectl_path())
        .args(["turnout", "status", "-n", "shop"])
        .env("KUBECONFIG", cluster.kubeconfig())
        .env("PATH", path)
        .output()
        .await
        .unwrap();
    assert!(plugin.status.success(), "{}", String::from_utf8_lossy(&plugin.stderr));
    assert!(String::from_utf8_lossy(&plugin.stdout).contains("v1=80,v2-canary=20"));

    // --watch prints again when something changes.
    use tokio::io::AsyncBufReadExt as _;
    let mut watch = tokio::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args(["status", "-n", "shop", "--watch", "--interval", "100ms"])
        .env("KUBECONFIG", cluster.kubeconfig())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut next_row = async || loop {
        let line = tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line())
            .await
            .expect("--watch prints")
            .unwrap()
            .expect("--watch keeps running");
        if line.starts_with("shop/podinfo") {
            return line;
        }
    };
    assert!(next_row().await.contains("Progressing"));
    cluster
        .ok(&[
            "annotate",
            "-n",
            "shop",
            "deployment/podinfo",
            "--overwrite",
            "turnout.dev/phase=Promoting",
        ])
        .await;
    assert!(next_row().await.contains("Promoting"));
}

#[tokio::test]
async fn status_without_a_cluster_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
        .arg("status")
        .env("KUBECONFIG", dir.path().join("missing"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no Kubernetes client configuration"));
}
