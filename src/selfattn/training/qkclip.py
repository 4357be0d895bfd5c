"""QK-clip (MuonClip, Kimi K2): keep every head's largest attention logit at or below tau.

After each optimizer step, for every head h whose largest logit S_h over the step's batch
exceeded tau, the query and key projections of that head are scaled so that the product
q . k shrinks by eta_h = tau / S_h, half on each side (the paper's alpha = 0.5)::

    W_q[h] <- sqrt(eta_h) W_q[h]        W_k[h] <- sqrt(eta_h) W_k[h]

S_h is the ``max_logit`` the attention kernels already return with the step's forward pass
(``return_stats=True``): no extra pass. Over processes it is all-reduced with MAX, so every rank
applies the same scaling and the replicas stay identical.

Grouped-query attention (the paper's model uses MLA; it does not say): a key head shared by a
group of query heads is scaled once, by sqrt(eta_g) with eta_g = the smallest eta of its group
(the group's largest logit); each query head h of the group by min(1, eta_h / sqrt(eta_g)). Then
every head's logits shrink by min(sqrt(eta_g), eta_h) <= eta_h: each head that exceeded tau is
brought to tau or below (the group's largest to tau), no weight is ever scaled up, and a head of
the group that did not exceed tau shrinks by sqrt(eta_g) with the shared key. With one query
head per key head this is the paper's rule.

RoPE rotates q and k by position-dependent orthogonal matrices, so scaling a head's projection
rows scales its logits by the same factor. The bound holds for the batch the statistics came
from, on the weights before the step's update; the update itself can raise logits a little
before the next forward pass (the paper has the same order: clip after the update).
"""

from __future__ import annotations

import torch


def head_max_logits(stats_list, world) -> torch.Tensor:
    """(layers, H) float64: each head's largest logit over this step's batch, MAX over all ranks."""
    top = torch.stack([s.max_logit.detach().double().amax(dim=(0, 2)).cpu() for s in stats_list])  # (layers, H)
    return world.max(top.clone())


def factors(s_max: torch.Tensor, tau: float, kv_heads: int) -> tuple:
    """(query factors (H,), key factors (Hkv,)) for one layer whose heads' largest logits are ``s_max`` (H,)."""
    H = s_max.shape[0]
    s = s_max.double()
    eta = torch.where(s > tau, tau / s, torch.ones_like(s))  # (H,) 1 for heads within tau (and NaN)
    eta_g = eta.view(kv_heads, H // kv_heads).amin(dim=1)  # (Hkv,) the group's largest logit decides its key
    c_k = eta_g.sqrt()  # (Hkv,)
    c_q = (eta.view(kv_heads, -1) / c_k[:, None]).clamp(max=1.0).reshape(H)  # (H,)
    return c_q, c_k


@torch.no_grad()
def clip_attention(attn, s_max: torch.Tensor, tau: float) -> int:
    """Scale one :class:`selfattn.layers.MultiHeadAttention`'s q/k projections in place; returns heads clipped."""
    if attn.qk_norm:
        raise ValueError("qk_clip: a layer with QK-norm normalises q and k after the projection, so scaling it does nothing")
    c_q, c_k = factors(s_max, tau, attn.num_kv_heads)
    n = int((s_max > tau).sum())  # heads that exceeded tau
    if n == 0:
        return 0
    D = attn.head_dim
    for lin, c in ((attn.q_proj, c_q), (attn.k_proj, c_k)):
        rows = c.to(lin.weight.dtype).repeat_interleave(D).to(lin.weight.device)  # (heads * D,) one factor per output row
        lin.weight.mul_(rows[:, None])
        if lin.bias is not None:
            lin.bias.mul_(rows)
    return n


def clip(model, top: torch.Tensor, tau: float) -> int:
    """QK-clip every block of a :class:`selfattn.model.Transformer`; ``top`` from :func:`head_max_logits`."""
    return sum(clip_attention(block.attn, top[i], tau) for i, block in enumerate(model.blocks))
