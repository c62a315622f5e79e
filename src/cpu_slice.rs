//! Raw CPU slices of tensors and storages, for the custom ops (`conv_op`, `batch_norm_op`)
//! that run their own loops instead of composing candle ops.

use std::borrow::Cow;
use std::mem::MaybeUninit;

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

/// How a 4-D activation's elements lie in memory; its shape is `[N, C, H, W]` either way.
///
/// On oneDNN's path convolutions write channels-last activations (NHWC: each pixel's channels
/// contiguous), which oneDNN's kernels read and write without the blocked-layout reorders an
/// NCHW tensor needs around every convolution, and batch norm and the links keep the order
/// they are given. candle sees an NHWC activation as a permuted view (strides `[HWC, 1, WC,
/// C]`), so every other op still computes on it correctly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Order {
    Nchw,
    Nhwc,
}

impl Order {
    /// The order of a dense `[N, C, H, W]` layout, `None` for any other (a narrowed or
    /// transposed view). Contiguous is NCHW, also where a size-1 dimension makes it NHWC too.
    pub fn of(l: &Layout) -> Option<Order> {
        let &[n, c, h, w] = l.dims() else { return None };
        if l.is_contiguous() {
            return Some(Order::Nchw);
        }
        let want = [h * w * c, 1, w * c, c];
        let dense = [n, c, h, w].iter().zip(l.stride()).zip(want).all(|((&d, &s), want)| d <= 1 || s == want);
        dense.then_some(Order::Nhwc)
    }

    /// The shim's code for the order (`dnnl`): 0 NCHW, 1 NHWC.
    pub fn code(self) -> i32 {
        match self {
            Order::Nchw => 0,
            Order::Nhwc => 1,
        }
    }
}

/// The elements of a dense layout as one slice in memory order, `None` where they are not.
fn dense_range(l: &Layout) -> Option<(usize, usize)> {
    Order::of(l).map(|_| (l.start_offset(), l.start_offset() + l.shape().elem_count()))
}

/// Calls `f` with an activation's elements in the order they lie in memory (NCHW or NHWC;
/// any other strided view is copied to NCHW first).
pub fn with_activation<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T], Order) -> R) -> Result<R> {
    match Order::of(t.layout()) {
        Some(order) => {
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cpu(s) = &*storage else { candle_core::bail!("expected a CPU tensor, got {:?}", t.device()) };
            let Some((a, b)) = dense_range(layout) else { candle_core::bail!("activation is not dense") };
            Ok(f(&s.as_slice::<T>()?[a..b], order))
        }
        None => with_slice(t, |s| f(s, Order::Nchw)),
    }
}

/// Calls `f` with an activation's elements in `order` (copied only when they are in the other).
pub fn with_activation_in<T: WithDType, R>(t: &Tensor, order: Order, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    match (Order::of(t.layout()), order) {
        (Some(have), _) if have == order => with_activation(t, |s, _| f(s)),
        (_, Order::Nchw) => with_slice(t, f),
        (_, Order::Nhwc) => with_slice(&t.permute((0, 2, 3, 1))?, f),
    }
}

/// A tensor of `shape` (`[n, c, h, w]` for NHWC; any for NCHW, i.e. contiguous) from
/// elements lying in `order`.
pub fn activation_from_vec<T: WithDType>(
    v: Vec<T>,
    shape: &candle_core::Shape,
    order: Order,
    device: &candle_core::Device,
) -> Result<Tensor> {
    match order {
        Order::Nchw => Tensor::from_vec(v, shape, device),
        Order::Nhwc => {
            let (n, c, h, w) = shape.dims4()?;
            Tensor::from_vec(v, (n, h, w, c), device)?.permute((0, 3, 1, 2))
        }
    }
}

/// `(storage, layout)` of an activation as a slice in memory order with that order, borrowed
/// when dense, else gathered to NCHW.
pub fn storage_activation<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<(Cow<'a, [T]>, Order)> {
    match dense_range(l) {
        Some((a, b)) => Ok((Cow::Borrowed(&s.as_slice::<T>()?[a..b]), Order::of(l).unwrap_or(Order::Nchw))),
        None => Ok((storage_slice(s, l)?, Order::Nchw)),
    }
}

/// A new leaf of `shape` owning `v`, whose elements lie in `order` (as [`activation_from_vec`];
/// no copy either way).
pub fn leaf_from_vec<T: WithDType>(
    v: Vec<T>,
    shape: &candle_core::Shape,
    order: Order,
    device: &candle_core::Device,
) -> Result<candle_core::Var> {
    match order {
        Order::Nchw => candle_core::Var::from_vec(v, shape, device),
        Order::Nhwc => {
            let (n, c, h, w) = shape.dims4()?;
            candle_core::Var::from_tensor(&Tensor::from_vec(v, (n, h, w, c), device)?.permuted_variable((0, 3, 1, 2))?)
        }
    }
}

/// `t` as a leaf: itself where it is a variable, else a copy of its values, in `t`'s memory
/// order where that is NHWC (`Var::from_tensor` would copy a channels-last view into NCHW, and
/// every consumer on oneDNN's path would reorder it back).
pub fn leaf_copy(t: &Tensor) -> Result<candle_core::Var> {
    match Order::of(t.layout()) {
        Some(Order::Nhwc) if !t.is_contiguous() && !t.is_variable() => {
            candle_core::Var::from_tensor(&t.permute((0, 2, 3, 1))?.copy()?.permuted_variable((0, 3, 1, 2))?)
        }
        _ => candle_core::Var::from_tensor(t),
    }
}

/// A buffer of `len` elements for a kernel that writes every one of them. Not zeroed first:
/// `vec![0; len]` is a `calloc`, a memset of heap memory that is reused every step, for bytes
/// the kernel overwrites at once (3 % of a bf16 training step, for the convolutions alone).
pub fn unwritten<T>(len: usize) -> Vec<MaybeUninit<T>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` needs no initialisation, and the capacity is `len`.
    unsafe { v.set_len(len) };
    v
}

/// The buffer of [`unwritten`] as the values written into it.
///
/// # Safety
/// Every element of `v` has been written.
pub unsafe fn written<T>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `MaybeUninit<T>` has `T`'s size and alignment, so the allocation is a valid
    // `Vec<T>` of the same length and capacity; the caller guarantees the elements are written.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<T>(), v.len(), v.capacity()) }
}
