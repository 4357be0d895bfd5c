"""Heatmaps of attention weights (matplotlib, Agg backend: no display needed).

Layout is fixed in inches so the PNG's pixel size is known in advance (``png_size``): each
cell is ``CELL_IN`` inches (``CELL_SMALL_IN`` beyond ``ANNOTATE_MAX`` tokens, where the values
no longer fit and are left out of the cells), plus fixed margins for the token labels, the
title and the colour bar, at ``DPI`` dots per inch.

What the colours mean is stated on the colour bar. Up to ``FULL_MATRIX_MAX_TOKENS`` keys a
cell's colour is its weight on a fixed 0-1 scale. Over more keys a typical weight is about
1/L, which a fixed scale paints as one flat colour, so each row is coloured relative to its own
largest weight (written beside the row); rows wider than ``STRIP_COLUMNS`` keys show the largest
weight of each group of neighbouring keys, so a single sharp peak never falls between pixels.
Pairs the mask rules out are hatched grey, never drawn as a weight of 0. Token labels use a
monospaced font (so "I" and "l" differ) and show whitespace tokens as visible marks.

A model's picture is drawn layer by layer under a heading per layer; a layer's heads share their
token labels (rows on the left column, keys under the bottom panels). Beyond ``HEADS_PER_ROW``
heads a layer the cells shrink (at most ``PANEL_MAX_IN`` a heatmap) and eight go in a row; long
input's strips go two a row. Layers that would make the picture taller than ``MAX_HEIGHT_PX``
are left out, and a note at its top names them and the ``--layers`` that draws them.
A head with an attention sink shows the sink's share of each row as a first column labelled
"sink" (full matrices), or under each row label (long strips): the keys' weights sum to 1 minus it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import matplotlib.patches as mpatches  # noqa: E402
import numpy as np  # noqa: E402

from .labels import mask_words, per_row_colour, show_token, weight_scale_note  # noqa: E402
from .trace import ExplainTrace, ModelTrace  # noqa: E402

DPI = 100
CELL_IN = 0.55  # a cell with its value written in it
CELL_SMALL_IN = 0.28  # a cell without its value
ANNOTATE_MAX = 16  # write values into cells up to this many rows/columns
LEFT_IN, BOTTOM_IN, TOP_IN, RIGHT_IN, GAP_IN = 1.3, 1.3, 0.6, 1.1, 0.4
LONG_WIDTH_IN = 12.0  # width of the row-strip heatmap for long input
LONG_ROW_IN = 0.45
HEADS_PER_ROW = 4  # heatmaps side by side before a layer's heads wrap onto the next row
STRIP_COLUMNS = 1000  # long rows with more keys than this are pooled (max of neighbouring keys) to this many columns
MONO = "DejaVu Sans Mono"  # ships with matplotlib; tells "I" from "l" and "0" from "O"
MASKED_FACE, MASKED_HATCH = "#d9d9d9", "#9a9a9a"
NARROW_PX = 6  # a long strip's row with fewer allowed keys than this many pixels still shows them this wide
# a model's picture: heads of a layer share their axes (token labels on the left column and under the
# bottom panels only); with many heads the cells shrink, and layers beyond MAX_HEIGHT_PX are left out
CELL_MIN_IN = 0.12  # the smallest cell of a model's heatmap (a token label still fits beside it)
PANEL_MAX_IN = 2.8  # with more than HEADS_PER_ROW heads in a layer, a head's heatmap is at most this wide
LAYER_IN, TITLE_IN, ROW_GAP_IN, COL_GAP_IN = 0.45, 0.3, 0.1, 0.15  # layer heading, head title, gaps between panels
NOTE_IN = 0.22  # one line of notes under a model's picture
BAR_MAX_IN = 4.0  # the colour bar's largest height
MAX_WIDTH_IN = 27.0  # eight heatmaps a row only while they fit this width
MAX_HEIGHT_PX = 5000  # a model's picture stops before a layer that would make it taller (the note says which)
SINK_LABEL = "sink"



@dataclass
class _Panel:
    trace: ExplainTrace
    box: tuple  # (x, y, width, height) in inches of the data area, from the figure's lower left corner
    title: str
    ylabels: bool = True  # draws its row labels (a model's first column only)
    xlabels: bool = True  # draws its column labels (a model's panels with no panel under them)


@dataclass
class _Layout:
    width: float  # inches
    height: float
    cell: float | None  # inches per cell of a full heatmap (None: row strips of long input)
    panels: list  # _Panel per head drawn
    texts: list  # (x, y, text, fontsize, weight) in inches: layer headings and notes under the picture
    bar: tuple  # the colour bar's (x, y, width, height) in inches
    left_out: list = field(default_factory=list)  # [(LayerTrace, head indices left out)] (every head: the whole layer)


def _cell(n_rows: int, n_cols: int) -> float:
    return CELL_IN if max(n_rows, n_cols) <= ANNOTATE_MAX else CELL_SMALL_IN


def _columns(trace: ExplainTrace) -> int:
    # columns of a full heatmap: the keys, and the sink in front when the head has one
    return len(trace.tokens) + (trace.sink is not None)


def _layout(obj) -> _Layout:
    if isinstance(obj, ModelTrace):
        return _model_layout(obj)
    tr = obj
    if tr.full:
        c = _cell(len(tr.tokens), _columns(tr))
        pw, ph, cell = _columns(tr) * c, len(tr.tokens) * c, c
    else:
        pw, ph, cell = LONG_WIDTH_IN, max(1, len(tr.rows)) * LONG_ROW_IN, None
    width, height = LEFT_IN + pw + GAP_IN + RIGHT_IN, TOP_IN + ph + BOTTOM_IN
    notes = _notes([tr])
    texts = [(LEFT_IN, 0.08 + NOTE_IN * (len(notes) - 1 - i), line, 8, "normal") for i, line in enumerate(notes)]
    bar = (width - RIGHT_IN + 0.25, BOTTOM_IN, 0.18, height - BOTTOM_IN - TOP_IN)
    return _Layout(width, height, cell, [_Panel(tr, (LEFT_IN, BOTTOM_IN, pw, ph), _title(tr, 1))], texts, bar)


def _model_layout(mt: ModelTrace) -> _Layout:
    layers = [layer for layer in mt.layers if layer.heads]
    most = max(len(layer.heads) for layer in layers)
    first = layers[0].heads[0]
    if mt.full:
        cols = max(_columns(h) for h in mt.heads)
        n = len(mt.tokens)
        cell = _cell(n, cols) if most <= HEADS_PER_ROW else min(CELL_SMALL_IN, max(CELL_MIN_IN, PANEL_MAX_IN / cols))
        pw, ph = cols * cell, n * cell
        per_row = min(most, HEADS_PER_ROW if most <= 2 * HEADS_PER_ROW else 2 * HEADS_PER_ROW)
        if per_row > HEADS_PER_ROW and LEFT_IN + per_row * (pw + COL_GAP_IN) + GAP_IN + RIGHT_IN > MAX_WIDTH_IN:
            per_row = HEADS_PER_ROW  # wide heatmaps (many tokens at the smallest cell): four a row
        step, left = pw + COL_GAP_IN, LEFT_IN  # one column of row labels at the left
        width = LEFT_IN + per_row * pw + (per_row - 1) * COL_GAP_IN + GAP_IN + RIGHT_IN
    else:  # strips 12 inches wide, each with its own row labels (the largest weight differs per head)
        cell = None
        pw, ph = LONG_WIDTH_IN, max(1, len(first.rows)) * LONG_ROW_IN
        per_row = 1 if most <= HEADS_PER_ROW else 2
        step, left = LEFT_IN + pw + GAP_IN, LEFT_IN
        width = per_row * step + RIGHT_IN

    def band(k: int) -> float:  # height of a layer showing k heads
        rows = -(-k // per_row)
        return LAYER_IN + rows * (TITLE_IN + ph) + (rows - 1) * ROW_GAP_IN + BOTTOM_IN

    # the layers that fit under MAX_HEIGHT_PX (the first always; its heads cut to whole rows if it alone is too tall)
    budget = MAX_HEIGHT_PX / DPI - TOP_IN - 3 * NOTE_IN
    shown, left_out, used = [], [], 0.0
    for i, layer in enumerate(layers):
        k = len(layer.heads)
        if not shown and band(k) > budget:
            k = max(per_row, per_row * int((budget - LAYER_IN - BOTTOM_IN + ROW_GAP_IN) // (TITLE_IN + ph + ROW_GAP_IN)))
            k = min(k, len(layer.heads))
        if shown and used + band(k) > budget:
            left_out += [(x, list(range(len(x.heads)))) for x in layers[i:]]
            break
        shown.append((layer, k))
        used += band(k)
        if k < len(layer.heads):
            left_out.append((layer, list(range(k, len(layer.heads)))))
    notes = _notes(mt.heads)
    height = TOP_IN + used + NOTE_IN * len(notes) + (0.1 if notes else 0.0)
    panels, texts = [], []
    if left_out:  # said at the top, where a reader starts, and in colour
        texts.append((LEFT_IN, height - TOP_IN + 0.2, left_out_note(mt, left_out), 10, "bold"))
    y = height - TOP_IN  # top of the next layer, inches from the bottom
    for layer, k in shown:
        heads = layer.heads[:k]
        texts.append((left, y - LAYER_IN + 0.12, _layer_heading(layer, mt), 10, "bold"))
        rows = -(-k // per_row)
        for h, tr in enumerate(heads):
            r, c = divmod(h, per_row)
            top = y - LAYER_IN - r * (TITLE_IN + ph + ROW_GAP_IN) - TITLE_IN
            below = h + per_row < k  # another head of this layer is drawn under this one
            x = (left + c * step) if mt.full else (c * step + LEFT_IN)
            panels.append(_Panel(tr, (x, top - ph, pw, ph), _head_title(tr, layer), ylabels=c == 0 or not mt.full,
                                 xlabels=not below))
        y -= LAYER_IN + rows * (TITLE_IN + ph) + (rows - 1) * ROW_GAP_IN + BOTTOM_IN
    for i, line in enumerate(notes):
        texts.append((LEFT_IN, 0.08 + NOTE_IN * (len(notes) - 1 - i), line, 8, "normal"))
    top = height - TOP_IN - LAYER_IN - TITLE_IN
    bar_h = min(BAR_MAX_IN, max(ph, 1.0))
    bar = (width - RIGHT_IN + 0.25, top - bar_h, 0.18, bar_h)
    return _Layout(width, height, cell, panels, texts, bar, left_out)


def _layer_heading(layer, mt: ModelTrace) -> str:
    words = ", ".join(x for x in (layer.kind, mask_words(layer.heads[0].options)) if x)
    n = len(layer.heads)
    text = f"{layer.name} ({words}; {n} head{'s' if n > 1 else ''})"
    tr = layer.heads[0]
    if not tr.full:
        text += f": rows {', '.join(map(str, tr.rows))} of {len(mt.tokens)} tokens"
    return text


def _head_title(tr: ExplainTrace, layer) -> str:
    title = tr.label[len(layer.name):].strip() if tr.label.startswith(layer.name) else tr.label
    return title + (f", sink logit {tr.sink:.3g}" if tr.sink is not None else "")


def _notes(heads) -> list:
    """The lines under a picture: what the colours mean (long rows) and the sink."""
    lines = []
    first = heads[0]
    n_keys = len(first.tokens)
    masked = any(_masked_any(tr) for tr in heads)
    if per_row_colour(n_keys):
        lines.append(weight_scale_note(n_keys) + "; the largest is written under each row label"
                     + ("; hatched grey = keys the mask rules out" if masked else ""))
    if any(tr.sink is not None for tr in heads):
        where = "the 'sink' column" if first.full else "'sink' under each row label"
        lines.append(f"{where}: the share of the row's softmax taken by the head's sink (a learned logit with no value); "
                     "the row's weights on the keys sum to 1 minus it")
    return lines


def left_out_note(mt: ModelTrace, left_out: list) -> str:
    """One sentence naming what a model's picture left out and how to draw it ('' when nothing was)."""
    if not left_out:
        return ""
    said = [f"heads {hs[0]}-{hs[-1]} of {layer.name}" for layer, hs in left_out if len(hs) < len(layer.heads)]
    whole = [layer for layer, hs in left_out if len(hs) == len(layer.heads)]
    ask = ""
    if whole:
        idx = [layer.index for layer in whole]
        known = None not in idx
        one = len(whole) == 1
        names = whole[0].name if one else f"{len(whole)} layers, {whole[0].name} ... {whole[-1].name}"
        said.append(f"{'layer' if one else 'layers'} {_span(idx) if known else ''} ({names})".replace("  ", " "))
        if known:
            fit = max(1, len(mt.layers) - len(whole))  # as many layers as this picture holds
            ask = f"; draw {'it' if one else 'them'} with --layers {_span(idx[:fit])}" + ("" if fit >= len(idx) else ", then the next ones")
    return (f"Left out to keep this picture under {MAX_HEIGHT_PX} px tall: {'; '.join(said)}{ask}. "
            "The terminal, the HTML tables and --json have every head.")


def _span(idx: list) -> str:
    # [3, 4, 5, 9] -> "3-5,9"
    out, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(out)


def _masked_any(tr) -> bool:
    return (tr.row_masked is not None and bool(tr.row_masked.any())) or \
        ("masked" in tr.steps and bool(torch.isneginf(tr.steps["masked"]).any()))


def figure_size(obj) -> tuple:
    """(width, height) in inches of ``plot(obj)``'s figure."""
    lay = _layout(obj)
    return lay.width, lay.height


def png_size(obj) -> tuple:
    """(width, height) in pixels of the PNG that ``plot(obj, path)`` writes."""
    w, h = figure_size(obj)
    return round(w * DPI), round(h * DPI)


def left_out(obj) -> list:
    """[(LayerTrace, head indices)] a model's picture leaves out to stay under ``MAX_HEIGHT_PX`` (empty: none)."""
    return _layout(obj).left_out if isinstance(obj, ModelTrace) else []


def _pool(m: np.ndarray, columns: int) -> tuple:
    # (r, L) -> (r, ceil(L / f)) with the max over each group of f neighbouring keys; NaN (masked)
    # only where the whole group is masked
    f = -(-m.shape[1] // columns)
    if f <= 1:
        return m, 1
    pad = (-m.shape[1]) % f
    x = np.pad(m, ((0, 0), (0, pad)), constant_values=np.nan)
    x = x.reshape(m.shape[0], -1, f)
    with np.errstate(all="ignore"):
        out = np.where(np.isnan(x).all(-1), np.nan, np.nanmax(np.where(np.isnan(x), -np.inf, x), axis=-1))
    return out, f


def _heatmap(ax, trace: ExplainTrace, cell=None, *, xlabels=True, ylabels=True):
    sink = trace.sink_share  # (L,) or None
    if trace.full:
        m = trace.weights.to(torch.float64).numpy().copy()  # (L, L)
        masked = trace.row_masked if trace.rows == list(range(len(trace.tokens))) else None
        if "masked" in trace.steps:
            masked = torch.isneginf(trace.steps["masked"]).numpy()
        row_labels = [show_token(t) for t in trace.tokens]
        col_labels = list(row_labels)
        if sink is not None:  # the sink as one more column in front of the keys, on the same 0-1 scale
            m = np.concatenate([sink.numpy()[:, None], m], axis=1)  # (L, 1 + L)
            if masked is not None:
                masked = np.concatenate([np.zeros((m.shape[0], 1), dtype=bool), np.asarray(masked, dtype=bool)], axis=1)
            col_labels = [SINK_LABEL] + col_labels
    else:
        m = trace.row_weights.to(torch.float64).numpy().copy()  # (r, L)
        masked = trace.row_masked.numpy() if trace.row_masked is not None else None
        row_labels = [f"{show_token(trace.tokens[r])}@{r}" for r in trace.rows]
        col_labels = None
    n_keys = m.shape[1]
    relative = per_row_colour(n_keys)
    if relative:
        top = m.max(axis=1, keepdims=True)  # (r, 1) each row's largest weight
        row_labels = [f"{lab}\nmax {float(t):.3g}" for lab, t in zip(row_labels, top[:, 0])]
        m = m / np.where(top > 0, top, 1.0)
    if sink is not None and not trace.full:
        row_labels = [f"{lab}\n{SINK_LABEL} {float(sink[r]):.3g}" for lab, r in zip(row_labels, trace.rows)]
    if masked is not None:
        m[np.asarray(masked, dtype=bool)] = np.nan  # drawn as the hatched background
    shown, pooled = (_pool(m, STRIP_COLUMNS) if not trace.full else (m, 1))
    ax.set_facecolor(MASKED_FACE)
    ax.patch.set_hatch("////")
    ax.patch.set_edgecolor(MASKED_HATCH)
    extent = (-0.5, n_keys - 0.5, shown.shape[0] - 0.5, -0.5)
    im = ax.imshow(np.ma.masked_invalid(shown), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest",
                   extent=extent)
    if not trace.full:
        _mark_narrow_rows(ax, shown, pooled, n_keys, im.cmap)
    size = 8 if cell is None or cell >= 0.2 else 6
    if trace.full and sink is not None:
        ax.axvline(0.5, color="white", linewidth=2.0)  # the sink column stands apart from the keys
    ax.set_yticks(range(m.shape[0]), row_labels if ylabels else [], fontsize=size, fontfamily=MONO)
    if col_labels is not None:
        ax.set_xticks(range(n_keys), col_labels if xlabels else [], rotation=90, fontsize=size, fontfamily=MONO)
    else:
        step = max(1, n_keys // 16)
        ticks = list(range(0, n_keys, step))
        ax.set_xticks(ticks, [f"{show_token(trace.tokens[j])}@{j}" for j in ticks] if xlabels else [], rotation=90, fontsize=7,
                      fontfamily=MONO)
    if xlabels:
        ax.set_xlabel("key (attended to)" + (f"; each column: largest of {pooled} neighbouring keys" if pooled > 1 else ""),
                      fontsize=8)
    if ylabels:
        ax.set_ylabel("query", fontsize=8)
    if trace.full and max(m.shape) <= ANNOTATE_MAX + (sink is not None) and (cell is None or cell >= CELL_IN):
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if m[i, j] > 0.6 else "white")
    return im


def _mark_narrow_rows(ax, shown, pooled: int, n_keys: int, cmap) -> None:
    # a row that may see only a few keys (query 0 under a causal mask: one) would be a cell under a
    # pixel wide in a long strip, and the row would look wholly masked: draw its allowed keys at
    # least NARROW_PX wide, outlined, in the colour of their largest weight
    key_per_px = n_keys / (LONG_WIDTH_IN * DPI)
    for i, row in enumerate(shown):
        cols = np.flatnonzero(~np.isnan(row))
        if len(cols) == 0:
            continue
        lo, hi = cols[0] * pooled - 0.5, min((cols[-1] + 1) * pooled, n_keys) - 0.5
        if (hi - lo) / key_per_px >= NARROW_PX:
            continue
        w = NARROW_PX * key_per_px
        x = min(max(lo - (w - (hi - lo)) / 2, -0.5), n_keys - 0.5 - w)
        ax.add_patch(mpatches.Rectangle((x, i - 0.42), w, 0.84, facecolor=cmap(float(np.nanmax(row))),
                                        edgecolor="white", linewidth=0.8, zorder=3))


def _title(tr: ExplainTrace, n_heads: int) -> str:
    title = tr.label or "attention weights"
    if tr.label and n_heads > 1 and "head" in tr.label:
        title += f" of {n_heads}"
    words = mask_words(tr.options)
    if words:
        title += f" ({words})"
    if tr.sink is not None:
        title += f", sink logit {tr.sink:.3g}"
    if not tr.full:
        title += f"\nrows {', '.join(map(str, tr.rows))} of {len(tr.tokens)} tokens"
    return title


def plot_trace(obj, path=None):
    """Heatmap(s) of the attention weights of a trace: one panel per head; PNG to ``path`` if given.

    A model's heads are drawn layer by layer, sharing token labels; layers that would make the
    picture taller than ``MAX_HEIGHT_PX`` are left out, and a note under the picture names them.
    """
    lay = _layout(obj)
    width, height = lay.width, lay.height
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    im = None
    for p in lay.panels:
        x, y, w, h = p.box
        ax = fig.add_axes((x / width, y / height, w / width, h / height))
        im = _heatmap(ax, p.trace, lay.cell, xlabels=p.xlabels, ylabels=p.ylabels)
        ax.set_title(p.title, fontsize=9)
    for x, y, text, size, weight in lay.texts:
        colour = "#a02020" if text.startswith("Left out") else "#222" if weight == "bold" else "#333"
        fig.text(x / width, y / height, text, fontsize=size, fontweight=weight, color=colour)
    bx, by, bw, bh = lay.bar
    cax = fig.add_axes((bx / width, by / height, bw / width, bh / height))
    n_keys = len(lay.panels[0].trace.tokens)
    bar = fig.colorbar(im, cax=cax)
    if per_row_colour(n_keys):
        bar.set_label("weight / row's largest", fontsize=8)  # the full sentence is under the figure
    else:
        masked = any(_masked_any(p.trace) for p in lay.panels)
        bar.set_label("weight, 0 to 1" + ("; hatched = masked" if masked else ""), fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=DPI, format="png")
        plt.close(fig)
    return fig


def png_bytes(obj) -> bytes:
    """The PNG of ``plot_trace(obj)`` as bytes (for embedding in HTML)."""
    import io

    fig = plot_trace(obj)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    plt.close(fig)
    return buf.getvalue()
