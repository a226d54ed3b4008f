"""ActivationsStore: model activations over a text dataset, through a shuffling buffer.

Same names and behaviour as SAELens 6.x's ``ActivationsStore`` where one exists, for
TransformerLens models (hook by name, ``blocks.3.hook_resid_pre``) and for any Hugging
Face ``transformers`` model or ``nn.Module`` (hook by module path, ``encoder.layer.3``).

Pipeline: documents (text, token ids, or conversations through the tokenizer's chat
template with ``use_chat_formatting``) -> rows of ``context_size`` tokens
(``TokenRowSource``) -> one model
forward per ``store_batch_size_prompts`` rows, stopped right after the hook ->
``[rows, n_pos, d_in]`` -> positions ``seqpos_slice`` -> flattened, special/padding
tokens dropped -> a buffer that is shuffled with a seeded ``torch.Generator`` -> batches
``[train_batch_size_tokens, d_in]``.

Construction checks everything before anything heavy runs: the arguments (each error
names the argument, :func:`check_store_arguments`), the dataset (split, the column to
read, text or token ids), the tokens to exclude, and one tiny forward that the hook
gives ``d_in`` features. ``ActivationsStore.from_sae`` and ``ActivationsStore.from_config``
build a store from an SAE's ``cfg.metadata`` or a runner config, as SAELens's do.

``state_dict()`` holds the buffer, the generator, the dataset position and the
data-parallel row share, so a resumed store yields exactly the batches the original
would (``save`` / ``load`` write and read it as safetensors); :func:`furthest_position`
continues a data-parallel run under another number of ranks.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastsae.loading.disk import read_tensors
from fastsae.saes.config import NORMALIZE_ACTIVATIONS, str_to_dtype
from fastsae.training.config import (
    buffer_size_tokens,
    check_mixing_fraction,
    check_seqpos_slice,
)
from fastsae.training.data.model_hooks import (
    MultiHookReader,
    hook_reader,
)
from fastsae.training.data.text_loading import HfDataset, load_text_dataset
from fastsae.training.data.token_rows import (
    TokenRowSource,
    as_conversation,
    chat_template_tokens,
    check_chat_template,
    special_token_id,
)

__all__ = [
    "ActivationsStore",
    "MultiHookBatches",
    "furthest_position",
    "multi_hook_concat_split_iter",
]

ACTIVATIONS_STORE_STATE_FILENAME = "activations_store_state.safetensors"  # as SAELens
_TOKEN_COLUMNS = ("tokens", "input_ids", "text")
# use_chat_formatting reads the first of these (SAELens's order); "text" values are
# each one user message
_CHAT_COLUMNS = ("conversation", "conversations", "messages", "text")
_SEPARATORS = ("bos", "eos", "sep")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def resolve_dataset(dataset: Any, streaming: bool, trust_remote_code: bool) -> HfDataset:
    if isinstance(dataset, (str, os.PathLike)):
        dataset = load_text_dataset(
            dataset, streaming=streaming, split="train", trust_remote_code=trust_remote_code
        )
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        if "train" not in dataset:
            raise ValueError(f"dataset has no 'train' split; its splits are {list(dataset)}")
        dataset = dataset["train"]
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(
            "dataset must be a datasets.Dataset, IterableDataset, DatasetDict or a path / "
            f"Hugging Face id, got {type(dataset).__name__}"
        )
    return dataset


def _column_kind(value: Any) -> str | None:
    """'text' for a str, 'tokens' for a 1-D sequence of ints, else None."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, Tensor):
        ok = value.ndim == 1 and not value.is_floating_point() and not value.is_complex()
        return "tokens" if ok else None
    if hasattr(value, "dtype") and hasattr(value, "ndim"):  # numpy
        return "tokens" if value.ndim == 1 and value.dtype.kind in "iu" else None
    if isinstance(value, (list, tuple)):
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        return "tokens" if ints else None
    return None


def check_store_arguments(
    model: Any,
    hook_name: Any,
    d_in: Any,
    context_size: Any,
    train_batch_size_tokens: Any,
    store_batch_size_prompts: Any,
    n_batches_in_buffer: Any,
    prepend_bos: Any,
    hook_head_index: Any,
    is_dataset_tokenized: Any,
    dataset_column: Any,
    seqpos_slice: Any,
    disable_concat_sequences: Any,
    sequence_separator_token: Any,
    seed: Any,
    model_kwargs: Any,
    autocast_lm: Any,
    streaming: Any,
) -> tuple[int, int]:
    """Raise a ``ValueError`` / ``TypeError`` naming the first bad argument; return
    ``(positions kept per row, buffer size in tokens)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if not isinstance(hook_name, str) or not hook_name:
        raise ValueError(f"hook_name must be a non-empty str, got {hook_name!r}")
    for name, value in (
        ("d_in", d_in),
        ("context_size", context_size),
        ("train_batch_size_tokens", train_batch_size_tokens),
        ("store_batch_size_prompts", store_batch_size_prompts),
        ("n_batches_in_buffer", n_batches_in_buffer),
    ):
        _check_positive_int(name, value)
    for name, value in (
        ("prepend_bos", prepend_bos),
        ("disable_concat_sequences", disable_concat_sequences),
        ("autocast_lm", autocast_lm),
        ("streaming", streaming),
    ):
        _check_bool(name, value)
    if hook_head_index is not None and (
        isinstance(hook_head_index, bool) or not isinstance(hook_head_index, int)
    ):
        raise ValueError(f"hook_head_index must be an int or None, got {hook_head_index!r}")
    if hook_head_index is not None and hook_head_index < 0:
        raise ValueError(f"hook_head_index must be >= 0, got {hook_head_index}")
    if is_dataset_tokenized is not None:
        _check_bool("is_dataset_tokenized", is_dataset_tokenized)
    if dataset_column is not None and not isinstance(dataset_column, str):
        raise ValueError(f"dataset_column must be a str or None, got {dataset_column!r}")
    if not (
        sequence_separator_token is None
        or sequence_separator_token in _SEPARATORS
        or (
            isinstance(sequence_separator_token, int)
            and not isinstance(sequence_separator_token, bool)
        )
    ):
        raise ValueError(
            f"sequence_separator_token must be 'bos', 'eos', 'sep', an int or None, "
            f"got {sequence_separator_token!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise ValueError(f"model_kwargs must be a dict or None, got {model_kwargs!r}")
    n_pos = check_seqpos_slice(seqpos_slice, context_size)
    buffer_tokens = buffer_size_tokens(n_batches_in_buffer, n_pos, train_batch_size_tokens)
    return n_pos, buffer_tokens


def _check_hook_output(hook_name: str, head_index: int | None, d_in: int, out: Tensor) -> None:
    """Raise naming the hook when its probe output ``out`` does not give ``d_in``
    features (after ``head_index``)."""
    shape = tuple(out.shape)
    if out.ndim < 3:
        raise ValueError(
            f"hook {hook_name!r} gives shape {shape}; expected [batch, pos, d] or "
            "[batch, pos, n_heads, d_head]"
        )
    if head_index is not None:
        if out.ndim != 4:
            raise ValueError(
                f"hook_head_index={head_index} needs a hook with a head "
                f"dimension [batch, pos, n_heads, d_head]; {hook_name!r} gives {shape}"
            )
        if head_index >= shape[2]:
            raise ValueError(
                f"hook_head_index={head_index} is out of range for "
                f"{shape[2]} heads at {hook_name!r}"
            )
        width = shape[3]
    else:
        width = math.prod(shape[2:])
    if width != d_in:
        raise ValueError(
            f"d_in={d_in} does not match hook {hook_name!r}, whose activations "
            f"have width {width} (hook output shape {shape})"
        )


def _select_head(acts: Tensor, head_index: int | None) -> Tensor:
    """``[batch, pos, ...]`` -> ``[batch, pos, d]``: one head, or all heads flattened."""
    if head_index is not None:
        return acts[:, :, head_index]
    if acts.ndim > 3:
        return acts.reshape(*acts.shape[:2], -1)
    return acts


def furthest_position(
    states: list[dict[str, Tensor]], row_shard: tuple[int, int]
) -> tuple[dict[str, Tensor], int]:
    """Continue a data-parallel run under another number of ranks: the store state of
    data-parallel rank ``row_shard = (rank, world_size)`` that starts at the furthest
    token-stream position any saved rank reached, with empty buffers.

    Returns ``(state, n_dropped)``: ``n_dropped`` activations were in the saved ranks'
    shuffling buffers and are not trained on (rows are not replayed, so no token is
    seen twice). ``states`` are the saved ranks' ``state_dict()`` s.
    """
    if not states:
        raise ValueError("furthest_position needs at least one saved store state")

    def position(st: dict[str, Tensor]) -> tuple[int, int, int]:
        return int(st["epoch"]), int(st["doc_index"]), int(st["doc_offset"])

    furthest = max(states, key=position)
    d_in = int(furthest["d_in"])
    dtype = furthest["storage"].dtype
    dropped = sum(int(st["storage"].shape[0]) + int(st["ready"].shape[0]) for st in states)
    state = {
        **furthest,
        "storage": torch.empty(0, d_in, dtype=dtype),
        "ready": torch.empty(0, d_in, dtype=dtype),
        "n_rows_seen": torch.tensor(0),
        "row_shard": torch.tensor(row_shard),
    }
    return state, dropped


class ActivationsStore:
    """Streams ``[train_batch_size_tokens, d_in]`` activation batches from a model.

    Args:
        model: a TransformerLens model (``hook_dict`` + ``run_with_cache``) or a Hugging
            Face ``PreTrainedModel`` / ``nn.Module`` (``hook_name`` is a module path).
        dataset: ``Dataset``, ``IterableDataset``, ``DatasetDict`` (split "train"), or a
            path / Hugging Face id for ``load_text_dataset``.
        hook_name: TransformerLens hook name or module path (``encoder.layer.3``; the
            model's ``base_model_prefix`` may be added or left out).
        d_in: width of the hook's activations (after ``hook_head_index``); checked by
            one tiny forward at construction.
        context_size: tokens per row fed to the model.
        train_batch_size_tokens: rows of each yielded batch.
        store_batch_size_prompts: rows (sequences) per model forward.
        n_batches_in_buffer: the buffer holds ``n_batches_in_buffer * n_pos``
            activations (``n_pos``: positions kept per row after ``seqpos_slice``), as in
            sae-lens 6, and at least one training batch; each refill replaces half.
        prepend_bos: every packed row starts with BOS (CLS for encoder tokenizers such
            as BERT/MiniLM, which have no BOS). Pre-tokenized rows of exactly
            ``context_size`` tokens are used as given.
        hook_head_index: head to take from a ``[batch, pos, n_heads, d_head]`` hook.
        is_dataset_tokenized: None detects it from the column.
        dataset_column: None takes the first of "tokens", "input_ids", "text" (with
            ``use_chat_formatting``: of "conversation", "conversations", "messages",
            "text").
        tokenizer: a Hugging Face tokenizer; defaults to ``model.tokenizer``. Needed for
            text, for BOS/separator tokens by name, and for ``exclude_special_tokens=True``.
        exclude_special_tokens: True drops BOS/EOS/PAD/CLS/SEP positions of the
            tokenizer; a list of ids drops those. Padding (a PAD id that is not also
            BOS/EOS/CLS/SEP) is always dropped and, for HF models, masked.
        seqpos_slice: ``slice(*seqpos_slice)`` of the positions kept.
        disable_concat_sequences: one row per document (shorter dropped, longer cut).
        sequence_separator_token: "bos"/"eos"/"sep"/an id/None between packed documents.
        device, dtype: where and in what dtype batches are returned.
        seed: seeds the buffer's shuffling generator.
        model_kwargs: extra keyword arguments for the model call.
        autocast_lm: run the model under bf16 autocast.
        streaming, dataset_trust_remote_code: used when ``dataset`` is a path/id.
        activations_mixing_fraction: share of the buffer kept to mix with the next
            activations at each refill (sae-lens 6's meaning); 0 serves them in order.
        total_training_tokens: the run's tokens; a dataset that cannot hold them
            (fewer rows than ``total_training_tokens / context_size``) warns that rows
            will be reused.
        normalize_activations: recorded for SAELens code that reads it; the trainer's
            ``ActivationScaler`` normalises, as in sae-lens 6.
        use_chat_formatting: tokenize each document with the tokenizer's chat template
            (``tokenizer.apply_chat_template``, as SAELens 6 does), then pack or truncate
            the ids into rows like text (``prepend_bos``, ``sequence_separator_token``
            and ``disable_concat_sequences`` as for text; the template's own special
            tokens are kept). The column is ``dataset_column`` or the first of
            "conversation", "conversations", "messages", "text"; a conversation is a
            list of ``{"role", "content"}`` messages and a string is one user message
            (a warning says so). The tokenizer must have a ``chat_template``; the rows
            are SAELens's store's rows and resume exactly like text rows.
        cached_activations_path: SAELens's argument; fastsae reads a cache with
            ``CachedActivationsStore`` (refused here with an error saying so).
        prefetch_llm_batches: False/0 runs the model when the buffer needs activations;
            True (1) or an int ``n`` runs it on a background thread that keeps up to
            ``n`` model batches ready (token rows -> filtered activations, in the order
            the synchronous store would make them), so the model's forward overlaps
            with the caller's work between batches. The yielded batches and
            ``state_dict()`` are exactly the synchronous store's; ``get_batch_tokens``,
            ``get_filtered_llm_batch``, ``load_state_dict``, ``reset_input_dataset`` and
            ``close()`` stop the thread first and drop the batches it made ahead (they
            are made again, identically, when needed). Nothing else may run the model
            while the thread does (TransformerLens hooks are the model's state): call
            ``close()`` (or ``get_batch_tokens``) before using the model elsewhere.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: HfDataset | DatasetDict | str | os.PathLike,
        *,
        hook_name: str,
        d_in: int,
        context_size: int = 128,
        train_batch_size_tokens: int = 4096,
        store_batch_size_prompts: int = 32,
        n_batches_in_buffer: int = 20,
        prepend_bos: bool = True,
        hook_head_index: int | None = None,
        is_dataset_tokenized: bool | None = None,
        dataset_column: str | None = None,
        tokenizer: Any = None,
        exclude_special_tokens: bool | list[int] | Tensor | None = False,
        seqpos_slice: tuple[int | None, ...] = (None,),
        disable_concat_sequences: bool = False,
        sequence_separator_token: int | str | None = "bos",
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        seed: int = 42,
        model_kwargs: dict[str, Any] | None = None,
        autocast_lm: bool = False,
        streaming: bool = True,
        dataset_trust_remote_code: bool = False,
        prefetch_llm_batches: bool | int = False,
        activations_mixing_fraction: float = 0.5,
        total_training_tokens: int | None = None,
        normalize_activations: str = "none",
        cached_activations_path: str | os.PathLike | None = None,
        use_chat_formatting: bool = False,
    ):
        check_mixing_fraction(activations_mixing_fraction)
        if cached_activations_path is not None:
            raise ValueError(
                f"cached_activations_path={str(cached_activations_path)!r}: fastsae reads "
                "activation caches with CachedActivationsStore (or the runner config's "
                "use_cached_activations=True), not with ActivationsStore"
            )
        _check_bool("use_chat_formatting", use_chat_formatting)
        if use_chat_formatting and is_dataset_tokenized:
            raise ValueError(
                "is_dataset_tokenized=True contradicts use_chat_formatting=True, which "
                "tokenizes conversations with the tokenizer's chat template"
            )
        if normalize_activations not in NORMALIZE_ACTIVATIONS:
            raise ValueError(
                f"normalize_activations must be one of {NORMALIZE_ACTIVATIONS}, "
                f"got {normalize_activations!r}"
            )
        if total_training_tokens is not None:
            _check_positive_int("total_training_tokens", total_training_tokens)
        if not isinstance(prefetch_llm_batches, (bool, int)) or prefetch_llm_batches < 0:
            raise ValueError(
                f"prefetch_llm_batches must be a bool or an int >= 0, got {prefetch_llm_batches!r}"
            )
        n_pos, buffer_tokens = check_store_arguments(
            model, hook_name, d_in, context_size, train_batch_size_tokens,
            store_batch_size_prompts, n_batches_in_buffer, prepend_bos, hook_head_index,
            is_dataset_tokenized, dataset_column, seqpos_slice, disable_concat_sequences,
            sequence_separator_token, seed, model_kwargs, autocast_lm, streaming,
        )  # fmt: skip
        try:
            self.dtype = str_to_dtype(dtype)
        except (ValueError, KeyError) as e:
            raise ValueError(f"dtype: {e}") from None
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: {e}") from None

        self.model = model
        self.hook_name = hook_name
        self.hook_head_index = hook_head_index
        self.d_in = d_in
        # the hooks captured (one, or several after from_config_multi_hook: then every
        # model batch holds all of them side by side, [n, sum of widths], so one shuffle
        # keeps their tokens aligned) and the buffer's width
        self.hook_names = [hook_name]
        self.hook_d_ins = {hook_name: d_in}
        self.hook_head_indices: dict[str, int | None] = {hook_name: hook_head_index}
        self._multi_reader: MultiHookReader | None = None
        self._width = d_in
        self.context_size = context_size
        self.training_context_size = n_pos
        self.train_batch_size_tokens = train_batch_size_tokens
        self.store_batch_size_prompts = store_batch_size_prompts
        self.n_batches_in_buffer = n_batches_in_buffer
        self.buffer_size_tokens = buffer_tokens
        self.activations_mixing_fraction = float(activations_mixing_fraction)
        # as in sae-lens 6, the trainer's ActivationScaler normalises; the store records it
        self.normalize_activations = normalize_activations
        self.total_training_tokens = total_training_tokens
        self.prepend_bos = prepend_bos
        self.seqpos_slice = tuple(seqpos_slice)
        self.disable_concat_sequences = disable_concat_sequences
        self.sequence_separator_token = sequence_separator_token
        # the buffer-filling progress bar (the runner turns it off with its own bar)
        self.show_progress = True
        self.seed = seed
        self.model_kwargs = dict(model_kwargs or {})
        self.autocast_lm = autocast_lm
        self.prefetch_llm_batches = int(prefetch_llm_batches)
        self._prefetcher: _LLMBatchPrefetcher | None = None

        # -- the model's hook (no forward yet) ------------------------------------------
        self._reader = hook_reader(model, hook_name)
        if self._reader.max_context is not None and context_size > self._reader.max_context:
            raise ValueError(
                f"context_size={context_size} is longer than the model's maximum "
                f"context of {self._reader.max_context} positions"
            )
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.use_chat_formatting = use_chat_formatting
        if use_chat_formatting:
            check_chat_template(self.tokenizer)

        # -- the dataset ----------------------------------------------------------------
        self.dataset = resolve_dataset(dataset, streaming, dataset_trust_remote_code)
        n_rows = len(self.dataset) if hasattr(self.dataset, "__len__") else None
        too_few = n_rows is not None and n_rows * n_pos < (total_training_tokens or 0)
        if too_few:
            warnings.warn(
                f"the dataset has {n_rows} rows, fewer than total_training_tokens="
                f"{total_training_tokens} needs at {n_pos} positions per row: training "
                "will take several epochs and reuse rows",
                UserWarning,
                stacklevel=2,
            )
        if use_chat_formatting:
            self.tokens_column, self.is_dataset_tokenized, first = self._pick_chat_column(
                dataset_column
            )
        else:
            self.tokens_column, self.is_dataset_tokenized, first = self._pick_column(
                dataset_column, is_dataset_tokenized
            )
        if not self.is_dataset_tokenized and self.tokenizer is None:
            raise ValueError(
                f"dataset column {self.tokens_column!r} holds text but the model has no "
                "tokenizer; pass tokenizer= or a pre-tokenized dataset"
            )
        if self.is_dataset_tokenized and len(first) == context_size:
            mode = "rows"
        elif disable_concat_sequences:
            mode = "truncate"
        else:
            mode = "pack"
        bos = special_token_id("bos", self.tokenizer) if prepend_bos else None
        if prepend_bos and mode != "rows" and bos is None:
            raise ValueError(
                "prepend_bos=True needs a tokenizer with a BOS (or CLS) token to start each "
                "row; pass tokenizer=, or prepend_bos=False"
            )
        separator = special_token_id(sequence_separator_token, self.tokenizer)
        if isinstance(sequence_separator_token, str) and self.tokenizer is None and mode == "pack":
            raise ValueError(
                f"sequence_separator_token={sequence_separator_token!r} needs a tokenizer; "
                "pass tokenizer=, an int id, or None"
            )
        if mode == "pack" and bos is not None and context_size < 2:
            raise ValueError("context_size must be >= 2 when prepend_bos packs rows")
        self._rows = TokenRowSource(
            self.dataset,
            self.tokens_column,
            mode=mode,
            context_size=context_size,
            is_tokenized=self.is_dataset_tokenized,
            tokenizer=self.tokenizer,
            bos_token_id=bos,
            separator_token_id=separator,
            chat=use_chat_formatting,
        )
        self.row_mode = mode

        # -- tokens whose activations never reach a batch --------------------------------
        self.exclude_special_tokens = self._excluded_ids(exclude_special_tokens)
        self._pad_token_id = self._padding_id()

        # -- one tiny forward: does the hook give d_in? -----------------------------------
        self._check_width()

        self._generator = torch.Generator().manual_seed(seed)
        self._n_rows_seen = 0
        self._storage = torch.empty(0, self._width, dtype=self.dtype, device=self.device)
        self._ready = torch.empty(0, self._width, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------------------------
    # building a store from an SAE or a runner config
    # ------------------------------------------------------------------------------------
    @classmethod
    def from_sae(
        cls,
        model: nn.Module,
        sae: Any,
        dataset: HfDataset | DatasetDict | str | None = None,
        *,
        context_size: int | None = None,
        streaming: bool = True,
        store_batch_size_prompts: int = 8,
        train_batch_size_tokens: int = 4096,
        n_batches_in_buffer: int = 8,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        **kwargs: Any,
    ) -> ActivationsStore:
        """A store that feeds ``sae`` (fastsae or SAELens): hook_name, hook_head_index,
        prepend_bos, context_size, seqpos_slice and dataset_path come from
        ``sae.cfg.metadata``, d_in and dtype from ``sae.cfg``. ``kwargs`` go to the
        constructor (tokenizer, exclude_special_tokens, seed, ...)."""
        metadata = getattr(sae.cfg, "metadata", None)

        def meta(name: str) -> Any:
            value = getattr(metadata, name, None) if metadata is not None else None
            return value if value is not None else getattr(sae.cfg, name, None)

        hook_name = meta("hook_name")
        if not hook_name:
            raise ValueError("sae.cfg.metadata.hook_name is not set; the store needs it")
        context_size = context_size if context_size is not None else meta("context_size")
        if context_size is None:
            raise ValueError("context_size is not in sae.cfg.metadata; pass context_size=")
        if dataset is None:
            dataset = meta("dataset_path")
            if not dataset:
                raise ValueError("sae.cfg.metadata.dataset_path is not set; pass dataset=")
        prepend_bos = meta("prepend_bos")
        kwargs.setdefault("prepend_bos", True if prepend_bos is None else bool(prepend_bos))
        kwargs.setdefault("seqpos_slice", tuple(meta("seqpos_slice") or (None,)))
        return cls(
            model,
            dataset,
            hook_name=hook_name,
            hook_head_index=meta("hook_head_index"),
            d_in=sae.cfg.d_in,
            context_size=context_size,
            streaming=streaming,
            store_batch_size_prompts=store_batch_size_prompts,
            train_batch_size_tokens=train_batch_size_tokens,
            n_batches_in_buffer=n_batches_in_buffer,
            device=device,
            dtype=dtype if dtype is not None else sae.cfg.dtype,
            **kwargs,
        )

    @classmethod
    def from_config(
        cls,
        model: nn.Module,
        cfg: Any,
        override_dataset: HfDataset | DatasetDict | str | None = None,
        *,
        tokenizer: Any = None,
    ) -> ActivationsStore:
        """A store built from a runner config's fields, read by name (SAELens defaults for
        missing ones). ``d_in`` is ``cfg.sae.d_in`` when the config nests an SAE config."""

        def get(name: str, default: Any = None) -> Any:
            value = getattr(cfg, name, default)
            return default if value is None else value

        dataset = override_dataset if override_dataset is not None else get("dataset_path", "")
        if isinstance(dataset, str) and not dataset:
            raise ValueError("the config has no dataset_path and no override_dataset was given")
        d_in = cfg.sae.d_in if getattr(cfg, "sae", None) is not None else get("d_in")
        device = get("act_store_device") or get("device", "cpu")
        if device == "with_model":
            device = get("llm_device") or get("device", "cpu")
        exclude = get("exclude_special_tokens", False)
        return cls(
            model,
            dataset,
            hook_name=get("hook_name"),
            hook_head_index=getattr(cfg, "hook_head_index", None),
            d_in=d_in,
            context_size=get("context_size", 128),
            train_batch_size_tokens=get("train_batch_size_tokens", 4096),
            store_batch_size_prompts=get("store_batch_size_prompts", 32),
            n_batches_in_buffer=get("n_batches_in_buffer", 20),
            prepend_bos=get("prepend_bos", True),
            # SAELens configs default is_dataset_tokenized=True and its store ignores the
            # field; the column decides here too.
            is_dataset_tokenized=None,
            exclude_special_tokens=list(exclude) if isinstance(exclude, tuple) else exclude,
            seqpos_slice=tuple(get("seqpos_slice", (None,))),
            disable_concat_sequences=get("disable_concat_sequences", False),
            sequence_separator_token=getattr(cfg, "sequence_separator_token", "bos"),
            device=device,
            dtype=get("dtype", "float32"),
            seed=get("seed", 42),
            model_kwargs=get("model_kwargs", None),
            autocast_lm=get("autocast_lm", False),
            streaming=get("streaming", True),
            dataset_trust_remote_code=bool(get("dataset_trust_remote_code", False)),
            tokenizer=tokenizer,
            prefetch_llm_batches=get("prefetch_llm_batches", False),
            activations_mixing_fraction=get("activations_mixing_fraction", 0.5),
            use_chat_formatting=bool(get("use_chat_formatting", False)),
        )

    @classmethod
    def from_config_multi_hook(
        cls,
        model: nn.Module,
        *,
        dataset: HfDataset | DatasetDict | str,
        hook_names: list[str],
        hook_d_ins: dict[str, int],
        hook_head_indices: dict[str, int | None] | None = None,
        streaming: bool = True,
        context_size: int = 128,
        n_batches_in_buffer: int = 20,
        total_training_tokens: int = 2_000_000,
        store_batch_size_prompts: int = 32,
        train_batch_size_tokens: int = 4096,
        prepend_bos: bool = True,
        normalize_activations: str = "none",
        device: torch.device | str = "cpu",
        dtype: str | torch.dtype = "float32",
        model_kwargs: dict[str, Any] | None = None,
        autocast_lm: bool = False,
        dataset_trust_remote_code: bool | None = None,
        seqpos_slice: tuple[int | None, ...] = (None,),
        exclude_special_tokens: bool | list[int] | Tensor | None = None,
        disable_concat_sequences: bool = False,
        sequence_separator_token: int | str | None = "bos",
        activations_mixing_fraction: float = 0.5,
        use_chat_formatting: bool = False,
        **kwargs: Any,
    ) -> ActivationsStore:
        """A store that captures every hook of ``hook_names`` from one model forward per
        batch of rows (SAELens 6's multi-SAE store).

        ``hook_d_ins`` gives each hook's width (after ``hook_head_indices``, a head per
        hook or None). The hooks' activations of a model batch go into the shuffling
        buffer side by side, so one permutation moves them alike: the batches of
        :meth:`next_multi_hook_batch` / :meth:`get_multi_hook_data_loader` are
        ``{hook_name: [train_batch_size_tokens, d_in]}`` whose rows are the same tokens
        at every hook; ``state_dict()`` resumes them exactly. The store does not
        normalise (``normalize_activations`` must be "none": each trainer scales its
        SAE's inputs) and reads no cached activations. ``kwargs`` go to the constructor (tokenizer, seed,
        prefetch_llm_batches, is_dataset_tokenized, dataset_column).
        """
        if isinstance(hook_names, str) or not isinstance(hook_names, (list, tuple)):
            raise ValueError(f"hook_names must be a list of hook names, got {hook_names!r}")
        if not hook_names:
            raise ValueError("hook_names must be non-empty")
        unique = list(dict.fromkeys(hook_names))
        if not isinstance(hook_d_ins, dict):
            raise ValueError(f"hook_d_ins must be a dict of hook name -> d_in, got {hook_d_ins!r}")
        missing = [h for h in unique if h not in hook_d_ins]
        if missing:
            raise ValueError(f"hook_d_ins has no d_in for the hooks {missing}")
        heads = dict(hook_head_indices or {})
        unknown = sorted(set(heads) - set(unique))
        if unknown:
            raise ValueError(f"hook_head_indices names hooks not in hook_names: {unknown}")
        _check_positive_int("total_training_tokens", total_training_tokens)
        if normalize_activations != "none":
            raise ValueError(
                f"normalize_activations={normalize_activations!r}: a multi-hook store does not "
                "normalise activations; each SAE's trainer scales its own inputs (use 'none')"
            )
        canonical = unique[0]
        store = cls(
            model,
            dataset,
            hook_name=canonical,
            d_in=hook_d_ins[canonical],
            hook_head_index=heads.get(canonical),
            context_size=context_size,
            train_batch_size_tokens=train_batch_size_tokens,
            store_batch_size_prompts=store_batch_size_prompts,
            n_batches_in_buffer=n_batches_in_buffer,
            prepend_bos=prepend_bos,
            exclude_special_tokens=exclude_special_tokens,
            seqpos_slice=seqpos_slice,
            disable_concat_sequences=disable_concat_sequences,
            sequence_separator_token=sequence_separator_token,
            device=device,
            dtype=dtype,
            model_kwargs=model_kwargs,
            autocast_lm=autocast_lm,
            streaming=streaming,
            dataset_trust_remote_code=bool(dataset_trust_remote_code),
            activations_mixing_fraction=activations_mixing_fraction,
            use_chat_formatting=use_chat_formatting,
            **kwargs,
        )
        store._capture_hooks(unique, {h: hook_d_ins[h] for h in unique}, heads)
        return store

    def _capture_hooks(
        self, hook_names: list[str], hook_d_ins: dict[str, int], heads: dict[str, int | None]
    ) -> None:
        """Switch a new store to capturing ``hook_names`` (checked by one tiny forward)."""
        for h in hook_names:
            _check_positive_int(f"hook_d_ins[{h!r}]", hook_d_ins[h])
            head = heads.get(h)
            if head is not None and (isinstance(head, bool) or not isinstance(head, int)):
                raise ValueError(f"hook_head_indices[{h!r}] must be an int or None, got {head!r}")
        reader = MultiHookReader(self.model, hook_names)
        probe = torch.zeros(1, 2, dtype=torch.long, device=reader.input_device)
        with torch.no_grad():
            outs = reader.read(probe, torch.ones_like(probe), self.model_kwargs)
        for h in hook_names:
            _check_hook_output(h, heads.get(h), hook_d_ins[h], outs[h])
        self._multi_reader = reader
        self.hook_names = list(hook_names)
        self.hook_d_ins = dict(hook_d_ins)
        self.hook_head_indices = {h: heads.get(h) for h in hook_names}
        self._width = sum(hook_d_ins.values())
        self._storage = torch.empty(0, self._width, dtype=self.dtype, device=self.device)
        self._ready = torch.empty(0, self._width, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------------------------
    # construction checks (dataset column, excluded tokens, hook width)
    # ------------------------------------------------------------------------------------
    def _first_example(self) -> tuple[Any, list[str]]:
        """The dataset's first row and its column names."""
        ds = self.dataset
        try:
            first = ds[0] if isinstance(ds, Dataset) else next(iter(ds))
        except (IndexError, StopIteration):
            raise ValueError("dataset is empty") from None
        return first, list(ds.column_names or first.keys())

    def _pick_chat_column(self, column: str | None) -> tuple[str, bool, Any]:
        """The column of conversations (or strings) for ``use_chat_formatting``; its
        first value is put through the chat template once, so a template that cannot
        format the data fails here, before any model forward."""
        first, columns = self._first_example()
        if column is None:
            column = next((c for c in _CHAT_COLUMNS if c in columns), None)
            if column is None:
                raise ValueError(
                    f"use_chat_formatting=True needs one of the columns {list(_CHAT_COLUMNS)}; "
                    f"the dataset's columns are {columns}; name the one to read with "
                    "dataset_column="
                )
        elif column not in columns:
            raise ValueError(f"dataset_column {column!r} is not in the dataset's columns {columns}")
        value = first[column]
        conversation = as_conversation(value, f"dataset column {column!r}: row 0")
        if isinstance(value, str):
            warnings.warn(
                f"use_chat_formatting=True reads column {column!r}, which holds strings, not "
                "conversations: each string is formatted as a single user message",
                UserWarning,
                stacklevel=3,
            )
        try:
            chat_template_tokens(conversation, self.tokenizer)
        except Exception as e:
            raise ValueError(
                f"the tokenizer's chat template failed on row 0 of dataset column "
                f"{column!r}: {type(e).__name__}: {e}"
            ) from e
        return column, False, value

    def _pick_column(self, column: str | None, tokenized: bool | None) -> tuple[str, bool, Any]:
        first, columns = self._first_example()
        if column is None:
            column = next((c for c in _TOKEN_COLUMNS if c in columns), None)
            if column is None:
                raise ValueError(
                    f"dataset has none of the columns {list(_TOKEN_COLUMNS)}; its columns are "
                    f"{columns}; name the one to read with dataset_column="
                )
        elif column not in columns:
            raise ValueError(f"dataset_column {column!r} is not in the dataset's columns {columns}")
        value = first[column]
        kind = _column_kind(value)
        if kind is None:
            raise ValueError(
                f"dataset column {column!r} holds {type(value).__name__} values, neither text "
                f"(str) nor token ids (list of int); the dataset's columns are {columns}"
            )
        if tokenized is not None and tokenized != (kind == "tokens"):
            raise ValueError(
                f"is_dataset_tokenized={tokenized} but column {column!r} holds "
                f"{'token ids' if kind == 'tokens' else 'text'}"
            )
        return column, kind == "tokens", value

    def _special_ids(self) -> set[int]:
        tok = self.tokenizer
        attrs = ("bos_token_id", "eos_token_id", "pad_token_id", "cls_token_id", "sep_token_id")
        return {int(i) for a in attrs if (i := getattr(tok, a, None)) is not None}

    def _excluded_ids(self, exclude: Any) -> Tensor | None:
        if exclude is None or exclude is False:
            return None
        if exclude is True:
            if self.tokenizer is None:
                raise ValueError("exclude_special_tokens=True needs a tokenizer; pass tokenizer=")
            ids = sorted(self._special_ids())
        elif isinstance(exclude, Tensor):
            ids = [int(i) for i in exclude.reshape(-1).tolist()]
        elif isinstance(exclude, (list, tuple, set)) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in exclude
        ):
            ids = sorted(exclude)
        else:
            raise ValueError(
                f"exclude_special_tokens must be a bool or a list of token ids, got {exclude!r}"
            )
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _padding_id(self) -> int | None:
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None)
        real = {getattr(tok, a, None) for a in ("bos_token_id", "eos_token_id", "cls_token_id")}
        real.add(getattr(tok, "sep_token_id", None))
        # GPT-2 style tokenizers reuse EOS as PAD: then it is a real token, not padding
        return None if pad is None or pad in real else int(pad)

    def _check_width(self) -> None:
        probe = torch.zeros(1, 2, dtype=torch.long, device=self._reader.input_device)
        with torch.no_grad():
            out = self._reader.read(probe, torch.ones_like(probe), self.model_kwargs)
        _check_hook_output(self.hook_name, self.hook_head_index, self.d_in, out)

    # ------------------------------------------------------------------------------------
    # tokens and activations
    # ------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Passes over the dataset finished so far."""
        return int(self._position()[0]["epoch"])

    @property
    def row_shard(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this store's data-parallel share: its rows come from
        documents ``i`` with ``i % world_size == rank`` (``(0, 1)``: all of them)."""
        return self._rows.doc_shard

    @property
    def n_dataset_processed(self) -> int:
        """Dataset rows (documents) read so far, over all epochs (this replica's, under
        data parallelism)."""
        return int(self._position()[0]["n_dataset_processed"])

    def get_batch_tokens(
        self, batch_size: int | None = None, raise_at_epoch_end: bool = False
    ) -> Tensor:
        """The next ``batch_size`` (default ``store_batch_size_prompts``) rows of tokens.

        Returns an int64 ``[batch_size, context_size]`` tensor on the model's input
        device. At the end of the dataset the next epoch starts (with a warning); with
        ``raise_at_epoch_end`` a ``StopIteration`` is raised there and the rows already
        taken for this batch are dropped (as SAELens does).
        """
        self._stop_prefetch()
        return self._take_rows(batch_size, raise_at_epoch_end)

    def _take_rows(self, batch_size: int | None, raise_at_epoch_end: bool) -> Tensor:
        n = batch_size or self.store_batch_size_prompts
        rows: list[Tensor] = []
        while len(rows) < n:
            row = self._rows.next_row()
            if row is None:
                warnings.warn(
                    "All samples in the training dataset have been exhausted, beginning new "
                    f"epoch ({self._rows.epoch}).",
                    stacklevel=3,
                )
                if raise_at_epoch_end:
                    raise StopIteration(
                        f"Ran out of tokens in dataset after {self.n_dataset_processed} "
                        "samples, beginning the next epoch."
                    )
                continue
            self._n_rows_seen += 1
            rows.append(row)
        return torch.stack(rows).to(self._reader.input_device)

    def shard_for_data_parallel(self, rank: int, world_size: int) -> None:
        """Make this store rank ``rank``'s share of a data-parallel run of ``world_size``:
        it reads documents ``rank, rank + world_size, ...`` of the dataset only (they
        alone are tokenized, packed into rows and run through the model) and yields
        ``train_batch_size_tokens / world_size`` rows per batch, so the ranks' batches
        together are one global batch of disjoint tokens. Call it before the first
        batch."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if self.train_batch_size_tokens % world_size:
            raise ValueError(
                f"train_batch_size_tokens={self.train_batch_size_tokens} does not split over "
                f"{world_size} data-parallel ranks"
            )
        self._stop_prefetch()
        if self._n_rows_seen or self._ready.shape[0] or self._storage.shape[0]:
            raise RuntimeError("shard_for_data_parallel must be called before the first batch")
        self._rows.doc_shard = (rank, world_size)
        self.train_batch_size_tokens //= world_size

    def _attention_mask(self, tokens: Tensor) -> Tensor | None:
        if self._pad_token_id is None:
            return None
        mask = tokens != self._pad_token_id
        return None if bool(mask.all()) else mask.long()

    @torch.no_grad()
    def get_activations(self, batch_tokens: Tensor) -> Tensor:
        """Hook activations for ``batch_tokens`` ``[batch, context_size]``.

        Returns ``[batch, n_pos, d_in]`` in the store's dtype on its device, where
        ``n_pos`` is the number of positions in ``seqpos_slice``; a head hook
        ``[.., n_heads, d_head]`` gives head ``hook_head_index`` or all heads flattened.
        Padding positions are included here (they are dropped when batches are built).
        """
        tokens = batch_tokens.to(self._reader.input_device)
        with torch.autocast(
            device_type=tokens.device.type, dtype=torch.bfloat16, enabled=self.autocast_lm
        ):
            acts = self._reader.read(tokens, self._attention_mask(tokens), self.model_kwargs)
        acts = _select_head(acts[:, slice(*self.seqpos_slice)], self.hook_head_index)
        return acts.to(device=self.device, dtype=self.dtype)

    def filter_activations(self, batch_tokens: Tensor, activations: Tensor) -> Tensor:
        """Flatten ``[batch, n_pos, d_in]`` to ``[n_kept, d_in]``, dropping the positions
        whose token (after ``seqpos_slice``) is excluded or padding. Order is kept."""
        acts = activations.reshape(-1, activations.shape[-1] if self._multi_reader else self.d_in)
        ids = batch_tokens[:, slice(*self.seqpos_slice)].reshape(-1).to(self.device)
        keep = None
        if self.exclude_special_tokens is not None and self.exclude_special_tokens.numel():
            keep = ~torch.isin(ids, self.exclude_special_tokens)
        if self._pad_token_id is not None:
            not_pad = ids != self._pad_token_id
            keep = not_pad if keep is None else keep & not_pad
        return acts if keep is None else acts[keep]

    def get_filtered_llm_batch(self, raise_on_epoch_end: bool = False) -> Tensor:
        """Activations of the next ``store_batch_size_prompts`` rows, flattened and
        filtered: ``[n_kept, d_in]`` in dataset order (no shuffling)."""
        self._stop_prefetch()
        return self._make_llm_batch(raise_on_epoch_end)

    def _make_llm_batch(self, raise_on_epoch_end: bool = False) -> Tensor:
        tokens = self._take_rows(None, raise_on_epoch_end)
        if self._multi_reader is not None:
            acts = self.get_multi_hook_activations(tokens)
            # side by side, so the buffer's one shuffle moves every hook's rows alike
            packed = torch.cat([acts[h] for h in self.hook_names], dim=-1)
            return self.filter_activations(tokens, packed)
        return self.filter_activations(tokens, self.get_activations(tokens))

    # ------------------------------------------------------------------------------------
    # background prefetching of model batches (prefetch_llm_batches)
    # ------------------------------------------------------------------------------------
    def _position(self) -> tuple[dict[str, Tensor], int]:
        """Token-stream position and rows seen after the last model batch the buffer
        took: with a prefetch thread running, not the thread's (further) position."""
        if self._prefetcher is not None:
            return self._prefetcher.position
        return self._rows.state_dict(), self._n_rows_seen

    def _next_llm_batch(self) -> Tensor:
        """The next model batch for the buffer, from the prefetch thread when on."""
        if not self.prefetch_llm_batches:
            return self._make_llm_batch()
        if self._prefetcher is None:
            self._prefetcher = _LLMBatchPrefetcher(
                self._produce_llm_batch,
                (self._rows.state_dict(), self._n_rows_seen),
                self.prefetch_llm_batches,
            )
        try:
            return self._prefetcher.get()
        except BaseException:
            self._stop_prefetch()
            raise

    def _produce_llm_batch(self) -> tuple[Tensor, tuple[dict[str, Tensor], int]]:
        """Runs on the prefetch thread: a model batch and the position after it."""
        acts = self._make_llm_batch()
        return acts, (self._rows.state_dict(), self._n_rows_seen)

    def _stop_prefetch(self) -> None:
        """Stop the prefetch thread (waiting for a forward in progress) and move the
        token stream back to the last batch taken: batches made ahead are dropped."""
        prefetcher, self._prefetcher = self._prefetcher, None
        if prefetcher is None:
            return
        prefetcher.close()
        rows_state, n_rows_seen = prefetcher.position
        self._rows.load_state_dict(rows_state)
        self._n_rows_seen = n_rows_seen

    def close(self) -> None:
        """Stop the prefetch thread, if any (a later batch starts it again)."""
        self._stop_prefetch()

    # ------------------------------------------------------------------------------------
    # the shuffling buffer
    # ------------------------------------------------------------------------------------
    def _refill(self) -> None:
        """Fill the buffer to ``buffer_size_tokens``, shuffle it (unless
        ``activations_mixing_fraction`` is 0), keep that fraction of the buffer for
        mixing with the next activations and make the rest (a multiple of the batch
        size) ready to serve."""
        pieces = [self._storage, self._ready]
        have = sum(p.shape[0] for p in pieces)
        need = self.buffer_size_tokens
        bar = tqdm(
            total=need,
            initial=min(have, need),
            desc="Filling activation buffer",
            unit="tok",
            leave=False,
            disable=not self.show_progress
            or (need - have) < 8 * self.store_batch_size_prompts * self.training_context_size,
        )
        while have < need:
            acts = self._next_llm_batch()
            pieces.append(acts)
            have += acts.shape[0]
            bar.update(min(acts.shape[0], max(need - bar.n, 0)))
        bar.close()
        buffer = torch.cat(pieces)
        if self.activations_mixing_fraction > 0:
            perm = torch.randperm(buffer.shape[0], generator=self._generator)
            buffer = buffer[perm.to(buffer.device)]
        batch = self.train_batch_size_tokens
        keep = int(need * self.activations_mixing_fraction)
        n_serve = max(batch, (buffer.shape[0] - keep) // batch * batch)
        self._ready, self._storage = buffer[:n_serve], buffer[n_serve:]

    def next_batch(self) -> Tensor:
        """The next shuffled batch ``[train_batch_size_tokens, d_in]``."""
        if len(self.hook_names) > 1:
            raise RuntimeError(
                f"this store captures {len(self.hook_names)} hooks ({self.hook_names}): "
                "take batches with next_multi_hook_batch() or get_multi_hook_data_loader()"
            )
        return self._next_packed_batch()

    def _next_packed_batch(self) -> Tensor:
        if self._ready.shape[0] < self.train_batch_size_tokens:
            self._refill()
        batch = self._ready[: self.train_batch_size_tokens]
        self._ready = self._ready[self.train_batch_size_tokens :]
        return batch

    def __next__(self) -> Tensor:
        return self.next_batch()

    def __iter__(self) -> Iterator[Tensor]:
        return self

    # ------------------------------------------------------------------------------------
    # several hooks from one forward (from_config_multi_hook)
    # ------------------------------------------------------------------------------------
    def _require_multi_hook(self, what: str) -> MultiHookReader:
        if self._multi_reader is None:
            raise RuntimeError(
                f"{what} needs a multi-hook store: build it with "
                "ActivationsStore.from_config_multi_hook"
            )
        return self._multi_reader

    @torch.no_grad()
    def get_multi_hook_activations(self, batch_tokens: Tensor) -> dict[str, Tensor]:
        """Every captured hook's activations for ``batch_tokens`` ``[batch,
        context_size]`` from one model forward: ``{hook_name: [batch, n_pos, d_in]}``
        (positions ``seqpos_slice``, each hook's head or flattened heads), in the
        store's dtype on its device."""
        reader = self._require_multi_hook("get_multi_hook_activations")
        tokens = batch_tokens.to(reader.input_device)
        with torch.autocast(
            device_type=tokens.device.type, dtype=torch.bfloat16, enabled=self.autocast_lm
        ):
            outs = reader.read(tokens, self._attention_mask(tokens), self.model_kwargs)
        return {
            h: _select_head(outs[h][:, slice(*self.seqpos_slice)], self.hook_head_indices[h]).to(
                device=self.device, dtype=self.dtype
            )
            for h in self.hook_names
        }

    def split_hooks(self, packed: Tensor) -> dict[str, Tensor]:
        """``[n, sum of widths]`` -> ``{hook_name: [n, d_in]}`` (views)."""
        widths = [self.hook_d_ins[h] for h in self.hook_names]
        return dict(zip(self.hook_names, packed.split(widths, dim=-1), strict=True))

    def next_multi_hook_batch(self) -> dict[str, Tensor]:
        """The next shuffled batch of every hook: ``{hook_name: [train_batch_size_tokens,
        d_in]}``, row ``i`` the same token at every hook."""
        self._require_multi_hook("next_multi_hook_batch")
        return self.split_hooks(self._next_packed_batch())

    def get_multi_hook_data_loader(self) -> MultiHookBatches:
        """An endless iterator of :meth:`next_multi_hook_batch` batches (SAELens 6's),
        with this store's ``state_dict`` / ``load_state_dict`` for exact resume."""
        self._require_multi_hook("get_multi_hook_data_loader")
        return MultiHookBatches(self)

    # ------------------------------------------------------------------------------------
    # exact resume: state_dict, save / load
    # ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to continue exactly: buffer contents, the shuffling
        generator's state and the dataset position. All values are tensors, so the dict
        can be saved with safetensors (``save``). With prefetching on, the position is
        that of the last model batch the buffer took (batches made ahead are not in it)."""
        rows_state, n_rows_seen = self._position()
        return {
            "storage": self._storage.contiguous().clone(),
            "ready": self._ready.contiguous().clone(),
            "generator_state": self._generator.get_state(),
            "d_in": torch.tensor(self._width),
            **(
                {"hook_d_ins": torch.tensor([self.hook_d_ins[h] for h in self.hook_names])}
                if self._multi_reader is not None
                else {}
            ),
            "context_size": torch.tensor(self.context_size),
            "n_rows_seen": torch.tensor(n_rows_seen),
            "row_shard": torch.tensor(self.row_shard),
            **rows_state,
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Continue from ``state_dict()``: no model forward and no tokenization of the
        documents before the saved position."""
        self._stop_prefetch()
        required = (
            "storage", "ready", "generator_state", "d_in", "context_size", "epoch",
            "doc_index", "doc_offset", "n_dataset_processed",
        )  # fmt: skip
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"activations store state is missing {missing}")
        for key, mine in (("d_in", self._width), ("context_size", self.context_size)):
            if int(state[key]) != mine:
                raise ValueError(f"state has {key}={int(state[key])}, this store has {mine}")
        if self._multi_reader is not None:
            widths = [self.hook_d_ins[h] for h in self.hook_names]
            saved = state.get("hook_d_ins")
            if saved is None or [int(v) for v in saved] != widths:
                raise ValueError(
                    f"state was not written by a multi-hook store with hook widths {widths} "
                    f"(hooks {self.hook_names}); it has "
                    f"{None if saved is None else [int(v) for v in saved]}"
                )
        self._storage = state["storage"].to(device=self.device, dtype=self.dtype)
        self._ready = state["ready"].to(device=self.device, dtype=self.dtype)
        saved_shard = tuple(int(v) for v in state.get("row_shard", torch.tensor([0, 1])))
        if saved_shard != self.row_shard:
            raise ValueError(
                f"state is data-parallel rank {saved_shard[0]} of {saved_shard[1]}'s data, "
                f"this store is rank {self.row_shard[0]} of {self.row_shard[1]} (see "
                "furthest_position to continue under another world size)"
            )
        self._generator.set_state(state["generator_state"].cpu())
        self._rows.load_state_dict(state)
        self._n_rows_seen = int(state.get("n_rows_seen", 0))

    def save(self, file_path: str | os.PathLike) -> None:
        """Write ``state_dict()`` to a safetensors file."""
        save_file(self.state_dict(), os.fspath(file_path))

    def load(self, file_path: str | os.PathLike) -> None:
        """Read a file written by ``save`` and ``load_state_dict`` it (a missing,
        truncated or corrupt file, or a state that does not fit, raises naming it)."""
        path = Path(file_path)
        try:
            self.load_state_dict(read_tensors(path, "activations store state"))
        except ValueError as e:
            if str(path) in str(e):
                raise
            raise ValueError(f"{path}: {e}") from e

    def save_to_checkpoint(self, checkpoint_path: str | os.PathLike) -> None:
        self.save(Path(checkpoint_path) / ACTIVATIONS_STORE_STATE_FILENAME)

    def load_from_checkpoint(self, checkpoint_path: str | os.PathLike) -> None:
        self.load(Path(checkpoint_path) / ACTIVATIONS_STORE_STATE_FILENAME)

    def reset_input_dataset(self) -> None:
        """Restart the token stream at the dataset's first document (same epoch count)."""
        self._stop_prefetch()
        self._rows.load_state_dict({**self._rows.state_dict(), "doc_index": 0, "doc_offset": 0})


class MultiHookBatches:
    """The batches of a multi-hook store as an iterator of ``{hook_name: [batch,
    d_in]}`` dicts; ``state_dict`` / ``load_state_dict`` are the store's."""

    def __init__(self, store: ActivationsStore):
        self.store = store

    def __iter__(self) -> MultiHookBatches:
        return self

    def __next__(self) -> dict[str, Tensor]:
        return self.store.next_multi_hook_batch()

    def state_dict(self) -> dict[str, Tensor]:
        return self.store.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.store.load_state_dict(state)


@torch.no_grad()
def multi_hook_concat_split_iter(
    buffer_size: int,
    batch_size: int,
    activations_loader: Iterator[dict[str, Tensor]] | Any,
    hook_names: list[str],
    mix_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Shuffle a stream of multi-hook activations keeping the hooks' tokens aligned.

    ``activations_loader`` yields ``{hook_name: [n_tokens, d_in_h]}`` (widths may differ
    between hooks). Each item's hooks are put side by side (``[n_tokens, sum d_in_h]``)
    and fed to a mixing buffer of ``buffer_size`` rows: once full it is shuffled by one
    permutation (``generator``, or torch's global one), ``int(buffer_size *
    mix_fraction)`` rows are kept for mixing and the rest is served as batches of
    ``batch_size`` rows (at least one), split back into ``{hook_name: [batch_size,
    d_in_h]}``. ``mix_fraction=0`` serves the rows in order. When the stream ends, the
    rows left are served in whole batches.
    """
    if buffer_size < batch_size:
        raise ValueError(
            f"buffer_size={buffer_size} must be >= batch_size={batch_size} (one batch)"
        )
    if not 0 <= mix_fraction <= 1:
        raise ValueError(f"mix_fraction must be in [0, 1], got {mix_fraction!r}")
    hook_names = list(hook_names)
    if not hook_names:
        raise ValueError("hook_names must be non-empty")
    widths: list[int] | None = None
    storage: Tensor | None = None

    def split(rows: Tensor) -> dict[str, Tensor]:
        assert widths is not None
        return dict(zip(hook_names, rows.split(widths, dim=-1), strict=True))

    for item in activations_loader:
        missing = [h for h in hook_names if h not in item]
        if missing:
            raise ValueError(
                f"the activations loader yielded no activations for hooks {missing}; "
                f"it yielded {list(item)}"
            )
        if widths is None:
            widths = [int(item[h].shape[-1]) for h in hook_names]
        lengths = {h: int(item[h].shape[0]) for h in hook_names}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"the hooks' activations have different numbers of tokens: {lengths}")
        packed = torch.cat([item[h] for h in hook_names], dim=-1)
        storage = packed if storage is None else torch.cat([storage, packed])
        if storage.shape[0] < buffer_size:
            continue
        if mix_fraction > 0:
            perm = torch.randperm(storage.shape[0], generator=generator)
            storage = storage[perm.to(storage.device)]
        n_batches = max(1, (storage.shape[0] - int(buffer_size * mix_fraction)) // batch_size)
        serve, storage = storage[: n_batches * batch_size], storage[n_batches * batch_size :]
        for i in range(n_batches):
            yield split(serve[i * batch_size : (i + 1) * batch_size])
    if storage is not None:
        for i in range(storage.shape[0] // batch_size):
            yield split(storage[i * batch_size : (i + 1) * batch_size])


_DONE = object()


class _LLMBatchPrefetcher:
    """A daemon thread that calls ``produce()`` (-> ``(item, position after it)``) and
    keeps up to ``depth`` results in a bounded queue. ``get()`` returns the items in
    order and records the position after the last one taken (``position``); an
    exception in ``produce`` is raised by the ``get()`` that would have returned its
    item. ``close()`` stops the thread, waiting for a ``produce()`` in progress."""

    def __init__(self, produce: Any, position: tuple[dict[str, Tensor], int], depth: int):
        self.position = position
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(produce,), name="fastsae-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, produce: Any) -> None:
        try:
            while not self._stop.is_set():
                if not self._put(produce()):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._error = e
            self._put(_DONE)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> Tensor:
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    item = _DONE
                    break
        if item is _DONE:
            error = self._error
            raise error if error is not None else RuntimeError("the prefetch thread stopped")
        acts, self.position = item
        return acts

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()
