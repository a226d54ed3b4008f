"""Saving, loading and conversion for :class:`~fastsae.saes.base.SAE`: thin classmethod
and method wrappers over :mod:`fastsae.loading` (SAELens 6.x folders, pretrained
releases, live sae_lens SAEs), plus the deprecated tuple unpacking of ``from_pretrained``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from fastsae.saes.config import SAEConfig

if TYPE_CHECKING:
    from fastsae.saes.base import SAE

T_SAE = TypeVar("T_SAE", bound="SAE")


class PersistenceMixin:
    """``save_model``, ``load_from_disk``, ``from_pretrained`` and friends, ``from_dict``,
    ``from_sae_lens`` / ``to_sae_lens`` and the state-dict hooks subclasses override."""

    cfg: SAEConfig
    _log_sparsity: Tensor | None

    def save_model(self, path: str | Path, *, sparsity: Tensor | None = None) -> tuple[Path, Path]:
        """Write a SAELens 6.x directory (``cfg.json``, ``sae_weights.safetensors`` and,
        given ``sparsity [d_sae]``, ``sparsity.safetensors``) atomically: the folder is
        replaced as a whole, so a kill or a failed rename leaves the old SAE or the new
        one. A ``sparsity.safetensors`` of an earlier save is removed when ``sparsity`` is
        not given; files of the folder that are not the SAE's (a README) are kept.

        Returns ``(weights_path, cfg_path)``.
        """
        from fastsae.loading.disk import save_sae

        return save_sae(self, path, sparsity=sparsity)

    @classmethod
    def load_from_disk(
        cls: type[T_SAE],
        path: str | Path,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        converter: Any = None,
        fold_W_dec_norm: bool = False,
        validate: bool = False,
    ) -> T_SAE:
        """Load an SAE directory written by sae-lens (6.x or older) or fastsae.

        ``converter=None`` also recognises Gemma Scope (``params.npz``), EleutherAI
        sparsify (``sae.safetensors``) and dictionary_learning (``ae.pt``) folders.
        ``dtype`` overrides the stored dtype; ``validate=True`` rejects NaN/inf weights.
        """
        from fastsae.loading.disk import load_sae_from_disk

        sae = load_sae_from_disk(
            path, device, dtype, converter, expected_cls=cls, validate=validate
        )
        if fold_W_dec_norm:
            sae.fold_W_dec_norm()
        return sae  # type: ignore[return-value]

    @classmethod
    def load_from_pretrained(
        cls: type[T_SAE], path: str | Path, device: str = "cpu", dtype: str | None = None
    ) -> T_SAE:
        """Deprecated spelling of :meth:`load_from_disk`."""
        warnings.warn(
            "load_from_pretrained is deprecated; use load_from_disk",
            DeprecationWarning,
            stacklevel=2,
        )
        return cls.load_from_disk(path, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(
        cls: type[T_SAE],
        release: str,
        sae_id: str,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        force_download: bool = False,
        converter: Any = None,
        fold_W_dec_norm: bool = False,
    ) -> T_SAE:
        """Load a pretrained SAE by SAELens release name, Hugging Face repo id
        (``sae_id`` = folder) or local repo directory.

        Downloads go through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE`` and
        ``force_download`` apply). Unpacking the result as ``sae, cfg_dict, sparsity``
        still works, with a DeprecationWarning.
        """
        return cls.from_pretrained_with_cfg_and_sparsity(
            release,
            sae_id,
            device=device,
            dtype=dtype,
            force_download=force_download,
            converter=converter,
            fold_W_dec_norm=fold_W_dec_norm,
        )[0]

    @classmethod
    def from_pretrained_with_cfg_and_sparsity(
        cls: type[T_SAE],
        release: str,
        sae_id: str,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        force_download: bool = False,
        converter: Any = None,
        fold_W_dec_norm: bool = False,
    ) -> tuple[T_SAE, dict[str, Any], Tensor | None]:
        """:meth:`from_pretrained` returning ``(sae, cfg_dict, log_sparsity)``
        (``log_sparsity [d_sae]`` or None when the release has none)."""
        from fastsae.loading.pretrained import load_pretrained

        return load_pretrained(  # type: ignore[return-value]
            release,
            sae_id,
            device=device,
            dtype=dtype,
            force_download=force_download,
            converter=converter,
            fold_W_dec_norm=fold_W_dec_norm,
            expected_cls=cls,
        )

    @classmethod
    def from_dict(cls: type[T_SAE], config_dict: dict[str, Any]) -> T_SAE:
        """A freshly initialised SAE of the architecture ``config_dict`` names."""
        from fastsae.saes import sae_class_for_architecture

        cfg = SAEConfig.from_dict(config_dict)
        sae_cls = sae_class_for_architecture(cfg.architecture())
        if not issubclass(sae_cls, cls):
            raise ValueError(f"architecture {cfg.architecture()!r} is not a {cls.__name__}")
        return sae_cls(cfg)  # type: ignore[return-value]

    @classmethod
    def from_sae_lens(cls, sae_lens_sae: Any, *, copy: bool = False) -> SAE:
        """Convert a live sae_lens SAE; ``copy=False`` shares its parameter tensors."""
        from fastsae.loading.sae_lens_bridge import from_sae_lens

        return from_sae_lens(sae_lens_sae, copy=copy)

    def to_sae_lens(self, *, copy: bool = True) -> Any:
        """The equivalent sae_lens SAE (sae-lens must be installed)."""
        from fastsae.loading.sae_lens_bridge import to_sae_lens

        return to_sae_lens(self, copy=copy)

    # ------------------------------------------------------------------ state-dict hooks
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        """Override to edit the state dict in place before it is written."""

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Override to edit the state dict in place after it is read."""

    # Tuple unpacking of from_pretrained, as SAELens < 6 returned (sae, cfg_dict, sparsity).
    def _legacy_tuple(self) -> tuple[Any, dict[str, Any], Tensor | None]:
        from fastsae.loading.pretrained import flat_cfg_dict

        return self, flat_cfg_dict(self), self._log_sparsity

    def __iter__(self) -> Iterator[Any]:
        warnings.warn(
            "Unpacking an SAE is deprecated: SAE.from_pretrained() returns only the SAE. "
            "Use SAE.from_pretrained_with_cfg_and_sparsity() for the (sae, cfg_dict, "
            "log_sparsity) tuple.",
            DeprecationWarning,
            stacklevel=2,
        )
        yield from self._legacy_tuple()

    def __getitem__(self, index: int) -> Any:
        warnings.warn(
            "Indexing an SAE is deprecated: SAE.from_pretrained() returns only the SAE. "
            "Use SAE.from_pretrained_with_cfg_and_sparsity().",
            DeprecationWarning,
            stacklevel=2,
        )
        items = self._legacy_tuple()
        if not -3 <= index < 3:
            raise IndexError(f"SAE tuple index {index} out of range")
        return items[index]
