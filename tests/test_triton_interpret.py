"""The `triton` backend under Triton's CPU interpreter: every feature against the float64 reference.

Triton decorates its own jit helpers (tl.sum, tl.max, ...) when it is first imported, so the
interpreter works only if TRITON_INTERPRET=1 is set before that import. This module sets it
at import time, imports triton, and puts the previous value back; a module-scoped fixture sets
it again while these tests run, since the backend reads it at each call. Elsewhere in the
process the backend keeps refusing CPU tensors, so the shared backend grid does not pay for
the interpreter. If triton was already imported compiled (another module imported it first,
or a GPU is present), these tests cannot run in this process: they are skipped here and
``test_interpreter_suite_in_subprocess`` runs this whole file in a fresh interpreter process
instead, failing if anything in it fails.

Shapes are small: the interpreter runs each program in numpy. Tolerances follow STYLE.md
rule 6 (tests/_oracle.py: reference_pair and compare): factor 2 forward and statistics,
factor 3 gradients, against the float64 reference and its low-precision twin.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

_PREVIOUS = os.environ.get("TRITON_INTERPRET")
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import in this process
try:
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")
finally:
    if _PREVIOUS is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS

import selfattn  # noqa: E402
from selfattn import masks  # noqa: E402
from selfattn.backends import BackendUnavailable  # noqa: E402
from selfattn.backends import triton_gpu  # noqa: E402
from selfattn.gpu import flash_attention, flash_attention_varlen  # noqa: E402

from _oracle import compare, reference_pair  # noqa: E402
from tolerance import assert_close  # noqa: E402

IN_PROCESS = triton_gpu._triton_interpreted()
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported compiled in this process; "
                                "test_interpreter_suite_in_subprocess runs these tests in a fresh process")


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    old = os.environ.get("TRITON_INTERPRET")
    if IN_PROCESS:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


@pytest.mark.skipif(IN_PROCESS, reason="the interpreter runs in this process: the tests below ran here")
def test_interpreter_suite_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", __file__],
                         capture_output=True, text=True, env=env, timeout=1200)
    print(res.stdout[-5000:])
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]
    assert " passed" in res.stdout


# -- helpers (test_triton_gpu.py uses them on CUDA) -----------------------------------------------


def make_qkv(b, hq, hkv, lq, lk, d, dv, dtype, device="cpu", magnitude=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64) * magnitude
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64) * magnitude
    v = torch.randn(b, hkv, lk, dv, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def check_case(name, q, k, v, *, grads=True, deterministic=False, num_splits=None, **kw):
    """Run flash_attention (with stats and, if ``grads``, a backward) and hold every output to
    the reference pair: out and stats factor 2, gradients factor 3 (the sinks' too), fully-masked
    rows exact."""
    leafs = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    call = dict(kw)
    if kw.get("sinks") is not None:
        call["sinks"] = kw["sinks"].detach().clone().requires_grad_(grads)
    out, st = flash_attention(*leafs, return_stats=True, deterministic=deterministic, num_splits=num_splits, **call)
    assert out.shape == q.shape[:-1] + (v.shape[-1],)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out)
    pair = reference_pair(q, k, v, do=do if grads else None, **call)  # with d sinks when they require grad
    compare(name, pair, out, stats=st, dtype=q.dtype)
    ref64 = pair[0]
    dead = ref64.stats.lse == float("-inf")  # (B, Hq, Lq) fully-masked rows (no sinks)
    if kw.get("sinks") is not None:
        dead = ref64.stats.max_logit == float("-inf")
    if dead.any():
        assert torch.equal(out.detach()[dead], torch.zeros_like(out.detach()[dead])), f"{name}: fully-masked rows not 0"
        assert bool((st.max_logit[dead] == float("-inf")).all()), f"{name}: max_logit of fully-masked rows"
        if kw.get("sinks") is None:
            assert bool((st.lse[dead] == float("-inf")).all()) and bool((st.entropy[dead] == 0).all())
    if grads:
        out.backward(do)
        sink_grad = [call["sinks"].grad] if kw.get("sinks") is not None else []
        compare(name, pair, grads=[t.grad for t in leafs] + sink_grad, dtype=q.dtype)
        if dead.any():
            dq = leafs[0].grad[dead]
            assert torch.equal(dq, torch.zeros_like(dq)), f"{name}: dq of fully-masked rows not 0"
    return out, st


def mask_kwargs(case, b, hq, lq, lk, seed=3):
    """attention() keyword arguments for mask case ``case``."""
    g = torch.Generator().manual_seed(seed)
    kv_len = torch.randint(1, lk + 1, (b,), generator=g)
    kv_len[0] = lk // 2
    q_len = torch.randint(0, lq + 1, (b,), generator=g)
    kv_ids = torch.sort(torch.randint(0, 4, (b, lk), generator=g), dim=1).values
    q_ids = torch.sort(torch.randint(0, 4, (b, lq), generator=g), dim=1).values
    docs = masks.documents(kv_ids) if lq <= lk else masks.documents(kv_ids, q_ids)
    bool_m = torch.rand(b, 1, lq, lk, generator=g) < 0.7
    bool_m[0, 0, lq // 2] = False  # a fully-masked row
    float_m = torch.randn(lq, lk, generator=g).masked_fill(torch.rand(lq, lk, generator=g) < 0.2, float("-inf"))
    float_m[-1] = float("-inf")
    keep = torch.rand(b, lk, generator=g) < 0.6
    keep[0, 3:] = False  # batch 0: only keys 0..2 (a key tile with holes, then empty tiles)
    lens = torch.tensor([lk, max(1, lk // 3)] + [lk] * (b - 2))[:b]
    shuffled_q = torch.randperm(lq + 5, generator=g)[:lq]  # positions in no particular order
    shuffled_kv = torch.randperm(lk + 5, generator=g)[:lk]
    return {
        "causal": {"causal": True},
        "window_left": {"window": 5},
        "window_left_right": {"window": (4, 3)},
        "window_zero": {"mask": masks.window(0)},
        "padding_kv": {"mask": masks.padding(kv_len)},
        "padding_kv_q": {"mask": masks.padding(kv_len, q_len)},
        "padding_zero": {"mask": masks.padding(torch.zeros(b, dtype=torch.long))},
        "documents": {"mask": docs},
        "documents_q_ids": {"mask": masks.documents(kv_ids, q_ids)},
        "documents_causal": {"mask": docs, "causal": True},
        "documents_unsorted": {"mask": masks.documents(torch.randint(0, 3, (b, lk), generator=g), torch.randint(0, 3, (b, lq), generator=g))},
        "dense_bool": {"mask": bool_m},
        "dense_bool_heads": {"mask": masks.dense(torch.rand(1, hq, lq, lk, generator=g) < 0.5)},
        "dense_float": {"mask": float_m},
        "dense_float_row": {"mask": torch.randn(1, hq, 1, lk, generator=g)},
        "causal_padding": {"mask": masks.padding(kv_len, q_len), "causal": True},
        "window_documents": {"mask": docs & masks.window(6, 2)},
        "float_causal_padding": {"mask": masks.dense(float_m) & masks.causal() & masks.padding(kv_len)},
        "bool_window_causal": {"mask": bool_m, "window": (3, 3), "causal": True},
        "two_windows_two_paddings": {"mask": masks.window(9, 4) & masks.window(6, 6) & masks.padding(kv_len) & masks.padding(kv_len.clamp(max=lk - 3), q_len)},
        # issue 12: positions, key padding, mask functions
        "key_padding_causal": {"mask": masks.key_padding(keep), "causal": True},
        "left_padded": dict(masks.left_padded(lens, lk, lq) if lq <= lk else {"mask": masks.key_padding(keep)}, causal=True),
        "varlen_window": dict(masks.varlen(q_len.clamp(min=1), kv_len, lq, lk), window=(6, 0)),
        "positions_unsorted_window": {"q_positions": shuffled_q, "kv_positions": shuffled_kv, "window": (7, 2)},
        "window_unbounded_left": {"window": (None, 3)},
        "window_unbounded_right": {"window": (4, None)},
        "function_prefix_lm": {"mask": masks.function(lambda b_, h, qi, ki: (ki <= qi + lk - lq) | (ki < 7))},
        "function_heads_causal": {"mask": masks.function(lambda b_, h, qi, ki: ((qi + ki + h) % 3 != 0) & (b_ >= 0)), "causal": True},
        "function_sliding_global": {"mask": masks.function(lambda b_, h, qi, ki: ((qi + lk - lq - ki).abs() <= 4) | (ki < 2))},
        "function_nothing": {"mask": masks.function(lambda b_, h, qi, ki: ki < 0)},
    }[case]


MASK_CASES = ["causal", "window_left", "window_left_right", "window_zero", "padding_kv", "padding_kv_q",
              "padding_zero", "documents", "documents_q_ids", "documents_causal", "documents_unsorted",
              "dense_bool", "dense_bool_heads", "dense_float", "dense_float_row", "causal_padding",
              "window_documents", "float_causal_padding", "bool_window_causal", "two_windows_two_paddings",
              "key_padding_causal", "left_padded", "varlen_window", "positions_unsorted_window",
              "window_unbounded_left", "window_unbounded_right", "function_prefix_lm", "function_heads_causal",
              "function_sliding_global", "function_nothing"]


# -- the interpreter itself -----------------------------------------------------------------------


@in_process
def test_interpreter_is_active_for_cpu_tensors():
    kern = triton_gpu._kernels_for(torch.device("cpu"))
    assert kern.INTERPRET and type(kern._attn_fwd).__name__ == "InterpretedFunction"
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16, 16, torch.float32)
    assert selfattn.backends.get("triton").unsupported(q, k, v, _request(q, k, v)) is None


def _request(q, k, v, **kw):
    from conftest import request_for
    return request_for(q, k, v, **kw)


@in_process
def test_cpu_refused_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16, 16, torch.float32)
    with pytest.raises(BackendUnavailable, match="device cpu"):
        selfattn.attention(q, k, v, backend="triton")
    assert selfattn.backends.get("triton").unsupported(q, k, v, _request(q, k, v)).startswith("device cpu")


# -- shapes, dtypes, head dims --------------------------------------------------------------------

# (B, Hq, Hkv, Lq, Lk, D, Dv)
SHAPES = [
    (1, 2, 2, 37, 37, 24, 24),  # head dim padded 24 -> 32
    (2, 2, 1, 33, 47, 16, 16),  # GQA, Lq < Lk
    (1, 3, 1, 40, 21, 8, 40),  # MQA, Lq > Lk, D < 16, Dv > D
    (1, 2, 2, 1, 50, 59, 59),  # one query (GQA packing path off), odd head dim
    (1, 1, 1, 17, 17, 256, 256),  # the largest head dim
]


def _sid(s):
    return "B{}-H{}/{}-L{}x{}-D{}-Dv{}".format(*s)


@in_process
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
def test_shapes_float32(shape):
    q, k, v = make_qkv(*shape, torch.float32)
    check_case(_sid(shape), q, k, v)


@in_process
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("extra", [{}, {"causal": True}], ids=["full", "causal"])
def test_low_precision(dtype, extra):
    q, k, v = make_qkv(1, 4, 2, 29, 45, 32, 32, dtype)
    check_case(f"{dtype} {extra}", q, k, v, **extra)


@in_process
def test_head_dim_111_bf16():
    q, k, v = make_qkv(1, 2, 1, 20, 33, 111, 111, torch.bfloat16)
    check_case("d111", q, k, v, causal=True)


@in_process
def test_non_contiguous_inputs():
    # (B, L, H, D) storage viewed as (B, H, L, D): arbitrary strides, no copy
    q, k, v = (t.transpose(1, 2) for t in make_qkv(2, 20, 20, 3, 3, 16, 16, torch.float32))
    assert not q.is_contiguous()
    check_case("strided", q, k, v, causal=True)


# -- masks -----------------------------------------------------------------------------------------


@in_process
@pytest.mark.parametrize("case", MASK_CASES)
def test_masks(case):
    b, hq, hkv, lq, lk, d = 2, 2, 1, 24, 40, 16  # 2 x 3 tiles of 16
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, d, torch.float32, seed=sum(map(ord, case)))
    check_case(case, q, k, v, **mask_kwargs(case, b, hq, lq, lk))


@in_process
@pytest.mark.parametrize("case", ["causal", "window_left_right", "padding_kv_q", "documents_q_ids", "dense_float"])
def test_masks_more_queries_than_keys(case):
    b, hq, hkv, lq, lk, d = 2, 2, 2, 41, 19, 16
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, d, torch.float32)
    check_case(case, q, k, v, **mask_kwargs(case, b, hq, lq, lk))


@in_process
@pytest.mark.parametrize("case", ["causal", "window_left", "padding_kv", "documents"])
def test_masked_tiles_are_never_read(case):
    # NaN in every key/value a mask rules out for the first query tile; the interpreter's tiles
    # are 16 wide, so rows 0..15 must come out exactly as with clean inputs (the tiles holding
    # the NaNs are skipped, not multiplied by zero)
    lq = lk = 64
    q, k, v = make_qkv(1, 1, 1, lq, lk, 16, 16, torch.float32)
    kw = {"causal": {"causal": True}, "window_left": {"window": 3},
          "padding_kv": {"mask": masks.padding([30])},
          "documents": {"mask": masks.documents(torch.tensor([0] * 16 + [1] * 48))}}[case]
    clean = flash_attention(q, k, v, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[..., 32:, :] = float("nan")
    v2[..., 32:, :] = float("nan")
    dirty = flash_attention(q, k2, v2, **kw)
    assert torch.equal(dirty[..., :16, :], clean[..., :16, :])


# -- issue 12: ALiBi, sinks, positions -----------------------------------------------------------


@in_process
@pytest.mark.parametrize("case", ["alibi", "alibi_batch_positions", "sinks", "sinks_padding_empty_rows",
                                  "alibi_sinks_softcap_window", "sinks_function_nothing"])
def test_alibi_and_sinks(case):
    b, hq, hkv, lq, lk, d = 2, 4, 2, 21, 27, 16
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, 24, torch.float32, seed=11)
    g = torch.Generator().manual_seed(5)
    slopes = torch.rand(hq, generator=g) * 0.5
    sinks = torch.randn(hq, generator=g)
    kw = {
        "alibi": dict(alibi_slopes=slopes, causal=True),
        "alibi_batch_positions": dict(alibi_slopes=torch.rand(b, hq, generator=g), **masks.left_padded(torch.tensor([lk, 9]), lk, lq)),
        "sinks": dict(sinks=sinks),
        "sinks_padding_empty_rows": dict(sinks=sinks, mask=masks.padding([lk, 5], [lq, 8]), causal=True),
        "alibi_sinks_softcap_window": dict(alibi_slopes=slopes, sinks=sinks, softcap=3.0, window=(5, None)),
        "sinks_function_nothing": dict(sinks=sinks, mask=masks.function(lambda b_, h, qi, ki: (ki < 0) | (h == 0))),
    }[case]
    check_case(case, q, k, v, **kw)


@in_process
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_alibi_sinks_low_precision(dtype):
    q, k, v = make_qkv(1, 2, 2, 19, 23, 16, 16, dtype, seed=4)
    g = torch.Generator().manual_seed(6)
    check_case(f"alibi sinks {dtype}", q, k, v, alibi_slopes=torch.rand(2, generator=g), sinks=torch.randn(2, generator=g),
               causal=True)


@in_process
def test_alibi_is_not_rounded_to_low_precision():
    # a large distance times a slope: bfloat16 has a spacing of 2 at 300; the kernel adds ALiBi
    # in float32, so two keys 1 apart still get logits 1 * slope apart
    q, k, v = make_qkv(1, 1, 1, 1, 2, 16, 16, torch.bfloat16)
    q.zero_()  # all scores 0: the logits are ALiBi alone
    kv_pos = torch.tensor([0, 1])
    out, st = flash_attention(q, k, v, alibi_slopes=torch.tensor([1.0]), q_positions=torch.tensor([300]),
                              kv_positions=kv_pos, return_stats=True)
    assert float(st.max_logit) == -299.0
    p = torch.softmax(torch.tensor([-300.0, -299.0], dtype=torch.float64), 0)
    assert_close("alibi out", out, (p[:, None] * v[0, 0].double()).sum(0)[None, None, None], out.float().double(), factor=0.0)


@in_process
def test_positions_drive_tile_skipping():
    # per-batch positions: batch 1's queries sit 40 positions later, so its causal band covers
    # every key while batch 0's covers the first tile only. NaN in keys/values batch 0 may not see
    # must not reach batch 0's rows (the tiles holding them are skipped)
    lq = lk = 48
    q, k, v = make_qkv(2, 1, 1, lq, lk, 16, 16, torch.float32)
    qp = torch.stack([torch.arange(lq) - 40, torch.arange(lq)])  # (B, Lq)
    clean = flash_attention(q, k, v, causal=True, q_positions=qp)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 16:] = float("nan")
    v2[0, :, 16:] = float("nan")
    dirty = flash_attention(q, k2, v2, causal=True, q_positions=qp)
    assert torch.equal(dirty[0], clean[0])
    check_case("per-batch positions", q, k, v, causal=True, q_positions=qp)


@in_process
@pytest.mark.parametrize("case", ["one_key", "window_0_1"])
def test_bf16_gradients_exactly_zero(case):
    # issue 12's defect: one allowed key per row makes the softmax gradient exactly 0 (dQ = dK = 0).
    # The interpreter truncates float32 to bfloat16; P rounded to 0.996 inside P V and Delta taken
    # from the truncated bfloat16 output gave dQ and dK up to 4.7. Fails on the old kernel.
    if case == "one_key":
        q, k, v = make_qkv(1, 1, 1, 6, 1, 1, 60, torch.bfloat16, magnitude=3.0, seed=1)
        kw = {}
    else:
        q, k, v = make_qkv(1, 1, 1, 2, 4, 1, 44, torch.bfloat16, magnitude=3.0, seed=2)
        kw = {"window": (0, 1)}
    leafs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_attention(*leafs, **kw)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype) * 4
    out.backward(do)
    if case == "one_key":
        assert torch.equal(leafs[0].grad, torch.zeros_like(q)) and torch.equal(leafs[1].grad, torch.zeros_like(k))
    check_case(case, q, k, v, **kw)


# -- options -----------------------------------------------------------------------------------------


@in_process
@pytest.mark.parametrize("opts", [dict(softcap=5.0), dict(softcap=0.5, causal=True), dict(scale=0.37),
                                  dict(scale=-1.5, window=(3, 2)), dict(scale=2.0, softcap=3.0, mask="padding")],
                         ids=["softcap", "softcap_small", "scale", "scale_negative", "scale_softcap_padding"])
def test_options(opts):
    q, k, v = make_qkv(2, 4, 2, 27, 35, 24, 16, torch.float32)
    kw = dict(opts)
    if kw.get("mask") == "padding":
        kw["mask"] = masks.padding([35, 0], [27, 11])
    check_case(str(opts), q, k, v, **kw)


@in_process
def test_softcap_bf16():
    q, k, v = make_qkv(1, 2, 2, 30, 30, 32, 32, torch.bfloat16, magnitude=3.0)
    check_case("softcap bf16", q, k, v, softcap=8.0, causal=True)


@in_process
@pytest.mark.parametrize("extra", [{}, {"mask": "dense_float"}], ids=["plain", "dense_float"])
def test_large_scores(extra):
    d = 32
    q, k, v = make_qkv(1, 2, 2, 33, 65, d, d, torch.float32, magnitude=(1e4 / d ** 0.5) ** 0.5)
    kw = dict(extra)
    if kw.get("mask") == "dense_float":
        kw["mask"] = torch.randn(33, 65) * 100
    check_case("large", q, k, v, **kw)


@in_process
def test_nan_stays_in_its_row():
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, 16, torch.float32)
    q[0, 1, 7, 3] = float("nan")
    out, st = flash_attention(q, k, v, return_stats=True)
    bad = torch.isnan(out).any(-1)  # (B, H, Lq)
    expect = torch.zeros_like(bad)
    expect[0, 1, 7] = True
    assert torch.equal(bad, expect)
    assert torch.isnan(st.lse[0, 1, 7]) and torch.isfinite(st.lse.masked_fill(expect, 0)).all()


# -- backward options, split-KV, varlen ------------------------------------------------------------


@in_process
@pytest.mark.parametrize("case", ["causal", "dense_bool"])
def test_deterministic_backward(case):
    b, hq, hkv, lq, lk, d = 2, 2, 1, 33, 40, 16
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, d, torch.float32)
    kw = mask_kwargs(case, b, hq, lq, lk)
    check_case(case, q, k, v, deterministic=True, **kw)
    if case != "causal":
        return
    grads = []
    for _ in range(2):
        leafs = [t.clone().requires_grad_() for t in (q, k, v)]
        flash_attention(*leafs, deterministic=True, **kw).sum().backward()
        grads.append([t.grad for t in leafs])
    assert all(torch.equal(a, b) for a, b in zip(*grads)), "deterministic gradients differ between runs"


@in_process
@pytest.mark.parametrize("shape,splits,extra", [
    ((1, 8, 2, 1, 120, 32, 32), 4, {}),  # decode: GQA group of 4 packed into one tile, 4 KV splits
    ((1, 4, 2, 3, 90, 16, 24), 3, {"causal": True}),
    ((2, 4, 1, 2, 70, 16, 16), 5, {"mask": "padding"}),  # some splits see no key at all
], ids=["decode_gqa", "few_queries_causal", "padding_empty_splits"])
def test_split_kv(shape, splits, extra):
    q, k, v = make_qkv(*shape, torch.float32)
    kw = dict(extra)
    if kw.get("mask") == "padding":
        kw["mask"] = masks.padding([9, 0], [2, 1])
    check_case(f"split{splits}", q, k, v, num_splits=splits, **kw)


@in_process
def test_split_kv_plan_on_cpu_is_one_pass():
    kern = triton_gpu._kernels_for(torch.device("cpu"))
    assert kern.plan_pack(32, 8, 1) == 4
    assert kern.plan_splits(1, 32, 4, 1, 32768, torch.device("cpu")) == 1


@in_process
def test_varlen_matches_per_sequence_attention():
    torch.manual_seed(0)
    lens = [5, 0, 17, 9]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    total = int(cu[-1])
    q, k, v = (torch.randn(total, 4, 16) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA
    out, st = flash_attention_varlen(q, k, v, cu, cu, causal=True, return_stats=True)
    assert out.shape == (total, 4, 16) and st.lse.shape == (4, total)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if s == e:
            continue
        sl = [t[s:e].permute(1, 0, 2)[None] for t in (q, k, v)]  # (1, H, L, D)
        r64, low = reference_pair(*sl, causal=True)
        assert_close("varlen out", out[s:e].permute(1, 0, 2)[None], r64.out, low.out)
        assert_close("varlen lse", st.lse[:, s:e][None], r64.stats.lse, low.stats.lse)


@in_process
def test_varlen_kv_cache_alignment_per_sequence():
    # cu_seqlens_q != cu_seqlens_k (a chunk of new queries against each sequence's cache):
    # FlashAttention aligns causal bottom-right on each sequence's own lengths
    q_lens, k_lens = [3, 1, 0, 6], [7, 1, 4, 6]
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()])
    g = torch.Generator().manual_seed(2)
    q = torch.randn(int(cu_q[-1]), 2, 16, generator=g)
    k, v = (torch.randn(int(cu_k[-1]), 1, 16, generator=g) for _ in range(2))
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    for n in range(len(q_lens)):
        if q_lens[n] == 0:
            continue
        sq = q[cu_q[n]:cu_q[n + 1]].permute(1, 0, 2)[None]  # (1, H, Lq_n, D)
        sk, sv = (t[cu_k[n]:cu_k[n + 1]].permute(1, 0, 2)[None] for t in (k, v))
        r64, low = reference_pair(sq, sk, sv, causal=True)  # default positions: bottom-right
        assert_close(f"varlen seq {n}", out[cu_q[n]:cu_q[n + 1]].permute(1, 0, 2)[None], r64.out, low.out)


@in_process
def test_varlen_bad_offsets():
    q = torch.randn(10, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        flash_attention_varlen(q, q, q, torch.tensor([0, 4, 9]), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="same number of sequences"):
        flash_attention_varlen(q, q, q, torch.tensor([0, 4, 10]), torch.tensor([0, 10]), causal=True)


# -- refusals, options, auto ------------------------------------------------------------------------


@in_process
@pytest.mark.parametrize("kw,dtype,d,word", [
    ({"dropout_p": 0.1}, torch.float32, 16, "dropout"),
    ({}, torch.float64, 16, "float64"),
    ({}, torch.float32, 257, "head_dim 257"),
])
def test_refusals_name_the_feature(kw, dtype, d, word):
    q, k, v = make_qkv(1, 2, 2, 5, 5, d, 16, dtype)
    with pytest.raises(BackendUnavailable, match=word):
        selfattn.attention(q, k, v, backend="triton", **kw)


@in_process
def test_float_mask_gradient_refused():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16, 16, torch.float32)
    m = torch.randn(5, 5, requires_grad=True)
    q.requires_grad_()
    with pytest.raises(BackendUnavailable, match="float mask"):
        selfattn.attention(q, k, v, mask=m, backend="triton")


@in_process
def test_option_validation():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16, 16, torch.float32)
    with pytest.raises(TypeError, match="deterministic"):
        flash_attention(q, k, v, deterministic=1)
    with pytest.raises(ValueError, match="num_splits"):
        flash_attention(q, k, v, num_splits=0)
    with pytest.raises(ValueError, match="num_splits"):  # the same check through attention()
        selfattn.attention(q, k, v, backend="triton", backend_options={"num_splits": 0})
    with pytest.raises(BackendUnavailable, match="block_size"):  # an option this backend does not know
        selfattn.attention(q, k, v, backend="triton", backend_options={"block_size": 64})


@in_process
def test_backend_options_reach_the_kernel():
    # attention(backend_options=...) is the same call as flash_attention(...): bit for bit
    q, k, v = make_qkv(1, 2, 2, 3, 40, 16, 16, torch.float32)
    a = selfattn.attention(q, k, v, backend="triton", backend_options={"num_splits": 3})
    b = flash_attention(q, k, v, num_splits=3)
    c = flash_attention(q, k, v, num_splits=1)
    assert torch.equal(a, b) and not torch.equal(a, c)  # three slices merged round differently from one pass


@in_process
def test_observers_see_flash_attention_calls():
    seen = []
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16, 16, torch.float32)
    with selfattn.functional.observe(lambda *a: seen.append(a[3])):
        flash_attention(q, k, v, causal=True)
        flash_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                               torch.tensor([0, 5]), torch.tensor([0, 5]))
    assert len(seen) == 2 and seen[0]["causal"] is True


@in_process
def test_auto_never_prefers_the_interpreter():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16, 16, torch.float32)
    req = _request(q, k, v, return_stats=True, softcap=2.0)
    assert selfattn.backends.get("triton").unsupported(q, k, v, req) is None
    assert selfattn.backends.choose("auto", q, k, v, req).name != "triton"


@in_process
def test_custom_ops_fake_tensors():
    # torch.library: schema and fake (meta) implementations agree with the real kernels
    q, k, v = make_qkv(1, 2, 1, 9, 12, 16, 8, torch.float32)
    req = _request(q, k, v, mask=masks.padding([7]), window=(4, 0))
    t, i = triton_gpu.kernel_mask(req, 16, 16).to_lists()
    fwd_args = (q, k, v, t, i, 0.25, 0.0, True, 1, 1, True)
    torch.library.opcheck(torch.ops.selfattn.triton_fwd.default, fwd_args, test_utils=("test_schema", "test_faketensor"))
    out, rs = torch.ops.selfattn.triton_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), q, k, v, out, rs[1], rs[2], t, i, t, i, 0.25, 0.0)
    torch.library.opcheck(torch.ops.selfattn.triton_bwd.default, bwd_args, test_utils=("test_schema", "test_faketensor"))


@in_process
def test_torch_compile():
    # the kernels are custom ops (opaque nodes with fake implementations); lowering the mask runs
    # outside the graph (kernel_mask is torch.compiler.disable'd: one graph break per call)
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, 16, torch.float32)
    fn = torch.compile(lambda a, b, c: flash_attention(a, b, c, causal=True), backend="aot_eager")
    got = fn(q, k, v)
    assert torch.equal(got, flash_attention(q, k, v, causal=True))


@in_process
def test_empty_sequences_handled_before_the_kernel():
    q, k, v = make_qkv(1, 2, 2, 5, 0, 16, 16, torch.float32)
    out, st = flash_attention(q, k, v, return_stats=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool((st.lse == float("-inf")).all())


@in_process
def test_kernels_compile_for_sm90():
    # the GPU build of every kernel, compiled offline with triton's bundled ptxas (no GPU needed):
    # catches what the interpreter is lenient about (types across branches, constexpr use)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "benchmarks", "bench_gpu.py"), "--compile", "--quick"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if res.returncode == 3:
        pytest.skip(f"offline compile needs triton's CUDA backend: {res.stdout.strip()[-300:]}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "compiled" in res.stdout
