"""Ring attention (selfattn.distributed) against the single-process call, on 2 and 4 gloo processes.

Every rank builds the same whole-sequence inputs, runs the unsharded reference itself, and
compares its own rows: output, lse, max_logit, entropy, dQ, dK, dV. float64 must agree within
1e-10 relative; float32 and bfloat16 within STYLE rule 6 (2x / 3x the reference's own error in
that dtype).
Each test spawns its processes once and runs all its cases in them (a spawn costs seconds).
"""

from __future__ import annotations

import datetime
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import selfattn
from selfattn import masks
from selfattn import reference as _reference
from selfattn.distributed import ring_attention, shard, unshard

L = 40  # divisible by 2 x 4: balanced chunks of 5 rows on 4 ranks, of 10 on 2
SEGMENTS = [7, 13, 1, 19]  # packed documents crossing chunk boundaries


def _case(name):
    """(shapes (B, Hq, Hkv, D, Dv), attention kwargs) of one named case."""
    shapes = (2, 2, 2, 11, 7)
    if name == "causal":
        return shapes, dict(causal=True)
    if name == "full":
        return shapes, dict(scale=0.3)
    if name == "window":  # a causal sliding window that crosses shard boundaries (pieces need positions)
        return shapes, dict(window=6)
    if name == "window2":  # two-sided
        return shapes, dict(window=(4, 3))
    if name == "documents":
        ids = torch.repeat_interleave(torch.arange(len(SEGMENTS)), torch.tensor(SEGMENTS))
        return shapes, dict(causal=True, mask=masks.documents(ids))
    if name == "gqa":
        return (1, 6, 2, 11, 7), dict(causal=True, softcap=2.0)
    if name == "padding":  # fully-masked query rows in batch 1
        return shapes, dict(mask=masks.padding(torch.tensor([33, 40]), torch.tensor([37, 20])))
    if name == "long_causal":  # shards of several 64-key tiles (the fused backward's two-pass kernels), cut in pieces
        return (1, 4, 2, 11, 7), dict(causal=True)
    if name == "long_window":  # a window across tiles and shards, pieces off the diagonal with positions
        return (1, 2, 2, 11, 7), dict(window=150, softcap=3.0)
    if name == "key_padding":
        keep = torch.ones(2, L, dtype=torch.bool)
        keep[0, 3:9] = False
        keep[1, 25:] = False
        return shapes, dict(causal=True, mask=masks.key_padding(keep))
    raise KeyError(name)


CASES = ["causal", "full", "window", "window2", "documents", "gqa", "padding", "key_padding", "long_causal", "long_window"]
# 576 = 8 x 72: balanced chunks of 72 on 4 ranks, 144 on 2 (several key tiles); 1152: chunks of 288 on 2 ranks and
# shards of 576, which the backward cuts into smaller pieces (distributed._SPLIT)
LENGTHS = {"long_causal": 1152, "long_window": 576}


def _inputs(shapes, dtype, seed=0, L=L):
    B, Hq, Hkv, D, Dv = shapes
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, Dv, generator=g, dtype=torch.float64)
    do = torch.randn(B, Hq, L, Dv, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, do)]


def _single(q, k, v, do, kw, upcast=True):
    """The unsharded reference: output, stats and gradients (float64 unless upcast=False)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    m = selfattn.request.resolve_mask(kw.get("mask"), kw.get("causal", False), kw.get("window"))
    out, st = _reference.attention(*leaves, mask=m, scale=kw.get("scale"), softcap=kw.get("softcap"), upcast=upcast)
    out.backward(do.to(out.dtype))
    return [out.detach(), st.lse, st.max_logit, st.entropy] + [t.grad for t in leaves]


def _ring(q, k, v, do, kw, layout, backend="math"):
    leaves = [shard(t, 2, layout).requires_grad_() for t in (q, k, v)]
    out, st = ring_attention(*leaves, **kw, layout=layout, return_stats=True, backend=backend)
    out.backward(shard(do, 2, layout))
    return [out.detach(), st.lse, st.max_logit, st.entropy] + [t.grad for t in leaves]


NAMES = ["output", "lse", "max_logit", "entropy", "dQ", "dK", "dV"]


def _assert_rel(label, got, ref, rel=1e-10):
    assert got.shape == ref.shape, f"{label}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    fin = torch.isfinite(ref)
    assert torch.equal(got[~fin], ref[~fin]), f"{label}: non-finite entries differ"
    err = (got - ref)[fin].abs().max().item() if fin.any() else 0.0
    scale = max(1.0, ref[fin].abs().max().item()) if fin.any() else 1.0
    assert err <= rel * scale, f"{label}: max|diff| {err:.3e} > {rel:g} x {scale:.3g}"


def _exact(rank, world, backend):
    for name in CASES:
        shapes, kw = _case(name)
        q, k, v, do = _inputs(shapes, torch.float64, L=LENGTHS.get(name, L))
        ref = _single(q, k, v, do, kw)
        for layout in ("contiguous", "balanced"):
            got = _ring(q, k, v, do, kw, layout, backend)
            for n, a, b in zip(NAMES, got, ref):
                _assert_rel(f"{name}/{layout}/{n} (rank {rank} of {world})", a.double(), shard(b.double(), 2, layout))


def _float32(rank, world, backend):
    from _oracle import farther, reference_run
    from tolerance import assert_close

    for name, low_dtype in (("causal", torch.float32), ("window", torch.float32), ("documents", torch.float32),
                            ("gqa", torch.float32), ("causal", torch.bfloat16)):
        shapes, kw = _case(name)
        q, k, v, do = _inputs(shapes, low_dtype, seed=1)
        runs = [reference_run(q, k, v, kw, dtype=dt, upcast=dt == torch.float64, order=order, do=do)
                for dt, order in ((torch.float64, None), (low_dtype, None), (low_dtype, "reversed"), (low_dtype, "rolled"))]
        flat = [[r.out, r.stats.lse, r.stats.max_logit, r.stats.entropy, *r.grads] for r in runs]
        ref64 = flat[0]
        # the float32 twin: the reference in float32 with its reductions in three orders, each quantity
        # taking the order farthest from float64 (one order can round luckily well; the ring sums in its own)
        low = [farther(r, farther(r, a, b), c) for r, a, b, c in zip(*flat)]
        for layout in ("contiguous", "balanced"):
            got = _ring(q, k, v, do, kw, layout, backend)
            for i, (n, a, r, lo) in enumerate(zip(NAMES, got, ref64, low)):
                want = torch.float32 if n in ("lse", "max_logit", "entropy") else low_dtype  # stats accumulate in float32
                assert a.dtype == want, f"{name}/{n}: dtype {a.dtype}, expected {want}"
                assert_close(f"{name}/{layout}/{n} {low_dtype} (rank {rank})", a, shard(r, 2, layout), shard(lo, 2, layout),
                             factor=3.0 if i >= 4 else 2.0, dtype=low_dtype)


def _exact_and_float32(rank, world, backends):
    for backend in backends:
        _exact(rank, world, backend)
        _float32(rank, world, backend)


def _expect_error(fn, match):
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        assert match in str(e), f"expected {match!r} in the error, got: {e}"
        return str(e)
    raise AssertionError(f"no error raised (expected {match!r})")


class _NoPositions(selfattn.backends.Backend):
    """The math backend without positions (a backend that serves only some of a ring's pieces)."""

    name = "nopositions"
    capabilities = selfattn.backends.Backend.capabilities.replace(positions=False)

    def unsupported(self, q, k, v, req):
        return "positions" if req.q_positions is not None or req.kv_positions is not None else None

    def forward(self, q, k, v, req):
        return selfattn.backends.get("math").forward(q, k, v, req)


def _errors(rank, world, _backend):
    q = torch.randn(1, 2, 8 * world, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))  # the same on every rank
    # a length that does not divide: shard refuses on every rank
    _expect_error(lambda: shard(torch.randn(1, 2, 4 * world + 1, 4), 2), "must be divisible by")
    _expect_error(lambda: shard(torch.randn(1, 2, 2 * world + 2, 4), 2, "balanced"), "2 x the world size")
    # shards of different lengths: every rank gets the same error, nobody waits
    n = 4 + (rank == world - 1)
    x = torch.randn(1, 2, n, 4, dtype=torch.float64)
    msg = _expect_error(lambda: ring_attention(x, x, x, causal=True), "shards or options differ")
    assert "query shape" in msg
    # the same shapes but different options on one rank
    xs = shard(q, 2)
    _expect_error(lambda: ring_attention(xs, xs, xs, causal=(rank == 0)), "window/causal band")
    _expect_error(lambda: ring_attention(xs, xs, xs, scale=1.0 + rank), "scale")
    # a balanced shard must hold two equal chunks; only the last rank's is odd: all raise
    odd = torch.randn(1, 2, 4 + (rank == world - 1), 4)
    _expect_error(lambda: ring_attention(odd, odd, odd, layout="balanced"), "even number")
    # masks the ring cannot carry: refused by name on every rank
    _expect_error(lambda: ring_attention(xs, xs, xs, mask=torch.ones(8 * world, 8 * world, dtype=torch.bool)), "dense mask")
    _expect_error(lambda: ring_attention(xs, xs, xs, mask=masks.function(lambda b, h, i, j: j <= i)), "function mask")
    _expect_error(lambda: ring_attention(xs, xs, xs, mask=masks.documents(torch.zeros(8, dtype=torch.long))), "whole sequence")
    # one rank alone passes a bad mask: the others hear about it
    bad = masks.documents(torch.zeros(8 * world, dtype=torch.long)) if rank else masks.function(lambda b, h, i, j: j <= i)
    msg = _expect_error(lambda: ring_attention(xs, xs, xs, mask=bad), "function mask")
    if rank:
        assert "rank 0 refused" in msg
    _expect_error(lambda: ring_attention(xs, xs, xs, layout="zigzag"), "layout must be one of")
    _expect_error(lambda: ring_attention(xs, xs, xs, timeout=0), "timeout must be a positive number")
    _expect_error(lambda: ring_attention(xs, xs, xs, backend="nope"), "unknown backend")
    # an explicit backend that cannot serve some pieces: found before any transfer, on every rank. With a
    # window on the contiguous layout only ranks 1.. have a piece that needs positions; rank 0 does not
    selfattn.backends.register(_NoPositions())
    msg = _expect_error(lambda: ring_attention(xs, xs, xs, window=3, backend="nopositions"), "positions")
    assert ("rank 1 refused" in msg) == (rank == 0), msg
    _expect_error(lambda: ring_attention(xs, xs, xs, causal=True, backend="sdpa"), "return_stats")
    # unshard reassembles what shard cut, in both layouts
    for layout in ("contiguous", "balanced"):
        assert torch.equal(unshard(shard(q, 2, layout), 2, layout), q)
    # after all that, a good call still works (nothing left in flight)
    out = ring_attention(xs, xs, xs, causal=True, backend="math")
    assert torch.allclose(unshard(out, 2), selfattn.attention(q, q, q, causal=True, backend="math"), rtol=0, atol=1e-12)


def _worker(rank, world, init, fn_name, backend, errors):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        try:
            globals()[fn_name](rank, world, backend)
        finally:
            dist.destroy_process_group()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise


def _spawn(tmp_path, world, fn_name, backend="math"):
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    init = f"file://{tmp_path}/rendezvous-{fn_name}-{world}"
    try:
        mp.spawn(_worker, args=(world, init, fn_name, backend, errors), nprocs=world, join=True)
    except mp.ProcessRaisedException:
        msgs = []
        while not errors.empty():
            msgs.append("rank %d:\n%s" % errors.get())
        pytest.fail("\n".join(msgs) or "a rank failed")


@pytest.mark.parametrize("world, backends", [
    (2, ("auto", "math")), (4, ("auto",)),
    pytest.param(4, ("math",), marks=pytest.mark.slow),  # 4 ranks are covered by (4, "auto"), the math ring by 2 ranks
], ids=["2-auto-math", "4-auto", "4-math"])
def test_ring_matches_one_process(tmp_path, world, backends):
    # one spawn for all the checks of a world size (both backends on 2 ranks): starting the processes
    # costs more than the cases. "auto" runs the fused cpu kernels forward and backward (shard_backward:
    # one-pass for short pieces, two passes for the long cases); "math" the forward in math and the
    # backward in torch ops
    _spawn(tmp_path, world, "_exact_and_float32", backends)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])  # 2 ranks run every error path on every rank
def test_ring_bad_input_errors_on_every_rank(tmp_path, world):
    _spawn(tmp_path, world, "_errors")


@pytest.mark.parametrize("layout, computed", [
    # pieces (query chunk x key chunk) rank r computes against each source rank, causal, 4 ranks:
    ("contiguous", {r: [1] * (r + 1) for r in range(4)}),  # its own shard and those before: rank 3 does 4x rank 0's work
    ("balanced", {r: [3, 2, 2, 2] for r in range(4)}),  # own: 2 diagonals + tail x head; others: 2 full chunks; all equal
])
def test_causal_pieces_are_skipped(layout, computed):
    from selfattn.distributed import _pieces, _Plan

    for rank in range(4):
        plan = _Plan(rank=rank, world=4, group=None, layout=layout, n=8, batch=1, q_heads=1, kv_heads=1, scale=1.0,
                     softcap=None, band=(None, 0), structural=(), backend="math", acc=torch.float64, timeout=None)
        steps = [_pieces(plan, (rank - step) % 4, "cpu") for step in range(4)]
        assert [len(p) for p in steps if p] == computed[rank], (layout, rank, [len(p) for p in steps])
        for step, pieces in enumerate(steps):
            for qs, ks, piece in pieces:
                # diagonal pieces keep the causal mask with default positions (the fused kernel serves them),
                # every other computed piece is entirely allowed and runs with no mask at all
                diagonal = step == 0 and qs == ks
                assert piece.q_positions is None and piece.kv_positions is None
                assert (piece.mask is not None) == diagonal, (layout, rank, step, qs, ks, piece.mask)


def test_not_initialised():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match="not initialised"):
        ring_attention(x, x, x)
    with pytest.raises(RuntimeError, match="not initialised"):
        shard(x, 2)
