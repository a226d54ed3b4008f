"""Triton kernels of fastsae and their launchers (a launcher checks dtypes and devices,
picks the launch plan and allocates the outputs).

- ``topk_encode``: fused encoder + TopK (optionally AbsTopK and decoder-norm scaling): a
  GEMM with a filtering epilogue, then an exact top-k over each row's candidates; the
  ``[B, d_sae]`` pre-activations are never written.
- ``jumprelu_encode``: fused encoder + JumpReLU, dense ``[B, d_sae]`` or compacted to a
  padded sparse code.
- ``sparse_decode``: ``gather_weighted_sum``, the decoder on a sparse code (also the
  sparse ``dx`` of the encoders' backward).
- ``sparse_backward``: ``gather_dot`` and ``segment_rows_sum`` (pairs grouped by latent
  with ``group_by_latent``), the sparse gradients, without atomics.
- ``autograd``: ``SparseDecodeFunction`` and ``JumpReLUEncodeFunction``. The TopK
  encode's Function is ``fastsae.sparse_autograd.TopKEncodeFunction``, shared with the
  torch path; its ``TRITON_BACKEND`` runs this package's sparse launchers.
- ``_common``: the launchers' shared checks and tile-size helpers.
- ``check``: ``python -m fastsae.kernels.check`` compiles every kernel variant for sm_80
  and sm_90 without a GPU and reports registers, shared memory, spills and tensor-core
  instructions.

Every module except ``check`` imports Triton. This ``__init__`` imports nothing, and
``fastsae.ops`` / ``fastsae.sparse_autograd`` import the kernel modules only when they
dispatch to Triton, so ``import fastsae`` never needs Triton. ``fastsae.torch_ops`` is
the pure-torch twin of every op. ``tests/kernels`` runs the kernels on CUDA, or on CPU
under ``TRITON_INTERPRET=1``.
"""
