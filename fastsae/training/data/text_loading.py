"""Open one split of a text dataset: a Hugging Face id, a local file, or a saved folder.

- ``load_text_dataset(path)``: a Hugging Face dataset id, a local ``.txt``/``.json``/
  ``.jsonl``/``.parquet``/``.csv`` file, or a ``Dataset.save_to_disk`` folder.
- ``HfDataset``: the type alias (``Dataset | IterableDataset``) the stores accept.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

HfDataset = Dataset | IterableDataset

# file suffix -> the `datasets` builder that reads it
_FILE_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


def load_text_dataset(
    path: str | os.PathLike,
    streaming: bool = False,
    split: str = "train",
    trust_remote_code: bool = False,
) -> HfDataset:
    """Load one split of a dataset given by a path or a Hugging Face id.

    Args:
        path: a folder written by ``Dataset.save_to_disk`` (read with ``load_from_disk``;
            ``streaming`` is ignored), a local file whose suffix is one of ``.txt``
            (one document per line), ``.json``/``.jsonl``, ``.parquet``, ``.csv``, or a
            Hugging Face dataset id / local dataset folder for ``load_dataset``.
        streaming: return an ``IterableDataset`` that reads lazily.
        split: the split to take ("train" by default, as SAELens does).
        trust_remote_code: passed to ``load_dataset`` only when True (recent
            ``datasets`` releases no longer run loading scripts).
    """
    path_str = os.path.expanduser(os.fspath(path))
    local = Path(path_str)
    if local.is_dir() and (
        (local / "state.json").exists() or (local / "dataset_dict.json").exists()
    ):
        loaded = datasets.load_from_disk(path_str)
        return _take_split(loaded, split, path_str)
    kwargs: dict[str, Any] = {"split": split, "streaming": streaming}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if local.is_file():
        builder = _FILE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ValueError(
                f"cannot read dataset file {path_str!r}: unknown suffix {local.suffix!r}; "
                f"expected one of {sorted(_FILE_BUILDERS)}"
            )
        _check_file_has_rows(local)
        return _load_local(
            f"dataset file {path_str!r}", builder, data_files={split: path_str}, **kwargs
        )
    if local.is_dir():
        files = [p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")]
        if not files:
            raise ValueError(f"dataset folder {path_str!r} is empty: it holds no data files")
        if all(p.stat().st_size == 0 for p in files):
            raise ValueError(f"dataset folder {path_str!r} holds only empty (0-byte) files")
        return _load_local(f"dataset folder {path_str!r}", path_str, **kwargs)
    if local.suffix.lower() in _FILE_BUILDERS or local.is_absolute() or path_str.startswith("."):
        # a Hugging Face id is never absolute, relative to "." or named like a file
        raise FileNotFoundError(f"dataset path {path_str!r} does not exist")
    return datasets.load_dataset(path_str, **kwargs)


def _check_file_has_rows(path: Path) -> None:
    """An empty file is an error naming it (``datasets`` raises a bare
    ``DatasetGenerationError`` or ``StopIteration`` for one)."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"dataset file {str(path)!r} is empty (0 bytes)")
    if path.suffix.lower() == ".parquet":
        try:
            n_rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError kinds
            raise ValueError(f"dataset file {str(path)!r} is not valid parquet: {e}") from e
        if n_rows == 0:
            raise ValueError(f"dataset file {str(path)!r} has no rows")
    elif size <= _SMALL_FILE_BYTES and not path.read_bytes().strip():
        raise ValueError(f"dataset file {str(path)!r} is empty (only whitespace)")


# text files up to this size are read whole to tell an all-whitespace (empty) file
_SMALL_FILE_BYTES = 1 << 16


def _load_local(what: str, *args: Any, **kwargs: Any) -> HfDataset:
    """``datasets.load_dataset(*args, **kwargs)`` of a local file or folder, whose
    failures (a file ``datasets`` cannot parse, no rows) are errors that name it."""
    try:
        loaded = datasets.load_dataset(*args, **kwargs)
        empty = len(loaded) == 0 if isinstance(loaded, Dataset) else _no_first_row(loaded)
    except Exception as e:  # noqa: BLE001 - datasets/pyarrow/pandas raise many kinds
        raise ValueError(f"cannot read {what}: {_reasons(e)}") from e
    if empty:
        raise ValueError(f"{what} has no rows")
    return loaded


def _no_first_row(loaded: Any) -> bool:
    if not isinstance(loaded, IterableDataset):
        return False
    return next(iter(loaded), None) is None


# what a message-less exception of `datasets`' builders means
_BARE_REASONS = {StopIteration: "no rows could be read (StopIteration)"}


def _reasons(error: BaseException) -> str:
    """The messages of an exception and its causes (``datasets`` wraps the parser's
    error in a generic ``DatasetGenerationError``)."""
    parts: list[str] = []
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if not isinstance(e, datasets.exceptions.DatasetGenerationError):
            bare = _BARE_REASONS.get(type(e), type(e).__name__)
            parts.append(f"{type(e).__name__}: {e}" if str(e) else bare)
        e = e.__cause__ or e.__context__
    return "; ".join(parts) or type(error).__name__


def _take_split(loaded: Any, split: str, name: str) -> HfDataset:
    if isinstance(loaded, (DatasetDict, IterableDatasetDict)):
        if split not in loaded:
            raise ValueError(f"dataset {name!r} has no split {split!r}; splits: {list(loaded)}")
        return loaded[split]
    return loaded
