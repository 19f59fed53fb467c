"""Held-out figures measured at every checkpoint of a training run, so its log says more than the loss.

The loss of a conditional diffusion model says how well it denoises, not whether it uses the
label: a network can reach a low loss and ignore y entirely (measured here on a small network
trained only on low noise levels). So at each checkpoint the EMA network is run on a fixed set
of held-out slices with masks, at a few noise levels inside the training band, and we report

- the class difference ``|eps(x_t, t, f(y0)) - eps(x_t, t, f(y1))|`` averaged inside lesions and
  outside them (in the brain): a network that uses the label shows a clear ratio;
- the voxel AUROC of the one-step CDM map ``eps(y0) - eps(y1)`` (summed over channels), which is
  the heatmap of Hu et al. Algorithm 1 with R = 1 and tau = 0 up to a positive factor.
"""

from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..core.errors import CDMSegmentError
from ..core.schedule import NoiseSchedule
from ..data.slicesets import SliceDataset

CONTENT = -1 + 1e-3  # [-1, 1] slices: background is -1


def monitor_slices(data: SliceDataset, lesion_slices: int = 48, healthy_slices: int = 16, seed: int = 0) -> SliceDataset:
    """A fixed subset of held-out slices with masks: lesion slices (20+ mask pixels) and lesion-free slices with
    brain in them, drawn once by ``seed``. Raises CDMSegmentError without masks or without lesion slices."""
    if data.masks is None:
        raise CDMSegmentError("the held-out slice set has no masks; make it with 'cdmsegment slices --with-masks'")
    x = data.as_float()
    lesion = torch.nonzero(data.masks.flatten(1).sum(1) >= 20).flatten()
    healthy = torch.nonzero((data.labels == 0) & ((x > CONTENT).flatten(1).float().mean(1) > 0.2)).flatten()
    if len(lesion) == 0:
        raise CDMSegmentError("the held-out slice set has no lesion slices to measure the class difference on")
    g = torch.Generator().manual_seed(seed)
    pick = torch.cat([lesion[torch.randperm(len(lesion), generator=g)[:lesion_slices]],
                      healthy[torch.randperm(len(healthy), generator=g)[:healthy_slices]]])
    return SliceDataset(x[pick], data.labels[pick], [data.case_ids[i] for i in pick.tolist()],
                        data.slice_index[pick], meta=data.meta, masks=data.masks[pick], storage="float16")


class HeldOutMonitor:
    """Callable for ``train_network``'s ``on_checkpoint``: measures the EMA network on held-out slices.

    levels: alpha_bar values (each mapped to its t in ``schedule``), all inside the training band.
    Returns one log line, e.g. ``"alpha_bar 0.8: AUROC 0.812, class difference in/out 0.0412/0.0031"``, and
    the same figures as numbers for ``progress.jsonl``: ``{"alpha_bar 0.8": {"auroc": 0.812,
    "class_difference_inside": 0.0412, "class_difference_outside": 0.0031}}``.
    """

    def __init__(self, data: SliceDataset, schedule: NoiseSchedule, levels: Sequence[float] = (0.8, 0.5),
                 target_class: int = 1, normal_class: int = 0, batch_size: int = 16, seed: int = 0):
        self.x_0 = data.as_float()
        self.masks = data.masks.numpy()
        self.content = (self.x_0 > CONTENT).any(dim=1).numpy()
        self.schedule = schedule
        self.timesteps = [schedule.timestep_for_alpha_bar(a) for a in levels]
        self.levels = list(levels)
        self.classes = (target_class, normal_class)
        self.batch_size = batch_size
        self.eps = torch.randn(self.x_0.shape, generator=torch.Generator().manual_seed(seed))
        self.history: List[dict] = []

    @torch.no_grad()
    def class_difference(self, network: torch.nn.Module, t: int) -> np.ndarray:
        """(N, H, W): eps(x_t, t, f(y0)) - eps(x_t, t, f(y1)) summed over channels, for every monitored slice."""
        out = []
        device = next(network.parameters(), torch.zeros(())).device  # a parameter-free network: the CPU
        f1, f0 = (network.class_embedding(torch.tensor([c], device=device)) for c in self.classes)
        for start in range(0, len(self.x_0), self.batch_size):
            x_0, eps = self.x_0[start:start + self.batch_size], self.eps[start:start + self.batch_size]
            b = len(x_0)
            tt = torch.full((2 * b,), t, dtype=torch.long)
            x_t = self.schedule.q_sample(x_0, tt[:b], eps).float().to(device)
            pred = network(torch.cat([x_t, x_t]), tt.to(device), torch.cat([f0.expand(b, -1), f1.expand(b, -1)]))
            out.append((pred[:b] - pred[b:]).sum(dim=1).float().cpu())
        return torch.cat(out).numpy()

    def measure(self, network: torch.nn.Module) -> dict:
        """{alpha_bar: {"auroc", "inside", "outside"}} for the network as it is (AUROC: scikit-learn's)."""
        from sklearn.metrics import roc_auc_score
        network.eval()
        figures = {}
        for level, t in zip(self.levels, self.timesteps):
            diff = self.class_difference(network, t)
            outside = self.content & ~self.masks
            figures[level] = {"auroc": float(roc_auc_score(self.masks[self.content], diff[self.content])),
                              "inside": float(np.abs(diff[self.masks]).mean()),
                              "outside": float(np.abs(diff[outside]).mean())}
        return figures

    def __call__(self, step: int, network: torch.nn.Module, mean_loss: float) -> Tuple[str, dict]:
        figures = self.measure(network)
        self.history.append({"step": step, **{str(k): v for k, v in figures.items()}})
        line = "; ".join(f"alpha_bar {level:g}: AUROC {f['auroc']:.3f}, class difference in/out "
                         f"{f['inside']:.4f}/{f['outside']:.4f}" for level, f in figures.items())
        return line, {f"alpha_bar {level:g}": {"auroc": round(f["auroc"], 4),
                                               "class_difference_inside": round(f["inside"], 5),
                                               "class_difference_outside": round(f["outside"], 5)}
                      for level, f in figures.items()}
