//! The allocation policy of a training process, and a counting allocator that measures it.
//!
//! A training step allocates and frees the same large activation and gradient buffers every
//! step. glibc serves any block above its mmap threshold (at most 32 MB; ResNet-18 at 32² and
//! batch 256 has 67 MB activations) with a fresh `mmap`, and returns it with `munmap` when
//! freed, so every step page-faults all of its memory in again; in a VM each fault is costly.
//! Measured (docs/performance.md): 35 % of the CPU time of a ResNet-18 step was the kernel's,
//! and PyTorch in the same process pays the same. Keeping freed blocks in the heap instead
//! makes the next step reuse them: ResNet-18 b256 went from 22.5 to 13.9 s/step, peak RSS
//! +1 % (the heap's high-water mark is what the step needed anyway).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// Peak resident set size of this process in bytes (`VmHWM` in `/proc/self/status`), or
/// `None` where that is not available. Monotonic over the process's life: measure one
/// configuration per process.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// The system allocator, counting live bytes and their high-water mark: every candle CPU
/// tensor is a `Vec`, so a binary that installs it (`#[global_allocator] static A:
/// CountingAlloc = CountingAlloc;`, the memory benchmark and test) sees every activation,
/// gradient and scratch buffer. [`live_bytes`], [`peak_bytes`] and [`reset_peak`] read it.
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
            grew(new);
        }
        q
    }
}

/// Bytes allocated through [`CountingAlloc`] and not yet freed (0 where it is not installed).
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The high-water mark of [`live_bytes`] since the last [`reset_peak`].
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new high-water mark at what is live now, and returns that and the old mark.
pub fn reset_peak() -> (usize, usize) {
    let live = LIVE.load(Ordering::Relaxed);
    (live, PEAK.swap(live, Ordering::Relaxed))
}
