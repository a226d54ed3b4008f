"""SAEs: one module per architecture, each holding that architecture's inference config
and class, its training config and class and (where it has one) its latent-sharded
class, and ending with one :func:`~fastsae.saes.registry.register` call.

* :mod:`.config` / :mod:`.base`: what every SAE config and SAE has;
* :mod:`.training_sae`: what every training SAE has (step input/output, the dense step);
* :mod:`.standard`, :mod:`.gated`, :mod:`.jumprelu`, :mod:`.topk` (TopK, AbsTopK),
  :mod:`.batchtopk` (BatchTopK, Matryoshka), :mod:`.transcoder`,
  :mod:`.matching_pursuit`, :mod:`.temporal`: the architectures;
* :mod:`.registry`: the one architecture registry.

Names load on first access, so importing one module of this package (which the
architectures' own dependencies do) never imports every architecture.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastsae.saes.registry import RegistryView

_NAMES: dict[str, str] = {
    "SAE": "base",
    "SAEConfig": "config",
    "SAEMetadata": "config",
    "TrainCoefficientConfig": "training_sae",
    "TrainingSAE": "training_sae",
    "TrainingSAEConfig": "training_sae",
    "TrainStepInput": "training_sae",
    "TrainStepOutput": "training_sae",
    "register": "registry",
    "register_sae_class": "registry",
    "register_sae_training_class": "registry",
    "sae_class_for_architecture": "registry",
    "config_class_for_architecture": "registry",
    "training_sae_class_for_architecture": "registry",
    "training_config_class_for_architecture": "registry",
    "sharded_class_for_architecture": "registry",
    "known_architectures": "registry",
    "StandardSAE": "standard",
    "StandardSAEConfig": "standard",
    "StandardTrainingSAE": "standard",
    "StandardTrainingSAEConfig": "standard",
    "ShardedStandardTrainingSAE": "standard",
    "GatedSAE": "gated",
    "GatedSAEConfig": "gated",
    "GatedTrainingSAE": "gated",
    "GatedTrainingSAEConfig": "gated",
    "JumpReLUSAE": "jumprelu",
    "JumpReLUSAEConfig": "jumprelu",
    "JumpReLUTrainingSAE": "jumprelu",
    "JumpReLUTrainingSAEConfig": "jumprelu",
    "ShardedJumpReLUTrainingSAE": "jumprelu",
    "TopKSAE": "topk",
    "TopKSAEConfig": "topk",
    "TopKTrainingSAE": "topk",
    "TopKTrainingSAEConfig": "topk",
    "ShardedTopKTrainingSAE": "topk",
    "AbsTopKSAE": "topk",
    "AbsTopKSAEConfig": "topk",
    "AbsTopKTrainingSAE": "topk",
    "AbsTopKTrainingSAEConfig": "topk",
    "BatchTopKTrainingSAE": "batchtopk",
    "BatchTopKTrainingSAEConfig": "batchtopk",
    "ShardedBatchTopKTrainingSAE": "batchtopk",
    "MatryoshkaBatchTopKTrainingSAE": "batchtopk",
    "MatryoshkaBatchTopKTrainingSAEConfig": "batchtopk",
    "Transcoder": "transcoder",
    "TranscoderConfig": "transcoder",
    "SkipTranscoder": "transcoder",
    "SkipTranscoderConfig": "transcoder",
    "JumpReLUTranscoder": "transcoder",
    "JumpReLUTranscoderConfig": "transcoder",
    "JumpReLUSkipTranscoder": "transcoder",
    "JumpReLUSkipTranscoderConfig": "transcoder",
    "MatchingPursuitSAE": "matching_pursuit",
    "MatchingPursuitSAEConfig": "matching_pursuit",
    "MatchingPursuitTrainingSAE": "matching_pursuit",
    "MatchingPursuitTrainingSAEConfig": "matching_pursuit",
    "TemporalSAE": "temporal",
    "TemporalSAEConfig": "temporal",
}


def __getattr__(name: str) -> Any:
    # PEP 562: the architectures depend on modules (training, latent sharding) that
    # import parts of this package, so nothing is imported here until it is asked for
    if name == "SAE_CLASSES":
        return RegistryView("sae_cls")
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'fastsae.saes' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fastsae.saes.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES, "SAE_CLASSES"])


if TYPE_CHECKING:  # static checkers and IDEs see the names
    from fastsae.saes.base import SAE
    from fastsae.saes.batchtopk import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        ShardedBatchTopKTrainingSAE,
    )
    from fastsae.saes.config import SAEConfig, SAEMetadata
    from fastsae.saes.gated import (
        GatedSAE,
        GatedSAEConfig,
        GatedTrainingSAE,
        GatedTrainingSAEConfig,
    )
    from fastsae.saes.jumprelu import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        ShardedJumpReLUTrainingSAE,
    )
    from fastsae.saes.matching_pursuit import (
        MatchingPursuitSAE,
        MatchingPursuitSAEConfig,
        MatchingPursuitTrainingSAE,
        MatchingPursuitTrainingSAEConfig,
    )
    from fastsae.saes.registry import (
        config_class_for_architecture,
        known_architectures,
        register,
        register_sae_class,
        register_sae_training_class,
        sae_class_for_architecture,
        sharded_class_for_architecture,
        training_config_class_for_architecture,
        training_sae_class_for_architecture,
    )
    from fastsae.saes.standard import (
        ShardedStandardTrainingSAE,
        StandardSAE,
        StandardSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
    )
    from fastsae.saes.temporal import TemporalSAE, TemporalSAEConfig
    from fastsae.saes.topk import (
        AbsTopKSAE,
        AbsTopKSAEConfig,
        AbsTopKTrainingSAE,
        AbsTopKTrainingSAEConfig,
        ShardedTopKTrainingSAE,
        TopKSAE,
        TopKSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from fastsae.saes.training_sae import (
        TrainCoefficientConfig,
        TrainingSAE,
        TrainingSAEConfig,
        TrainStepInput,
        TrainStepOutput,
    )
    from fastsae.saes.transcoder import (
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        Transcoder,
        TranscoderConfig,
    )

    SAE_CLASSES: RegistryView

__all__ = [
    "SAE_CLASSES",
    "SAE",
    "SAEConfig",
    "SAEMetadata",
    "TrainCoefficientConfig",
    "TrainingSAE",
    "TrainingSAEConfig",
    "TrainStepInput",
    "TrainStepOutput",
    "register",
    "register_sae_class",
    "register_sae_training_class",
    "sae_class_for_architecture",
    "config_class_for_architecture",
    "training_sae_class_for_architecture",
    "training_config_class_for_architecture",
    "sharded_class_for_architecture",
    "known_architectures",
    "StandardSAE",
    "StandardSAEConfig",
    "StandardTrainingSAE",
    "StandardTrainingSAEConfig",
    "ShardedStandardTrainingSAE",
    "GatedSAE",
    "GatedSAEConfig",
    "GatedTrainingSAE",
    "GatedTrainingSAEConfig",
    "JumpReLUSAE",
    "JumpReLUSAEConfig",
    "JumpReLUTrainingSAE",
    "JumpReLUTrainingSAEConfig",
    "ShardedJumpReLUTrainingSAE",
    "TopKSAE",
    "TopKSAEConfig",
    "TopKTrainingSAE",
    "TopKTrainingSAEConfig",
    "ShardedTopKTrainingSAE",
    "AbsTopKSAE",
    "AbsTopKSAEConfig",
    "AbsTopKTrainingSAE",
    "AbsTopKTrainingSAEConfig",
    "BatchTopKTrainingSAE",
    "BatchTopKTrainingSAEConfig",
    "ShardedBatchTopKTrainingSAE",
    "MatryoshkaBatchTopKTrainingSAE",
    "MatryoshkaBatchTopKTrainingSAEConfig",
    "Transcoder",
    "TranscoderConfig",
    "SkipTranscoder",
    "SkipTranscoderConfig",
    "JumpReLUTranscoder",
    "JumpReLUTranscoderConfig",
    "JumpReLUSkipTranscoder",
    "JumpReLUSkipTranscoderConfig",
    "MatchingPursuitSAE",
    "MatchingPursuitSAEConfig",
    "MatchingPursuitTrainingSAE",
    "MatchingPursuitTrainingSAEConfig",
    "TemporalSAE",
    "TemporalSAEConfig",
]
