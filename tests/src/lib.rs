//! Helpers shared by lull's end-to-end and privileged tests: unique names, scratch dirs and
//! cleanup guards, so that two runs never collide and a failed test leaves nothing behind.

pub mod affinity;
pub mod bench_util;
pub mod busybox;
pub mod cpu;
pub mod daemon;
pub mod e2e;
pub mod forwarding;
pub mod host_net;
pub mod http;
pub mod oci_layout;
pub mod scratch;
