"""Backend `math`: unfused torch ops, every feature, autograd through torch. Stores Lq x Lk."""

from __future__ import annotations

import torch

from ..stats import AttentionStats
from .base import Backend, Request


def math_attention(q, k, v, req: Request):
    acc = req.acc  # low precision accumulates in float32
    q, k, v = q.to(acc), k.to(acc), v.to(acc)  # (B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv)
    group = req.q_heads // req.kv_heads
    B, Hkv, Lk, D = k.shape
    Lq, Hq = q.shape[2], req.q_heads
    # GQA without copying K/V: fold the query-head group into the row dimension
    qg = q.reshape(B, Hkv, group * Lq, D)  # (B, Hkv, G*Lq, D)
    s = (qg @ k.transpose(-2, -1)).reshape(B, Hq, Lq, Lk) * req.scale  # (B, Hq, Lq, Lk)
    if req.softcap is not None:
        s = req.softcap * torch.tanh(s / req.softcap)
    g = req.geometry
    if req.alibi_slopes is not None:
        distance = (g.q_pos()[:, None, :, None] - g.kv_pos()[:, None, None, :]).abs().to(acc)  # (B|1, 1, Lq, Lk)
        s = s - req.alibi_slopes.to(acc)[:, :, None, None] * distance  # (B, Hq, Lq, Lk)
    if req.mask is not None:
        allowed = req.mask.allowed_in(g)  # (B|1, H|1, Lq, Lk)
        bias = req.mask.bias_in(g)
        if bias is not None:
            s = s + bias.to(acc)
        s = s.masked_fill(~allowed, float("-inf"))
    cols = s
    if req.sinks is not None:  # one more column per row: the sink's logit, with a zero value
        cols = torch.cat([s, req.sinks.to(acc)[None, :, None, None].expand(B, Hq, Lq, 1)], dim=-1)
    row_max = cols.amax(dim=-1, keepdim=True)  # (B, Hq, Lq, 1)
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.exp(cols - shift)  # (B, Hq, Lq, Lk [+1]); masked pairs give exp(-inf) = 0 with zero gradient
    denom = e.sum(dim=-1, keepdim=True)  # (B, Hq, Lq, 1)
    pc = e / torch.where(denom > 0, denom, torch.ones_like(denom))  # (B, Hq, Lq, Lk [+1]) zero rows stay zero
    p = pc[..., :Lk]  # (B, Hq, Lq, Lk)
    stats = None
    if req.return_stats:
        with torch.no_grad():
            lse = (shift + torch.log(denom)).squeeze(-1)  # (B, Hq, Lq)
            finite = torch.where(pc > 0, cols - shift, torch.zeros_like(cols))  # shifted logits: no cancellation against lse
            ent = torch.log(denom).squeeze(-1) - (pc * finite).sum(-1)  # H = lse - sum p*l = log(denom) - sum p*(l - shift)
            ent = torch.where(lse == float("-inf"), torch.zeros_like(ent), ent).clamp_min(0)  # fully-masked: 0; NaN stays NaN
            stats = AttentionStats(lse, s.amax(dim=-1) if Lk else lse.clone(), ent)  # max over keys, never the sink
    if req.dropout_p > 0:
        keep = torch.rand(p.shape, generator=req.generator, device=p.device) >= req.dropout_p
        p = p * keep / (1.0 - req.dropout_p)
    out = (p.reshape(B, Hkv, group * Lq, Lk) @ v).reshape(B, Hq, Lq, v.shape[-1])  # (B, Hq, Lq, Dv)
    return out.to(req.dtype), stats


class MathBackend(Backend):
    name = "math"
    summary = "unfused torch ops; every feature; stores the Lq x Lk matrix"
    features = {
        "masks": "all",
        "dtypes": "any float (fp16/bf16 accumulate in fp32)",
        "stats": "yes",
        "positions": "yes; ALiBi and sinks too (sinks get gradients)",
        "dropout": "yes, with generator",
        "backward": "autograd",
        "memory": "O(Lq*Lk)",
    }
    capabilities = Backend.capabilities  # every feature, dtype and device

    def rank(self, req):
        return 50.0

    def forward(self, q, k, v, req):
        return math_attention(q, k, v, req)
