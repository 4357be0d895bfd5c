"""The `cpu` backend's float32 backward in the transposed layout (kernels/cpu_bwd.py, issue 14):
dQ, dK and dV against float64 autograd of the reference (STYLE.md rule 6, factor 3 for
gradients) over every mask kind, head dims 8-256 (odd ones too), lengths 1-1025 (4096 marked
slow), GQA, ALiBi, softcap, sinks, positions and fully-masked rows; shard_backward (delta given);
float64 left on cpu_flash's kernels; bit-identical reruns and thread counts (the AVX2 layout:
tests/test_avx2_layout.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import selfattn
from selfattn import masks
from selfattn.backends import cpu as cpu_backend
from selfattn.kernels import cpu_bwd

from _oracle import reference_pair
from test_cpu_features import MASK_CASES, _mask_case, _positions, _slopes, check
from test_cpu_kernel import MASKS, mask_kwargs
from tolerance import assert_close


def _inputs(b, hq, hkv, lq, lk, d, dv=None, dtype=torch.float32, magnitude=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64) * magnitude  # (B, Hq, Lq, D)
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64) * magnitude  # (B, Hkv, Lk, D)
    v = torch.randn(b, hkv, lk, dv or d, generator=g, dtype=torch.float64)  # (B, Hkv, Lk, Dv)
    do = torch.randn(b, hq, lq, dv or d, generator=g, dtype=torch.float64)  # upstream gradient
    return [t.to(dtype) for t in (q, k, v, do)]


def check_backward(name, q, k, v, do, *, expect_new=True, **kw):
    """cpu forward + backward against the reference pair (test_cpu_features.check: out, stats,
    gradients, exact zeros for fully-masked rows); asserts whether this kernel ran."""
    before = cpu_bwd.CALLS["calls"]
    out, stats, grads = check(name, q, k, v, do, **kw)
    took = cpu_bwd.CALLS["calls"] - before
    assert took == (1 if expect_new else 0), f"{name}: transposed backward calls {took}, expected {int(expect_new)}"
    return out, stats, grads


@pytest.mark.parametrize("mask", MASKS)
def test_mask_kinds(mask):
    # GQA, more queries than keys (a 2-row last query block: dot-product scores), odd head dim
    b, hq, hkv, lq, lk, d = 2, 4, 2, 130, 97, 59
    check_backward(mask, *_inputs(b, hq, hkv, lq, lk, d), **mask_kwargs(mask, b, hq, lq, lk))


@pytest.mark.parametrize("case", MASK_CASES)
def test_mask_functions_and_key_padding(case):
    b, hq, hkv, lq, lk, d = 2, 4, 2, 150, 150, 16
    check_backward(case, *_inputs(b, hq, hkv, lq, lk, d, seed=2), **_mask_case(case, b, lq, lk))


@pytest.mark.parametrize("mask", ["none", "causal"])
@pytest.mark.parametrize("d", [8, 59, 64, 111, 128, 256])
def test_head_dims(d, mask):
    check_backward(f"D{d} {mask}", *_inputs(1, 2, 1, 97, 97, d, seed=d), **mask_kwargs(mask, 1, 2, 97, 97))


@pytest.mark.parametrize("length", [1, 2, 5, 97, 1025])
def test_lengths(length):
    # 1 and 2 rows: dot-product scores throughout; 1025: 17 key blocks, the last of one key
    check_backward(f"L{length}", *_inputs(1, 2, 2, length, length, 32, seed=length), causal=True)
    if length > 1:
        check_backward(f"L{length} dense", *_inputs(1, 1, 1, length, length, 64, seed=length))


def test_lq_differs_from_lk():
    check_backward("Lq<Lk", *_inputs(2, 2, 1, 70, 300, 48, dv=24), causal=True)  # bottom-right causal
    check_backward("Lq>Lk", *_inputs(1, 2, 2, 300, 70, 48), window=(10, 10))


@pytest.mark.parametrize("opt", ["softcap", "alibi", "alibi_batch", "sinks", "positions", "large", "scale"])
def test_options(opt):
    b, hq, hkv, lq, lk, d = 2, 4, 2, 130, 150, 32
    q, k, v, do = _inputs(b, hq, hkv, lq, lk, d, magnitude=(1e4 / 32) ** 0.5 if opt == "large" else 1.0)
    qp, kp = _positions(b, lq, lk, seed=3)
    kw = {
        "softcap": {"softcap": 5.0, "causal": True},
        "alibi": {"alibi_slopes": _slopes(hq), "causal": True},
        "alibi_batch": {"alibi_slopes": _slopes(hq, b), "window": (40, 8)},
        "sinks": {"sinks": torch.linspace(-1.0, 2.0, hq), "causal": True},
        "positions": {"q_positions": qp, "kv_positions": kp, "causal": True},
        "large": {"causal": True},  # raw scores around 1e4: P is one-hot, dS cancels
        "scale": {"scale": 1.7, "mask": masks.causal() & masks.padding([150, 90])},
    }[opt]
    check_backward(opt, q, k, v, do, **kw)


def test_fully_masked_rows_have_zero_gradients():
    # a batch element without keys, one without real queries, a bool mask that empties rows
    b, hq, lq, lk = 3, 2, 70, 90
    q, k, v, do = _inputs(b, hq, hq, lq, lk, 16)
    allow = torch.rand(b, 1, lq, lk, generator=torch.Generator().manual_seed(1)) < 0.5  # (B, 1, Lq, Lk)
    allow[:, :, 5] = False
    m = masks.padding([0, 90, 40], [70, 0, 70]) & masks.causal() & masks.dense(allow)
    _, _, (dq, dk, dv) = check_backward("fully masked", q, k, v, do, mask=m)
    assert torch.equal(dq[0], torch.zeros_like(dq[0])) and torch.equal(dq[:, :, 5], torch.zeros_like(dq[:, :, 5]))
    assert torch.equal(dk[0], torch.zeros_like(dk[0])) and torch.equal(dv[1], torch.zeros_like(dv[1]))


def test_shard_backward_uses_the_given_delta():
    # two key shards with the global lse and delta: their dQ sum and their dK/dV are the gradients
    # of the whole attention; a delta 1e-3 off moves dQ (the kernel reads it rather than its own)
    b, hq, hkv, lq, lk, d = 1, 4, 2, 130, 200, 32
    q, k, v, do = _inputs(b, hq, hkv, lq, lk, d)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out, stats = selfattn.attention(qq, kk, vv, causal=True, backend="cpu", return_stats=True)
    delta = (do.double() * out.detach().double()).sum(-1)  # (B, Hq, Lq)
    qp, kp = torch.arange(lq) + (lk - lq), torch.arange(lk)
    parts = []
    for lo, hi in ((0, 96), (96, lk)):
        before = cpu_bwd.CALLS["calls"]
        parts.append(cpu_backend.shard_backward(q, k[:, :, lo:hi], v[:, :, lo:hi], do, stats.lse, delta, causal=True,
                                                q_positions=qp, kv_positions=kp[lo:hi]))
        assert cpu_bwd.CALLS["calls"] == before + 1
    dq = parts[0][0] + parts[1][0]
    dk, dv = torch.cat([parts[0][1], parts[1][1]], 2), torch.cat([parts[0][2], parts[1][2]], 2)
    ref64, low = reference_pair(q, k, v, do=do, causal=True)
    for name, got, r, lo_ in zip(("dq", "dk", "dv"), (dq, dk, dv), ref64.grads, low.grads):
        assert_close(f"shards {name}", got, r, lo_, factor=3.0)
    off = cpu_backend.shard_backward(q, k, v, do, stats.lse, delta * 1.001, causal=True)
    assert float((off[0] - dq).abs().max()) > 1e-4


def test_float64_stays_on_the_old_kernels():
    q, k, v, do = _inputs(1, 2, 1, 97, 130, 24, dtype=torch.float64)
    check_backward("fp64", q, k, v, do, expect_new=False, causal=True)


def test_bfloat16_without_amx_runs_here(monkeypatch):
    if cpu_backend._amx is not None:
        monkeypatch.setattr(cpu_backend._amx, "engine", lambda: None)  # (what backends.cpu._bf16_engine reads)
    q, k, v, do = _inputs(1, 2, 2, 97, 97, 32, dtype=torch.bfloat16)
    check_backward("bf16", q, k, v, do, causal=True)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("heads", [(4, 2), (2, 1)], ids=["kv-heads-per-worker", "worker-copies"])
def test_deterministic(threads, heads):
    # two threads deal whole kv heads to the workers when they divide evenly (2 x 2 kv heads), else
    # every worker adds into its own dK/dV copy (1 x 1), summed in worker order: the same bits on
    # every run either way, and the gradients of the reference
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        b = 2 if heads[1] == 2 else 1
        q, k, v, do = _inputs(b, *heads, 200, 230, 32, dv=24)
        m = masks.causal() & masks.padding([230, 150][:b])
        runs = []
        for _ in range(2):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            out = selfattn.attention(qq, kk, vv, mask=m, softcap=20.0, backend="cpu")
            runs.append(torch.autograd.grad(out, (qq, kk, vv), do))
        for a, bb in zip(*runs):
            assert torch.equal(a, bb), "two runs differ"
        check_backward(f"{threads} threads {heads}", q, k, v, do, mask=m, softcap=20.0)
    finally:
        torch.set_num_threads(old)


def test_one_and_two_threads_give_the_same_bits():
    # whole kv heads per worker (2 x 2 kv heads on 2 threads): every task computes as on one thread and
    # dK is scaled per head by its one writer, so the gradients are bit for bit the 1-thread ones
    old = torch.get_num_threads()
    q, k, v, do = _inputs(2, 4, 2, 200, 230, 32, dv=24, seed=5)
    grads = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            out = selfattn.attention(qq, kk, vv, causal=True, backend="cpu")
            grads.append(torch.autograd.grad(out, (qq, kk, vv), do))
    finally:
        torch.set_num_threads(old)
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        assert torch.equal(a, b), f"{name}: 1 and 2 threads differ by {float((a - b).abs().max())}"


_FRESH_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(2)
from selfattn.backends import cpu
cpu.THREADS_MIN_FLOPS = 0  # this small call on both threads too
import test_cpu_bwd as t
# the first 2-thread call of a process: every allocation is new (a raw address into an array numba
# had already freed gave garbage here, in the second worker only)
t.check_backward("fresh", *t._inputs(1, 2, 2, 66, 66, 51, magnitude=1.3), causal=True, window=1)
print("ok")
"""


def test_first_two_thread_call_of_a_process():
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-c", _FRESH_SCRIPT, here], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-4000:]


def test_delta_normalised_with_and_without_sinks():
    # launch_backward(sinks=None | the sink logits): delta = rowsum(P dP) / (rowsum(P) + p_sink); rows of
    # one or two keys (window 1) are where the division matters
    from selfattn import lowering
    from selfattn.request import build_request
    from selfattn.kernels import cpu_flash

    b, hq, lq, d = 1, 4, 97, 40
    q, k, v, do = _inputs(b, hq, hq, lq, lq, d, magnitude=1.5, seed=4)
    for sinks in (None, torch.linspace(-1.0, 2.0, hq)):
        kw = {"causal": True, "window": 1} | ({} if sinks is None else {"sinks": sinks})
        req = build_request(q, k, v, requires_grad=False, **kw)
        call = cpu_backend._Call(lowering.lower(req, cpu_flash.BLOCK_M, cpu_flash.BLOCK_N), req.scale, 0.0, False)
        out, row_max, row_log, _, _ = cpu_backend._launch_forward(q, k, v, sinks, call)
        grads = cpu_bwd.launch_backward(do, q, k, v, out, row_max, row_log, call, sinks=sinks)
        ref64, low = reference_pair(q, k, v, do=do, **kw)
        for name, got, r, lo_ in zip(("dq", "dk", "dv"), grads, ref64.grads, low.grads):
            assert_close(f"sinks={sinks is not None} {name}", got, r, lo_, factor=3.0)


def test_denormals_flushed_only_inside_the_kernel():
    # the kernel runs with flush-to-zero/denormals-are-zero (denormal dS cost ALiBi +18 %) and puts the
    # thread's MXCSR back: denormal arithmetic after the call is as before
    import numpy as np

    tiny = np.array([1e-39], np.float32)  # a float32 denormal
    assert float((tiny * np.float32(1.0))[0]) != 0.0
    check_backward("alibi", *_inputs(1, 2, 2, 130, 130, 32), causal=True, alibi_slopes=_slopes(2))
    assert float((tiny * np.float32(1.0))[0]) != 0.0, "MXCSR left with FTZ/DAZ set"


@pytest.mark.slow
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mask", ["none", "causal"])
def test_long(mask, d):
    # 4096: delta sums 4096 keys, dK/dV 64 query blocks
    check_backward(f"L4096 D{d} {mask}", *_inputs(1, 1, 1, 4096, 4096, d, seed=d), **mask_kwargs(mask, 1, 1, 4096, 4096))
