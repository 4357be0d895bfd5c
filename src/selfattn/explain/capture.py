"""Record every ``selfattn.attention`` call a model makes, with the layer that made it.

Layers call :func:`selfattn.attention` on the queries, keys and values they built (after
projections, rotary embeddings, QK-norm); that call is where attention happens, so it is what
``selfattn explain --checkpoint`` shows. While :func:`capture_attention` is active, the name
``attention`` in every loaded ``selfattn`` module is replaced by a wrapper that asks for the
statistics, records the call and returns what the caller asked for, unchanged.
"""

from __future__ import annotations

import sys
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
    original = _functional.attention

    def recording(query, key, value, *, return_stats=False, **kw):
        out, stats = original(query, key, value, return_stats=True, **kw)
        opts = {k: kw.get(k) for k in ("mask", "causal", "window", "scale", "softcap")}
        opts["causal"] = bool(opts["causal"])
        layer, kind = stack[-1] if stack else ("", type(model).__name__ if model is not None else "")
        calls.append(AttentionCall(layer, kind, query.detach(), key.detach(), value.detach(), opts, out.detach(), stats))
        return (out, stats) if return_stats else out

    hooks = []
    if model is not None:
        for name, mod in model.named_modules():
            if type(mod).__name__ in _ATTENTION_CLASSES:
                hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: _push(stack, (n, type(m).__name__))))
                hooks.append(mod.register_forward_hook(lambda m, a, o: _pop(stack)))
    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("selfattn") and not name.startswith("selfattn.explain") and getattr(m, "attention", None) is original]
    for m in patched:
        m.attention = recording
    try:
        yield calls
    finally:
        for m in patched:
            m.attention = original
        for h in hooks:
            h.remove()
