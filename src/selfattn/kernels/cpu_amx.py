"""bfloat16 forward of the ``cpu`` backend on the AMX tile unit (issue 14).

The same algorithm, tile map and outputs as ``cpu_flash.flash_fwd`` (its module docstring), with the
two block products on AMX (``cpu_bf16.mm_amx``, bfloat16 operands, float32 sums) and everything else
in float32 with cpu_flash's own pieces (mask tests, vectorised row max and exp2)::

    s      = Q_blk @ K^T            AMX: Q's bfloat16 bits as they are, K^T packed once per kv head
    s      = scale, softcap, ALiBi, bias, mask     (float32, as cpu_flash._scores after its product)
    m, p, l, acc rescale                           (float32 online softmax, cpu_flash's row helpers)
    acc   += bf16(p) @ V_blk        AMX: p rounded to bfloat16 (the CPU's conversion), V packed once

Inputs are bfloat16, so Q, K and V reach the tile unit without rounding; p is rounded to bfloat16
(8 bits) before P V, which is what the bfloat16 tolerance rule allows (torch SDPA's bfloat16 kernels
do the same). The statistics (row max, lse halves, entropy) come from the float32 scores and p.

Operands are zero-padded to whole AMX tiles (``cpu_bf16``'s padding contract): Q as
(B, Hq, Lq rounded up to 16, D rounded up to 32); K^T as one panel of (D32/2, BLOCK_N, 2) pairs per
(batch, kv head, key block), keys past Lk zero; V as pairs (nK * BLOCK_N / 2, Dv rounded up to 16, 2)
per (batch, kv head). Grouped-query heads read their kv head's panels: nothing is repeated.

float16 inputs do not come here: float16 has 3 more mantissa bits than bfloat16, so rounding them to
bfloat16 would lose accuracy float16 callers are owed; they keep the float32 kernels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from numba import njit, prange
from numba.core import config as numba_config

from selfattn.kernels import numba_cache_dir
from selfattn.kernels import cpu_bf16 as _bf
from selfattn.kernels.cpu_flash import (
    BLOCK_M,
    BLOCK_N,
    EMPTY,
    FASTMATH,
    PARTIAL,
    _bx,
    _exp2_row,
    _mask_tile,
    _padded,
    _query_task,
    _row_has_nan,
    _row_max,
)

_CACHE_DIR, _NUMBA_CACHE_DIR = numba_cache_dir(), numba_config.CACHE_DIR
if _CACHE_DIR is not None:
    numba_config.CACHE_DIR = _CACHE_DIR

PAIRS_N = BLOCK_N // 2  # pair rows of V per key block


def available() -> bool:
    """The AMX forward may run here: ``cpu_bf16.has_amx_bf16()`` (CPU, OS permission, environment)."""
    return _bf.has_amx_bf16()


def describe() -> str:
    """What the ``cpu`` backend does with bfloat16 inputs here (its ``features`` line)."""
    if available():
        return "products: AMX (forward: bfloat16 tiles, float32 softmax; backward: float32 kernels)"
    if _bf.host_has_amx_bf16():
        why = f"AMX turned off ({_bf.AMX_ENV_FLAG}=0 or {_bf.ENV_FLAG}=0)"
    else:
        why = "no AMX-BF16 here (or no tile permission from the OS)"
    return f"products: float32 fallback, inputs converted ({why})"


class AmxInputs(NamedTuple):
    """One call's operands as the tile unit reads them (bfloat16 bits as uint16, zero-padded)."""

    q: np.ndarray  # (B, Hq, Lq16, D32): queries, row-major, zero past D
    kt: np.ndarray  # (B, Hkv, nK, D32 // 2, BLOCK_N, 2): K^T pairs per key block, zero past Lk and D
    v: np.ndarray  # (B, Hkv, nK * PAIRS_N, Dv16, 2): V pairs along keys, zero past Lk and Dv
    head_dim: int  # D (the scores' reduction length)
    kv_len: int  # Lk


@njit(fastmath=FASTMATH, cache=True)
def _score_terms(s, th, rows, ncols, b, h, qb, kb, kind, mask, opts):
    # s[:rows, :ncols] holds q.k: the rest of cpu_flash._scores after its product, in its order;
    # returns nc (ncols rounded up to a vector), columns ncols..nc set to -inf
    r0, c0 = qb * BLOCK_M, kb * BLOCK_N
    nc = _padded(ncols)
    qk_scale = opts.qk_scale
    for i in range(rows):
        for j in range(ncols):
            s[i, j] *= qk_scale
    if opts.softcap_u > 0.0:
        # -- softcap: c * tanh(u), c already in score units (the product in float64, rounded once) --
        cu = opts.softcap_u64
        for i in range(rows):
            for j in range(ncols):
                t = np.tanh(s[i, j])
                th[i, j] = t
                s[i, j] = cu * t
    if mask.alibi.size > 0:
        # -- ALiBi: - slope * |q_pos - kv_pos|, slope in score units --
        pb = _bx(mask.q_pos_f.shape[0], b)
        slope = mask.alibi[_bx(mask.alibi.shape[0], b), h]
        kvpos = mask.kv_pos_f[_bx(mask.kv_pos_f.shape[0], b)]
        for i in range(rows):
            qp = mask.q_pos_f[pb, r0 + i]
            for j in range(ncols):
                s[i, j] -= slope * abs(qp - kvpos[c0 + j])
    if mask.bias.size > 0:
        # -- float mask: add its bias (already in score units) --
        st = mask.bias_strides
        bb = b * st[0] + h * st[1]
        for i in range(rows):
            base = bb + (r0 + i) * st[2] + c0 * st[3]
            for j in range(ncols):
                bv = mask.bias[base + j * st[3]]
                s[i, j] = -np.inf if bv == -np.inf else s[i, j] + bv
    if kind == PARTIAL:
        _mask_tile(s, rows, ncols, b, h, qb, kb, mask)
    if ncols < nc:
        for i in range(rows):
            for j in range(ncols, nc):
                s[i, j] = -np.inf
    return nc


@njit(fastmath=FASTMATH, cache=True)
def _fwd_task(t, inp, out, row_max, row_log, ent, counts, mask, opts):
    B, Hq, Lq, Dv = out.shape
    D = inp.head_dim
    nK = inp.kt.shape[2]
    Dv16 = inp.v.shape[3]
    nat = opts.nat
    tiles = mask.tiles
    b, h, hk, qb, r0, rows, tb, th_ = _query_task(t, out, inp.kt, tiles)
    Lk = inp.kv_len
    q_blk = inp.q[b, h, r0:r0 + BLOCK_M]
    s = np.empty((BLOCK_M, BLOCK_N), np.float32)
    p = np.empty((BLOCK_M, BLOCK_N), np.float32)
    p16 = np.zeros((BLOCK_M, BLOCK_N), np.uint16)
    tanh_buf = np.empty((BLOCK_M, BLOCK_N) if opts.softcap_u > 0.0 else (1, 1), np.float32)
    acc = np.zeros((BLOCK_M, Dv16), np.float32)
    stat = np.zeros(1 if opts.want_stats else 0, np.float32)
    m_i = np.full(BLOCK_M, -np.inf, np.float32)
    l_i = np.zeros(BLOCK_M, np.float32)
    e_i = np.zeros(BLOCK_M, np.float32)
    n_tiles = 0
    _bf.amx_begin()
    for kb in range(nK):
        kind = tiles[tb, th_, qb, kb]
        if kind == EMPTY:
            continue
        n_tiles += 1
        c0 = kb * BLOCK_N
        ncols = min(BLOCK_N, Lk - c0)
        # -- s = Q_blk K^T on the tile unit, then cpu_flash's score terms --
        _bf.mm_amx(q_blk, inp.kt[b, hk, kb], s, rows, D, ncols)
        nc = _score_terms(s, tanh_buf, rows, ncols, b, h, qb, kb, kind, mask, opts)
        for i in range(rows):
            # -- new running max --
            m_old = m_i[i]
            m_tile = _row_max(s, i, nc)
            m_new = m_tile if m_tile > m_old else m_old
            if m_new == -np.inf:
                # nothing allowed here so far -- unless the scores are NaN (NaN inputs): poison the row
                for j in range(nc):
                    p[i, j] = 0.0
                if _row_has_nan(s, i, nc):
                    l_i[i] = np.nan
                continue
            # -- p = exp(s - m_new), its row sum and sum p*(s - m_new) --
            tot = _exp2_row(s, p, i, nc, m_new, stat)
            # -- rescale the running sums and the accumulator --
            l_old = l_i[i]
            if m_old == m_new:
                alpha = 1.0
            elif m_old == -np.inf:
                alpha = 0.0
            else:
                alpha = math.exp((m_old - m_new) * nat)
            l_i[i] = alpha * l_old + tot
            if opts.want_stats:
                ps = stat[0]
                e_i[i] = alpha * (e_i[i] + (m_old - m_new) * l_old) + ps if l_old > 0.0 else ps
            m_i[i] = m_new
            if alpha != 1.0:
                for d in range(Dv16):
                    acc[i, d] *= alpha
        # -- acc += bf16(p) @ V_blk on the tile unit (p's columns past nc, to the tile's 32, zero) --
        _bf.to_bf16_rows(p, p16, rows, nc)
        k32 = (ncols + 31) // 32 * 32
        if nc < k32:
            for i in range(rows):
                for j in range(nc, k32):
                    p16[i, j] = 0
        pv = c0 // 2
        _bf.mm_amx_add(p16, inp.v[b, hk, pv:pv + PAIRS_N], acc, rows, ncols, Dv)
    _bf.amx_end()
    for i in range(rows):
        gi = r0 + i
        li = l_i[i]
        if li == 0.0:
            # fully-masked row: out 0, lse -inf, max -inf, entropy 0
            for d in range(Dv):
                out[b, h, gi, d] = 0.0
            row_max[b, h, gi] = -np.inf
            row_log[b, h, gi] = 0.0
            ent[b, h, gi] = 0.0
        else:
            inv = 1.0 / li
            for d in range(Dv):
                out[b, h, gi, d] = acc[i, d] * inv
            row_max[b, h, gi] = m_i[i] if li == li else np.nan  # a NaN row is NaN throughout
            row_log[b, h, gi] = math.log2(li) if opts.base2 else math.log(li)
            if opts.want_stats:
                # -- entropy H = ln l - sum p (s - m) / l, in nats --
                h_row = math.log(li) - e_i[i] * inv * nat
                ent[b, h, gi] = h_row if h_row > 0.0 or h_row != h_row else 0.0
    counts[t] = n_tiles


@njit(parallel=True, cache=True)
def flash_fwd_amx(inp, out, row_max, row_log, ent, counts, mask, opts):
    """``cpu_flash.flash_fwd`` for bfloat16 inputs with its products on AMX: one task per (batch, head,
    query block) over its non-empty key tiles; the same outputs (out float32 (B, Hq, Lq, Dv), the lse
    halves in score units, entropy in nats, counts[task] = tiles computed). ``inp``: :class:`AmxInputs`
    (:func:`prepare`); ``mask``/``opts``: cpu_flash's records for float32 (base-2 score units)."""
    for t in prange(counts.shape[0]):
        _fwd_task(t, inp, out, row_max, row_log, ent, counts, mask, opts)


@njit(cache=True)
def flash_fwd_amx_serial(inp, out, row_max, row_log, ent, counts, mask, opts):
    for t in range(counts.shape[0]):
        _fwd_task(t, inp, out, row_max, row_log, ent, counts, mask, opts)


@njit(fastmath=FASTMATH, cache=True)
def _pack_task(t, k16, v16, kt, vp):
    # task t = (batch, kv head, key block): its K^T panel and its V pair rows (buffers zeroed before)
    B, Hkv, Lk, D = k16.shape
    nK = kt.shape[2]
    kb = t % nK
    hk = (t // nK) % Hkv
    b = t // (nK * Hkv)
    c0 = kb * BLOCK_N
    ncols = min(BLOCK_N, Lk - c0)
    _bf.pack_pairs_t(k16[b, hk, c0:c0 + ncols], kt[b, hk, kb])
    pv = c0 // 2
    _bf.pack_pairs(v16[b, hk, c0:c0 + ncols], vp[b, hk, pv:pv + (ncols + 1) // 2])


@njit(parallel=True, cache=True)
def pack_kv(k16, v16, kt, vp):
    """K^T panels and V pairs of every (batch, kv head, key block) into zeroed kt and vp (AmxInputs)."""
    for t in prange(kt.shape[0] * kt.shape[1] * kt.shape[2]):
        _pack_task(t, k16, v16, kt, vp)


@njit(cache=True)
def pack_kv_serial(k16, v16, kt, vp):
    for t in range(kt.shape[0] * kt.shape[1] * kt.shape[2]):
        _pack_task(t, k16, v16, kt, vp)


numba_config.CACHE_DIR = _NUMBA_CACHE_DIR

#: calls and tile products served by the AMX forward since import (tests check the path was taken)
AMX_CALLS = {"calls": 0, "tiles": 0}


def _bits(t):
    # a bfloat16 tensor's bits as a uint16 numpy array (no copy when contiguous)
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def prepare(q, k, v, threads: int = 1) -> AmxInputs:
    """The :class:`AmxInputs` of bfloat16 q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    d32, lq16, dv16 = -(-D // 32) * 32, -(-Lq // 16) * 16, -(-Dv // 16) * 16
    nK = -(-Lk // BLOCK_N)
    qp = torch.nn.functional.pad(q.detach(), (0, d32 - D, 0, lq16 - Lq))  # (B, Hq, Lq16, D32) zero-padded
    kt = np.zeros((B, Hkv, nK, d32 // 2, BLOCK_N, 2), np.uint16)
    vp = np.zeros((B, Hkv, nK * PAIRS_N, dv16, 2), np.uint16)
    (pack_kv if threads > 1 else pack_kv_serial)(_bits(k.detach()), _bits(v.detach()), kt, vp)
    return AmxInputs(q=_bits(qp), kt=kt, v=vp, head_dim=D, kv_len=Lk)


def launch_forward(q, k, v, sinks, call):
    """``backends.cpu._launch_forward`` for bfloat16 q, k, v on AMX: (out bfloat16, row_max, row_log,
    max_logit, entropy), the last four float32 as the float32 kernels give them."""
    from selfattn.backends import cpu as _cpu

    B, Hq, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    mask = _cpu._kernel_mask(call.low, torch.float32)
    opts = _cpu._opts(torch.float32, call)
    counts = np.zeros(B * Hq * (-(-Lq // BLOCK_M)), np.int64)  # one per task
    threads = _cpu._threads(len(counts), 4.0 * B * Hq * Lq * Lk * D)
    if threads > 1:
        _cpu._kernel("flash_fwd", threads)  # numba's pool set to `threads` (and torch's count kept)
    inp = prepare(q, k, v, threads)
    out = torch.empty(B, Hq, Lq, Dv, dtype=torch.float32)
    row_max, row_log, ent = (torch.empty(B, Hq, Lq, dtype=torch.float32) for _ in range(3))
    kernel = flash_fwd_amx if threads > 1 else flash_fwd_amx_serial
    kernel(inp, out.numpy(), row_max.numpy(), row_log.numpy(), ent.numpy(), counts, mask, opts)
    tiles = int(counts.sum())
    _cpu.TILE_PRODUCTS["forward"] += tiles
    AMX_CALLS["calls"] += 1
    AMX_CALLS["tiles"] += tiles
    max_logit = row_max * float(opts.nat)  # (B, Hq, Lq) nats, keys only
    if sinks is not None:
        out, row_max, row_log, ent = _cpu._fold_sinks(out, row_max, row_log, ent, sinks, opts)
    return out.to(q.dtype), row_max, row_log, max_logit, ent
