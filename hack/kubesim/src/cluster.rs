//! The real Kubernetes control plane, run from binaries built from the Kubernetes Go modules
//! (`hack/k8s/build.sh`): etcd, kube-apiserver and kube-controller-manager as child processes on
//! loopback, with certificates made here (rcgen).
//!
//! ```text
//!  etcd (127.0.0.1:E, data in DIR/etcd) ◀── kube-apiserver (https://127.0.0.1:A, RBAC, default admission)
//!                                                ▲            ▲
//!                             kube-controller-manager    kubectl / kube-rs (DIR/kubeconfig: system:masters)
//!                             (deployment, replicaset, GC, namespace, serviceaccount(-token), endpointslice)
//! ```
//!
//! Every child is started with `PR_SET_PDEATHSIG`, so a test binary that exits (or is killed) takes its
//! control plane with it; [`ControlPlane`] kills them when dropped. The API server can be restarted in
//! place ([`ControlPlane::restart_apiserver`]): etcd keeps the data.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::pki::{Ca, Pair, PkiError};

/// The identity with every right (`O=system:masters`).
pub const ADMIN: &str = "kubernetes-admin";
/// The group the API server exempts from authorization.
pub const MASTERS: &str = "system:masters";
/// The range Services get their cluster IPs from.
pub const SERVICE_CIDR: &str = "10.0.0.0/24";

/// Options of a control plane.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where etcd, kube-apiserver, kube-controller-manager (and kubectl) are.
    pub bin_dir: PathBuf,
    /// Where certificates, etcd's data, logs and kubeconfigs go (created if missing).
    pub dir: PathBuf,
    /// Port of the API server (0: any free port).
    pub api_port: u16,
    /// How long to wait for each component to be ready.
    pub ready_timeout: Duration,
    /// Write the API server's audit log (every request's metadata, one JSON line each) to
    /// `DIR/logs/audit.log`: who made which requests.
    pub audit: bool,
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{binary} is missing; build the control plane with hack/k8s/build.sh")]
    Missing { binary: PathBuf },
    #[error("cannot make certificates")]
    Pki(#[from] PkiError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find a free port")]
    Port(#[source] std::io::Error),
    #[error("cannot start {what}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} exited ({status}) before it was ready; the end of its log ({log}):\n{tail}")]
    Exited {
        what: &'static str,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{what} is not ready after {timeout:?}; the end of its log ({log}):\n{tail}")]
    NotReady {
        what: &'static str,
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
}

/// A child process killed when dropped; its output goes to a log file.
#[derive(Debug)]
struct Process {
    what: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(what: &'static str, binary: &Path, args: &[String], log: PathBuf) -> Result<Self, ClusterError> {
        if !binary.is_file() {
            return Err(ClusterError::Missing {
                binary: binary.to_owned(),
            });
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|source| ClusterError::Write {
                path: log.clone(),
                source,
            })?;
        let err = file.try_clone().map_err(|source| ClusterError::Write {
            path: log.clone(),
            source,
        })?;
        let mut command = Command::new(binary);
        command.args(args).stdin(Stdio::null()).stdout(file).stderr(err);
        die_with_parent(&mut command);
        let child = command.spawn().map_err(|source| ClusterError::Spawn { what, source })?;
        Ok(Self { what, child, log })
    }

    fn tail(&self) -> String {
        tail(&self.log, 30)
    }

    /// `Err` if the process has exited.
    fn alive(&mut self) -> Result<(), ClusterError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(ClusterError::Exited {
                what: self.what,
                status: status.to_string(),
                log: self.log.clone(),
                tail: self.tail(),
            }),
            _ => Ok(()),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Children get SIGKILL when the thread that started them ends (the process, for the threads that
/// start control planes here), so nothing outlives a test binary.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn free_port() -> Result<u16, ClusterError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(ClusterError::Port)?;
    Ok(listener.local_addr().map_err(ClusterError::Port)?.port())
}

fn write(path: &Path, text: &str) -> Result<(), ClusterError> {
    std::fs::write(path, text).map_err(|source| ClusterError::Write {
        path: path.to_owned(),
        source,
    })
}

/// A running control plane; stops when dropped.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub bin_dir: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub api_url: String,
    pub api_addr: SocketAddr,
    /// The CA of the API server's serving certificate and of client certificates.
    pub ca: Ca,
    admin: Pair,
    etcd: Process,
    apiserver: Process,
    apiserver_args: Vec<String>,
    controller_manager: Process,
    ready_timeout: Duration,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("dir", &self.dir)
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager and waits until each is ready.
    ///
    /// # Errors
    ///
    /// A binary is missing, a file cannot be written, or a component exits or is not ready in time
    /// (the error carries the end of its log).
    pub async fn start(options: &Options) -> Result<Self, ClusterError> {
        let dir = options.dir.clone();
        for sub in ["pki", "logs", "etcd"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| ClusterError::Write { path, source })?;
        }
        let bin = |name: &str| options.bin_dir.join(name);
        for name in ["etcd", "kube-apiserver", "kube-controller-manager"] {
            if !bin(name).is_file() {
                return Err(ClusterError::Missing { binary: bin(name) });
            }
        }

        // Certificates: one CA for serving and clients, the admin, the service-account signing key.
        let pki = dir.join("pki");
        let ca = Ca::generate()?;
        ca.save(&pki)?;
        let serving = ca.serving(&[
            "127.0.0.1".into(),
            "localhost".into(),
            "10.0.0.1".into(),
            "kubernetes".into(),
            "kubernetes.default".into(),
            "kubernetes.default.svc".into(),
            "kubernetes.default.svc.cluster.local".into(),
        ])?;
        write(&pki.join("apiserver.crt"), &serving.cert_pem)?;
        write(&pki.join("apiserver.key"), &serving.key_pem)?;
        let admin = ca.client_in_group(ADMIN, Some(MASTERS))?;
        let (sa_key, sa_pub) = crate::pki::signing_key()?;
        write(&pki.join("sa.key"), &sa_key)?;
        write(&pki.join("sa.pub"), &sa_pub)?;
        let p = |f: &str| pki.join(f).display().to_string();

        // etcd.
        let (etcd_port, peer_port) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args = vec![
            "--name=default".into(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ];
        let mut etcd = Process::spawn("etcd", &bin("etcd"), &etcd_args, dir.join("logs/etcd.log"))?;
        let started = Instant::now();
        wait_http(&mut etcd, &format!("{etcd_url}/health"), options.ready_timeout).await?;
        tracing::info!(elapsed = ?started.elapsed(), url = %etcd_url, "etcd is ready");

        // kube-apiserver.
        let api_port = if options.api_port == 0 {
            free_port()?
        } else {
            options.api_port
        };
        let api_addr = SocketAddr::from(([127, 0, 0, 1], api_port));
        let api_url = format!("https://{api_addr}");
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            "--advertise-address=127.0.0.1".into(),
            "--endpoint-reconciler-type=none".into(),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=RBAC".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        let mut apiserver_args = apiserver_args;
        if options.audit {
            let policy = dir.join("audit-policy.yaml");
            write(
                &policy,
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived, ResponseStarted]\nrules:\n  - level: Metadata\n",
            )?;
            apiserver_args.push(format!("--audit-policy-file={}", policy.display()));
            apiserver_args.push(format!("--audit-log-path={}", dir.join("logs/audit.log").display()));
            apiserver_args.push("--audit-log-format=json".into());
            apiserver_args.push("--audit-log-mode=blocking".into());
        }
        let log = dir.join("logs/kube-apiserver.log");
        let mut apiserver = Process::spawn("kube-apiserver", &bin("kube-apiserver"), &apiserver_args, log)?;
        let started = Instant::now();
        wait_api(&mut apiserver, &api_url, &ca, &admin, options.ready_timeout).await?;
        tracing::info!(elapsed = ?started.elapsed(), url = %api_url, "kube-apiserver is ready");

        // kube-controller-manager, as the admin.
        let admin_kubeconfig = dir.join("kubeconfig");
        write(&admin_kubeconfig, &kubeconfig_with_cert(&ca, &api_url, ADMIN, &admin))?;
        let kcm_args = vec![
            format!("--kubeconfig={}", admin_kubeconfig.display()),
            "--leader-elect=false".into(),
            "--controllers=deployment-controller,replicaset-controller,garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,endpointslice-controller".into(),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            "--secure-port=0".into(),
            "--concurrent-deployment-syncs=10".into(),
            "--concurrent-replicaset-syncs=10".into(),
            "--concurrent-service-endpoint-syncs=10".into(),
            "--v=1".into(),
        ];
        let controller_manager = Process::spawn(
            "kube-controller-manager",
            &bin("kube-controller-manager"),
            &kcm_args,
            dir.join("logs/kube-controller-manager.log"),
        )?;
        let mut plane = Self {
            dir,
            bin_dir: options.bin_dir.clone(),
            api_url,
            api_addr,
            ca,
            admin,
            etcd,
            apiserver,
            apiserver_args,
            controller_manager,
            ready_timeout: options.ready_timeout,
        };
        plane.wait_for_default_service_account(options.ready_timeout).await?;
        Ok(plane)
    }

    /// The admin's kubeconfig (`DIR/kubeconfig`).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// A kubeconfig (YAML) for the admin.
    pub fn admin_kubeconfig(&self) -> String {
        kubeconfig_with_cert(&self.ca, &self.api_url, ADMIN, &self.admin)
    }

    /// A kubeconfig (YAML) for `user` in `group`, with a client certificate signed by the cluster CA.
    ///
    /// # Errors
    ///
    /// The CA cannot sign.
    pub fn kubeconfig_for(&self, user: &str, group: Option<&str>) -> Result<String, PkiError> {
        let pair = self.ca.client_in_group(user, group)?;
        Ok(kubeconfig_with_cert(&self.ca, &self.api_url, user, &pair))
    }

    /// A kubeconfig (YAML) that authenticates with a bearer token (e.g. from `kubectl create token`).
    pub fn kubeconfig_with_token(&self, user: &str, token: &str) -> String {
        kubeconfig_with_token(&self.ca, &self.api_url, user, token)
    }

    /// A kube client for the admin.
    ///
    /// # Errors
    ///
    /// The kubeconfig cannot be turned into a client.
    pub async fn client(&self) -> Result<kube::Client, kube::Error> {
        client_from_yaml(&self.admin_kubeconfig()).await
    }

    /// Checks the components still run.
    ///
    /// # Errors
    ///
    /// One has exited; the error carries the end of its log.
    pub fn alive(&mut self) -> Result<(), ClusterError> {
        self.etcd.alive()?;
        self.apiserver.alive()?;
        self.controller_manager.alive()
    }

    /// Stops the API server (SIGKILL).
    pub fn stop_apiserver(&mut self) {
        self.apiserver.kill();
    }

    /// Starts the API server again with the same flags and port, and waits until it is ready.
    ///
    /// # Errors
    ///
    /// It exits or is not ready in time.
    pub async fn start_apiserver(&mut self) -> Result<(), ClusterError> {
        self.apiserver.kill();
        let log = self.dir.join("logs/kube-apiserver.log");
        self.apiserver = Process::spawn(
            "kube-apiserver",
            &self.bin_dir.join("kube-apiserver"),
            &self.apiserver_args,
            log,
        )?;
        wait_api(
            &mut self.apiserver,
            &self.api_url,
            &self.ca,
            &self.admin,
            self.ready_timeout,
        )
        .await
    }

    /// Kills the API server and starts it again (etcd keeps every object).
    ///
    /// # Errors
    ///
    /// As [`ControlPlane::start_apiserver`].
    pub async fn restart_apiserver(&mut self) -> Result<(), ClusterError> {
        self.stop_apiserver();
        self.start_apiserver().await
    }

    /// Waits until the `default` ServiceAccount of `default` exists: the controllers are working.
    async fn wait_for_default_service_account(&mut self, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        let client = self.client().await.ok();
        loop {
            self.controller_manager.alive()?;
            if let Some(client) = &client {
                let accounts: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
                    kube::Api::namespaced(client.clone(), "default");
                if matches!(accounts.get_opt("default").await, Ok(Some(_))) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(ClusterError::NotReady {
                    what: "kube-controller-manager",
                    timeout,
                    log: self.controller_manager.log.clone(),
                    tail: self.controller_manager.tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Polls `ready` every `every` until it says yes; fails if the process exits or `timeout` passes.
async fn poll_ready<F, Fut>(
    process: &mut Process,
    timeout: Duration,
    every: Duration,
    mut ready: F,
) -> Result<(), ClusterError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        process.alive()?;
        if ready().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ClusterError::NotReady {
                what: process.what,
                timeout,
                log: process.log.clone(),
                tail: process.tail(),
            });
        }
        tokio::time::sleep(every).await;
    }
}

/// Polls a plain-HTTP health URL (etcd's `/health`).
async fn wait_http(process: &mut Process, url: &str, timeout: Duration) -> Result<(), ClusterError> {
    use http_body_util::{BodyExt as _, Empty};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    poll_ready(process, timeout, Duration::from_millis(100), || async {
        let Ok(uri) = url.parse::<http::Uri>() else {
            return false;
        };
        let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(2), client.get(uri)).await else {
            return false;
        };
        let ok = response.status().is_success();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        ok && String::from_utf8_lossy(&body).contains("\"health\":\"true\"")
    })
    .await
}

/// Polls the API server's `/readyz` as the admin.
async fn wait_api(
    process: &mut Process,
    url: &str,
    ca: &Ca,
    admin: &Pair,
    timeout: Duration,
) -> Result<(), ClusterError> {
    let yaml = kubeconfig_with_cert(ca, url, ADMIN, admin);
    poll_ready(process, timeout, Duration::from_millis(200), || async {
        let Ok(client) = client_from_yaml(&yaml).await else {
            return false;
        };
        let Ok(request) = http::Request::get("/readyz").body(Vec::new()) else {
            return false;
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(5), client.request_text(request)).await,
            Ok(Ok(text)) if text.trim() == "ok"
        )
    })
    .await
}

/// A kube client from kubeconfig YAML.
///
/// # Errors
///
/// The YAML is not a usable kubeconfig.
pub async fn client_from_yaml(yaml: &str) -> Result<kube::Client, kube::Error> {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(yaml).map_err(kube::Error::InferKubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(kube::Error::InferKubeconfig)?;
    kube::Client::try_from(config)
}

/// A kubeconfig (YAML) for `user` at `server` that authenticates with a bearer `token`.
pub fn kubeconfig_with_token(ca: &Ca, server: &str, user: &str, token: &str) -> String {
    kubeconfig(ca, server, user, &format!("    token: {token}\n"))
}

/// A token for ServiceAccount `namespace/name` from the TokenRequest API (what `kubectl create token`
/// asks for), valid for `duration`.
///
/// # Errors
///
/// The API server refuses (no such ServiceAccount, or no right to ask).
pub async fn service_account_token(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    duration: Duration,
) -> Result<String, kube::Error> {
    let accounts: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
        kube::Api::namespaced(client.clone(), namespace);
    let request = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": duration.as_secs()}});
    let answer: serde_json::Value = accounts
        .create_subresource("token", name, &kube::api::PostParams::default(), &request)
        .await?;
    Ok(answer["status"]["token"].as_str().unwrap_or_default().to_owned())
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A kubeconfig (YAML) for `user` at `server` with the client certificate `pair`.
pub fn kubeconfig_with_cert(ca: &Ca, server: &str, user: &str, pair: &Pair) -> String {
    kubeconfig(
        ca,
        server,
        user,
        &format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(&pair.cert_pem),
            b64(&pair.key_pem)
        ),
    )
}

fn kubeconfig(ca: &Ca, server: &str, user: &str, credentials: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: turnout-testbed\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: {user:?}\n  user:\n{credentials}contexts:\n- name: turnout-testbed\n  \
         context:\n    cluster: turnout-testbed\n    user: {user:?}\n    namespace: default\ncurrent-context: turnout-testbed\n",
        ca = b64(&ca.cert_pem),
    )
}
