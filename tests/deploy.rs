//! `deploy/` as `kubectl kustomize` renders it, checked against the contract the code relies on:
//! the webhook registration of DESIGN §4, a hardened Deployment whose flags exist in the binary, and
//! RBAC without wildcards.

// A test stops at the first thing that is not as it expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use serde_json::Value;

/// The pinned kubectl (built with the control plane by hack/k8s/build.sh, first if needed).
fn kubectl() -> std::path::PathBuf {
    let bin = kubesim::testbed::default_bin_dir();
    kubesim::testbed::ensure_built(&bin).expect("the control plane and kubectl build (hack/k8s/build.sh)");
    bin.join("kubectl")
}

/// Renders a kustomization with the pinned kubectl and returns its objects as JSON.
fn render(dir: &str) -> Vec<Value> {
    let root = env!("CARGO_MANIFEST_DIR");
    let kubectl = kubectl();
    let yaml = Command::new(&kubectl)
        .args(["kustomize", &format!("{root}/{dir}")])
        .env("KUBECONFIG", "/dev/null")
        .output()
        .expect("kubectl runs");
    assert!(yaml.status.success(), "{}", String::from_utf8_lossy(&yaml.stderr));
    let mut child = Command::new(&kubectl)
        .args(["annotate", "--local", "-o", "json", "-f", "-", "rendered=true"])
        .env("KUBECONFIG", "/dev/null")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &yaml.stdout).unwrap();
    let json = child.wait_with_output().unwrap();
    assert!(json.status.success());
    serde_json::Deserializer::from_slice(&json.stdout)
        .into_iter::<Value>()
        .map(Result::unwrap)
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendering"))
}

#[test]
fn the_webhook_registration_follows_the_admission_contract() {
    let objects = render("deploy");
    let mwc = find(&objects, "MutatingWebhookConfiguration", "turnout");
    let hook = &mwc["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["timeoutSeconds"], 3);
    assert_eq!(hook["admissionReviewVersions"], serde_json::json!(["v1"]));
    assert_eq!(hook["clientConfig"]["service"]["path"], "/mutate");
    let rule = &hook["rules"][0];
    assert_eq!(rule["apiGroups"], serde_json::json!(["apps"]));
    assert_eq!(rule["resources"], serde_json::json!(["deployments"]));
    assert_eq!(rule["operations"], serde_json::json!(["CREATE", "UPDATE"]));
    let selector = hook["namespaceSelector"]["matchExpressions"].to_string();
    assert!(
        selector.contains("turnout.dev/rollout") && selector.contains("enabled"),
        "{selector}"
    );
    assert!(
        selector.contains("NotIn") && selector.contains("turnout-system"),
        "{selector}"
    );
    let conditions = hook["matchConditions"].as_array().unwrap();
    assert!(
        conditions
            .iter()
            .any(|c| c["expression"].as_str().unwrap().contains("spec.template"))
    );
    assert!(
        conditions
            .iter()
            .any(|c| c["expression"].as_str().unwrap().contains("spec.paused"))
    );
    let ns = find(&objects, "Namespace", "turnout-system");
    assert!(
        ns["metadata"]["labels"].get("turnout.dev/rollout").is_none(),
        "turnout's own namespace never opts in"
    );
}

#[test]
fn the_deployment_is_hardened_and_uses_flags_the_binary_has() {
    let objects = render("deploy");
    let deploy = find(&objects, "Deployment", "turnout");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert!(c["resources"]["requests"].is_object() && c["resources"]["limits"].is_object());
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/live");

    let subcommand = c["args"][0].as_str().unwrap();
    let help = Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args([subcommand, "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for env in c["env"].as_array().unwrap() {
        let name = env["name"].as_str().unwrap();
        if name.starts_with("TURNOUT_") {
            assert!(
                help.contains(&format!("[env: {name}")),
                "{name} is not a flag of `turnout {subcommand}`"
            );
        }
    }
    find(&objects, "PodDisruptionBudget", "turnout");
    find(&objects, "Service", "turnout-webhook");
}

#[test]
fn rbac_names_every_resource_and_verb() {
    for object in render("deploy")
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        for rule in object["rules"].as_array().unwrap() {
            for field in ["apiGroups", "resources", "verbs"] {
                let values = rule[field].as_array().unwrap();
                assert!(
                    values.iter().all(|v| v != "*"),
                    "wildcard {field} in {}",
                    object["metadata"]["name"]
                );
            }
            // The one role with Secrets (get only) is for namespaces to bind for notifications.
            let notifications = object["metadata"]["name"] == "turnout-notifications";
            assert!(
                !rule["resources"].to_string().contains("secrets")
                    || (notifications && rule["verbs"] == serde_json::json!(["get"])),
                "turnout reads no Secrets but where a namespace grants it: {}",
                object["metadata"]["name"]
            );
        }
    }
    // ... and no binding of the installation grants it.
    for binding in render("deploy")
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
    {
        assert_ne!(binding["roleRef"]["name"], "turnout-notifications", "{binding}");
    }
}

#[test]
fn the_cert_manager_variant_renders_with_ca_injection() {
    let objects = render("deploy/cert-manager");
    let mwc = find(&objects, "MutatingWebhookConfiguration", "turnout");
    assert!(mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].is_string());
    assert!(objects.iter().any(|o| o["kind"] == "Certificate"));
}
