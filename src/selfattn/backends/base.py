"""What a backend receives and what it must provide."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import Mask
from ..stats import AttentionStats


@dataclass(frozen=True)
class Request:
    """One validated attention call, with every option resolved."""

    mask: Mask | None  # combined mask (None = every pair may attend)
    scale: float  # multiplies QK^T; 1/sqrt(D) unless given
    softcap: float | None  # c in c*tanh(s/c), or None
    dropout_p: float  # probability of zeroing each attention weight
    generator: torch.Generator | None  # RNG for dropout, or None for the global one
    return_stats: bool  # also return AttentionStats
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_dim: int
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool  # some input requires grad: the backend must support backward

    @property
    def mask_kinds(self) -> frozenset:
        return frozenset() if self.mask is None else self.mask.kinds


class BackendUnavailable(RuntimeError):
    """An explicitly chosen backend cannot serve this request."""


class Backend:
    """A way to compute attention. Subclasses fill in the class attributes and two methods."""

    name: str = ""
    summary: str = ""  # one line for the backend table
    features: dict = {}  # feature -> short description of support, for `selfattn backends`

    def unsupported(self, q, k, v, req: Request) -> str | None:
        """None if this backend can serve the request, else the name of the missing feature."""
        return None

    def rank(self, req: Request) -> float:
        """Lower is faster; ``auto`` picks the lowest-ranked backend that can serve the request."""
        return 100.0

    def forward(self, q, k, v, req: Request) -> tuple[torch.Tensor, AttentionStats | None]:
        raise NotImplementedError
