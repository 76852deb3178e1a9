//! A native rolling update keeps to maxSurge and maxUnavailable at every change, as upstream: with 3
//! replicas (25 %: surge 1, unavailable 0) never fewer than 3 ready pods that are not being deleted,
//! and the ReplicaSets' sizes never add up to more than 4 (pods of a ReplicaSet just scaled down can
//! outlive its new size for a moment, upstream too). Read from the store's own change stream, so every
//! intermediate state is seen.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kubesim::sim::{Config, Sim, admin};
use kubesim::store::{Event, EventType};
use serde_json::{Value, json};
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;

const NS: &str = "default";

fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// Pods of the Deployment not being deleted, by name: (image, ready); the size of each ReplicaSet.
#[derive(Debug, Default)]
struct Seen {
    pods: HashMap<String, (String, bool)>,
    sizes: HashMap<String, i64>,
}

impl Seen {
    fn apply(&mut self, e: &Event) {
        let o = &e.object;
        let gone = e.kind == EventType::Deleted;
        match e.resource.1.as_str() {
            "replicasets" if gone => {
                self.sizes.remove(&e.name);
            }
            "replicasets" => {
                self.sizes
                    .insert(e.name.clone(), o["spec"]["replicas"].as_i64().unwrap_or(0));
            }
            "pods" if gone || o["metadata"].get("deletionTimestamp").is_some() => {
                self.pods.remove(&e.name);
            }
            "pods" => {
                let image = o["spec"]["containers"][0]["image"].as_str().unwrap_or_default();
                self.pods.insert(e.name.clone(), (image.to_owned(), ready(o)));
            }
            _ => {}
        }
    }

    /// Every pod runs `image` and is ready, and there are 3.
    fn rolled_out(&self, image: &str) -> bool {
        self.pods.len() == 3 && self.pods.values().all(|(i, r)| i == image && *r)
    }
}

/// Applies changes until every pod runs `image` and is ready, calling `check` after each change.
async fn until_rolled_out(
    changes: &mut Receiver<Arc<Event>>,
    seen: &mut Seen,
    image: &str,
    mut check: impl FnMut(&Seen),
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.rolled_out(image) {
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Ok(Ok(e)) => seen.apply(&e),
            Ok(Err(RecvError::Lagged(n))) => panic!("lagged by {n}"),
            Ok(Err(RecvError::Closed)) => panic!("closed"),
            Err(_) => panic!("not rolled out to {image} in 10 s: {seen:?}"),
        }
        check(seen);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_never_goes_beyond_max_surge_or_max_unavailable() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sim = Sim::start(Config {
        pod_ready_delay: Duration::from_millis(20),
        ..Config::default()
    })
    .await
    .unwrap();
    let t = sim.api.resource_type("apps", "v1", "deployments").unwrap();
    let mut changes = sim.api.store.subscribe();
    let mut seen = Seen::default();
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "app", "image": "app:1"}]},
            },
        },
    });
    sim.api.create(&admin(), &t, NS, deployment, false).await.unwrap();
    until_rolled_out(&mut changes, &mut seen, "app:1", |_| {}).await;

    for image in ["app:2", "app:3", "app:4"] {
        let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}});
        sim.api
            .patch(
                &admin(),
                &t,
                NS,
                "web",
                None,
                "application/strategic-merge-patch+json",
                &serde_json::to_vec(&patch).unwrap(),
                &HashMap::new(),
                false,
            )
            .await
            .unwrap();
        let (mut fewest_ready, mut most_replicas) = (usize::MAX, 0);
        until_rolled_out(&mut changes, &mut seen, image, |s| {
            fewest_ready = fewest_ready.min(s.pods.values().filter(|(_, r)| *r).count());
            most_replicas = most_replicas.max(s.sizes.values().sum());
        })
        .await;
        assert!(
            fewest_ready >= 3,
            "{image}: only {fewest_ready} ready pods at one point (maxUnavailable 0)"
        );
        assert!(
            most_replicas <= 4,
            "{image}: ReplicaSets of {most_replicas} replicas at one point (maxSurge 1)"
        );
    }
}
