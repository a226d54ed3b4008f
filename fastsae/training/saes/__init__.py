"""Training SAEs: SAELens 6.x's training classes on fastsae's sparse kernels."""

from fastsae.training.saes.base import (
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
    training_config_class_for_architecture,
    training_sae_class_for_architecture,
)
from fastsae.training.saes.batchtopk import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from fastsae.training.saes.gated import GatedTrainingSAE, GatedTrainingSAEConfig
from fastsae.training.saes.jumprelu import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from fastsae.training.saes.standard import StandardTrainingSAE, StandardTrainingSAEConfig
from fastsae.training.saes.topk import TopKTrainingSAE, TopKTrainingSAEConfig

__all__ = [
    "TrainCoefficientConfig",
    "TrainingSAE",
    "TrainingSAEConfig",
    "TrainStepInput",
    "TrainStepOutput",
    "training_config_class_for_architecture",
    "training_sae_class_for_architecture",
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
