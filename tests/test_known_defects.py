"""Known accuracy defects, each pinned to the requests that show it, as strict xfails.

A case here fails today against STYLE rule 6 (2x the low-precision twin's error + floor); when the
cause is fixed the case passes, the strict mark turns that into a failure, and the mark must go.
Found on 2026-12-01 with a random sweep (q and k scaled by 0.1-30, Lq/Lk 1-24, head dims 1-59).
"""

from __future__ import annotations

import pytest
import torch

import selfattn

from _oracle import compare, reference_pair


def _sweep_request(seed: int, heads: int = 2):
    # the sweep's generator: one query head pair sharing a kv head (or one head), scaled q and k
    torch.manual_seed(seed)
    lq, lk = torch.randint(1, 25, (2,)).tolist()
    d = [1, 3, 8, 16, 59][seed % 5]
    mag = [0.1, 1.0, 4.0, 30.0][seed % 4]
    q = (torch.randn(1, heads, lq, d, dtype=torch.float64) * mag).float()
    k = (torch.randn(1, max(1, heads // 2), lk, d, dtype=torch.float64) * mag).float()
    v = torch.randn(1, max(1, heads // 2), lk, d)
    return q, k, v


@pytest.mark.xfail(strict=True, reason="cpu float32 forward at large logits (q, k x4-x30): 1.3-2.2x rule 6; "
                                       "math holds 0.45-0.55x (same at 6dcd224: cpu_fwd)")
@pytest.mark.parametrize("seed", [26, 123, 243])  # (Lq, Lk, D, scale of q and k): (6,15,3,x4), (23,14,16,x30), (24,18,16,x30)
def test_cpu_float32_forward_at_large_logits(seed):
    q, k, v = _sweep_request(seed)
    out, stats = selfattn.attention(q, k, v, backend="cpu", return_stats=True)
    compare(f"cpu seed {seed}", reference_pair(q, k, v), out, dtype=torch.float32)


def test_math_holds_the_same_requests():
    # the requests above are not beyond float32: the unfused path is within the rule on each
    for seed in (26, 123, 243):
        q, k, v = _sweep_request(seed)
        compare(f"math seed {seed}", reference_pair(q, k, v), selfattn.attention(q, k, v, backend="math"),
                dtype=torch.float32)


@pytest.mark.xfail(strict=True, reason="torch's own SDPA (its flash CPU kernel) in float32: 3.3x the twin on "
                                       "this request; the sdpa backend passes torch's result through")
def test_sdpa_float32_outside_the_rule():
    torch.manual_seed(0)
    q = (torch.randn(1, 1, 6, 8, dtype=torch.float64) * 4.0).float()
    k = (torch.randn(1, 1, 8, 8, dtype=torch.float64) * 4.0).float()
    v = torch.randn(1, 1, 8, 8)
    compare("sdpa float32", reference_pair(q, k, v), selfattn.attention(q, k, v, backend="sdpa"), dtype=torch.float32)
