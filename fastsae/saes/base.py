"""The SAE base class: parameters, hook points, input normalisation, the sparse forward
and the error term, plus hook_z reshaping, weight folding and saving/loading.
Architectures subclass :class:`SAE` and provide ``_init_parameters``, ``_encode_dense``
and, where it is cheaper than the dense code, ``_encode_code``; those with extra
parameters (gated biases, thresholds) extend the folding and state-dict methods and
call ``super()``.

Saving and loading are thin wrappers over :mod:`fastsae.loading`, which this module
imports; the loading modules import this one only inside the functions that build an
SAE (``fastsae.loading`` is light, this module pulls in TransformerLens).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

try:  # TransformerLens >= 3 exports it at the top level (hook_points' copy is deprecated)
    from transformer_lens import HookedRootModule
except ImportError:  # TransformerLens 2.x
    from transformer_lens.hook_points import HookedRootModule

from fastsae import ops, torch_ops
from fastsae.loading import sae_lens_bridge
from fastsae.loading.converters import load_sae_from_disk
from fastsae.loading.disk import save_sae
from fastsae.loading.pretrained import flat_cfg_dict, load_pretrained
from fastsae.saes.config import SAEConfig, dtype_to_str, str_to_dtype
from fastsae.saes.registry import sae_class_for_architecture
from fastsae.sparse_code import SparseCode

if TYPE_CHECKING:
    from fastsae.labels import FeatureLabels

# As in SAELens (sae_lens.saes.sae): ``SAE[StandardSAEConfig]`` is an SAE whose cfg is a
# StandardSAEConfig; ``T_SAE`` types the classmethods that build ``cls``.
T_SAE_CONFIG = TypeVar("T_SAE_CONFIG", bound=SAEConfig)
T_SAE = TypeVar("T_SAE", bound="SAE")

_HOOK_NAMES = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_output",
    "hook_sae_recons",
    "hook_sae_error",
)
_LN_EPS = 1e-5
# forward decodes a variable-width code sparsely while max active <= d_sae / this
_SPARSE_DECODE_MAX_FRACTION = 32


def check_floating_tensor(x: Any, what: str) -> None:
    """``x`` must be a floating-point tensor (an integer or bool tensor is a mistake, e.g.
    token ids for activations: casting it would hide that)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
    )


class SAE(HookedRootModule, Generic[T_SAE_CONFIG]):
    """A sparse autoencoder with SAELens 6.x's parameters, hooks and maths.

    Parameters keep SAELens names and orientation: ``W_enc [d_in, d_sae]``,
    ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]`` (plus ``threshold``,
    ``b_gate``/``b_mag``/``r_mag``, ``W_skip`` where the architecture has them).

    ``encode(x) -> [..., d_sae]`` dense, as SAELens; ``encode_sparse(x) -> SparseCode``
    and ``decode_sparse(code)`` are the fast path, which ``forward`` takes whenever
    nothing is hooked on ``hook_sae_acts_pre`` / ``hook_sae_acts_post``.

    Generic in its config class, as in SAELens: ``SAE[StandardSAEConfig]`` in an
    annotation. ``activation_fn`` (``get_activation_fn()``) and
    ``run_time_activation_norm_fn_in`` / ``_out`` are SAELens's public callables with
    the same meaning; the forward does not go through them (it takes the fused paths).
    """

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    cfg: T_SAE_CONFIG
    activation_fn: Callable[[Tensor], Tensor]
    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    # True when every token has exactly k active latents (TopK): forward never goes dense
    _fixed_k: ClassVar[bool] = False

    def __init__(self, cfg: T_SAE_CONFIG, use_error_term: bool = False):
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, "
                f"got {type(cfg).__name__}"
            )
        self.cfg = cfg
        self.dtype = str_to_dtype(cfg.dtype)
        self.device = torch.device(cfg.device)
        self.use_error_term = use_error_term
        # SAELens's activation module (a parameter-free child module, as there)
        self.activation_fn = self.get_activation_fn()
        self._init_parameters()
        for name in _HOOK_NAMES:
            setattr(self, name, HookPoint())
        if cfg.reshape_activations == "hook_z":
            self.turn_on_forward_pass_hook_z_reshaping()
        else:
            self.turn_off_forward_pass_hook_z_reshaping()
        # normalisation statistics of the last encode(), used by the next decode()
        self._norm_stats: tuple[Tensor, ...] | None = None
        # log feature sparsity, when the SAE came with one (from_pretrained)
        self._log_sparsity: Tensor | None = None
        # Neuronpedia labels, when downloaded for the release / sae_id (from_pretrained)
        self.feature_labels: FeatureLabels | None = None
        self.setup()

    # ------------------------------------------------------------------ parameters
    def _param(self, *shape: int, zeros: bool = True) -> nn.Parameter:
        data = torch.empty(*shape, dtype=self.dtype, device=self.device)
        if zeros:
            data.zero_()
        return nn.Parameter(data)

    def _init_parameters(self) -> None:
        """SAELens's initialisation: kaiming-uniform W_dec, W_enc = W_dec.T, zero biases."""
        self.b_dec = self._param(self.cfg.d_in)
        self.W_dec = self._param(self.cfg.d_sae, self.cfg.d_in, zeros=False)
        if self.device.type != "meta":
            nn.init.kaiming_uniform_(self.W_dec)
        self.W_enc = nn.Parameter(self.W_dec.data.T.clone().contiguous())

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    def get_activation_fn(self) -> Callable[[Tensor], Tensor]:
        """SAELens's activation of the architecture, ``hidden_pre [..., d_sae]`` -> dense
        activations: ``nn.ReLU()`` here (JumpReLU and gated SAEs too: their threshold or
        gate is applied beside it, as in SAELens); TopK-family SAEs override it."""
        return nn.ReLU()

    # ------------------------------------------------------------------ normalisation
    def _normalize_in(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            coeff = (self.cfg.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            return x * coeff, (coeff,)
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            return x / (std + _LN_EPS), (mu, std)
        # "none", "expected_average_only_in" and "covariance_whitening" are folded into
        # the weights (or applied by the activation store), so inference is the identity.
        return x, None

    def run_time_activation_norm_fn_in(self, x: Tensor) -> Tensor:
        """SAELens's run-time input normalisation (``constant_norm_rescale``,
        ``layer_norm``; the identity otherwise). Keeps the statistics of ``x`` for
        :meth:`run_time_activation_norm_fn_out` and the next ``decode``."""
        x, self._norm_stats = self._normalize_in(x)
        return x

    def run_time_activation_norm_fn_out(self, x: Tensor) -> Tensor:
        """Undo :meth:`run_time_activation_norm_fn_in` on a reconstruction, with the
        statistics of the last normalised input (the identity for the other modes)."""
        return self._normalize_out(x, self._norm_stats)

    def _normalize_out(self, x: Tensor, stats: tuple[Tensor, ...] | None) -> Tensor:
        mode = self.cfg.normalize_activations
        if mode not in ("constant_norm_rescale", "layer_norm"):
            return x
        if stats is None:
            raise RuntimeError(
                f"normalize_activations={mode!r}: decode() needs the statistics of the "
                "input, so call encode() (or encode_sparse()) on that input first"
            )
        if mode == "constant_norm_rescale":
            return x / stats[0]
        mu, std = stats
        return x * std + mu

    # ------------------------------------------------------------------ hook_z reshaping
    # Attention hook_z SAEs read [..., n_heads, d_head] activations, flatten them to
    # [..., d_in] on the way in and unflatten the reconstruction on the way out
    # (SAELens names: turn_on/off_forward_pass_hook_z_reshaping, reshape_fn_in/out).
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

    # ------------------------------------------------------------------ input / output
    def _check_input(self, x: Tensor) -> None:
        if x.ndim == 0 or x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"SAE input must have last dimension d_in={self.cfg.d_in}, "
                f"got shape {tuple(x.shape)}"
            )

    def _process_sae_in(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """dtype cast, hook_z flatten, ``hook_sae_input``, normalisation, ``- b_dec``."""
        check_floating_tensor(x, "SAE input")  # other floating dtypes are cast, as in SAELens
        sae_in = self.reshape_fn_in(x.to(self.dtype))
        self._check_input(sae_in)
        sae_in = self.hook_sae_input(sae_in)
        sae_in, stats = self._normalize_in(sae_in)
        if self.cfg.apply_b_dec_to_input:
            sae_in = sae_in - self.b_dec
        return sae_in, stats

    def process_sae_in(self, sae_in: Tensor) -> Tensor:
        """The SAE input as the encoder sees it (SAELens's ``process_sae_in``)."""
        sae_in, self._norm_stats = self._process_sae_in(sae_in)
        return sae_in

    def _finish_decode(self, sae_out_pre: Tensor, stats: tuple[Tensor, ...] | None) -> Tensor:
        sae_out_pre = self.hook_sae_recons(sae_out_pre)
        sae_out_pre = self._normalize_out(sae_out_pre, stats)
        return self.reshape_fn_out(sae_out_pre, self.d_head)

    # ------------------------------------------------------------------ encode / decode
    def _encode_dense(self, sae_in: Tensor) -> Tensor:
        """Processed input ``[..., d_in]`` -> dense activations, through both act hooks."""
        raise NotImplementedError(f"{type(self).__name__} must define _encode_dense")

    def _encode_code(self, sae_in: Tensor) -> SparseCode:
        """Processed input -> SparseCode. Default: compact the (non-negative) dense activations."""
        return self._compact(self._encode_dense(sae_in))

    @staticmethod
    def _compact(acts: Tensor, max_k: int | None = None) -> SparseCode | None:
        """Dense non-negative ``acts [..., d_sae]`` -> padded code ``[..., K]`` (None past max_k)."""
        code = torch_ops.compact(acts.reshape(-1, acts.shape[-1]), nonnegative=True, max_k=max_k)
        if code is None:
            return None
        lead = acts.shape[:-1]
        return SparseCode(code.values.reshape(*lead, -1), code.indices.reshape(*lead, -1))

    def _fused_code(self, sae_in: Tensor) -> bool:
        """True when ``_encode_code`` runs a fused kernel that beats encode-then-compact."""
        return False

    def _decoder_values(self, code: SparseCode) -> SparseCode:
        """Hook for architectures that rescale activations before the decoder."""
        return code

    def encode(self, x: Tensor) -> Tensor:
        """``x [..., d_in]`` -> dense feature activations ``[..., d_sae]`` (SAELens semantics)."""
        sae_in, self._norm_stats = self._process_sae_in(x)
        return self._encode_dense(sae_in)

    def decode(self, feature_acts: Tensor) -> Tensor:
        """``[..., d_sae]`` activations -> reconstruction ``[..., d_out]``.

        Dense, or a ``torch.sparse_coo`` tensor of any rank (SAELens's TopK with
        ``use_sparse_activations=True`` makes those): a COO input is decoded sparsely
        (differentiable in its values), never densified. Floating-point activations of
        another dtype are cast to the SAE's, as ``encode`` casts its input; integer or
        bool tensors are a TypeError naming the dtype.
        """
        check_floating_tensor(feature_acts, "decode's feature activations")
        if feature_acts.ndim == 0 or feature_acts.shape[-1] != self.cfg.d_sae:
            raise ValueError(
                f"decode expects last dimension d_sae={self.cfg.d_sae}, "
                f"got shape {tuple(feature_acts.shape)}"
            )
        feature_acts = feature_acts.to(self.dtype)
        if feature_acts.layout == torch.sparse_coo:
            if feature_acts.dense_dim() == 0:
                return self._decode_code(_coo_to_code(feature_acts), self._norm_stats)
            feature_acts = feature_acts.to_dense()  # hybrid COO: rows stored dense anyway
        return self._finish_decode(self._dense_decoder(feature_acts), self._norm_stats)

    def _dense_decoder(self, feature_acts: Tensor) -> Tensor:
        return feature_acts @ self.W_dec + self.b_dec

    def encode_sparse(self, x: Tensor) -> SparseCode:
        """``x [..., d_in]`` -> ``SparseCode(values [..., K], indices [..., K])``.

        The activation hooks do not fire on this path (there is no dense tensor to
        show them); use ``encode`` when you need them.
        """
        sae_in, self._norm_stats = self._process_sae_in(x)
        return self._encode_code(sae_in)

    def decode_sparse(self, code: SparseCode) -> Tensor:
        """``SparseCode`` -> reconstruction ``[..., d_out]`` without a dense ``[..., d_sae]`` tensor."""
        code = SparseCode(*code)
        check_floating_tensor(code.values, "decode_sparse: SparseCode values")
        if code.indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"decode_sparse: SparseCode indices must be int32 or int64, got dtype "
                f"{code.indices.dtype}"
            )
        if code.indices.numel() and (
            int(code.indices.min()) < 0 or int(code.indices.max()) >= self.cfg.d_sae
        ):
            raise ValueError(f"SparseCode indices must lie in [0, d_sae={self.cfg.d_sae})")
        return self._decode_code(code, self._norm_stats)

    def _decode_code(self, code: SparseCode, stats: tuple[Tensor, ...] | None) -> Tensor:
        """Decode a code this SAE produced (no bounds check: it would sync the device)."""
        code = self._decoder_values(code)
        out = ops.sparse_decode(code, self.W_dec, self.b_dec)
        return self._finish_decode(out.to(self.dtype), stats)

    def _acts_hooked(self) -> bool:
        return _has_hooks(self.hook_sae_acts_pre) or _has_hooks(self.hook_sae_acts_post)

    def _reconstruct(self, x: Tensor) -> Tensor:
        """encode + decode, through the sparse path unless the activation hooks are in use."""
        if self._acts_hooked():
            return self.decode(self.encode(x))
        sae_in, stats = self._process_sae_in(x)
        if self._fixed_k or self._fused_code(sae_in):
            return self._decode_code(self._encode_code(sae_in), stats)
        # ReLU / JumpReLU / gated codes have a data-dependent width: decode sparsely only
        # while the widest row is a small fraction of d_sae, else the dense matmul is cheaper
        acts = self._encode_dense(sae_in)
        code = self._compact(acts, max_k=self.cfg.d_sae // _SPARSE_DECODE_MAX_FRACTION)
        if code is None:
            return self._finish_decode(self._dense_decoder(acts), stats)
        return self._decode_code(code, stats)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x``; plus the error term when ``use_error_term`` is set."""
        sae_out = self._reconstruct(x)
        if self.use_error_term:
            # the error term carries no gradient, as in SAELens (x - clean inside no_grad)
            with torch.no_grad():
                with _disable_hooks(self):
                    clean = self._reconstruct(x)
                sae_error = self.hook_sae_error(x - clean)
            sae_out = sae_out + sae_error
        return self.hook_sae_output(sae_out)

    # ------------------------------------------------------------------ weight folding
    # Decoder norms, a constant input scaling or an activation whitening folded into the
    # parameters in place, so the SAE gives the same outputs from simpler weights or raw
    # inputs. Architectures with extra parameters extend these and call super().
    @torch.no_grad()
    def get_W_dec_norm(self) -> Tensor:
        return self.W_dec.norm(dim=-1).clamp(min=1e-8)

    @torch.no_grad()
    def fold_and_get_W_dec_norm(self) -> Tensor:
        """Scale decoder rows to unit norm and fold the norms into the encoder (in place)."""
        norms = self.get_W_dec_norm()
        self.W_dec.data.div_(norms.unsqueeze(1))
        self.W_enc.data.mul_(norms.unsqueeze(0))
        b_enc = getattr(self, "b_enc", None)
        if isinstance(b_enc, nn.Parameter):
            b_enc.data.mul_(norms)
        return norms

    def fold_W_dec_norm(self) -> None:
        """Fold decoder norms into the encoder: same outputs, unit-norm decoder rows."""
        self.fold_and_get_W_dec_norm()

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Fold a constant input scaling into the weights; sets normalize_activations='none'."""
        self.W_enc.data.mul_(scaling_factor)
        self.W_dec.data.div_(scaling_factor)
        self.b_dec.data.div_(scaling_factor)
        self.cfg.normalize_activations = "none"

    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor
    ) -> None:
        """Fold ``z = (x - mean) @ M`` (and ``x = z @ M^-1 + mean``) into the weights.

        ``mean [d_in]``, ``whitening_matrix M [d_in, d_in]``, ``unwhitening_matrix [d_in, d_in]``.
        Afterwards raw activations give the same features and outputs as whitened
        ones did before; ``normalize_activations`` becomes ``"none"``. Computed in at
        least the precision of the statistics.
        """
        dtype = torch.promote_types(self.W_enc.dtype, whitening_matrix.dtype)
        mean = mean.to(self.W_enc.device, dtype)
        M = whitening_matrix.to(self.W_enc.device, dtype)
        M_inv = unwhitening_matrix.to(self.W_enc.device, dtype)
        self.W_enc.data.copy_(M @ self.W_enc.data.to(dtype))
        b_enc = getattr(self, "b_enc", None)
        if not self.cfg.apply_b_dec_to_input and isinstance(b_enc, nn.Parameter):
            b_enc.data.sub_(mean @ self.W_enc.data.to(dtype))
        self.W_dec.data.copy_(self.W_dec.data.to(dtype) @ M_inv)
        self.b_dec.data.copy_(self.b_dec.data.to(dtype) @ M_inv + mean)
        self.cfg.normalize_activations = "none"

    # ------------------------------------------------------------------ device / dtype
    def to(self: T_SAE, *args: Any, **kwargs: Any) -> T_SAE:  # type: ignore[override]
        """``nn.Module.to`` that also keeps ``cfg.device``/``cfg.dtype`` and ``.device``/``.dtype`` in sync."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            self.device = torch.device(device)
            self.cfg.device = str(self.device)
        if dtype is not None:
            self.dtype = dtype
            self.cfg.dtype = dtype_to_str(dtype)
        return super().to(*args, **kwargs)

    # ------------------------------------------------------------------ saving / loading
    # Thin wrappers over fastsae.loading (SAELens 6.x folders, pretrained releases, live
    # sae_lens SAEs).
    def save_model(self, path: str | Path, *, sparsity: Tensor | None = None) -> tuple[Path, Path]:
        """Write a SAELens 6.x directory (``cfg.json``, ``sae_weights.safetensors`` and,
        given ``sparsity [d_sae]``, ``sparsity.safetensors``) atomically: the folder is
        replaced as a whole, so a kill or a failed rename leaves the old SAE or the new
        one. A ``sparsity.safetensors`` of an earlier save is removed when ``sparsity`` is
        not given; files of the folder that are not the SAE's (a README) are kept.

        Returns ``(weights_path, cfg_path)``.
        """
        return save_sae(self, path, sparsity=sparsity)

    @classmethod
    def load_from_disk(
        cls: type[T_SAE],
        path: str | Path,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        converter: Any = None,
        fold_W_dec_norm: bool = False,
        validate: bool = False,
    ) -> T_SAE:
        """Load an SAE directory written by sae-lens (6.x or older) or fastsae.

        ``converter`` is a ``PretrainedSaeDiskLoader`` (``(path, device, cfg_overrides)
        -> (cfg_dict, state_dict)``); ``None`` also recognises Gemma Scope
        (``params.npz``), EleutherAI sparsify (``sae.safetensors``) and
        dictionary_learning (``ae.pt``) folders.
        ``dtype`` overrides the stored dtype; ``validate=True`` rejects NaN/inf weights.
        """
        sae = load_sae_from_disk(
            path, device, dtype, converter, expected_cls=cls, validate=validate
        )
        if fold_W_dec_norm:
            sae.fold_W_dec_norm()
        return sae  # type: ignore[return-value]

    @classmethod
    def load_from_pretrained(
        cls: type[T_SAE], path: str | Path, device: str = "cpu", dtype: str | None = None
    ) -> T_SAE:
        """Deprecated spelling of :meth:`load_from_disk`."""
        warnings.warn(
            "load_from_pretrained is deprecated; use load_from_disk",
            DeprecationWarning,
            stacklevel=2,
        )
        return cls.load_from_disk(path, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(
        cls: type[T_SAE],
        release: str,
        sae_id: str,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        force_download: bool = False,
        converter: Any = None,
        fold_W_dec_norm: bool = False,
    ) -> T_SAE:
        """Load a pretrained SAE by SAELens release name, Hugging Face repo id
        (``sae_id`` = folder) or local repo directory.

        Downloads go through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE`` and
        ``force_download`` apply). ``converter`` (a ``PretrainedSaeHuggingfaceLoader``,
        ``(repo_id, folder_name, device, force_download, cfg_overrides) -> (cfg_dict,
        state_dict, log_sparsity)``) replaces the loader of the release's format.
        Unpacking the result as ``sae, cfg_dict, sparsity`` still works, with a
        DeprecationWarning.
        """
        return cls.from_pretrained_with_cfg_and_sparsity(
            release,
            sae_id,
            device=device,
            dtype=dtype,
            force_download=force_download,
            converter=converter,
            fold_W_dec_norm=fold_W_dec_norm,
        )[0]

    @classmethod
    def from_pretrained_with_cfg_and_sparsity(
        cls: type[T_SAE],
        release: str,
        sae_id: str,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        force_download: bool = False,
        converter: Any = None,
        fold_W_dec_norm: bool = False,
    ) -> tuple[T_SAE, dict[str, Any], Tensor | None]:
        """:meth:`from_pretrained` returning ``(sae, cfg_dict, log_sparsity)``
        (``log_sparsity [d_sae]`` or None when the release has none).

        ``sae.feature_labels`` is the :class:`~fastsae.labels.FeatureLabels` that
        ``fastsae labels download`` wrote for ``release`` / ``sae_id`` under the default
        labels root, else None (a file that cannot be read warns)."""
        result = load_pretrained(
            release,
            sae_id,
            device=device,
            dtype=dtype,
            force_download=force_download,
            converter=converter,
            fold_W_dec_norm=fold_W_dec_norm,
            expected_cls=cls,
        )
        from fastsae.labels import pretrained_feature_labels  # imports httpx: only here

        result[0].feature_labels = pretrained_feature_labels(release, sae_id)
        return result  # type: ignore[return-value]

    @classmethod
    def from_dict(cls: type[T_SAE], config_dict: dict[str, Any]) -> T_SAE:
        """A freshly initialised SAE of the architecture ``config_dict`` names."""
        cfg = SAEConfig.from_dict(config_dict)
        sae_cls = sae_class_for_architecture(cfg.architecture())
        if not issubclass(sae_cls, cls):
            raise ValueError(f"architecture {cfg.architecture()!r} is not a {cls.__name__}")
        return sae_cls(cfg)  # type: ignore[return-value]

    @classmethod
    def from_sae_lens(cls, sae_lens_sae: Any, *, copy: bool = False) -> SAE:
        """Convert a live sae_lens SAE; ``copy=False`` shares its parameter tensors."""
        return sae_lens_bridge.from_sae_lens(sae_lens_sae, copy=copy)

    def to_sae_lens(self, *, copy: bool = True) -> Any:
        """The equivalent sae_lens SAE (sae-lens must be installed)."""
        return sae_lens_bridge.to_sae_lens(self, copy=copy)

    # ------------------------------------------------------------------ state-dict hooks
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        """Override to edit the state dict in place before it is written."""

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Override to edit the state dict in place after it is read."""

    # ------------------------------------------------------------------ deprecated tuple API
    # Tuple unpacking of from_pretrained, as SAELens < 6 returned (sae, cfg_dict, sparsity).
    def _legacy_tuple(self) -> tuple[Any, dict[str, Any], Tensor | None]:
        return self, flat_cfg_dict(self), self._log_sparsity

    def __iter__(self) -> Iterator[Any]:
        warnings.warn(
            "Unpacking an SAE is deprecated: SAE.from_pretrained() returns only the SAE. "
            "Use SAE.from_pretrained_with_cfg_and_sparsity() for the (sae, cfg_dict, "
            "log_sparsity) tuple.",
            DeprecationWarning,
            stacklevel=2,
        )
        yield from self._legacy_tuple()

    def __getitem__(self, index: int) -> Any:
        warnings.warn(
            "Indexing an SAE is deprecated: SAE.from_pretrained() returns only the SAE. "
            "Use SAE.from_pretrained_with_cfg_and_sparsity().",
            DeprecationWarning,
            stacklevel=2,
        )
        items = self._legacy_tuple()
        if not -3 <= index < 3:
            raise IndexError(f"SAE tuple index {index} out of range")
        return items[index]

    # ------------------------------------------------------------------ misc SAELens API
    def get_name(self) -> str:
        md = self.cfg.metadata
        return f"sae_{md.model_name}_{md.hook_name}_{self.cfg.d_sae}"


def _coo_to_code(acts: Tensor) -> SparseCode:
    """A ``torch.sparse_coo`` ``[..., d_sae]`` tensor (no dense dims) -> padded
    ``SparseCode [..., K]``, K = the most entries any token has (padding: value 0).
    Differentiable in the COO values."""
    acts = acts.coalesce()  # sorted, duplicates summed: token-major flat positions
    ids, values = acts.indices(), acts.values()
    lead, d_sae = acts.shape[:-1], acts.shape[-1]
    rows = torch.zeros_like(ids[-1])
    for dim, size in enumerate(lead):  # row-major token number
        rows = rows * size + ids[dim]
    n_tokens = lead.numel()
    rows, slot, width = torch_ops.padded_layout(rows * d_sae + ids[-1], n_tokens, d_sae)
    code_values = values.new_zeros(n_tokens, width).index_put((rows, slot), values)
    code_ids = torch.zeros(n_tokens, width, dtype=torch.long, device=values.device)
    code_ids[rows, slot] = ids[-1]
    return SparseCode(code_values.reshape(*lead, width), code_ids.reshape(*lead, width))


_IDENTITY = nn.Identity()


@contextmanager
def _disable_hooks(sae: SAE):
    """Swap every hook point for an identity module (for the clean error-term pass)."""
    hooks = {name: getattr(sae, name) for name in _HOOK_NAMES}
    try:
        for name in _HOOK_NAMES:
            setattr(sae, name, _IDENTITY)
        yield
    finally:
        for name, hook in hooks.items():
            setattr(sae, name, hook)
