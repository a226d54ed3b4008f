"""The prompt explorer's data: for each token of a text, which SAE features fire on it.

:func:`explore_text` tokenizes a text as the dashboard's rows are (the start-of-row
token first), runs the model to the SAE's hook and encodes every position; for each
token it keeps the ``top_n`` strongest non-zero features (over the whole SAE, not only
the dashboard's features), with their labels. The static site shows these records for
the prompts given at build time (``--prompts``); ``fastsae dashboard --serve`` computes
them live for text typed in the page.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastsae.dashboard.data import read_text_lines
from fastsae.dashboard.model import DashboardModel
from fastsae.labels import FeatureLabels

DEFAULT_TOP_N = 8
MAX_PROMPT_CHARS = 20_000


class PromptEncoder:
    """Texts -> explorer records for one SAE and model (see :func:`explore_text`)."""

    def __init__(
        self,
        sae: Any,
        model: DashboardModel,
        *,
        labels: FeatureLabels | None = None,
        top_n: int = DEFAULT_TOP_N,
        max_tokens: int | None = None,
    ):
        if top_n <= 0:
            raise ValueError(f"top_n must be > 0, got {top_n}")
        self.sae, self.model, self.labels = sae, model, labels
        self.top_n = top_n
        self.max_tokens = max_tokens

    def label(self, feature: int) -> str | None:
        if self.labels is None or feature not in self.labels:
            return None
        return self.labels[feature].description or None

    @torch.no_grad()
    def __call__(self, text: str) -> dict[str, Any]:
        return explore_text(self, text)


@torch.no_grad()
def explore_text(encoder: PromptEncoder, text: str) -> dict[str, Any]:
    """``{"text", "tokens", "token_ids", "features"}``: ``features[i]`` lists the
    ``top_n`` strongest features on token ``i`` as ``{"feature", "value", "label"}``,
    strongest first (an empty list where none fires); ``max_value`` is the largest
    activation on any token (for colouring)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the prompt is empty: give some text to encode")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt has {len(text)} characters; at most {MAX_PROMPT_CHARS}")
    sae, model = encoder.sae, encoder.model
    ids = model.tokenize(text, encoder.max_tokens)
    if not ids:
        raise ValueError(f"the prompt {text[:40]!r} has no tokens")
    rows = torch.tensor([ids], dtype=torch.long)
    x = model.hook_input(rows, sae.cfg.d_in)
    w = sae.W_dec
    acts = sae.encode(x.to(w.device, w.dtype))[0].float().cpu()  # [s, d_sae]
    k = min(encoder.top_n, acts.shape[-1])
    top = acts.topk(k, dim=-1)
    features = []
    for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        features.append(
            [
                {"feature": f, "value": v, "label": encoder.label(f)}
                for v, f in zip(values, indices, strict=True)
                if v > 0
            ]
        )
    decode = model.tokenizer.decode
    return {
        "text": text,
        "tokens": [decode([t]) for t in ids],
        "token_ids": ids,
        "features": features,
        "max_value": max((f[0]["value"] for f in features if f), default=0.0),
    }


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped)."""
    return read_text_lines(path, "prompts file")


def explore_prompts(encoder: PromptEncoder, prompts: Sequence[str]) -> list[dict[str, Any]]:
    return [encoder(p) for p in prompts]


__all__ = [
    "DEFAULT_TOP_N",
    "PromptEncoder",
    "explore_prompts",
    "explore_text",
    "read_prompts",
]
