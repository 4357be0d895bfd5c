"""AttentionStats and attention_probs() against the reference, on every backend that returns stats."""

from __future__ import annotations

import math

import pytest
import torch

import selfattn
from selfattn import masks, reference
from selfattn.reference import Trace

from _oracle import probs_reference
from conftest import BACKENDS, run_backend, qkv
from tolerance import assert_close


PROB_CASES = {
    "plain": lambda b, hq, lq, lk: {},
    "causal": lambda b, hq, lq, lk: {"causal": True},
    "window_softcap": lambda b, hq, lq, lk: {"window": (3, 2), "softcap": 2.5},
    "padding_dead_rows": lambda b, hq, lq, lk: {"mask": masks.padding([lk, lk // 3], [lq, 2])},
    "dense_float_heads": lambda b, hq, lq, lk: {"mask": torch.randn(1, hq, lq, lk).masked_fill(torch.rand(1, hq, lq, lk) < 0.3, float("-inf"))},
    "documents_causal_scale": lambda b, hq, lq, lk: {"mask": masks.documents(torch.sort(torch.randint(0, 3, (b, lk)), 1).values), "causal": True, "scale": 0.7},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(PROB_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_probs_match_reference(backend, case, dtype):
    b, hq, hkv, lq, lk, d = 2, 6, 2, 11, 17, 16
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dtype=dtype)
    kw = PROB_CASES[case](b, hq, lq, lk)
    res = run_backend(backend, q, k, v, return_stats=True, **kw)
    if res is None:
        return  # a refusal its feature table predicts (checked by run_backend)
    _, stats = res
    w64, wlow = probs_reference(q, k, v, **kw)  # (B, Hq, Lq, Lk)
    pkw = {key: val for key, val in kw.items()}
    acc = torch.float32
    for heads, rows in [(None, None), ([5, 0, 3], [lq - 1, 0, 4]), ([1], None), (None, [-1, 2]), ([4, 4], [3])]:
        p = selfattn.attention_probs(q, k, stats, heads=heads, rows=rows, **pkw)
        hi = list(range(hq)) if heads is None else heads
        ri = list(range(lq)) if rows is None else [r % lq for r in rows]
        assert p.shape == (b, len(hi), len(ri), lk) and p.dtype == acc, f"shape {tuple(p.shape)} dtype {p.dtype}"
        r64, rlow = w64[:, hi][:, :, ri], wlow[:, hi][:, :, ri]
        name = f"{case}[{backend}] heads={heads} rows={rows}"
        assert_close(f"{name} probs", p, r64, rlow)
        live = r64.sum(-1) > 0  # (B, h, r) rows with at least one allowed key
        assert_close(f"{name} row sums", p.sum(-1)[live], r64.sum(-1)[live], rlow.sum(-1)[live])
        assert torch.equal(p.sum(-1)[live].round(), torch.ones_like(p.sum(-1)[live]))
        dead = p[~live]
        assert torch.equal(dead, torch.zeros_like(dead)), f"{name}: fully-masked rows are not all 0"
        assert not torch.isnan(p).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_sinks", [False, True])
def test_attention_probs_gradient_is_the_softmax_gradient(backend, with_sinks):
    # a loss on the weights trains q, k and the sinks as a softmax written out does, whichever backend
    # gave the stats (their lse is a constant to attention_probs; it puts the normaliser's part back)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sinks = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) if with_sinks else None
    heads, rows = [1, 2], [0, 3, 8]
    w = torch.randn(2, len(heads), len(rows), 9, generator=g, dtype=torch.float64)
    got = run_backend(backend, q, k, v, causal=True, sinks=sinks, return_stats=True)
    if got is None:
        return  # refused as the backend's feature table predicts (run_backend checks the refusal)
    p = selfattn.attention_probs(q, k, got[1], causal=True, sinks=sinks, heads=heads, rows=rows)
    params = (q, k) + ((sinks,) if with_sinks else ())
    grads = torch.autograd.grad((p * w).sum(), params)
    # the softmax written out: scores, causal mask, the sink as one more logit with no value
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    s = s.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    if with_sinks:
        s = torch.cat([s, sinks.view(1, 4, 1, 1).expand(2, 4, 9, 1)], dim=-1)
    ref = s.softmax(-1)[..., :9][:, heads][:, :, rows]
    want = torch.autograd.grad((ref * w).sum(), params)
    for name, a, b in zip(("q", "k", "sinks"), grads, want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), f"{backend} d{name}: max diff {float((a - b).abs().max()):.3e}"


def test_attention_probs_float64_and_memory():
    q, k, v = qkv(1, 4, 4, 300, 200, 8, dtype=torch.float64)
    out, stats = selfattn.attention(q, k, v, causal=True, return_stats=True, backend="math")
    p = selfattn.attention_probs(q, k, stats, heads=[2], rows=[299, 0], causal=True)
    assert p.shape == (1, 1, 2, 200) and p.dtype == torch.float64  # only what was asked for
    t = Trace()
    reference.attention(q, k, v, mask=masks.causal(), trace=t)
    w = t["weights"][:, [2]][:, :, [299, 0]]
    assert_close("probs fp64", p, w, w)
    # decoded row 0 of a 300x200 bottom-right causal mask sees nothing; row 299 sees every key
    assert torch.equal(p[0, 0, 1], torch.zeros(200, dtype=torch.float64))
    assert bool((p[0, 0, 0] > 0).all())


def test_attention_probs_validation():
    q, k, v = qkv(1, 4, 2, 5, 6, 8)
    out, stats = selfattn.attention(q, k, v, return_stats=True, backend="math")
    with pytest.raises(TypeError, match="stats"):
        selfattn.attention_probs(q, k, (stats.lse,))
    with pytest.raises(ValueError, match=r"stats.lse has shape \(1, 4, 5\)"):
        selfattn.attention_probs(q[:, :, :3], k, stats)
    with pytest.raises(ValueError, match=r"heads indices must lie in \[0, 4\)"):
        selfattn.attention_probs(q, k, stats, heads=[4])
    with pytest.raises(ValueError, match="rows"):
        selfattn.attention_probs(q, k, stats, rows=[-6])
    with pytest.raises(TypeError, match="rows must be integer"):
        selfattn.attention_probs(q, k, stats, rows=[0.5])
    with pytest.raises(ValueError, match="mask"):
        selfattn.attention_probs(q, k, stats, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="softcap"):
        selfattn.attention_probs(q, k, stats, softcap=-1.0)


# -- the statistics themselves ------------------------------------------------------------------


def test_reference_stats_definitions():
    # lse = logsumexp of the masked logits, max_logit = their max, entropy = -sum p log p
    q, k, v = qkv(2, 3, 3, 9, 12, 8, dtype=torch.float64)
    m = masks.padding([12, 4], [9, 6]) & masks.dense(torch.randn(9, 12, dtype=torch.float64))
    t = Trace()
    _, st = reference.attention(q, k, v, mask=m, softcap=3.0, trace=t)
    logits = t["masked"]  # (B, H, Lq, Lk) -inf where masked
    lse = torch.logsumexp(logits, dim=-1)
    live = torch.isfinite(lse)
    assert torch.equal(live, torch.isfinite(st.lse))
    assert_close("lse", st.lse[live], lse[live], lse[live])
    assert_close("max_logit", st.max_logit[live], logits.amax(-1)[live], logits.amax(-1)[live])
    p = torch.softmax(logits[live], dim=-1)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    assert_close("entropy", st.entropy[live], ent, ent)
    assert bool((st.lse[~live] == float("-inf")).all() and (st.max_logit[~live] == float("-inf")).all())
    assert bool((st.entropy[~live] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_of_uniform_and_one_hot_rows(backend):
    # q = 0: every allowed key scores the same, so entropy = log(number of allowed keys), lse = log(n)
    b, h, l, d = 1, 2, 10, 4
    q = torch.zeros(b, h, l, d)
    k, v = torch.randn(b, h, l, d), torch.randn(b, h, l, d)
    res = run_backend(backend, q, k, v, causal=True, return_stats=True)
    if res is None:
        return
    _, st = res
    n = torch.arange(1, l + 1, dtype=torch.float64).expand(b, h, l)  # row i sees i + 1 keys
    assert_close("uniform entropy", st.entropy, torch.log(n), torch.log(n.float()))
    assert_close("uniform lse", st.lse, torch.log(n), torch.log(n.float()))
    assert torch.equal(st.max_logit, torch.zeros_like(st.max_logit))
    # a single allowed key: entropy exactly 0
    res = run_backend(backend, torch.randn(b, h, l, d), k, v, window=0, return_stats=True)
    if res is not None:
        assert torch.equal(res[1].entropy, torch.zeros_like(res[1].entropy))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_stats_shape_and_dtype(backend, dtype):
    q, k, v = qkv(2, 4, 1, 7, 5, 8, 3, dtype=dtype)
    res = run_backend(backend, q, k, v, return_stats=True)
    if res is None:
        return
    out, st = res
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == (2, 4, 7, 3) and out.dtype == dtype
    for f in ("lse", "max_logit", "entropy"):
        t = getattr(st, f)
        assert t.shape == (2, 4, 7) and t.dtype == acc, f"{f}: {tuple(t.shape)} {t.dtype}"
        assert not t.requires_grad
    assert bool((st.entropy >= 0).all() and (st.entropy <= math.log(5) + 1e-5).all())
