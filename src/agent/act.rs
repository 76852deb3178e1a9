//! Carrying out one [`Action`] against the cluster. Every write names the resource version it was
//! planned from, so a concurrent change makes it fail with 409 and the next pass plans again from a
//! fresh read. The one exception: a status write reported with a conflict that only the Deployment's
//! status caused is retried, since nothing the plan read has changed.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event as CoreEvent, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference, Time};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use super::cache::{Kind, Written};
use super::observe::Snapshot;
use crate::admission::template::{Stamps, strip};
use crate::istio::destination_rule::{DestinationRule, DestinationRuleSpec, DestinationRuleSubsets};
use crate::istio::virtual_service::{
    VirtualService, VirtualServiceHttp, VirtualServiceHttpRoute, VirtualServiceHttpRouteDestination, VirtualServiceSpec,
};
use crate::names::{agent, annotations, candidate_name, conditions, labels, values};
use crate::release::{Action, Event, Intent, Millis, Rollout, Route, StatusPatch, Subset};

/// The field manager of every write.
pub const MANAGER: &str = "turnout";

/// Applies `action`, planned from `snap`, for Deployment `d`; says which object it wrote when a cache
/// is to show it before the next pass (a candidate, a VirtualService, a DestinationRule).
pub async fn apply(
    client: &Client,
    d: &Deployment,
    snap: &Snapshot,
    action: &Action,
    now: Millis,
) -> kube::Result<Option<Written>> {
    let ns = d.namespace().unwrap_or_default();
    let written = |kind, name: &str, before: Option<&ObjectMeta>, deleted| Written {
        kind,
        namespace: ns.clone(),
        name: name.to_owned(),
        before: before.and_then(|m| m.resource_version.clone()),
        deleted,
    };
    match action {
        Action::PutDestinationRule { host, subsets } => {
            let (service, stored) = (&snap.hosts[*host].service, &snap.stored[*host].1);
            let api: Api<DestinationRule> = Api::namespaced(client.clone(), &ns);
            let mut dr = DestinationRule::new(service, destination_rule_spec(service, &ns, subsets));
            dr.metadata = managed_meta(d, service, stored.as_ref().map(|o| &o.metadata), now);
            write(&api, service, dr, stored.is_some()).await?;
            let before = stored.as_ref().map(|o| &o.metadata);
            Ok(Some(written(Kind::DestinationRule, service, before, false)))
        }
        Action::PutVirtualService { host, route } => {
            let (service, stored) = (&snap.hosts[*host].service, &snap.stored[*host].0);
            let api: Api<VirtualService> = Api::namespaced(client.clone(), &ns);
            let mut vs = VirtualService::new(service, virtual_service_spec(service, &ns, route));
            vs.metadata = managed_meta(d, service, stored.as_ref().map(|o| &o.metadata), now);
            write(&api, service, vs, stored.is_some()).await?;
            let before = stored.as_ref().map(|o| &o.metadata);
            Ok(Some(written(Kind::VirtualService, service, before, false)))
        }
        Action::CreateCandidate { revision } => {
            let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
            let created = api.create(&PostParams::default(), &candidate(d, *revision)).await?;
            Ok(Some(written(Kind::Candidate, &created.name_any(), None, false)))
        }
        Action::DeleteCandidate { name } => {
            let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
            let params = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..DeleteParams::default()
            };
            match api.delete(name, &params).await {
                Ok(_) => Ok(Some(written(Kind::Candidate, name, None, true))),
                // Already gone: its pods are on their way out.
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(Some(written(Kind::Candidate, name, None, true))),
                Err(e) => Err(e),
            }
        }
        Action::Status(patch) => status(client, d, patch).await.map(|()| None),
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
            Ok(None)
        }
        Action::Analyse { .. } | Action::Wait { .. } => Ok(None),
    }
}

async fn write<K>(api: &Api<K>, name: &str, obj: K, exists: bool) -> kube::Result<()>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if exists {
        api.replace(name, &PostParams::default(), &obj).await?;
    } else {
        api.create(&PostParams::default(), &obj).await?;
    }
    Ok(())
}

/// Metadata of a managed VirtualService or DestinationRule: named after the Service, labelled as
/// turnout's, owned by the Deployment, stamped with the time of the change.
fn managed_meta(d: &Deployment, service: &str, stored: Option<&ObjectMeta>, now: Millis) -> ObjectMeta {
    let mut meta = stored.cloned().unwrap_or_default();
    meta.name = Some(service.to_owned());
    meta.namespace = d.namespace();
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(agent::MANAGED_BY.into(), agent::TURNOUT.into());
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(agent::CHANGED_AT.into(), rfc3339(now));
    let owner = owner(d, false);
    let owners = meta.owner_references.get_or_insert_with(Vec::new);
    if !owners.iter().any(|o| o.uid == owner.uid) {
        owners.push(owner);
    }
    meta.managed_fields = None;
    meta
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

/// `<service>.<namespace>.svc.cluster.local`.
pub fn fqdn(service: &str, ns: &str) -> String {
    format!("{service}.{ns}.svc.cluster.local")
}

fn destination_rule_spec(service: &str, ns: &str, subsets: &[Subset]) -> DestinationRuleSpec {
    DestinationRuleSpec {
        host: fqdn(service, ns),
        subsets: (!subsets.is_empty()).then(|| {
            subsets
                .iter()
                .map(|s| DestinationRuleSubsets {
                    name: s.name.clone(),
                    labels: Some(BTreeMap::from([(agent::POD_TEMPLATE_HASH.into(), s.hash.clone())])),
                    ..DestinationRuleSubsets::default()
                })
                .collect()
        }),
        ..DestinationRuleSpec::default()
    }
}

fn virtual_service_spec(service: &str, ns: &str, route: &Route) -> VirtualServiceSpec {
    let host = fqdn(service, ns);
    let destinations = match route {
        Route::Host => vec![VirtualServiceHttpRoute {
            destination: VirtualServiceHttpRouteDestination {
                host: host.clone(),
                ..Default::default()
            },
            ..Default::default()
        }],
        Route::Split(parts) => parts
            .iter()
            .map(|p| VirtualServiceHttpRoute {
                destination: VirtualServiceHttpRouteDestination {
                    host: host.clone(),
                    subset: Some(p.subset.clone()),
                    ..Default::default()
                },
                weight: Some(i32::from(p.weight)),
                ..Default::default()
            })
            .collect(),
    };
    VirtualServiceSpec {
        hosts: Some(vec![host]),
        http: Some(vec![VirtualServiceHttp {
            name: Some("turnout".into()),
            route: Some(destinations),
            ..Default::default()
        }]),
        ..VirtualServiceSpec::default()
    }
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
    ann.insert(annotations::MESSAGE.into(), json!(p.message));
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

/// Records `event` on `d` (core/v1, which `kubectl describe` shows).
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

/// `now` as RFC 3339 with milliseconds.
pub fn rfc3339(now: Millis) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(i64::try_from(now).unwrap_or(i64::MAX))
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::observe::{self, Snapshot};
    use crate::release::{Managed, Weighted};

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

    fn snapshot(vs: Option<VirtualService>, dr: Option<DestinationRule>) -> Snapshot {
        Snapshot {
            deployment: observe::deployment_view(&podinfo()),
            stable_rs: None,
            new_rs: None,
            candidates: Vec::new(),
            hosts: Vec::new(),
            stored: vec![(vs, dr)],
            unstamped_change: false,
        }
    }

    #[test]
    fn routes_and_subsets_read_back_as_written() {
        let d = podinfo();
        let split = Route::Split(vec![
            Weighted {
                subset: "v1".into(),
                weight: 75,
            },
            Weighted {
                subset: "v2-canary".into(),
                weight: 25,
            },
        ]);
        for route in [Route::Host, split] {
            let mut vs = VirtualService::new("podinfo", virtual_service_spec("podinfo", "shop", &route));
            vs.metadata = managed_meta(&d, "podinfo", None, 1_700_000_000_123);
            assert_eq!(
                vs.spec.hosts.as_deref(),
                Some(&["podinfo.shop.svc.cluster.local".to_owned()][..])
            );
            let snap = snapshot(Some(vs), None);
            let view = observe::host_view("podinfo".into(), snap.stored[0].0.as_ref(), None);
            let Managed::Ours(v) = view.virtual_service else {
                panic!("ours: {view:?}")
            };
            assert_eq!(v.route, route);
            assert_eq!(v.changed_at, 1_700_000_000_123);
        }
        let subsets = vec![
            Subset {
                name: "v1".into(),
                hash: "abc".into(),
            },
            Subset {
                name: "v2-canary".into(),
                hash: "def".into(),
            },
        ];
        for s in [Vec::new(), subsets] {
            let mut dr = DestinationRule::new("podinfo", destination_rule_spec("podinfo", "shop", &s));
            dr.metadata = managed_meta(&d, "podinfo", None, 5);
            let view = observe::host_view("podinfo".into(), None, Some(&dr));
            let Managed::Ours(v) = view.destination_rule else {
                panic!("ours: {view:?}")
            };
            assert_eq!((v.subsets, v.changed_at), (s, 5));
        }
    }

    #[test]
    fn a_rewrite_keeps_the_stored_metadata_and_owners_once() {
        let d = podinfo();
        let stored = ObjectMeta {
            name: Some("podinfo".into()),
            resource_version: Some("42".into()),
            labels: Some(BTreeMap::from([("team".into(), "shop".into())])),
            ..ObjectMeta::default()
        };
        let once = managed_meta(&d, "podinfo", Some(&stored), 1);
        let twice = managed_meta(&d, "podinfo", Some(&once), 2);
        assert_eq!(twice.resource_version.as_deref(), Some("42"), "replace is conditional");
        assert_eq!(twice.owner_references.as_ref().unwrap().len(), 1);
        assert_eq!(
            twice.labels.as_ref().unwrap().get("team").map(String::as_str),
            Some("shop")
        );
        assert_eq!(
            twice
                .labels
                .as_ref()
                .unwrap()
                .get(agent::MANAGED_BY)
                .map(String::as_str),
            Some(agent::TURNOUT)
        );
        assert_eq!(
            twice
                .annotations
                .as_ref()
                .unwrap()
                .get(agent::CHANGED_AT)
                .map(String::as_str),
            Some("1970-01-01T00:00:00.002Z")
        );
    }
}
