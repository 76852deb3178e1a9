//! Leader election on the real control plane: one holder at a time; a silent holder is replaced after the lease
//! duration, not before.

// A test stops at the first thing that is not as it expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Cluster;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use turnout::agent::leader::{ElectionArgs, Elector};

fn args(identity: &str) -> ElectionArgs {
    ElectionArgs {
        leader_elect: true,
        lease_namespace: "default".into(),
        lease_name: "turnout-agent".into(),
        lease_duration: Duration::from_secs(2),
        identity: Some(identity.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_at_a_time_and_a_silent_one_is_replaced_after_the_lease_duration() {
    let cluster = Cluster::start().await;
    let client = cluster.admin_client().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let holder = async || {
        leases
            .get("turnout-agent")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .unwrap()
    };

    let mut a = Elector::new(client.clone(), &args("a"));
    let mut b = Elector::new(client.clone(), &args("b"));
    tokio::time::timeout(Duration::from_secs(5), a.acquire())
        .await
        .expect("a free Lease is taken");
    assert_eq!(holder().await, "a");

    // While a renews, b never gets it.
    let renewing = tokio::spawn(async move {
        a.hold().await;
        panic!("a lost the Lease while renewing it");
    });
    assert!(tokio::time::timeout(Duration::from_secs(5), b.acquire()).await.is_err());
    assert_eq!(holder().await, "a");

    // a falls silent: b takes over after about one lease duration.
    renewing.abort();
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), b.acquire())
        .await
        .expect("b takes over");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "not before the lease ran out"
    );
    assert_eq!(holder().await, "b");
    let lease = leases.get("turnout-agent").await.unwrap().spec.unwrap();
    assert_eq!(lease.lease_transitions, Some(1));
}
