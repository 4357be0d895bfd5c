"""Compute kernels, one module per fused backend (``cpu_flash``: numba, issue 5).

Backends in ``selfattn.backends`` launch them; nothing here is public API.
"""
