"""ExplainTrace: one single-head self-attention run with every step recorded, labelled by token."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import masks as _masks
from .. import reference
from ..stats import AttentionStats

# the worked example of shared/seed/self-attention-notes.md: "The cat sat", embedding size 4
NOTES_TOKENS = ("The", "cat", "sat")
NOTES_EMBEDDINGS = ((1.0, 0.0, 1.0, 0.0), (0.0, 1.0, 0.0, 1.0), (1.0, 1.0, 1.0, 1.0))
# the notes' stated output for "The" (quoted to compare against; the tool computes its own)
NOTES_CLAIMED_OUTPUT_THE = (1.2669, 0.9999, 1.2669, 0.9999)


@dataclass
class ExplainTrace:
    """Every step of one self-attention run over labelled tokens (single head, batch of one).

    ``steps`` maps step names ("embeddings", "W_Q", "Q", "K", "V", "scores", "scaled",
    "masked", "weights", "output", ...) to 2-D float64 tensors; ``notes`` holds one sentence
    per step; ``stats`` holds the per-row lse, max_logit and entropy.
    """

    tokens: list  # one label per row/column
    steps: dict  # step name -> 2-D float64 tensor
    notes: dict  # step name -> one-sentence explanation
    stats: AttentionStats  # each of shape (L,)
    scale: float  # the factor applied to the scores (1/sqrt(d_k) unless --no-scale)
    d_k: int
    options: dict = field(default_factory=dict)  # causal, window, init, ...

    @property
    def weights(self) -> torch.Tensor:
        return self.steps["weights"]

    @property
    def output(self) -> torch.Tensor:
        return self.steps["output"]

    def to_dict(self) -> dict:
        """A JSON-ready dict of every number in the trace."""
        def enc(t):
            return [[_num(x) for x in row] for row in t.tolist()] if t.dim() == 2 else [_num(x) for x in t.tolist()]
        return {
            "tokens": list(self.tokens),
            "d_k": self.d_k,
            "scale": self.scale,
            "options": dict(self.options),
            "steps": [{"name": n, "note": self.notes.get(n, ""), "value": enc(v)} for n, v in self.steps.items()],
            "stats": {"lse": enc(self.stats.lse), "max_logit": enc(self.stats.max_logit), "entropy": enc(self.stats.entropy)},
        }


def _num(x: float):
    # JSON has no inf/nan literals: write them as strings
    return x if math.isfinite(x) else str(x)


def run(
    tokens,
    embeddings: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    *,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    options: dict | None = None,
) -> ExplainTrace:
    """Run the reference self-attention on (L, E) embeddings and record every step."""
    x = embeddings.to(torch.float64)[None]  # (1, L, E)
    parts = ([_masks.causal()] if causal else []) + ([_masks.window(window)] if window is not None else [])
    mask = None if not parts else (parts[0] if len(parts) == 1 else _masks.And(*parts))
    rec = reference.Trace()
    _, stats = reference.self_attention(x, w_q, w_k, w_v, mask=mask, scale=scale, trace=rec)
    d_k = w_q.shape[1]
    used_scale = 1.0 / math.sqrt(d_k) if scale is None else float(scale)
    steps = {"embeddings": rec["embeddings"][0]}
    notes = {"embeddings": _note(rec, "embeddings")}
    for name, w, note in (("W_Q", w_q, "learned matrix that turns embeddings into queries"),
                          ("W_K", w_k, "learned matrix that turns embeddings into keys"),
                          ("W_V", w_v, "learned matrix that turns embeddings into values; its width sets the output width")):
        steps[name] = w.detach().to(torch.float64)
        notes[name] = note
    for s in rec.steps:
        if s.name == "embeddings":
            continue
        steps[s.name] = s.value[0, 0]  # (L, L) or (L, d) for the single head
        notes[s.name] = s.note
    if not parts:  # nothing masked: the "masked" step equals "scaled", leave it out of the display
        steps.pop("masked", None)
    st = AttentionStats(stats.lse[0, 0], stats.max_logit[0, 0], stats.entropy[0, 0])
    return ExplainTrace(list(tokens), steps, notes, st, used_scale, d_k, dict(options or {}, causal=causal, window=window))


def _note(rec, name):
    return next(s.note for s in rec.steps if s.name == name)


def notes_example() -> ExplainTrace:
    """The notes' worked example: "The cat sat", embeddings as given, W_Q = W_K = W_V = I, d_k = 4."""
    x = torch.tensor(NOTES_EMBEDDINGS, dtype=torch.float64)  # (3, 4)
    eye = torch.eye(4, dtype=torch.float64)  # (4, 4) the notes initialise every W as I
    return run(NOTES_TOKENS, x, eye, eye, eye, options={"example": "notes"})


def compare_with_notes(trace: ExplainTrace) -> dict:
    """Set the notes' stated output for "The" beside what their setup gives, and diagnose the gap."""
    claimed = torch.tensor(NOTES_CLAIMED_OUTPUT_THE, dtype=torch.float64)  # (4,)
    got = trace.output[0]  # (4,)
    diff = claimed - got  # (4,)
    w, v = trace.weights[0], trace.steps["V"]  # (L,), (L, d)
    # is the gap one term w_j * v_j of the weighted sum counted a second time?
    extra = [j for j in range(len(trace.tokens)) if torch.allclose(diff, w[j] * v[j], atol=1e-3)]
    return {"claimed": claimed, "computed": got, "difference": diff, "repeated_terms": extra}
