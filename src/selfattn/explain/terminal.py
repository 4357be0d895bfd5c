"""Terminal rendering of an ExplainTrace: labelled, aligned tables, one per step (rich)."""

from __future__ import annotations

import torch
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .trace import ExplainTrace, compare_with_notes

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


def fmt(x: float, digits: int = 4) -> str:
    """How every number is written in tables (shared with the JSON/HTML checks)."""
    if x == float("-inf"):
        return "-inf"
    if x == float("inf"):
        return "inf"
    if x != x:
        return "nan"
    return f"{x:.{digits}f}"


def _labels(kind, tokens, n):
    return list(tokens) if kind == "tok" else [f"d{i}" for i in range(n)]


def step_table(trace: ExplainTrace, name: str, digits: int = 4) -> Group:
    m = trace.steps[name]
    rows_kind, cols_kind = _AXES.get(name, ("tok", "dim"))
    title = _TITLES.get(name, name)
    if name == "scaled":
        title += f" (x {trace.scale:.4g}{' = 1/sqrt(d_k)' if trace.options.get('scaled', True) else ''})"
    heading = Text.from_markup(f"\n[bold]{title}[/bold]  [dim]{trace.notes.get(name, '')}[/dim]")
    t = Table()
    t.add_column("", style="bold")
    for c in _labels(cols_kind, trace.tokens, m.shape[1]):
        t.add_column(c, justify="right")
    if name == "weights":
        t.add_column("entropy", justify="right", style="cyan")
    best = m.amax(dim=1) if name == "weights" else None  # (L,) ties are all marked
    for i, label in enumerate(_labels(rows_kind, trace.tokens, m.shape[0])):
        cells = []
        for j in range(m.shape[1]):
            s = fmt(float(m[i, j]), digits)
            # mark the largest weight in each row
            cells.append(f"[bold yellow]*{s}[/bold yellow]" if best is not None and float(m[i, j]) == float(best[i]) > 0 else s)
        if name == "weights":
            cells.append(fmt(float(trace.stats.entropy[i]), digits))
        t.add_row(label, *cells)
    return Group(heading, t)


def render(trace: ExplainTrace, console: Console | None = None, *, notes_check: bool = False) -> None:
    """Print every step of the trace as a labelled table."""
    console = console or Console()
    opts = trace.options
    console.rule("[bold]Self-attention, step by step")
    console.print(f"tokens: {' '.join(trace.tokens)}   d_k = {trace.d_k}   scale = {trace.scale:.6g}"
                  + ("   causal" if opts.get("causal") else "") + (f"   window = {opts['window']}" if opts.get("window") is not None else ""))
    for name in trace.steps:
        console.print(step_table(trace, name))
    console.print("[bold yellow]*[/bold yellow] marks the largest weight in each row; entropy in nats "
                  f"(uniform over {len(trace.tokens)} tokens would be {float(torch.log(torch.tensor(float(len(trace.tokens))))):.4f}).")
    if notes_check:
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
