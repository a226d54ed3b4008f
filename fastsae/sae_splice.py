"""The module that splices one SAE (or transcoder) into a TransformerLens hook point.

Used by :class:`fastsae.hooked.HookedSAETransformer`: ``_SAESplice`` replaces the
model's ``HookPoint`` at the SAE's output hook, captures a transcoder's input at its
input hook, adds the gradient-free error term when asked, and casts the SAE's output
back to the model's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

# the two hooks a splice fires itself; the SAE's other hooks are shared with the splice
_SPLICE_HOOKS = ("hook_sae_error", "hook_sae_output")
# token ids that ``exclude_special_tokens=True`` bypasses, read off the tokenizer
_SPECIAL_TOKEN_ATTRS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
)
_IDENTITY = nn.Identity()


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
    )


@contextmanager
def _hooks_disabled(sae: nn.Module) -> Iterator[None]:
    """Swap each of the SAE's hook points for an identity (the clean error-term pass)."""
    hooks = dict(sae.hook_dict)
    try:
        for name in hooks:
            setattr(sae, name, _IDENTITY)
        yield
    finally:
        for name, hook in hooks.items():
            setattr(sae, name, hook)


def _sae_prediction(sae: nn.Module, x: Tensor) -> Tensor:
    """What the SAE writes at its output hook for input ``x`` (error term not included).

    fastsae SAEs go through ``_reconstruct`` (sparse unless their activation hooks are in
    use) plus a transcoder's skip path; any other SAELens-style module through
    ``decode(encode(x))``.
    """
    reconstruct = getattr(sae, "_reconstruct", None)
    if reconstruct is None:
        return sae.decode(sae.encode(x))
    out = reconstruct(x)
    skip = getattr(sae, "_skip", None)
    if skip is not None:
        skip_out = skip(x)
        if skip_out is not None:
            out = out + skip_out.to(out.dtype)
    return out


def _hook_names(sae: nn.Module) -> tuple[str, str]:
    """``(input hook, output hook)`` of an SAE: equal unless it is a transcoder."""
    cfg = getattr(sae, "cfg", None)
    metadata = getattr(cfg, "metadata", None)
    hook_name = getattr(metadata, "hook_name", None)
    if not isinstance(hook_name, str) or not hook_name:
        raise ValueError(
            f"{type(sae).__name__} has no cfg.metadata.hook_name, so there is nowhere to "
            "attach it; set sae.cfg.metadata.hook_name (e.g. 'blocks.8.hook_resid_pre')"
        )
    return hook_name, getattr(metadata, "hook_name_out", None) or hook_name


def _get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)  # type: ignore[index]
    return module


def _set_module(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, last = path.rpartition(".")
    parent = _get_module(root, parent_path) if parent_path else root
    setattr(parent, last, value)


def _run_mlp_hook_in(mlp: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: pass the MLP's input through ``mlp.hook_in``."""
    if not args:
        return None
    return (mlp.hook_in(args[0]), *args[1:])


class _SAESplice(nn.Module):
    """Runs one SAE or transcoder in place of the model's HookPoint at its output hook.

    The SAE is kept out of the module tree (in ``__dict__``) and its hook points are
    registered on the splice instead, so cache keys read ``<hook>.hook_sae_acts_post``
    rather than ``<hook>.sae.hook_sae_acts_post``. ``hook_sae_error`` and
    ``hook_sae_output`` are the splice's own: it computes the error term.
    """

    def __init__(
        self,
        sae: nn.Module,
        in_name: str,
        out_name: str,
        use_error_term: bool,
        exclude_special_tokens: bool | list[int],
    ):
        super().__init__()
        self.__dict__["_sae"] = sae
        for name, hook in sae.hook_dict.items():
            if name not in _SPLICE_HOOKS:
                setattr(self, name, hook)
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()
        self.in_name = in_name
        self.out_name = out_name
        self.use_error_term = use_error_term
        self.exclude_special_tokens = exclude_special_tokens
        # the HookPoint this splice stands in for, put back when it is removed
        self.__dict__["_replaced"] = None
        # transcoders: the input hook's value in the current forward pass
        self.__dict__["_captured"] = None
        self.__dict__["_capture_target"] = None
        self.__dict__["_capture_handle"] = None
        self.__dict__["_token_mask"] = None

    @property
    def sae(self) -> nn.Module:
        return self.__dict__["_sae"]

    @property
    def is_transcoder(self) -> bool:
        return self.in_name != self.out_name

    # ------------------------------------------------------------------ transcoder input
    def _capture(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self.__dict__["_captured"] = output

    def capture_from(self, target: nn.Module) -> None:
        """Read the transcoder's input from ``target``'s output (re-homed when it changes)."""
        if self.__dict__["_capture_target"] is target:
            return
        self.release_capture()
        self.__dict__["_capture_handle"] = target.register_forward_hook(self._capture)
        self.__dict__["_capture_target"] = target

    def release_capture(self) -> None:
        handle = self.__dict__["_capture_handle"]
        if handle is not None:
            handle.remove()
        self.__dict__.update(_capture_handle=None, _capture_target=None, _captured=None)

    def clear_captured(self) -> None:
        self.__dict__["_captured"] = None

    def set_token_mask(self, mask: Tensor | None) -> None:
        """``[batch, pos]`` bool, True where the SAE is bypassed; None for no mask."""
        self.__dict__["_token_mask"] = mask

    def restore_hook_names(self) -> None:
        """Give the SAE's hook points back their own names (the model renamed them)."""
        for name, hook in self.sae.hook_dict.items():
            hook.name = name

    # ------------------------------------------------------------------ forward
    def forward(self, original: Tensor) -> Tensor:
        """``original [batch, pos, ...]``: the activations at the output hook."""
        if self.is_transcoder:
            sae_in = self.__dict__["_captured"]
            self.__dict__["_captured"] = None
            if sae_in is None:
                raise RuntimeError(
                    f"transcoder reading {self.in_name!r} and writing {self.out_name!r}: "
                    f"{self.in_name!r} did not run before {self.out_name!r} in this forward "
                    "pass (a hook such as hook_mlp_in only runs once enabled, e.g. "
                    "model.set_use_hook_mlp_in(True))"
                )
        else:
            sae_in = original
        mask = self.__dict__["_token_mask"]
        if mask is not None:
            mask = mask.reshape(*mask.shape, *([1] * (original.dim() - mask.dim())))

        sae = self.sae
        sae_out = _sae_prediction(sae, sae_in)
        if self.use_error_term:
            with torch.no_grad():
                # the error is what the SAE misses with no intervention on its hooks; when
                # nothing is hooked the live pass is already that clean pass
                if any(_has_hooks(h) for h in sae.hook_dict.values()):
                    with _hooks_disabled(sae):
                        clean = _sae_prediction(sae, sae_in)
                else:
                    clean = sae_out
                sae_error = original - clean
                if mask is not None:
                    sae_error = torch.where(mask, torch.zeros_like(sae_error), sae_error)
                sae_error = self.hook_sae_error(sae_error)
            sae_out = sae_out + sae_error
        if mask is not None:
            sae_out = torch.where(mask, original, sae_out)
        # the stream keeps the model's dtype whatever the SAE's
        return self.hook_sae_output(sae_out.to(original.dtype))

    def extra_repr(self) -> str:
        where = self.in_name if not self.is_transcoder else f"{self.in_name} -> {self.out_name}"
        return f"{type(self.sae).__name__} at {where}, use_error_term={self.use_error_term}"
