//! Simulated pods as real HTTP/1.1 servers on the loopback twin of their pod IP, one listener per
//! declared container port (8080 when none is declared). They answer with JSON naming the pod; container
//! env shapes their behaviour: `KUBESIM_LATENCY_MS` (delay before answering) and `KUBESIM_ERROR_RATE`
//! (0–1: that fraction of requests answers 500). `/status/<code>` answers `<code>` (as podinfo does).
//! Dropping a [`PodServer`] closes its listeners and cuts its open connections, like a process exit.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::metrics::{Labels, Metrics, Reporter};
use super::rng::Rng;
use super::snapshot::service_of;

/// The header in which a proxy tells the pod which Service host the client addressed.
pub const DESTINATION_SERVICE_HEADER: &str = "x-kubesim-destination-service";

/// The port a pod listens on when its containers declare none.
pub const DEFAULT_PORT: u16 = 8080;

/// Why a pod cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum PodServerError {
    #[error("pod IP {ip:?} is not an IP address")]
    InvalidIp { ip: String },
    /// Only IPv4 pod IPs are served (on the loopback address of the same last three octets).
    #[error("pod IP {ip} is not an IPv4 address")]
    NotIpv4 { ip: IpAddr },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Aborts a task when dropped.
#[derive(Debug)]
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a simulated pod behaves, from its container env.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Behaviour {
    pub latency: Duration,
    /// Fraction of requests answered with 500, in [0, 1].
    pub error_rate: f64,
}

impl Behaviour {
    pub fn of(pod: &Value) -> Self {
        let env = |name: &str| env(pod, name);
        Self {
            latency: env("KUBESIM_LATENCY_MS")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|ms| ms.is_finite() && *ms > 0.0)
                .map(|ms| Duration::from_secs_f64(ms / 1000.0))
                .unwrap_or_default(),
            error_rate: env("KUBESIM_ERROR_RATE")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|r| r.is_finite())
                .map_or(0.0, |r| r.clamp(0.0, 1.0)),
        }
    }
}

/// The value of env var `name` in the pod's first container that sets it (as the kubelet reads it).
pub fn env<'a>(pod: &'a Value, name: &str) -> Option<&'a str> {
    pod["spec"]["containers"]
        .as_array()?
        .iter()
        .flat_map(|c| c["env"].as_array().into_iter().flatten())
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
}

/// The ports a pod listens on: every declared containerPort (TCP), or [`DEFAULT_PORT`].
pub fn ports(pod: &Value) -> Vec<u16> {
    let mut ports: Vec<u16> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .filter(|p| p["protocol"].as_str().is_none_or(|proto| proto == "TCP"))
        .filter_map(|p| p["containerPort"].as_u64().and_then(|n| u16::try_from(n).ok()))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    if ports.is_empty() {
        ports.push(DEFAULT_PORT);
    }
    ports
}

/// Where a pod with IP `ip` listens: the loopback address with the same last three octets (pod
/// `10.244.1.7` on `127.244.1.7`). The API server refuses loopback addresses in EndpointSlices, so pods
/// get addresses of a pod network that exists only in the API; every address of 127.0.0.0/8 reaches
/// this machine, so each pod still has an address of its own.
///
/// # Errors
///
/// `ip` is not IPv4.
pub fn loopback_of(ip: IpAddr) -> Result<IpAddr, PodServerError> {
    match ip {
        IpAddr::V4(v4) => {
            let [_, b, c, d] = v4.octets();
            Ok(IpAddr::from([127, b, c, d]))
        }
        IpAddr::V6(_) => Err(PodServerError::NotIpv4 { ip }),
    }
}

/// Who a pod is, for its answers and its `destination` metrics.
#[derive(Clone, Debug)]
struct Identity {
    namespace: String,
    name: String,
    version_label: String,
    labels: Labels,
}

/// A running simulated pod.
#[derive(Debug)]
pub struct PodServer {
    pub uid: String,
    /// Declared port → where it really listens.
    pub listeners: BTreeMap<u16, SocketAddr>,
    tasks: Vec<AbortOnDrop>,
}

impl PodServer {
    /// Starts listening for `pod` (which has a `status.podIP`).
    ///
    /// # Errors
    ///
    /// The pod IP is not IPv4, or no port could be bound.
    pub fn start(pod: &Value, workload: &str, metrics: Arc<Metrics>, seed: u64) -> Result<Self, PodServerError> {
        let meta = &pod["metadata"];
        let ip_text = pod["status"]["podIP"].as_str().unwrap_or_default();
        let ip: IpAddr = ip_text
            .parse()
            .map_err(|_| PodServerError::InvalidIp { ip: ip_text.to_owned() })?;
        let ip = loopback_of(ip)?;
        let namespace = meta["namespace"].as_str().unwrap_or_default().to_owned();
        let name = meta["name"].as_str().unwrap_or_default().to_owned();
        let pod_labels = &meta["labels"];
        let label = |k: &str| pod_labels[k].as_str().map(str::to_owned);
        let identity = Arc::new(Identity {
            version_label: label("version").unwrap_or_default(),
            labels: Labels {
                reporter: Reporter::Destination,
                // Set per request from the proxy's header (see [`DESTINATION_SERVICE_HEADER`]).
                destination_service: "unknown".into(),
                destination_service_name: "unknown".into(),
                destination_service_namespace: "unknown".into(),
                destination_workload: workload.to_owned(),
                destination_workload_namespace: namespace.clone(),
                destination_app: label("app")
                    .or_else(|| label("app.kubernetes.io/name"))
                    .unwrap_or_else(|| "unknown".into()),
                destination_version: label("version")
                    .or_else(|| label("app.kubernetes.io/version"))
                    .unwrap_or_else(|| "unknown".into()),
                response_code: 200,
                response_flags: "-",
            },
            namespace,
            name,
        });
        let behaviour = Arc::new(Behaviour::of(pod));
        let rng = Arc::new(Mutex::new(Rng::new(seed)));
        let mut listeners = BTreeMap::new();
        let mut tasks = Vec::new();
        for port in ports(pod) {
            let listener = bind(SocketAddr::new(ip, port))?;
            let local = listener.local_addr().map_err(|source| PodServerError::Bind {
                addr: SocketAddr::new(ip, port),
                source,
            })?;
            if local.port() != port {
                tracing::warn!(pod = %identity.name, %ip, port, actual = %local,
                    "mesh: pod address taken (another kubesim?); the proxies use the actual address");
            }
            listeners.insert(port, local);
            let state = (identity.clone(), behaviour.clone(), rng.clone(), metrics.clone());
            tasks.push(AbortOnDrop(tokio::spawn(serve(listener, state))));
        }
        Ok(Self {
            uid: meta["uid"].as_str().unwrap_or_default().to_owned(),
            listeners,
            tasks,
        })
    }

    /// Stops listening and cuts open connections; returns once the listeners are closed.
    pub async fn stop(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in &tasks {
            task.0.abort();
        }
        for mut task in tasks {
            // An aborted task's future (the listener, the connections) is dropped when this returns.
            let _ = (&mut task.0).await;
        }
    }
}

/// Binds `addr`, or a free port on the same IP if `addr` is taken (two kubesims in one machine hand out
/// the same pod IPs).
fn bind(addr: SocketAddr) -> Result<TcpListener, PodServerError> {
    let std_listener = match std::net::TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            std::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0))
                .map_err(|source| PodServerError::Bind { addr, source })?
        }
        Err(source) => return Err(PodServerError::Bind { addr, source }),
    };
    std_listener
        .set_nonblocking(true)
        .map_err(|source| PodServerError::Bind { addr, source })?;
    TcpListener::from_std(std_listener).map_err(|source| PodServerError::Bind { addr, source })
}

type State = (Arc<Identity>, Arc<Behaviour>, Arc<Mutex<Rng>>, Arc<Metrics>);

/// Serves the pod until dropped; dropping also closes every open connection.
async fn serve(listener: TcpListener, state: State) {
    super::serve_http1(listener, "pod", move |req| {
        let state = state.clone();
        async move { answer(&state, &req).await }
    })
    .await;
}

async fn answer<B>(state: &State, req: &Request<B>) -> Response<Full<Bytes>> {
    let (identity, behaviour, rng, metrics) = state;
    let started = tokio::time::Instant::now();
    if !behaviour.latency.is_zero() {
        tokio::time::sleep(behaviour.latency).await;
    }
    let path = req.uri().path();
    let injected = path
        .strip_prefix("/status/")
        .and_then(|code| code.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok());
    let status = injected.unwrap_or_else(|| {
        let roll = rng.lock().unwrap_or_else(PoisonError::into_inner).unit();
        if roll < behaviour.error_rate {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        }
    });
    let body = json!({
        "pod": identity.name,
        "namespace": identity.namespace,
        "version": identity.version_label,
        "path": path,
    });
    let mut labels = identity.labels.clone();
    labels.response_code = status.as_u16();
    // The Service the client addressed, as the proxy tells (Istio passes it in peer metadata). Only a
    // Service of the pod's own namespace counts, so labels stay bounded by the cluster's objects.
    if let Some(host) = req
        .headers()
        .get(DESTINATION_SERVICE_HEADER)
        .and_then(|v| v.to_str().ok())
        && let Some((ns, name)) = service_of(host)
        && ns == identity.namespace
    {
        labels.destination_service = host.to_owned();
        labels.destination_service_name = name;
        labels.destination_service_namespace = ns;
    }
    metrics.record(labels, started.elapsed());
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaviour_and_ports_come_from_the_containers() {
        let pod = json!({"spec": {"containers": [
            {"name": "a", "env": [{"name": "KUBESIM_ERROR_RATE", "value": "1.5"}, {"name": "KUBESIM_LATENCY_MS", "value": "20"}],
             "ports": [{"containerPort": 9898}, {"containerPort": 53, "protocol": "UDP"}]},
            {"name": "b", "ports": [{"containerPort": 9999}, {"containerPort": 9898}]}]}});
        assert_eq!(
            Behaviour::of(&pod),
            Behaviour {
                latency: Duration::from_millis(20),
                error_rate: 1.0
            }
        );
        assert_eq!(ports(&pod), vec![9898, 9999]);
        assert_eq!(
            ports(&json!({"spec": {"containers": [{"name": "a"}]}})),
            vec![DEFAULT_PORT]
        );
    }
}
