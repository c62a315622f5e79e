#!/usr/bin/env bash
# Whole training steps on the shipped small encoder, locograph against the same step written in
# PyTorch (bench/torch_narrow.py), alternating in one run so that background load hits both
# alike: experiments/{simclr,loco}_resnet18narrow_fmnist.yaml as shipped (narrow ResNet-18,
# 28x28 Fashion-MNIST, 128 images = 256 views per step, data sampling and augmentation,
# decoders, NT-Xent, LARS), each row a process of its own:
#   locograph                  `locograph run` (oneDNN's convolutions where built with them;
#                              freed memory stays in the heap)
#   locograph+system-malloc    the same with glibc's default malloc
#   locograph-im2col           convolutions on locograph's own im2col kernels (LOCOGRAPH_DNNL=0)
#   locograph-bf16[+system-malloc]  `--precision bf16` (bf16 compute, f32 master weights)
#   locograph[-bf16]-nchw      every activation NCHW (LOCOGRAPH_CHANNELS_LAST=0): oneDNN
#                              reorders around each convolution
#   pytorch                    PyTorch as installed, f32
#   pytorch+heap-malloc        the same under locograph's allocator policy (GLIBC_TUNABLES)
#   pytorch-bf16-cl[+heap-malloc]  torch.autocast("cpu", bfloat16) + channels_last
# Prints every run, then per method the median seconds per step, images/s and peak RSS of each
# row and locograph's ratio to the fastest PyTorch row of each precision.
#
#   bench/narrow.sh [ROUNDS] [STEPS] [THREADS]
#   bench/narrow.sh 3 20 2        # 3 rounds, 20 timed steps after 2 untimed ones, 2 threads
#   METHODS=loco bench/narrow.sh  # one method
#
# Needs data/fashion-mnist (`locograph data fetch fashion-mnist`) and PyTorch: TORCH_VENV=DIR
# (a venv with torch), else bench/.venv is made with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}; STEPS=${2:-20}; THREADS=${3:-2}; WARMUP=${WARMUP:-2}
METHODS=${METHODS:-simclr loco}

# PyTorch: TORCH_VENV=/path or bench/.venv.
source bench/torch_venv.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
if [[ -z ${LOCOGRAPH:-} ]]; then
    cargo build --release --quiet
    LOCOGRAPH=$CARGO_TARGET_DIR/release/locograph
fi
[[ -e data/fashion-mnist/train-images-idx3-ubyte.gz ]] || "$LOCOGRAPH" data fetch fashion-mnist --dest data

HEAP=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
LOG=$TMP/log

# One locograph row: seconds per step from metrics.csv's elapsed_s over the timed steps; peak
# RSS from the waited-for child's ru_maxrss.
locograph_row() {  # impl method run-args [env...]
    local impl=$1 method=$2 args=$3; shift 3
    local runs=$TMP/runs-$impl-$method
    local rss
    rss=$(env "$@" python3 -c 'import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 // 1000000)' \
        "$LOCOGRAPH" run "experiments/${method}_resnet18narrow_fmnist.yaml" --quiet --steps $((WARMUP + STEPS)) \
        --runs-dir "$runs" --set train.threads="$THREADS" --set train.log_every=1 --set train.checkpoint_every=1000000 $args)
    python3 - "$runs" "$impl" "$method" "$WARMUP" "$STEPS" "$rss" <<'PY'
import csv, glob, sys
runs, impl, method, warm, steps, rss = sys.argv[1:]
rows = list(csv.DictReader(open(glob.glob(f"{runs}/*/metrics.csv")[-1])))
t = {int(r["step"]): float(r["elapsed_s"]) for r in rows}
s = (t[int(warm) + int(steps)] - t[int(warm)]) / int(steps)
print(f"impl={impl} method={method} batch=128 steps={steps} step_s={s:.3f} images_per_s={128 / s:.2f} peak_rss_mb={rss}")
PY
    rm -rf "$runs"
}

torch_row() {  # suffix method [args...]
    local suffix=$1 method=$2; shift 2
    "$VENV/bin/python" bench/torch_narrow.py --method "$method" --steps "$STEPS" --warmup "$WARMUP" \
        --threads "$THREADS" "$@" | sed "s/^impl=pytorch[^ ]*/&$suffix/"
}

echo "# $("$LOCOGRAPH" --version 2>/dev/null || echo locograph), torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'), $THREADS threads, $(nproc) cores"
"$VENV/bin/python" bench/torch_narrow.py --check --threads "$THREADS"
for r in $(seq "$ROUNDS"); do
    echo "# round $r/$ROUNDS ($(uptime | sed 's/.*load/load/'))"
    for m in $METHODS; do
        locograph_row locograph "$m" "" | tee -a "$LOG"
        locograph_row locograph+system-malloc "$m" "" LOCOGRAPH_MALLOC=system | tee -a "$LOG"
        locograph_row locograph-im2col "$m" "" LOCOGRAPH_DNNL=0 | tee -a "$LOG"
        locograph_row locograph-bf16 "$m" "--precision bf16" | tee -a "$LOG"
        locograph_row locograph-bf16+system-malloc "$m" "--precision bf16" LOCOGRAPH_MALLOC=system | tee -a "$LOG"
        locograph_row locograph-nchw "$m" "" LOCOGRAPH_CHANNELS_LAST=0 | tee -a "$LOG"
        locograph_row locograph-bf16-nchw "$m" "--precision bf16" LOCOGRAPH_CHANNELS_LAST=0 | tee -a "$LOG"
        torch_row "" "$m" | tee -a "$LOG"
        GLIBC_TUNABLES=$HEAP torch_row +heap-malloc "$m" | tee -a "$LOG"
        torch_row "" "$m" --precision bf16 --channels-last | tee -a "$LOG"
        GLIBC_TUNABLES=$HEAP torch_row +heap-malloc "$m" --precision bf16 --channels-last | tee -a "$LOG"
    done
done

python3 - "$LOG" <<'PY'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    kv = dict(f.split("=", 1) for f in line.split())
    impl = re.sub(r"^pytorch-[0-9][^-+]*", "pytorch", kv["impl"])  # without the version
    runs.setdefault((kv["method"], impl), []).append((float(kv["step_s"]), float(kv["peak_rss_mb"])))
for method in sorted({m for m, _ in runs}, key=lambda m: m != "simclr"):
    rows = {i: (statistics.median(s for s, _ in v), statistics.median(r for _, r in v)) for (m, i), v in runs.items() if m == method}
    f32 = min((s for i, (s, _) in rows.items() if i.startswith("pytorch") and "bf16" not in i), default=None)
    bf16 = min((s for i, (s, _) in rows.items() if i.startswith("pytorch") and "bf16" in i), default=None)
    print(f"\n{method}: median over rounds; ratio = the fastest PyTorch row's s/step / this row's (>1: faster)")
    print(f"  {'impl':<34} {'s/step':>7} {'images/s':>9} {'peak RSS MB':>12} {'vs PyTorch f32':>15} {'vs PyTorch bf16':>16}")
    for i, (s, rss) in sorted(rows.items(), key=lambda kv: kv[1][0]):
        r32 = f"{f32 / s:.2f}x" if f32 else "-"
        r16 = f"{bf16 / s:.2f}x" if bf16 else "-"
        print(f"  {i:<34} {s:>7.3f} {128 / s:>9.1f} {rss:>12.0f} {r32:>15} {r16:>16}")
PY
