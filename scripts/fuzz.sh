#!/usr/bin/env bash
# Fuzzes parsing and validation of experiment files for a fixed time (default 600 s):
#   scripts/fuzz.sh [SECONDS]
# Needs a nightly toolchain (libFuzzer instrumentation); installs cargo-fuzz from crates.io if
# it is missing. Seeds: experiments/*.yaml and graphs/*.yaml (read, never written); new
# inputs go to fuzz/corpus/parse_validate, crashes to fuzz/artifacts/parse_validate.
set -euo pipefail
secs="${1:-600}"
cd "$(dirname "$0")/.."

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz.sh: needs a nightly toolchain (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

corpus=fuzz/corpus/parse_validate
mkdir -p "$corpus"
# -max_len: the largest seed is a few KiB; longer inputs only slow each run down.
# -timeout: a single input taking more than 10 s counts as a hang.
exec cargo +nightly fuzz run parse_validate "$corpus" experiments graphs -- \
    -max_total_time="$secs" -max_len=16384 -timeout=10 -print_final_stats=1
