//! Speed and peak memory of one SimCLR training step (forward + backward + AdamW), and of single
//! convolution backward calls, with candle's conv backward or locograph's (`nn::conv_op`).
//!
//! `cargo bench --bench train_step -- [--model resnet18|resnet50] [--batch N] [--steps K]
//!  [--threads T] [--candle-conv] [--candle-bn] [--conv] [--method simclr|gim|loco]
//!  [--device cpu|cuda] [--precision f32|bf16|f16]`
//!
//! - `--model resnet18`: `graphs/resnet18_small.yaml` at 32×32 (default batch 256);
//!   `resnet50`: `graphs/resnet50.yaml` at 224×224 (default batch 16). Both get the 2-layer MLP
//!   decoder and NT-Xent of the SimCLR experiments, and AdamW. Batch = images; each step sees
//!   two views of each, as in training.
//! - `--candle-conv`: candle's own conv2d and its backward (the "before" of docs/performance.md).
//! - `--candle-bn`: training-mode batch norm composed from candle ops instead of the fused op.
//! - `--method gim|loco`: the same encoder with GIM's or LoCo's decoders and stops (bench/gpu.sh).
//! - `--device cuda` (a `--features cuda` build) and `--precision bf16`: the GPU benchmark.
//! - `--peak`: instead of a step, oneDNN's convolution peak (f32 and bf16) on this machine.
//! - `--conv`: instead of a step, time the backward of single convolutions from ResNet-18/50,
//!   both implementations alternately.
//!
//! One line of `key=value` per run, for `bench/run.sh` to read beside `bench/torch_step.py`;
//! peak RSS is the process's `VmHWM`, so run one configuration per process. Like the CLI, the
//! bench keeps freed memory in the heap (`locograph::malloc`); `LOCOGRAPH_MALLOC=system` runs
//! it with glibc's defaults (`impl=…+system-malloc`).

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use locograph::config::parse_str;
use locograph::exec::{run_step, Model};
use locograph::graph::compile;
use locograph::nn::conv_op;
use locograph::optim::{AdamW, AdamWConfig, Optimizer};

struct Args {
    model: String,
    batch: Option<usize>,
    steps: usize,
    threads: Option<usize>,
    candle_conv: bool,
    candle_bn: bool,
    conv: bool,
    peak: bool,
    method: String,
    device: String,
    precision: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        model: "resnet18".into(),
        batch: None,
        steps: 2,
        threads: None,
        candle_conv: false,
        candle_bn: false,
        conv: false,
        peak: false,
        method: "simclr".into(),
        device: "cpu".into(),
        precision: "f32".into(),
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, k: &str| -> Result<usize, String> {
        v.ok_or(format!("{k} needs a value"))?.parse().map_err(|e| format!("{k}: {e}"))
    };
    while let Some(k) = it.next() {
        match k.as_str() {
            "--model" => a.model = it.next().ok_or("--model needs a value")?,
            "--batch" => a.batch = Some(num(it.next(), "--batch")?),
            "--steps" => a.steps = num(it.next(), "--steps")?.max(1),
            "--threads" => a.threads = Some(num(it.next(), "--threads")?),
            "--candle-conv" => a.candle_conv = true,
            "--candle-bn" => a.candle_bn = true,
            "--method" => a.method = it.next().ok_or("--method needs a value")?,
            "--device" => a.device = it.next().ok_or("--device needs a value")?,
            "--precision" => a.precision = it.next().ok_or("--precision needs a value")?,
            "--conv" => a.conv = true,
            "--peak" => a.peak = true,
            // cargo bench passes --bench to every harness = false target
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// Deterministic pseudo-random values in [−0.5, 0.5) (candle's CPU RNG cannot be seeded).
fn noise(shape: &[usize], seed: u64) -> candle_core::Result<Tensor> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// The experiment of `bench/torch_step.py` (SimCLR) or `bench/torch_gpu_step.py` (all three):
/// encoder, GAP → 2-layer MLP → 128, NT-Xent; GIM and LoCo add decoders and stops.
fn experiment(model: &str, method: &str, device: &str, precision: &str) -> Result<(String, usize), String> {
    let (graph, size, tau) = match model {
        "resnet18" => ("resnet18_small.yaml", 32, 0.5),
        "resnet50" => ("resnet50.yaml", 224, 0.1),
        other => return Err(format!("unknown --model {other} (resnet18 or resnet50)")),
    };
    let chain = "  - {from: input, to: stem}\n  - {from: stem, to: res2}\n";
    let (losses, edges): (&[&str], String) = match method {
        "simclr" => (&["res5"], format!("{chain}  - {{from: res2, to: res3}}\n  - {{from: res3, to: res4}}\n  - {{from: res4, to: res5}}\n")),
        "gim" => (
            &["res2", "res3", "res4", "res5"],
            format!("{chain}  - {{from: res2, to: res3, stop: all}}\n  - {{from: res3, to: res4, stop: all}}\n  - {{from: res4, to: res5, stop: all}}\n"),
        ),
        "loco" => (
            &["res3", "res4", "res5"],
            format!("{chain}  - {{from: res2, to: res3, stop: [L_res4]}}\n  - {{from: res3, to: res4, stop: [L_res5]}}\n  - {{from: res4, to: res5}}\n"),
        ),
        other => return Err(format!("unknown --method {other} (simclr, gim or loco)")),
    };
    let mut nodes = String::new();
    let mut edges = edges;
    for at in losses {
        nodes += &format!(
            "  dec_{at}: {{op: decoder, mlp: {{depth: 2, out: 128}}}}\n  L_{at}: {{op: nt_xent, temperature: {tau}}}\n"
        );
        edges += &format!("  - {{from: {at}, to: dec_{at}}}\n  - {{from: dec_{at}, to: L_{at}}}\n");
    }
    let yaml = format!(
        "version: 1
name: bench_{model}_{method}
seed: 0
device: {device}
precision: {precision}
input: {{channels: 3, size: {size}}}
encoder: ../graphs/{graph}
nodes:
{nodes}edges:
{edges}data: {{format: image_folder, path: unused, augment: {{size: {size}}}}}
optimizer: {{kind: adamw, weight_decay: 1.0e-6}}
schedule: {{kind: cosine, lr: 1.0e-3}}
train: {{batch_size: 256, steps: 1}}
"
    );
    Ok((yaml, size))
}

fn train_step(a: &Args) -> Result<(), String> {
    let (yaml, size) = experiment(&a.model, &a.method, &a.device, &a.precision)?;
    let batch = a.batch.unwrap_or(if a.model == "resnet18" { 256 } else { 16 });
    // The YAML's `encoder:` path is relative to its file: pretend it sits in experiments/.
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/bench_train_step.yaml");
    let loaded = parse_str(&yaml, &file).map_err(|e| e.to_string())?;
    let c = compile(&loaded).map_err(|e| e.to_string())?;
    let exp = &loaded.experiment;
    let device = locograph::exec::setup::device(exp.device).map_err(|e| e.to_string())?;
    let model = Model::new(&c, 0, &device).map_err(|e| e.to_string())?.with_compute(exp.precision.dtype());
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 1e-6, ..AdamWConfig::default() });
    let x = noise(&[2 * batch, 3, size, size], 0).and_then(|x| x.to_device(&device)).map_err(|e| e.to_string())?;
    // The activations the plan predicts the step holds at its peak (layer-spec costs).
    let predicted = c.held_bytes(2 * batch, exp.precision.dtype().size_in_bytes()).peak().map_or(0, |p| p.1);
    // Model FLOPs of a step: forward and the two backward products of every layer, 2 FLOPs per
    // multiply-accumulate, all views (the encoder; the heads are < 1 %).
    let flops = 6.0 * locograph::eval::profile::profile(&c).macs() as f64 * (2 * batch) as f64;
    let mut times = vec![];
    // One untimed step first: thread pools, optimizer state, allocator warm-up.
    for i in 0..=a.steps {
        let t = Instant::now();
        let out = run_step(&c, &model, &x).map_err(|e| e.to_string())?;
        opt.step(&model.params.params, &out.grads, 1e-3).map_err(|e| e.to_string())?;
        // GPU kernels run asynchronously: the step ends when the device is done.
        device.synchronize().map_err(|e| e.to_string())?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "impl={}{} model={} method={} device={} precision={} batch={batch} steps={} step_s={median:.3} min_s={:.3} \
         images_per_s={:.2} peak_rss_mb={:.0} predicted_activations_mb={:.0} step_gflop={:.1}",
        match (a.candle_conv, a.candle_bn) {
            (true, true) => "candle".to_string(),
            (true, false) => "candle-conv".into(),
            (false, true) => "locograph-conv".into(),
            (false, false) => format!(
                "locograph{}{}{}",
                if locograph::dnnl::enabled() || a.device != "cpu" { "" } else { "-im2col" },
                if a.precision == "f32" { String::new() } else { format!("-{}", a.precision) },
                if locograph::dnnl::enabled() && a.device == "cpu" && !locograph::dnnl::channels_last() {
                    "-nchw"
                } else {
                    ""
                }
            ),
        },
        if MALLOC_HEAP.load(std::sync::atomic::Ordering::Relaxed) { "" } else { "+system-malloc" },
        a.model,
        a.method,
        a.device,
        a.precision,
        a.steps,
        times[0],
        batch as f64 / median,
        locograph::malloc::peak_rss().unwrap_or(0) as f64 / 1e6,
        predicted as f64 / 1e6,
        flops / 1e9
    );
    Ok(())
}

/// Backward of single convolutions (input and kernel gradient), both implementations
/// alternately, each the best of `steps` calls.
fn conv_calls(a: &Args) -> Result<(), String> {
    // (name, N, C, H, O, k, stride, padding, groups): layers of the two benchmark models.
    type Layer = (&'static str, usize, usize, usize, usize, usize, usize, usize, usize);
    let layers: &[Layer] = &[
        ("r18 res2 3x3", 64, 64, 32, 64, 3, 1, 1, 1),
        ("r18 res3 3x3/2", 64, 64, 32, 128, 3, 2, 1, 1),
        ("r18 res4 3x3", 64, 256, 8, 256, 3, 1, 1, 1),
        ("r50 stem 7x7/2", 4, 3, 224, 64, 7, 2, 3, 1),
        ("r50 res3 1x1", 4, 512, 28, 128, 1, 1, 0, 1),
        ("r50 res4 3x3", 4, 256, 14, 256, 3, 1, 1, 1),
        ("grouped 3x3 g32", 4, 256, 28, 256, 3, 1, 1, 32),
    ];
    let e = |e: candle_core::Error| e.to_string();
    for &(name, n, c, h, o, k, s, p, g) in layers {
        let x = Var::from_tensor(&noise(&[n, c, h, h], 1).map_err(e)?).map_err(e)?;
        let w = Var::from_tensor(&noise(&[o, c / g, k, k], 2).map_err(e)?).map_err(e)?;
        let mut best = [f64::INFINITY; 2];
        for _ in 0..a.steps {
            for (j, reference) in [true, false].into_iter().enumerate() {
                conv_op::use_candle_reference(reference);
                let y = conv_op::conv2d(x.as_tensor(), w.as_tensor(), p, s, g).map_err(e)?;
                let proj = noise(y.dims(), 3).map_err(e)?;
                let loss = y.mul(&proj).map_err(e)?.sum_all().map_err(e)?;
                let t = Instant::now();
                let grads = loss.backward().map_err(e)?;
                best[j] = best[j].min(t.elapsed().as_secs_f64());
                drop(grads);
            }
        }
        conv_op::use_candle_reference(false);
        println!(
            "conv={name:?} shape=[{n},{c},{h},{h}] candle_bwd_ms={:.1} locograph_bwd_ms={:.1} speedup={:.2}",
            best[0] * 1e3,
            best[1] * 1e3,
            best[0] / best[1]
        );
    }
    Ok(())
}

/// The machine's convolution peak: oneDNN's 3×3 convolution (batch 256, 64 → 64 channels,
/// 32×32), forward + backward data + backward weights on buffers already in oneDNN's chosen
/// layouts, oneDNN's own threading, f32 and bf16, the best of `steps` rounds. The MFU of
/// bench/run.sh's rows is against these. Also: the same through `locograph::dnnl` as training
/// calls it (images split over rayon's threads): NCHW buffers, reordered per call, and
/// channels-last (NHWC) buffers, which oneDNN computes on as they are.
fn peak(a: &Args) -> Result<(), String> {
    use locograph::dnnl::{self, ConvGeometry, Order, Orders, Pass};
    let g = ConvGeometry { n: 256, c: 64, h: 32, w: 32, o: 64, kh: 3, kw: 3, stride: 1, padding: 1, groups: 1 };
    let flops = 3.0 * 2.0 * (g.n * g.o * g.h * g.w * g.c * 9) as f64;
    fn as_called<T: dnnl::Element>(
        g: &ConvGeometry,
        o: Orders,
        x: &[T],
        w: &[T],
        steps: usize,
    ) -> Result<f64, dnnl::DnnlError> {
        let mut best = f64::INFINITY;
        for _ in 0..=steps {
            let t = Instant::now();
            let y = dnnl::conv_forward(g, o, x, w)?;
            let dx = dnnl::conv_backward_data(g, o, &y, w)?;
            let dw = dnnl::conv_backward_weights(g, o, x, &y)?;
            best = best.min(t.elapsed().as_secs_f64());
            drop((dx, dw));
        }
        Ok(best)
    }
    let e = |e: dnnl::DnnlError| e.to_string();
    let threads = rayon::current_num_threads();
    let x: Vec<f32> = (0..g.n * g.c * g.h * g.w).map(|i| ((i % 97) as f32 - 48.0) / 50.0).collect();
    let w: Vec<f32> = (0..g.o * g.c * 9).map(|i| ((i % 31) as f32 - 15.0) / 100.0).collect();
    let (xb, wb): (Vec<half::bf16>, Vec<half::bf16>) =
        (x.iter().map(|&v| half::bf16::from_f32(v)).collect(), w.iter().map(|&v| half::bf16::from_f32(v)).collect());
    let nhwc = Orders { x: Order::Nhwc, y: Order::Nhwc };
    let rows = [
        (
            "f32",
            dnnl::conv_peak_seconds::<f32>(&g, threads, a.steps).map_err(e)?,
            as_called(&g, Orders::NCHW, &x, &w, a.steps).map_err(e)?,
            as_called(&g, nhwc, &x, &w, a.steps).map_err(e)?,
            dnnl::conv_kernel::<f32>(&g, Orders::NCHW, Pass::Forward).map_err(e)?,
        ),
        (
            "bf16",
            dnnl::conv_peak_seconds::<half::bf16>(&g, threads, a.steps).map_err(e)?,
            as_called(&g, Orders::NCHW, &xb, &wb, a.steps).map_err(e)?,
            as_called(&g, nhwc, &xb, &wb, a.steps).map_err(e)?,
            dnnl::conv_kernel::<half::bf16>(&g, Orders::NCHW, Pass::Forward).map_err(e)?,
        ),
    ];
    for (precision, best, called, called_nhwc, kernel) in rows {
        println!(
            "peak precision={precision} gflops={:.1} as_called_gflops={:.1} as_called_nhwc_gflops={:.1} kernel={kernel}",
            flops / best / 1e9,
            flops / called / 1e9,
            flops / called_nhwc / 1e9
        );
    }
    Ok(())
}

/// Whether `locograph::malloc::keep_freed_memory` is in effect (as in the CLI).
static MALLOC_HEAP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn main() {
    MALLOC_HEAP.store(locograph::malloc::keep_freed_memory(), std::sync::atomic::Ordering::Relaxed);
    let result = parse_args().and_then(|a| {
        if let Some(t) = a.threads {
            // candle's CPU kernels and gemm read rayon's global pool.
            rayon::ThreadPoolBuilder::new().num_threads(t).build_global().map_err(|e| e.to_string())?;
        }
        conv_op::use_candle_reference(a.candle_conv);
        locograph::nn::batch_norm::use_composed_reference(a.candle_bn);
        if a.peak {
            peak(&a)
        } else if a.conv {
            conv_calls(&a)
        } else {
            train_step(&a)
        }
    });
    if let Err(e) = result {
        eprintln!("train_step: {e}");
        std::process::exit(1);
    }
}
