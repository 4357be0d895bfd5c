"""The `cpu` backend's float32 forward kernel in the transposed layout (kernels/cpu_fwd.py, issue 14):
output and statistics against the float64 reference (STYLE.md rule 6, factor 2) over every mask
kind, odd head dims, ragged lengths, GQA, ALiBi, softcap, sinks and fully-masked rows; that the
calls meant for it take it (and the ones that are not, do not); NaN inputs poisoning the rows the
old kernel poisons; the forward's exp2 against float64 (the AVX2 layout: tests/test_avx2_layout.py).
"""

from __future__ import annotations

import pytest
import torch

import selfattn
from selfattn import masks
from selfattn.kernels import cpu_fwd

from _oracle import reference_pair
from test_cpu_kernel import MASKS, mask_kwargs
from tolerance import assert_close


def _inputs(b, hq, hkv, lq, lk, d, dv=None, dtype=torch.float32, magnitude=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64) * magnitude  # (B, Hq, Lq, D)
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64) * magnitude  # (B, Hkv, Lk, D)
    v = torch.randn(b, hkv, lk, dv or d, generator=g, dtype=torch.float64)  # (B, Hkv, Lk, Dv)
    return [t.to(dtype) for t in (q, k, v)]


def check_forward(name, q, k, v, *, expect_new=True, **kw):
    """The cpu backend's forward (with stats) against the reference pair; asserts which kernel ran."""
    before = cpu_fwd.CALLS["calls"]
    out, stats = selfattn.attention(q, k, v, backend="cpu", return_stats=True, **kw)
    took = cpu_fwd.CALLS["calls"] - before
    assert took == (1 if expect_new else 0), f"{name}: transposed kernel calls {took}, expected {int(expect_new)}"
    ref64, low = reference_pair(q, k, v, **kw)
    assert out.dtype == q.dtype
    assert_close(f"{name} out", out, ref64.out, low.out)
    for field in ("lse", "max_logit", "entropy"):
        assert_close(f"{name} {field}", getattr(stats, field), getattr(ref64.stats, field), getattr(low.stats, field))
    # fully-masked rows: exactly 0 out, lse and max_logit -inf, entropy 0
    dead = ref64.stats.lse == float("-inf")  # (B, Hq, Lq)
    if dead.any():
        assert torch.equal(out[dead], torch.zeros_like(out[dead]))
        assert bool((stats.lse[dead] == float("-inf")).all()) and bool((stats.max_logit[dead] == float("-inf")).all())
        assert bool((stats.entropy[dead] == 0).all())
    for t in (out, stats.entropy):
        assert not torch.isnan(t).any(), f"{name}: NaN"
    return out, stats


# (B, Hq, Hkv, Lq, Lk, D, Dv)
SHAPES = [
    (1, 2, 2, 97, 97, 64, 64),
    (2, 4, 2, 130, 97, 59, 59),  # GQA, more queries than keys, a 2-row last query block
    (1, 2, 1, 5, 1025, 8, 16),  # few queries (one partial vector of rows), many keys, Dv != D
    (1, 3, 3, 70, 40, 111, 111),  # one key block
]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}/{}-L{}x{}-D{}-Dv{}".format(*s))
def test_masks(shape, mask):
    b, hq, hkv, lq, lk, d, dv = shape
    q, k, v = _inputs(b, hq, hkv, lq, lk, d, dv)
    check_forward(f"{shape} {mask}", q, k, v, **mask_kwargs(mask, b, hq, lq, lk))


@pytest.mark.parametrize("mask", ["none", "causal", "two_keys"])
@pytest.mark.parametrize("d", [8, 59, 64, 111, 128, 256])
def test_head_dims(d, mask):
    kw = {"two_keys": {"causal": True, "window": 1}}.get(mask) or mask_kwargs(mask, 1, 2, 97, 97)
    for seed in range(2):
        q, k, v = _inputs(1, 2, 2, 97, 97, d, seed=seed)
        check_forward(f"D{d} {mask} seed {seed}", q, k, v, **kw)


@pytest.mark.parametrize("lq,lk", [(1, 97), (3, 1025), (4, 1), (1025, 1025), (97, 1025), (1025, 97)])
def test_lengths(lq, lk):
    # fewer than 4 queries: the dot-product kernel (cpu_flash) serves, not this one
    q, k, v = _inputs(1, 2, 1, lq, lk, 64, seed=lq + lk)
    for kw in ({}, {"causal": True}):
        check_forward(f"L{lq}x{lk} {kw}", q, k, v, expect_new=lq >= 4, **kw)


def test_long_causal():
    # 4096 queries and keys: 64 key tiles summed per row
    q, k, v = _inputs(1, 1, 1, 4096, 4096, 64, seed=3)
    check_forward("L4096 causal", q, k, v, causal=True)


@pytest.mark.slow
@pytest.mark.parametrize("mask", ["none", "causal", "window_padding_documents"])
@pytest.mark.parametrize("d", [59, 128, 256])
def test_long_sweep(d, mask):
    q, k, v = _inputs(1, 2, 1, 4096, 4096, d, seed=d)
    check_forward(f"L4096 D{d} {mask}", q, k, v, **mask_kwargs(mask, 1, 2, 4096, 4096))


@pytest.mark.parametrize("mask", ["none", "causal", "padding", "dense_float"])
def test_alibi(mask):
    b, hq, lq, lk = 2, 4, 130, 200
    q, k, v = _inputs(b, hq, 2, lq, lk, 64)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])  # (Hq,)
    check_forward(f"alibi {mask}", q, k, v, alibi_slopes=slopes, **mask_kwargs(mask, b, hq, lq, lk))
    pos = torch.arange(lk)[torch.randperm(lk, generator=torch.Generator().manual_seed(1))]  # (Lk,) shuffled
    check_forward(f"alibi positions {mask}", q, k, v, alibi_slopes=slopes, kv_positions=pos,
                  q_positions=torch.arange(lq) + 70, **mask_kwargs(mask, b, hq, lq, lk))


@pytest.mark.parametrize("option", [{"softcap": 2.0}, {"softcap": 30.0, "scale": 0.3}, {"scale": 1.7}],
                         ids=["softcap", "softcap+scale", "scale"])
@pytest.mark.parametrize("mask", ["none", "causal_window", "dense_float"])
def test_softcap_and_scale(option, mask):
    q, k, v = _inputs(2, 4, 2, 130, 97, 59, magnitude=2.0)
    check_forward(f"{option} {mask}", q, k, v, **option, **mask_kwargs(mask, 2, 4, 130, 97))


def test_sinks():
    q, k, v = _inputs(1, 4, 2, 97, 130, 64)
    sinks = torch.tensor([0.5, -1.0, 3.0, 0.0])  # (Hq,)
    for kw in ({}, {"causal": True}, {"mask": masks.padding([0])}):
        check_forward(f"sinks {kw}", q, k, v, sinks=sinks, **kw)


def test_mask_function_and_key_padding():
    q, k, v = _inputs(2, 2, 2, 150, 190, 32)
    fn = masks.function(lambda b, h, qi, kv: (kv <= qi + 40) & ((kv + qi) % 3 != 0) | (kv < 16))
    keep = torch.rand(2, 190, generator=torch.Generator().manual_seed(5)) < 0.7  # (B, Lk)
    check_forward("function", q, k, v, mask=fn)
    check_forward("function & key_padding", q, k, v, mask=fn & masks.key_padding(keep))


def test_large_scores_and_fully_masked():
    # raw scores around +-1e4: rescaling without overflow or NaN; then whole batch elements and rows
    # with nothing to see
    q, k, v = _inputs(1, 2, 2, 130, 130, 64, magnitude=(1e4 / 8) ** 0.5)
    check_forward("large", q, k, v)
    check_forward("large causal", q, k, v, causal=True)
    q, k, v = _inputs(3, 2, 2, 70, 90, 16)
    m = masks.padding([0, 90, 40], [70, 0, 70]) & masks.causal()
    out, stats = check_forward("fully masked", q, k, v, mask=m)
    assert torch.equal(out[:2], torch.zeros_like(out[:2])) and bool((stats.lse[:2] == float("-inf")).all())


@pytest.mark.parametrize("layout", ["full", "heads", "per_key", "per_query", "padded"])
def test_dense_bool_mask_layouts(layout):
    # a dense boolean mask on whole key tiles takes 64 keys a query as one word of bits (_allow_t), a
    # ragged key tile or a mask broadcast over the keys the byte loop: both against the reference, with
    # query padding (rows past q_len) and a query block of 2 rows
    b, hq, lq, lk = 2, 3, 130, 200  # 3 whole key tiles and 8 keys, blocks of 64 / 64 / 2 query rows
    q, k, v = _inputs(b, hq, hq, lq, lk, 32, seed=11)
    g = torch.Generator().manual_seed(12)
    shape = {"full": (b, hq, lq, lk), "heads": (1, hq, lq, lk), "per_key": (b, 1, 1, lk),
             "per_query": (b, 1, lq, 1), "padded": (b, 1, lq, lk)}[layout]
    keep = torch.rand(*shape, generator=g) < 0.5  # shape broadcasts to (B, Hq, Lq, Lk)
    keep[..., 0] |= layout == "per_query"  # a few rows still see a key
    mask = masks.dense(keep)
    if layout == "padded":
        mask = mask & masks.padding([150, 200], [100, 67])
    check_forward(f"bool mask {layout}", q, k, v, mask=mask)


@pytest.mark.parametrize("mask", ["none", "causal_window", "dense_bool", "window_padding_documents"])
def test_query_block_pairs(mask):
    # tasks of two whole query blocks (cpu_fwd.PAIR): 323 rows = pairs (0, 1), (2, 3), then block 4
    # alone and a 3-row block (dot products); one thread and two give the same bits
    b, hq, lq, lk = 2, 4, 323, 200
    q, k, v = _inputs(b, hq, 2, lq, lk, 48, seed=21)
    kw = mask_kwargs(mask, b, hq, lq, lk)
    out, _ = check_forward(f"pairs {mask}", q, k, v, **kw)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        other = selfattn.attention(q, k, v, backend="cpu", **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, other)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["fp64", "fp16"])
def test_other_dtypes(dtype):
    # float64 stays on cpu_flash's kernel; float16 computes in float32 here
    q, k, v = _inputs(2, 4, 2, 130, 97, 59, dtype=dtype)
    for kw in ({}, mask_kwargs("window_padding_documents", 2, 4, 130, 97)):
        check_forward(f"{dtype} {list(kw)}", q, k, v, expect_new=dtype != torch.float64, **kw)


def test_bit_identical_reruns_and_threads():
    q, k, v = _inputs(2, 4, 2, 300, 300, 64)
    a = selfattn.attention(q, k, v, backend="cpu", causal=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = selfattn.attention(q, k, v, backend="cpu", causal=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_inputs_poison_as_before(where, monkeypatch):
    # NaN in one query row / key / value: the same outputs are NaN as with cpu_flash's kernel
    from selfattn.backends import cpu as cpu_backend

    q, k, v = _inputs(1, 2, 2, 97, 130, 32)
    {"q": q, "k": k, "v": v}[where][0, 0, 40, 3] = float("nan")
    for kw in ({}, {"causal": True}):
        new = selfattn.attention(q, k, v, backend="cpu", **kw)
        monkeypatch.setattr(cpu_fwd, "serves", lambda q: False)
        old = selfattn.attention(q, k, v, backend="cpu", **kw)
        monkeypatch.undo()
        assert torch.equal(torch.isnan(new), torch.isnan(old)), f"{where} {kw}"
        fin = ~torch.isnan(old)
        assert_close(f"nan {where} {kw}", new[fin], old[fin].double(), old[fin])


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"softcap": 30.0, "scale": 0.3}, {"scale": 1.7},
                                {"alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625])}, "dense_float",
                                "window_padding_documents"], ids=str)
def test_scores_bit_identical_to_old_kernel(kw, monkeypatch):
    # the same scores bit for bit as cpu_flash's forward (the old kernel) -- ragged blocks of < 4 rows (dot
    # products) included. Blocks whose logits may pass cpu_flash.SPLIT_ABOVE take float64 scores here and in
    # cpu_bwd, not in cpu_flash's forward: the scale 1.7 case keeps below it (magnitude 0.5: bound ~60 score
    # units). Tiles of >= 4 rows with ALiBi or a float bias apply the scale log2(e) exactly at the store (cpu_fwd
    # STORE_SPLIT; cpu_bwd's product the same, so the backward still recomputes these scores bit for bit), where
    # cpu_flash multiplies by its float32 rounding: there the scores agree within a few float32 roundings
    big = kw == {"scale": 1.7}
    q, k, v = _inputs(2, 4, 2, 130, 97, 59, magnitude=0.5 if big else 2.0)
    exact_scale = isinstance(kw, dict) and "alibi_slopes" in kw or kw == "dense_float"
    kw = mask_kwargs(kw, 2, 4, 130, 97) if isinstance(kw, str) else kw
    _, new = selfattn.attention(q, k, v, backend="cpu", return_stats=True, **kw)
    monkeypatch.setattr(cpu_fwd, "serves", lambda q: False)
    _, old = selfattn.attention(q, k, v, backend="cpu", return_stats=True, **kw)
    if not exact_scale:
        assert torch.equal(new.max_logit, old.max_logit)
        return
    fin = torch.isfinite(old.max_logit)
    assert torch.equal(new.max_logit[~fin], old.max_logit[~fin])
    diff = (new.max_logit[fin].double() - old.max_logit[fin].double()).abs()
    assert float(diff.max()) <= 4 * torch.finfo(torch.float32).eps * float(old.max_logit[fin].abs().max())
    assert not torch.equal(new.max_logit, old.max_logit)  # (the exact factor was taken)


def _exp2_points():
    import numpy as np

    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.uniform(-126.0, 0.0, 200_000),
        rng.uniform(-1.0, 0.0, 50_000),
        np.arange(-126, 1, dtype=np.float64),  # integers: f = 0
        np.arange(-126, 0, dtype=np.float64) + 0.5,  # ties of the rounding: f = +-1/2
        np.arange(-126, 0, dtype=np.float64) + 0.5 + 2.0 ** -18,
        [-125.999, -1e-7, -0.0, 0.0],
    ]).astype(np.float32)
    return np.concatenate([x, np.zeros(-x.size % cpu_fwd.LANES, np.float32)])


def _ulp_error(got, x):
    import numpy as np

    exact = np.exp2(x.astype(np.float64))
    return np.abs(got.astype(np.float64) - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)


_NO_DQ_SCRIPT = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from selfattn.kernels import cpu_fwd
assert not cpu_fwd._HAS_DQ
import test_cpu_fwd as t
x = t._exp2_points()
got = np.empty_like(x)
cpu_fwd.exp2_lanes(x, got)
np.save(sys.argv[2], got)
print("ok", t._ulp_error(got, x).max())
"""


def test_exp2_without_avx512dq(tmp_path):
    # the range reduction's other branch (rint and a subtraction where AVX512DQ gives one vreduceps:
    # hosts without DQ, forced here by SELFATTN_CPU_NO_DQ=1 in a subprocess with its own numba cache):
    # within 2 ulp of float64, and on a DQ host bit for bit what the vreduceps branch gives (the exp2 is
    # the only code the branch changes: the forward's softmax computes its weights with it)
    import os
    import subprocess
    import sys

    import numpy as np

    env = dict(os.environ, SELFATTN_CPU_NO_DQ="1", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-c", _NO_DQ_SCRIPT, here, str(tmp_path / "got.npy")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
    x = _exp2_points()
    other = np.load(tmp_path / "got.npy")
    err = _ulp_error(other, x)
    print(f"exp2 without DQ: max {err.max():.3f} ulp")
    assert err.max() <= 2.0, f"exp2 without DQ is {err.max():.3f} ulp off at x = {x[int(np.argmax(err))]!r}"
    here_bits = np.empty_like(x)
    cpu_fwd.exp2_lanes(x, here_bits)
    assert np.array_equal(here_bits.view(np.int32), other.view(np.int32)), "the two range reductions differ"


def test_exp2_within_two_ulp():
    # the softmax's exp2 (range reduction by vreduceps with AVX512DQ, else rint; vscalefps on AVX-512)
    # against float64 over the range it serves (-126..0; below, the kernel selects 0): tests/test_exp2.py's
    # bound for cpu_flash's exp2
    import numpy as np

    x = _exp2_points()
    got = np.empty_like(x)
    cpu_fwd.exp2_lanes(x, got)
    exact = np.exp2(x.astype(np.float64))
    err = np.abs(got.astype(np.float64) - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)
    worst = int(np.argmax(err))
    print(f"exp2: max {err.max():.3f} ulp at x = {x[worst]!r}, mean {err.mean():.3f} ulp over {x.size} points")
    assert err.max() <= 2.0, f"exp2 is {err.max():.3f} ulp off at x = {x[worst]!r}"
