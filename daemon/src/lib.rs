//! The control plane behind `lull daemon`: its settings (`lull.toml`), the service model with
//! its immutable revisions and apprunner.yaml's run settings, and (as the daemon grows) the
//! store, deployments, autoscaler, admin API and metrics. It drives the runtime, the network
//! and the proxy; it does not serve requests itself.

pub mod config;
pub mod duration;
pub mod names;
pub mod spec;
