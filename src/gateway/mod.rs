//! Gateway API's gateway.networking.k8s.io/v1 types turnout writes, generated from the real CRDs by
//! kopium (`hack/gen-gateway-types.sh`); not edited by hand.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod http_route;
