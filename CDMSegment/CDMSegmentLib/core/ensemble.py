"""Several trained CDM networks in one model file: a deep ensemble (Lakshminarayanan et al., NeurIPS 2017).

Networks trained alike but from different seeds err in different places: on the held-out phantoms two seeds
of one recipe differed by 0.2 in Dice on one lesion family and by 0.07 on another, each better somewhere
(README, "How much is the training seed?"). The CDM already averages its heatmap over noise draws (Hu et
al. 2023, Algorithm 1 run once per draw); an ensemble file lets draw d run through member d mod K, so K
members cost no more than K draws of one network: the same network evaluations per slice, each of one
member's size (GFLOP per evaluation unchanged).

``UNetEnsemble`` is itself a network with the ConditionalUNet interface, for the code that needs one eps
(the OOD score): ``class_embedding(y)`` is the members' f(y) side by side, (B, K E), and ``forward`` averages
the members' eps, each member taking its own slice of the embedding, so the CDM's interpolation
tau f(y1) + (1 - tau) f(y0) reaches every member as its own.
"""

from typing import List

import torch
from torch import nn


class UNetEnsemble(nn.Module):
    """K ConditionalUNets of one design. eps(x_t (B, C, H, W), t (B,), class_emb (B, K E)) -> (B, C, H, W), the
    members' mean; class_embedding(y (B,)) -> (B, K E)."""

    def __init__(self, members: List[nn.Module]):
        super().__init__()
        widths = {int(m.emb_dim) for m in members}
        if len(members) < 2 or len(widths) != 1:
            raise ValueError("an ensemble needs two or more networks with one embedding width")
        self.members = nn.ModuleList(members)
        self.emb_dim = widths.pop()

    @torch.jit.export
    def class_embedding(self, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.class_embedding(y) for m in self.members], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        parts = torch.split(class_emb, self.emb_dim, dim=1)
        eps = torch.zeros_like(x)
        for i, member in enumerate(self.members):
            eps = eps + member(x, t, parts[i])
        return eps / len(self.members)


def ensemble_members(network) -> list:
    """The networks the CDM's noise draws take turns on: an ensemble's members (TorchScript, eager, or as the
    ONNX engine holds them), else [network]."""
    members = getattr(network, "members", None)
    if members is None:
        return [network]
    return list(members.children()) if hasattr(members, "children") else list(members)
