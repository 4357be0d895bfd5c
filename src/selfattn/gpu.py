"""FlashAttention-style entry points for the ``triton`` backend, with its own options.

Both are :func:`selfattn.attention` with ``backend="triton"`` and the backend's options passed as
``backend_options`` (``deterministic``, ``num_splits``): one validation, and
``selfattn.functional.observe`` sees these calls like any other.
"""

from __future__ import annotations

import torch

from . import functional as _functional
from . import masks as _masks
from .stats import AttentionStats

__all__ = ["flash_attention", "flash_attention_varlen"]


def flash_attention(query, key, value, *, mask=None, causal=False, window=None, scale=None, softcap=None,
                    q_positions=None, kv_positions=None, alibi_slopes=None, sinks=None, return_stats=False,
                    deterministic=False, num_splits=None):
    """``selfattn.attention(..., backend="triton")`` with the backend's two options.

    Args:
        query, key, value, mask, causal, window, scale, softcap, q_positions, kv_positions,
            alibi_slopes, sinks, return_stats: as in :func:`selfattn.attention` (``dropout_p``
            is not supported by this backend).
        deterministic: compute dQ in a separate pass that owns each query block, instead of
            adding the contributions of every key block atomically; the gradients are then
            bitwise reproducible from run to run (dK and dV always are). Slower backward.
        num_splits: split the key range of each query block over this many programs and merge
            the partial softmaxes (split-KV, for few queries against a long cache). ``None``
            chooses from the GPU's size; 1 disables it.

    Shapes: query (B, Hq, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv), D and Dv <= 256.
    Returns output (B, Hq, Lq, Dv), or ``(output, AttentionStats)``. Fully-masked rows give
    output 0, lse -inf (the sink's logit with sinks), max_logit -inf, entropy 0 and zero gradients.

    Raises ``BackendUnavailable`` where the backend cannot serve the request (no CUDA and no
    interpreter, float64, head dim > 256, dropout); TypeError/ValueError for bad options.

    Example:
        >>> out = flash_attention(q, k, v, causal=True, deterministic=True)  # doctest: +SKIP
    """
    options = {"deterministic": deterministic}
    if num_splits is not None:
        options["num_splits"] = num_splits
    return _functional.attention(
        query, key, value, mask=mask, causal=causal, window=window, scale=scale, softcap=softcap,
        q_positions=q_positions, kv_positions=kv_positions, alibi_slopes=alibi_slopes, sinks=sinks,
        return_stats=return_stats, backend="triton", backend_options=options)


def _check_cu(name, cu, total, device):
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype.is_floating_point or cu.dtype == torch.bool or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D integer tensor [0, len0, len0+len1, ...], got {cu!r}")
    cu = cu.to(device=device, dtype=torch.long)
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name} must start at 0, never decrease and end at the packed length {total}, got {cu.tolist()}")
    return cu


def flash_attention_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, *, causal=False, window=None,
                           scale=None, softcap=None, alibi_slopes=None, sinks=None, return_stats=False,
                           deterministic=False):
    """Variable-length sequences packed without padding (FlashAttention's varlen interface).

    Args:
        query: (total_q, Hq, D); key: (total_k, Hkv, D); value: (total_k, Hkv, Dv): the
            sequences of a batch concatenated along the first dimension.
        cu_seqlens_q, cu_seqlens_k: int (N + 1,) offsets ``[0, len_0, len_0 + len_1, ...]``;
            sequence n holds queries ``cu_seqlens_q[n]:cu_seqlens_q[n+1]`` and keys
            ``cu_seqlens_k[n]:cu_seqlens_k[n+1]``.
        causal, window: per sequence, aligned bottom-right on each sequence's own lengths (query i
            of a sequence with q_len queries and k_len keys sits at position i + k_len - q_len), as
            FlashAttention does. A sequence with 2 queries and 4 keys, causal::

                key   0 1 2 3
                q@2   1 1 1 0
                q@3   1 1 1 1

        scale, softcap, alibi_slopes, sinks, return_stats, deterministic: as in :func:`flash_attention`.

    Returns (total_q, Hq, Dv), or with ``return_stats`` also AttentionStats of shape (Hq, total_q).
    Runs as one batch element with ``masks.packed``: document ids keep sequences apart (key tiles
    of other sequences are skipped) and positions restart in each sequence.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be (total, heads, head_dim), got {getattr(t, 'shape', t)!r}")
    cu_q = _check_cu("cu_seqlens_q", cu_seqlens_q, query.shape[0], query.device)
    cu_k = _check_cu("cu_seqlens_k", cu_seqlens_k, key.shape[0], query.device)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must hold the same number of sequences, got {cu_q.tolist()} and {cu_k.tolist()}")
    layout = _masks.packed(cu_q, cu_k)
    q4, k4, v4 = (t.permute(1, 0, 2)[None] for t in (query, key, value))  # (1, H, total, D) views, no copy
    res = flash_attention(q4, k4, v4, mask=layout.mask, q_positions=layout.q_positions,
                          kv_positions=layout.kv_positions, causal=causal, window=window, scale=scale,
                          softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, return_stats=return_stats,
                          deterministic=deterministic)
    out, stats = res if return_stats else (res, None)
    out = out[0].permute(1, 0, 2)  # (total_q, Hq, Dv)
    if stats is None:
        return out
    return out, AttentionStats(stats.lse[0], stats.max_logit[0], stats.entropy[0])
