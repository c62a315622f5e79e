"""PyTorch equivalent of a whole locograph training step on the shipped small encoder:
experiments/{simclr,loco}_resnet18narrow_fmnist.yaml, written out so that torchvision is not
needed. Each step does what `locograph run` does: sample 128 Fashion-MNIST images, augment two
views of each (batched on the tensor), forward the encoder and decoders, NT-Xent, backward,
LARS.

- encoder: graphs/resnet18_narrow.yaml: 3x3/1 stem (1 -> 16) + BN + ReLU, basic-block stages
  res2..res5 with 16/32/64/128 channels (2 blocks each, stride 1/2/2/2), convolutions without
  bias;
- decoders: global average pool -> Linear(C, 128) -> ReLU -> Linear(128, 128); NT-Xent tau 0.5
  on the views stacked [view 1; view 2];
- SimCLR: one decoder on res5. LoCo: decoders on res3 (L1), res4 (L2), res5 (L3); the edge
  res2 -> res3 stops L2 and res3 -> res4 stops L3, so res2 <- L1, res3 <- L1 + L2,
  res4 <- L2 + L3, res5 <- L3. One forward pass; a shared stage gets one weights-only backward
  for its upper loss and one full backward for its lower one (what locograph's plan runs);
- augmentations: random resized crop (scale 0.2-1, ratio 3/4-4/3, bilinear), horizontal flip
  0.5, brightness and contrast 0.4 with p 0.8, normalise (0.286, 0.353);
- LARS: momentum 0.9, trust coefficient 0.001, weight decay 1e-6, biases and BN parameters
  excluded from weight decay and adaptation; warm-up 0.1 epoch then cosine, peak LR 0.5.

`--precision bf16` runs the forward and the losses under torch.autocast("cpu", bfloat16)
(PyTorch's mixed precision: bf16 convolutions and matmuls through oneDNN, f32 master weights),
`--channels-last` keeps activations NHWC.

Prints one `key=value` line: mean seconds per step over the timed steps (after `--warmup`
untimed ones), images/s (images, not views) and the process's peak RSS.

    python bench/torch_narrow.py --method loco --steps 20 --threads 2 --data data/fashion-mnist
"""
import argparse
import contextlib
import gzip
import math
import pathlib
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_step import Basic, conv_bn  # the same blocks as bench/torch_step.py


def stage(cin, cout, s):
    return nn.Sequential(Basic(cin, cout, s), Basic(cout, cout, 1))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, 16, 3, 1), nn.ReLU())
        self.res2, self.res3 = stage(16, 16, 1), stage(16, 32, 2)
        self.res4, self.res5 = stage(32, 64, 2), stage(64, 128, 2)


def decoder(c):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 128), nn.ReLU(), nn.Linear(128, 128))


def nt_xent(z, tau=0.5):
    z = F.normalize(z.float(), dim=1)
    n2 = z.shape[0]
    logits = (z @ z.t()) / tau
    logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))
    target = (torch.arange(n2) + n2 // 2) % n2
    return F.cross_entropy(logits, target)


def read_idx_images(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    n, h, w = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    return torch.frombuffer(bytearray(data[16:]), dtype=torch.uint8).reshape(n, 1, h, w)


def augment(x, g):
    """Two-view SimCLR augmentation of a uint8 batch [N, 1, 28, 28], batched."""
    n = x.shape[0]
    x = x.float() / 255
    # Random resized crop + flip as one affine sampling grid per image.
    area = torch.empty(n).uniform_(0.2, 1.0, generator=g)
    logr = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    w = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    cx = (1 - w) * torch.rand(n, generator=g) + w / 2
    cy = (1 - h) * torch.rand(n, generator=g) + h / 2
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * cy - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Brightness and contrast jitter (0.4), applied with probability 0.8.
    on = (torch.rand(n, 1, 1, 1, generator=g) < 0.8).float()
    b = 1 + on * torch.empty(n, 1, 1, 1).uniform_(-0.4, 0.4, generator=g)
    c = 1 + on * torch.empty(n, 1, 1, 1).uniform_(-0.4, 0.4, generator=g)
    x = (x * b).clamp(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp(0, 1)
    return (x - 0.286) / 0.353


class Lars:
    """SimCLR's LARS: g += wd * w and g *= trust * |w| / |g| for weights; biases and BN
    parameters (1-d) get neither; v = m * v + lr * g; w -= v."""

    def __init__(self, params, momentum=0.9, weight_decay=1e-6, trust=0.001):
        self.params = [p for p in params if p.requires_grad]
        self.m, self.wd, self.trust = momentum, weight_decay, trust
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, lr):
        for p, v in zip(self.params, self.v):
            if p.grad is None:
                continue
            g = p.grad
            if p.ndim > 1:
                g = g + self.wd * p
                wn, gn = p.norm(), g.norm()
                if wn > 0 and gn > 0:
                    g = g * (self.trust * wn / gn)
            v.mul_(self.m).add_(g, alpha=lr)
            p.sub_(v)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def backward_weights(out, grad, module):
    """The gradient `grad` of `out` into `module`'s parameters only (no input gradient)."""
    torch.autograd.backward(out, grad, inputs=list(module.parameters()), retain_graph=True)


def simclr_losses(enc, decs, x, cast):
    with cast():
        z = decs[0](enc.res5(enc.res4(enc.res3(enc.res2(enc.stem(x))))))
        loss = nt_xent(z)
    loss.backward()
    return [loss]


def loco_losses(enc, decs, x, cast):
    with cast():
        h2 = enc.res2(enc.stem(x))
        h2d = h2.detach().requires_grad_()  # res2 -> res3 stops L2
        h3 = enc.res3(h2d)
        h3d = h3.detach().requires_grad_()  # res3 -> res4 stops L3
        h4 = enc.res4(h3d)
        h4d = h4.detach().requires_grad_()
        h5 = enc.res5(h4d)
        l1, l2, l3 = nt_xent(decs[0](h3)), nt_xent(decs[1](h4)), nt_xent(decs[2](h5))
    l3.backward()  # dec3, res5; h4d.grad = dL3/dh4
    backward_weights(h4, h4d.grad, enc.res4)  # res4 <- L3
    l2.backward()  # dec2, res4 <- L2; h3d.grad = dL2/dh3
    backward_weights(h3, h3d.grad, enc.res3)  # res3 <- L2
    l1.backward()  # dec1, res3 <- L1; h2d.grad = dL1/dh2
    h2.backward(h2d.grad)  # res2, stem <- L1
    return [l1, l2, l3]


def check_loco_routing(enc, decs, x):
    """The one-forward LoCo gradients against the naive reference: one forward per loss with
    that loss's stops as explicit detaches, gradients summed. Returns the largest difference
    relative to the reference's largest magnitude."""
    params = list(enc.parameters()) + [q for d in decs for q in d.parameters()]

    def grads(fn):
        for q in params:
            q.grad = None
        fn()
        return [q.grad.clone() if q.grad is not None else torch.zeros_like(q) for q in params]

    def naive():
        h3 = enc.res3(enc.res2(enc.stem(x)))
        nt_xent(decs[0](h3)).backward()  # L1: no stop on its path
        h4 = enc.res4(enc.res3(enc.res2(enc.stem(x)).detach()))
        nt_xent(decs[1](h4)).backward()  # L2: stopped at res2 -> res3
        h5 = enc.res5(enc.res4(enc.res3(enc.res2(enc.stem(x))).detach()))
        nt_xent(decs[2](h5)).backward()  # L3: stopped at res3 -> res4

    ours = grads(lambda: loco_losses(enc, decs, x, contextlib.nullcontext))
    ref = grads(naive)
    scale = max(r.abs().max().item() for r in ref)
    return max((o - r).abs().max().item() for o, r in zip(ours, ref)) / scale


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="simclr", choices=["simclr", "loco"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--data", default="data/fashion-mnist")
    p.add_argument("--check", action="store_true", help="compare the LoCo routing with the naive reference and exit")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = read_idx_images(pathlib.Path(a.data) / "train-images-idx3-ubyte.gz")
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    enc = Encoder().train().to(memory_format=fmt)
    widths = [128] if a.method == "simclr" else [32, 64, 128]
    decs = [decoder(c).train() for c in widths]
    params = list(enc.parameters()) + [q for d in decs for q in d.parameters()]
    opt = Lars(params)
    if a.precision == "bf16":
        def cast():
            return torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        cast = contextlib.nullcontext
    if a.check:
        x = torch.cat([augment(images[:8], g), augment(images[:8], g)]).double()
        torch.set_default_dtype(torch.float64)
        enc, decs = Encoder().train(), [decoder(c).train() for c in (32, 64, 128)]
        d = check_loco_routing(enc, decs, x)
        print(f"loco routing vs naive reference (f64): max relative difference {d:.2e}")
        raise SystemExit(0 if d < 1e-10 else 1)
    losses = simclr_losses if a.method == "simclr" else loco_losses
    steps_per_epoch = images.shape[0] // a.batch
    total = a.warmup + a.steps
    warm = max(1, int(0.1 * steps_per_epoch))
    order = torch.randperm(images.shape[0], generator=g)
    times, last = [], []
    for i in range(total):
        t = time.perf_counter()
        j = (i % steps_per_epoch) * a.batch
        x = images[order[j:j + a.batch]]
        x = torch.cat([augment(x, g), augment(x, g)]).contiguous(memory_format=fmt)
        lr = 0.5 * (i + 1) / warm if i < warm else 0.25 * (1 + math.cos(math.pi * (i - warm) / max(1, total - warm)))
        opt.zero_grad()
        last = losses(enc, decs, x, cast)
        opt.step(lr)
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    step_s = sum(times) / len(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    impl = f"pytorch-{torch.__version__.split('+')[0]}" + ("-bf16" if a.precision == "bf16" else "") + (
        "-cl" if a.channels_last else "")
    loss = " ".join(f"L{k + 1}={v.item():.4f}" for k, v in enumerate(last))
    print(f"impl={impl} method={a.method} batch={a.batch} steps={a.steps} step_s={step_s:.3f} "
          f"images_per_s={a.batch / step_s:.2f} peak_rss_mb={rss / 1e6:.0f} {loss}")


if __name__ == "__main__":
    main()
