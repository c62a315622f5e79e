//! Each deterministic image op against reference values.
//!
//! The references come from PIL (resize: `Image.resize(..., BILINEAR)` on float `F` images) and
//! from numpy re-implementations of torchvision's tensor ops (`torchvision/transforms/_functional_tensor.py`),
//! computed by this script (numpy 2.4, Pillow 13):
//!
//! ```python
//! import numpy as np
//! from PIL import Image
//!
//! def img(c, h, w):
//!     a = np.zeros((c, h, w), np.float32)
//!     for ci in range(c):
//!         for y in range(h):
//!             for x in range(w):
//!                 a[ci, y, x] = ((ci * 31 + y * 7 + x * 3) % 17) / 16.0
//!     return a
//!
//! def fmt(a):
//!     return "[" + ", ".join(f"{v:.7}" for v in np.asarray(a, np.float64).ravel()) + "]"
//!
//! # --- resize (PIL 'F' mode, BILINEAR, antialiased) ---
//! def pil_resize(a, oh, ow, box=None):
//!     out = []
//!     for p in a:
//!         im = Image.fromarray(p, mode="F")
//!         if box is not None:
//!             im = im.crop(box)
//!         out.append(np.asarray(im.resize((ow, oh), Image.BILINEAR), np.float32))
//!     return np.stack(out)
//!
//! a = img(1, 5, 7)
//! print("RESIZE_DOWN", fmt(pil_resize(a, 3, 4)))
//! print("RESIZE_UP", fmt(pil_resize(a, 8, 9)))
//! a2 = img(2, 6, 8)
//! # resized_crop(top=1, left=2, h=4, w=5) -> 3x3
//! print("RESIZED_CROP", fmt(pil_resize(a2, 3, 3, box=(2, 1, 7, 5))))
//! # Resize(4) + CenterCrop(4) on 6x8: shorter side 6 -> 4, long = int(4*8/6)=5
//! r = pil_resize(a2, 4, 5)
//! top = int(round((4 - 4) / 2.0)); left = int(round((5 - 4) / 2.0))
//! print("CENTER_RESIZE", fmt(r[:, top:top+4, left:left+4]))
//!
//! # --- torchvision tensor colour ops, re-implemented ---
//! def blend(i1, i2, r): return np.clip(r * i1 + (1.0 - r) * i2, 0, 1).astype(np.float32)
//! def gray(x): return (0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]).astype(np.float32)[None]
//! x = img(3, 3, 4)
//! print("BRIGHTNESS_1_3", fmt(blend(x, np.zeros_like(x), 1.3)))
//! print("CONTRAST_0_6", fmt(blend(x, np.mean(gray(x)), 0.6)))
//! print("SATURATION_1_7", fmt(blend(x, gray(x), 1.7)))
//! print("GRAYSCALE", fmt(np.repeat(gray(x), 3, 0)))
//! g1 = img(1, 3, 4)
//! print("CONTRAST1_1_4", fmt(blend(g1, np.mean(g1), 1.4)))
//!
//! def rgb2hsv(img):
//!     r, g, b = img
//!     maxc = img.max(0); minc = img.min(0)
//!     eqc = maxc == minc
//!     cr = maxc - minc
//!     ones = np.ones_like(maxc)
//!     s = cr / np.where(eqc, ones, maxc)
//!     crd = np.where(eqc, ones, cr)
//!     rc = (maxc - r) / crd; gc = (maxc - g) / crd; bc = (maxc - b) / crd
//!     hr = (maxc == r) * (bc - gc)
//!     hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
//!     hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
//!     h = np.fmod(((hr + hg + hb) / 6.0 + 1.0), 1.0)
//!     return np.stack((h, s, maxc)).astype(np.float32)
//!
//! def hsv2rgb(img):
//!     h, s, v = img
//!     i = np.floor(h * 6.0); f = h * 6.0 - i; i = i.astype(np.int32)
//!     p = np.clip(v * (1 - s), 0, 1); q = np.clip(v * (1 - s * f), 0, 1); t = np.clip(v * (1 - s * (1 - f)), 0, 1)
//!     i = i % 6
//!     mask = (i[None] == np.arange(6).reshape(-1, 1, 1)).astype(np.float32)
//!     a1 = np.stack((v, q, p, p, t, v)); a2 = np.stack((t, v, v, q, p, p)); a3 = np.stack((p, p, t, v, v, q))
//!     a4 = np.stack((a1, a2, a3))
//!     return np.einsum("ijk,xijk->xjk", mask, a4).astype(np.float32)
//!
//! def adjust_hue(x, f):
//!     hsv = rgb2hsv(x)
//!     hsv[0] = np.mod(hsv[0] + np.float32(f), 1.0)
//!     return hsv2rgb(hsv)
//! print("HUE_0_15", fmt(adjust_hue(x, 0.15)))
//! print("HUE_M0_4", fmt(adjust_hue(x, -0.4)))
//!
//! # --- gaussian blur ---
//! def kernel1d(k, sigma):
//!     half = (k - 1) * 0.5
//!     xs = np.linspace(-half, half, k, dtype=np.float32)
//!     pdf = np.exp(-0.5 * (xs / sigma) ** 2)
//!     return (pdf / pdf.sum()).astype(np.float32)
//! print("KERNEL_5_1_2", fmt(kernel1d(5, 1.2)))
//! def blur(x, k, sigma):
//!     kk = kernel1d(k, sigma); k2 = np.outer(kk, kk)
//!     pad = k // 2
//!     out = np.zeros_like(x)
//!     for c in range(x.shape[0]):
//!         p = np.pad(x[c], pad, mode="reflect")
//!         for y in range(x.shape[1]):
//!             for xx in range(x.shape[2]):
//!                 out[c, y, xx] = (p[y:y+k, xx:xx+k] * k2).sum()
//!     return out
//! b = img(2, 5, 6)
//! print("BLUR_3_0_8", fmt(blur(b, 3, 0.8)))
//! print("BLUR_5_1_5", fmt(blur(b, 5, 1.5)))
//! ```

#[rustfmt::skip]
const RESIZE_DOWN: &[f32] = &[0.2857143, 0.5775, 0.5946429, 0.4409013, 0.4560185, 0.4386111, 0.5663889, 0.614418, 0.5693027, 0.4042857, 0.5367857, 0.4859694];
#[rustfmt::skip]
const RESIZE_UP: &[f32] = &[0.0, 0.125, 0.2708333, 0.4166667, 0.5625, 0.7083333, 0.8541667, 0.6458333, 0.0625, 0.1914062, 0.3164062, 0.4622396, 0.6080729, 0.7539062, 0.5381944, 0.5807292, 0.5273438, 0.2539062, 0.4648438, 0.5455729, 0.6692708, 0.8151042, 0.9609375, 0.3320312, 0.2565104, 0.4023438, 0.5273438, 0.7382812, 0.3763021, 0.2786458, 0.4244792, 0.5703125, 0.4578993, 0.5299479, 0.6757812, 0.8007812, 0.6796875, 0.3177083, 0.2200521, 0.3658854, 0.5117188, 0.6575521, 0.6189236, 0.6171875, 0.7421875, 0.2890625, 0.3697917, 0.4934896, 0.6393229, 0.7851562, 0.9309896, 0.5234375, 0.2265625, 0.3515625, 0.4960938, 0.6210938, 0.5013021, 0.3151042, 0.4609375, 0.6067708, 0.4943576, 0.4335938, 0.5585938, 0.6875, 0.8125, 0.4861111, 0.04166667, 0.1875, 0.3333333, 0.4791667, 0.625, 0.75];
#[rustfmt::skip]
const RESIZED_CROP: &[f32] = &[0.7053571, 0.4215278, 0.5508929, 0.4866071, 0.6631944, 0.5446429, 0.2678571, 0.4916667, 0.5383928, 0.5178571, 0.6472222, 0.3633929, 0.2991071, 0.59375, 0.5848215, 0.5053571, 0.375, 0.4875];
#[rustfmt::skip]
const CENTER_RESIZE: &[f32] = &[0.240767, 0.5251736, 0.6210938, 0.5448495, 0.4949495, 0.4305556, 0.5436921, 0.5704733, 0.4936869, 0.4459876, 0.6247107, 0.4634774, 0.3735796, 0.3628472, 0.5546875, 0.677662, 0.4456676, 0.3376736, 0.6162109, 0.6032986, 0.5489268, 0.3960905, 0.5234375, 0.5141461, 0.3544823, 0.4858539, 0.4765625, 0.6039094, 0.5784801, 0.3967014, 0.3837891, 0.6623264];
#[rustfmt::skip]
const BRIGHTNESS_1_3: &[f32] = &[0.0, 0.24375, 0.4875, 0.73125, 0.56875, 0.8125, 1.0, 1.0, 1.0, 0.0, 0.24375, 0.4875, 1.0, 0.0, 0.24375, 0.4875, 0.325, 0.56875, 0.8125, 1.0, 0.89375, 1.0, 0.0, 0.24375, 0.89375, 1.0, 0.0, 0.24375, 0.08125, 0.325, 0.56875, 0.8125, 0.65, 0.89375, 1.0, 0.0];
#[rustfmt::skip]
const CONTRAST_0_6: &[f32] = &[0.177836, 0.290336, 0.4028361, 0.515336, 0.440336, 0.5528361, 0.6653361, 0.7778361, 0.7028361, 0.177836, 0.290336, 0.4028361, 0.7028361, 0.177836, 0.290336, 0.4028361, 0.327836, 0.440336, 0.5528361, 0.6653361, 0.5903361, 0.7028361, 0.177836, 0.290336, 0.5903361, 0.7028361, 0.177836, 0.290336, 0.2153361, 0.327836, 0.440336, 0.5528361, 0.4778361, 0.5903361, 0.7028361, 0.177836];
#[rustfmt::skip]
const SATURATION_1_7: &[f32] = &[0.0, 0.2096944, 0.481995, 0.6695081, 0.5444994, 0.7320125, 0.9195256, 1.0, 0.9820301, 0.0, 0.2096944, 0.481995, 1.0, 0.0, 0.163245, 0.3507582, 0.2257494, 0.4132625, 0.6007756, 0.7882887, 0.6632801, 1.0, 0.0, 0.163245, 0.7543501, 1.0, 0.0, 0.03200814, 0.0, 0.09451249, 0.2820256, 0.4695387, 0.34453, 0.7543501, 1.0, 0.0];
#[rustfmt::skip]
const GRAYSCALE: &[f32] = &[0.592, 0.1557938, 0.22215, 0.4096313, 0.2846437, 0.472125, 0.6596063, 0.8470876, 0.7221, 0.592, 0.1557938, 0.22215, 0.592, 0.1557938, 0.22215, 0.4096313, 0.2846437, 0.472125, 0.6596063, 0.8470876, 0.7221, 0.592, 0.1557938, 0.22215, 0.592, 0.1557938, 0.22215, 0.4096313, 0.2846437, 0.472125, 0.6596063, 0.8470876, 0.7221, 0.592, 0.1557938, 0.22215];
#[rustfmt::skip]
const CONTRAST1_1_4: &[f32] = &[0.0, 0.08124998, 0.34375, 0.6062499, 0.43125, 0.69375, 0.95625, 1.0, 1.0, 0.0, 0.08124998, 0.34375];
#[rustfmt::skip]
const HUE_0_15: &[f32] = &[0.0, 0.875, 0.2249999, 0.4124999, 0.2874999, 0.4749999, 0.6624998, 0.8499999, 0.7249999, 0.0, 0.875, 0.2249999, 0.275, 0.0, 0.375, 0.5625, 0.4375, 0.625, 0.8125, 1.0, 0.875, 0.275, 0.0, 0.375, 0.875, 0.7750002, 0.0, 0.1875, 0.0625, 0.25, 0.4375, 0.625, 0.5, 0.875, 0.7750002, 0.0];
#[rustfmt::skip]
const HUE_M0_4: &[f32] = &[0.875, 0.1625004, 0.03750014, 0.2250001, 0.1000002, 0.2875001, 0.4750002, 0.6625001, 0.5375001, 0.875, 0.1625004, 0.03750014, 0.3375001, 0.875, 0.0, 0.1875, 0.0625, 0.25, 0.4375, 0.625, 0.5, 0.3375001, 0.875, 0.0, 0.0, 0.0, 0.375, 0.5625, 0.4375, 0.625, 0.8125, 1.0, 0.875, 0.0, 0.0, 0.375];
#[rustfmt::skip]
const KERNEL_5_1_2: &[f32] = &[0.08562917, 0.2426676, 0.3434065, 0.2426676, 0.08562917];
#[rustfmt::skip]
const BLUR_3_0_8: &[f32] = &[0.2987428, 0.39662, 0.5841199, 0.6502436, 0.5726334, 0.5491343, 0.4057465, 0.4317567, 0.5585685, 0.6135135, 0.5114865, 0.4768085, 0.4455812, 0.3864865, 0.4414314, 0.5682432, 0.5624999, 0.527822, 0.4721779, 0.4374999, 0.4317567, 0.5585685, 0.6135135, 0.5544187, 0.5680028, 0.5333248, 0.4312979, 0.4862428, 0.5523665, 0.5065097, 0.4007698, 0.3416751, 0.39662, 0.5841199, 0.6502436, 0.6043868, 0.4721779, 0.4374999, 0.4317567, 0.5585685, 0.6135135, 0.5544187, 0.5231914, 0.4885134, 0.3864865, 0.4414314, 0.5682432, 0.5942534, 0.4060542, 0.4432432, 0.4374999, 0.4317567, 0.5585685, 0.6564457, 0.3805028, 0.47838, 0.5333248, 0.4312979, 0.4862428, 0.58412];
#[rustfmt::skip]
const BLUR_5_1_5: &[f32] = &[0.4119098, 0.4518242, 0.5055777, 0.5461997, 0.5435067, 0.5417126, 0.4168328, 0.4571353, 0.5187415, 0.5586611, 0.558704, 0.5562074, 0.4263493, 0.4485334, 0.488583, 0.5210207, 0.5473098, 0.5593326, 0.463182, 0.4752048, 0.5014939, 0.5186116, 0.5441418, 0.5589005, 0.4504812, 0.4550785, 0.4778668, 0.5024665, 0.5511129, 0.5769525, 0.4344106, 0.4420755, 0.4746995, 0.5055777, 0.5608489, 0.5866885, 0.4181526, 0.4301754, 0.4717845, 0.5187415, 0.5815365, 0.6108143, 0.4519177, 0.4486205, 0.4560888, 0.488583, 0.5356699, 0.5606524, 0.4515985, 0.4482448, 0.4600146, 0.5014939, 0.541487, 0.5589875, 0.4568678, 0.4453298, 0.4406891, 0.4778668, 0.5171157, 0.5346162];

use locograph::data::augment::{crop_params, sample_rng, simclr_kernel_size};
use locograph::data::transforms as tf;
use locograph::data::{AugmentConfig, DataConfig, DataFormat, Image, JitterConfig};

/// The script's `img(c, h, w)`.
fn img(c: usize, h: usize, w: usize) -> Image {
    let mut data = Vec::new();
    for ci in 0..c {
        for y in 0..h {
            for x in 0..w {
                data.push(((ci * 31 + y * 7 + x * 3) % 17) as f32 / 16.0);
            }
        }
    }
    Image { channels: c, height: h, width: w, data }
}

#[track_caller]
fn assert_close(got: &Image, want: &[f32], tol: f32) {
    assert_eq!(got.data.len(), want.len(), "length");
    for (i, (g, w)) in got.data.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "element {i}: got {g}, want {w}");
    }
}

#[test]
fn resize_matches_pil_bilinear() {
    let a = img(1, 5, 7);
    let down = tf::resize(&a, 3, 4);
    assert_eq!((down.height, down.width), (3, 4));
    assert_close(&down, RESIZE_DOWN, 1e-5);
    assert_close(&tf::resize(&a, 8, 9), RESIZE_UP, 1e-5);
}

#[test]
fn resized_crop_matches_pil_crop_then_resize() {
    let a = img(2, 6, 8);
    let out = tf::resized_crop(&a, 1, 2, 4, 5, 3, 3);
    assert_close(&out, RESIZED_CROP, 1e-5);
}

#[test]
fn center_resize_matches_resize_then_center_crop() {
    let out = tf::center_resize(&img(2, 6, 8), 4);
    assert_eq!((out.channels, out.height, out.width), (2, 4, 4));
    assert_close(&out, CENTER_RESIZE, 1e-5);
}

#[test]
fn colour_ops_match_torchvision() {
    let x = img(3, 3, 4);
    let mut b = x.clone();
    tf::adjust_brightness(&mut b, 1.3);
    assert_close(&b, BRIGHTNESS_1_3, 1e-6);
    let mut c = x.clone();
    tf::adjust_contrast(&mut c, 0.6);
    assert_close(&c, CONTRAST_0_6, 1e-6);
    let mut s = x.clone();
    tf::adjust_saturation(&mut s, 1.7);
    assert_close(&s, SATURATION_1_7, 1e-6);
    let mut g = x.clone();
    tf::grayscale(&mut g);
    assert_close(&g, GRAYSCALE, 1e-6);
    let mut h = x.clone();
    tf::adjust_hue(&mut h, 0.15);
    assert_close(&h, HUE_0_15, 1e-5);
    let mut h = x.clone();
    tf::adjust_hue(&mut h, -0.4);
    assert_close(&h, HUE_M0_4, 1e-5);
}

#[test]
fn one_channel_jitter_is_brightness_and_contrast_only() {
    let g = img(1, 3, 4);
    let mut c = g.clone();
    tf::adjust_contrast(&mut c, 1.4);
    assert_close(&c, CONTRAST1_1_4, 1e-6);
    // torchvision returns 1-channel images unchanged from saturation, hue and grayscale.
    let mut same = g.clone();
    tf::adjust_saturation(&mut same, 0.3);
    tf::adjust_hue(&mut same, 0.25);
    tf::grayscale(&mut same);
    assert_eq!(same, g);
    // A full-strength jitter that may only touch saturation and hue leaves grey images alone.
    let only_colour = AugmentConfig {
        jitter: JitterConfig { brightness: 0.0, contrast: 0.0, saturation: 0.8, hue: 0.2, p: 1.0 },
        ..AugmentConfig::none()
    };
    for i in 0..20 {
        let out = only_colour.apply(g.clone(), 3, 4, &mut sample_rng(1, 0, i, 0));
        assert_eq!(out, g);
    }
}

#[test]
fn gaussian_blur_matches_torchvision() {
    let k = tf::gaussian_kernel1d(5, 1.2);
    assert_close(&Image { channels: 1, height: 1, width: 5, data: k }, KERNEL_5_1_2, 1e-6);
    let mut b = img(2, 5, 6);
    tf::gaussian_blur(&mut b, 3, 0.8);
    assert_close(&b, BLUR_3_0_8, 1e-5);
    let mut b = img(2, 5, 6);
    tf::gaussian_blur(&mut b, 5, 1.5);
    assert_close(&b, BLUR_5_1_5, 1e-5);
}

#[test]
fn flip_normalize_to_rgb() {
    let mut a = img(2, 2, 3);
    let orig = a.clone();
    tf::hflip(&mut a);
    assert_eq!(a.data[0], orig.data[2]);
    assert_eq!(a.data[3 + 2], orig.data[3]);
    tf::hflip(&mut a);
    assert_eq!(a, orig);
    // F.normalize: (x - mean) / std per channel.
    tf::normalize(&mut a, &[0.5, 0.25], &[0.5, 2.0]);
    assert!((a.data[0] - (orig.data[0] - 0.5) / 0.5).abs() < 1e-7);
    assert!((a.data[6] - (orig.data[6] - 0.25) / 2.0).abs() < 1e-7);
    let g = img(1, 2, 2).to_rgb();
    assert_eq!(g.channels, 3);
    assert_eq!(&g.data[0..4], &g.data[8..12]);
}

#[test]
fn crop_params_follow_torchvision_bounds_and_fallback() {
    for i in 0..500 {
        let mut rng = sample_rng(7, 0, i, 0);
        let (t, l, h, w) = crop_params(&mut rng, 32, 40, [0.08, 1.0], [0.75, 4.0 / 3.0]);
        assert!(h > 0 && w > 0 && t + h <= 32 && l + w <= 40, "{t} {l} {h} {w}");
        // sizes are round(sqrt(area * r)); allow the rounding
        let area = (h * w) as f64 / (32.0 * 40.0);
        assert!(area > 0.05 && area <= 1.0, "area {area}");
    }
    // No 3:1 crop of area 1 fits a 10×10 image: torchvision falls back to a centre crop of the
    // clamped ratio: w = 10, h = round(10 / 3) = 3, top = (10 - 3) // 2 = 3.
    let mut rng = sample_rng(0, 0, 0, 0);
    assert_eq!(crop_params(&mut rng, 10, 10, [1.0, 1.0], [3.0, 3.0]), (3, 0, 3, 10));
    // SimCLR's kernel: 10% of the side, made odd.
    assert_eq!(simclr_kernel_size(224), 23);
    assert_eq!(simclr_kernel_size(96), 9);
    assert_eq!(simclr_kernel_size(32), 3);
}

#[test]
fn augment_is_a_function_of_its_rng() {
    let cfg = AugmentConfig::default();
    let x = img(3, 16, 16);
    let a = cfg.apply(x.clone(), 12, 12, &mut sample_rng(3, 1, 5, 0));
    let b = cfg.apply(x.clone(), 12, 12, &mut sample_rng(3, 1, 5, 0));
    let c = cfg.apply(x.clone(), 12, 12, &mut sample_rng(3, 1, 6, 0));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!((a.channels, a.height, a.width), (3, 12, 12));
    // No randomness at all: the identity.
    assert_eq!(AugmentConfig::none().apply(x.clone(), 16, 16, &mut sample_rng(0, 0, 0, 0)), x);
}

#[test]
fn yaml_defaults_are_simclr_and_unknown_keys_fail() {
    let cfg: DataConfig = serde_yaml::from_str("format: synthetic").unwrap();
    assert_eq!(cfg.augment, AugmentConfig::default());
    let a = &cfg.augment;
    assert_eq!(a.crop.as_ref().map(|c| c.scale), Some([0.08, 1.0]));
    assert_eq!((a.flip, a.grayscale, a.blur.p, a.jitter.p), (0.5, 0.2, 0.5, 0.8));
    assert_eq!((a.jitter.brightness, a.jitter.hue), (0.8, 0.2));
    assert_eq!(a.blur.sigma, [0.1, 2.0]);

    let yaml = "format: idx\npath: data/fashion-mnist\naugment:\n  size: 28\n  crop: {scale: [0.2, 1.0]}\n  blur: {p: 0.0}\n  normalize: {mean: [0.286], std: [0.353]}\n";
    let cfg: DataConfig = serde_yaml::from_str(yaml).unwrap();
    assert_eq!(cfg.format, DataFormat::Idx);
    assert_eq!(cfg.augment.crop.as_ref().map(|c| c.ratio), Some([0.75, 4.0 / 3.0]));
    let cfg: DataConfig = serde_yaml::from_str("format: synthetic\naugment: {crop: null}").unwrap();
    assert!(cfg.augment.crop.is_none());

    let err = serde_yaml::from_str::<DataConfig>("format: idx\naugment: {flipp: 0.5}").unwrap_err();
    assert!(err.to_string().contains("flipp"), "{err}");

    // All problems at once, numbered.
    let bad: DataConfig =
        serde_yaml::from_str("format: cifar10\naugment: {flip: 2.0, jitter: {hue: 0.7}, blur: {kernel_size: 4}}")
            .unwrap();
    let msg = bad.validate().unwrap_err().to_string();
    for needle in ["needs `path`", "augment.flip", "augment.jitter.hue", "kernel_size = 4", "  4. "] {
        assert!(msg.contains(needle), "{needle} missing from:\n{msg}");
    }
}
