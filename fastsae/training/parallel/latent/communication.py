"""What one latent-sharded training step sends, worked out from the shapes: the input
payload of each collective a rank makes (the formula the README's estimates use; a
test counts the real collectives against it).

Wire traffic per rank follows from the payloads: a ring ``all_reduce`` of ``P`` bytes
over ``W`` ranks sends and receives ``2 (W - 1) / W * P``; an ``all_gather`` of ``P``
bytes per rank receives ``(W - 1) * P``.
"""

from __future__ import annotations

from fastsae.saes.registry import lookup


def step_payload_bytes(
    architecture: str,
    batch: int,
    d_in: int,
    *,
    k: float = 0,
    n_dead: int = 0,
    dtype_bytes: int = 4,
    apply_b_dec_to_input: bool = True,
    pre_act_loss: bool = False,
    clip: bool = True,
) -> dict[str, int]:
    """Payload bytes per collective of one step on one rank of a shard group.

    ``architecture``: any architecture registered with a sharded class (its
    ``step_payloads`` gives the architecture's own collectives);
    ``batch``: tokens every shard sees; ``k``: TopK's k (BatchTopK's mean k); ``n_dead``: dead latents over all shards (TopK's
    AuxK: ``k_aux = min(d_in // 2, n_dead)``); ``dtype_bytes``: the SAE's parameter
    dtype; ``pre_act_loss``: JumpReLU's pre-activation loss is on (a dead mask given).
    Returns ``{collective: bytes}`` (the data-parallel gradient average, when the mesh
    has replicas, is separate: the shard's gradients, ``2 * d_sae / W * d_in + ...``).
    """
    sharded = lookup(architecture, "sharded")
    out = sharded.step_payloads(
        batch, d_in, k=k, n_dead=n_dead, dtype_bytes=dtype_bytes, pre_act_loss=pre_act_loss
    )
    if apply_b_dec_to_input:
        out["b_dec encoder-gradient all_reduce"] = d_in * dtype_bytes
    if clip:
        out["grad norm all_reduce"] = 4  # one fp32 scalar
    return out
