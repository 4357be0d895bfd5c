"""One attention call, validated and resolved: the :class:`Request` every backend receives.

Everything a caller can get wrong is checked here, once, before any backend runs:
the tensors (shapes, dtypes, devices), the mask and its sizes, the scale, positions, ALiBi
slopes, sinks and the options. ``selfattn.attention``, ``selfattn.attention_probs``, the
layers, the explain tool and every backend-specific entry point build their requests with
:func:`build_request`, so the rules below are written once.

This module sits below the backends (they import it; it imports only masks and torch).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from . import masks as _masks
from .masks import Geometry, Mask

__all__ = [
    "Request",
    "build_request",
    "resolve_mask",
    "resolve_scale",
    "acc_dtype",
    "check_qkv",
    "FLOAT_DTYPES",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    q_positions: torch.Tensor | None = None  # int64 (B|1, Lq), or None for arange(Lq) + Lk - Lq
    kv_positions: torch.Tensor | None = None  # int64 (B|1, Lk), or None for arange(Lk)
    alibi_slopes: torch.Tensor | None = None  # float32 (B|1, Hq): logit -= slope * |q_pos - kv_pos|
    sinks: torch.Tensor | None = None  # (Hq,) logits added to each row's softmax denominator
    backend_options: dict = field(default_factory=dict)  # options only one backend knows (see backends/)

    @property
    def mask_kinds(self) -> frozenset:
        return frozenset() if self.mask is None else self.mask.kinds

    @property
    def features(self) -> frozenset:
        """Mask kinds plus the other optional features this call uses (backends refuse by these names)."""
        f = set(self.mask_kinds)
        if self.q_positions is not None or self.kv_positions is not None:
            f.add("positions")
        if self.alibi_slopes is not None:
            f.add("alibi")
        if self.sinks is not None:
            f.add("sinks")
        if self.softcap is not None:
            f.add("softcap")
        if self.dropout_p > 0:
            f.add("dropout")
        if self.return_stats:
            f.add("stats")
        return frozenset(f)

    @property
    def acc(self) -> torch.dtype:
        return acc_dtype(self.dtype)

    @property
    def geometry(self) -> Geometry:
        """Sizes and positions, as masks take them."""
        return Geometry(self.batch, self.q_heads, self.q_len, self.kv_len, self.q_positions, self.kv_positions, self.device)


# -- the checks -----------------------------------------------------------------------------------


def _shape(t) -> tuple:
    return tuple(t.shape)


def check_qkv(query, key, value) -> None:
    """Types, dims, dtypes, devices and matching sizes of query (B, Hq, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (batch, heads, seq, head_dim), got shape {_shape(t)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got dtype {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    B, Hq, Lq, D = query.shape
    Bk, Hkv, Lk, Dk = key.shape
    Bv, Hv, Lv, Dv = value.shape
    # the common case costs no message: each check below builds its text only when it fails
    if B == Bk == Bv and Hkv == Hv and Lk == Lv and D == Dk and D and Dv and Hkv and Hq % Hkv == 0:
        return
    shapes = f"query {_shape(query)}, key {_shape(key)}, value {_shape(value)}"
    if not (B == Bk == Bv):
        raise ValueError(f"query, key and value must have the same batch size, got {shapes}")
    if Hkv != Hv:
        raise ValueError(f"key and value must have the same number of heads, got {shapes}")
    if Lk != Lv:
        raise ValueError(f"key and value must have the same sequence length, got {shapes}")
    if D != Dk:
        raise ValueError(f"query and key must have the same head_dim, got {shapes}")
    if D == 0 or Dv == 0:
        raise ValueError(f"head_dim must be at least 1, got {shapes}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for grouped-query attention, got {shapes}")


def resolve_mask(mask, causal=False, window=None) -> Mask | None:
    """Combine ``mask``, ``causal`` and ``window`` into one :class:`~selfattn.masks.Mask` (or None).

    ``mask`` may be a Mask or a tensor (taken as ``masks.dense``); ``window`` an int ``left`` or a
    ``(left, right)`` pair whose sides may be None (unbounded).
    """
    parts = []
    if mask is not None:
        if isinstance(mask, torch.Tensor):
            mask = _masks.dense(mask)
        if isinstance(mask, _masks.Layout):
            raise TypeError("mask: got a masks layout (mask, q_positions and kv_positions together); "
                            "pass it as attention(q, k, v, **layout), or its mask alone as mask=layout.mask")
        if not isinstance(mask, Mask):
            raise TypeError(f"mask must be a selfattn.masks.Mask or a torch.Tensor, got {type(mask).__name__}")
        parts.append(mask)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} ({causal!r})")
    if causal:
        parts.append(_masks.causal())
    if window is not None:
        if isinstance(window, (tuple, list)):  # (left, right), as FlashAttention's window_size pair
            if len(window) != 2:
                raise ValueError(f"window must be an int or a (left, right) pair, got {window!r}")
            left, right = window
        else:
            left, right = window, 0
        if left is None and right is None and not causal:
            raise ValueError("window: (None, None) bounds nothing; pass causal=True or give a left or right bound")
        if not (left is None and right is None):
            parts.append(_masks.window(left, right))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else _masks.And(*parts)


def resolve_scale(scale, head_dim: int) -> float:
    """``scale`` as a float: 1/sqrt(head_dim) when None."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _check_softcap(softcap):
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a positive number or None, got {type(softcap).__name__}")
    if not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be > 0 and finite, got {softcap}")
    return float(softcap)


def _check_options(dropout_p, generator, return_stats, backend, backend_options):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a number in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend_options is not None:
        if not isinstance(backend_options, dict) or not all(isinstance(k, str) for k in backend_options):
            raise TypeError(f"backend_options must be a dict of str -> value, got {type(backend_options).__name__}")


def _positions(name, pos, batch, length, device):
    # int tensor (L,) or (B, L) -> int64 (1|B, L) on the inputs' device
    if pos is None:
        return None
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor of shape (L,) or (B, L), got {type(pos).__name__}")
    if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {pos.dtype}")
    shape = tuple(pos.shape)
    if pos.dim() == 1:
        pos = pos[None]
    if pos.dim() != 2 or pos.shape[1] != length or pos.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have shape ({length},) or ({batch}, {length}), got {shape}")
    if pos.device != device:
        raise ValueError(f"{name} is on device {pos.device} but query is on {device}")
    return pos.to(torch.int64)


def _per_head(name, t, batch, heads, device, allow_batch):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a float torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
    shapes = f"({heads},) or ({batch}, {heads})" if allow_batch else f"({heads},)"
    ok = (t.dim() == 1 and t.shape[0] == heads) or (allow_batch and t.dim() == 2 and tuple(t.shape) == (batch, heads))
    if not ok:
        raise ValueError(f"{name} must have shape {shapes} (one per query head), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on device {t.device} but query is on {device}")
    return t


def build_request(
    query, key, value, *, mask=None, causal=False, window=None, scale=None, softcap=None,
    q_positions=None, kv_positions=None, alibi_slopes=None, sinks=None,
    dropout_p=0.0, generator=None, return_stats=False, backend="auto", backend_options=None,
    requires_grad=None,
) -> Request:
    """Validate one call and resolve every option into a :class:`Request`.

    Raises TypeError/ValueError naming the argument and the shapes or values seen.
    """
    check_qkv(query, key, value)
    softcap = _check_softcap(softcap)
    _check_options(dropout_p, generator, return_stats, backend, backend_options)
    m = resolve_mask(mask, causal, window)
    B, Hq, Lq, D = query.shape
    Hkv, Lk, Dv = key.shape[1], key.shape[2], value.shape[3]
    device = query.device
    if m is not None:
        m.check(B, Hq, Lq, Lk, device)
    qp = _positions("q_positions", q_positions, B, Lq, device)
    kp = _positions("kv_positions", kv_positions, B, Lk, device)
    slopes = _per_head("alibi_slopes", alibi_slopes, B, Hq, device, allow_batch=True)
    if slopes is not None:
        # (B|1, Hq) float32, detached: the slopes get no gradient on any backend (FlashAttention's rule)
        slopes = (slopes if slopes.dim() == 2 else slopes[None]).detach().to(torch.float32)
    sinks = _per_head("sinks", sinks, B, Hq, device, allow_batch=False)
    if requires_grad is None:
        requires_grad = torch.is_grad_enabled() and (
            query.requires_grad or key.requires_grad or value.requires_grad or (sinks is not None and sinks.requires_grad))
    return _new_request(
        mask=m, scale=resolve_scale(scale, D), softcap=softcap,
        dropout_p=float(dropout_p), generator=generator, return_stats=return_stats,
        batch=B, q_heads=Hq, kv_heads=Hkv, q_len=Lq, kv_len=Lk, head_dim=D, v_dim=Dv,
        dtype=query.dtype, device=device, requires_grad=requires_grad,
        q_positions=qp, kv_positions=kp, alibi_slopes=slopes, sinks=sinks,
        backend_options=dict(backend_options) if backend_options else {},
    )


def _new_request(**fields) -> Request:
    # Request(**fields) without the frozen dataclass's __init__, which sets each of its 21 fields
    # through object.__setattr__ (~6 us of a short call's budget). build_request passes every field,
    # already checked; the object is the same frozen Request.
    req = object.__new__(Request)
    req.__dict__.update(fields)
    return req
