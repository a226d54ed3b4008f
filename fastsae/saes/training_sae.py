"""What every training SAE shares: configs, step input/output, the dense training step.

A training SAE is its inference class (``fastsae.saes``) plus losses. The classes
keep SAELens 6.x's names (``TopKTrainingSAE``, ``TopKTrainingSAEConfig``, ...), its
``training_forward_pass(TrainStepInput) -> TrainStepOutput`` and its loss maths.
The TopK family overrides the step with a sparse one (``fastsae.saes.topk``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from fastsae.loading.atomic_dir import recover_dir
from fastsae.loading.disk import read_json, read_safetensors
from fastsae.saes.base import SAE
from fastsae.saes.config import SAEConfig, SAEMetadata, dtype_to_str
from fastsae.saes.registry import (
    config_class_for_architecture,
    sae_class_for_architecture,
    training_config_class_for_architecture,
    training_sae_class_for_architecture,
)
from fastsae.sparse_code import SparseCode
from fastsae.training.losses import mse_loss, total_loss


@dataclass(kw_only=True)
class TrainingSAEConfig(SAEConfig):
    """Base of the training configs: the inference fields plus training-only ones.

    ``decoder_init_norm``: rows of ``W_dec`` start with this norm (Anthropic's April
    2024 heuristic; SAELens default 0.1); None keeps kaiming-uniform rows. Keyword-only,
    as in SAELens, so it comes after each architecture's own fields.
    """

    decoder_init_norm: float | None = 0.1

    # the architecture the trained SAE is saved as (None: the training architecture)
    _inference_architecture: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decoder_init_norm is not None and not self.decoder_init_norm > 0:
            raise ValueError(
                f"decoder_init_norm must be > 0 or None, got {self.decoder_init_norm!r}"
            )
        for f in fields(self):
            if f.name.endswith(("_coefficient", "_warm_up_steps")):
                value = getattr(self, f.name)
                if value is not None and value < 0:
                    raise ValueError(f"{f.name} must be >= 0, got {value!r}")

    @classmethod
    def inference_architecture(cls) -> str:
        return cls._inference_architecture or cls.architecture()

    def get_inference_config_class(self) -> type[SAEConfig]:
        return config_class_for_architecture(self.inference_architecture())

    def get_training_architecture_details(self) -> dict[str, Any]:
        """Training-only fields (not in the inference config), as SAELens records them."""
        inference = {f.name for f in fields(self.get_inference_config_class())}
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in inference and f.name != "metadata"
        }

    def _metadata_with_training_info(self) -> dict[str, Any]:
        md = self.metadata.to_dict()
        md["training_architecture"] = self.architecture()
        md["training_architecture_details"] = self.get_training_architecture_details()
        return md

    def to_dict(self) -> dict[str, Any]:
        res = super().to_dict()
        res["metadata"] = self._metadata_with_training_info()
        return res

    def get_inference_sae_cfg_dict(self) -> dict[str, Any]:
        """The cfg.json dict of the inference SAE this trains (SAELens's name)."""
        inference_cls = self.get_inference_config_class()
        res = {f.name: getattr(self, f.name) for f in fields(inference_cls) if f.name != "metadata"}
        res["architecture"] = inference_cls.architecture()
        res["metadata"] = self._metadata_with_training_info()
        return res

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> TrainingSAEConfig:
        """The training config named by ``config_dict["architecture"]``; unknown keys ignored."""
        arch = config_dict.get("architecture", cls._architecture)
        if arch is None:
            raise ValueError("training SAE config dict has no 'architecture' key")
        cfg_cls = training_config_class_for_architecture(arch)
        if not issubclass(cfg_cls, cls):
            raise ValueError(
                f"architecture {arch!r} gives {cfg_cls.__name__}, not a {cls.__name__}"
            )
        names = {f.name for f in fields(cfg_cls)}
        kwargs = {k: v for k, v in config_dict.items() if k in names and k != "metadata"}
        metadata = dict(config_dict.get("metadata") or {})
        metadata.pop("training_architecture", None)
        metadata.pop("training_architecture_details", None)
        kwargs["metadata"] = SAEMetadata(**metadata)
        return cfg_cls(**kwargs)


# As in SAELens: ``TrainingSAE[TopKTrainingSAEConfig]`` in an annotation.
T_TRAINING_SAE_CONFIG = TypeVar("T_TRAINING_SAE_CONFIG", bound=TrainingSAEConfig)
T_TRAINING_SAE = TypeVar("T_TRAINING_SAE", bound="TrainingSAE")


class TrainCoefficientConfig(NamedTuple):
    """A loss coefficient warmed up linearly from 0 over ``warm_up_steps``."""

    value: float
    warm_up_steps: int


@dataclass
class TrainStepInput:
    """One training step's input (SAELens names).

    ``sae_in [batch, d_in]``; ``dead_neuron_mask [d_sae]`` bool or None.
    """

    sae_in: Tensor
    coefficients: dict[str, float]
    dead_neuron_mask: Tensor | None
    n_training_steps: int
    is_logging_step: bool = False


class TrainStepOutput:
    """One training step's output (SAELens fields).

    ``feature_acts`` and ``hidden_pre`` are ``[batch, d_sae]`` as in SAELens, but a
    sparse step only builds them when they are read (detached): the step itself keeps
    ``code`` (``SparseCode [batch, K]``) and never holds a ``[batch, d_sae]`` tensor.
    """

    def __init__(
        self,
        sae_in: Tensor,
        sae_out: Tensor,
        loss: Tensor,
        losses: dict[str, Tensor],
        *,
        feature_acts: Tensor | None = None,
        hidden_pre: Tensor | None = None,
        code: SparseCode | None = None,
        d_sae: int | None = None,
        hidden_pre_fn: Callable[[], Tensor] | None = None,
        hidden_pre_weights: tuple[Tensor, ...] = (),
        metrics: dict[str, Any] | None = None,
    ):
        if feature_acts is None and code is None:
            raise ValueError("TrainStepOutput needs feature_acts or a sparse code")
        self.sae_in = sae_in
        self.sae_out = sae_out
        self.loss = loss
        self.losses = losses
        self.code = code
        self.metrics: dict[str, Any] = metrics if metrics is not None else {}
        self._feature_acts = feature_acts
        self._hidden_pre = hidden_pre
        self._hidden_pre_fn = hidden_pre_fn
        # in-place updates (an optimizer step) bump a tensor's _version: a lazily built
        # hidden_pre would then not be this step's any more
        self._weight_versions = [(w, w._version) for w in hidden_pre_weights]
        self._stale = False
        self._d_sae = d_sae

    @property
    def feature_acts(self) -> Tensor:
        if self._feature_acts is None:
            assert self.code is not None and self._d_sae is not None
            values, indices = self.code
            self._feature_acts = SparseCode(values.detach(), indices).to_dense(self._d_sae)
        return self._feature_acts

    @property
    def hidden_pre(self) -> Tensor:
        if self._hidden_pre is None:
            if self._stale or any(w._version != v for w, v in self._weight_versions):
                raise RuntimeError(
                    "hidden_pre of a sparse training step is built from the weights when first "
                    "read, and the weights have changed since the step (optimizer step): read "
                    "it before updating the weights"
                )
            if self._hidden_pre_fn is None:
                raise AttributeError("this step did not keep hidden_pre")
            with torch.no_grad():
                self._hidden_pre = self._hidden_pre_fn()
        return self._hidden_pre

    def weights_updated(self) -> None:
        """The trainer calls this after its optimizer step: hidden_pre can no longer be built."""
        self._stale = True
        self._hidden_pre_fn = None  # frees the step's input

    def fired(self) -> Tensor:
        """``[batch, d_sae]``-free firing counts: how many tokens each latent fired on, ``[d_sae]``."""
        if self.code is not None:
            values, indices = self.code
            d_sae = self._d_sae
            assert d_sae is not None
            counts = torch.zeros(d_sae, dtype=torch.float32, device=values.device)
            return counts.index_add_(
                0, indices.reshape(-1).long(), (values.detach() != 0).reshape(-1).float()
            )
        acts = self.feature_acts.detach()
        return (acts.reshape(-1, acts.shape[-1]) != 0).sum(0).float()

    def l0(self) -> Tensor:
        """Mean number of active latents per token (scalar)."""
        if self.code is not None:
            values = self.code.values.detach()
            return (values != 0).reshape(-1, values.shape[-1]).sum(-1).float().mean()
        acts = self.feature_acts.detach()
        return (acts != 0).reshape(-1, acts.shape[-1]).sum(-1).float().mean()


class TrainingSAE(SAE[T_TRAINING_SAE_CONFIG]):
    """Base of the training SAEs: an architecture's training class derives from it and
    from the architecture's inference class (``TopKTrainingSAE(TrainingSAE, TopKSAE)``),
    as in SAELens; generic in its training config (``TrainingSAE[TopKTrainingSAEConfig]``).

    Subclasses give ``encode_with_hidden_pre``, ``calculate_aux_loss`` and
    ``get_coefficients``; the dense ``training_forward_pass`` below is SAELens's.
    """

    cfg: T_TRAINING_SAE_CONFIG

    def __init__(self, cfg: T_TRAINING_SAE_CONFIG, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        # the activation store hands the SAE flat [batch, d_in] rows while training
        self.turn_off_forward_pass_hook_z_reshaping()
        self.mse_loss_fn = mse_loss

    def _init_parameters(self) -> None:
        super()._init_parameters()
        norm = self.cfg.decoder_init_norm
        if norm is not None and self.device.type != "meta":
            scale_decoder_rows_(self.W_dec.data, norm)
            self.W_enc = nn.Parameter(self.W_dec.data.T.clone().contiguous())

    # ------------------------------------------------------------------ to override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {}

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [batch, d_in]`` -> ``(feature_acts, hidden_pre)``, both ``[batch, d_sae]``."""
        raise NotImplementedError(f"{type(self).__name__} must define encode_with_hidden_pre")

    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: Tensor,
        hidden_pre: Tensor,
        sae_out: Tensor,
    ) -> dict[str, Tensor]:
        return {}

    def encode(self, x: Tensor) -> Tensor:
        return self.encode_with_hidden_pre(x)[0]

    # ------------------------------------------------------------------ the step
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """MSE (summed over d_in, mean over tokens) plus the architecture's aux losses."""
        feature_acts, hidden_pre = self.encode_with_hidden_pre(step_input.sae_in)
        sae_out = self.decode(feature_acts)
        mse = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        losses = {"mse_loss": mse}
        losses.update(self.calculate_aux_loss(step_input, feature_acts, hidden_pre, sae_out))
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            loss=total_loss(losses),
            losses=losses,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            d_sae=self.cfg.d_sae,
        )

    # ------------------------------------------------------------------ saving
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Edit the state dict in place into the inference SAE's parameters."""
        self.process_state_dict_for_saving(state_dict)

    @torch.no_grad()
    def to_inference_sae(self) -> SAE:
        """The inference SAE (``fastsae.saes``) this training SAE stands for, on copies of the weights."""
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        self.process_state_dict_for_saving_inference(state)
        cfg_dict = self.cfg.get_inference_sae_cfg_dict()
        cfg = config_class_for_architecture(cfg_dict["architecture"]).from_dict(cfg_dict)
        sae = sae_class_for_architecture(cfg.architecture())(cfg)
        sae.load_state_dict(state)
        return sae

    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        """Save as the inference architecture (BatchTopK / Matryoshka as JumpReLU), atomically."""
        return self.to_inference_sae().save_model(path)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> TrainingSAE:  # type: ignore[override]
        cfg = TrainingSAEConfig.from_dict(config_dict)
        return training_sae_class_for_architecture(cfg.architecture())(cfg)

    @classmethod
    def load_from_disk(  # type: ignore[override]
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        **_: Any,
    ) -> TrainingSAE:
        """A training SAE from a folder its ``save_model`` wrote (a training checkpoint).

        The training architecture and its training-only fields come from the cfg.json
        metadata (``training_architecture``, ``training_architecture_details``), as
        SAELens records them.
        """
        path = recover_dir(Path(path))  # finish a swap that a kill interrupted
        cfg_dict = read_json(path / "cfg.json")
        metadata = dict(cfg_dict.get("metadata") or {})
        arch = metadata.get("training_architecture") or cfg_dict.get("architecture")
        merged = {**dict(metadata.get("training_architecture_details") or {}), **cfg_dict}
        merged.update(architecture=arch, device=str(device))
        if dtype is not None:
            merged["dtype"] = dtype_to_str(dtype)
        sae_cls = training_sae_class_for_architecture(arch)
        if not issubclass(sae_cls, cls):
            raise TypeError(f"{path} holds a {sae_cls.__name__}, not a {cls.__name__}")
        sae = sae_cls(TrainingSAEConfig.from_dict(merged))
        sae.load_weights_from_checkpoint(path)
        return sae

    def load_weights_from_checkpoint(self, checkpoint_path: str | Path) -> None:
        """Load ``sae_weights.safetensors`` of a checkpoint directory into this SAE."""
        path = recover_dir(Path(checkpoint_path)) / "sae_weights.safetensors"
        state = read_safetensors(path)
        self.process_state_dict_for_loading(state)
        try:
            self.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path} does not fit this {type(self).__name__}: {e}") from e


@torch.no_grad()
def scale_decoder_rows_(W_dec: Tensor, norm: float) -> Tensor:
    """Every row of ``W_dec`` scaled to L2 norm ``norm``, in place (the training SAEs'
    ``decoder_init_norm``; row by row, so a block of rows scales as it would in the whole
    matrix)."""
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    W_dec *= norm
    return W_dec
