"""Feature labels from Neuronpedia: download every feature's label of an SAE once, read
them offline.

Download (``fastsae labels download`` is the same call)::

    from fastsae.labels import download_feature_labels, load_feature_labels, neuronpedia_url

    download_feature_labels("gemma-scope-2b-pt-res-canonical", "layer_16/width_16k/canonical")
    labels = load_feature_labels("gemma-scope-2b-pt-res-canonical", "layer_16/width_16k/canonical")
    labels[1234].description, labels[1234].top_positive_tokens
    neuronpedia_url("gemma-2-2b/16-gemmascope-res-16k", 1234)

Source: Neuronpedia's public API, ``GET {api_url}/api/feature/{modelId}/{sourceId}/{index}``
(the registry's ``neuronpedia_id`` is ``modelId/sourceId``), one request per feature,
at most ``requests_per_second`` (shared by ``workers`` threads), each with a timeout.
HTTP 429 and 5xx and connection errors are retried (``max_retries`` times) with
exponential backoff (``backoff_base`` doubling, capped at ``max_backoff``) or, when the
response has a ``Retry-After``, after the time it names (up to ``max_retry_after``; no
worker starts a request before then); any other HTTP error, a body that
is not JSON, or a JSON object without ``explanations``, ``pos_str``, ``neg_str`` or
``maxActApprox`` makes the feature *failed* (after the retries, for the retried kinds).
HTTP 401/403 stops the run (a bad API key fails every feature). ``max_consecutive_failures``
features in a row failing on the connection stop it too (the network is gone; rerun).

Bulk mode (``bulk=True``, ``fastsae labels download --bulk``): first Neuronpedia's
per-SAE exports, the gzipped JSON-lines files
``{exports_url}/{modelId}/{sourceId}/explanations/batch-N.jsonl.gz`` (``exports_url``
defaults to ``$NEURONPEDIA_EXPORTS_URL``, else :data:`DEFAULT_EXPORTS_URL`, the public
``neuronpedia-datasets`` bucket's ``v1``), one explanation per line (``index``, an int or
a decimal string, and ``description``; ``modelId``, ``layer`` and more are there too).
Batches 0, 1, 2, ... are fetched one after the other, at the same rate limit and with
the same retries as the API, until a 404 (none at batch 0 is an error: that SAE has no
export). The exports hold only descriptions: such a feature's label has its
``description`` (the first explanation in batch order when there are several),
``has_explanations`` true, no tokens and ``max_activation`` null. A feature that
already has a label (from the API or an earlier batch) keeps it. Garbage is not counted
per feature as in the API path (a batch holds thousands): a batch that is not gzip, a
line that is not a JSON object with a feature index in range and a string description,
or a ``modelId``/``layer`` of another SAE stops the run with a
:class:`NeuronpediaExportError` naming the batch URL and line; a batch still failing
after the retries stops it with a ``ConnectionError``; the finished batches stay
recorded. The requested features that no batch holds (dead features, mostly) are then
fetched through the API as above, so each ends successful or failed.

Files, in ``<out>/<release>/<sae_id>/`` (``out`` defaults to :func:`default_root`,
``$FASTSAE_CACHE_DIR/labels``, else ``~/.cache/fastsae/labels``):

- ``progress.jsonl``: the partial progress. A header line (release, sae_id,
  neuronpedia_id, num_features), then one line per fetched feature, appended and
  fsynced as each arrives: ``{"index": 3, "ok": true, "label": {...}}`` or
  ``{"index": 3, "ok": false, "error": "HTTP 500 after 5 retries"}``; the last line for
  an index wins. A run (after Ctrl-C, a kill, a network loss, or a finished run) reads
  it and fetches only the requested features that have no successful line: never a
  feature it already has, and again every failed one. A line cut short by a kill is
  ignored. It stays after the run, so later runs (another ``--features``, a retry of
  the failed) add to it. In bulk mode each finished export batch adds its new labels
  and then ``{"batch": N, "url": ..., "indices": [...]}`` (every index the batch holds),
  fsynced together, and the 404 that ends them adds ``{"bulk_end": N}``: a rerun skips
  a finished batch unless it holds a requested feature still missing, and a batch a
  kill cut short is fetched again.
- ``feature_labels.json``: the whole result, the one file users' tools read::

      {"sae_info": {"release", "sae_id", "neuronpedia_id", "num_features", "downloaded_at"},
       "features": {"<index>": {"description", "top_positive_tokens",
                                "top_negative_tokens", "max_activation",
                                "has_explanations"}},
       "stats": {"total_features", "with_descriptions", "successful", "failed"}}

  ``features`` holds the successful features (keys are decimal strings, ascending).
  ``description`` is the first explanation's text, ``null`` (and ``has_explanations``
  false) for a feature Neuronpedia has no explanation for; ``max_activation`` is
  ``maxActApprox``. ``num_features`` is the SAE's width; ``total_features`` the number
  of features in the file's scope (every feature any run requested: all of them unless
  ``features=`` picked a subset), ``successful + failed == total_features``,
  ``with_descriptions`` counts the successful ones with a non-empty description.
- ``metadata.json``: ``sae_info`` and ``stats`` as above, plus ``failed_features`` (the
  failed indices, ascending) and ``errors`` (index -> why it failed).

Both final files are written at the end of a run that was not interrupted, each to a
temporary file then ``os.replace``: a reader sees the old file or the new one, never a
half-written one.

Reading: :func:`load_feature_labels` returns a :class:`FeatureLabels`, a read-only
mapping of feature index (``int``) to :class:`FeatureLabel`, a frozen dataclass read by
attribute (``label.description``); ``.sae_info``, ``.stats``, ``.failed`` and ``.url(i)``
come with it. :func:`find_feature_labels` finds an SAE's labels by its neuronpedia id
(``SAE.from_pretrained`` puts it in ``sae.cfg.metadata``); :func:`neuronpedia_url` gives a
feature's page.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import email.utils
import gzip
import json
import os
import re
import threading
import time
import urllib.parse
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from fastsae.atomic_files import atomic_write_json

DEFAULT_API_URL = "https://www.neuronpedia.org"
API_URL_ENV = "NEURONPEDIA_API_URL"
API_KEY_ENV = "NEURONPEDIA_API_KEY"
API_KEY_HEADER = "x-api-key"
NEURONPEDIA_SITE = "https://www.neuronpedia.org"
# Neuronpedia's public exports bucket: {base}/{modelId}/{sourceId}/explanations/batch-N.jsonl.gz
DEFAULT_EXPORTS_URL = "https://neuronpedia-datasets.s3.us-east-1.amazonaws.com/v1"
EXPORTS_URL_ENV = "NEURONPEDIA_EXPORTS_URL"

LABELS_FILENAME = "feature_labels.json"
METADATA_FILENAME = "metadata.json"
PROGRESS_FILENAME = "progress.jsonl"

LABEL_FIELDS = (
    "description",
    "top_positive_tokens",
    "top_negative_tokens",
    "max_activation",
    "has_explanations",
)
STATS_FIELDS = ("total_features", "with_descriptions", "successful", "failed")
SAE_INFO_FIELDS = ("release", "sae_id", "neuronpedia_id", "num_features", "downloaded_at")


class NeuronpediaAuthError(PermissionError):
    """Neuronpedia refused the requests (HTTP 401/403): every feature would fail."""


class NeuronpediaExportError(ValueError):
    """A bulk export batch that is not what Neuronpedia publishes (not gzip, a line that
    is not a JSON object with ``index`` and ``description``, another SAE's, an HTTP
    status other than 200 or the 404 that ends the batches)."""


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class FeatureLabel:
    """One feature's label, as stored in ``feature_labels.json``."""

    description: str | None
    top_positive_tokens: list[str]
    top_negative_tokens: list[str]
    max_activation: float | None
    has_explanations: bool


class FeatureLabels(Mapping[int, FeatureLabel]):
    """Feature index (``int``) -> :class:`FeatureLabel`, read from ``feature_labels.json``.

    Holds the successful features; a failed or never-downloaded index is a ``KeyError``
    (``.failed`` lists the failed ones when ``metadata.json`` is next to the file).
    """

    def __init__(
        self,
        labels: dict[int, FeatureLabel],
        sae_info: dict[str, Any],
        stats: dict[str, Any],
        failed: list[int],
        path: Path,
    ):
        self._labels = labels
        self.sae_info = sae_info
        self.stats = stats
        self.failed = failed
        self.path = path

    def __getitem__(self, index: int) -> FeatureLabel:
        try:
            return self._labels[index]
        except KeyError:
            why = "it failed to download" if index in self.failed else "it was not downloaded"
            raise KeyError(f"feature {index} has no label in {self.path} ({why})") from None

    def __iter__(self) -> Iterator[int]:
        return iter(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def neuronpedia_id(self) -> str:
        return self.sae_info["neuronpedia_id"]

    def url(self, feature: int) -> str:
        """The feature's Neuronpedia page."""
        return neuronpedia_url(self.neuronpedia_id, feature)

    def __repr__(self) -> str:
        info = self.sae_info
        return (
            f"FeatureLabels({info['release']!r}, {info['sae_id']!r}: {len(self)} of "
            f"{info['num_features']} features, {self.stats['with_descriptions']} described)"
        )


def default_root() -> Path:
    """Where labels go by default: ``labels/`` in fastsae's cache folder
    (``$FASTSAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastsae``, else ``~/.cache/fastsae``)."""
    from fastsae.tuning import cache_dir  # import cost: torch, only for the default

    return cache_dir() / "labels"


def labels_dir(release: str, sae_id: str, root: str | Path | None = None) -> Path:
    """``<root>/<release>/<sae_id>``: the folder of one SAE's label files."""
    for what, name in (("release", release), ("sae_id", sae_id)):
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts:
            raise ValueError(f"{what} {name!r} cannot name a folder under the labels root")
    return Path(root if root is not None else default_root()).expanduser() / release / sae_id


def _check_keys(obj: Any, keys: Sequence[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    return obj


def load_feature_labels(
    path_or_release: str | Path,
    sae_id: str | None = None,
    *,
    root: str | Path | None = None,
) -> FeatureLabels:
    """Read the labels :func:`download_feature_labels` wrote.

    ``load_feature_labels(release, sae_id)`` reads ``<root>/<release>/<sae_id>/``
    (``root`` defaults to :func:`default_root`); ``load_feature_labels(path)`` reads a
    ``feature_labels.json`` or the folder holding one.
    """
    if sae_id is None:
        path = Path(path_or_release).expanduser()
        if path.is_dir():
            path = path / LABELS_FILENAME
    else:
        path = labels_dir(str(path_or_release), sae_id, root) / LABELS_FILENAME
    if not path.is_file():
        hint = "" if sae_id is None else " (run `fastsae labels download` for it first)"
        raise FileNotFoundError(f"no feature labels at {path}{hint}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    _check_keys(data, ("sae_info", "features", "stats"), str(path))
    sae_info = _check_keys(data["sae_info"], SAE_INFO_FIELDS, f"{path}: sae_info")
    stats = _check_keys(data["stats"], STATS_FIELDS, f"{path}: stats")
    features = _check_keys(data["features"], (), f"{path}: features")
    labels = {}
    for key, record in features.items():
        if not key.isdigit():
            raise ValueError(f"{path}: features: key {key!r} is not a feature index")
        _check_keys(record, LABEL_FIELDS, f"{path}: feature {key}")
        labels[int(key)] = FeatureLabel(**{k: record[k] for k in LABEL_FIELDS})
    failed: list[int] = []
    metadata_path = path.with_name(METADATA_FILENAME)
    if metadata_path.is_file():
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            failed = [int(i) for i in json.loads(metadata_path.read_text())["failed_features"]]
    return FeatureLabels(labels, sae_info, stats, failed, path)


def find_feature_labels(
    sae_or_neuronpedia_id: Any, *, root: str | Path | None = None
) -> FeatureLabels | None:
    """The downloaded labels of an SAE (by its ``cfg.metadata.neuronpedia_id``) or of a
    neuronpedia id, found under ``root`` (default :func:`default_root`) by the
    ``metadata.json`` files there; None when none was downloaded. With several (the
    same id under two releases), the latest download."""
    neuronpedia_id = _neuronpedia_id_of(sae_or_neuronpedia_id)
    base = Path(root if root is not None else default_root()).expanduser()
    found: list[tuple[str, Path]] = []
    for metadata_path in base.rglob(METADATA_FILENAME) if base.is_dir() else ():
        try:
            info = json.loads(metadata_path.read_text())["sae_info"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a labels folder, or unreadable: not this SAE's
        labels_path = metadata_path.with_name(LABELS_FILENAME)
        if info.get("neuronpedia_id") == neuronpedia_id and labels_path.is_file():
            found.append((str(info.get("downloaded_at", "")), labels_path))
    return load_feature_labels(max(found)[1]) if found else None


def pretrained_feature_labels(
    release: str, sae_id: str, *, root: str | Path | None = None
) -> FeatureLabels | None:
    """The labels downloaded for ``release`` / ``sae_id`` under ``root`` (default
    :func:`default_root`), what ``SAE.from_pretrained`` puts in ``sae.feature_labels``;
    None when there are none (or the release, a local path, cannot name a labels
    folder). Never raises: a file that cannot be read warns, naming it, and gives None."""
    try:
        path = labels_dir(release, sae_id, root) / LABELS_FILENAME
    except ValueError:
        return None
    if not path.is_file():
        return None
    try:
        return load_feature_labels(path)
    except Exception as e:  # a corrupt labels file must not fail the SAE's load
        warnings.warn(
            f"feature labels at {path} could not be read ({type(e).__name__}: {e}); "
            "sae.feature_labels is None (download them again: `fastsae labels download`)",
            UserWarning,
            stacklevel=3,
        )
        return None


def _neuronpedia_id_of(sae_or_neuronpedia_id: Any) -> str:
    if isinstance(sae_or_neuronpedia_id, str):
        return sae_or_neuronpedia_id
    metadata = getattr(getattr(sae_or_neuronpedia_id, "cfg", None), "metadata", None)
    neuronpedia_id = getattr(metadata, "neuronpedia_id", None)
    if not neuronpedia_id:
        raise ValueError(
            f"{type(sae_or_neuronpedia_id).__name__} has no cfg.metadata.neuronpedia_id; "
            "pass the neuronpedia id ('model/source') instead"
        )
    return neuronpedia_id


def neuronpedia_url(sae_or_neuronpedia_id: Any, feature: int) -> str:
    """``https://www.neuronpedia.org/{model}/{source}/{feature}``, from a neuronpedia id
    (``"gemma-2-2b/16-gemmascope-res-16k"``) or an SAE whose ``cfg.metadata`` has one
    (``SAE.from_pretrained`` sets it from the registry)."""
    model, source = split_neuronpedia_id(_neuronpedia_id_of(sae_or_neuronpedia_id))
    feature = int(feature)
    if feature < 0:
        raise ValueError(f"feature index must be >= 0, got {feature}")
    return f"{NEURONPEDIA_SITE}/{_quote(model)}/{_quote(source)}/{feature}"


# --------------------------------------------------------------------------- resolving


def split_neuronpedia_id(neuronpedia_id: str) -> tuple[str, str]:
    """``"model/source"`` -> ``("model", "source")``; anything else is an error."""
    parts = str(neuronpedia_id).split("/")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(
            f"neuronpedia id {neuronpedia_id!r} is not 'modelId/sourceId' "
            "(e.g. 'gemma-2-2b/16-gemmascope-res-16k')"
        )
    return parts[0], parts[1]


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def parse_feature_spec(spec: str, num_features: int) -> list[int]:
    """``"0-99,200"`` -> ``[0, ..., 99, 200]`` (sorted, no repeats), every index in
    ``[0, num_features)``."""
    indices: set[int] = set()
    for raw in spec.split(","):
        part = raw.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if match is None:
            raise ValueError(
                f"--features {spec!r}: {part!r} is not an index or a range 'A-B' (e.g. '0-99,200')"
            )
        start = int(match.group(1))
        stop = int(match.group(2)) if match.group(2) is not None else start
        if stop < start:
            raise ValueError(f"--features {spec!r}: range {part!r} ends before it starts")
        if stop >= num_features:
            raise ValueError(
                f"--features {spec!r}: {stop} is out of range; the SAE has {num_features} "
                f"features (0-{num_features - 1})"
            )
        indices.update(range(start, stop + 1))
    return sorted(indices)


def width_from_sae_id(sae_id: str) -> int | None:
    """The width an sae_id names (``width_16k`` -> 16384, ``width_1m`` -> 1048576: the
    power of two the publishers round that way), or None."""
    match = re.search(r"width_(\d+)([km])(?![a-z0-9])", sae_id, re.IGNORECASE)
    if match is None:
        return None
    count, unit = int(match.group(1)), 1000 if match.group(2).lower() == "k" else 1_000_000
    powers = [2**p for p in range(64) if 2**p // unit == count]
    return powers[0] if len(powers) == 1 else None


def _width_from_cached_cfg(repo_id: str, folder: str) -> int | None:
    """``d_sae`` from the SAE's ``cfg.json`` when it is on disk (a local repo folder or
    the Hugging Face cache; nothing is downloaded), else None."""
    filename = f"{folder.strip('/')}/cfg.json"
    local = Path(repo_id).expanduser()
    if local.is_dir():
        path: Path | None = local / filename
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, filename)
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    d_sae = cfg.get("d_sae") if isinstance(cfg, dict) else None
    return d_sae if isinstance(d_sae, int) and d_sae > 0 else None


@dataclass(frozen=True)
class ResolvedSAE:
    release: str
    sae_id: str
    neuronpedia_id: str
    num_features: int


def resolve_sae(
    release: str,
    sae_id: str,
    neuronpedia_id: str | None = None,
    num_features: int | None = None,
) -> ResolvedSAE:
    """The neuronpedia id and width of a registry SAE: ``neuronpedia_id`` or the
    registry's; ``num_features`` or the width the sae_id names or a cached ``cfg.json``'s
    ``d_sae``. Errors name what is unknown and the flag that supplies it."""
    from fastsae.loading.pretrained import get_pretrained_saes_directory  # import cost: torch

    directory = get_pretrained_saes_directory()
    info = directory.get(release)
    if info is None:
        close = difflib.get_close_matches(release, list(directory), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"release {release!r} is not in the pretrained SAE registry{hint}")
    if sae_id not in info.saes_map:
        close = difflib.get_close_matches(sae_id, list(info.saes_map), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"sae_id {sae_id!r} is not in release {release!r}{hint}")
    if neuronpedia_id is None:
        neuronpedia_id = info.neuronpedia_id.get(sae_id)
        if neuronpedia_id is None:
            raise ValueError(
                f"{release} / {sae_id} has no neuronpedia id in the registry; pass "
                "--neuronpedia-id MODEL/SOURCE (neuronpedia_id=) if Neuronpedia hosts it"
            )
    split_neuronpedia_id(neuronpedia_id)
    known = width_from_sae_id(sae_id) or _width_from_cached_cfg(info.repo_id, info.saes_map[sae_id])
    if num_features is not None:
        if num_features <= 0:
            raise ValueError(f"--num-features must be > 0, got {num_features}")
        if known is not None and known != num_features:
            raise ValueError(
                f"--num-features {num_features} contradicts the width of {release} / "
                f"{sae_id}, {known}"
            )
    elif known is None:
        raise ValueError(
            f"cannot know the number of features of {release} / {sae_id} offline (its "
            "sae_id names no width and no cfg.json of it is cached); pass --num-features N "
            "(num_features=)"
        )
    else:
        num_features = known
    return ResolvedSAE(release, sae_id, neuronpedia_id, num_features)


# --------------------------------------------------------------------------- fetching


class RateLimiter:
    """At most ``rate`` request starts per second across threads (evenly spaced)."""

    def __init__(self, rate: float):
        if rate <= 0:
            raise ValueError(f"requests_per_second must be > 0, got {rate}")
        self.interval = 1.0 / rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self, stop: threading.Event) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + self.interval
        if start > now:
            stop.wait(start - now)

    def defer(self, seconds: float) -> None:
        """No request starts in the next ``seconds`` (a server's ``Retry-After``)."""
        with self._lock:
            self._next = max(self._next, time.monotonic() + seconds)


def parse_label(data: Any) -> FeatureLabel:
    """A Neuronpedia feature response -> :class:`FeatureLabel`; ``ValueError`` naming
    what is missing or of the wrong type."""
    if not isinstance(data, dict):
        raise ValueError(f"response is not a JSON object but {type(data).__name__}")
    missing = [k for k in ("explanations", "pos_str", "neg_str", "maxActApprox") if k not in data]
    if missing:
        raise ValueError(f"response has no {', '.join(missing)}")
    explanations = data["explanations"]
    if explanations is None:
        explanations = []
    if not isinstance(explanations, list):
        raise ValueError("explanations is not a list")
    descriptions = [
        e["description"]
        for e in explanations
        if isinstance(e, dict) and isinstance(e.get("description"), str)
    ]
    tokens = {}
    for key in ("pos_str", "neg_str"):
        value = data[key] if data[key] is not None else []
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise ValueError(f"{key} is not a list of strings")
        tokens[key] = value
    max_act = data["maxActApprox"]
    if max_act is not None and (isinstance(max_act, bool) or not isinstance(max_act, int | float)):
        raise ValueError(f"maxActApprox is not a number: {max_act!r}")
    return FeatureLabel(
        description=descriptions[0] if descriptions else None,
        top_positive_tokens=tokens["pos_str"],
        top_negative_tokens=tokens["neg_str"],
        max_activation=float(max_act) if max_act is not None else None,
        has_explanations=bool(descriptions),
    )


@dataclass
class _Outcome:
    index: int
    label: FeatureLabel | None
    error: str | None
    connection_failure: bool = False


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())


@dataclass
class _Reply:
    """What :meth:`_Fetcher.get` ended with: a response it does not retry (any status but
    429/5xx), or ``error`` (the last retried failure, or a request error)."""

    response: httpx.Response | None
    error: str | None
    connection_failure: bool = False


@dataclass
class _Fetcher:
    client: httpx.Client
    base: str
    limiter: RateLimiter
    stop: threading.Event
    max_retries: int
    backoff_base: float
    max_backoff: float
    max_retry_after: float
    # what an HTTP 401/403 error adds (the API's: check the key)
    auth_hint: str = f"; check the API key (--api-key / ${API_KEY_ENV})"

    def get(self, url: str) -> _Reply:
        """GET ``url`` at the limiter's pace, retrying HTTP 429/5xx and connection errors
        with backoff (or after a ``Retry-After``); HTTP 401/403 raise
        :class:`NeuronpediaAuthError`."""
        error = "not tried"
        retry_after: float | None = None
        for attempt in range(self.max_retries + 1):
            if self.stop.is_set():
                return _Reply(None, "stopped")
            if attempt and retry_after is None:
                delay = min(self.max_backoff, self.backoff_base * 2 ** (attempt - 1))
                if delay > 0:
                    self.stop.wait(delay)
            self.limiter.wait(self.stop)  # after a Retry-After, at the time it named
            retry_after = None
            try:
                response = self.client.get(url)
            except httpx.TransportError as e:  # connection refused or dropped, timeout
                error = f"{type(e).__name__}: {e}".rstrip(": ")
                continue
            except httpx.RequestError as e:  # e.g. a body that does not decode
                return _Reply(None, f"{type(e).__name__}: {e}")
            status = response.status_code
            if status in (401, 403):
                raise NeuronpediaAuthError(
                    f"Neuronpedia refused {url} (HTTP {status}){self.auth_hint}"
                )
            if status == 429 or status >= 500:
                error = f"HTTP {status}"
                retry_after = _retry_after(response)
                if retry_after is not None:  # every worker waits: the server asked us all
                    self.limiter.defer(min(retry_after, self.max_retry_after))
                continue
            return _Reply(response, None)
        connection = not error.startswith("HTTP")
        retries = f" after {self.max_retries} retries" if self.max_retries else ""
        return _Reply(None, f"{error}{retries}", connection_failure=connection)

    def fetch(self, index: int) -> _Outcome:
        reply = self.get(f"{self.base}/{index}")
        if reply.response is None:
            return _Outcome(index, None, reply.error, reply.connection_failure)
        status = reply.response.status_code
        if status != 200:
            return _Outcome(index, None, f"HTTP {status}")
        try:
            return _Outcome(index, parse_label(reply.response.json()), None)
        except json.JSONDecodeError as e:
            return _Outcome(index, None, f"malformed JSON: {e}")
        except ValueError as e:
            return _Outcome(index, None, f"malformed response: {e}")


# --------------------------------------------------------------------------- progress


class _Progress:
    """``progress.jsonl``: the header, then one fsynced line per fetched feature."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.ok: dict[int, FeatureLabel] = {}
        self.failed: dict[int, str] = {}
        # bulk mode: export batch number -> the feature indices it holds (written once
        # its labels are), and the number of the first batch that does not exist
        self.batches: dict[int, set[int]] = {}
        self.bulk_end: int | None = None
        lines = path.read_text().splitlines() if path.is_file() else []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line a kill cut short
        if records and "header" in records[0]:
            old = records.pop(0)["header"]
            for key in ("neuronpedia_id", "num_features"):
                if old.get(key) != header[key]:
                    raise ValueError(
                        f"{path} was written for {key} {old.get(key)!r}, not {header[key]!r}; "
                        "remove that folder (or choose another --out) to start over"
                    )
        elif records:
            raise ValueError(f"{path}: no header line; remove it to start over")
        for rec in records:
            self._apply(rec)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")  # noqa: SIM115 (closed in close())
        if not lines:
            self._write({"header": header})
        elif not path.read_bytes().endswith(b"\n"):
            self._file.write("\n")  # end the cut-short line; it stays unparseable

    def _apply(self, rec: Any) -> None:
        if not isinstance(rec, dict):
            return
        if isinstance(rec.get("batch"), int) and isinstance(rec.get("indices"), list):
            self.batches[rec["batch"]] = {i for i in rec["indices"] if isinstance(i, int)}
            return
        if isinstance(rec.get("bulk_end"), int):
            self.bulk_end = rec["bulk_end"]
            return
        if not isinstance(rec.get("index"), int):
            return
        index = rec["index"]
        if rec.get("ok") and isinstance(rec.get("label"), dict):
            try:
                self.ok[index] = FeatureLabel(**{k: rec["label"][k] for k in LABEL_FIELDS})
            except KeyError:
                return
            self.failed.pop(index, None)
        elif not rec.get("ok"):
            self.failed[index] = str(rec.get("error"))
            self.ok.pop(index, None)

    def _write(self, rec: dict[str, Any]) -> None:
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def record(self, outcome: _Outcome) -> None:
        if outcome.label is not None:
            rec = {"index": outcome.index, "ok": True, "label": asdict(outcome.label)}
        else:
            rec = {"index": outcome.index, "ok": False, "error": outcome.error}
        self._write(rec)
        self._apply(rec)

    def record_batch(
        self, batch: int, url: str, labels: dict[int, FeatureLabel], indices: set[int]
    ) -> None:
        """An export batch's new labels, then the line saying the batch is done (it lists
        every index the batch holds), with one fsync: a kill before that line leaves the
        batch to be fetched again."""
        recs: list[dict[str, Any]] = [
            {"index": i, "ok": True, "label": asdict(label)} for i, label in labels.items()
        ]
        for rec in recs:
            self._file.write(json.dumps(rec) + "\n")
        done = {"batch": batch, "url": url, "indices": sorted(indices)}
        self._write(done)
        for rec in [*recs, done]:
            self._apply(rec)

    def record_bulk_end(self, batch: int) -> None:
        """``batch`` does not exist: the export's batches are ``0 .. batch - 1``."""
        rec = {"bulk_end": batch}
        self._write(rec)
        self._apply(rec)

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------- download


@dataclass
class DownloadResult:
    """What :func:`download_feature_labels` did."""

    folder: Path
    labels_path: Path
    metadata_path: Path
    stats: dict[str, int]
    failed: list[int]
    fetched: int  # features requested in this run (bulk: labelled from an export, or asked)
    already_had: int  # requested features that were downloaded before and not fetched again
    errors: dict[int, str] = field(default_factory=dict)
    batches: int = 0  # bulk export batches downloaded in this run


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def download_feature_labels(
    release: str,
    sae_id: str,
    *,
    neuronpedia_id: str | None = None,
    out: str | Path | None = None,
    features: str | Sequence[int] | None = None,
    num_features: int | None = None,
    api_url: str | None = None,
    api_key: str | None = None,
    requests_per_second: float = 5.0,
    workers: int = 4,
    timeout: float = 30.0,
    max_retries: int = 5,
    backoff_base: float = 1.0,
    max_backoff: float = 60.0,
    max_retry_after: float = 600.0,
    max_consecutive_failures: int = 25,
    show_progress: bool = True,
    bulk: bool = False,
    exports_url: str | None = None,
) -> DownloadResult:
    """Download the Neuronpedia labels of ``release`` / ``sae_id`` into
    ``<out>/<release>/<sae_id>/`` (``feature_labels.json``, ``metadata.json``; the
    module docstring gives their shape), resuming what an earlier run left.

    ``features``: a subset, ``"0-99,200"`` or a list of indices (default: all).
    ``num_features``: the SAE's width when neither the sae_id nor a cached cfg.json
    gives it. ``api_url`` / ``api_key`` default to ``$NEURONPEDIA_API_URL`` (else
    ``https://www.neuronpedia.org``) and ``$NEURONPEDIA_API_KEY`` (sent as ``x-api-key``).

    ``bulk=True`` reads the descriptions from Neuronpedia's bulk exports first
    (``exports_url``, default ``$NEURONPEDIA_EXPORTS_URL``, else
    :data:`DEFAULT_EXPORTS_URL`), then fetches through the API the requested features no
    export batch holds (the module docstring has the details).
    """
    sae = resolve_sae(release, sae_id, neuronpedia_id, num_features)
    if features is None:
        wanted = list(range(sae.num_features))
    elif isinstance(features, str):
        wanted = parse_feature_spec(features, sae.num_features)
    else:
        wanted = sorted({int(i) for i in features})
        bad = [i for i in wanted if not 0 <= i < sae.num_features]
        if bad:
            raise ValueError(
                f"features {bad[:5]} out of range; the SAE has {sae.num_features} features"
            )
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    limiter = RateLimiter(requests_per_second)
    api_url = (api_url or os.environ.get(API_URL_ENV) or DEFAULT_API_URL).rstrip("/")
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    model, source = split_neuronpedia_id(sae.neuronpedia_id)
    exports = (exports_url or os.environ.get(EXPORTS_URL_ENV) or DEFAULT_EXPORTS_URL).rstrip("/")
    retry = {
        "timeout": timeout,
        "max_retries": max_retries,
        "backoff_base": backoff_base,
        "max_backoff": max_backoff,
        "max_retry_after": max_retry_after,
    }

    folder = labels_dir(release, sae_id, out)
    header = asdict(sae)
    progress = _Progress(folder / PROGRESS_FILENAME, header)
    batches = from_exports = 0
    try:
        todo = [i for i in wanted if i not in progress.ok]
        if bulk:
            batches, from_exports = _fetch_bulk(
                todo,
                progress,
                base=f"{exports}/{_quote(model)}/{_quote(source)}/explanations",
                model=model,
                source=source,
                num_features=sae.num_features,
                limiter=limiter,
                show_progress=show_progress,
                desc=sae.neuronpedia_id,
                **retry,
            )
        api_todo = [i for i in todo if i not in progress.ok]  # bulk: no batch holds them
        fetched = from_exports + _fetch_all(
            api_todo,
            progress,
            base=f"{api_url}/api/feature/{_quote(model)}/{_quote(source)}",
            headers={API_KEY_HEADER: api_key} if api_key else {},
            limiter=limiter,
            workers=workers,
            max_consecutive_failures=max_consecutive_failures,
            **retry,
            show_progress=show_progress,
            desc=sae.neuronpedia_id,
        )
    finally:
        progress.close()

    scope = sorted(set(progress.ok) | set(progress.failed))
    ok = {i: progress.ok[i] for i in scope if i in progress.ok}
    errors = {i: progress.failed[i] for i in scope if i in progress.failed}
    stats = {
        "total_features": len(scope),
        "with_descriptions": sum(1 for label in ok.values() if label.description),
        "successful": len(ok),
        "failed": len(errors),
    }
    sae_info = {**header, "downloaded_at": _utc_now()}
    sae_info = {k: sae_info[k] for k in SAE_INFO_FIELDS}
    labels_path = folder / LABELS_FILENAME
    metadata_path = folder / METADATA_FILENAME
    atomic_write_json(
        labels_path,
        {
            "sae_info": sae_info,
            "features": {str(i): asdict(label) for i, label in ok.items()},
            "stats": stats,
        },
    )
    atomic_write_json(
        metadata_path,
        {
            "sae_info": sae_info,
            "stats": stats,
            "failed_features": sorted(errors),
            "errors": {str(i): e for i, e in errors.items()},
        },
    )
    return DownloadResult(
        folder=folder,
        labels_path=labels_path,
        metadata_path=metadata_path,
        stats=stats,
        failed=sorted(errors),
        fetched=fetched,
        already_had=len(wanted) - len(todo),
        errors=errors,
        batches=batches,
    )


def _fetch_all(
    todo: list[int],
    progress: _Progress,
    *,
    base: str,
    headers: dict[str, str],
    limiter: RateLimiter,
    workers: int,
    timeout: float,
    max_retries: int,
    backoff_base: float,
    max_backoff: float,
    max_retry_after: float,
    max_consecutive_failures: int,
    show_progress: bool,
    desc: str,
) -> int:
    """Fetch ``todo`` on ``workers`` threads, recording each outcome in ``progress`` as
    it arrives (in this thread); returns how many were fetched. Ctrl-C, an auth error
    or a run of connection failures stops the workers and propagates."""
    if not todo:
        return 0
    stop = threading.Event()
    client = httpx.Client(
        headers={"accept": "application/json", **headers},
        timeout=timeout,
        follow_redirects=True,
        limits=httpx.Limits(max_connections=workers, max_keepalive_connections=workers),
    )
    fetcher = _Fetcher(
        client, base, limiter, stop, max_retries, backoff_base, max_backoff, max_retry_after
    )
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="neuronpedia")
    bar = tqdm(total=len(todo), desc=desc, unit="feature", disable=not show_progress)
    pending: set[Future[_Outcome]] = set()
    queue = iter(todo)
    done_count = 0
    consecutive = 0
    try:
        for index in queue:
            pending.add(pool.submit(fetcher.fetch, index))
            if len(pending) >= 2 * workers:
                break
        while pending:
            # a timeout, so Ctrl-C is seen even while every worker waits on the network
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in finished:
                outcome = future.result()  # an auth error propagates here
                progress.record(outcome)
                done_count += 1
                bar.update(1)
                consecutive = consecutive + 1 if outcome.connection_failure else 0
                if consecutive >= max_consecutive_failures:
                    raise ConnectionError(
                        f"{consecutive} features in a row failed to connect to {base} "
                        f"(last: {outcome.error}); progress kept in {progress.path}: "
                        "run again to resume"
                    )
                nxt = next(queue, None)
                if nxt is not None:
                    pending.add(pool.submit(fetcher.fetch, nxt))
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        client.close()
        bar.close()
    return done_count


# --------------------------------------------------------------------------- bulk exports


def parse_export_line(
    record: Any, where: str, *, num_features: int, model: str, source: str
) -> tuple[int, str]:
    """One line of an explanations export -> ``(index, description)``;
    :class:`NeuronpediaExportError` naming ``where`` (the batch URL and line) otherwise.
    ``index`` may be an int or a decimal string; a ``modelId`` / ``layer`` that names
    another SAE is an error (the export is not this SAE's)."""
    if not isinstance(record, dict):
        raise NeuronpediaExportError(f"{where}: not a JSON object but {type(record).__name__}")
    missing = [k for k in ("index", "description") if k not in record]
    if missing:
        raise NeuronpediaExportError(f"{where}: no {', '.join(missing)}")
    raw = record["index"]
    if isinstance(raw, str) and raw.isascii() and raw.isdigit():
        index = int(raw)
    elif isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        index = raw
    else:
        raise NeuronpediaExportError(f"{where}: index {raw!r} is not a feature index")
    if index >= num_features:
        raise NeuronpediaExportError(
            f"{where}: feature {index} is out of range; the SAE has {num_features} features "
            "(is --num-features right?)"
        )
    description = record["description"]
    if not isinstance(description, str):
        raise NeuronpediaExportError(f"{where}: description is not a string: {description!r}")
    for key, expected in (("modelId", model), ("layer", source)):
        value = record.get(key)
        if isinstance(value, str) and value != expected:
            raise NeuronpediaExportError(
                f"{where}: {key} {value!r} is not this SAE's {expected!r} (another SAE's export)"
            )
    return index, description


def parse_export_batch(
    data: bytes,
    url: str,
    *,
    num_features: int,
    model: str,
    source: str,
    compressed: bool = True,
) -> list[tuple[int, str]]:
    """An explanations export batch (gzipped JSON lines; ``compressed=False``: already
    decompressed) -> its ``(index, description)`` pairs in file order. Anything that is
    not gzip, UTF-8, or a line :func:`parse_export_line` accepts is a
    :class:`NeuronpediaExportError` naming ``url`` (and the line number)."""
    if compressed:
        if not data.startswith(b"\x1f\x8b"):
            raise NeuronpediaExportError(f"{url}: not a gzip file (it starts {data[:16]!r})")
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise NeuronpediaExportError(f"{url}: corrupt gzip data: {e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NeuronpediaExportError(f"{url}: not UTF-8 text: {e}") from e
    entries = []
    # split on newlines only: str.splitlines would also cut at U+2028 inside a string
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{url} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise NeuronpediaExportError(f"{where}: not JSON: {e}") from e
        entries.append(
            parse_export_line(record, where, num_features=num_features, model=model, source=source)
        )
    return entries


def _fetch_bulk(
    todo: list[int],
    progress: _Progress,
    *,
    base: str,
    model: str,
    source: str,
    num_features: int,
    limiter: RateLimiter,
    timeout: float,
    max_retries: int,
    backoff_base: float,
    max_backoff: float,
    max_retry_after: float,
    show_progress: bool,
    desc: str,
) -> tuple[int, int]:
    """Label ``todo`` from the export batches ``{base}/batch-N.jsonl.gz``, N = 0, 1, ...
    until a 404, recording each batch in ``progress`` once its labels are; returns
    ``(batches downloaded, features labelled)``. A batch recorded by an earlier run is
    skipped unless it holds a feature still missing; the run stops early once every
    feature of ``todo`` has a label. Retries as the API path; a batch still failing
    after them is a ``ConnectionError``, bad content a :class:`NeuronpediaExportError`
    (the finished batches are kept either way)."""
    missing = set(todo) - set(progress.ok)
    if not missing:
        return 0, 0
    stop = threading.Event()
    # no API key: the exports are a public bucket on another host
    client = httpx.Client(timeout=timeout, follow_redirects=True)
    fetcher = _Fetcher(
        client,
        base,
        limiter,
        stop,
        max_retries,
        backoff_base,
        max_backoff,
        max_retry_after,
        auth_hint=f"; the exports are public: is --exports-url / ${EXPORTS_URL_ENV} right?",
    )
    bar = tqdm(desc=f"{desc} (exports)", unit="batch", disable=not show_progress)
    downloaded = labelled = 0
    batch = 0
    try:
        while missing and (progress.bulk_end is None or batch < progress.bulk_end):
            known = progress.batches.get(batch)
            if known is not None and not known & missing:
                batch += 1  # done by an earlier run, and nothing still missing is in it
                continue
            url = f"{base}/batch-{batch}.jsonl.gz"
            reply = fetcher.get(url)
            response = reply.response
            if response is None:
                raise ConnectionError(
                    f"{url}: {reply.error}; the finished batches are kept in "
                    f"{progress.path}: run again to resume"
                )
            if response.status_code == 404:
                if batch == 0:
                    raise NeuronpediaExportError(
                        f"no explanations export of {desc} at {url} (HTTP 404); download "
                        "without --bulk, or check --exports-url"
                    )
                progress.record_bulk_end(batch)
                break
            if response.status_code != 200:
                raise NeuronpediaExportError(f"{url}: HTTP {response.status_code}")
            # a server that sent Content-Encoding: gzip had httpx decompress it already
            decoded = "gzip" in response.headers.get("content-encoding", "").lower()
            entries = parse_export_batch(
                response.content,
                url,
                num_features=num_features,
                model=model,
                source=source,
                compressed=not decoded,
            )
            found: dict[int, FeatureLabel] = {}
            for index, description in entries:
                if index in missing and index not in found:  # the first explanation wins
                    found[index] = FeatureLabel(description, [], [], None, True)
            progress.record_batch(batch, url, found, {index for index, _ in entries})
            missing -= found.keys()
            downloaded += 1
            labelled += len(found)
            bar.update(1)
            batch += 1
    finally:
        stop.set()
        client.close()
        bar.close()
    return downloaded, labelled
