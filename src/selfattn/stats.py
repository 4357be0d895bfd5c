"""Per-row attention statistics returned by ``attention(..., return_stats=True)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionStats:
    """Statistics of each query row's attention distribution, each of shape (B, Hq, Lq).

    A fully-masked row has lse = -inf, max_logit = -inf and entropy = 0.
    """

    lse: torch.Tensor  # natural log of the softmax denominator: log sum_j exp(logit_ij)
    max_logit: torch.Tensor  # largest logit (scaled, softcapped, biased score) among allowed keys
    entropy: torch.Tensor  # -sum_j p_ij log p_ij, in nats

    def detach(self) -> "AttentionStats":
        return AttentionStats(self.lse.detach(), self.max_logit.detach(), self.entropy.detach())

    def to(self, *args, **kwargs) -> "AttentionStats":
        return AttentionStats(self.lse.to(*args, **kwargs), self.max_logit.to(*args, **kwargs), self.entropy.to(*args, **kwargs))
