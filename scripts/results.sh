#!/usr/bin/env bash
# One command for docs/results.md: trains SimCLR, GIM and LoCo on Fashion-MNIST with the same
# step budget, one run per seed (`run --seeds`), each with the online kNN monitor on; evaluates
# every run (linear probe and kNN on the frozen encoder's res5 features); draws the paper's
# figures and the online kNN curves into docs/figures/; prints mean ± std over the seeds.
# ABLATIONS=1 adds the two decoder ablations (GIM + conv-block decoders, LoCo + 4-layer MLP);
# METHODS=1 adds the other methods written as graphs (DGL and InfoPro, supervised; SimSiam and
# BYOL, self-supervised).
#
#   scripts/results.sh                   # the step budget written in the experiment files
#   STEPS=3000 scripts/results.sh        # the same budget for every method, overridden
#   STEPS=20 SEEDS=0,1 LINEAR_EPOCHS=2 TRAIN_LIMIT=2000 TEST_LIMIT=1000 MONITOR_EVERY=10 \
#     RUNS=/tmp/smoke FIGURES=/tmp/smoke/figures scripts/results.sh   # a smoke run of the pipeline
#
# Environment (all optional):
#   SEEDS          comma-separated seeds, one run each (default 0,1,2)
#   STEPS          optimizer steps per run (default: each file's `train.steps`, 500 for all)
#   MONITOR_EVERY  steps between online kNN measurements, a multiple of the files' log_every (10)
#                  (default 50; 1000 training images as the bank, 500 test images as the
#                  queries, k = 20)
#   LINEAR_EPOCHS  linear-probe epochs (default 100, the paper's; LR ×0.1 at 30/60/90 %)
#   LINEAR_LR      linear-probe initial LR on standardised features (default 0.1)
#   KNN_K, KNN_T   kNN neighbours and temperature (default 200, 0.07: InstDisc)
#   NODE           node to evaluate (default: the encoder output, res5)
#   TRAIN_LIMIT, TEST_LIMIT  evaluate on the first N training / test images only (smoke runs;
#                  default: all 60 000 / 10 000)
#   SMOOTHING      EMA smoothing of the loss curves, in [0, 1) (default 0.6; 0 = raw)
#   ABLATIONS      1: also the two decoder ablations (default 0)
#   METHODS        1: also DGL, InfoPro, SimSiam and BYOL (default 0)
#   ONLY           labels of the methods to run, space-separated, e.g. "DGL BYOL" (default: all
#                  selected); the loss-curve and t-SNE figures need SimCLR, GIM and LoCo among them
#   RUNS           where runs go (default runs/results; each method in RUNS/<experiment>/)
#   FIGURES        where figures go (default docs/figures)
#   LOCOGRAPH      a locograph binary to use instead of building one (`cargo build --release`)
#
# Outputs: RUNS/<experiment>/<name>-seeds-<time>/{seeds.json,summary.json,seed-N/...} (each
# seed-N a run directory with metrics.csv, eval_linear_res5.json, eval_knn_res5.json, ...),
# FIGURES/{loss_curves,tsne,online_knn}.{png,svg} (loss curves and t-SNE of the first seed), and
# a summary table on stdout (also in RUNS/summary.md). Each call trains new runs.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${RUNS:-runs/results}
figures=${FIGURES:-docs/figures}
seeds=${SEEDS:-0,1,2}
first_seed=${seeds%%,*}
node_args=()
[[ -n ${NODE:-} ]] && node_args=(--node "$NODE")
limit_args=()
[[ -n ${TRAIN_LIMIT:-} ]] && limit_args+=(--train-limit "$TRAIN_LIMIT")
[[ -n ${TEST_LIMIT:-} ]] && limit_args+=(--test-limit "$TEST_LIMIT")

if [[ -z ${LOCOGRAPH:-} ]]; then
  cargo build --release --quiet
  LOCOGRAPH="${CARGO_TARGET_DIR:-target}/release/locograph"
fi
lg() { "$LOCOGRAPH" "$@"; }

# The experiment files read ../data/fashion-mnist (relative to experiments/).
[[ -e data/fashion-mnist/t10k-labels-idx1-ubyte.gz ]] || lg data fetch fashion-mnist --dest data

# label  experiment (experiments/<name>.yaml); the label names the method in figures and tables.
methods=(
  "SimCLR simclr_resnet18narrow_fmnist"
  "GIM gim_resnet18narrow_fmnist"
  "LoCo loco_resnet18narrow_fmnist"
)
if [[ ${ABLATIONS:-0} == 1 ]]; then
  methods+=("GIM+conv-dec gim_convdec_resnet18narrow_fmnist" "LoCo+MLP4 loco_mlp4_resnet18narrow_fmnist")
fi
if [[ ${METHODS:-0} == 1 ]]; then
  methods+=(
    "DGL dgl_resnet18narrow_fmnist"
    "InfoPro infopro_resnet18narrow_fmnist"
    "SimSiam simsiam_resnet18narrow_fmnist"
    "BYOL byol_resnet18narrow_fmnist"
  )
fi

if [[ -n ${ONLY:-} ]]; then
  kept=()
  for m in "${methods[@]}"; do [[ " $ONLY " == *" ${m%% *} "* ]] && kept+=("$m"); done
  [[ ${#kept[@]} -gt 0 ]] || { echo "ONLY=\"$ONLY\" names none of: ${methods[*]%% *}" >&2; exit 2; }
  methods=("${kept[@]}")
fi

step_args=()
[[ -n ${STEPS:-} ]] && step_args=(--steps "$STEPS")
monitor="monitor={every: ${MONITOR_EVERY:-50}, train_images: 1000, test_images: 500, k: 20}"

groups=()   # LABEL=GROUP_DIR for the summary and the online kNN figure
firsts=()   # LABEL=RUN_DIR of the first seed, for the loss curves and t-SNE
for m in "${methods[@]}"; do
  read -r label exp <<<"$m"
  echo "== $label: training experiments/$exp.yaml, seeds $seeds ${STEPS:+($STEPS steps)}" >&2
  lg run --quiet --runs-dir "$runs/$exp" --seeds "$seeds" --set "$monitor" "${step_args[@]}" "experiments/$exp.yaml"
  group=$(ls -td "$runs/$exp"/*-seeds-*/ | head -1)
  group=${group%/}
  echo "== $label: evaluating every run of $group" >&2
  lg eval "$group" --protocol linear --protocol knn "${node_args[@]}" "${limit_args[@]}" \
    --epochs "${LINEAR_EPOCHS:-100}" --lr "${LINEAR_LR:-0.1}" \
    --k "${KNN_K:-200}" --temperature "${KNN_T:-0.07}"
  groups+=("$label=$group")
  firsts+=("$label=$group/seed-$first_seed")
done

mkdir -p "$figures"
if [[ ${#firsts[@]} -ge 3 && ${firsts[0]} == SimCLR=* && ${firsts[2]} == LoCo=* ]]; then
  # Fig. 1 (supplementary): per-decoder loss curves of the three methods, matched by stage.
  lg plot losses --smoothing "${SMOOTHING:-0.6}" --out "$figures/loss_curves.png" --out "$figures/loss_curves.svg" "${firsts[@]:0:3}"
  if [[ ${ABLATIONS:-0} == 1 && ${firsts[4]:-} == LoCo+MLP4=* ]]; then
    lg plot losses --smoothing "${SMOOTHING:-0.6}" --out "$figures/loss_curves_ablations.png" --out "$figures/loss_curves_ablations.svg" \
      "${firsts[1]}" "${firsts[3]}" "${firsts[2]}" "${firsts[4]}"
  fi
  # Fig. 2 (supplementary): t-SNE of 500 test images (first 50 of each of the 10 classes).
  lg plot tsne --out "$figures/tsne.png" --out "$figures/tsne.svg" "${node_args[@]}" "${firsts[@]:0:3}"
fi
# The online kNN accuracy over training, the mean over the seeds of each method.
lg plot monitor --out "$figures/online_knn.png" --out "$figures/online_knn.svg" "${groups[@]}"

# Summary table from each group's summary.json.
python3 scripts/summary_table.py "$runs/summary.md" "${groups[@]}"
