"""hook_z reshaping for :class:`~fastsae.saes.base.SAE`: attention ``hook_z`` SAEs
read ``[..., n_heads, d_head]`` activations, flatten them to ``[..., d_in]`` on the way
in and unflatten the reconstruction on the way out.
"""

from __future__ import annotations

from torch import Tensor

from fastsae.saes.config import SAEConfig


class HookZReshapingMixin:
    """``turn_on/off_forward_pass_hook_z_reshaping`` and ``reshape_fn_in/out`` (SAELens names)."""

    cfg: SAEConfig

    def turn_on_forward_pass_hook_z_reshaping(self) -> None:
        """Flatten ``[..., n_heads, d_head]`` inputs and unflatten outputs (attention hook_z SAEs)."""
        hook_name = self.cfg.metadata.hook_name
        if hook_name is not None and not hook_name.endswith("_z"):
            raise ValueError(
                f"hook_z reshaping is only for hook_z SAEs; this SAE reads {hook_name!r}"
            )
        self.hook_z_reshaping_mode = True
        self.d_head: int | None = None

    def turn_off_forward_pass_hook_z_reshaping(self) -> None:
        self.hook_z_reshaping_mode = False
        self.d_head = None

    def reshape_fn_in(self, x: Tensor) -> Tensor:
        if not self.hook_z_reshaping_mode:
            return x
        if x.ndim < 2:
            raise ValueError(
                f"hook_z SAE expects [..., n_heads, d_head] inputs, got shape {tuple(x.shape)}"
            )
        self.d_head = x.shape[-1]
        return x.flatten(-2)

    def reshape_fn_out(self, x: Tensor, d_head: int | None) -> Tensor:
        if not self.hook_z_reshaping_mode or d_head is None:
            return x
        return x.unflatten(-1, (-1, d_head))
