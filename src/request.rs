//! `turnout promote|abort|retry|pause|resume`: a request on the release in flight, written as the
//! annotation `turnout.dev/request: <verb>@<release>` on the Deployment. The agent acts on it (or
//! refuses it with a Warning Event `RequestRefused`) and removes it.
//!
//! The command checks first that the release can take the request (the same rule the agent applies),
//! so most refusals come at once, with the reason. With `--wait` it waits for the agent to act.
//!
//! Exit codes: 0 requested (with `--wait`: done); 1 the cluster could not be read or written; 2 bad
//! usage; 3 no such Deployment; 4 refused (the release cannot take it now); 5 `--wait` timed out.

use std::io::Write;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Event;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::agent::observe::deployment_view;
use crate::names::annotations;
use crate::release::{DeploymentView, Phase, Request, Verb, admissible};
use crate::status::{Error, client, get_deployment as get};

/// Options shared by the request commands.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// The Deployment whose release the request is for.
    pub deployment: String,
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Wait until the agent has acted on the request, and report the outcome.
    #[arg(short, long)]
    pub wait: bool,
    /// How long --wait waits for the agent.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Runs `turnout <verb>`, writing what happened to `out`.
///
/// # Errors
///
/// The cluster cannot be used, the Deployment does not exist, the release cannot take the request, or
/// `--wait` ran out of time.
pub async fn run(verb: Verb, args: &Args, out: &mut impl Write) -> Result<(), Error> {
    let (client, namespace) = client(args.namespace.as_deref()).await?;
    let api: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let who = format!("{namespace}/{}", args.deployment);
    let mut attempts = 0;
    let (release, value) = loop {
        let d = get(&api, &namespace, &args.deployment).await?;
        let view = deployment_view(&d);
        let release = admissible(&view, verb).map_err(Error::Refused)?;
        let value = Request::value(verb, release);
        let pending = d.annotations().get(annotations::REQUEST).filter(|v| **v != value);
        if let Some(pending) = pending {
            writeln!(out, "replacing the request {pending:?} not acted on yet").map_err(io)?;
        }
        // Conditional on the version read, so the check above holds for what is written.
        let body = json!({
            "metadata": {
                "resourceVersion": d.resource_version(),
                "annotations": { annotations::REQUEST: value },
            },
        });
        match api
            .patch(&args.deployment, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => break (release, value),
            Err(kube::Error::Api(e)) if e.code == 409 && attempts < 5 => attempts += 1,
            Err(e) => return Err(Error::Cluster(format!("cannot write the request to {who}: {e}"))),
        }
    };
    writeln!(out, "requested: {verb} release v{release} of {who}").map_err(io)?;
    if !args.wait {
        writeln!(
            out,
            "the agent acts on it shortly; follow it with: turnout status {} -n {namespace}",
            args.deployment
        )
        .map_err(io)?;
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + args.timeout;
    let d = loop {
        let d = get(&api, &namespace, &args.deployment).await?;
        if d.annotations().get(annotations::REQUEST) != Some(&value) {
            break d;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "the agent did not act on the request within {}; is it running? (kubectl -n turnout-system get \
                 pods); the request stays in place",
                humantime::format_duration(args.timeout)
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let view = deployment_view(&d);
    if done(verb, release, &view) {
        let message = d.annotations().get(annotations::MESSAGE).cloned().unwrap_or_default();
        writeln!(out, "done: {message}").map_err(io)?;
        return Ok(());
    }
    let why = refusal(&client, &namespace, &args.deployment)
        .await
        .unwrap_or_else(|| "the release moved on before the agent could act on it".into());
    Err(Error::Refused(why))
}

/// Whether the agent carried out `verb` on `release` (its status shows the outcome).
pub fn done(verb: Verb, release: u64, d: &DeploymentView) -> bool {
    let s = &d.status;
    if s.release != Some(release) {
        return false;
    }
    let phase = s.phase.unwrap_or(Phase::Pending);
    match verb {
        Verb::Abort => phase == Phase::Failed,
        Verb::Promote => matches!(
            phase,
            Phase::Promoting | Phase::HandingOff | Phase::Finalising | Phase::Succeeded
        ),
        Verb::Retry => phase != Phase::Failed,
        Verb::Pause => s.paused,
        Verb::Resume => !s.paused,
    }
}

/// The message of the latest `RequestRefused` Event on the Deployment.
async fn refusal(client: &Client, namespace: &str, name: &str) -> Option<String> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let list = api
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .ok()?;
    list.items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("RequestRefused"))
        .max_by_key(|e| e.event_time.as_ref().map(|t| t.0))
        .and_then(|e| e.message)
}

pub(crate) fn io(e: std::io::Error) -> Error {
    Error::Cluster(e.to_string())
}
