"""An empty string as a runner config's folder means the current folder: a typo or an
unset shell variable (``output_path: $OUT``) would write the SAE, checkpoints or cache
there, or resume from it, without a word. Each is refused, naming the field."""

from __future__ import annotations

import pytest

from fastsae.training import LanguageModelSAERunnerConfig, TopKTrainingSAEConfig

PATH_FIELDS = (
    "output_path",
    "checkpoint_path",
    "cached_activations_path",
    "resume_from_checkpoint",
)


def _config(**kwargs) -> LanguageModelSAERunnerConfig:
    kwargs.setdefault("sae", TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4))
    kwargs.setdefault("dataset_path", "unused")
    kwargs.setdefault("training_tokens", 10_000)
    kwargs.setdefault("train_batch_size_tokens", 100)
    return LanguageModelSAERunnerConfig(**kwargs)


@pytest.mark.parametrize("field", PATH_FIELDS)
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_folder_field_is_refused(field, value):
    with pytest.raises(ValueError, match=rf"^{field} is an empty string.*current folder"):
        _config(**{field: value})


@pytest.mark.parametrize("field", PATH_FIELDS)
def test_an_empty_folder_field_in_a_file_is_refused(field, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "sae: {architecture: topk, d_in: 16, d_sae: 64, k: 4}\n"
        f'dataset_path: docs.txt\ntraining_tokens: 100000\n{field}: ""\n'
    )
    with pytest.raises(ValueError, match=rf"{field} is an empty string"):
        LanguageModelSAERunnerConfig.from_file(cfg)


def test_unset_and_real_folders_are_accepted():
    cfg = _config(output_path=None, checkpoint_path=None, cached_activations_path=None)
    assert cfg.output_path is None and cfg.checkpoint_path is None
    cfg = _config(output_path=".", checkpoint_path="ckpt", cached_activations_path="acts")
    assert cfg.output_path == "." and cfg.cached_activations_path == "acts"
