"""``fastsae`` command line: ``demo``, ``train``, ``cache``, ``convert``, ``bench``,
``tune``, ``labels download`` and ``dashboard``."""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch

from fastsae import bench as bench_engine
from fastsae import ops, tuning
from fastsae.loading.disk import SPARSITY_FILENAME, read_log_sparsity

MINILM_LAYERS = 6  # all-MiniLM-L6-v2: encoder.layer.0 .. encoder.layer.5


def positive_int(text: str) -> int:
    """An argparse ``type``: an int > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def nonempty_path(text: str) -> str:
    """An argparse ``type``: a path that is not empty (an empty one means the current
    folder, where a typo'd or unset shell variable would write or read by accident)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; give a folder (use '.' for the current one)")
    return text


def demo(args: argparse.Namespace) -> int:
    """Train a TopK SAE on real all-MiniLM-L6-v2 activations (nothing downloaded)."""
    from fastsae.training.demo import run_demo  # import cost: the training stack

    res = run_demo(
        training_tokens=args.tokens,
        expansion_factor=args.expansion_factor,
        k=args.k,
        layer=args.layer,
        batch_tokens=args.batch_tokens,
        output_path=args.out,
        device=args.device,
        seed=args.seed,
        recipe=None if args.recipe == "sae-lens" else args.recipe,
        show_progress=not args.no_progress,
    )
    print(
        f"\nTrained a TopK SAE (d_in=384, d_sae={384 * args.expansion_factor}, k={args.k}) on "
        f"{res.n_tokens:,} tokens of all-MiniLM-L6-v2 encoder.layer.{args.layer} activations "
        f"in {res.train_seconds:.0f} s ({res.tokens_per_second:,.0f} tokens/s)"
    )
    print(f"held-out explained variance {res.explained_variance:.3f}, L0 {res.l0:.1f}, "
          f"dead latents {100 * res.dead_fraction:.1f}%")  # fmt: skip
    print(f"SAE saved to {res.output_path} (SAELens format); curves: {res.curves}")
    return 0


def train(args: argparse.Namespace) -> int:
    """Train an SAE from a YAML/JSON LanguageModelSAERunnerConfig."""
    # import cost: the training stack (transformer_lens, datasets), not for every command
    from fastsae.training.config import LanguageModelSAERunnerConfig
    from fastsae.training.recipe import recipe_fields_kept
    from fastsae.training.runner import SAETrainingRunner

    overrides = {}
    if args.recipe is not None:  # "sae-lens": SAELens's training whatever the file says
        overrides["recipe"] = None if args.recipe == "sae-lens" else args.recipe
    cfg = LanguageModelSAERunnerConfig.from_file(args.config, **overrides)
    for name, value, recipe_value in recipe_fields_kept(cfg):
        print(f"note: the config sets {name}={value!r}, kept in place of recipe "
              f"{cfg.recipe!r}'s {recipe_value!r}", file=sys.stderr)  # fmt: skip
    if args.resume is not None:
        cfg.resume_from_checkpoint = args.resume
    runner = SAETrainingRunner(cfg, show_progress=not args.no_progress)
    runner.run()
    if runner.dist.rank != 0:  # under torchrun, rank 0 reports
        return 0
    m = runner.trainer.last_metrics
    if m:
        print(f"explained variance {m['metrics/explained_variance']:.3f}, L0 "
              f"{m['metrics/l0']:.1f}, dead latents {m['sparsity/dead_features']}")  # fmt: skip
    print(f"SAE saved to {cfg.output_path}")
    return 0


def cache(args: argparse.Namespace) -> int:
    """Write a config's activations to disk as safetensors shards."""
    # import cost: the training stack (transformer_lens, datasets), not for every command
    from fastsae.training.config import LanguageModelSAERunnerConfig
    from fastsae.training.data.activation_cache import (
        cache_activations_from_config,
        check_cache_target,
    )
    from fastsae.training.runner import load_model

    cfg = LanguageModelSAERunnerConfig.from_file(args.config)
    if args.out is not None:
        cfg.cached_activations_path = args.out
    if not cfg.cached_activations_path:
        raise ValueError("no cached_activations_path in the config and no --out given")
    check_cache_target(cfg.cached_activations_path)  # before a model load of minutes
    # load_model gives (model, tokenizer): a transformers model needs its tokenizer
    model, tokenizer = load_model(cfg)
    path = cache_activations_from_config(cfg, model, tokenizer=tokenizer)
    print(f"cached {cfg.training_tokens:,} activations of {cfg.hook_name} to {path}")
    return 0


def check_not_same_folder(src: str, dst: str) -> None:
    """Refuse ``dst`` naming the folder ``src`` is (under any spelling or symlink):
    writing there would overwrite the source's files."""
    src_path, dst_path = Path(src), Path(dst)
    same = src_path.resolve() == dst_path.resolve()
    if not same and dst_path.exists() and src_path.exists():
        same = os.path.samefile(src_path, dst_path)  # e.g. a bind mount or hard link
    if same:
        raise ValueError(
            f"DST {dst!r} is the source folder {src!r}: converting in place would overwrite "
            "the source; give another output folder"
        )


def convert(args: argparse.Namespace) -> int:
    """Load any supported SAE folder and write it in the SAELens 6.x format, with the
    source's ``sparsity.safetensors`` (log feature sparsity) when it has one."""
    from fastsae import SAE  # import cost: the SAE modules pull in transformer_lens

    check_not_same_folder(args.src, args.dst)
    src = Path(args.src)
    sae = SAE.load_from_disk(src, dtype=args.dtype, validate=True)
    sparsity_file = src / SPARSITY_FILENAME
    sparsity = read_log_sparsity(sparsity_file, d_sae=sae.cfg.d_sae) if src.is_dir() else None
    weights, cfg = sae.save_model(args.dst, sparsity=sparsity)
    carried = " with its sparsity" if sparsity is not None else ""
    print(f"{args.src} -> {type(sae).__name__} (d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}) "
          f"written to {weights.parent}{carried}")  # fmt: skip
    return 0


def bench(args: argparse.Namespace) -> int:
    """Benchmark fastsae (Triton and torch paths) against sae_lens and the dense maths."""
    return bench_engine.run(args)


def tune(args: argparse.Namespace) -> int:
    """Pre-tune ``impl="auto"``'s path choice over a grid of shapes and print the decisions
    (cached in ``fastsae.tuning.cache_dir()``, so later runs start tuned)."""
    if not torch.cuda.is_available():
        print("fastsae tune: error: needs a CUDA device (impl='auto' tunes only on CUDA; "
              "CPU tensors always take the torch path)", file=sys.stderr)  # fmt: skip
        return 2
    if not tuning.tuning_enabled():
        print(f"fastsae tune: error: {tuning.TUNE_ENV}=0 turns tuning off; unset it to tune",
              file=sys.stderr)  # fmt: skip
        return 2
    shapes = [bench_engine.parse_shape(s) for s in args.shapes] if args.shapes else list(
        dict.fromkeys(bench_engine.GPU_SHAPES + bench_engine.GEMMA_SCOPE_SHAPES))  # fmt: skip
    dtypes = []
    for name in args.dtype:
        if name not in bench_engine.DTYPES:
            raise ValueError(f"--dtype: unknown {name!r}; expected one of fp32, bf16, fp16")
        dtypes.append(bench_engine.DTYPES[name])
    cache = tuning.active_tuner().cache.path
    print(f"tuning on {torch.cuda.get_device_name()}; decisions cached in {cache}")
    for dtype, (d_in, d_sae), rows, k in itertools.product(dtypes, shapes, args.rows, args.k):
        point = ops.GridPoint(d_in, d_sae, rows, k, dtype)
        paths = ops.pretune(point)
        print(f"{d_in}x{d_sae} rows={rows} k={k} {bench_engine.DTYPE_NAMES[dtype]}: "
              f"{tuning.describe_paths(paths)}", flush=True)  # fmt: skip
    return 0


def positive_float(text: str) -> float:
    """An argparse ``type``: a float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def labels_download(args: argparse.Namespace) -> int:
    """Download every feature's Neuronpedia label of a registry SAE (resumable)."""
    from fastsae.labels import download_feature_labels

    if args.exports_url is not None and not args.bulk:
        raise ValueError("--exports-url is where --bulk reads; add --bulk (or drop it)")
    try:
        res = download_feature_labels(
            args.release,
            args.sae_id,
            neuronpedia_id=args.neuronpedia_id,
            out=args.out,
            features=args.features,
            num_features=args.num_features,
            api_url=args.api_url,
            api_key=args.api_key,
            requests_per_second=args.requests_per_second,
            workers=args.workers,
            timeout=args.timeout,
            max_retries=args.max_retries,
            show_progress=not args.no_progress,
            bulk=args.bulk,
            exports_url=args.exports_url,
        )
    except KeyboardInterrupt:
        print("fastsae labels: interrupted; what was fetched is kept, run the same command "
              "again to resume", file=sys.stderr)  # fmt: skip
        return 130
    s = res.stats
    batches = f", {res.batches} export batches" if args.bulk else ""
    print(f"{s['successful']} of {s['total_features']} features labelled "
          f"({s['with_descriptions']} with a description, {s['failed']} failed; fetched "
          f"{res.fetched} now{batches}, {res.already_had} already downloaded) in "
          f"{res.folder}")  # fmt: skip
    if res.failed:
        shown = ", ".join(map(str, res.failed[:10])) + (", ..." if len(res.failed) > 10 else "")
        print(f"failed features: {shown} (listed in {res.metadata_path}); run the same command "
              "again to retry them", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def dashboard(args: argparse.Namespace) -> int:
    """Compute the requested features' dashboard data, build the static site, and
    serve it with live encoding when asked."""
    # import cost: transformer_lens, datasets, jinja2
    from fastsae.dashboard import data, explorer, site
    from fastsae.dashboard.model import load_dashboard_model
    from fastsae.labels import find_feature_labels, load_feature_labels, parse_feature_spec

    if args.max_tokens < args.context_size:
        raise ValueError(f"--max-tokens {args.max_tokens} is less than one row of "
                         f"--context-size {args.context_size} tokens")  # fmt: skip
    settings = data.DashboardSettings(
        top_k=args.top_k, window=args.window, n_quantiles=args.n_quantiles,
        quantile_examples=args.quantile_examples, hist_bins=args.hist_bins,
        logit_k=args.logit_k, batch_size=args.batch_size, seed=args.seed,
    )  # fmt: skip
    prompts = explorer.read_prompts(args.prompts) if args.prompts is not None else None
    sae = data.load_sae(args.sae, args.sae_id, args.device)
    features = (
        parse_feature_spec(args.features, sae.cfg.d_sae) if args.features is not None else None
    )
    labels = load_feature_labels(args.labels) if args.labels is not None else None
    if labels is None:  # those from_pretrained attached, else any for its neuronpedia id
        labels = getattr(sae, "feature_labels", None)
    if labels is None and getattr(sae.cfg.metadata, "neuronpedia_id", None):
        labels = find_feature_labels(sae)  # downloaded by `fastsae labels download`, if so
    metadata = sae.cfg.metadata
    model_name = args.model or getattr(metadata, "model_name", None)
    if not model_name:
        raise ValueError("the SAE's cfg.metadata names no model: give --model")
    model_class = args.model_class or getattr(metadata, "model_class_name", None)
    hook_name = args.hook_name or getattr(metadata, "hook_name", None)
    if not hook_name:
        raise ValueError("the SAE has no cfg.metadata.hook_name: give --hook-name")
    model = load_dashboard_model(
        model_name, hook_name, model_class_name=model_class or "HookedTransformer",
        device=args.device,
    )  # fmt: skip
    tokens = data.load_token_rows(
        model.tokenizer, text_file=args.text_file, dataset=args.dataset,
        column=args.column, split=args.split, context_size=args.context_size,
        max_tokens=args.max_tokens,
    )  # fmt: skip
    info = {"sae": args.sae, "sae_id": args.sae_id, "model": model_name,
            "text_file": args.text_file, "dataset": args.dataset, "column": args.column}  # fmt: skip
    try:
        res = data.write_dashboard_data(
            args.out, sae, model, tokens, features, settings=settings, labels=labels,
            chunk_size=args.chunk_size, info=info, show_progress=not args.no_progress,
        )  # fmt: skip
    except KeyboardInterrupt:
        print("fastsae dashboard: interrupted; finished chunks are kept, run the same command "
              "again to resume", file=sys.stderr)  # fmt: skip
        return 130
    print(data.describe(res))
    encoder = explorer.PromptEncoder(sae, model, labels=labels, top_n=args.explorer_top_n)
    if prompts is not None:
        site.write_prompts(args.out, explorer.explore_prompts(encoder, prompts))
    index = site.build_site(args.out)
    print(f"dashboard: {index.resolve().as_uri()}")
    if not args.serve:
        return 0
    from fastsae.dashboard.server import DashboardServer

    server = DashboardServer(args.out, encoder, host=args.host, port=args.port)
    print(f"serving the dashboard with live encoding at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "demo", help="train a TopK SAE on real all-MiniLM-L6-v2 activations, offline"
    )
    # checked here: a bad value would otherwise fail only after the corpus and model load
    # (--layer), or in the demo's schedule arithmetic (--batch-tokens 0)
    p.add_argument("--tokens", type=positive_int, default=1_000_000, help="training tokens")
    p.add_argument("--expansion-factor", type=positive_int, default=8)
    p.add_argument("--k", type=positive_int, default=32)
    p.add_argument("--layer", type=int, default=3, choices=range(MINILM_LAYERS),
                   metavar=f"{{0..{MINILM_LAYERS - 1}}}",
                   help="MiniLM layer (encoder.layer.N)")  # fmt: skip
    p.add_argument("--batch-tokens", type=positive_int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=nonempty_path, default="fastsae-demo", help="output folder")
    p.add_argument("--recipe", choices=["fastsae", "sae-lens"], default="fastsae",
                   help="fastsae's training recipe (initialisation from data), or "
                   "SAELens's training")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=demo)

    p = sub.add_parser("train", help="train an SAE from a YAML/JSON runner config")
    p.add_argument("config", help="LanguageModelSAERunnerConfig as .yaml/.yml/.json")
    p.add_argument(
        "--resume", type=nonempty_path, default=None, help="checkpoint folder to resume from"
    )
    p.add_argument("--recipe", choices=["fastsae", "sae-lens"], default=None,
                   help="fastsae's training recipe, or SAELens's training, in place of the "
                   "config's recipe (the fields the config sets itself are kept)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=train)

    p = sub.add_parser("cache", help="cache a config's activations as safetensors shards")
    p.add_argument("config", help="LanguageModelSAERunnerConfig as .yaml/.yml/.json")
    p.add_argument(
        "--out", type=nonempty_path, default=None, help="folder (default: cached_activations_path)"
    )
    p.set_defaults(func=cache)

    p = sub.add_parser(
        "convert", help="convert an SAE folder (any supported format) to SAELens format"
    )
    p.add_argument(
        "src",
        type=nonempty_path,
        help="folder: SAELens, Gemma Scope, sparsify or dictionary_learning",
    )
    p.add_argument("dst", type=nonempty_path, help="output folder (not SRC)")
    p.add_argument("--dtype", default=None, help="e.g. float32, bfloat16 (default: as stored)")
    p.set_defaults(func=convert)

    p = sub.add_parser(
        "bench",
        help="time encode/decode/forward/backward: fastsae-triton, fastsae-torch, sae_lens, "
        "dense torch; table, JSON and PNG",
    )
    bench_engine.add_arguments(p)
    p.set_defaults(func=bench)

    p = sub.add_parser(
        "tune", help="pre-tune impl='auto' dispatch (fastest path per shape) on this CUDA GPU"
    )
    p.add_argument("--shapes", nargs="+", default=None, metavar="D_INxD_SAE",
                   help="encoder shapes (default: fastsae bench's GPU shapes)")  # fmt: skip
    p.add_argument("--rows", nargs="+", type=positive_int,
                   default=list(bench_engine.GPU_BATCHES), help="batch sizes (tokens)")  # fmt: skip
    p.add_argument("--k", nargs="+", type=positive_int, default=[bench_engine.K],
                   help="TopK k (JumpReLU aims at a mean L0 of 1.5 k)")  # fmt: skip
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], help="fp32, bf16, fp16")
    p.set_defaults(func=tune)

    p = sub.add_parser("labels", help="feature labels from Neuronpedia")
    labels_sub = p.add_subparsers(dest="labels_command", required=True)
    p = labels_sub.add_parser(
        "download",
        help="download every feature's Neuronpedia label of an SAE (resumable)",
        description="Writes OUT/RELEASE/SAE_ID/feature_labels.json and metadata.json; an "
        "interrupted run resumes, and a later run retries only the failed features.",
    )
    p.add_argument("--release", required=True, help="registry release, e.g. "
                   "gemma-scope-2b-pt-res-canonical")  # fmt: skip
    p.add_argument("--sae-id", required=True, help="e.g. layer_16/width_16k/canonical")
    p.add_argument("--neuronpedia-id", default=None, metavar="MODEL/SOURCE",
                   help="default: the registry's")  # fmt: skip
    p.add_argument("--out", type=nonempty_path, default=None,
                   help="root folder (default: ~/.cache/fastsae/labels)")  # fmt: skip
    p.add_argument("--features", default=None, metavar="SPEC",
                   help="a subset: indices and ranges, e.g. 0-99,200 (default: all)")  # fmt: skip
    p.add_argument("--num-features", type=positive_int, default=None,
                   help="the SAE's width, when the sae_id and the local cache cannot tell")  # fmt: skip
    p.add_argument("--api-url", default=None,
                   help="default: $NEURONPEDIA_API_URL, else https://www.neuronpedia.org")  # fmt: skip
    p.add_argument("--api-key", default=None,
                   help="sent as x-api-key (default: $NEURONPEDIA_API_KEY)")  # fmt: skip
    p.add_argument("--requests-per-second", type=positive_float, default=5.0)
    p.add_argument("--workers", type=positive_int, default=4, help="concurrent requests")
    p.add_argument("--timeout", type=positive_float, default=30.0, help="seconds per request")
    p.add_argument("--max-retries", type=int, default=5,
                   help="on HTTP 429/5xx and connection errors")  # fmt: skip
    p.add_argument("--bulk", action="store_true",
                   help="read the descriptions from Neuronpedia's bulk exports (no tokens or "
                   "max activation), then fetch the features they lack through the API")  # fmt: skip
    p.add_argument("--exports-url", default=None,
                   help="with --bulk: default $NEURONPEDIA_EXPORTS_URL, else "
                   "https://neuronpedia-datasets.s3.us-east-1.amazonaws.com/v1")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=labels_download)

    p = sub.add_parser(
        "dashboard",
        help="build a feature dashboard (a static site) with density, histograms, top and "
        "quantile contexts, logit lens, labels and a prompt explorer",
        description="Writes OUT/index.html (open it in a browser; no server needed), "
        "OUT/data/features/<index>.json (one per feature, SAEDashboard / Neuronpedia export "
        "fields) and OUT/data/meta.json. Features are computed in chunks (two passes over "
        "the tokens each); a rerun skips the finished chunks. --serve then serves the site "
        "on the loopback address and encodes any text typed in its prompt explorer.",
    )
    p.add_argument("sae", type=nonempty_path, metavar="SAE_DIR_OR_RELEASE",
                   help="an SAE folder, or a registry release with --sae-id")  # fmt: skip
    p.add_argument("--sae-id", default=None, help="with a registry release")
    p.add_argument(
        "--model",
        default=None,
        help="model name or folder (default: the SAE's cfg.metadata.model_name)",
    )
    p.add_argument("--model-class", default=None,
                   choices=["HookedTransformer", "TransformerBridge", "AutoModel"],
                   help="how to load --model (default: the SAE's metadata, else "
                   "HookedTransformer)")  # fmt: skip
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text-file", type=nonempty_path, default=None,
                      help="plain text, one document per line")  # fmt: skip
    text.add_argument("--dataset", default=None,
                      help="Hugging Face dataset id (streamed), local file/folder, or "
                      "'local-docstrings' (the demo's text: docstrings of installed packages)")  # fmt: skip
    p.add_argument("--column", default="text", help="dataset column (text or token ids)")
    p.add_argument("--split", default="train")
    p.add_argument("--labels", type=nonempty_path, default=None,
                   help="feature_labels.json (or its folder) from `fastsae labels download` "
                   "(default: the SAE's downloaded labels, when found)")  # fmt: skip
    p.add_argument("--features", default=None, metavar="SPEC",
                   help="indices and ranges, e.g. 0-99,200 (default: all)")  # fmt: skip
    p.add_argument("--out", type=nonempty_path, required=True, help="output folder")
    p.add_argument("--hook-name", default=None, help="default: the SAE's cfg.metadata.hook_name")
    p.add_argument("--max-tokens", type=positive_int, default=1_000_000,
                   help="read at most this many tokens")  # fmt: skip
    p.add_argument("--context-size", type=positive_int, default=128, help="tokens per row")
    p.add_argument("--batch-size", type=positive_int, default=16, help="rows per forward")
    p.add_argument("--chunk-size", type=positive_int, default=1024,
                   help="features per chunk (the unit of resuming; two passes each)")  # fmt: skip
    p.add_argument("--top-k", type=positive_int, default=20, help="top contexts per feature")
    p.add_argument("--n-quantiles", type=positive_int, default=10,
                   help="activation intervals to sample contexts from")  # fmt: skip
    p.add_argument("--quantile-examples", type=positive_int, default=5,
                   help="contexts per interval")  # fmt: skip
    p.add_argument("--window", type=int, default=8, help="context tokens each side")
    p.add_argument("--hist-bins", type=positive_int, default=50)
    p.add_argument("--logit-k", type=positive_int, default=10, help="logit-lens tokens each way")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="of the quantile sampling")
    p.add_argument(
        "--prompts",
        type=nonempty_path,
        default=None,
        help="text file, one prompt per line: precomputed for the prompt explorer",
    )
    p.add_argument("--explorer-top-n", type=positive_int, default=8,
                   help="features shown per token in the prompt explorer")  # fmt: skip
    p.add_argument("--serve", action="store_true",
                   help="then serve the site with live encoding of typed text")  # fmt: skip
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="with --serve: the address to listen on (loopback by default)",
    )
    p.add_argument("--port", type=int, default=8000, help="with --serve (0: any free port)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, NotImplementedError, ImportError) as e:
        print(f"fastsae {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
