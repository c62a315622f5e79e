//! `locograph explain`: for every trainable node, the losses that update it and the stop edge
//! that blocks each other loss; the backward passes per node; and a Graphviz view.

use std::fmt::Write;

use petgraph::visit::EdgeRef;

use super::order::Action;
use super::plan::Plan;
use super::reach::Reason;
use crate::config::Stop;

/// `res3 <- L1 + L2` for every trainable node, in forward order: the golden-test view.
pub fn summary(c: &Plan) -> Vec<String> {
    c.trainable_nodes()
        .into_iter()
        .map(|n| {
            let ls: Vec<&str> = c.reach.reached_by(n).into_iter().map(|l| c.id(l)).collect();
            format!("{} <- {}", c.id(n), ls.join(" + "))
        })
        .collect()
}

fn pad(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|i| rows.iter().filter_map(|r| r.get(i)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, s)| format!("{s:<w$}", w = widths[i])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The full table printed by `locograph explain` and saved as `explain.txt` in a run.
pub fn table(c: &Plan) -> String {
    let mut out = reachability(c);
    out.push_str(&frozen_and_averages(c));
    out.push_str(&backward_passes(c));
    out.push_str(&execution_order(c));
    out
}

/// Which loss updates which trainable node, and why the others do not.
fn reachability(c: &Plan) -> String {
    let losses: Vec<&str> = c.reach.losses.iter().map(|&l| c.id(l)).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Gradient reachability ({} loss{}: {})\n",
        losses.len(),
        if losses.len() == 1 { "" } else { "es" },
        losses.join(", ")
    );
    let mut rows = vec![vec!["node".to_string(), "op".into(), "updated by".into(), "not updated by".into()]];
    for n in c.trainable_nodes() {
        let node = &c.graph[n];
        let op = if node.ema.is_some() { "ema" } else { node.config.as_ref().map(|x| x.op_name()).unwrap_or("input") };
        let mut by = vec![];
        let mut not = vec![];
        for &l in &c.reach.losses {
            match c.reach.reason(&c.graph, n, l) {
                Reason::Reaches => by.push(c.id(l).to_string()),
                Reason::NotDownstream => not.push(format!("{} (not computed from it)", c.id(l))),
                Reason::Stopped(edges) => {
                    let e: Vec<String> = edges.iter().map(|&e| c.edge_name(e)).collect();
                    not.push(format!("{} (stopped at {})", c.id(l), e.join(", ")));
                }
            }
        }
        rows.push(vec![node.id.clone(), op.into(), by.join(" + "), not.join(", ")]);
    }
    out.push_str(&pad(&rows));
    out
}

/// The frozen nodes and the moving averages (EMA targets), where there are any.
fn frozen_and_averages(c: &Plan) -> String {
    let mut out = String::new();
    let frozen: Vec<&str> = c
        .graph
        .node_weights()
        .filter(|n| n.config.as_ref().is_some_and(|x| x.is_frozen()))
        .map(|n| n.id.as_str())
        .collect();
    if !frozen.is_empty() {
        let _ = writeln!(out, "\nFrozen (not optimised; gradients still pass through): {}", frozen.join(", "));
    }
    let averages: Vec<String> = c
        .graph
        .node_weights()
        .filter_map(|n| {
            n.ema.as_ref().map(|e| format!("{} of {} (momentum {} → {})", n.id, e.of, e.momentum, e.final_momentum))
        })
        .collect();
    if !averages.is_empty() {
        let _ = writeln!(
            out,
            "\nMoving averages (no gradient; after each step θ ← m·θ + (1 − m)·θ_of): {}",
            averages.join(", ")
        );
    }
    out
}

/// Each node's backward passes per step: which losses each carries and where its gradient goes.
fn backward_passes(c: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\nBackward passes per training step (the forward runs once):");
    let mut rows = vec![];
    for n in c.order.forward_order() {
        let groups = c.reach.groups(n);
        if groups.is_empty() {
            continue;
        }
        let parts: Vec<String> = groups
            .iter()
            .map(|g| {
                let ls: Vec<&str> = g.losses.iter().map(|&l| c.id(l)).collect();
                let to: Vec<String> = g
                    .input_edges
                    .iter()
                    .map(|&e| c.graph.edge_endpoints(e).map(|(a, _)| c.id(a).to_string()).unwrap_or_default())
                    .collect();
                let dest = if to.is_empty() {
                    "parameters only".to_string()
                } else {
                    format!("gradient to {}", to.join(", "))
                };
                format!("{{{}}} → {dest}", ls.join(" + "))
            })
            .collect();
        rows.push(vec![
            format!("  {}", c.id(n)),
            format!("{} pass{}", groups.len(), if groups.len() == 1 { "" } else { "es" }),
            parts.join("; "),
        ]);
    }
    out.push_str(&pad(&rows));
    out
}

/// The plan's actions in the order one step runs them (`F:` forward, `B:node{losses}` backward).
fn execution_order(c: &Plan) -> String {
    let steps: Vec<String> = c
        .order
        .actions
        .iter()
        .map(|s| match *s {
            Action::Forward(n) => format!("F:{}", c.id(n)),
            Action::Backward { node, group } => {
                let g = &c.reach.groups(node)[group];
                let ls: Vec<&str> = g.losses.iter().map(|&l| c.id(l)).collect();
                format!("B:{}{{{}}}", c.id(node), ls.join("+"))
            }
        })
        .collect();
    format!("\nExecution order: {}\n", steps.join(" "))
}

/// Graphviz: solid edges carry every gradient, dashed red ones stop some (label: which).
pub fn dot(c: &Plan) -> String {
    let mut out = String::from("digraph locograph {\n  rankdir=TB;\n  node [fontname=\"Helvetica\"];\n");
    for n in c.graph.node_indices() {
        let node = &c.graph[n];
        let (shape, color) = match &node.config {
            None => ("invhouse", "gray"),
            Some(x) if x.is_loss() => ("diamond", "firebrick"),
            Some(x) if x.is_frozen() => ("box", "lightblue"),
            Some(crate::config::NodeConfig::Decoder(_) | crate::config::NodeConfig::ImageDecoder(_)) => {
                ("box", "khaki")
            }
            Some(_) => ("box", "palegreen"),
        };
        let shape_txt: Vec<String> = node.shape.iter().map(|d| d.to_string()).collect();
        let reached: Vec<&str> = c.reach.reached_by(n).into_iter().map(|l| c.id(l)).collect();
        let mut label = format!("{}\\n[{}]", node.id, shape_txt.join("×"));
        if node.is_trainable() {
            let _ = write!(label, "\\n← {}", reached.join("+"));
        }
        let _ = writeln!(out, "  \"{}\" [shape={shape}, style=filled, fillcolor={color}, label=\"{label}\"];", node.id);
    }
    for e in c.graph.edge_references() {
        let (a, b) = (c.id(e.source()), c.id(e.target()));
        let attrs = match &e.weight().stop {
            Stop::None => String::new(),
            Stop::All => " [style=dashed, color=red, label=\"stop all\"]".into(),
            Stop::Losses(l) => format!(" [style=dashed, color=red, label=\"stop {}\"]", l.join(",")),
        };
        let _ = writeln!(out, "  \"{a}\" -> \"{b}\"{attrs};");
    }
    out.push_str("}\n");
    out
}
