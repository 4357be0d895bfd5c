"""Packaging: what `pip install selfattn` declares and installs (issue 13).

* ``test_wheel_metadata`` (CI): ``python -m build`` makes a wheel whose core needs torch (a range,
  not the local pin), numpy and numba only; rich, matplotlib and safetensors come with ``[cli]``.
* ``test_core_import_without_extras`` (CI): ``import selfattn`` and ``selfattn.attention`` work
  with rich, matplotlib, safetensors and transformers unimportable; the command line then names
  the extra to install.
* ``test_wheel_in_clean_venv`` (slow, ~2 minutes: run with ``pytest -m slow tests/test_packaging.py``):
  a plain virtual environment (no system site-packages), torch==2.13.0 installed as
  scripts/setup.sh does, the wheel without extras (``import selfattn`` works, ``selfattn explain``
  names the extra), then ``[cli]``, and ``selfattn explain`` runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# a meta-path finder that makes the optional packages unimportable, as in a core-only install
_BLOCK = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("rich", "matplotlib", "safetensors", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Block())
"""


def _copy_source(dest: Path) -> Path:
    # build from a copy, so the build never writes egg-info/build folders into the shared tree
    src = dest / "src-copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    return src


def _build_wheel(tmp: Path) -> Path:
    src = _copy_source(tmp)
    out = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels = list(out.glob("selfattn-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _metadata(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode().splitlines()


def test_wheel_metadata(tmp_path):
    pytest.importorskip("build")
    wheel = _build_wheel(tmp_path)
    lines = _metadata(wheel)
    requires = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Dist:")]
    core = sorted(r for r in requires if "extra ==" not in r)
    print("core requirements:", core)
    assert [r.split("<")[0].split(">")[0].split("=")[0] for r in core] == ["numba", "numpy", "torch"]
    torch_req = next(r for r in core if r.startswith("torch"))
    assert "==" not in torch_req and "<3" in torch_req and ">=2.5" in torch_req, torch_req
    for pkg in ("rich", "matplotlib", "safetensors"):
        assert any(r.startswith(pkg) and 'extra == "cli"' in r for r in requires), (pkg, requires)
    assert any(r.startswith("transformers") and 'extra == "hf"' in r for r in requires), requires
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "selfattn = selfattn.cli:main" in entry
    for module in ("selfattn/kernels/cpu_flash.py", "selfattn/kernels/triton_flash.py",
                   "selfattn/integrations/transformers.py", "selfattn/monitor.py"):
        assert module in names, module


def _run_python(code: str, timeout=300):
    # this checkout's package first, whatever the venv has installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def test_core_import_without_extras():
    code = _BLOCK + """
import torch, selfattn
q = torch.randn(1, 2, 5, 8)
out = selfattn.attention(q, q, q, causal=True, backend="math")
assert out.shape == (1, 2, 5, 8)
bad = [m for m in ("rich", "matplotlib", "safetensors", "transformers") if m in sys.modules]
assert not bad, bad
import selfattn.integrations.transformers as hf
try:
    hf.register()
except ImportError as e:
    assert "selfattn[hf]" in str(e), e
    print("register:", e)
else:
    raise AssertionError("register() without transformers should name the [hf] extra")
from selfattn import cli
rc = cli.main(["explain"])
assert rc == 2, rc
"""
    r = _run_python(code)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "selfattn[cli]" in r.stderr and "rich" in r.stderr


def _venv_bin(env_dir: Path, name: str) -> str:
    return str(env_dir / ("Scripts" if os.name == "nt" else "bin") / name)


@pytest.mark.slow
def test_wheel_in_clean_venv(tmp_path):
    pytest.importorskip("build")
    wheel = _build_wheel(tmp_path)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    py, pip = _venv_bin(env_dir, "python"), [_venv_bin(env_dir, "python"), "-m", "pip", "install", "-q",
                                            "--disable-pip-version-check"]
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "NUMBA_CACHE_DIR")}

    def run(cmd, timeout=900):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=clean_env)
        print("$", " ".join(map(str, cmd)), "->", r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        return r

    # torch exactly as scripts/setup.sh installs it (on these machines a local CPU build)
    assert run(pip + ["torch==2.13.0"]).returncode == 0
    assert run(pip + [str(wheel)]).returncode == 0
    r = run([py, "-c", "import sys, selfattn, torch; q = torch.randn(1, 1, 4, 8); "
                       "print(selfattn.attention(q, q, q, backend='math').shape); "
                       "print(sorted(m for m in ('rich', 'matplotlib', 'safetensors') if m in sys.modules))"])
    assert r.returncode == 0 and "[]" in r.stdout
    r = run([_venv_bin(env_dir, "selfattn"), "explain"])
    assert r.returncode == 2 and "selfattn[cli]" in r.stderr
    assert run(pip + [f"{wheel}[cli]"]).returncode == 0
    r = run([_venv_bin(env_dir, "selfattn"), "explain"])
    assert r.returncode == 0, r.stderr
    assert "0.8446" in r.stdout  # the corrected contextual embedding of "The"


_CACHE_PROBE = """
import os, tempfile, sys
real = tempfile.TemporaryFile
def unwritable_package(*a, dir=None, **k):  # the package's own __pycache__ cannot be written (read-only install)
    if READONLY and dir and os.path.normpath(dir).endswith(os.path.join("selfattn", "kernels", "__pycache__")):
        raise PermissionError(13, "read-only", dir)
    return real(*a, dir=dir, **k)
tempfile.TemporaryFile = unwritable_package
import selfattn.kernels as k, numba.core.config as config
print(k.cpu_flash._exp2._cache._cache_path)
print(repr(config.CACHE_DIR))
"""


@pytest.mark.parametrize("case", ["writable", "read-only", "read-only+NUMBA_CACHE_DIR"])
def test_numba_cache_place(tmp_path, case):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop("NUMBA_CACHE_DIR", None)
    if case.endswith("NUMBA_CACHE_DIR"):
        env["NUMBA_CACHE_DIR"] = str(tmp_path / "mine")
    code = f"READONLY = {case != 'writable'}\n" + _CACHE_PROBE
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    where, numba_setting = r.stdout.split("\n")[:2]
    print(case, where, numba_setting)
    expected = {"writable": str(ROOT / "src" / "selfattn" / "kernels" / "__pycache__"),
                "read-only": str(tmp_path / "xdg" / "selfattn" / "numba"),
                "read-only+NUMBA_CACHE_DIR": str(tmp_path / "mine")}[case]
    assert where.startswith(expected), (where, expected)
    # numba's own setting is left as the environment made it (only selfattn's kernels moved)
    assert numba_setting == repr(env.get("NUMBA_CACHE_DIR", "")), numba_setting
