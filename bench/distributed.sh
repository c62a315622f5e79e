#!/usr/bin/env bash
# Data-parallel training on this machine: one process with 2 threads against `mpirun -np 2` with
# 1 thread each, SimCLR and LoCo, on a small ResNet and on ResNet-50 at a small batch. Both sides
# run the same global batch and steps, alternating in one run so that background load hits both
# alike; ratios are what is valid, not the absolute numbers.
#
#   bench/distributed.sh [ROUNDS] [STEPS]
#
# Per run: images/s (median over the logged steps after the first), and for the 2-rank runs what
# `locograph run` reports of its communication per step (rank 0): gradient bytes averaged and
# the seconds the reducer's thread spent on them, the seconds the step waited for them (the part
# the backward did not hide), and the bytes and seconds of the step's own collectives (batch norm
# statistics, the losses' gathered embeddings). Needs a `--features mpi` release build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}; STEPS=${2:-4}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release --features mpi --quiet
BIN=$CARGO_TARGET_DIR/release/locograph
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# The shipped experiments with synthetic data (the ResNet-50 ones read ImageNet otherwise) and
# a batch and length that fit 2 cores; Fashion-MNIST from Debian for the small ResNet.
FMNIST=/usr/share/datasets/fashion-mnist
small() { # method
    sed -e "s|encoder: ../graphs/|encoder: $PWD/graphs/|" -e "s|path: ../data/fashion-mnist|path: $FMNIST|" \
        -e "s|^  batch_size: .*|  batch_size: 128|" -e "s|^  steps: .*|  steps: $STEPS|" -e "s|^  log_every: .*|  log_every: 1|" \
        "experiments/$1_resnet18narrow_fmnist.yaml" > "$TMP/$1_small.yaml"
}
big() { # method
    sed -e "s|encoder: ../graphs/|encoder: $PWD/graphs/|" \
        -e "s|^  format: image_folder.*|  format: synthetic|" -e "s|^  path: ../data/imagenet.*|  synthetic: {side: 224, train_size: 256}|" \
        -e "s|^  batch_size: .*|  batch_size: 8|" -e "s|^  epochs: .*|  steps: $STEPS|" \
        "experiments/$1_resnet50_imagenet.yaml" > "$TMP/$1_big.yaml"
    printf '  log_every: 1\n' >> "$TMP/$1_big.yaml"
}
for m in simclr loco; do small $m; big $m; done

# Median images/s of metrics.csv's rows after the first (its first step allocates everything).
ips() { awk -F, 'NR==1 {for (i=1;i<=NF;i++) if ($i=="images_per_sec") c=i} NR>2 {print $c}' "$1"/metrics.csv | sort -g | awk '{v[NR]=$1} END {print (NR ? v[int((NR+1)/2)] : "nan")}'; }

printf '%-12s %-6s %-24s %10s  %s\n' model method config images_per_s communication
for round in $(seq "$ROUNDS"); do
  for f in simclr_small loco_small simclr_big loco_big; do
    for cfg in 1x2threads 2ranksx1thread; do
      out=$TMP/$f-$cfg-$round
      if [ $cfg = 1x2threads ]; then
        RAYON_NUM_THREADS=2 "$BIN" run "$TMP/$f.yaml" --quiet --runs-dir "$out" > "$out.log" 2>&1
      else
        RAYON_NUM_THREADS=1 mpirun --oversubscribe -np 2 "$BIN" run "$TMP/$f.yaml" --quiet --runs-dir "$out" > "$out.log" 2>&1
      fi
      comm=$(grep -o 'communication per step.*' "$out.log" || true)
      printf '%-12s %-6s %-24s %10s  %s\n' "${f#*_}" "${f%_*}" "$cfg round $round" "$(ips "$out"/*)" "${comm:-—}"
    done
  done
done
