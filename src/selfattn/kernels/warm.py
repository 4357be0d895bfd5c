"""Compiling the `cpu` backend's kernels ahead of time: ``selfattn compile``, and the test suite before
its workers start.

numba compiles a kernel the first time a call needs it and caches it on disk (this package's
``__init__`` says where); the first float32 forward and backward cost ~50 s of one core, float64
and bfloat16 ~50 s each more. Here one process per group of dtypes makes the calls that need each
variant the backend has -- forward and backward, small calls and large ones (float64: the serial
kernels under ~12 MFLOP (backends.cpu.THREADS_MIN_FLOPS) and numba's parallel ones; float32 and bfloat16 run one kernel on any number
of threads), the short path's row kernel, the small-block path of decoding calls -- so that later
processes only load them. Each group runs as ``python -m selfattn.kernels.warm DTYPE ...`` and
prints one ``done <label> <seconds>`` line per call, which :func:`compile_kernels` reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

#: compute dtypes and the relative compile cost of each group (float16 runs the float32 kernels)
GROUPS = {"float32": 3.0, "float64": 1.0, "bfloat16": 1.0}


def _calls(dtype_name: str):
    """(label, function) pairs whose first runs compile every kernel variant of one compute dtype."""
    import torch

    import selfattn

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)

    def qkv(b, h, lq, lk, d, grad=False):
        q = torch.randn(b, h, lq, d, generator=g).to(dtype)
        k, v = (torch.randn(b, h, lk, d, generator=g).to(dtype) for _ in range(2))
        return [t.requires_grad_(grad) for t in (q, k, v)]

    def forward(*shape, **kw):
        with torch.no_grad():
            selfattn.attention(*qkv(*shape), backend="cpu", **kw)

    def forward_backward(*shape, **kw):
        out = selfattn.attention(*qkv(*shape, grad=True), backend="cpu", **kw)
        out.float().sum().backward()

    yield f"{dtype_name} short calls", lambda: (forward(1, 1, 8, 8, 16), forward(1, 2, 1, 64, 32))
    yield f"{dtype_name} forward", lambda: (forward(1, 1, 16, 16, 16, return_stats=True), forward(1, 2, 256, 256, 64))
    yield f"{dtype_name} forward + backward", lambda: (forward_backward(1, 1, 16, 16, 16), forward_backward(1, 2, 256, 256, 64))
    yield f"{dtype_name} decoding with gradients", lambda: forward_backward(1, 2, 3, 64, 32)
    if dtype_name == "float32":
        yield "float16", lambda: (forward(1, 1, 8, 8, 16), forward_backward(1, 2, 256, 256, 64))
        # the calls above take the lean variants (cpu_flash.lean_variant); a feature takes the full kernels
        yield "float32 with a feature (softcap)", lambda: forward_backward(1, 2, 130, 130, 32, softcap=30.0)


def run_groups(names) -> None:
    """Make the calls of each named group in this process, printing ``done <label> <seconds>`` after
    each (a failing call prints ``failed <label> <error>`` and the next one runs)."""
    for name in names:
        for label, fn in _calls(name):
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 -- reported to the parent, which decides
                print(f"failed {label}\t{type(e).__name__}: {' '.join(str(e).split())[:300]}", flush=True)
                continue
            print(f"done {label}\t{time.perf_counter() - t0:.1f}", flush=True)


def plan(names, jobs: int) -> list[list[str]]:
    """The groups split over at most ``jobs`` processes, heaviest first onto the least loaded."""
    jobs = max(1, min(jobs, len(names)))
    parts, load = [[] for _ in range(jobs)], [0.0] * jobs
    for name in sorted(names, key=lambda n: -GROUPS[n]):
        i = load.index(min(load))
        parts[i].append(name)
        load[i] += GROUPS[name]
    return [p for p in parts if p]


def steps(names) -> int:
    """How many ``done``/``failed`` lines the groups print."""
    return sum(4 + 2 * (name == "float32") for name in names)


def compile_kernels(names=tuple(GROUPS), jobs: int = 2, on_line=None, env=None) -> dict:
    """Compile the kernels of the dtype groups ``names`` in ``jobs`` processes at once.

    ``on_line(kind, label, detail)`` is called from reader threads for every finished call (kind
    "done" with the seconds, or "failed" with the error). Returns {"seconds", "done", "failed"}
    with the lists of labels; a process that dies adds its stderr's last line to "failed".
    """
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise ValueError(f"unknown dtype group(s) {unknown}; choose from {list(GROUPS)}")
    t0 = time.perf_counter()
    result = {"done": [], "failed": []}
    lock = threading.Lock()
    procs = [subprocess.Popen([sys.executable, "-m", "selfattn.kernels.warm", *part], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env if env is not None else os.environ.copy())
             for part in plan(list(names), jobs)]

    def read(p):
        for line in p.stdout:
            kind, _, rest = line.rstrip("\n").partition(" ")
            label, _, detail = rest.partition("\t")
            if kind not in ("done", "failed"):
                continue
            with lock:
                result[kind].append(label if kind == "done" else f"{label}: {detail}")
                if on_line is not None:
                    on_line(kind, label, detail)

    readers = [threading.Thread(target=read, args=(p,), daemon=True) for p in procs]
    for r in readers:
        r.start()
    for p, r in zip(procs, readers):
        err = p.stderr.read()
        p.wait()
        r.join()
        if p.returncode != 0:
            last = (err.strip().splitlines() or ["(no output)"])[-1]
            result["failed"].append(f"process {' '.join(p.args[3:])} exited with status {p.returncode}: {last}")
    result["seconds"] = time.perf_counter() - t0
    return result


if __name__ == "__main__":
    run_groups(sys.argv[1:] or list(GROUPS))
