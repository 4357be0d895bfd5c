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
"""

from __future__ import annotations

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


def _cell(n_rows: int, n_cols: int) -> float:
    return CELL_IN if max(n_rows, n_cols) <= ANNOTATE_MAX else CELL_SMALL_IN


def _panel(trace: ExplainTrace) -> tuple:
    # (data width, data height) in inches of one head's heatmap
    if trace.full:
        n = len(trace.tokens)
        c = _cell(n, n)
        return n * c, n * c
    return LONG_WIDTH_IN, max(1, len(trace.rows)) * LONG_ROW_IN


def _grid(obj) -> list:
    # a row of panels per layer, at most HEADS_PER_ROW wide (a layer with more heads goes on over
    # several rows); long-input strips (12 inches wide) are stacked one per row
    if isinstance(obj, ModelTrace):
        if not obj.full:
            return [[h] for h in obj.heads]
        return [layer.heads[i:i + HEADS_PER_ROW] for layer in obj.layers for i in range(0, len(layer.heads), HEADS_PER_ROW)]
    return [[obj]]


def figure_size(obj) -> tuple:
    """(width, height) in inches of ``plot(obj)``'s figure."""
    grid = _grid(obj)
    pw, ph = _panel(grid[0][0])
    ncols = max(len(r) for r in grid)
    width = ncols * (LEFT_IN + pw + GAP_IN) + RIGHT_IN
    height = len(grid) * (TOP_IN + ph + BOTTOM_IN)
    return width, height


def png_size(obj) -> tuple:
    """(width, height) in pixels of the PNG that ``plot(obj, path)`` writes."""
    w, h = figure_size(obj)
    return round(w * DPI), round(h * DPI)


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


def _heatmap(ax, trace: ExplainTrace):
    if trace.full:
        m = trace.weights.to(torch.float64).numpy().copy()  # (L, L)
        masked = trace.row_masked if trace.rows == list(range(len(trace.tokens))) else None
        if "masked" in trace.steps:
            masked = torch.isneginf(trace.steps["masked"]).numpy()
        row_labels = [show_token(t) for t in trace.tokens]
        col_labels = list(row_labels)
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
    ax.set_yticks(range(m.shape[0]), row_labels, fontsize=8, fontfamily=MONO)
    if col_labels is not None:
        ax.set_xticks(range(n_keys), col_labels, rotation=90, fontsize=8, fontfamily=MONO)
    else:
        step = max(1, n_keys // 16)
        ticks = list(range(0, n_keys, step))
        ax.set_xticks(ticks, [f"{show_token(trace.tokens[j])}@{j}" for j in ticks], rotation=90, fontsize=7, fontfamily=MONO)
    ax.set_xlabel("key (attended to)" + (f"; each column: largest of {pooled} neighbouring keys" if pooled > 1 else ""),
                  fontsize=8)
    ax.set_ylabel("query", fontsize=8)
    if trace.full and max(m.shape) <= ANNOTATE_MAX:
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
    if not tr.full:
        title += f"\nrows {', '.join(map(str, tr.rows))} of {len(tr.tokens)} tokens"
    return title


def plot_trace(obj, path=None):
    """Heatmap(s) of the attention weights of a trace: one panel per head; PNG to ``path`` if given."""
    grid = _grid(obj)
    width, height = figure_size(obj)
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    pw, ph = _panel(grid[0][0])
    heads_of = {}
    if isinstance(obj, ModelTrace):
        heads_of = {id(h): len(layer.heads) for layer in obj.layers for h in layer.heads}
    im = None
    first = grid[0][0]
    for r, heads in enumerate(grid):
        for c, tr in enumerate(heads):
            x0 = c * (LEFT_IN + pw + GAP_IN) + LEFT_IN
            y0 = height - (r + 1) * (TOP_IN + ph + BOTTOM_IN) + BOTTOM_IN
            ax = fig.add_axes((x0 / width, y0 / height, pw / width, ph / height))
            im = _heatmap(ax, tr)
            ax.set_title(_title(tr, heads_of.get(id(tr), 1)), fontsize=9)
    cax = fig.add_axes(((width - RIGHT_IN + 0.25) / width, BOTTOM_IN / height, 0.18 / width, (height - BOTTOM_IN - TOP_IN) / height))
    n_keys = len(first.tokens)
    bar = fig.colorbar(im, cax=cax)
    masked = _any_masked(grid)
    if per_row_colour(n_keys):
        # the strip is short: a two-line label on the bar, the full sentence under the figure
        bar.set_label("weight / row's largest", fontsize=8)
        fig.text(LEFT_IN / width, 0.08 / height, weight_scale_note(n_keys) + "; the largest is written under each row label"
                 + ("; hatched grey = keys the mask rules out" if masked else ""), fontsize=8, color="#333")
    else:
        bar.set_label("weight, 0 to 1" + ("; hatched = masked" if masked else ""), fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=DPI, format="png")
        plt.close(fig)
    return fig


def _any_masked(grid) -> bool:
    return any(tr.row_masked is not None and bool(tr.row_masked.any()) or
               ("masked" in tr.steps and bool(torch.isneginf(tr.steps["masked"]).any())) for row in grid for tr in row)


def png_bytes(obj) -> bytes:
    """The PNG of ``plot_trace(obj)`` as bytes (for embedding in HTML)."""
    import io

    fig = plot_trace(obj)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    plt.close(fig)
    return buf.getvalue()
