"""``attention()`` and ``attention_probs()``: validate, resolve masks, pick a backend."""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers

import torch

from . import backends as _backends
from . import masks as _masks
from .backends.base import Request
from .stats import AttentionStats

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# callbacks that see every attention() call made in this context (selfattn.explain records heads this way)
_OBSERVERS: contextvars.ContextVar[tuple] = contextvars.ContextVar("selfattn_observers", default=())


@contextlib.contextmanager
def observe(callback):
    """While active, ``callback(query, key, value, options, output, stats)`` runs after every
    ``attention()`` call in this context; statistics are computed for it even when the caller
    did not ask for them. ``options`` holds the call's mask, causal, window, scale and softcap.
    """
    token = _OBSERVERS.set(_OBSERVERS.get() + (callback,))
    try:
        yield
    finally:
        _OBSERVERS.reset(token)


def _shape(t) -> tuple:
    return tuple(t.shape)


def _check_qkv(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (batch, heads, seq, head_dim), got shape {_shape(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got dtype {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    B, Hq, Lq, D = query.shape
    Bk, Hkv, Lk, Dk = key.shape
    Bv, Hv, Lv, Dv = value.shape
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


def _resolve_mask(mask, causal, window):
    parts = []
    if mask is not None:
        if isinstance(mask, torch.Tensor):
            mask = _masks.dense(mask)
        if not isinstance(mask, _masks.Mask):
            raise TypeError(f"mask must be a selfattn.masks.Mask or a torch.Tensor, got {type(mask).__name__}")
        parts.append(mask)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} ({causal!r})")
    if causal:
        parts.append(_masks.causal())
    if window is not None:
        if isinstance(window, tuple):
            if len(window) != 2:
                raise ValueError(f"window must be an int or a (left, right) pair, got {window!r}")
            parts.append(_masks.window(*window))
        else:
            parts.append(_masks.window(window))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else _masks.And(*parts)


def _resolve_scale(scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _check_options(softcap, dropout_p, generator, return_stats, backend):
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            raise TypeError(f"softcap must be a positive number or None, got {type(softcap).__name__}")
        if not (softcap > 0 and math.isfinite(softcap)):
            raise ValueError(f"softcap must be > 0 and finite, got {softcap}")
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
    if backend != "auto":
        _backends.get(backend)  # unknown names raise here


class _NoKeys(torch.autograd.Function):
    # Lk == 0: every row is fully masked, so the output is 0 and every gradient is 0
    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return q.new_zeros(q.shape[:-1] + (v.shape[-1],))

    @staticmethod
    def backward(ctx, g):
        q, k, v = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _empty_stats(q, acc):
    shape = q.shape[:-1]
    neg = torch.full(shape, float("-inf"), dtype=acc, device=q.device)
    return AttentionStats(neg, neg.clone(), torch.zeros(shape, dtype=acc, device=q.device))


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    mask=None,
    causal: bool = False,
    window=None,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    return_stats: bool = False,
    backend: str = "auto",
):
    """Scaled dot-product attention: ``softmax(mask(softcap(Q K^T * scale))) V``.

    Exactly :func:`selfattn.reference.attention`, computed by the chosen backend.

    Args:
        query: (B, Hq, Lq, D).
        key: (B, Hkv, Lk, D). Hq must be a multiple of Hkv (grouped-query attention).
        value: (B, Hkv, Lk, Dv).
        mask: a :mod:`selfattn.masks` value, or a tensor broadcastable to (B, Hq, Lq, Lk):
            bool (True = may attend) or float (added to the scores).
        causal: add ``masks.causal()`` -- bottom-right aligned: query i sees keys up to
            i + Lk - Lq.
        window: add ``masks.window(window)`` (an int ``left``) or ``masks.window(*window)``
            (a ``(left, right)`` pair).
        scale: multiplies Q K^T; default 1/sqrt(D).
        softcap: if set to c, each scaled score s becomes c * tanh(s / c).
        dropout_p: probability of zeroing each attention weight (rest scaled by 1/(1-p)).
        generator: torch.Generator for dropout.
        return_stats: also return :class:`AttentionStats` (lse, max_logit, entropy), each
            (B, Hq, Lq), float32 (float64 for float64 inputs).
        backend: "auto" (the fastest capable one, or the one set by ``use_backend``) or a
            name from ``selfattn.backends.names()``. An explicit backend that cannot serve
            the request raises ``BackendUnavailable`` naming the missing feature.

    Returns:
        output (B, Hq, Lq, Dv) in the input dtype, or ``(output, stats)``.

    Fully-masked rows (no key allowed, including every row when Lk == 0): output 0,
    lse -inf, max_logit -inf, entropy 0, and zero gradients. Never NaN. Lq == 0 gives an
    empty output of shape (B, Hq, 0, Dv).

    Example:
        >>> q = k = v = torch.randn(1, 2, 5, 8)
        >>> out, stats = attention(q, k, v, causal=True, return_stats=True)
    """
    _check_qkv(query, key, value)
    _check_options(softcap, dropout_p, generator, return_stats, backend)
    observers = () if torch.compiler.is_compiling() else _OBSERVERS.get()  # compiled graphs are not observed
    m = _resolve_mask(mask, causal, window)
    B, Hq, Lq, D = query.shape
    Hkv, Lk, Dv = key.shape[1], key.shape[2], value.shape[3]
    if m is not None:
        m.check(B, Hq, Lq, Lk, query.device)
    req = Request(
        mask=m, scale=_resolve_scale(scale, D), softcap=None if softcap is None else float(softcap),
        dropout_p=float(dropout_p), generator=generator, return_stats=return_stats or bool(observers),
        batch=B, q_heads=Hq, kv_heads=Hkv, q_len=Lq, kv_len=Lk, head_dim=D, v_dim=Dv,
        dtype=query.dtype, device=query.device,
        requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)),
    )
    chosen = _backends.choose(backend, query, key, value, req)
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    if Lk == 0 or Lq == 0:
        out, stats = _NoKeys.apply(query, key, value), _empty_stats(query, acc)
    else:
        out, stats = chosen.forward(query, key, value, req)
    if observers:
        opts = {"mask": mask, "causal": causal, "window": window, "scale": scale, "softcap": softcap}
        for callback in observers:
            callback(query, key, value, opts, out, stats)
    return (out, stats) if return_stats else out


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    stats: AttentionStats,
    *,
    heads=None,
    rows=None,
    mask=None,
    causal: bool = False,
    window=None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Exact attention probabilities for chosen heads and rows, from the saved log-sum-exp.

    Pass the same query, key and mask/scale/softcap arguments as the ``attention`` call
    that produced ``stats``. Memory is proportional to B x len(heads) x len(rows) x Lk.

    Args:
        query: (B, Hq, Lq, D); key: (B, Hkv, Lk, D).
        stats: the :class:`AttentionStats` returned with ``return_stats=True``.
        heads: query-head indices (default all); rows: query-row indices (default all).

    Returns:
        (B, len(heads), len(rows), Lk) probabilities (float32, float64 for float64 inputs);
        each row sums to 1, fully-masked rows are all 0.
    """
    _check_qkv(query, key, key)
    if not isinstance(stats, AttentionStats):
        raise TypeError(f"stats must be the AttentionStats returned by attention(..., return_stats=True), got {type(stats).__name__}")
    B, Hq, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    if tuple(stats.lse.shape) != (B, Hq, Lq):
        raise ValueError(f"stats.lse has shape {tuple(stats.lse.shape)} but query implies (B, Hq, Lq) = ({B}, {Hq}, {Lq})")
    heads_t = _index("heads", heads, Hq, query.device)
    rows_t = _index("rows", rows, Lq, query.device)
    m = _resolve_mask(mask, causal, window)
    if m is not None:
        m.check(B, Hq, Lq, Lk, query.device)
    scale = _resolve_scale(scale, D)
    _check_options(softcap, 0.0, None, False, "auto")
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32

    q = query[:, heads_t][:, :, rows_t].to(acc)  # (B, h, r, D)
    k = key[:, heads_t // (Hq // Hkv)].to(acc)  # (B, h, Lk, D) the kv head of each chosen query head
    s = (q @ k.transpose(-2, -1)) * scale  # (B, h, r, Lk)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    allowed = None
    if m is not None:
        allowed = m.allowed(Lq, Lk, rows=rows_t, device=query.device)  # (B|1, H|1, r, Lk)
        bias = m.bias(Lq, Lk, rows=rows_t, device=query.device)
        if allowed.shape[1] > 1:
            allowed = allowed[:, heads_t]
            bias = None if bias is None else bias[:, heads_t]
        if bias is not None:
            s = s + bias.to(acc)
    lse = stats.lse[:, heads_t][:, :, rows_t].to(acc)[..., None]  # (B, h, r, 1)
    valid = torch.isfinite(lse)
    p = torch.exp(s - torch.where(valid, lse, torch.zeros_like(lse)))  # (B, h, r, Lk)
    p = torch.where(valid, p, torch.zeros_like(p))
    if allowed is not None:
        p = p.masked_fill(~allowed, 0.0)
    return p


def _index(name, idx, size, device):
    if idx is None:
        return torch.arange(size, device=device)
    t = torch.as_tensor(idx, device=device).reshape(-1)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name} must be integer indices, got dtype {t.dtype}")
    t = t.long()
    if t.numel() and (int(t.min()) < -size or int(t.max()) >= size):
        raise ValueError(f"{name} indices must lie in [0, {size}), got {t.tolist()}")
    return t % size if t.numel() else t
