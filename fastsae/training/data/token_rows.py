"""Documents -> rows of exactly ``context_size`` token ids, with BOS/separator handling.

- ``special_token_id``: resolve ``"bos"``/``"eos"``/``"sep"``/an int/None to a token id.
- ``chat_template_tokens`` / ``as_conversation`` / ``check_chat_template``: a
  conversation (or a string, as one user message) through the tokenizer's chat template.
- ``TokenRowSource``: pre-tokenized rows, packed documents or truncated documents, with a
  state (epoch, document index, offset in it) that resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from datasets import Dataset

from fastsae.training.data.text_loading import HfDataset


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


def check_chat_template(tokenizer: Any) -> None:
    """Raise a ``ValueError`` unless ``tokenizer`` can apply a chat template (it is not
    None and its ``chat_template`` is set)."""
    if tokenizer is None:
        raise ValueError(
            "use_chat_formatting=True needs a tokenizer with a chat template, but there is "
            "no tokenizer (the model has none; pass tokenizer=)"
        )
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise ValueError(
            f"use_chat_formatting=True needs a tokenizer with apply_chat_template; "
            f"{type(tokenizer).__name__} has none"
        )
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"use_chat_formatting=True needs a tokenizer with a chat template, but tokenizer "
            f"{name!r} has no chat_template; set tokenizer.chat_template (a Jinja template) "
            "or use a chat model's tokenizer"
        )


def as_conversation(value: Any, where: str = "value") -> list[Any]:
    """``value`` as a conversation for a chat template: a list of message mappings as
    given, a string as one user message. Anything else raises, naming ``where``."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, Mapping) for m in value):
        return list(value)
    raise ValueError(
        f"{where} is {type(value).__name__} {_short(value)}, not a conversation (a non-empty "
        "list of {'role': ..., 'content': ...} messages) or a string"
    )


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def chat_template_tokens(conversation: Any, tokenizer: Any) -> torch.Tensor:
    """The 1-D int64 token ids of one conversation (a list of ``{"role", "content"}``
    messages) through ``tokenizer.apply_chat_template``: the template's own special
    tokens are in them and nothing else is added; no generation prompt."""
    ids = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_tensors="pt", return_dict=False
    )
    return torch.as_tensor(ids[0], dtype=torch.long).reshape(-1)


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

    ``chat=True``: the column holds conversations (or strings, each one user message),
    tokenized with the tokenizer's chat template (:func:`chat_template_tokens`) and then
    packed or truncated like text.

    ``next_row()`` returns None once at the end of every pass over the dataset, after
    which the next pass starts (``epoch`` counts finished passes). The state after each
    returned row is (epoch, doc_index, doc_offset): resuming re-reads the document at
    ``doc_index`` and continues at token ``doc_offset``; no earlier document is tokenized.

    ``doc_shard = (index, count)`` (data parallelism; set before the first row): only
    documents ``index, index + count, ...`` are read, tokenized and packed, so ``count``
    replicas share the tokenizer's work and see disjoint tokens. Positions stay in the
    dataset's document numbers; ``n_dataset_processed`` counts this source's documents.
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
        chat: bool = False,
    ):
        if mode not in ("rows", "pack", "truncate"):
            raise ValueError(f"mode must be 'rows', 'pack' or 'truncate', got {mode!r}")
        if chat and (is_tokenized or mode == "rows"):
            raise ValueError(
                "chat=True tokenizes conversations; it cannot read a pre-tokenized column"
            )
        if chat:
            check_chat_template(tokenizer)
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
        self.chat = chat
        self.epoch = 0
        self.doc_index = 0  # the document the next row starts in (this epoch)
        self.doc_offset = 0  # the token of that document the next row starts at
        self.n_dataset_processed = 0  # documents read, over all epochs
        # data parallelism: this source reads documents i with i % count == index only
        self.doc_shard: tuple[int, int] = (0, 1)
        self._rows: Iterator[torch.Tensor] | None = None
        # rows given by the pass in progress when it started at the dataset's start
        # (None for a pass resumed mid-dataset)
        self._rows_this_pass: int | None = None

    # -- reading documents ---------------------------------------------------------------
    def _raw_chunks(self, start: int) -> Iterator[list[tuple[int, Any]]]:
        """Lists of ``(document index, raw column value)`` of this source's documents
        (``doc_shard``) from document ``start`` on. Another replica's documents are not
        read from a map-style dataset, and never tokenized."""
        index, count = self.doc_shard
        first = start + (index - start) % count  # this source's first document >= start
        ds = self.dataset
        if isinstance(ds, Dataset):
            ds = ds.select_columns([self.column])
            ds = ds.with_format("torch" if self.is_tokenized else None)
            ids = range(first, len(ds), count)
            for i in range(0, len(ids), self.read_chunk):
                part = ids[i : i + self.read_chunk]
                key = slice(part.start, part.stop) if count == 1 else list(part)
                yield list(zip(part, ds[key][self.column], strict=True))
            return
        if start:
            ds = ds.skip(start)
        chunk: list[tuple[int, Any]] = []
        for doc, example in enumerate(ds, start=start):
            if doc % count != index:
                continue
            chunk.append((doc, example[self.column]))
            if len(chunk) == self.read_chunk:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _documents(self, start: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(document index, 1-D int64 token ids) of this source's documents from
        document ``start`` on."""
        for chunk in self._raw_chunks(start):
            indices = [i for i, _ in chunk]
            values = [v for _, v in chunk]
            if self.is_tokenized:
                docs = [torch.as_tensor(v, dtype=torch.long).reshape(-1) for v in values]
            elif self.chat:
                docs = [
                    chat_template_tokens(
                        as_conversation(v, f"column {self.column!r}: document {i}"),
                        self.tokenizer,
                    )
                    for i, v in chunk
                ]
            else:
                for i, v in chunk:
                    if not isinstance(v, str):
                        raise ValueError(
                            f"column {self.column!r}: document {i} is {type(v).__name__}, not text"
                        )
                ids = self.tokenizer(values, add_special_tokens=False, verbose=False)["input_ids"]
                docs = [torch.tensor(d, dtype=torch.long) for d in ids]
            yield from zip(indices, docs, strict=True)

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
        """The next ``[context_size]`` int64 row, or None at the end of a pass.

        A whole pass that gives no row is an error: every later pass would give none
        either, and the caller would start new passes forever."""
        if self._rows is None:
            self._rows = self._generate()
            self._rows_this_pass = 0 if (self.doc_index, self.doc_offset) == (0, 0) else None
        row = next(self._rows, None)
        if row is not None and self._rows_this_pass is not None:
            self._rows_this_pass += 1
        if row is None and self._rows_this_pass == 0:
            why = {
                "pack": f"its documents hold fewer than {self.context_size} tokens in all",
                "truncate": f"every document is shorter than {self.context_size} tokens",
            }.get(self.mode, "it has no rows")
            index, count = self.doc_shard
            if count > 1:
                why += f" (this replica reads the documents whose index is {index} mod {count})"
            raise ValueError(
                f"a whole pass over the dataset (column {self.column!r}) gave no row of "
                f"context_size={self.context_size} tokens: {why}"
            )
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
