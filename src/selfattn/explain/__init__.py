"""Look inside attention: a step-by-step trace of one run, rendered for the terminal."""

from __future__ import annotations

from .trace import ExplainTrace, compare_with_notes, notes_example, run

__all__ = ["explain", "ExplainTrace", "compare_with_notes", "notes_example", "run"]


def explain() -> ExplainTrace:
    """Trace the notes' example ("The cat sat", W_Q = W_K = W_V = I, d_k = 4), every step recorded.

    Returns an :class:`ExplainTrace`; ``trace.steps["weights"]`` is the attention matrix,
    ``trace.output`` the contextual embeddings, ``trace.stats`` the per-row statistics.
    """
    return notes_example()
