#!/usr/bin/env bash
# GPU side by side: SimCLR, GIM and LoCo training steps of ResNet-50 at 224x224 in locograph
# (candle + CUDA, bf16 compute with f32 master weights) and in PyTorch (eager, bf16 autocast,
# channels_last: bench/torch_gpu_step.py), same batch, same model, same GPU, alternating.
#
#   bench/gpu.sh [BATCH] [STEPS] [ROUNDS]     # defaults 256 10 1
#
# Runs on the GPU machine, from a copy of the working tree: the locograph bench
# binary is built here with the CUDA recipe (docs/gpu.md, "Build") and carried compressed as
# .gpu/train_step.xz; PyTorch is the machine's own. Peak GPU memory is sampled from nvidia-smi
# every 20 ms for each process (CUDA context included, the same measure for both) beside
# PyTorch's own max_memory_allocated. Prints every run, then images/s, peak memory, the ratios
# to PyTorch and each method's memory saving vs SimCLR.
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH=${1:-256}; STEPS=${2:-10}; ROUNDS=${3:-1}
PY=${PYTHON:-python3}

# The runner unpacks .gpu/train_step.xz and points the loader at the machine's CUDA/cuDNN wheels.
[[ -e .gpu/train_step.xz && -e .gpu/run-on-gpu.sh ]] \
    || { echo "no .gpu/train_step.xz: build it with the CUDA recipe (docs/gpu.md)" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# Runs "$@", printing its key=value line with gpu_peak_mb (max memory.used while it ran) appended.
with_gpu_peak() {
    local samples; samples=$(mktemp)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 > "$samples" &
    local smi=$!
    local base; base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    local line; line=$("$@" | tail -1)
    kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null || true
    local peak; peak=$(sort -n "$samples" | tail -1)
    echo "$line gpu_peak_mb=$(( ${peak:-0} - ${base:-0} ))"
}

LOG=$(mktemp)
for r in $(seq "$ROUNDS"); do
    for m in simclr gim loco; do
        with_gpu_peak bash .gpu/run-on-gpu.sh train_step --model resnet50 --batch "$BATCH" --steps "$STEPS" --method "$m" \
            --device cuda --precision bf16 | tee -a "$LOG"
        with_gpu_peak "$PY" bench/torch_gpu_step.py --method "$m" --batch "$BATCH" --steps "$STEPS" \
            --precision bf16 | tee -a "$LOG"
    done
done

python3 - "$LOG" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    kv = dict(f.split("=", 1) for f in line.split() if "=" in f)
    impl = "pytorch" if kv["impl"].startswith("pytorch") else "locograph"
    runs.setdefault((impl, kv["method"]), []).append((float(kv["images_per_s"]), float(kv["gpu_peak_mb"])))
med = {k: (statistics.median(v[0] for v in vs), statistics.median(v[1] for v in vs)) for k, vs in runs.items()}
paper = {"gim": 1.81, "loco": 1.28}
print("\nimpl       method  images/s  peak GPU MB  images/s vs PyTorch  memory vs PyTorch  saving vs SimCLR (paper)")
for (impl, m), (ips, mb) in sorted(med.items()):
    t = med.get(("pytorch", m))
    s = med.get((impl, "simclr"))
    saving = f"{s[1] / mb:5.2f}x" if s and m != "simclr" else "   - "
    print(f"{impl:<10} {m:<7} {ips:8.1f} {mb:12.0f}  {ips / t[0] if t else 0:18.2f}x  {mb / t[1] if t else 0:16.2f}x"
          f"  {saving} ({paper.get(m, '-')})")
PY
