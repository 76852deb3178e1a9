//! Reading a release's state from the cluster into [`Observed`](crate::release::Observed): the user
//! Deployment, its ReplicaSets, the candidates and their pods, the Services that select its pods, and
//! their routing objects (read by the provider, `agent::routing`).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use super::routing::{self, Objects, Stored};
use crate::admission::template::{Stamps, strip, template_labels};
use crate::config::ReleaseConfig;
use crate::names::{agent, annotations, conditions, labels, values};
use crate::release::{
    CandidateView, DeploymentView, HostRouting, Millis, Phase, ProviderKind, ReplicaSetView, Request, Scale, StatusView,
};

/// What the agent read, with what it needs to write back (resource versions, owners).
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub deployment: DeploymentView,
    pub stable_rs: Option<ReplicaSetView>,
    pub new_rs: Option<ReplicaSetView>,
    pub candidates: Vec<CandidateView>,
    /// The provider that read the routing.
    pub provider: ProviderKind,
    pub hosts: Vec<HostRouting>,
    /// The stored routing objects of each host, for writes.
    pub stored: Vec<Stored>,
    /// The implementation refuses a route of ours, and why.
    pub refused: Option<String>,
    /// Two of the Deployment's ReplicaSets carry the same `turnout.dev/revision` label for different
    /// templates: its template changed without the webhook stamping a new revision.
    pub unstamped_change: bool,
}

impl Snapshot {
    /// The Deployment is replacing its pods natively with no release recorded: a template change
    /// reached it without turnout's hold (the webhook was down or bypassed).
    pub fn unheld_rollout(&self) -> bool {
        let d = &self.deployment;
        d.stable_revision.is_none() && !d.paused && !d.rollout_complete && self.unstamped_change
    }
}

/// Errors reading the cluster; the reconcile is retried.
pub type Error = kube::Error;

/// The objects a snapshot of `d` is made of, read with one LIST per kind ([`Reads::list`]) or from
/// the agent's watch caches (`agent::cache`).
#[derive(Clone, Debug, Default)]
pub struct Reads {
    /// The ReplicaSets that carry the labels of the Deployment's selector: its own and its candidates'.
    pub replica_sets: Vec<Arc<ReplicaSet>>,
    /// The candidate Deployments (`turnout.dev/release-of=<name>`).
    pub candidates: Vec<Arc<Deployment>>,
    /// The candidates' pods (same label).
    pub pods: Vec<Arc<Pod>>,
    /// The Services of the namespace.
    pub services: Vec<Arc<Service>>,
}

impl Reads {
    /// Lists what a snapshot of `d` is made of from the API server: four LISTs.
    ///
    /// # Errors
    ///
    /// A request fails.
    pub async fn list(client: &Client, d: &Deployment) -> Result<Self, Error> {
        let ns = d.namespace().unwrap_or_default();
        let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
        let replica_sets = arcs(
            replica_sets
                .list(&ListParams::default().labels(&selector(d)))
                .await?
                .items,
        );
        let selector = format!("{}={}", agent::RELEASE_OF, d.name_any());
        let mut replica_sets = replica_sets;
        let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
        // A held candidate's ReplicaSet lacks a label of the Deployment's selector.
        for rs in rs_api.list(&ListParams::default().labels(&selector)).await?.items {
            if !replica_sets.iter().any(|r| r.uid() == rs.uid()) {
                replica_sets.push(Arc::new(rs));
            }
        }
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let candidates = arcs(deployments.list(&ListParams::default().labels(&selector)).await?.items);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let pods = arcs(pods.list(&ListParams::default().labels(&selector)).await?.items);
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        let services = arcs(services.list(&ListParams::default()).await?.items);
        Ok(Self {
            replica_sets,
            candidates,
            pods,
            services,
        })
    }
}

fn arcs<K>(items: Vec<K>) -> Vec<Arc<K>> {
    items.into_iter().map(Arc::new).collect()
}

/// The labels of `d`'s selector (`matchLabels`).
pub fn match_labels(d: &Deployment) -> impl Iterator<Item = (&String, &String)> {
    d.spec.selector.match_labels.iter().flatten()
}

/// `d`'s selector (`matchLabels`) as a label selector, `k=v,...`: its ReplicaSets and its candidates'.
pub fn selector(d: &Deployment) -> String {
    match_labels(d)
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The Services among `services` that select `d`'s pods, by name.
pub fn selecting(d: &Deployment, services: &[Arc<Service>]) -> Vec<String> {
    let template_labels = template_labels(d).cloned().unwrap_or_default();
    services
        .iter()
        .filter(|svc| {
            svc.spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .is_some_and(|selector| {
                    !selector.is_empty() && selector.iter().all(|(k, v)| template_labels.get(k) == Some(v))
                })
        })
        .map(|svc| svc.name_any())
        .collect()
}

/// Reads everything about `d` from the API server: four LISTs, and `provider`'s objects in the
/// namespace when its CRDs are `installed`.
///
/// # Errors
///
/// A request fails.
pub async fn snapshot(
    client: &Client,
    d: &Deployment,
    config: &ReleaseConfig,
    provider: ProviderKind,
    installed: bool,
) -> Result<Snapshot, Error> {
    let reads = Reads::list(client, d).await?;
    let objects = if installed {
        Objects::list(client, &d.namespace().unwrap_or_default(), provider).await?
    } else {
        Objects::default()
    };
    Ok(assemble(d, &reads, config, provider, &objects))
}

/// The snapshot of `d` from what was read, its hosts routed by `provider`.
pub fn assemble(
    d: &Deployment,
    reads: &Reads,
    config: &ReleaseConfig,
    provider: ProviderKind,
    objects: &Objects,
) -> Snapshot {
    let deployment = deployment_view(d);
    let rs_list = &reads.replica_sets;
    let uid = d.uid().unwrap_or_default();
    let own: Vec<&ReplicaSet> = rs_list
        .iter()
        .map(AsRef::as_ref)
        .filter(|rs| owned_by(rs, &uid))
        .collect();
    let stable_revision = deployment.stable_revision.unwrap_or(deployment.template_revision);
    let stable_rs = pick(&own, stable_revision);
    let new_rs = pick(&own, deployment.template_revision);
    let mut hashes: BTreeMap<u64, String> = BTreeMap::new();
    let unstamped_change = own
        .iter()
        .filter(|rs| rs.metadata.deletion_timestamp.is_none())
        .filter_map(|rs| Some((template_revision(rs), hash_of(rs)?)))
        .any(|(revision, hash)| hashes.insert(revision, hash.clone()).is_some_and(|other| other != hash));
    let candidates = candidates(&d.name_any(), &reads.candidates, rs_list, &reads.pods);
    let (hosts, stored, refused) = routing::observe(
        provider,
        config,
        selecting(d, &reads.services),
        &reads.services,
        objects,
    );
    Snapshot {
        deployment,
        stable_rs,
        new_rs,
        candidates,
        provider,
        hosts,
        stored,
        refused,
        unstamped_change,
    }
}

/// The `turnout.dev/revision` label of a Deployment's pod template.
pub fn template_revision_of(d: &Deployment) -> Option<u64> {
    template_labels(d)?.get(labels::REVISION)?.parse().ok()
}

/// The user Deployment as the release machine sees it.
pub fn deployment_view(d: &Deployment) -> DeploymentView {
    let ann = d.annotations();
    let number = |key: &str| ann.get(key).and_then(|v| v.parse::<u64>().ok());
    let spec = &d.spec;
    let template_revision = template_revision_of(d).unwrap_or(0);
    let replicas = spec.replicas.unwrap_or(1);
    let status = d.status.as_ref();
    let generation = d.metadata.generation.unwrap_or(0);
    let rollout_complete = status.is_some_and(|s| {
        s.observed_generation.unwrap_or(0) >= generation
            && s.updated_replicas.unwrap_or(0) == replicas
            && s.replicas.unwrap_or(0) == replicas
            && s.available_replicas.unwrap_or(0) == replicas
    });
    let rollout_failed = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| {
            c.type_.as_deref() == Some(conditions::PROGRESSING)
                && c.status.as_deref() == Some("False")
                && c.reason.as_deref() == Some(conditions::DEADLINE_EXCEEDED)
        });
    DeploymentView {
        namespace: d.namespace().unwrap_or_default(),
        name: d.name_any(),
        replicas,
        paused: spec.paused.unwrap_or(false),
        template_revision,
        stable_revision: number(annotations::STABLE_REVISION),
        status: StatusView {
            phase: ann.get(annotations::PHASE).and_then(|p| Phase::parse(p)),
            release: number(annotations::RELEASE),
            weight: ann.get(annotations::WEIGHT).and_then(|w| w.parse().ok()).unwrap_or(0),
            failed_checks: ann
                .get(annotations::FAILED_CHECKS)
                .and_then(|w| w.parse().ok())
                .unwrap_or(0),
            iteration: ann
                .get(annotations::ITERATION)
                .and_then(|w| w.parse().ok())
                .unwrap_or(0),
            paused: ann.get(annotations::RELEASE_PAUSED).is_some_and(|v| v == values::TRUE),
        },
        rollout_complete,
        rollout_failed,
        request: ann.get(annotations::REQUEST).map(|v| Request::parse(v)),
        template_hash: strip(&d.spec.template, &Stamps::read(d)).hash(),
    }
}

fn owned_by(rs: &ReplicaSet, uid: &str) -> bool {
    rs.owner_references().iter().any(|o| o.uid == uid)
}

/// The `turnout.dev/revision` label of a ReplicaSet's pod template (0 when unstamped).
pub fn template_revision(rs: &ReplicaSet) -> u64 {
    rs.spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.as_ref())
        .and_then(|l| l.get(labels::REVISION))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn hash_of(rs: &ReplicaSet) -> Option<String> {
    rs.labels().get(agent::POD_TEMPLATE_HASH).cloned()
}

/// The ReplicaSet of `revision` with the most ready pods.
fn pick(own: &[&ReplicaSet], revision: u64) -> Option<ReplicaSetView> {
    own.iter()
        .filter(|rs| template_revision(rs) == revision && rs.metadata.deletion_timestamp.is_none())
        .filter_map(|rs| {
            Some(ReplicaSetView {
                hash: hash_of(rs)?,
                ready: rs.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0),
            })
        })
        .max_by_key(|rs| rs.ready)
}

fn candidates(
    name: &str,
    deployments: &[Arc<Deployment>],
    rs_list: &[Arc<ReplicaSet>],
    pods: &[Arc<Pod>],
) -> Vec<CandidateView> {
    let revision_of = |l: &BTreeMap<String, String>| l.get(labels::REVISION).and_then(|v| v.parse::<u64>().ok());
    let mut out: Vec<CandidateView> = Vec::new();
    // The withheld labels of each held candidate, by revision (read once, not per pod).
    let mut withheld: BTreeMap<u64, BTreeMap<String, String>> = BTreeMap::new();
    for c in deployments {
        let Some(revision) = revision_of(c.labels()) else {
            continue;
        };
        if let Some(labels) = withheld_labels(c) {
            withheld.insert(revision, labels);
        }
        let uid = c.uid().unwrap_or_default();
        let replicas = c.spec.replicas.unwrap_or(1);
        let status = c.status.as_ref();
        let available = status.is_some_and(|s| {
            s.observed_generation.unwrap_or(0) >= c.metadata.generation.unwrap_or(0)
                && s.updated_replicas.unwrap_or(0) >= replicas
                && s.available_replicas.unwrap_or(0) >= replicas
        });
        let hash = rs_list
            .iter()
            .filter(|rs| owned_by(rs, &uid))
            .max_by_key(|rs| rs.metadata.creation_timestamp.clone())
            .and_then(|rs| hash_of(rs));
        out.push(CandidateView {
            name: c.name_any(),
            revision,
            hash,
            available,
            pods: 0,
            restarts: 0,
            created_at: c.metadata.creation_timestamp.as_ref().map_or(0, |t| millis(&t.0)),
            deleting: c.metadata.deletion_timestamp.is_some(),
            template_hash: c.annotations().get(agent::TEMPLATE_HASH).cloned(),
            held: withheld.contains_key(&revision),
            replicas,
            misplaced: 0,
            ready_at: 0,
            scale: c
                .annotations()
                .get(annotations::WEIGHT)
                .and_then(|w| w.parse().ok())
                .map(|weight| Scale {
                    weight,
                    at: routing::changed_at(&c.metadata),
                }),
        });
    }
    // Pods count against their candidate, also once the candidate Deployment itself is gone.
    for pod in pods {
        let Some(revision) = revision_of(pod.labels()) else {
            continue;
        };
        let restarts: i32 = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|cs| cs.iter().map(|c| c.restart_count).sum())
            .unwrap_or(0);
        let i = match out.iter().position(|c| c.revision == revision) {
            Some(i) => i,
            None => {
                out.push(CandidateView {
                    name: crate::names::candidate_name(name, revision),
                    revision,
                    hash: pod.labels().get(agent::POD_TEMPLATE_HASH).cloned(),
                    available: false,
                    pods: 0,
                    restarts: 0,
                    created_at: 0,
                    deleting: true,
                    template_hash: None,
                    scale: None,
                    held: false,
                    replicas: 0,
                    misplaced: 0,
                    ready_at: 0,
                });
                out.len() - 1
            }
        };
        let entry = &mut out[i];
        entry.pods += 1;
        entry.restarts += u32::try_from(restarts).unwrap_or(0);
        if pod.metadata.deletion_timestamp.is_none()
            && let Some(at) = ready_since(pod)
        {
            entry.ready_at = entry.ready_at.max(at);
        }
        if let (Some(withheld), None) = (withheld.get(&revision), &pod.metadata.deletion_timestamp) {
            let serving = entry.scale.is_some_and(|s| s.weight > 0);
            if placed(pod.labels(), withheld) != Some(serving) {
                entry.misplaced += 1;
            }
        }
    }
    out
}

/// When `pod` became ready, if it is.
fn ready_since(pod: &Pod) -> Option<Millis> {
    let ready = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?;
    ready.last_transition_time.as_ref().map(|t| millis(&t.0))
}

/// The labels a held candidate's pods carry only while it serves (`turnout.dev/withheld-labels`).
pub fn withheld_labels(c: &Deployment) -> Option<BTreeMap<String, String>> {
    let withheld: BTreeMap<String, String> = serde_json::from_str(c.annotations().get(agent::WITHHELD_LABELS)?).ok()?;
    (!withheld.is_empty()).then_some(withheld)
}

/// Whether a pod with `labels` is in the Service (every withheld label) or out of it (none of them);
/// `None` in between.
pub fn placed(labels: &BTreeMap<String, String>, withheld: &BTreeMap<String, String>) -> Option<bool> {
    let carried = withheld.iter().filter(|(k, v)| labels.get(*k) == Some(*v)).count();
    if carried == withheld.len() {
        Some(true)
    } else if withheld.keys().all(|k| !labels.contains_key(k)) {
        Some(false)
    } else {
        None
    }
}

/// A Kubernetes timestamp in milliseconds since the epoch.
pub fn millis(t: &k8s_openapi::jiff::Timestamp) -> Millis {
    u64::try_from(t.as_millisecond()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::release::Verb;

    fn deployment(annotations: serde_json::Value, status: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": { "name": "podinfo", "namespace": "shop", "generation": 4, "annotations": annotations },
            "spec": {
                "replicas": 2,
                "paused": true,
                "selector": { "matchLabels": { "app": "podinfo" } },
                "template": { "metadata": { "labels": { "app": "podinfo", "turnout.dev/revision": "3" } } }
            },
            "status": status
        }))
        .unwrap()
    }

    #[test]
    fn the_deployment_view_reads_stamps_status_and_rollout() {
        let d = deployment(
            json!({ "turnout.dev/stable-revision": "1", "turnout.dev/phase": "Progressing", "turnout.dev/release": "3",
                    "turnout.dev/weight": "25", "turnout.dev/failed-checks": "1", "turnout.dev/iteration": "4",
                    "turnout.dev/release-paused": "true", "turnout.dev/request": "promote@3" }),
            json!({ "observedGeneration": 4, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2 }),
        );
        let v = deployment_view(&d);
        assert_eq!(
            (v.template_revision, v.stable_revision, v.replicas, v.paused),
            (3, Some(1), 2, true)
        );
        assert_eq!(
            v.status,
            StatusView {
                phase: Some(Phase::Progressing),
                release: Some(3),
                weight: 25,
                failed_checks: 1,
                iteration: 4,
                paused: true,
            }
        );
        assert_eq!(
            v.request,
            Some(Request::Valid {
                verb: Verb::Promote,
                release: 3
            })
        );
        assert!(v.rollout_complete);
        let stale = deployment(
            json!({}),
            json!({ "observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2 }),
        );
        assert!(
            !deployment_view(&stale).rollout_complete,
            "an unobserved generation is not complete"
        );
        let garbage = deployment(
            json!({ "turnout.dev/phase": "Dancing", "turnout.dev/weight": "lots" }),
            json!({}),
        );
        let v = deployment_view(&garbage);
        assert_eq!((v.status.phase, v.status.weight, v.stable_revision), (None, 0, None));
    }

    fn pod(revision: &str, restarts: i32) -> Pod {
        serde_json::from_value(json!({
            "metadata": { "name": format!("podinfo-v{revision}-x"), "labels": {
                "turnout.dev/revision": revision, "turnout.dev/release-of": "podinfo", "pod-template-hash": "h" } },
            "status": { "containerStatuses": [{ "name": "c", "restartCount": restarts, "ready": true, "image": "i",
                        "imageID": "", "started": true }] }
        }))
        .unwrap()
    }

    #[test]
    fn candidates_count_their_pods_even_once_the_deployment_is_gone() {
        let candidate: Deployment = serde_json::from_value(json!({
            "metadata": { "name": "podinfo-v3", "uid": "c3", "generation": 1,
                          "labels": { "turnout.dev/revision": "3", "turnout.dev/release-of": "podinfo" } },
            "spec": { "replicas": 2, "selector": {}, "template": {} },
            "status": { "observedGeneration": 1, "updatedReplicas": 2, "availableReplicas": 2 }
        }))
        .unwrap();
        let rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": { "name": "podinfo-v3-abc", "labels": { "pod-template-hash": "abc" },
                          "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "Deployment", "name": "podinfo-v3", "uid": "c3" }] },
            "spec": { "selector": {} }
        }))
        .unwrap();
        let pods = arcs(vec![pod("3", 1), pod("3", 0), pod("2", 0)]);
        let found = candidates("podinfo", &[Arc::new(candidate)], &[Arc::new(rs)], &pods);
        assert_eq!(found.len(), 2);
        let v3 = &found[0];
        assert_eq!(
            (v3.name.as_str(), v3.hash.as_deref(), v3.available),
            ("podinfo-v3", Some("abc"), true)
        );
        assert_eq!((v3.pods, v3.restarts, v3.deleting), (2, 1, false));
        assert_eq!(v3.ready_at, 0, "no pod reports Ready");
        let v2 = &found[1];
        assert_eq!(
            (v2.name.as_str(), v2.pods, v2.deleting),
            ("podinfo-v2", 1, true),
            "an orphan's pods still count"
        );
    }

    #[test]
    fn a_candidate_became_ready_when_its_last_pod_did() {
        let ready = |name: &str, at: &str, status: &str| -> Pod {
            let mut p = pod("3", 0);
            p.metadata.name = Some(name.into());
            p.status = serde_json::from_value(json!({
                "conditions": [{ "type": "Ready", "status": status, "lastTransitionTime": at }]
            }))
            .unwrap();
            p
        };
        let pods = arcs(vec![
            ready("a", "2026-12-07T10:00:00Z", "True"),
            ready("b", "2026-12-07T10:00:05Z", "True"),
            // Not ready (any more): its transition is not a pod becoming ready.
            ready("c", "2026-12-07T10:00:09Z", "False"),
        ]);
        let found = candidates("podinfo", &[], &[], &pods);
        let b = k8s_openapi::jiff::Timestamp::from_second(1_796_637_605).unwrap();
        assert_eq!(found[0].ready_at, millis(&b));
    }

    #[test]
    fn a_held_candidate_counts_the_pods_not_where_its_weight_says() {
        let held = |weight: &str| -> Arc<Deployment> {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": { "name": "podinfo-v3", "uid": "c3", "generation": 1,
                                  "labels": { "turnout.dev/revision": "3", "turnout.dev/release-of": "podinfo" },
                                  "annotations": { "turnout.dev/weight": weight,
                                                   "turnout.dev/withheld-labels": r#"{"app":"podinfo"}"# } },
                    "spec": { "replicas": 2, "selector": {}, "template": {} },
                }))
                .unwrap(),
            )
        };
        let mut serving = pod("3", 0);
        serving.labels_mut().insert("app".into(), "podinfo".into());
        let mut going = serving.clone();
        going.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        // One pod out of the Service (replaced from the template), one in it, one terminating.
        let pods = arcs(vec![pod("3", 0), serving, going]);
        let standby = candidates("podinfo", &[held("0")], &[], &pods);
        assert_eq!((standby[0].held, standby[0].misplaced), (true, 1), "{standby:?}");
        let switched = candidates("podinfo", &[held("100")], &[], &pods);
        assert_eq!((switched[0].held, switched[0].misplaced), (true, 1), "{switched:?}");
        let plain = candidates("podinfo", &[Arc::new(Deployment::default())], &[], &pods);
        assert!(plain.iter().all(|c| !c.held && c.misplaced == 0), "{plain:?}");
    }
}
