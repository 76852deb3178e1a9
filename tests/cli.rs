//! The `turnout` binary as a user runs it: `mutate`, `certs`, `--help`, exit codes.

// A test stops at the first thing that is not as it expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{Value, json};

fn turnout(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args(args)
        .env_remove("TURNOUT_AGENT_USERNAME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("turnout runs");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/kubectl/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn held_review(username: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "b6a1c0de-0000-4000-8000-000000000001",
            "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "name": "podinfo", "namespace": "test", "operation": "UPDATE",
            "userInfo": {"username": username},
            "object": fixture("set-image-v2"), "oldObject": fixture("stored-v1"), "dryRun": false
        }
    }))
    .unwrap()
}

#[test]
fn mutate_answers_a_review_from_stdin() {
    let out = turnout(&["mutate"], &held_review("alice"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let response: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(response["kind"], "AdmissionReview");
    assert_eq!(response["response"]["uid"], "b6a1c0de-0000-4000-8000-000000000001");
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    assert!(response["response"]["patch"].is_string(), "base64 text: {response}");
}

#[test]
fn mutate_reads_a_file_and_honours_the_agent_username() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("review.json");
    std::fs::write(&file, held_review("system:serviceaccount:turnout-system:turnout")).unwrap();
    let file = file.to_str().unwrap();
    let out = turnout(
        &[
            "mutate",
            "--file",
            file,
            "--agent-username",
            "system:serviceaccount:turnout-system:turnout",
        ],
        b"",
    );
    assert!(out.status.success());
    let response: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        response["response"].get("patch").is_none(),
        "the agent is admitted unchanged: {response}"
    );
    let out = turnout(&["mutate", "--file", file], b"");
    let response: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        response["response"]["patch"].is_string(),
        "without the flag it is a user's request"
    );
}

#[test]
fn mutate_rejects_input_that_is_not_an_admission_review_in_one_line() {
    for input in [&b"{\"kind\":\"Deployment\"}"[..], b"garbage"] {
        let out = turnout(&["mutate"], input);
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("turnout: error: not an AdmissionReview turnout can answer: "),
            "{stderr}"
        );
    }
    let out = turnout(&["mutate", "--file", "/nonexistent/review.json"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/review.json"));
}

#[test]
fn certs_writes_a_ca_and_a_serving_pair_that_verify_for_each_host() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = turnout(
        &[
            "certs",
            "--dir",
            d,
            "--host",
            "turnout-webhook.turnout-system.svc",
            "--host",
            "127.0.0.1",
        ],
        b"",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("tls.key"));

    let ca = CertificateDer::from_pem_file(dir.path().join("ca.crt")).unwrap();
    let leaf = CertificateDer::from_pem_file(dir.path().join("tls.crt")).unwrap();
    let key = std::fs::read_to_string(dir.path().join("tls.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .unwrap();
    for host in ["turnout-webhook.turnout-system.svc", "127.0.0.1"] {
        let name = ServerName::try_from(host).unwrap();
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
            .unwrap_or_else(|e| panic!("{host}: {e}"));
    }
    let other = ServerName::try_from("evil.example").unwrap();
    assert!(
        verifier
            .verify_server_cert(&leaf, &[], &other, &[], UnixTime::now())
            .is_err()
    );
}

#[test]
fn certs_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(
        turnout(&["certs", "--dir", d, "--host", "localhost"], b"")
            .status
            .success()
    );
    let before = std::fs::read(dir.path().join("tls.key")).unwrap();
    let out = turnout(&["certs", "--dir", d, "--host", "localhost"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --force"));
    assert_eq!(std::fs::read(dir.path().join("tls.key")).unwrap(), before);
    assert!(
        turnout(&["certs", "--dir", d, "--host", "localhost", "--force"], b"")
            .status
            .success()
    );
    assert_ne!(std::fs::read(dir.path().join("tls.key")).unwrap(), before);
}

#[test]
fn certs_names_an_invalid_host_and_requires_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = turnout(&["certs", "--dir", d, "--host", "bad host!"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"bad host!\""));
    assert!(!dir.path().join("tls.key").exists());
    let out = turnout(&["certs", "--dir", d], b"");
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[test]
fn every_subcommand_explains_itself() {
    for (sub, needle) in [
        ("webhook", "TURNOUT_TLS_CERT"),
        ("mutate", "--agent-username"),
        ("certs", "--force"),
        ("agent", "turnout.dev/steps"),
        ("run", "TURNOUT_PROMETHEUS"),
    ] {
        let out = turnout(&[sub, "--help"], b"");
        assert!(out.status.success(), "{sub}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(needle),
            "{sub} --help lacks {needle}"
        );
    }
}

#[test]
fn the_agent_without_a_cluster_says_so_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args(["agent", "--admin-listen", "127.0.0.1:0"])
        .env("KUBECONFIG", dir.path().join("missing"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no Kubernetes client configuration: set KUBECONFIG or run in a cluster"),
        "{stderr}"
    );
}

#[test]
fn invalid_release_flags_are_refused_with_the_reason() {
    let out = turnout(&["agent", "--steps", "50,20,100"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("steps must increase"));
}
