//! kubesim: turnout's test bed around the real Kubernetes control plane.
//!
//! ```text
//!  cluster: etcd, kube-apiserver, kube-controller-manager (built by hack/k8s/build.sh), PKI, kubeconfigs
//!  node:    a node agent as a client of the API server (pods bound, given IPs and status, deleted)
//!  mesh:    proxies routing by VirtualService/DestinationRule/HTTPRoute, fed by watches ──▶ simulated pods; metrics
//!  testbed: the three together
//! ```

pub mod cluster;
pub mod mesh;
pub mod node;
pub mod pki;
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
