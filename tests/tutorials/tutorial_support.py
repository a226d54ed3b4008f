"""Constants and helpers shared by the tutorial tests (see ``conftest.py`` for what the
tutorials are run against)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

HOOK = "blocks.1.hook_resid_pre"
D_MODEL, D_SAE, CTX = 32, 128, 32
# the repo of the registry release the tutorials load ("gpt2-small-res-jb"); its folder for
# sae_id "blocks.1.hook_resid_pre" has the same name
RELEASE_REPO = "jbloom/GPT2-Small-SAEs-Reformatted"
SOURCES = ("from_pretrained", "load_from_disk")
# held out from the training data (docstrings of installed packages)
HELD_OUT = [
    "The capital of France is Paris, and the Eiffel Tower stands near the river.",
    "She walked to the market on Sunday morning to buy apples, bread and cheese.",
    "Rain fell over the valley all night while the farmers waited for the harvest.",
    "A small boat crossed the lake before the storm reached the northern shore.",
    "The orchestra played the final movement slowly, and the audience stood to cheer.",
    "Children learn to read by listening to stories and sounding out new words.",
]

TUTORIAL_MARKS = pytest.mark.filterwarnings(
    # the tutorials' `sae, cfg_dict, sparsity = SAE.from_pretrained(...)` and `hook_layer=`
    "ignore::DeprecationWarning",
    "ignore:All samples in the training dataset have been exhausted:UserWarning",
)


def _snapshot(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in a Hugging Face cache (with ``refs/main``)."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    sha = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo_dir / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(sha)
    return snap


def _same_weights(sae, reference) -> None:
    for name, p in reference.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[name], p, rtol=0, atol=0, msg=name)


def _resid(model, tokens) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    return cache[HOOK]


def _held_out_acts(model) -> torch.Tensor:
    """``[n_tokens, d_model]`` activations at HOOK of the HELD_OUT words (no [CLS], [SEP],
    [PAD] positions)."""
    tokens = model.to_tokens(HELD_OUT)
    special = torch.tensor(model.tokenizer.all_special_ids)
    return _resid(model, tokens)[~torch.isin(tokens, special)]
