//! Fuzzes what `locograph validate` does with an experiment file: parse (strict serde, spans),
//! compile (graph checks, shapes, reachability, execution order, costs), value checks and the
//! memory prediction. Any input must give `Ok` or an error, never a panic, overflow or hang.
//!
//! Seeded with `experiments/*.yaml` and `graphs/*.yaml` (see `scripts/fuzz.sh`).
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Placed in experiments/ so that the seeds' `encoder: ../graphs/…` references resolve.
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../experiments/fuzz_input.yaml");
    let Ok(loaded) = locograph::config::parse_str(text, &file) else {
        return;
    };
    let _ = locograph::config::check_values(&loaded);
    // compile + check_values, as `validate` runs them, then the memory report and check.
    if let Ok(plan) = locograph::exec::validate(&loaded) {
        let _ = locograph::exec::memory_guard::report(&loaded, &plan);
        let _ = locograph::exec::memory_guard::check_fits(&loaded, &plan);
    }
});
