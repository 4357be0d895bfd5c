"""tests/test_hf.py, test_hf_masks.py and test_explain_hf.py against the oldest transformers that
pyproject.toml declares (slow: a few minutes).

    .venv/bin/python -m pytest -m slow tests/test_hf_oldest.py

It installs that transformers (and the huggingface-hub/tokenizers it needs) into a folder of
its own under pytest's temporary directory, puts that folder first on PYTHONPATH and runs
those files in a child pytest; numpy, torch and the rest come from the test environment.
CI runs tests/test_hf.py against the newest transformers that the test extra installs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _oldest_declared() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"transformers>=([0-9.]+)', text)
    assert m, "pyproject.toml declares no transformers range"
    return m.group(1)


@pytest.mark.slow
def test_hf_suite_on_oldest_transformers(tmp_path):
    version = _oldest_declared()
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(target)]
    r = subprocess.run(pip + [f"transformers=={version}"], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    # keep the environment's numpy (numba is built against it) and torch
    for p in target.iterdir():
        if p.name.split("-")[0].split(".")[0] in ("numpy", "torch"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT / "src")]))
    probe = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert probe.returncode == 0 and probe.stdout.strip().startswith(version), probe.stdout + probe.stderr[-2000:]
    print("transformers", probe.stdout.strip())
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                        *(str(ROOT / "tests" / f) for f in ("test_hf.py", "test_hf_masks.py", "test_explain_hf.py"))],
                       capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=3000)
    print(r.stdout[-6000:], r.stderr[-3000:])
    assert r.returncode == 0
