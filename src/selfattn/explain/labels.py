"""Words and numbers every rendering of a trace shares (terminal, HTML, PNG): one place, one spelling.

* :func:`fmt` -- how a number is written;
* :func:`show_token` / :func:`token_label` -- how a token is written (whitespace made visible,
  positions added where tokens repeat or the input is long);
* :data:`AXES` and :func:`step_title` -- what a step's rows and columns are, and its numbered title;
* :func:`describe_options` / :func:`mask_words` -- the run's options in words;
* :func:`weight_scale_note` -- what the colour of a weight cell means;
* :func:`pattern_words` / :func:`patterns_lines` / :func:`prediction_rows` -- a model's heads and predictions in words.
"""

from __future__ import annotations

import math

from .trace import FULL_MATRIX_MAX_TOKENS, PATTERNS, recognised

# row labels and column labels of each step's matrix: "tok" = the tokens, "dim" = feature index
AXES = {
    "embeddings": ("tok", "dim"), "W_Q": ("dim", "dim"), "W_K": ("dim", "dim"), "W_V": ("dim", "dim"),
    "Q": ("tok", "dim"), "K": ("tok", "dim"), "V": ("tok", "dim"),
    "scores": ("tok", "tok"), "scaled": ("tok", "tok"), "softcapped": ("tok", "tok"),
    "masked": ("tok", "tok"), "weights": ("tok", "tok"), "dropped": ("tok", "tok"), "output": ("tok", "dim"),
}

# each step's title and the group it is numbered in; groups are numbered 1, 2, ... in the order
# they appear in a trace, so a run without a mask or soft cap has no gap in its numbering
_STEPS = {
    "embeddings": ("embeddings", "Token embeddings"),
    "W_Q": ("proj", "W_Q"), "W_K": ("proj", "W_K"), "W_V": ("proj", "W_V"),
    "Q": ("proj", "Q = E W_Q"), "K": ("proj", "K = E W_K"), "V": ("proj", "V = E W_V"),
    "scores": ("scores", "Scores Q K^T"),
    "scaled": ("scaled", "Scaled scores"),
    "softcapped": ("softcapped", "Soft-capped scores"),
    "masked": ("masked", "Masked scores (masked pairs: -inf)"),
    "weights": ("weights", "Softmax: attention weights"),
    "dropped": ("dropped", "Dropout"),
    "output": ("output", "Weighted sum of values: contextual embeddings"),
}

# how tokens that print as nothing are shown: a visible stand-in for each whitespace character
_VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d", "\u00a0": "\u237d"}


def fmt(x: float, digits: int = 4, *, sig: int | None = None) -> str:
    """How every number is written in tables, JSON checks and the HTML report.

    ``digits`` decimals by default; ``sig`` significant digits instead (for values that span
    many orders of magnitude, like the softmax Jacobian norms of ``selfattn scaling``).
    """
    if x == float("-inf"):
        return "-inf"
    if x == float("inf"):
        return "inf"
    if x != x:
        return "nan"
    s = f"{x:.{sig}g}" if sig is not None else f"{x:.{digits}f}"
    return s[1:] if s.startswith("-") and not s.strip("-0.") else s  # no "-0.0000"


def show_token(t: str) -> str:
    """A token as a label: whitespace characters become visible marks (space -> '\u2423', newline -> '\u21b5')."""
    if t == "":
        return "\u2205"
    return "".join(_VISIBLE.get(ch, ch) for ch in t) if (t.isspace() or any(ch in _VISIBLE for ch in t)) else t


def token_label(trace, j: int) -> str:
    """A token's label: the token (whitespace made visible), with its position when tokens repeat or the input is long."""
    t = trace.tokens[j]
    shown = show_token(t)
    return f"{shown}@{j}" if len(trace.tokens) > FULL_MATRIX_MAX_TOKENS or trace.tokens.count(t) > 1 else shown


def axis_labels(trace, kind: str, n: int) -> list:
    return [token_label(trace, i) for i in range(n)] if kind == "tok" else [f"d{i}" for i in range(n)]


def step_title(trace, name: str) -> str:
    """The numbered title of a step (numbers follow the steps present in this trace)."""
    groups = []
    for s in trace.steps:
        g = _STEPS.get(s, (s, s))[0]
        if g not in groups:
            groups.append(g)
    group, title = _STEPS.get(name, (name, name))
    if "W_Q" not in trace.steps and name in ("Q", "K", "V"):
        title = f"{name} (as passed to attention)"
    if name == "scaled":
        exact = trace.options.get("scaled", True) and abs(trace.scale * math.sqrt(trace.d_k) - 1) < 1e-12
        title += f" (x {trace.scale:.4g}{' = 1/sqrt(d_k)' if exact else ''})"
    return f"{groups.index(group) + 1}. {title}" if group in groups else title


def mask_words(opts: dict) -> str:
    """'causal', 'window 3 back, 3 ahead', both, or '' -- for titles."""
    parts = ["causal"] if opts.get("causal") else []
    w = opts.get("window")
    if w is not None:
        left, right = w if isinstance(w, (tuple, list)) else (w, 0)
        parts.append(f"window {left} back, {right} ahead")
    return ", ".join(parts)


def describe_options(opts: dict, sep: str = "   ") -> str:
    parts = []
    if opts.get("example") == "notes":
        parts.append("the notes' example")
    if opts.get("init"):
        parts.append(f"init = {opts['init']}")
    if opts.get("dim") is not None:
        parts.append(f"dim = {opts['dim']}, seed = {opts.get('seed', 0)}")
    masks = mask_words(opts)
    if masks:
        parts.append(masks.replace("window ", "window = "))
    if opts.get("scaled") is False:
        parts.append("NOT scaled (--no-scale)")
    if opts.get("checkpoint"):
        what = "transformers model" if opts.get("source") == "transformers" else "checkpoint"
        parts.append(f"{what} {opts['checkpoint']} ({opts.get('model')}, {opts.get('tokenizer')} tokenizer)")
    return sep.join(parts)


def per_row_colour(n_keys: int) -> bool:
    """Whether pictures colour each row of weights relative to its own largest weight.

    With few keys a weight's absolute size (0 to 1) reads well; over many keys a typical weight
    is about 1/L (0.0005 at 2,000 keys), so a fixed 0-1 scale paints every row one colour.
    """
    return n_keys > FULL_MATRIX_MAX_TOKENS


def weight_scale_note(n_keys: int) -> str:
    """What a weight cell's colour means, for legends and captions."""
    if per_row_colour(n_keys):
        return "colour: weight / largest weight in its row (each row scaled on its own)"
    return "colour: weight, 0 to 1"


# what the "sink" column means, wherever it is shown
SINK_WORDS = ("sink: the share of a row's softmax taken by the head's sink (a learned logit with no value, as in gpt-oss); "
              "the row's weights on the keys sum to 1 minus it, and entropy counts the sink as one more outcome.")


def sink_words(tr, digits: int = 4) -> str:
    """'0.4123 (0.9876)' -- a head's mean sink share over the rows, and the largest."""
    share = tr.sink_share  # (L,)
    return f"{fmt(float(share.mean()), digits)} ({fmt(float(share.max()), digits)})"


def layer_names(names) -> tuple:
    """(short names, pattern): what tells the layers apart, and the rest of their names.

    ["model.layers.0.self_attn", "model.layers.1.self_attn"] -> (["0", "1"], "model.layers.<n>.self_attn");
    names with nothing in common beyond dots, or a single layer, stay whole (pattern "").
    """
    names = list(names)
    if len(names) < 2:
        return names, ""
    p = 0
    while all(len(n) > p for n in names) and len({n[p] for n in names}) == 1:
        p += 1
    p = max((names[0].rfind(".", 0, p) + 1) if "." in names[0][:p] else 0, 0)  # back to a dot
    s = 0
    while all(len(n) - s > p for n in names) and len({n[len(n) - 1 - s] for n in names}) == 1:
        s += 1
    tail = names[0][len(names[0]) - s:] if s else ""
    s = len(tail) - tail.find(".") if "." in tail else 0  # forward to a dot
    shorts = [n[p:len(n) - s] for n in names]
    if not p and not s or any(not x for x in shorts) or len(set(shorts)) < len(names):
        return names, ""
    return shorts, f"{names[0][:p]}<n>{names[0][len(names[0]) - s:]}"


def pattern_words(tr) -> str:
    """'induction 5/6, previous token 8/8' -- the patterns a head follows, in how many of the rows where they apply."""
    return ", ".join(f"{name} {f}/{n}" for name, _, n, f, _ in recognised(tr.patterns))


def prediction_rows(mt: ModelTrace) -> list:
    """The positions whose next-token guesses are shown: all for short input, the picked rows for long."""
    n = len(mt.tokens)
    return list(range(n)) if n <= FULL_MATRIX_MAX_TOKENS else list(mt.heads[0].rows)


def patterns_lines(mt: ModelTrace) -> list:
    """One sentence per head with a recognisable pattern."""
    out = []
    for tr in mt.heads:
        for name, w, n, f, u in recognised(tr.patterns):
            out.append(f"{tr.label}: {PATTERNS[name]} -- in {f} of the {n} rows where that applies at least half its "
                       f"weight goes there (mean weight {w:.2f}; {w / u:.1f}x an even spread)")
    return out
