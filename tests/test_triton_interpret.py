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
rule 6 (tests/tolerance.py): factor 2 forward and statistics, factor 3 gradients, against the
float64 reference and its low-precision twin.
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
from selfattn import masks, reference  # noqa: E402
from selfattn.backends import BackendUnavailable  # noqa: E402
from selfattn.backends import triton_gpu  # noqa: E402
from selfattn.functional import _resolve_mask  # noqa: E402

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


def _reference(q, k, v, g, *, mask, scale, softcap, upcast, grads):
    leafs = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    if upcast:
        leafs = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    out, st = reference.attention(*leafs, mask=mask, scale=scale, softcap=softcap, upcast=upcast)
    if not grads:
        return out.detach(), st, None
    out.backward(g.to(out.dtype))
    return out.detach(), st, [t.grad for t in leafs]


def check_case(name, q, k, v, *, grads=True, deterministic=False, num_splits=None, **kw):
    """Run flash_attention (with stats and, if ``grads``, a backward) and hold every output to
    the reference: out and stats factor 2, gradients factor 3, fully-masked rows exact."""
    leafs = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    out, st = triton_gpu.flash_attention(*leafs, return_stats=True, deterministic=deterministic,
                                         num_splits=num_splits, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape[:-1] + (v.shape[-1],)
    mask = _resolve_mask(kw.get("mask"), kw.get("causal", False), kw.get("window"))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out)
    args = dict(mask=mask, scale=kw.get("scale"), softcap=kw.get("softcap"), grads=grads)
    out64, st64, gr64 = _reference(q, k, v, g, upcast=True, **args)
    low, st_low, gr_low = _reference(q, k, v, g, upcast=False, **args)
    assert_close(f"{name} out", out, out64, low)
    for field in ("lse", "max_logit", "entropy"):
        got = getattr(st, field)
        assert got.dtype == torch.float32, f"{name} {field}: dtype {got.dtype}"
        assert_close(f"{name} {field}", got, getattr(st64, field), getattr(st_low, field))
    dead = st64.lse == float("-inf")  # (B, Hq, Lq) fully-masked rows
    if dead.any():
        assert torch.equal(out.detach()[dead], torch.zeros_like(out.detach()[dead])), f"{name}: fully-masked rows not 0"
        assert bool((st.lse[dead] == float("-inf")).all()) and bool((st.max_logit[dead] == float("-inf")).all())
        assert bool((st.entropy[dead] == 0).all()), f"{name}: entropy of fully-masked rows not 0"
    if grads:
        out.backward(g)
        for t, r64, rlow, nm in zip(leafs, gr64, gr_low, ("dq", "dk", "dv")):
            assert not torch.isnan(t.grad).any(), f"{name} {nm}: NaN"
            assert_close(f"{name} {nm}", t.grad, r64, rlow, factor=3.0)
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
    }[case]


MASK_CASES = ["causal", "window_left", "window_left_right", "window_zero", "padding_kv", "padding_kv_q",
              "padding_zero", "documents", "documents_q_ids", "documents_causal", "documents_unsorted",
              "dense_bool", "dense_bool_heads", "dense_float", "dense_float_row", "causal_padding",
              "window_documents", "float_causal_padding", "bool_window_causal", "two_windows_two_paddings"]


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
    (2, 4, 2, 33, 47, 16, 16),  # GQA, Lq < Lk
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
    q, k, v = make_qkv(2, 4, 2, 29, 45, 32, 32, dtype)
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
    b, hq, hkv, lq, lk, d = 2, 2, 1, 36, 44, 16
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
    clean = triton_gpu.flash_attention(q, k, v, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[..., 32:, :] = float("nan")
    v2[..., 32:, :] = float("nan")
    dirty = triton_gpu.flash_attention(q, k2, v2, **kw)
    assert torch.equal(dirty[..., :16, :], clean[..., :16, :])


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
    out, st = triton_gpu.flash_attention(q, k, v, return_stats=True)
    bad = torch.isnan(out).any(-1)  # (B, H, Lq)
    expect = torch.zeros_like(bad)
    expect[0, 1, 7] = True
    assert torch.equal(bad, expect)
    assert torch.isnan(st.lse[0, 1, 7]) and torch.isfinite(st.lse.masked_fill(expect, 0)).all()


# -- backward options, split-KV, varlen ------------------------------------------------------------


@in_process
@pytest.mark.parametrize("case", ["causal", "documents_causal", "dense_bool"])
def test_deterministic_backward(case):
    b, hq, hkv, lq, lk, d = 2, 4, 2, 33, 40, 16
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, d, torch.float32)
    kw = mask_kwargs(case, b, hq, lq, lk)
    check_case(case, q, k, v, deterministic=True, **kw)
    grads = []
    for _ in range(2):
        leafs = [t.clone().requires_grad_() for t in (q, k, v)]
        triton_gpu.flash_attention(*leafs, deterministic=True, **kw).sum().backward()
        grads.append([t.grad for t in leafs])
    assert all(torch.equal(a, b) for a, b in zip(*grads)), "deterministic gradients differ between runs"


@in_process
@pytest.mark.parametrize("shape,splits,extra", [
    ((1, 8, 2, 1, 120, 32, 32), 4, {}),  # decode: GQA group of 4 packed into one tile, 4 KV splits
    ((2, 4, 4, 3, 90, 16, 24), 3, {"causal": True}),
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
    assert triton_gpu._kernels_for(torch.device("cpu")).plan_splits(1, 32, 8, 1, 32768, torch.device("cpu")) == (4, 1)


@in_process
def test_varlen_matches_per_sequence_attention():
    torch.manual_seed(0)
    lens = [5, 0, 17, 9]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    total = int(cu[-1])
    q, k, v = (torch.randn(total, 4, 16) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA
    out, st = triton_gpu.flash_attention_varlen(q, k, v, cu, cu, causal=True, return_stats=True)
    assert out.shape == (total, 4, 16) and st.lse.shape == (4, total)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if s == e:
            continue
        sl = [t[s:e].permute(1, 0, 2)[None] for t in (q, k, v)]  # (1, H, L, D)
        r64, st64 = reference.attention(*sl, mask=masks.causal())
        low, st_low = reference.attention(*sl, mask=masks.causal(), upcast=False)
        assert_close("varlen out", out[s:e].permute(1, 0, 2)[None], r64, low)
        assert_close("varlen lse", st.lse[:, s:e][None], st64.lse, st_low.lse)


@in_process
def test_varlen_bad_offsets():
    q = torch.randn(10, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        triton_gpu.flash_attention_varlen(q, q, q, torch.tensor([0, 4, 9]), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="cu_seqlens_q == cu_seqlens_k"):
        triton_gpu.flash_attention_varlen(q, q, q, torch.tensor([0, 4, 10]), torch.tensor([0, 6, 10]), causal=True)


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
        triton_gpu.flash_attention(q, k, v, deterministic=1)
    with pytest.raises(ValueError, match="num_splits"):
        triton_gpu.flash_attention(q, k, v, num_splits=0)


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
    fwd_args = (q, k, v, torch.tensor([7], dtype=torch.int32), None, None, None, 0.25, 0.0, 4, 0, True, 0)
    torch.library.opcheck(torch.ops.selfattn.triton_fwd.default, fwd_args, test_utils=("test_schema", "test_faketensor"))
    out, lse, row_m, row_l, _, _ = torch.ops.selfattn.triton_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), q, k, v, out, row_m, row_l, torch.tensor([7], dtype=torch.int32), None, None, None, None,
                0.25, 0.0, 4, 0, True)
    torch.library.opcheck(torch.ops.selfattn.triton_bwd.default, bwd_args, test_utils=("test_schema", "test_faketensor"))


@in_process
def test_torch_compile_traces_without_graph_breaks():
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, 16, torch.float32)
    fn = torch.compile(lambda a, b, c: triton_gpu.flash_attention(a, b, c, causal=True), backend="aot_eager", fullgraph=True)
    got = fn(q, k, v)
    assert torch.equal(got, triton_gpu.flash_attention(q, k, v, causal=True))


@in_process
def test_empty_sequences_handled_before_the_kernel():
    q, k, v = make_qkv(1, 2, 2, 5, 0, 16, 16, torch.float32)
    out, st = triton_gpu.flash_attention(q, k, v, return_stats=True)
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
