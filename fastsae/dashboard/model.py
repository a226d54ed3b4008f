"""The model a dashboard reads: a TransformerLens model or any Hugging Face model, seen
through what a dashboard needs of it -- the SAE's hook input for token rows, a tokenizer,
the start-of-row token, and an unembedding for the logit lens.

A TransformerLens model reads its hook by name and unembeds with ``W_U``. A Hugging
Face model (``transformers.AutoModel``, e.g. the demo's all-MiniLM-L6-v2) reads the
output of the submodule the hook names and unembeds with its output embeddings when it
has a language-model head, else with its input embeddings (``unembedding_source`` says
which: an encoder's tied token embeddings show which tokens a direction is closest to,
not next-token logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastsae.training.data.model_hooks import hook_reader
from fastsae.training.data.token_rows import special_token_id


@dataclass
class DashboardModel:
    """A model, its tokenizer and the reader of one hook (see the module docstring)."""

    model: Any
    tokenizer: Any
    hook_name: str
    name: str | None = None

    def __post_init__(self) -> None:
        self.reader = hook_reader(self.model, self.hook_name)
        if self.tokenizer is None:
            self.tokenizer = getattr(self.model, "tokenizer", None)
        self.W_U, self.unembedding_source = _unembedding(self.model)

    @property
    def input_device(self) -> torch.device:
        return self.reader.input_device

    @property
    def bos_token_id(self) -> int | None:
        """The token each row starts with: BOS, or CLS for an encoder's tokenizer."""
        return special_token_id("bos", self.tokenizer)

    @property
    def max_context(self) -> int | None:
        return getattr(self.reader, "max_context", None)

    @torch.no_grad()
    def hook_input(self, rows: Tensor, d_in: int) -> Tensor:
        """Token rows ``[b, s]`` -> the hook's activations ``[b, s, d_in]`` (a hook of
        more dimensions, e.g. ``hook_z [b, s, heads, d_head]``, flattened as SAEs read it)."""
        x = self.reader.read(rows.to(self.input_device), None, {})
        if x.ndim > 3:
            x = x.flatten(2)
        if x.shape[-1] != d_in:
            raise ValueError(
                f"the SAE has d_in={d_in} but hook {self.hook_name!r} of the model gives "
                f"activations of size {x.shape[-1]}: wrong SAE, model or hook"
            )
        return x

    def tokenize(self, text: str, max_tokens: int | None = None) -> list[int]:
        """``text`` as token ids, starting with :attr:`bos_token_id` when there is one,
        at most ``max_tokens`` (default: the model's context) long."""
        if self.tokenizer is None:
            raise ValueError("the model has no tokenizer to tokenize text with")
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = self.bos_token_id
        if bos is not None:
            ids = [bos, *ids]
        limit = max_tokens if max_tokens is not None else self.max_context
        return ids[:limit] if limit is not None else ids

    def describe(self) -> dict[str, Any]:
        cfg = getattr(self.model, "cfg", None) or getattr(self.model, "config", None)
        return {
            "name": self.name
            or getattr(cfg, "model_name", None)
            or getattr(cfg, "_name_or_path", None),
            "class": type(self.model).__name__,
            "d_vocab": int(self.W_U.shape[-1]),
            "unembedding": self.unembedding_source,
        }


def _unembedding(model: Any) -> tuple[Tensor, str]:
    """``([d_model, d_vocab], source)``: ``W_U``, the output embeddings or the input
    embeddings (see the module docstring)."""
    W_U = getattr(model, "W_U", None)
    if isinstance(W_U, Tensor):
        return W_U, "W_U"
    for source, getter in (
        ("output embeddings", "get_output_embeddings"),
        ("input embeddings (tied: no language-model head)", "get_input_embeddings"),
    ):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor):
            return weight.T, source
    raise ValueError(
        f"{type(model).__name__} has no W_U, output embeddings or input embeddings "
        "to read the logit lens with"
    )


def load_dashboard_model(
    name: str, hook_name: str, *, model_class_name: str = "HookedTransformer", device: str = "cpu"
) -> DashboardModel:
    """Load ``name`` as ``model_class_name`` (as the training runner does:
    ``HookedTransformer``, ``TransformerBridge`` or ``AutoModel``) for ``hook_name``."""
    from fastsae.training.runner import load_model_by_name  # import cost: the training stack

    model, tokenizer = load_model_by_name(name, model_class_name, device)
    return DashboardModel(model, tokenizer, hook_name, name=name)


__all__ = ["DashboardModel", "load_dashboard_model"]
