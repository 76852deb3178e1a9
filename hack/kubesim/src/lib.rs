//! kubesim: a Kubernetes emulator for turnout's tests and demos.
//!
//! ```text
//!  kubectl / kube-rs ──HTTPS──▶ api (discovery, verbs, patches) ──▶ store (objects, resourceVersions, watches)
//!                                   │ admission (webhooks)  │ rbac        ▲
//!                                   ▼                                     │
//!                              controllers (Deployment, ReplicaSet, kubelet, EndpointSlices, GC)
//!  HTTP ──▶ mesh (proxies routing by VirtualService/DestinationRule) ──▶ simulated pods; metrics
//! ```

pub mod admission;
pub mod api;
pub mod cluster;
pub mod controllers;
pub mod mesh;
pub mod node;
pub mod patch;
pub mod pki;
pub mod rbac;
pub mod resources;
pub mod schema;
pub mod selector;
pub mod server;
pub mod sim;
pub mod store;
pub mod testbed;

/// An error and its sources on one line.
pub fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
