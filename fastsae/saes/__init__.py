"""SAE modules, one file per architecture, and the architecture registry."""

from fastsae.saes.base import SAE
from fastsae.saes.config import (
    AbsTopKSAEConfig,
    GatedSAEConfig,
    JumpReLUSAEConfig,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoderConfig,
    SAEConfig,
    SAEMetadata,
    SkipTranscoderConfig,
    StandardSAEConfig,
    TopKSAEConfig,
    TranscoderConfig,
)
from fastsae.saes.gated import GatedSAE
from fastsae.saes.jumprelu import JumpReLUSAE
from fastsae.saes.standard import StandardSAE
from fastsae.saes.topk import AbsTopKSAE, TopKSAE
from fastsae.saes.transcoder import (
    JumpReLUSkipTranscoder,
    JumpReLUTranscoder,
    SkipTranscoder,
    Transcoder,
)

SAE_CLASSES: dict[str, type[SAE]] = {
    cls.config_class.architecture(): cls
    for cls in (
        StandardSAE,
        GatedSAE,
        JumpReLUSAE,
        TopKSAE,
        AbsTopKSAE,
        Transcoder,
        SkipTranscoder,
        JumpReLUTranscoder,
        JumpReLUSkipTranscoder,
    )
}


def sae_class_for_architecture(architecture: str) -> type[SAE]:
    """The SAE class for an architecture name, with a clear error for unknown names."""
    try:
        return SAE_CLASSES[architecture]
    except KeyError:
        raise ValueError(
            f"unknown SAE architecture {architecture!r}; known: {sorted(SAE_CLASSES)}"
        ) from None


__all__ = [
    "SAE",
    "SAEConfig",
    "SAEMetadata",
    "SAE_CLASSES",
    "sae_class_for_architecture",
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
