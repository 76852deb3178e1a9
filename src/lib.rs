//! turnout: zero-downtime progressive delivery for plain Kubernetes Deployments on Istio.
//!
//! ```text
//!  kubectl set image ──▶ kube-apiserver ──AdmissionReview──▶ webhook (admission::review)
//!                                                             │ pure decide(): stamp, hold, revert
//!                                        ◀──JSONPatch─────────┘
//!  agent (coming) watches held Deployments ──▶ candidate, subsets, weights, analysis, hand-off
//! ```
//!
//! The webhook only edits the object in the request; every side effect belongs to the agent.

pub mod admission;
pub mod names;
