//! Source folder + apprunner.yaml → OCI image, without Docker.

pub mod apprunner;
pub mod capture;
pub mod plan;
pub mod runtimes;
pub mod source;
