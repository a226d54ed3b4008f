"""Run a model over a dataset once and write its hook activations in SAELens's cache
format: ``CacheActivationsRunner`` / ``CacheActivationsRunnerConfig`` (``from sae_lens
import CacheActivationsRunner, CacheActivationsRunnerConfig``).

The cache is a Hugging Face ``datasets`` folder (what ``Dataset.save_to_disk`` writes:
``state.json``, ``dataset_info.json``, ``data-XXXXX-of-NNNNN.arrow``), one row per token
row of the model, with the columns

* ``<hook_name>``: ``Array2D((sliced_context_size, d_in), dtype)``, the activations at
  the positions ``seqpos_slice`` keeps (special tokens included: nothing is filtered);
* ``token_ids``: ``Sequence(int32, length=sliced_context_size)``, the tokens there.

As in SAELens, ``n_buffers`` buffers of ``n_seq_in_buffer`` rows are written (one Arrow
file each, in dataset order, starting the dataset again when it runs out), so the cache
holds ``n_buffers * n_tokens_in_buffer >= training_tokens`` tokens. SAELens training with
``use_cached_activations=True`` reads the folder, and so does fastsae's
:class:`~fastsae.training.data.cached_activations_store.CachedActivationsStore` (which
also reads fastsae's own safetensors caches, from ``fastsae cache``). The folder is
written beside the target and swapped in when complete
(:mod:`fastsae.loading.atomic_dir`); ``run()`` returns the dataset, shuffled with
``seed`` when ``shuffle`` (the order on disk is the dataset order, as SAELens leaves it).
"""

from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm

from fastsae.loading.atomic_dir import check_replaceable, commit_dir, new_temp_dir, recover_dir
from fastsae.saes.config import dtype_to_str, str_to_dtype
from fastsae.training.config import check_seqpos_slice
from fastsae.training.data.activations_store import ActivationsStore
from fastsae.training.data.text_loading import load_text_dataset

__all__ = [
    "CONFIG_FILENAME",
    "CacheActivationsRunner",
    "CacheActivationsRunnerConfig",
    "TOKEN_IDS_COLUMN",
    "default_cached_activations_path",
]

TOKEN_IDS_COLUMN = "token_ids"
CONFIG_FILENAME = "cache_activations_runner_cfg.json"  # beside a cache pushed to the Hub
# dtypes an Arrow array holds (there is no bfloat16 in Arrow)
_ARROW_DTYPES = ("float16", "float32", "float64")


def default_cached_activations_path(
    dataset_path: str, model_name: str, hook_name: str, hook_head_index: int | None = None
) -> str:
    """SAELens's default cache folder: ``activations/<dataset>/<model>/<hook>[_<head>]``
    (``/`` in the dataset and model names replaced by ``_``)."""
    path = (
        f"activations/{dataset_path.replace('/', '_')}/{model_name.replace('/', '_')}/{hook_name}"
    )
    return path if hook_head_index is None else f"{path}_{hook_head_index}"


def _first_row_length(dataset_path: str) -> int:
    """Tokens in the first row of a pre-tokenized dataset (its ``tokens`` or
    ``input_ids`` column), for ``context_size=-1``."""
    dataset = load_text_dataset(dataset_path, streaming=True)
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError(f"dataset {dataset_path!r} is empty: cannot read its context_size")
    for column in ("tokens", "input_ids"):
        tokens = first.get(column)
        if tokens is not None and len(tokens):
            return len(tokens)
    raise ValueError(
        f"dataset {dataset_path!r} is not tokenized (no 'tokens' or 'input_ids' column); "
        "please specify context_size"
    )


@dataclass
class CacheActivationsRunnerConfig:
    """What to cache and where (SAELens's fields, defaults and order).

    Args:
        dataset_path: Hugging Face dataset id or local path (text or pre-tokenized).
        model_name, model_class_name: the model to load ("HookedTransformer",
            "TransformerBridge" or "AutoModel" in fastsae).
        model_batch_size: token rows per model forward.
        hook_name: the hook whose activations are cached.
        d_in: width of the hook's activations.
        training_tokens: tokens to cache (rounded up to whole buffers).
        context_size: tokens per row; -1 reads it from the first row of a pre-tokenized
            ``dataset_path``.
        new_cached_activations_path: the cache folder (default
            ``activations/<dataset>/<model>/<hook>``); it must be missing or empty.
        shuffle, seed: shuffle the returned (and pushed) dataset.
        dtype: activations' dtype on disk: float32, float16 or float64.
        device: the model's device.
        buffer_size_gb: size of one buffer (one Arrow file) in GB (1e9 bytes).
        hf_repo_id, hf_num_shards, hf_revision, hf_is_private_repo: push the cache to
            this Hub dataset repository.
        model_kwargs: keyword arguments of the model call.
        model_from_pretrained_kwargs: keyword arguments of the model's loading.
        compile_llm, llm_compilation_mode: ``torch.compile`` the model (with this mode).
        prepend_bos: rows packed from text start with BOS.
        seqpos_slice: ``slice(*seqpos_slice)`` of the positions cached.
        streaming: stream the dataset.
        autocast_lm: run the model under bf16 autocast.
        dataset_trust_remote_code: passed when loading ``dataset_path``.
        use_chat_formatting: tokenize the dataset's conversations with the tokenizer's
            chat template (see ``ActivationsStore``); ``context_size`` must then be set.
    """

    dataset_path: str
    model_name: str
    model_batch_size: int
    hook_name: str
    d_in: int
    training_tokens: int

    context_size: int = -1  # read from a pre-tokenized dataset when left -1
    model_class_name: str = "HookedTransformer"
    # defaults to "activations/{dataset}/{model}/{hook_name}"
    new_cached_activations_path: str | None = None
    shuffle: bool = True
    seed: int = 42
    dtype: str = "float32"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    buffer_size_gb: float = 2.0  # HF datasets writer have problems with shards > 2GB

    # Huggingface Integration
    hf_repo_id: str | None = None
    hf_num_shards: int | None = None
    hf_revision: str = "main"
    hf_is_private_repo: bool = False

    # Model
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    model_from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)
    compile_llm: bool = False
    llm_compilation_mode: str | None = None  # which torch.compile mode to use

    # Activation Store
    prepend_bos: bool = True
    seqpos_slice: tuple[int | None, ...] = (None,)
    streaming: bool = True
    autocast_lm: bool = False
    dataset_trust_remote_code: bool | None = None
    use_chat_formatting: bool = False

    def __post_init__(self) -> None:
        for name in ("model_batch_size", "d_in", "training_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.hook_name, str) or not self.hook_name:
            raise ValueError(f"hook_name must be a non-empty str, got {self.hook_name!r}")
        try:
            dtype = dtype_to_str(self.dtype)
        except (ValueError, KeyError) as e:
            raise ValueError(f"dtype: {e}") from None
        if dtype not in _ARROW_DTYPES:
            raise ValueError(
                f"dtype={self.dtype!r}: the cache is an Arrow dataset, which stores "
                f"{', '.join(_ARROW_DTYPES)} (no bfloat16)"
            )
        self.dtype = dtype
        if not isinstance(self.buffer_size_gb, (int, float)) or not self.buffer_size_gb > 0:
            raise ValueError(f"buffer_size_gb must be positive, got {self.buffer_size_gb!r}")
        if self.hf_num_shards is not None and (
            isinstance(self.hf_num_shards, bool)
            or not isinstance(self.hf_num_shards, int)
            or self.hf_num_shards <= 0
        ):
            raise ValueError(
                f"hf_num_shards must be a positive int or None, got {self.hf_num_shards!r}"
            )
        if self.use_chat_formatting and self.context_size == -1:
            raise ValueError(
                "context_size must be explicitly set when use_chat_formatting is True."
            )
        if self.context_size == -1:
            self.context_size = _first_row_length(self.dataset_path)
        if (
            isinstance(self.context_size, bool)
            or not isinstance(self.context_size, int)
            or self.context_size <= 0
        ):
            raise ValueError(
                f"context_size must be a positive int (or -1 for a pre-tokenized dataset), "
                f"got {self.context_size!r}"
            )
        self.seqpos_slice = tuple(self.seqpos_slice)
        check_seqpos_slice(self.seqpos_slice, self.context_size)
        if self.context_size > self.training_tokens:
            raise ValueError(
                f"context_size ({self.context_size}) is greater than training_tokens "
                f"({self.training_tokens}). Please reduce context_size or increase training_tokens."
            )
        if self.n_tokens_in_buffer == 0:
            raise ValueError(
                f"buffer_size_gb={self.buffer_size_gb} holds fewer activations than one model "
                f"batch ({self.n_tokens_in_batch} tokens of {self.bytes_per_token} bytes); "
                "raise buffer_size_gb or lower model_batch_size"
            )
        if self.new_cached_activations_path is None:
            self.new_cached_activations_path = default_cached_activations_path(
                self.dataset_path, self.model_name, self.hook_name
            )

    @property
    def sliced_context_size(self) -> int:
        """Positions per row kept by ``seqpos_slice``."""
        return len(range(self.context_size)[slice(*self.seqpos_slice)])

    @property
    def bytes_per_token(self) -> int:
        return self.d_in * str_to_dtype(self.dtype).itemsize

    @property
    def n_tokens_in_batch(self) -> int:
        return self.model_batch_size * self.sliced_context_size

    @property
    def n_tokens_in_buffer(self) -> int:
        """Tokens of one buffer: what ``buffer_size_gb`` holds, in whole model batches."""
        fit = int(self.buffer_size_gb * 1e9) // self.bytes_per_token
        return fit - fit % self.n_tokens_in_batch

    @property
    def n_batches_in_buffer(self) -> int:
        return self.n_tokens_in_buffer // self.n_tokens_in_batch

    @property
    def n_seq_in_dataset(self) -> int:
        return self.training_tokens // self.sliced_context_size

    @property
    def n_seq_in_buffer(self) -> int:
        return self.n_tokens_in_buffer // self.sliced_context_size

    @property
    def n_buffers(self) -> int:
        return math.ceil(self.training_tokens / self.n_tokens_in_buffer)


def _load_model(cfg: CacheActivationsRunnerConfig) -> tuple[Any, Any]:
    """``(model, tokenizer)`` through the training runner's loader (no download of a
    model already given as ``override_model``)."""
    from fastsae.training.runner import load_model

    spec = SimpleNamespace(
        model_name=cfg.model_name,
        model_class_name=cfg.model_class_name,
        model_from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
        device=cfg.device,
        llm_device=cfg.device,
    )
    return load_model(spec)  # type: ignore[arg-type]


def _check_hub_reachable(what: str) -> None:
    import huggingface_hub

    if huggingface_hub.is_offline_mode():
        raise RuntimeError(
            f"{what}: cannot push to the Hugging Face Hub in offline mode (HF_HUB_OFFLINE "
            "is set); unset it, or set hf_repo_id=None"
        )


class CacheActivationsRunner:
    """Cache ``cfg.training_tokens`` activations of ``cfg.hook_name`` in SAELens's format.

    ``override_dataset``: use this dataset instead of loading ``cfg.dataset_path``.
    ``override_model`` / ``override_tokenizer`` (fastsae's additions): use this model
    (and, for a ``transformers`` model, its tokenizer) instead of loading
    ``cfg.model_name``.
    """

    def __init__(
        self,
        cfg: CacheActivationsRunnerConfig,
        override_dataset: Any = None,
        *,
        override_model: Any = None,
        override_tokenizer: Any = None,
    ):
        if not isinstance(cfg, CacheActivationsRunnerConfig):
            raise TypeError(f"cfg must be a CacheActivationsRunnerConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        tokenizer = override_tokenizer
        if override_model is None:
            self.model, loaded_tokenizer = _load_model(cfg)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        else:
            self.model = override_model
        if cfg.compile_llm:
            self.model = torch.compile(self.model, mode=cfg.llm_compilation_mode)
        self.context_size = cfg.sliced_context_size
        self.activations_store = ActivationsStore(
            self.model,
            override_dataset if override_dataset is not None else cfg.dataset_path,
            hook_name=cfg.hook_name,
            d_in=cfg.d_in,
            context_size=cfg.context_size,
            train_batch_size_tokens=cfg.n_tokens_in_batch,
            store_batch_size_prompts=cfg.model_batch_size,
            n_batches_in_buffer=1,
            prepend_bos=cfg.prepend_bos,
            tokenizer=tokenizer,
            seqpos_slice=cfg.seqpos_slice,
            device="cpu",  # the activations go to disk
            dtype=cfg.dtype,
            model_kwargs=cfg.model_kwargs,
            autocast_lm=cfg.autocast_lm,
            streaming=cfg.streaming,
            dataset_trust_remote_code=bool(cfg.dataset_trust_remote_code),
            use_chat_formatting=cfg.use_chat_formatting,
        )
        from datasets import Array2D, Features, Sequence, Value

        self.features = Features(
            {
                cfg.hook_name: Array2D(shape=(self.context_size, cfg.d_in), dtype=cfg.dtype),
                TOKEN_IDS_COLUMN: Sequence(Value(dtype="int32"), length=self.context_size),
            }
        )

    def __str__(self) -> str:
        cfg = self.cfg
        n_tokens = cfg.n_seq_in_dataset * self.context_size
        return (
            "Activation Cache Runner:\n"
            f"Total training tokens: {n_tokens}\n"
            f"Number of buffers: {cfg.n_buffers}\n"
            f"Tokens per buffer: {cfg.n_tokens_in_buffer}\n"
            f"Disk space required: {n_tokens * cfg.bytes_per_token / 1e9:.2f} GB\n"
            f"Configuration:\n{cfg}"
        )

    # -- one buffer --------------------------------------------------------------------------
    @torch.no_grad()
    def _next_buffer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_seq_in_buffer`` rows: activations ``[rows, sliced_ctx, d_in]`` and their
        token ids ``[rows, sliced_ctx]`` (int32), in dataset order."""
        store, cfg = self.activations_store, self.cfg
        acts, ids = [], []
        for _ in range(cfg.n_batches_in_buffer):
            tokens = store.get_batch_tokens()
            acts.append(store.get_activations(tokens))
            ids.append(tokens[:, slice(*cfg.seqpos_slice)].to("cpu", torch.int32))
        return torch.cat(acts), torch.cat(ids)

    def _create_shard(self, buffer: tuple[torch.Tensor, torch.Tensor]) -> Any:
        """One buffer as a ``datasets.Dataset`` with the cache's features (in memory)."""
        from datasets import Dataset

        acts, ids = buffer
        rows = self.cfg.n_seq_in_buffer
        expect = (rows, self.context_size, self.cfg.d_in)
        if tuple(acts.shape) != expect or tuple(ids.shape) != expect[:2]:
            raise ValueError(
                f"a buffer holds activations {tuple(acts.shape)} and token ids "
                f"{tuple(ids.shape)}; expected {expect} and {expect[:2]}"
            )
        data = {self.cfg.hook_name: acts.to(str_to_dtype(self.cfg.dtype)), TOKEN_IDS_COLUMN: ids}
        return Dataset.from_dict(data, features=self.features)

    # -- the folder --------------------------------------------------------------------------
    def _write_folder(self, folder: Path) -> None:
        """The cache's Arrow files, state.json and dataset_info.json into ``folder``."""
        from datasets import Dataset, concatenate_datasets
        from datasets.arrow_writer import ArrowWriter
        from datasets.fingerprint import generate_fingerprint

        n = self.cfg.n_buffers
        names = [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
        for name in tqdm(names, desc="Caching activations"):
            shard = self._create_shard(self._next_buffer())
            writer = ArrowWriter(features=self.features, path=str(folder / name))
            try:
                for table in shard.with_format("arrow").iter(batch_size=1000):
                    writer.write_table(table)
                writer.finalize()
            finally:
                writer.close()
            del shard
        written = concatenate_datasets([Dataset.from_file(str(folder / f)) for f in names])
        # what save_to_disk writes for a dataset built in memory: the features and the
        # (empty) descriptive fields
        info = {"citation": "", "description": "", "features": self.features.to_dict()}
        info.update(homepage="", license="")
        (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))
        state = {
            "_data_files": [{"filename": f} for f in names],
            "_fingerprint": generate_fingerprint(written),
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        del written

    @torch.no_grad()
    def run(self) -> Any:
        """Write the cache to ``cfg.new_cached_activations_path`` (missing or empty);
        push it to ``cfg.hf_repo_id`` when set. Returns the cached dataset (shuffled with
        ``cfg.seed`` when ``cfg.shuffle``)."""
        from datasets import Dataset

        cfg = self.cfg
        assert cfg.new_cached_activations_path is not None  # set by the config
        target = recover_dir(Path(cfg.new_cached_activations_path))
        if target.exists() and not target.is_dir():
            raise FileExistsError(f"Activations path {target} exists and is not a directory")
        if target.is_dir() and any(target.iterdir()):
            raise FileExistsError(
                f"Activations directory {target} is not empty; delete it or set "
                "new_cached_activations_path to another folder (nothing is overwritten)"
            )
        check_replaceable(target)
        if cfg.hf_repo_id:
            _check_hub_reachable(f"hf_repo_id={cfg.hf_repo_id!r}")
        tmp = new_temp_dir(target)
        try:
            self._write_folder(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        commit_dir(tmp, target)
        dataset = Dataset.load_from_disk(str(target))
        if cfg.shuffle:
            # the shuffled order stays in memory: nothing is added to the cache folder
            dataset = dataset.shuffle(seed=cfg.seed, keep_in_memory=True)
        if cfg.hf_repo_id:
            self._push(dataset)
        return dataset

    def _push(self, dataset: Any) -> None:
        """The dataset, then this config as cache_activations_runner_cfg.json, to the Hub."""
        from huggingface_hub import HfApi

        cfg = self.cfg
        dataset.push_to_hub(
            repo_id=cfg.hf_repo_id,
            num_shards=cfg.hf_num_shards,
            private=cfg.hf_is_private_repo,
            revision=cfg.hf_revision,
        )
        meta = json.dumps(asdict(cfg), indent=2, ensure_ascii=False).encode("utf-8")
        HfApi().upload_file(
            path_or_fileobj=io.BytesIO(meta),
            path_in_repo=CONFIG_FILENAME,
            repo_id=cfg.hf_repo_id,
            repo_type="dataset",
            revision=cfg.hf_revision,
            commit_message="Add cache_activations_runner metadata",
        )
