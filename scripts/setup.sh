#!/usr/bin/env bash
# Set up selfattn on a fresh machine: a virtual environment in .venv with the package installed.
#   scripts/setup.sh          runtime dependencies (torch CPU build, numba, rich, matplotlib, safetensors)
#   scripts/setup.sh --test   also the test dependencies (pytest, hypothesis, triton for its CPU interpreter)
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# drop pip's notes about this machine's local package mirrors; pipefail keeps pip's exit status
quiet() { sed '/^WARNING: Location/d'; }
say() { echo "setup: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
    say "creating the virtual environment .venv"
    "$PY" -m venv .venv
fi
# --no-compile: pip would byte-compile every installed module (~12,000 files, about a minute of CPU here;
# torch's alone took 15 s); Python compiles the ones a program imports, once, when it first imports them
pip_install() { .venv/bin/pip install -q --disable-pip-version-check --no-compile "$@"; }
# torch first and pinned exactly: on these machines 2.13.0 is a local CPU build; a looser pin
# could pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    say "installing torch 2.13.0 (CPU build; the largest download, a minute or more the first time) ..."
    pip_install "torch==2.13.0" 2>&1 | quiet
fi
# [cli]: the command line's terminal tables, pictures and checkpoints (rich, matplotlib, safetensors)
extra="[cli]"
if [ "${1:-}" = "--test" ]; then
    extra="[cli,test]"
fi
say "installing selfattn${extra} and its dependencies (pip, quiet; about a minute the first time) ..."
pip_install -e ".${extra}" 2>&1 | quiet
# the HTML-report test drives a real headless Chromium (Debian's package); without it that test is skipped
if [ "$extra" = "[cli,test]" ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium from Debian's packages for the HTML-report browser test ..."
    timeout 900 bash -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver' >/dev/null 2>&1 \
        || echo "setup: could not install chromium; the browser test will be skipped" >&2
fi
# Python writes a module's .pyc when it first imports it -- unless PYTHONDONTWRITEBYTECODE is set, as some
# sandboxes and CI images do: then, after pip's --no-compile above, every new process would compile torch's
# modules from source again (import torch + selfattn.cli: ~10 s of CPU instead of ~3 s; the test suite starts
# dozens of processes). So the check below imports what the command line (and, with --test, the suite's
# processes) import, once, with writing on: ~1,500-3,000 modules of the 12,000 installed.
warm="import selfattn, selfattn.cli, selfattn.kernels.warm, torch.distributed.run"
if [ "$extra" = "[cli,test]" ]; then
    warm="$warm, pytest, xdist, hypothesis, triton, matplotlib.pyplot, transformers, selfattn.integrations.transformers"
fi
env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -c "$warm"
say "ready: run .venv/bin/selfattn explain (or first: source .venv/bin/activate, then selfattn explain)"
