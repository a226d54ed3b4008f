"""Open one split of a text dataset: a Hugging Face id, a local file, or a saved folder.

- ``load_text_dataset(path)``: a Hugging Face dataset id, a local ``.txt``/``.json``/
  ``.jsonl``/``.parquet``/``.csv`` file, or a ``Dataset.save_to_disk`` folder.
- ``HfDataset``: the type alias (``Dataset | IterableDataset``) the stores accept.

Re-exported by :mod:`fastsae.training.text_data`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets
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
    path_str = os.fspath(path)
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
        return datasets.load_dataset(builder, data_files={split: path_str}, **kwargs)
    if local.suffix.lower() in _FILE_BUILDERS and not local.exists():
        raise FileNotFoundError(f"dataset file {path_str!r} does not exist")
    return datasets.load_dataset(path_str, **kwargs)


def _take_split(loaded: Any, split: str, name: str) -> HfDataset:
    if isinstance(loaded, (DatasetDict, IterableDatasetDict)):
        if split not in loaded:
            raise ValueError(f"dataset {name!r} has no split {split!r}; splits: {list(loaded)}")
        return loaded[split]
    return loaded
