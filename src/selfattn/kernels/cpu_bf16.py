"""bfloat16 block products for the CPU flash kernels: AVX512-BF16's ``vdpbf16ps`` and AMX (issue 14).

``vdpbf16ps`` multiplies *pairs* of bfloat16 numbers and adds both products to one float32
lane: ``acc[l] += a[2l] * b[2l] + a[2l + 1] * b[2l + 1]`` over 16 lanes. A product
C = A @ B therefore reads A two reduction steps at a time (the pair a[i, 2p], a[i, 2p + 1] is one
32-bit word, broadcast to every lane) and wants B in *pair* ("VNNI") layout, where one 32-bit
element holds the two B entries that meet that word::

    B (K x N)   ->   Bp (ceil(K/2), N, 2)      Bp[p, n, 0] = B[2p, n],  Bp[p, n, 1] = B[2p + 1, n]

    B = [[b00 b01 b02]        Bp[0] = [[b00 b10] [b01 b11] [b02 b12]]
         [b10 b11 b12]        Bp[1] = [[b20  0 ] [b21  0 ] [b22  0 ]]    (odd K: zero pad)
         [b20 b21 b22]]

bfloat16 arrays are numpy ``uint16`` (or ``int16``) views of the bits, e.g.
``t.view(torch.int16).numpy().view(np.uint16)`` for a torch.bfloat16 tensor ``t``. Sums are float32.

Public pieces (all njit-callable from other numba code; none allocates):

- ``to_bf16(x, out)``: float32 -> bfloat16 bits, round to nearest even, bit for bit as torch's
  ``x.to(torch.bfloat16)`` (subnormals kept, NaN -> 0xFFFF as torch's vectorised CPU conversion).
- ``pack_pairs(x, out)``: x (K x N), bfloat16 bits or float32 (converted) -> out (ceil(K/2), N, 2),
  pairs along x's rows. B of a product, or A^T of one whose A is given transposed (``mm_bf16_tn``).
- ``pack_pairs_t(x, out)``: x (N x K) -> out (ceil(K/2), N, 2): the pairs of x^T (e.g. K^T from K).
- ``mm_bf16(a, bp, c, m, kdim, n)``: c[:m, :n] = a[:m, :kdim] @ B, a row-major bfloat16 bits,
  ``bp`` = pack_pairs(B); the contract of ``cpu_flash._mm``. ``mm_bf16_add``: c += the same.
- ``mm_bf16_tn(ap, bp, c, m, kdim, n)``: c[:m, :n] = A @ B with ``ap`` = pack_pairs(A^T) (the
  backward's products reduced over query rows: dV += P^T dO, dK += dS^T Q); ``mm_bf16_tn_add``.
- ``to_bf16_rows(x, out, m, n)``: the CPU's own conversion (vcvtneps2bf16, ~3x ``to_bf16``): the same
  bits except that subnormal inputs become zero; exact for P (0 or >= 2**-126). Needs AVX512-BF16.
- ``pack_pairs_rows(x, out, kdim, n)``: ``pack_pairs`` of float32 rows with the CPU's conversion
  (0.37 us per 64x64 against 0.65): P and dS as the B of a product reduced over query rows.
- AMX (``has_amx_bf16()``): ``amx_begin()``, ``mm_amx(a, bp, c, m, kdim, n)`` / ``mm_amx_add``,
  ``amx_end()``: the same product on the tile unit (tdpbf16ps), whole 16 x 16 tiles on zero-padded
  operands (the contract is above ``mm_amx``). AMX has no transposed-A form, so the backward's
  dV += P^T dO and dK += dS^T Q are best computed transposed: dV^T (Dv x keys) += dO^T @ P with
  dO^T (bf16, Dv x Lq) made once per head and B = pack_pairs_rows(P); ``to_bf16_t(x, out)`` (P^T
  itself) is a scalar transpose, ~6 us per 64x64 tile: for tests and small cases.

Recipes per tile (bf16 inputs; K^T, V, K packed once per head: the packing costs 0.3-1 us a block):

    S     = Q_blk @ K^T      mm_bf16 / mm_amx(q_blk, pack_pairs_t(K), s)
    P V   (into acc)         to_bf16_rows(p) -> mm_bf16_add / mm_amx_add(p16, pack_pairs(V), acc)
    dP    = dO_blk @ V^T     mm_*(do_blk, pack_pairs_t(V), dp)
    dQ    = dS @ K           to_bf16_rows(ds) -> mm_*(ds16, pack_pairs(K), dq)
    dV^T += dO^T @ P         mm_amx_add(dO^T, pack_pairs_rows(p), dvt)   (vdpbf16ps: mm_bf16_tn_add
    dK^T += Q^T @ dS         mm_amx_add(Q^T, pack_pairs_rows(ds), dkt)    with A = pack_pairs(P), ...)

Run-time detection
------------------
``has_bf16_dot()`` is True when LLVM's host features have ``+avx512f`` and ``+avx512bf16`` (and
numba's LLVM is 17 or newer, for its bfloat type) and the environment variable
``SELFATTN_CPU_BF16`` is not ``0``. Set ``SELFATTN_CPU_BF16=0`` to force the float32 fallback on a
host that has the instructions (to test the fallback, or to compare). ``bf16_dot_pays()`` adds a
measurement: vdpbf16ps's FLOP rate at least 1.25x the float32 FMA's (once per process, ~7 ms).
On a host without them the products refuse to compile (a numba typing error naming this module),
so no ``vdpbf16ps`` ever reaches LLVM there; packing and conversion work everywhere.
``has_amx_bf16()`` is True when the CPU has AMX-TILE and AMX-BF16 and Linux granted this process the
tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM)``, asked once at import), unless ``SELFATTN_CPU_AMX=0``
or ``SELFATTN_CPU_BF16=0``.

Which one is faster depends on the CPU (benchmarks/bench_bf16_mk.py, one thread): on the Intel Xeon
of issue 14's second session (AVX512-BF16 and AMX) vdpbf16ps issues once per two cycles, so its
ceiling is half the float32 FMA ceiling (~76 vs ~150 GFLOP/s) and ``mm_bf16`` runs at 0.5-0.8x the
float32 ``_mm``; ``mm_amx`` ran 3-10x ``_mm`` on 64-row tiles (noisy: the tile unit is shared). Where
vdpbf16ps runs at the FMA rate (AMD Zen 4/5) ``mm_bf16`` should approach 2x float32.
Both ``vdpbf16ps`` and ``tdpbf16ps`` treat subnormal bfloat16 inputs as zero and flush subnormal
results (DAZ/FTZ), whatever MXCSR says.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from llvmlite.binding import llvm_version_info
from numba import njit, types
from numba.core import cgutils, errors
from numba.core import config as numba_config
from numba.extending import intrinsic, overload

from selfattn.kernels import numba_cache_dir
from selfattn.kernels.cpu_flash import K_SEGMENT, NAN_BITS, _ptr, _rne  # noqa: F401 (NAN_BITS: this module's name for it)
from selfattn.kernels import cpu_flash as _flash_src, stamp_sources

# numba fixes a function's cache place when it is decorated: the kernels' place (selfattn.kernels:
# next to this file when writable, else a per-user directory) for every function below, numba's
# own setting restored at the end of this module
_CACHE_DIR, _NUMBA_CACHE_DIR = numba_cache_dir(), numba_config.CACHE_DIR
if _CACHE_DIR is not None:
    numba_config.CACHE_DIR = _CACHE_DIR

ENV_FLAG = "SELFATTN_CPU_BF16"  # "0": has_bf16_dot() is False whatever the CPU
MR = 6  # rows of C per micro-kernel call: 6 x 4 accumulators + 4 B vectors of the 32 zmm registers
TILE_N = 64  # most columns of C per micro-kernel call (4 vectors of 16 float32)


def _host_features() -> set[str]:
    import llvmlite.binding as ll

    return set(ll.get_host_cpu_features().flatten().split(","))


def host_has_bf16_dot() -> bool:
    """The CPU has AVX-512 and AVX512-BF16 (LLVM's host features) and numba's LLVM is 17 or newer (its
    bfloat IR type and intrinsic signatures), whatever the environment says."""
    f = _host_features()
    return "+avx512f" in f and "+avx512bf16" in f and llvm_version_info[0] >= 17


_HOST_BF16 = host_has_bf16_dot()


def has_bf16_dot() -> bool:
    """Whether the bfloat16 products may be used: the CPU has them and ``SELFATTN_CPU_BF16`` != ``0``."""
    return _HOST_BF16 and os.environ.get(ENV_FLAG, "1").strip() != "0"


# -- conversion and packing (portable numba) --------------------------------------------------------


def _bits(x):
    """The bfloat16 bits of one element: rounded from float32, as is from uint16/int16 bits."""


@overload(_bits)
def _bits_impl(x):
    if x == types.float32:
        return lambda x: _rne(x)
    if x in (types.uint16, types.int16):
        return lambda x: np.uint16(x)
    return None


@njit(cache=True)
def to_bf16(x, out):
    """out[i, j] = bfloat16 bits of float32 x[i, j] (round to nearest even), over x's shape."""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[i, j] = _rne(x[i, j])


@njit(cache=True)
def _word(lo, hi):
    # two bfloat16 bits as one little-endian 32-bit pair: lo in the low half (read first)
    return np.uint32(_bits(lo)) | (np.uint32(_bits(hi)) << np.uint32(16))


@njit(cache=True)
def pack_pairs(x, out):
    """out[p, n, h] = x[2p + h, n] as bfloat16 bits (0 past x's last row): x (K, N) -> (ceil(K/2), N, 2).
    ``out``'s pairs contiguous (its last axis); x: uint16/int16 bits or float32 (rounded as to_bf16)."""
    kdim, n = x.shape
    o = out.view(np.uint32)  # (ceil(K/2), N, 1): one pair per word
    for p in range(kdim // 2):
        for j in range(n):
            o[p, j, 0] = _word(x[2 * p, j], x[2 * p + 1, j])
    if kdim % 2:
        for j in range(n):
            o[kdim // 2, j, 0] = np.uint32(_bits(x[kdim - 1, j]))


@njit(cache=True)
def pack_pairs_t(x, out):
    """out[p, n, h] = x[n, 2p + h] as bfloat16 bits (0 past x's last column): x (N, K) -> (ceil(K/2), N, 2)."""
    n, kdim = x.shape
    half = kdim // 2
    o = out.view(np.uint32)
    if x.itemsize == 2 and kdim % 2 == 0 and x.strides[1] == 2:
        # bfloat16 rows already hold their pairs as words: a transpose of 32-bit words
        xw = x.view(np.uint32)
        for p in range(half):  # (this order measured 3x the other: rows of out written whole)
            for j in range(n):
                o[p, j, 0] = xw[j, p]
        return
    for p in range(half):
        for j in range(n):
            o[p, j, 0] = _word(x[j, 2 * p], x[j, 2 * p + 1])
    if kdim % 2:
        for j in range(n):
            o[half, j, 0] = np.uint32(_bits(x[j, kdim - 1]))


def unpack_pairs(packed: np.ndarray, kdim: int) -> np.ndarray:
    """The (kdim, N) bits that ``pack_pairs`` packed (for tests and debugging)."""
    p, n, _ = packed.shape
    return packed.transpose(0, 2, 1).reshape(2 * p, n)[:kdim]


# -- the micro-kernel: LLVM IR through a numba intrinsic ---------------------------------------------


class _BFloat(ir.Type):
    # LLVM's bfloat scalar type, which llvmlite's IR builder lacks
    intrinsic_name = "bf16"

    def __str__(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


def _make_microkernel(rows):
    @intrinsic
    def microkernel(typingctx, pa, sa0, sa1, pb, sb, pc, sc, n, kdim, accumulate):
        # c[:rows, :n] (+)= a[:rows, :kdim] @ b at raw addresses, strides in BYTES:
        #   pair p of A's row i: the 32-bit word at pa + i*sa0 + p*sa1 (its low half a[i, 2p]);
        #   B packed: pair row p at pb + p*sb, n words; C row i at pc + i*sc, n float32
        # n <= TILE_N; an odd kdim's last pair reads only a[i, kdim - 1] (B's padding is zero)
        if not _HOST_BF16:
            raise errors.TypingError("selfattn.kernels.cpu_bf16: this CPU has no AVX512-BF16 (check has_bf16_dot() first)")
        sig = types.void(*([types.intp] * 9), types.boolean)

        def codegen(context, builder, signature, args):
            pa, sa0, sa1, pb, sb, pc, sc, n, kdim, accumulate = args
            mod = builder.module
            i1, i16, i32, i64, f32 = ir.IntType(1), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
            fv, iv = ir.VectorType(f32, 16), ir.VectorType(i32, 16)
            mty = ir.VectorType(i1, 16)
            pty = ir.VectorType(_BFloat(), 32)  # the dot's pair operands (LLVM >= 17: host_has_bf16_dot)
            dot = cgutils.get_or_insert_function(mod, ir.FunctionType(fv, [fv, pty, pty]), "llvm.x86.avx512bf16.dpbf16ps.512")
            mload_i = cgutils.get_or_insert_function(
                mod, ir.FunctionType(iv, [ir.PointerType(iv), i32, mty, iv]), f"llvm.masked.load.v16i32.{_ptr('v16i32')}")
            mload_f = cgutils.get_or_insert_function(
                mod, ir.FunctionType(fv, [ir.PointerType(fv), i32, mty, fv]), f"llvm.masked.load.v16f32.{_ptr('v16f32')}")
            mstore_f = cgutils.get_or_insert_function(
                mod, ir.FunctionType(ir.VoidType(), [fv, ir.PointerType(fv), i32, mty]), f"llvm.masked.store.v16f32.{_ptr('v16f32')}")
            c = lambda x: ir.Constant(i64, x)  # noqa: E731
            align4, fzero, izero = ir.Constant(i32, 4), ir.Constant(fv, None), ir.Constant(iv, None)

            def splat(x, ty):
                v = builder.insert_element(ir.Constant(ir.VectorType(ty, 16), None), x, ir.Constant(i32, 0))
                return builder.shuffle_vector(v, v, ir.Constant(iv, [0] * 16))

            def ptr(base, off, ty):
                return builder.inttoptr(builder.add(base, off), ir.PointerType(ty))

            def a_word(i, p, tail):
                # A's pair (row i, pair p) as an i32 in every lane; the odd tail reads one bfloat16
                off = builder.add(builder.mul(c(i), sa0), builder.mul(p, sa1))
                if tail:
                    w = builder.zext(builder.load(ptr(pa, off, i16), align=2), i32)
                else:
                    w = builder.load(ptr(pa, off, i32), align=2)
                return builder.bitcast(splat(w, i32), pty)

            def step(p, accs, masks, nvec, tail):
                brow = builder.mul(p, sb)
                bvec = [builder.bitcast(builder.call(mload_i, [ptr(pb, builder.add(brow, c(64 * v)), iv), align4, masks[v], izero]), pty)
                        for v in range(nvec)]
                out = []
                for i in range(rows):
                    a = a_word(i, p, tail)
                    out.append([builder.call(dot, [accs[i][v], a, bvec[v]]) for v in range(nvec)])
                return out

            def product(nvec):
                # the whole product with nvec vectors per row of C, ending in the current block
                # every vector but the last is whole; the last one's lanes below n - 16 (nvec - 1), as
                # a 16-bit mask computed once (a vector compare would be redone every iteration)
                left = builder.trunc(builder.sub(n, c(16 * (nvec - 1))), i16)
                bits = builder.sub(builder.shl(ir.Constant(i16, 1), left), ir.Constant(i16, 1))
                bits = builder.select(builder.icmp_signed(">=", left, ir.Constant(i16, 16)), ir.Constant(i16, 0xFFFF), bits)
                masks = [ir.Constant(mty, [1] * 16)] * (nvec - 1) + [builder.bitcast(bits, mty)]
                half = builder.sdiv(kdim, c(2))
                # -- C's start: zero, or C itself when accumulating --
                entry0 = builder.block
                load_c = builder.append_basic_block(f"mk{rows}x{nvec}.loadc")
                start = builder.append_basic_block(f"mk{rows}x{nvec}.start")
                builder.cbranch(accumulate, load_c, start)
                builder.position_at_end(load_c)
                loaded = [[builder.call(mload_f, [ptr(pc, builder.add(builder.mul(c(i), sc), c(64 * v)), fv), align4, masks[v], fzero])
                           for v in range(nvec)] for i in range(rows)]
                builder.branch(start)
                builder.position_at_end(start)
                init = []
                for i in range(rows):
                    row = []
                    for v in range(nvec):
                        phi = builder.phi(fv)
                        phi.add_incoming(fzero, entry0)
                        phi.add_incoming(loaded[i][v], load_c)
                        row.append(phi)
                    init.append(row)
                # -- full pairs: one loop, or past K_SEGMENT elements two halves from init and from zero,
                # added at the end (as the float32 kernels' _fma_k_loop: one chain over D 193-256 put the
                # scores ~1.8x as far from float64 as torch's float32 matmul) --
                def pairs(lo, hi, start, tag):
                    entry = builder.block
                    loop = builder.append_basic_block(f"mk{rows}x{nvec}.{tag}")
                    after = builder.append_basic_block(f"mk{rows}x{nvec}.{tag}.after")
                    builder.cbranch(builder.icmp_signed("<", lo, hi), loop, after)
                    builder.position_at_end(loop)
                    p = builder.phi(i64)
                    p.add_incoming(lo, entry)
                    accs = [[builder.phi(fv) for _ in range(nvec)] for _ in range(rows)]
                    new = step(p, accs, masks, nvec, False)
                    nxt = builder.add(p, c(1))
                    p.add_incoming(nxt, loop)
                    for i in range(rows):
                        for v in range(nvec):
                            accs[i][v].add_incoming(start[i][v], entry)
                            accs[i][v].add_incoming(new[i][v], loop)
                    builder.cbranch(builder.icmp_signed("<", nxt, hi), loop, after)
                    builder.position_at_end(after)
                    out = [[builder.phi(fv) for _ in range(nvec)] for _ in range(rows)]
                    for i in range(rows):
                        for v in range(nvec):
                            out[i][v].add_incoming(start[i][v], entry)
                            out[i][v].add_incoming(new[i][v], loop)
                    return out

                one = builder.append_basic_block(f"mk{rows}x{nvec}.one")
                segs = builder.append_basic_block(f"mk{rows}x{nvec}.segs")
                join = builder.append_basic_block(f"mk{rows}x{nvec}.join")
                builder.cbranch(builder.icmp_signed(">", kdim, c(K_SEGMENT)), segs, one)
                builder.position_at_end(one)
                whole = pairs(c(0), half, init, "loop")
                end_one = builder.block
                builder.branch(join)
                builder.position_at_end(segs)
                mid = builder.sdiv(half, c(2))
                first = pairs(c(0), mid, init, "h1")
                second = pairs(mid, half, [[fzero] * nvec for _ in range(rows)], "h2")
                summed = [[builder.fadd(first[i][v], second[i][v]) for v in range(nvec)] for i in range(rows)]
                end_segs = builder.block
                builder.branch(join)
                builder.position_at_end(join)
                got = []
                for i in range(rows):
                    row = []
                    for v in range(nvec):
                        phi = builder.phi(fv)
                        phi.add_incoming(whole[i][v], end_one)
                        phi.add_incoming(summed[i][v], end_segs)
                        row.append(phi)
                    got.append(row)
                # -- odd kdim: the last pair holds one element --
                here = builder.block
                odd = builder.append_basic_block(f"mk{rows}x{nvec}.odd")
                store = builder.append_basic_block(f"mk{rows}x{nvec}.store")
                builder.cbranch(builder.icmp_signed("!=", builder.srem(kdim, c(2)), c(0)), odd, store)
                builder.position_at_end(odd)
                last = step(half, got, masks, nvec, True)
                builder.branch(store)
                builder.position_at_end(store)
                final = []
                for i in range(rows):
                    for v in range(nvec):
                        phi = builder.phi(fv)
                        phi.add_incoming(got[i][v], here)
                        phi.add_incoming(last[i][v], odd)
                        final.append((i, v, phi))
                for i, v, phi in final:
                    dst = ptr(pc, builder.add(builder.mul(c(i), sc), c(64 * v)), fv)
                    builder.call(mstore_f, [phi, dst, align4, masks[v]])

            # one copy of the product per vector count ceil(n / 16): short rows cost no dots on
            # masked-off lanes
            most = TILE_N // 16
            nv = builder.sdiv(builder.add(n, c(15)), c(16))
            exit_ = builder.append_basic_block("mk.exit")
            cases = [builder.append_basic_block(f"mk.nv{v}") for v in range(1, most + 1)]
            switch = builder.switch(nv, cases[-1])
            for v in range(1, most):
                switch.add_case(c(v), cases[v - 1])
            for v, block in enumerate(cases, 1):
                builder.position_at_end(block)
                product(v)
                builder.branch(exit_)
            builder.position_at_end(exit_)
            return context.get_dummy_value()

        return sig, codegen

    return microkernel


_mk6, _mk2, _mk1 = (_make_microkernel(r) for r in (MR, 2, 1))


@njit(cache=True)
def _gemm(pa, sa0, sa1, pb, sb, pc, sc, m, kdim, n, accumulate):
    # c[:m, :n] (+)= A @ B at raw addresses, strides in bytes (see the micro-kernel)
    for j0 in range(0, n, TILE_N):
        nn = min(TILE_N, n - j0)
        pbj, pcj = pb + j0 * 4, pc + j0 * 4
        i = 0
        while i + MR <= m:
            _mk6(pa + i * sa0, sa0, sa1, pbj, sb, pcj + i * sc, sc, nn, kdim, accumulate)
            i += MR
        while i + 2 <= m:  # the last m % 6 rows: pairs, then one
            _mk2(pa + i * sa0, sa0, sa1, pbj, sb, pcj + i * sc, sc, nn, kdim, accumulate)
            i += 2
        if i < m:
            _mk1(pa + i * sa0, sa0, sa1, pbj, sb, pcj + i * sc, sc, nn, kdim, accumulate)


@njit(cache=True)
def _addr(x):
    return np.intp(x.ctypes.data)


@njit(cache=True)
def _mm_nn(a, bp, c, m, kdim, n, accumulate):
    # a (>=m, >=kdim) bfloat16 bits, pairs contiguous; bp (>=ceil(kdim/2), >=n, 2); c (>=m, >=n) float32
    _gemm(_addr(a), a.strides[0], 4, _addr(bp), bp.strides[0], _addr(c), c.strides[0], m, kdim, n, accumulate)


@njit(cache=True)
def _mm_tn(ap, bp, c, m, kdim, n, accumulate):
    # ap (>=ceil(kdim/2), >=m, 2) = pack_pairs(A^T): the pair (i, p) at ap[p, i]
    _gemm(_addr(ap), ap.strides[1], ap.strides[0], _addr(bp), bp.strides[0], _addr(c), c.strides[0], m, kdim, n, accumulate)


@njit(cache=True)
def mm_bf16(a, bp, c, m, kdim, n):
    """c[:m, :n] = a[:m, :kdim] @ B (float32 sums). a: bfloat16 bits, row-major (rows may be strided,
    elements contiguous); bp = pack_pairs(B) (ceil(kdim/2), >=n, 2); c: float32, rows contiguous."""
    _mm_nn(a, bp, c, m, kdim, n, False)


@njit(cache=True)
def mm_bf16_add(a, bp, c, m, kdim, n):
    """c[:m, :n] += a[:m, :kdim] @ B, as :func:`mm_bf16`."""
    _mm_nn(a, bp, c, m, kdim, n, True)


@njit(cache=True)
def mm_bf16_tn(ap, bp, c, m, kdim, n):
    """c[:m, :n] = A @ B with A (m x kdim) given as ap = pack_pairs(A^T) (ceil(kdim/2), >=m, 2)."""
    _mm_tn(ap, bp, c, m, kdim, n, False)


@njit(cache=True)
def mm_bf16_tn_add(ap, bp, c, m, kdim, n):
    """c[:m, :n] += A @ B, as :func:`mm_bf16_tn`."""
    _mm_tn(ap, bp, c, m, kdim, n, True)


# -- AMX: tile products (tdpbf16ps) --------------------------------------------------------------------
# One tdpbf16ps multiplies a 16 x 32 bfloat16 tile of A (row-major, 64 bytes a row) by a 16-pair x 16
# tile of B in the same pair layout as above (64 bytes a pair row) into a 16 x 16 float32 tile of C:
# 16384 FLOPs an instruction. Eight tile registers: C blocks of up to 2 x 2 tiles (tmm0-3), two A
# tiles (tmm4-5) and two B tiles (tmm6-7). The instructions are inline assembly (LLVM's AMX
# intrinsics want its x86_amx type); the tile registers are named in the assembly and hold nothing
# LLVM knows of, so they keep their contents from one statement to the next.
#
# Padding contract (no masked tiles): the products run on whole tiles, so with M16 = ceil(m/16)*16,
# N16 = ceil(n/16)*16, K32 = ceil(kdim/32)*32:
#   a   (>= M16, >= K32) bfloat16 bits, row-major, ZERO in columns kdim..K32 (rows m..M16: anything)
#   bp  (>= K32/2, >= N16, 2) pairs, ZERO past kdim (rows K32/2 - ceil(kdim/2) and the odd half-pair)
#   c   (>= M16, >= N16) float32, rows contiguous: all of c[:M16, :N16] is written
# and the calls run between amx_begin() and amx_end() on the same thread.

AMX_ENV_FLAG = "SELFATTN_CPU_AMX"  # "0": has_amx_bf16() is False (SELFATTN_CPU_BF16=0 turns it off too)
_ARCH_REQ_XCOMP_PERM, _ARCH_GET_XCOMP_PERM, _XFEATURE_XTILEDATA = 0x1023, 0x1022, 18


def _request_amx() -> bool:
    # Linux hands out the AMX tile state only on request (arch_prctl, once per process); without it
    # the first AMX instruction is SIGILL
    import ctypes
    import platform
    import sys

    f = _host_features()
    if not ("+amx-tile" in f and "+amx-bf16" in f and _HOST_BF16) or sys.platform != "linux" or platform.machine() != "x86_64":
        return False  # (the conversions around the AMX products need AVX512-BF16)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(158, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:  # 158: SYS_arch_prctl
            return False
        granted = ctypes.c_uint64(0)
        if libc.syscall(158, _ARCH_GET_XCOMP_PERM, ctypes.byref(granted)) != 0:
            return False
        if not granted.value >> _XFEATURE_XTILEDATA & 1:
            return False
        import llvmlite.binding as ll

        ll.initialize_native_asmparser()  # inline assembly needs LLVM's x86 assembly parser
        return True
    except Exception:  # noqa: BLE001 -- any failure means: no AMX
        return False


_AMX_OK = _request_amx()


def host_has_amx_bf16() -> bool:
    """The CPU has AMX-BF16 and the OS granted this process the tile state, whatever the environment says."""
    return _AMX_OK


def has_amx_bf16() -> bool:
    """Whether the AMX products may be used: :func:`host_has_amx_bf16`, and neither ``SELFATTN_CPU_BF16``
    nor ``SELFATTN_CPU_AMX`` is ``0``."""
    env = os.environ
    return _AMX_OK and env.get(ENV_FLAG, "1").strip() != "0" and env.get(AMX_ENV_FLAG, "1").strip() != "0"


def _asm(builder, text, constraints, args=()):
    fty = ir.FunctionType(ir.VoidType(), [a.type for a in args])
    builder.call(ir.InlineAsm(fty, text, constraints, side_effect=True), list(args))


def _refuse_without_amx():
    if not _AMX_OK:
        raise errors.TypingError("selfattn.kernels.cpu_bf16: no AMX-BF16 here (check has_amx_bf16() first)")


@intrinsic
def amx_begin(typingctx):
    """Load the tile configuration (8 tiles of 16 rows x 64 bytes) on this thread; before mm_amx*."""
    _refuse_without_amx()

    def codegen(context, builder, signature, args):
        i8 = ir.IntType(8)
        cfg = cgutils.alloca_once(builder, ir.ArrayType(i8, 64))
        cfg_bytes = [0] * 64
        cfg_bytes[0] = 1  # palette 1
        for t in range(8):
            cfg_bytes[16 + 2 * t] = 64  # bytes per row (little-endian u16)
            cfg_bytes[48 + t] = 16  # rows
        builder.store(ir.Constant(ir.ArrayType(i8, 64), cfg_bytes), cfg)
        _asm(builder, "ldtilecfg ($0)", "r,~{memory}", (builder.ptrtoint(cfg, ir.IntType(64)),))
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def amx_end(typingctx):
    """Release the tile state of this thread (after the last mm_amx* of a sequence)."""
    _refuse_without_amx()

    def codegen(context, builder, signature, args):
        _asm(builder, "tilerelease", "~{memory}")
        return context.get_dummy_value()

    return types.void(), codegen


def _make_amx_block(MT, NT):
    @intrinsic
    def block(typingctx, pa, sa, pb, sb, pc, sc, kdim, accumulate):
        # c[:16MT, :16NT] (+)= a[:16MT, :kdim] @ b, kdim a multiple of 32; addresses and strides in bytes
        _refuse_without_amx()
        sig = types.void(*([types.intp] * 7), types.boolean)

        def codegen(context, builder, signature, args):
            pa, sa, pb, sb, pc, sc, kdim, accumulate = args
            i64 = ir.IntType(64)
            c = lambda x: ir.Constant(i64, x)  # noqa: E731
            add, mul = builder.add, builder.mul
            c_at = [[add(pc, add(mul(sc, c(16 * r)), c(64 * j))) for j in range(NT)] for r in range(MT)]
            with builder.if_else(accumulate) as (then, otherwise):
                with then:
                    for r in range(MT):
                        for j in range(NT):
                            _asm(builder, f"tileloadd ($0,$1,1), %tmm{r * NT + j}", "r,r", (c_at[r][j], sc))
                with otherwise:
                    _asm(builder, "\n\t".join(f"tilezero %tmm{t}" for t in range(MT * NT)), "")
            entry = builder.block
            loop = builder.append_basic_block("amx.loop")
            done = builder.append_basic_block("amx.done")
            builder.cbranch(builder.icmp_signed(">", kdim, c(0)), loop, done)
            builder.position_at_end(loop)
            k = builder.phi(i64)
            k.add_incoming(c(0), entry)
            a0 = add(pa, mul(k, c(2)))  # 32 columns of A a step
            b0 = add(pb, mul(builder.sdiv(k, c(2)), sb))  # 16 pair rows of B a step
            for r in range(MT):
                _asm(builder, f"tileloadd ($0,$1,1), %tmm{4 + r}", "r,r", (add(a0, mul(sa, c(16 * r))), sa))
            for j in range(NT):
                _asm(builder, f"tileloadd ($0,$1,1), %tmm{6 + j}", "r,r", (add(b0, c(64 * j)), sb))
            _asm(builder, "\n\t".join(f"tdpbf16ps %tmm{6 + j}, %tmm{4 + r}, %tmm{r * NT + j}"
                                      for r in range(MT) for j in range(NT)), "")
            nk = add(k, c(32))
            k.add_incoming(nk, loop)
            builder.cbranch(builder.icmp_signed("<", nk, kdim), loop, done)
            builder.position_at_end(done)
            for r in range(MT):
                for j in range(NT):
                    _asm(builder, f"tilestored %tmm{r * NT + j}, ($0,$1,1)", "r,r,~{memory}", (c_at[r][j], sc))
            return context.get_dummy_value()

        return sig, codegen

    return block


_amx22, _amx21, _amx12, _amx11 = (_make_amx_block(mt, nt) for mt, nt in ((2, 2), (2, 1), (1, 2), (1, 1)))


@njit(cache=True)
def _amx_gemm(pa, sa, pb, sb, pc, sc, m, kdim, n, accumulate):
    # whole tiles: ceil(m/16) x ceil(n/16) of C over ceil(kdim/32) steps, in blocks of up to 2 x 2
    mt, nt, k32 = (m + 15) // 16, (n + 15) // 16, (kdim + 31) // 32 * 32
    for i in range(0, mt, 2):
        pai, pci = pa + 16 * i * sa, pc + 16 * i * sc
        for j in range(0, nt, 2):
            pbj, pcj = pb + 64 * j, pci + 64 * j
            if i + 1 < mt and j + 1 < nt:
                _amx22(pai, sa, pbj, sb, pcj, sc, k32, accumulate)
            elif i + 1 < mt:
                _amx21(pai, sa, pbj, sb, pcj, sc, k32, accumulate)
            elif j + 1 < nt:
                _amx12(pai, sa, pbj, sb, pcj, sc, k32, accumulate)
            else:
                _amx11(pai, sa, pbj, sb, pcj, sc, k32, accumulate)


@njit(cache=True)
def mm_amx(a, bp, c, m, kdim, n):
    """c[:M16, :N16] = a @ B on AMX tiles (see the padding contract above), between amx_begin/amx_end."""
    _amx_gemm(_addr(a), a.strides[0], _addr(bp), bp.strides[0], _addr(c), c.strides[0], m, kdim, n, False)


@njit(cache=True)
def mm_amx_add(a, bp, c, m, kdim, n):
    """c[:M16, :N16] += a @ B, as :func:`mm_amx`."""
    _amx_gemm(_addr(a), a.strides[0], _addr(bp), bp.strides[0], _addr(c), c.strides[0], m, kdim, n, True)


@njit(cache=True)
def to_bf16_t(x, out):
    """out[j, i] = bfloat16 bits of float32 x[i, j] (the transposed A of P^T dO and dS^T Q on AMX)."""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[j, i] = _rne(x[i, j])


@intrinsic
def _cvt_row(typingctx, px, pout, n):
    # out[:n] = bfloat16(x[:n]) at raw addresses with vcvtneps2bf16, 16 at a time (the last masked)
    if not _HOST_BF16:
        raise errors.TypingError("selfattn.kernels.cpu_bf16: this CPU has no AVX512-BF16 (check has_bf16_dot() first)")
    sig = types.void(types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        px, pout, n = args
        mod = builder.module
        i1, i16, i32, i64, f32 = ir.IntType(1), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
        fv, hv, mty = ir.VectorType(f32, 16), ir.VectorType(i16, 16), ir.VectorType(i1, 16)
        bv = ir.VectorType(_BFloat(), 16)
        mload = cgutils.get_or_insert_function(
            mod, ir.FunctionType(fv, [ir.PointerType(fv), i32, mty, fv]), f"llvm.masked.load.v16f32.{_ptr('v16f32')}")
        mstore = cgutils.get_or_insert_function(
            mod, ir.FunctionType(ir.VoidType(), [hv, ir.PointerType(hv), i32, mty]), f"llvm.masked.store.v16i16.{_ptr('v16i16')}")
        c = lambda x: ir.Constant(i64, x)  # noqa: E731

        def convert(v):
            # round to nearest even; the instruction treats subnormal inputs as zero
            return builder.bitcast(builder.fptrunc(v, bv), hv)

        entry = builder.block
        loop = builder.append_basic_block("cvt.loop")
        tail = builder.append_basic_block("cvt.tail")
        done = builder.append_basic_block("cvt.done")
        full = builder.sdiv(n, c(16))
        builder.cbranch(builder.icmp_signed(">", full, c(0)), loop, tail)
        builder.position_at_end(loop)
        i = builder.phi(i64)
        i.add_incoming(c(0), entry)
        v = builder.load(builder.inttoptr(builder.add(px, builder.mul(i, c(64))), ir.PointerType(fv)), align=4)
        builder.store(convert(v), builder.inttoptr(builder.add(pout, builder.mul(i, c(32))), ir.PointerType(hv)), align=2)
        nxt = builder.add(i, c(1))
        i.add_incoming(nxt, loop)
        builder.cbranch(builder.icmp_signed("<", nxt, full), loop, tail)
        builder.position_at_end(tail)
        left = builder.trunc(builder.srem(n, c(16)), i16)  # 0..15: an empty mask when n is whole vectors
        bits = builder.sub(builder.shl(ir.Constant(i16, 1), left), ir.Constant(i16, 1))
        mask = builder.bitcast(bits, mty)
        off = builder.mul(full, c(16))
        v = builder.call(mload, [builder.inttoptr(builder.add(px, builder.mul(off, c(4))), ir.PointerType(fv)),
                                 ir.Constant(i32, 4), mask, ir.Constant(fv, None)])
        builder.call(mstore, [convert(v), builder.inttoptr(builder.add(pout, builder.mul(off, c(2))), ir.PointerType(hv)),
                              ir.Constant(i32, 2), mask])
        builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def to_bf16_rows(x, out, m, n):
    """out[:m, :n] = bfloat16 bits of float32 x[:m, :n] with the CPU's conversion (needs AVX512-BF16;
    rows contiguous): round to nearest even as :func:`to_bf16`, except that subnormal inputs become
    zero and NaNs stay NaNs of their own sign. Exact for the P of flash attention (0 or >= 2**-126)."""
    for i in range(m):
        _cvt_row(_addr(x) + i * x.strides[0], _addr(out) + i * out.strides[0], n)


# -- does vdpbf16ps pay here? -------------------------------------------------------------------------
# Its rate is the CPU's business: on AMD Zen 4/5 one vdpbf16ps (64 FLOPs) issues as often as one float32
# FMA (32 FLOPs); on the Intel Xeon of issue 14's second session it issues half as often, so the
# bfloat16 product is slower than the float32 one. Two register-only loops measure both ceilings.

CEILING_CHAINS = 24  # independent accumulators: covers the latency of either instruction on both pipes


def _make_ceiling_loop(use_dot):
    @intrinsic
    def _loop(typingctx, n_iter):
        # CEILING_CHAINS independent vdpbf16ps (or float32 FMAs) a trip, on registers only
        if use_dot and not _HOST_BF16:
            raise errors.TypingError("selfattn.kernels.cpu_bf16: this CPU has no AVX512-BF16")
        sig = types.float32(types.int64)

        def codegen(context, builder, signature, args):
            (n,) = args
            mod = builder.module
            f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
            fv, iv = ir.VectorType(f32, 16), ir.VectorType(i32, 16)
            if use_dot:
                pty = ir.VectorType(_BFloat(), 32)
                fn = cgutils.get_or_insert_function(mod, ir.FunctionType(fv, [fv, pty, pty]), "llvm.x86.avx512bf16.dpbf16ps.512")
                a = builder.bitcast(ir.Constant(iv, [0x3F803F80] * 16), pty)  # (1, 1)
                b = builder.bitcast(ir.Constant(iv, [0x3F7F3F7F] * 16), pty)  # (~1, ~1)
                step = lambda acc: builder.call(fn, [acc, a, b])  # noqa: E731
            else:
                fn = cgutils.get_or_insert_function(mod, ir.FunctionType(fv, [fv] * 3), "llvm.fma.v16f32")
                a, b = ir.Constant(fv, [0.999999] * 16), ir.Constant(fv, [1e-6] * 16)
                step = lambda acc: builder.call(fn, [acc, a, b])  # noqa: E731
            entry = builder.block
            loop, done = builder.append_basic_block("ceil.loop"), builder.append_basic_block("ceil.done")
            builder.branch(loop)
            builder.position_at_end(loop)
            i = builder.phi(i64)
            i.add_incoming(ir.Constant(i64, 0), entry)
            accs = []
            for c in range(CEILING_CHAINS):
                phi = builder.phi(fv)
                phi.add_incoming(ir.Constant(fv, [float(c)] * 16), entry)
                accs.append(phi)
            new = [step(acc) for acc in accs]
            for phi, val in zip(accs, new):
                phi.add_incoming(val, loop)
            nxt = builder.add(i, ir.Constant(i64, 1))
            i.add_incoming(nxt, loop)
            builder.cbranch(builder.icmp_signed("<", nxt, n), loop, done)
            builder.position_at_end(done)
            total = new[0]
            for val in new[1:]:
                total = builder.fadd(total, val)
            return builder.extract_element(total, ir.Constant(i32, 0))

        return sig, codegen

    return _loop


_dot_ceiling, _fma_ceiling = _make_ceiling_loop(True), _make_ceiling_loop(False)


@njit(nogil=True, cache=True)
def dot_ceiling_loop(n_iter):
    """n_iter trips of CEILING_CHAINS independent vdpbf16ps (64 FLOPs each); a result that needs them all."""
    return _dot_ceiling(n_iter)


@njit(nogil=True, cache=True)
def fma_ceiling_loop(n_iter):
    """n_iter trips of CEILING_CHAINS independent float32 <16 x float> FMAs (32 FLOPs each)."""
    return _fma_ceiling(n_iter)


_SPEEDUP = []


def bf16_dot_speedup() -> float:
    """FLOP rate of vdpbf16ps over float32 FMA on this CPU (0.0 without AVX512-BF16): measured once per
    process, alternating the two loops and keeping each one's best (about 40 ms after compiling)."""
    if not _HOST_BF16:
        return 0.0
    if not _SPEEDUP:
        import time

        n = 20_000
        dot_ceiling_loop(10)
        fma_ceiling_loop(10)
        best_dot = best_fma = float("inf")
        for _ in range(5):
            t0 = time.thread_time()
            dot_ceiling_loop(n)
            t1 = time.thread_time()
            fma_ceiling_loop(n)
            t2 = time.thread_time()
            best_dot, best_fma = min(best_dot, t1 - t0), min(best_fma, t2 - t1)
        _SPEEDUP.append((64 / max(best_dot, 1e-9)) / (32 / max(best_fma, 1e-9)))
    return _SPEEDUP[0]


def bf16_dot_pays() -> bool:
    """Use ``mm_bf16`` rather than float32 products: :func:`has_bf16_dot` and vdpbf16ps measured at
    least 1.25x the float32 FMA's FLOP rate (so not on CPUs that issue it at half the FMA rate)."""
    return has_bf16_dot() and bf16_dot_speedup() >= 1.25


@intrinsic
def _pack_row_pair(typingctx, plo, phi, pout, n, has_hi):
    # out word j = bf16(lo[j]) | bf16(hi[j]) << 16 for j < n (hi taken as 0 when not has_hi), 16 words a
    # step with the CPU's conversion; the last step masked
    if not _HOST_BF16:
        raise errors.TypingError("selfattn.kernels.cpu_bf16: this CPU has no AVX512-BF16 (check has_bf16_dot() first)")
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.boolean)

    def codegen(context, builder, signature, args):
        plo, phi_, pout, n, has_hi = args
        mod = builder.module
        i1, i16, i32, i64, f32 = ir.IntType(1), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
        fv, hv, iv, mty = ir.VectorType(f32, 16), ir.VectorType(i16, 16), ir.VectorType(i32, 16), ir.VectorType(i1, 16)
        bv = ir.VectorType(_BFloat(), 16)
        mload = cgutils.get_or_insert_function(
            mod, ir.FunctionType(fv, [ir.PointerType(fv), i32, mty, fv]), f"llvm.masked.load.v16f32.{_ptr('v16f32')}")
        mstore = cgutils.get_or_insert_function(
            mod, ir.FunctionType(ir.VoidType(), [iv, ir.PointerType(iv), i32, mty]), f"llvm.masked.store.v16i32.{_ptr('v16i32')}")
        c = lambda x: ir.Constant(i64, x)  # noqa: E731
        fzero = ir.Constant(fv, None)

        def words(off, mask):
            # 16 pairs at element `off`: bf16(lo) in the low halves, bf16(hi) (or 0) in the high ones
            lo = builder.call(mload, [builder.inttoptr(builder.add(plo, builder.mul(off, c(4))), ir.PointerType(fv)),
                                      ir.Constant(i32, 4), mask, fzero])
            hi_mask = builder.select(has_hi, mask, ir.Constant(mty, [0] * 16))
            hi = builder.call(mload, [builder.inttoptr(builder.add(phi_, builder.mul(off, c(4))), ir.PointerType(fv)),
                                      ir.Constant(i32, 4), hi_mask, fzero])
            lo16 = builder.zext(builder.bitcast(builder.fptrunc(lo, bv), hv), iv)
            hi16 = builder.zext(builder.bitcast(builder.fptrunc(hi, bv), hv), iv)
            return builder.or_(lo16, builder.shl(hi16, ir.Constant(iv, [16] * 16)))

        def store(off, w, mask):
            ptr = builder.inttoptr(builder.add(pout, builder.mul(off, c(4))), ir.PointerType(iv))
            builder.call(mstore, [w, ptr, ir.Constant(i32, 4), mask])

        ones = ir.Constant(mty, [1] * 16)
        entry = builder.block
        loop = builder.append_basic_block("pk.loop")
        tail = builder.append_basic_block("pk.tail")
        full = builder.sdiv(n, c(16))
        builder.cbranch(builder.icmp_signed(">", full, c(0)), loop, tail)
        builder.position_at_end(loop)
        i = builder.phi(i64)
        i.add_incoming(c(0), entry)
        off = builder.mul(i, c(16))
        store(off, words(off, ones), ones)
        nxt = builder.add(i, c(1))
        i.add_incoming(nxt, loop)
        builder.cbranch(builder.icmp_signed("<", nxt, full), loop, tail)
        builder.position_at_end(tail)
        left = builder.trunc(builder.srem(n, c(16)), i16)  # 0..15: an empty mask when n is whole vectors
        mask = builder.bitcast(builder.sub(builder.shl(ir.Constant(i16, 1), left), ir.Constant(i16, 1)), mty)
        off = builder.mul(full, c(16))
        store(off, words(off, mask), mask)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def pack_pairs_rows(x, out, kdim, n):
    """out[p, j] = the pair (x[2p, j], x[2p + 1, j]) of float32 x[:kdim, :n] as bfloat16 (0 past kdim),
    with the CPU's conversion (as :func:`to_bf16_rows`: subnormals to zero); rows of x and out's
    pair rows contiguous. P and dS of the backward as the B of dV^T += dO^T P and dK^T += Q^T dS."""
    for p in range((kdim + 1) // 2):
        lo = _addr(x) + 2 * p * x.strides[0]
        _pack_row_pair(lo, lo + x.strides[0], _addr(out) + p * out.strides[0], n, 2 * p + 1 < kdim)


stamp_sources(globals(), _flash_src)  # the kernels compile cpu_flash's numba functions into themselves
numba_config.CACHE_DIR = _NUMBA_CACHE_DIR
