"""The fastsae command line."""

import torch

from fastsae import SAE, StandardSAE, StandardSAEConfig
from fastsae.cli import main


def test_demo_runs_and_checks_the_sparse_path(tmp_path, capsys):
    out = tmp_path / "demo_sae"
    code = main(
        [
            "demo",
            "--d-in",
            "32",
            "--d-sae",
            "256",
            "--k",
            "8",
            "--batch",
            "16",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]  # fmt: skip
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "relative difference" in printed and "L0 per token: 8.0" in printed
    sae = SAE.load_from_disk(out)
    assert sae.cfg.k == 8 and sae.cfg.d_sae == 256


def test_convert_writes_sae_lens_format(tmp_path, capsys):
    src = StandardSAE(StandardSAEConfig(d_in=6, d_sae=12))
    src.save_model(tmp_path / "src")
    assert (
        main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "float64"]) == 0
    )
    loaded = SAE.load_from_disk(tmp_path / "dst")
    assert loaded.dtype == torch.float64
    assert torch.allclose(loaded.W_enc, src.W_enc.double())


def test_convert_reports_missing_folder(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "dst")]) == 2
    assert "not found" in capsys.readouterr().err


def test_convert_reports_a_file_given_for_a_directory(tmp_path, capsys):
    src = StandardSAE(StandardSAEConfig(d_in=6, d_sae=12))
    weights, _ = src.save_model(tmp_path / "src")
    assert main(["convert", str(weights), str(tmp_path / "dst")]) == 2
    assert "is a file" in capsys.readouterr().err
