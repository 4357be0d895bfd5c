"""Record every ``selfattn.attention`` call a model makes, with the layer that made it.

Layers call :func:`selfattn.attention` on the queries, keys and values they built (after
projections, rotary embeddings, QK-norm); that call is where attention happens, so it is what
``selfattn explain --checkpoint`` shows. While :func:`capture_attention` is active, an observer
registered with ``selfattn.functional.observe`` records each call (the library computes the
statistics for it); callers get exactly what they asked for.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .. import functional as _functional

_ATTENTION_CLASSES = ("SelfAttention", "MultiHeadAttention")


@dataclass
class AttentionCall:
    layer: str  # qualified module name of the attention layer ("" for the model itself)
    kind: str  # its class name
    query: torch.Tensor  # (B, Hq, Lq, D) as passed to attention()
    key: torch.Tensor  # (B, Hkv, Lk, D)
    value: torch.Tensor  # (B, Hkv, Lk, Dv)
    options: dict  # mask, causal, window, scale, softcap as passed
    output: torch.Tensor  # (B, Hq, Lq, Dv)
    stats: object  # AttentionStats, each (B, Hq, Lq)


def _push(stack, item) -> None:
    stack.append(item)  # a hook must return None, or it would replace the module's input/output


def _pop(stack) -> None:
    stack.pop()


@contextmanager
def capture_attention(model: nn.Module | None = None):
    """Yield a list that fills with one :class:`AttentionCall` per attention() call made inside."""
    calls: list = []
    stack: list = []

    def record(query, key, value, opts, out, stats):
        layer, kind = stack[-1] if stack else ("", type(model).__name__ if model is not None else "")
        opts = dict(opts, causal=bool(opts["causal"]))
        calls.append(AttentionCall(layer, kind, query.detach(), key.detach(), value.detach(), opts, out.detach(), stats))

    hooks = []
    if model is not None:
        for name, mod in model.named_modules():
            if type(mod).__name__ in _ATTENTION_CLASSES:
                hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: _push(stack, (n, type(m).__name__))))
                hooks.append(mod.register_forward_hook(lambda m, a, o: _pop(stack)))
    try:
        with _functional.observe(record):
            yield calls
    finally:
        for h in hooks:
            h.remove()
