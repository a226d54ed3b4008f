"""``sae.feature_labels``: ``SAE.from_pretrained`` attaches the labels ``fastsae labels
download`` wrote for that release / sae_id under the default labels root
(``$FASTSAE_CACHE_DIR/labels``), None otherwise; a corrupt labels file warns and never
fails the load. Offline: the ``hub`` fixture's Hugging Face cache."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import pytest

import fastsae
from fastsae.atomic_files import atomic_write_json
from fastsae.labels import FeatureLabel, FeatureLabels, labels_dir
from fastsae.loading import pretrained
from fastsae.loading.pretrained import PretrainedRelease

HOOK = "blocks.0.hook_resid_pre"
NP_ID = "gpt2-small/0-fake"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "fastsae-cache"
    monkeypatch.setenv("FASTSAE_CACHE_DIR", str(root))
    return root


def save_sae(hub, repo_id: str = "user/repo", folder: str = "blocks.0") -> fastsae.SAE:
    sae = fastsae.SAE.from_dict(
        {
            "architecture": "standard",
            "d_in": 6,
            "d_sae": 12,
            "metadata": {"model_name": "gpt2", "hook_name": HOOK},
        }
    )
    sae.save_model(hub.snapshot(repo_id) / folder)
    return sae


def write_labels(release: str, sae_id: str, root: Path) -> Path:
    """A ``feature_labels.json`` of the shape ``download_feature_labels`` writes."""
    folder = labels_dir(release, sae_id, root)
    label = FeatureLabel(" commas", [",", ";"], ["the"], 3.5, True)
    stats = {"total_features": 2, "with_descriptions": 1, "successful": 2, "failed": 0}
    info = {"release": release, "sae_id": sae_id, "neuronpedia_id": NP_ID,
            "num_features": 12, "downloaded_at": "2026-01-01T00:00:00Z"}  # fmt: skip
    features = {"3": asdict(label), "7": asdict(FeatureLabel(None, [], [], None, False))}
    atomic_write_json(folder / "feature_labels.json",
                      {"sae_info": info, "features": features, "stats": stats})  # fmt: skip
    atomic_write_json(folder / "metadata.json",
                      {"sae_info": info, "stats": stats, "failed_features": [], "errors": {}})  # fmt: skip
    return folder / "feature_labels.json"


def test_every_sae_has_feature_labels_none(hub, cache):
    assert fastsae.StandardSAE(fastsae.StandardSAEConfig(d_in=4, d_sae=8)).feature_labels is None
    save_sae(hub)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing downloaded: no warning either
        sae = fastsae.SAE.from_pretrained("user/repo", "blocks.0")
    assert sae.feature_labels is None
    # labels of another sae_id are not this one's
    write_labels("user/repo", "blocks.1", cache / "labels")
    assert fastsae.SAE.from_pretrained("user/repo", "blocks.0").feature_labels is None


def test_from_pretrained_attaches_downloaded_labels(hub, cache, monkeypatch):
    save_sae(hub)
    path = write_labels("user/repo", "blocks.0", cache / "labels")
    sae = fastsae.SAE.from_pretrained("user/repo", "blocks.0")
    labels = sae.feature_labels
    assert isinstance(labels, FeatureLabels) and labels.path == path
    assert sorted(labels) == [3, 7]
    assert labels[3] == FeatureLabel(" commas", [",", ";"], ["the"], 3.5, True)
    assert labels[7].has_explanations is False
    assert labels.url(3) == f"https://www.neuronpedia.org/{NP_ID}/3"
    # the labels are not part of the module's state
    assert not [k for k in sae.state_dict() if "label" in k]

    # a registry release, by release name and sae_id, through both entry points
    registry = {
        "fake-release": PretrainedRelease(
            release="fake-release", repo_id="user/repo", model="gpt2", conversion_func=None,
            saes_map={HOOK: "blocks.0"}, neuronpedia_id={HOOK: NP_ID},
        )
    }  # fmt: skip
    monkeypatch.setattr(pretrained, "get_pretrained_saes_directory", lambda: registry)
    assert fastsae.SAE.from_pretrained("fake-release", HOOK).feature_labels is None
    write_labels("fake-release", HOOK, cache / "labels")
    sae, _, _ = fastsae.SAE.from_pretrained_with_cfg_and_sparsity("fake-release", HOOK)
    assert sae.feature_labels is not None and sae.feature_labels[3].description == " commas"
    assert fastsae.StandardSAE.from_pretrained("fake-release", HOOK).feature_labels[3].max_activation == 3.5  # fmt: skip


@pytest.mark.parametrize(
    "corrupt",
    ["{not json", '{"sae_info": {}, "features": {}, "stats": {}}', "[1, 2]", b"\xff\xfe"],
    ids=["not-json", "missing-keys", "not-object", "not-utf8"],
)
def test_corrupt_labels_file_warns_and_gives_none(hub, cache, corrupt):
    save_sae(hub)
    path = write_labels("user/repo", "blocks.0", cache / "labels")
    if isinstance(corrupt, bytes):
        path.write_bytes(corrupt)
    else:
        path.write_text(corrupt)
    with pytest.warns(UserWarning, match="could not be read") as record:
        sae = fastsae.SAE.from_pretrained("user/repo", "blocks.0")
    assert sae.feature_labels is None  # the SAE itself loaded
    assert sae.cfg.d_sae == 12
    assert any(f"feature labels at {path} could not be read" in str(w.message) for w in record)


def test_local_directory_release_has_no_labels(tmp_path, cache):
    # an absolute path cannot name a folder under the labels root: None, no error
    sae = save_sae_local(tmp_path / "my_saes" / "blocks.0")
    loaded = fastsae.SAE.from_pretrained(str(tmp_path / "my_saes"), "blocks.0")
    assert loaded.feature_labels is None
    assert loaded.cfg.d_sae == sae.cfg.d_sae


def save_sae_local(folder: Path) -> fastsae.SAE:
    sae = fastsae.SAE.from_dict(
        {"architecture": "standard", "d_in": 6, "d_sae": 12,
         "metadata": {"model_name": "gpt2", "hook_name": HOOK}}
    )  # fmt: skip
    sae.save_model(folder)
    return sae
