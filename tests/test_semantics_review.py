"""An outside review of the attention contract: every backend against an independent float64 oracle.

The oracle below is written from the definitions (shared/DESIGN.md, the README's API sections,
FlashAttention's ``flash_attn_func`` / ``flash_attn_varlen_func``, torch SDPA, gpt-oss sinks), one
(batch, head, row) at a time in plain float64 torch, and builds every mask from its own reading of
the definition. It never calls ``selfattn.reference``, ``selfattn.masks`` evaluation or the test
suite's ``_oracle``: a misreading shared by the library and its own reference shows up here.

    logits[i, j] = softcap(scale * q_i . k_j) - slope * |qpos_i - kvpos_j| + bias[i, j]
    allowed[i, j] = every mask's rule (causal: kvpos <= qpos; window: qpos-left <= kvpos <= qpos+right;
                    padding by index; key_padding; documents; dense bool; float -inf; mask function)
    p = softmax over allowed keys (+ a sink column with zero value); out = p . v
    lse = log(sum exp(logit) + exp(sink)) (natural log), max_logit over allowed keys only,
    entropy = -sum p log p over keys and sink (nats).  No allowed key (and no sink): out 0,
    lse -inf, max_logit -inf, entropy 0, zero gradients.

Tolerances follow STYLE.md rule 6 with the oracle's own low-precision twin (the same loop in the
input dtype): |got - ref64| <= 2 x |twin - ref64| + floor (3 x for gradients).
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

import selfattn
from selfattn import masks
from selfattn.backends import BackendUnavailable

NEG = float("-inf")

# -- the oracle ----------------------------------------------------------------------------------


def oracle(q, k, v, *, allowed=None, bias=None, scale=None, softcap=None, slopes=None, qpos=None, kvpos=None,
           sinks=None, dtype=torch.float64, prescale=False):
    """Attention from the definition, one (b, h, row) at a time, computed in ``dtype``.

    allowed: bool (B, Hq, Lq, Lk) or None; bias: float (B, Hq, Lq, Lk) or None (added; -inf = masked);
    slopes: (B, Hq) or None; qpos (B, Lq), kvpos (B, Lk) integer positions (None = defaults);
    sinks: (Hq,) or None. Returns out (B, Hq, Lq, Dv), lse, max_logit, entropy (B, Hq, Lq), probs (B, Hq, Lq, Lk).
    Differentiable in q, k, v, sinks (autograd through plain torch ops).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if qpos is None:
        qpos = (torch.arange(Lq) + Lk - Lq)[None].expand(B, Lq)
    if kvpos is None:
        kvpos = torch.arange(Lk)[None].expand(B, Lk)
    outs, lses, maxes, ents, probs = [], [], [], [], []
    for b in range(B):
        for h in range(Hq):
            kh = h // G  # torch's enable_gqa / repeat_interleave grouping: query head h reads kv head h // G
            s = (q[b, h] * scale) @ k[b, kh].T if prescale else (q[b, h] @ k[b, kh].T) * scale  # (Lq, Lk)
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            if slopes is not None:
                dist = (qpos[b][:, None] - kvpos[b][None, :]).abs().to(dtype)
                s = s - slopes[b, h].to(dtype) * dist
            ok = torch.ones(Lq, Lk, dtype=torch.bool)
            if allowed is not None:
                ok = ok & allowed[b, h]
            if bias is not None:
                bb = bias[b, h]
                ok = ok & (bb != NEG)
                s = s + torch.where(bb == NEG, torch.zeros((), dtype=bb.dtype), bb).to(dtype)
            for i in range(Lq):
                keys = ok[i].nonzero().flatten()
                row = s[i, keys]  # (n,) logits of the allowed keys
                cols = row if sinks is None else torch.cat([row, sinks[h].to(dtype).reshape(1)])
                prow = torch.zeros(Lk, dtype=dtype)
                if cols.numel() == 0:
                    outs.append(torch.zeros(Dv, dtype=dtype) + 0.0 * v.sum() + 0.0 * q.sum() + 0.0 * k.sum())
                    lses.append(torch.tensor(NEG, dtype=dtype))
                    maxes.append(torch.tensor(NEG, dtype=dtype))
                    ents.append(torch.tensor(0.0, dtype=dtype))
                    probs.append(prow)
                    continue
                m = cols.max().detach()
                e = torch.exp(cols - m)
                z = e.sum()
                p = e / z
                pk = p[: keys.numel()]
                outs.append(pk @ v[b, kh][keys] if keys.numel() else torch.zeros(Dv, dtype=dtype) + 0.0 * p.sum())
                lses.append(m + torch.log(z))
                maxes.append(row.max() if keys.numel() else torch.tensor(NEG, dtype=dtype))
                ents.append(-(torch.where(p > 0, p * torch.log(p), torch.zeros((), dtype=dtype))).sum())
                probs.append(prow.index_put((keys,), pk))
    shape = (B, Hq, Lq)
    out = torch.stack(outs).reshape(*shape, Dv) if outs else torch.zeros(*shape, Dv, dtype=dtype)
    st = lambda xs: torch.stack(xs).reshape(shape) if xs else torch.zeros(shape, dtype=dtype)  # noqa: E731
    pr = torch.stack(probs).reshape(*shape, Lk) if probs else torch.zeros(*shape, Lk, dtype=dtype)
    return out, st(lses), st(maxes), st(ents), pr


# -- mask rules from the definitions (never through selfattn.masks) ---------------------------------


def rule_causal(qpos, kvpos):  # (B, Lq), (B, Lk) -> (B, 1, Lq, Lk)
    return (kvpos[:, None, None, :] <= qpos[:, None, :, None])


def rule_window(qpos, kvpos, left, right):
    d = kvpos[:, None, None, :] - qpos[:, None, :, None]
    ok = torch.ones_like(d, dtype=torch.bool)
    if left is not None:
        ok &= d >= -left
    if right is not None:
        ok &= d <= right
    return ok


def default_pos(B, Lq, Lk):
    return (torch.arange(Lq) + Lk - Lq)[None].expand(B, Lq), torch.arange(Lk)[None].expand(B, Lk)


# -- tolerance (STYLE.md rule 6) ------------------------------------------------------------------


def close(name, got, ref, twin, dtype, factor=2.0, floor_ulps=2):
    got = got.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    twin = twin.detach().to(torch.float64)
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != oracle {tuple(ref.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN where the oracle has {ref[torch.isnan(got)][:4].tolist()}"
    fin = torch.isfinite(ref)
    assert torch.equal(got[~fin], ref[~fin]), f"{name}: non-finite entries differ: got {got[~fin].tolist()[:6]} want {ref[~fin].tolist()[:6]}"
    assert torch.isfinite(got[fin]).all(), f"{name}: non-finite where the oracle is finite"
    if not fin.any():
        return
    err = (got - ref)[fin].abs()
    base = (twin - ref)[fin & torch.isfinite(twin)].abs()
    finite = ref[fin].abs()
    # float64: the twin is the oracle itself, so the floor carries the bound (1e-12: ~4500 ulp at these sizes,
    # far below any semantic error, which shows at 1e-3 or more)
    floor = (1e-12 if dtype == torch.float64 else floor_ulps * torch.finfo(dtype).eps) * max(1.0, float(finite.max()))
    tol = factor * (float(base.max()) if base.numel() else 0.0) + floor
    assert float(err.max()) <= tol, f"{name}: max|diff| {float(err.max()):.3e} > tol {tol:.3e} (mean {float(err.mean()):.3e})"


# -- randomized cases -----------------------------------------------------------------------------


class Case:
    """One random request: the library's arguments and the oracle's own reading of them."""

    def __init__(self, seed, dtype=torch.float32, features=None):
        rnd = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        self.seed, self.dtype = seed, dtype
        B = rnd.choice([1, 2])
        Hkv = rnd.choice([1, 2])
        G = rnd.choice([1, 2, 3])
        Hq = Hkv * G
        Lq = rnd.choice([1, 2, 3, 5, 8, 13])
        Lk = rnd.choice([1, 2, 4, 7, 11, 16])
        D = rnd.choice([1, 4, 8, 19])
        Dv = rnd.choice([D, 3, 8])
        feats = set(features) if features is not None else {f for f in FEATURES if rnd.random() < 0.3}
        if "tiles" in feats:  # several query and key tiles (the fused kernels' 64 x 64), ragged last ones
            B, Hkv, G = 1, 1, rnd.choice([1, 2])
            Hq = Hkv * G
            Lq, Lk = rnd.choice([3, 65, 97, 130]), rnd.choice([65, 97, 130])
            D, Dv = rnd.choice([4, 8]), 4
        self.features = feats
        self.shape = (B, Hq, Hkv, Lq, Lk, D, Dv)
        big = 3.0 if "large" in feats else 1.0
        self.q = (torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64) * big).to(dtype)
        self.k = (torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64) * big).to(dtype)
        self.v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=torch.float64).to(dtype)
        if "strided" in feats:  # FlashAttention's (B, L, H, D) memory seen through a transpose, keys broadcast
            self.q = self.q.transpose(1, 2).contiguous().transpose(1, 2)
            self.k = self.k[:1].expand(B, Hkv, Lk, D)
            self.v = self.v.transpose(1, 2).contiguous().transpose(1, 2)
        kw, parts = {}, []
        allowed = torch.ones(B, Hq, Lq, Lk, dtype=torch.bool)
        bias = None
        qpos, kvpos = default_pos(B, Lq, Lk)
        if "positions" in feats:
            kind = rnd.choice(["offset", "per_batch", "shuffled"])
            if kind == "offset":  # a decoding-like cache offset, shared by the batch
                off = rnd.randint(-3, 20)
                qpos = (torch.arange(Lq) + off)[None].expand(B, Lq)
                kw["q_positions"] = qpos[0].clone()
                if rnd.random() < 0.5:
                    kvpos = (torch.arange(Lk) + rnd.randint(-2, 5))[None].expand(B, Lk)
                    kw["kv_positions"] = kvpos[0].clone().to(torch.int32)
            else:
                qpos = torch.randint(-2, Lk + 3, (B, Lq), generator=g)
                if kind == "per_batch":
                    qpos = qpos.sort(dim=1).values
                kvpos = torch.randint(-2, Lk + 3, (B, Lk), generator=g)
                kw["q_positions"], kw["kv_positions"] = qpos.clone(), kvpos.clone()
        if "causal" in feats:
            allowed &= rule_causal(qpos, kvpos)
            if rnd.random() < 0.5:
                kw["causal"] = True
            else:
                parts.append(masks.causal())
        if "window" in feats:
            left = rnd.choice([None, 0, 1, 3])
            right = rnd.choice([None, 0, 2]) if left is not None else rnd.choice([0, 2])
            allowed &= rule_window(qpos, kvpos, left, right)
            if rnd.random() < 0.5:
                kw["window"] = (left, right)
            else:
                parts.append(masks.window(left, right))
        if "padding" in feats:
            kvl = torch.randint(0, Lk + 1, (B,), generator=g)
            ql = torch.randint(0, Lq + 1, (B,), generator=g) if rnd.random() < 0.5 else None
            ok = torch.arange(Lk)[None, None, None, :] < kvl[:, None, None, None]
            if ql is not None:
                ok = ok & (torch.arange(Lq)[None, None, :, None] < ql[:, None, None, None])
            allowed &= ok
            parts.append(masks.padding(kvl, ql))
        if "key_padding" in feats:
            keep = torch.rand(B, Lk, generator=g) < 0.7
            allowed &= keep[:, None, None, :]
            parts.append(masks.key_padding(keep))
        if "documents" in feats:
            if Lq <= Lk and rnd.random() < 0.5:
                ids = torch.randint(0, 3, (Lk,), generator=g).sort().values
                qids = ids[Lk - Lq:]  # the definition: queries take the labels of the last Lq keys
                parts.append(masks.documents(ids))
            else:
                ids = torch.randint(0, 3, (B, Lk), generator=g)
                qids = torch.randint(0, 3, (B, Lq), generator=g)
                parts.append(masks.documents(ids, qids))
            ids = ids.expand(B, Lk) if ids.dim() == 2 else ids[None].expand(B, Lk)
            qids = qids.expand(B, Lq) if qids.dim() == 2 else qids[None].expand(B, Lq)
            allowed &= (qids[:, None, :, None] == ids[:, None, None, :])
        if "function" in feats:
            n = rnd.randint(0, 3)
            def fn(b, h, qi, ki, n=n):
                return ((ki <= qi) | (ki < n)) & ((h + b + ki) % 3 != 1)
            bi = torch.arange(B).view(-1, 1, 1, 1)
            hi = torch.arange(Hq).view(1, -1, 1, 1)
            allowed &= fn(bi, hi, torch.arange(Lq).view(1, 1, -1, 1), torch.arange(Lk).view(1, 1, 1, -1))
            parts.append(masks.function(fn))
        if "dense_bool" in feats:
            t = torch.rand(rnd.choice([1, B]), rnd.choice([1, Hq]), Lq, Lk, generator=g) < 0.75
            allowed &= t.expand(B, Hq, Lq, Lk)
            parts.append(t if not parts and rnd.random() < 0.5 else masks.dense(t))
        if "dense_float" in feats:
            t = torch.randn(rnd.choice([1, B]), 1, Lq, Lk, generator=g, dtype=torch.float64)
            t = t.masked_fill(torch.rand(t.shape, generator=g) < 0.15, NEG)
            t = t.to(torch.float32 if dtype != torch.float64 else torch.float64)
            bias = t.expand(B, Hq, Lq, Lk).to(torch.float64)
            parts.append(masks.dense(t))
        if parts:
            m = parts[0]
            for p in parts[1:]:
                m = (masks.dense(m) if isinstance(m, torch.Tensor) else m) & p
            kw["mask"] = m
        self.slopes = None
        if "alibi" in feats:
            sl = torch.rand(rnd.choice([1, B]), Hq, generator=g) * 0.9 + 0.05
            kw["alibi_slopes"] = sl[0] if sl.shape[0] == 1 else sl
            self.slopes = sl.expand(B, Hq).to(torch.float32).to(torch.float64)  # float32 by the contract
        self.sinks = None
        if "sinks" in feats:
            self.sinks = torch.randn(Hq, generator=g, dtype=torch.float64).to(dtype)
            kw["sinks"] = self.sinks
        if "softcap" in feats:
            kw["softcap"] = rnd.choice([0.5, 2.0, 30.0])
        if "scale" in feats:
            kw["scale"] = rnd.choice([0.03, 0.5, 1.7, -0.7, 0.0])
        self.kw = kw
        self.allowed, self.bias = allowed, bias
        self.qpos, self.kvpos = qpos, kvpos

    def oracle_kw(self):
        return dict(allowed=self.allowed, bias=self.bias, scale=self.kw.get("scale"), softcap=self.kw.get("softcap"),
                    slopes=self.slopes, qpos=self.qpos, kvpos=self.kvpos)

    def __repr__(self):
        return f"Case(seed={self.seed}, {self.dtype}, shape={self.shape}, features={sorted(self.features)})"


FEATURES = ("positions", "causal", "window", "padding", "key_padding", "documents", "function", "dense_bool",
            "dense_float", "alibi", "sinks", "softcap", "scale", "large", "strided", "tiles")

BACKENDS = [n for n in selfattn.backends.names() if n != "triton"]  # triton: its own test below (interpreter)
MUST_SERVE = {"reference", "math", "cpu", "auto"}


def _run(case, backend, grad, do):
    # (without gradients the inputs go in as they are: strided or broadcast views included)
    q, k, v = (t.clone().requires_grad_() if grad else t for t in (case.q, case.k, case.v))
    kw = dict(case.kw)
    sinks = None
    if case.sinks is not None:
        sinks = case.sinks.clone().requires_grad_(grad)
        kw["sinks"] = sinks
    try:
        out, st = selfattn.attention(q, k, v, return_stats=True, backend=backend, **kw)
    except BackendUnavailable as e:
        if "stat" not in str(e).lower().split("does not support", 1)[-1]:
            raise
        out, st = selfattn.attention(q, k, v, backend=backend, **kw), None  # (sdpa has no statistics)
    grads = None
    if grad:
        out.backward(do)
        grads = [q.grad, k.grad, v.grad] + ([sinks.grad] if sinks is not None else [])
    return out, st, grads


def _oracle_run(case, dt, grad, do, flip=False, prescale=False):
    # one oracle run in dtype dt; flip=True reverses the key order (another order of every key sum),
    # prescale=True scales q before the product (another rounding of every score)
    q, k, v = (t.to(torch.float64).clone().requires_grad_(grad) for t in (case.q, case.k, case.v))
    sinks = None if case.sinks is None else case.sinks.to(torch.float64).clone().requires_grad_(grad)
    okw = case.oracle_kw()
    kk, vv = k, v
    if flip:
        kk, vv = k.flip(2), v.flip(2)
        okw["allowed"] = okw["allowed"].flip(-1)
        okw["bias"] = None if okw["bias"] is None else okw["bias"].flip(-1)
        okw["kvpos"] = okw["kvpos"].flip(-1)
    out, lse, mx, ent, pr = oracle(q, kk, vv, sinks=sinks, dtype=dt, prescale=prescale, **okw)
    if flip:
        pr = pr.flip(-1)
    grads = None
    if grad:
        out.backward(do.to(dt))
        leaves = [q, k, v] + ([sinks] if sinks is not None else [])
        grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]  # unused: exactly 0
    return [out, lse, mx, ent, pr, grads]


def _reference(case, grad, do):
    """(float64 results, low-precision twins): each twin the farthest of three evaluation orders, per element."""
    ref = _oracle_run(case, torch.float64, grad, do)
    if case.dtype == torch.float64:
        return ref, ref
    a = _oracle_run(case, case.dtype, grad, do)
    b = _oracle_run(case, case.dtype, grad, do, flip=True)
    c = _oracle_run(case, case.dtype, grad, do, flip=True, prescale=True)

    def farther(x, y, r):
        x, y = x.detach().double(), y.detach().double()
        return torch.where((x - r.detach()).abs() >= (y - r.detach()).abs(), x, y)

    twin = [farther(farther(x, y, r), z, r) for x, y, z, r in zip(a[:5], b[:5], c[:5], ref[:5])]
    twin.append(None if not grad else [farther(farther(x, y, r), z, r) for x, y, z, r in zip(a[5], b[5], c[5], ref[5])])
    return ref, twin


def check_backend(case, backend, grad=False):
    B, Hq, Hkv, Lq, Lk, D, Dv = case.shape
    do = torch.randn(B, Hq, Lq, Dv, generator=torch.Generator().manual_seed(case.seed + 1), dtype=torch.float64)
    try:
        out, st, grads = _run(case, backend, grad, do.to(case.dtype))
    except BackendUnavailable as e:
        if backend in MUST_SERVE:
            raise AssertionError(f"{backend} refused {case}: {e}") from e
        return "refused"
    ref, twin = _reference(case, grad, do)
    assert out.dtype == case.dtype, f"output dtype {out.dtype}, input {case.dtype}"
    acc = torch.float64 if case.dtype == torch.float64 else torch.float32
    checks = [("out", out, ref[0], twin[0])]
    if st is not None:
        checks += [("lse", st.lse, ref[1], twin[1]), ("max_logit", st.max_logit, ref[2], twin[2]),
                   ("entropy", st.entropy, ref[3], twin[3])]
    for name, got, r, t in checks:
        if name != "out":
            assert got.dtype == acc, f"{name} dtype {got.dtype}, want {acc}"
        close(f"{backend} {name} {case}", got, r, t, case.dtype)
    if grad:
        names = ["dq", "dk", "dv", "dsinks"]
        for name, got, r, t in zip(names, grads, ref[5], twin[5]):
            assert got is not None, f"{backend} {name} is None {case}"
            # gradients: STYLE's factor 3, and a floor of 8 ulp of the largest gradient (a row with few keys
            # and D = 1 sums terms that cancel; the twin's own orders can miss that by chance)
            close(f"{backend} {name} {case}", got, r, t, case.dtype, factor=3.0, floor_ulps=8)
    return "served"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(24))
def test_random_forward_float32(backend, seed):
    check_backend(Case(1000 + seed, torch.float32), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(12))
def test_random_forward_float64(backend, seed):
    check_backend(Case(2000 + seed, torch.float64), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(8))
def test_random_forward_bfloat16(backend, seed):
    check_backend(Case(3000 + seed, torch.bfloat16), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(12))
def test_random_gradients_float32(backend, seed):
    check_backend(Case(4000 + seed, torch.float32), backend, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(8))
def test_random_gradients_float64(backend, seed):
    check_backend(Case(5000 + seed, torch.float64), backend, grad=True)


def _tiled_case(seed, dtype):
    # a random mix of features that always spans several 64 x 64 tiles (Case draws "tiles" only now and then)
    rnd = random.Random(seed)
    return Case(seed, dtype, {"tiles"} | {f for f in FEATURES if rnd.random() < 0.35})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,grad,seed", [(torch.float32, False, s) for s in range(6)] + [(torch.float32, True, s) for s in range(4)]
                         + [(torch.float64, True, s) for s in range(2)] + [(torch.bfloat16, False, s) for s in range(2)])
def test_random_several_tiles(backend, dtype, grad, seed):
    check_backend(_tiled_case(8000 + seed, dtype), backend, grad=grad)


# -- FlashAttention's flash_attn_func, from its definition -------------------------------------------


def fa_allowed(lq, lk, causal, window):
    """flash_attn_func's mask for one sequence: row i sits at i + lk - lq; window (left, right), -1 = unbounded;
    causal sets right = 0."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(lq)[:, None] + lk - lq
    j = torch.arange(lk)[None, :]
    ok = torch.ones(lq, lk, dtype=torch.bool)
    if right >= 0:
        ok &= j <= i + right
    if left >= 0:
        ok &= j >= i - left
    return ok


def fa_kwargs(causal, window):
    # the library's spelling of flash_attn_func's (causal, window_size)
    left, right = window
    kw = {"causal": causal}
    if causal:
        right = 0
    if left >= 0 or (right >= 0 and not causal):
        kw["window"] = (None if left < 0 else left, None if right < 0 else right)
    return kw


FA_GRID = [(lq, lk, causal, window)
           for lq, lk in ((1, 7), (5, 5), (7, 3), (3, 9), (6, 1))
           for causal in (False, True)
           for window in ((-1, -1), (2, -1), (-1, 1), (1, 1), (0, 0), (3, 0))]


def _compare_all(q, k, v, oracle_kw, lib_kw, dtype, backends=BACKENDS, sinks=None, label=""):
    """Run every backend (with statistics where it has them) and hold out/lse/max_logit/entropy to the oracle."""
    ref = oracle(q.double(), k.double(), v.double(), sinks=None if sinks is None else sinks.double(), **oracle_kw)
    if dtype == torch.float64:
        twin = ref
    else:
        twin = oracle(q.double(), k.double(), v.double(), sinks=None if sinks is None else sinks.double(), dtype=dtype, **oracle_kw)
    served = []
    for b in backends:
        kw = dict(lib_kw)
        if sinks is not None:
            kw["sinks"] = sinks
        try:
            try:
                out, st = selfattn.attention(q, k, v, return_stats=True, backend=b, **kw)
            except BackendUnavailable as e:
                if "stat" not in str(e).lower().split("does not support", 1)[-1]:
                    raise
                out, st = selfattn.attention(q, k, v, backend=b, **kw), None
        except BackendUnavailable:
            assert b not in MUST_SERVE, f"{b} refused {label}"
            continue
        served.append(b)
        close(f"{b} out {label}", out, ref[0], twin[0], dtype)
        if st is not None:
            for name, got, r, t in zip(("lse", "max_logit", "entropy"), (st.lse, st.max_logit, st.entropy), ref[1:4], twin[1:4]):
                close(f"{b} {name} {label}", got, r, t, dtype)
    return served


@pytest.mark.parametrize("lq,lk,causal,window", FA_GRID)
def test_flash_attn_func_masks(lq, lk, causal, window):
    g = torch.Generator().manual_seed(lq * 100 + lk)
    B, H, D = 2, 2, 8
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (lq, lk, lk))
    allowed = fa_allowed(lq, lk, causal, window).expand(B, H, lq, lk)
    served = _compare_all(q, k, v, {"allowed": allowed}, fa_kwargs(causal, window), torch.float32,
                          label=f"Lq={lq} Lk={lk} causal={causal} window_size={window}")
    assert {"reference", "math", "cpu", "auto"} <= set(served)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (2, 0)), (False, (1, 2))])
@pytest.mark.parametrize("lq,lk", [(4, 9), (9, 4), (6, 6)])
def test_flash_attn_func_alibi_softcap(lq, lk, causal, window, softcap):
    # FlashAttention: softcap(scale * q.k) first, then - slope * |i + lk - lq - j|, slopes (B, H) or (H,)
    g = torch.Generator().manual_seed(7 * lq + lk)
    B, H, D = 2, 3, 16
    q, k, v = (torch.randn(B, H, n, D, generator=g) * 2 for n in (lq, lk, lk))
    slopes = torch.rand(B, H, generator=g) + 0.1
    allowed = fa_allowed(lq, lk, causal, window).expand(B, H, lq, lk)
    ok = {"allowed": allowed, "slopes": slopes.double(), "softcap": softcap}
    lib = dict(fa_kwargs(causal, window), alibi_slopes=slopes, softcap=softcap)
    _compare_all(q, k, v, ok, lib, torch.float32, label=f"alibi Lq={lq} Lk={lk} causal={causal} window={window} softcap={softcap}")


def _packed_case(seed, lens_q, lens_k, Hq=4, Hkv=2, D=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(1, Hq, tq, D, generator=g).to(dtype)
    k = torch.randn(1, Hkv, tk, D, generator=g).to(dtype)
    v = torch.randn(1, Hkv, tk, D, generator=g).to(dtype)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)))
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)))
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (1, 0)), (False, (2, 1))])
@pytest.mark.parametrize("lens", [((3, 5, 1), (3, 5, 1)), ((2, 4, 3), (5, 4, 7)), ((4, 0, 2), (2, 3, 6)), ((5, 1), (2, 1))])
def test_flash_attn_varlen_packed(lens, causal, window):
    """flash_attn_varlen_func: each sequence on its own, aligned bottom-right on its own lengths; ALiBi and
    sinks per sequence. The library spells it masks.packed(cu_seqlens_q, cu_seqlens_k) at batch 1."""
    lens_q, lens_k = lens
    q, k, v, cu_q, cu_k = _packed_case(sum(lens_q) * 10 + sum(lens_k), lens_q, lens_k)
    Hq = q.shape[1]
    slopes = torch.rand(Hq, generator=torch.Generator().manual_seed(3)) + 0.2
    sinks = torch.randn(Hq, generator=torch.Generator().manual_seed(4))
    # the oracle: one dense allowed matrix, block-diagonal, each block FlashAttention's mask of that sequence,
    # and positions that restart per sequence (ALiBi reads |i + lk - lq - j| inside a sequence)
    tq, tk = q.shape[2], k.shape[2]
    allowed = torch.zeros(tq, tk, dtype=torch.bool)
    qpos, kvpos = torch.zeros(tq, dtype=torch.long), torch.zeros(tk, dtype=torch.long)
    for n, (a, b) in enumerate(zip(lens_q, lens_k)):
        q0, k0 = int(cu_q[n]), int(cu_k[n])
        allowed[q0:q0 + a, k0:k0 + b] = fa_allowed(a, b, causal, window)
        qpos[q0:q0 + a] = torch.arange(a) + b - a
        kvpos[k0:k0 + b] = torch.arange(b)
    lay = masks.packed(cu_q, cu_k)
    ok = {"allowed": allowed.expand(1, Hq, tq, tk), "slopes": slopes[None].double(), "qpos": qpos[None], "kvpos": kvpos[None]}
    lib = dict(fa_kwargs(causal, window), alibi_slopes=slopes, **lay)
    _compare_all(q, k, v, ok, lib, torch.float32, sinks=sinks, label=f"varlen {lens} causal={causal} window={window}")


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_varlen_right_padded(causal):
    """masks.varlen on a right-padded batch = flash_attn_varlen_func on the unpadded sequences, padded rows 0."""
    g = torch.Generator().manual_seed(11)
    B, Hq, Hkv, Lq, Lk, D = 3, 2, 1, 6, 8, 8
    ql, kl = torch.tensor([6, 2, 0]), torch.tensor([3, 8, 5])
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k, v = torch.randn(B, Hkv, Lk, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)
    allowed = torch.zeros(B, Hq, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        a, c = int(ql[b]), int(kl[b])
        allowed[b, :, :a, :c] = fa_allowed(a, c, causal, (-1, -1))
    lay = masks.varlen(ql, kl, Lq, Lk)
    _compare_all(q, k, v, {"allowed": allowed}, dict(causal=causal, **lay), torch.float32, label=f"varlen right-padded causal={causal}")


@pytest.mark.parametrize("lq", [1, 3, 6])
def test_left_padded_cache(lq):
    """masks.left_padded: each sequence's real tokens are the last lengths[b] slots, at positions 0..len-1;
    with causal it must equal FlashAttention on the unpadded sequence (queries = its last rows)."""
    g = torch.Generator().manual_seed(20 + lq)
    B, Hq, Hkv, Lk, D = 3, 4, 2, 6, 8
    lens = torch.tensor([6, 3, 1])
    q = torch.randn(B, Hq, lq, D, generator=g)
    k, v = torch.randn(B, Hkv, Lk, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)
    slopes = torch.rand(Hq, generator=g) + 0.1
    allowed = torch.zeros(B, Hq, lq, Lk, dtype=torch.bool)
    for b in range(B):
        n = int(lens[b])
        real_q = min(lq, n)  # query slots that hold real tokens: the last real_q of the lq rows
        allowed[b, :, lq - real_q:, Lk - n:] = fa_allowed(real_q, n, True, (-1, -1))
    pos = torch.arange(Lk)[None] - (Lk - lens)[:, None]
    lay = masks.left_padded(lens, Lk, lq)
    ok = {"allowed": allowed, "slopes": slopes[None].expand(B, Hq).double(), "qpos": pos[:, Lk - lq:], "kvpos": pos}
    _compare_all(q, k, v, ok, dict(causal=True, alibi_slopes=slopes, **lay), torch.float32, label=f"left-padded lq={lq}")


# -- torch SDPA, from its own function ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "bool", "float", "bool_heads", "causal_square"])
@pytest.mark.parametrize("gqa", [1, 3])
def test_sdpa_semantics(kind, gqa):
    """torch.nn.functional.scaled_dot_product_attention(scale=, enable_gqa=, attn_mask=) in float64 is the
    oracle here (rows it leaves NaN -- fully masked -- are 0 by our contract)."""
    g = torch.Generator().manual_seed(gqa * 10 + len(kind))
    B, Hkv, Lq, Lk, D, Dv = 2, 2, 5, 7, 6, 4
    Hq = Hkv * gqa
    if kind == "causal_square":
        Lk = Lq
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=torch.float64)
    mask, causal = None, False
    if kind == "bool":
        mask = torch.rand(B, 1, Lq, Lk, generator=g) < 0.6
        mask[0, 0, 1] = False  # one fully masked row
    elif kind == "bool_heads":
        mask = torch.rand(Hq, Lq, Lk, generator=g) < 0.6
    elif kind == "float":
        mask = torch.randn(1, Hq, Lq, Lk, generator=g, dtype=torch.float64)
    elif kind == "causal_square":
        causal = True
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.37, enable_gqa=gqa > 1)
    want = torch.nan_to_num(want, nan=0.0)
    for b in BACKENDS:
        got = selfattn.attention(q, k, v, mask=mask, causal=causal, scale=0.37, backend=b)
        err = float((got - want).abs().max())
        assert err < 1e-12, f"{b} {kind} gqa={gqa}: max|diff| {err:.3e} against torch SDPA"


def test_causal_lq_ne_lk_is_bottom_right_not_sdpa_top_left():
    # torch's is_causal is top-left for Lq != Lk; ours (and FlashAttention's) is bottom-right, which torch
    # spells torch.nn.attention.bias.causal_lower_right
    from torch.nn.attention.bias import causal_lower_right
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 3, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(3, 6))
    for b in BACKENDS:
        got = selfattn.attention(q, k, v, causal=True, backend=b)
        assert float((got - want).abs().max()) < 1e-12, b


# -- fully masked rows, every way there is to make one ----------------------------------------------


def _fully_masked_ways(B, Hq, Lq, Lk):
    # (name, library kwargs, allowed (B, Hq, Lq, Lk)) where row 1 of every (b, h) (and more) has no key
    rows = torch.ones(B, Hq, Lq, Lk, dtype=torch.bool)
    ways = []
    t = torch.ones(B, Hq, Lq, Lk, dtype=torch.bool)
    t[:, :, 1] = False
    ways.append(("dense_bool", {"mask": t}, t))
    f = torch.zeros(1, 1, Lq, Lk)
    f[..., 1, :] = NEG
    ways.append(("dense_float -inf", {"mask": f}, (f != NEG).expand(B, Hq, Lq, Lk)))
    ql = torch.tensor([1] * B)
    a = rows.clone()
    a[:, :, 1:] = False
    ways.append(("padding q_lengths", {"mask": masks.padding(torch.tensor([Lk] * B), ql)}, a))
    ways.append(("key_padding none", {"mask": masks.key_padding(torch.zeros(B, Lk, dtype=torch.bool))}, ~rows))
    ways.append(("function nothing", {"mask": masks.function(lambda b, h, qi, ki: ki < 0)}, ~rows))
    qp = torch.arange(Lq) - 5  # queries before every key
    ways.append(("causal positions", {"causal": True, "q_positions": qp}, ~rows))
    a = rows.clone()
    a[:, :, : Lq - Lk] = False  # Lq > Lk: the first Lq - Lk rows see no key (bottom-right)
    if Lq > Lk:
        ways.append(("causal Lq > Lk", {"causal": True}, torch.tril(torch.ones(Lq, Lk, dtype=torch.bool), diagonal=Lk - Lq).expand(B, Hq, Lq, Lk)))
    ways.append(("window empty", {"window": (0, 0), "q_positions": torch.arange(Lq) + 100}, ~rows))
    ways.append(("documents apart", {"mask": masks.documents(torch.zeros(Lk, dtype=torch.long), torch.ones(Lq, dtype=torch.long))}, ~rows))
    return ways


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("way", range(9))
def test_fully_masked_rows(way, with_sinks, dtype):
    B, Hq, Hkv, Lq, Lk, D = 2, 2, 1, 5, 3, 8
    name, kw, allowed = _fully_masked_ways(B, Hq, Lq, Lk)[way]
    g = torch.Generator().manual_seed(way)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
    k, v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype), torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    sinks = torch.randn(Hq, generator=g).to(dtype) if with_sinks else None
    empty = ~allowed.any(-1)  # (B, Hq, Lq) rows with no key
    assert empty.any()
    do = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
    for b in BACKENDS:
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        ss = None if sinks is None else sinks.clone().requires_grad_()
        try:
            try:
                out, st = selfattn.attention(qq, kk, vv, sinks=ss, return_stats=True, backend=b, **kw)
            except BackendUnavailable as e:
                if "stat" not in str(e).lower().split("does not support", 1)[-1]:
                    raise
                out, st = selfattn.attention(qq, kk, vv, sinks=ss, backend=b, **kw), None
        except BackendUnavailable:
            assert b not in MUST_SERVE, f"{b} refused {name}"
            continue
        label = f"{b} {name} sinks={with_sinks} {dtype}"
        assert not torch.isnan(out).any(), f"{label}: NaN output"
        assert torch.equal(out[empty], torch.zeros_like(out[empty])), f"{label}: fully-masked rows not 0"
        if st is not None:
            if with_sinks:  # lse = the sink's logit (the cpu kernel's base-2 halves may round it by an ulp)
                want = sinks.detach().double()[None, :, None].expand(B, Hq, Lq)[empty]
                err = float((st.lse[empty].detach().double() - want).abs().max())
                assert err <= 2 * torch.finfo(st.lse.dtype).eps * max(1.0, float(want.abs().max())), f"{label}: lse {st.lse[empty]} want the sinks {want}"
            else:
                assert torch.equal(st.lse[empty], torch.full_like(st.lse[empty], NEG)), f"{label}: lse {st.lse[empty]}"
            assert torch.equal(st.max_logit[empty], torch.full_like(st.max_logit[empty], NEG)), f"{label}: max_logit"
            assert torch.equal(st.entropy[empty], torch.zeros_like(st.entropy[empty])), f"{label}: entropy"
            for s in (st.lse, st.max_logit, st.entropy):
                assert not torch.isnan(s).any(), f"{label}: NaN statistic"
        out.backward(do)
        for n, t in (("dq", qq), ("dk", kk), ("dv", vv)) + ((("dsinks", ss),) if ss is not None else ()):
            assert t.grad is not None and not torch.isnan(t.grad).any(), f"{label}: {n} NaN or None"
        assert torch.equal(qq.grad[empty], torch.zeros_like(qq.grad[empty])), f"{label}: dq of fully-masked rows not 0"
        if bool(empty.all()):
            for n, t in (("dk", kk), ("dv", vv)) + ((("dsinks", ss),) if ss is not None else ()):
                assert torch.equal(t.grad, torch.zeros_like(t.grad)), f"{label}: {n} not 0 with every row fully masked"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_finite_minimum_float_mask_is_not_a_mask(dtype, backend):
    """Transformers masks with finfo(dtype).min, not -inf: a row whose every key gets finfo.min is NOT fully
    masked -- torch SDPA and the reference give it the plain average of the values (the scores vanish beside
    the bias) -- and a key given finfo.min next to an unmasked key gets weight 0. No backend may turn it into
    -inf (cpu's float32 kernels did until 4fc255e: bias x log2(e) overflowed, the row became fully masked, output 0)."""
    g = torch.Generator().manual_seed(9)
    B, H, Lq, Lk, D = 1, 2, 4, 5, 8
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64).to(dtype) for n in (Lq, Lk, Lk))
    m = torch.zeros(1, 1, Lq, Lk, dtype=dtype)
    low = torch.finfo(dtype).min
    m[..., 0, :] = low  # row 0: every key at the minimum
    m[..., 2, 1:] = low  # row 2: only key 0 unmasked
    ref = oracle(q, k, v, bias=m.double().expand(B, H, Lq, Lk))
    twin = oracle(q, k, v, bias=m.double().expand(B, H, Lq, Lk), dtype=dtype)
    try:
        out = selfattn.attention(q, k, v, mask=m, backend=backend)
    except BackendUnavailable:
        assert backend not in MUST_SERVE
        return
    close(f"{backend} finfo.min mask {dtype}", out, ref[0], twin[0], dtype)


# -- attention_probs, from the saved lse of every backend ---------------------------------------------


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "sdpa"])
@pytest.mark.parametrize("seed", range(10))
def test_attention_probs_random(seed, backend):
    case = Case(6000 + seed, torch.float32 if seed % 3 else torch.float64)
    B, Hq, Hkv, Lq, Lk, D, Dv = case.shape
    out, st = selfattn.attention(case.q, case.k, case.v, return_stats=True, backend=backend, **case.kw)
    rnd = random.Random(seed)
    heads = sorted(rnd.sample(range(Hq), rnd.randint(1, Hq)))
    rows = [rnd.randrange(Lq) for _ in range(rnd.randint(1, Lq))]
    kw = {n: case.kw[n] for n in case.kw}
    p = selfattn.attention_probs(case.q, case.k, st, heads=heads, rows=rows, **kw)
    full = oracle(case.q.double(), case.k.double(), case.v.double(),
                  sinks=None if case.sinks is None else case.sinks.double(), **case.oracle_kw())
    ref = full[4]
    twin = oracle(case.q.double(), case.k.double(), case.v.double(), dtype=case.dtype,
                  sinks=None if case.sinks is None else case.sinks.double(), **case.oracle_kw())[4].double()
    # exp(logit - lse) from a saved lse in the accumulation dtype: each of the two rounds by half an ulp of its
    # own size, which multiplies p by up to 1 + eps (|lse| + |logit|) / 2 (the oracle's twin normalises instead)
    eps = torch.finfo(st.lse.dtype).eps
    size = (full[1].abs().nan_to_num(0, 0, 0) + full[2].abs().nan_to_num(0, 0, 0))[..., None]
    twin = torch.maximum((twin - ref).abs(), ref * eps * size / 2 + ref * eps) + ref
    sel = lambda t: t[:, heads][:, :, rows]  # noqa: E731
    assert p.shape == (B, len(heads), len(rows), Lk)
    close(f"{backend} attention_probs {case}", p, sel(ref), sel(twin), case.dtype)


# -- dropout: its expected value is the attention without it -------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_expected_value(backend):
    g = torch.Generator().manual_seed(3)
    n, H, Lq, Lk, D = 4000, 1, 3, 4, 2  # n independent copies of one small problem along the batch
    q = torch.randn(1, H, Lq, D, generator=g, dtype=torch.float64).expand(n, H, Lq, D)
    k = torch.randn(1, H, Lk, D, generator=g, dtype=torch.float64).expand(n, H, Lk, D)
    v = torch.randn(1, H, Lk, D, generator=g, dtype=torch.float64).expand(n, H, Lk, D)
    def draw():
        try:
            return selfattn.attention(q, k, v, causal=True, dropout_p=0.3, generator=torch.Generator().manual_seed(1), backend=backend)
        except BackendUnavailable as e:
            if backend != "sdpa":  # sdpa takes dropout from the global RNG only
                raise
            assert "generator" in str(e), e
        torch.manual_seed(1)
        return selfattn.attention(q, k, v, causal=True, dropout_p=0.3, backend=backend)

    try:
        out = draw()
    except BackendUnavailable as e:
        assert backend in ("cpu", "triton"), f"{backend} refused dropout: {e}"
        assert "dropout" in str(e).split("does not support", 1)[-1], f"{backend}'s refusal does not name dropout: {e}"
        return
    again = draw()
    assert torch.equal(out, again), f"{backend}: dropout with the same generator state differs"
    want = oracle(q[:1], k[:1], v[:1], allowed=torch.tril(torch.ones(Lq, Lk, dtype=torch.bool), Lk - Lq).expand(1, H, Lq, Lk))[0]
    mean = out.mean(0, keepdim=True)
    spread = out.std(0, keepdim=True) / math.sqrt(n)
    z = ((mean - want).abs() / spread.clamp_min(1e-12)).max()
    assert float(z) < 5.0, f"{backend}: mean of dropout outputs is {float(z):.1f} standard errors from the attention without it"
    assert not torch.equal(out[0], out[1]), f"{backend}: dropout drew the same mask for two batch elements"


# -- gradcheck in float64 ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["math", "cpu"])
@pytest.mark.parametrize("what", ["sinks_window_alibi", "softcap_positions", "padding_documents_gqa"])
def test_gradcheck(backend, what):
    g = torch.Generator().manual_seed(len(what))
    B, Hq, Hkv, Lq, Lk, D = 1, 2, 1, 3, 4, 3
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(Hq, generator=g, dtype=torch.float64, requires_grad=True)
    if what == "sinks_window_alibi":
        f = lambda q, k, v, s: selfattn.attention(q, k, v, window=(1, 1), alibi_slopes=torch.tensor([0.5, 0.25], dtype=torch.float64), sinks=s, backend=backend)  # noqa: E731
        args = (q, k, v, sinks)
    elif what == "softcap_positions":
        f = lambda q, k, v: selfattn.attention(q, k, v, causal=True, softcap=1.5, q_positions=torch.tensor([0, 2, -1]), backend=backend)  # noqa: E731
        args = (q, k, v)
    else:
        m = masks.padding(torch.tensor([3]), torch.tensor([2])) & masks.documents(torch.tensor([0, 0, 1, 1]))
        f = lambda q, k, v: selfattn.attention(q, k, v, mask=m, backend=backend)  # noqa: E731
        args = (q, k, v)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


# -- empty sequences -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq,lk", [(0, 3), (3, 0), (0, 0)])
def test_empty_sequences(backend, lq, lk):
    q = torch.randn(2, 2, lq, 4, requires_grad=True)
    k = torch.randn(2, 1, lk, 4, requires_grad=True)
    v = torch.randn(2, 1, lk, 5, requires_grad=True)
    sinks = torch.randn(2, requires_grad=True)
    try:
        out, st = selfattn.attention(q, k, v, sinks=sinks, causal=True, return_stats=True, backend=backend)
    except BackendUnavailable:
        assert backend not in MUST_SERVE
        return
    assert out.shape == (2, 2, lq, 5) and not out.abs().sum()
    assert st.lse.shape == (2, 2, lq)
    assert torch.equal(st.lse, sinks.detach()[None, :, None].expand(2, 2, lq))  # the sink is the whole softmax
    assert torch.equal(st.max_logit, torch.full((2, 2, lq), NEG)) and not st.entropy.abs().sum()
    out.sum().backward()
    for t in (q, k, v, sinks):
        assert t.grad is not None and not t.grad.abs().sum()


# -- NaN reaches only the rows that attend to it ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_isolation(backend):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 4, 8, generator=g)
    k = torch.randn(1, 2, 4, 8, generator=g)
    v = torch.randn(1, 2, 4, 8, generator=g)
    q[0, 0, 1, 3] = float("nan")  # row 1 of head 0
    k[0, 1, 2, 0] = float("nan")  # key 2 of head 1: causal rows 2 and 3 see it
    try:
        out = selfattn.attention(q, k, v, causal=True, backend=backend)
    except BackendUnavailable:
        assert backend not in MUST_SERVE
        return
    bad = torch.zeros(1, 2, 4, dtype=torch.bool)
    bad[0, 0, 1] = True
    bad[0, 1, 2:] = True
    assert torch.equal(torch.isnan(out).any(-1), bad), f"{backend}: NaN rows {torch.isnan(out).any(-1)}"


# -- a float mask that requires grad: its gradient is dS, the softmax's gradient at each allowed pair ------


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_gradient(backend):
    g = torch.Generator().manual_seed(8)
    B, H, Lq, Lk, D = 2, 2, 3, 5, 4
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (Lq, Lk, Lk))
    m0 = torch.randn(1, H, Lq, Lk, generator=g, dtype=torch.float64)
    m0[0, 0, 1, 2] = NEG
    do = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    m = m0.clone().requires_grad_()
    try:
        out = selfattn.attention(q, k, v, mask=m, backend=backend)
    except BackendUnavailable as e:
        assert backend in ("cpu", "sdpa"), f"{backend} refused a float mask gradient: {e}"
        return
    out.backward(do)
    mr = m0.clone().requires_grad_()
    ref = oracle(q, k, v, bias=mr.expand(B, H, Lq, Lk))[0]
    ref.backward(do)
    want = torch.nan_to_num(mr.grad, nan=0.0)
    assert m.grad is not None and not torch.isnan(m.grad).any(), f"{backend}: mask grad {m.grad}"
    assert float((m.grad - want).abs().max()) < 1e-12, f"{backend}: mask grad off by {float((m.grad - want).abs().max()):.3e}"


# -- bad input: a clear error naming the argument and what was seen (rule 5) ----------------------------------


def _bad_calls():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8)
    mk = masks  # noqa
    return [
        # (label, kwargs, exception type, words the message must contain)
        ("q_positions float", dict(q_positions=torch.zeros(5)), TypeError, ["q_positions", "float32"]),
        ("q_positions length", dict(q_positions=torch.arange(4)), ValueError, ["q_positions", "(4,)", "(5,)"]),
        ("q_positions batch", dict(q_positions=torch.zeros(3, 5, dtype=torch.long)), ValueError, ["q_positions", "(3, 5)"]),
        ("kv_positions length", dict(kv_positions=torch.arange(5)), ValueError, ["kv_positions", "(5,)", "(6,)"]),
        ("q_positions list", dict(q_positions=[0, 1, 2, 3, 4]), TypeError, ["q_positions", "list"]),
        ("alibi shape", dict(alibi_slopes=torch.ones(2)), ValueError, ["alibi_slopes", "(2,)", "(4,)"]),
        ("alibi dtype", dict(alibi_slopes=torch.ones(4, dtype=torch.long)), TypeError, ["alibi_slopes", "int64"]),
        ("sinks shape", dict(sinks=torch.ones(2, 4)), ValueError, ["sinks", "(2, 4)", "(4,)"]),
        ("sinks dtype", dict(sinks=torch.ones(4, dtype=torch.long)), TypeError, ["sinks", "int64"]),
        ("keep shape", dict(mask=masks.key_padding(torch.ones(2, 5, dtype=torch.bool))), ValueError, ["keep", "(2, 5)", "(2, 6)"]),
        ("function non-bool", dict(mask=masks.function(lambda b, h, qi, ki: qi - ki)), TypeError, ["mask function", "bool", "int32"]),
        ("function shape", dict(mask=masks.function(lambda b, h, qi, ki: torch.ones(3, 3, dtype=torch.bool))), ValueError, ["mask function", "(1, 1, 3, 3)", "(2, 4, 5, 6)"]),
        ("function raises", dict(mask=masks.function(lambda b, h, qi, ki: 1 // 0)), ValueError, ["mask function", "ZeroDivisionError"]),
        ("window both None", dict(window=(None, None)), ValueError, ["window", "None"]),
        ("window negative", dict(window=-1), ValueError, ["window", "-1"]),
        ("window float", dict(window=2.5), TypeError, ["window", "2.5"]),
        ("window triple", dict(window=(1, 2, 3)), ValueError, ["window", "(1, 2, 3)"]),
        ("softcap 0", dict(softcap=0.0), ValueError, ["softcap", "0.0"]),
        ("scale nan", dict(scale=float("nan")), ValueError, ["scale", "nan"]),
        ("scale str", dict(scale="0.5"), TypeError, ["scale", "str"]),
        ("dropout 1", dict(dropout_p=1.0), ValueError, ["dropout_p", "1.0"]),
        ("mask shape", dict(mask=torch.ones(5, 5, dtype=torch.bool)), ValueError, ["mask", "(5, 5)", "(2, 4, 5, 6)"]),
        ("mask dtype", dict(mask=torch.ones(5, 6, dtype=torch.long)), TypeError, ["mask", "int64"]),
        ("padding too long", dict(mask=masks.padding(torch.tensor([7, 3]))), ValueError, ["kv_lengths", "[7, 3]", "6"]),
        ("padding batch", dict(mask=masks.padding(torch.tensor([3]))), ValueError, ["kv_lengths", "(1,)", "2"]),
        ("documents shape", dict(mask=masks.documents(torch.zeros(5, dtype=torch.long))), ValueError, ["segment_ids", "(1, 5)", "6"]),
        ("causal int", dict(causal=1), TypeError, ["causal", "int"]),
        ("backend unknown", dict(backend="flash"), ValueError, ["backend", "flash"]),
        ("query rank", dict(query=torch.randn(2, 5, 8)), ValueError, ["query", "(2, 5, 8)"]),
        ("query dtype", dict(query=q.long()), TypeError, ["query", "int64"]),
        ("mixed dtypes", dict(query=q.double()), TypeError, ["float64", "float32"]),
        ("heads", dict(query=torch.randn(2, 3, 5, 8)), ValueError, ["heads", "(2, 3, 5, 8)", "(2, 2, 6, 8)"]),
        ("head dim", dict(query=torch.randn(2, 4, 5, 7)), ValueError, ["head_dim", "(2, 4, 5, 7)"]),
        ("key/value length", dict(value=torch.randn(2, 2, 5, 8)), ValueError, ["sequence length", "(2, 2, 5, 8)"]),
        ("batch", dict(query=torch.randn(3, 4, 5, 8)), ValueError, ["batch", "(3, 4, 5, 8)"]),
    ], q, k


@pytest.mark.parametrize("i", range(35))
def test_bad_input_names_argument(i):
    calls, q, k = _bad_calls()
    label, kw, exc, words = calls[i]
    args = {"query": q, "key": k, "value": k}
    for n in ("query", "key", "value"):
        if n in kw:
            args[n] = kw.pop(n)
    with pytest.raises(exc) as info:
        selfattn.attention(args["query"], args["key"], args["value"], **kw)
    msg = str(info.value)
    missing = [w for w in words if w.lower() not in msg.lower()]
    assert not missing, f"{label}: message {msg!r} does not name {missing}"


def test_bad_input_count():
    assert len(_bad_calls()[0]) == 35


def test_window_pair_as_list():
    # FlashAttention's window_size is a pair; a list [left, right] means the same as the tuple
    q = k = v = torch.randn(1, 1, 6, 4)
    want = selfattn.attention(q, k, v, window=(2, 1), backend="math")
    assert torch.equal(selfattn.attention(q, k, v, window=[2, 1], backend="math"), want)


# -- ALiBi at large positions: only differences matter --------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq", [1, 5])
@pytest.mark.parametrize("base", [2**24 + 1, 2**26 + 3, 2**40 + 5])
def test_alibi_large_positions(base, lq, backend):
    """A long cache's or ring attention's global positions can pass 2**24, where float32 stops holding every
    integer; -slope * |q_pos - kv_pos| depends only on the difference, which stays small. (cpu took the
    difference of float32 positions, up to 0.6 off in the output; fixed in 4fc255e.)"""
    g = torch.Generator().manual_seed(lq)
    B, H, Lk, D = 2, 2, 9, 8
    q = torch.randn(B, H, lq, D, generator=g, requires_grad=True)
    k, v = (torch.randn(B, H, Lk, D, generator=g, requires_grad=True) for _ in range(2))
    slopes = torch.tensor([0.5, 0.125])
    off = torch.tensor([[0], [7]])  # per-sequence offsets on top of the base
    kp = torch.arange(Lk)[None] + base + off
    qp = torch.arange(lq)[None] + base + off + Lk - lq
    allowed = rule_causal(qp, kp).expand(B, H, lq, Lk)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = oracle(qd, kd, vd, allowed=allowed, slopes=slopes[None].expand(B, H).double(), qpos=qp, kvpos=kp)[0]
    do = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref.backward(do)
    try:
        out = selfattn.attention(q, k, v, causal=True, alibi_slopes=slopes, q_positions=qp, kv_positions=kp, backend=backend)
    except BackendUnavailable:
        assert backend not in MUST_SERVE
        return
    out.backward(do.float())
    for name, got, want in (("out", out, ref), ("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad), ("dv", v.grad, vd.grad)):
        err = float((got.detach().double() - want.detach()).abs().max())
        assert err < 2e-5, f"{backend} {name} at positions ~{base}: max|diff| {err:.3e}"


# -- scale 0: every allowed key weighs the same -----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", ["none", "causal", "padding", "window"])
def test_scale_zero_is_uniform(mask, dtype, backend):
    """scale=0 makes every logit 0 (before ALiBi and float masks): each row averages the values of its
    allowed keys, forward and backward (dq = dk = 0). (cpu's bfloat16 AMX kernels were 0.8-1.6 off here:
    |scale| log2(e) = 0 kept their lazy running max at -inf; fixed in 4fc255e.)"""
    g = torch.Generator().manual_seed(len(mask))
    B, H, Lq, Lk, D = 2, 2, 5, 16, 8
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, H, Lk, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, H, Lk, D, generator=g).to(dtype).requires_grad_()
    qp, kp = default_pos(B, Lq, Lk)
    kw, allowed = {}, torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    if mask == "causal":
        kw["causal"] = True
        allowed &= rule_causal(qp, kp)
    elif mask == "padding":
        kw["mask"] = masks.padding(torch.tensor([16, 6]))
        allowed &= (torch.arange(Lk) < torch.tensor([16, 6])[:, None])[:, None, None, :]
    elif mask == "window":
        kw["window"] = 3
        allowed &= rule_window(qp, kp, 3, 0)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = oracle(qd, kd, vd, allowed=allowed, scale=0.0)[0]
    do = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref.backward(do)
    twin_q, twin_k, twin_v = (t.detach().double().requires_grad_() for t in (q, k, v))
    twin = oracle(twin_q, twin_k, twin_v, allowed=allowed, scale=0.0, dtype=dtype)[0]
    try:
        out, st = selfattn.attention(q, k, v, scale=0.0, return_stats=True, backend=backend, **kw)
    except BackendUnavailable:
        assert backend not in MUST_SERVE
        return
    close(f"{backend} out", out, ref, twin.detach(), dtype)
    out.backward(do.to(dtype))
    assert not q.grad.abs().sum() and not k.grad.abs().sum(), f"{backend}: dq/dk not 0 at scale 0"
    close(f"{backend} dv", v.grad, vd.grad, vd.grad, dtype, factor=3.0, floor_ulps=8)


# -- triton, under Triton's interpreter (tiny sizes; tests/conftest.py imports triton in interpreter mode) ------


def _triton_interpreter():
    try:
        from selfattn.backends import triton_gpu
    except ImportError:
        return False
    return triton_gpu._triton_interpreted()


needs_interpreter = pytest.mark.skipif(not _triton_interpreter(), reason="triton not installed, or imported compiled "
                                       "(tests/test_triton_interpret.py covers that case in a subprocess)")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the backend reads it at each call


@needs_interpreter
@pytest.mark.parametrize("dtype,grad,seed", [(torch.float32, False, s) for s in range(4)] + [(torch.bfloat16, False, s) for s in range(2)]
                         + [(torch.float32, True, s) for s in range(3)])
def test_triton_random(interpret, dtype, grad, seed):
    assert check_backend(Case(7000 + seed, dtype), "triton", grad=grad) == "served"


@needs_interpreter
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (1, 0)), (False, (2, 1))])
def test_triton_flash_attention_varlen(interpret, causal, window):
    """selfattn.gpu.flash_attention_varlen takes FlashAttention's packed (total, H, D) layout and returns lse as
    (H, total_q), each sequence aligned bottom-right on its own lengths."""
    from selfattn.gpu import flash_attention_varlen
    lens_q, lens_k = (2, 4, 3), (5, 4, 7)
    q, k, v, cu_q, cu_k = _packed_case(1, lens_q, lens_k)
    Hq = q.shape[1]
    kw = fa_kwargs(causal, window)
    kw.pop("causal")
    out, st = flash_attention_varlen(*(t[0].transpose(0, 1).contiguous() for t in (q, k, v)), cu_q, cu_k,
                                     causal=causal, return_stats=True, **kw)
    outs, lses = [], []
    for n, (a, b) in enumerate(zip(lens_q, lens_k)):
        q0, k0 = int(cu_q[n]), int(cu_k[n])
        r = oracle(q[:, :, q0:q0 + a], k[:, :, k0:k0 + b], v[:, :, k0:k0 + b], allowed=fa_allowed(a, b, causal, window).expand(1, Hq, a, b))
        outs.append(r[0][0].transpose(0, 1))
        lses.append(r[1][0])
    assert out.shape == (sum(lens_q), Hq, q.shape[-1]) and st.lse.shape == (Hq, sum(lens_q))
    assert float((out.double() - torch.cat(outs, 0)).abs().max()) < 1e-5
    assert float((st.lse.double() - torch.cat(lses, 1)).abs().max()) < 1e-5


# -- a mask function whose data changes between calls --------------------------------------------------------

_DOCS = torch.zeros(80, dtype=torch.long)  # a module-level tensor a mask function reads (rebound by the test)
_BOUNDARY = 40


def _global_docs(b, h, qi, ki):
    return _DOCS[qi] == _DOCS[ki]


def _helper_reads_global(b, h, qi, ki):
    return _global_docs(b, h, qi, ki)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq", [1, 3, 80])
@pytest.mark.parametrize("how", ["closure_in_place", "global_rebound", "global_in_place", "helper_global", "closure_int", "default_tensor"])
def test_function_mask_data_changes_between_calls(how, lq, backend):
    """The same masks.function object called again after what it reads changed (the usual way to write Flex's
    document mask: fn reads a document-id tensor that the next batch updates). Every backend must use the new
    data; cpu kept the first call's lowered bits (0.4-0.8 off). Covered: tensors and numbers the function
    reads directly (closure cells, defaults, the globals its code names, one level into functions it calls)."""
    global _DOCS
    g = torch.Generator().manual_seed(lq)
    Lk = 80
    q = torch.randn(1, 2, lq, 16, generator=g)
    k, v = torch.randn(1, 2, Lk, 16, generator=g), torch.randn(1, 2, Lk, 16, generator=g)
    off = Lk - lq
    docs = torch.zeros(Lk, dtype=torch.long)
    state = {"n": 0}
    if how == "closure_in_place":
        m = masks.function(lambda b, h, qi, ki: docs[qi + off] == docs[ki])
        change = lambda: docs.__setitem__(slice(_BOUNDARY, None), 1)  # noqa: E731
        new_docs = lambda: docs  # noqa: E731
    elif how in ("global_rebound", "global_in_place", "helper_global"):
        _DOCS = torch.zeros(Lk, dtype=torch.long)
        fn = _helper_reads_global if how == "helper_global" else _global_docs
        m = masks.function(lambda b, h, qi, ki: fn(b, h, qi + off, ki))
        if how == "global_in_place":
            change = lambda: _DOCS.__setitem__(slice(_BOUNDARY, None), 1)  # noqa: E731
        else:
            def change():
                global _DOCS
                _DOCS = (torch.arange(Lk) >= _BOUNDARY).long()
        new_docs = lambda: _DOCS  # noqa: E731
    elif how == "closure_int":
        cut = Lk  # everything one document until cut moves

        def fn(b, h, qi, ki):
            return (qi + off >= cut) == (ki >= cut)
        m = masks.function(fn)

        def change():
            nonlocal cut
            cut = _BOUNDARY
        new_docs = lambda: (torch.arange(Lk) >= cut).long()  # noqa: E731
    else:  # default_tensor
        def fn(b, h, qi, ki, d=docs):
            return d[qi + off] == d[ki]
        m = masks.function(fn)
        change = lambda: docs.__setitem__(slice(_BOUNDARY, None), 1)  # noqa: E731
        new_docs = lambda: docs  # noqa: E731
    del state
    try:
        selfattn.attention(q, k, v, mask=m, backend=backend)
    except BackendUnavailable:
        assert backend not in MUST_SERVE
        return
    change()
    d = new_docs().clone()
    assert d.any(), "the change did nothing"
    out = selfattn.attention(q, k, v, mask=m, backend=backend)
    allowed = (d[off:][:, None] == d[None, :]).expand(1, 2, lq, Lk)
    want = oracle(q, k, v, allowed=allowed)[0]
    err = float((out.double() - want).abs().max())
    assert err < 1e-5, f"{backend} {how} Lq={lq}: the second call used stale mask bits (max|diff| {err:.3e})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi_slopes_get_no_gradient(backend):
    """The README: ALiBi slopes get no gradient (FlashAttention's alibi_slopes neither). reference, math and sdpa
    gave them one, cpu none: one rule on every backend."""
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    k = v = torch.randn(1, 2, 6, 8)
    s = torch.tensor([0.5, 0.25], requires_grad=True)
    out = selfattn.attention(q, k, v, alibi_slopes=s, causal=True, backend=backend)
    out.sum().backward()
    assert s.grad is None, f"{backend}: slopes got a gradient {s.grad}"
    assert q.grad is not None


def test_mask_and_tensor():
    # a tensor combines with a mask as attention(mask=tensor) takes it (was: TypeError unsupported operand)
    t = torch.rand(4, 6) < 0.7
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8)
    want = selfattn.attention(q, k, k, mask=masks.dense(t) & masks.causal(), backend="math")
    assert torch.equal(selfattn.attention(q, k, k, mask=masks.causal() & t, backend="math"), want)
    assert torch.equal(selfattn.attention(q, k, k, mask=t & masks.causal(), backend="math"), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_mask_on_float32_inputs(backend):
    """A float mask enters in the accumulation dtype, as every backend computes: float64 entries beyond float32's
    range on float32 inputs round to -inf there (the pair is masked). The reference kept them in float64
    (a row of -1e300 became uniform where math, sdpa and cpu gave 0)."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (4, 5, 5))
    m = torch.zeros(1, 1, 4, 5, dtype=torch.float64)
    m[..., 0, :] = -1e300
    m[..., 2, 1:] = -1e300
    allowed = (m.float() != NEG).expand(1, 2, 4, 5)
    want = oracle(q, k, v, allowed=allowed)[0]
    try:
        out = selfattn.attention(q, k, v, mask=m, backend=backend)
    except BackendUnavailable:
        assert backend not in MUST_SERVE
        return
    err = float((out.double() - want).abs().max())
    assert err < 1e-5, f"{backend}: max|diff| {err:.3e}"


def test_window_sides_any_integer():
    # numpy and 0-dim torch integers are integers (a window computed from a config or a tensor)
    import numpy as np
    q = k = v = torch.randn(1, 1, 6, 4)
    want = selfattn.attention(q, k, v, window=(2, 1), backend="math")
    for left, right in ((np.int64(2), np.int32(1)), (torch.tensor(2), torch.tensor(1))):
        assert torch.equal(selfattn.attention(q, k, v, window=(left, right), backend="math"), want)
        assert torch.equal(selfattn.attention(q, k, v, mask=masks.window(left, right), backend="math"), want)
    for bad in (2.0, True, torch.tensor(2.0), torch.tensor(True), "2"):
        with pytest.raises(TypeError, match="window: left must be an int"):
            masks.window(bad)


def test_layout_passed_as_mask_says_how():
    q = k = v = torch.randn(2, 1, 4, 4)
    lay = masks.left_padded(torch.tensor([4, 2]), 4)
    with pytest.raises(TypeError, match=r"\*\*layout"):
        selfattn.attention(q, k, v, mask=lay)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq", [1, 5, 70])
@pytest.mark.parametrize("kind", ["dense_bool", "dense_float", "key_padding", "padding", "documents", "positions", "alibi"])
def test_mask_tensors_changed_in_place(kind, lq, backend):
    """The same mask object (or positions/slopes tensor) rewritten in place between two calls: the second call
    must see the new values on every backend (the lowered-mask caches key on identity and version)."""
    g = torch.Generator().manual_seed(lq)
    B, H, Lk, D = 2, 2, 70, 8
    q = torch.randn(B, H, lq, D, generator=g)
    k, v = torch.randn(B, H, Lk, D, generator=g), torch.randn(B, H, Lk, D, generator=g)
    qp, kp = default_pos(B, lq, Lk)
    qp, kp = qp.clone(), kp.clone()
    kw = {}
    if kind == "dense_bool":
        t = torch.ones(B, 1, lq, Lk, dtype=torch.bool)
        kw["mask"] = masks.dense(t)
        change = lambda: t[:, :, :, 30:].fill_(False)  # noqa: E731
        okw = lambda: {"allowed": t.expand(B, H, lq, Lk)}  # noqa: E731
    elif kind == "dense_float":
        t = torch.zeros(1, 1, lq, Lk)
        kw["mask"] = masks.dense(t)
        change = lambda: t[..., 10:40].fill_(-3.0)  # noqa: E731
        okw = lambda: {"bias": t.double().expand(B, H, lq, Lk)}  # noqa: E731
    elif kind == "key_padding":
        keep = torch.ones(B, Lk, dtype=torch.bool)
        kw["mask"] = masks.key_padding(keep)
        change = lambda: keep[1, :50].fill_(False)  # noqa: E731
        okw = lambda: {"allowed": keep[:, None, None, :].expand(B, H, lq, Lk)}  # noqa: E731
    elif kind == "padding":
        lens = torch.tensor([Lk, Lk])
        kw["mask"] = masks.padding(lens)
        change = lambda: lens.copy_(torch.tensor([20, 65]))  # noqa: E731
        okw = lambda: {"allowed": (torch.arange(Lk) < lens[:, None])[:, None, None, :].expand(B, H, lq, Lk)}  # noqa: E731
    elif kind == "documents":
        ids = torch.zeros(B, Lk, dtype=torch.long)
        qids = torch.zeros(B, lq, dtype=torch.long)
        kw["mask"] = masks.documents(ids, qids)
        change = lambda: ids[:, 35:].fill_(1)  # noqa: E731
        okw = lambda: {"allowed": (qids[:, None, :, None] == ids[:, None, None, :]).expand(B, H, lq, Lk)}  # noqa: E731
    elif kind == "positions":
        kw.update(causal=True, q_positions=qp, kv_positions=kp)
        change = lambda: qp.sub_(30)  # noqa: E731
        okw = lambda: {"allowed": rule_causal(qp, kp).expand(B, H, lq, Lk), "qpos": qp, "kvpos": kp}  # noqa: E731
    else:  # alibi
        sl = torch.tensor([0.1, 0.2])
        kw.update(alibi_slopes=sl)
        change = lambda: sl.mul_(5)  # noqa: E731
        okw = lambda: {"slopes": sl.double()[None].expand(B, H)}  # noqa: E731
    try:
        selfattn.attention(q, k, v, backend=backend, **kw)
    except BackendUnavailable:
        assert backend not in MUST_SERVE
        return
    change()
    out = selfattn.attention(q, k, v, backend=backend, **kw)
    want = oracle(q, k, v, **okw())[0]
    err = float((out.double() - want).abs().max())
    assert err < 1e-5, f"{backend} {kind} Lq={lq}: the second call used the old values (max|diff| {err:.3e})"


def _bad_helpers():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8)
    st = selfattn.attention(q, k, k, return_stats=True, backend="math")[1]
    return [
        ("probs heads str", lambda: selfattn.attention_probs(q, k, st, heads="0"), TypeError, ["heads", "str"]),
        ("probs heads out of range", lambda: selfattn.attention_probs(q, k, st, heads=[5]), ValueError, ["heads", "[5]"]),
        ("probs rows float", lambda: selfattn.attention_probs(q, k, st, rows=[0.5]), TypeError, ["rows", "float"]),
        ("probs stats type", lambda: selfattn.attention_probs(q, k, (1, 2)), TypeError, ["stats", "tuple"]),
        ("probs stats shape", lambda: selfattn.attention_probs(q[:, :2], k, st), ValueError, ["stats.lse", "(2, 4, 5)"]),
        ("varlen too long", lambda: masks.varlen([6, 2], [3, 4], 5, 6), ValueError, ["q_lengths", "[6, 2]"]),
        ("varlen float", lambda: masks.varlen([1.5, 2], [3, 4], 5, 6), TypeError, ["q_lengths", "float32"]),
        ("left_padded too long", lambda: masks.left_padded([7, 2], 6), ValueError, ["lengths", "[7, 2]"]),
        ("left_padded lq > lk", lambda: masks.left_padded([3, 2], 6, 7), ValueError, ["lq", "7"]),
        ("packed start", lambda: masks.packed([1, 3, 5]), ValueError, ["cu_seqlens_q", "[1, 3, 5]"]),
        ("packed lengths differ", lambda: masks.packed([0, 3, 5], [0, 2]), ValueError, ["cu_seqlens_k", "3 and 2"]),
        ("packed total at call", lambda: selfattn.attention(q[:1], k[:1], k[:1], **masks.packed([0, 2, 5])), ValueError, ["segment_ids", "(1, 5)", "6"]),
        ("left_padded Lk at call", lambda: selfattn.attention(q, k, k, **masks.left_padded([3, 2], 5, 5)), ValueError, ["keep", "(2, 5)", "(2, 6)"]),
        ("function not callable", lambda: masks.function(3), TypeError, ["fn", "int"]),
    ]


@pytest.mark.parametrize("i", range(14))
def test_bad_helper_input_names_argument(i):
    label, call, exc, words = _bad_helpers()[i]
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    missing = [w for w in words if w.lower() not in msg.lower()]
    assert not missing, f"{label}: message {msg!r} does not name {missing}"
