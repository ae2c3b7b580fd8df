//! The seccomp filter every instance (and every build, and every `lull exec`) runs under.
//!
//! A deny list, not Docker's allow list: every system call is allowed except those that reach
//! kernel state no namespace isolates, or that undo the instance's isolation. They fail with
//! `EPERM`, as they would without the capability they need, so programs that probe for them
//! (an io_uring event loop, a sandbox trying user namespaces) fall back as they do under
//! Docker. `clone3` fails with `ENOSYS`: its flags are in memory, where a filter cannot read
//! them, so libc falls back to `clone`, whose namespace flags the filter checks.
//!
//! Why a deny list: Docker's allow list (about 370 names, with kernel-version conditions)
//! breaks an app that uses a call it has not learned yet; this list is short enough to read
//! whole, and what it refuses is what matters for escaping (user namespaces are the way to
//! most of the kernel's attack surface without any capability, and `keyctl`, `bpf`,
//! `perf_event_open`, `io_uring_*` and `userfaultfd` are the usual ways in). The price: a
//! system call that newer kernels add is allowed until it is listed here.
//!
//! libcontainer installs the filter last before exec (with `no_new_privileges`), compiled by
//! libseccomp; names unknown to the host's libseccomp are skipped, so one list fits every
//! kernel.

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompOperator,
    LinuxSyscall,
};

/// Refused with `EPERM` whatever their arguments.
pub const DENIED: &[&str] = &[
    // Kernel modules, another kernel, the machine.
    "create_module",
    "delete_module",
    "finit_module",
    "get_kernel_syms",
    "init_module",
    "kexec_file_load",
    "kexec_load",
    "query_module",
    "reboot",
    "swapoff",
    "swapon",
    // Namespaces and mounts: the isolation itself.
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "mount",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "pivot_root",
    "setns",
    "umount",
    "umount2",
    "unshare",
    // Kernel state shared by every namespace.
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "keyctl",
    "lookup_dcookie",
    "nfsservctl",
    "perf_event_open",
    "quotactl",
    "quotactl_fd",
    "request_key",
    "settimeofday",
    "stime",
    "syslog",
    "_sysctl",
    "uselib",
    "ustat",
    "vhangup",
    // Files by handle, past the mount namespace (CVE-2014-3519's way out).
    "name_to_handle_at",
    "open_by_handle_at",
    // Large kernel attack surface, refused by Docker too.
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "userfaultfd",
    // Port I/O and old x86 modes.
    "ioperm",
    "iopl",
    "vm86",
    "vm86old",
];

/// `clone` flags that make a new namespace: `clone` with any of them is refused.
pub const NAMESPACE_FLAGS: &[(&str, u64)] = &[
    ("CLONE_NEWNS", 0x0002_0000),
    ("CLONE_NEWCGROUP", 0x0200_0000),
    ("CLONE_NEWUTS", 0x0400_0000),
    ("CLONE_NEWIPC", 0x0800_0000),
    ("CLONE_NEWUSER", 0x1000_0000),
    ("CLONE_NEWPID", 0x2000_0000),
    ("CLONE_NEWNET", 0x4000_0000),
];

/// The errno `clone3` returns, so that libc falls back to `clone`.
const ENOSYS: u32 = 38;

/// The filter, for the spec's `linux.seccomp`.
pub fn profile() -> LinuxSeccomp {
    let mut denied = LinuxSyscall::default();
    denied.set_names(DENIED.iter().map(|s| (*s).to_owned()).collect());
    denied.set_action(LinuxSeccompAction::ScmpActErrno);
    denied.set_errno_ret(Some(libc::EPERM as u32));

    // One condition per flag, all on the flags argument: libcontainer (as runc) adds each as a
    // rule of its own, so any one of them set refuses the call. The mask and the value are the
    // same, which reads the same whichever of the two a runtime takes for the mask.
    let mut new_namespace = LinuxSyscall::default();
    new_namespace.set_names(vec!["clone".to_owned()]);
    new_namespace.set_action(LinuxSeccompAction::ScmpActErrno);
    new_namespace.set_errno_ret(Some(libc::EPERM as u32));
    new_namespace.set_args(Some(
        NAMESPACE_FLAGS
            .iter()
            .map(|&(_, flag)| {
                LinuxSeccompArgBuilder::default()
                    .index(clone_flags_index())
                    .value(flag)
                    .value_two(flag)
                    .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                    .build()
                    .expect("every field of the argument is set")
            })
            .collect(),
    ));

    let mut clone3 = LinuxSyscall::default();
    clone3.set_names(vec!["clone3".to_owned()]);
    clone3.set_action(LinuxSeccompAction::ScmpActErrno);
    clone3.set_errno_ret(Some(ENOSYS));

    let mut seccomp = LinuxSeccomp::default();
    seccomp.set_default_action(LinuxSeccompAction::ScmpActAllow);
    seccomp.set_architectures(Some(architectures()));
    seccomp.set_syscalls(Some(vec![denied, new_namespace, clone3]));
    seccomp
}

/// The native architecture and the ones its kernel also runs (32-bit programs), so that no
/// call escapes the filter by entering through another ABI.
fn architectures() -> Vec<Arch> {
    if cfg!(target_arch = "aarch64") {
        vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]
    } else if cfg!(target_arch = "x86_64") {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    } else {
        vec![Arch::ScmpArchNative]
    }
}

/// Which argument of `clone` holds its flags: the first, except on s390x (the second).
fn clone_flags_index() -> usize {
    if cfg!(target_arch = "s390x") { 1 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_allows_by_default_and_refuses_the_listed_calls() {
        let p = profile();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActAllow);
        let syscalls = p.syscalls().as_ref().unwrap();
        let denied = &syscalls[0];
        assert_eq!(denied.action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(denied.errno_ret(), Some(libc::EPERM as u32));
        for name in [
            "unshare",
            "setns",
            "mount",
            "bpf",
            "keyctl",
            "io_uring_setup",
        ] {
            assert!(denied.names().iter().any(|n| n == name), "{name} allowed");
        }
        for name in ["read", "clone", "ptrace", "personality", "execve"] {
            assert!(!denied.names().iter().any(|n| n == name), "{name} refused");
        }
        let mut sorted = DENIED.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), DENIED.len(), "a name listed twice");
    }

    #[test]
    fn clone_is_refused_only_with_a_namespace_flag_and_clone3_falls_back() {
        let p = profile();
        let syscalls = p.syscalls().as_ref().unwrap();
        let clone = &syscalls[1];
        assert_eq!(clone.names(), &["clone".to_owned()]);
        let args = clone.args().as_ref().unwrap();
        assert_eq!(args.len(), NAMESPACE_FLAGS.len());
        let mut all = 0;
        for (arg, &(name, flag)) in args.iter().zip(NAMESPACE_FLAGS) {
            assert_eq!(arg.op(), LinuxSeccompOperator::ScmpCmpMaskedEq, "{name}");
            assert_eq!((arg.value(), arg.value_two()), (flag, Some(flag)), "{name}");
            assert_eq!(flag.count_ones(), 1, "{name}");
            all |= flag;
        }
        // A thread, a fork and a vfork carry none of them.
        let (thread, fork, vfork) = (0x003d_0f00_u64, 0x0120_0011_u64, 0x0000_4111_u64);
        for flags in [thread, fork, vfork] {
            assert_eq!(flags & all, 0, "{flags:#x}");
        }
        let clone3 = &syscalls[2];
        assert_eq!(clone3.names(), &["clone3".to_owned()]);
        assert_eq!(clone3.errno_ret(), Some(ENOSYS));
    }

    #[test]
    fn every_abi_of_the_host_is_filtered() {
        let arches = profile().architectures().clone().unwrap();
        if cfg!(target_arch = "x86_64") {
            assert!(arches.contains(&Arch::ScmpArchX86), "{arches:?}");
            assert!(arches.contains(&Arch::ScmpArchX32), "{arches:?}");
        }
        assert!(!arches.is_empty());
    }
}
