use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// kubesim: turnout's test bed. The real Kubernetes control plane (etcd, kube-apiserver,
/// kube-controller-manager built from the Kubernetes Go modules by hack/k8s/build.sh), with a node agent
/// that binds and runs pods and a mesh data plane that routes by the applied Istio objects and Gateway
/// API HTTPRoutes, both as clients of the API server.
#[derive(Debug, Parser)]
#[command(name = "kubesim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the test bed and run until SIGINT or SIGTERM; writes DIR/kubeconfig (admin) and
    /// DIR/endpoints.json ({"api", "mesh", "metrics"}).
    Up {
        /// Directory for certificates, etcd's data, logs, the kubeconfig and the endpoints (created if
        /// missing; etcd's data there is started afresh).
        #[arg(long, env = "KUBESIM_DIR")]
        dir: PathBuf,
        /// Where etcd, kube-apiserver, kube-controller-manager and kubectl are (default: target/k8s/bin,
        /// built there first if missing).
        #[arg(long, env = "TURNOUT_K8S_BIN")]
        k8s_bin: Option<PathBuf>,
        /// Port of the API server (0: any free port).
        #[arg(long, env = "KUBESIM_API_PORT", default_value_t = 0)]
        api_port: u16,
        /// How long a pod takes to become Ready.
        #[arg(long, env = "KUBESIM_POD_READY_DELAY", default_value = "500ms", value_parser = parse_duration)]
        pod_ready_delay: Duration,
        /// The longest a simulated proxy takes to apply a routing or endpoint change.
        #[arg(long, env = "KUBESIM_MAX_PROPAGATION_DELAY", default_value = "500ms", value_parser = parse_duration)]
        max_propagation_delay: Duration,
        /// Port of the mesh entry, where HTTP requests with `Host: <service>.<namespace>` go (0: any free port).
        #[arg(long, env = "KUBESIM_MESH_PORT", default_value_t = 0)]
        mesh_port: u16,
        /// Port of the mesh's Istio metrics, `/metrics` (0: any free port).
        #[arg(long, env = "KUBESIM_METRICS_PORT", default_value_t = 0)]
        metrics_port: u16,
        /// How many simulated client proxies route mesh requests (each adopts changes after its own delay).
        #[arg(long, env = "KUBESIM_PROXIES", default_value_t = 4)]
        proxies: usize,
        /// Write HTTPRoute status (status.parents, controller kubesim.turnout.dev/mesh) once every proxy
        /// has adopted a route's generation, as a Gateway API implementation does; false: write none.
        #[arg(long, env = "KUBESIM_ROUTE_STATUS", default_value_t = true, action = clap::ArgAction::Set)]
        route_status: bool,
        /// Write the API server's audit log (one JSON line per request, with its user) to DIR/logs/audit.log.
        #[arg(long, env = "KUBESIM_AUDIT")]
        audit: bool,
    },
    /// Print a kubeconfig for another identity of a running test bed: a user with a client certificate
    /// (--user, optionally --group), or a ServiceAccount with a token from the TokenRequest API
    /// (--service-account NAMESPACE/NAME, as `kubectl create token` mints it).
    Kubeconfig {
        /// The directory given to `up`.
        #[arg(long, env = "KUBESIM_DIR")]
        dir: PathBuf,
        /// A user name for a client certificate, e.g. jane.
        #[arg(
            long,
            conflicts_with = "service_account",
            required_unless_present = "service_account"
        )]
        user: Option<String>,
        /// The group of the client certificate's user, e.g. system:masters.
        #[arg(long, requires = "user")]
        group: Option<String>,
        /// A ServiceAccount, NAMESPACE/NAME, e.g. turnout-system/turnout.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        service_account: Option<String>,
        /// How long the ServiceAccount token is valid.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        duration: Duration,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms or 2s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unit must be ms, s, m or h")),
    }
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_client::client::builder=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kubesim: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Up {
            dir,
            k8s_bin,
            api_port,
            pod_ready_delay,
            max_propagation_delay,
            mesh_port,
            metrics_port,
            proxies,
            route_status,
            audit,
        } => {
            let mut config = kubesim::testbed::config(&dir);
            config.control_plane.api_port = api_port;
            config.control_plane.audit = audit;
            if let Some(bin) = k8s_bin {
                config.control_plane.bin_dir = bin;
            }
            config.node.pod_ready_delay = pod_ready_delay;
            config.mesh = kubesim::mesh::MeshConfig {
                entry_addr: std::net::SocketAddr::from(([127, 0, 0, 1], mesh_port)),
                metrics_addr: std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port)),
                proxies,
                max_propagation_delay,
                seed: None,
                route_status,
            };
            rt.block_on(up(config))
        }
        Command::Kubeconfig {
            dir,
            user,
            group,
            service_account,
            duration,
        } => rt.block_on(kubeconfig(&dir, user, group, service_account, duration)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubesim: error: {}", kubesim::report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn up(config: kubesim::testbed::Config) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let dir = &config.control_plane.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // A fresh cluster each time: etcd's data of an earlier run would not match the new certificates.
    let _ = std::fs::remove_dir_all(dir.join("etcd"));
    let _ = std::fs::remove_file(dir.join("endpoints.json"));
    if std::env::var_os("TURNOUT_K8S_BIN").is_none() {
        kubesim::testbed::ensure_built(&config.control_plane.bin_dir).context("cannot build the control plane")?;
    }
    let bed = kubesim::testbed::Testbed::start(&config).await?;
    let kubeconfig = bed.control_plane.kubeconfig_path();
    tracing::info!(api = %bed.control_plane.api_url, mesh = %bed.mesh_url(), metrics = %bed.metrics_url(),
        kubeconfig = %kubeconfig.display(), logs = %dir.join("logs").display(), "the test bed is up");
    println!("kubesim is up: export KUBECONFIG={}", kubeconfig.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("kubesim stopping");
    drop(bed);
    Ok(())
}

async fn kubeconfig(
    dir: &std::path::Path,
    user: Option<String>,
    group: Option<String>,
    service_account: Option<String>,
    duration: Duration,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let ca = kubesim::pki::Ca::load(&dir.join("pki"))
        .with_context(|| format!("is the test bed up with --dir {}?", dir.display()))?;
    let endpoints: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("endpoints.json"))
            .with_context(|| format!("is the test bed up with --dir {}?", dir.display()))?,
    )?;
    let server = endpoints["api"].as_str().context("endpoints.json has no api address")?;
    let text = match (user, service_account) {
        (Some(user), _) => {
            let pair = ca.client_in_group(&user, group.as_deref())?;
            kubesim::cluster::kubeconfig_with_cert(&ca, server, &user, &pair)
        }
        (None, Some(account)) => {
            let (ns, name) = account
                .split_once('/')
                .with_context(|| format!("--service-account {account:?} is not NAMESPACE/NAME"))?;
            let admin = std::fs::read_to_string(dir.join("kubeconfig")).context("cannot read the admin kubeconfig")?;
            let client = kubesim::cluster::client_from_yaml(&admin).await?;
            let token = kubesim::cluster::service_account_token(&client, ns, name, duration).await?;
            kubesim::cluster::kubeconfig_with_token(&ca, server, &format!("system:serviceaccount:{ns}:{name}"), &token)
        }
        (None, None) => anyhow::bail!("give --user or --service-account"),
    };
    print!("{text}");
    Ok(())
}
