"""Evaluation config (SAELens 6.x ``EvalConfig``) and library info."""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def get_library_version() -> str:
    try:
        return version("fastsae")
    except PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=1)
def get_git_hash() -> str:
    """Short commit hash of the fastsae checkout, or ``"unknown"``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return out.stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return "unknown"


@dataclass
class EvalConfig:
    """Which metrics ``run_evals`` computes and on how many batches (SAELens's fields).

    Every ``compute_*`` is off by default: turn on the ones you want, or use
    :func:`get_eval_everything_config`.
    """

    batch_size_prompts: int | None = None
    """Rows of ``context_size`` tokens per batch; None (or 0) takes the store's
    ``store_batch_size_prompts``."""
    n_eval_reconstruction_batches: int = 10
    """Batches for the CE loss and KL metrics."""
    compute_kl: bool = False
    """KL of the spliced and zero-ablated models from the clean one, and the KL score."""
    compute_ce_loss: bool = False
    """Next-token CE with/without the SAE and zero-ablated, and the CE loss score."""
    n_eval_sparsity_variance_batches: int = 1
    """Batches for the L2, sparsity, variance and density metrics."""
    compute_l2_norms: bool = False
    """``shrinkage``: input/output L2 norms, their ratio, relative reconstruction bias."""
    compute_sparsity_metrics: bool = False
    """``sparsity``: L0 and L1 of the feature activations per token."""
    compute_variance_metrics: bool = False
    """``reconstruction_quality``: explained variance (both formulas), MSE, cosine."""
    compute_featurewise_density_statistics: bool = False
    """Feature metrics ``feature_density`` and ``consistent_activation_heuristic``."""
    compute_featurewise_weight_based_metrics: bool = False
    """Feature metrics ``encoder_norm``, ``encoder_decoder_cosine_sim``, ``encoder_bias``."""
    library_version: str = field(default_factory=get_library_version)
    """fastsae's version (recorded with the results)."""
    git_hash: str = field(default_factory=get_git_hash)
    """fastsae's commit when run from a checkout, else ``"unknown"``."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("compute_") and not isinstance(value, bool):
                raise ValueError(f"EvalConfig.{f.name} must be a bool, got {value!r}")
            if f.name.startswith("n_eval_") and (
                isinstance(value, bool) or not isinstance(value, int)
            ):
                raise ValueError(f"EvalConfig.{f.name} must be an int, got {value!r}")
        bs = self.batch_size_prompts
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 0):
            raise ValueError(
                f"EvalConfig.batch_size_prompts must be None or an int >= 0, got {bs!r}"
            )


def get_eval_everything_config(
    batch_size_prompts: int | None = None,
    n_eval_reconstruction_batches: int = 10,
    n_eval_sparsity_variance_batches: int = 1,
) -> EvalConfig:
    """An :class:`EvalConfig` with every metric turned on."""
    return EvalConfig(
        batch_size_prompts=batch_size_prompts,
        n_eval_reconstruction_batches=n_eval_reconstruction_batches,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        n_eval_sparsity_variance_batches=n_eval_sparsity_variance_batches,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
    )


# ----------------------------------------------------------------------------------------
# where the SAE reads and writes in the model
# ----------------------------------------------------------------------------------------
