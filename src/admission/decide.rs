//! The admission decision for a Deployment, a pure function of the request (DESIGN §4).
//!
//! ```text
//!   CREATE ───────────────────────────────▶ Stamped   (revision 1)
//!   UPDATE ─┬ template same (sans stamps) ─▶ Kept      (stored stamps back; hold kept)
//!           ├ template == stable template ─▶ Reverted  (stable stamps back; unpaused)
//!           ├ release in flight ───────────▶ Superseded(revision N+1, paused, stable kept)
//!           └ otherwise ───────────────────▶ Held      (revision N+1, paused, stable recorded)
//! ```

use k8s_openapi::api::apps::v1::Deployment;

use super::template::{ReleaseIntent, Stamps, restamp, strip};
use crate::names::{annotations, values};

/// The request being decided, as far as the decision needs it.
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    /// A Deployment is being created.
    Create,
    /// A Deployment is being updated; `old` is the stored object.
    Update { old: &'a Deployment },
}

/// Which Deployment the request is about, for messages.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

/// What the webhook does with a Deployment request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The Deployment carries `turnout.dev/rollout: disabled`: admitted as it is.
    OptedOut,
    /// CREATE: revision 1 stamped, no release.
    Stamped,
    /// UPDATE that leaves the template as it was (ignoring stamps): stored stamps and hold kept.
    Kept,
    /// UPDATE that changes the template at rest: held (paused) as release `revision`.
    Held { revision: u64 },
    /// UPDATE with a new template during a release: release `revision` replaces `superseded`.
    Superseded { revision: u64, superseded: u64 },
    /// UPDATE that sets the template back to the stable one during a release: the stable stamps are
    /// restored and the Deployment unpaused; release `abandoned` is rolled back by the agent.
    Reverted { stable: u64, abandoned: u64 },
}

/// The outcome: the object to admit and what to tell the user.
#[derive(Clone, Debug)]
pub struct Decision {
    pub action: Action,
    /// The Deployment as it should be stored.
    pub object: Deployment,
    /// Human-readable warnings for the client (kubectl prints them).
    pub warnings: Vec<String>,
}

/// Decides what to do with `new`.
pub fn decide(change: Change<'_>, target: Target<'_>, new: &Deployment) -> Decision {
    if opted_out(new) {
        return Decision {
            action: Action::OptedOut,
            object: new.clone(),
            warnings: Vec::new(),
        };
    }
    match change {
        Change::Create => create(target, new),
        Change::Update { old } => update(target, old, new),
    }
}

fn create(target: Target<'_>, new: &Deployment) -> Decision {
    // A created object may be a copy of one turnout stamped (a backup, a GitOps manifest taken from the
    // cluster): its own stamps say which labels are ours.
    let stamps = Stamps::read(new);
    let mut warnings = problems(target, &stamps);
    let mut object = new.clone();
    if let Some(ann) = object.metadata.annotations.as_mut() {
        for key in annotations::RELEASE_STATE {
            ann.remove(key);
        }
    }
    let version_stamped = restamp(&mut object.spec.template, &stamps, 1);
    set_annotation(&mut object, annotations::REVISION, Some("1".to_owned()));
    set_version_stamped(&mut object, version_stamped);
    warnings.push(format!(
        "turnout: {}/{} is managed by turnout: a change of its pod template becomes a progressive release",
        target.namespace, target.name
    ));
    Decision {
        action: Action::Stamped,
        object,
        warnings,
    }
}

fn update(target: Target<'_>, old: &Deployment, new: &Deployment) -> Decision {
    let stamps = Stamps::read(old);
    let mut warnings = problems(target, &stamps);
    let stripped_old = strip(&old.spec.template, &stamps);
    // Whether a label of the new template is ours is judged from the stored object.
    let stripped_new = strip(&new.spec.template, &stamps);

    let mut object = new.clone();
    for key in annotations::OWNED {
        set_annotation(&mut object, key, annotation(old, key).cloned());
    }
    let current = stamps.template_revision.unwrap_or(0);

    if stripped_new == stripped_old {
        // The pod specs are equal: the stored metadata, stamps included, makes the template the stored one.
        object.spec.template.metadata.clone_from(&old.spec.template.metadata);
        if stamps.release.is_some() && is_paused(old) {
            if !is_paused(new) {
                warnings.push(format!(
                    "turnout: {}/{} stays paused while release v{current} is in progress; it resumes at hand-off",
                    target.namespace, target.name
                ));
            }
            set_paused(&mut object, true);
        }
        return Decision {
            action: Action::Kept,
            object,
            warnings,
        };
    }

    if let Some(intent) = &stamps.release
        && stripped_new.hash() == intent.stable_hash
    {
        let version_stamped = restamp(&mut object.spec.template, &stamps, intent.stable_revision);
        set_version_stamped(&mut object, version_stamped);
        if is_paused(&object) {
            set_paused(&mut object, false);
        }
        warnings.push(format!(
            "turnout: {}/{} is back to stable v{}; release v{current} is being rolled back",
            target.namespace, target.name, intent.stable_revision
        ));
        return Decision {
            action: Action::Reverted {
                stable: intent.stable_revision,
                abandoned: current,
            },
            object,
            warnings,
        };
    }

    let revision = stamps.next_revision();
    let version_stamped = restamp(&mut object.spec.template, &stamps, revision);
    set_annotation(&mut object, annotations::REVISION, Some(revision.to_string()));
    set_version_stamped(&mut object, version_stamped);
    set_paused(&mut object, true);
    let follow = format!(
        "follow it with: kubectl rollout status deployment/{name} -n {ns}; undo it with: turnout undo {name} -n {ns}",
        name = target.name,
        ns = target.namespace
    );
    // After a revert the intent stays until the agent has cleaned up, but nothing is in flight.
    let in_flight = stamps
        .release
        .as_ref()
        .filter(|intent| intent.stable_revision != current);
    let (intent, action) = match in_flight {
        Some(intent) => {
            warnings.push(format!(
                "turnout: release v{revision} of {}/{} supersedes v{current}; {follow}",
                target.namespace, target.name
            ));
            (
                intent.clone(),
                Action::Superseded {
                    revision,
                    superseded: current,
                },
            )
        }
        None => {
            warnings.push(format!(
                "turnout: release v{revision} of {}/{} started; {follow}",
                target.namespace, target.name
            ));
            let intent = ReleaseIntent {
                stable_revision: current,
                stable_hash: stripped_old.hash(),
            };
            (intent, Action::Held { revision })
        }
    };
    set_annotation(
        &mut object,
        annotations::STABLE_REVISION,
        Some(intent.stable_revision.to_string()),
    );
    set_annotation(&mut object, annotations::STABLE_HASH, Some(intent.stable_hash));
    Decision {
        action,
        object,
        warnings,
    }
}

/// Opted out, or a candidate turnout created (whichever identity created it).
fn opted_out(d: &Deployment) -> bool {
    annotation(d, annotations::ROLLOUT).is_some_and(|v| v == values::DISABLED)
        || d.metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(crate::names::agent::RELEASE_OF))
}

fn problems(target: Target<'_>, stamps: &Stamps) -> Vec<String> {
    stamps
        .problems
        .iter()
        .map(|p| format!("turnout: {}/{}: {p}", target.namespace, target.name))
        .collect()
}

fn is_paused(d: &Deployment) -> bool {
    d.spec.paused.unwrap_or(false)
}

fn set_paused(d: &mut Deployment, paused: bool) {
    d.spec.paused = Some(paused);
}

fn annotation<'d>(d: &'d Deployment, key: &str) -> Option<&'d String> {
    d.metadata.annotations.as_ref()?.get(key)
}

fn set_annotation(d: &mut Deployment, key: &str, value: Option<String>) {
    match value {
        Some(v) => {
            d.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(key.to_owned(), v);
        }
        None => {
            if let Some(ann) = d.metadata.annotations.as_mut() {
                ann.remove(key);
            }
        }
    }
}

fn set_version_stamped(d: &mut Deployment, stamped: bool) {
    set_annotation(
        d,
        annotations::VERSION_STAMPED,
        stamped.then(|| values::TRUE.to_owned()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::fixtures::{DeploymentExt, mk_deployment};
    use crate::names::labels;

    const T: Target<'static> = Target {
        namespace: "test",
        name: "podinfo",
    };
    const V2: &str = "ghcr.io/stefanprodan/podinfo:6.1.0";
    const V3: &str = "ghcr.io/stefanprodan/podinfo:6.2.0";

    fn created() -> Deployment {
        decide(Change::Create, T, &mk_deployment()).object
    }

    fn labels_of(d: &Deployment) -> Vec<(String, String)> {
        let l = d
            .spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap_or_default();
        l.into_iter().collect()
    }

    fn ann(d: &Deployment, key: &str) -> Option<String> {
        annotation(d, key).cloned()
    }

    #[test]
    fn create_stamps_revision_one_and_a_version_label() {
        let d = created();
        assert_eq!(ann(&d, annotations::REVISION).as_deref(), Some("1"));
        assert_eq!(ann(&d, annotations::VERSION_STAMPED).as_deref(), Some("true"));
        assert_eq!(
            labels_of(&d),
            vec![
                ("app".into(), "podinfo".into()),
                ("turnout.dev/revision".into(), "1".into()),
                ("version".into(), "v1".into())
            ]
        );
    }

    #[test]
    fn create_of_a_copy_mid_release_starts_at_rest() {
        let copy = mk_deployment()
            .with_template_label(labels::REVISION, "7")
            .with_template_label("version", "v7")
            .with_annotation(annotations::VERSION_STAMPED, "true")
            .with_annotation(annotations::STABLE_REVISION, "6")
            .with_annotation(annotations::STABLE_HASH, "abc")
            .with_annotation(annotations::PHASE, "Progressing");
        let d = decide(Change::Create, T, &copy).object;
        assert_eq!(ann(&d, annotations::STABLE_REVISION), None);
        assert_eq!(ann(&d, annotations::PHASE), None);
        assert!(labels_of(&d).contains(&("version".into(), "v1".into())));
    }

    #[test]
    fn image_change_holds_the_update_as_revision_two() {
        let old = created();
        let new = old.clone().with_image(V2);
        let dec = decide(Change::Update { old: &old }, T, &new);
        assert_eq!(dec.action, Action::Held { revision: 2 });
        assert!(is_paused(&dec.object));
        assert_eq!(ann(&dec.object, annotations::REVISION).as_deref(), Some("2"));
        assert_eq!(ann(&dec.object, annotations::STABLE_REVISION).as_deref(), Some("1"));
        let stable_hash = strip(&old.spec.template, &Stamps::read(&old)).hash();
        assert_eq!(ann(&dec.object, annotations::STABLE_HASH), Some(stable_hash));
        assert!(labels_of(&dec.object).contains(&("version".into(), "v2".into())));
        assert_eq!(
            dec.warnings,
            vec![
                "turnout: release v2 of test/podinfo started; follow it with: kubectl rollout status deployment/podinfo -n test; undo it with: turnout undo podinfo -n test"
            ]
        );
    }

    #[test]
    fn apply_without_stamps_keeps_the_stored_template() {
        let old = created();
        let new = mk_deployment(); // the user's manifest: no stamps at all
        let dec = decide(Change::Update { old: &old }, T, &new);
        assert_eq!(dec.action, Action::Kept);
        assert_eq!(dec.object.spec.template, old.spec.template);
        assert_eq!(dec.object.metadata.annotations, old.metadata.annotations);
    }

    #[test]
    fn replace_during_a_release_keeps_the_hold_and_warns() {
        let old = created();
        let held = decide(Change::Update { old: &old }, T, &old.clone().with_image(V2)).object;
        let replace = mk_deployment().with_image(V2); // dropped stamps, annotations and paused
        let dec = decide(Change::Update { old: &held }, T, &replace);
        assert_eq!(dec.action, Action::Kept);
        assert_eq!(dec.object.spec, held.spec);
        assert_eq!(dec.object.metadata.annotations, held.metadata.annotations);
        assert!(
            dec.warnings[0].contains("stays paused while release v2"),
            "{:?}",
            dec.warnings
        );
    }

    #[test]
    fn a_user_version_label_is_never_overwritten() {
        let user = mk_deployment().with_template_label("version", "v1");
        let old = decide(Change::Create, T, &user).object;
        assert_eq!(ann(&old, annotations::VERSION_STAMPED), None);
        let dec = decide(Change::Update { old: &old }, T, &old.clone().with_image(V2));
        assert_eq!(dec.action, Action::Held { revision: 2 });
        assert!(labels_of(&dec.object).contains(&("version".into(), "v1".into())));
        assert_eq!(ann(&dec.object, annotations::VERSION_STAMPED), None);
    }

    #[test]
    fn a_version_label_added_by_the_user_takes_over_from_ours() {
        let old = created();
        let new = mk_deployment().with_template_label("version", "1.2.0");
        let dec = decide(Change::Update { old: &old }, T, &new);
        assert_eq!(dec.action, Action::Held { revision: 2 });
        assert!(labels_of(&dec.object).contains(&("version".into(), "1.2.0".into())));
        assert_eq!(ann(&dec.object, annotations::VERSION_STAMPED), None);
    }

    #[test]
    fn revert_restores_the_stable_template_and_unpauses() {
        let old = created();
        let held = decide(Change::Update { old: &old }, T, &old.clone().with_image(V2)).object;
        let back = held.clone().with_image("ghcr.io/stefanprodan/podinfo:6.0.0");
        let dec = decide(Change::Update { old: &held }, T, &back);
        assert_eq!(
            dec.action,
            Action::Reverted {
                stable: 1,
                abandoned: 2
            }
        );
        assert_eq!(dec.object.spec.template, old.spec.template);
        assert!(!is_paused(&dec.object));
        // The counter never goes back, so the next release cannot reuse an old name.
        assert_eq!(ann(&dec.object, annotations::REVISION).as_deref(), Some("2"));
        let next = decide(
            Change::Update { old: &dec.object },
            T,
            &dec.object.clone().with_image(V3),
        );
        assert_eq!(next.action, Action::Held { revision: 3 });
        assert_eq!(ann(&next.object, annotations::STABLE_REVISION).as_deref(), Some("1"));
    }

    #[test]
    fn a_third_version_supersedes_and_keeps_the_stable_intent() {
        let old = created();
        let held = decide(Change::Update { old: &old }, T, &old.clone().with_image(V2)).object;
        let dec = decide(Change::Update { old: &held }, T, &held.clone().with_image(V3));
        assert_eq!(
            dec.action,
            Action::Superseded {
                revision: 3,
                superseded: 2
            }
        );
        assert_eq!(ann(&dec.object, annotations::STABLE_REVISION).as_deref(), Some("1"));
        assert_eq!(
            ann(&dec.object, annotations::STABLE_HASH),
            ann(&held, annotations::STABLE_HASH)
        );
        assert!(dec.warnings[0].contains("release v3 of test/podinfo supersedes v2"));
    }

    #[test]
    fn a_deployment_from_before_turnout_gets_stable_revision_zero() {
        let old = mk_deployment();
        let dec = decide(Change::Update { old: &old }, T, &old.clone().with_image(V2));
        assert_eq!(dec.action, Action::Held { revision: 1 });
        assert_eq!(ann(&dec.object, annotations::STABLE_REVISION).as_deref(), Some("0"));
        // Reverting restores the bare template, byte for byte.
        let back = dec.object.clone().with_image("ghcr.io/stefanprodan/podinfo:6.0.0");
        let rev = decide(Change::Update { old: &dec.object }, T, &back);
        assert_eq!(
            rev.action,
            Action::Reverted {
                stable: 0,
                abandoned: 1
            }
        );
        assert_eq!(rev.object.spec.template, old.spec.template);
    }

    #[test]
    fn a_scale_at_rest_changes_nothing_of_ours() {
        let old = created();
        let mut new = old.clone();
        new.spec.replicas = Some(5);
        let dec = decide(Change::Update { old: &old }, T, &new);
        assert_eq!(dec.action, Action::Kept);
        assert_eq!(
            serde_json::to_value(&dec.object).unwrap(),
            serde_json::to_value(&new).unwrap()
        );
    }

    #[test]
    fn candidates_are_admitted_as_they_are() {
        let mut candidate = created().with_image(V2);
        candidate
            .metadata
            .labels
            .get_or_insert_default()
            .insert(crate::names::agent::RELEASE_OF.into(), "podinfo".into());
        let dec = decide(Change::Create, T, &candidate);
        assert_eq!(dec.action, Action::OptedOut);
        assert_eq!(dec.object, candidate);
    }

    #[test]
    fn opted_out_deployments_are_admitted_as_they_are() {
        let old = created().with_annotation(annotations::ROLLOUT, "disabled");
        let new = old.clone().with_image(V2);
        let dec = decide(Change::Update { old: &old }, T, &new);
        assert_eq!(dec.action, Action::OptedOut);
        assert_eq!(dec.object, new);
    }

    #[test]
    fn owned_annotations_edited_by_a_user_are_put_back() {
        let old = created().with_annotation(annotations::PHASE, "Succeeded");
        let new = old
            .clone()
            .with_annotation(annotations::PHASE, "Promoting")
            .with_annotation(annotations::REVISION, "99");
        let dec = decide(Change::Update { old: &old }, T, &new);
        assert_eq!(dec.object.metadata.annotations, old.metadata.annotations);
    }

    #[test]
    fn a_template_change_after_failure_supersedes_from_the_same_stable() {
        let old = created();
        let held = decide(Change::Update { old: &old }, T, &old.clone().with_image(V2))
            .object
            .with_annotation(annotations::PHASE, "Failed");
        let dec = decide(Change::Update { old: &held }, T, &held.clone().with_image(V3));
        assert_eq!(
            dec.action,
            Action::Superseded {
                revision: 3,
                superseded: 2
            }
        );
        assert_eq!(ann(&dec.object, annotations::PHASE).as_deref(), Some("Failed"));
        assert!(is_paused(&dec.object));
    }

    #[test]
    fn the_decision_is_deterministic() {
        let old = created();
        let new = old.clone().with_image(V2);
        let a = decide(Change::Update { old: &old }, T, &new);
        let b = decide(Change::Update { old: &old }, T, &new);
        assert_eq!(a.object, b.object);
        assert_eq!(a.warnings, b.warnings);
    }
}
