"""fastsae: fast sparse autoencoders with a drop-in SAELens API.

``from fastsae import SAE`` in place of ``from sae_lens import SAE``: same classes,
configs, files and numbers; ``encode_sparse``/``decode_sparse`` and a sparse
``forward`` on top.
"""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING

from fastsae.sparse_code import SparseCode

# The SAE modules need transformer_lens; the ops and kernels do not. Load the modules
# on first use so `from fastsae import ops, SparseCode` works in a bare torch + triton
# environment (e.g. a GPU box running only the kernel tests and benchmarks).
_SAE_NAMES = frozenset(
    {
        "SAE", "SAEConfig", "SAEMetadata", "StandardSAE", "StandardSAEConfig", "GatedSAE",
        "GatedSAEConfig", "JumpReLUSAE", "JumpReLUSAEConfig", "TopKSAE", "TopKSAEConfig",
        "AbsTopKSAE", "AbsTopKSAEConfig", "Transcoder", "TranscoderConfig", "SkipTranscoder",
        "SkipTranscoderConfig", "JumpReLUTranscoder", "JumpReLUTranscoderConfig",
        "JumpReLUSkipTranscoder", "JumpReLUSkipTranscoderConfig", "register_sae_class",
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
        "AbsTopKTrainingSAE", "AbsTopKTrainingSAEConfig",
    }
)  # fmt: skip


# PEP 562: each import below runs on first access of its name; every one is an import
# cost (transformer_lens, datasets, transformers) that `import fastsae` must not pay.
def __getattr__(name: str):
    if name in ("run_evals", "EvalConfig", "get_eval_everything_config"):
        from fastsae import evals  # import cost: transformer_lens, datasets

        return getattr(evals, name)
    # HookedSAETransformer needs TransformerLens 3, SAETransformerBridge a TransformerLens
    # with TransformerBridge (4, or late 3): each raises an ImportError naming the installed
    # version where it is missing, while the rest of fastsae works with either.
    if name == "HookedSAETransformer":
        from fastsae.hooked import HookedSAETransformer  # import cost: transformer_lens

        return HookedSAETransformer
    if name == "SAETransformerBridge":
        from fastsae.sae_bridge import SAETransformerBridge  # import cost: transformer_lens

        return SAETransformerBridge
    if name in ("has_transformer_bridge", "has_hooked_transformer"):
        from fastsae import tl_compat  # import cost: transformer_lens

        return getattr(tl_compat, name)
    if name in _TRAINING_NAMES:
        from fastsae import training  # import cost: transformer_lens, datasets

        return getattr(training, name)
    if name in _SAE_NAMES:
        from fastsae import saes  # import cost: transformer_lens

        return getattr(saes, name)
    if name in ("ops", "torch_ops", "analysis", "evals"):
        return importlib.import_module(f"fastsae.{name}")
    raise AttributeError(f"module 'fastsae' has no attribute {name!r}")


if TYPE_CHECKING:
    from fastsae import ops, torch_ops
    from fastsae.hooked import HookedSAETransformer
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
    from fastsae.tl_compat import has_hooked_transformer, has_transformer_bridge

__all__ = [
    "__version__",
    "ops",
    "torch_ops",
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
    "register_sae_class",
    "register_sae_training_class",
    "HookedSAETransformer",
    "SAETransformerBridge",
    "has_hooked_transformer",
    "has_transformer_bridge",
    "run_evals",
    "EvalConfig",
    "get_eval_everything_config",
    "analysis",
    "evals",
    *sorted(_TRAINING_NAMES),
]
