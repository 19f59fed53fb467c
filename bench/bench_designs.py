"""The compact network's design table: GFLOP per evaluation, parameters, and training speed of each candidate
UNet design against the bundled model's (base 32, attention at level 3, 128 px), measured in one process.

GFLOP per evaluation sets the seconds per volume (a 155-slice volume at the model's defaults is
155 x evaluations per slice x GFLOP); training samples per second set the hours of a CPU training run.
Training steps (forward, backward, AdamW; fp32, batch 16) are timed in alternation, round after round,
so a busy machine slows every design alike, and each design's median is given as a ratio to the
bundled design's.

    python bench/bench_designs.py [--rounds 3] [--no-timing]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CDMSegment"))

from CDMSegmentLib.core.unet import ConditionalUNet, UNetConfig  # noqa: E402

# name: (UNet settings, slice size in px)
DESIGNS = {
    "bundled: base 32, attention, 128 px": (dict(base_channels=32, attention_levels=(3,)), 128),
    "base 24, attention, 128 px": (dict(base_channels=24, attention_levels=(3,)), 128),
    "base 24, no attention, 96 px": (dict(base_channels=24, attention_levels=()), 96),
    "base 16, attention, 128 px": (dict(base_channels=16, attention_levels=(3,)), 128),
    "base 16, no attention, 128 px": (dict(base_channels=16, attention_levels=()), 128),
    "base 16, attention, 96 px": (dict(base_channels=16, attention_levels=(3,)), 96),
    "base 16, no attention, 96 px": (dict(base_channels=16, attention_levels=()), 96),
    "base 16, 3 levels (1,2,4), 96 px": (dict(base_channels=16, channel_mults=(1, 2, 4), attention_levels=(2,)), 96),
}
BATCH = 16


def build(settings: dict) -> ConditionalUNet:
    torch.manual_seed(0)
    return ConditionalUNet(UNetConfig(**settings))


def gflop_per_evaluation(net: ConditionalUNet, size: int) -> float:
    x, t, y = torch.zeros(1, 1, size, size), torch.tensor([300]), torch.tensor([1])
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        net(x, t, net.class_embedding(y))
    return flops.get_total_flops() / 1e9


def training_step(net: ConditionalUNet, opt: torch.optim.Optimizer, size: int) -> float:
    """Seconds of one step of BATCH samples."""
    x, t, y = torch.randn(BATCH, 1, size, size), torch.randint(0, 600, (BATCH,)), torch.randint(0, 2, (BATCH,))
    start = time.perf_counter()
    loss = (net(x, t, net.class_embedding(y)) - x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-timing", action="store_true", help="GFLOP and parameters only")
    args = parser.parse_args()
    nets = {name: build(s) for name, (s, _) in DESIGNS.items()}
    opts = {name: torch.optim.AdamW(net.parameters(), 1e-4) for name, net in nets.items()}
    times = {name: [] for name in DESIGNS}
    if not args.no_timing:
        for name in DESIGNS:  # warm-up
            training_step(nets[name], opts[name], DESIGNS[name][1])
        for _ in range(args.rounds):
            for name in DESIGNS:
                times[name].append(training_step(nets[name], opts[name], DESIGNS[name][1]))
    bundled = next(iter(DESIGNS))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, training batch {BATCH}, fp32\n")
    print("| design | GFLOP per evaluation | parameters (M) | training samples/s | x the bundled design |")
    print("|---|---|---|---|---|")
    for name, net in nets.items():
        gflop = gflop_per_evaluation(net, DESIGNS[name][1])
        params = sum(p.numel() for p in net.parameters()) / 1e6
        if times[name]:
            rate = BATCH / statistics.median(times[name])
            ratio = statistics.median(times[bundled]) / statistics.median(times[name])
            print(f"| {name} | {gflop:.2f} | {params:.2f} | {rate:.1f} | {ratio:.1f} |")
        else:
            print(f"| {name} | {gflop:.2f} | {params:.2f} | - | - |")


if __name__ == "__main__":
    main()
