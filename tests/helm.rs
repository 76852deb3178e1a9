//! The Helm chart (`deploy/helm/turnout`) with the real helm v4, built from `helm.sh/helm/v4` by
//! hack/helm/build.sh (first, if needed):
//! - `helm template` renders the objects `kubectl kustomize` renders from deploy/ (and, with
//!   `certManager.enabled`, from deploy/cert-manager), but for Helm's own metadata ([`HELM_LABELS`]);
//! - every flag of `turnout run` is a value, the values reach the binary as flags it accepts, and the
//!   schema refuses values the binary or the API server would;
//! - names and namespaces follow the release;
//! - `helm install` onto the real control plane, `turnout run` with the installed Deployment's own
//!   environment and the chart's ServiceAccount token (so the chart's RBAC is what the real authorizer
//!   enforces), a release from `kubectl set image` to `Succeeded`, then `helm uninstall`, after which
//!   nothing the chart made is left but the Namespace, which it keeps (`helm.sh/resource-policy`).

// A test stops at the first thing that is not as it expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use common::{Cluster, eventually};
use serde_json::{Value, json};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/helm/turnout");
const V2: &str = "podinfod=ghcr.io/stefanprodan/podinfo:6.1.0";
const V3: &str = "podinfod=ghcr.io/stefanprodan/podinfo:6.2.0";

/// Helm's own metadata: the only difference the chart makes to deploy/'s objects. These labels on
/// every object's `metadata.labels` and, for `app.kubernetes.io/instance`, on the Deployment's pod
/// template; never in a selector.
const HELM_LABELS: [&str; 3] = [
    "helm.sh/chart",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
];
/// ... and this annotation on the Namespace, which keeps it on `helm uninstall`.
const HELM_KEEP: &str = "helm.sh/resource-policy";

/// The helm binary (built by hack/helm/build.sh, first if needed).
fn helm_bin() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/hack/helm/build.sh");
        let out = Command::new(script)
            .arg("--print")
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("{script} cannot run: {e}"));
        assert!(out.status.success(), "{script} failed: {}", out.status);
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("helm")
    })
}

/// The pinned kubectl (built with the control plane by hack/k8s/build.sh, first if needed).
fn kubectl_bin() -> &'static Path {
    static KUBECTL: OnceLock<PathBuf> = OnceLock::new();
    KUBECTL.get_or_init(|| {
        let bin = kubesim::testbed::default_bin_dir();
        kubesim::testbed::ensure_built(&bin).expect("the control plane and kubectl build (hack/k8s/build.sh)");
        bin.join("kubectl")
    })
}

/// helm with its cache, configuration and data in `home` rather than the user's, and `kubeconfig`.
fn helm_command(home: &Path, kubeconfig: &Path) -> Command {
    let mut cmd = Command::new(helm_bin());
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("KUBECONFIG", kubeconfig);
    cmd
}

/// A command's outcome; panics if it does not start.
fn output(cmd: &mut Command) -> common::Out {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?} cannot run: {e}"));
    common::Out {
        ok: out.status.success(),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// `helm template RELEASE CHART -n NAMESPACE ARGS...`, offline.
fn helm_template(release: &str, namespace: &str, args: &[&str]) -> common::Out {
    let home = tempfile::tempdir().unwrap();
    output(
        helm_command(home.path(), Path::new("/dev/null"))
            .args(["template", release, CHART, "--namespace", namespace])
            .args(args),
    )
}

/// Manifests (a YAML stream) as JSON objects, converted by the pinned kubectl without a cluster.
fn objects(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(kubectl_bin())
        // Removing an annotation nobody has leaves each object as it was.
        .args(["annotate", "--local", "-o", "json", "-f", "-", "turnout.test/none-"])
        .env("KUBECONFIG", "/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), yaml.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl cannot read the manifests: {}\n{yaml}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .map(|o| {
            let mut o = o.unwrap();
            // The conversion leaves `annotations: {}` on an object that had none.
            let metadata = o["metadata"].as_object_mut().unwrap();
            if metadata
                .get("annotations")
                .is_some_and(|a| a.as_object().is_some_and(|a| a.is_empty()))
            {
                metadata.remove("annotations");
            }
            o
        })
        .collect()
}

/// The chart's objects as `helm template` renders them for release `turnout` in `turnout-system`.
fn rendered(args: &[&str]) -> Vec<Value> {
    let out = helm_template("turnout", "turnout-system", args);
    assert!(out.ok, "helm template {args:?} fails:\n{}", out.stderr);
    objects(&out.stdout)
}

/// A kustomization of deploy/ rendered by the pinned kubectl.
fn kustomize(dir: &str) -> Vec<Value> {
    let out = output(
        Command::new(kubectl_bin())
            .args(["kustomize", &format!("{}/{dir}", env!("CARGO_MANIFEST_DIR"))])
            .env("KUBECONFIG", "/dev/null"),
    );
    assert!(out.ok, "kubectl kustomize {dir}: {}", out.stderr);
    objects(&out.stdout)
}

fn key(o: &Value) -> (String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    (s(&o["kind"]), s(&o["metadata"]["namespace"]), s(&o["metadata"]["name"]))
}

fn find<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the rendering"))
}

/// The Deployment's container's environment: name → value (or the field a `valueFrom` refers to).
fn env_of(objects: &[Value]) -> BTreeMap<String, String> {
    let container = &find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let value = match e["value"].as_str() {
                Some(v) => v.to_owned(),
                None => format!("fieldRef:{}", e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap()),
            };
            (e["name"].as_str().unwrap().to_owned(), value)
        })
        .collect()
}

/// Removes [`HELM_LABELS`] and [`HELM_KEEP`] from a rendered object, after checking they are there.
fn without_helm_metadata(mut o: Value) -> Value {
    let what = format!("{:?}", key(&o));
    let labels = o["metadata"]["labels"].as_object_mut().unwrap();
    for label in HELM_LABELS {
        assert!(labels.remove(label).is_some(), "{what} lacks label {label}");
    }
    if o["kind"] == "Deployment" {
        let labels = o["spec"]["template"]["metadata"]["labels"].as_object_mut().unwrap();
        assert!(
            labels.remove("app.kubernetes.io/instance").is_some(),
            "the pods lack app.kubernetes.io/instance"
        );
    }
    if o["kind"] == "Namespace" {
        let annotations = o["metadata"]["annotations"].as_object_mut().unwrap();
        assert_eq!(annotations.remove(HELM_KEEP), Some(json!("keep")), "{what}");
        if annotations.is_empty() {
            o["metadata"].as_object_mut().unwrap().remove("annotations");
        }
    }
    o
}

/// Where two JSON values differ, one line per leaf.
fn differences(path: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<String>) {
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                differences(&format!("{path}.{k}"), x.get(k), y.get(k), out);
            }
        }
        (Some(Value::Array(x)), Some(Value::Array(y))) => {
            for i in 0..x.len().max(y.len()) {
                differences(&format!("{path}[{i}]"), x.get(i), y.get(i), out);
            }
        }
        _ if a != b => {
            let show = |v: Option<&Value>| v.map_or_else(|| "(absent)".to_owned(), Value::to_string);
            out.push(format!(
                "  {path}:\n    kustomize: {}\n    helm:      {}",
                show(a),
                show(b)
            ));
        }
        _ => {}
    }
}

/// The same objects, compared as JSON sorted by kind, namespace and name; else a readable account of
/// the first object that differs.
fn assert_same_objects(mut kustomize: Vec<Value>, mut helm: Vec<Value>, what: &str) {
    kustomize.sort_by_key(key);
    helm.sort_by_key(key);
    let (k, h): (Vec<_>, Vec<_>) = (kustomize.iter().map(key).collect(), helm.iter().map(key).collect());
    let only_k: Vec<_> = k.iter().filter(|x| !h.contains(x)).collect();
    let only_h: Vec<_> = h.iter().filter(|x| !k.contains(x)).collect();
    assert!(
        only_k.is_empty() && only_h.is_empty(),
        "{what}: objects only kustomize renders: {only_k:?}; only helm renders: {only_h:?}"
    );
    for (a, b) in kustomize.iter().zip(&helm) {
        if a != b {
            let mut lines = Vec::new();
            differences("", Some(a), Some(b), &mut lines);
            panic!(
                "{what}: {:?} differs (kustomize, then helm):\n{}",
                key(a),
                lines.join("\n")
            );
        }
    }
}

/// No selector of an object names one of Helm's labels.
fn assert_selectors_stable(objects: &[Value]) {
    fn walk(v: &Value, path: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    if k == "matchLabels" || (k == "selector" && path == ".spec" && child.is_object()) {
                        for label in HELM_LABELS {
                            if child.get(label).is_some() {
                                out.push(format!("{path}.{k} has {label}"));
                            }
                        }
                    }
                    walk(child, &format!("{path}.{k}"), out);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, path, out)),
            _ => {}
        }
    }
    for o in objects {
        let mut found = Vec::new();
        walk(o, "", &mut found);
        assert!(found.is_empty(), "{:?}: {found:?}", key(o));
    }
}

#[test]
fn helm_template_renders_what_kubectl_kustomize_renders() {
    let helm = rendered(&[]);
    assert_selectors_stable(&helm);
    let stripped: Vec<Value> = helm.iter().cloned().map(without_helm_metadata).collect();
    assert_same_objects(kustomize("deploy"), stripped.clone(), "deploy/ vs default values");

    // Without the Namespace object (a namespace of your own): the same, less the Namespace.
    let without: Vec<Value> = rendered(&["--set", "namespace.create=false"])
        .into_iter()
        .map(without_helm_metadata)
        .collect();
    let expected: Vec<Value> = stripped.into_iter().filter(|o| o["kind"] != "Namespace").collect();
    assert_same_objects(expected, without, "default values vs namespace.create=false");
}

#[test]
fn with_cert_manager_it_renders_what_the_cert_manager_overlay_renders() {
    let helm = rendered(&["--set", "certManager.enabled=true"]);
    assert_selectors_stable(&helm);
    let stripped = helm.into_iter().map(without_helm_metadata).collect();
    assert_same_objects(
        kustomize("deploy/cert-manager"),
        stripped,
        "deploy/cert-manager vs certManager.enabled",
    );

    // An issuer of your own instead of the chart's CA chain: no Issuers, the Certificate names it.
    let own = rendered(&[
        "--set",
        "certManager.enabled=true",
        "--set",
        "certManager.issuerRef.kind=ClusterIssuer",
        "--set",
        "certManager.issuerRef.name=corp-ca",
    ]);
    assert!(own.iter().all(|o| o["kind"] != "Issuer"));
    let certificates: Vec<&Value> = own.iter().filter(|o| o["kind"] == "Certificate").collect();
    assert_eq!(certificates.len(), 1, "only the serving certificate");
    assert_eq!(
        certificates[0]["spec"]["issuerRef"],
        json!({"group": "cert-manager.io", "kind": "ClusterIssuer", "name": "corp-ca"})
    );
}

#[test]
fn the_chart_passes_helm_lint() {
    for args in [&[][..], &["--set", "certManager.enabled=true"][..]] {
        let home = tempfile::tempdir().unwrap();
        let out = output(
            helm_command(home.path(), Path::new("/dev/null"))
                .args(["lint", "--strict", CHART])
                .args(args),
        );
        assert!(out.ok, "helm lint --strict {args:?}:\n{}\n{}", out.stdout, out.stderr);
    }
}

/// `turnout run --help`: each long flag and its environment variable (None for a flag without one).
fn flags_of_turnout_run() -> Vec<(String, Option<String>)> {
    let out = output(
        Command::new(env!("CARGO_BIN_EXE_turnout"))
            .args(["run", "--help"])
            .env_clear(),
    );
    assert!(out.ok, "{}", out.stderr);
    let mut flags: Vec<(String, Option<String>)> = Vec::new();
    for line in out.stdout.lines().map(str::trim) {
        if line.starts_with('-')
            && let Some(at) = line.find("--")
        {
            let name = line[at + 2..].split([' ', '=', ',']).next().unwrap();
            flags.push((name.to_owned(), None));
        } else if let Some(env) = line.strip_prefix("[env: ") {
            let env = env.split('=').next().unwrap().to_owned();
            flags.last_mut().expect("an [env: ] line follows a flag").1 = Some(env);
        }
    }
    assert!(flags.len() > 20, "the help lists turnout run's flags: {}", out.stdout);
    flags
}

/// Every value of turnout's settings set to something other than its default, and the variable each
/// must become.
fn every_setting() -> (Value, Vec<(&'static str, &'static str)>) {
    let values = json!({
        "logFormat": "text",
        "ports": {"webhook": 9443, "admin": 9090},
        "webhook": {
            "tlsReloadInterval": "30s",
            "maxBodyBytes": 1_048_576,
            "headerReadTimeout": "5s",
            "drainDelay": "2s",
            "shutdownTimeout": "15s"
        },
        "release": {
            "steps": [5, 50, 100],
            "interval": "1m",
            "threshold": 5,
            "progressDeadline": "20m",
            "propagationDelay": "3s",
            "drain": "20s",
            "successRateMin": 99.5,
            "latencyP99Max": "250ms",
            "prometheus": "http://prometheus.monitoring:9090",
            "noData": "pass",
            "hooks": {"pre-rollout": "http://smoke.ci:8080/run", "rollback": "http://pager.ops/turnout"},
            "hookTimeout": "20s",
            "hookRetries": 4,
            "provider": "gateway-api"
        },
        "leaderElection": {"enabled": false, "leaseName": "turnout-leader", "leaseDuration": "30s"},
        "releasePage": "any"
    });
    let expected = vec![
        ("TURNOUT_LOG_FORMAT", "text"),
        ("TURNOUT_LISTEN", "0.0.0.0:9443"),
        ("TURNOUT_ADMIN_LISTEN", "0.0.0.0:9090"),
        ("TURNOUT_TLS_CERT", "/etc/turnout/tls/tls.crt"),
        ("TURNOUT_TLS_KEY", "/etc/turnout/tls/tls.key"),
        ("TURNOUT_AGENT_USERNAME", common::AGENT_USER),
        ("TURNOUT_TLS_RELOAD_INTERVAL", "30s"),
        ("TURNOUT_MAX_BODY_BYTES", "1048576"),
        ("TURNOUT_HEADER_READ_TIMEOUT", "5s"),
        ("TURNOUT_DRAIN_DELAY", "2s"),
        ("TURNOUT_SHUTDOWN_TIMEOUT", "15s"),
        ("TURNOUT_STEPS", "5,50,100"),
        ("TURNOUT_INTERVAL", "1m"),
        ("TURNOUT_THRESHOLD", "5"),
        ("TURNOUT_PROGRESS_DEADLINE", "20m"),
        ("TURNOUT_PROPAGATION_DELAY", "3s"),
        ("TURNOUT_DRAIN", "20s"),
        ("TURNOUT_SUCCESS_RATE_MIN", "99.5"),
        ("TURNOUT_LATENCY_P99_MAX", "250ms"),
        ("TURNOUT_PROMETHEUS", "http://prometheus.monitoring:9090"),
        ("TURNOUT_NO_DATA", "pass"),
        (
            "TURNOUT_HOOKS",
            "pre-rollout=http://smoke.ci:8080/run,rollback=http://pager.ops/turnout",
        ),
        ("TURNOUT_HOOK_TIMEOUT", "20s"),
        ("TURNOUT_HOOK_RETRIES", "4"),
        ("TURNOUT_PROVIDER", "gateway-api"),
        ("TURNOUT_LEADER_ELECT", "false"),
        ("TURNOUT_LEASE_NAMESPACE", "fieldRef:metadata.namespace"),
        ("TURNOUT_LEASE_NAME", "turnout-leader"),
        ("TURNOUT_LEASE_DURATION", "30s"),
        ("TURNOUT_IDENTITY", "fieldRef:metadata.name"),
        ("TURNOUT_RELEASE_PAGE", "any"),
    ];
    (values, expected)
}

#[test]
fn every_flag_of_turnout_run_is_a_value() {
    let (values, expected) = every_setting();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("values.json");
    std::fs::write(&file, values.to_string()).unwrap();
    let objects = rendered(&["--values", file.to_str().unwrap()]);
    let env = env_of(&objects);
    let expected: BTreeMap<String, String> = expected
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    // Each flag of `turnout run` is reachable: through its variable, which the chart sets.
    let help = flags_of_turnout_run();
    for (flag, variable) in &help {
        if flag == "help" || flag == "version" {
            continue;
        }
        let variable = variable
            .as_ref()
            .unwrap_or_else(|| panic!("--{flag} has no environment variable for the chart to set"));
        assert!(
            env.contains_key(variable),
            "--{flag} ({variable}) cannot be set from the chart's values"
        );
    }
    // ... and each variable the chart sets is a flag of `turnout run`.
    for variable in env.keys() {
        assert!(
            help.iter().any(|(_, v)| v.as_deref() == Some(variable)),
            "the chart sets {variable}, which `turnout run` does not read"
        );
    }
    // Each value arrives as the variable, with the value, it must.
    let wrong: Vec<String> = expected
        .keys()
        .chain(env.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| env.get(*k) != expected.get(*k))
        .map(|k| format!("{k}: expected {:?}, rendered {:?}", expected.get(k), env.get(k)))
        .collect();
    assert!(
        wrong.is_empty(),
        "the Deployment's environment from every value set:\n{}",
        wrong.join("\n")
    );
    let container = &find(&objects, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"], json!(["run"]));
    assert_eq!(container["ports"][0]["containerPort"], 9443);
    assert_eq!(container["ports"][1]["containerPort"], 9090);
    assert_eq!(
        find(&objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        "9090"
    );

    // The binary accepts every value as the chart passes it: it gets past parsing its flags and
    // stops only where it needs a cluster (a bad value stops it at parsing, with exit code 2).
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_turnout"));
    cmd.arg("run").env_clear().env("KUBECONFIG", "/dev/null");
    for (k, v) in &env {
        if !v.starts_with("fieldRef:") {
            cmd.env(k, v);
        }
    }
    cmd.env("TURNOUT_IDENTITY", "pod-0")
        .env("TURNOUT_LEASE_NAMESPACE", "turnout-system");
    let out = output(&mut cmd);
    assert!(
        !out.ok && out.code != 2 && !out.stderr.contains("invalid value"),
        "turnout run with the chart's environment: exit {}\n{}",
        out.code,
        out.stderr
    );
    // The same check can fail: a value the binary refuses.
    let refused = output(cmd.env("TURNOUT_STEPS", "50,20"));
    assert_eq!(refused.code, 2, "{}", refused.stderr);
}

#[test]
fn the_default_values_leave_turnout_its_own_defaults() {
    // Only what deploy/ sets: the rest keeps the binary's defaults, as `turnout run --help` gives them.
    let env = env_of(&rendered(&[]));
    let names: Vec<&str> = env.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "TURNOUT_ADMIN_LISTEN",
            "TURNOUT_AGENT_USERNAME",
            "TURNOUT_IDENTITY",
            "TURNOUT_LEASE_NAMESPACE",
            "TURNOUT_LISTEN",
            "TURNOUT_LOG_FORMAT",
            "TURNOUT_PROMETHEUS",
            "TURNOUT_TLS_CERT",
            "TURNOUT_TLS_KEY",
        ]
    );
    // A value set back to empty is not passed at all (the binary's default), not passed empty.
    let env = env_of(&rendered(&["--set", "release.prometheus=", "--set", "logFormat="]));
    assert!(!env.contains_key("TURNOUT_PROMETHEUS") && !env.contains_key("TURNOUT_LOG_FORMAT"));
}

#[test]
fn the_schema_refuses_values_turnout_or_the_api_server_would() {
    for (set, path) in [
        ("replicas=x", "/replicas"),
        ("replica=3", "replica"),
        ("release.interval=soon", "/release/interval"),
        ("release.steps=twenty", "/release/steps"),
        ("release.threshold=-1", "/release/threshold"),
        ("release.successRateMin=101", "/release/successRateMin"),
        ("release.hooks.deploy=http://ci/run", "/release/hooks"),
        ("release.provider=linkerd", "/release/provider"),
        ("release.noData=maybe", "/release/noData"),
        ("webhook.failurePolicy=Never", "/webhook/failurePolicy"),
        ("webhook.timeoutSeconds=31", "/webhook/timeoutSeconds"),
        ("webhook.url=http://turnout.dev/mutate", "/webhook/url"),
        ("leaderElection.leaseDuration=long", "/leaderElection/leaseDuration"),
        ("releasePage=public", "/releasePage"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ] {
        let out = helm_template("turnout", "turnout-system", &["--set", set]);
        assert!(
            !out.ok && out.stderr.contains("don't meet the specifications of the schema") && out.stderr.contains(path),
            "--set {set} must be refused at {path}: exit {}\n{}",
            out.code,
            out.stderr
        );
    }
    // The same keys with good values pass, and arrive.
    let objects = rendered(&[
        "--set",
        "replicas=3",
        "--set",
        "release.interval=45s",
        "--set",
        "release.steps={20,50,100}",
        "--set",
        "release.threshold=0",
        "--set",
        "release.successRateMin=99.9",
        "--set",
        "release.hooks.rollback=http://pager.ops/turnout",
        "--set",
        "release.provider=none",
        "--set",
        "webhook.failurePolicy=Fail",
        "--set",
        "webhook.timeoutSeconds=10",
    ]);
    let deployment = find(&objects, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let env = env_of(&objects);
    assert_eq!(env["TURNOUT_INTERVAL"], "45s");
    assert_eq!(env["TURNOUT_STEPS"], "20,50,100");
    assert_eq!(env["TURNOUT_THRESHOLD"], "0");
    assert_eq!(env["TURNOUT_SUCCESS_RATE_MIN"], "99.9");
    assert_eq!(env["TURNOUT_HOOKS"], "rollback=http://pager.ops/turnout");
    assert_eq!(env["TURNOUT_PROVIDER"], "none");
    let hook = &find(&objects, "MutatingWebhookConfiguration")["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["timeoutSeconds"], 10);
}

#[test]
fn names_and_namespaces_follow_the_release() {
    let out = helm_template(
        "edge",
        "canary-system",
        &["--set", "certManager.enabled=true", "--set", "webhook.caBundle=Q0E="],
    );
    assert!(out.ok, "{}", out.stderr);
    let objects = objects(&out.stdout);
    let text = serde_json::to_string(&objects).unwrap();
    assert!(
        !text.contains("turnout-system"),
        "deploy/'s namespace is not hard-coded"
    );
    for o in &objects {
        let (kind, namespace, name) = key(o);
        if kind == "Namespace" {
            assert_eq!(name, "canary-system");
        } else {
            assert!(name.starts_with("edge-turnout"), "{kind} {name}");
        }
        if !namespace.is_empty() {
            assert_eq!(namespace, "canary-system", "{kind} {name}");
        }
        for subject in o["subjects"].as_array().into_iter().flatten() {
            assert_eq!(
                subject,
                &json!({"kind": "ServiceAccount", "name": "edge-turnout", "namespace": "canary-system"})
            );
        }
    }
    let user = "system:serviceaccount:canary-system:edge-turnout";
    assert_eq!(env_of(&objects)["TURNOUT_AGENT_USERNAME"], user);
    let mwc = find(&objects, "MutatingWebhookConfiguration");
    let hook = &mwc["webhooks"][0];
    assert_eq!(
        hook["clientConfig"],
        json!({"caBundle": "Q0E=", "service": {"namespace": "canary-system", "name": "edge-turnout-webhook", "path": "/mutate", "port": 443}})
    );
    assert_eq!(
        hook["namespaceSelector"]["matchExpressions"][1]["values"],
        json!(["canary-system"])
    );
    assert!(
        hook["matchConditions"][1]["expression"]
            .as_str()
            .unwrap()
            .contains(user),
        "{}",
        hook["matchConditions"]
    );
    assert_eq!(
        mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "canary-system/edge-turnout-webhook"
    );
    let serving = objects
        .iter()
        .find(|o| o["kind"] == "Certificate" && o["metadata"]["name"] == "edge-turnout-webhook")
        .expect("the serving Certificate");
    assert_eq!(
        serving["spec"]["dnsNames"],
        json!([
            "edge-turnout-webhook.canary-system.svc",
            "edge-turnout-webhook.canary-system.svc.cluster.local"
        ])
    );
    let pod = &find(&objects, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "edge-turnout");
    assert_eq!(pod["volumes"][0]["secret"]["secretName"], serving["spec"]["secretName"]);
    assert_eq!(find(&objects, "Service")["metadata"]["name"], "edge-turnout-webhook");

    // A URL instead of the Service.
    let objects = rendered(&["--set", "webhook.url=https://10.0.0.7:8443/mutate"]);
    assert_eq!(
        find(&objects, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"],
        json!({"url": "https://10.0.0.7:8443/mutate"})
    );
}

// --- helm install on the real control plane --------------------------------------------------------

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `turnout run`, killed when dropped; its log is shown if the test fails.
struct Turnout {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Turnout {
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Turnout {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- turnout's log, last lines ---\n{}", self.tail());
        }
        let _ = self.child.start_kill();
    }
}

/// helm against the test bed as its admin.
async fn helm(cluster: &Cluster, args: &[&str]) -> common::Out {
    let mut cmd = helm_command(cluster.dir.path(), &cluster.kubeconfig());
    cmd.args(args);
    tokio::task::spawn_blocking(move || output(&mut cmd)).await.unwrap()
}

async fn helm_ok(cluster: &Cluster, args: &[&str]) -> common::Out {
    let out = helm(cluster, args).await;
    assert!(out.ok, "helm {args:?} failed:\n{}\n{}", out.stdout, out.stderr);
    out
}

/// An HTTP GET's status, if it answers.
async fn status_of(url: &str) -> Option<u16> {
    use bytes::Bytes;
    use http_body_util::Empty;
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = tokio::time::timeout(Duration::from_secs(2), client.get(url.parse().ok()?))
        .await
        .ok()?
        .ok()?;
    Some(response.status().as_u16())
}

/// A kubeconfig for the chart's ServiceAccount: the admin's cluster, a token from `kubectl create token`.
async fn service_account_kubeconfig(cluster: &Cluster, namespace: &str, account: &str) -> PathBuf {
    let token = cluster
        .ok(&["create", "token", account, "-n", namespace, "--duration=2h"])
        .await
        .stdout;
    let path = cluster.agent_kubeconfig();
    std::fs::copy(cluster.kubeconfig(), &path).unwrap();
    let file = path.to_str().unwrap();
    cluster
        .ok(&[
            "config",
            "set-credentials",
            account,
            "--token",
            token.trim(),
            "--kubeconfig",
            file,
        ])
        .await;
    cluster
        .ok(&[
            "config",
            "set-context",
            "--current",
            "--user",
            account,
            "--kubeconfig",
            file,
        ])
        .await;
    path
}

/// `turnout run` as the installed Deployment's pod would run it: its args and environment (the
/// downward API resolved), with only the addresses and certificate files of this machine instead.
async fn run_as_the_deployment(
    cluster: &Cluster,
    deployment: &Value,
    kubeconfig: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
) -> Turnout {
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let dir = cluster.dir.path();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_turnout"));
    cmd.env_clear().env("KUBECONFIG", kubeconfig).env("RUST_LOG", "info");
    for arg in container["args"].as_array().unwrap() {
        cmd.arg(arg.as_str().unwrap());
    }
    for e in container["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        let value = match (e["value"].as_str(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
            (Some(v), _) => v.to_owned(),
            (None, Some("metadata.namespace")) => deployment["metadata"]["namespace"].as_str().unwrap().to_owned(),
            (None, Some("metadata.name")) => "turnout-helm-0".to_owned(),
            _ => panic!("an environment variable the test cannot give: {e}"),
        };
        cmd.env(name, value);
    }
    cmd.env("TURNOUT_LISTEN", listen.to_string())
        .env("TURNOUT_ADMIN_LISTEN", admin.to_string())
        .env("TURNOUT_TLS_CERT", dir.join("certs/tls.crt"))
        .env("TURNOUT_TLS_KEY", dir.join("certs/tls.key"));
    let log = dir.join("turnout.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = cmd
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .expect("turnout starts");
    let turnout = Turnout { child, log };
    let ready = format!("http://{admin}/ready");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while status_of(&ready).await != Some(200) {
        assert!(
            std::time::Instant::now() < deadline,
            "turnout is not ready after 30 s; its log:\n{}",
            turnout.tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    turnout
}

async fn annotation(cluster: &Cluster, ns: &str, key: &str) -> Option<String> {
    let d = cluster.get(ns, "deployment/podinfo").await;
    d["metadata"]["annotations"][key].as_str().map(str::to_owned)
}

/// The objects of the release's manifest (`helm get manifest`).
async fn release_objects(cluster: &Cluster) -> Vec<Value> {
    let manifest = helm_ok(cluster, &["get", "manifest", "turnout", "-n", "turnout-system"])
        .await
        .stdout;
    objects(&manifest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_runs_a_release_and_helm_uninstall_keeps_only_the_namespace() {
    tokio::task::block_in_place(|| {
        helm_bin();
    });
    let cluster = Cluster::exclusive().await;
    let dir = cluster.dir.path().to_owned();
    let listen = free_port();
    let admin = free_port();
    let bundle = turnout::certs::generate(&["turnout-webhook.turnout-system.svc".into(), "127.0.0.1".into()]).unwrap();
    turnout::certs::write(&dir.join("certs"), &bundle, false).unwrap();
    cluster.istio_crds().await;

    // The install, with the values an operator running turnout outside the cluster would give: the
    // webhook's URL and CA, and release timings short enough for a test.
    let values = json!({
        "webhook": {
            "url": format!("https://{listen}/mutate"),
            "caBundle": base64::engine::general_purpose::STANDARD.encode(&bundle.ca_pem),
            "drainDelay": "0s"
        },
        "release": {
            "steps": [20, 50, 100],
            "interval": "1s",
            "propagationDelay": "1s",
            "drain": "1s",
            "progressDeadline": "60s",
            "prometheus": ""
        },
        "leaderElection": {"leaseDuration": "3s"}
    });
    let values_file = dir.join("values.json");
    std::fs::write(&values_file, values.to_string()).unwrap();
    let out = helm_ok(
        &cluster,
        &[
            "install",
            "turnout",
            CHART,
            "--namespace",
            "turnout-system",
            "--create-namespace",
            "--values",
            values_file.to_str().unwrap(),
            // The Deployment's pods (simulated: no kubelet) admitted under the namespace's
            // restricted Pod Security Standard and available.
            "--wait",
            "--timeout",
            "120s",
        ],
    )
    .await;
    assert!(out.stdout.contains("STATUS: deployed"), "{}", out.stdout);
    let ns = cluster.get("", "namespace/turnout-system").await;
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    assert_eq!(ns["metadata"]["labels"]["istio-injection"], "disabled");
    let deployment = cluster.get("turnout-system", "deployment/turnout").await;
    assert_eq!(deployment["status"]["availableReplicas"], 2, "{}", deployment["status"]);
    let installed = release_objects(&cluster).await;

    // turnout with the chart's identity and environment; the API server calls its webhook through
    // the chart's registration.
    let kubeconfig = service_account_kubeconfig(&cluster, "turnout-system", "turnout").await;
    let whoami = cluster
        .ok(&[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ])
        .await;
    assert_eq!(whoami.stdout, common::AGENT_USER);
    let env = env_of(std::slice::from_ref(&deployment));
    assert_eq!(env["TURNOUT_AGENT_USERNAME"], common::AGENT_USER);
    assert_eq!(env["TURNOUT_STEPS"], "20,50,100");
    assert!(!env.contains_key("TURNOUT_PROMETHEUS"), "readiness checks only");
    let turnout = run_as_the_deployment(&cluster, &deployment, &kubeconfig, listen, admin).await;
    // The chart's Role lets it lead.
    eventually(Duration::from_secs(30), "turnout to hold the Lease", || async {
        let lease = cluster
            .kubectl(
                &["get", "lease", "turnout-agent", "-n", "turnout-system", "-o", "json"],
                None,
            )
            .await;
        let lease: Value = serde_json::from_str(&lease.stdout).ok()?;
        (lease["spec"]["holderIdentity"] == "turnout-helm-0").then_some(())
    })
    .await;

    // A release.
    let ns = "shop";
    cluster.namespace(ns, true).await;
    cluster.podinfo(ns).await;
    cluster
        .apply(&format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: podinfo\n  namespace: {ns}\nspec:\n  selector:\n    app: podinfo\n  \
             ports:\n    - name: http\n      port: 9898\n      targetPort: 9898\n"
        ))
        .await;
    cluster
        .ok(&["scale", "-n", ns, "deployment/podinfo", "--replicas=2"])
        .await;
    cluster
        .ok(&["rollout", "status", "-n", ns, "deployment/podinfo", "--timeout=60s"])
        .await;
    assert_eq!(
        annotation(&cluster, ns, "turnout.dev/revision").await.as_deref(),
        Some("1")
    );
    let held = cluster.ok(&["set", "image", "-n", ns, "deployment/podinfo", V2]).await;
    assert!(
        held.stderr.contains("turnout: release v2 of shop/podinfo started"),
        "the webhook holds the update: {}",
        held.stderr
    );
    let status = cluster
        .kubectl(
            &["rollout", "status", "-n", ns, "deployment/podinfo", "--timeout=120s"],
            None,
        )
        .await;
    assert!(status.ok, "rollout status: {}\n{}", status.stdout, status.stderr);
    eventually(Duration::from_secs(60), "the release to succeed", || async {
        (annotation(&cluster, ns, "turnout.dev/phase").await.as_deref() == Some("Succeeded")).then_some(())
    })
    .await;
    let routing = annotation(&cluster, ns, "turnout.dev/routing").await;
    assert_eq!(routing.as_deref(), Some("istio"), "the release moved Istio weights");
    eventually(
        Duration::from_secs(30),
        "only podinfo's own Deployment left",
        || async {
            let list = cluster.get(ns, "deployments").await;
            let names: Vec<String> = list["items"]
                .as_array()?
                .iter()
                .map(|d| d["metadata"]["name"].as_str().unwrap_or("").to_owned())
                .collect();
            (names == ["podinfo"]).then_some(())
        },
    )
    .await;
    drop(turnout);

    // helm uninstall: every object of the release is gone but the Namespace, which the chart keeps.
    let out = helm_ok(
        &cluster,
        &["uninstall", "turnout", "--namespace", "turnout-system", "--wait"],
    )
    .await;
    assert!(
        out.stdout.contains("[Namespace] turnout-system"),
        "helm says it keeps the namespace: {}",
        out.stdout
    );
    for o in &installed {
        let (kind, namespace, name) = key(o);
        if kind == "Namespace" {
            continue;
        }
        let mut args = vec!["get", kind.as_str(), name.as_str(), "--ignore-not-found", "-o", "name"];
        if !namespace.is_empty() {
            args.extend(["-n", namespace.as_str()]);
        }
        eventually(Duration::from_secs(60), &format!("{kind} {name} deleted"), || async {
            cluster.ok(&args).await.stdout.trim().is_empty().then_some(())
        })
        .await;
    }
    // Nothing labelled as turnout's anywhere else either, and no pod of the chart's Deployment.
    let leftovers = cluster
        .ok(&[
            "get",
            "clusterroles,clusterrolebindings,mutatingwebhookconfigurations,validatingwebhookconfigurations",
            "-l",
            "app.kubernetes.io/part-of=turnout",
            "-o",
            "name",
        ])
        .await;
    assert_eq!(leftovers.stdout.trim(), "", "cluster-wide objects left");
    eventually(Duration::from_secs(60), "the chart's pods gone", || async {
        let pods = cluster.ok(&["get", "pods", "-n", "turnout-system", "-o", "name"]).await;
        pods.stdout.trim().is_empty().then_some(())
    })
    .await;
    let release = helm(&cluster, &["status", "turnout", "--namespace", "turnout-system"]).await;
    assert!(!release.ok, "no release record left: {}", release.stdout);
    // What remains in the kept namespace is what turnout made while it ran, its Lease; the namespace
    // goes with `kubectl delete namespace`.
    let leases = cluster
        .ok(&["get", "leases", "-n", "turnout-system", "-o", "name"])
        .await;
    assert_eq!(leases.stdout.trim(), "lease.coordination.k8s.io/turnout-agent");
    cluster
        .ok(&["delete", "namespace", "turnout-system", "--wait", "--timeout=60s"])
        .await;

    // Without the webhook, an update rolls out natively, unheld.
    cluster.ok(&["set", "image", "-n", ns, "deployment/podinfo", V3]).await;
    let d = cluster.get(ns, "deployment/podinfo").await;
    assert_ne!(d["spec"]["paused"], true, "not held: {}", d["spec"]);
    cluster
        .ok(&["rollout", "status", "-n", ns, "deployment/podinfo", "--timeout=60s"])
        .await;
}
