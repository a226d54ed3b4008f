"""fastsae's training recipe (fastsae.training.recipe): the initialisation from data,
the trainer settings that turn it on, and ``recipe="fastsae"`` on a runner config; the
SAELens defaults stay SAELens's."""

from __future__ import annotations

import pytest
import torch

from fastsae.training import (
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAEConfig,
    LanguageModelSAERunnerConfig,
    SAETrainer,
    SAETrainerConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from fastsae.training.recipe import (
    geometric_median,
    init_from_data,
    recipe_fields_kept,
    recipe_settings,
    rows_needed,
)

D_IN, D_SAE, BATCH = 8, 24, 16


def sae(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3, **kwargs))


def offset_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) + 5.0  # far from centred


# --------------------------------------------------------------------------- median


def test_geometric_median_minimises_the_sum_of_distances():
    x = offset_data(200)
    x[:10] += 100.0  # outliers: the median barely moves, the mean does
    m = geometric_median(x)
    # first-order condition: the unit vectors from the median to the points sum to ~0
    units = (x.double() - m.double()) / (x.double() - m.double()).norm(dim=1, keepdim=True)
    assert float(units.sum(0).norm()) < 1e-3 * len(x)
    cost = lambda y: float((x.double() - y.double()).norm(dim=1).sum())  # noqa: E731
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        assert cost(m) <= cost(m + 0.05 * torch.randn(D_IN, generator=g))
    assert cost(m) < cost(x.mean(0))
    assert float((m - 5.0).abs().max()) < 0.5  # robust to the outliers
    assert m.dtype == x.dtype and m.shape == (D_IN,)


def test_geometric_median_refuses_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        geometric_median(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        geometric_median(torch.tensor([[1.0, float("nan")]]))


# --------------------------------------------------------------------------- init


def test_init_from_data_sets_b_dec_decoder_and_encoder():
    s = sae(decoder_init_norm=0.1)
    rows = offset_data(D_SAE + 8)
    init_from_data(s, rows, b_dec_init="geometric_median", decoder_init="data", batch_size=BATCH)
    torch.testing.assert_close(s.b_dec.data, geometric_median(rows[:BATCH]))
    want = rows[:D_SAE] - s.b_dec.data
    want = want / want.norm(dim=1, keepdim=True) * 0.1
    torch.testing.assert_close(s.W_dec.data, want)
    torch.testing.assert_close(s.W_enc.data, s.W_dec.data.T)
    s2 = sae()
    w_dec = s2.W_dec.data.clone()
    init_from_data(s2, rows, b_dec_init="mean", decoder_init="random", batch_size=BATCH)
    torch.testing.assert_close(s2.b_dec.data, rows[:BATCH].mean(0))
    assert torch.equal(s2.W_dec.data, w_dec)  # random decoder kept


def test_init_from_data_errors_name_the_problem():
    s = sae()
    with pytest.raises(ValueError, match="b_dec_init must be one of"):
        init_from_data(s, offset_data(64), b_dec_init="median", decoder_init="random",
                       batch_size=BATCH)  # fmt: skip
    with pytest.raises(ValueError, match="decoder_init must be one of"):
        init_from_data(s, offset_data(64), b_dec_init="zeros", decoder_init="kaiming",
                       batch_size=BATCH)  # fmt: skip
    with pytest.raises(ValueError, match=r"init rows must be \[n, d_in=8\]"):
        init_from_data(s, torch.zeros(64, 3), b_dec_init="mean", decoder_init="random",
                       batch_size=BATCH)  # fmt: skip
    with pytest.raises(ValueError, match="needs 24 rows, got 20"):
        init_from_data(s, offset_data(20), b_dec_init="zeros", decoder_init="data",
                       batch_size=BATCH)  # fmt: skip
    rows = torch.zeros(D_SAE, D_IN)
    with pytest.raises(ValueError, match="a zero direction"):
        init_from_data(s, rows, b_dec_init="zeros", decoder_init="data", batch_size=BATCH)
    assert rows_needed(D_SAE, BATCH, b_dec_init="zeros", decoder_init="random") == 0
    assert rows_needed(D_SAE, BATCH, b_dec_init="mean", decoder_init="random") == BATCH
    assert rows_needed(D_SAE, BATCH, b_dec_init="zeros", decoder_init="data") == D_SAE


# --------------------------------------------------------------------------- trainer


class Rows:
    """The rows of ``data`` in batches, counting how many were drawn."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.data[self.pos : self.pos + BATCH]
        self.pos += BATCH
        return batch


def trainer_cfg(steps, **kwargs):
    return SAETrainerConfig(
        total_training_samples=steps * BATCH, train_batch_size_samples=BATCH, lr=1e-3,
        dead_feature_window=5, **kwargs,
    )  # fmt: skip


def test_trainer_initialises_from_the_first_rows_then_trains_on_the_next():
    data = offset_data(40 * BATCH)
    s = sae(decoder_init_norm=0.1)
    reference = sae(decoder_init_norm=0.1)
    init_rows = data[: 2 * BATCH]  # d_sae=24 rows: two batches drawn
    init_from_data(reference, init_rows, b_dec_init="geometric_median", decoder_init="data",
                   batch_size=BATCH)  # fmt: skip
    provider = Rows(data)
    trainer = SAETrainer(
        trainer_cfg(3, b_dec_init="geometric_median", decoder_init="data"), s, provider,
        show_progress=False,
    )  # fmt: skip
    seen = []
    step = trainer.step

    def recording(batch):
        if not seen:  # the weights the first step starts from
            for name in ("b_dec", "W_dec", "W_enc"):
                torch.testing.assert_close(getattr(s, name).data, getattr(reference, name).data)
        seen.append(batch.clone())
        return step(batch)

    trainer.step = recording
    trainer.fit()
    assert len(seen) == 3 and provider.pos == 5 * BATCH  # 2 batches to initialise, 3 trained
    assert torch.equal(seen[0], data[2 * BATCH : 3 * BATCH])


def test_trainer_init_uses_the_scaled_rows_and_skips_on_resume():
    data = offset_data(40 * BATCH)
    s = sae(normalize_activations="expected_average_only_in")
    cfg = trainer_cfg(2, b_dec_init="mean", n_batches_for_norm_estimate=3)
    trainer = SAETrainer(cfg, s, Rows(data), show_progress=False)
    trainer._estimate_normalisation()
    factor = trainer.scaler.scaling_factor
    trainer.step = lambda batch: (_ for _ in ()).throw(AssertionError("checked before"))
    trainer._init_from_data()
    # the 4th batch (3 went to the norm estimate), scaled as training scales it
    torch.testing.assert_close(s.b_dec.data, (data[3 * BATCH : 4 * BATCH] * factor).mean(0))
    resumed = SAETrainer(trainer_cfg(4, b_dec_init="mean"), sae(), Rows(data),
                         show_progress=False)  # fmt: skip
    resumed.state.n_training_steps = 2
    before = resumed.sae.b_dec.data.clone()
    resumed._init_from_data()
    assert torch.equal(resumed.sae.b_dec.data, before)


def test_default_trainer_is_sae_lens_initialisation():
    cfg = trainer_cfg(2)
    assert (cfg.b_dec_init, cfg.decoder_init) == ("zeros", "random")
    s = sae()
    weights = {k: v.clone() for k, v in s.state_dict().items()}
    provider = Rows(offset_data(10 * BATCH))
    trainer = SAETrainer(cfg, s, provider, show_progress=False)
    trainer._init_from_data()
    assert provider.pos == 0  # nothing drawn
    assert all(torch.equal(v, weights[k]) for k, v in s.state_dict().items())
    with pytest.raises(ValueError, match="b_dec_init must be one of"):
        trainer_cfg(2, b_dec_init="median")


# --------------------------------------------------------------------------- config


def runner_cfg(**kwargs):
    return LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3), dataset_path="x", **kwargs
    )


def test_recipe_sets_its_fields_unless_given():
    default = runner_cfg()
    assert default.recipe is None
    assert (default.b_dec_init, default.decoder_init) == ("zeros", "random")
    cfg = runner_cfg(recipe="fastsae")
    assert recipe_fields_kept(cfg) == []
    assert (cfg.b_dec_init, cfg.decoder_init) == ("geometric_median", "data")
    assert cfg.sae.decoder_init_norm == 1.0
    trainer = cfg.to_sae_trainer_config()
    assert (trainer.b_dec_init, trainer.decoder_init) == (cfg.b_dec_init, cfg.decoder_init)
    given = runner_cfg(recipe="fastsae", decoder_init="random")
    assert given.decoder_init == "random" and given.b_dec_init == "geometric_median"
    assert recipe_fields_kept(given) == [("decoder_init", "random", "data")]
    # an SAE config field the caller set keeps its value; the caller's object is unchanged
    mine = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3, decoder_init_norm=0.5)
    kept = LanguageModelSAERunnerConfig(sae=mine, dataset_path="x", recipe="fastsae")
    assert kept.sae.decoder_init_norm == 0.5
    plain = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3)
    LanguageModelSAERunnerConfig(sae=plain, dataset_path="x", recipe="fastsae")
    assert plain.decoder_init_norm == 0.1
    assert recipe_settings(None) == {}
    with pytest.raises(ValueError, match=r"unknown recipe 'best'; known: \['fastsae'\]"):
        runner_cfg(recipe="best")
    with pytest.raises(ValueError, match="not supported with latent_shards > 1"):
        runner_cfg(recipe="fastsae", latent_shards=2)
    jumprelu = JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE)
    with pytest.raises(ValueError, match="is for topk and batchtopk SAEs .* not 'jumprelu'"):
        LanguageModelSAERunnerConfig(sae=jumprelu, dataset_path="x", recipe="fastsae")
    batchtopk = BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3)
    on_batchtopk = LanguageModelSAERunnerConfig(sae=batchtopk, dataset_path="x", recipe="fastsae")
    assert on_batchtopk.sae.decoder_init_norm == 1.0
    with pytest.raises(ValueError, match="decoder_init must be one of"):
        runner_cfg(decoder_init="orthogonal")
    # a saved config reads back with the same recipe and fields
    again = LanguageModelSAERunnerConfig.from_dict(cfg.to_dict())
    assert (again.recipe, again.b_dec_init, again.decoder_init) == (
        "fastsae", cfg.b_dec_init, cfg.decoder_init,
    )  # fmt: skip
