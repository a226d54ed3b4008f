"""Splicing SAEs (and transcoders) into the hook points of a TransformerLens model.

``SAESplice`` replaces the model's ``HookPoint`` at the SAE's output hook, captures a
transcoder's input at its input hook, adds the gradient-free error term when asked, and
casts the SAE's output back to the model's dtype. ``SAESplices`` is the set of splices
attached to one model (attach, replace, reset, the ``saes`` context): the bookkeeping
shared by :class:`fastsae.hooked.HookedSAETransformer` (TransformerLens 3) and
:class:`fastsae.sae_bridge.SAETransformerBridge` (a ``TransformerBridge``), which differ only
in how a hook name maps to a module and what the model re-indexes after a change
(:class:`SpliceHost`).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

# the two hooks a splice fires itself; the SAE's other hooks are shared with the splice
_SPLICE_HOOKS = ("hook_sae_error", "hook_sae_output")
# token ids that ``exclude_special_tokens=True`` bypasses, read off the tokenizer
SPECIAL_TOKEN_ATTRS = (
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


@contextmanager
def _flat_input(sae: nn.Module, x: Tensor) -> Iterator[None]:
    """Run a hook_z SAE without its head flattening when ``x`` is already flat.

    A TransformerBridge's ``hook_z`` module gets ``[batch, pos, n_heads * d_head]`` (it
    splits heads only for the hook functions it calls), where HookedTransformer's gets
    ``[..., n_heads, d_head]``.
    """
    cfg = getattr(sae, "cfg", None)
    if not getattr(sae, "hook_z_reshaping_mode", False) or x.shape[-1] != cfg.d_in:
        yield
        return
    sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        yield
    finally:
        sae.turn_on_forward_pass_hook_z_reshaping()


def hook_names_of(sae: nn.Module) -> tuple[str, str]:
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


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)  # type: ignore[index]
    return module


def set_module(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, last = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    setattr(parent, last, value)


def run_mlp_hook_in(mlp: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: pass the MLP's input through ``mlp.hook_in``."""
    if not args:
        return None
    return (mlp.hook_in(args[0]), *args[1:])


class SAESplice(nn.Module):
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
        in_path: str | None = None,
        out_path: str | None = None,
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
        # the module paths of the two hooks (a TransformerBridge names a hook by an alias)
        self.in_path = in_path or in_name
        self.out_path = out_path or out_name
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
        with _flat_input(sae, sae_in):
            sae_out = _sae_prediction(sae, sae_in)
            clean = None
            if self.use_error_term:
                with torch.no_grad():
                    # the error is what the SAE misses with no intervention on its hooks;
                    # when nothing is hooked the live pass is already that clean pass
                    clean = sae_out
                    if any(_has_hooks(h) for h in sae.hook_dict.values()):
                        with _hooks_disabled(sae):
                            clean = _sae_prediction(sae, sae_in)
        if clean is not None:
            with torch.no_grad():
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


SAEs = nn.Module | Sequence[nn.Module] | None


class SpliceHost(Protocol):
    """What :class:`SAESplices` needs of the model it splices SAEs into."""

    def splice_targets(self) -> Collection[str]:
        """The hook names an SAE may read or write at (the model's hook points)."""
        ...

    def splice_path(self, hook_name: str) -> str:
        """The module path of ``hook_name`` (the name itself unless it is an alias)."""
        ...

    def splice_attached(self, splice: SAESplice) -> None:
        """Called once ``splice`` stands at ``splice.out_path``: re-index the hooks."""
        ...

    def splice_detached(self, splice: SAESplice) -> None:
        """Called once the original hook point is back at ``splice.out_path``."""
        ...


class SAESplices:
    """The SAEs spliced into one model, keyed by the hook name each reads from.

    ``host`` is the model (an ``nn.Module`` implementing :class:`SpliceHost`); every
    change swaps modules in its tree and then tells it, so its hook index stays right.
    """

    def __init__(self, host: Any):
        self.host = host
        self.by_input: dict[str, SAESplice] = {}

    def acts_to_saes(self) -> dict[str, nn.Module]:
        """``{hook_name: sae}`` for every attached SAE."""
        return {name: splice.sae for name, splice in self.by_input.items()}

    def masked(self) -> list[SAESplice]:
        """The splices that bypass some tokens (``exclude_special_tokens``)."""
        return [s for s in self.by_input.values() if s.exclude_special_tokens is not False]

    def clear_captured(self) -> None:
        """Drop transcoder inputs left over from an interrupted forward pass."""
        for splice in self.by_input.values():
            splice.clear_captured()

    def add(
        self,
        sae: nn.Module,
        use_error_term: bool | None,
        exclude_special_tokens: bool | list[int],
    ) -> None:
        """Splice ``sae`` in (replacing the SAE reading the same hook, if any)."""
        in_name, out_name = hook_names_of(sae)
        in_path, out_path = self._check_attachable(in_name, out_name)
        if use_error_term is None:
            use_error_term = bool(getattr(sae, "use_error_term", False))
        splice = SAESplice(
            sae, in_name, out_name, use_error_term, exclude_special_tokens, in_path, out_path
        )
        if in_name in self.by_input:
            self._detach(in_name)
        self._attach(splice)

    def path_of(self, name: str) -> str:
        """The module path of hook ``name``; an attached SAE's hooks keep the path they
        had (the model may no longer list them while a splice stands there)."""
        for splice in self.by_input.values():
            if name == splice.out_name:
                return splice.out_path
            if name == splice.in_name:
                return splice.in_path
        return self.host.splice_path(name)

    def _check_attachable(self, in_name: str, out_name: str) -> tuple[str, str]:
        """``(input path, output path)`` of an SAE reading ``in_name`` and writing
        ``out_name``; raises ValueError when either is not a hook of the model."""
        writers = {s.out_path: s for s in self.by_input.values()}
        targets = set(self.host.splice_targets())
        paths = []
        for role, name in (("hook_name", in_name), ("hook_name_out", out_name)):
            inside = next(
                (
                    s
                    for s in writers.values()
                    if name.startswith((s.out_name + ".", s.out_path + "."))
                ),
                None,
            )
            if inside is not None:
                # the SAE calls its own hook points, so a splice there would never run
                raise ValueError(
                    f"cannot attach SAE: {role} {name!r} is a hook of the SAE attached at "
                    f"{inside.in_name!r}, not of the model"
                )
            path = self.path_of(name)
            if name not in targets and path not in writers:
                raise ValueError(
                    f"cannot attach SAE: {role} {name!r} is not a hook point of this model "
                    "(see model.hook_dict for the available names)"
                )
            paths.append(path)
        writer = writers.get(paths[1])
        if writer is not None and writer.in_name != in_name:
            raise ValueError(
                f"cannot attach SAE writing at {out_name!r}: the SAE attached at "
                f"{writer.in_name!r} already writes there; reset_saes({writer.in_name!r}) first"
            )
        return paths[0], paths[1]

    def _attach(self, splice: SAESplice) -> None:
        splice.__dict__["_replaced"] = get_module(self.host, splice.out_path)
        set_module(self.host, splice.out_path, splice)
        self.by_input[splice.in_name] = splice
        self._sync_captures()
        self.host.splice_attached(splice)

    def _detach(self, act_name: str) -> SAESplice:
        splice = self.by_input.pop(act_name)
        splice.release_capture()
        set_module(self.host, splice.out_path, splice.__dict__["_replaced"])
        splice.__dict__["_replaced"] = None
        splice.restore_hook_names()
        self._sync_captures()
        self.host.splice_detached(splice)
        return splice

    def _sync_captures(self) -> None:
        """Point each transcoder's input capture at the module now at its input hook."""
        for splice in self.by_input.values():
            if splice.is_transcoder:
                splice.capture_from(get_module(self.host, splice.in_path))

    def reset_one(self, act_name: str, prev_splice: SAESplice | None = None) -> None:
        """Remove the SAE at ``act_name``; then re-attach ``prev_splice`` if given."""
        if act_name in self.by_input:
            self._detach(act_name)
        elif prev_splice is None:
            warnings.warn(
                f"No SAE is attached to {act_name!r}; there is nothing to reset.", stacklevel=4
            )
        if prev_splice is not None:
            self._attach(prev_splice)

    def reset(self, act_names: str | list[str] | None = None) -> None:
        """Remove the SAEs reading ``act_names``, or all of them."""
        if isinstance(act_names, str):
            act_names = [act_names]
        elif act_names is None:
            act_names = list(self.by_input)
        for act_name in act_names:
            self.reset_one(act_name)

    @contextmanager
    def attached(
        self,
        saes: SAEs,
        reset_saes_end: bool,
        use_error_term: bool | None,
        exclude_special_tokens: bool | list[int],
    ) -> Iterator[None]:
        """Attach ``saes`` for a ``with`` block; on exit (with ``reset_saes_end``) remove
        them and bring back the ones they displaced, as they were."""
        if saes is None:
            saes = []
        elif isinstance(saes, nn.Module):
            saes = [saes]
        restore: list[tuple[str, SAESplice | None]] = []
        try:
            for sae in saes:
                act_name = hook_names_of(sae)[0]
                prev = self.by_input.get(act_name)
                self.add(sae, use_error_term, exclude_special_tokens)
                restore.append((act_name, prev))
            yield
        finally:
            if reset_saes_end:
                # newest first, so an SAE attached twice at one hook unwinds correctly
                for act_name, prev in reversed(restore):
                    self.reset_one(act_name, prev)
