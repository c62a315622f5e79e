#!/usr/bin/env python3
"""Loads locograph's torchvision-named weights into torchvision's ResNet and checks that its
feature maps (layer1..layer4 = res2..res5) and pooled embedding match the exported ONNX file.

    locograph export RUN --onnx enc.onnx --torchvision tv.safetensors
    python scripts/check_torchvision.py tv.safetensors enc.onnx [--arch resnet50] [--size 64]

Needs torch, torchvision and onnxruntime (numpy). Exits 1 when a difference exceeds --tol.
"""
import argparse
import json
import struct
import sys

import numpy as np
import onnxruntime as ort
import torch
import torchvision

DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def load_safetensors(path):
    """A safetensors reader in numpy, so the check needs no extra package."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(data[a:b], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights")
    p.add_argument("onnx")
    p.add_argument("--arch", default="resnet50", help="torchvision constructor (resnet18/34/50/101)")
    p.add_argument("--size", type=int, default=64, help="input side in pixels")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tol", type=float, default=1e-4)
    a = p.parse_args()

    net = getattr(torchvision.models, a.arch)(weights=None).eval()
    state = load_safetensors(a.weights)
    missing, unexpected = net.load_state_dict(state, strict=False)
    # The classifier is not part of a contrastive encoder; everything else must match.
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        print(f"FAIL: missing {missing}, unexpected {unexpected}")
        return 1

    sess = ort.InferenceSession(a.onnx, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    channels = sess.get_inputs()[0].shape[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, channels, a.size, a.size, generator=g)
    onnx_out = dict(zip(names, sess.run(None, {"input": x.numpy()})))

    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        feats = {}
        for i, layer in enumerate([net.layer1, net.layer2, net.layer3, net.layer4]):
            h = layer(h)
            feats[f"res{i + 2}"] = h
        feats["embedding"] = torch.flatten(net.avgpool(h), 1)

    worst = 0.0
    for name in names:
        if name not in feats:
            print(f"skip {name}: no torchvision counterpart")
            continue
        d = float(np.abs(feats[name].numpy() - onnx_out[name]).max())
        worst = max(worst, d)
        print(f"{name}: shape {list(onnx_out[name].shape)}, max |torchvision - onnx| = {d:.3e}")
    ok = worst <= a.tol
    print(("ok" if ok else "FAIL") + f": max difference {worst:.3e} (tolerance {a.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
