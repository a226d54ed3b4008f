"""A Hugging Face cache written by hand, for offline tests of ``from_pretrained``.

``FakeHub.snapshot(repo_id)`` is the snapshot folder of a repo in a cache under
``tmp_path`` (``models--user--repo/snapshots/<sha>/...`` plus ``refs/main``); write a
publisher's files there and ``hf_hub_download`` finds them with ``HF_HUB_OFFLINE=1``.
The ``hub`` fixture (tests/loading/conftest.py) also blocks sockets, so a test that
tried to download fails instead of reaching the network.

``sae_lens_from_pretrained`` loads the same release with sae-lens, from the same cache,
for parity tests. sae-lens reads a few formats' shapes over HTTP (a range request on
the safetensors header); that one call is answered from the cached file instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download


class FakeHub:
    """Writes repos straight into a Hugging Face cache directory."""

    def __init__(self, cache: Path):
        self.cache = cache

    def snapshot(self, repo_id: str) -> Path:
        """The snapshot folder of ``repo_id`` (created, with ``refs/main``).

        Call :meth:`to_blobs` after writing to get the layout huggingface_hub itself
        writes: files in ``blobs/`` and symlinks in the snapshot.
        """
        repo_dir = self.cache / f"models--{repo_id.replace('/', '--')}"
        sha = hashlib.sha1(repo_id.encode()).hexdigest()
        snap = repo_dir / "snapshots" / sha
        snap.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(sha)
        return snap

    @staticmethod
    def to_blobs(snap: Path) -> None:
        blobs = snap.parent.parent / "blobs"
        blobs.mkdir(exist_ok=True)
        for file in [p for p in snap.rglob("*") if p.is_file() and not p.is_symlink()]:
            blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
            file.replace(blob)
            file.symlink_to(os.path.relpath(blob, file.parent))


def _cached_safetensors_shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
    path = hf_hub_download(repo_id, filename)
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def sae_lens_from_pretrained(monkeypatch, release: str, sae_id: str, **kwargs: Any):
    """``sae_lens.SAE.from_pretrained(release, sae_id)`` against the fake hub."""
    import sae_lens
    from sae_lens.loading import pretrained_sae_loaders

    monkeypatch.setattr(
        pretrained_sae_loaders, "get_safetensors_tensor_shapes", _cached_safetensors_shapes
    )
    return sae_lens.SAE.from_pretrained(release, sae_id, **kwargs)
