"""The float32 forward kernel of the `cpu` backend in the transposed layout (issue 14).

The algorithm is ``cpu_flash``'s online softmax (read its docstring first); only the layout of a
tile differs. A query block (batch, head, BLOCK_M rows) packs its queries once as
Q^T (D x BLOCK_M, contiguous) and computes each key tile *transposed*::

    s^T    = k_blk @ Q^T                              (keys x queries: A = the keys as stored)

so that the lanes of a vector are 16 (AVX2: 8) query rows. Every per-row step of the online
softmax is then a vertical vector operation over those rows -- column max, the running max m,
alpha = exp2(m_old - m_new), p^T = exp2(s^T - m), the column sums into l, the entropy term --
with no horizontal reduction and no scalar per-row code (``_vsoftmax``, LLVM IR at the host's
vector width). In a plain tile (nothing added to the product, no mask, float32 scores) the column max
comes from the Q K^T calls themselves: their STORE epilogue has the tile's scores in registers and folds
them into a per-lane tile max, so the softmax step skips its pass over the tile for it (an ordered max in
which a NaN never wins, as the pass's: the same m, the same bits). In place (cycle counter, D = 64) the
softmax step went 1900 -> 1620 ticks of a ~17000-tick tile, the Q K^T calls +80; 1 thread, thread CPU,
3 processes x 9 rounds: 0.991, 0.983, 0.980 of the kernel's time (A/A 0.998-1.004), D = 128 0.986 and
0.967 (A/A 0.998, 0.994). The output product is computed transposed as well::

    acc^T  = alpha * acc^T + v_blk^T @ p^T            (Dv x queries; A = the values through strides)

so both products share one micro-kernel (``_make_mk_t``) whose B operand is the block's query vectors
(Q^T, then p^T, reused from L1 by every call) and whose A operand is read once per tile (6 keys of K, 6
columns of V a call); alpha is a vector of query lanes. Each element's sum runs over the keys in the
same order as before (the output is the old kernel's bit for bit). The Q K^T calls also walk this tile's
values and the next tile's keys into L2 (one prefetcht1 a step): at D = 128 the keys and values of one
head (2 MB at Lk = 2048) do not stay in the 2 MB L2 between query blocks. On a unit's last tile they
walk its output rows instead (written next), and its second block's calls the queries of the unit this
thread likely takes next (the counter's value): missed from DRAM in the unit's prologue and epilogue
otherwise (cycle counter: 12k and 15k ticks of ~1.1M a unit at D = 64 -> 7k and 8k).

The keys are read in their natural (B, Hkv, Lk, D) layout: no transposed copy of K, and no 8 KB
row stride between the rows a micro-kernel reads (L1 set conflicts at D = 128 in ``cpu_flash``).

A task takes two whole query blocks of one head (``PAIR``; the blocks left, ragged ones too, alone;
on several threads only where that leaves 4 units a thread): each key tile goes through both
blocks' steps while its keys and values are in cache, so a head's K and V stream from L3 once per
128 query rows, not 64. Each block's steps are a lone block's, in the same order: bit-identical
outputs. One thread it is neutral (the prefetch hides L3). Two quiet runs (lead, 2026-12-02 01:22 and
01:52), dense, wall time: the 2-thread kernel (1, 16, 2048, 2048, D), median-of-pairs against single
blocks, 0.99x and 0.92x at D = 128 (medians 62.4 and 70.2 % of the 2-thread peak against 61.6 and
68.1 %), 1.00x and 1.00x at D = 64 (57.6 and 62.2 %); two 1-thread processes pinned one per core,
(1, 8, 2048, 2048, D), the two median GFLOP/s summed: D = 128 117 -> 167 and 145 -> 148, D = 64
156 -> 162 and 149 -> 168 (the VM's noise is that large). Groups of 4 blocks measured no better
than pairs in the second run (2-thread D = 128 1.07x the single blocks, D = 64 1.01x).

Scores are bit-identical to ``cpu_flash``'s: the same FMA order over the head dim, the same factor
at the store (query blocks of fewer than 4 rows take cpu_flash's dot products, as all of its passes
do): the backward recomputes the same scores. Without a softcap, ALiBi or float bias that factor is
only the scale's sign: the tile holds q.k, the running max m is q.k's, and the exponents are
(s - m) * scale log2(e) (``cpu_flash._raw_units``: a scale applied at the store rounded every
exponent at ~1e3 by 6e-5, up to 10x STYLE rule 6's bound); row_max = m * scale log2(e) rounded, its
rest goes into row_log. The terms after the product (softcap,
ALiBi, float bias, element-wise mask) are ``cpu_flash._score_terms`` written for the transposed
tile; ALiBi is vector IR too (``_alibi_t``: one FMA a vector of query rows).

A block whose logits may be large (``cpu_flash._split_tiles``: max |q_i| max |k_j| scale log2(e) above
cpu_flash.SPLIT_ABOVE = 128 score units, no softcap; max |k_j| from the launcher, ``max_key_norm``: the
short-call path of backends/cpu leaves it 0, float32 tiles) takes its scores in float64 instead: y = q.k * scale
log2(e) + the terms, held as y - R rounded once, R a float64 reference per row that follows the row's max
(``cpu_flash._qk64_t``, ``_rebase``; the softmax then runs on them in score units, and R + m is the row's
max). A float32 q.k rounds by ulp(q.k) / 2, ~6e-5 of exponent at logits of ~1e3: the gradients of D 3, q
and k x30, missed STYLE rule 6 by 4.1x. cpu_bwd asks ``_split_tiles`` the same and recomputes y - row_max.

Where the time goes (one thread, dense (1, 2, 2048, 2048, D), CPU time; the whole kernel against its
products and softmax step each looped alone over as many tiles, with the real K and V, in the same
process as peak.py's FMA loop; best of 9-11): D = 64, the kernel at ~72 % of the 1-thread peak: Q K^T
~39 % of its time (those calls at ~93 % of the peak), P V ~41 % (~88 %), the vertical softmax ~12 %
(13 vector operations per 16 scores on the FMA ports: exp2 is rint, a degree-6 polynomial and
vscalefps), the rest (Q^T packing, the acc^T transpose, allocations, _finish_rows, operands evicted
between the phases) ~8 %. D = 128, ~80 %: Q K^T ~42 % (~97 %), P V ~47 % (~87 %), softmax ~6 %, rest
~5 %. A loaded re-run (2026-12-02 01:45, bench_cpu.py --profile, pairs of blocks): D = 64 at 73 %:
Q K^T 40 %, softmax 11 %, P V 48 % (those calls at ~77 %: the weaker product at D = 64), rest ~1 %;
D = 128 at 72 %. The micro-kernel with its operands on one line each runs at 96-100 %: what the products lose
is L1 traffic (the query vectors, the A rows, C in the epilogue). Before the prefetch, the D = 128
kernel with Lk = 512 (K and V of a head in L2) ran ~20 % faster per tile than with Lk = 2048. In place
(an Intel host, 2026-12-02: the cycle counter read around each phase of every tile, medians over the
4096 tiles of (1, 4, 2048, 2048, 64), which a preempted tile does not move): Q K^T at 84-95 % of the
peak, P V at 76-93 %, the softmax ~11 % of a tile, a unit's prologue (Q^T) and epilogue (the acc^T
transpose, _finish_rows) ~3 % (~4 % with scalar transposes; ``_transpose_t`` does them as LANES x LANES
vector transposes). After the aligned buffers and the column max from the product (below; same host,
14:40, in place, 4096 tiles of (1, 4, 2048, 2048, D)): D = 64 Q K^T 86-90 % of the peak (the first call of
a tile ~78 %, the rest ~90 %), P V 86-90 % (~80 / ~90 %), the softmax 1620-1680 ticks of a ~17000-tick tile
(9.6 %), unit prologue + epilogue ~1.9 %; D = 128 Q K^T 89 %, P V 88 %, softmax 5 %. One tile's call
sequence on L1-resident operands (a microbenchmark) runs at 95-98 % (Q K^T) and 93-95 % (P V) whatever
the operands' offsets modulo 4 KB or the key rows' stride: what the products lose in place is the first
call's operands from L2 and the host (the later calls read 88-95 % from run to run). On two threads the VM itself costs the second core 5-25 % (two 1-thread processes,
one per core, lead 23:04): the threads take units one at a time from a shared counter (``flash_fwd_t``'s
``taken``), so the slower core takes fewer (numba's OpenMP layer, which ran a prange kernel before,
split them into two fixed contiguous halves).

Every buffer the vector code reads whole vectors of (Q^T, s^T, acc^T, the row vectors, acc) starts on a
cache line (``_zeros64``): numba aligns arrays to 32 bytes, and where the heap hands out an address at 32
mod 64 every vector load and store of that buffer spans two lines. Whether it does depends on the process's
allocation history, so the unaligned kernel's speed varied from run to run: an earlier A/B of aligned
buffers read no change, but in three processes (Intel host, 2026-12-02 14:10, D = 64, 1 thread, thread
CPU, 9 interleaved rounds, A/A 1.002-1.003) the aligned kernel ran at 0.946, 0.913 and 0.978 of the
unaligned one's time (76-79 % of the 1-thread peak in all three, the unaligned 68-76 %); in place (cycle
counter) Q K^T 80 -> 89 %, P V 82 -> 88 % of the peak. D = 128: 0.991 (A/A 0.996).

Measured and not taken (1 thread, interleaved A/B against the kept kernel, loaded machine): two key
tiles per softmax step (a longer P V reduction: no faster at D = 64, slower at D = 128; old layout),
4-row calls throughout (as fast as 6-row ones), value panels at D = 128 (old layout: P V
alone 2.5 % faster), the transposed P V without the prefetch (1.01x: the prefetch is the gain), a
prefetcht0 of the next call's A rows as well (+2.6 % at D = 64, +1.7 % at D = 128), the Q K^T sum at D =
128 as two 64-deep halves continued exactly through C, so that Q^T's half and s^T stay in L1 (+3.8 %), a
prefetcht0 of C's lines at each call's start (D = 64: 1.00x), tasks of 4 query blocks (above: no better
than 2), P V calls compiled without their prefetch instruction (it walks a line of B that is in L1
already: D = 64 1.02x median-of-pairs, loaded). Intel host, 2026-12-02 (D = 64, median-of-pairs, A/A
0.99-1.00): prefetcht0 of the tile's values and the block's acc^T during the softmax (P V's in-place
time -7 %, the kernel 1.011x), STORE without the factor 1 (1.007x), the k loop unrolled (1.015x), 8
chains in the column max (0.993x against A/A 0.993x), the unit's buffers made once a call (no change),
the next unit's queries walked into L2 on the last tile (no change), Q^T, s^T and acc^T at chosen
offsets modulo 4 KB (0.994-1.011x), single blocks (D = 64 1.004x, D = 128 1.040x). Intel host,
2026-12-02 14:00-15:00 (in place, cycle counter, D = 64, variants interleaved in one process): every
micro-kernel step also asking for a line of A 8, 16 or 24 steps ahead toward L1 (+4 % tile time), the Q K^T
calls asking for their A rows' later lines (or the next call's rows) at the call's start (+0.5 %, +1.8 %),
the k loop in one copy per mode so that P V walks its acc^T and the next block's Q^T toward L1 (+2 %), the
softmax's exp pass asking for the tile's value lines toward L1 (no change), s^T at chosen offsets modulo 4
KB from K (+4 %), no L2 walk at D = 64 (K and V of a head stay in L2: tiles the same, unit prologue +
epilogue +80 %), the micro-kernel's row loop in IR instead of a call per 6 rows (microbenchmark: no change),
inputs in transparent huge pages (1.000x). Counted, not built: an exp2 from a 16-entry table (vpermps) and
a degree-3 polynomial takes as many FMA-port operations as the degree-6 one (the finer reduction, the
lookup and the product with the table entry cost the three FMAs it saves).

Served here: float32 (and bfloat16/float16 computed in float32) with at least 4 query rows;
float64 and decoding calls (fewer than 4 queries: dot products) stay on ``cpu_flash.flash_fwd``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from selfattn.kernels.cpu_flash import (
    ALL_FEATURES,
    BLOCK_M,
    _finish_rows,
    _fma_k_loop,
    _ir_loop,
    _per_vector_count,
    BLOCK_N,
    EMPTY,
    FASTMATH,
    PARTIAL,
    RESCALE,
    STORE,
    VEC_BYTES,
    _addr,
    _bx,
    _dot,
    _Exact,
    _EXP2_COEFFS,
    NV_MAX,
    _prefetch,
    _query_task,
    _qk_split,
    _qk64_t,
    _rebase,
    _anchor_rest,
    _split_tiles,
    lean_call,
    _may_split,
    _not_inlined,
    lean_variant,
    max_key_norm,
    _raw_units,
    _max_in_units,
    _softcap_tile,
    _softmax_lo_t,
    _Vectors,
    TILE_N,
)
from selfattn.kernels import cpu_flash as _flash_src, stamp_sources

LANES = VEC_BYTES // 4  # float32 query rows per vector: 16 (AVX-512) or 8 (AVX2)
# A ragged last block of < 4 query rows takes float64 dot-product scores kept as hi + lo (cpu_flash._qk_split);
# cpu_bwd's launcher reads this to recompute the same scores
SPLIT_SMALL = True
# Tasks of >= 4 query rows take float64 scores where cpu_flash._split_tiles says so (logits that may pass
# cpu_flash.SPLIT_ABOVE score units); cpu_bwd's launcher reads this to recompute them
SPLIT_TILES = True
PREFETCH = True  # the Q K^T calls walk the next tiles into L2
PAIR = True  # tasks of two whole query blocks, each key tile applied to both while it is in cache
UNROLL = 4  # independent accumulators in the column loops (max, sums)
#: calls and tile products served by this kernel since import (tests check the path was taken)
CALLS = {"calls": 0, "tiles": 0}


# -- exp2 of a vector, and the 4-row micro-kernel ---------------------------------------------------
# cpu_flash._exp2_ir's polynomial with cheaper range reduction: n = rint(x) (round to nearest even,
# one vrndscaleps/vroundps) instead of floor(x + 1/2) and f = x - n in [-1/2, 1/2] (exact); 2**n
# applied by vscalefps (AVX-512: one instruction) or from the exponent bits (AVX2). 9 vector
# operations instead of 13; within 1 ulp like the original (tests/test_cpu_fwd.py measures it).
# With AVX512DQ, f comes from one vreduceps and n = x - f (vrndscaleps is two uops on the FMA port):
# the same n and f, about one cycle less per vector of scores.


def _host_has_dq():
    # AVX512DQ (vreduceps). numba's cache keys each entry on the host CPU name and features, so a kernel
    # cached on a DQ host is not loaded on one without. SELFATTN_CPU_NO_DQ=1 takes the other branch (for
    # testing it on a DQ host; use a separate NUMBA_CACHE_DIR then: the cache does not key on this choice)
    import os

    import llvmlite.binding as ll

    if os.environ.get("SELFATTN_CPU_NO_DQ") == "1":
        return False
    return "+avx512dq" in ll.get_host_cpu_features().flatten().split(",")


_HAS_DQ = _host_has_dq()


def _exp2_v(builder, x, width):
    # 2**x of a <width x float> vector, -126 <= x <= 0 (the callers select 0 below -126)
    mod = builder.module
    fty = ir.VectorType(ir.FloatType(), width)
    name = f"v{width}f32"
    rint = cgutils.get_or_insert_function(mod, ir.FunctionType(fty, [fty]), f"llvm.rint.{name}")
    fma = cgutils.get_or_insert_function(mod, ir.FunctionType(fty, [fty] * 3), f"llvm.fma.{name}")
    const = lambda value: ir.Constant(fty, [value] * width)  # noqa: E731
    if width == 16 and _HAS_DQ:
        # -- f = x - rint(x) in one vreduceps (AVX512DQ; imm 8: round to nearest even, no precision
        # exception), n = x - f (exact): the same n and f as rint's two uops and a subtraction --
        i16, i32 = ir.IntType(16), ir.IntType(32)
        reduce = cgutils.get_or_insert_function(
            mod, ir.FunctionType(fty, [fty, i32, fty, i16, i32]), "llvm.x86.avx512.mask.reduce.ps.512")
        f = builder.call(reduce, [x, ir.Constant(i32, 8), ir.Constant(fty, None), ir.Constant(i16, -1), ir.Constant(i32, 4)])
        n = builder.fsub(x, f)
    else:
        n = builder.call(rint, [x])
        f = builder.fsub(x, n)
    y = const(_EXP2_COEFFS[6])
    for c in reversed(_EXP2_COEFFS[:6]):
        y = builder.call(fma, [y, f, const(c)])
    if width == 16:
        # -- y * 2**n in one vscalefps (current rounding mode, no mask) --
        i16, i32 = ir.IntType(16), ir.IntType(32)
        scalef = cgutils.get_or_insert_function(
            mod, ir.FunctionType(fty, [fty, fty, fty, i16, i32]), "llvm.x86.avx512.mask.scalef.ps.512")
        return builder.call(scalef, [y, n, ir.Constant(fty, None), ir.Constant(i16, -1), ir.Constant(i32, 4)])
    ity = ir.VectorType(ir.IntType(32), width)
    e = builder.shl(builder.add(builder.fptosi(n, ity), ir.Constant(ity, [127] * width)), ir.Constant(ity, [23] * width))
    return builder.fmul(y, builder.bitcast(e, fty))


@intrinsic
def _exp2_vec(typingctx, px, py, n, like):
    """py[:n] = 2**px[:n] through ``_exp2_v`` (whole vectors; n a multiple of LANES): the test's
    handle on the forward's exp2."""
    if not (isinstance(like, types.Array) and like.dtype == types.float32):
        return None
    sig = types.void(types.intp, types.intp, types.intp, like)

    def codegen(context, builder, signature, args):
        builder = _Exact(builder)
        px, py, n, _ = args
        vec = _Vectors(context, builder, types.float32)
        _loop(builder, vec, vec.const(0), n, vec.width, [],
              lambda j, _: vec.store(_exp2_v(builder, vec.load(px, j), vec.width), py, j) or [], "exp2v")
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def exp2_lanes(x, y):
    """y = 2**x (float32, x.size a multiple of LANES) as the forward's softmax computes it."""
    _exp2_vec(_addr(x), _addr(y), x.size, y)


# A Q K^T tile whose scaled score gets a term added (ALiBi, a float bias; float32, no softcap: cpu_flash._raw_units)
# is scaled at the STORE, by scale log2(e). One float32 factor fl32(scale log2 e) put its own rounding (up to
# 2**-24 relative) into every score of the tile alike, on top of the product's: test_semantics_review's Case
# 200267 (D 4, x3 logits, a float bias) came out 1.20x FlashAttention's rule, against 0.38x with the factor
# exact. Mode STORE_SPLIT applies the float64 factor as c_hi + c_lo (both float32; c_hi the factor rounded
# toward zero, so c_lo has its sign or is 0): fma(x, c_hi, x c_lo), one rounding of x (c_hi + c_lo) but for
# x c_lo's (~2**-24 of the result's ulp). Taken only where the factor is not a float32 (_qk_store); a plain
# tile's factor is the scale's sign and keeps STORE. cpu_bwd's product stores the same way (the same IR).
STORE_SPLIT = 3  # after cpu_flash's STORE, ADD, RESCALE


def _split_factor(builder, vec, scale):
    """(c_hi, c_lo) vectors of float32 with c_hi + c_lo = ``scale`` (float64 IR value) within ~2**-48 of it:
    c_hi = scale rounded toward zero, c_lo = the rest rounded (the same sign as c_hi, or 0)."""
    f64 = ir.DoubleType()
    hi = builder.fptrunc(scale, vec.fty)
    hi64 = builder.fpext(hi, f64)
    zero = ir.Constant(f64, 0.0)
    # rounded away from zero: one ulp back toward zero (the bits of a nonzero float32's magnitude minus 1)
    away = builder.select(builder.fcmp_ordered(">", scale, zero), builder.fcmp_ordered(">", hi64, scale),
                          builder.fcmp_ordered("<", hi64, scale))
    down = builder.bitcast(builder.sub(builder.bitcast(hi, vec.i32), ir.Constant(vec.i32, 1)), vec.fty)
    hi = builder.select(away, down, hi)
    lo = builder.fptrunc(builder.fsub(scale, builder.fpext(hi, f64)), vec.fty)
    return vec.splat(hi), vec.splat(lo)


def _mul_split(builder, vec, x, hi, lo):
    # x * (c_hi + c_lo) as fma(x, c_hi, x * c_lo): +-inf stays +-inf (c_hi, c_lo of one sign), NaN stays NaN
    return builder.call(vec.fma, [x, hi, builder.fmul(x, lo)])


@njit(cache=True, inline="always")
def _qk_store(store, cu64, qk_scale64, softcap_u, added):
    """(factor, mode) of a tile's Q K^T product from ``_raw_units``' (store, cu): STORE_SPLIT with the float64
    factor where the product is scaled by a factor that is not a float32 (ALiBi or a float bias added: cu 1,
    store fl32(scale log2 e)), else STORE with ``store``. cpu_fwd and cpu_bwd ask this the same."""
    if added and softcap_u <= 0.0 and cu64 == 1.0 and np.float64(np.float32(qk_scale64)) == store and store != qk_scale64:
        return qk_scale64, np.intp(STORE_SPLIT)
    return store, np.intp(STORE)


def _make_mk_t(MR):
    # a float32 micro-kernel of MR rows for this kernel's two products, both with the query block's
    # vectors as B: C[:MR, :nvec * LANES] (op)= A[:MR, :kdim] @ B[:kdim, :nvec * LANES] at raw addresses
    # (strides in elements, rows of B and C contiguous, whole vectors: Q^T and P^T are BLOCK_M wide).
    # mode STORE: C = scale * (A B); STORE_SPLIT: the same with the float64 scale applied as c_hi + c_lo
    # (_split_factor); RESCALE: C = alpha * C + A B, alpha a vector per column of C (the
    # query lanes' factors at raw address palpha). Each element's FMA order over kdim is cpu_flash's
    # micro-kernel's (the scores are its scores). Every step also prefetches the line at ppf + kk * spf
    # (bytes) into L2: the caller walks the next tiles through it. pmax != 0 (STORE): the raw address of a
    # running max per column (nvec vectors), raised by the stored values of the call's rows.
    @intrinsic
    def microkernel(typingctx, pa, sa0, sa1, pb, sb, pc, sc, nvec, kdim, scale, mode, palpha, pmax, ppf, spf, like):
        if not (isinstance(like, types.Array) and like.dtype == types.float32):
            return None
        sig = types.void(*([types.intp] * 9), types.float64, *([types.intp] * 5), like)

        def codegen(context, builder, signature, args):
            builder = _Exact(builder)
            pa, sa0, sa1, pb, sb, pc, sc, nvec, kdim, scale, mode, palpha, pmax, ppf, spf, _ = args
            vec = _Vectors(context, builder, types.float32)
            width, c = vec.width, vec.const
            scale_v = vec.splat(builder.fptrunc(scale, vec.fty))
            # rows of A: raw addresses of element (i, 0)
            arow = [builder.add(pa, builder.mul(builder.mul(c(i), sa0), vec.esize)) for i in range(MR)]
            astep = builder.mul(sa1, vec.esize)

            def product(nv):
                def load_b(kk):
                    brow = builder.mul(kk, sb)
                    return [vec.load(pb, builder.add(brow, c(v * width))) for v in range(nv)]

                def load_a(kk):
                    aoff = builder.mul(kk, astep)
                    return lambda i: builder.load(builder.inttoptr(builder.add(arow[i], aoff), vec.sptr))

                def step(kk):
                    # -- one line of the next tiles toward L2 (locality 2: prefetcht1) --
                    _prefetch(builder, builder.add(ppf, builder.mul(kk, spf)), 2)

                # (the k loop as written, not unrolled: cpu_flash._no_unroll)
                final = _fma_k_loop(builder, vec, MR, nv, kdim, load_b, load_a, f"mkt{nv}", step, unroll=False)
                # -- write C in the call's mode --
                with builder.if_else(builder.icmp_signed("==", mode, c(STORE))) as (store, rescale):
                    with store:
                        outs = [[builder.fmul(final[i][v], scale_v) for v in range(nv)] for i in range(MR)]
                        for i in range(MR):
                            for v in range(nv):
                                vec.store(outs[i][v], pc, builder.add(builder.mul(c(i), sc), c(v * width)))
                        with builder.if_then(builder.icmp_signed("!=", pmax, c(0))):
                            # -- the column max into the tile's running one (rows in order; a NaN never wins) --
                            for v in range(nv):
                                mx = vec.load(pmax, c(v * width))
                                for i in range(MR):
                                    mx = builder.select(builder.fcmp_ordered(">", outs[i][v], mx), outs[i][v], mx)
                                vec.store(mx, pmax, c(v * width))
                    with rescale:
                        with builder.if_else(builder.icmp_signed("==", mode, c(STORE_SPLIT))) as (split, rescale2):
                            with split:
                                # -- a tile with terms: the scale exact to ~2**-48 (_split_factor); no column max --
                                hi, lo = _split_factor(builder, vec, scale)
                                for i in range(MR):
                                    for v in range(nv):
                                        vec.store(_mul_split(builder, vec, final[i][v], hi, lo), pc,
                                                  builder.add(builder.mul(c(i), sc), c(v * width)))
                            with rescale2:
                                al = [vec.load(palpha, c(v * width)) for v in range(nv)]
                                for i in range(MR):
                                    for v in range(nv):
                                        off = builder.add(builder.mul(c(i), sc), c(v * width))
                                        vec.store(builder.call(vec.fma, [vec.load(pc, off), al[v], final[i][v]]), pc, off)

            # the product in copies for 1, 2 and NV_MAX vectors (cpu_flash._per_vector_count); 3 vectors: the NV_MAX copy
            # (B, C and the factors are BLOCK_M wide; Q^T's columns past the block's rows are zero)
            _per_vector_count(builder, vec, nvec, product, "mkt", counts=(1, 2, NV_MAX))
            return context.get_dummy_value()

        return sig, codegen

    return microkernel


_mkt6, _mkt4, _mkt2, _mkt1 = (_make_mk_t(r) for r in (6, 4, 2, 1))


@njit(cache=True)
def _gemm_t(pa, sa0, sa1, pb, sb, pc, sc, m, kdim, nvec, scale, mode, palpha, pmax, prefetch, like):
    # C[:m, :nvec * LANES] (op)= A[:m, :kdim] @ B[:kdim, :nvec * LANES] (_make_mk_t) in calls of 6 rows
    # (8 rows: two of 4; the 2-row kernel keeps too few FMAs in flight), TILE_N columns at a time.
    # prefetch = (p1, n1, p2, n2): two byte ranges the calls walk into L2, one line a step; pmax != 0 (STORE):
    # a running max per column of C (nvec vectors at that raw address), raised by every stored row
    _not_inlined(like)  # (cpu_flash: calls to one copy where it is linked in, not a copy at each call site)
    p1, n1, p2, n2 = prefetch
    isz = 4
    done = 0  # bytes of the ranges walked so far
    for j0 in range(0, nvec * LANES, TILE_N):
        nv = min(TILE_N, nvec * LANES - j0) // LANES
        i = 0
        while i < m:
            rest = m - i
            r = 6 if rest >= 6 and rest != 8 else (4 if rest >= 4 else (2 if rest >= 2 else 1))
            ppf, spf = pb, 0  # nothing left to walk: a line of B, in L1
            if done < n1:
                ppf, spf = p1 + done, 64
            elif done < n1 + n2:
                ppf, spf = p2 + (done - n1), 64
            done += kdim * 64
            args = (pa + i * sa0 * isz, sa0, sa1, pb + j0 * isz, sb, pc + (i * sc + j0) * isz, sc, nv, kdim, scale, mode,
                    palpha + j0 * isz, pmax + j0 * isz if pmax != 0 else pmax, ppf, spf, like)
            if r == 6:
                _mkt6(*args)
            elif r == 4:
                _mkt4(*args)
            elif r == 2:
                _mkt2(*args)
            else:
                _mkt1(*args)
            i += r


# int64 values, not literals, for constant arguments of _gemm_t: numba compiles a function once per pattern
# of literal arguments (the two products' calls made two copies of it)
I0, I1, IM, MODE_STORE, MODE_RESCALE = np.intp(0), np.intp(1), np.intp(BLOCK_M), np.intp(STORE), np.intp(RESCALE)


# -- the vertical online-softmax step --------------------------------------------------------------


def _loop(builder, vec, lo, hi, step, inits, body, name):
    # for j in range(lo, hi, step): vals = body(j, vals) as IR (cpu_flash._ir_loop at the host vectors' i64)
    return _ir_loop(builder, vec.i64, lo, hi, step, inits, body, name)


@intrinsic
def _vsoftmax(typingctx, ps, ss, nk, ng, pm, pl, pe, palpha, pcmax, want, cu, like):
    """One online-softmax step for ng groups of LANES query rows of a transposed tile, in place.

    ps: raw address of s^T[0, lane 0] (nk key rows, row stride ss elements); pm, pl, pe, palpha:
    raw addresses of the rows' running max, sum, entropy sum and (output) alpha. ``cu`` (> 0): score
    units per unit of s (``_raw_units``): s^T becomes p^T = exp2((s^T - m_new) * cu) (0 below -126
    and where a row has seen no allowed key), alpha = exp2((m_old - m_new) * cu): the difference is
    exact near the max, then rounded once more. NaN scores poison their row (l = NaN). ``want``: also
    update the entropy sum e (score units; else pe is not touched). ``pcmax`` != 0: the raw address of the
    tile's column max per lane, taken already (the Q K^T calls' epilogue); 0: the step takes it itself.
    """
    if not (isinstance(like, types.Array) and like.dtype == types.float32):
        return None
    sig = types.void(*([types.intp] * 10), types.float32, like)

    def codegen(context, builder, signature, args):
        builder = _Exact(builder)
        ps0, ss, nk, ng, pm0, pl0, pe0, palpha0, pcmax0, want, cu, _ = args
        vec = _Vectors(context, builder, types.float32)
        c, w = vec.const, vec.width
        cv = vec.splat(cu)

        def group(g, _):
            o = builder.mul(g, c(4 * w))  # the group's byte offset
            ps, pm, pl, pe, palpha = (builder.add(x, o) for x in (ps0, pm0, pl0, pe0, palpha0))
            pcmax = builder.select(builder.icmp_signed("!=", pcmax0, c(0)), builder.add(pcmax0, o), c(0))
            _step(builder, vec, ps, ss, nk, pm, pl, pe, palpha, want, cv, pcmax)
            return []

        _loop(builder, vec, c(0), ng, 1, [], group, "groups")
        return context.get_dummy_value()

    return sig, codegen


def _step(builder, vec, ps, ss, nk, pm, pl, pe, palpha, want, cv, pcmax=None):
    # _vsoftmax's step for one group of LANES query rows (IR); cv: cu in every lane
    c, w = vec.const, vec.width
    fconst = lambda x: ir.Constant(vec.vty, [x] * w)  # noqa: E731
    ninf, lo = fconst(float("-inf")), fconst(-126.0)
    nk4 = builder.and_(nk, c(-UNROLL))
    row = lambda j: builder.mul(j, ss)  # noqa: E731

    def vmax(a, x):
        # ordered: a NaN element never wins
        return builder.select(builder.fcmp_ordered(">", x, a), x, a)

    # -- column max over the tile's keys (UNROLL chains) --
    def max4(j, accs):
        return [vmax(accs[u], vec.load(ps, row(builder.add(j, c(u))))) for u in range(UNROLL)]

    def scan():
        accs = _loop(builder, vec, c(0), nk4, UNROLL, [ninf] * UNROLL, max4, "cmax4")
        accs = _loop(builder, vec, nk4, nk, 1, [accs[0]] + accs[1:],
                     lambda j, a: [vmax(a[0], vec.load(ps, row(j)))] + a[1:], "cmax1")
        return vmax(vmax(accs[0], accs[1]), vmax(accs[2], accs[3]))

    if pcmax is None:
        cmax = scan()
    else:
        # -- or the max the product's calls took (pcmax != 0) --
        with builder.if_else(builder.icmp_signed("!=", pcmax, c(0))) as (given, scanned):
            with given:
                cm_given = vec.load(pcmax, c(0))
                b_given = builder.block
            with scanned:
                cm_scan = scan()
                b_scan = builder.block
        cmax = builder.phi(vec.vty)
        cmax.add_incoming(cm_given, b_given)
        cmax.add_incoming(cm_scan, b_scan)
    # -- new running max (units of s); rows still without any allowed key are "dead" --
    m_old = vec.load(pm, c(0))
    l_old = vec.load(pl, c(0))
    m_new = vmax(m_old, cmax)
    dead = builder.fcmp_ordered("==", m_new, ninf)
    # -- alpha = exp2((m_old - m_new) * cu): 1 when the max stays (dead rows too), 0 from -inf --
    dm = builder.fmul(builder.fsub(m_old, m_new), cv)
    dm_low = builder.fcmp_ordered("<", dm, lo)
    alpha = builder.select(dm_low, vec.zero, _exp2_v(builder, builder.select(dm_low, lo, dm), w))
    alpha = builder.select(builder.fcmp_ordered("==", m_old, m_new), fconst(1.0), alpha)

    # -- a dead row stays as it was, unless its scores hold a NaN (NaN inputs): poison it (read before
    # the exp2 pass overwrites the scores) --
    dead_bits = builder.bitcast(dead, ir.IntType(w))
    nan = ir.Constant(vec.vty, [float("nan")] * w)
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

    # a dead row subtracts +inf: its -inf scores give p = 0 with no extra test per score (a NaN
    # gives NaN, and the row is NaN anyway)
    m_sub = builder.select(dead, fconst(float("inf")), m_new)

    def exp_pass(stats):
        # p = exp2(s - m_new) into the tile, its column sums (and sum p * (s - m_new))
        def one(j, tot, st):
            # the exponent (s - m) * cu: the difference exact near the max, one rounding after
            x = builder.fmul(builder.fsub(vec.load(ps, row(j)), m_sub), cv)
            below = builder.fcmp_ordered("<", x, lo)
            # exp2 of an x below -126 is garbage, but not selected; the entropy term needs it clamped
            xc = builder.select(below, lo, x) if stats else x
            p = builder.select(below, vec.zero, _exp2_v(builder, xc, w))
            vec.store(p, ps, row(j))
            return builder.fadd(tot, p), (builder.call(vec.fma, [p, xc, st]) if stats else st)

        def four(j, vals):
            out = []
            for u in range(UNROLL):
                out += one(builder.add(j, c(u)), vals[2 * u], vals[2 * u + 1])
            return out

        vals = _loop(builder, vec, c(0), nk4, UNROLL, [vec.zero] * (2 * UNROLL), four, "exp4")
        vals = _loop(builder, vec, nk4, nk, 1, vals, lambda j, v: list(one(j, v[0], v[1])) + v[2:], "exp1")
        tot = builder.fadd(builder.fadd(vals[0], vals[2]), builder.fadd(vals[4], vals[6]))
        st = builder.fadd(builder.fadd(vals[1], vals[3]), builder.fadd(vals[5], vals[7]))
        return tot, st

    _finish_step(builder, vec, exp_pass, want, dead, l_dead, l_old, m_new, alpha, dm, pl, pm, palpha, pe)


def _finish_step(builder, vec, exp_pass, want, dead, l_dead, l_old, m_new, alpha, dm, pl, pm, palpha, pe):
    # the end of a vertical softmax step (IR), shared with cpu_amx: exp_pass(stats) -> (sum p, sum p x)
    # with the entropy term where ``want`` asks for it, then l, m, alpha (and e) stored
    c = vec.const
    with builder.if_else(builder.icmp_signed("!=", want, c(0))) as (then, otherwise):
        with then:
            tot_s, st_s = exp_pass(True)
            blk_s = builder.block
        with otherwise:
            tot_n, _ = exp_pass(False)
            blk_n = builder.block
    tot = builder.phi(vec.vty)
    tot.add_incoming(tot_s, blk_s)
    tot.add_incoming(tot_n, blk_n)
    st = builder.phi(vec.vty)
    st.add_incoming(st_s, blk_s)
    st.add_incoming(vec.zero, blk_n)
    # -- rescale the running sums: l = alpha * l + sum p --
    l_new = builder.select(dead, l_dead, builder.call(vec.fma, [alpha, l_old, tot]))
    vec.store(l_new, pl, c(0))
    vec.store(m_new, pm, c(0))
    vec.store(alpha, palpha, c(0))
    with builder.if_then(builder.icmp_signed("!=", want, c(0))):
        # -- entropy sum: e = alpha * (e + (m_old - m_new) * l_old) + sum p (s - m_new) --
        e_old = vec.load(pe, c(0))
        e_new = builder.call(vec.fma, [alpha, builder.call(vec.fma, [dm, l_old, e_old]), st])
        e_new = builder.select(builder.fcmp_ordered(">", l_old, vec.zero), e_new, st)
        vec.store(builder.select(dead, e_old, e_new), pe, c(0))


@intrinsic
def _alibi_t(typingctx, ps, ss, nk, pqpos, nq, pkv, slope, like):
    """s^T[j, :] -= slope * |q_pos - kv_pos[j]| for the nk key rows of LANES query lanes at raw address
    ps (row stride ss elements); q_pos: nq (<= LANES) floats at pqpos, the lanes past nq get 0;
    kv_pos: nk floats at pkv. One FMA a vector, as cpu_flash's contracted loop rounds it."""
    if not (isinstance(like, types.Array) and like.dtype == types.float32):
        return None
    sig = types.void(*([types.intp] * 6), types.float32, like)

    def codegen(context, builder, signature, args):
        builder = _Exact(builder)
        ps, ss, nk, pqpos, nq, pkv, slope, _ = args
        vec = _Vectors(context, builder, types.float32)
        fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec.vty, [vec.vty]),
                                              f"llvm.fabs.v{vec.width}f32")
        qp = vec.load(pqpos, vec.const(0), vec.lanes_below(nq))
        neg = vec.splat(builder.fsub(ir.Constant(vec.fty, 0.0), slope))

        def body(j, _):
            kp = vec.splat(builder.load(vec.at(pkv, j, vec.sptr)))
            off = builder.mul(j, ss)
            d = builder.call(fabs, [builder.fsub(qp, kp)])
            vec.store(builder.call(vec.fma, [neg, d, vec.load(ps, off)]), ps, off)
            return []

        _loop(builder, vec, vec.const(0), nk, 1, [], body, "alibi")
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _alibi_tile(st, rows, ncols, b, h, r0, c0, slopes, q_pos_f, kv_pos_f):
    # s^T[:ncols, :rows] -= slope_h * |q_pos - kv_pos|, LANES query rows a vector
    slope = slopes[_bx(slopes.shape[0], b), h]
    pq = _addr(q_pos_f) + (_bx(q_pos_f.shape[0], b) * q_pos_f.shape[1] + r0) * 4
    pkv = _addr(kv_pos_f) + (_bx(kv_pos_f.shape[0], b) * kv_pos_f.shape[1] + c0) * 4
    for g in range((rows + LANES - 1) // LANES):
        _alibi_t(_addr(st) + g * LANES * 4, st.shape[1], ncols, pq + g * LANES * 4, rows - g * LANES, pkv, slope, st)


# -- the score terms of a transposed tile (cpu_flash._score_terms, _mask_tile with s^T[key, query]) --


@intrinsic
def _allow_t(typingctx, pa, sq, real, ngroups, pst, ss, like):
    """A dense boolean mask on a whole key tile of s^T (BLOCK_N keys at raw address pst, row stride ss
    elements, query lanes contiguous), in place: s^T[j, i] = -inf where the mask byte at pa + i * sq + j
    is 0, for the query rows i < real of ngroups vectors (keys contiguous in the mask). Each query's
    BLOCK_N bytes become one 64-bit word of key bits (a vector compare); each key row of s^T then
    tests its bit in a vector of query words (a vector select)."""
    if not (isinstance(like, types.Array) and like.dtype in (types.float32, types.float64)):
        return None
    sig = types.void(*([types.intp] * 6), like)

    def codegen(context, builder, signature, args):
        builder = _Exact(builder)
        pa, sq, real, ngroups, pst, ss, _ = args
        vec = _Vectors(context, builder, signature.args[-1].dtype)
        c, w, i64 = vec.const, vec.width, vec.i64
        byv = ir.VectorType(ir.IntType(8), BLOCK_N)
        words = cgutils.alloca_once(builder, i64, size=BLOCK_M)  # per query row: its keys' bits

        def row(i, _):
            p = builder.inttoptr(builder.add(pa, builder.mul(i, sq)), ir.PointerType(byv))
            bits = builder.icmp_unsigned("!=", builder.load(p, align=1), ir.Constant(byv, None))
            builder.store(builder.bitcast(bits, i64), builder.gep(words, [i]))
            return []

        def pad(i, _):
            # the rows past `real` (padding, or past the block's rows): every key kept (nothing changes)
            builder.store(c(-1), builder.gep(words, [i]))
            return []

        _loop(builder, vec, c(0), real, 1, [], row, "allow.rows")
        _loop(builder, vec, real, builder.mul(ngroups, c(w)), 1, [], pad, "allow.pad")
        wty = ir.VectorType(i64, w)
        ninf = ir.Constant(vec.vty, [float("-inf")] * w)

        def group(g, _):
            qw = builder.load(builder.bitcast(builder.gep(words, [builder.mul(g, c(w))]), ir.PointerType(wty)), align=8)
            ps = builder.add(pst, builder.mul(builder.mul(g, c(w)), vec.esize))

            def key(j, vals):
                (bit,) = vals  # 1 << j in every lane
                keep = builder.icmp_unsigned("!=", builder.and_(qw, bit), ir.Constant(wty, None))
                off = builder.mul(j, ss)
                vec.store(builder.select(keep, vec.load(ps, off), ninf), ps, off)
                return [builder.shl(bit, ir.Constant(wty, [1] * w))]

            _loop(builder, vec, c(0), c(BLOCK_N), 1, [ir.Constant(wty, [1] * w)], key, "allow.keys")
            return []

        _loop(builder, vec, c(0), ngroups, 1, [], group, "allow.groups")
        return context.get_dummy_value()

    return sig, codegen


@njit(fastmath=FASTMATH, cache=True)
def _mask_tile_t(st, rows, ncols, b, h, qb, kb, mask):
    """-inf into s^T[:ncols, :rows] wherever the element-wise tests rule a pair out (PARTIAL tiles):
    ``cpu_flash._mask_tile`` with the loops turned round (query rows innermost, contiguous)."""
    r0, c0 = qb * BLOCK_M, kb * BLOCK_N
    qpos = mask.q_pos[_bx(mask.q_pos.shape[0], b)]
    kvpos = mask.kv_pos[_bx(mask.kv_pos.shape[0], b)]
    kv_len = mask.kv_lens[_bx(mask.kv_lens.shape[0], b)] if mask.kv_lens.size > 0 else c0 + ncols
    q_len = mask.q_lens[_bx(mask.q_lens.shape[0], b)] if mask.q_lens.size > 0 else r0 + rows
    real = min(rows, max(q_len - r0, 0))  # query rows i < real are not padding
    fn = -1
    if ALL_FEATURES and mask.fn_index.size > 0:
        fn = mask.fn_index[_bx(mask.fn_index.shape[0], b), _bx(mask.fn_index.shape[1], h), qb, kb]
    has_keep = mask.kv_keep.size > 0
    kb_ = _bx(mask.kv_keep.shape[0], b)
    left, right = mask.win_left, mask.win_right
    for j in range(ncols):
        gj = c0 + j
        # -- padded query rows see nothing; padding keys (j >= kv_len, key_padding) are seen by none --
        for i in range(real, rows):
            st[j, i] = -np.inf
        if gj >= kv_len or (ALL_FEATURES and has_keep and mask.kv_keep[kb_, gj] == 0):
            for i in range(real):
                st[j, i] = -np.inf
            continue
        if mask.banded:
            # -- band: kv_pos in [q_pos - left, q_pos + right] --
            kp = kvpos[gj]
            for i in range(real):
                qp = qpos[r0 + i]
                st[j, i] = st[j, i] if (kp >= qp - left) & (kp <= qp + right) else -np.inf
        if ALL_FEATURES:
            for d in range(mask.q_ids.shape[0]):
                # -- documents: equal ids attend --
                bd = _bx(mask.q_ids.shape[1], b)
                kid = mask.kv_ids[d, bd, gj]
                for i in range(real):
                    st[j, i] = st[j, i] if mask.q_ids[d, bd, r0 + i] == kid else -np.inf
        if ALL_FEATURES and fn >= 0:
            # -- a mask function's bits, stored for its partial tiles only --
            for i in range(real):
                st[j, i] = st[j, i] if mask.fn_bits[fn, i, j] != 0 else -np.inf
    if ALL_FEATURES and mask.allow.size > 0:
        # -- a dense boolean mask, stored query-major: each query's run of keys read contiguously, then
        # applied with the query rows innermost (a vector select). Reading it straight into s^T's order
        # strode a whole mask row per element (~6 ns each); through a key-major tile of bytes it still
        # cost ~14 us a 64 x 64 tile (dense D 64: 0.6x the unmasked kernel), in words of bits ~1 us
        sa = mask.allow_strides
        base = b * sa[0] + h * sa[1] + r0 * sa[2] + c0 * sa[3]
        width = VEC_BYTES // st.itemsize  # query lanes of a vector
        ngroups = (rows + width - 1) // width
        if sa[3] == 1 and ncols == BLOCK_N and st.strides[1] == st.itemsize and st.shape[1] >= ngroups * width:
            # -- keys contiguous, a whole key tile: 64 keys a query in one word of bits (_allow_t) --
            _allow_t(_addr(mask.allow) + base, sa[2], real, ngroups, _addr(st), st.strides[0] // st.itemsize, st)
            return
        keep = np.empty((BLOCK_N, BLOCK_M), np.uint8)
        for i in range(real):
            row = base + i * sa[2]
            for j in range(ncols):
                keep[j, i] = mask.allow[row + j * sa[3]] != 0
        for j in range(ncols):
            for i in range(real):
                st[j, i] = st[j, i] if keep[j, i] != 0 else -np.inf


@njit(fastmath=FASTMATH, cache=True)
def _score_terms_t(st, lo, rows, ncols, b, h, qb, kb, kind, mask, opts, alibi):
    # s^T[:ncols, :rows] holds q.k times the scale, or (softcap) q.k alone: the softcap, ALiBi (unless
    # `alibi` is False: the caller added it), the float bias and the element-wise mask, in
    # cpu_flash._score_terms' order
    r0, c0 = qb * BLOCK_M, kb * BLOCK_N
    if opts.softcap_u > 0.0:
        # -- softcap: c * tanh(u) in float64, rounded once; its rest into lo (unless empty) --
        _softcap_tile(st, lo, lo[:0, :0], ncols, rows, opts)
    if alibi and mask.alibi.size > 0:
        # -- ALiBi: - slope * |q_pos - kv_pos|, slope in score units --
        _alibi_tile(st, rows, ncols, b, h, r0, c0, mask.alibi, mask.q_pos_f, mask.kv_pos_f)
    _bias_mask_t(st, rows, ncols, b, h, qb, kb, kind, mask)


@njit(fastmath=FASTMATH, cache=True)
def _bias_mask_t(st, rows, ncols, b, h, qb, kb, kind, mask):
    # the last two score terms on s^T[:ncols, :rows] (cpu_bwd's tiles too): the float bias, then
    # the element-wise mask of a partial tile
    r0, c0 = qb * BLOCK_M, kb * BLOCK_N
    if mask.bias.size > 0:
        # -- float mask: add its bias (already in score units) --
        sb = mask.bias_strides
        bb = b * sb[0] + h * sb[1] + r0 * sb[2]
        for j in range(ncols):
            base = bb + (c0 + j) * sb[3]
            for i in range(rows):
                bv = mask.bias[base + i * sb[2]]
                st[j, i] = -np.inf if bv == -np.inf else st[j, i] + bv
    if kind == PARTIAL:
        # -- element-wise mask: only partial tiles pay for it --
        _mask_tile_t(st, rows, ncols, b, h, qb, kb, mask)


@njit(fastmath=FASTMATH, cache=True)
def _qk_dot_t(q, b, h, r0, rows, pk, ncols, st, scale):
    # s^T[:ncols, :rows] = k_blk @ q[b, h, r0:r0 + rows]^T as cpu_flash._qk_dot's dot products (keys at
    # raw address pk), times `scale` (the gemm's store factor: _raw_units)
    D = q.shape[3]
    isz = q.itemsize
    pq = _addr(q) + ((b * q.shape[1] + h) * q.shape[2] + r0) * D * isz
    for j in range(ncols):
        for i in range(rows):
            st[j, i] = _dot(pq + i * D * isz, pk + j * D * isz, D, st)
    if scale != 1.0:
        for j in range(ncols):
            for i in range(rows):
                st[j, i] *= scale


@intrinsic
def _transpose_t(typingctx, psrc, ssrc, pdst, sdst, nr, nc, like):
    """dst[j, i] = src[i, j] for i < nr, j < nc, both multiples of LANES (raw addresses, row strides in elements):
    LANES x LANES blocks, each one's rows loaded whole and transposed in log2(LANES) rounds of interleaves (vpermt2ps)."""
    if not (isinstance(like, types.Array) and like.dtype == types.float32):
        return None
    sig = types.void(*([types.intp] * 6), like)

    def codegen(context, builder, signature, args):
        builder = _Exact(builder)
        ps, ss, pd, sd, nr, nc, _ = args
        vec = _Vectors(context, builder, types.float32)
        c, w = vec.const, vec.width
        half = w // 2
        ity = ir.VectorType(ir.IntType(32), w)
        # interleave of a and b: lanes 0 .. half - 1 (lo) or half .. w - 1 (hi) of each, alternately
        lo = ir.Constant(ity, [k // 2 + (w if k % 2 else 0) for k in range(w)])
        hi = ir.Constant(ity, [half + k // 2 + (w if k % 2 else 0) for k in range(w)])

        def block(i0, _):
            def col(j0, _):
                rows = [vec.load(ps, builder.add(builder.mul(builder.add(i0, c(r)), ss), j0)) for r in range(w)]
                for _ in range(w.bit_length() - 1):
                    rows = [builder.shuffle_vector(rows[j // 2], rows[j // 2 + half], hi if j % 2 else lo) for j in range(w)]
                for r in range(w):
                    vec.store(rows[r], pd, builder.add(builder.mul(builder.add(j0, c(r)), sd), i0))
                return []

            _loop(builder, vec, c(0), nc, w, [], col, "tcol")
            return []

        _loop(builder, vec, c(0), nr, w, [], block, "trow")
        return context.get_dummy_value()

    return sig, codegen


# -- the kernel ------------------------------------------------------------------------------------
# Several threads run one call each, sharing a counter from which each takes its next work unit
# (backends.cpu._on_threads): a core slowed by another process takes fewer.


@intrinsic
def _fetch_add(typingctx, counter, by):
    # counter[0] += by as one atomic step (any thread); returns the value before
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64 and by == types.int64):
        return None
    sig = types.int64(counter, types.int64)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, args[1], "seq_cst")

    return sig, codegen


#: the counter argument of a call that runs every unit in order in its own thread
NO_COUNTER = np.zeros(0, np.int64)


@njit(cache=True, nogil=True)
def _zeros64(n, dtype):
    # n zeros of `dtype` from a 64-byte aligned address. numba aligns an array to 32 bytes only: a buffer at 32
    # mod 64 splits every whole-vector load and store of it over two cache lines (the kernel ran 5-9 % slower
    # at D = 64 whenever the heap handed out such addresses for Q^T, s^T and acc^T)
    raw = np.zeros(n + 16, dtype)
    isz = raw.itemsize
    skip = (-(_addr(raw) // isz)) % (64 // isz)
    return raw[skip:skip + n]


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def flash_fwd_t(q, k, v, out, row_max, row_log, ent, counts, mask, opts, u0, u1, pair, taken):
    """``cpu_flash.flash_fwd`` in the transposed layout (float32, base 2), work units u0 .. u1 - 1 of one
    or two whole query blocks of one (batch, head) each (:func:`_units`; ``pair``: blocks two at a time),
    the same outputs; needs no transposed copy of the keys. ``taken``: empty (every unit, in order, in
    this thread) or a shared (1,) int64 counter, zeroed, from which every thread running this call takes
    its next unit (``backends.cpu._on_threads``; units write disjoint rows: the same bits on any thread)."""
    # One function, not a wrapper around a task function: numba links each called function's LLVM IR
    # into its caller and optimizes and emits all of it again (~5 s of a first call per level). A unit of
    # G = 2 blocks applies each key tile to both while its keys and values are in cache; each block's own
    # steps are exactly a lone task's (same sums in the same order)
    nQ, npair, per = _units(q.shape[2], pair)
    u = u0 - 1
    while True:
        u = u0 + _fetch_add(taken, I1) if taken.size > 0 else u + 1
        if u >= u1:
            break
        t, G = _unit(u, nQ, npair, per)
        B, Hq, Lq, D = q.shape
        Lk, Dv = k.shape[2], v.shape[3]
        nK = (Lk + BLOCK_N - 1) // BLOCK_N
        tiles = mask.tiles
        b, h, hk, qb0, r00, rows, tb, th_ = _query_task(t, q, k, tiles)
        isz = q.itemsize
        groups = (rows + LANES - 1) // LANES  # vectors of query rows (G = 2: both blocks whole)
        # -- Q^T of each block, packed once (columns past `rows` zero: their scores stay finite) --
        qt = _zeros64(G * D * BLOCK_M, q.dtype).reshape((G, D, BLOCK_M))
        for g in range(G):
            if rows % LANES == 0 and D % LANES == 0:
                _transpose_t(_addr(q) + ((b * Hq + h) * Lq + r00 + g * BLOCK_M) * D * isz, D, _addr(qt) + g * D * BLOCK_M * isz,
                             BLOCK_M, rows, D, qt)
            else:
                for i in range(rows):
                    for d in range(D):
                        qt[g, d, i] = q[b, h, r00 + g * BLOCK_M + i, d]
        # (every buffer the vector code reads whole vectors of starts on a cache line: _zeros64)
        st = _zeros64(BLOCK_N * BLOCK_M, q.dtype).reshape((BLOCK_N, BLOCK_M))  # s^T, then p^T, of the current tile
        acc_t = _zeros64(G * Dv * BLOCK_M, q.dtype).reshape((G, Dv, BLOCK_M))  # the outputs' accumulators, transposed
        m_i = _zeros64(G * BLOCK_M, q.dtype).reshape((G, BLOCK_M))  # per query row: running max, sum, entropy sum
        m_i[:] = -np.inf
        l_i = _zeros64(G * BLOCK_M, q.dtype).reshape((G, BLOCK_M))
        e_i = _zeros64(G * BLOCK_M, q.dtype).reshape((G, BLOCK_M))
        alpha_i = _zeros64(G * BLOCK_M, q.dtype).reshape((G, BLOCK_M))  # the factor of acc before this tile's share
        alpha_i[:] = 1.0
        cmax_t = _zeros64(BLOCK_M, q.dtype)  # per query lane: the column max of a plain tile (from its product)
        # the product's factor and the score units per unit of s (a softcap scales in float64, afterwards)
        scale, cu64 = _raw_units(opts.qk_scale, opts.softcap_u, opts.base2, mask.alibi.size > 0 or mask.bias.size > 0)
        cu = np.float32(cu64)
        # (the tile products' factor and mode: scale log2(e) applied exactly where terms follow: _qk_store)
        qk_factor, qk_mode = _qk_store(scale, cu64, opts.qk_scale64, opts.softcap_u, mask.alibi.size > 0 or mask.bias.size > 0)
        want = 1 if opts.want_stats else 0
        # fewer than 4 rows (a ragged last block, always alone): dot products, as every pass of cpu_flash
        # computes such a block, so that the backward recomputes bit-identical scores; without a softcap in
        # float64, kept as hi + lo in score units (cpu_flash._qk_split, SPLIT_SMALL)
        use_dot = rows < 4
        # score terms after the product in every tile; ALiBi without a softcap (which comes first) is
        # added here: a call that takes the mask record costs ~0.4 us a tile (its ~20 arrays are
        # reference-counted on the way in and out)
        softcap = opts.softcap_u > 0.0
        split = use_dot and not softcap
        # blocks of >= 4 rows whose logits may be large: float64 scores held as s - R, R per row following its
        # max (cpu_flash._qk64_t, _rebase; cpu_bwd asks _split_tiles the same), the softmax in score units
        wide = np.zeros(G, np.bool_)
        for g in range(G):
            if ALL_FEATURES:  # (a lean variant's launcher asked _split_tiles of every block: no)
                wide[g] = not use_dot and _split_tiles(q, b, h, r00 + g * BLOCK_M, rows, opts)
        qt64 = np.zeros((G if wide.any() else 0, D, BLOCK_M), np.float64)  # their Q^T in float64
        for g in range(qt64.shape[0]):
            for i in range(rows if wide[g] else 0):
                for d in range(D):
                    qt64[g, d, i] = q[b, h, r00 + g * BLOCK_M + i, d]
        ref = np.zeros((G, BLOCK_M), np.float64)  # per query row: its scores' reference R
        tmax = np.empty(BLOCK_M, q.dtype)  # per query row: the tile's max of s - R
        fold = softcap and opts.fold_lo or split  # cpu_flash's hi/lo convention (_softmax_lo_t)
        lo = np.zeros((BLOCK_N, BLOCK_M) if fold else (0, 0), q.dtype)  # the softcap's rest of each logit
        lo_i = np.zeros((G, BLOCK_M if fold else 0), q.dtype)  # per query row: its anchor's rest
        own_alibi = mask.alibi.size > 0 and not softcap
        terms = softcap or mask.alibi.size > 0 and not own_alibi or mask.bias.size > 0
        slopes, q_pos_f, kv_pos_f = mask.alibi, mask.q_pos_f, mask.kv_pos_f
        # raw addresses only of arrays whose names stay in use past the tile loop (numba frees a local array
        # after the last use of its name: qt's and alpha_i's addresses are taken where they are used)
        pst = _addr(st)
        pm, pl, pe = _addr(m_i), _addr(l_i), _addr(e_i)
        pk0 = _addr(k) + (b * k.shape[1] + hk) * Lk * D * isz
        pv0 = _addr(v) + (b * v.shape[1] + hk) * Lk * Dv * isz
        no_pf = (np.intp(0), np.intp(0), np.intp(0), np.intp(0))
        n_tiles = np.zeros(G, np.int64)
        for kb in range(nK):
            c0 = kb * BLOCK_N
            ncols = min(BLOCK_N, Lk - c0)
            walked = False  # the group's first product of this tile walks the next operands into L2
            for g in range(G):
                qb = qb0 + g
                r0 = qb * BLOCK_M
                kind = tiles[tb, th_, qb, kb]
                if kind == EMPTY:
                    continue
                n_tiles[g] += 1
                # a plain tile (nothing added to the product, float32 scores): its column max from the product
                fused = kind != PARTIAL and not (terms or own_alibi or fold or use_dot or wide[g])
                if ALL_FEATURES and (split or wide[g]):
                    # -- the score terms on zeros first, then q.k in float64 added (below) --
                    for j in range(ncols):
                        for i in range(rows):
                            st[j, i] = 0.0
                elif ALL_FEATURES and use_dot:
                    _qk_dot_t(q, b, h, r0, rows, pk0 + c0 * D * isz, ncols, st, scale)
                else:
                    # -- s^T = k_blk @ Q^T, times the store factor; the calls walk this tile's values and the
                    # next tile's keys into L2 --
                    pf = no_pf
                    if PREFETCH and not walked:
                        c1 = c0 + BLOCK_N
                        pf = (pv0 + c0 * Dv * isz, ncols * Dv * isz, pk0 + c1 * D * isz, max(min(BLOCK_N, Lk - c1), 0) * D * isz)
                        if c1 >= Lk:
                            # -- the last tile: this unit's output rows (written next) instead of keys --
                            pf = (pf[0], pf[1], _addr(out) + ((b * Hq + h) * Lq + r00) * Dv * isz, G * BLOCK_M * Dv * isz)
                        walked = True
                    elif PREFETCH and c0 + BLOCK_N >= Lk:
                        # -- and the second block's product: the queries of the unit this thread likely takes next --
                        tn, Gn = _unit(min(u0 + taken[0] if taken.size > 0 else u + 1, u1 - 1), nQ, npair, per)
                        pf = (_addr(q) + ((tn // nQ) * Lq + (tn % nQ) * BLOCK_M) * D * isz, Gn * BLOCK_M * D * isz, I0, I0)
                    if fused:
                        cmax_t[:] = -np.inf
                    _gemm_t(pk0 + c0 * D * isz, D, I1, _addr(qt) + g * D * BLOCK_M * isz, IM, pst, IM, ncols, D,
                            groups, qk_factor, qk_mode, I0, _addr(cmax_t) if fused else I0, pf, st)
                if ALL_FEATURES and own_alibi and not split:
                    # (split: _qk_split adds ALiBi in float64)
                    _alibi_tile(st, rows, ncols, b, h, r0, c0, slopes, q_pos_f, kv_pos_f)
                if ALL_FEATURES:
                    if terms or kind == PARTIAL:
                        _score_terms_t(st, lo, rows, ncols, b, h, qb, kb, kind, mask, opts, not own_alibi)
                elif kind == PARTIAL:
                    # (a lean variant: _score_terms_t's only term is the element-wise mask)
                    _mask_tile_t(st, rows, ncols, b, h, qb, kb, mask)
                if ALL_FEATURES and wide[g]:
                    # -- s^T - R = q.k * scale log2(e) + the terms - R in float64, rounded once --
                    pq64, pref = _addr(qt64) + g * D * BLOCK_M * 8, _addr(ref) + g * BLOCK_M * 8
                    _qk64_t(pq64, pk0 + c0 * D * isz, ncols, D, rows, opts.qk_scale64, pst, pref, _addr(tmax), st)
                    if _rebase(tmax, rows, ref[g], m_i[g]):
                        # -- a row's max moved its R: the tile once more against the new ones --
                        for j in range(ncols):
                            for i in range(rows):
                                st[j, i] = 0.0
                        if own_alibi:
                            _alibi_tile(st, rows, ncols, b, h, r0, c0, slopes, q_pos_f, kv_pos_f)
                        if terms or kind == PARTIAL:
                            _score_terms_t(st, lo, rows, ncols, b, h, qb, kb, kind, mask, opts, not own_alibi)
                        _qk64_t(pq64, pk0 + c0 * D * isz, ncols, D, rows, opts.qk_scale64, pst, pref, _addr(tmax), st)
                elif ALL_FEATURES and split:
                    # -- hi + lo = q.k * scale log2(e) in float64 + the terms --
                    _qk_split(_addr(q) + ((b * Hq + h) * Lq + r0) * D * isz, D, rows, pk0 + c0 * D * isz, ncols, D,
                              opts.qk_scale64, st, lo, True, slopes, q_pos_f, kv_pos_f, b, h, r0, c0)
                # -- online softmax, LANES query rows at a time: m, alpha, l (and e); s^T becomes p^T --
                if ALL_FEATURES and fold:
                    _softmax_lo_t(st, lo, rows, ncols, m_i[g], l_i[g], e_i[g], lo_i[g], alpha_i[g], opts)
                else:
                    o = g * BLOCK_M * isz
                    _vsoftmax(pst, BLOCK_M, ncols, groups, pm + o, pl + o, pe + o, _addr(alpha_i) + o,
                              _addr(cmax_t) if fused else I0, want, np.float32(1.0) if wide[g] else cu, st)
                # -- acc^T = alpha * acc^T + v_blk^T @ p^T: V read through strides, alpha a vector of query lanes --
                _gemm_t(pv0 + c0 * Dv * isz, I1, Dv, pst, IM, _addr(acc_t) + g * Dv * BLOCK_M * isz, IM, Dv, ncols,
                        groups, 1.0, MODE_RESCALE, _addr(alpha_i) + g * BLOCK_M * isz, I0, no_pf, st)
        acc = _zeros64(BLOCK_M * Dv, q.dtype).reshape((BLOCK_M, Dv))
        for g in range(G):
            # -- the running max in score units: row_max = m * cu (or R + m) rounded, its rest into row_log --
            if ALL_FEATURES and wide[g]:
                rest = _anchor_rest(m_i[g], ref[g], rows)
            else:
                rest = lo_i[g] if fold else _max_in_units(m_i[g], rows, cu)
            if rows % LANES == 0 and Dv % LANES == 0:
                _transpose_t(_addr(acc_t) + g * Dv * BLOCK_M * isz, BLOCK_M, _addr(acc), Dv, Dv, rows, acc)
            else:
                for i in range(rows):
                    for d in range(Dv):
                        acc[i, d] = acc_t[g, d, i]
            _finish_rows(acc, m_i[g], l_i[g], e_i[g], rest, rows, b, h, r00 + g * BLOCK_M, out, row_max, row_log, ent, opts)
            counts[t + g] = n_tiles[g]


@njit(cache=True)
def _units(Lq, pair):
    # a (batch, head)'s work units: (query blocks nQ, npair, units): the first 2 * npair blocks (whole
    # ones, if `pair`) two at a time, then the blocks left one at a time
    nQ = (Lq + BLOCK_M - 1) // BLOCK_M
    npair = (Lq // BLOCK_M) // 2 if pair else 0
    return nQ, npair, npair + nQ - 2 * npair


@njit(cache=True)
def _unit(u, nQ, npair, per):
    # work unit u (per units a head) -> (its first task, its blocks)
    bh, w = u // per, u % per
    if w < npair:
        return bh * nQ + 2 * w, 2
    return bh * nQ + 2 * npair + (w - npair), 1


# -- launcher --------------------------------------------------------------------------------------


def serves(q) -> bool:
    """Whether :func:`launch_forward` takes this call: float32 compute (float64 and the few-row
    decoding calls keep ``cpu_flash.flash_fwd``)."""
    return q.dtype != torch.float64 and q.shape[2] >= 4


def launch_forward(q, k, v, sinks, call):
    """``backends.cpu._launch_forward`` on this kernel: (out, row_max, row_log, max_logit, entropy), all
    float32 (the dispatcher rounds out to q's dtype), exactly as the old kernel gives them (the rows None for a call that reads only
    the output, ``_Call.rows``)."""
    _cpu = _backend()
    B, Hq, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    acc = torch.float32
    mask = _cpu._kernel_mask(call.low, acc)
    opts = _cpu._opts(acc, call)
    qn, kn, vn = (_cpu._ready(t, acc).numpy() for t in (q, k, v))
    # out and the row tensors (scratch numpy rows where nothing reads them)
    bufs = _cpu._forward_buffers(B, Hq, Lq, Dv, acc, call.rows or sinks is not None)
    counts = np.zeros(B * Hq * (-(-Lq // BLOCK_M)), np.int64)  # one per task
    threads = _cpu._threads(len(counts), 4.0 * B * Hq * Lq * Lk * D)
    # the call's features alone (opts.k_norm is still 0: no float64-tile test yet)
    lean = lean_call(qn, mask, opts)
    # the keys' largest norm: blocks whose logits may be large take float64 scores (cpu_flash._split_tiles).
    # On several threads a call whose features are lean tests that here while the pool threads begin the lean
    # kernel (the passes over K and Q take ~1 ms at (1, 16, 2048, 2048, 64) next to the running kernel)
    ahead = SPLIT_TILES and lean and threads > 1
    if SPLIT_TILES and not ahead:
        opts = opts._replace(k_norm=max_key_norm(kn))
        lean = lean and not _may_split(qn, opts)
    nQ, npair, per = _units.py_func(Lq, PAIR)
    units, pair = B * Hq * per, PAIR
    if threads > 1 and units < 4 * threads:
        # too few pairs to keep every thread busy to the end: one block a unit
        units, pair = B * Hq * nQ, False
    arrays = (qn, kn, vn, *bufs.arrays, counts, mask)
    args = arrays + (opts, 0, units, pair)
    kernel = lean_variant(flash_fwd_t) if lean else flash_fwd_t  # (lean: compiled without the unused features)
    if threads <= 1:
        _cpu._run(kernel, *args, NO_COUNTER)
    else:
        taken = np.zeros(1, np.int64)  # the units begun, shared by the threads
        entry = _cpu._entry(kernel, args + (taken,))
        calls = [(entry, args + (taken,))] * threads
        found = []

        def test_then_join(*a):
            # -- this thread: the float64-tile test, then units like the others; if some block needs float64
            # scores, no thread begins another unit and the call runs again on the full kernel (below) --
            o = opts._replace(k_norm=max_key_norm(kn))
            ok = not _may_split(qn, o)
            if ok:
                entry(*a)
            else:
                taken[0] = units
            found.append((o, ok))

        if ahead:
            calls[0] = (test_then_join, args + (taken,))
        _cpu._on_threads(calls)
        if ahead:
            opts, ok = found[0]
            if not ok:
                counts[:] = 0
                args = arrays + (opts, 0, units, pair)
                taken = np.zeros(1, np.int64)
                entry = _cpu._entry(flash_fwd_t, args + (taken,))
                _cpu._on_threads([(entry, args + (taken,))] * threads)
    tiles = _cpu._tiles(counts)
    _cpu.TILE_PRODUCTS["forward"] += tiles
    CALLS["calls"] += 1
    CALLS["tiles"] += tiles
    return _cpu._forward_result(q, bufs, sinks, call, opts)


_CPU = []  # selfattn.backends.cpu, once imported (it imports this module)


def _backend():
    if not _CPU:
        from selfattn.backends import cpu

        _CPU.append(cpu)
    return _CPU[0]


stamp_sources(globals(), _flash_src)  # the kernels compile cpu_flash's numba functions into themselves
