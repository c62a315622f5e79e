//! oneDNN's convolutions (forward, backward data, backward weights) in f32 and bf16: the
//! kernels PyTorch itself runs on CPU, JIT-compiled for the machine's ISA (AVX-512, AVX512-BF16,
//! AMX where present). A small C++ shim (`shim.cpp`, built by build.rs where oneDNN's headers are
//! installed) owns oneDNN's objects and caches one set of primitives per geometry; this module is
//! its safe face. Buffers cross the boundary as NCHW or NHWC activations ([`Orders`]) and
//! `[O, C/g, kh, kw]` kernels. A convolution with an NHWC output computes in NHWC; one with an
//! NCHW output reorders its buffers to the blocked layouts oneDNN picks for it.
//!
//! Where locograph was built without oneDNN, or `LOCOGRAPH_DNNL=0` is set, [`enabled`] is false
//! and `nn::conv_op` uses its own im2col kernels (f32); bf16 on CPU is then refused with the reason.

use std::sync::atomic::{AtomicU8, Ordering};

use rayon::prelude::*;

use crate::cpu_slice::{unwritten, written};

pub use crate::cpu_slice::Order;

/// The shape of one 2-D convolution (square stride and padding, dilation 1), as `nn::conv_op`
/// sees it; also the geometry of `nn::im2col`'s kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvGeometry {
    /// Images.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Output channels.
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl ConvGeometry {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.kh) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.kw) / self.stride + 1
    }
    fn x_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    fn w_len(&self) -> usize {
        self.o * (self.c / self.groups) * self.kh * self.kw
    }
    fn y_len(&self) -> usize {
        self.n * self.o * self.out_h() * self.out_w()
    }
    #[cfg_attr(not(dnnl), allow(dead_code))]
    fn raw(&self) -> [i64; 10] {
        [self.n, self.c, self.h, self.w, self.o, self.kh, self.kw, self.stride, self.padding, self.groups]
            .map(|v| v as i64)
    }
}

/// How a convolution's input and output activations lie in memory (the output gradient like
/// the output, the input gradient like the input).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Orders {
    pub x: Order,
    pub y: Order,
}

impl Orders {
    /// Both NCHW.
    pub const NCHW: Orders = Orders { x: Order::Nchw, y: Order::Nchw };

    /// The shim's code: the dtype's in bits 0–1, x's order in bit 2, y's in bit 3.
    #[cfg_attr(not(dnnl), allow(dead_code))]
    fn code<T: Element>(self) -> i32 {
        T::CODE | self.x.code() << 2 | self.y.code() << 3
    }
}

/// The three passes of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward = 0,
    BackwardData = 1,
    BackwardWeights = 2,
}

/// What can go wrong in a oneDNN call.
#[derive(Debug, thiserror::Error)]
pub enum DnnlError {
    #[error("locograph was built without oneDNN (install libdnnl-dev and rebuild)")]
    NotBuilt,
    #[error("oneDNN {pass:?} for {geometry:?}: {message}")]
    Failed { pass: Pass, geometry: ConvGeometry, message: String },
}

/// An element type oneDNN computes in here: f32, or bf16 (f32 accumulation inside oneDNN).
pub trait Element: Copy + Default + Send + Sync + 'static {
    /// The shim's code for the type.
    const CODE: i32;
    fn from_f32(v: f32) -> Self;
}
impl Element for f32 {
    const CODE: i32 = 0;
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl Element for half::bf16 {
    const CODE: i32 = 1;
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

/// 0: not decided yet, 1: on, 2: off.
static STATE: AtomicU8 = AtomicU8::new(0);

/// Whether convolutions run on oneDNN: built with it and not switched off, by [`set_enabled`] or
/// `LOCOGRAPH_DNNL=0` in the environment.
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = built() && std::env::var("LOCOGRAPH_DNNL").map_or(true, |v| v != "0");
            STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Switches oneDNN on or off for the whole process (on only where it was built). For tests and
/// benchmarks that compare both paths in one process.
pub fn set_enabled(on: bool) {
    STATE.store(if on && built() { 1 } else { 2 }, Ordering::Relaxed);
}

/// 0: not decided yet, 1: on, 2: off.
static CHANNELS_LAST: AtomicU8 = AtomicU8::new(0);

/// Whether convolutions on oneDNN write channels-last (NHWC) activations, which batch norm and
/// the links then keep through a stage: on unless `LOCOGRAPH_CHANNELS_LAST=0` or
/// [`set_channels_last`] switched it off. Off, every activation is NCHW and each convolution
/// reorders its input and output to oneDNN's blocked layouts and back.
pub fn channels_last() -> bool {
    match CHANNELS_LAST.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("LOCOGRAPH_CHANNELS_LAST").map_or(true, |v| v != "0");
            CHANNELS_LAST.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Switches [`channels_last`] for the whole process (tests and benchmarks comparing both).
pub fn set_channels_last(on: bool) {
    CHANNELS_LAST.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether this build has oneDNN.
pub const fn built() -> bool {
    cfg!(dnnl)
}

/// oneDNN's version `(major, minor, patch)`, where it was built in.
pub fn version() -> Option<(u32, u32, u32)> {
    #[cfg(dnnl)]
    {
        // SAFETY: no arguments; returns a plain integer.
        let v = unsafe { ffi::lg_dnnl_version() } as u32;
        Some((v / 10000, v / 100 % 100, v % 100))
    }
    #[cfg(not(dnnl))]
    None
}

/// `y = x ⋆ w`: `x` `[n, c, h, w]` in `orders.x`, `w` `[o, c/groups, kh, kw]`, `y` in `orders.y`.
pub fn conv_forward<T: Element>(g: &ConvGeometry, orders: Orders, x: &[T], w: &[T]) -> Result<Vec<T>, DnnlError> {
    check(g, x.len() == g.x_len() && w.len() == g.w_len());
    let (xi, yi) = (g.x_len() / g.n, g.y_len() / g.n);
    let mut y = unwritten::<T>(g.y_len());
    per_chunk(g, &mut y, yi, |part, first, out| {
        let x = &x[first * xi..][..part.n * xi];
        call(Pass::Forward, &part, orders.code::<T>(), x.as_ptr().cast(), w.as_ptr().cast(), out.as_mut_ptr().cast())
    })?;
    // SAFETY: the forward wrote every element of each chunk's destination, and the chunks
    // cover `y`.
    Ok(unsafe { written(y) })
}

/// The input gradient (in `orders.x`) from the output gradient `dy` (in `orders.y`) and the kernel `w`.
pub fn conv_backward_data<T: Element>(
    g: &ConvGeometry,
    orders: Orders,
    dy: &[T],
    w: &[T],
) -> Result<Vec<T>, DnnlError> {
    check(g, dy.len() == g.y_len() && w.len() == g.w_len());
    let (xi, yi) = (g.x_len() / g.n, g.y_len() / g.n);
    let mut dx = unwritten::<T>(g.x_len());
    per_chunk(g, &mut dx, xi, |part, first, out| {
        let dy = &dy[first * yi..][..part.n * yi];
        call(
            Pass::BackwardData,
            &part,
            orders.code::<T>(),
            dy.as_ptr().cast(),
            w.as_ptr().cast(),
            out.as_mut_ptr().cast(),
        )
    })?;
    // SAFETY: as in `conv_forward`, the backward-data pass writes its whole destination.
    Ok(unsafe { written(dx) })
}

/// The kernel gradient from the input `x` and the output gradient `dy`. Each chunk of images
/// gives an f32 kernel gradient (also for bf16 inputs: oneDNN accumulates in f32 and writes f32),
/// summed in chunk order, then rounded once to `T`.
pub fn conv_backward_weights<T: Element>(
    g: &ConvGeometry,
    orders: Orders,
    x: &[T],
    dy: &[T],
) -> Result<Vec<T>, DnnlError> {
    check(g, x.len() == g.x_len() && dy.len() == g.y_len());
    let (xi, yi, wl) = (g.x_len() / g.n, g.y_len() / g.n, g.w_len());
    let ranges = chunks(g.n);
    let mut partial = vec![0f32; wl * ranges.len()];
    per_range(
        g,
        &ranges,
        &mut partial,
        |_| wl,
        |part, first, out| {
            let (x, dy) = (&x[first * xi..][..part.n * xi], &dy[first * yi..][..part.n * yi]);
            call(
                Pass::BackwardWeights,
                &part,
                orders.code::<T>(),
                x.as_ptr().cast(),
                dy.as_ptr().cast(),
                out.as_mut_ptr().cast(),
            )
        },
    )?;
    let (sum, rest) = partial.split_at_mut(wl);
    for p in rest.chunks_exact(wl) {
        sum.iter_mut().zip(p).for_each(|(s, v)| *s += v);
    }
    Ok(sum.iter().map(|&v| T::from_f32(v)).collect())
}

/// Image ranges `(first, count)`, one per rayon thread (fewer for small batches), as even as
/// the batch allows. oneDNN runs single-threaded inside each: its OpenMP threads would otherwise
/// compete for the cores with rayon's, which run everything else (measured: a 2 MB reorder took
/// 5 ms in a training step and 0.04 ms alone).
fn chunks(n: usize) -> Vec<(usize, usize)> {
    let k = rayon::current_num_threads().clamp(1, n.max(1));
    let (base, extra) = (n / k, n % k);
    (0..k)
        .scan(0, |first, i| {
            let count = base + usize::from(i < extra);
            let r = (*first, count);
            *first += count;
            Some(r)
        })
        .collect()
}

/// Runs `f(part, first, out)` for each range of [`chunks`] on the rayon pool, `out` the range's
/// `per_image` elements per image of `buf`.
fn per_chunk<T: Send, F>(g: &ConvGeometry, buf: &mut [T], per_image: usize, f: F) -> Result<(), DnnlError>
where
    F: Fn(ConvGeometry, usize, &mut [T]) -> Result<(), DnnlError> + Sync,
{
    per_range(g, &chunks(g.n), buf, |count| count * per_image, f)
}

fn per_range<T: Send, F>(
    g: &ConvGeometry,
    ranges: &[(usize, usize)],
    mut buf: &mut [T],
    len: impl Fn(usize) -> usize,
    f: F,
) -> Result<(), DnnlError>
where
    F: Fn(ConvGeometry, usize, &mut [T]) -> Result<(), DnnlError> + Sync,
{
    let mut outs = Vec::with_capacity(ranges.len());
    for &(first, count) in ranges {
        let (out, rest) = std::mem::take(&mut buf).split_at_mut(len(count));
        outs.push((first, count, out));
        buf = rest;
    }
    outs.into_par_iter().try_for_each(|(first, count, out)| f(ConvGeometry { n: count, ..*g }, first, out))
}

/// The kernel oneDNN runs for one pass of `g` in `T`, e.g. `jit:avx512_core` or
/// `brgconv:avx512_core_amx_bf16`: the ISA is in its name.
pub fn conv_kernel<T: Element>(g: &ConvGeometry, orders: Orders, pass: Pass) -> Result<String, DnnlError> {
    #[cfg(dnnl)]
    {
        let mut buf = [0u8; 256];
        // SAFETY: `raw` is 10 i64s as the shim reads; `buf` is writable for its length and the
        // shim NUL-terminates within it.
        let rc = unsafe {
            ffi::lg_dnnl_conv_impl(
                g.raw().as_ptr(),
                orders.code::<T>(),
                pass as i32,
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if rc != 0 {
            return Err(failed(pass, g));
        }
        Ok(c_string(&buf))
    }
    #[cfg(not(dnnl))]
    {
        let _ = (g, orders, pass);
        Err(DnnlError::NotBuilt)
    }
}

/// Bytes one pass allocates beside its inputs and result: oneDNN's scratchpad and the blocked
/// copies of buffers whose layout differs from oneDNN's choice (for the memory guard).
pub fn conv_workspace_bytes<T: Element>(g: &ConvGeometry, orders: Orders, pass: Pass) -> Result<usize, DnnlError> {
    #[cfg(dnnl)]
    {
        let mut bytes = 0usize;
        // SAFETY: as in `conv_kernel`; `bytes` is a valid out-pointer.
        let rc = unsafe { ffi::lg_dnnl_conv_scratch(g.raw().as_ptr(), orders.code::<T>(), pass as i32, &mut bytes) };
        if rc != 0 {
            return Err(failed(pass, g));
        }
        Ok(bytes)
    }
    #[cfg(not(dnnl))]
    {
        let _ = (g, orders, pass);
        Err(DnnlError::NotBuilt)
    }
}

/// Seconds of one forward + backward data + backward weights of `g` in `T` with every buffer
/// already in oneDNN's chosen layout (no reorders), oneDNN's own threading on `threads` threads,
/// the best of `rounds`: the machine's convolution peak, for MFU figures.
pub fn conv_peak_seconds<T: Element>(g: &ConvGeometry, threads: usize, rounds: usize) -> Result<f64, DnnlError> {
    #[cfg(dnnl)]
    {
        let mut s = 0f64;
        // SAFETY: `raw` is the geometry; the shim allocates every buffer itself.
        let rc = unsafe { ffi::lg_dnnl_conv_peak(g.raw().as_ptr(), T::CODE, threads as i32, rounds as i32, &mut s) };
        if rc != 0 {
            return Err(failed(Pass::Forward, g));
        }
        Ok(s)
    }
    #[cfg(not(dnnl))]
    {
        let _ = (g, threads, rounds);
        Err(DnnlError::NotBuilt)
    }
}

fn check(g: &ConvGeometry, lengths_match: bool) {
    // The callers (nn::conv_op) size the buffers from the same geometry: a mismatch is a bug,
    // and oneDNN would read or write out of bounds.
    assert!(lengths_match, "dnnl: buffer lengths do not match {g:?}");
    assert!(
        g.groups > 0 && g.c.is_multiple_of(g.groups) && g.o.is_multiple_of(g.groups) && g.stride > 0,
        "dnnl: bad geometry {g:?}"
    );
}

fn call(pass: Pass, g: &ConvGeometry, code: i32, a: *const (), b: *const (), out: *mut ()) -> Result<(), DnnlError> {
    #[cfg(dnnl)]
    {
        let raw = g.raw();
        // One OpenMP thread: the callers parallelise over images on rayon's pool (`chunks`).
        // SAFETY: `raw` is the geometry the buffer lengths were checked against (`check`): the
        // shim reads exactly those lengths from `a` and `b` and writes that many to `out`.
        let rc = unsafe {
            ffi::lg_dnnl_set_threads(1);
            match pass {
                Pass::Forward => ffi::lg_dnnl_conv_forward(raw.as_ptr(), code, a.cast(), b.cast(), out.cast()),
                Pass::BackwardData => {
                    ffi::lg_dnnl_conv_backward_data(raw.as_ptr(), code, a.cast(), b.cast(), out.cast())
                }
                Pass::BackwardWeights => {
                    ffi::lg_dnnl_conv_backward_weights(raw.as_ptr(), code, a.cast(), b.cast(), out.cast())
                }
            }
        };
        if rc != 0 {
            return Err(failed(pass, g));
        }
        Ok(())
    }
    #[cfg(not(dnnl))]
    {
        let _ = (pass, g, code, a, b, out);
        Err(DnnlError::NotBuilt)
    }
}

#[cfg(dnnl)]
fn failed(pass: Pass, g: &ConvGeometry) -> DnnlError {
    let mut buf = [0u8; 512];
    // SAFETY: `buf` is writable for its length; the shim NUL-terminates within it.
    unsafe { ffi::lg_dnnl_last_error(buf.as_mut_ptr().cast(), buf.len()) };
    DnnlError::Failed { pass, geometry: *g, message: c_string(&buf) }
}

#[cfg(dnnl)]
fn c_string(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(dnnl)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};
    extern "C" {
        pub fn lg_dnnl_last_error(buf: *mut c_char, len: usize);
        pub fn lg_dnnl_version() -> c_int;
        pub fn lg_dnnl_set_threads(n: c_int);
        pub fn lg_dnnl_conv_impl(geom: *const i64, dtype: c_int, pass: c_int, buf: *mut c_char, len: usize) -> c_int;
        pub fn lg_dnnl_conv_peak(
            geom: *const i64,
            dtype: c_int,
            threads: c_int,
            rounds: c_int,
            seconds: *mut f64,
        ) -> c_int;
        pub fn lg_dnnl_conv_scratch(geom: *const i64, dtype: c_int, pass: c_int, bytes: *mut usize) -> c_int;
        pub fn lg_dnnl_conv_forward(
            geom: *const i64,
            dtype: c_int,
            x: *const c_void,
            w: *const c_void,
            y: *mut c_void,
        ) -> c_int;
        pub fn lg_dnnl_conv_backward_data(
            geom: *const i64,
            dtype: c_int,
            dy: *const c_void,
            w: *const c_void,
            dx: *mut c_void,
        ) -> c_int;
        pub fn lg_dnnl_conv_backward_weights(
            geom: *const i64,
            dtype: c_int,
            x: *const c_void,
            dy: *const c_void,
            dw: *mut c_void,
        ) -> c_int;
    }
}
