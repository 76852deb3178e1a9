//! The test bed: the real control plane ([`crate::cluster`]) with what needs machines we do not have
//! simulated as its clients: the node agent ([`crate::node`]: pods bound, run and terminated) and the
//! mesh data plane ([`crate::mesh`]: pods answering HTTP, proxies routing by the applied
//! VirtualServices and DestinationRules or Gateway API HTTPRoutes, Istio metrics, HTTPRoute status).
//!
//! ```text
//!  kubectl / turnout ──▶ kube-apiserver ◀── kube-controller-manager
//!                          ▲        ▲
//!           node agent ────┘        └──── mesh (watches) ──▶ pods on 127.244.x.y; proxies; /metrics
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cluster::{ClusterError, ControlPlane, Options};
use crate::mesh::pod::AbortOnDrop;
use crate::mesh::{Mesh, MeshConfig, MeshError};
use crate::node::{NodeConfig, NodeError};

/// Options of a test bed.
#[derive(Clone, Debug)]
pub struct Config {
    pub control_plane: Options,
    pub node: NodeConfig,
    pub mesh: MeshConfig,
}

/// Why the test bed could not start.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("cannot start the control plane")]
    ControlPlane(#[from] ClusterError),
    #[error("cannot reach the API server")]
    Client(#[source] kube::Error),
    #[error("cannot start the node agent")]
    Node(#[from] NodeError),
    #[error("cannot start the mesh")]
    Mesh(#[from] MeshError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the control plane's binaries are by default: `$TURNOUT_K8S_BIN`, else `target/k8s/bin` of
/// the workspace (`$CARGO_TARGET_DIR/k8s/bin` when that is set), where `hack/k8s/build.sh` puts them.
pub fn default_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TURNOUT_K8S_BIN") {
        return dir.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    target.join("k8s/bin")
}

/// The workspace's top directory (this crate lives in `hack/kubesim`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the control plane with `hack/k8s/build.sh` if it is not built yet (the script skips the
/// build when the binaries match the module's go.sum); its progress goes to stderr.
///
/// # Errors
///
/// The script cannot run or fails.
pub fn ensure_built(bin_dir: &Path) -> Result<(), std::io::Error> {
    let script = workspace().join("hack/k8s/build.sh");
    let status = std::process::Command::new(&script)
        .env("TURNOUT_K8S_BIN", bin_dir)
        .stdout(std::process::Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("{} failed: {status}", script.display())))
    }
}

/// A running test bed; stops when dropped.
pub struct Testbed {
    pub control_plane: ControlPlane,
    pub mesh: Mesh,
    _node: AbortOnDrop,
}

impl Testbed {
    /// Starts the control plane, then the node agent and the mesh against it, and writes
    /// `DIR/endpoints.json` beside `DIR/kubeconfig`.
    ///
    /// # Errors
    ///
    /// Any part fails to start.
    pub async fn start(config: &Config) -> Result<Self, TestbedError> {
        let control_plane = ControlPlane::start(&config.control_plane).await?;
        let client = control_plane.client().await.map_err(TestbedError::Client)?;
        let node_config = config.node.clone();
        let node_client = client.clone();
        let node = AbortOnDrop(tokio::spawn(async move {
            if let Err(error) = crate::node::run(node_client, node_config).await {
                tracing::error!(error = %crate::report(&error), "the node agent stopped");
            }
        }));
        let mesh = Mesh::start_on_api(client, &config.mesh).await?;
        let bed = Self {
            control_plane,
            mesh,
            _node: node,
        };
        let path = bed.control_plane.dir.join("endpoints.json");
        let text = serde_json::to_vec_pretty(&bed.endpoints()).unwrap_or_default();
        std::fs::write(&path, text).map_err(|source| TestbedError::Write { path, source })?;
        Ok(bed)
    }

    /// `{"api": "https://127.0.0.1:A", "mesh": "http://127.0.0.1:M", "metrics": "http://127.0.0.1:R/metrics"}`.
    pub fn endpoints(&self) -> serde_json::Value {
        serde_json::json!({
            "api": self.control_plane.api_url,
            "mesh": self.mesh_url(),
            "metrics": self.metrics_url(),
        })
    }

    /// Where requests enter the mesh.
    pub fn mesh_addr(&self) -> SocketAddr {
        self.mesh.entry_addr()
    }

    /// Where the mesh's metrics are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.mesh.metrics_addr()
    }

    /// `http://127.0.0.1:PORT`: the mesh entry (send `Host: <service>.<namespace>`).
    pub fn mesh_url(&self) -> String {
        format!("http://{}", self.mesh_addr())
    }

    /// `http://127.0.0.1:PORT/metrics`: the mesh's Istio metrics.
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics_addr())
    }
}

/// Defaults for a test bed in `dir`.
pub fn config(dir: &Path) -> Config {
    Config {
        control_plane: Options {
            bin_dir: default_bin_dir(),
            dir: dir.to_owned(),
            api_port: 0,
            ready_timeout: Duration::from_secs(120),
            audit: false,
        },
        node: NodeConfig::default(),
        mesh: MeshConfig::default(),
    }
}
