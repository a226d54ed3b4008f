"""The SAELens tutorials run with fastsae: tutorial 5, comparing features across prompts.
See conftest.py for what they run against and what differs from the originals."""

from __future__ import annotations

import pytest
import torch
from tutorial_support import D_SAE, HOOK, SOURCES, TUTORIAL_MARKS, _same_weights

from fastsae import SAE

pytestmark = TUTORIAL_MARKS


@pytest.mark.parametrize("source", SOURCES)
def test_tutorial5_comparing_features_across_prompts(
    source, model, sae_dir, offline_hub, original_sae, capsys
):
    if source == "from_pretrained":
        sae, _, _ = SAE.from_pretrained(
            release="gpt2-small-res-jb", sae_id="blocks.1.hook_resid_pre", device="cpu"
        )
    else:
        sae = SAE.load_from_disk(sae_dir, device="cpu")
    _same_weights(sae, original_sae)

    # Test prompts about the same concept
    prompts = [
        "The Eiffel Tower is located in",
        "Paris is the capital of",
        "France's largest city is",
        "The Louvre museum is in",
    ]

    # Collect feature activations
    all_features = []
    for prompt in prompts:
        tokens = model.to_tokens(prompt)
        _, cache = model.run_with_cache(tokens)
        activations = cache["resid_pre", 1]
        features = sae.encode(activations)
        # Take max activation across positions
        max_features = features[0].max(dim=0).values
        all_features.append(max_features)

    all_features = torch.stack(all_features)  # [n_prompts, d_sae]

    # Find features that activate consistently
    mean_activation = all_features.mean(dim=0)
    min_activation = all_features.min(dim=0).values

    # Features active in ALL prompts
    consistent_features = (min_activation > 0.5).nonzero().squeeze(-1)
    print(f"Features active in all prompts: {len(consistent_features)}")

    # Top consistent features
    top_consistent = mean_activation[consistent_features].topk(min(10, len(consistent_features)))
    print("\nTop consistent features (possibly 'France/Paris' related):")
    for idx, val in zip(top_consistent.indices, top_consistent.values, strict=True):
        feat_idx = consistent_features[idx].item()
        print(f"  Feature {feat_idx}: mean activation {val.item():.3f}")

    # ---- checks against the spliced model's cached activations
    expected = []
    for prompt in prompts:
        _, c = model.run_with_cache_with_saes(model.to_tokens(prompt), saes=[sae])
        expected.append(c[f"{HOOK}.hook_sae_acts_post"][0].max(0).values)
    expected = torch.stack(expected)
    torch.testing.assert_close(all_features, expected, rtol=1e-5, atol=1e-6)
    want = [f for f in range(D_SAE) if all(expected[p, f] > 0.5 for p in range(len(prompts)))]
    assert consistent_features.tolist() == want and len(want) >= 1
    assert (top_consistent.values[:-1] >= top_consistent.values[1:]).all()
    out = capsys.readouterr().out
    assert f"Features active in all prompts: {len(want)}" in out
    for idx, val in zip(top_consistent.indices, top_consistent.values, strict=True):
        feat = want[idx]
        assert val.item() == pytest.approx(expected[:, feat].mean().item(), rel=1e-5)
        assert f"  Feature {feat}: mean activation {val.item():.3f}" in out
