//! Test fixtures: a podinfo-like Deployment and builder methods to vary it.

use k8s_openapi::api::apps::v1::Deployment;
use serde_json::json;

/// The podinfo Deployment as stored before turnout ever saw it.
pub fn mk_deployment() -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "podinfo", "namespace": "test", "labels": { "app": "podinfo" } },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "podinfo" } },
            "template": {
                "metadata": { "labels": { "app": "podinfo" } },
                "spec": { "containers": [{ "name": "podinfod", "image": "ghcr.io/stefanprodan/podinfo:6.0.0" }] }
            }
        }
    }))
    .expect("fixture is a valid Deployment")
}

/// Builder-style edits of a fixture Deployment.
pub trait DeploymentExt: Sized {
    fn with_image(self, image: &str) -> Self;
    fn with_template_label(self, key: &str, value: &str) -> Self;
    fn with_annotation(self, key: &str, value: &str) -> Self;
}

impl DeploymentExt for Deployment {
    fn with_image(mut self, image: &str) -> Self {
        let spec = &mut self.spec;
        spec.template.spec.as_mut().expect("pod spec").containers[0].image = Some(image.to_owned());
        self
    }

    fn with_template_label(mut self, key: &str, value: &str) -> Self {
        let spec = &mut self.spec;
        let meta = spec.template.metadata.get_or_insert_with(Default::default);
        meta.labels
            .get_or_insert_with(Default::default)
            .insert(key.to_owned(), value.to_owned());
        self
    }

    fn with_annotation(mut self, key: &str, value: &str) -> Self {
        self.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(key.to_owned(), value.to_owned());
        self
    }
}
