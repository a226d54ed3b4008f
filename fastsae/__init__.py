"""fastsae: fast sparse autoencoders with a drop-in SAELens API.

``from fastsae import SAE`` in place of ``from sae_lens import SAE``: same classes,
configs, files and numbers; ``encode_sparse``/``decode_sparse`` and a sparse
``forward`` on top.
"""

__version__ = "0.1.0"

from fastsae import ops
from fastsae.saes import (
    SAE,
    AbsTopKSAE,
    AbsTopKSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    SAEConfig,
    SAEMetadata,
    SkipTranscoder,
    SkipTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from fastsae.sparse_code import SparseCode

__all__ = [
    "__version__",
    "ops",
    "SparseCode",
    "SAE",
    "SAEConfig",
    "SAEMetadata",
    "StandardSAE",
    "StandardSAEConfig",
    "GatedSAE",
    "GatedSAEConfig",
    "JumpReLUSAE",
    "JumpReLUSAEConfig",
    "TopKSAE",
    "TopKSAEConfig",
    "AbsTopKSAE",
    "AbsTopKSAEConfig",
    "Transcoder",
    "TranscoderConfig",
    "SkipTranscoder",
    "SkipTranscoderConfig",
    "JumpReLUTranscoder",
    "JumpReLUTranscoderConfig",
    "JumpReLUSkipTranscoder",
    "JumpReLUSkipTranscoderConfig",
]
