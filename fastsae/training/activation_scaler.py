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
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

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

    def load(self, directory: Path) -> None:
        path = directory / SCALER_FILENAME
        if not path.is_file():
            return
        data = json.loads(path.read_text())
        self.scaling_factor = data.get("scaling_factor")
        if data.get("has_whitening"):
            whitening = directory / WHITENING_FILENAME
            if not whitening.is_file():
                raise FileNotFoundError(f"{whitening} is missing: the checkpoint whitens inputs")
            tensors = load_file(str(whitening))
            self.mean, self.matrix = tensors["mean"], tensors["matrix"]
            self.inverse_matrix = tensors["inverse_matrix"]
