"""Layers: the notes' SelfAttention, MultiHeadAttention (torch parity, GQA, RoPE, QK-norm), KVCache."""

import copy
import io
import math
from unittest import mock

import pytest
import torch
from torch import nn
from torch.func import functional_call

import selfattn
from selfattn import KVCache, MultiHeadAttention, SelfAttention, masks, reference
from selfattn.backends import BackendUnavailable
from tolerance import assert_close

BACKENDS = [n for n in selfattn.backends.names() if n != "auto"]


# -- SelfAttention -------------------------------------------------------------------------


def test_notes_example_identity_init():
    # the notes: The=[1,0,1,0], cat=[0,1,0,1], sat=[1,1,1,1], W_Q = W_K = W_V = I, d_k = 4
    layer = SelfAttention(4, init="identity").double()
    x = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.float64)
    for w in (layer.W_Q, layer.W_K, layer.W_V):
        assert torch.equal(w.detach(), torch.eye(4, dtype=torch.float64))
    out, weights = layer(x, need_weights=True)
    assert out.shape == (3, 4) and weights.shape == (3, 3)
    # by hand: row "The" scores [2, 0, 2] / sqrt(4) -> softmax -> weighted sum of the embeddings
    e1, e0 = math.exp(1.0), math.exp(0.0)
    w_the = torch.tensor([e1, e0, e1], dtype=torch.float64) / (2 * e1 + e0)
    assert torch.allclose(weights[0], w_the, rtol=0, atol=1e-12)
    assert torch.allclose(out[0], w_the @ x, rtol=0, atol=1e-12)
    assert torch.allclose(weights.sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_self_attention_matches_reference_layout(bias):
    torch.manual_seed(0)
    layer = SelfAttention(6, qk_dim=3, v_dim=5, bias=bias)
    if bias:
        with torch.no_grad():
            for b in (layer.b_Q, layer.b_K, layer.b_V):
                b.normal_()
    assert layer.W_Q.shape == (6, 3) and layer.W_K.shape == (6, 3) and layer.W_V.shape == (6, 5)
    x = torch.randn(2, 7, 6)
    out, stats = layer(x, causal=True, return_stats=True)
    assert out.shape == (2, 7, 5)  # the width of W_V sets the width of the output

    def ref(dtype):
        up = dtype == torch.float64
        xb = x.to(dtype)
        if not bias:
            return reference.self_attention(xb, layer.W_Q, layer.W_K, layer.W_V, mask=masks.causal(), upcast=up)
        q = xb @ layer.W_Q.to(dtype) + layer.b_Q.to(dtype)  # (B, L, d_k)
        k = xb @ layer.W_K.to(dtype) + layer.b_K.to(dtype)
        v = xb @ layer.W_V.to(dtype) + layer.b_V.to(dtype)
        o, s = reference.attention(q[:, None], k[:, None], v[:, None], mask=masks.causal(), upcast=up)
        return o[:, 0], s

    (o64, s64), (o32, s32) = ref(torch.float64), ref(torch.float32)
    assert_close("out", out, o64, o32)
    assert_close("lse", stats.lse, s64.lse, s32.lse)


def test_self_attention_unbatched_and_weights():
    torch.manual_seed(1)
    layer = SelfAttention(4, v_dim=2)
    x = torch.randn(3, 5, 4)
    out, w, st = layer(x, window=1, need_weights=True, return_stats=True)
    out1, w1, st1 = layer(x[1], window=1, need_weights=True, return_stats=True)
    assert out1.shape == (5, 2) and w1.shape == (5, 5) and st1.lse.shape == (1, 5)
    assert torch.allclose(out1, out[1], rtol=0, atol=1e-6)
    assert torch.allclose(w1, w[1], rtol=0, atol=1e-6)
    tr = reference.Trace()
    reference.self_attention(x, layer.W_Q, layer.W_K, layer.W_V, mask=masks.window(1), trace=tr)
    lo = reference.Trace()
    reference.self_attention(x, layer.W_Q, layer.W_K, layer.W_V, mask=masks.window(1), trace=lo, upcast=False)
    assert_close("weights", w, tr["weights"][:, 0], lo["weights"][:, 0])
    assert not w.requires_grad


def test_self_attention_errors():
    with pytest.raises(ValueError, match="init='identity'.*qk_dim=3"):
        SelfAttention(4, qk_dim=3, init="identity")
    with pytest.raises(ValueError, match="v_dim=2"):
        SelfAttention(4, v_dim=2, init="identity")
    with pytest.raises(ValueError, match="init must be"):
        SelfAttention(4, init="ones")
    with pytest.raises(TypeError, match="embed_dim"):
        SelfAttention(4.0)
    layer = SelfAttention(4)
    with pytest.raises(ValueError, match=r"x must have shape.*\(2, 1, 3, 4\)"):
        layer(torch.randn(2, 1, 3, 4))
    with pytest.raises(ValueError, match="x has width 5.*embed_dim=4"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        layer(torch.randn(2, 3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([[1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(TypeError, match="need_weights must be a bool"):
        layer(torch.randn(2, 3, 4), need_weights=1)


# -- MultiHeadAttention against an independent float64 computation --------------------------


def _rope_by_hand(x, positions, base):
    # rotate-half convention as complex multiplication: (x_i + j x_{i+D/2}) * exp(j * pos * base^(-2i/D))
    D = x.shape[-1]
    z = torch.complex(x[..., : D // 2], x[..., D // 2:])  # (B, H, L, D/2)
    theta = positions[:, None].to(x.dtype) * base ** (-torch.arange(0, D, 2, dtype=x.dtype) / D)  # (L, D/2)
    z = z * torch.polar(torch.ones_like(theta), theta)
    return torch.cat([z.real, z.imag], dim=-1)


def _mha_by_hand(m, query, key, value, allowed, dtype):
    # plain torch ops on copies of m's parameters in `dtype`; allowed: bool (B|1, H|1, Lq, Lk)
    P = {n: p.detach().to(dtype) for n, p in m.named_parameters()}
    B, Lq, _ = query.shape
    H, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim

    def proj(x, name):
        y = x.to(dtype) @ P[f"{name}.weight"].T
        return y + P[f"{name}.bias"] if f"{name}.bias" in P else y

    q = proj(query, "q_proj").view(B, Lq, H, D).transpose(1, 2)
    k = proj(key, "k_proj").view(B, key.shape[1], Hkv, D).transpose(1, 2)
    v = proj(value, "v_proj").view(B, key.shape[1], Hkv, D).transpose(1, 2)
    if m.qk_norm:
        q = q / torch.sqrt((q * q).mean(-1, keepdim=True) + 1e-6) * P["q_norm.weight"]
        k = k / torch.sqrt((k * k).mean(-1, keepdim=True) + 1e-6) * P["k_norm.weight"]
    if m.rope:
        q = _rope_by_hand(q, torch.arange(Lq), m.rope_base)
        k = _rope_by_hand(k, torch.arange(k.shape[2]), m.rope_base)
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    o = (p @ v).transpose(1, 2).reshape(B, Lq, H * D)
    # the weights a layer returns are exp(s - lse) from the saved lse, which is rounded to the
    # input dtype: in that dtype this costs about eps * |lse| per weight, which softmax avoids
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p_lse = torch.exp(s - lse).nan_to_num(0.0)
    return proj(o, "out_proj"), p, p_lse


@pytest.mark.parametrize("cfg", [
    dict(num_heads=4, num_kv_heads=2, rope=True, qk_norm=True),
    dict(num_heads=4, num_kv_heads=1, rope=True, bias=False),
    dict(num_heads=2, qk_norm=True, rope_base=500.0),
])
def test_mha_matches_independent_float64(cfg):
    torch.manual_seed(2)
    m = MultiHeadAttention(16, **cfg)
    if m.qk_norm:
        with torch.no_grad():
            m.q_norm.weight.uniform_(0.5, 1.5)
            m.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 9, 16)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True  # batch 1 has 6 real keys
    out, w, st = m(x, causal=True, key_padding_mask=kpm, need_weights=True, average_attn_weights=False, return_stats=True)
    allowed = torch.ones(9, 9, dtype=torch.bool).tril()[None, None] & ~kpm[:, None, None, :]
    o64, p64, _ = _mha_by_hand(m, x, x, x, allowed, torch.float64)
    o32, _, p32 = _mha_by_hand(m, x, x, x, allowed, torch.float32)
    assert_close("out", out, o64, o32)
    # weights are exp(logit - lse): compare that exponent, whose float32 error is eps * |logit|;
    # masked pairs are -inf on both sides, and assert_close requires them to match exactly
    assert_close("log weights", w.log(), p64.log(), p32.log())
    assert st.lse.shape == (2, m.num_heads, 9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mha_low_precision(dtype):
    torch.manual_seed(12)
    m = MultiHeadAttention(16, 4, num_kv_heads=2, qk_norm=True)
    x = torch.randn(2, 9, 16)
    allowed = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    o64, _, _ = _mha_by_hand(m, x, x, x, allowed, torch.float64)
    o_low, _, _ = _mha_by_hand(m, x, x, x, allowed, dtype)
    m_low = m.to(dtype)
    out = m_low(x.to(dtype), causal=True)
    assert out.dtype == dtype
    assert_close("out", out, o64, o_low)


# -- torch.nn.MultiheadAttention parity ------------------------------------------------------


def _masks_for(kind, B, H, Lq, Lk, gen):
    # torch's convention; key 0 is never masked, so no row is fully masked (torch gives NaN there)
    if kind is None:
        return None, None
    kpm = torch.rand(B, Lk, generator=gen) < 0.3
    am = torch.rand(B * H, Lq, Lk, generator=gen) < 0.3
    kpm[:, 0] = False
    am[:, :, 0] = False
    if kind == "bool":
        return kpm, am[0]
    if kind == "bool3d":
        return kpm, am
    fk = torch.randn(B, Lk, generator=gen).masked_fill(kpm, float("-inf"))
    fa = torch.randn(Lq, Lk, generator=gen).masked_fill(am[0], float("-inf"))
    return fk, fa


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind,kvdims,bias,avg", [
    (None, None, True, True),
    ("bool", None, True, False),
    ("bool3d", (5, 7), False, True),
    ("float", (5, 7), True, False),
])
def test_from_torch_matches_torch(batch_first, kind, kvdims, bias, avg):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    E, H, B, Lq, Lk = 12, 3, 2, 6, 8
    kdim, vdim = kvdims or (E, E)
    tm = nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first).eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.normal_(0, 0.4)  # non-zero biases too
    t64 = copy.deepcopy(tm).double()
    ours = MultiHeadAttention.from_torch(tm)
    assert not ours.training and ours.batch_first == batch_first
    q = torch.randn(B, Lq, E, generator=gen)
    k = torch.randn(B, Lk, kdim, generator=gen)
    v = torch.randn(B, Lk, vdim, generator=gen)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    kpm, am = _masks_for(kind, B, H, Lq, Lk, gen)
    dbl = lambda t: t if t is None or t.dtype == torch.bool else t.double()  # noqa: E731
    o32, w32 = tm(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=True, average_attn_weights=avg)
    o64, w64 = t64(q.double(), k.double(), v.double(), key_padding_mask=dbl(kpm), attn_mask=dbl(am), need_weights=True, average_attn_weights=avg)
    out, w = ours(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=True, average_attn_weights=avg)
    assert out.shape == o32.shape and w.shape == w32.shape
    assert_close("out", out, o64, o32)
    assert_close("weights", w, w64, w32)
    # and the output alone, through the fastest backend
    assert_close("out (auto, no weights)", ours(q, k, v, key_padding_mask=kpm, attn_mask=am), o64, o32)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("avg", [True, False])
def test_unbatched_matches_torch(batch_first, avg):
    # one unbatched sequence, (L, E), as torch.nn.MultiheadAttention takes it: key (S, kdim), key_padding_mask
    # (S,), attn_mask (L, S) or (num_heads, L, S); the output (L, E), the weights (L, S) or (num_heads, L, S)
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    E, H, Lq, Lk, kdim, vdim = 12, 3, 6, 8, 5, 7
    tm = nn.MultiheadAttention(E, H, kdim=kdim, vdim=vdim, batch_first=batch_first).eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.normal_(0, 0.4)
    t64 = copy.deepcopy(tm).double()
    ours = MultiHeadAttention.from_torch(tm)
    q, k, v = torch.randn(Lq, E, generator=gen), torch.randn(Lk, kdim, generator=gen), torch.randn(Lk, vdim, generator=gen)
    kpm = torch.zeros(Lk, dtype=torch.bool)
    kpm[[1, 6]] = True
    for am in (None, torch.rand(Lq, Lk, generator=gen) < 0.3, torch.randn(H, Lq, Lk, generator=gen).double()):
        floating = am is not None and am.is_floating_point()
        am32 = am.float() if floating else am
        # (torch wants both masks of one kind: the padding as -inf with a float attn_mask)
        k64 = torch.zeros(Lk, dtype=torch.float64).masked_fill(kpm, float("-inf")) if floating else kpm
        k32 = k64.float() if floating else kpm
        o32, w32 = tm(q, k, v, key_padding_mask=k32, attn_mask=am32, need_weights=True, average_attn_weights=avg)
        o64, w64 = t64(q.double(), k.double(), v.double(), key_padding_mask=k64, attn_mask=am, need_weights=True,
                       average_attn_weights=avg)
        out, w = ours(q, k, v, key_padding_mask=k32, attn_mask=am32, need_weights=True, average_attn_weights=avg)
        assert out.shape == o32.shape == (Lq, E) and w.shape == w32.shape
        assert_close("out", out, o64, o32)
        assert_close("weights", w, w64, w32)
    # self-attention m(x, x, x) and the statistics, against the same sequence as a batch of one
    x = torch.randn(Lq, E, generator=gen)
    sm = MultiHeadAttention(E, H, batch_first=batch_first)
    out, stats = sm(x, x, x, causal=True, return_stats=True)
    one = x[None] if batch_first else x[:, None]
    ref, ref_stats = sm(one, one, one, causal=True, return_stats=True)
    assert torch.equal(out, ref[0] if batch_first else ref[:, 0])
    assert stats.lse.shape == (H, Lq) and torch.equal(stats.lse, ref_stats.lse[0])
    with pytest.raises(ValueError, match=r"key must be 2-D too"):
        ours(q, k[None], v[None])
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(Lk,\)"):
        ours(q, k, v, key_padding_mask=kpm[None])


def test_to_torch_round_trip():
    torch.manual_seed(4)
    for kw in (dict(), dict(kdim=5, vdim=3, batch_first=False, bias=False, dropout=0.25)):
        m = MultiHeadAttention(8, 2, **kw)
        t = m.to_torch()
        assert isinstance(t, nn.MultiheadAttention)
        assert (t.batch_first, t.kdim, t.vdim, t.dropout) == (m.batch_first, m.kdim, m.vdim, m.dropout)
        back = MultiHeadAttention.from_torch(t)
        sd, sd2 = m.state_dict(), back.state_dict()
        assert sd.keys() == sd2.keys()
        assert all(torch.equal(sd[n], sd2[n]) for n in sd)
    for kw, name in ((dict(num_kv_heads=1), "num_kv_heads"), (dict(rope=True), "rope"), (dict(qk_norm=True), "qk_norm")):
        with pytest.raises(ValueError, match=name):
            MultiHeadAttention(8, 2, **kw).to_torch()
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_zero_attn"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_zero_attn=True))
    with pytest.raises(TypeError, match="module"):
        MultiHeadAttention.from_torch(nn.Linear(2, 2))


def test_fully_masked_rows_are_zero_not_nan():
    torch.manual_seed(5)
    m = MultiHeadAttention(8, 2).eval()
    x = torch.randn(2, 4, 8)
    am = torch.zeros(4, 4, dtype=torch.bool)
    am[2] = True  # torch convention: query 2 may see nothing
    out, w = m(x, attn_mask=am, need_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert torch.equal(w[:, 2], torch.zeros_like(w[:, 2]))
    # the attention output of that row is 0, so the layer returns out_proj's bias there
    assert torch.allclose(out[:, 2], m.out_proj.bias.detach().expand(2, 8), rtol=0, atol=1e-7)
    kpm = torch.ones(2, 4, dtype=torch.bool)
    kpm[0] = False  # batch 1: every key ignored
    out, w = m(x, key_padding_mask=kpm, need_weights=True)
    assert torch.equal(w[1], torch.zeros_like(w[1])) and torch.isfinite(out).all()


def test_selfattn_masks_keep_selfattn_convention():
    torch.manual_seed(6)
    m = MultiHeadAttention(8, 2)
    x = torch.randn(2, 5, 8)
    segs = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    # a Mask value means "may attend"; the torch-style bool tensor means "may not"
    a = m(x, attn_mask=masks.documents(segs) & masks.causal())
    allowed = (segs[:, None, :, None] == segs[:, None, None, :]) & torch.ones(5, 5, dtype=torch.bool).tril()
    b = m(x, attn_mask=~allowed.expand(2, 2, 5, 5).reshape(4, 5, 5))
    c = m(x, attn_mask=masks.documents(segs), causal=True, backend="math")
    assert torch.allclose(a, b, rtol=0, atol=1e-6) and torch.allclose(a, c, rtol=0, atol=1e-6)


def test_need_weights_needs_a_backend_with_stats():
    m = MultiHeadAttention(8, 2)
    with pytest.raises(BackendUnavailable, match="return_stats"):
        m(torch.randn(1, 3, 8), need_weights=True, backend="sdpa")


def test_dropout_only_in_training():
    torch.manual_seed(7)
    m = MultiHeadAttention(8, 2, dropout=0.5)
    ref = copy.deepcopy(m)
    ref.dropout = 0.0
    x = torch.randn(2, 6, 8)
    m.eval()
    assert torch.equal(m(x, causal=True, backend="math"), ref(x, causal=True, backend="math"))
    m.train()
    torch.manual_seed(0)
    a = m(x, causal=True, backend="math")
    torch.manual_seed(0)
    b = m(x, causal=True, backend="math")
    assert torch.equal(a, b)  # drawn from the global RNG
    assert not torch.allclose(a, ref(x, causal=True, backend="math"))


# -- KV cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("prefill", [1, 4])
def test_kv_cache_decoding_equals_one_causal_forward(prefill):
    torch.manual_seed(8)
    m = MultiHeadAttention(16, 4, num_kv_heads=2, rope=True, qk_norm=True).eval()
    x = torch.randn(2, 9, 16)
    full32 = m(x, causal=True)
    full64 = copy.deepcopy(m).double()(x.double(), causal=True)
    cache = KVCache(2, 2, 12, 4)
    steps = [m(x[:, :prefill], causal=True, kv_cache=cache)]
    for i in range(prefill, 9):
        steps.append(m(x[:, i:i + 1], causal=True, kv_cache=cache))
    assert len(cache) == 9
    assert_close("decoded", torch.cat(steps, dim=1), full64, full32)
    # the weights of a decoding step are the last row of the full forward's weights
    cache.reset()
    m(x[:, :8], causal=True, kv_cache=cache)
    _, w_step = m(x[:, 8:], causal=True, kv_cache=cache, need_weights=True)
    _, w_full = m(x, causal=True, need_weights=True)
    _, w64 = copy.deepcopy(m).double()(x.double(), causal=True, need_weights=True)
    assert w_step.shape == (2, 1, 9)
    assert_close("log weights of the last step", w_step.log(), w64[:, 8:].log(), w_full[:, 8:].log())
    # reset() and decode again gives the same result
    cache.reset()
    assert len(cache) == 0
    again = torch.cat([m(x[:, i:i + 1], causal=True, kv_cache=cache) for i in range(9)], dim=1)
    assert_close("decoded after reset", again, full64, full32)


def test_kv_cache_append_and_errors():
    cache = KVCache(2, 1, 5, 3, v_dim=2, dtype=torch.float64)
    k, v = cache.append(torch.ones(2, 1, 3, 3, dtype=torch.float64), torch.ones(2, 1, 3, 2, dtype=torch.float64))
    assert k.shape == (2, 1, 3, 3) and v.shape == (2, 1, 3, 2) and len(cache) == 3
    k, v = cache.append(2 * torch.ones(2, 1, 1, 3, dtype=torch.float64), torch.zeros(2, 1, 1, 2, dtype=torch.float64))
    assert k.shape == (2, 1, 4, 3) and torch.equal(k[:, :, 3], 2 * torch.ones(2, 1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="capacity=5"):
        cache.append(torch.ones(2, 1, 2, 3, dtype=torch.float64), torch.ones(2, 1, 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch_size=2"):
        cache.append(torch.ones(3, 1, 1, 3, dtype=torch.float64), torch.ones(3, 1, 1, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        cache.append(torch.ones(2, 1, 1, 3), torch.ones(2, 1, 1, 2))
    assert len(cache) == 4  # failed appends change nothing

    m = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match="kv_cache was built for batch_size=1"):
        m(torch.randn(2, 3, 8), kv_cache=KVCache(1, 2, 8, 4))
    with pytest.raises(ValueError, match="kv_cache holds"):
        m(torch.randn(2, 3, 8), kv_cache=KVCache(2, 1, 8, 4))
    small = KVCache(2, 2, 4, 4)
    m(torch.randn(2, 3, 8), kv_cache=small, causal=True)
    with pytest.raises(ValueError, match="capacity=4"):
        m(torch.randn(2, 2, 8), kv_cache=small, causal=True)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Lk\) = \(2, 4\)"):
        m(torch.randn(2, 1, 8), kv_cache=small, key_padding_mask=torch.zeros(2, 1, dtype=torch.bool))
    with pytest.raises(BackendUnavailable):
        m(torch.randn(2, 1, 8), kv_cache=small, need_weights=True, backend="sdpa")
    assert len(small) == 3  # failed calls leave the cache as it was


# -- bad input ------------------------------------------------------------------------------


def test_mha_bad_input():
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads \(4\)"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"):
        MultiHeadAttention(12, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="rope=True needs an even head_dim.*= 3"):
        MultiHeadAttention(9, 3, rope=True)
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadAttention(8, 2, dropout=1.0)
    m = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"query must have shape \(B, L, E\), or \(L, E\) for one unbatched sequence.*\(8,\)"):
        m(torch.randn(8))
    with pytest.raises(ValueError, match="query has width 6.*embed_dim=8"):
        m(torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match=r"query must have shape \(L, B, E\) with batch_first=False, or \(L, E\)"):
        MultiHeadAttention(8, 2, batch_first=False)(torch.randn(2, 3, 3, 8))
    with pytest.raises(ValueError, match="key has width 5.*kdim=8"):
        m(torch.randn(1, 3, 8), torch.randn(1, 4, 5))
    with pytest.raises(ValueError, match="same batch size"):
        m(torch.randn(1, 3, 8), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="key=None .*kdim"):
        MultiHeadAttention(8, 2, kdim=4)(torch.randn(1, 3, 8))
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Lk\) = \(2, 3\), got shape \(2, 4\)"):
        m(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be bool.*torch.int64"):
        m(x, key_padding_mask=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(Lq, Lk\) = \(3, 3\).*\(2, 3, 3\)"):
        m(x, attn_mask=torch.zeros(2, 3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        m(x, attn_mask=torch.zeros(3, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="causal must be a bool"):
        m(x, causal=1)
    with pytest.raises(TypeError, match="kv_cache must be a selfattn.KVCache"):
        m(x, kv_cache=(torch.zeros(1), torch.zeros(1)))


# -- training machinery: gradients, state_dict, compile ------------------------------------


def _gradcheck_module(module, inputs, kwargs):
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in module.named_parameters()]
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]

    def f(*flat):
        ps, ins = flat[: len(params)], flat[len(params):]
        return functional_call(module, dict(zip(names, ps)), tuple(ins), kwargs)

    # fast_mode checks u^T J v for random u, v: every parameter, a fraction of the calls
    return torch.autograd.gradcheck(f, (*params, *xs), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_every_parameter(backend):
    torch.manual_seed(9)
    mha = MultiHeadAttention(4, 2, num_kv_heads=1, rope=True, qk_norm=True).double()  # head_dim 2
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0, 0.7)  # biases and norm scales away from their 0 / 1 init
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    kpm = torch.tensor([[False] * 4, [False, False, False, True]])
    sa = SelfAttention(3, qk_dim=2, v_dim=4, bias=True).double()
    with torch.no_grad():
        sa.b_Q.normal_()
    xs = torch.randn(2, 4, 3, dtype=torch.float64)
    mha_kw = dict(causal=True, key_padding_mask=kpm, backend=backend)
    try:
        mha(x, **mha_kw).sum().backward()
    except BackendUnavailable as e:
        # a backend that cannot do float64 or backward must say so, never compute silently
        assert "does not support" in str(e), str(e)
        with pytest.raises(BackendUnavailable):
            sa(xs, backend=backend)
        return
    assert _gradcheck_module(mha, [x], mha_kw)
    assert _gradcheck_module(sa, [xs], dict(window=2, backend=backend))


def test_state_dict_round_trip():
    torch.manual_seed(10)
    m = MultiHeadAttention(16, 4, num_kv_heads=2, rope=True, qk_norm=True)
    sa = SelfAttention(6, v_dim=3, bias=True)
    for mod, x in ((m, torch.randn(2, 5, 16)), (sa, torch.randn(2, 5, 6))):
        buf = io.BytesIO()
        torch.save(mod.state_dict(), buf)
        fresh = type(mod)(16, 4, num_kv_heads=2, rope=True, qk_norm=True) if mod is m else SelfAttention(6, v_dim=3, bias=True)
        assert not torch.equal(fresh(x, causal=True), mod(x, causal=True))
        buf.seek(0)
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        assert torch.equal(fresh(x, causal=True), mod(x, causal=True))
    assert set(m.state_dict()) == {f"{p}.{t}" for p in ("q_proj", "k_proj", "v_proj", "out_proj") for t in ("weight", "bias")} | {"q_norm.weight", "k_norm.weight"}


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
def test_torch_compile_forward(backend):
    # fullgraph: the layer, attention() and the backend must trace without a graph break
    torch.manual_seed(11)
    m = MultiHeadAttention(16, 4, num_kv_heads=2, rope=True, qk_norm=True).eval()
    x = torch.randn(2, 7, 16)
    compiled = torch.compile(lambda t: m(t, causal=True, backend=backend), fullgraph=True)
    got = compiled(x)
    want32 = m(x, causal=True, backend=backend)
    want64 = copy.deepcopy(m).double()(x.double(), causal=True, backend=backend)
    assert_close("compiled", got, want64, want32)


def test_torch_compile_auto_follows_use_backend():
    # auto under fullgraph torch.compile: use_backend's choice is read (a ContextVar is not traceable,
    # so the compiled path reads its process-wide mirror) and guarded: leaving the block recompiles
    from selfattn.backends import use_backend

    torch.manual_seed(12)
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    seen = []
    math_backend = selfattn.backends.get("math")
    real = type(math_backend).forward

    def spy(self, *args):
        seen.append("math")  # (runs while torch.compile traces the call)
        return real(self, *args)

    f = torch.compile(lambda a, b, c: selfattn.attention(a, b, c, causal=True), fullgraph=True, backend="aot_eager")
    with mock.patch.object(type(math_backend), "forward", spy), use_backend("math"):
        got = f(q, k, v)
    assert seen, "use_backend('math') was not followed under torch.compile"
    want64 = selfattn.attention(q.double(), k.double(), v.double(), causal=True, backend="reference")
    assert_close("compiled under use_backend", got, want64, selfattn.attention(q, k, v, causal=True, backend="math"))
    assert selfattn.backends.current() == "auto" and selfattn.backends._ACTIVE == ["auto"]

