//! From a loaded experiment to a checked petgraph DAG and its [`Plan`].

use std::collections::HashMap;

use indexmap::IndexMap;
use petgraph::algo::toposort;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;

use super::node::{GEdge, GNode, INPUT};
use super::order::Order;
use super::plan::Plan;
use super::reach::Reachability;
use super::{shape, GraphError, GraphErrors};
use crate::config::{Loaded, Location, Stop};
use crate::nn::Cost;

fn push(errors: &mut Vec<GraphError>, location: Location, message: String) {
    errors.push(GraphError { location, message });
}

/// Checks the graph of `loaded` and compiles it; reports every problem found.
pub fn compile(loaded: &Loaded) -> Result<Plan, GraphErrors> {
    let exp = &loaded.experiment;
    let loc = &loaded.locations;
    let mut errors: Vec<GraphError> = vec![];

    let mut graph: DiGraph<GNode, GEdge> = DiGraph::new();
    let mut ids: IndexMap<String, NodeIndex> = IndexMap::new();
    let input_shape = vec![exp.input.channels, exp.input.size, exp.input.size];
    let input =
        graph.add_node(GNode { id: INPUT.into(), config: None, shape: input_shape, location: loc.path("input") });
    ids.insert(INPUT.into(), input);
    for (id, cfg) in &exp.nodes {
        let n =
            graph.add_node(GNode { id: id.clone(), config: Some(cfg.clone()), shape: vec![], location: loc.node(id) });
        ids.insert(id.clone(), n);
    }
    let loss_ids: Vec<&String> = exp.nodes.iter().filter(|(_, c)| c.is_loss()).map(|(id, _)| id).collect();
    if loss_ids.is_empty() {
        push(&mut errors, loc.path("nodes"), "the graph has no loss: add a node with `op: nt_xent`".into());
    }

    let mut seen: HashMap<(NodeIndex, NodeIndex), usize> = HashMap::new();
    for (i, e) in exp.edges.iter().enumerate() {
        let at = loc.edge(i);
        let from = ids.get(&e.from).copied();
        let to = ids.get(&e.to).copied();
        let known = |s: &str| -> String {
            let mut all: Vec<&str> = ids.keys().map(String::as_str).collect();
            all.sort();
            format!("edge `{}`: unknown node `{s}`; the nodes are: {}", e, all.join(", "))
        };
        if from.is_none() {
            push(&mut errors, at.clone(), known(&e.from));
        }
        if to.is_none() {
            push(&mut errors, at.clone(), known(&e.to));
        }
        if to == Some(input) {
            push(&mut errors, at.clone(), format!("edge `{e}`: nothing may feed `input`"));
        }
        if let Stop::Losses(ls) = &e.stop {
            for l in ls {
                if !loss_ids.contains(&l) {
                    let what = if exp.nodes.contains_key(l) { "is not a loss" } else { "does not exist" };
                    push(
                        &mut errors,
                        at.clone(),
                        format!(
                            "edge `{e}`: stop names `{l}`, which {what}; the losses are: {}",
                            loss_ids.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    );
                }
            }
        }
        if let (Some(a), Some(b)) = (from, to) {
            if let Some(j) = seen.insert((a, b), i) {
                push(&mut errors, at.clone(), format!("edge `{e}` is given twice (also as edges[{j}])"));
                continue;
            }
            if graph[a].is_loss() {
                push(&mut errors, at.clone(), format!("edge `{e}`: a loss has no output to feed other nodes"));
            }
            graph.add_edge(a, b, GEdge { index: i, stop: e.stop.clone(), location: at });
        }
    }

    for (id, &n) in &ids {
        if n == input {
            continue;
        }
        let k = graph.edges_directed(n, Direction::Incoming).count();
        let what = if graph[n].is_loss() { "loss" } else { "node" };
        if k == 0 {
            push(
                &mut errors,
                graph[n].location.clone(),
                format!("{what} `{id}` has no input: add an edge `{{from: …, to: {id}}}`"),
            );
        } else if k > 1 {
            push(
                &mut errors,
                graph[n].location.clone(),
                format!("{what} `{id}` has {k} inputs; every node takes exactly one"),
            );
        }
    }

    let order = match toposort(&graph, None) {
        Ok(o) => o,
        Err(cycle) => {
            let n = cycle.node_id();
            push(&mut errors, graph[n].location.clone(), format!("the edges form a cycle through `{}`", graph[n].id));
            return Err(GraphErrors(errors));
        }
    };

    // Shapes, in topological order; a node after a broken one is not checked again.
    let mut broken = vec![false; graph.node_count()];
    for &n in &order {
        if n == input {
            continue;
        }
        let Some(p) = graph.neighbors_directed(n, Direction::Incoming).next() else {
            broken[n.index()] = true;
            continue;
        };
        if broken[p.index()] {
            broken[n.index()] = true;
            continue;
        }
        let cfg = graph[n].config.clone().expect("non-input nodes have a config");
        match shape::infer(&cfg, &graph[p].shape) {
            Ok(s) => graph[n].shape = s,
            Err(why) => {
                broken[n.index()] = true;
                push(
                    &mut errors,
                    graph[n].location.clone(),
                    format!("node `{}` ({}): {why}", graph[n].id, cfg.op_name()),
                );
            }
        }
    }
    if !errors.is_empty() {
        return Err(GraphErrors(errors));
    }

    let reach = Reachability::new(&graph, input);
    for &n in &order {
        if graph[n].is_trainable() && reach.reached_by(n).is_empty() {
            let why = reach.why_unreached(&graph, n);
            push(
                &mut errors,
                graph[n].location.clone(),
                format!(
                    "trainable node `{}` is reached by no loss ({why}); connect it to a loss, or set `frozen: true`",
                    graph[n].id
                ),
            );
        }
    }
    if !errors.is_empty() {
        return Err(GraphErrors(errors));
    }
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
