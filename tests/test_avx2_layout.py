"""The float32 kernels in the AVX2 layout (SELFATTN_CPU_VECTOR_BYTES=32: 8 float32 lanes a vector, the
micro-kernel's 6 x 2 vectors), as they run on an AVX2-only host: forward (cpu_fwd) and backward (cpu_bwd)
against the float64 reference (STYLE.md rule 6) in ONE subprocess, so the kernels compile once into its
private numba cache (the layout is fixed at import). One thread: the serial kernels run the same tasks as
the parallel ones (the layout lives in the tasks), and a second compile of the parallel wrappers would
double the cost of this test.

Cases: GQA with more queries than keys, a 2-row last query block (dot-product scores) and an odd head dim
(59) under four mask kinds; a few queries (one partial vector of rows) against 200 keys at head dim 128
with ALiBi, without and with a softcap (the softcap's hi/lo tiles take cpu_flash._softmax_lo_t, the
others the vector softmax).
"""

from __future__ import annotations

import os
import subprocess
import sys

_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from selfattn.kernels import cpu_bwd, cpu_flash, cpu_fwd
assert cpu_flash.VEC_BYTES == 32 and cpu_fwd.LANES == 8, (cpu_flash.VEC_BYTES, cpu_fwd.LANES)
import test_cpu_bwd as t
from test_cpu_kernel import mask_kwargs

def both(name, *args, **kw):
    # forward (out and stats) and gradients against the reference; both transposed kernels must run
    before = cpu_fwd.CALLS["calls"]
    t.check_backward(name, *args, **kw)
    assert cpu_fwd.CALLS["calls"] == before + 1, f"{name}: the transposed forward did not run"

for mask in ("none", "causal", "window_padding_documents", "dense_float"):
    both(mask, *t._inputs(2, 4, 2, 130, 97, 59), **mask_kwargs(mask, 2, 4, 130, 97))
for softcap in (None, 5.0):
    both(f"alibi softcap={softcap}", *t._inputs(1, 2, 1, 13, 200, 128), causal=True, softcap=softcap,
         alibi_slopes=torch.tensor([0.5, 0.25]))
print("ok")
"""


def test_forward_and_backward_in_the_avx2_layout(tmp_path):
    env = dict(os.environ, SELFATTN_CPU_VECTOR_BYTES="32", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-c", _SCRIPT, here], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-4000:]
