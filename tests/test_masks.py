"""Masks: allowed() against brute-force definitions; block_map()/tile() against allowed(); `&`; dense bias."""

from __future__ import annotations

import random

import pytest
import torch

from selfattn import masks
from selfattn.masks import EMPTY, FULL, PARTIAL

SHAPES = [(1, 1), (5, 5), (3, 9), (9, 3), (4, 0), (0, 4), (13, 13)]


# -- brute-force definitions, one python loop each --------------------------------------------


def brute_causal(b, h, lq, lk):
    return [[[[j <= i + lk - lq for j in range(lk)] for i in range(lq)]]]


def brute_window(left, right):
    def f(b, h, lq, lk):
        return [[[[i + lk - lq - left <= j <= i + lk - lq + right for j in range(lk)] for i in range(lq)]]]
    return f


def brute_padding(kv, ql):
    def f(b, h, lq, lk):
        return [[[[j < kv[bb] and (ql is None or i < ql[bb]) for j in range(lk)] for i in range(lq)]] for bb in range(b)]
    return f


def brute_documents(ids, qids):
    def f(b, h, lq, lk):
        out = []
        for bb in range(b):
            kid = ids[bb if len(ids) > 1 else 0]
            qid = kid[lk - lq:] if qids is None else qids[bb if len(qids) > 1 else 0]
            out.append([[[qid[i] == kid[j] for j in range(lk)] for i in range(lq)]])
        return out
    return f


def cases(lq, lk, b=3, h=2, rng=None):
    """(name, mask, brute-force function) for every kind, sized for (b, h, lq, lk)."""
    rng = rng or random.Random(0)
    kv = [rng.randint(0, lk) for _ in range(b)]
    ql = [rng.randint(0, lq) for _ in range(b)]
    ids = [sorted(rng.randint(0, 3) for _ in range(lk)) for _ in range(b)]
    qids = [sorted(rng.randint(0, 3) for _ in range(lq)) for _ in range(b)]
    dense_b = torch.rand(b, h, lq, lk) < 0.6
    dense_f = torch.randn(1, h, lq, lk).masked_fill(torch.rand(1, h, lq, lk) < 0.3, float("-inf"))
    out = [
        ("causal", masks.causal(), brute_causal),
        ("window3", masks.window(3), brute_window(3, 0)),
        ("window2_4", masks.window(2, 4), brute_window(2, 4)),
        ("window0", masks.window(0), brute_window(0, 0)),
        ("padding_kv", masks.padding(kv), brute_padding(kv, None)),
        ("padding_kv_q", masks.padding(kv, ql), brute_padding(kv, ql)),
        ("dense_bool", masks.dense(dense_b), lambda *a: dense_b.tolist()),
        ("dense_float", masks.dense(dense_f), lambda *a: (dense_f != float("-inf")).tolist()),
    ]
    if lq * lk == 0:
        return out  # segment ids need at least one position
    out.append(("documents_q", masks.documents(ids, qids), brute_documents(ids, qids)))
    if lq <= lk:
        out.append(("documents", masks.documents(ids), brute_documents(ids, None)))
        out.append(("documents_1d", masks.documents(ids[0]), brute_documents(ids[:1], None)))
    return out


@pytest.mark.parametrize("lq,lk", SHAPES)
def test_allowed_matches_brute_force(lq, lk):
    b, h = 3, 2
    for name, m, brute in cases(lq, lk, b, h):
        got = m.allowed(lq, lk)
        assert got.dtype == torch.bool, name
        assert got.dim() == 4 and got.shape[0] in (1, b) and got.shape[1] in (1, h) and got.shape[2:] == (lq, lk), f"{name}: shape {tuple(got.shape)}"
        if lq * lk == 0:
            continue  # nothing to compare beyond the shape
        want = torch.tensor(brute(b, h, lq, lk), dtype=torch.bool)  # (B|1, H|1, Lq, Lk)
        assert torch.equal(got.expand(b, h, lq, lk), want.expand(b, h, lq, lk)), f"{name}: allowed() differs from the definition"


@pytest.mark.parametrize("lq,lk", [(5, 5), (3, 9), (9, 3)])
def test_allowed_rows_subset(lq, lk):
    rows = [lq - 1, 0, lq // 2]
    for name, m, _ in cases(lq, lk):
        full = m.allowed(lq, lk)
        sub = m.allowed(lq, lk, rows=rows)
        assert torch.equal(sub, full[:, :, rows]), name
        bias = m.bias(lq, lk)
        if bias is not None:
            assert torch.equal(m.bias(lq, lk, rows=rows), bias[:, :, rows]), name


def test_bottom_right_alignment_is_top_left_when_square():
    assert torch.equal(masks.causal().allowed(6, 6)[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    # decoding one query against 5 cached keys: the query sees all of them
    assert bool(masks.causal().allowed(1, 5).all())
    # more queries than keys: the first Lq - Lk rows see nothing
    a = masks.causal().allowed(5, 2)[0, 0]
    assert not a[:3].any() and bool(a[3, 0]) and not bool(a[3, 1]) and bool(a[4].all())


def _check_tiles(name, m, lq, lk, bq, bk, exact):
    allowed = m.allowed(lq, lk)  # (B|1, H|1, Lq, Lk)
    bm = m.block_map(lq, lk, bq, bk)
    nq, nk = -(-lq // bq), -(-lk // bk)
    assert bm.dtype == torch.int8, name
    assert bm.dim() == 4 and tuple(bm.shape[2:]) == (nq, nk), f"{name}: block_map shape {tuple(bm.shape)}, expected (B|1, H|1, {nq}, {nk})"
    assert bm.shape[0] in (1, allowed.shape[0]) and bm.shape[1] in (1, allowed.shape[1]), name
    bb, hh = max(bm.shape[0], allowed.shape[0]), max(bm.shape[1], allowed.shape[1])
    bm = bm.expand(bb, hh, nq, nk)
    allowed = allowed.expand(bb, hh, lq, lk)
    for i in range(nq):
        for j in range(nk):
            blk = allowed[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            for b in range(bb):
                for h in range(hh):
                    kind, t = int(bm[b, h, i, j]), blk[b, h]
                    where = f"{name} Lq={lq} Lk={lk} block=({bq},{bk}) tile ({i},{j}) b={b} h={h}"
                    assert kind in (EMPTY, PARTIAL, FULL), where
                    if kind == EMPTY:
                        assert not t.any(), f"{where}: EMPTY tile has an allowed pair"
                    elif kind == FULL:
                        assert t.all(), f"{where}: FULL tile has a masked pair"
                    elif exact:
                        assert t.any() and not t.all(), f"{where}: PARTIAL tile is not partial"


EXACT = {"causal", "window3", "window2_4", "window0", "padding_kv", "padding_kv_q", "dense_bool", "dense_float"}


def test_block_map_consistent_with_allowed():
    rng = random.Random(7)
    for trial in range(12):
        lq, lk = rng.randint(1, 40), rng.randint(1, 40)
        bq, bk = rng.choice([1, 2, 3, 4, 8, 16, 64]), rng.choice([1, 2, 5, 8, 16, 64])
        for name, m, _ in cases(lq, lk, rng=rng):
            _check_tiles(name, m, lq, lk, bq, bk, exact=name in EXACT)


def test_block_map_of_combinations():
    rng = random.Random(11)
    for trial in range(6):
        lq, lk = rng.randint(1, 33), rng.randint(1, 33)
        bq, bk = rng.choice([2, 4, 8]), rng.choice([3, 4, 16])
        cs = {n: m for n, m, _ in cases(lq, lk, rng=rng)}
        docs = cs.get("documents", cs["documents_q"])
        for name, m in [
            ("causal&padding", cs["causal"] & cs["padding_kv_q"]),
            ("window&documents", cs["window2_4"] & docs),
            ("documents&causal", docs & cs["causal"]),
            ("dense_float&causal&padding", cs["dense_float"] & cs["causal"] & cs["padding_kv"]),
        ]:
            _check_tiles(name, m, lq, lk, bq, bk, exact=False)


def test_tile_over_all_batches_and_heads():
    rng = random.Random(3)
    for trial in range(15):
        lq, lk = rng.randint(1, 30), rng.randint(1, 30)
        for name, m, _ in cases(lq, lk, rng=rng):
            allowed = m.allowed(lq, lk)
            r0 = rng.randint(0, lq - 1)
            r1 = rng.randint(r0 + 1, lq)
            c0 = rng.randint(0, lk - 1)
            c1 = rng.randint(c0 + 1, lk)
            t = allowed[:, :, r0:r1, c0:c1]
            kind = m.tile(r0, r1, c0, c1, lq, lk)
            where = f"{name} tile rows {r0}..{r1} cols {c0}..{c1} of ({lq}, {lk})"
            if kind == EMPTY:
                assert not t.any(), where
            elif kind == FULL:
                assert t.all(), where
            else:
                assert kind == PARTIAL, where
                if name in EXACT:
                    assert t.any() and not t.all(), f"{where}: PARTIAL but uniform over every batch and head"


def test_tile_rejects_bad_bounds():
    for args in [(0, 0, 0, 1), (2, 1, 0, 1), (0, 1, 0, 9), (-1, 1, 0, 1)]:
        with pytest.raises(ValueError, match="tile"):
            masks.causal().tile(*args, 4, 4)


def test_and_combines_allowed_bias_and_kinds():
    lq, lk = 6, 9
    f1 = torch.randn(2, 1, lq, lk)
    f2 = torch.randn(1, 3, lq, lk).masked_fill(torch.rand(1, 3, lq, lk) < 0.2, float("-inf"))
    parts = [masks.causal(), masks.window(2, 1), masks.padding([7, 9]), masks.dense(f1), masks.dense(f2)]
    m = parts[0] & parts[1] & (parts[2] & parts[3]) & parts[4]
    assert isinstance(m, masks.And) and len(m.parts) == 5  # nested & flattens
    assert m.kinds == {"causal", "window", "padding", "dense_float"}
    want = torch.ones(1, 1, lq, lk, dtype=torch.bool)
    for p in parts:
        want = want & p.allowed(lq, lk)
    assert torch.equal(m.allowed(lq, lk), want)
    bias = torch.where(f2 == float("-inf"), torch.zeros(()), f2)
    assert torch.equal(m.bias(lq, lk), f1 + bias)
    dense = m.to_dense(lq, lk)
    assert torch.equal(dense == float("-inf"), ~want.expand_as(dense))
    assert torch.equal(dense[want.expand_as(dense)], (f1 + bias).expand_as(dense)[want.expand_as(dense)])
    assert (masks.causal() & masks.dense(torch.ones(lq, lk, dtype=torch.bool))).bias(lq, lk) is None
    assert masks.causal().__and__(3) is NotImplemented


def test_dense_float_bias_and_to_dense():
    t = torch.randn(2, 3, 4, 5)
    t[0, 1, 2, :] = float("-inf")
    t[1, 0, 0, 3] = float("-inf")
    m = masks.dense(t)
    assert m.kinds == {"dense_float"}
    assert torch.equal(m.allowed(4, 5), t != float("-inf"))
    assert torch.equal(m.bias(4, 5), torch.where(t == float("-inf"), torch.zeros(()), t))
    assert torch.equal(m.to_dense(4, 5), t)
    b = torch.rand(4, 5) < 0.5
    mb = masks.dense(b)
    assert mb.kinds == {"dense_bool"} and mb.bias(4, 5) is None
    assert torch.equal(mb.to_dense(4, 5)[0, 0], b)


def test_documents_with_causal_packs_sequences():
    ids = [0, 0, 0, 1, 1, 2, 2, 2]
    a = (masks.documents(ids) & masks.causal()).allowed(8, 8)[0, 0]
    for i in range(8):
        for j in range(8):
            assert bool(a[i, j]) == (ids[i] == ids[j] and j <= i)


def test_repr_is_readable():
    assert repr(masks.causal() & masks.window(4, 1)) == "causal() & window(4, 1)"
    assert "kv_lengths=[3]" in repr(masks.padding([3]))


def test_broadcasting_masks_matches_torch_and_imports_no_sympy():
    # masks broadcast shapes in plain Python: torch.broadcast_shapes imports sympy on first use (~1.5 s of a
    # process's first masked call where Python writes no bytecode); the same shapes, the same refusals
    rng = random.Random(0)
    for _ in range(300):
        a = tuple(rng.choice([0, 1, 1, 2, 3]) for _ in range(rng.randint(0, 4)))
        b = tuple(rng.choice([0, 1, 1, 2, 3]) for _ in range(rng.randint(0, 4)))
        try:
            want = torch.broadcast_shapes(a, b)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                masks._broadcast_shapes(a, b)
        else:
            assert masks._broadcast_shapes(a, b) == want
    import subprocess
    import sys

    code = ("import sys, torch, selfattn; from selfattn import masks\n"
            "q = k = v = torch.randn(2, 2, 70, 16)\n"
            "m = masks.padding([50, 70]) & masks.documents([[0] * 30 + [1] * 40] * 2) & masks.dense(torch.rand(70, 70) > 0.3)\n"
            "selfattn.attention(q, k, v, mask=m, causal=True, backend='cpu')\n"
            "selfattn.attention(q, k, v, mask=masks.function(lambda b, h, i, j: j <= i), backend='cpu')\n"
            "assert 'sympy' not in sys.modules, 'sympy was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
