"""Flash attention in Triton: the kernels of the ``triton`` backend and their launchers.

Forward: one program per (block of query rows, batch x head group, KV split). It streams key
tiles through an online softmax in base 2 (log2(e) folded into the scale), in three loops:
partial tiles before the fully-allowed band, full tiles with no masking at all, partial tiles
after it. The bounds come from the mask analytically (causal/window), from per-batch lengths
(padding) and from per-row key ranges of sorted segment ids (documents); dense masks are
loaded per tile. With ``num_splits > 1`` each program handles one slice of the key range and
writes a partial result; :func:`forward` merges the slices (split-KV decoding).

Backward: a preprocess computes Delta = rowsum(O * dO) and lse in base 2; a dK/dV pass owns
one key block of one KV head and loops over the query heads of its group (no atomics for dK,
dV); dQ comes either from atomic adds in that same pass or, deterministically, from a
separate dQ pass that owns one query block.

The launchers take tensors the backend has already lowered (see backends/triton_gpu.py):
``window`` (left, right) or None, ``kv_lens``/``q_lens`` int32 (B,), ``doc_rows`` int32
(2, B|1, Lq) holding each query's allowed key range [lo, hi), ``doc_cols`` int32 (2, B|1, Lk)
holding each key's query range, and ``mask`` a 4-D bool or float tensor with broadcast strides.

Whether these kernels run compiled or in Triton's CPU interpreter is decided when this module is
executed (``triton.jit`` reads TRITON_INTERPRET then); ``INTERPRET`` records which.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
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
def _logits(qk, m_ptrs, m_mask, scale, scale_log2, softcap,
            SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, NATURAL: tl.constexpr):
    # scores -> logits. Plain: log2 units, log2(e) folded into the scale. NATURAL (softcap or
    # float mask): natural units, and callers convert (s - max) * log2(e), which rounds at the
    # size of the difference rather than of the logit. Also returns tanh(s / softcap).
    t = qk
    if NATURAL:
        s = qk * scale
        if SOFTCAP:
            t = _tanh(s / softcap)
            s = softcap * t
        if MASK_KIND == 2:
            s = s + tl.load(m_ptrs, mask=m_mask, other=NEG_INF).to(tl.float32)
    else:
        s = qk * scale_log2
    return s, t


@triton.jit
def _allowed(rows, cols, kv_end, off, win_left, win_right, dlo, dhi, m_ptrs, m_mask,
             WINDOW: tl.constexpr, DOCS: tl.constexpr, MASK_KIND: tl.constexpr):
    # element-wise mask of a partial tile; rows/cols/dlo/dhi come pre-broadcast (row or column vectors)
    ok = cols < kv_end
    if WINDOW:
        rel = cols - (rows + off)  # key offset from the query's absolute position
        ok = ok & (rel >= -win_left) & (rel <= win_right)
    if DOCS:
        ok = ok & (cols >= dlo) & (cols < dhi)
    if MASK_KIND == 1:
        ok = ok & (tl.load(m_ptrs, mask=m_mask, other=0) != 0)
    return ok


@triton.jit
def _key_bounds(i_lo, i_hi, row_live, dlo, dhi, kv_end, off, win_left, win_right,
                WINDOW: tl.constexpr, DOCS: tl.constexpr):
    # keys [lo, hi) some live row may see; keys [full_lo, full_hi) every live row sees
    lo = kv_end * 0
    hi = kv_end
    full_lo = kv_end * 0
    full_hi = kv_end
    if WINDOW:
        lo = tl.maximum(lo, i_lo + off - win_left)
        hi = tl.minimum(hi, i_hi + off + win_right + 1)
        full_lo = tl.maximum(full_lo, i_hi + off - win_left)
        full_hi = tl.minimum(full_hi, i_lo + off + win_right + 1)
    if DOCS:
        lo = tl.maximum(lo, tl.min(tl.where(row_live, dlo, kv_end), 0))
        hi = tl.minimum(hi, tl.max(tl.where(row_live, dhi, 0), 0))
        full_lo = tl.maximum(full_lo, tl.max(tl.where(row_live, dlo, 0), 0))
        full_hi = tl.minimum(full_hi, tl.min(tl.where(row_live, dhi, kv_end), 0))
    hi = tl.where(i_hi < i_lo, lo, hi)  # no live row at all
    return lo, hi, full_lo, full_hi


@triton.jit
def _tile_phases(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    # [start, fs) partial tiles, [fs, fe) full tiles, [fe, end) partial tiles; all >= 0 so that
    # integer division rounds the same way compiled (towards 0) and interpreted (towards -inf)
    start = (tl.maximum(lo, 0) // BLOCK) * BLOCK
    end = tl.maximum(hi, start)
    fs = tl.maximum(((tl.maximum(full_lo, 0) + BLOCK - 1) // BLOCK) * BLOCK, start)
    fe = tl.minimum((tl.maximum(full_hi, 0) // BLOCK) * BLOCK, end)
    has_full = fe > fs
    fs = tl.where(has_full, fs, end)
    fe = tl.where(has_full, fe, end)
    return start, fs, fe, end


# -- forward ----------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, e_i, q, rows, dlo, dhi, m_row,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    lo, hi, kv_end, seq_k, off, win_left, win_right, scale, scale_log2, softcap,
    IS_FULL: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr,
    MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, NATURAL: tl.constexpr, STATS: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < seq_k
        kt = _load2(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                    offs_d < D, n_in, D != HEAD_DIM, not IS_FULL)  # (HEAD_DIM, BLOCK_N)
        v = _load2(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                   n_in, offs_dv < DV, not IS_FULL, DV != HEAD_DIM_V)  # (BLOCK_N, HEAD_DIM_V)
        if MASK_KIND != 0:
            m_ptrs = m_row[:, None] + offs_n[None, :] * stride_mn  # (BLOCK_M, BLOCK_N)
            m_mask = n_in[None, :]
        else:
            m_ptrs = m_row
            m_mask = n_in
        qk = _dot(q, kt, DOT_F32, PRECISION)  # (BLOCK_M, BLOCK_N)
        s, t = _logits(qk, m_ptrs, m_mask, scale, scale_log2, softcap, SOFTCAP, MASK_KIND, NATURAL)
        if not IS_FULL:
            ok = _allowed(rows[:, None], offs_n[None, :], kv_end, off, win_left, win_right,
                          dlo[:, None], dhi[:, None], m_ptrs, m_mask, WINDOW, DOCS, MASK_KIND)
            s = tl.where(ok, s, NEG_INF)
        # -- new running max; a row with nothing allowed yet keeps -inf and shifts by 0 --
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        # -- exponents (log2 units) of this tile relative to the new max, rounded once: the
        #    backward recomputes exactly these from the saved max and sum --
        if NATURAL:
            z = (s - m_use[:, None]) * LOG2E  # -inf where masked
            dm = (m_i - m_use) * LOG2E
        else:
            z = tl.fma(qk, scale_log2, -m_use[:, None])
            dm = m_i - m_use
        p = tl.exp2(z)
        if not IS_FULL and not NATURAL:
            p = tl.where(ok, p, 0.0)
        # -- rescale factor for everything accumulated so far --
        alpha = tl.exp2(dm)
        if STATS:
            # -- running sum of p * (s - max) for the entropy, moved to the new max --
            shift = tl.where(m_i == NEG_INF, 0.0, dm)
            e_i = alpha * (e_i + shift * l_i) + tl.sum(p * tl.where(p > 0.0, z, 0.0), 1)
        # -- rescale the running sum and add this tile's --
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- rescale the output accumulator and add P V --
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32, PRECISION)
        m_i = m_new
    return acc, l_i, m_i, e_i


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_fwd(
    Q, K, V, Out, Lse, RowM, RowL, MaxL, Ent, KvLens, QLens, DocRows, Mask,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_os, stride_ob, stride_oh, stride_om, stride_od,
    stride_ss, stride_dt, stride_db,
    stride_mb, stride_mh, stride_mm, stride_mn,
    q_heads, kv_group, seq_q, seq_k,
    scale, scale_log2, softcap, win_left, win_right,
    tune_q, tune_k,  # bucketed lengths: autotuning keys only
    D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    PACK: tl.constexpr, NUM_SPLITS: tl.constexpr, WINDOW: tl.constexpr, PADDING: tl.constexpr,
    Q_PADDING: tl.constexpr, DOCS: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
    NATURAL: tl.constexpr, STATS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    groups = q_heads // PACK
    b = pid_bh // groups
    hq0 = (pid_bh % groups) * PACK
    hkv = hq0 // kv_group
    off = seq_k - seq_q  # bottom-right alignment: query i sits at key position i + off
    b64 = b.to(tl.int64)

    # rows of this program: PACK query heads (sharing one KV head) x seq_q queries, flattened
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < PACK * seq_q
    if PACK == 1:
        rows = tl.where(row_ok, offs_r, 0)
        heads = hq0 + tl.zeros([BLOCK_M], dtype=tl.int32)
    else:
        rows = tl.where(row_ok, offs_r % seq_q, 0)
        heads = hq0 + tl.where(row_ok, offs_r // seq_q, 0)
    row_live = row_ok
    if Q_PADDING:
        row_live = row_live & (rows < tl.load(QLens + b))
    kv_end = seq_k
    if PADDING:
        kv_end = tl.minimum(tl.load(KvLens + b), seq_k)
    if DOCS:
        dlo = tl.load(DocRows + b64 * stride_db + rows)
        dhi = tl.load(DocRows + stride_dt + b64 * stride_db + rows)
    else:
        dlo = rows
        dhi = rows
    if MASK_KIND != 0:
        m_row = Mask + b64 * stride_mb + heads.to(tl.int64) * stride_mh + rows.to(tl.int64) * stride_mm
    else:
        m_row = Mask

    i_lo = tl.min(tl.where(row_live, rows, seq_q), 0)
    i_hi = tl.max(tl.where(row_live, rows, -1), 0)
    lo, hi, full_lo, full_hi = _key_bounds(i_lo, i_hi, row_live, dlo, dhi, kv_end, off,
                                           win_left, win_right, WINDOW, DOCS)
    if MASK_KIND != 0:
        full_hi = full_lo * 0  # dense masks: every tile is partial
    start, fs, fe, end = _tile_phases(lo, hi, full_lo, full_hi, BLOCK_N)
    c0 = start
    c1 = end
    if NUM_SPLITS > 1:
        # this program's slice of the key tiles
        per = ((end - start + BLOCK_N - 1) // BLOCK_N + NUM_SPLITS - 1) // NUM_SPLITS
        c0 = tl.minimum(start + pid_s * per * BLOCK_N, end)
        c1 = tl.minimum(c0 + per * BLOCK_N, end)

    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q_ptrs = Q + b64 * stride_qb + heads.to(tl.int64)[:, None] * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = _load2(q_ptrs, row_ok, offs_d < D, True, D != HEAD_DIM)  # (BLOCK_M, HEAD_DIM)
    k_base = K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)  # running max of the logits (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(logit - max)
    e_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(logit - max) * (logit - max)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    acc, l_i, m_i, e_i = _fwd_inner(
        acc, l_i, m_i, e_i, q, rows, dlo, dhi, m_row, k_base, v_base, stride_kn, stride_kd,
        stride_vn, stride_vd, stride_mn, tl.maximum(start, c0), tl.minimum(fs, c1), kv_end, seq_k, off,
        win_left, win_right, scale, scale_log2, softcap, False, D, DV, HEAD_DIM, HEAD_DIM_V, BLOCK_N,
        WINDOW, DOCS, MASK_KIND, SOFTCAP, NATURAL, STATS, DOT_F32, PRECISION)
    acc, l_i, m_i, e_i = _fwd_inner(
        acc, l_i, m_i, e_i, q, rows, dlo, dhi, m_row, k_base, v_base, stride_kn, stride_kd,
        stride_vn, stride_vd, stride_mn, tl.maximum(fs, c0), tl.minimum(fe, c1), kv_end, seq_k, off,
        win_left, win_right, scale, scale_log2, softcap, True, D, DV, HEAD_DIM, HEAD_DIM_V, BLOCK_N,
        WINDOW, DOCS, MASK_KIND, SOFTCAP, NATURAL, STATS, DOT_F32, PRECISION)
    acc, l_i, m_i, e_i = _fwd_inner(
        acc, l_i, m_i, e_i, q, rows, dlo, dhi, m_row, k_base, v_base, stride_kn, stride_kd,
        stride_vn, stride_vd, stride_mn, tl.maximum(fe, c0), tl.minimum(end, c1), kv_end, seq_k, off,
        win_left, win_right, scale, scale_log2, softcap, False, D, DV, HEAD_DIM, HEAD_DIM_V, BLOCK_N,
        WINDOW, DOCS, MASK_KIND, SOFTCAP, NATURAL, STATS, DOT_F32, PRECISION)

    # -- finish: normalise; a row with no allowed key (l = 0) gets 0, lse -inf, entropy 0 --
    empty = (l_i == 0.0) | (row_live == 0)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = tl.where(row_live[:, None], acc / l_safe[:, None], 0.0)
    o_ptrs = (Out + pid_s.to(tl.int64) * stride_os + b64 * stride_ob + heads.to(tl.int64)[:, None] * stride_oh
              + rows[:, None] * stride_om + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    s_off = pid_s.to(tl.int64) * stride_ss + (b64 * q_heads + heads) * seq_q + rows
    if NATURAL:
        m_nat = m_i
    else:
        m_nat = m_i * LN2
    if NUM_SPLITS == 1:
        tl.store(Lse + s_off, tl.where(empty, NEG_INF, m_nat + tl.log2(l_safe) * LN2), mask=row_ok)
        # for the backward, p = exp2(s - row max) / row sum: a rounded lse would scale a whole
        # row of p by one error; +inf / 0 make every p of a fully-masked row 0
        tl.store(RowM + s_off, tl.where(empty, POS_INF, m_i), mask=row_ok)
        tl.store(RowL + s_off, tl.where(empty, 0.0, 1.0 / l_safe), mask=row_ok)
    else:  # partial softmax of this split: raw max and sum, merged by the launcher
        tl.store(RowM + s_off, tl.where(row_live, m_i, NEG_INF), mask=row_ok)
        tl.store(RowL + s_off, tl.where(row_live, l_i, 0.0), mask=row_ok)
    if STATS:
        tl.store(MaxL + s_off, tl.where(empty, NEG_INF, m_nat), mask=row_ok)
        ent = (tl.log2(l_safe) - e_i / l_safe) * LN2
        tl.store(Ent + s_off, tl.where(empty, 0.0, tl.maximum(ent, 0.0)), mask=row_ok)


# -- backward ---------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_pre(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    q_heads, seq_q,
    DV: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Delta = rowsum(O * dO)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // q_heads).to(tl.int64)
    h = (pid_bh % q_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    m_in = offs_m < seq_q
    o = _load2(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
               m_in, offs_dv < DV, True, DV != HEAD_DIM_V)
    do = _load2(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                m_in, offs_dv < DV, True, DV != HEAD_DIM_V)
    delta = tl.sum(o.to(tl.float64) * do.to(tl.float64), 1).to(tl.float32)
    row = pid_bh.to(tl.int64) * seq_q + offs_m
    tl.store(Delta + row, delta, mask=m_in)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, rowm_base, rowl_base, delta_base, dq_base, dlo_base, dhi_base, m_base,
    offs_n, stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd, stride_mm, stride_mn,
    lo, hi, kv_end, seq_q, seq_k, off, win_left, win_right, scale, scale_log2, softcap,
    IS_FULL: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr,
    MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, NATURAL: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    # works transposed: keys along rows, queries along columns
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    n_in = offs_n < seq_k
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_in = offs_m < seq_q
        q = _load2(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   m_in, offs_d < D, not IS_FULL, D != HEAD_DIM)  # (BLOCK_M, HEAD_DIM)
        do = _load2(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                    m_in, offs_dv < DV, not IS_FULL, DV != HEAD_DIM_V)  # (BLOCK_M, HEAD_DIM_V)
        row_m = tl.load(rowm_base + offs_m, mask=m_in, other=POS_INF)
        row_l = tl.load(rowl_base + offs_m, mask=m_in, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=m_in, other=0.0)
        if MASK_KIND != 0:
            m_ptrs = m_base + offs_m[None, :].to(tl.int64) * stride_mm + offs_n[:, None] * stride_mn  # (BLOCK_N, BLOCK_M)
            m_mask = m_in[None, :] & n_in[:, None]
        else:
            m_ptrs = m_base
            m_mask = m_in
        qkt = _dot(k, tl.trans(q), DOT_F32, PRECISION)  # (BLOCK_N, BLOCK_M)
        st, tt = _logits(qkt, m_ptrs, m_mask, scale, scale_log2, softcap, SOFTCAP, MASK_KIND, NATURAL)
        if not IS_FULL:
            if DOCS:
                dlo = tl.load(dlo_base + offs_m, mask=m_in, other=0)
                dhi = tl.load(dhi_base + offs_m, mask=m_in, other=0)
            else:
                dlo = offs_m
                dhi = offs_m
            ok = _allowed(offs_m[None, :], offs_n[:, None], kv_end, off, win_left, win_right,
                          dlo[None, :], dhi[None, :], m_ptrs, m_mask, WINDOW, DOCS, MASK_KIND)
            st = tl.where(ok, st, NEG_INF)
        # (BLOCK_N, BLOCK_M) probabilities, transposed, exactly as the forward rounded them
        if NATURAL:
            pt = tl.exp2((st - row_m[None, :]) * LOG2E) * row_l[None, :]
        else:
            pt = tl.exp2(tl.fma(qkt, scale_log2, -row_m[None, :])) * row_l[None, :]
            if not IS_FULL:
                pt = tl.where(ok, pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, DOT_F32, PRECISION)
        dpt = _dot(v, tl.trans(do), DOT_F32, PRECISION)  # (BLOCK_N, BLOCK_M)
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        dk += _dot(dst.to(q.dtype), q, DOT_F32, PRECISION)
        if ATOMIC_DQ:
            dq = _dot(tl.trans(dst).to(k.dtype), k, DOT_F32, PRECISION) * scale  # (BLOCK_M, HEAD_DIM)
            tl.atomic_add(dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq,
                          mask=m_in[:, None] & (offs_d[None, :] < D))
    return dk, dv


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_bwd_dkdv(
    Q, K, V, DO, RowM, RowL, Delta, DK, DV_, DQ, KvLens, QLens, DocRows, DocCols, Mask,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dt, stride_db, stride_ct, stride_cb,
    stride_mb, stride_mh, stride_mm, stride_mn,
    q_heads, kv_group, seq_q, seq_k,
    scale, scale_log2, softcap, win_left, win_right,
    tune_q, tune_k,
    D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    WINDOW: tl.constexpr, PADDING: tl.constexpr, Q_PADDING: tl.constexpr, DOCS: tl.constexpr,
    MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, NATURAL: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    kv_heads = q_heads // kv_group
    b = pid_bh // kv_heads
    hkv = pid_bh % kv_heads
    b64 = b.to(tl.int64)
    off = seq_k - seq_q
    kv_end = seq_k
    if PADDING:
        kv_end = tl.minimum(tl.load(KvLens + b), seq_k)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    n_in = offs_n < seq_k
    col_live = offs_n < kv_end
    k = _load2(K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
               n_in, offs_d < D, True, D != HEAD_DIM)  # (BLOCK_N, HEAD_DIM)
    v = _load2(V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
               n_in, offs_dv < DV, True, DV != HEAD_DIM_V)  # (BLOCK_N, HEAD_DIM_V)

    # query rows [lo, hi) that see some key of this block, [full_lo, full_hi) that see all of them
    j_last = tl.minimum(n0 + BLOCK_N, kv_end) - 1
    lo = seq_q * 0
    hi = seq_q + lo
    full_lo = lo
    full_hi = hi
    if Q_PADDING:
        q_end = tl.minimum(tl.load(QLens + b), seq_q)
        hi = tl.minimum(hi, q_end)
        full_hi = tl.minimum(full_hi, q_end)
    if WINDOW:
        lo = tl.maximum(lo, n0 - off - win_right)
        hi = tl.minimum(hi, j_last - off + win_left + 1)
        full_lo = tl.maximum(full_lo, n0 + BLOCK_N - 1 - off - win_right)
        full_hi = tl.minimum(full_hi, n0 - off + win_left + 1)
    if DOCS:
        qlo = tl.load(DocCols + b64 * stride_cb + offs_n, mask=col_live, other=0)
        qhi = tl.load(DocCols + stride_ct + b64 * stride_cb + offs_n, mask=col_live, other=0)
        lo = tl.maximum(lo, tl.min(tl.where(col_live, qlo, seq_q), 0))
        hi = tl.minimum(hi, tl.max(tl.where(col_live, qhi, 0), 0))
        full_lo = tl.maximum(full_lo, tl.max(tl.where(col_live, qlo, 0), 0))
        full_hi = tl.minimum(full_hi, tl.min(tl.where(col_live, qhi, seq_q), 0))
    if MASK_KIND != 0:
        full_hi = full_lo * 0
    full_hi = tl.where(n0 + BLOCK_N > kv_end, 0, full_hi)  # a block past the last key is never full
    hi = tl.where(j_last < n0, lo, hi)  # every key of this block is padding
    start, fs, fe, end = _tile_phases(lo, hi, full_lo, full_hi, BLOCK_M)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], dtype=tl.float32)
    for g in range(0, kv_group):
        hq = (hkv * kv_group + g).to(tl.int64)
        q_base = Q + b64 * stride_qb + hq * stride_qh
        do_base = DO + b64 * stride_dob + hq * stride_doh
        row_base = (b64 * q_heads + hq) * seq_q
        dq_base = DQ + b64 * stride_dqb + hq * stride_dqh
        dlo_base = DocRows + b64 * stride_db
        m_base = Mask + b64 * stride_mb + hq * stride_mh
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, RowM + row_base, RowL + row_base, Delta + row_base, dq_base, dlo_base,
            dlo_base + stride_dt, m_base, offs_n, stride_qm, stride_qd, stride_dom, stride_dod,
            stride_dqm, stride_dqd, stride_mm, stride_mn, start, fs, kv_end, seq_q, seq_k, off,
            win_left, win_right, scale, scale_log2, softcap, False, D, DV, HEAD_DIM, HEAD_DIM_V,
            BLOCK_M, WINDOW, DOCS, MASK_KIND, SOFTCAP, NATURAL, ATOMIC_DQ, DOT_F32, PRECISION)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, RowM + row_base, RowL + row_base, Delta + row_base, dq_base, dlo_base,
            dlo_base + stride_dt, m_base, offs_n, stride_qm, stride_qd, stride_dom, stride_dod,
            stride_dqm, stride_dqd, stride_mm, stride_mn, fs, fe, kv_end, seq_q, seq_k, off,
            win_left, win_right, scale, scale_log2, softcap, True, D, DV, HEAD_DIM, HEAD_DIM_V,
            BLOCK_M, WINDOW, DOCS, MASK_KIND, SOFTCAP, NATURAL, ATOMIC_DQ, DOT_F32, PRECISION)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, RowM + row_base, RowL + row_base, Delta + row_base, dq_base, dlo_base,
            dlo_base + stride_dt, m_base, offs_n, stride_qm, stride_qd, stride_dom, stride_dod,
            stride_dqm, stride_dqd, stride_mm, stride_mn, fe, end, kv_end, seq_q, seq_k, off,
            win_left, win_right, scale, scale_log2, softcap, False, D, DV, HEAD_DIM, HEAD_DIM_V,
            BLOCK_M, WINDOW, DOCS, MASK_KIND, SOFTCAP, NATURAL, ATOMIC_DQ, DOT_F32, PRECISION)

    dk = dk * scale
    dk_ptrs = DK + b64 * stride_dkb + hkv.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV_ + b64 * stride_dvb + hkv.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_in[:, None] & (offs_d[None, :] < D))
    tl.store(dv_ptrs, dv.to(DV_.dtype.element_ty), mask=n_in[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_dq_inner(
    dq, q, do, row_m, row_l, delta, rows, dlo, dhi, m_row,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    lo, hi, kv_end, seq_k, off, win_left, win_right, scale, scale_log2, softcap,
    IS_FULL: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr,
    MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, NATURAL: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < seq_k
        kt = _load2(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                    offs_d < D, n_in, D != HEAD_DIM, not IS_FULL)  # (HEAD_DIM, BLOCK_N)
        vt = _load2(v_base + offs_dv[:, None] * stride_vd + offs_n[None, :] * stride_vn,
                    offs_dv < DV, n_in, DV != HEAD_DIM_V, not IS_FULL)  # (HEAD_DIM_V, BLOCK_N)
        if MASK_KIND != 0:
            m_ptrs = m_row[:, None] + offs_n[None, :] * stride_mn
            m_mask = n_in[None, :]
        else:
            m_ptrs = m_row
            m_mask = n_in
        qk = _dot(q, kt, DOT_F32, PRECISION)  # (BLOCK_M, BLOCK_N)
        s, t = _logits(qk, m_ptrs, m_mask, scale, scale_log2, softcap, SOFTCAP, MASK_KIND, NATURAL)
        if not IS_FULL:
            ok = _allowed(rows[:, None], offs_n[None, :], kv_end, off, win_left, win_right,
                          dlo[:, None], dhi[:, None], m_ptrs, m_mask, WINDOW, DOCS, MASK_KIND)
            s = tl.where(ok, s, NEG_INF)
        if NATURAL:
            p = tl.exp2((s - row_m[:, None]) * LOG2E) * row_l[:, None]
        else:
            p = tl.exp2(tl.fma(qk, scale_log2, -row_m[:, None])) * row_l[:, None]
            if not IS_FULL:
                p = tl.where(ok, p, 0.0)
        dp = _dot(do, vt, DOT_F32, PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), DOT_F32, PRECISION)
    return dq


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_bwd_dq(
    Q, K, V, DO, RowM, RowL, Delta, DQ, KvLens, QLens, DocRows, Mask,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dt, stride_db,
    stride_mb, stride_mh, stride_mm, stride_mn,
    q_heads, kv_group, seq_q, seq_k,
    scale, scale_log2, softcap, win_left, win_right,
    tune_q, tune_k,
    D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    WINDOW: tl.constexpr, PADDING: tl.constexpr, Q_PADDING: tl.constexpr, DOCS: tl.constexpr,
    MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, NATURAL: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    hq = pid_bh % q_heads
    hkv = hq // kv_group
    b64 = b.to(tl.int64)
    hq64 = hq.to(tl.int64)
    off = seq_k - seq_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    m_in = offs_m < seq_q
    rows = tl.where(m_in, offs_m, 0)
    row_live = m_in
    if Q_PADDING:
        row_live = row_live & (rows < tl.load(QLens + b))
    kv_end = seq_k
    if PADDING:
        kv_end = tl.minimum(tl.load(KvLens + b), seq_k)
    if DOCS:
        dlo = tl.load(DocRows + b64 * stride_db + rows)
        dhi = tl.load(DocRows + stride_dt + b64 * stride_db + rows)
    else:
        dlo = rows
        dhi = rows
    if MASK_KIND != 0:
        m_row = Mask + b64 * stride_mb + hq64 * stride_mh + rows.to(tl.int64) * stride_mm
    else:
        m_row = Mask
    i_lo = tl.min(tl.where(row_live, rows, seq_q), 0)
    i_hi = tl.max(tl.where(row_live, rows, -1), 0)
    lo, hi, full_lo, full_hi = _key_bounds(i_lo, i_hi, row_live, dlo, dhi, kv_end, off,
                                           win_left, win_right, WINDOW, DOCS)
    if MASK_KIND != 0:
        full_hi = full_lo * 0
    start, fs, fe, end = _tile_phases(lo, hi, full_lo, full_hi, BLOCK_N)

    q = _load2(Q + b64 * stride_qb + hq64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
               m_in, offs_d < D, True, D != HEAD_DIM)
    do = _load2(DO + b64 * stride_dob + hq64 * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                m_in, offs_dv < DV, True, DV != HEAD_DIM_V)
    row_base = (b64 * q_heads + hq64) * seq_q
    row_m = tl.load(RowM + row_base + offs_m, mask=m_in, other=POS_INF)
    row_l = tl.load(RowL + row_base + offs_m, mask=m_in, other=0.0)
    delta = tl.load(Delta + row_base + offs_m, mask=m_in, other=0.0)
    k_base = K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, row_m, row_l, delta, rows, dlo, dhi, m_row, k_base, v_base, stride_kn, stride_kd,
                       stride_vn, stride_vd, stride_mn, start, fs, kv_end, seq_k, off, win_left, win_right,
                       scale, scale_log2, softcap, False, D, DV, HEAD_DIM, HEAD_DIM_V, BLOCK_N, WINDOW,
                       DOCS, MASK_KIND, SOFTCAP, NATURAL, DOT_F32, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, row_m, row_l, delta, rows, dlo, dhi, m_row, k_base, v_base, stride_kn, stride_kd,
                       stride_vn, stride_vd, stride_mn, fs, fe, kv_end, seq_k, off, win_left, win_right,
                       scale, scale_log2, softcap, True, D, DV, HEAD_DIM, HEAD_DIM_V, BLOCK_N, WINDOW,
                       DOCS, MASK_KIND, SOFTCAP, NATURAL, DOT_F32, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, row_m, row_l, delta, rows, dlo, dhi, m_row, k_base, v_base, stride_kn, stride_kd,
                       stride_vn, stride_vd, stride_mn, fe, end, kv_end, seq_k, off, win_left, win_right,
                       scale, scale_log2, softcap, False, D, DV, HEAD_DIM, HEAD_DIM_V, BLOCK_N, WINDOW,
                       DOCS, MASK_KIND, SOFTCAP, NATURAL, DOT_F32, PRECISION)
    dq = dq * scale
    dq_ptrs = DQ + b64 * stride_dqb + hq64 * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_in[:, None] & (offs_d[None, :] < D))


INTERPRET = type(_attn_fwd).__name__ == "InterpretedFunction"


# -- launchers --------------------------------------------------------------------------------

# the interpreter runs one small fixed configuration (autotuning there would only be slow)
_INTERPRET_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16)


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, warps, stages), best first: the first that fits is also the untuned default.
# Chosen from offline sm_90 builds (benchmarks/bench_gpu.py --compile) for few register spills at
# head dim 128; the small ones at the end are for head dim 256 and dense masks. Pruned per call
# by the shared memory they would need.
_FWD_CONFIGS = [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 128, 8, 2), _cfg(128, 32, 4, 4),
                _cfg(64, 32, 4, 2), _cfg(32, 32, 4, 2)]
_DECODE_CONFIGS = [_cfg(16, 64, 4, 3), _cfg(16, 128, 4, 3), _cfg(32, 64, 4, 3), _cfg(64, 64, 4, 2),
                   _cfg(16, 32, 4, 2)]
_DKDV_CONFIGS = [_cfg(16, 128, 8, 2), _cfg(32, 64, 8, 2), _cfg(32, 128, 8, 2), _cfg(64, 64, 8, 2),
                 _cfg(16, 64, 4, 2), _cfg(16, 32, 4, 2)]
_DQ_CONFIGS = [_cfg(128, 32, 8, 2), _cfg(128, 64, 8, 2), _cfg(64, 32, 4, 3), _cfg(64, 64, 4, 3),
               _cfg(32, 32, 4, 2)]
_SMEM_BUDGET = 200 * 1024  # bytes; an H100 has 227 KiB per block, and the estimate below is rough
_TUNE_KEY = ["tune_q", "tune_k", "HEAD_DIM", "HEAD_DIM_V", "WINDOW", "PADDING", "Q_PADDING", "DOCS",
             "MASK_KIND", "SOFTCAP"]


def _smem_estimate(kind, bm, bn, stages, kw):
    hd, hdv = kw["HEAD_DIM"], kw["HEAD_DIM_V"]
    elt = 4 if kw.get("PRECISION") == "ieee" else 2
    mask = {0: 0, 1: 1, 2: 4}[kw.get("MASK_KIND", 0)] * stages * bm * bn  # dense-mask tiles in flight
    if kind in ("fwd", "dq"):  # one query tile resident, key/value tiles streamed
        return elt * (bm * hd + stages * bn * (hd + hdv)) + mask
    atomic = 3 * bm * hd * 4 if kw.get("ATOMIC_DQ") else 0  # dQ partial tile and its layout conversions
    return elt * (bn * (hd + hdv) + stages * bm * (hd + hdv)) + mask + atomic


def _prune(kind):
    def prune(configs, named_args, **kw):
        rows = kw.get("PACK", 1) * named_args.get("seq_q", 1 << 30)
        keep = []
        for c in configs:
            bm, bn, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], max(c.num_stages, 1)
            if _smem_estimate(kind, bm, bn, st, kw) > _SMEM_BUDGET:
                continue
            if kind == "fwd" and bm > max(16, triton.next_power_of_2(rows)):
                continue
            keep.append(c)
        if not keep:  # nothing fits the estimate: the smallest tiles, fewest stages
            c = min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))
            keep = [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=1)]
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


def first_fitting_config(tuned, args, kwargs):
    named = dict(zip(tuned.arg_names, args))
    prune = getattr(tuned, "early_config_prune", None)
    configs = prune(tuned.configs, named, **kwargs) if prune else tuned.configs
    return configs[0]


def _launch(kernel, tuned, grid, args, kwargs, fixed=False):
    # every launch goes through here (benchmarks/bench_gpu.py --compile swaps it for an offline compiler)
    if fixed:  # a kernel whose blocks the caller chose
        kernel[grid](*args, **kwargs)
    elif INTERPRET:
        kernel[grid](*args, **kwargs, **_INTERPRET_BLOCKS)
    elif not autotune_enabled():
        cfg = first_fitting_config(tuned, args, kwargs)
        kernel[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        tuned[grid](*args, **kwargs)


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


def _mask_args(mask, device):
    """(pointer tensor, MASK_KIND, 4 strides) for a 4-D dense mask or None."""
    if mask is None:
        return _dummy(device, torch.uint8), 0, (0, 0, 0, 0)
    kind = 1 if mask.dtype == torch.bool else 2
    t = mask.view(torch.uint8) if kind == 1 else mask
    return t, kind, _bcast_strides(t)


def _bcast_strides(t):
    # kernels index every dim directly: a broadcast (size-1) dim must have stride 0
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def _common(q, k, v, *, scale, softcap, window, kv_lens, q_lens, doc_rows, mask):
    # arguments and compile-time switches shared by every kernel
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    i32 = _dummy(dev, torch.int32)
    m_t, mask_kind, m_strides = _mask_args(mask, dev)
    docs = doc_rows if doc_rows is not None else i32
    doc_strides = _bcast_strides(doc_rows)[:2] if doc_rows is not None else (0, 0)
    left, right = window if window is not None else (0, 0)
    scalars = dict(scale=float(scale), scale_log2=float(scale) * math.log2(math.e),
                   softcap=float(softcap or 0.0), win_left=int(left), win_right=int(right),
                   tune_q=_bucket(Lq), tune_k=_bucket(Lk))
    flags = dict(D=D, DV=Dv, HEAD_DIM=_pad_dim(D), HEAD_DIM_V=_pad_dim(Dv), WINDOW=window is not None,
                 PADDING=kv_lens is not None, Q_PADDING=q_lens is not None, DOCS=doc_rows is not None,
                 MASK_KIND=mask_kind, SOFTCAP=softcap is not None,
                 NATURAL=softcap is not None or mask_kind == 2, DOT_F32=INTERPRET,
                 PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    lens = (kv_lens if kv_lens is not None else i32, q_lens if q_lens is not None else i32)
    return dict(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, lens=lens, docs=docs, doc_strides=doc_strides,
                mask=m_t, m_strides=m_strides, scalars=scalars, flags=flags)


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(batch, q_heads, kv_heads, seq_q, seq_k, device, num_splits=None) -> tuple[int, int]:
    """(PACK, NUM_SPLITS) for a forward call.

    PACK query heads of one GQA group share a program when their rows fit one tile (decoding),
    so each key/value tile is read once per group. Split-KV is used when the programs that
    remain would leave most of the GPU idle and the keys are long.
    """
    group = q_heads // kv_heads
    pack = group if group > 1 and group * seq_q <= 64 else 1
    if num_splits is not None:
        return pack, max(1, int(num_splits))
    if INTERPRET or device.type != "cuda":
        return pack, 1
    programs = batch * (q_heads // pack) * triton.cdiv(pack * seq_q, 64)
    sms = _sm_count(device)
    if programs >= 2 * sms or seq_k < 1024:
        return pack, 1
    # about four programs per SM keep enough loads in flight for a memory-bound step
    return pack, max(1, min(triton.cdiv(4 * sms, programs), triton.cdiv(seq_k, 512), 64))


def forward(q, k, v, *, scale, softcap=None, window=None, kv_lens=None, q_lens=None, doc_rows=None,
            mask=None, stats=False, num_splits=None):
    """Run the forward kernel. Returns (out, lse, row_max, row_inv_sum, max_logit, entropy).

    lse and the statistics are float32 (B, Hq, Lq); max_logit and entropy are empty tensors
    unless ``stats``. row_max (log2 units, +inf for fully-masked rows) and row_inv_sum (1/sum,
    0 there) are what :func:`backward` needs to recompute the probabilities.
    """
    c = _common(q, k, v, scale=scale, softcap=softcap, window=window, kv_lens=kv_lens, q_lens=q_lens,
                doc_rows=doc_rows, mask=mask)
    B, Hq, Hkv, Lq, Lk, Dv = c["B"], c["Hq"], c["Hkv"], c["Lq"], c["Lk"], c["Dv"]
    pack, splits = plan_splits(B, Hq, Hkv, Lq, Lk, q.device, num_splits)
    f32 = dict(dtype=torch.float32, device=q.device)
    if splits == 1:
        out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
        o_strides = (0, *out.stride())
        shape = (B, Hq, Lq)
    else:
        out = torch.empty(splits, B, Hq, Lq, Dv, **f32)  # partial outputs, normalised per split
        o_strides = out.stride()
        shape = (splits, B, Hq, Lq)
    lse = torch.empty(shape, **f32) if splits == 1 else _dummy(q.device, torch.float32)
    row_m, row_l = torch.empty(shape, **f32), torch.empty(shape, **f32)
    maxl = torch.empty(shape, **f32) if stats else _dummy(q.device, torch.float32)
    ent = torch.empty(shape, **f32) if stats else _dummy(q.device, torch.float32)
    s_stride = B * Hq * Lq
    grid = lambda meta: (triton.cdiv(pack * Lq, meta["BLOCK_M"]), B * Hq // pack, splits)  # noqa: E731
    args = (q, k, v, out, lse, row_m, row_l, maxl, ent, *c["lens"], c["docs"], c["mask"],
            *q.stride(), *k.stride(), *v.stride(), *o_strides, s_stride, *c["doc_strides"], *c["m_strides"],
            Hq, Hq // Hkv, Lq, Lk)
    kw = dict(**c["scalars"], **c["flags"], PACK=pack, NUM_SPLITS=splits, STATS=bool(stats))
    decode = pack * Lq <= 64
    _launch(_attn_fwd, _decode_tuned if decode else _fwd_tuned, grid, args, kw)
    if splits > 1:
        return _merge_splits(out, row_m, row_l, maxl if stats else None, ent if stats else None, q.dtype,
                             kw["NATURAL"])
    if not stats:
        maxl, ent = lse.new_empty(0), lse.new_empty(0)  # distinct tensors: custom ops forbid aliased outputs
    return out, lse, row_m, row_l, maxl, ent


def _merge_splits(out_s, m_s, l_s, max_s, ent_s, dtype, natural):
    # each split holds a softmax over its own keys: max m_s, sum l_s, normalised output
    unit = math.log2(math.e) if natural else 1.0  # the kernel's max is in natural units or log2 units
    m_s = m_s * unit  # (S, B, Hq, Lq) log2 units
    m = m_s.amax(0)  # (B, Hq, Lq); -inf where no split saw a key
    alive = m > float("-inf")
    m_use = torch.where(alive, m, torch.zeros_like(m))
    part = l_s * torch.exp2(torch.where(l_s > 0, m_s - m_use, torch.zeros_like(m_s)))  # (S, B, Hq, Lq) each split's share
    l = part.sum(0)
    l_safe = torch.where(alive, l, torch.ones_like(l))
    w = part / l_safe  # (S, B, Hq, Lq) weights summing to 1 over the splits
    out = (w[..., None] * out_s).sum(0).to(dtype)  # (B, Hq, Lq, Dv)
    ln2 = math.log(2.0)
    lse = torch.where(alive, (m_use + torch.log2(l_safe)) * ln2, torch.full_like(m, float("-inf")))
    row_m = torch.where(alive, m / unit, torch.full_like(m, float("inf")))
    row_l = torch.where(alive, 1.0 / l_safe, torch.zeros_like(l))
    if max_s is None:
        return out, lse, row_m, row_l, lse.new_empty(0), lse.new_empty(0)
    maxl = max_s.amax(0)
    # H = sum_s w_s (H_s - log w_s)
    wlogw = torch.where(w > 0, w * torch.log(torch.where(w > 0, w, torch.ones_like(w))), torch.zeros_like(w))
    ent = ((w * ent_s).sum(0) - wlogw.sum(0)).clamp_min(0)
    ent = torch.where(alive, ent, torch.zeros_like(ent))
    return out, lse, row_m, row_l, maxl, ent


def backward(do, q, k, v, out, row_m, row_l, *, scale, softcap=None, window=None, kv_lens=None,
             q_lens=None, doc_rows=None, doc_cols=None, mask=None, deterministic=False):
    """Gradients (dq, dk, dv). ``deterministic``: dQ from its own pass instead of atomic adds."""
    c = _common(q, k, v, scale=scale, softcap=softcap, window=window, kv_lens=kv_lens, q_lens=q_lens,
                doc_rows=doc_rows, mask=mask)
    B, Hq, Hkv, Lq, Lk, D, Dv = c["B"], c["Hq"], c["Hkv"], c["Lq"], c["Lk"], c["D"], c["Dv"]
    f32 = dict(dtype=torch.float32, device=q.device)
    delta = torch.empty(B, Hq, Lq, **f32)
    row_m, row_l = row_m.contiguous(), row_l.contiguous()
    pre_bm = 16 if INTERPRET else 64
    _launch(_attn_bwd_pre, None, (triton.cdiv(Lq, pre_bm), B * Hq),
            (out, do, delta, *out.stride(), *do.stride(), Hq, Lq),
            dict(DV=Dv, HEAD_DIM_V=_pad_dim(Dv), BLOCK_M=pre_bm), fixed=True)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    atomic = not deterministic
    dq_acc = torch.zeros(B, Hq, Lq, D, **f32) if atomic else _dummy(q.device, torch.float32)
    dq_strides = dq_acc.stride() if atomic else (0, 0, 0, 0)
    cols = doc_cols if doc_cols is not None else _dummy(q.device, torch.int32)
    col_strides = _bcast_strides(doc_cols)[:2] if doc_cols is not None else (0, 0)
    grid = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
    args = (q, k, v, do, row_m, row_l, delta, dk, dv, dq_acc, *c["lens"], c["docs"], cols, c["mask"],
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *dq_strides,
            *c["doc_strides"], *col_strides, *c["m_strides"], Hq, Hq // Hkv, Lq, Lk)
    _launch(_attn_bwd_dkdv, _dkdv_tuned, grid, args, dict(**c["scalars"], **c["flags"], ATOMIC_DQ=atomic))
    if atomic:
        return dq_acc.to(q.dtype), dk, dv
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)  # noqa: E731
    args = (q, k, v, do, row_m, row_l, delta, dq, *c["lens"], c["docs"], c["mask"],
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            *c["doc_strides"], *c["m_strides"], Hq, Hq // Hkv, Lq, Lk)
    _launch(_attn_bwd_dq, _dq_tuned, grid, args, dict(**c["scalars"], **c["flags"]))
    return dq, dk, dv
