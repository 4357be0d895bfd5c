"""The readable definition of scaled dot-product self-attention.

Read it next to the study notes (``shared/seed/self-attention-notes.md``): every step of
the notes is one line here, with the tensor's shape in a comment.

    embeddings x --W_Q, W_K, W_V--> Q, K, V
    scores      = Q K^T
    scaled      = scores / sqrt(d_k)            (keeps softmax out of saturation)
    softcapped  = c * tanh(scaled / c)          (optional)
    logits      = softcapped - slope |q_pos - kv_pos| + float mask   (ALiBi and float masks, optional)
    masked      = logits where allowed, else -inf
    weights     = softmax(masked, with exp(sink) added to the denominator)
                                                (a fully-masked row gets all zeros)
    output      = weights V                     (the contextual embeddings)

Positions: query i sits at q_positions[i] (default i + Lk - Lq), key j at kv_positions[j]
(default j); causal and window masks and ALiBi read them (see ``selfattn.masks``).
A sink is a per-head logit with a zero value vector: it takes its share of the softmax
and gives nothing back, so a row's weights sum to 1 - p_sink.

This module depends on torch alone. It is the test oracle of every backend, the ``reference``
backend itself, and what ``selfattn explain`` walks through. It computes in float64 unless
``upcast=False`` (tests use that to measure the error of low precision itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .masks import Geometry, Mask
from .stats import AttentionStats


@dataclass
class Step:
    name: str  # short identifier: "scores", "weights", ...
    value: torch.Tensor  # the intermediate tensor, as computed
    note: str  # one sentence: what this step does and why


@dataclass
class Trace:
    """Every intermediate of one reference run, in order. Index by step name."""

    steps: list = field(default_factory=list)

    def add(self, name: str, value: torch.Tensor, note: str) -> None:
        self.steps.append(Step(name, value.detach().clone(), note))

    def __getitem__(self, name: str) -> torch.Tensor:
        for s in self.steps:
            if s.name == name:
                return s.value
        raise KeyError(f"trace has no step {name!r}; steps: {[s.name for s in self.steps]}")

    def __contains__(self, name: str) -> bool:
        return any(s.name == name for s in self.steps)

    def names(self) -> list:
        return [s.name for s in self.steps]


def _record(trace, name, value, note):
    if trace is not None:
        trace.add(name, value, note)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    upcast: bool = True,
    trace: Trace | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Reference attention on (B, H, L, D) tensors; returns (output, stats) in the compute dtype.

    Inputs are assumed valid (``selfattn.attention`` validates). Hq must be a multiple of Hkv.
    Positions are (L,) or (B, L) integers; ``alibi_slopes`` (Hq,) or (B, Hq); ``sinks`` (Hq,).
    """
    dtype = torch.float64 if upcast else query.dtype
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)  # (B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    # grouped-query attention: each group of Hq // Hkv query heads shares one key/value head
    k = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Lk, D)
    v = v.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Lk, Dv)
    _record(trace, "Q", q, "queries: what each token is looking for")
    _record(trace, "K", k, "keys: what each token offers to be matched against")
    _record(trace, "V", v, "values: the information each token passes on")

    scores = q @ k.transpose(-2, -1)  # (B, Hq, Lq, Lk) dot product of every query with every key
    _record(trace, "scores", scores, "QK^T: how well each query matches each key")

    logits = scores * scale  # (B, Hq, Lq, Lk) divide by sqrt(d_k) so softmax does not saturate
    _record(trace, "scaled", logits, f"scores x {scale:.6g} (1/sqrt(d_k) unless a scale is given)")

    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)  # (B, Hq, Lq, Lk) smoothly bounded to (-c, c)
        _record(trace, "softcapped", logits, f"{softcap:g} * tanh(scaled / {softcap:g}): bounds every logit")

    g = Geometry(B, Hq, Lq, Lk, _pos(q_positions), _pos(kv_positions), q.device)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype).reshape(-1, Hq, 1, 1)  # (B|1, Hq, 1, 1)
        distance = (g.q_pos()[:, None, :, None] - g.kv_pos()[:, None, None, :]).abs().to(dtype)  # (B|1, 1, Lq, Lk)
        logits = logits - slopes * distance  # (B, Hq, Lq, Lk) ALiBi: farther keys score lower
        _record(trace, "alibi", logits, "ALiBi: minus slope x |query position - key position|")

    allowed = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=q.device)  # (1, 1, Lq, Lk)
    if mask is not None:
        allowed = mask.allowed_in(g)  # (B|1, H|1, Lq, Lk) True = may attend
        bias = mask.bias_in(g)  # (B|1, H|1, Lq, Lk) or None
        if bias is not None:
            # float masks add to the logits, taken in the accumulation dtype (float32 unless the inputs are
            # float64), as every backend takes them: a float64 -1e300 on float32 inputs is -inf, a masked pair
            acc = torch.float64 if query.dtype == torch.float64 else torch.float32
            logits = logits + bias.to(acc).to(dtype)  # (B, Hq, Lq, Lk)
    masked = logits.masked_fill(~allowed, float("-inf"))  # (B, Hq, Lq, Lk) ruled-out pairs get -inf
    _record(trace, "masked", masked, "pairs the mask rules out set to -inf")

    columns = masked
    if sinks is not None:
        sink = sinks.to(dtype)[None, :, None, None].expand(masked.shape[0], Hq, Lq, 1)  # (B, Hq, Lq, 1)
        columns = torch.cat([masked, sink], dim=-1)  # (B, Hq, Lq, Lk + 1) the sink is one more column

    # softmax, written out so that a fully-masked row gives zeros instead of 0/0 = NaN
    width = columns.shape[-1]
    row_max = columns.amax(dim=-1, keepdim=True) if width else columns.sum(-1, keepdim=True) - math.inf  # (B, Hq, Lq, 1)
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # (B, Hq, Lq, 1)
    exp = torch.exp(columns - shift)  # (B, Hq, Lq, Lk [+ 1]) 0 where masked
    denom = exp.sum(dim=-1, keepdim=True)  # (B, Hq, Lq, 1) 0 for a fully-masked row (without a sink)
    probs = exp / torch.where(denom > 0, denom, torch.ones_like(denom))  # (B, Hq, Lq, Lk [+ 1]) rows sum to 1 (or 0)
    weights = probs[..., :Lk]  # (B, Hq, Lq, Lk) a sink's share is dropped: its value is 0
    _record(trace, "weights", weights, "softmax over keys: attention weights, each row sums to 1"
            + (" minus the sink's share" if sinks is not None else ""))

    lse = (shift + torch.log(denom)).squeeze(-1)  # (B, Hq, Lq) -inf for a fully-masked row without a sink
    max_logit = masked.amax(dim=-1) if Lk else masked.sum(-1) - math.inf  # (B, Hq, Lq) keys only, never the sink
    plogp = torch.where(probs != 0, probs * torch.log(probs), torch.zeros_like(probs))  # NaN stays NaN
    entropy = -plogp.sum(dim=-1)  # (B, Hq, Lq) nats, over keys and sink; 0 for a one-hot or fully-masked row

    if dropout_p > 0.0:
        keep = torch.rand(weights.shape, generator=generator, device=weights.device) >= dropout_p  # (B, Hq, Lq, Lk)
        weights = weights * keep / (1.0 - dropout_p)  # (B, Hq, Lq, Lk) inverted dropout
        _record(trace, "dropped", weights, f"dropout: each weight zeroed with probability {dropout_p:g}, the rest scaled up")

    output = weights @ v  # (B, Hq, Lq, Dv) weighted sum of values: the contextual embeddings
    _record(trace, "output", output, "weights x V: each token's contextual embedding")
    return output, AttentionStats(lse, max_logit, entropy)


def _pos(p):
    # (L,) or (B, L) integer positions -> int64 (B|1, L), or None for the defaults
    if p is None:
        return None
    return (p[None] if p.dim() == 1 else p).long()


def self_attention(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    upcast: bool = True,
    trace: Trace | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """The notes' single-head layer: embeddings x (B, L, E) -> Q = x W_Q, K = x W_K, V = x W_V -> attention.

    Weights are (E, d_k), (E, d_k), (E, d_v); returns output (B, L, d_v) and stats (B, 1, L).
    """
    dtype = torch.float64 if upcast else x.dtype
    x = x.to(dtype)  # (B, L, E)
    _record(trace, "embeddings", x, "one fixed vector per token, from the embedding layer")
    q = x @ w_q.to(dtype)  # (B, L, d_k)
    k = x @ w_k.to(dtype)  # (B, L, d_k)
    v = x @ w_v.to(dtype)  # (B, L, d_v) the width of W_V sets the width of the output
    out, stats = attention(
        q[:, None], k[:, None], v[:, None],  # (B, 1, L, d) one head
        mask=mask, scale=scale, softcap=softcap, upcast=upcast, trace=trace,
    )
    return out[:, 0], stats  # (B, L, d_v)
