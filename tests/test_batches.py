"""Real batches (issue 12): positions, key padding, mask functions, ALiBi, sinks, layouts.

Every definition is checked against a brute-force float64 loop written here from the issue's
words (not from selfattn's code): for each (batch, head, query) the allowed keys are listed
one by one, the logits built one by one, and the softmax taken over them (plus the sink).
Then the layouts (``masks.varlen``, ``left_padded``, ``packed``) are checked against
FlashAttention's semantics built from their definitions: per-sequence attention on the real
tokens alone.
"""

from __future__ import annotations

import math

import pytest
import torch

import selfattn
from selfattn import masks
from selfattn.backends import BackendUnavailable

UNFUSED = ["reference", "math", "sdpa"]


def _brute(q, k, v, *, allowed, scale=None, q_pos=None, kv_pos=None, slopes=None, sinks=None, softcap=None):
    """out (B, Hq, Lq, Dv), lse, max_logit, entropy (B, Hq, Lq) by loops, in float64.

    allowed(b, h, i, j, qp, kp) -> bool; positions default to bottom-right alignment.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hq, Lq, Dv, dtype=torch.float64)
    lse = torch.full((B, Hq, Lq), -math.inf, dtype=torch.float64)
    mx = torch.full((B, Hq, Lq), -math.inf, dtype=torch.float64)
    ent = torch.zeros(B, Hq, Lq, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            for i in range(Lq):
                qp = (i + Lk - Lq) if q_pos is None else int(q_pos[b if q_pos.dim() == 2 else 0, i] if q_pos.dim() == 2 else q_pos[i])
                logits, values = [], []
                for j in range(Lk):
                    kp = j if kv_pos is None else int(kv_pos[b, j] if kv_pos.dim() == 2 else kv_pos[j])
                    if not allowed(b, h, i, j, qp, kp):
                        continue
                    s = float(q[b, h, i] @ k[b, hk, j]) * scale
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    if slopes is not None:
                        sl = float(slopes[b, h] if slopes.dim() == 2 else slopes[h])
                        s -= sl * abs(qp - kp)
                    logits.append(s)
                    values.append(v[b, hk, j])
                terms = logits + ([float(sinks[h])] if sinks is not None else [])
                if not terms:
                    continue
                m = max(terms)
                z = sum(math.exp(t - m) for t in terms)
                lse[b, h, i] = m + math.log(z)
                mx[b, h, i] = max(logits) if logits else -math.inf
                ps = [math.exp(t - lse[b, h, i].item()) for t in terms]
                ent[b, h, i] = -sum(p * math.log(p) for p in ps if p > 0)
                for p, val in zip(ps, values):
                    out[b, h, i] += p * val
    return out, lse, mx, ent


def _qkv(b=2, hq=2, hkv=1, lq=7, lk=9, d=5, dv=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, lk, dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _check(backend, q, k, v, want, **kw):
    stats_ok = backend != "sdpa"
    try:
        res = selfattn.attention(q, k, v, backend=backend, return_stats=stats_ok, **kw)
    except BackendUnavailable as e:  # only sdpa may refuse here, and only by name
        assert backend == "sdpa" and ("sinks" in str(e) or "softcap" in str(e)), str(e)
        return
    out, st = res if stats_ok else (res, None)
    w_out, w_lse, w_max, w_ent = want
    torch.testing.assert_close(out.double(), w_out, rtol=1e-10, atol=1e-12, msg=lambda m: f"{backend} out: {m}")
    if st is not None:
        for name, got, w in (("lse", st.lse, w_lse), ("max_logit", st.max_logit, w_max), ("entropy", st.entropy, w_ent)):
            torch.testing.assert_close(got.double(), w, rtol=1e-10, atol=1e-12, msg=lambda m: f"{backend} {name}: {m}")


# -- positions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", UNFUSED)
@pytest.mark.parametrize("win", [None, (2, 0), (None, 1), (1, None), (0, 0)])
def test_positions_drive_causal_and_window(backend, win):
    q, k, v = _qkv(lq=6, lk=8)
    g = torch.Generator().manual_seed(3)
    q_pos = torch.randint(-3, 10, (2, 6), generator=g)  # per batch, unordered
    kv_pos = torch.randint(-3, 10, (2, 8), generator=g)

    def allowed(b, h, i, j, qp, kp):
        ok = kp <= qp
        if win is not None:
            left, right = win
            ok = ok and (left is None or kp >= qp - left) and (right is None or kp <= qp + right)
        return ok

    want = _brute(q, k, v, allowed=allowed, q_pos=q_pos, kv_pos=kv_pos)
    _check(backend, q, k, v, want, causal=True, window=win, q_positions=q_pos, kv_positions=kv_pos)


def test_default_positions_are_bottom_right():
    q, k, v = _qkv(lq=3, lk=7)
    a = selfattn.attention(q, k, v, causal=True, backend="reference")
    b = selfattn.attention(q, k, v, causal=True, q_positions=torch.arange(3) + 4, kv_positions=torch.arange(7), backend="reference")
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", UNFUSED)
def test_window_right_only_without_causal(backend):
    q, k, v = _qkv(lq=7, lk=7)
    want = _brute(q, k, v, allowed=lambda b, h, i, j, qp, kp: kp <= qp + 2)
    _check(backend, q, k, v, want, window=(None, 2))


# -- key padding and mask functions ----------------------------------------------------------------


@pytest.mark.parametrize("backend", UNFUSED)
def test_key_padding_any_pattern(backend):
    q, k, v = _qkv(lq=5, lk=9)
    keep = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    want = _brute(q, k, v, allowed=lambda b, h, i, j, qp, kp: bool(keep[b, j]) and kp <= qp)
    _check(backend, q, k, v, want, mask=masks.key_padding(keep), causal=True)


FLEX = {
    "prefix_lm": (lambda b, h, q, kv: (kv <= q) | (kv < 3), lambda b, h, i, j: j <= i or j < 3),
    "document_causal": (lambda b, h, q, kv: (kv <= q) & (q // 4 == kv // 4), lambda b, h, i, j: j <= i and i // 4 == j // 4),
    "sliding_global": (lambda b, h, q, kv: (kv <= q) & ((q - kv <= 2) | (kv < 2)), lambda b, h, i, j: j <= i and (i - j <= 2 or j < 2)),
    "per_head": (lambda b, h, q, kv: (kv <= q) | (h == 1), lambda b, h, i, j: j <= i or h == 1),
    "per_batch": (lambda b, h, q, kv: (kv % 2 == b) | (kv == q), lambda b, h, i, j: j % 2 == b or j == i),
    "nothing": (lambda b, h, q, kv: kv < 0, lambda b, h, i, j: False),
}


@pytest.mark.parametrize("backend", UNFUSED)
@pytest.mark.parametrize("name", sorted(FLEX))
def test_mask_functions_flex_examples(backend, name):
    fn, rule = FLEX[name]
    q, k, v = _qkv(lq=10, lk=10, hq=2, hkv=2)
    want = _brute(q, k, v, allowed=lambda b, h, i, j, qp, kp: rule(b, h, i, j))
    _check(backend, q, k, v, want, mask=masks.function(fn))


def test_function_mask_bad_results_are_named():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="must return a bool tensor, got dtype torch.int32"):
        selfattn.attention(q, k, v, mask=masks.function(lambda b, h, q_, kv: kv - q_), backend="math")

    def wrong_shape(b, h, q_, kv):
        return torch.ones(3, 3, dtype=torch.bool)

    with pytest.raises(ValueError, match="wrong_shape.*returned shape"):
        selfattn.attention(q, k, v, mask=masks.function(wrong_shape), backend="math")

    def boom(b, h, q_, kv):
        raise RuntimeError("no")

    with pytest.raises(ValueError, match="mask function 'boom' raised RuntimeError: no"):
        selfattn.attention(q, k, v, mask=masks.function(boom), backend="math")
    with pytest.raises(TypeError, match="callable"):
        masks.function(3)


def test_lowered_function_mask_keeps_only_partial_tiles():
    from selfattn.lowering import lower
    from selfattn.request import build_request

    q = torch.zeros(1, 1, 256, 8)
    fn = masks.function(lambda b, h, qi, kv: (kv <= qi) & ((qi - kv < 40) | (kv < 8)))
    req = build_request(q, q, q, mask=fn)
    low = lower(req, 32, 32)
    allowed = fn.allowed(256, 256)[0, 0]
    assert low.fn_bits.shape[0] == int((low.fn_index >= 0).sum())
    for qb in range(8):
        for kb in range(8):
            blk = allowed[qb * 32:(qb + 1) * 32, kb * 32:(kb + 1) * 32]
            kind = int(low.tiles[0, 0, qb, kb])
            assert kind == (0 if not blk.any() else 2 if blk.all() else 1)
            idx = int(low.fn_index[0, 0, qb, kb])
            if kind == 1:
                assert torch.equal(low.fn_bits[idx], blk)
            else:
                assert idx == -1
    # memory follows the partial tiles: a band and a column, not 256 x 256
    assert low.fn_bits.numel() < 256 * 256 // 2
    assert lower(req, 32, 32) is low  # cached per (mask, shape, block size)


def test_lowered_positions_classify_tiles():
    from selfattn.lowering import lower
    from selfattn.request import build_request

    q = torch.zeros(2, 1, 96, 4)
    pos = torch.stack([torch.arange(96), torch.arange(96) - 40])
    keep = pos >= 0
    req = build_request(q, q, q, mask=masks.key_padding(keep), causal=True, window=(30, 0), q_positions=pos, kv_positions=pos)
    low = lower(req, 16, 16)
    allowed = req.mask.allowed_in(req.geometry)  # (2, 1, 96, 96)
    for b in range(2):
        for qb in range(6):
            for kb in range(6):
                blk = allowed[b, 0, qb * 16:(qb + 1) * 16, kb * 16:(kb + 1) * 16]
                kind = int(low.tiles[b, 0, qb, kb])
                if not blk.any():
                    assert kind in (0, 1)  # conservative bounds may call an empty tile partial, never the reverse
                else:
                    assert kind == (2 if blk.all() else 1), (b, qb, kb)
    # the band of a causal window skips most tiles
    assert int((low.tiles == 0).sum()) >= 2 * 6 * 6 // 2


# -- ALiBi and sinks -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", UNFUSED)
def test_alibi_follows_positions(backend):
    q, k, v = _qkv(hq=3, hkv=1, lq=6, lk=9)
    slopes = torch.tensor([[0.5, 0.25, 2.0], [1.0, 0.0, 0.125]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [-4, -3, -2, -1, 0, 1, 2, 3, 4]])
    want = _brute(q, k, v, allowed=lambda b, h, i, j, qp, kp: kp <= qp, slopes=slopes, q_pos=pos[:, 3:], kv_pos=pos, softcap=3.0)
    kw = dict(causal=True, alibi_slopes=slopes, q_positions=pos[:, 3:], kv_positions=pos, softcap=3.0)
    if backend == "sdpa":
        with pytest.raises(BackendUnavailable, match="softcap"):
            selfattn.attention(q, k, v, backend=backend, **kw)
        kw.pop("softcap")
        want = _brute(q, k, v, allowed=lambda b, h, i, j, qp, kp: kp <= qp, slopes=slopes, q_pos=pos[:, 3:], kv_pos=pos)
    _check(backend, q, k, v, want, **kw)


@pytest.mark.parametrize("backend", ["reference", "math"])
def test_sinks_definition_and_stats(backend):
    q, k, v = _qkv(hq=2, hkv=2, lq=5, lk=5)
    sinks = torch.tensor([0.7, -1.5], dtype=torch.float64)
    keep = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)  # batch 1: first rows fully masked
    want = _brute(q, k, v, allowed=lambda b, h, i, j, qp, kp: bool(keep[b, j]) and kp <= qp, sinks=sinks)
    _check(backend, q, k, v, want, causal=True, mask=masks.key_padding(keep), sinks=sinks)
    out, st = selfattn.attention(q, k, v, causal=True, mask=masks.key_padding(keep), sinks=sinks, return_stats=True, backend=backend)
    # a fully-masked row: output 0, lse = the sink (the sink is the whole softmax), max -inf, entropy 0
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))
    assert torch.allclose(st.lse[1, :, 0], sinks)
    assert bool((st.max_logit[1, :, 0] == -math.inf).all()) and bool((st.entropy[1, :, 0] == 0).all())
    p = selfattn.attention_probs(q, k, st, causal=True, mask=masks.key_padding(keep), sinks=sinks)
    p_sink = torch.exp(sinks[None, :, None] - st.lse)
    torch.testing.assert_close(p.sum(-1), 1 - p_sink, rtol=0, atol=1e-12)


def test_sinks_gradcheck():
    q, k, v = _qkv(b=1, hq=2, hkv=1, lq=4, lk=4, d=3, dv=2)
    sinks = torch.tensor([0.3, -0.8], dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (q, k, v, sinks)]

    def f(q_, k_, v_, s_):
        return selfattn.attention(q_, k_, v_, causal=True, sinks=s_, backend="math")

    assert torch.autograd.gradcheck(f, args)


def test_sinks_gradient_matches_the_reference():
    q, k, v = _qkv(b=2, hq=2, hkv=1, lq=6, lk=6, d=4, dv=3)
    sinks = torch.tensor([1.1, -0.4], dtype=torch.float64)
    grads = {}
    for backend in ("reference", "math"):
        args = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        out = selfattn.attention(*args[:3], causal=True, sinks=args[3], backend=backend)
        out.pow(2).sum().backward()
        grads[backend] = [a.grad for a in args]
    for a, b in zip(grads["reference"], grads["math"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert bool((grads["math"][3] != 0).all())


# -- layouts: FlashAttention semantics from their definitions --------------------------------------


def _per_sequence(q, k, v, pieces, **kw):
    # run plain attention on each (query slice, key slice) alone and place it; rows outside stay 0
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64)
    for b, qs, ks in pieces:
        out[b:b + 1, :, qs] = selfattn.attention(q[b:b + 1, :, qs], k[b:b + 1, :, ks], v[b:b + 1, :, ks], backend="reference", **kw).double()
    return out


@pytest.mark.parametrize("backend", UNFUSED)
@pytest.mark.parametrize("win", [None, (2, 1)])
def test_varlen_right_padded_matches_flash_attention(backend, win):
    q, k, v = _qkv(b=3, hq=2, hkv=1, lq=6, lk=9)
    ql, kl = torch.tensor([6, 2, 4]), torch.tensor([9, 5, 4])
    lay = masks.varlen(ql, kl, 6, 9)
    got = selfattn.attention(q, k, v, causal=True, window=win, backend=backend, **lay)
    want = _per_sequence(q, k, v, [(b, slice(0, int(ql[b])), slice(0, int(kl[b]))) for b in range(3)], causal=True, window=win)
    torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", UNFUSED)
def test_left_padded_kv_cache_matches_flash_attention(backend):
    # a left-padded cache of 8 slots; the last 3 are the new queries (chunked prefill / decoding)
    q, k, v = _qkv(b=3, hq=2, hkv=2, lq=3, lk=8)
    lens = torch.tensor([8, 5, 3])
    lay = masks.left_padded(lens, 8, 3)
    got = selfattn.attention(q, k, v, causal=True, backend=backend, **lay)
    want = _per_sequence(q, k, v, [(b, slice(0, 3), slice(8 - int(lens[b]), 8)) for b in range(3)], causal=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", UNFUSED)
def test_packed_cu_seqlens_matches_flash_attention(backend):
    cu_q, cu_k = torch.tensor([0, 2, 5, 9]), torch.tensor([0, 4, 7, 12])
    q, k, v = _qkv(b=1, hq=2, hkv=1, lq=9, lk=12)
    lay = masks.packed(cu_q, cu_k)
    got = selfattn.attention(q, k, v, causal=True, backend=backend, **lay)
    want = torch.zeros(1, 2, 9, 4, dtype=torch.float64)
    for d in range(3):
        qs, ks = slice(int(cu_q[d]), int(cu_q[d + 1])), slice(int(cu_k[d]), int(cu_k[d + 1]))
        want[:, :, qs] = selfattn.attention(q[:, :, qs], k[:, :, ks], v[:, :, ks], causal=True, backend="reference")
    torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=1e-12)


def test_left_padded_generation_with_the_kv_cache():
    # MultiHeadAttention + KVCache on a left-padded batch gives each sequence's unpadded outputs
    torch.manual_seed(0)
    mha = selfattn.MultiHeadAttention(16, 4, num_kv_heads=2, rope=True).double()
    lens = [6, 3]
    x = torch.randn(2, 8, 16, dtype=torch.float64)  # 6 prompt slots + 2 generated tokens
    pad = torch.tensor([[False] * 6, [True] * 3 + [False] * 3])  # torch convention: True = ignore
    cache = selfattn.KVCache(2, 2, 8, 4, dtype=torch.float64)
    outs = [mha(x[:, :6], causal=True, key_padding_mask=pad, kv_cache=cache, backend="math")]
    assert cache.lengths.tolist() == lens
    for t in (6, 7):
        outs.append(mha(x[:, t:t + 1], causal=True, kv_cache=cache, backend="math"))
    got = torch.cat(outs, dim=1)
    for b, n in enumerate(lens):
        real = torch.cat([x[b:b + 1, 6 - n:6], x[b:b + 1, 6:]], dim=1)
        want = mha(real, causal=True, backend="reference")
        torch.testing.assert_close(got[b:b + 1, 6 - n:], want, rtol=1e-10, atol=1e-12)


# -- defects of the outside random test ------------------------------------------------------------


def test_attention_probs_per_head_bool_with_headless_float_mask():
    q = torch.randn(1, 6, 1, 1)
    k = torch.randn(1, 1, 1, 1)
    m = masks.dense(torch.ones(1, 6, 1, 1, dtype=torch.bool)) & masks.dense(torch.randn(1, 1))
    _, st = selfattn.attention(q, k, k, mask=m, return_stats=True, backend="math")
    p = selfattn.attention_probs(q, k, st, mask=m)
    torch.testing.assert_close(p, torch.ones(1, 6, 1, 1))


def test_attention_probs_heads_as_a_string_is_named():
    q = k = torch.randn(1, 2, 3, 4)
    _, st = selfattn.attention(q, k, k, return_stats=True, backend="math")
    with pytest.raises(TypeError, match="heads must be"):
        selfattn.attention_probs(q, k, st, heads="0")


@pytest.mark.parametrize("scale,dtype", [(0.0, torch.float16), (-0.2556, torch.float64)])
def test_auto_never_returns_nan_for_causal_with_nonpositive_scale(scale, dtype):
    q, k, v = _qkv(b=1, hq=1, hkv=1, lq=47, lk=47, d=16, dv=8, dtype=dtype)
    with pytest.raises(BackendUnavailable, match="scale"):
        selfattn.attention(q, k, v, causal=True, scale=scale, backend="sdpa")
    out = selfattn.attention(q, k, v, causal=True, scale=scale)
    assert not bool(torch.isnan(out).any())
    ref = selfattn.attention(q, k, v, causal=True, scale=scale, backend="reference")
    tol = 1e-2 if dtype == torch.float16 else 1e-12
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)


def test_sdpa_float_mask_is_not_rounded_to_bfloat16():
    # bias -300 has a bfloat16 spacing of 2: rounded, every logit would move by up to 1
    q, k, v = _qkv(b=1, hq=2, hkv=2, lq=16, lk=16, d=8, dv=8, dtype=torch.bfloat16)
    bias = -300 + torch.rand(16, 16, dtype=torch.float32) * 3
    got = selfattn.attention(q, k, v, mask=bias, backend="sdpa").double()
    ref = selfattn.attention(q, k, v, mask=bias, backend="reference").double()
    low = selfattn.reference.attention(q.float(), k.float(), v.float(), mask=masks.dense(bias), upcast=False)[0].to(torch.bfloat16).double()
    err, ref_err = (got - ref).abs().max(), (low - ref).abs().max()
    assert err <= 2 * ref_err + 1e-6, f"sdpa bf16 with a float mask: {err:.3g} vs the reference's own {ref_err:.3g}"


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,exc,words", [
    (dict(q_positions=torch.arange(5)), ValueError, "q_positions must have shape (7,) or (2, 7), got (5,)"),
    (dict(kv_positions=torch.arange(9.0)), TypeError, "kv_positions must hold integers, got dtype torch.float32"),
    (dict(q_positions=torch.zeros(3, 7, dtype=torch.long)), ValueError, "q_positions must have shape (7,) or (2, 7), got (3, 7)"),
    (dict(q_positions=[0, 1]), TypeError, "q_positions must be an integer torch.Tensor"),
    (dict(mask=masks.key_padding(torch.ones(2, 8, dtype=torch.bool))), ValueError, "key_padding: keep has shape (2, 8), expected (B, Lk) = (2, 9)"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes must have shape (2,) or (2, 2)"),
    (dict(alibi_slopes=torch.ones(2, dtype=torch.long)), TypeError, "alibi_slopes must be floating point"),
    (dict(sinks=torch.ones(2, 2)), ValueError, "sinks must have shape (2,)"),
    (dict(window=(None, None)), ValueError, "window: (None, None) bounds nothing"),
    (dict(backend_options={"num_splits": 2}, backend="math"), BackendUnavailable, "backend_options ['num_splits']"),
])
def test_bad_input_names_the_argument(kw, exc, words):
    q, k, v = _qkv()
    with pytest.raises(exc) as e:
        selfattn.attention(q, k, v, **kw)
    assert words in str(e.value), str(e.value)


def test_key_padding_keep_must_be_bool_2d():
    with pytest.raises(TypeError, match="keep must be bool"):
        masks.key_padding(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"keep must have shape \(B, Lk\)"):
        masks.key_padding(torch.ones(3, dtype=torch.bool))


def test_window_none_none_with_causal_is_just_causal():
    q, k, v = _qkv()
    a = selfattn.attention(q, k, v, causal=True, window=(None, None), backend="reference")
    b = selfattn.attention(q, k, v, causal=True, backend="reference")
    assert torch.equal(a, b)
