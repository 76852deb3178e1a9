use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// kubesim: a Kubernetes emulator for turnout's tests and demos (an HTTPS API server that kubectl and
/// kube-rs use, controllers, and a mesh data plane).
#[derive(Debug, Parser)]
#[command(name = "kubesim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start kubesim and run until SIGINT or SIGTERM; writes DIR/kubeconfig and DIR/endpoints.json.
    Up {
        /// Directory for the kubeconfig, the endpoints and the CA (created if missing).
        #[arg(long, env = "KUBESIM_DIR")]
        dir: PathBuf,
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
        /// Where a Service that an admission webhook names really listens, as NAMESPACE/NAME=IP:PORT
        /// (there is no cluster network); repeat for more.
        #[arg(long = "service", value_name = "NS/NAME=ADDR", value_parser = parse_service)]
        services: Vec<(String, String, std::net::SocketAddr)>,
    },
    /// Print a kubeconfig for another identity of a running kubesim (e.g. a service account).
    Kubeconfig {
        /// The directory given to `kubesim up`.
        #[arg(long, env = "KUBESIM_DIR")]
        dir: PathBuf,
        /// The user, e.g. system:serviceaccount:turnout-system:turnout.
        #[arg(long)]
        user: String,
    },
}

fn parse_service(s: &str) -> Result<(String, String, std::net::SocketAddr), String> {
    let bad = || format!("{s:?} is not NAMESPACE/NAME=IP:PORT");
    let (svc, addr) = s.split_once('=').ok_or_else(bad)?;
    let (ns, name) = svc.split_once('/').ok_or_else(bad)?;
    let addr: std::net::SocketAddr = addr.parse().map_err(|_| bad())?;
    if !addr.ip().is_loopback() {
        return Err(format!("{s:?}: only loopback addresses can be reached"));
    }
    Ok((ns.to_owned(), name.to_owned(), addr))
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
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Up {
            dir,
            api_port,
            pod_ready_delay,
            max_propagation_delay,
            mesh_port,
            metrics_port,
            proxies,
            services,
        } => match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(rt) => {
                let config = kubesim::sim::Config {
                    api_addr: std::net::SocketAddr::from(([127, 0, 0, 1], api_port)),
                    pod_ready_delay,
                    max_propagation_delay,
                    mesh_addr: std::net::SocketAddr::from(([127, 0, 0, 1], mesh_port)),
                    metrics_addr: std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port)),
                    proxies,
                    ..Default::default()
                };
                rt.block_on(up(dir, config, services))
            }
            Err(e) => Err(anyhow::Error::new(e).context("cannot start the async runtime")),
        },
        Command::Kubeconfig { dir, user } => kubeconfig(&dir, &user),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubesim: error: {}", kubesim::report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn up(
    dir: PathBuf,
    config: kubesim::sim::Config,
    services: Vec<(String, String, std::net::SocketAddr)>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = kubesim::pki::Ca::generate()?;
    ca.save(&dir)?;
    let sim = kubesim::sim::Sim::start_with_ca(config, ca).await?;
    for (ns, name, addr) in services {
        sim.webhooks.route_service(&ns, &name, addr);
    }
    sim.write_kubeconfig(&dir.join("kubeconfig"), &kubesim::sim::admin().name)?;
    let endpoints = serde_json::json!({"api": sim.api_url(), "mesh": sim.mesh_url(), "metrics": sim.metrics_url()});
    std::fs::write(dir.join("endpoints.json"), serde_json::to_vec_pretty(&endpoints)?)
        .with_context(|| format!("cannot write {}/endpoints.json", dir.display()))?;
    tracing::info!(api = %sim.api_url(), mesh = %sim.mesh_url(), metrics = %sim.metrics_url(), kubeconfig = %dir.join("kubeconfig").display(), "kubesim is up");
    println!("kubesim is up: export KUBECONFIG={}", dir.join("kubeconfig").display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("kubesim stopping");
    Ok(())
}

fn kubeconfig(dir: &std::path::Path, user: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let ca = kubesim::pki::Ca::load(dir)?;
    let endpoints: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("endpoints.json"))
            .with_context(|| format!("is kubesim up with --dir {}?", dir.display()))?,
    )?;
    let server = endpoints["api"].as_str().context("endpoints.json has no api address")?;
    print!("{}", kubesim::sim::kubeconfig(&ca, server, user)?);
    Ok(())
}
