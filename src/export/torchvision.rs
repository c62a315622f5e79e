//! The encoder's weights under torchvision's ResNet names, for `torchvision.models.resnet50`
//! (or `resnet18`/`resnet34` with basic blocks) and every detector built on it.
//!
//! ```text
//! stem.conv.weight                      conv1.weight
//! stem.bn.{weight,bias,running_*}       bn1.*
//! res2.block0.conv1.weight              layer1.0.conv1.weight      (res2..res5 = layer1..layer4)
//! res2.block0.bn1.*                     layer1.0.bn1.*
//! res2.block0.downsample.conv.weight    layer1.0.downsample.0.weight
//! res2.block0.downsample.bn.*           layer1.0.downsample.1.*
//! ```
//!
//! Every BatchNorm also gets `num_batches_tracked` (the run's step, i64, 0-dim) so that
//! `load_state_dict` finds all keys; only `fc.*` is missing (the classifier is not trained).

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use petgraph::graph::NodeIndex;

use super::{encoder_nodes, ExportError, Result};
use crate::exec::run_dir::OpenRun;
use crate::exec::NodeModule;
use crate::nn::block::BlockKind;
use crate::nn::stem::StemKind;

/// `(torchvision key, tensor)` for every encoder parameter and buffer, in torchvision's
/// `state_dict` order.
///
/// The graph must be a torchvision ResNet: an ImageNet stem with 64 channels and then four
/// chained stages of one block kind, strides 1, 2, 2, 2, torchvision's channels (64·2^i, ×4
/// for bottlenecks), no `resize`, no groups. Otherwise
/// the error lists every reason.
pub fn torchvision_state_dict(run: &OpenRun) -> Result<Vec<(String, Tensor)>> {
    let (c, m) = (&run.plan, &run.model);
    let enc = encoder_nodes(c, m);
    let why = not_torchvision(run, &enc);
    if !why.is_empty() {
        return Err(ExportError::NotResnet(why));
    }
    let stages = &enc[1..];
    let tensors: HashMap<String, Tensor> = m.params.named_tensors().into_iter().collect();
    let step = run.meta.get("step").and_then(|v| v.as_i64()).unwrap_or(0);
    let mut sd = StateDict { tensors: &tensors, out: vec![], counter: Tensor::new(step, &candle_core::Device::Cpu)? };
    let stem = c.id(enc[0]);
    sd.take(&format!("{stem}.conv.weight"), "conv1.weight")?;
    sd.bn(&format!("{stem}.bn"), "bn1")?;
    for (li, &n) in stages.iter().enumerate() {
        let Some(NodeModule::Stage(s)) = m.module(n) else { continue };
        let id = c.id(n);
        for (bi, blk) in s.blocks().iter().enumerate() {
            let (ours, theirs) = (format!("{id}.block{bi}"), format!("layer{}.{bi}", li + 1));
            for j in 1..=blk.convs().len() {
                sd.take(&format!("{ours}.conv{j}.weight"), &format!("{theirs}.conv{j}.weight"))?;
                sd.bn(&format!("{ours}.bn{j}"), &format!("{theirs}.bn{j}"))?;
            }
            if blk.projection().is_some() {
                sd.take(&format!("{ours}.downsample.conv.weight"), &format!("{theirs}.downsample.0.weight"))?;
                sd.bn(&format!("{ours}.downsample.bn"), &format!("{theirs}.downsample.1"))?;
            }
        }
    }
    Ok(sd.out)
}

/// Every way the encoder `enc` (stem first) differs from a torchvision ResNet; empty if none.
fn not_torchvision(run: &OpenRun, enc: &[NodeIndex]) -> Vec<String> {
    let (c, m) = (&run.plan, &run.model);
    let mut why = vec![];
    match enc.first().and_then(|&n| m.module(n)) {
        Some(NodeModule::Stem(s)) => {
            if s.kind() != StemKind::Imagenet {
                let kind = format!("{:?}", s.kind()).to_lowercase();
                why.push(format!("the stem `{}` is `kind: {kind}`; torchvision's is `imagenet`", c.id(enc[0])));
            }
            if s.conv().spec().out_channels != 64 {
                why.push(format!("the stem has {} channels; torchvision's has 64", s.conv().spec().out_channels));
            }
        }
        _ => why.push("the encoder does not start with a stem".into()),
    }
    let stages = enc.iter().skip(1).copied().collect::<Vec<_>>();
    if stages.len() != 4 {
        why.push(format!("the encoder has {} stages after the stem; a ResNet has 4", stages.len()));
    }
    for w in enc.windows(2) {
        if c.producer(w[1]).map(|(_, p)| p) != Some(w[0]) {
            why.push(format!("`{}` is not fed by `{}`: the stages must form one chain", c.id(w[1]), c.id(w[0])));
        }
    }
    let mut kind = None;
    for (i, &n) in stages.iter().enumerate() {
        let id = c.id(n);
        let Some(NodeModule::Stage(s)) = m.module(n) else {
            why.push(format!("`{id}` is not a stage"));
            continue;
        };
        if s.resize().is_some() {
            why.push(format!("`{id}` downsamples with `resize`; torchvision uses strided convolutions"));
        }
        let Some(first) = s.blocks().first() else { continue };
        let spec = first.spec();
        let want_stride = if i == 0 { 1 } else { 2 };
        if s.resize().is_none() && spec.stride != want_stride {
            why.push(format!("`{id}` has stride {}; torchvision's layer{} has {want_stride}", spec.stride, i + 1));
        }
        if spec.kind == BlockKind::Shuffle || s.final_conv().is_some() {
            why.push(format!("`{id}` is a ShuffleNet stage; torchvision's ResNets have residual blocks"));
        }
        if s.blocks().iter().any(|b| b.spec().groups != 1) {
            why.push(format!("`{id}` uses grouped convolutions"));
        }
        let expansion = if spec.kind == BlockKind::Bottleneck { 4 } else { 1 };
        let want = (64 << i) * expansion;
        if spec.out_channels != want || (spec.kind == BlockKind::Bottleneck && spec.width != want / 4) {
            why.push(format!(
                "`{id}` has {} channels (width {}); torchvision's layer{} has {want} (width {})",
                spec.out_channels,
                spec.width,
                i + 1,
                want / expansion
            ));
        }
        match kind {
            None => kind = Some(spec.kind),
            Some(k) if k != spec.kind => why.push(format!("`{id}` has {:?} blocks, the first stage {k:?}", spec.kind)),
            Some(_) => {}
        }
    }
    why
}

/// Collects renamed tensors.
struct StateDict<'a> {
    tensors: &'a HashMap<String, Tensor>,
    out: Vec<(String, Tensor)>,
    /// `num_batches_tracked` of every BatchNorm.
    counter: Tensor,
}

impl StateDict<'_> {
    fn take(&mut self, ours: &str, theirs: &str) -> Result<()> {
        let t = self.tensors.get(ours).ok_or_else(|| ExportError::MissingParam(ours.into()))?;
        self.out.push((theirs.into(), t.clone()));
        Ok(())
    }
    fn bn(&mut self, ours: &str, theirs: &str) -> Result<()> {
        for p in ["weight", "bias", "running_mean", "running_var"] {
            self.take(&format!("{ours}.{p}"), &format!("{theirs}.{p}"))?;
        }
        self.out.push((format!("{theirs}.num_batches_tracked"), self.counter.clone()));
        Ok(())
    }
}

/// Writes [`torchvision_state_dict`] to `path` as safetensors (temporary name, then rename);
/// returns the number of tensors.
pub fn write_torchvision(run: &OpenRun, path: &Path) -> Result<usize> {
    let sd = torchvision_state_dict(run)?;
    let n = sd.len();
    let map: HashMap<String, Tensor> = sd.into_iter().collect();
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "weights".into());
    let tmp = dir.join(format!(".{name}.tmp"));
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| ExportError::io(path, e))?;
    Ok(n)
}
