//! Source folder + apprunner.yaml → OCI image, without Docker: the file's reader
//! (`apprunner`), runtimes and the plan (`runtimes`, `plan`, `prepare`), the source tree
//! (`source`), layer capture from an overlay upper dir (`capture`), the build sandbox's
//! interface (`sandbox`), the build itself (`build`) and the image it commits (`image`).

pub mod apprunner;
pub mod build;
pub mod capture;
pub mod image;
pub mod plan;
pub mod prepare;
pub mod rebase;
pub mod runtimes;
pub mod sandbox;
pub mod source;
pub mod words;
