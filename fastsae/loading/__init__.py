"""Loading and saving: the SAELens disk format, the pretrained registry, converters."""

from fastsae.loading.converters import load_sae_from_disk
from fastsae.loading.disk import (
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    save_sae,
)

__all__ = [
    "SAE_CFG_FILENAME",
    "SAE_WEIGHTS_FILENAME",
    "SPARSITY_FILENAME",
    "load_sae_from_disk",
    "save_sae",
]
