//! The admin port: `/live`, `/ready`, `/metrics` and, with an agent, the release page (`/releases`),
//! plain HTTP, apart from the webhook port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Readiness of the process: ready once the TLS pair is loaded (the webhook) and the agent has synced
/// (its first list of Deployments as the leader, or knowing it follows), not ready again once shutting
/// down.
#[derive(Debug, Default)]
pub struct Health {
    tls_loaded: AtomicBool,
    shutting_down: AtomicBool,
    /// This process runs an agent, which must sync before the process is ready.
    with_agent: AtomicBool,
    agent_synced: AtomicBool,
}

impl Health {
    pub fn set_tls_loaded(&self) {
        self.tls_loaded.store(true, Ordering::SeqCst);
    }

    /// Readiness waits for [`Health::set_agent_synced`] too.
    pub fn expect_agent(&self) {
        self.with_agent.store(true, Ordering::SeqCst);
    }

    pub fn set_agent_synced(&self) {
        self.agent_synced.store(true, Ordering::SeqCst);
    }

    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// `Ok` when ready, else why not.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.shutting_down.load(Ordering::SeqCst) {
            Err("shutting down")
        } else if !self.tls_loaded.load(Ordering::SeqCst) {
            Err("serving certificate not loaded yet")
        } else if self.with_agent.load(Ordering::SeqCst) && !self.agent_synced.load(Ordering::SeqCst) {
            Err("the agent has not synced with the cluster yet")
        } else {
            Ok(())
        }
    }
}

/// What the admin endpoints read.
#[derive(Debug)]
pub struct AdminState {
    pub health: Arc<Health>,
    pub registry: Registry,
    /// The agent's release page, in a process that runs an agent.
    pub page: Option<Arc<crate::agent::page::Page>>,
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin port: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req, peer).await) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            if let Err(error) = http.serve_connection(TokioIo::new(tcp), service).await {
                tracing::debug!(%error, %peer, "admin connection ended with an error");
            }
        });
    }
}

async fn route(state: &AdminState, req: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    let path = req.uri().path();
    if let Some(page) = &state.page
        && crate::agent::page::Page::owns(path)
    {
        return page.serve(path, req.uri().query(), peer.ip().is_loopback()).await;
    }
    match path {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => match state.health.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {why}\n")),
        },
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(crate::metrics::encode(&state.registry))));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            response
        }
        _ if state.page.is_some() => text(
            StatusCode::NOT_FOUND,
            "not found: try /live, /ready, /metrics or /releases\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found: try /live, /ready or /metrics\n"),
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Binds `addr`, naming `flag` in the error.
///
/// # Errors
///
/// The address is in use or not available.
pub async fn bind(flag: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {flag} {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_with_an_agent_is_ready_only_once_the_agent_has_synced() {
        let health = Health::default();
        assert_eq!(health.ready(), Err("serving certificate not loaded yet"));
        health.set_tls_loaded();
        assert_eq!(
            health.ready(),
            Ok(()),
            "the webhook alone is ready with its certificate"
        );
        health.expect_agent();
        assert_eq!(health.ready(), Err("the agent has not synced with the cluster yet"));
        health.set_agent_synced();
        assert_eq!(health.ready(), Ok(()));
        health.set_shutting_down();
        assert_eq!(health.ready(), Err("shutting down"));
    }
}
