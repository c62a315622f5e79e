#!/usr/bin/env bash
# Stage-parallel GIM and LoCo on this machine: Progressive ResNet-50 and ResNet-50 at a small
# input, every rank on 1 thread, N = 1, 2, 4 ranks (4 oversubscribe the 2 cores), the automatic
# placement balancing compute against stages split evenly by count. All runs of one table come
# from one invocation, so that background load hits them alike: the ratios are what is valid.
#
#   bench/stage_parallel.sh [STEPS] [SIZE] [BATCH]      (PROJECTION_ONLY=1: the projection alone)
#
# Per run, from the run's ranks.json: images/s (the slowest rank's period after the first step),
# each rank's peak RSS against the 1-rank run's (the same experiment on one process), each
# rank's idle fraction (time waiting for another rank's message). Then a model-based projection
# for 4 and 8 GPUs: each rank's share of the step's multiply-accumulates as `locograph profile
# --ranks` predicts it; the speedup over one GPU is 1 / the busiest rank's share (compute-bound,
# the traffic overlapped: its bytes per step are printed beside), times the data replicas where
# the GPUs outnumber the encoder's stages. Needs a `--features mpi` release build (built here).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-8}; SIZE=${2:-64}; BATCH=${3:-8}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release --features mpi --quiet
BIN=$CARGO_TARGET_DIR/release/locograph
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 RAYON_NUM_THREADS=1
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# The shipped experiments (LARS, as the papers) with synthetic data (they read ImageNet otherwise),
# SIZE² views, BATCH images, logged once at the end (a logged
# step gathers every rank's losses on rank 0: a synchronisation point).
exp() { # method model schedule by
    local f=$TMP/$1_$2_$3_$4.yaml
    sed -e "s|encoder: ../graphs/|encoder: $PWD/graphs/|" \
        -e "s|^input: .*|input: {channels: 3, size: $SIZE}|" \
        -e "s|^  format: image_folder.*|  format: synthetic|" \
        -e "s|^  path: ../data/imagenet.*|  synthetic: {side: $SIZE, train_size: 512}|" \
        -e "s|^  augment: .*|  augment: {size: $SIZE}|" \
        -e "s|^  batch_size: .*|  batch_size: $BATCH|" -e "s|^  epochs: .*|  steps: $STEPS|" \
        "experiments/$1_$2_imagenet.yaml" > "$f"
    printf '  log_every: %s\nplacement: {by: %s, schedule: %s}\n' "$STEPS" "$4" "$3" >> "$f"
    echo "$f"
}

# ranks.json → "images/s|rss MB per rank|idle % per rank|MB sent per step (all ranks)"
summary() {
    python3 - "$1" "$STEPS" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1] + "/ranks.json"))
steps = int(sys.argv[2])
ips = min(r["images_per_s"] for r in rows)
rss = " ".join(f"{r['peak_rss_bytes'] / 1e6:.0f}" for r in rows)
idle = " ".join(f"{100 * r['idle_fraction']:.0f}" for r in rows)
sent = sum(r["sent_bytes"] for r in rows) / steps / 1e6
print(f"{ips:.2f}|{rss}|{idle}|{sent:.1f}")
EOF
}

# One run: `run_one METHOD MODEL SCHEDULE BY N` → its run directory's parent in $out.
run_one() {
  local f; f=$(exp "$1" "$2" "$3" "$4")
  out=$TMP/run-$2-$1-$5-$4-$3
  if [ "$5" = 1 ]; then
    "$BIN" run "$f" --quiet --runs-dir "$out" > "$out.log" 2>&1
  else
    mpirun --oversubscribe -np "$5" "$BIN" run "$f" --quiet --runs-dir "$out" > "$out.log" 2>&1
  fi
}

row() { # model method schedule by N
  IFS='|' read -r ips rss idle sent <<< "$(summary "$out"/*)"
  [ "$5" = 1 ] && ONE[$1$2]=$ips
  ratio=$(python3 -c "print(f'{$ips / ${ONE[$1$2]}:.2f}')")
  printf '%-9s %-5s %-9s %-7s %2s %9s %7s  %-22s %-18s %s\n' "$1" "$2" "$3" "$4" "$5" "$ips" "$ratio" "$rss" "$idle" "$sent"
}

measure() {
  printf '%-9s %-5s %-9s %-7s %2s %9s %7s  %-22s %-18s %s\n' model method schedule by N "img/s" "vs N=1" "peak RSS MB per rank" "idle % per rank" "MB sent/step"
  for model in presnet50 resnet50; do
    for method in gim loco; do
      for cfg in "1 compute" "2 compute" "2 count" "4 compute" "4 count"; do
        set -- $cfg
        # Pipelined (LoCo's cotangent from the unit above a cut comes back one step late); a cut
        # inside a unit (LoCo's gradient would go on below the cut) is refused: run it exact.
        schedule=pipelined
        if ! run_one $method $model $schedule "$2" "$1"; then
          grep -q "cannot delay" "$out.log" || { cat "$out.log"; exit 1; }
          schedule=exact
          run_one $method $model $schedule "$2" "$1" || { cat "$out.log"; exit 1; }
        fi
        row $model $method $schedule "$2" "$1"
      done
      if [ $method = loco ]; then
        for n in 2 4; do
          run_one $method $model exact compute $n || { cat "$out.log"; exit 1; }
          row $model $method exact compute $n
        done
      fi
    done
  done
}
declare -A ONE
# PROJECTION_ONLY=1: the projection alone (no training).
[ -n "${PROJECTION_ONLY:-}" ] || measure

echo
echo "Projection for 1 GPU per rank: compute-bound, communication overlapped, from the plan's per-node"
echo "MACs (locograph profile --ranks): speedup over 1 GPU = 1 / the busiest rank's share. An encoder of"
echo "S stem and stage nodes splits over at most S ranks; beyond, the projection is a grid of the best"
echo "stage split × data replicas (ideal data parallelism: docs/parallel.md says how such a grid would run)."
printf '%-9s %-5s %-7s %4s %-17s %14s %9s %12s\n' model method by GPUs layout "busiest share" speedup "MB sent/step"
for model in presnet50 resnet50; do
  for method in gim loco; do
    for by in compute count; do
      f=$(exp $method $model pipelined $by)
      for gpus in 4 8; do
        # The most stage ranks that divide the GPUs and fit the encoder's nodes.
        for stages in $gpus $((gpus / 2)) $((gpus / 4)); do
          # (profile prints a placement that does not fit as text: no rows, try fewer stages)
          out=$("$BIN" profile "$f" --input "$SIZE" --ranks $stages 2>&1) || continue
          echo "$out" | python3 -c '
import re, sys
model, method, by, gpus, stages = sys.argv[1:6]
gpus, stages = int(gpus), int(stages)
rows = []
for line in sys.stdin:
    m = re.match(r"\s+(\d+)\s+([\d.]+)\s+(\d+) %\s+([\d.]+) MB\s+([\d.]+) MB\s+([\d.]+) MB", line)
    if m:
        rows.append((float(m.group(2)), float(m.group(6))))
if not rows:
    sys.exit(1)
total = sum(x[0] for x in rows)
share = max(x[0] for x in rows) / total
data = gpus // stages
layout = f"{stages} stages" + (f" x {data} data" if data > 1 else "")
sent = sum(x[1] for x in rows) * data
print(f"{model:<9} {method:<5} {by:<7} {gpus:>4} {layout:<17} {100 * share:>13.0f}% {data / share:>8.2f}x {sent:>12.1f}")
' $model $method $by $gpus $stages || continue
          break
        done
      done
    done
  done
done
