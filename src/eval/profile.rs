//! `locograph profile`: parameters, FLOPs and activation memory of every encoder stage, from
//! the shapes alone (nothing is allocated), printed beside the LoCo supplementary's table.
//!
//! What is counted, per image:
//! - **Parameters**: convolution weights and BatchNorm scale/shift (not the running
//!   statistics). The 1000-way classifier that torchvision's 25.6 M includes is not part of an
//!   encoder graph; [`Profile::fc_params`] gives it separately.
//! - **FLOPs**: multiply-accumulates of the convolutions (one MAC = one FLOP, the convention
//!   behind ResNet-50's "4.1 GFLOPs"). BatchNorm, ReLU, pooling and resizing are left out,
//!   as in the paper.
//! - **Memory, paper-style**: the channels of every convolution on a block's residual branch
//!   (a bottleneck's `w + w + C`, a basic block's `C + C`; not the projection shortcut) at the
//!   block's output size, as Table 1 lists one output size per stage. This reproduces the
//!   supplementary's ResNet-50 shares exactly (43.64 / 29.09 / 21.82 / 5.45 %), and its
//!   PResNet-50 shares exactly for a res4 of 512 channels (128 wide) instead of Table 1's 576
//!   (docs/performance.md, "How to read the supplementary's table").
//! - **Memory, saved**: every tensor the engine keeps for the node's backward, as this crate
//!   builds the node (see [`saved_elems`]): what a node holds while its graph is alive.
//!
//! The stem is **folded into the first stage** (the paper's "conv1 + res2" row): its
//! parameters, FLOPs and saved tensors are added to that row; it has no paper-style memory,
//! which counts residual blocks only.

use std::fmt;

use crate::config::NodeConfig;
use crate::graph::Compiled;
use crate::nn::block::BlockSpec;
use crate::nn::conv::ConvSpec;
use crate::nn::decoder::DecoderConfig;
use crate::nn::stem::{StemConfig, StemKind};

/// One row of the profile: an encoder stage (with the stem folded into the first one).
#[derive(Clone, Debug, PartialEq)]
pub struct NodeProfile {
    /// The stage's node id.
    pub id: String,
    /// Other nodes whose numbers this row includes (the stem, for the first stage).
    pub folded: Vec<String>,
    /// Per-image output `[C, H, W]`.
    pub output: Vec<usize>,
    /// Trainable parameters (conv weights, BatchNorm scale and shift).
    pub params: u64,
    /// Multiply-accumulates per image.
    pub macs: u64,
    /// Paper-style activation memory: elements of every residual-branch conv's channels at
    /// its block's output size.
    pub paper_elems: u64,
    /// Elements of every tensor candle keeps for the backward of this row's nodes.
    pub saved_elems: u64,
}

/// Per-stage cost of an encoder at a given input size.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// Side of the square input image.
    pub input: usize,
    pub rows: Vec<NodeProfile>,
    /// Parameters of a 1000-way linear classifier on the pooled output (weights + biases).
    pub fc_params: u64,
}

/// The supplementary's per-stage table for one encoder.
#[derive(Clone, Copy)]
struct Reference {
    name: &'static str,
    /// (stage, memory %, FLOPs %).
    rows: &'static [(&'static str, f64, f64)],
    gflops: f64,
    /// How the table relates to the graph, printed under the profile.
    note: &'static str,
}

const RESNET50: Reference = Reference {
    name: "ResNet-50",
    rows: &[("res2", 43.64, 19.39), ("res3", 29.09, 25.09), ("res4", 21.82, 35.80), ("res5", 5.45, 19.73)],
    gflops: 4.14,
    note: "",
};
const PRESNET50: Reference = Reference {
    name: "PResNet-50",
    rows: &[
        ("res2", 15.46, 13.50),
        ("res3", 10.96, 14.63),
        ("res4", 19.48, 14.77),
        ("res5", 17.31, 16.62),
        ("res6", 19.48, 20.45),
        ("res7", 17.31, 20.04),
    ],
    gflops: 4.16,
    note: "note: the paper's columns do not follow from Table 1 as printed: its FLOPs are those of res5's and res6's \
           later blocks with an ungrouped last 1×1 (4.10 GMACs), its memory a 512-channel res4 \
           (docs/performance.md, \"How to read the supplementary's table\")",
};

fn conv_params(s: &ConvSpec) -> u64 {
    (s.out_channels * (s.in_channels / s.groups) * s.kernel * s.kernel) as u64
}

/// Tensors of a conv's output size kept for the backward of conv + training-mode BatchNorm
/// (`nn::batch_norm_op`): the conv output (the batch norm's input) and the batch norm's output
/// (the next conv's input, ReLU fused in).
const CONV_BN_SAVED: u64 = 2;

/// Cost of one block on a `[C, H, W]` input, per image.
struct BlockCost {
    params: u64,
    macs: u64,
    /// Elements the engine keeps for the backward.
    saved: u64,
    /// The residual branch's conv channels at the block's output size (the paper-style count).
    branch_maps: u64,
    output: [usize; 3],
}

/// Saved as `exec::chain` runs a block in training: each conv's output; each batch norm's
/// output but the last, whose batch norm, residual sum and ReLU are one op writing the block's
/// output (the next block's leaf); the projection's conv and batch norm outputs.
fn block_cost(spec: &BlockSpec, h: usize, w: usize) -> BlockCost {
    let mut convs = spec.convs();
    let projection = if spec.has_projection() { convs.pop() } else { None };
    let (mut params, mut macs, mut saved, mut branch_maps) = (0, 0, 0, 0);
    let (mut ch, mut cw) = (h, w);
    let last = convs.len() - 1;
    for (i, s) in convs.iter().enumerate() {
        (ch, cw) = (s.out_size(ch), s.out_size(cw));
        let out = (s.out_channels * ch * cw) as u64;
        params += conv_params(s) + 2 * s.out_channels as u64;
        macs += s.macs(ch, cw);
        saved += out * if i != last { CONV_BN_SAVED } else { 1 };
        branch_maps += s.out_channels as u64;
    }
    branch_maps *= (ch * cw) as u64;
    let out = (spec.out_channels * ch * cw) as u64;
    if let Some(p) = projection {
        let (ph, pw) = (p.out_size(h), p.out_size(w));
        params += conv_params(&p) + 2 * p.out_channels as u64;
        macs += p.macs(ph, pw);
        saved += (p.out_channels * ph * pw) as u64 * CONV_BN_SAVED;
    }
    // The block's output.
    saved += out;
    BlockCost { params, macs, saved, branch_maps, output: [spec.out_channels, ch, cw] }
}

fn stem_cost(cfg: &StemConfig, input: [usize; 3]) -> (u64, u64, u64) {
    let s = cfg.conv_spec(input[0]);
    let (h, w) = (s.out_size(input[1]), s.out_size(input[2]));
    let conv_out = (s.out_channels * h * w) as u64;
    let saved = if cfg.kind == StemKind::Imagenet {
        // `nn::stem_pool_op`: the conv output, then the max pool's output and the u32 argmax
        // positions (same size); the normalised map is never kept.
        conv_out + 2 * (s.out_channels * ((h - 1) / 2 + 1) * ((w - 1) / 2 + 1)) as u64
    } else {
        conv_out * CONV_BN_SAVED
    };
    (conv_params(&s) + 2 * s.out_channels as u64, s.macs(h, w), saved)
}

fn decoder_saved(cfg: &DecoderConfig, input: &[usize]) -> u64 {
    let mut saved = 0;
    let mut pooled = input.first().copied().unwrap_or(0);
    if let [c, h, w] = *input {
        let (mut c, mut h, mut w) = (c, h, w);
        for spec in cfg.block_specs(c) {
            let b = block_cost(&spec, h, w);
            saved += b.saved;
            [c, h, w] = b.output;
        }
        pooled = c;
        saved += c as u64;
    }
    // Each linear layer keeps its matmul and bias-add outputs, a ReLU between layers.
    let hidden = cfg.mlp.hidden.unwrap_or(pooled);
    for i in 0..cfg.mlp.depth {
        let last = i + 1 == cfg.mlp.depth;
        let d = if last { cfg.mlp.out } else { hidden } as u64;
        saved += d * (2 + u64::from(!last) + if cfg.mlp.batch_norm && !last { 4 } else { 0 });
    }
    saved
}

/// Elements (per image) of every tensor candle's autograd keeps alive for the backward of a
/// node built from `cfg` on a per-image `input` shape, the node's output included.
///
/// Counted: each conv output, each fused batch norm + ReLU output but a block's last (see
/// [`block_cost`]), each block's output, a stage's bilinear resize (the row-resized
/// intermediate and the output), the stem's max pool output and argmax positions, a decoder's
/// pooled vector and MLP activations. Not counted: per-channel statistics, the node's input
/// (its producer or the engine owns it), and the loss (its `[2N, 2N]` similarity matrix does
/// not scale with the image).
pub fn saved_elems(cfg: &NodeConfig, input: &[usize]) -> u64 {
    match (cfg, input) {
        (NodeConfig::Stem(s), &[c, h, w]) => stem_cost(s, [c, h, w]).2,
        (NodeConfig::Stage(s), &[c, h, w]) => {
            let mut saved = 0;
            let (mut h, mut w) = (h, w);
            if let Some(r) = s.resize {
                // Columns first ([C, H, r]), then rows ([C, r, r]); a side already at r is skipped.
                if w != r {
                    saved += (c * h * r) as u64;
                }
                if h != r {
                    saved += (c * r * r) as u64;
                }
                (h, w) = (r, r);
            }
            for spec in s.block_specs(c) {
                let b = block_cost(&spec, h, w);
                saved += b.saved;
                (h, w) = (b.output[1], b.output[2]);
            }
            saved
        }
        (NodeConfig::Decoder(d), _) => decoder_saved(d, input),
        _ => 0,
    }
}

/// Profiles the encoder of `c` (its stem and stage nodes, in forward order) for a square
/// `input × input` image with the experiment's channel count. Decoders and losses are left out.
///
/// Shapes are inferred again for `input`; a stage that does not fit that size (a feature map
/// that vanishes) ends the profile there.
pub fn profile(c: &Compiled, input: usize) -> Profile {
    let channels = c.graph[c.input].shape.first().copied().unwrap_or(3);
    let mut shapes: Vec<Option<Vec<usize>>> = vec![None; c.graph.node_count()];
    shapes[c.input.index()] = Some(vec![channels, input, input]);
    let mut rows: Vec<NodeProfile> = vec![];
    let mut stem: Option<(String, u64, u64, u64)> = None;
    let mut last_channels = 0;
    for n in c.schedule.forward_order() {
        let Some(cfg) = &c.graph[n].config else { continue };
        if !matches!(cfg, NodeConfig::Stem(_) | NodeConfig::Stage(_)) {
            continue;
        }
        let Some(inp) = c.producer(n).and_then(|(_, p)| shapes[p.index()].clone()) else { continue };
        let Ok(out) = crate::graph::shape::infer(cfg, &inp) else { break };
        let &[ic, ih, iw] = inp.as_slice() else { break };
        shapes[n.index()] = Some(out.clone());
        last_channels = out[0];
        match cfg {
            NodeConfig::Stem(s) => {
                let (p, m, sv) = stem_cost(s, [ic, ih, iw]);
                stem = Some((c.id(n).to_string(), p, m, sv));
            }
            NodeConfig::Stage(s) => {
                let mut row = NodeProfile {
                    id: c.id(n).to_string(),
                    folded: vec![],
                    output: out.clone(),
                    params: 0,
                    macs: 0,
                    paper_elems: 0,
                    saved_elems: saved_elems(cfg, &inp),
                };
                let (mut h, mut w) = s.resize.map_or((ih, iw), |r| (r, r));
                for spec in s.block_specs(ic) {
                    let b = block_cost(&spec, h, w);
                    row.params += b.params;
                    row.macs += b.macs;
                    row.paper_elems += b.branch_maps;
                    (h, w) = (b.output[1], b.output[2]);
                }
                if let Some((id, p, m, sv)) = stem.take() {
                    row.folded.push(id);
                    row.params += p;
                    row.macs += m;
                    row.saved_elems += sv;
                }
                rows.push(row);
            }
            _ => {}
        }
    }
    Profile { input, rows, fc_params: (last_channels * 1000 + 1000) as u64 }
}

impl Profile {
    /// Encoder parameters (without the classifier).
    pub fn params(&self) -> u64 {
        self.rows.iter().map(|r| r.params).sum()
    }
    /// Multiply-accumulates per image.
    pub fn macs(&self) -> u64 {
        self.rows.iter().map(|r| r.macs).sum()
    }
    pub fn paper_elems(&self) -> u64 {
        self.rows.iter().map(|r| r.paper_elems).sum()
    }
    pub fn saved_elems(&self) -> u64 {
        self.rows.iter().map(|r| r.saved_elems).sum()
    }
    /// Each row's share of the FLOPs, in percent.
    pub fn macs_pct(&self) -> Vec<f64> {
        pct(self.rows.iter().map(|r| r.macs), self.macs())
    }
    /// Each row's share of the paper-style activation memory, in percent.
    pub fn paper_mem_pct(&self) -> Vec<f64> {
        pct(self.rows.iter().map(|r| r.paper_elems), self.paper_elems())
    }
    /// Each row's share of the candle-saved activation memory, in percent.
    pub fn saved_mem_pct(&self) -> Vec<f64> {
        pct(self.rows.iter().map(|r| r.saved_elems), self.saved_elems())
    }
    /// The supplementary's table for this encoder, when it is ResNet-50 or PResNet-50.
    fn reference(&self) -> Option<Reference> {
        let ids: Vec<&str> = self.rows.iter().map(|r| r.id.as_str()).collect();
        let out = self.rows.last().map(|r| r.output[0]);
        [RESNET50, PRESNET50].into_iter().find(|r| {
            let want: Vec<&str> = r.rows.iter().map(|r| r.0).collect();
            ids == want && out == Some(if r.rows.len() == 4 { 2048 } else { 4096 })
        })
    }
}

fn pct(xs: impl Iterator<Item = u64>, total: u64) -> Vec<f64> {
    xs.map(|x| if total == 0 { 0.0 } else { 100.0 * x as f64 / total as f64 }).collect()
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reference = self.reference();
        writeln!(f, "Encoder profile at {0}×{0} (per image; FLOPs = multiply-accumulates)", self.input)?;
        if let Some(r) = &reference {
            writeln!(f, "`paper` columns: the LoCo supplementary's table for {}", r.name)?;
        }
        let (mp, pp, sp) = (self.macs_pct(), self.paper_mem_pct(), self.saved_mem_pct());
        let mut rows = vec![vec![
            "stage".to_string(),
            "output".into(),
            "params".into(),
            "MFLOPs".into(),
            "FLOPs %".into(),
            "paper".into(),
            "mem %".into(),
            "paper".into(),
            "saved MB".into(),
            "saved %".into(),
        ]];
        for (i, r) in self.rows.iter().enumerate() {
            let paper = reference.and_then(|r| r.rows.get(i).copied());
            let name = if r.folded.is_empty() { r.id.clone() } else { format!("{}+{}", r.folded.join("+"), r.id) };
            let out: Vec<String> = r.output.iter().map(usize::to_string).collect();
            rows.push(vec![
                name,
                out.join("×"),
                format!("{:.2} M", r.params as f64 / 1e6),
                format!("{:.1}", r.macs as f64 / 1e6),
                format!("{:.2}", mp[i]),
                paper.map_or("-".into(), |p| format!("{:.2}", p.2)),
                format!("{:.2}", pp[i]),
                paper.map_or("-".into(), |p| format!("{:.2}", p.1)),
                format!("{:.1}", r.saved_elems as f64 * 4.0 / 1e6),
                format!("{:.2}", sp[i]),
            ]);
        }
        let widths: Vec<usize> =
            (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
        for r in &rows {
            let line: Vec<String> = r.iter().zip(&widths).map(|(s, w)| format!("{s:>w$}")).collect();
            writeln!(f, "{}", line.join("  "))?;
        }
        writeln!(
            f,
            "total: {:.2} M parameters ({:.2} M with a 1000-way fc), {:.3} GFLOPs{}",
            self.params() as f64 / 1e6,
            (self.params() + self.fc_params) as f64 / 1e6,
            self.macs() as f64 / 1e9,
            reference.map_or(String::new(), |r| format!(" (paper: {} GFLOPs)", r.gflops))
        )?;
        writeln!(
            f,
            "activations per image: {:.1} MB paper-style (residual-branch conv outputs), {:.1} MB kept for the backward (f32)",
            self.paper_elems() as f64 * 4.0 / 1e6,
            self.saved_elems() as f64 * 4.0 / 1e6
        )?;
        match reference {
            Some(r) if !r.note.is_empty() => writeln!(f, "{}", r.note),
            _ => Ok(()),
        }
    }
}
