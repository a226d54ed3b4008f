"""The fastsae command line."""

import torch

from fastsae import SAE, StandardSAE, StandardSAEConfig
from fastsae.cli import main


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
