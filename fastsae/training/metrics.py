"""Training metrics: a JSONL file, a PNG of the curves, and optional Weights & Biases."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastsae.saes.training_sae import TrainStepOutput


@torch.no_grad()
def step_metrics(output: TrainStepOutput) -> dict[str, float]:
    """Scalar metrics of one step (SAELens log keys): losses, explained variance, L0, MSE."""
    sae_in = output.sae_in.detach().float()
    sae_out = output.sae_out.detach().float()
    per_token_l2 = (sae_out - sae_in).pow(2).sum(dim=-1)
    total_variance = (sae_in - sae_in.mean(0)).pow(2).sum(-1)
    res = {
        "losses/overall_loss": float(output.loss.detach()),
        "metrics/explained_variance": float(1 - per_token_l2.mean() / total_variance.mean()),
        "metrics/explained_variance_legacy": float((1 - per_token_l2 / total_variance).mean()),
        "metrics/l0": float(output.l0()),
        "metrics/mse": float(per_token_l2.mean() / sae_in.shape[-1]),
    }
    for name, value in output.losses.items():
        res[f"losses/{name}"] = float(value.detach()) if isinstance(value, Tensor) else float(value)
    for name, value in output.metrics.items():
        value = value() if callable(value) else value
        res[f"metrics/{name}"] = (
            float(value.detach()) if isinstance(value, Tensor) else float(value)
        )
    return res


class MetricsLogger:
    """Append metric rows to ``<dir>/metrics.jsonl``; plot them to ``training_curves.png``.

    ``wandb_run`` (optional) receives the same rows.
    """

    def __init__(self, directory: str | Path | None, wandb_run: Any = None):
        self.path = Path(directory) / "metrics.jsonl" if directory is not None else None
        self.wandb_run = wandb_run
        self._tail_checked = False
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, row: dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in row.items()}}
        if self.path is not None:
            if not self._tail_checked:
                self._drop_torn_tail()
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def rows(self) -> list[dict[str, Any]]:
        """The file's rows. A last line that is not valid JSON is what a kill during a
        write leaves: it is dropped with a warning. An invalid line before it raises,
        naming the file and the line."""
        if self.path is None or not self.path.is_file():
            return []
        lines = [(i, line) for i, line in enumerate(self.path.read_text().splitlines(), 1)]
        lines = [(i, line) for i, line in lines if line.strip()]
        rows = []
        for n, (number, line) in enumerate(lines):
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    raise ValueError("not a metrics row (a JSON object with an integer step)")
            except ValueError as e:
                if n == len(lines) - 1:
                    warnings.warn(
                        f"{self.path}: dropping its last line {number}, cut off by an "
                        f"interrupted write ({e})",
                        stacklevel=2,
                    )
                    break
                raise ValueError(f"{self.path}, line {number}: corrupt metrics row ({e})") from e
            rows.append(row)
        return rows

    def _drop_torn_tail(self) -> None:
        """Before the first append: cut a last line that a kill left without its newline,
        so the rows appended next do not run into it."""
        self._tail_checked = True
        if self.path is None or not self.path.is_file():
            return
        text = self.path.read_text()
        if not text or text.endswith("\n"):
            return
        warnings.warn(
            f"{self.path}: dropping its last line, cut off by an interrupted write", stacklevel=3
        )
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text(text[: text.rfind("\n") + 1])
        tmp.replace(self.path)

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (a resumed run rewrites them)."""
        if self.path is None or not self.path.is_file():
            return
        kept = [r for r in self.rows() if r["step"] <= step]
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

    def plot(self, path: str | Path | None = None) -> Path | None:
        """Training curves (loss, MSE, explained variance, L0, dead latents) to a PNG.

        Returns the path, or None when there is nothing to plot or no matplotlib.
        """
        rows = self.rows()
        if not rows:
            return None
        try:
            import matplotlib  # optional dependency: matplotlib (the [bench] / [demo] extras)

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt  # optional dependency, after the backend is set
        except ImportError:
            return None
        path = Path(path) if path is not None else self.path.with_name("training_curves.png")  # type: ignore[union-attr]
        panels = [
            ("losses/overall_loss", "loss", True),
            ("metrics/mse", "MSE per element", True),
            ("metrics/explained_variance", "explained variance", False),
            ("metrics/l0", "L0", False),
            ("sparsity/dead_features", "dead latents", False),
        ]
        panels = [p for p in panels if any(p[0] in r for r in rows)]
        if not panels:
            return None
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
        for ax, (key, title, log_y) in zip(axes[0], panels, strict=False):
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts])
            ax.set_title(title)
            ax.set_xlabel("step")
            if log_y and all(p[1] > 0 for p in pts):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)
        return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
