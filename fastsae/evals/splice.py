"""Reading an SAE's input from a TransformerLens model and writing its output back."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fastsae.saes.base import SAE
from fastsae.sparse_code import SparseCode


class Splice(NamedTuple):
    """The hooks an SAE reads from and writes to (the same one unless a transcoder)."""

    in_hook: str
    in_head: int | None
    out_hook: str
    out_head: int | None
    transcoder: bool


def _is_transcoder(sae: nn.Module) -> bool:
    return getattr(sae.cfg, "d_out", None) is not None and hasattr(sae, "forward_with_activations")


def find_splice(sae: nn.Module, hook_name: str | None = None, head: Any = ...) -> Splice:
    md = sae.cfg.metadata
    hook_name = hook_name or md.hook_name
    if not hook_name:
        raise ValueError("the SAE has no cfg.metadata.hook_name; pass hook_name=")
    head = md.hook_head_index if head is ... else head
    if not _is_transcoder(sae):
        return Splice(hook_name, head, hook_name, head, False)
    if not md.hook_name_out:
        raise ValueError(
            "a transcoder needs cfg.metadata.hook_name_out (where its output is compared "
            "with the model and spliced in)"
        )
    return Splice(hook_name, head, md.hook_name_out, md.hook_head_index_out, True)


# hooks with a head dimension [b, pos, n_heads, d_head], by name as SAELens tells them
_HEAD_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z")


def read_hook_acts(act: Tensor, head: int | None, hook_name: str) -> Tensor:
    """Hook activations -> SAE input ``[b, pos, d]``: one head (``head``), all heads of a
    q/k/v/z hook flattened, or the activations as they are."""
    if head is not None and act.ndim == 4:
        return act[:, :, head]
    if head is None and any(h in hook_name for h in _HEAD_HOOKS):
        return act.flatten(-2, -1)
    return act


def write_hook_acts(act: Tensor, new: Tensor, head: int | None) -> Tensor:
    """Inverse of :func:`read_hook_acts`: ``act`` with ``new`` put back where it was read from."""
    if head is not None and act.ndim == 4:
        act = act.clone()
        act[:, :, head] = new
        return act
    return new.reshape(act.shape)


def stop_layer(hook_names: Iterable[str]) -> int | None:
    """One past the deepest ``blocks.<n>`` the hooks need (None: run the whole model)."""
    layers = [re.search(r"\.(\d+)(?:\.|$)", name) for name in hook_names]
    if any(m is None for m in layers):
        return None
    return max(int(m.group(1)) for m in layers) + 1  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------
# the SAE's forward pieces, fast where that changes nothing
# ----------------------------------------------------------------------------------------
def sae_encode_decode(sae: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | SparseCode]:
    """``x [..., d_in]`` -> ``(prediction [..., d_out], activations)``; activations are a
    ``SparseCode`` for TopK-style fastsae SAEs (no dense ``[..., d_sae]``), else dense."""
    if _is_transcoder(sae):
        return sae.forward_with_activations(x)
    if isinstance(sae, SAE) and sae._fixed_k and not sae._acts_hooked():
        code = sae.encode_sparse(x)
        return sae.decode_sparse(code), code
    acts = sae.encode(x)
    return sae.decode(acts), acts


def sae_prediction(sae: nn.Module, x: Tensor) -> Tensor:
    """The SAE's output for ``x`` without the error term (transcoders add their skip)."""
    if _is_transcoder(sae):
        return sae(x)
    if isinstance(sae, SAE):
        return sae._reconstruct(x)
    return sae.decode(sae.encode(x))


class EvalScaler:
    """``scale`` / ``unscale`` for a sae-lens ``ActivationScaler``, fastsae's, or None."""

    def __init__(self, scaler: Any):
        self.scaler = scaler

    def scale(self, x: Tensor) -> Tensor:
        s = self.scaler
        if s is None:
            return x
        return s.scale(x) if hasattr(s, "scale") else s(x)

    def unscale(self, x: Tensor) -> Tensor:
        s = self.scaler
        if s is None:
            return x
        if hasattr(s, "unscale"):
            return s.unscale(x)
        if getattr(s, "matrix", None) is not None:
            x = x @ s.inverse_matrix.to(x) + s.mean.to(x)
        if getattr(s, "scaling_factor", None) is not None:
            x = x / s.scaling_factor
        return x


def token_mask(tokens: Tensor, ignore_tokens: list[int] | None) -> Tensor:
    """``[batch, pos]`` bool: True where the token is not ignored."""
    if not ignore_tokens:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, torch.tensor(ignore_tokens, device=tokens.device))


# tokenizer attributes whose ids run_evals leaves out with exclude_special_tokens=True
_SPECIAL_TOKEN_ATTRS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
)


def ignored_token_ids(model: Any, exclude_special_tokens: Any, ignore_tokens: Any) -> list[int]:
    if ignore_tokens is not None:  # the SAELens 5.x keyword: a set of ids (None allowed)
        return sorted({int(t) for t in ignore_tokens if t is not None})
    if exclude_special_tokens is True:
        tok = getattr(model, "tokenizer", None)
        ids = (getattr(tok, a, None) for a in _SPECIAL_TOKEN_ATTRS)
        return sorted({int(i) for i in ids if i is not None})
    if not exclude_special_tokens:
        return []
    return sorted({int(t) for t in exclude_special_tokens})


def ratio_or_nan(num: float, den: float) -> float:
    return num / den if den else float("nan")


# ----------------------------------------------------------------------------------------
# CE loss and KL with the SAE spliced in
# ----------------------------------------------------------------------------------------
