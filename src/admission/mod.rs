//! The admission side of turnout: what happens to a Deployment on its way into the cluster.
//!
//! [`review`] turns an AdmissionReview body into a response; [`decide`] is the pure decision it
//! rests on; [`template`] handles turnout's stamps on pod templates.

pub mod decide;
mod review;
pub mod template;

#[cfg(test)]
pub(crate) mod fixtures;

pub use review::{Config, Facts, Outcome, ReviewError, Reviewed, review};
