"""fastsae: fast sparse autoencoders with a drop-in SAELens API.

``from fastsae import SAE`` in place of ``from sae_lens import SAE``: same classes,
configs, files and numbers; ``encode_sparse``/``decode_sparse`` and a sparse
``forward`` on top.
"""

__version__ = "0.1.0"

import importlib
import logging
from typing import TYPE_CHECKING

from fastsae.sparse_code import SparseCode

# the library's logger (SAELens: ``sae_lens.logger``); runs log their plan here at INFO
logger = logging.getLogger(__name__)

# The SAE modules need transformer_lens; the ops and kernels do not. Load the modules
# on first use so `from fastsae import ops, SparseCode` works in a bare torch + triton
# environment (e.g. a GPU box running only the kernel tests and benchmarks).
_SAE_NAMES = frozenset(
    {
        "SAE", "SAEConfig", "SAEMetadata", "StandardSAE", "StandardSAEConfig", "GatedSAE",
        "GatedSAEConfig", "JumpReLUSAE", "JumpReLUSAEConfig", "TopKSAE", "TopKSAEConfig",
        "AbsTopKSAE", "AbsTopKSAEConfig", "Transcoder", "TranscoderConfig", "SkipTranscoder",
        "SkipTranscoderConfig", "JumpReLUTranscoder", "JumpReLUTranscoderConfig",
        "JumpReLUSkipTranscoder", "JumpReLUSkipTranscoderConfig", "MatchingPursuitSAE",
        "MatchingPursuitSAEConfig", "TemporalSAE", "TemporalSAEConfig", "register_sae_class",
        "register_sae_training_class",
    }
)  # fmt: skip


_TRAINING_NAMES = frozenset(
    {
        "LanguageModelSAERunnerConfig", "LoggingConfig", "SAETrainerConfig", "SAETrainingRunner",
        "LanguageModelSAETrainingRunner", "SAETrainer", "ActivationsStore",
        "CachedActivationsStore", "TrainingSAE", "TrainingSAEConfig", "TrainStepInput",
        "TrainStepOutput", "TrainCoefficientConfig", "StandardTrainingSAE",
        "StandardTrainingSAEConfig", "GatedTrainingSAE", "GatedTrainingSAEConfig",
        "JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig", "TopKTrainingSAE",
        "TopKTrainingSAEConfig", "BatchTopKTrainingSAE", "BatchTopKTrainingSAEConfig",
        "MatryoshkaBatchTopKTrainingSAE", "MatryoshkaBatchTopKTrainingSAEConfig",
        "AbsTopKTrainingSAE", "AbsTopKTrainingSAEConfig", "MatchingPursuitTrainingSAE",
        "MatchingPursuitTrainingSAEConfig",
    }
)  # fmt: skip

# every other public name -> the module that defines it. PEP 562: each import runs on
# first access of its name; every one is an import cost (transformer_lens, datasets,
# transformers) that `import fastsae` must not pay.
_NAMES: dict[str, str] = {
    **{name: "fastsae.saes" for name in _SAE_NAMES},
    **{name: "fastsae.training" for name in _TRAINING_NAMES},
    "run_evals": "fastsae.evals",
    "EvalConfig": "fastsae.evals",
    "get_eval_everything_config": "fastsae.evals",
    # HookedSAETransformer needs TransformerLens 3, SAETransformerBridge a TransformerLens
    # with TransformerBridge (4, or late 3): each raises an ImportError naming the
    # installed version where it is missing, while the rest of fastsae works with either
    "HookedSAETransformer": "fastsae.hooked",
    "SAETransformerBridge": "fastsae.sae_bridge",
    "has_transformer_bridge": "fastsae.tl_compat",
    "has_hooked_transformer": "fastsae.tl_compat",
    "PretrainedSaeDiskLoader": "fastsae.loading.disk",
    "PretrainedSaeHuggingfaceLoader": "fastsae.loading.hub",
    "upload_saes_to_huggingface": "fastsae.hub_upload",
    # reading features: Neuronpedia labels
    "download_feature_labels": "fastsae.labels",
    "load_feature_labels": "fastsae.labels",
    "find_feature_labels": "fastsae.labels",
    "neuronpedia_url": "fastsae.labels",
    "FeatureLabels": "fastsae.labels",
    "PretokenizeRunner": "fastsae.pretokenize",
    "PretokenizeRunnerConfig": "fastsae.pretokenize",
    "pretokenize_runner": "fastsae.pretokenize",
    "CacheActivationsRunner": "fastsae.cache_activations_runner",
    "CacheActivationsRunnerConfig": "fastsae.cache_activations_runner",
    "MultiSAETrainingRunner": "fastsae.multi_sae_training_runner",
    "MultiSAETrainingRunnerConfig": "fastsae.multi_sae_training_runner",
    "MultiSAEEvaluator": "fastsae.multi_sae_training_runner",
}
_MODULES = ("ops", "torch_ops", "analysis", "evals")


def __getattr__(name: str):
    module = _NAMES.get(name)
    if module is not None:
        return getattr(importlib.import_module(module), name)
    if name in _MODULES:
        return importlib.import_module(f"fastsae.{name}")
    raise AttributeError(f"module 'fastsae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES, *_MODULES])


if TYPE_CHECKING:
    from fastsae import ops, torch_ops
    from fastsae.cache_activations_runner import (
        CacheActivationsRunner,
        CacheActivationsRunnerConfig,
    )
    from fastsae.evals import EvalConfig, get_eval_everything_config, run_evals
    from fastsae.hooked import HookedSAETransformer
    from fastsae.hub_upload import upload_saes_to_huggingface
    from fastsae.labels import (
        FeatureLabels,
        download_feature_labels,
        find_feature_labels,
        load_feature_labels,
        neuronpedia_url,
    )
    from fastsae.loading.disk import PretrainedSaeDiskLoader
    from fastsae.loading.hub import PretrainedSaeHuggingfaceLoader
    from fastsae.multi_sae_training_runner import (
        MultiSAEEvaluator,
        MultiSAETrainingRunner,
        MultiSAETrainingRunnerConfig,
    )
    from fastsae.pretokenize import (
        PretokenizeRunner,
        PretokenizeRunnerConfig,
        pretokenize_runner,
    )
    from fastsae.sae_bridge import SAETransformerBridge
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
        register_sae_class,
        register_sae_training_class,
    )
    from fastsae.saes.matching_pursuit import (
        MatchingPursuitSAE,
        MatchingPursuitSAEConfig,
        MatchingPursuitTrainingSAE,
        MatchingPursuitTrainingSAEConfig,
    )
    from fastsae.saes.temporal import TemporalSAE, TemporalSAEConfig
    from fastsae.tl_compat import has_hooked_transformer, has_transformer_bridge

__all__ = [
    "__version__",
    "logger",
    "SparseCode",
    "ops",
    "torch_ops",
    "analysis",
    "evals",
    "AbsTopKSAE",
    "AbsTopKSAEConfig",
    "AbsTopKTrainingSAE",
    "AbsTopKTrainingSAEConfig",
    "ActivationsStore",
    "BatchTopKTrainingSAE",
    "BatchTopKTrainingSAEConfig",
    "CacheActivationsRunner",
    "CacheActivationsRunnerConfig",
    "CachedActivationsStore",
    "EvalConfig",
    "FeatureLabels",
    "GatedSAE",
    "GatedSAEConfig",
    "GatedTrainingSAE",
    "GatedTrainingSAEConfig",
    "HookedSAETransformer",
    "JumpReLUSAE",
    "JumpReLUSAEConfig",
    "JumpReLUSkipTranscoder",
    "JumpReLUSkipTranscoderConfig",
    "JumpReLUTrainingSAE",
    "JumpReLUTrainingSAEConfig",
    "JumpReLUTranscoder",
    "JumpReLUTranscoderConfig",
    "LanguageModelSAERunnerConfig",
    "LanguageModelSAETrainingRunner",
    "LoggingConfig",
    "MatchingPursuitSAE",
    "MatchingPursuitSAEConfig",
    "MatchingPursuitTrainingSAE",
    "MatchingPursuitTrainingSAEConfig",
    "MatryoshkaBatchTopKTrainingSAE",
    "MatryoshkaBatchTopKTrainingSAEConfig",
    "MultiSAEEvaluator",
    "MultiSAETrainingRunner",
    "MultiSAETrainingRunnerConfig",
    "PretokenizeRunner",
    "PretokenizeRunnerConfig",
    "PretrainedSaeDiskLoader",
    "PretrainedSaeHuggingfaceLoader",
    "SAE",
    "SAEConfig",
    "SAEMetadata",
    "SAETrainer",
    "SAETrainerConfig",
    "SAETrainingRunner",
    "SAETransformerBridge",
    "SkipTranscoder",
    "SkipTranscoderConfig",
    "StandardSAE",
    "StandardSAEConfig",
    "StandardTrainingSAE",
    "StandardTrainingSAEConfig",
    "TemporalSAE",
    "TemporalSAEConfig",
    "TopKSAE",
    "TopKSAEConfig",
    "TopKTrainingSAE",
    "TopKTrainingSAEConfig",
    "TrainCoefficientConfig",
    "TrainStepInput",
    "TrainStepOutput",
    "TrainingSAE",
    "TrainingSAEConfig",
    "Transcoder",
    "TranscoderConfig",
    "download_feature_labels",
    "find_feature_labels",
    "get_eval_everything_config",
    "has_hooked_transformer",
    "has_transformer_bridge",
    "load_feature_labels",
    "neuronpedia_url",
    "pretokenize_runner",
    "register_sae_class",
    "register_sae_training_class",
    "run_evals",
    "upload_saes_to_huggingface",
]
