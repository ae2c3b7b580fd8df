//! The synchronisation primitives the CPU gate uses: `std`'s in normal builds, loom's when the
//! gate's model checks run (`RUSTFLAGS="--cfg lull_loom" cargo test -p lull-proxy --release gate`),
//! so loom explores the interleavings of the production code itself.

#[cfg(all(lull_loom, test))]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(not(all(lull_loom, test)))]
pub(crate) use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, taking the state over if a panicking holder poisoned it: the gate's state is
/// updated in small steps that each leave it consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
