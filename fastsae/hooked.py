"""HookedSAETransformer: a TransformerLens model with SAEs spliced into its hook points.

The API and behaviour are SAELens 6.x's (``add_sae``, ``reset_saes``, ``run_with_saes``,
``run_with_cache_with_saes``, ``run_with_hooks_with_saes``, the ``saes`` context
manager, ``acts_to_saes``), for fastsae SAEs of every architecture:

- An SAE replaces the model's ``HookPoint`` at ``sae.cfg.metadata.hook_name`` with a
  small splice module, so its hooks show up as ``<hook_name>.hook_sae_acts_post`` etc.
  (and ``<hook_name>`` itself is no longer a hook point while the SAE is attached).
- A transcoder reads at ``hook_name`` and writes at ``metadata.hook_name_out``: its
  input is captured at the first hook, and the splice sits at the second. Every MLP
  gets a ``mlp.hook_in`` hook point (the MLP's input) for transcoders to read.
- ``use_error_term=True`` adds back the (gradient-free) reconstruction error, so the
  model's outputs equal the clean model's while the SAE's hooks stay live.
- The SAE runs on its sparse path unless something is hooked on its activation hooks
  (caching ``hook_sae_acts_post`` shows the dense activations, exactly as SAELens).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from fastsae.sae_splice import (
    SPECIAL_TOKEN_ATTRS,
    SAEs,
    SAESplice,
    SAESplices,
    run_mlp_hook_in,
)
from fastsae.tl_compat import require_hooked_transformer

HookedTransformer = require_hooked_transformer()

__all__ = ["HookedSAETransformer"]


class HookedSAETransformer(HookedTransformer):
    """A ``HookedTransformer`` that can run with SAEs (and transcoders) spliced in.

    Construct it as a ``HookedTransformer``: from a ``HookedTransformerConfig``, or with
    ``HookedSAETransformer.from_pretrained(...)`` / ``from_pretrained_no_processing``.
    """

    def __init__(self, *model_args: Any, **model_kwargs: Any):
        super().__init__(*model_args, **model_kwargs)
        # ``mlp.hook_in``: the MLP's input, where MLP transcoders read (as in SAELens).
        # A forward pre-hook rather than a patched ``forward``, so copies stay correct.
        for block in self.blocks:
            mlp = getattr(block, "mlp", None)
            if mlp is not None and not hasattr(mlp, "hook_in"):
                mlp.hook_in = HookPoint()
                mlp.register_forward_pre_hook(run_mlp_hook_in)
        self._sae_splices = SAESplices(self)
        # the token ids embedded so far while ``generate`` runs (see _token_masks)
        self._generated_tokens: list[Tensor] | None = None
        self.setup()

    # ------------------------------------------------------------------ attached SAEs
    @property
    def acts_to_saes(self) -> dict[str, nn.Module]:
        """``{hook_name: sae}`` for every attached SAE (keyed by its input hook)."""
        return self._sae_splices.acts_to_saes()

    def add_sae(
        self,
        sae: nn.Module,
        use_error_term: bool | None = None,
        exclude_special_tokens: bool | list[int] = False,
    ) -> None:
        """Splice ``sae`` into the model until :meth:`reset_saes` removes it.

        An SAE already attached at the same ``hook_name`` is replaced.

        Args:
            sae: a fastsae SAE (any architecture, transcoders included); it reads at
                ``sae.cfg.metadata.hook_name`` and writes at ``hook_name_out`` (or the
                same hook).
            use_error_term: add the SAE's reconstruction error back so the model's
                output is unchanged; None uses ``sae.use_error_term``. The SAE itself is
                not modified.
            exclude_special_tokens: True bypasses the SAE at the tokenizer's BOS, EOS,
                PAD, SEP and decoder-start tokens; a list gives the token ids instead.

        Raises:
            ValueError: the SAE's hook is not a hook point of this model, or another
                SAE already writes at its output hook.
        """
        self._sae_splices.add(sae, use_error_term, exclude_special_tokens)

    def reset_saes(self, act_names: str | list[str] | None = None) -> None:
        """Remove the SAEs attached at ``act_names`` (their input hooks), or all of them.

        The model's original hook points come back (with any hooks they had).
        """
        self._sae_splices.reset(act_names)

    # SpliceHost: a HookedTransformer names hooks by module path; setup() re-indexes them
    def splice_targets(self) -> Collection[str]:
        """The hook names an SAE may attach at (:class:`fastsae.sae_splice.SpliceHost`)."""
        return self.hook_dict.keys()

    def splice_path(self, hook_name: str) -> str:
        """The module path of a hook: its name."""
        return hook_name

    def splice_attached(self, splice: SAESplice) -> None:
        """Re-index the hook points once a splice is in (its hooks join ``hook_dict``)."""
        self.setup()

    def splice_detached(self, splice: SAESplice) -> None:
        """Re-index the hook points once the original hook point is back."""
        self.setup()

    # ------------------------------------------------------------------ special tokens
    def _compute_exclusion_mask(
        self, tokens: Tensor, exclude_special_tokens: bool | list[int]
    ) -> Tensor:
        """``[batch, pos]`` bool, True where ``tokens`` is one of the excluded ids."""
        if isinstance(exclude_special_tokens, (list, tuple)):
            token_ids = list(exclude_special_tokens)
        elif self.tokenizer is None:
            warnings.warn(
                "exclude_special_tokens=True but the model has no tokenizer; pass a list of "
                "token ids to exclude instead. The SAE runs at every position.",
                stacklevel=4,
            )
            token_ids = []
        else:
            ids = (getattr(self.tokenizer, attr, None) for attr in SPECIAL_TOKEN_ATTRS)
            token_ids = sorted({i for i in ids if i is not None})
        if not token_ids:
            return torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
        return torch.isin(tokens, torch.tensor(token_ids, device=tokens.device))

    @contextmanager
    def _token_masks(self, input: Any, kwargs: dict[str, Any]) -> Iterator[None]:
        """Set each masked splice's exclusion mask for one forward pass."""
        masked = self._sae_splices.masked()
        if masked:
            tokens = kwargs.get("tokens")
            if isinstance(input, Tensor):
                if not input.is_floating_point():
                    tokens = input
                elif tokens is None and self._generated_tokens is not None:
                    tokens = self._tokens_for_generation_step(input)
            elif input is not None:
                tokens = self.to_tokens(
                    input,
                    prepend_bos=kwargs.get("prepend_bos"),
                    padding_side=kwargs.get("padding_side"),
                    move_to_device=True,
                    truncate=True,
                )
            # no token ids (embeddings or a residual given as input): nothing to match
            for splice in masked:
                mask = None
                if tokens is not None:
                    mask = self._compute_exclusion_mask(tokens, splice.exclude_special_tokens)
                splice.set_token_mask(mask)
        try:
            yield
        finally:
            for splice in masked:
                splice.set_token_mask(None)

    def _tokens_for_generation_step(self, residual: Tensor) -> Tensor | None:
        """The token ids behind ``residual [batch, pos, d_model]`` inside ``generate``.

        TransformerLens's ``generate`` feeds the forward pass embeddings, not tokens; the
        ids come from what went through ``self.embed`` so far (the prompt, then one
        sampled token per step), of which the last ``pos`` are this step's.
        """
        seen = self._generated_tokens or []
        if not seen:
            return None
        so_far = torch.cat(seen, dim=1)
        n = residual.shape[1]
        if so_far.shape[0] != residual.shape[0] or so_far.shape[1] < n:
            return None  # the prompt was given as embeddings: ids unknown
        return so_far[:, so_far.shape[1] - n :]

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``HookedTransformer.generate``; SAEs with ``exclude_special_tokens`` still
        bypass those tokens (the prompt's and the generated ones)."""
        if not self._sae_splices.masked():
            return super().generate(*args, **kwargs)
        seen: list[Tensor] = []

        def record(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if inputs and isinstance(inputs[0], Tensor) and inputs[0].dim() == 2:
                seen.append(inputs[0])

        handle = self.embed.register_forward_pre_hook(record)
        self._generated_tokens = seen
        try:
            return super().generate(*args, **kwargs)
        finally:
            handle.remove()
            self._generated_tokens = None

    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """``HookedTransformer.forward`` with the SAEs' per-pass state set up."""
        self._sae_splices.clear_captured()
        with self._token_masks(input, kwargs):
            return super().forward(input, *args, **kwargs)

    # ------------------------------------------------------------------ running with SAEs
    @contextmanager
    def saes(
        self,
        saes: SAEs = None,
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        exclude_special_tokens: bool | list[int] = False,
    ) -> Iterator[HookedSAETransformer]:
        """Attach ``saes`` for the duration of the ``with`` block.

        On exit (with ``reset_saes_end``) the SAEs added here are removed and the ones
        they displaced come back as they were. ``use_error_term`` / ``exclude_special_tokens``
        apply to the SAEs attached here, as in :meth:`add_sae`.
        """
        with self._sae_splices.attached(
            saes, reset_saes_end, use_error_term, exclude_special_tokens
        ):
            yield self

    def run_with_saes(
        self,
        *model_args: Any,
        saes: SAEs = None,
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        exclude_special_tokens: bool | list[int] = False,
        **model_kwargs: Any,
    ) -> Any:
        """The model's forward pass with ``saes`` attached for it (see :meth:`saes`)."""
        with self.saes(
            saes=saes,
            reset_saes_end=reset_saes_end,
            use_error_term=use_error_term,
            exclude_special_tokens=exclude_special_tokens,
        ):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(
        self,
        *model_args: Any,
        saes: SAEs = None,
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        exclude_special_tokens: bool | list[int] = False,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """``run_with_cache`` with ``saes`` attached: ``(output, cache)``.

        The cache holds the SAEs' hooks under their hook, e.g.
        ``blocks.8.hook_resid_pre.hook_sae_acts_post`` (dense ``[batch, pos, d_sae]``),
        ``...hook_sae_input``, ``...hook_sae_recons``, ``...hook_sae_output`` and, with the
        error term, ``...hook_sae_error``.
        """
        with self.saes(
            saes=saes,
            reset_saes_end=reset_saes_end,
            use_error_term=use_error_term,
            exclude_special_tokens=exclude_special_tokens,
        ):
            return self.run_with_cache(  # type: ignore[call-overload]
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
        exclude_special_tokens: bool | list[int] = False,
        fwd_hooks: Sequence[tuple[str | Callable, Callable]] = (),
        bwd_hooks: Sequence[tuple[str | Callable, Callable]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """``run_with_hooks`` with ``saes`` attached: hooks may target the SAEs' hook
        points, e.g. ``("blocks.8.hook_resid_pre.hook_sae_acts_post", ablate)``."""
        with self.saes(
            saes=saes,
            reset_saes_end=reset_saes_end,
            use_error_term=use_error_term,
            exclude_special_tokens=exclude_special_tokens,
        ):
            return self.run_with_hooks(
                *model_args,
                fwd_hooks=list(fwd_hooks),
                bwd_hooks=list(bwd_hooks),
                reset_hooks_end=reset_hooks_end,
                clear_contexts=clear_contexts,
                **model_kwargs,
            )
