//! Raw CPU slices of tensors and storages, for the custom ops (`conv_op`, `batch_norm_op`)
//! that run their own loops instead of composing candle ops.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Storage, Tensor, WithDType};

/// Calls `f` with a CPU tensor's elements as one contiguous slice (copied only when strided).
pub fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*storage else { candle_core::bail!("expected a CPU tensor, got {:?}", t.device()) };
    let Some((a, b)) = layout.contiguous_offsets() else { candle_core::bail!("tensor is not contiguous") };
    Ok(f(&s.as_slice::<T>()?[a..b]))
}

/// `(storage, layout)` as a contiguous slice, borrowed when it already is one.
pub fn storage_slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<Cow<'a, [T]>> {
    if let Some((a, b)) = l.contiguous_offsets() {
        return Ok(Cow::Borrowed(&s.as_slice::<T>()?[a..b]));
    }
    // A strided view (a transposed or narrowed tensor): candle gathers it.
    let mut dst = match s {
        CpuStorage::F32(_) => CpuStorage::F32(vec![0.; l.shape().elem_count()]),
        CpuStorage::F64(_) => CpuStorage::F64(vec![0.; l.shape().elem_count()]),
        CpuStorage::BF16(_) => CpuStorage::BF16(vec![half::bf16::ZERO; l.shape().elem_count()]),
        _ => candle_core::bail!("unsupported dtype {:?}", s.dtype()),
    };
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok(Cow::Owned(dst.as_slice::<T>()?.to_vec()))
}
