#!/usr/bin/env bash
# Side-by-side training-step speed and peak RSS of locograph and PyTorch, alternating in one run
# so that background load hits both alike:
#   locograph                  the CLI's configuration (freed memory stays in the heap)
#   locograph+system-malloc    the same with glibc's default malloc
#   pytorch                    PyTorch as installed (glibc's default malloc)
#   pytorch+heap-malloc        PyTorch under the allocator policy locograph uses (GLIBC_TUNABLES)
# and, with CANDLE=1, locograph on candle's own conv and batch norm ("candle", the before).
#
#   bench/run.sh [MODEL] [BATCH] [ROUNDS] [STEPS] [THREADS]
#   bench/run.sh resnet18 256 2 2 2     # CIFAR ResNet-18, 32x32, 256 images/step, 2 rounds
#   bench/run.sh resnet50 16 2 2 2      # ResNet-50, 224x224, 16 images/step
#
# Each configuration runs in its own process (peak RSS is per process). Prints every run, then
# the median images/s and peak RSS per implementation and the ratios to both PyTorch rows.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-resnet18}; BATCH=${2:-256}; ROUNDS=${3:-3}; STEPS=${4:-2}; THREADS=${5:-2}

# PyTorch: TORCH_VENV=/path or bench/.venv.
source bench/torch_venv.sh

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo bench --bench train_step --no-run --quiet 2>/dev/null || cargo bench --bench train_step --no-run
BIN=$(ls -t "$CARGO_TARGET_DIR"/release/deps/train_step-* | grep -v '\.d$' | head -1)

LOG=$(mktemp)
# glibc's equivalent of locograph::malloc::keep_freed_memory (mallopt M_MMAP_MAX=0,
# M_TRIM_THRESHOLD=INT_MAX) for a process we do not build.
HEAP=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647
ARGS=(--model "$MODEL" --batch "$BATCH" --steps "$STEPS" --threads "$THREADS")
for r in $(seq "$ROUNDS"); do
    echo "# round $r/$ROUNDS ($(uptime | sed 's/.*load/load/'))"
    if [ "${CANDLE:-0}" = 1 ]; then "$BIN" "${ARGS[@]}" --candle-conv --candle-bn | tee -a "$LOG"; fi
    "$BIN" "${ARGS[@]}" | tee -a "$LOG"
    LOCOGRAPH_MALLOC=system "$BIN" "${ARGS[@]}" | tee -a "$LOG"
    "$VENV/bin/python" bench/torch_step.py "${ARGS[@]}" | tee -a "$LOG"
    GLIBC_TUNABLES=$HEAP "$VENV/bin/python" bench/torch_step.py "${ARGS[@]}" | sed 's/^impl=pytorch[^ ]*/&+heap-malloc/' | tee -a "$LOG"
done

python3 - "$LOG" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    kv = dict(f.split("=", 1) for f in line.split())
    impl = kv["impl"]
    if impl.startswith("pytorch"):
        impl = "pytorch+heap-malloc" if impl.endswith("+heap-malloc") else "pytorch"
    runs.setdefault(impl, []).append((float(kv["images_per_s"]), float(kv["peak_rss_mb"])))
med = {k: (statistics.median(v[0] for v in vs), statistics.median(v[1] for v in vs)) for k, vs in runs.items()}
refs = [r for r in ("pytorch", "pytorch+heap-malloc") if r in med]
print("\nimages/s and RSS ratios: locograph / PyTorch (>1 images/s is faster, <1 RSS is smaller)")
head = "".join(f"  {'vs ' + r:>26}" for r in refs)
print(f"{'impl':<26} {'images/s':>8} {'peak RSS MB':>12}{head}")
for k, (ips, rss) in med.items():
    cols = "".join(f"  {ips / med[r][0]:10.2f}x speed {rss / med[r][1]:5.2f}x RSS" for r in refs)
    print(f"{k:<26} {ips:8.2f} {rss:12.0f}{cols}")
if "candle" in med and "locograph" in med:
    print(f"locograph ops vs candle's per step: {med['locograph'][0] / med['candle'][0]:.2f}x")
PY
rm -f "$LOG"
