//! A kubelet stand-in: starts pods (an IP on the loopback network, Running), makes them Ready after a
//! delay, and on deletion makes them unready and removes them after their shutdown.
//!
//! Container env changes behaviour: `KUBESIM_READY_DELAY_MS` (overrides the readiness delay),
//! `KUBESIM_NOT_READY=true` (never ready), `KUBESIM_SHUTDOWN_DELAY_MS` (time between SIGTERM and exit,
//! default 0, at most the grace period).

use std::time::Duration;

use serde_json::{Value, json};

use super::{Ctx, Key, write_status};
use crate::api::{ApiError, now};

/// The value of env var `name` in the pod's first container that sets it.
pub(crate) fn env<'a>(pod: &'a Value, name: &str) -> Option<&'a str> {
    pod["spec"]["containers"]
        .as_array()?
        .iter()
        .flat_map(|c| c["env"].as_array().into_iter().flatten())
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
}

fn condition(kind: &str, status: bool, at: &str) -> Value {
    json!({"type": kind, "status": if status { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": at})
}

fn statuses(pod: &Value, ready: bool, started_at: &str, terminated: bool) -> Value {
    let containers = pod["spec"]["containers"].as_array().cloned().unwrap_or_default();
    json!(containers
        .iter()
        .map(|c| {
            let state = if terminated {
                json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": started_at, "finishedAt": now()}})
            } else {
                json!({"running": {"startedAt": started_at}})
            };
            json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": ready, "started": !terminated,
                "restartCount": 0, "state": state, "containerID": format!("kubesim://{}", c["name"].as_str().unwrap_or_default())})
        })
        .collect::<Vec<_>>())
}

pub(super) async fn sync(ctx: &mut Ctx, ns: &str, name: &str) -> Result<(), ApiError> {
    let Some(pod_type) = ctx.resource("", "v1", "pods") else {
        return Ok(());
    };
    let Some(pod) = ctx.api.store.get(&("".into(), "pods".into()), ns, name) else {
        ctx.forget(ns, name);
        return Ok(());
    };
    let key = Key::Pod(ns.into(), name.into());
    let status = &pod["status"];
    let started_at = status["startTime"].as_str().map_or_else(now, str::to_owned);

    if pod["metadata"].get("deletionTimestamp").is_some() {
        let grace = pod["metadata"]["deletionGracePeriodSeconds"].as_f64().unwrap_or(30.0);
        let shutdown = env(&pod, "KUBESIM_SHUTDOWN_DELAY_MS")
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1000.0;
        let exit_after = shutdown.min(grace);
        let since = ctx.moment(ns, name, "deleted").elapsed().as_secs_f64();
        if since >= exit_after {
            // The process has exited: the pod object goes.
            return match ctx.api.delete(
                &pod_type,
                ns,
                name,
                &json!({"gracePeriodSeconds": 0}),
                &Default::default(),
                false,
            ) {
                Ok(_) | Err(ApiError { code: 404, .. }) => Ok(()),
                Err(e) => Err(e),
            };
        }
        if super::pod_ready(&pod) {
            let mut next = status.clone();
            let t = now();
            next["conditions"] = json!([
                condition("Initialized", true, &t),
                condition("Ready", false, &t),
                condition("ContainersReady", false, &t),
                condition("PodScheduled", true, &t)
            ]);
            next["containerStatuses"] = statuses(&pod, false, &started_at, false);
            write_status(ctx, &pod_type, &pod, next).await?;
        }
        ctx.after(Duration::from_secs_f64((exit_after - since).max(0.0) + 0.01), key);
        return Ok(());
    }

    if status["phase"].as_str() != Some("Running") {
        let t = now();
        let ip = ctx.pod_ip();
        ctx.moment(ns, name, "started");
        let next = json!({
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": t,
            "qosClass": "BestEffort",
            "conditions": [condition("Initialized", true, &t), condition("Ready", false, &t),
                condition("ContainersReady", false, &t), condition("PodScheduled", true, &t)],
            "containerStatuses": statuses(&pod, false, &t, false),
        });
        write_status(ctx, &pod_type, &pod, next).await?;
        if env(&pod, "KUBESIM_NOT_READY") != Some("true") {
            let delay = env(&pod, "KUBESIM_READY_DELAY_MS")
                .and_then(|v| v.parse().ok())
                .map_or(ctx.config.pod_ready_delay, Duration::from_millis);
            ctx.after(delay, key);
        }
        return Ok(());
    }

    if !super::pod_ready(&pod) && env(&pod, "KUBESIM_NOT_READY") != Some("true") {
        let delay = env(&pod, "KUBESIM_READY_DELAY_MS")
            .and_then(|v| v.parse().ok())
            .map_or(ctx.config.pod_ready_delay, Duration::from_millis);
        let since = ctx.moment(ns, name, "started").elapsed().as_secs_f64();
        if since + 0.001 < delay.as_secs_f64() {
            ctx.after(Duration::from_secs_f64(delay.as_secs_f64() - since), key);
            return Ok(());
        }
        let t = now();
        let mut next = status.clone();
        next["conditions"] = json!([
            condition("Initialized", true, &t),
            condition("Ready", true, &t),
            condition("ContainersReady", true, &t),
            condition("PodScheduled", true, &t)
        ]);
        next["containerStatuses"] = statuses(&pod, true, &started_at, false);
        write_status(ctx, &pod_type, &pod, next).await?;
    }
    Ok(())
}
