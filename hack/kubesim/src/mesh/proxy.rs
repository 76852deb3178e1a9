//! The simulated client proxies: each adopts every configuration snapshot after its own random delay
//! (never out of order), and routes the requests of the mesh entry with the snapshot it holds, forwarding
//! them to the chosen pod as Envoy would (no retries), with Istio `source` metrics; the route's header
//! changes are applied, and mirrored copies are sent beside the request without waiting for them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use super::headers;
use super::metrics::{Labels, Metrics, Reporter};
use super::pod::{AbortOnDrop, DESTINATION_SERVICE_HEADER};
use super::rng::Rng;
use super::route::{self, Refusal, Upstream};
use super::snapshot::Snapshot;

/// Sends a request through proxy N (modulo the number of proxies) instead of the next in turn.
pub const PROXY_HEADER: &str = "x-kubesim-proxy";
/// On every answer: the proxy's configuration generation (see [`Proxies::view`]).
pub const GENERATION_HEADER: &str = "x-kubesim-generation";
/// On every answer: Envoy's response flags (`-` when the upstream answered).
pub const FLAGS_HEADER: &str = "x-kubesim-response-flags";

/// The largest request body the entry accepts.
const MAX_BODY: usize = 16 << 20;
/// How long a connection to a pod may take (pods are on loopback: refusals are immediate).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A configuration as published: its generation and content.
pub type Published = (u64, Arc<Snapshot>);

#[derive(Debug)]
struct ProxyState {
    rng: Rng,
    current: Published,
    /// Snapshots still on their way, by increasing deadline and generation.
    pending: VecDeque<(Instant, Published)>,
}

impl ProxyState {
    /// Adopts everything whose deadline has passed.
    fn advance(&mut self, now: Instant) -> Published {
        while self.pending.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, next)) = self.pending.pop_front() {
                self.current = next;
            }
        }
        self.current.clone()
    }
}

/// The proxies.
#[derive(Debug)]
pub struct Proxies {
    proxies: Vec<Mutex<ProxyState>>,
    max_delay: Duration,
    next: AtomicUsize,
    /// When every proxy holds the newest generation.
    settled_at: Mutex<Instant>,
}

impl Proxies {
    /// `count` proxies (at least one) that all hold `initial` now.
    pub fn new(count: usize, max_delay: Duration, initial: Published, seed: u64) -> Self {
        let proxies = (0..count.max(1))
            .map(|i| {
                Mutex::new(ProxyState {
                    rng: Rng::new(seed.wrapping_add(i as u64)),
                    current: initial.clone(),
                    pending: VecDeque::new(),
                })
            })
            .collect();
        Self {
            proxies,
            max_delay,
            next: AtomicUsize::new(0),
            settled_at: Mutex::new(Instant::now()),
        }
    }

    pub fn len(&self) -> usize {
        self.proxies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.proxies.is_empty()
    }

    /// Sends a new configuration: each proxy adopts it after its own delay in [0, max delay]. A proxy
    /// adopts generations in order; one whose later generation arrives first skips the earlier one (xDS
    /// pushes the latest state, not every change).
    pub fn publish(&self, published: &Published, now: Instant) {
        let mut last = now;
        for proxy in &self.proxies {
            let mut p = proxy.lock().unwrap_or_else(PoisonError::into_inner);
            p.advance(now);
            let max_ns = u64::try_from(self.max_delay.as_nanos()).unwrap_or(u64::MAX);
            let delay = Duration::from_nanos(p.rng.below(max_ns.saturating_add(1)));
            let at = now + delay;
            // Older generations that would land later are superseded by this one.
            while p.pending.back().is_some_and(|(pending_at, _)| *pending_at >= at) {
                p.pending.pop_back();
            }
            if delay.is_zero() {
                p.pending.clear();
                p.current = published.clone();
            } else {
                p.pending.push_back((at, published.clone()));
            }
            last = last.max(at);
        }
        *self.settled_at.lock().unwrap_or_else(PoisonError::into_inner) = last;
    }

    /// Makes every proxy hold `published` now (the state when the mesh starts).
    pub fn install(&self, published: &Published) {
        for proxy in &self.proxies {
            let mut p = proxy.lock().unwrap_or_else(PoisonError::into_inner);
            p.pending.clear();
            p.current = published.clone();
        }
    }

    /// When every proxy will hold the newest published generation.
    pub fn settled_at(&self) -> Instant {
        *self.settled_at.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What proxy `index` (modulo the count) holds at `now`.
    pub fn view(&self, index: usize, now: Instant) -> Published {
        let proxy = &self.proxies[index % self.proxies.len()];
        proxy.lock().unwrap_or_else(PoisonError::into_inner).advance(now)
    }

    /// The generation each proxy holds now.
    pub fn generations(&self) -> Vec<u64> {
        let now = Instant::now();
        (0..self.len()).map(|i| self.view(i, now).0).collect()
    }

    /// The proxy for a request: the one `x-kubesim-proxy` names, else the next in turn.
    fn pick(&self, headers: &HeaderMap) -> usize {
        let named = headers
            .get(PROXY_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok());
        named.unwrap_or_else(|| self.next.fetch_add(1, Ordering::Relaxed)) % self.len()
    }
}

/// What the entry's connections share.
#[derive(Debug)]
pub struct Shared {
    pub proxies: Proxies,
    pub metrics: Arc<Metrics>,
    pub seed: u64,
    requests: AtomicU64,
    /// Mirrored copies sent and not yet answered (or failed).
    mirrors_in_flight: Arc<watch::Sender<u64>>,
}

impl Shared {
    pub fn new(proxies: Proxies, metrics: Arc<Metrics>, seed: u64) -> Self {
        Self {
            proxies,
            metrics,
            seed,
            requests: AtomicU64::new(0),
            mirrors_in_flight: Arc::new(watch::channel(0).0),
        }
    }

    /// How many mirrored copies are on their way (sent, their answer not yet read).
    pub fn mirrors_in_flight(&self) -> u64 {
        *self.mirrors_in_flight.borrow()
    }

    /// Waits until no mirrored copy is on their way: every copy sent before has been answered (and so
    /// counted by the pod that answered) or has failed.
    pub async fn mirrors_done(&self) {
        let mut in_flight = self.mirrors_in_flight.subscribe();
        let _ = in_flight.wait_for(|n| *n == 0).await;
    }
}

/// Counts one mirrored copy in flight until dropped.
struct InFlight(Arc<watch::Sender<u64>>);

impl InFlight {
    fn start(counter: &Arc<watch::Sender<u64>>) -> Self {
        counter.send_modify(|n| *n += 1);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Why forwarding to a pod failed, with Envoy's answer for each.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// kubesim only connects to loopback addresses (pod IPs are loopback).
    #[error("kubesim only connects to loopback pod addresses, not {addr}")]
    NotLoopback { addr: std::net::SocketAddr },
    #[error("upstream connect error or disconnect/reset before headers. reset reason: connection failure")]
    Connect(#[source] std::io::Error),
    #[error("upstream connect error or disconnect/reset before headers. reset reason: connection failure")]
    ConnectTimeout,
    #[error("upstream connect error or disconnect/reset before headers. reset reason: connection termination")]
    Reset(#[source] hyper::Error),
    #[error("upstream request timeout")]
    Timeout,
}

impl ForwardError {
    fn status(&self) -> StatusCode {
        match self {
            ForwardError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ForwardError::NotLoopback { .. }
            | ForwardError::Connect(_)
            | ForwardError::ConnectTimeout
            | ForwardError::Reset(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn flags(&self) -> &'static str {
        match self {
            ForwardError::NotLoopback { .. } | ForwardError::Connect(_) | ForwardError::ConnectTimeout => "UF",
            ForwardError::Reset(_) => "UC",
            ForwardError::Timeout => "UT",
        }
    }
}

/// Serves the mesh entry on `listener` until dropped (open connections are dropped with it).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    super::serve_http1(listener, "mesh entry", move |req| {
        let shared = shared.clone();
        async move { handle(&shared, req).await }
    })
    .await;
}

/// One request through one proxy.
pub async fn handle<B>(shared: &Shared, req: Request<B>) -> Response<Full<Bytes>>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = Instant::now();
    let index = shared.proxies.pick(req.headers());
    let (generation, snapshot) = shared.proxies.view(index, started);
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let n = shared.requests.fetch_add(1, Ordering::Relaxed);
    let mut rng = Rng::new(shared.seed ^ n.rotate_left(17));
    let decision = route::route(
        &snapshot,
        &route::Request {
            authority: &authority,
            method: req.method().as_str(),
            path_and_query: &path_and_query,
            headers: req.headers(),
        },
        &mut rng,
    );
    drop(snapshot);
    let stamp = |mut response: Response<Full<Bytes>>, flags: &'static str| {
        let h = response.headers_mut();
        h.insert(PROXY_HEADER, HeaderValue::from(index));
        h.insert(GENERATION_HEADER, HeaderValue::from(generation));
        h.insert(FLAGS_HEADER, HeaderValue::from_static(flags));
        h.insert(header::SERVER, HeaderValue::from_static("istio-envoy"));
        response
    };
    let upstream = match decision {
        Ok(upstream) => upstream,
        Err(refusal) => {
            shared.metrics.record(refusal_labels(&refusal), started.elapsed());
            let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return stamp(local_reply(status, &refusal.to_string()), refusal.flags());
        }
    };
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            return stamp(
                local_reply(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("cannot read the request body: {error}"),
                ),
                "DPE",
            );
        }
    };
    let method = parts.method;
    let mut request_headers = parts.headers;
    headers::apply_all(&upstream.request_headers, &mut request_headers);
    send_mirrors(
        shared,
        &upstream,
        &method,
        &path_and_query,
        &authority,
        &request_headers,
        &body,
    );
    let result = forward_within(&upstream, &method, &path_and_query, &request_headers, body).await;
    let elapsed = started.elapsed();
    let mut labels = upstream_labels(&upstream);
    match result {
        Ok(mut response) => {
            labels.response_code = response.status().as_u16();
            shared.metrics.record(labels, elapsed);
            headers::apply_all(&upstream.response_headers, response.headers_mut());
            if let Ok(v) = HeaderValue::from_str(&elapsed.as_millis().to_string()) {
                response.headers_mut().insert("x-envoy-upstream-service-time", v);
            }
            stamp(response, "-")
        }
        Err(error) => {
            tracing::debug!(pod = %upstream.pod, addr = %upstream.addr, error = %crate::report(&error), "mesh: upstream failed");
            let status = error.status();
            labels.response_code = status.as_u16();
            labels.response_flags = error.flags();
            shared.metrics.record(labels, elapsed);
            // Envoy's own answer to a routed request gets the route's response headers too.
            let mut reply = local_reply(status, &error.to_string());
            headers::apply_all(&upstream.response_headers, reply.headers_mut());
            stamp(reply, error.flags())
        }
    }
}

/// [`forward`] within the route's timeout, if it has one.
async fn forward_within(
    upstream: &Upstream,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, ForwardError> {
    let forwarded = forward(upstream, method, path_and_query, headers, body);
    match upstream.timeout {
        Some(limit) => tokio::time::timeout(limit, forwarded)
            .await
            .unwrap_or(Err(ForwardError::Timeout)),
        None => forwarded.await,
    }
}

/// Sends the request's mirrored copies, each on its own task so the answer to the client never waits
/// for them: the same method, path, (changed) headers and body, the authority suffixed `-shadow`, within
/// the route's timeout. Their answers are dropped, and the proxy counts no `source` metric for them:
/// only the pod that answers one counts it (`reporter="destination"`), as with Envoy's shadows. A copy
/// with nowhere to go is dropped (debug log).
fn send_mirrors(
    shared: &Shared,
    upstream: &Upstream,
    method: &Method,
    path_and_query: &str,
    authority: &str,
    request_headers: &HeaderMap,
    body: &Bytes,
) {
    for mirror in &upstream.mirrors {
        let target = match mirror {
            Ok(target) => target.clone(),
            Err(refusal) => {
                tracing::debug!(reason = %refusal, flags = refusal.flags(), "mesh: mirrored copy dropped");
                continue;
            }
        };
        let mut copy_headers = request_headers.clone();
        if let Ok(v) = HeaderValue::from_str(&headers::shadow_authority(authority)) {
            copy_headers.insert(header::HOST, v);
        }
        let in_flight = InFlight::start(&shared.mirrors_in_flight);
        let (method, path, body) = (method.clone(), path_and_query.to_owned(), body.clone());
        tokio::spawn(async move {
            let _in_flight = in_flight;
            if let Err(error) = forward_within(&target, &method, &path, &copy_headers, body).await {
                tracing::debug!(pod = %target.pod, addr = %target.addr, error = %crate::report(&error),
                    "mesh: mirrored copy failed");
            }
        });
    }
}

fn local_reply(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

fn refusal_labels(refusal: &Refusal) -> Labels {
    let (service, name, namespace) = match refusal.service() {
        Some((ns, name)) => (
            format!("{name}.{ns}.{}", super::snapshot::CLUSTER_SUFFIX),
            name.clone(),
            ns.clone(),
        ),
        None => ("unknown".into(), "unknown".into(), "unknown".into()),
    };
    Labels {
        reporter: Reporter::Source,
        destination_service: service,
        destination_service_name: name,
        destination_service_namespace: namespace,
        destination_workload: "unknown".into(),
        destination_workload_namespace: "unknown".into(),
        destination_app: "unknown".into(),
        destination_version: "unknown".into(),
        response_code: refusal.status(),
        response_flags: refusal.flags(),
    }
}

fn upstream_labels(upstream: &Upstream) -> Labels {
    Labels {
        reporter: Reporter::Source,
        destination_service: upstream.service_host.clone(),
        destination_service_name: upstream.service.1.clone(),
        destination_service_namespace: upstream.service.0.clone(),
        destination_workload: upstream.workload.clone(),
        destination_workload_namespace: upstream.service.0.clone(),
        destination_app: upstream.app.clone(),
        destination_version: upstream.version.clone(),
        response_code: 0,
        response_flags: "-",
    }
}

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1), and ours.
fn forwardable(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
    ) && !name.as_str().starts_with("x-kubesim-")
}

/// Sends one request to the chosen pod on a fresh connection and reads the whole answer.
async fn forward(
    upstream: &Upstream,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, ForwardError> {
    if !upstream.addr.ip().is_loopback() {
        return Err(ForwardError::NotLoopback { addr: upstream.addr });
    }
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream.addr))
        .await
        .map_err(|_| ForwardError::ConnectTimeout)?
        .map_err(ForwardError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
        .await
        .map_err(ForwardError::Reset)?;
    let _connection = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method.clone();
    *request.uri_mut() = path_and_query.parse::<Uri>().unwrap_or_else(|_| Uri::from_static("/"));
    let out = request.headers_mut();
    for (name, value) in headers.iter().filter(|(name, _)| forwardable(name)) {
        out.append(name.clone(), value.clone());
    }
    out.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Ok(v) = HeaderValue::from_str(&upstream.service_host) {
        out.insert(DESTINATION_SERVICE_HEADER, v);
    }
    let response = sender.send_request(request).await.map_err(ForwardError::Reset)?;
    let (mut parts, body) = response.into_parts();
    let body = body.collect().await.map_err(ForwardError::Reset)?.to_bytes();
    parts.headers.retain_forwardable();
    Ok(Response::from_parts(parts, Full::new(body)))
}

trait RetainForwardable {
    fn retain_forwardable(&mut self);
}

impl RetainForwardable for HeaderMap {
    fn retain_forwardable(&mut self) {
        let drop: Vec<HeaderName> = self.keys().filter(|n| !forwardable(n)).cloned().collect();
        for name in drop {
            self.remove(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(generation: u64) -> Published {
        (generation, Arc::new(Snapshot::default()))
    }

    #[test]
    fn each_proxy_adopts_a_change_within_the_bound_and_never_goes_back() {
        let max = Duration::from_millis(100);
        let proxies = Proxies::new(8, max, published(0), 42);
        let t0 = Instant::now();
        let mut last = vec![0; proxies.len()];
        for ms in 0..=400u64 {
            let now = t0 + Duration::from_millis(ms);
            if ms % 10 == 0 && (1..=20).contains(&(ms / 10)) {
                proxies.publish(&published(ms / 10), now);
            }
            for (i, seen) in last.iter_mut().enumerate() {
                let (g, _) = proxies.view(i, now);
                assert!(g >= *seen, "proxy {i} went back from {seen} to {g}");
                // Every generation published at least `max` ago is held (or a newer one).
                let due = (ms.saturating_sub(100) / 10).min(20);
                assert!(g >= due, "proxy {i} at {ms} ms holds {g}, should hold at least {due}");
                *seen = g;
            }
        }
        assert!(last.iter().all(|&g| g == 20));
        assert!(proxies.settled_at() <= t0 + Duration::from_millis(300));
    }

    #[test]
    fn proxies_adopt_changes_at_different_moments() {
        let proxies = Proxies::new(16, Duration::from_secs(1), published(0), 7);
        let t0 = Instant::now();
        proxies.publish(&published(1), t0);
        let halfway: Vec<u64> = (0..16)
            .map(|i| proxies.view(i, t0 + Duration::from_millis(500)).0)
            .collect();
        assert!(halfway.contains(&0) && halfway.contains(&1), "{halfway:?}");
    }

    #[test]
    fn a_named_proxy_is_used_and_others_take_turns() {
        let proxies = Proxies::new(4, Duration::ZERO, published(0), 1);
        let mut named = HeaderMap::new();
        named.insert(PROXY_HEADER, HeaderValue::from_static("6"));
        assert_eq!(proxies.pick(&named), 2);
        let turns: Vec<usize> = (0..5).map(|_| proxies.pick(&HeaderMap::new())).collect();
        assert_eq!(turns, vec![0, 1, 2, 3, 0]);
    }

    /// What a recording server saw of one request.
    #[derive(Debug)]
    struct Seen {
        method: String,
        path: String,
        headers: HeaderMap,
        body: Bytes,
    }

    /// A server on `127.0.0.1` answering `status` with `body` and `set-cookie: session=1`, telling the
    /// test each request, and answering only once `release` has a permit.
    async fn recording_server(
        status: u16,
        body: &'static str,
        release: Arc<tokio::sync::Semaphore>,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<Seen>,
        AbortOnDrop,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(super::super::serve_http1(
            listener,
            "test",
            move |req: Request<hyper::body::Incoming>| {
                let (tx, release) = (tx.clone(), release.clone());
                async move {
                    let (parts, incoming) = req.into_parts();
                    let body_bytes = incoming.collect().await.unwrap().to_bytes();
                    let _ = tx.send(Seen {
                        method: parts.method.to_string(),
                        path: parts.uri.to_string(),
                        headers: parts.headers,
                        body: body_bytes,
                    });
                    release.acquire().await.unwrap().forget();
                    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                    response
                        .headers_mut()
                        .insert("set-cookie", HeaderValue::from_static("session=1"));
                    response
                        .headers_mut()
                        .insert("x-powered-by", HeaderValue::from_static("test"));
                    response
                }
            },
        ));
        (addr, rx, AbortOnDrop(task))
    }

    fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_mirrored_copy_goes_to_the_shadow_host_without_delaying_the_answer_and_headers_change() {
        use serde_json::json;
        let open = Arc::new(tokio::sync::Semaphore::new(1000));
        let held = Arc::new(tokio::sync::Semaphore::new(0));
        let (primary_addr, mut primary_seen, _primary) = recording_server(200, "primary", open).await;
        let (mirror_addr, mut mirror_seen, _mirror) = recording_server(500, "mirror", held.clone()).await;
        let service = |name: &str| {
            json!({"metadata": {"name": name, "namespace": "demo"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
        };
        let slice = |service: &str, pod: &str| {
            json!({"metadata": {"name": format!("{service}-slice"), "namespace": "demo",
                    "labels": {"kubernetes.io/service-name": service}},
                "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true},
                    "targetRef": {"kind": "Pod", "name": pod}}],
                "ports": [{"name": "http", "port": 8080}]})
        };
        let pod = |name: &str| json!({"metadata": {"name": name, "namespace": "demo", "labels": {"app": "web"}}});
        let vs = json!({"metadata": {"name": "web", "namespace": "demo"}, "spec": {"hosts": ["web"], "http": [{
            "route": [{"destination": {"host": "web"},
                "headers": {"response": {"add": {"set-cookie": "canary=always"}}}}],
            "mirror": {"host": "web-shadow"},
            "headers": {"request": {"set": {"x-route": "1"}, "remove": ["x-secret"]},
                        "response": {"remove": ["x-powered-by"]}}}]}});
        let (web, shadow) = (service("web"), service("web-shadow"));
        let (web_slice, shadow_slice) = (slice("web", "web-0"), slice("web-shadow", "shadow-0"));
        let (web_pod, shadow_pod) = (pod("web-0"), pod("shadow-0"));
        let snapshot = crate::mesh::snapshot::build(crate::mesh::snapshot::Objects {
            services: vec![&web, &shadow],
            slices: vec![&web_slice, &shadow_slice],
            pods: vec![
                (&web_pod, "web".into(), [(8080, primary_addr)].into()),
                (&shadow_pod, "web-shadow".into(), [(8080, mirror_addr)].into()),
            ],
            virtual_services: vec![&vs],
            ..crate::mesh::snapshot::Objects::default()
        });
        let proxies = Proxies::new(1, Duration::ZERO, (1, Arc::new(snapshot)), 1);
        let shared = Shared::new(proxies, Arc::new(Metrics::default()), 1);

        let request = Request::post("/submit?x=1")
            .header("host", "web.demo:80")
            .header("x-secret", "s")
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap();
        // The mirror holds its answer: the client's answer comes anyway.
        let response = tokio::time::timeout(Duration::from_secs(10), handle(&shared, request))
            .await
            .expect("the answer does not wait for the mirror");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(values(response.headers(), "set-cookie"), ["session=1", "canary=always"]);
        assert!(response.headers().get("x-powered-by").is_none());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "primary", "the answer is the primary's");
        assert_eq!(shared.mirrors_in_flight(), 1);

        let primary = primary_seen.recv().await.unwrap();
        let copy = tokio::time::timeout(Duration::from_secs(10), mirror_seen.recv())
            .await
            .expect("the copy arrives")
            .unwrap();
        assert_eq!(values(&primary.headers, "host"), ["web.demo:80"]);
        assert_eq!(values(&copy.headers, "host"), ["web.demo-shadow:80"]);
        for seen in [&primary, &copy] {
            assert_eq!((seen.method.as_str(), seen.path.as_str()), ("POST", "/submit?x=1"));
            assert_eq!(seen.body, "hello");
            assert_eq!(values(&seen.headers, "x-route"), ["1"], "request changes reach both");
            assert!(seen.headers.get("x-secret").is_none());
        }
        assert_eq!(
            values(&copy.headers, super::super::pod::DESTINATION_SERVICE_HEADER),
            ["web-shadow.demo.svc.cluster.local"]
        );
        held.add_permits(1);
        tokio::time::timeout(Duration::from_secs(10), shared.mirrors_done())
            .await
            .expect("the copy completes");
        assert_eq!(shared.mirrors_in_flight(), 0);
        // The proxy counts the request once, for its own destination; the copy is not a source request.
        let text = shared.metrics.render();
        let sources: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{") && l.contains(r#"reporter="source""#))
            .collect();
        assert_eq!(sources.len(), 1, "{text}");
        assert!(
            sources[0].contains(r#"destination_service="web.demo.svc.cluster.local""#) && sources[0].ends_with(" 1")
        );
        assert!(!text.contains("web-shadow"), "{text}");
    }
}
