"""Compute kernels, one module per fused backend (``cpu_flash``: numba, issue 5).

Backends in ``selfattn.backends`` launch them; nothing here is public API.

Where numba caches the compiled CPU kernel: next to this package (``__pycache__``) when that
directory is writable, as numba does by default. When it is not (a system-wide or read-only
install) the cache goes to a per-user directory, ``$XDG_CACHE_HOME/selfattn/numba`` (default
``~/.cache/selfattn/numba``), or failing that ``<tempdir>/selfattn-<user id>/numba``.
``NUMBA_CACHE_DIR`` set in the environment always wins. The choice is made while
``cpu_flash`` is imported (numba fixes a function's cache place when it is decorated) and
applies to selfattn's kernels only; numba's setting for other code is restored afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))


def _writable(directory: str) -> bool:
    """True when numba could write its cache files in ``directory`` (created if missing)."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError:
        return False
    return True


def numba_cache_dir(package_dir: str = _HERE, environ=os.environ) -> str | None:
    """The directory numba should cache the kernels in, or None for numba's own choice.

    None when ``NUMBA_CACHE_DIR`` is set (numba reads it itself) or when the package's
    ``__pycache__`` is writable (numba's default place).
    """
    if environ.get("NUMBA_CACHE_DIR"):
        return None
    if _writable(os.path.join(package_dir, "__pycache__")):
        return None
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for candidate in (os.path.join(base, "selfattn", "numba"),
                      os.path.join(tempfile.gettempdir(), f"selfattn-{_user_id()}", "numba")):
        if _writable(candidate):
            return candidate
    return None  # nowhere to write: numba compiles without a disk cache (it warns once)


def _user_id() -> str:
    getuid = getattr(os, "getuid", None)
    return str(getuid()) if getuid else os.environ.get("USERNAME", "user")


def stamp_sources(namespace: dict, *modules) -> None:
    """Make each disk-cached numba function in ``namespace`` (a kernel module's globals()) stale when the
    source of any of ``modules`` changes, as it already is when its own file does.

    numba keys a cached function on its own source file only, but a kernel compiles
    the numba functions and intrinsics it calls from other modules into itself: after an edit to
    cpu_flash.py, a kernel of cpu_fwd.py loaded from the cache would still run the old cpu_flash code.
    A hash of those modules' files joins the function's own stamp in its cache index."""
    stamps = []
    for mod in modules:
        with open(mod.__file__, "rb") as fh:
            stamps.append(hashlib.sha256(fh.read()).digest())
    for obj in list(namespace.values()):
        index = getattr(getattr(obj, "_cache", None), "_cache_file", None)
        if index is None or not hasattr(index, "_source_stamp"):
            continue  # not a disk-cached dispatcher (or another numba's cache layout: its plain stamp stays)
        if getattr(getattr(obj, "py_func", None), "__module__", None) != namespace["__name__"]:
            continue  # imported from another kernel module: that module stamps its own
        index._source_stamp = (index._source_stamp, *stamps)


@contextlib.contextmanager
def _numba_cache_for_kernels():
    directory = numba_cache_dir()
    if directory is None:
        yield
        return
    from numba.core import config

    previous = config.CACHE_DIR
    config.CACHE_DIR = directory
    try:
        yield
    finally:
        config.CACHE_DIR = previous


# cpu_flash is imported here, inside the context, so its @njit(cache=True) functions get the
# cache directory chosen above. Without numba (or with a broken one) nothing is imported here and
# the CPU backend, importing cpu_flash itself, reports why it cannot serve.
if importlib.util.find_spec("numba") is not None:
    try:
        with _numba_cache_for_kernels():
            from . import cpu_flash  # noqa: F401
    except ImportError:
        pass
