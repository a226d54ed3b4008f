"""Tokenize a text dataset once into rows of exactly ``context_size`` token ids: SAELens's
``PretokenizeRunner`` (``from sae_lens import PretokenizeRunner, PretokenizeRunnerConfig``).

(The module is not named ``pretokenize_runner``, SAELens's module name: ``fastsae``
exports the function ``pretokenize_runner``, which a submodule of that name would shadow
once imported.)

``PretokenizeRunner(cfg).run()`` loads one split with ``datasets.load_dataset``, tokenizes
the ``column_name`` column (the tokenizer's own special tokens included, as
``tokenizer.encode`` adds them; or a chat template with ``use_chat_formatting``), packs the
documents into rows (:func:`pack_token_sequences`), optionally shuffles the rows, and

* with ``save_path``: writes the dataset (one ``input_ids`` column) with
  ``Dataset.save_to_disk`` plus ``sae_lens.json`` (:class:`PretokenizedDatasetMetadata`),
  the folder swapped in as a whole (:mod:`fastsae.loading.atomic_dir`);
* with ``hf_repo_id``: pushes the dataset and ``sae_lens.json`` to the Hugging Face Hub
  through ``datasets`` / ``huggingface_hub`` (a clear error in offline mode).

The rows are SAELens's row for row: the same packing rules, the same ``datasets.map``
batches (a row never spans two batches of ``pretokenize_batch_size`` documents; the
unfilled tail of a batch is dropped) and the same shuffle. The saved folder is what
SAELens's ``ActivationsStore`` and fastsae's
:class:`~fastsae.training.data.activations_store.ActivationsStore` read as a
pre-tokenized dataset.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from typing_extensions import deprecated

from fastsae import __version__
from fastsae.loading.atomic_dir import check_replaceable, commit_dir, new_temp_dir
from fastsae.saes.config import SAE_LENS_FORMAT_VERSION
from fastsae.training.data.token_rows import (
    as_conversation,
    chat_template_tokens,
    check_chat_template,
)

__all__ = [
    "METADATA_FILENAME",
    "PretokenizeRunner",
    "PretokenizeRunnerConfig",
    "PretokenizedDatasetMetadata",
    "metadata_from_config",
    "pack_token_sequences",
    "pretokenize_dataset",
    "pretokenize_runner",
    "push_to_hugging_face_hub",
    "special_token_from_cfg",
]

METADATA_FILENAME = "sae_lens.json"
SpecialToken = int | Literal["bos", "eos", "sep"] | None
_SPECIAL_NAMES = ("bos", "eos", "sep")


def _check_special_token(name: str, value: Any) -> None:
    if value is None or value in _SPECIAL_NAMES:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{name} must be 'bos', 'eos', 'sep', a token id (int >= 0) or None, got {value!r}"
        )


@dataclass
class PretokenizeRunnerConfig:
    """What to tokenize, how to pack it and where the rows go (SAELens's fields, defaults
    and order).

    Args:
        tokenizer_name: a Hugging Face tokenizer id or a local tokenizer folder.
        dataset_path, dataset_name, split, data_files, data_dir: ``datasets.load_dataset``'s
            ``path``, ``name``, ``split``, ``data_files``, ``data_dir``.
        dataset_trust_remote_code: passed to ``load_dataset`` only when True.
        num_proc: worker processes of ``datasets.map`` (1: in this process).
        context_size: tokens per row.
        column_name: the column holding the text (or conversations).
        use_chat_formatting: tokenize each value with the tokenizer's chat template
            (a plain string becomes one user message, with a warning).
        shuffle, seed: shuffle the rows (``Dataset.shuffle(seed=seed)``).
        streaming: load and map lazily (``num_proc`` must then be 1).
        pretokenize_batch_size: documents per ``datasets.map`` batch; rows never span
            two batches (None: the whole dataset is one batch).
        begin_batch_token: token at the start of every row ("bos"/"eos"/"sep" of the
            tokenizer, an id, or None).
        begin_sequence_token: token at the start of every document.
        sequence_separator_token: token between two documents packed in one row.
        disable_concat_sequences: one row per document (shorter ones dropped, longer
            ones cut) instead of packing.
        save_path: folder to write the dataset to (``Dataset.save_to_disk`` + sae_lens.json).
        hf_repo_id, hf_num_shards, hf_revision, hf_is_private_repo: push to this Hub
            dataset repository.
    """

    tokenizer_name: str = "gpt2"
    dataset_path: str = ""
    dataset_name: str | None = None
    dataset_trust_remote_code: bool | None = None
    split: str | None = "train"
    data_files: list[str] | None = None
    data_dir: str | None = None
    num_proc: int = 4
    context_size: int = 128
    column_name: str = "text"
    use_chat_formatting: bool = False
    shuffle: bool = True
    seed: int | None = None
    streaming: bool = False
    pretokenize_batch_size: int | None = 1000

    # special tokens
    begin_batch_token: int | Literal["bos", "eos", "sep"] | None = "bos"
    begin_sequence_token: int | Literal["bos", "eos", "sep"] | None = None
    sequence_separator_token: int | Literal["bos", "eos", "sep"] | None = "bos"

    # sequence processing
    disable_concat_sequences: bool = False

    # if saving locally, set save_path
    save_path: str | None = None

    # if saving to huggingface, set hf_repo_id
    hf_repo_id: str | None = None
    hf_num_shards: int = 64
    hf_revision: str = "main"
    hf_is_private_repo: bool = False

    def __post_init__(self) -> None:
        for name in ("context_size", "num_proc", "hf_num_shards"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        size = self.pretokenize_batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ValueError(f"pretokenize_batch_size must be a positive int or None, got {size!r}")
        for name in ("begin_batch_token", "begin_sequence_token", "sequence_separator_token"):
            _check_special_token(name, getattr(self, name))
        if self.context_size == 1 and self.begin_batch_token is not None:
            raise ValueError(
                "context_size=1 with a begin_batch_token leaves no room for any text token "
                "in a row; use context_size >= 2 or begin_batch_token=None"
            )
        if not isinstance(self.column_name, str) or not self.column_name:
            raise ValueError(f"column_name must be a non-empty str, got {self.column_name!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")


@dataclass
class PretokenizedDatasetMetadata:
    """The ``sae_lens.json`` written beside a pre-tokenized dataset (SAELens's keys;
    ``fastsae_version`` added last). SAELens reads ``tokenizer_name`` from it to check
    that a Hub dataset was tokenized with the model's tokenizer."""

    sae_lens_version: str
    tokenizer_name: str
    original_dataset: str
    original_dataset_name: str | None
    original_split: str | None
    original_data_files: list[str] | None
    original_column_name: str | None
    context_size: int
    shuffled: bool
    seed: int | None
    begin_batch_token: int | Literal["bos", "eos", "sep"] | None
    begin_sequence_token: int | Literal["bos", "eos", "sep"] | None
    sequence_separator_token: int | Literal["bos", "eos", "sep"] | None
    disable_concat_sequences: bool
    use_chat_formatting: bool = False
    fastsae_version: str = __version__


def metadata_from_config(cfg: PretokenizeRunnerConfig) -> PretokenizedDatasetMetadata:
    """The metadata of a dataset pre-tokenized by ``cfg``."""
    return PretokenizedDatasetMetadata(
        sae_lens_version=SAE_LENS_FORMAT_VERSION,
        tokenizer_name=cfg.tokenizer_name,
        original_dataset=cfg.dataset_path,
        original_dataset_name=cfg.dataset_name,
        original_split=cfg.split,
        original_data_files=cfg.data_files,
        original_column_name=cfg.column_name,
        context_size=cfg.context_size,
        shuffled=cfg.shuffle,
        seed=cfg.seed,
        begin_batch_token=cfg.begin_batch_token,
        begin_sequence_token=cfg.begin_sequence_token,
        sequence_separator_token=cfg.sequence_separator_token,
        disable_concat_sequences=cfg.disable_concat_sequences,
        use_chat_formatting=cfg.use_chat_formatting,
    )


def _metadata_json(cfg: PretokenizeRunnerConfig) -> str:
    return json.dumps(asdict(metadata_from_config(cfg)), indent=2, ensure_ascii=False)


def special_token_from_cfg(token: SpecialToken, tokenizer: Any) -> int | None:
    """The id a config's special-token setting names: an int as given, "bos"/"eos"/"sep"
    the tokenizer's (None when the tokenizer has none: no fallback, as in SAELens, so an
    encoder tokenizer's "bos" is None), None as None."""
    if token is None:
        return None
    if isinstance(token, int) and not isinstance(token, bool):
        return token
    attr = {"bos": "bos_token_id", "eos": "eos_token_id", "sep": "sep_token_id"}.get(token)  # type: ignore[arg-type]
    if attr is None:
        raise ValueError(f"unknown special token {token!r}; expected 'bos', 'eos', 'sep' or an int")
    return getattr(tokenizer, attr, None)


# ------------------------------------------------------------------------------ packing
def _pack_truncated(
    sequences: Iterable[torch.Tensor], context_size: int, start_token: int | None
) -> Iterator[torch.Tensor]:
    """One row per document: ``start_token`` put first (when the document does not
    already start with it) for documents of at least ``context_size - 1`` tokens, then
    documents still shorter than ``context_size`` dropped and longer ones cut."""
    for seq in sequences:
        n = seq.shape[0]
        if n == 0:
            continue
        if start_token is not None and n >= context_size - 1 and int(seq[0]) != start_token:
            seq = torch.cat([seq.new_tensor([start_token]), seq[: context_size - 1]])
        if seq.shape[0] >= context_size:
            yield seq[:context_size]


@torch.no_grad()
def pack_token_sequences(
    sequences: Iterable[torch.Tensor],
    context_size: int,
    begin_batch_token_id: int | None = None,
    begin_sequence_token_id: int | None = None,
    sequence_separator_token_id: int | None = None,
    disable_concat_sequences: bool = False,
) -> Iterator[torch.Tensor]:
    """Pack 1-D token tensors into rows of exactly ``context_size`` tokens (SAELens's
    ``concat_and_batch_sequences`` rules).

    Each document is taken in pieces. Before a piece, prefix tokens are decided from the
    token the piece would otherwise start with: ``begin_sequence_token_id`` at a
    document's start (unless the document starts with it); then, in a fresh row,
    ``begin_batch_token_id``, or, continuing a row, ``sequence_separator_token_id``
    (each left out when the token after it is already that token). Prefix tokens that
    do not fit in the row are dropped, except that a begin-sequence token that did not
    fit is owed again at the start of the next row. The unfilled last row is dropped.

    ``disable_concat_sequences``: one row per document (see :func:`_pack_truncated`),
    started by ``begin_sequence_token_id`` or, when that is None, ``begin_batch_token_id``.
    """
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size <= 0:
        raise ValueError(f"context_size must be a positive int, got {context_size!r}")
    if disable_concat_sequences:
        start = begin_sequence_token_id
        if start is None:
            start = begin_batch_token_id
        yield from _pack_truncated(sequences, context_size, start)
        return
    if context_size == 1 and begin_batch_token_id is not None:
        raise ValueError("context_size=1 with a begin_batch_token leaves no room for text")
    pieces: list[torch.Tensor] = []  # the row being filled
    filled = 0
    for doc in sequences:
        if doc.ndim != 1:
            raise ValueError(f"token sequences must be 1-D, got shape {tuple(doc.shape)}")
        pos, n = 0, doc.shape[0]
        owes_start = True  # the begin-sequence token is still owed to this document
        while pos < n:
            head = int(doc[pos])
            prefix: list[int] = []
            start_added = False
            if (
                owes_start
                and begin_sequence_token_id is not None
                and head != begin_sequence_token_id
            ):
                prefix.append(begin_sequence_token_id)
                start_added = True
                head = begin_sequence_token_id
            lead = begin_batch_token_id if filled == 0 else sequence_separator_token_id
            if lead is not None and head != lead:
                prefix.insert(0, lead)
            room = context_size - filled
            kept = prefix[:room]
            take = max(room - len(prefix), 0)
            if kept:
                pieces.append(doc.new_tensor(kept))
            if take:
                pieces.append(doc[pos : pos + take])
            filled += len(kept) + min(take, n - pos)
            pos += take
            owes_start = start_added and len(prefix) > room
            if filled == context_size:
                yield torch.cat(pieces)
                pieces, filled = [], 0


# --------------------------------------------------------------------------- tokenizing
def _tokenize_values(values: list[Any], tokenizer: Any, cfg: PretokenizeRunnerConfig) -> list:
    """The token ids of each value of a batch of the text column (1-D int64 tensors)."""
    if cfg.use_chat_formatting:
        out = []
        for i, value in enumerate(values):
            if isinstance(value, str):
                warnings.warn(
                    f"use_chat_formatting is True but column {cfg.column_name!r} holds "
                    "strings; each becomes a single user message",
                    stacklevel=2,
                )
            where = f"column {cfg.column_name!r}: value {i} of a batch"
            out.append(chat_template_tokens(as_conversation(value, where), tokenizer))
        return out
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(
                f"column {cfg.column_name!r} holds {type(value).__name__} values (value {i} "
                "of a batch), not text; set column_name to a text column, or "
                "use_chat_formatting=True for conversations"
            )
    # the tokenizer's own special tokens are kept, as tokenizer.encode adds them
    ids = tokenizer(values, add_special_tokens=True, verbose=False)["input_ids"]
    return [torch.tensor(seq, dtype=torch.long) for seq in ids]


def _column_names(dataset: Any) -> list[str]:
    names = dataset.column_names
    if names is None:  # a streamed dataset whose features are unknown until read
        first = next(iter(dataset), None)
        names = [] if first is None else list(first)
    return list(names)


def pretokenize_dataset(dataset: Any, tokenizer: Any, cfg: PretokenizeRunnerConfig) -> Any:
    """``dataset`` (a ``Dataset`` or, with ``cfg.streaming``, an ``IterableDataset``) as
    rows of ``cfg.context_size`` token ids in one ``input_ids`` column (torch format),
    shuffled when ``cfg.shuffle``."""
    columns = _column_names(dataset)
    if cfg.column_name not in columns:
        raise ValueError(
            f"column_name={cfg.column_name!r} is not a column of the dataset; its columns "
            f"are {columns}"
        )
    if cfg.use_chat_formatting:
        check_chat_template(tokenizer)
    bos = special_token_from_cfg(cfg.begin_batch_token, tokenizer)
    start = special_token_from_cfg(cfg.begin_sequence_token, tokenizer)
    sep = special_token_from_cfg(cfg.sequence_separator_token, tokenizer)

    def to_rows(batch: dict[str, list[Any]]) -> dict[str, list[torch.Tensor]]:
        docs = _tokenize_values(batch[cfg.column_name], tokenizer, cfg)
        rows = pack_token_sequences(
            docs, cfg.context_size, bos, start, sep, cfg.disable_concat_sequences
        )
        return {"input_ids": list(rows)}

    map_kwargs: dict[str, Any] = {
        "batched": True,
        "batch_size": cfg.pretokenize_batch_size,
        "remove_columns": columns,
    }
    if cfg.streaming:
        if cfg.num_proc > 1:
            raise ValueError("num_proc must be 1 when streaming is True")
        rows_ds = dataset.map(to_rows, **map_kwargs)
    else:
        # datasets starts worker processes for any num_proc given, 1 included
        rows_ds = dataset.map(
            to_rows, num_proc=cfg.num_proc if cfg.num_proc > 1 else None, **map_kwargs
        )
    if cfg.shuffle:
        rows_ds = rows_ds.shuffle(seed=cfg.seed)
    if cfg.streaming:
        return rows_ds.with_format(type="torch")
    rows_ds.set_format(type="torch", columns=["input_ids"])
    return rows_ds


# ------------------------------------------------------------------------------- output
def _check_hub_reachable(what: str) -> None:
    import huggingface_hub

    if huggingface_hub.is_offline_mode():
        raise RuntimeError(
            f"{what}: cannot push to the Hugging Face Hub in offline mode (HF_HUB_OFFLINE "
            "is set); unset it, or set hf_repo_id=None and use save_path"
        )


def push_to_hugging_face_hub(dataset: Any, cfg: PretokenizeRunnerConfig) -> None:
    """Push ``dataset`` to the Hub dataset repository ``cfg.hf_repo_id`` (``hf_num_shards``
    shards, ``hf_is_private_repo``, at ``hf_revision``), then its ``sae_lens.json``."""
    if not cfg.hf_repo_id:
        raise ValueError("hf_repo_id is not set: no Hub repository to push to")
    _check_hub_reachable(f"hf_repo_id={cfg.hf_repo_id!r}")
    from huggingface_hub import HfApi

    dataset.push_to_hub(
        repo_id=cfg.hf_repo_id,
        num_shards=cfg.hf_num_shards,
        private=cfg.hf_is_private_repo,
        revision=cfg.hf_revision,
    )
    HfApi().upload_file(
        path_or_fileobj=io.BytesIO(_metadata_json(cfg).encode("utf-8")),
        path_in_repo=METADATA_FILENAME,
        repo_id=cfg.hf_repo_id,
        repo_type="dataset",
        revision=cfg.hf_revision,
        commit_message="Add sae_lens metadata",
    )


def _save(dataset: Any, cfg: PretokenizeRunnerConfig) -> None:
    """``dataset.save_to_disk`` + sae_lens.json into a fresh folder swapped in as
    ``cfg.save_path`` (a folder already there is replaced as a whole)."""
    assert cfg.save_path is not None
    tmp = new_temp_dir(cfg.save_path)
    try:
        dataset.save_to_disk(str(tmp))
        (tmp / METADATA_FILENAME).write_text(_metadata_json(cfg), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, cfg.save_path)


def _load_split(cfg: PretokenizeRunnerConfig) -> Any:
    from datasets import DatasetDict, IterableDatasetDict, load_dataset

    kwargs: dict[str, Any] = {
        "name": cfg.dataset_name,
        "data_dir": cfg.data_dir,
        "data_files": cfg.data_files,
        "split": cfg.split,
        "streaming": cfg.streaming,
    }
    if cfg.dataset_trust_remote_code:
        kwargs["trust_remote_code"] = True
    dataset = load_dataset(cfg.dataset_path, **kwargs)
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        raise ValueError(
            f"dataset {cfg.dataset_path!r} loads as splits {list(dataset)} (split=None); "
            "name the one to tokenize with split="
        )
    return dataset


@deprecated("Use PretokenizeRunner instead")
def pretokenize_runner(cfg: PretokenizeRunnerConfig) -> Any:
    """``PretokenizeRunner(cfg).run()`` (SAELens's deprecated function form)."""
    return PretokenizeRunner(cfg).run()


class PretokenizeRunner:
    """Tokenize a dataset into rows of ``cfg.context_size`` tokens and save it to
    ``cfg.save_path`` and/or push it to ``cfg.hf_repo_id`` (see the module docstring)."""

    def __init__(self, cfg: PretokenizeRunnerConfig):
        if not isinstance(cfg, PretokenizeRunnerConfig):
            raise TypeError(f"cfg must be a PretokenizeRunnerConfig, got {type(cfg).__name__}")
        self.cfg = cfg

    def run(self) -> Any:
        """Load, tokenize, pack, shuffle; save and/or push. Returns the row dataset."""
        from transformers import AutoTokenizer

        cfg = self.cfg
        if not cfg.dataset_path:
            raise ValueError("dataset_path is empty: name a dataset (a Hub id or a local path)")
        if cfg.save_path is not None:
            if cfg.streaming:
                raise ValueError(
                    "save_path needs streaming=False: a streamed dataset cannot be saved "
                    "with save_to_disk"
                )
            target = Path(cfg.save_path)
            check_replaceable(target)  # before the tokenizing, not after
        if cfg.hf_repo_id is not None:
            _check_hub_reachable(f"hf_repo_id={cfg.hf_repo_id!r}")
        dataset = _load_split(cfg)
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name)
        tokenizer.model_max_length = sys.maxsize  # documents are cut into rows here
        rows = pretokenize_dataset(dataset, tokenizer, cfg)
        if cfg.save_path is not None:
            _save(rows, cfg)
        if cfg.hf_repo_id is not None:
            push_to_hugging_face_hub(rows, cfg)
        return rows
