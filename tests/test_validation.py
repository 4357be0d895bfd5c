"""Bad input gets a ValueError/TypeError naming the argument and what was seen; backend choice rules."""

from __future__ import annotations

import re

import pytest
import torch

import selfattn
from selfattn import masks
from selfattn.backends import BackendUnavailable

from conftest import qkv


def attn(q, k, v, **kw):
    return selfattn.attention(q, k, v, **kw)


def raises(exc, *fragments):
    """pytest.raises that also checks every fragment appears (literally) in the message."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# -- query / key / value ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_rank_not_4(which):
    t = dict(zip(("query", "key", "value"), qkv(1, 2, 2, 4, 4, 8)))
    t[which] = t[which][0]  # 3 dims
    with raises(ValueError, which, "4 dims", str(tuple(t[which].shape))):
        attn(t["query"], t["key"], t["value"])


def test_not_a_tensor():
    q, k, v = qkv()
    with raises(TypeError, "key", "list"):
        attn(q, k.tolist(), v)


def test_mismatched_batch():
    q, k, v = qkv(2, 2, 2, 4, 4, 8)
    with raises(ValueError, "batch size", "(2, 2, 4, 8)", "(1, 2, 4, 8)"):
        attn(q, k[:1], v[:1])


def test_mismatched_kv_heads():
    q, k, v = qkv(1, 4, 2, 4, 4, 8)
    with raises(ValueError, "number of heads", "key (1, 2, 4, 8)", "value (1, 1, 4, 8)"):
        attn(q, k, v[:, :1])


def test_mismatched_kv_lengths():
    q, k, v = qkv(1, 2, 2, 4, 6, 8)
    with raises(ValueError, "sequence length", "key (1, 2, 6, 8)", "value (1, 2, 5, 8)"):
        attn(q, k, v[:, :, :5])


def test_mismatched_head_dim():
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    with raises(ValueError, "head_dim", "query (1, 2, 4, 8)", "key (1, 2, 4, 7)"):
        attn(q, k[..., :7], v)


def test_zero_head_dim():
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    with raises(ValueError, "head_dim", "(1, 2, 4, 0)"):
        attn(q[..., :0], k[..., :0], v)
    with raises(ValueError, "head_dim", "value (1, 2, 4, 0)"):
        attn(q, k, v[..., :0])


def test_query_heads_not_a_multiple_of_kv_heads():
    q, k, v = qkv(1, 3, 2, 4, 4, 8)
    with raises(ValueError, "query heads (3)", "key/value heads (2)", "(1, 3, 4, 8)"):
        attn(q, k, v)
    with raises(ValueError, "key/value heads (0)"):
        attn(q, k[:, :0], v[:, :0])


def test_mixed_dtypes():
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    with raises(TypeError, "dtype", "torch.float32", "torch.float64"):
        attn(q, k.double(), v)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_dtypes(dtype):
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    with raises(TypeError, "query", str(dtype)):
        attn(q.to(dtype), k.to(dtype), v.to(dtype))


def test_mixed_devices():
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    with raises(ValueError, "device", "cpu", "meta"):
        attn(q, k.to("meta"), v)
    with raises(ValueError, "mask", "device", "meta"):
        attn(q, k, v, mask=torch.ones(4, 4, dtype=torch.bool, device="meta"))


# -- masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 3), (3, 4, 4), (1, 3, 4, 4), (4, 5), (1, 1, 5, 4)])
def test_mask_shape_does_not_broadcast(shape):
    q, k, v = qkv(2, 2, 2, 4, 4, 8)
    with raises(ValueError, "mask", str(shape), "(2, 2, 4, 4)"):
        attn(q, k, v, mask=torch.ones(shape, dtype=torch.bool))


def test_mask_rows_cannot_grow_past_a_length_1_query():
    # a (.., 5, Lk) mask broadcasts with Lq = 1 in torch's rules, but it does not fit one query
    q, k, v = qkv(1, 1, 1, 1, 7, 8)
    with raises(ValueError, "mask", "(1, 1, 5, 7)", "(1, 1, 1, 7)"):
        attn(q, k, v, mask=torch.ones(1, 1, 5, 7, dtype=torch.bool))


def test_mask_heads_must_be_query_heads():
    q, k, v = qkv(1, 4, 2, 4, 4, 8)
    with raises(ValueError, "mask", "(1, 2, 4, 4)", "(1, 4, 4, 4)"):
        attn(q, k, v, mask=torch.ones(1, 2, 4, 4, dtype=torch.bool))


def test_mask_bad_types():
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    with raises(TypeError, "mask", "int64"):
        attn(q, k, v, mask=torch.ones(4, 4, dtype=torch.long))
    with raises(TypeError, "mask", "list"):
        attn(q, k, v, mask=[[True] * 4] * 4)
    with raises(ValueError, "mask", "(1, 1, 1, 4, 4)"):
        attn(q, k, v, mask=torch.ones(1, 1, 1, 4, 4, dtype=torch.bool))
    with raises(TypeError, "causal", "int"):
        attn(q, k, v, causal=1)


@pytest.mark.parametrize("kv,ql,bad,limit", [([5, 4], None, "kv_lengths", 4), ([-1, 4], None, "kv_lengths", 4),
                                             ([4, 4], [4, 5], "q_lengths", 4), ([4, 4], [-2, 0], "q_lengths", 4)])
def test_padding_lengths_out_of_range(kv, ql, bad, limit):
    q, k, v = qkv(2, 2, 2, 4, 4, 8)
    vals = kv if bad == "kv_lengths" else ql
    with raises(ValueError, bad, f"[0, {limit}]", str(vals)):
        attn(q, k, v, mask=masks.padding(kv, ql))


def test_padding_lengths_bad_shape_or_dtype():
    q, k, v = qkv(2, 2, 2, 4, 4, 8)
    with raises(ValueError, "kv_lengths", "(3,)", "batch size is 2"):
        attn(q, k, v, mask=masks.padding([1, 2, 3]))
    with raises(ValueError, "q_lengths", "(1,)"):
        attn(q, k, v, mask=masks.padding([1, 2], [3]))
    with raises(ValueError, "kv_lengths", "(1, 2)"):
        masks.padding([[1, 2]])
    with raises(TypeError, "kv_lengths", "float"):
        masks.padding([1.0, 2.0])


def test_documents_bad_ids():
    q, k, v = qkv(2, 2, 2, 4, 6, 8)
    with raises(ValueError, "segment_ids", "(1, 5)", "(2, 6)"):
        attn(q, k, v, mask=masks.documents([0, 0, 1, 1, 1]))
    with raises(ValueError, "q_segment_ids", "(1, 3)"):
        attn(q, k, v, mask=masks.documents([0, 0, 1, 1, 1, 1], [0, 1, 1]))
    with raises(TypeError, "segment_ids", "float"):
        masks.documents([0.0, 1.0])
    q2, k2, v2 = qkv(1, 2, 2, 6, 4, 8)
    with raises(ValueError, "Lq=6", "Lk=4", "q_segment_ids"):
        attn(q2, k2, v2, mask=masks.documents([0, 0, 1, 1]))


@pytest.mark.parametrize("window,exc,frag", [(-1, ValueError, "left must be >= 0, got -1"),
                                             ((2, -3), ValueError, "right must be >= 0, got -3"),
                                             (1.5, TypeError, "left must be an int"),
                                             ((1, 2, 3), ValueError, "(1, 2, 3)"),
                                             (True, TypeError, "left must be an int")])
def test_window_invalid(window, exc, frag):
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    with raises(exc, "window", frag):
        attn(q, k, v, window=window)


# -- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap,exc", [(0.0, ValueError), (-2.0, ValueError), (float("inf"), ValueError),
                                         ("5", TypeError), (True, TypeError)])
def test_softcap_invalid(softcap, exc):
    q, k, v = qkv()
    with raises(exc, "softcap"):
        attn(q, k, v, softcap=softcap)


@pytest.mark.parametrize("p,exc", [(1.0, ValueError), (-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                   ("0.1", TypeError), (False, TypeError)])
def test_dropout_p_invalid(p, exc):
    q, k, v = qkv()
    with raises(exc, "dropout_p"):
        attn(q, k, v, dropout_p=p)


def test_other_options_invalid():
    q, k, v = qkv()
    with raises(ValueError, "scale", "nan"):
        attn(q, k, v, scale=float("nan"))
    with raises(TypeError, "scale", "str"):
        attn(q, k, v, scale="0.5")
    with raises(TypeError, "generator", "int"):
        attn(q, k, v, dropout_p=0.1, generator=3)
    with raises(TypeError, "return_stats", "int"):
        attn(q, k, v, return_stats=1)


def test_empty_sequences_are_defined_not_errors():
    # Lq == 0 or Lk == 0 is valid input (documented in attention()); the full behaviour on every
    # backend is in test_grad.py::test_empty_sequences. Empty head_dim is an error (test_zero_head_dim).
    assert "Lk == 0" in selfattn.attention.__doc__ and "Lq == 0" in selfattn.attention.__doc__
    q, k, v = qkv(1, 2, 2, 0, 0, 8)
    assert attn(q, k, v).shape == (1, 2, 0, 8)


# -- backends -------------------------------------------------------------------------------------


def test_unknown_backend_names():
    q, k, v = qkv()
    with raises(ValueError, "backend", "'flash'", "'math'", "'auto'"):
        attn(q, k, v, backend="flash")
    with raises(TypeError, "backend", "int"):
        attn(q, k, v, backend=3)
    with raises(ValueError, "backend", "'nope'"):
        with selfattn.use_backend("nope"):
            pass


@pytest.mark.parametrize("kw,feature", [({"return_stats": True}, "return_stats"), ({"softcap": 2.0}, "softcap"),
                                        ({"dropout_p": 0.1, "generator": "gen"}, "generator")])
def test_explicit_backend_refuses_and_never_falls_back(kw, feature, monkeypatch):
    q, k, v = qkv()
    if kw.get("generator") == "gen":
        kw = {**kw, "generator": torch.Generator()}
    calls = []
    for name in selfattn.backends.names()[1:]:
        b = selfattn.backends.get(name)
        monkeypatch.setattr(b, "forward", lambda *a, _n=name, **k_: calls.append(_n))
    with raises(BackendUnavailable, "'sdpa'", feature):
        attn(q, k, v, backend="sdpa", **kw)
    with selfattn.use_backend("sdpa"):
        with raises(BackendUnavailable, "'sdpa'", feature):
            attn(q, k, v, **kw)
    assert calls == [], f"a backend ran although the chosen one refused: {calls}"
    assert issubclass(BackendUnavailable, RuntimeError) and selfattn.BackendUnavailable is BackendUnavailable


def _spy_choice(monkeypatch):
    chosen = []
    real = selfattn.backends.choose

    def spy(name, q, k, v, req):
        b = real(name, q, k, v, req)
        chosen.append(b.name)
        return b

    monkeypatch.setattr(selfattn.backends, "choose", spy)
    return chosen


def test_use_backend_context_manager(monkeypatch):
    q, k, v = qkv()
    chosen = _spy_choice(monkeypatch)
    assert selfattn.backends.current() == "auto"
    with selfattn.use_backend("math"):
        assert selfattn.backends.current() == "math"
        attn(q, k, v)
        attn(q, k, v, backend="reference")  # an explicit name wins over the context
        with selfattn.use_backend("reference"):
            attn(q, k, v)
        attn(q, k, v)
        with selfattn.use_backend("auto"):
            assert selfattn.backends.current() == "auto"
    assert selfattn.backends.current() == "auto"
    with pytest.raises(KeyError):
        with selfattn.use_backend("math"):
            raise KeyError("boom")
    assert selfattn.backends.current() == "auto"  # restored after an exception
    assert chosen == ["math", "reference", "reference", "math"]


def test_auto_picks_sdpa_for_plain_requests_and_math_for_stats(monkeypatch):
    # among the core backends (fused ones that register later rank on their own; see the next test)
    core = {n: selfattn.backends.get(n) for n in ("reference", "math", "sdpa")}
    monkeypatch.setattr(selfattn.backends, "_REGISTRY", core)
    chosen = _spy_choice(monkeypatch)
    q, k, v = qkv(1, 4, 2, 8, 8, 8)
    attn(q, k, v)
    attn(q, k, v, causal=True)
    attn(q, k, v, return_stats=True)
    attn(q, k, v, softcap=3.0)
    attn(q, k, v, causal=True, return_stats=True)
    attn(q, k, v, dropout_p=0.1, generator=torch.Generator())
    assert chosen == ["sdpa", "sdpa", "math", "math", "math", "math"]


def test_auto_picks_the_lowest_rank_among_capable_backends(monkeypatch):
    from conftest import request_for

    chosen = _spy_choice(monkeypatch)
    q, k, v = qkv(1, 4, 2, 8, 8, 8)
    for kw in ({}, {"causal": True}, {"window": 3}, {"return_stats": True}, {"softcap": 2.0},
               {"mask": masks.padding([5])}, {"mask": torch.rand(8, 8) < 0.5}):
        attn(q, k, v, **kw)
        req = request_for(q, k, v, **kw)
        capable = [selfattn.backends.get(n) for n in selfattn.backends.names()[1:]
                   if selfattn.backends.get(n).unsupported(q, k, v, req) is None]
        best = min(b.rank(req) for b in capable)
        assert selfattn.backends.get(chosen[-1]).rank(req) == best, f"{kw}: auto chose {chosen[-1]}"


def test_registry_lists_backends_and_features():
    names = selfattn.backends.names()
    assert names[0] == "auto" and {"reference", "math", "sdpa"} <= set(names)
    av = selfattn.backends.available()
    assert set(av) == set(names[1:])
    assert all("summary" in d for d in av.values())
    assert "softcap" in av["sdpa"] and "refused" in av["sdpa"]["stats"]
    text = selfattn.backends.table()
    assert all(n in text for n in names[1:])
