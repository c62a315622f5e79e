#!/usr/bin/env bash
# Stage-parallel GIM and LoCo on this machine: Progressive ResNet-50 and ResNet-50 at a small
# input, every rank on 1 thread, N = 1, 2, 4 ranks (4 oversubscribe the 2 cores), the automatic
# placement balancing compute against stages split evenly by count. All runs of one table come
# from one invocation, so that background load hits them alike: the ratios are what is valid.
#
#   bench/stage_parallel.sh [STEPS] [SIZE] [BATCH]
#
# Per run, from the run's ranks.json: images/s (the slowest rank's period after the first step),
# each rank's peak RSS against the 1-rank run's (the same experiment on one process), each
# rank's idle fraction (time waiting for another rank's message). Then a model-based projection
# for 4 and 8 GPUs: each rank's share of the step's multiply-accumulates as `locograph profile
# --ranks` predicts it, with the 1-rank run's measured step time as the unit — throughput =
# batch / (t1 × the busiest rank's share), compute-bound, communication overlapped (its bytes
# per step are printed beside). Needs a `--features mpi` release build (built here).
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

printf '%-9s %-5s %-9s %-7s %2s %9s %7s  %-22s %-18s %s\n' model method schedule by N "img/s" "vs N=1" "peak RSS MB per rank" "idle % per rank" "MB sent/step"
declare -A ONE ONE_RSS
for model in presnet50 resnet50; do
  for method in gim loco; do
    # LoCo's cotangent from the unit above the cut comes back one step late when pipelined.
    schedule=pipelined
    for cfg in "1 compute" "2 compute" "2 count" "4 compute" "4 count"; do
      set -- $cfg; n=$1; by=$2
      f=$(exp $method $model $schedule $by)
      out=$TMP/run-$model-$method-$n-$by
      if [ "$n" = 1 ]; then
        "$BIN" run "$f" --quiet --runs-dir "$out" > "$out.log" 2>&1 || { cat "$out.log"; exit 1; }
      else
        mpirun --oversubscribe -np "$n" "$BIN" run "$f" --quiet --runs-dir "$out" > "$out.log" 2>&1 || { cat "$out.log"; exit 1; }
      fi
      IFS='|' read -r ips rss idle sent <<< "$(summary "$out"/*)"
      [ "$n" = 1 ] && { ONE[$model$method]=$ips; ONE_RSS[$model$method]=$rss; }
      ratio=$(python3 -c "print(f'{$ips / ${ONE[$model$method]}:.2f}')")
      printf '%-9s %-5s %-9s %-7s %2s %9s %7s  %-22s %-18s %s\n' $model $method $schedule $by $n "$ips" "$ratio" "$rss" "$idle" "$sent"
    done
    if [ $method = loco ]; then
      f=$(exp $method $model exact compute)
      out=$TMP/run-$model-$method-4-exact
      mpirun --oversubscribe -np 4 "$BIN" run "$f" --quiet --runs-dir "$out" > "$out.log" 2>&1 || { cat "$out.log"; exit 1; }
      IFS='|' read -r ips rss idle sent <<< "$(summary "$out"/*)"
      ratio=$(python3 -c "print(f'{$ips / ${ONE[$model$method]}:.2f}')")
      printf '%-9s %-5s %-9s %-7s %2s %9s %7s  %-22s %-18s %s\n' $model $method exact compute 4 "$ips" "$ratio" "$rss" "$idle" "$sent"
    fi
  done
done

echo
echo "Projection for 1 GPU per rank (compute-bound, communication overlapped): speedup over 1 GPU = 1 / the busiest rank's share of the MACs"
printf '%-9s %-5s %-7s %5s %14s %9s %12s\n' model method by ranks "busiest share" speedup "MB sent/step"
for model in presnet50 resnet50; do
  for method in gim loco; do
    for by in compute count; do
      f=$(exp $method $model pipelined $by)
      # profile prints, per rank count, one row per rank: rank GMACs share activations parameters sent received nodes
      "$BIN" profile "$f" --input "$SIZE" --ranks 4,8 2>/dev/null | python3 -c '
import re, sys
model, method, by = sys.argv[1:4]
block = None
rows = {}
for line in sys.stdin:
    m = re.match(r"\s+(\d+) ranks:", line)
    if m:
        block = int(m.group(1)); rows[block] = []; continue
    m = re.match(r"\s+(\d+)\s+([\d.]+)\s+(\d+) %\s+([\d.]+) MB\s+([\d.]+) MB\s+([\d.]+) MB", line)
    if m and block:
        rows[block].append((float(m.group(2)), float(m.group(6))))
for n, r in sorted(rows.items()):
    total = sum(x[0] for x in r)
    share = max(x[0] for x in r) / total
    sent = sum(x[1] for x in r)
    print(f"{model:<9} {method:<5} {by:<7} {n:>5} {100 * share:>13.0f}% {1 / share:>8.2f}x {sent:>12.1f}")
' $model $method $by
    done
  done
done
