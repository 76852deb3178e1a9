//! The ReplicaSet controller: keeps `spec.replicas` pods of the template, reports their readiness.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Ctx, Key, condition, owned_by, pod_ready, seconds_since, system, write_status};
use crate::api::ApiError;

pub(super) async fn sync(ctx: &mut Ctx, ns: &str, name: &str) -> Result<(), ApiError> {
    let (Some(rs_type), Some(pod_type)) = (
        ctx.resource("apps", "v1", "replicasets"),
        ctx.resource("", "v1", "pods"),
    ) else {
        return Ok(());
    };
    let Some(rs) = ctx.api.store.get(&("apps".into(), "replicasets".into()), ns, name) else {
        return Ok(());
    };
    let uid = rs["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
    let pods = owned_by(ctx, "", "pods", ns, &uid);
    let active: Vec<&Value> = pods
        .iter()
        .map(|p| &**p)
        .filter(|p| p["metadata"].get("deletionTimestamp").is_none())
        .collect();
    let want = if rs["metadata"].get("deletionTimestamp").is_some() {
        0
    } else {
        rs["spec"]["replicas"].as_i64().unwrap_or(1)
    };
    let have = active.len() as i64;
    if have < want {
        for _ in have..want {
            let mut template = rs["spec"]["template"].clone();
            let pod = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "generateName": format!("{name}-"),
                    "namespace": ns,
                    "labels": template["metadata"]["labels"].take(),
                    "annotations": template["metadata"]["annotations"].take(),
                    "ownerReferences": [{
                        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": name, "uid": uid,
                        "controller": true, "blockOwnerDeletion": true,
                    }],
                },
                "spec": template["spec"].take(),
            });
            ctx.api.create(&system(), &pod_type, ns, pod, false).await?;
        }
    } else if have > want {
        // Not ready first, then the newest, as upstream ranks pods to delete.
        let mut victims = active.clone();
        victims.sort_by_key(|p| {
            (
                pod_ready(p),
                std::cmp::Reverse(
                    p["metadata"]["creationTimestamp"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                ),
            )
        });
        for p in victims.into_iter().take((have - want) as usize) {
            let pod_name = p["metadata"]["name"].as_str().unwrap_or_default();
            match ctx
                .api
                .delete(&pod_type, ns, pod_name, &json!({}), &Default::default(), false)
            {
                Ok(_) | Err(ApiError { code: 404, .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }

    let min_ready = rs["spec"]["minReadySeconds"].as_f64().unwrap_or(0.0);
    let ready = active.iter().filter(|p| pod_ready(p)).count();
    let mut available = 0;
    for p in active.iter().filter(|p| pod_ready(p)) {
        let since = condition(&p["status"], "Ready")
            .and_then(|c| seconds_since(&c["lastTransitionTime"]))
            .unwrap_or(0.0);
        if since >= min_ready {
            available += 1;
        } else {
            ctx.after(
                Duration::from_secs_f64(min_ready - since + 0.05),
                Key::ReplicaSet(ns.into(), name.into()),
            );
        }
    }
    let status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": active.len(),
        "readyReplicas": ready,
        "availableReplicas": available,
        "observedGeneration": rs["metadata"]["generation"],
    });
    write_status(ctx, &rs_type, &rs, status).await
}
