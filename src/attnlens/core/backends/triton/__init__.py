"""Fused Triton attention with the lens: `ops` (backend, custom ops, launchers) and `kernels` (``@triton.jit``).

Importing this package never imports triton: `ops.TritonBackend` imports `kernels` at first use.
"""
from .ops import TritonBackend

__all__ = ["TritonBackend"]
