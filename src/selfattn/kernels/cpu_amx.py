"""bfloat16 forward and backward of the ``cpu`` backend on the AMX tile unit (issue 14).

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

**Backward** (``flash_bwd_amx``): cpu_flash's two passes with the same recomputation from the lse
halves, every product on AMX. Per query block: S, P, dP = dO V^T (V^T panels), then
dQ = bf16(P (dP - c)) K - (delta - c) bf16(P) K with K as pairs along keys and delta = rowsum(P dP).
Per key block, over its group's query tiles: dV^T += dO^T bf16(P) and dK^T += Q^T bf16(dS) (AMX has
no transposed-A form: dO^T and Q^T are made once per head, P and dS packed as pairs of query rows).
The backward of a ring shard (``shard_backward``, with a given delta) stays on the float32 kernels.

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
    _finish_rows,
    BLOCK_N,
    EMPTY,
    FASTMATH,
    _bx,
    _exp2_row,
    _probs,
    _query_task,
    _row_has_nan,
    _row_max,
    _score_terms,
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
        return "products: AMX (bfloat16 tiles, float32 softmax and sums; forward and backward)"
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
        nc = _score_terms(s, tanh_buf, rows, ncols, False, b, h, qb, kb, kind, mask, opts)
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
    _finish_rows(acc, m_i, l_i, e_i, m_i[:0], rows, b, h, r0, out, row_max, row_log, ent, opts)
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


# -- backward on AMX ------------------------------------------------------------------------------
# cpu_flash's two passes (flash_bwd_q, then flash_bwd_kv), with every product on the tile unit. AMX
# has no transposed-A form, so the kv pass computes dV^T += dO^T P and dK^T += Q^T dS with dO^T and
# Q^T made once per head and P, dS packed as pairs of query rows (cpu_bf16.pack_pairs_rows); P and
# dS are rounded to bfloat16 for their products (as P is in the forward).


class AmxGradInputs(NamedTuple):
    """The backward's operands (bfloat16 bits as uint16, zero-padded to whole tiles)."""

    q: np.ndarray  # (B, Hq, Lq16, D32): queries, row-major
    qt: np.ndarray  # (B, Hq, D16, LqM): Q^T, LqM = Lq rounded up to BLOCK_M
    do: np.ndarray  # (B, Hq, Lq16, Dv32): the output's gradient, row-major
    dot: np.ndarray  # (B, Hq, Dv16, LqM): dO^T
    kt: np.ndarray  # (B, Hkv, nK, D32 // 2, BLOCK_N, 2): K^T pairs per key block (S = Q K^T)
    vt: np.ndarray  # (B, Hkv, nK, Dv32 // 2, BLOCK_N, 2): V^T pairs per key block (dP = dO V^T)
    k: np.ndarray  # (B, Hkv, nK * PAIRS_N, D16, 2): K pairs along keys (dQ = dS K)
    c: np.ndarray  # float32 (B, Hq, Lq): rowsum(dO * O), delta up to the output's rounding
    head_dim: int
    v_dim: int
    kv_len: int


@njit(fastmath=FASTMATH, cache=True)
def _bf16_block(x, x16, rows, nc, k32):
    # x16[:rows, :k32] = bfloat16(x[:rows, :nc]), zero in columns nc..k32 (the product's padding)
    _bf.to_bf16_rows(x, x16, rows, nc)
    if nc < k32:
        for i in range(rows):
            for j in range(nc, k32):
                x16[i, j] = 0


@njit(fastmath=FASTMATH, cache=True)
def _bwd_q_task_amx(t, g, row_max, row_log, delta, dq, counts, mask, opts):
    B, Hq, Lq, D = dq.shape
    Lk = g.kv_len
    nK = g.kt.shape[2]
    D16 = g.k.shape[3]
    softcap = opts.softcap
    tiles = mask.tiles
    b, h, hk, qb, r0, rows, tb, th_ = _query_task(t, dq, g.kt, tiles)
    q_blk = g.q[b, h, r0:r0 + BLOCK_M]
    do_blk = g.do[b, h, r0:r0 + BLOCK_M]
    s = np.empty((BLOCK_M, BLOCK_N), np.float32)
    p = np.zeros((BLOCK_M, BLOCK_N), np.float32)
    dp = np.empty((BLOCK_M, BLOCK_N), np.float32)
    p16 = np.zeros((BLOCK_M, BLOCK_N), np.uint16)
    ds16 = np.zeros((BLOCK_M, BLOCK_N), np.uint16)
    tanh_buf = np.empty((BLOCK_M, BLOCK_N) if softcap > 0.0 else (1, 1), np.float32)
    pdk = np.zeros((BLOCK_M, D16), np.float32)  # sum_j p (dP - c) k
    pk = np.zeros((BLOCK_M, D16), np.float32)  # sum_j p k
    dl = np.zeros(BLOCK_M, np.float32)  # sum_j p dP
    n_tiles = 0
    _bf.amx_begin()
    for kb in range(nK):
        kind = tiles[tb, th_, qb, kb]
        if kind == EMPTY:
            continue
        n_tiles += 1
        c0 = kb * BLOCK_N
        ncols = min(BLOCK_N, Lk - c0)
        k32 = (ncols + 31) // 32 * 32
        _bf.mm_amx(q_blk, g.kt[b, hk, kb], s, rows, D, ncols)
        nc = _score_terms(s, tanh_buf, rows, ncols, False, b, h, qb, kb, kind, mask, opts)
        _probs(s, p, rows, nc, row_max, row_log, b, h, r0, opts)
        # -- dP = dO V^T --
        _bf.mm_amx(do_blk, g.vt[b, hk, kb], dp, rows, g.v_dim, ncols)
        # -- delta += rowsum(P * dP); dP becomes P * (dP - c) (columns past Lk: p = 0) --
        for i in range(rows):
            acc = dl[i]
            ci = g.c[b, h, r0 + i]
            for j in range(nc):
                acc += p[i, j] * dp[i, j]
                dp[i, j] = p[i, j] * (dp[i, j] - ci)
            dl[i] = acc
            if softcap > 0.0:
                # -- the softcap's c (1 - tanh^2) multiplies both terms of dS --
                for j in range(ncols):
                    w = softcap * (1.0 - tanh_buf[i, j] * tanh_buf[i, j])
                    dp[i, j] *= w
                    p[i, j] *= w
        # -- (P * (dP - c)) k and P k on the tile unit --
        _bf16_block(dp, ds16, rows, nc, k32)
        _bf16_block(p, p16, rows, nc, k32)
        kp = g.k[b, hk, c0 // 2:c0 // 2 + PAIRS_N]
        _bf.mm_amx_add(ds16, kp, pdk, rows, ncols, D)
        _bf.mm_amx_add(p16, kp, pk, rows, ncols, D)
    _bf.amx_end()
    for i in range(rows):
        gi = r0 + i
        delta[b, h, gi] = dl[i]
        shift = dl[i] - g.c[b, h, gi]
        for d in range(D):
            dq[b, h, gi, d] = (pdk[i, d] - shift * pk[i, d]) * opts.dscale
    counts[t] = n_tiles


@njit(fastmath=FASTMATH, cache=True)
def _bwd_kv_task_amx(t, g, row_max, row_log, delta, dk, dv, counts, mask, opts):
    B, Hkv, Lk, D = dk.shape
    Hq, Lq = g.c.shape[1], g.c.shape[2]
    Dv = g.v_dim
    group = Hq // Hkv
    nQ = (Lq + BLOCK_M - 1) // BLOCK_M
    nK = g.kt.shape[2]
    softcap, dscale = opts.softcap, opts.dscale
    tiles = mask.tiles
    kb = t % nK
    hk = (t // nK) % Hkv
    b = t // (nK * Hkv)
    c0 = kb * BLOCK_N
    tb = _bx(tiles.shape[0], b)
    ncols = min(BLOCK_N, Lk - c0)
    s = np.empty((BLOCK_M, BLOCK_N), np.float32)
    p = np.zeros((BLOCK_M, BLOCK_N), np.float32)
    dp = np.empty((BLOCK_M, BLOCK_N), np.float32)
    pairs = np.zeros((PAIRS_N, BLOCK_N, 2), np.uint16)  # P or dS as pairs of query rows
    tanh_buf = np.empty((BLOCK_M, BLOCK_N) if softcap > 0.0 else (1, 1), np.float32)
    dvt = np.zeros((g.dot.shape[2], BLOCK_N), np.float32)  # dV^T (Dv16 x keys)
    dkt = np.zeros((g.qt.shape[2], BLOCK_N), np.float32)  # dK^T (D16 x keys)
    n_tiles = 0
    _bf.amx_begin()
    for gh in range(group):
        h = hk * group + gh
        th_ = _bx(tiles.shape[1], h)
        for qb in range(nQ):
            kind = tiles[tb, th_, qb, kb]
            if kind == EMPTY:
                continue
            n_tiles += 1
            r0 = qb * BLOCK_M
            rows = min(BLOCK_M, Lq - r0)
            half = (rows + 1) // 2
            r32 = (rows + 31) // 32 * 32
            _bf.mm_amx(g.q[b, h, r0:r0 + BLOCK_M], g.kt[b, hk, kb], s, rows, D, ncols)
            nc = _score_terms(s, tanh_buf, rows, ncols, False, b, h, qb, kb, kind, mask, opts)
            _probs(s, p, rows, nc, row_max, row_log, b, h, r0, opts)
            # -- dV^T += dO^T P --
            _bf.pack_pairs_rows(p, pairs, rows, nc)
            for pr in range(half, r32 // 2):
                for j in range(nc):
                    pairs[pr, j, 0] = 0
                    pairs[pr, j, 1] = 0
            _bf.mm_amx_add(g.dot[b, h, :, r0:r0 + BLOCK_M], pairs, dvt, Dv, rows, ncols)
            # -- dP = dO V^T; dS = P * (dP - delta), times the softcap's c (1 - tanh^2) --
            _bf.mm_amx(g.do[b, h, r0:r0 + BLOCK_M], g.vt[b, hk, kb], dp, rows, Dv, ncols)
            for i in range(rows):
                di = delta[b, h, r0 + i]
                for j in range(nc):
                    dp[i, j] = p[i, j] * (dp[i, j] - di)
                if softcap > 0.0:
                    for j in range(ncols):
                        dp[i, j] *= softcap * (1.0 - tanh_buf[i, j] * tanh_buf[i, j])
            # -- dK^T += Q^T dS --
            _bf.pack_pairs_rows(dp, pairs, rows, nc)
            for pr in range(half, r32 // 2):
                for j in range(nc):
                    pairs[pr, j, 0] = 0
                    pairs[pr, j, 1] = 0
            _bf.mm_amx_add(g.qt[b, h, :, r0:r0 + BLOCK_M], pairs, dkt, D, rows, ncols)
    _bf.amx_end()
    for j in range(ncols):
        for d in range(D):
            dk[b, hk, c0 + j, d] = dkt[d, j] * dscale
        for d in range(Dv):
            dv[b, hk, c0 + j, d] = dvt[d, j]
    counts[t] = n_tiles


@njit(parallel=True, cache=True)
def flash_bwd_amx(g, row_max, row_log, delta, dq, dk, dv, counts_q, counts_kv, mask, opts):
    """cpu_flash's backward (flash_bwd_q, then flash_bwd_kv) with its products on AMX: dq (B, Hq, Lq, D),
    delta (B, Hq, Lq) = rowsum(P * dP), then dk (B, Hkv, Lk, D), dv (B, Hkv, Lk, Dv); float32."""
    for t in prange(counts_q.shape[0]):
        _bwd_q_task_amx(t, g, row_max, row_log, delta, dq, counts_q, mask, opts)
    for t in prange(counts_kv.shape[0]):
        _bwd_kv_task_amx(t, g, row_max, row_log, delta, dk, dv, counts_kv, mask, opts)


@njit(cache=True)
def flash_bwd_amx_serial(g, row_max, row_log, delta, dq, dk, dv, counts_q, counts_kv, mask, opts):
    for t in range(counts_q.shape[0]):
        _bwd_q_task_amx(t, g, row_max, row_log, delta, dq, counts_q, mask, opts)
    for t in range(counts_kv.shape[0]):
        _bwd_kv_task_amx(t, g, row_max, row_log, delta, dk, dv, counts_kv, mask, opts)


@njit(fastmath=FASTMATH, cache=True)
def _pack_bwd_task(t, k16, v16, kt, vt, kp):
    # task t = (batch, kv head, key block): its K^T and V^T panels and its K pair rows (buffers zeroed before)
    B, Hkv, Lk, D = k16.shape
    nK = vt.shape[2]
    kb = t % nK
    hk = (t // nK) % Hkv
    b = t // (nK * Hkv)
    c0 = kb * BLOCK_N
    ncols = min(BLOCK_N, Lk - c0)
    _bf.pack_pairs_t(k16[b, hk, c0:c0 + ncols], kt[b, hk, kb])
    _bf.pack_pairs_t(v16[b, hk, c0:c0 + ncols], vt[b, hk, kb])
    pv = c0 // 2
    _bf.pack_pairs(k16[b, hk, c0:c0 + ncols], kp[b, hk, pv:pv + (ncols + 1) // 2])


@njit(parallel=True, cache=True)
def pack_bwd(k16, v16, kt, vt, kp):
    """K^T and V^T panels and K pairs of every (batch, kv head, key block) into zeroed kt, vt, kp (AmxGradInputs)."""
    for t in prange(vt.shape[0] * vt.shape[1] * vt.shape[2]):
        _pack_bwd_task(t, k16, v16, kt, vt, kp)


@njit(cache=True)
def pack_bwd_serial(k16, v16, kt, vt, kp):
    for t in range(vt.shape[0] * vt.shape[1] * vt.shape[2]):
        _pack_bwd_task(t, k16, v16, kt, vt, kp)


numba_config.CACHE_DIR = _NUMBA_CACHE_DIR

#: calls and tile products served by the AMX forward since import (tests check the path was taken)
AMX_CALLS = {"calls": 0, "tiles": 0, "backward": 0}


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


def prepare_backward(q, k, v, do, out, threads: int = 1) -> AmxGradInputs:
    """The :class:`AmxGradInputs` of bfloat16 q, k, v, the output's gradient do and the output."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    F = torch.nn.functional
    r16 = lambda n, m: -(-n // m) * m  # noqa: E731
    lqm = r16(Lq, BLOCK_M)
    nK = -(-Lk // BLOCK_N)
    q, k, v, do = (t.detach() for t in (q, k, v, do))
    qp = F.pad(q, (0, r16(D, 32) - D, 0, r16(Lq, 16) - Lq))  # (B, Hq, Lq16, D32)
    qt = F.pad(q.transpose(-1, -2), (0, lqm - Lq, 0, r16(D, 16) - D))  # (B, Hq, D16, LqM)
    dop = F.pad(do, (0, r16(Dv, 32) - Dv, 0, r16(Lq, 16) - Lq))  # (B, Hq, Lq16, Dv32)
    dot = F.pad(do.transpose(-1, -2), (0, lqm - Lq, 0, r16(Dv, 16) - Dv))  # (B, Hq, Dv16, LqM)
    kt = np.zeros((B, Hkv, nK, r16(D, 32) // 2, BLOCK_N, 2), np.uint16)
    vt = np.zeros((B, Hkv, nK, r16(Dv, 32) // 2, BLOCK_N, 2), np.uint16)
    kp = np.zeros((B, Hkv, nK * PAIRS_N, r16(D, 16), 2), np.uint16)
    k16, v16 = _bits(k), _bits(v)
    (pack_bwd if threads > 1 else pack_bwd_serial)(k16, v16, kt, vt, kp)
    c = (do.float() * out.detach().float()).sum(-1)  # (B, Hq, Lq)
    return AmxGradInputs(q=_bits(qp), qt=_bits(qt), do=_bits(dop), dot=_bits(dot), kt=kt, vt=vt, k=kp,
                         c=c.contiguous().numpy(), head_dim=D, v_dim=Dv, kv_len=Lk)


def launch_backward(grad_out, q, k, v, out, row_max, row_log, call):
    """``backends.cpu._launch_backward`` for bfloat16 q, k, v (and out, grad_out) on AMX: (dq, dk, dv)
    in bfloat16, from the forward's lse halves (score units, float32)."""
    from selfattn.backends import cpu as _cpu

    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    mask = _cpu._kernel_mask(call.low, torch.float32)
    opts = _cpu._opts(torch.float32, call)
    counts_q = np.zeros(B * Hq * (-(-Lq // BLOCK_M)), np.int64)
    counts_kv = np.zeros(B * Hkv * (-(-Lk // BLOCK_N)), np.int64)
    threads = _cpu._threads(max(len(counts_q), len(counts_kv)), 10.0 * B * Hq * Lq * Lk * D)
    if threads > 1:
        _cpu._kernel("flash_fwd", threads)
    g = prepare_backward(q, k, v, grad_out.to(torch.bfloat16), out, threads)
    dq = torch.empty(B, Hq, Lq, D, dtype=torch.float32)
    dk = torch.empty(B, Hkv, Lk, D, dtype=torch.float32)
    dv = torch.empty(B, Hkv, Lk, Dv, dtype=torch.float32)
    delta = torch.empty(B, Hq, Lq, dtype=torch.float32)
    kernel = flash_bwd_amx if threads > 1 else flash_bwd_amx_serial
    kernel(g, row_max.detach().contiguous().numpy(), row_log.detach().contiguous().numpy(), delta.numpy(),
           dq.numpy(), dk.numpy(), dv.numpy(), counts_q, counts_kv, mask, opts)
    _cpu.TILE_PRODUCTS["backward_q"] += int(counts_q.sum())
    _cpu.TILE_PRODUCTS["backward_kv"] += int(counts_kv.sum())
    AMX_CALLS["backward"] += 1
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
