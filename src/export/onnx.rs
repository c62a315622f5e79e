//! The encoder as an ONNX model (opset 17), written with `onnx-protobuf`.
//!
//! ```text
//! input [N, C, H, W]
//!   stem    Conv 7×7/2 → BatchNormalization → Relu → MaxPool 3×3/2   (small: Conv 3×3/1, no pool)
//!   resK    [Shape → Concat → Resize (linear, half_pixel)]            (only with `resize:`)
//!           per block: Conv → BN → Relu → … → Conv → BN, + shortcut (Conv 1×1 → BN), Add, Relu
//!           per shuffle unit: [Split] → branches of Conv → BN [→ Relu] → Concat, then the channel
//!           shuffle as Reshape [N, 2, C/2, H·W] → Transpose → Reshape [N, C, H, W]
//!           [Conv 1×1 → BN → Relu]                                     (only with `final_conv:`)
//!   embedding = Flatten(GlobalAveragePool(last stage))                 [N, C]
//! ```
//!
//! Names follow the YAML: the input is `input`, every exported feature map is named after its
//! node id (`res2` … `res5`, C2–C5 of a detector's FPN), initializers are the parameter paths
//! of the checkpoint (`res3.block0.conv1.weight`, `res3.block0.bn1.running_mean`). Batch,
//! height and width are symbolic (`N`, `H`, `W`).
//!
//! BatchNorm is written as inference-mode `BatchNormalization` with the running statistics, not
//! folded into the convolutions: the initializers stay the checkpoint's tensors, and runtimes
//! fold Conv+BN themselves.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    Message, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};
use petgraph::graph::NodeIndex;

use super::{embedding_node, encoder_nodes, ExportError, Result};
use crate::exec::run_dir::{method_name, OpenRun};
use crate::exec::NodeModule;
use crate::nn::batch_norm::BatchNorm2d;
use crate::nn::block::{Block, BlockKind};
use crate::nn::conv::Conv2d;
use crate::nn::stage::Stage;
use crate::nn::stem::{Stem, StemKind};

/// The ONNX opset the exporter writes (Resize with `half_pixel`, Shape with `start`/`end`).
pub const OPSET: i64 = 17;
/// IR version 8 is the lowest that opset 17 allows; every runtime since ONNX 1.10 reads it.
const IR_VERSION: i64 = 8;
/// The graph input's name.
pub const ONNX_INPUT: &str = "input";
/// The output holding the global-average-pooled last stage (see [`super::embedding_node`]).
pub const EMBEDDING: &str = "embedding";

/// What [`export_onnx`] wrote.
#[derive(Clone, Debug)]
pub struct ExportReport {
    pub path: PathBuf,
    /// Output names, in the file's order.
    pub outputs: Vec<String>,
    /// The node id whose pooled output is `embedding`.
    pub embedding_of: String,
    /// ONNX nodes and initializers in the graph.
    pub nodes: usize,
    pub initializers: usize,
    /// Scalars in the initializers (parameters and BatchNorm statistics).
    pub values: usize,
    pub bytes: usize,
}

impl std::fmt::Display for ExportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: opset {OPSET}, {} nodes, {} initializers ({:.1} M values, {:.1} MB), outputs {} (embedding = pooled `{}`)",
            self.path.display(),
            self.nodes,
            self.initializers,
            self.values as f64 / 1e6,
            self.bytes as f64 / 1e6,
            self.outputs.join(", "),
            self.embedding_of
        )
    }
}

/// The default outputs: every stage (not the stem) and `embedding`.
pub fn default_outputs(run: &OpenRun) -> Vec<String> {
    let (c, m) = (&run.plan, &run.model);
    let mut v: Vec<String> = encoder_nodes(c, m)
        .into_iter()
        .filter(|&n| matches!(m.module(n), Some(NodeModule::Stage(_))))
        .map(|n| c.id(n).to_string())
        .collect();
    v.push(EMBEDDING.to_string());
    v
}

/// Writes the encoder of `run` to `path` as ONNX.
///
/// `outputs` are encoder node ids and/or [`EMBEDDING`]; empty means [`default_outputs`]. Only
/// the nodes these outputs need are exported. Every parameter is checked to be finite first
/// and the file is written under a temporary name and renamed, so on any error no file
/// appears at `path`.
pub fn export_onnx(run: &OpenRun, outputs: &[String], path: &Path) -> Result<ExportReport> {
    let model = build_model(run, outputs)?;
    let report_outputs: Vec<String> = model.graph.output.iter().map(|o| o.name.clone()).collect();
    let bytes = model.write_to_bytes().map_err(|e| ExportError::BadModel {
        path: path.to_path_buf(),
        message: format!("protobuf encoding failed: {e}"),
    })?;
    write_atomically(path, &bytes)?;
    let g = &model.graph;
    let embedding_of = model.metadata_props.iter().find(|p| p.key == "embedding_of").map(|p| p.value.clone());
    Ok(ExportReport {
        path: path.to_path_buf(),
        outputs: report_outputs,
        embedding_of: embedding_of.unwrap_or_default(),
        nodes: g.node.len(),
        initializers: g.initializer.len(),
        values: g.initializer.iter().map(|t| t.dims.iter().product::<i64>() as usize).sum(),
        bytes: bytes.len(),
    })
}

/// Writes `bytes` to a hidden temporary file beside `path`, then renames it.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "export".into());
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| ExportError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ExportError::io(path, e)
    })
}

/// The ONNX model for `outputs` (see [`export_onnx`]), not yet written.
pub fn build_model(run: &OpenRun, outputs: &[String]) -> Result<ModelProto> {
    let (c, m) = (&run.plan, &run.model);
    let enc = encoder_nodes(c, m);
    let last = embedding_node(c, m).ok_or(ExportError::NoEncoder)?;
    let wanted: Vec<String> = if outputs.is_empty() { default_outputs(run) } else { outputs.to_vec() };

    let needed = needed_nodes(run, &enc, last, &wanted)?;

    let tensors: HashMap<String, Tensor> = m.params.named_tensors().into_iter().collect();
    let mut b = Builder { tensors: &tensors, nodes: vec![], inits: vec![], seen: HashSet::new(), counter: 0 };
    for &n in enc.iter().filter(|n| needed.contains(n)) {
        let x = match c.producer(n) {
            Some((_, p)) if p != c.input => c.id(p).to_string(),
            _ => ONNX_INPUT.to_string(),
        };
        let id = c.id(n);
        match m.module(n) {
            Some(NodeModule::Stem(s)) => b.stem(&x, id, s)?,
            Some(NodeModule::Stage(s)) => b.stage(&x, id, s)?,
            // encoder_nodes returns stems and stages only.
            _ => continue,
        }
    }
    let mut graph_outputs = vec![];
    for name in &wanted {
        if name == EMBEDDING {
            let pooled = format!("{EMBEDDING}.pool");
            b.node("GlobalAveragePool", &[c.id(last)], &pooled, vec![]);
            b.node("Flatten", &[pooled.as_str()], EMBEDDING, vec![int("axis", 1)]);
            let ch = c.graph[last].shape.first().copied().unwrap_or(0) as i64;
            graph_outputs.push(value_info(EMBEDDING, &[Dim::Param("N"), Dim::Value(ch)]));
        } else {
            let ch = c.node(name).and_then(|g| g.shape.first().copied()).unwrap_or(0) as i64;
            graph_outputs.push(value_info(name, &[Dim::Param("N"), Dim::Value(ch), Dim::Unknown, Dim::Unknown]));
        }
    }
    let in_ch = c.graph[c.input].shape.first().copied().unwrap_or(3) as i64;
    let graph = GraphProto {
        name: run.loaded.experiment.name.clone(),
        node: b.nodes,
        initializer: b.inits,
        input: vec![value_info(ONNX_INPUT, &[Dim::Param("N"), Dim::Value(in_ch), Dim::Param("H"), Dim::Param("W")])],
        output: graph_outputs,
        doc_string: format!(
            "encoder of `{}`; `embedding` = GlobalAveragePool(`{}`)",
            run.loaded.experiment.name,
            c.id(last)
        ),
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET, ..Default::default() }],
        producer_name: "locograph".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph).into(),
        metadata_props: metadata(run, last),
        ..Default::default()
    })
}

/// The encoder nodes the outputs `wanted` need (each one's chain back to the input); an
/// unknown output is an error that lists the available ones.
fn needed_nodes(run: &OpenRun, enc: &[NodeIndex], last: NodeIndex, wanted: &[String]) -> Result<HashSet<NodeIndex>> {
    let c = &run.plan;
    let mut needed: HashSet<NodeIndex> = HashSet::new();
    let mut unknown = vec![];
    for name in wanted {
        let node = if name == EMBEDDING { Some(last) } else { c.ids.get(name.as_str()).copied() };
        match node.filter(|n| enc.contains(n)) {
            Some(mut n) => {
                while n != c.input && needed.insert(n) {
                    n = c.producer(n).map(|(_, p)| p).unwrap_or(c.input);
                }
            }
            None => unknown.push(name.clone()),
        }
    }
    if !unknown.is_empty() {
        let mut available: Vec<&str> = enc.iter().map(|&n| c.id(n)).collect();
        available.push(EMBEDDING);
        return Err(ExportError::UnknownOutput { name: unknown.join("`, `"), available: available.join(", ") });
    }
    Ok(needed)
}

/// The model's metadata: the experiment, method, training step, embedding node and version.
fn metadata(run: &OpenRun, last: NodeIndex) -> Vec<StringStringEntryProto> {
    let c = &run.plan;
    let method = run.meta.get("method").and_then(|v| v.as_str()).unwrap_or(method_name(c)).to_string();
    let step = run.meta.get("step").and_then(|v| v.as_u64()).map(|s| s.to_string()).unwrap_or_else(|| "unknown".into());
    let props = [
        ("experiment", run.loaded.experiment.name.clone()),
        ("method", method),
        ("step", step),
        ("embedding_of", c.id(last).to_string()),
        ("locograph", env!("CARGO_PKG_VERSION").to_string()),
    ];
    props.into_iter().map(|(k, v)| StringStringEntryProto { key: k.into(), value: v, ..Default::default() }).collect()
}

/// Accumulates nodes and initializers.
struct Builder<'a> {
    tensors: &'a HashMap<String, Tensor>,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    seen: HashSet<String>,
    counter: usize,
}

impl Builder<'_> {
    fn node(&mut self, op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) {
        self.node_outputs(op, inputs, &[output], attribute);
    }

    fn node_outputs(&mut self, op: &str, inputs: &[&str], outputs: &[&str], attribute: Vec<AttributeProto>) {
        self.counter += 1;
        self.nodes.push(NodeProto {
            op_type: op.into(),
            name: format!("{op}_{}", self.counter),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute,
            ..Default::default()
        });
    }

    /// `Conv` → `BatchNormalization` [→ `Relu`] with the parameters under `{conv}` and `{bn}`;
    /// returns the output's name.
    fn conv_bn(
        &mut self,
        x: &str,
        (conv, bn): &(Conv2d, BatchNorm2d),
        names: (&str, &str),
        relu: bool,
    ) -> Result<String> {
        let (cp, bp) = names;
        self.conv(x, cp, conv, &format!("{cp}.out"))?;
        self.bn(&format!("{cp}.out"), bp, bn, &format!("{bp}.out"))?;
        if relu {
            self.node("Relu", &[&format!("{bp}.out")], &format!("{bp}.relu"), vec![]);
            return Ok(format!("{bp}.relu"));
        }
        Ok(format!("{bp}.out"))
    }

    /// A shuffle unit `p` on `x`, its output named `out` (see `nn::shuffle`).
    fn shuffle_unit(&mut self, x: &str, p: &str, blk: &Block, out: &str) -> Result<()> {
        let spec = blk.spec().shuffle();
        let layers = blk.convs();
        let b = spec.branch_channels() as i64;
        let (first, second) = if spec.splits() {
            let (split, x1, x2) = (format!("{p}.split"), format!("{p}.x1"), format!("{p}.x2"));
            self.int64s(&split, &[b, b]);
            self.node_outputs("Split", &[x, &split], &[&x1, &x2], vec![int("axis", 1)]);
            (x1, x2)
        } else {
            (x.to_string(), x.to_string())
        };
        // Branch 2: 1×1 → BN → Relu, depthwise 3×3 → BN, 1×1 → BN → Relu.
        let mut r = second;
        for (k, layer) in layers.iter().take(3).enumerate() {
            let (cp, bp) = (format!("{p}.branch2.conv{}", k + 1), format!("{p}.branch2.bn{}", k + 1));
            r = self.conv_bn(&r, layer, (&cp, &bp), k != 1)?;
        }
        // Branch 1 (two-branch units): depthwise 3×3 → BN, 1×1 → BN → Relu.
        let mut l = first;
        for (k, layer) in layers.iter().skip(3).enumerate() {
            let (cp, bp) = (format!("{p}.branch1.conv{}", k + 1), format!("{p}.branch1.bn{}", k + 1));
            l = self.conv_bn(&l, layer, (&cp, &bp), k == 1)?;
        }
        let (cat, shape, grouped, swapped, groups) = (
            format!("{p}.cat"),
            format!("{p}.cat.shape"),
            format!("{p}.grouped"),
            format!("{p}.swapped"),
            format!("{p}.groups"),
        );
        self.node("Concat", &[&l, &r], &cat, vec![int("axis", 1)]);
        // Shuffle with two groups: [N, 2, C/2, H·W], swap the group and channel axes, and back to
        // the concatenation's own shape (N, H and W stay symbolic).
        self.node("Shape", &[&cat], &shape, vec![]);
        self.int64s(&groups, &[0, 2, b, -1]);
        self.node("Reshape", &[&cat, &groups], &grouped, vec![]);
        self.node("Transpose", &[&grouped], &swapped, vec![ints("perm", &[0, 2, 1, 3])]);
        self.node("Reshape", &[&swapped, &shape], out, vec![]);
        Ok(())
    }

    /// Adds the parameter `name` as an f32 initializer (once) after checking it is finite.
    fn init(&mut self, name: &str) -> Result<()> {
        if !self.seen.insert(name.to_string()) {
            return Ok(());
        }
        let t = self.tensors.get(name).ok_or_else(|| ExportError::MissingParam(name.into()))?;
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(ExportError::NonFinite { name: name.into(), count: bad });
        }
        self.inits.push(TensorProto {
            name: name.into(),
            dims: t.dims().iter().map(|&d| d as i64).collect(),
            data_type: DataType::FLOAT as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        Ok(())
    }

    fn int64s(&mut self, name: &str, values: &[i64]) {
        self.inits.push(TensorProto {
            name: name.into(),
            dims: vec![values.len() as i64],
            data_type: DataType::INT64 as i32,
            int64_data: values.to_vec(),
            ..Default::default()
        });
    }

    /// `Conv` with weight `{path}.weight`; no bias (BatchNorm follows).
    fn conv(&mut self, x: &str, path: &str, conv: &Conv2d, out: &str) -> Result<()> {
        let w = format!("{path}.weight");
        self.init(&w)?;
        let s = conv.spec();
        let (k, st, p) = (s.kernel as i64, s.stride as i64, s.padding as i64);
        let attrs = vec![
            ints("kernel_shape", &[k, k]),
            ints("strides", &[st, st]),
            ints("pads", &[p, p, p, p]),
            ints("dilations", &[1, 1]),
            int("group", s.groups as i64),
        ];
        self.node("Conv", &[x, &w], out, attrs);
        Ok(())
    }

    /// Inference-mode `BatchNormalization` with `{path}.{weight,bias,running_mean,running_var}`.
    fn bn(&mut self, x: &str, path: &str, bn: &BatchNorm2d, out: &str) -> Result<()> {
        let names: Vec<String> =
            ["weight", "bias", "running_mean", "running_var"].iter().map(|p| format!("{path}.{p}")).collect();
        for n in &names {
            self.init(n)?;
        }
        let inputs: Vec<&str> = std::iter::once(x).chain(names.iter().map(String::as_str)).collect();
        self.node("BatchNormalization", &inputs, out, vec![float("epsilon", bn.eps() as f32)]);
        Ok(())
    }

    fn stem(&mut self, x: &str, id: &str, s: &Stem) -> Result<()> {
        self.conv(x, &format!("{id}.conv"), s.conv(), &format!("{id}.conv.out"))?;
        self.bn(&format!("{id}.conv.out"), &format!("{id}.bn"), s.bn(), &format!("{id}.bn.out"))?;
        match s.kind() {
            StemKind::Imagenet | StemKind::Shufflenet => {
                self.node("Relu", &[&format!("{id}.bn.out")], &format!("{id}.relu"), vec![]);
                // The same window as nn::pool::max_pool2d(h, 3, 2, 1).
                let attrs = vec![ints("kernel_shape", &[3, 3]), ints("strides", &[2, 2]), ints("pads", &[1, 1, 1, 1])];
                self.node("MaxPool", &[&format!("{id}.relu")], id, attrs);
            }
            StemKind::Small => self.node("Relu", &[&format!("{id}.bn.out")], id, vec![]),
        }
        Ok(())
    }

    fn stage(&mut self, x: &str, id: &str, s: &Stage) -> Result<()> {
        let mut h = x.to_string();
        if let Some(r) = s.resize() {
            // sizes = [N, C] ++ [r, r]: batch and channels stay symbolic.
            let (nc, rr, sizes, out) = (
                format!("{id}.resize.nc"),
                format!("{id}.resize.hw"),
                format!("{id}.resize.sizes"),
                format!("{id}.resize"),
            );
            self.node("Shape", &[&h], &nc, vec![int("start", 0), int("end", 2)]);
            self.int64s(&rr, &[r as i64, r as i64]);
            self.node("Concat", &[&nc, &rr], &sizes, vec![int("axis", 0)]);
            // No antialiasing (PyTorch's default; the attribute only exists from opset 18).
            let attrs = vec![string("mode", "linear"), string("coordinate_transformation_mode", "half_pixel")];
            // Resize-13+ inputs: X, roi, scales, sizes; roi and scales are unused.
            self.node("Resize", &[&h, "", "", &sizes], &out, attrs);
            h = out;
        }
        let n = s.blocks().len();
        for (i, blk) in s.blocks().iter().enumerate() {
            let p = format!("{id}.block{i}");
            let out = if i + 1 == n && s.final_conv().is_none() { id.to_string() } else { p.clone() };
            if blk.spec().kind == BlockKind::Shuffle {
                self.shuffle_unit(&h, &p, blk, &out)?;
                h = out;
                continue;
            }
            let mut y = h.clone();
            let last = blk.convs().len() - 1;
            for (j, (conv, bn)) in blk.convs().iter().enumerate() {
                let (cp, bp) = (format!("{p}.conv{}", j + 1), format!("{p}.bn{}", j + 1));
                self.conv(&y, &cp, conv, &format!("{cp}.out"))?;
                self.bn(&format!("{cp}.out"), &bp, bn, &format!("{bp}.out"))?;
                y = format!("{bp}.out");
                if j != last {
                    self.node("Relu", &[&y], &format!("{bp}.relu"), vec![]);
                    y = format!("{bp}.relu");
                }
            }
            let shortcut = match blk.projection() {
                Some((conv, bn)) => {
                    let d = format!("{p}.downsample");
                    self.conv(&h, &format!("{d}.conv"), conv, &format!("{d}.conv.out"))?;
                    self.bn(&format!("{d}.conv.out"), &format!("{d}.bn"), bn, &format!("{d}.bn.out"))?;
                    format!("{d}.bn.out")
                }
                None => h.clone(),
            };
            self.node("Add", &[&y, &shortcut], &format!("{p}.add"), vec![]);
            self.node("Relu", &[&format!("{p}.add")], &out, vec![]);
            h = out;
        }
        if let Some(layer) = s.final_conv() {
            let y = self.conv_bn(&h, layer, (&format!("{id}.conv"), &format!("{id}.bn")), false)?;
            self.node("Relu", &[&y], id, vec![]);
        }
        Ok(())
    }
}

fn attr(name: &str, ty: AttributeType) -> AttributeProto {
    AttributeProto { name: name.into(), type_: ty.into(), ..Default::default() }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { ints: v.to_vec(), ..attr(name, AttributeType::INTS) }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { i: v, ..attr(name, AttributeType::INT) }
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto { f: v, ..attr(name, AttributeType::FLOAT) }
}

fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto { s: v.as_bytes().to_vec(), ..attr(name, AttributeType::STRING) }
}

enum Dim {
    Value(i64),
    Param(&'static str),
    Unknown,
}

/// A float tensor's name, element type and shape.
fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    use tensor_shape_proto::dimension::Value;
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: match d {
                Dim::Value(v) => Some(Value::DimValue(*v)),
                Dim::Param(p) => Some(Value::DimParam(p.to_string())),
                Dim::Unknown => None,
            },
            ..Default::default()
        })
        .collect();
    let tensor = type_proto::Tensor {
        elem_type: DataType::FLOAT as i32,
        shape: Some(TensorShapeProto { dim, ..Default::default() }).into(),
        ..Default::default()
    };
    ValueInfoProto {
        name: name.into(),
        type_: Some(TypeProto { value: Some(type_proto::Value::TensorType(tensor)), ..Default::default() }).into(),
        ..Default::default()
    }
}

/// Reads an ONNX file back (for tests and tools).
pub fn read_model(path: &Path) -> Result<ModelProto> {
    let bytes = crate::bounded::read(path, crate::bounded::MODEL).map_err(|e| ExportError::io(path, e))?;
    ModelProto::parse_from_bytes(&bytes)
        .map_err(|e| ExportError::BadModel { path: path.to_path_buf(), message: format!("not an ONNX model: {e}") })
}
