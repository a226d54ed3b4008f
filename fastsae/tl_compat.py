"""Which TransformerLens is installed, and what fastsae can splice SAEs into with it.

fastsae supports TransformerLens 3 and 4. ``HookedTransformer`` (and so
:class:`fastsae.HookedSAETransformer` and ``model_class_name: HookedTransformer``) exists
only in 3.x; ``TransformerBridge`` (and so :class:`fastsae.SAETransformerBridge` and
``model_class_name: TransformerBridge``) in 4.x and in the 3.x releases that ship
``transformer_lens.model_bridge``. The ``require_*`` functions return the class or raise
an ImportError that names the installed version and the class to use instead.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import transformer_lens

__all__ = [
    "has_hooked_transformer",
    "has_transformer_bridge",
    "require_hooked_transformer",
    "require_transformer_bridge",
    "transformer_lens_version",
]


def transformer_lens_version() -> str:
    """The installed transformer-lens distribution's version, e.g. ``"4.3.0"``."""
    try:
        return importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (no transformer-lens distribution metadata)"


def _load(name: str) -> Any | None:
    """``transformer_lens.<name>``, or None where this TransformerLens has none."""
    try:
        if name == "TransformerBridge":
            # optional dependency: model_bridge is in TransformerLens 4 and late 3.x only
            # (imported per call, so a test can hide it through sys.modules)
            from transformer_lens.model_bridge import TransformerBridge

            return TransformerBridge
        return getattr(transformer_lens, name)
    except (ImportError, AttributeError):
        return None


def has_hooked_transformer() -> bool:
    """True where ``transformer_lens.HookedTransformer`` exists (TransformerLens 3.x)."""
    return _load("HookedTransformer") is not None


def has_transformer_bridge() -> bool:
    """True where ``transformer_lens.model_bridge.TransformerBridge`` exists (TransformerLens
    4.x and late 3.x), so :class:`fastsae.SAETransformerBridge` can be used."""
    return _load("TransformerBridge") is not None


def require_hooked_transformer() -> type:
    """``transformer_lens.HookedTransformer``; an ImportError naming the installed version
    and pointing to the TransformerBridge path where it does not exist."""
    cls = _load("HookedTransformer")
    if cls is None:
        raise ImportError(
            f"HookedTransformer is not in the installed TransformerLens "
            f"{transformer_lens_version()} (it exists only in TransformerLens 3.x), so "
            "fastsae.HookedSAETransformer and model_class_name 'HookedTransformer' are "
            "unavailable. With TransformerLens 4 use fastsae.SAETransformerBridge "
            "(SAETransformerBridge.boot_transformers(name)) and model_class_name "
            "'TransformerBridge'; or install 'transformer-lens>=3,<4' for HookedTransformer."
        )
    return cls


def require_transformer_bridge() -> type:
    """``transformer_lens.model_bridge.TransformerBridge``; an ImportError naming the
    installed version and pointing to HookedTransformer where it does not exist."""
    cls = _load("TransformerBridge")
    if cls is None:
        raise ImportError(
            f"TransformerBridge is not in the installed TransformerLens "
            f"{transformer_lens_version()} (it comes with transformer_lens.model_bridge, in "
            "TransformerLens 4 and the late 3.x releases), so fastsae.SAETransformerBridge "
            "and model_class_name 'TransformerBridge' are unavailable. Use "
            "fastsae.HookedSAETransformer and model_class_name 'HookedTransformer', or "
            "install 'transformer-lens>=4,<5'."
        )
    return cls
