//! Shared by the tests that run turnout on the test bed: the real control plane (one per test binary,
//! started on first use), the pinned kubectl against it, and turnout's install as the README gives it.
//!
//! Tests in one binary share the control plane and keep to their own namespaces. A test that installs
//! turnout's webhook, runs an agent or restarts the API server takes the bed for itself
//! ([`Cluster::exclusive`]); the others run side by side ([`Cluster::start`]).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

/// The identity the agent runs as (deploy/'s ServiceAccount).
pub const AGENT_USER: &str = "system:serviceaccount:turnout-system:turnout";

/// The test bed of this test binary, running on a thread of its own (so it outlives each test's
/// runtime; its processes end with the binary).
pub struct Bed {
    pub dir: PathBuf,
    /// Where the pinned kubectl (and the control plane) are.
    pub bin: PathBuf,
    pub api_url: String,
    pub admin_kubeconfig: String,
    pub mesh_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    handle: tokio::runtime::Handle,
    testbed: Arc<tokio::sync::Mutex<kubesim::testbed::Testbed>>,
}

static BED: OnceLock<Bed> = OnceLock::new();
/// (pod readiness delay, largest propagation delay, audit log) of the bed, if set before it starts.
static SETTINGS: OnceLock<(Duration, Duration, bool)> = OnceLock::new();

/// Sets the bed's pod readiness delay and its proxies' largest propagation delay (default 200 ms and
/// 500 ms), and whether the API server writes an audit log ([`Bed::audit_log`]); only before the bed
/// starts.
pub fn configure(pod_ready_delay: Duration, max_propagation_delay: Duration, audit: bool) {
    assert!(
        SETTINGS.set((pod_ready_delay, max_propagation_delay, audit)).is_ok() && BED.get().is_none(),
        "configure() comes before the bed starts"
    );
}

impl Bed {
    /// The API server's audit log (with [`configure`]'s `audit`): one JSON object per request.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("logs/audit.log")
    }
}
static TURNS: OnceLock<tokio::sync::RwLock<()>> = OnceLock::new();

/// Removes the directories of test beds whose process has ended.
fn sweep(tmp: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("turnout-testbed-")
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn bed() -> &'static Bed {
    BED.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tmp = std::env::temp_dir();
        sweep(&tmp);
        let dir = tmp.join(format!("turnout-testbed-{}", std::process::id()));
        let mut config = kubesim::testbed::config(&dir);
        let (ready, propagation, audit) =
            *SETTINGS.get_or_init(|| (Duration::from_millis(200), Duration::from_millis(500), false));
        config.node.pod_ready_delay = ready;
        config.mesh.max_propagation_delay = propagation;
        config.control_plane.audit = audit;
        let bin = config.control_plane.bin_dir.clone();
        kubesim::testbed::ensure_built(&bin).expect("the control plane builds (hack/k8s/build.sh)");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("testbed".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the test bed");
                rt.block_on(async move {
                    match kubesim::testbed::Testbed::start(&config).await {
                        Ok(testbed) => {
                            let _ = tx.send(Ok((testbed, tokio::runtime::Handle::current())));
                            // Serve the bed's tasks (node agent, mesh) until the binary exits.
                            std::future::pending::<()>().await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(kubesim::report(&e)));
                        }
                    }
                });
            })
            .expect("a thread for the test bed");
        let (testbed, handle) = rx
            .recv()
            .expect("the test bed thread answers")
            .unwrap_or_else(|e| panic!("the test bed does not start: {e}"));
        Bed {
            dir,
            bin,
            api_url: testbed.control_plane.api_url.clone(),
            admin_kubeconfig: testbed.control_plane.admin_kubeconfig(),
            mesh_addr: testbed.mesh_addr(),
            metrics_addr: testbed.metrics_addr(),
            handle,
            testbed: Arc::new(tokio::sync::Mutex::new(testbed)),
        }
    })
}

pub struct Cluster {
    pub bed: &'static Bed,
    /// This test's own files (certificates, logs, kubeconfigs).
    pub dir: tempfile::TempDir,
    _turn: Turn,
}

enum Turn {
    Shared(tokio::sync::RwLockReadGuard<'static, ()>),
    Exclusive(tokio::sync::RwLockWriteGuard<'static, ()>),
}

pub struct Out {
    pub ok: bool,
    /// The exit code (-1 when killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Cluster {
    /// The bed, beside the other tests of this binary that share it.
    pub async fn start() -> Self {
        let turns = TURNS.get_or_init(|| tokio::sync::RwLock::new(()));
        let turn = Turn::Shared(turns.read().await);
        Self::with(turn)
    }

    /// The bed for this test alone (it installs turnout, runs an agent or restarts the API server).
    pub async fn exclusive() -> Self {
        let turns = TURNS.get_or_init(|| tokio::sync::RwLock::new(()));
        let turn = Turn::Exclusive(turns.write().await);
        Self::with(turn)
    }

    fn with(turn: Turn) -> Self {
        let bed = tokio::task::block_in_place(bed);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kubeconfig"), &bed.admin_kubeconfig).unwrap();
        Self { bed, dir, _turn: turn }
    }

    /// A kube client for the admin.
    pub async fn admin_client(&self) -> kube::Client {
        kubesim::cluster::client_from_yaml(&self.bed.admin_kubeconfig)
            .await
            .unwrap()
    }

    /// A kube client for the agent's ServiceAccount (after [`Cluster::install`]).
    pub async fn agent_client(&self) -> kube::Client {
        let yaml = std::fs::read_to_string(self.agent_kubeconfig()).expect("install() wrote the agent's kubeconfig");
        kubesim::cluster::client_from_yaml(&yaml).await.unwrap()
    }

    /// The admin's kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The agent's kubeconfig: a token of its ServiceAccount (written by [`Cluster::install`]).
    pub fn agent_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("agent.kubeconfig")
    }

    /// Where requests enter the mesh.
    pub fn mesh_addr(&self) -> SocketAddr {
        self.bed.mesh_addr
    }

    /// Where the mesh's Istio metrics are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.bed.metrics_addr
    }

    /// The pinned kubectl.
    pub fn kubectl_path(&self) -> PathBuf {
        self.bed.bin.join("kubectl")
    }

    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Out {
        let kubectl = self.kubectl_path();
        self.run(kubectl.to_str().unwrap(), args, stdin).await
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

    /// Creates a namespace (opted in or not) and waits for its `default` ServiceAccount, without which
    /// the API server admits no pod.
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
        eventually(
            Duration::from_secs(30),
            &format!("the default ServiceAccount of {name}"),
            || async {
                self.kubectl(&["get", "serviceaccount", "default", "-n", name], None)
                    .await
                    .ok
                    .then_some(())
            },
        )
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

    /// Installs turnout as the README says (`kubectl apply -k deploy/`, the caBundle), pointed at a
    /// turnout process of this test:
    /// - the webhook registration is deploy/'s own, with its client config set to `url: https://WEBHOOK/mutate`
    ///   (the API server has no cluster network to reach the Service through);
    /// - deploy/'s Deployment is scaled to 0 (this test's process stands in for its pods);
    /// - the agent's kubeconfig holds a token of deploy/'s ServiceAccount from `kubectl create token`,
    ///   so deploy/'s RBAC is what the real authorizer enforces.
    pub async fn install(&self, ca_pem: &[u8], webhook: SocketAddr) {
        assert!(
            matches!(self._turn, Turn::Exclusive(_)),
            "install() needs Cluster::exclusive()"
        );
        let root = env!("CARGO_MANIFEST_DIR");
        // An earlier test's registration points at its URL; applying deploy/ over it would ask for both.
        self.ok(&[
            "delete",
            "mutatingwebhookconfiguration",
            "turnout",
            "--ignore-not-found",
        ])
        .await;
        self.ok(&["apply", "-k", &format!("{root}/deploy")]).await;
        let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
        let patch = format!(
            r#"[{{"op":"replace","path":"/webhooks/0/clientConfig","value":{{"url":"https://{webhook}/mutate","caBundle":"{ca}"}}}}]"#
        );
        self.patch_webhook(&patch).await;
        self.ok(&["scale", "-n", "turnout-system", "deployment/turnout", "--replicas=0"])
            .await;
        let token = self
            .ok(&["create", "token", "turnout", "-n", "turnout-system", "--duration=24h"])
            .await
            .stdout;
        let yaml = {
            let plane = self.bed.testbed.lock().await;
            plane.control_plane.kubeconfig_with_token(AGENT_USER, token.trim())
        };
        std::fs::write(self.agent_kubeconfig(), yaml).unwrap();
    }

    /// Applies a JSON patch to turnout's webhook registration.
    pub async fn patch_webhook(&self, patch: &str) {
        self.ok(&[
            "patch",
            "mutatingwebhookconfiguration",
            "turnout",
            "--type=json",
            "-p",
            patch,
        ])
        .await;
    }

    /// Applies the real Istio CRDs and waits until they are served.
    pub async fn istio_crds(&self) {
        self.crds(
            "istio",
            &[
                "virtualservices.networking.istio.io",
                "destinationrules.networking.istio.io",
            ],
        )
        .await;
    }

    /// Applies the real Gateway API CRDs and waits until they are served.
    pub async fn gateway_api_crds(&self) {
        self.crds(
            "gateway-api",
            &[
                "gatewayclasses.gateway.networking.k8s.io",
                "gateways.gateway.networking.k8s.io",
                "httproutes.gateway.networking.k8s.io",
            ],
        )
        .await;
    }

    /// Applies the CRDs of `../shared/crds/<dir>` and waits until `names` are served.
    async fn crds(&self, dir: &str, names: &[&str]) {
        let dir = format!("{}/../shared/crds/{dir}", env!("CARGO_MANIFEST_DIR"));
        // Server-side: the Gateway API CRDs are too large for the last-applied annotation.
        self.ok(&["apply", "--server-side", "--force-conflicts", "-f", &dir])
            .await;
        // Polled rather than `kubectl wait`, which fails when it reads a CRD before it has conditions.
        for crd in names {
            eventually(Duration::from_secs(60), &format!("{crd} established"), || async {
                let out = self
                    .kubectl(
                        &[
                            "get",
                            "crd",
                            crd,
                            "-o",
                            r#"jsonpath={.status.conditions[?(@.type=="Established")].status}"#,
                        ],
                        None,
                    )
                    .await;
                (out.stdout.trim() == "True").then_some(())
            })
            .await;
        }
    }

    /// Kills the API server and starts it again (etcd keeps every object); the bed must be exclusive.
    pub async fn restart_apiserver(&self) {
        assert!(matches!(self._turn, Turn::Exclusive(_)));
        let testbed = self.bed.testbed.clone();
        self.bed
            .handle
            .spawn(async move { testbed.lock().await.control_plane.restart_apiserver().await })
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("the API server does not come back: {}", kubesim::report(&e)));
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
