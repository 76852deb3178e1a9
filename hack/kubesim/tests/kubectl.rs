//! Conformance: the real kubectl against kubesim, command by command, as a user would type them.

use std::path::PathBuf;
use std::time::Duration;

use kubesim::sim::{Config, Sim, admin};

struct Cluster {
    sim: Sim,
    dir: tempfile::TempDir,
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Cluster {
    async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = Config {
            pod_ready_delay: Duration::from_millis(100),
            ..Config::default()
        };
        let sim = Sim::start(config).await.expect("kubesim starts");
        let dir = tempfile::tempdir().unwrap();
        sim.write_kubeconfig(&dir.path().join("kubeconfig"), &admin().name)
            .unwrap();
        Self { sim, dir }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    async fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Out {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new("kubectl");
        cmd.args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl is installed");
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).await.unwrap();
        }
        drop(input);
        let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
            .await
            .expect("kubectl finished")
            .unwrap();
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        }
    }

    async fn kubectl(&self, args: &[&str]) -> Out {
        self.kubectl_stdin(args, None).await
    }

    /// Runs kubectl and fails the test with its output if it fails.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args).await;
        assert!(out.ok, "kubectl {args:?} failed:\n{}\n{}", out.stdout, out.stderr);
        out.stdout
    }

    async fn apply(&self, yaml: &str) -> String {
        let out = self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml)).await;
        assert!(out.ok, "apply failed:\n{}\n{}", out.stdout, out.stderr);
        out.stdout
    }

    /// Polls `kubectl args` until its output satisfies `pred`, for up to 30 s.
    async fn eventually(&self, args: &[&str], pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.kubectl(args).await;
            if out.ok && pred(&out.stdout) {
                return out.stdout;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "kubectl {args:?} never satisfied the condition; last: {}{}",
                out.stdout,
                out.stderr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn shared(path: &str) -> String {
    format!("{}/../../../shared/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn web(name: &str, replicas: u32, image: &str, extra_env: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: {replicas}
  progressDeadlineSeconds: 3
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
      - name: app
        image: {image}
        env: [{extra_env}]
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_get_describe_and_delete_the_podinfo_sample() {
    let c = Cluster::start().await;
    let out = c
        .ok(&["apply", "-f", &shared("fixtures/podinfo/deployment.yaml")])
        .await;
    assert!(out.contains("deployment.apps/podinfo created"), "{out}");
    let out = c
        .ok(&["apply", "-f", &shared("fixtures/podinfo/deployment.yaml")])
        .await;
    assert!(
        out.contains("deployment.apps/podinfo unchanged") || out.contains("configured"),
        "{out}"
    );
    let json = c.ok(&["get", "deployment", "podinfo", "-o", "json"]).await;
    let d: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/stefanprodan/podinfo:6.0.0"
    );
    assert_eq!(d["metadata"]["generation"], 1);
    assert!(
        c.ok(&["get", "deploy", "podinfo", "-o", "yaml"])
            .await
            .contains("kind: Deployment")
    );
    let image = c
        .ok(&[
            "get",
            "deploy",
            "podinfo",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}",
        ])
        .await;
    assert_eq!(image, "ghcr.io/stefanprodan/podinfo:6.0.0");
    let table = c.ok(&["get", "deploy"]).await;
    assert!(
        table.starts_with("NAME") && table.contains("READY") && table.contains("podinfo"),
        "{table}"
    );
    let described = c.ok(&["describe", "deployment", "podinfo"]).await;
    assert!(
        described.contains("Replicas:") && described.contains("podinfod"),
        "{described}"
    );
    c.eventually(&["get", "pods", "-l", "app=podinfo", "-o", "name"], |o| {
        o.lines().count() == 1
    })
    .await;
    assert!(c.ok(&["delete", "deployment", "podinfo"]).await.contains("deleted"));
    // Garbage collection takes the ReplicaSet and its pods.
    c.eventually(&["get", "rs,pods", "-o", "name"], str::is_empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_image_scale_label_annotate_and_every_patch_type() {
    let c = Cluster::start().await;
    c.apply(&web("web", 2, "web:1", "")).await;
    c.ok(&["rollout", "status", "deployment/web", "--timeout=30s"]).await;
    c.ok(&["set", "image", "deployment/web", "app=web:2"]).await;
    let status = c.ok(&["rollout", "status", "deployment/web", "--timeout=30s"]).await;
    assert!(status.contains("successfully rolled out"), "{status}");
    assert_eq!(c.ok(&["get", "rs", "-o", "name"]).await.lines().count(), 2);
    c.ok(&["scale", "deployment/web", "--replicas=3"]).await;
    c.eventually(
        &["get", "deploy", "web", "-o", "jsonpath={.status.readyReplicas}"],
        |o| o == "3",
    )
    .await;
    c.ok(&["label", "deployment", "web", "team=payments"]).await;
    c.ok(&["annotate", "deployment", "web", "note=hello"]).await;
    c.ok(&[
        "patch",
        "deployment",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"minReadySeconds":1}}"#,
    ])
    .await;
    c.ok(&[
        "patch",
        "deployment",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/revisionHistoryLimit","value":4}]"#,
    ])
    .await;
    c.ok(&[
        "patch",
        "deployment",
        "web",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"app","env":[{"name":"A","value":"1"}]}]}}}}"#,
    ])
    .await;
    let d: serde_json::Value = serde_json::from_str(&c.ok(&["get", "deploy", "web", "-o", "json"]).await).unwrap();
    assert_eq!(d["metadata"]["labels"]["team"], "payments");
    assert_eq!(d["metadata"]["annotations"]["note"], "hello");
    assert_eq!(d["spec"]["minReadySeconds"], 1);
    assert_eq!(d["spec"]["revisionHistoryLimit"], 4);
    assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["image"], "web:2");
    assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["env"][0]["name"], "A");
    assert_eq!(d["spec"]["replicas"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_status_fails_when_the_progress_deadline_passes() {
    let c = Cluster::start().await;
    c.apply(&web(
        "stuck",
        1,
        "stuck:1",
        r#"{name: KUBESIM_NOT_READY, value: "true"}"#,
    ))
    .await;
    let out = c
        .kubectl(&["rollout", "status", "deployment/stuck", "--timeout=40s"])
        .await;
    assert!(!out.ok, "rollout status must fail: {}", out.stdout);
    assert!(out.stderr.contains("exceeded its progress deadline"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_restart_and_wait_for_jsonpath() {
    let c = Cluster::start().await;
    c.apply(&web("web", 1, "web:1", "")).await;
    c.ok(&[
        "wait",
        "--for=jsonpath={.status.readyReplicas}=1",
        "deployment/web",
        "--timeout=30s",
    ])
    .await;
    c.ok(&["rollout", "restart", "deployment/web"]).await;
    c.ok(&["rollout", "status", "deployment/web", "--timeout=30s"]).await;
    c.eventually(&["get", "rs", "-o", "name"], |o| o.lines().count() == 2)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_deployment_starts_no_new_replicaset_but_still_scales() {
    let c = Cluster::start().await;
    c.apply(&web("web", 1, "web:1", "")).await;
    c.ok(&["rollout", "status", "deployment/web", "--timeout=30s"]).await;
    c.ok(&["rollout", "pause", "deployment/web"]).await;
    c.ok(&["set", "image", "deployment/web", "app=web:2"]).await;
    c.ok(&["scale", "deployment/web", "--replicas=2"]).await;
    c.eventually(
        &["get", "deploy", "web", "-o", "jsonpath={.status.readyReplicas}"],
        |o| o == "2",
    )
    .await;
    assert_eq!(
        c.ok(&["get", "rs", "-o", "name"]).await.lines().count(),
        1,
        "no new ReplicaSet while paused"
    );
    let reason = c
        .ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Progressing")].reason}"#,
        ])
        .await;
    assert_eq!(reason, "DeploymentPaused");
    c.ok(&["rollout", "resume", "deployment/web"]).await;
    c.ok(&["rollout", "status", "deployment/web", "--timeout=30s"]).await;
    assert_eq!(c.ok(&["get", "rs", "-o", "name"]).await.lines().count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generators_that_send_protobuf_get_a_clear_answer() {
    let c = Cluster::start().await;
    let out = c.kubectl(&["create", "namespace", "test"]).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("kubesim reads JSON only"), "{}", out.stderr);
    c.apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: test\n")
        .await;
    assert!(
        c.ok(&["get", "ns", "test", "-o", "name"])
            .await
            .contains("namespace/test")
    );
    let _ = &c.sim;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_istio_and_gateway_crds_serve_validated_custom_resources() {
    let c = Cluster::start().await;
    for crd in [
        "crds/istio/virtualservices.yaml",
        "crds/istio/destinationrules.yaml",
        "crds/gateway-api/httproutes.yaml",
    ] {
        c.ok(&["apply", "-f", &shared(crd)]).await;
    }
    let vs = |weight: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: podinfo
spec:
  hosts: [podinfo]
  http:
  - route:
    - destination: {{host: podinfo, subset: v1}}
      weight: {weight}
    - destination: {{host: podinfo, subset: v2}}
      weight: 10
"
        )
    };
    c.apply(&vs("90")).await;
    let got = c
        .ok(&[
            "get",
            "virtualservice",
            "podinfo",
            "-o",
            "jsonpath={.spec.http[0].route[1].destination.subset}",
        ])
        .await;
    assert_eq!(got, "v2");
    assert!(
        c.ok(&["get", "vs"]).await.contains("podinfo"),
        "short names and printer columns"
    );
    let bad = c.kubectl_stdin(&["apply", "-f", "-"], Some(&vs("fifty"))).await;
    assert!(!bad.ok);
    assert!(
        bad.stderr.contains("spec.http[0].route[0].weight") && bad.stderr.contains("must be of type integer"),
        "{}",
        bad.stderr
    );
    // Strategic merge is for built-in types only, as upstream.
    let smp = c
        .kubectl(&[
            "patch",
            "vs",
            "podinfo",
            "--type=strategic",
            "-p",
            r#"{"spec":{"hosts":["x"]}}"#,
        ])
        .await;
    assert!(!smp.ok, "strategic merge of a custom resource is refused");
    assert!(
        smp.stderr.contains("unknown format") || smp.stderr.contains("UnsupportedMediaType"),
        "{}",
        smp.stderr
    );
    c.ok(&[
        "patch",
        "vs",
        "podinfo",
        "--type=merge",
        "-p",
        r#"{"spec":{"hosts":["podinfo.test.svc.cluster.local"]}}"#,
    ])
    .await;
    c.ok(&["delete", "crd", "virtualservices.networking.istio.io"]).await;
    let gone = c.kubectl(&["get", "vs"]).await;
    assert!(!gone.ok, "the resource is no longer served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_can_do_what_its_rbac_grants_and_nothing_else() {
    let c = Cluster::start().await;
    c.apply(
        "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: reader}
rules:
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: reader}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: reader}
subjects:
- {kind: ServiceAccount, name: bot, namespace: default}
",
    )
    .await;
    c.apply(&web("web", 1, "web:1", "")).await;
    let sa = c.dir.path().join("sa-kubeconfig");
    c.sim
        .write_kubeconfig(&sa, "system:serviceaccount:default:bot")
        .unwrap();
    let as_bot = |args: &[&str]| {
        let mut cmd = std::process::Command::new("kubectl");
        cmd.args(args).env("KUBECONFIG", &sa);
        cmd.output().unwrap()
    };
    assert!(as_bot(&["get", "deploy", "web"]).status.success());
    let denied = as_bot(&["delete", "deploy", "web"]);
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        stderr.contains(
            "User \"system:serviceaccount:default:bot\" cannot delete resource \"deployments\" in API group \"apps\""
        ),
        "{stderr}"
    );
    assert!(!as_bot(&["get", "secrets"]).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_deadline_written_by_a_client_on_a_paused_deployment_is_kept_and_fails_rollout_status() {
    let c = Cluster::start().await;
    c.apply(&web("web", 1, "web:1", "")).await;
    c.ok(&["rollout", "status", "deployment/web", "--timeout=30s"]).await;
    c.ok(&["rollout", "pause", "deployment/web"]).await;
    c.eventually(
        &[
            "get",
            "deploy",
            "web",
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Progressing")].reason}"#,
        ],
        |o| o == "DeploymentPaused",
    )
    .await;
    // What turnout's agent writes when it rolls a release back.
    let status = r#"{"status":{"conditions":[{"type":"Progressing","status":"False","reason":"ProgressDeadlineExceeded","message":"turnout: rolled back: 3 failed checks"}]}}"#;
    c.ok(&[
        "patch",
        "deployment",
        "web",
        "--subresource=status",
        "--type=merge",
        "-p",
        status,
    ])
    .await;
    // A later controller pass (a scale triggers one) must not overwrite it with DeploymentPaused.
    c.ok(&["scale", "deployment/web", "--replicas=2"]).await;
    c.eventually(
        &["get", "deploy", "web", "-o", "jsonpath={.status.readyReplicas}"],
        |o| o == "2",
    )
    .await;
    let reason = c
        .ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Progressing")].reason}"#,
        ])
        .await;
    assert_eq!(reason, "ProgressDeadlineExceeded");
    let out = c
        .kubectl(&["rollout", "status", "deployment/web", "--timeout=10s"])
        .await;
    assert!(!out.ok);
    assert!(out.stderr.contains("exceeded its progress deadline"), "{}", out.stderr);
}
