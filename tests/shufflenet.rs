//! ShuffleNet v2's unit (`block: shuffle`) and a narrow ShuffleNet v2 as a graph: the unit against
//! torchvision's composition of the same layers, its link's backward against candle's, a finite
//! difference check, and the engine's gradients on a LoCo graph against the naive reference.

mod common;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use locograph::exec::{reference_grads, run_step, Model};
use locograph::nn::block::{block, Block, BlockKind, BlockSpec};
use locograph::nn::gradcheck::gradcheck;
use locograph::nn::ParamBuilder;

fn spec(in_channels: usize, out_channels: usize, stride: usize) -> BlockSpec {
    BlockSpec {
        kind: BlockKind::Shuffle,
        in_channels,
        width: out_channels / 2,
        out_channels,
        stride,
        groups: 1,
        group_expand: false,
    }
}

fn input(n: usize, c: usize, hw: usize, seed: u64) -> Tensor {
    let v: Vec<f64> =
        (0..n * c * hw * hw).map(|i| (0.37 * (i as f64 + seed as f64)).sin() + 0.1 * (i % 7) as f64).collect();
    Tensor::from_vec(v, (n, c, hw, hw), &Device::Cpu).expect("input")
}

/// torchvision's `InvertedResidual.forward` on the unit's own layers:
/// ```python
/// if stride == 1 and inp == oup: x1, x2 = x.chunk(2, dim=1); out = cat((x1, branch2(x2)), 1)
/// else:                          out = cat((branch1(x), branch2(x)), 1)
/// channel_shuffle(out, 2)  # view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
/// ```
/// branch1 = dw 3×3 (stride) → BN → 1×1 → BN → ReLU; branch2 = 1×1 → BN → ReLU → dw 3×3 (stride)
/// → BN → 1×1 → BN → ReLU.
fn torchvision(b: &Block, x: &Tensor) -> Result<Tensor> {
    let s = b.spec();
    let l = b.convs();
    let run = |i: usize, x: &Tensor, relu: bool| -> Result<Tensor> {
        let y = l[i].1.forward_t(&l[i].0.forward(x)?, true)?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    };
    let branch2 = |x: &Tensor| -> Result<Tensor> { run(2, &run(1, &run(0, x, true)?, false)?, true) };
    let c = s.in_channels;
    let out = if s.stride == 1 && s.in_channels == s.out_channels {
        let (x1, x2) = (x.narrow(1, 0, c / 2)?, x.narrow(1, c / 2, c / 2)?);
        Tensor::cat(&[&x1, &branch2(&x2)?], 1)?
    } else {
        Tensor::cat(&[&run(4, &run(3, x, false)?, true)?, &branch2(x)?], 1)?
    };
    let (n, oc, h, w) = out.dims4()?;
    out.reshape((n, 2, oc / 2, h, w))?.transpose(1, 2)?.contiguous()?.reshape((n, oc, h, w))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn units_compute_torchvisions_inverted_residual() -> Result<()> {
    // A basic unit, a downsampling unit, and ShuffleNet v2-50's first unit (two branches, stride 1).
    for (cin, cout, stride) in [(8, 8, 1), (6, 12, 2), (4, 10, 1)] {
        let pb = ParamBuilder::new(7, &Device::Cpu, DType::F64);
        let b = block(spec(cin, cout, stride), &pb)?;
        let x = input(3, cin, 6, cin as u64);
        let got = b.forward_t(&x, true)?;
        let want = torchvision(&b, &x)?;
        assert_eq!(got.dims(), want.dims());
        let d = max_diff(&got, &want);
        assert!(d < 1e-12, "{cin} → {cout} stride {stride}: {d}");
        // The parameters the cost counts are the ones built; the output is the cost's.
        let (cost, out) = spec(cin, cout, stride).cost(6, 6);
        let params: usize = pb.store().params.iter().map(|p| p.var.elem_count()).sum();
        let buffers: usize = pb.store().buffers.iter().map(|p| p.var.elem_count()).sum();
        assert_eq!((cost.params, cost.buffers), (params as u64, buffers as u64));
        assert_eq!(&out[..], &got.dims()[1..]);
        let names: Vec<String> = pb.store().params.iter().map(|p| p.name.clone()).collect();
        assert!(names.contains(&"branch2.conv2.weight".to_string()), "{names:?}");
        assert_eq!(names.iter().any(|n| n.starts_with("branch1.")), cin != cout || stride != 1, "{names:?}");
    }
    Ok(())
}

/// The unit's link (its output written into a leaf, the cotangent split back to the two halves)
/// gives the gradients candle's own backward of the composed unit gives.
#[test]
fn the_units_link_backward_is_candles() -> Result<()> {
    for (cin, cout, stride) in [(8, 8, 1), (6, 12, 2), (4, 10, 1)] {
        let pb = ParamBuilder::new(3, &Device::Cpu, DType::F64);
        let b = block(spec(cin, cout, stride), &pb)?;
        let x = Var::from_tensor(&input(2, cin, 5, 1))?;
        let y = b.forward_t(x.as_tensor(), true)?;
        let g = ((input(2, cout, if stride == 2 { 3 } else { 5 }, 9) * 2.0)? - 0.3)?;
        let want = y.mul(&g)?.sum_all()?.backward()?;
        let link = b.forward_link(Some(x.clone()), x.as_tensor(), true)?;
        assert!(link.output.is_variable(), "the unit's output is the next unit's leaf");
        assert!(max_diff(&link.output, &y) < 1e-12);
        let (got, input) = link.last_backward(g)?;
        let input = input.expect("the leaf comes back");
        let (a, w) = (got.get(input.as_tensor()).expect("dx"), want.get(x.as_tensor()).expect("dx"));
        assert!(max_diff(a, w) < 1e-10, "{cin} → {cout}: dx differs by {}", max_diff(a, w));
        for p in pb.store().params.iter() {
            let (a, w) = (got.get(p.var.as_tensor()).expect("grad"), want.get(p.var.as_tensor()).expect("grad"));
            assert!(max_diff(a, w) < 1e-10, "{}: {}", p.name, max_diff(a, w));
        }
    }
    Ok(())
}

#[test]
fn gradcheck_f64() -> Result<()> {
    for (cin, cout, stride) in [(4, 4, 1), (4, 8, 2)] {
        let pb = ParamBuilder::new(5, &Device::Cpu, DType::F64);
        let b = block(spec(cin, cout, stride), &pb)?;
        // Eval mode: every batch norm is a fixed affine map.
        let res = gradcheck(|x| b.forward_t(x, false), &input(2, cin, 4, 3), 1e-5, 3)?;
        assert!(res.max_rel_err <= 1e-6, "{cin} → {cout}: {res}");
    }
    Ok(())
}

/// A narrow ShuffleNet v2 (the shipped graph's layout at a twentieth of the width) on 32×32 images.
pub const NARROW: &str = "  stem: {op: stem, kind: shufflenet, channels: 8}
  res2: {op: stage, block: shuffle, blocks: 2, channels: 12, stride: 1}
  res3: {op: stage, block: shuffle, blocks: 2, channels: 24, stride: 2}
  res4: {op: stage, block: shuffle, blocks: 3, channels: 48, stride: 2}
  res5: {op: stage, block: shuffle, blocks: 2, channels: 96, stride: 2, final_conv: 64}
";

fn experiment(heads: &[(&str, &str)], edges: &str) -> String {
    let mut nodes = NARROW.to_string();
    for (dec, loss) in heads {
        nodes +=
            &format!("  {dec}: {{op: decoder, mlp: {{depth: 2, hidden: 16, out: 8}}}}\n  {loss}: {{op: nt_xent}}\n");
    }
    format!(
        "version: 1\nname: shuffle\ninput: {{channels: 1, size: 32}}\nnodes:\n{nodes}edges:\n  - {{from: input, to: stem}}\n  - {{from: stem, to: res2}}\n{edges}data: {{format: synthetic}}\noptimizer: {{kind: sgd}}\nschedule: {{kind: constant, lr: 0.1}}\ntrain: {{batch_size: 4, steps: 1}}\n"
    )
}

#[test]
fn loco_on_a_narrow_shufflenet_matches_the_reference() {
    let text = experiment(
        &[("dec1", "L1"), ("dec2", "L2"), ("dec3", "L3")],
        "  - {from: res2, to: res3, stop: [L2]}\n  - {from: res3, to: res4, stop: [L3]}\n  - {from: res4, to: res5}\n  - {from: res3, to: dec1}\n  - {from: dec1, to: L1}\n  - {from: res4, to: dec2}\n  - {from: dec2, to: L2}\n  - {from: res5, to: dec3}\n  - {from: dec3, to: L3}\n",
    );
    let (_, c) = common::compiled(&text);
    let shapes: Vec<Vec<usize>> =
        ["res2", "res3", "res4", "res5"].iter().map(|n| c.node(n).expect("node").shape.clone()).collect();
    assert_eq!(shapes, [vec![12, 8, 8], vec![24, 4, 4], vec![48, 2, 2], vec![64, 1, 1]]);
    let model = Model::new(&c, 3, &Device::Cpu).expect("model");
    let v: Vec<f32> = (0..8 * 1024).map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5).collect();
    let x = Tensor::from_vec(v, (8, 1, 32, 32), &Device::Cpu).expect("batch");
    let out = run_step(&c, &model, &x).expect("step");
    let want = reference_grads(&c, &model, &x).expect("reference");
    let checked = common::assert_grads_match(&model, &out.grads, &want, 1e-4);
    // Every parameter is reached (all 123: every unit's branches, the final conv, the stem).
    assert_eq!(checked, model.params.params.len());
    assert_eq!(checked, 123);
    assert!(model.params.params.iter().any(|p| p.name == "res5.conv.weight"));
    // LoCo's two passes through the shared stages.
    let passes = |id: &str| out.passes[c.ids[id].index()];
    assert_eq!((passes("res3"), passes("res4"), passes("res5")), (2, 2, 1));
}

#[test]
fn shuffle_stages_refuse_what_they_cannot_build() {
    let text = experiment(&[("dec", "L")], "  - {from: res2, to: res3}\n  - {from: res3, to: res4}\n  - {from: res4, to: res5}\n  - {from: res5, to: dec}\n  - {from: dec, to: L}\n")
        .replace("channels: 24, stride: 2}", "channels: 25, stride: 2, groups: 2}");
    let loaded = locograph::config::parse_str(&text, std::path::Path::new("bad.yaml")).expect("parses");
    let e = locograph::graph::compile(&loaded).expect_err("odd channels").to_string();
    assert!(e.contains("even number of output channels, got 25") && e.contains("takes no `width`, `groups`"), "{e}");
    assert!(e.contains("bad.yaml:"), "{e}");
}
