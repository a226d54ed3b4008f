"""CacheActivationsRunner writes sae-lens's activation cache: the same folder as
sae-lens's runner on a tiny model, read back by sae-lens's ActivationsStore; and fastsae's
CachedActivationsStore (and training runner) read a cache sae-lens wrote, the layout told
by the folder's files."""

from __future__ import annotations

import json
import warnings
from dataclasses import fields

import datasets
import numpy as np
import pytest
import torch
from tiny_runs import runner_config, tiny_model, token_rows_dataset

from fastsae.cache_activations_runner import CacheActivationsRunner, CacheActivationsRunnerConfig
from fastsae.training.data.cached_activations_store import (
    CachedActivationsStore,
    detect_cache_layout,
)

pytest.importorskip("sae_lens")
import sae_lens.cache_activations_runner as sl_runner_module  # noqa: E402
from sae_lens import CacheActivationsRunner as SLCacheActivationsRunner  # noqa: E402
from sae_lens import CacheActivationsRunnerConfig as SLCacheActivationsRunnerConfig  # noqa: E402
from sae_lens.training.activations_store import ActivationsStore as SLActivationsStore  # noqa: E402

HOOK = "blocks.0.hook_resid_post"
CTX = 8
# 2 model batches of 4 rows of 7 positions (seqpos_slice (1, None)) of 16 float32
BUFFER_GB = 64 * 32 * 2 / 1e9


@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return tiny_model(n_ctx=CTX)


@pytest.fixture(scope="module")
def rows():
    return token_rows_dataset(30, context_size=CTX, seed=3)


def config_kwargs(path, **kw):
    base = dict(
        dataset_path="unused", model_name="tiny", model_batch_size=4, hook_name=HOOK,
        d_in=16, training_tokens=100, context_size=CTX, new_cached_activations_path=str(path),
        buffer_size_gb=BUFFER_GB, device="cpu", prepend_bos=False, seqpos_slice=(1, None),
    )  # fmt: skip
    base.update(kw)
    return base


def run_sae_lens(model, rows, path, monkeypatch, **kw):
    monkeypatch.setattr(sl_runner_module, "load_model", lambda **_: model)
    cfg = SLCacheActivationsRunnerConfig(**config_kwargs(path, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SLCacheActivationsRunner(cfg, override_dataset=rows).run()


def run_ours(model, rows, path, **kw):
    cfg = CacheActivationsRunnerConfig(**config_kwargs(path, **kw))
    return CacheActivationsRunner(cfg, override_dataset=rows, override_model=model).run()


def without_fingerprint(path, name):
    data = json.loads((path / name).read_text())
    data.pop("_fingerprint", None)
    return data


@pytest.fixture(scope="module")
def sae_lens_cache(model, rows, tmp_path_factory):
    path = tmp_path_factory.mktemp("sl") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        returned = run_sae_lens(model, rows, path, mp)
    return path, returned


def test_same_folder_as_sae_lens(model, rows, sae_lens_cache, tmp_path):
    theirs_path, theirs_returned = sae_lens_cache
    ours_path = tmp_path / "cache"
    ours_returned = run_ours(model, rows, ours_path)
    arrow = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert sorted(p.name for p in ours_path.iterdir()) == sorted(
        [*arrow, "dataset_info.json", "state.json"]
    )
    for name in ("state.json", "dataset_info.json"):
        assert without_fingerprint(ours_path, name) == without_fingerprint(theirs_path, name)
    ours = datasets.load_from_disk(str(ours_path)).with_format("torch")
    theirs = datasets.load_from_disk(str(theirs_path)).with_format("torch")
    assert ours.features == theirs.features and len(ours) == len(theirs) == 16
    assert ours.features[HOOK].shape == (CTX - 1, 16)
    assert torch.equal(ours[:]["token_ids"], theirs[:]["token_ids"])
    torch.testing.assert_close(ours[:][HOOK], theirs[:][HOOK], rtol=0, atol=0)
    # rows 0..15 are the dataset's rows 0..15 (dataset order on disk)
    assert torch.equal(ours[:]["token_ids"], torch.as_tensor(rows[:16]["tokens"])[:, 1:].int())
    # the returned dataset is shuffled as sae-lens's (seed 42), and adds no file
    assert ours_returned[:]["token_ids"] == theirs_returned[:]["token_ids"]
    assert len(list(ours_path.iterdir())) == 4


def test_sae_lens_store_reads_our_cache(model, rows, tmp_path):
    path = tmp_path / "cache"
    run_ours(model, rows, path, seqpos_slice=(None,), shuffle=False, training_tokens=64,
             buffer_size_gb=64 * 32 * 1 / 1e9)  # fmt: skip
    sl_cfg = SLCacheActivationsRunnerConfig(
        **config_kwargs(path, seqpos_slice=(None,), training_tokens=64)
    )
    store = SLActivationsStore.from_cache_activations(model, sl_cfg)
    acts, token_ids = store.get_raw_llm_batch()
    tokens = torch.as_tensor(rows[:4]["tokens"])
    assert torch.equal(token_ids, tokens.reshape(-1).int())
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    torch.testing.assert_close(acts, cache[HOOK].reshape(-1, 16), rtol=1e-5, atol=1e-6)


def test_fastsae_store_reads_a_sae_lens_cache(sae_lens_cache):
    path, _ = sae_lens_cache
    assert detect_cache_layout(path) == "sae_lens"
    disk = datasets.load_from_disk(str(path)).with_format("torch")[:][HOOK].reshape(-1, 16)
    assert disk.shape == (16 * 7, 16)
    ordered = CachedActivationsStore(path, train_batch_size_tokens=10, shuffle=False)
    assert (ordered.layout, ordered.d_in, ordered.n_tokens, ordered.hook_name) == (
        "sae_lens", 16, 112, HOOK,
    )  # fmt: skip
    assert ordered.info["context_size"] == 7 and ordered.info["has_token_ids"]
    got = torch.cat([ordered.next_batch() for _ in range(12)])  # 120 rows: past one epoch
    torch.testing.assert_close(got[:112], disk, rtol=0, atol=0)
    torch.testing.assert_close(got[112:], disk[:8], rtol=0, atol=0)
    shuffled = CachedActivationsStore(path, train_batch_size_tokens=16, seed=1, hook_name=HOOK)
    epoch = torch.cat([shuffled.next_batch() for _ in range(7)])
    assert not torch.equal(epoch, disk)
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, disk.tolist()))
    # exact resume
    state = shuffled.state_dict()
    want = shuffled.next_batch()
    again = CachedActivationsStore(path, train_batch_size_tokens=16, seed=1)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(), want)


def test_fastsae_store_reads_small_virtual_shards(sae_lens_cache, monkeypatch):
    """Shards of a sae-lens cache are blocks of whole sequences; rows that cross a
    sequence's end come out in order."""
    import fastsae.training.data.cached_activations_store as mod

    path, _ = sae_lens_cache
    monkeypatch.setattr(mod, "_SAE_LENS_SHARD_BYTES", 3 * 7 * 16 * 4)  # 3 sequences
    store = CachedActivationsStore(path, train_batch_size_tokens=9, shuffle=False)
    assert store._rows == [21, 21, 21, 21, 21, 7]
    disk = datasets.load_from_disk(str(path)).with_format("torch")[:][HOOK].reshape(-1, 16)
    got = torch.cat([store.next_batch() for _ in range(13)])
    torch.testing.assert_close(got[:112], disk, rtol=0, atol=0)
    shuffled = CachedActivationsStore(path, train_batch_size_tokens=8, n_shards_in_buffer=2)
    epoch = torch.cat([shuffled.next_batch() for _ in range(14)])
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, disk.tolist()))


def test_fastsae_training_runner_trains_on_a_sae_lens_cache(sae_lens_cache, tmp_path):
    from fastsae.training.runner import SAETrainingRunner

    path, _ = sae_lens_cache
    cfg = runner_config(
        tmp_path, use_cached_activations=True, cached_activations_path=str(path),
        training_tokens=256, train_batch_size_tokens=32, n_checkpoints=0,
        hook_name="blocks.0.hook_resid_post",
    )  # fmt: skip
    runner = SAETrainingRunner(cfg, show_progress=False)
    assert runner.activations_store.layout == "sae_lens"
    sae = runner.run()
    assert sae.cfg.d_in == 16 and (tmp_path / "out" / "cfg.json").exists()
    # the runner reads the config's hook: a cache of another hook is refused, naming both
    other = runner_config(
        tmp_path, use_cached_activations=True, cached_activations_path=str(path),
        training_tokens=256, train_batch_size_tokens=32, n_checkpoints=0,
        hook_name="blocks.1.hook_resid_pre",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"no activations of hook 'blocks.1.hook_resid_pre'"):
        SAETrainingRunner(other, show_progress=False)


def test_layout_errors(sae_lens_cache, tmp_path):
    path, _ = sae_lens_cache
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"cache_info.json is missing.*nor a SAELens"):
        CachedActivationsStore(neither, train_batch_size_tokens=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_cache_layout(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"no activations of hook 'blocks.1.hook_resid_post'"):
        CachedActivationsStore(
            path, train_batch_size_tokens=8, hook_name="blocks.1.hook_resid_post"
        )
    two = tmp_path / "two_hooks"
    feats = datasets.Features(
        {h: datasets.Array2D(shape=(2, 3), dtype="float32") for h in ("a", "b")}
    )
    datasets.Dataset.from_dict(
        {"a": torch.zeros(2, 2, 3), "b": torch.ones(2, 2, 3)}, features=feats
    ).save_to_disk(str(two))
    with pytest.raises(ValueError, match=r"hooks \['a', 'b'\].*pass hook_name="):
        CachedActivationsStore(two, train_batch_size_tokens=4)
    picked = CachedActivationsStore(two, train_batch_size_tokens=4, shuffle=False, hook_name="b")
    assert torch.equal(picked.next_batch(), torch.ones(4, 3))
    tokens_only = tmp_path / "tokens_only"
    datasets.Dataset.from_dict({"input_ids": [[1, 2]]}).save_to_disk(str(tokens_only))
    with pytest.raises(ValueError, match="holds no activations column"):
        CachedActivationsStore(tokens_only, train_batch_size_tokens=4)


def test_config_matches_sae_lens(tmp_path):
    ours_fields = [(f.name, f.default) for f in fields(CacheActivationsRunnerConfig)]
    theirs_fields = [(f.name, f.default) for f in fields(SLCacheActivationsRunnerConfig)]
    assert ours_fields == theirs_fields
    for kw in (
        {}, {"seqpos_slice": (2, -1)}, {"training_tokens": 10_000, "buffer_size_gb": 1e-4},
        {"dtype": "float16", "model_batch_size": 3}, {"context_size": 5, "seqpos_slice": (None,)},
    ):  # fmt: skip
        ours = CacheActivationsRunnerConfig(**config_kwargs(tmp_path, **kw))
        theirs = SLCacheActivationsRunnerConfig(**config_kwargs(tmp_path, **kw))
        for prop in (
            "sliced_context_size", "bytes_per_token", "n_tokens_in_buffer", "n_tokens_in_batch",
            "n_batches_in_buffer", "n_seq_in_dataset", "n_seq_in_buffer", "n_buffers",
        ):  # fmt: skip
            assert getattr(ours, prop) == getattr(theirs, prop), (kw, prop)
    kw = config_kwargs(tmp_path, dataset_path="org/data", new_cached_activations_path=None)
    default = CacheActivationsRunnerConfig(**kw)
    assert default.new_cached_activations_path == f"activations/org_data/tiny/{HOOK}"


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"training_tokens": 4}, ValueError, r"context_size \(8\) is greater than training_tokens"),
        ({"seqpos_slice": (8, None)}, ValueError, "keeps no position"),
        ({"buffer_size_gb": 1e-9}, ValueError, "buffer_size_gb=1e-09 holds fewer"),
        ({"dtype": "bfloat16"}, ValueError, "no bfloat16"),
        ({"dtype": "float8"}, ValueError, "dtype"),
        ({"d_in": 0}, ValueError, "d_in must be a positive int"),
        ({"use_chat_formatting": True, "context_size": -1}, ValueError, "explicitly set"),
    ],
)
def test_config_errors(kw, error, match, tmp_path):
    with pytest.raises(error, match=match):
        CacheActivationsRunnerConfig(**config_kwargs(tmp_path, **kw))


def test_context_size_from_a_pretokenized_dataset(tmp_path):
    saved = tmp_path / "rows"
    datasets.Dataset.from_dict({"input_ids": [[1] * 12, [2] * 12]}).save_to_disk(str(saved))
    cfg = CacheActivationsRunnerConfig(
        **config_kwargs(tmp_path / "c", dataset_path=str(saved), context_size=-1)
    )
    assert cfg.context_size == 12
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "hello"}\n')
    with pytest.raises(ValueError, match="not tokenized.*specify context_size"):
        CacheActivationsRunnerConfig(**config_kwargs(tmp_path, dataset_path=str(text), context_size=-1))  # fmt: skip


def test_run_refuses_a_non_empty_folder_and_chat_formatting_without_a_tokenizer(
    model, rows, tmp_path
):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty"):
        run_ours(model, rows, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temporary folder
    cfg = CacheActivationsRunnerConfig(**config_kwargs(target, use_chat_formatting=True))
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template.*no tokenizer"):
        CacheActivationsRunner(cfg, override_dataset=rows, override_model=model)
    with pytest.raises(TypeError, match="CacheActivationsRunnerConfig"):
        CacheActivationsRunner(SLCacheActivationsRunnerConfig(**config_kwargs(target)))


def test_hub_push_goes_through_huggingface_hub(model, rows, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        datasets.Dataset, "push_to_hub", lambda self, **kw: calls.append(("push", len(self), kw))
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "upload_file",
        lambda self, **kw: calls.append(("upload", kw.pop("path_or_fileobj").read(), kw)),
    )
    run_ours(model, rows, tmp_path / "a", hf_repo_id="me/acts", hf_num_shards=3)
    (push, n, push_kw), (upload, meta, upload_kw) = calls
    assert push == "push" and n == 16
    assert push_kw == {"repo_id": "me/acts", "num_shards": 3, "private": False, "revision": "main"}
    assert upload == "upload" and json.loads(meta)["hook_name"] == HOOK
    assert upload_kw["path_in_repo"] == "cache_activations_runner_cfg.json"
    assert upload_kw["repo_type"] == "dataset"

    calls.clear()
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
    with pytest.raises(RuntimeError, match="offline mode"):
        run_ours(model, rows, tmp_path / "b", hf_repo_id="me/acts")
    assert calls == [] and not (tmp_path / "b").exists()


def test_float16_cache_reads_back_in_float16(model, rows, tmp_path):
    path = tmp_path / "half"
    run_ours(model, rows, path, dtype="float16", shuffle=False, buffer_size_gb=32 * 28 * 2 / 1e9)
    column = datasets.load_from_disk(str(path)).with_format("arrow")[:][HOOK]
    disk = np.concatenate([c.to_numpy(zero_copy_only=False) for c in column.chunks])
    assert disk.dtype == "float16" and disk.shape == (16, 7, 16)
    store = CachedActivationsStore(path, train_batch_size_tokens=112, shuffle=False)
    assert store.cache_dtype == torch.float16 and store.info["dtype"] == "float16"
    assert torch.equal(store.next_batch(), torch.from_numpy(disk).reshape(-1, 16))
