"""The float32 kernels on several threads (backends.cpu._on_threads): the calling thread and pool
threads run one compiled nogil kernel each, taking work units from a shared counter.

Every result is held to the float64 reference (test_cpu_features.check), and wherever one writer
computes each output row -- every forward, the backward's whole-kv-head path -- 2 threads must give the
1-thread bits exactly. The backward's worker copies (kv heads not divisible by the threads) are summed
in a fixed order: the same bits on every run and when the pool is busy (the shares then run one after
the other in the caller).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest
import torch
from numba import njit

import selfattn
from selfattn import masks
from selfattn.backends import cpu as cpu_backend
from selfattn.kernels import cpu_amx, cpu_bwd, cpu_fwd

from test_cpu_amx import _inputs as _bf16_inputs
from test_cpu_amx import check_amx, engine  # noqa: F401 -- engine: the fixture, each product engine the CPU has
from test_cpu_bwd import _inputs
from _oracle import compare, reference_pair
from test_cpu_features import check
from test_cpu_short import _on


POOL_CALLS = [0]  # _on_threads calls since the test began


@pytest.fixture(autouse=True)
def _every_call_threaded(monkeypatch):
    # every call of these tests on torch's threads whatever its size (backends.cpu.THREADS_MIN_FLOPS), and
    # the pool's calls counted
    monkeypatch.setattr(cpu_backend, "THREADS_MIN_FLOPS", 0.0)
    real = cpu_backend._on_threads

    def counted(calls):
        POOL_CALLS[0] += len(calls) > 1
        return real(calls)

    monkeypatch.setattr(cpu_backend, "_on_threads", counted)
    POOL_CALLS[0] = 0


def _results(q, k, v, do, **kw):
    # (out, lse, max_logit, entropy, dq, dk, dv) of the cpu backend on torch's threads
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out, st = selfattn.attention(qq, kk, vv, backend="cpu", return_stats=True, **kw)
    return (out.detach(), st.lse, st.max_logit, st.entropy, *torch.autograd.grad(out, (qq, kk, vv), do))


def _grads(threads, q, k, v, do, **kw):
    """_results on ``threads`` threads, and how many forward and backward calls the float32 kernels served."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    calls, pool = (cpu_fwd.CALLS["calls"], cpu_bwd.CALLS["calls"]), POOL_CALLS[0]
    try:
        got = _results(q, k, v, do, **kw)
    finally:
        torch.set_num_threads(old)
    # forward and backward each on the pool (the backward's copies: twice, the sum too), or neither (one thread,
    # or a host whose numba sees one core: backends.cpu._threads)
    pooled = threads > 1 and numba.config.NUMBA_NUM_THREADS > 1
    assert (POOL_CALLS[0] - pool >= 2) == pooled, f"{threads} threads: {POOL_CALLS[0] - pool} calls on the pool"
    return got, (cpu_fwd.CALLS["calls"] - calls[0], cpu_bwd.CALLS["calls"] - calls[1])


FIELDS = ("out", "lse", "max_logit", "entropy", "dq", "dk", "dv")


def _same_bits(names, xs, ys, what):
    for name, a, b in zip(names, xs, ys):
        assert torch.equal(a, b), f"{what}, {name}: differ by {float((a.float() - b.float()).abs().max())}"

# (B, Hq, Hkv, Lq, Lk, D, Dv), attention() keywords: B * Hkv even (whole kv heads per thread)
CASES = {
    "dense": ((2, 4, 4, 200, 230, 32, 32), {}),
    "causal": ((1, 4, 2, 323, 323, 48, 40), {"causal": True}),
    "window": ((2, 2, 2, 197, 150, 24, 24), {"window": (20, 5)}),
    "documents": ((2, 4, 1, 130, 130, 32, 16),  # batch 0: documents of 50 and 80 tokens, batch 1: one of 130
                  {"mask": masks.documents(torch.stack([torch.arange(130) >= 50, torch.zeros(130, dtype=torch.bool)]).long())
                   & masks.causal()}),
    "gqa_odd_lengths": ((1, 6, 2, 67, 131, 59, 33), {"causal": True}),
    "softcap_padding": ((2, 2, 1, 100, 97, 16, 16), {"softcap": 20.0, "mask": masks.padding([97, 40])}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_threads_give_the_one_thread_bits(case):
    shape, kw = CASES[case]
    q, k, v, do = _inputs(*shape[:6], dv=shape[6], seed=len(case))
    check(f"{case} 2 threads", q, k, v, do, **kw)  # against the float64 reference (on the suite's threads)
    one, served1 = _grads(1, q, k, v, do, **kw)
    two, served2 = _grads(2, q, k, v, do, **kw)
    assert served1 == served2 == (1, 1), f"{case}: float32 kernels served {served1} / {served2} calls"
    _same_bits(FIELDS, one, two, f"{case}: 1 and 2 threads")


@pytest.mark.parametrize("heads", [(1, 3, 3), (3, 2, 1)], ids=["3-kv-heads", "3-batches"])
def test_worker_copies_deterministic(heads):
    # B * Hkv odd: every thread adds its snake share into its own dK/dV copy, the copies summed in
    # worker order -- the same bits on every run and with the pool busy (shares run in turn here); the
    # forward and dQ (one writer per row) are the 1-thread bits
    b, hq, hkv = heads
    q, k, v, do = _inputs(b, hq, hkv, 150, 170, 32, dv=24, seed=3)
    kw = {"causal": True}
    check("worker copies", q, k, v, do, **kw)
    one, _ = _grads(1, q, k, v, do, **kw)
    runs = [_grads(2, q, k, v, do, **kw)[0] for _ in range(2)]
    with cpu_backend._POOL:  # another call holds the pool: this one runs every share in the caller
        runs.append(_grads(2, q, k, v, do, **kw)[0])
    assert not cpu_backend._POOL.locked()
    for run in runs[1:]:
        _same_bits(FIELDS, runs[0], run, "two runs")
    _same_bits(FIELDS[:5], one, runs[0], "1 and 2 threads")


@pytest.mark.parametrize("heads", [(2, 4, 2), (1, 3, 3)], ids=["kv-heads-per-thread", "thread-copies"])
def test_amx_two_threads(heads, engine):
    # bfloat16 on AMX or vdpbf16ps: forward tasks from the shared counter, the backward's whole kv heads (one writer
    # per dK/dV row): the 1-thread bits; kv heads not divisible: per-thread copies summed in order, the
    # same bits on every run
    b, hq, hkv = heads
    q, k, v, do = _bf16_inputs(b, hq, hkv, 200, 230, 48, dv=40, seed=8)
    kw = {"causal": True}
    check_amx("2 threads", q, k, v, do, **kw)
    before = cpu_amx.AMX_CALLS[engine + "_backward"]
    one, _ = _grads(1, q, k, v, do, **kw)
    runs = [_grads(2, q, k, v, do, **kw)[0] for _ in range(2)]
    assert cpu_amx.AMX_CALLS[engine + "_backward"] == before + 3
    same = FIELDS if hkv * b % 2 == 0 else FIELDS[:5]
    _same_bits(FIELDS, runs[0], runs[1], "two runs")
    _same_bits(same, one, runs[0], "1 and 2 threads")


# decoding steps (fewer than 4 query rows): the row kernel, cpu_short.fwd_small, its units shared
@pytest.mark.parametrize("shape", [(1, 8, 8, 1, 700, 64, 64, False), (2, 6, 2, 3, 333, 40, 24, True),
                                   (1, 6, 1, 2, 300, 32, 32, True)],
                         ids=["decode", "gqa-causal-3-rows", "one-kv-head-split"])
def test_decoding_steps_on_threads(shape, monkeypatch):
    b, hq, hkv, lq, lk, d, dv, causal = shape
    monkeypatch.setattr(cpu_backend, "SHORT_THREADS_MIN_BYTES", 0)  # (every size on threads here)
    monkeypatch.setattr(cpu_backend, "_PLANS", {})
    q, k, v, _ = _inputs(b, hq, hkv, lq, lk, d, dv=dv, seed=11)
    q[-1, 1, -1, 0] = float("nan")  # a NaN row stays NaN on whichever thread computes it
    outs = []
    for threads in (1, 2):
        pool = POOL_CALLS[0]
        outs.append(_on(threads, lambda: selfattn.attention(q, k, v, causal=causal, backend="cpu")))
        assert (POOL_CALLS[0] - pool == 1) == (threads > 1 and numba.config.NUMBA_NUM_THREADS > 1), f"{threads} threads"
    plan = next(iter(cpu_backend._PLANS.values()))
    assert not plan.rows and plan.split, "the row kernel with its units shared"
    nan = torch.isnan(outs[0])
    assert nan[-1, 1, -1].all() and int(nan.sum()) == dv, "only the NaN query's row is NaN"
    assert torch.equal(nan, torch.isnan(outs[1]))
    _same_bits(["out"], [outs[0].nan_to_num(0.0)], [outs[1].nan_to_num(0.0)], "1 and 2 threads")
    keep = torch.ones(b, hq, lq, 1, dtype=torch.bool)
    keep[-1, 1, -1] = False
    q_ok = torch.where(keep, q, torch.zeros_like(q))  # the reference on the other rows
    with torch.no_grad():
        out_ok = selfattn.attention(q_ok, k, v, causal=causal, backend="cpu")
    assert torch.equal(torch.where(keep, outs[0], 0.0), torch.where(keep, out_ok, 0.0))
    compare("decoding on threads", reference_pair(q_ok, k, v, causal=causal), out_ok, dtype=torch.float32)


@njit(nogil=True)
def _fail_on_negative(x, n):
    if n < 0:
        raise ValueError("negative work unit")
    x[0] += n


def test_worker_error_reaches_the_caller():
    x = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="negative work unit"):
        cpu_backend._on_threads([(_fail_on_negative, (x, 1)), (_fail_on_negative, (x, -1))])  # the pool thread's
    assert x[0] == 1  # the caller's share ran
    with pytest.raises(ZeroDivisionError):
        cpu_backend._on_threads([(_fail_on_negative, (x, 2)), (lambda: 1 // 0, ())])
    with pytest.raises(ValueError, match="negative work unit"):
        cpu_backend._on_threads([(_fail_on_negative, (x, -1)), (_fail_on_negative, (x, 3))])  # the caller's
    assert x[0] == 6  # the worker still finished its share
    cpu_backend._on_threads([(_fail_on_negative, (x, 4)), (_fail_on_negative, (x, 5))])  # the pool still serves
    assert x[0] == 15 and not cpu_backend._POOL.locked()


def test_calls_from_several_threads_at_once():
    # user threads calling at once: one holds the pool, the others run their calls alone; every result
    # is the 1-thread one
    q, k, v, do = _inputs(2, 2, 2, 130, 130, 32, seed=9)
    want, _ = _grads(1, q, k, v, do, causal=True)
    got, errors = [], []

    def call():
        try:
            for _ in range(3):
                got.append(_results(q, k, v, do, causal=True))
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        users = [threading.Thread(target=call) for _ in range(3)]
        for t in users:
            t.start()
        for t in users:
            t.join()
    finally:
        torch.set_num_threads(old)
    assert not errors and len(got) == 9, errors
    # (calls that found the pool busy ran their shares in turn: counted as well)
    assert POOL_CALLS[0] >= 2 or numba.config.NUMBA_NUM_THREADS < 2
    for run in got:
        for name, a, b in zip(FIELDS, want, run):
            assert torch.equal(a, b), f"{name} differs by {float((a - b).abs().max())}"
