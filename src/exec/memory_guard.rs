//! Whether a training step fits the machine it is about to run on: the plan's predicted
//! memory ([`Plan::memory_estimate`]) against a limit. `locograph validate` only reports the
//! prediction (a paper configuration is valid on a laptop even though it cannot train there);
//! `run` and `resume` refuse a step that does not fit, before allocating anything.

use crate::config::{ConfigError, ConfigErrors, Loaded};
use crate::graph::{MemoryEstimate, Plan};

/// The predicted memory of one training step of `loaded` (its batch, precision, optimizer).
pub fn estimate(loaded: &Loaded, plan: &Plan) -> MemoryEstimate {
    let e = &loaded.experiment;
    let views = 2 * e.train.batch_size;
    plan.memory_estimate(views, e.precision.dtype().size_in_bytes(), e.optimizer.state_slots())
}

/// What one rank's step needs when `ranks` share each batch (`graph::data_parallel`: its share's views
/// and the gathered similarities of global negatives); one rank: [`estimate`].
pub fn estimate_per_rank(loaded: &Loaded, plan: &Plan, ranks: usize) -> MemoryEstimate {
    if ranks <= 1 {
        return estimate(loaded, plan);
    }
    let e = &loaded.experiment;
    let (elem, slots) = (e.precision.dtype().size_in_bytes(), e.optimizer.state_slots());
    crate::graph::data_parallel::rank_cost(
        plan,
        e.train.batch_size,
        ranks,
        elem,
        slots,
        crate::graph::data_parallel::Link::INFINIBAND_HDR,
    )
    .memory
}

/// The memory limit training must fit in, and where it comes from: `LOCOGRAPH_MEMORY_LIMIT`
/// (bytes, or with a K/M/G/T suffix, powers of 1024), else `MemTotal` in `/proc/meminfo`.
/// `None` where neither exists (the check is then skipped).
pub fn memory_limit() -> Option<(f64, String)> {
    if let Ok(v) = std::env::var("LOCOGRAPH_MEMORY_LIMIT") {
        let v = v.trim();
        let (num, mult) = match v.chars().last().map(|c| c.to_ascii_uppercase()) {
            Some('K') => (&v[..v.len() - 1], 1024f64),
            Some('M') => (&v[..v.len() - 1], 1024f64.powi(2)),
            Some('G') => (&v[..v.len() - 1], 1024f64.powi(3)),
            Some('T') => (&v[..v.len() - 1], 1024f64.powi(4)),
            _ => (v, 1.0),
        };
        if let Ok(n) = num.trim().parse::<f64>() {
            return Some((n * mult, "LOCOGRAPH_MEMORY_LIMIT".into()));
        }
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib * 1024.0, "MemTotal in /proc/meminfo".into()))
}

/// `1.5 GiB`: bytes in powers of 1024.
pub fn human(bytes: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u + 1 == UNITS.len() && v >= 1024.0 {
        format!("{bytes:.3e} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn describe(loaded: &Loaded, est: &MemoryEstimate) -> String {
    format!(
        "a training step needs about {} (activations ≈ {} for {} views, parameters with gradients and optimizer state ≈ {}, one convolution's working copies ≈ {})",
        human(est.total()),
        human(est.activations),
        2u128 * loaded.experiment.train.batch_size as u128,
        human(est.parameters),
        human(est.workspace),
    )
}

/// What `locograph validate` prints: the prediction, and how it compares with this machine.
pub fn report(loaded: &Loaded, plan: &Plan) -> String {
    let est = estimate(loaded, plan);
    let mut s = describe(loaded, &est);
    if let Some((limit, source)) = memory_limit() {
        let verdict = if est.total() <= limit { "fits" } else { "does not fit" };
        s += &format!("; it {verdict} in this machine's {} ({source})", human(limit));
        if est.total() > limit {
            s += ", so `run` would refuse it here";
        }
    }
    s
}

/// Refuses a configuration whose predicted step exceeds [`memory_limit`], with the prediction
/// and the limit in the message, located at `train.batch_size`.
pub fn check_fits(loaded: &Loaded, plan: &Plan) -> Result<(), ConfigErrors> {
    check_fits_ranks(loaded, plan, 1, 1)
}

/// [`check_fits`] for one of `ranks` ranks, `local` of which share this machine (and its
/// memory limit).
pub fn check_fits_ranks(loaded: &Loaded, plan: &Plan, ranks: usize, local: usize) -> Result<(), ConfigErrors> {
    let Some((limit, source)) = memory_limit() else {
        return Ok(());
    };
    let (limit, source) =
        if local > 1 { (limit / local as f64, format!("{source}, shared by {local} ranks")) } else { (limit, source) };
    let est = estimate_per_rank(loaded, plan, ranks);
    if est.total() <= limit {
        return Ok(());
    }
    Err(ConfigErrors(vec![ConfigError {
        location: loaded.locations.path("train.batch_size"),
        path: "train.batch_size".into(),
        message: format!(
            "{}, more than the limit of {} ({source}); lower `train.batch_size`, `input.size` or the widths, or raise LOCOGRAPH_MEMORY_LIMIT",
            describe(loaded, &est).replacen("a training step needs", "a training step would need", 1),
            human(limit),
        ),
    }]))
}
