"""Parity with torch.nn.functional.scaled_dot_product_attention wherever torch expresses the same request."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import selfattn
from selfattn import masks

from _oracle import compare, reference_pair
from conftest import BACKENDS, qkv, run_backend

pytestmark = pytest.mark.filterwarnings("ignore:Lower right causal bias")


def _case(name, b, hq, lq, lk, dtype):
    """(torch SDPA kwargs, selfattn kwargs) expressing one request both ways."""
    if name == "plain":
        return {}, {}
    if name == "is_causal":
        return {"is_causal": True}, {"causal": True}
    if name == "causal_lower_right":
        return {"attn_mask": causal_lower_right(lq, lk)}, {"causal": True}
    if name == "bool_mask":
        m = torch.rand(b, 1, lq, lk) < 0.6
        return {"attn_mask": m}, {"mask": m}
    if name == "bool_mask_dead_rows":
        m = torch.rand(b, hq, lq, lk) < 0.6
        m[:, :, ::3] = False
        return {"attn_mask": m}, {"mask": m}
    if name == "float_mask":
        m = torch.randn(1, hq, lq, lk, dtype=dtype)
        return {"attn_mask": m}, {"mask": m}
    if name == "float_mask_neg_inf":
        m = torch.randn(lq, lk, dtype=dtype).masked_fill(torch.rand(lq, lk) < 0.4, float("-inf"))
        return {"attn_mask": m}, {"mask": m}
    if name == "scale":
        return {"scale": 0.21}, {"scale": 0.21}
    raise KeyError(name)


CASES = ["plain", "is_causal", "causal_lower_right", "bool_mask", "bool_mask_dead_rows", "float_mask", "float_mask_neg_inf", "scale"]
# (B, Hq, Hkv, Lq, Lk, D, Dv)
SHAPES = [(2, 4, 4, 33, 33, 32, 32), (1, 4, 2, 17, 45, 59, 16), (2, 6, 2, 45, 17, 16, 24), (1, 2, 1, 1, 97, 64, 64)]


def _sid(s):
    return f"B{s[0]}-H{s[1]}/{s[2]}-L{s[3]}x{s[4]}-D{s[5]}-Dv{s[6]}"


# torch's is_causal is top-left aligned, so it expresses our causal mask only when Lq == Lk
PARAMS = [(s, c) for s in SHAPES for c in CASES if not (c == "is_causal" and s[3] != s[4])]


@pytest.mark.parametrize("shape,case", PARAMS, ids=[f"{_sid(s)}-{c}" for s, c in PARAMS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_parity_with_torch_sdpa(shape, case, dtype):
    b, hq, hkv, lq, lk, d, dv = shape
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv, dtype=dtype)
    tkw, kw = _case(case, b, hq, lq, lk, dtype)
    torch_out = F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv, **tkw)
    pair = reference_pair(q, k, v, **kw)
    # torch and our reference mean the same thing ...
    compare(f"{case} torch", pair, torch_out, dtype=dtype)
    # ... and every backend agrees with both (fully-masked rows: exactly 0 everywhere)
    dead = (pair[0].out == 0).all(-1)
    for backend in BACKENDS:
        out = run_backend(backend, q, k, v, **kw)
        if out is None:
            continue  # a refusal its table predicts (checked by run_backend)
        compare(f"{case}[{backend}]", pair, out, dtype=dtype)
        assert torch.equal(out[dead], torch_out[dead])


@pytest.mark.parametrize("lq,lk", [(5, 9), (9, 5), (7, 7)])
def test_causal_means_lower_right(lq, lk):
    # selfattn's causal mask is torch's lower-right causal bias, for every Lq / Lk
    got = masks.causal().allowed(lq, lk)[0, 0]
    want = causal_lower_right(lq, lk)._materialize(device=torch.device("cpu"))
    assert torch.equal(got, want)


def test_gradient_parity_with_torch():
    # lower-right causal with GQA: torch's gradients, ours and the reference's agree
    q, k, v = qkv(1, 4, 2, 19, 27, 16, 8, requires_grad=True)
    do = torch.randn(1, 4, 19, 8)
    torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(19, 27), enable_gqa=True)
    tg = torch.autograd.grad(torch_out, (q, k, v), do)
    pair = reference_pair(q, k, v, do=do, causal=True)
    compare("torch", pair, grads=tg, dtype=q.dtype)
    for backend in BACKENDS:
        out = run_backend(backend, q, k, v, causal=True)
        if out is None:
            continue  # a refusal its table predicts (checked by run_backend)
        compare(backend, pair, grads=torch.autograd.grad(out, (q, k, v), do), dtype=q.dtype)


def test_error_parity_where_torch_raises():
    # we raise where torch raises, with a ValueError/TypeError that names the argument
    q, k, v = qkv(1, 4, 2, 5, 5, 8)
    bad = [
        ((q, k[..., :7], v), {}, ValueError, "head_dim"),
        ((q, k.double(), v), {}, TypeError, "dtype"),
        ((q[:, :3], k, v), {"enable_gqa": True}, ValueError, "multiple"),
        ((q, k, v), {"attn_mask": torch.ones(3, 3, dtype=torch.bool), "enable_gqa": True}, ValueError, "mask"),
    ]
    for args, tkw, exc, frag in bad:
        with pytest.raises(Exception):
            F.scaled_dot_product_attention(*args, **{"enable_gqa": True, **tkw})
        ours = {"mask": tkw["attn_mask"]} if "attn_mask" in tkw else {}
        with pytest.raises(exc, match=frag):
            selfattn.attention(*args, **ours)
