//! Source folder + apprunner.yaml → OCI image, without Docker (filled by the builder issue).
//!
//! - [`apprunner`]: parsing and validating `apprunner.yaml`;
//! - [`source`]: packing the deployed folder (honouring ignore files) and unpacking it safely;
//! - [`capture`]: turning a build step's overlayfs upper directory into an OCI layer.

pub mod apprunner;
pub mod capture;
pub mod source;
