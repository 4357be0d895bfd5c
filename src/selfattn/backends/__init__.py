"""The backend registry: every way selfattn can compute attention, and what each supports.

>>> import selfattn
>>> print(selfattn.backends.table())          # doctest: +SKIP
>>> with selfattn.use_backend("math"): ...    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from .base import Backend, BackendUnavailable, Request
from .math import MathBackend
from .reference import ReferenceBackend
from .sdpa import SDPABackend

__all__ = ["Backend", "BackendUnavailable", "Request", "register", "get", "names", "available", "table", "use_backend", "current"]

_REGISTRY: dict[str, Backend] = {}
_CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("selfattn_backend", default="auto")
_ACTIVE = ["auto"]  # use_backend's names, innermost last: what torch.compile reads instead of _CURRENT
#: bumped whenever what auto would pick may change (a registration, a calibration): the short-call
#: path (backends/cpu.py fast_forward) keeps its auto decisions only within one generation
_GENERATION = [0]


def register(backend: Backend) -> Backend:
    """Add a backend to the registry (later issues add fused kernels this way)."""
    _REGISTRY[backend.name] = backend
    _GENERATION[0] += 1
    return backend


for _b in (ReferenceBackend(), MathBackend(), SDPABackend()):
    register(_b)

# fused backends register themselves on import (each module handles a missing numba/triton itself)
from . import cpu as _cpu  # noqa: E402,F401
from . import triton_gpu as _triton_gpu  # noqa: E402,F401


def names() -> list[str]:
    """Registered backend names, plus "auto"."""
    return ["auto", *_REGISTRY]


def get(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"backend: unknown backend {name!r}; choose one of {names()}")
    return _REGISTRY[name]


def available() -> dict[str, dict]:
    """Each backend with its one-line summary and feature support."""
    return {n: {"summary": b.summary, **b.features} for n, b in _REGISTRY.items()}


def table() -> str:
    """The registry as readable text."""
    lines = []
    for n, b in _REGISTRY.items():
        lines.append(f"{n}: {b.summary}")
        lines.extend(f"    {k:<9} {v}" for k, v in b.features.items())
    return "\n".join(lines)


def current() -> str:
    """The backend that ``backend="auto"`` resolves to in this context ("auto" unless use_backend is active)."""
    if torch.compiler.is_compiling():
        # torch.compile cannot read a ContextVar: it reads the process-wide mirror (and guards on it)
        return _ACTIVE[-1]
    return _CURRENT.get()


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: calls with ``backend="auto"`` inside it use backend ``name``."""
    if name != "auto":
        get(name)
    token = _CURRENT.set(name)
    _ACTIVE.append(name)
    try:
        yield
    finally:
        _ACTIVE.pop()
        _CURRENT.reset(token)


def _missing(b: Backend, q, k, v, req: Request, data: bool = True) -> str | None:
    # what b lacks for req (None: it serves it); data=False leaves out the checks that read the tensors'
    # values (a pass over a whole KV cache), which auto makes only for the backend it is about to pick
    if data or not b.data_checks:
        return b.unknown_options(req) or b.unsupported(q, k, v, req)
    return b.unknown_options(req) or b.unsupported(q, k, v, req, data=False)


def choose(name: str, q, k, v, req: Request) -> Backend:
    """Resolve a backend name for a request: explicit names must serve it, "auto" picks the fastest."""
    if name == "auto":
        name = current()
    if name != "auto":
        b = get(name)
        missing = _missing(b, q, k, v, req)
        if missing:
            raise BackendUnavailable(f"backend {name!r} cannot serve this request: it does not support {missing}. Use backend='auto' or one of {names()}")
        return b
    # capable as far as the request goes; the checks that read the tensors' values (a pass over a whole KV
    # cache) only for the backend about to be picked
    capable = [b for b in _REGISTRY.values() if _missing(b, q, k, v, req, data=False) is None]
    ranks = [b.rank(req) for b in capable]
    while capable:
        # the lowest rank, first registered on a tie (a plain loop: torch.compile cannot trace min(key=...))
        i = 0
        for j in range(1, len(capable)):
            if ranks[j] < ranks[i]:
                i = j
        best = capable[i]
        if not best.data_checks or best.unsupported(q, k, v, req) is None:
            return best
        del capable[i], ranks[i]
    # only options no backend knows can do this (reference serves everything else)
    raise BackendUnavailable(f"no backend can serve this request: backend_options {sorted(req.backend_options)} are not known to any backend")
