"""ExplainTrace: one self-attention head's run with every step recorded, labelled by token.

Two sizes of input, one object:

* up to ``FULL_MATRIX_MAX_TOKENS`` tokens every step is kept, the L x L matrices included
  (computed by the float64 reference);
* longer inputs (up to ``MAX_TOKENS``) keep the L x d steps, the per-row statistics of a
  normal ``selfattn.attention(..., return_stats=True)`` call, and only the rows asked for,
  recomputed by ``selfattn.attention_probs`` from the saved log-sum-exp -- no L x L matrix.
  Beyond about 32 tokens a full matrix no longer fits a terminal or a page legibly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import masks as _masks
from .. import reference
from ..functional import attention, attention_probs
from ..stats import AttentionStats

try:  # the request builder (issue 11) gives mask resolution its public name
    from ..request import resolve_mask
except ImportError:  # pragma: no cover - before selfattn.request exists
    from ..functional import _resolve_mask as resolve_mask

# the worked example of shared/seed/self-attention-notes.md: "The cat sat", embedding size 4
NOTES_TOKENS = ("The", "cat", "sat")
NOTES_EMBEDDINGS = ((1.0, 0.0, 1.0, 0.0), (0.0, 1.0, 0.0, 1.0), (1.0, 1.0, 1.0, 1.0))
# the notes' stated output for "The" (quoted to compare against; the tool computes its own)
NOTES_CLAIMED_OUTPUT_THE = (1.2669, 0.9999, 1.2669, 0.9999)

# above this many tokens full L x L matrices are unreadable: show statistics and chosen rows
FULL_MATRIX_MAX_TOKENS = 32
# the hard limit on input length for `selfattn explain`
MAX_TOKENS = 4096
TOP_KEYS = 8  # how many of the largest weights a long row lists
TOP_MIN = 5e-5  # ... of those at least this large (smaller ones print as 0.0000)

_LONG_NOTES = {
    "Q": "queries as passed to attention (one row per token)",
    "K": "keys as passed to attention",
    "V": "values as passed to attention",
    "output": "weights x V: each token's contextual embedding (from the attention() call)",
}


class _Views:
    """The renderings every trace offers: HTML report, matplotlib figure, terminal tables, notebook."""

    def to_html(self, path=None) -> str:
        """The self-contained HTML report (written to ``path`` if given)."""
        from .html import report

        return report(self, path)

    def plot(self, path=None):
        """A matplotlib Figure: heatmap of the attention weights (written as PNG to ``path`` if given)."""
        from .plot import plot_trace

        return plot_trace(self, path)

    def render(self, console=None) -> None:
        """Print every step as labelled terminal tables."""
        from .terminal import render

        render(self, console)

    def _repr_html_(self) -> str:
        from .html import fragment

        return fragment(self)


@dataclass
class ExplainTrace(_Views):
    """Every step of one self-attention head over labelled tokens (batch of one).

    ``steps`` maps step names ("embeddings", "W_Q", "Q", "K", "V", "scores", "scaled",
    "masked", "weights", "output", ...) to 2-D tensors; ``notes`` holds one sentence per step;
    ``stats`` holds the per-row lse, max_logit and entropy, each (L,). ``rows`` are the query
    rows picked for display and ``row_weights`` (len(rows), L) their attention weights. For
    input longer than ``FULL_MATRIX_MAX_TOKENS`` the L x L steps are absent (``full`` is False).

    ``to_dict()``, ``to_html()``, ``plot()`` and ``render()`` show it; in a notebook it
    displays itself as the HTML report.
    """

    tokens: list  # one label per row/column
    steps: dict  # step name -> 2-D tensor (float64 for full traces)
    notes: dict  # step name -> one-sentence explanation
    stats: AttentionStats  # each of shape (L,)
    scale: float  # the factor applied to the scores (1/sqrt(d_k) unless --no-scale)
    d_k: int
    options: dict = field(default_factory=dict)  # causal, window, init, ...
    rows: list = field(default_factory=list)  # query rows picked for display
    row_weights: torch.Tensor | None = None  # (len(rows), L) attention weights of those rows
    label: str = ""  # which layer/head this is, for model traces
    row_masked: torch.Tensor | None = None  # (len(rows), L) bool: pairs the mask rules out (None: no mask)
    patterns: dict = field(default_factory=dict)  # model heads: name -> (mean weight on its keys, rows it applies to, rows following it, mean weight if uniform)
    sink: float | None = None  # the head's sink logit (gpt-oss): one more softmax column with no value (None: no sink)

    @property
    def full(self) -> bool:
        return "weights" in self.steps

    @property
    def sink_share(self) -> torch.Tensor | None:
        """(L,) each row's probability on the sink, exp(sink - lse) (None without a sink).

        The sink takes this share of the row's softmax and gives nothing back: the row's weights on
        the keys sum to 1 minus it.
        """
        if self.sink is None:
            return None
        lse = self.stats.lse.detach().to(torch.float64)  # (L,) includes the sink
        return torch.exp(self.sink - lse)  # (L,)

    @property
    def weights(self) -> torch.Tensor:
        if not self.full:
            raise ValueError(f"this trace has {len(self.tokens)} tokens (> {FULL_MATRIX_MAX_TOKENS}): the full "
                             f"weight matrix was not computed; use trace.row_weights (rows {self.rows})")
        return self.steps["weights"]

    @property
    def output(self) -> torch.Tensor:
        return self.steps["output"]

    def to_dict(self) -> dict:
        """A JSON-ready dict of every number in the trace."""
        return {
            "label": self.label,
            "tokens": list(self.tokens),
            "d_k": self.d_k,
            "scale": self.scale,
            "full": self.full,
            "options": _jsonable(self.options),
            "steps": [{"name": n, "note": self.notes.get(n, ""), "value": _enc(v)} for n, v in self.steps.items()],
            "stats": {"lse": _enc(self.stats.lse), "max_logit": _enc(self.stats.max_logit), "entropy": _enc(self.stats.entropy)},
            "rows": list(self.rows),
            "row_weights": _enc(self.row_weights) if self.row_weights is not None else None,
            "row_masked": self.row_masked.tolist() if self.row_masked is not None else None,
            "patterns": {k: {"weight": w, "rows": n, "following": f, "uniform": u} for k, (w, n, f, u) in self.patterns.items()},
            "sink_logit": _num(self.sink) if self.sink is not None else None,
            "sink_share": _enc(self.sink_share) if self.sink is not None else None,
        }



@dataclass
class LayerTrace:
    name: str  # module name of the attention layer in the model
    kind: str  # its class name
    heads: list  # one ExplainTrace per query head
    index: int | None = None  # the call's place among the model's attention calls (what --layers counts)


@dataclass
class ModelTrace(_Views):
    """Every attention layer and head of a model run on some tokens (``explain(checkpoint=...)``).

    ``predictions[i]`` is the model's guess for the token after position ``i``: the ``TOP_PREDICTIONS``
    most likely tokens with their probabilities (empty when the model's output is not next-token logits).
    """

    tokens: list
    layers: list  # LayerTrace per attention call, in call order
    options: dict = field(default_factory=dict)
    predictions: list = field(default_factory=list)  # per position: [(token, probability), ...], most likely first

    @property
    def heads(self) -> list:
        return [h for layer in self.layers for h in layer.heads]

    @property
    def full(self) -> bool:
        return all(h.full for h in self.heads)

    def to_dict(self) -> dict:
        """A JSON-ready dict: tokens, options and every head's trace."""
        return {"tokens": list(self.tokens), "options": _jsonable(self.options),
                "predictions": [[[t, p] for t, p in row] for row in self.predictions],
                "layers": [{"name": layer.name, "kind": layer.kind, "index": layer.index, "heads": [h.to_dict() for h in layer.heads]}
                           for layer in self.layers]}



# -- recognisable head patterns ---------------------------------------------------------------

TOP_PREDICTIONS = 3  # next-token guesses shown per position
PATTERN_MIN = 0.5  # a row follows a pattern when it puts at least this much weight on the pattern's keys
PATTERN_SHARE = 0.5  # a head has a pattern when at least this share of the rows where it applies follow it
PATTERN_ROWS_MIN = 2  # ... and at least this many
PATTERN_LIFT = 3.0  # ... or a third of them do, and its keys get this many times an even spread's weight
_PATTERN_CHUNK = 256  # long input: rows of weights recomputed per attention_probs call (never L x L at once)

# name -> what it means, in the words a report uses
PATTERNS = {
    "previous token": "attends to the token just before",
    "same token": "attends to itself",
    "first token": "attends to the first token",
    "earlier copy": "attends to earlier occurrences of the same token",
    "induction": "attends to the token after the previous occurrence of the current token (an induction head)",
}


def pattern_keys(tokens) -> dict:
    """Pattern name -> per query row, the key positions the pattern points at (None where it does not apply).

    Only keys at or before the query count (what a causal model may see); "induction" needs an
    earlier occurrence of the query's token whose successor is not the query itself.
    """
    n = len(tokens)
    seen: dict = {}
    earlier, induction = [], []
    for i, t in enumerate(tokens):
        prev = seen.get(t, [])
        earlier.append(list(prev) or None)
        nxt = [j + 1 for j in prev if j + 1 < i]
        induction.append(nxt or None)
        seen.setdefault(t, []).append(i)
    # row 0 sees only itself (causal): no pattern can be told apart there
    return {"previous token": [None] + [[i - 1] for i in range(1, n)], "same token": [None] + [[i] for i in range(1, n)],
            "first token": [None] + [[0] for _ in range(1, n)], "earlier copy": earlier, "induction": induction}


def head_patterns(tokens, row_chunks, _cache: dict | None = None) -> dict:
    """How much weight each pattern's keys get, over the rows where the pattern applies.

    ``row_chunks`` yields (row indices, weights (len(rows), L)); returns name -> (mean weight,
    rows where it applies, rows putting at least ``PATTERN_MIN`` on its keys, mean weight the keys
    would get from a row spread evenly over the keys it sees). ``_cache`` (a dict shared across
    the heads of one input) keeps each chunk's (row, key) index pairs.
    """
    keys = pattern_keys(tokens) if _cache is None or "keys" not in _cache else _cache["keys"]
    cache = {} if _cache is None else _cache
    cache["keys"] = keys
    sums = {k: [0.0, 0, 0, 0.0] for k in keys}
    for rows, w in row_chunks:
        w = w.to(torch.float64)  # (r, L)
        seen = (w > 0).sum(1).clamp(min=1).to(torch.float64)  # (r,) keys each row can see
        span = (rows[0], rows[-1], len(rows))
        if span not in cache:
            pairs = {}
            for name, per_row in keys.items():
                rr = [r for r, i in enumerate(rows) if per_row[i] is not None for _ in per_row[i]]
                kk = [j for i in rows if per_row[i] is not None for j in per_row[i]]
                applies = torch.tensor([per_row[i] is not None for i in rows], dtype=torch.bool)  # (r,)
                count = torch.tensor([len(per_row[i] or ()) for i in rows], dtype=torch.float64)  # (r,) keys it points at
                pairs[name] = (torch.tensor(rr, dtype=torch.long), torch.tensor(kk, dtype=torch.long), applies, count)
            cache[span] = pairs
        for name, (rr, kk, applies, count) in cache[span].items():
            mass = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, rr, w[rr, kk])  # (r,) weight on its keys
            sums[name][0] += float(mass[applies].sum())
            sums[name][1] += int(applies.sum())
            sums[name][2] += int((mass[applies] >= PATTERN_MIN).sum())
            sums[name][3] += float((count / seen).clamp(max=1.0)[applies].sum())
    return {k: (s / c, c, f, u / c) for k, (s, c, f, u) in sums.items() if c}


def recognised(patterns: dict) -> list:
    """[(name, mean weight, rows where it applies, rows following it, mean weight if uniform)] of the patterns
    a head follows, most consistently followed first.

    A head follows a pattern when at least ``PATTERN_SHARE`` of the rows where it applies put half
    their weight on its keys -- or a third of them do and the keys get ``PATTERN_LIFT`` times what
    an even spread would give them (a head can serve a pattern in only some rows: an induction head
    of the recall task looks ahead from keys, not from values).
    """
    hits = [(k, w, n, f, u) for k, (w, n, f, u) in patterns.items()
            if f >= PATTERN_ROWS_MIN and (f >= PATTERN_SHARE * n or (3 * f >= n and w >= PATTERN_LIFT * u))]
    return sorted(hits, key=lambda x: (-x[3] / x[2], -x[1]))


def _num(x: float):
    # JSON has no inf/nan literals: write them as strings
    return x if math.isfinite(x) else str(x)


def _enc(t: torch.Tensor):
    return [[_num(x) for x in row] for row in t.tolist()] if t.dim() == 2 else [_num(x) for x in t.tolist()]


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()
            if v is None or isinstance(v, (bool, int, float, str, list, tuple))}


def stats_summary(trace: ExplainTrace) -> dict:
    """min/mean/max of each statistic over the rows that attend to something, with the argmin/argmax rows."""
    out = {}
    for name in ("entropy", "max_logit"):
        s = getattr(trace.stats, name).to(torch.float64)  # (L,)
        ok = torch.isfinite(trace.stats.lse)  # (L,) rows with at least one allowed key
        if not bool(ok.any()):
            out[name] = None
            continue
        vals = torch.where(ok, s, torch.full_like(s, math.nan))
        lo = int(torch.where(ok, s, torch.full_like(s, math.inf)).argmin())
        hi = int(torch.where(ok, s, torch.full_like(s, -math.inf)).argmax())
        out[name] = {"min": float(s[lo]), "argmin": lo, "mean": float(vals.nanmean()), "max": float(s[hi]), "argmax": hi}
    return out


def top_keys(trace: ExplainTrace, i: int, k: int = TOP_KEYS) -> list:
    """[(key index, weight)] of the ``k`` largest weights in picked row ``i`` (index into trace.rows), leaving
    out weights that would print as 0.0000 (below ``TOP_MIN``) after the largest: a list of zeros tells nothing."""
    w = trace.row_weights[i]  # (L,)
    n = min(k, max(int((w >= TOP_MIN).sum()), min(1, int((w > 0).sum()))))
    vals, idx = torch.topk(w, n) if n else (w[:0], torch.zeros(0, dtype=torch.long))
    return [(int(j), float(v)) for v, j in zip(vals, idx)]


def split_indices(text: str, what: str, error=ValueError) -> list:
    # "0,5,10-12,-1" -> [0, 5, 10, 11, 12, -1] (a leading "-" is a negative index, not a range)
    items = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            a, b = int(lo), int(hi) if sep else None
        except ValueError:
            raise error(f"{what}, got {text!r}") from None
        if sep and b < a:  # a downward range selects nothing: say so rather than fall back to the defaults
            raise error(f"{what} (a range runs upward, e.g. 5-7), got {text!r}")
        items.extend(range(a, b + 1) if sep else [a])
    if not items:
        raise error(f"{what}, got {text!r}")
    return items


def parse_rows(rows, n: int) -> list:
    """Row indices from a list of ints or a string like "0,5,10-12,-1"; negative counts from the end."""
    if rows is None:
        return []
    if isinstance(rows, str):
        items = split_indices(rows, "rows must be indices like '0,3,5-7,-1'")
    else:
        items = list(rows)
    out = []
    for r in items:
        if isinstance(r, bool) or not isinstance(r, int):
            raise TypeError(f"rows must be integers, got {r!r}")
        if not -n <= r < n:
            raise ValueError(f"row {r} is out of range: the input has {n} tokens (rows 0..{n - 1}, or -1 for the last)")
        r = r % n
        if r not in out:
            out.append(r)
    return out


def default_rows(n: int) -> list:
    return list(range(n)) if n <= FULL_MATRIX_MAX_TOKENS else sorted({0, n // 2, n - 1})


def _mask_of(causal, window):
    parts = ([_masks.causal()] if causal else []) + ([_masks.window(*window) if isinstance(window, tuple) else _masks.window(window)] if window is not None else [])
    return None if not parts else (parts[0] if len(parts) == 1 else _masks.And(*parts))


def run(
    tokens,
    embeddings: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    *,
    causal: bool = False,
    window=None,
    scale: float | None = None,
    options: dict | None = None,
    rows=None,
) -> ExplainTrace:
    """Run the reference self-attention on (L, E) embeddings and record every step.

    ``window`` is an int (that many keys back) or a ``(left, right)`` pair. Inputs longer than
    ``FULL_MATRIX_MAX_TOKENS`` go through ``selfattn.attention`` instead (see the module doc).
    """
    L = embeddings.shape[0]
    mask = _mask_of(causal, window)
    d_k = w_q.shape[1]
    used_scale = 1.0 / math.sqrt(d_k) if scale is None else float(scale)
    opts = dict(options or {}, causal=causal, window=window)
    picked = parse_rows(rows, L) or default_rows(L)
    steps = {"embeddings": embeddings.to(torch.float64)}
    notes = {"embeddings": "one fixed vector per token, from the embedding layer"}
    for name, w, note in (("W_Q", w_q, "learned matrix that turns embeddings into queries"),
                          ("W_K", w_k, "learned matrix that turns embeddings into keys"),
                          ("W_V", w_v, "learned matrix that turns embeddings into values; its width sets the output width")):
        steps[name] = w.detach().to(torch.float64)
        notes[name] = note
    if L > FULL_MATRIX_MAX_TOKENS:
        x = embeddings.to(torch.float32)  # (L, E) the everyday dtype of the fast path
        steps["embeddings"] = x.to(torch.float64)  # show the embeddings this run used: with W = I, Q equals them
        q = (x @ w_q.to(torch.float32))[None, None]  # (1, 1, L, d_k)
        k = (x @ w_k.to(torch.float32))[None, None]  # (1, 1, L, d_k)
        v = (x @ w_v.to(torch.float32))[None, None]  # (1, 1, L, d_v)
        out, st = attention(q, k, v, mask=mask, scale=scale, return_stats=True)
        return long_head(tokens, q, k, v, out, st, 0, dict(mask=mask, scale=scale), picked, steps, notes, used_scale, opts)
    x = embeddings.to(torch.float64)[None]  # (1, L, E)
    rec = reference.Trace()
    _, stats = reference.self_attention(x, w_q, w_k, w_v, mask=mask, scale=scale, trace=rec)
    for s in rec.steps:
        if s.name == "embeddings":
            continue
        steps[s.name] = s.value[0, 0]  # (L, L) or (L, d) for the single head
        notes[s.name] = s.note
    if mask is None:  # nothing masked: the "masked" step equals "scaled", leave it out of the display
        steps.pop("masked", None)
    st = AttentionStats(stats.lse[0, 0], stats.max_logit[0, 0], stats.entropy[0, 0])
    return ExplainTrace(list(tokens), steps, notes, st, used_scale, d_k, opts, picked, steps["weights"][picked],
                        row_masked=_masked_rows(steps, picked))


def _sink_of(opts, h):
    # the sink logit of query head h, or None (opts["sinks"]: (Hq,) as passed to attention())
    s = opts.get("sinks")
    return None if s is None else float(s.detach().reshape(-1)[h])


SINK_NOTE = ("softmax over the keys and the head's sink (logit {:.4g}, a column with no value): the sink takes its share "
             "of each row (column 'sink'), so a row's weights on the keys sum to 1 minus that share")


def long_head(tokens, q, k, v, out, stats, h, opts, picked, steps, notes, used_scale, options, label="") -> ExplainTrace:
    """The trace of query head ``h`` of one attention() call on long input: no L x L matrix."""
    hk = h // (q.shape[1] // k.shape[1])  # the key/value head this query head reads
    steps = dict(steps)
    notes = dict(notes)
    for name, t in (("Q", q[0, h]), ("K", k[0, hk]), ("V", v[0, hk]), ("output", out[0, h])):
        steps[name] = t.detach()  # (L, d)
        notes[name] = _LONG_NOTES[name]
    p = attention_probs(q, k, stats, heads=[h], rows=picked, **{n: opts.get(n) for n in ("mask", "scale", "softcap", "sinks")},
                        causal=bool(opts.get("causal")), window=opts.get("window"))  # (1, 1, r, L) rows sum to 1 - p_sink
    st = AttentionStats(stats.lse[0, h].detach(), stats.max_logit[0, h].detach(), stats.entropy[0, h].detach())
    mask = resolve_mask(opts.get("mask"), bool(opts.get("causal")), opts.get("window"))
    masked = None
    if mask is not None:
        allowed = mask.allowed(q.shape[2], k.shape[2], rows=torch.tensor(picked), device=q.device)  # (B|1, H|1, r, L)
        masked = ~allowed[0, min(h, allowed.shape[1] - 1)].cpu()  # (r, L)
    return ExplainTrace(list(tokens), steps, notes, st, used_scale, q.shape[-1], options, picked, p[0, 0], label, masked,
                        sink=_sink_of(opts, h))


def full_heads(tokens, q, k, v, opts, picked, options, labels) -> list:
    """Full traces (every step, float64 reference) of every query head of one attention() call."""
    mask = resolve_mask(opts.get("mask"), bool(opts.get("causal")), opts.get("window"))
    rec = reference.Trace()
    sinks = opts.get("sinks")  # (Hq,) a model's parameter: no graph for the report
    _, stats = reference.attention(q, k, v, mask=mask, scale=opts.get("scale"), softcap=opts.get("softcap"),
                                   sinks=None if sinks is None else sinks.detach(), trace=rec)
    d_k = q.shape[-1]
    used_scale = 1.0 / math.sqrt(d_k) if opts.get("scale") is None else float(opts["scale"])
    out = []
    for h, label in enumerate(labels):
        steps, notes = {}, {}
        for s in rec.steps:
            if s.name == "masked" and mask is None:
                continue
            steps[s.name] = s.value[0, h]  # (L, L) or (L, d)
            notes[s.name] = s.note
        for name in ("Q", "K", "V"):
            notes[name] = _LONG_NOTES[name]
        sink = _sink_of(opts, h)
        if sink is not None:
            notes["weights"] = SINK_NOTE.format(sink)
        st = AttentionStats(stats.lse[0, h], stats.max_logit[0, h], stats.entropy[0, h])
        out.append(ExplainTrace(list(tokens), steps, notes, st, used_scale, d_k, options, picked, steps["weights"][picked], label,
                                _masked_rows(steps, picked), sink=sink))
    return out


def _masked_rows(steps: dict, picked) -> torch.Tensor | None:
    m = steps.get("masked")  # (L, L) -inf where the mask rules a pair out
    return None if m is None else torch.isneginf(m[picked])


def heads_of_call(tokens, call, picked, options, prefix="") -> list:
    """One ExplainTrace per query head of a captured attention() call (full or long by length)."""
    q, k, v = call.query[:1], call.key[:1], call.value[:1]  # (1, H, L, d) batch of one
    labels = [f"{prefix}head {h}" for h in range(q.shape[1])]
    n = len(tokens)
    if n <= FULL_MATRIX_MAX_TOKENS:
        heads = full_heads(tokens, q, k, v, call.options, picked, options, labels)
        cache: dict = {}
        for tr in heads:
            tr.patterns = head_patterns(tokens, [(list(range(n)), tr.weights)], cache)
        return heads
    d_k = q.shape[-1]
    used_scale = 1.0 / math.sqrt(d_k) if call.options.get("scale") is None else float(call.options["scale"])
    heads = [long_head(tokens, q, k, v, call.output[:1], call.stats, h, call.options, picked, {}, {}, used_scale, options, labels[h])
             for h in range(q.shape[1])]
    opts = call.options
    cache = {}
    for h, tr in enumerate(heads):
        def chunks(h=h):
            for r0 in range(0, n, _PATTERN_CHUNK):
                rows = list(range(r0, min(n, r0 + _PATTERN_CHUNK)))
                p = attention_probs(q, k, call.stats, heads=[h], rows=rows, mask=opts.get("mask"), scale=opts.get("scale"),
                                    softcap=opts.get("softcap"), sinks=opts.get("sinks"), causal=bool(opts.get("causal")),
                                    window=opts.get("window"))
                yield rows, p[0, 0]  # (r, L)
        tr.patterns = head_patterns(tokens, chunks(), cache)
    return heads


def notes_example(*, causal: bool = False, window=None, scale: float | None = None) -> ExplainTrace:
    """The notes' worked example: "The cat sat", embeddings as given, W_Q = W_K = W_V = I, d_k = 4."""
    x = torch.tensor(NOTES_EMBEDDINGS, dtype=torch.float64)  # (3, 4)
    eye = torch.eye(4, dtype=torch.float64)  # (4, 4) the notes initialise every W as I
    opts = {"example": "notes", "init": "identity", "scaled": scale is None}
    return run(NOTES_TOKENS, x, eye, eye, eye, causal=causal, window=window, scale=scale, options=opts)


def is_plain_notes_example(trace: ExplainTrace) -> bool:
    o = trace.options
    return o.get("example") == "notes" and not o.get("causal") and o.get("window") is None and o.get("scaled", True)


def compare_with_notes(trace: ExplainTrace) -> dict:
    """Set the notes' stated output for "The" beside what their setup gives, and diagnose the gap."""
    claimed = torch.tensor(NOTES_CLAIMED_OUTPUT_THE, dtype=torch.float64)  # (4,)
    got = trace.output[0]  # (4,)
    diff = claimed - got  # (4,)
    w, v = trace.weights[0], trace.steps["V"]  # (L,), (L, d)
    # is the gap one term w_j * v_j of the weighted sum counted a second time?
    extra = [j for j in range(len(trace.tokens)) if torch.allclose(diff, w[j] * v[j], atol=1e-3)]
    return {"claimed": claimed, "computed": got, "difference": diff, "repeated_terms": extra}
