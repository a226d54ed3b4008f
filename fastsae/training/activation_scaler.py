"""Input normalisation applied while training and folded into the SAE at the end.

* ``expected_average_only_in``: scale activations by ``sqrt(d_in) / mean ||x||``;
* ``covariance_whitening``: PCA whitening ``z = (x - mean) @ E diag(lambda + eps)^-1/2``
  (https://arxiv.org/abs/2511.13981), statistics accumulated in float64.

Both are estimated from ``n_batches_for_norm_estimate`` batches before the first step,
saved with every checkpoint, and folded into the weights when training ends, so the
saved SAE takes raw activations (SAELens does the same).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from fastsae.loading.disk import read_json, read_safetensors

SCALER_FILENAME = "activation_scaler.json"
WHITENING_FILENAME = "activation_whitening.safetensors"


class ActivationScaler:
    """Holds the scaling factor and/or whitening of a run; ``scaler(x)`` applies them."""

    def __init__(self) -> None:
        self.scaling_factor: float | None = None
        self.mean: Tensor | None = None  # [d_in] float64
        self.matrix: Tensor | None = None  # [d_in, d_in] float64, whitening
        self.inverse_matrix: Tensor | None = None  # [d_in, d_in] float64

    @property
    def whitening(self) -> bool:
        return self.matrix is not None

    def __call__(self, acts: Tensor) -> Tensor:
        if self.scaling_factor is not None:
            acts = acts * self.scaling_factor
        if self.matrix is not None:
            assert self.mean is not None
            if self.matrix.device != acts.device:
                self.mean, self.matrix = self.mean.to(acts.device), self.matrix.to(acts.device)
            acts = (acts - self.mean.to(acts.dtype)) @ self.matrix.to(acts.dtype)
        return acts

    @torch.no_grad()
    def estimate_scaling_factor(
        self, batches: Iterator[Tensor], n_batches: int, d_in: int
    ) -> float:
        total, count = 0.0, 0
        for _ in tqdm(range(n_batches), desc="Estimating norm scaling factor", leave=False):
            norms = next(batches).float().norm(dim=-1)
            total += float(norms.sum())
            count += norms.numel()
        _check_statistic(total, count, n_batches, "expected_average_only_in")
        if total == 0:
            raise ValueError(
                f"expected_average_only_in: the {count} activations of the "
                f"{n_batches} batches used to estimate the scaling factor "
                "(n_batches_for_norm_estimate) are all zero, so they cannot be scaled to "
                "norm sqrt(d_in): check hook_name (a hook that outputs zeros) and the data"
            )
        self.scaling_factor = d_in**0.5 / (total / count)
        return self.scaling_factor

    @torch.no_grad()
    def estimate_whitening(
        self, batches: Iterator[Tensor], n_batches: int, d_in: int, eps: float = 1e-3
    ) -> None:
        count = 0
        sum_x = torch.zeros(d_in, dtype=torch.float64)
        sum_outer = torch.zeros(d_in, d_in, dtype=torch.float64)
        for _ in tqdm(range(n_batches), desc="Estimating whitening", leave=False):
            acts = next(batches).to(torch.float64).reshape(-1, d_in)
            sum_x, sum_outer = sum_x.to(acts.device), sum_outer.to(acts.device)
            count += acts.shape[0]
            sum_x += acts.sum(0)
            sum_outer += acts.T @ acts
        if count < 2:
            raise ValueError("covariance_whitening needs at least 2 activations to estimate from")
        _check_statistic(float(sum_outer.trace()), count, n_batches, "covariance_whitening")
        mean = sum_x / count
        cov = (sum_outer - count * torch.outer(mean, mean)) / (count - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues = eigenvalues.clamp(min=0) + eps  # eigh may give tiny negatives
        self.mean = mean
        self.matrix = (eigenvectors * eigenvalues.rsqrt()).contiguous()
        self.inverse_matrix = (eigenvalues.sqrt().unsqueeze(1) * eigenvectors.T).contiguous()

    def fold_into(self, sae: torch.nn.Module) -> None:
        """Fold the normalisation into ``sae`` (then it takes raw activations) and forget it."""
        if self.scaling_factor is not None:
            sae.fold_activation_norm_scaling_factor(self.scaling_factor)
            self.scaling_factor = None
        if self.matrix is not None:
            sae.fold_activation_whitening(self.mean, self.matrix, self.inverse_matrix)
            self.mean = self.matrix = self.inverse_matrix = None

    def save(self, directory: Path) -> None:
        (directory / SCALER_FILENAME).write_text(
            json.dumps({"scaling_factor": self.scaling_factor, "has_whitening": self.whitening})
        )
        if self.matrix is not None:
            save_file(
                {
                    "mean": self.mean.cpu().contiguous(),
                    "matrix": self.matrix.cpu().contiguous(),
                    "inverse_matrix": self.inverse_matrix.cpu().contiguous(),
                },
                str(directory / WHITENING_FILENAME),
            )

    def load(self, directory: Path, normalisation: str | None = None) -> None:
        """Read what :meth:`save` wrote to ``directory``.

        ``normalisation``: the SAE's ``normalize_activations``. When it needs a saved
        statistic (``expected_average_only_in``: the scaling factor;
        ``covariance_whitening``: the whitening), a missing file or value raises naming
        the file: re-estimating it would train the resumed run on differently scaled
        inputs. Invalid files raise naming the file."""
        path = directory / SCALER_FILENAME
        needs_factor = normalisation == "expected_average_only_in"
        needs_whitening = normalisation == "covariance_whitening"
        if not path.is_file():
            if needs_factor or needs_whitening:
                raise FileNotFoundError(
                    f"{path} is missing: the run normalises its inputs ({normalisation}) "
                    "and resumes exactly only with the statistics it estimated (estimating "
                    "them again would change the inputs' scale mid-run)"
                )
            return
        data = read_json(path)
        factor = data.get("scaling_factor")
        if factor is not None and (
            isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or not math.isfinite(factor)
            or factor <= 0
        ):
            raise ValueError(
                f"{path}: scaling_factor must be a positive finite number or null, got {factor!r}"
            )
        has_whitening = data.get("has_whitening", False)
        if not isinstance(has_whitening, bool):
            raise ValueError(f"{path}: has_whitening must be true or false, got {has_whitening!r}")
        if needs_factor and factor is None:
            raise ValueError(
                f"{path} has no scaling_factor, but the run normalises its inputs with "
                "expected_average_only_in"
            )
        if needs_whitening and not has_whitening:
            raise ValueError(
                f"{path} records no whitening, but the run normalises its inputs with "
                "covariance_whitening"
            )
        self.scaling_factor = None if factor is None else float(factor)
        if has_whitening:
            whitening = directory / WHITENING_FILENAME
            if not whitening.is_file():
                raise FileNotFoundError(f"{whitening} is missing: the checkpoint whitens inputs")
            tensors = read_safetensors(whitening)
            missing = [k for k in ("mean", "matrix", "inverse_matrix") if k not in tensors]
            if missing:
                raise ValueError(f"{whitening}: missing tensors {missing}")
            self.mean, self.matrix = tensors["mean"], tensors["matrix"]
            self.inverse_matrix = tensors["inverse_matrix"]


def _check_statistic(value: float, count: int, n_batches: int, mode: str) -> None:
    """Raise when the activations a normalisation is estimated from hold NaN/inf."""
    if not math.isfinite(value):
        raise ValueError(
            f"{mode}: the {count} activations of the {n_batches} batches used to estimate "
            "the normalisation (n_batches_for_norm_estimate) hold non-finite values "
            "(NaN/inf): check the data and the model that produced them"
        )
