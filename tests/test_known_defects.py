"""Known accuracy defects, each pinned to the requests that show it, as strict xfails.

A case here fails today against STYLE rule 6 (2x the low-precision twin's error + floor, 3x for
gradients); when the cause is fixed the case passes, the strict mark turns that into a failure, and the
mark must go. Found on 2026-12-01 with random sweeps (q and k scaled by 0.1-30, Lq/Lk 1-24, head dims
1-256).
"""

from __future__ import annotations

import pytest
import torch

import selfattn

from _oracle import compare, reference_pair
from test_cpu_kernel import _drawn  # a request as the random sweeps drew them


# The cpu float32 forward at large logits (q, k x4-x30) is no longer here: fixed (cpu_flash._raw_units),
# its requests are ordinary tests in test_cpu_kernel.py (test_float32_forward_at_large_logits, ...).


@pytest.mark.xfail(strict=True, reason="cpu float32, D 3, q and k x30, decoding (3 query rows): out 2.9x the farthest float32 "
                                       "twin (2.9x before the raw-units fix too): the second key's q.k rounds to float32 with "
                                       "5.5e-5 of error (exactly rounded: no float32 dot product does better) where all four "
                                       "float32 orders of the reference round luckily; would need q.k beyond float32")
def test_cpu_float32_decoding_at_large_logits():
    q, k, v, go = _drawn(1, 4, 2, 3, 70, 3, 3, 30.0, 1036)
    out, stats = selfattn.attention(q, k, v, backend="cpu", return_stats=True)
    compare("cpu decoding D3 x30", reference_pair(q, k, v), out, stats=stats, dtype=torch.float32)


@pytest.mark.xfail(strict=True, reason="cpu float32 backward, D 3, q and k x30: dq 1.5x, dk 4.1x the farthest float32 twin (dk 14.1x before "
                                       "the raw-units fix; forward within 0.34x); cause not isolated (dS = P (dP - delta) of "
                                       "nearly one-hot rows, P from float32 q.k)")
def test_cpu_float32_gradients_at_large_logits():
    q, k, v, go = _drawn(2, 4, 2, 17, 21, 3, 5, 30.0, 52312)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = selfattn.attention(*leaves, backend="cpu")
    grads = torch.autograd.grad(out, leaves, go)
    compare("cpu gradients D3 x30", reference_pair(q, k, v, do=go), out.detach(), grads=grads, dtype=torch.float32)


@pytest.mark.xfail(strict=True, reason="torch's own SDPA (its flash CPU kernel) in float32: 3.3x the twin on "
                                       "this request; the sdpa backend passes torch's result through")
def test_sdpa_float32_outside_the_rule():
    torch.manual_seed(0)
    q = (torch.randn(1, 1, 6, 8, dtype=torch.float64) * 4.0).float()
    k = (torch.randn(1, 1, 8, 8, dtype=torch.float64) * 4.0).float()
    v = torch.randn(1, 1, 8, 8)
    compare("sdpa float32", reference_pair(q, k, v), selfattn.attention(q, k, v, backend="sdpa"), dtype=torch.float32)
