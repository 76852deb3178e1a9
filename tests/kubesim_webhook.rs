//! The webhook as a cluster calls it: `deploy/` applied to kubesim with the real kubectl, kubesim
//! calling turnout's webhook server through the MutatingWebhookConfiguration, and Deployment updates
//! made with kubectl in an opted-in namespace and in one that is not.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use kubesim::sim::{Config, Sim, admin};
use serde_json::Value;
use turnout::webhook::{Args, Server};

struct Env {
    _sim: Sim,
    dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Env {
    async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let sim = Sim::start(Config {
            pod_ready_delay: Duration::from_millis(100),
            ..Config::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        sim.write_kubeconfig(&dir.path().join("kubeconfig"), &admin().name)
            .unwrap();

        // turnout's webhook on its own certificates, for the name kubesim calls the Service by.
        let bundle = turnout::certs::generate(&["turnout-webhook.turnout-system.svc".into()]).unwrap();
        turnout::certs::write(&dir.path().join("certs"), &bundle, false).unwrap();
        let args = Args {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls_cert: dir.path().join("certs/tls.crt"),
            tls_key: dir.path().join("certs/tls.key"),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            agent_username: Some("system:serviceaccount:turnout-system:turnout".into()),
            tls_reload_interval: Duration::from_secs(10),
            max_body_bytes: 4 << 20,
            header_read_timeout: Duration::from_secs(10),
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(1),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = Server::start(&args, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        sim.webhooks
            .route_service("turnout-system", "turnout-webhook", server.addr);
        let env = Self {
            _sim: sim,
            dir,
            _stop: stop,
        };

        // Install as the README says: the manifests, then the caBundle.
        let root = env!("CARGO_MANIFEST_DIR");
        env.ok(&["apply", "-k", &format!("{root}/deploy")]).await;
        let ca = base64::engine::general_purpose::STANDARD.encode(&bundle.ca_pem);
        let patch = format!(r#"[{{"op":"add","path":"/webhooks/0/clientConfig/caBundle","value":"{ca}"}}]"#);
        env.ok(&[
            "patch",
            "mutatingwebhookconfiguration",
            "turnout",
            "--type=json",
            "-p",
            &patch,
        ])
        .await;
        env
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Out {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl is installed");
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).await.unwrap();
        }
        drop(input);
        let out = child.wait_with_output().await.unwrap();
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        }
    }

    async fn ok(&self, args: &[&str]) -> Out {
        let out = self.kubectl(args, None).await;
        assert!(out.ok, "kubectl {args:?} failed:\n{}\n{}", out.stdout, out.stderr);
        out
    }

    async fn apply(&self, yaml: &str) -> Out {
        let out = self.kubectl(&["apply", "-f", "-"], Some(yaml)).await;
        assert!(out.ok, "apply failed:\n{}\n{}", out.stdout, out.stderr);
        out
    }

    async fn get(&self, ns: &str, what: &str) -> Value {
        serde_json::from_str(&self.ok(&["get", "-n", ns, what, "-o", "json"]).await.stdout).unwrap()
    }

    async fn namespace(&self, name: &str, opted_in: bool) {
        let labels = if opted_in {
            "\n  labels:\n    turnout.dev/rollout: enabled"
        } else {
            ""
        };
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n"
        ))
        .await;
    }

    async fn podinfo(&self, ns: &str) {
        let sample = format!(
            "{}/../shared/fixtures/podinfo/deployment.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        self.ok(&["apply", "-n", ns, "-f", &sample]).await;
    }
}

fn template_label(d: &Value, key: &str) -> Option<String> {
    d["spec"]["template"]["metadata"]["labels"][key]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_updates_in_an_opted_in_namespace_are_held_and_reverted() {
    let env = Env::start().await;
    env.namespace("test", true).await;
    env.podinfo("test").await;
    let d = env.get("test", "deployment/podinfo").await;
    assert_eq!(
        d["metadata"]["annotations"]["turnout.dev/revision"], "1",
        "stamped at CREATE"
    );
    assert_eq!(template_label(&d, "version").as_deref(), Some("v1"));

    let out = env
        .ok(&[
            "set",
            "image",
            "-n",
            "test",
            "deployment/podinfo",
            "podinfod=ghcr.io/stefanprodan/podinfo:6.1.0",
        ])
        .await;
    assert!(
        out.stderr.contains("Warning: turnout: release v2 of test/podinfo started; follow it with: kubectl rollout status deployment/podinfo -n test"),
        "kubectl shows turnout's warning: {}",
        out.stderr
    );
    let d = env.get("test", "deployment/podinfo").await;
    assert_eq!(d["spec"]["paused"], true, "held");
    assert_eq!(d["metadata"]["annotations"]["turnout.dev/stable-revision"], "1");
    assert_eq!(template_label(&d, "turnout.dev/revision").as_deref(), Some("2"));
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"], "ghcr.io/stefanprodan/podinfo:6.1.0",
        "the template as written"
    );
    let rs = env.get("test", "replicasets").await;
    assert_eq!(
        rs["items"].as_array().unwrap().len(),
        1,
        "a held Deployment starts no new ReplicaSet"
    );

    let out = env
        .ok(&[
            "set",
            "image",
            "-n",
            "test",
            "deployment/podinfo",
            "podinfod=ghcr.io/stefanprodan/podinfo:6.0.0",
        ])
        .await;
    assert!(out.stderr.contains("is back to stable v1"), "{}", out.stderr);
    let d = env.get("test", "deployment/podinfo").await;
    assert_ne!(d["spec"]["paused"], true, "unpaused");
    assert_eq!(template_label(&d, "turnout.dev/revision").as_deref(), Some("1"));
    env.ok(&["rollout", "status", "-n", "test", "deployment/podinfo", "--timeout=30s"])
        .await;
    let rs = env.get("test", "replicasets").await;
    assert_eq!(
        rs["items"].as_array().unwrap().len(),
        1,
        "the revert matches the running ReplicaSet: no pod restarts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_that_did_not_opt_in_is_left_alone() {
    let env = Env::start().await;
    env.namespace("plain", false).await;
    env.podinfo("plain").await;
    env.ok(&[
        "set",
        "image",
        "-n",
        "plain",
        "deployment/podinfo",
        "podinfod=ghcr.io/stefanprodan/podinfo:6.1.0",
    ])
    .await;
    let d = env.get("plain", "deployment/podinfo").await;
    assert!(d["metadata"]["annotations"].get("turnout.dev/revision").is_none());
    assert_ne!(d["spec"]["paused"], true);
}
