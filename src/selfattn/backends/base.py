"""What a backend receives and what it must provide."""

from __future__ import annotations

import dataclasses
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


ALL_MASK_KINDS = frozenset({"causal", "window", "padding", "documents", "dense_bool", "dense_float"})
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class Capabilities:
    """What a backend serves, as data. ``unsupported()`` is the code; this is its table, which
    tests hold the code to: a request inside the table must be served (tests/_oracle.py)."""

    dtypes: frozenset = FLOAT_DTYPES  # torch dtypes of q, k, v
    devices: frozenset = frozenset({"cpu", "cuda"})  # device types
    interpreted_devices: frozenset = frozenset()  # device types served only under Triton's interpreter (TRITON_INTERPRET=1 before triton's import)
    mask_kinds: frozenset = ALL_MASK_KINDS  # Mask.kinds that may appear in a request
    stats: bool = True  # return_stats=True
    softcap: bool = True
    dropout: bool = True  # dropout_p > 0 drawing from the global RNG
    generator: bool = True  # dropout with an explicit torch.Generator
    backward: bool = True  # gradients for query, key and value
    float_mask_grad: bool = True  # gradient for a dense float mask that requires grad
    max_head_dim: int | None = None  # largest head_dim and v_dim (None: any)
    nonfinite_inputs: bool = True  # False: may refuse NaN/Inf in query/key (the refusal names them)
    requires: tuple = ()  # modules that must be importable ("numba", "triton")

    def replace(self, **changes) -> "Capabilities":
        """These capabilities with some fields changed (a backend's table: the default but ...)."""
        return dataclasses.replace(self, **changes)


class Backend:
    """A way to compute attention. Subclasses fill in the class attributes and two methods."""

    name: str = ""
    summary: str = ""  # one line for the backend table
    features: dict = {}  # feature -> short description of support, for `selfattn backends`
    capabilities: Capabilities = Capabilities()  # the same support as data (every feature by default)

    def unsupported(self, q, k, v, req: Request) -> str | None:
        """None if this backend can serve the request, else the name of the missing feature."""
        return None

    def rank(self, req: Request) -> float:
        """Lower is faster; ``auto`` picks the lowest-ranked backend that can serve the request."""
        return 100.0

    def forward(self, q, k, v, req: Request) -> tuple[torch.Tensor, AttentionStats | None]:
        raise NotImplementedError
