"""A runner config never silently drops or misreads what its user wrote, and refuses a
run that would train nothing before any model loads; an empty or unreadable dataset
file is an error that names it. All offline."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from datasets import Dataset, Features, Sequence, Value

from fastsae.cli import main
from fastsae.saes.config import SAEConfig
from fastsae.training import LanguageModelSAERunnerConfig, TopKTrainingSAEConfig
from fastsae.training.data.text_loading import load_text_dataset
from fastsae.training.data.token_rows import TokenRowSource

pytestmark = pytest.mark.filterwarnings("ignore:.*SAELens < 6 option.*:DeprecationWarning")

# every training architecture, with the fields it needs besides d_in / d_sae
ARCHS = {
    "standard": {},
    "gated": {},
    "jumprelu": {},
    "topk": {"k": 4},
    "batchtopk": {"k": 4.0},
    "matryoshka_batchtopk": {"k": 4.0, "matryoshka_widths": [16, 64]},
}


def _data(**overrides) -> dict:
    """A nested runner-config mapping (as YAML or JSON gives it), valid as is."""
    data = {
        "sae": {"architecture": "topk", "d_in": 16, "d_sae": 64, "k": 4},
        "dataset_path": "unused",
        "training_tokens": 10_000,
        "train_batch_size_tokens": 100,
    }
    for key, value in overrides.items():
        if key == "sae":
            data["sae"] = {**data["sae"], **value}
        else:
            data[key] = value
    return data


# ---------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize("arch", list(ARCHS))
def test_unknown_sae_key_is_an_error_with_a_suggestion_for_every_architecture(arch):
    sae = {"architecture": arch, "d_in": 16, "d_sae": 64, **ARCHS[arch]}
    cfg = LanguageModelSAERunnerConfig.from_dict({**_data(), "sae": sae})
    assert cfg.sae.architecture() == arch
    typo = {**sae, "normalise_activations": "expected_average_only_in"}
    with pytest.raises(ValueError, match=r"sae \(architecture .*normalise_activations.*"
                       r"did you mean 'normalize_activations'"):  # fmt: skip
        LanguageModelSAERunnerConfig.from_dict({**_data(), "sae": typo})


def test_topk_typo_under_sae_names_k(tmp_path):
    """``topk: 4`` (a typo of ``k``) is refused, not silently trained with the default
    k=100."""
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "sae:\n  architecture: topk\n  d_in: 16\n  d_sae: 256\n  topk: 4\n"
        "dataset_path: unused\ntraining_tokens: 10000\ntrain_batch_size_tokens: 100\n"
    )
    with pytest.raises(ValueError, match=r"unknown field \['topk'\]; 'topk' -> did you mean 'k'"):
        LanguageModelSAERunnerConfig.from_yaml(path)
    assert main(["train", str(path)]) == 2  # a clean CLI error, no traceback


def test_unknown_logger_key_is_an_error_with_a_suggestion():
    with pytest.raises(ValueError, match=r"logger: .*wandb_projet.*did you mean 'wandb_project'"):
        LanguageModelSAERunnerConfig.from_dict(_data(logger={"wandb_projet": "p"}))
    with pytest.raises(ValueError, match="logger must be a LoggingConfig or a mapping"):
        LanguageModelSAERunnerConfig.from_dict(_data(logger=["wandb"]))


def test_unknown_top_level_key_in_nested_form_suggests_a_logger_field():
    with pytest.raises(ValueError, match=r"wandb_log_frequncy.*did you mean 'wandb_log_frequency'"):
        LanguageModelSAERunnerConfig.from_dict(_data(wandb_log_frequncy=5))


def test_flat_form_unknown_key_inside_activation_fn_kwargs():
    with pytest.raises(ValueError, match=r"activation_fn_kwargs: unknown field \['kk'\].*"
                       r"did you mean 'k'"):  # fmt: skip
        LanguageModelSAERunnerConfig(
            architecture="topk", d_in=16, activation_fn_kwargs={"kk": 4}, dataset_path="x"
        )
    with pytest.raises(ValueError, match="activation_fn_kwargs must be a mapping"):
        LanguageModelSAERunnerConfig(
            architecture="topk", d_in=16, activation_fn_kwargs=[4], dataset_path="x"
        )
    with pytest.raises(ValueError, match=r"activation_fn_kwargs\.k must be an int"):
        LanguageModelSAERunnerConfig(
            architecture="topk", d_in=16, activation_fn_kwargs={"k": "4"}, dataset_path="x"
        )


def test_sae_metadata_stays_free_form():
    cfg = LanguageModelSAERunnerConfig.from_dict(
        _data(sae={"metadata": {"anything": 1, "training_architecture": "topk"}})
    )
    assert cfg.sae.metadata.anything == 1


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sae_lens_runner_config_of_every_architecture_loads(arch):
    """Strict keys still accept everything SAELens 6.x's own ``to_dict`` writes."""
    import sae_lens
    from sae_lens import LanguageModelSAERunnerConfig as SLRunnerConfig
    from sae_lens import LoggingConfig as SLLoggingConfig

    theirs_cls = {
        c.architecture(): c
        for c in vars(sae_lens).values()
        if isinstance(c, type) and c.__name__.endswith("TrainingSAEConfig") and c is not
        sae_lens.TrainingSAEConfig
    }[arch]  # fmt: skip
    theirs = SLRunnerConfig(
        sae=theirs_cls(d_in=16, d_sae=64, **ARCHS[arch]),
        dataset_path="unused",
        training_tokens=10_000,
        train_batch_size_tokens=100,
        logger=SLLoggingConfig(log_to_wandb=False),
    )
    data = json.loads(json.dumps(theirs.to_dict(), default=str))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ours = LanguageModelSAERunnerConfig.from_dict(data)
    assert ours.sae.architecture() == arch
    assert ours.sae.to_dict()["metadata"]["training_architecture"] == arch


def test_cfg_json_loading_keeps_tolerating_keys_of_other_versions():
    """Decision: a cfg.json is written by a program (any SAELens version), not typed by a
    user, so loading one ignores keys this version does not know, as SAELens does."""
    cfg = SAEConfig.from_dict(
        {"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 2, "some_future_key": 1}
    )
    assert cfg.k == 2


# ---------------------------------------------------------------------- missing / types
def test_missing_d_sae_under_sae_is_named():
    with pytest.raises(ValueError, match=r"sae: missing required field \['d_sae'\].*"
                       "expansion_factor"):  # fmt: skip
        LanguageModelSAERunnerConfig.from_dict(
            {**_data(), "sae": {"architecture": "topk", "d_in": 16, "k": 4}}
        )
    with pytest.raises(ValueError, match=r"sae: missing required field \['d_in'\]"):
        LanguageModelSAERunnerConfig.from_dict(
            {**_data(), "sae": {"architecture": "topk", "d_sae": 64, "k": 4}}
        )
    with pytest.raises(ValueError, match="sae must be a mapping of the SAE's fields"):
        LanguageModelSAERunnerConfig.from_dict({**_data(), "sae": "topk"})
    with pytest.raises(ValueError, match="no 'architecture' key"):
        LanguageModelSAERunnerConfig.from_dict({**_data(), "sae": {"d_in": 16, "d_sae": 64}})


def test_expansion_factor_under_sae_gives_d_sae():
    sae = {"architecture": "topk", "d_in": 16, "expansion_factor": 4, "k": 4}
    cfg = LanguageModelSAERunnerConfig.from_dict({**_data(), "sae": sae})
    assert cfg.sae.d_sae == 64
    with pytest.raises(ValueError, match=r"sae\.d_sae=32 and sae\.expansion_factor=4 disagree"):
        LanguageModelSAERunnerConfig.from_dict({**_data(), "sae": {**sae, "d_sae": 32}})


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"adam_beta1": "x"}, r"adam_beta1 must be a finite number, got 'x' \(str\)"),
        ({"lr": "1e-4"}, r"lr must be a finite number, got '1e-4'.*without quotes"),
        ({"lr": math.inf}, r"lr must be a finite number, got inf"),
        ({"training_tokens": 10_000.5}, r"training_tokens must be an int, got 10000.5"),
        ({"streaming": "no"}, r"streaming must be a bool, got 'no'"),
        ({"lr_scheduler_name": 3}, r"lr_scheduler_name must be a string, got 3"),
        ({"exclude_special_tokens": [1, "x"]}, r"exclude_special_tokens must be a bool or"),
        ({"sae": {"k": "4"}}, r"sae\.k must be an int, got '4'"),
        ({"sae": {"aux_loss_coefficient": "x"}}, r"sae\.aux_loss_coefficient must be a finite"),
        ({"sae": {"decoder_init_norm": "x"}}, r"sae\.decoder_init_norm must be a finite number"),
        ({"sae": {"rescale_acts_by_decoder_norm": "yes"}}, r"sae\.rescale_acts_by_decoder_norm"),
        ({"logger": {"log_to_wandb": "false"}}, r"logger\.log_to_wandb must be a bool"),
        ({"logger": {"wandb_log_frequency": 2.5}}, r"logger\.wandb_log_frequency must be an int"),
    ],
)
def test_wrong_types_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        LanguageModelSAERunnerConfig.from_dict(_data(**overrides))


@pytest.mark.parametrize(
    "arch,field,value",
    [
        ("standard", "l1_coefficient", "x"),
        ("standard", "use_ghost_grads", "true"),
        ("jumprelu", "l0_coefficient", "x"),
        ("jumprelu", "target_l0", "5"),
        ("gated", "l1_warm_up_steps", 1.5),
        ("batchtopk", "topk_threshold_lr", "x"),
        ("matryoshka_batchtopk", "matryoshka_widths", "16,64"),
    ],
)
def test_wrong_sae_field_types_are_named_for_every_architecture(arch, field, value):
    sae = {"architecture": arch, "d_in": 16, "d_sae": 64, **ARCHS[arch], field: value}
    with pytest.raises(ValueError, match=rf"sae\.{field} must be"):
        LanguageModelSAERunnerConfig.from_dict({**_data(), "sae": sae})


def test_wrong_types_set_on_an_sae_config_object_or_flat_are_named():
    sae = TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4)
    sae.use_sparse_activations = "no"  # a truthy string taken as True without the check
    with pytest.raises(ValueError, match=r"sae\.use_sparse_activations must be a bool"):
        LanguageModelSAERunnerConfig(
            sae=sae, dataset_path="x", training_tokens=10_000, train_batch_size_tokens=100
        )
    with pytest.raises(ValueError, match=r"^l1_coefficient must be a finite number, got 'x'"):
        LanguageModelSAERunnerConfig(d_in=16, l1_coefficient="x", dataset_path="x")
    with pytest.raises(ValueError, match=r"^logger\.log_to_wandb must be a bool"):
        LanguageModelSAERunnerConfig(d_in=16, log_to_wandb="no", dataset_path="x")


def test_yaml_exponent_numbers_are_floats(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-4`` as a string; configs write rates that way."""
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "sae: {architecture: standard, d_in: 16, d_sae: 64, l1_coefficient: 5e-5}\n"
        "lr: 1e-4\nlr_end: 1.0e5\ndead_feature_threshold: 1E-8\n"
        "dataset_path: unused\ntraining_tokens: 10000\ntrain_batch_size_tokens: 100\n"
        'run_id: "1e3"\n'
    )
    cfg = LanguageModelSAERunnerConfig.from_yaml(path)
    assert cfg.lr == 1e-4 and cfg.lr_end == 1e5 and cfg.dead_feature_threshold == 1e-8
    assert cfg.sae.l1_coefficient == 5e-5
    assert cfg.run_id == "1e3"  # a quoted one stays a string


# ---------------------------------------------------------------------- runs that train nothing
def test_training_tokens_below_one_batch_is_refused_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"training_tokens=100 is less than one batch "
                       r"\(train_batch_size_tokens=4096\)"):  # fmt: skip
        LanguageModelSAERunnerConfig.from_dict(
            _data(training_tokens=100, train_batch_size_tokens=4096)
        )
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "sae: {architecture: topk, d_in: 16, d_sae: 64, k: 4}\n"
        f"model_name: {tmp_path / 'no_such_model'}\nmodel_class_name: AutoModel\n"
        "dataset_path: unused\ntraining_tokens: 100\ntrain_batch_size_tokens: 4096\n"
    )
    assert main(["train", str(path)]) == 2  # the config's error, not the model's
    assert "training_tokens=100" in capsys.readouterr().err
    # exactly one batch is a run
    cfg = LanguageModelSAERunnerConfig.from_dict(
        _data(training_tokens=100, train_batch_size_tokens=100)
    )
    assert cfg.total_training_steps == 1


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"seqpos_slice": [200, None], "context_size": 128}, r"seqpos_slice=\(200, None\) keeps"
         " no position of context_size=128"),
        ({"seqpos_slice": [0, 8, 0]}, "seqpos_slice step must be positive"),
        ({"checkpoint_path": None, "n_checkpoints": 3}, "n_checkpoints=3 ask for checkpoints "
         "but checkpoint_path is None"),
        ({"checkpoint_path": None, "save_final_checkpoint": True}, "save_final_checkpoint=True"),
    ],
)  # fmt: skip
def test_settings_that_train_nothing_or_drop_outputs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        LanguageModelSAERunnerConfig.from_dict(_data(**overrides))


def test_buffer_check_is_skipped_for_cached_activations():
    cfg = LanguageModelSAERunnerConfig.from_dict(
        _data(
            n_batches_in_buffer=1,
            store_batch_size_prompts=1,
            context_size=16,
            use_cached_activations=True,
            cached_activations_path="c",
        )
    )
    assert cfg.use_cached_activations


# ---------------------------------------------------------------------- datasets
def _empty_parquet(path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    "name,content,message",
    [
        ("e.jsonl", "", r"is empty \(0 bytes\)"),
        ("e.txt", "", r"is empty \(0 bytes\)"),
        ("e.csv", "", r"is empty \(0 bytes\)"),
        ("blank.jsonl", "\n \n", r"is empty \(only whitespace\)"),
        ("e.parquet", None, "has no rows"),
        ("bad.jsonl", '{"text": "a"}\n{"text": ', "cannot read dataset file .*JSON"),
    ],
)
def test_empty_or_broken_dataset_file_is_named(tmp_path, streaming, name, content, message):
    path = tmp_path / name
    if content is None:
        _empty_parquet(path)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        load_text_dataset(path, streaming=streaming)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("streaming", [False, True])
def test_empty_dataset_folder_is_named(tmp_path, streaming):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"dataset folder '{tmp_path / 'empty'}' is empty"):
        load_text_dataset(tmp_path / "empty", streaming=streaming)
    (tmp_path / "zeros").mkdir()
    (tmp_path / "zeros" / "a.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"'.*zeros' holds only empty \(0-byte\) files"):
        load_text_dataset(tmp_path / "zeros", streaming=streaming)


def test_missing_local_dataset_path_is_named(tmp_path):
    for missing in (tmp_path / "nope", tmp_path / "nope.jsonl", tmp_path / "a" / "b"):
        with pytest.raises(FileNotFoundError, match=f"dataset path '{missing}' does not exist"):
            load_text_dataset(missing)


@pytest.mark.parametrize("mode", ["pack", "truncate"])
def test_a_dataset_that_gives_no_row_is_an_error_not_an_endless_loop(mode):
    """Documents with no tokens (or, truncating, all shorter than a row): without the
    check every pass returned no row and the store started new passes forever."""
    docs = [[]] * 5 if mode == "pack" else [[3, 4]] * 5
    features = Features({"tokens": Sequence(Value("int64"))})
    source = TokenRowSource(
        Dataset.from_dict({"tokens": docs}, features=features), "tokens", mode=mode,
        context_size=4, is_tokenized=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="a whole pass over the dataset .* gave no row"):
        source.next_row()


def test_a_pass_that_gives_rows_still_ends_with_none():
    source = TokenRowSource(
        Dataset.from_dict({"tokens": [[3, 4, 5, 6]] * 2}), "tokens", mode="rows",
        context_size=4, is_tokenized=True,
    )  # fmt: skip
    rows = [source.next_row() for _ in range(3)]
    assert rows[2] is None and source.epoch == 1
    assert torch.equal(source.next_row(), torch.tensor([3, 4, 5, 6]))  # the next pass


def test_path_objects_are_accepted_for_path_fields(tmp_path):
    cfg = LanguageModelSAERunnerConfig.from_dict(
        _data(output_path=tmp_path / "out", checkpoint_path=tmp_path / "ck")
    )
    assert cfg.output_path == tmp_path / "out"
