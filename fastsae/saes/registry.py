"""The architecture registry: one entry per architecture name, consulted by loading,
training, latent sharding and the communication estimates alike.

An architecture is one module that defines its classes and ends with one call::

    register(
        "topk",
        TopKSAE, TopKSAEConfig,                     # inference (what is saved and loaded)
        training_cls=TopKTrainingSAE,
        training_cfg_cls=TopKTrainingSAEConfig,
        sharded=ShardedTopKTrainingSAE,             # optional: latent sharding
    )

Any part may be left out: ``batchtopk`` registers only training classes (it is saved as
``jumprelu``), the transcoders only inference ones. Registering a part that is already
registered with a different class is an error, as in SAELens (the same class again is a
no-op, so re-importing a module is harmless). SAELens's own entry points,
:func:`register_sae_class` and :func:`register_sae_training_class`, register here too.

The built-in architectures live in the modules of :data:`BUILTIN_MODULES`; they depend
on this module (to call :func:`register`), so this module imports them only when a
lookup first needs them (:func:`_load_builtins`), never at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: those modules import this one
    from fastsae.saes.base import SAE
    from fastsae.saes.config import SAEConfig
    from fastsae.saes.training_sae import TrainingSAE, TrainingSAEConfig

BUILTIN_MODULES = (
    "fastsae.saes.standard",
    "fastsae.saes.gated",
    "fastsae.saes.jumprelu",
    "fastsae.saes.topk",
    "fastsae.saes.batchtopk",
    "fastsae.saes.transcoder",
    "fastsae.saes.matching_pursuit",
    "fastsae.saes.temporal",
)
PARTS = ("sae_cls", "cfg_cls", "training_cls", "training_cfg_cls", "sharded")


@dataclass(frozen=True)
class Architecture:
    """What is registered under one architecture name (``None``: that part is absent)."""

    name: str
    sae_cls: type[SAE] | None = None
    cfg_cls: type[SAEConfig] | None = None
    training_cls: type[TrainingSAE] | None = None
    training_cfg_cls: type[TrainingSAEConfig] | None = None
    sharded: type | None = None


_REGISTRY: dict[str, Architecture] = {}
_builtins_loaded = False


def register(
    architecture: str,
    sae_cls: type[SAE] | None = None,
    cfg_cls: type[SAEConfig] | None = None,
    *,
    training_cls: type[TrainingSAE] | None = None,
    training_cfg_cls: type[TrainingSAEConfig] | None = None,
    sharded: type | None = None,
) -> Architecture:
    """Register (or replace) the given parts of ``architecture``; returns its entry.

    Classes must come in pairs (``sae_cls`` with ``cfg_cls``, ``training_cls`` with
    ``training_cfg_cls``) and each config class must name ``architecture``.
    """
    if not isinstance(architecture, str) or not architecture:
        raise ValueError(f"architecture must be a non-empty str, got {architecture!r}")
    for cls, cfg, what in (
        (sae_cls, cfg_cls, "sae_cls and cfg_cls"),
        (training_cls, training_cfg_cls, "training_cls and training_cfg_cls"),
    ):
        if (cls is None) != (cfg is None):
            raise ValueError(f"register({architecture!r}): give {what} together")
        if cfg is not None and cfg.architecture() != architecture:
            raise ValueError(
                f"register({architecture!r}): {cfg.__name__} names architecture "
                f"{cfg.architecture()!r}"
            )
    given = {
        name: value
        for name, value in zip(
            PARTS, (sae_cls, cfg_cls, training_cls, training_cfg_cls, sharded), strict=True
        )
        if value is not None
    }
    if not given:
        raise ValueError(f"register({architecture!r}): nothing to register")
    _load_builtins()  # a user's registration meets the built-ins, as in SAELens
    current = _REGISTRY.get(architecture, Architecture(architecture))
    for part, value in given.items():
        existing = getattr(current, part)
        if existing is not None and existing is not value:
            raise ValueError(
                f"architecture {architecture!r} already has {part}={existing.__name__}; "
                f"cannot register {value.__name__}"
            )
    entry = replace(current, **given)
    _REGISTRY[architecture] = entry
    return entry


def unregister(architecture: str) -> Architecture:
    """Remove ``architecture`` (every part) from the registry and return its entry, e.g.
    to undo a temporary registration; a built-in removed this way stays removed for the
    rest of the process."""
    _load_builtins()
    try:
        return _REGISTRY.pop(architecture)
    except KeyError:
        raise ValueError(f"architecture {architecture!r} is not registered") from None


def register_sae_class(
    architecture: str, sae_class: type[SAE], sae_config_class: type[SAEConfig]
) -> None:
    """SAELens's ``register_sae_class``: the inference class and config of ``architecture``."""
    register(architecture, sae_class, sae_config_class)


def register_sae_training_class(
    architecture: str,
    sae_training_class: type[TrainingSAE],
    sae_training_config_class: type[TrainingSAEConfig],
) -> None:
    """SAELens's ``register_sae_training_class``: the training class and config of
    ``architecture``."""
    register(
        architecture, training_cls=sae_training_class, training_cfg_cls=sae_training_config_class
    )


def _load_builtins() -> None:
    # the built-in modules call register() when imported; importing them here at module
    # level would be a cycle (they import this module)
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def architectures(part: str = "sae_cls") -> list[str]:
    """Sorted names of the architectures that have ``part`` (one of :data:`PARTS`)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    _load_builtins()
    return sorted(name for name, entry in _REGISTRY.items() if getattr(entry, part) is not None)


def lookup(architecture: str, part: str, error: type[Exception] = ValueError) -> Any:
    """``part`` of ``architecture``; ``error`` naming the known ones when it is absent."""
    _load_builtins()
    entry = _REGISTRY.get(architecture)
    value = None if entry is None else getattr(entry, part)
    if value is None:
        known = architectures(part)
        if part == "sharded":
            raise error(f"latent sharding supports architectures {known}, not {architecture!r}")
        kind = "training architecture" if part.startswith("training") else "SAE architecture"
        raise error(f"unknown {kind} {architecture!r}; known: {known}")
    return value


def sae_class_for_architecture(architecture: str) -> type[SAE]:
    """The inference SAE class registered for ``architecture``."""
    return lookup(architecture, "sae_cls")


def config_class_for_architecture(architecture: str) -> type[SAEConfig]:
    """The inference config class registered for ``architecture``."""
    return lookup(architecture, "cfg_cls")


def training_sae_class_for_architecture(architecture: str) -> type[TrainingSAE]:
    """The training SAE class registered for ``architecture``."""
    return lookup(architecture, "training_cls")


def training_config_class_for_architecture(architecture: str) -> type[TrainingSAEConfig]:
    """The training config class registered for ``architecture``."""
    return lookup(architecture, "training_cfg_cls")


def sharded_class_for_architecture(architecture: str) -> type:
    """The latent-sharded training class of ``architecture`` (NotImplementedError when the
    architecture has none)."""
    return lookup(architecture, "sharded", NotImplementedError)


def known_architectures() -> list[str]:
    """Sorted names of the architectures that load as inference SAEs."""
    return architectures("sae_cls")


class RegistryView(Mapping):
    """A read-only, always-current ``{architecture: class}`` view of one registry part
    (``SAE_CLASSES``, ``SHARDED_CLASSES``)."""

    def __init__(self, part: str) -> None:
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.part = part

    def __getitem__(self, architecture: str) -> type:
        _load_builtins()
        entry = _REGISTRY.get(architecture)
        value = None if entry is None else getattr(entry, self.part)
        if value is None:
            raise KeyError(architecture)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(architectures(self.part))

    def __len__(self) -> int:
        return len(architectures(self.part))

    def __repr__(self) -> str:
        return f"RegistryView({self.part!r}, {dict(self)!r})"
