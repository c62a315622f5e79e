#!/usr/bin/env python3
"""Runs onnx.checker (full check: also strict shape inference) on every file given.

    .venv-onnx/bin/python scripts/check_onnx.py encoder.onnx [more.onnx ...]

Prints one line per file (opset, inputs, outputs, metadata) and exits 1 if any file fails.
"""
import sys

import onnx


def main(paths):
    failed = 0
    for path in paths:
        try:
            model = onnx.load(path)
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:  # the checker raises several exception types
            print(f"FAIL {path}: {e}")
            failed += 1
            continue
        opset = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
        meta = {p.key: p.value for p in model.metadata_props}
        ins = [i.name for i in model.graph.input]
        outs = [o.name for o in model.graph.output]
        print(f"ok {path}: opset {opset}, ir {model.ir_version}, inputs {ins}, outputs {outs}, metadata {meta}")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
