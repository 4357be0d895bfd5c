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


# -- auto's choice, pinned to the measured table ------------------------------------------------------
# BENCHMARKS.md ("CPU backend (issue 5)", "Short sequences (issue 7)") and the rank() comments of
# backends/cpu.py and sdpa.py: cpu's speed over sdpa's on the 2-core machine with one torch thread and
# numba's default threading layer. Each case is a concrete request and the backend the measurements
# say is fastest among those that serve it; only clear-cut cells are pinned (ratio >= 1.3 or <= 0.85,
# or a backend that alone serves the request).
_N = torch.float32
AUTO_PINS = [
    # (id, (B, Hq, Hkv, Lq, Lk, D), dtype, grad, attention() kwargs, expected backend)
    ("long_causal_grad", (1, 8, 8, 1024, 1024, 64), _N, True, {"causal": True}, "cpu"),
    ("tiny_no_grad", (1, 1, 1, 16, 16, 8), _N, False, {}, "sdpa"),  # fwd, B*H 1, L 16: 0.62
    ("short_fwd_bh1_l96", (1, 1, 1, 96, 96, 32), _N, False, {"causal": True}, "sdpa"),  # fwd: 0.84
    ("fwd_bh8_l128_d64", (1, 8, 8, 128, 128, 64), _N, False, {"causal": True}, "cpu"),  # fwd: 1.76
    ("fwd_bh64_l48_d64", (8, 8, 8, 48, 48, 64), _N, False, {"causal": True}, "cpu"),  # fwd: 1.54
    ("grad_bh8_l48_d32", (1, 8, 8, 48, 48, 32), _N, True, {"causal": True}, "cpu"),  # fwd+bwd: 1.43
    ("window", (1, 4, 4, 256, 256, 64), _N, False, {"window": 16}, "cpu"),  # 44-61x
    ("window_grad_bf16", (1, 4, 4, 256, 256, 64), torch.bfloat16, True, {"window": (8, 8)}, "cpu"),
    ("padding", (2, 4, 4, 64, 64, 32), _N, False, {"mask": "padding"}, "cpu"),
    ("documents", (1, 4, 4, 64, 64, 32), _N, True, {"mask": "documents"}, "cpu"),  # 13.6-17.5x
    ("causal_decode", (1, 8, 8, 1, 97, 64), _N, False, {"causal": True}, "cpu"),  # Lq != Lk: sdpa needs a dense mask
    ("dense_bool", (1, 4, 4, 128, 128, 64), _N, False, {"mask": "dense_bool"}, "sdpa"),  # 0.78-0.83
    ("bf16_causal", (1, 8, 8, 128, 128, 64), torch.bfloat16, False, {"causal": True}, "sdpa"),
    ("float64", (1, 8, 8, 128, 128, 64), torch.float64, False, {}, "sdpa"),
    ("return_stats", (1, 1, 1, 16, 16, 8), _N, False, {"return_stats": True}, "cpu"),  # sdpa cannot; cpu before math
    ("softcap", (1, 1, 1, 16, 16, 8), _N, True, {"softcap": 5.0}, "cpu"),
    ("dropout_generator", (1, 2, 2, 16, 16, 8), _N, False, {"dropout_p": 0.1, "generator": "g"}, "math"),
    ("dropout_global_rng", (1, 2, 2, 16, 16, 8), _N, False, {"dropout_p": 0.1}, "sdpa"),
]


def _pinned_kwargs(kw, b, lq, lk):
    kw = dict(kw)
    if kw.get("mask") == "padding":
        kw["mask"] = masks.padding([lk, lk // 2])
    elif kw.get("mask") == "documents":
        kw["mask"] = masks.documents([0] * (lk // 3) + [1] * (lk - lk // 3))
    elif kw.get("mask") == "dense_bool":
        kw["mask"] = torch.rand(lq, lk) < 0.5
    if kw.get("generator") == "g":
        kw["generator"] = torch.Generator()
    return kw


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", AUTO_PINS, ids=[c[0] for c in AUTO_PINS])
def test_auto_choice_follows_the_measured_table(case, one_thread):
    from selfattn.request import build_request

    from conftest import table_serves

    _, (b, hq, hkv, lq, lk, d), dtype, grad, kw, want = case
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dtype=dtype, requires_grad=grad)
    kw = _pinned_kwargs(kw, b, lq, lk)
    if want == "cpu" and not table_serves("cpu", q, k, v, **kw):
        pytest.skip("the cpu backend cannot run here (numba missing)")
    req = build_request(q, k, v, **kw)
    chosen = selfattn.backends.choose("auto", q, k, v, req).name
    assert chosen == want, f"{case[0]}: auto chose {chosen}, the measurements say {want}"


def test_auto_never_prefers_a_backend_that_cannot_serve(monkeypatch):
    # a backend whose rank is best but which refuses is never chosen: auto's choice serves the request
    from conftest import table_serves

    chosen = _spy_choice(monkeypatch)
    q, k, v = qkv(1, 4, 2, 8, 8, 8)
    cases = {"stats": {"return_stats": True}, "softcap": {"softcap": 2.0},
             "dropout_generator": {"dropout_p": 0.1, "generator": torch.Generator()},
             "sinks_stats": {"sinks": torch.zeros(4), "return_stats": True},
             "alibi": {"alibi_slopes": torch.ones(4), "causal": True}}
    for name, kw in cases.items():
        attn(q, k, v, **kw)
        assert table_serves(chosen[-1], q, k, v, **kw), f"{name}: auto chose {chosen[-1]}, whose table rules it out"


def test_auto_reads_the_data_only_for_the_backend_it_picks(monkeypatch):
    # sdpa's checks of the tensors' values (a pass over a whole KV cache) run only when auto is about to
    # pick sdpa; when they refuse, auto takes the next backend by rank, as if sdpa had refused outright
    from selfattn.request import build_request

    sdpa = selfattn.backends.get("sdpa")
    reads = []
    real = type(sdpa).unsupported

    def spy(self, q, k, v, req, data=True):
        reads.append(data)
        return real(self, q, k, v, req, data=data)

    monkeypatch.setattr(type(sdpa), "unsupported", spy)
    core = {n: selfattn.backends.get(n) for n in ("reference", "math", "sdpa")}
    monkeypatch.setattr(selfattn.backends, "_REGISTRY", core)
    q, k, v = qkv(1, 2, 2, 8, 8, 8)
    stats = build_request(q, k, v, return_stats=True)  # sdpa refuses before any data: math
    assert selfattn.backends.choose("auto", q, k, v, stats).name == "math" and reads == [False]
    plain = build_request(q, k, v)
    assert selfattn.backends.choose("auto", q, k, v, plain).name == "sdpa" and reads == [False, False, True]
    q[0, 1, 3, 0] = float("nan")  # torch's fused CPU kernel would turn this row into 0: sdpa refuses it
    reads.clear()
    assert selfattn.backends.choose("auto", q, k, v, build_request(q, k, v)).name == "math" and reads == [False, True]
    out = attn(q, k, v)
    assert torch.isnan(out[0, 1, 3]).all() and not torch.isnan(out[0, 0]).any()
    with pytest.raises(selfattn.backends.BackendUnavailable, match="NaN values in query"):
        selfattn.backends.choose("sdpa", q, k, v, build_request(q, k, v))  # by name: every check


def test_registry_lists_backends_and_features():
    names = selfattn.backends.names()
    assert names[0] == "auto" and {"reference", "math", "sdpa"} <= set(names)
    av = selfattn.backends.available()
    assert set(av) == set(names[1:])
    assert all("summary" in d for d in av.values())
    assert "softcap" in av["sdpa"] and "refused" in av["sdpa"]["stats"]
    text = selfattn.backends.table()
    assert all(n in text for n in names[1:])
