"""Layers against an independent oracle: the definitions written out in plain torch, never selfattn.reference.

The oracle (``_sa``, ``_mha`` below) projects, splits heads, applies RoPE / RMS norm, repeats
key/value heads for GQA (query head h reads kv head h // (Hq / Hkv), as ``repeat_interleave``),
adds torch.nn.MultiheadAttention-style masks and takes the softmax, all in float64. The same code
run in float32 is the low-precision twin for STYLE rule 6's tolerance (tests/tolerance.py).
"""

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from selfattn import KVCache, MultiHeadAttention, SelfAttention
from selfattn.backends import BackendUnavailable
from selfattn.model import AttentionStack, Transformer, TransformerConfig
from tolerance import assert_close

BACKENDS = ["reference", "math", "cpu", "auto"]  # sdpa returns no stats; it is checked without weights
F64 = torch.float64


# -- the oracle -----------------------------------------------------------------------------


def _softmax(s):
    # rows with every key masked give 0 (selfattn's definition), never NaN
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = (s - m).exp()  # (..., Lq, Lk)
    z = e.sum(-1, keepdim=True)
    return torch.where(z > 0, e / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(e))


def _sa(layer, x, dtype, *, allowed=None, add=None, scale=None, softcap=None):
    """The notes' layer: softmax(x W_Q (x W_K)^T / sqrt(d_k)) x W_V."""
    P = {n: p.detach().to(dtype) for n, p in layer.named_parameters()}
    x = x.to(dtype)
    q, k, v = x @ P["W_Q"], x @ P["W_K"], x @ P["W_V"]  # (B, L, d)
    if "b_Q" in P:
        q, k, v = q + P["b_Q"], k + P["b_K"], v + P["b_V"]
    s = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)  # (B, L, L)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if add is not None:
        s = s + add.to(dtype)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    w = _softmax(s)
    return w @ v, w, s


def _rope(x, pos, base):
    D = x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, dtype=F64) / D)
    ang = (pos.to(F64)[..., None] * inv).to(x.dtype)  # (..., L, D/2)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)


def _mha(m, query, key=None, value=None, *, dtype=F64, allowed=None, add=None):
    """allowed (B, H, Lq, Lk) True = may attend; add (B, H, Lq, Lk) added to the scores."""
    P = {n: p.detach().to(dtype) for n, p in m.named_parameters()}
    key = query if key is None else key
    value = key if value is None else value
    if not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    query, key, value = (t.to(dtype) for t in (query, key, value))

    def lin(x, n):
        y = x @ P[n + ".weight"].T
        return y + P[n + ".bias"] if n + ".bias" in P else y

    B, Lq, _ = query.shape
    Lk = key.shape[1]
    H, Hk, Dh = m.num_heads, m.num_kv_heads, m.head_dim
    q = lin(query, "q_proj").view(B, Lq, H, Dh).transpose(1, 2)  # (B, H, Lq, Dh)
    k = lin(key, "k_proj").view(B, Lk, Hk, Dh).transpose(1, 2)  # (B, Hk, Lk, Dh)
    v = lin(value, "v_proj").view(B, Lk, Hk, Dh).transpose(1, 2)
    if m.qk_norm:
        q = q / torch.sqrt((q * q).mean(-1, keepdim=True) + 1e-6) * P["q_norm.weight"]
        k = k / torch.sqrt((k * k).mean(-1, keepdim=True) + 1e-6) * P["k_norm.weight"]
    if m.rope:
        q, k = _rope(q, torch.arange(Lq), m.rope_base), _rope(k, torch.arange(Lk), m.rope_base)
    k, v = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)  # (B, H, Lk, Dh)
    s = q @ k.transpose(-1, -2) / math.sqrt(Dh)  # (B, H, Lq, Lk)
    if add is not None:
        s = s + add.to(dtype)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    w = _softmax(s)
    _mha.scores = s  # (B, H, Lq, Lk) masked scores of the last call
    out = lin((w @ v).transpose(1, 2).reshape(B, Lq, H * Dh), "out_proj")  # (B, Lq, E)
    return (out if m.batch_first else out.transpose(0, 1)), w


def _probs_twin(w64, s64, s32):
    """The low-precision twin of weights read from a saved log-sum-exp (attention_probs): p = exp(s - lse)
    errs by p * (logit error + lse error), each measured on the float32 run of the oracle, and at
    least the roundings no backend avoids (the stored lse, s - lse, the exp: eps * (1 + |s| + |lse|)),
    as tests/_oracle.py's probs_reference."""
    fin = torch.isfinite(s64)
    lse64, lse32 = torch.logsumexp(s64, -1, keepdim=True), torch.logsumexp(s32.double(), -1, keepdim=True)
    lse64f = torch.where(torch.isfinite(lse64), lse64, torch.zeros_like(lse64))
    lse32f = torch.where(torch.isfinite(lse32), lse32, torch.zeros_like(lse32))
    ds = torch.where(fin, (s32.double() - s64).abs(), torch.zeros_like(s64))
    rel = ds + (lse32f - lse64f).abs()
    eps = torch.finfo(torch.float32).eps
    floor = torch.where(fin, eps * (1.0 + s64.abs() + lse64f.abs()), torch.zeros_like(s64))
    return w64 + w64 * torch.maximum(rel, floor)


def _causal(lq, lk):
    return torch.arange(lk)[None] <= torch.arange(lq)[:, None] + (lk - lq)  # bottom-right aligned


def _perturb(module, std=0.4):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)  # biases and norm scales away from 0 / 1
    return module


# -- SelfAttention ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "causal", "window", "scale", "softcap", "float_mask"])
def test_self_attention_against_oracle(backend, case):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    layer = _perturb(SelfAttention(6, qk_dim=3, v_dim=5, bias=True), 0.6)
    x = torch.randn(2, 7, 6, generator=gen)
    i, j = torch.arange(7)[:, None], torch.arange(7)[None]
    kw, ok = {}, {}
    if case == "causal":
        kw, ok = dict(causal=True), dict(allowed=j <= i)
    elif case == "window":
        kw, ok = dict(window=(2, 1)), dict(allowed=(j >= i - 2) & (j <= i + 1))
    elif case == "scale":
        kw = ok = dict(scale=0.3)
    elif case == "softcap":
        kw = ok = dict(softcap=1.5)
    elif case == "float_mask":
        add = torch.randn(2, 1, 7, 7, generator=gen)
        kw, ok = dict(mask=add), dict(add=add[:, 0])
    out, w = layer(x, **kw, need_weights=True, backend=backend)
    o64, w64, s64 = _sa(layer, x, F64, **ok)
    o32, w32, s32 = _sa(layer, x, torch.float32, **ok)
    w32 = _probs_twin(w64, s64, s32)
    assert out.shape == (2, 7, 5) and w.shape == (2, 7, 7)
    assert_close("out", out, o64, o32)
    assert_close("weights", w, w64, w32)


# -- MultiHeadAttention -------------------------------------------------------------------------


MHA_CFGS = {
    "mha": dict(),
    "gqa": dict(num_kv_heads=2),
    "mqa": dict(num_kv_heads=1),
    "rope_qknorm_gqa": dict(num_kv_heads=2, rope=True, qk_norm=True),
    "nobias_seqfirst": dict(bias=False, batch_first=False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", sorted(MHA_CFGS))
def test_mha_against_oracle(backend, cfg):
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    m = _perturb(MultiHeadAttention(16, 4, **MHA_CFGS[cfg]))
    x = torch.randn(2, 6, 16, generator=gen)
    if not m.batch_first:
        x = x.transpose(0, 1)
    for causal in (False, True):
        out, w = m(x, causal=causal, need_weights=True, average_attn_weights=False, backend=backend)
        allowed = _causal(6, 6) if causal else None
        o64, w64 = _mha(m, x, allowed=allowed)
        s64 = _mha.scores
        o32, w32 = _mha(m, x, dtype=torch.float32, allowed=allowed)
        w32 = _probs_twin(w64, s64, _mha.scores)
        assert w.shape == (2, 4, 6, 6)  # (B, H, Lq, Lk) whatever batch_first says, as torch
        assert_close(f"out causal={causal}", out, o64, o32)
        assert_close(f"weights causal={causal}", w, w64, w32)
        _, wa = m(x, causal=causal, need_weights=True, backend=backend)
        assert_close("averaged weights", wa, w64.mean(1), w32.mean(1))


@pytest.mark.parametrize("backend", BACKENDS + ["sdpa"])
def test_mha_cross_attention_torch_masks_against_oracle(backend):
    # kdim/vdim, Lq != Lk, bottom-right causal, and torch's mask conventions mixed: a float
    # key_padding_mask with a bool (B*H, Lq, Lk) attn_mask (True = not allowed), then the reverse
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    m = _perturb(MultiHeadAttention(12, 3, num_kv_heads=1, kdim=5, vdim=7))
    B, H, Lq, Lk = 2, 3, 4, 9
    q, k, v = torch.randn(B, Lq, 12, generator=gen), torch.randn(B, Lk, 5, generator=gen), torch.randn(B, Lk, 7, generator=gen)
    fk = torch.randn(B, Lk, generator=gen)
    bam = torch.rand(B * H, Lq, Lk, generator=gen) < 0.3
    bkp = torch.rand(B, Lk, generator=gen) < 0.3
    bkp[:, -1] = False
    fam = torch.randn(Lq, Lk, generator=gen)
    cases = [
        (dict(key_padding_mask=fk, attn_mask=bam, causal=True),
         dict(allowed=~bam.view(B, H, Lq, Lk) & _causal(Lq, Lk), add=fk[:, None, None, :].expand(B, H, Lq, Lk))),
        (dict(key_padding_mask=bkp, attn_mask=fam),
         dict(allowed=~bkp[:, None, None, :].expand(B, H, Lq, Lk), add=fam.expand(B, H, Lq, Lk))),
    ]
    for kw, ok in cases:
        o64, w64 = _mha(m, q, k, v, **ok)
        s64 = _mha.scores
        o32, w32 = _mha(m, q, k, v, dtype=torch.float32, **ok)
        w32 = _probs_twin(w64, s64, _mha.scores)
        assert_close("out", m(q, k, v, **kw, backend=backend), o64, o32)
        if backend != "sdpa":
            _, w = m(q, k, v, **kw, need_weights=True, average_attn_weights=False, backend=backend)
            assert_close("weights", w, w64, w32)


def test_mixed_mask_kinds_match_torch():
    # a float key_padding_mask and a bool attn_mask together, torch.nn.MultiheadAttention's own answer
    torch.manual_seed(4)
    m = _perturb(MultiHeadAttention(12, 3)).eval()
    t, t64 = m.to_torch().eval(), m.to_torch().double().eval()
    x = torch.randn(2, 5, 12)
    kpm = torch.randn(2, 5)
    am = torch.rand(5, 5) < 0.4
    am[:, 0] = False
    with torch.no_grad():
        o32, w32 = t(x, x, x, key_padding_mask=kpm, attn_mask=am)
        o64, w64 = t64(x.double(), x.double(), x.double(), key_padding_mask=kpm.double(), attn_mask=am)
    out, w = m(x, key_padding_mask=kpm, attn_mask=am, need_weights=True)
    assert_close("out", out, o64, o32)
    assert_close("weights", w, w64, w32)


# -- KV cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS + ["sdpa"])
def test_kv_cache_uneven_chunks_equal_full_forward(backend):
    torch.manual_seed(5)
    m = _perturb(MultiHeadAttention(16, 4, num_kv_heads=2, rope=True, qk_norm=True), 0.3).eval()
    x = torch.randn(2, 10, 16)
    full32, full64 = m(x, causal=True, backend="math"), copy.deepcopy(m).double()(x.double(), causal=True, backend="math")
    for window in (None, 3):
        kw = dict(causal=True, window=window, backend=backend)
        f32 = m(x, causal=True, window=window, backend="math")
        f64 = copy.deepcopy(m).double()(x.double(), causal=True, window=window, backend="math")
        cache = KVCache(2, 2, 16, 4)
        got = torch.cat([m(x[:, a:b], kv_cache=cache, **kw) for a, b in ((0, 3), (3, 4), (4, 8), (8, 9), (9, 10))], 1)
        assert_close(f"chunked window={window}", got, f64, f32)
    assert full32.shape == full64.shape


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_kv_cache_remembers_left_padding(kind):
    # torch's key_padding_mask conventions: bool True = padding, or float -inf = padding. Given
    # once at prefill, the cache must keep those slots masked for every later token, as a
    # full forward with the mask does (the float form was forgotten: decoding attended to the pads)
    torch.manual_seed(6)
    m = _perturb(MultiHeadAttention(16, 4, rope=True), 0.3).eval()
    x = torch.randn(2, 8, 16)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, :3] = True  # row 1: three pads on the left
    kpm = pad if kind == "bool" else torch.zeros(2, 8).masked_fill(pad, float("-inf"))
    full32 = m(x, causal=True, key_padding_mask=kpm)
    full64 = copy.deepcopy(m).double()(x.double(), causal=True, key_padding_mask=kpm if kind == "bool" else kpm.double())
    cache = KVCache(2, 4, 8, 4)
    steps = [m(x[:, :5], causal=True, key_padding_mask=kpm[:, :5], kv_cache=cache)]
    steps += [m(x[:, i:i + 1], causal=True, kv_cache=cache) for i in range(5, 8)]
    got = torch.cat(steps, 1)
    assert_close("row 0", got[0], full64[0], full32[0])
    assert_close("row 1, real tokens", got[1, 3:], full64[1, 3:], full32[1, 3:])
    assert cache.lengths.tolist() == [8, 5]


def test_kv_cache_with_torch_attn_mask_equals_full_forward():
    torch.manual_seed(7)
    m = _perturb(MultiHeadAttention(16, 4), 0.3).eval()
    x = torch.randn(2, 6, 16)
    am = (torch.rand(6, 6) < 0.3) | ~_causal(6, 6)
    am.fill_diagonal_(False)
    o64, _ = _mha(m, x, allowed=~am.expand(2, 4, 6, 6))
    o32, _ = _mha(m, x, dtype=torch.float32, allowed=~am.expand(2, 4, 6, 6))
    cache = KVCache(2, 4, 8, 4)
    got = torch.cat([m(x[:, :4], attn_mask=am[:4, :4], kv_cache=cache), m(x[:, 4:], attn_mask=am[4:], kv_cache=cache)], 1)
    assert_close("decoded with attn_mask", got, o64, o32)


def test_transformer_decoding_and_dtypes():
    torch.manual_seed(8)
    t = Transformer(TransformerConfig(vocab_size=20, dim=16, n_layers=2, n_heads=2, context=16)).eval()
    ids = torch.randint(0, 20, (2, 9))
    full32 = t(ids)
    t64 = copy.deepcopy(t).double()
    full64 = t64(ids)
    caches = t.new_kv_caches(2)
    got = torch.cat([t(ids[:, :4], kv_caches=caches)] + [t(ids[:, i:i + 1], kv_caches=caches) for i in range(4, 9)], 1)
    assert_close("decoded logits", got, full64, full32)
    caches64 = t64.new_kv_caches(2)
    assert all(c.dtype == F64 for c in caches64)
    got64 = torch.cat([t64(ids[:, :5], kv_caches=caches64), t64(ids[:, 5:], kv_caches=caches64)], 1)
    assert (got64 - full64).abs().max() < 1e-12


# -- mixed precision --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "math", "cpu"])
def test_qk_norm_under_autocast_trains(backend):
    # q/k RMS norms have float32 scales; under autocast(bfloat16) the projections are bfloat16 and
    # the norms handed attention float32 queries/keys with bfloat16 values ('must share one dtype')
    torch.manual_seed(9)
    m = MultiHeadAttention(16, 4, num_kv_heads=2, rope=True, qk_norm=True)
    x = torch.randn(2, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, causal=True, backend=backend)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    want = m(x, causal=True, backend="math")
    assert (out.float() - want).abs().max() < 0.05 * want.abs().max()  # bfloat16-sized, not wrong


def test_dropout_is_unbiased_and_off_in_eval():
    # each batch element draws its own dropout mask: the batch mean tends to the eval output
    torch.manual_seed(10)
    m = _perturb(MultiHeadAttention(8, 2, dropout=0.5), 0.5)
    x = torch.randn(1, 5, 8).expand(4000, 5, 8)
    m.eval()
    want = m(x[:1], causal=True, backend="math")
    assert torch.allclose(m(x[:2], causal=True, backend="math")[1:], want, rtol=0, atol=1e-5)
    m.train()
    for backend in ("math", "sdpa", "auto"):
        got = m(x, causal=True, backend=backend)
        spread = got.std(0) / math.sqrt(x.shape[0])  # standard error of the mean
        assert ((got.mean(0) - want[0]).abs() <= 5 * spread + 1e-6).all(), backend
        assert not torch.allclose(got[0], want[0])
    with pytest.raises(BackendUnavailable, match="dropout"):
        m(x[:1], backend="cpu")


# -- gradients --------------------------------------------------------------------------------


def _gradcheck(module, inputs, kwargs):
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in module.named_parameters()]
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]

    def f(*flat):
        return functional_call(module, dict(zip(names, flat[: len(params)])), tuple(flat[len(params):]), kwargs)

    return torch.autograd.gradcheck(f, (*params, *xs), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("backend", ["math", "cpu", "sdpa"])
def test_gradcheck_cross_attention_with_torch_masks(backend):
    torch.manual_seed(11)
    m = _perturb(MultiHeadAttention(4, 2, num_kv_heads=1, kdim=3, vdim=5).double(), 0.7)
    q, k, v = torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 5, 3, dtype=F64), torch.randn(2, 5, 5, dtype=F64)
    am = torch.rand(4, 3, 5) < 0.3
    am[..., 0] = False
    assert _gradcheck(m, [q, k, v], dict(key_padding_mask=torch.randn(2, 5, dtype=F64), attn_mask=am, causal=True, backend=backend))
    sa = _perturb(SelfAttention(3, qk_dim=2, v_dim=4, bias=True).double(), 0.7)
    xs = torch.randn(2, 4, 3, dtype=F64)
    assert _gradcheck(sa, [xs], dict(mask=torch.randn(2, 1, 4, 4, dtype=F64), causal=True, scale=0.7, backend=backend))


# -- edge shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (0, 4), (2, 0)])
def test_edge_shapes(backend, shape):
    B, L = shape
    torch.manual_seed(12)
    m = MultiHeadAttention(16, 4, num_kv_heads=2)
    x = torch.randn(B, L, 16, requires_grad=True)
    out, w, st = m(x, causal=True, need_weights=True, average_attn_weights=False, return_stats=True, backend=backend)
    assert out.shape == (B, L, 16) and w.shape == (B, 4, L, L) and st.lse.shape == (B, 4, L)
    out.sum().backward()
    assert x.grad.shape == x.shape
    if B and L:
        o64, w64 = _mha(m, x.detach())
        o32, w32 = _mha(m, x.detach(), dtype=torch.float32)
        assert_close("L=1 out", out, o64, o32)
        assert (w - 1).abs().max() <= 4 * torch.finfo(torch.float32).eps  # one key: weight 1
    sa = SelfAttention(4)
    o, w = sa(torch.randn(B, L, 4), need_weights=True, backend=backend)
    assert o.shape == (B, L, 4) and w.shape == (B, L, L)


# -- bad input ---------------------------------------------------------------------------------


def test_bad_positions_name_the_shape_given():
    m = MultiHeadAttention(16, 4, rope=True)
    x = torch.randn(2, 10, 16)
    with pytest.raises(ValueError, match=r"positions must have shape \(10,\) or \(2, 10\), got shape \(9,\)"):
        m(x, positions=torch.arange(9))
    with pytest.raises(ValueError, match=r"got shape \(3, 10\)"):
        m(x, positions=torch.arange(10).expand(3, 10))
    with pytest.raises(TypeError, match="positions must hold integers"):
        m(x, positions=torch.arange(10.0))


def test_attention_stack_checks_widths_and_ids():
    # residual=True adds each layer's output to its input: a layer narrower than embed_dim is refused
    # when the stack is built, naming the layer, not by a broadcasting error inside torch at forward
    with pytest.raises(ValueError, match=r"layers\[1\].*v_dim=3.*embed_dim=8"):
        AttentionStack(10, 8, [{"type": "SelfAttention"}, {"type": "SelfAttention", "v_dim": 3}], residual=True)
    AttentionStack(10, 8, [{"type": "SelfAttention", "v_dim": 3}])  # fine without the residual
    s = AttentionStack(10, 8, [{"type": "MultiHeadAttention", "num_heads": 2}])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        s(torch.tensor([[1, 10]]))
    with pytest.raises(ValueError, match=r"ids must be an integer tensor of shape \(B, L\)"):
        s(torch.zeros(1, 3))
    assert s(torch.tensor([[1, 9]])).shape == (1, 2, 8)


@pytest.mark.parametrize("bad,err,words", [
    (dict(key_padding_mask=torch.zeros(2, 1, 6, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape \(B, Lk\) = \(2, 6\), got shape \(2, 1, 6\)"),
    (dict(key_padding_mask=torch.zeros(6, dtype=torch.bool)), ValueError, r"key_padding_mask .*got shape \(6,\)"),
    (dict(key_padding_mask=torch.zeros(2, 6, dtype=torch.uint8)), TypeError, "key_padding_mask must be bool.*uint8"),
    (dict(attn_mask=torch.zeros(2, 4, 6, 6, dtype=torch.bool)), ValueError, r"attn_mask must have shape .*got shape \(2, 4, 6, 6\)"),
    (dict(attn_mask=torch.zeros(6, 5)), ValueError, r"attn_mask .*\(6, 6\).*got shape \(6, 5\)"),
    (dict(attn_mask=[[True]]), TypeError, "attn_mask must be a torch.Tensor"),
])
def test_bad_masks_name_argument_and_shape(bad, err, words):
    m = MultiHeadAttention(16, 4)
    with pytest.raises(err, match=words):
        m(torch.randn(2, 6, 16), **bad)


def test_bad_inputs_name_argument_and_shape():
    m = MultiHeadAttention(16, 4)
    with pytest.raises(ValueError, match=r"query has width 12 \(shape \(2, 6, 12\)\).*embed_dim=16"):
        m(torch.randn(2, 6, 12))
    with pytest.raises(TypeError, match="query has dtype torch.float64.*float32"):
        m(torch.randn(2, 6, 16, dtype=F64))
    with pytest.raises(ValueError, match=r"key and value must have the same length.*\(2, 6, 16\).*\(2, 3, 16\)"):
        m(torch.randn(2, 6, 16), torch.randn(2, 6, 16), torch.randn(2, 3, 16))
    with pytest.raises(TypeError, match="kv_cache: key has dtype torch.float32 but the cache holds torch.float64"):
        m(torch.randn(2, 1, 16), kv_cache=KVCache(2, 4, 4, 4, dtype=F64))
    sa = SelfAttention(4)
    with pytest.raises(ValueError, match=r"x has width 5 \(shape \(2, 3, 5\)\).*embed_dim=4"):
        sa(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"mask.*\(4, 4\).*\(2, 1, 3, 3\)"):
        sa(torch.randn(2, 3, 4), mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="init='identity' needs qk_dim == v_dim == embed_dim"):
        SelfAttention(4, v_dim=3, init="identity")


def test_from_torch_dtype_and_state_dict():
    torch.manual_seed(13)
    t = _perturb(nn.MultiheadAttention(8, 2, kdim=3, vdim=5, batch_first=True)).double().eval()
    m = MultiHeadAttention.from_torch(t)
    assert m.q_proj.weight.dtype == F64
    q, k, v = torch.randn(2, 4, 8, dtype=F64), torch.randn(2, 6, 3, dtype=F64), torch.randn(2, 6, 5, dtype=F64)
    with torch.no_grad():
        o, w = t(q, k, v)
    got, gw = m(q, k, v, need_weights=True)
    assert (got - o).abs().max() < 1e-12 and (gw - w).abs().max() < 1e-12
    fresh = MultiHeadAttention(8, 2, kdim=3, vdim=5).double()
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(q, k, v, need_weights=True)[0], got)


@pytest.mark.parametrize("backend", ["math", "cpu"])
def test_kv_cache_keeps_the_gradient_of_this_calls_keys(backend):
    # the cache stores values only; the keys and values of the call that appends them must still
    # carry their gradient (they were read back from the cache's buffer: k_proj and v_proj got none)
    torch.manual_seed(14)
    m = _perturb(MultiHeadAttention(8, 2, num_kv_heads=1, rope=True).double(), 0.5)
    x = torch.randn(2, 5, 8, dtype=F64)
    params = [m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.out_proj.weight]
    x1 = x.clone().requires_grad_(True)
    want = torch.autograd.grad(m(x1, causal=True, backend=backend).square().sum(), [x1, *params])
    x2 = x.clone().requires_grad_(True)
    out = m(x2, causal=True, backend=backend, kv_cache=KVCache(2, 1, 8, 4, dtype=F64))
    got = torch.autograd.grad(out.square().sum(), [x2, *params], allow_unused=True)
    for name, g, w in zip(["x", "q_proj", "k_proj", "v_proj", "out_proj"], got, want):
        assert g is not None, name
        assert (g - w).abs().max() < 1e-10, name

    # a later chunk: the cached past is a constant, the chunk's own input gets the exact gradient
    def chunk(x_new):
        cache = KVCache(2, 1, 8, 4, dtype=F64)
        with torch.no_grad():
            m(x[:, :3], causal=True, kv_cache=cache, backend=backend)
        return m(x_new, causal=True, kv_cache=cache, backend=backend)

    assert torch.autograd.gradcheck(chunk, (x[:, 3:].clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


def _patched_probs():
    # True once functional.attention_probs renormalises rows beyond its saved lse's precision
    # (/work/notes/layers_probs_finfo_min.diff); until then the test below is a strict xfail
    import inspect

    from selfattn import functional

    return "finfo.min" in inspect.getsource(functional.attention_probs)


@pytest.mark.xfail(not _patched_probs(), strict=True,
                   reason="attention_probs: a row all at finfo.min gives weights summing to Lk (reference/math) "
                          "or 0 (cpu); needs /work/notes/layers_probs_finfo_min.diff (functional.py)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_of_a_row_all_at_finfo_min_match_torch(backend):
    # torch.nn.MultiheadAttention with a float mask whose row is all finfo.min (transformers' way of
    # masking) attends uniformly there; the output already matches it, the weights must too
    torch.manual_seed(15)
    m = _perturb(MultiHeadAttention(8, 2)).eval()
    t, t64 = m.to_torch().eval(), m.to_torch().double().eval()
    x = torch.randn(2, 4, 8)
    am = torch.zeros(4, 4)
    am[2] = torch.finfo(torch.float32).min
    am[1, 1:] = torch.finfo(torch.float32).min  # a row with one key left: an ordinary row
    with torch.no_grad():
        o32, w32 = t(x, x, x, attn_mask=am)
        o64, w64 = t64(x.double(), x.double(), x.double(), attn_mask=am.double())
    out, w = m(x, attn_mask=am, need_weights=True, backend=backend)
    assert_close("out", out, o64, o32)
    assert_close("weights", w, w64, w32)


def test_self_attention_takes_a_mask_shaped_like_its_weights():
    # SelfAttention returns (B, L, L) weights; a (B, L, L) mask (selfattn's convention, True = may
    # attend) was refused ('does not broadcast to (B, H, Lq, Lk) = (2, 1, 5, 5)') unless B == 1
    gen = torch.Generator().manual_seed(16)
    torch.manual_seed(16)
    layer = _perturb(SelfAttention(6, qk_dim=3, v_dim=5), 0.6)
    x = torch.randn(2, 5, 6, generator=gen)
    allowed = torch.rand(2, 5, 5, generator=gen) < 0.6
    allowed[:, :, 0] = True
    add = torch.randn(2, 5, 5, generator=gen)
    for mask, ok in ((allowed, dict(allowed=allowed)), (add, dict(add=add))):
        out, w = layer(x, mask=mask, need_weights=True)
        o64, w64, s64 = _sa(layer, x, F64, **ok)
        o32, _, s32 = _sa(layer, x, torch.float32, **ok)
        assert_close("out", out, o64, o32)
        assert_close("weights", w, w64, _probs_twin(w64, s64, s32))
    with pytest.raises(ValueError, match=r"mask: shape \(3, 5, 5\) does not broadcast to the weights. \(B, L, L\) = \(2, 5, 5\)"):
        layer(x, mask=allowed[:1].expand(3, 5, 5))


def test_transformer_compiles_without_graph_breaks():
    # the ids range check read tensor values (int(ids.min())): fullgraph torch.compile refused the model
    torch.manual_seed(17)
    t = Transformer(TransformerConfig(vocab_size=20, dim=16, n_layers=1, n_heads=2)).eval()
    ids = torch.randint(0, 20, (2, 7))
    got = torch.compile(lambda i: t(i, backend="math"), fullgraph=True, backend="eager")(ids)
    assert_close("compiled logits", got, copy.deepcopy(t).double()(ids, backend="math"), t(ids, backend="math"))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 20\)"):
        t(torch.tensor([[3, 20]]))  # still checked eagerly


def test_self_attention_given_as_key_in_both_layouts():
    # m(x, x, x) is self-attention: with batch_first=False the transposed views of the same tensor
    # were taken for cross-attention, so positions were refused ('with a separate key it needs a kv_cache')
    torch.manual_seed(18)
    pos = torch.tensor([[0, 1, 2, 5, 6], [3, 4, 5, 6, 7]])
    for batch_first in (True, False):
        m = MultiHeadAttention(8, 2, rope=True, batch_first=batch_first).eval()
        x = torch.randn(2, 5, 8) if batch_first else torch.randn(5, 2, 8)
        want = m(x, causal=True, positions=pos, backend="math")
        assert torch.equal(m(x, x, x, causal=True, positions=pos, backend="math"), want)
        assert torch.equal(m(x, x, causal=True, positions=pos, backend="math"), want)
