//! Shared by the tests that run turnout against kubesim: a cluster, the real kubectl against it, and
//! turnout's install as the README gives it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use kubesim::sim::{Config, Sim, admin};
use serde_json::Value;

/// The identity the agent runs as (deploy/'s ServiceAccount).
pub const AGENT_USER: &str = "system:serviceaccount:turnout-system:turnout";

pub struct Cluster {
    pub sim: Sim,
    pub dir: tempfile::TempDir,
}

pub struct Out {
    pub ok: bool,
    /// The exit code (-1 when killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Cluster {
    pub async fn start(config: Config) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let sim = Sim::start(config).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        sim.write_kubeconfig(&dir.path().join("kubeconfig"), &admin().name)
            .unwrap();
        sim.write_kubeconfig(&dir.path().join("agent.kubeconfig"), AGENT_USER)
            .unwrap();
        Self { sim, dir }
    }

    /// A kube client for `user` (e.g. [`AGENT_USER`], or `admin().name`).
    pub async fn client(&self, user: &str) -> kube::Client {
        let yaml = self.sim.kubeconfig(user).unwrap();
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&yaml).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    }

    /// The admin's kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The agent's kubeconfig (its ServiceAccount, bound by deploy/'s RBAC).
    pub fn agent_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("agent.kubeconfig")
    }

    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Out {
        self.run("kubectl", args, stdin).await
    }

    /// The `turnout` binary (as a person runs it, with the admin's kubeconfig).
    pub async fn turnout(&self, args: &[&str]) -> Out {
        self.run(env!("CARGO_BIN_EXE_turnout"), args, None).await
    }

    async fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Out {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} cannot run: {e}"));
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).await.unwrap();
        }
        drop(input);
        let out = child.wait_with_output().await.unwrap();
        Out {
            ok: out.status.success(),
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        }
    }

    pub async fn ok(&self, args: &[&str]) -> Out {
        let out = self.kubectl(args, None).await;
        assert!(out.ok, "kubectl {args:?} failed:\n{}\n{}", out.stdout, out.stderr);
        out
    }

    pub async fn apply(&self, yaml: &str) -> Out {
        let out = self.kubectl(&["apply", "-f", "-"], Some(yaml)).await;
        assert!(out.ok, "apply failed:\n{}\n{}", out.stdout, out.stderr);
        out
    }

    pub async fn get(&self, ns: &str, what: &str) -> Value {
        serde_json::from_str(&self.ok(&["get", "-n", ns, what, "-o", "json"]).await.stdout).unwrap()
    }

    pub async fn namespace(&self, name: &str, opted_in: bool) {
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

    /// The podinfo sample Deployment.
    pub async fn podinfo(&self, ns: &str) {
        let sample = format!(
            "{}/../shared/fixtures/podinfo/deployment.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        self.ok(&["apply", "-n", ns, "-f", &sample]).await;
    }

    /// Installs turnout as the README says: the manifests, then the caBundle; the webhook Service
    /// resolves to `webhook`.
    pub async fn install(&self, ca_pem: &[u8], webhook: std::net::SocketAddr) {
        self.sim
            .webhooks
            .route_service("turnout-system", "turnout-webhook", webhook);
        let root = env!("CARGO_MANIFEST_DIR");
        self.ok(&["apply", "-k", &format!("{root}/deploy")]).await;
        let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
        let patch = format!(r#"[{{"op":"add","path":"/webhooks/0/clientConfig/caBundle","value":"{ca}"}}]"#);
        self.ok(&[
            "patch",
            "mutatingwebhookconfiguration",
            "turnout",
            "--type=json",
            "-p",
            &patch,
        ])
        .await;
    }

    /// Applies the real Istio CRDs.
    pub async fn istio_crds(&self) {
        let dir = format!("{}/../shared/crds/istio", env!("CARGO_MANIFEST_DIR"));
        self.ok(&["apply", "-f", &dir]).await;
    }
}

pub fn template_label(d: &Value, key: &str) -> Option<String> {
    d["spec"]["template"]["metadata"]["labels"][key]
        .as_str()
        .map(str::to_owned)
}

/// Polls `check` until it gives a value or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
