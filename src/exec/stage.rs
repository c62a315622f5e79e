//! One rank's share of a stage-parallel step: the units of a local method trained on separate
//! ranks, each rank running only its own nodes of the plan ([`crate::graph::Placement`]).
//!
//! Every rank walks the whole execution order (`plan.order`) and does the actions of its own
//! nodes. Around them it exchanges what crosses a cut between ranks, through a
//! [`Postbox`] (tags below):
//! - after the forward of `n`, `n`'s value goes once to each other rank that runs a consumer
//!   of `n` (tag: `n`'s index); a rank takes it before the first forward that reads it;
//! - after a backward group of `c` whose gradient flows into an input edge `e` from a producer
//!   on another rank, the cotangent at `e` goes to that rank (tag: `e`'s index and the group);
//!   only the losses the stop edges let through travel — exactly the routing
//!   `locograph explain` prints. GIM sends nothing back;
//! - after the step, a rank's losses go to rank 0 for logging.
//!
//! # Schedules
//! - [`PipelineSchedule::Exact`]: a backward group that needs a cotangent from another rank
//!   waits for this step's. Every gradient is the one a single process computes; since the
//!   optimizer updates a node as soon as its gradients are final, the weights equal a single
//!   process's after every step. A rank still starts its next step as soon as its own actions
//!   are done: GIM's lower ranks run ahead of the upper ones (up to the postbox's `ahead`).
//! - [`PipelineSchedule::Pipelined`]: such a group does not wait. The rank holds the group's
//!   links of step t over ([`StepState::defer`]) and, at step t+1, runs them backward with the
//!   cotangent that came back for step t, adding the result to the node's step-t+1 gradient.
//!   For LoCo this is the shared stage's gradient from the upper unit's loss; it must be the
//!   node's last backward group and send no gradient below (parameters only), or the schedule
//!   is refused ([`StageError::NotDeferrable`]). What each gradient is computed against is
//!   written out in `docs/parallel.md` ("Pipelined: what each gradient is computed against").

use std::time::Instant;

use candle_core::{DType, Tensor};
use petgraph::graph::{EdgeIndex, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use tracing::info_span;

use super::model::Model;
use super::step::{Deferred, OnGradsFinal, StepInput, StepState};
use crate::config::PipelineSchedule;
use crate::dist::postbox::Postbox;
use crate::dist::DistError;
use crate::graph::{Action, Placement, Plan};

/// What stops a stage-parallel step.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The pipelined schedule can hold over only a node's last, parameters-only backward group.
    #[error(
        "the pipelined schedule cannot delay `{node}`'s backward for {losses}: its cotangent comes from rank {from}, \
         and the group {why}; move the cut between ranks (`placement.nodes`) or use `schedule: exact`"
    )]
    NotDeferrable { node: String, losses: String, from: usize, why: &'static str },
    /// The job has not the ranks the given placement names.
    #[error("`placement.nodes` puts the model on {placement} ranks, but the job has {ranks}: start it with `mpirun -np {placement}`")]
    Ranks { placement: usize, ranks: usize },
    /// More ranks than the given placement, by a multiple: replicas of the stages, a stage ×
    /// data grid.
    #[error(
        "{ranks} ranks for a placement on {placement}: the other ranks would be data-parallel replicas of the stages \
         (a stage × data grid), which locograph does not run; start {placement} ranks, or drop `placement:` for data parallelism"
    )]
    DataParallel { placement: usize, ranks: usize },
    /// Something a stage-parallel run does not do.
    #[error("a stage-parallel run (`placement:`) does not support {what}")]
    Unsupported { what: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Dist(#[from] DistError),
}

pub type Result<T> = std::result::Result<T, StageError>;

/// The tag of message carrying losses to rank 0.
const LOSSES: u32 = u32::MAX;

/// The tag of node `n`'s value.
fn value_tag(n: NodeIndex) -> u32 {
    n.index() as u32
}

/// The tag of the cotangent at edge `e` from backward group `group` of its consumer.
fn cotangent_tag(e: EdgeIndex, group: usize) -> u32 {
    0x8000_0000 | ((e.index() as u32) << 8) | group as u32
}

/// A cotangent a backward group waits for from another rank.
#[derive(Clone, Debug)]
struct Incoming {
    from: usize,
    tag: u32,
    /// The losses the consumer's group carries (the cotangent's tag in [`StepState`]).
    losses: Vec<NodeIndex>,
}

/// What one rank did in one step.
#[derive(Clone, Debug, Default)]
pub struct RankStep {
    /// This rank's losses (the loss nodes it runs), in forward order.
    pub losses: Vec<(NodeIndex, f32)>,
    /// Seconds computing, and seconds waiting for messages from other ranks or in sends
    /// ([`crate::dist::postbox::PostStats::waiting_s`]).
    pub busy_s: f64,
    pub waiting_s: f64,
}

/// One rank of a stage-parallel job: what it sends and waits for at each action, worked out
/// once from the plan and the placement.
pub struct StageRank<'a> {
    plan: &'a Plan,
    placement: &'a Placement,
    rank: usize,
    schedule: PipelineSchedule,
    /// Per node: the other ranks that read its value.
    readers: Vec<Vec<usize>>,
    /// Per node and backward group: the cotangents that come from other ranks.
    incoming: Vec<Vec<Vec<Incoming>>>,
    /// Per node: a deferred group's links of the previous step (pipelined).
    held: Vec<Option<Deferred>>,
}

impl<'a> StageRank<'a> {
    /// Rank `rank` of `placement.ranks`; a pipelined schedule is checked here.
    pub fn new(plan: &'a Plan, placement: &'a Placement, rank: usize, schedule: PipelineSchedule) -> Result<Self> {
        let g = &plan.graph;
        let nn = g.node_count();
        let mut readers = vec![vec![]; nn];
        let mut incoming: Vec<Vec<Vec<Incoming>>> =
            g.node_indices().map(|n| vec![vec![]; plan.reach.groups(n).len()]).collect();
        for e in g.edge_references() {
            let (p, c) = (e.source(), e.target());
            let (Some(rp), Some(rc)) = (placement.rank(p), placement.rank(c)) else { continue };
            if rp == rc {
                continue;
            }
            if !readers[p.index()].contains(&rc) {
                readers[p.index()].push(rc);
            }
            for (ci, cg) in plan.reach.groups(c).iter().enumerate() {
                if !cg.input_edges.contains(&e.id()) {
                    continue;
                }
                // The producer's group that this cotangent belongs to (graph::reach: each
                // consumer group's losses lie in exactly one of the producer's groups).
                let Some(pi) = plan.reach.groups(p).iter().position(|pg| pg.losses.contains(&cg.losses[0])) else {
                    continue;
                };
                incoming[p.index()][pi].push(Incoming {
                    from: rc,
                    tag: cotangent_tag(e.id(), ci),
                    losses: cg.losses.clone(),
                });
            }
        }
        for r in &mut readers {
            r.sort_unstable();
        }
        let me =
            StageRank { plan, placement, rank, schedule, readers, incoming, held: (0..nn).map(|_| None).collect() };
        if schedule == PipelineSchedule::Pipelined {
            me.check_deferrable()?;
        }
        Ok(me)
    }

    /// Every group that waits for another rank's cotangent must be its node's last and
    /// parameters-only, for the pipelined schedule to hold it over. Checked for every rank's
    /// nodes, so that every rank refuses the same job.
    fn check_deferrable(&self) -> Result<()> {
        let plan = self.plan;
        for n in plan.graph.node_indices().filter(|&n| self.placement.rank(n).is_some()) {
            let last = plan.order.actions.iter().rev().find_map(|a| match *a {
                Action::Backward { node, group } if node == n => Some(group),
                _ => None,
            });
            for (gi, inc) in self.incoming[n.index()].iter().enumerate() {
                let Some(first) = inc.first() else { continue };
                let g = &plan.reach.groups(n)[gi];
                let why = if Some(gi) != last {
                    "is not the node's last backward"
                } else if !g.input_edges.is_empty() {
                    "sends gradient further down"
                } else {
                    continue;
                };
                let losses: Vec<&str> = g.losses.iter().map(|&l| plan.id(l)).collect();
                return Err(StageError::NotDeferrable {
                    node: plan.id(n).to_string(),
                    losses: losses.join(", "),
                    from: first.from,
                    why,
                });
            }
        }
        Ok(())
    }

    /// Whether this rank runs node `n` (a batch node: when one of its consumers is here).
    fn runs(&self, n: NodeIndex) -> bool {
        match self.placement.rank(n) {
            Some(r) => r == self.rank,
            None => self
                .plan
                .graph
                .neighbors_directed(n, Direction::Outgoing)
                .any(|c| self.placement.rank(c) == Some(self.rank)),
        }
    }

    /// The nodes this rank runs.
    pub fn nodes(&self) -> Vec<NodeIndex> {
        self.plan.graph.node_indices().filter(|&n| self.placement.rank(n) == Some(self.rank)).collect()
    }

    /// Step `step` of this rank on `batch` (the same batch on every rank), `model` holding this
    /// rank's nodes; `on_final` sees each of its nodes' gradients once final (the trainer
    /// updates the node there).
    pub fn step(
        &mut self,
        model: &Model,
        post: &mut Postbox,
        batch: &StepInput,
        step: u64,
        mut on_final: Option<&mut OnGradsFinal<'_>>,
    ) -> Result<RankStep> {
        let _span = info_span!("stage_step", rank = self.rank, step).entered();
        let started = Instant::now();
        let waited_before = post.stats().waiting_s;
        post.advance(step);
        let plan = self.plan;
        let runs: Vec<bool> = plan.graph.node_indices().map(|n| self.runs(n)).collect();
        let mut state = StepState::new_on(plan, model, &|n| runs[n.index()]);
        for action in &plan.order.actions {
            match *action {
                Action::Forward(n) if runs[n.index()] => {
                    for (_, p) in plan.inputs(n) {
                        match self.placement.rank(p) {
                            Some(q) if q != self.rank && state.value(p).is_none() => {
                                let v = post.take(q, step, value_tag(p))?;
                                state.insert_value(p, v);
                            }
                            _ => {}
                        }
                    }
                    state.forward(n, batch)?;
                    if !self.readers[n.index()].is_empty() {
                        let Some(v) = state.value(n).cloned() else {
                            return Err(
                                candle_core::Error::Msg(format!("`{}` has no value to send", plan.id(n))).into()
                            );
                        };
                        for &d in &self.readers[n.index()] {
                            post.send(d, step, value_tag(n), &v)?;
                        }
                    }
                }
                Action::Backward { node, group } if runs[node.index()] => {
                    let incoming = &self.incoming[node.index()][group];
                    if self.schedule == PipelineSchedule::Pipelined && !incoming.is_empty() {
                        let earlier = match self.held[node.index()].take() {
                            // The cotangents of the step that ran these links.
                            Some(links) => Some((links, self.receive_sum(post, incoming, step - 1)?)),
                            None => None,
                        };
                        let now = state.defer(node, group, earlier, on_final.as_deref_mut())?;
                        self.held[node.index()] = Some(now);
                    } else {
                        for inc in incoming {
                            let t = post.take(inc.from, step, inc.tag)?;
                            state.push_cotangent(node, inc.losses.clone(), t);
                        }
                        state.backward(node, group, on_final.as_deref_mut())?;
                    }
                    self.send_cotangents(post, &mut state, node, group, step)?;
                }
                _ => {}
            }
        }
        let losses = state.losses().to_vec();
        if self.rank != 0 && !losses.is_empty() {
            let flat: Vec<f32> = losses.iter().flat_map(|&(n, v)| [n.index() as f32, v]).collect();
            let t = Tensor::from_vec(flat, (losses.len(), 2), &candle_core::Device::Cpu)?;
            post.send(0, step, LOSSES, &t)?;
        }
        drop(state);
        let waiting_s = post.stats().waiting_s - waited_before;
        Ok(RankStep { losses, busy_s: started.elapsed().as_secs_f64() - waiting_s, waiting_s })
    }

    /// The sum of the cotangents `incoming` of step `step` (pipelined: one step late).
    fn receive_sum(&self, post: &mut Postbox, incoming: &[Incoming], step: u64) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for inc in incoming {
            let t = post.take(inc.from, step, inc.tag)?;
            sum = Some(match sum {
                None => t,
                Some(s) => (s + t)?,
            });
        }
        sum.ok_or_else(|| StageError::Candle(candle_core::Error::Msg("no cotangent to wait for".into())))
    }

    /// After backward group `group` of `c`: the cotangent at each input edge whose producer
    /// runs on another rank goes there.
    fn send_cotangents(
        &self,
        post: &mut Postbox,
        state: &mut StepState<'_>,
        c: NodeIndex,
        group: usize,
        step: u64,
    ) -> Result<()> {
        let plan = self.plan;
        let edges = &plan.reach.groups(c)[group].input_edges;
        let mut producers: Vec<NodeIndex> = vec![];
        for &e in edges {
            let Some((p, _)) = plan.graph.edge_endpoints(e) else { continue };
            if matches!(self.placement.rank(p), Some(q) if q != self.rank) && !producers.contains(&p) {
                producers.push(p);
            }
        }
        for p in producers {
            let Some(q) = self.placement.rank(p) else { continue };
            // One entry per input edge from `p`, in the group's edge order (StepState pushes them
            // so).
            let cots = state.take_cotangents(p);
            let from_p = edges.iter().filter(|&&e| plan.graph.edge_endpoints(e).is_some_and(|(s, _)| s == p));
            for (&e, (_, t)) in from_p.zip(&cots) {
                post.send(q, step, cotangent_tag(e, group), t)?;
            }
        }
        Ok(())
    }

    /// Rank 0: every rank's losses of `step` (waiting for them), in `plan.losses` order, `own`
    /// being rank 0's.
    pub fn gather_losses(
        &self,
        post: &mut Postbox,
        step: u64,
        own: &[(NodeIndex, f32)],
    ) -> Result<Vec<(NodeIndex, f32)>> {
        let plan = self.plan;
        let mut all: Vec<(NodeIndex, f32)> = own.to_vec();
        for r in 1..self.placement.ranks {
            if !plan.losses.iter().any(|&l| self.placement.rank(l) == Some(r)) {
                continue;
            }
            let t = post.take(r, step, LOSSES)?.to_dtype(DType::F32)?;
            for row in t.to_vec2::<f32>()? {
                all.push((NodeIndex::new(row[0] as usize), row[1]));
            }
        }
        all.sort_by_key(|(n, _)| plan.losses.iter().position(|l| l == n));
        Ok(all)
    }
}
