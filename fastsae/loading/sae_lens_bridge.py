"""Convert live SAE modules between sae_lens and fastsae (sae-lens is imported lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fastsae.loading.disk import build_sae, handle_config_defaulting

if TYPE_CHECKING:
    from fastsae.saes.base import SAE


def from_sae_lens(module: Any, *, copy: bool = False) -> SAE:
    """A fastsae SAE equal to the sae_lens SAE ``module``.

    ``copy=False`` shares the parameter tensors (an in-place edit of one shows in the
    other); ``copy=True`` clones them. Training SAEs are converted through their
    inference form (as ``save_inference_model`` writes it), which always copies.
    """
    cfg = getattr(module, "cfg", None)
    if cfg is None or not hasattr(cfg, "to_dict") or not hasattr(module, "state_dict"):
        raise TypeError(f"expected a sae_lens SAE module, got {type(module).__name__}")
    state = {k: v.detach() for k, v in module.state_dict().items()}
    if hasattr(cfg, "get_inference_sae_cfg_dict"):  # a sae_lens TrainingSAE
        module.process_state_dict_for_saving_inference(state)
        cfg_dict = cfg.get_inference_sae_cfg_dict()
        copy = True
    else:
        module.process_state_dict_for_saving(state)
        cfg_dict = cfg.to_dict()
    cfg_dict = handle_config_defaulting(dict(cfg_dict))
    if copy:
        state = {k: v.clone() for k, v in state.items()}
    sae = build_sae(cfg_dict, state, where=f"sae_lens {type(module).__name__}")
    if not copy:
        for name, param in module.named_parameters():
            if name in sae._parameters:
                setattr(sae, name, param)
    sae.use_error_term = bool(getattr(module, "use_error_term", False))
    return sae


def to_sae_lens(sae: SAE, *, copy: bool = True) -> Any:
    """The equivalent sae_lens SAE (needs ``pip install sae-lens``).

    ``copy=False`` shares the parameter tensors with ``sae``.
    """
    try:  # optional dependency: sae-lens (a test dependency, never required)
        from sae_lens import SAE as SAELensSAE
    except ImportError as e:
        raise ImportError("to_sae_lens() needs sae-lens installed: pip install sae-lens") from e
    cfg_dict = sae.cfg.to_dict()
    device = cfg_dict["device"]
    cfg_dict["device"] = "meta"
    theirs = SAELensSAE.from_dict(cfg_dict)
    theirs.cfg.device = device
    params = dict(sae.named_parameters())
    state = {k: (v.detach().clone() if copy else v) for k, v in params.items()}
    theirs.load_state_dict(state, assign=True)
    theirs = theirs.to(device=torch.device(device), dtype=sae.dtype)
    if not copy:
        for name, param in params.items():
            setattr(theirs, name, param)
    return theirs
