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
# its requests are ordinary tests in test_cpu_kernel.py (test_float32_forward_at_large_logits, ...); so is
# the decoding request (D 3, x30, 3 query rows: float64 scores in blocks of < 4 rows, cpu_flash._qk_split):
# test_cpu_kernel.test_float32_decoding_at_large_logits.


@pytest.mark.xfail(strict=True, reason="cpu float32 backward, D 3, q and k x30 (17 query rows: 64-row tiles): dq 1.5x, dk 4.1x the "
                                       "farthest float32 twin (dk 14.1x before the raw-units fix; forward within 0.34x). Cause: "
                                       "the float32 rounding of q.k in the tiles' scores. A numpy emulation of cpu_bwd's steps "
                                       "reproduces dk 4.03x with exactly rounded float32 q.k and gives 0.15x with float64 q.k; "
                                       "exact exponents, P, lse, dP or dS alone leave it at 4.0-4.3x. Blocks of < 4 rows take "
                                       "float64 scores (cpu_flash._qk_split); the tiles would need them too")
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
