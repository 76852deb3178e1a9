//! Pod-template bookkeeping: reading turnout's stamps, removing and adding them, hashing templates.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::names::{annotations, labels, values, version_label};

/// The release intent the webhook records when it holds an update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseIntent {
    /// Revision serving traffic while the release is in flight; `0` for a template without stamps.
    pub stable_revision: u64,
    /// [`Stripped::hash`] of the stable template.
    pub stable_hash: String,
}

/// turnout's stamps as read from a stored Deployment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stamps {
    /// Highest revision issued so far (`0` when the Deployment has never been stamped).
    pub counter: u64,
    /// Revision label of the pod template, when present.
    pub template_revision: Option<u64>,
    /// Value of the template's `version` label when turnout stamped it.
    pub stamped_version: Option<String>,
    /// Release in flight, if any.
    pub release: Option<ReleaseIntent>,
    /// Problems found while reading (unparsable values); reported as warnings, never fatal.
    pub problems: Vec<String>,
}

impl Stamps {
    /// Reads the stamps of `deploy`; malformed values are ignored and listed in `problems`.
    pub fn read(deploy: &Deployment) -> Self {
        let mut problems = Vec::new();
        let ann = deploy.metadata.annotations.as_ref();
        let tpl_labels = template_labels(deploy);
        let mut number = |source: &str, key: &str, raw: Option<&String>| -> Option<u64> {
            let raw = raw?;
            match raw.parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => {
                    problems.push(format!("ignoring {source} {key}={raw:?}: not a whole number"));
                    None
                }
            }
        };
        let counter = number(
            "annotation",
            annotations::REVISION,
            ann.and_then(|a| a.get(annotations::REVISION)),
        );
        let template_revision = number(
            "template label",
            labels::REVISION,
            tpl_labels.and_then(|l| l.get(labels::REVISION)),
        );
        let stable_revision = number(
            "annotation",
            annotations::STABLE_REVISION,
            ann.and_then(|a| a.get(annotations::STABLE_REVISION)),
        );
        let stable_hash = ann
            .and_then(|a| a.get(annotations::STABLE_HASH))
            .filter(|h| !h.is_empty());
        let release = match (stable_revision, stable_hash) {
            (Some(stable_revision), Some(hash)) => Some(ReleaseIntent {
                stable_revision,
                stable_hash: hash.clone(),
            }),
            (None, None) => None,
            _ => {
                problems.push(format!(
                    "ignoring incomplete release intent: {} and {} must be set together",
                    annotations::STABLE_REVISION,
                    annotations::STABLE_HASH
                ));
                None
            }
        };
        let version_is_ours = ann
            .and_then(|a| a.get(annotations::VERSION_STAMPED))
            .is_some_and(|v| v == values::TRUE);
        let stamped_version = if version_is_ours {
            tpl_labels.and_then(|l| l.get(labels::VERSION)).cloned()
        } else {
            None
        };
        let counter = [counter, template_revision, release.as_ref().map(|r| r.stable_revision)]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(0);
        Self {
            counter,
            template_revision,
            stamped_version,
            release,
            problems,
        }
    }

    /// The revision the next template change gets.
    pub fn next_revision(&self) -> u64 {
        self.counter.saturating_add(1)
    }
}

/// The template's labels, if it has any.
pub fn template_labels(deploy: &Deployment) -> Option<&BTreeMap<String, String>> {
    deploy.spec.template.metadata.as_ref()?.labels.as_ref()
}

/// A pod template as the user wrote it: turnout's stamps removed. It borrows the pod spec, which
/// stamps never touch, so comparing and hashing templates copies only their metadata.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Stripped<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<ObjectMeta>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec: Option<&'a PodSpec>,
}

impl Stripped<'_> {
    /// A stable, short hash: SHA-256 over the canonical JSON, 16 hex digits. The JSON of typed
    /// objects is canonical: struct fields serialise in declaration order and maps are sorted.
    pub fn hash(&self) -> String {
        // Serialising typed objects cannot fail: every map key is a string.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// `tpl` without turnout's stamps, as the user would have written it.
///
/// The `version` label is removed only when `stamps` says turnout stamped it with the same value; a
/// `version` label the user wrote is part of their template.
pub fn strip<'a>(tpl: &'a PodTemplateSpec, stamps: &Stamps) -> Stripped<'a> {
    let mut metadata = tpl.metadata.clone();
    if let Some(meta) = metadata.as_mut() {
        remove_stamps(meta, stamps);
    }
    Stripped {
        metadata,
        spec: tpl.spec.as_ref(),
    }
}

fn remove_stamps(meta: &mut ObjectMeta, stamps: &Stamps) {
    if let Some(l) = meta.labels.as_mut() {
        l.remove(labels::REVISION);
        if stamps.stamped_version.is_some() && l.get(labels::VERSION) == stamps.stamped_version.as_ref() {
            l.remove(labels::VERSION);
        }
        if l.is_empty() {
            meta.labels = None;
        }
    }
}

/// Replaces the stamps of `tpl` (judged by `stamps`, those of the stored object) with those of
/// `revision`. Returns whether the `version` label is turnout's. Revision `0` means a template from
/// before turnout, which carries no stamps.
pub fn restamp(tpl: &mut PodTemplateSpec, stamps: &Stamps, revision: u64) -> bool {
    if let Some(meta) = tpl.metadata.as_mut() {
        remove_stamps(meta, stamps);
    }
    if revision == 0 {
        return false;
    }
    let labels = tpl
        .metadata
        .get_or_insert_with(Default::default)
        .labels
        .get_or_insert_with(Default::default);
    labels.insert(labels::REVISION.to_owned(), revision.to_string());
    if labels.contains_key(labels::VERSION) {
        false
    } else {
        labels.insert(labels::VERSION.to_owned(), version_label(revision));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::fixtures::{DeploymentExt, mk_deployment};

    #[test]
    fn strip_keeps_a_version_label_the_user_wrote() {
        let d = mk_deployment()
            .with_template_label("version", "v1")
            .with_template_label(labels::REVISION, "1");
        let stamps = Stamps::read(&d);
        let stripped = strip(&d.spec.template, &stamps);
        let l = stripped.metadata.clone().unwrap().labels.unwrap();
        assert_eq!(l.get("version").map(String::as_str), Some("v1"));
        assert!(!l.contains_key(labels::REVISION));
    }

    #[test]
    fn strip_removes_a_version_label_turnout_stamped() {
        let d = mk_deployment()
            .with_template_label("version", "v3")
            .with_template_label(labels::REVISION, "3")
            .with_annotation(annotations::VERSION_STAMPED, "true");
        let stamps = Stamps::read(&d);
        let stripped = strip(&d.spec.template, &stamps);
        assert!(
            !stripped
                .metadata
                .clone()
                .unwrap()
                .labels
                .unwrap()
                .contains_key("version")
        );
    }

    #[test]
    fn stamp_leaves_a_user_version_label_alone() {
        let d = mk_deployment().with_template_label("version", "1.2.0");
        let mut tpl = d.spec.template;
        assert!(!restamp(&mut tpl, &Stamps::default(), 4));
        let l = tpl.metadata.unwrap().labels.unwrap();
        assert_eq!(l.get("version").map(String::as_str), Some("1.2.0"));
        assert_eq!(l.get(labels::REVISION).map(String::as_str), Some("4"));
    }

    #[test]
    fn stamp_of_revision_zero_is_the_bare_template() {
        let mut tpl = mk_deployment().spec.template;
        let before = tpl.clone();
        assert!(!restamp(&mut tpl, &Stamps::default(), 0));
        assert_eq!(tpl, before);
    }

    #[test]
    fn hash_changes_with_the_image_and_not_with_stamps() {
        let a = mk_deployment();
        let b = mk_deployment().with_image("ghcr.io/stefanprodan/podinfo:6.1.0");
        let stamped = mk_deployment().with_template_label(labels::REVISION, "9");
        let h = |d: &Deployment| strip(&d.spec.template, &Stamps::read(d)).hash();
        assert_ne!(h(&a), h(&b));
        assert_eq!(h(&a), h(&stamped));
        assert_eq!(h(&a).len(), 16);
    }

    #[test]
    fn malformed_numbers_are_reported_and_ignored() {
        let d = mk_deployment()
            .with_annotation(annotations::REVISION, "seven")
            .with_template_label(labels::REVISION, "2");
        let stamps = Stamps::read(&d);
        assert_eq!(stamps.counter, 2);
        assert_eq!(stamps.problems.len(), 1);
        assert!(stamps.problems[0].contains("seven"), "{:?}", stamps.problems);
    }

    #[test]
    fn a_half_written_release_intent_is_ignored_with_a_problem() {
        let d = mk_deployment().with_annotation(annotations::STABLE_REVISION, "1");
        let stamps = Stamps::read(&d);
        assert_eq!(stamps.release, None);
        assert_eq!(stamps.problems.len(), 1);
    }
}
