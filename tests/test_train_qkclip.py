"""selfattn train --qk-clip TAU: each head's max logit is brought back to tau after every step (MuonClip).

The clip itself is checked against an independent float64 computation of every head's logits
(q . k * scale after RoPE), for multi-head and grouped-query layers. The training loop is checked
on one fixed batch (so the step that measured the max logit and the next forward see the same
data) with a learning rate small enough that one update moves the logits by less than 1e-3:
the unclipped run stays above tau, the clipped run is at tau (within 1e-3) from its second step on.
"""

from __future__ import annotations

import math

import pytest
import torch

from selfattn.layers import MultiHeadAttention, apply_rope, rope_cos_sin
from selfattn.training import RecallTask, make_config, train
from selfattn.training.data import TRAIN, generator
from selfattn.training.qkclip import clip_attention, factors


@torch.no_grad()
def _head_max_logits(attn: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """(H,) each query head's largest causal logit over the batch, in float64, from the weights directly."""
    B, L, E = x.shape
    Dh, H, Hkv = attn.head_dim, attn.num_heads, attn.num_kv_heads
    x = x.double()
    q = (x @ attn.q_proj.weight.double().T).view(B, L, H, Dh).transpose(1, 2)  # (B, H, L, Dh)
    k = (x @ attn.k_proj.weight.double().T).view(B, L, Hkv, Dh).transpose(1, 2)  # (B, Hkv, L, Dh)
    if attn.q_proj.bias is not None:
        q = q + attn.q_proj.bias.double().view(1, H, 1, Dh)
        k = k + attn.k_proj.bias.double().view(1, Hkv, 1, Dh)
    cos, sin = rope_cos_sin(torch.arange(L), Dh, attn.rope_base, torch.float64)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, L, Dh)
    s = q @ k.transpose(-2, -1) / math.sqrt(Dh)  # (B, H, L, L)
    s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), -math.inf)
    return s.amax(dim=(0, 2, 3))  # (H,)


@pytest.mark.parametrize("heads, kv_heads, bias", [(4, 4, False), (6, 2, True), (4, 1, False)])
def test_clip_brings_each_exceeding_head_to_tau(heads, kv_heads, bias):
    torch.manual_seed(heads + kv_heads)
    attn = MultiHeadAttention(8 * heads, heads, num_kv_heads=kv_heads, rope=True, bias=bias).double()
    with torch.no_grad():  # heads of very different sizes: some far above tau, some below
        for lin in (attn.q_proj, attn.k_proj):
            lin.weight.mul_(torch.linspace(0.5, 3.0, lin.weight.shape[0], dtype=torch.float64)[:, None])
            if bias:
                lin.bias.normal_(0, 0.3)
    x = torch.randn(3, 17, 8 * heads, dtype=torch.float64)
    before = _head_max_logits(attn, x)  # (H,)
    tau = float(before.median())
    over = before > tau
    assert over.any() and (~over).any(), before
    n = clip_attention(attn, before, tau)
    after = _head_max_logits(attn, x)
    print(f"tau {tau:.4f}\nbefore {before.tolist()}\nafter  {after.tolist()}")
    assert n == int(over.sum())
    G = heads // kv_heads
    for g in range(kv_heads):
        grp = slice(g * G, (g + 1) * G)
        b, a, o = before[grp], after[grp], over[grp]
        if not o.any():  # nothing in this group exceeded: untouched
            assert torch.equal(a, b)
            continue
        # every head that exceeded ends at or below tau; the group's largest exactly at tau
        assert (a[o] <= tau * (1 + 1e-12)).all(), (g, a, tau)
        top = int(b.argmax())
        assert abs(a[top].item() - tau) <= 1e-12 * tau
        # no logit grows; heads of the group that did not exceed shrink only by the shared key's factor
        assert (a <= b * (1 + 1e-12)).all()
        eta_g = tau / b.max().item()
        assert torch.allclose(a[~o], b[~o] * math.sqrt(eta_g), rtol=1e-12, atol=0)
    if G == 1:  # multi-head: exactly the paper's rule, min(S, tau) per head
        assert torch.allclose(after, before.clamp(max=tau), rtol=1e-12, atol=0)


def test_factors_never_scale_up():
    s = torch.tensor([1.0, 9.0, 3.0, 4.0, float("nan"), 2.0])
    c_q, c_k = factors(s, 2.5, 3)
    assert (c_q <= 1).all() and (c_k <= 1).all()
    assert c_k.tolist() == pytest.approx([math.sqrt(2.5 / 9.0), math.sqrt(2.5 / 4.0), 1.0])
    assert c_q[4] == 1.0  # a NaN statistic clips nothing


def _fixed_batch(monkeypatch):
    # the same batch every step: what the step measured is what the next step's forward sees
    monkeypatch.setattr(RecallTask, "batch", lambda self, b, seed, step: self.sample(b, generator(seed, TRAIN, 0)))


def _tops(res):
    return torch.tensor([[h["max_logit_max"] for layer in r["heads"] for h in layer] for r in res.rows])  # (steps, layers*H)


def test_training_holds_every_head_at_tau(tmp_path, monkeypatch):
    _fixed_batch(monkeypatch)
    base = dict(pairs=12, keys=8, values=8, batch=8, steps=8, warmup=0, lr=1e-5, stats_every=1, eval_every=1000,
                eval_size=8, target_acc=None, seed=0)
    free = train(make_config(dict(base, out=str(tmp_path / "free"))))
    tau = 0.8 * float(_tops(free)[0].max())  # the largest head starts above tau
    clipped = train(make_config(dict(base, qk_clip=tau, out=str(tmp_path / "clip"))))
    t_free, t_clip = _tops(free), _tops(clipped)
    print(f"tau {tau:.4f}\nwithout clip (largest head per step): {t_free.amax(1).tolist()}\n"
          f"with clip: {t_clip.amax(1).tolist()}")
    assert (t_free.amax(1) > 1.2 * tau).all()  # without the clip the largest head stays well above tau
    assert torch.equal(t_clip[0], t_free[0])  # the first forward comes before any clip
    # from the second step on no head exceeds tau by more than one update's growth (lr 1e-5: < 1e-3)
    assert (t_clip[1:] <= tau * (1 + 1e-3)).all(), t_clip
    assert (t_clip[1:].amax(1) >= tau * (1 - 1e-3)).all()  # and the clipped heads sit at tau, not below it
    assert all(r["qk_clip"] == tau for r in clipped.rows)
    assert [r["heads_clipped"] for r in clipped.rows][0] == int((t_free[0] > tau).sum())  # counted in the log
    assert (tmp_path / "clip" / "training.png").stat().st_size > 0
    header = (tmp_path / "clip" / "log.csv").read_text().splitlines()[0]
    assert "L0H0_max_logit_max" in header
