"""``attention()`` and ``attention_probs()``: build the request, pick a backend, run it.

Validation and option resolution live in :mod:`selfattn.request` (below the backends);
this module adds what sits above them: the choice of backend, the empty cases, and the
observers of ``observe``.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from . import backends as _backends
from .backends import cpu as _cpu
from .backends import sdpa as _sdpa
from .masks import Geometry
from .request import acc_dtype, build_request, check_qkv, resolve_mask, resolve_scale
from .stats import AttentionStats

# kept for code that imported the old private names
_resolve_mask = resolve_mask

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


def _empty_stats(q, acc, sinks=None):
    # no keys: lse -inf (or the sink's logit: the sink is then the whole softmax), max -inf, entropy 0
    shape = q.shape[:-1]
    neg = torch.full(shape, float("-inf"), dtype=acc, device=q.device)
    lse = neg.clone() if sinks is None else sinks.detach().to(acc)[None, :, None].expand(shape).clone()
    return AttentionStats(lse, neg, torch.zeros(shape, dtype=acc, device=q.device))


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
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    return_stats: bool = False,
    backend: str = "auto",
    backend_options: dict | None = None,
):
    """Scaled dot-product attention: ``softmax(mask(softcap(Q K^T * scale))) V``.

    Exactly :func:`selfattn.reference.attention`, computed by the chosen backend.

    Args:
        query: (B, Hq, Lq, D).
        key: (B, Hkv, Lk, D). Hq must be a multiple of Hkv (grouped-query attention).
        value: (B, Hkv, Lk, Dv).
        mask: a :mod:`selfattn.masks` value, or a tensor broadcastable to (B, Hq, Lq, Lk):
            bool (True = may attend) or float (added to the scores).
        causal: add ``masks.causal()``: a query at position p sees keys at positions <= p
            (with the default positions, query i sees keys up to i + Lk - Lq).
        window: add ``masks.window(window)`` (an int ``left``) or ``masks.window(*window)``
            (a ``(left, right)`` pair; either side may be None = unbounded).
        scale: multiplies Q K^T; default 1/sqrt(D).
        softcap: if set to c, each scaled score s becomes c * tanh(s / c).
        q_positions, kv_positions: integer positions of the queries and keys, (L,) or (B, L);
            default ``arange(Lq) + Lk - Lq`` and ``arange(Lk)``. Causal and window masks and
            ALiBi read them: per-sequence alignment, left padding, cache offsets (see
            ``masks.varlen``, ``masks.left_padded``, ``masks.packed``).
        alibi_slopes: (Hq,) or (B, Hq) floats; each logit gets ``-slope * |q_pos - kv_pos|``
            after the scale and softcap (FlashAttention's convention), in float32. No gradient.
        sinks: (Hq,) logits of a per-head sink: each row's softmax denominator gains
            exp(sink) with a zero value vector (gpt-oss). Gets a gradient. With sinks, ``lse``
            includes the sink (a fully-masked row has lse = sink), ``max_logit`` is over keys
            only, and ``entropy`` is that of the keys-plus-sink distribution.
        dropout_p: probability of zeroing each attention weight (rest scaled by 1/(1-p)).
        generator: torch.Generator for dropout.
        return_stats: also return :class:`AttentionStats` (lse, max_logit, entropy), each
            (B, Hq, Lq), float32 (float64 for float64 inputs).
        backend: "auto" (the fastest capable one, or the one set by ``use_backend``) or a
            name from ``selfattn.backends.names()``. An explicit backend that cannot serve
            the request raises ``BackendUnavailable`` naming the missing feature.
        backend_options: options only one backend knows, e.g. ``{"deterministic": True,
            "num_splits": 2}`` for ``triton``; a backend that does not know one refuses.

    Returns:
        output (B, Hq, Lq, Dv) in the input dtype, or ``(output, stats)``.

    Fully-masked rows (no key allowed, including every row when Lk == 0): output 0,
    lse -inf, max_logit -inf, entropy 0, and zero gradients. Never NaN. Lq == 0 gives an
    empty output of shape (B, Hq, 0, Dv).

    Example:
        >>> q = k = v = torch.randn(1, 2, 5, 8)
        >>> out, stats = attention(q, k, v, causal=True, return_stats=True)
    """
    if (window is None and softcap is None and q_positions is None and kv_positions is None
            and alibi_slopes is None and sinks is None and generator is None and return_stats is False
            and backend_options is None and backend.__class__ is str and (causal is False or causal is True)
            and (dropout_p.__class__ is float or dropout_p.__class__ is int) and dropout_p == 0
            and (scale is None or scale.__class__ is float) and not torch.compiler.is_compiling()
            and not _OBSERVERS.get() and _backends.choose is _CHOOSE):
        # a plain call (or a decoding step under a mask): the short-call paths serve it when they can
        # (None: the general path below; it also runs while backends.choose is wrapped by someone who
        # wants to see every choice, as tests do)
        name = _backends._CURRENT.get() if backend == "auto" else backend
        out = None
        if name == "cpu" or name == "auto":
            if mask is None:
                out = _cpu.fast_forward(query, key, value, causal, scale, name == "auto")
                if out is None:  # (a call with gradients)
                    out = _cpu.fast_grad(query, key, value, causal, scale, name == "auto")
            else:
                out = _cpu.fast_masked(query, key, value, mask, causal, scale, name == "auto")
        elif name == "sdpa" and mask is None:
            out = _sdpa.fast_forward(query, key, value, causal, scale)
        if out is not None:
            return out
    observers = () if torch.compiler.is_compiling() else _OBSERVERS.get()  # compiled graphs are not observed
    req = build_request(
        query, key, value, mask=mask, causal=causal, window=window, scale=scale, softcap=softcap,
        q_positions=q_positions, kv_positions=kv_positions, alibi_slopes=alibi_slopes, sinks=sinks,
        dropout_p=dropout_p, generator=generator, return_stats=return_stats or bool(observers),
        backend=backend, backend_options=backend_options,
    )
    out, stats = run(query, key, value, req, backend)
    if observers:
        opts = {"mask": mask, "causal": causal, "window": window, "scale": scale, "softcap": softcap,
                "q_positions": q_positions, "kv_positions": kv_positions, "alibi_slopes": alibi_slopes, "sinks": sinks}
        for callback in observers:
            callback(query, key, value, opts, out, stats)
    return (out, stats) if return_stats else out


_CHOOSE = _backends.choose


def run(query, key, value, req, backend: str = "auto"):
    """Run a built :class:`~selfattn.request.Request` on ``backend`` (no observers): (out, stats or None)."""
    chosen = _backends.choose(backend, query, key, value, req)
    if req.kv_len == 0 or req.q_len == 0:
        out = _NoKeys.apply(query, key, value)
        if req.sinks is not None and req.sinks.requires_grad:
            out = out + 0.0 * req.sinks.sum()  # a zero gradient for the sinks, not None
        return out, _empty_stats(query, req.acc, req.sinks)
    return chosen.forward(query, key, value, req)


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
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention probabilities for chosen heads and rows, from the saved log-sum-exp.

    Pass the same query, key and mask/scale/softcap/positions/alibi/sinks arguments as the
    ``attention`` call that produced ``stats``. Memory is proportional to
    B x len(heads) x len(rows) x Lk.

    Args:
        query: (B, Hq, Lq, D); key: (B, Hkv, Lk, D).
        stats: the :class:`AttentionStats` returned with ``return_stats=True``.
        heads: query-head indices (default all); rows: query-row indices (default all).

    Returns:
        (B, len(heads), len(rows), Lk) probabilities (float32, float64 for float64 inputs);
        each row sums to 1 (1 - the sink's share with sinks), fully-masked rows are all 0.
    """
    req = build_request(query, key, key, mask=mask, causal=causal, window=window, scale=scale, softcap=softcap,
                        q_positions=q_positions, kv_positions=kv_positions, alibi_slopes=alibi_slopes, sinks=sinks,
                        requires_grad=False)
    if not isinstance(stats, AttentionStats):
        raise TypeError(f"stats must be the AttentionStats returned by attention(..., return_stats=True), got {type(stats).__name__}")
    B, Hq, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    if tuple(stats.lse.shape) != (B, Hq, Lq):
        raise ValueError(f"stats.lse has shape {tuple(stats.lse.shape)} but query implies (B, Hq, Lq) = ({B}, {Hq}, {Lq})")
    heads_t = _index("heads", heads, Hq, query.device)
    rows_t = _index("rows", rows, Lq, query.device)
    acc = req.acc

    q = query[:, heads_t][:, :, rows_t].to(acc)  # (B, h, r, D)
    k = key[:, heads_t // (Hq // Hkv)].to(acc)  # (B, h, Lk, D) the kv head of each chosen query head
    s = (q @ k.transpose(-2, -1)) * req.scale  # (B, h, r, Lk)
    if req.softcap is not None:
        s = req.softcap * torch.tanh(s / req.softcap)
    g = Geometry(B, Hq, Lq, Lk, req.q_positions, req.kv_positions, query.device)
    if req.alibi_slopes is not None:
        distance = (g.q_pos()[:, rows_t][:, None, :, None] - g.kv_pos()[:, None, None, :]).abs().to(acc)  # (B|1, 1, r, Lk)
        s = s - req.alibi_slopes.to(acc)[:, heads_t][:, :, None, None] * distance
    allowed = None
    if req.mask is not None:
        allowed = _select_heads(req.mask.allowed_in(g, rows_t), heads_t)  # (B|1, h|1, r, Lk)
        bias = req.mask.bias_in(g, rows_t)
        if bias is not None:
            s = s + _select_heads(bias, heads_t).to(acc)
    # the saved lse is a constant here (its own gradient, where a backend gives it one, is not used): the
    # normaliser's part of the gradient is put back below, the same for every backend
    lse = stats.lse.detach()[:, heads_t][:, :, rows_t].to(acc)[..., None]  # (B, h, r, 1)
    valid = torch.isfinite(lse)
    p = torch.exp(s - torch.where(valid, lse, torch.zeros_like(lse)))  # (B, h, r, Lk)
    p = torch.where(valid, p, torch.zeros_like(p))
    if allowed is not None:
        p = p.masked_fill(~allowed, 0.0)
    if req.sinks is None:
        # A row whose scores all sit near a float mask's finite minimum (transformers' masks,
        # torch.nn.MultiheadAttention's with finfo.min) cannot be normalised by its saved lse:
        # s + finfo.min rounds to finfo.min and so does finfo.min + log(Lk), so exp(s - lse) sums to
        # the number of keys (or to 0 where a kernel saturated the lse). Such rows, whose sum is off 1
        # by far more than rounding, take the softmax of their scores (uniform over their keys, as
        # torch's softmax gives); every other row keeps exp(s - lse).
        off = valid & ((p.sum(-1, keepdim=True) - 1).abs() > 1e-3)  # (B, h, r, 1)
        if torch.compiler.is_compiling() or bool(off.any()):
            ss = s if allowed is None else s.masked_fill(~allowed, float("-inf"))
            p = torch.where(off, torch.softmax(ss, dim=-1), p)
    sinks_t = None if req.sinks is None else req.sinks[heads_t].to(acc)[None, :, None, None]  # (1, h, 1, 1)
    if torch.is_grad_enabled() and (p.requires_grad or (sinks_t is not None and sinks_t.requires_grad)):
        # exp(s - lse) with lse constant leaves out the normaliser's part of the softmax's gradient,
        # dp_j/ds_i = -p_j p_i (and dp_j/d sink = -p_j p_sink). With T the row's total probability (sink
        # included, 1 in value), p - p.detach() (T - T.detach()) equals p and has the softmax's gradient
        total = p.sum(dim=-1, keepdim=True)  # (B, h, r, 1)
        if sinks_t is not None:
            share = torch.exp(sinks_t - torch.where(valid, lse, torch.zeros_like(lse)))  # the sink's probability
            total = total + torch.where(valid, share, torch.zeros_like(share))
        p = p - p.detach() * (total - total.detach())
    return p


def _select_heads(t, heads_t):
    # a (B|1, H|1, r, Lk) mask tensor at the chosen heads (a size-1 head dim broadcasts as it is)
    return t[:, heads_t] if t.shape[1] > 1 else t


def _index(name, idx, size, device):
    if idx is None:
        return torch.arange(size, device=device)
    if isinstance(idx, (str, bytes)) or not (isinstance(idx, (int, torch.Tensor)) or hasattr(idx, "__len__")):
        raise TypeError(f"{name} must be an int, a sequence of ints or an integer tensor, got {type(idx).__name__} ({idx!r})")
    try:
        t = torch.as_tensor(idx, device=device).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be an int, a sequence of ints or an integer tensor, got {idx!r}") from e
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be integer indices, got dtype {t.dtype}")
    t = t.long()
    if t.numel() and (int(t.min()) < -size or int(t.max()) >= size):
        raise ValueError(f"{name} indices must lie in [0, {size}), got {t.tolist()}")
    return t % size if t.numel() else t
