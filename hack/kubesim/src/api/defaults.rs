//! Defaulting of built-in objects on create and update, as the apiserver's defaulters do for the
//! fields turnout, kubectl and the controllers read. Fields left out are listed in the README.

use serde_json::{Value, json};

/// Fills the defaults of a built-in object of `kind` in place.
pub fn apply(kind: &str, object: &mut Value) {
    match kind {
        "Deployment" => deployment(object),
        "ReplicaSet" => {
            set_default(&mut object["spec"], "replicas", json!(1));
            pod_template(&mut object["spec"]["template"]);
        }
        "Pod" => pod_spec(&mut object["spec"]),
        "Service" => service(object),
        "Namespace" => {
            let name = object["metadata"]["name"].clone();
            object["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
            set_default(&mut object["spec"], "finalizers", json!(["kubernetes"]));
        }
        _ => {}
    }
}

fn set_default(parent: &mut Value, key: &str, value: Value) {
    if !parent.is_object() {
        *parent = json!({});
    }
    if parent.get(key).is_none_or(Value::is_null) {
        parent[key] = value;
    }
}

fn deployment(d: &mut Value) {
    let spec = &mut d["spec"];
    set_default(spec, "replicas", json!(1));
    set_default(spec, "revisionHistoryLimit", json!(10));
    set_default(spec, "progressDeadlineSeconds", json!(600));
    set_default(spec, "strategy", json!({"type": "RollingUpdate"}));
    if spec["strategy"]["type"] == "RollingUpdate" {
        set_default(&mut spec["strategy"], "rollingUpdate", json!({}));
        set_default(&mut spec["strategy"]["rollingUpdate"], "maxSurge", json!("25%"));
        set_default(&mut spec["strategy"]["rollingUpdate"], "maxUnavailable", json!("25%"));
    }
    pod_template(&mut spec["template"]);
}

fn pod_template(t: &mut Value) {
    pod_spec(&mut t["spec"]);
}

fn pod_spec(spec: &mut Value) {
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "securityContext", json!({}));
    for field in ["containers", "initContainers"] {
        if let Some(containers) = spec.get_mut(field).and_then(Value::as_array_mut) {
            for c in containers {
                container(c);
            }
        }
    }
}

fn container(c: &mut Value) {
    set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
    set_default(c, "terminationMessagePolicy", json!("File"));
    set_default(c, "resources", json!({}));
    let image = c["image"].as_str().unwrap_or_default();
    let latest = !image.rsplit('/').next().unwrap_or_default().contains(':') || image.ends_with(":latest");
    set_default(
        c,
        "imagePullPolicy",
        json!(if latest { "Always" } else { "IfNotPresent" }),
    );
    if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports {
            set_default(p, "protocol", json!("TCP"));
        }
    }
}

fn service(s: &mut Value) {
    let spec = &mut s["spec"];
    set_default(spec, "type", json!("ClusterIP"));
    set_default(spec, "sessionAffinity", json!("None"));
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports {
            set_default(p, "protocol", json!("TCP"));
            let port = p["port"].clone();
            set_default(p, "targetPort", port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deployment_gets_the_upstream_defaults_turnout_reads() {
        let mut d = json!({"spec": {"selector": {}, "template": {"spec": {"containers": [
            {"name": "a", "image": "x:1", "ports": [{"containerPort": 80}]}, {"name": "b", "image": "y"}]}}}});
        apply("Deployment", &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["progressDeadlineSeconds"], 600);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        let c = &d["spec"]["template"]["spec"]["containers"];
        assert_eq!(c[0]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(c[1]["imagePullPolicy"], "Always");
        assert_eq!(c[0]["ports"][0]["protocol"], "TCP");
        assert_eq!(d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"], 30);
    }

    #[test]
    fn given_values_are_kept() {
        let mut d = json!({"spec": {"replicas": 3, "strategy": {"type": "Recreate"}, "template": {"spec": {"containers": []}}}});
        apply("Deployment", &mut d);
        assert_eq!(d["spec"]["replicas"], 3);
        assert!(d["spec"]["strategy"].get("rollingUpdate").is_none());
    }
}
