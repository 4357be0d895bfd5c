"""The bfloat16 block products of selfattn.kernels.cpu_bf16 (issue 14): conversion bit for bit as
torch, pair packing, and every product shape (vdpbf16ps and AMX) against float64 on the same
bfloat16 inputs, within the float32 accumulation bound.

The vdpbf16ps products and the hardware conversions need AVX512-BF16, the AMX ones AMX-BF16 and the
OS's tile state; each is skipped (with the reason) where missing. Conversion, packing, the
environment switches and the refusal to compile without the instructions run everywhere.
"""

import numpy as np
import pytest
import torch

numba = pytest.importorskip("numba")

from selfattn.kernels import cpu_bf16  # noqa: E402

needs_bf16 = pytest.mark.skipif(
    not cpu_bf16.host_has_bf16_dot(),
    reason="this CPU has no AVX512-BF16 (vdpbf16ps): the bfloat16 products cannot run; the float32 path is used",
)


NAN_BITS = 0x7FC0  # a bfloat16 NaN
SENTINEL = np.float32(-1234.5)  # what C holds outside the block a product writes


def _torch_bits(x: np.ndarray) -> np.ndarray:
    # torch's float32 -> bfloat16 rounding, as uint16 bits
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _value(bits: np.ndarray) -> np.ndarray:
    # bfloat16 bits -> their exact float64 value
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _random_bits(rng, shape) -> np.ndarray:
    # bfloat16 inputs of mixed sign and magnitude (normal numbers: the instruction flushes subnormals)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-8, 8, shape))
    return _torch_bits(x.astype(np.float32))


# -- run-time detection --------------------------------------------------------------------------


def test_env_var_forces_the_fallback(monkeypatch):
    monkeypatch.setenv(cpu_bf16.ENV_FLAG, "0")
    assert cpu_bf16.has_bf16_dot() is False
    monkeypatch.setenv(cpu_bf16.ENV_FLAG, "1")
    assert cpu_bf16.has_bf16_dot() is cpu_bf16.host_has_bf16_dot()
    monkeypatch.delenv(cpu_bf16.ENV_FLAG)
    assert cpu_bf16.has_bf16_dot() is cpu_bf16.host_has_bf16_dot()


def test_products_refuse_to_compile_without_the_instructions(monkeypatch):
    # as on a host without AVX512-BF16: a typing error that names the module, no vdpbf16ps for LLVM
    monkeypatch.setattr(cpu_bf16, "_HOST_BF16", False)
    mk = cpu_bf16._make_microkernel(1)

    @numba.njit(cache=False)
    def call():
        mk(0, 0, 0, 0, 0, 0, 0, 1, 1, False)

    with pytest.raises(numba.core.errors.TypingError, match="no AVX512-BF16"):
        call()


# -- conversion ----------------------------------------------------------------------------------


def test_to_bf16_matches_torch_bit_for_bit():
    rng = np.random.default_rng(0)
    special = np.array([
        0x00000000, 0x80000000, 0x3F800000, 0xBF800000,  # +-0, +-1
        0x7F800000, 0xFF800000,  # +-inf
        0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FFFFFFF,  # quiet and signalling NaNs
        0x00000001, 0x00008000, 0x00018000, 0x00007FFF, 0x807FFFFF, 0x007F8000,  # subnormals, ties
        0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,  # ties to even (down, up), just above, just below
        0x7F7F8000, 0x7F7FFFFF, 0xFF7F8000,  # ties at the top round to inf
        0x00800000, 0x00FF8000,  # smallest normal, a tie just above it
    ], dtype=np.uint32)
    rand = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = (rand & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # every exponent, both parities
    bits = np.concatenate([special, rand, ties])
    x = bits.view(np.float32)[None, :]
    out = np.empty(x.shape, np.uint16)
    cpu_bf16.to_bf16(x, out)
    want = _torch_bits(x)
    # a NaN input must give a bfloat16 NaN; which one is torch's choice (0xFFFF on x86's vectorised path,
    # 0x7FC0 elsewhere), so NaNs are checked as NaNs and every other bit pattern bit for bit
    nan_in = np.isnan(x)
    got_nan = ((out & 0x7F80) == 0x7F80) & ((out & 0x007F) != 0)
    assert got_nan[nan_in].all(), f"NaN inputs not NaN: {[hex(v) for v in out[nan_in & ~got_nan][:5]]}"
    bad = np.flatnonzero((out != want) & ~nan_in)
    print(f"to_bf16: {bad.size} of {out.size} differ from torch")
    assert bad.size == 0, f"first differences: x bits {[hex(b) for b in bits[bad[:5]]]} got {[hex(v) for v in out.ravel()[bad[:5]]]} torch {[hex(v) for v in want.ravel()[bad[:5]]]}"


# -- packing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kdim,n", [(1, 1), (2, 3), (7, 5), (64, 64), (65, 17)])
def test_pack_pairs_round_trips(kdim, n):
    rng = np.random.default_rng(kdim * 100 + n)
    x = _random_bits(rng, (kdim, n))
    packed = np.full(((kdim + 1) // 2, n, 2), 0xABCD, np.uint16)
    cpu_bf16.pack_pairs(x, packed)
    assert np.array_equal(cpu_bf16.unpack_pairs(packed, kdim), x)
    assert np.array_equal(packed[:kdim // 2, :, 0], x[0:2 * (kdim // 2):2]) and np.array_equal(packed[:kdim // 2, :, 1], x[1::2][:kdim // 2])
    if kdim % 2:
        assert (packed[-1, :, 1] == 0).all(), "an odd K's last pair must be padded with +0"
    # the same from the transpose, from int16 bits, and from float32 (rounded on the way)
    packed_t = np.zeros_like(packed)
    cpu_bf16.pack_pairs_t(np.ascontiguousarray(x.T), packed_t)
    assert np.array_equal(packed_t, packed)
    big = np.full((n + 2, kdim + 3), NAN_BITS, np.uint16)  # x^T as a slice with an odd row stride
    big[1:n + 1, 1:kdim + 1] = x.T
    packed_t[...] = 0
    cpu_bf16.pack_pairs_t(big[1:n + 1, 1:kdim + 1], packed_t)
    assert np.array_equal(packed_t, packed)
    packed_i16 = np.zeros_like(packed)
    cpu_bf16.pack_pairs(x.view(np.int16), packed_i16)
    assert np.array_equal(packed_i16, packed)
    f = rng.standard_normal((kdim, n)).astype(np.float32)
    cpu_bf16.pack_pairs(f, packed)
    assert np.array_equal(cpu_bf16.unpack_pairs(packed, kdim), _torch_bits(f))
    cpu_bf16.pack_pairs_t(np.ascontiguousarray(f.T), packed_t)
    assert np.array_equal(packed_t, packed)


# -- products -------------------------------------------------------------------------------------


def _check(name, got, a_bits, b_bits, c0=None):
    # |got - exact| <= (k + 2) u sum_k |a||b| (+ u |c0|): the float32 accumulation bound, two roundings
    # per pair (vdpbf16ps adds its two products one at a time), u = 2^-24; the bfloat16 products are exact
    a, b = _value(a_bits), _value(b_bits)
    exact = a @ b + (0.0 if c0 is None else c0.astype(np.float64))
    kdim = a.shape[1]
    u = 2.0 ** -24
    bound = (kdim + 2) * u * (np.abs(a) @ np.abs(b) + (0.0 if c0 is None else np.abs(c0.astype(np.float64)))) + 1e-38
    err = np.abs(got.astype(np.float64) - exact)
    ratio = float((err / bound).max()) if err.size else 0.0
    print(f"{name}: max|diff| {err.max():.3e}, mean {err.mean():.3e}, max diff / bound {ratio:.3f}")
    assert ratio <= 1.0, f"{name}: {ratio:.2f}x the float32 accumulation bound"


@needs_bf16
@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 11, 64, 70])
def test_mm_bf16_every_shape(m):
    # k odd and even, n across the vector tails and past one 64-column block; strided A with an odd
    # row stride (unaligned pairs); NaN around A and B (an element read past the block spoils the
    # result), the bytes around C's block untouched
    rng = np.random.default_rng(m)
    for kdim in (1, 2, 3, 17, 64, 65, 130):
        for n in (1, 15, 16, 17, 40, 63, 64, 100):
            big = np.full((m + 2, kdim + 3), NAN_BITS, np.uint16)
            a = big[1:m + 1, 1:kdim + 1]  # row stride kdim + 3 elements
            a[...] = _random_bits(rng, (m, kdim))
            b = _random_bits(rng, (kdim, n))
            bp = np.full(((kdim + 1) // 2 + 1, n + 16, 2), NAN_BITS, np.uint16)[:-1, :n]
            cpu_bf16.pack_pairs(b, bp)
            c = np.full((m + 2, n + 5), SENTINEL, np.float32)
            cpu_bf16.mm_bf16(a, bp, c, m, kdim, n)
            _check(f"mm_bf16 m={m} k={kdim} n={n}", c[:m, :n], a, b)
            assert (c[m:] == SENTINEL).all() and (c[:, n:] == SENTINEL).all(), "wrote outside c[:m, :n]"


@needs_bf16
@pytest.mark.parametrize("m,kdim,n", [(64, 64, 64), (13, 7, 33), (70, 130, 64), (1, 1, 1), (64, 63, 17)])
def test_mm_bf16_add_and_transposed_a(m, kdim, n):
    rng = np.random.default_rng(m + kdim + n)
    a = _random_bits(rng, (m, kdim))
    b = _random_bits(rng, (kdim, n))
    bp = np.empty(((kdim + 1) // 2, n, 2), np.uint16)
    cpu_bf16.pack_pairs(b, bp)
    ap = np.empty(((kdim + 1) // 2, m, 2), np.uint16)
    cpu_bf16.pack_pairs(np.ascontiguousarray(a.T), ap)  # A^T (kdim x m), packed along kdim
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    c = c0.copy()
    cpu_bf16.mm_bf16_add(a, bp, c, m, kdim, n)
    _check("mm_bf16_add", c, a, b, c0)
    c = np.full((m, n), np.nan, np.float32)
    cpu_bf16.mm_bf16_tn(ap, bp, c, m, kdim, n)
    _check("mm_bf16_tn", c, a, b)
    c = c0.copy()
    cpu_bf16.mm_bf16_tn_add(ap, bp, c, m, kdim, n)
    _check("mm_bf16_tn_add", c, a, b, c0)


@needs_bf16
def test_mm_bf16_flash_tiles_from_float32():
    # the forward's two tile products as the flash loop will call them: S = Q K^T with K packed from
    # its rows (pack_pairs_t), then P (float32, converted) @ V; the whole blocks sliced from bigger arrays
    rng = np.random.default_rng(7)
    D, rows, ncols = 59, 64, 48
    q = _random_bits(rng, (100, D))
    k = _random_bits(rng, (100, D))
    kt = np.empty(((D + 1) // 2, ncols, 2), np.uint16)
    cpu_bf16.pack_pairs_t(k[10:10 + ncols], kt)
    s = np.empty((64, 64), np.float32)
    cpu_bf16.mm_bf16(q[5:5 + rows], kt, s, rows, D, ncols)
    _check("S = Q K^T", s[:rows, :ncols], q[5:5 + rows], np.ascontiguousarray(k[10:10 + ncols].T))
    p = np.exp(s[:rows, :ncols] - s[:rows, :ncols].max(axis=1, keepdims=True)).astype(np.float32)
    pb = np.empty((64, 64), np.uint16)
    cpu_bf16.to_bf16(p, pb[:rows, :ncols])
    v = rng.standard_normal((ncols, D)).astype(np.float32)
    vp = np.empty(((ncols + 1) // 2, D, 2), np.uint16)
    cpu_bf16.pack_pairs(v, vp)
    o = np.empty((64, D), np.float32)
    cpu_bf16.mm_bf16(pb, vp, o, rows, ncols, D)
    _check("P V", o[:rows], pb[:rows, :ncols], _torch_bits(v))


# -- AMX tile products -----------------------------------------------------------------------------

needs_amx = pytest.mark.skipif(
    not cpu_bf16.host_has_amx_bf16(),
    reason="no AMX-BF16 here (the CPU lacks it or the OS did not grant the tile state): the AMX products cannot run",
)


def test_amx_env_vars_force_the_fallback(monkeypatch):
    monkeypatch.setenv(cpu_bf16.AMX_ENV_FLAG, "0")
    assert cpu_bf16.has_amx_bf16() is False
    monkeypatch.setenv(cpu_bf16.AMX_ENV_FLAG, "1")
    monkeypatch.setenv(cpu_bf16.ENV_FLAG, "0")
    assert cpu_bf16.has_amx_bf16() is False
    monkeypatch.delenv(cpu_bf16.ENV_FLAG)
    monkeypatch.delenv(cpu_bf16.AMX_ENV_FLAG)
    assert cpu_bf16.has_amx_bf16() is cpu_bf16.host_has_amx_bf16()


def test_amx_refuses_to_compile_without_the_tile_state(monkeypatch):
    monkeypatch.setattr(cpu_bf16, "_AMX_OK", False)
    block = cpu_bf16._make_amx_block(1, 1)

    @numba.njit(cache=False)
    def call():
        block(0, 0, 0, 0, 0, 0, 32, False)

    with pytest.raises(numba.core.errors.TypingError, match="no AMX-BF16"):
        call()


@numba.njit(cache=False)
def _amx_call(a, bp, c, m, kdim, n, accumulate):
    cpu_bf16.amx_begin()
    if accumulate:
        cpu_bf16.mm_amx_add(a, bp, c, m, kdim, n)
    else:
        cpu_bf16.mm_amx(a, bp, c, m, kdim, n)
    cpu_bf16.amx_end()


@needs_amx
@pytest.mark.parametrize("m", [1, 16, 17, 33, 64, 70])
def test_mm_amx_every_shape(m):
    # whole tiles on zero-padded inputs (the padding contract); the padding of C is written, nothing past it
    rng = np.random.default_rng(100 + m)
    m16 = -(-m // 16) * 16
    for kdim in (1, 2, 31, 32, 33, 64, 65, 130):
        k32 = -(-kdim // 32) * 32
        for n in (1, 16, 17, 40, 64, 100):
            n16 = -(-n // 16) * 16
            a = np.zeros((m16, k32 + 3), np.uint16)  # row stride past K32
            a[:m, :kdim] = _random_bits(rng, (m, kdim))
            b = _random_bits(rng, (kdim, n))
            bp = np.zeros((k32 // 2, n16 + 16, 2), np.uint16)[:, :n16]
            cpu_bf16.pack_pairs(b, bp[:(kdim + 1) // 2, :n])
            c = np.full((m16 + 2, n16 + 5), SENTINEL, np.float32)
            accumulate = kdim % 2 == 1
            c0 = rng.standard_normal((m16, n16)).astype(np.float32)
            if accumulate:
                c[:m16, :n16] = c0
            _amx_call(a, bp, c, m, kdim, n, accumulate)
            _check(f"mm_amx{'_add' if accumulate else ''} m={m} k={kdim} n={n}", c[:m, :n], a[:m, :kdim], b,
                   c0[:m, :n] if accumulate else None)
            assert (c[m16:] == SENTINEL).all() and (c[:, n16:] == SENTINEL).all(), "wrote outside c[:M16, :N16]"


def test_to_bf16_t_is_the_transposed_conversion():
    x = np.random.default_rng(3).standard_normal((37, 20)).astype(np.float32)
    out = np.empty((20, 37), np.uint16)
    cpu_bf16.to_bf16_t(x, out)
    assert np.array_equal(out, _torch_bits(x).T)


@needs_bf16
def test_to_bf16_rows_is_the_hardware_conversion():
    # as to_bf16 (torch) on normal numbers, zeros, infinities and ties; subnormal inputs become
    # signed zero, NaNs stay NaNs; the tail of a row (n % 16) masked, nothing written past n
    rng = np.random.default_rng(5)
    rows, n = 7, 37
    x = (rng.standard_normal((rows, n + 3)) * np.exp2(rng.integers(-120, 120, (rows, n + 3)))).astype(np.float32)
    x[0, :6] = np.array([0.0, -0.0, np.inf, -np.inf, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8], np.float32)  # ties both ways
    x[1, :4] = np.array([0x00000001, 0x807FFFFF, 0x7FC00000, 0xFF812345], np.uint32).view(np.float32)
    out = np.full((rows, n + 3), 0xABCD, np.uint16)
    cpu_bf16.to_bf16_rows(x, out, rows, n)
    want = _torch_bits(x)[:, :n]
    sub = (np.abs(x[:, :n]) < np.finfo(np.float32).tiny) & (x[:, :n] != 0)
    nan = np.isnan(x[:, :n])
    got = out[:, :n]
    assert np.array_equal(got[~sub & ~nan], want[~sub & ~nan])
    assert np.array_equal(got[sub], (x[:, :n].view(np.uint32)[sub] >> 16).astype(np.uint16) & np.uint16(0x8000))
    assert np.isnan(_value(got[nan])).all()
    assert (out[:, n:] == 0xABCD).all()


def test_bf16_dot_pays_follows_the_switch_and_the_measurement(monkeypatch):
    monkeypatch.setenv(cpu_bf16.ENV_FLAG, "0")
    assert cpu_bf16.bf16_dot_pays() is False
    monkeypatch.delenv(cpu_bf16.ENV_FLAG)
    if not cpu_bf16.host_has_bf16_dot():
        assert cpu_bf16.bf16_dot_speedup() == 0.0 and cpu_bf16.bf16_dot_pays() is False
        return
    speedup = cpu_bf16.bf16_dot_speedup()
    print(f"vdpbf16ps / float32 FMA FLOP rate here: {speedup:.2f}")
    assert 0.1 < speedup < 10.0
    monkeypatch.setattr(cpu_bf16, "_SPEEDUP", [0.5])
    assert cpu_bf16.bf16_dot_pays() is False
    monkeypatch.setattr(cpu_bf16, "_SPEEDUP", [2.0])
    assert cpu_bf16.bf16_dot_pays() is True


@needs_amx
def test_amx_backward_tile_products():
    # the backward's recipes on AMX, with a last key block of 40 keys (padding): dV += P^T dO
    # (A = P^T from to_bf16_t, B = dO packed along query rows), dQ = dS K (A = dS from
    # to_bf16_rows, B = K packed along keys) and dP = dO V^T (B = V's rows packed: pack_pairs_t)
    rng = np.random.default_rng(11)
    rows, keys, D = 64, 40, 48  # D: 1.5 x 32, padded to 64 in the reduction
    p = rng.random((rows, keys)).astype(np.float32)
    do = _random_bits(rng, (rows, D))
    k = _random_bits(rng, (keys, D))
    v = _random_bits(rng, (keys, D))
    # -- dV (keys x D) += P^T (keys x rows) @ dO (rows x D) --
    pt = np.zeros((48, 64), np.uint16)  # keys padded to 48 = 3 tiles, rows 64 = 2 x 32
    cpu_bf16.to_bf16_t(p, pt[:keys, :rows])
    dop = np.zeros((32, 48, 2), np.uint16)
    cpu_bf16.pack_pairs(do, dop)
    dv0 = rng.standard_normal((48, 48)).astype(np.float32)
    dv = dv0.copy()
    _amx_call(pt, dop, dv, keys, rows, D, True)
    _check("dV += P^T dO", dv[:keys, :D], pt[:keys, :rows], do, dv0[:keys, :D])
    # -- dQ (rows x D) = dS (rows x keys) @ K (keys x D) --
    ds = np.zeros((64, 64), np.uint16)  # keys padded to 64 (two reduction steps of 32), zeros
    cpu_bf16.to_bf16_rows(p - 0.5, ds, rows, keys)
    kp = np.zeros((32, 48, 2), np.uint16)
    cpu_bf16.pack_pairs(k, kp[:keys // 2])
    dq = np.empty((64, 48), np.float32)
    _amx_call(ds, kp, dq, rows, keys, D, False)
    _check("dQ = dS K", dq[:rows, :D], ds[:rows, :keys], k)
    # -- dP (rows x keys) = dO (rows x D) @ V^T (D x keys) --
    do_pad = np.zeros((64, 64), np.uint16)
    do_pad[:, :D] = do
    vt = np.zeros((32, 48, 2), np.uint16)
    cpu_bf16.pack_pairs_t(v, vt[:D // 2, :keys])
    dp = np.empty((64, 48), np.float32)
    _amx_call(do_pad, vt, dp, rows, D, keys, False)
    _check("dP = dO V^T", dp[:rows, :keys], do, np.ascontiguousarray(v.T))


@needs_bf16
def test_pack_pairs_rows_is_pack_pairs_with_the_hardware_conversion():
    rng = np.random.default_rng(12)
    for kdim, n in ((1, 1), (2, 16), (7, 33), (64, 64), (65, 40)):
        x = (rng.standard_normal((kdim + 1, n + 3)) * 3).astype(np.float32)
        x[0, 0] = np.float32(1.0 + 2.0 ** -8)  # a tie
        out = np.full(((kdim + 1) // 2 + 1, n + 3, 2), 0xABCD, np.uint16)
        cpu_bf16.pack_pairs_rows(x, out, kdim, n)
        want = np.empty(((kdim + 1) // 2, n, 2), np.uint16)
        cpu_bf16.pack_pairs(x[:kdim, :n], want)
        assert np.array_equal(out[:(kdim + 1) // 2, :n], want), (kdim, n)
        assert (out[:, n:] == 0xABCD).all() and (out[(kdim + 1) // 2:] == 0xABCD).all()


@needs_amx
def test_amx_backward_transposed_products():
    # dV and dK reduced over query rows without a transposed A: dV^T (D x keys) += dO^T (D x rows) @ P,
    # dO^T made once per head, P packed along its rows with pack_pairs_rows
    rng = np.random.default_rng(13)
    rows, keys, D = 64, 40, 48
    p = rng.random((rows, keys)).astype(np.float32)
    do = _random_bits(rng, (rows, D))
    dot = np.zeros((48, 64), np.uint16)
    dot[:D, :rows] = do.T
    pp = np.zeros((32, 48, 2), np.uint16)
    cpu_bf16.pack_pairs_rows(p, pp, rows, keys)
    dvt0 = rng.standard_normal((48, 48)).astype(np.float32)
    dvt = dvt0.copy()
    _amx_call(dot, pp, dvt, D, rows, keys, True)
    p_bits = np.empty((rows, keys), np.uint16)
    cpu_bf16.to_bf16(p, p_bits)
    _check("dV^T += dO^T P", dvt[:D, :keys], np.ascontiguousarray(do.T), p_bits, dvt0[:D, :keys])


def test_cached_where_the_kernels_are(tmp_path):
    # a read-only install (simulated in a copy of the package whose kernels/__pycache__ cannot be a
    # directory: a file stands there, which even root cannot write into): the kernels, cpu_bf16's
    # included, cache in the per-user directory under XDG_CACHE_HOME; numba's own setting is put back
    import os
    import shutil
    import subprocess
    import sys

    import selfattn

    pkg = tmp_path / "site" / "selfattn"
    shutil.copytree(os.path.dirname(selfattn.__file__), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "kernels" / "__pycache__").write_text("not a directory")
    cache = tmp_path / "cache"
    code = f"""
import numba.core.config as config
before = config.CACHE_DIR
import selfattn
from selfattn.kernels import cpu_bf16, cpu_flash
assert selfattn.__file__.startswith({str(pkg)!r}), selfattn.__file__
want = {str(cache / "selfattn" / "numba")!r}
for f in (cpu_bf16.mm_bf16, cpu_bf16.pack_pairs, cpu_flash.flash_fwd):
    assert f._cache._cache_path.startswith(want), f._cache._cache_path
assert config.CACHE_DIR == before, config.CACHE_DIR
"""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(tmp_path / "site"), XDG_CACHE_HOME=str(cache), PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]


@needs_bf16
def test_products_flush_subnormals():
    # the instructions' DAZ/FTZ (documented in the module): a subnormal input counts as 0 and a
    # subnormal result is 0, unlike the float64 product of the same numbers
    a = np.zeros((16, 32), np.uint16)
    b = np.zeros((32, 16), np.uint16)
    bp = np.zeros((16, 16, 2), np.uint16)
    c = np.zeros((16, 16), np.float32)
    products = [("mm_bf16", lambda: cpu_bf16.mm_bf16(a, bp, c, 16, 32, 16))]
    if cpu_bf16.host_has_amx_bf16():
        products.append(("mm_amx", lambda: _amx_call(a, bp, c, 16, 32, 16, False)))
    for a00, b00 in ((0x0001, 0x7180), (0x1C80, 0x1C80)):  # 2^-133 * 2^100, 2^-70 * 2^-70
        a[0, 0], b[0, 0] = a00, b00
        cpu_bf16.pack_pairs(b, bp)
        assert _value(a)[0, 0] * _value(b)[0, 0] != 0.0
        for name, run in products:
            c[...] = 1.0
            run()
            assert c[0, 0] == 0.0, (name, hex(a00), hex(b00), c[0, 0])
