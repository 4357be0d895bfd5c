"""The cpu kernel's exp2 polynomial against float64 (issue 14): within 2 ulp of float32 over the
range the online softmax uses (exponents from -126 to 0; below that the kernel flushes to 0).

The polynomial is float32 throughout (cpu_flash._exp2_ir); the scalar ``_exp2`` and the row loop
``_exp2_row`` the kernels run are generated from the same IR, and both are measured."""

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from selfattn.kernels import cpu_flash  # noqa: E402


@numba.njit(cache=False)
def _exp2_all(x, out, half):
    # as the kernels call it: float32 argument, the float64 result stored into float32
    for i in range(x.shape[0]):
        out[i] = cpu_flash._exp2(x[i], half)


def _ulp_error(got32: np.ndarray, exact: np.ndarray) -> np.ndarray:
    # distance in units of the float32 spacing at the exact value
    spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return np.abs(got32.astype(np.float64) - exact) / spacing


def test_exp2_within_two_ulp_over_the_softmax_range():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.uniform(-126.0, 0.0, 200_000),  # the whole range
        rng.uniform(-1.0, 0.0, 50_000),  # near the row max, where most weights sit
        np.arange(-126, 1, dtype=np.float64),  # integers (n + f with f = 0)
        np.arange(-126, 0, dtype=np.float64) + 0.5,  # the split point of n + f
        [-125.999, -1e-7, 0.0],
    ]).astype(np.float32)
    out = np.empty_like(x)
    _exp2_all(x, out, np.float32(0.5))
    exact = np.exp2(x.astype(np.float64))
    err = _ulp_error(out, exact)
    worst = int(np.argmax(err))
    print(f"exp2: max {err.max():.3f} ulp at x = {x[worst]!r}, mean {err.mean():.3f} ulp over {x.size} points")
    assert err.max() <= 2.0, f"exp2 is {err.max():.3f} ulp off at x = {x[worst]!r}"


@numba.njit(cache=False)
def _exp2_rows(x, out):
    # as the forward calls it: one tile row at a time, p = exp2(s - m) with m = 0
    s = x.reshape((-1, 64))
    p = out.reshape((-1, 64))
    stat = np.empty(0, np.float32)
    for i in range(s.shape[0]):
        cpu_flash._exp2_row(s, p, i, 64, np.float32(0.0), stat)


def test_exp2_row_loop_within_two_ulp():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-126.0, 0.0, 64 * 3000), rng.uniform(-1.0, 0.0, 64 * 1000),
                        np.linspace(-126.0, 0.0, 64 * 100)]).astype(np.float32)
    out = np.empty_like(x)
    _exp2_rows(x, out)
    err = _ulp_error(out, np.exp2(x.astype(np.float64)))
    print(f"exp2 rows: max {err.max():.3f} ulp, mean {err.mean():.3f} ulp over {x.size} points")
    assert err.max() <= 2.0, f"exp2 row loop is {err.max():.3f} ulp off at x = {x[int(np.argmax(err))]!r}"
    # below the flush point: exactly 0
    below = np.full(64, -126.5, np.float32)
    _exp2_rows(below, out[:64])
    assert not out[:64].any()


def test_exp2_error_is_measurable():
    # the measurement itself can fail: a 4-ulp perturbation of exact values is caught
    exact = np.exp2(np.linspace(-10, 0, 1000))
    bumped = (exact.astype(np.float32) * np.float32(1 + 4 * 2.0 ** -23)).astype(np.float32)
    assert _ulp_error(bumped, exact).max() > 2.0
