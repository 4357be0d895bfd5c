"""Property-based tests: random shapes, masks, options and backends against the float64 reference.

Each example runs every backend whose feature table says it serves the drawn request (the reference
and math always do) against one reference pair; the backends whose table rules the request out are
checked to refuse it by name (conftest.run_backend). No example ends early on a refusal.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import selfattn
from selfattn import masks

from _oracle import probs_reference, reference_pair
from conftest import BACKENDS, compare_with_reference, exact_fully_masked, run_backend, table_serves
from test_masks import _check_tiles
from tolerance import assert_close

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MASK_KINDS = ["none", "causal", "window", "padding", "documents", "dense_bool", "dense_float",
              "causal&padding", "window&dense_float", "documents&causal"]


def draw_mask(data, kind, b, hq, lq, lk):
    """attention() keyword arguments for a randomly drawn mask of ``kind``."""
    ints = st.integers
    parts = []
    for atom in kind.split("&"):
        if atom == "none":
            continue
        if atom == "causal":
            parts.append(masks.causal())
        elif atom == "window":
            parts.append(masks.window(data.draw(ints(0, lk), label="left"), data.draw(ints(0, lk), label="right")))
        elif atom == "padding":
            kv = data.draw(st.lists(ints(0, lk), min_size=b, max_size=b), label="kv_lengths")
            ql = data.draw(st.none() | st.lists(ints(0, lq), min_size=b, max_size=b), label="q_lengths")
            parts.append(masks.padding(kv, ql))
        elif atom == "documents":
            kv = sorted(data.draw(st.lists(ints(0, 3), min_size=lk, max_size=lk), label="segment_ids"))
            qi = sorted(data.draw(st.lists(ints(0, 3), min_size=lq, max_size=lq), label="q_segment_ids"))
            parts.append(masks.documents(kv, qi if lq > lk or data.draw(st.booleans(), label="own q ids") else None))
        elif atom == "dense_bool":
            parts.append(masks.dense(torch.rand(b, 1, lq, lk) < data.draw(st.floats(0.0, 1.0), label="density")))
        elif atom == "dense_float":
            t = torch.randn(1, hq, lq, lk) * data.draw(st.sampled_from([0.1, 1.0, 30.0]), label="bias scale")
            parts.append(masks.dense(t.masked_fill(torch.rand(1, hq, lq, lk) < 0.2, float("-inf"))))
    if not parts:
        return {}
    return {"mask": parts[0] if len(parts) == 1 else masks.And(*parts)}


@st.composite
def requests(draw):
    b = draw(st.integers(1, 2), label="B")
    hkv = draw(st.integers(1, 2), label="Hkv")
    hq = hkv * draw(st.sampled_from([1, 2, 3]), label="group")
    lq = draw(st.integers(1, 24), label="Lq")
    lk = draw(st.integers(1, 24), label="Lk")
    d = draw(st.sampled_from([1, 3, 8, 16, 59]), label="D")
    dv = draw(st.sampled_from([d, 5]), label="Dv")
    dtype = draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    magnitude = draw(st.sampled_from([0.1, 1.0, 4.0, 30.0]), label="magnitude")
    seed = draw(st.integers(0, 2**16), label="seed")
    kind = draw(st.sampled_from(MASK_KINDS), label="mask")
    kw = {}
    if draw(st.booleans(), label="softcap?"):
        kw["softcap"] = draw(st.floats(0.5, 50.0), label="softcap")
    if draw(st.booleans(), label="scale?"):
        kw["scale"] = draw(st.floats(-2.0, 2.0), label="scale")
    return dict(shape=(b, hq, hkv, lq, lk, d, dv), dtype=dtype, magnitude=magnitude, seed=seed, kind=kind, kw=kw)


def inputs(r, data):
    """(q, k, v, attention keyword arguments) of a drawn request, its mask drawn now."""
    torch.manual_seed(r["seed"])
    b, hq, hkv, lq, lk, d, dv = r["shape"]
    kw = {**r["kw"], **draw_mask(data, r["kind"], b, hq, lq, lk)}
    q = (torch.randn(b, hq, lq, d, dtype=torch.float64) * r["magnitude"]).to(r["dtype"])
    k = (torch.randn(b, hkv, lk, d, dtype=torch.float64) * r["magnitude"]).to(r["dtype"])
    v = torch.randn(b, hkv, lk, dv, dtype=r["dtype"])
    return q, k, v, kw


def serving_backends(q, k, v, kw):
    """The backends whose feature table says they serve the request; every other one is checked to
    refuse it by name (conftest.run_backend), so no example passes on a refusal alone."""
    serving = [b for b in BACKENDS if table_serves(b, q, k, v, **kw)]
    for b in BACKENDS:
        if b not in serving:
            assert run_backend(b, q, k, v, **kw) is None
    assert "reference" in serving and "math" in serving
    return serving


@SETTINGS
@given(r=requests(), return_stats=st.booleans(), data=st.data())
def test_random_requests_match_reference(r, return_stats, data):
    # every backend that serves the drawn request, against one reference pair
    q, k, v, kw = inputs(r, data)
    pair = reference_pair(q, k, v, **kw)
    for backend in serving_backends(q, k, v, {**kw, "return_stats": return_stats}):
        res = run_backend(backend, q, k, v, return_stats=return_stats, **kw)
        out, stats = res if return_stats else (res, None)
        name = f"{backend} {r['shape']} {r['kind']} {r['kw']}"
        _, st64 = compare_with_reference(name, out, q, k, v, stats=stats, refs=pair, **kw)
        exact_fully_masked(name, out, stats, st64)


@SETTINGS
@given(r=requests(), data=st.data())
def test_random_attention_probs_match_reference(r, data):
    # probabilities from each serving backend's saved statistics
    q, k, v, kw = inputs(r, data)
    hq, lq = q.shape[1], q.shape[2]
    heads = data.draw(st.none() | st.lists(st.integers(0, hq - 1), min_size=1, max_size=3), label="heads")
    rows = data.draw(st.none() | st.lists(st.integers(-lq, lq - 1), min_size=1, max_size=3), label="rows")
    w64, wlow = probs_reference(q, k, v, **kw)
    hi = list(range(hq)) if heads is None else heads
    ri = list(range(lq)) if rows is None else [x % lq for x in rows]
    for backend in serving_backends(q, k, v, {**kw, "return_stats": True}):
        _, stats = run_backend(backend, q, k, v, return_stats=True, **kw)
        p = selfattn.attention_probs(q, k, stats, heads=heads, rows=rows, **kw)
        assert_close(f"probs {backend}", p, w64[:, hi][:, :, ri], wlow[:, hi][:, :, ri])


@SETTINGS
@given(lq=st.integers(1, 40), lk=st.integers(1, 40), bq=st.integers(1, 17), bk=st.integers(1, 17),
       kind=st.sampled_from(MASK_KINDS[1:]), data=st.data())
def test_block_map_never_lies(lq, lk, bq, bk, kind, data):
    torch.manual_seed(lq * 41 + lk)
    m = draw_mask(data, kind, 2, 2, lq, lk)["mask"]
    exact = kind in ("causal", "window", "padding", "dense_bool", "dense_float")
    _check_tiles(kind, m, lq, lk, bq, bk, exact=exact)
