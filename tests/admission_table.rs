//! The admission contract (DESIGN §4), row by row, on Deployment objects produced by the real kubectl
//! (`hack/gen-admission-fixtures.sh`). Each test wraps them into an AdmissionReview exactly as the
//! apiserver sends it, runs the same review code the server runs, applies the returned JSON patch to
//! the request object and asserts the exact object that results.

// A test stops at the first thing that is not as it expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use serde_json::{Value, json};
use turnout::admission::template::{Stamps, strip};
use turnout::admission::{Config, Outcome, review};

const AGENT: &str = "system:serviceaccount:turnout-system:turnout";

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/kubectl/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// An AdmissionReview as kube-apiserver sends it.
fn mk_review(operation: &str, old: Option<&Value>, new: Option<&Value>) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "requestKind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "requestResource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "name": "podinfo",
            "namespace": "test",
            "operation": operation,
            "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
            "object": new,
            "oldObject": old,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": format!("{}Options", titlecase(operation))}
        }
    })
}

fn titlecase(op: &str) -> String {
    let lower = op.to_lowercase();
    lower[..1].to_uppercase() + &lower[1..]
}

fn update(old: &str, new: &str) -> Value {
    mk_review("UPDATE", Some(&fixture(old)), Some(&fixture(new)))
}

/// What the webhook answered, and the object the apiserver would store.
struct Admitted {
    response: Value,
    outcome: Outcome,
    patch: Option<Value>,
    object: Value,
}

impl Admitted {
    fn warnings(&self) -> Vec<String> {
        serde_json::from_value(self.response["warnings"].clone()).unwrap_or_default()
    }
}

fn admit_as(review_json: &Value, config: &Config) -> Admitted {
    let reviewed = review(&serde_json::to_vec(review_json).unwrap(), config).expect("a valid review");
    let out: Value = serde_json::from_slice(&reviewed.to_json(false).unwrap()).unwrap();
    assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(out["kind"], "AdmissionReview");
    let response = out["response"].clone();
    assert_eq!(response["uid"], review_json["request"]["uid"], "the uid is echoed");
    assert_eq!(response["allowed"], true, "turnout never denies");
    let mut object = review_json["request"]["object"].clone();
    let patch = response.get("patch").map(|p| {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(p.as_str().expect("base64 text"))
            .unwrap();
        let patch: Value = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(
            &mut object,
            &serde_json::from_value::<json_patch::Patch>(patch.clone()).unwrap(),
        )
        .expect("the patch applies to the request object");
        patch
    });
    Admitted {
        response,
        outcome: reviewed.facts.outcome,
        patch,
        object,
    }
}

fn admit(review_json: &Value) -> Admitted {
    admit_as(
        review_json,
        &Config {
            agent_username: Some(AGENT.into()),
        },
    )
}

/// Sets `value` at a JSON pointer, creating objects on the way (`~1` is `/` in keys).
fn set(v: &mut Value, pointer: &str, value: Value) {
    let mut cur = v;
    let keys: Vec<String> = pointer
        .split('/')
        .skip(1)
        .map(|k| k.replace("~1", "/").replace("~0", "~"))
        .collect();
    for key in &keys[..keys.len() - 1] {
        cur = cur
            .as_object_mut()
            .unwrap()
            .entry(key.clone())
            .or_insert_with(|| json!({}));
    }
    cur.as_object_mut().unwrap().insert(keys[keys.len() - 1].clone(), value);
}

fn with(mut v: Value, changes: &[(&str, Value)]) -> Value {
    for (pointer, value) in changes {
        set(&mut v, pointer, value.clone());
    }
    v
}

fn stable_hash_of(stored: &Value) -> String {
    let d: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(stored.clone()).unwrap();
    strip(&d.spec.template, &Stamps::read(&d)).hash()
}

const ANN: &str = "/metadata/annotations";
const TPL_LABELS: &str = "/spec/template/metadata/labels";

#[test]
fn create_stamps_revision_one() {
    let a = admit(&mk_review("CREATE", None, Some(&fixture("podinfo"))));
    assert_eq!(a.outcome, Outcome::Stamped);
    let expected = with(
        fixture("podinfo"),
        &[
            (&format!("{ANN}/turnout.dev~1revision"), json!("1")),
            (&format!("{ANN}/turnout.dev~1version-stamped"), json!("true")),
            (&format!("{TPL_LABELS}/turnout.dev~1revision"), json!("1")),
            (&format!("{TPL_LABELS}/version"), json!("v1")),
        ],
    );
    assert_eq!(a.object, expected);
    assert_eq!(
        a.object,
        fixture("stored-v1"),
        "the committed stored fixture is what CREATE produces"
    );
}

#[test]
fn set_image_holds_the_update_as_release_two() {
    let a = admit(&update("stored-v1", "set-image-v2"));
    assert_eq!(a.outcome, Outcome::Held);
    let expected = with(
        fixture("set-image-v2"),
        &[
            ("/spec/paused", json!(true)),
            (&format!("{ANN}/turnout.dev~1revision"), json!("2")),
            (&format!("{ANN}/turnout.dev~1stable-revision"), json!("1")),
            (
                &format!("{ANN}/turnout.dev~1stable-hash"),
                json!(stable_hash_of(&fixture("stored-v1"))),
            ),
            (&format!("{TPL_LABELS}/turnout.dev~1revision"), json!("2")),
            (&format!("{TPL_LABELS}/version"), json!("v2")),
        ],
    );
    assert_eq!(a.object, expected);
    assert_eq!(
        a.warnings(),
        vec![
            "turnout: release v2 of test/podinfo started; follow it with: kubectl rollout status deployment/podinfo -n test; undo it with: turnout undo podinfo -n test"
        ]
    );
    // Minimal patch: single keys, with `/` in label keys escaped as `~1`.
    let paths: Vec<&str> = a
        .patch
        .as_ref()
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["path"].as_str().unwrap())
        .collect();
    assert!(
        paths.contains(&"/metadata/annotations/turnout.dev~1stable-hash"),
        "{paths:?}"
    );
    assert!(
        paths.contains(&"/spec/template/metadata/labels/turnout.dev~1revision"),
        "{paths:?}"
    );
    assert!(
        paths.iter().all(|p| !p.contains("containers")),
        "the user's change is not rewritten: {paths:?}"
    );
}

#[test]
fn a_dry_run_gets_the_same_patch() {
    let mut dry = update("stored-v1", "set-image-v2");
    dry["request"]["dryRun"] = json!(true);
    let wet = admit(&update("stored-v1", "set-image-v2"));
    let dry = admit(&dry);
    assert_eq!(dry.response["patch"], wet.response["patch"]);
    assert_eq!(dry.object, wet.object);
}

#[test]
fn a_template_annotation_like_rollout_restart_is_a_release() {
    let a = admit(&update("stored-v1", "restart"));
    assert_eq!(a.outcome, Outcome::Held);
    assert_eq!(a.object["spec"]["paused"], true);
    assert_eq!(
        a.object["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"],
        "2026-11-21T10:00:00Z"
    );
    assert_eq!(a.object["spec"]["template"]["metadata"]["labels"]["version"], "v2");
}

#[test]
fn scale_and_annotate_are_admitted_without_a_patch() {
    for case in ["scale", "annotate"] {
        let a = admit(&update("stored-v1", case));
        assert_eq!(a.outcome, Outcome::Kept, "{case}");
        assert!(a.patch.is_none(), "{case}: {:?}", a.patch);
        assert_eq!(a.object, fixture(case), "{case}");
        assert!(a.warnings().is_empty(), "{case}");
    }
}

#[test]
fn a_replace_without_stamps_and_the_same_template_keeps_the_stored_stamps() {
    let a = admit(&update("stored-v1", "podinfo"));
    assert_eq!(a.outcome, Outcome::Kept);
    assert_eq!(a.object, fixture("stored-v1"));
}

#[test]
fn a_replace_without_stamps_and_a_new_image_is_the_same_release_as_set_image() {
    let a = admit(&update("stored-v1", "replace-v2"));
    assert_eq!(a.outcome, Outcome::Held);
    assert_eq!(a.object, fixture("held-v2"));
}

#[test]
fn setting_the_stable_template_back_during_a_release_reverts_and_unpauses() {
    let a = admit(&update("held-v2", "revert-v1"));
    assert_eq!(a.outcome, Outcome::Reverted);
    let held = fixture("held-v2");
    let expected = with(
        fixture("revert-v1"),
        &[
            ("/spec/paused", json!(false)),
            ("/spec/template", fixture("stored-v1")["spec"]["template"].clone()),
        ],
    );
    assert_eq!(a.object, expected);
    assert_eq!(
        a.object["spec"]["template"],
        fixture("stored-v1")["spec"]["template"],
        "byte-identical to the stable"
    );
    assert_eq!(
        a.object["metadata"]["annotations"], held["metadata"]["annotations"],
        "intent kept for the agent"
    );
    assert_eq!(
        a.warnings(),
        vec!["turnout: test/podinfo is back to stable v1; release v2 is being rolled back"]
    );
}

#[test]
fn a_third_version_during_a_release_supersedes_the_second() {
    let a = admit(&update("held-v2", "set-image-v3"));
    assert_eq!(a.outcome, Outcome::Superseded);
    let expected = with(
        fixture("set-image-v3"),
        &[
            (&format!("{ANN}/turnout.dev~1revision"), json!("3")),
            (&format!("{TPL_LABELS}/turnout.dev~1revision"), json!("3")),
            (&format!("{TPL_LABELS}/version"), json!("v3")),
        ],
    );
    assert_eq!(a.object, expected);
    assert_eq!(a.object["metadata"]["annotations"]["turnout.dev/stable-revision"], "1");
    assert_eq!(a.object["spec"]["paused"], true);
    assert!(
        a.warnings()[0].starts_with("turnout: release v3 of test/podinfo supersedes v2;"),
        "{:?}",
        a.warnings()
    );
}

#[test]
fn resuming_during_a_release_keeps_the_hold() {
    let a = admit(&update("held-v2", "resume"));
    assert_eq!(a.outcome, Outcome::Kept);
    assert_eq!(a.object, fixture("held-v2"));
    assert!(
        a.warnings()[0].contains("stays paused while release v2 is in progress"),
        "{:?}",
        a.warnings()
    );
}

#[test]
fn the_agents_own_requests_are_admitted_unchanged() {
    let mut r = update("stored-v1", "set-image-v2");
    r["request"]["userInfo"]["username"] = json!(AGENT);
    let a = admit(&r);
    assert_eq!(a.outcome, Outcome::Agent);
    assert!(a.patch.is_none());
    assert_eq!(a.object, fixture("set-image-v2"));
    // Without the flag, the same request is an ordinary user's.
    assert_eq!(admit_as(&r, &Config::default()).outcome, Outcome::Held);
}

#[test]
fn delete_is_admitted_without_a_patch() {
    let a = admit(&mk_review("DELETE", Some(&fixture("stored-v1")), None));
    assert_eq!(a.outcome, Outcome::Ignored);
    assert!(a.patch.is_none());
    assert!(a.response.get("warnings").is_none());
}

#[test]
fn other_kinds_are_admitted_without_a_patch() {
    let mut r = mk_review("CREATE", None, Some(&fixture("pod")));
    r["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Pod"});
    r["request"]["resource"] = json!({"group": "", "version": "v1", "resource": "pods"});
    let a = admit(&r);
    assert_eq!(a.outcome, Outcome::Ignored);
    assert!(a.patch.is_none());
}

#[test]
fn the_scale_subresource_is_admitted_without_a_patch() {
    let mut r = update("stored-v1", "scale");
    r["request"]["subResource"] = json!("scale");
    assert_eq!(admit(&r).outcome, Outcome::Ignored);
}

#[test]
fn an_undecodable_object_is_admitted_unchanged_with_a_warning() {
    let broken = with(fixture("set-image-v2"), &[("/spec/replicas", json!("three"))]);
    let a = admit(&mk_review("UPDATE", Some(&fixture("stored-v1")), Some(&broken)));
    assert_eq!(a.outcome, Outcome::Undecodable);
    assert!(a.patch.is_none());
    assert_eq!(a.object, broken);
    let w = a.warnings();
    assert_eq!(w.len(), 1);
    assert!(
        w[0].starts_with("turnout: test/podinfo admitted unchanged, no release started:"),
        "{w:?}"
    );
    assert!(
        w[0].contains("replicas") || w[0].contains("three") || w[0].contains("integer"),
        "{w:?}"
    );
}

#[test]
fn an_opted_out_deployment_is_admitted_unchanged() {
    let old = with(
        fixture("stored-v1"),
        &[(&format!("{ANN}/turnout.dev~1rollout"), json!("disabled"))],
    );
    let new = with(
        fixture("set-image-v2"),
        &[(&format!("{ANN}/turnout.dev~1rollout"), json!("disabled"))],
    );
    let a = admit(&mk_review("UPDATE", Some(&old), Some(&new)));
    assert_eq!(a.outcome, Outcome::OptedOut);
    assert!(a.patch.is_none());
}

#[test]
fn bodies_that_are_not_an_admission_review_v1_are_errors() {
    let config = Config::default();
    for (body, needle) in [
        (b"not json".to_vec(), "not JSON"),
        (br#"{"hello":"world"}"#.to_vec(), "admission.k8s.io/v1"),
        (
            serde_json::to_vec(&with(
                update("stored-v1", "scale"),
                &[("/apiVersion", json!("admission.k8s.io/v1beta1"))],
            ))
            .unwrap(),
            "v1beta1",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
            "no request",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":7}}"#.to_vec(),
            "malformed",
        ),
    ] {
        let err = review(&body, &config).unwrap_err();
        let msg = turnout::report::chain(&err);
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    }
}
