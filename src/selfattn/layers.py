"""Layers to train: the notes' single-head ``SelfAttention``, ``MultiHeadAttention``, ``KVCache``.

Both layers compute attention with :func:`selfattn.attention`, so every backend, mask and
statistic of the core is available to them, and attention weights come from
:func:`selfattn.attention_probs` (the saved log-sum-exp), never from a second slow pass.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import masks as _masks
from .functional import attention, attention_probs
from .request import FLOAT_DTYPES as _FLOAT_DTYPES
from .request import acc_dtype as _acc_dtype
from .stats import AttentionStats

__all__ = ["SelfAttention", "MultiHeadAttention", "KVCache"]


def _shape(t) -> tuple:
    return tuple(t.shape)


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_input(name: str, x, width: int, width_name: str, param: torch.Tensor, ranks=(3,)) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ranks:
        want = " or ".join({2: "(L, E)", 3: "(B, L, E)"}.get(r, f"{r}-D") for r in ranks)
        raise ValueError(f"{name} must have shape {want}, got shape {_shape(x)}")
    if x.shape[-1] != width:
        raise ValueError(f"{name} has width {x.shape[-1]} (shape {_shape(x)}) but the layer expects {width_name}={width}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype != param.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the layer's parameters are {param.dtype}; convert one with .to()")
    if x.device != param.device:
        raise ValueError(f"{name} is on {x.device} but the layer's parameters are on {param.device}")


# -- helpers: rotary position embeddings and RMS normalisation ------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., D/2) each
    return torch.cat((-x2, x1), dim=-1)  # (..., D)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos and sin tables (L, head_dim), or (B, 1, L, head_dim) for per-batch positions (B, L),
    for the rotate-half convention.

    Pair (i, i + D/2) rotates by the angle ``position * base ** (-2i / D)``.
    """
    acc = _acc_dtype(dtype)
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=acc, device=positions.device) / head_dim)  # (D/2,)
    angles = positions.to(acc)[..., None] * inv_freq  # (L, D/2) or (B, L, D/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, L, D/2): broadcasts over heads
    angles = torch.cat((angles, angles), dim=-1)  # (L, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, L, D) by the tables from :func:`rope_cos_sin` (L, D)."""
    return x * cos + rotate_half(x) * sin  # (B, H, L, D)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension; computed in float32 for fp16/bf16."""

    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))  # (dim,) learnable scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(_acc_dtype(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., dim)
        return xf.to(x.dtype) * self.weight


# -- mask conversion -----------------------------------------------------------------------


def _combine(*parts):
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else _masks.And(*parts)


def _key_padding_to_mask(kpm, batch: int, lk: int):
    # torch.nn.MultiheadAttention convention: bool True = ignore this key; float = added to the scores
    if kpm is None:
        return None
    if not isinstance(kpm, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor of shape (B, Lk), got {type(kpm).__name__}")
    if kpm.dtype != torch.bool and not kpm.dtype.is_floating_point:
        raise TypeError(f"key_padding_mask must be bool (True = ignore the key) or floating point (added to the scores), got dtype {kpm.dtype}")
    if _shape(kpm) != (batch, lk):
        raise ValueError(f"key_padding_mask must have shape (B, Lk) = ({batch}, {lk}), got shape {_shape(kpm)}")
    if kpm.dtype == torch.bool:
        return _masks.key_padding(~kpm)  # (B, Lk) True = a real key: fused kernels skip padded tiles
    return _masks.dense(kpm[:, None, None, :])  # (B, 1, 1, Lk) added to the scores


def _attn_mask_to_mask(attn_mask, batch: int, heads: int, lq: int, lk: int):
    # tensors follow torch.nn.MultiheadAttention (bool True = NOT allowed); Mask values follow selfattn
    if attn_mask is None or isinstance(attn_mask, _masks.Mask):
        return attn_mask
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or a selfattn.masks.Mask, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask must be bool (True = not allowed, as in torch.nn.MultiheadAttention) or floating point (added to the scores), got dtype {attn_mask.dtype}")
    if attn_mask.dim() == 2 and _shape(attn_mask) == (lq, lk):
        t = attn_mask  # (Lq, Lk)
    elif attn_mask.dim() == 3 and _shape(attn_mask) == (batch * heads, lq, lk):
        t = attn_mask.reshape(batch, heads, lq, lk)  # (B, H, Lq, Lk)
    else:
        raise ValueError(f"attn_mask must have shape (Lq, Lk) = ({lq}, {lk}) or (B * num_heads, Lq, Lk) = ({batch * heads}, {lq}, {lk}), got shape {_shape(attn_mask)}")
    return _masks.dense(~t if t.dtype == torch.bool else t)


def _weights(q, k, stats, opts: dict, heads_avg: bool):
    # probabilities from the saved log-sum-exp; detached: they are for looking, not for training
    with torch.no_grad():
        w = attention_probs(q.detach(), k.detach(), stats, **opts)  # (B, H, Lq, Lk)
    return w.mean(dim=1) if heads_avg else w


# -- the notes' layer ----------------------------------------------------------------------


class SelfAttention(nn.Module):
    """One attention head, exactly as the notes build it.

    ``x`` (B, L, embed_dim) -> ``Q = x W_Q``, ``K = x W_K``, ``V = x W_V`` -> softmax(Q K^T / sqrt(d_k)) V.

    Parameters are stored in the notes' layout, so ``x @ W`` is the projection:
    ``W_Q``, ``W_K`` are (embed_dim, qk_dim) and ``W_V`` is (embed_dim, v_dim); with
    ``bias=True`` also ``b_Q``, ``b_K`` (qk_dim,) and ``b_V`` (v_dim,). The width of ``W_V``
    sets the width of the output, as the notes say.

    Args:
        embed_dim: width E of the input embeddings.
        qk_dim: width d_k of queries and keys (default embed_dim).
        v_dim: width of values and of the output (default embed_dim).
        bias: add a learned bias to Q, K and V.
        init: "default" (uniform in +-1/sqrt(embed_dim), as nn.Linear; biases zero) or
            "identity" (W_Q = W_K = W_V = I, the notes' worked example; needs
            qk_dim == v_dim == embed_dim).

    Example (the notes' "The cat sat", d_k = 4):
        >>> layer = SelfAttention(4, init="identity")
        >>> x = torch.tensor([[1., 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1]])  # The, cat, sat
        >>> out, weights = layer(x, need_weights=True)  # (3, 4), (3, 3)
    """

    def __init__(self, embed_dim: int, qk_dim: int | None = None, v_dim: int | None = None, *,
                 bias: bool = False, init: str = "default", device=None, dtype=None):
        super().__init__()
        self.embed_dim = _check_int("embed_dim", embed_dim)
        self.qk_dim = embed_dim if qk_dim is None else _check_int("qk_dim", qk_dim)
        self.v_dim = embed_dim if v_dim is None else _check_int("v_dim", v_dim)
        if init not in ("default", "identity"):
            raise ValueError(f"init must be 'default' or 'identity', got {init!r}")
        if init == "identity" and not (self.qk_dim == self.v_dim == self.embed_dim):
            raise ValueError(f"init='identity' needs qk_dim == v_dim == embed_dim, got embed_dim={self.embed_dim}, qk_dim={self.qk_dim}, v_dim={self.v_dim}")
        kw = dict(device=device, dtype=dtype)
        E, Dk, Dv = self.embed_dim, self.qk_dim, self.v_dim
        self.W_Q = nn.Parameter(torch.empty(E, Dk, **kw))  # (E, d_k)
        self.W_K = nn.Parameter(torch.empty(E, Dk, **kw))  # (E, d_k)
        self.W_V = nn.Parameter(torch.empty(E, Dv, **kw))  # (E, d_v)
        if bias:
            self.b_Q = nn.Parameter(torch.zeros(Dk, **kw))
            self.b_K = nn.Parameter(torch.zeros(Dk, **kw))
            self.b_V = nn.Parameter(torch.zeros(Dv, **kw))
        else:
            self.register_parameter("b_Q", None)
            self.register_parameter("b_K", None)
            self.register_parameter("b_V", None)
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for w in (self.W_Q, self.W_K, self.W_V):
                if self.init == "identity":
                    w.copy_(torch.eye(self.embed_dim, dtype=w.dtype, device=w.device))
                else:
                    bound = 1.0 / math.sqrt(self.embed_dim)
                    w.uniform_(-bound, bound)
            for b in (self.b_Q, self.b_K, self.b_V):
                if b is not None:
                    b.zero_()

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, bias={self.b_Q is not None}, init={self.init!r}"

    def forward(self, x: torch.Tensor, *, mask=None, causal: bool = False, window=None,
                scale: float | None = None, softcap: float | None = None,
                return_stats: bool = False, need_weights: bool = False, backend: str = "auto"):
        """Contextual embeddings of ``x``.

        Args:
            x: (B, L, embed_dim), or (L, embed_dim) for one unbatched sequence.
            mask, causal, window, scale, softcap, backend: as in :func:`selfattn.attention`
                (mask in selfattn's convention: bool True = may attend). A tensor mask may also
                be (B, L, L), the shape of the weights: the layer adds its one head axis.
            return_stats: also return :class:`AttentionStats`, each (B, 1, L).
            need_weights: also return the attention weights (B, L, L), computed by
                :func:`selfattn.attention_probs` from the saved statistics (detached, float32
                or float64; fully-masked rows are 0). Needs a backend that returns stats.

        Returns:
            out (B, L, v_dim); with need_weights ``(out, weights)``; with return_stats
            ``(out, stats)``; with both ``(out, weights, stats)``. Unbatched input drops the
            leading batch dimension of every returned tensor.
        """
        _check_input("x", x, self.embed_dim, "embed_dim", self.W_Q, ranks=(2, 3))
        for name, flag in (("need_weights", need_weights), ("return_stats", return_stats)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} ({flag!r})")
        unbatched = x.dim() == 2
        if unbatched:
            x = x[None]  # (1, L, E)
        q = x @ self.W_Q  # (B, L, d_k)
        k = x @ self.W_K  # (B, L, d_k)
        v = x @ self.W_V  # (B, L, d_v) the width of W_V sets the width of the output
        if self.b_Q is not None:
            q, k, v = q + self.b_Q, k + self.b_K, v + self.b_V
        q, k, v = q[:, None], k[:, None], v[:, None]  # (B, 1, L, d) one head
        if isinstance(mask, torch.Tensor) and mask.dim() == 3:
            B, L = x.shape[0], x.shape[1]
            try:
                ok = torch.broadcast_shapes(mask.shape, (B, L, L)) == (B, L, L)
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"mask: shape {_shape(mask)} does not broadcast to the weights' (B, L, L) = ({B}, {L}, {L})")
            mask = mask[:, None]  # (B, 1, L, L): one head
        opts = dict(mask=mask, causal=causal, window=window, scale=scale, softcap=softcap)
        want_stats = return_stats or need_weights
        res = attention(q, k, v, **opts, return_stats=want_stats, backend=backend)
        out, stats = res if want_stats else (res, None)
        out = out[:, 0]  # (B, L, d_v)
        extra = []
        if need_weights:
            w = _weights(q, k, stats, opts, heads_avg=False)[:, 0]  # (B, L, L)
            extra.append(w[0] if unbatched else w)
        if return_stats:
            extra.append(AttentionStats(stats.lse[0], stats.max_logit[0], stats.entropy[0]) if unbatched else stats)
        if unbatched:
            out = out[0]  # (L, d_v)
        return (out, *extra) if extra else out


# -- KV cache ------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values of one attention layer, for incremental decoding.

    Holds ``k`` (batch_size, num_kv_heads, capacity, head_dim) and ``v`` (..., v_dim), plus for
    every slot its position and whether it holds a real token (``positions``, ``keep``: each
    (batch_size, capacity)); the first ``len(cache)`` slots are in use. Sequences of a batch may
    hold different numbers of real tokens (a left-padded prompt): ``lengths`` counts them, and
    new tokens continue each sequence's positions from there. Pass the cache to
    ``MultiHeadAttention(..., kv_cache=cache)`` with ``causal=True``: a prompt (prefill) followed
    by single tokens gives the outputs of one causal forward over the whole sequence. The cache
    stores values only (no autograd history): under autograd, a call's own new keys and values
    carry their gradient and the cached past is a constant.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, capacity: int, head_dim: int,
                 v_dim: int | None = None, *, dtype: torch.dtype = torch.float32, device=None):
        self.batch_size = _check_int("batch_size", batch_size)
        self.num_kv_heads = _check_int("num_kv_heads", num_kv_heads)
        self.capacity = _check_int("capacity", capacity)
        self.head_dim = _check_int("head_dim", head_dim)
        self.v_dim = head_dim if v_dim is None else _check_int("v_dim", v_dim)
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.k = torch.zeros(batch_size, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)  # (B, Hkv, C, D)
        self.v = torch.zeros(batch_size, num_kv_heads, capacity, self.v_dim, dtype=dtype, device=device)  # (B, Hkv, C, Dv)
        self.pos = torch.zeros(batch_size, capacity, dtype=torch.int64, device=device)  # (B, C) position of each slot
        self.real = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)  # (B, C) slot holds a real token
        self.length = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (f"KVCache(batch_size={self.batch_size}, num_kv_heads={self.num_kv_heads}, length={self.length}, "
                f"capacity={self.capacity}, head_dim={self.head_dim}, v_dim={self.v_dim}, dtype={self.dtype})")

    def reset(self) -> None:
        """Forget every position (the buffers are kept)."""
        self.length = 0

    @property
    def keys(self) -> torch.Tensor:
        return self.k[:, :, : self.length]  # (B, Hkv, len, D)

    @property
    def values(self) -> torch.Tensor:
        return self.v[:, :, : self.length]  # (B, Hkv, len, Dv)

    @property
    def positions(self) -> torch.Tensor:
        """(B, len) position of every slot in use."""
        return self.pos[:, : self.length]

    @property
    def keep(self) -> torch.Tensor:
        """(B, len) True where a slot holds a real token (False: padding)."""
        return self.real[:, : self.length]

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) real tokens per sequence."""
        return self.keep.sum(dim=1)

    def next_positions(self, n: int) -> torch.Tensor:
        """(B, n) positions of the next ``n`` tokens of each sequence: after its last real token."""
        last = torch.where(self.keep, self.positions, torch.full_like(self.positions, -1)).amax(dim=1) if self.length else \
            torch.full((self.batch_size,), -1, dtype=torch.int64, device=self.device)
        return last[:, None] + 1 + torch.arange(n, device=self.device)[None]

    def append(self, key: torch.Tensor, value: torch.Tensor, *, positions=None, keep=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key`` (B, Hkv, L, D) and ``value`` (B, Hkv, L, Dv); return all valid keys and values.

        ``positions`` (B, L) or (L,) default to :meth:`next_positions`; ``keep`` (B, L) bool marks
        real tokens (default all).
        """
        for name, t, width in (("key", key, self.head_dim), ("value", value, self.v_dim)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"KVCache.append: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"KVCache.append: {name} must be (batch, kv_heads, seq, dim), got shape {_shape(t)}")
            if t.shape[0] != self.batch_size:
                raise ValueError(f"kv_cache: {name} has batch size {t.shape[0]} (shape {_shape(t)}) but the cache was built for batch_size={self.batch_size}")
            if t.shape[1] != self.num_kv_heads or t.shape[3] != width:
                raise ValueError(f"kv_cache: {name} has shape {_shape(t)} but the cache holds (batch_size, num_kv_heads, *, dim) = ({self.batch_size}, {self.num_kv_heads}, *, {width})")
            if t.dtype != self.dtype:
                raise TypeError(f"kv_cache: {name} has dtype {t.dtype} but the cache holds {self.dtype}")
            if t.device != self.device:
                raise ValueError(f"kv_cache: {name} is on {t.device} but the cache is on {self.device}")
        if key.shape[2] != value.shape[2]:
            raise ValueError(f"KVCache.append: key and value must have the same length, got shapes {_shape(key)} and {_shape(value)}")
        n = key.shape[2]
        if self.length + n > self.capacity:
            raise ValueError(f"kv_cache: appending {n} positions to a cache holding {self.length} exceeds its capacity={self.capacity}; build a larger KVCache or reset() it")
        pos = self.next_positions(n) if positions is None else _batch_rows("positions", positions, self.batch_size, n, self.device)
        real = torch.ones(self.batch_size, n, dtype=torch.bool, device=self.device) if keep is None else \
            _batch_rows("keep", keep, self.batch_size, n, self.device, torch.bool)
        sl = slice(self.length, self.length + n)
        self.k[:, :, sl] = key.detach()
        self.v[:, :, sl] = value.detach()
        self.pos[:, sl] = pos
        self.real[:, sl] = real
        self.length += n
        return self.keys, self.values


def _batch_rows(name, t, batch, n, device, dtype=None):
    # (n,) or (B, n) -> (B, n): integer positions, or a bool mask when dtype is bool
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype == torch.bool and t.dtype != torch.bool:
        raise TypeError(f"{name} must be bool, got dtype {t.dtype}")
    if dtype is None and (t.dtype.is_floating_point or t.dtype == torch.bool):
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    seen = tuple(t.shape)
    t = t[None] if t.dim() == 1 else t
    if t.dim() != 2 or t.shape[1] != n or t.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have shape ({n},) or ({batch}, {n}), got shape {seen}")
    return t.to(device).expand(batch, n) if dtype == torch.bool else t.to(device, torch.int64).expand(batch, n)


# -- multi-head attention ------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """Multi-head attention with grouped-query heads, rotary embeddings, QK-norm and a KV cache.

    ``query`` is projected to ``num_heads`` heads of ``head_dim = embed_dim // num_heads``;
    ``key``/``value`` to ``num_kv_heads`` heads (grouped-query attention when fewer);
    heads are concatenated and passed through ``out_proj``. Parameters: ``q_proj``
    (embed_dim -> embed_dim), ``k_proj`` (kdim -> num_kv_heads*head_dim), ``v_proj`` (vdim ->
    num_kv_heads*head_dim), ``out_proj`` (embed_dim -> embed_dim), all ``nn.Linear``; with
    ``qk_norm=True`` also ``q_norm``/``k_norm`` (learnable scale of width head_dim).

    Args:
        embed_dim: model width E; must be divisible by num_heads.
        num_heads: query heads.
        num_kv_heads: key/value heads (default num_heads); num_heads must be a multiple.
        bias: biases on all four projections.
        dropout: attention-weight dropout probability, applied only in training mode.
        rope: rotary position embeddings on queries and keys, rotate-half convention: pair
            (i, i + head_dim/2) turns by ``position * rope_base ** (-2i / head_dim)``.
            Positions count from 0, offset by the cache length when decoding. head_dim must be even.
        rope_base: the RoPE base (default 10000.0).
        qk_norm: RMS-normalise each query and key head (eps 1e-6) before RoPE, with a
            learnable per-dimension scale.
        kdim, vdim: widths of ``key``/``value`` inputs (default embed_dim), as in torch.
        batch_first: inputs and output are (B, L, E) if True, else (L, B, E).

    Differences from ``torch.nn.MultiheadAttention``: ``need_weights`` defaults to False and
    the return value is ``out`` alone unless weights or stats are asked for; fully-masked
    query rows give output 0 and weights 0 instead of NaN.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: int | None = None,
                 bias: bool = True, dropout: float = 0.0, rope: bool = False, rope_base: float = 10000.0,
                 qk_norm: bool = False, kdim: int | None = None, vdim: int | None = None,
                 batch_first: bool = True, device=None, dtype=None):
        super().__init__()
        _check_int("embed_dim", embed_dim)
        _check_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else _check_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}) for grouped-query attention")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        if rope and self.head_dim % 2:
            raise ValueError(f"rope=True needs an even head_dim, got head_dim = embed_dim // num_heads = {embed_dim} // {num_heads} = {self.head_dim}")
        if not (isinstance(rope_base, (int, float)) and not isinstance(rope_base, bool) and rope_base > 1):
            raise ValueError(f"rope_base must be a number > 1, got {rope_base!r}")
        self.kdim = embed_dim if kdim is None else _check_int("kdim", kdim)
        self.vdim = embed_dim if vdim is None else _check_int("vdim", vdim)
        self.dropout = float(dropout)
        self.rope, self.rope_base, self.qk_norm = bool(rope), float(rope_base), bool(qk_norm)
        self.batch_first = bool(batch_first)
        kw = dict(device=device, dtype=dtype)
        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, kv_width, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, kv_width, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, **kw)
            self.k_norm = RMSNorm(self.head_dim, **kw)
        else:
            self.q_norm = self.k_norm = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # as torch.nn.MultiheadAttention: xavier-uniform input projections, zero biases
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, dropout={self.dropout}, rope={self.rope}, qk_norm={self.qk_norm}, "
                f"batch_first={self.batch_first}")

    def _unbatched(self, query, key, value, key_padding_mask, kw):
        # one unbatched sequence, as torch.nn.MultiheadAttention takes it: query (Lq, E), key/value
        # (Lk, kdim/vdim), key_padding_mask (Lk,); run as a batch of one, the results without its axis
        for name, t in (("key", key), ("value", value)):
            if isinstance(t, torch.Tensor) and t.dim() != 2:
                raise ValueError(f"query is one unbatched sequence, shape {_shape(query)}, so {name} must be 2-D too "
                                 f"(L, features), got shape {_shape(t)}")
        if isinstance(key_padding_mask, torch.Tensor):
            if key_padding_mask.dim() != 1:
                raise ValueError(f"key_padding_mask must have shape (Lk,) for an unbatched query of shape {_shape(query)}, "
                                 f"got shape {_shape(key_padding_mask)}")
            key_padding_mask = key_padding_mask[None]
        axis = 0 if self.batch_first else 1
        q1 = query.unsqueeze(axis)
        k1 = q1 if key is query else (key.unsqueeze(axis) if isinstance(key, torch.Tensor) else key)
        v1 = q1 if value is query else k1 if value is key else (value.unsqueeze(axis) if isinstance(value, torch.Tensor) else value)
        res = self.forward(q1, k1, v1, key_padding_mask=key_padding_mask, **kw)
        if not isinstance(res, tuple):
            return res.squeeze(axis)
        out, *extra = res
        extra = [AttentionStats(x.lse[0], x.max_logit[0], x.entropy[0]) if isinstance(x, AttentionStats) else x[0] for x in extra]
        return (out.squeeze(axis), *extra)

    def _heads(self, x, proj, heads):
        B, L, _ = x.shape
        return proj(x).view(B, L, heads, self.head_dim).transpose(1, 2)  # (B, heads, L, head_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, attn_mask=None, causal: bool = False, window=None,
                need_weights: bool = False, average_attn_weights: bool = True, return_stats: bool = False,
                kv_cache: KVCache | None = None, positions: torch.Tensor | None = None, backend: str = "auto"):
        """Attend from ``query`` to ``key``/``value`` (self-attention when ``key`` is None).

        Args:
            query: (B, Lq, E) if batch_first else (Lq, B, E); or (Lq, E), one unbatched sequence (as
                torch.nn.MultiheadAttention takes it): then key/value are (Lk, kdim/vdim),
                key_padding_mask (Lk,), and the results have no batch axis.
            key: (B, Lk, kdim) or None (self-attention: key = value = query).
            value: (B, Lk, vdim), or None to use ``key``.
            key_padding_mask: (B, Lk), torch.nn.MultiheadAttention's convention: bool True =
                ignore this key; float = added to the scores. With a cache, Lk counts the
                cached positions too, and the cache remembers the new keys' padding (True, or
                -inf in a float mask) for later calls; finite float entries apply to this call.
            attn_mask: a tensor in torch.nn.MultiheadAttention's convention -- (Lq, Lk) or
                (B * num_heads, Lq, Lk), bool True = NOT allowed (the opposite of SDPA and of
                selfattn), float added to the scores -- or a :mod:`selfattn.masks` value, which
                keeps selfattn's meaning.
            causal: bottom-right aligned causal mask (query i sees keys up to i + Lk - Lq).
            window: sliding window, as in :func:`selfattn.attention`.
            need_weights: also return attention weights (B, Lq, Lk), averaged over heads if
                ``average_attn_weights`` else (B, num_heads, Lq, Lk). They come from
                :func:`selfattn.attention_probs` and the saved log-sum-exp (the output still
                comes from the chosen fast backend, which must return stats); they are
                detached, float32 (float64 for float64 inputs), taken before dropout, and
                0 on fully-masked rows.
            return_stats: also return :class:`AttentionStats`, each (B, num_heads, Lq).
            kv_cache: a :class:`KVCache`; the new keys/values are appended and the query
                attends to every cached position. Positions continue each sequence from its
                last real token; padded slots (key_padding_mask True or -inf) stay masked.
            positions: integer positions of the query tokens, (Lq,) or per sequence (B, Lq)
                (and of the keys too in self-attention): they drive RoPE and the causal and
                window masks (see :func:`selfattn.attention`). Default: 0, 1, ... (after the
                cache's last position with a cache). For a left-padded batch pass
                ``masks.left_padded(...)``'s positions, or let ``key_padding_mask`` mark the
                padding and keep the defaults (RoPE and masks depend only on differences).
            backend: as in :func:`selfattn.attention`.

        Returns:
            out in the layout of ``query``; with need_weights ``(out, weights)``; with
            return_stats ``(out, stats)``; with both ``(out, weights, stats)``.
        """
        if isinstance(query, torch.Tensor) and query.dim() not in (2, 3):
            layout = "(B, L, E)" if self.batch_first else "(L, B, E) with batch_first=False"
            raise ValueError(f"query must have shape {layout}, or (L, E) for one unbatched sequence, got shape {_shape(query)}")
        if isinstance(query, torch.Tensor) and query.dim() == 2:
            return self._unbatched(query, key, value, key_padding_mask, dict(
                attn_mask=attn_mask, causal=causal, window=window, need_weights=need_weights,
                average_attn_weights=average_attn_weights, return_stats=return_stats, kv_cache=kv_cache,
                positions=positions, backend=backend))
        p = self.q_proj.weight
        same_key = key is query  # m(x, x, x) is self-attention in either layout (the transposes below make new views)
        if not self.batch_first:
            for name, t in (("query", query), ("key", key), ("value", value)):
                if isinstance(t, torch.Tensor) and t.dim() != 3:
                    raise ValueError(f"{name} must have shape (L, B, E) with batch_first=False (query {_shape(query)} is batched), "
                                     f"got shape {_shape(t)}")
            query = query.transpose(0, 1) if isinstance(query, torch.Tensor) else query
            key = key.transpose(0, 1) if isinstance(key, torch.Tensor) else key
            value = value.transpose(0, 1) if isinstance(value, torch.Tensor) else value
        _check_input("query", query, self.embed_dim, "embed_dim", p)
        if key is None:
            if value is not None:
                raise ValueError("value was given without key; pass key too (key=None means self-attention)")
            if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
                raise ValueError(f"key=None (self-attention) needs kdim == vdim == embed_dim, got kdim={self.kdim}, vdim={self.vdim}, embed_dim={self.embed_dim}")
            key = value = query
        else:
            value = key if value is None else value
            _check_input("key", key, self.kdim, "kdim", p)
            _check_input("value", value, self.vdim, "vdim", p)
            if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]:
                raise ValueError(f"query, key and value must have the same batch size, got shapes {_shape(query)}, {_shape(key)}, {_shape(value)}")
            if key.shape[1] != value.shape[1]:
                raise ValueError(f"key and value must have the same length, got shapes {_shape(key)} and {_shape(value)}")
        for name, flag in (("causal", causal), ("need_weights", need_weights), ("average_attn_weights", average_attn_weights), ("return_stats", return_stats)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} ({flag!r})")
        if kv_cache is not None:
            if not isinstance(kv_cache, KVCache):
                raise TypeError(f"kv_cache must be a selfattn.KVCache, got {type(kv_cache).__name__}")
            if (kv_cache.num_kv_heads, kv_cache.head_dim, kv_cache.v_dim) != (self.num_kv_heads, self.head_dim, self.head_dim):
                raise ValueError(f"kv_cache holds (num_kv_heads, head_dim, v_dim) = ({kv_cache.num_kv_heads}, {kv_cache.head_dim}, {kv_cache.v_dim}) but this layer needs ({self.num_kv_heads}, {self.head_dim}, {self.head_dim})")
            if kv_cache.batch_size != query.shape[0]:
                raise ValueError(f"kv_cache was built for batch_size={kv_cache.batch_size} but query has batch size {query.shape[0]} (shape {_shape(query)})")

        B, Lq, _ = query.shape
        q = self._heads(query, self.q_proj, self.num_heads)  # (B, Hq, Lq, Dh)
        k = self._heads(key, self.k_proj, self.num_kv_heads)  # (B, Hkv, Lk_new, Dh)
        v = self._heads(value, self.v_proj, self.num_kv_heads)  # (B, Hkv, Lk_new, Dh)
        if self.qk_norm:
            # per-head RMS normalisation, kept in the projections' dtype: under autocast the
            # projections are bfloat16/float16 while the norms' scales stay float32
            q, k = self.q_norm(q).to(q.dtype), self.k_norm(k).to(k.dtype)
        past = 0 if kv_cache is None else kv_cache.length
        self_attn = key is query or same_key
        Lk = past + k.shape[2]
        q_pos = None  # (B, Lq) or None for the defaults
        if positions is not None:
            q_pos = _batch_rows("positions", positions, B, Lq, q.device)
            if not self_attn and kv_cache is None:
                raise ValueError("positions applies to the query tokens and, in self-attention, to the keys; "
                                 "with a separate key it needs a kv_cache (which keeps the keys' positions)")
        elif kv_cache is not None:
            q_pos = kv_cache.next_positions(Lq)
        k_new_pos = q_pos if (self_attn and q_pos is not None) else (None if kv_cache is None else kv_cache.next_positions(k.shape[2]))
        if self.rope:
            qp = torch.arange(Lq, device=q.device) if q_pos is None else q_pos
            kp = torch.arange(k.shape[2], device=k.device) if k_new_pos is None else k_new_pos
            q = apply_rope(q, *rope_cos_sin(qp, self.head_dim, self.rope_base, q.dtype))  # (B, Hq, Lq, Dh)
            k = apply_rope(k, *rope_cos_sin(kp, self.head_dim, self.rope_base, k.dtype))  # (B, Hkv, Lk_new, Dh)
        m = _combine(
            _key_padding_to_mask(key_padding_mask, B, Lk),
            _attn_mask_to_mask(attn_mask, B, self.num_heads, Lq, Lk),
        )
        kv_pos = q_pos if (self_attn and kv_cache is None) else None
        if kv_cache is not None:
            new_keep = None
            if isinstance(key_padding_mask, torch.Tensor):
                # (B, Lk_new) the cache remembers its padding: bool True or float -inf (torch's two
                # conventions); finite float entries are biases for this call only
                new = key_padding_mask[:, past:]
                new_keep = ~new if new.dtype == torch.bool else ~torch.isneginf(new)
            k_all, v_all = kv_cache.append(k, v, positions=k_new_pos, keep=new_keep)  # (B, Hkv, past + Lk_new, Dh)
            if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
                # the cache holds values only: the cached past is a constant, but this call's own
                # keys and values keep their gradient (a prefill trains as the forward without a cache)
                k = torch.cat((k_all[:, :, :past], k), dim=2)  # (B, Hkv, past + Lk_new, Dh)
                v = torch.cat((v_all[:, :, :past], v), dim=2)
            else:
                k, v = k_all, v_all
            kv_pos = kv_cache.positions  # (B, Lk)
            if not bool(kv_cache.keep.all()):
                m = _combine(m, _masks.key_padding(kv_cache.keep.clone()))
        want_stats = need_weights or return_stats
        dropout_p = self.dropout if self.training else 0.0
        opts = dict(mask=m, causal=causal, window=window, q_positions=q_pos, kv_positions=kv_pos)
        try:
            res = attention(q, k, v, **opts, dropout_p=dropout_p, return_stats=want_stats, backend=backend)
        except Exception:
            if kv_cache is not None:
                kv_cache.length = past  # a failed call leaves the cache as it was
            raise
        o, stats = res if want_stats else (res, None)  # (B, Hq, Lq, Dh)
        out = self.out_proj(o.transpose(1, 2).reshape(B, Lq, self.embed_dim))  # (B, Lq, E)
        if not self.batch_first:
            out = out.transpose(0, 1)  # (Lq, B, E)
        extra = []
        if need_weights:
            extra.append(_weights(q, k, stats, opts, average_attn_weights))
        if return_stats:
            extra.append(stats)
        return (out, *extra) if extra else out

    # -- conversion to and from torch.nn.MultiheadAttention -----------------------------------

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "MultiHeadAttention":
        """A copy of a ``torch.nn.MultiheadAttention`` (weights, biases, dropout, kdim/vdim, batch_first).

        Modules with ``add_bias_kv`` or ``add_zero_attn`` have no equivalent and are refused.
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if module.bias_k is not None or module.bias_v is not None:
            raise ValueError("module: add_bias_kv=True has no MultiHeadAttention equivalent")
        if module.add_zero_attn:
            raise ValueError("module: add_zero_attn=True has no MultiHeadAttention equivalent")
        E = module.embed_dim
        w = module.out_proj.weight
        has_bias = module.in_proj_bias is not None
        new = cls(E, module.num_heads, bias=has_bias, dropout=module.dropout, kdim=module.kdim, vdim=module.vdim,
                  batch_first=module.batch_first, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if module._qkv_same_embed_dim:
                wq, wk, wv = module.in_proj_weight.chunk(3, dim=0)  # (E, E) each
            else:
                wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
            new.q_proj.weight.copy_(wq)
            new.k_proj.weight.copy_(wk)
            new.v_proj.weight.copy_(wv)
            new.out_proj.weight.copy_(module.out_proj.weight)
            if has_bias:
                bq, bk, bv = module.in_proj_bias.chunk(3)
                new.q_proj.bias.copy_(bq)
                new.k_proj.bias.copy_(bk)
                new.v_proj.bias.copy_(bv)
                new.out_proj.bias.copy_(module.out_proj.bias)
        new.train(module.training)
        return new

    def to_torch(self) -> nn.MultiheadAttention:
        """The equivalent ``torch.nn.MultiheadAttention``; refused for GQA, RoPE or QK-norm."""
        for name, bad in (("num_kv_heads", self.num_kv_heads != self.num_heads), ("rope", self.rope), ("qk_norm", self.qk_norm)):
            if bad:
                raise ValueError(f"to_torch: torch.nn.MultiheadAttention has no equivalent of {name} (num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, rope={self.rope}, qk_norm={self.qk_norm})")
        w = self.q_proj.weight
        has_bias = self.q_proj.bias is not None
        mod = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=has_bias,
                                    kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first,
                                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if mod._qkv_same_embed_dim:
                mod.in_proj_weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight], dim=0))
            else:
                mod.q_proj_weight.copy_(self.q_proj.weight)
                mod.k_proj_weight.copy_(self.k_proj.weight)
                mod.v_proj_weight.copy_(self.v_proj.weight)
            mod.out_proj.weight.copy_(self.out_proj.weight)
            if has_bias:
                mod.in_proj_bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
                mod.out_proj.bias.copy_(self.out_proj.bias)
        mod.train(self.training)
        return mod
