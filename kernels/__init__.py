"""Triton kernels of fastsae, imported as ``fastsae.kernels``.

The kernels (fused encode + TopK / JumpReLU, sparse decode and its sparse
backward) arrive with the Triton issue; until then every op in
``fastsae.ops`` runs on the pure-torch path in ``fastsae.torch_ops``. This
package deliberately imports nothing, so ``import fastsae`` never needs Triton.
"""
