"""``SAETrainingRunner``: config in, trained SAE out (SAELens 6.x's runner surface).

It loads the model (TransformerLens by name, or any ``transformers`` model with
``model_class_name="AutoModel"``), builds the activation source (a live
``ActivationsStore`` or a ``CachedActivationsStore`` written by ``fastsae cache``),
the training SAE and the evaluator, runs :class:`~fastsae.training.trainer.SAETrainer`
and saves the result (inference format) to ``output_path``.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed
from transformers import AutoModel, AutoTokenizer

from fastsae import logger
from fastsae.loading.atomic_dir import recover_dir
from fastsae.loading.disk import read_json, save_sae
from fastsae.saes.training_sae import TrainingSAE, TrainingSAEConfig
from fastsae.tl_compat import require_hooked_transformer, require_transformer_bridge
from fastsae.training.checkpoints import RUNNER_CFG_FILENAME
from fastsae.training.config import (
    LanguageModelSAERunnerConfig,
    SAETrainerConfig,
    require_dataset_path,
)
from fastsae.training.data.activations_store import ActivationsStore
from fastsae.training.data.cached_activations_store import CachedActivationsStore
from fastsae.training.parallel.strategy import ParallelStrategy, choose_strategy

try:  # TransformerLens 3.x only (4.x has TransformerBridge instead)
    from transformer_lens import HookedTransformer
except ImportError:  # pragma: no cover - depends on the installed TransformerLens
    HookedTransformer = None


def load_model(cfg: LanguageModelSAERunnerConfig) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``cfg.model_name`` on ``cfg.llm_device`` (see
    :func:`load_model_by_name`), after checking the config's devices exist."""
    check_devices_available(cfg)  # `fastsae cache` loads the model without a runner
    return load_model_by_name(
        cfg.model_name, cfg.model_class_name, cfg.llm_device, cfg.model_from_pretrained_kwargs
    )


def load_model_by_name(
    model_name: str,
    model_class_name: str = "HookedTransformer",
    device: str | torch.device = "cpu",
    from_pretrained_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)``: ``model_name`` loaded as ``model_class_name`` on ``device``.

    TransformerLens models carry their tokenizer (returned as None here):
    ``HookedTransformer`` (TransformerLens 3) and ``TransformerBridge`` (TransformerLens
    4, or 3.x with ``model_bridge``; ``TransformerBridge.boot_transformers``, which reads
    a hub id or a local folder of a ``transformers`` causal LM); each raises an ImportError
    naming the installed TransformerLens when it lacks the class. ``AutoModel`` loads
    ``transformers.AutoModel`` and ``AutoTokenizer`` from a hub id or a folder.
    """
    check_local_model_path(model_name)
    kwargs = dict(from_pretrained_kwargs or {})
    if model_class_name == "HookedTransformer":
        model = require_hooked_transformer().from_pretrained(model_name, device=device, **kwargs)
        return model.eval(), None
    if model_class_name == "TransformerBridge":
        model = require_transformer_bridge().boot_transformers(model_name, device=device, **kwargs)
        return model.eval(), None
    if model_class_name in ("AutoModel", "transformers"):
        model = AutoModel.from_pretrained(model_name, **kwargs).to(device).eval()
        return model, AutoTokenizer.from_pretrained(model_name)
    raise ValueError(
        "model_class_name must be 'HookedTransformer', 'TransformerBridge' or 'AutoModel', "
        f"got {model_class_name!r}"
    )


def check_local_model_path(model_name: str) -> None:
    """Raise naming ``model_name`` when it is spelled as a local path (absolute, ``./``,
    ``../``, ``~``, or more than one ``/``: a hub id has at most one) that does not exist,
    instead of the hub's "Repo id must be in the form..." error."""
    name = str(model_name)
    looks_local = (
        Path(name).is_absolute()
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
    )
    if looks_local and not Path(name).expanduser().exists():
        raise FileNotFoundError(
            f"model_name={name!r}: no such local model folder "
            f"({Path(name).expanduser().absolute()} does not exist)"
        )


def check_devices_available(cfg: LanguageModelSAERunnerConfig) -> None:
    """Raise naming the field when ``device``, ``llm_device`` or ``act_store_device``
    asks for CUDA that this machine does not have (before any model loads)."""
    for name in ("device", "llm_device", "act_store_device"):
        value = getattr(cfg, name, None)
        if value is None or not str(value).startswith("cuda"):
            continue
        if not torch.cuda.is_available():
            raise ValueError(
                f"{name}={value!r}, but CUDA is not available on this machine "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
                f"set {name}: cpu or run on a machine with a GPU"
            )
        index = torch.device(value).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(
                f"{name}={value!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SAETrainingRunner:
    """Train an SAE as ``cfg`` says: ``SAETrainingRunner(cfg).run()`` returns the training SAE.

    ``override_dataset`` / ``override_model``: use these instead of loading
    ``cfg.dataset_path`` / ``cfg.model_name`` (a ``datasets`` dataset, a model object;
    SAELens's positional order).
    ``override_tokenizer``: the tokenizer of a ``transformers`` override_model.
    ``override_sae``: start from this training SAE instead of a fresh one.
    """

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig,
        override_dataset: Any = None,
        override_model: Any = None,
        override_sae: TrainingSAE | None = None,
        *,
        override_tokenizer: Any = None,
        show_progress: bool = True,
    ):
        if not isinstance(cfg, LanguageModelSAERunnerConfig):
            raise TypeError(f"cfg must be a LanguageModelSAERunnerConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.show_progress = show_progress
        check_devices_available(cfg)
        # how the run is spread over processes (one, data parallel, latent sharded):
        # joins torchrun's process group when launched under it (WORLD_SIZE > 1)
        self.parallel: ParallelStrategy = choose_strategy(cfg)
        self.dist = self.parallel.dist
        self.mesh = self.parallel.mesh  # the data_parallel x latent_shards mesh, or None
        seed_everything(cfg.seed)
        self.run_id = _shared_run_id(cfg.run_id, self.dist.world_size)
        self.model, self.tokenizer = None, override_tokenizer
        if cfg.use_cached_activations:
            self.activations_store: Any = CachedActivationsStore(
                cfg.cached_activations_path,
                train_batch_size_tokens=cfg.train_batch_size_tokens,
                seed=cfg.seed,
                device=cfg.act_store_device,
                dtype=cfg.dtype,
                hook_name=cfg.hook_name,
            )
            if self.activations_store.d_in != cfg.sae.d_in:
                raise ValueError(
                    f"sae.d_in={cfg.sae.d_in} but the cached activations at "
                    f"{cfg.cached_activations_path} have width {self.activations_store.d_in}"
                )
        else:
            if override_dataset is None:
                require_dataset_path(cfg)  # before the model loads
            if override_model is not None:
                self.model = override_model
            else:
                self.model, self.tokenizer = load_model(cfg)
            self.activations_store = ActivationsStore.from_config(
                self.model, cfg, override_dataset, tokenizer=self.tokenizer
            )
            self.activations_store.show_progress = show_progress
        self.sae = override_sae if override_sae is not None else self._build_sae()

    def _build_sae(self) -> TrainingSAE:
        cfg = self.cfg
        md = cfg.sae.metadata
        md.model_name = cfg.model_name
        md.model_class_name = cfg.model_class_name
        md.hook_name = cfg.hook_name
        md.hook_head_index = cfg.hook_head_index
        md.context_size = cfg.context_size
        md.prepend_bos = cfg.prepend_bos
        md.seqpos_slice = list(cfg.seqpos_slice)
        md.dataset_path = cfg.dataset_path if isinstance(cfg.dataset_path, str) else None
        md.exclude_special_tokens = cfg.exclude_special_tokens
        md.model_from_pretrained_kwargs = cfg.model_from_pretrained_kwargs
        sae_cfg = cfg.sae
        if cfg.from_pretrained_path is not None:
            sae_cfg_dict = read_json(recover_dir(Path(cfg.from_pretrained_path)) / "cfg.json")
            sae_cfg = TrainingSAEConfig.from_dict(
                {**cfg.sae.to_dict(), **sae_cfg_dict, "architecture": cfg.sae.architecture(),
                 "device": cfg.device}
            )  # fmt: skip
        return self.parallel.build_sae(sae_cfg)

    def _evaluator(self):
        store, model, cfg = self.activations_store, self.model, self.cfg
        parallel = self.parallel

        def evaluate(sae: Any) -> dict[str, Any]:
            batches = [next(store) for _ in range(cfg.n_eval_batches)]
            res: dict[str, Any] = {
                f"eval/{k}": v for k, v in parallel.reconstruction_metrics(sae, batches).items()
            }
            if _is_language_model(model) and hasattr(store, "get_batch_tokens"):
                tokens = store.get_batch_tokens(cfg.eval_batch_size_prompts)
                lm = parallel.language_model_metrics(
                    sae, model, tokens.to(cfg.llm_device), cfg.hook_name,
                    hook_head_index=cfg.hook_head_index,
                )  # fmt: skip
                res.update({f"eval/{k}": v for k, v in lm.items()})
            return res

        return evaluate

    def run(self) -> TrainingSAE:
        """Train; save the inference SAE to ``output_path``; return the training SAE.

        With ``latent_shards > 1``, rank 0 returns the full training SAE in host memory
        (``cpu``: it may not fit one device) and every other rank its own shard
        (a :class:`~fastsae.training.parallel.latent.ShardedTrainingSAE`)."""
        cfg = self.cfg
        run_dir = Path(cfg.output_path) if cfg.output_path is not None else None
        parallel = self.parallel
        if cfg.verbose and parallel.is_main:
            log_run_plan(cfg, self.activations_store)
        wandb_run = None
        if cfg.logger.log_to_wandb and parallel.is_main:
            import wandb  # optional dependency (the fastsae[wandb] extra): only when logging

            wandb_run = wandb.init(
                project=cfg.logger.wandb_project,
                entity=cfg.logger.wandb_entity,
                name=cfg.logger.run_name,
                id=cfg.logger.wandb_id,
                config=cfg.to_dict(),
            )
        checkpoint_cfg = cfg
        if cfg.checkpoint_path is not None:
            checkpoint_cfg = _WithCheckpointPath(cfg, str(Path(cfg.checkpoint_path) / self.run_id))
        # a latent-sharded run cuts an override_sae into this rank's shard and does not
        # keep the full SAE during training
        sae = self.sae = parallel.prepare_sae(self.sae)
        self.trainer = parallel.make_trainer(
            checkpoint_cfg,
            sae,
            parallel.trainer_data(self.activations_store),
            evaluator=self._evaluator(),
            run_dir=run_dir,
            wandb_run=wandb_run,
            show_progress=self.show_progress,
        )
        if cfg.resume_from_checkpoint is not None:
            self.trainer.load_checkpoint(cfg.resume_from_checkpoint)
        try:
            fitted = self.trainer.fit()
        finally:
            # stop the store's prefetch thread (prefetch_llm_batches), if it has one
            close = getattr(self.activations_store, "close", None)
            if close is not None:
                close()
            if wandb_run is not None:
                wandb_run.finish()
        # with latent sharding, rank 0 gathers the full SAE (and its sparsity) to save
        sae, sparsity = parallel.final_sae(self.trainer, fitted)
        self.sae = sae
        if run_dir is not None and parallel.is_main:
            self.save_final_sae(run_dir, sparsity=sparsity)
        return sae

    def save_final_sae(self, path: str | Path, *, sparsity: torch.Tensor | None = None) -> Path:
        """The trained SAE in the inference SAELens format, with its log sparsity (default:
        the trainer's) and the runner config, to ``path``: one folder swap, so the runner
        config never describes another SAE than the one beside it."""
        path = Path(path)
        inference = self.sae.to_inference_sae()
        if sparsity is None:
            sparsity = self.trainer.log_feature_sparsity
        runner_cfg = json.dumps(self.cfg.to_dict(), indent=2)
        save_sae(inference, path, sparsity=sparsity, extra_files={RUNNER_CFG_FILENAME: runner_cfg})
        return path


LanguageModelSAETrainingRunner = SAETrainingRunner


def log_run_plan(cfg: LanguageModelSAERunnerConfig, store: Any) -> None:
    """The run's plan at INFO on ``fastsae.logger`` (what SAELens logs when ``verbose``)."""
    steps = cfg.training_tokens // cfg.train_batch_size_tokens
    logger.info(
        "Run: %s-%d, lr %g, %.3e tokens, %d steps of %d tokens",
        cfg.sae.architecture(), cfg.sae.d_sae, cfg.lr, cfg.training_tokens, steps,
        cfg.train_batch_size_tokens,
    )  # fmt: skip
    buffer = getattr(store, "buffer_size_tokens", None)
    if buffer is not None:
        logger.info("Shuffling buffer: %d activations (%d contexts)", buffer,
                    buffer // max(1, store.training_context_size))  # fmt: skip
    logger.info(
        "Sparsity window: %d steps (%.2e tokens); dead-feature window: %d steps; "
        "%d window resets",
        cfg.feature_sampling_window, cfg.feature_sampling_window * cfg.train_batch_size_tokens,
        cfg.dead_feature_window, steps // max(1, cfg.feature_sampling_window),
    )  # fmt: skip


def _shared_run_id(run_id: str | None, world_size: int) -> str:
    """The run's id (checkpoint folder name), the same on every rank."""
    if run_id is not None:
        return run_id
    ids = [uuid.uuid4().hex[:8]]
    if world_size > 1:
        torch.distributed.broadcast_object_list(ids, src=0)
    return ids[0]


class _WithCheckpointPath:
    """The runner config with ``checkpoint_path`` pointing at this run's folder."""

    def __init__(self, cfg: LanguageModelSAERunnerConfig, checkpoint_path: str):
        self._cfg = cfg
        self.checkpoint_path = checkpoint_path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cfg, name)

    def to_dict(self) -> dict[str, Any]:
        return self._cfg.to_dict()

    def to_sae_trainer_config(self) -> SAETrainerConfig:
        trainer_cfg = self._cfg.to_sae_trainer_config()
        trainer_cfg.checkpoint_path = self.checkpoint_path
        return trainer_cfg


def _is_language_model(model: Any) -> bool:
    return HookedTransformer is not None and isinstance(model, HookedTransformer)
