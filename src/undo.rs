//! `turnout undo`: the Deployment's pod template set back to its stable version, during a release or
//! after a failed one. `kubectl rollout undo` refuses a paused Deployment, and a release holds it paused;
//! this does what that command does (the template of the stable revision's ReplicaSet, written back)
//! and the webhook takes it as a revert: the release is rolled back on the fast path and the Deployment
//! resumes on its stable template.
//!
//! Exit codes: 0 undone (with `--wait`: rolled back); 1 the cluster could not be read or written; 2 bad
//! usage; 3 no such Deployment; 4 nothing to undo; 5 `--wait` timed out.

use std::io::Write;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};

use crate::admission::template::Stamps;
use crate::agent::observe::{deployment_view, selector, template_revision};
use crate::names::{agent, annotations, labels};
use crate::release::Phase;
use crate::request::{Args, io};
use crate::status::{Error, client, get_deployment as get};

/// Runs `turnout undo`, writing what happened to `out`.
///
/// # Errors
///
/// The cluster cannot be used, the Deployment does not exist, there is no release to undo (or its
/// stable ReplicaSet is gone), or `--wait` ran out of time.
pub async fn run(args: &Args, out: &mut impl Write) -> Result<(), Error> {
    let (client, namespace) = client(args.namespace.as_deref()).await?;
    let api: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client, &namespace);
    let name = &args.deployment;
    let who = format!("{namespace}/{name}");
    let mut attempts = 0;
    let (stable, release) = loop {
        let mut d = get(&api, &namespace, name).await?;
        let view = deployment_view(&d);
        let Some(stable) = view.stable_revision.filter(|s| *s != view.template_revision) else {
            return Err(Error::Refused(format!(
                "{who} has no release to undo: it runs its stable template (v{}); to go further back, \
                 kubectl rollout undo deployment/{name} -n {namespace}",
                view.template_revision
            )));
        };
        let listed = replica_sets
            .list(&ListParams::default().labels(&selector(&d)))
            .await
            .map_err(|e| Error::Cluster(format!("cannot list the ReplicaSets of {who}: {e}")))?;
        let uid = d.uid().unwrap_or_default();
        let stable_rs = listed
            .items
            .into_iter()
            .filter(|rs| rs.owner_references().iter().any(|o| o.uid == uid))
            .filter(|rs| rs.metadata.deletion_timestamp.is_none())
            .filter(|rs| template_revision(rs) == stable)
            .max_by_key(|rs| rs.metadata.creation_timestamp.clone());
        let Some(mut template) = stable_rs.and_then(|rs| rs.spec.template) else {
            return Err(Error::Refused(format!(
                "the ReplicaSet of {who}'s stable template (v{stable}) is gone: set the template back by hand"
            )));
        };
        // What the Deployment controller adds to its ReplicaSets' templates goes; turnout's stamps are
        // the current ones, as when a person sets the template back by hand (the webhook then restamps
        // the stable revision).
        let stamps = Stamps::read(&d);
        let current = d.spec.template.metadata.as_ref().and_then(|m| m.labels.as_ref());
        let restored = template
            .metadata
            .get_or_insert_with(Default::default)
            .labels
            .get_or_insert_with(Default::default);
        restored.remove(agent::POD_TEMPLATE_HASH);
        let mut stamp_keys = vec![labels::REVISION];
        if stamps.stamped_version.is_some() {
            stamp_keys.push(labels::VERSION);
        }
        for key in stamp_keys {
            match current.and_then(|c| c.get(key)) {
                Some(value) => restored.insert(key.to_owned(), value.clone()),
                None => restored.remove(key),
            };
        }
        d.spec.template = template;
        // Conditional on the version read (a replace names it).
        match api.replace(name, &PostParams::default(), &d).await {
            Ok(_) => break (stable, view.status.release.unwrap_or(view.template_revision)),
            Err(kube::Error::Api(e)) if e.code == 409 && attempts < 5 => attempts += 1,
            Err(e) => return Err(Error::Cluster(format!("cannot set {who}'s template back: {e}"))),
        }
    };
    writeln!(
        out,
        "undone: {who} set back to its stable template (v{stable}); release v{release} is rolled back"
    )
    .map_err(io)?;
    if !args.wait {
        writeln!(out, "follow it with: turnout status {name} -n {namespace}").map_err(io)?;
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + args.timeout;
    loop {
        let d = get(&api, &namespace, name).await?;
        let view = deployment_view(&d);
        if view.stable_revision.is_none() || view.status.phase == Some(Phase::RolledBack) {
            let message = d.annotations().get(annotations::MESSAGE).cloned().unwrap_or_default();
            writeln!(out, "done: {message}").map_err(io)?;
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "the release was not rolled back within {}; is the agent running? (kubectl -n turnout-system \
                 get pods)",
                humantime::format_duration(args.timeout)
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
