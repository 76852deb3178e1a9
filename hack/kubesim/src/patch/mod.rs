//! The patch types of the Kubernetes API: JSON patch, JSON merge patch and strategic merge patch.

pub mod strategic;
