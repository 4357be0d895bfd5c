"""Backend `sdpa`: torch.nn.functional.scaled_dot_product_attention, where it means the same thing."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import Backend, Request

# masks torch SDPA takes natively (causal as is_causal, no tensor) vs. as a dense (B, H, Lq, Lk) tensor
_NATIVE = {"causal"}
_HALF = (torch.float16, torch.bfloat16)


def _native_causal(req: Request) -> bool:
    return (req.mask_kinds == _NATIVE and req.q_len == req.kv_len and req.q_positions is None
            and req.kv_positions is None and req.alibi_slopes is None)


def _dense(req: Request) -> bool:
    return (req.mask is not None or req.alibi_slopes is not None) and not _native_causal(req)


def _float_bias(req: Request) -> bool:
    return "dense_float" in req.mask_kinds or req.alibi_slopes is not None


def _math_kernel(q, req: Request) -> bool:
    # torch's fused CPU kernel recomputes float32 probabilities in its backward with up to ~8x the
    # reference's own float32 error, and float64 gradients up to 22x (tests/test_grad.py); its math
    # kernel stays within the contract
    return req.requires_grad and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)


class SDPABackend(Backend):
    name = "sdpa"
    summary = "torch.nn.functional.scaled_dot_product_attention (structured masks passed as dense tensors)"
    features = {
        "masks": "causal natively (Lq == Lk, default positions); others, positions and ALiBi as a dense Lq x Lk tensor",
        "dtypes": "float16, bfloat16, float32, float64 (a float mask or ALiBi runs in float32: never rounded to 16 bits)",
        "stats": "no (refused)",
        "softcap": "no (refused)",
        "sinks": "no (refused)",
        "dropout": "yes, global RNG only (a generator is refused)",
        "backward": "autograd (float32/float64 on CPU: torch's math kernel, the fused one is less accurate; "
                    "float16/bfloat16 gradients on CPU refused for the same reason)",
    }
    capabilities = Backend.capabilities.replace(
        stats=False, softcap=False, sinks=False, generator=False, nonfinite_inputs=False,
        masked_nonpositive_scale=False, no_backward=frozenset({("cpu", torch.float16), ("cpu", torch.bfloat16)}))

    data_checks = True

    def unsupported(self, q, k, v, req: Request, data: bool = True):
        if req.return_stats:
            return "return_stats (torch SDPA does not return lse, max_logit or entropy)"
        if req.softcap is not None:
            return "softcap"
        if req.sinks is not None:
            return "sinks"
        if req.dropout_p > 0 and req.generator is not None:
            return "dropout with an explicit generator (torch SDPA draws from the global RNG)"
        if req.scale <= 0 and (req.mask is not None or req.alibi_slopes is not None):
            # torch returns NaN for masked rows scaled by zero or a negative number
            return f"scale <= 0 together with a mask (scale={req.scale:g}: torch SDPA returns NaN)"
        if req.requires_grad and q.device.type == "cpu" and q.dtype in _HALF:
            # torch's fused CPU backward in bfloat16 missed FlashAttention's tolerance (dV 4.7x at head
            # dim 256) and gave non-zero gradients where the exact ones are 0
            return f"gradients in {str(q.dtype).replace('torch.', '')} on the CPU (torch's fused CPU backward is not accurate enough)"
        if not data or torch.compiler.is_compiling():
            # the two data checks below (auto makes them only when it picks sdpa) cannot be traced; compiled
            # graphs skip them (see README)
            return None
        if _dense(req) or (req.mask is not None and _math_kernel(q, req)):
            if not bool(torch.isfinite(k).all()):
                # torch adds the mask as -inf: a NaN/Inf key would leak NaN into rows that mask it out
                return "non-finite values in key together with a mask"
        if q.device.type == "cpu" and not _math_kernel(q, req) and bool(torch.isnan(q).any()):
            # torch's fused CPU kernel returns 0 instead of NaN for a query row holding NaN
            return "NaN values in query (torch's fused CPU kernel turns such a row into 0)"
        return None

    def rank(self, req):
        # a mask SDPA cannot take natively costs an Lq x Lk tensor: still faster than math
        return 20.0 if _dense(req) else 10.0

    def forward(self, q, k, v, req: Request):
        if _math_kernel(q, req):
            with sdpa_kernel(SDPBackend.MATH):
                return self._forward(q, k, v, req)
        return self._forward(q, k, v, req)

    def _forward(self, q, k, v, req: Request):
        kw = dict(scale=req.scale, dropout_p=req.dropout_p, enable_gqa=req.q_heads != req.kv_heads)
        if _native_causal(req):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw), None
        if not _dense(req):
            return F.scaled_dot_product_attention(q, k, v, **kw), None
        g = req.geometry
        m = req.mask.to_dense_in(g) if req.mask is not None else None  # (B|1, H|1, Lq, Lk) bool or float
        if req.alibi_slopes is not None:
            distance = (g.q_pos()[:, None, :, None] - g.kv_pos()[:, None, None, :]).abs().to(req.acc)
            bias = -req.alibi_slopes.to(req.acc)[:, :, None, None] * distance  # (B|1, Hq, Lq, Lk) float32 (float64)
            if m is not None:
                m = torch.where(m, bias, float("-inf")) if m.dtype == torch.bool else bias + m.to(req.acc)
            else:
                m = bias
        if m.dtype != torch.bool and q.dtype != m.dtype:
            if q.dtype in _HALF:
                # a float mask rounded to 16 bits would move every logit (bias -300 has a bfloat16
                # spacing of 2): compute this call in float32 instead
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m.float(), **kw)
                return out.to(q.dtype), None
            m = m.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw), None


# -- short calls (issue 14's fixed cost): attention(..., backend="sdpa") without the general path's
# per-call work. The first call of each (shapes, dtype, causal, scale) is validated in full and keeps
# the keyword arguments torch takes; later calls check what can differ between calls with the same key.

_PLANS: dict = {}


def fast_forward(q, k, v, causal: bool, scale):
    """``attention(q, k, v, causal=causal, scale=scale, backend="sdpa")`` for a no-grad CPU call
    without mask (or with a causal mask torch takes natively) and no other option, or None: the
    general path must run (including every refusal and error, e.g. NaN in the query)."""
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
        return None
    dt = q.dtype
    if k.dtype is not dt or v.dtype is not dt or not (q.is_cpu and k.is_cpu and v.is_cpu):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    key = (q.shape, k.shape, v.shape, dt, causal, scale)
    kw = _PLANS.get(key)
    if kw is None:
        if len(_PLANS) >= 256:
            _PLANS.clear()
        kw = _PLANS[key] = _plan(q, k, v, causal, scale)
    if kw is False:
        return None
    return planned(q, k, v, kw)


def planned(q, k, v, kw: dict):
    """:func:`fast_forward` for a call already checked and planned (``kw``: its ``_plan``), or None."""
    if _has_nan(q):  # torch's fused CPU kernel turns a NaN query row into 0: refused
        return None
    return F.scaled_dot_product_attention(q, k, v, **kw)


def _plan(q, k, v, causal, scale):
    from ..request import build_request

    if q.dim() != 4 or k.dim() != 4 or q.shape[2] == 0 or k.shape[2] == 0:
        return False
    try:
        req = build_request(q, k, v, causal=causal, scale=scale, requires_grad=False)
    except (TypeError, ValueError):
        return False  # the general path raises it
    if req.mask is not None and not _native_causal(req):
        return False
    if req.scale <= 0 and req.mask is not None:
        return False  # refused (SDPABackend.unsupported)
    # only the arguments that differ from torch's defaults: a scale given costs torch ~0.4 us a call
    # ((1, 4, 1, 128, 64), 1 thread), and its default is the same number, 1 / sqrt(D) in double
    kw = {} if req.scale == 1.0 / math.sqrt(req.head_dim) else {"scale": req.scale}
    if req.q_heads != req.kv_heads:
        kw["enable_gqa"] = True
    if req.mask is not None:
        kw["is_causal"] = True
    return kw


_nan_kernel = []  # cpu_short.has_nan's compiled entry point, once loaded (None: numba missing)


def _has_nan(q) -> bool:
    # torch.isnan(q).any() costs ~4.5 us on a tiny tensor; the numba loop ~0.3 us (its entry point
    # called directly: the dispatcher would type the two integers first)
    if q.dtype is torch.float32 and q.is_contiguous():
        if not _nan_kernel:
            try:
                from ..kernels.cpu_short import has_nan

                has_nan(q.data_ptr(), 0)  # compiles or loads
                entry = next(iter(has_nan.overloads.values())).entry_point
            except Exception:  # noqa: BLE001 -- no numba: torch checks
                entry = None
            _nan_kernel.append(entry)
        if _nan_kernel[0] is not None:
            return _nan_kernel[0](q.data_ptr(), q.numel())
    return bool(torch.isnan(q).any())
