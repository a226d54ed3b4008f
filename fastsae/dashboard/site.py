"""The dashboard's static site: ``OUT/index.html`` over the data ``fastsae.dashboard.data``
wrote, openable from a file:// URL with no server and no network.

A page opened from file:// may not ``fetch()`` local files, so the data reaches it as
script files: ``OUT/data/js/meta.js`` (``window.FASTSAE_META``: meta.json),
``OUT/data/js/prompts.js`` (``window.FASTSAE_PROMPTS``: the prompt explorer's
precomputed prompts, also in ``OUT/data/prompts.json``) and one
``OUT/data/js/features/<index>.js`` per feature (calls ``fastsaeFeatureLoaded(record)``
with the feature's JSON record, loaded when its page opens). ``index.html`` carries the
page's script and style (``fastsae/dashboard/assets/``) inline: one folder, nothing
fetched from elsewhere.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from fastsae.atomic_files import atomic_write_json, atomic_write_text
from fastsae.dashboard.data import DATA_DIR, FEATURES_DIR, META_FILENAME

INDEX_FILENAME = "index.html"
JS_DIR = "js"
PROMPTS_FILENAME = "prompts.json"


def _script(variable_or_call: str, obj: Any, *, call: bool = False) -> str:
    body = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return f"{variable_or_call}({body});\n" if call else f"{variable_or_call} = {body};\n"


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} does not exist: compute the dashboard's data first "
            "(fastsae dashboard ... --out DIR)"
        ) from None
    except ValueError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from e


def render_index(meta: dict[str, Any]) -> str:
    """``index.html``: the page template with its script and style inline."""
    site = resources.files("fastsae.dashboard") / "assets"
    env = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined)
    template = env.from_string((site / "index.html.j2").read_text(encoding="utf-8"))
    sae = meta["sae"]
    title = f"fastsae dashboard: {sae['architecture']} SAE on {sae['hook_name']}"
    return template.render(
        title=title,
        style=(site / "style.css").read_text(encoding="utf-8"),
        app=(site / "app.js").read_text(encoding="utf-8"),
    )


def write_prompts(out: str | Path, records: list[dict[str, Any]]) -> Path:
    """The prompt explorer's precomputed prompts: ``OUT/data/prompts.json`` (and the
    script the page reads, on the next :func:`build_site`)."""
    path = Path(out) / DATA_DIR / PROMPTS_FILENAME
    atomic_write_json(path, records)
    return path


def build_site(out: str | Path) -> Path:
    """Write ``OUT/index.html`` and the data scripts from ``OUT/data`` (see the module
    docstring); a feature's script is rewritten only when its JSON is newer. Returns
    the path of ``index.html``."""
    out = Path(out)
    data = out / DATA_DIR
    meta = _read_json(data / META_FILENAME, "the dashboard's meta file")
    if not isinstance(meta, dict) or "features" not in meta or "sae" not in meta:
        raise ValueError(f"{data / META_FILENAME} is not a dashboard meta file")
    js = data / JS_DIR
    for summary in meta["features"]:
        index = summary["feature_index"]
        src = data / FEATURES_DIR / f"{index}.json"
        dst = js / FEATURES_DIR / f"{index}.js"
        if dst.is_file() and src.is_file() and dst.stat().st_mtime_ns >= src.stat().st_mtime_ns:
            continue
        record = _read_json(src, f"feature {index}'s data")
        atomic_write_text(dst, _script("fastsaeFeatureLoaded", record, call=True))
    prompts_path = data / PROMPTS_FILENAME
    prompts = _read_json(prompts_path, "the prompts file") if prompts_path.is_file() else []
    atomic_write_text(js / "prompts.js", _script("window.FASTSAE_PROMPTS", prompts))
    atomic_write_text(js / "meta.js", _script("window.FASTSAE_META", meta))
    index_path = out / INDEX_FILENAME
    atomic_write_text(index_path, render_index(meta))
    return index_path


__all__ = ["INDEX_FILENAME", "build_site", "render_index", "write_prompts"]
