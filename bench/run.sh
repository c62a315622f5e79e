#!/usr/bin/env bash
# Side-by-side training-step speed and peak RSS: locograph with candle's own conv and batch norm
# ("candle", the before), locograph's ops ("locograph"), and PyTorch, alternating in one run so
# that background load hits all three alike.
#
#   bench/run.sh [MODEL] [BATCH] [ROUNDS] [STEPS] [THREADS]
#   bench/run.sh resnet18 64 3 2 2      # CIFAR ResNet-18, 32x32, 64 images/step, 3 rounds
#   bench/run.sh resnet50 16 1 1 2      # ResNet-50, 224x224, 16 images/step
#
# Each configuration runs in its own process (peak RSS is per process). Prints every run, then
# the median images/s and peak RSS per implementation and the ratios to PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-resnet18}; BATCH=${2:-256}; ROUNDS=${3:-3}; STEPS=${4:-2}; THREADS=${5:-2}

# PyTorch CPU wheels in bench/.venv (gitignored). Reuse an existing venv with torch when given
# (TORCH_VENV=/path), which saves a ~200 MB download.
VENV=${TORCH_VENV:-bench/.venv}
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    python3 -m venv bench/.venv
    bench/.venv/bin/pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu \
        || bench/.venv/bin/pip install --quiet torch
    VENV=bench/.venv
fi

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo bench --bench train_step --no-run --quiet 2>/dev/null || cargo bench --bench train_step --no-run
BIN=$(ls -t "$CARGO_TARGET_DIR"/release/deps/train_step-* | grep -v '\.d$' | head -1)

LOG=$(mktemp)
for r in $(seq "$ROUNDS"); do
    echo "# round $r/$ROUNDS ($(uptime | sed 's/.*load/load/'))"
    "$BIN" --model "$MODEL" --batch "$BATCH" --steps "$STEPS" --threads "$THREADS" --candle-conv --candle-bn | tee -a "$LOG"
    "$BIN" --model "$MODEL" --batch "$BATCH" --steps "$STEPS" --threads "$THREADS" | tee -a "$LOG"
    "$VENV/bin/python" bench/torch_step.py --model "$MODEL" --batch "$BATCH" --steps "$STEPS" --threads "$THREADS" | tee -a "$LOG"
done

python3 - "$LOG" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    kv = dict(f.split("=", 1) for f in line.split())
    impl = "pytorch" if kv["impl"].startswith("pytorch") else kv["impl"]
    runs.setdefault(impl, []).append((float(kv["images_per_s"]), float(kv["peak_rss_mb"])))
med = {k: (statistics.median(v[0] for v in vs), statistics.median(v[1] for v in vs)) for k, vs in runs.items()}
torch = med.get("pytorch")
print("\nimpl               images/s  peak RSS MB  slower than PyTorch  RSS / PyTorch")
for k, (ips, rss) in med.items():
    ratio = f"{torch[0] / ips:6.2f}x" if torch else "-"
    mem = f"{rss / torch[1]:6.2f}x" if torch else "-"
    print(f"{k:<18} {ips:8.2f} {rss:12.0f}  {ratio:>19}  {mem:>13}")
if "candle" in med and "locograph" in med:
    print(f"locograph ops vs candle's per step: {med['locograph'][0] / med['candle'][0]:.2f}x")
PY
rm -f "$LOG"
