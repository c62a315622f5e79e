//! Peak memory of one SimCLR, GIM and LoCo training step on ResNet-50 and Progressive
//! ResNet-50 at 224², measured by a counting global allocator, beside the paper's savings.
//!
//! `cargo bench --bench memory -- [--images N] [--models resnet50,presnet50] [--steps K] [--profile] [--trace] [--keep-grads] [--candle-conv]`
//! (`--profile` first prints `eval::profile` of each model's SimCLR encoder; `--trace`
//! the peak between consecutive schedule steps of the last step; `--keep-grads` keeps every
//! gradient to the end of the step instead of updating each node as soon as its gradients are
//! final, as training does; `--candle-conv` candle's own conv backward instead of
//! `nn::conv_op`'s)
//!
//! Each step runs the experiment's optimizer as training does (`exec::train::update_when_final`);
//! the reported peak is the smallest of `--steps` (default 2): the first step also allocates the
//! optimizer's slots, state that later steps hold before they start, like the weights.
//!
//! Every candle CPU tensor is a `Vec` from the global allocator, so the wrapper below sees
//! every activation, leaf copy, cotangent, gradient and im2col buffer. For each run the
//! counter's peak is reset to the live bytes right before `run_step` (weights, optimizer state
//! and the batch are already allocated), so "step peak" is what the step adds on top.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor};
use locograph::config::load;
use locograph::exec::chain::Link;
use locograph::exec::train::update_when_final;
use locograph::exec::{run_step_with, GradsFinal, Hooks, Model};
use locograph::graph::{compile, Step};

/// The system allocator, counting live bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Resets the high-water mark to what is live now, and returns that.
fn reset_peak() -> usize {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    live
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
    engine_peak: usize,
    secs: f64,
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
    let mut best = Measured { step_peak: 0, total_peak: 0, engine_peak: 0, secs: f64::INFINITY };
    for i in 0..steps {
        let base = reset_peak();
        let t = Instant::now();
        let mut trace = vec![];
        let mut after = |step: &Step, held: usize| {
            // Peak since the previous step, then start a new interval.
            let p = PEAK.swap(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
            trace.push((*step, p, held));
        };
        let mut update = |f: GradsFinal<'_>| update_when_final(optimizer.as_mut(), &model, f, 1e-3);
        let hooks =
            Hooks { after_step: Some(&mut after), grads_final: if keep_grads { None } else { Some(&mut update) } };
        let out = run_step_with(&c, &model, &x, hooks).map_err(|e| e.to_string())?;
        let peak = trace.iter().map(|t| t.1).max().unwrap_or(0);
        if verbose && i + 1 == steps {
            for (step, p, held) in &trace {
                let s = match *step {
                    Step::Forward(n) => format!("F:{}", c.id(n)),
                    Step::Backward { node, group } => format!("B:{}[{group}]", c.id(node)),
                };
                println!(
                    "    {s:<12} peak {:>8.1} MB (engine {:>8.1} MB)",
                    (p - base) as f64 / 1e6,
                    *held as f64 / 1e6
                );
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let engine = out.peak_held_bytes;
        drop(out);
        // The first step also allocates thread pools and caches: keep the smallest peak.
        if best.step_peak == 0 || peak - base < best.step_peak {
            best.step_peak = peak - base;
            best.total_peak = peak;
        }
        best.engine_peak = engine;
        best.secs = best.secs.min(secs);
    }
    Ok(best)
}

fn forward_trace(file: &Path, images: usize) -> Result<(), String> {
    let c = compile(&load(file).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let model = Model::new(&c, 0, &Device::Cpu).map_err(|e| e.to_string())?;
    let mut x = batch(2 * images).map_err(|e| e.to_string())?;
    let mut kept = vec![];
    for n in c.schedule.forward_order().into_iter().skip(1) {
        let Some(cfg) = &c.graph[n].config else { continue };
        if cfg.is_loss() {
            break;
        }
        let before = LIVE.load(Ordering::Relaxed);
        let input: Vec<usize> = x.dims()[1..].to_vec();
        // As the engine runs a node whose backward is to come: a chain of links (per block).
        let mut links = vec![];
        let mut h = x.clone();
        for k in 0..model.pieces(n) {
            let leaf = if k == 0 { None } else { Some(candle_core::Var::from_tensor(&h).map_err(|e| e.to_string())?) };
            let piece = model.forward_piece(n, k, &h, true).map_err(|e| e.to_string())?;
            let link = Link::new(leaf, piece).map_err(|e| e.to_string())?;
            h = link.output.clone();
            links.push(link);
        }
        let y = h;
        let grew = LIVE.load(Ordering::Relaxed) - before;
        let est = locograph::eval::profile::saved_elems(cfg, &input) as usize * x.dim(0).unwrap_or(0) * 4;
        // The node's own backward on a detached input: its transient peak.
        let leaf = candle_core::Var::from_tensor(&x.detach()).map_err(|e| e.to_string())?;
        let base = reset_peak();
        let out = model
            .forward_node(n, leaf.as_tensor(), true)
            .and_then(|y| y.sum_all()?.backward())
            .map_err(|e| e.to_string())?;
        let bwd = PEAK.load(Ordering::Relaxed) - base;
        drop(out);
        // The same with an input that needs no gradient (a GIM stage's).
        let base = reset_peak();
        let out = model
            .forward_node(n, &x.detach(), true)
            .and_then(|y| y.sum_all()?.backward())
            .map_err(|e| e.to_string())?;
        let bwd_detached = PEAK.load(Ordering::Relaxed) - base;
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
    if args.iter().any(|a| a == "--forward") {
        // Live bytes after each training-mode forward, graphs kept: what candle really saves,
        // to compare with `eval::profile::saved_elems`.
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
                Ok(c) => println!("{model}:\n{}", locograph::eval::profile(&c, 224)),
                Err(e) => eprintln!("{}: {e}", file.display()),
            }
        }
    }
    println!("One training step, {images} images = {} views of 224², f32, CPU; best of {steps} step(s)", 2 * images);
    println!(
        "{:<10} {:<7} {:>14} {:>8} {:>15} {:>8} {:>13} {:>8} {:>7} {:>9}",
        "model",
        "method",
        "step peak MB",
        "saving",
        "process peak MB",
        "saving",
        "engine est MB",
        "saving",
        "paper",
        "step s"
    );
    for model in models.split(',') {
        let paper = match model {
            "resnet50" => [1.0, 1.81, 1.28],
            _ => [1.0, 4.56, 2.76],
        };
        let mut base: Option<(f64, f64, f64, f64)> = None;
        for (i, method) in ["simclr", "gim", "loco"].into_iter().enumerate() {
            let file = root.join(format!("{method}_{model}_imagenet.yaml"));
            let m = match measure(&file, images, steps, verbose, keep_grads) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    std::process::exit(1);
                }
            };
            let (s, t, e) = (m.step_peak as f64 / 1e6, m.total_peak as f64 / 1e6, m.engine_peak as f64 / 1e6);
            let b = *base.get_or_insert((s, t, e, m.secs));
            println!(
                "{model:<10} {method:<7} {s:>14.1} {:>7.2}× {t:>15.1} {:>7.2}× {e:>13.1} {:>7.2}× {:>6.2}× {:>9.2}",
                b.0 / s,
                b.1 / t,
                b.2 / e.max(1e-9),
                paper[i],
                m.secs
            );
            if method == "loco" {
                println!("{model:<10} LoCo step time / SimCLR step time: {:.2}", m.secs / b.3);
            }
        }
    }
}
