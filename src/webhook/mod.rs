//! `turnout webhook`: the mutating admission webhook server.
//!
//! ```text
//!  :8443 HTTPS ─ transport (TLS, h1/h2, timeouts, graceful stop) ─ handler (/mutate) ─ admission::review
//!  :8080 HTTP  ─ admin (/live, /ready, /metrics)
//!  CertStore ◀─ polls --tls-cert/--tls-key, swaps in a new pair, keeps the last good one
//! ```

mod handler;
pub mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

pub use handler::Handler;

use crate::admin::{self, AdminState, Health};
use crate::admission;
use crate::metrics::{ReloadLabels, WebhookMetrics};
use crate::tls::{CertStore, PairPaths, Reload};

/// Flags of `turnout webhook` (also taken by `turnout run`).
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Address the HTTPS admission endpoint (POST /mutate) listens on.
    #[arg(long, env = "TURNOUT_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// PEM file with the serving certificate chain; re-read when it changes.
    #[arg(long, env = "TURNOUT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: PathBuf,
    /// PEM file with the serving private key; re-read when it changes.
    #[arg(long, env = "TURNOUT_TLS_KEY", value_name = "FILE")]
    pub tls_key: PathBuf,
    /// Address of the admin endpoints: /live, /ready and /metrics (plain HTTP).
    #[arg(long, env = "TURNOUT_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    pub admin_listen: SocketAddr,
    /// Kubernetes username of the agent (e.g. system:serviceaccount:turnout-system:turnout); its
    /// requests are admitted unchanged.
    #[arg(long, env = "TURNOUT_AGENT_USERNAME", value_name = "USER")]
    pub agent_username: Option<String>,
    /// How often the certificate files are checked for changes.
    #[arg(long, env = "TURNOUT_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_reload_interval: Duration,
    /// Largest AdmissionReview body accepted; larger ones get HTTP 413.
    #[arg(long, env = "TURNOUT_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// How long a client may take to send its request headers.
    #[arg(long, env = "TURNOUT_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// On SIGTERM, how long to keep serving while /ready reports false, so that the apiserver stops
    /// sending requests before the listener closes.
    #[arg(long, env = "TURNOUT_DRAIN_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_delay: Duration,
    /// On SIGTERM, how long in-flight requests get to finish once the listener is closed.
    #[arg(long, env = "TURNOUT_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
}

/// A started webhook server.
#[derive(Debug)]
pub struct Server {
    /// Address the HTTPS endpoint is bound to.
    pub addr: SocketAddr,
    /// Address the admin endpoints are bound to.
    pub admin_addr: SocketAddr,
    pub health: Arc<Health>,
    task: JoinHandle<()>,
}

impl Server {
    /// Checks the certificate pair, binds both ports and starts serving; stops when `stop` resolves.
    ///
    /// # Errors
    ///
    /// The certificate pair does not load (the error names the flag and file) or a port cannot be
    /// bound.
    pub async fn start(args: &Args, stop: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<Self> {
        Self::start_with_registry(args, stop, Registry::default()).await
    }

    /// As [`Server::start`], serving `registry` (e.g. the agent's metrics) on the admin port too.
    ///
    /// # Errors
    ///
    /// As [`Server::start`].
    pub async fn start_with_registry(
        args: &Args,
        stop: impl Future<Output = ()> + Send + 'static,
        registry: Registry,
    ) -> anyhow::Result<Self> {
        Self::start_with(args, stop, registry, Arc::new(Health::default()), None).await
    }

    /// As [`Server::start_with_registry`], with readiness from `health` (which an agent in the same
    /// process also reports to) and the agent's release page on the admin port.
    ///
    /// # Errors
    ///
    /// As [`Server::start`].
    pub async fn start_with(
        args: &Args,
        stop: impl Future<Output = ()> + Send + 'static,
        mut registry: Registry,
        health: Arc<Health>,
        page: Option<Arc<crate::agent::page::Page>>,
    ) -> anyhow::Result<Self> {
        let store = CertStore::load(PairPaths {
            cert: args.tls_cert.clone(),
            key: args.tls_key.clone(),
        })?;
        let tls = store.server_config()?;
        let metrics = Arc::new(WebhookMetrics::register(&mut registry));

        let listener = admin::bind("--listen", args.listen).await?;
        let admin_listener = admin::bind("--admin-listen", args.admin_listen).await?;
        let addr = listener.local_addr().context("reading the bound --listen address")?;
        let admin_addr = admin_listener
            .local_addr()
            .context("reading the bound --admin-listen address")?;
        health.set_tls_loaded();

        let handler = Arc::new(Handler {
            config: admission::Config {
                agent_username: args.agent_username.clone(),
            },
            metrics: metrics.clone(),
            max_body_bytes: args.max_body_bytes,
        });
        let admin_task = tokio::spawn(admin::serve(
            admin_listener,
            Arc::new(AdminState {
                health: health.clone(),
                registry,
                page,
            }),
        ));
        let (stop_watch_tx, stop_watch_rx) = tokio::sync::oneshot::channel::<()>();
        let reload_metrics = metrics.clone();
        tokio::spawn(store.watch(
            args.tls_reload_interval,
            async move {
                let _ = stop_watch_rx.await;
            },
            move |result| {
                let label = if result.as_ref().is_ok_and(|r| *r == Reload::Updated) {
                    "updated"
                } else {
                    "failed"
                };
                reload_metrics
                    .tls_reloads
                    .get_or_create(&ReloadLabels { result: label })
                    .inc();
            },
        ));

        let limits = transport::Limits {
            header_read_timeout: args.header_read_timeout,
            shutdown_timeout: args.shutdown_timeout,
            ..transport::Limits::default()
        };
        let drain_delay = args.drain_delay;
        let stopping = health.clone();
        let stop = async move {
            stop.await;
            tracing::info!(
                ?drain_delay,
                "shutting down: not ready; serving until the drain delay ends"
            );
            stopping.set_shutting_down();
            tokio::time::sleep(drain_delay).await;
        };
        let serve = transport::serve(listener, tls, move |req| handler.clone().handle(req), limits, stop);
        let task = tokio::spawn(async move {
            serve.await;
            let _ = stop_watch_tx.send(());
            admin_task.abort();
        });
        tracing::info!(%addr, %admin_addr, "webhook serving");
        Ok(Self {
            addr,
            admin_addr,
            health,
            task,
        })
    }

    /// Waits until the server has shut down.
    ///
    /// # Errors
    ///
    /// The server task panicked.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("the webhook server task failed")
    }
}

/// Runs `turnout webhook` until SIGTERM or SIGINT.
///
/// # Errors
///
/// See [`Server::start`].
pub async fn run(args: Args) -> anyhow::Result<()> {
    let server = Server::start(&args, crate::signals::terminated()).await?;
    server.wait().await
}
