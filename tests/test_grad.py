"""Gradients: gradcheck in float64, float32 gradients against the reference (factor 3),
fully-masked rows and empty sequences giving exactly zero gradients on every backend."""

from __future__ import annotations

import zlib

import pytest
import torch

import selfattn
from selfattn import masks

from _oracle import compare, reference_pair, resolve_mask
from conftest import BACKENDS, qkv, run_backend, table_serves

GRAD_CASES = {
    # name: (B, Hq, Hkv, Lq, Lk, D, Dv, attention() kwargs)
    "plain": (1, 2, 2, 4, 5, 3, 3, {}),
    "causal_more_queries": (1, 2, 2, 5, 3, 3, 2, {"causal": True}),  # first 2 rows fully masked
    "gqa_window": (1, 4, 2, 4, 6, 3, 4, {"window": (1, 1)}),
    "padding_dead": (2, 2, 1, 4, 4, 2, 3, {"mask": masks.padding([2, 0], [3, 4])}),
    "dense_float_dead_row": (1, 2, 2, 3, 4, 3, 3, {"mask": torch.tensor([[0.5, -1.0, float("-inf"), 2.0],
                                                                           [float("-inf")] * 4,
                                                                           [0.0, 0.0, 0.0, float("-inf")]], dtype=torch.float64)}),
    "documents_causal": (1, 2, 2, 5, 5, 3, 3, {"mask": masks.documents([0, 0, 1, 1, 1]), "causal": True}),
    "softcap_scale": (1, 2, 1, 3, 4, 3, 3, {"softcap": 1.5, "scale": 0.8}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradcheck_float64(backend, case):
    b, hq, hkv, lq, lk, d, dv, kw = GRAD_CASES[case]
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv, dtype=torch.float64, requires_grad=True)
    if not table_serves(backend, q, k, v, **kw):
        assert run_backend(backend, q, k, v, **kw) is None  # refuses, naming the feature its table lacks
        return

    def f(q_, k_, v_):
        return selfattn.attention(q_, k_, v_, backend=backend, **kw)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


FP32_GRAD_CASES = {
    # name: (B, Hq, Hkv, Lq, Lk, D, Dv, attention() kwargs)
    "plain_d59": (1, 2, 2, 37, 37, 59, 59, {}),
    "causal_lq_gt_lk": (2, 2, 2, 40, 17, 16, 16, {"causal": True}),
    "causal_lq_lt_lk_gqa": (1, 4, 2, 17, 40, 16, 8, {"causal": True}),
    "mqa_window": (1, 4, 1, 33, 33, 8, 24, {"window": (5, 2)}),
    "padding_kv_q": (3, 2, 2, 20, 25, 16, 16, {"mask": masks.padding([25, 3, 0], [20, 0, 7])}),
    "documents": (2, 2, 2, 30, 30, 16, 16, {"mask": masks.documents(torch.tensor([[0] * 10 + [1] * 20, [0] * 29 + [1]]))}),
    "dense_bool": (2, 2, 2, 19, 23, 16, 16, {"mask": torch.rand(2, 1, 19, 23) < 0.5}),
    "dense_float_causal": (1, 2, 2, 19, 23, 16, 16, {"mask": torch.randn(1, 2, 19, 23), "causal": True}),
    "softcap": (1, 2, 2, 21, 29, 32, 32, {"softcap": 4.0}),
    "large_scores": (1, 2, 2, 21, 29, 32, 32, {"scale": 3.0}),
    "d111_l97": (1, 1, 1, 97, 97, 111, 111, {"causal": True}),
}


def _check_grads(label, backend, q, k, v, kw):
    # output and dq/dk/dv of one backend against the float64 reference (factor 2 output, 3 gradients)
    out = run_backend(backend, q, k, v, **kw)
    if out is None:
        return  # a refusal its table predicts (checked by run_backend)
    do = torch.randn(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    compare(label, reference_pair(q, k, v, do=do, **kw), out, grads=grads, dtype=q.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(FP32_GRAD_CASES))
def test_gradients_float32_vs_reference(backend, case):
    b, hq, hkv, lq, lk, d, dv, kw = FP32_GRAD_CASES[case]
    torch.manual_seed(zlib.crc32(case.encode()))
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv, requires_grad=True)
    _check_grads(f"{case}[{backend}]", backend, q, k, v, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gradients_low_precision_vs_reference(backend, dtype):
    b, hq, hkv, lq, lk, d, dv = 1, 4, 2, 29, 41, 64, 64
    kw = {"mask": masks.padding([30], [25]), "causal": True}
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv, dtype=dtype, requires_grad=True)
    _check_grads(f"{dtype}[{backend}]", backend, q, k, v, kw)


# -- fully-masked rows, unreachable keys, empty sequences -------------------------------------------

DEAD_CASES = {
    "padding": lambda: {"mask": masks.padding([6, 0, 3], [5, 7, 0])},
    "causal_lq_gt_lk": lambda: {"causal": True},
    "dense_bool_rows": lambda: {"mask": torch.tensor([True, False, True, False, True, True, False])[:, None].expand(7, 6)},
    "dense_float_rows": lambda: {"mask": torch.zeros(7, 6).index_fill(0, torch.tensor([0, 6]), float("-inf"))},
    "documents": lambda: {"mask": masks.documents(torch.tensor([[0, 0, 1, 1, 1, 1]] * 3), torch.tensor([[0, 2, 2, 1, 0, 3, 3]] * 3))},
    "window_past_keys": lambda: {"mask": masks.window(0, 0) & masks.padding([6, 6, 6], None), "window": (0, 0)},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DEAD_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_fully_masked_rows_forward_and_backward(backend, case, dtype):
    b, hq, hkv, lq, lk, d = 3, 4, 2, 7, 6, 8
    kw = DEAD_CASES[case]()
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dtype=dtype, requires_grad=True)
    if not table_serves(backend, q, k, v, return_stats=True, **kw):
        # stats refused (checked to raise); the plain request must still keep the contract
        res = run_backend(backend, q, k, v, return_stats=True, **kw)
        out, stats = run_backend(backend, q, k, v, **kw), None
    else:
        out, stats = run_backend(backend, q, k, v, return_stats=True, **kw)
    if out is None:
        return
    m = resolve_mask(kw.get("mask"), kw.get("causal", False), kw.get("window"))
    allowed = m.allowed(lq, lk).expand(b, hq, lq, lk)
    dead = ~allowed.any(-1)  # (B, Hq, Lq)
    unreachable = ~allowed.reshape(b, hkv, hq // hkv, lq, lk).any(2).any(2)  # (B, Hkv, Lk) keys no query sees
    assert dead.any(), "the case must contain fully-masked rows"
    assert not torch.isnan(out).any()
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    if stats is not None:
        assert bool((stats.lse[dead] == float("-inf")).all())
        assert bool((stats.max_logit[dead] == float("-inf")).all())
        assert bool((stats.entropy[dead] == 0).all())
        assert not any(torch.isnan(t).any() for t in (stats.lse, stats.max_logit, stats.entropy))
        p = selfattn.attention_probs(q, k, stats, **kw)
        assert torch.equal(p[dead], torch.zeros_like(p[dead])) and not torch.isnan(p).any()
    if table_serves(backend, q, k, v, **kw):
        out.backward(torch.randn_like(out))
        for name, g in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            assert g is not None and not torch.isnan(g).any(), f"{name} has NaN"
        assert torch.equal(q.grad[dead], torch.zeros_like(q.grad[dead])), "dq of fully-masked rows is not 0"
        assert torch.equal(k.grad[unreachable], torch.zeros_like(k.grad[unreachable])), "dk of keys no query sees is not 0"
        assert torch.equal(v.grad[unreachable], torch.zeros_like(v.grad[unreachable])), "dv of keys no query sees is not 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq,lk", [(0, 5), (4, 0), (0, 0)])
def test_empty_sequences(backend, lq, lk):
    # documented in attention(): Lk == 0 -> every row fully masked (output 0, lse -inf,
    # max_logit -inf, entropy 0, zero gradients); Lq == 0 -> empty output (B, Hq, 0, Dv)
    q, k, v = qkv(2, 4, 2, lq, lk, 8, 3, requires_grad=True)
    for kw in ({}, {"causal": True}, {"mask": masks.padding([lk, 0], [lq, 0])}):
        res = run_backend(backend, q, k, v, return_stats=True, **kw)
        out = run_backend(backend, q, k, v, **kw)
        if out is None:
            continue
        assert out.shape == (2, 4, lq, 3) and out.dtype == torch.float32
        assert torch.equal(out, torch.zeros_like(out))
        if res is not None:
            _, st = res
            for f, want in (("lse", float("-inf")), ("max_logit", float("-inf")), ("entropy", 0.0)):
                t = getattr(st, f)
                assert t.shape == (2, 4, lq) and t.dtype == torch.float32
                assert bool((t == want).all()), f
        out.sum().backward()
        for t in (q, k, v):
            assert t.grad is not None and t.grad.shape == t.shape
            assert torch.equal(t.grad, torch.zeros_like(t))
            t.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_a_float_mask(backend):
    # a learned additive bias (dense float mask) gets its gradient like q, k and v
    b, hq, hkv, lq, lk, d = 1, 4, 2, 13, 17, 16
    q, k, v = qkv(b, hq, hkv, lq, lk, d, requires_grad=True)
    bias = torch.randn(1, hq, lq, lk)
    bias[0, 0, 3] = float("-inf")  # one fully-masked row: its bias gradient must be 0, not NaN
    bias.requires_grad_()
    kw = {"mask": bias, "causal": True}
    out = run_backend(backend, q, k, v, **kw)
    if out is None:
        return  # a refusal its table predicts (checked by run_backend)
    do = torch.randn(b, hq, lq, d, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v, bias), do.to(out.dtype))
    compare(backend, reference_pair(q, k, v, do=do, **kw), grads=got)  # dq, dk, dv and d mask, factor 3
    assert torch.equal(got[3][0, 0, 3], torch.zeros(lk))
