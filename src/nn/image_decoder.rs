//! InfoPro's reconstruction decoder (Wang et al., ICLR 2021, "Revisiting Locally Supervised
//! Learning"): a local module's feature map is resized bilinearly to the image's size, then a
//! 3×3 conv → batch norm → ReLU → 3×3 conv gives back an image, which an `mse` loss compares with
//! the graph's `input` (`{from: input, to: R, as: target}`).
//!
//! InfoPro's own decoder (its `networks/auxiliary_nets.py`, `Decoder`) differs in three details,
//! kept apart on purpose: it resizes with `align_corners=True` (here PyTorch's default,
//! `align_corners=False`, `nn::resize`); it ends in a sigmoid and a binary cross-entropy against
//! the un-normalised image in [0, 1] (here no sigmoid, and `mse` against the normalised image
//! the network sees, whose values are not in [0, 1]); its first conv has a bias although a batch
//! norm follows (here none: the batch norm's shift makes it redundant).

use candle_core::{Module, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::batch_norm::{batch_norm2d, BatchNorm2d};
use super::block::CONV_BN_SAVED;
use super::conv::{conv2d, Conv2d, ConvSpec};
use super::resize::resize_bilinear;
use super::{Cost, Init, Layer, ParamBuilder, ParamKind};

fn twelve() -> usize {
    12
}

/// `op: image_decoder` — e.g. `{op: image_decoder, channels: 1, size: 28}` on a stage's output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageDecoderConfig {
    /// Channels of the image it reconstructs (the graph input's `channels`).
    pub channels: usize,
    /// Side of the image it reconstructs (the graph input's `size`).
    pub size: usize,
    /// Width of the hidden conv (InfoPro: 12 × `widen`, with `widen` 1).
    #[serde(default = "twelve")]
    pub hidden: usize,
    /// Keep the parameters fixed; gradients still flow through.
    #[serde(default)]
    pub frozen: bool,
}

impl ImageDecoderConfig {
    fn convs(&self, in_channels: usize) -> [ConvSpec; 2] {
        [ConvSpec::new(in_channels, self.hidden, 3, 1), ConvSpec::new(self.hidden, self.channels, 3, 1)]
    }

    /// Output `[channels, size, size]` for an input `[C, H, W]`, or what does not fit.
    pub fn out_shape(&self, input: [usize; 3]) -> std::result::Result<[usize; 3], String> {
        let mut why = vec![];
        if self.channels == 0 || self.size == 0 || self.hidden == 0 {
            why.push("`channels`, `size` and `hidden` must be at least 1".to_string());
        }
        if input[1] == 0 || input[2] == 0 {
            why.push(format!("the input {}×{} is empty", input[1], input[2]));
        }
        if !why.is_empty() {
            return Err(why.join("; "));
        }
        Ok([self.channels, self.size, self.size])
    }

    /// Cost on a `[C, H, W]` input (which [`ImageDecoderConfig::out_shape`] accepts).
    ///
    /// Saved in training: the resize's intermediates as a stage's resize counts them (the
    /// column-resized `[C, H, S]`, the output `[C, S, S]`; a side already at `S` is skipped), the
    /// first conv's output and its batch norm + ReLU output, the last conv's output and the
    /// bias sum (the node's output).
    pub fn cost(&self, input: [usize; 3]) -> Cost {
        let [c, h, w] = input;
        let s = self.size;
        let mut cost = Cost::default();
        if w != s {
            cost.saved += (c * h * s) as u64;
        }
        if h != s {
            cost.saved += (c * s * s) as u64;
        }
        let [first, last] = self.convs(c);
        cost.params = first.params() + 2 * self.hidden as u64 + last.params() + self.channels as u64;
        cost.buffers = 2 * self.hidden as u64;
        cost.macs = first.macs(s, s) + last.macs(s, s);
        cost.output = (self.channels * s * s) as u64;
        cost.saved += (self.hidden * s * s) as u64 * CONV_BN_SAVED + 2 * cost.output;
        cost
    }
}

/// A built decoder.
#[derive(Clone, Debug)]
pub struct ImageDecoder {
    size: usize,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bias: Tensor,
}

/// Parameters `{path}.conv1.weight`, `{path}.bn1.*`, `{path}.conv2.{weight,bias}`.
pub fn image_decoder(cfg: &ImageDecoderConfig, in_channels: usize, pb: &ParamBuilder) -> Result<ImageDecoder> {
    let [first, last] = cfg.convs(in_channels);
    let c2 = pb.pp("conv2");
    // PyTorch's default conv bias: U(±1/√fan_in).
    let fan_in = cfg.hidden * 9;
    Ok(ImageDecoder {
        size: cfg.size,
        conv1: conv2d(first, &pb.pp("conv1"))?,
        bn1: batch_norm2d(cfg.hidden, false, &pb.pp("bn1"))?,
        conv2: conv2d(last, &c2)?,
        bias: c2.param("bias", cfg.channels, ParamKind::Bias, Init::linear_default(fan_in))?,
    })
}

impl Layer for ImageDecoder {
    /// # Shapes
    /// `[N, C, H, W]` → `[N, channels, size, size]`.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let x = if (h, w) == (self.size, self.size) { x.clone() } else { resize_bilinear(x, self.size, self.size)? };
        let z = self.bn1.forward_relu_t(&self.conv1.forward(&x)?, train)?;
        let y = self.conv2.forward(&z)?;
        let c = self.bias.dim(0)?;
        y.broadcast_add(&self.bias.to_dtype(y.dtype())?.reshape((1, c, 1, 1))?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::nn::gradcheck::gradcheck;

    /// PyTorch's bilinear resize (align_corners=False), its BatchNorm2d in training mode and
    /// its conv2d, written out as plain loops in f64, independently of the layer's candle ops:
    /// ```text
    /// src(i) = max((i + ½)·in/out − ½, 0); i0 = ⌊src⌋; i1 = min(i0 + 1, in − 1); λ = src − i0
    /// y[c, i, j] = Σ_{a ∈ {i0,i1}, b ∈ {j0,j1}} wᵢ(a)·wⱼ(b)·x[c, a, b]
    /// bn(z) = γ·(z − mean)/√(var + 1e-5) + β, mean and (biased) var over N, H, W
    /// conv(x)[o, i, j] = Σ_{c, di, dj} w[o, c, di, dj]·x[c, i + di − 1, j + dj − 1] (zero padding)
    /// ```
    fn reference(x: &[f64], n: usize, c: usize, hw: usize, d: &ImageDecoder, cfg: &ImageDecoderConfig) -> Vec<f64> {
        let s = cfg.size;
        let weights = |input: usize, i: usize| {
            let src = ((i as f64 + 0.5) * input as f64 / s as f64 - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(input - 1);
            let i1 = (i0 + 1).min(input - 1);
            let l = src - i0 as f64;
            [(i0, 1.0 - l), (i1, l)]
        };
        let mut up = vec![0.0; n * c * s * s];
        for b in 0..n * c {
            for i in 0..s {
                for j in 0..s {
                    let mut v = 0.0;
                    for (a, wa) in weights(hw, i) {
                        for (bb, wb) in weights(hw, j) {
                            v += wa * wb * x[b * hw * hw + a * hw + bb];
                        }
                    }
                    up[b * s * s + i * s + j] = v;
                }
            }
        }
        let flat = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let conv = |x: &[f64], cin: usize, w: &[f64], cout: usize| {
            let mut y = vec![0.0; n * cout * s * s];
            for b in 0..n {
                for o in 0..cout {
                    for i in 0..s {
                        for j in 0..s {
                            let mut v = 0.0;
                            for ci in 0..cin {
                                for di in 0..3 {
                                    for dj in 0..3 {
                                        let (a, bb) = (i + di, j + dj);
                                        if a >= 1 && a <= s && bb >= 1 && bb <= s {
                                            v += w[((o * cin + ci) * 3 + di) * 3 + dj]
                                                * x[((b * cin + ci) * s + a - 1) * s + bb - 1];
                                        }
                                    }
                                }
                            }
                            y[((b * cout + o) * s + i) * s + j] = v;
                        }
                    }
                }
            }
            y
        };
        let h = cfg.hidden;
        let mut z = conv(&up, c, &flat(d.conv1.weight()), h);
        let (g, beta) = (flat(d.bn1.weight()), flat(d.bn1.bias()));
        let count = (n * s * s) as f64;
        for o in 0..h {
            let idx = |k: usize| (k / (s * s)) * h * s * s + o * s * s + k % (s * s);
            let mean = (0..n * s * s).map(|k| z[idx(k)]).sum::<f64>() / count;
            let var = (0..n * s * s).map(|k| (z[idx(k)] - mean).powi(2)).sum::<f64>() / count;
            for k in 0..n * s * s {
                let v = g[o] * (z[idx(k)] - mean) / (var + 1e-5).sqrt() + beta[o];
                z[idx(k)] = v.max(0.0);
            }
        }
        let mut y = conv(&z, h, &flat(d.conv2.weight()), cfg.channels);
        let bias = flat(&d.bias);
        for (k, v) in y.iter_mut().enumerate() {
            *v += bias[(k / (s * s)) % cfg.channels];
        }
        y
    }

    #[test]
    fn reconstructs_the_image_size_like_the_written_out_reference() -> Result<()> {
        let cfg = ImageDecoderConfig { channels: 2, size: 9, hidden: 5, frozen: false };
        let (n, c, hw) = (3, 4, 4);
        let pb = ParamBuilder::new(3, &Device::Cpu, DType::F64);
        let d = image_decoder(&cfg, c, &pb)?;
        let v: Vec<f64> = (0..n * c * hw * hw).map(|i| (0.37 * i as f64).sin() + 0.1 * (i % 7) as f64).collect();
        let x = Tensor::from_vec(v.clone(), (n, c, hw, hw), &Device::Cpu)?;
        let y = d.forward_t(&x, true)?;
        assert_eq!(y.dims(), &[n, 2, 9, 9]);
        assert_eq!(cfg.out_shape([c, hw, hw]), Ok([2, 9, 9]));
        let want = reference(&v, n, c, hw, &d, &cfg);
        let got = y.flatten_all()?.to_vec1::<f64>()?;
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-10, "max |decoder - reference| {err}");

        // Every parameter the cost counts is built, and nothing else.
        let built: usize = pb.store().params.iter().map(|p| p.var.elem_count()).sum();
        let buffers: usize = pb.store().buffers.iter().map(|b| b.var.elem_count()).sum();
        let cost = cfg.cost([c, hw, hw]);
        assert_eq!((cost.params, cost.buffers), (built as u64, buffers as u64));
        assert_eq!(cost.output, (2 * 9 * 9) as u64);
        assert_eq!(cost.macs, ((c * 5 * 9 + 5 * 2 * 9) * 81) as u64);
        Ok(())
    }

    #[test]
    fn gradcheck_f64() -> Result<()> {
        let cfg = ImageDecoderConfig { channels: 1, size: 6, hidden: 3, frozen: false };
        let pb = ParamBuilder::new(1, &Device::Cpu, DType::F64);
        let d = image_decoder(&cfg, 2, &pb)?;
        let v: Vec<f64> = (0..2 * 2 * 3 * 3).map(|i| (0.61 * i as f64).cos()).collect();
        let x = Tensor::from_vec(v, (2, 2, 3, 3), &Device::Cpu)?;
        // Eval mode: batch norm is then a fixed affine map, so finite differences see one function.
        let res = gradcheck(|x| d.forward_t(x, false), &x, 1e-5, 3)?;
        assert!(res.max_rel_err <= 1e-6, "{res}");
        // The bias gets the sum of the output gradient over N, H, W.
        let b = Var::from_tensor(&d.bias)?;
        let d2 = ImageDecoder { bias: b.as_tensor().clone(), ..d.clone() };
        let g = d2.forward_t(&x, false)?.sum_all()?.backward()?;
        assert_eq!(g.get(b.as_tensor()).expect("bias grad").to_vec1::<f64>()?, [2.0 * 36.0]);
        Ok(())
    }
}
