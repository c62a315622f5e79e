//! What training an experiment on R ranks costs each rank, predicted from the plan alone:
//! memory (its share of the batch through the plan's memory model, plus what global negatives
//! add) and communication per step (bytes and, for an assumed link, seconds).
//!
//! Communication per step, per rank, with `G` gradient bytes (f32, every parameter), `N` images,
//! `D` the width of a loss's embeddings, `L` losses, `K` batch norms:
//! - gradients: a ring all-reduce in buckets of 25 MiB: `2(R−1)/R · G` bytes, `2(R−1)` latencies
//!   per bucket. It overlaps the backward of the nodes not yet done (`dist::reducer`).
//! - global negatives: per loss, an all-gather of the `2N × D` embeddings (`(R−1)/R · 2ND·4`
//!   bytes in) and, backward, an all-reduce of their gradient (`2(R−1)/R · 2ND·4`).
//! - synchronised batch norm: per batch norm, two all-reduces forward and one per backward pass
//!   through its node, of `C` to `2C` f64 each: latency-bound, `2·log₂R` latencies each
//!   (recursive doubling).
//!
//! The seconds are a model (bandwidth and latency as given), not a measurement; the batch norm
//! and loss collectives sit on the step's critical path, the gradients' mostly do not.

use crate::config::NodeConfig;
use crate::graph::memory::MemoryEstimate;
use crate::graph::Plan;

/// The link between ranks the seconds assume.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// Bytes per second each rank sends (and receives).
    pub bandwidth: f64,
    /// Seconds per message.
    pub latency: f64,
}

impl Link {
    /// 25 GB/s per rank, 10 µs a message: one InfiniBand HDR port (200 Gb/s) per GPU, the usual
    /// multi-node GPU cluster. NVLink inside one 8-GPU node is several times faster.
    pub const INFINIBAND_HDR: Link = Link { bandwidth: 25e9, latency: 10e-6 };
}

/// Gradient bucket size the model assumes (`train.gradient_bucket_mb`'s default).
const BUCKET: f64 = 25.0 * 1048576.0;

/// One rank's share of a step on `ranks` ranks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankCost {
    pub ranks: usize,
    /// Images of the global batch the largest share holds.
    pub images: usize,
    /// The largest share's step memory (activations of its views, the gathered similarities,
    /// parameters with gradients and optimizer state).
    pub memory: MemoryEstimate,
    /// Bytes this rank sends per step: gradients, losses' embeddings, batch norm sums.
    pub gradient_bytes: f64,
    pub gather_bytes: f64,
    pub batch_norm_bytes: f64,
    /// Collectives per step that wait for every rank on the step's path (batch norm, losses).
    pub blocking_collectives: usize,
    /// Modelled seconds per step over the link: gradients (overlappable), the rest (not).
    pub gradient_s: f64,
    pub blocking_s: f64,
}

/// Batch norms in node `n`'s layer, and the backward passes through it per step.
fn batch_norms(plan: &Plan, n: petgraph::graph::NodeIndex) -> usize {
    let in_c = plan.producer(n).map(|(_, p)| plan.graph[p].shape.first().copied().unwrap_or(0)).unwrap_or(0);
    match &plan.graph[n].config {
        Some(NodeConfig::Stem(_)) => 1,
        Some(NodeConfig::Stage(s)) => s.block_specs(in_c).iter().map(|b| b.convs().len()).sum(),
        Some(NodeConfig::Decoder(d)) => {
            let convs: usize = d.block_specs(in_c).iter().map(|b| b.convs().len()).sum();
            convs + if d.mlp.batch_norm { d.mlp.depth.saturating_sub(1) } else { 0 }
        }
        _ => 0,
    }
}

/// [`RankCost`] of training `plan` with a global batch of `batch` images on `ranks` ranks,
/// activations of `elem_bytes`, an optimizer of `optimizer_slots` state tensors per parameter.
pub fn rank_cost(
    plan: &Plan,
    batch: usize,
    ranks: usize,
    elem_bytes: usize,
    optimizer_slots: usize,
    link: Link,
) -> RankCost {
    let r = ranks.max(1) as f64;
    let images = batch.div_ceil(ranks.max(1));
    let (local, global) = (2 * images, 2 * batch);
    let mut memory = plan.memory_estimate(local, elem_bytes, optimizer_slots);
    let (params, _) = plan.parameter_counts();
    let gradient = params as f64 * 4.0;
    let ring = 2.0 * (r - 1.0) / r;
    let (mut gather_bytes, mut bn_bytes, mut blocking, mut blocking_s) = (0.0, 0.0, 0usize, 0.0);
    let small = |k: f64| 2.0 * r.log2().max(0.0) * link.latency * k;
    for n in plan.graph.node_indices() {
        let passes = plan.reach.groups(n).len();
        let node = &plan.graph[n];
        if let Some(NodeConfig::NtXent(_)) = node.config {
            let dim = plan.producer(n).map(|(_, p)| plan.graph[p].shape.iter().product::<usize>()).unwrap_or(0) as f64;
            let embeddings = global as f64 * dim * 4.0;
            // Each rank's similarities grow from (2n)² to 2n × 2N: what the model's local
            // views leave out (f32, softmax and its gradient: the pairwise cost's factor).
            let pairwise = plan.cost(n).pairwise as f64 * (local * global - local * local) as f64 * 4.0;
            if ranks > 1 {
                memory.activations += pairwise + embeddings;
                gather_bytes += (r - 1.0) / r * embeddings + ring * embeddings;
                blocking += 4;
                blocking_s += (r - 1.0) * link.latency + 2.0 * (r - 1.0) * link.latency + small(2.0);
                blocking_s += ((r - 1.0) / r * embeddings + ring * embeddings) / link.bandwidth;
            }
            continue;
        }
        let k = batch_norms(plan, n);
        if k == 0 || ranks == 1 {
            continue;
        }
        let channels = node.shape.first().copied().unwrap_or(0) as f64;
        let calls = k * (2 + passes);
        blocking += calls;
        bn_bytes += k as f64 * (2.0 + 2.0 * passes as f64) * channels * 8.0;
        blocking_s += small(calls as f64);
    }
    let buckets = (gradient / BUCKET).ceil().max(1.0);
    let (gradient_bytes, gradient_s) = if ranks > 1 {
        (ring * gradient, ring * gradient / link.bandwidth + 2.0 * (r - 1.0) * link.latency * buckets)
    } else {
        (0.0, 0.0)
    };
    RankCost {
        ranks,
        images,
        memory,
        gradient_bytes,
        gather_bytes,
        batch_norm_bytes: bn_bytes,
        blocking_collectives: blocking,
        gradient_s,
        blocking_s,
    }
}

/// The fewest ranks (at most one image each) whose largest share's step fits in `memory` bytes;
/// `None` when not even one image per rank fits.
pub fn ranks_needed(
    plan: &Plan,
    batch: usize,
    elem_bytes: usize,
    optimizer_slots: usize,
    memory: f64,
) -> Option<usize> {
    let fits = |r: usize| {
        rank_cost(plan, batch, r, elem_bytes, optimizer_slots, Link::INFINIBAND_HDR).memory.total() <= memory
    };
    if !fits(batch.max(1)) {
        return None;
    }
    // Memory falls as the ranks grow (each holds fewer images): the smallest count that fits.
    let (mut lo, mut hi) = (1usize, batch.max(1));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(lo)
}

/// `80G`, `512M`, `1.5T`, `1000000` (powers of 1024, as `LOCOGRAPH_MEMORY_LIMIT`) → bytes.
pub fn parse_size(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1024f64),
        Some('M') => (&s[..s.len() - 1], 1024f64.powi(2)),
        Some('G') => (&s[..s.len() - 1], 1024f64.powi(3)),
        Some('T') => (&s[..s.len() - 1], 1024f64.powi(4)),
        _ => (s, 1.0),
    };
    num.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0).map(|v| v * mult)
}

fn gib(b: f64) -> String {
    format!("{:.1} GiB", b / 1024f64.powi(3))
}

/// The table `locograph profile --ranks` and `validate --ranks` print: per rank count, each
/// rank's images, step memory and communication; with `rank_memory`, the fewest ranks of that
/// memory the step fits on.
pub fn report(
    plan: &Plan,
    batch: usize,
    elem_bytes: usize,
    optimizer_slots: usize,
    ranks: &[usize],
    rank_memory: Option<f64>,
) -> String {
    let link = Link::INFINIBAND_HDR;
    let mut out = format!(
        "across ranks (global batch {batch}; data parallel, global negatives, synchronised batch norm; seconds for {:.0} GB/s and {:.0} µs a message per rank: a model, not a measurement):\n",
        link.bandwidth / 1e9,
        link.latency * 1e6
    );
    out += "  ranks  images/rank  memory/rank  gradients sent  embeddings sent  BN sent  blocking collectives  gradient s  blocking s\n";
    for &r in ranks {
        let c = rank_cost(plan, batch, r, elem_bytes, optimizer_slots, link);
        out += &format!(
            "  {:>5}  {:>11}  {:>11}  {:>11.1} MB  {:>12.1} MB  {:>5.2} MB  {:>20}  {:>10.4}  {:>10.4}\n",
            r,
            c.images,
            gib(c.memory.total()),
            c.gradient_bytes / 1e6,
            c.gather_bytes / 1e6,
            c.batch_norm_bytes / 1e6,
            c.blocking_collectives,
            c.gradient_s,
            c.blocking_s
        );
    }
    if let Some(m) = rank_memory {
        out += &match ranks_needed(plan, batch, elem_bytes, optimizer_slots, m) {
            Some(n) => format!(
                "needs at least {n} rank(s) of {} ({} images each, about {} per rank)\n",
                gib(m),
                batch.div_ceil(n),
                gib(rank_cost(plan, batch, n, elem_bytes, optimizer_slots, link).memory.total())
            ),
            None => format!("does not fit ranks of {} even at one image per rank\n", gib(m)),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load;
    use std::path::Path;

    fn plan(file: &str) -> Plan {
        let loaded = load(Path::new(file)).unwrap_or_else(|e| panic!("{e}"));
        crate::graph::compile(&loaded).unwrap_or_else(|e| panic!("{e}"))
    }

    /// One rank is the plan's own estimate and sends nothing; more ranks hold less each and
    /// send the ring's share of the gradients; `ranks_needed` is the smallest count that fits.
    #[test]
    fn one_rank_is_the_plan_and_more_ranks_share_it() {
        let p = plan("experiments/simclr_resnet50_imagenet.yaml");
        let one = rank_cost(&p, 4096, 1, 4, 1, Link::INFINIBAND_HDR);
        assert_eq!(one.memory, p.memory_estimate(8192, 4, 1));
        assert_eq!((one.gradient_bytes, one.gather_bytes, one.blocking_collectives), (0.0, 0.0, 0));
        let (p8, p64) =
            (rank_cost(&p, 4096, 8, 4, 1, Link::INFINIBAND_HDR), rank_cost(&p, 4096, 64, 4, 1, Link::INFINIBAND_HDR));
        assert_eq!((p8.images, p64.images), (512, 64));
        assert!(p64.memory.total() < p8.memory.total() && p8.memory.total() < one.memory.total());
        let (params, _) = p.parameter_counts();
        assert!((p8.gradient_bytes - 2.0 * 7.0 / 8.0 * params as f64 * 4.0).abs() < 1.0);
        // ResNet-50: 53 batch norms, each 2 collectives forward and 1 backward; 4 per loss.
        assert_eq!(p8.blocking_collectives, 53 * 3 + 4);
        let gb = 1024f64.powi(3);
        let need = ranks_needed(&p, 4096, 4, 1, 80.0 * gb).expect("fits on some count");
        assert!(rank_cost(&p, 4096, need, 4, 1, Link::INFINIBAND_HDR).memory.total() <= 80.0 * gb);
        assert!(rank_cost(&p, 4096, need - 1, 4, 1, Link::INFINIBAND_HDR).memory.total() > 80.0 * gb);
        assert_eq!(ranks_needed(&p, 4096, 4, 1, 1e6), None, "1 MB fits no share");
    }
}
