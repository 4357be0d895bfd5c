"""Decoding steps under a boolean mask on the `cpu` backend: cpu_short's row kernel given the mask's bits
(backends.cpu._masked_rows) -- a transformers model's step over its cache with padding, positions, windows.

Every output is held to the float64 reference (STYLE rule 6 through _oracle.compare); the route is
checked to be the one taken (a spy on the kernel), 2 threads must give the 1-thread bits, and calls the
row kernel does not serve (statistics, gradients, softcap, ALiBi, sinks, float masks, 4+ query rows)
must take the launchers.
"""

from __future__ import annotations

import numba
import pytest
import torch

import selfattn
from selfattn import masks
from selfattn.backends import cpu as cpu_backend
from selfattn.kernels import cpu_short

from _oracle import compare, reference_pair


@pytest.fixture
def row_calls(monkeypatch):
    """How many calls reached cpu_short.fwd_small_masked (each thread's share counts once)."""
    seen = []
    real = cpu_short.fwd_small_masked

    def spy(*args):
        seen.append(args[4:8])  # (B, Hq, Hkv, Lq)
        return real(*args)

    monkeypatch.setattr(cpu_short, "fwd_small_masked", spy)
    return seen


def _qkv(b, hq, hkv, lq, lk, d, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g) * 2.0  # sharper rows than unit scores
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, dv or d, generator=g)
    return q, k, v


def _left(lengths, lk, lq):
    return dict(masks.left_padded(torch.tensor(lengths), lk, lq))


def _cache(lengths, lk, lq):
    # right-padded cache of per-sequence lengths, each sequence's queries its last real positions
    return dict(masks.varlen(torch.tensor([lq] * len(lengths)), torch.tensor(lengths), lq, lk))


# (B, Hq, Hkv, Lq, Lk, D, Dv), attention() keywords
CASES = {
    "padding_causal": ((4, 4, 4, 1, 300, 32, 32), dict(mask=masks.padding([300, 250, 7, 1]), causal=True)),
    "left_padded_gqa": ((3, 6, 2, 1, 257, 48, 24), dict(causal=True, **_left([257, 100, 1], 257, 1))),
    "left_padded_3_rows": ((2, 2, 1, 3, 90, 16, 16), dict(causal=True, **_left([90, 40], 90, 3))),
    "varlen_cache": ((3, 2, 2, 2, 130, 24, 24), dict(causal=True, **_cache([130, 64, 2], 130, 2))),
    "window": ((1, 4, 4, 3, 500, 64, 64), dict(causal=True, window=37)),
    "documents": ((2, 2, 2, 1, 200, 16, 16),
                  dict(mask=masks.documents((torch.arange(200)[None] >= torch.tensor([[120], [0]])).long()))),
    "function": ((1, 3, 3, 2, 150, 32, 8), dict(mask=masks.function(lambda b, h, q, kv: (kv % 3 == 0) | (kv > 140)))),
    "dense_bool_per_head": ((2, 2, 1, 1, 80, 16, 16), dict(mask=torch.rand(2, 2, 1, 80, generator=torch.Generator().manual_seed(5)) > 0.5)),
    "no_key_at_all": ((2, 2, 2, 1, 64, 16, 16), dict(mask=masks.padding([0, 64]))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_masked_decoding_steps(case, row_calls):
    shape, kw = CASES[case]
    q, k, v = _qkv(*shape[:6], seed=len(case), dv=shape[6])
    outs = [_on(threads, lambda: selfattn.attention(q, k, v, backend="cpu", **kw)) for threads in (1, 2)]
    assert len(row_calls) >= 2 and all(c == (shape[0], shape[1], shape[2], shape[3]) for c in row_calls), row_calls
    assert not torch.isnan(outs[0]).any()
    compare(case, reference_pair(q, k, v, **kw), outs[0], dtype=torch.float32)
    assert torch.equal(outs[0], outs[1]), "1 and 2 threads"
    if case == "no_key_at_all":
        assert torch.equal(outs[0][0], torch.zeros_like(outs[0][0]))  # a row with no key: 0


def _on(threads, call):
    """call() without gradients on ``threads`` torch threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return call()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("case", ["left_padded_gqa", "one_kv_head"])
def test_masked_decoding_on_threads(case, row_calls, monkeypatch):
    # serving sizes (>= SHORT_THREADS_MIN_BYTES of keys and values) share their units: whole groups of query
    # heads (3 kv heads x 2 batches), or with one kv head its group split in a run of heads per thread
    monkeypatch.setattr(cpu_backend, "SHORT_THREADS_MIN_BYTES", 0)
    shape, kw = CASES["left_padded_gqa"] if case == "left_padded_gqa" else ((1, 6, 1, 2, 300, 32, 32), dict(causal=True, **_left([300], 300, 2)))
    q, k, v = _qkv(*shape[:6], seed=3, dv=shape[6])
    seen = []
    real = cpu_backend._row_units
    monkeypatch.setattr(cpu_backend, "_row_units", lambda *a: seen.append(real(*a)) or seen[-1])
    two = _on(2, lambda: selfattn.attention(q, k, v, backend="cpu", **kw))
    one = _on(1, lambda: selfattn.attention(q, k, v, backend="cpu", **kw))
    threads = min(2, numba.config.NUMBA_NUM_THREADS)
    assert len(row_calls) == 1 + threads  # two shares, then one call
    group = shape[1] // shape[2]
    assert seen[0] == (threads, group if case == "left_padded_gqa" or threads == 1 else group // 2)
    assert torch.equal(one, two)
    compare("threads", reference_pair(q, k, v, **kw), two, dtype=torch.float32)


def test_a_nan_key_the_mask_rules_out_does_not_reach_the_output(row_calls):
    # the reference sets ruled-out scores to -inf whatever they were: so does the row kernel
    q, k, v = _qkv(2, 2, 2, 1, 70, 16, seed=7)
    k[1, :, 60] = float("nan")  # past sequence 1's length
    kw = dict(mask=masks.padding([70, 50]), causal=True)
    with torch.no_grad():
        out = selfattn.attention(q, k, v, backend="cpu", **kw)
    assert row_calls and not torch.isnan(out).any()
    compare("nan key masked", reference_pair(q, k, v, **kw), out, dtype=torch.float32)
    k[0, 1, 3] = float("nan")  # a key sequence 0 sees: its head's row is NaN, as the reference's
    with torch.no_grad():
        out = selfattn.attention(q, k, v, backend="cpu", **kw)
    nan = torch.isnan(out)
    assert nan[0, 1].all() and int(nan.sum()) == out.shape[-1]


@pytest.mark.parametrize("extra", ["stats", "grad", "softcap", "alibi", "sinks", "float_mask", "four_rows"])
def test_what_the_row_kernel_does_not_serve_takes_the_launchers(extra, row_calls):
    q, k, v = _qkv(2, 2, 2, 4 if extra == "four_rows" else 1, 90, 16, seed=2)
    kw = dict(mask=masks.padding([90, 33]), causal=True)
    if extra == "softcap":
        kw["softcap"] = 5.0
    elif extra == "alibi":
        kw["alibi_slopes"] = torch.tensor([0.5, 0.25])
    elif extra == "sinks":
        kw["sinks"] = torch.tensor([0.3, -1.0])
    elif extra == "float_mask":
        kw = dict(mask=torch.randn(2, 1, 1, 90))
    if extra == "grad":
        q.requires_grad_()
    with torch.set_grad_enabled(extra == "grad"):
        got = selfattn.attention(q, k, v, backend="cpu", return_stats=extra == "stats", **kw)
    out = got[0] if extra == "stats" else got
    assert row_calls == []
    compare(extra, reference_pair(q.detach(), k, v, **kw), out.detach(), dtype=torch.float32)


def test_layers_sharing_a_mask_compute_its_bits_once(row_calls, monkeypatch):
    # the mask's bits are cached as lowered masks are (lowering.allowed): a model's layers share one mask per
    # forward; a key padding tensor changed in place is a new mask (its version), and gets new bits
    from selfattn import lowering

    lowering.clear_cache()
    built = []
    real = masks.Mask.allowed_in
    monkeypatch.setattr(masks.Mask, "allowed_in", lambda self, *a, **kw: built.append(1) or real(self, *a, **kw))
    q, k, v = _qkv(2, 4, 2, 1, 90, 16, seed=9)
    keep = torch.ones(2, 90, dtype=torch.bool)
    keep[1, :30] = False  # left padding
    kw = dict(mask=masks.key_padding(keep), causal=True)
    with torch.no_grad():
        first = selfattn.attention(q, k, v, backend="cpu", **kw)
        again = selfattn.attention(q * 0.5, k, v, backend="cpu", **kw)  # the next layer: other q, same mask
        assert len(built) == 1 and torch.equal(first, selfattn.attention(q, k, v, backend="cpu", **kw))
    compare("next layer", reference_pair(q * 0.5, k, v, **kw), again, dtype=torch.float32)
    built.clear()  # (the reference computes its own bits)
    keep[0, 10] = False  # in place
    with torch.no_grad():
        changed = selfattn.attention(q, k, v, backend="cpu", **kw)
    assert len(built) == 1 and len(row_calls) == 4
    compare("changed in place", reference_pair(q, k, v, **kw), changed, dtype=torch.float32)
    assert not torch.equal(first[0], changed[0]) and torch.equal(first[1], changed[1])


def _general(monkeypatch, call):
    """call() through attention()'s general path (build_request, choose, the backend): a wrapped
    backends.choose turns the short-call paths off."""
    from selfattn import backends

    with monkeypatch.context() as m:
        real = backends.choose
        m.setattr(backends, "choose", lambda *a, **kw: real(*a, **kw))
        return call()


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_planned_masked_steps_give_the_general_paths_bits(backend, row_calls, monkeypatch):
    # a decoding step under a Mask object (as transformers passes it) is planned on its first call
    # (backends.cpu.fast_masked): the next calls with that mask, the model's other layers, reuse the
    # bits; a mask tensor changed in place or replaced, and another thread count, are seen
    monkeypatch.setattr(cpu_backend, "_MASKED", {})
    q, k, v = _qkv(3, 8, 2, 1, 130, 32, seed=12)
    keep = torch.arange(130)[None] >= torch.tensor([0, 9, 60])[:, None]  # left padding
    mask = masks.key_padding(keep)
    call = lambda: _on(1, lambda: selfattn.attention(q, k, v, mask=mask, causal=True, backend=backend))  # noqa: E731
    first = call()
    assert len(cpu_backend._MASKED) == 1 and next(iter(cpu_backend._MASKED.values())).allow is not None
    for _ in range(2):
        assert torch.equal(call(), first)
    assert len(row_calls) == 3, "every call on the row kernel"
    assert torch.equal(_general(monkeypatch, call), first)
    compare("planned", reference_pair(q, k, v, mask=mask, causal=True), first, dtype=torch.float32)
    keep[2, 60:70] = False  # in place: a new version
    changed = call()
    assert torch.equal(changed, _general(monkeypatch, call)) and not torch.equal(changed[2], first[2])
    mask.keep = torch.ones(3, 130, dtype=torch.bool)  # another tensor
    replaced = call()
    assert torch.equal(replaced, _general(monkeypatch, call))
    compare("replaced", reference_pair(q, k, v, causal=True), replaced, dtype=torch.float32)
    two = _on(2, lambda: selfattn.attention(q, k, v, mask=mask, causal=True, backend=backend))
    assert torch.equal(two, replaced)


def test_planned_masked_steps_see_a_rule_changed_in_place(row_calls, monkeypatch):
    # a mask's rule changed on the same object (a window's size) makes a new plan, as lowering's
    # cache key does: the kept bits are the old rule's
    monkeypatch.setattr(cpu_backend, "_MASKED", {})
    q, k, v = _qkv(2, 4, 2, 1, 90, 16, seed=15)
    keep = torch.arange(90)[None] >= torch.tensor([0, 30])[:, None]
    window = masks.window(12)
    mask = masks.key_padding(keep) & window
    call = lambda: _on(1, lambda: selfattn.attention(q, k, v, mask=mask, causal=True, backend="cpu"))  # noqa: E731
    first = call()
    assert next(iter(cpu_backend._MASKED.values())).allow is not None and len(row_calls) == 1
    assert torch.equal(call(), first)
    window.left = 40
    wider = call()
    assert torch.equal(wider, _general(monkeypatch, call)) and not torch.equal(wider, first)
    compare("wider", reference_pair(q, k, v, mask=mask, causal=True), wider, dtype=torch.float32)


def test_planned_masked_steps_refuse_what_the_general_path_refuses(row_calls):
    # errors stay the general path's: a mask of the wrong size, a float64 call, an unknown backend
    q, k, v = _qkv(2, 2, 2, 1, 40, 16, seed=13)
    mask = masks.padding([40, 20])
    with torch.no_grad():
        selfattn.attention(q, k, v, mask=mask, causal=True, backend="cpu")
        with pytest.raises(ValueError, match="padding"):
            selfattn.attention(q[:1], k[:1], v[:1], mask=mask, causal=True, backend="cpu")
        out64 = selfattn.attention(q.double(), k.double(), v.double(), mask=mask, causal=True, backend="cpu")
        with pytest.raises(ValueError, match="unknown backend"):
            selfattn.attention(q, k, v, mask=mask, causal=True, backend="nope")
    assert len(row_calls) == 1 and out64.dtype == torch.float64


@pytest.mark.parametrize("backend", ["cpu", "auto"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 8, 16), (2, 4, 2, 1, 97, 24), (1, 4, 2, 70, 90, 32)],
                         ids=["tiny", "decode-gqa", "tiles"])
def test_planned_calls_with_gradients_give_the_general_paths_bits(shape, backend, monkeypatch):
    # a plain call that needs gradients runs the general path's autograd function on the request kept
    # from its first call (backends.cpu.fast_grad): the same output and gradients, bit for bit
    monkeypatch.setattr(cpu_backend, "_GRAD_PLANS", {})
    q, k, v = (t.requires_grad_() for t in _qkv(*shape, seed=14))
    causal = shape[3] == shape[4]
    do = torch.randn(q.shape[:3] + (v.shape[3],), generator=torch.Generator().manual_seed(1))

    def call():
        out = selfattn.attention(q, k, v, causal=causal, backend=backend)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))

    runs = [call(), call()]
    assert len(cpu_backend._GRAD_PLANS) == 1
    planned = next(iter(cpu_backend._GRAD_PLANS.values()))
    general = _general(monkeypatch, call)
    assert planned.call is not None or backend == "auto", "backend cpu: served by the plan"
    for run in runs:
        assert all(torch.equal(a, b) for a, b in zip(run, general))
    compare("grad", reference_pair(q.detach(), k.detach(), v.detach(), causal=causal), runs[1][0], dtype=torch.float32)


@pytest.mark.parametrize("at", [0, 7, 8, 12], ids=lambda j: f"key{j}")
def test_the_row_max_is_found_wherever_the_largest_score_is(at):
    # cpu_short._row_max takes eight running maxima and the keys past the last eight one at a time: a
    # row whose largest score stands 3000 above the others (2**-3000 of every other key: out = v[at]) in
    # any of those places. A max taken too small overflows exp2 (inf / inf: NaN), one too large underflows
    # every key (a zero row)
    q, k, v = _qkv(1, 2, 2, 1, 13, 16, seed=15)
    k[:, :, at] = q[:, :, 0] * (3000.0 * 4.0 / float((q[:, :, 0] * q[:, :, 0]).sum(-1).min()))  # (scale 1/4)
    with torch.no_grad():
        out = selfattn.attention(q, k, v, backend="cpu")
        masked = selfattn.attention(q, k, v, mask=masks.padding([13]), backend="cpu")
    for got in (out, masked):
        assert torch.equal(got, v[:, :, at:at + 1]), (at, got, v[:, :, at])
