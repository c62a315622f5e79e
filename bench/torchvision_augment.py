#!/usr/bin/env python3
"""SimCLR augmentation throughput in torchvision: the reference side of `cargo bench --bench augment`.

The pipeline is SimCLR's (Chen et al. 2020, appendix A), the one `locograph::data::augment`
implements:

    RandomResizedCrop(size, scale=(0.08, 1)) -> RandomHorizontalFlip -> RandomApply(ColorJitter(0.8,
    0.8, 0.8, 0.2), p=0.8) -> RandomGrayscale(0.2) -> RandomApply(GaussianBlur(k ~ 10% of size, odd,
    sigma=(0.1, 2)), p=0.5) -> ToTensor -> Normalize(ImageNet mean/std)

applied twice (two views) to decoded RGB uint8 PIL images of side `source`, generated
deterministically with the same formula as `locograph::data::bench::source_pixel`, so both sides
augment identical pixels. Views are batched by a `DataLoader` (batch 32, default collate):
`threads = 1` is `num_workers = 0` with `torch.set_num_threads(1)`; `threads = n > 1` is
`num_workers = n` (each worker single-threaded, as `DataLoader` sets it).

`--blur pil` swaps torchvision's GaussianBlur (a dense k x k conv2d: ~75 ms per 224 view) for
MoCo v2's PIL blur, the faster variant common in PyTorch SimCLR code.

One-shot:  python bench/torchvision_augment.py --side 224 --source 256 --threads 2 --images 256
Server:    python bench/torchvision_augment.py --serve   (reads "side source threads images [tv|pil]" lines
           on stdin, answers one JSON line each; used by the Rust bench to alternate the sides)

Each measurement prints one JSON line:
    {"side": 224, "source": 256, "threads": 2, "images": 256, "views": 512, "seconds": ..., "views_per_s": ...}
"""

import argparse
import json
import sys
import time

import random

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
POOL = 64  # distinct source images; image i is pool[i % POOL]


def kernel_size(side):
    """SimCLR's blur kernel: 10% of the side, made odd (23 at 224, 3 at 32)."""
    return 2 * (side // 10 // 2) + 1


def source_image(i, side):
    """Same bytes as `locograph::data::bench::source_pixel`: HWC uint8 RGB."""
    y, x, c = np.meshgrid(np.arange(side), np.arange(side), np.arange(3), indexing="ij")
    v = (x * 7 + y * 13 + c * 29 + i * 31) ^ ((x * y) >> 3)
    return Image.fromarray((v & 255).astype(np.uint8), mode="RGB")


class PilBlur:
    """MoCo v2's `GaussianBlur` (moco/loader.py): PIL's `ImageFilter.GaussianBlur(sigma)`, sigma
    uniform in [0.1, 2]; PIL approximates the Gaussian by box blurs, whatever the kernel size."""

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def simclr(size, blur="tv"):
    """`blur`: "tv" = `transforms.GaussianBlur` (a dense k x k conv2d on a tensor copy), "pil" =
    MoCo v2's PIL blur, the faster choice many PyTorch SimCLR/MoCo codebases make."""
    b = transforms.GaussianBlur(kernel_size(size), sigma=(0.1, 2.0)) if blur == "tv" else PilBlur()
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.08, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.RandomApply([transforms.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([b], p=0.5),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


class Pairs(Dataset):
    def __init__(self, pool, n, size, blur):
        self.pool, self.n, self.t = pool, n, simclr(size, blur)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img = self.pool[i % len(self.pool)]
        return self.t(img), self.t(img)


_pools = {}


def measure(side, source, threads, images, blur="tv", batch=32):
    if source not in _pools:
        _pools[source] = [source_image(i, source) for i in range(POOL)]
    torch.set_num_threads(1)
    ds = Pairs(_pools[source], images, side, blur)
    workers = 0 if threads <= 1 else threads
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    start = time.perf_counter()
    views = 0
    for v1, v2 in loader:
        views += v1.shape[0] + v2.shape[0]
    seconds = time.perf_counter() - start
    return {
        "side": side,
        "source": source,
        "threads": threads,
        "blur": blur,
        "images": images,
        "views": views,
        "seconds": seconds,
        "views_per_s": views / max(seconds, 1e-9),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=32)
    p.add_argument("--source", type=int, default=None, help="source image side (default: the output side)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--blur", choices=["tv", "pil"], default="tv", help="torchvision's GaussianBlur or MoCo v2's PIL blur")
    p.add_argument("--serve", action="store_true", help="answer 'side source threads images [blur]' lines from stdin")
    a = p.parse_args()
    if a.serve:
        print(json.dumps({"ready": True, "torch": torch.__version__}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            f = line.split()
            side, source, threads, images = (int(v) for v in f[:4])
            print(json.dumps(measure(side, source, threads, images, f[4] if len(f) > 4 else "tv")), flush=True)
        return
    for t in a.threads:
        print(json.dumps(measure(a.side, a.source or a.side, t, a.images, a.blur)), flush=True)


if __name__ == "__main__":
    main()
