"""Heatmaps of attention weights (matplotlib, Agg backend: no display needed).

Layout is fixed in inches so the PNG's pixel size is known in advance (``png_size``): each
cell is ``CELL_IN`` inches (``CELL_SMALL_IN`` beyond ``ANNOTATE_MAX`` tokens, where the values
no longer fit and are left out of the cells), plus fixed margins for the token labels, the
title and the colour bar, at ``DPI`` dots per inch.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .trace import ExplainTrace, ModelTrace  # noqa: E402

DPI = 100
CELL_IN = 0.55  # a cell with its value written in it
CELL_SMALL_IN = 0.28  # a cell without its value
ANNOTATE_MAX = 16  # write values into cells up to this many rows/columns
LEFT_IN, BOTTOM_IN, TOP_IN, RIGHT_IN, GAP_IN = 1.3, 1.3, 0.6, 1.1, 0.4
LONG_WIDTH_IN = 12.0  # width of the row-strip heatmap for long input
LONG_ROW_IN = 0.45
HEADS_PER_ROW = 4  # heatmaps side by side before a layer's heads wrap onto the next row


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


def _heatmap(ax, trace: ExplainTrace, vmax: float):
    if trace.full:
        m = trace.weights.to(torch.float64).numpy()  # (L, L)
        row_labels = list(trace.tokens)
        col_labels = list(trace.tokens)
    else:
        m = trace.row_weights.to(torch.float64).numpy()  # (r, L)
        row_labels = [f"{trace.tokens[r]}@{r}" for r in trace.rows]
        col_labels = None
    im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(m.shape[0]), row_labels, fontsize=8)
    if col_labels is not None:
        ax.set_xticks(range(m.shape[1]), col_labels, rotation=90, fontsize=8)
    else:
        step = max(1, m.shape[1] // 16)
        ticks = list(range(0, m.shape[1], step))
        ax.set_xticks(ticks, [f"{trace.tokens[j]}@{j}" for j in ticks], rotation=90, fontsize=7)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    if trace.full and max(m.shape) <= ANNOTATE_MAX:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if m[i, j] > 0.6 * vmax else "white")
    return im


def plot_trace(obj, path=None):
    """Heatmap(s) of the attention weights of a trace: one panel per head; PNG to ``path`` if given."""
    grid = _grid(obj)
    width, height = figure_size(obj)
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    pw, ph = _panel(grid[0][0])
    im = None
    for r, heads in enumerate(grid):
        for c, tr in enumerate(heads):
            x0 = c * (LEFT_IN + pw + GAP_IN) + LEFT_IN
            y0 = height - (r + 1) * (TOP_IN + ph + BOTTOM_IN) + BOTTOM_IN
            ax = fig.add_axes((x0 / width, y0 / height, pw / width, ph / height))
            im = _heatmap(ax, tr, 1.0)
            title = tr.label or "attention weights"
            if not tr.full:
                title += f" (rows {', '.join(map(str, tr.rows))} of {len(tr.tokens)})"
            ax.set_title(title, fontsize=9)
    cax = fig.add_axes(((width - RIGHT_IN + 0.25) / width, BOTTOM_IN / height, 0.18 / width, (height - BOTTOM_IN - TOP_IN) / height))
    fig.colorbar(im, cax=cax, label="weight")
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
