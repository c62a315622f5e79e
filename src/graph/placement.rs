//! Which rank runs which node when a local method's units train on separate workers, and what
//! each rank then computes, holds and exchanges per step — from the plan's per-node costs.
//!
//! An automatic placement cuts the encoder's chain of stages into contiguous runs, one per rank,
//! minimising the largest rank's load ([`Balance`]); every other node (a decoder, a loss, a
//! moving average) runs on the rank of the encoder node it reads from. The batch (`input`,
//! `labels`) is read on every rank that needs it: the data order is a pure function of the seed,
//! so each rank's loader gives the same images.

use petgraph::graph::{EdgeIndex, NodeIndex};
use petgraph::visit::EdgeRef;

use super::plan::Plan;
use super::{GraphError, GraphErrors};
use crate::config::{Balance, Loaded, NodeConfig, PlacementConfig};

/// Nodes → ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub ranks: usize,
    /// Per node (graph order): its rank; `None` for `input` and `labels`, read on every rank.
    rank: Vec<Option<usize>>,
}

/// One rank's share of a step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RankCost {
    pub nodes: Vec<String>,
    /// Multiply-accumulates of its forwards and backward passes (a backward ≈ 2× its forward).
    pub macs: f64,
    /// The most activation bytes it holds at once (its nodes', the values it receives, the
    /// cotangents sent to it).
    pub activations: f64,
    /// Its parameters with their gradients and the optimizer's state.
    pub parameters: f64,
    /// Bytes it sends (activations forward, cotangents back).
    pub sent: f64,
    pub received: f64,
}

impl Placement {
    /// The rank of `n` (`None`: read on every rank).
    pub fn rank(&self, n: NodeIndex) -> Option<usize> {
        self.rank[n.index()]
    }

    /// Whether rank `r` computes node `n` (a batch node: wherever it is read).
    pub fn runs(&self, r: usize, n: NodeIndex) -> bool {
        self.rank(n).is_none_or(|x| x == r)
    }

    /// Edges between nodes on different ranks: a value goes forward over them, and a cotangent
    /// back where gradient flows.
    pub fn crossing(&self, plan: &Plan) -> Vec<EdgeIndex> {
        plan.graph
            .edge_references()
            .filter(|e| matches!((self.rank(e.source()), self.rank(e.target())), (Some(a), Some(b)) if a != b))
            .map(|e| e.id())
            .collect()
    }

    /// What each rank computes, holds and exchanges in one step of `views` images, activations at
    /// `elem_bytes` per element, `optimizer_slots` state tensors per parameter.
    pub fn costs(&self, plan: &Plan, views: usize, elem_bytes: usize, optimizer_slots: usize) -> Vec<RankCost> {
        let mut out = vec![RankCost::default(); self.ranks];
        for n in plan.graph.node_indices() {
            let Some(r) = self.rank(n) else { continue };
            let c = plan.cost(n);
            out[r].nodes.push(plan.id(n).to_string());
            out[r].macs += node_macs(plan, n, views);
            out[r].parameters += (c.params as f64 * (2 + optimizer_slots) as f64 + c.buffers as f64) * 4.0;
        }
        for e in self.crossing(plan) {
            let (p, c) = plan.graph.edge_endpoints(e).expect("edge exists");
            let (rp, rc) = (self.rank(p).unwrap_or(0), self.rank(c).unwrap_or(0));
            let bytes = plan.cost(p).output_bytes(views, elem_bytes) as f64;
            out[rp].sent += bytes;
            out[rc].received += bytes;
            // One cotangent per backward group of the consumer that sends its gradient here.
            let back = plan.reach.groups(c).iter().filter(|g| g.input_edges.contains(&e)).count() as f64;
            out[rc].sent += back * bytes;
            out[rp].received += back * bytes;
        }
        for (r, cost) in out.iter_mut().enumerate() {
            let held = plan.held_bytes_on(views, elem_bytes, &|n| self.rank(n) == Some(r));
            cost.activations = held.peak().map_or(0, |p| p.1) as f64;
        }
        out
    }
}

/// The table `locograph profile --ranks N` prints for a stage-parallel experiment: each rank's
/// nodes, and its predicted compute, activations, parameters and traffic per step, for every rank
/// count asked for.
pub fn report(
    plan: &Plan,
    loaded: &Loaded,
    cfg: &PlacementConfig,
    ranks: &[usize],
    elem_bytes: usize,
    optimizer_slots: usize,
) -> Result<String, GraphErrors> {
    let views = 2 * loaded.experiment.train.batch_size;
    let mb = |b: f64| format!("{:.1} MB", b / 1e6);
    let mut out = format!(
        "stage-parallel ({}, {} views per step; predicted from the plan, not measured):\n",
        if cfg.nodes.is_empty() {
            format!("placed automatically by {:?}", cfg.by).to_lowercase()
        } else {
            "placement given".into()
        },
        views
    );
    for &n in ranks {
        let p = place(plan, loaded, cfg, n, views)?;
        let costs = p.costs(plan, views, elem_bytes, optimizer_slots);
        let total: f64 = costs.iter().map(|c| c.macs).sum();
        out += &format!("  {n} ranks:\n    rank  GMACs  share  activations  parameters     sent  received  nodes\n");
        for (r, c) in costs.iter().enumerate() {
            out += &format!(
                "    {r:>4}  {:>5.1}  {:>4.0} %  {:>11}  {:>10}  {:>7}  {:>8}  {}\n",
                c.macs / 1e9,
                100.0 * c.macs / total.max(1.0),
                mb(c.activations),
                mb(c.parameters),
                mb(c.sent),
                mb(c.received),
                c.nodes.join(" ")
            );
        }
    }
    Ok(out)
}

/// Multiply-accumulates of node `n` in one step: its forward, and two forwards' worth for each of
/// its backward passes (the input and the parameter gradients).
fn node_macs(plan: &Plan, n: NodeIndex, views: usize) -> f64 {
    let passes = plan.reach.groups(n).len() as f64;
    plan.cost(n).macs as f64 * views as f64 * (1.0 + 2.0 * passes)
}

fn is_encoder(plan: &Plan, n: NodeIndex) -> bool {
    matches!(plan.graph[n].config, Some(NodeConfig::Stem(_) | NodeConfig::Stage(_))) && plan.graph[n].ema.is_none()
}

/// The encoder node `n` hangs from: itself, or the first encoder node up its first inputs
/// (a moving average: the node it averages).
fn anchor(plan: &Plan, mut n: NodeIndex) -> Option<NodeIndex> {
    loop {
        if let Some(e) = &plan.graph[n].ema {
            n = *plan.ids.get(&e.of)?;
        }
        if is_encoder(plan, n) {
            return Some(n);
        }
        n = plan.producer(n)?.1;
    }
}

/// The placement of `plan` on `ranks` ranks: `cfg.nodes` when given, else automatic by
/// `cfg.by`. Errors are located at `placement.nodes.<id>`.
pub fn place(
    plan: &Plan,
    loaded: &Loaded,
    cfg: &PlacementConfig,
    ranks: usize,
    views: usize,
) -> Result<Placement, GraphErrors> {
    let err = |message| GraphErrors(vec![GraphError { location: loaded.locations.path("placement"), message }]);
    if ranks == 0 {
        return Err(err("a placement needs at least one rank".into()));
    }
    let encoder: Vec<NodeIndex> = plan.order.forward_order().into_iter().filter(|&n| is_encoder(plan, n)).collect();
    let mut rank = if cfg.nodes.is_empty() {
        if encoder.len() < ranks {
            return Err(err(format!(
                "{ranks} ranks but the encoder has {} stem and stage nodes: at most one rank per node",
                encoder.len()
            )));
        }
        place_auto(plan, &encoder, cfg.by, ranks, views)
    } else {
        place_given(plan, loaded, cfg, &encoder, ranks)?
    };
    place_rest(plan, loaded, &mut rank)?;
    for r in 0..ranks {
        if !rank.contains(&Some(r)) {
            return Err(err(format!("rank {r} runs no node")));
        }
    }
    // A batch node runs wherever it is read.
    for n in [Some(plan.input), plan.labels()].into_iter().flatten() {
        rank[n.index()] = None;
    }
    Ok(Placement { ranks, rank })
}

/// Each encoder node's rank when the file names none: contiguous runs of the encoder, each
/// node weighed with what hangs from it, balanced by `by`.
fn place_auto(plan: &Plan, encoder: &[NodeIndex], by: Balance, ranks: usize, views: usize) -> Vec<Option<usize>> {
    let mut rank: Vec<Option<usize>> = vec![None; plan.graph.node_count()];
    let mut load = vec![0.0; encoder.len()];
    for n in plan.graph.node_indices() {
        let Some(a) = anchor(plan, n) else { continue };
        let Some(i) = encoder.iter().position(|&x| x == a) else { continue };
        let c = plan.cost(n);
        load[i] += match by {
            Balance::Compute => node_macs(plan, n, views),
            Balance::Memory => (c.saved_bytes(views, 4) as f64) + c.params as f64 * 4.0 * 4.0,
            Balance::Count => f64::from(u8::from(is_encoder(plan, n))),
        };
    }
    for (i, r) in split(&load, ranks).into_iter().enumerate() {
        rank[encoder[i].index()] = Some(r);
    }
    rank
}

/// The ranks the file gives (`placement.nodes`), every problem located: an unknown node, a
/// rank beyond the job's, an encoder node left without one.
fn place_given(
    plan: &Plan,
    loaded: &Loaded,
    cfg: &PlacementConfig,
    encoder: &[NodeIndex],
    ranks: usize,
) -> Result<Vec<Option<usize>>, GraphErrors> {
    let at = |id: &str| loaded.locations.path(&format!("placement.nodes.{id}"));
    let mut rank: Vec<Option<usize>> = vec![None; plan.graph.node_count()];
    let mut problems = vec![];
    for (id, &r) in &cfg.nodes {
        match plan.ids.get(id) {
            None => problems.push(GraphError { location: at(id), message: format!("no node `{id}` in the graph") }),
            Some(_) if r >= ranks => problems.push(GraphError {
                location: at(id),
                message: format!("`{id}` is placed on rank {r}, but the job has {ranks} ranks (0..{})", ranks - 1),
            }),
            Some(&n) => rank[n.index()] = Some(r),
        }
    }
    for &n in encoder {
        if rank[n.index()].is_none() {
            problems.push(GraphError {
                location: loaded.locations.path("placement.nodes"),
                message: format!("`{}` has no rank: give every stem and stage one", plan.id(n)),
            });
        }
    }
    if problems.is_empty() {
        Ok(rank)
    } else {
        Err(GraphErrors(problems))
    }
}

/// Everything else runs where the encoder node it hangs from runs; a moving average placed by
/// the file must be on the rank of the node it averages.
fn place_rest(plan: &Plan, loaded: &Loaded, rank: &mut [Option<usize>]) -> Result<(), GraphErrors> {
    let mut problems = vec![];
    for n in plan.graph.node_indices() {
        if plan.graph[n].config.is_none() || rank[n.index()].is_some() && plan.graph[n].ema.is_none() {
            continue;
        }
        let Some(a) = anchor(plan, n) else { continue };
        let want = rank[a.index()];
        match (rank[n.index()], plan.graph[n].ema.as_ref()) {
            (Some(r), Some(e)) if Some(r) != want => problems.push(GraphError {
                location: loaded.locations.path(&format!("placement.nodes.{}", plan.id(n))),
                message: format!("`{}` averages `{}`, so it must run on `{}`'s rank", plan.id(n), e.of, e.of),
            }),
            (Some(_), _) => {}
            (None, _) => rank[n.index()] = want,
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(GraphErrors(problems))
    }
}

/// Cuts `load` (in order) into `parts` contiguous runs minimising the largest run's sum; the
/// part of each item. Linear-partition dynamic programme, O(n² · parts).
fn split(load: &[f64], parts: usize) -> Vec<usize> {
    let n = load.len();
    let prefix: Vec<f64> = std::iter::once(0.0)
        .chain(load.iter().scan(0.0, |s, &x| {
            *s += x;
            Some(*s)
        }))
        .collect();
    let sum = |i: usize, j: usize| prefix[j] - prefix[i];
    // best[k][j]: the smallest largest run for the first j items in k runs; cut[k][j] where the
    // last run starts.
    let mut best = vec![vec![f64::INFINITY; n + 1]; parts + 1];
    let mut cut = vec![vec![0usize; n + 1]; parts + 1];
    best[0][0] = 0.0;
    for k in 1..=parts {
        for j in k..=n {
            for i in (k - 1)..j {
                let v = best[k - 1][i].max(sum(i, j));
                if v < best[k][j] {
                    best[k][j] = v;
                    cut[k][j] = i;
                }
            }
        }
    }
    let mut part = vec![0; n];
    let (mut j, mut k) = (n, parts);
    while k > 0 {
        let i = cut[k][j];
        for p in part.iter_mut().take(j).skip(i) {
            *p = k - 1;
        }
        j = i;
        k -= 1;
    }
    part
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn the_split_minimises_the_largest_run() {
        assert_eq!(split(&[1.0, 1.0, 1.0, 1.0], 2), vec![0, 0, 1, 1]);
        assert_eq!(split(&[4.0, 1.0, 1.0, 1.0, 1.0], 2), vec![0, 1, 1, 1, 1]);
        // 1+2+3 | 4+5 | 6: largest 9 (1+2+3+4 | 5 | 6 would be 10).
        assert_eq!(split(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3), vec![0, 0, 0, 1, 1, 2]);
        // Every part gets at least one item.
        assert_eq!(split(&[10.0, 0.0, 0.0], 3), vec![0, 1, 2]);
    }
}
