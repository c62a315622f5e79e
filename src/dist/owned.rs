//! Owned copies of typed slices: the messages and contributions that in-process groups
//! ([`super::Solo`], [`super::LocalGroup`]) hold between a send and its receive.

use super::{DistError, Result, Slice, SliceMut};

#[derive(Clone, Debug)]
pub(crate) enum Owned {
    F32(Vec<f32>),
    F64(Vec<f64>),
    U64(Vec<u64>),
    U8(Vec<u8>),
}

impl Owned {
    pub fn copy_of(s: &Slice<'_>) -> Self {
        match s {
            Slice::F32(v) => Owned::F32(v.to_vec()),
            Slice::F64(v) => Owned::F64(v.to_vec()),
            Slice::U64(v) => Owned::U64(v.to_vec()),
            Slice::U8(v) => Owned::U8(v.to_vec()),
        }
    }

    pub fn copy_of_mut(s: &SliceMut<'_>) -> Self {
        match s {
            SliceMut::F32(v) => Owned::F32(v.to_vec()),
            SliceMut::F64(v) => Owned::F64(v.to_vec()),
            SliceMut::U64(v) => Owned::U64(v.to_vec()),
            SliceMut::U8(v) => Owned::U8(v.to_vec()),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Owned::F32(v) => v.len(),
            Owned::F64(v) => v.len(),
            Owned::U64(v) => v.len(),
            Owned::U8(v) => v.len(),
        }
    }

    fn dtype(&self) -> &'static str {
        match self {
            Owned::F32(_) => "f32",
            Owned::F64(_) => "f64",
            Owned::U64(_) => "u64",
            Owned::U8(_) => "u8",
        }
    }

    /// Copies `self[from..from + dst.len()]` into `dst`; the types must agree.
    pub fn write_into(&self, dst: &mut SliceMut<'_>, from: usize, op: &'static str) -> Result<()> {
        let n = dst.len();
        if from + n > self.len() {
            return Err(DistError::Shape {
                op,
                detail: format!("{} elements wanted from a message of {}", from + n, self.len()),
            });
        }
        match (self, dst) {
            (Owned::F32(s), SliceMut::F32(d)) => d.copy_from_slice(&s[from..from + n]),
            (Owned::F64(s), SliceMut::F64(d)) => d.copy_from_slice(&s[from..from + n]),
            (Owned::U64(s), SliceMut::U64(d)) => d.copy_from_slice(&s[from..from + n]),
            (Owned::U8(s), SliceMut::U8(d)) => d.copy_from_slice(&s[from..from + n]),
            (s, d) => {
                return Err(DistError::Shape {
                    op,
                    detail: format!("{} message into a {} buffer", s.dtype(), d.dtype()),
                })
            }
        }
        Ok(())
    }

    /// `dst += self` element-wise (same type and length).
    pub fn add_into(&self, dst: &mut SliceMut<'_>, op: &'static str) -> Result<()> {
        if self.len() != dst.len() {
            return Err(DistError::Shape {
                op,
                detail: format!("{} elements here, {} on another rank", dst.len(), self.len()),
            });
        }
        match (self, dst) {
            (Owned::F32(s), SliceMut::F32(d)) => d.iter_mut().zip(s).for_each(|(d, s)| *d += s),
            (Owned::F64(s), SliceMut::F64(d)) => d.iter_mut().zip(s).for_each(|(d, s)| *d += s),
            (Owned::U64(s), SliceMut::U64(d)) => d.iter_mut().zip(s).for_each(|(d, s)| *d = d.wrapping_add(*s)),
            (Owned::U8(_), SliceMut::U8(_)) => return Err(DistError::Unsupported { op, dtype: "u8" }),
            (s, d) => {
                return Err(DistError::Shape {
                    op,
                    detail: format!("{} here, {} on another rank", d.dtype(), s.dtype()),
                })
            }
        }
        Ok(())
    }
}
