"""Telling a person at the terminal what a silent wait is: numba compiling the CPU kernel.

The ``cpu`` backend's kernels are compiled by numba the first time they run and cached on
disk; later processes load them in well under a second. The first compile takes 10-60 s with
nothing on screen, which looks like a hang. :func:`compile_notice` listens to numba's own
compile events (``numba:compile`` fires only on a real compile, never on a cache load) and
prints one line to stderr when the first compile of a watched module starts:

    with compile_notice():
        run_something_that_may_use_the_cpu_backend()
"""

from __future__ import annotations

import contextlib
import sys

KERNEL_MODULE = "selfattn.kernels.cpu_flash"
MESSAGE = "compiling the CPU kernel (first run only, ~20 s; later runs load it from the cache) ..."


def _module_of(dispatcher) -> str:
    fn = getattr(dispatcher, "py_func", None)
    return getattr(fn, "__module__", "") or ""


@contextlib.contextmanager
def compile_notice(what: str = MESSAGE, *, module: str = KERNEL_MODULE, stream=None, enabled: bool | None = None):
    """While active, print ``what`` once (to ``stream``, default stderr) when numba starts compiling
    a function of ``module``.

    ``enabled`` None: only when the stream is a terminal (the CLI passes True to always say it).
    Without numba this does nothing.
    """
    stream = sys.stderr if stream is None else stream
    if enabled is None:
        enabled = bool(getattr(stream, "isatty", lambda: False)())
    try:
        from numba.core import event as ev
    except ImportError:
        enabled = False
    if not enabled:
        yield
        return

    state = {"said": False, "depth": 0}

    class _Listener(ev.Listener):
        def on_start(self, event):
            if not _module_of(event.data.get("dispatcher")).startswith(module):
                return
            if state["depth"] == 0 and not state["said"]:
                state["said"] = True
                print(what, file=stream, flush=True)
            state["depth"] += 1

        def on_end(self, event):
            if not _module_of(event.data.get("dispatcher")).startswith(module):
                return
            state["depth"] -= 1

    listener = _Listener()
    ev.register("numba:compile", listener)
    try:
        yield
    finally:
        ev.unregister("numba:compile", listener)
