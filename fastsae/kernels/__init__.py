"""Triton kernels of fastsae: fused encode + TopK / JumpReLU, the sparse decode and
its sparse backward, with their launchers and autograd Functions.

``fastsae.ops`` imports these lazily, only when it dispatches to Triton; this package
imports nothing itself, so ``import fastsae`` never needs Triton.
"""
