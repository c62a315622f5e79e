//! Augmentation throughput against torchvision: SimCLR's full pipeline through the real
//! `PairLoader` (release build) and the same pipeline in torchvision
//! (`bench/torchvision_augment.py`; also with MoCo v2's faster PIL blur in place of
//! `transforms.GaussianBlur`), at 32×32 (from 32×32 sources) and 224×224 (random resized
//! crops of 256×256 sources), with 1 and 2 threads, alternating the two sides in one run.
//!
//! `cargo bench --bench augment -- [--reps 3] [--python PATH] [--images32 N] [--images224 N]
//! [--no-torch] [--no-step]`
//!
//! `--python` (or `TORCH_PYTHON`) is an interpreter with torch + torchvision (default
//! `bench/.venv/bin/python` when it exists, else `python3`). Each (side, threads) cell is
//! measured `reps` times, the sides alternating (and which one goes first alternating between
//! repetitions), and the median is reported, so load from other processes hits both sides alike.
//! Last, one SimCLR training step of `experiments/simclr_resnet18narrow_fmnist.yaml` at batch 64
//! (128 views of 28×28) is timed, to say how many views per second training consumes.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use locograph::data::bench::bench_simclr;

type Error = Box<dyn std::error::Error>;

struct Args {
    reps: usize,
    python: Option<PathBuf>,
    images32: usize,
    images224: usize,
    step: bool,
}

fn args() -> Result<Args, Error> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("bench/.venv/bin/python");
    let default_python = std::env::var_os("TORCH_PYTHON")
        .map(PathBuf::from)
        .or_else(|| Some(if venv.exists() { venv } else { PathBuf::from("python3") }));
    let mut a = Args { reps: 3, python: default_python, images32: 2048, images224: 128, step: true };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--reps" => a.reps = val()?.parse()?,
            "--python" => a.python = Some(PathBuf::from(val()?)),
            "--images32" => a.images32 = val()?.parse()?,
            "--images224" => a.images224 = val()?.parse()?,
            "--no-torch" => a.python = None,
            "--no-step" => a.step = false,
            "--bench" => {} // passed by `cargo bench`
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(a)
}

/// `bench/torchvision_augment.py --serve`: one measurement per request line.
struct Torch {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Torch {
    fn start(python: &Path) -> Result<(Torch, String), Error> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/torchvision_augment.py");
        let mut child = Command::new(python)
            .arg(script)
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut t = Torch { child, stdin, stdout };
        let ready = t.line()?;
        Ok((t, ready))
    }

    fn line(&mut self) -> Result<String, Error> {
        let mut s = String::new();
        if self.stdout.read_line(&mut s)? == 0 {
            return Err("the torchvision script exited (see its stderr above)".into());
        }
        Ok(s.trim().to_string())
    }

    /// Views per second of one run.
    fn measure(&mut self, side: usize, source: usize, threads: usize, images: usize, blur: &str) -> Result<f64, Error> {
        writeln!(self.stdin, "{side} {source} {threads} {images} {blur}")?;
        self.stdin.flush()?;
        let line = self.line()?;
        let key = "\"views_per_s\": ";
        let at = line.find(key).ok_or_else(|| format!("unexpected answer: {line}"))? + key.len();
        let num: String = line[at..].chars().take_while(|c| !matches!(c, ',' | '}')).collect();
        Ok(num.trim().parse()?)
    }
}

impl Drop for Torch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        f64::NAN
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

/// Views per second one SimCLR training step (forward + backward, no optimizer update) of the
/// shipped Fashion-MNIST experiment consumes at batch 64: the median of 3 steps after a warm-up.
fn training_consumption() -> Result<(f64, f64), Error> {
    use candle_core::{Device, Tensor};
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/simclr_resnet18narrow_fmnist.yaml");
    let loaded = locograph::config::load(&file).map_err(|e| e.to_string())?;
    let c = locograph::graph::compile(&loaded).map_err(|e| e.to_string())?;
    let model = locograph::exec::Model::new(&c, 0, &Device::Cpu)?;
    let views = 128;
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let v: Vec<f32> = (0..views * 28 * 28)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    let x = Tensor::from_vec(v, (views, 1, 28, 28), &Device::Cpu)?;
    locograph::exec::run_step(&c, &model, &x)?;
    let mut secs = vec![];
    for _ in 0..3 {
        let t = Instant::now();
        locograph::exec::run_step(&c, &model, &x)?;
        secs.push(t.elapsed().as_secs_f64());
    }
    let sec = median(&secs);
    Ok((views as f64 / sec, sec))
}

fn main() -> Result<(), Error> {
    let a = args()?;
    let mut torch = match &a.python {
        Some(p) => {
            let (t, ready) = Torch::start(p)?;
            eprintln!("torchvision side: {} ({ready})", p.display());
            Some(t)
        }
        None => None,
    };
    // (output side, source side, images)
    let cells: Vec<(usize, usize, usize, usize)> = [(32, 32, a.images32), (224, 256, a.images224)]
        .into_iter()
        .flat_map(|(side, src, n)| [1, 2].map(|t| (side, src, t, n)))
        .collect();
    // Per cell: locograph, torchvision, torchvision with MoCo v2's PIL blur.
    let mut res = vec![[vec![], vec![], vec![]]; cells.len()];
    for rep in 0..a.reps {
        for (i, &(side, src, threads, n)) in cells.iter().enumerate() {
            // Rotate which side goes first, so drifting load does not favour one side.
            for k in 0..3 {
                let side_k = (k + rep + i) % 3;
                let v = match (side_k, torch.as_mut()) {
                    (0, _) => bench_simclr(side, src, threads, n)?.views_per_second(),
                    (1, Some(t)) => t.measure(side, src, threads, n, "tv")?,
                    (2, Some(t)) => t.measure(side, src, threads, n, "pil")?,
                    _ => continue,
                };
                res[i][side_k].push(v);
            }
            let last = |v: &Vec<f64>| v.last().map_or("-".to_string(), |x| format!("{x:.0}"));
            eprintln!(
                "rep {rep} side {side} threads {threads}: locograph {} torchvision {} (PIL blur {}) views/s",
                last(&res[i][0]),
                last(&res[i][1]),
                last(&res[i][2])
            );
        }
    }
    println!("\nSimCLR augmentation, 2 views per image, median of {} alternating runs:\n", a.reps);
    println!(
        "| side (source) | threads | locograph views/s | torchvision views/s | ratio | torchvision + PIL blur views/s | ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (i, &(side, src, threads, _)) in cells.iter().enumerate() {
        let l = median(&res[i][0]);
        let col = |v: &Vec<f64>| {
            if v.is_empty() {
                ("-".to_string(), "-".to_string())
            } else {
                let t = median(v);
                (format!("{t:.0}"), format!("{:.2}×", l / t))
            }
        };
        let ((t1, r1), (t2, r2)) = (col(&res[i][1]), col(&res[i][2]));
        println!("| {side} ({src}) | {threads} | {l:.0} | {t1} | {r1} | {t2} | {r2} |");
    }
    drop(torch);
    if a.step {
        let (vps, sec) = training_consumption()?;
        println!(
            "\ntraining step consumes {vps:.0} views/s (simclr_resnet18narrow_fmnist, batch 64 = 128 views of 28×28, \
             forward + backward {sec:.2} s, median of 3)"
        );
    }
    Ok(())
}
