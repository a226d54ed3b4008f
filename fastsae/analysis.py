"""Feature-analysis helpers that SAELens users otherwise write by hand.

Every function takes a fastsae ``SAE`` (its ``cfg.metadata.hook_name`` says where it
reads) and a TransformerLens ``HookedTransformer`` (a ``HookedSAETransformer`` too):

* :func:`top_activating_contexts` -- the tokens (with context) where a feature fires most;
* :func:`feature_logit_lens` -- ``W_dec[f] @ W_U``: the tokens a feature promotes/suppresses;
* :func:`feature_attribution` -- activation x gradient of a target logit, per feature;
* :func:`steering_hook` / :func:`generate_with_steering` -- add ``coefficient * W_dec[f]``;
* :func:`ablation_hook` -- encode -> zero the features -> decode, keeping the SAE error.

Hooks are ``(hook_name, fn)`` pairs for ``model.run_with_hooks(..., fwd_hooks=[...])``
or ``model.hooks(fwd_hooks=[...])``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Hook = tuple[str, Callable[..., Tensor]]


def _hook_name(sae: Any, hook_name: str | None) -> str:
    name = hook_name or sae.cfg.metadata.hook_name
    if name is None:
        raise ValueError("the SAE has no cfg.metadata.hook_name: pass hook_name=")
    return name


def _features(feature_ids: int | Sequence[int] | Tensor, d_sae: int) -> Tensor:
    ids = torch.as_tensor(feature_ids, dtype=torch.long).reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= d_sae):
        raise ValueError(f"feature ids must lie in [0, d_sae={d_sae}), got {ids.tolist()}")
    return ids


@dataclass
class FeatureExample:
    """One place where a feature fired: ``tokens[sequence, position]`` with its window."""

    feature: int
    activation: float
    sequence: int
    position: int
    context: list[int]  # token ids from position - window to position + window
    text: str | None  # the context decoded ("[[token]]" marks the position), with a tokenizer


@torch.no_grad()
def top_activating_contexts(
    sae: Any,
    model: Any,
    tokens: Tensor | Iterable[Tensor],
    feature_ids: int | Sequence[int],
    *,
    k: int = 10,
    window: int = 5,
    batch_size: int = 16,
    hook_name: str | None = None,
) -> dict[int, list[FeatureExample]]:
    """The ``k`` strongest activations of each feature over ``tokens [n_seq, seq_len]``
    (or an iterable of such batches), with ``window`` tokens of context each side.

    Runs the model up to the SAE's hook (``stop_at_layer``) and keeps only a running
    top-k per feature, so memory stays ``O(batch * seq * d_sae)`` whatever the dataset.
    """
    name = _hook_name(sae, hook_name)
    ids = _features(feature_ids, sae.cfg.d_sae)
    batches = [tokens] if isinstance(tokens, Tensor) else tokens
    best_vals = torch.full((ids.numel(), 0), float("-inf"))
    best_where = torch.zeros((ids.numel(), 0, 2), dtype=torch.long)
    all_tokens: list[Tensor] = []
    offset = 0
    for big in batches:
        for chunk in big.split(batch_size):
            _, cache = model.run_with_cache(chunk, names_filter=[name])
            acts = sae.encode(cache[name].to(sae.W_dec.dtype))[..., ids].float().cpu()  # [b, s, F]
            b, s, f = acts.shape
            flat = acts.permute(2, 0, 1).reshape(f, b * s)
            where = torch.stack(
                torch.meshgrid(torch.arange(b) + offset, torch.arange(s), indexing="ij"), -1
            ).reshape(1, b * s, 2)
            vals = torch.cat([best_vals, flat], 1)
            locs = torch.cat([best_where, where.expand(f, -1, -1)], 1)
            top = vals.topk(min(k, vals.shape[1]), dim=1)
            best_vals = top.values
            best_where = locs.gather(1, top.indices.unsqueeze(-1).expand(-1, -1, 2))
            all_tokens.append(chunk.cpu())
            offset += b
    if not all_tokens:
        raise ValueError("top_activating_contexts: no tokens given")
    everything = torch.cat(all_tokens)
    tokenizer = getattr(model, "tokenizer", None)
    out: dict[int, list[FeatureExample]] = {}
    for i, feature in enumerate(ids.tolist()):
        examples = []
        for value, (seq, pos) in zip(best_vals[i].tolist(), best_where[i].tolist(), strict=True):
            if value <= 0:
                continue  # a feature that never fired has no examples
            lo, hi = max(pos - window, 0), min(pos + window + 1, everything.shape[1])
            context = everything[seq, lo:hi].tolist()
            text = None
            if tokenizer is not None:
                pieces = [tokenizer.decode([t]) for t in context]
                pieces[pos - lo] = f"[[{pieces[pos - lo]}]]"
                text = "".join(pieces)
            examples.append(FeatureExample(feature, value, seq, pos, context, text))
        out[feature] = examples
    return out


@dataclass
class LogitLens:
    """Tokens a feature's decoder direction promotes (top) and suppresses (bottom)."""

    feature: int
    top_tokens: list[int]
    top_logits: list[float]
    bottom_tokens: list[int]
    bottom_logits: list[float]
    top_strings: list[str] | None
    bottom_strings: list[str] | None


@torch.no_grad()
def feature_logit_lens(
    sae: Any, model: Any, feature_ids: int | Sequence[int], *, k: int = 10
) -> list[LogitLens]:
    """``W_dec[f] @ W_U`` for each feature (the direct effect on the logits, ignoring
    later layers and the final LayerNorm's scale, as the logit lens does)."""
    ids = _features(feature_ids, sae.cfg.d_sae)
    W_U = model.W_U  # [d_model, d_vocab]
    directions = sae.W_dec[ids].to(W_U.device, W_U.dtype)  # [F, d_model]
    if directions.shape[-1] != W_U.shape[0]:
        raise ValueError(
            f"the SAE writes d={directions.shape[-1]} but W_U expects d_model={W_U.shape[0]}"
        )
    logits = (directions @ W_U).float().cpu()  # [F, d_vocab]
    tokenizer = getattr(model, "tokenizer", None)
    res = []
    for i, feature in enumerate(ids.tolist()):
        top = logits[i].topk(k)
        bottom = (-logits[i]).topk(k)
        strings = (
            ([tokenizer.decode([t]) for t in top.indices.tolist()],
             [tokenizer.decode([t]) for t in bottom.indices.tolist()])
            if tokenizer is not None else (None, None)
        )  # fmt: skip
        res.append(
            LogitLens(
                feature,
                top.indices.tolist(),
                top.values.tolist(),
                bottom.indices.tolist(),
                (-bottom.values).tolist(),
                strings[0],
                strings[1],
            )  # fmt: skip
        )
    return res


@dataclass
class Attribution:
    """Per-feature attribution of a target metric at one forward pass.

    ``scores [seq, d_sae]``: activation x gradient of the metric (linear estimate of
    each feature's effect); ``error [seq]``: the same for the SAE's error term;
    ``activations [seq, d_sae]`` and ``gradients [seq, d_sae]`` (w.r.t. activations).
    ``scores.sum() + error.sum()`` equals the metric's gradient dotted with the hook's
    input minus ``b_dec``'s share -- see :func:`feature_attribution`.
    """

    scores: Tensor
    error: Tensor
    activations: Tensor
    gradients: Tensor
    metric: float


def feature_attribution(
    sae: Any,
    model: Any,
    tokens: Tensor,
    metric: Callable[[Tensor], Tensor] | int,
    *,
    position: int = -1,
    hook_name: str | None = None,
) -> Attribution:
    """Attribute ``metric(logits)`` (or, given an int, the logit of that token at
    ``position``) to the SAE's features at its hook, on one sequence ``tokens [1, seq]``.

    The SAE is spliced in with its error term, so the model's output is unchanged; the
    score of feature f at position p is ``acts[p, f] * d metric / d acts[p, f]``, which
    for a decoder ``x_hat = acts @ W_dec + b_dec`` equals ``acts[p, f] * <W_dec[f],
    d metric / d x_hat[p]>``.
    """
    if tokens.ndim == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.shape[0] != 1:
        raise ValueError(f"feature_attribution takes one sequence, got {tokens.shape[0]}")
    name = _hook_name(sae, hook_name)
    saved: dict[str, Tensor] = {}

    def splice(x: Tensor, hook: Any) -> Tensor:
        sae_in = x.to(sae.W_dec.dtype)
        acts = sae.encode(sae_in).detach().requires_grad_(True)
        recons = sae.decode(acts)
        error = (sae_in - recons).detach().requires_grad_(True)
        saved["acts"], saved["error"] = acts, error
        return (recons + error).to(x.dtype)

    if isinstance(metric, int):
        target = metric

        def metric_fn(logits: Tensor) -> Tensor:
            return logits[0, position, target]

    else:
        metric_fn = metric
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(name, splice)])
        value = metric_fn(logits)
        acts, error = saved["acts"], saved["error"]
        d_acts, d_error = torch.autograd.grad(value, [acts, error])
    acts, d_acts = acts.detach()[0], d_acts[0]
    return Attribution(
        scores=acts * d_acts,
        error=(error.detach()[0] * d_error[0]).sum(-1),
        activations=acts,
        gradients=d_acts,
        metric=float(value.detach()),
    )


def steering_hook(
    sae: Any, feature_id: int, coefficient: float, *, hook_name: str | None = None,
    positions: slice | None = None,
) -> Hook:  # fmt: skip
    """A forward hook adding ``coefficient * W_dec[feature_id]`` at the SAE's hook point
    (all positions, or ``positions``)."""
    name = _hook_name(sae, hook_name)
    (fid,) = _features(feature_id, sae.cfg.d_sae).tolist()
    direction = sae.W_dec[fid].detach()

    def hook(x: Tensor, hook: Any) -> Tensor:
        d = (coefficient * direction).to(x.device, x.dtype)
        if positions is None:
            return x + d
        x = x.clone()
        x[:, positions] += d
        return x

    return name, hook


def generate_with_steering(
    model: Any,
    sae: Any,
    feature_id: int,
    coefficient: float,
    input: Any,
    **generate_kwargs: Any,
) -> Any:
    """``model.generate(input, **generate_kwargs)`` with :func:`steering_hook` active."""
    with model.hooks(fwd_hooks=[steering_hook(sae, feature_id, coefficient)]):
        return model.generate(input, **generate_kwargs)


def ablation_hook(
    sae: Any, feature_ids: int | Sequence[int], *, hook_name: str | None = None
) -> Hook:
    """A forward hook that replaces the activation by ``decode(acts with the features
    zeroed) + (x - decode(acts))``: only the ablated features' contribution changes."""
    name = _hook_name(sae, hook_name)
    ids = _features(feature_ids, sae.cfg.d_sae)

    def hook(x: Tensor, hook: Any) -> Tensor:
        sae_in = x.to(sae.W_dec.dtype)
        acts = sae.encode(sae_in)
        recons = sae.decode(acts)
        ablated = acts.clone()
        ablated[..., ids.to(acts.device)] = 0
        return (sae.decode(ablated) + (sae_in - recons)).to(x.dtype)

    return name, hook
