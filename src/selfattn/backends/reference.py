"""Backend `reference`: the readable oracle of ``selfattn.reference``, float64 inside."""

from __future__ import annotations

from .. import reference
from .base import Backend, Request


class ReferenceBackend(Backend):
    name = "reference"
    summary = "the readable definition (selfattn.reference), float64 inside; slow"
    features = {
        "masks": "all",
        "dtypes": "any float (computes in float64, returns the input dtype)",
        "stats": "yes",
        "dropout": "yes, with generator",
        "backward": "autograd (float64)",
        "memory": "O(Lq*Lk) in float64",
    }
    capabilities = Backend.capabilities  # every feature, dtype and device

    def rank(self, req: Request) -> float:
        return 1000.0  # never the fastest: auto picks it only if nothing else can serve

    def forward(self, q, k, v, req: Request):
        out, stats = reference.attention(
            q, k, v, mask=req.mask, scale=req.scale, softcap=req.softcap,
            q_positions=req.q_positions, kv_positions=req.kv_positions,
            alibi_slopes=req.alibi_slopes, sinks=req.sinks,
            dropout_p=req.dropout_p, generator=req.generator,
        )
        return out.to(req.dtype), (stats.to(req.acc) if req.return_stats else None)
