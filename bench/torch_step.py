"""PyTorch reference for benches/train_step.rs: one SimCLR step (forward + backward + AdamW).

Same models as locograph's graphs, written out so that torchvision is not needed:
- resnet18: the CIFAR variant (3x3/1 stem, no max pool), 32x32 inputs -- graphs/resnet18_small.yaml
- resnet50: torchvision's resnet50 (stride on the 3x3, v1.5), 224x224 -- graphs/resnet50.yaml
each followed by global average pooling, a 2-layer MLP (hidden = feature width, out 128) and
NT-Xent (tau 0.5 / 0.1), trained with AdamW (lr 1e-3, weight decay 1e-6). Batch = images; each
step sees two views of each.

`--precision bf16 --channels-last`: the forward and the loss under
torch.autocast("cpu", bfloat16) with channels_last activations and weights (PyTorch's fastest CPU
training setting: bf16 convolutions and matmuls through oneDNN, f32 master weights).

Prints one `key=value` line like the Rust bench: median step seconds, images/s and the
process's peak RSS (ru_maxrss, which is VmHWM).

    python bench/torch_step.py --model resnet18 --batch 64 --steps 2 --threads 2
"""
import argparse
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin, cout, k, s):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout))


class Basic(nn.Module):
    def __init__(self, cin, cout, s):
        super().__init__()
        self.c1, self.c2 = conv_bn(cin, cout, 3, s), conv_bn(cout, cout, 3, 1)
        self.down = conv_bn(cin, cout, 1, s) if (s != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        return F.relu(self.c2(F.relu(self.c1(x))) + self.down(x))


class Bottleneck(nn.Module):
    def __init__(self, cin, width, s):
        super().__init__()
        cout = 4 * width
        self.c1, self.c2, self.c3 = conv_bn(cin, width, 1, 1), conv_bn(width, width, 3, s), conv_bn(width, cout, 1, 1)
        self.down = conv_bn(cin, cout, 1, s) if (s != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        return F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))) + self.down(x))


def resnet(kind):
    if kind == "resnet18":
        layers = [nn.Sequential(conv_bn(3, 64, 3, 1), nn.ReLU())]
        cin = 64
        for i, (w, n) in enumerate(zip([64, 128, 256, 512], [2, 2, 2, 2])):
            for j in range(n):
                layers.append(Basic(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
    else:
        layers = [nn.Sequential(conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))]
        cin = 64
        for i, (w, n) in enumerate(zip([64, 128, 256, 512], [3, 4, 6, 3])):
            for j in range(n):
                layers.append(Bottleneck(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = 4 * w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(cin, cin), nn.ReLU(), nn.Linear(cin, 128))


def nt_xent(z, tau):
    z = F.normalize(z, dim=1)
    n2 = z.shape[0]
    logits = (z @ z.t()) / tau
    logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    target = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    return F.cross_entropy(logits, target)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50"])
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    size, tau = (32, 0.5) if a.model == "resnet18" else (224, 0.1)
    batch = a.batch or (256 if a.model == "resnet18" else 16)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    model = resnet(a.model).train().to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-6)
    x = (torch.rand(2 * batch, 3, size, size) - 0.5).contiguous(memory_format=fmt)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.precision == "bf16" else (
        lambda: torch.autocast("cpu", enabled=False))
    times = []
    for i in range(a.steps + 1):  # one untimed warm-up step
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = nt_xent(model(x).float(), tau)
        loss.backward()
        opt.step()
        if i > 0:
            times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    impl = f"pytorch-{torch.__version__.split('+')[0]}" + ("-bf16" if a.precision == "bf16" else "") + (
        "-cl" if a.channels_last else "")
    print(f"impl={impl} model={a.model} batch={batch} steps={a.steps} "
          f"step_s={med:.3f} min_s={times[0]:.3f} images_per_s={batch / med:.2f} peak_rss_mb={rss / 1e6:.0f}")


if __name__ == "__main__":
    main()
