"""Why scores are divided by sqrt(d_k): the notes' worked numbers, then a measured sweep over d_k.

The notes argue that without scaling, dot products grow with d_k, the softmax saturates (one
weight near 1, the rest near 0) and its gradient vanishes. ``notes_numbers`` recomputes their
example with the reference; ``sweep`` measures the general case: for each d_k, queries and
keys with independent unit-variance entries, and for the unscaled and the scaled scores

* the standard deviation of the scores (sqrt(d_k) unscaled, 1 scaled, in theory),
* the mean largest softmax weight (1 = saturated),
* the mean entropy of the weights in nats (0 = saturated, log(n_keys) = uniform),
* the Frobenius norm of the softmax Jacobian diag(p) - p p^T: the size of the gradient that
  flows back through the softmax (0 = vanished), as its mean and its median over queries (the
  mean is carried by the few rows whose two largest scores nearly tie; the median is the
  typical row).

``verdict`` reads the numbers and says plainly whether they show the saturation and the
vanishing gradient the notes describe.
"""

from __future__ import annotations

import math

import torch

from .. import reference

NOTES_QUERY = (2.0, 3.0, 4.0, 1.0)
NOTES_KEYS = ((1.0, 0.0, 1.0, 0.0), (0.0, 1.0, 0.0, 1.0))
D_KS = tuple(2 ** i for i in range(2, 13))  # 4 .. 4096
N_KEYS = 32
N_QUERIES = 512
CHUNK = 16  # queries that share one random key set

# thresholds of the verdict
SATURATED_MAX_WEIGHT = 0.9  # mean largest weight at least this: saturated
VANISHED_RATIO = 0.1  # Jacobian norm below this fraction of the scaled one: vanished


def jacobian_norm(p: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of the softmax Jacobian diag(p) - p p^T, per row of p (..., n) -> (...)."""
    n = p.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool, device=p.device)  # (n, n) True off the diagonal
    outer = p[..., :, None] * p[..., None, :]  # (..., n, n) p_i p_j
    # diagonal p_i (1 - p_i) with 1 - p_i summed from the other weights: no cancellation near saturation
    diag = p * (p[..., None, :] * off).sum(-1)  # (..., n)
    return ((outer * off).pow(2).sum((-2, -1)) + diag.pow(2).sum(-1)).sqrt()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(-1)  # (...,) nats


def notes_numbers() -> dict:
    """The notes' example through the reference: Q = [2, 3, 4, 1], keys [1, 0, 1, 0] and [0, 1, 0, 1]."""
    q = torch.tensor(NOTES_QUERY, dtype=torch.float64)[None, None, None]  # (1, 1, 1, 4)
    k = torch.tensor(NOTES_KEYS, dtype=torch.float64)[None, None]  # (1, 1, 2, 4)
    v = torch.eye(2, dtype=torch.float64)[None, None]  # (1, 1, 2, 2) so the output is the weights
    out = {"query": list(NOTES_QUERY), "keys": [list(x) for x in NOTES_KEYS], "d_k": 4}
    for name, scale in (("unscaled", 1.0), ("scaled", None)):
        rec = reference.Trace()
        reference.attention(q, k, v, scale=scale, trace=rec)
        w = rec["weights"][0, 0, 0]  # (2,)
        out[name] = {"scale": scale if scale is not None else 1 / math.sqrt(q.shape[-1]),
                     "scores": rec["scaled"][0, 0, 0].tolist(), "weights": w.tolist(),
                     "jacobian_norm": float(jacobian_norm(w))}
    out["raw_scores"] = rec["scores"][0, 0, 0].tolist()
    return out


def measure(d_k: int, *, n_keys: int = N_KEYS, n_queries: int = N_QUERIES, generator: torch.Generator | None = None) -> dict:
    """Statistics of softmax(q.k) and softmax(q.k / sqrt(d_k)) for random unit-variance q, k."""
    groups = -(-n_queries // CHUNK)
    q = torch.randn(groups, CHUNK, d_k, generator=generator, dtype=torch.float64)  # (G, c, d_k)
    k = torch.randn(groups, n_keys, d_k, generator=generator, dtype=torch.float64)  # (G, n, d_k) a fresh key set per group
    scores = (q @ k.transpose(-2, -1)).reshape(-1, n_keys)[:n_queries]  # (n_queries, n)
    row = {"d_k": d_k}
    for name, factor in (("unscaled", 1.0), ("scaled", 1.0 / math.sqrt(d_k))):
        s = scores * factor  # (n_queries, n)
        p = torch.softmax(s, dim=-1)  # (n_queries, n)
        j = jacobian_norm(p)  # (n_queries,)
        row[name] = {"std": float(s.std()), "max_weight": float(p.amax(-1).mean()), "entropy": float(_entropy(p).mean()),
                     "jacobian_norm": float(j.mean()), "jacobian_norm_median": float(j.median())}
    return row


def sweep(d_ks=D_KS, *, n_keys: int = N_KEYS, n_queries: int = N_QUERIES, seed: int = 0, progress=None) -> list:
    """One :func:`measure` row per d_k; ``progress(d_k)`` is called after each."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for d in d_ks:
        rows.append(measure(int(d), n_keys=n_keys, n_queries=n_queries, generator=g))
        if progress is not None:
            progress(d)
    return rows


def verdict(rows: list, n_keys: int = N_KEYS) -> dict:
    """Does the sweep show softmax saturation and a vanishing gradient without scaling? Plain sentences."""
    first, last = rows[0], rows[-1]
    u, s = last["unscaled"], last["scaled"]
    saturates = u["max_weight"] >= SATURATED_MAX_WEIGHT and s["max_weight"] < SATURATED_MAX_WEIGHT
    # vanished: the typical (median) row's gradient is a small fraction of the scaled one and of its own at small d_k
    vanishes = (u["jacobian_norm_median"] < VANISHED_RATIO * s["jacobian_norm_median"]
                and u["jacobian_norm_median"] < VANISHED_RATIO * first["unscaled"]["jacobian_norm_median"])
    stds = [r["scaled"]["std"] for r in rows]
    steady = max(stds) / min(stds) < 1.5
    lines = []
    if saturates:
        lines.append(f"Saturation: YES. Without scaling the mean largest weight rises from {first['unscaled']['max_weight']:.3f} at d_k = {first['d_k']} "
                     f"to {u['max_weight']:.3f} at d_k = {last['d_k']} (entropy {u['entropy']:.3g} nats of at most {math.log(n_keys):.3g}); "
                     f"with scaling it stays at {s['max_weight']:.3f}.")
    else:
        lines.append(f"Saturation: NO -- these numbers do not show it (unscaled mean largest weight {u['max_weight']:.3f}, scaled "
                     f"{s['max_weight']:.3f} at d_k = {last['d_k']}).")
    jm, jf, js = u["jacobian_norm_median"], first["unscaled"]["jacobian_norm_median"], s["jacobian_norm_median"]
    if vanishes:
        lines.append(f"Vanishing gradient: YES. Without scaling the typical (median) row's softmax Jacobian norm falls from {jf:.3g} "
                     f"at d_k = {first['d_k']} to {jm:.3g} at d_k = {last['d_k']}, {js / max(jm, 1e-300):.3g} times smaller than with "
                     f"scaling ({js:.3g}). The mean falls less ({first['unscaled']['jacobian_norm']:.3g} -> {u['jacobian_norm']:.3g}, "
                     f"scaled {s['jacobian_norm']:.3g}): a few rows whose two largest scores nearly tie keep a large gradient.")
    else:
        lines.append(f"Vanishing gradient: NO -- these numbers do not show it (median Jacobian norm unscaled {jm:.3g}, scaled "
                     f"{js:.3g} at d_k = {last['d_k']}; mean {u['jacobian_norm']:.3g} vs {s['jacobian_norm']:.3g}).")
    lines.append(f"Scaled scores keep a standard deviation of {min(stds):.3f}..{max(stds):.3f} at every d_k"
                 + ("" if steady else " -- NOT steady, unlike what the theory predicts") + "; unscaled ones grow as sqrt(d_k) "
                 f"({first['unscaled']['std']:.3g} -> {u['std']:.3g}).")
    return {"saturation": saturates, "vanishing_gradient": vanishes, "scaled_std_steady": steady, "text": lines}


def render(notes: dict, rows: list, console=None, *, n_keys: int = N_KEYS) -> None:
    from rich.console import Console
    from rich.table import Table

    from .labels import fmt

    console = console or Console()
    console.rule("[bold]Why divide by sqrt(d_k)? The notes' example")
    console.print(f"Q = {notes['query']}, K1 = {notes['keys'][0]}, K2 = {notes['keys'][1]}, d_k = {notes['d_k']}")
    t = Table()
    for c in ("", "scores", "softmax weights", "softmax Jacobian norm"):
        t.add_column(c, justify="right")
    for name, label in (("unscaled", "without scaling (Q.K)"), ("scaled", f"scaled (Q.K x {notes['scaled']['scale']:g})")):
        d = notes[name]
        t.add_row(label, ", ".join(fmt(x) for x in d["scores"]), ", ".join(fmt(x) for x in d["weights"]), fmt(d["jacobian_norm"]))
    console.print(t)
    console.print("Without scaling most of the weight goes to the first key; scaled, the weights are more balanced and the "
                  "softmax's gradient (its Jacobian norm) is larger, as the notes say.")
    console.rule(f"[bold]The general case: random unit-variance q and k, {n_keys} keys per query")
    t = Table()
    t.add_column("d_k", justify="right")
    t.add_column("scores", justify="left")
    for c in ("score std", "mean max weight", "mean entropy", "Jacobian norm mean", "Jacobian norm median"):
        t.add_column(c, justify="right")
    for r in rows:
        for name in ("unscaled", "scaled"):
            d = r[name]
            t.add_row(str(r["d_k"]) if name == "unscaled" else "", name,
                      *(fmt(d[m], sig=4) for m in ("std", "max_weight", "entropy", "jacobian_norm", "jacobian_norm_median")),
                      style=None if name == "unscaled" else "green", end_section=name == "scaled")
    console.print(t)
    for line in verdict(rows, n_keys)["text"]:
        console.print(line)


def plot(rows: list, path=None, *, n_keys: int = N_KEYS):
    """2 x 2 panels of the sweep (score std, max weight, entropy, Jacobian norm vs d_k), unscaled and scaled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = [r["d_k"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), dpi=100)
    panels = (("std", "score standard deviation", "log"), ("max_weight", "mean largest softmax weight", "linear"),
              ("entropy", f"mean entropy (nats; uniform = {math.log(n_keys):.2f})", "linear"),
              ("jacobian_norm", "softmax Jacobian norm (gradient size)", "log"))
    for ax, (m, title, yscale) in zip(axes.flat, panels):
        for name, style, colour in (("unscaled", "o-", "C0"), ("scaled", "s-", "C1")):
            ax.plot(d, [max(r[name][m], 1e-300) for r in rows], style, color=colour, label=f"{name}" + (" (mean)" if m == "jacobian_norm" else ""))
            if m == "jacobian_norm":
                ax.plot(d, [max(r[name]["jacobian_norm_median"], 1e-300) for r in rows], style[0] + "--", color=colour, label=f"{name} (median)")
        ax.set_xscale("log", base=2)
        ax.set_yscale(yscale)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("d_k")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Softmax saturation without 1/sqrt(d_k) scaling")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100, format="png")
        plt.close(fig)
    return fig
