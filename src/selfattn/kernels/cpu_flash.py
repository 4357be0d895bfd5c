"""Fused flash-attention kernels for the CPU, written in numba (issues 5, 11, 12).

The algorithm
-------------
Queries are cut into blocks of BLOCK_M rows and keys into blocks of BLOCK_N; a *tile* is one
(query block, key block) pair, a BLOCK_M x BLOCK_N block of the score matrix that exists only
in a per-thread buffer. Nothing of size Lq x Lk is ever stored.

A tile holds, for query rows i and keys j of its blocks, the logit in *score units*::

    s[i, j] = softcap(q_i . k_j * scale) - slope_h * |q_pos[i] - kv_pos[j]| + bias[i, j]
              (-inf where the mask rules the pair out)

In float32 a score unit is log2(e) nats (the factor is folded into the scale, the softcap, the
ALiBi slope and the bias; without those terms a float32 tile keeps q.k itself and the softmax scales
each difference s - max instead: ``_raw_units``), so every exponential is an exp2, computed in float32 by a polynomial
written as vector IR (``_exp2_ir``, within 1 ulp); float64 keeps nats and calls libm. ``make_opts``
fixes the units of a call. The tile products, the row max and the exp2 row loop are LLVM IR of the
host's vector width (AVX-512 or AVX2, ``VEC_BYTES``), not left to LLVM's auto-vectoriser.

The mask arrives lowered (``selfattn.lowering.lower``, converted by the backend into a
:class:`KernelMask`): a tile map says whether each tile is EMPTY (skipped: never loaded, never
multiplied), FULL (computed with no masking at all) or PARTIAL (the element-wise tests run:
the band -left <= kv_pos - q_pos <= right, padding lengths, key_padding's keep bits, document
ids, dense bool bits, and the bits of a mask function's partial tile). ALiBi and a float bias
are added in every computed tile.

**Forward (online softmax)**, one task per (batch, head, query block), over its non-empty key
tiles in order, with a running max m, sum l and accumulator acc per row::

    s      = the tile's logits                       (BLOCK_M x BLOCK_N)
    m_new  = max(m, rowmax(s))
    p      = exp2(s - m_new)
    alpha  = exp2(m - m_new)                         -- rescale what was summed before
    l      = alpha * l + rowsum(p)
    acc    = alpha * acc + p @ v_tile                (the tile's share computed apart, then added)
    ...
    out    = acc / l;  lse = m + log2(l)   (kept as the two halves row_max = m, row_log = log2 l)

With statistics the same sweep keeps sum p * (s - m) for the entropy (H = ln l - sum p (s-m) / l).

**Backward**, from the saved halves of the lse: P = exp2((s - row_max) - row_log) is recomputed
exactly per tile, dP = dO V^T, and dS = P * (dP - delta) with delta = rowsum(P * dP). Two passes:

1. ``flash_bwd_q``, one task per (batch, head, query block) over key tiles: with the shift
   c = rowsum(dO * O) (delta up to the output's rounding) it sums (P * (dP - c)) K, P K and
   rowsum(P * dP) in one sweep; then dQ = (P(dP - c)) K - (delta - c) P K, exact, and delta
   is left for pass 2.
2. ``flash_bwd_kv``, one task per (batch, kv head, key block) over every query tile of the
   head group: dV += P^T dO, dK += dS^T Q.

When all keys fit one block (Lk <= BLOCK_N) ``flash_bwd_kv`` alone is the whole backward: delta
is complete within its tile, and it writes dQ = dS K too.

Working set and accounting
--------------------------
Per thread, in the compute dtype: the tile buffers s, p (and dP in the backward, tanh(u) with a
softcap) of BLOCK_M x BLOCK_N each, the accumulators (BLOCK_M x Dv for the output, BLOCK_N x D and
BLOCK_N x Dv for dK/dV, 2 x BLOCK_M x D for dQ) and a transposed key (value) block of D x BLOCK_N:
in float32 with D = 64 about 80 KiB (forward) to 130 KiB (backward), inside the L2 cache.

FLOPs per computed tile (r rows, c keys): forward 2rcD (Q K^T) + 2rcDv (P V) + ~10rc (exp2 and
rescaling); ``flash_bwd_q`` 2rcD + 2rcDv + 4rcD (Q K^T, dO V^T, two products with K);
``flash_bwd_kv`` 2rcD + 4rcDv + 2rcD (Q K^T, P^T dO, dO V^T, dS^T Q), + 2rcD for dQ in one-pass
mode. DESIGN.md's count (4 BHLqLkD forward, x2.5 for the backward) is the textbook flash
backward; this two-pass one does 8/5 of its backward products to avoid atomics. Costs follow
the number of non-empty tiles, not Lq x Lk.

Memory: K and V are read once per query block (BLOCK_M / 2 = 32 flops per float32 byte in the
forward), Q once per key block in ``flash_bwd_kv``. Extra memory is O(L): the output, the two
lse halves and the entropy per row, K^T (and V^T) copies, delta; the lowered mask adds one byte
per tile (plus, for a mask function, BLOCK_M x BLOCK_N bytes per partial tile).

Every parallel task owns the outputs it writes, so results are bit-identical run to run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from llvmlite.binding import llvm_version_info
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.registry import CPUDispatcher as Dispatcher
from numba.extending import intrinsic, overload

BLOCK_M = 64  # query rows per tile
BLOCK_N = 64  # keys per tile
EMPTY, PARTIAL, FULL = 0, 1, 2  # selfattn.masks.TileKind values
# The softcap's hi/lo convention (``_softcap_tile``): every forward keeps each softcapped logit as
# hi + lo and takes its exponents against an anchor, row_log = log2(l) + lo_m; every backward takes
# P = exp2(((s - row_max) + lo) - row_log). Read at call time (KernelOpts.fold_lo, cpu_bwd's launcher),
# so forward and backward always agree (cpu_fwd: _softmax_lo_t; cpu_bwd and cpu_flash: _fold_lo). Off:
# each softcapped logit is rounded once and lo ignored (rows of a few saturated keys then missed STYLE
# rule 6 by up to 5x: test_cpu_kernel.test_softcap_saturated_few_keys).
FOLD_LO = True
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
UNBOUNDED = 1 << 40  # a window side with no bound (KernelMask.win_left / win_right)
# no "nnan"/"ninf": masked scores are -inf and must stay so
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# no "reassoc" where the order of operations is the point: (s - max) - log l must not become
# s - (max + log l)
FASTMATH_EXACT = {"nsz", "arcp", "contract", "afn"}

# -- the two records every kernel takes ------------------------------------------------------------


class KernelMask(NamedTuple):
    """One call's lowered mask as numpy arrays (``selfattn.lowering.LoweredMask``, converted by the
    backend). An absent part is an empty array of the same rank, so every call compiles alike."""

    tiles: np.ndarray  # int8 (B|1, H|1, nQ, nK): TileKind per (query block, key block)
    q_pos: np.ndarray  # int64 (B|1, Lq): query positions
    kv_pos: np.ndarray  # int64 (B|1, Lk): key positions
    banded: bool  # the band test below applies (causal or a window)
    win_left: int  # band: kv_pos - q_pos >= -win_left (UNBOUNDED: no bound)
    win_right: int  # band: kv_pos - q_pos <= win_right (causal: 0)
    kv_lens: np.ndarray  # int64 (B|1,): key j is real when j < kv_lens[b]; (0,) = none
    q_lens: np.ndarray  # int64 (B|1,): query i is real when i < q_lens[b]; (0,) = none
    kv_keep: np.ndarray  # uint8 (B|1, Lk): key_padding's keep bits; (0, 0) = none
    q_ids: np.ndarray  # int64 (ND, B|1, Lq): document ids of the queries; ND = 0: none
    kv_ids: np.ndarray  # int64 (ND, B|1, Lk): ... and of the keys (equal ids attend)
    allow: np.ndarray  # uint8 flat: dense bool masks AND-ed; (0,) = none
    allow_strides: np.ndarray  # int64 (4,): element strides of allow over (b, h, i, j); 0 broadcasts
    bias: np.ndarray  # compute dtype, flat: dense float masks summed, in score units; (0,) = none
    bias_strides: np.ndarray  # int64 (4,)
    fn_index: np.ndarray  # int32 (B|1, H|1, nQ, nK): index into fn_bits of a partial function tile, -1: allows all
    fn_bits: np.ndarray  # uint8 (nP, BLOCK_M, BLOCK_N): the mask function's bits in its partial tiles
    alibi: np.ndarray  # compute dtype (B|1, Hq): ALiBi slopes in score units; (0, 0) = none
    q_pos_f: np.ndarray  # compute dtype (B|1, Lq): q_pos as floats, for ALiBi (exact below 2**24)
    kv_pos_f: np.ndarray  # compute dtype (B|1, Lk)


class KernelOpts(NamedTuple):
    """The scalar options of a call, each in the compute dtype (so float32 math never widens)."""

    qk_scale: float  # q.k -> score units: scale*log2(e) in base 2, scale in nats; scale/c with a softcap (u)
    softcap_u: float  # the softcap c in score units; 0: none
    qk_scale64: float  # qk_scale in float64: with a softcap u and tanh(u) are computed in float64
    softcap_u64: float  # the same in float64: c tanh(u) is rounded once from the exact product (a float32
    #                     c*log2(e) would scale every logit by one shared rounding, up to 4e-6 at c = 25)
    softcap: float  # c in nats (the backward's dS factor c (1 - tanh(u)^2)); 0: none
    dscale: float  # d(nat logit)/d(q.k) apart from that factor: scale, or scale / c with a softcap
    units: float  # score units per nat: log2(e) in base 2, else 1
    nat: float  # nats per score unit: ln 2 in base 2, else 1
    exp_lo: float  # -126: exp2 of anything lower is flushed to 0 (float32's smallest normal)
    half: float  # 0.5
    zero: float  # 0.0
    base2: bool  # float32: base-2 scores, polynomial exp2; float64: nats and libm exp
    want_stats: bool  # also keep sum p (s - m) for the entropy
    fold_lo: bool  # a softcap's logits are kept as hi + lo and exponents taken against an anchor (FOLD_LO)
    k_norm: float  # max_j |k_j| over the call's keys, float64 (max_key_norm; _split_tiles); 0: never float64 tiles


def make_opts(dtype, scale: float, softcap: float, want_stats: bool, k_norm: float = 0.0) -> KernelOpts:
    """The :class:`KernelOpts` of a call in ``dtype`` (np.float32: base 2; np.float64: nats).
    ``softcap`` 0 means none; ``k_norm``: :func:`max_key_norm` of the keys (0: the float32 tiles throughout)."""
    base2 = dtype == np.float32
    per_nat = LOG2E if base2 else 1.0
    qk_scale = scale * per_nat if softcap <= 0.0 else scale / softcap
    f = dtype
    return KernelOpts(
        qk_scale=f(qk_scale), qk_scale64=np.float64(qk_scale), softcap_u=f(softcap * per_nat if softcap > 0.0 else 0.0),
        softcap_u64=np.float64(softcap * per_nat if softcap > 0.0 else 0.0), softcap=f(max(softcap, 0.0)),
        dscale=f(scale if softcap <= 0.0 else scale / softcap), units=f(per_nat), nat=f(LN2 if base2 else 1.0),
        exp_lo=f(-126.0), half=f(0.5), zero=f(0.0), base2=bool(base2), want_stats=bool(want_stats),
        fold_lo=bool(FOLD_LO), k_norm=np.float64(k_norm),
    )


# -- block products (C-contiguous blocks; the innermost loop is the vectorised one) ----------


@njit(fastmath=FASTMATH, cache=True)
def _load_t(x, c0, ncols, buf):
    # buf[:, :ncols] = x[c0:c0 + ncols, :]^T      x (L, d), buf (d, BLOCK_N)
    for j in range(ncols):
        for d in range(x.shape[1]):
            buf[d, j] = x[c0 + j, d]


NAN_BITS = 0xFFFF  # the bfloat16 bits torch's vectorised CPU conversion writes for every NaN


@intrinsic
def _f32_bits(typingctx, x):
    # the bits of a float32 as a uint32
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit(cache=True)
def _rne(x):
    # float32 -> bfloat16 bits, round to nearest even (ties to the even 16-bit pattern); NaN -> 0xFFFF.
    # One select, no branch: the loops storing a row of it vectorise
    u = _f32_bits(x)
    r = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    return np.uint16(NAN_BITS) if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else r


def _put(out, b, h, i, d, x):
    """out[b, h, i, d] = x: stored as is in a float array, rounded to bfloat16 bits in a uint16 one."""


@overload(_put)
def _put_impl(out, b, h, i, d, x):
    if isinstance(out.dtype, types.Float):
        def put(out, b, h, i, d, x):
            out[b, h, i, d] = x
        return put
    if out.dtype == types.uint16:
        def put_bf16(out, b, h, i, d, x):
            out[b, h, i, d] = _rne(np.float32(x))
        return put_bf16
    return None


def _ptr(bits):
    # name mangling of the pointer argument of llvm.masked.*: opaque "p0" since LLVM 15, "p0v16f32" before
    return "p0" if llvm_version_info[0] >= 15 else "p0" + bits


def _host_vector_bytes() -> int:
    # the widest vectors the host computes with: 64 bytes with AVX-512F, else 32 (AVX2). numba
    # compiles for the host (and its cache is keyed by the host CPU), so this is decided per machine.
    # SELFATTN_CPU_VECTOR_BYTES=32 forces the AVX2 layout (for testing it on an AVX-512 host; use a
    # separate NUMBA_CACHE_DIR then: numba's cache does not key on this choice)
    import os

    if os.environ.get("SELFATTN_CPU_VECTOR_BYTES") == "32":
        return 32
    try:
        from llvmlite import binding as llvm

        features = llvm.get_host_cpu_features()
    except Exception:  # a CPU llvmlite cannot describe: the narrower choice is correct everywhere
        return 32
    return 64 if features.get("avx512f") else 32


VEC_BYTES = _host_vector_bytes()  # 64: 32 zmm registers; 32: 16 ymm registers


class _Exact:
    """An IRBuilder whose float operations carry an explicit "nsz" flag. numba's fastmath pass
    flags every float operation that has none with the function's fastmath set -- also the IR an
    intrinsic emits into a fastmath function -- and with "reassoc" LLVM rewrote (s - m) - lg as
    s - (m + lg), which loses lg next to a large m. A flagged operation is left as written."""

    def __init__(self, builder):
        self._builder = builder

    def __getattr__(self, name):
        return getattr(self._builder, name)

    @staticmethod
    def _flag(instr):
        instr.flags.append("nsz")
        return instr

    def fadd(self, *args, **kw):
        return self._flag(self._builder.fadd(*args, **kw))

    def fsub(self, *args, **kw):
        return self._flag(self._builder.fsub(*args, **kw))

    def fmul(self, *args, **kw):
        return self._flag(self._builder.fmul(*args, **kw))

    def fcmp_ordered(self, *args, **kw):
        return self._flag(self._builder.fcmp_ordered(*args, **kw))


def _prefetch(builder, address, locality):
    """Emit a prefetch hint (read, data cache) for the line at integer ``address``: locality 3 brings
    it toward L1 (prefetcht0), 2 toward L2 (prefetcht1). It never faults, also past an array's end."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0" if llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8")
    builder.call(fn, [builder.inttoptr(address, i8p), ir.Constant(i32, 0), ir.Constant(i32, locality), ir.Constant(i32, 1)])


class _Vectors:
    """What the IR generators below share: one host vector of the element type (AVX-512: 16
    float32 or 8 float64 lanes; AVX2: 8 or 4), its masked load/store, FMA, floor and max
    intrinsics, and address arithmetic on raw element addresses."""

    def __init__(self, context, builder, elem):
        self.builder = builder
        self.fty = context.get_value_type(elem)
        self.f32 = self.fty == ir.FloatType()
        esize = 4 if self.f32 else 8
        self.width = VEC_BYTES // esize
        self.i32, self.i64 = ir.IntType(32), ir.IntType(64)
        self.vty = ir.VectorType(self.fty, self.width)
        self.vptr, self.sptr = ir.PointerType(self.vty), ir.PointerType(self.fty)
        bits = "v%df%d" % (self.width, 8 * esize)
        mty = ir.VectorType(ir.IntType(1), self.width)
        mod = builder.module
        self.mload = cgutils.get_or_insert_function(
            mod, ir.FunctionType(self.vty, [self.vptr, self.i32, mty, self.vty]), f"llvm.masked.load.{bits}.{_ptr(bits)}")
        self.mstore = cgutils.get_or_insert_function(
            mod, ir.FunctionType(ir.VoidType(), [self.vty, self.vptr, self.i32, mty]), f"llvm.masked.store.{bits}.{_ptr(bits)}")
        self.fma = cgutils.get_or_insert_function(mod, ir.FunctionType(self.vty, [self.vty] * 3), f"llvm.fma.{bits}")
        self.align, self.zero = ir.Constant(self.i32, 4), ir.Constant(self.vty, None)
        self.esize = ir.Constant(self.i64, esize)
        self.lanes = ir.Constant(ir.VectorType(self.i32, self.width), list(range(self.width)))

    def const(self, n):
        return ir.Constant(self.i64, n)

    def splat(self, x, ty=None):
        # a vector with x in every lane
        b = self.builder
        ty = self.fty if ty is None else ty
        v = b.insert_element(ir.Constant(ir.VectorType(ty, self.width), None), x, ir.Constant(self.i32, 0))
        return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(self.i32, self.width), [0] * self.width))

    def lanes_below(self, n):
        # the lane mask "lane < n" (n an i64, clamped to [0, width]): masks the loads and stores
        # past a row's end (i32 lanes: one compare per mask)
        b = self.builder
        n = b.select(b.icmp_signed("<", n, self.const(0)), self.const(0), n)
        n = b.select(b.icmp_signed(">", n, self.const(self.width)), self.const(self.width), n)
        return b.icmp_signed("<", self.lanes, self.splat(b.trunc(n, self.i32), self.i32))

    def at(self, base, off, ty):
        # typed pointer to element `off` after raw address `base`
        b = self.builder
        return b.inttoptr(b.add(base, b.mul(off, self.esize)), ty)

    def load(self, base, off, mask=None):
        # one vector at element `off` (masked lanes read as 0 and touch no memory)
        if mask is None:
            return self.builder.load(self.at(base, off, self.vptr), align=4)
        return self.builder.call(self.mload, [self.at(base, off, self.vptr), self.align, mask, self.zero])

    def store(self, x, base, off, mask=None):
        if mask is None:
            self.builder.store(x, self.at(base, off, self.vptr), align=4)
        else:
            self.builder.call(self.mstore, [x, self.at(base, off, self.vptr), self.align, mask])

    def _tree(self, v, combine):
        # the lanes of v folded as a fixed tree: halves combined until one lane is left
        b = self.builder
        half = self.width
        while half > 1:
            half //= 2
            lo = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(self.i32, half), list(range(half))))
            hi = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(self.i32, half), list(range(half, 2 * half))))
            v = combine(lo, hi)
        return b.extract_element(v, ir.Constant(self.i32, 0))

    def hsum(self, v):
        # the lanes of v summed in a fixed order
        return self._tree(v, self.builder.fadd)

    def hmax(self, v):
        # the largest lane of v (an ordered compare: NaN lanes lose, as in the scalar loop)
        b = self.builder
        return self._tree(v, lambda lo, hi: b.select(b.fcmp_ordered(">", hi, lo), hi, lo))


# -- exp2 in float32 ----------------------------------------------------------------------------
# 2**x for -126 <= x <= 0 (the softmax's range; below it the kernels flush to 0), all in float32:
# x = n + f with n = floor(x + 1/2) and f in [-1/2, 1/2] (both exact), a degree-6 polynomial in f
# (Horner, FMAs) and 2**n from its exponent bits. Within 1 ulp (tests/test_exp2.py measures it).
# Least squares on Chebyshev nodes, weighted to the relative error, rounded to float32.
_F = np.cos(np.pi * (np.arange(256) + 0.5) / 256) / 2
_EXP2_COEFFS = [float(np.float32(c)) for c in np.polynomial.polynomial.polyfit(_F, np.exp2(_F), 6, w=1.0 / np.exp2(_F))]


def _exp2_ir(builder, x, width):
    # 2**x of a float32 value (width 0) or of a <width x float> vector, as IR
    mod = builder.module
    fty = ir.FloatType() if width == 0 else ir.VectorType(ir.FloatType(), width)
    ity = ir.IntType(32) if width == 0 else ir.VectorType(ir.IntType(32), width)
    name = "f32" if width == 0 else f"v{width}f32"

    def const(value, ty):
        return ir.Constant(ty, value) if width == 0 else ir.Constant(ty, [value] * width)

    floor = cgutils.get_or_insert_function(mod, ir.FunctionType(fty, [fty]), f"llvm.floor.{name}")
    fma = cgutils.get_or_insert_function(mod, ir.FunctionType(fty, [fty] * 3), f"llvm.fma.{name}")
    n = builder.call(floor, [builder.fadd(x, const(0.5, fty))])
    f = builder.fsub(x, n)
    y = const(_EXP2_COEFFS[6], fty)
    for c in reversed(_EXP2_COEFFS[:6]):
        y = builder.call(fma, [y, f, const(c, fty)])
    e = builder.shl(builder.add(builder.fptosi(n, ity), const(127, ity)), const(23, ity))
    return builder.fmul(y, builder.bitcast(e, fty))


@intrinsic
def _exp2f(typingctx, x):
    # 2**x of one float32 (the same IR as the row loops' vectors; tests/test_exp2.py)
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        builder = _Exact(builder)
        return _exp2_ir(builder, args[0], 0)

    return types.float32(types.float32), codegen


@njit(cache=True)
def _exp2(xc, half):
    # 2**xc for a float32 -126 <= xc <= 0 (`half` unused: kept for the callers' signature)
    return _exp2f(np.float32(xc))


@intrinsic
def _vec_row_max(typingctx, ps, nc, like):
    # the largest of the nc elements at raw address ps (nc a multiple of 16, > 0): one vector compare
    # per vector, then the lanes; NaN elements never win (the caller checks for them apart)
    if not (isinstance(like, types.Array) and isinstance(like.dtype, types.Float)):
        return None
    sig = like.dtype(types.intp, types.intp, like)

    def codegen(context, builder, signature, args):
        builder = _Exact(builder)
        ps, nc, _ = args
        vec = _Vectors(context, builder, signature.args[-1].dtype)
        c = vec.const
        entry = builder.block
        loop = builder.append_basic_block("rmax.loop")
        done = builder.append_basic_block("rmax.done")
        first = vec.load(ps, c(0))
        builder.cbranch(builder.icmp_signed(">", nc, c(vec.width)), loop, done)
        builder.position_at_end(loop)
        j = builder.phi(vec.i64)
        m = builder.phi(vec.vty)
        x = vec.load(ps, j)
        new = builder.select(builder.fcmp_ordered(">", x, m), x, m)
        nxt = builder.add(j, c(vec.width))
        j.add_incoming(c(vec.width), entry)
        j.add_incoming(nxt, loop)
        m.add_incoming(first, entry)
        m.add_incoming(new, loop)
        builder.cbranch(builder.icmp_signed("<", nxt, nc), loop, done)
        builder.position_at_end(done)
        fin = builder.phi(vec.vty)
        fin.add_incoming(first, entry)
        fin.add_incoming(new, loop)
        return vec.hmax(fin)

    return sig, codegen


def _exp2_row_ir(context, builder, signature, ps, pp, nc, m, cu, lg, lo, pstat):
    # the loop of _vec_exp2_row (cu None) and _vec_exp2_row_c: p = 2**(((s - m) [* cu]) - lg)
    builder = _Exact(builder)
    vec = _Vectors(context, builder, signature.args[-1].dtype)
    c = vec.const
    if not vec.f32:
        exp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec.vty, [vec.vty]),
                                             f"llvm.exp.v{vec.width}f64")
        lo = ir.Constant(vec.fty, float("-inf"))
    mv, lgv, lov = vec.splat(m), vec.splat(lg), vec.splat(lo)
    cuv = None if cu is None else vec.splat(cu)
    want = builder.icmp_signed("!=", pstat, c(0))
    entry = builder.block
    loop = builder.append_basic_block("exp2.loop")
    done = builder.append_basic_block("exp2.done")
    builder.position_at_end(loop)
    j = builder.phi(vec.i64)
    tot = builder.phi(vec.vty)
    st = builder.phi(vec.vty)
    x = builder.fsub(vec.load(ps, j), mv)
    if cuv is not None:
        x = builder.fmul(x, cuv)
    x = builder.fsub(x, lgv)
    if vec.f32:
        below = builder.fcmp_ordered("<", x, lov)
        xc = builder.select(below, lov, x)
        p = builder.select(below, vec.zero, _exp2_ir(builder, xc, vec.width))
    else:
        below = builder.fcmp_ordered("==", x, lov)
        xc = builder.select(below, vec.zero, x)
        p = builder.select(below, vec.zero, builder.call(exp, [xc]))
    vec.store(p, pp, j)
    new_tot = builder.fadd(tot, p)
    new_st = builder.select(want, builder.call(vec.fma, [p, xc, st]), st)
    nxt = builder.add(j, c(vec.width))
    j.add_incoming(c(0), entry)
    j.add_incoming(nxt, loop)
    tot.add_incoming(vec.zero, entry)
    tot.add_incoming(new_tot, loop)
    st.add_incoming(vec.zero, entry)
    st.add_incoming(new_st, loop)
    builder.cbranch(builder.icmp_signed("<", nxt, nc), loop, done)
    builder.position_at_end(entry)
    builder.branch(loop)
    builder.position_at_end(done)
    with builder.if_then(want):
        builder.store(vec.hsum(new_st), builder.inttoptr(pstat, vec.sptr))
    return vec.hsum(new_tot)


@intrinsic
def _vec_exp2_row(typingctx, ps, pp, nc, m, lg, lo, pstat, like):
    # p = 2**((s - m) - lg) for the nc elements at ps into pp (nc a multiple of 16), 0 where the
    # exponent is below lo (NaN stays NaN); returns sum p, and stores sum p * (s - m - lg) (the
    # exponent, clamped at lo) at raw address pstat unless it is 0. Sums in a fixed order.
    # float64 (nats, for checking): p = exp((s - m) - lg) by libm, 0 at -inf only (lo unused)
    if not (isinstance(like, types.Array) and isinstance(like.dtype, types.Float)):
        return None
    f = like.dtype
    sig = f(types.intp, types.intp, types.intp, f, f, f, types.intp, like)

    def codegen(context, builder, signature, args):
        ps, pp, nc, m, lg, lo, pstat, _ = args
        return _exp2_row_ir(context, builder, signature, ps, pp, nc, m, None, lg, lo, pstat)

    return sig, codegen


@intrinsic
def _vec_exp2_row_c(typingctx, ps, pp, nc, m, cu, lg, lo, pstat, like):
    # _vec_exp2_row with the exponent ((s - m) * cu) - lg: s in units of 1/cu score units
    # (_raw_units), the difference exact near the max, one rounding after
    if not (isinstance(like, types.Array) and isinstance(like.dtype, types.Float)):
        return None
    f = like.dtype
    sig = f(types.intp, types.intp, types.intp, f, f, f, f, types.intp, like)

    def codegen(context, builder, signature, args):
        ps, pp, nc, m, cu, lg, lo, pstat, _ = args
        return _exp2_row_ir(context, builder, signature, ps, pp, nc, m, cu, lg, lo, pstat)

    return sig, codegen


# A register-blocked micro-kernel, written as LLVM IR: LLVM will not keep a loop's accumulators
# in registers across the reduction when it cannot prove the output does not alias the inputs,
# and then every FMA pays a store. Here MR rows x TILE_N columns of C live in vector registers for
# the whole reduction (AVX-512, float32: 6 x 4 x <16 x float> = 24 of the 32 registers; AVX2:
# 6 x 2 x <8 x float> = 12 of 16); C is written once per call, in one of three modes:
#   STORE: c = scale * (a @ b)     ADD: c += a @ b     RESCALE: c = alpha[row] * c + a @ b
# (each tile's share is summed apart and then added: rounding grows with the number of tiles, not
# of keys). In float32 a call with fewer columns runs a copy of the loop with only as many vectors
# as it needs (head dim 32 = 2 vectors, 48 keys = 3); only the last vector of a row is masked.
NV_MAX = 4 if VEC_BYTES == 64 else 2  # float32 vectors per row of C
TILE_N = NV_MAX * VEC_BYTES // 4  # most columns of C per micro-kernel call: 64 (AVX-512), 16 (AVX2)
MR_MAX = 6  # rows of C per micro-kernel call
STORE, ADD, RESCALE = 0, 1, 2  # what a micro-kernel does with C


def _no_unroll(module, back_edge):
    # loop metadata on a loop's back edge: LLVM leaves the loop as written. Its unroller copied each
    # micro-kernel's k loop (MR x nv FMAs a step already) several times over: code that numba optimizes and
    # emits again at every level of its linking (cpu_fwd's micro-kernels without it: the float32 forward's
    # first call ~2 s CPU shorter, its speed the same or better)
    unroll = module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")])
    loop_id = ir.values.MDValue(module, [], name=str(len(module.metadata)))
    loop_id.operands = (loop_id, unroll)  # a loop id refers to itself (distinct from every other loop's)
    back_edge.set_metadata("llvm.loop", loop_id)


# The micro-kernels' sums over more than K_SEGMENT steps of the reduction dimension are split in two halves,
# each summed from zero in the accumulators, the halves added at the end (issue 14's accuracy clause). One chain
# of FMAs over a head dim of 193-256 rounds at partial sums that grow as it goes: Q K^T's scores came out ~1.4x
# as far from float64 (rms, D 239) as torch's float32 matmul, which the reference's float32 twins use (MKL here
# splits such a k in two halves; for a few keys it sums along k in vectors), and requests whose rows see a few
# keys (ALiBi, a float bias, logits x2; D 193-256) missed STYLE rule 6 or FlashAttention's rule by up to 1.29x
# where math passed (<= 0.61x): 15 of 400 drawn requests (tests/test_cpu_accuracy.py), none now. Reductions of
# at most K_SEGMENT steps (P V, dV, dK, dQ: a tile's 64 keys or rows; Q K^T at D <= 128; dP at Dv <= 128) run
# the one loop as before: the same sums, bit for bit. Forward and backward take their scores from this loop
# alike, so the backward still recomputes the forward's scores bit for bit.
K_SEGMENT = 128


def _fma_k_loop(builder, vec, MR, nv, kdim, load_b, load_a, name, step=None, unroll=True):
    # the reduction loop of the float32/float64 micro-kernels (cpu_flash, cpu_fwd, cpu_bwd) as IR:
    # acc[i][v] = sum over kk < kdim, ascending, of fma(A[i, kk], B[kk, v]) from zero, MR x nv vector
    # accumulators held as phis across the loop; past K_SEGMENT steps in two halves (_k_segments). load_b(kk):
    # B's nv vectors of row kk; load_a(kk): a function of i that loads A[i, kk] (broadcast here); step(kk):
    # anything else a step does (a prefetch); unroll=False: LLVM keeps the loop as written (_no_unroll).
    # Returns the accumulators after the loop (zero when kdim <= 0), as [i][v]
    c = vec.const
    init = [[vec.zero] * nv for _ in range(MR)]
    one = builder.append_basic_block(f"{name}.one")
    loop = builder.append_basic_block(f"{name}.loop")
    segs = builder.append_basic_block(f"{name}.segs")
    done = builder.append_basic_block(f"{name}.done")
    br = builder.cbranch(builder.icmp_signed(">", kdim, c(K_SEGMENT)), segs, one)
    # (weighted 16:1 for the one loop: LLVM lays it out and allocates its registers as it did without the halves.
    # Unweighted, the float32 forward at D = 64 ran ~1 % slower with the same instructions in its loops; weighted
    # 1000:1, the halves at D = 256 ran ~6 % slower (spills in the loops of a block taken for cold). 16:1, 1 thread,
    # A/A/B against HEAD's kernels twice: D 64 forward 1.002 / 1.003, D 256 forward 1.012 / 1.009)
    i32 = ir.IntType(32)
    br.set_metadata("prof", builder.module.add_metadata([ir.MetaDataString(builder.module, "branch_weights"),
                                                         ir.Constant(i32, 1), ir.Constant(i32, 16)]))
    # -- up to K_SEGMENT steps: one loop --
    builder.position_at_end(one)
    builder.cbranch(builder.icmp_signed(">", kdim, c(0)), loop, done)
    first, last_loop = _k_range(builder, vec, MR, nv, c(0), kdim, one, loop, load_b, load_a, step, unroll)
    builder.branch(done)
    # -- past K_SEGMENT steps: two halves --
    builder.position_at_end(segs)
    second = _k_segments(builder, vec, MR, nv, kdim, load_b, load_a, name, step, unroll)
    seg_end = builder.block
    builder.branch(done)
    builder.position_at_end(done)
    final = []
    for i in range(MR):
        row = []
        for v in range(nv):
            phi = builder.phi(vec.vty)
            phi.add_incoming(init[i][v], one)
            phi.add_incoming(first[i][v], last_loop)
            phi.add_incoming(second[i][v], seg_end)
            row.append(phi)
        final.append(row)
    return final


def _k_range(builder, vec, MR, nv, k0, k1, pre, loop, load_b, load_a, step, unroll):
    # the FMA loop over kk in [k0, k1) (k1 > k0) in block `loop` (entered from `pre`), accumulators from zero;
    # returns them and the block the loop leaves from (positioned there)
    c = vec.const
    builder.position_at_end(loop)
    kk = builder.phi(vec.i64)
    kk.add_incoming(k0, pre)
    accs = [[builder.phi(vec.vty) for v in range(nv)] for i in range(MR)]
    bvec = load_b(kk)
    a_at = load_a(kk)
    new = []
    for i in range(MR):
        a = vec.splat(a_at(i))
        new.append([builder.call(vec.fma, [a, bvec[v], accs[i][v]]) for v in range(nv)])
    if step is not None:
        step(kk)
    nxt = builder.add(kk, c(1))
    kk.add_incoming(nxt, loop)
    for i in range(MR):
        for v in range(nv):
            accs[i][v].add_incoming(vec.zero, pre)
            accs[i][v].add_incoming(new[i][v], loop)
    exit_ = builder.append_basic_block(loop.name + ".exit")
    back = builder.cbranch(builder.icmp_signed("<", nxt, k1), loop, exit_)
    if not unroll:
        _no_unroll(builder.module, back)
    builder.position_at_end(exit_)
    return new, exit_


def _k_segments(builder, vec, MR, nv, kdim, load_b, load_a, name, step, unroll):
    # _fma_k_loop past K_SEGMENT steps (IR, kdim > K_SEGMENT): two halves [0, h) and [h, kdim), h = kdim // 2,
    # each summed from zero, the first half's sums kept in a stack buffer, then first + second
    c = vec.const
    h = builder.sdiv(kdim, c(2))
    spill = cgutils.alloca_once(builder, vec.vty, size=MR * nv)
    pre1 = builder.block
    loop1 = builder.append_basic_block(f"{name}.half1")
    builder.branch(loop1)
    part1, _ = _k_range(builder, vec, MR, nv, c(0), h, pre1, loop1, load_b, load_a, step, unroll)
    for i in range(MR):
        for v in range(nv):
            builder.store(part1[i][v], builder.gep(spill, [c(i * nv + v)]))
    pre2 = builder.block
    loop2 = builder.append_basic_block(f"{name}.half2")
    builder.branch(loop2)
    part2, _ = _k_range(builder, vec, MR, nv, h, kdim, pre2, loop2, load_b, load_a, step, unroll)
    return [[builder.fadd(builder.load(builder.gep(spill, [c(i * nv + v)])), part2[i][v]) for v in range(nv)] for i in range(MR)]


def _per_vector_count(builder, vec, nv, product, name, counts=None):
    # one copy of product(v) (IR) per vector count v = 1 .. NV_MAX, picked by the i64 nv (past NV_MAX: NV_MAX);
    # counts: the only copies made (NV_MAX among them), a count without its own copy running the next larger one
    # -- for a caller whose B and C are whole NV_MAX vectors wide (the lanes past nv computed, not used). Each
    # copy is code numba optimizes and emits again at every level of its linking
    counts = sorted(set(range(1, NV_MAX + 1) if counts is None else counts))
    assert counts[-1] == NV_MAX
    c = vec.const
    exit_ = builder.append_basic_block(f"{name}.exit")
    cases = {v: builder.append_basic_block(f"{name}.nv{v}") for v in counts}
    switch = builder.switch(nv, cases[NV_MAX])
    for v in range(1, NV_MAX):
        if min(u for u in counts if u >= v) < NV_MAX:
            switch.add_case(c(v), cases[min(u for u in counts if u >= v)])
    for v, block in cases.items():
        builder.position_at_end(block)
        product(v)
        builder.branch(exit_)
    builder.position_at_end(exit_)


def _make_microkernel(MR):
    @intrinsic
    def microkernel(typingctx, pa, sa0, sa1, pb, sb, pc, sc, n, kdim, scale, mode, palpha, like):
        # c[:MR, :n] (op)= a[:MR, :kdim] @ b[:kdim, :n] at raw addresses; strides in elements;
        # rows of b and c contiguous; n <= TILE_N; `mode` STORE/ADD/RESCALE (see above), palpha the
        # raw address of MR row factors (RESCALE); `like` is an array of the element type
        if not (isinstance(like, types.Array) and isinstance(like.dtype, types.Float)):
            return None
        sig = types.void(*([types.intp] * 9), types.float64, types.intp, types.intp, like)

        def codegen(context, builder, signature, args):
            builder = _Exact(builder)
            pa, sa0, sa1, pb, sb, pc, sc, n, kdim, scale, mode, palpha, _ = args
            vec = _Vectors(context, builder, signature.args[-1].dtype)
            width, c = vec.width, vec.const
            if vec.f32:
                scale = builder.fptrunc(scale, vec.fty)
            scale_v = vec.splat(scale)

            def product(nvec, masked_from):
                # the whole product with nvec vectors per row of C, vectors from `masked_from` on masked
                masks = [vec.lanes_below(builder.sub(n, c(v * width))) if v >= masked_from else None for v in range(nvec)]

                def load_b(kk):
                    brow = builder.mul(kk, sb)
                    return [vec.load(pb, builder.add(brow, c(v * width)), masks[v]) for v in range(nvec)]

                def load_a(kk):
                    return lambda i: builder.load(vec.at(pa, builder.add(builder.mul(c(i), sa0), builder.mul(kk, sa1)), vec.sptr))

                final = _fma_k_loop(builder, vec, MR, nvec, kdim, load_b, load_a, f"mk{nvec}")
                # -- write C in the call's mode --
                exit_ = builder.append_basic_block(f"mk{nvec}.exit")
                blocks = [builder.append_basic_block(f"mk{nvec}.{name}") for name in ("store", "add", "rescale")]
                switch = builder.switch(mode, blocks[STORE])
                switch.add_case(c(ADD), blocks[ADD])
                switch.add_case(c(RESCALE), blocks[RESCALE])
                for which, block in enumerate(blocks):
                    builder.position_at_end(block)
                    for i in range(MR):
                        off_row = builder.mul(c(i), sc)
                        if which == RESCALE:
                            al = vec.splat(builder.load(vec.at(palpha, c(i), vec.sptr)))
                        for v in range(nvec):
                            off = builder.add(off_row, c(v * width))
                            if which == STORE:
                                x = builder.fmul(final[i][v], scale_v)
                            elif which == ADD:
                                x = builder.fadd(vec.load(pc, off, masks[v]), final[i][v])
                            else:
                                x = builder.call(vec.fma, [vec.load(pc, off, masks[v]), al, final[i][v]])
                            vec.store(x, pc, off, masks[v])
                    builder.branch(exit_)
                builder.position_at_end(exit_)

            # -- float32 (the fast path): one copy of the product per vector count, picked by
            # ceil(n / width); float64 (for checking) keeps a single copy, which compiles faster,
            # and only in the 1- and 2-row kernels (_gemm calls no other in float64) --
            if not vec.f32:
                if MR <= 2:
                    product(TILE_N // width, 0)
                return context.get_dummy_value()
            nv = builder.sdiv(builder.add(n, c(width - 1)), c(width))
            _per_vector_count(builder, vec, nv, lambda v: product(v, v - 1), "mk")
            return context.get_dummy_value()

        return sig, codegen

    return microkernel


_mk6, _mk2, _mk1 = _make_microkernel(6), _make_microkernel(2), _make_microkernel(1)


@intrinsic
def _not_inlined(typingctx, like):
    # marks the numba function that calls it noinline: where it is linked in, LLVM keeps calls to its one
    # copy instead of a copy at each call site (code that numba optimizes and emits again at every level of
    # its linking). cpu_bwd._gemm_pf: flash_bwd_t's first call ~0.3 s shorter, its speed the same
    sig = types.void(like)

    def codegen(context, builder, signature, args):
        builder.function.attributes.add("noinline")
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _gemm(pa, sa0, sa1, pb, sb, pc, sc, m, kdim, n, scale, mode, palpha, like):
    # c[:m, :n] (op)= a[:m, :kdim] @ b[:kdim, :n] at raw addresses (strides in elements), `mode` as
    # the micro-kernels take it (palpha: m row factors for RESCALE)
    isz = like.itemsize
    for j0 in range(0, n, TILE_N):
        nn = min(TILE_N, n - j0)
        i = 0
        if isz == 4:
            while i + 6 <= m:
                _mk6(pa + i * sa0 * isz, sa0, sa1, pb + j0 * isz, sb, pc + (i * sc + j0) * isz, sc, nn, kdim,
                     scale, mode, palpha + i * isz, like)
                i += 6
        while i + 2 <= m:
            _mk2(pa + i * sa0 * isz, sa0, sa1, pb + j0 * isz, sb, pc + (i * sc + j0) * isz, sc, nn, kdim,
                 scale, mode, palpha + i * isz, like)
            i += 2
        while i < m:
            _mk1(pa + i * sa0 * isz, sa0, sa1, pb + j0 * isz, sb, pc + (i * sc + j0) * isz, sc, nn, kdim,
                 scale, mode, palpha + i * isz, like)
            i += 1


@njit(cache=True)
def _addr(x):
    return np.intp(x.ctypes.data)


@njit(cache=True)
def _mm(a, b, c, m, kdim, n, scale=1.0, mode=STORE, alpha=None):
    # c[:m, :n] (op)= a[:m, :kdim] @ b[:kdim, :n]      rows of b and c contiguous; STORE scales by
    # `scale`, RESCALE multiplies row i of c by alpha[i] first
    isz = a.itemsize
    pal = np.intp(0) if alpha is None else _addr(alpha)
    _gemm(_addr(a), a.strides[0] // isz, a.strides[1] // isz, _addr(b), b.strides[0] // isz,
          _addr(c), c.strides[0] // isz, m, kdim, n, scale, mode, pal, c)


@njit(cache=True)
def _mm_tn(a, b, c, m, kdim, mode=STORE):
    # c[:m, :] (op)= a[:kdim, :m]^T @ b[:kdim, :]      c (>=m, N), b (>=kdim, N)
    isz = a.itemsize
    _gemm(_addr(a), a.strides[1] // isz, a.strides[0] // isz, _addr(b), b.strides[0] // isz,
          _addr(c), c.strides[0] // isz, m, kdim, b.shape[1], 1.0, mode, np.intp(0), c)


def _dot_codegen(wide):
    # the IR of _dot (wide False) and _dot64 (wide True: float32 products widened to float64 and
    # summed in float64 vectors of as many lanes; the result is a float64)
    def codegen(context, builder, signature, args):
        builder = _Exact(builder)
        pa, pb, kdim, _ = args
        vec = _Vectors(context, builder, signature.args[-1].dtype)
        width, i32, i64, c = vec.width, vec.i32, vec.i64, vec.const
        step = c(4 * width)
        aty = ir.VectorType(ir.DoubleType(), width) if wide else vec.vty  # the accumulators' type
        zero = ir.Constant(aty, None)
        fma = vec.fma
        if wide:
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(aty, [aty] * 3), f"llvm.fma.v{width}f64")

        def chunk(kk, accs, masked):
            # accs[u] += a[kk + u*width : ...] * b[...], u = 0..3 (masked past kdim in the tail)
            out = []
            for u in range(4):
                off = builder.add(kk, c(u * width))
                if masked:
                    mask = vec.lanes_below(builder.sub(kdim, off))
                    x, y = vec.load(pa, off, mask), vec.load(pb, off, mask)
                else:
                    x = builder.load(vec.at(pa, off, vec.vptr), align=4)
                    y = builder.load(vec.at(pb, off, vec.vptr), align=4)
                if wide:
                    x, y = builder.fpext(x, aty), builder.fpext(y, aty)
                out.append(builder.call(fma, [x, y, accs[u]]))
            return out

        entry = builder.block
        main = builder.append_basic_block("dot.main")
        check = builder.append_basic_block("dot.check")
        tail = builder.append_basic_block("dot.tail")
        done = builder.append_basic_block("dot.done")
        builder.cbranch(builder.icmp_signed(">=", kdim, step), main, check)
        # -- full chunks of 4 vectors, plain loads --
        builder.position_at_end(main)
        kk = builder.phi(i64)
        accs = [builder.phi(aty) for _ in range(4)]
        new = chunk(kk, accs, False)
        nxt = builder.add(kk, step)
        kk.add_incoming(c(0), entry)
        kk.add_incoming(nxt, main)
        for u in range(4):
            accs[u].add_incoming(zero, entry)
            accs[u].add_incoming(new[u], main)
        builder.cbranch(builder.icmp_signed("<=", builder.add(nxt, step), kdim), main, check)
        # -- the rest, masked --
        builder.position_at_end(check)
        kt = builder.phi(i64)
        kt.add_incoming(c(0), entry)
        kt.add_incoming(nxt, main)
        acct = [builder.phi(aty) for _ in range(4)]
        for u in range(4):
            acct[u].add_incoming(zero, entry)
            acct[u].add_incoming(new[u], main)
        builder.cbranch(builder.icmp_signed("<", kt, kdim), tail, done)
        builder.position_at_end(tail)
        newt = chunk(kt, acct, True)
        builder.branch(done)
        builder.position_at_end(done)
        fin = []
        for u in range(4):
            phi = builder.phi(aty)
            phi.add_incoming(acct[u], check)
            phi.add_incoming(newt[u], tail)
            fin.append(phi)
        v = builder.fadd(builder.fadd(fin[0], fin[1]), builder.fadd(fin[2], fin[3]))
        # lanes summed as a fixed tree: halves added until one lane is left
        half = width
        while half > 1:
            half //= 2
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, half), list(range(half))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, half), list(range(half, 2 * half))))
            v = builder.fadd(lo, hi)
        return builder.extract_element(v, ir.Constant(i32, 0))

    return codegen


@intrinsic
def _dot(typingctx, pa, pb, kdim, like):
    # sum_k a[k] * b[k] over contiguous rows at raw addresses, in a fixed order (4 vector partial
    # sums, then the lanes as a tree) whatever the caller: the same (query, key) pair gets the same
    # score in the forward and both backward passes
    if not (isinstance(like, types.Array) and isinstance(like.dtype, types.Float)):
        return None
    return like.dtype(types.intp, types.intp, types.intp, like), _dot_codegen(False)


@intrinsic
def _dot64(typingctx, pa, pb, kdim, like):
    # _dot of float32 rows (`like` a float32 array) in float64: each product exact, the sum in the
    # same fixed order, rounded in float64 (relative error ~D 2**-53, far below float32's rounding);
    # float64 rows: _dot itself
    if not (isinstance(like, types.Array) and isinstance(like.dtype, types.Float)):
        return None
    return types.float64(types.intp, types.intp, types.intp, like), _dot_codegen(like.dtype == types.float32)


@njit(cache=True)
def _qk_split(pq, sq, rows, pk, ncols, D, c64, s, lo, transposed, slopes, q_pos_f, kv_pos_f, b, h, r0, c0):
    """Scores of a block of fewer than 4 query rows (decoding, a ragged last block) in float64.

    On entry s[i, j] ([j, i] when ``transposed``) holds the score terms alone -- the tile's terms
    (ALiBi, float bias, -inf where masked) applied to zeros -- and gets q.k added in float64:
    y = (q_i . k_j) * c64 + s[i, j], c64 = scale log2(e) (score units), kept as two float32s: hi = y
    rounded into s and lo = y - hi (rounded) into lo (lo 0 where hi is not finite). Query rows at raw
    address pq, ``sq`` elements apart; keys at pk, D apart. The softmax takes each exponent as the
    softcap's hi/lo convention does (``_softcap_tile``): (s - m) + (lo - lo_m), in float64, rounded once.

    A float32 q.k rounds by up to ulp(q.k) / 2, which at logits of ~1e3 is ~6e-5 of exponent per key,
    not shared by the row: rows of a few keys missed STYLE rule 6 by up to 2.9x (D 3, x30) even with
    q.k exactly rounded, where the float32 reference rounds luckily; so did ALiBi added to a float32 hi
    (dk 1.3x). The float32 reference's own scores are not this exact: the kernel is then well within
    its error.

    ALiBi (slopes (B|1, Hq) in score units, size 0: none) is added here, in float64, not among the
    terms: y = (q_i . k_j) * c64 - slope_h |q_pos[r0 + i] - kv_pos[c0 + j]| + s[i, j], so the callers
    leave it out of s. Rounded in float32 first (slope * distance, ~76 score units at distances ~100:
    ulp/2 ~ 4e-6 of exponent per key, not shared by the row) it missed STYLE rule 6 by 3.2x (output;
    Lq 3, Lk 130, D 4) where the float32 reference's own slope * distance rounded luckily."""
    isz = 4
    alibi = slopes.size > 0
    slope = np.float64(slopes[_bx(slopes.shape[0], b), h]) if alibi else 0.0
    pb = _bx(q_pos_f.shape[0], b) if alibi else 0
    kb = _bx(kv_pos_f.shape[0], b) if alibi else 0
    for i in range(rows):
        qp = np.float64(q_pos_f[pb, r0 + i]) if alibi else 0.0
        for j in range(ncols):
            t = np.float64(s[j, i]) if transposed else np.float64(s[i, j])
            y = _dot64(pq + i * sq * isz, pk + j * D * isz, D, s) * c64 + t
            if alibi:
                y -= slope * abs(qp - np.float64(kv_pos_f[kb, c0 + j]))
            hi = np.float32(y)
            r = np.float32(y - np.float64(hi)) if math.isfinite(hi) else np.float32(0.0)
            if transposed:
                s[j, i] = hi
                lo[j, i] = r
            else:
                s[i, j] = hi
                lo[i, j] = r


# -- float64 scores of a transposed 64-row tile (cpu_fwd and cpu_bwd, where _split_tiles says so) --
# A float32 q.k rounds by up to ulp(q.k) / 2: at logits of ~1e3 score units that is ~6e-5 of exponent per
# key, not shared by the row, and STYLE rule 6 missed by up to 4.1x (dk; D 3, q and k x30, 17 query rows)
# even with q.k exactly rounded. These tiles take y = q.k * scale log2(e) + the terms in float64 and keep
# it as y - R rounded to float32, R a per-row float64 reference that follows the running max (the
# forward: _rebase), so the scores near the max keep their low digits; the backward takes R = row_max.
SPLIT_ABOVE = 128.0  # tasks whose logits may pass this (score units, _split_tiles) take the float64 scores
REBASE = 16.0  # the forward moves a row's reference R when a tile's max passes R by this (score units)


@njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True)
def _max_norm2(rows):
    # max_i |x_i|^2 over the rows of a float32 (N, D) array, each sum in float32 in any order (reassoc,
    # contract: vectorised FMAs; one pass at the cache's bandwidth: 0.29 ms for 8 MB on this host against
    # numpy einsum's 0.38 ms, ~1 us a call on tiny arrays against ~5). No flag here assumes finite values: a
    # row holding a NaN sums to NaN and loses every comparison (passed over), inf stays inf; 0 for no rows.
    # (2-D: the caller's numpy reshape; a reshape in here took 0.2 s to compile instead of 0.07)
    m = np.float32(0.0)
    for i in range(rows.shape[0]):
        s = np.float32(0.0)
        for d in range(rows.shape[1]):
            s += rows[i, d] * rows[i, d]
        if s > m:
            m = s
    return m


def _norm2_bound(x) -> float:
    """max_i |x_i|^2 over the rows of a float32 (..., D) array, rounded up: ``_max_norm2``'s float32 sums
    raised by their rounding, a bound of the exact value (a row holding a NaN passed over).

    Why it bounds: every operation of a row's sum (a square, an addition, an FMA a + x*x; any order, any
    tree) gives r(1 + e) + t for its exact result r of its computed inputs, |e| <= u = 2**-24 and t = 0 in
    the normal range, e = 0 and |t| <= 2**-150 (half the subnormal spacing) below 2**-126. All terms are
    nonnegative, so by induction over the tree a node of depth h over c operations computes at least
    (1 - u)**h S_node - c 2**-150; a row's tree has depth <= D and <= 2D - 1 operations, so its computed sum
    s >= (1 - u)**D S - D 2**-149, i.e. S <= (s + D 2**-149) / (1 - u)**D <= (s + D 2**-149)(1 + D 2**-23)
    (1 / (1 - u)**D <= 1 + 2Du while Du <= 1/2; the slack Du covers the three float64 roundings here).
    The max m of the computed sums is at least every row's s, so every row's S <= (m + D 2**-149)(1 + D 2**-23).
    Where a sum may overflow float32 (m past 1e37, or inf) the float64 sums are taken instead (exact
    squares, each sum rounded by at most D 2**-53 relative), raised by D 2**-52."""
    D = x.shape[-1]
    if x.size == 0:
        return 0.0
    norm2 = float(_max_norm2(x.reshape(-1, D)))  # (the rows of a C-contiguous x: a view)
    if not norm2 < 1e37:
        norm2 = float(np.fmax.reduce(np.einsum("...d,...d->...", x, x, dtype=np.float64), axis=None, initial=0.0))
        return norm2 * (1.0 + D * 2.0**-52)
    return (norm2 + D * 2.0**-149) * (1.0 + D * 2.0**-23)


def max_key_norm(k) -> float:
    """max_j |k_j| over the keys of a float32 (B, Hkv, Lk, D) array, rounded up: the launchers put it in
    KernelOpts.k_norm, the forward's and the backward's alike (the same function of the same keys, so both
    take the same blocks as float64 tiles). ``_norm2_bound``: each |k_j|^2 summed in float32 and raised by
    its rounding (D 2**-23 relative, D 2**-149 for squares that underflow), in float64 where a square may
    overflow float32; a key holding a NaN is passed over, 0 for no keys."""
    return math.sqrt(_norm2_bound(k))


@njit(fastmath=FASTMATH, cache=True)
def _q_norm2_estimate(q, b, h, r0, rows):
    # max_i |q_i|^2 over a block's rows in float64, each sum in any order (vectorised): within ~D 2**-53
    # of _split_tiles' ordered sums (a row holding a NaN loses, as there; inf: inf)
    D = q.shape[3]
    est = 0.0
    for i in range(rows):
        x = 0.0
        for d in range(D):
            a = np.float64(q[b, h, r0 + i, d])
            x += a * a
        est = x if x > est else est
    return est


@njit(cache=True)
def _split_tiles(q, b, h, r0, rows, opts):
    """Whether a float32 task of >= 4 query rows takes float64 scores (``_qk64_t``): no softcap, and
    max_i |q_i| (the block's rows, in float64) times opts.k_norm (the call's keys) times the scale in score
    units -- a bound of its logits -- above SPLIT_ABOVE. The forward (cpu_fwd) and the backward (cpu_bwd)
    ask the same, so they recompute the same scores. (Scanning the head's keys in every task instead cost
    the forward 7-15 % at D 8-128, L 1024: memory-bound.)"""
    if opts.softcap_u > 0.0 or not opts.k_norm > 0.0:
        return False
    if math.sqrt(_q_norm2_estimate(q, b, h, r0, rows)) * opts.k_norm * abs(opts.qk_scale64) < 0.999 * SPLIT_ABOVE:
        # clearly below: the ordered sums (below) would say so too (they cost the forward ~2 % at D 64)
        return False
    D = q.shape[3]
    qn = 0.0
    for i in range(rows):
        # -- |q_i|^2 in float64, four partial sums (d mod 4) added in a fixed order --
        x0, x1, x2, x3 = 0.0, 0.0, 0.0, 0.0
        for d in range(0, D - 3, 4):
            a0, a1 = np.float64(q[b, h, r0 + i, d]), np.float64(q[b, h, r0 + i, d + 1])
            a2, a3 = np.float64(q[b, h, r0 + i, d + 2]), np.float64(q[b, h, r0 + i, d + 3])
            x0, x1, x2, x3 = x0 + a0 * a0, x1 + a1 * a1, x2 + a2 * a2, x3 + a3 * a3
        for d in range(D - D % 4, D):
            a0 = np.float64(q[b, h, r0 + i, d])
            x0 += a0 * a0
        x = (x0 + x1) + (x2 + x3)
        qn = x if x > qn else qn
    bound = math.sqrt(qn) * opts.k_norm * abs(opts.qk_scale64)
    # (infinite inputs: the float32 tiles, as before)
    return bound > SPLIT_ABOVE and bound < 1e300


@njit(cache=True)
def _any_split_tile(q, opts):
    # whether any task of >= 4 query rows of this call would take float64 scores (_split_tiles, asked of
    # each query block as cpu_fwd's and cpu_bwd's tasks ask it)
    B, H, Lq, _ = q.shape
    for b in range(B):
        for h in range(H):
            for r0 in range(0, Lq, BLOCK_M):
                rows = min(BLOCK_M, Lq - r0)
                if rows >= 4 and _split_tiles(q, b, h, r0, rows, opts):
                    return True
    return False


# -- lean variants: a float32 kernel compiled without the features a call does not use ---------------
# A kernel's first call compiles every feature it has (softcap, float64 tiles, hi/lo scores, ALiBi, float
# bias, documents, mask functions, dense boolean masks, key padding bits) whether the call uses them or
# not: about a third of the float32 first call. The kernels of cpu_fwd and cpu_bwd guard those parts with
# `if ALL_FEATURES and ...:`; lean_variant(kernel) is the same Python function compiled with ALL_FEATURES
# = False, and numba's dead-branch pruning drops the guarded parts before typing them (nothing they call is
# compiled). The launchers take the lean variant for a call that uses none of them (lean_call): the same
# code for what remains, so the same outputs bit for bit. Each variant is its own dispatcher (one signature,
# its own cache file).

ALL_FEATURES = True  # False in a lean variant (read by the kernels as a compile-time constant)
_LEAN: dict = {}  # kernel -> its lean variant
_READS: dict = {}  # kernel -> _reads_flag(kernel)


def _reads_flag(kernel) -> bool:
    # whether a numba function reads ALL_FEATURES itself or through a function it calls
    if kernel not in _READS:
        py = kernel.py_func
        names = py.__code__.co_names
        _READS[kernel] = "ALL_FEATURES" in names or any(
            _reads_flag(py.__globals__[n]) for n in names if isinstance(py.__globals__.get(n), Dispatcher))
    return _READS[kernel]


def lean_variant(kernel):
    """``kernel`` (a numba function of the kernel modules) compiled with ALL_FEATURES = False, and so
    every numba function it calls that reads the flag; one variant per function, made once."""
    import types as pytypes

    from selfattn.kernels import _numba_cache_for_kernels

    if kernel in _LEAN:
        return _LEAN[kernel]
    py = kernel.py_func
    namespace = dict(py.__globals__)
    namespace["ALL_FEATURES"] = False
    for name in py.__code__.co_names:
        callee = namespace.get(name)
        if isinstance(callee, Dispatcher) and _reads_flag(callee):
            namespace[name] = lean_variant(callee)
    fn = pytypes.FunctionType(py.__code__, namespace, py.__name__, py.__defaults__, py.__closure__)
    fn.__qualname__ = py.__qualname__ + "_lean"  # its own cache index (numba names it by the qualified name)
    options = {key: value for key, value in kernel.targetoptions.items() if key != "nopython"}
    with _numba_cache_for_kernels():
        lean = njit(**options)(fn)
        index = getattr(kernel._cache, "_cache_file", None)
        if index is not None:
            lean.enable_caching()
            # the original's stamp: its source file and the modules stamp_sources joined to it
            lean._cache._cache_file._source_stamp = index._source_stamp
    _LEAN[kernel] = lean
    return lean


def lean_call(q, mask, opts) -> bool:
    """Whether a float32 call of cpu_fwd's or cpu_bwd's kernel uses none of the features a lean variant
    lacks: no softcap, ALiBi, float bias, documents, mask function, dense boolean mask or key padding bits,
    every query block of at least 4 rows, no block taking float64 scores (_split_tiles)."""
    Lq = q.shape[2]
    if opts.softcap_u > 0.0 or Lq < 4 or 0 < Lq % BLOCK_M < 4:
        return False
    if (mask.alibi.size or mask.bias.size or mask.allow.size or mask.fn_index.size or mask.q_ids.shape[0]
            or mask.kv_keep.size):
        return False
    return not _may_split(q, opts)  # (False at k_norm 0: no float64-tile test yet)


def _may_split(q, opts) -> bool:
    # whether some query block of a float32 call without softcap may take float64 scores. First a
    # bound: max_i |q_i|^2 rounded up (_norm2_bound, one pass over Q) is at least the float64 sums of
    # _split_tiles, so below 0.99 x SPLIT_ABOVE every block's own test (its rows' largest norm x k_norm x
    # |scale| against SPLIT_ABOVE) says no too. Above it (or inf: the comparison fails) _any_split_tile asks
    # every block exactly as the kernels do. A row holding a NaN is passed over, as there.
    if not opts.k_norm > 0.0:
        return False  # (every block's test says no: _split_tiles)
    if math.sqrt(_norm2_bound(q)) * opts.k_norm * abs(float(opts.qk_scale64)) < 0.99 * SPLIT_ABOVE:
        return False
    return _any_split_tile(q, opts)


def _ir_loop(builder, i64, lo, hi, step, inits, body, name):
    # for j in range(lo, hi, step) ((hi - lo) a multiple of step; lo, hi i64 values): vals = body(j, vals)
    # as IR, with the loop-carried values as phis; returns the values after the loop (inits if it ran 0 times)
    entry = builder.block
    loop = builder.append_basic_block(name + ".loop")
    done = builder.append_basic_block(name + ".done")
    builder.cbranch(builder.icmp_signed("<", lo, hi), loop, done)
    builder.position_at_end(loop)
    j = builder.phi(i64)
    phis = [builder.phi(x.type) for x in inits]
    new = body(j, phis)
    end = builder.block
    nxt = builder.add(j, ir.Constant(i64, step))
    j.add_incoming(lo, entry)
    j.add_incoming(nxt, end)
    for phi, x, v in zip(phis, inits, new):
        phi.add_incoming(x, entry)
        phi.add_incoming(v, end)
    builder.cbranch(builder.icmp_signed("<", nxt, hi), loop, done)
    builder.position_at_end(done)
    outs = []
    for x, v in zip(inits, new):
        phi = builder.phi(x.type)
        phi.add_incoming(x, entry)
        phi.add_incoming(v, end)
        outs.append(phi)
    return outs


QK64_VECS = 4  # float64 accumulators per key: 4 x 8 query lanes (AVX-512) a chunk, two keys at a time


@intrinsic
def _qk64_t(typingctx, pqt, pk, ncols, kdim, nlanes, c64, pst, pref, pmax, like):
    """st[j, lane] = fl32((q_lane . k_j) * c64 + st[j, lane] - ref[lane]) for keys j < ncols and the first
    nlanes query lanes (rounded up to whole chunks of QK64_VECS float64 vectors), in float64: each
    product exact, each lane's sum over the head dim in order (no reassociation: the value does not
    depend on the vector width), one rounding at the end. Q^T widened to float64 (kdim x BLOCK_M,
    ``_qt64``) at pqt, the keys (ncols x kdim float32 rows) at pk, s^T (ncols x BLOCK_M float32) at pst --
    on entry the score terms alone (0, ALiBi, bias, -inf where masked) -- and ref (BLOCK_M float64) at
    pref. Each lane's max over the keys of what it stored goes to pmax (BLOCK_M float32; a NaN never
    wins). Two keys a step (eight independent sums); an odd last key is computed twice."""
    if not (isinstance(like, types.Array) and like.dtype == types.float32):
        return None
    sig = types.void(*([types.intp] * 5), types.float64, *([types.intp] * 3), like)

    def codegen(context, builder, signature, args):
        builder = _Exact(builder)
        pqt, pk, ncols, kdim, nlanes, c64, pst, pref, pmax, _ = args
        i64 = ir.IntType(64)
        W = VEC_BYTES // 8
        f32, f64 = ir.FloatType(), ir.DoubleType()
        v32, v64 = ir.VectorType(f32, W), ir.VectorType(f64, W)
        p32, p64 = ir.PointerType(v32), ir.PointerType(v64)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v64, [v64] * 3), f"llvm.fma.v{W}f64")
        c = lambda n: ir.Constant(i64, n)  # noqa: E731
        zero64 = ir.Constant(v64, None)
        U = QK64_VECS

        def splat(x):
            v = builder.insert_element(ir.Constant(v64, None), x, ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), W), [0] * W))

        def vat(base, elem, esize, ty):
            return builder.inttoptr(builder.add(base, builder.mul(elem, c(esize))), ty)

        c64v = splat(c64)
        chunk = U * W
        nchunks = builder.sdiv(builder.add(nlanes, c(chunk - 1)), c(chunk))
        npairs = builder.sdiv(builder.add(ncols, c(1)), c(2))
        last = builder.sub(ncols, c(1))

        def per_chunk(g, _):
            lane0 = builder.mul(g, c(chunk))
            refs = [builder.load(vat(pref, builder.add(lane0, c(u * W)), 8, p64), align=8) for u in range(U)]

            def per_pair(p, mx):
                j0 = builder.mul(p, c(2))
                j1 = builder.add(j0, c(1))
                j1 = builder.select(builder.icmp_signed(">", j1, last), last, j1)
                krows = [builder.add(pk, builder.mul(builder.mul(j, kdim), c(4))) for j in (j0, j1)]

                def per_d(d, accs):
                    row = builder.add(builder.mul(d, c(BLOCK_M)), lane0)
                    qv = [builder.load(vat(pqt, builder.add(row, c(u * W)), 8, p64), align=8) for u in range(U)]
                    out = []
                    for kr in krows:
                        kd = builder.fpext(builder.load(builder.inttoptr(builder.add(kr, builder.mul(d, c(4))), ir.PointerType(f32))), f64)
                        kv = splat(kd)
                        out.extend(builder.call(fma, [kv, qv[u], accs[len(out)]]) for u in range(U))
                    return out

                accs = _ir_loop(builder, i64, ir.Constant(i64, 0), kdim, 1, [zero64] * (2 * U), per_d, "qk64.d")
                # -- both keys' terms read before either is stored (an odd last key is both) --
                ptrs = [[vat(pst, builder.add(builder.add(builder.mul(j, c(BLOCK_M)), lane0), c(u * W)), 4, p32) for u in range(U)]
                        for j in (j0, j1)]
                ts = [[builder.fpext(builder.load(ptrs[a][u], align=4), v64) for u in range(U)] for a in range(2)]
                new = list(mx)
                for a in range(2):
                    for u in range(U):
                        y = builder.fsub(builder.fadd(builder.fmul(accs[a * U + u], c64v), ts[a][u]), refs[u])
                        x = builder.fptrunc(y, v32)
                        builder.store(x, ptrs[a][u], align=4)
                        new[u] = builder.select(builder.fcmp_ordered(">", x, new[u]), x, new[u])
                return new

            ninf = ir.Constant(v32, [float("-inf")] * W)
            mx = _ir_loop(builder, i64, ir.Constant(i64, 0), npairs, 1, [ninf] * U, per_pair, "qk64.j")
            for u in range(U):
                builder.store(mx[u], vat(pmax, builder.add(lane0, c(u * W)), 4, p32), align=4)
            return []

        _ir_loop(builder, i64, ir.Constant(i64, 0), nchunks, 1, [], per_chunk, "qk64.g")
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _qt64(q, b, h, r0, rows):
    """Q^T of a query block widened to float64 (D x BLOCK_M, zero past the rows): ``_qk64_t``'s operand."""
    D = q.shape[3]
    qt = np.zeros((D, BLOCK_M), np.float64)
    for i in range(rows):
        for d in range(D):
            qt[d, i] = q[b, h, r0 + i, d]
    return qt


@njit(cache=True)
def _rebase(tmax, rows, ref, m_i):
    """After ``_qk64_t`` with the references ref (tmax: its lanes' maxima): move ref[i] to where the row's
    max now is when this tile's max passed it by more than REBASE, or on the row's first allowed keys (so
    that its max is held to float64's precision: the backward's s - row_max of a row of one key is then
    exactly the rest row_log keeps, p = 1), and the running max m_i[i] (relative to ref) with it. True if
    any moved: the caller computes the tile again against the new references."""
    moved = False
    for i in range(rows):
        t = tmax[i]
        if not np.isfinite(t):
            continue
        if t > REBASE or (m_i[i] == -np.inf and t != 0.0):
            ref[i] += np.float64(t)
            if m_i[i] != -np.inf:
                m_i[i] = np.float32(np.float64(m_i[i]) - np.float64(t))
            moved = True
    return moved


@njit(cache=True)
def _anchor_rest(m_i, ref, rows):
    """The running maxima relative to ref into score units for ``_finish_rows``: m_i[:rows] becomes M =
    ref + m rounded; returns each row's rest (ref + m) - M (0 where M is infinite), as
    ``_max_in_units`` does."""
    rest = np.zeros(m_i.shape[0], m_i.dtype)
    for i in range(rows):
        if m_i[i] == -np.inf or m_i[i] != m_i[i]:
            continue
        x = ref[i] + np.float64(m_i[i])
        big = m_i.dtype.type(x)
        m_i[i] = big
        if np.isfinite(big):
            rest[i] = x - np.float64(big)
    return rest


@njit(cache=True)
def _qk_dot(q_blk, k, c0, ncols, s, rows):
    # s[:rows, :ncols] = q_blk @ k[c0:c0 + ncols]^T as dot products (few rows: no transpose)
    isz = k.itemsize
    D = k.shape[1]
    pk = _addr(k) + c0 * D * isz
    for i in range(rows):
        pq = _addr(q_blk) + i * (q_blk.strides[0] // isz) * isz
        for j in range(ncols):
            s[i, j] = _dot(pq, pk + j * D * isz, D, s)


# -- pieces of the online softmax ------------------------------------------------------------
# Row loops run over the first `nc` columns of a tile: the keys it holds rounded up to a whole
# vector (columns past the keys hold -inf scores and zero probabilities), not all BLOCK_N.


@njit(cache=True)
def _padded(ncols):
    return min(BLOCK_N, (ncols + 15) // 16 * 16)


@njit(fastmath=FASTMATH_EXACT, cache=True)
def _row_has_nan(s, i, nc):
    for j in range(nc):
        if s[i, j] != s[i, j]:
            return True
    return False


@njit(cache=True)
def _exp2_row(s, p, i, nc, m, stat):
    """p[i, :nc] = exp(s[i, :nc] - m) in score units; returns sum_j p, and (stat[0] given, size 1)
    stores sum_j p * (s - m) there."""
    isz = s.itemsize
    row = i * (s.strides[0] // isz)
    zero = s.dtype.type(0.0)
    pstat = _addr(stat) if stat.size > 0 else np.intp(0)
    return _vec_exp2_row(_addr(s) + row * isz, _addr(p) + i * p.strides[0], nc, m, zero, s.dtype.type(-126.0), pstat, s)


@njit(cache=True)
def _exp2_row_c(s, p, i, nc, m, cu, stat):
    # _exp2_row with the exponent (s - m) * cu (_raw_units); cu = 1: _exp2_row itself
    if cu == 1.0:
        return _exp2_row(s, p, i, nc, m, stat)
    isz = s.itemsize
    row = i * (s.strides[0] // isz)
    zero = s.dtype.type(0.0)
    pstat = _addr(stat) if stat.size > 0 else np.intp(0)
    return _vec_exp2_row_c(_addr(s) + row * isz, _addr(p) + i * p.strides[0], nc, m, cu, zero, s.dtype.type(-126.0), pstat, s)


@njit(cache=True)
def _row_max(s, i, nc):
    return _vec_row_max(_addr(s) + i * s.strides[0], nc, s)


@njit(cache=True)
def _bx(a, b):
    # index of batch (or head) b into an array dimension that is b's or broadcast (size 1)
    return b if a > 1 else 0


@njit(fastmath=FASTMATH, cache=True)
def _mask_tile(s, rows, ncols, b, h, qb, kb, mask):
    """-inf into s[:rows, :ncols] wherever the element-wise tests rule a pair out (PARTIAL tiles).

    Selects, not branches, so the column loops vectorise."""
    r0, c0 = qb * BLOCK_M, kb * BLOCK_N
    qpos = mask.q_pos[_bx(mask.q_pos.shape[0], b)]
    kvpos = mask.kv_pos[_bx(mask.kv_pos.shape[0], b)]
    kv_len = mask.kv_lens[_bx(mask.kv_lens.shape[0], b)] if mask.kv_lens.size > 0 else c0 + ncols
    q_len = mask.q_lens[_bx(mask.q_lens.shape[0], b)] if mask.q_lens.size > 0 else r0 + rows
    fn = -1
    if mask.fn_index.size > 0:
        fn = mask.fn_index[_bx(mask.fn_index.shape[0], b), _bx(mask.fn_index.shape[1], h), qb, kb]
    for i in range(rows):
        gi = r0 + i
        if gi >= q_len:
            # -- a padded query row: nothing --
            for j in range(ncols):
                s[i, j] = -np.inf
            continue
        if mask.banded:
            # -- band: kv_pos in [q_pos - left, q_pos + right] --
            lo, hi = qpos[gi] - mask.win_left, qpos[gi] + mask.win_right
            for j in range(ncols):
                kp = kvpos[c0 + j]
                s[i, j] = s[i, j] if (kp >= lo) & (kp <= hi) else -np.inf
        if c0 + ncols > kv_len:
            # -- padding: keys j < kv_len --
            for j in range(ncols):
                s[i, j] = s[i, j] if c0 + j < kv_len else -np.inf
        if mask.kv_keep.size > 0:
            keep = mask.kv_keep[_bx(mask.kv_keep.shape[0], b)]
            for j in range(ncols):
                s[i, j] = s[i, j] if keep[c0 + j] != 0 else -np.inf
        for d in range(mask.q_ids.shape[0]):
            # -- documents: equal ids attend --
            bd = _bx(mask.q_ids.shape[1], b)
            qid = mask.q_ids[d, bd, gi]
            for j in range(ncols):
                s[i, j] = s[i, j] if mask.kv_ids[d, bd, c0 + j] == qid else -np.inf
        if mask.allow.size > 0:
            st = mask.allow_strides
            base = b * st[0] + h * st[1] + gi * st[2] + c0 * st[3]
            if st[3] == 1:  # (contiguous rows vectorise)
                for j in range(ncols):
                    s[i, j] = s[i, j] if mask.allow[base + j] != 0 else -np.inf
            else:
                for j in range(ncols):
                    s[i, j] = s[i, j] if mask.allow[base + j * st[3]] != 0 else -np.inf
        if fn >= 0:
            # -- a mask function's bits, stored for its partial tiles only --
            for j in range(ncols):
                s[i, j] = s[i, j] if mask.fn_bits[fn, i, j] != 0 else -np.inf


@njit(fastmath=FASTMATH, cache=True)
def _scores(q_blk, k_nat, kt_blk, use_dot, s, lo, w, rows, b, h, qb, kb, kind, mask, opts):
    """Logits of one tile, in score units, into s[:rows, :nc]; masked pairs -inf. Returns nc.

    With a softcap, lo and w get the rest of each logit and the dS factor (``_softcap_tile``; w
    unless it has size 0).
    """
    store = 1.0 if opts.softcap_u > 0.0 else opts.qk_scale
    return _scores_by(q_blk, k_nat, kt_blk, use_dot, s, lo, w, rows, b, h, qb, kb, kind, mask, opts, store)


@njit(fastmath=FASTMATH, cache=True)
def _scores_by(q_blk, k_nat, kt_blk, use_dot, s, lo, w, rows, b, h, qb, kb, kind, mask, opts, store):
    # _scores with the product times `store` (1 with a softcap; _raw_units): s in units of 1/cu
    c0 = kb * BLOCK_N
    ncols = min(BLOCK_N, k_nat.shape[0] - c0)
    # -- scores: q_blk @ k_blk^T (kt_blk holds k_blk^T unless use_dot), times the store factor; a
    # lo without a softcap: the terms on zeros first, then q.k in float64 added, as hi + lo (_qk_split) --
    split = use_dot and lo.size > 0 and opts.softcap_u <= 0.0
    if split:
        for i in range(rows):
            for j in range(ncols):
                s[i, j] = 0.0
    elif use_dot:
        _qk_dot(q_blk, k_nat, c0, ncols, s, rows)
    else:
        _mm(q_blk, kt_blk, s, rows, q_blk.shape[1], ncols, store)
    if opts.softcap_u > 0.0:
        _softcap_tile(s, lo, w, rows, ncols, opts)
    elif use_dot and store != 1.0:
        for i in range(rows):
            for j in range(ncols):
                s[i, j] *= store
    nc = _score_rest(s, rows, ncols, b, h, qb, kb, kind, mask, opts, not split)
    if split:
        isz = s.itemsize
        D = k_nat.shape[1]
        _qk_split(_addr(q_blk), q_blk.strides[0] // isz, rows, _addr(k_nat) + c0 * D * isz, ncols, D, opts.qk_scale64,
                  s, lo, False, mask.alibi, mask.q_pos_f, mask.kv_pos_f, b, h, qb * BLOCK_M, c0)
    return nc


@njit(cache=True, inline="always")
def _raw_units(qk_scale, softcap_u, base2, added):
    """(store, cu) of a forward tile: s = q.k * store at the product, the score in score units s * cu.

    float32 without a softcap, ALiBi or float bias: the tile keeps q.k itself (store = the scale's
    sign, exact) and the softmax takes each exponent as fma(s, cu, -M), cu = |scale| log2(e), M = the
    row's max of s times cu: rounded once, exact for the scores near the max. Scaling at the store
    instead (s * cu rounded, then s - M) put ~0.5 ulp of an exponent of ~1e3, 6e-5, into every score
    at large logits: STYLE rule 6 missed by up to 10x against the float32 reference, which rounds
    q.k * scale once. Otherwise (``added``: ALiBi or a float bias added to the scaled score; float64)
    the store scales, cu = 1. (Scalars, not the records: a call taking KernelMask compiled ~5 s longer.)"""
    qk = np.float64(qk_scale)
    if softcap_u > 0.0:
        return 1.0, 1.0
    if not base2 or added or qk == 0.0 or qk != qk:
        return qk, 1.0
    return (1.0 if qk > 0.0 else -1.0), abs(qk)


@njit(cache=True, inline="always")
def _max_in_units(m_i, rows, cu):
    """Running maxima of s (``_raw_units``) into score units for ``_finish_rows``: m_i[:rows] becomes
    M = m * cu rounded; returns each row's rest m * cu - M (exact in float64, then rounded: the lse
    = M + (log2 l + rest) keeps it; 0 where M is infinite)."""
    rest = np.zeros(m_i.shape[0], m_i.dtype)
    if cu == 1.0:
        return rest
    for i in range(rows):
        x = np.float64(m_i[i]) * np.float64(cu)
        big = m_i.dtype.type(x)
        m_i[i] = big
        if np.isfinite(big):
            rest[i] = x - np.float64(big)
    return rest


@njit(cache=True, inline="always")
def _diff_units(m_old, m_new, cu):
    # (m_old - m_new) * cu in score units, as the exponents of a tile are taken (_vec_exp2_row_c)
    return (m_old - m_new) * cu if cu != 1.0 else m_old - m_new


# -- tanh and expm1 in float64, vectorisable ------------------------------------------------------
# _softcap_tile's tanh: libm's is a call per element (a softcapped float32 forward took 7-10x a plain
# one). Written as arithmetic and selects, LLVM vectorises the tile loops (error_model "numpy": a
# Python-semantics division would check for zero and keep them scalar); no fastmath, so every element
# rounds alike in vector and scalar code (the forward and the backward recompute the same hi and lo).
# expm1(x) for x = -2|u| in [-40, 0]: x = k ln 2 + r, |r| <= ln(2) / 2 (Cody-Waite: ln 2 in two parts),
# expm1(r) by its Taylor series to r^13 (the next term is below 2**-56 relative), then
# 2**k expm1(r) + (2**k - 1). tanh|u| = -e / (2 + e). Within 2.3 ulp of float64 (445 points against
# mpmath, 2.2e5 against np.tanh: 4 ulp, np.tanh's own ulp included; tests/test_cpu_kernel.py measures it).
_LN2_HI = 6.93147180369123816490e-01  # ln 2's leading bits: k * _LN2_HI is exact for |k| < 2**20
_LN2_LO = 1.90821492927058770002e-10  # ... and the rest
_INV_LN2 = 1.44269504088896338700e+00
_C13, _C12, _C11, _C10, _C9, _C8, _C7, _C6, _C5, _C4, _C3, _C2 = (1.0 / math.factorial(n) for n in range(13, 1, -1))


@intrinsic
def _f64_bits(typingctx, x):
    # the float64 whose bits are the int64 x
    if x != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@njit(cache=True, inline="always", error_model="numpy")
def _expm1_neg2(u):
    """expm1(-2|u|) in float64 (|u| capped at 20: the result is -1 in float64 from ~18.7 on; NaN stays NaN)."""
    a = abs(u)
    a = 20.0 if a > 20.0 else a
    x = -2.0 * a
    k = np.floor(x * _INV_LN2 + 0.5)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = _C13
    p = p * r + _C12
    p = p * r + _C11
    p = p * r + _C10
    p = p * r + _C9
    p = p * r + _C8
    p = p * r + _C7
    p = p * r + _C6
    p = p * r + _C5
    p = p * r + _C4
    p = p * r + _C3
    p = p * r + _C2
    em = r + (r * r) * p  # expm1(r)
    two_k = _f64_bits(np.int64(k + 1023.0) << 52)  # 2**k, k in [-58, 0]
    return two_k * em + (two_k - 1.0)


@njit(cache=True, inline="always", error_model="numpy")
def _tanh64(u):
    """tanh(u) in float64, within 2.3 ulp (see above)."""
    e = _expm1_neg2(u)
    t = -e / (2.0 + e)
    return t if u >= 0.0 else -t


@njit(cache=True, error_model="numpy")
def _softcap_tile(s, lo, w, n0, n1, opts):
    """The softcap of s[:n0, :n1] in place, element by element (any 2-D views, either layout).

    On entry s holds q.k (unscaled); with u = q.k * scale / c and y = c tanh(u) in score units,
    computed in float64, it leaves::

        s  = y rounded to the compute dtype              (the "hi" part)
        lo = y - s, rounded                              (lo.size 0: not kept)
        w  = c (1 - tanh(u)^2) in nats, the dS factor    (w.size 0: not kept)

    A softcapped logit near +-c rounds in float32 to ulp(c log2 e) ~ 2e-6, and a row whose logits
    all saturate has true differences far below that: s - max alone missed STYLE rule 6 by up to
    5x there (the reference's float32 twin, whose logits become exactly +-c, is exact). So every
    exponent of such a tile is taken against an anchor A = m + lo_m, the row's largest s and that
    element's own lo (``_fold_lo``)::

        x = (s - m) + (lo - lo_m)     exact for logits near the max; 0 exactly at the max itself

    and the anchor's rest goes into the saved log: row_max = m, row_log = log2(l) + lo_m, so the
    backward's ((s - row_max) + lo) - row_log is the same exponent (lo_m = 0 there: ``_probs``).
    w comes from an expm1 of -2|u| (1 - t^2 of a rounded t loses every digit when tanh saturates).
    In float32 tanh and expm1 are ``_tanh64`` / ``_expm1_neg2`` (vectorised); float64 keeps libm's.
    """
    cu, us, c = opts.softcap_u64, opts.qk_scale64, np.float64(opts.softcap)
    keep_lo, keep_w = lo.size > 0, w.size > 0
    if s.itemsize == 4:
        # -- float32 tiles: vector loops, w first (it reads q.k) --
        for i in range(n0):
            if keep_w:
                for j in range(n1):
                    # -- e = exp(-2|u|) - 1: 1 - tanh^2 = 4 (1 + e) / (2 + e)^2 --
                    e = _expm1_neg2(np.float64(s[i, j]) * us)
                    w[i, j] = c * (4.0 * (1.0 + e) / ((2.0 + e) * (2.0 + e)))
            if keep_lo:
                for j in range(n1):
                    y = cu * _tanh64(np.float64(s[i, j]) * us)
                    hi = s.dtype.type(y)
                    s[i, j] = hi
                    lo[i, j] = y - np.float64(hi)
            else:
                for j in range(n1):
                    s[i, j] = cu * _tanh64(np.float64(s[i, j]) * us)
        return
    for i in range(n0):
        for j in range(n1):
            u = np.float64(s[i, j]) * us
            y = cu * np.tanh(u)
            hi = s.dtype.type(y)
            s[i, j] = hi
            if keep_lo:
                lo[i, j] = y - np.float64(hi)
            if keep_w:
                e = math.expm1(-2.0 * abs(u))
                w[i, j] = c * (4.0 * (1.0 + e) / ((2.0 + e) * (2.0 + e)))


@njit(fastmath=FASTMATH_EXACT, cache=True)
def _anchor_lo(s, lo, n0, n1, m, lo_m, per_row):
    """lo_m[i] = lo[i, j] of the first j with s[i, j] == m[i], over s[:n0, :n1] (per_row; else the
    same down column j: lo_m[j], m[j]); rows (columns) with no such element keep their lo_m. Run it
    with m = this tile's maxima where they beat the running ones: the new anchors' rests."""
    if per_row:
        for i in range(n0):
            for j in range(n1):
                if s[i, j] == m[i]:
                    lo_m[i] = lo[i, j]
                    break
    else:
        found = np.zeros(n1, np.bool_)
        for i in range(n0):
            for j in range(n1):
                if not found[j] and s[i, j] == m[j]:
                    lo_m[j] = lo[i, j]
                    found[j] = True


@njit(fastmath=FASTMATH_EXACT, cache=True)
def _fold_lo(s, lo, n0, n1, m, lo_m, per_row):
    """s[i, j] = (s[i, j] - m[i]) + (lo[i, j] - lo_m[i]) over s[:n0, :n1] (per_row; else m[j],
    lo_m[j]), in float64 and rounded once: the exponent of a softcapped tile against its anchor
    (``_softcap_tile``), taken as exp2(s - 0) afterwards. A row (column) whose m is -inf (nothing
    allowed yet) gets -inf."""
    for i in range(n0):
        for j in range(n1):
            mi = m[i] if per_row else m[j]
            li = lo_m[i] if per_row else lo_m[j]
            if mi == -np.inf:
                mi, li = 0.0, 0.0
            # -- in float64, rounded once --
            s[i, j] = (np.float64(s[i, j]) - np.float64(mi)) + (np.float64(lo[i, j]) - np.float64(li))


@njit(fastmath=FASTMATH_EXACT, cache=True)
def _softmax_lo_t(st, lo, rows, ncols, m_i, l_i, e_i, lo_i, alpha_i, opts):
    """One online-softmax step of a softcapped float32 tile in the transposed layout (cpu_fwd:
    st[key, query lane]), under the hi/lo convention (``_softcap_tile``), in place.

    st[:ncols, :rows] holds the logits' hi parts (ALiBi, bias and mask added), lo[:ncols, :rows]
    their rests; m_i, l_i, e_i, lo_i, alpha_i: per query lane the running max of hi, sum, entropy
    sum, the anchor's rest and (output) the factor of the accumulator before this tile. st becomes
    p^T. Per lane, with the anchor A = m + lo_m (lo_m: the rest of the first element whose hi set m)::

        x     = (s - m) + (lo - lo_m)                       in float64, rounded once
        p     = exp2(x)                                     (0 below -126)
        alpha = exp2((m_old - m) + (lo_old - lo_m))         in float64
        l     = alpha l + sum p;   e = alpha (e + shift l) + sum p x

    A lane that has seen no allowed key keeps its sums (alpha 1), unless its scores hold a NaN:
    then l is NaN (``_vsoftmax``'s rules). Sums in float64.
    """
    n = rows
    anc_m = np.empty(BLOCK_M, np.float64)  # per lane: the anchor's hi (0 while the lane is dead) ...
    anc_lo = np.empty(BLOCK_M, np.float64)  # ... and its rest
    tot = np.zeros(BLOCK_M, np.float64)
    est = np.zeros(BLOCK_M, np.float64)
    # -- the tile's column max of hi (a NaN never wins) --
    cmax = np.full(BLOCK_M, -np.inf, st.dtype)
    for j in range(ncols):
        for i in range(n):
            x = st[j, i]
            cmax[i] = x if x > cmax[i] else cmax[i]
    # -- new running max; a raised one takes the rest of the first element that set it --
    for i in range(n):
        m_old = m_i[i]
        if cmax[i] > m_old:
            anc_m[i] = cmax[i]
            for j in range(ncols):
                if st[j, i] == cmax[i]:
                    anc_lo[i] = lo[j, i]
                    break
        elif m_old == -np.inf:
            anc_m[i], anc_lo[i] = 0.0, 0.0  # dead: scores are -inf (p = 0) or NaN
        else:
            anc_m[i], anc_lo[i] = m_old, lo_i[i]
    # -- p = exp2((s - m) + (lo - lo_m)), the exponent rounded once; the column sums --
    lo_x = st.dtype.type(-126.0)
    for j in range(ncols):
        for i in range(n):
            x = st.dtype.type((np.float64(st[j, i]) - anc_m[i]) + (np.float64(lo[j, i]) - anc_lo[i]))
            below = x < lo_x
            p = _exp2f(lo_x if below else x)
            p = st.dtype.type(0.0) if below else p
            st[j, i] = p
            tot[i] += p
            est[i] += np.float64(p) * np.float64(x if not below else lo_x)
    # -- rescale the running sums --
    for i in range(n):
        m_old = m_i[i]
        if m_old == -np.inf and not cmax[i] > m_old:
            # no allowed key so far: the lane stays as it was (NaN scores poison it)
            alpha_i[i] = 1.0
            if tot[i] != tot[i]:
                l_i[i] = np.nan
            continue
        if m_old == -np.inf:
            shift = 0.0
            alpha = 0.0
        else:
            shift = (np.float64(m_old) - anc_m[i]) + (np.float64(lo_i[i]) - anc_lo[i])
            alpha = np.exp2(shift)
        l_old = np.float64(l_i[i])
        l_i[i] = alpha * l_old + tot[i]
        if opts.want_stats:
            e_i[i] = alpha * (np.float64(e_i[i]) + shift * l_old) + est[i] if l_old > 0.0 else est[i]
        m_i[i] = anc_m[i]
        lo_i[i] = anc_lo[i]
        alpha_i[i] = alpha


@njit(fastmath=FASTMATH, cache=True)
def _score_terms(s, th, rows, ncols, scaled, b, h, qb, kb, kind, mask, opts):
    # s[:rows, :ncols] holds q.k, times the scale when `scaled` (never with a softcap): the softcap or
    # the scale, ALiBi, the float bias and the element-wise mask, in that order (cpu_amx's tiles
    # too); columns ncols..nc get -inf. Returns nc (ncols rounded up to a whole vector).
    # cpu_amx's bfloat16 tiles keep tanh(u) itself in th (their backward takes c (1 - th^2)); the
    # float32 kernels here use _softcap_tile's hi/lo split instead
    softcap = opts.softcap_u > 0.0
    if not softcap and not scaled:
        qk_scale = opts.qk_scale
        for i in range(rows):
            for j in range(ncols):
                s[i, j] *= qk_scale
    if softcap:
        # -- softcap: c * tanh(u), c already in score units; u, tanh(u) and the product in float64,
        # rounded once --
        cu, us = opts.softcap_u64, opts.qk_scale64
        for i in range(rows):
            for j in range(ncols):
                t = np.tanh(np.float64(s[i, j]) * us)
                th[i, j] = t
                s[i, j] = cu * t
    return _score_rest(s, rows, ncols, b, h, qb, kb, kind, mask, opts, True)


@njit(fastmath=FASTMATH, cache=True)
def _score_rest(s, rows, ncols, b, h, qb, kb, kind, mask, opts, alibi):
    # the terms after the scale or softcap: ALiBi (unless `alibi` is False: _qk_split adds it in
    # float64), the float bias, the element-wise mask, -inf in the padding columns ncols..nc.
    # Returns nc (ncols rounded up to a whole vector).
    r0, c0 = qb * BLOCK_M, kb * BLOCK_N
    nc = _padded(ncols)
    if alibi and mask.alibi.size > 0:
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
        # -- element-wise mask: only partial tiles pay for it --
        _mask_tile(s, rows, ncols, b, h, qb, kb, mask)
    if ncols < nc:
        # -- padding columns past the last key --
        for i in range(rows):
            for j in range(ncols, nc):
                s[i, j] = -np.inf
    return nc


@njit(cache=True)
def _probs(s, p, rows, nc, row_max, row_log, b, h, r0, opts, lo=None):
    # -- probabilities from the saved log-sum-exp: p = exp((s - max) - log l), in this order; with a
    # softcap's lo (size > 0) p = exp(((s - max) + lo) - log l), as the forward took them --
    folded = lo is not None and lo.size > 0
    for i in range(rows):
        m = row_max[b, h, r0 + i]
        if m == -np.inf:
            for j in range(nc):
                p[i, j] = opts.zero
        else:
            if folded:
                for j in range(nc):
                    s[i, j] = (np.float64(s[i, j]) - np.float64(m)) + np.float64(lo[i, j])  # rounded once
                m = opts.zero
            _vec_exp2_row(_addr(s) + i * s.strides[0], _addr(p) + i * p.strides[0], nc, m, row_log[b, h, r0 + i],
                          opts.exp_lo, np.intp(0), s)


# -- kernels ------------------------------------------------------------------------------------
# Each kernel is a loop over independent tasks, run by numba's thread pool (prange); its
# ``*_serial`` twin runs the same tasks in the calling thread, so that one thread does not pay
# the pool's wake-up per call (about 80 us with the workqueue layer). A task is one `_*_task`
# call either way. The twins repeat their three-line loop on purpose: numba caches compiled code
# per Python function, so one function cannot be compiled both ways.


@njit(cache=True)
def _query_task(t, q, k, tiles):
    # task t of a kernel with one task per (batch, head, query block): (b, h, its kv head hk,
    # query block qb, first row r0, rows, and the tile map's batch and head indices)
    B, Hq, Lq, D = q.shape
    nQ = (Lq + BLOCK_M - 1) // BLOCK_M
    qb = t % nQ
    h = (t // nQ) % Hq
    b = t // (nQ * Hq)
    r0 = qb * BLOCK_M
    return b, h, h // (Hq // k.shape[1]), qb, r0, min(BLOCK_M, Lq - r0), _bx(tiles.shape[0], b), _bx(tiles.shape[1], h)


@njit(fastmath=FASTMATH, cache=True)
def _finish_rows(acc, m_i, l_i, e_i, lo_i, rows, b, h, r0, out, row_max, row_log, ent, opts):
    # a forward task's last step, every forward kernel's (cpu_fwd's and cpu_amx's too): out = acc / l
    # (a uint16 out: as bfloat16 bits) and the rows' lse halves and entropy; lo_i (size 0: none) is the
    # anchors' rests (_fold_lo)
    Dv = out.shape[3]
    for i in range(rows):
        gi = r0 + i
        li = l_i[i]
        if li == 0.0:
            # fully-masked row: out 0, lse -inf, max -inf, entropy 0
            for d in range(Dv):
                _put(out, b, h, gi, d, 0.0)
            row_max[b, h, gi] = -np.inf
            row_log[b, h, gi] = 0.0
            ent[b, h, gi] = 0.0
        else:
            inv = 1.0 / li
            for d in range(Dv):
                _put(out, b, h, gi, d, acc[i, d] * inv)
            row_max[b, h, gi] = m_i[i] if li == li else np.nan  # a NaN row is NaN throughout ...
            row_log[b, h, gi] = (math.log2(li) if opts.base2 else math.log(li)) + (lo_i[i] if lo_i.size > 0 else 0.0)
            if li != li and m_i[i] == np.inf:
                # ... but a +inf logit (its exp(inf - inf) made l NaN) has lse and max_logit +inf, as the
                # reference's (max and log of a sum that is +inf); the output and entropy stay NaN
                row_max[b, h, gi] = np.inf
                row_log[b, h, gi] = 0.0
            if opts.want_stats:
                # -- entropy H = ln l - sum p (s - m) / l, in nats --
                h_row = math.log(li) - e_i[i] * inv * opts.nat
                ent[b, h, gi] = h_row if h_row > 0.0 or h_row != h_row else 0.0


@njit(fastmath=FASTMATH, cache=True)
def _fwd_task(t, q, k, kt, v, out, row_max, row_log, ent, counts, mask, opts):
    B, Hq, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    nK = (Lk + BLOCK_N - 1) // BLOCK_N
    nat = opts.nat  # nats per score unit
    tiles = mask.tiles
    b, h, hk, qb, r0, rows, tb, th_ = _query_task(t, q, k, tiles)
    q_blk = q[b, h, r0:r0 + rows]
    s = np.empty((BLOCK_M, BLOCK_N), q.dtype)
    p = np.empty((BLOCK_M, BLOCK_N), q.dtype)
    # a few query rows (decoding): dot products beat transposing the keys; every pass decides
    # the same way per query block, so a pair's score is bit-identical in all of them. In float32
    # without a softcap they are float64 dot products kept as hi + lo (_qk_split)
    use_dot = rows < 4
    split = use_dot and opts.base2 and opts.softcap_u <= 0.0
    # the logits as hi + lo (a softcap's or _qk_split's), exponents against an anchor (_softcap_tile)
    fold = opts.softcap_u > 0.0 and opts.fold_lo or split
    lo = np.zeros((BLOCK_M, BLOCK_N) if fold else (0, 0), q.dtype)  # the rest of each logit
    no_w = np.empty((0, 0), q.dtype)
    m_fold = np.empty(BLOCK_M, q.dtype)  # the running maxima after this tile ...
    lo_fold = np.zeros(BLOCK_M, q.dtype)  # ... and the rests of their anchors (_softcap_tile)
    lo_i = np.zeros(BLOCK_M, q.dtype)  # the anchors' rests before this tile
    acc = np.zeros((BLOCK_M, Dv), q.dtype)
    alpha_i = np.ones(BLOCK_M, q.dtype)  # per row: the factor of acc before this tile's share
    stat = np.zeros(1 if opts.want_stats else 0, q.dtype)
    # the product's factor and the score units per unit of s (_raw_units; hi + lo: score units)
    store, cu64 = _raw_units(opts.qk_scale, opts.softcap_u, opts.base2, mask.alibi.size > 0 or mask.bias.size > 0)
    if split:
        store, cu64 = 1.0, 1.0
    cu = q.dtype.type(cu64)
    # keys arrive transposed, kt (B, Hkv, D, Lk), unless kt has no columns: then (one key block,
    # which every task meets once) each tile transposes its own
    local_kt = not use_dot and kt.shape[3] < Lk
    kt_buf = np.zeros((D, BLOCK_N) if local_kt else (0, 0), q.dtype)
    m_i = np.full(BLOCK_M, -np.inf, q.dtype)
    l_i = np.zeros(BLOCK_M, q.dtype)
    e_i = np.zeros(BLOCK_M, q.dtype)
    n_tiles = 0
    for kb in range(nK):
        kind = tiles[tb, th_, qb, kb]
        if kind == EMPTY:
            continue
        n_tiles += 1
        c0 = kb * BLOCK_N
        ncols = min(BLOCK_N, Lk - c0)
        if use_dot:
            kt_blk = kt[0, 0, :, 0:0]
        elif local_kt:
            _load_t(k[b, hk], c0, ncols, kt_buf)
            kt_blk = kt_buf[:, :ncols]
        else:
            kt_blk = kt[b, hk, :, c0:c0 + ncols]
        nc = _scores_by(q_blk, k[b, hk], kt_blk, use_dot, s, lo, no_w, rows, b, h, qb, kb, kind, mask, opts, store)
        if fold:
            # -- hi + lo: the new running maxima and their anchors' rests first, then s becomes
            # the exponent (s - max) + (lo - lo_max) --
            # (a row whose max stays keeps its anchor: its m_fold is NaN, which no element matches; an inf
            # there matched a +inf score (a +inf bias or query) in a row not raised, and a raised row's +inf
            # max read as "not raised": the row kept m = -inf and came out fully masked, lse -inf, output 0)
            for i in range(rows):
                m_tile = _row_max(s, i, nc)
                m_fold[i] = m_tile if m_tile > m_i[i] else np.nan
                lo_fold[i] = lo_i[i]
            _anchor_lo(s, lo, rows, nc, m_fold, lo_fold, True)
            for i in range(rows):
                m_fold[i] = m_fold[i] if m_fold[i] == m_fold[i] else m_i[i]
            _fold_lo(s, lo, rows, nc, m_fold, lo_fold, True)
        for i in range(rows):
            # -- new running max --
            m_old = m_i[i]
            if fold:
                m_new = m_fold[i]
            else:
                m_tile = _row_max(s, i, nc)
                m_new = m_tile if m_tile > m_old else m_old
            alpha_i[i] = 1.0
            if m_new == -np.inf:
                # nothing allowed here so far -- unless the scores are NaN (NaN inputs): poison the row
                for j in range(nc):
                    p[i, j] = 0.0
                if _row_has_nan(s, i, nc):
                    l_i[i] = np.nan
                continue
            # -- p = exp((s - m_new) cu), its row sum and sum p*(s - m_new) cu --
            tot = _exp2_row_c(s, p, i, nc, opts.zero if fold else m_new, cu, stat)
            # -- rescale the running sums; the accumulator's factor goes to the P V product --
            l_old = l_i[i]
            # (hi + lo: the anchor moves by its rest too: lo_i, lo_fold)
            shift = (m_old - m_new) + (lo_i[i] - lo_fold[i]) if fold else _diff_units(m_old, m_new, cu)
            if m_old == m_new:
                alpha = 1.0
            elif m_old == -np.inf:
                alpha = 0.0
            else:
                alpha = math.exp(shift * nat)
            l_i[i] = alpha * l_old + tot
            if opts.want_stats:
                ps = stat[0]
                e_i[i] = alpha * (e_i[i] + shift * l_old) + ps if l_old > 0.0 else ps
            m_i[i] = m_new
            if fold:
                lo_i[i] = lo_fold[i]
            alpha_i[i] = alpha
        # -- acc = alpha * acc + p @ v: the tile's share summed apart, then added in one FMA
        # (rounding grows with the number of key blocks, not of keys: one running sum was 5x the
        # float32 reference's error at 4096) --
        _mm(p, v[b, hk, c0:c0 + ncols], acc, rows, ncols, Dv, 1.0, RESCALE, alpha_i)
    # -- the running max in score units: row_max = m * cu rounded, its rest into row_log --
    if not fold:
        lo_i = _max_in_units(m_i, rows, cu)
    _finish_rows(acc, m_i, l_i, e_i, lo_i, rows, b, h, r0, out, row_max, row_log, ent, opts)
    counts[t] = n_tiles


@njit(parallel=True, cache=True)
def flash_fwd(q, k, kt, v, out, row_max, row_log, ent, counts, mask, opts):
    """One task per (batch, head, query block) (``counts`` has one entry each): online softmax
    over its non-empty key tiles.

    Writes out (B, Hq, Lq, Dv) and, each (B, Hq, Lq), the log-sum-exp as row_max + row_log (the
    row's largest score and the log of its sum of exp(s - max), in score units: kept apart, p is
    exact to rounding in the backward pass even for huge scores) and ent (nats); counts[task] =
    number of tiles it computed.
    """
    for t in prange(counts.shape[0]):
        _fwd_task(t, q, k, kt, v, out, row_max, row_log, ent, counts, mask, opts)


@njit(cache=True)
def flash_fwd_serial(q, k, kt, v, out, row_max, row_log, ent, counts, mask, opts):
    for t in range(counts.shape[0]):
        _fwd_task(t, q, k, kt, v, out, row_max, row_log, ent, counts, mask, opts)


# -- backward ---------------------------------------------------------------------------------


@njit(fastmath=FASTMATH, cache=True)
def _bwd_kv_task(t, q, k, v, do, row_max, row_log, delta, dk, dv, dq, counts, mask, opts):
    # dK and dV of one (batch, kv head, key block) over every query head of its group, from the
    # delta that flash_bwd_q left. With one key block in all (Lk <= BLOCK_N) it does the whole
    # backward pass instead: delta = rowsum(P * dP) is then complete within the tile, and dq has a
    # size > 0 to say so (each task owns the query rows of its group, so it writes their dQ too).
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hkv
    nQ = (Lq + BLOCK_M - 1) // BLOCK_M
    nK = (Lk + BLOCK_N - 1) // BLOCK_N
    one_pass = dq.size > 0
    softcap, dscale = opts.softcap, opts.dscale
    tiles = mask.tiles
    kb = t % nK
    hk = (t // nK) % Hkv
    b = t // (nK * Hkv)
    c0 = kb * BLOCK_N
    tb = _bx(tiles.shape[0], b)
    s = np.empty((BLOCK_M, BLOCK_N), q.dtype)
    p = np.empty((BLOCK_M, BLOCK_N), q.dtype)
    dp = np.empty((BLOCK_M, BLOCK_N), q.dtype)
    lo = np.zeros((BLOCK_M, BLOCK_N) if softcap > 0.0 and opts.fold_lo else (0, 0), q.dtype)  # _softcap_tile's rest
    w = np.empty((BLOCK_M, BLOCK_N) if softcap > 0.0 else (0, 0), q.dtype)  # ... and dS factor
    ncols = min(BLOCK_N, Lk - c0)
    kt = np.zeros((D, BLOCK_N), q.dtype)
    vt = np.zeros((Dv, BLOCK_N), q.dtype)
    _load_t(k[b, hk], c0, ncols, kt)
    _load_t(v[b, hk], c0, ncols, vt)
    # dK and dV are sums over every query row of the group: each tile's share is computed on its
    # own and then added to the total, so rounding grows with the number of query blocks rather
    # than of query rows (a single running sum was 3-5x the float32 reference's error at 4096
    # causal queries)
    dk_blk = np.zeros((BLOCK_N, D), q.dtype)
    dv_blk = np.zeros((BLOCK_N, Dv), q.dtype)
    dq_blk = np.empty((BLOCK_M if one_pass else 0, D), q.dtype)
    n_tiles = 0
    for g in range(group):
        h = hk * group + g
        th_ = _bx(tiles.shape[1], h)
        for qb in range(nQ):
            kind = tiles[tb, th_, qb, kb]
            r0 = qb * BLOCK_M
            rows = min(BLOCK_M, Lq - r0)
            if kind == EMPTY:
                if one_pass:
                    # -- rows that meet no key: dQ = 0 --
                    for i in range(rows):
                        for d in range(D):
                            dq[b, h, r0 + i, d] = 0.0
                continue
            n_tiles += 1
            q_blk = q[b, h, r0:r0 + rows]
            do_blk = do[b, h, r0:r0 + rows]
            nc = _scores(q_blk, k[b, hk], kt, rows < 4, s, lo, w, rows, b, h, qb, kb, kind, mask, opts)
            _probs(s, p, rows, nc, row_max, row_log, b, h, r0, opts, lo)
            # -- dV += P^T dO --
            _mm_tn(p, do_blk, dv_blk, ncols, rows, ADD)
            # -- dP = dO V^T --
            _mm(do_blk, vt, dp, rows, Dv, ncols)
            # -- dS = P * (dP - delta), times the softcap's c (1 - tanh^2) --
            for i in range(rows):
                if one_pass and delta.size == 0:
                    # -- delta = rowsum(P * dP) in float64, kept in float64: in rows of a few keys
                    # dP - delta cancels. (Not divided by rowsum(P), which would undo P's rounding:
                    # with attention sinks the keys' P sums to 1 - p_sink) --
                    d64 = 0.0
                    for j in range(ncols):
                        d64 += np.float64(p[i, j]) * np.float64(dp[i, j])
                    di = d64
                else:
                    di = np.float64(delta[b, h, r0 + i])
                for j in range(ncols):
                    dp[i, j] = p[i, j] * (dp[i, j] - di)
                if softcap > 0.0:
                    for j in range(ncols):
                        dp[i, j] *= w[i, j]
            # -- dK += dS^T q --
            _mm_tn(dp, q_blk, dk_blk, ncols, rows, ADD)
            if one_pass:
                # -- dQ = dS k --
                _mm(dp, k[b, hk, c0:c0 + ncols], dq_blk, rows, ncols, D)
                for i in range(rows):
                    for d in range(D):
                        dq[b, h, r0 + i, d] = dq_blk[i, d] * dscale
    for j in range(ncols):
        for d in range(D):
            dk[b, hk, c0 + j, d] = dk_blk[j, d] * dscale
        for d in range(Dv):
            dv[b, hk, c0 + j, d] = dv_blk[j, d]
    counts[t] = n_tiles


@njit(parallel=True, cache=True)
def flash_bwd_kv(q, k, v, do, row_max, row_log, delta, dk, dv, dq, counts, mask, opts):
    """dK and dV: one task per (batch, kv head, key block), over every query head of its group.

    dk (B, Hkv, Lk, D) gets dscale * dS^T q, dv (B, Hkv, Lk, Dv) gets P^T dO. Runs after
    ``flash_bwd_q`` (it reads its delta) -- unless dq is given (size > 0; then Lk <= BLOCK_N): with
    one key block it is the whole backward pass, dq (B, Hq, Lq, D) included, and an empty delta
    is computed within the tile (a given one is used as it is).
    """
    for t in prange(counts.shape[0]):
        _bwd_kv_task(t, q, k, v, do, row_max, row_log, delta, dk, dv, dq, counts, mask, opts)


@njit(cache=True)
def flash_bwd_kv_serial(q, k, v, do, row_max, row_log, delta, dk, dv, dq, counts, mask, opts):
    for t in range(counts.shape[0]):
        _bwd_kv_task(t, q, k, v, do, row_max, row_log, delta, dk, dv, dq, counts, mask, opts)


@njit(fastmath=FASTMATH, cache=True)
def _bwd_q_task(t, q, k, kt, v, vt, do, out, row_max, row_log, delta, dq, counts, mask, opts):
    B, Hq, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    nK = (Lk + BLOCK_N - 1) // BLOCK_N
    softcap = opts.softcap
    tiles = mask.tiles
    b, h, hk, qb, r0, rows, tb, th_ = _query_task(t, q, k, tiles)
    q_blk = q[b, h, r0:r0 + rows]
    do_blk = do[b, h, r0:r0 + rows]
    s = np.empty((BLOCK_M, BLOCK_N), q.dtype)
    p = np.empty((BLOCK_M, BLOCK_N), q.dtype)
    dp = np.empty((BLOCK_M, BLOCK_N), q.dtype)
    lo = np.zeros((BLOCK_M, BLOCK_N) if softcap > 0.0 and opts.fold_lo else (0, 0), q.dtype)  # _softcap_tile's rest
    w = np.empty((BLOCK_M, BLOCK_N) if softcap > 0.0 else (0, 0), q.dtype)  # ... and dS factor
    use_dot = rows < 4
    pdk = np.zeros((BLOCK_M, D), q.dtype)  # sum_j p (dP - c) k
    pk = np.zeros((BLOCK_M, D), q.dtype)  # sum_j p k
    dl = np.zeros(BLOCK_M, np.float64)  # sum_j p dP
    c = np.zeros(BLOCK_M, q.dtype)
    # an empty `out` means delta is given (a shard of the keys: only the whole row's delta is right)
    external = out.shape[0] == 0
    for i in range(rows):
        if external:
            c[i] = delta[b, h, r0 + i]
            continue
        ci = c[i]
        for d in range(Dv):
            ci += do[b, h, r0 + i, d] * out[b, h, r0 + i, d]
        c[i] = ci
    n_tiles = 0
    # the forward's walk over the block's non-empty key tiles (_fwd_task), repeated on purpose:
    # each pass keeps its whole loop body in view
    for kb in range(nK):
        kind = tiles[tb, th_, qb, kb]
        if kind == EMPTY:
            continue
        n_tiles += 1
        c0 = kb * BLOCK_N
        ncols = min(BLOCK_N, Lk - c0)
        kt_blk = kt[b, hk, :, c0:c0 + ncols] if not use_dot else kt[0, 0, :, 0:0]
        nc = _scores(q_blk, k[b, hk], kt_blk, use_dot, s, lo, w, rows, b, h, qb, kb, kind, mask, opts)
        _probs(s, p, rows, nc, row_max, row_log, b, h, r0, opts, lo)
        # -- dP = dO V^T --
        _mm(do_blk, vt[b, hk, :, c0:c0 + ncols], dp, rows, Dv, ncols)
        # -- delta += rowsum(P * dP); dP becomes P * (dP - c) (columns past Lk hold no keys) --
        for i in range(rows):
            acc = dl[i]
            ci = c[i]
            for j in range(ncols):
                acc += np.float64(p[i, j]) * np.float64(dp[i, j])
                dp[i, j] = p[i, j] * (dp[i, j] - ci)
            dl[i] = acc
            if softcap > 0.0:
                # -- the softcap's c (1 - tanh^2) multiplies both terms of dS --
                for j in range(ncols):
                    dp[i, j] *= w[i, j]
                    p[i, j] *= w[i, j]
        # -- accumulate (P * (dP - c)) k and P k, each tile's share added to the total --
        _mm(dp, k[b, hk, c0:c0 + ncols], pdk, rows, ncols, D, 1.0, ADD)
        if not external:
            _mm(p, k[b, hk, c0:c0 + ncols], pk, rows, ncols, D, 1.0, ADD)
    for i in range(rows):
        gi = r0 + i
        if external:
            for d in range(D):
                dq[b, h, gi, d] = pdk[i, d] * opts.dscale
            continue
        # -- delta = rowsum(P * dP), summed in float64 (see _bwd_kv_task) --
        di = dl[i]
        delta[b, h, gi] = di
        shift = di - c[i]
        for d in range(D):
            dq[b, h, gi, d] = (pdk[i, d] - shift * pk[i, d]) * opts.dscale
    counts[t] = n_tiles


@njit(parallel=True, cache=True)
def flash_bwd_q(q, k, kt, v, vt, do, out, row_max, row_log, delta, dq, counts, mask, opts):
    """dQ and delta: one task per (batch, head, query block), run before ``flash_bwd_kv``.

    dS = P * (dP - delta) with delta = rowsum(P * dP). c = rowsum(dO * O) is delta up to the
    rounding of the output; one sweep over the key tiles computes
    dQ = (P * (dP - c)) k - (delta - c) * (P k) and the exact delta from the same P and dP that
    dS uses, and leaves that delta for ``flash_bwd_kv``. Writes dq (B, Hq, Lq, D), times dscale.

    With an empty ``out`` (shape (0, ...)) delta is an input instead (a shard of the keys, whose
    P does not sum to the row's: the caller passes the whole row's rowsum(dO * O)), and
    dQ = (P * (dP - delta)) k.
    """
    for t in prange(counts.shape[0]):
        _bwd_q_task(t, q, k, kt, v, vt, do, out, row_max, row_log, delta, dq, counts, mask, opts)


@njit(cache=True)
def flash_bwd_q_serial(q, k, kt, v, vt, do, out, row_max, row_log, delta, dq, counts, mask, opts):
    for t in range(counts.shape[0]):
        _bwd_q_task(t, q, k, kt, v, vt, do, out, row_max, row_log, delta, dq, counts, mask, opts)
