"""Training on a TransformerBridge: ``model_class_name: TransformerBridge`` loads a
``transformers`` causal LM through ``TransformerBridge.boot_transformers`` (here a tiny
GPT-2 folder built offline, see conftest) and the runner trains on its hook; the
default ``HookedTransformer`` names the installed TransformerLens when it lacks it."""

from __future__ import annotations

import json

import pytest
import tiny_runs
import torch
from sae_testing import assert_close

from fastsae import SAE
from fastsae.tl_compat import has_transformer_bridge, transformer_lens_version
from fastsae.training import SAETrainingRunner
from fastsae.training.runner import load_model

pytestmark = pytest.mark.skipif(
    not has_transformer_bridge(),
    reason=f"TransformerLens {transformer_lens_version()} has no TransformerBridge",
)

HOOK = "blocks.1.hook_resid_pre"


def bridge_config(tmp_path, folder, **overrides):
    kwargs = dict(
        model_class_name="TransformerBridge", model_name=str(folder), hook_name=HOOK,
        training_tokens=64 * 40, lr=1e-2, n_checkpoints=0, dead_feature_window=5,
        feature_sampling_window=5, wandb_log_frequency=4, llm_device="cpu", device="cpu",
    )  # fmt: skip
    kwargs.update(overrides)
    return tiny_runs.runner_config(tmp_path, **kwargs)


def test_load_model_boots_the_bridge_with_its_tokenizer(tmp_path, tiny_gpt2_dir):
    from transformer_lens.model_bridge import TransformerBridge

    model, tokenizer = load_model(bridge_config(tmp_path, tiny_gpt2_dir))
    assert isinstance(model, TransformerBridge) and not model.training
    assert tokenizer is None and model.tokenizer is not None  # the bridge carries it
    assert model.to_tokens("w1 w2", prepend_bos=False).tolist() == [[1, 2]]
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]), names_filter=[HOOK])
    assert cache[HOOK].shape == (1, 3, 16)


def test_runner_trains_on_a_bridge_hook(tmp_path, tiny_gpt2_dir):
    """A run that loads the bridge itself writes an SAE that reads the bridge's hook: it
    splices into an SAETransformerBridge of the same folder, where the error term gives
    the clean logits back and without it the SAE reconstructs the hook well."""
    from fastsae import SAETransformerBridge

    cfg = bridge_config(tmp_path, tiny_gpt2_dir)
    runner = SAETrainingRunner(
        cfg, override_dataset=tiny_runs.token_rows_dataset(400), show_progress=False
    )
    runner.run()
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("losses/overall_loss" in r for r in rows) >= 2

    sae = SAE.load_from_disk(out)
    assert sae.cfg.metadata.hook_name == HOOK
    model = SAETransformerBridge.boot_transformers(str(tiny_gpt2_dir), device="cpu").eval()
    toks = torch.tensor(tiny_runs.token_rows(4, context_size=12, seed=3))
    clean, cache = model.run_with_cache(toks, names_filter=[HOOK])
    assert_close(model.run_with_saes(toks, saes=[sae], use_error_term=True), clean, 1e-5)
    _, sae_cache = model.run_with_cache_with_saes(toks, saes=[sae])
    recons = sae_cache[f"{HOOK}.hook_sae_recons"]
    explained = 1 - (recons - cache[HOOK]).var() / cache[HOOK].var()
    assert explained > 0.4, float(explained)  # 0.63 here, untrained 0.02
