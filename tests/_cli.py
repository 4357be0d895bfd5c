"""Programs in a process of their own, without paying the imports every time: ``python -m MODULE ARGS`` or
``python FILE ARGS``, each in a child forked from a helper process that imported what they import.

A run of the command line as a user makes it spends ~3-5 s of CPU importing torch, numba and selfattn
before it reads its arguments, and the suite runs the CLI some thirty times (and the benchmark scripts a
dozen, tests/test_benchmarks_smoke.py). A ``ForkServer`` keeps one helper process per test process, started
on first use, that has run its ``preload`` code (the imports) once; each run is a child forked from it, run as
the interpreter would run it: its own arguments (``sys.argv``), environment, working directory, stdin, stdout
and stderr (files on fds 0-2), ``sys.path[0]`` (the working directory for a module, the file's folder for a
file), ``__main__`` executed by runpy (a module afresh, even if the preload imported it), the atexit handlers
at its end, and an exit status from its own ``SystemExit`` (an uncaught exception prints its traceback and
exits 1, as the interpreter does). What it does not repeat is the imports, so whatever they print would show
up once, in the helper: the helper fails if they print anything to stderr (unless told it may).

``run_cli`` runs ``python -m selfattn.cli``. Tests that need the process as a stream (reading its output
while it runs, sending it a signal) or that start other interpreters keep ``subprocess``.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# the helper's loop, run after its preload: one JSON request a line on stdin ({"module": name} or {"path": file},
# with args, env, cwd and the stdin/stdout/stderr files), one fork each; it answers the child's pid, then its
# exit status and CPU seconds
_SERVE = r"""
import atexit, json, os, runpy, sys, traceback

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
        try:
            if "module" in req:  # python -m MODULE
                name = req["module"]
                parent, _, last = name.rpartition(".")
                if sys.modules.pop(name, None) is not None and hasattr(sys.modules.get(parent), last):
                    delattr(sys.modules[parent], last)  # runpy executes it afresh as __main__, as `python -m` does
                sys.path[0] = os.getcwd()
                sys.argv = [name, *req["args"]]  # run_module puts the module's file first
                runpy.run_module(name, run_name="__main__", alter_sys=True)
            else:  # python FILE
                sys.path[0] = os.path.dirname(os.path.realpath(req["path"]))
                sys.argv = [req["path"], *req["args"]]
                runpy.run_path(req["path"], run_name="__main__")
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
assert sys.path[0] == "", sys.path[:1]  # -c's entry, which each child replaces with its own
print(json.dumps({"ready": os.getpid()}), file=out, flush=True)
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(req)
    print(json.dumps({"pid": pid}), file=out, flush=True)
    _, status, usage = os.wait4(pid, 0)
    print(json.dumps({"status": os.waitstatus_to_exitcode(status), "cpu": usage.ru_utime + usage.ru_stime}), file=out, flush=True)
"""


def _read(p, timeout):
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    return p.stdout.readline() if ready else None


def _text(data: bytes) -> str:
    # what subprocess.run(..., text=True) returns: decoded, universal newlines
    return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def _stop(p, tmp):
    if p.poll() is None:
        p.stdin.close()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(tmp, ignore_errors=True)


class ForkServer:
    """Runs programs in children of one helper process (per test process) that ran ``preload`` once.

    ``preload``: Python code, the imports the programs would make first. Each child inherits what it
    imported, and no more: the preload should run no torch operation (the children would inherit no
    thread pool it started, but a lock it held). ``imports_may_print``: the preload may write to stderr."""

    def __init__(self, what: str, preload: str, *, imports_may_print: bool = False):
        self.what, self.preload, self.imports_may_print = what, preload, imports_may_print
        self._helper = None  # (Popen, temp dir)

    def _start(self):
        if self._helper is not None and self._helper[0].poll() is None:
            return self._helper
        tmp = tempfile.mkdtemp(prefix="selfattn-fork-server-")
        err = open(os.path.join(tmp, "helper.err"), "w+")
        # this process's environment, as a subprocess gets it: what the imports read (PYTHONPATH, NUMBA_*) comes
        # from here; each program's own environment is set in its child before it runs
        env = dict(os.environ, PYTHONIOENCODING="utf-8")
        p = subprocess.Popen([sys.executable, "-c", self.preload + "\n" + _SERVE], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=err, env=env, cwd=tmp, text=True, bufsize=1)
        line = _read(p, 600)  # the imports: seconds, minutes on a loaded machine
        err.seek(0)
        printed = err.read()
        assert line and "ready" in json.loads(line), f"the {self.what} helper did not start: {printed[-3000:]}"
        assert self.imports_may_print or printed == "", f"the {self.what} helper's imports printed to stderr:\n{printed[-3000:]}"
        self._helper = (p, tmp)
        atexit.register(_stop, p, tmp)
        return self._helper

    def stop(self):
        """Lets the helper end, if it runs: it exits once it has read its last request (reaped at exit); the next
        run starts another."""
        if self._helper is not None:
            self._helper[0].stdin.close()
            self._helper = None

    def run(self, *, module: str | None = None, path: str | None = None, args=(), env=None, cwd=None, input=None,
            timeout=120, name: str | None = None) -> subprocess.CompletedProcess:
        """``subprocess.run([sys.executable, "-m", module | path, *args], capture_output=True, text=True, ...)``
        in a child of the helper; a CompletedProcess with ``seconds`` (the program's wall time) and
        ``cpu_seconds`` (its CPU time, and its waited-for children's) added. ``env`` None: this process's
        environment, as subprocess would pass it; ``cwd`` None: this process's working directory. ``name``:
        the program's name in the CompletedProcess's (or TimeoutExpired's) args, by default the module or
        the file's name."""
        assert (module is None) != (path is None), "a module or a path"
        p, tmp = self._start()
        files = {stream: os.path.join(tmp, stream) for stream in ("stdin", "stdout", "stderr")}
        with open(files["stdin"], "w", encoding="utf-8") as f:
            f.write(input or "")
        if input is None:
            files["stdin"] = os.devnull
        req = dict(args=[str(a) for a in args], env=dict(os.environ if env is None else env), cwd=str(cwd or os.getcwd()), **files)
        req.update({"module": module} if module is not None else {"path": str(path)})
        argv = [name or module or os.path.basename(path), *req["args"]]
        t0 = time.perf_counter()
        p.stdin.write(json.dumps(req) + "\n")
        p.stdin.flush()
        pid = json.loads(_read(p, 60))["pid"]
        line = _read(p, timeout)
        if line is None:
            os.kill(pid, signal.SIGKILL)
            _read(p, 60)
            raise subprocess.TimeoutExpired(argv, timeout)
        done = json.loads(line)
        r = subprocess.CompletedProcess(argv, done["status"])
        with open(files["stdout"], "rb") as f:
            r.stdout = _text(f.read())
        with open(files["stderr"], "rb") as f:
            r.stderr = _text(f.read())
        r.seconds = time.perf_counter() - t0
        r.cpu_seconds = done["cpu"]
        return r


# what every command imports first; the child runs selfattn.cli afresh as __main__
_CLI = ForkServer("CLI", "import selfattn.cli")


def run_cli(*args, env=None, cwd=None, input=None, timeout=120):
    """``python -m selfattn.cli ARGS`` (see ForkServer.run); its CompletedProcess's args are ``["selfattn", *ARGS]``."""
    return _CLI.run(module="selfattn.cli", args=args, env=env, cwd=cwd, input=input, timeout=timeout, name="selfattn")
