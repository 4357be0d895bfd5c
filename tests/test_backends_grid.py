"""Every backend against the float64 reference over a wide, odd grid (STYLE.md rules 6 and 7).

Each backend serves exactly what its feature table (``Backend.capabilities``) and the environment
say it serves: a refusal of anything else fails, and so does serving what the table rules out
(conftest.run_backend; check_backend also checks the count of served requests per case). A
refusal must raise BackendUnavailable naming the missing feature; nothing is silently skipped.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import selfattn
from selfattn import masks
from selfattn.backends import BackendUnavailable

from _oracle import compare, expectation, reference_pair, resolve_mask
from conftest import BACKENDS, check_backend, large_score_magnitude, qkv, run_backend, shared_reference_pair
from tolerance import assert_close

# (B, Hq, Hkv, Lq, Lk, D, Dv)
SHAPES = [
    *[(1, 2, 2, 97, 97, d, d) for d in (1, 8, 59, 64, 111, 128)],
    (2, 2, 2, 1, 1, 64, 64),
    (1, 3, 3, 2, 2, 8, 8),
    (1, 2, 2, 1, 97, 59, 59),  # one query against a cache
    (1, 2, 2, 97, 1, 59, 59),  # more queries than keys
    (1, 2, 2, 256, 256, 64, 64),
    (1, 2, 2, 97, 256, 64, 64),
    (1, 2, 2, 256, 97, 111, 111),
    (1, 2, 2, 1, 1025, 64, 64),
    (1, 1, 1, 1025, 1025, 64, 64),
    (2, 4, 2, 33, 47, 16, 16),  # GQA, group of 2
    (1, 4, 1, 47, 33, 16, 16),  # GQA, one kv head (MQA)
    (1, 2, 2, 20, 30, 59, 8),  # Dv < D
    (1, 4, 2, 30, 20, 8, 111),  # Dv > D with GQA
]


def _id(shape):
    b, hq, hkv, lq, lk, d, dv = shape
    return f"B{b}-H{hq}/{hkv}-L{lq}x{lk}-D{d}" + (f"-Dv{dv}" if dv != d else "")


# the 1025 x 1025 case runs causal only: the reference's own float64 pass dominates its cost
SHAPE_PARAMS = [(s, c) for s in SHAPES for c in (False, True) if c or s[3] * s[4] < 300_000]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,causal", SHAPE_PARAMS, ids=[f"{_id(s)}-{'causal' if c else 'full'}" for s, c in SHAPE_PARAMS])
def test_shapes_float32(backend, shape, causal, backend_case):
    b, hq, hkv, lq, lk, d, dv = shape
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv)
    check_backend(_id(shape), backend, q, k, v, causal=causal, case=backend_case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [SHAPES[i] for i in (1, 4, 8, 9, 15, 16, 18)], ids=_id)
def test_shapes_float64(backend, shape, backend_case):
    b, hq, hkv, lq, lk, d, dv = shape
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv, dtype=torch.float64)
    check_backend(_id(shape), backend, q, k, v, causal=True, case=backend_case)
    check_backend(_id(shape), backend, q, k, v, case=backend_case)


# -- every mask kind and combinations ------------------------------------------------------------


def _ids(b, lq, lk, g):
    # sorted random segment ids: packed documents of random lengths
    kv = torch.sort(torch.randint(0, 4, (b, lk), generator=g), dim=1).values
    q = torch.sort(torch.randint(0, 4, (b, lq), generator=g), dim=1).values
    return kv, q


def mask_case(name, b, hq, lq, lk):
    """attention() keyword arguments for mask case ``name`` at sizes (b, hq, lq, lk)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    kv_len = torch.randint(1, lk + 1, (b,), generator=g)
    kv_len[0] = lk // 2
    q_len = torch.randint(0, lq + 1, (b,), generator=g)
    kv_ids, q_ids = _ids(b, lq, lk, g)
    docs = masks.documents(kv_ids) if lq <= lk else masks.documents(kv_ids, q_ids)
    bool_m = torch.rand(b, 1, lq, lk, generator=g) < 0.7
    bool_m[0, 0, lq // 2] = False  # one fully-masked row
    float_m = torch.randn(lq, lk, generator=g).masked_fill(torch.rand(lq, lk, generator=g) < 0.2, float("-inf"))
    float_m[-1] = float("-inf")  # last row fully masked
    head_m = torch.rand(1, hq, lq, lk, generator=g) < 0.5
    return {
        "none": {},
        "causal": {"causal": True},
        "causal_obj": {"mask": masks.causal()},
        "window_left": {"window": 5},
        "window_left_right": {"window": (4, 3)},
        "window_zero": {"mask": masks.window(0)},
        "padding_kv": {"mask": masks.padding(kv_len)},
        "padding_kv_zero": {"mask": masks.padding(torch.zeros(b, dtype=torch.long))},
        "padding_kv_q": {"mask": masks.padding(kv_len, q_len)},
        "padding_q_zero": {"mask": masks.padding(kv_len, torch.zeros(b, dtype=torch.long))},
        "documents": {"mask": docs},
        "documents_q_ids": {"mask": masks.documents(kv_ids, q_ids)},
        "documents_causal": {"mask": docs, "causal": True},
        "dense_bool": {"mask": bool_m},
        "dense_bool_heads": {"mask": masks.dense(head_m)},
        "dense_float": {"mask": float_m},
        "dense_float_heads": {"mask": torch.randn(1, hq, 1, lk, generator=g)},
        "causal_padding": {"mask": masks.padding(kv_len, q_len), "causal": True},
        "window_documents": {"mask": docs & masks.window(6, 2)},
        "float_causal_padding": {"mask": masks.dense(float_m) & masks.causal() & masks.padding(kv_len)},
        "bool_window_keywords": {"mask": bool_m, "window": (3, 3), "causal": True},
    }[name]


MASK_CASES = ["none", "causal", "causal_obj", "window_left", "window_left_right", "window_zero",
              "padding_kv", "padding_kv_zero", "padding_kv_q", "padding_q_zero", "documents",
              "documents_q_ids", "documents_causal", "dense_bool", "dense_bool_heads", "dense_float",
              "dense_float_heads", "causal_padding", "window_documents", "float_causal_padding",
              "bool_window_keywords"]

# (B, Hq, Hkv, Lq, Lk, D, Dv): square, fewer queries (decoding-like), more queries than keys
MASK_SHAPES = [(2, 4, 2, 40, 40, 16, 16), (2, 2, 1, 13, 50, 24, 8), (2, 2, 2, 50, 13, 8, 24)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=_id)
@pytest.mark.parametrize("case", MASK_CASES)
def test_masks(backend, shape, case, backend_case):
    b, hq, hkv, lq, lk, d, dv = shape
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv)
    check_backend(f"{case} {_id(shape)}", backend, q, k, v, case=backend_case, **mask_case(case, b, hq, lq, lk))


# -- options: softcap, scale, huge scores -------------------------------------------------------

OPTIONS = {
    "softcap": dict(softcap=5.0),
    "softcap_small": dict(softcap=0.5, causal=True),
    "scale": dict(scale=0.37),
    "scale_negative": dict(scale=-1.5, window=(3, 2)),
    "scale_softcap_mask": dict(scale=2.0, softcap=3.0, mask="padding"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options(backend, option, backend_case):
    b, hq, hkv, lq, lk, d, dv = 2, 4, 2, 37, 53, 24, 16
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv)
    kw = dict(OPTIONS[option])
    if kw.get("mask") == "padding":
        kw["mask"] = masks.padding([53, 0], [37, 20])
    check_backend(option, backend, q, k, v, case=backend_case, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", [{}, {"causal": True}, {"softcap": 30.0}, {"mask": "dense_float"}],
                         ids=["plain", "causal", "softcap", "dense_float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_scores(backend, extra, dtype, backend_case):
    # raw scores q.k of about +-1e4 before scaling: softmax saturates; nothing may overflow
    b, hq, hkv, lq, lk, d = 1, 2, 2, 33, 65, 32
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dtype=dtype, magnitude=large_score_magnitude(d))
    s = q.double() @ k.double().transpose(-2, -1)
    assert float(s.abs().max()) > 5e3  # the case really has huge scores
    kw = dict(extra)
    if kw.get("mask") == "dense_float":
        kw["mask"] = torch.randn(lq, lk, dtype=dtype) * 100
    check_backend("large", backend, q, k, v, case=backend_case, **kw)


# -- issue 12's features: positions, ALiBi, sinks, key padding, mask functions ----------------------
# Each backend serves them exactly as far as its table says: one that ignored an option it does not
# declare (and so returned plain attention) fails here as "served a request its table rules out".


def _feature_case(name, b, hq, lq, lk):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    keep = torch.rand(b, lk, generator=g) < 0.7
    keep[0] = False  # batch element 0 has no key at all
    return {
        "positions": {"q_positions": torch.randint(0, 3 * lk, (b, lq), generator=g),
                      "kv_positions": torch.randint(0, 3 * lk, (b, lk), generator=g), "causal": True},
        "alibi": {"alibi_slopes": torch.rand(hq, generator=g), "causal": True},
        "alibi_batch_positions": {"alibi_slopes": torch.rand(b, hq, generator=g),
                                  "kv_positions": torch.arange(lk) * 2, "window": (7, 3)},
        "sinks": {"sinks": torch.randn(hq, generator=g)},
        "sinks_padding_dead_rows": {"sinks": torch.randn(hq, generator=g), "mask": masks.padding([lk, 0], [lq, 3])},
        "key_padding": {"mask": masks.key_padding(keep)},
        "function": {"mask": masks.function(lambda b_, h, q, kv: ((kv + h) % 3 != 0) & (kv <= q + 2))},
        "function_causal_softcap": {"mask": masks.function(lambda b_, h, q, kv: (kv >= q - 4) | (kv < 2)), "causal": True,
                                    "softcap": 3.0},
    }[name]


FEATURES = ["positions", "alibi", "alibi_batch_positions", "sinks", "sinks_padding_dead_rows", "key_padding",
            "function", "function_causal_softcap"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 4, 2, 37, 45, 16, 16), (2, 2, 2, 45, 13, 24, 8)], ids=_id)
@pytest.mark.parametrize("feature", FEATURES)
def test_features(backend, shape, feature, backend_case):
    b, hq, hkv, lq, lk, d, dv = shape
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv)
    check_backend(f"{feature} {_id(shape)}", backend, q, k, v, case=backend_case, **_feature_case(feature, b, hq, lq, lk))


# -- float16 / bfloat16 ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["plain", "causal", "padding_kv_q", "dense_float_gqa", "large", "softcap", "d111"])
def test_low_precision(backend, dtype, case, backend_case):
    b, hq, hkv, lq, lk, d, dv = 2, 2, 2, 45, 61, 64, 64
    kw, mag = {}, 1.0
    if case == "causal":
        kw = {"causal": True}
    elif case == "padding_kv_q":
        kw = {"mask": masks.padding([61, 0], [40, 45])}
    elif case == "dense_float_gqa":
        hq, hkv = 4, 1
        kw = {"mask": torch.randn(b, 1, lq, lk).to(dtype)}
    elif case == "large":
        mag = large_score_magnitude(d)
    elif case == "softcap":
        kw = {"softcap": 8.0}
        mag = 3.0
    elif case == "d111":
        d = dv = 111
        kw = {"causal": True}
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv, dtype=dtype, magnitude=mag)
    check_backend(case, backend, q, k, v, case=backend_case, **kw)


def test_reference_and_math_serve_everything():
    # the two backends that must support every feature: their tables say so, and they never refuse
    from conftest import supports

    q, k, v = qkv(2, 4, 2, 9, 11, 8, 6, dtype=torch.float16)
    for backend in ("reference", "math"):
        assert selfattn.backends.get(backend).capabilities == selfattn.backends.Backend.capabilities
        for case in MASK_CASES:
            for extra in ({}, {"return_stats": True, "softcap": 2.0}, {"dropout_p": 0.1, "generator": torch.Generator()}):
                kw = {**mask_case(case, 2, 4, 9, 11), **extra}
                assert expectation(backend, q, k, v, **kw).serves is True
                assert supports(backend, q, k, v, **kw) is None, f"{backend} refuses {case} {extra}"


def test_tables_name_what_each_backend_lacks():
    # the feature tables themselves, against the backends' documented limits
    caps = {n: selfattn.backends.get(n).capabilities for n in BACKENDS}
    assert not caps["sdpa"].stats and not caps["sdpa"].softcap and not caps["sdpa"].generator and caps["sdpa"].dropout
    if "cpu" in caps:
        assert caps["cpu"].devices == {"cpu"} and not caps["cpu"].dropout and "numba" in caps["cpu"].requires
    if "triton" in caps:
        assert torch.float64 not in caps["triton"].dtypes and caps["triton"].max_head_dim == 256
        assert caps["triton"].devices == {"cuda"} and caps["triton"].interpreted_devices == {"cpu"}


# -- NaN / Inf inputs stay in the rows they touch ------------------------------------------------


def _nonfinite_mask(name, b, lq, lk):
    return {
        "none": {},
        "causal": {"causal": True},
        "window": {"window": (2, 1)},
        "padding": {"mask": masks.padding([lk - 3, lk], [lq, lq - 2])},
        "dense_bool": {"mask": torch.arange(lk)[None, :] != (torch.arange(lq)[:, None] % lk)},
        "documents": {"mask": masks.documents([0] * (lk // 2) + [1] * (lk - lk // 2))},
    }[name]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", ["nan_query_row", "inf_query_row", "nan_key", "inf_key", "neg_inf_key"])
@pytest.mark.parametrize("mask", ["none", "causal", "window", "padding", "dense_bool", "documents"])
def test_nonfinite_inputs_stay_in_their_rows(backend, poison, mask, backend_case):
    b, hq, hkv, lq, lk, d = 2, 4, 2, 9, 9, 8
    q, k, v = qkv(b, hq, hkv, lq, lk, d)
    kw = _nonfinite_mask(mask, b, lq, lk)
    m = resolve_mask(kw.get("mask"), kw.get("causal", False), kw.get("window"))
    allowed = (torch.ones(1, 1, lq, lk, dtype=torch.bool) if m is None else m.allowed(lq, lk)).expand(b, hq, lq, lk)
    row, key = 4, lk - 2  # key lk - 2 is masked for some rows by every mask but "none"
    if poison.endswith("query_row"):
        q[0, 1, row, 0] = float("nan") if poison.startswith("nan") else float("inf")
        touched = torch.zeros(b, hq, lq, dtype=torch.bool)
        touched[0, 1, row] = bool(allowed[0, 1, row].any())
    else:
        k[1, 0, key, 3] = {"nan_key": float("nan"), "inf_key": float("inf"), "neg_inf_key": float("-inf")}[poison]
        touched = torch.zeros(b, hq, lq, dtype=torch.bool)
        touched[1, :hq // hkv] = allowed[1, :hq // hkv, :, key]  # the query heads sharing kv head 0
    out = run_backend(backend, q, k, v, **kw)
    if out is None:
        return
    bad = ~torch.isfinite(out).all(-1)  # (B, Hq, Lq)
    assert not (bad & ~touched).any(), f"non-finite values leaked into rows that do not see the poisoned input: {(bad & ~touched).nonzero().tolist()}"
    if poison.startswith("nan"):
        assert torch.equal(bad, touched), "every row that sees a NaN input must be NaN"
    # which rows are non-finite matches the reference (NaN vs Inf is not part of the contract); the rest is close
    res = run_backend(backend, q, k, v, return_stats=True, **kw)
    ref64, low = shared_reference_pair(backend_case, q, k, v, **kw)
    pairs = [("out", out, ref64.out, low.out)]
    if res is not None:
        pairs += [(f, getattr(res[1], f), getattr(ref64.stats, f), getattr(low.stats, f)) for f in ("lse", "max_logit", "entropy")]
    for name, got, r64, rlow in pairs:
        fin = torch.isfinite(r64)
        assert torch.equal(torch.isfinite(got), fin), f"{name}: non-finite entries differ from the reference's"
        assert_close(f"{poison} {mask}[{backend}] {name}", got[fin], r64[fin], rlow[fin])


# -- dropout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"mask": masks.padding([20, 5], [17, 0])}], ids=["plain", "causal", "padding"])
def test_dropout_reference_and_math_agree_with_same_generator(kw):
    q, k, v = qkv(2, 4, 2, 17, 20, 8)
    p = 0.3
    outs = {}
    for backend in ("reference", "math"):
        g = torch.Generator().manual_seed(99)
        outs[backend] = selfattn.attention(q, k, v, dropout_p=p, generator=g, backend=backend, **kw)
    pair = reference_pair(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(99), **kw)
    compare("dropout math", pair, outs["math"], dtype=q.dtype)
    compare("dropout reference", pair, outs["reference"], dtype=q.dtype)
    plain = selfattn.attention(q, k, v, backend="math", **kw)
    assert not torch.allclose(plain, outs["math"]), "dropout changed nothing"
    # the same seed twice gives the same output; another seed gives another
    again = selfattn.attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(99), backend="math", **kw)
    other = selfattn.attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(7), backend="math", **kw)
    assert torch.equal(again, outs["math"]) and not torch.equal(other, outs["math"])


def test_dropout_sdpa_refuses_a_generator_and_auto_avoids_it():
    q, k, v = qkv(1, 2, 2, 8, 8, 8)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(BackendUnavailable, match="generator"):
        selfattn.attention(q, k, v, dropout_p=0.2, generator=g, backend="sdpa")
    out = selfattn.attention(q, k, v, dropout_p=0.2, backend="sdpa")  # global RNG: served
    assert out.shape == q.shape and torch.isfinite(out).all()
    # auto with a generator picks a backend that honours it: same output as math with that seed
    a = selfattn.attention(q, k, v, dropout_p=0.2, generator=torch.Generator().manual_seed(5))
    compare("auto dropout", reference_pair(q, k, v, dropout_p=0.2, generator=torch.Generator().manual_seed(5)), a)
