"""The ``hub`` fixture: an offline Hugging Face cache under ``tmp_path``."""

from __future__ import annotations

import socket

import pytest
from fake_hub import FakeHub


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub read the environment at import time: patch what it reads at call time
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return FakeHub(cache)
