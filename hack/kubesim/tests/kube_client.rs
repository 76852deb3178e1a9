//! kube-rs against kubesim: list, watch (with resume and 410 Gone), patch, and optimistic concurrency.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kubesim::sim::{Config, Sim, admin};
use serde_json::json;

async fn client(sim: &Sim) -> kube::Client {
    let yaml = sim.kubeconfig(&admin().name).unwrap();
    let kubeconfig = Kubeconfig::from_yaml(&yaml).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn cm(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": "demo"}}, "data": {"k": value}}))
        .unwrap()
}

async fn start(history: usize) -> Sim {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Sim::start(Config {
        history,
        ..Config::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_watch_and_patch_through_kube_rs() {
    let sim = start(1000).await;
    let api: Api<ConfigMap> = Api::namespaced(client(&sim).await, "default");
    api.create(&PostParams::default(), &cm("a", "1")).await.unwrap();
    let list = api.list(&ListParams::default().labels("app=demo")).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let rv = list.metadata.resource_version.clone().unwrap();

    let mut stream = api.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    api.patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "2"}})))
        .await
        .unwrap();
    api.create(&PostParams::default(), &cm("b", "1")).await.unwrap();
    api.delete("a", &Default::default()).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(match event {
            WatchEvent::Added(o) => format!("added {}", o.metadata.name.unwrap()),
            WatchEvent::Modified(o) => format!("modified {} {}", o.metadata.name.unwrap(), o.data.unwrap()["k"]),
            WatchEvent::Deleted(o) => format!("deleted {}", o.metadata.name.unwrap()),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(seen, vec!["modified a 2", "added b", "deleted a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_resource_version_conflicts_and_a_fresh_read_succeeds() {
    let sim = start(1000).await;
    let api: Api<ConfigMap> = Api::namespaced(client(&sim).await, "default");
    let created = api.create(&PostParams::default(), &cm("a", "1")).await.unwrap();
    let mut stale = created.clone();
    api.patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "2"}})))
        .await
        .unwrap();
    stale.data = Some([("k".to_owned(), "3".to_owned())].into());
    let err = api.replace("a", &PostParams::default(), &stale).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"),
        "{err:?}"
    );
    let mut fresh = api.get("a").await.unwrap();
    fresh.data = Some([("k".to_owned(), "3".to_owned())].into());
    assert_eq!(
        api.replace("a", &PostParams::default(), &fresh)
            .await
            .unwrap()
            .data
            .unwrap()["k"],
        "3"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_version_no_longer_kept_is_gone() {
    let sim = start(5).await;
    let api: Api<ConfigMap> = Api::namespaced(client(&sim).await, "default");
    let first = api.create(&PostParams::default(), &cm("a", "1")).await.unwrap();
    for i in 0..10 {
        api.create(&PostParams::default(), &cm(&format!("x{i}"), "1"))
            .await
            .unwrap();
    }
    let rv = first.metadata.resource_version.unwrap();
    let mut stream = api.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    let event = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(event, WatchEvent::Error(ref e) if e.code == 410), "{event:?}");
}
