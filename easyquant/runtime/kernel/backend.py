"""Triton where it is installed, else ``None`` for both names: the kernels are defined only with
it, and the CPU path in :mod:`easyquant.runtime.nn` needs none of it."""

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

__all__ = ["tl", "triton"]
