"""Transcoders: read activations at one hook, predict them at another (``d_out``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fastsae.saes.base import check_floating_tensor
from fastsae.saes.config import SAEConfig
from fastsae.saes.jumprelu import JumpReLUSAE
from fastsae.saes.registry import register
from fastsae.saes.standard import StandardSAE


@dataclass
class TranscoderConfig(SAEConfig):
    """Transcoder: reads ``d_in`` at one hook, writes ``d_out`` at another (``hook_name_out``)."""

    d_out: int = 768

    _architecture: ClassVar[str | None] = "transcoder"

    def __post_init__(self) -> None:
        if self.apply_b_dec_to_input:
            raise ValueError(
                "apply_b_dec_to_input must be False for transcoders "
                "(b_dec lives in the output space)"
            )
        super().__post_init__()
        if isinstance(self.d_out, bool) or not isinstance(self.d_out, int) or self.d_out <= 0:
            raise ValueError(f"d_out must be a positive int, got {self.d_out!r}")


@dataclass
class SkipTranscoderConfig(TranscoderConfig):
    """Transcoder with a linear skip connection ``x @ W_skip.T``."""

    _architecture: ClassVar[str | None] = "skip_transcoder"


@dataclass
class JumpReLUTranscoderConfig(TranscoderConfig):
    """Transcoder with a JumpReLU activation."""

    _architecture: ClassVar[str | None] = "jumprelu_transcoder"


@dataclass
class JumpReLUSkipTranscoderConfig(JumpReLUTranscoderConfig):
    """JumpReLU transcoder with a linear skip connection."""

    _architecture: ClassVar[str | None] = "jumprelu_skip_transcoder"


class Transcoder(StandardSAE):
    """ReLU transcoder: ``relu(x @ W_enc + b_enc) @ W_dec + b_dec`` with ``W_dec [d_sae, d_out]``.

    As in SAELens: ``b_dec`` is never subtracted from the input, no output
    normalisation is applied, ``use_error_term`` does not apply (input and output
    live at different hooks) and ``hook_sae_output`` does not fire.
    """

    config_class = TranscoderConfig
    cfg: TranscoderConfig

    def __init__(self, cfg: TranscoderConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    def _init_parameters(self) -> None:
        cfg = self.cfg
        self.b_dec = self._param(cfg.d_out)
        self.W_dec = self._param(cfg.d_sae, cfg.d_out, zeros=False)
        self.W_enc = self._param(cfg.d_in, cfg.d_sae, zeros=False)
        if self.device.type != "meta":
            torch.nn.init.kaiming_uniform_(self.W_dec)
            torch.nn.init.kaiming_uniform_(self.W_enc)
        self.b_enc = self._param(cfg.d_sae)

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    def _process_sae_in(self, x: Tensor):
        check_floating_tensor(x, "SAE input")
        sae_in = x.to(self.dtype)
        self._check_input(sae_in)
        sae_in = self.hook_sae_input(sae_in)
        return self._normalize_in(sae_in)

    def _finish_decode(self, sae_out_pre: Tensor, stats) -> Tensor:
        return self.hook_sae_recons(sae_out_pre)

    def _skip(self, x: Tensor) -> Tensor | None:
        return None

    def fold_activation_whitening(self, mean, whitening_matrix, unwhitening_matrix) -> None:
        raise NotImplementedError(
            "fold_activation_whitening does not apply to transcoders: their output lives "
            "in a different space from the whitened input"
        )

    def forward(self, x: Tensor) -> Tensor:
        """Prediction of the output-hook activations ``[..., d_out]`` from ``x [..., d_in]``."""
        sae_out = self._reconstruct(x)
        skip = self._skip(x)
        if skip is not None:
            sae_out = sae_out + skip
        return sae_out

    def forward_with_activations(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output [..., d_out], dense feature activations [..., d_sae])``."""
        feature_acts = self.encode(x)
        sae_out = self.decode(feature_acts)
        skip = self._skip(x)
        if skip is not None:
            sae_out = sae_out + skip
        return sae_out, feature_acts


class SkipTranscoder(Transcoder):
    """Transcoder plus a linear skip path ``x @ W_skip.T`` with ``W_skip [d_out, d_in]``."""

    config_class = SkipTranscoderConfig
    cfg: SkipTranscoderConfig

    def _init_parameters(self) -> None:
        super()._init_parameters()
        self.W_skip = self._param(self.cfg.d_out, self.cfg.d_in)

    def _skip(self, x: Tensor) -> Tensor:
        return x.to(self.W_skip.dtype) @ self.W_skip.T


class JumpReLUTranscoder(Transcoder):
    """Transcoder with ``relu(h) * (h > threshold)`` activations."""

    config_class = JumpReLUTranscoderConfig
    cfg: JumpReLUTranscoderConfig

    def _init_parameters(self) -> None:
        super()._init_parameters()
        self.threshold = self._param(self.cfg.d_sae)

    _encode_dense = JumpReLUSAE._encode_dense
    _encode_code = JumpReLUSAE._encode_code
    _fused_code = JumpReLUSAE._fused_code
    fold_W_dec_norm = JumpReLUSAE.fold_W_dec_norm


class JumpReLUSkipTranscoder(JumpReLUTranscoder):
    """JumpReLU transcoder with a linear skip path."""

    config_class = JumpReLUSkipTranscoderConfig
    cfg: JumpReLUSkipTranscoderConfig

    def _init_parameters(self) -> None:
        super()._init_parameters()
        self.W_skip = self._param(self.cfg.d_out, self.cfg.d_in)

    _skip = SkipTranscoder._skip


register("transcoder", Transcoder, TranscoderConfig)
register("skip_transcoder", SkipTranscoder, SkipTranscoderConfig)
register("jumprelu_transcoder", JumpReLUTranscoder, JumpReLUTranscoderConfig)
register("jumprelu_skip_transcoder", JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig)
