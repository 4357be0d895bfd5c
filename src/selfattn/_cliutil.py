"""What every ``selfattn`` command shares: the usage error, option parsers and the up-front checks.

``cli`` and ``training.command`` import this module; it imports nothing from either, so the
command-line layer has no import cycle. A :class:`UsageError` (or any ``ValueError`` /
``TypeError`` from the library's own validation) becomes one line on stderr and exit status 2
at the single error boundary in :func:`selfattn.cli.main`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from pathlib import Path


class UsageError(ValueError):
    """Bad input on the command line, or an environment that cannot serve it: one line, exit status 2."""


def int_arg(name: str, minimum: int = 1, maximum: int | None = None):
    """An argparse ``type`` for an integer option of at least ``minimum`` (1: positive, 0:
    non-negative) and at most ``maximum``, whose error names the option and the value seen."""
    what = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
    if maximum is not None:
        what += f" no larger than {maximum:,}"

    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {s!r}") from None
        if v < minimum or (maximum is not None and v > maximum):
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {v}")
        return v
    return parse


# torch.manual_seed takes any 64-bit value; larger ones fail deep inside it with "Overflow when unpacking long long"
SEED_MAX = 2**63 - 1


def seed_arg(name: str = "--seed"):
    """An argparse ``type`` for a random seed: an integer from 0 to 2**63 - 1."""
    return int_arg(name, 0, SEED_MAX)


def float_arg(name: str, *, positive: bool = False, allow_none: bool = False):
    """An argparse ``type`` for a finite non-negative (or positive) number; with ``allow_none``
    the words "none"/"off" give -1.0, the caller's sentinel for "no value"."""
    def parse(s):
        if allow_none and s.lower() in ("none", "off"):
            return -1.0
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise argparse.ArgumentTypeError(f"{name} must be a {'positive' if positive else 'non-negative'} number, got {s!r}")
        return v
    return parse


# -- the machine's memory -------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux: MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} EB"


def check_memory(need: float, what: str, hint: str = "") -> None:
    """Refuse (UsageError) a run whose estimated working set ``need`` (bytes) exceeds what the machine
    has available: before anything is allocated, instead of an allocator error deep inside torch."""
    have = available_memory()
    if have is not None and need > have:
        raise UsageError(f"{what} needs about {human_bytes(need)} of memory; this machine has {human_bytes(have)} available"
                         + (f"; {hint}" if hint else ""))


# -- output files ----------------------------------------------------------------------------------

# what each output option writes, and the file name endings it accepts
OUTPUT_KINDS = {"png": (".png",), "html": (".html", ".htm"), "json": (".json",)}


def check_output_file(option: str, path: str, kind: str) -> None:
    """Refuse, before any work, an output path with the wrong ending or a folder that is missing or read-only."""
    endings = OUTPUT_KINDS[kind]
    p = Path(path)
    if p.suffix.lower() not in endings:
        raise UsageError(f"{option} {path}: writes {kind.upper()} data, so the file name must end in "
                         f"{' or '.join(endings)} (got {p.suffix or 'no extension'!r})")
    if p.is_dir():
        raise UsageError(f"{option} {path}: is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{option} {path}: cannot write there (permission denied)")


@contextlib.contextmanager
def writing(option: str, path: str):
    """Name the option and the path when writing an output fails after the up-front checks passed
    (a folder that looks writable but is not, such as /proc for root; a full disk)."""
    try:
        yield
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write it ({e.strerror or e})") from None


def check_output_dir(option: str, path: str) -> None:
    """Refuse an output directory that cannot be created or written, before any work."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{option} {path}: exists and is not a directory")
    probe = p
    while not probe.exists():
        probe = probe.parent if str(probe.parent) != str(probe) else Path(".")
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UsageError(f"{option} {path}: cannot create or write there ({str(probe)!r} is not a writable folder)")
