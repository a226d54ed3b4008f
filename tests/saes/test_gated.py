"""The gated SAE (``fastsae.saes.gated``) on its own: like sae-lens's ``GatedSAE`` it
has ``b_enc = None`` (code in the wild tests ``sae.b_enc is None``)."""

from __future__ import annotations

from sae_cases import make_pair


def test_gated_b_enc_is_none_like_sae_lens():
    """sae-lens GatedSAE sets ``self.b_enc = None`` (code does ``sae.b_enc is None``)."""
    ours, theirs = make_pair("gated")
    assert theirs.b_enc is None
    assert getattr(ours, "b_enc", "missing") is None
