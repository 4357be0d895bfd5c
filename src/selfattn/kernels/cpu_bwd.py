"""The float32 backward of the `cpu` backend in the transposed layout (issue 14).

One kernel, one task per (batch, head, query block of BLOCK_M rows). A tile is held *transposed*,
keys x queries, so that the per-query-row quantities (the lse halves, delta) are vectors across
the query lanes and every step between the products is a vertical vector op (LLVM IR at the
host's width, like cpu_flash's). A task sweeps its non-empty key tiles twice::

    sweep 1, per tile:  S^T  = K_blk Q_blk^T           (keys x queries; Q^T packed once per task)
                        P^T  = exp2((S^T - row_max[q]) - row_log[q])
                               (S^T = K_blk Q_blk^T unscaled where nothing is added to the scaled
                               score: exp2(fma(S^T, scale log2 e, -row_max) - row_log), the
                               forward's exponents: cpu_flash._raw_units)
                        dP^T = V_blk dO_blk^T          (dO^T packed like Q^T)
                        delta[q] += sum_keys P^T dP^T   (and sum_keys P^T; float64)
                        dV  += P^T dO                  (P^T as a plain A operand)
                        P^T and dP^T kept in the worker's buffers (2 x nK tiles: O(L) per worker)
    sweep 2, per tile:  dS^T = P^T (dP^T - delta[q])    (times the softcap's c (1 - tanh^2))
                        dK  += dS^T Q,  dQ += dS K      (dS^T read through _gemm_pf's A strides)
                        (last kept tile first: the most recently written are still in L2)

Five tile products, as FlashAttention-2's backward (cpu_flash's two passes do eight), and one
exp2 per score. The products run on cpu_flash's micro-kernel with one prefetcht1 a step (_gemm_pf)
that walks the next operands into L2 while the current tile computes: in sweep 1 this tile's V and
dV rows and the next tile's K and kept-tile slots, in sweep 2 this tile's K and the next kept
tile's dK rows, P^T and dP^T. One head's K, V, dK, dV at Lk = 4096, D = 64 are 4 MB and a task's
kept tiles up to 2 MB more, against a 2 MB L2: without the walk every tile's operands come from L3.

delta is the exact rowsum(P * dP) of the same P and dP that dS uses, which a one-pass kv-outer
kernel cannot have (it needs the whole row before any dS): FlashAttention's rowsum(dO * O) instead
missed STYLE rule 6 in 11 of test_cpu_kernel's cases (rows of one or two keys, where the twin's dS
is exactly 0). Keeping the tiles costs memory traffic, not products.
With ``sinks`` known (launch_backward) delta is divided by rowsum(P) + p_sink, in float64.

Each dK/dV share is added to its rows by one writer: on 2+ threads (backends.cpu._on_threads) each
thread takes the next whole kv head from a shared counter when the kv heads divide evenly
(bit-identical to one thread; dK scaled per head by its writer), else every thread adds its fixed
share into its own copy and the copies are summed in worker order. Results are bit-identical run
to run.

Where the time goes (one thread, causal D = 64, rdtsc per section, (1, 4, 2048, 64)): the five
products ~80 % (each at ~100-110 GFLOP/s in place against ~120-128 for the same calls on data in
L1/L2 -- about 80 % of the FMA loop), P and delta's float64 sums ~9 %, dS ~4 %, task set-up, masks
and the dQ write ~3 %. The rate is flat in L (1024-4096: 83-85 GFLOP/s on that machine): the kept
tiles do not make it memory-bound. (That was another machine: on this session's Xeon, 2 MB L2, causal
(1, 2, 4096, 4096, 64) ran at ~51-61 % of the 1-thread FMA peak, and the L2 walk took ~7 % off its
time; walking only K, V, dK and dV, not the kept tiles, took ~3 %.)

Masks arrive lowered as for every cpu kernel (EMPTY tiles skipped, PARTIAL tiles masked
element-wise); the score terms are cpu_flash._score_terms / _mask_tile transposed. Query
blocks of fewer than 4 rows take dot products, as the forwards do (scores bit-identical), and
compute dS and dQ in float64 (decoding calls: speed does not matter there, and rows of two keys
whose dS_j k_j cancel missed rule 6 by up to 1.14x with a float32 dS).
A block of >= 4 rows whose logits may be large (cpu_flash._split_tiles, asked exactly as the forward asks
it) recomputes its scores in float64 against R = row_max (cpu_flash._qk64_t): S^T - row_max rounded once,
P^T = exp2(that - row_log), as the forward took them (a float32 q.k: dk 4.1x rule 6 at D 3, q and k x30).
float64 stays on cpu_flash's kernels (``serves``); ``shard_backward`` passes its delta.
"""

from __future__ import annotations

import platform

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .cpu_fwd import (NO_COUNTER, STORE_SPLIT, _alibi_tile, _bias_mask_t, _fetch_add, _loop, _mask_tile_t,
                      _mul_split, _qk_store, _split_factor, _zeros64)

from .cpu_flash import (ALL_FEATURES, ADD, VEC_BYTES, _fold_lo, _softcap_tile, BLOCK_M, BLOCK_N, EMPTY, FASTMATH, PARTIAL, STORE, _addr, _bx, _dot, _Exact,
                        _exp2_ir, _fma_k_loop, _not_inlined, _per_vector_count, _prefetch, _qk_split, _qk64_t, _qt64, _raw_units, _split_tiles, _Vectors, NV_MAX, TILE_N)
from selfattn.kernels import cpu_flash as _flash_src, cpu_fwd as _fwd_src, stamp_sources

VW = VEC_BYTES // 4  # float32 lanes of one host vector
LANES = 16  # query lanes rounded up to this (a whole AVX-512 vector of float32; two AVX2 ones)
CALLS = {"calls": 0, "tiles": 0}  # launches of this kernel and the tiles they computed (tests read it)

# -- the tile products: cpu_flash's micro-kernel walking the next tiles into L2 ---------------------


def _make_mk_pf(MR):
    # cpu_flash._make_microkernel's float32 product (STORE and ADD; masked past n; each element's FMA
    # order over kdim the same, so the same results bit for bit), plus one prefetcht1 a step of the line
    # at ppf + kk * spf (bytes): _gemm_pf walks the operands of the next tile into L2 through it. One
    # head's K, V, dK and dV at Lk = 4096, D = 64 are 4 MB and the kept P^T/dP^T tiles up to 2 MB more,
    # against a 2 MB L2: without the walk every tile's operands come from L3. Mode STORE_SPLIT: STORE with the
    # float64 scale applied as c_hi + c_lo, as cpu_fwd's product stores a tile with terms (cpu_fwd._split_factor).
    @intrinsic
    def microkernel(typingctx, pa, sa0, sa1, pb, sb, pc, sc, n, kdim, scale, mode, ppf, spf, like):
        if not (isinstance(like, types.Array) and like.dtype == types.float32):
            return None
        sig = types.void(*([types.intp] * 9), types.float64, *([types.intp] * 3), like)

        def codegen(context, builder, signature, args):
            builder = _Exact(builder)
            pa, sa0, sa1, pb, sb, pc, sc, n, kdim, scale, mode, ppf, spf, _ = args
            vec = _Vectors(context, builder, types.float32)
            width, i64, c = vec.width, vec.i64, vec.const
            scale_v = vec.splat(builder.fptrunc(scale, vec.fty))

            def product(nvec):
                # the whole product with nvec vectors per row of C, the last one masked
                masks = [vec.lanes_below(builder.sub(n, c(v * width))) if v == nvec - 1 else None for v in range(nvec)]

                def load_b(kk):
                    brow = builder.mul(kk, sb)
                    return [vec.load(pb, builder.add(brow, c(v * width)), masks[v]) for v in range(nvec)]

                def load_a(kk):
                    return lambda i: builder.load(vec.at(pa, builder.add(builder.mul(c(i), sa0), builder.mul(kk, sa1)), vec.sptr))

                def walk(kk):
                    # -- one line of the next tile's operands toward L2 (locality 2: prefetcht1) --
                    _prefetch(builder, builder.add(ppf, builder.mul(kk, spf)), 2)

                # (unroll=False: LLVM's unroller copied the k loop, MR x nv FMAs a step already, several times over;
                # the copies cost ~0.35 s of the first float32 call and the backward measured no faster)
                final = _fma_k_loop(builder, vec, MR, nvec, kdim, load_b, load_a, f"mkp{nvec}", walk, unroll=False)
                # -- write C in the call's mode --
                with builder.if_else(builder.icmp_signed("==", mode, c(STORE))) as (store, add):
                    with store:
                        for i in range(MR):
                            for v in range(nvec):
                                off = builder.add(builder.mul(c(i), sc), c(v * width))
                                vec.store(builder.fmul(final[i][v], scale_v), pc, off, masks[v])
                    with add:
                        with builder.if_else(builder.icmp_signed("==", mode, c(STORE_SPLIT))) as (split, add2):
                            with split:
                                # -- S^T of a tile with terms: the forward's scores bit for bit --
                                hi, lo = _split_factor(builder, vec, scale)
                                for i in range(MR):
                                    for v in range(nvec):
                                        off = builder.add(builder.mul(c(i), sc), c(v * width))
                                        vec.store(_mul_split(builder, vec, final[i][v], hi, lo), pc, off, masks[v])
                            with add2:
                                for i in range(MR):
                                    for v in range(nvec):
                                        off = builder.add(builder.mul(c(i), sc), c(v * width))
                                        vec.store(builder.fadd(vec.load(pc, off, masks[v]), final[i][v]), pc, off, masks[v])

            # one copy of the product per vector count, picked by ceil(n / width)
            _per_vector_count(builder, vec, builder.sdiv(builder.add(n, c(width - 1)), c(width)), product, "mkp")
            return context.get_dummy_value()

        return sig, codegen

    return microkernel


_mkp6, _mkp2, _mkp1 = _make_mk_pf(6), _make_mk_pf(2), _make_mk_pf(1)


# int64 values, not literals, for constant arguments of called numba functions: numba compiles a function once
# per pattern of literal arguments (_gemm_pf's five calls made three copies of it)
I0, I1, IM, MODE_STORE, MODE_ADD = np.intp(0), np.intp(1), np.intp(BLOCK_M), np.intp(STORE), np.intp(ADD)


@njit(cache=True)
def _gemm_pf(pa, sa0, sa1, pb, sb, pc, sc, m, kdim, n, scale, mode, walk, like):
    # C[:m, :n] (op)= A[:m, :kdim] @ B[:kdim, :n] at raw addresses (strides in elements), mode STORE or
    # ADD, float32: cpu_flash._gemm's calls (6, 2, 1 rows; TILE_N columns) and results, on _make_mk_pf.
    # walk = (p1, n1, p2, n2): two byte ranges the calls walk into L2, one 64-byte line a step
    _not_inlined(like)
    p1, n1, p2, n2 = walk
    isz = 4
    done = 0  # bytes of the ranges walked so far
    for j0 in range(0, n, TILE_N):
        nn = min(TILE_N, n - j0)
        i = 0
        while i < m:
            r = 6 if m - i >= 6 else (2 if m - i >= 2 else 1)
            ppf, spf = pb, 0  # nothing left to walk: a line of B, in L1
            if done < n1:
                ppf, spf = p1 + done, 64
            elif done < n1 + n2:
                ppf, spf = p2 + (done - n1), 64
            done += kdim * 64
            args = (pa + i * sa0 * isz, sa0, sa1, pb + j0 * isz, sb, pc + (i * sc + j0) * isz, sc, nn, kdim, scale, mode, ppf,
                    spf, like)
            if r == 6:
                _mkp6(*args)
            elif r == 2:
                _mkp2(*args)
            else:
                _mkp1(*args)
            i += r


# -- vertical vector ops over the query lanes ---------------------------------------------------


@intrinsic
def _probs_lanes(typingctx, ps, pdp, stride, pm, plg, pdl, psum, ncols, lo, cu, like):
    # One vector of query lanes (the host's width) down the ncols key rows of a transposed tile (raw
    # addresses, rows `stride` elements apart):
    #   p = 2**(fma(s, cu, -m) - lg), 0 where that exponent is below lo      -> written over s
    #   (cu = 1: (s - m) - lg; else s is q.k itself and m, lg the forward's M and log2 l + rest:
    #   cpu_flash._raw_units, _max_in_units -- s * cu - M rounded once, exact near the max)
    #   dl += sum over the rows of p * dp, psum += sum of p, in float64   (delta's two sums)
    # m, lg (float32), dl and psum (float64) per lane. The same exp2 IR as cpu_flash's _vec_exp2_row,
    # so P is the same. float64 sums: dS = P (dP - delta) cancels in rows of a few keys.
    if not (isinstance(like, types.Array) and like.dtype == types.float32):
        return None
    sig = types.void(*([types.intp] * 8), types.float32, types.float32, like)

    def codegen(context, builder, signature, args):
        builder = _Exact(builder)
        ps, pdp, stride, pm, plg, pdl, psum, ncols, lo, cu, _ = args
        vec = _Vectors(context, builder, types.float32)
        dty = ir.VectorType(ir.DoubleType(), vec.width)
        dptr = ir.PointerType(dty)
        fma64 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(dty, [dty] * 3), f"llvm.fma.v{vec.width}f64")
        lov, cuv = vec.splat(lo), vec.splat(cu)
        m, lg = vec.load(pm, vec.const(0)), vec.load(plg, vec.const(0))
        neg_m = builder.fsub(vec.zero, m)
        at_dl, at_ps = builder.inttoptr(pdl, dptr), builder.inttoptr(psum, dptr)

        def body(j, carried):
            off = builder.mul(j, stride)
            # -- p = exp2(fma(s, cu, -m) - lg), in this order --
            x = builder.fsub(builder.call(vec.fma, [vec.load(ps, off), cuv, neg_m]), lg)
            below = builder.fcmp_ordered("<", x, lov)
            xc = builder.select(below, lov, x)
            p = builder.select(below, vec.zero, _exp2_ir(builder, xc, vec.width))
            vec.store(p, ps, off)
            # -- delta's sums in float64: dl += p * dp (exact products), psum += p --
            pd, dpd = builder.fpext(p, dty), builder.fpext(vec.load(pdp, off), dty)
            return [builder.call(fma64, [pd, dpd, carried[0]]), builder.fadd(carried[1], pd)]

        dl, sp = _loop(builder, vec, vec.const(0), ncols, 1, [builder.load(at_dl, align=8), builder.load(at_ps, align=8)], body,
                       "probs")
        builder.store(dl, at_dl, align=8)
        builder.store(sp, at_ps, align=8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _ds_lanes(typingctx, pp, pdp, stride, pdl, ncols, like):
    # dp = p * (dp - delta) for one vector of query lanes down ncols key rows (`stride` apart);
    # delta per lane in float64 (raw address pdl), dp - delta taken in float64 and rounded once
    if not (isinstance(like, types.Array) and like.dtype == types.float32):
        return None
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp, like)

    def codegen(context, builder, signature, args):
        builder = _Exact(builder)
        pp, pdp, stride, pdl, ncols, _ = args
        vec = _Vectors(context, builder, types.float32)
        dty = ir.VectorType(ir.DoubleType(), vec.width)
        dl = builder.load(builder.inttoptr(pdl, ir.PointerType(dty)), align=8)

        def body(j, carried):
            off = builder.mul(j, stride)
            diff = builder.fptrunc(builder.fsub(builder.fpext(vec.load(pdp, off), dty), dl), vec.vty)
            vec.store(builder.fmul(vec.load(pp, off), diff), pdp, off)
            return []

        _loop(builder, vec, vec.const(0), ncols, 1, [], body, "ds")
        return context.get_dummy_value()

    return sig, codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def _mxcsr_ftz(typingctx, on):
    # Sets flush-to-zero and denormals-are-zero in this thread's MXCSR (`on` unused) and returns the
    # old value for _mxcsr_set. x86 only (elsewhere nothing, 0).
    if on != types.intp:
        return None
    sig = types.intp(types.intp)

    def codegen(context, builder, signature, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        if not _X86:
            return ir.Constant(i64, 0)
        i8p = ir.PointerType(ir.IntType(8))
        st = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p]), "llvm.x86.sse.stmxcsr")
        ld = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p]), "llvm.x86.sse.ldmxcsr")
        slot = cgutils.alloca_once(builder, i32)
        builder.call(st, [builder.bitcast(slot, i8p)])
        old = builder.load(slot)
        builder.store(builder.or_(old, ir.Constant(i32, 0x8040)), slot)  # FTZ (bit 15) | DAZ (bit 6)
        builder.call(ld, [builder.bitcast(slot, i8p)])
        return builder.zext(old, i64)

    return sig, codegen


@intrinsic
def _mxcsr_set(typingctx, value):
    # MXCSR = value (an old value _mxcsr_ftz returned). x86 only.
    if value != types.intp:
        return None
    sig = types.void(types.intp)

    def codegen(context, builder, signature, args):
        if _X86:
            i32, i8p = ir.IntType(32), ir.PointerType(ir.IntType(8))
            ld = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p]), "llvm.x86.sse.ldmxcsr")
            slot = cgutils.alloca_once(builder, i32)
            builder.store(builder.trunc(args[0], i32), slot)
            builder.call(ld, [builder.bitcast(slot, i8p)])
        return context.get_dummy_value()

    return sig, codegen


# -- score terms of a transposed tile (cpu_flash._score_terms and _mask_tile with s[key, query]) --


@njit(fastmath=FASTMATH, cache=True)
def _score_terms_t(st, lo, w, rows, ncols, scaled, b, h, qb, kb, kind, mask, opts, alibi):
    # st[:ncols, :rows] holds k.q, times the scale when `scaled` (never with a softcap): the softcap or
    # the scale, ALiBi, the float bias and the element-wise mask, in cpu_flash._score_terms's order.
    # With a softcap, w gets the dS factor c (1 - tanh^2) and lo (unless empty) the rest of c tanh(u)
    # past its float32 rounding (cpu_flash._softcap_tile). ALiBi unless `alibi` is False (a split block:
    # cpu_flash._qk_split adds it in float64, as the forward does)
    r0, c0 = qb * BLOCK_M, kb * BLOCK_N
    softcap = opts.softcap_u > 0.0
    if not softcap and not scaled:
        qk_scale = opts.qk_scale
        for j in range(ncols):
            for i in range(rows):
                st[j, i] *= qk_scale
    if softcap:
        # -- softcap: c * tanh(u) in float64, rounded once (as the forward does), its rest and w --
        _softcap_tile(st, lo, w, ncols, rows, opts)
    if alibi and mask.alibi.size > 0:
        # -- ALiBi: - slope * |q_pos - kv_pos|, slope in score units: the forward's vector IR (one FMA a
        # vector of query lanes), so the scores stay bit-identical (a numba loop here cost +19 %) --
        _alibi_tile(st, rows, ncols, b, h, r0, c0, mask.alibi, mask.q_pos_f, mask.kv_pos_f)
    _bias_mask_t(st, rows, ncols, b, h, qb, kb, kind, mask)


# -- the kernel ----------------------------------------------------------------------------------


@njit(cache=True)
def _small_ds_dq(st, dpt, wkeep, u, softcap, dl64, dq64, k, b, hk, c0, ncols, rows):
    # a query block of < 4 rows: dS^T = P^T (dP^T - delta) (times the kept softcap factor) in float64,
    # rounded once into dpt for dK; dQ += dS K accumulated in float64 (dq64)
    for j in range(ncols):
        for i in range(rows):
            d64 = np.float64(st[j, i]) * (np.float64(dpt[j, i]) - dl64[i])
            if softcap:
                d64 *= np.float64(wkeep[u, j, i])
            dpt[j, i] = d64
            for d in range(dq64.shape[1]):
                dq64[i, d] += d64 * np.float64(k[b, hk, c0 + j, d])


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def finish_kv(dk_w, dv_w, dk, dv, dscale, lo, hi):
    """Rows lo:hi of the flattened (B*Hkv*Lk, D|Dv) after flash_bwd_t's snake (per = 0): dk = dscale * the
    sum over workers of dk_w (W, B*Hkv*Lk, D), dv = that of dv_w, in worker order."""
    W = dk_w.shape[0]
    for r in range(lo, hi):
        for d in range(dk.shape[1]):
            acc = dk_w[0, r, d]
            for w in range(1, W):
                acc += dk_w[w, r, d]
            dk[r, d] = acc * dscale
        for d in range(dv.shape[1]):
            acc = dv_w[0, r, d]
            for w in range(1, W):
                acc += dv_w[w, r, d]
            dv[r, d] = acc


@njit(fastmath=FASTMATH, cache=True)
def _scale_head(dk, kh, dscale):
    # dk[b, hk] *= dscale for the flat kv head kh = b * Hkv + hk (after its last task, while its rows
    # are still partly in this core's cache)
    x = dk[kh // dk.shape[1], kh % dk.shape[1]]
    for r in range(x.shape[0]):
        for d in range(x.shape[1]):
            x[r, d] *= dscale


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def flash_bwd_t(q, k, v, do, row_max, row_log, delta, sink_p, normalize, fold_lo, split_ragged, split_tiles, dk_w, dv_w, dq, counts,
                mask, opts, t0, t1, w, W, per, taken):
    """The backward's tasks t0 .. t1 - 1 (one per (batch, head, query block); ``counts`` has one entry
    each) for worker ``w`` of ``W``, adding its dK and dV shares into dk_w and dv_w (B, Hkv, Lk, D|Dv),
    zeroed, writing dq (B, Hq, Lq, D). ``per`` > 0: whole kv heads of ``per`` tasks each (every query
    head of the group), dK of each scaled by dscale after its last task; which heads:

    * ``taken`` a shared (1,) int64 counter, zeroed: the next head no thread running this call has taken
      yet, until none is left (``backends.cpu._on_threads``; each dK/dV row has one writer, dk_w and dv_w
      are dk and dv: bit-identical to one thread, whichever thread takes a head);
    * ``taken`` empty: heads w, w + W, ... (one thread: W = 1, all of them in order).

    ``per`` = 0: tasks dealt in a fixed snake, w and 2W-1-w of every 2W (W = 2: 0, 3, 4, 7, ... and
    1, 2, 5, 6, ...), so that the causal mask's growing query blocks even out (round robin gave worker 1
    the larger of every pair: 3 % more work), into this worker's own dk_w, dv_w (summed by
    :func:`finish_kv`, in worker order: deterministic).

    row_max, row_log (B, Hq, Lq): the lse halves (sink included); delta (B, Hq, Lq) the caller's
    (shard_backward) or (B, Hq, 0): computed here, divided by rowsum(P) + sink_p (B, Hq, Lq|0) when
    ``normalize``; ``fold_lo``: cpu_flash.FOLD_LO's softcap exponent; ``split_ragged``: a ragged last
    block of < 4 rows takes float64 hi + lo scores (cpu_flash._qk_split) as the forward did
    (cpu_fwd.SPLIT_SMALL; calls of < 4 rows always do); ``split_tiles``: blocks of >= 4 rows take float64
    scores where cpu_flash._split_tiles says so, as the forward did (cpu_fwd.SPLIT_TILES).
    """
    # One function, the task's body inside the loop: numba compiles a called numba function on its own
    # (its LLVM IR optimized and emitted), then links that IR into its caller and optimizes and emits all
    # of it again (the task as a function of its own: ~1.3 s more of the first float32 call). The P^T/dP^T
    # buffers are allocated here, once, in the thread that runs the tasks: an allocation of 2 x 1 MB and
    # its first touch cost ~0.9 ms, ~1 % of a kv head's work at L = 4096. Every array here is np.zeros in
    # q.dtype or float64 (or int64) of 1-3 dimensions, as flash_fwd_t's are: numba compiles an allocation
    # once per kind of shape, dtype and caller's flags (fastmath, nogil), ~0.05 s each on a first call.
    nK = (k.shape[2] + BLOCK_N - 1) // BLOCK_N
    pbuf = _zeros64(nK * BLOCK_N * BLOCK_M, q.dtype).reshape((nK, BLOCK_N, BLOCK_M))
    dpbuf = _zeros64(nK * BLOCK_N * BLOCK_M, q.dtype).reshape((nK, BLOCK_N, BLOCK_M))
    kbs = np.zeros(nK, np.int64)
    shared = per > 0 and taken.size > 0
    # denormals flushed while the tasks run (this thread only, restored after): probabilities near
    # 2**-126 times dP - delta made denormal dS, and every FMA on one a microcode assist (ALiBi's far
    # keys: +18 % backward time); what is flushed is below 1e-38
    old = _mxcsr_ftz(np.intp(1))
    t, t_end = (t0, t0) if shared else (t0, t1)
    while True:
        if shared and t == t_end:
            # -- the next kv head nobody has taken (a thread slowed by another process takes fewer) --
            kh = _fetch_add(taken, I1)
            t, t_end = kh * per, min((kh + 1) * per, t1)
        if t >= t_end:
            break
        if not shared and (per > 0 and (t // per) % W != w or per == 0 and t % (2 * W) != w and t % (2 * W) != 2 * W - 1 - w):
            t += 1
            continue
        # -- task t: one (batch, head, query block): its dQ, and its shares of dK and dV added to this
        # worker's accumulators dk_w, dv_w; the P^T and dP^T tiles kept in pbuf/dpbuf from the first
        # sweep to the second, kbs the key block of each --
        B, Hq, Lq, D = q.shape
        Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
        nQ = (Lq + BLOCK_M - 1) // BLOCK_M
        nK = (Lk + BLOCK_N - 1) // BLOCK_N
        softcap = opts.softcap
        tiles = mask.tiles
        qb = t % nQ
        h = (t // nQ) % Hq
        b = t // (nQ * Hq)
        hk = h // (Hq // Hkv)
        r0 = qb * BLOCK_M
        rows = min(BLOCK_M, Lq - r0)
        nr = (rows + LANES - 1) // LANES * LANES  # lanes computed: padded queries get p = 0
        tb, th_ = _bx(tiles.shape[0], b), _bx(tiles.shape[1], h)
        isz = 4
        f = q.dtype
        small = rows < 4  # dot-product scores, and dS and dQ in float64 (below)
        # without a softcap a small block's scores are float64 dot products kept as hi + lo in score units,
        # exponents ((s - max) + lo) - log l, as the forwards take them (cpu_flash._qk_split)
        split = small and softcap <= 0.0 and (Lq < 4 or split_ragged)
        # >= 4 rows whose logits may be large, where the forward takes them so (cpu_fwd.SPLIT_TILES): float64 scores
        # held as s - row_max, rounded once (cpu_flash._qk64_t with R = row_max), then p = exp2(that - row_log)
        wide = False
        if ALL_FEATURES:  # (a lean variant's launcher asked _split_tiles of every block: no)
            wide = not small and split_tiles and _split_tiles(q, b, h, r0, rows, opts)
        wcap = np.zeros((BLOCK_N, BLOCK_M) if softcap > 0.0 else (0, 0), f)  # the softcap's dS factor
        lo = np.zeros((BLOCK_N, BLOCK_M) if softcap > 0.0 and fold_lo or split else (0, 0), f)  # the logits' rests
        m0 = _zeros64(BLOCK_M, f)  # the max once folded into the exponent: 0, +inf past the rows
        for i in range(rows, BLOCK_M):
            m0[i] = np.inf
        # per query lane in float64: rowsum(P * dP), rowsum(P), the float64 scores' reference row_max (_qk64_t)
        lanes64 = np.zeros((3, BLOCK_M), np.float64)
        dl64, ps64, ref = lanes64[0], lanes64[1], lanes64[2]
        dq_acc = _zeros64(BLOCK_M * D, f).reshape((BLOCK_M, D))
        dq64 = np.zeros((rows if small else 0, D), np.float64)
        # the softcap's dS factor of each kept tile of a small block (applied in float64 in sweep 2)
        wkeep = np.zeros((nK if small and softcap > 0.0 else 0, BLOCK_N, 4), f)
        scaled = rows >= 4  # else dot products, as every forward takes them (cpu_flash, cpu_fwd)
        # the product's factor and the score units per unit of s, as the forward took them: q.k itself
        # (times the scale's sign) and P = exp2(fma(s, cu, -row_max) - row_log) where nothing is added to
        # the scaled score (cpu_flash._raw_units)
        store, cu64 = _raw_units(opts.qk_scale, opts.softcap_u, opts.base2, mask.alibi.size > 0 or mask.bias.size > 0)
        # (the Q K^T product's factor and mode, as the forward's: scale log2(e) exact where terms follow)
        qk_factor, qk_mode = _qk_store(store, cu64, opts.qk_scale64, opts.softcap_u, mask.alibi.size > 0 or mask.bias.size > 0)
        if split or wide:
            store, cu64 = 1.0, 1.0
        cu = np.float32(cu64)
        raw = cu64 != 1.0
        pq = _addr(q) + ((b * Hq + h) * Lq + r0) * D * isz  # Q_blk rows (rows x D)
        pdo = _addr(do) + ((b * Hq + h) * Lq + r0) * Dv * isz  # dO_blk rows (rows x Dv)
        # -- Q_blk^T and dO_blk^T (D|Dv x BLOCK_M), packed once per task, zero past the rows --
        qt = _zeros64(D * BLOCK_M, f).reshape((D, BLOCK_M))
        dot = _zeros64(Dv * BLOCK_M, f).reshape((Dv, BLOCK_M))
        for i in range(rows):
            for d in range(D):
                qt[d, i] = q[b, h, r0 + i, d]
            for d in range(Dv):
                dot[d, i] = do[b, h, r0 + i, d]
        # -- the lse halves per query lane: a fully-masked row (max -inf) and lanes past the rows get
        # max +inf, log 0, so that p = exp2(s - inf) = 0 --
        m_blk = _zeros64(BLOCK_M, f)
        lg_blk = _zeros64(BLOCK_M, f)
        for i in range(BLOCK_M):
            m_blk[i] = np.inf
        for i in range(rows):
            mi = row_max[b, h, r0 + i]
            if mi != -np.inf:
                m_blk[i] = mi
                lg_blk[i] = row_log[b, h, r0 + i]
        tmax = np.zeros(BLOCK_M if wide else 0, f)  # (_qk64_t's lane maxima: unused here)
        qt64 = np.zeros((0, 0), np.float64)  # Q^T in float64 (wide)
        if ALL_FEATURES and wide:
            qt64 = _qt64(q, b, h, r0, rows)
        for i in range(BLOCK_M if wide else 0):
            ref[i] = m_blk[i]
        external = delta.shape[2] > 0
        # a FULL tile needs no score terms unless one of these applies (each call that takes the mask
        # record costs ~0.5 us of reference counting: ~3 % of a causal backward when made for every tile)
        terms = softcap > 0.0 or not scaled or mask.alibi.size > 0 or mask.bias.size > 0
        n = 0
        # -- sweep 1: P^T, dP^T and delta over the non-empty key tiles; dV += P^T dO --
        for kb in range(nK):
            kind = tiles[tb, th_, qb, kb]
            if kind == EMPTY:
                continue
            c0 = kb * BLOCK_N
            ncols = min(BLOCK_N, Lk - c0)
            st, dpt = pbuf[n], dpbuf[n]
            kbs[n] = kb
            n += 1
            pk = _addr(k) + ((b * Hkv + hk) * Lk + c0) * D * isz  # K_blk rows (ncols x D)
            pv = _addr(v) + ((b * Hkv + hk) * Lk + c0) * Dv * isz  # V_blk rows (ncols x Dv)
            # -- what the products walk into L2 (prefetcht1, _gemm_pf): this tile's values and dV rows, the
            # next non-empty tile's keys (after the last: tile 0's, where the next task starts) and kept-tile
            # slot; after the last tile, this tile's dK rows (sweep 2 starts with them) --
            kb2 = kb + 1
            while kb2 < nK and tiles[tb, th_, qb, kb2] == EMPTY:
                kb2 += 1
            last = kb2 >= nK
            if last:
                kb2 = 0
            pdv = _addr(dv_w) + ((b * Hkv + hk) * Lk + c0) * Dv * isz
            walk_s = (pv, np.intp(ncols * Dv * isz), _addr(k) + ((b * Hkv + hk) * Lk + kb2 * BLOCK_N) * D * isz,
                      np.intp(min(BLOCK_N, Lk - kb2 * BLOCK_N) * D * isz))
            walk_dp = (pdv, np.intp(ncols * Dv * isz), np.intp(0), np.intp(0))
            if last:
                walk_dv = (_addr(dk_w) + ((b * Hkv + hk) * Lk + c0) * D * isz, np.intp(ncols * D * isz), np.intp(0), np.intp(0))
            else:
                slot = np.intp(n * BLOCK_N * BLOCK_M * isz)
                walk_dv = (_addr(pbuf) + slot, np.intp(BLOCK_N * BLOCK_M * isz), _addr(dpbuf) + slot, np.intp(BLOCK_N * BLOCK_M * isz))
            # -- S^T = K_blk Q_blk^T (keys x queries), times the store factor (the scale unless a softcap
            # follows or the tile stays q.k: _raw_units) --
            if ALL_FEATURES and (split or wide):
                # fewer than 4 query rows (decoding, a ragged last block), or logits that may be large: the score
                # terms on zeros first, then q.k in float64 added (below), hi + lo in score units or s - row_max
                for j in range(ncols):
                    for i in range(nr):
                        st[j, i] = 0.0
            elif ALL_FEATURES and not scaled:
                # (the same with a softcap: float32 dot products, then the softcap in float64)
                for j in range(ncols):
                    for i in range(nr):
                        st[j, i] = _dot(pq + i * D * isz, pk + j * D * isz, D, st) if i < rows else 0.0
                if raw and store != 1.0:
                    for j in range(ncols):
                        for i in range(rows):
                            st[j, i] *= store
            else:
                _gemm_pf(pk, D, I1, _addr(qt), IM, _addr(st), IM, ncols, D, nr, qk_factor, qk_mode, walk_s, st)
            if ALL_FEATURES:
                if terms or kind == PARTIAL:
                    _score_terms_t(st, lo, wcap, rows, ncols, (scaled or raw or split) and softcap <= 0.0, b, h, qb, kb, kind, mask, opts,
                                   not split)
            elif kind == PARTIAL:
                # (a lean variant: _score_terms_t's only term is the element-wise mask)
                _mask_tile_t(st, rows, ncols, b, h, qb, kb, mask)
            if ALL_FEATURES and wide:
                _qk64_t(_addr(qt64), pk, ncols, D, nr, opts.qk_scale64, _addr(st), _addr(ref), _addr(tmax), st)
            elif ALL_FEATURES and split:
                _qk_split(pq, D, rows, pk, ncols, D, opts.qk_scale64, st, lo, True, mask.alibi, mask.q_pos_f,
                          mask.kv_pos_f, b, h, r0, c0)
            # (addresses taken where they are used: numba frees an array after the last use of its name,
            # and a raw address kept from earlier would point into freed memory)
            if ALL_FEATURES and lo.size > 0:
                # -- hi + lo: the exponent ((s - max) + lo) in float64, rounded once (cpu_flash's convention),
                # then taken against a max of 0 (m0) --
                _fold_lo(st, lo, ncols, rows, m_blk, m0, False)
            # -- dP^T = V_blk dO_blk^T --
            _gemm_pf(pv, Dv, I1, _addr(dot), IM, _addr(dpt), IM, ncols, Dv, nr, 1.0, MODE_STORE, walk_dp, dpt)
            # -- P^T = exp2((S^T - max) - log l); delta += rowsum(P * dP) --
            for g in range(0, nr, VW):
                pmg = (_addr(m0) if lo.size > 0 or wide else _addr(m_blk)) + g * isz
                _probs_lanes(_addr(st) + g * isz, _addr(dpt) + g * isz, BLOCK_M, pmg, _addr(lg_blk) + g * isz,
                             _addr(dl64) + g * 8, _addr(ps64) + g * 8, ncols, opts.exp_lo, cu, st)
            # -- dV += P^T dO --
            _gemm_pf(_addr(st), IM, I1, pdo, Dv, pdv, Dv, ncols, rows, Dv, 1.0, MODE_ADD, walk_dv, st)
            if ALL_FEATURES and softcap > 0.0 and small:
                for j in range(ncols):
                    for i in range(rows):
                        wkeep[n - 1, j, i] = wcap[j, i]
            elif ALL_FEATURES and softcap > 0.0:
                # -- the softcap's c (1 - tanh^2) multiplies dS: folded into the kept P^T --
                for j in range(ncols):
                    for i in range(rows):
                        st[j, i] *= wcap[j, i]
        for i in range(rows):
            if external:
                # a shard of the keys: only the whole row's delta, the caller's, is right
                dl64[i] = delta[b, h, r0 + i]
            elif normalize:
                # -- delta = rowsum(P dP) / rowsum(P) (with a sink: + its p): P's rounding leaves the sum
                # 1 + a few ulp, which would stay in every dP - delta (rows of a few keys: dP - delta
                # cancels, up to 100x the reference's error) --
                den = ps64[i] + (sink_p[b, h, r0 + i] if sink_p.shape[2] > 0 else 0.0)
                if den > 0.0:
                    dl64[i] = dl64[i] / den
        # -- sweep 2: dS^T = P^T (dP^T - delta); dK += dS^T Q, dQ += dS K; last kept tile first (the
        # most recently written are the likeliest still in L2) --
        for u in range(n - 1, -1, -1):
            c0 = kbs[u] * BLOCK_N
            ncols = min(BLOCK_N, Lk - c0)
            st, dpt = pbuf[u], dpbuf[u]
            if ALL_FEATURES and small:
                # -- fewer than 4 rows (decoding): dS = P (dP - delta) w and dQ += dS K in float64 (rows of
                # two keys whose dS_j k_j cancel kept ~1.5 ulp of the terms from a float32 dS; cheap here) --
                _small_ds_dq(st, dpt, wkeep, u, softcap > 0.0, dl64, dq64, k, b, hk, c0, ncols, rows)
            else:
                for g in range(0, nr, VW):
                    _ds_lanes(_addr(st) + g * isz, _addr(dpt) + g * isz, BLOCK_M, _addr(dl64) + g * 8, ncols, st)
            pk = _addr(k) + ((b * Hkv + hk) * Lk + c0) * D * isz
            # -- walked into L2: this tile's keys and the next kept tile's dK rows during dK, its P^T and dP^T
            # during dQ --
            walk_dk = (pk, np.intp(ncols * D * isz), np.intp(0), np.intp(0))
            walk_dq = (np.intp(0), np.intp(0), np.intp(0), np.intp(0))
            if u > 0:
                c2 = kbs[u - 1] * BLOCK_N
                walk_dk = (pk, np.intp(ncols * D * isz), _addr(dk_w) + ((b * Hkv + hk) * Lk + c2) * D * isz,
                           np.intp(min(BLOCK_N, Lk - c2) * D * isz))
                slot = np.intp((u - 1) * BLOCK_N * BLOCK_M * isz)
                walk_dq = (_addr(pbuf) + slot, np.intp(BLOCK_N * BLOCK_M * isz), _addr(dpbuf) + slot, np.intp(BLOCK_N * BLOCK_M * isz))
            _gemm_pf(_addr(dpt), IM, I1, pq, D, _addr(dk_w) + ((b * Hkv + hk) * Lk + c0) * D * isz, D, ncols, rows, D,
                     1.0, MODE_ADD, walk_dk, st)
            if not small:
                # (dS^T read through the A strides)
                _gemm_pf(_addr(dpt), I1, IM, pk, D, _addr(dq_acc), D, rows, ncols, D, 1.0, MODE_ADD, walk_dq, st)
        dscale = opts.dscale
        if ALL_FEATURES and small:
            for i in range(rows):
                for d in range(D):
                    dq[b, h, r0 + i, d] = dq64[i, d] * np.float64(dscale)
        else:
            for i in range(rows):
                for d in range(D):
                    dq[b, h, r0 + i, d] = dq_acc[i, d] * dscale
        counts[t] = n
        if per > 0 and (t + 1) % per == 0:
            _scale_head(dk_w, t // per, opts.dscale)
        t += 1
    _mxcsr_set(old)


# -- launcher ------------------------------------------------------------------------------------


def serves(q) -> bool:
    """Whether :func:`launch_backward` takes this call: float32 compute (float64 keeps cpu_flash's
    two passes)."""
    return q.dtype != torch.float64


#: launch_backward's ``sinks`` when the caller does not say whether the forward had sinks: delta is
#: then rowsum(P dP) as it is (not divided by the row's total probability, which a sink changes)
SINKS_UNKNOWN = object()


def launch_backward(grad_out, q, k, v, out, row_max, row_log, call, delta=None, sinks=SINKS_UNKNOWN):
    """``backends.cpu._launch_backward`` for float32 compute (float32, float16 and bfloat16 inputs):
    (dq, dk, dv) in the inputs' dtypes, from the lse halves (sink included, when there is one).

    delta = rowsum(P * dP) / (rowsum(P) + p_sink) in float64 within each query block's first sweep
    (``sinks``: the forward's (Hq,) sink logits, or None; ``SINKS_UNKNOWN``: no division), unless
    given (``shard_backward``: the whole row's, used as it is). ``out`` is unused."""
    _cpu, _k, _fwd = _fwd_src._backend(), _flash_src, _fwd_src  # (module attributes: tests patch them)
    acc = torch.float32
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    mask = _cpu._kernel_mask(call.low, acc)
    opts = _cpu._opts(acc, call)
    qn, kn, vn, don, row_max, row_log = (_cpu._ready(t, acc).numpy() for t in (q, k, v, grad_out, row_max, row_log))
    if delta is not None:
        delta = _cpu._ready(delta, acc).numpy()
    else:
        delta = _NO_DELTA.get((B, Hq))
        if delta is None:
            delta = _NO_DELTA[(B, Hq)] = np.empty((B, Hq, 0), np.float32)
    normalize = sinks is not SINKS_UNKNOWN
    if normalize and sinks is not None:
        # p of the sink per row, from the full lse halves: exp2(sink_u - row_max - row_log)
        sink_u = sinks.detach().double()[None, :, None] * float(opts.units)  # (1, Hq, 1) score units
        rm, rl = torch.from_numpy(row_max).double(), torch.from_numpy(row_log).double()  # (B, Hq, Lq)
        sink_p = torch.exp2(sink_u - rm - rl).numpy()  # (B, Hq, Lq)
    else:
        sink_p = _NO_SINK.get((B, Hq))
        if sink_p is None:
            sink_p = _NO_SINK[(B, Hq)] = np.empty((B, Hq, 0), np.float64)
    dq = torch.empty(B, Hq, Lq, D, dtype=acc)
    dk = torch.zeros(B, Hkv, Lk, D, dtype=acc)
    dv = torch.zeros(B, Hkv, Lk, Dv, dtype=acc)
    counts = np.zeros(B * Hq * (-(-Lq // BLOCK_M)), np.int64)  # one per task
    threads = _cpu._threads(len(counts), 10.0 * B * Hq * Lq * Lk * D)
    # a ragged last block of < 4 rows: hi + lo scores where cpu_fwd's forward takes them so (SPLIT_SMALL)
    split_ragged = bool(getattr(_fwd, "SPLIT_SMALL", False))
    # tasks of >= 4 rows: float64 scores where cpu_fwd's forward takes them (SPLIT_TILES; then
    # cpu_flash._split_tiles decides, for both)
    split_tiles = bool(getattr(_fwd, "SPLIT_TILES", False))
    if split_tiles:
        opts = opts._replace(k_norm=_k.max_key_norm(kn))  # as cpu_fwd's launcher puts it
    args = (qn, kn, vn, don, row_max, row_log, delta, sink_p, normalize, bool(getattr(_k, "FOLD_LO", False)),
            split_ragged, split_tiles)
    kernel = flash_bwd_t
    if _k.lean_call(args[0], mask, opts):
        kernel = _k.lean_variant(kernel)  # compiled without the features this call does not use
    per = (Hq // Hkv) * (-(-Lq // BLOCK_M))  # tasks per kv head
    T = len(counts)
    if threads <= 1:
        # one worker, in the calling thread, whole kv heads in order: its accumulators are dk and dv (zeroed above)
        _cpu._run(kernel, *args, dk.numpy(), dv.numpy(), dq.numpy(), counts, mask, opts, 0, T, 0, 1, per, NO_COUNTER)
    elif (B * Hkv) % threads == 0:
        # whole kv heads from a shared counter: each dK/dV row has one writer, no copies to sum
        call = args + (dk.numpy(), dv.numpy(), dq.numpy(), counts, mask, opts, 0, T, 0, 1, per, np.zeros(1, np.int64))
        _cpu._on_threads([(_cpu._entry(kernel, call), call)] * threads)
    else:
        # the snake, each worker into its own dK/dV copy, then the copies summed in worker order (rows split
        # over the threads): deterministic, whatever thread runs which share
        dk_w = np.zeros((threads, B, Hkv, Lk, D), np.float32)
        dv_w = np.zeros((threads, B, Hkv, Lk, Dv), np.float32)
        calls = [args + (dk_w[w], dv_w[w], dq.numpy(), counts, mask, opts, 0, T, w, threads, 0, NO_COUNTER) for w in range(threads)]
        entry = _cpu._entry(kernel, calls[0])
        _cpu._on_threads([(entry, call) for call in calls])
        R = B * Hkv * Lk
        dkw2, dvw2 = dk_w.reshape(threads, R, D), dv_w.reshape(threads, R, Dv)
        dk2, dv2 = dk.numpy().reshape(R, D), dv.numpy().reshape(R, Dv)
        chunk = -(-R // threads)
        sums = [(dkw2, dvw2, dk2, dv2, opts.dscale, w * chunk, min(R, (w + 1) * chunk)) for w in range(threads)]
        entry = _cpu._entry(finish_kv, sums[0])
        _cpu._on_threads([(entry, call) for call in sums])
    tiles = _cpu._tiles(counts)
    _cpu.TILE_PRODUCTS["backward_one_pass"] += tiles
    CALLS["calls"] += 1
    CALLS["tiles"] += tiles
    return _cpu._as(dq, q.dtype), _cpu._as(dk, k.dtype), _cpu._as(dv, v.dtype)


_NO_DELTA: dict = {}  # empty (B, Hq, 0) arrays: "no delta given"
_NO_SINK: dict = {}  # empty (B, Hq, 0) arrays: "no sink"

stamp_sources(globals(), _flash_src, _fwd_src)  # the kernels compile these modules' numba functions into themselves
