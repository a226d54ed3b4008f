"""The SAELens tutorials run with fastsae: the snippets of SAELens's API reference (SAE, HookedSAETransformer, ActivationsStore.from_sae, run_evals).
See conftest.py for what they run against and what differs from the originals."""

from __future__ import annotations

import math
import warnings

import datasets
import pytest
import sae_lens
import torch
from sae_lens.evals import EvalConfig as SLEvalConfig
from sae_lens.evals import run_evals as sl_run_evals
from sae_lens.training.activation_scaler import ActivationScaler as SLActivationScaler
from tutorial_support import CTX, D_MODEL, D_SAE, HOOK, TUTORIAL_MARKS, _resid, _same_weights

from fastsae import (
    SAE,
    ActivationsStore,
    EvalConfig,
    run_evals,
)
from fastsae.analysis import steering_hook

pytestmark = TUTORIAL_MARKS


def test_api_sae_class_snippets(sae_dir, offline_hub, original_sae, tmp_path):
    # From official releases
    sae, cfg_dict, sparsity = SAE.from_pretrained(
        release="gpt2-small-res-jb", sae_id="blocks.1.hook_resid_pre", device="cpu"
    )
    _same_weights(sae, original_sae)
    # From HuggingFace
    sae, cfg_dict, sparsity = SAE.from_pretrained(
        release="username/repo-name", sae_id="path/to/sae", device="cpu"
    )
    _same_weights(sae, original_sae)
    assert cfg_dict["hook_name"] == HOOK and sparsity.shape == (D_SAE,)
    # From local disk
    sae = SAE.load_from_disk(sae_dir, device="cpu")
    _same_weights(sae, original_sae)

    assert sae.W_enc.shape == (D_MODEL, D_SAE) and sae.W_dec.shape == (D_SAE, D_MODEL)
    assert sae.b_enc.shape == (D_SAE,) and sae.b_dec.shape == (D_MODEL,)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.hook_name) == (D_MODEL, D_SAE, HOOK)
    activations = torch.randn(2, 5, D_MODEL, generator=torch.Generator().manual_seed(0))
    features = sae.encode(activations)
    assert features.shape == (2, 5, D_SAE)
    reconstructed = sae.decode(features)
    assert reconstructed.shape == (2, 5, D_MODEL)
    torch.testing.assert_close(sae(activations), reconstructed, rtol=1e-5, atol=1e-6)
    sae.save_model(tmp_path / "resaved")
    again = sae_lens.SAE.load_from_disk(str(tmp_path / "resaved"))
    torch.testing.assert_close(again(activations), reconstructed, rtol=1e-5, atol=1e-6)


def test_api_hooked_sae_transformer(model, original_sae):
    sae = original_sae
    tokens = model.to_tokens(["The capital of France is", "Paris is the capital of"])
    clean_logits = model(tokens)

    # Load model with SAE
    model.add_sae(sae)

    # Run with SAE in the loop
    output = model.run_with_saes(tokens, saes=[sae])
    first_output = output

    # Cache with SAE activations
    output, cache = model.run_with_cache_with_saes(tokens, saes=[sae])

    # ---- checks: the output is the model with the residual replaced by the reconstruction
    assert list(model.acts_to_saes) == [HOOK]  # add_sae's SAE stays after the runs
    model.reset_saes()
    assert model.acts_to_saes == {}
    expected = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda x, hook: sae(x))])
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first_output, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(output, clean_logits, rtol=1e-4, atol=1e-4)
    resid = _resid(model, tokens)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_input"], resid)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_post"], sae.encode(resid))
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_output"], sae(resid))
    assert f"{HOOK}.hook_sae_error" not in cache  # no error term: nothing to cache

    # use_error_term=True: the spliced model's logits are the clean logits
    with_error, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)
    torch.testing.assert_close(with_error, clean_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_error"], resid - sae(resid))
    # zero-ablating every active feature (error term kept) changes them, to b_dec + error
    acts = cache[f"{HOOK}.hook_sae_acts_post"]
    assert (acts > 0).any()

    def zero_all(a, hook):
        return torch.zeros_like(a)

    ablated = model.run_with_hooks_with_saes(
        tokens, saes=[sae], use_error_term=True,
        fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", zero_all)],
    )  # fmt: skip
    assert not torch.allclose(ablated, clean_logits, rtol=1e-3, atol=1e-3)
    by_hand = model.run_with_hooks(
        tokens, fwd_hooks=[(HOOK, lambda x, hook: sae.b_dec + (x - sae(x)))]
    )
    torch.testing.assert_close(ablated, by_hand, rtol=1e-5, atol=1e-5)
    # the saes() context manager leaves nothing attached
    with model.saes(saes=[sae]):
        assert list(model.acts_to_saes) == [HOOK]
    assert model.acts_to_saes == {}
    torch.testing.assert_close(model(tokens), clean_logits)


def test_generate_with_attached_sae_and_latent_steering(model, original_sae):
    """Tutorial 3's steering with the SAE spliced in (generate works with SAEs
    attached): with the error term the greedy continuation is the clean model's; adding
    to one latent at ``hook_sae_acts_post`` changes it."""
    sae = original_sae
    tokens = model.to_tokens("The capital of France is")
    kwargs = dict(max_new_tokens=8, do_sample=False, verbose=False)
    clean = model.generate(tokens, **kwargs)
    model.add_sae(sae, use_error_term=True)
    assert torch.equal(model.generate(tokens, **kwargs), clean)
    feature = 0

    def boost(acts, hook):
        acts[:, -1, feature] += 10.0
        return acts

    with model.hooks(fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", boost)]):
        steered = model.generate(tokens, **kwargs)
    assert torch.equal(steered[:, : tokens.shape[1]], tokens)
    assert not torch.equal(steered, clean)
    # the same edit by hand on the clean model: x + 10 * W_dec[feature] at the last position
    model.reset_saes()
    with model.hooks(fwd_hooks=[steering_hook(sae, feature, 10.0, positions=slice(-1, None))]):
        assert torch.equal(model.generate(tokens, **kwargs), steered)


def test_api_activations_store_from_sae(model, original_sae, tokenizer, text_dataset_dir):
    sae = original_sae  # its metadata names the dataset folder and the context size
    store = ActivationsStore.from_sae(
        model=model,
        sae=sae,
        store_batch_size_prompts=8,
        train_batch_size_tokens=256,
        n_batches_in_buffer=4,
        device="cpu",
    )

    # Get batch of activations
    activations = store.get_batch_tokens()

    # ---- checks: rows of CTX tokens packed from the SAE's dataset, [CLS] first
    assert activations.shape == (8, CTX) and activations.dtype == torch.long
    # BOS is what TransformerLens made of BERT's tokenizer: "<|endoftext|>", i.e. [UNK]
    assert (activations[:, 0] == model.tokenizer.bos_token_id).all()
    first_doc = datasets.load_from_disk(str(text_dataset_dir))[0]["text"]
    doc_ids = tokenizer(first_doc, add_special_tokens=False)["input_ids"]
    assert activations[0, 1:].tolist() == doc_ids[: CTX - 1]
    batch = store.next_batch()
    assert batch.shape == (256, D_MODEL) and batch.dtype == torch.float32
    # every activation in the batch is a hook activation of some token the store read
    resid = _resid(model, activations).reshape(-1, D_MODEL)
    fresh = ActivationsStore.from_sae(
        model=model, sae=sae, store_batch_size_prompts=8, train_batch_size_tokens=256,
        n_batches_in_buffer=4, device="cpu",
    )  # fmt: skip
    seen = torch.cat([_resid(model, fresh.get_batch_tokens()).reshape(-1, D_MODEL)
                      for _ in range(8)])  # fmt: skip
    assert torch.allclose(resid, seen[: resid.shape[0]])
    dist = torch.cdist(batch, seen, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert (dist < 1e-4).all()


def test_api_run_evals(model, original_sae, sae_dir):
    sae = original_sae

    def store():
        return ActivationsStore.from_sae(
            model=model, sae=sae, store_batch_size_prompts=8, train_batch_size_tokens=256,
            n_batches_in_buffer=4, device="cpu",
        )  # fmt: skip

    eval_config = EvalConfig(
        batch_size_prompts=4,
        n_eval_reconstruction_batches=2,
        compute_kl=True,
        compute_ce_loss=True,
        n_eval_sparsity_variance_batches=2,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
    )
    eval_metrics, feature_metrics = run_evals(sae, store(), model, eval_config=eval_config)

    groups = {
        "model_behavior_preservation": ["kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"],
        "model_performance_preservation": [
            "ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae",
        ],
        "shrinkage": ["l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"],
        "sparsity": ["l0", "l1"],
        "reconstruction_quality": ["explained_variance", "explained_variance_legacy", "mse", "cossim"],
        "token_stats": ["total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"],
    }  # fmt: skip
    for group, keys in groups.items():
        assert set(keys) <= set(eval_metrics[group]), group
    assert set(feature_metrics) == {
        "feature_density", "consistent_activation_heuristic", "encoder_norm",
        "encoder_decoder_cosine_sim", "encoder_bias",
    }  # fmt: skip
    assert all(len(v) == D_SAE for v in feature_metrics.values())
    assert eval_metrics["token_stats"]["total_tokens_eval_reconstruction"] == CTX * 2 * 4
    assert 0 < eval_metrics["sparsity"]["l0"] < D_SAE
    ce = eval_metrics["model_performance_preservation"]
    assert ce["ce_loss_without_sae"] > 0 and math.isfinite(ce["ce_loss_score"])

    # the same numbers and keys as sae-lens's run_evals on the same SAE, model and tokens
    sl_sae = sae_lens.SAE.load_from_disk(str(sae_dir))
    sl_store = store()
    # sae-lens's run_evals calls reset_input_dataset() between its two passes; with its own
    # store that does not rewind the token stream (fastsae's run_evals reproduces this), but
    # fastsae's store does rewind: disable it so that both see the same tokens
    sl_store.reset_input_dataset = lambda: None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sl_run_evals(
            sl_sae, sl_store, model, SLActivationScaler(),
            eval_config=SLEvalConfig(**{k: getattr(eval_config, k)
                                        for k in SLEvalConfig.__dataclass_fields__}),
        )  # fmt: skip
    for ours_part, theirs_part in zip((eval_metrics, feature_metrics), theirs, strict=True):
        assert list(ours_part) == list(theirs_part)
    mismatched = {}
    for group, metrics in theirs[0].items():
        assert list(eval_metrics[group]) == list(metrics), group
        for key, value in metrics.items():
            if eval_metrics[group][key] != pytest.approx(value, rel=1e-4, abs=1e-6):
                mismatched[f"{group}.{key}"] = (eval_metrics[group][key], value)
    assert not mismatched, f"(fastsae, sae-lens): {mismatched}"
    for key, values in theirs[1].items():
        torch.testing.assert_close(
            torch.tensor(feature_metrics[key]), torch.tensor(values), rtol=1e-4, atol=1e-6,
            equal_nan=True, msg=key,
        )  # fmt: skip
