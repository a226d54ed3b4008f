"""``upload_saes_to_huggingface``: publish SAEs to a Hugging Face model repo.

Two spellings reach the same upload:

* SAELens 6.x's: ``upload_saes_to_huggingface(saes_dict, hf_repo_id, hf_revision="main",
  show_progress=True, add_default_readme=True)`` where ``saes_dict`` maps a folder of
  the repo to an SAE or to the path of a saved SAE folder;
* ``upload_saes_to_huggingface(saes=[sae, ...], repo_id="user/repo", token=None)``,
  each SAE in the folder named by its hook (``sae.cfg.metadata.hook_name``).

Every SAE lands in its own folder as a SAELens 6.x directory (``cfg.json``,
``sae_weights.safetensors`` and, where there is one, ``sparsity.safetensors`` and
``runner_cfg.json``), so ``SAE.from_pretrained(repo_id, folder)`` loads it with fastsae
or sae-lens. Unlike sae-lens (one commit per SAE, then one for the README), all files,
the README included, go up in ONE commit: a repo never holds half an upload.

Everything that can be checked is checked before the first request (the arguments, the
folders, a token, every SAE written to a temporary folder): bad input creates no repo
and no commit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token
from huggingface_hub.utils import validate_repo_id
from tqdm.auto import tqdm

from fastsae.loading.disk import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from fastsae.saes.base import SAE
from fastsae.saes.training_sae import TrainingSAE
from fastsae.training.checkpoints import RUNNER_CFG_FILENAME  # the run's config beside an SAE

logger = logging.getLogger(__name__)

README_FILENAME = "README.md"
# the files of an SAE folder that are uploaded (any other file in a folder stays local)
UPLOADED_FILENAMES = (
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    RUNNER_CFG_FILENAME,
)


def upload_saes_to_huggingface(
    saes_dict: Mapping[str, Any] | None = None,
    hf_repo_id: str | None = None,
    hf_revision: str = "main",
    show_progress: bool = True,
    add_default_readme: bool = True,
    *,
    saes: list[Any] | tuple[Any, ...] | None = None,
    repo_id: str | None = None,
    token: str | None = None,
) -> CommitInfo:
    """Upload SAEs to the Hugging Face repo ``hf_repo_id`` / ``repo_id`` in one commit.

    Args:
        saes_dict: ``{folder in the repo: SAE or path of a saved SAE folder}`` (SAELens's
            spelling). A folder must hold ``cfg.json`` and ``sae_weights.safetensors``.
        hf_repo_id: the repo (``"user/name"``), created (public) if it does not exist.
        hf_revision: the branch to commit to; a branch other than ``main`` is created
            from ``main`` when missing (``refs/pr/N`` commits to that pull request).
        show_progress: a progress bar while the SAEs are written for upload.
        add_default_readme: add a README (``saelens`` tag, the folders, a loading
            snippet) unless the repo already has one at ``hf_revision``.
        saes: a list of SAEs, each uploaded to the folder named by its
            ``cfg.metadata.hook_name`` (use instead of ``saes_dict``).
        repo_id: same as ``hf_repo_id`` (goes with ``saes``).
        token: a Hugging Face token with write access; default: the cached login
            (``huggingface-cli login``) or ``HF_TOKEN``.

    A training SAE is uploaded as the inference SAE it stands for
    (``save_inference_model``), so ``SAE.from_pretrained`` loads it. An SAE that came
    with a log feature sparsity (``from_pretrained``) is uploaded with its
    ``sparsity.safetensors``.

    Returns:
        the ``huggingface_hub.CommitInfo`` of the commit.

    Raises (before any repo is created or file uploaded):
        TypeError: both spellings mixed or neither given, or a value that is neither an
            SAE nor a folder path.
        ValueError: no SAEs, a bad or duplicate folder name, an SAE without a hook
            name (``saes=``), a bad repo id, or a ``cfg.json`` that is not a JSON object.
        FileNotFoundError: a folder that does not exist or lacks ``cfg.json`` /
            ``sae_weights.safetensors``.
        PermissionError: no ``token`` and no cached login.
    """
    entries, target = _entries_and_repo(saes_dict, hf_repo_id, saes, repo_id)
    validate_repo_id(target)  # a malformed id fails here, not after the uploads
    if not isinstance(hf_revision, str) or not hf_revision:
        raise ValueError(f"hf_revision must be a branch name, got {hf_revision!r}")
    for folder, ref in entries:
        if _save_function(ref) is None:
            _check_sae_folder(ref, folder)
    token = _resolve_token(token)

    with TemporaryDirectory(prefix="fastsae-upload-") as tmp:
        operations: list[CommitOperationAdd] = []
        cfgs: dict[str, dict[str, Any]] = {}
        progress = tqdm(entries, desc="Preparing SAEs", disable=not show_progress)
        for i, (folder, ref) in enumerate(progress):
            local = _local_folder(ref, Path(tmp) / str(i))
            cfgs[folder] = _check_sae_folder(local, folder)
            operations.extend(
                CommitOperationAdd(
                    path_in_repo=f"{folder}/{name}", path_or_fileobj=str(local / name)
                )
                for name in UPLOADED_FILENAMES
                if (local / name).is_file()
            )

        # a file that is also a folder of another (folder 'a/cfg.json' beside 'a')
        paths = [op.path_in_repo for op in operations]
        _check_no_path_clashes(paths + [README_FILENAME] if add_default_readme else paths)

        api = HfApi(token=token)
        existed = api.repo_exists(target, repo_type="model")
        if not existed:
            api.create_repo(target, repo_type="model", exist_ok=True)
        if hf_revision != "main" and not hf_revision.startswith("refs/pr/"):
            api.create_branch(target, branch=hf_revision, repo_type="model", exist_ok=True)
        if add_default_readme:
            if existed and api.file_exists(
                target, README_FILENAME, repo_type="model", revision=hf_revision
            ):
                logger.info("%s already has a README.md: it is left as it is", target)
            else:
                readme = default_readme(target, cfgs)
                operations.append(
                    CommitOperationAdd(
                        path_in_repo=README_FILENAME, path_or_fileobj=readme.encode()
                    )
                )
        folders = list(cfgs)
        shown = ", ".join(folders[:3]) + (
            f" and {len(folders) - 3} more" if len(folders) > 3 else ""
        )
        return api.create_commit(
            target,
            operations,
            commit_message=f"Upload {len(folders)} SAE{'s' if len(folders) > 1 else ''}: {shown}",
            repo_type="model",
            revision=hf_revision,
        )


# ---------------------------------------------------------------------------- arguments
def _entries_and_repo(
    saes_dict: Mapping[str, Any] | None,
    hf_repo_id: str | None,
    saes: list[Any] | tuple[Any, ...] | None,
    repo_id: str | None,
) -> tuple[list[tuple[str, Any]], str]:
    """``([(folder, SAE or path), ...], repo id)`` from either spelling."""
    if saes_dict is not None and saes is not None:
        raise TypeError("pass the SAEs once: saes_dict={folder: sae} or saes=[sae, ...], not both")
    if hf_repo_id is not None and repo_id is not None:
        raise TypeError("pass the repo once: hf_repo_id= or repo_id=, not both")
    if saes_dict is None and saes is None:
        raise TypeError(
            "no SAEs given: pass saes_dict={folder: sae or path} (with hf_repo_id=) "
            "or saes=[sae, ...] (with repo_id=)"
        )
    if saes_dict is not None and repo_id is not None:
        raise TypeError("saes_dict goes with hf_repo_id=, not repo_id= (do not mix the spellings)")
    if saes is not None and hf_repo_id is not None:
        raise TypeError("saes= goes with repo_id=, not hf_repo_id= (do not mix the spellings)")
    target = hf_repo_id if hf_repo_id is not None else repo_id
    if target is None:
        raise TypeError("no repo given: pass hf_repo_id= (with saes_dict) or repo_id= (with saes=)")
    if not isinstance(target, str):
        raise TypeError(
            f"the repo id must be a string like 'user/name', got {type(target).__name__}"
        )

    if saes_dict is not None:
        if not isinstance(saes_dict, Mapping):
            raise TypeError(
                f"saes_dict must map folder names to SAEs or paths, got {type(saes_dict).__name__}"
                " (for a list of SAEs, pass saes=[...] and repo_id=)"
            )
        pairs = [(_folder_name(key), ref) for key, ref in saes_dict.items()]
    else:
        if not isinstance(saes, (list, tuple)):
            raise TypeError(f"saes must be a list of SAEs, got {type(saes).__name__}")
        pairs = []
        for i, sae in enumerate(saes):
            if _save_function(sae) is None:
                raise TypeError(
                    f"saes[{i}] is a {type(sae).__name__}, not an SAE (to upload saved "
                    "folders, pass saes_dict={folder: path} and hf_repo_id=)"
                )
            hook_name = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
            if not hook_name:
                raise ValueError(
                    f"saes[{i}] has no cfg.metadata.hook_name to name its folder; pass "
                    "saes_dict={folder: sae} and hf_repo_id= instead"
                )
            pairs.append((_folder_name(hook_name), sae))
    if not pairs:
        raise ValueError("no SAEs to upload")
    seen: dict[str, int] = {}
    for i, (folder, _) in enumerate(pairs):
        if folder in seen:
            raise ValueError(
                f"two SAEs (#{seen[folder]} and #{i}) would be uploaded to the same folder "
                f"{folder!r}; give them distinct names (saes_dict={{folder: sae}})"
            )
        seen[folder] = i
    return pairs, target


def _folder_name(name: Any) -> str:
    """``name`` as a folder of the repo (surrounding ``/`` dropped), or ValueError."""
    if not isinstance(name, str):
        raise ValueError(f"folder names must be strings, got {name!r}")
    folder = name.strip("/")
    parts = folder.split("/")
    if not folder or "\\" in folder or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"bad folder name {name!r}: use a relative path in the repo such as "
            "'blocks.0.hook_resid_pre' (no empty, '.' or '..' parts, no backslashes)"
        )
    if parts[0] == ".git" or folder == README_FILENAME:
        raise ValueError(f"bad folder name {name!r}: reserved in a Hugging Face repo")
    return folder


def _resolve_token(token: str | None) -> str:
    """``token``, else the cached login (``HF_TOKEN`` or the token file); read offline."""
    if token is not None and not isinstance(token, str):
        raise TypeError(f"token must be a string, got {type(token).__name__}")
    resolved = token or get_token()
    if not resolved:
        raise PermissionError(
            "no Hugging Face token: pass token='hf_...', set HF_TOKEN, or log in with "
            "`huggingface-cli login` (a write token is needed to upload)"
        )
    return resolved


# ---------------------------------------------------------------------------- SAE folders
def _save_function(ref: Any):
    """How to write ``ref`` as an inference SAE folder (``fn(path)``), or None when it
    is not an SAE (fastsae's, or sae-lens's when sae-lens is loaded)."""
    if isinstance(ref, TrainingSAE):
        return ref.save_inference_model
    if isinstance(ref, SAE):
        sparsity = getattr(ref, "_log_sparsity", None)
        return lambda path: ref.save_model(path, sparsity=sparsity)
    sae_lens = sys.modules.get("sae_lens")  # an object of it exists only if it is loaded
    if sae_lens is not None:
        training_cls = getattr(sae_lens, "TrainingSAE", None)
        if training_cls is not None and isinstance(ref, training_cls):
            return ref.save_inference_model
        sae_cls = getattr(sae_lens, "SAE", None)
        if sae_cls is not None and isinstance(ref, sae_cls):
            return ref.save_model
    return None


def _local_folder(ref: Any, scratch: Path) -> Path:
    """The folder whose files are uploaded for ``ref``: an SAE is saved to ``scratch``."""
    save = _save_function(ref)
    if save is None:
        return Path(ref)
    save(scratch)
    return scratch


def _check_sae_folder(ref: Any, folder: str) -> dict[str, Any]:
    """``ref`` (a path) is a folder with an SAE's files; returns its ``cfg.json``."""
    if not isinstance(ref, (str, os.PathLike)):
        raise TypeError(
            f"{folder!r}: a {type(ref).__name__} is neither an SAE nor a path to a saved SAE folder"
        )
    path = Path(ref)
    if not path.is_dir():
        raise FileNotFoundError(f"{folder!r}: {path} is not a folder (expected a saved SAE)")
    for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{folder!r}: {path} has no {name} (an SAE folder holds {SAE_CFG_FILENAME} "
                f"and {SAE_WEIGHTS_FILENAME}, as sae.save_model(path) writes)"
            )
    try:
        cfg = json.loads((path / SAE_CFG_FILENAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder!r}: {path / SAE_CFG_FILENAME} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{folder!r}: {path / SAE_CFG_FILENAME} is not a JSON object")
    return cfg


def _check_no_path_clashes(paths: list[str]) -> None:
    """No file of the commit is also a folder of another (``a`` beside ``a/cfg.json``)."""
    files = set(paths)
    for path in paths:
        parts = path.split("/")
        for n in range(1, len(parts)):
            if "/".join(parts[:n]) in files:
                raise ValueError(
                    f"{'/'.join(parts[:n])!r} is both a file and a folder in the upload"
                )


# ---------------------------------------------------------------------------- README
def _describe(cfg: dict[str, Any]) -> tuple[str, str, str, str]:
    """(architecture, hook, d_in, d_sae) of a cfg.json, 6.x or the older flat layout."""
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = metadata.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    arch = cfg.get("architecture") or "standard"
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    return str(arch), str(hook or "?"), str(d_in or "?"), str(d_sae or "?")


def default_readme(repo_id: str, cfgs: Mapping[str, dict[str, Any]]) -> str:
    """The README added to a repo without one: ``saelens`` metadata (library and tag),
    a table of the folders uploaded and how to load one."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = "\n".join(
        f"| `{cell(folder)}` | {' | '.join(cell(v) for v in _describe(cfg))} |"
        for folder, cfg in cfgs.items()
    )
    example = next(iter(cfgs))
    return (
        "---\n"
        "library_name: saelens\n"
        "tags:\n"
        "- saelens\n"
        "- sparse-autoencoder\n"
        "---\n"
        "\n"
        f"# {repo_id}\n"
        "\n"
        "Sparse autoencoders (SAEs) in the SAELens 6.x format, one folder per SAE "
        f"(`{SAE_CFG_FILENAME}`, `{SAE_WEIGHTS_FILENAME}`).\n"
        "\n"
        "| folder | architecture | hook | d_in | d_sae |\n"
        "|---|---|---|---|---|\n"
        f"{rows}\n"
        "\n"
        "## Loading\n"
        "\n"
        "Pass the repo id and a folder to `SAE.from_pretrained` (sae-lens or fastsae):\n"
        "\n"
        "```python\n"
        "from sae_lens import SAE  # or: from fastsae import SAE\n"
        "\n"
        f'sae = SAE.from_pretrained("{repo_id}", "{example}")\n'
        "```\n"
    )
