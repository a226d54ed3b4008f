"""The SAELens tutorials run with fastsae: tutorial 2, training an SAE (and the training config of SAELens's API reference).
See conftest.py for what they run against and what differs from the originals."""

from __future__ import annotations

import sae_lens
import torch
from tutorial_support import HOOK, TUTORIAL_MARKS, _held_out_acts, _same_weights

from fastsae import (
    SAE,
    LanguageModelSAERunnerConfig,
    SAETrainingRunner,
)

pytestmark = TUTORIAL_MARKS


def test_tutorial2_training(model, text_dataset_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the runner writes ./output, the tutorial ./my_trained_sae
    # 1. Configure training
    cfg = LanguageModelSAERunnerConfig(
        # Model
        model_name="gpt2-small",
        hook_name="blocks.1.hook_resid_pre",
        hook_layer=1,
        d_in=32,
        # SAE architecture
        architecture="standard",
        d_sae=32 * 8,  # 8x expansion
        activation_fn="relu",
        # Training
        lr=4e-4,
        l1_coefficient=8e-5,
        l1_warm_up_steps=20,
        train_batch_size_tokens=256,
        training_tokens=256 * 120,  # Small run for demo
        # Data
        dataset_path=str(text_dataset_dir),
        streaming=True,
        context_size=32,
        # Dead feature prevention
        use_ghost_grads=True,
        dead_feature_window=50,
        # Logging
        log_to_wandb=False,
        wandb_project="sae-training-demo",
        # Hardware
        device="cpu",
        dtype="float32",
    )

    # 2. Train
    runner = SAETrainingRunner(cfg, override_model=model)
    sae = runner.run()

    # 3. Save
    sae.save_model("./my_trained_sae")

    # ---- checks: the flat legacy config became a standard SAE with ghost grads
    assert cfg.sae.architecture() == "standard" and cfg.sae.d_sae == 256
    assert cfg.l1_coefficient == 8e-5 and cfg.use_ghost_grads is True
    assert cfg.total_training_steps == 120
    assert runner.trainer.state.n_training_steps == 120
    # the saved folder loads in both libraries, with the same outputs as the trained SAE
    ours = SAE.load_from_disk("./my_trained_sae")
    theirs = sae_lens.SAE.load_from_disk("./my_trained_sae")
    assert ours.cfg.metadata.hook_name == theirs.cfg.metadata.hook_name == HOOK
    assert ours.cfg.d_in == 32 and ours.cfg.d_sae == 256
    held_out = _held_out_acts(model)
    with torch.no_grad():
        expected = sae.to_inference_sae()(held_out)
        torch.testing.assert_close(ours(held_out), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(held_out), expected, rtol=1e-5, atol=1e-5)
        # and it learned something: explained variance on text it never saw
        residual = ((held_out - expected) ** 2).sum()
        total = ((held_out - held_out.mean(0)) ** 2).sum()
    explained_variance = 1 - (residual / total).item()
    assert explained_variance > 0.5, explained_variance
    # the runner's own output folder (output_path) is the same SAE in inference format
    _same_weights(SAE.load_from_disk("./output"), ours)


def test_api_training_config_example_and_architectures():
    """The API reference's LanguageModelSAERunnerConfig example (sizes scaled) and the architecture
    snippets: the flat SAELens < 6 spelling builds the nested 6.x config."""
    cfg = LanguageModelSAERunnerConfig(
        # Model and hook
        model_name="gpt2-small",
        hook_name="blocks.1.hook_resid_pre",
        hook_layer=1,
        d_in=32,
        # SAE architecture
        architecture="standard",  # "standard", "gated", "jumprelu", "topk"
        d_sae=32 * 8,  # Expansion factor
        activation_fn="relu",
        # Training hyperparameters
        lr=4e-4,
        l1_coefficient=8e-5,
        lp_norm=1.0,
        lr_scheduler_name="constant",
        lr_warm_up_steps=500,
        # Sparsity control
        l1_warm_up_steps=1000,
        use_ghost_grads=True,
        feature_sampling_window=1000,
        dead_feature_window=5000,
        dead_feature_threshold=1e-8,
        # Data
        dataset_path="monology/pile-uncopyrighted",
        streaming=True,
        context_size=128,
        # Batch sizes
        train_batch_size_tokens=4096,
        store_batch_size_prompts=16,
        n_batches_in_buffer=64,
        # Training duration
        training_tokens=100_000_000,
        # Logging
        log_to_wandb=False,
        wandb_project="sae-training",
        wandb_log_frequency=100,
        # Checkpointing
        checkpoint_path="checkpoints",
        n_checkpoints=5,
        # Hardware
        device="cpu",
        dtype="float32",
    )
    assert cfg.sae.architecture() == "standard"
    assert (cfg.sae.d_in, cfg.sae.d_sae, cfg.d_in) == (32, 256, 32)
    assert (cfg.l1_coefficient, cfg.lp_norm, cfg.l1_warm_up_steps) == (8e-5, 1.0, 1000)
    assert cfg.lr_warm_up_steps == 500 and cfg.wandb_log_frequency == 100
    assert cfg.total_training_steps == 100_000_000 // 4096
    arch = {"d_in": 32, "d_sae": 32 * 8, "dataset_path": "local", "log_to_wandb": False}
    topk = LanguageModelSAERunnerConfig(
        architecture="topk",
        activation_fn="topk",
        activation_fn_kwargs={"k": 50},  # Exactly 50 active features
        **arch,
    )
    assert topk.sae.architecture() == "topk" and topk.sae.k == 50
    for name in ("gated", "jumprelu"):
        assert LanguageModelSAERunnerConfig(architecture=name, **arch).sae.architecture() == name
