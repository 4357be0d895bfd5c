"""Tolerances derived from the reference's own low-precision error (STYLE.md rule 6).

    |backend - ref_fp64| <= factor * |ref_low - ref_fp64| + floor

where ``ref_low`` is the reference computed entirely in the input dtype (``upcast=False``; the
farthest of four orders of evaluation, tests/_oracle.py reference_pair),
``factor`` is 2 for forward values and 3 for gradients, and ``floor`` is the rounding
error of the input dtype at the output's magnitude. Max and mean differences are printed
first, so a failure shows how far off it was.
"""

from __future__ import annotations

import torch


def floor_for(dtype: torch.dtype, ref: torch.Tensor) -> float:
    eps = torch.finfo(dtype).eps
    finite = ref[torch.isfinite(ref)]
    mag = float(finite.abs().max()) if finite.numel() else 1.0
    return 2.0 * eps * max(1.0, mag)


def assert_close(name: str, got: torch.Tensor, ref64: torch.Tensor, ref_low: torch.Tensor, *, factor: float = 2.0, dtype=None) -> None:
    """Assert ``got`` is within the derived tolerance of ``ref64``; non-finite entries must match exactly."""
    dtype = dtype or got.dtype
    got64, ref_low64 = got.detach().to(torch.float64), ref_low.detach().to(torch.float64)
    ref64 = ref64.detach().to(torch.float64)
    assert got64.shape == ref64.shape, f"{name}: shape {tuple(got64.shape)} != reference {tuple(ref64.shape)}"
    fin = torch.isfinite(ref64)
    # non-finite reference entries (lse of a fully-masked row = -inf, NaN from NaN inputs) must match exactly
    assert torch.equal(torch.isnan(got64), torch.isnan(ref64)), f"{name}: NaN pattern differs from the reference"
    assert torch.equal(got64[~fin & ~torch.isnan(ref64)], ref64[~fin & ~torch.isnan(ref64)]), f"{name}: infinities differ from the reference"
    if not fin.any():
        return
    err = (got64 - ref64)[fin].abs()
    base = (ref_low64 - ref64)[fin & torch.isfinite(ref_low64)].abs()
    base_max = float(base.max()) if base.numel() else 0.0
    tol = factor * base_max + floor_for(dtype, ref64)
    print(f"{name}: max|diff|={float(err.max()):.3e} mean|diff|={float(err.mean()):.3e} "
          f"ref low-precision max err={base_max:.3e} tol={tol:.3e}")
    assert float(err.max()) <= tol, f"{name}: max|diff| {float(err.max()):.3e} exceeds tolerance {tol:.3e}"
