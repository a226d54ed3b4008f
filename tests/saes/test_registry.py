"""The architecture registry: ``register`` checks what it is given, and an architecture
added as one module plus one ``register`` call (``toy_architecture``) loads, saves,
trains through the runner and shards, with nothing else in fastsae told about it."""

from __future__ import annotations

import pytest
import tiny_runs
import torch
import toy_architecture as toy
from spawn_ranks import run_ranks

from fastsae import SAE
from fastsae.saes import SAE_CLASSES, StandardSAE, StandardSAEConfig
from fastsae.saes.registry import (
    config_class_for_architecture,
    known_architectures,
    register,
    sae_class_for_architecture,
    sharded_class_for_architecture,
    training_config_class_for_architecture,
    training_sae_class_for_architecture,
    unregister,
)
from fastsae.saes.training_sae import TrainingSAE, TrainStepInput
from fastsae.training.parallel.latent import SHARD_DIMS, SHARDED_CLASSES, shard_sae
from fastsae.training.parallel.latent.communication import step_payload_bytes

D_IN, D_SAE, BATCH = 8, 24, 10


@pytest.fixture(autouse=True)
def toy_registered():
    """The toy architecture registered for each test, and removed after it, so the other
    test modules (which iterate over the registered architectures) never see it."""
    toy.register_toy()
    yield
    unregister(toy.ARCHITECTURE)


def _toy_cfg(**kw) -> toy.ToyTrainingSAEConfig:
    return toy.ToyTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, shift=0.05, l1_coefficient=0.1, **kw)


def test_register_needs_pairs_and_a_matching_architecture():
    with pytest.raises(ValueError, match="sae_cls and cfg_cls together"):
        register("half", StandardSAE)
    with pytest.raises(ValueError, match="names architecture 'standard'"):
        register("renamed", StandardSAE, StandardSAEConfig)
    with pytest.raises(ValueError, match="nothing to register"):
        register("empty")
    with pytest.raises(ValueError, match="non-empty str"):
        register("", StandardSAE, StandardSAEConfig)
    assert "half" not in SAE_CLASSES and "renamed" not in SAE_CLASSES


def test_lookups_name_what_is_known():
    with pytest.raises(ValueError, match=r"unknown SAE architecture 'nope'; known: \[.*'topk'"):
        sae_class_for_architecture("nope")
    with pytest.raises(ValueError, match="unknown training architecture 'transcoder'"):
        training_sae_class_for_architecture("transcoder")
    with pytest.raises(NotImplementedError, match="not 'gated'"):
        sharded_class_for_architecture("gated")
    # batchtopk trains but saves as jumprelu: no inference class of its own
    assert "batchtopk" not in known_architectures()
    assert training_config_class_for_architecture("batchtopk").inference_architecture() == (
        "jumprelu"
    )


def test_toy_is_found_everywhere_the_registry_is_consulted():
    assert SAE_CLASSES[toy.ARCHITECTURE] is toy.ToySAE
    assert toy.ARCHITECTURE in known_architectures()
    assert config_class_for_architecture(toy.ARCHITECTURE) is toy.ToySAEConfig
    assert training_sae_class_for_architecture(toy.ARCHITECTURE) is toy.ToyTrainingSAE
    assert training_config_class_for_architecture(toy.ARCHITECTURE) is toy.ToyTrainingSAEConfig
    assert SHARDED_CLASSES[toy.ARCHITECTURE] is toy.ShardedToyTrainingSAE
    payload = step_payload_bytes(toy.ARCHITECTURE, batch=64, d_in=16)
    assert payload["reconstruction all_reduce"] == 64 * 16 * 4


def test_toy_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    sae = toy.ToySAE(toy.ToySAEConfig(d_in=D_IN, d_sae=D_SAE, shift=0.25))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
    sae.save_model(tmp_path / "toy")
    loaded = SAE.load_from_disk(tmp_path / "toy")
    assert type(loaded) is toy.ToySAE and loaded.cfg.shift == 0.25
    x = torch.randn(BATCH, D_IN)
    torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)
    # a training SAE saves as its inference architecture and loads back for training
    trainer_sae = toy.ToyTrainingSAE(_toy_cfg())
    trainer_sae.save_inference_model(tmp_path / "inference")
    assert type(SAE.load_from_disk(tmp_path / "inference")) is toy.ToySAE
    trainer_sae.save_model(tmp_path / "training")
    again = TrainingSAE.load_from_disk(tmp_path / "training")
    assert type(again) is toy.ToyTrainingSAE and again.cfg.l1_coefficient == 0.1


def test_toy_trains_through_the_runner(tmp_path):
    from fastsae.training import SAETrainingRunner

    cfg = tiny_runs.runner_config(
        tmp_path,
        toy.ToyTrainingSAEConfig(d_in=16, d_sae=32, shift=0.01, l1_coefficient=0.01),
        training_tokens=64 * 6,
        eval_every_n_wandb_logs=10**6,
    )
    runner = SAETrainingRunner(
        cfg,
        override_model=tiny_runs.tiny_model(),
        override_dataset=tiny_runs.token_rows_dataset(200),
        show_progress=False,
    )
    trained = runner.run()
    assert type(trained) is toy.ToyTrainingSAE
    saved = SAE.load_from_disk(tmp_path / "out")
    assert type(saved) is toy.ToySAE and saved.cfg.shift == 0.01
    torch.manual_seed(cfg.seed)
    fresh = toy.ToyTrainingSAE(cfg.sae)
    assert not torch.equal(saved.W_dec, fresh.W_dec), "the runner did not train"


def _full_toy() -> toy.ToyTrainingSAE:
    torch.manual_seed(0)
    sae = toy.ToyTrainingSAE(_toy_cfg())
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    return sae


def _step(sae) -> dict:
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1))
    step = TrainStepInput(sae_in=x, coefficients={"l1": 0.1}, dead_neuron_mask=None,
                          n_training_steps=0)  # fmt: skip
    out = sae.training_forward_pass(step)
    out.loss.backward()
    return {
        "losses": {k: v.detach() for k, v in out.losses.items()},
        "grads": {n: p.grad.clone() for n, p in sae.named_parameters()},
    }


def _shard_worker(rank: int, world: int) -> dict:
    toy.register_toy()  # a spawned rank starts from the built-ins only
    shard = shard_sae(_full_toy(), rank, world)
    assert type(shard) is toy.ShardedToyTrainingSAE
    return _step(shard)


def test_toy_shards_with_the_unsharded_losses_and_gradients(tmp_path):
    per_rank = run_ranks(_shard_worker, 2, tmp_path)
    want = _step(_full_toy())
    for got in per_rank:
        for name, value in want["losses"].items():
            torch.testing.assert_close(got["losses"][name], value, rtol=1e-5, atol=1e-6)
    for name, grad in want["grads"].items():
        dim = SHARD_DIMS.get(name)
        got = (
            per_rank[0]["grads"][name]
            if dim is None
            else torch.cat([r["grads"][name] for r in per_rank], dim=dim)
        )
        torch.testing.assert_close(got, grad, rtol=1e-5, atol=1e-6, msg=name)


def test_registering_a_different_class_for_a_known_part_is_an_error():
    class OtherStandard(StandardSAE):
        pass

    with pytest.raises(ValueError, match="'standard' already has sae_cls=StandardSAE"):
        register("standard", OtherStandard, StandardSAEConfig)
    # the same classes again (a module imported twice) change nothing
    register("standard", StandardSAE, StandardSAEConfig)
    assert SAE_CLASSES["standard"] is StandardSAE


def test_sae_lens_entry_points_register_here(tmp_path):
    from dataclasses import dataclass
    from typing import ClassVar

    from fastsae.saes import register_sae_class, register_sae_training_class

    @dataclass
    class LensStyleConfig(toy.ToySAEConfig):
        _architecture: ClassVar[str | None] = "lens_style"

    class LensStyleSAE(toy.ToySAE):
        config_class = LensStyleConfig

    @dataclass
    class LensStyleTrainingConfig(toy.ToyTrainingSAEConfig):
        _architecture: ClassVar[str | None] = "lens_style"

    class LensStyleTrainingSAE(toy.ToyTrainingSAE):
        config_class = LensStyleTrainingConfig

    register_sae_class("lens_style", LensStyleSAE, LensStyleConfig)
    try:
        register_sae_training_class("lens_style", LensStyleTrainingSAE, LensStyleTrainingConfig)
        assert sae_class_for_architecture("lens_style") is LensStyleSAE
        assert training_sae_class_for_architecture("lens_style") is LensStyleTrainingSAE
        LensStyleSAE(LensStyleConfig(d_in=4, d_sae=8)).save_model(tmp_path / "s")
        assert type(SAE.load_from_disk(tmp_path / "s")) is LensStyleSAE
    finally:
        unregister("lens_style")
    assert "lens_style" not in SAE_CLASSES
    with pytest.raises(ValueError, match="'lens_style' is not registered"):
        unregister("lens_style")
