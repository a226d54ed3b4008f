"""Training-recipe ablation: which changes to SAELens's TopK / BatchTopK training keep
latents alive and raise explained variance at the same budget.

On cached all-MiniLM-L6-v2 ``encoder.layer.3`` activations (collected by
``benchmarks/quality_minilm.py``'s ``collect_activations``: docstring text, context 128,
CLS first, special tokens dropped; the training rows shuffled with a seeded generator,
the held-out rows the ones after them in dataset order), each variant trains one SAE
with fastsae's ``SAETrainer`` from the same initial weights on the same batches, and is
evaluated on the held-out rows with the shared code of ``quality_minilm.evaluate``:
explained variance, L0, dead latents (never fire on the held-out set), and from the
trainer: the dead fraction at the end and its maximum over training (its
``dead_neurons``: not fired in the last ``dead_feature_window`` steps).

The initialisation changes are the library's own (``b_dec_init``, ``decoder_init`` of
the trainer config, :mod:`fastsae.training.recipe`): the trainer draws its
initialisation rows from the data first (not trained on), then trains on the next
``steps`` batches.

Variants are cumulative, one change at a time (``--variants``), so the table reads as
an ablation. ``sae-lens`` trains the baseline with SAELens's own trainer (``--sae-lens``)
as the reference.

Usage::

    python benchmarks/training_recipe.py --activations /tmp/acts.pt --steps 500 \\
        --arch topk --out benchmarks/results/recipe-topk-500-cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from quality_minilm import D_IN, evaluate, train_sae_lens
from torch import Tensor

# Each change, applied on top of the ones before it in --variants order.
CHANGES: dict[str, dict[str, Any]] = {
    "baseline": {},
    "b_dec_median": {"b_dec_init": "geometric_median"},
    "b_dec_mean": {"b_dec_init": "mean"},
    "normalize": {"normalize": True},
    "dec_norm_1": {"decoder_init_norm": 1.0},
    "dec_from_data": {"decoder_init": "data"},
    "warmup": {"lr_warm_up_steps": 50},
    "aux_2": {"aux_coefficient": 2.0},
    "aux_4": {"aux_coefficient": 4.0},
    "window_10": {"dead_feature_window": 10},
    "window_25": {"dead_feature_window": 25},
    "lr_1e-3": {"lr": 1e-3},
    "lr_6e-4": {"lr": 6e-4},
    "beta2_0.99": {"adam_beta2": 0.99},
}


DEAD_WINDOW = 50  # steps: the dead-latent curves' definition, the same for every variant


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def train_variant(
    name: str, settings: dict[str, Any], init: dict[str, Tensor], train: Tensor, args: Any
) -> dict[str, Any]:
    from fastsae.training import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        LanguageModelSAERunnerConfig,
        SAETrainer,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    cls, cfg_cls = (
        (TopKTrainingSAE, TopKTrainingSAEConfig)
        if args.arch == "topk"
        else (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig)
    )
    sae_cfg = cfg_cls(
        d_in=D_IN,
        d_sae=args.d_sae,
        k=args.k,
        aux_loss_coefficient=settings.get("aux_coefficient", 1.0),
        decoder_init_norm=settings.get("decoder_init_norm", 0.1),
    )
    sae = cls(sae_cfg)
    if settings.get("decoder_init_norm", 0.1) == 0.1:
        # the very weights the baseline starts from (BatchTopK adds its threshold buffer)
        missing, unexpected = sae.load_state_dict(init, strict=False)
        assert not unexpected and set(missing) <= {"topk_threshold"}, (missing, unexpected)
    n = args.steps * args.batch_size
    rows = train  # the trainer draws its initialisation rows first, then trains on n
    cfg = LanguageModelSAERunnerConfig(
        sae=sae.cfg,
        dataset_path="unused",
        training_tokens=n,
        train_batch_size_tokens=args.batch_size,
        lr=settings.get("lr", args.lr),
        lr_scheduler_name="constant",
        lr_warm_up_steps=settings.get("lr_warm_up_steps", 0),
        adam_beta1=0.9,
        adam_beta2=settings.get("adam_beta2", 0.999),
        max_grad_norm=1.0,
        dead_feature_window=settings.get("dead_feature_window", args.dead_feature_window),
        feature_sampling_window=1000,
        checkpoint_path=None,
        output_path=None,
        n_checkpoints=0,
        device="cpu",
        b_dec_init=settings.get("b_dec_init", "zeros"),
        decoder_init=settings.get("decoder_init", "random"),
    )
    batches = (rows[i : i + args.batch_size] for i in range(0, rows.shape[0], args.batch_size))
    trainer = SAETrainer(cfg, sae, batches, show_progress=False)
    dead_curve: list[int] = []
    # dead = not fired in the last DEAD_WINDOW steps, whatever window the variant trains
    # with (its AuxK's); a latent counts from step 0
    last_fired = torch.zeros(args.d_sae, dtype=torch.long)
    step = trainer.step

    def recorded(batch: Tensor) -> Any:
        out = step(batch)
        n = len(dead_curve) + 1
        fired = (out.feature_acts > 0).any(0)
        last_fired[fired] = n
        dead_curve.append(int((n - last_fired >= DEAD_WINDOW).sum()))
        return out

    trainer.step = recorded
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    return {"sae": sae, "wall_seconds": wall, "dead_curve": dead_curve}


def weights_of(sae: Any) -> dict[str, Tensor]:
    w = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    return w


def evaluate_sae(sae: Any, held_out: Tensor, k: int, arch: str) -> dict[str, Any]:
    """``quality_minilm.evaluate`` for TopK; BatchTopK evaluates as its inference SAE
    (JumpReLU at the learned threshold), through the SAE's own forward."""
    if arch == "topk":
        return evaluate(weights_of(sae), held_out, k)
    inference = sae.to_inference_sae() if hasattr(sae, "to_inference_sae") else sae
    inference.eval()
    mean = held_out.mean(0)
    sq, var, l0 = 0.0, 0.0, 0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for s in range(0, held_out.shape[0], 8192):
            xb = held_out[s : s + 8192]
            acts = inference.encode(xb)
            x_hat = inference.decode(acts)
            sq += float((xb.double() - x_hat.double()).pow(2).sum())
            var += float((xb.double() - mean.double()).pow(2).sum())
            l0 += int((acts > 0).sum())
            fired |= (acts > 0).any(0)
    n = held_out.shape[0]
    dead = int((~fired).sum())
    return {
        "explained_variance": 1 - sq / var,
        "l0": l0 / n,
        "dead_latents": dead,
        "dead_fraction": dead / fired.numel(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--activations", type=Path, required=True,
                   help="torch file with train / held_out tensors")  # fmt: skip
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--arch", choices=["topk", "batchtopk"], default="topk")
    p.add_argument("--d-sae", type=int, default=16 * D_IN)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--dead-feature-window", type=int, default=50)
    p.add_argument("--variants", default="baseline,b_dec_median")
    p.add_argument("--sae-lens", action="store_true", help="also train SAELens's baseline")
    p.add_argument(
        "--start-at",
        default=None,
        help="train from this variant on (the ones before only add their settings)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    saved = torch.load(args.activations, weights_only=False)
    train, held_out = saved["train"].float(), saved["held_out"].float()
    need = args.steps * args.batch_size + max(args.d_sae, args.batch_size)  # + init rows
    if train.shape[0] < need:
        raise SystemExit(f"{args.activations} has {train.shape[0]} rows; {need} needed")
    from fastsae.training import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(args.seed)
    init = weights_of(TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=args.d_sae, k=args.k)))
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in CHANGES]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(CHANGES)}")
    results: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    started = args.start_at is None
    for name in names:
        settings = {**settings, **CHANGES[name]}
        started = started or name == args.start_at
        if not started:
            continue
        log(f"{name}: {settings}")
        torch.manual_seed(args.seed)
        x_train, x_held = train, held_out
        if settings.get("normalize"):
            scale = D_IN**0.5 / float(train[:65536].norm(dim=1).mean())
            x_train, x_held = train * scale, held_out * scale
        run = train_variant(name, settings, init, x_train, args)
        ev = evaluate_sae(run["sae"], x_held, args.k, args.arch)
        curve = run["dead_curve"]
        results[name] = {
            "settings": dict(settings),
            "held_out": ev,
            "dead_fraction_50_steps_end": curve[-1] / args.d_sae,
            "dead_fraction_50_steps_max": max(curve) / args.d_sae,
            "dead_curve_every_10": curve[::10],
            "wall_seconds": round(run["wall_seconds"], 1),
        }
        log(
            f"  EV {ev['explained_variance']:.4f} L0 {ev['l0']:.1f} dead(held-out) "
            f"{ev['dead_fraction']:.3f} dead(trainer) end {curve[-1] / args.d_sae:.3f} "
            f"max {max(curve) / args.d_sae:.3f} ({run['wall_seconds']:.0f} s)"
        )
    if args.sae_lens and args.arch == "topk":
        ns = argparse.Namespace(
            d_sae=args.d_sae, k=args.k, aux_coefficient=1.0, batch_size=args.batch_size,
            lr=args.lr, lr_warm_up_steps=0, lr_decay_steps=0,
            dead_feature_window=args.dead_feature_window, feature_sampling_window=1000,
        )  # fmt: skip
        w, info, _ = train_sae_lens(init, train[: args.steps * args.batch_size], ns)
        ev = evaluate(w, held_out, args.k)
        dead = [r["dead"] for r in info["curve"]]
        results["sae-lens"] = {
            "settings": "sae-lens 6 TopK defaults",
            "held_out": ev,
            "dead_fraction_50_steps_end": dead[-1] / args.d_sae,
            "dead_fraction_50_steps_max": max(dead) / args.d_sae,
            "dead_curve_every_10": dead[::10],
            "wall_seconds": round(info["wall_seconds"], 1),
        }
        log(f"  sae-lens EV {ev['explained_variance']:.4f} dead {ev['dead_fraction']:.3f}")
    report = {
        "benchmark": "training_recipe",
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "data": saved.get("info", {}),
        "arch": args.arch,
        "steps": args.steps,
        "d_sae": args.d_sae,
        "k": args.k,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "dead_feature_window": args.dead_feature_window,
        "results": results,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
