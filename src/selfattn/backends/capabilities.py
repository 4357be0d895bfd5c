"""What a backend serves, as data: each backend's feature table (``Backend.capabilities``).

``Backend.unsupported()`` is the code that refuses a request; this is the table it answers to.
Tests read the table with the environment (installed modules, device, Triton's interpreter) and
require every request inside it to be served and every one outside it to be refused by name
(tests/_oracle.py), so a backend that starts refusing what it claims, or serving what it does
not claim, fails the suite. The table says nothing about speed: that is ``rank()``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

ALL_MASK_KINDS = frozenset({"causal", "window", "padding", "key_padding", "documents", "dense_bool", "dense_float", "function"})
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class Capabilities:
    """One backend's support. The defaults are "everything" (the reference and math backends)."""

    dtypes: frozenset = FLOAT_DTYPES  # torch dtypes of query, key and value
    devices: frozenset = frozenset({"cpu", "cuda"})  # device types
    interpreted_devices: frozenset = frozenset()  # device types served only under Triton's interpreter (TRITON_INTERPRET=1 before triton's import)
    mask_kinds: frozenset = ALL_MASK_KINDS  # Mask.kinds a request may combine
    stats: bool = True  # return_stats=True
    softcap: bool = True
    dropout: bool = True  # dropout_p > 0, drawing from the global RNG
    generator: bool = True  # dropout with an explicit torch.Generator
    positions: bool = True  # q_positions / kv_positions
    alibi: bool = True  # alibi_slopes
    sinks: bool = True
    backward: bool = True  # gradients for query, key and value
    no_backward: frozenset = frozenset()  # (device type, dtype) pairs whose gradients are refused
    float_mask_grad: bool = True  # a gradient for a dense float mask that requires grad
    masked_nonpositive_scale: bool = True  # scale <= 0 together with a mask or ALiBi
    max_head_dim: int | None = None  # largest head_dim and v_dim (None: any)
    nonfinite_inputs: bool = True  # False: may refuse NaN/Inf in query or key (the refusal says so)
    requires: tuple = ()  # modules that must be importable ("numba", "triton")

    def replace(self, **changes) -> "Capabilities":
        """These capabilities with some fields changed (a backend's table: the default, but ...)."""
        return dataclasses.replace(self, **changes)
