//! From a loaded experiment to a checked petgraph DAG and its [`Plan`].

use std::collections::HashMap;

use indexmap::IndexMap;
use petgraph::algo::toposort;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;

use super::node::{GEdge, GNode, INPUT, LABELS};
use super::order::Order;
use super::plan::Plan;
use super::reach::Reachability;
use super::{shape, GraphError, GraphErrors};
use crate::config::{Inputs, Loaded, Location, NodeConfig, Stop};
use crate::nn::Cost;

/// The graph being built, and every problem found so far.
struct Builder<'a> {
    loaded: &'a Loaded,
    graph: DiGraph<GNode, GEdge>,
    ids: IndexMap<String, NodeIndex>,
    input: NodeIndex,
    errors: Vec<GraphError>,
}

/// Checks the graph of `loaded` and compiles it into a [`Plan`]; reports every problem found
/// (a later phase runs only when the earlier ones found nothing it depends on).
pub fn compile(loaded: &Loaded) -> Result<Plan, GraphErrors> {
    let mut b = Builder::new(loaded);
    b.add_edges();
    b.check_inputs();
    let order = match toposort(&b.graph, None) {
        Ok(o) => o,
        Err(cycle) => {
            let n = cycle.node_id();
            let id = b.graph[n].id.clone();
            b.push(b.graph[n].location.clone(), format!("the edges form a cycle through `{id}`"));
            return Err(GraphErrors(b.errors));
        }
    };
    b.infer_shapes(&order);
    b.check_ema_inputs();
    if !b.errors.is_empty() {
        return Err(GraphErrors(b.errors));
    }
    let reach = Reachability::new(&b.graph, b.input);
    b.check_reached(&order, &reach);
    if !b.errors.is_empty() {
        return Err(GraphErrors(b.errors));
    }
    let Builder { graph, ids, input, .. } = b;
    let order = Order::new(&graph, input, &reach);
    let losses = order.forward_order().into_iter().filter(|&n| graph[n].is_loss()).collect();
    let costs = graph
        .node_indices()
        .map(|n| match (&graph[n].config, graph.neighbors_directed(n, Direction::Incoming).next()) {
            (Some(cfg), Some(p)) => cfg.cost(&graph[p].shape),
            _ => Cost::default(),
        })
        .collect();
    Ok(Plan { graph, ids, input, losses, reach, order, costs })
}

impl<'a> Builder<'a> {
    /// `input` and every node of `nodes:` (shapes still unknown); a graph needs a loss.
    fn new(loaded: &'a Loaded) -> Self {
        let (exp, loc) = (&loaded.experiment, &loaded.locations);
        let mut graph: DiGraph<GNode, GEdge> = DiGraph::new();
        let mut ids: IndexMap<String, NodeIndex> = IndexMap::new();
        let input_shape = vec![exp.input.channels, exp.input.size, exp.input.size];
        let input = graph.add_node(GNode {
            id: INPUT.into(),
            config: None,
            ema: None,
            shape: input_shape,
            location: loc.path("input"),
        });
        ids.insert(INPUT.into(), input);
        if exp.edges.iter().any(|e| e.from == LABELS) {
            // One class index per view: a scalar per image.
            let labels = graph.add_node(GNode {
                id: LABELS.into(),
                config: None,
                ema: None,
                shape: vec![],
                location: loc.path("data"),
            });
            ids.insert(LABELS.into(), labels);
        }
        let mut ema_errors = vec![];
        for (id, cfg) in &exp.nodes {
            // A moving average computes what the node it averages computes.
            let (config, ema) = match cfg {
                NodeConfig::Ema(e) => {
                    match exp.nodes.get(&e.of) {
                        Some(NodeConfig::Stem(_) | NodeConfig::Stage(_) | NodeConfig::Decoder(_)) => {
                            (exp.nodes.get(&e.of).cloned(), Some(e.clone()))
                        }
                        Some(other) => {
                            ema_errors.push((id.clone(), format!("`{id}` averages `{}`, a {}: only a stem, stage or decoder has parameters to average", e.of, other.op_name())));
                            (None, None)
                        }
                        None => {
                            ema_errors.push((id.clone(), format!("`{id}` averages `{}`, which does not exist", e.of)));
                            (None, None)
                        }
                    }
                }
                _ => (Some(cfg.clone()), None),
            };
            if !(0.0..=1.0).contains(&ema.as_ref().map_or(0.5, |e| e.momentum))
                || !(0.0..=1.0).contains(&ema.as_ref().map_or(0.5, |e| e.final_momentum))
            {
                ema_errors.push((id.clone(), format!("`{id}`: the momenta must lie in [0, 1]")));
            }
            let n = graph.add_node(GNode { id: id.clone(), config, ema, shape: vec![], location: loc.node(id) });
            ids.insert(id.clone(), n);
        }
        let mut b = Builder { loaded, graph, ids, input, errors: vec![] };
        for (id, message) in ema_errors {
            b.push(loc.node(&id), message);
        }
        if !exp.nodes.values().any(|c| c.is_loss()) {
            b.push(
                loc.path("nodes"),
                "the graph has no loss: add a node with `op: nt_xent` (or cross_entropy, mse, neg_cosine)".into(),
            );
        }
        b
    }

    fn push(&mut self, location: Location, message: String) {
        self.errors.push(GraphError { location, message });
    }

    /// Every edge of `edges:` between known nodes, once; stops name existing losses.
    fn add_edges(&mut self) {
        let (exp, loc) = (&self.loaded.experiment, &self.loaded.locations);
        let loss_ids: Vec<&String> = exp.nodes.iter().filter(|(_, c)| c.is_loss()).map(|(id, _)| id).collect();
        let mut seen: HashMap<(NodeIndex, NodeIndex), usize> = HashMap::new();
        for (i, e) in exp.edges.iter().enumerate() {
            let at = loc.edge(i);
            let from = self.ids.get(&e.from).copied();
            let to = self.ids.get(&e.to).copied();
            let mut all: Vec<&str> = self.ids.keys().map(String::as_str).collect();
            all.sort();
            let known = |s: &str| format!("edge `{e}`: unknown node `{s}`; the nodes are: {}", all.join(", "));
            let mut problems = vec![];
            if from.is_none() {
                problems.push(known(&e.from));
            }
            if to.is_none() {
                problems.push(known(&e.to));
            }
            if let Some(t) = to.filter(|&t| t == self.input || self.graph[t].id == LABELS) {
                problems.push(format!("edge `{e}`: nothing may feed `{}`", self.graph[t].id));
            }
            if let Some(t) = to.and_then(|t| self.graph[t].config.as_ref()) {
                match (t.inputs(), &e.slot) {
                    (Inputs::One, Some(slot)) => problems.push(format!(
                        "edge `{e}`: `as: {slot}` names an input, but `{}` ({}) takes one input: leave `as` out",
                        e.to,
                        t.op_name()
                    )),
                    (Inputs::Named(names), None) => problems.push(format!(
                        "edge `{e}`: `{}` ({}) takes {}: say which with `as:`",
                        e.to,
                        t.op_name(),
                        names.join(" and ")
                    )),
                    (Inputs::Named(names), Some(slot)) if !names.contains(&slot.as_str()) => problems.push(format!(
                        "edge `{e}`: `{}` ({}) has no input `{slot}`; its inputs are {}",
                        e.to,
                        t.op_name(),
                        names.join(" and ")
                    )),
                    _ => {}
                }
            }
            if let Stop::Losses(ls) = &e.stop {
                for l in ls.iter().filter(|l| !loss_ids.contains(l)) {
                    let what = if exp.nodes.contains_key(l) { "is not a loss" } else { "does not exist" };
                    let losses: Vec<&str> = loss_ids.iter().map(|s| s.as_str()).collect();
                    problems.push(format!(
                        "edge `{e}`: stop names `{l}`, which {what}; the losses are: {}",
                        losses.join(", ")
                    ));
                }
            }
            if let (Some(a), Some(b)) = (from, to) {
                if let Some(j) = seen.insert((a, b), i) {
                    problems.push(format!("edge `{e}` is given twice (also as edges[{j}])"));
                } else {
                    if self.graph[a].is_loss() {
                        problems.push(format!("edge `{e}`: a loss has no output to feed other nodes"));
                    }
                    let edge = GEdge { index: i, stop: e.stop.clone(), slot: e.slot.clone(), location: at.clone() };
                    self.graph.add_edge(a, b, edge);
                }
            }
            for p in problems {
                self.push(at.clone(), p);
            }
        }
    }

    /// Every node takes what its op reads: one input, or each named input exactly once.
    fn check_inputs(&mut self) {
        let mut problems = vec![];
        for (id, &n) in &self.ids {
            let Some(cfg) = &self.graph[n].config else { continue };
            let k = self.graph.edges_directed(n, Direction::Incoming).count();
            let what = if self.graph[n].is_loss() { "loss" } else { "node" };
            let at = self.graph[n].location.clone();
            match cfg.inputs() {
                Inputs::One if k == 0 => {
                    problems.push((at, format!("{what} `{id}` has no input: add an edge `{{from: …, to: {id}}}`")))
                }
                Inputs::One if k > 1 => {
                    problems.push((at, format!("{what} `{id}` has {k} inputs; a {} takes exactly one", cfg.op_name())))
                }
                Inputs::One => {}
                Inputs::Named(names) => {
                    for name in names {
                        let feeding = self
                            .graph
                            .edges_directed(n, Direction::Incoming)
                            .filter(|e| e.weight().slot.as_deref() == Some(*name))
                            .count();
                        match feeding {
                            0 => problems.push((
                                at.clone(),
                                format!("{what} `{id}` has no `{name}` input: add an edge `{{from: …, to: {id}, as: {name}}}`"),
                            )),
                            1 => {}
                            k => problems.push((at.clone(), format!("{what} `{id}` has {k} edges `as: {name}`; it takes one"))),
                        }
                    }
                }
            }
        }
        for (at, p) in problems {
            self.push(at, p);
        }
    }

    /// Shapes, in topological order; a node after a broken one is not checked again.
    fn infer_shapes(&mut self, order: &[NodeIndex]) {
        let mut broken = vec![false; self.graph.node_count()];
        for &n in order {
            let Some(cfg) = self.graph[n].config.clone() else {
                // A node whose config could not be resolved (a bad `op: ema`) is already reported.
                broken[n.index()] = n != self.input && self.graph[n].id != LABELS;
                continue;
            };
            let inputs = super::plan::inputs_of(&self.graph, n);
            if inputs.is_empty() || inputs.iter().any(|&(_, p)| broken[p.index()]) {
                broken[n.index()] = true;
                continue;
            }
            let shapes: Vec<&[usize]> = inputs.iter().map(|&(_, p)| self.graph[p].shape.as_slice()).collect();
            let from_labels: Vec<bool> = inputs.iter().map(|&(_, p)| self.graph[p].id == LABELS).collect();
            match shape::infer(&cfg, &shapes, &from_labels) {
                Ok(s) => self.graph[n].shape = s,
                Err(why) => {
                    broken[n.index()] = true;
                    let message = format!("node `{}` ({}): {why}", self.graph[n].id, cfg.op_name());
                    self.push(self.graph[n].location.clone(), message);
                }
            }
        }
    }

    /// A moving average reads what the node it averages reads, so that their parameters match.
    fn check_ema_inputs(&mut self) {
        let mut problems = vec![];
        for &n in self.ids.values() {
            let Some(e) = &self.graph[n].ema else { continue };
            let Some(&of) = self.ids.get(&e.of) else { continue };
            let shape = |m: NodeIndex| {
                super::plan::inputs_of(&self.graph, m).first().map(|&(_, p)| self.graph[p].shape.clone())
            };
            let (mine, theirs) = (shape(n), shape(of));
            if mine.is_some() && theirs.is_some() && mine != theirs {
                problems.push((
                    self.graph[n].location.clone(),
                    format!(
                        "`{}` averages `{}`, but reads {:?} where `{}` reads {:?}: their parameters would differ",
                        self.graph[n].id,
                        e.of,
                        mine.unwrap_or_default(),
                        e.of,
                        theirs.unwrap_or_default()
                    ),
                ));
            }
        }
        for (at, p) in problems {
            self.push(at, p);
        }
    }

    /// Every trainable node is reached by some loss.
    fn check_reached(&mut self, order: &[NodeIndex], reach: &Reachability) {
        for &n in order {
            if self.graph[n].is_trainable() && reach.reached_by(n).is_empty() {
                let why = reach.why_unreached(&self.graph, n);
                let message = format!(
                    "trainable node `{}` is reached by no loss ({why}); connect it to a loss, or set `frozen: true`",
                    self.graph[n].id
                );
                self.push(self.graph[n].location.clone(), message);
            }
        }
    }
}
