"""The SAELens tutorials run with fastsae: tutorial 1, loading and analysing a pre-trained SAE.
See conftest.py for what they run against and what differs from the originals."""

from __future__ import annotations

import pytest
import torch
from tutorial_support import D_MODEL, D_SAE, HOOK, SOURCES, TUTORIAL_MARKS, _same_weights

from fastsae import SAE

pytestmark = TUTORIAL_MARKS


@pytest.mark.parametrize("source", SOURCES)
def test_tutorial1_loading_and_analysing(
    source, model, sae_dir, offline_hub, original_sae, log_sparsity, capsys
):
    # 1. Load model and SAE
    if source == "from_pretrained":
        sae, cfg_dict, sparsity = SAE.from_pretrained(
            release="gpt2-small-res-jb", sae_id="blocks.1.hook_resid_pre", device="cpu"
        )
        assert cfg_dict["hook_name"] == HOOK and cfg_dict["d_sae"] == D_SAE
        assert cfg_dict["neuronpedia_id"] == "gpt2-small/1-res-jb"  # from the registry
        torch.testing.assert_close(sparsity, log_sparsity, rtol=0, atol=0)
    else:
        sae = SAE.load_from_disk(sae_dir, device="cpu")
    _same_weights(sae, original_sae)

    print(f"SAE input dim: {sae.cfg.d_in}")
    print(f"SAE hidden dim: {sae.cfg.d_sae}")
    print(f"Expansion factor: {sae.cfg.d_sae / sae.cfg.d_in:.1f}x")

    # 2. Get model activations
    prompt = "The capital of France is Paris"
    tokens = model.to_tokens(prompt)
    _, cache = model.run_with_cache(tokens)
    activations = cache["resid_pre", 1]  # [1, seq_len, 32]

    # 3. Encode to SAE features
    features = sae.encode(activations)  # [1, seq_len, d_sae]

    # 4. Analyze sparsity
    active_per_token = (features > 0).sum(dim=-1)
    print(f"Average active features per token: {active_per_token.float().mean():.1f}")

    # 5. Find top features for each token
    str_tokens = model.to_str_tokens(prompt)
    tops = []
    for pos in range(len(str_tokens)):
        top_features = features[0, pos].topk(5)
        tops.append(top_features)
        print(f"\nToken '{str_tokens[pos]}':")
        for feat_idx, feat_val in zip(top_features.indices, top_features.values, strict=True):
            print(f"  Feature {feat_idx.item()}: {feat_val.item():.3f}")

    # 6. Check reconstruction quality
    reconstructed = sae.decode(features)
    mse = ((activations - reconstructed) ** 2).mean()
    print(f"\nReconstruction MSE: {mse.item():.6f}")

    # ---- checks
    out = capsys.readouterr().out
    assert "SAE input dim: 32\nSAE hidden dim: 128\nExpansion factor: 4.0x" in out
    seq_len = tokens.shape[1]
    assert activations.shape == (1, seq_len, D_MODEL) and features.shape == (1, seq_len, D_SAE)
    assert len(str_tokens) == seq_len and str_tokens[0] == "[CLS]"
    # the SAE spliced into the model sees the same activations, sparse path and all
    _, sae_cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    cached = sae_cache[f"{HOOK}.hook_sae_acts_post"]
    torch.testing.assert_close(cached, features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae_cache[f"{HOOK}.hook_sae_input"], activations)
    assert torch.equal(active_per_token, (cached > 0).sum(-1))
    assert 0 < active_per_token.float().mean() < D_SAE
    for pos, top in enumerate(tops):
        assert (top.values[:-1] >= top.values[1:]).all(), "top-k not sorted"
        torch.testing.assert_close(top.values, cached[0, pos, top.indices], rtol=1e-5, atol=1e-6)
        assert top.values[0] == features[0, pos].max()
        assert f"\nToken '{str_tokens[pos]}':\n  Feature {top.indices[0].item()}:" in out
    # decode(encode(x)) is the SAE's (sparse) forward; the MSE is the cached reconstruction's
    torch.testing.assert_close(reconstructed, sae(activations), rtol=1e-5, atol=1e-6)
    recons = sae_cache[f"{HOOK}.hook_sae_recons"]
    assert mse.item() == pytest.approx(((activations - recons) ** 2).mean().item(), rel=1e-5)
    assert f"Reconstruction MSE: {mse.item():.6f}" in out
