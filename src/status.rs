//! `turnout status`: the releases of Deployments as a table or JSON — phase, revision, routing,
//! strategy, weights per subset, failed checks, message, and for one Deployment its latest Events.
//!
//! Exit codes: 0 shown; 1 the cluster could not be read; 2 bad usage; 3 the Deployment does not exist.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Event;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde::Serialize;

use crate::agent::routing::gateway_api;
use crate::gateway::http_route::HttpRoute;
use crate::istio::virtual_service::VirtualService;
use crate::names::{agent, annotations};

/// Show releases.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// One Deployment (default: every Deployment turnout manages in the namespace).
    pub deployment: Option<String>,
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long, conflicts_with_all = ["namespace", "deployment"])]
    pub all_namespaces: bool,
    /// Print again whenever something changes, until interrupted.
    #[arg(short, long)]
    pub watch: bool,
    /// How often --watch reads the cluster.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// One Deployment's release, as shown.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Release {
    pub namespace: String,
    pub name: String,
    /// `turnout.dev/phase`, or `-` before the first release.
    pub phase: String,
    /// The revision the status is about (`turnout.dev/release`), else the template's.
    pub revision: Option<u64>,
    /// The stable revision while a release is recorded.
    pub stable: Option<u64>,
    /// The routing provider of the release (`turnout.dev/routing`), once it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing: Option<String>,
    /// The strategy of the release (`turnout.dev/release-strategy`), once it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Weight per backend of the managed route (VirtualService or HTTPRoute); `host` when it routes to
    /// every pod.
    pub weights: BTreeMap<String, u8>,
    pub failed_checks: u32,
    pub message: String,
    /// The Deployment is paused (as it is during every release until hand-off).
    pub paused: bool,
    /// The release is paused on request (`turnout pause`).
    pub held: bool,
    /// A request the agent has not acted on yet (`turnout.dev/request`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// The latest Events turnout recorded, oldest first (when one Deployment is asked for).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
}

/// What went wrong, with the exit code scripts can rely on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Cluster(String),
    #[error("deployment {name} not found in namespace {namespace}")]
    NotFound { namespace: String, name: String },
    /// The release cannot take the request now.
    #[error("refused: {0}")]
    Refused(String),
    /// `--wait` ran out of time.
    #[error("{0}")]
    Timeout(String),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Cluster(_) => 1,
            Error::NotFound { .. } => 3,
            Error::Refused(_) => 4,
            Error::Timeout(_) => 5,
        }
    }
}

fn cluster(e: impl std::fmt::Display) -> Error {
    Error::Cluster(e.to_string())
}

/// Runs `turnout status`, writing to `out`.
///
/// # Errors
///
/// The cluster cannot be read, or the Deployment does not exist.
pub async fn run(args: &Args, out: &mut impl Write) -> Result<(), Error> {
    let (client, namespace) = client(args.namespace.as_deref()).await?;
    let mut last = String::new();
    loop {
        let releases = read(&client, args, &namespace).await?;
        let text = match args.output {
            Output::Table => table(&releases),
            Output::Json => serde_json::to_string_pretty(&releases).map_err(cluster)? + "\n",
        };
        if text != last {
            if args.watch && !last.is_empty() {
                writeln!(out).map_err(cluster)?;
            }
            out.write_all(text.as_bytes()).map_err(cluster)?;
            out.flush().map_err(cluster)?;
            last = text;
        }
        if !args.watch {
            return Ok(());
        }
        tokio::time::sleep(args.interval).await;
    }
}

/// A client from the kubeconfig, and the namespace to use: `namespace`, else the context's.
///
/// # Errors
///
/// No usable client configuration.
pub async fn client(namespace: Option<&str>) -> Result<(Client, String), Error> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| Error::Cluster(format!("no Kubernetes client configuration: set KUBECONFIG ({e})")))?;
    let namespace = namespace.map_or_else(|| config.default_namespace.clone(), str::to_owned);
    Ok((Client::try_from(config).map_err(cluster)?, namespace))
}

async fn read(client: &Client, args: &Args, namespace: &str) -> Result<Vec<Release>, Error> {
    let (deployments, services, http_routes): (Api<Deployment>, Api<VirtualService>, Api<HttpRoute>) =
        if args.all_namespaces {
            (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            )
        } else {
            (
                Api::namespaced(client.clone(), namespace),
                Api::namespaced(client.clone(), namespace),
                Api::namespaced(client.clone(), namespace),
            )
        };
    let list = match &args.deployment {
        Some(name) => vec![get_deployment(&deployments, namespace, name).await?],
        None => deployments
            .list(&ListParams::default())
            .await
            .map_err(cluster)?
            .items
            .into_iter()
            .filter(|d| d.annotations().contains_key(annotations::REVISION))
            .collect(),
    };
    let managed = ListParams::default().labels(&format!("{}={}", agent::MANAGED_BY, agent::TURNOUT));
    // Without a provider's CRDs there are no weights of its to show; the rest still is.
    let routes = services.list(&managed).await.map(|l| l.items).unwrap_or_default();
    let http_routes = http_routes.list(&managed).await.map(|l| l.items).unwrap_or_default();
    let mut releases: Vec<Release> = list
        .iter()
        .filter(|d| !d.labels().contains_key(agent::RELEASE_OF))
        .map(|d| release(d, &routes, &http_routes))
        .collect();
    if args.deployment.is_some()
        && let [one] = releases.as_mut_slice()
    {
        one.events = events(client, &one.namespace, &one.name).await?;
    }
    releases.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(releases)
}

/// The Deployment `name`, or [`Error::NotFound`].
///
/// # Errors
///
/// The cluster cannot be read, or there is no such Deployment.
pub async fn get_deployment(api: &Api<Deployment>, namespace: &str, name: &str) -> Result<Deployment, Error> {
    api.get_opt(name)
        .await
        .map_err(cluster)?
        .ok_or_else(|| Error::NotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
}

/// The release of `d`, with the weights of the managed route it owns (a VirtualService or an
/// HTTPRoute, whichever its provider writes).
pub fn release(d: &Deployment, routes: &[VirtualService], http_routes: &[HttpRoute]) -> Release {
    let ann = d.annotations();
    let view = crate::agent::observe::deployment_view(d);
    let uid = d.uid().unwrap_or_default();
    let owned = |o: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference]| o.iter().any(|o| o.uid == uid);
    let mut weights = BTreeMap::new();
    for vs in routes.iter().filter(|vs| owned(vs.owner_references())) {
        let route = vs.spec.http.iter().flatten().next().and_then(|h| h.route.as_ref());
        for dest in route.into_iter().flatten() {
            let name = dest.destination.subset.clone().unwrap_or_else(|| "host".into());
            let weight = u8::try_from(dest.weight.unwrap_or(100).clamp(0, 100)).unwrap_or(0);
            *weights.entry(name).or_insert(0) += weight;
        }
    }
    for r in http_routes.iter().filter(|r| owned(r.owner_references())) {
        let service = r.name_any();
        let refs = r
            .spec
            .rules
            .iter()
            .flatten()
            .next()
            .and_then(|rule| rule.backend_refs.as_ref());
        let refs: Vec<_> = refs.into_iter().flatten().collect();
        let total: i32 = refs.iter().map(|b| b.weight.unwrap_or(1).max(0)).sum();
        for b in refs {
            let name = if b.name == service {
                "host".to_owned()
            } else {
                gateway_api::backend_of(&service, &b.name)
            };
            // Weights of an HTTPRoute are relative; shown in percent like the VirtualService's.
            let share = (100 * b.weight.unwrap_or(1).max(0)).checked_div(total).unwrap_or(0);
            *weights.entry(name).or_insert(0) += u8::try_from(share.clamp(0, 100)).unwrap_or(0);
        }
    }
    let template_revision = crate::agent::observe::template_revision_of(d);
    let routing = ann.get(annotations::ROUTING).cloned();
    // Without a mesh there is no route to read: the step's weight is the candidate's share of the pods,
    // shown while a release is before hand-off.
    let in_flight = view.status.phase.is_some_and(crate::release::Phase::before_hand_off);
    if weights.is_empty()
        && routing.as_deref() == Some("none")
        && in_flight
        && let (Some(release), Some(stable)) = (view.status.release, view.stable_revision)
    {
        let weight = view.status.weight.min(100);
        weights.insert(format!("v{stable}"), 100 - weight);
        weights.insert(crate::names::backends::canary(release), weight);
        weights.retain(|_, w| *w > 0);
    }
    Release {
        namespace: d.namespace().unwrap_or_default(),
        name: d.name_any(),
        phase: ann.get(annotations::PHASE).cloned().unwrap_or_else(|| "-".into()),
        revision: view.status.release.or(template_revision),
        stable: view.stable_revision,
        routing,
        strategy: ann.get(annotations::RELEASE_STRATEGY).cloned(),
        weights,
        failed_checks: view.status.failed_checks,
        message: ann.get(annotations::MESSAGE).cloned().unwrap_or_default(),
        paused: view.paused,
        held: view.status.paused,
        request: ann.get(annotations::REQUEST).cloned(),
        events: Vec::new(),
    }
}

async fn events(client: &Client, namespace: &str, name: &str) -> Result<Vec<String>, Error> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let list = api
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .map_err(cluster)?;
    let mut ours: Vec<&Event> = list
        .items
        .iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(name))
        .filter(|e| e.source.as_ref().and_then(|s| s.component.as_deref()) == Some("turnout"))
        .collect();
    ours.sort_by_key(|e| {
        e.event_time
            .as_ref()
            .map(|t| t.0)
            .or(e.last_timestamp.as_ref().map(|t| t.0))
    });
    Ok(ours
        .iter()
        .rev()
        .take(5)
        .rev()
        .map(|e| {
            format!(
                "{} {}: {}",
                e.type_.as_deref().unwrap_or("Normal"),
                e.reason.as_deref().unwrap_or(""),
                e.message.as_deref().unwrap_or("")
            )
        })
        .collect())
}

/// The releases as an aligned table (and, for one Deployment, its latest Events).
pub fn table(releases: &[Release]) -> String {
    if releases.is_empty() {
        return "no Deployments managed by turnout here\n".into();
    }
    let rows: Vec<[String; 9]> = releases
        .iter()
        .map(|r| {
            let weights = if r.weights.is_empty() {
                "-".to_owned()
            } else {
                r.weights
                    .iter()
                    .map(|(s, w)| format!("{s}={w}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let mut phase = r.phase.clone();
            if r.held {
                phase.push_str(" (paused)");
            }
            if let Some(request) = &r.request {
                phase.push_str(&format!(" ({request} requested)"));
            }
            [
                format!("{}/{}", r.namespace, r.name),
                phase,
                r.revision.map_or("-".into(), |v| format!("v{v}")),
                r.stable.map_or("-".into(), |v| format!("v{v}")),
                r.routing.clone().unwrap_or_else(|| "-".into()),
                r.strategy.clone().unwrap_or_else(|| "-".into()),
                weights,
                r.failed_checks.to_string(),
                r.message.clone(),
            ]
        })
        .collect();
    let header = [
        "DEPLOYMENT",
        "PHASE",
        "RELEASE",
        "STABLE",
        "ROUTING",
        "STRATEGY",
        "WEIGHTS",
        "FAILED",
        "MESSAGE",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(&header.map(str::to_owned));
    for row in &rows {
        out.push_str(&line(row));
    }
    if let [one] = releases
        && !one.events.is_empty()
    {
        out.push_str("\nEvents:\n");
        for e in &one.events {
            out.push_str(&format!("  {e}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(phase: &str, weights: &[(&str, u8)]) -> Release {
        Release {
            namespace: "shop".into(),
            name: "podinfo".into(),
            phase: phase.into(),
            revision: Some(2),
            stable: Some(1),
            routing: Some("istio".into()),
            strategy: Some("canary".into()),
            weights: weights.iter().map(|(s, w)| ((*s).to_owned(), *w)).collect(),
            failed_checks: 1,
            message: "Halt advancement: success rate 53.4% < 99%".into(),
            paused: true,
            held: false,
            request: None,
            events: vec!["Normal Advance: Advance shop/podinfo canary weight 20".into()],
        }
    }

    #[test]
    fn the_table_aligns_columns_and_shows_events_for_one_deployment() {
        let text = table(&[release("Progressing", &[("v1", 80), ("v2-canary", 20)])]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "DEPLOYMENT    PHASE        RELEASE  STABLE  ROUTING  STRATEGY  WEIGHTS             FAILED  MESSAGE"
        );
        assert_eq!(
            lines[1],
            "shop/podinfo  Progressing  v2       v1      istio    canary    v1=80,v2-canary=20  1       Halt advancement: success rate 53.4% < 99%"
        );
        assert_eq!(lines[3], "Events:");
        assert!(lines[4].contains("canary weight 20"));
        let two = table(&[release("Succeeded", &[("host", 100)]), release("-", &[])]);
        assert!(!two.contains("Events"), "events only for one Deployment");
        assert!(two.contains("host=100"));
        assert_eq!(table(&[]), "no Deployments managed by turnout here\n");
        let mut paused = release("Progressing", &[("v1", 90), ("v2-canary", 10)]);
        paused.held = true;
        paused.request = Some("promote@2".into());
        assert!(table(&[paused]).contains("  Progressing (paused) (promote@2 requested)  v2"));
    }

    #[test]
    fn without_a_mesh_the_weights_are_the_step_s_share_of_the_pods() {
        let d = |phase: &str, routing: &str| -> Deployment {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "podinfo", "namespace": "shop", "annotations": {
                    "turnout.dev/phase": phase, "turnout.dev/release": "3", "turnout.dev/stable-revision": "2",
                    "turnout.dev/weight": "20", "turnout.dev/routing": routing } },
                "spec": { "selector": {}, "template": {} }
            }))
            .unwrap()
        };
        let weights = |phase, routing| super::release(&d(phase, routing), &[], &[]).weights;
        assert_eq!(
            weights("Progressing", "none"),
            BTreeMap::from([("v2".to_owned(), 80), ("v3-canary".to_owned(), 20)])
        );
        assert!(weights("Succeeded", "none").is_empty(), "nothing in flight");
        assert!(
            weights("Progressing", "istio").is_empty(),
            "a mesh's weights come from its route"
        );
    }
}
