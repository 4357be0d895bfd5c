"""Backend `cpu`: fused flash-style CPU kernel (issue 5). Placeholder until the kernel lands."""
