"""Transcoders (``fastsae.saes.transcoder``) on their own: a transcoder config refuses
``apply_b_dec_to_input=True``, as sae-lens's does."""

from __future__ import annotations

import pytest
from sae_cases import D_IN, D_OUT, D_SAE
from sae_lens.registry import get_sae_class

import fastsae


def test_transcoder_requires_no_b_dec_on_input():
    their_cfg_cls = get_sae_class("transcoder")[1]
    with pytest.raises(ValueError):
        their_cfg_cls(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=True)
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        fastsae.TranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=True)
