//! Source folder + apprunner.yaml → OCI image, without Docker (filled by the builder issue).

pub mod apprunner;
pub mod plan;
pub mod runtimes;
