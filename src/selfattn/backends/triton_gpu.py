"""Backend `triton`: fused flash attention written in Triton (issue 6).

Serves CUDA tensors in float16, bfloat16 and float32 (float32 multiplies in full float32, no
TF32), head dims up to 256, every mask of :mod:`selfattn.masks` with tile skipping, GQA,
Lq != Lk, softcap, any scale, ``return_stats`` from the same pass, and a backward.

On CPU tensors it serves only under Triton's interpreter: ``TRITON_INTERPRET=1`` must be set
before triton is first imported in the process (triton decorates its own helpers then) and
still be set when the call is made; the variable is read at each call. This module does not
import triton itself: the kernel module :mod:`selfattn.kernels.triton_flash` is executed on
first use, in the mode triton is in. The interpreter is slow: ``auto`` never prefers this
backend on CPU.

Layers (flash-attn style): the launchers in ``kernels/triton_flash.py``; two ``torch.library``
custom ops (``selfattn::triton_fwd``, ``selfattn::triton_bwd``) so ``torch.compile`` sees
opaque calls with known output shapes; :class:`_FlashAttention`, a ``torch.autograd.Function``
that saves the log-sum-exp (as row max and 1/row sum, so that the recomputed probabilities
carry no row-wide rounding of a stored lse); and the thin public functions :func:`flash_attention` and
:func:`flash_attention_varlen`, which add the ``deterministic`` and ``num_splits`` options that
the generic ``selfattn.attention`` does not have.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from ..masks import And, Causal, Dense, Documents, Padding, Window
from ..stats import AttentionStats
from .base import Backend, Request

__all__ = ["TritonBackend", "flash_attention", "flash_attention_varlen", "interpreter_active"]

_HAVE_TRITON = importlib.util.find_spec("triton") is not None
_KERNEL_MODULE = "selfattn.kernels.triton_flash"
_KERNELS: dict = {}  # interpret flag -> kernels module executed in that mode



def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _triton_interpreted() -> bool:
    # triton decorates its own jit helpers (tl.sum, tl.max, ...) when it is imported: the whole
    # process runs interpreted or compiled from then on, whatever TRITON_INTERPRET says later
    std = sys.modules.get("triton.language.standard")
    if std is None:
        return _env_interpret()
    return type(std.cdiv).__name__ == "InterpretedFunction"


def interpreter_active() -> bool:
    """True if Triton's CPU interpreter can run now: TRITON_INTERPRET is set (1/true/on/yes)
    and was already set when triton was first imported in this process (or triton is not
    imported yet)."""
    return _env_interpret() and _triton_interpreted()


def _kernels(interpret: bool):
    # triton.jit picks interpreted or compiled when the kernel module executes: keep one copy per mode
    if interpret not in _KERNELS:
        mod = importlib.import_module(_KERNEL_MODULE)
        if mod.INTERPRET != interpret:
            spec = importlib.util.find_spec(_KERNEL_MODULE)
            mod = importlib.util.module_from_spec(spec)
            old = os.environ.get("TRITON_INTERPRET")
            os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
            try:
                spec.loader.exec_module(mod)
            finally:
                if old is None:
                    del os.environ["TRITON_INTERPRET"]
                else:
                    os.environ["TRITON_INTERPRET"] = old
        _KERNELS[interpret] = mod
    return _KERNELS[interpret]


def _kernels_for(device: torch.device):
    return _kernels(_triton_interpreted())


# -- lowering a Request's mask to what the kernels take --------------------------------------


@dataclass
class _Lowered:
    window: Optional[tuple]  # (left, right): causal is (big, 0); None = no band
    kv_lens: Optional[torch.Tensor]  # int32 (B,) keys per batch element
    q_lens: Optional[torch.Tensor]  # int32 (B,) queries per batch element
    doc_rows: Optional[torch.Tensor]  # int32 (2, B|1, Lq): each query's key range [lo, hi)
    doc_cols: Optional[torch.Tensor]  # int32 (2, B|1, Lk): each key's query range [lo, hi)
    mask: Optional[torch.Tensor]  # (B|1, H|1, Lq, Lk) bool or float, broadcast by strides


def _is_sorted(ids: torch.Tensor) -> bool:
    return ids.shape[1] < 2 or bool((ids[:, 1:] >= ids[:, :-1]).all())


def _lower_documents(p: Documents, lq, lk, device):
    # sorted segment ids make each query's keys one contiguous range (and each key's queries)
    kv = p.kv_ids.to(device)
    qi = kv[:, lk - lq:] if p.q_ids is None else p.q_ids.to(device)
    bd = max(kv.shape[0], qi.shape[0])
    kv, qi = kv.expand(bd, -1).contiguous(), qi.expand(bd, -1).contiguous()  # (Bd, Lk), (Bd, Lq)
    if not (_is_sorted(kv) and _is_sorted(qi)):
        return None
    rows = torch.stack([torch.searchsorted(kv, qi), torch.searchsorted(kv, qi, right=True)])  # (2, Bd, Lq)
    cols = torch.stack([torch.searchsorted(qi, kv), torch.searchsorted(qi, kv, right=True)])  # (2, Bd, Lk)
    return rows.to(torch.int32), cols.to(torch.int32)


def _lower(req: Request, device) -> _Lowered:
    lq, lk = req.q_len, req.kv_len
    parts = [] if req.mask is None else list(req.mask.parts if isinstance(req.mask, And) else [req.mask])
    big = lq + lk + 1  # a window edge this far away never binds
    window, kv_lens, q_lens, docs, dense = None, None, None, None, []
    for p in parts:
        if isinstance(p, (Causal, Window)):
            left, right = (big, 0) if isinstance(p, Causal) else (min(p.left, big), min(p.right, big))
            window = (left, right) if window is None else (min(window[0], left), min(window[1], right))
        elif isinstance(p, Padding):
            kv = p.kv_lengths.to(device)
            kv_lens = kv if kv_lens is None else torch.minimum(kv_lens, kv)
            if p.q_lengths is not None:
                ql = p.q_lengths.to(device)
                q_lens = ql if q_lens is None else torch.minimum(q_lens, ql)
        elif isinstance(p, Documents) and docs is None and (low := _lower_documents(p, lq, lk, device)) is not None:
            docs = low
        else:  # dense masks, unsorted or repeated documents: loaded per tile as a dense mask
            dense.append(p)
    mask = None
    if len(dense) == 1 and isinstance(dense[0], Dense):
        t = dense[0].tensor
        t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
        mask = t.expand(t.shape[0], t.shape[1], lq, lk)
    elif dense:
        mask = (dense[0] if len(dense) == 1 else And(*dense)).to_dense(lq, lk, device=device)
    if mask is not None and mask.dtype == torch.float64:
        mask = mask.to(torch.float32)
    i32 = lambda t: None if t is None else t.to(torch.int32).contiguous()  # noqa: E731
    return _Lowered(window, i32(kv_lens), i32(q_lens), docs[0] if docs else None, docs[1] if docs else None,
                    mask.detach() if mask is not None else None)


# -- torch.library custom ops -----------------------------------------------------------------


def _window_args(window):
    return (-1, -1) if window is None else window


@torch.library.custom_op("selfattn::triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: Optional[torch.Tensor],
            q_lens: Optional[torch.Tensor], doc_rows: Optional[torch.Tensor], mask: Optional[torch.Tensor],
            scale: float, softcap: float, win_left: int, win_right: int, stats: bool,
            num_splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # (out, lse, row max, 1/row sum, max_logit, entropy); the middle two are saved for the backward
    kern = _kernels_for(q.device)
    return kern.forward(q, k, v, scale=scale, softcap=softcap if softcap > 0 else None,
                        window=None if win_left < 0 else (win_left, win_right), kv_lens=kv_lens,
                        q_lens=q_lens, doc_rows=doc_rows, mask=mask, stats=stats,
                        num_splits=num_splits if num_splits > 0 else None)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, kv_lens, q_lens, doc_rows, mask, scale, softcap, win_left, win_right, stats, num_splits):
    B, Hq, Lq, _ = q.shape
    stat_shape = (B, Hq, Lq) if stats else (0,)
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(B, Hq, Lq, v.shape[-1]), q.new_empty(B, Hq, Lq, **f32), q.new_empty(B, Hq, Lq, **f32),
            q.new_empty(B, Hq, Lq, **f32), q.new_empty(stat_shape, **f32), q.new_empty(stat_shape, **f32))


@torch.library.custom_op("selfattn::triton_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            row_m: torch.Tensor, row_l: torch.Tensor, kv_lens: Optional[torch.Tensor], q_lens: Optional[torch.Tensor],
            doc_rows: Optional[torch.Tensor], doc_cols: Optional[torch.Tensor], mask: Optional[torch.Tensor],
            scale: float, softcap: float, win_left: int, win_right: int,
            deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kern = _kernels_for(q.device)
    return kern.backward(dout, q, k, v, out, row_m, row_l, scale=scale, softcap=softcap if softcap > 0 else None,
                         window=None if win_left < 0 else (win_left, win_right), kv_lens=kv_lens,
                         q_lens=q_lens, doc_rows=doc_rows, doc_cols=doc_cols, mask=mask,
                         deterministic=deterministic)


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, row_m, row_l, kv_lens, q_lens, doc_rows, doc_cols, mask, scale, softcap,
              win_left, win_right, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_lens, q_lens, doc_rows, doc_cols, mask, scale, softcap, win_left,
                win_right, stats, deterministic, num_splits):
        out, lse, row_m, row_l, maxl, ent = torch.ops.selfattn.triton_fwd(
            q, k, v, kv_lens, q_lens, doc_rows, mask, scale, softcap, win_left, win_right, stats, num_splits)
        # the backward recomputes P = exp2(S - row max) / row sum from these, not from lse
        ctx.save_for_backward(q, k, v, out, row_m, row_l, kv_lens, q_lens, doc_rows, doc_cols, mask)
        ctx.opts = (scale, softcap, win_left, win_right, deterministic)
        ctx.mark_non_differentiable(lse, maxl, ent)
        return out, lse, maxl, ent

    @staticmethod
    def backward(ctx, dout, _dlse, _dmax, _dent):
        q, k, v, out, row_m, row_l, kv_lens, q_lens, doc_rows, doc_cols, mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.selfattn.triton_bwd(dout, q, k, v, out, row_m, row_l, kv_lens, q_lens, doc_rows,
                                                   doc_cols, mask, *ctx.opts)
        return dq, dk, dv, *([None] * 12)


# -- the backend ------------------------------------------------------------------------------


class TritonBackend(Backend):
    name = "triton"
    summary = "fused flash attention in Triton: CUDA GPUs (CPU only under TRITON_INTERPRET=1)"
    features = {
        "masks": "all, with tile skipping (causal, window, padding, sorted documents); dense masks loaded per tile",
        "dtypes": "float16, bfloat16, float32 (full float32 products, no TF32); float64 refused",
        "head_dim": "1-256 (padded to a power of two inside the kernel)",
        "stats": "yes, from the same pass",
        "softcap": "yes",
        "dropout": "no (refused)",
        "backward": "fused: dK/dV pass + dQ (atomic, or a separate pass with deterministic=True)",
        "memory": "O(L)",
        "devices": "cuda; cpu under the Triton interpreter",
    }
    capabilities = Backend.capabilities.replace(
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), devices=frozenset({"cuda"}),
        interpreted_devices=frozenset({"cpu"}), dropout=False, generator=False, float_mask_grad=False,
        max_head_dim=256, requires=("triton",))

    def unsupported(self, q, k, v, req: Request):
        dev = req.device
        if not _HAVE_TRITON:
            return f"triton is not installed (pip install triton), so device {dev.type} cannot be served"
        if dev.type == "cpu":
            if not _env_interpret():
                return (f"device {dev} (the triton backend runs on CUDA GPUs; on CPU only under "
                        "Triton's interpreter, TRITON_INTERPRET=1 set before triton is imported)")
            if not _triton_interpreted():
                return (f"device {dev} (TRITON_INTERPRET=1 was set after triton was imported in this "
                        "process; set it before the first import of triton)")
        elif dev.type != "cuda":
            return f"device {dev} (the triton backend runs on CUDA GPUs)"
        if req.dtype == torch.float64:
            return "dtype float64 (the triton kernels take float16, bfloat16 or float32)"
        if req.head_dim > 256:
            return f"head_dim {req.head_dim} (at most 256)"
        if req.v_dim > 256:
            return f"v_dim {req.v_dim} (at most 256)"
        if req.dropout_p > 0:
            return f"dropout (dropout_p={req.dropout_p}); use backend='math' for dropout"
        if req.requires_grad and req.mask is not None and any(
                isinstance(p, Dense) and p.tensor.requires_grad
                for p in (req.mask.parts if isinstance(req.mask, And) else [req.mask])):
            return "gradient with respect to a float mask (detach the dense mask or use backend='math')"
        return None

    def rank(self, req: Request) -> float:
        # on CUDA ahead of torch SDPA (10); under the CPU interpreter behind everything but the reference
        return 5.0 if req.device.type == "cuda" else 500.0

    def forward(self, q, k, v, req: Request):
        return _run(q, k, v, req)


def _run(q, k, v, req: Request, deterministic=False, num_splits=None):
    low = _lower(req, q.device)
    wl, wr = _window_args(low.window)
    out, lse, maxl, ent = _FlashAttention.apply(
        q, k, v, low.kv_lens, low.q_lens, low.doc_rows, low.doc_cols, low.mask, float(req.scale),
        float(req.softcap or 0.0), int(wl), int(wr), bool(req.return_stats), bool(deterministic),
        0 if num_splits is None else int(num_splits))
    return out, (AttentionStats(lse, maxl, ent) if req.return_stats else None)


# -- public functions -------------------------------------------------------------------------


def flash_attention(query, key, value, *, mask=None, causal=False, window=None, scale=None, softcap=None,
                    return_stats=False, deterministic=False, num_splits=None):
    """``selfattn.attention(..., backend="triton")`` with two options of its own.

    Args:
        query, key, value, mask, causal, window, scale, softcap, return_stats: as in
            :func:`selfattn.attention` (``dropout_p`` is not supported by this backend).
        deterministic: compute dQ in a separate pass that owns each query block, instead of
            adding the contributions of every key block atomically; the gradients are then
            bitwise reproducible from run to run (dK and dV always are). Slower backward.
        num_splits: split the key range of each query block over this many programs and merge
            the partial softmaxes (split-KV, for few queries against a long cache). ``None``
            chooses from the GPU's size; 1 disables it.

    Shapes: query (B, Hq, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv), D and Dv <= 256.
    Returns output (B, Hq, Lq, Dv), or ``(output, AttentionStats)``. Fully-masked rows give
    output 0, lse -inf, max_logit -inf, entropy 0 and zero gradients.

    Raises ``BackendUnavailable`` where the backend cannot serve the request (no CUDA and no
    interpreter, float64, head dim > 256, dropout).

    Example:
        >>> out = flash_attention(q, k, v, causal=True, deterministic=True)  # doctest: +SKIP
    """
    # the same validation as selfattn.attention (functional imports the registry, which imports
    # this module, hence the late import); then this backend with the two extra options
    from .. import functional as F

    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    F._check_qkv(query, key, value)
    F._check_options(softcap, 0.0, None, return_stats, "triton")
    m = F._resolve_mask(mask, causal, window)
    B, Hq, Lq, D = query.shape
    Hkv, Lk, Dv = key.shape[1], key.shape[2], value.shape[3]
    if m is not None:
        m.check(B, Hq, Lq, Lk, query.device)
    req = Request(
        mask=m, scale=F._resolve_scale(scale, D), softcap=None if softcap is None else float(softcap),
        dropout_p=0.0, generator=None, return_stats=return_stats, batch=B, q_heads=Hq, kv_heads=Hkv,
        q_len=Lq, kv_len=Lk, head_dim=D, v_dim=Dv, dtype=query.dtype, device=query.device,
        requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)))
    F._backends.choose("triton", query, key, value, req)  # raises BackendUnavailable naming what is missing
    if Lk == 0 or Lq == 0:
        out, stats = F._NoKeys.apply(query, key, value), F._empty_stats(query, torch.float32)
    else:
        out, stats = _run(query, key, value, req, deterministic, num_splits)
    return (out, stats) if return_stats else out


def _segment_ids(name, cu, total, device):
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype.is_floating_point or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D integer tensor [0, len0, len0+len1, ...], got {cu!r}")
    cu = cu.to(device=device, dtype=torch.long)
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name} must start at 0, never decrease and end at the packed length {total}, got {cu.tolist()}")
    return torch.searchsorted(cu[1:], torch.arange(total, device=device), right=True)  # (total,) sequence index


def flash_attention_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, *, causal=False, window=None,
                           scale=None, softcap=None, return_stats=False, deterministic=False):
    """Variable-length sequences packed without padding (FlashAttention's varlen interface).

    Args:
        query: (total_q, Hq, D); key: (total_k, Hkv, D); value: (total_k, Hkv, Dv): the
            sequences of a batch concatenated along the first dimension.
        cu_seqlens_q, cu_seqlens_k: int (N + 1,) offsets ``[0, len_0, len_0 + len_1, ...]``;
            sequence n holds queries ``cu_seqlens_q[n]:cu_seqlens_q[n+1]`` and keys
            ``cu_seqlens_k[n]:cu_seqlens_k[n+1]``.
        causal, window: per sequence; they need ``cu_seqlens_q == cu_seqlens_k`` (self-attention
            over packed sequences), where bottom-right and top-left alignment coincide.
        scale, softcap, return_stats, deterministic: as in :func:`flash_attention`.

    Returns (total_q, Hq, Dv), or with ``return_stats`` also AttentionStats of shape (Hq, total_q).
    Runs as one batch element with a documents mask over sorted segment ids, so key tiles of
    other sequences are skipped and no memory is spent on padding.
    """
    from .. import masks

    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be (total, heads, head_dim), got {getattr(t, 'shape', t)!r}")
    q_ids = _segment_ids("cu_seqlens_q", cu_seqlens_q, query.shape[0], query.device)
    kv_ids = _segment_ids("cu_seqlens_k", cu_seqlens_k, key.shape[0], query.device)
    if (causal or window is not None) and not (cu_seqlens_q.shape == cu_seqlens_k.shape and torch.equal(
            cu_seqlens_q.cpu().long(), cu_seqlens_k.cpu().long())):
        raise ValueError("causal/window with varlen need cu_seqlens_q == cu_seqlens_k "
                         f"(got {cu_seqlens_q.tolist()} and {cu_seqlens_k.tolist()})")
    q4, k4, v4 = (t.permute(1, 0, 2)[None] for t in (query, key, value))  # (1, H, total, D) views, no copy
    res = flash_attention(q4, k4, v4, mask=masks.documents(kv_ids, q_ids), causal=causal, window=window,
                          scale=scale, softcap=softcap, return_stats=return_stats, deterministic=deterministic)
    out, stats = res if return_stats else (res, None)
    out = out[0].permute(1, 0, 2)  # (total_q, Hq, Dv)
    if stats is None:
        return out
    return out, AttentionStats(stats.lse[0], stats.max_logit[0], stats.entropy[0])


from . import register  # noqa: E402  (the registry defines register before importing this module)

register(TritonBackend())
