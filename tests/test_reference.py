"""The oracle itself: selfattn.reference against an independent formulation in plain torch ops."""

from __future__ import annotations

import math

import pytest
import torch

from selfattn import masks, reference
from selfattn.reference import Trace

from conftest import qkv
from tolerance import assert_close


def plain_attention(q, k, v, allowed=None, bias=None, scale=None, softcap=None):
    """softmax(QK^T * scale) V in float64 with torch.softmax, one head group at a time."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    for h in range(q.shape[1]):
        s = torch.einsum("bid,bjd->bij", q[:, h], k[:, h // g]) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if bias is not None:
            s = s + bias.expand(q.shape[0], q.shape[1], -1, -1)[:, h]
        if allowed is not None:
            a = allowed.expand(q.shape[0], q.shape[1], -1, -1)[:, h]
            s = s.masked_fill(~a, float("-inf"))
            live = a.any(-1, keepdim=True)
            p = torch.where(live, torch.softmax(torch.where(live, s, torch.zeros_like(s)), -1), torch.zeros_like(s))
        else:
            p = torch.softmax(s, -1)
        out[:, h] = torch.einsum("bij,bjd->bid", p, v[:, h // g])
    return out


@pytest.mark.parametrize("case", ["plain", "gqa_causal", "padding", "dense_float_softcap", "lq_gt_lk_window"])
def test_reference_matches_plain_torch(case):
    b, hq, hkv, lq, lk, d, dv = 2, 4, 2, 9, 13, 8, 5
    kw, mask = {}, None
    if case == "plain":
        hq = hkv
    elif case == "gqa_causal":
        mask = masks.causal()
    elif case == "padding":
        mask = masks.padding([13, 4], [9, 0])
    elif case == "dense_float_softcap":
        mask = masks.dense(torch.randn(1, hq, lq, lk, dtype=torch.float64))
        kw = {"softcap": 2.0, "scale": 0.7}
    elif case == "lq_gt_lk_window":
        lq, lk = 13, 9
        mask = masks.window(2, 1)
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv, dtype=torch.float64)
    out, _ = reference.attention(q, k, v, mask=mask, **kw)
    allowed = None if mask is None else mask.allowed(lq, lk)
    bias = None if mask is None else mask.bias(lq, lk)
    want = plain_attention(q, k, v, allowed, bias, **kw)
    assert out.dtype == torch.float64 and out.shape == (b, hq, lq, dv)
    assert_close(f"reference vs plain torch ({case})", out, want, want)


def test_trace_records_every_step_in_order():
    q, k, v = qkv(1, 2, 2, 3, 4, 4, dtype=torch.float64)
    t = Trace()
    out, _ = reference.attention(q, k, v, mask=masks.causal(), softcap=5.0, dropout_p=0.5,
                                 generator=torch.Generator().manual_seed(0), trace=t)
    assert t.names() == ["Q", "K", "V", "scores", "scaled", "softcapped", "masked", "weights", "dropped", "output"]
    assert torch.equal(t["scores"], q @ k.transpose(-2, -1))
    assert torch.equal(t["scaled"], t["scores"] / 2.0)  # 1/sqrt(4)
    assert torch.equal(t["output"], out)
    assert "scores" in t and "nope" not in t
    with pytest.raises(KeyError, match="nope"):
        t["nope"]
    assert all(s.note for s in t.steps)


def test_reference_low_precision_stays_in_its_dtype():
    q, k, v = qkv(1, 2, 2, 5, 5, 8, dtype=torch.bfloat16)
    out, st = reference.attention(q, k, v, upcast=False)
    assert out.dtype == torch.bfloat16 and st.lse.dtype == torch.bfloat16
    out64, st64 = reference.attention(q, k, v)
    assert out64.dtype == torch.float64 and st64.lse.dtype == torch.float64


def test_reference_fully_masked_and_empty_keys():
    q, k, v = qkv(1, 1, 1, 3, 4, 2, dtype=torch.float64)
    m = masks.dense(torch.tensor([[True, False, True, True], [False] * 4, [True] * 4]))
    out, st = reference.attention(q, k, v, mask=m)
    assert torch.equal(out[0, 0, 1], torch.zeros(2, dtype=torch.float64))
    assert st.lse[0, 0, 1] == float("-inf") and st.max_logit[0, 0, 1] == float("-inf") and st.entropy[0, 0, 1] == 0
    assert torch.isfinite(out).all()
    out, st = reference.attention(q, k[:, :, :0], v[:, :, :0])
    assert out.shape == (1, 1, 3, 2) and torch.equal(out, torch.zeros_like(out))
    assert bool((st.lse == float("-inf")).all() and (st.entropy == 0).all())


def test_self_attention_is_the_notes_layer():
    # x W_Q, x W_K, x W_V then attention, single head; identity weights give Q = K = V = x
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    w = torch.eye(4, dtype=torch.float64)
    out, st = reference.self_attention(x, w, w, w)
    want = plain_attention(x[:, None], x[:, None], x[:, None])[:, 0]
    assert_close("self_attention", out, want, want)
    assert st.lse.shape == (2, 1, 5)
    wv = torch.randn(4, 3, dtype=torch.float64)
    out, _ = reference.self_attention(x, w, w, wv, mask=masks.causal())
    assert out.shape == (2, 5, 3)
    assert_close("causal first row", out[:, 0], (x @ wv)[:, 0], (x @ wv)[:, 0])  # row 0 sees only itself


def test_reference_dropout_is_reproducible_and_unbiased():
    q, k, v = qkv(1, 1, 1, 16, 16, 8, dtype=torch.float64)
    a = reference.attention(q, k, v, dropout_p=0.25, generator=torch.Generator().manual_seed(3))[0]
    b = reference.attention(q, k, v, dropout_p=0.25, generator=torch.Generator().manual_seed(3))[0]
    c = reference.attention(q, k, v, dropout_p=0.25, generator=torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    # inverted dropout keeps the expectation: the mean over many masks approaches the plain output
    plain = reference.attention(q, k, v)[0]
    g = torch.Generator().manual_seed(0)
    mean = sum(reference.attention(q, k, v, dropout_p=0.25, generator=g)[0] for _ in range(400)) / 400
    assert float((mean - plain).abs().mean()) < 0.1 * float(plain.abs().mean())
