"""Backend `cpu`: fused flash-style CPU kernel (issue 5).

Three layers, as flash-attn has them:

* ``_launch_forward`` / ``_launch_backward``: private launchers that classify tiles with
  ``Mask.block_map``, turn the mask into the kernels' element-wise parameters and call the
  numba kernels in ``selfattn.kernels.cpu_flash`` with all the threads torch uses (or in the
  calling thread when that is one). The backward is two passes (dQ, then dK/dV), or one when
  all keys fit one block;
* ``selfattn::cpu_flash_attention`` and ``selfattn::cpu_flash_attention_backward``:
  ``torch.library`` custom ops, so ``torch.compile`` traces a call as one node; the forward
  op's autograd (``register_autograd``) saves q, k, v, the output and the log-sum-exp only (as
  row max + log of the row sum: one float32 lse would cost p its precision at huge scores). The
  backward takes delta = rowsum(P dP) from its own P and dP (rowsum(dO O) only as a shift).
  Eager calls take ``_EagerFlash``, the same two steps as an ``autograd.Function`` without the
  dispatcher's per-call cost;
* ``CPUBackend.forward``: turns a validated ``Request`` into the ops' arguments.

Memory is O(L): the L x L matrix never exists, only (BLOCK_M x BLOCK_N) tiles per thread.
Dropout is not supported (``BackendUnavailable`` names "dropout"); statistics carry no
gradient; a float mask gets no gradient (refused if it requires one).
"""

import math
from typing import Optional

import torch

from .. import masks as _masks
from ..stats import AttentionStats
from .base import Backend, Request

try:
    import numba
    import numpy as np

    from ..kernels import cpu_flash as _k
except ImportError:  # numba missing: the backend stays registered and says why it cannot serve
    _k = None

_BIG = 1 << 40  # window bound meaning "unbounded"
_ATOMIC = (_masks.Causal, _masks.Window, _masks.Padding, _masks.Documents, _masks.Dense)

#: tile products computed by the kernels since import (or the last reset); deterministic.
#: "backward_one_pass": backward passes with one key block, where flash_bwd_kv also computes dQ
TILE_PRODUCTS = {"forward": 0, "backward_kv": 0, "backward_q": 0, "backward_one_pass": 0}


def reset_tile_products() -> None:
    for name in TILE_PRODUCTS:
        TILE_PRODUCTS[name] = 0


# -- masks: from Mask values to the kernels' parameters ---------------------------------------


def _mask_args(mask, Lq: int, Lk: int):
    """(kv_lens, q_lens, q_ids, kv_ids, allow, bias, win_left, win_right) for the ops."""
    left = right = _BIG
    kv_lens = q_lens = allow = bias = None
    q_ids, kv_ids = [], []
    parts = () if mask is None else (mask.parts if isinstance(mask, _masks.And) else (mask,))
    for part in parts:
        if isinstance(part, _masks.Causal):
            right = min(right, 0)
        elif isinstance(part, _masks.Window):
            left, right = min(left, part.left), min(right, part.right)
        elif isinstance(part, _masks.Padding):
            kv_lens = part.kv_lengths if kv_lens is None else torch.minimum(kv_lens, part.kv_lengths)
            if part.q_lengths is not None:
                q_lens = part.q_lengths if q_lens is None else torch.minimum(q_lens, part.q_lengths)
        elif isinstance(part, _masks.Documents):
            kv_ids.append(part.kv_ids)  # (B|1, Lk)
            q_ids.append(part.kv_ids[:, Lk - Lq:] if part.q_ids is None else part.q_ids)  # (B|1, Lq)
        elif isinstance(part, _masks.Dense):
            t = part.tensor
            t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))  # (B|1, H|1, Lq|1, Lk|1)
            if t.dtype == torch.bool:
                allow = t if allow is None else allow & t
            else:
                bias = t if bias is None else bias + t
    if q_ids:
        bd = max(t.shape[0] for t in kv_ids)
        kv_ids = torch.stack([t.expand(bd, -1) for t in kv_ids]).long()  # (ND, Bd, Lk)
        q_ids = torch.stack([t.expand(bd, -1) for t in q_ids]).long()  # (ND, Bd, Lq)
    else:
        q_ids = kv_ids = None
    return kv_lens, q_lens, q_ids, kv_ids, allow, bias, left, right


def _tile_map(lq, lk, kv_lens, q_lens, q_ids, kv_ids, allow, bias, left, right) -> torch.Tensor:
    """int8 (B|1, H|1, nQ, nK) TileKind per (query block, key block) for every mask part."""
    parts = []
    if left < _BIG or right < _BIG:
        parts.append(_masks.Window(min(left, _BIG), min(right, _BIG)))
    if kv_lens is not None:
        parts.append(_masks.Padding(kv_lens, q_lens))
    for d in range(0 if q_ids is None else q_ids.shape[0]):
        parts.append(_masks.Documents(kv_ids[d], q_ids[d]))
    nq, nk = -(-lq // _k.BLOCK_M), -(-lk // _k.BLOCK_N)
    if parts:
        m = parts[0] if len(parts) == 1 else _masks.And(*parts)
        tiles = m.block_map(lq, lk, _k.BLOCK_M, _k.BLOCK_N)  # (B|1, H|1, nQ, nK)
    else:
        tiles = torch.full((1, 1, nq, nk), int(_masks.FULL), dtype=torch.int8)
    dense = None
    if allow is not None:
        dense = allow
    if bias is not None:
        finite = bias != float("-inf")  # -inf entries of a float mask rule pairs out
        dense = finite if dense is None else dense & finite
    if dense is not None:
        d = _masks.dense_block_kinds(dense, lq, lk, _k.BLOCK_M, _k.BLOCK_N)
        empty = (tiles == _masks.EMPTY) | (d == _masks.EMPTY)
        full = (tiles == _masks.FULL) & (d == _masks.FULL)
        tiles = torch.where(empty, int(_masks.EMPTY), torch.where(full, int(_masks.FULL), int(_masks.PARTIAL))).to(torch.int8)
    return tiles.expand(tiles.shape[0], tiles.shape[1], nq, nk).contiguous()


def _flat(t: Optional[torch.Tensor], dtype):
    # a (B|1, H|1, Lq|1, Lk|1) tensor as a flat numpy array plus element strides (0 = broadcast)
    if t is None:
        return torch.zeros(0, dtype=dtype).numpy(), np.zeros(4, dtype=np.int64)
    t = t.detach().contiguous()
    t = t.view(dtype) if t.dtype == torch.bool and dtype == torch.uint8 else t.to(dtype)  # bool: no copy
    strides = [t.stride(i) if t.shape[i] > 1 else 0 for i in range(4)]
    return t.reshape(-1).numpy(), np.array(strides, dtype=np.int64)


#: kernel mask arguments of window-only masks (none, causal, window), by (Lq, Lk, left, right,
#: dtype): they depend on nothing else, and a training step asks for the same ones every call
_WINDOW_ARGS: dict = {}


def _kernel_mask_args(lq, lk, kv_lens, q_lens, q_ids, kv_ids, allow, bias, left, right, acc):
    if kv_lens is None and q_lens is None and q_ids is None and allow is None and bias is None:
        key = (lq, lk, left, right, acc)
        margs = _WINDOW_ARGS.get(key)
        if margs is None:
            if len(_WINDOW_ARGS) >= 64:  # many shapes (e.g. decoding step by step): start afresh
                _WINDOW_ARGS.clear()
            margs = _WINDOW_ARGS[key] = _build_kernel_mask_args(lq, lk, None, None, None, None, None, None, left, right, acc)
        return margs
    return _build_kernel_mask_args(lq, lk, kv_lens, q_lens, q_ids, kv_ids, allow, bias, left, right, acc)


def _build_kernel_mask_args(lq, lk, kv_lens, q_lens, q_ids, kv_ids, allow, bias, left, right, acc):
    # the kernels only read these arrays, so a cached tuple is safe to hand out again
    tiles = _tile_map(lq, lk, kv_lens, q_lens, q_ids, kv_ids, allow, bias, left, right).numpy()
    kvl = np.array([lk], np.int64) if kv_lens is None else kv_lens.detach().to(torch.int64).contiguous().numpy()
    ql = np.array([lq], np.int64) if q_lens is None else q_lens.detach().to(torch.int64).contiguous().numpy()
    if q_ids is None:
        qi, ki = np.zeros((0, 1, 1), np.int64), np.zeros((0, 1, 1), np.int64)
    else:
        qi, ki = q_ids.detach().contiguous().numpy(), kv_ids.detach().contiguous().numpy()
    allow_flat, stride_allow = _flat(allow, torch.uint8)
    bias_flat, stride_bias = _flat(bias, acc)
    return (tiles, left, right, kvl, ql, qi, ki, allow_flat, stride_allow, bias_flat, stride_bias)


# -- launchers --------------------------------------------------------------------------------


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _threads(tasks: int, flops: float) -> int:
    # all the threads torch uses, but no more than there are tasks, and one for tiny calls: waking a
    # thread pool costs more than ~4 MFLOP of work (and, on a busy machine, a scheduler time slice)
    return min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, tasks) if flops >= 4e6 else 1


def _kernel(name: str, threads: int):
    """The numba kernel ``name`` for ``threads`` threads: its ``_serial`` twin for one (numba's
    pool is not woken, nor even started), else the parallel kernel with the pool set to that."""
    if threads <= 1:
        return getattr(_k, name + "_serial")
    torch_threads = torch.get_num_threads()
    numba.set_num_threads(threads)
    if torch.get_num_threads() != torch_threads:
        # starting numba's OpenMP pool (first call) sets the OpenMP thread count torch shares to
        # NUMBA_NUM_THREADS: give torch its own setting back
        torch.set_num_threads(torch_threads)
    # tasks are whole query (or key) blocks of uneven cost under causal/window masks: hand them out
    # one at a time rather than in equal static slices (results do not depend on the schedule)
    numba.set_parallel_chunksize(1)
    return getattr(_k, name)


def _ready(t, acc):
    # the tensor as the kernels read it: detached, in the accumulation dtype, contiguous (no copy
    # when it already is all three)
    if t.requires_grad:
        t = t.detach()
    if t.dtype != acc:
        t = t.to(acc)
    return t if t.is_contiguous() else t.contiguous()


def _units(acc, scale, softcap):
    """(consts, softcap in score units): float32 works in base 2 (exp2), float64 in nats (libm exp)."""
    base2 = acc == torch.float32
    per_nat = _k.LOG2E if base2 else 1.0
    qk_scale = scale * per_nat if softcap <= 0.0 else scale / softcap  # q.k -> score (or u of c tanh u)
    softcap_u = softcap * per_nat if softcap > 0.0 else 0.0
    return _k.make_consts(np.float32 if base2 else np.float64, qk_scale, base2), softcap_u


def _transposed(x, lq):
    # (B, H, L, d) -> (B, H, d, L) for the block products; queries in blocks of < 4 rows use dot
    # products on x itself, and with Lq < 4 every block does
    if lq < 4:
        return x.new_empty((1, 1, x.shape[3], 0))
    return x.transpose(-1, -2).contiguous()


def _launch_forward(q, k, v, mask_args, scale, softcap, want_stats):
    acc = _acc_dtype(q.dtype)
    B, Hq, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    margs = _kernel_mask_args(Lq, Lk, *mask_args, acc)
    q_, k_, v_ = (_ready(t, acc) for t in (q, k, v))
    # (B, Hkv, D, Lk); none when the kernel transposes each tile's keys itself (one key block) or
    # takes dot products (fewer than 4 queries)
    kt = k_.new_empty((1, 1, D, 0)) if Lk <= _k.BLOCK_N else _transposed(k_, Lq)
    consts, softcap_u = _units(acc, scale, softcap)
    out = torch.empty(B, Hq, Lq, Dv, dtype=acc)
    row_max, row_log, ent = (torch.empty(B, Hq, Lq, dtype=acc) for _ in range(3))
    counts = np.zeros(B * Hq * (-(-Lq // _k.BLOCK_M)), np.int64)  # one per task
    flash_fwd = _kernel("flash_fwd", _threads(len(counts), 4.0 * B * Hq * Lq * Lk * D))
    flash_fwd(q_.numpy(), k_.numpy(), kt.numpy(), v_.numpy(), out.numpy(), row_max.numpy(), row_log.numpy(), ent.numpy(),
              margs[0], counts, *margs[1:], softcap_u, Lk, bool(want_stats), consts, acc == torch.float32)
    TILE_PRODUCTS["forward"] += int(counts.sum())
    return out.to(q.dtype), row_max, row_log, ent


def _launch_backward(grad_out, q, k, v, out, row_max, row_log, mask_args, scale, softcap):
    acc = _acc_dtype(q.dtype)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    margs = _kernel_mask_args(Lq, Lk, *mask_args, acc)
    q_, k_, v_, do, out_ = (_ready(t, acc) for t in (q, k, v, grad_out, out))
    row_max, row_log = row_max.detach().contiguous(), row_log.detach().contiguous()
    consts, softcap_u = _units(acc, scale, softcap)
    # the kernels owe d(argument)/d(q.k): scale, or scale / c for the softcap's u
    dscale = scale if softcap <= 0.0 else scale / softcap
    dq = torch.empty(B, Hq, Lq, D, dtype=acc)
    dk = torch.empty(B, Hkv, Lk, D, dtype=acc)
    dv = torch.empty(B, Hkv, Lk, Dv, dtype=acc)
    fast = acc == torch.float32
    counts_q = np.zeros(B * Hq * (-(-Lq // _k.BLOCK_M)), np.int64)  # one per task of flash_bwd_q
    counts_kv = np.zeros(B * Hkv * (-(-Lk // _k.BLOCK_N)), np.int64)  # ... and of flash_bwd_kv
    threads = _threads(max(len(counts_q), len(counts_kv)), 10.0 * B * Hq * Lq * Lk * D)
    tail = (margs[0], counts_kv, *margs[1:], softcap_u, softcap, Lk, dscale, consts, fast)
    flash_bwd_kv = _kernel("flash_bwd_kv", threads)
    if Lk <= _k.BLOCK_N and len(counts_kv) >= threads:
        # one key block (and a task per kv head keeps every thread busy): flash_bwd_kv alone does the
        # whole backward pass, dQ included, without recomputing P and dP in a second pass
        no_delta = np.empty((0, 0, 0), consts.dtype)
        flash_bwd_kv(q_.numpy(), k_.numpy(), v_.numpy(), do.numpy(), row_max.numpy(), row_log.numpy(), no_delta,
                     dk.numpy(), dv.numpy(), dq.numpy(), *tail)
        TILE_PRODUCTS["backward_one_pass"] += int(counts_kv.sum())
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    delta = torch.empty(B, Hq, Lq, dtype=acc)  # (B, Hq, Lq) rowsum(P * dP), from flash_bwd_q
    kt, vt = _transposed(k_, Lq), _transposed(v_, 4)  # (B, Hkv, D, Lk), (B, Hkv, Dv, Lk) (dP needs it)
    flash_bwd_q = _kernel("flash_bwd_q", threads)
    flash_bwd_q(q_.numpy(), k_.numpy(), kt.numpy(), v_.numpy(), vt.numpy(), do.numpy(), out_.numpy(), row_max.numpy(),
                row_log.numpy(), delta.numpy(), dq.numpy(), margs[0], counts_q, *tail[2:])
    no_dq = np.empty((0, 0, 0, 0), consts.dtype)  # dQ came from flash_bwd_q
    flash_bwd_kv(q_.numpy(), k_.numpy(), v_.numpy(), do.numpy(), row_max.numpy(), row_log.numpy(), delta.numpy(),
                 dk.numpy(), dv.numpy(), no_dq, *tail)
    TILE_PRODUCTS["backward_kv"] += int(counts_kv.sum())
    TILE_PRODUCTS["backward_q"] += int(counts_q.sum())
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# -- torch.library custom ops -------------------------------------------------------------------


def _forward_impl(q, k, v, kv_lens, q_lens, q_ids, kv_ids, allow, bias, scale, softcap, win_left, win_right, want_stats):
    # returns (out, row_max, row_log, entropy): the log-sum-exp is row_max + row_log, in the kernel's
    # score units (base 2 for float32 inputs, nats for float64); the backward pass reads both halves
    mask_args = (kv_lens, q_lens, q_ids, kv_ids, allow, bias, win_left, win_right)
    return _launch_forward(q, k, v, mask_args, scale, softcap, want_stats)


@torch.library.custom_op("selfattn::cpu_flash_attention", mutates_args=(), device_types="cpu")
def _flash_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_lens: Optional[torch.Tensor], q_lens: Optional[torch.Tensor],
    q_ids: Optional[torch.Tensor], kv_ids: Optional[torch.Tensor],
    allow: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    scale: float, softcap: float, win_left: int, win_right: int, want_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, kv_lens, q_lens, q_ids, kv_ids, allow, bias, scale, softcap, win_left, win_right, want_stats)


@_flash_op.register_fake
def _flash_op_fake(q, k, v, kv_lens, q_lens, q_ids, kv_ids, allow, bias, scale, softcap, win_left, win_right, want_stats):
    B, Hq, Lq, _ = q.shape
    acc = _acc_dtype(q.dtype)
    out = q.new_empty((B, Hq, Lq, v.shape[3]))
    return out, q.new_empty((B, Hq, Lq), dtype=acc), q.new_empty((B, Hq, Lq), dtype=acc), q.new_empty((B, Hq, Lq), dtype=acc)


@torch.library.custom_op("selfattn::cpu_flash_attention_backward", mutates_args=(), device_types="cpu")
def _flash_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, row_max: torch.Tensor, row_log: torch.Tensor,
    kv_lens: Optional[torch.Tensor], q_lens: Optional[torch.Tensor],
    q_ids: Optional[torch.Tensor], kv_ids: Optional[torch.Tensor],
    allow: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    scale: float, softcap: float, win_left: int, win_right: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask_args = (kv_lens, q_lens, q_ids, kv_ids, allow, bias, win_left, win_right)
    return _launch_backward(grad_out, q, k, v, out, row_max, row_log, mask_args, scale, softcap)


@_flash_backward_op.register_fake
def _flash_backward_op_fake(grad_out, q, k, v, out, row_max, row_log, kv_lens, q_lens, q_ids, kv_ids, allow, bias, scale, softcap, win_left, win_right):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_lens, q_lens, q_ids, kv_ids, allow, bias, scale, softcap, win_left, win_right, _ = inputs
    out, row_max, row_log, ent = output
    ctx.mark_non_differentiable(row_max, row_log, ent)
    ctx.save_for_backward(q, k, v, out, row_max, row_log, kv_lens, q_lens, q_ids, kv_ids, allow, bias)
    ctx.options = (scale, softcap, win_left, win_right)


def _backward(ctx, grad_out, grad_max, grad_log, grad_ent):
    q, k, v, out, row_max, row_log, kv_lens, q_lens, q_ids, kv_ids, allow, bias = ctx.saved_tensors
    dq, dk, dv = torch.ops.selfattn.cpu_flash_attention_backward(
        grad_out, q, k, v, out, row_max, row_log, kv_lens, q_lens, q_ids, kv_ids, allow, bias, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("selfattn::cpu_flash_attention", _backward, setup_context=_setup_context)


class _EagerFlash(torch.autograd.Function):
    """The op and its autograd formula without torch.library's dispatch, for eager calls: the same
    launchers, so the same numbers, with less overhead per call (which matters for the small heads
    of ``selfattn train``). Under torch.compile the custom ops are used."""

    @staticmethod
    def forward(ctx, q, k, v, *rest):
        acc = _acc_dtype(q.dtype)
        ready = [_ready(t, acc) for t in (q, k, v)]
        out, row_max, row_log, ent = _forward_impl(*ready, *rest)
        ctx.mark_non_differentiable(row_max, row_log, ent)
        # keep the kernels' copies (strided heads made contiguous) when they have the inputs' dtype:
        # the backward pass reads them as they are, for the memory the inputs would have taken
        keep = [r if r.dtype == t.dtype else t for r, t in zip(ready, (q, k, v))]
        out = out.to(q.dtype)
        ctx.save_for_backward(*keep, out, row_max, row_log, *rest[:6])
        ctx.options = rest[6:10]  # scale, softcap, win_left, win_right
        return out, row_max, row_log, ent

    @staticmethod
    def backward(ctx, grad_out, grad_max, grad_log, grad_ent):
        q, k, v, out, row_max, row_log, *mask = ctx.saved_tensors
        scale, softcap, win_left, win_right = ctx.options
        dq, dk, dv = _launch_backward(grad_out, q, k, v, out, row_max, row_log, (*mask, win_left, win_right), scale, softcap)
        return dq, dk, dv, *([None] * 11)


# -- the backend --------------------------------------------------------------------------------


class CPUBackend(Backend):
    name = "cpu"
    summary = "fused flash-style numba kernel (forward + backward), O(L) memory, skips masked tiles, stats for free"
    features = {
        "masks": "all (causal, window, padding, documents natively with tile skipping; dense bool/float element-wise)",
        "dtypes": "float32, float64; float16/bfloat16 accumulate in float32",
        "stats": "yes, from the online softmax (no gradient through them)",
        "softcap": "yes",
        "dropout": "no (refused)",
        "backward": "fused, deterministic; no double backward, no gradient for a float mask",
        "device": "cpu only",
        "memory": "O(L)",
    }
    capabilities = Backend.capabilities.replace(
        devices=frozenset({"cpu"}), mask_kinds=frozenset({"causal", "window", "padding", "documents", "dense_bool", "dense_float"}),
        dropout=False, generator=False, positions=False, alibi=False, sinks=False, float_mask_grad=False, requires=("numba",))

    def unsupported(self, q, k, v, req: Request):
        if _k is None:
            return "numba (not installed)"
        if req.device.type != "cpu":
            return f"device {req.device.type!r} (CPU tensors only)"
        if req.dropout_p > 0:
            return "dropout (dropout_p > 0; backend 'math' or 'sdpa' supports it)"
        parts = () if req.mask is None else (req.mask.parts if isinstance(req.mask, _masks.And) else (req.mask,))
        for part in parts:
            if not isinstance(part, _ATOMIC):
                return f"mask {type(part).__name__}"
            if isinstance(part, _masks.Dense) and part.tensor.requires_grad:
                return "gradient with respect to a float mask"
        return None

    def rank(self, req: Request) -> float:
        # Always below math (50). sdpa ranks 10, or 20 when it needs a dense Lq x Lk mask tensor, and
        # cannot serve stats or softcap at all. The rest follows BENCHMARKS.md, "CPU backend (issue 5)"
        # and "Short sequences (issue 7)": cpu's speed over sdpa's on the 2-core machine:
        # - window / padding / documents (or causal with Lq != Lk): sdpa gets an L x L mask and does all
        #   L^2 work, cpu skips the ruled-out tiles (window 44-61x, packed documents 13.6-17.5x): 15;
        # - float32, no mask or causal: 8, before sdpa, where cpu was faster -- with gradients from 32
        #   keys on, without from B*H*Lq*Lk*D = 4e6 on (1 and 2 threads) -- else 30. numba's workqueue
        #   layer (which `selfattn train` selects) hands tasks to its threads at ~0.1 ms a call: with
        #   more than one thread there, short sequences go to sdpa;
        # - bfloat16 (0.85-1.23x: no clear winner), float16 and float64 (not measured), and masks
        #   given only as dense tensors (0.78-0.83x: sdpa reads the mask once, cpu classifies tiles
        #   first): 30, sdpa first.
        kinds = req.mask_kinds
        if kinds & {"window", "padding", "documents"} or ("causal" in kinds and req.q_len != req.kv_len):
            return 15.0
        if kinds <= {"causal"} and req.dtype == torch.float32:
            work = req.batch * req.q_heads * req.q_len * req.kv_len * req.head_dim
            if torch.get_num_threads() > 1 and _k is not None and numba.config.THREADING_LAYER == "workqueue":
                return 8.0 if work >= 5e7 else 30.0
            return 8.0 if (req.requires_grad and req.kv_len >= 32) or work >= 4e6 else 30.0
        return 30.0

    def forward(self, q, k, v, req: Request):
        kv_lens, q_lens, q_ids, kv_ids, allow, bias, left, right = _mask_args(req.mask, req.q_len, req.kv_len)
        args = (q, k, v, kv_lens, q_lens, q_ids, kv_ids, allow, bias,
                req.scale, 0.0 if req.softcap is None else req.softcap, left, right, req.return_stats)
        if torch.compiler.is_compiling():
            out, row_max, row_log, ent = torch.ops.selfattn.cpu_flash_attention(*args)
        elif req.requires_grad:
            out, row_max, row_log, ent = _EagerFlash.apply(*args)
        else:  # nothing to differentiate: the launcher alone
            out, row_max, row_log, ent = _forward_impl(*args)
        if not req.return_stats:
            return out, None
        nats = _k.LN2 if ent.dtype == torch.float32 else 1.0  # float32 kernels count in base 2
        lse = ((row_max.double() + row_log.double()) * nats).to(ent.dtype)  # (B, Hq, Lq)
        return out, AttentionStats(lse, (row_max.double() * nats).to(ent.dtype), ent)


def _register():
    from . import register

    register(CPUBackend())


_register()
