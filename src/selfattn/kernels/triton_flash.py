"""Flash attention in Triton: the kernels of the ``triton`` backend and their launchers.

The algorithm
-------------
Attention is ``O = softmax(S) V`` with one row of logits ``S[i, :]`` per query. A program never
holds a whole row: it streams the keys through in tiles of ``BLOCK_N`` and keeps, per query row,
a running maximum ``m``, a running sum ``l = sum_j exp(S_ij - m)`` and an unnormalised output
``acc = sum_j exp(S_ij - m) V_j`` (the *online softmax*). When a tile raises the maximum from
``m`` to ``m'``, everything accumulated so far is rescaled by ``alpha = exp(m - m')``; after the
last tile ``O = acc / l`` and ``lse = m + log l``. Exponentials are base 2 with log2(e) folded
into the scale (``exp2`` is one instruction), and the statistics are converted back to nats.

A *tile* is ``BLOCK_M`` query rows x ``BLOCK_N`` keys of one (batch, head). The mask arrives
lowered (:func:`selfattn.lowering.lower`, at exactly these block sizes) as a tile map: each
tile is EMPTY (skipped, its keys and values never read), FULL (computed with no masking at all)
or PARTIAL (computed, then the element-wise tests of the lowered record applied: the position
band ``-left <= kv_pos - q_pos <= right``, live rows and keys from padding / key padding,
document ids, a dense bool mask, and a mask function's bits stored for partial tiles only).
Per query block the launcher reduces the map to four tile indices ``start <= fs <= fe <= end``:
tiles outside [start, end) are empty, [fs, fe) is the longest run of FULL tiles (a loop with no
mask code, which the compiler pipelines), and [start, fs) and [fe, end) are looped with a
per-tile branch (skip EMPTY, mask the rest). Dense float masks and ALiBi add to every tile's
logits, in float32: ``s = q.k * scale -> softcap -> - slope * |q_pos - kv_pos| -> + bias``.

The backward recomputes ``P = exp2(S - m) / l`` from the saved row maximum and 1/row sum (never
from a rounded lse) and needs ``Delta_i = sum_j P_ij dP_ij = dO_i . O_i`` (a preprocess over the
float32 output kept by the forward, see "bfloat16 and the interpreter" below). Then two passes:

* **dK/dV pass**: one program per (key block, batch, KV head). It keeps K_j, V_j and the two
  accumulators in registers and loops over the query tiles of every query head in the GQA
  group (no atomics for dK, dV): ``dV += P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - Delta)``
  (times ``1 - tanh^2`` under softcap), ``dK += dS^T Q``. By default the same loop also adds
  ``dS K`` to dQ with float32 atomics.
* **dQ pass** (``deterministic=True`` only): one program per query block loops over the key
  tiles, ``dQ = sum_j dS K_j``, so dQ is reproducible bit for bit. It shares the row setup of
  the forward (:func:`_row_setup`) and its per-tile front half (:func:`_row_tile`: K load,
  logits, mask); the two loops around it stay separate on purpose, as their bodies differ
  (online softmax and P V there, dS K here).

Each pass has its own block sizes and so its own lowering of the mask (``lower`` caches them):
forward :func:`fwd_blocks`, dK/dV :func:`bwd_blocks`, dQ :func:`dq_blocks`.

Working set per program (registers / shared memory, head dims padded to a power of two HD, HDv):
forward ``Q`` tile BLOCK_M x HD, ``acc`` BLOCK_M x HDv float32, one K and V tile BLOCK_N x
(HD + HDv) per pipeline stage, the BLOCK_M x BLOCK_N logits; dK/dV pass K, V, dK, dV (BLOCK_N x
(2 HD + 2 HDv)) plus one Q/dO tile per stage; dQ pass Q, dO, dQ (BLOCK_M x (2 HD + HDv)).

FLOPs and memory. Per allowed (query, key) pair the forward does 2 D (QK^T) + 2 Dv (PV) flops,
the backward 2 D (QK^T again) + 2 Dv (dP) + 2 Dv (dV) + 2 D (dK) + 2 D (dQ): with D = Dv that is
4 D forward and 10 D backward, DESIGN.md's 4 B H Lq Lk D and x2.5. Memory traffic: the forward
reads Q once and K, V once per query block, ``(Lq / BLOCK_M) * Lk * (D + Dv)`` elements per head
(divided by the allowed share of tiles); extra memory is O(L): the output, float32 row statistics
(B, H, Lq) and, when a gradient is wanted, the float32 output. The backward reads Q, dO once per
key block and writes dQ (float32 atomics) once per key block.

bfloat16 and the interpreter. Triton's CPU interpreter converts float32 to bfloat16 by truncation
(a GPU rounds to nearest) and multiplies bfloat16 bit patterns as integers, so under the
interpreter (``DOT_F32``) products are taken in float64 from the float32 operands and rounded once,
and P is never rounded to bfloat16 before ``P V``. With truncation, a probability of 0.99999994
became 0.996 in ``P V`` and the stored bfloat16 output was truncated too; ``Delta`` taken from
that output no longer matched ``sum_j P dP`` and dQ, dK came out up to 4.7 where the exact value
is 0 (one key per row). The forward therefore writes a float32 output whenever a gradient is
wanted (and always under the interpreter), rounds it with torch, and the backward's ``Delta``
reads the float32 one. On a GPU, P is rounded to nearest for the tensor-core ``P V`` as in
FlashAttention.

Whether these kernels run compiled or in Triton's CPU interpreter is decided when this module is
executed (``triton.jit`` reads TRITON_INTERPRET then); ``INTERPRET`` records which.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
EMPTY = tl.constexpr(0)  # selfattn.masks.TileKind values
FULL = tl.constexpr(2)
# sizes that may equal 1 (one query when decoding, one head per group): never compile them in as constants
_NO_SPEC = ["q_heads", "kv_group", "seq_q", "seq_k", "win_left", "win_right", "tune_q", "tune_k"]


# -- small device helpers ---------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh from exp2 (no libdevice, so the interpreter runs it too); a series near 0 keeps
    # the relative error at float32 rounding where 1 - e would cancel
    ax = tl.abs(x)
    e = tl.exp2(ax * (-2.0 * LOG2E))
    far = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    near = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    t = tl.where(ax < 0.125, near, far)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _dot(a, b, F32: tl.constexpr, PRECISION: tl.constexpr):
    # F32 (interpreter only): it multiplies bfloat16 bit patterns as integers, so upcast; and
    # numpy's float32 matmul rounds q k^T and k q^T differently, while the GPU's MMA reduces over
    # the head dim in the same order both ways: accumulate in float64 and round once instead
    if F32:
        r = tl.dot(a.to(tl.float64), b.to(tl.float64), out_dtype=tl.float64).to(tl.float32)
    else:
        r = tl.dot(a, b, input_precision=PRECISION)
    return r


@triton.jit
def _load2(ptrs, mask_r, mask_c, CHECK_R: tl.constexpr, CHECK_C: tl.constexpr):
    # a 2-D tile load that masks only the dimensions that can run out of bounds
    if CHECK_R and CHECK_C:
        x = tl.load(ptrs, mask=mask_r[:, None] & mask_c[None, :], other=0.0)
    elif CHECK_R:
        x = tl.load(ptrs, mask=mask_r[:, None], other=0.0)
    elif CHECK_C:
        x = tl.load(ptrs, mask=mask_c[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _row_setup(pid_m, b, hq0, Rows, r_str, Slopes, sl_str, seq_q,
               PACK: tl.constexpr, POS: tl.constexpr, LIVE_ROWS: tl.constexpr, ALIBI: tl.constexpr,
               BLOCK_M: tl.constexpr):
    # The BLOCK_M rows of a forward or dQ program: PACK query heads (of one KV head) x seq_q
    # queries, flattened; PACK = 1 is one head. Returns the row offsets, which are real, each
    # row's query index (0 for rows past the end) and head, its position (POS), whether it is a
    # live query (LIVE_ROWS: not padding) and its ALiBi slope (float32).
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < PACK * seq_q
    if PACK == 1:
        rows = tl.where(row_ok, offs_r, 0)
        heads = hq0 + tl.zeros([BLOCK_M], dtype=tl.int32)
    else:
        rows = tl.where(row_ok, offs_r % seq_q, 0)
        heads = hq0 + tl.where(row_ok, offs_r // seq_q, 0)
    meta = Rows + b.to(tl.int64) * r_str[1] + rows * r_str[2]  # field 0 position, 1 live, 2.. document ids
    q_pos = rows * 0
    if POS:
        q_pos = tl.load(meta)
    live = row_ok
    if LIVE_ROWS:
        live = live & (tl.load(meta + r_str[0]) != 0)
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ALIBI:
        slope = tl.load(Slopes + b.to(tl.int64) * sl_str[0] + heads * sl_str[1])
    return offs_r, row_ok, rows, heads, q_pos, live, slope


@triton.jit
def _logits(qk, q_pos, kv_pos, slope, bias_ptrs, bias_ok, scale, scale_log2, softcap,
            SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr, NATURAL: tl.constexpr):
    # scores -> logits. Plain: log2 units, log2(e) folded into the scale. NATURAL (softcap, ALiBi
    # or a float mask): natural units in float32, and callers convert (s - max) * log2(e), which
    # rounds at the size of the difference rather than of the logit. Also returns tanh(s / softcap).
    # q_pos / kv_pos / slope come pre-broadcast (rows along one axis, keys along the other).
    t = qk
    if NATURAL:
        s = qk * scale
        if SOFTCAP:
            t = _tanh(s / softcap)
            s = softcap * t
        if ALIBI:
            s = s - slope * tl.abs(q_pos - kv_pos).to(tl.float32)
        if BIAS:
            s = s + tl.load(bias_ptrs, mask=bias_ok, other=NEG_INF).to(tl.float32)
    else:
        s = qk * scale_log2
    return s, t


@triton.jit
def _allowed(code, rows, cols, q_pos, kv_pos, row_live, row_meta, r_str, col_meta, c_str,
             allow_ptrs, FnBits, fn_str, seq_q, seq_k, win_left, win_right,
             BAND: tl.constexpr, LIVE_ROWS: tl.constexpr, LIVE_COLS: tl.constexpr,
             N_IDS: tl.constexpr, ALLOW: tl.constexpr, FN: tl.constexpr,
             BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    # The element-wise mask of a PARTIAL tile (the lowered record's tests). Arguments come
    # pre-broadcast: rows, q_pos, row_live, row_meta along one axis, cols, kv_pos, col_meta
    # along the other; ``code`` is the tile's map entry (kind + 4 * (function tile index + 1)).
    ok = (rows < seq_q) & (cols < seq_k)
    if BAND:
        rel = kv_pos - q_pos
        ok = ok & (rel >= -win_left) & (rel <= win_right)
    if LIVE_ROWS:
        ok = ok & row_live
    if LIVE_COLS:
        ok = ok & (tl.load(col_meta + c_str[0], mask=cols < seq_k, other=0) != 0)
    for d in tl.static_range(N_IDS):
        qid = tl.load(row_meta + (2 + d) * r_str[0], mask=rows < seq_q, other=-1)
        kid = tl.load(col_meta + (2 + d) * c_str[0], mask=cols < seq_k, other=-2)
        ok = ok & (qid == kid)
    if ALLOW:
        ok = ok & (tl.load(allow_ptrs, mask=(rows < seq_q) & (cols < seq_k), other=0) != 0)
    if FN:
        # -1: the function allows the whole tile (broadcast to the tile: the interpreter rejects a
        # load mask made of a scalar and a tensor)
        idx = (code >> 2) - 1 + rows * 0 + cols * 0
        bits = tl.load(FnBits + idx.to(tl.int64) * fn_str[0] + (rows % BLOCK_Q) * fn_str[1] + (cols % BLOCK_K) * fn_str[2],
                       mask=(idx >= 0) & (rows < seq_q) & (cols < seq_k), other=1)
        ok = ok & (bits != 0)
    return ok


@triton.jit
def _row_tile(q, kb, code, K, k_str, row, meta, coef,
              MASKED: tl.constexpr, D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BAND: tl.constexpr, POS: tl.constexpr, LIVE_ROWS: tl.constexpr,
              LIVE_COLS: tl.constexpr, N_IDS: tl.constexpr, ALLOW: tl.constexpr, BIAS: tl.constexpr,
              FN: tl.constexpr, ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, NATURAL: tl.constexpr,
              DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    # One key tile kb against a block of query rows (forward and dQ): load K^T, compute the
    # scores and logits, and in a MASKED tile apply the element-wise mask (-inf where ruled out).
    # row = (rows, q_pos, live, slope, row_meta, allow_row, bias_row): per-row state and pointers;
    # meta = (Cols at this batch, c_str, r_str, a_str, bias_str, FnBits, fn_str);
    # coef = (scale, scale_log2, softcap, win_left, win_right, seq_q, seq_k).
    rows, q_pos, row_live, slope, row_meta, allow_row, bias_row = row
    cols_b, c_str, r_str, a_str, bias_str, FnBits, fn_str = meta
    scale, scale_log2, softcap, win_left, win_right, seq_q, seq_k = coef
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < seq_k
    kt = _load2(K + offs_d[:, None] * k_str[3] + offs_n[None, :] * k_str[2],
                offs_d < D, n_in, D != HEAD_DIM, MASKED)  # (HEAD_DIM, BLOCK_N)
    col_meta = cols_b + offs_n * c_str[2]
    kv_pos = offs_n * 0
    if ALIBI or (BAND and MASKED):  # positions: ALiBi in every tile, the band in partial ones
        kv_pos = tl.load(col_meta, mask=n_in, other=0)
    qk = _dot(q, kt, DOT_F32, PRECISION)  # (BLOCK_M, BLOCK_N)
    s, t = _logits(qk, q_pos[:, None], kv_pos[None, :], slope[:, None],
                   bias_row[:, None] + offs_n[None, :].to(tl.int64) * bias_str[3], n_in[None, :],
                   scale, scale_log2, softcap, SOFTCAP, ALIBI, BIAS, NATURAL)
    ok = n_in[None, :]  # unused unless MASKED
    if MASKED:
        ok = _allowed(code, rows[:, None], offs_n[None, :], q_pos[:, None], kv_pos[None, :], row_live[:, None],
                      row_meta[:, None], r_str, col_meta[None, :], c_str,
                      allow_row[:, None] + offs_n[None, :].to(tl.int64) * a_str[3], FnBits, fn_str,
                      seq_q, seq_k, win_left, win_right, BAND, LIVE_ROWS, LIVE_COLS, N_IDS, ALLOW, FN,
                      BLOCK_M, BLOCK_N)
        s = tl.where(ok, s, NEG_INF)
    return offs_n, n_in, kt, qk, s, t, ok


@triton.jit
def _row_state(b64, rows, heads, q_pos, row_live, slope, Rows, r_str, Allow, a_str, Bias, bias_str):
    # the per-row tuple _row_tile takes
    row_meta = Rows + b64 * r_str[1] + rows * r_str[2]
    allow_row = Allow + b64 * a_str[0] + heads.to(tl.int64) * a_str[1] + rows.to(tl.int64) * a_str[2]
    bias_row = Bias + b64 * bias_str[0] + heads.to(tl.int64) * bias_str[1] + rows.to(tl.int64) * bias_str[2]
    return rows, q_pos, row_live, slope, row_meta, allow_row, bias_row


@triton.jit
def _span(ptr, stride):
    # a block's [start, fs, fe, end) from a span table (see the module docstring)
    return tl.load(ptr), tl.load(ptr + stride), tl.load(ptr + 2 * stride), tl.load(ptr + 3 * stride)


@triton.jit
def _phase(phase: tl.constexpr, start, fs, fe, end, c0, c1):
    # tile range of one of the three loops, inside this program's slice [c0, c1)
    if phase == 0:
        lo = tl.maximum(start, c0)
        hi = tl.minimum(fs, c1)
    elif phase == 1:
        lo = tl.maximum(fs, c0)
        hi = tl.minimum(fe, c1)
    else:
        lo = tl.maximum(fe, c0)
        hi = tl.minimum(end, c1)
    return lo, hi


# -- forward ----------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, e_i, q, row, meta, coef, t_lo, t_hi, K, V, k_str, v_str, tile_row, t_str,
    MASKED: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr, POS: tl.constexpr,
    LIVE_ROWS: tl.constexpr, LIVE_COLS: tl.constexpr, N_IDS: tl.constexpr, ALLOW: tl.constexpr,
    BIAS: tl.constexpr, FN: tl.constexpr, ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    NATURAL: tl.constexpr, STATS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    # key tiles [t_lo, t_hi) of one query block. MASKED: read each tile's kind, skip EMPTY ones and
    # apply the element-wise mask; otherwise every tile is FULL and whole (no test at all).
    offs_dv = tl.arange(0, HEAD_DIM_V)
    for kb in range(t_lo, t_hi):
        code = 2
        if MASKED:
            code = tl.load(tile_row + kb * t_str[3])
        if (code & 3) != EMPTY:
            offs_n, n_in, kt, qk, s, t, ok = _row_tile(
                q, kb, code, K, k_str, row, meta, coef, MASKED, D, HEAD_DIM, BLOCK_M, BLOCK_N, BAND, POS,
                LIVE_ROWS, LIVE_COLS, N_IDS, ALLOW, BIAS, FN, ALIBI, SOFTCAP, NATURAL, DOT_F32, PRECISION)
            v = _load2(V + offs_n[:, None] * v_str[2] + offs_dv[None, :] * v_str[3],
                       n_in, offs_dv < DV, MASKED, DV != HEAD_DIM_V)  # (BLOCK_N, HEAD_DIM_V)
            # -- new running max; a row with nothing allowed yet keeps -inf and shifts by 0 --
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
            # -- exponents (log2 units) of this tile relative to the new max, rounded once: the
            #    backward recomputes exactly these from the saved max and sum --
            if NATURAL:
                z = (s - m_use[:, None]) * LOG2E  # -inf where masked
                dm = (m_i - m_use) * LOG2E
            else:
                z = tl.fma(qk, coef[1], -m_use[:, None])
                dm = m_i - m_use
            p = tl.exp2(z)
            if MASKED and not NATURAL:
                p = tl.where(ok, p, 0.0)
            # -- rescale factor for everything accumulated so far --
            alpha = tl.exp2(dm)
            if STATS:
                # -- running sum of p * (s - max) for the entropy, moved to the new max --
                shift = tl.where(m_i == NEG_INF, 0.0, dm)
                e_i = alpha * (e_i + shift * l_i) + tl.sum(p * tl.where(p > 0.0, z, 0.0), 1)
            # -- rescale the running sum and add this tile's --
            l_i = l_i * alpha + tl.sum(p, 1)
            # -- rescale the output accumulator and add P V (P rounded to V's dtype on a GPU) --
            if DOT_F32:
                pv = _dot(p, v, DOT_F32, PRECISION)
            else:
                pv = _dot(p.to(v.dtype), v, DOT_F32, PRECISION)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
    return acc, l_i, m_i, e_i


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_fwd(
    Q, K, V, Out, Stats, Tiles, Span, Rows, Cols, Allow, Bias, FnBits, Slopes,
    q_str, k_str, v_str, o_str, st_str, t_str, sp_str, r_str, c_str, a_str, bias_str, fn_str, sl_str,
    q_heads, kv_group, seq_q, seq_k, scale, scale_log2, softcap, win_left, win_right,
    tune_q, tune_k,  # bucketed lengths: autotuning keys only
    D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    PACK: tl.constexpr, NUM_SPLITS: tl.constexpr, BAND: tl.constexpr, POS: tl.constexpr,
    LIVE_ROWS: tl.constexpr, LIVE_COLS: tl.constexpr, N_IDS: tl.constexpr, ALLOW: tl.constexpr,
    BIAS: tl.constexpr, FN: tl.constexpr, ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    NATURAL: tl.constexpr, STATS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # one program: BLOCK_M rows (a query block of one head, or PACK heads' queries) x one KV split
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    groups = q_heads // PACK
    b = pid_bh // groups
    hq0 = (pid_bh % groups) * PACK
    hkv = hq0 // kv_group
    b64 = b.to(tl.int64)
    offs_r, row_ok, rows, heads, q_pos, row_live, slope = _row_setup(
        pid_m, b, hq0, Rows, r_str, Slopes, sl_str, seq_q, PACK, POS, LIVE_ROWS, ALIBI, BLOCK_M)

    # the key tiles this query block visits (see the module docstring), cut to this split's slice
    start, fs, fe, end = _span(Span + b64 * sp_str[0] + hq0.to(tl.int64) * sp_str[1] + pid_m * sp_str[2], sp_str[3])
    c0 = start
    c1 = end
    if NUM_SPLITS > 1:
        per = (end - start + NUM_SPLITS - 1) // NUM_SPLITS
        c0 = tl.minimum(start + pid_s * per, end)
        c1 = tl.minimum(c0 + per, end)
    tile_row = Tiles + b64 * t_str[0] + hq0.to(tl.int64) * t_str[1] + pid_m * t_str[2]

    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q_ptrs = Q + b64 * q_str[0] + heads.to(tl.int64)[:, None] * q_str[1] + rows[:, None] * q_str[2] + offs_d[None, :] * q_str[3]
    q = _load2(q_ptrs, row_ok, offs_d < D, True, D != HEAD_DIM)  # (BLOCK_M, HEAD_DIM)
    k_base = K + b64 * k_str[0] + hkv.to(tl.int64) * k_str[1]
    v_base = V + b64 * v_str[0] + hkv.to(tl.int64) * v_str[1]
    row = _row_state(b64, rows, heads, q_pos, row_live, slope, Rows, r_str, Allow, a_str, Bias, bias_str)
    meta = (Cols + b64 * c_str[1], c_str, r_str, a_str, bias_str, FnBits, fn_str)
    coef = (scale, scale_log2, softcap, win_left, win_right, seq_q, seq_k)

    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)  # running max of the logits (log2 units unless NATURAL)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(logit - max)
    e_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(logit - max) * (logit - max)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    for phase in tl.static_range(3):  # partial-or-empty tiles, the run of full tiles, partial-or-empty tiles
        lo, hi = _phase(phase, start, fs, fe, end, c0, c1)
        acc, l_i, m_i, e_i = _fwd_tiles(
            acc, l_i, m_i, e_i, q, row, meta, coef, lo, hi, k_base, v_base, k_str, v_str, tile_row, t_str,
            phase != 1, D, DV, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BAND, POS, LIVE_ROWS, LIVE_COLS,
            N_IDS, ALLOW, BIAS, FN, ALIBI, SOFTCAP, NATURAL, STATS, DOT_F32, PRECISION)

    # -- finish: normalise; a row with no allowed key (l = 0) gets 0, lse -inf, entropy 0 --
    empty = (l_i == 0.0) | (row_live == 0)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    o_ptrs = (Out + pid_s.to(tl.int64) * o_str[0] + b64 * o_str[1] + heads.to(tl.int64)[:, None] * o_str[2]
              + rows[:, None] * o_str[3] + offs_dv[None, :] * o_str[4])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    # row statistics: Stats (5, S, B * Hq * Lq) float32, fields lse, row max, 1/row sum, max_logit, entropy
    s_ptr = Stats + pid_s.to(tl.int64) * st_str[1] + (b64 * q_heads + heads) * seq_q + rows
    if NATURAL:
        m_nat = m_i
    else:
        m_nat = m_i * LN2
    if NUM_SPLITS == 1:
        tl.store(s_ptr, tl.where(empty, NEG_INF, m_nat + tl.log2(l_safe) * LN2), mask=row_ok)
        # for the backward, p = exp2(s - row max) / row sum: a rounded lse would scale a whole
        # row of p by one error; +inf / 0 make every p of a fully-masked row 0
        tl.store(s_ptr + st_str[0], tl.where(empty, POS_INF, m_i), mask=row_ok)
        tl.store(s_ptr + 2 * st_str[0], tl.where(empty, 0.0, 1.0 / l_safe), mask=row_ok)
    else:  # partial softmax of this split: raw max and sum, merged by the launcher
        tl.store(s_ptr + st_str[0], tl.where(empty, NEG_INF, m_i), mask=row_ok)
        tl.store(s_ptr + 2 * st_str[0], tl.where(empty, 0.0, l_i), mask=row_ok)
    if STATS:
        tl.store(s_ptr + 3 * st_str[0], tl.where(empty, NEG_INF, m_nat), mask=row_ok)
        ent = (tl.log2(l_safe) - e_i / l_safe) * LN2
        tl.store(s_ptr + 4 * st_str[0], tl.where(empty, 0.0, tl.maximum(ent, 0.0)), mask=row_ok)


# -- backward ---------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_pre(Out, DO, Delta, o_str, do_str, q_heads, seq_q,
                  DV: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr):
    # Delta = rowsum(O * dO), O the forward's float32 output
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // q_heads).to(tl.int64)
    h = (pid_bh % q_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    m_in = offs_m < seq_q
    o = _load2(Out + b * o_str[0] + h * o_str[1] + offs_m[:, None] * o_str[2] + offs_dv[None, :] * o_str[3],
               m_in, offs_dv < DV, True, DV != HEAD_DIM_V)
    do = _load2(DO + b * do_str[0] + h * do_str[1] + offs_m[:, None] * do_str[2] + offs_dv[None, :] * do_str[3],
                m_in, offs_dv < DV, True, DV != HEAD_DIM_V)
    delta = tl.sum(o.to(tl.float64) * do.to(tl.float64), 1).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * seq_q + offs_m, delta, mask=m_in)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, offs_n, kv_pos, slope, t_lo, t_hi,
    Q, DO, DQ, row_stats, q_str, do_str, dq_str, tile_col, t_str, Rows, r_str, Cols, c_str,
    allow_col, a_str, bias_col, bias_str, FnBits, fn_str, b, seq_q, seq_k,
    scale, scale_log2, softcap, win_left, win_right, st_field,
    MASKED: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr, POS: tl.constexpr,
    LIVE_ROWS: tl.constexpr, LIVE_COLS: tl.constexpr, N_IDS: tl.constexpr, ALLOW: tl.constexpr,
    BIAS: tl.constexpr, FN: tl.constexpr, ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    NATURAL: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    # query tiles [t_lo, t_hi) against one key block, transposed: keys along rows, queries along columns
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    n_in = offs_n < seq_k
    col_meta = Cols + b64 * c_str[1] + offs_n * c_str[2]
    for qb in range(t_lo, t_hi):
        code = 2
        if MASKED:
            code = tl.load(tile_col + qb * t_str[2])
        if (code & 3) != EMPTY:
            offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
            m_in = offs_m < seq_q
            q = _load2(Q + offs_m[:, None] * q_str[2] + offs_d[None, :] * q_str[3],
                       m_in, offs_d < D, MASKED, D != HEAD_DIM)  # (BLOCK_M, HEAD_DIM)
            do = _load2(DO + offs_m[:, None] * do_str[2] + offs_dv[None, :] * do_str[3],
                        m_in, offs_dv < DV, MASKED, DV != HEAD_DIM_V)  # (BLOCK_M, HEAD_DIM_V)
            row_m = tl.load(row_stats + offs_m, mask=m_in, other=POS_INF)
            row_l = tl.load(row_stats + st_field + offs_m, mask=m_in, other=0.0)
            delta = tl.load(row_stats + 2 * st_field + offs_m, mask=m_in, other=0.0)
            rows = tl.where(m_in, offs_m, 0)
            row_meta = Rows + b64 * r_str[1] + rows * r_str[2]
            q_pos = rows * 0
            if ALIBI or (BAND and MASKED):
                q_pos = tl.load(row_meta)
            live = m_in
            if LIVE_ROWS and MASKED:
                live = live & (tl.load(row_meta + r_str[0]) != 0)
            qkt = _dot(k, tl.trans(q), DOT_F32, PRECISION)  # (BLOCK_N, BLOCK_M)
            st, tt = _logits(qkt, q_pos[None, :], kv_pos[:, None], slope,
                             bias_col[:, None] + offs_m[None, :].to(tl.int64) * bias_str[2], m_in[None, :] & n_in[:, None],
                             scale, scale_log2, softcap, SOFTCAP, ALIBI, BIAS, NATURAL)
            if MASKED:
                ok = _allowed(code, offs_m[None, :], offs_n[:, None], q_pos[None, :], kv_pos[:, None], live[None, :],
                              row_meta[None, :], r_str, col_meta[:, None], c_str,
                              allow_col[:, None] + offs_m[None, :].to(tl.int64) * a_str[2], FnBits, fn_str,
                              seq_q, seq_k, win_left, win_right, BAND, LIVE_ROWS, LIVE_COLS, N_IDS, ALLOW, FN,
                              BLOCK_M, BLOCK_N)
                st = tl.where(ok, st, NEG_INF)
            # (BLOCK_N, BLOCK_M) probabilities, transposed, exactly as the forward rounded them
            if NATURAL:
                pt = tl.exp2((st - row_m[None, :]) * LOG2E) * row_l[None, :]
            else:
                pt = tl.exp2(tl.fma(qkt, scale_log2, -row_m[None, :])) * row_l[None, :]
                if MASKED:
                    pt = tl.where(ok, pt, 0.0)
            dv += _dot(pt.to(do.dtype), do, DOT_F32, PRECISION)
            dpt = _dot(v, tl.trans(do), DOT_F32, PRECISION)  # (BLOCK_N, BLOCK_M)
            dst = pt * (dpt - delta[None, :])
            if SOFTCAP:
                dst = dst * (1.0 - tt * tt)
            dk += _dot(dst.to(q.dtype), q, DOT_F32, PRECISION)
            if ATOMIC_DQ:
                dq = _dot(tl.trans(dst).to(k.dtype), k, DOT_F32, PRECISION) * scale  # (BLOCK_M, HEAD_DIM)
                tl.atomic_add(DQ + offs_m[:, None] * dq_str[2] + offs_d[None, :] * dq_str[3], dq,
                              mask=m_in[:, None] & (offs_d[None, :] < D))
    return dk, dv


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_bwd_dkdv(
    Q, K, V, DO, RowStats, DK, DV_, DQ, Tiles, Span, Rows, Cols, Allow, Bias, FnBits, Slopes,
    q_str, k_str, v_str, do_str, dk_str, dv_str, dq_str, t_str, sp_str, r_str, c_str, a_str, bias_str, fn_str, sl_str,
    st_field, q_heads, kv_group, seq_q, seq_k, scale, scale_log2, softcap, win_left, win_right,
    tune_q, tune_k,
    D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BAND: tl.constexpr, POS: tl.constexpr, LIVE_ROWS: tl.constexpr, LIVE_COLS: tl.constexpr,
    N_IDS: tl.constexpr, ALLOW: tl.constexpr, BIAS: tl.constexpr, FN: tl.constexpr, ALIBI: tl.constexpr,
    SOFTCAP: tl.constexpr, NATURAL: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # one program: one key block of one KV head, all query heads of its group
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    kv_heads = q_heads // kv_group
    b = pid_bh // kv_heads
    hkv = pid_bh % kv_heads
    b64 = b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    n_in = offs_n < seq_k
    k = _load2(K + b64 * k_str[0] + hkv.to(tl.int64) * k_str[1] + offs_n[:, None] * k_str[2] + offs_d[None, :] * k_str[3],
               n_in, offs_d < D, True, D != HEAD_DIM)  # (BLOCK_N, HEAD_DIM)
    v = _load2(V + b64 * v_str[0] + hkv.to(tl.int64) * v_str[1] + offs_n[:, None] * v_str[2] + offs_dv[None, :] * v_str[3],
               n_in, offs_dv < DV, True, DV != HEAD_DIM_V)  # (BLOCK_N, HEAD_DIM_V)
    kv_pos = offs_n * 0
    if POS:
        kv_pos = tl.load(Cols + b64 * c_str[1] + offs_n * c_str[2], mask=n_in, other=0)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], dtype=tl.float32)
    for g in range(0, kv_group):
        hq = (hkv * kv_group + g).to(tl.int64)
        start, fs, fe, end = _span(Span + b64 * sp_str[0] + hq * sp_str[1] + pid_n * sp_str[2], sp_str[3])  # query tiles that see this key block
        tile_col = Tiles + b64 * t_str[0] + hq * t_str[1] + pid_n * t_str[3]
        slope = 0.0
        if ALIBI:
            slope = tl.load(Slopes + b64 * sl_str[0] + hq * sl_str[1])
        row_stats = RowStats + (b64 * q_heads + hq) * seq_q
        q_base = Q + b64 * q_str[0] + hq * q_str[1]
        do_base = DO + b64 * do_str[0] + hq * do_str[1]
        dq_base = DQ + b64 * dq_str[0] + hq * dq_str[1]
        allow_col = Allow + b64 * a_str[0] + hq * a_str[1] + offs_n.to(tl.int64) * a_str[3]
        bias_col = Bias + b64 * bias_str[0] + hq * bias_str[1] + offs_n.to(tl.int64) * bias_str[3]
        for phase in tl.static_range(3):
            lo, hi = _phase(phase, start, fs, fe, end, start, end)
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, offs_n, kv_pos, slope, lo, hi,
                q_base, do_base, dq_base, row_stats, q_str, do_str, dq_str, tile_col, t_str, Rows, r_str, Cols, c_str,
                allow_col, a_str, bias_col, bias_str, FnBits, fn_str, b, seq_q, seq_k,
                scale, scale_log2, softcap, win_left, win_right, st_field,
                phase != 1, D, DV, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BAND, POS, LIVE_ROWS, LIVE_COLS,
                N_IDS, ALLOW, BIAS, FN, ALIBI, SOFTCAP, NATURAL, ATOMIC_DQ, DOT_F32, PRECISION)

    dk = dk * scale
    dk_ptrs = DK + b64 * dk_str[0] + hkv.to(tl.int64) * dk_str[1] + offs_n[:, None] * dk_str[2] + offs_d[None, :] * dk_str[3]
    dv_ptrs = DV_ + b64 * dv_str[0] + hkv.to(tl.int64) * dv_str[1] + offs_n[:, None] * dv_str[2] + offs_dv[None, :] * dv_str[3]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_in[:, None] & (offs_d[None, :] < D))
    tl.store(dv_ptrs, dv.to(DV_.dtype.element_ty), mask=n_in[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _dq_tiles(
    dq, q, do, row_m, row_l, delta, row, meta, coef, t_lo, t_hi, K, V, k_str, v_str, tile_row, t_str,
    MASKED: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr, POS: tl.constexpr,
    LIVE_ROWS: tl.constexpr, LIVE_COLS: tl.constexpr, N_IDS: tl.constexpr, ALLOW: tl.constexpr,
    BIAS: tl.constexpr, FN: tl.constexpr, ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    NATURAL: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    # key tiles [t_lo, t_hi) of one query block: dQ += dS K
    offs_dv = tl.arange(0, HEAD_DIM_V)
    for kb in range(t_lo, t_hi):
        code = 2
        if MASKED:
            code = tl.load(tile_row + kb * t_str[3])
        if (code & 3) != EMPTY:
            offs_n, n_in, kt, qk, s, t, ok = _row_tile(
                q, kb, code, K, k_str, row, meta, coef, MASKED, D, HEAD_DIM, BLOCK_M, BLOCK_N, BAND, POS,
                LIVE_ROWS, LIVE_COLS, N_IDS, ALLOW, BIAS, FN, ALIBI, SOFTCAP, NATURAL, DOT_F32, PRECISION)
            vt = _load2(V + offs_dv[:, None] * v_str[3] + offs_n[None, :] * v_str[2],
                        offs_dv < DV, n_in, DV != HEAD_DIM_V, MASKED)  # (HEAD_DIM_V, BLOCK_N)
            if NATURAL:
                p = tl.exp2((s - row_m[:, None]) * LOG2E) * row_l[:, None]
            else:
                p = tl.exp2(tl.fma(qk, coef[1], -row_m[:, None])) * row_l[:, None]
                if MASKED:
                    p = tl.where(ok, p, 0.0)
            dp = _dot(do, vt, DOT_F32, PRECISION)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq += _dot(ds.to(kt.dtype), tl.trans(kt), DOT_F32, PRECISION)
    return dq


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_bwd_dq(
    Q, K, V, DO, RowStats, DQ, Tiles, Span, Rows, Cols, Allow, Bias, FnBits, Slopes,
    q_str, k_str, v_str, do_str, dq_str, t_str, sp_str, r_str, c_str, a_str, bias_str, fn_str, sl_str,
    st_field, q_heads, kv_group, seq_q, seq_k, scale, scale_log2, softcap, win_left, win_right,
    tune_q, tune_k,
    D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BAND: tl.constexpr, POS: tl.constexpr, LIVE_ROWS: tl.constexpr, LIVE_COLS: tl.constexpr,
    N_IDS: tl.constexpr, ALLOW: tl.constexpr, BIAS: tl.constexpr, FN: tl.constexpr, ALIBI: tl.constexpr,
    SOFTCAP: tl.constexpr, NATURAL: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # one program: one query block of one query head (deterministic dQ)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    hq = pid_bh % q_heads
    hkv = hq // kv_group
    b64 = b.to(tl.int64)
    hq64 = hq.to(tl.int64)
    offs_m, m_in, rows, heads, q_pos, row_live, slope = _row_setup(
        pid_m, b, hq, Rows, r_str, Slopes, sl_str, seq_q, 1, POS, LIVE_ROWS, ALIBI, BLOCK_M)
    start, fs, fe, end = _span(Span + b64 * sp_str[0] + hq64 * sp_str[1] + pid_m * sp_str[2], sp_str[3])
    tile_row = Tiles + b64 * t_str[0] + hq64 * t_str[1] + pid_m * t_str[2]

    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q = _load2(Q + b64 * q_str[0] + hq64 * q_str[1] + offs_m[:, None] * q_str[2] + offs_d[None, :] * q_str[3],
               m_in, offs_d < D, True, D != HEAD_DIM)
    do = _load2(DO + b64 * do_str[0] + hq64 * do_str[1] + offs_m[:, None] * do_str[2] + offs_dv[None, :] * do_str[3],
                m_in, offs_dv < DV, True, DV != HEAD_DIM_V)
    row_stats = RowStats + (b64 * q_heads + hq64) * seq_q
    row_m = tl.load(row_stats + offs_m, mask=m_in, other=POS_INF)
    row_l = tl.load(row_stats + st_field + offs_m, mask=m_in, other=0.0)
    delta = tl.load(row_stats + 2 * st_field + offs_m, mask=m_in, other=0.0)
    k_base = K + b64 * k_str[0] + hkv.to(tl.int64) * k_str[1]
    v_base = V + b64 * v_str[0] + hkv.to(tl.int64) * v_str[1]

    row = _row_state(b64, rows, heads, q_pos, row_live, slope, Rows, r_str, Allow, a_str, Bias, bias_str)
    meta = (Cols + b64 * c_str[1], c_str, r_str, a_str, bias_str, FnBits, fn_str)
    coef = (scale, scale_log2, softcap, win_left, win_right, seq_q, seq_k)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for phase in tl.static_range(3):
        lo, hi = _phase(phase, start, fs, fe, end, start, end)
        dq = _dq_tiles(
            dq, q, do, row_m, row_l, delta, row, meta, coef, lo, hi, k_base, v_base, k_str, v_str, tile_row, t_str,
            phase != 1, D, DV, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BAND, POS, LIVE_ROWS, LIVE_COLS,
            N_IDS, ALLOW, BIAS, FN, ALIBI, SOFTCAP, NATURAL, DOT_F32, PRECISION)
    dq = dq * scale
    dq_ptrs = DQ + b64 * dq_str[0] + hq64 * dq_str[1] + offs_m[:, None] * dq_str[2] + offs_d[None, :] * dq_str[3]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_in[:, None] & (offs_d[None, :] < D))


INTERPRET = type(_attn_fwd).__name__ == "InterpretedFunction"


# -- launchers --------------------------------------------------------------------------------
#
# Block sizes are fixed per head dim and dtype (:func:`fwd_blocks`, :func:`bwd_blocks`), not
# autotuned: the mask is lowered at exactly the block sizes a kernel runs with (its tile map and
# a mask function's bits are per tile), so the backend asks for the block sizes first, lowers,
# and launches with them. Autotuning picks warps and pipeline stages only.


def fwd_blocks(pack: int, seq_q: int, head_dim: int, v_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the forward. With PACK > 1 query heads per program, one tile holds
    all PACK x seq_q rows (the tile map's query block 0 then covers every query)."""
    if pack > 1:
        return max(16, triton.next_power_of_2(pack * seq_q)), (16 if INTERPRET else 64)
    if INTERPRET:  # the interpreter runs one small configuration (larger tiles are only slower there)
        return 16, 16
    if seq_q <= 64:  # decoding: a short query tile, long key tiles
        return max(16, triton.next_power_of_2(seq_q)), 64
    hd = max(_pad_dim(head_dim), _pad_dim(v_dim))
    if dtype == torch.float32:
        return (64, 32) if hd > 128 else (64, 64)
    return (64, 32) if hd > 128 else (128, 64)


def bwd_blocks(head_dim: int, v_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the dK/dV pass: few query rows per step, many keys per program
    (K, V, dK, dV of BLOCK_N keys stay in registers; offline sm_90 builds of M64 N64 spill at d128)."""
    if INTERPRET:
        return 16, 16
    hd = max(_pad_dim(head_dim), _pad_dim(v_dim))
    if hd > 128 or (dtype == torch.float32 and hd > 64):
        return 16, 64
    return 16, 128


def dq_blocks(head_dim: int, v_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the deterministic dQ pass."""
    if INTERPRET:
        return 16, 16
    hd = max(_pad_dim(head_dim), _pad_dim(v_dim))
    if hd > 128 or (dtype == torch.float32 and hd > 64):
        return 64, 32
    return 128, 32


def _cfg(warps, stages):
    return triton.Config({}, num_warps=warps, num_stages=stages)


# (warps, stages), best first: the first that fits is also the untuned default. Pruned per call
# by the shared memory they would need at the call's block sizes.
_FWD_CONFIGS = [_cfg(8, 3), _cfg(4, 3), _cfg(8, 2), _cfg(4, 2)]
_DECODE_CONFIGS = [_cfg(4, 3), _cfg(4, 2), _cfg(8, 3)]
_DKDV_CONFIGS = [_cfg(8, 2), _cfg(4, 2), _cfg(8, 1)]
_DQ_CONFIGS = [_cfg(8, 2), _cfg(4, 3), _cfg(4, 2)]
_SMEM_BUDGET = 200 * 1024  # bytes; an H100 has 227 KiB per block, and the estimate below is rough
_TUNE_KEY = ["tune_q", "tune_k", "HEAD_DIM", "HEAD_DIM_V", "BLOCK_M", "BLOCK_N", "BAND", "LIVE_ROWS",
             "LIVE_COLS", "N_IDS", "ALLOW", "BIAS", "FN", "ALIBI", "SOFTCAP"]


def _smem_estimate(kind, bm, bn, stages, kw):
    hd, hdv = kw["HEAD_DIM"], kw["HEAD_DIM_V"]
    elt = 4 if kw.get("PRECISION") == "ieee" else 2
    dense = (kw.get("ALLOW", False) + 4 * kw.get("BIAS", False)) * stages * bm * bn  # dense-mask tiles in flight
    if kind in ("fwd", "dq"):  # one query tile resident, key/value tiles streamed
        return elt * (bm * hd + stages * bn * (hd + hdv)) + dense
    atomic = 3 * bm * hd * 4 if kw.get("ATOMIC_DQ") else 0  # dQ partial tile and its layout conversions
    return elt * (bn * (hd + hdv) + stages * bm * (hd + hdv)) + dense + atomic


def _prune(kind):
    def prune(configs, named_args, **kw):
        bm, bn = kw["BLOCK_M"], kw["BLOCK_N"]
        keep = [c for c in configs if _smem_estimate(kind, bm, bn, max(c.num_stages, 1), kw) <= _SMEM_BUDGET]
        if not keep:  # nothing fits the estimate: fewest warps and one stage
            keep = [triton.Config({}, num_warps=4, num_stages=1)]
        return keep
    return prune


if INTERPRET:
    _fwd_tuned = _decode_tuned = _dkdv_tuned = _dq_tuned = None
else:
    _fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_TUNE_KEY + ["STATS", "PACK"],
                                 prune_configs_by={"early_config_prune": _prune("fwd")})(_attn_fwd)
    _decode_tuned = triton.autotune(_DECODE_CONFIGS, key=_TUNE_KEY + ["STATS", "PACK", "NUM_SPLITS"],
                                    prune_configs_by={"early_config_prune": _prune("fwd")})(_attn_fwd)
    _dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_TUNE_KEY + ["ATOMIC_DQ"], reset_to_zero=["DQ"],
                                  prune_configs_by={"early_config_prune": _prune("dkdv")})(_attn_bwd_dkdv)
    _dq_tuned = triton.autotune(_DQ_CONFIGS, key=_TUNE_KEY,
                                prune_configs_by={"early_config_prune": _prune("dq")})(_attn_bwd_dq)


def autotune_enabled() -> bool:
    """SELFATTN_TRITON_AUTOTUNE=0 (read at each launch) runs the first configuration that fits
    instead of benchmarking all of them: one compile per kernel variant (tests, quick checks)."""
    return os.environ.get("SELFATTN_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def first_fitting_config(tuned, kwargs):
    prune = getattr(tuned, "early_config_prune", None)
    configs = prune(tuned.configs, {}, **kwargs) if prune else tuned.configs
    return configs[0]


def _launch(kernel, tuned, grid, kwargs, fixed=False):
    # every launch goes through here, all arguments by name (benchmarks/bench_gpu.py --compile
    # swaps it for an offline compiler)
    if fixed or INTERPRET:  # a kernel with no tuning, or the interpreter (warps and stages mean nothing there)
        kernel[grid](**kwargs)
    elif not autotune_enabled():
        cfg = first_fitting_config(tuned, kwargs)
        kernel[grid](**kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        tuned[grid](**kwargs)


_DUMMIES: dict = {}


def _dummy(device, dtype):
    # a one-element tensor for pointer arguments that a kernel variant never reads
    key = (str(device), dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return _DUMMIES[key]


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _pad_dim(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _bcast_strides(t):
    # kernels index every dim directly: a broadcast (size-1) dim must have stride 0
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def _optional(t, device, dtype, ndim):
    # (tensor or a dummy, its strides or zeros)
    if t is None:
        return _dummy(device, dtype), (0,) * ndim
    return t, _bcast_strides(t)


def _mask_args(km, device, span):
    """Keyword arguments for the mask tensors and their strides, and the compile-time switches.

    ``km`` is the kernel's record of the lowered mask (backends/triton_gpu.py, KernelMask);
    ``span`` is its row_span (forward, dQ) or col_span (dK/dV).
    """
    allow, a_str = _optional(None if km.allow is None else km.allow.view(torch.uint8), device, torch.uint8, 4)
    bias, bias_str = _optional(km.bias, device, torch.float32, 4)
    fn_bits, fn_str = _optional(None if km.fn_bits is None else km.fn_bits.view(torch.uint8), device, torch.uint8, 3)
    slopes, sl_str = _optional(km.slopes, device, torch.float32, 2)
    args = dict(Tiles=km.tiles, Span=span, Rows=km.rows, Cols=km.cols, Allow=allow, Bias=bias, FnBits=fn_bits,
                Slopes=slopes, t_str=_bcast_strides(km.tiles), sp_str=_bcast_strides(span),
                r_str=_bcast_strides(km.rows), c_str=_bcast_strides(km.cols), a_str=a_str, bias_str=bias_str,
                fn_str=fn_str, sl_str=sl_str)
    flags = dict(BAND=km.band, POS=km.band or km.slopes is not None, LIVE_ROWS=km.live_rows, LIVE_COLS=km.live_cols,
                 N_IDS=km.n_ids, ALLOW=km.allow is not None, BIAS=km.bias is not None, FN=km.fn_bits is not None,
                 ALIBI=km.slopes is not None)
    return args, flags


def _switches(q, k, v, km, scale, softcap, flags):
    # scalars and compile-time constants every kernel takes
    (B, Hq, Lq, D), (Hkv, Lk, Dv) = q.shape, (k.shape[1], k.shape[2], v.shape[3])
    scalars = dict(q_heads=Hq, kv_group=Hq // Hkv, seq_q=Lq, seq_k=Lk, scale=float(scale),
                   scale_log2=float(scale) * math.log2(math.e), softcap=float(softcap or 0.0),
                   win_left=int(km.win_left), win_right=int(km.win_right), tune_q=_bucket(Lq), tune_k=_bucket(Lk))
    consts = dict(D=D, DV=Dv, HEAD_DIM=_pad_dim(D), HEAD_DIM_V=_pad_dim(Dv), **flags, SOFTCAP=softcap is not None,
                  NATURAL=softcap is not None or flags["BIAS"] or flags["ALIBI"], DOT_F32=INTERPRET,
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=km.block_q, BLOCK_N=km.block_k)
    return {**scalars, **consts}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_pack(q_heads: int, kv_heads: int, seq_q: int) -> int:
    """PACK: query heads of one GQA group that share a forward program when their rows fit one
    tile (decoding), so that each key/value tile is read once per group."""
    group = q_heads // kv_heads
    return group if group > 1 and group * seq_q <= 64 else 1


def plan_splits(batch, q_heads, pack, seq_q, seq_k, device, num_splits=None) -> int:
    """NUM_SPLITS for a forward call: split-KV when the programs would leave most of the GPU idle
    and the keys are long."""
    if num_splits is not None:
        return max(1, int(num_splits))
    if INTERPRET or device.type != "cuda":
        return 1
    programs = batch * (q_heads // pack) * triton.cdiv(pack * seq_q, 64)
    sms = _sm_count(device)
    if programs >= 2 * sms or seq_k < 1024:
        return 1
    # about four programs per SM keep enough loads in flight for a memory-bound step
    return max(1, min(triton.cdiv(4 * sms, programs), triton.cdiv(seq_k, 512), 64))


def forward(q, k, v, km, *, scale, softcap=None, stats=False, pack=1, num_splits=1, f32_out=False):
    """Run the forward kernel with the mask record ``km`` (lowered at ``km.block_q`` x ``km.block_k``).

    Returns (out, row_stats): out (B, Hq, Lq, Dv) in q's dtype, or float32 with ``f32_out``;
    row_stats float32 (5, B, Hq, Lq) with fields lse, row max (log2 units unless the logits are
    natural), 1/row sum, max_logit, entropy (the last two only with ``stats``). Row max is +inf
    and 1/row sum 0 for fully-masked rows: what :func:`backward` needs to recompute P.
    """
    B, Hq, Lq, _ = q.shape
    Dv = v.shape[3]
    dev = q.device
    mask_kw, flags = _mask_args(km, dev, km.row_span)
    splits = num_splits
    if splits == 1:
        out = torch.empty(B, Hq, Lq, Dv, dtype=torch.float32 if f32_out else q.dtype, device=dev)
        o_str = (0, *out.stride())
    else:
        out = torch.empty(splits, B, Hq, Lq, Dv, dtype=torch.float32, device=dev)  # partial outputs, normalised per split
        o_str = out.stride()
    row_stats = torch.empty(5, splits, B * Hq * Lq, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(pack * Lq, km.block_q), B * Hq // pack, splits)
    kw = dict(Q=q, K=k, V=v, Out=out, Stats=row_stats, q_str=q.stride(), k_str=k.stride(), v_str=v.stride(),
              o_str=o_str, st_str=row_stats.stride()[:2], **mask_kw, **_switches(q, k, v, km, scale, softcap, flags),
              PACK=pack, NUM_SPLITS=splits, STATS=bool(stats))
    decode = pack * Lq <= 64
    _launch(_attn_fwd, _decode_tuned if decode else _fwd_tuned, grid, kw)
    row_stats = row_stats.view(5, splits, B, Hq, Lq)
    if splits > 1:
        return _merge_splits(out, row_stats, stats, torch.float32 if f32_out else q.dtype, kw["NATURAL"])
    return out, row_stats[:, 0]


def _merge_splits(out_s, st, stats, dtype, natural):
    # each split holds a softmax over its own keys: max m_s, sum l_s, normalised output
    unit = math.log2(math.e) if natural else 1.0  # the kernel's max is in natural units or log2 units
    m_s, l_s = st[1] * unit, st[2]  # (S, B, Hq, Lq) log2 units
    m = m_s.amax(0)  # (B, Hq, Lq); -inf where no split saw a key
    alive = m > float("-inf")
    m_use = torch.where(alive, m, torch.zeros_like(m))
    part = l_s * torch.exp2(torch.where(l_s > 0, m_s - m_use, torch.zeros_like(m_s)))  # (S, B, Hq, Lq) each split's share
    l = part.sum(0)
    l_safe = torch.where(alive, l, torch.ones_like(l))
    w = part / l_safe  # (S, B, Hq, Lq) weights summing to 1 over the splits
    out = (w[..., None] * out_s).sum(0).to(dtype)  # (B, Hq, Lq, Dv)
    res = torch.empty(st.shape[:1] + st.shape[2:], dtype=torch.float32, device=st.device)  # (5, B, Hq, Lq)
    res[0] = torch.where(alive, (m_use + torch.log2(l_safe)) * math.log(2.0), torch.full_like(m, float("-inf")))
    res[1] = torch.where(alive, m / unit, torch.full_like(m, float("inf")))
    res[2] = torch.where(alive, 1.0 / l_safe, torch.zeros_like(l))
    if stats:
        res[3] = st[3].amax(0)
        # H = sum_s w_s (H_s - log w_s)
        wlogw = torch.where(w > 0, w * torch.log(torch.where(w > 0, w, torch.ones_like(w))), torch.zeros_like(w))
        ent = ((w * st[4]).sum(0) - wlogw.sum(0)).clamp_min(0)
        res[4] = torch.where(alive, ent, torch.zeros_like(ent))
    return out, res


def backward(do, q, k, v, out32, row_m, row_l, km, km_dq=None, *, scale, softcap=None):
    """Gradients (dq, dk, dv) with the mask record ``km`` (lowered at :func:`bwd_blocks`).

    ``out32`` is the forward's float32 output, ``row_m`` / ``row_l`` its row max and 1/row sum
    (B, Hq, Lq). ``km_dq`` (lowered at :func:`dq_blocks`): dQ from its own, deterministic pass
    instead of atomic adds in the dK/dV pass.
    """
    B, Hq, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    Hkv = k.shape[1]
    dev = q.device
    n = B * Hq * Lq
    bwd_stats = torch.empty(3, n, dtype=torch.float32, device=dev)  # row max, 1/row sum, Delta
    bwd_stats[0] = row_m.reshape(n)
    bwd_stats[1] = row_l.reshape(n)
    pre_bm = 16 if INTERPRET else 64
    _launch(_attn_bwd_pre, None, (triton.cdiv(Lq, pre_bm), B * Hq),
            dict(Out=out32, DO=do, Delta=bwd_stats[2], o_str=out32.stride(), do_str=do.stride(), q_heads=Hq,
                 seq_q=Lq, DV=Dv, HEAD_DIM_V=_pad_dim(Dv), BLOCK_M=pre_bm), fixed=True)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    atomic = km_dq is None
    dq_acc = torch.zeros(B, Hq, Lq, D, dtype=torch.float32, device=dev) if atomic else _dummy(dev, torch.float32)
    common = dict(Q=q, K=k, V=v, DO=do, RowStats=bwd_stats, st_field=n, q_str=q.stride(), k_str=k.stride(),
                  v_str=v.stride(), do_str=do.stride())
    mask_kw, flags = _mask_args(km, dev, km.col_span)
    switches = _switches(q, k, v, km, scale, softcap, flags)
    _launch(_attn_bwd_dkdv, _dkdv_tuned, (triton.cdiv(Lk, km.block_k), B * Hkv),
            dict(**common, DK=dk, DV_=dv, DQ=dq_acc, dk_str=dk.stride(), dv_str=dv.stride(),
                 dq_str=dq_acc.stride() if atomic else (0, 0, 0, 0), **mask_kw, **switches, ATOMIC_DQ=atomic))
    if atomic:
        return dq_acc.to(q.dtype), dk, dv
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    mask_kw, flags = _mask_args(km_dq, dev, km_dq.row_span)
    _launch(_attn_bwd_dq, _dq_tuned, (triton.cdiv(Lq, km_dq.block_q), B * Hq),
            dict(**common, DQ=dq, dq_str=dq.stride(), **mask_kw, **_switches(q, k, v, km_dq, scale, softcap, flags)))
    return dq, dk, dv
