//! The activation types locograph's own elementwise loops run on (f32, f64, and bf16 under
//! mixed precision), each with the arithmetic its loops compute in: f32 for f32 and bf16, f64
//! for f64.
//!
//! The bf16 conversions are written out so that the compiler vectorises them: bf16 → f32 is a
//! 16-bit shift and f32 → bf16 an add and a shift, where `half`'s generic conversions through
//! `WithDType` are per-element calls (batch norm ran 1.4× slower in bf16 than casting to f32
//! around it).

use std::ops::{Add, Mul, Sub};

use candle_core::WithDType;

/// The arithmetic of an activation type's loops: f32 or f64.
pub(crate) trait Lane:
    Copy + Send + Sync + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + PartialOrd
{
    const ZERO: Self;
    fn of(v: f64) -> Self;
    fn wide(self) -> f64;
    /// `max(self, 0)`, NaN to 0 (as candle's ReLU).
    #[inline(always)]
    fn relu(self) -> Self {
        if self > Self::ZERO {
            self
        } else {
            Self::ZERO
        }
    }
}

impl Lane for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn wide(self) -> f64 {
        self as f64
    }
}

impl Lane for f64 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn wide(self) -> f64 {
        self
    }
}

pub(crate) trait Act: WithDType {
    /// What this type's elementwise arithmetic runs in; a value is rounded to the type once.
    type W: Lane;
    fn lane(self) -> Self::W;
    fn from_lane(v: Self::W) -> Self;

    #[inline(always)]
    fn wide(self) -> f64 {
        self.lane().wide()
    }
    #[inline(always)]
    fn narrow(v: f64) -> Self {
        Self::from_lane(Self::W::of(v))
    }
    /// `max(self + other, 0)`, a block tail's sum and ReLU, rounded once.
    #[inline(always)]
    fn add_relu(self, other: Self) -> Self {
        Self::from_lane((self.lane() + other.lane()).relu())
    }
    #[inline(always)]
    fn positive(self) -> bool {
        self.lane() > Self::W::ZERO
    }
}

impl Act for f32 {
    type W = f32;
    #[inline(always)]
    fn lane(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_lane(v: f32) -> Self {
        v
    }
}

impl Act for f64 {
    type W = f64;
    #[inline(always)]
    fn lane(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_lane(v: f64) -> Self {
        v
    }
}

impl Act for half::bf16 {
    type W = f32;
    #[inline(always)]
    fn lane(self) -> f32 {
        bf16_to_f32(self)
    }
    #[inline(always)]
    fn from_lane(v: f32) -> Self {
        f32_to_bf16(v)
    }
}

/// bf16's bits as the f32 they are the top half of.
#[inline(always)]
pub(crate) fn bf16_to_f32(v: half::bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// f32 to bf16, rounding to nearest even (as `half::bf16::from_f32`, NaN kept a NaN).
#[inline(always)]
pub(crate) fn f32_to_bf16(v: f32) -> half::bf16 {
    let b = v.to_bits();
    if v.is_nan() {
        return half::bf16::NAN;
    }
    half::bf16::from_bits((b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The own bf16 conversions equal `half`'s, bit for bit: ties to even, subnormals,
    /// infinities, the largest finite values, NaN.
    #[test]
    fn bf16_conversions_equal_half() {
        let mut values: Vec<f32> = (0..200_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))).collect();
        values.extend([0.0, -0.0, 1.0, 1.0 + f32::EPSILON, f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY]);
        values.extend([f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000), f32::MIN_POSITIVE / 3.0]);
        for v in values {
            let (ours, theirs) = (f32_to_bf16(v), half::bf16::from_f32(v));
            if v.is_nan() {
                assert!(ours.is_nan(), "{v:e}");
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{v:e}");
            }
            assert_eq!(bf16_to_f32(theirs).to_bits(), theirs.to_f32().to_bits());
        }
    }

    /// A block tail's sum and ReLU: zero for a negative sum, a negative zero and a NaN, the sum
    /// rounded once otherwise.
    #[test]
    fn add_relu_rounds_once_and_clamps() {
        let b = half::bf16::from_f32;
        assert_eq!(b(1.0).add_relu(b(2.0)), b(3.0));
        assert_eq!(b(-1.0).add_relu(b(0.5)).to_bits(), 0);
        assert_eq!(b(-0.0).add_relu(b(0.0)).to_bits(), 0);
        assert_eq!(half::bf16::NAN.add_relu(b(1.0)).to_bits(), 0);
        assert_eq!(f32::NAN.add_relu(1.0).to_bits(), 0);
        // 1 + 2^-8 is a tie in bf16 (8 bits of mantissa): to even, 1.
        assert_eq!(b(1.0).add_relu(b(1.0 / 256.0)), b(1.0));
    }
}
