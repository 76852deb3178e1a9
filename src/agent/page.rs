//! The release page on the admin port: `/releases` (one HTML page, no framework), and the two JSON
//! documents it polls:
//!
//! - `/releases/data`: every release in flight and the recent ones, with phase, strategy, weights per
//!   version, the last analysis checks (value against bound) and turnout's Events;
//! - `/releases/series?namespace=&deployment=&start=&end=`: requests per second and success rate per
//!   version over the release, from Prometheus.
//!
//! The page is read-only. By default it is served to loopback peers only (`kubectl port-forward` arrives
//! on the pod's loopback), see [`Access`].
//!
//! ```text
//!  browser ──GET /releases/data (every 2 s)──▶ Page ──▶ Deployments (the leader's cache, else a LIST)
//!                                                  ├──▶ Events with source=turnout (one LIST)
//!                                                  └──▶ Board: the last checks this replica ran
//!          ──GET /releases/series (every 5 s)──▶ Page ──▶ Prometheus query_range
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Namespace};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde::Serialize;

use super::Context;
use super::analysis::{Check, Series};
use crate::gateway::http_route::HttpRoute;
use crate::istio::virtual_service::VirtualService;
use crate::names::annotations;
use crate::release::{Phase, reasons};

/// The page itself.
const HTML: &str = include_str!("page.html");

/// How long one answer of `/releases/data` is served again to every viewer.
const DATA_TTL: Duration = Duration::from_secs(1);

/// Ended releases shown at most (the latest first).
const RECENT: usize = 20;

/// Events shown per release at most (the latest).
const EVENTS: usize = 12;

/// The longest window the chart asks Prometheus for.
const MAX_WINDOW: u64 = 6 * 3600;

/// Who may see the release page (`--release-page`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Access {
    /// Loopback peers only: `kubectl port-forward`, or a browser on the same machine.
    #[default]
    Loopback,
    /// Every peer that reaches the admin port.
    Any,
    /// Not served.
    Off,
}

/// The page's flag.
#[derive(Clone, Debug, clap::Args)]
#[group(id = "release-page-options")]
pub struct Args {
    /// Who is served the release page at /releases on the admin port: loopback (kubectl port-forward),
    /// any peer, or off. The page is read-only and shows release names, Events and check values.
    #[arg(long, env = "TURNOUT_RELEASE_PAGE", value_enum, default_value_t = Access::Loopback)]
    pub release_page: Access,
}

/// What the agent ran for each release, kept for the page: only the replica that leads has it.
#[derive(Debug, Default)]
pub struct Board {
    entries: Mutex<HashMap<(String, String), Entry>>,
}

#[derive(Clone, Debug, Default)]
struct Entry {
    /// The release the checks are about.
    release: u64,
    checks: Vec<CheckRow>,
    checked_at: Option<SystemTime>,
}

impl Board {
    /// The checks of one analysis of `release` of `ns/name`.
    pub fn checked(&self, ns: &str, name: &str, release: u64, checks: &[Check], at: SystemTime) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.insert(
            (ns.to_owned(), name.to_owned()),
            Entry {
                release,
                checks: checks.iter().map(CheckRow::of).collect(),
                checked_at: Some(at),
            },
        );
    }

    /// Drops what is kept of `ns/name` (deleted, or no longer managed).
    pub fn forget(&self, ns: &str, name: &str) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(ns.to_owned(), name.to_owned()));
    }

    fn get(&self, ns: &str, name: &str) -> Option<Entry> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned()
    }
}

/// One analysis check as shown.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckRow {
    pub name: String,
    pub passed: bool,
    pub value: Option<f64>,
    pub bound: Option<String>,
    pub detail: String,
}

impl CheckRow {
    fn of(c: &Check) -> Self {
        Self {
            name: c.name.to_owned(),
            passed: c.passed,
            value: c.value,
            bound: c.bound.clone(),
            detail: c.detail.clone(),
        }
    }
}

/// One Event as shown.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventRow {
    /// RFC 3339.
    pub time: String,
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

/// One release as shown.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    #[serde(flatten)]
    pub release: crate::status::Release,
    /// The release has not ended.
    pub in_flight: bool,
    /// How the release moves traffic.
    pub strategy: &'static str,
    /// When the release started (its `Started` or `Superseded` Event), RFC 3339.
    pub started: Option<String>,
    /// When it ended (its latest Event, once ended), RFC 3339.
    pub ended: Option<String>,
    /// The last analysis this replica ran for the release shown.
    pub checks: Vec<CheckRow>,
    pub checked_at: Option<String>,
    pub timeline: Vec<EventRow>,
}

/// The document of `/releases/data`.
#[derive(Clone, Debug, Serialize)]
pub struct Data {
    /// RFC 3339.
    pub generated_at: String,
    /// This replica runs releases (else the checks are the leader's to show).
    pub leading: bool,
    pub releases: Vec<Row>,
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Page")
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

/// Serves the release page.
pub struct Page {
    ctx: Arc<Context>,
    access: Access,
    cached: Mutex<Option<(Instant, Bytes)>>,
}

impl Page {
    pub(super) fn new(ctx: Arc<Context>, access: Access) -> Self {
        Self {
            ctx,
            access,
            cached: Mutex::new(None),
        }
    }

    /// Whether `path` is the page's.
    pub fn owns(path: &str) -> bool {
        path == "/releases" || path.starts_with("/releases/")
    }

    /// Answers a GET of one of the page's paths from `peer`.
    pub async fn serve(&self, path: &str, query: Option<&str>, peer_loopback: bool) -> Response<Full<Bytes>> {
        if let Some(refused) = refusal(self.access, peer_loopback) {
            return refused;
        }
        match path {
            "/releases" => body(
                StatusCode::OK,
                "text/html; charset=utf-8",
                Bytes::from_static(HTML.as_bytes()),
            ),
            // The page fetches relative to its own address.
            "/releases/" => {
                let mut moved = crate::admin::text(StatusCode::PERMANENT_REDIRECT, "moved to /releases\n");
                moved
                    .headers_mut()
                    .insert(header::LOCATION, header::HeaderValue::from_static("/releases"));
                moved
            }
            "/releases/data" => match self.data().await {
                Ok(json) => body(StatusCode::OK, "application/json", json),
                Err(e) => json_error(StatusCode::BAD_GATEWAY, &format!("cannot read the cluster: {e}")),
            },
            "/releases/series" => self.series(query.unwrap_or_default()).await,
            _ => crate::admin::text(StatusCode::NOT_FOUND, "not found: try /releases\n"),
        }
    }

    async fn data(&self) -> Result<Bytes, kube::Error> {
        if let Some((at, json)) = &*self.cached.lock().unwrap_or_else(PoisonError::into_inner)
            && at.elapsed() < DATA_TTL
        {
            return Ok(json.clone());
        }
        let client = &self.ctx.client;
        let leading = self.ctx.caches.read().unwrap_or_else(PoisonError::into_inner).is_some();
        let deployments = self.deployments().await?;
        let (virtual_services, http_routes) = self.routes().await;
        let events = Api::<Event>::all(client.clone())
            .list(&ListParams::default().fields(&format!("source={}", super::act::MANAGER)))
            .await?
            .items;
        let namespaces = self.namespaces().await?;
        let strategy = |d: &Deployment| {
            let ns = d.namespace().unwrap_or_default();
            let ns_annotations = namespaces
                .iter()
                .find(|n| n.name_any() == ns)
                .map(|n| n.annotations().clone())
                .unwrap_or_default();
            // The strategy the release recorded, else the one configured.
            d.annotations()
                .get(crate::names::annotations::RELEASE_STRATEGY)
                .and_then(|s| crate::release::Strategy::parse(s))
                .unwrap_or_else(|| {
                    crate::config::resolve(&self.ctx.defaults, &ns_annotations, d.annotations())
                        .0
                        .strategy
                })
                .as_str()
        };
        let data = Data {
            generated_at: super::routing::rfc3339(super::now_millis()),
            leading,
            releases: rows(
                &deployments,
                &virtual_services,
                &http_routes,
                &events,
                &self.ctx.board,
                strategy,
            ),
        };
        let json = Bytes::from(serde_json::to_vec(&data).unwrap_or_default());
        *self.cached.lock().unwrap_or_else(PoisonError::into_inner) = Some((Instant::now(), json.clone()));
        Ok(json)
    }

    /// The Deployments with a release: from the leader's cache, else listed.
    async fn deployments(&self) -> Result<Vec<Deployment>, kube::Error> {
        let store = self
            .ctx
            .deployments
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let all = match store {
            Some(store) => store.state().iter().map(|d| (**d).clone()).collect(),
            None => {
                Api::<Deployment>::all(self.ctx.client.clone())
                    .list(&ListParams::default())
                    .await?
                    .items
            }
        };
        Ok(all
            .into_iter()
            .filter(|d| d.annotations().contains_key(annotations::PHASE))
            .collect())
    }

    /// The namespaces (for their release settings), from the leader's cache, else listed.
    async fn namespaces(&self) -> Result<Vec<Namespace>, kube::Error> {
        let caches = self.ctx.caches.read().unwrap_or_else(PoisonError::into_inner).clone();
        match caches {
            Some(c) => Ok(c.namespaces.state().iter().map(|n| (**n).clone()).collect()),
            None => Ok(Api::<Namespace>::all(self.ctx.client.clone())
                .list(&ListParams::default())
                .await?
                .items),
        }
    }

    /// The routes turnout may own, from the caches or listed; none of a kind whose CRD is missing.
    async fn routes(&self) -> (Vec<VirtualService>, Vec<HttpRoute>) {
        let caches = self.ctx.caches.read().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(c) = caches {
            let vs = c.virtual_services.state().iter().map(|v| (**v).clone()).collect();
            let hr = c.http_routes.state().iter().map(|r| (**r).clone()).collect();
            return (vs, hr);
        }
        let client = &self.ctx.client;
        let vs = Api::<VirtualService>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let hr = Api::<HttpRoute>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        (vs, hr)
    }

    /// Requests per second and success rate per version of one Deployment's release.
    async fn series(&self, query: &str) -> Response<Full<Bytes>> {
        let q: HashMap<String, String> = url_params(query);
        let (Some(ns), Some(name)) = (q.get("namespace"), q.get("deployment")) else {
            return json_error(StatusCode::BAD_REQUEST, "namespace and deployment are required");
        };
        let now = super::now_millis() / 1000;
        let end = q.get("end").and_then(|e| e.parse::<u64>().ok()).unwrap_or(now).min(now);
        let start = q
            .get("start")
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(end.saturating_sub(900))
            .clamp(end.saturating_sub(MAX_WINDOW), end.saturating_sub(60));
        let client = &self.ctx.client;
        let d = match Api::<Deployment>::namespaced(client.clone(), ns).get_opt(name).await {
            Ok(Some(d)) => d,
            Ok(None) => return json_error(StatusCode::NOT_FOUND, &format!("no Deployment {ns}/{name}")),
            Err(e) => return json_error(StatusCode::BAD_GATEWAY, &format!("cannot read {ns}/{name}: {e}")),
        };
        let namespace = match Api::<Namespace>::all(client.clone()).get_opt(ns).await {
            Ok(n) => n.unwrap_or_default(),
            Err(e) => return json_error(StatusCode::BAD_GATEWAY, &format!("cannot read namespace {ns}: {e}")),
        };
        let (config, _) = crate::config::resolve(&self.ctx.defaults, namespace.annotations(), d.annotations());
        let Some(prometheus) = config.prometheus.clone() else {
            return json_error(
                StatusCode::OK,
                "no Prometheus for this Deployment (--prometheus or turnout.dev/prometheus): no chart",
            );
        };
        let step = ((end - start) / 150).max(1);
        let window = config.interval.as_secs().max(10).max(step * 2);
        let (rps, success) = queries(ns, name, window);
        let analyser = &self.ctx.analyser;
        let answers = tokio::join!(
            analyser.range(&prometheus, &rps, start, end, step),
            analyser.range(&prometheus, &success, start, end, step)
        );
        match answers {
            (Ok(rps), Ok(success)) => {
                let doc = serde_json::json!({
                    "start": start,
                    "end": end,
                    "step": step,
                    "rps": by_version(rps, name),
                    "success": by_version(success, name),
                });
                body(StatusCode::OK, "application/json", Bytes::from(doc.to_string()))
            }
            (Err(e), _) | (_, Err(e)) => json_error(StatusCode::OK, &e),
        }
    }
}

/// The answer to a peer the page is not served to, if so.
fn refusal(access: Access, peer_loopback: bool) -> Option<Response<Full<Bytes>>> {
    match access {
        Access::Off => Some(crate::admin::text(
            StatusCode::NOT_FOUND,
            "the release page is off (--release-page=off)\n",
        )),
        Access::Loopback if !peer_loopback => Some(crate::admin::text(
            StatusCode::FORBIDDEN,
            "the release page is served to loopback only (--release-page=loopback): \
             kubectl -n turnout-system port-forward deploy/turnout 8080, then open http://localhost:8080/releases\n",
        )),
        _ => None,
    }
}

/// The PromQL of the chart: requests per second and success rate (percent) per workload of the
/// Deployment `name` (the Deployment and its candidates `name-vN`), over a rate window of `window`
/// seconds.
pub fn queries(ns: &str, name: &str, window: u64) -> (String, String) {
    let selector = format!(
        r#"reporter="destination",destination_workload_namespace="{ns}",destination_workload=~"{}(-v[0-9]+)?""#,
        regex_escape(name)
    );
    let rps = format!("sum by (destination_workload) (rate(istio_requests_total{{{selector}}}[{window}s]))");
    let success = format!(
        r#"100 * sum by (destination_workload) (rate(istio_requests_total{{{selector},response_code!~"5.."}}[{window}s])) / sum by (destination_workload) (rate(istio_requests_total{{{selector}}}[{window}s]))"#
    );
    (rps, success)
}

/// `s` as a literal inside a PromQL regex string: a dot (the only regex character a Deployment name
/// may hold) escaped, the backslash doubled for the string.
fn regex_escape(s: &str) -> String {
    s.replace('.', "\\\\.")
}

/// The chart's lines: one per workload, a candidate (`name-vN`) with its revision.
fn by_version(series: Vec<Series>, name: &str) -> Vec<serde_json::Value> {
    series
        .into_iter()
        .map(|s| {
            let version = s.labels.get("destination_workload").cloned().unwrap_or_default();
            let revision = version
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix("-v"))
                .and_then(|n| n.parse::<u64>().ok());
            serde_json::json!({ "version": version, "revision": revision, "points": s.points })
        })
        .collect()
}

/// The releases to show: every one in flight (by namespace and name), then the ended ones with an
/// Event of turnout's still kept, the latest first, at most [`RECENT`].
pub fn rows(
    deployments: &[Deployment],
    virtual_services: &[VirtualService],
    http_routes: &[HttpRoute],
    events: &[Event],
    board: &Board,
    strategy: impl Fn(&Deployment) -> &'static str,
) -> Vec<Row> {
    let mut by_deployment: HashMap<(&str, &str), Vec<&Event>> = HashMap::new();
    for e in events {
        let o = &e.involved_object;
        if o.kind.as_deref() != Some("Deployment") {
            continue;
        }
        if let (Some(ns), Some(name)) = (o.namespace.as_deref(), o.name.as_deref()) {
            by_deployment.entry((ns, name)).or_default().push(e);
        }
    }
    for list in by_deployment.values_mut() {
        list.sort_by_key(|e| event_time(e));
    }
    let mut in_flight = Vec::new();
    let mut ended = Vec::new();
    for d in deployments {
        let ns = d.namespace().unwrap_or_default();
        let name = d.name_any();
        let release = crate::status::release(d, virtual_services, http_routes);
        let phase = Phase::parse(&release.phase);
        let live = phase.is_some_and(|p| !p.is_final());
        let own: &[&Event] = by_deployment
            .get(&(ns.as_str(), name.as_str()))
            .map_or(&[], Vec::as_slice);
        // Only the Events of this Deployment object (a Deployment recreated under the same name is
        // another).
        let uid = d.uid();
        let own: Vec<&Event> = own
            .iter()
            .copied()
            .filter(|e| e.involved_object.uid.is_none() || e.involved_object.uid == uid)
            .collect();
        if !live && own.is_empty() {
            continue;
        }
        let started = own
            .iter()
            .rev()
            .find(|e| matches!(e.reason.as_deref(), Some(reasons::STARTED | reasons::SUPERSEDED)))
            .and_then(|e| event_time(e))
            .map(|t| t.to_string());
        let last = own.last().and_then(|e| event_time(e));
        let entry = board.get(&ns, &name).filter(|e| Some(e.release) == release.revision);
        let timeline = own
            .iter()
            .rev()
            .take(EVENTS)
            .rev()
            .map(|e| EventRow {
                time: event_time(e).map(|t| t.to_string()).unwrap_or_default(),
                warning: e.type_.as_deref() == Some("Warning"),
                reason: e.reason.clone().unwrap_or_default(),
                message: e.message.clone().unwrap_or_default(),
            })
            .collect();
        let row = Row {
            in_flight: live,
            strategy: strategy(d),
            started,
            ended: (!live).then(|| last.map(|t| t.to_string())).flatten(),
            checks: entry.as_ref().map(|e| e.checks.clone()).unwrap_or_default(),
            checked_at: entry
                .and_then(|e| e.checked_at)
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| super::routing::rfc3339(u64::try_from(d.as_millis()).unwrap_or(0))),
            timeline,
            release,
        };
        if live {
            in_flight.push(row);
        } else {
            ended.push((last, row));
        }
    }
    in_flight.sort_by(|a, b| (&a.release.namespace, &a.release.name).cmp(&(&b.release.namespace, &b.release.name)));
    ended.sort_by_key(|e| std::cmp::Reverse(e.0));
    in_flight
        .into_iter()
        .chain(ended.into_iter().take(RECENT).map(|(_, row)| row))
        .collect()
}

fn event_time(e: &Event) -> Option<k8s_openapi::jiff::Timestamp> {
    e.event_time
        .as_ref()
        .map(|t| t.0)
        .or_else(|| e.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.first_timestamp.as_ref().map(|t| t.0))
}

/// The parameters of a query string, percent-decoded.
fn url_params(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn body(status: StatusCode, content_type: &'static str, bytes: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(bytes));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    headers.insert(
        header::HeaderName::from_static("x-content-type-options"),
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'"),
    );
    response
}

fn json_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    body(
        status,
        "application/json",
        Bytes::from(serde_json::json!({ "error": message }).to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(ns: &str, name: &str, annotations: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": { "namespace": ns, "name": name, "uid": format!("uid-{name}"), "annotations": annotations },
            "spec": { "selector": {}, "template": {} }
        }))
        .unwrap()
    }

    fn event(ns: &str, name: &str, uid: &str, reason: &str, at: &str) -> Event {
        serde_json::from_value(json!({
            "metadata": { "namespace": ns, "name": format!("{name}.{reason}") },
            "involvedObject": { "kind": "Deployment", "namespace": ns, "name": name, "uid": uid },
            "reason": reason, "message": format!("{reason} of {name}"), "type": "Normal",
            "lastTimestamp": at
        }))
        .unwrap()
    }

    #[test]
    fn releases_in_flight_come_first_then_the_ended_ones_with_events_latest_first() {
        let progressing = deployment(
            "shop",
            "web",
            json!({ "turnout.dev/phase": "Progressing", "turnout.dev/stable-revision": "1",
                    "turnout.dev/release": "2", "turnout.dev/weight": "25", "turnout.dev/routing": "none" }),
        );
        let older = deployment("shop", "cart", json!({ "turnout.dev/phase": "Succeeded" }));
        let newer = deployment("shop", "api", json!({ "turnout.dev/phase": "RolledBack" }));
        let forgotten = deployment("shop", "old", json!({ "turnout.dev/phase": "Succeeded" }));
        let events = vec![
            event("shop", "web", "uid-web", "Started", "2026-12-07T10:00:00Z"),
            event("shop", "web", "uid-web", "Progressing", "2026-12-07T10:01:00Z"),
            event("shop", "cart", "uid-cart", "Succeeded", "2026-12-07T09:00:00Z"),
            event("shop", "api", "uid-api", "Started", "2026-12-07T09:10:00Z"),
            event("shop", "api", "uid-api", "RolledBack", "2026-12-07T09:30:00Z"),
            // Of an earlier Deployment of the same name.
            event("shop", "old", "uid-gone", "Succeeded", "2026-12-07T09:40:00Z"),
        ];
        let board = Board::default();
        let check = Check {
            name: "success-rate",
            passed: false,
            detail: "success rate 90.0% < 99%".into(),
            value: Some(90.0),
            bound: Some(">= 99%".into()),
        };
        board.checked("shop", "web", 2, std::slice::from_ref(&check), SystemTime::UNIX_EPOCH);
        // Checks of another release of the same Deployment are not shown.
        board.checked("shop", "api", 7, &[check], SystemTime::UNIX_EPOCH);
        let rows = rows(
            &[older, progressing, newer, forgotten],
            &[],
            &[],
            &events,
            &board,
            |d| {
                if d.name_any() == "web" { "ab" } else { "canary" }
            },
        );
        let names: Vec<&str> = rows.iter().map(|r| r.release.name.as_str()).collect();
        assert_eq!(names, ["web", "api", "cart"]);
        let web = &rows[0];
        assert!(web.in_flight);
        assert_eq!((web.strategy, rows[1].strategy), ("ab", "canary"));
        assert_eq!(web.started.as_deref(), Some("2026-12-07T10:00:00Z"));
        assert_eq!(web.ended, None);
        assert_eq!(web.release.weights.get("v1"), Some(&75));
        assert_eq!(web.checks.len(), 1);
        assert_eq!(web.checks[0].value, Some(90.0));
        assert_eq!(web.checks[0].bound.as_deref(), Some(">= 99%"));
        assert_eq!(web.timeline.len(), 2);
        let api = &rows[1];
        assert!(!api.in_flight);
        assert_eq!(api.ended.as_deref(), Some("2026-12-07T09:30:00Z"));
        assert!(api.checks.is_empty());
    }

    #[test]
    fn the_page_is_refused_to_other_peers_unless_opened_to_any() {
        assert_eq!(
            refusal(Access::Loopback, false).map(|r| r.status()),
            Some(StatusCode::FORBIDDEN)
        );
        assert!(refusal(Access::Loopback, true).is_none());
        assert!(refusal(Access::Any, false).is_none());
        assert_eq!(
            refusal(Access::Off, true).map(|r| r.status()),
            Some(StatusCode::NOT_FOUND)
        );
    }

    #[test]
    fn the_chart_queries_select_the_deployment_and_its_candidates() {
        let (rps, success) = queries("shop", "web.v2", 30);
        assert_eq!(
            rps,
            r#"sum by (destination_workload) (rate(istio_requests_total{reporter="destination",destination_workload_namespace="shop",destination_workload=~"web\\.v2(-v[0-9]+)?"}[30s]))"#
        );
        assert!(success.starts_with("100 * sum by (destination_workload)"), "{success}");
        assert!(success.contains(r#"response_code!~"5..""#), "{success}");
    }

    #[test]
    fn query_strings_are_decoded() {
        let q = url_params("namespace=shop%2Da&deployment=web+app&start=10&bad=%zz");
        assert_eq!(q["namespace"], "shop-a");
        assert_eq!(q["deployment"], "web app");
        assert_eq!(q["start"], "10");
        assert_eq!(q["bad"], "%zz");
    }
}
