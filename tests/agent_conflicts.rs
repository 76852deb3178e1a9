//! Every write of the agent is conditional on what it read: a change made by someone else in between
//! makes the write fail with 409 (and the agent plans again from a fresh read) instead of overwriting it.

// A test stops at the first thing that is not as it expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Cluster;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams};
use turnout::agent::{act, observe};
use turnout::config::ReleaseConfig;
use turnout::release::{
    Action, Intent, Phase, ProviderKind, Rollout, Route, RoutingAction, StatusPatch, Strategy, Weighted,
};

fn config() -> ReleaseConfig {
    ReleaseConfig::default()
}

fn status() -> Action {
    Action::Status(StatusPatch {
        phase: Phase::Pending,
        release: 2,
        weight: 0,
        failed_checks: 0,
        iteration: 0,
        message: "release v2 started".into(),
        unpause: false,
        intent: Intent::Keep,
        rollout: Rollout::Keep,
        paused: false,
        clear_request: false,
        provider: ProviderKind::Istio,
        strategy: Strategy::Canary,
    })
}

/// The Deployment once the Deployment controller has observed its generation. Every change of a
/// Deployment's annotations bumps its generation (they are copied to its ReplicaSets), and the
/// controller then writes the status: a read before that write is stale by then.
async fn settled(deployments: &Api<Deployment>) -> Deployment {
    common::eventually(
        std::time::Duration::from_secs(30),
        "the controller to observe the generation",
        || async {
            let d = deployments.get("podinfo").await.ok()?;
            let observed = d.status.as_ref()?.observed_generation;
            (observed == d.metadata.generation).then_some(d)
        },
    )
    .await
}

fn conflict<T: std::fmt::Debug>(result: kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(ref s)) if s.code == 409)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_planned_from_a_stale_read_conflict_instead_of_overwriting() {
    let cluster = Cluster::start().await;
    cluster.istio_crds().await;
    cluster.namespace("shop", false).await;
    cluster.podinfo("shop").await;
    cluster
        .apply("apiVersion: v1\nkind: Service\nmetadata:\n  name: podinfo\n  namespace: shop\nspec:\n  selector:\n    app: podinfo\n  ports:\n    - port: 9898\n")
        .await;
    cluster
        .ok(&["rollout", "status", "-n", "shop", "deployment/podinfo", "--timeout=60s"])
        .await;
    let client = cluster.admin_client().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "shop");

    // The Deployment: read, changed by someone else, then written from the stale read.
    let d = settled(&deployments).await;
    let snap = observe::snapshot(&client, &d, &config(), ProviderKind::Istio, true)
        .await
        .unwrap();
    assert_eq!(snap.hosts.len(), 1, "the Service is found");
    cluster
        .ok(&["annotate", "-n", "shop", "deployment/podinfo", "team=shop"])
        .await;
    assert!(conflict(act::apply(&client, &d, &config(), &snap, &status(), 1).await));
    let fresh = settled(&deployments).await;
    assert_eq!(
        fresh.metadata.annotations.as_ref().unwrap()["team"],
        "shop",
        "the other change stands"
    );
    act::apply(&client, &fresh, &config(), &snap, &status(), 1)
        .await
        .unwrap();

    // A change of the status alone (the Deployment controller's, say) is no conflict: nothing the
    // plan read changed, and the write is retried from the fresh version.
    let read = settled(&deployments).await;
    let condition = serde_json::json!({ "status": { "conditions": [
        { "type": "Checked", "status": "True", "reason": "Test", "message": "status-only change" }
    ] } });
    deployments
        .patch_status("podinfo", &PatchParams::default(), &Patch::Strategic(&condition))
        .await
        .unwrap();
    let now = deployments.get("podinfo").await.unwrap();
    assert_ne!(
        now.metadata.resource_version, read.metadata.resource_version,
        "the read is stale"
    );
    let Action::Status(mut checked) = status() else {
        unreachable!()
    };
    checked.message = "release v2 checked".into();
    act::apply(&client, &read, &config(), &snap, &Action::Status(checked), 1)
        .await
        .unwrap();
    let after = deployments.get("podinfo").await.unwrap();
    assert_eq!(
        after.metadata.annotations.as_ref().unwrap()["turnout.dev/message"],
        "release v2 checked"
    );

    // A request removed from a stale read: a newer request written meanwhile is not lost.
    let read = settled(&deployments).await;
    cluster
        .ok(&[
            "annotate",
            "-n",
            "shop",
            "deployment/podinfo",
            "turnout.dev/request=abort@2",
        ])
        .await;
    assert!(conflict(
        act::apply(&client, &read, &config(), &snap, &Action::ClearRequest, 1).await
    ));
    let fresh = settled(&deployments).await;
    assert_eq!(
        fresh.metadata.annotations.as_ref().unwrap()["turnout.dev/request"],
        "abort@2"
    );
    act::apply(&client, &fresh, &config(), &snap, &Action::ClearRequest, 1)
        .await
        .unwrap();
    let fresh = settled(&deployments).await;
    assert!(
        !fresh
            .metadata
            .annotations
            .as_ref()
            .unwrap()
            .contains_key("turnout.dev/request")
    );

    // The VirtualService: created, read, changed by someone else, then replaced from the stale read.
    let to = |subset: &str| {
        Route::weights(vec![Weighted {
            backend: subset.into(),
            weight: 100,
        }])
    };
    let put = |route: Route| Action::Routing(RoutingAction::PutRoute { host: 0, route });
    act::apply(&client, &fresh, &config(), &snap, &put(Route::Host), 2)
        .await
        .unwrap();
    let snap = observe::snapshot(&client, &fresh, &config(), ProviderKind::Istio, true)
        .await
        .unwrap();
    cluster
        .ok(&["annotate", "-n", "shop", "virtualservice/podinfo", "owner=someone"])
        .await;
    assert!(conflict(
        act::apply(&client, &fresh, &config(), &snap, &put(to("v1")), 3).await
    ));
    // Creating one that someone else created meanwhile conflicts too.
    let before = observe::snapshot(&client, &fresh, &config(), ProviderKind::Istio, true)
        .await
        .unwrap();
    let turnout::agent::routing::Stored::Istio(stored) = &before.stored[0] else {
        panic!("istio: {:?}", before.stored[0])
    };
    assert!(stored.destination_rule.is_none(), "no DestinationRule yet");
    cluster
        .apply("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: podinfo\n  namespace: shop\nspec:\n  host: podinfo\n")
        .await;
    let subsets = Action::Routing(RoutingAction::PutBackends {
        host: 0,
        backends: vec![],
    });
    assert!(conflict(
        act::apply(&client, &fresh, &config(), &before, &subsets, 3).await
    ));
    let snap = observe::snapshot(&client, &fresh, &config(), ProviderKind::Istio, true)
        .await
        .unwrap();
    act::apply(&client, &fresh, &config(), &snap, &put(to("v1")), 4)
        .await
        .unwrap();
}
