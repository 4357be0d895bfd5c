"""Start N training processes on this machine without torchrun (``selfattn train --context-parallel N``).

    selfattn train --long --context-parallel 2          # starts 2 processes itself (gloo, localhost)
    torchrun --standalone --nproc_per_node 4 -m selfattn.cli train --long --context-parallel 2   # 2 x 2 data parallel

The parent picks a free localhost port, starts N processes with ``torch.multiprocessing`` (spawn)
and sets in each what torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); each then runs the same ``selfattn train`` as under torchrun, and rank 0 prints.
Ctrl-C reaches every process from the terminal (each finishes its step and they save together);
the parent ignores it and waits. A rank that fails alone would leave the others waiting in a
collective: the parent stops them after ``GRACE_S`` seconds and reports the failed rank's error.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback

GRACE_S = 15.0  # seconds the other ranks get to finish after one rank failed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, fn, args, errors) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        code = fn(args)  # exits the process itself (os._exit) when it finishes normally
    except KeyboardInterrupt:
        code = 130
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which prints one line
        from ..cli import _user_error

        user = _user_error(e)
        if user is None:
            traceback.print_exc()
            user = f"{type(e).__name__}: {e}"
            code = 1
        else:
            code = 2
        errors.put((rank, code, user))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn(n: int, fn, args) -> int:
    """Run ``fn(args)`` in ``n`` new processes forming one gloo group; the exit status of the run."""
    import torch.multiprocessing as mp

    from .._cliutil import UsageError

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, n, port, fn, args, errors), daemon=False) for r in range(n)]
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal sends Ctrl-C to the children too

    def forward_term(signum, frame):
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    old_term = signal.signal(signal.SIGTERM, forward_term)
    try:
        for p in procs:
            p.start()
        failed_at = None
        while any(p.is_alive() for p in procs):
            time.sleep(0.2)
            if failed_at is None and any(p.exitcode not in (None, 0, 130) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
                for p in procs:  # the ranks still waiting for the failed one
                    if p.is_alive():
                        p.terminate()
                break
        for p in procs:
            p.join()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    codes = [p.exitcode for p in procs]
    if reported:
        rank, code, msg = min(reported)
        if code == 2:
            raise UsageError(msg if msg.startswith("rank") else (msg if len(reported) == n else f"rank {rank}: {msg}"))
        raise RuntimeError(f"rank {rank} of {n} failed: {msg}")
    if any(c not in (0, 130) for c in codes):
        raise RuntimeError(f"a training process ended with exit status {[c for c in codes if c not in (0, 130)][0]} "
                           f"(exit statuses by rank: {codes})")
    return 130 if 130 in codes else 0
