"""One self-contained HTML report of a trace: no scripts, no network, no external files.

Matrices are HTML tables whose cells are coloured by value (numbers stay text you can search
and copy); the heatmap PNG is embedded as a base64 data URI; per-row statistics are inline
SVG charts. Every number is written with ``terminal.fmt``, the same as in the terminal.
"""

from __future__ import annotations

import base64
import html as _html
import math
from pathlib import Path

import torch

from .labels import (AXES, SINK_WORDS, axis_labels, describe_options, fmt, mask_words, pattern_words, patterns_lines, per_row_colour,
                     prediction_rows, show_token, sink_words, step_title, token_label)
from .trace import (FULL_MATRIX_MAX_TOKENS, ExplainTrace, ModelTrace, compare_with_notes, is_plain_notes_example,
                    stats_summary, top_keys)

_CSS = """
.sa-report { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1b1b1b; max-width: 1400px; }
.sa-report h1 { font-size: 1.5em; margin: 0.3em 0; }
.sa-report h2 { font-size: 1.2em; margin: 1.2em 0 0.3em; border-bottom: 1px solid #ddd; }
.sa-report h3 { font-size: 1.05em; margin: 1em 0 0.3em; }
.sa-report .note { color: #555; margin: 0.2em 0 0.5em; }
.sa-report .meta { color: #333; margin: 0.2em 0; }
.sa-report table.m { border-collapse: collapse; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; margin: 0.3em 0; }
.sa-report table.m th, .sa-report table.m td { border: 1px solid #e3e3e3; padding: 2px 6px; text-align: right; color: #111; }
.sa-report table.m th { background: #f6f6f6; font-weight: 600; }
.sa-report table.m td.max { font-weight: 700; outline: 2px solid #e8a400; outline-offset: -2px; }
.sa-report table.m span.max { font-weight: 700; outline: 2px solid #e8a400; outline-offset: 1px; padding: 0 2px; }
.sa-report table.m td.stat { background: #eef6fb; }
.sa-report .scroll { overflow-x: auto; }
.sa-report img.heatmap { max-width: 100%; border: 1px solid #eee; }
.sa-report details { margin: 0.4em 0; }
.sa-report summary { cursor: pointer; color: #245; }
.sa-report .check { background: #fff8e6; border-left: 4px solid #e8a400; padding: 0.4em 0.8em; }
.sa-report table.m td.masked { background: repeating-linear-gradient(45deg, #e4e4e4 0 3px, #f7f7f7 3px 6px); color: #888; }
.sa-report table.m td.gap, .sa-report table.m th.gap { color: #888; background: #fafafa; text-align: center; }
.sa-report .tok { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
.sa-report svg text { font-family: system-ui, sans-serif; font-size: 10px; fill: #333; }
.sa-report svg text.tok { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
"""


def _e(s) -> str:
    return _html.escape(str(s), quote=True)


def _colour(x: float, lo: float, hi: float, signed: bool) -> tuple:
    # background and text colour of a cell: white -> blue for weights, red/white/blue for signed values
    if not math.isfinite(x):
        return "#d9d9d9", "#333"
    if signed:
        a = max(abs(lo), abs(hi)) or 1.0
        t = max(-1.0, min(1.0, x / a))
        if t >= 0:
            r, g, b = round(255 - 200 * t), round(255 - 130 * t), round(255 - 40 * t)
        else:
            r, g, b = round(255 + 40 * t), round(255 + 190 * t), round(255 + 190 * t)
        dark = abs(t) > 0.7
    else:
        t = 0.0 if hi <= lo else max(0.0, min(1.0, (x - lo) / (hi - lo)))
        r, g, b = round(255 - 225 * t), round(255 - 155 * t), round(255 - 75 * t)
        dark = t > 0.6
    return f"#{r:02x}{g:02x}{b:02x}", ("#fff" if dark else "#111")


TONES = 32  # a table cell's colour is one of this many steps (each side of 0 for signed values): one CSS class each


def _tone(x: float, lo: float, hi: float, signed: bool) -> str:
    """The CSS class of a cell's colour (``_colour`` in ``TONES`` steps): a class a cell, not a style."""
    if not math.isfinite(x):
        return "nf"
    if signed:
        a = max(abs(lo), abs(hi)) or 1.0
        return f"s{round(max(-1.0, min(1.0, x / a)) * TONES)}"
    t = 0.0 if hi <= lo else max(0.0, min(1.0, (x - lo) / (hi - lo)))
    return f"u{round(t * TONES)}"


def _tone_css() -> str:
    rules = [".sa-report table.m td.nf { background: #d9d9d9; color: #333; }"]
    for k in range(-TONES, TONES + 1):
        for cls, (bg, fg) in ((f"s{k}", _colour(k / TONES, -1.0, 1.0, True)),) + (((f"u{k}", _colour(k / TONES, 0.0, 1.0, False)),) if k >= 0 else ()):
            rules.append(f".sa-report table.m td.{cls} {{ background: {bg};{' color: #fff;' if fg == '#fff' else ''} }}")
    return "\n".join(rules)


_TONE_CSS = _tone_css()

# matrices larger than this are shown trimmed (first and last rows/columns); --json has every number
MAX_SHOWN = 64
_TAIL = 4


def _keep(n: int) -> list:
    # indices shown of n, with None where the elided ones would be
    return list(range(n)) if n <= MAX_SHOWN else list(range(MAX_SHOWN - _TAIL)) + [None] + list(range(n - _TAIL, n))


def matrix_table(m: torch.Tensor, row_labels, col_labels, *, mark_max=False, extra=None, weights=False, masked=None) -> str:
    """An HTML table of a matrix, cells coloured by value; ``extra`` adds named columns (statistics).

    ``masked`` (bool, same shape) marks pairs a mask rules out: drawn hatched grey with "masked"
    instead of a number. Matrices over ``MAX_SHOWN`` rows or columns show their first and last ones.
    """
    vals = m.to(torch.float64)
    finite = vals[torch.isfinite(vals)]
    lo, hi = (0.0, 1.0) if weights else ((float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0))
    signed = not weights and lo < 0
    best = vals.amax(dim=1) if mark_max else None
    rows, cols = _keep(vals.shape[0]), _keep(vals.shape[1])
    out = []
    if None in rows or None in cols:
        out.append(f'<p class="note">A {vals.shape[0]} x {vals.shape[1]} matrix: the first and last rows and columns are shown '
                   "(--json writes every number).</p>")
    out.append('<div class="scroll"><table class="m"><thead><tr><th></th>')
    out += ['<th class="gap">&hellip;</th>' if j is None else f'<th class="tok">{_e(col_labels[j])}</th>' for j in cols]
    out += [f'<th class="stat">{_e(k)}</th>' for k in (extra or {})]
    out.append("</tr></thead><tbody>")
    for i in rows:
        if i is None:
            out.append('<tr><th class="gap">&#8942;</th>' + '<td class="gap">&#8942;</td>' * (len(cols) + len(extra or {})) + "</tr>")
            continue
        out.append(f'<tr><th class="tok">{_e(row_labels[i])}</th>')
        for j in cols:
            if j is None:
                out.append('<td class="gap">&hellip;</td>')
                continue
            x = float(vals[i, j])
            if masked is not None and bool(masked[i, j]):
                out.append('<td class="masked" title="ruled out by the mask">masked</td>')
                continue
            cls = _tone(x, lo, hi, signed) + (" max" if best is not None and x == float(best[i]) > 0 else "")
            out.append(f'<td class="{cls}">{fmt(x)}</td>')
        for v in (extra or {}).values():
            out.append(f'<td class="stat">{fmt(float(v[i]))}</td>')
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _step(trace: ExplainTrace, name: str, rows=None, numbered: bool = True) -> str:
    m = trace.steps[name]
    rk, ck = AXES.get(name, ("tok", "dim"))
    row_labels = axis_labels(trace, rk, m.shape[0])
    if rows is not None and rk == "tok":  # long input: only the rows asked for
        m, row_labels = m[rows], [row_labels[r] for r in rows]
    title = step_title(trace, name)
    if not numbered:  # shown alone (a model's head): a step number would ask where the others went
        title = title.split(". ", 1)[-1]
    extra = None
    if name == "weights":
        extra = ({"sink": trace.sink_share} if trace.sink is not None else {}) | {"entropy": trace.stats.entropy,
                                                                                  "max logit": trace.stats.max_logit}
    masked = trace.steps.get("masked")
    masked = torch.isneginf(masked) if name == "weights" and masked is not None else None
    return (f"<h3>{_e(title)}</h3><p class=\"note\">{_e(trace.notes.get(name, ''))}</p>"
            + matrix_table(m, row_labels, axis_labels(trace, ck, m.shape[1]), mark_max=name == "weights",
                           extra=extra, weights=name == "weights", masked=masked))


def _png(obj) -> str:
    from .plot import png_bytes

    data = base64.b64encode(png_bytes(obj)).decode("ascii")
    return f'<img class="heatmap" alt="heatmap of the attention weights" src="data:image/png;base64,{data}">'


def _ticks(lo: float, hi: float, n: int = 4) -> list:
    # a few round values between lo and hi for a y axis
    span = hi - lo
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(values: torch.Tensor, title: str, *, tokens=None, lo: float | None = None, hi: float | None = None,
               width: int = 900, height: int = 190) -> str:
    """An inline SVG line chart of one statistic over the query positions (non-finite values skipped).

    The y axis spans ``lo``..``hi`` when given (callers pass the statistic's natural range, e.g.
    0..log L for entropy, so a flat line looks flat) and always includes the data; it has labelled
    ticks. With ``tokens`` the x axis is labelled with the tokens at evenly spaced positions.
    """
    v = [float(x) for x in values.to(torch.float64)]
    fin = [x for x in v if math.isfinite(x)]
    if not fin:
        return f"<p>{_e(title)}: no finite values</p>"
    lo = min(fin) if lo is None else min(lo, min(fin))
    hi = max(fin) if hi is None else max(hi, max(fin))
    if hi - lo < 1e-9:  # a constant: show it in the middle of a unit-wide axis, not as a zoomed wiggle
        lo, hi = lo - 0.5, hi + 0.5
    span = hi - lo
    # token labels are rotated and run to the right of their tick: room for the last one
    pad_l, pad_r, pad_t, pad_b = (52, 80, 20, 48) if tokens is not None else (52, 12, 20, 22)
    n = len(v)
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b

    def px(i):
        return pad_l + plot_w * (i / max(1, n - 1))

    def py(x):
        return pad_t + plot_h * (1 - (x - lo) / span)

    out = [f'<svg width="{width}" height="{height}" role="img" aria-label="{_e(title)}">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{pad_l}" y="13">{_e(title)}</text>']
    for t in _ticks(lo, hi):
        y = py(t)
        out.append(f'<line x1="{pad_l}" y1="{y:.1f}" x2="{width - pad_r}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{pad_l - 4}" y="{y + 3:.1f}" text-anchor="end">{_e(fmt(t, sig=4))}</text>')
    out.append(f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - pad_r}" y2="{pad_t + plot_h}" stroke="#bbb"/>')
    n_labels = min(n, max(2, plot_w // 70))
    for k in range(n_labels):
        i = round(k * (n - 1) / max(1, n_labels - 1))
        x = px(i)
        label = f"{show_token(tokens[i])}@{i}" if tokens is not None else str(i)
        if len(label) > 14:
            label = label[:13] + "\u2026"
        if tokens is not None:
            out.append(f'<text class="tok" transform="translate({x:.1f},{pad_t + plot_h + 10}) rotate(35)">{_e(label)}</text>')
        else:
            out.append(f'<text x="{x:.1f}" y="{height - 6}" text-anchor="middle">{_e(label)}</text>')
        out.append(f'<line x1="{x:.1f}" y1="{pad_t + plot_h}" x2="{x:.1f}" y2="{pad_t + plot_h + 4}" stroke="#bbb"/>')
    digits = 1 if n <= plot_w else 0  # a point per pixel or more: whole pixels are precise enough
    pts = " ".join(f"{px(i):.{digits}f},{py(x):.{digits}f}" for i, x in _envelope(v, plot_w))
    out.append(f'<polyline fill="none" stroke="#1f5fa8" stroke-width="1.2" points="{pts}"/>')
    if n <= 64:  # few points: mark each, with its token and value on hover
        for i, x in enumerate(v):
            if math.isfinite(x):
                tip = f"{show_token(tokens[i])}@{i}: {fmt(x)}" if tokens is not None else f"{i}: {fmt(x)}"
                out.append(f'<circle cx="{px(i):.1f}" cy="{py(x):.1f}" r="2.2" fill="#1f5fa8"><title>{_e(tip)}</title></circle>')
    out.append("</svg>")
    return "".join(out)


def _envelope(v: list, n_px: int) -> list:
    """[(index, value)] of the finite values; more than two per pixel column: each column's smallest and
    largest, in order (a spike survives, the page does not carry thousands of invisible points)."""
    pts = [(i, x) for i, x in enumerate(v) if math.isfinite(x)]
    if len(v) <= 2 * n_px:
        return pts
    columns: dict = {}
    for i, x in pts:
        columns.setdefault(i * n_px // len(v), []).append((i, x))
    out = []
    for c in sorted(columns):
        group = columns[c]
        lo, hi = min(group, key=lambda p: p[1]), max(group, key=lambda p: p[1])
        out += sorted({lo, hi}) if abs(hi[1] - lo[1]) > 1e-3 * (abs(hi[1]) + 1e-12) else [lo]  # one point where they agree
    return out


def stat_charts(trace: ExplainTrace, label: str = "") -> str:
    """Entropy and max logit per query row, each on its natural axis: entropy from 0 to log L."""
    n = len(trace.tokens)
    prefix = f"{label}: " if label else ""
    ent = line_chart(trace.stats.entropy, f"{prefix}entropy per query row (nats; 0 = all on one key, "
                                          f"{fmt(math.log(n), 2)} = log L = spread evenly over all {n})",
                     tokens=trace.tokens, lo=0.0, hi=math.log(max(n, 2)))
    mx = line_chart(trace.stats.max_logit, f"{prefix}max logit per query row", tokens=trace.tokens, lo=0.0, hi=0.0)
    return ent + mx


STRIP_LEVELS = 32  # colours a strip uses (its numbers are in the table beside it)


def strip(weights: torch.Tensor, *, masked=None, relative: bool = False, width: int = 900, height: int = 14) -> str:
    """An inline SVG heat strip: one row of attention weights over every key.

    ``relative``: colour each weight relative to the row's largest (the choice for long rows,
    where every weight is small). Keys in ``masked`` (bool) are drawn grey, not as weight 0.
    More keys than ``width`` pixels: each pixel shows the largest weight of its keys (grey only
    when all of them are masked), as the PNG's strips do. Colours come in ``STRIP_LEVELS`` steps,
    one path each, so a strip stays a few kilobytes over thousands of keys.
    """
    n = weights.shape[0]
    top = float(weights.max()) if n else 0.0
    vals = weights.tolist()
    gone = masked.tolist() if masked is not None else [False] * n
    f = max(1, -(-n // width))  # keys per drawn column
    cols = []  # per drawn column: None (all masked), or its largest weight
    for j in range(0, n, f):
        seen = [x for x, g in zip(vals[j:j + f], gone[j:j + f]) if not g]
        cols.append(max(seen) if seen else None)
    w = width / max(1, len(cols))
    fills = []
    for x in cols:
        if x is None:
            fills.append("#d9d9d9")
        elif x > 0:
            t = x / top if relative and top > 0 else x
            fills.append(_colour(round(t * STRIP_LEVELS) / STRIP_LEVELS, 0.0, 1.0, False)[0])
        else:
            fills.append(None)  # weight 0: the white background
    runs: dict = {}  # fill -> path segments of its runs of neighbouring columns
    j = 0
    while j < len(fills):
        k = j
        while k < len(fills) and fills[k] == fills[j]:
            k += 1
        if fills[j] is not None:
            runs.setdefault(fills[j], []).append(f"M{j * w:.4g} 0h{max((k - j) * w, 0.6):.4g}v{height}h-{max((k - j) * w, 0.6):.4g}z")
        j = k
    rects = [f'<path fill="{fill}" d="{"".join(d)}"/>' for fill, d in runs.items()]
    what = "weight / largest in the row" if relative else "weight 0-1"
    pooled = f"; each pixel the largest of {f} keys" if f > 1 else ""
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="attention weights over all keys ({what}; grey = masked{pooled})">'
            f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff" stroke="#ddd"/>{"".join(rects)}</svg>')


def _summary(trace: ExplainTrace) -> str:
    out = ['<table class="m"><thead><tr><th>statistic</th><th>min</th><th>at</th><th>mean</th><th>max</th><th>at</th></tr></thead><tbody>']
    for name, s in stats_summary(trace).items():
        if s is None:
            out.append(f"<tr><th>{name}</th><td colspan=5>no row attends to anything</td></tr>")
            continue
        out.append(f"<tr><th>{name}</th><td>{fmt(s['min'])}</td><td>{_e(token_label(trace, s['argmin']))}</td><td>{fmt(s['mean'])}</td>"
                   f"<td>{fmt(s['max'])}</td><td>{_e(token_label(trace, s['argmax']))}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _rows(trace: ExplainTrace) -> str:
    how = "from the full matrix" if trace.full else "recomputed by attention_probs from the saved log-sum-exp"
    relative = per_row_colour(len(trace.tokens))
    scale = ("each strip is coloured relative to its row's largest weight (weights over many keys are all small)" if relative
             else "strip colour: weight from 0 (white) to 1 (dark blue)")
    sink = trace.sink_share
    out = [f"<p class=\"note\">Rows {', '.join(map(str, trace.rows))}, {how}: the largest weights, and each row over every "
           f"key; {scale}; grey = keys the mask rules out.{' ' + _e(SINK_WORDS) if sink is not None else ''}</p>",
           '<table class="m"><thead><tr><th>row</th><th>query</th><th>entropy</th><th>max logit</th>'
           + ("<th>sink</th>" if sink is not None else "") + '<th>largest weights (key: weight; near-zero ones not listed)</th><th>all keys</th></tr></thead><tbody>']
    for i, r in enumerate(trace.rows):
        keys = ", ".join(f"{_e(token_label(trace, j))}: {fmt(w)}" for j, w in top_keys(trace, i))
        out.append(f"<tr><td>{r}</td><th>{_e(token_label(trace, r))}</th><td>{fmt(float(trace.stats.entropy[r]))}</td>"
                   f"<td>{fmt(float(trace.stats.max_logit[r]))}</td>" + (f"<td>{fmt(float(sink[r]))}</td>" if sink is not None else "")
                   + f"<td style=\"text-align:left\">{keys or '(no key allowed)'}</td>"
                   f"<td>{strip(trace.row_weights[i], masked=None if trace.row_masked is None else trace.row_masked[i], relative=relative, width=400)}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _trace_body(trace: ExplainTrace, *, heading=True, png=True) -> str:
    out = []
    n = len(trace.tokens)
    if heading:
        out.append(_tokens_meta(trace.tokens))
        out.append(f'<p class="meta">d_k = {trace.d_k}, scale = {trace.scale:.6g}. {_e(describe_options(trace.options, "; "))}</p>')
    if trace.full:
        if png:
            out.append("<h2>Attention weights (heatmap)</h2>" + _png(trace))
        out.append("<h2>Every step</h2>")
        out += [_step(trace, name) for name in trace.steps]
        masked = trace.options.get("causal") or trace.options.get("window") is not None
        spread = "a row spread evenly over the k keys it may see: log k" if masked else f"uniform over {n} tokens: {fmt(math.log(n))}"
        out.append(f'<p class="note">Outlined: the largest weight in each row. Entropy in nats ({spread}); '
                   "max logit = the largest scaled score the softmax sees in the row."
                   + (f" {_e(SINK_WORDS)}" if trace.sink is not None else "") + "</p>")
        out.append("<h2>Per-row statistics</h2>" + stat_charts(trace))
        if is_plain_notes_example(trace):
            out.append(_notes_check(trace))
    else:
        out.append(f'<p class="note">{n} tokens: more than {FULL_MATRIX_MAX_TOKENS}, where full L x L matrices stop being '
                   "readable, so this report shows the statistics of every row and only the rows asked for; "
                   "no L x L matrix was computed.</p>")
        out.append("<h2>Per-row statistics</h2>" + _summary(trace) + stat_charts(trace))
        out.append("<h2>Rows asked for</h2>" + _rows(trace))
        if png:
            out.append(_png(trace))
        out.append("<details><summary>Embeddings, projections and output of the rows asked for</summary>"
                   + "".join(_step(trace, name, trace.rows) for name in trace.steps) + "</details>")
    return "".join(out)


FOLD_TOKENS = 60  # longer input is folded: its first tokens, then the whole text on request


def _tokens_meta(tokens) -> str:
    shown = " ".join(show_token(t) for t in tokens[:FOLD_TOKENS])
    if len(tokens) <= FOLD_TOKENS:
        return f'<p class="meta">tokens ({len(tokens)}): <span class="tok">{_e(shown)}</span></p>'
    return (f'<details class="meta"><summary>tokens ({len(tokens)}): <span class="tok">{_e(shown)}</span> &hellip; '
            f"(show all {len(tokens)})</summary><p class=\"tok\">{_e(' '.join(show_token(t) for t in tokens))}</p></details>")


def _notes_check(trace) -> str:
    c = compare_with_notes(trace)
    vec = lambda t: "[" + ", ".join(fmt(float(x)) for x in t) + "]"  # noqa: E731
    out = ['<div class="check"><h2>Checked against the notes</h2>',
           f"<p>The notes state the output for &quot;{_e(trace.tokens[0])}&quot; is {vec(c['claimed'])}. "
           f"Their own setup gives {vec(c['computed'])}; the difference is {vec(c['difference'])}.</p>"]
    for j in c["repeated_terms"]:
        w = float(trace.weights[0, j])
        out.append(f"<p>That is weight({_e(trace.tokens[j])}) x V({_e(trace.tokens[j])}) = {fmt(w)} x {vec(trace.steps['V'][j])}: "
                   f"the notes count the &quot;{_e(trace.tokens[j])}&quot; term of the weighted sum twice "
                   f"(their weights add up to {fmt(float(trace.weights[0].sum()) + w)} instead of 1).</p>")
    out.append("</div>")
    return "".join(out)


def _overview(mt: ModelTrace) -> str:
    sinks = any(tr.sink is not None for tr in mt.heads)
    out = ['<table class="m"><thead><tr><th>layer</th><th>head</th><th>kind</th><th>mean entropy</th><th>min entropy</th><th>at</th>'
           "<th>mean max logit</th><th>max max logit</th><th>at</th>" + ("<th>sink logit</th><th>sink share mean (max)</th>" if sinks else "")
           + "<th>pattern (rows putting half their weight on it / rows where it applies)</th></tr></thead><tbody>"]
    for layer in mt.layers:
        for h, tr in enumerate(layer.heads):
            s = stats_summary(tr)
            e, m = s["entropy"], s["max_logit"]
            sink = "" if not sinks else "<td>-</td><td>-</td>" if tr.sink is None else f"<td>{fmt(tr.sink)}</td><td>{sink_words(tr)}</td>"
            if e is None:
                out.append(f"<tr><th>{_e(layer.name)}</th><td>{h}</td><td>{_e(layer.kind)}</td><td colspan=6>no row attends to anything</td>"
                           f"{sink}<td></td></tr>")
                continue
            out.append(f"<tr><th>{_e(layer.name)}</th><td>{h}</td><td>{_e(layer.kind)}</td><td>{fmt(e['mean'])}</td><td>{fmt(e['min'])}</td>"
                       f"<td>{_e(token_label(tr, e['argmin']))}</td><td>{fmt(m['mean'])}</td><td>{fmt(m['max'])}</td>"
                       f"<td>{_e(token_label(tr, m['argmax']))}</td>{sink}<td style=\"text-align:left\">{_e(pattern_words(tr))}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _predictions(mt: ModelTrace) -> str:
    out = ['<p class="note">At each position, the token the model predicts comes next: its three most likely tokens with '
           "their probabilities; outlined: the token that actually follows.</p>",
           '<table class="m"><thead><tr><th>pos</th><th>token</th><th>actual next</th><th>top guesses</th></tr></thead><tbody>']
    for i in prediction_rows(mt):
        actual = mt.tokens[i + 1] if i + 1 < len(mt.tokens) else None
        cells = []
        for tok, p in mt.predictions[i]:
            cls = ' class="max"' if tok == actual else ""
            cells.append(f'<span{cls}><span class="tok">{_e(show_token(tok))}</span>: {p:.3f}</span>')
        nxt = "(end)" if actual is None else f'<span class="tok">{_e(show_token(actual))}</span>'
        out.append(f'<tr><td>{i}</td><th class="tok">{_e(show_token(mt.tokens[i]))}</th><td style="text-align:left">{nxt}</td>'
                   f'<td style="text-align:left">{"&nbsp;&nbsp; ".join(cells)}</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def _model_body(mt: ModelTrace) -> str:
    lines = patterns_lines(mt)
    found = ("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in lines) + "</ul>" if lines else
             '<p class="note">No head puts half its weight on a simple pattern (previous token, itself, first token, '
             "earlier copy, induction) in most of the rows where it applies.</p>")
    out = [_tokens_meta(mt.tokens), f'<p class="meta">{_e(describe_options(mt.options, "; "))}</p>',
           "<h2>Per-head overview</h2>", _overview(mt), "<h3>Recognisable heads</h3>", found]
    if mt.predictions:
        out += ["<h2>The model's predictions</h2>", _predictions(mt)]
    out += ["<h2>Attention weights of every head (heatmaps)</h2>", _png(mt)]
    from .plot import left_out, left_out_note

    if left_out(mt):
        out.append(f'<p class="note">{_e(left_out_note(mt, left_out(mt)))}</p>')
    for layer in mt.layers:
        masks = mask_words(layer.heads[0].options) if layer.heads else ""
        out.append(f"<h2>{_e(layer.name)} ({_e(layer.kind)}, {len(layer.heads)} head{'s' if len(layer.heads) > 1 else ''}"
                   f"{', ' + _e(masks) if masks else ''})</h2>")
        for tr in layer.heads:
            out.append(f"<h3>{_e(tr.label)}{f', sink logit {fmt(tr.sink)}' if tr.sink is not None else ''}</h3>")
            if tr.full:
                out.append(_step(tr, "weights", numbered=False))
                # scores (= scaled / scale) and masked (= scaled, -inf where the weights are hatched) would
                # double the page for nothing a reader cannot see already; --json has them
                skip = {"weights"} | ({"scores", "masked"} if "scaled" in tr.steps else set())
                gone = [n for n in ("scores", "masked") if n in skip and n in tr.steps]
                out.append("<details><summary>the other steps of this head"
                           + (f" ({' and '.join(gone)}: in --json)" if gone else "") + "</summary>"
                           + "".join(_step(tr, name, numbered=False) for name in tr.steps if name not in skip) + "</details>")
            else:
                out.append(_summary(tr) + stat_charts(tr, tr.label) + _rows(tr))
    return "".join(out)


def fragment(obj) -> str:
    """The report's body as an HTML fragment with its own styles (for notebooks)."""
    body = _model_body(obj) if isinstance(obj, ModelTrace) else _trace_body(obj)
    title = "Attention in a model, layer by layer, head by head" if isinstance(obj, ModelTrace) else "Self-attention, step by step"
    return f'<div class="sa-report"><style>{_CSS}{_TONE_CSS}</style><h1>{title}</h1>{body}</div>'


def report(obj, path=None) -> str:
    """The whole self-contained HTML document; written to ``path`` (UTF-8) when given."""
    if not isinstance(obj, (ExplainTrace, ModelTrace)):
        raise TypeError(f"expected an ExplainTrace or ModelTrace, got {type(obj).__name__}")
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
           '<link rel="icon" href="data:,"><title>selfattn explain</title></head><body>'
           + fragment(obj) + "</body></html>\n")
    if path is not None:
        Path(path).write_text(doc, encoding="utf-8")
    return doc
