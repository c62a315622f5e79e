#!/usr/bin/env bash
# Side-by-side training-step speed and peak RSS of locograph and PyTorch, alternating in one run
# so that background load hits both alike:
#   locograph                  the CLI's configuration: oneDNN's convolutions where locograph
#                              was built with them, freed memory stays in the heap
#   locograph+system-malloc    the same with glibc's default malloc
#   locograph-im2col           convolutions on locograph's own im2col kernels (LOCOGRAPH_DNNL=0)
#   locograph-bf16[+system-malloc]  `precision: bf16` (bf16 compute, f32 master weights)
#   locograph[-bf16]-nchw      every activation NCHW (LOCOGRAPH_CHANNELS_LAST=0): oneDNN
#                              reorders around each convolution
#   pytorch                    PyTorch as installed (glibc's default malloc)
#   pytorch+heap-malloc        PyTorch under the allocator policy locograph uses (GLIBC_TUNABLES)
#   pytorch-bf16-cl[+heap-malloc]  torch.autocast("cpu", bfloat16) + channels_last
# and, with CANDLE=1, locograph on candle's own conv and batch norm ("candle", the before).
# First, the machine's convolution peak in f32 and bf16 (oneDNN's 3x3 conv, `--peak`): every
# row's MFU is its model FLOPs per second over the peak of its precision.
#
#   bench/run.sh [MODEL] [BATCH] [ROUNDS] [STEPS] [THREADS]
#   bench/run.sh resnet18 256 2 4 2     # CIFAR ResNet-18, 32x32, 256 images/step, 2 rounds
#   bench/run.sh resnet50 16 2 4 2      # ResNet-50, 224x224, 16 images/step
#
# Each configuration runs in its own process (peak RSS is per process). Prints every run, then
# the median images/s and peak RSS per implementation and the ratios to both PyTorch rows.
# Take STEPS >= 3: PyTorch's first timed steps are slower than its later ones.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-resnet18}; BATCH=${2:-256}; ROUNDS=${3:-3}; STEPS=${4:-4}; THREADS=${5:-2}

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
"$BIN" --peak --steps 3 --threads "$THREADS" | tee -a "$LOG"
for r in $(seq "$ROUNDS"); do
    echo "# round $r/$ROUNDS ($(uptime | sed 's/.*load/load/'))"
    if [ "${CANDLE:-0}" = 1 ]; then "$BIN" "${ARGS[@]}" --candle-conv --candle-bn | tee -a "$LOG"; fi
    "$BIN" "${ARGS[@]}" | tee -a "$LOG"
    LOCOGRAPH_MALLOC=system "$BIN" "${ARGS[@]}" | tee -a "$LOG"
    LOCOGRAPH_DNNL=0 "$BIN" "${ARGS[@]}" | tee -a "$LOG"
    "$BIN" "${ARGS[@]}" --precision bf16 | tee -a "$LOG"
    LOCOGRAPH_MALLOC=system "$BIN" "${ARGS[@]}" --precision bf16 | tee -a "$LOG"
    LOCOGRAPH_CHANNELS_LAST=0 "$BIN" "${ARGS[@]}" | tee -a "$LOG"
    LOCOGRAPH_CHANNELS_LAST=0 "$BIN" "${ARGS[@]}" --precision bf16 | tee -a "$LOG"
    for p in "" "--precision bf16 --channels-last"; do
        # shellcheck disable=SC2086
        "$VENV/bin/python" bench/torch_step.py "${ARGS[@]}" $p | tee -a "$LOG"
        # shellcheck disable=SC2086
        GLIBC_TUNABLES=$HEAP "$VENV/bin/python" bench/torch_step.py "${ARGS[@]}" $p | sed 's/^impl=pytorch[^ ]*/&+heap-malloc/' | tee -a "$LOG"
    done
done

python3 - "$LOG" <<'PY'
import re, statistics, sys
runs, peak, flops = {}, {}, None
for line in open(sys.argv[1]):
    if line.startswith("peak "):
        kv = dict(f.split("=", 1) for f in line.split()[1:])
        peak[kv["precision"]] = float(kv["gflops"])
        continue
    kv = dict(f.split("=", 1) for f in line.split())
    impl = re.sub(r"^pytorch-[0-9][^-+]*", "pytorch", kv["impl"])  # without the version
    if "step_gflop" in kv:
        flops = float(kv["step_gflop"])
    runs.setdefault(impl, []).append((float(kv["step_s"]), float(kv["images_per_s"]), float(kv["peak_rss_mb"])))
med = {k: tuple(statistics.median(v[i] for v in vs) for i in range(3)) for k, vs in runs.items()}
f32 = max((ips for k, (_, ips, _) in med.items() if k.startswith("pytorch") and "bf16" not in k), default=None)
bf16 = max((ips for k, (_, ips, _) in med.items() if k.startswith("pytorch") and "bf16" in k), default=None)
print(f"\npeaks (oneDNN 3x3 conv, fwd + both bwd): " + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in peak.items()))
print(f"model FLOPs per step: {flops:.1f} GFLOP" if flops else "")
print("median over rounds; ratios = this row's images/s over the fastest PyTorch row of each precision (>1: faster)")
print(f"{'impl':<34} {'s/step':>7} {'images/s':>9} {'peak RSS MB':>12} {'vs PyTorch f32':>15} {'vs PyTorch bf16':>16} {'MFU':>6}")
for k, (s, ips, rss) in sorted(med.items(), key=lambda kv: -kv[1][1]):
    r32 = f"{ips / f32:.2f}x" if f32 else "-"
    r16 = f"{ips / bf16:.2f}x" if bf16 else "-"
    p = peak.get("bf16" if "bf16" in k else "f32")
    mfu = f"{100 * flops / s / p:.0f}%" if flops and p else "-"
    print(f"{k:<34} {s:>7.3f} {ips:>9.2f} {rss:>12.0f} {r32:>15} {r16:>16} {mfu:>6}")
if "candle" in med and "locograph" in med:
    print(f"locograph ops vs candle's per step: {med['locograph'][1] / med['candle'][1]:.2f}x")
PY
rm -f "$LOG"
