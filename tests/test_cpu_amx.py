"""The ``cpu`` backend's bfloat16 kernels (selfattn.kernels.cpu_amx, issue 14), on each product engine
the CPU has: AMX's tile unit and AVX512-BF16's vdpbf16ps (``SELFATTN_CPU_BF16_ENGINE``).

bfloat16 inputs, every mask kind, GQA, head dims 8-256 (odd ones too), lengths up to ~700, the
statistics, against the float64 reference on the same bfloat16 inputs with STYLE.md rule 6's
bfloat16 yardstick (tests/_oracle.py: the reference computed in bfloat16 itself, factor 2; 3 for
the gradients, whose backward runs on AMX too from the forward's lse).
The statistics are also held to the float32 reference's error on the same values (they come from
float32 scores of exact bfloat16 products): the bfloat16 yardstick alone let an lse 1e-3 off pass.
Each test checks that the engine it asked for really served the call (``cpu_amx.AMX_CALLS``). An
engine's cases are skipped where the CPU lacks its instructions (``has_amx_bf16()``, ``has_bf16_dot()``);
the engine choice and the fallback tests (in a subprocess where detection happens at import) run
everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import selfattn
from selfattn import masks
from selfattn.kernels import cpu_amx, cpu_bf16

from _oracle import compare, reference_pair
from conftest import exact_fully_masked

ENGINES = [
    pytest.param("amx", marks=pytest.mark.skipif(
        not cpu_bf16.has_amx_bf16(), reason="no AMX-BF16 on this CPU (or the OS refused the tile state, or SELFATTN_CPU_AMX=0)")),
    pytest.param("dot", marks=pytest.mark.skipif(
        not cpu_bf16.has_bf16_dot(), reason="no AVX512-BF16 on this CPU (or SELFATTN_CPU_BF16=0)")),
]


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    """Each test below once per product engine this CPU has (SELFATTN_CPU_BF16_ENGINE)."""
    monkeypatch.setenv(cpu_amx.ENGINE_ENV, request.param)
    return request.param


def _inputs(b, hq, hkv, lq, lk, d, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64)  # (B, Hq, Lq, D)
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)  # (B, Hkv, Lk, D)
    v = torch.randn(b, hkv, lk, dv, generator=g, dtype=torch.float64)  # (B, Hkv, Lk, Dv)
    do = torch.randn(b, hq, lq, dv, generator=g, dtype=torch.float64)  # (B, Hq, Lq, Dv)
    return [t.to(torch.bfloat16) for t in (q, k, v, do)]


def _doc_causal(b, h, q_idx, kv_idx):
    # three documents of 100 positions, causal inside each
    return (q_idx // 100 == kv_idx // 100) & (kv_idx <= q_idx)


def _mask(kind, b, hq, lq, lk):
    g = torch.Generator().manual_seed(7)
    if kind == "none":
        return {}
    if kind == "causal":
        return {"causal": True}
    if kind == "window":
        return {"window": (37, 5)}
    if kind == "documents":
        ids = torch.sort(torch.randint(0, 4, (b, lk), generator=g), dim=1).values  # (B, Lk)
        return {"mask": masks.documents(ids)}
    if kind == "padding":
        return {"mask": masks.padding([lk, max(1, lk - 70)][:b], [lq, max(1, lq - 50)][:b])}
    if kind == "key_padding":
        keep = torch.rand(b, lk, generator=g) < 0.7  # (B, Lk)
        keep[0, 64:128] = False  # a whole key block of holes: an EMPTY tile for every query block
        if b > 1:
            keep[1] = False  # a batch element with no key at all: fully-masked rows
        return {"mask": masks.key_padding(keep), "causal": True}
    if kind == "dense_bool":
        allow = torch.rand(b, 1, lq, lk, generator=g) < 0.5  # (B, 1, Lq, Lk)
        allow[:, :, 3] = False  # a fully-masked row
        return {"mask": masks.dense(allow)}
    if kind == "dense_float":
        bias = torch.randn(1, hq, lq, lk, generator=g, dtype=torch.float32)  # (1, Hq, Lq, Lk)
        return {"mask": masks.dense(bias)}
    if kind == "function":
        return {"mask": masks.function(_doc_causal)}
    raise KeyError(kind)


def check_amx(name, q, k, v, do=None, **kw):
    """AMX forward (with stats) and, given the output's gradient ``do``, backward, against the float64
    reference pair; fully-masked rows exact."""
    eng = os.environ[cpu_amx.ENGINE_ENV]
    calls, backs = cpu_amx.AMX_CALLS[eng], cpu_amx.AMX_CALLS[eng + "_backward"]
    leafs = [t.detach().clone().requires_grad_(do is not None) for t in (q, k, v)]
    out, stats = selfattn.attention(*leafs, backend="cpu", return_stats=True, **kw)
    assert cpu_amx.AMX_CALLS[eng] == calls + 1, f"{name}: the {eng} forward did not serve the call"
    grads = None
    if do is not None:
        grads = torch.autograd.grad(out, leafs, do)
        assert cpu_amx.AMX_CALLS[eng + "_backward"] == backs + 1, f"{name}: the {eng} backward did not serve the call"
        out = out.detach()
    pair = reference_pair(q, k, v, do=do, **kw)
    compare(name, pair, out, stats=stats, grads=grads, dtype=torch.bfloat16)
    exact_fully_masked(name, out, stats, pair[0].stats)
    # the statistics come from float32 scores of bfloat16 inputs (exact products, float32 sums): hold
    # them also to the float32 reference's error on the same values, ~1e5 times tighter than bfloat16's
    compare(f"{name} [float32 yardstick]", reference_pair(*(t.float() for t in (q, k, v)), **kw), stats=stats)
    return out, stats


MASK_KINDS = ["none", "causal", "window", "documents", "padding", "key_padding", "dense_bool", "dense_float", "function"]


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_mask_kinds(kind, engine):
    b, hq, hkv, lq, lk, d = 2, 4, 2, 300, 300, 40
    q, k, v, do = _inputs(b, hq, hkv, lq, lk, d, seed=1)
    check_amx(kind, q, k, v, do, **_mask(kind, b, hq, lq, lk))


# head dims from 8 to 256, odd ones too; Lq != Lk and rows that are not whole tiles
@pytest.mark.parametrize("d, lq, lk, kind", [
    (8, 97, 130, "causal"), (40, 257, 190, "none"), (59, 129, 700, "window"), (64, 700, 700, "causal"),
    (100, 65, 333, "key_padding"), (111, 200, 64, "none"), (128, 333, 450, "dense_bool"), (256, 150, 260, "causal"),
])
def test_head_dims(d, lq, lk, kind, engine):
    q, k, v, do = _inputs(2, 2, 1, lq, lk, d, seed=d)
    check_amx(f"d{d}", q, k, v, do, **_mask(kind, 2, 2, lq, lk))


@pytest.mark.parametrize("lq", [1, 3, 17])
def test_decoding_rows_gqa(lq, engine):
    # a few query rows (the float32 kernel takes dot products there; AMX pads to a 16-row tile), GQA 6:2
    q, k, v, do = _inputs(1, 6, 2, lq, 200, 64, dv=48, seed=lq)
    check_amx(f"lq{lq}", q, k, v, do, causal=True)


def test_arguments(engine):
    # softcap, ALiBi with positions, sinks, a non-default scale: the score terms after the product
    b, hq, hkv, lq, lk, d = 1, 4, 2, 190, 250, 72
    q, k, v, do = _inputs(b, hq, hkv, lq, lk, d, seed=3)
    g = torch.Generator().manual_seed(3)
    check_amx("softcap", q, k, v, do, softcap=8.0, scale=0.3, causal=True)
    check_amx("alibi", q, k, v, do, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]),
              q_positions=torch.arange(lq) + 100, kv_positions=torch.arange(lk) + 40, causal=True)
    check_amx("sinks", q, k, v, do, sinks=torch.randn(hq, generator=g), window=(50, 0))


@pytest.mark.parametrize("scale", [None, -0.2])
def test_negative_scale_and_moving_max(scale, engine):
    # the forward takes the column max of raw q.k with a negative scale's sign flipped into Q^T, and
    # moves its reference max only when the true one is cpu_amx.LAZY above it: keys whose logits grow
    # along the sequence (and 4x the usual magnitude) move the max in many tiles, in both directions
    # of the scale
    q, k, v, do = _inputs(1, 2, 2, 200, 700, 64, seed=11)
    grow = torch.linspace(0.2, 4.0, 700)[None, None, :, None]  # (1, 1, Lk, 1)
    k = (k.float() * grow).to(torch.bfloat16)
    q = (q.float() * 2.0).to(torch.bfloat16)
    check_amx(f"scale {scale}", q, k, v, do, scale=scale)
    check_amx(f"scale {scale} causal", q, k, v, do, scale=scale, causal=True)


def test_shard_backward_keeps_float32(engine):
    # shard_backward (ring attention) brings its own global delta: the float32 kernels serve it
    from selfattn.backends.cpu import shard_backward

    q, k, v, do = _inputs(1, 2, 2, 100, 100, 32, seed=4)
    out, stats = selfattn.attention(q, k, v, backend="cpu", return_stats=True)
    backs = cpu_amx.AMX_CALLS["backward"]
    assert cpu_amx.AMX_CALLS[engine] > 0  # the forward above ran on the engine
    delta = (do.double() * out.double()).sum(-1)  # (B, Hq, Lq)
    grads = shard_backward(q, k, v, do, stats.lse, delta)
    assert cpu_amx.AMX_CALLS["backward"] == backs
    compare("shard", reference_pair(q, k, v, do=do), grads=grads, dtype=torch.bfloat16)


def test_float16_keeps_the_float32_kernels(engine):
    # float16 has more mantissa than bfloat16: it is not rounded to bfloat16 for the bfloat16 products
    q, k, v, _ = (t.to(torch.float16) for t in _inputs(1, 2, 2, 100, 100, 32, seed=5))
    calls = cpu_amx.AMX_CALLS["calls"]
    out, stats = selfattn.attention(q, k, v, backend="cpu", return_stats=True, causal=True)
    assert cpu_amx.AMX_CALLS["calls"] == calls
    compare("fp16", reference_pair(q, k, v, causal=True), out, stats=stats, dtype=torch.float16)


def test_spare_buffers_between_calls(engine, monkeypatch):
    # the forward's V^T comes from a kept buffer (cpu_amx._take_spare): calls of other shapes (a larger one
    # first, then smaller ones with padding in their last key block and head dim, then a larger one again)
    # must give what a fresh buffer gives, bit for bit, and the buffer must actually be reused
    shapes = [(1, 4, 2, 200, 300, 64, 64), (2, 2, 1, 70, 90, 40, 24), (1, 3, 3, 64, 64, 72, 48), (1, 4, 2, 200, 330, 64, 64)]
    runs = [_inputs(b, hq, hkv, lq, lk, d, dv=dv, seed=i) for i, (b, hq, hkv, lq, lk, d, dv) in enumerate(shapes)]

    def outputs():
        res = []
        for q, k, v, _ in runs:
            out, stats = selfattn.attention(q, k, v, backend="cpu", return_stats=True, causal=True)
            res.append((out, stats.lse))
        return res

    monkeypatch.setattr(cpu_amx, "_SPARE_MAX", -1)  # nothing kept: a fresh buffer every call
    cpu_amx._SPARE.clear()
    fresh = outputs()
    monkeypatch.setattr(cpu_amx, "_SPARE_MAX", 64 << 20)
    taken = []
    take = cpu_amx._take_spare
    monkeypatch.setattr(cpu_amx, "_take_spare", lambda n: taken.append(take(n)) or taken[-1])
    reused = outputs()
    assert any(a is b for i, a in enumerate(taken) for b in taken[:i]), "no V^T buffer was reused"
    for (o1, l1), (o2, l2) in zip(fresh, reused):
        assert torch.equal(o1, o2) and torch.equal(l1, l2)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("heads", [(4, 2), (3, 1)], ids=["kv-heads-per-worker", "worker-copies"])
def test_backward_threads_deterministic(threads, heads, engine):
    # on 2 threads the backward deals whole kv heads to the workers when they divide evenly (2 x 2 kv
    # heads), else every worker sums into its own dK^T/dV^T copy (1 x 1), added in worker order: the
    # same bits run to run either way, and the reference's gradients
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        b = 2 if heads[1] == 2 else 1
        q, k, v, do = _inputs(b, *heads, 200, 230, 48, dv=40, seed=8)
        m = masks.causal() & masks.padding([230, 150][:b])
        runs = []
        for _ in range(2):
            leafs = [t.clone().requires_grad_() for t in (q, k, v)]
            out = selfattn.attention(*leafs, mask=m, softcap=20.0, backend="cpu")
            runs.append(torch.autograd.grad(out, leafs, do))
        for a, bb in zip(*runs):
            assert torch.equal(a, bb), "two runs differ"
        check_amx(f"{threads} threads {heads}", q, k, v, do, mask=m, softcap=20.0)
    finally:
        torch.set_num_threads(old)


_FRESH = textwrap.dedent("""
    import torch
    torch.set_num_threads(2)
    import test_cpu_amx as t
    # the first 2-thread backward of a process on the engine: every buffer is new (a raw address into an array
    # numba had freed would show here, in the second worker)
    t.check_amx("fresh", *t._inputs(1, 2, 2, 130, 130, 51, seed=9), causal=True, window=(20, 0))  # on the engine of the env
    print("FRESH OK")
""")


def test_first_two_thread_backward_of_a_process(engine):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", _FRESH], env=env, capture_output=True, text=True, timeout=900, cwd=here)
    assert res.returncode == 0 and "FRESH OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]


_FALLBACK = textwrap.dedent("""
    import os, torch, selfattn
    from selfattn.kernels import cpu_amx, cpu_bf16
    from selfattn.backends import get
    from _oracle import compare, reference_pair
    assert not cpu_bf16.has_amx_bf16()
    # with AMX off, vdpbf16ps serves bfloat16 where it pays (as on AMD Zen 4/5); else the float32 kernels
    dot = os.environ.get("SELFATTN_CPU_AMX") == "0" and cpu_bf16.bf16_dot_pays()
    line = get("cpu").features["bfloat16"]
    assert ("vdpbf16ps" in line) if dot else ("float32 fallback" in line), line
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 150, 40, generator=g).to(torch.bfloat16) for _ in range(3))
    out, stats = selfattn.attention(q, k, v, backend="cpu", return_stats=True, causal=True)
    assert cpu_amx.AMX_CALLS["calls"] == int(dot) and cpu_amx.AMX_CALLS["dot"] == int(dot), cpu_amx.AMX_CALLS
    compare("fallback", reference_pair(q, k, v, causal=True), out, stats=stats, dtype=torch.bfloat16)
    print("FALLBACK OK")
""")


@pytest.mark.parametrize("flag", ["SELFATTN_CPU_AMX", "SELFATTN_CPU_BF16"])
def test_fallback_forced(flag):
    env = dict(os.environ, **{flag: "0"})
    env.pop(cpu_amx.ENGINE_ENV, None)
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, capture_output=True, text=True, timeout=600, cwd=here)
    assert res.returncode == 0 and "FALLBACK OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]


def test_features_line(engine):
    from selfattn.backends import get

    want = {"amx": "products: AMX", "dot": "products: AVX512-BF16 vdpbf16ps"}[engine]
    assert get("cpu").features["bfloat16"].startswith(want)


@pytest.mark.parametrize("amx, dot, pays, env, expect", [
    (True, True, False, "", "amx"), (True, True, True, "", "amx"), (False, True, True, "", "dot"),
    (False, True, False, "", None), (False, False, False, "", None), (True, True, False, "dot", "dot"),
    (False, True, True, "amx", None), (True, True, True, "AMX", "amx"), (False, False, True, "dot", None),
])
def test_engine_choice(monkeypatch, amx, dot, pays, env, expect):
    # auto: AMX where granted, else vdpbf16ps only where it beats float32 (not on CPUs that issue it at
    # half the FMA rate); the environment asks for one engine, and gets none where the CPU lacks it
    monkeypatch.setattr(cpu_bf16, "has_amx_bf16", lambda: amx)
    monkeypatch.setattr(cpu_bf16, "has_bf16_dot", lambda: dot)
    monkeypatch.setattr(cpu_bf16, "bf16_dot_pays", lambda: pays)
    monkeypatch.setattr(cpu_bf16, "bf16_dot_speedup", lambda: 2.0 if pays else 1.0)
    monkeypatch.setenv(cpu_amx.ENGINE_ENV, env)
    got = cpu_amx.engine()
    assert (None if got is None else cpu_amx._engine_name(got)) == expect
    line = cpu_amx.describe()
    assert line.startswith({"amx": "products: AMX", "dot": "products: AVX512-BF16", None: "products: float32 fallback"}[expect])


def test_engine_env_refuses_unknown(monkeypatch):
    monkeypatch.setenv(cpu_amx.ENGINE_ENV, "tpu")
    with pytest.raises(ValueError, match="SELFATTN_CPU_BF16_ENGINE must be 'amx', 'dot' or 'auto'.*'tpu'"):
        cpu_amx.engine()
    # the backends listing says so rather than raising
    assert "SELFATTN_CPU_BF16_ENGINE must be" in cpu_amx.describe()
