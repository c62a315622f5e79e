//! Deterministic image operations: the functional half of the augmentations.
//!
//! Each op follows torchvision's tensor implementation (`torchvision.transforms.functional` on a
//! float image in `[0, 1]`), so values match torchvision run on `ToTensor()` output, not PIL's
//! uint8 path (which rounds to 8 bits after every op). The resize is PIL's antialiased bilinear
//! filter (`Image.resize(..., BILINEAR)`), which torchvision's `antialias=True` reproduces.
//! The random choices live in [`super::augment`].

/// An image as `C × H × W` `f32` planes, values in `[0, 1]` until normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// `data[(c * height + y) * width + x]`.
    pub data: Vec<f32>,
}

impl Image {
    /// An image from 8-bit CHW values (0..=255 → 0..=1, like `ToTensor`).
    pub fn from_u8_chw(channels: usize, height: usize, width: usize, bytes: &[u8]) -> Self {
        debug_assert_eq!(bytes.len(), channels * height * width);
        Image { channels, height, width, data: bytes.iter().map(|&b| f32::from(b) / 255.0).collect() }
    }

    /// An image from 8-bit interleaved HWC values (the layout of decoded PNG/JPEG).
    pub fn from_u8_hwc(channels: usize, height: usize, width: usize, bytes: &[u8]) -> Self {
        debug_assert_eq!(bytes.len(), channels * height * width);
        let mut data = vec![0.0; bytes.len()];
        for y in 0..height {
            for x in 0..width {
                for c in 0..channels {
                    data[(c * height + y) * width + x] = f32::from(bytes[(y * width + x) * channels + c]) / 255.0;
                }
            }
        }
        Image { channels, height, width, data }
    }

    fn plane(&self, c: usize) -> &[f32] {
        let n = self.height * self.width;
        &self.data[c * n..(c + 1) * n]
    }

    /// A grey image replicated to 3 channels; other images unchanged.
    pub fn to_rgb(self) -> Self {
        if self.channels != 1 {
            return self;
        }
        let mut data = Vec::with_capacity(self.data.len() * 3);
        for _ in 0..3 {
            data.extend_from_slice(&self.data);
        }
        Image { channels: 3, data, ..self }
    }
}

/// PIL's bilinear ("triangle") filter weights for resampling `in_size` pixels to `out_size`:
/// for each output pixel, the first input index and the normalised weights. When shrinking, the
/// filter is widened by the scale (antialiasing), as in PIL's `precompute_coeffs`.
fn resample_coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the bilinear filter's support is 1
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` truncation, then clamping, as PIL does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) / filterscale).abs();
                    (1.0 - t).max(0.0)
                })
                .collect();
            let sum: f64 = w.iter().sum();
            if sum != 0.0 {
                w.iter_mut().for_each(|v| *v /= sum);
            }
            (xmin, w)
        })
        .collect()
}

/// Resizes to `out_h × out_w` with PIL's antialiased bilinear filter (horizontal pass first, as
/// PIL; a pass whose size does not change is skipped, as PIL). Accumulates in `f64` as PIL does
/// for float images.
///
/// Reference: `PIL.Image.fromarray(plane, 'F').resize((out_w, out_h), Image.BILINEAR)`.
pub fn resize(img: &Image, out_h: usize, out_w: usize) -> Image {
    let (c, h, w) = (img.channels, img.height, img.width);
    let mut cur = img.clone();
    if out_w != w {
        let co = resample_coeffs(w, out_w);
        let mut data = vec![0.0f32; c * h * out_w];
        for (src, dst) in cur.data.chunks_exact(w).zip(data.chunks_exact_mut(out_w)) {
            for (d, (start, wts)) in dst.iter_mut().zip(&co) {
                let mut s = 0.0f64;
                for (v, wt) in src[*start..*start + wts.len()].iter().zip(wts) {
                    s += f64::from(*v) * wt;
                }
                *d = s as f32;
            }
        }
        cur = Image { channels: c, height: h, width: out_w, data };
    }
    if out_h != h {
        let cw = cur.width;
        let co = resample_coeffs(h, out_h);
        let mut data = vec![0.0f32; c * out_h * cw];
        let mut acc = vec![0.0f64; cw];
        for ch in 0..c {
            let src = cur.plane(ch);
            for (y, (start, wts)) in co.iter().enumerate() {
                // Whole rows at a time: a weighted sum of input rows (vectorises).
                acc.iter_mut().for_each(|a| *a = 0.0);
                for (k, wt) in wts.iter().enumerate() {
                    let row = &src[(start + k) * cw..(start + k + 1) * cw];
                    for (a, v) in acc.iter_mut().zip(row) {
                        *a += f64::from(*v) * wt;
                    }
                }
                let dst = &mut data[(ch * out_h + y) * cw..(ch * out_h + y + 1) * cw];
                for (d, a) in dst.iter_mut().zip(&acc) {
                    *d = *a as f32;
                }
            }
        }
        cur = Image { channels: c, height: out_h, width: cw, data };
    }
    cur
}

/// The `h × w` window whose top-left corner is `(top, left)`; the caller keeps it inside.
pub fn crop(img: &Image, top: usize, left: usize, h: usize, w: usize) -> Image {
    let mut data = Vec::with_capacity(img.channels * h * w);
    for ch in 0..img.channels {
        let p = img.plane(ch);
        for y in top..top + h {
            data.extend_from_slice(&p[y * img.width + left..y * img.width + left + w]);
        }
    }
    Image { channels: img.channels, height: h, width: w, data }
}

/// `F.resized_crop`: crop, then resize the crop (pixels outside the window are never read).
pub fn resized_crop(img: &Image, top: usize, left: usize, h: usize, w: usize, out_h: usize, out_w: usize) -> Image {
    resize(&crop(img, top, left, h, w), out_h, out_w)
}

/// torchvision's evaluation transform `Resize(size)` + `CenterCrop(size)`: the shorter side
/// becomes `size` (the longer one `int(size * long / short)`), then the centre square is kept
/// (top = Python's `round((h - size) / 2)`, half to even).
pub fn center_resize(img: &Image, size: usize) -> Image {
    let (h, w) = (img.height, img.width);
    if h == size && w == size {
        return img.clone();
    }
    let (rh, rw) = if h <= w { (size, (size * w / h).max(size)) } else { ((size * h / w).max(size), size) };
    let r = resize(img, rh, rw);
    // Python's round (half to even), as torchvision's `center_crop`: (5 - 4) / 2 → 0.
    let top = ((rh - size) as f64 / 2.0).round_ties_even() as usize;
    let left = ((rw - size) as f64 / 2.0).round_ties_even() as usize;
    crop(&r, top, left, size, size)
}

/// `F.hflip`.
pub fn hflip(img: &mut Image) {
    let w = img.width;
    for row in img.data.chunks_mut(w) {
        row.reverse();
    }
}

/// torchvision `_blend(img1, img2, ratio) = (ratio * img1 + (1 - ratio) * img2).clamp(0, 1)`
/// with `img2` a constant.
fn blend_const(x: &mut [f32], other: f32, ratio: f32) {
    for v in x {
        *v = (ratio * *v + (1.0 - ratio) * other).clamp(0.0, 1.0);
    }
}

/// `F.rgb_to_grayscale` weights (ITU-R 601-2 luma, as torchvision and PIL's "L" mode).
const LUMA: [f32; 3] = [0.2989, 0.587, 0.114];

/// Per-pixel luma of a 3-channel image; a 1-channel image is its own luma.
fn luma(img: &Image) -> Vec<f32> {
    if img.channels != 3 {
        return img.plane(0).to_vec();
    }
    let (r, g, b) = (img.plane(0), img.plane(1), img.plane(2));
    (0..r.len()).map(|i| LUMA[0] * r[i] + LUMA[1] * g[i] + LUMA[2] * b[i]).collect()
}

/// `F.adjust_brightness`: `_blend(img, zeros, f)`.
pub fn adjust_brightness(img: &mut Image, factor: f32) {
    blend_const(&mut img.data, 0.0, factor);
}

/// `F.adjust_contrast`: `_blend(img, mean(rgb_to_grayscale(img)), f)`; on one channel the mean
/// of the image itself.
pub fn adjust_contrast(img: &mut Image, factor: f32) {
    let l = luma(img);
    // torchvision takes the mean in float32; accumulate in f64 for an order-independent value.
    let mean = (l.iter().map(|&v| f64::from(v)).sum::<f64>() / l.len().max(1) as f64) as f32;
    blend_const(&mut img.data, mean, factor);
}

/// `F.adjust_saturation`: `_blend(img, rgb_to_grayscale(img), f)`; a no-op on one channel,
/// as in torchvision.
pub fn adjust_saturation(img: &mut Image, factor: f32) {
    if img.channels != 3 {
        return;
    }
    let l = luma(img);
    let n = l.len();
    for ch in 0..3 {
        for (v, &g) in img.data[ch * n..(ch + 1) * n].iter_mut().zip(&l) {
            *v = (factor * *v + (1.0 - factor) * g).clamp(0.0, 1.0);
        }
    }
}

/// `x % 1.0` (C's `fmodf(x, 1)`) without the libm call, which dominated `adjust_hue`:
/// `x - trunc(x)` is exact in floating point, so the value is the same.
#[inline]
fn frac(x: f32) -> f32 {
    x - x.trunc()
}

/// `F.adjust_hue`: shift the hue by `factor` (in turns, `[-0.5, 0.5]`) through torchvision's
/// `_rgb2hsv` / `_hsv2rgb`; a no-op on one channel.
pub fn adjust_hue(img: &mut Image, factor: f32) {
    if img.channels != 3 {
        return;
    }
    let n = img.height * img.width;
    for i in 0..n {
        let (r, g, b) = (img.data[i], img.data[n + i], img.data[2 * n + i]);
        let maxc = r.max(g).max(b);
        let minc = r.min(g).min(b);
        let eqc = maxc == minc;
        let cr = maxc - minc;
        let s = cr / if eqc { 1.0 } else { maxc };
        let div = if eqc { 1.0 } else { cr };
        let (rc, gc, bc) = ((maxc - r) / div, (maxc - g) / div, (maxc - b) / div);
        let h = if maxc == r {
            bc - gc
        } else if maxc == g {
            2.0 + rc - bc
        } else {
            4.0 + gc - rc
        };
        let h = frac(h / 6.0 + 1.0); // torch.fmod: arguments are positive here
        let h = frac(h + factor); // torch `%` takes the divisor's sign
        let h = if h < 0.0 { h + 1.0 } else { h };
        let v = maxc;
        let hi = (h * 6.0).floor();
        let f = h * 6.0 - hi;
        let p = (v * (1.0 - s)).clamp(0.0, 1.0);
        let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
        let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
        let (r2, g2, b2) = match (hi as i32).rem_euclid(6) {
            0 => (v, t, p),
            1 => (q, v, p),
            2 => (p, v, t),
            3 => (p, q, v),
            4 => (t, p, v),
            _ => (v, p, q),
        };
        img.data[i] = r2;
        img.data[n + i] = g2;
        img.data[2 * n + i] = b2;
    }
}

/// `F.rgb_to_grayscale(img, num_output_channels=3)`: every channel becomes the luma; a
/// 1-channel image is already grey.
pub fn grayscale(img: &mut Image) {
    if img.channels != 3 {
        return;
    }
    let l = luma(img);
    let n = l.len();
    for ch in 0..3 {
        img.data[ch * n..(ch + 1) * n].copy_from_slice(&l);
    }
}

/// torchvision `_get_gaussian_kernel1d`: `x = linspace(-(k-1)/2, (k-1)/2, k)`,
/// `pdf = exp(-0.5 (x / sigma)^2)`, normalised to sum 1.
pub fn gaussian_kernel1d(ksize: usize, sigma: f32) -> Vec<f32> {
    let half = (ksize as f32 - 1.0) * 0.5;
    let pdf: Vec<f32> = (0..ksize)
        .map(|i| {
            let x = -half + i as f32;
            (-0.5 * (x / sigma).powi(2)).exp()
        })
        .collect();
    let sum: f32 = pdf.iter().sum();
    pdf.into_iter().map(|v| v / sum).collect()
}

/// Index into `0..n` with reflect padding (`torch.nn.functional.pad(mode="reflect")`, no edge
/// repeat); folds again for offsets larger than the image, where torch would refuse.
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m < n as isize { m } else { period - m }) as usize
}

/// `F.gaussian_blur(img, [k, k], [sigma, sigma])`: separable Gaussian with reflect padding.
/// `ksize` must be odd (as torchvision requires).
pub fn gaussian_blur(img: &mut Image, ksize: usize, sigma: f32) {
    let k = gaussian_kernel1d(ksize, sigma);
    let half = (ksize / 2) as isize;
    let (h, w) = (img.height, img.width);
    // Reflected source index of every padded position, computed once per call.
    let rx: Vec<usize> = (-half..w as isize + half).map(|i| reflect(i, w)).collect();
    let ry: Vec<usize> = (-half..h as isize + half).map(|i| reflect(i, h)).collect();
    let mut padded = vec![0.0f32; rx.len()];
    let mut tmp = vec![0.0f32; h * w];
    for plane in img.data.chunks_exact_mut(h * w) {
        for (src, dst) in plane.chunks_exact(w).zip(tmp.chunks_exact_mut(w)) {
            for (p, &i) in padded.iter_mut().zip(&rx) {
                *p = src[i];
            }
            // Tap by tap over the whole row (vectorises); the same summation order as a
            // per-pixel dot product, so the same values.
            dst.iter_mut().for_each(|v| *v = 0.0);
            for (j, kv) in k.iter().enumerate() {
                for (d, p) in dst.iter_mut().zip(&padded[j..j + w]) {
                    *d += kv * p;
                }
            }
        }
        for (y, dst) in plane.chunks_exact_mut(w).enumerate() {
            dst.iter_mut().for_each(|v| *v = 0.0);
            for (j, kv) in k.iter().enumerate() {
                let row = &tmp[ry[y + j] * w..(ry[y + j] + 1) * w];
                for (d, v) in dst.iter_mut().zip(row) {
                    *d += kv * v;
                }
            }
        }
    }
}

/// `F.normalize`: `(x - mean[c]) / std[c]`.
pub fn normalize(img: &mut Image, mean: &[f32], std: &[f32]) {
    let n = img.height * img.width;
    for (ch, plane) in img.data.chunks_mut(n).enumerate() {
        let (m, s) = (mean[ch], std[ch]);
        plane.iter_mut().for_each(|v| *v = (*v - m) / s);
    }
}
