//! `locograph profile`: parameters, FLOPs and activation memory of every encoder stage, as the
//! plan's per-node costs give them (from the layer specs; nothing is allocated), printed beside
//! the LoCo supplementary's table.
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
//! - **Memory, saved**: every tensor the node keeps for its backward, as this crate builds the
//!   node ([`Cost::saved`]): what a node holds while its graph is alive.
//!
//! The stem is **folded into the first stage** (the paper's "conv1 + res2" row): its
//! parameters, FLOPs and saved tensors are added to that row; it has no paper-style memory,
//! which counts residual blocks only.

use std::fmt;

use crate::config::NodeConfig;
use crate::graph::Plan;
use crate::nn::Cost;

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

/// Profiles the encoder of `plan` (its stem and stage nodes, in forward order) at the plan's
/// input size, from the plan's per-node costs. Decoders and losses are left out.
pub fn profile(plan: &Plan) -> Profile {
    let input = plan.graph[plan.input].shape.get(1).copied().unwrap_or(0);
    let mut rows: Vec<NodeProfile> = vec![];
    let mut stem: Option<(String, Cost)> = None;
    let mut last_channels = 0;
    for n in plan.order.forward_order() {
        let Some(cfg) = &plan.graph[n].config else { continue };
        let cost = *plan.cost(n);
        match cfg {
            NodeConfig::Stem(_) => stem = Some((plan.id(n).to_string(), cost)),
            NodeConfig::Stage(_) => {
                let output = plan.graph[n].shape.clone();
                last_channels = output.first().copied().unwrap_or(0);
                let mut row = NodeProfile {
                    id: plan.id(n).to_string(),
                    folded: vec![],
                    output,
                    params: cost.params,
                    macs: cost.macs,
                    paper_elems: cost.paper,
                    saved_elems: cost.saved,
                };
                if let Some((id, s)) = stem.take() {
                    row.folded.push(id);
                    row.params += s.params;
                    row.macs += s.macs;
                    row.saved_elems += s.saved;
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
