#!/usr/bin/env bash
# One command for docs/results.md: trains SimCLR, GIM, LoCo, the two decoder ablations
# (GIM + conv-block decoders, LoCo + 4-layer MLP) and the other methods written as graphs
# (DGL and InfoPro, supervised; SimSiam and BYOL, self-supervised) on Fashion-MNIST with the same
# step budget, evaluates each (linear probe and kNN on the frozen encoder's res5 features), and
# draws the paper's figures into docs/figures/.
#
#   scripts/results.sh                   # the step budget written in the experiment files
#   STEPS=3000 scripts/results.sh        # the same budget for every method, overridden
#   STEPS=20 LINEAR_EPOCHS=5 scripts/results.sh   # a smoke run of the whole pipeline
#   ONLY="DGL InfoPro" scripts/results.sh          # only these methods (no figures)
#
# Environment (all optional):
#   STEPS          optimizer steps per method (default: each file's `train.steps`, 500 for all)
#   ONLY           labels of the methods to run, space-separated (default: all); the figures
#                  are drawn only when SimCLR, GIM, LoCo and both ablations are among them
#   LINEAR_EPOCHS  linear-probe epochs (default 100, the paper's; LR ×0.1 at 30/60/90 %)
#   LINEAR_LR      linear-probe initial LR on standardised features (default 0.1)
#   KNN_K, KNN_T   kNN neighbours and temperature (default 200, 0.07: InstDisc)
#   NODE           node to evaluate (default: the encoder output, res5)
#   SMOOTHING      EMA smoothing of the loss curves, in [0, 1) (default 0.6; 0 = raw)
#   RUNS           where runs go (default runs/results; each method in RUNS/<experiment>/)
#   FIGURES        where figures go (default docs/figures)
#   LOCOGRAPH      a locograph binary to use instead of building one (`cargo build --release`)
#
# Outputs: RUNS/<experiment>/<run>/{metrics.csv,weights.safetensors,eval_linear_res5.json,
# eval_knn_res5.json,...}, FIGURES/{loss_curves,tsne}.{png,svg}, and a summary table on stdout
# (also in RUNS/summary.md). Each call trains new runs; earlier ones are kept.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${RUNS:-runs/results}
figures=${FIGURES:-docs/figures}
node_args=()
[[ -n ${NODE:-} ]] && node_args=(--node "$NODE")

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
  "GIM+conv-dec gim_convdec_resnet18narrow_fmnist"
  "LoCo+MLP4 loco_mlp4_resnet18narrow_fmnist"
  "DGL dgl_resnet18narrow_fmnist"
  "InfoPro infopro_resnet18narrow_fmnist"
  "SimSiam simsiam_resnet18narrow_fmnist"
  "BYOL byol_resnet18narrow_fmnist"
)

step_args=()
[[ -n ${STEPS:-} ]] && step_args=(--steps "$STEPS")

pairs=()   # LABEL=RUN_DIR for the figures
for m in "${methods[@]}"; do
  read -r label exp <<<"$m"
  if [[ -n ${ONLY:-} && " $ONLY " != *" $label "* ]]; then continue; fi
  echo "== $label: training experiments/$exp.yaml ${STEPS:+($STEPS steps)}" >&2
  lg run --quiet --runs-dir "$runs/$exp" "${step_args[@]}" "experiments/$exp.yaml"
  run=$(ls -td "$runs/$exp"/*/ | head -1)
  run=${run%/}
  echo "== $label: evaluating $run" >&2
  lg eval "$run" --protocol linear --protocol knn "${node_args[@]}" \
    --epochs "${LINEAR_EPOCHS:-100}" --lr "${LINEAR_LR:-0.1}" \
    --k "${KNN_K:-200}" --temperature "${KNN_T:-0.07}"
  pairs+=("$label=$run")
done

# The figures compare SimCLR, GIM, LoCo and the ablations: the first five methods, in order.
if [[ ${#pairs[@]} -ge 5 && ${pairs[0]} == SimCLR=* && ${pairs[4]} == LoCo+MLP4=* ]]; then
  # Fig. 1 (supplementary): per-decoder loss curves of the three methods, matched by stage.
  mkdir -p "$figures"
  lg plot losses --smoothing "${SMOOTHING:-0.6}" --out "$figures/loss_curves.png" --out "$figures/loss_curves.svg" "${pairs[@]:0:3}"
  lg plot losses --smoothing "${SMOOTHING:-0.6}" --out "$figures/loss_curves_ablations.png" --out "$figures/loss_curves_ablations.svg" \
    "${pairs[1]}" "${pairs[3]}" "${pairs[2]}" "${pairs[4]}"
  # Fig. 2 (supplementary): t-SNE of 500 test images (first 50 of each of the 10 classes).
  lg plot tsne --out "$figures/tsne.png" --out "$figures/tsne.svg" "${node_args[@]}" "${pairs[@]:0:3}"
fi

# Summary table from the reports (python3 only reads JSON; no third-party modules).
python3 - "$runs/summary.md" "${pairs[@]}" <<'PY'
import json, pathlib, sys
out, pairs = sys.argv[1], sys.argv[2:]
rows = ["| method | steps | train wall time | s/step | node | linear top-1 | kNN top-1 |",
        "|---|---|---|---|---|---|---|"]
for p in pairs:
    label, run = p.split("=", 1)
    reps = {}
    for f in pathlib.Path(run).glob("eval_*.json"):
        r = json.loads(f.read_text())
        reps[r["protocol"]] = r
    lin, knn = reps.get("linear", {}), reps.get("knn", {})
    any_r = lin or knn
    fmt = lambda r: f'{100 * r["result"]["test_top1"]:.2f}' if r else "–"
    # Training wall time: the last metrics.csv row's elapsed_s (the run's own clock).
    last = (pathlib.Path(run) / "metrics.csv").read_text().strip().splitlines()[-1].split(",")
    head = (pathlib.Path(run) / "metrics.csv").read_text().splitlines()[0].split(",")
    row = dict(zip(head, last))
    secs, steps = float(row["elapsed_s"]), int(row["step"])
    rows.append(f'| {label} | {steps} | {secs / 60:.1f} min | {secs / steps:.2f} | {any_r.get("node", "?")} '
                f'| {fmt(lin)} | {fmt(knn)} |')
text = "\n".join(rows) + "\n"
pathlib.Path(out).write_text(text)
print(text, end="")
PY
