"""Key and type checks shared by every level of the runner config
(:mod:`fastsae.training.config`): the top level, ``sae:``, ``logger:`` and the flat
form's ``activation_fn_kwargs``.

* ``reject_unknown_keys``: a key no field has is an error with a did-you-mean, never
  dropped (a dropped ``topk: 4`` would train with the default k).
* ``check_field_types``: scalar fields (int, float, bool, str, and lists / unions of them)
  must hold a value of their annotated type, checked before the value is compared or
  used, so a wrong type is an error that names the field instead of a raw ``TypeError``
  (or a string ``"no"`` taken as a true bool).
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import types
import typing
from collections.abc import Collection, Iterable, Mapping
from typing import Any

_UNION_ORIGINS = (typing.Union, types.UnionType)
_SCALAR_NAMES = {bool: "a bool", int: "an int", float: "a finite number", str: "a string"}


def reject_unknown_keys(
    where: str,
    given: Iterable[str],
    known: Collection[str],
    *,
    hints_from: Iterable[str] = (),
    note: str = "",
) -> None:
    """Raise ``ValueError`` naming the keys of ``given`` that are not in ``known``.

    Args:
        where: the level the keys were found at (``"LanguageModelSAERunnerConfig"``,
            ``"sae (architecture 'topk')"``, ``"logger"``), the message's start.
        given: the keys the user wrote.
        known: the keys that level accepts.
        hints_from: further names a misspelling may have meant (e.g. the runner's
            fields when the key was read as an SAE field); ``known`` always is one.
        note: appended to the list of unknown keys (why they are unknown here).
    """
    unknown = sorted(k for k in given if k not in known)
    if not unknown:
        return
    candidates = [str(k) for k in dict.fromkeys([*known, *hints_from])]
    hints = []
    for key in unknown:
        close = _closest(str(key), candidates)
        if close is not None:
            hints.append(f"{key!r} -> did you mean {close!r}?")
    plural = "s" if len(unknown) > 1 else ""
    raise ValueError(
        f"{where}: unknown field{plural} {unknown}{note}"
        + ("; " + "; ".join(hints) if hints else "")
    )


def _closest(key: str, candidates: list[str]) -> str | None:
    """difflib's closest candidate; failing that, one the key ends with once case and
    underscores are ignored (``topk`` / ``top_k`` -> ``k``), too short for difflib."""
    by_folded = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(key.lower(), list(by_folded), n=1)
    if close:
        return by_folded[close[0]]
    folded = key.lower().replace("_", "")
    ends = [c for c in candidates if folded.endswith(c.lower().replace("_", ""))]
    return max(ends, key=len) if ends else None


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_field_types(
    where: str, cls: type, values: Mapping[str, Any], *, skip: Collection[str] = ()
) -> None:
    """Raise ``ValueError`` for a value of ``values`` that does not fit the annotation of
    the field of dataclass ``cls`` of the same name.

    Only annotations built from ``int``, ``float``, ``bool``, ``str``, ``None``,
    ``Literal``, ``Any`` and ``list``/``tuple``/``dict`` of those are checked; fields
    typed by a class (``metadata``, ``logger``) have checks of their own, as have the
    names in ``skip``. An int is a number, a bool is not; numbers must be finite; a
    string field also takes an ``os.PathLike`` (path fields are often pathlib.Path objects).

    Args:
        where: prefix of the field name in the message (``""``, ``"sae."``, ``"logger."``).
        cls: the dataclass whose annotations are the expected types.
        values: field name -> value (names ``cls`` does not have are not checked here).
        skip: fields to leave to their own checks (e.g. ``dtype``, which may be a
            ``torch.dtype``).
    """
    hints = _type_hints(cls)
    for name, value in values.items():
        if name in skip or name not in hints:
            continue
        hint = hints[name]
        expected = _describe(hint)
        if expected is None or _fits(hint, value):
            continue
        message = f"{where}{name} must be {expected}, got {value!r} ({type(value).__name__})"
        if isinstance(value, str) and _is_number(value) and "number" in expected:
            message += ": a quoted number is a string; write it without quotes"
        raise ValueError(message)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _describe(hint: Any) -> str | None:
    """The English for a checkable annotation; None for one this check leaves alone."""
    if hint is Any:
        return "anything"
    if hint is type(None):
        return "null"
    if hint in _SCALAR_NAMES:
        return _SCALAR_NAMES[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in _UNION_ORIGINS:
        parts = [_describe(a) for a in args]
        return None if None in parts else " or ".join(parts)  # type: ignore[arg-type]
    if origin in (list, tuple):
        item_args = [a for a in args if a is not Ellipsis]
        items = [_describe(a) for a in item_args]
        if None in items:
            return None
        return "a list" + (f" of ({' | '.join(items)})" if items else "")  # type: ignore[arg-type]
    if origin is dict or hint is dict:
        return "a mapping"
    return None


def _fits(hint: Any, value: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if hint is str:
        # path fields (output_path, dataset_path, ...) are often given as pathlib.Paths
        return isinstance(value, (str, os.PathLike))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if origin in _UNION_ORIGINS:
        return any(_fits(a, value) for a in args)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(
                _fits(a, v) for a, v in zip(args, value, strict=True)
            )
        item = args[0] if args else Any
        return all(_fits(item, v) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    return True
