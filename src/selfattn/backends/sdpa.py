"""Backend `sdpa`: torch.nn.functional.scaled_dot_product_attention, where it means the same thing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backend, Request

# masks torch SDPA takes natively (causal as is_causal, no tensor) vs. as a dense (B, H, Lq, Lk) tensor
_NATIVE = {"causal"}


class SDPABackend(Backend):
    name = "sdpa"
    summary = "torch.nn.functional.scaled_dot_product_attention (structured masks passed as dense tensors)"
    features = {
        "masks": "causal natively (Lq == Lk); others as a dense Lq x Lk tensor",
        "dtypes": "float16, bfloat16, float32, float64",
        "stats": "no (refused)",
        "softcap": "no (refused)",
        "dropout": "yes, global RNG only (a generator is refused)",
        "backward": "autograd",
    }

    def unsupported(self, q, k, v, req: Request):
        if req.return_stats:
            return "return_stats (torch SDPA does not return lse, max_logit or entropy)"
        if req.softcap is not None:
            return "softcap"
        if req.dropout_p > 0 and req.generator is not None:
            return "dropout with an explicit generator (torch SDPA draws from the global RNG)"
        return None

    def rank(self, req):
        # a mask SDPA cannot take natively costs an Lq x Lk tensor: still faster than math
        dense = bool(req.mask_kinds - _NATIVE) or (req.mask is not None and req.q_len != req.kv_len)
        return 20.0 if dense else 10.0

    def forward(self, q, k, v, req: Request):
        kinds = req.mask_kinds
        kw = dict(scale=req.scale, dropout_p=req.dropout_p, enable_gqa=req.q_heads != req.kv_heads)
        if kinds == {"causal"} and req.q_len == req.kv_len:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        elif req.mask is not None:
            m = req.mask.to_dense(req.q_len, req.kv_len, device=q.device)
            if m.dtype != torch.bool:
                m = m.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw)
        else:
            out = F.scaled_dot_product_attention(q, k, v, **kw)
        return out, None
