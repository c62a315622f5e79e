//! The instruction set locograph's own elementwise loops run on, chosen once at run time.
//!
//! The crate is compiled for baseline x86-64 (SSE2), so that one binary runs on any x86-64
//! machine. The loops that take a step's time outside oneDNN (batch norm's statistics, forward
//! and backward, the residual links) are written as `#[inline(always)]` kernels and called
//! through [`run!`], which compiles each call site again for AVX-512 and for AVX2 and picks the
//! widest one this CPU has. On the narrow ResNet-18 bf16 step this is the difference that
//! `-C target-cpu=native` makes (docs/performance.md), without giving up portability.
//!
//! The results are the same bits on every level: Rust neither contracts `a·b + c` into a fused
//! multiply-add nor reorders floating-point operations, so wider vectors change only how many
//! lanes run at once. `tests/simd_levels.rs` checks it.
//!
//! `LOCOGRAPH_SIMD=baseline|avx2|avx512` caps the level (a level the CPU lacks is never used).

use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set level, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Baseline,
    Avx2,
    Avx512,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        [Level::Baseline, Level::Avx2, Level::Avx512].into_iter().find(|l| *l as u8 == v)
    }
}

/// `u8::MAX`: not chosen yet.
static CHOSEN: AtomicU8 = AtomicU8::new(u8::MAX);

/// The widest level this CPU supports.
pub fn supported() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") && avx2() {
            return Level::Avx512;
        }
        if avx2() {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The level [`run!`] uses: [`supported`], capped by `LOCOGRAPH_SIMD` or [`set_level`].
pub fn level() -> Level {
    if let Some(l) = Level::from_u8(CHOSEN.load(Ordering::Relaxed)) {
        return l;
    }
    let cap = match std::env::var("LOCOGRAPH_SIMD").as_deref() {
        Ok("baseline") => Level::Baseline,
        Ok("avx2") => Level::Avx2,
        _ => Level::Avx512,
    };
    let l = supported().min(cap);
    CHOSEN.store(l as u8, Ordering::Relaxed);
    l
}

/// Caps the level for the rest of the process (never above [`supported`]); returns the level
/// now in use. For benchmarks and the test that compares levels.
pub fn set_level(cap: Level) -> Level {
    let l = supported().min(cap);
    CHOSEN.store(l as u8, Ordering::Relaxed);
    l
}

/// Evaluates an expression compiled for the current [`level`]: `simd::run!(kernel(a, b))`.
/// The expression should call `#[inline(always)]` kernels: what is inlined into it is compiled
/// for the level, a call that is not inlined runs as compiled for baseline x86-64. Work it hands
/// to other threads (rayon) is not covered: use `run!` inside each task.
///
/// A macro rather than a function taking a closure: each level gets its own closure, called
/// from one place only, which is what makes LLVM inline it (and so the kernels) into the
/// level's `#[target_feature]` function. One closure shared by three call sites is too big to
/// inline and would run as baseline code on every level.
macro_rules! run {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        let value = match $crate::simd::level() {
            $crate::simd::Level::Avx512 => {
                let f = || $body;
                // SAFETY: `level` only returns a level whose features this CPU has.
                unsafe { $crate::simd::x86::avx512(f) }
            }
            $crate::simd::Level::Avx2 => {
                let f = || $body;
                // SAFETY: as above.
                unsafe { $crate::simd::x86::avx2(f) }
            }
            $crate::simd::Level::Baseline => $body,
        };
        #[cfg(not(target_arch = "x86_64"))]
        let value = $body;
        value
    }};
}
pub(crate) use run;

#[doc(hidden)]
#[cfg(target_arch = "x86_64")]
pub mod x86 {
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL/DQ, AVX2 and FMA ([`super::supported`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,avx,fma,bmi1,bmi2,lzcnt,popcnt,f16c")]
    pub unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,avx,fma,bmi1,bmi2,lzcnt,popcnt,f16c")]
    pub unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_never_exceeds_the_cpu() {
        assert!(level() <= supported());
        for l in [Level::Baseline, Level::Avx2, Level::Avx512] {
            assert_eq!(Level::from_u8(l as u8), Some(l));
        }
        assert_eq!(Level::from_u8(u8::MAX), None);
    }
}
