"""Terminal rendering of a trace: labelled, aligned tables, one per step (rich)."""

from __future__ import annotations

import math

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .trace import (FULL_MATRIX_MAX_TOKENS, ExplainTrace, ModelTrace, compare_with_notes, is_plain_notes_example,
                    stats_summary, top_keys)

# row labels and column labels of each step's matrix: "tok" = the tokens, "dim" = feature index
_AXES = {
    "embeddings": ("tok", "dim"), "W_Q": ("dim", "dim"), "W_K": ("dim", "dim"), "W_V": ("dim", "dim"),
    "Q": ("tok", "dim"), "K": ("tok", "dim"), "V": ("tok", "dim"),
    "scores": ("tok", "tok"), "scaled": ("tok", "tok"), "softcapped": ("tok", "tok"),
    "masked": ("tok", "tok"), "weights": ("tok", "tok"), "dropped": ("tok", "tok"), "output": ("tok", "dim"),
}
_TITLES = {
    "embeddings": "1. Token embeddings", "W_Q": "2. W_Q", "W_K": "2. W_K", "W_V": "2. W_V",
    "Q": "2. Q = E W_Q", "K": "2. K = E W_K", "V": "2. V = E W_V", "scores": "3. Scores Q K^T",
    "scaled": "4. Scaled scores", "softcapped": "4b. Soft-capped scores", "masked": "4c. Masked scores",
    "weights": "5. Softmax: attention weights", "output": "6. Weighted sum of values: contextual embeddings",
}


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


def token_label(trace, j: int) -> str:
    """A key's label: the token, with its position when tokens repeat or the input is long."""
    t = trace.tokens[j]
    return f"{t}@{j}" if len(trace.tokens) > FULL_MATRIX_MAX_TOKENS or trace.tokens.count(t) > 1 else t


def _row_labels(trace, kind, n):
    return [token_label(trace, i) for i in range(n)] if kind == "tok" else [f"d{i}" for i in range(n)]


def step_table(trace: ExplainTrace, name: str, digits: int = 4, width: int | None = None) -> Group:
    """One step as a labelled table; split into column groups when wider than ``width`` characters."""
    m = trace.steps[name]
    rows_kind, cols_kind = _AXES.get(name, ("tok", "dim"))
    title = _TITLES.get(name, name)
    if trace.options.get("example") != "notes" and name in ("Q", "K", "V") and "W_Q" not in trace.steps:
        title = f"{name} (as passed to attention)"
    if name == "scaled":
        title += f" (x {trace.scale:.4g}{' = 1/sqrt(d_k)' if trace.options.get('scaled', True) and abs(trace.scale * math.sqrt(trace.d_k) - 1) < 1e-12 else ''})"
    heading = Text.from_markup(f"\n[bold]{title}[/bold]  [dim]{trace.notes.get(name, '')}[/dim]")
    best = m.amax(dim=1) if name == "weights" else None  # (L,) ties are all marked
    col_labels = _row_labels(trace, cols_kind, m.shape[1])
    row_labels = _row_labels(trace, rows_kind, m.shape[0])
    cells = [[fmt(float(m[i, j]), digits) for j in range(m.shape[1])] for i in range(m.shape[0])]
    marked = [[best is not None and float(m[i, j]) == float(best[i]) > 0 for j in range(m.shape[1])] for i in range(m.shape[0])]
    extra = {}
    if name == "weights":
        extra = {"entropy": [fmt(float(x), digits) for x in trace.stats.entropy],
                 "max logit": [fmt(float(x), digits) for x in trace.stats.max_logit]}
    # split the columns into groups that fit the console, like numpy's wide-array printing
    col_w = [max(len(col_labels[j]), *(len(cells[i][j]) + marked[i][j] for i in range(m.shape[0]))) + 3 for j in range(m.shape[1])]
    label_w = max(len(x) for x in row_labels) + 4
    extra_w = sum(max(len(k), *(len(v) for v in vals)) + 3 for k, vals in extra.items())
    groups, cur, used = [], [], label_w
    for j, w in enumerate(col_w):
        if cur and width is not None and used + w + (extra_w if j == len(col_w) - 1 else 0) > width:
            groups.append(cur)
            cur, used = [], label_w
        cur.append(j)
        used += w
    groups.append(cur)
    parts = [heading]
    for g, cols in enumerate(groups):
        last = g == len(groups) - 1
        t = Table(title=None if len(groups) == 1 else f"columns {cols[0]}..{cols[-1]} of {m.shape[1]}", title_justify="left")
        t.add_column("", style="bold", no_wrap=True)
        for j in cols:
            t.add_column(col_labels[j], justify="right", no_wrap=True)
        if last:
            for k in extra:
                t.add_column(k, justify="right", style="cyan", no_wrap=True)
        for i, label in enumerate(row_labels):
            # mark the largest weight in each row
            row = [f"[bold yellow]*{cells[i][j]}[/bold yellow]" if marked[i][j] else cells[i][j] for j in cols]
            if last:
                row += [vals[i] for vals in extra.values()]
            t.add_row(label, *row)
        parts.append(t)
    return Group(*parts)


def describe_options(opts: dict, sep: str = "   ") -> str:
    parts = []
    if opts.get("example") == "notes":
        parts.append("the notes' example")
    if opts.get("init"):
        parts.append(f"init = {opts['init']}")
    if opts.get("dim") is not None:
        parts.append(f"dim = {opts['dim']}, seed = {opts.get('seed', 0)}")
    if opts.get("causal"):
        parts.append("causal")
    w = opts.get("window")
    if w is not None:
        left, right = w if isinstance(w, (tuple, list)) else (w, 0)
        parts.append(f"window = {left} back, {right} ahead")
    if opts.get("scaled") is False:
        parts.append("NOT scaled (--no-scale)")
    if opts.get("checkpoint"):
        parts.append(f"checkpoint {opts['checkpoint']} ({opts.get('model')}, {opts.get('tokenizer')} tokenizer)")
    return sep.join(parts)


def summary_table(trace: ExplainTrace, digits: int = 4) -> Table:
    """min / mean / max of per-row entropy and max logit, with the token where each extreme occurs."""
    t = Table(title="Per-row statistics (every row; from the attention() call)")
    for c in ("statistic", "min", "at", "mean", "max", "at"):
        t.add_column(c, justify="left" if c in ("statistic", "at") else "right")
    for name, s in stats_summary(trace).items():
        if s is None:
            t.add_row(name, "-", "", "-", "-", "")
            continue
        t.add_row(name, fmt(s["min"], digits), token_label(trace, s["argmin"]), fmt(s["mean"], digits),
                  fmt(s["max"], digits), token_label(trace, s["argmax"]))
    return t


def rows_table(trace: ExplainTrace, digits: int = 4) -> Table:
    """The picked rows: entropy, max logit and the largest weights, each with its key token."""
    t = Table(title=f"Rows {', '.join(str(r) for r in trace.rows)}: the largest attention weights"
                    + ("" if trace.full else " (computed by attention_probs from the saved log-sum-exp)"))
    t.add_column("row", justify="right")
    t.add_column("query", style="bold")
    t.add_column("entropy", justify="right", style="cyan")
    t.add_column("max logit", justify="right", style="cyan")
    t.add_column("largest weights (key: weight)")
    for i, r in enumerate(trace.rows):
        keys = top_keys(trace, i)
        cells = [f"{token_label(trace, j)}: {fmt(w, digits)}" for j, w in keys]
        if cells:
            cells[0] = f"[bold yellow]*{cells[0]}[/bold yellow]"
        t.add_row(str(r), token_label(trace, r), fmt(float(trace.stats.entropy[r]), digits),
                  fmt(float(trace.stats.max_logit[r]), digits), "  ".join(cells) or "(no key allowed)")
    return t


def heads_overview(mt: ModelTrace, digits: int = 4) -> Table:
    t = Table(title="Per-head overview (statistics over every row)")
    for c in ("head", "entropy\nmean", "entropy\nmin", "at", "max logit\nmean", "max logit\nmax", "at"):
        t.add_column(c, justify="left" if c in ("head", "at") else "right")
    for tr in mt.heads:
        s = stats_summary(tr)
        e, m = s["entropy"], s["max_logit"]
        if e is None:
            t.add_row(tr.label, "-", "-", "", "-", "-", "")
            continue
        t.add_row(tr.label, fmt(e["mean"], digits), fmt(e["min"], digits), token_label(tr, e["argmin"]),
                  fmt(m["mean"], digits), fmt(m["max"], digits), token_label(tr, m["argmax"]))
    return t


def _mask_words(opts: dict) -> str:
    w = opts.get("window")
    return ", ".join(x for x in ("causal" if opts.get("causal") else "", f"window {w}" if w is not None else "") if x)


def _uniform_note(trace) -> str:
    n = len(trace.tokens)
    masked = trace.options.get("causal") or trace.options.get("window") is not None
    spread = ("a row spread evenly over the k keys it may see has log k" if masked
              else f"uniform over {n} tokens would be {fmt(math.log(n))}")
    return f"[bold yellow]*[/bold yellow] marks the largest weight in each row; entropy in nats ({spread})."


def render(trace, console: Console | None = None, *, notes_check: bool = False, all_rows_table: bool = False) -> None:
    """Print a trace: every step for short input; statistics and the picked rows for long input."""
    console = console or Console()
    if isinstance(trace, ModelTrace):
        return _render_model(trace, console)
    console.rule("[bold]Self-attention, step by step")
    console.print(f"tokens ({len(trace.tokens)}): {' '.join(trace.tokens) if trace.full else ' '.join(trace.tokens[:24]) + ' ...'}")
    console.print(f"d_k = {trace.d_k}   scale = {trace.scale:.6g}   {describe_options(trace.options)}")
    if trace.full:
        for name in trace.steps:
            console.print(step_table(trace, name, width=console.width))
        console.print(_uniform_note(trace))
        if all_rows_table or trace.rows != list(range(len(trace.tokens))):
            console.print(rows_table(trace))
    else:
        console.print(f"[dim]{len(trace.tokens)} tokens: more than {FULL_MATRIX_MAX_TOKENS}, so no L x L matrix is shown "
                      "(or computed): statistics of every row, then the rows asked for (--rows).[/dim]")
        console.print(summary_table(trace))
        console.print(rows_table(trace))
        console.print(_uniform_note(trace))
    if notes_check and is_plain_notes_example(trace):
        _render_notes_check(trace, console)


def _render_notes_check(trace, console):
    c = compare_with_notes(trace)
    console.rule("[bold]Checked against the notes")
    vec = lambda t: "[" + ", ".join(fmt(float(x)) for x in t) + "]"  # noqa: E731
    console.print(f"The notes state the output for \"{trace.tokens[0]}\" is {vec(c['claimed'])}.")
    console.print(f"Their own setup (these embeddings, W = I, d_k = {trace.d_k}) gives {vec(c['computed'])}.")
    console.print(f"Difference: {vec(c['difference'])}.")
    for j in c["repeated_terms"]:
        w = float(trace.weights[0, j])
        console.print(f"The difference equals weight({trace.tokens[j]}) x V({trace.tokens[j]}) = {fmt(w)} x {vec(trace.steps['V'][j])}: "
                      f"the notes' figure counts the \"{trace.tokens[j]}\" term of the weighted sum twice "
                      f"(its weights add up to {fmt(float(trace.weights[0].sum()) + w)} instead of 1).")
    if not c["repeated_terms"]:
        console.print("The difference is not one repeated term of the weighted sum.")


def _render_model(mt: ModelTrace, console: Console) -> None:
    console.rule("[bold]Attention in a trained model, layer by layer, head by head")
    n = len(mt.tokens)
    console.print(f"tokens ({n}): {' '.join(map(repr, mt.tokens[:48]))}{' ...' if n > 48 else ''}")
    console.print(describe_options(mt.options))
    console.print(heads_overview(mt))
    for layer in mt.layers:
        for tr in layer.heads:
            console.rule(f"[bold]{tr.label}[/bold] ({', '.join(x for x in (layer.kind, _mask_words(tr.options)) if x)})")
            if tr.full:
                console.print(step_table(tr, "weights", width=console.width))
            else:
                console.print(rows_table(tr))
    console.print(_uniform_note(mt.heads[0]))
    if mt.full:
        console.print("[dim]Every step of every head (Q, K, V, scores, ...) is in --html and --json.[/dim]")
