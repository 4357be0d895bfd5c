"""bfloat16 forward and backward of the ``cpu`` backend on the CPU's bfloat16 dot products (issue 14).

The same algorithm, tile map and outputs as ``cpu_flash.flash_fwd`` (its module docstring), with the
two block products on bfloat16 operands with float32 sums -- on AMX's tile unit (``cpu_bf16.mm_amx``,
Intel) or on AVX512-BF16's vdpbf16ps (``cpu_bf16.mm_bf16``, AMD Zen 4/5), whichever :func:`engine`
picks (the module keeps its first name) -- and each tile
*transposed*, as ``cpu_fwd`` computes it (keys x queries: the lanes of a vector are 16 query rows)::

    s^T    = K_blk @ Q_blk^T        AMX: K's rows as stored, Q_blk^T pairs packed once per task
    m, alpha, l, p^T                one vertical pass per 16 query rows (_vsoftmax_pack): the scale
                                    folded into the exponent, exp2(s c - m) in one FMA; p^T written
                                    straight as bfloat16 pairs of key rows (the CPU's conversion)
    acc^T  = alpha acc^T + V_blk^T @ P^T    AMX: V^T per key block (made once per call), P^T as above;
                                            vdpbf16ps: V^T given as V's key rows in pairs (no transposition)

Without softcap/ALiBi/bias the tiles stay raw q.k (a negative scale's sign is flipped into Q^T,
exact): the running max m is raw, the exponent is (s - m) c (the difference exact near the max,
0 at the max itself, then one rounding) and the statistics' M = fl(m c) keeps its rest m c - M in
the log half (float64); partial tiles take only their element-wise mask. With those terms every
tile is scaled first and takes ``cpu_fwd._score_terms_t``, then the same step with c = 1. acc^T (Dv x queries) is rescaled
column-wise by alpha inside the step, skipped where alpha is 1 for every row of a vector; the
exponents are taken against a reference max that moves only when the true max gets more than
LAZY = 8 above it (p <= 2**8 meanwhile), so acc^T is rescaled in a few tiles per row, not nearly every
one. row_max/row_log are the lse halves against that reference; the true max (max_logit) is kept apart.

Inputs are bfloat16, so Q, K and V reach the tile unit without rounding; p is rounded to bfloat16
(8 bits) before P V, which is what the bfloat16 tolerance rule allows (torch SDPA's bfloat16 kernels
do the same). The statistics (row max, lse halves, entropy) come from the float32 scores and p.

Operands are zero-padded to whole AMX tiles (``cpu_bf16``'s padding contract) only where the shape
needs it: K as (B, Hkv, Lk rounded up to BLOCK_N, D rounded up to 32) (no copy when aligned); V^T as
(B, Hkv, nK, Dv rounded up to 16, BLOCK_N); Q as given. Grouped-query heads read their kv head's
blocks: nothing is repeated.

Every buffer the tile unit loads or stores starts on a 64-byte line (``_zeros_f32``): on this Xeon a
tileloadd of rows off a line costs ~7x one on a line (25 vs 3.6 ns; tilestored 15 vs 7 ns; a
tdpbf16ps ~7 ns), and AMX work does not overlap the vector work here (a tile product issued before
the softmax of the previous tile gained nothing). Where the time goes (one thread, dense
(1, 4, 2048, 2048, D), each part left out of the kernel, loaded machine): D = 64, ~3.9 us a tile:
Q K^T ~24 %, the softmax step ~43 %, P V ~28 %; D = 128, ~5.7 us a tile: ~25 / 38 / 40 %
(acc^T's rescale ~0-2 % with the lazy max). The float32 kernel takes ~10 us a tile at D = 64 in the
same run. On the AMD Zen 4 (vdpbf16ps, 1 thread, D = 64, in-process A/B with each part left out):
~6.3 us a tile: Q K^T ~39 %, P V ~42 % (the products at 90-95 % of vdpbf16ps's ceiling), the softmax
step ~16 % (its exp2 ~7.5 %, the bfloat16 pairs ~3 %, the column max ~1.4 %); fewer vector ops in the
step (no select for exponents below -126, one vcvtne2ps2bf16 + vpermw per pair) measured within 1 %:
the products and exp2's polynomial share the FMA pipes. Around the kernel: :func:`pack_fwd` makes V^T
(AMX) or V's key-row pairs (vdpbf16ps: an interleave, 0.3 ms against the transposition's 2 ms for a
(1, 16, 2048, 64) V) in a kept buffer, and the kernel writes the output as bfloat16 itself (torch's
transposing copy and the float32 output's conversion took ~8 % of a call).

**Backward** (``flash_bwd_amx``): cpu_bwd's design with row-major tiles: one task per (batch, head,
query block), recomputing P from the lse halves, two sweeps over its non-empty key tiles::

    sweep 1:  S = Q_blk K^T, P (as the forward's scores)     AMX, K^T panels
              dP = dO_blk V^T                                AMX, V^T panels
              delta += rowsum(P * dP)                        float64 (exact products)
              dV^T += dO^T bf16(P)                           AMX, P packed as pairs of query rows
              P and dP kept (2 x the task's tiles, float32)
    sweep 2:  dS = P (dP - delta)                            (times the softcap's c (1 - tanh^2))
              dQ += bf16(dS) K,  dK^T += Q^T bf16(dS)        AMX, K pairs along keys

Five tile products and one exp2 per score. AMX has no transposed-A form, so dK and dV are summed
transposed (dO^T and Q^T made once per task) and turned back at the end; each kv head's dK^T/dV^T
has one writer (whole kv heads per worker) or every worker its own copy, summed in worker order.
The backward of a ring shard (``shard_backward``, with a given delta) stays on the float32 kernels.
Its buffers and packed operands start on 64-byte lines too (as the forward's; ~5 % faster, the same bits).

float16 inputs do not come here: float16 has 3 more mantissa bits than bfloat16, so rounding them to
bfloat16 would lose accuracy float16 callers are owed; they keep the float32 kernels.
"""

from __future__ import annotations

import math
import os
import threading
from typing import NamedTuple

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload
from numba.core import config as numba_config

from selfattn.kernels import numba_cache_dir
from selfattn.kernels import cpu_bf16 as _bf
from selfattn.kernels.cpu_bwd import _mxcsr_ftz, _mxcsr_set
from selfattn.kernels.cpu_flash import (
    BLOCK_M,
    _finish_rows,
    BLOCK_N,
    EMPTY,
    FASTMATH,
    PARTIAL,
    _addr,
    _Exact,
    _padded,
    _probs,
    _query_task,
    _score_rest,
    _score_terms,
    _vec_exp2_row,
    _Vectors,
)
from selfattn.kernels.cpu_fwd import I1, LANES, NO_COUNTER, _exp2_v, _fetch_add, _finish_step, _loop, _score_terms_t
from selfattn.kernels import cpu_bwd as _bwd_src, cpu_flash as _flash_src, cpu_fwd as _fwd_src, stamp_sources

_CACHE_DIR, _NUMBA_CACHE_DIR = numba_cache_dir(), numba_config.CACHE_DIR
if _CACHE_DIR is not None:
    numba_config.CACHE_DIR = _CACHE_DIR

# -- the engine of the block products ------------------------------------------------------------
# Two engines compute the same products on the same operands (cpu_bf16's AMX padding contract): the
# tile unit (tdpbf16ps, ``mm_amx``) and AVX512-BF16's vdpbf16ps (``mm_bf16``, run over whole 16-row,
# 16-column blocks so that it writes what the tile unit writes). The kernels take the engine as an
# empty marker array, so each engine compiles into its own specialisation and a host types only the
# one it runs (the other's instructions would not compile there).
ENGINE_AMX = np.zeros(0, np.int8)  # the tile unit
ENGINE_DOT = np.zeros(0, np.uint8)  # vdpbf16ps
ENGINE_ENV = "SELFATTN_CPU_BF16_ENGINE"  # "amx" or "dot": that engine only (where the CPU has it); else the faster one


def _is_amx(engine):
    if not (isinstance(engine, types.Array) and engine.dtype in (types.int8, types.uint8)):
        raise TypeError(f"selfattn.kernels.cpu_amx: engine marker must be ENGINE_AMX or ENGINE_DOT, got {engine}")
    return engine.dtype == types.int8


def _mm(engine, a, bp, c, m, kdim, n):
    """c[:M16, :N16] = a @ B (cpu_bf16's padding contract) on ``engine``."""


def _mm_add(engine, a, bp, c, m, kdim, n):
    """c[:M16, :N16] += a @ B, as :func:`_mm`."""


def _begin(engine):
    """Before the products of a thread's run (AMX: load the tile configuration)."""


def _end(engine):
    """After them (AMX: release the tile state)."""


@overload(_mm)
def _mm_impl(engine, a, bp, c, m, kdim, n):
    if _is_amx(engine):
        return lambda engine, a, bp, c, m, kdim, n: _bf.mm_amx(a, bp, c, m, kdim, n)
    return lambda engine, a, bp, c, m, kdim, n: _bf.mm_bf16(a, bp, c, (m + 15) // 16 * 16, kdim, (n + 15) // 16 * 16)


@overload(_mm_add)
def _mm_add_impl(engine, a, bp, c, m, kdim, n):
    if _is_amx(engine):
        return lambda engine, a, bp, c, m, kdim, n: _bf.mm_amx_add(a, bp, c, m, kdim, n)
    return lambda engine, a, bp, c, m, kdim, n: _bf.mm_bf16_add(a, bp, c, (m + 15) // 16 * 16, kdim, (n + 15) // 16 * 16)


def _pv_add(engine, inp, b, hk, kb, pk, acct, Dv, ncols, rows):
    """acct[:Dv16, :N16] += V_blk^T P^T for key block kb of (b, hk) (``pk``: P^T in pairs of key rows), from
    inp.vt on AMX (no transposed-A form) or inp.vp on vdpbf16ps."""


@overload(_pv_add)
def _pv_add_impl(engine, inp, b, hk, kb, pk, acct, Dv, ncols, rows):
    if _is_amx(engine):
        def pv_amx(engine, inp, b, hk, kb, pk, acct, Dv, ncols, rows):
            _bf.mm_amx_add(inp.vt[b, hk, kb], pk, acct, Dv, ncols, rows)
        return pv_amx

    def pv_dot(engine, inp, b, hk, kb, pk, acct, Dv, ncols, rows):
        _bf.mm_bf16_tn_add(inp.vp[b, hk, kb], pk, acct, (Dv + 15) // 16 * 16, ncols, (rows + 15) // 16 * 16)
    return pv_dot


@overload(_begin)
def _begin_impl(engine):
    if _is_amx(engine):
        return lambda engine: _bf.amx_begin()
    return lambda engine: None


@overload(_end)
def _end_impl(engine):
    if _is_amx(engine):
        return lambda engine: _bf.amx_end()
    return lambda engine: None


PAIRS_N = BLOCK_N // 2  # pair rows of V per key block
LAZY = 8.0  # the forward's reference max trails the true one by at most this (score units, base 2)


def engine():
    """What the bfloat16 kernels run their products on here: ``ENGINE_AMX``, ``ENGINE_DOT`` or None (the
    float32 kernels take bfloat16 calls). Auto: AMX where the CPU and OS grant it, else vdpbf16ps where it
    pays (``cpu_bf16.bf16_dot_pays``: at least 1.25x the float32 FMA rate, as on AMD Zen 4/5; not on
    Intel CPUs that issue it at half that rate). ``SELFATTN_CPU_BF16_ENGINE=amx`` or ``dot`` asks for one
    engine whatever it costs (tests, comparisons): None where the CPU lacks it. ``SELFATTN_CPU_BF16=0``
    (and ``SELFATTN_CPU_AMX=0`` for AMX) turn them off."""
    want = os.environ.get(ENGINE_ENV, "").strip().lower()
    if want not in ("", "auto", "amx", "dot"):
        raise ValueError(f"{ENGINE_ENV} must be 'amx', 'dot' or 'auto' (or unset), got {want!r}")
    if not _bf.has_bf16_dot():
        return None
    if want == "amx":
        return ENGINE_AMX if _bf.has_amx_bf16() else None
    if want == "dot":
        return ENGINE_DOT
    if _bf.has_amx_bf16():
        return ENGINE_AMX
    return ENGINE_DOT if _bf.bf16_dot_pays() else None


def available() -> bool:
    """The bfloat16 kernels may run here: :func:`engine` is not None."""
    return engine() is not None


def describe() -> str:
    """What the ``cpu`` backend does with bfloat16 inputs here (its ``features`` line)."""
    try:
        eng = engine()
    except ValueError as e:  # a bad SELFATTN_CPU_BF16_ENGINE: bfloat16 calls raise it; the listing says it
        return f"products: none until the environment is fixed ({e})"
    if eng is ENGINE_AMX:
        return "products: AMX (bfloat16 tiles, float32 softmax and sums; forward and backward)"
    if eng is ENGINE_DOT:
        return "products: AVX512-BF16 vdpbf16ps (bfloat16 pairs, float32 softmax and sums; forward and backward)"
    want = os.environ.get(ENGINE_ENV, "").strip().lower()
    if not _bf.host_has_bf16_dot():
        why = "no AVX512-BF16 here"
    elif not _bf.has_bf16_dot():
        why = f"bfloat16 products turned off ({_bf.ENV_FLAG}=0)"
    elif want == "amx":
        why = f"{ENGINE_ENV}=amx but no AMX-BF16 here (or no tile permission from the OS, or {_bf.AMX_ENV_FLAG}=0)"
    else:
        why = (f"no AMX-BF16, and vdpbf16ps runs at {_bf.bf16_dot_speedup():.2f}x the float32 FMA rate here "
               f"(under 1.25x: float32 is as fast; {ENGINE_ENV}=dot uses it anyway)")
    return f"products: float32 fallback, inputs converted ({why})"


class AmxInputs(NamedTuple):
    """One call's operands as the tile unit reads them (bfloat16 bits as uint16)."""

    q: np.ndarray  # (B, Hq, Lq, D): queries as given (each task packs its block's Q^T pairs)
    k: np.ndarray  # (B, Hkv, nK * BLOCK_N, D32): keys, row-major (the A of s^T = K_blk Q^T), zero past Lk and D
    vt: np.ndarray  # AMX: (B, Hkv, nK, Dv16, BLOCK_N): V^T per key block (the A of acc^T += V^T P^T), zero past Lk and Dv
    vp: np.ndarray  # vdpbf16ps: (B, Hkv, nK, PAIRS_N, Dv16, 2): V's key rows in pairs per key block (that A given as
    #                 pairs of A^T: no transposition), zero past Lk and Dv. The other engine's field is empty
    head_dim: int  # D (the scores' reduction length)
    kv_len: int  # Lk
    qk_abs: float  # |opts.qk_scale| (float32): q.k -> score units once the sign is in Q^T
    negate: bool  # a negative scale without a softcap: Q^T's sign bits flipped (exact), so max q.k is the max score
    engine: np.ndarray  # ENGINE_AMX or ENGINE_DOT: what computes the products


# -- tile buffers: rows on 64-byte lines -----------------------------------------------------------
# A tileloadd/tilestored whose rows start off a cache line costs ~7x / ~2x one whose rows start on one
# (this Xeon, one thread: 25 vs 3.6 ns, 15 vs 7 ns per 16 x 64-byte tile); numba's and numpy's arrays
# are only 16-byte aligned, so every buffer the tile unit reads or writes is cut from a larger one.


@njit(cache=True)
def _zeros_f32(n0, n1):
    # zeroed float32 (n0, n1), C-contiguous, its first element on a 64-byte boundary
    raw = np.zeros(n0 * n1 + 16, np.float32)
    off = ((64 - _addr(raw) % 64) % 64) // 4
    return raw[off:off + n0 * n1].reshape((n0, n1))


@njit(cache=True)
def _zeros_u16(n0, n1, n2):
    # zeroed uint16 (n0, n1, n2), C-contiguous, its first element on a 64-byte boundary
    raw = np.zeros(n0 * n1 * n2 + 32, np.uint16)
    off = ((64 - _addr(raw) % 64) % 64) // 2
    return raw[off:off + n0 * n1 * n2].reshape((n0, n1, n2))


# -- the fused online-softmax step of a transposed tile ---------------------------------------------
# s^T (keys x queries) comes off the tile unit as raw q.k; per LANES query rows one pass finds the
# column max, and one more computes p^T = exp2(s^T c - m) (c the scale in score units, one FMA), its
# column sums, and writes p^T straight as the bfloat16 pairs of key rows that the next product
# (acc^T += V^T P^T) takes as its B operand: no horizontal reduction, no float32 p^T stored.


def _step_pack(builder, vec, ps, nk, cv, pm, pt, pl, pe, palpha, ppk, pacc, nacc, want, lazy):
    # one group of LANES query rows (IR); ps, ppk, pacc: the group's first element in s^T, the pairs
    # and acc^T (row stride BLOCK_M elements each)
    c, w = vec.const, vec.width
    fconst = lambda x: ir.Constant(vec.vty, [x] * w)  # noqa: E731
    ninf, inf, lo = fconst(float("-inf")), fconst(float("inf")), fconst(-126.0)
    nan = ir.Constant(vec.vty, [float("nan")] * w)
    row = lambda j: builder.mul(j, c(BLOCK_M))  # noqa: E731
    iv = ir.VectorType(ir.IntType(32), w)
    hv = ir.VectorType(ir.IntType(16), w)
    bv = ir.VectorType(_bf._BFloat(), w)

    def vmax(a, x):
        # ordered: a NaN element never wins
        return builder.select(builder.fcmp_ordered(">", x, a), x, a)

    # -- column max of the raw products (4 chains; c > 0: the max score's) --
    nk4 = builder.and_(nk, c(-4))
    accs = _loop(builder, vec, c(0), nk4, 4, [ninf] * 4,
                 lambda j, a: [vmax(a[u], vec.load(ps, row(builder.add(j, c(u))))) for u in range(4)], "amax4")
    accs = _loop(builder, vec, nk4, nk, 1, accs, lambda j, a: [vmax(a[0], vec.load(ps, row(j)))] + a[1:], "amax1")
    cmax = vmax(vmax(accs[0], accs[1]), vmax(accs[2], accs[3]))
    # -- the true running max (the statistics'), and the reference m the exponents are taken
    # against (both in units of s): m moves to the true max only when that is more than `lazy`
    # score units above it (or m is -inf), so that acc^T is rescaled in a few tiles instead of
    # nearly every one; p <= 2**lazy meanwhile --
    t_new = vmax(vec.load(pt, c(0)), cmax)
    vec.store(t_new, pt, c(0))
    m_old = vec.load(pm, c(0))
    l_old = vec.load(pl, c(0))
    moved = builder.fcmp_ordered(">", builder.fmul(builder.fsub(cmax, m_old), cv), fconst(float(lazy)))
    m_new = builder.select(moved, t_new, m_old)
    dead = builder.fcmp_ordered("==", m_new, ninf)
    # -- alpha = exp2((m_old - m_new) c): 1 where m stays (dead rows too), 0 from -inf --
    dm = builder.select(moved, builder.fmul(builder.fsub(m_old, m_new), cv), vec.zero)
    dm_low = builder.fcmp_ordered("<", dm, lo)
    alpha = builder.select(dm_low, vec.zero, _exp2_v(builder, builder.select(dm_low, lo, dm), w))
    # -- a dead row stays as it was, unless its scores hold a NaN (NaN inputs): poison it --
    dead_bits = builder.bitcast(dead, ir.IntType(w))
    before = builder.block
    with builder.if_then(builder.icmp_unsigned("!=", dead_bits, ir.Constant(ir.IntType(w), 0))):
        (has_nan,) = _loop(builder, vec, c(0), nk, 1, [ir.Constant(ir.VectorType(ir.IntType(1), w), None)],
                           lambda j, a: [builder.or_(a[0], builder.fcmp_unordered("uno", (x := vec.load(ps, row(j))), x))],
                           "nan")
        l_nan = builder.select(has_nan, nan, l_old)
        after = builder.block
    l_dead = builder.phi(vec.vty)
    l_dead.add_incoming(l_old, before)
    l_dead.add_incoming(l_nan, after)
    # a dead row subtracts +inf: its -inf scores give p = 0 with no extra test per score; a max that
    # overflowed to +inf subtracts NaN (the row is NaN, as inf - inf makes it in the reference)
    m_sub = builder.select(dead, inf, builder.select(builder.fcmp_ordered("==", m_new, inf), nan, m_new))

    def bf16(p):
        # round to nearest even (the CPU's conversion), as the low half of a 32-bit lane
        return builder.zext(builder.bitcast(builder.fptrunc(p, bv), hv), iv)

    def exp_pass(stats):
        # p = exp2((s - m_new) c) by pairs of key rows: bfloat16 pairs into ppk, column sums (and
        # sum p (s - m_new) c) in float32
        def one(j, tot, st):
            # the exponent (s - m_new) c: the difference exact near the max, 0 at the max itself (an
            # fma(s, c, -m c) leaves m c's rounding there, which overflows exp2 for huge scores)
            x = builder.fmul(builder.fsub(vec.load(ps, row(j)), m_sub), cv)
            below = builder.fcmp_ordered("<", x, lo)
            # exp2 of an x below -126 is garbage, but not selected; the entropy term needs it clamped
            xc = builder.select(below, lo, x) if stats else x
            p = builder.select(below, vec.zero, _exp2_v(builder, xc, w))
            return p, builder.fadd(tot, p), (builder.call(vec.fma, [p, xc, st]) if stats else st)

        def store_pair(pr, lo16, hi16):
            word = builder.or_(lo16, builder.shl(hi16, ir.Constant(iv, [16] * w)))
            vec.store(builder.bitcast(word, vec.vty), ppk, row(pr))

        def pairs(pr, vals, n):
            # n pairs from pair row pr (key rows 2 pr ..): their sums in vals[4 u .. 4 u + 3]
            out = []
            for u in range(n):
                pu = builder.add(pr, c(u))
                j0 = builder.mul(pu, c(2))
                p0, t0, s0 = one(j0, vals[4 * u], vals[4 * u + 1])
                p1, t1, s1 = one(builder.add(j0, c(1)), vals[4 * u + 2], vals[4 * u + 3])
                store_pair(pu, bf16(p0), bf16(p1))
                out += [t0, s0, t1, s1]
            return out + vals[4 * n:]

        def last(j, vals):
            # an odd last key row: its pair's high half is zero
            p0, t0, s0 = one(j, vals[0], vals[1])
            store_pair(builder.sdiv(j, c(2)), bf16(p0), ir.Constant(iv, None))
            return [t0, s0] + vals[2:]

        npairs = builder.sdiv(nk, c(2))
        np2 = builder.and_(npairs, c(-2))
        vals = _loop(builder, vec, c(0), np2, 2, [vec.zero] * 8, lambda pr, v: pairs(pr, v, 2), "exp2p")
        vals = _loop(builder, vec, np2, npairs, 1, vals, lambda pr, v: pairs(pr, v, 1), "exp1p")
        vals = _loop(builder, vec, builder.mul(npairs, c(2)), nk, 1, vals, last, "exp1r")
        tot = builder.fadd(builder.fadd(vals[0], vals[2]), builder.fadd(vals[4], vals[6]))
        st = builder.fadd(builder.fadd(vals[1], vals[3]), builder.fadd(vals[5], vals[7]))
        return tot, st

    _finish_step(builder, vec, exp_pass, want, dead, l_dead, l_old, m_new, alpha, dm, pl, pm, palpha, pe)
    # -- rescale the accumulator's columns (acc^T's rows times alpha), unless alpha is 1 throughout --
    changed = builder.bitcast(builder.fcmp_unordered("une", alpha, fconst(1.0)), ir.IntType(w))
    with builder.if_then(builder.icmp_unsigned("!=", changed, ir.Constant(ir.IntType(w), 0))):
        _loop(builder, vec, c(0), nacc, 1, [],
              lambda d, _: vec.store(builder.fmul(vec.load(pacc, row(d)), alpha), pacc, row(d)) or [], "rescale")


def _make_vsoftmax_pack(lazy):
    # _vsoftmax_pack with the reference max trailing the true one by at most `lazy` (0: eager)
    @intrinsic
    def _vsoftmax_pack(typingctx, ps, nk, ng, cs, pm, pt, pl, pe, palpha, ppk, pacc, nacc, want, like):
        return _vsoftmax_pack_typer(lazy, like)

    return _vsoftmax_pack


def _vsoftmax_pack_typer(lazy, like):
    """One online-softmax step of a transposed tile for ng groups of LANES query rows.

    ps: raw address of s^T[0, 0] (nk key rows, row stride BLOCK_M): raw q.k times ``cs`` (> 0; 1 when
    the caller applied the score terms) is the score. pm, pt, pl, pe, palpha: the rows' reference max
    and true running max (units of s; the reference within ``lazy`` score units below the true one),
    sum, entropy sum (``want``, score units) and (output) alpha. p^T = exp2((s^T - m_new) cs) goes to
    ppk as bfloat16 pairs
    of key rows (uint32 words, row stride BLOCK_M; an odd last row's pair has a zero high half);
    acc^T's first nacc rows (pacc, row stride BLOCK_M) are multiplied by alpha. s^T is only read.
    """
    if not (isinstance(like, types.Array) and like.dtype == types.float32):
        return None
    sig = types.void(types.intp, types.intp, types.intp, types.float32, *([types.intp] * 9), like)

    def codegen(context, builder, signature, args):
        builder = _Exact(builder)
        ps0, nk, ng, cs, pm0, pt0, pl0, pe0, palpha0, ppk0, pacc0, nacc, want, _ = args
        vec = _Vectors(context, builder, types.float32)
        cv = vec.splat(cs)

        def group(g, _):
            o = builder.mul(g, vec.const(4 * vec.width))  # the group's byte offset
            ps, pm, pt, pl, pe, palpha, ppk, pacc = (builder.add(x, o) for x in (ps0, pm0, pt0, pl0, pe0, palpha0, ppk0, pacc0))
            _step_pack(builder, vec, ps, nk, cv, pm, pt, pl, pe, palpha, ppk, pacc, nacc, want, lazy)
            return []

        _loop(builder, vec, vec.const(0), ng, 1, [], group, "groups")
        return context.get_dummy_value()

    return sig, codegen


_vsoftmax_pack = _make_vsoftmax_pack(LAZY)  # see _vsoftmax_pack_typer


@njit(fastmath=FASTMATH, cache=True)
def _fwd_task(t, inp, out, row_max, row_log, ent, top, counts, mask, opts):
    B, Hq, Lq, Dv = out.shape
    D = inp.head_dim
    nK = inp.k.shape[2] // BLOCK_N
    Dv16 = (Dv + 15) // 16 * 16
    tiles = mask.tiles
    b, h, hk, qb, r0, rows, tb, th_ = _query_task(t, out, inp.k, tiles)
    Lk = inp.kv_len
    groups = (rows + LANES - 1) // LANES  # vectors of query rows
    # -- Q_blk^T as pairs along the head dim (the B of s^T = K_blk Q^T), lanes past `rows` zero; a
    # negative scale's sign flipped into it (exact) --
    qt = _zeros_u16(inp.k.shape[3] // 2, BLOCK_M, 2)
    _bf.pack_pairs_t(inp.q[b, h, r0:r0 + rows], qt)
    if inp.negate:
        qw = qt.view(np.uint32)
        for p in range(qw.shape[0]):
            for i in range(rows):
                qw[p, i, 0] ^= np.uint32(0x80008000)
    st = _zeros_f32(BLOCK_N, BLOCK_M)  # s^T of the current tile (keys x queries)
    pk = _zeros_u16(PAIRS_N, BLOCK_M, 2)  # p^T, bfloat16 pairs of key rows
    acct = _zeros_f32(Dv16, BLOCK_M)  # acc^T
    m_i = np.full(BLOCK_M, -np.inf, np.float32)  # per query row: reference max, true max, sum, entropy sum
    t_i = np.full(BLOCK_M, -np.inf, np.float32)
    l_i = np.zeros(BLOCK_M, np.float32)
    e_i = np.zeros(BLOCK_M, np.float32)
    alpha_i = np.ones(BLOCK_M, np.float32)
    lo = np.zeros((0, 0), np.float32)  # no softcap rest: the bfloat16 forward keeps the rounded logit
    softcap = opts.softcap_u > 0.0
    terms = softcap or mask.alibi.size > 0 or mask.bias.size > 0
    want = 1 if opts.want_stats else 0
    # score units per unit of the tile: raw q.k times |scale| log2(e), or 1 where the score terms
    # need score units (every tile of the call alike: the running max keeps one unit)
    cs_tile = np.float32(1.0) if terms else inp.qk_abs
    n_tiles = 0
    _begin(inp.engine)
    for kb in range(nK):
        kind = tiles[tb, th_, qb, kb]
        if kind == EMPTY:
            continue
        n_tiles += 1
        c0 = kb * BLOCK_N
        ncols = min(BLOCK_N, Lk - c0)
        # -- s^T = K_blk Q^T on the tile unit (raw q.k, the scale's sign folded in) --
        _mm(inp.engine, inp.k[b, hk, c0:c0 + BLOCK_N], qt, st, ncols, D, rows)
        if terms:
            # -- score units first (unless a softcap takes q.k), then cpu_fwd's score terms of a
            # transposed tile (softcap, ALiBi, bias, element-wise mask) --
            if not softcap:
                for j in range(ncols):
                    for i in range(rows):
                        st[j, i] *= inp.qk_abs
            _score_terms_t(st, lo, rows, ncols, b, h, qb, kb, kind, mask, opts, True)
        elif kind == PARTIAL:
            # -- the element-wise mask alone (-inf: any units) --
            _score_terms_t(st, lo, rows, ncols, b, h, qb, kb, kind, mask, opts, True)
        # -- online softmax, LANES query rows at a time: m, alpha, l (and e), acc^T rescaled; p^T as
        # bfloat16 pairs --
        _vsoftmax_pack(_addr(st), ncols, groups, cs_tile, _addr(m_i), _addr(t_i), _addr(l_i), _addr(e_i), _addr(alpha_i),
                       _addr(pk), _addr(acct), Dv, want, st)
        for pr in range((ncols + 1) // 2, (ncols + 31) // 32 * 16):
            for i in range(BLOCK_M):  # pairs past the last key, to the product's 32: zero
                pk[pr, i, 0] = 0
                pk[pr, i, 1] = 0
        # -- acc^T += V_blk^T P^T on the tile unit --
        _pv_add(inp.engine, inp, b, hk, kb, pk, acct, Dv, ncols, rows)
    _end(inp.engine)
    acc = np.empty((BLOCK_M, Dv), np.float32)
    for i in range(rows):
        for d in range(Dv):
            acc[i, d] = acct[d, i]
    # -- the maxima in score units: M = fl(m c), its rest m c - M (float64) into the log half --
    lo_i = np.zeros(BLOCK_M, np.float64)
    c64 = np.float64(cs_tile)
    for i in range(rows):
        big = np.float32(m_i[i] * cs_tile)
        if math.isfinite(big):
            lo_i[i] = np.float64(m_i[i]) * c64 - np.float64(big)
        m_i[i] = big
        t_i[i] = np.float32(t_i[i] * cs_tile)
    _finish_rows(acc, m_i, l_i, e_i, lo_i, rows, b, h, r0, out, row_max, row_log, ent, opts)
    for i in range(rows):  # the true max (row_max holds the reference: its lse half)
        top[b, h, r0 + i] = row_max[b, h, r0 + i] if l_i[i] == 0.0 or l_i[i] != l_i[i] else t_i[i]
    counts[t] = n_tiles


@njit(cache=True, nogil=True)
def flash_fwd_amx(inp, out, row_max, row_log, ent, top, counts, mask, opts, taken):
    """``cpu_flash.flash_fwd`` for bfloat16 inputs with its products on AMX: one task per (batch, head,
    query block) over its non-empty key tiles; the same outputs (out (B, Hq, Lq, Dv) float32, or uint16 for
    bfloat16 bits rounded as torch rounds; the lse
    halves in score units, entropy in nats, counts[task] = tiles computed). ``inp``: :class:`AmxInputs`
    (:func:`prepare`); ``mask``/``opts``: cpu_flash's records for float32 (base-2 score units).
    ``taken``: empty (every task in order, in this thread) or a shared (1,) int64 counter, zeroed, from
    which every thread running this call takes its next task (tasks write disjoint rows)."""
    t = -1
    while True:
        t = _fetch_add(taken, I1) if taken.size > 0 else t + 1
        if t >= counts.shape[0]:
            break
        _fwd_task(t, inp, out, row_max, row_log, ent, top, counts, mask, opts)


# -- backward on AMX ------------------------------------------------------------------------------
# One task per (batch, head, query block), two sweeps over its non-empty key tiles (cpu_bwd's
# design, row-major tiles): five tile products, one exp2 per score, delta exact in float64. AMX has
# no transposed-A form, so dV and dK are accumulated transposed: dV^T += dO^T P and dK^T += Q^T dS,
# with dO^T and Q^T made once per task and P, dS packed as pairs of query rows
# (cpu_bf16.pack_pairs_rows); P and dS are rounded to bfloat16 for their products (as P is in the
# forward), every sum is float32.


class AmxGradInputs(NamedTuple):
    """The backward's operands (bfloat16 bits as uint16, zero-padded to whole tiles)."""

    q: np.ndarray  # (B, Hq, Lq16, D32): queries, row-major
    do: np.ndarray  # (B, Hq, Lq16, Dv32): the output's gradient, row-major
    kt: np.ndarray  # (B, Hkv, nK, D32 // 2, BLOCK_N, 2): K^T pairs per key block (S = Q K^T)
    vt: np.ndarray  # (B, Hkv, nK, Dv32 // 2, BLOCK_N, 2): V^T pairs per key block (dP = dO V^T)
    k: np.ndarray  # (B, Hkv, nK * PAIRS_N, D16, 2): K pairs along keys (dQ = dS K)
    head_dim: int
    v_dim: int
    kv_len: int
    engine: np.ndarray  # ENGINE_AMX or ENGINE_DOT


@njit(fastmath=FASTMATH, cache=True)
def _raw_probs(p, rows, ncols, b, h, r0, qb, kb, kind, mask, opts, row_max, row_log):
    # P = exp2((s c - M) - log l) in place from raw q.k (p[:rows, :ncols]) of a call without score terms,
    # as the forward took them: its exponent (s - m) c with M = fl(m c) and the rest m c - M in log l.
    # s c - M is rounded once (s c is exact in float64): a rounded S = fl(s c) first would put its
    # rounding (~|S| 2**-24) into the exponent, ~1e-3 at logits of 1e4. Then the element-wise mask
    # and -inf past ncols. Returns nc (ncols rounded up to a whole vector).
    c64 = np.float64(opts.qk_scale)
    for i in range(rows):
        big = np.float64(row_max[b, h, r0 + i])
        for j in range(ncols):
            p[i, j] = np.float32(np.float64(p[i, j]) * c64 - big)
    nc = _score_rest(p, rows, ncols, b, h, qb, kb, kind, mask, opts, False)
    for i in range(rows):
        if row_max[b, h, r0 + i] == -np.inf:  # no key: P = 0
            for j in range(nc):
                p[i, j] = opts.zero
        else:
            _vec_exp2_row(_addr(p) + i * p.strides[0], _addr(p) + i * p.strides[0], nc, opts.zero, row_log[b, h, r0 + i],
                          opts.exp_lo, np.intp(0), p)
    return nc


@njit(fastmath=FASTMATH, cache=True)
def _bf16_block(x, x16, rows, nc, k32):
    # x16[:rows, :k32] = bfloat16(x[:rows, :nc]), zero in columns nc..k32 (the product's padding)
    _bf.to_bf16_rows(x, x16, rows, nc)
    if nc < k32:
        for i in range(rows):
            for j in range(nc, k32):
                x16[i, j] = 0


@njit(fastmath=FASTMATH, cache=True)
def _bwd_task_amx(t, g, row_max, row_log, dkt, dvt, dq, delta_out, pbuf, dpbuf, kbs, pairs, ds_all, qt_blk, dot_blk, counts, mask,
                  opts):
    # One (batch, head, query block): its dQ, and its shares of dK^T, dV^T added to dkt, dvt
    # (B, Hkv, nK, D16|Dv16, BLOCK_N). pbuf/dpbuf (nK, BLOCK_M, BLOCK_N): the worker's P and dP
    # tiles, kept from the first sweep to the second; kbs (nK,): each kept tile's key block; ds_all
    # (BLOCK_M, nK * BLOCK_N): the kept tiles' bfloat16 dS side by side (dQ's A operand); qt_blk,
    # dot_blk (D16|Dv16, BLOCK_M): the worker's Q_blk^T and dO_blk^T (rows past D|Dv zero).
    B, Hq, Lq, D = dq.shape
    Lk, Dv = g.kv_len, g.v_dim
    nK = g.kt.shape[2]
    softcap = opts.softcap
    tiles = mask.tiles
    b, h, hk, qb, r0, rows, tb, th_ = _query_task(t, dq, g.kt, tiles)
    q_blk = g.q[b, h, r0:r0 + BLOCK_M]  # (>= rows16, D32)
    do_blk = g.do[b, h, r0:r0 + BLOCK_M]  # (>= rows16, Dv32)
    # -- Q_blk^T and dO_blk^T, zero past the rows (the A operands of the products reduced over queries) --
    for d in range(D):
        for i in range(rows):
            qt_blk[d, i] = g.q[b, h, r0 + i, d]
        for i in range(rows, BLOCK_M):
            qt_blk[d, i] = 0
    for d in range(Dv):
        for i in range(rows):
            dot_blk[d, i] = g.do[b, h, r0 + i, d]
        for i in range(rows, BLOCK_M):
            dot_blk[d, i] = 0
    # pair rows past the block's rows stay zero (the padding of the products reduced over queries)
    for pr in range((rows + 1) // 2, BLOCK_M // 2):
        for j in range(BLOCK_N):
            pairs[pr, j, 0] = 0
            pairs[pr, j, 1] = 0
    tanh_buf = np.empty((BLOCK_M, BLOCK_N) if softcap > 0.0 else (1, 1), np.float32)
    terms = softcap > 0.0 or mask.alibi.size > 0 or mask.bias.size > 0  # the forward scaled its tiles first
    dl = np.zeros(BLOCK_M, np.float64)  # delta = rowsum(P * dP), in float64
    dq_acc = _zeros_f32(BLOCK_M, g.k.shape[3])
    n = 0
    # -- sweep 1: S, P, dP and delta over the non-empty key tiles; dV^T += dO^T P --
    for kb in range(nK):
        kind = tiles[tb, th_, qb, kb]
        if kind == EMPTY:
            continue
        c0 = kb * BLOCK_N
        ncols = min(BLOCK_N, Lk - c0)
        p, dp = pbuf[n], dpbuf[n]
        kbs[n] = kb
        n += 1
        # -- S = Q_blk K^T, the forward's product and score terms; P = exp2((S - max) - log l), in place --
        _mm(g.engine, q_blk, g.kt[b, hk, kb], p, rows, D, ncols)
        if terms:
            nc = _score_terms(p, tanh_buf, rows, ncols, False, b, h, qb, kb, kind, mask, opts)
            _probs(p, p, rows, nc, row_max, row_log, b, h, r0, opts)
        else:
            nc = _raw_probs(p, rows, ncols, b, h, r0, qb, kb, kind, mask, opts, row_max, row_log)
        # -- dP = dO_blk V^T; delta += rowsum(P * dP) (products exact in float64) --
        _mm(g.engine, do_blk, g.vt[b, hk, kb], dp, rows, Dv, ncols)
        for i in range(rows):
            acc = dl[i]
            for j in range(nc):
                acc += np.float64(p[i, j]) * np.float64(dp[i, j])
            dl[i] = acc
        # -- dV^T += dO^T bf16(P) --
        _bf.pack_pairs_rows(p, pairs, rows, nc)
        _mm_add(g.engine, dot_blk, pairs, dvt[b, hk, kb], Dv, rows, ncols)
        if softcap > 0.0:
            # -- the softcap's c (1 - tanh^2) multiplies dS: folded into the kept P --
            for i in range(rows):
                for j in range(ncols):
                    p[i, j] *= softcap * (1.0 - tanh_buf[i, j] * tanh_buf[i, j])
    if delta_out.size > 0:  # (d sinks: rowsum(dO * O) from the unrounded P, not from the bfloat16 output)
        for i in range(rows):
            delta_out[b, h, r0 + i] = dl[i]
    # -- sweep 2: dS = P (dP - delta); dK^T += Q^T bf16(dS) per tile; dQ = bf16(dS) K, one product
    # over all the kept tiles when their key blocks are consecutive (causal, windows: dQ's tiles are
    # loaded and stored once, not once per key tile), else per tile --
    whole = n > 0 and kbs[n - 1] - kbs[0] == n - 1
    for u in range(n):
        kb = kbs[u]
        c0 = kb * BLOCK_N
        ncols = min(BLOCK_N, Lk - c0)
        nc = _padded(ncols)
        p, dp = pbuf[u], dpbuf[u]
        for i in range(rows):
            di = dl[i]
            for j in range(nc):
                dp[i, j] = p[i, j] * np.float32(np.float64(dp[i, j]) - di)  # the difference rounded once
        ds16 = ds_all[:, u * BLOCK_N:]
        _bf16_block(dp, ds16, rows, nc, (ncols + 31) // 32 * 32)
        if not whole:
            _mm_add(g.engine, ds16, g.k[b, hk, c0 // 2:c0 // 2 + PAIRS_N], dq_acc, rows, ncols, D)
        _bf.pack_pairs_rows(dp, pairs, rows, nc)
        _mm_add(g.engine, qt_blk, pairs, dkt[b, hk, kb], D, rows, ncols)
    if whole:
        k0, last = kbs[0] * BLOCK_N, kbs[n - 1] * BLOCK_N
        kdim = last - k0 + min(BLOCK_N, Lk - last)
        _mm_add(g.engine, ds_all, g.k[b, hk, k0 // 2:k0 // 2 + n * PAIRS_N], dq_acc, rows, kdim, D)
    dscale = opts.dscale
    for i in range(rows):
        for d in range(D):
            dq[b, h, r0 + i, d] = dq_acc[i, d] * dscale
    counts[t] = n


@njit(cache=True, nogil=True)
def flash_bwd_amx(g, row_max, row_log, dkt, dvt, dq, delta_out, counts, mask, opts, t0, step, per, taken):
    """The bfloat16 backward on AMX (:class:`AmxGradInputs` ``g``, the lse halves row_max, row_log
    (B, Hq, Lq)): tasks (batch, head, query block), ``counts`` one entry each, adding their dK^T and dV^T
    shares into dkt (B, Hkv, nK, D16, BLOCK_N) and dvt (.., Dv16, ..), zeroed, writing dq (B, Hq, Lq, D)
    float32 and, unless it is empty, delta_out (B, Hq, Lq) float64: each row's rowsum(P * dP). ``taken``
    empty: tasks t0, t0 + step, ... in order; else a shared (1,) int64 counter, zeroed: whole kv heads of
    ``per`` tasks, the next one no thread running this call has taken (one writer per dK/dV row).
    :func:`finish_kv_amx` turns the sums into dk and dv."""
    # The buffers are allocated here, in the thread that runs the tasks, and the tile state loaded once
    nK = g.kt.shape[2]
    # (every buffer a product reads or writes on 64-byte lines: _zeros_f32)
    pbuf = _zeros_f32(nK * BLOCK_M, BLOCK_N).reshape((nK, BLOCK_M, BLOCK_N))
    dpbuf = _zeros_f32(nK * BLOCK_M, BLOCK_N).reshape((nK, BLOCK_M, BLOCK_N))
    kbs = np.empty(nK, np.int64)
    pairs = _zeros_u16(BLOCK_M // 2, BLOCK_N, 2)  # P or dS as pairs of query rows
    ds_all = _zeros_u16(BLOCK_M, nK * BLOCK_N, 1).reshape((BLOCK_M, nK * BLOCK_N))  # dS of the kept tiles, bfloat16
    qt_blk = _zeros_u16(g.k.shape[3], BLOCK_M, 1).reshape((g.k.shape[3], BLOCK_M))  # Q_blk^T (D16 rows)
    dot_blk = _zeros_u16((g.v_dim + 15) // 16 * 16, BLOCK_M, 1).reshape(((g.v_dim + 15) // 16 * 16, BLOCK_M))  # dO_blk^T
    # denormals flushed in this thread's float32 work while the tasks run (restored after): dS of
    # probabilities near 2**-126 (the tile products flush them anyway)
    old = _mxcsr_ftz(np.intp(1))
    _begin(g.engine)
    T = counts.shape[0]
    shared = taken.size > 0
    t, t_end = (0, 0) if shared else (t0, T)
    while True:
        if shared and t == t_end:
            kh = _fetch_add(taken, I1)
            t, t_end = kh * per, min((kh + 1) * per, T)
        if t >= t_end:
            break
        _bwd_task_amx(t, g, row_max, row_log, dkt, dvt, dq, delta_out, pbuf, dpbuf, kbs, pairs, ds_all, qt_blk, dot_blk, counts,
                      mask, opts)
        t += 1 if shared else step
    _end(g.engine)
    _mxcsr_set(old)


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def finish_kv_amx(x0, x1, dkt_w, dvt_w, dk, dv, dscale):
    """Key blocks x0 .. x1 - 1 of the flattened (B, Hkv, nK): dk = dscale * (the sum over workers of
    dkt_w (W, B, Hkv, nK, D16, BLOCK_N))^T, dv likewise without the scale, in worker order."""
    B, Hkv, Lk, D = dk.shape
    Dv = dv.shape[3]
    nK = dkt_w.shape[3]
    W = dkt_w.shape[0]
    for x in range(x0, x1):
        kb = x % nK
        hk = (x // nK) % Hkv
        b = x // (nK * Hkv)
        c0 = kb * BLOCK_N
        for j in range(min(BLOCK_N, Lk - c0)):
            for d in range(D):
                acc = dkt_w[0, b, hk, kb, d, j]
                for w in range(1, W):
                    acc += dkt_w[w, b, hk, kb, d, j]
                dk[b, hk, c0 + j, d] = acc * dscale
            for d in range(Dv):
                acc = dvt_w[0, b, hk, kb, d, j]
                for w in range(1, W):
                    acc += dvt_w[w, b, hk, kb, d, j]
                dv[b, hk, c0 + j, d] = acc


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


@njit(cache=True, nogil=True)
def pack_bwd(k16, v16, kt, vt, kp, taken):
    """K^T and V^T panels and K pairs of every (batch, kv head, key block) into zeroed kt, vt, kp
    (AmxGradInputs); ``taken`` as :func:`flash_fwd_amx`'s."""
    t = -1
    while True:
        t = _fetch_add(taken, I1) if taken.size > 0 else t + 1
        if t >= vt.shape[0] * vt.shape[1] * vt.shape[2]:
            break
        _pack_bwd_task(t, k16, v16, kt, vt, kp)


def _pack_block(dst, v16, b, hk, c0, ncols):
    """One key block of V (rows c0 .. c0 + ncols of v16[b, hk]) into ``dst``: (Dv16, BLOCK_N) as V^T (AMX),
    or (PAIRS_N, Dv16, 2) as pairs of key rows (vdpbf16ps); zero past the block's keys and Dv."""


@overload(_pack_block)
def _pack_block_impl(dst, v16, b, hk, c0, ncols):
    if dst.ndim == 2:
        def transposed(dst, v16, b, hk, c0, ncols):
            Dv = v16.shape[3]
            for d0 in range(0, Dv, 16):  # 16 x BLOCK_N strips: the block's rows stay in L1
                for j in range(ncols):
                    for d in range(d0, min(d0 + 16, Dv)):
                        dst[d, j] = v16[b, hk, c0 + j, d]
            for d in range(Dv):
                for j in range(ncols, BLOCK_N):
                    dst[d, j] = 0
            for d in range(Dv, dst.shape[0]):
                for j in range(BLOCK_N):
                    dst[d, j] = 0
        return transposed

    def pairs(dst, v16, b, hk, c0, ncols):
        Dv = v16.shape[3]
        used = (ncols + 1) // 2
        _bf.pack_pairs(v16[b, hk, c0:c0 + ncols], dst[:used])  # columns < Dv; an odd last key's high half 0
        for pr in range(used):
            for d in range(Dv, dst.shape[1]):
                dst[pr, d, 0] = 0
                dst[pr, d, 1] = 0
        for pr in range(used, dst.shape[0]):
            for d in range(dst.shape[1]):
                dst[pr, d, 0] = 0
                dst[pr, d, 1] = 0
    return pairs


@njit(cache=True, nogil=True)
def pack_fwd(v16, vx, taken):
    """Every (batch, kv head, key block) of V, bfloat16 bits v16 (B, Hkv, Lk, Dv), into the forward's operand
    vx (AmxInputs): V^T (B, Hkv, nK, Dv16, BLOCK_N) for AMX, or V's key rows in pairs (B, Hkv, nK, PAIRS_N, Dv16,
    2) for vdpbf16ps (an interleave, no transposition); zero past Lk and Dv. ``taken`` as :func:`flash_fwd_amx`'s."""
    B, Hkv, Lk, Dv = v16.shape
    nK = vx.shape[2]
    t = -1
    while True:
        t = _fetch_add(taken, I1) if taken.size > 0 else t + 1
        if t >= B * Hkv * nK:
            break
        kb = t % nK
        hk = (t // nK) % Hkv
        b = t // (nK * Hkv)
        c0 = kb * BLOCK_N
        _pack_block(vx[b, hk, kb], v16, b, hk, c0, min(BLOCK_N, Lk - c0))


stamp_sources(globals(), _bf, _bwd_src, _flash_src, _fwd_src)  # the kernels compile these modules' numba functions into themselves
numba_config.CACHE_DIR = _NUMBA_CACHE_DIR

#: calls and tile products served by these kernels since import, in all and per engine (tests check the
#: path was taken)
AMX_CALLS = {"calls": 0, "tiles": 0, "backward": 0, "amx": 0, "dot": 0, "amx_backward": 0, "dot_backward": 0}


def _engine_name(eng) -> str:
    return "amx" if eng.dtype == np.int8 else "dot"


def _engine_or_refuse(eng):
    # the given engine, else this host's; a clear error where there is none
    eng = engine() if eng is None else eng
    if eng is None:
        raise RuntimeError(f"selfattn.kernels.cpu_amx: no bfloat16 product engine here ({describe()})")
    return eng


def _run_threads(kernel, args, threads):
    # kernel(*args, taken) on `threads` threads sharing the counter `taken` (one: every task in order here)
    from selfattn.backends import cpu as _cpu

    if threads <= 1:
        kernel(*args, NO_COUNTER)
        return
    call = args + (np.zeros(1, np.int64),)
    _cpu._on_threads([(_cpu._entry(kernel, call), call)] * threads)


def _zeros_np(shape, dtype):
    # a zeroed C-contiguous array whose first element is on a 64-byte line (torch allocates so)
    if dtype == np.uint16:
        return torch.zeros(shape, dtype=torch.int16).numpy().view(np.uint16)
    return torch.zeros(shape, dtype=torch.float32).numpy()


def _bits(t):
    # a bfloat16 tensor's bits as a uint16 numpy array (no copy when contiguous and on a 64-byte line:
    # the tile unit loads rows fastest from there, see _zeros_f32)
    t = t.contiguous()
    if t.data_ptr() % 64:
        t = t.clone()
    return t.view(torch.int16).numpy().view(np.uint16)


# -- spare V^T buffers ----------------------------------------------------------------------------
# A call's V^T (V's pairs on vdpbf16ps) is as large as V; a fresh buffer costs a page fault every 4 KB
# on first touch (~1000 for a (1, 16, 2048, 64) V: ~3 % of that dense forward on 2 threads, the faults
# serialised by the kernel's memory map lock). launch_forward takes one from here and gives it back
# after the kernel; a buffer larger than _SPARE_MAX bytes is not kept (concurrent calls each get their own).
_SPARE: list = []
_SPARE_LOCK = threading.Lock()
_SPARE_MAX = 64 << 20


def _reset_spare_lock():
    # a forked child has none of the parent's threads: a lock one of them held would never be released
    global _SPARE_LOCK
    _SPARE_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_spare_lock)


def _take_spare(n: int) -> np.ndarray:
    # a 1-D uint16 buffer of at least n elements, first element on a 64-byte line (torch allocates so)
    with _SPARE_LOCK:
        for i, buf in enumerate(_SPARE):
            if buf.size >= n:
                return _SPARE.pop(i)
    return torch.empty(n, dtype=torch.int16).numpy().view(np.uint16)


def _give_spare(buf: np.ndarray) -> None:
    if buf.nbytes <= _SPARE_MAX:
        with _SPARE_LOCK:
            _SPARE[:] = sorted(_SPARE + [buf], key=lambda b: b.size)[-2:]  # the two largest


def _v_elements(B, Hkv, Lk, Dv) -> int:
    # elements of the forward's V operand (V^T or V's key-row pairs: the same count), keys padded to whole
    # blocks and Dv to 16
    return B * Hkv * -(-Lk // BLOCK_N) * BLOCK_N * (-(-Dv // 16) * 16)


def prepare(q, k, v, opts, eng=None, threads: int = 1, spare=None) -> AmxInputs:
    """The :class:`AmxInputs` of bfloat16 q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) for a
    call with cpu_flash's ``opts``, its products on ``eng`` (default: :func:`engine`); V^T is made on
    ``threads`` threads, in ``spare`` (a 1-D uint16 buffer large enough) when given."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    F = torch.nn.functional
    d32, dv16 = -(-D // 32) * 32, -(-Dv // 16) * 16
    nK = -(-Lk // BLOCK_N)
    lk64 = nK * BLOCK_N
    kp = k.detach()  # (B, Hkv, nK * BLOCK_N, D32): a zero-padded copy only where the shape needs one
    if d32 != D or lk64 != Lk:
        kp = F.pad(kp, (0, d32 - D, 0, lk64 - Lk))
    eng = _engine_or_refuse(eng)
    amx = eng.dtype == ENGINE_AMX.dtype
    # AMX: V^T (B, Hkv, nK, Dv16, BLOCK_N); vdpbf16ps: V's key-row pairs (B, Hkv, nK, PAIRS_N, Dv16, 2), no
    # transposition (torch's transposing bfloat16 copy took ~5x as long as pack_fwd)
    shape = (B, Hkv, nK, dv16, BLOCK_N) if amx else (B, Hkv, nK, PAIRS_N, dv16, 2)
    n = _v_elements(B, Hkv, Lk, Dv)  # = math.prod(shape), either layout
    vx = (spare if spare is not None else torch.empty(n, dtype=torch.int16).numpy().view(np.uint16))[:n].reshape(shape)
    _run_threads(pack_fwd, (_bits(v.detach()), vx), threads)
    none = np.zeros((0,) * 6 if amx else (0,) * 5, np.uint16)
    negate = float(opts.qk_scale) < 0.0 and float(opts.softcap_u) <= 0.0
    return AmxInputs(q=_bits(q.detach()), k=_bits(kp), vt=vx if amx else none, vp=none if amx else vx, head_dim=D,
                     kv_len=Lk, qk_abs=np.float32(abs(float(opts.qk_scale))), negate=negate, engine=eng)


def launch_forward(q, k, v, sinks, call, eng=None):
    """``backends.cpu._launch_forward`` for bfloat16 q, k, v, products on ``eng`` (default :func:`engine`):
    (out, row_max, row_log, max_logit, entropy), the last four float32 as the float32 kernels give them;
    out bfloat16, or float32 with sinks (folded in after the kernel; the caller rounds it)."""
    from selfattn.backends import cpu as _cpu

    B, Hq, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    mask = _cpu._kernel_mask(call.low, torch.float32)
    opts = _cpu._opts(torch.float32, call)
    counts = np.zeros(B * Hq * (-(-Lq // BLOCK_M)), np.int64)  # one per task
    threads = _cpu._threads(len(counts), 4.0 * B * Hq * Lq * Lk * D)
    spare = _take_spare(_v_elements(B, k.shape[1], Lk, Dv))
    inp = prepare(q, k, v, opts, eng, threads, spare)
    # the output as bfloat16 bits straight from the kernel (_finish_rows rounds as torch's conversion
    # does); float32 where sinks are folded in after the kernel
    out = torch.empty(B, Hq, Lq, Dv, dtype=torch.float32 if sinks is not None else torch.bfloat16)
    out_np = out.numpy() if sinks is not None else out.view(torch.int16).numpy().view(np.uint16)
    # the lse halves (row_max: the kernel's reference max, within LAZY of the true one), entropy, true max
    row_max, row_log, ent, top = (torch.empty(B, Hq, Lq, dtype=torch.float32) for _ in range(4))
    args = (inp, out_np, row_max.numpy(), row_log.numpy(), ent.numpy(), top.numpy(), counts, mask, opts)
    _run_threads(flash_fwd_amx, args, threads)
    _give_spare(spare)
    tiles = int(counts.sum())
    _cpu.TILE_PRODUCTS["forward"] += tiles
    AMX_CALLS["calls"] += 1
    AMX_CALLS["tiles"] += tiles
    AMX_CALLS[_engine_name(inp.engine)] += 1
    max_logit = top * float(opts.nat)  # (B, Hq, Lq) nats, keys only
    if sinks is not None:
        out, row_max, row_log, ent = _cpu._fold_sinks(out, row_max, row_log, ent, sinks, opts)
    return out, row_max, row_log, max_logit, ent


def prepare_backward(q, k, v, do, threads: int = 1, eng=None) -> AmxGradInputs:
    """The :class:`AmxGradInputs` of bfloat16 q, k, v and the output's gradient do (products on ``eng``,
    default :func:`engine`)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    F = torch.nn.functional
    r16 = lambda n, m: -(-n // m) * m  # noqa: E731
    nK = -(-Lk // BLOCK_N)
    q, k, v, do = (t.detach() for t in (q, k, v, do))
    # (B, Hq, Lq16, D32), (B, Hq, Lq16, Dv32): zero-padded copies only where the shapes need them
    qp = q if D % 32 == 0 and Lq % 16 == 0 else F.pad(q, (0, r16(D, 32) - D, 0, r16(Lq, 16) - Lq))
    dop = do if Dv % 32 == 0 and Lq % 16 == 0 else F.pad(do, (0, r16(Dv, 32) - Dv, 0, r16(Lq, 16) - Lq))
    kt = _zeros_np((B, Hkv, nK, r16(D, 32) // 2, BLOCK_N, 2), np.uint16)
    vt = _zeros_np((B, Hkv, nK, r16(Dv, 32) // 2, BLOCK_N, 2), np.uint16)
    kp = _zeros_np((B, Hkv, nK * PAIRS_N, r16(D, 16), 2), np.uint16)
    _run_threads(pack_bwd, (_bits(k), _bits(v), kt, vt, kp), threads)
    return AmxGradInputs(q=_bits(qp), do=_bits(dop), kt=kt, vt=vt, k=kp,
                         head_dim=D, v_dim=Dv, kv_len=Lk, engine=_engine_or_refuse(eng))


_NO_DELTA = np.zeros((0, 0, 0), np.float64)


def launch_backward(grad_out, q, k, v, out, row_max, row_log, call, eng=None, delta_out=None):
    """``backends.cpu._launch_backward`` for bfloat16 q, k, v (and grad_out), products on ``eng``: (dq, dk,
    dv) in bfloat16, from the forward's lse halves (score units, float32); ``out`` is unused (delta is
    rowsum(P * dP), computed by the kernel). ``delta_out``: a (B, Hq, Lq) float64 numpy array to receive
    that delta of every row (d sinks needs it from the unrounded P), or None."""
    from selfattn.backends import cpu as _cpu

    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    mask = _cpu._kernel_mask(call.low, torch.float32)
    opts = _cpu._opts(torch.float32, call)
    counts = np.zeros(B * Hq * (-(-Lq // BLOCK_M)), np.int64)  # one per task
    threads = _cpu._threads(len(counts), 10.0 * B * Hq * Lq * Lk * D)
    g = prepare_backward(q, k, v, grad_out.to(torch.bfloat16), threads, eng)
    dq = torch.empty(B, Hq, Lq, D, dtype=torch.float32)
    dk = torch.empty(B, Hkv, Lk, D, dtype=torch.float32)
    dv = torch.empty(B, Hkv, Lk, Dv, dtype=torch.float32)
    # dK^T, dV^T accumulators: one copy when whole kv heads go to the threads, else one per thread
    W = 1 if threads <= 1 or (B * Hkv) % threads == 0 else threads
    nK = g.kt.shape[2]
    dkt = _zeros_np((W, B, Hkv, nK, g.k.shape[3], BLOCK_N), np.float32)
    dvt = _zeros_np((W, B, Hkv, nK, -(-Dv // 16) * 16, BLOCK_N), np.float32)
    args = (g, row_max.detach().contiguous().numpy(), row_log.detach().contiguous().numpy())
    rest = (dq.numpy(), _NO_DELTA if delta_out is None else delta_out, counts, mask, opts)
    per = (Hq // Hkv) * (-(-Lq // BLOCK_M))  # tasks per kv head
    if threads <= 1:
        flash_bwd_amx(*args, dkt[0], dvt[0], *rest, 0, 1, per, NO_COUNTER)
        finish_kv_amx(0, B * Hkv * nK, dkt, dvt, dk.numpy(), dv.numpy(), opts.dscale)
    else:
        if W == 1:  # whole kv heads from a shared counter: one writer per dK/dV row
            taken = np.zeros(1, np.int64)
            calls = [args + (dkt[0], dvt[0], *rest, 0, 1, per, taken)] * threads
        else:  # tasks w, w + W, ... into thread w's own copy
            calls = [args + (dkt[w], dvt[w], *rest, w, W, per, NO_COUNTER) for w in range(W)]
        entry = _cpu._entry(flash_bwd_amx, calls[0])
        _cpu._on_threads([(entry, call) for call in calls])
        X = B * Hkv * nK  # key blocks, summed over the copies in worker order
        sums = [(X * w // threads, X * (w + 1) // threads, dkt, dvt, dk.numpy(), dv.numpy(), opts.dscale) for w in range(threads)]
        entry = _cpu._entry(finish_kv_amx, sums[0])
        _cpu._on_threads([(entry, call) for call in sums])
    _cpu.TILE_PRODUCTS["backward_one_pass"] += int(counts.sum())
    AMX_CALLS["backward"] += 1
    AMX_CALLS[_engine_name(g.engine) + "_backward"] += 1
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
