//! turnout: zero-downtime progressive delivery for plain Kubernetes Deployments on Istio.
//!
//! ```text
//!  kubectl set image ─▶ kube-apiserver ─AdmissionReview─▶ webhook ─▶ admission::review
//!                                                            │  pure decide(): stamp, hold, revert
//!                       kube-apiserver ◀──── JSONPatch ──────┘
//!  agent: held Deployment ─▶ release::plan (pure) ─▶ candidate, subsets, weights, analysis, hand-off
//! ```
//!
//! The webhook only edits the object in the request; every side effect belongs to the agent.

pub mod admin;
pub mod admission;
pub mod agent;
pub mod certs;
pub mod cli;
pub mod config;
pub mod gateway;
pub mod istio;
pub mod metrics;
pub mod mutate;
pub mod names;
pub mod release;
pub mod report;
pub mod request;
pub mod signals;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod undo;
pub mod webhook;
