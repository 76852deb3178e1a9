//! Carrying out one [`Action`] against the cluster. Every write names the resource version it was
//! planned from, so a concurrent change makes it fail with 409 and the next pass plans again from a
//! fresh read. The one exception: a status write reported with a conflict that only the Deployment's
//! status caused is retried, since nothing the plan read has changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event as CoreEvent, ObjectReference, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference, Time};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::cache::{Kind, Written};
use super::observe::Snapshot;
use crate::admission::template::{Stamps, strip};
use crate::config::ReleaseConfig;
use crate::names::{agent, annotations, candidate_name, conditions, labels, values};
use crate::release::{Action, Event, Intent, Millis, Rollout, StatusPatch};

/// The field manager of every write.
pub const MANAGER: &str = "turnout";

/// Applies `action`, planned from `snap`, for Deployment `d`; says which objects it wrote, for a cache
/// to show them before the next pass (a candidate, the routing objects).
pub async fn apply(
    client: &Client,
    d: &Deployment,
    config: &ReleaseConfig,
    snap: &Snapshot,
    action: &Action,
    now: Millis,
) -> kube::Result<Vec<Written>> {
    let ns = d.namespace().unwrap_or_default();
    match action {
        Action::Routing(routing) => {
            super::routing::apply(client, d, config, &snap.hosts, &snap.stored, routing, now).await
        }
        Action::CreateCandidate {
            revision,
            replicas,
            held,
        } => {
            let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
            let mut c = candidate(d, *revision);
            if *held {
                let services: Api<Service> = Api::namespaced(client.clone(), &ns);
                let services: Vec<Arc<Service>> = services
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .map(Arc::new)
                    .collect();
                hold(&mut c, d, *revision, &services);
            }
            if let Some(replicas) = replicas {
                // Without a mesh: sized by the steps, starting empty.
                c.spec.replicas = Some(*replicas);
                let ann = c.metadata.annotations.get_or_insert_with(BTreeMap::new);
                ann.insert(annotations::WEIGHT.into(), "0".into());
                ann.insert(agent::CHANGED_AT.into(), super::routing::rfc3339(now));
            }
            let created = api.create(&PostParams::default(), &c).await?;
            Ok(vec![Written::of(Kind::Candidate, &ns, &created.name_any(), None)])
        }
        Action::ScaleCandidate { name, replicas, weight } => {
            let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
            let before = api.get_opt(name).await?;
            // The weight is recorded first: a held candidate's pods follow it (again on the next pass
            // if this one is cut short).
            let body = json!({
                "metadata": { "annotations": {
                    annotations::WEIGHT: weight.to_string(),
                    agent::CHANGED_AT: super::routing::rfc3339(now),
                } },
                "spec": { "replicas": replicas },
            });
            let after = api.patch(name, &PatchParams::default(), &Patch::Merge(&body)).await?;
            let mut written = vec![Written::of(
                Kind::Candidate,
                &ns,
                name,
                before.as_ref().map(|b| &b.metadata),
            )];
            written.extend(place_pods(client, &after, *weight > 0).await?);
            Ok(written)
        }
        Action::PlaceCandidatePods { name, serving } => {
            let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
            let Some(mut c) = api.get_opt(name).await? else {
                return Ok(Vec::new());
            };
            // Pods join or leave the Service now: the propagation (and the drain before the candidate's
            // deletion) counts from here.
            let body = json!({
                "metadata": { "annotations": { agent::CHANGED_AT: super::routing::rfc3339(now) } },
            });
            let before = c.metadata.clone();
            c = api.patch(name, &PatchParams::default(), &Patch::Merge(&body)).await?;
            let mut written = vec![Written::of(Kind::Candidate, &ns, name, Some(&before))];
            written.extend(place_pods(client, &c, *serving).await?);
            Ok(written)
        }
        Action::DeleteCandidate { name } => {
            let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
            let params = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..DeleteParams::default()
            };
            match api.delete(name, &params).await {
                Ok(_) => {}
                // Already gone: its pods are on their way out.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
            let mut deleted = Written::of(Kind::Candidate, &ns, name, None);
            deleted.deleted = true;
            Ok(vec![deleted])
        }
        Action::Status(patch) => status(client, d, patch).await.map(|()| Vec::new()),
        Action::ClearRequest => {
            // Conditional on the version read: a newer request written meanwhile is not lost.
            let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
            let body = json!({
                "metadata": {
                    "resourceVersion": d.resource_version(),
                    "annotations": { annotations::REQUEST: null },
                },
            });
            api.patch(&d.name_any(), &PatchParams::default(), &Patch::Merge(&body))
                .await?;
            Ok(Vec::new())
        }
        Action::Analyse { .. } | Action::Wait { .. } => Ok(Vec::new()),
    }
}

fn owner(d: &Deployment, controller: bool) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: d.name_any(),
        uid: d.uid().unwrap_or_default(),
        controller: Some(controller),
        block_owner_deletion: Some(true),
    }
}

/// Makes candidate `c` of release `revision` of `d` *held*: its pods lack, for each Service in
/// `services` that selects D's pods, one label that Service selects (recorded in
/// `turnout.dev/withheld-labels`), so no request reaches them until [`place_pods`] puts it on. Its
/// selector is then its own labels alone (D's selector may name a withheld label).
pub fn hold(c: &mut Deployment, d: &Deployment, revision: u64, services: &[Arc<Service>]) {
    let mut withheld: BTreeMap<String, String> = BTreeMap::new();
    for name in super::observe::selecting(d, services) {
        let Some(selector) = services
            .iter()
            .find(|s| s.name_any() == name)
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.selector.as_ref())
        else {
            continue;
        };
        if selector.keys().any(|k| withheld.contains_key(k)) {
            continue;
        }
        // The first label it selects that turnout does not need itself.
        if let Some((k, v)) = selector.iter().find(|(k, _)| !k.starts_with("turnout.dev/")) {
            withheld.insert(k.clone(), v.clone());
        }
    }
    let spec = &mut c.spec;
    let labels = spec
        .template
        .metadata
        .get_or_insert_with(ObjectMeta::default)
        .labels
        .get_or_insert_with(BTreeMap::new);
    for k in withheld.keys() {
        labels.remove(k);
    }
    labels.insert(labels::REVISION.into(), revision.to_string());
    spec.selector.match_labels = Some(BTreeMap::from([
        (agent::TRACK.to_owned(), agent::CANDIDATE.to_owned()),
        (agent::RELEASE_OF.to_owned(), d.name_any()),
        (labels::REVISION.to_owned(), revision.to_string()),
    ]));
    c.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(
        agent::WITHHELD_LABELS.into(),
        serde_json::to_string(&withheld).unwrap_or_default(),
    );
}

/// Puts the withheld labels on every pod of held candidate `c` (`serving`: they join the Service) or
/// takes them off (they leave it, and keep running); nothing for a candidate that is not held. Says
/// which pods it wrote.
async fn place_pods(client: &Client, c: &Deployment, serving: bool) -> kube::Result<Vec<Written>> {
    let Some(withheld) = super::observe::withheld_labels(c) else {
        return Ok(Vec::new());
    };
    let ns = c.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut written = Vec::new();
    let selector = super::observe::selector(c);
    for pod in pods.list(&ListParams::default().labels(&selector)).await?.items {
        if pod.metadata.deletion_timestamp.is_some() || super::observe::placed(pod.labels(), &withheld) == Some(serving)
        {
            continue;
        }
        let labels: serde_json::Map<String, serde_json::Value> = withheld
            .iter()
            .map(|(k, v)| (k.clone(), if serving { json!(v) } else { serde_json::Value::Null }))
            .collect();
        let body = json!({ "metadata": { "labels": labels } });
        match pods
            .patch(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => written.push(Written::of(Kind::Pod, &ns, &pod.name_any(), Some(&pod.metadata))),
            // Gone meanwhile: nothing to place.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// The candidate `D-v<N>`: D's template and strategy, its own selector, D as owner.
pub fn candidate(d: &Deployment, revision: u64) -> Deployment {
    let name = d.name_any();
    let mut spec = d.spec.clone();
    spec.paused = None;
    let extra = [
        (agent::TRACK.to_owned(), agent::CANDIDATE.to_owned()),
        (agent::RELEASE_OF.to_owned(), name.clone()),
    ];
    let template_meta = spec.template.metadata.get_or_insert_with(ObjectMeta::default);
    let template_labels = template_meta.labels.get_or_insert_with(BTreeMap::new);
    template_labels.extend(extra.clone());
    let selector = spec.selector.match_labels.get_or_insert_with(BTreeMap::new);
    selector.extend(extra.clone());
    let mut meta_labels = BTreeMap::from(extra);
    meta_labels.insert(labels::REVISION.into(), revision.to_string());
    let hash = strip(&d.spec.template, &Stamps::read(d)).hash();
    Deployment {
        metadata: ObjectMeta {
            name: Some(candidate_name(&name, revision)),
            namespace: d.namespace(),
            labels: Some(meta_labels),
            annotations: Some(BTreeMap::from([(agent::TEMPLATE_HASH.to_owned(), hash)])),
            owner_references: Some(vec![owner(d, true)]),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}

async fn status(client: &Client, d: &Deployment, p: &StatusPatch) -> kube::Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), &d.namespace().unwrap_or_default());
    let mut ann = serde_json::Map::new();
    ann.insert(annotations::PHASE.into(), json!(p.phase.as_str()));
    ann.insert(annotations::RELEASE.into(), json!(p.release.to_string()));
    ann.insert(annotations::WEIGHT.into(), json!(p.weight.to_string()));
    ann.insert(annotations::FAILED_CHECKS.into(), json!(p.failed_checks.to_string()));
    let iteration = (p.iteration > 0).then(|| p.iteration.to_string());
    ann.insert(annotations::ITERATION.into(), json!(iteration));
    ann.insert(annotations::MESSAGE.into(), json!(p.message));
    ann.insert(annotations::ROUTING.into(), json!(p.provider.as_str()));
    ann.insert(annotations::RELEASE_STRATEGY.into(), json!(p.strategy.as_str()));
    let paused = p.paused.then_some(values::TRUE);
    ann.insert(annotations::RELEASE_PAUSED.into(), json!(paused));
    if p.clear_request {
        ann.insert(annotations::REQUEST.into(), serde_json::Value::Null);
    }
    match p.intent {
        Intent::Keep => {}
        Intent::Clear => {
            ann.insert(annotations::STABLE_REVISION.into(), serde_json::Value::Null);
            ann.insert(annotations::STABLE_HASH.into(), serde_json::Value::Null);
        }
        Intent::Stable(n) => {
            // The hash the webhook compares a reverted template with: the current template, stamps removed.
            let hash = strip(&d.spec.template, &Stamps::read(d)).hash();
            ann.insert(annotations::STABLE_REVISION.into(), json!(n.to_string()));
            ann.insert(annotations::STABLE_HASH.into(), json!(hash));
        }
    }
    let mut body = json!({
        "metadata": { "resourceVersion": d.resource_version(), "annotations": ann },
    });
    if p.unpause {
        body["spec"] = json!({ "paused": false });
    }
    // A conflict caused only by a status write (the Deployment controller's, say) is retried from the
    // fresh version: the plan read nothing that changed, and planning again would repeat the
    // analysis the patch reports (calling its hooks twice). A change to spec, annotations (both bump
    // the generation) or labels is a real conflict and goes back to the planner.
    let mut attempts = 0;
    loop {
        match api
            .patch(&d.name_any(), &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => break,
            Err(kube::Error::Api(e)) if e.code == 409 && attempts < 3 => {
                attempts += 1;
                let Some(fresh) = api.get_opt(&d.name_any()).await? else {
                    return Err(kube::Error::Api(e));
                };
                if !status_only_change(d, &fresh) {
                    return Err(kube::Error::Api(e));
                }
                body["metadata"]["resourceVersion"] = json!(fresh.resource_version());
            }
            Err(e) => return Err(e),
        }
    }
    let (status, reason) = match p.rollout {
        Rollout::Keep => return Ok(()),
        Rollout::Fail => ("False", conditions::DEADLINE_EXCEEDED),
        // What the Deployment controller itself reports for a paused Deployment.
        Rollout::Restart => ("Unknown", conditions::PAUSED),
    };
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let condition = json!({
        "type": conditions::PROGRESSING,
        "status": status,
        "reason": reason,
        "message": format!("turnout: {}", p.message),
        "lastUpdateTime": now,
        "lastTransitionTime": now,
    });
    let body = json!({ "status": { "conditions": [condition] } });
    api.patch_status(&d.name_any(), &PatchParams::default(), &Patch::Strategic(&body))
        .await?;
    Ok(())
}

/// Whether `fresh` differs from `read` in nothing a plan reads: same object, same generation (spec
/// and annotations), same labels.
fn status_only_change(read: &Deployment, fresh: &Deployment) -> bool {
    read.uid() == fresh.uid()
        && read.metadata.generation == fresh.metadata.generation
        && read.metadata.labels == fresh.metadata.labels
        && read.metadata.deletion_timestamp == fresh.metadata.deletion_timestamp
}

/// Records `event` on `d` (core/v1, which `kubectl describe` shows). Not kube's `events::Recorder`: it
/// folds events with the same type, reason and action into one series whatever their message (its key
/// leaves the note out), so `Advance … weight 20` then `… weight 50` would show only the first.
pub async fn record(client: &Client, d: &Deployment, event: &Event) -> kube::Result<()> {
    let ns = d.namespace().unwrap_or_default();
    let api: Api<CoreEvent> = Api::namespaced(client.clone(), &ns);
    let now = k8s_openapi::jiff::Timestamp::now();
    let e = CoreEvent {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", d.name_any())),
            namespace: Some(ns.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("apps/v1".into()),
            kind: Some("Deployment".into()),
            name: Some(d.name_any()),
            namespace: Some(ns),
            uid: d.uid(),
            resource_version: d.resource_version(),
            ..ObjectReference::default()
        },
        reason: Some(event.reason.to_owned()),
        message: Some(event.message.clone()),
        type_: Some(if event.warning { "Warning" } else { "Normal" }.to_owned()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        count: Some(1),
        reporting_component: Some(MANAGER.into()),
        reporting_instance: Some(MANAGER.into()),
        action: Some(event.reason.to_owned()),
        source: Some(k8s_openapi::api::core::v1::EventSource {
            component: Some(MANAGER.into()),
            host: None,
        }),
        ..CoreEvent::default()
    };
    api.create(&PostParams::default(), &e).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn podinfo() -> Deployment {
        serde_json::from_value(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": "podinfo", "namespace": "shop", "uid": "u-1", "resourceVersion": "7",
                          "annotations": { "turnout.dev/revision": "2", "turnout.dev/stable-revision": "1" } },
            "spec": {
                "replicas": 3,
                "paused": true,
                "selector": { "matchLabels": { "app": "podinfo" } },
                "template": {
                    "metadata": { "labels": { "app": "podinfo", "turnout.dev/revision": "2", "version": "v2" } },
                    "spec": { "containers": [{ "name": "podinfod", "image": "podinfo:6.1.0" }] }
                }
            }
        }))
        .unwrap()
    }

    #[test]
    fn the_candidate_is_the_template_with_its_own_selector_owned_by_the_deployment() {
        let c = candidate(&podinfo(), 2);
        assert_eq!(c.metadata.name.as_deref(), Some("podinfo-v2"));
        assert_eq!(c.metadata.namespace.as_deref(), Some("shop"));
        let owner = &c.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), ("u-1", Some(true)));
        assert_eq!(c.labels().get(agent::RELEASE_OF).map(String::as_str), Some("podinfo"));
        assert_eq!(c.labels().get(labels::REVISION).map(String::as_str), Some("2"));
        assert_eq!(c.spec.paused, None, "the candidate rolls out at once");
        assert_eq!(c.spec.replicas, Some(3));
        let selector = c.spec.selector.match_labels.as_ref().unwrap();
        let pod_labels = c.spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert_eq!(selector.get(agent::TRACK).map(String::as_str), Some(agent::CANDIDATE));
        assert!(
            selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
            "the selector selects its pods"
        );
        assert_eq!(
            pod_labels.get("version").map(String::as_str),
            Some("v2"),
            "telemetry sees v2"
        );
        assert_eq!(pod_labels.get(labels::REVISION).map(String::as_str), Some("2"));
        assert_eq!(
            c.spec.template.spec.as_ref().unwrap().containers[0].image.as_deref(),
            Some("podinfo:6.1.0")
        );
    }

    fn service(name: &str, selector: serde_json::Value) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": { "name": name, "namespace": "shop" },
                "spec": { "selector": selector },
            }))
            .unwrap(),
        )
    }

    #[test]
    fn a_held_candidate_s_pods_lack_a_label_of_each_service_that_selects_the_deployment() {
        let d = podinfo();
        let services = [
            service("podinfo", json!({ "app": "podinfo" })),
            // Selects the same pods by another label: that one is withheld too.
            service("podinfo-canary", json!({ "version": "v2" })),
            // Covered by the first one's withheld label.
            service("podinfo-all", json!({ "app": "podinfo", "version": "v2" })),
            service("other", json!({ "app": "other" })),
        ];
        let mut c = candidate(&d, 2);
        hold(&mut c, &d, 2, &services);
        let withheld = super::super::observe::withheld_labels(&c).expect("held");
        assert_eq!(
            withheld,
            BTreeMap::from([("app".into(), "podinfo".into()), ("version".into(), "v2".into())])
        );
        let pod_labels = c.spec.template.metadata.as_ref().unwrap().labels.clone().unwrap();
        for svc in &services {
            let selector = svc.spec.as_ref().unwrap().selector.as_ref().unwrap();
            assert!(
                !selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
                "{} does not select the held pods: {pod_labels:?}",
                svc.name_any()
            );
        }
        let selector = c.spec.selector.match_labels.clone().unwrap();
        assert!(
            selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
            "{selector:?}"
        );
        assert_eq!(selector.get(labels::REVISION).map(String::as_str), Some("2"));
        // Once the withheld labels are put back, every Service selects the pods again.
        let mut serving = pod_labels.clone();
        serving.extend(withheld.clone());
        assert_eq!(super::super::observe::placed(&serving, &withheld), Some(true));
        assert_eq!(super::super::observe::placed(&pod_labels, &withheld), Some(false));
        let mut half = pod_labels;
        half.insert("app".into(), "podinfo".into());
        assert_eq!(
            super::super::observe::placed(&half, &withheld),
            None,
            "neither in nor out"
        );
    }
}
