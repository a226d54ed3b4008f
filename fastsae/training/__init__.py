"""Training: the runner config (:mod:`.config`), the losses (:mod:`.losses`), the
training loop (:mod:`.trainer`), the runner (:mod:`.runner`), the data path
(:mod:`.data`) and parallel training (:mod:`.parallel`). The training SAE classes live
with their architectures in :mod:`fastsae.saes`.

Names load on first access: the architectures import :mod:`.losses` and the latent
sharding base from this package, and the runner pulls in datasets/transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_NAMES: dict[str, str] = {
    "LanguageModelSAERunnerConfig": "fastsae.training.config",
    "LoggingConfig": "fastsae.training.config",
    "SAETrainerConfig": "fastsae.training.config",
    "NonFiniteLossError": "fastsae.training.nonfinite",
    "SAETrainer": "fastsae.training.trainer",
    "MultiSAETrainer": "fastsae.training.multi_sae_trainer",
    "SAETrainingRunner": "fastsae.training.runner",
    "LanguageModelSAETrainingRunner": "fastsae.training.runner",
    "ActivationsStore": "fastsae.training.data.activations_store",
    "CachedActivationsStore": "fastsae.training.data.cached_activations_store",
    "TrainCoefficientConfig": "fastsae.saes.training_sae",
    "TrainingSAE": "fastsae.saes.training_sae",
    "TrainingSAEConfig": "fastsae.saes.training_sae",
    "TrainStepInput": "fastsae.saes.training_sae",
    "TrainStepOutput": "fastsae.saes.training_sae",
    "StandardTrainingSAE": "fastsae.saes.standard",
    "StandardTrainingSAEConfig": "fastsae.saes.standard",
    "GatedTrainingSAE": "fastsae.saes.gated",
    "GatedTrainingSAEConfig": "fastsae.saes.gated",
    "JumpReLUTrainingSAE": "fastsae.saes.jumprelu",
    "JumpReLUTrainingSAEConfig": "fastsae.saes.jumprelu",
    "TopKTrainingSAE": "fastsae.saes.topk",
    "TopKTrainingSAEConfig": "fastsae.saes.topk",
    "AbsTopKTrainingSAE": "fastsae.saes.topk",
    "AbsTopKTrainingSAEConfig": "fastsae.saes.topk",
    "BatchTopKTrainingSAE": "fastsae.saes.batchtopk",
    "BatchTopKTrainingSAEConfig": "fastsae.saes.batchtopk",
    "MatryoshkaBatchTopKTrainingSAE": "fastsae.saes.batchtopk",
    "MatryoshkaBatchTopKTrainingSAEConfig": "fastsae.saes.batchtopk",
    "MatchingPursuitTrainingSAE": "fastsae.saes.matching_pursuit",
    "MatchingPursuitTrainingSAEConfig": "fastsae.saes.matching_pursuit",
}


def __getattr__(name: str) -> Any:
    # PEP 562: nothing is imported until a name is asked for (see the module docstring)
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'fastsae.training' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES])


if TYPE_CHECKING:  # static checkers and IDEs see the names
    from fastsae.saes.batchtopk import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from fastsae.saes.gated import GatedTrainingSAE, GatedTrainingSAEConfig
    from fastsae.saes.jumprelu import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from fastsae.saes.matching_pursuit import (
        MatchingPursuitTrainingSAE,
        MatchingPursuitTrainingSAEConfig,
    )
    from fastsae.saes.standard import StandardTrainingSAE, StandardTrainingSAEConfig
    from fastsae.saes.topk import (
        AbsTopKTrainingSAE,
        AbsTopKTrainingSAEConfig,
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
    from fastsae.training.config import (
        LanguageModelSAERunnerConfig,
        LoggingConfig,
        SAETrainerConfig,
    )
    from fastsae.training.data.activations_store import ActivationsStore
    from fastsae.training.data.cached_activations_store import CachedActivationsStore
    from fastsae.training.multi_sae_trainer import MultiSAETrainer
    from fastsae.training.nonfinite import NonFiniteLossError
    from fastsae.training.runner import LanguageModelSAETrainingRunner, SAETrainingRunner
    from fastsae.training.trainer import SAETrainer

__all__ = [
    "LanguageModelSAERunnerConfig",
    "LoggingConfig",
    "SAETrainerConfig",
    "NonFiniteLossError",
    "SAETrainer",
    "MultiSAETrainer",
    "SAETrainingRunner",
    "LanguageModelSAETrainingRunner",
    "ActivationsStore",
    "CachedActivationsStore",
    "TrainCoefficientConfig",
    "TrainingSAE",
    "TrainingSAEConfig",
    "TrainStepInput",
    "TrainStepOutput",
    "StandardTrainingSAE",
    "StandardTrainingSAEConfig",
    "GatedTrainingSAE",
    "GatedTrainingSAEConfig",
    "JumpReLUTrainingSAE",
    "JumpReLUTrainingSAEConfig",
    "TopKTrainingSAE",
    "TopKTrainingSAEConfig",
    "AbsTopKTrainingSAE",
    "AbsTopKTrainingSAEConfig",
    "BatchTopKTrainingSAE",
    "BatchTopKTrainingSAEConfig",
    "MatryoshkaBatchTopKTrainingSAE",
    "MatryoshkaBatchTopKTrainingSAEConfig",
    "MatchingPursuitTrainingSAE",
    "MatchingPursuitTrainingSAEConfig",
]
