//! A running kubesim: the store, the API server on a random port, and the kubeconfigs to reach it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::api::{Api, User};
use crate::pki::{Ca, PkiError, service_account_groups};
use crate::store::Store;

/// Options of a kubesim instance.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address of the API server (port 0: any free port).
    pub api_addr: SocketAddr,
    /// How many changes watches can resume from.
    pub history: usize,
    /// How long a pod takes to become Ready (unless its container says otherwise).
    pub pod_ready_delay: Duration,
    /// The longest a simulated proxy takes to apply a configuration change.
    pub max_propagation_delay: Duration,
    /// Where HTTP requests enter the mesh (port 0: any free port).
    pub mesh_addr: SocketAddr,
    /// Where the mesh's Istio metrics are served (port 0: any free port).
    pub metrics_addr: SocketAddr,
    /// How many simulated client proxies route mesh requests.
    pub proxies: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            api_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            history: 100_000,
            pod_ready_delay: Duration::from_millis(500),
            max_propagation_delay: Duration::from_millis(500),
            mesh_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            proxies: 4,
        }
    }
}

/// Why kubesim could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot make certificates")]
    Pki(#[from] PkiError),
    #[error("cannot configure TLS")]
    Tls(#[from] crate::server::ServerError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the default namespaces")]
    Bootstrap(String),
    #[error("cannot start the mesh")]
    Mesh(#[from] crate::mesh::MeshError),
}

/// The admin user: bypasses authorization, as `system:masters` does.
pub fn admin() -> User {
    User {
        name: "kubesim-admin".into(),
        groups: vec!["system:masters".into(), "system:authenticated".into()],
    }
}

/// A running instance; stops when dropped.
pub struct Sim {
    pub api: Arc<Api>,
    /// The mutating webhooks; [`crate::admission::Webhooks::route_service`] points Services at servers.
    pub webhooks: Arc<crate::admission::Webhooks>,
    pub api_addr: SocketAddr,
    pub ca: Ca,
    /// Where HTTP requests enter the mesh (`Host: <service>.<namespace>`).
    pub mesh_addr: SocketAddr,
    /// Where the mesh's Istio metrics are served (`/metrics`).
    pub metrics_addr: SocketAddr,
    /// The mesh data plane (pods, proxies, metrics).
    pub mesh: crate::mesh::Mesh,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Sim {
    /// Starts an instance.
    ///
    /// # Errors
    ///
    /// Certificates, TLS or the listener could not be set up.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        Self::start_with_ca(config, Ca::generate()?).await
    }

    /// Starts an instance whose certificates are signed by `ca`.
    ///
    /// # Errors
    ///
    /// As [`Sim::start`].
    pub async fn start_with_ca(config: Config, ca: Ca) -> Result<Self, StartError> {
        let store = Arc::new(Store::new(config.history));
        let api = Arc::new(Api::new(store.clone()));
        let webhooks = Arc::new(crate::admission::Webhooks::new(store));
        api.set_admission(webhooks.clone());
        api.set_authorizer(Arc::new(crate::rbac::Rbac::new(api.store.clone())));
        let listener = TcpListener::bind(config.api_addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.api_addr,
                source,
            })?;
        let api_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.api_addr,
            source,
        })?;
        let serving = ca.serving(&["127.0.0.1".into(), "localhost".into()])?;
        let tls = crate::server::tls_config(&ca, &serving)?;
        let mut tasks = vec![tokio::spawn(crate::server::serve(listener, tls, api.clone()))];
        tasks.extend(crate::controllers::start(api.clone(), &config));
        let mesh_config = crate::mesh::MeshConfig {
            entry_addr: config.mesh_addr,
            metrics_addr: config.metrics_addr,
            proxies: config.proxies,
            max_propagation_delay: config.max_propagation_delay,
            seed: None,
        };
        let mesh = crate::mesh::Mesh::start(api.store.clone(), &mesh_config).await?;
        let sim = Self {
            api,
            webhooks,
            api_addr,
            ca,
            mesh_addr: mesh.entry_addr(),
            metrics_addr: mesh.metrics_addr(),
            mesh,
            tasks,
        };
        sim.bootstrap().await?;
        Ok(sim)
    }

    async fn bootstrap(&self) -> Result<(), StartError> {
        let t = self
            .api
            .registry()
            .get("", "v1", "namespaces")
            .ok_or_else(|| StartError::Bootstrap("no namespaces resource".into()))?;
        for ns in ["default", "kube-system", "kube-public"] {
            let object = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}, "status": {"phase": "Active"}});
            self.api
                .create(&admin(), &t, "", object, false)
                .await
                .map_err(|e| StartError::Bootstrap(e.message))?;
        }
        Ok(())
    }

    /// `https://127.0.0.1:PORT`.
    pub fn api_url(&self) -> String {
        format!("https://{}", self.api_addr)
    }

    /// `http://127.0.0.1:PORT`: the mesh entry (send `Host: <service>.<namespace>`).
    pub fn mesh_url(&self) -> String {
        format!("http://{}", self.mesh_addr)
    }

    /// `http://127.0.0.1:PORT/metrics`: the mesh's Istio metrics.
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics_addr)
    }

    /// A kubeconfig for `user` (service-account users get their groups).
    ///
    /// # Errors
    ///
    /// The CA cannot sign.
    pub fn kubeconfig(&self, user: &str) -> Result<String, PkiError> {
        kubeconfig(&self.ca, &self.api_url(), user)
    }

    /// Writes the admin kubeconfig to `path`.
    ///
    /// # Errors
    ///
    /// IO errors.
    pub fn write_kubeconfig(&self, path: &Path, user: &str) -> Result<(), PkiError> {
        let text = self.kubeconfig(user)?;
        std::fs::write(path, text).map_err(|source| PkiError::Write {
            path: path.display().to_string(),
            source,
        })
    }
}

/// A kubeconfig (YAML) for `user` at `server`, with a client certificate signed by `ca`.
///
/// # Errors
///
/// The CA cannot sign.
pub fn kubeconfig(ca: &Ca, server: &str, user: &str) -> Result<String, PkiError> {
    let identity = if user == admin().name {
        admin()
    } else {
        let mut groups = service_account_groups(user);
        groups.retain(|g| !g.is_empty());
        User {
            name: user.to_owned(),
            groups,
        }
    };
    let pair = ca.client(&identity)?;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kubesim\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\ncontexts:\n- name: kubesim\n  context:\n    cluster: kubesim\n    user: {user}\n    namespace: default\ncurrent-context: kubesim\n",
        ca = b64(&ca.cert_pem),
        cert = b64(&pair.cert_pem),
        key = b64(&pair.key_pem),
    ))
}
