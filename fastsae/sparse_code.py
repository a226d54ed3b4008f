"""The sparse code shared by every layer of fastsae."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class SparseCode(NamedTuple):
    """K active latents per token.

    values:  ``[..., K]`` activations (zeros are allowed and mean padding).
    indices: ``[..., K]`` latent ids, int32 or int64, in ``[0, d_sae)``.

    TopK codes have exactly K entries per token. JumpReLU/ReLU codes are
    padded to the largest active count in the batch with value 0.
    """

    values: Tensor
    indices: Tensor

    def to_dense(self, d_sae: int) -> Tensor:
        """Scatter into a dense ``[..., d_sae]`` tensor of ``values.dtype``."""
        out = self.values.new_zeros(*self.values.shape[:-1], d_sae)
        # scatter_add so that padding entries (value 0, any index) never overwrite a real one
        return out.scatter_add_(-1, self.indices.long(), self.values)
