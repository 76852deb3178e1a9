//! The webhook as a cluster calls it: `deploy/` applied to the real control plane with the pinned kubectl,
//! the real API server calling turnout's webhook server through deploy/'s MutatingWebhookConfiguration, and Deployment updates
//! made with kubectl in an opted-in namespace and in one that is not.

// A test stops at the first thing that is not as it expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Cluster, template_label};
use turnout::webhook::{Args, Server};

struct Env {
    cluster: Cluster,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl std::ops::Deref for Env {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl Env {
    async fn start() -> Self {
        let cluster = Cluster::exclusive().await;
        let dir = cluster.dir.path();

        // turnout's webhook on its own certificates, for the name kubesim calls the Service by.
        let bundle =
            turnout::certs::generate(&["turnout-webhook.turnout-system.svc".into(), "127.0.0.1".into()]).unwrap();
        turnout::certs::write(&dir.join("certs"), &bundle, false).unwrap();
        let args = Args {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls_cert: dir.join("certs/tls.crt"),
            tls_key: dir.join("certs/tls.key"),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            agent_username: Some(common::AGENT_USER.into()),
            tls_reload_interval: Duration::from_secs(10),
            max_body_bytes: 4 << 20,
            header_read_timeout: Duration::from_secs(10),
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(1),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = Server::start(&args, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        cluster.install(bundle.ca_pem.as_bytes(), server.addr).await;
        Self { cluster, _stop: stop }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_updates_in_an_opted_in_namespace_are_held_and_reverted() {
    let env = Env::start().await;
    env.namespace("test", true).await;
    env.podinfo("test").await;
    let d = env.get("test", "deployment/podinfo").await;
    assert_eq!(
        d["metadata"]["annotations"]["turnout.dev/revision"], "1",
        "stamped at CREATE"
    );
    assert_eq!(template_label(&d, "version").as_deref(), Some("v1"));

    let out = env
        .ok(&[
            "set",
            "image",
            "-n",
            "test",
            "deployment/podinfo",
            "podinfod=ghcr.io/stefanprodan/podinfo:6.1.0",
        ])
        .await;
    assert!(
        out.stderr.contains("Warning: turnout: release v2 of test/podinfo started; follow it with: kubectl rollout status deployment/podinfo -n test; undo it with: turnout undo podinfo -n test"),
        "kubectl shows turnout's warning: {}",
        out.stderr
    );
    let d = env.get("test", "deployment/podinfo").await;
    assert_eq!(d["spec"]["paused"], true, "held");
    assert_eq!(d["metadata"]["annotations"]["turnout.dev/stable-revision"], "1");
    assert_eq!(template_label(&d, "turnout.dev/revision").as_deref(), Some("2"));
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"], "ghcr.io/stefanprodan/podinfo:6.1.0",
        "the template as written"
    );
    let rs = env.get("test", "replicasets").await;
    assert_eq!(
        rs["items"].as_array().unwrap().len(),
        1,
        "a held Deployment starts no new ReplicaSet"
    );

    let out = env
        .ok(&[
            "set",
            "image",
            "-n",
            "test",
            "deployment/podinfo",
            "podinfod=ghcr.io/stefanprodan/podinfo:6.0.0",
        ])
        .await;
    assert!(out.stderr.contains("is back to stable v1"), "{}", out.stderr);
    let d = env.get("test", "deployment/podinfo").await;
    assert_ne!(d["spec"]["paused"], true, "unpaused");
    assert_eq!(template_label(&d, "turnout.dev/revision").as_deref(), Some("1"));
    env.ok(&["rollout", "status", "-n", "test", "deployment/podinfo", "--timeout=30s"])
        .await;
    let rs = env.get("test", "replicasets").await;
    assert_eq!(
        rs["items"].as_array().unwrap().len(),
        1,
        "the revert matches the running ReplicaSet: no pod restarts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_that_did_not_opt_in_is_left_alone() {
    let env = Env::start().await;
    env.namespace("plain", false).await;
    env.podinfo("plain").await;
    env.ok(&[
        "set",
        "image",
        "-n",
        "plain",
        "deployment/podinfo",
        "podinfod=ghcr.io/stefanprodan/podinfo:6.1.0",
    ])
    .await;
    let d = env.get("plain", "deployment/podinfo").await;
    assert!(d["metadata"]["annotations"].get("turnout.dev/revision").is_none());
    assert_ne!(d["spec"]["paused"], true);
}

/// deploy/'s registration passes the real API server's validation, its CEL `matchConditions` compiled
/// there; a condition that does not compile is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registration_and_its_cel_conditions_pass_the_api_server_s_validation() {
    let cluster = Cluster::start().await;
    let root = env!("CARGO_MANIFEST_DIR");
    let rendered = cluster.ok(&["kustomize", &format!("{root}/deploy")]).await.stdout;
    let webhook: String = rendered
        .split("\n---\n")
        .find(|doc| doc.contains("kind: MutatingWebhookConfiguration"))
        .expect("deploy/ registers the webhook")
        // Under another name: validated as created, whatever the tests beside this one registered.
        .replacen("  name: turnout\n", "  name: turnout-validation\n", 1);
    let applied = cluster
        .kubectl(&["create", "--dry-run=server", "-f", "-"], Some(&webhook))
        .await;
    assert!(applied.ok, "{}", applied.stderr);

    let broken = webhook.replacen("request.operation == 'CREATE'", "request.operation == ", 1);
    assert_ne!(broken, webhook, "the condition to break is in deploy/");
    let refused = cluster
        .kubectl(&["create", "--dry-run=server", "-f", "-"], Some(&broken))
        .await;
    assert!(!refused.ok, "a condition that does not compile is refused");
    assert!(
        refused.stderr.contains("matchConditions") && refused.stderr.contains("compil"),
        "{}",
        refused.stderr
    );
}
