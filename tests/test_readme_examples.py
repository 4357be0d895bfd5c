"""Every Python block of the README runs as written, in a fresh interpreter (issue 16)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

# blocks that are fragments today (they use a model, a data loader or torchrun that the block does not
# create): expected to fail, strictly -- once a block is made runnable this list must shrink
FRAGMENTS = {
}


def _blocks() -> list:
    text = README.read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_python_examples():
    assert len(_blocks()) >= 2


def _params():
    out = []
    for i, code in enumerate(_blocks()):
        first = code.strip().splitlines()[0]
        why = next((r for k, r in FRAGMENTS.items() if first.startswith(k)), None)
        marks = [pytest.mark.xfail(strict=True, reason=f"README fragment: {why}")] if why else []
        out.append(pytest.param(i, id=f"block{i}", marks=marks))
    return out


@pytest.mark.parametrize("index", _params())
def test_readme_python_block_runs(index, tmp_path):
    code = _blocks()[index]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, f"README Python block {index} failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"
