"""`python -m selfattn.cli ARGS` in a process of its own, without paying the imports every time.

A run of the command line as a user makes it spends ~3-5 s of CPU importing torch, numba and selfattn
before it reads its arguments, and the suite runs the CLI some thirty times. ``run_cli`` keeps one helper
process per test process that has imported ``selfattn.cli`` once; each command runs in a child forked
from it, as ``python -m selfattn.cli`` would run it: its own arguments (``sys.argv``), environment,
working directory, stdin, stdout and stderr (files on fds 0-2), ``__main__`` executed by runpy, and an
exit status from its own ``SystemExit`` (an uncaught exception prints its traceback and exits 1, as the
interpreter does). What it does not repeat is the import itself, so whatever the imports print would
show up once, in the helper: the helper fails if they print anything to stderr.

Tests that need the process as a stream (reading its output while it runs, sending it a signal) or
that start other interpreters keep ``subprocess``.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

_HELPER = r"""
import atexit, json, os, runpy, sys, traceback
import selfattn.cli  # what every command would import first

CLI_FILE = selfattn.cli.__file__
del sys.modules["selfattn.cli"], selfattn.cli  # runpy executes it afresh as __main__, as `python -m` does

def child(req):
    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, path, flags in ((0, req["stdin"], os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            f = os.open(path, flags, 0o600)
            os.dup2(f, fd)
            os.close(f)
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # not the helper's reader of requests
        sys.argv = [CLI_FILE, *req["args"]]
        try:
            runpy.run_module("selfattn.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:  # the interpreter's rule for sys.exit(x)
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)

out = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing the parent reads goes through fd 1 but these lines
print(json.dumps({"ready": os.getpid()}), file=out, flush=True)
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(req)
    print(json.dumps({"pid": pid}), file=out, flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), file=out, flush=True)
"""

_STATE: dict = {}


def _helper():
    """This process's helper (started on first use): (Popen, temp dir)."""
    h = _STATE.get("helper")
    if h is not None and h[0].poll() is None:
        return h
    tmp = tempfile.mkdtemp(prefix="selfattn-cli-")
    err = open(os.path.join(tmp, "helper.err"), "w+")
    # this process's environment, as a subprocess gets it: what the imports read (PYTHONPATH, NUMBA_*) comes
    # from here; each command's own environment is set in its child before the command runs
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    p = subprocess.Popen([sys.executable, "-c", _HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                         env=env, cwd=tmp, text=True, bufsize=1)
    line = _read(p, 600)  # the imports: seconds, minutes on a loaded machine
    err.seek(0)
    printed = err.read()
    assert line and "ready" in json.loads(line), f"the CLI helper did not start: {printed[-3000:]}"
    assert printed == "", f"importing selfattn.cli printed to stderr:\n{printed[-3000:]}"
    _STATE["helper"] = (p, tmp)
    atexit.register(_stop, p)
    return p, tmp


def _stop(p):
    if p.poll() is None:
        p.stdin.close()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def _read(p, timeout):
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    return p.stdout.readline() if ready else None


def _text(data: bytes) -> str:
    # what subprocess.run(..., text=True) returns: decoded, universal newlines
    return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def run_cli(*args, env=None, cwd=None, input=None, timeout=120):
    """``subprocess.run([sys.executable, "-m", "selfattn.cli", *args], capture_output=True, text=True, ...)``
    in a child of the helper; a CompletedProcess with ``seconds`` (the command's wall time) added.
    ``env`` None: this process's environment, as subprocess would pass it."""
    p, tmp = _helper()
    files = {name: os.path.join(tmp, name) for name in ("stdin", "stdout", "stderr")}
    with open(files["stdin"], "w", encoding="utf-8") as f:
        f.write(input or "")
    if input is None:
        files["stdin"] = os.devnull
    req = dict(args=[str(a) for a in args], env=dict(os.environ if env is None else env), cwd=str(cwd or os.getcwd()), **files)
    t0 = time.perf_counter()
    p.stdin.write(json.dumps(req) + "\n")
    p.stdin.flush()
    pid = json.loads(_read(p, 60))["pid"]
    line = _read(p, timeout)
    if line is None:
        os.kill(pid, signal.SIGKILL)
        _read(p, 60)
        raise subprocess.TimeoutExpired(["selfattn", *req["args"]], timeout)
    code = json.loads(line)["status"]
    r = subprocess.CompletedProcess(["selfattn", *req["args"]], code)
    with open(files["stdout"], "rb") as f:
        r.stdout = _text(f.read())
    with open(files["stderr"], "rb") as f:
        r.stderr = _text(f.read())
    r.seconds = time.perf_counter() - t0
    return r
