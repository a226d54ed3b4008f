"""The data of a feature dashboard: per-feature statistics and contexts over a token
stream, written as JSON in SAEDashboard's / Neuronpedia's export shape.

For each requested feature of an SAE reading a model's hook (TransformerLens or
Hugging Face, see :mod:`fastsae.dashboard.model`):

* ``frac_nonzero`` (activation density) over every token read, ``n_nonzero``,
  ``max_activation``;
* ``freq_hist_data_bar_heights`` / ``freq_hist_data_bar_values``: a histogram of the
  feature's non-zero activations, ``hist_bins`` equal-width bins over
  ``[min(0, min nonzero), max(0, max nonzero)]`` (``freq_hist_bin_edges`` holds the
  edges). The range is known only after one pass over the tokens, so every feature
  chunk takes **two passes**: pass 1 counts, finds the range and keeps the top
  contexts; pass 2 fills the histogram and samples the quantile contexts;
* ``activations``: first the ``top_k`` strongest positive activations (``bin_min =
  bin_max = -1``, ``kind: "top"``, strongest first), then for each of ``n_quantiles``
  equal-width intervals of the same range (highest first) up to ``quantile_examples``
  activations drawn uniformly at random from the non-zero activations in that interval
  (``bin_min``/``bin_max`` the interval, ``bin_contains`` the fraction of the feature's
  non-zero activations in it, ``kind: "quantile"``). Each context is the window of up
  to ``window`` tokens either side of the activating token (within its row):
  ``tokens`` (decoded strings), ``token_ids``, ``values`` (the feature's activation
  on each of those tokens), ``max_value_token_index`` (the activating token's place
  in the window), ``max_value``, ``row``/``position`` (in the token rows);
* ``pos_str``/``pos_values`` and ``neg_str``/``neg_values``: the ``logit_k`` tokens
  whose logits ``W_dec[f] @ W_U`` raises most / lowers most (most negative first),
  with ``pos_token_ids``/``neg_token_ids``; ``logits_hist_*``: the histogram of that
  vector over the whole vocabulary;
* ``label`` (the Neuronpedia description when a labels file has one, else None) and
  ``neuronpedia_url`` (None without a neuronpedia id).

Streaming: the model runs ``batch_size`` rows at a time up to the hook
(``stop_at_layer``); the SAE encodes them and only the chunk's features are kept, so
memory is ``O(batch tokens x d_sae)`` plus the per-feature running state (top-k,
bottom-k random keys per interval, histogram counts) -- never ``[tokens, d_sae]``. The
running top-k merges ``torch.topk`` of each batch with the best so far, and the
contexts' activation windows are gathered from the batch at that moment, so no third
pass is needed. The quantile samples keep, per feature and interval, the activations
with the smallest of a seeded uniform random key (bottom-k sampling: a uniform sample
without replacement, the vectorised equivalent of a reservoir).

Output folder (``write_dashboard_data``): ``OUT/data/features/<index>.json`` (one
record per feature), ``OUT/data/meta.json`` (SAE, model, hook, token counts, settings,
the feature list with a one-line summary each) and ``OUT/data/chunks/chunk_NNNNN.json``
(resume markers). Features are computed in chunks of ``chunk_size`` (each chunk is two
model passes over the tokens); a chunk's feature files and then its marker are written
atomically when it finishes, and a rerun with the same tokens, SAE config, hook,
settings and chunking skips every chunk whose marker matches.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastsae.analysis import feature_logit_lens
from fastsae.atomic_files import atomic_write_json
from fastsae.dashboard.model import DashboardModel
from fastsae.labels import FeatureLabels, neuronpedia_url
from fastsae.training.data.token_rows import special_token_id

FORMAT = "fastsae-dashboard-data"
VERSION = 1
DATA_DIR = "data"
META_FILENAME = "meta.json"
FEATURES_DIR = "features"
CHUNKS_DIR = "chunks"
TOP_BIN = -1  # bin_min / bin_max of a top-activation context (not a quantile interval)


@dataclass(frozen=True)
class DashboardSettings:
    """What to compute for each feature (see the module docstring)."""

    top_k: int = 20
    window: int = 8  # tokens either side of the activating token
    n_quantiles: int = 10
    quantile_examples: int = 5
    hist_bins: int = 50
    logit_k: int = 10
    logit_hist_bins: int = 50
    batch_size: int = 16  # rows (sequences) per forward
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name in ("window", "seed"):
                if value < 0:
                    raise ValueError(f"DashboardSettings.{name} must be >= 0, got {value}")
            elif value <= 0:
                raise ValueError(f"DashboardSettings.{name} must be > 0, got {value}")


def check_features(features: Sequence[int] | None, d_sae: int) -> list[int]:
    """Sorted, unique feature indices; every one must lie in ``[0, d_sae)``."""
    if features is None:
        return list(range(d_sae))
    ids = sorted({int(f) for f in features})
    bad = [f for f in ids if f < 0 or f >= d_sae]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise ValueError(
            f"unknown feature indices {shown}: the SAE has d_sae={d_sae} features (0-{d_sae - 1})"
        )
    if not ids:
        raise ValueError("no features requested")
    return ids


def check_tokens(tokens: Tensor) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        raise ValueError("tokens must be a [n_rows, context_size] tensor of token ids")
    if tokens.numel() == 0:
        raise ValueError(f"no tokens to read (tokens have shape {list(tokens.shape)})")
    return tokens.long().cpu()


# --------------------------------------------------------------------------- encoding


class _Encoder:
    """Token rows -> the chunk's feature activations ``[b, s, F]`` (float32)."""

    def __init__(self, sae: Any, model: DashboardModel):
        self.sae = sae
        self.model = model

    def hook_input(self, rows: Tensor) -> Tensor:
        return self.model.hook_input(rows, self.sae.cfg.d_in)

    @torch.no_grad()
    def __call__(self, rows: Tensor, ids: Tensor) -> Tensor:
        x = self.hook_input(rows)
        w = self.sae.W_dec
        acts = self.sae.encode(x.to(w.device, w.dtype))
        return acts[..., ids.to(acts.device)].float()


def _windows(acts: Tensor, flat_idx: Tensor, left: int, right: int) -> Tensor:
    """``acts [b, s, F]``, ``flat_idx [F, K]`` (``row * s + pos`` in the batch) ->
    the feature's activations at positions ``pos - left .. pos + right`` of the row,
    ``[F, K, left + 1 + right]``, NaN outside the row."""
    s, n_feat = acts.shape[1], acts.shape[2]
    row, pos = flat_idx // s, flat_idx % s
    offsets = torch.arange(-left, right + 1, device=acts.device)
    p = pos.unsqueeze(-1) + offsets
    valid = (p >= 0) & (p < s)
    feat = torch.arange(n_feat, device=acts.device).view(-1, 1, 1).expand_as(p)
    vals = acts[row.unsqueeze(-1).expand_as(p), p.clamp(0, s - 1), feat]
    return torch.where(valid, vals, torch.full_like(vals, float("nan")))


def _bin_index(values: Tensor, lo: Tensor, hi: Tensor, n_bins: int) -> Tensor:
    """Equal-width bin of each value in ``[lo, hi]`` (per feature row), clamped to
    ``0 .. n_bins - 1`` (the maximum falls in the last bin)."""
    width = (hi - lo).unsqueeze(-1)
    scaled = (values - lo.unsqueeze(-1)) / torch.where(width > 0, width, torch.ones_like(width))
    return (scaled * n_bins).floor().clamp(0, n_bins - 1).long()


def _merge_top(
    best: list[Tensor], new: list[Tensor], k: int, *, largest: bool, dim: int
) -> list[Tensor]:
    """Concatenate ``best`` and ``new`` (score first, then payloads) along ``dim`` and
    keep the ``k`` best scores with their payloads."""
    cat = [torch.cat([b, n], dim) for b, n in zip(best, new, strict=True)]
    top = cat[0].topk(min(k, cat[0].shape[dim]), dim=dim, largest=largest)
    out = [top.values]
    for payload in cat[1:]:
        idx = top.indices
        extra = payload.shape[idx.ndim :]  # e.g. the window of each context
        idx = idx.reshape(*idx.shape, *([1] * len(extra))).expand(*idx.shape, *extra)
        out.append(payload.gather(dim, idx))
    return out


@dataclass
class ChunkStats:
    """One feature chunk's accumulated statistics (CPU tensors, ``F`` features)."""

    n_tokens: int
    count: Tensor  # [F] non-zero activations
    lo: Tensor  # [F] histogram / interval range
    hi: Tensor  # [F]
    max_nz: Tensor  # [F] (-inf when never non-zero)
    top_vals: Tensor  # [F, k]
    top_loc: Tensor  # [F, k] row * s + pos
    top_win: Tensor  # [F, k, W]
    hist: Tensor  # [F, hist_bins]
    q_keys: Tensor  # [F, Q, m] (inf: no sample)
    q_vals: Tensor  # [F, Q, m]
    q_loc: Tensor  # [F, Q, m]
    q_win: Tensor  # [F, Q, m, W]
    q_count: Tensor  # [F, Q]


@torch.no_grad()
def compute_chunk_stats(
    encoder: _Encoder,
    tokens: Tensor,
    ids: Sequence[int],
    settings: DashboardSettings,
    *,
    device: torch.device | str,
    advance: Callable[[int], None] | None = None,
) -> ChunkStats:
    """Two streaming passes over ``tokens [n_rows, s]`` for the features ``ids``."""
    st = settings
    dev = torch.device(device)
    fid = torch.tensor(list(ids), dtype=torch.long, device=dev)
    n_feat, (n_rows, s) = len(ids), tokens.shape
    left, right = st.window, st.window
    w = left + 1 + right
    k, n_q, m = st.top_k, st.n_quantiles, st.quantile_examples

    def batches():
        for start in range(0, n_rows, st.batch_size):
            rows = tokens[start : start + st.batch_size]
            acts = encoder(rows, fid).to(dev)  # [b, s, F]
            yield start, acts, acts.reshape(-1, n_feat).T  # flat [F, N]
            if advance is not None:
                advance(rows.numel())

    # pass 1: density, range, running top-k with windows
    count = torch.zeros(n_feat, dtype=torch.long, device=dev)
    min_nz = torch.full((n_feat,), float("inf"), device=dev)
    max_nz = torch.full((n_feat,), float("-inf"), device=dev)
    top = [
        torch.empty(n_feat, 0, device=dev),
        torch.empty(n_feat, 0, dtype=torch.long, device=dev),
        torch.empty(n_feat, 0, w, device=dev),
    ]
    for start, acts, flat in batches():
        nz = flat != 0
        count += nz.sum(1)
        inf = torch.full_like(flat, float("inf"))
        min_nz = torch.minimum(min_nz, torch.where(nz, flat, inf).amin(1))
        max_nz = torch.maximum(max_nz, torch.where(nz, flat, -inf).amax(1))
        bt = flat.topk(min(k, flat.shape[1]), dim=1)
        new = [bt.values, bt.indices + start * s, _windows(acts, bt.indices, left, right)]
        top = _merge_top(top, new, k, largest=True, dim=1)

    fired = count > 0
    zero = torch.zeros_like(min_nz)
    lo = torch.where(fired, torch.minimum(min_nz, zero), zero)
    hi = torch.where(fired, torch.maximum(max_nz, zero), zero)

    # pass 2: histogram, quantile samples (bottom-m random keys per interval)
    hist = torch.zeros(n_feat, st.hist_bins + 1, dtype=torch.long, device=dev)
    q_count = torch.zeros(n_feat, n_q, dtype=torch.long, device=dev)
    q_state = [
        torch.empty(n_feat, n_q, 0, device=dev),
        torch.empty(n_feat, n_q, 0, device=dev),
        torch.empty(n_feat, n_q, 0, dtype=torch.long, device=dev),
        torch.empty(n_feat, n_q, 0, w, device=dev),
    ]
    gen = torch.Generator(device=dev).manual_seed(st.seed)
    for start, acts, flat in batches():
        nz = flat != 0
        h_idx = torch.where(nz, _bin_index(flat, lo, hi, st.hist_bins), st.hist_bins)
        hist.scatter_add_(1, h_idx, torch.ones_like(h_idx))
        q_idx = torch.where(nz, _bin_index(flat, lo, hi, n_q), n_q)  # n_q: not sampled
        keys = torch.rand(flat.shape, generator=gen, device=dev)
        per_q_keys, per_q_vals, per_q_loc, per_q_win = [], [], [], []
        for q in range(n_q):
            in_q = q_idx == q
            q_count[:, q] += in_q.sum(1)
            kq = torch.where(in_q, keys, torch.full_like(keys, float("inf")))
            bt = kq.topk(min(m, kq.shape[1]), dim=1, largest=False)
            per_q_keys.append(bt.values)
            per_q_vals.append(flat.gather(1, bt.indices))
            per_q_loc.append(bt.indices + start * s)
            per_q_win.append(_windows(acts, bt.indices, left, right))
        new = [torch.stack(x, 1) for x in (per_q_keys, per_q_vals, per_q_loc, per_q_win)]
        q_state = _merge_top(q_state, new, m, largest=False, dim=2)

    cpu = lambda t: t.cpu()  # noqa: E731
    return ChunkStats(
        n_tokens=n_rows * s,
        count=cpu(count),
        lo=cpu(lo),
        hi=cpu(hi),
        max_nz=cpu(max_nz),
        top_vals=cpu(top[0]),
        top_loc=cpu(top[1]),
        top_win=cpu(top[2]),
        hist=cpu(hist[:, : st.hist_bins]),
        q_keys=cpu(q_state[0]),
        q_vals=cpu(q_state[1]),
        q_loc=cpu(q_state[2]),
        q_win=cpu(q_state[3]),
        q_count=cpu(q_count),
    )


# --------------------------------------------------------------------------- records


class TokenDecoder:
    """Token id -> its string (``tokenizer.decode([id])``, cached); the id as text
    without a tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: Sequence[int]) -> list[str]:
        out = []
        for t in ids:
            t = int(t)
            if t not in self.cache:
                self.cache[t] = str(t) if self.tokenizer is None else self.tokenizer.decode([t])
            out.append(self.cache[t])
        return out


def _midpoints(edges: Tensor) -> list[float]:
    return ((edges[:-1] + edges[1:]) / 2).tolist()


def _context(
    tokens: Tensor, loc: int, win: Tensor, window: int, decode: TokenDecoder
) -> dict[str, Any]:
    s = tokens.shape[1]
    row, pos = divmod(int(loc), s)
    lo, hi = max(pos - window, 0), min(pos + window + 1, s)
    token_ids = tokens[row, lo:hi].tolist()
    values = win[lo - pos + window : hi - pos + window].tolist()
    return {
        "tokens": decode(token_ids),
        "token_ids": token_ids,
        "values": values,
        "max_value": values[pos - lo],
        "max_value_token_index": pos - lo,
        "row": row,
        "position": pos,
    }


def feature_records(
    ids: Sequence[int],
    stats: ChunkStats,
    tokens: Tensor,
    settings: DashboardSettings,
    *,
    logit_lens: dict[str, list[Any]],
    decode: TokenDecoder,
    labels: FeatureLabels | None = None,
    neuronpedia_id: str | None = None,
) -> list[dict[str, Any]]:
    """The JSON records of a chunk's features (see the module docstring)."""
    st = settings
    records = []
    for i, f in enumerate(ids):
        count = int(stats.count[i])
        lo, hi = float(stats.lo[i]), float(stats.hi[i])
        edges = torch.linspace(lo, hi, st.hist_bins + 1, dtype=torch.float64)
        q_edges = torch.linspace(lo, hi, st.n_quantiles + 1, dtype=torch.float64).tolist()
        activations = []
        for j in range(stats.top_vals.shape[1]):
            if not stats.top_vals[i, j] > 0:
                continue  # positive activations only; never fired: no contexts
            ctx = _context(tokens, stats.top_loc[i, j], stats.top_win[i, j], st.window, decode)
            activations.append(
                {**ctx, "bin_min": TOP_BIN, "bin_max": TOP_BIN, "bin_contains": None,
                 "kind": "top"}
            )  # fmt: skip
        for q in reversed(range(st.n_quantiles)):
            keep = torch.isfinite(stats.q_keys[i, q])
            order = stats.q_vals[i, q][keep].argsort(descending=True)
            locs, wins = stats.q_loc[i, q][keep][order], stats.q_win[i, q][keep][order]
            for loc, win in zip(locs, wins, strict=True):
                ctx = _context(tokens, loc, win, st.window, decode)
                activations.append(
                    {**ctx, "bin_min": q_edges[q], "bin_max": q_edges[q + 1],
                     "bin_contains": int(stats.q_count[i, q]) / count, "kind": "quantile"}
                )  # fmt: skip
        label = None
        if labels is not None and f in labels:
            label = labels[f].description
        records.append(
            {
                "feature_index": int(f),
                "neuronpedia_url": neuronpedia_url(neuronpedia_id, f) if neuronpedia_id else None,
                "label": label,
                "n_tokens": stats.n_tokens,
                "n_nonzero": count,
                "frac_nonzero": count / stats.n_tokens,
                "max_activation": float(stats.max_nz[i]) if count else 0.0,
                "freq_hist_data_bar_heights": stats.hist[i].tolist(),
                "freq_hist_data_bar_values": _midpoints(edges),
                "freq_hist_bin_edges": edges.tolist(),
                **{key: values[i] for key, values in logit_lens.items()},
                "activations": activations,
            }
        )
    return records


@torch.no_grad()
def logit_lens_fields(
    sae: Any,
    model: DashboardModel,
    ids: Sequence[int],
    settings: DashboardSettings,
    *,
    sub_chunk: int = 256,
) -> dict[str, list[Any]]:
    """``pos_*``/``neg_*`` (via :func:`fastsae.analysis.feature_logit_lens`) and
    ``logits_hist_*`` of ``W_dec[f] @ W_U`` over the vocabulary, per feature (``W_U``:
    the model's unembedding, see :class:`~fastsae.dashboard.model.DashboardModel`)."""
    d_vocab = model.W_U.shape[-1]
    k = min(settings.logit_k, d_vocab)
    out: dict[str, list[Any]] = {
        key: []
        for key in (
            "pos_str", "pos_values", "pos_token_ids", "neg_str", "neg_values",
            "neg_token_ids", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
        )
    }  # fmt: skip
    ids = list(ids)
    for start in range(0, len(ids), sub_chunk):
        part = ids[start : start + sub_chunk]
        for lens in feature_logit_lens(sae, model, part, k=k):
            out["pos_token_ids"].append(lens.top_tokens)
            out["pos_values"].append(lens.top_logits)
            out["pos_str"].append(lens.top_strings or [str(t) for t in lens.top_tokens])
            out["neg_token_ids"].append(lens.bottom_tokens)
            out["neg_values"].append(lens.bottom_logits)
            out["neg_str"].append(lens.bottom_strings or [str(t) for t in lens.bottom_tokens])
        W_U = model.W_U
        logits = (sae.W_dec[part].to(W_U.device, W_U.dtype) @ W_U).double().cpu()
        for row in logits:
            lo, hi = float(row.min()), float(row.max())
            edges = torch.linspace(lo, hi, settings.logit_hist_bins + 1, dtype=torch.float64)
            idx = _bin_index(row.unsqueeze(0), row.new_tensor([lo]), row.new_tensor([hi]),
                             settings.logit_hist_bins)[0]  # fmt: skip
            out["logits_hist_data_bar_heights"].append(
                torch.bincount(idx, minlength=settings.logit_hist_bins).tolist()
            )
            out["logits_hist_data_bar_values"].append(_midpoints(edges))
    return out


# --------------------------------------------------------------------------- writing


@dataclass
class DashboardResult:
    folder: Path  # OUT/data
    meta_path: Path
    features: list[int]
    computed_chunks: list[int] = field(default_factory=list)
    reused_chunks: list[int] = field(default_factory=list)


def _hook_name(sae: Any, hook_name: str | None) -> str:
    name = hook_name or getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if not name:
        raise ValueError("the SAE has no cfg.metadata.hook_name: give the hook name")
    return name


def _fingerprint(tokens: Tensor, sae: Any, hook: str, settings: DashboardSettings) -> str:
    h = hashlib.sha256()
    h.update(tokens.numpy().tobytes())
    h.update(str(list(tokens.shape)).encode())
    cfg = json.dumps(sae.cfg.to_dict(), sort_keys=True, default=str)
    h.update(json.dumps([cfg, hook, asdict(settings)], sort_keys=True).encode())
    return h.hexdigest()


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "feature_index": record["feature_index"],
        "frac_nonzero": record["frac_nonzero"],
        "max_activation": record["max_activation"],
        "label": record["label"],
    }


def _chunk_done(path: Path, fingerprint: str, chunk: list[int], features_dir: Path) -> dict | None:
    """The marker of a finished chunk when it matches this run, else None."""
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("fingerprint") != fingerprint:
        return None
    if marker.get("features") != chunk:
        return None
    if not all((features_dir / f"{f}.json").is_file() for f in chunk):
        return None
    return marker


class _Progress:
    """A tqdm bar over tokens read (two passes per chunk), with its time estimate."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="tok", unit_scale=True, desc="dashboard data")

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_dashboard_data(
    out: str | Path,
    sae: Any,
    model: Any,
    tokens: Tensor,
    features: Sequence[int] | None = None,
    *,
    settings: DashboardSettings | None = None,
    hook_name: str | None = None,
    tokenizer: Any = None,
    labels: FeatureLabels | None = None,
    neuronpedia_id: str | None = None,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    info: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> DashboardResult:
    """Compute every feature's dashboard data over ``tokens [n_rows, context_size]``
    and write ``OUT/data/features/<index>.json`` and ``OUT/data/meta.json``
    (resumable by chunks of ``chunk_size`` features; see the module docstring).

    ``model``: a :class:`~fastsae.dashboard.model.DashboardModel`, or a TransformerLens
    or Hugging Face model (with ``tokenizer`` when it carries none).

    ``neuronpedia_id`` defaults to the SAE's ``cfg.metadata.neuronpedia_id``, else the
    labels'; ``info`` is stored in ``meta.json`` (e.g. where the SAE and text came from).
    """
    st = settings or DashboardSettings()
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    tokens = check_tokens(tokens)
    ids = check_features(features, sae.cfg.d_sae)
    if not isinstance(model, DashboardModel):
        model = DashboardModel(model, tokenizer, _hook_name(sae, hook_name))
    encoder = _Encoder(sae, model)
    encoder.hook_input(tokens[:1, :1])  # d_in vs hook checked before any long pass
    if neuronpedia_id is None:
        neuronpedia_id = getattr(sae.cfg.metadata, "neuronpedia_id", None)
        if neuronpedia_id is None and labels is not None:
            neuronpedia_id = labels.neuronpedia_id
    dev = torch.device(device) if device is not None else sae.W_dec.device
    folder = Path(out) / DATA_DIR
    features_dir, chunks_dir = folder / FEATURES_DIR, folder / CHUNKS_DIR
    features_dir.mkdir(parents=True, exist_ok=True)
    chunks_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(tokens, sae, model.hook_name, st)
    chunks = [ids[i : i + chunk_size] for i in range(0, len(ids), chunk_size)]
    result = DashboardResult(folder, folder / META_FILENAME, ids)
    summaries: dict[int, list[dict[str, Any]]] = {}
    todo = []
    for c, chunk in enumerate(chunks):
        marker = _chunk_done(chunks_dir / f"chunk_{c:05d}.json", fingerprint, chunk, features_dir)
        if marker is None:
            todo.append(c)
        else:
            summaries[c] = marker["summary"]
            result.reused_chunks.append(c)
    if todo:  # a meta.json of an earlier run no longer describes the feature files
        result.meta_path.unlink(missing_ok=True)
    decode = TokenDecoder(model.tokenizer)
    progress = _Progress(2 * tokens.numel() * len(todo), show_progress)
    started = time.time()
    try:
        for c in todo:
            chunk = chunks[c]
            stats = compute_chunk_stats(encoder, tokens, chunk, st, device=dev, advance=progress)
            lens = logit_lens_fields(sae, model, chunk, st)
            records = feature_records(
                chunk, stats, tokens, st, logit_lens=lens, decode=decode, labels=labels,
                neuronpedia_id=neuronpedia_id,
            )  # fmt: skip
            for record in records:
                atomic_write_json(features_dir / f"{record['feature_index']}.json", record)
            summaries[c] = [_summary(r) for r in records]
            atomic_write_json(
                chunks_dir / f"chunk_{c:05d}.json",
                {"fingerprint": fingerprint, "features": chunk, "summary": summaries[c]},
            )
            result.computed_chunks.append(c)
    finally:
        progress.close()
    cfg = sae.cfg
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "sae": {
            "architecture": cfg.architecture(),
            "d_in": cfg.d_in,
            "d_sae": cfg.d_sae,
            "hook_name": model.hook_name,
            "neuronpedia_id": neuronpedia_id,
        },
        "model": model.describe(),
        "n_tokens": int(tokens.numel()),
        "n_rows": int(tokens.shape[0]),
        "context_size": int(tokens.shape[1]),
        "settings": asdict(st),
        "chunk_size": chunk_size,
        "fingerprint": fingerprint,
        "labels": None if labels is None else str(labels.path),
        "feature_file": f"{FEATURES_DIR}/{{feature_index}}.json",
        "features": [s for c in range(len(chunks)) for s in summaries[c]],
        "info": info or {},
        "seconds_this_run": round(time.time() - started, 3),
    }
    atomic_write_json(result.meta_path, meta)
    return result


# --------------------------------------------------------------------------- tokens


def load_token_rows(
    tokenizer: Any,
    *,
    text_file: str | Path | None = None,
    dataset: str | None = None,
    column: str = "text",
    split: str = "train",
    context_size: int = 128,
    max_tokens: int = 1_000_000,
) -> Tensor:
    """``[n_rows, context_size]`` token rows, at most ``max_tokens`` tokens in all.

    ``text_file``: a plain text file, **one document per line** (blank lines skipped);
    ``dataset``: anything :func:`fastsae.training.data.text_loading.load_text_dataset`
    reads (a Hugging Face id, streamed; a local file or folder), its ``column`` holding
    text or token ids, or ``"local-docstrings"``: the demo's offline text
    (:func:`fastsae.training.data.docstring_corpus.local_text_dataset`), as much as
    ``max_tokens`` needs. Documents are tokenized without special tokens and packed into
    rows by :class:`~fastsae.training.data.token_rows.TokenRowSource`, each row starting
    with the tokenizer's BOS token when it has one (CLS for an encoder's).
    """
    import datasets  # import cost: only for reading text

    from fastsae.training.data import docstring_corpus
    from fastsae.training.data.text_loading import load_text_dataset
    from fastsae.training.data.token_rows import TokenRowSource

    if (text_file is None) == (dataset is None):
        raise ValueError("give exactly one of a text file and a dataset")
    if context_size <= 0:
        raise ValueError(f"context_size must be > 0, got {context_size}")
    if max_tokens < context_size:
        raise ValueError(
            f"max_tokens={max_tokens} is less than one row of context_size={context_size} tokens"
        )
    if text_file is not None:
        lines = read_text_lines(text_file, "text file")
        ds: Any = datasets.Dataset.from_dict({column: lines})
    elif dataset == docstring_corpus.DOCSTRINGS_DATASET:
        # generous characters per token (docstrings average ~4): read enough at once
        if column != "text":
            raise ValueError(
                f"dataset {dataset!r} has only the column 'text'; got column={column!r}"
            )
        ds = docstring_corpus.local_text_dataset(max_chars=16 * max_tokens)
    else:
        ds = load_text_dataset(dataset, streaming=True, split=split)
    first = next(iter(ds), None)
    if first is None:
        raise ValueError(f"dataset {dataset!r} is empty")
    if column not in first:
        raise ValueError(f"dataset {dataset!r} has no column {column!r}; columns: {sorted(first)}")
    is_tokenized = not isinstance(first[column], str)
    if not is_tokenized and tokenizer is None:
        raise ValueError("the model has no tokenizer to tokenize the text with")
    bos = special_token_id("bos", tokenizer)
    source = TokenRowSource(
        ds, column, mode="pack", context_size=context_size, is_tokenized=is_tokenized,
        tokenizer=tokenizer, bos_token_id=bos,
    )  # fmt: skip
    rows = []
    for _ in range(max_tokens // context_size):
        try:
            row = source.next_row()
        except ValueError as e:
            where = f"text file {str(text_file)!r}" if text_file is not None else repr(dataset)
            raise ValueError(f"{where}: {e}") from e
        if row is None:
            break
        rows.append(row)
    return torch.stack(rows)


def read_text_lines(path: str | Path, what: str) -> list[str]:
    """The non-blank lines of a text file (one document or prompt each); a missing or
    blank file is an error naming ``what`` and the path."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist")
    lines = [line for line in p.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what} {str(p)!r} is empty (no non-blank line)")
    return lines


def load_sae(sae_dir_or_release: str, sae_id: str | None, device: str) -> Any:
    """An SAE from a folder (any format ``SAE.load_from_disk`` reads) or a registry
    release with ``sae_id``."""
    from fastsae import SAE

    path = Path(sae_dir_or_release).expanduser()
    if path.exists():
        return SAE.load_from_disk(path, device=device)
    if sae_id is None:
        raise ValueError(
            f"{sae_dir_or_release!r} is not a folder; to load a registry release give --sae-id"
        )
    return SAE.from_pretrained(sae_dir_or_release, sae_id, device=device)


def describe(result: DashboardResult) -> str:
    n = len(result.computed_chunks) + len(result.reused_chunks)
    return (
        f"{len(result.features)} features in {n} chunks ({len(result.computed_chunks)} "
        f"computed, {len(result.reused_chunks)} already done) written to {result.folder}"
    )


__all__ = [
    "ChunkStats",
    "DashboardResult",
    "TokenDecoder",
    "DashboardSettings",
    "check_features",
    "compute_chunk_stats",
    "feature_records",
    "load_sae",
    "load_token_rows",
    "read_text_lines",
    "logit_lens_fields",
    "write_dashboard_data",
]
