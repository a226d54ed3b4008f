"""ActivationsStore: model activations over a text dataset, through a shuffling buffer.

Same names and behaviour as SAELens 6.x's ``ActivationsStore`` where one exists, for
TransformerLens models (hook by name, ``blocks.3.hook_resid_pre``) and for any Hugging
Face ``transformers`` model or ``nn.Module`` (hook by module path, ``encoder.layer.3``).

Pipeline: documents -> rows of ``context_size`` tokens (``TokenRowSource``) -> one model
forward per ``store_batch_size_prompts`` rows, stopped right after the hook ->
``[rows, n_pos, d_in]`` -> positions ``seqpos_slice`` -> flattened, special/padding
tokens dropped -> a buffer that is shuffled with a seeded ``torch.Generator`` -> batches
``[train_batch_size_tokens, d_in]``. ``state_dict()`` holds the buffer, the generator and
the dataset position, so a resumed store yields exactly the batches the original would.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from datasets import DatasetDict
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastsae.saes.config import str_to_dtype
from fastsae.training.activations_store_builders import StoreBuildersMixin
from fastsae.training.activations_store_checks import (
    StoreChecksMixin,
    check_store_arguments,
    resolve_dataset,
)
from fastsae.training.activations_store_state import StoreStateMixin
from fastsae.training.model_hooks import ModuleReader, TransformerLensReader
from fastsae.training.text_loading import HfDataset
from fastsae.training.token_rows import TokenRowSource, special_token_id

__all__ = ["ActivationsStore"]


class ActivationsStore(StoreBuildersMixin, StoreStateMixin, StoreChecksMixin):
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
        n_batches_in_buffer: the buffer holds ``n_batches_in_buffer *
            store_batch_size_prompts * n_pos`` activations; each refill replaces half.
        prepend_bos: every packed row starts with BOS (CLS for encoder tokenizers such
            as BERT/MiniLM, which have no BOS). Pre-tokenized rows of exactly
            ``context_size`` tokens are used as given.
        hook_head_index: head to take from a ``[batch, pos, n_heads, d_head]`` hook.
        is_dataset_tokenized: None detects it from the column.
        dataset_column: None takes the first of "tokens", "input_ids", "text".
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
    ):
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
        self.context_size = context_size
        self.training_context_size = n_pos
        self.train_batch_size_tokens = train_batch_size_tokens
        self.store_batch_size_prompts = store_batch_size_prompts
        self.n_batches_in_buffer = n_batches_in_buffer
        self.buffer_size_tokens = buffer_tokens
        self.prepend_bos = prepend_bos
        self.seqpos_slice = tuple(seqpos_slice)
        self.disable_concat_sequences = disable_concat_sequences
        self.sequence_separator_token = sequence_separator_token
        # the buffer-filling progress bar (the runner turns it off with its own bar)
        self.show_progress = True
        self.seed = seed
        self.model_kwargs = dict(model_kwargs or {})
        self.autocast_lm = autocast_lm

        # -- the model's hook (no forward yet) ------------------------------------------
        is_tl = hasattr(model, "hook_dict") and hasattr(model, "run_with_cache")
        self._reader = (TransformerLensReader if is_tl else ModuleReader)(model, hook_name)
        if self._reader.max_context is not None and context_size > self._reader.max_context:
            raise ValueError(
                f"context_size={context_size} is longer than the model's maximum "
                f"context of {self._reader.max_context} positions"
            )
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)

        # -- the dataset ----------------------------------------------------------------
        self.dataset = resolve_dataset(dataset, streaming, dataset_trust_remote_code)
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
        )
        self.row_mode = mode

        # -- tokens whose activations never reach a batch --------------------------------
        self.exclude_special_tokens = self._excluded_ids(exclude_special_tokens)
        self._pad_token_id = self._padding_id()

        # -- one tiny forward: does the hook give d_in? -----------------------------------
        self._check_width()

        self._generator = torch.Generator().manual_seed(seed)
        self._n_rows_seen = 0
        self._storage = torch.empty(0, d_in, dtype=self.dtype, device=self.device)
        self._ready = torch.empty(0, d_in, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------------------------
    # tokens and activations
    # ------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Passes over the dataset finished so far."""
        return self._rows.epoch

    @property
    def row_shard(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this store's data-parallel share: its rows come from
        documents ``i`` with ``i % world_size == rank`` (``(0, 1)``: all of them)."""
        return self._rows.doc_shard

    @property
    def n_dataset_processed(self) -> int:
        """Dataset rows (documents) read so far, over all epochs (this replica's, under
        data parallelism)."""
        return self._rows.n_dataset_processed

    def get_batch_tokens(
        self, batch_size: int | None = None, raise_at_epoch_end: bool = False
    ) -> Tensor:
        """The next ``batch_size`` (default ``store_batch_size_prompts``) rows of tokens.

        Returns an int64 ``[batch_size, context_size]`` tensor on the model's input
        device. At the end of the dataset the next epoch starts (with a warning); with
        ``raise_at_epoch_end`` a ``StopIteration`` is raised there and the rows already
        taken for this batch are dropped (as SAELens does).
        """
        n = batch_size or self.store_batch_size_prompts
        rows: list[Tensor] = []
        while len(rows) < n:
            row = self._rows.next_row()
            if row is None:
                warnings.warn(
                    "All samples in the training dataset have been exhausted, beginning new "
                    f"epoch ({self.epoch}).",
                    stacklevel=2,
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
        acts = acts[:, slice(*self.seqpos_slice)]
        if self.hook_head_index is not None:
            acts = acts[:, :, self.hook_head_index]
        elif acts.ndim > 3:
            acts = acts.reshape(*acts.shape[:2], -1)
        return acts.to(device=self.device, dtype=self.dtype)

    def filter_activations(self, batch_tokens: Tensor, activations: Tensor) -> Tensor:
        """Flatten ``[batch, n_pos, d_in]`` to ``[n_kept, d_in]``, dropping the positions
        whose token (after ``seqpos_slice``) is excluded or padding. Order is kept."""
        acts = activations.reshape(-1, self.d_in)
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
        tokens = self.get_batch_tokens(raise_at_epoch_end=raise_on_epoch_end)
        return self.filter_activations(tokens, self.get_activations(tokens))

    # ------------------------------------------------------------------------------------
    # the shuffling buffer
    # ------------------------------------------------------------------------------------
    def _refill(self) -> None:
        """Fill the buffer to ``buffer_size_tokens``, shuffle it, keep half for mixing
        and make the rest (a multiple of the batch size) ready to serve."""
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
            acts = self.get_filtered_llm_batch()
            pieces.append(acts)
            have += acts.shape[0]
            bar.update(min(acts.shape[0], max(need - bar.n, 0)))
        bar.close()
        buffer = torch.cat(pieces)
        perm = torch.randperm(buffer.shape[0], generator=self._generator)
        buffer = buffer[perm.to(buffer.device)]
        batch = self.train_batch_size_tokens
        n_serve = max(batch, (buffer.shape[0] - need // 2) // batch * batch)
        self._ready, self._storage = buffer[:n_serve], buffer[n_serve:]

    def next_batch(self) -> Tensor:
        """The next shuffled batch ``[train_batch_size_tokens, d_in]``."""
        if self._ready.shape[0] < self.train_batch_size_tokens:
            self._refill()
        batch = self._ready[: self.train_batch_size_tokens]
        self._ready = self._ready[self.train_batch_size_tokens :]
        return batch

    def __next__(self) -> Tensor:
        return self.next_batch()

    def __iter__(self) -> Iterator[Tensor]:
        return self
