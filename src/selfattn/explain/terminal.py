"""Terminal rendering of a trace: labelled, aligned tables, one per step (rich)."""

from __future__ import annotations

import math

from rich.console import Console, Group
from rich.table import Table
from rich.markup import escape
from rich.text import Text

import torch

from .labels import (AXES, SINK_WORDS, axis_labels, describe_options, fmt, layer_names, mask_words, patterns_lines, prediction_rows, show_token,
                     sink_words, step_title, token_label)
from .trace import (FULL_MATRIX_MAX_TOKENS, ExplainTrace, ModelTrace, compare_with_notes, is_plain_notes_example,
                    stats_summary, top_keys)

__all__ = ["render", "step_table", "rows_table", "summary_table", "heads_overview", "fmt", "token_label",
           "describe_options", "show_token"]

# shown in full up to these sizes; beyond, the first and last rows/columns with an ellipsis between
# (``full=True`` -- `selfattn explain --full` -- shows every row and column)
MAX_ROWS = 24  # rows of a feature-indexed matrix (W_Q is dim x qk_dim)
TAIL = 2  # columns (and rows) kept at the end of a trimmed matrix
FULL_MAX_CELLS = 200_000  # --full refuses tables larger than this: printing them takes minutes
MASKED = "\u00b7"  # a masked pair in a weights table (weight exactly 0 because the mask rules it out)


def _masked(trace: ExplainTrace):
    """(L, L) bool: pairs the mask rules out, from the "masked" step (None when nothing is masked)."""
    m = trace.steps.get("masked")
    return None if m is None else torch.isneginf(m)


def _keep(n: int, head: int, tail: int) -> list:
    # indices shown of n, with None where the elided ones would be
    if n <= head + tail + 1:
        return list(range(n))
    return list(range(head)) + [None] + list(range(n - tail, n))


def step_table(trace: ExplainTrace, name: str, digits: int = 4, width: int | None = None, *, full: bool = False,
               numbered: bool = True) -> Group:
    """One step as a labelled table.

    Feature columns (d0, d1, ...) wider than ``width`` characters: the first columns that fit and
    the last ``TAIL``, with "…" between. Token columns (at most ``FULL_MATRIX_MAX_TOKENS``) and,
    with ``full=True``, every column are split into several tables like numpy's wide-array printing.
    Feature-indexed rows beyond ``MAX_ROWS`` are trimmed the same way unless ``full``.
    """
    m = trace.steps[name]
    rows_kind, cols_kind = AXES.get(name, ("tok", "dim"))
    n_rows, n_cols = m.shape
    if full and n_rows * n_cols > FULL_MAX_CELLS:
        raise ValueError(f"--full: step {name!r} is a {n_rows} x {n_cols} matrix ({n_rows * n_cols:,} cells), too many to print "
                         f"(at most {FULL_MAX_CELLS:,}); leave out --full to see it trimmed, or write every number with --json")
    title = step_title(trace, name)
    if not numbered:  # shown alone (a model's heads): a step number would ask where the others went
        title = title.split(". ", 1)[-1]
    heading = Text.from_markup(f"\n[bold]{title}[/bold]  [dim]{trace.notes.get(name, '')}[/dim]")
    rows = list(range(n_rows)) if full or rows_kind == "tok" else _keep(n_rows, MAX_ROWS - TAIL - 1, TAIL)
    shown_rows = [i for i in rows if i is not None]
    best = m.amax(dim=1) if name == "weights" else None  # (L,) ties are all marked
    masked = _masked(trace) if name == "weights" else None
    col_labels = axis_labels(trace, cols_kind, n_cols)
    row_labels = [escape(x) for x in axis_labels(trace, rows_kind, n_rows)]

    def cell(i, j):
        if masked is not None and bool(masked[i, j]):
            return f"[dim]{MASKED}[/dim]", 1
        s = fmt(float(m[i, j]), digits)
        if best is not None and float(m[i, j]) == float(best[i]) > 0:
            return f"[bold yellow]*{s}[/bold yellow]", len(s) + 1  # the largest weight in each row
        return s, len(s)

    def col_width(j):
        return max(len(col_labels[j]), *(cell(i, j)[1] for i in shown_rows)) + 3

    extra = {}
    if name == "weights":
        extra = {"sink": [fmt(float(x), digits) for x in trace.sink_share]} if trace.sink is not None else {}
        extra |= {"entropy": [fmt(float(x), digits) for x in trace.stats.entropy],
                 "max logit": [fmt(float(x), digits) for x in trace.stats.max_logit]}
    label_w = max(len(row_labels[i]) for i in shown_rows) + 4
    extra_w = sum(max(len(k), *(len(v) for v in vals)) + 3 for k, vals in extra.items())
    note = ""
    if full or width is None or cols_kind == "tok":
        # every column, in as many tables as the width needs (token columns: at most
        # FULL_MATRIX_MAX_TOKENS of them, so this stays short)
        groups, cur, used = [], [], label_w
        for j in range(n_cols):
            w = col_width(j)
            if cur and width is not None and used + w + (extra_w if j == n_cols - 1 else 0) > width:
                groups.append(cur)
                cur, used = [], label_w
            cur.append(j)
            used += w
        groups.append(cur)
    else:
        # the first columns that fit, "…", the last TAIL columns
        tail = [j for j in range(max(0, n_cols - TAIL), n_cols)]
        used = label_w + extra_w + sum(col_width(j) for j in tail) + 4
        head = []
        for j in range(n_cols - len(tail)):
            w = col_width(j)
            if head and used + w > width:
                break
            head.append(j)
            used += w
        cols = head + ([None] if len(head) + len(tail) < n_cols else []) + tail
        groups = [cols]
        if None in cols or None in rows:
            shown = f"columns {head[0]}-{head[-1]} and {tail[0]}-{tail[-1]} of {n_cols}" if None in cols else f"all {n_cols} columns"
            if None in rows:
                shown += f", rows {rows[0]}-{rows[MAX_ROWS - TAIL - 2]} and {rows[-TAIL]}-{rows[-1]} of {n_rows}"
            note = f"{shown} shown; --full prints every one, --json writes every number"
    parts = [heading] + ([Text(note, style="dim")] if note else [])
    for g, cols in enumerate(groups):
        last = g == len(groups) - 1
        t = Table(title=None if len(groups) == 1 else f"columns {cols[0]}..{cols[-1]} of {n_cols}", title_justify="left")
        t.add_column("", style="bold", no_wrap=True)
        for j in cols:
            t.add_column("\u2026" if j is None else escape(col_labels[j]), justify="right", no_wrap=True)
        if last:
            for k in extra:
                t.add_column(k, justify="right", style="cyan", no_wrap=True)
        for i in rows:
            if i is None:
                t.add_row("\u22ee", *["\u22ee"] * (len(cols) + (len(extra) if last else 0)))
                continue
            row = ["\u2026" if j is None else cell(i, j)[0] for j in cols]
            if last:
                row += [vals[i] for vals in extra.values()]
            t.add_row(row_labels[i], *row)
        parts.append(t)
    return Group(*parts)


def summary_table(trace: ExplainTrace, digits: int = 4) -> Table:
    """min / mean / max of per-row entropy and max logit, with the token where each extreme occurs."""
    t = Table(title="Per-row statistics (every row; from the attention() call)")
    for c in ("statistic", "min", "at", "mean", "max", "at"):
        t.add_column(c, justify="left" if c in ("statistic", "at") else "right")
    for name, s in stats_summary(trace).items():
        if s is None:
            t.add_row(name, "-", "", "-", "-", "")
            continue
        t.add_row(name, fmt(s["min"], digits), escape(token_label(trace, s["argmin"])), fmt(s["mean"], digits),
                  fmt(s["max"], digits), escape(token_label(trace, s["argmax"])))
    return t


def rows_table(trace: ExplainTrace, digits: int = 4) -> Table:
    """The picked rows: entropy, max logit and the largest weights, each with its key token."""
    t = Table(title=f"Rows {', '.join(str(r) for r in trace.rows)}: the largest attention weights"
                    + ("" if trace.full else " (computed by attention_probs from the saved log-sum-exp)"))
    t.add_column("row", justify="right")
    t.add_column("query", style="bold")
    t.add_column("entropy", justify="right", style="cyan")
    t.add_column("max logit", justify="right", style="cyan")
    sink = trace.sink_share
    if sink is not None:
        t.add_column("sink", justify="right", style="magenta")
    t.add_column("largest weights (key: weight; near-zero ones not listed)")
    for i, r in enumerate(trace.rows):
        keys = top_keys(trace, i)
        cells = [f"{escape(token_label(trace, j))}: {fmt(w, digits)}" for j, w in keys]
        if cells:
            cells[0] = f"[bold yellow]*{cells[0]}[/bold yellow]"
        t.add_row(str(r), escape(token_label(trace, r)), fmt(float(trace.stats.entropy[r]), digits),
                  fmt(float(trace.stats.max_logit[r]), digits), *([fmt(float(sink[r]), digits)] if sink is not None else []),
                  "  ".join(cells) or "(no key allowed)")
    return t


def heads_overview(mt: ModelTrace, digits: int = 4) -> Table:
    shorts, pattern = layer_names(layer.name for layer in mt.layers)
    one = len(mt.layers) == 1
    where = f"; {mt.layers[0].name}" if one else f"; layer n is {pattern}" if pattern else ""
    t = Table(title=f"Per-head overview (statistics over every row{escape(where)})")
    sinks = any(tr.sink is not None for tr in mt.heads)
    cols = ([] if one else ["layer"]) + ["head", "entropy\nmean", "entropy min\n(at)", "max logit\nmean", "max logit\nmax (at)"] \
        + (["sink\nlogit", "sink share\nmean (max)"] if sinks else [])
    for c in cols:
        # fold, never truncate: a long module name must not hide the head number or the token
        t.add_column(c, justify="left" if c in ("layer", "head") else "right", overflow="fold")
    for short, layer in zip(shorts, mt.layers):
        for h, tr in enumerate(layer.heads):
            s = stats_summary(tr)
            e, m = s["entropy"], s["max_logit"]
            who = ([] if one else [escape(short) if h == 0 else ""]) + [str(h)]
            sink = [] if not sinks else ["-", "-"] if tr.sink is None else [fmt(tr.sink, digits), sink_words(tr, digits)]
            if e is None:
                t.add_row(*who, "-", "-", "-", "-", *sink)
                continue
            t.add_row(*who, fmt(e["mean"], digits), f"{fmt(e['min'], digits)} ({escape(token_label(tr, e['argmin']))})",
                      fmt(m["mean"], digits), f"{fmt(m['max'], digits)} ({escape(token_label(tr, m['argmax']))})", *sink,
                      end_section=h == len(layer.heads) - 1)
    return t


def predictions_table(mt: ModelTrace) -> Table:
    """At each position: the token, the token that actually follows, and the model's top guesses."""
    t = Table(title="The model's prediction at each position (the next token; probabilities from its output)")
    for c in ("pos", "token", "actual next", "top guesses (token: probability)"):
        t.add_column(c, justify="right" if c == "pos" else "left")
    for i in prediction_rows(mt):
        guesses = mt.predictions[i]
        actual = mt.tokens[i + 1] if i + 1 < len(mt.tokens) else None
        cells = []
        for tok, p in guesses:
            c = f"{escape(show_token(tok))}: {p:.3f}"
            cells.append(f"[bold green]{c}[/bold green]" if tok == actual else c)
        t.add_row(str(i), escape(show_token(mt.tokens[i])), "(end)" if actual is None else escape(show_token(actual)),
                  "  ".join(cells))
    return t


def _uniform_note(trace) -> str:
    n = len(trace.tokens)
    masked = trace.options.get("causal") or trace.options.get("window") is not None
    spread = ("a row spread evenly over the k keys it may see has log k" if masked
              else f"uniform over {n} token{'s' if n != 1 else ''} would be {fmt(math.log(n))}")
    marks = f"; [dim]{MASKED}[/dim] marks a pair the mask rules out (weight exactly 0)" if masked else ""
    return f"[bold yellow]*[/bold yellow] marks the largest weight in each row{marks}; entropy in nats ({spread})." + (
        f" {SINK_WORDS}" if trace.sink is not None else "")


def _tokens_line(tokens, limit: int) -> str:
    shown = " ".join(escape(show_token(t)) for t in tokens[:limit])
    return f"tokens ({len(tokens)}): {shown}" + (f" ... ({len(tokens) - limit} more)" if len(tokens) > limit else "")


def render(trace, console: Console | None = None, *, notes_check: bool = False, all_rows_table: bool = False,
           full: bool = False) -> None:
    """Print a trace: every step for short input; statistics and the picked rows for long input.

    Wide matrices are trimmed to the console's width (first and last columns); ``full`` prints
    every column and row instead.
    """
    console = console or Console()
    if isinstance(trace, ModelTrace):
        return _render_model(trace, console, full=full)
    console.rule("[bold]Self-attention, step by step")
    console.print(_tokens_line(trace.tokens, len(trace.tokens) if trace.full else 24))
    console.print(escape(f"d_k = {trace.d_k}   scale = {trace.scale:.6g}   {describe_options(trace.options)}"))
    if trace.full:
        for name in trace.steps:
            console.print(step_table(trace, name, width=console.width, full=full))
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


def _render_model(mt: ModelTrace, console: Console, *, full: bool = False) -> None:
    # nothing here knows whether the weights were trained (an HF directory may hold a random init)
    name = mt.options.get("model") or "the model"
    console.rule(f"[bold]Attention in {escape(str(name))}, layer by layer, head by head")
    console.print(_tokens_line(mt.tokens, 48))
    console.print(escape(describe_options(mt.options)))
    console.print(heads_overview(mt))
    lines = patterns_lines(mt)
    console.print("[bold]Recognisable heads[/bold]" if lines else
                  "[dim]No head puts half its weight on a simple pattern (previous token, itself, first token, earlier "
                  "copy, induction) in most of the rows where it applies.[/dim]")
    for line in lines:
        console.print("  " + escape(line))
    if mt.predictions:
        console.print(predictions_table(mt))
    for layer in mt.layers:
        for tr in layer.heads:
            console.rule(f"[bold]{tr.label}[/bold] ({', '.join(x for x in (layer.kind, mask_words(tr.options)) if x)})")
            if tr.full:
                console.print(step_table(tr, "weights", width=console.width, full=full, numbered=False))
            else:
                console.print(rows_table(tr))
    console.print(_uniform_note(mt.heads[0]))
    if mt.full:
        console.print("[dim]Every step of every head (Q, K, V, scores, ...) is in --html and --json.[/dim]")
