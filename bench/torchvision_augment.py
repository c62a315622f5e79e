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

One-shot:  python bench/torchvision_augment.py --side 224 --source 256 --threads 2 --images 256
Server:    python bench/torchvision_augment.py --serve   (reads "side source threads images" lines
           on stdin, answers one JSON line each; used by the Rust bench to alternate the sides)

Each measurement prints one JSON line:
    {"side": 224, "source": 256, "threads": 2, "images": 256, "views": 512, "seconds": ..., "views_per_s": ...}
"""

import argparse
import json
import sys
import time

import numpy as np
import torch
from PIL import Image
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


def simclr(size):
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.08, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.RandomApply([transforms.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([transforms.GaussianBlur(kernel_size(size), sigma=(0.1, 2.0))], p=0.5),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


class Pairs(Dataset):
    def __init__(self, pool, n, size):
        self.pool, self.n, self.t = pool, n, simclr(size)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img = self.pool[i % len(self.pool)]
        return self.t(img), self.t(img)


_pools = {}


def measure(side, source, threads, images, batch=32):
    if source not in _pools:
        _pools[source] = [source_image(i, source) for i in range(POOL)]
    torch.set_num_threads(1)
    ds = Pairs(_pools[source], images, side)
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
    p.add_argument("--serve", action="store_true", help="answer 'side source threads images' lines from stdin")
    a = p.parse_args()
    if a.serve:
        print(json.dumps({"ready": True, "torch": torch.__version__}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            side, source, threads, images = (int(v) for v in line.split())
            print(json.dumps(measure(side, source, threads, images)), flush=True)
        return
    for t in a.threads:
        print(json.dumps(measure(a.side, a.source or a.side, t, a.images)), flush=True)


if __name__ == "__main__":
    main()
