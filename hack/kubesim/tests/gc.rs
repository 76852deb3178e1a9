//! Garbage collection by ownerReferences through kube-rs: background, foreground and orphan deletion,
//! a dependent whose owner is already gone, and a namespace waiting for an object's finalizer. Every
//! wait is a watch with a deadline well under the controllers' 10 s resync, so each case is handled
//! from the changes themselves.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Resource as _, ResourceExt as _};
use kubesim::sim::{Config, Sim, admin};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(5);

async fn start() -> (Sim, kube::Client) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sim = Sim::start(Config::default()).await.unwrap();
    let yaml = sim.kubeconfig(&admin().name).unwrap();
    let kubeconfig = Kubeconfig::from_yaml(&yaml).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    (sim, kube::Client::try_from(config).unwrap())
}

/// A ConfigMap owned by `owner` (if any), with `finalizers`.
fn cm(name: &str, owner: Option<&ConfigMap>, finalizers: &[&str]) -> ConfigMap {
    let refs: Vec<_> = owner
        .into_iter()
        .map(|o| json!({"apiVersion": "v1", "kind": "ConfigMap", "name": o.name_any(), "uid": o.uid().unwrap()}))
        .collect();
    serde_json::from_value(json!({"metadata": {"name": name, "ownerReferences": refs, "finalizers": finalizers}}))
        .unwrap()
}

async fn create(api: &Api<ConfigMap>, object: ConfigMap) -> ConfigMap {
    api.create(&PostParams::default(), &object).await.unwrap()
}

async fn gone(api: &Api<ConfigMap>, o: &ConfigMap) {
    let uid = o.uid().unwrap();
    let name = o.name_any();
    tokio::time::timeout(WAIT, await_condition(api.clone(), &name, conditions::is_deleted(&uid)))
        .await
        .unwrap_or_else(|_| panic!("{name} still there after {WAIT:?}"))
        .unwrap();
}

async fn marked(api: &Api<ConfigMap>, name: &str) -> ConfigMap {
    let marked = |o: Option<&ConfigMap>| o.is_some_and(|o| o.meta().deletion_timestamp.is_some());
    tokio::time::timeout(WAIT, await_condition(api.clone(), name, marked))
        .await
        .unwrap_or_else(|_| panic!("{name} not marked for deletion after {WAIT:?}"))
        .unwrap()
        .unwrap()
}

async fn release(api: &Api<ConfigMap>, name: &str) {
    let patch = json!({"metadata": {"finalizers": null}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependents_follow_their_owners_as_each_propagation_policy_says() {
    let (_sim, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    // Background: the owner goes at once, its dependents after it.
    let owner = create(&api, cm("bg", None, &[])).await;
    let a = create(&api, cm("bg-a", Some(&owner), &[])).await;
    let b = create(&api, cm("bg-b", Some(&owner), &[])).await;
    api.delete("bg", &DeleteParams::default()).await.unwrap();
    gone(&api, &a).await;
    gone(&api, &b).await;

    // A dependent with another owner still there is kept.
    let first = create(&api, cm("first", None, &[])).await;
    let second = create(&api, cm("second", None, &[])).await;
    let mut shared = cm("shared", Some(&first), &[]);
    let mut refs = shared.metadata.owner_references.take().unwrap();
    refs.extend(cm("x", Some(&second), &[]).metadata.owner_references.unwrap());
    shared.metadata.owner_references = Some(refs);
    let shared = create(&api, shared).await;
    api.delete("first", &DeleteParams::default()).await.unwrap();
    // A dependent of the first owner only, created after it went, is collected: a collection has run
    // since, and kept the shared dependent. It goes with its second owner.
    let probe = create(&api, cm("probe", Some(&first), &[])).await;
    gone(&api, &probe).await;
    assert!(api.get_opt("shared").await.unwrap().is_some());
    api.delete("second", &DeleteParams::default()).await.unwrap();
    gone(&api, &shared).await;

    // Foreground: the owner waits, marked, until its last dependent is gone, here one held by a
    // finalizer.
    let owner = create(&api, cm("fg", None, &[])).await;
    let free = create(&api, cm("fg-free", Some(&owner), &[])).await;
    create(&api, cm("fg-held", Some(&owner), &["example.com/hold"])).await;
    api.delete("fg", &DeleteParams::foreground()).await.unwrap();
    gone(&api, &free).await;
    let held = marked(&api, "fg-held").await;
    let waiting = api.get("fg").await.unwrap();
    assert!(waiting.meta().deletion_timestamp.is_some());
    assert_eq!(waiting.finalizers(), ["foregroundDeletion"]);
    release(&api, "fg-held").await;
    gone(&api, &held).await;
    gone(&api, &owner).await;

    // Orphan: the owner goes, its dependents stay without the reference.
    let owner = create(&api, cm("or", None, &["example.com/hold"])).await;
    create(&api, cm("or-a", Some(&owner), &[])).await;
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Orphan),
        ..DeleteParams::default()
    };
    api.delete("or", &params).await.unwrap();
    // Garbage collection releases the dependents, then takes its finalizer off the owner.
    let orphaned = |o: Option<&ConfigMap>| o.is_some_and(|o| o.finalizers() == ["example.com/hold"]);
    tokio::time::timeout(WAIT, await_condition(api.clone(), "or", orphaned))
        .await
        .expect("the orphan finalizer is removed")
        .unwrap();
    release(&api, "or").await;
    gone(&api, &owner).await;
    assert!(api.get("or-a").await.unwrap().owner_references().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependent_whose_owners_are_gone_is_deleted() {
    let (_sim, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let owner = create(&api, cm("owner", None, &[])).await;
    api.delete("owner", &DeleteParams::default()).await.unwrap();
    gone(&api, &owner).await;
    let late = create(&api, cm("late", Some(&owner), &[])).await;
    gone(&api, &late).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_goes_once_its_objects_are_gone() {
    let (_sim, client) = start().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "doomed"}})).unwrap();
    let ns = namespaces.create(&PostParams::default(), &ns).await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "doomed");
    let plain = create(&api, cm("plain", None, &[])).await;
    create(&api, cm("held", None, &["example.com/hold"])).await;
    namespaces.delete("doomed", &DeleteParams::default()).await.unwrap();
    gone(&api, &plain).await;
    let held = marked(&api, "held").await;
    assert!(namespaces.get_opt("doomed").await.unwrap().is_some());
    release(&api, "held").await;
    gone(&api, &held).await;
    let uid = ns.uid().unwrap();
    tokio::time::timeout(
        WAIT,
        await_condition(namespaces, "doomed", conditions::is_deleted(&uid)),
    )
    .await
    .expect("the namespace is gone")
    .unwrap();
}
