"""The end-of-training PNG: loss and accuracy, then each head's attention entropy and max logit."""

from __future__ import annotations

LEGEND_MAX = 8  # more head lines than this: one legend entry per layer (its mean), heads as thin lines


def plot_log(rows: list, path, *, title: str = "", qk_clip: float | None = None) -> None:
    """Draw the log rows of a run (``loop._Log.rows``) to ``path`` (PNG, matplotlib's Agg backend).

    ``qk_clip``: the QK-clip threshold, drawn as a line on the panel of each head's largest logit.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_heads = [r for r in rows if r.get("heads")]
    n_layers = max((len(r["heads"]) for r in with_heads), default=0)
    panels = 1 + 3 * (n_layers > 0)
    fig, axes = plt.subplots(panels, 1, figsize=(9, 3.2 * panels), squeeze=False)
    ax = axes[0, 0]
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="training loss", color="tab:blue")
    held = [r for r in rows if r.get("heldout_loss") is not None]
    if held:
        ax.plot([r["step"] for r in held], [r["heldout_loss"] for r in held], label="held-out loss", color="tab:orange")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    acc_ax = ax.twinx()
    acc_ax.plot(steps, [r["acc"] for r in rows], color="tab:green", alpha=0.5, label="training accuracy")
    if held:
        acc_ax.plot([r["step"] for r in held], [r["heldout_acc"] for r in held], color="tab:red", label="held-out accuracy")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.set_ylabel("accuracy")
    lines = ax.get_legend_handles_labels()
    lines2 = acc_ax.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax.set_title(title, fontsize=9)
    if n_layers:
        styles = ["-", "--", ":", "-."]
        n_heads = max(len(layer) for r in with_heads for layer in r["heads"])
        many = n_layers * n_heads > LEGEND_MAX  # one legend entry per layer instead of per head
        for key, label, a in (("entropy", "attention entropy (nats), mean over queries", axes[1, 0]),
                              ("max_logit", "max logit, mean over queries", axes[2, 0]),
                              ("max_logit_max", "max logit, largest in the step's batch", axes[3, 0])):
            for l in range(n_layers):
                heads_l = max(len(r["heads"][l]) for r in with_heads if len(r["heads"]) > l)
                series = []
                for h in range(heads_l):
                    pts = [(r["step"], r["heads"][l][h][key]) for r in with_heads
                           if len(r["heads"]) > l and len(r["heads"][l]) > h and key in r["heads"][l][h]]
                    series.append(pts)
                    if many:
                        a.plot([p[0] for p in pts], [p[1] for p in pts], color=plt.cm.tab10(l % 10), linewidth=0.6, alpha=0.45)
                    else:
                        a.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=styles[l % len(styles)],
                               color=plt.cm.tab10(h % 10), label=f"layer {l} head {h}")
                if many:  # the layer's mean over its heads, drawn thick, is the legend entry
                    steps_l = [p[0] for p in series[0]]
                    mean = [sum(s[i][1] for s in series if i < len(s)) / sum(1 for s in series if i < len(s))
                            for i in range(len(steps_l))]
                    a.plot(steps_l, mean, color=plt.cm.tab10(l % 10), linewidth=2.2,
                           label=f"layer {l}: mean of {heads_l} heads (thin lines: each head)")
            if key == "max_logit_max" and qk_clip is not None:
                a.axhline(qk_clip, color="black", linestyle="--", linewidth=1.0, label=f"QK-clip threshold {qk_clip:g}")
            a.set_ylabel(label, fontsize=8)
            a.set_xlabel("step")
            a.grid(alpha=0.3)
            a.legend(fontsize=7, ncol=1 if many else max(1, n_layers), loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
