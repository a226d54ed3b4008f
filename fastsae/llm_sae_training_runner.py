"""``python -m fastsae.llm_sae_training_runner --architecture topk --d_in 768 ...``: the
command line of ``python -m sae_lens.llm_sae_training_runner``, running
:class:`~fastsae.training.runner.SAETrainingRunner`.

The flags are SAELens's (its ``simple_parsing`` parser over the runner config), built
here with ``argparse`` from the same dataclasses:

* ``--architecture`` (or ``--sae``) picks the training SAE config (default
  ``standard``); its fields are flags of their own (``--d_in``, ``--d_sae``, ``-k``/``--k``,
  ``--normalize_activations``, ...; ``d_in`` defaults to 512 and ``d_sae`` to 1024, as in
  SAELens). An SAE field that the runner config also has is ``--sae.<name>``
  (``--sae.dtype``, ``--sae.device``); left out, the runner's value is used.
* every field of ``LanguageModelSAERunnerConfig`` and of its ``logger`` is
  ``--<name> VALUE`` (``--training_tokens 1000000``, ``--log_to_wandb false``);
  a bool flag alone means true, and ``--no<name>`` means false; an optional field
  takes ``None``; tuples (``--seqpos_slice 5 -5``) take several values; mappings
  (``--model_kwargs``) take JSON.

With no argument it prints the help, as SAELens does.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, fields
from typing import Any

from fastsae.saes.registry import architectures, training_config_class_for_architecture
from fastsae.training.config import LanguageModelSAERunnerConfig, LoggingConfig
from fastsae.training.runner import LanguageModelSAETrainingRunner, SAETrainingRunner

__all__ = ["LanguageModelSAETrainingRunner", "SAETrainingRunner"]

DEFAULT_ARCHITECTURE = "standard"
# SAELens builds the SAE config of the command line with these (functools.partial)
SAE_CLI_DEFAULTS = {"d_in": 512, "d_sae": 1024}

_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}
_NONE = {"none", "null"}
_UNION_ORIGINS = (typing.Union, types.UnionType)


# ------------------------------------------------------------------------- value parsers
def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a bool (true or false), got {text!r}")


def _parse_not_bool(text: str) -> bool:
    return not _parse_bool(text)


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected JSON, got {text!r} ({e})") from None


def _parse_mapping(text: str) -> Any:
    value = _parse_json(text)
    if value is not None and not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _scalar_parser(hint: Any) -> Callable[[str], Any]:
    """``str -> value`` for a scalar annotation: int, float, str, bool, Literal, and
    unions of them (tried in order: None words, bool, int, float, Literal, str)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in _UNION_ORIGINS else (hint,)
    options: list[Any] = []
    for a in args:
        if typing.get_origin(a) is typing.Literal:
            options.extend(typing.get_args(a))
        else:
            options.append(a)

    def parse(text: str) -> Any:
        low = text.strip().lower()
        if type(None) in options and low in _NONE:
            return None
        # "0"/"1" are ints where an int is possible (prefetch_llm_batches: bool | int)
        int_digit = int in options and low in ("0", "1")
        if bool in options and low in _TRUE | _FALSE and not int_digit:
            return _parse_bool(text)
        for kind in (int, float):
            if kind in options:
                try:
                    return kind(text)
                except ValueError:
                    pass
        if str in options or text in options:
            return text
        expected = " or ".join(
            o.__name__ if isinstance(o, type) else repr(o) for o in options if o is not None
        )
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")

    return parse


def _argument_kwargs(hint: Any) -> tuple[dict[str, Any], bool]:
    """``add_argument`` keyword arguments for a field annotated ``hint``, and whether it
    is a bool flag (which also gets a ``--no<name>`` form)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    non_none = [a for a in args if a is not type(None)] if origin in _UNION_ORIGINS else [hint]
    optional = origin in _UNION_ORIGINS and len(non_none) < len(args)
    if non_none == [bool] and not optional:
        return {"nargs": "?", "const": True, "type": _parse_bool, "metavar": "bool"}, True
    inner = non_none[0] if len(non_none) == 1 else None
    inner_origin = typing.get_origin(inner)
    if inner is not None and (inner_origin is tuple or inner_origin is list):
        item_args = [a for a in typing.get_args(inner) if a is not Ellipsis]
        item = item_args[0] if item_args else str
        return {"nargs": "*", "type": _scalar_parser(item), "metavar": "value"}, False
    if inner is not None and (inner is dict or inner_origin in (dict, Mapping)):
        return {"type": _parse_mapping, "metavar": "json"}, False
    if any(typing.get_origin(a) is list for a in non_none):
        # bool | list[int] (exclude_special_tokens): a bool, or one or more ints
        return {"nargs": "+", "type": _scalar_parser(int | bool), "metavar": "value"}, False
    if all(_is_scalar(a) for a in non_none):
        kwargs: dict[str, Any] = {"type": _scalar_parser(hint)}
        literals = [v for a in non_none if typing.get_origin(a) is typing.Literal
                    for v in typing.get_args(a)]  # fmt: skip
        if literals and len(non_none) == 1:
            kwargs["choices"] = literals
        if optional:
            kwargs.update(nargs="?", const=None)
        kwargs["metavar"] = _type_name(hint)
        return kwargs, False
    # a field typed by a class (an SAE config's metadata): a JSON object of its fields
    return {"type": _parse_mapping, "metavar": "json"}, False


def _is_scalar(hint: Any) -> bool:
    return hint in (int, float, str, bool) or typing.get_origin(hint) is typing.Literal


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(hint))
    if origin in _UNION_ORIGINS:
        return "|".join(_type_name(a) for a in typing.get_args(hint) if a is not type(None))
    return str(hint)


def _default_text(f: Field[Any], override: Any = MISSING) -> str:
    if override is not MISSING:
        return repr(override)
    if f.default is not MISSING:
        return repr(f.default)
    if f.default_factory is not MISSING:
        return repr(f.default_factory())
    return "required"


def _add_field(
    group: argparse._ArgumentGroup,
    f: Field[Any],
    hint: Any,
    *,
    flag: str,
    dest: str,
    default: Any = MISSING,
) -> None:
    kwargs, is_bool = _argument_kwargs(hint)
    names = [f"--{flag}"]
    if len(flag) == 1:
        names.insert(0, f"-{flag}")
    group.add_argument(
        *names,
        dest=dest,
        default=argparse.SUPPRESS,
        help=f"(default: {_default_text(f, default)})",
        **kwargs,
    )
    if is_bool:
        group.add_argument(
            f"--no{flag}",
            dest=dest,
            nargs="?",
            const=False,
            type=_parse_not_bool,
            default=argparse.SUPPRESS,
            metavar="bool",
            help=f"--{flag} false",
        )


# ------------------------------------------------------------------------- the parser
def _architecture_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--architecture",
        "--sae",
        dest="architecture",
        choices=architectures("training_cfg_cls"),
        default=DEFAULT_ARCHITECTURE,
        help=f"the training SAE's architecture (default: {DEFAULT_ARCHITECTURE})",
    )


def build_parser(architecture: str = DEFAULT_ARCHITECTURE) -> argparse.ArgumentParser:
    """The parser of the runner config with ``architecture``'s SAE fields."""
    parser = argparse.ArgumentParser(
        prog="python -m fastsae.llm_sae_training_runner",
        description="Train an SAE on a language model's activations (SAELens's command line).",
    )
    _architecture_arguments(parser)
    runner_hints = typing.get_type_hints(LanguageModelSAERunnerConfig)
    runner = parser.add_argument_group("LanguageModelSAERunnerConfig")
    taken = set()
    for f in fields(LanguageModelSAERunnerConfig):
        if f.name in ("sae", "logger"):
            continue
        _add_field(runner, f, runner_hints[f.name], flag=f.name, dest=f.name)
        taken.add(f.name)
    logger_hints = typing.get_type_hints(LoggingConfig)
    logger = parser.add_argument_group("LoggingConfig")
    for f in fields(LoggingConfig):
        _add_field(logger, f, logger_hints[f.name], flag=f.name, dest=f.name)
        taken.add(f.name)
    cfg_cls = training_config_class_for_architecture(architecture)
    sae_hints = typing.get_type_hints(cfg_cls)
    sae = parser.add_argument_group(cfg_cls.__name__)
    for f in fields(cfg_cls):
        if not f.init or f.name.startswith("_"):
            continue
        # a name the runner (or logger) has too is spelled sae.<name>, as in SAELens
        flag = f"sae.{f.name}" if f.name in taken else f.name
        _add_field(
            sae,
            f,
            sae_hints[f.name],
            flag=flag,
            dest=f"sae.{f.name}",
            default=SAE_CLI_DEFAULTS.get(f.name, MISSING),
        )
    return parser


def _parse_cfg_args(args: Sequence[str]) -> LanguageModelSAERunnerConfig[Any]:
    """The runner config the command line ``args`` describe (``--help`` when empty)."""
    args = list(args)
    if not args:
        args = ["--help"]
    pre = argparse.ArgumentParser(add_help=False)
    _architecture_arguments(pre)
    known, _ = pre.parse_known_args(args)
    parsed = vars(build_parser(known.architecture).parse_args(args))
    sae: dict[str, Any] = {"architecture": parsed.pop("architecture"), **SAE_CLI_DEFAULTS}
    for key in [k for k in parsed if k.startswith("sae.")]:
        sae[key.removeprefix("sae.")] = parsed.pop(key)
    exclude = parsed.get("exclude_special_tokens")
    if isinstance(exclude, list):
        bools = [v for v in exclude if isinstance(v, bool)]
        if bools and len(exclude) > 1:
            raise SystemExit(
                f"--exclude_special_tokens takes one bool or a list of token ids, got {exclude!r}"
            )
        parsed["exclude_special_tokens"] = bools[0] if bools else exclude
    if "seqpos_slice" in parsed:
        parsed["seqpos_slice"] = tuple(parsed["seqpos_slice"])
    return LanguageModelSAERunnerConfig(sae=sae, **parsed)


def _run_cli(args: Sequence[str]) -> None:
    cfg = _parse_cfg_args(args)
    LanguageModelSAETrainingRunner(cfg).run()


if __name__ == "__main__":
    _run_cli(sys.argv[1:])
