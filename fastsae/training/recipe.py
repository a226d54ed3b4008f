"""fastsae's training recipe: opt-in changes to SAELens's initialisation and settings
that keep latents alive from the first steps.

SAELens starts an SAE with ``b_dec = 0`` and random decoder rows (norm
``decoder_init_norm``, the encoder their transpose). On activations far from centred
(the mean of all-MiniLM-L6-v2's layer-3 activations is 36% of their average norm) and
concentrated in few directions, top-k then picks the few latents that happen to point
along the data, and most others never fire: half the latents of a 500-step TopK run
are dead at its end (``benchmarks/training_recipe.py``). Two initialisations from the
data fix most of that, each a trainer setting:

* ``b_dec_init="geometric_median"`` (or ``"mean"``): ``b_dec`` starts at the geometric
  median of the first batch (as EleutherAI's sparsify does), so the encoder sees
  centred inputs;
* ``decoder_init="data"``: decoder row ``i`` starts along a training activation,
  ``x_i - b_dec``, at ``decoder_init_norm`` (the encoder is its transpose, as in
  SAELens), so each latent starts where data is and fires on its neighbourhood.

The rows they read are drawn from the data at the start of a run (after the
normalisation estimate, and scaled as training scales them): one batch for ``b_dec``,
``d_sae`` rows for the decoder; like the normalisation estimate's, they are not
trained on. A resumed run keeps its weights.

``recipe="fastsae"`` (:data:`RECIPES`) on a runner config sets these and the other
settings the ablation chose; SAELens-identical configs (the default, ``recipe=None``)
train exactly as SAELens does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

B_DEC_INITS = ("zeros", "mean", "geometric_median")
DECODER_INITS = ("random", "data")

# What each recipe sets on a runner config: its fields that the config's caller did
# not give, and (``sae.`` keys) the training SAE config's fields still at their default.
RECIPES: dict[str, dict[str, Any]] = {
    "fastsae": {
        "b_dec_init": "geometric_median",
        "decoder_init": "data",
        "sae.decoder_init_norm": 1.0,
    },
}

# The SAE architectures each recipe was measured on and is for. Elsewhere it is refused,
# not applied unmeasured: a JumpReLU SAE's threshold is in units of its pre-activations,
# which ``decoder_init_norm=1.0`` makes ten times larger (measured: its L0 stays in the
# hundreds and explained variance below 0 after 500 steps).
RECIPE_ARCHITECTURES: dict[str, tuple[str, ...]] = {"fastsae": ("topk", "batchtopk")}


@torch.no_grad()
def geometric_median(x: Tensor, *, max_iters: int = 200, tol: float = 1e-6) -> Tensor:
    """The point minimising the sum of Euclidean distances to the rows of ``x [n, d]``
    (Weiszfeld's iteration from the mean, in float64), as ``x``'s dtype."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty [n, d] tensor, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("geometric_median: the rows hold NaN or inf")
    xd = x.double()
    y = xd.mean(0)
    for _ in range(max_iters):
        w = 1.0 / (xd - y).norm(dim=1).clamp_min(1e-12)
        nxt = (w[:, None] * xd).sum(0) / w.sum()
        done = float((nxt - y).norm()) <= tol * max(float(y.norm()), 1.0)
        y = nxt
        if done:
            break
    return y.to(x.dtype)


def rows_needed(d_sae: int, batch_size: int, *, b_dec_init: str, decoder_init: str) -> int:
    """Rows :func:`init_from_data` reads: ``d_sae`` for ``decoder_init="data"``, a batch
    for a data ``b_dec_init``, 0 for SAELens's initialisation."""
    check_inits(b_dec_init, decoder_init)
    if decoder_init == "data":
        return max(d_sae, batch_size)
    return batch_size if b_dec_init != "zeros" else 0


def check_inits(b_dec_init: str, decoder_init: str) -> None:
    if b_dec_init not in B_DEC_INITS:
        raise ValueError(f"b_dec_init must be one of {B_DEC_INITS}, got {b_dec_init!r}")
    if decoder_init not in DECODER_INITS:
        raise ValueError(f"decoder_init must be one of {DECODER_INITS}, got {decoder_init!r}")


@torch.no_grad()
def init_from_data(
    sae: Any, rows: Tensor, *, b_dec_init: str, decoder_init: str, batch_size: int
) -> None:
    """Initialise ``sae`` from the activations ``rows [n, d_in]`` (already scaled as
    training scales them): ``b_dec`` from the first ``batch_size`` rows, decoder rows
    (and the encoder, their transpose) from the first ``d_sae`` (see the module
    docstring)."""
    check_inits(b_dec_init, decoder_init)
    d_sae, d_in = sae.cfg.d_sae, sae.cfg.d_in
    if rows.ndim != 2 or rows.shape[1] != d_in:
        raise ValueError(f"init rows must be [n, d_in={d_in}], got {tuple(rows.shape)}")
    need = rows_needed(d_sae, batch_size, b_dec_init=b_dec_init, decoder_init=decoder_init)
    if rows.shape[0] < need:
        raise ValueError(f"initialising from data needs {need} rows, got {rows.shape[0]}")
    rows = rows.to(sae.W_dec.device, torch.float32)
    if b_dec_init != "zeros":
        first = rows[:batch_size]
        center = geometric_median(first) if b_dec_init == "geometric_median" else first.mean(0)
        sae.b_dec.copy_(center.to(sae.b_dec.dtype))
    if decoder_init == "data":
        directions = rows[:d_sae] - sae.b_dec.float()
        lengths = directions.norm(dim=1, keepdim=True)
        if not bool((lengths > 0).all()):
            raise ValueError(
                "decoder_init='data': an initialisation row equals b_dec (a zero direction)"
            )
        norms = sae.W_dec.float().norm(dim=1, keepdim=True)  # decoder_init_norm
        sae.W_dec.copy_((directions / lengths * norms).to(sae.W_dec.dtype))
        sae.W_enc.copy_(sae.W_dec.T)


def apply_sae_recipe(sae_cfg: Any, settings: dict[str, Any]) -> Any:
    """``sae_cfg`` (a training SAE config) with the ``sae.<field>`` entries of a recipe's
    ``settings`` set where the field still has its class default (a value the caller
    gave differs from it and is kept): a new config when anything changes, never the
    caller's object modified."""
    defaults = {f.name: f.default for f in dataclasses.fields(sae_cfg)}
    changes = {}
    for key, value in settings.items():
        name = key[len("sae.") :] if key.startswith("sae.") else None
        if name in defaults and getattr(sae_cfg, name) == defaults[name]:
            changes[name] = value
    return dataclasses.replace(sae_cfg, **changes) if changes else sae_cfg


def recipe_fields_kept(cfg: Any) -> list[tuple[str, Any, Any]]:
    """``(field, value, recipe's value)`` for each field of the runner config ``cfg``
    (``sae.`` keys: of its SAE config) whose value differs from what ``cfg.recipe``
    would set: the fields its caller gave, which win over the recipe."""
    kept = []
    for name, value in recipe_settings(cfg.recipe).items():
        owner, field = (cfg.sae, name[len("sae.") :]) if name.startswith("sae.") else (cfg, name)
        if getattr(owner, field) != value:
            kept.append((name, getattr(owner, field), value))
    return kept


def recipe_settings(name: str | None, architecture: str | None = None) -> dict[str, Any]:
    """What recipe ``name`` sets on a runner config ({} for None); an unknown name, or an
    SAE ``architecture`` the recipe is not for (:data:`RECIPE_ARCHITECTURES`), is an
    error naming what is known."""
    if name is None:
        return {}
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)} (or None)")
    if architecture is not None and architecture not in RECIPE_ARCHITECTURES[name]:
        raise ValueError(
            f"recipe {name!r} is for {' and '.join(RECIPE_ARCHITECTURES[name])} SAEs (where it "
            f"was measured), not {architecture!r}; train a {architecture!r} SAE with "
            "recipe=None (SAELens's training)"
        )
    return dict(RECIPES[name])


__all__ = [
    "B_DEC_INITS",
    "apply_sae_recipe",
    "DECODER_INITS",
    "RECIPES",
    "RECIPE_ARCHITECTURES",
    "check_inits",
    "geometric_median",
    "init_from_data",
    "recipe_fields_kept",
    "recipe_settings",
    "rows_needed",
]
