//! The Deployment controller, after upstream's for what turnout relies on: one ReplicaSet per pod
//! template (named by pod-template-hash), rolling updates within maxSurge/maxUnavailable, Recreate,
//! paused Deployments (no new ReplicaSet, scaling still works, Progressing=Unknown/DeploymentPaused,
//! and a ProgressDeadlineExceeded written by a client kept while paused), progress deadlines, the
//! revision annotation, and every status field `kubectl rollout status` reads.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::{Ctx, Key, condition, owned_by, seconds_since, system, template_hash, write_status};
use crate::api::{ApiError, now};

const REVISION: &str = "deployment.kubernetes.io/revision";
const HASH: &str = "pod-template-hash";

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn revision(rs: &Value) -> i64 {
    rs["metadata"]["annotations"][REVISION]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// `maxSurge`/`maxUnavailable`: an integer, or a percentage of `replicas` rounded up or down.
fn resolve(v: &Value, replicas: i64, round_up: bool) -> i64 {
    match v {
        Value::Number(n) => n.as_i64().unwrap_or(0),
        Value::String(s) => {
            let pct: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
            if round_up {
                (replicas * pct + 99) / 100
            } else {
                replicas * pct / 100
            }
        }
        _ => 0,
    }
}

fn template_without_hash(rs: &Value) -> Value {
    let mut t = rs["spec"]["template"].clone();
    if let Some(labels) = t["metadata"]["labels"].as_object_mut() {
        labels.remove(HASH);
    }
    t
}

pub(super) async fn sync(ctx: &mut Ctx, ns: &str, name: &str) -> Result<(), ApiError> {
    let (Some(d_type), Some(rs_type)) = (
        ctx.resource("apps", "v1", "deployments"),
        ctx.resource("apps", "v1", "replicasets"),
    ) else {
        return Ok(());
    };
    let Some(d) = ctx.api.store.get(&("apps".into(), "deployments".into()), ns, name) else {
        return Ok(());
    };
    if d["metadata"].get("deletionTimestamp").is_some() {
        return Ok(());
    }
    let uid = d["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
    let spec = &d["spec"];
    let replicas = spec["replicas"].as_i64().unwrap_or(1);
    let paused = spec["paused"] == true;
    let template = &spec["template"];
    let mut all = owned_by(ctx, "apps", "replicasets", ns, &uid);
    all.sort_by_key(|rs| {
        rs["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    });
    let new_index = all.iter().position(|rs| template_without_hash(rs) == *template);
    let mut changed = false;

    // (name, spec.replicas) of each ReplicaSet as this pass leaves it.
    let mut sizes: Vec<(String, i64)> = all
        .iter()
        .map(|rs| {
            (
                rs["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
                int(&rs["spec"]["replicas"]),
            )
        })
        .collect();

    if paused {
        // Scaling still works on a paused Deployment: the ReplicaSet that runs the pods follows.
        let active = new_index.or_else(|| {
            sizes
                .iter()
                .enumerate()
                .filter(|(_, s)| s.1 > 0)
                .max_by_key(|(_, s)| s.1)
                .map(|(i, _)| i)
        });
        if let Some(i) = active
            && sizes.iter().filter(|s| s.1 > 0).count() <= 1
            && sizes[i].1 != replicas
        {
            scale(ctx, &rs_type, &all[i], replicas).await?;
            sizes[i].1 = replicas;
            changed = true;
        }
        return status(ctx, &d_type, &d, &all, new_index, replicas, paused, changed).await;
    }

    let strategy = &spec["strategy"];
    let recreate = strategy["type"] == "Recreate";
    let surge = if recreate {
        0
    } else {
        resolve(&strategy["rollingUpdate"]["maxSurge"], replicas, true)
    };
    let mut unavailable = if recreate {
        0
    } else {
        resolve(&strategy["rollingUpdate"]["maxUnavailable"], replicas, false)
    };
    if !recreate && surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    let max_revision = all.iter().map(|rs| revision(rs)).max().unwrap_or(0);

    let new_index = match new_index {
        Some(i) => {
            let others_max = all
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, rs)| revision(rs))
                .max()
                .unwrap_or(0);
            if revision(&all[i]) <= others_max {
                // A template seen before (a rollback or revert) becomes the newest revision again.
                let mut rs = (*all[i]).clone();
                rs["metadata"]["annotations"][REVISION] = json!((others_max + 1).to_string());
                let rs_name = rs["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                all[i] = ctx
                    .api
                    .update_shared(&system(), &rs_type, ns, &rs_name, None, rs, false)
                    .await?;
                changed = true;
            }
            i
        }
        None => {
            let hash = template_hash(template);
            let rs_name = format!("{name}-{hash}");
            let any_old_pods = sizes.iter().any(|s| s.1 > 0);
            let initial = if any_old_pods {
                0
            } else if recreate {
                replicas
            } else {
                replicas.min(replicas + surge)
            };
            let mut rs_template = template.clone();
            rs_template["metadata"]["labels"][HASH] = json!(hash);
            let mut selector = spec["selector"].clone();
            selector["matchLabels"][HASH] = json!(hash);
            let rs = json!({
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {
                    "name": rs_name,
                    "namespace": ns,
                    "labels": rs_template["metadata"]["labels"],
                    "annotations": {
                        REVISION: (max_revision + 1).to_string(),
                        "deployment.kubernetes.io/desired-replicas": replicas.to_string(),
                        "deployment.kubernetes.io/max-replicas": (replicas + surge).to_string(),
                    },
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": uid,
                        "controller": true, "blockOwnerDeletion": true}],
                },
                "spec": {
                    "replicas": initial,
                    "minReadySeconds": spec["minReadySeconds"].as_i64().unwrap_or(0),
                    "selector": selector,
                    "template": rs_template,
                },
            });
            let created = ctx.api.create(&system(), &rs_type, ns, rs, false).await?;
            all.push(Arc::new(created));
            sizes.push((rs_name, initial));
            changed = true;
            all.len() - 1
        }
    };

    // The Deployment carries the revision of its newest ReplicaSet.
    let new_revision = revision(&all[new_index]).to_string();
    if d["metadata"]["annotations"][REVISION].as_str() != Some(new_revision.as_str()) {
        let mut next = (*d).clone();
        next["metadata"]["annotations"][REVISION] = json!(new_revision);
        let d_now = ctx
            .api
            .update_shared(&system(), &d_type, ns, name, None, next, false)
            .await?;
        return status(ctx, &d_type, &d_now, &all, Some(new_index), replicas, false, true).await;
    }

    let old: Vec<usize> = (0..all.len()).filter(|i| *i != new_index).collect();
    let available = |rs: &Value| int(&rs["status"]["availableReplicas"]);
    if recreate {
        for &i in &old {
            if sizes[i].1 > 0 {
                scale(ctx, &rs_type, &all[i], 0).await?;
                sizes[i].1 = 0;
                changed = true;
            }
        }
        let old_pods: i64 = old.iter().map(|&i| int(&all[i]["status"]["replicas"])).sum();
        if old_pods == 0 && sizes[new_index].1 != replicas {
            scale(ctx, &rs_type, &all[new_index], replicas).await?;
            changed = true;
        }
    } else {
        // Scale the new ReplicaSet up within maxSurge.
        let total: i64 = sizes.iter().map(|s| s.1).sum();
        let new_size = sizes[new_index].1;
        if new_size < replicas {
            let up = (replicas + surge - total).min(replicas - new_size);
            if up > 0 {
                scale(ctx, &rs_type, &all[new_index], new_size + up).await?;
                sizes[new_index].1 = new_size + up;
                changed = true;
            }
        } else if new_size > replicas {
            scale(ctx, &rs_type, &all[new_index], replicas).await?;
            sizes[new_index].1 = replicas;
            changed = true;
        }
        // Scale old ReplicaSets down within maxUnavailable, oldest first.
        let min_available = replicas - unavailable;
        let total: i64 = sizes.iter().map(|s| s.1).sum();
        let new_unavailable = (sizes[new_index].1 - available(&all[new_index])).max(0);
        // As upstream, nothing is scaled down unless the ReplicaSets' sizes leave room for it.
        let max_scaled_down = total - min_available - new_unavailable;
        let mut budget = max_scaled_down;
        // Old replicas that are not available can go first, within the same budget.
        for &i in &old {
            if budget <= 0 {
                break;
            }
            let unhealthy = (sizes[i].1 - available(&all[i])).max(0).min(budget);
            if unhealthy > 0 {
                let to = sizes[i].1 - unhealthy;
                scale(ctx, &rs_type, &all[i], to).await?;
                sizes[i].1 = to;
                budget -= unhealthy;
                changed = true;
            }
        }
        // A ReplicaSet's status can lag its size (this pass, or the last one, scaled it down and its
        // controller has not caught up): it counts for at most the replicas it is to have, so a stale
        // status cannot scale old ReplicaSets down again before their pods are gone.
        let available_total: i64 = all.iter().zip(&sizes).map(|(rs, size)| available(rs).min(size.1)).sum();
        let mut down = if max_scaled_down > 0 {
            available_total - min_available
        } else {
            0
        };
        for &i in &old {
            if down <= 0 {
                break;
            }
            let by = sizes[i].1.min(down);
            if by > 0 {
                scale(ctx, &rs_type, &all[i], sizes[i].1 - by).await?;
                sizes[i].1 -= by;
                down -= by;
                changed = true;
            }
        }
    }
    status(ctx, &d_type, &d, &all, Some(new_index), replicas, false, changed).await
}

async fn scale(ctx: &Ctx, rs_type: &crate::resources::ResourceType, rs: &Value, replicas: i64) -> Result<(), ApiError> {
    let mut next = rs.clone();
    next["spec"]["replicas"] = json!(replicas);
    let ns = rs["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = rs["metadata"]["name"].as_str().unwrap_or_default();
    ctx.api
        .update_shared(&system(), rs_type, ns, name, None, next, false)
        .await
        .map(|_| ())
}

fn set_condition(conditions: &mut Vec<Value>, kind: &str, status: &str, reason: &str, message: &str, progressed: bool) {
    let t = now();
    match conditions.iter_mut().find(|c| c["type"] == kind) {
        Some(c) => {
            if c["status"] != status {
                c["lastTransitionTime"] = json!(t);
            }
            if c["status"] != status || c["reason"] != reason || progressed {
                c["lastUpdateTime"] = json!(t);
            }
            c["status"] = json!(status);
            c["reason"] = json!(reason);
            c["message"] = json!(message);
        }
        None => conditions.push(
            json!({"type": kind, "status": status, "reason": reason, "message": message,
            "lastUpdateTime": t, "lastTransitionTime": t}),
        ),
    }
}

#[allow(clippy::too_many_arguments)]
async fn status(
    ctx: &mut Ctx,
    d_type: &crate::resources::ResourceType,
    d: &Value,
    all: &[Arc<Value>],
    new_index: Option<usize>,
    replicas: i64,
    paused: bool,
    changed: bool,
) -> Result<(), ApiError> {
    let sum = |f: &str| all.iter().map(|rs| int(&rs["status"][f])).sum::<i64>();
    let (total, ready, available) = (sum("replicas"), sum("readyReplicas"), sum("availableReplicas"));
    let updated = new_index.map_or(0, |i| int(&all[i]["status"]["replicas"]));
    let old_status = &d["status"];
    let progressed = changed
        || int(&old_status["updatedReplicas"]) != updated
        || int(&old_status["readyReplicas"]) != ready
        || int(&old_status["availableReplicas"]) != available;
    let strategy = &d["spec"]["strategy"];
    let max_unavailable = if strategy["type"] == "Recreate" {
        0
    } else {
        resolve(&strategy["rollingUpdate"]["maxUnavailable"], replicas, false)
    };
    let mut conditions: Vec<Value> = old_status["conditions"].as_array().cloned().unwrap_or_default();
    if available >= replicas - max_unavailable {
        set_condition(
            &mut conditions,
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.",
            false,
        );
    } else {
        set_condition(
            &mut conditions,
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.",
            false,
        );
    }
    let current = condition(old_status, "Progressing").cloned();
    let reason = current
        .as_ref()
        .and_then(|c| c["reason"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let rs_name = new_index
        .map(|i| all[i]["metadata"]["name"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    let deadline = d["spec"]["progressDeadlineSeconds"].as_f64();
    if paused {
        // As upstream: a reported lack of progress is never overwritten by the paused condition.
        if reason != "ProgressDeadlineExceeded" && reason != "DeploymentPaused" {
            set_condition(
                &mut conditions,
                "Progressing",
                "Unknown",
                "DeploymentPaused",
                "Deployment is paused",
                false,
            );
        }
    } else {
        let complete = updated == replicas && available == replicas && total == replicas;
        if reason == "DeploymentPaused" {
            set_condition(
                &mut conditions,
                "Progressing",
                "Unknown",
                "DeploymentResumed",
                "Deployment is resumed",
                false,
            );
        }
        if complete {
            set_condition(
                &mut conditions,
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                &format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
                false,
            );
        } else if progressed {
            set_condition(
                &mut conditions,
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                &format!("ReplicaSet \"{rs_name}\" is progressing."),
                true,
            );
        } else if let Some(deadline) = deadline {
            let last =
                condition(&json!({"conditions": conditions}), "Progressing").map(|c| c["lastUpdateTime"].clone());
            let since = last.and_then(|t| seconds_since(&t)).unwrap_or(0.0);
            if since > deadline {
                set_condition(
                    &mut conditions,
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    &format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
                    false,
                );
            } else {
                let ns = d["metadata"]["namespace"].as_str().unwrap_or_default().to_owned();
                let name = d["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                ctx.after(
                    Duration::from_secs_f64(deadline - since + 0.5),
                    Key::Deployment(ns, name),
                );
            }
        }
    }
    let mut status = json!({
        "observedGeneration": d["metadata"]["generation"],
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "unavailableReplicas": (replicas - available).max(0),
        "conditions": conditions,
    });
    if let Some(c) = old_status.get("collisionCount") {
        status["collisionCount"] = c.clone();
    }
    write_status(ctx, d_type, d, status).await
}
