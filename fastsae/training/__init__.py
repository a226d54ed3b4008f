"""Training: SAELens-compatible config, training SAEs, activation store, trainer, runner."""

from fastsae.training.config import LanguageModelSAERunnerConfig, LoggingConfig
from fastsae.training.nonfinite import NonFiniteLossError
from fastsae.training.saes import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from fastsae.training.trainer import SAETrainer


def __getattr__(name: str):
    # the runner and the stores pull in datasets/transformers: load them on first use
    if name in ("SAETrainingRunner", "LanguageModelSAETrainingRunner"):
        from fastsae.training import runner

        return getattr(runner, name)
    if name == "ActivationsStore":
        from fastsae.training.activations_store import ActivationsStore

        return ActivationsStore
    if name == "CachedActivationsStore":
        from fastsae.training.cached_activations_store import CachedActivationsStore

        return CachedActivationsStore
    raise AttributeError(f"module 'fastsae.training' has no attribute {name!r}")


__all__ = [
    "LanguageModelSAERunnerConfig",
    "LoggingConfig",
    "NonFiniteLossError",
    "SAETrainer",
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
    "BatchTopKTrainingSAE",
    "BatchTopKTrainingSAEConfig",
    "MatryoshkaBatchTopKTrainingSAE",
    "MatryoshkaBatchTopKTrainingSAEConfig",
]
