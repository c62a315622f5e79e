#!/usr/bin/env bash
# Builds the CUDA binaries for the GPU machine here (no GPU needed), following
# docs/gpu.md ("Build"): nvcc 13.0 and the CUDA/cuDNN link libraries from PyPI in .cuda-tk/
# (gitignored, ~1.7 GB once), a stub libcuda.so for linking, sm_90 (H100). Leaves
# .gpu/{locograph,train_step}.xz and .gpu/run-on-gpu.sh (gitignored), to copy to the GPU machine with the working tree.
# Its own target folder (default target-cuda/), so the CPU build in target/ is untouched.
#
#   scripts/build-gpu.sh [FEATURES]      # cudnn (default) or cuda
set -euo pipefail
FEATURES=${1:-cudnn}
cd "$(dirname "$0")/.."
TK=$PWD/.cuda-tk; OUTDIR=$PWD/.gpu; TARGET=${CARGO_TARGET_DIR_CUDA:-$PWD/target-cuda}
if [ ! -x "$TK/venv/bin/python" ]; then python3 -m venv "$TK/venv"; fi
"$TK/venv/bin/pip" install -q --disable-pip-version-check \
  "cuda-toolkit[nvcc,cudart,crt,cccl,nvvm,cublas,curand,nvrtc]==13.0.2" "nvidia-cudnn-cu13==9.19.0.56"
NV=$("$TK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia
R=$TK/root
rm -rf "$R"; mkdir -p "$R/lib64/stubs"
for d in bin include nvvm; do ln -s "$NV/cu13/$d" "$R/$d"; done
for l in cublas cublasLt cudart nvrtc; do ln -s "$NV/cu13/lib/lib$l.so.13" "$R/lib64/lib$l.so"; done
ln -s "$NV/cu13/lib/libcurand.so.10" "$R/lib64/libcurand.so"
ln -s "$NV/cudnn/lib/libcudnn.so.9" "$R/lib64/libcudnn.so"
gcc -E -P -I"$R/include" "$R/include/cuda.h" \
  | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( ' | sort -u \
  | awk '{print "int " $1 "(void) { return 999; }"}' > "$R/lib64/stubs/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$R/lib64/stubs/libcuda.so" "$R/lib64/stubs/cuda_stub.c"
export CUDA_HOME="$R" PATH="$R/bin:$PATH" CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
export CUDAFORGE_THREADS=$(nproc) CARGO_TARGET_DIR=$TARGET
cargo build --release --features "$FEATURES" --bin locograph
cargo bench --features "$FEATURES" --bench train_step --no-run
mkdir -p "$OUTDIR"
strip -o "$OUTDIR/locograph" "$TARGET/release/locograph"
B=$(ls -t "$TARGET"/release/deps/train_step-* | grep -v '\.d$' | head -1)
strip -o "$OUTDIR/train_step" "$B"
xz -9 -T0 -f "$OUTDIR/locograph" "$OUTDIR/train_step"
cp scripts/run-on-gpu.sh "$OUTDIR/run-on-gpu.sh"
ls -l "$OUTDIR"
