//! Istio's networking.istio.io/v1 types turnout writes, generated from the real CRDs by kopium
//! (`hack/gen-istio-types.sh`); not edited by hand.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod destination_rule;
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod virtual_service;

#[cfg(test)]
mod tests {
    use super::destination_rule::DestinationRule;
    use super::virtual_service::VirtualService;
    use serde_json::json;

    #[test]
    fn a_weighted_route_between_subsets_round_trips() {
        let vs = json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "podinfo", "namespace": "test"},
            "spec": {"hosts": ["podinfo"], "http": [{"route": [
                {"destination": {"host": "podinfo", "subset": "v1"}, "weight": 75},
                {"destination": {"host": "podinfo", "subset": "v2-canary"}, "weight": 25}]}]}
        });
        let typed: VirtualService = serde_json::from_value(vs.clone()).unwrap();
        let route = &typed.spec.http.as_ref().unwrap()[0].route.as_ref().unwrap()[1];
        assert_eq!(route.weight, Some(25));
        assert_eq!(route.destination.subset.as_deref(), Some("v2-canary"));
        assert_eq!(serde_json::to_value(&typed).unwrap(), vs);
    }

    #[test]
    fn a_destination_rule_with_subsets_by_pod_template_hash_round_trips() {
        let dr = json!({
            "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "podinfo", "namespace": "test"},
            "spec": {"host": "podinfo", "subsets": [{"name": "v1", "labels": {"pod-template-hash": "5d4f8b9c7"}}]}
        });
        let typed: DestinationRule = serde_json::from_value(dr.clone()).unwrap();
        assert_eq!(
            typed.spec.subsets.as_ref().unwrap()[0].labels.as_ref().unwrap()["pod-template-hash"],
            "5d4f8b9c7"
        );
        assert_eq!(serde_json::to_value(&typed).unwrap(), dr);
    }
}
