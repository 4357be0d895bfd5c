"""Every backend against the float64 reference over a wide, odd grid (STYLE.md rules 6 and 7).

A backend that cannot serve a request must raise BackendUnavailable naming the feature
(conftest.run_backend checks it); it is never silently skipped.
"""

from __future__ import annotations

import pytest
import torch

from selfattn import masks

from conftest import BACKENDS, check_backend, large_score_magnitude, qkv

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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_shapes_float32(backend, shape, causal):
    b, hq, hkv, lq, lk, d, dv = shape
    if lq * lk > 300_000 and not causal and backend == "reference":
        causal = True  # the 1025 x 1025 float64 run once per backend is enough
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv)
    check_backend(_id(shape), backend, q, k, v, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [SHAPES[i] for i in (1, 4, 8, 9, 15, 16, 18)], ids=_id)
def test_shapes_float64(backend, shape):
    b, hq, hkv, lq, lk, d, dv = shape
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv, dtype=torch.float64)
    check_backend(_id(shape), backend, q, k, v, causal=True)
    check_backend(_id(shape), backend, q, k, v)


# -- every mask kind and combinations ------------------------------------------------------------


def _ids(b, lq, lk, g):
    # sorted random segment ids: packed documents of random lengths
    kv = torch.sort(torch.randint(0, 4, (b, lk), generator=g), dim=1).values
    q = torch.sort(torch.randint(0, 4, (b, lq), generator=g), dim=1).values
    return kv, q


def mask_case(name, b, hq, lq, lk):
    """attention() keyword arguments for mask case ``name`` at sizes (b, hq, lq, lk)."""
    g = torch.Generator().manual_seed(hash(name) % 1000)
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
def test_masks(backend, shape, case):
    b, hq, hkv, lq, lk, d, dv = shape
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv)
    check_backend(f"{case} {_id(shape)}", backend, q, k, v, **mask_case(case, b, hq, lq, lk))


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
def test_options(backend, option):
    b, hq, hkv, lq, lk, d, dv = 2, 4, 2, 37, 53, 24, 16
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv)
    kw = dict(OPTIONS[option])
    if kw.get("mask") == "padding":
        kw["mask"] = masks.padding([53, 0], [37, 20])
    check_backend(option, backend, q, k, v, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", [{}, {"causal": True}, {"softcap": 30.0}, {"mask": "dense_float"}],
                         ids=["plain", "causal", "softcap", "dense_float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_scores(backend, extra, dtype):
    # raw scores q.k of about +-1e4 before scaling: softmax saturates; nothing may overflow
    b, hq, hkv, lq, lk, d = 1, 2, 2, 33, 65, 32
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dtype=dtype, magnitude=large_score_magnitude(d))
    s = q.double() @ k.double().transpose(-2, -1)
    assert float(s.abs().max()) > 5e3  # the case really has huge scores
    kw = dict(extra)
    if kw.get("mask") == "dense_float":
        kw["mask"] = torch.randn(lq, lk, dtype=dtype) * 100
    check_backend("large", backend, q, k, v, **kw)


# -- float16 / bfloat16 ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["plain", "causal", "padding_kv_q", "dense_float_gqa", "large", "softcap", "d111"])
def test_low_precision(backend, dtype, case):
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
    check_backend(case, backend, q, k, v, **kw)


def test_reference_and_math_serve_everything():
    # the two backends that must support every feature never refuse anything in the grid
    from conftest import supports

    q, k, v = qkv(2, 4, 2, 9, 11, 8, 6, dtype=torch.float16)
    for backend in ("reference", "math"):
        for case in MASK_CASES:
            for extra in ({}, {"return_stats": True, "softcap": 2.0}, {"dropout_p": 0.1, "generator": torch.Generator()}):
                kw = {**mask_case(case, 2, 4, 9, 11), **extra}
                assert supports(backend, q, k, v, **kw) is None, f"{backend} refuses {case} {extra}"
