"""PyTorch reference for `bench/gpu.sh`: SimCLR, GIM and LoCo training steps of ResNet-50 at
224x224 on a CUDA GPU, eager mode, bf16 autocast, channels_last -- the settings a PyTorch user
would pick. The models are bench/torch_step.py's (no torchvision needed); decoders are the
2-layer MLP (hidden = feature width, out 128) of the SimCLR experiments, NT-Xent tau 0.1, AdamW.

- simclr: one decoder after res5.
- gim: a decoder after every stage, every stage input detached.
- loco: decoders after res3, res4, res5; unit k = two adjacent stages. As in the paper's code, the
  stage shared by two units is run twice: once on its lower unit's input, once on a detached
  copy for the upper unit (locograph runs every forward once and only doubles that backward).

Prints one `key=value` line: median step seconds, images/s and torch's peak allocated memory.

    python bench/torch_gpu_step.py --method loco --batch 256 --steps 10
"""
import argparse
import time

import torch
import torch.nn as nn

from torch_step import Bottleneck, conv_bn, nt_xent


def stages():
    """stem+res2 .. res5 of ResNet-50 (v1.5) as a list, and each one's output channels."""
    out = [nn.Sequential(conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))]
    cin, widths = 64, []
    for i, (w, n) in enumerate(zip([64, 128, 256, 512], [3, 4, 6, 3])):
        blocks = []
        for j in range(n):
            blocks.append(Bottleneck(cin, w, 2 if (j == 0 and i > 0) else 1))
            cin = 4 * w
        out.append(nn.Sequential(*blocks))
        widths.append(cin)
    # The stem has no loss of its own: fold it into res2 as locograph's graphs do (stem -> res2).
    return nn.ModuleList([nn.Sequential(out[0], out[1])] + out[2:]), widths


def decoder(c):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, 128))


class Net(nn.Module):
    def __init__(self, method):
        super().__init__()
        self.method = method
        self.stages, widths = stages()
        at = {"simclr": [3], "gim": [0, 1, 2, 3], "loco": [1, 2, 3]}[method]
        self.at = at
        self.decoders = nn.ModuleList(decoder(widths[k]) for k in at)

    def losses(self, x, tau):
        s = self.stages
        if self.method == "simclr":
            h = x
            for st in s:
                h = st(h)
            return [nt_xent(self.decoders[0](h).float(), tau)]
        if self.method == "gim":
            out, h = [], x
            for k, st in enumerate(s):
                h = st(h.detach() if k > 0 else h)
                out.append(nt_xent(self.decoders[k](h).float(), tau))
            return out
        # loco: L1 <- res2+res3, L2 <- res3+res4, L3 <- res4+res5
        a2 = s[0](x)
        a3 = s[1](a2)
        b3 = s[1](a2.detach())
        b4 = s[2](b3)
        c4 = s[2](b3.detach())
        c5 = s[3](c4)
        return [nt_xent(d(h).float(), tau) for d, h in zip(self.decoders, [a3, b4, c5])]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="simclr", choices=["simclr", "gim", "loco"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--precision", default="bf16", choices=["bf16", "f32"])
    a = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    net = Net(a.method).to(dev).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-6)
    x = (torch.rand(2 * a.batch, 3, 224, 224, device=dev) - 0.5).to(memory_format=torch.channels_last)
    times = []
    for i in range(a.steps + 2):  # two untimed warm-up steps (cuDNN autotuning, allocator)
        torch.cuda.synchronize()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            losses = net.losses(x, 0.1)
        sum(losses).backward()
        opt.step()
        torch.cuda.synchronize()
        if i > 1:
            times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 1e6
    print(f"impl=pytorch-{torch.__version__} method={a.method} precision={a.precision} batch={a.batch} "
          f"steps={a.steps} step_s={med:.4f} images_per_s={a.batch / med:.1f} torch_peak_mb={peak:.0f} "
          f"device={torch.cuda.get_device_name().replace(' ', '_')}")


if __name__ == "__main__":
    main()
