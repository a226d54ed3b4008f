"""Drop-in details user code of SAELens 6.x relies on: ``SAE[Config]`` /
``TrainingSAE[Config]`` annotations, the versions in the metadata, ``decode`` of
``torch.sparse`` COO activations of any rank, and the public callables
``activation_fn`` and ``run_time_activation_norm_fn_in`` / ``_out``."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import io
import json
import pickle
import sys
import typing

import pytest
import sae_lens
import torch
from sae_cases import (
    D_IN,
    D_SAE,
    TRANSCODERS,
    K,
    _make_pair,
    assert_close,
    make_input,
    make_pair,
)
from sae_lens.saes.sae import SAEMetadata as SLMetadata
from sae_lens.saes.topk_sae import TopK as SLTopK

import fastsae
from fastsae import SAE, StandardSAE, StandardSAEConfig, TopKSAEConfig, TrainingSAE
from fastsae.saes import SAE_CLASSES, TopKTrainingSAEConfig
from fastsae.saes.base import T_SAE_CONFIG
from fastsae.saes.config import SAE_LENS_FORMAT_VERSION, SAEConfig, SAEMetadata
from fastsae.saes.registry import sae_class_for_architecture, training_sae_class_for_architecture
from fastsae.saes.training_sae import T_TRAINING_SAE_CONFIG, TrainingSAEConfig

pytestmark = [
    # sae-lens's TopK builds COO tensors without the invariant checks opted in or out
    pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning"),
]

SPARSE_ARCHS = ["standard", "jumprelu", "gated", "topk", "abstopk", "transcoder"]


# --------------------------------------------------------------------------- generics
def test_sae_and_training_sae_subscript_like_sae_lens():
    for alias, origin, arg in (
        (SAE[StandardSAEConfig], SAE, StandardSAEConfig),
        (SAE[TopKSAEConfig], SAE, TopKSAEConfig),
        (TrainingSAE[TopKTrainingSAEConfig], TrainingSAE, TopKTrainingSAEConfig),
    ):
        assert typing.get_origin(alias) is origin
        assert typing.get_args(alias) == (arg,)
    assert SAE.__parameters__ == (T_SAE_CONFIG,)
    assert TrainingSAE.__parameters__ == (T_TRAINING_SAE_CONFIG,)
    assert T_SAE_CONFIG.__bound__ is SAEConfig
    assert T_TRAINING_SAE_CONFIG.__bound__ is TrainingSAEConfig
    # SAELens exports the TypeVars from neither its top level nor sae_lens.saes
    for name in ("T_SAE_CONFIG", "T_TRAINING_SAE_CONFIG", "T_SAE", "T_TRAINING_SAE"):
        assert not hasattr(sae_lens, name) and not hasattr(sae_lens.saes, name)
        assert not hasattr(fastsae, name) and not hasattr(fastsae.saes, name)


_ANNOTATED_MODULE = """
# no `from __future__ import annotations`: every annotation is evaluated at import
from {pkg} import SAE, StandardSAEConfig, TopKSAE, TopKSAEConfig, TrainingSAE
from {pkg} import TopKTrainingSAEConfig


def load(path: str) -> SAE[StandardSAEConfig]:
    return SAE.load_from_disk(path)


def topk_only(sae: SAE[TopKSAEConfig]) -> TopKSAE:
    return sae


class MyTopKSAE(TopKSAE):
    cfg: TopKSAEConfig

    def me(self) -> SAE[TopKSAEConfig]:
        return self


def trainer_input(sae: TrainingSAE[TopKTrainingSAEConfig]) -> TrainingSAE[TopKTrainingSAEConfig]:
    return sae
"""


@pytest.mark.parametrize("pkg", ["fastsae", "sae_lens"])
def test_module_without_future_annotations_imports(pkg, tmp_path):
    path = tmp_path / f"annotated_{pkg}.py"
    path.write_text(_ANNOTATED_MODULE.format(pkg=pkg))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # get_type_hints resolves names through it
    try:
        spec.loader.exec_module(module)
        hints = typing.get_type_hints(module.trainer_input)
        assert typing.get_origin(hints["sae"]) is module.TrainingSAE
        assert typing.get_type_hints(module.load)["return"] == module.SAE[module.StandardSAEConfig]
        sae = module.MyTopKSAE(module.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
        assert sae.me() is sae and module.topk_only(sae) is sae
        assert isinstance(sae, module.SAE) and isinstance(sae, module.TopKSAE)
    finally:
        del sys.modules[path.stem]


def test_generic_base_keeps_module_behaviour(tmp_path):
    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    assert type(sae) is StandardSAE and isinstance(sae, SAE)
    assert sae_class_for_architecture("standard") is StandardSAE
    assert training_sae_class_for_architecture("topk").__name__ == "TopKTrainingSAE"
    assert list(sae.hook_dict) == [
        "hook_sae_input",
        "hook_sae_acts_pre",
        "hook_sae_acts_post",
        "hook_sae_output",
        "hook_sae_recons",
        "hook_sae_error",
    ]
    assert sorted(sae.state_dict()) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    x = make_input((7, D_IN))
    buf = io.BytesIO()
    torch.save(sae, buf)
    buf.seek(0)
    for clone in (
        pickle.loads(pickle.dumps(sae)),
        copy.deepcopy(sae),
        torch.load(buf, weights_only=False),
    ):
        assert type(clone) is StandardSAE
        assert torch.equal(clone(x), sae(x))
    # the alias builds the class itself, as typing's generics do
    built = SAE[StandardSAEConfig].from_dict(sae.cfg.to_dict())
    assert type(built) is StandardSAE
    sae.save_model(tmp_path)
    assert type(SAE[StandardSAEConfig].load_from_disk(tmp_path)) is StandardSAE


# --------------------------------------------------------------------------- versions
def test_metadata_versions_are_the_sae_lens_parity_target_and_fastsae():
    md = SAEMetadata()
    assert SAE_LENS_FORMAT_VERSION == sae_lens.__version__ == "6.54.12"
    theirs = SLMetadata()
    assert md.sae_lens_version == theirs.sae_lens_version == "6.54.12"
    assert md.sae_lens_training_version == theirs.sae_lens_training_version == "6.54.12"
    assert md.fastsae_version == fastsae.__version__
    assert list(md.keys())[:3] == [
        "sae_lens_version",
        "sae_lens_training_version",
        "fastsae_version",
    ]
    # values read from a file are kept
    old = SAEMetadata(
        sae_lens_version="6.0.0", sae_lens_training_version=None, fastsae_version="0.0.1"
    )
    assert (old.sae_lens_version, old.sae_lens_training_version, old.fastsae_version) == (
        "6.0.0",
        None,
        "0.0.1",
    )


def test_saved_cfg_json_carries_the_versions_and_loads_in_sae_lens(tmp_path):
    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    sae.save_model(tmp_path)
    md = json.loads((tmp_path / "cfg.json").read_text())["metadata"]
    assert md["sae_lens_version"] == md["sae_lens_training_version"] == "6.54.12"
    assert md["fastsae_version"] == fastsae.__version__
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert theirs.cfg.metadata.sae_lens_version == "6.54.12"
    x = make_input((7, D_IN))
    assert_close(sae(x), theirs(x))


def test_files_of_older_versions_read_as_before(tmp_path):
    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    sae.save_model(tmp_path)
    cfg_path = tmp_path / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    # a 6.0.0 file (what earlier fastsae wrote) stays 6.0.0 and takes the 6.x path
    cfg["metadata"].update(sae_lens_version="6.0.0", sae_lens_training_version="6.0.0")
    del cfg["metadata"]["fastsae_version"]
    cfg_path.write_text(json.dumps(cfg))
    loaded = SAE.load_from_disk(tmp_path)
    assert loaded.cfg.metadata.sae_lens_version == "6.0.0"
    assert loaded.cfg.metadata.sae_lens_training_version == "6.0.0"
    # a file with no version is a pre-6.0 config: its flat keys are rewritten
    flat = {k: v for k, v in cfg.items() if k not in ("metadata", "architecture")}
    flat.update(hook_point="blocks.3.hook_resid_pre", activation_fn_str="relu")
    cfg_path.write_text(json.dumps(flat))
    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is StandardSAE
    assert loaded.cfg.metadata.hook_name == "blocks.3.hook_resid_pre"
    assert loaded.cfg.metadata.sae_lens_version == SAE_LENS_FORMAT_VERSION
    assert loaded.cfg.metadata.sae_lens_training_version is None


# --------------------------------------------------------------------------- sparse decode
def test_decode_sparse_coo_batch_seq_matches_sae_lens_topk():
    """SAELens's TopK with use_sparse_activations=True gives [batch, seq, d_sae] COO."""
    ours, theirs = _make_pair("topk", {"k": 7, "use_sparse_activations": True})
    x = make_input((3, 5, ours.cfg.d_in))
    acts = theirs.encode(x)
    assert acts.layout == torch.sparse_coo and acts.ndim == 3
    expected = theirs.decode(acts)
    assert_close(ours.decode(acts), expected, what="training SAE")
    # the inference TopK SAE of the same weights (rescale_acts_by_decoder_norm on)
    inference = ours.to_inference_sae()
    assert_close(inference.decode(acts), expected, what="inference SAE")
    assert_close(ours.decode(acts.to_dense()), expected, what="dense")


@pytest.mark.parametrize("arch", SPARSE_ARCHS)
@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_decode_sparse_coo_of_any_rank_matches_sae_lens(arch, normalize):
    if arch in TRANSCODERS and normalize != "none":
        pytest.skip("transcoders do not normalise their output")
    ours, theirs = make_pair(
        arch, normalize_activations=normalize, rescale_acts_by_decoder_norm=True
    )
    x = make_input((3, 4, D_IN))
    acts = theirs.encode(x)
    expected = theirs.decode(acts)
    ours.encode(x)  # the normalisation statistics decode uses
    assert_close(ours.decode(acts.to_sparse()), expected, what="rank 3")
    assert_close(ours.decode(acts.to_sparse(sparse_dim=2)), expected, what="hybrid COO")
    if normalize != "none":
        return  # the statistics are those of the [3, 4] tokens
    for dense in (acts[0, 0], acts[0], acts.reshape(12, -1), acts[None]):
        sparse = dense.to_sparse()
        assert_close(ours.decode(sparse), theirs.decode(dense), what=f"rank {dense.ndim}")
        if arch in ("topk", "abstopk") and dense.ndim >= 2:  # sae-lens's sparse decode
            assert_close(ours.decode(sparse), theirs.decode(sparse), what=f"rank {dense.ndim}")
    empty = torch.sparse_coo_tensor(torch.zeros(3, 0, dtype=torch.long), torch.zeros(0), acts.shape)
    assert_close(ours.decode(empty), theirs.decode(empty.to_dense()), what="no active latent")


def test_decode_sparse_coo_gradients_match_dense():
    ours, _ = make_pair("topk", rescale_acts_by_decoder_norm=True)
    x = make_input((2, 3, D_IN))
    acts = SLTopK(K, use_sparse_activations=True)(x @ ours.W_enc.detach() + 1.0).coalesce()
    g = torch.randn(2, 3, D_IN)

    sparse = acts.detach().requires_grad_(True)
    (ours.decode(sparse) * g).sum().backward()
    grads_sparse = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
    ours.zero_grad()
    dense = acts.detach().to_dense().requires_grad_(True)
    (ours.decode(dense) * g).sum().backward()
    for name, grad in grads_sparse.items():
        assert_close(grad, ours.get_parameter(name).grad, what=f"{name}.grad")
    stored = torch.sparse_coo_tensor(acts.indices(), torch.ones(acts._nnz()), acts.shape)
    assert_close(sparse.grad.to_dense(), dense.grad * stored.to_dense(), what="acts.grad")


def test_decode_rejects_bad_sparse_input():
    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    with pytest.raises(ValueError, match="d_sae"):
        sae.decode(torch.zeros(2, 3, D_SAE + 1).to_sparse())
    with pytest.raises(TypeError, match="floating-point"):
        sae.decode(torch.zeros(2, 3, D_SAE, dtype=torch.long).to_sparse())


# --------------------------------------------------------------------------- public callables
def _activation_cases():
    cases = []
    for arch in sorted(SAE_CLASSES):
        cases.append(pytest.param("inference", arch, id=f"inference-{arch}"))
    training = ("standard", "gated", "jumprelu", "topk", "abstopk", "batchtopk",
                "matryoshka_batchtopk")  # fmt: skip
    for arch in training:
        cases.append(pytest.param("training", arch, id=f"training-{arch}"))
    return cases


@pytest.mark.parametrize("kind,arch", _activation_cases())
def test_activation_fn_is_sae_lens_activation(kind, arch):
    if kind == "inference":
        ours, theirs = make_pair(arch)
    else:
        kwargs = {"k": 4.0 if "batchtopk" in arch else 4} if "topk" in arch else {}
        if arch == "matryoshka_batchtopk":
            kwargs["matryoshka_widths"] = [20, 300]
        ours, theirs = _make_pair(arch, kwargs)
    assert callable(ours.activation_fn)
    assert type(ours.activation_fn).__name__ == type(theirs.activation_fn).__name__
    hidden_pre = torch.randn(6, ours.cfg.d_sae)
    assert_close(ours.activation_fn(hidden_pre), theirs.activation_fn(hidden_pre))
    assert ours.state_dict().keys() == theirs.state_dict().keys()  # it holds no state


@pytest.mark.parametrize(
    "normalize", ["none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"]
)
def test_run_time_activation_norm_fns_match_sae_lens(normalize):
    ours, theirs = make_pair("standard", normalize_activations=normalize)
    x = make_input((3, 4, D_IN))
    normed = ours.run_time_activation_norm_fn_in(x)
    assert_close(normed, theirs.run_time_activation_norm_fn_in(x), what="in")
    y = make_input((3, 4, D_IN), seed=5)
    assert_close(ours.run_time_activation_norm_fn_out(y), theirs.run_time_activation_norm_fn_out(y))
    # the statistics kept by _in are the ones the next decode uses, as in SAELens
    acts = torch.relu(make_input((3, 4, D_SAE), seed=6))
    theirs.run_time_activation_norm_fn_in(x)
    ours.run_time_activation_norm_fn_in(x)
    assert_close(ours.decode(acts), theirs.decode(acts), what="decode")
    # forward does not depend on them
    assert_close(ours(x), theirs(x), what="forward")


@pytest.mark.parametrize("shape", [(7, 30), (2, 3, 30)], ids=["2d", "3d"])
def test_topk_activation_sparse_output_matches_sae_lens(shape):
    from sae_lens.saes.topk_sae import TopK as TheirTopK

    from fastsae.saes.topk import TopK

    x = torch.randn(*shape)
    ours, theirs = TopK(4, use_sparse_activations=True)(x), TheirTopK(4, True)(x)
    assert ours.is_sparse and ours.shape == theirs.shape
    assert_close(ours.to_dense(), theirs.to_dense())


# --------------------------------------------------------------------------- public names
def _sae_lens_public_names() -> list[str]:
    return sorted(
        n
        for n in dir(sae_lens)
        if not n.startswith("_") and not isinstance(getattr(sae_lens, n), type(sae_lens))
    )


def test_every_sae_lens_top_level_name_is_in_fastsae():
    names = _sae_lens_public_names()
    assert len(names) >= 66  # sae-lens 6.54.12's public classes, functions and objects
    missing = [n for n in names if not hasattr(fastsae, n)]
    assert not missing, f"sae-lens names missing from fastsae: {missing}"
    assert set(names) <= set(fastsae.__all__)


def _signature(obj) -> inspect.Signature:
    return inspect.signature(obj.__init__ if isinstance(obj, type) else obj)


def _names(obj) -> list[str]:
    """What a caller can pass by name (a dataclass taking ``**kwargs`` takes its fields)."""
    params = _signature(obj).parameters.values()
    names = [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL,
             p.VAR_KEYWORD, p.POSITIONAL_ONLY)]  # fmt: skip
    if any(p.kind == p.VAR_KEYWORD for p in params) and dataclasses.is_dataclass(obj):
        names += [f.name for f in dataclasses.fields(obj) if f.init and f.name not in names]
    return names


def _positional(obj) -> list[str]:
    params = _signature(obj).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind == p.POSITIONAL_OR_KEYWORD]


@pytest.mark.parametrize("name", _sae_lens_public_names())
def test_public_name_is_the_same_kind_with_sae_lens_parameters(name):
    theirs, ours = getattr(sae_lens, name), getattr(fastsae, name)
    assert isinstance(ours, type) == isinstance(theirs, type), name
    assert callable(ours) == callable(theirs), name
    if not callable(theirs) or typing.get_origin(theirs) is not None:
        return
    if isinstance(theirs, type) and issubclass(theirs, typing.Protocol):  # loader protocols
        theirs, ours = theirs.__call__, ours.__call__
    try:
        expected = _names(theirs)
    except (TypeError, ValueError):  # a builtin without a signature
        return
    # every parameter a sae-lens caller can pass by name is accepted by name
    missing = [p for p in expected if p not in _names(ours)]
    assert not missing, f"{name}: fastsae lacks parameters {missing} (sae-lens: {expected})"
    # what fastsae takes positionally binds as in sae-lens (the rest is keyword-only here)
    ours_pos, theirs_pos = _positional(ours), _positional(theirs)
    shared = [p for p in ours_pos if p in theirs_pos]
    assert shared == theirs_pos[: len(shared)], (
        f"{name}: positional order {ours_pos} vs {theirs_pos}"
    )
