"""The same seed gives the same loss curve on the math, sdpa and cpu backends.

Tolerance (STYLE.md rule 6): the float64 run on the math backend is the reference; the float32
math run's distance from it is the error float32 training itself makes; every float32 backend
must stay within 3x that (gradients are involved) -- step by step, over the whole curve.
"""

from __future__ import annotations

import torch

from selfattn.training import make_config, train

from tolerance import assert_close

# stats_every=3: every third step asks for statistics (sdpa has none and runs without them)
RUN = dict(pairs=8, keys=8, values=8, dim=32, heads=2, batch=16, steps=30, lr=3e-3, warmup=5, target_acc=None,
           eval_every=10, eval_size=64, stats_every=3, checkpoint_every=1000, seed=11)


def _curve(tmp_path, backend, dtype="float32"):
    res = train(make_config(dict(RUN, backend=backend, dtype=dtype, out=str(tmp_path / f"{backend}-{dtype}"))))
    return torch.tensor([loss for _, loss in res.losses], dtype=torch.float64), res


def test_same_seed_same_loss_curve_on_math_sdpa_cpu(tmp_path):
    ref64, _ = _curve(tmp_path, "math", "float64")
    low, res_math = _curve(tmp_path, "math")
    assert ref64[-1] < 0.9 * ref64[0], "the run should learn something in 30 steps"
    for backend in ("sdpa", "cpu"):
        got, res = _curve(tmp_path, backend)
        assert_close(f"loss curve [{backend}]", got, ref64, low, factor=3.0, dtype=torch.float32)
        print(f"{backend}: {res.train_tokens_per_s:,.0f} tokens/s (math {res_math.train_tokens_per_s:,.0f})")
