"""Backend `triton`: fused flash-attention kernel in Triton (issue 6). Placeholder until the kernel lands."""
