//! The control plane behind `lull daemon`: its settings (`lull.toml`), the service model with
//! its immutable revisions and apprunner.yaml's run settings, the state store and secrets, the
//! host seam (real and fake) the deployment engine drives, the admin API and the metrics
//! endpoint. It drives the runtime, the network and the proxy; it does not serve requests
//! itself.

pub mod acme;
pub mod api;
pub mod autoscale;
pub mod certs;
pub mod config;
pub mod control;
pub mod duration;
pub mod engine;
pub mod host;
pub mod names;
pub mod secrets;
pub mod spec;
pub mod store;
pub mod telemetry;
pub mod testing;

/// Chooses rustls' process-wide crypto provider (aws-lc-rs) for the libraries that take it
/// (the ACME and registry clients): more than one is built in, so rustls cannot pick. Safe to
/// call more than once; the first choice stays.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
