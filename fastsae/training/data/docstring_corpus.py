"""An offline text corpus: docstrings of installed packages, read with ``ast``.

- ``local_text_dataset()``: English prose with no download, for demos and tests.
- ``DEFAULT_DOC_PACKAGES`` and the private helpers that list a package's ``.py`` files
  and pull the docstrings out of one file.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import random
import sysconfig
import warnings
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset

DEFAULT_DOC_PACKAGES = ("stdlib", "numpy", "torch", "datasets")
# the name this corpus goes by where a dataset path is asked for (the demo's config,
# `fastsae dashboard --dataset`)
DOCSTRINGS_DATASET = "local-docstrings"
# Folders never read: test suites (their docstrings are fixtures, not prose), GUI demos.
_SKIP_DIRS = frozenset(
    {"test", "tests", "testing", "site-packages", "__pycache__", "idlelib", "tkinter",
     "turtledemo", "lib2to3", "ensurepip", "_vendor", "vendored"}
)  # fmt: skip
_SKIP_FILES = frozenset({"antigravity.py", "this.py"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _package_files(name: str) -> list[Path]:
    """Sorted ``.py`` files of an installed package (``"stdlib"``: the standard library)."""
    if name == "stdlib":
        roots = [Path(sysconfig.get_paths()["stdlib"])]
    else:
        spec = importlib.util.find_spec(name)  # a top-level name: nothing is imported
        if spec is None:
            raise ValueError(f"packages: {name!r} is not installed")
        if spec.submodule_search_locations:
            roots = [Path(p) for p in spec.submodule_search_locations]
        elif spec.origin and spec.origin.endswith(".py"):
            return [Path(spec.origin)]
        else:
            raise ValueError(f"packages: {name!r} has no Python source to read")
    files: list[Path] = []
    for root in roots:
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
            files.extend(
                Path(folder, f) for f in sorted(names) if f.endswith(".py") and f not in _SKIP_FILES
            )
    return files


def _file_docstrings(path: Path, min_chars: int) -> list[tuple[str, str]]:
    """(qualified name, cleaned docstring) for the module, classes and functions of a file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning on odd escapes in old sources
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    out = []
    # Docstrings live only in module/class/function bodies, possibly under if/try/with:
    # walk statements only, not every expression node.
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= min_chars:
                out.append((getattr(node, "name", "<module>"), doc))
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                stack.extend(reversed(children))
    return out


def local_text_dataset(
    n_docs: int | None = None,
    min_chars: int = 200,
    seed: int = 0,
    packages: Sequence[str] | None = None,
    max_chars: int | None = None,
) -> Dataset:
    """A text dataset that needs no network: docstrings of installed packages.

    The ``.py`` files of each package (``"stdlib"`` names the standard library) are
    parsed with ``ast``; nothing is imported, so no module's side effects run. Test
    suites are skipped. Every module/class/function docstring of at least ``min_chars``
    characters is one document; repeats (copied docstrings) are kept once. Files are
    visited in an order shuffled by ``seed``, so the result is deterministic for a given
    (packages, seed, min_chars) and ``n_docs=k`` gives the first k documents of
    ``n_docs=None``. The default packages are the stdlib, numpy, torch and datasets;
    parsing is the cost, and ``n_docs`` and ``max_chars`` stop it early.

    ``max_chars``: stop after the first document that brings the total to at least this
    many characters (no more files are parsed); like ``n_docs``, the result is a prefix
    of the whole corpus, documents in the same order, just fewer.

    Returns:
        a ``datasets.Dataset`` with columns ``text`` (the docstring) and ``source``
        (``"<package>/<file>:<name>"``).
    """
    if n_docs is not None and (isinstance(n_docs, bool) or n_docs <= 0):
        raise ValueError(f"n_docs must be a positive int or None, got {n_docs!r}")
    if max_chars is not None and (
        isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars <= 0
    ):
        raise ValueError(f"max_chars must be a positive int or None, got {max_chars!r}")
    if min_chars < 1:
        raise ValueError(f"min_chars must be >= 1, got {min_chars!r}")
    names = list(DEFAULT_DOC_PACKAGES if packages is None else packages)
    if isinstance(packages, str) or not names:
        raise ValueError(f"packages must be a non-empty list of package names, got {packages!r}")
    files: list[tuple[str, Path, Path]] = []
    for name in names:
        pkg_files = _package_files(name)
        base = pkg_files[0].parent if pkg_files else Path()
        files.extend((name, base, f) for f in pkg_files)
    random.Random(seed).shuffle(files)
    texts: list[str] = []
    sources: list[str] = []
    seen: set[str] = set()
    n_chars = 0
    for name, base, path in files:
        for qualname, doc in _file_docstrings(path, min_chars):
            if doc in seen:
                continue
            seen.add(doc)
            texts.append(doc)
            sources.append(f"{name}/{_relative(path, base)}:{qualname}")
            n_chars += len(doc)
            if (n_docs is not None and len(texts) >= n_docs) or (
                max_chars is not None and n_chars >= max_chars
            ):
                return Dataset.from_dict({"text": texts, "source": sources})
    if not texts:
        raise ValueError(f"no docstrings of >= {min_chars} characters found in {names}")
    return Dataset.from_dict({"text": texts, "source": sources})


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.name
