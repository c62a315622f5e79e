//! Exporting a trained encoder: ONNX ([`export_onnx`]), torchvision-named weights
//! ([`torchvision_state_dict`]) and a parity check against ONNX Runtime ([`verify`]).
//!
//! Only encoder nodes (stems and stages) are exported; decoders and losses exist for training
//! and are left out. See `docs/export.md` for plugging the backbone into a detector.

mod error;
pub mod onnx;
pub mod torchvision;
pub mod verify;

pub use error::{ExportError, Result};
pub use onnx::{export_onnx, ExportReport, EMBEDDING, ONNX_INPUT, OPSET};
pub use torchvision::{torchvision_state_dict, write_torchvision};
pub use verify::{parity, verify, OutputDiff, TOLERANCE};

use petgraph::graph::NodeIndex;

use crate::exec::{Model, NodeModule};
use crate::graph::Plan;

/// The encoder's nodes in forward order: stems and stages whose producer is the input or
/// another encoder node. Everything downstream of a decoder is not part of the encoder.
pub fn encoder_nodes(c: &Plan, model: &Model) -> Vec<NodeIndex> {
    let mut enc: Vec<NodeIndex> = vec![];
    for n in c.order.forward_order() {
        let is_layer = matches!(model.module(n), Some(NodeModule::Stem(_) | NodeModule::Stage(_)));
        let fed = c.producer(n).is_some_and(|(_, p)| p == c.input || enc.contains(&p));
        if is_layer && fed {
            enc.push(n);
        }
    }
    enc
}

/// The node whose pooled output is the embedding: the last encoder node in forward order that
/// no other encoder node reads (`res5` in a ResNet).
pub fn embedding_node(c: &Plan, model: &Model) -> Option<NodeIndex> {
    let enc = encoder_nodes(c, model);
    enc.iter().rev().copied().find(|&n| !enc.iter().any(|&m| c.producer(m).is_some_and(|(_, p)| p == n)))
}
