"""Text for activation stores: load datasets, build an offline corpus, pack token rows.

This module gathers the names of three smaller ones (import from here or from them):

- :mod:`fastsae.training.text_loading`: ``load_text_dataset(path)`` (a Hugging Face
  dataset id, a local ``.txt``/``.json``/``.jsonl``/``.parquet``/``.csv`` file, or a
  ``Dataset.save_to_disk`` folder) and the ``HfDataset`` type alias.
- :mod:`fastsae.training.docstring_corpus`: ``local_text_dataset()``, English prose with
  no download, for demos and tests: the docstrings of installed packages, read from
  their source with ``ast``.
- :mod:`fastsae.training.token_rows`: ``TokenRowSource`` (documents -> rows of exactly
  ``context_size`` token ids, with a state (epoch, document index, offset in it) that
  resumes exactly) and ``special_token_id``.
"""

from __future__ import annotations

from fastsae.training.docstring_corpus import DEFAULT_DOC_PACKAGES, local_text_dataset
from fastsae.training.text_loading import HfDataset, load_text_dataset
from fastsae.training.token_rows import TokenRowSource, special_token_id

__all__ = [
    "DEFAULT_DOC_PACKAGES",
    "HfDataset",
    "TokenRowSource",
    "load_text_dataset",
    "local_text_dataset",
    "special_token_id",
]
