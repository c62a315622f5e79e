//! Peak memory of one SimCLR, GIM and LoCo training step on ResNet-50 and Progressive
//! ResNet-50 at 224², measured two ways, beside the paper's savings; and where LoCo's extra
//! time goes.
//!
//! `cargo bench --bench memory -- [--images N] [--models resnet50,presnet50] [--steps K] [--profile] [--trace] [--keep-grads] [--candle-conv] [--forward]`
//! (`--profile` first prints `eval::profile` of each model's SimCLR encoder; `--trace`
//! the peak between consecutive actions of the last step, beside what the engine holds itself; `--keep-grads` keeps every
//! gradient to the end of the step instead of updating each node as soon as its gradients are
//! final, as training does; `--candle-conv` candle's own conv backward instead of
//! `nn::conv_op`'s; `--forward` each stage's kept bytes against its `nn::Cost::saved`)
//!
//! Each (model, method) runs in a process of its own (this binary again, `--child`), so that
//! its peak RSS (`VmHWM`) is its own. Each step runs the experiment's optimizer as training
//! does (`exec::train::update_when_final`), under the CLI's allocator policy
//! (`locograph::malloc`); the reported peak is the smallest of `--steps` (default 2): the
//! first step also allocates the optimizer's slots, state that later steps hold before they
//! start, like the weights.
//!
//! Every candle CPU tensor is a `Vec` from the global allocator, so the wrapper below sees
//! every activation, leaf copy, cotangent, gradient and im2col buffer. For each run the
//! counter's peak is reset to the live bytes right before `run_step` (weights, optimizer state
//! and the batch are already allocated), so "step peak" is what the step adds on top;
//! "heap peak" is the whole process's high-water mark of live bytes, and "peak RSS" what the
//! kernel saw (`VmHWM`: the heap's high-water mark plus the binary, thread stacks and
//! allocator slack).

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use locograph::config::load;
use locograph::exec::accounting::held_bytes;
use locograph::exec::train::update_when_final;
use locograph::exec::{run_step_with, GradsFinal, Hooks, Model, StepState};
use locograph::graph::{compile, Action};
use locograph::malloc::{live_bytes, peak_bytes, CountingAlloc};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Resets the high-water mark to what is live now, and returns that.
fn reset_peak() -> usize {
    locograph::malloc::reset_peak().0
}

/// Deterministic pseudo-random views (candle's own RNG cannot be seeded).
fn batch(views: usize) -> candle_core::Result<Tensor> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let v: Vec<f32> = (0..views * 3 * 224 * 224)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(v, (views, 3, 224, 224), &Device::Cpu)
}

struct Measured {
    step_peak: usize,
    total_peak: usize,
    predicted_peak: usize,
    secs: f64,
    /// Seconds of each action (fastest over the steps run), in execution order.
    step_secs: Vec<(String, f64)>,
}

fn measure(file: &Path, images: usize, steps: usize, verbose: bool, keep_grads: bool) -> Result<Measured, String> {
    let loaded = load(file).map_err(|e| e.to_string())?;
    let c = compile(&loaded).map_err(|e| e.to_string())?;
    let model = Model::new(&c, 0, &Device::Cpu).map_err(|e| e.to_string())?;
    let x = batch(2 * images).map_err(|e| e.to_string())?;
    // The experiment's optimizer, applied as training does: to each node as soon as its
    // gradients are final. Its slots are allocated in the first step and are state from then on
    // (like the weights): only later steps' peaks are comparable, hence `--steps` ≥ 2.
    let mut optimizer = loaded.experiment.optimizer.build();
    let mut best = Measured { step_peak: 0, total_peak: 0, predicted_peak: 0, secs: f64::INFINITY, step_secs: vec![] };
    for i in 0..steps {
        let base = reset_peak();
        let t = Instant::now();
        let mut trace = vec![];
        let mut last = Instant::now();
        let mut after = |action: &Action, state: &StepState<'_>| {
            // Peak since the previous action, then start a new interval.
            let p = locograph::malloc::reset_peak().1;
            trace.push((*action, p, held_bytes(state), last.elapsed().as_secs_f64()));
            last = Instant::now();
        };
        let mut update = |f: GradsFinal<'_>| update_when_final(optimizer.as_mut(), &model, f, 1e-3);
        let hooks =
            Hooks { after_action: Some(&mut after), grads_final: if keep_grads { None } else { Some(&mut update) } };
        let out = run_step_with(&c, &model, &x, hooks).map_err(|e| e.to_string())?;
        let secs = t.elapsed().as_secs_f64();
        let peak = trace.iter().map(|t| t.1).max().unwrap_or(0);
        if verbose && i + 1 == steps {
            for (step, p, held, _) in &trace {
                println!(
                    "    {:<12} peak {:>8.1} MB (engine {:>8.1} MB)",
                    c.action_name(step),
                    (p - base) as f64 / 1e6,
                    *held as f64 / 1e6
                );
            }
        }
        drop(out);
        // What the plan predicts from the layer specs before running (`locograph profile`).
        let predicted = c.held_bytes(2 * images, 4).peak().map_or(0, |p| p.1);
        // The first step also allocates thread pools and caches: keep the smallest peak.
        if best.step_peak == 0 || peak - base < best.step_peak {
            best.step_peak = peak - base;
            best.total_peak = peak;
        }
        best.predicted_peak = predicted;
        best.secs = best.secs.min(secs);
        if best.step_secs.is_empty() {
            best.step_secs = trace.iter().map(|t| (c.action_name(&t.0), t.3)).collect();
        } else {
            for (b, t) in best.step_secs.iter_mut().zip(&trace) {
                b.1 = b.1.min(t.3);
            }
        }
    }
    Ok(best)
}

/// The child's result line, read back by the parent.
const RESULT: &str = "result:";

/// Runs one (model, method) in this process and prints its [`RESULT`] line (and the trace).
fn child(file: &Path, images: usize, steps: usize, verbose: bool, keep_grads: bool) -> Result<(), String> {
    let m = measure(file, images, steps, verbose, keep_grads)?;
    let rss = locograph::malloc::peak_rss().unwrap_or(0);
    let timings: Vec<String> = m.step_secs.iter().map(|(s, t)| format!("{s}={t:.4}")).collect();
    println!("{RESULT} {} {} {} {} {} {}", m.step_peak, m.total_peak, m.predicted_peak, rss, m.secs, timings.join(","));
    Ok(())
}

/// What a child measured: bytes (step, heap, engine, RSS), step seconds, per-step seconds.
struct ChildResult {
    bytes: [f64; 4],
    secs: f64,
    step_secs: Vec<(String, f64)>,
}

fn run_child(model: &str, method: &str, args: &[String]) -> Result<ChildResult, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(exe)
        .args(args.iter().skip(1))
        .args(["--child", model, method])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut result = None;
    for line in text.lines() {
        match line.strip_prefix(RESULT) {
            Some(r) => result = Some(r.trim().to_string()),
            None => println!("{line}"),
        }
    }
    let r = result.ok_or_else(|| format!("{model} {method}: the child printed no result ({})", out.status))?;
    let f: Vec<&str> = r.split(' ').collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).ok_or_else(|| format!("bad result line `{r}`"));
    let step_secs = f
        .get(5)
        .map(|s| {
            s.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.parse().unwrap_or(0.0)))
        })
        .into_iter()
        .flatten()
        .collect();
    Ok(ChildResult { bytes: [num(0)?, num(1)?, num(2)?, num(3)?], secs: num(4)?, step_secs })
}

fn forward_trace(file: &Path, images: usize) -> Result<(), String> {
    let c = compile(&load(file).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let model = Model::new(&c, 0, &Device::Cpu).map_err(|e| e.to_string())?;
    let mut x = batch(2 * images).map_err(|e| e.to_string())?;
    let mut kept = vec![];
    for n in c.order.forward_order().into_iter().skip(1) {
        let Some(cfg) = &c.graph[n].config else { continue };
        if cfg.is_loss() {
            break;
        }
        let before = live_bytes();
        // As the engine runs a node whose backward is to come: a chain of links (per block).
        let mut links = vec![];
        let mut h = x.clone();
        for k in 0..model.links(n) {
            let leaf = if k == 0 { None } else { Some(candle_core::Var::from_tensor(&h).map_err(|e| e.to_string())?) };
            let link = model.forward_link(n, k, leaf, &h, true).map_err(|e| e.to_string())?;
            h = link.output.clone();
            links.push(link);
        }
        let y = h;
        let grew = live_bytes() - before;
        let est = c.cost(n).saved as usize * x.dim(0).unwrap_or(0) * 4;
        // The node's own backward on a detached input: its transient peak.
        let leaf = candle_core::Var::from_tensor(&x.detach()).map_err(|e| e.to_string())?;
        let base = reset_peak();
        let out = model
            .forward_node(n, leaf.as_tensor(), true)
            .and_then(|y| y.sum_all()?.backward())
            .map_err(|e| e.to_string())?;
        let bwd = peak_bytes() - base;
        drop(out);
        // The same with an input that needs no gradient (a GIM stage's).
        let base = reset_peak();
        let out = model
            .forward_node(n, &x.detach(), true)
            .and_then(|y| y.sum_all()?.backward())
            .map_err(|e| e.to_string())?;
        let bwd_detached = peak_bytes() - base;
        drop(out);
        println!(
            "{:<6} kept {:>8.1} MB, estimated {:>8.1} MB; forward + backward alone peaks at {:>8.1} MB ({:>8.1} MB with a detached input)",
            c.id(n),
            grew as f64 / 1e6,
            est as f64 / 1e6,
            bwd as f64 / 1e6,
            bwd_detached as f64 / 1e6
        );
        kept.push(links);
        x = y;
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let images: usize = arg("--images").and_then(|s| s.parse().ok()).unwrap_or(2);
    let verbose = args.iter().any(|a| a == "--trace");
    let steps: usize = arg("--steps").and_then(|s| s.parse().ok()).unwrap_or(2);
    let keep_grads = args.iter().any(|a| a == "--keep-grads");
    let models = arg("--models").unwrap_or_else(|| "resnet50,presnet50".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    // candle's own conv backward (per-group `narrow`s), for the before/after of nn::conv_op.
    locograph::nn::conv_op::use_candle_reference(args.iter().any(|a| a == "--candle-conv"));
    if let Some(i) = args.iter().position(|a| a == "--child") {
        // As the CLI's training processes do.
        locograph::malloc::keep_freed_memory();
        let (model, method) =
            (args.get(i + 1).cloned().unwrap_or_default(), args.get(i + 2).cloned().unwrap_or_default());
        let file = root.join(format!("{method}_{model}_imagenet.yaml"));
        if let Err(e) = child(&file, images, steps, verbose, keep_grads) {
            eprintln!("{}: {e}", file.display());
            std::process::exit(1);
        }
        return;
    }
    if args.iter().any(|a| a == "--forward") {
        // Live bytes after each training-mode forward, graphs kept: what candle really saves,
        // to compare with each node's `nn::Cost::saved`.
        for model in models.split(',') {
            if let Err(e) = forward_trace(&root.join(format!("simclr_{model}_imagenet.yaml")), images) {
                eprintln!("{e}");
            }
        }
        return;
    }
    if args.iter().any(|a| a == "--profile") {
        for model in models.split(',') {
            let file = root.join(format!("simclr_{model}_imagenet.yaml"));
            match load(&file).map_err(|e| e.to_string()).and_then(|l| compile(&l).map_err(|e| e.to_string())) {
                Ok(c) => println!("{model}:\n{}", locograph::eval::profile(&c)),
                Err(e) => eprintln!("{}: {e}", file.display()),
            }
        }
    }
    println!(
        "One training step, {images} images = {} views of 224², f32, CPU, {} thread(s); best of {steps} step(s); each run in its own process",
        2 * images,
        rayon::current_num_threads()
    );
    println!(
        "{:<10} {:<7} {:>13} {:>7} {:>12} {:>7} {:>12} {:>7} {:>13} {:>7} {:>6} {:>7}",
        "model",
        "method",
        "step peak MB",
        "saving",
        "heap peak MB",
        "saving",
        "peak RSS MB",
        "saving",
        "predicted MB",
        "saving",
        "paper",
        "step s"
    );
    for model in models.split(',') {
        let paper = match model {
            "resnet50" => [1.0, 1.81, 1.28],
            _ => [1.0, 4.56, 2.76],
        };
        let mut base: Option<ChildResult> = None;
        for (i, method) in ["simclr", "gim", "loco"].into_iter().enumerate() {
            let r = match run_child(model, method, &args) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            };
            let b = base.get_or_insert_with(|| ChildResult {
                bytes: r.bytes,
                secs: r.secs,
                step_secs: r.step_secs.clone(),
            });
            let [s, t, e, rss] = r.bytes.map(|v| v / 1e6);
            let [bs, bt, be, brss] = b.bytes.map(|v| v / 1e6);
            println!(
                "{model:<10} {method:<7} {s:>13.1} {:>6.2}× {t:>12.1} {:>6.2}× {rss:>12.1} {:>6.2}× {e:>13.1} {:>6.2}× {:>5.2}× {:>7.2}",
                bs / s,
                bt / t,
                brss / rss.max(1e-9),
                be / e.max(1e-9),
                paper[i],
                r.secs
            );
            if method == "loco" {
                print_extra_cost(model, b, &r);
            }
        }
    }
}

/// LoCo's step time against SimCLR's, and how much of the difference is the second backward
/// through each shared stage (the only extra work LoCo should do, besides its decoders).
fn print_extra_cost(model: &str, simclr: &ChildResult, loco: &ChildResult) {
    let second: Vec<&(String, f64)> =
        loco.step_secs.iter().filter(|(s, _)| s.starts_with("B:") && s.ends_with("[1]")).collect();
    let second_total: f64 = second.iter().map(|s| s.1).sum();
    let heads = |r: &ChildResult| -> f64 {
        r.step_secs.iter().filter(|(s, _)| s.contains(":dec") || s.contains(":L")).map(|s| s.1).sum()
    };
    // SimCLR's one backward through the same node, for scale.
    let simclr_pass = |step: &str| {
        let first = step.replace("[1]", "[0]");
        simclr.step_secs.iter().find(|(s, _)| *s == first).map_or(f64::NAN, |s| s.1)
    };
    let list: Vec<String> =
        second.iter().map(|(s, t)| format!("{} {t:.2} s = {:.2}× SimCLR's", &s[2..], t / simclr_pass(s))).collect();
    println!(
        "{model:<10} LoCo / SimCLR step time {:.2} (+{:.2} s): second backward passes {:.2} s ({}), decoders and losses {:+.2} s, the rest {:+.2} s",
        loco.secs / simclr.secs,
        loco.secs - simclr.secs,
        second_total,
        list.join(", "),
        heads(loco) - heads(simclr),
        loco.secs - simclr.secs - second_total - (heads(loco) - heads(simclr)),
    );
}
