"""The tiny end-to-end setup shared by the runner, evaluation and hooked-model tests: a
2-layer TransformerLens model (d_model 16, context 16, vocab 50), seeded rows of random
tokens, and a ``LanguageModelSAERunnerConfig`` for a short run on them.

Heavy imports (transformer_lens, datasets, fastsae.training) happen inside the functions:
some of them run in spawned worker processes (see spawn_ranks), and test files import
this module at the top (importable: conftest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import datasets
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from fastsae.training import LanguageModelSAERunnerConfig, TrainingSAEConfig


def tiny_config(**overrides: Any) -> HookedTransformerConfig:
    """The tiny model's ``HookedTransformerConfig``, with ``overrides`` applied."""
    from transformer_lens import HookedTransformerConfig

    kwargs = dict(
        n_layers=2, d_model=16, n_ctx=16, d_head=4, n_heads=4, d_vocab=50,
        act_fn="relu", d_mlp=32, seed=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return HookedTransformerConfig(**kwargs)


def tiny_model(**overrides: Any) -> HookedTransformer:
    """``HookedTransformer(tiny_config(**overrides))`` in eval mode."""
    from transformer_lens import HookedTransformer

    return HookedTransformer(tiny_config(**overrides)).eval()


def token_rows(
    n_rows: int, context_size: int = 16, vocab: int = 50, seed: int = 0, low: int = 1
) -> list[list[int]]:
    """``n_rows`` rows of ``context_size`` token ids drawn uniformly from
    ``[low, vocab)`` by a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (n_rows, context_size), generator=gen).tolist()


def token_rows_dataset(
    n_rows: int, context_size: int = 16, vocab: int = 50, seed: int = 0, low: int = 1
) -> datasets.Dataset:
    """``token_rows(...)`` as a pre-tokenized dataset (one ``tokens`` column)."""
    import datasets

    rows = token_rows(n_rows, context_size, vocab, seed, low)
    return datasets.Dataset.from_dict({"tokens": rows})


def runner_config(
    run_dir: str | Path, sae: TrainingSAEConfig | None = None, **overrides: Any
) -> LanguageModelSAERunnerConfig:
    """A runner config for the tiny model and ``token_rows_dataset`` (passed to the
    runner as ``override_model`` / ``override_dataset``): a TopK SAE (16 -> 64, k 4)
    unless ``sae`` is given, checkpoints under ``run_dir/ck`` and outputs in
    ``run_dir/out``. ``overrides`` replace or add keyword arguments; a caller sets
    its run's length (``training_tokens``) and logging cadence itself."""
    from fastsae.training import LanguageModelSAERunnerConfig, TopKTrainingSAEConfig

    run_dir = Path(run_dir)
    kwargs = dict(
        sae=sae if sae is not None else TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4),
        model_name="tiny", hook_name="blocks.1.hook_resid_pre", dataset_path="unused",
        context_size=16, prepend_bos=False, train_batch_size_tokens=64,
        store_batch_size_prompts=8, n_batches_in_buffer=4, lr=1e-3, n_checkpoints=1,
        run_id="run", checkpoint_path=str(run_dir / "ck"), output_path=str(run_dir / "out"),
        eval_every_n_wandb_logs=2, n_eval_batches=1, eval_batch_size_prompts=2, seed=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return LanguageModelSAERunnerConfig(**kwargs)
