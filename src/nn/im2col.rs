//! Convolution as matrix products on raw NCHW slices: im2col + gemm for the forward and the
//! kernel gradient, gemm + col2im for the input gradient (Caffe's formulation).
//!
//! Why not candle's conv2d: on CPU it runs one small gemm per image and 512-pixel tile, behind a
//! single-threaded NCHW→NHWC copy of the whole batch (54 % of a training step in the profile,
//! docs/performance.md), and its backward is a naive `conv_transpose2d` loop.
//!
//! Here the batch is cut into chunks of whole images (about [`COLUMNS_PER_CHUNK`] output pixels
//! each). A chunk is one task on the rayon pool: it unfolds its images into a column matrix
//! `col[C·kh·kw, nb·OH·OW]` and runs single-threaded gemms on it, one per group. No barrier
//! inside a convolution, one gemm large enough to reach gemm's peak, and strides, padding and
//! odd sizes are handled once, in the unfolding (col2im simply never writes the input rows a
//! strided forward did not read).

use candle_core::WithDType;
use gemm::Parallelism;
use rayon::prelude::*;

/// Output pixels per chunk: large enough for an efficient gemm (the shared dimension is then
/// `C·kh·kw` by ≥ 2048), small enough that a chunk's column matrix stays a few MB.
const COLUMNS_PER_CHUNK: usize = 2048;

/// Two per-thread scratch buffers (a chunk's column matrix and its output or output-gradient
/// matrix), kept between calls. Fresh vectors cost a zero-fill and, above glibc's 32 MB mmap
/// threshold (ResNet-18's res5 columns are 38 MB), page faults on every touch: 7 % and 4 % of
/// a step in the profile. Every element is written before it is read (im2col fills all of
/// `col`, gemm runs with `read_dst = false`), so stale contents never leak into a result.
fn with_scratch<T: WithDType, R>(col_len: usize, mat_len: usize, f: impl FnOnce(&mut [T], &mut [T]) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<(Vec<u64>, Vec<u64>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
    // u64 storage: aligned for every element type candle has (≤ 8 bytes), and any bit pattern
    // is a valid value of each of them.
    fn view<T>(buf: &mut Vec<u64>, len: usize) -> &mut [T] {
        let words = (len * std::mem::size_of::<T>()).div_ceil(8);
        if buf.len() < words {
            buf.resize(words, 0);
        }
        // SAFETY: `buf` holds at least `len` elements of T (size checked above), u64 alignment
        // covers T's, T is a plain numeric type for which every bit pattern is valid, and the
        // returned slice borrows `buf` mutably.
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<T>(), len) }
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let (a, b) = &mut *s;
        f(view(a, col_len), view(b, mat_len))
    })
}

/// The shape of one 2-D convolution, the same for both kernel sets (`crate::dnnl`'s and these).
pub use crate::dnnl::ConvGeometry as Geometry;

impl Geometry {
    /// Rows of one group's column matrix: `C/groups · kh · kw`.
    fn group_rows(&self) -> usize {
        self.c / self.groups * self.kh * self.kw
    }

    /// Images per chunk: about [`COLUMNS_PER_CHUNK`] output pixels, but at least two chunks per
    /// thread where the batch allows it, so that both cores stay busy on small batches.
    fn images_per_chunk(&self) -> usize {
        let pixels = self.out_h() * self.out_w();
        let by_size = (COLUMNS_PER_CHUNK / pixels.max(1)).max(1);
        let by_balance = self.n.div_ceil(2 * rayon::current_num_threads()).max(1);
        by_size.min(by_balance)
    }

    /// For kernel offset `j` along an axis of `size` inputs with `out` outputs: the outputs
    /// `[first, end)` whose input `o·s + j − p` lies inside `[0, size)`.
    fn valid(&self, j: usize, size: usize, out: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        let first = if p > j { (p - j).div_ceil(s) } else { 0 };
        // Largest o with o·s + j − p ≤ size − 1.
        let end = if size + p > j { ((size - 1 + p - j) / s + 1).min(out) } else { 0 };
        (first.min(end), end)
    }
}

/// Unfolds images `x[nb, C, H, W]` into `col[C·kh·kw, nb·OH·OW]`: row `(c, i, j)`, column
/// `(b, y, x)` holds `x[b, c, y·s + i − p, x·s + j − p]`, zero in the padding.
fn im2col<T: WithDType>(x: &[T], nb: usize, g: &Geometry, col: &mut [T]) {
    let (oh, ow) = (g.out_h(), g.out_w());
    let (s, p) = (g.stride, g.padding);
    let cols = nb * oh * ow;
    for c in 0..g.c {
        for i in 0..g.kh {
            let (y0, y1) = g.valid(i, g.h, oh);
            for j in 0..g.kw {
                let (x0, x1) = g.valid(j, g.w, ow);
                let row = &mut col[((c * g.kh + i) * g.kw + j) * cols..][..cols];
                for b in 0..nb {
                    let img = &x[(b * g.c + c) * g.h * g.w..][..g.h * g.w];
                    let dst = &mut row[b * oh * ow..][..oh * ow];
                    dst[..y0 * ow].fill(T::zero());
                    dst[y1 * ow..].fill(T::zero());
                    for y in y0..y1 {
                        let src = &img[(y * s + i - p) * g.w..][..g.w];
                        let d = &mut dst[y * ow..][..ow];
                        d[..x0].fill(T::zero());
                        d[x1..].fill(T::zero());
                        if s == 1 {
                            d[x0..x1].copy_from_slice(&src[x0 + j - p..x1 + j - p]);
                        } else {
                            for (ox, v) in (x0..x1).zip(&mut d[x0..x1]) {
                                *v = src[ox * s + j - p];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds `col[C·kh·kw, nb·OH·OW]` back into `dx[nb, C, H, W]`.
fn col2im_add<T: WithDType>(col: &[T], nb: usize, g: &Geometry, dx: &mut [T]) {
    let (oh, ow) = (g.out_h(), g.out_w());
    let (s, p) = (g.stride, g.padding);
    let cols = nb * oh * ow;
    for c in 0..g.c {
        for i in 0..g.kh {
            let (y0, y1) = g.valid(i, g.h, oh);
            for j in 0..g.kw {
                let (x0, x1) = g.valid(j, g.w, ow);
                let row = &col[((c * g.kh + i) * g.kw + j) * cols..][..cols];
                for b in 0..nb {
                    let img = &mut dx[(b * g.c + c) * g.h * g.w..][..g.h * g.w];
                    let src = &row[b * oh * ow..][..oh * ow];
                    for y in y0..y1 {
                        let d = &mut img[(y * s + i - p) * g.w..][..g.w];
                        let r = &src[y * ow..][..ow];
                        for ox in x0..x1 {
                            d[ox * s + j - p] += r[ox];
                        }
                    }
                }
            }
        }
    }
}

/// `dst[m, n] = (accumulate ? dst : 0) + lhs[m, k] · rhs[k, n]`, single-threaded (the chunks are
/// the parallelism). Strides are (row, column) in elements.
#[allow(clippy::too_many_arguments)]
fn matmul<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    // Bounds the raw-pointer reads and writes below against the slices.
    assert!((m - 1) * dst_rs + n <= dst.len(), "matmul: dst too small");
    if k > 0 {
        assert!((m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len(), "matmul: lhs too small");
        assert!((k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len(), "matmul: rhs too small");
    }
    // SAFETY: every index the strides reach was checked above to lie inside its slice; `dst`
    // is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// `y = x ⋆ w`.
///
/// # Shapes
/// - `x`: `[N, C, H, W]`, `w`: `[O, C/groups, kh, kw]`, both contiguous → `[N, O, OH, OW]`.
pub fn forward<T: WithDType>(x: &[T], w: &[T], g: &Geometry) -> Vec<T> {
    let (pixels, nb) = (g.out_h() * g.out_w(), g.images_per_chunk());
    let (og, kg) = (g.o / g.groups, g.group_rows());
    let mut y = vec![T::zero(); g.n * g.o * pixels];
    y.par_chunks_mut(nb * g.o * pixels).zip(x.par_chunks(nb * g.c * g.h * g.w)).for_each(|(y, x)| {
        let nb = x.len() / (g.c * g.h * g.w);
        let cols = nb * pixels;
        with_scratch(g.groups * kg * cols, g.o * cols, |col: &mut [T], out: &mut [T]| {
            im2col(x, nb, g, col);
            // [O, nb·OH·OW] in gemm's layout, then moved image by image into NCHW.
            for grp in 0..g.groups {
                matmul(
                    (og, cols, kg),
                    &mut out[grp * og * cols..],
                    cols,
                    false,
                    &w[grp * og * kg..],
                    (kg, 1),
                    &col[grp * kg * cols..],
                    (cols, 1),
                );
            }
            for b in 0..nb {
                for o in 0..g.o {
                    y[(b * g.o + o) * pixels..][..pixels].copy_from_slice(&out[o * cols + b * pixels..][..pixels]);
                }
            }
        });
    });
    y
}

/// Raw pointer to `dx`, shared by chunks that write disjoint images.
#[derive(Clone, Copy)]
struct Disjoint<T>(*mut T);
// SAFETY: each chunk writes only its own images' range of the buffer (see `backward`).
unsafe impl<T> Send for Disjoint<T> {}
unsafe impl<T> Sync for Disjoint<T> {}

/// `(∂L/∂x, ∂L/∂w)` from the output gradient `dy`, each only when asked for.
///
/// # Shapes
/// - `x`: `[N, C, H, W]`, `w`: `[O, C/groups, kh, kw]`, `dy`: `[N, O, OH, OW]`, all contiguous
///   → `dx` like `x`, `dw` like `w`.
pub fn backward<T: WithDType>(
    x: &[T],
    w: &[T],
    dy: &[T],
    g: &Geometry,
    need_dx: bool,
    need_dw: bool,
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let (pixels, nb) = (g.out_h() * g.out_w(), g.images_per_chunk());
    let (og, kg) = (g.o / g.groups, g.group_rows());
    let image = g.c * g.h * g.w;
    let mut dx = if need_dx { vec![T::zero(); g.n * image] } else { Vec::new() };
    let dx_ptr = Disjoint(dx.as_mut_ptr());
    let chunks = g.n.div_ceil(nb);
    // The kernel gradient sums over all images. For a result that does not depend on how rayon
    // schedules the work (bit-exact resume), each part sums a fixed contiguous run of chunks in
    // order, and the parts are added in order.
    let parts = chunks.min(4 * rayon::current_num_threads()).max(1);
    let partials: Vec<Vec<T>> = (0..parts)
        .into_par_iter()
        .map(|part| {
            let mut dw = if need_dw { vec![T::zero(); g.o * kg] } else { Vec::new() };
            for chunk in part * chunks / parts..(part + 1) * chunks / parts {
                let first = chunk * nb;
                let nb = nb.min(g.n - first);
                let cols = nb * pixels;
                // dy's images as one matrix [O, nb·OH·OW].
                with_scratch(g.groups * kg * cols, g.o * cols, |col: &mut [T], gy: &mut [T]| {
                    for b in 0..nb {
                        for o in 0..g.o {
                            gy[o * cols + b * pixels..][..pixels]
                                .copy_from_slice(&dy[((first + b) * g.o + o) * pixels..][..pixels]);
                        }
                    }
                    if need_dw {
                        im2col(&x[first * image..][..nb * image], nb, g, col);
                        // dw_g[O/g, kg] += gy_g[O/g, cols] · col_gᵀ
                        for grp in 0..g.groups {
                            matmul(
                                (og, kg, cols),
                                &mut dw[grp * og * kg..],
                                kg,
                                true,
                                &gy[grp * og * cols..],
                                (cols, 1),
                                &col[grp * kg * cols..],
                                (1, cols),
                            );
                        }
                    }
                    if need_dx {
                        // col_g[kg, cols] = w_gᵀ · gy_g, then folded back into the images.
                        for grp in 0..g.groups {
                            matmul(
                                (kg, cols, og),
                                &mut col[grp * kg * cols..],
                                cols,
                                false,
                                &w[grp * og * kg..],
                                (1, kg),
                                &gy[grp * og * cols..],
                                (cols, 1),
                            );
                        }
                        // SAFETY: chunks cover disjoint image ranges [first, first + nb) of `dx`,
                        // which outlives this parallel loop and is not otherwise touched during it.
                        let dx = unsafe { std::slice::from_raw_parts_mut({ dx_ptr }.0.add(first * image), nb * image) };
                        col2im_add(col, nb, g, dx);
                    }
                });
            }
            dw
        })
        .collect();
    let mut parts = partials.into_iter();
    let mut dw = parts.next().unwrap_or_default();
    for p in parts {
        dw.iter_mut().zip(&p).for_each(|(a, b)| *a += *b);
    }
    (need_dx.then_some(dx), need_dw.then_some(dw))
}
