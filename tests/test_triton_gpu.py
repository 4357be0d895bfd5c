"""The `triton` backend on a real CUDA GPU: the interpreter suite's checks on larger shapes.

Runs only where CUDA exists (the whole module is skipped otherwise, saying so). Autotuning is
switched off here (SELFATTN_TRITON_AUTOTUNE=0: the first configuration that fits) so that each
kernel variant compiles once; benchmarks/bench_gpu.py autotunes. Run on a GPU machine with
``benchmarks/gpu_check.sh``. Same tolerances as everywhere (tests/tolerance.py).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available: the triton GPU tests need an NVIDIA GPU "
                "(tests/test_triton_interpret.py covers the kernels on CPU)", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

import selfattn  # noqa: E402
from selfattn import masks, reference  # noqa: E402
from selfattn.backends import triton_gpu  # noqa: E402
from selfattn.gpu import flash_attention, flash_attention_varlen  # noqa: E402

from test_triton_interpret import check_case, make_qkv, mask_kwargs  # noqa: E402
from tolerance import assert_close  # noqa: E402

DEV = "cuda"


@pytest.fixture(autouse=True, scope="module")
def _one_config():
    old = os.environ.get("SELFATTN_TRITON_AUTOTUNE")
    os.environ["SELFATTN_TRITON_AUTOTUNE"] = "0"
    yield
    if old is None:
        os.environ.pop("SELFATTN_TRITON_AUTOTUNE", None)
    else:
        os.environ["SELFATTN_TRITON_AUTOTUNE"] = old


def _on_device(kw):
    # dense masks are built on the CPU by mask_kwargs: move them next to the inputs
    def move(m):
        if isinstance(m, torch.Tensor):
            return m.to(DEV)
        if isinstance(m, masks.Dense):
            return masks.dense(m.tensor.to(DEV))
        if isinstance(m, masks.KeyPadding):
            return masks.key_padding(m.keep.to(DEV))
        if isinstance(m, masks.Padding):
            return masks.padding(m.kv_lengths.to(DEV), None if m.q_lengths is None else m.q_lengths.to(DEV))
        if isinstance(m, masks.Documents):
            return masks.documents(m.kv_ids.to(DEV), None if m.q_ids is None else m.q_ids.to(DEV))
        if isinstance(m, masks.And):
            return masks.And(*(move(p) for p in m.parts))
        return m
    return {k: move(v) if k == "mask" else (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def test_compiled_kernels_are_used():
    kern = triton_gpu._kernels_for(torch.device(DEV))
    assert not kern.INTERPRET
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, 64, torch.bfloat16, device=DEV)
    req_backend = selfattn.backends.choose("auto", q, k, v, _request(q, k, v, causal=True))
    assert req_backend.name == "triton"  # auto prefers it on CUDA


def _request(q, k, v, **kw):
    from conftest import request_for
    return request_for(q, k, v, **kw)


# (B, Hq, Hkv, Lq, Lk, D, Dv)
SHAPES = [
    (2, 8, 8, 1024, 1024, 128, 128),
    (2, 8, 2, 300, 1000, 64, 64),  # GQA, Lq < Lk
    (1, 4, 1, 777, 333, 96, 96),  # MQA, Lq > Lk, head dim padded to 128
    (1, 4, 4, 257, 257, 256, 256),
    (1, 4, 2, 200, 200, 59, 24),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}/{}-L{}x{}-D{}-Dv{}".format(*s))
def test_shapes_bf16_causal(shape):
    q, k, v = make_qkv(*shape, torch.bfloat16, device=DEV)
    check_case(f"{shape}", q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_dense_no_mask(dtype):
    q, k, v = make_qkv(*SHAPES[0], dtype, device=DEV)
    check_case("dense", q, k, v)


GPU_MASKS = ["window_left_right", "padding_kv_q", "documents_causal", "documents_unsorted", "dense_bool",
             "float_causal_padding", "key_padding_causal", "left_padded", "varlen_window",
             "positions_unsorted_window", "function_heads_causal", "function_sliding_global"]  # each kernel switch at least once


@pytest.mark.parametrize("case", GPU_MASKS)
def test_masks(case):
    b, hq, hkv, lq, lk, d = 2, 4, 2, 600, 700, 64
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, d, torch.bfloat16, device=DEV)
    check_case(case, q, k, v, **_on_device(mask_kwargs(case, b, hq, lq, lk)))


def test_sliding_window_long():
    q, k, v = make_qkv(1, 4, 4, 4096, 4096, 128, 128, torch.bfloat16, device=DEV)
    check_case("window 256", q, k, v, window=256)


@pytest.mark.parametrize("opts", [dict(softcap=30.0, causal=True), dict(scale=0.3, window=(64, 64))],
                         ids=["softcap", "scale_window"])
def test_options(opts):
    q, k, v = make_qkv(2, 4, 4, 512, 512, 128, 128, torch.bfloat16, device=DEV, magnitude=2.0)
    check_case(str(opts), q, k, v, **opts)


def test_float32_ieee():
    q, k, v = make_qkv(1, 4, 2, 300, 400, 64, 64, torch.float32, device=DEV)
    check_case("float32", q, k, v, causal=True)


@pytest.mark.parametrize("splits", [None, 7], ids=["auto_splits", "seven_splits"])
def test_decode_split_kv(splits):
    q, k, v = make_qkv(4, 32, 8, 1, 8192, 128, 128, torch.bfloat16, device=DEV)
    kern = triton_gpu._kernels_for(torch.device(DEV))
    if splits is None:
        assert kern.plan_splits(4, 32, kern.plan_pack(32, 8, 1), 1, 8192, torch.device(DEV)) > 1  # the heuristic does split here
    check_case("decode", q, k, v, grads=False, num_splits=splits)
    check_case("decode padded", q, k, v, grads=False, num_splits=splits, mask=masks.padding([8192, 5000, 17, 0]))


def test_deterministic_backward_is_reproducible():
    q, k, v = make_qkv(2, 8, 2, 1024, 1024, 128, 128, torch.bfloat16, device=DEV)
    check_case("deterministic", q, k, v, causal=True, deterministic=True)
    grads = []
    for _ in range(2):
        leafs = [t.clone().requires_grad_() for t in (q, k, v)]
        flash_attention(*leafs, causal=True, deterministic=True).float().sum().backward()
        grads.append([t.grad for t in leafs])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_varlen():
    lens = [100, 1, 513, 0, 300]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=DEV)
    t = int(cu[-1])
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(t, 8, 64, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
    out = flash_attention_varlen(q, k, v, cu, cu, causal=True)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > s:
            sl = [x[s:e].permute(1, 0, 2)[None] for x in (q, k, v)]  # (1, H, L, D)
            r64, _ = reference.attention(*sl, mask=masks.causal())
            low, _ = reference.attention(*sl, mask=masks.causal(), upcast=False)
            assert_close(f"varlen [{s}:{e}]", out[s:e].permute(1, 0, 2)[None], r64, low)


def test_memory_is_linear_in_length():
    # fused forward + backward allocate O(L): outputs, gradients and per-row statistics only
    b, h, L, d = 1, 8, 16384, 64
    q, k, v = (t.requires_grad_() for t in make_qkv(b, h, h, L, L, d, d, torch.bfloat16, device=DEV))
    out = flash_attention(q, k, v, causal=True)  # compile outside the measured region
    out.sum().backward()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = flash_attention(q, k, v, causal=True)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    per_row = b * h * L
    # a few (L, D) tensors (the float32 output the backward reads for Delta among them) and float32 row vectors
    linear = per_row * (d * 2 * 10 + 4 * 8)
    quadratic = per_row * L * 2  # one bf16 L x L score matrix per head
    print(f"extra {extra / 2**20:.1f} MiB, linear budget {linear / 2**20:.1f} MiB, L^2 would be {quadratic / 2**20:.0f} MiB")
    assert extra <= linear


def test_alibi_sinks_positions():
    b, h, L, d = 2, 8, 700, 64
    q, k, v = make_qkv(b, h, 2, L, L, d, d, torch.bfloat16, device=DEV)
    g = torch.Generator().manual_seed(0)
    layout = masks.left_padded(torch.tensor([L, 333]), L)
    kw = dict(alibi_slopes=torch.rand(h, generator=g).to(DEV), sinks=torch.randn(h, generator=g).to(DEV), causal=True,
              mask=masks.key_padding(layout.mask.keep.to(DEV)), q_positions=layout.q_positions.to(DEV),
              kv_positions=layout.kv_positions.to(DEV))
    check_case("alibi sinks left-padded", q, k, v, **kw)


def test_bf16_gradients_exactly_zero():
    # one key per row: dQ = dK = 0 exactly (issue 12's interpreter defect, here on the GPU's rounding)
    q, k, v = make_qkv(1, 1, 1, 6, 1, 1, 60, torch.bfloat16, device=DEV, magnitude=3.0, seed=1)
    leafs = [t.clone().requires_grad_() for t in (q, k, v)]
    flash_attention(*leafs).float().pow(2).sum().backward()
    assert torch.equal(leafs[0].grad, torch.zeros_like(q)) and torch.equal(leafs[1].grad, torch.zeros_like(k))
