"""Text for activation stores: load datasets, build an offline corpus, pack token rows.

- ``load_text_dataset(path)``: a Hugging Face dataset id, a local ``.txt``/``.json``/
  ``.jsonl``/``.parquet``/``.csv`` file, or a ``Dataset.save_to_disk`` folder.
- ``local_text_dataset()``: English prose with no download, for demos and tests: the
  docstrings of installed packages, read from their source with ``ast``.
- ``TokenRowSource``: documents -> rows of exactly ``context_size`` token ids, with a
  state (epoch, document index, offset in it) that resumes exactly.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import random
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
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


# ----------------------------------------------------------------------------------------
# An offline corpus: package docstrings
# ----------------------------------------------------------------------------------------

DEFAULT_DOC_PACKAGES = ("stdlib", "numpy", "torch", "datasets")
# Folders never read: test suites (their docstrings are fixtures, not prose), GUI demos.
_SKIP_DIRS = frozenset(
    {"test", "tests", "testing", "site-packages", "__pycache__", "idlelib", "tkinter",
     "turtledemo", "lib2to3", "ensurepip", "_vendor", "vendored"}
)  # fmt: skip
_SKIP_FILES = frozenset({"antigravity.py", "this.py"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _package_files(name: str) -> list[Path]:
    """Sorted ``.py`` files of an installed package (``"stdlib"``: the standard library)."""
    if name == "stdlib":
        roots = [Path(sysconfig.get_paths()["stdlib"])]
    else:
        spec = importlib.util.find_spec(name)  # a top-level name: nothing is imported
        if spec is None:
            raise ValueError(f"packages: {name!r} is not installed")
        if spec.submodule_search_locations:
            roots = [Path(p) for p in spec.submodule_search_locations]
        elif spec.origin and spec.origin.endswith(".py"):
            return [Path(spec.origin)]
        else:
            raise ValueError(f"packages: {name!r} has no Python source to read")
    files: list[Path] = []
    for root in roots:
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
            files.extend(
                Path(folder, f) for f in sorted(names) if f.endswith(".py") and f not in _SKIP_FILES
            )
    return files


def _file_docstrings(path: Path, min_chars: int) -> list[tuple[str, str]]:
    """(qualified name, cleaned docstring) for the module, classes and functions of a file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning on odd escapes in old sources
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    out = []
    # Docstrings live only in module/class/function bodies, possibly under if/try/with:
    # walking statements (not every expression node) is several times faster.
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= min_chars:
                out.append((getattr(node, "name", "<module>"), doc))
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                stack.extend(reversed(children))
    return out


def local_text_dataset(
    n_docs: int | None = None,
    min_chars: int = 200,
    seed: int = 0,
    packages: Sequence[str] | None = None,
) -> Dataset:
    """A text dataset that needs no network: docstrings of installed packages.

    The ``.py`` files of each package (``"stdlib"`` names the standard library) are
    parsed with ``ast``; nothing is imported, so no module's side effects run. Test
    suites are skipped. Every module/class/function docstring of at least ``min_chars``
    characters is one document; repeats (copied docstrings) are kept once. Files are
    visited in an order shuffled by ``seed``, so the result is deterministic for a given
    (packages, seed, min_chars) and ``n_docs=k`` gives the first k documents of
    ``n_docs=None``. The default packages (stdlib, numpy, torch, datasets) give about
    10k documents, ~8M characters, ~2.2M all-MiniLM-L6-v2 tokens, in 15-20 s on one
    core (parsing is the cost; ``n_docs`` stops early).

    Returns:
        a ``datasets.Dataset`` with columns ``text`` (the docstring) and ``source``
        (``"<package>/<file>:<name>"``).
    """
    if n_docs is not None and (isinstance(n_docs, bool) or n_docs <= 0):
        raise ValueError(f"n_docs must be a positive int or None, got {n_docs!r}")
    if min_chars < 1:
        raise ValueError(f"min_chars must be >= 1, got {min_chars!r}")
    names = list(DEFAULT_DOC_PACKAGES if packages is None else packages)
    if isinstance(packages, str) or not names:
        raise ValueError(f"packages must be a non-empty list of package names, got {packages!r}")
    files: list[tuple[str, Path, Path]] = []
    for name in names:
        pkg_files = _package_files(name)
        base = pkg_files[0].parent if pkg_files else Path()
        files.extend((name, base, f) for f in pkg_files)
    random.Random(seed).shuffle(files)
    texts: list[str] = []
    sources: list[str] = []
    seen: set[str] = set()
    for name, base, path in files:
        for qualname, doc in _file_docstrings(path, min_chars):
            if doc in seen:
                continue
            seen.add(doc)
            texts.append(doc)
            sources.append(f"{name}/{_relative(path, base)}:{qualname}")
            if n_docs is not None and len(texts) >= n_docs:
                return Dataset.from_dict({"text": texts, "source": sources})
    if not texts:
        raise ValueError(f"no docstrings of >= {min_chars} characters found in {names}")
    return Dataset.from_dict({"text": texts, "source": sources})


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.name


# ----------------------------------------------------------------------------------------
# Documents -> rows of context_size tokens
# ----------------------------------------------------------------------------------------


def special_token_id(which: int | str | None, tokenizer: Any) -> int | None:
    """Resolve ``"bos"``/``"eos"``/``"sep"``/an int/None to a token id.

    Encoder tokenizers (BERT, MiniLM) have no BOS/EOS: ``"bos"`` falls back to CLS and
    ``"eos"`` to SEP; ``"sep"`` falls back to EOS for decoder tokenizers.
    """
    if which is None or (isinstance(which, int) and not isinstance(which, bool)):
        return which
    order = {
        "bos": ("bos_token_id", "cls_token_id"),
        "eos": ("eos_token_id", "sep_token_id"),
        "sep": ("sep_token_id", "eos_token_id"),
    }
    if which not in order:
        raise ValueError(
            f"unknown special token {which!r}; expected 'bos', 'eos', 'sep', an int or None"
        )
    if tokenizer is None:
        return None
    for attr in order[which]:
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None:
            return int(token_id)
    return None


class TokenRowSource:
    """Rows of exactly ``context_size`` token ids from one column of a dataset.

    Modes:
      - ``"rows"``: a pre-tokenized dataset whose rows have ``context_size`` tokens; each
        row is used as given (special tokens are assumed to be there already, as in
        SAELens). A row of another length raises.
      - ``"pack"``: documents (text, tokenized here without special tokens, or token
        lists of any length) are concatenated with ``separator_token_id`` between them
        and cut into rows; every row starts with ``bos_token_id`` when it is not None
        (the token is not doubled when a document already starts with it).
      - ``"truncate"`` (``disable_concat_sequences``): one row per document,
        ``bos_token_id`` first when set; documents shorter than ``context_size`` are
        dropped, longer ones truncated.

    ``next_row()`` returns None once at the end of every pass over the dataset, after
    which the next pass starts (``epoch`` counts finished passes). The state after each
    returned row is (epoch, doc_index, doc_offset): resuming re-reads the document at
    ``doc_index`` and continues at token ``doc_offset``; no earlier document is tokenized.
    """

    def __init__(
        self,
        dataset: HfDataset,
        column: str,
        *,
        mode: str,
        context_size: int,
        is_tokenized: bool,
        tokenizer: Any = None,
        bos_token_id: int | None = None,
        separator_token_id: int | None = None,
        read_chunk: int = 64,
    ):
        if mode not in ("rows", "pack", "truncate"):
            raise ValueError(f"mode must be 'rows', 'pack' or 'truncate', got {mode!r}")
        if not is_tokenized and tokenizer is None:
            raise ValueError(f"column {column!r} holds text but no tokenizer was given")
        self.dataset = dataset
        self.column = column
        self.mode = mode
        self.context_size = context_size
        self.is_tokenized = is_tokenized
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.separator_token_id = separator_token_id
        self.read_chunk = read_chunk
        self.epoch = 0
        self.doc_index = 0  # the document the next row starts in (this epoch)
        self.doc_offset = 0  # the token of that document the next row starts at
        self.n_dataset_processed = 0  # documents read, over all epochs
        self._rows: Iterator[torch.Tensor] | None = None

    # -- reading documents ---------------------------------------------------------------
    def _raw_chunks(self, start: int) -> Iterator[list[Any]]:
        """Lists of raw column values, from document ``start`` on."""
        ds = self.dataset
        if isinstance(ds, Dataset):
            ds = ds.select_columns([self.column])
            ds = ds.with_format("torch" if self.is_tokenized else None)
            for i in range(start, len(ds), self.read_chunk):
                values = ds[i : i + self.read_chunk][self.column]
                yield list(values)
            return
        if start:
            ds = ds.skip(start)
        chunk: list[Any] = []
        for example in ds:
            chunk.append(example[self.column])
            if len(chunk) == self.read_chunk:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _documents(self, start: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(document index, 1-D int64 token ids) from document ``start`` on."""
        index = start
        for chunk in self._raw_chunks(start):
            if self.is_tokenized:
                docs = [torch.as_tensor(v, dtype=torch.long).reshape(-1) for v in chunk]
            else:
                for v in chunk:
                    if not isinstance(v, str):
                        raise ValueError(
                            f"column {self.column!r}: document {index} is "
                            f"{type(v).__name__}, not text"
                        )
                ids = self.tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
                docs = [torch.tensor(d, dtype=torch.long) for d in ids]
            for doc in docs:
                yield index, doc
                index += 1

    # -- packing -------------------------------------------------------------------------
    def _generate(self) -> Iterator[torch.Tensor]:
        ctx, bos, sep = self.context_size, self.bos_token_id, self.separator_token_id
        resume_index, resume_offset = self.doc_index, self.doc_offset
        row: list[torch.Tensor] = []  # pieces of the row being packed
        # n_dataset_processed counts finished documents; a document is finished once the
        # row that uses its last token is taken, so a resumed count stays exact.
        for index, doc in self._documents(resume_index):
            if self.mode == "rows":
                if doc.numel() != ctx:
                    raise ValueError(
                        f"column {self.column!r}: row {index} has {doc.numel()} tokens; "
                        f"the first row had context_size={ctx}, so every row must"
                    )
                self.doc_index, self.doc_offset = index + 1, 0
                self.n_dataset_processed += 1
                yield doc
            elif self.mode == "truncate":
                if bos is not None and doc.numel() > 0 and doc[0] != bos:
                    doc = torch.cat([doc.new_tensor([bos]), doc[: ctx - 1]])
                self.doc_index, self.doc_offset = index + 1, 0
                self.n_dataset_processed += 1
                if doc.numel() >= ctx:
                    yield doc[:ctx]
            else:
                start = resume_offset if index == resume_index else 0
                yield from self._pack_document(index, doc, start, row, bos, sep)
                self.n_dataset_processed += 1
        # a partly filled last row is dropped: every row has exactly ctx tokens

    def _pack_document(
        self,
        index: int,
        doc: torch.Tensor,
        pos: int,
        row: list[torch.Tensor],
        bos: int | None,
        sep: int | None,
    ) -> Iterator[torch.Tensor]:
        ctx, n = self.context_size, doc.numel()
        while pos < n:
            if not row:
                if bos is not None and doc[pos] != bos:
                    row.append(doc.new_tensor([bos]))
            elif pos == 0 and sep is not None and doc[0] != sep:
                row.append(doc.new_tensor([sep]))
            filled = sum(t.numel() for t in row)
            take = min(ctx - filled, n - pos)
            if take > 0:
                row.append(doc[pos : pos + take])
                pos += take
                filled += take
            if filled == ctx:
                self.doc_index, self.doc_offset = index, pos
                out = torch.cat(row)
                row.clear()
                yield out

    def next_row(self) -> torch.Tensor | None:
        """The next ``[context_size]`` int64 row, or None at the end of a pass."""
        if self._rows is None:
            self._rows = self._generate()
        row = next(self._rows, None)
        if row is None:
            self.epoch += 1
            self.doc_index, self.doc_offset = 0, 0
            self._rows = None
        return row

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Position after the last row returned (int64 scalars)."""
        return {
            "epoch": torch.tensor(self.epoch),
            "doc_index": torch.tensor(self.doc_index),
            "doc_offset": torch.tensor(self.doc_offset),
            "n_dataset_processed": torch.tensor(self.n_dataset_processed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.doc_index = int(state["doc_index"])
        self.doc_offset = int(state["doc_offset"])
        self.n_dataset_processed = int(state["n_dataset_processed"])
        self._rows = None  # restarts at doc_index/doc_offset on the next row
