//! The control plane: services, revisions, deployments, autoscaler, admin API and metrics (filled by the daemon issue).

pub mod api;
pub mod engine;
pub mod host;
pub mod secrets;
pub mod store;
pub mod telemetry;
