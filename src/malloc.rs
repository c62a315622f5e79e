//! The allocation policy of a training process.
//!
//! A training step allocates and frees the same large activation and gradient buffers every
//! step. glibc serves any block above its mmap threshold (at most 32 MB; ResNet-18 at 32² and
//! batch 256 has 67 MB activations) with a fresh `mmap`, and returns it with `munmap` when
//! freed, so every step page-faults all of its memory in again; in a VM each fault is costly.
//! Measured (docs/performance.md): 35 % of the CPU time of a ResNet-18 step was the kernel's,
//! and PyTorch in the same process pays the same. Keeping freed blocks in the heap instead
//! makes the next step reuse them: ResNet-18 b256 went from 22.5 to 13.9 s/step, peak RSS
//! +1 % (the heap's high-water mark is what the step needed anyway).

/// Serves every allocation from the heap and keeps freed memory there (glibc: `M_MMAP_MAX = 0`,
/// `M_TRIM_THRESHOLD` at its maximum). Process-wide: call it once, first thing in `main`, and
/// only in a process that trains. `LOCOGRAPH_MALLOC=system` leaves glibc's defaults. Returns
/// whether the policy is in effect.
pub fn keep_freed_memory() -> bool {
    if std::env::var("LOCOGRAPH_MALLOC").is_ok_and(|v| v == "system") {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; both are documented glibc options and
    // take effect for later allocations (blocks already mapped are still unmapped correctly).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}
