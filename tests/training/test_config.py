"""LanguageModelSAERunnerConfig (nested and flat forms, validation, YAML/JSON) and
fastsae.training.optim (LR schedules and coefficient warm-up equal to sae-lens's)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from sae_lens.training.optim import CoefficientScheduler as SLCoefficientScheduler
from sae_lens.training.optim import get_lr_scheduler as sl_get_lr_scheduler

from fastsae.training import (
    BatchTopKTrainingSAEConfig,
    GatedTrainingSAEConfig,
    JumpReLUTrainingSAEConfig,
    LanguageModelSAERunnerConfig,
    LoggingConfig,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardTrainingSAEConfig,
    TopKTrainingSAEConfig,
)
from fastsae.training.optim import CoefficientScheduler, get_lr_scheduler

pytestmark = pytest.mark.filterwarnings("ignore:.*SAELens < 6 option.*:DeprecationWarning")

try:
    import wandb  # noqa: F401

    HAVE_WANDB = True
except ImportError:  # pragma: no cover - wandb is a dev dependency here
    HAVE_WANDB = False


def _tutorial2_kwargs() -> dict:
    """SAELens's Tutorial 2 (training an SAE) config, in the flat SAELens < 6 form, verbatim."""
    return dict(
        # Model
        model_name="gpt2-small",
        hook_name="blocks.6.hook_resid_pre",
        hook_layer=6,
        d_in=768,
        # SAE architecture
        architecture="standard",
        d_sae=768 * 8,  # 8x expansion
        activation_fn="relu",
        # Training
        lr=4e-4,
        l1_coefficient=8e-5,
        l1_warm_up_steps=1000,
        train_batch_size_tokens=4096,
        training_tokens=10_000_000,  # Small run for demo
        # Data
        dataset_path="monology/pile-uncopyrighted",
        streaming=True,
        context_size=128,
        # Dead feature prevention
        use_ghost_grads=True,
        dead_feature_window=5000,
        # Logging
        log_to_wandb=HAVE_WANDB,
        wandb_project="sae-training-demo",
        # Hardware
        device="cuda",
        dtype="float32",
    )


def _api_md_kwargs() -> dict:
    """The "Example Configuration" of SAELens's API reference, verbatim."""
    return dict(
        # Model and hook
        model_name="gpt2-small",
        hook_name="blocks.8.hook_resid_pre",
        hook_layer=8,
        d_in=768,
        # SAE architecture
        architecture="standard",  # "standard", "gated", "jumprelu", "topk"
        d_sae=768 * 8,  # Expansion factor
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
        log_to_wandb=HAVE_WANDB,
        wandb_project="sae-training",
        wandb_log_frequency=100,
        # Checkpointing
        checkpoint_path="checkpoints",
        n_checkpoints=5,
        # Hardware
        device="cuda",
        dtype="float32",
    )


def _nested(**kwargs) -> LanguageModelSAERunnerConfig:
    kwargs.setdefault("sae", TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4))
    kwargs.setdefault("dataset_path", "unused")
    kwargs.setdefault("training_tokens", 10_000)
    kwargs.setdefault("train_batch_size_tokens", 100)
    return LanguageModelSAERunnerConfig(**kwargs)


# ---------------------------------------------------------------------------- nested form
def test_nested_form():
    sae = TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4)
    cfg = _nested(sae=sae, hook_name="blocks.3.hook_resid_post", lr=1e-3)
    assert cfg.sae is sae
    assert cfg.hook_name == "blocks.3.hook_resid_post"
    assert cfg.total_training_steps == 100
    assert cfg.total_training_tokens == 10_000
    assert cfg.d_in == 16
    assert cfg.lr_end == pytest.approx(1e-4)  # lr / 10 by default
    assert cfg.llm_device == cfg.device == "cpu" and cfg.act_store_device == "cpu"
    assert cfg.logger.run_name.startswith("topk-64-LR-0.001")
    # flat reads of SAE and logger fields
    assert cfg.k == 4 and cfg.log_to_wandb is False and cfg.wandb_log_frequency == 10
    with pytest.raises(AttributeError, match="no_such_field"):
        _ = cfg.no_such_field


def test_nested_form_with_an_sae_dict_and_a_logger():
    cfg = _nested(
        sae={"architecture": "jumprelu", "d_in": 16, "d_sae": 48, "l0_coefficient": 2.0},
        logger=LoggingConfig(wandb_log_frequency=5, run_name="mine"),
        dtype="float64",
    )
    assert isinstance(cfg.sae, JumpReLUTrainingSAEConfig)
    assert cfg.sae.l0_coefficient == 2.0 and cfg.sae.d_sae == 48
    assert cfg.sae.dtype == "float64"  # runner dtype reaches an SAE given as a dict
    assert cfg.logger.wandb_log_frequency == 5 and cfg.logger.run_name == "mine"
    with pytest.raises(TypeError, match="training SAE config"):
        _nested(sae=object())


# ---------------------------------------------------------------------------- flat forms
def test_tutorial2_flat_form():
    with pytest.warns(DeprecationWarning, match="hook_layer"):
        cfg = LanguageModelSAERunnerConfig(**_tutorial2_kwargs())
    assert type(cfg.sae) is StandardTrainingSAEConfig
    assert cfg.sae.d_in == 768 and cfg.sae.d_sae == 6144
    assert cfg.sae.l1_coefficient == 8e-5 and cfg.l1_coefficient == 8e-5
    assert cfg.sae.l1_warm_up_steps == 1000 and cfg.l1_warm_up_steps == 1000
    assert cfg.sae.use_ghost_grads is True and cfg.use_ghost_grads is True
    assert cfg.sae.device == "cuda" and cfg.sae.dtype == "float32"
    assert cfg.model_name == "gpt2-small" and cfg.hook_name == "blocks.6.hook_resid_pre"
    assert cfg.dataset_path == "monology/pile-uncopyrighted"
    assert cfg.dead_feature_window == 5000 and cfg.lr == 4e-4
    assert cfg.log_to_wandb is HAVE_WANDB and cfg.logger.log_to_wandb is HAVE_WANDB
    assert cfg.wandb_project == "sae-training-demo" == cfg.logger.wandb_project
    assert cfg.total_training_steps == 10_000_000 // 4096


def test_api_md_flat_form():
    with pytest.warns(DeprecationWarning, match="hook_layer"):
        cfg = LanguageModelSAERunnerConfig(**_api_md_kwargs())
    assert type(cfg.sae) is StandardTrainingSAEConfig
    assert cfg.sae.d_sae == 6144 and cfg.sae.lp_norm == 1.0
    assert cfg.lr_scheduler_name == "constant" and cfg.lr_warm_up_steps == 500
    assert cfg.feature_sampling_window == 1000 and cfg.dead_feature_threshold == 1e-8
    assert cfg.store_batch_size_prompts == 16 and cfg.n_batches_in_buffer == 64
    assert cfg.logger.wandb_log_frequency == 100 and cfg.wandb_log_frequency == 100
    assert cfg.checkpoint_path == "checkpoints" and cfg.n_checkpoints == 5
    assert cfg.logger.wandb_project == "sae-training"


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed")
def test_log_to_wandb_is_accepted_when_wandb_is_installed():
    cfg = _nested(log_to_wandb=True)
    assert cfg.logger.log_to_wandb is True


def test_flat_topk_with_expansion_factor_and_activation_fn_kwargs():
    cfg = LanguageModelSAERunnerConfig(
        architecture="topk",
        activation_fn="topk",
        activation_fn_kwargs={"k": 50},
        d_in=768,
        expansion_factor=16,
        dataset_path="unused",
    )
    assert type(cfg.sae) is TopKTrainingSAEConfig
    assert cfg.sae.d_sae == 768 * 16 and cfg.sae.k == 50 and cfg.k == 50


def test_flat_defaults_and_legacy_spellings():
    # activation_fn="topk" alone picks the TopK architecture; expansion_factor defaults to 4
    cfg = LanguageModelSAERunnerConfig(
        activation_fn="topk", activation_fn_kwargs={"k": 3}, d_in=10, dataset_path="x"
    )
    assert type(cfg.sae) is TopKTrainingSAEConfig and cfg.sae.d_sae == 40
    # no architecture at all: standard
    cfg = LanguageModelSAERunnerConfig(d_in=10, d_sae=30, dataset_path="x")
    assert type(cfg.sae) is StandardTrainingSAEConfig
    # boolean normalize_activations of SAELens < 6
    cfg = LanguageModelSAERunnerConfig(
        d_in=10, d_sae=30, dataset_path="x", normalize_activations=True
    )
    assert cfg.sae.normalize_activations == "expected_average_only_in"
    # other architectures
    for arch, cls, extra in (
        ("gated", GatedTrainingSAEConfig, {}),
        ("jumprelu", JumpReLUTrainingSAEConfig, {"l0_coefficient": 3.0}),
        ("batchtopk", BatchTopKTrainingSAEConfig, {"activation_fn_kwargs": {"k": 2.5}}),
        (
            "matryoshka_batchtopk",
            MatryoshkaBatchTopKTrainingSAEConfig,
            {"k": 2.5, "matryoshka_widths": [5, 20, 40]},
        ),
    ):
        cfg = LanguageModelSAERunnerConfig(
            architecture=arch, d_in=10, expansion_factor=4, dataset_path="x", **extra
        )
        assert type(cfg.sae) is cls and cfg.sae.d_sae == 40, arch
    assert cfg.sae.matryoshka_widths == [5, 20, 40] and cfg.sae.k == 2.5


@pytest.mark.parametrize(
    "key,value",
    [
        ("hook_layer", 6),
        ("b_dec_init_method", "zeros"),
        ("normalize_sae_decoder", False),
        ("scale_sparsity_penalty_by_decoder_norm", True),
        ("mse_loss_normalization", None),
    ],
)
def test_legacy_keys_warn_deprecation(key, value):
    with pytest.warns(DeprecationWarning, match=key):
        LanguageModelSAERunnerConfig(d_in=10, d_sae=30, dataset_path="x", **{key: value})
    with pytest.warns(DeprecationWarning, match=key):
        _nested(**{key: value})


def test_flat_form_errors():
    with pytest.raises(ValueError, match="d_in"):
        LanguageModelSAERunnerConfig(architecture="topk", d_sae=30, dataset_path="x")
    with pytest.raises(ValueError, match="disagree"):
        LanguageModelSAERunnerConfig(d_in=10, d_sae=30, expansion_factor=4, dataset_path="x")
    with pytest.raises(ValueError, match="expansion_factor"):
        LanguageModelSAERunnerConfig(d_in=10, expansion_factor=0, dataset_path="x")
    with pytest.raises(ValueError, match="use_ghost_grads"):
        LanguageModelSAERunnerConfig(
            architecture="topk", d_in=10, use_ghost_grads=True, dataset_path="x"
        )
    with pytest.raises(ValueError, match="activation_fn"):
        LanguageModelSAERunnerConfig(d_in=10, activation_fn="gelu", dataset_path="x")
    with pytest.raises(ValueError, match="activation_fn"):
        LanguageModelSAERunnerConfig(
            architecture="gated", activation_fn="topk", d_in=10, dataset_path="x"
        )
    with pytest.raises(ValueError, match="unknown training architecture"):
        LanguageModelSAERunnerConfig(architecture="nope", d_in=10, dataset_path="x")
    # use_ghost_grads=False is harmless on any architecture
    cfg = LanguageModelSAERunnerConfig(
        architecture="topk", k=3, d_in=10, use_ghost_grads=False, dataset_path="x"
    )
    assert type(cfg.sae) is TopKTrainingSAEConfig


def test_unknown_fields_are_named_with_a_suggestion():
    with pytest.raises(ValueError, match=r"l1_coefficent.*did you mean 'l1_coefficient'"):
        LanguageModelSAERunnerConfig(d_in=10, l1_coefficent=1.0, dataset_path="x")
    with pytest.raises(ValueError, match=r"trainig_tokens.*did you mean 'training_tokens'"):
        LanguageModelSAERunnerConfig(d_in=10, trainig_tokens=10, dataset_path="x")
    with pytest.raises(ValueError, match=r"trainig_tokens.*did you mean 'training_tokens'"):
        _nested(trainig_tokens=10)
    with pytest.raises(ValueError, match="completely_unknown"):
        _nested(completely_unknown=1)


def test_sae_lens_runner_config_dict_loads():
    """A SAELens 6.x runner config (its own to_dict) is a valid fastsae config."""
    from sae_lens import LanguageModelSAERunnerConfig as SLRunnerConfig
    from sae_lens import LoggingConfig as SLLoggingConfig
    from sae_lens import TopKTrainingSAEConfig as SLTopKConfig

    theirs = SLRunnerConfig(
        sae=SLTopKConfig(d_in=16, d_sae=64, k=4),
        dataset_path="unused",
        training_tokens=10_000,
        train_batch_size_tokens=100,
        logger=SLLoggingConfig(log_to_wandb=False),
    )
    data = json.loads(json.dumps(theirs.to_dict(), default=str))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ours = LanguageModelSAERunnerConfig.from_dict(data)
    assert type(ours.sae) is TopKTrainingSAEConfig and ours.sae.k == 4
    assert ours.training_tokens == 10_000


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"train_batch_size_tokens": 0}, "train_batch_size_tokens"),
        ({"training_tokens": 0}, "training_tokens"),
        ({"context_size": -1}, "context_size"),
        ({"dead_feature_window": 0}, "dead_feature_window"),
        ({"lr_scheduler_name": "linear"}, "lr_scheduler_name"),
        ({"lr_warm_up_steps": 60, "lr_decay_steps": 50}, "lr_warm_up_steps"),
        ({"lr_warm_up_steps": -1}, "lr_warm_up_steps"),
        ({"lr_decay_steps": 10, "lr_end": 0.0}, "lr_end"),
        ({"n_checkpoints": -1}, "n_checkpoints"),
        ({"adam_beta1": 1.0}, "adam_beta1"),
        ({"adam_beta2": -0.1}, "adam_beta2"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"dataset_path": ""}, "dataset_path"),
        ({"use_cached_activations": True}, "cached_activations_path"),
        ({"dtype": "float13"}, "float13"),
        ({"seqpos_slice": (1, 2, 3, 4)}, "seqpos_slice"),
        ({"wandb_log_frequency": 0}, "wandb_log_frequency"),
        ({"eval_every_n_wandb_logs": 0}, "eval_every_n_wandb_logs"),
    ],
)
def test_out_of_range_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        _nested(**kwargs)


def test_valid_edges():
    # warm-up + decay exactly the run's length is fine; lr_end given explicitly is kept
    cfg = _nested(lr_warm_up_steps=50, lr_decay_steps=50, lr_end=1e-6)
    assert cfg.lr_end == 1e-6
    assert _nested(lr_scheduler_name="CosineAnnealing").lr_scheduler_name == "CosineAnnealing"
    assert _nested(max_grad_norm=None).max_grad_norm is None
    cfg = _nested(dataset_path="", use_cached_activations=True, cached_activations_path="c")
    assert cfg.use_cached_activations


# ---------------------------------------------------------------------------- YAML / JSON
@pytest.mark.parametrize(
    "sae",
    [
        TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4, rescale_acts_by_decoder_norm=False),
        JumpReLUTrainingSAEConfig(
            d_in=16,
            d_sae=64,
            jumprelu_sparsity_loss_mode="quadratic",
            target_l0=5.0,
            pre_act_loss_coefficient=3e-6,
        ),
        MatryoshkaBatchTopKTrainingSAEConfig(d_in=16, d_sae=64, k=2.5, matryoshka_widths=[8, 64]),
        StandardTrainingSAEConfig(d_in=16, d_sae=64, use_ghost_grads=True, lp_norm=2.0),
    ],
    ids=lambda s: s.architecture(),
)
def test_yaml_and_json_round_trips(sae, tmp_path):
    cfg = _nested(
        sae=sae,
        seqpos_slice=(1, None),
        exclude_special_tokens=[0, 2],
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=10,
        lr_decay_steps=5,
        log_to_wandb=HAVE_WANDB,
        wandb_project="p",
        model_kwargs={"a": 1},
    )
    cfg.to_yaml(tmp_path / "sub" / "cfg.yaml")
    cfg.to_json(tmp_path / "cfg.json")
    for loaded in (
        LanguageModelSAERunnerConfig.from_yaml(tmp_path / "sub" / "cfg.yaml"),
        LanguageModelSAERunnerConfig.from_json(tmp_path / "cfg.json"),
        LanguageModelSAERunnerConfig.from_file(tmp_path / "cfg.json"),
    ):
        assert loaded == cfg
        assert loaded.to_dict() == cfg.to_dict()
        assert type(loaded.sae) is type(sae)
        assert loaded.seqpos_slice == (1, None)
    assert json.loads((tmp_path / "cfg.json").read_text())["sae"]["architecture"] == (
        sae.architecture()
    )
    assert not list(tmp_path.glob("**/.*tmp"))  # atomic writes leave nothing behind


def test_flat_yaml_file_loads(tmp_path):
    path = tmp_path / "flat.yml"
    path.write_text(
        "\n".join(
            [
                "model_name: gpt2-small",
                "hook_name: blocks.6.hook_resid_pre",
                "d_in: 768",
                "architecture: topk",
                "expansion_factor: 8",
                "activation_fn_kwargs:",
                "  k: 32",
                "lr: 0.0004",
                "train_batch_size_tokens: 4096",
                "training_tokens: 1000000",
                "dataset_path: monology/pile-uncopyrighted",
                "log_to_wandb: false",
                "wandb_log_frequency: 20",
                "seqpos_slice: [1, null]",
            ]
        )
    )
    cfg = LanguageModelSAERunnerConfig.from_file(path)
    assert type(cfg.sae) is TopKTrainingSAEConfig
    assert cfg.sae.d_sae == 768 * 8 and cfg.sae.k == 32 and cfg.lr == 4e-4
    assert cfg.logger.wandb_log_frequency == 20 and cfg.seqpos_slice == (1, None)


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sae: [unclosed\n  - : :")
    with pytest.raises(ValueError, match="bad.yaml"):
        LanguageModelSAERunnerConfig.from_yaml(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match=r"list\.yaml.*mapping"):
        LanguageModelSAERunnerConfig.from_yaml(listing)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        LanguageModelSAERunnerConfig.from_json(bad_json)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        LanguageModelSAERunnerConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="cfg.toml"):
        LanguageModelSAERunnerConfig.from_file(tmp_path / "cfg.toml")
    with pytest.raises(TypeError, match="mapping"):
        LanguageModelSAERunnerConfig.from_dict(["not", "a", "dict"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- LR schedules
def _lrs(make, steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([param], lr=LR)
    scheduler = make(opt)
    lrs = [opt.param_groups[0]["lr"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # SequentialLR / epoch deprecation notes
        for _ in range(steps):
            opt.step()
            scheduler.step()
            lrs.append(opt.param_groups[0]["lr"])
    return lrs


LR, TOTAL = 3e-4, 60


@pytest.mark.parametrize("name", ["constant", "cosineannealing", "cosineannealingwarmrestarts"])
@pytest.mark.parametrize(
    "warm_up,decay,lr_end,cycles",
    [(0, 0, 3e-5, 1), (7, 0, 3e-5, 1), (0, 9, 3e-5, 1), (7, 9, 1e-5, 3), (1, 1, 3e-5, 2)],
    ids=["plain", "warmup", "decay", "warmup-decay-3cycles", "1-1"],
)
def test_lr_schedule_equals_sae_lens(name, warm_up, decay, lr_end, cycles):
    kwargs = dict(
        scheduler_name=name,
        training_steps=TOTAL,
        lr=LR,
        warm_up_steps=warm_up,
        decay_steps=decay,
        lr_end=lr_end,
        num_cycles=cycles,
    )
    ours = _lrs(lambda opt: get_lr_scheduler(optimizer=opt, **kwargs), TOTAL + 3)
    theirs = _lrs(lambda opt: sl_get_lr_scheduler(optimizer=opt, **kwargs), TOTAL + 3)
    assert len(set(theirs)) > 1 or name == "constant"
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15), (step, a, b)


def test_lr_schedule_state_dict_resumes():
    kwargs = dict(
        scheduler_name="cosineannealing",
        training_steps=TOTAL,
        lr=LR,
        warm_up_steps=5,
        decay_steps=5,
        lr_end=3e-5,
        num_cycles=1,
    )
    full = _lrs(lambda opt: get_lr_scheduler(optimizer=opt, **kwargs), TOTAL)
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([param], lr=LR)
    first = get_lr_scheduler(optimizer=opt, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(20):
            opt.step()
            first.step()
        # the order SAETrainer uses: build both, then load both
        opt2 = torch.optim.Adam([param], lr=LR)
        second = get_lr_scheduler(optimizer=opt2, **kwargs)
        opt2.load_state_dict(opt.state_dict())
        second.load_state_dict(first.state_dict())
        resumed = []
        for _ in range(TOTAL - 20):
            opt2.step()
            second.step()
            resumed.append(opt2.param_groups[0]["lr"])
    assert resumed == pytest.approx(full[21:], rel=1e-12)


def test_lr_schedule_errors():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    with pytest.raises(ValueError, match="linear"):
        get_lr_scheduler("linear", opt, 10, LR, 0, 0, 0.0, 1)
    with pytest.raises(ValueError, match="lr_end"):
        get_lr_scheduler("cosineannealing", opt, 10, LR, 0, 2, 0.0, 1)


# ---------------------------------------------------------------------------- coefficients
@pytest.mark.parametrize("warm_up,final", [(0, 2.5), (1, 0.7), (5, 3.0), (7, 4)])
def test_coefficient_scheduler_equals_sae_lens(warm_up, final):
    ours, theirs = CoefficientScheduler(warm_up, final), SLCoefficientScheduler(warm_up, final)
    assert ours.value == theirs.value
    for _ in range(warm_up + 4):
        assert ours.step() == pytest.approx(theirs.step(), rel=1e-15)
        assert ours.value == pytest.approx(theirs.value, rel=1e-15)
    assert ours.value == final
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("at", [0, 1, 3, 6, 9])
def test_coefficient_scheduler_state_dict_round_trip(at):
    warm_up, final = 6, 1.5
    ours, theirs = CoefficientScheduler(warm_up, final), SLCoefficientScheduler(warm_up, final)
    for _ in range(at):
        ours.step()
        theirs.step()
    ours2, theirs2 = CoefficientScheduler(warm_up, final), SLCoefficientScheduler(warm_up, final)
    # each library's state loads in the other
    ours2.load_state_dict(theirs.state_dict())
    theirs2.load_state_dict(ours.state_dict())
    assert ours.state_dict() == theirs.state_dict()
    assert ours2.value == pytest.approx(theirs2.value, rel=1e-15)
    assert ours2.value == ours.value
    for _ in range(warm_up + 2):
        assert ours2.step() == pytest.approx(theirs2.step(), rel=1e-15)
        assert ours.step() == ours2.value


def test_coefficient_scheduler_rejects_non_numbers():
    with pytest.raises(TypeError, match="final_value"):
        CoefficientScheduler(3, "1.0")  # type: ignore[arg-type]
