"""What an :class:`~fastsae.training.activations_store.ActivationsStore` checks before
anything is loaded or run: its arguments (each error names the argument), the dataset
(split, the column to read, text or token ids), the tokens to exclude, and one tiny
forward that the hook gives ``d_in`` features.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from torch import Tensor, nn

from fastsae.training.config_checks import check_buffer_holds_a_batch, check_seqpos_slice
from fastsae.training.text_loading import HfDataset, load_text_dataset

_TOKEN_COLUMNS = ("tokens", "input_ids", "text")
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
    buffer_tokens = check_buffer_holds_a_batch(
        n_batches_in_buffer, store_batch_size_prompts, n_pos, train_batch_size_tokens
    )
    return n_pos, buffer_tokens


class StoreChecksMixin:
    """The store's construction checks that need its dataset, tokenizer and model."""

    def _pick_column(self, column: str | None, tokenized: bool | None) -> tuple[str, bool, Any]:
        ds = self.dataset
        try:
            first = ds[0] if isinstance(ds, Dataset) else next(iter(ds))
        except (IndexError, StopIteration):
            raise ValueError("dataset is empty") from None
        columns = list(ds.column_names or first.keys())
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
        shape = tuple(out.shape)
        if out.ndim < 3:
            raise ValueError(
                f"hook {self.hook_name!r} gives shape {shape}; expected [batch, pos, d] or "
                "[batch, pos, n_heads, d_head]"
            )
        if self.hook_head_index is not None:
            if out.ndim != 4:
                raise ValueError(
                    f"hook_head_index={self.hook_head_index} needs a hook with a head "
                    f"dimension [batch, pos, n_heads, d_head]; {self.hook_name!r} gives {shape}"
                )
            if self.hook_head_index >= shape[2]:
                raise ValueError(
                    f"hook_head_index={self.hook_head_index} is out of range for "
                    f"{shape[2]} heads at {self.hook_name!r}"
                )
            width = shape[3]
        else:
            width = math.prod(shape[2:])
        if width != self.d_in:
            raise ValueError(
                f"d_in={self.d_in} does not match hook {self.hook_name!r}, whose activations "
                f"have width {width} (hook output shape {shape})"
            )
