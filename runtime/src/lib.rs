//! lull's runtime: the image store (pull, import, garbage collection), secure layer unpacking,
//! instances launched through youki's libcontainer in their own namespaces, their cgroups and
//! the CPU gate the proxy flips on every request.
//!
//! The runtime knows nothing about HTTP. Host facilities (cgroupfs roots, data dirs) are
//! parameters so that tests point them at temporary directories.

pub mod cgroup;
pub mod digest;
pub mod export;
pub mod host;
pub mod import;
pub mod instance;
pub mod layers;
pub mod logs;
pub mod pull;
pub mod push;
pub mod reference;
pub mod size;
pub mod store;
