#!/usr/bin/env bash
# Installs ONNX Runtime (the shared library the `ort` crate loads at run time) and the `onnx`
# checker into .venv-onnx/ at the repository root, then prints the line that points the tests
# and `locograph export --verify` at the library:
#
#   eval "$(scripts/install-onnxruntime.sh)"     # sets ORT_DYLIB_PATH
#
# onnxruntime is installed without its Python dependencies: only its shared library is used.
set -euo pipefail
ORT_VERSION="${ORT_VERSION:-1.32.0}"
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-onnx"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps "onnxruntime==$ORT_VERSION" >&2
"$venv/bin/python" -c "import onnx" 2>/dev/null || "$venv/bin/pip" install -q --disable-pip-version-check onnx >&2
lib="$(ls "$venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n 1)"
if [ -z "$lib" ]; then
  echo "install-onnxruntime.sh: libonnxruntime.so.* not found under $venv" >&2
  exit 1
fi
echo "export ORT_DYLIB_PATH=$lib"
