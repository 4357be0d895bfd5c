"""Backend `sdpa`: torch.nn.functional.scaled_dot_product_attention, where it means the same thing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import Backend, Request

# masks torch SDPA takes natively (causal as is_causal, no tensor) vs. as a dense (B, H, Lq, Lk) tensor
_NATIVE = {"causal"}


def _dense(req: Request) -> bool:
    return req.mask is not None and not (req.mask_kinds == _NATIVE and req.q_len == req.kv_len)


def _math_kernel(q, req: Request) -> bool:
    # torch's fused CPU kernel recomputes float32 probabilities in its backward with up to ~8x the
    # reference's own float32 error (tests/test_grad.py); its math kernel stays within the contract
    return req.requires_grad and q.device.type == "cpu" and q.dtype == torch.float32


class SDPABackend(Backend):
    name = "sdpa"
    summary = "torch.nn.functional.scaled_dot_product_attention (structured masks passed as dense tensors)"
    features = {
        "masks": "causal natively (Lq == Lk); others as a dense Lq x Lk tensor",
        "dtypes": "float16, bfloat16, float32, float64",
        "stats": "no (refused)",
        "softcap": "no (refused)",
        "dropout": "yes, global RNG only (a generator is refused)",
        "backward": "autograd (float32 on CPU: torch's math kernel, the fused one is less accurate)",
    }
    capabilities = Backend.capabilities.replace(stats=False, softcap=False, generator=False, nonfinite_inputs=False)

    def unsupported(self, q, k, v, req: Request):
        if req.return_stats:
            return "return_stats (torch SDPA does not return lse, max_logit or entropy)"
        if req.softcap is not None:
            return "softcap"
        if req.dropout_p > 0 and req.generator is not None:
            return "dropout with an explicit generator (torch SDPA draws from the global RNG)"
        if torch.compiler.is_compiling():
            # the two data checks below cannot be traced; compiled graphs skip them (see README)
            return None
        if req.mask is not None and (_dense(req) or _math_kernel(q, req)) and not bool(torch.isfinite(k).all()):
            # torch adds the mask as -inf: a NaN/Inf key would leak NaN into rows that mask it out
            return "non-finite values in key together with a mask"
        if q.device.type == "cpu" and not _math_kernel(q, req) and bool(torch.isnan(q).any()):
            # torch's fused CPU kernel returns 0 instead of NaN for a query row holding NaN
            return "NaN values in query (torch's fused CPU kernel turns such a row into 0)"
        return None

    def rank(self, req):
        # a mask SDPA cannot take natively costs an Lq x Lk tensor: still faster than math
        dense = bool(req.mask_kinds - _NATIVE) or (req.mask is not None and req.q_len != req.kv_len)
        return 20.0 if dense else 10.0

    def forward(self, q, k, v, req: Request):
        if _math_kernel(q, req):
            with sdpa_kernel(SDPBackend.MATH):
                return self._forward(q, k, v, req)
        return self._forward(q, k, v, req)

    def _forward(self, q, k, v, req: Request):
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
