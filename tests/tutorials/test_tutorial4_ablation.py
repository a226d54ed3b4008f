"""The SAELens tutorials run with fastsae: tutorial 4, feature ablation.
See conftest.py for what they run against and what differs from the originals."""

from __future__ import annotations

import pytest
import torch
from tutorial_support import HOOK, SOURCES, TUTORIAL_MARKS, _same_weights

from fastsae import SAE

pytestmark = TUTORIAL_MARKS


@pytest.mark.parametrize("source", SOURCES)
def test_tutorial4_feature_ablation(source, model, sae_dir, offline_hub, original_sae, capsys):
    if source == "from_pretrained":
        sae, _, _ = SAE.from_pretrained(
            release="gpt2-small-res-jb", sae_id="blocks.1.hook_resid_pre", device="cpu"
        )
    else:
        sae = SAE.load_from_disk(sae_dir, device="cpu")
    _same_weights(sae, original_sae)

    prompt = "The capital of France is"
    tokens = model.to_tokens(prompt)

    # Baseline prediction
    baseline_logits = model(tokens)
    target_token = model.tokenizer.convert_tokens_to_ids("paris")  # to_single_token(" Paris")
    baseline_prob = torch.softmax(baseline_logits[0, -1], dim=-1)[target_token].item()
    print(f"Baseline P(Paris): {baseline_prob:.4f}")

    # Get features to ablate
    _, cache = model.run_with_cache(tokens)
    activations = cache["resid_pre", 1]
    features = sae.encode(activations)
    top_features = features[0, -1].topk(10).indices

    # Ablate top features one by one
    ablated = {}
    for feat_idx in top_features:

        def ablation_hook(activation, hook, feat_idx=feat_idx):
            # Encode → zero feature → decode
            feats = sae.encode(activation)
            feats[:, :, feat_idx] = 0
            return sae.decode(feats)

        ablated_logits = model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.hook_resid_pre", ablation_hook)]
        )
        ablated_prob = torch.softmax(ablated_logits[0, -1], dim=-1)[target_token].item()
        change = (ablated_prob - baseline_prob) / baseline_prob * 100
        print(f"Ablate feature {feat_idx.item()}: P(Paris)={ablated_prob:.4f} ({change:+.1f}%)")
        ablated[feat_idx.item()] = ablated_logits.detach()

    # ---- checks
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Baseline P(Paris): {baseline_prob:.4f}" and len(lines) == 11
    assert [int(line.split()[2][:-1]) for line in lines[1:]] == top_features.tolist()
    assert torch.equal(baseline_logits, model(tokens))  # the ablation hooks are gone
    # the same ablation through the SAE spliced into the model (no error term: the hook
    # above also replaces the residual by the reconstruction)
    recons_logits = model.run_with_saes(tokens, saes=[sae])
    changed = 0
    for feat_idx, logits in ablated.items():

        def zero(acts, hook, feat_idx=feat_idx):
            acts[..., feat_idx] = 0
            return acts

        expected = model.run_with_hooks_with_saes(
            tokens, saes=[sae], fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", zero)]
        )
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        if (features[0, :, feat_idx] > 0).any():
            changed += not torch.allclose(logits, recons_logits, rtol=1e-6, atol=1e-7)
        else:  # a latent that never fired: ablating it is the plain reconstruction
            torch.testing.assert_close(logits, recons_logits, rtol=1e-5, atol=1e-6)
    assert changed >= 1
