"""SAETransformerBridge: a TransformerLens ``TransformerBridge`` with SAEs spliced in.

The TransformerLens 4 counterpart of :class:`fastsae.HookedSAETransformer` (which needs
TransformerLens 3's ``HookedTransformer``), with SAELens 6.x's ``SAETransformerBridge``
API: ``add_sae``, ``reset_saes``, ``run_with_saes``, ``run_with_cache_with_saes``,
``run_with_hooks_with_saes``, the ``saes`` context manager, ``acts_to_saes`` and
``get_sae_hook_name``. The splicing itself (error term, transcoders, the sparse path) is
:mod:`fastsae.sae_splice`'s, shared with ``HookedSAETransformer``. What differs on a bridge:

- A bridge names most hooks by alias (``blocks.1.hook_resid_pre`` is the module
  ``blocks.1.hook_in``). The splice stands at the module; its hooks are listed under both
  spellings, ``blocks.1.hook_in.hook_sae_acts_post`` (SAELens's key) and
  ``blocks.1.hook_resid_pre.hook_sae_acts_post`` (the key ``HookedSAETransformer`` uses).
- ``exclude_special_tokens`` is not offered (SAELens's bridge has none either).

Build one with ``SAETransformerBridge.boot_transformers(name)``, ``boot_native(config)``
(a small random TransformerLens-native model, offline) or ``from_bridge(bridge)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn
from transformer_lens.hook_points import HookPoint

from fastsae.sae_splice import SAEs, SAESplice, SAESplices, get_module, hook_names_of
from fastsae.tl_compat import require_transformer_bridge

TransformerBridge = require_transformer_bridge()

__all__ = ["SAETransformerBridge"]


def _hook_points(splice: SAESplice) -> Iterator[tuple[str, HookPoint]]:
    for name, module in splice.named_modules():
        if name and isinstance(module, HookPoint):
            yield name, module


class SAETransformerBridge(TransformerBridge):
    """A ``TransformerBridge`` that can run with SAEs (and transcoders) spliced in."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._sae_splices = SAESplices(self)
        # {module path: (registry names, name) of the hook point a splice stands in for}
        self._displaced_hooks: dict[str, tuple[list[str], str | None]] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bridge(cls, bridge: Any) -> SAETransformerBridge:
        """``bridge`` (a ``TransformerBridge``) as an ``SAETransformerBridge``.

        The bridge is converted in place, not copied (a copy would double the model's
        memory): afterwards ``bridge`` is the returned object.
        """
        if isinstance(bridge, cls):
            return bridge
        if not isinstance(bridge, TransformerBridge):
            raise TypeError(
                f"from_bridge needs a transformer_lens TransformerBridge, got "
                f"{type(bridge).__name__}"
            )
        # TransformerLens builds bridges inside its boot functions, which take no class
        # to build; the subclass adds only methods and two plain attributes (set here), so
        # re-classing the instance is safe.
        bridge.__class__ = cls
        bridge._sae_splices = SAESplices(bridge)
        bridge._displaced_hooks = {}
        return bridge

    @classmethod
    def boot_transformers(cls, model_name: str, **kwargs: Any) -> SAETransformerBridge:  # type: ignore[override]
        """``TransformerBridge.boot_transformers(model_name, **kwargs)`` with SAE support
        (e.g. ``hf_model=`` a ``transformers`` model already in memory)."""
        return cls.from_bridge(TransformerBridge.boot_transformers(model_name, **kwargs))

    @classmethod
    def boot_native(cls, config: Any, **kwargs: Any) -> SAETransformerBridge:  # type: ignore[override]
        """``TransformerBridge.boot_native(config, **kwargs)`` (a randomly initialised
        TransformerLens-native model, no download) with SAE support."""
        return cls.from_bridge(TransformerBridge.boot_native(config, **kwargs))

    # ------------------------------------------------------------------ attached SAEs
    @property
    def acts_to_saes(self) -> dict[str, nn.Module]:
        """``{hook_name: sae}`` for every attached SAE (keyed by its input hook)."""
        return self._sae_splices.acts_to_saes()

    def add_sae(self, sae: nn.Module, use_error_term: bool | None = None) -> None:
        """Splice ``sae`` into the model until :meth:`reset_saes` removes it.

        An SAE already attached at the same ``hook_name`` is replaced.

        Args:
            sae: a fastsae SAE (any architecture, transcoders included); it reads at
                ``sae.cfg.metadata.hook_name`` and writes at ``hook_name_out`` (or the
                same hook), each a hook name of this bridge (an alias or its target).
            use_error_term: add the SAE's reconstruction error back so the model's
                output is unchanged; None uses ``sae.use_error_term``.

        Raises:
            ValueError: the SAE's hook is not a hook point of this model, or another
                SAE already writes at its output hook.
        """
        self._sae_splices.add(sae, use_error_term, False)

    def reset_saes(self, act_names: str | list[str] | None = None) -> None:
        """Remove the SAEs attached at ``act_names`` (their input hooks), or all of them."""
        self._sae_splices.reset(act_names)

    def get_sae_hook_name(self, sae: nn.Module, internal: str = "hook_sae_acts_post") -> str:
        """The bridge's canonical name of one of ``sae``'s hooks, e.g.
        ``blocks.1.hook_in.hook_sae_acts_post`` for an SAE at ``blocks.1.hook_resid_pre``
        (the SAE's own spelling, ``blocks.1.hook_resid_pre.hook_sae_acts_post``, works too)."""
        out_name = hook_names_of(sae)[1]
        return f"{self._sae_splices.path_of(out_name)}.{internal}"

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """The bridge's hook points and aliases, with the attached SAEs' hooks; a name whose
        hook point an SAE stands in for is left out while it is attached."""
        with warnings.catch_warnings():
            if self._sae_splices.by_input:
                # an alias whose hook point a splice replaced does not resolve, as intended
                warnings.filterwarnings("ignore", message=r".*hook alias\(es\) did not resolve")
            hooks = super().hook_dict
        return {n: h for n, h in hooks.items() if isinstance(h, HookPoint)}

    # SpliceHost: hooks are found by alias and indexed in the bridge's hook registry
    def splice_targets(self) -> Collection[str]:
        """The hook names an SAE may attach at (:class:`fastsae.sae_splice.SpliceHost`)."""
        return self.hook_dict.keys()

    def splice_path(self, hook_name: str) -> str:
        """The module path of ``hook_name``: of the names its hook point is registered
        under (the bridge lists aliases too), the one its parent module holds it as."""
        hook = self.hook_dict.get(hook_name)
        if hook is None:
            return hook_name
        names = [hook_name, *(n for n, h in self._hook_registry.items() if h is hook)]
        for path in names:
            parent_path, _, last = path.rpartition(".")
            try:
                parent = get_module(self, parent_path) if parent_path else self
            except (AttributeError, IndexError):
                continue
            if parent._modules.get(last) is hook:
                return path
        raise ValueError(
            f"cannot attach SAE at {hook_name!r}: its hook point is not a submodule of this "
            f"bridge under any of its names ({', '.join(sorted(set(names)))}), so there is "
            "no place to splice the SAE in"
        )

    def splice_attached(self, splice: SAESplice) -> None:
        """List the splice's hooks (under both spellings of its hook) instead of the hook
        point it stands in for (under every name the registry had for it)."""
        registry = self._hook_registry
        replaced = splice.__dict__["_replaced"]
        displaced = [n for n, h in registry.items() if h is replaced]
        for name in displaced:
            del registry[name]
        # putting the hook point back renames it to its attribute name; its full name
        # is what the bridge resolves aliases by
        self._displaced_hooks[splice.out_path] = (displaced, replaced.name)
        for name, hook in _hook_points(splice):
            hook.name = f"{splice.out_path}.{name}"
            for prefix in {splice.out_path, splice.out_name}:
                registry[f"{prefix}.{name}"] = hook
        self._aliases_changed()

    def splice_detached(self, splice: SAESplice) -> None:
        """List the hook point that is back at ``splice.out_path`` again, by its names."""
        registry = self._hook_registry
        for name, _ in _hook_points(splice):
            for prefix in (splice.out_path, splice.out_name):
                registry.pop(f"{prefix}.{name}", None)
        original = get_module(self, splice.out_path)
        names, original.name = self._displaced_hooks.pop(
            splice.out_path, ([splice.out_path], splice.out_path)
        )
        for name in names:
            registry[name] = original
        self._aliases_changed()

    def _aliases_changed(self) -> None:
        # The bridge memoises block aliases keyed on the registry's size, which can come
        # back to an earlier value with other hooks in it.
        if "_block_alias_cache" in self.__dict__:
            self._block_alias_cache = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``TransformerBridge.forward``; no transcoder input left over from an earlier,
        interrupted pass is used."""
        self._sae_splices.clear_captured()
        return super().forward(*args, **kwargs)

    # ------------------------------------------------------------------ running with SAEs
    @contextmanager
    def saes(
        self,
        saes: SAEs = None,
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
    ) -> Iterator[SAETransformerBridge]:
        """Attach ``saes`` for the duration of the ``with`` block.

        On exit (with ``reset_saes_end``) the SAEs added here are removed and the ones
        they displaced come back as they were.
        """
        with self._sae_splices.attached(saes, reset_saes_end, use_error_term, False):
            yield self

    def run_with_saes(
        self,
        *model_args: Any,
        saes: SAEs = None,
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        **model_kwargs: Any,
    ) -> Any:
        """The model's forward pass with ``saes`` attached for it (see :meth:`saes`)."""
        with self.saes(saes=saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(
        self,
        *model_args: Any,
        saes: SAEs = None,
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """``run_with_cache`` with ``saes`` attached: ``(output, cache)``, the cache holding
        the SAEs' hooks (``<hook>.hook_sae_acts_post`` etc., see :meth:`get_sae_hook_name`)."""
        with self.saes(saes=saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self.run_with_cache(
                *model_args,
                return_cache_object=return_cache_object,
                remove_batch_dim=remove_batch_dim,
                **kwargs,
            )

    def run_with_hooks_with_saes(
        self,
        *model_args: Any,
        saes: SAEs = None,
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        fwd_hooks: Sequence[tuple[str | Callable, Callable]] = (),
        bwd_hooks: Sequence[tuple[str | Callable, Callable]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """``run_with_hooks`` with ``saes`` attached: hooks may target the SAEs' hooks,
        e.g. ``("blocks.1.hook_resid_pre.hook_sae_acts_post", ablate)``."""
        with self.saes(saes=saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self.run_with_hooks(
                *model_args,
                fwd_hooks=list(fwd_hooks),
                bwd_hooks=list(bwd_hooks),
                reset_hooks_end=reset_hooks_end,
                clear_contexts=clear_contexts,
                **model_kwargs,
            )
