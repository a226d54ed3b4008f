"""Reading one activation out of a model: TransformerLens hooks and module paths.

``hook_reader(model, hook_name)`` gives an object whose ``read(tokens, attention_mask,
kwargs)`` returns the hook's value ``[batch, pos, ...]``, running the model only as far
as the hook: TransformerLens models by hook name (``blocks.3.hook_resid_pre``), any
Hugging Face ``transformers`` model or ``nn.Module`` by module path (``encoder.layer.3``).
Unknown names raise a ValueError that lists the valid ones.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from torch import Tensor, nn


class _StopForward(Exception):
    """Raised by the forward hook once the hooked module has run: skips later layers."""


def _layer_of(hook_name: str) -> int | None:
    """The first ``.<int>`` segment of a hook name / module path, e.g. 3 in blocks.3.x."""
    match = re.search(r"\.(\d+)(?:\.|$)", hook_name)
    return None if match is None else int(match.group(1))


def _describe_names(names: list[str], limit: int = 60) -> str:
    """All names when few; else every path ending in a layer number (``*.layer.N``) and
    the rest folded over their layer number (``blocks.{0..47}.hook_resid_pre``)."""
    if len(names) <= limit:
        return ", ".join(names)
    explicit = [n for n in names if n.rsplit(".", 1)[-1].isdigit()]
    groups: dict[str, list[int]] = {}
    for name in names:
        if name in explicit or not name:
            continue
        match = re.search(r"\.(\d+)(?=\.|$)", name)
        if match is None:
            groups.setdefault(name, [])
        else:
            key = name[: match.start(1)] + "{}" + name[match.end(1) :]
            groups.setdefault(key, []).append(int(match.group(1)))
    folded = [
        key.format(f"{{{min(ids)}..{max(ids)}}}") if ids else key for key, ids in groups.items()
    ]
    more = ""
    if len(folded) > limit:
        more = f", ... ({len(folded) - limit} more patterns)"
        folded = folded[:limit]
    return ", ".join(explicit + folded) + more


class TransformerLensReader:
    """Reads one hook of a TransformerLens model (HookedTransformer, TransformerBridge)."""

    def __init__(self, model: nn.Module, hook_name: str):
        names = sorted(model.hook_dict)
        if hook_name not in model.hook_dict:
            raise ValueError(
                f"hook_name {hook_name!r} is not a hook of this {type(model).__name__}; "
                f"valid hook names: {_describe_names(names)}"
            )
        self.model = model
        self.hook_name = hook_name
        layer = _layer_of(hook_name)
        self.stop_at_layer = None if layer is None else layer + 1
        cfg = getattr(model, "cfg", None)
        self.max_context: int | None = getattr(cfg, "n_ctx", None)
        # HookedTransformer/TransformerBridge take these; a bare HookedRootModule may not
        accepted = set(inspect.signature(model.forward).parameters)
        accepted |= set(inspect.signature(model.run_with_cache).parameters)
        self.takes_stop_at_layer = "stop_at_layer" in accepted
        self.takes_attention_mask = "attention_mask" in accepted

    @property
    def input_device(self) -> torch.device:
        if hasattr(self.model, "W_E"):
            return self.model.W_E.device
        return next(self.model.parameters()).device

    def read(self, tokens: Tensor, attention_mask: Tensor | None, kwargs: dict) -> Tensor:
        """tokens ``[batch, pos]`` -> the hook's value ``[batch, pos, ...]``."""
        extra: dict[str, Any] = {}
        if self.takes_stop_at_layer and self.stop_at_layer is not None:
            extra["stop_at_layer"] = self.stop_at_layer
        if attention_mask is not None and self.takes_attention_mask:
            extra["attention_mask"] = attention_mask
        _, cache = self.model.run_with_cache(
            tokens, names_filter=[self.hook_name], **extra, **kwargs
        )
        return cache[self.hook_name]


class ModuleReader:
    """Reads the output of one submodule of a Hugging Face model (or any nn.Module).

    The forward is stopped by an exception raised from the hook, so layers after the
    hooked one never run. A tuple output gives its element 0 (the hidden states).
    """

    def __init__(self, model: nn.Module, hook_name: str):
        modules = dict(model.named_modules())
        path = hook_name
        prefix = getattr(model, "base_model_prefix", "")
        # "bert.encoder.layer.3" on a BertModel and "encoder.layer.3" on a
        # BertForMaskedLM name the same module: accept both spellings.
        if path not in modules and prefix:
            if path.startswith(prefix + ".") and path[len(prefix) + 1 :] in modules:
                path = path[len(prefix) + 1 :]
            elif f"{prefix}.{path}" in modules:
                path = f"{prefix}.{path}"
        if not hook_name or path not in modules:
            raise ValueError(
                f"hook_name {hook_name!r} is not a module path of this {type(model).__name__}; "
                f"valid module paths: {_describe_names([n for n in modules if n])}"
            )
        self.model = model
        self.module_path = path
        self.module = modules[path]
        config = getattr(model, "config", None)
        self.max_context = getattr(config, "max_position_embeddings", None)
        self.is_hf = hasattr(model, "config") and hasattr(model, "get_input_embeddings")

    @property
    def input_device(self) -> torch.device:
        if self.is_hf:
            embed = self.model.get_input_embeddings()
            if embed is not None and hasattr(embed, "weight"):
                return embed.weight.device
        return next(self.model.parameters()).device

    def read(self, tokens: Tensor, attention_mask: Tensor | None, kwargs: dict) -> Tensor:
        """tokens ``[batch, pos]`` -> the module's output ``[batch, pos, ...]``."""
        captured: list[Any] = []

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, (tuple, list)) else output)
            raise _StopForward

        handle = self.module.register_forward_hook(hook)
        was_training = self.model.training
        self.model.eval()  # dropout would corrupt the activations
        try:
            if self.is_hf:
                mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
                self.model(input_ids=tokens, attention_mask=mask, **kwargs)
            else:
                self.model(tokens, **kwargs)
        except _StopForward:
            pass
        finally:
            handle.remove()
            self.model.train(was_training)
        if not captured:
            raise RuntimeError(f"module {self.module_path!r} did not run in the forward pass")
        out = captured[0]
        if not isinstance(out, Tensor):
            raise TypeError(
                f"module {self.module_path!r} returned {type(out).__name__}, not a tensor"
            )
        return out


def is_transformer_lens(model: nn.Module) -> bool:
    """True for a TransformerLens model (hooks by name, ``run_with_cache``)."""
    return hasattr(model, "hook_dict") and hasattr(model, "run_with_cache")


def hook_reader(model: nn.Module, hook_name: str) -> TransformerLensReader | ModuleReader:
    """The reader of ``hook_name``: by hook name on a TransformerLens model, by module
    path on any other (a Hugging Face model)."""
    return (TransformerLensReader if is_transformer_lens(model) else ModuleReader)(model, hook_name)


class MultiHookReader:
    """Reads several hooks of one model from a single forward pass.

    ``read(tokens, attention_mask, kwargs)`` returns ``{hook_name: value [batch, pos,
    ...]}`` in the order of ``hook_names``. A TransformerLens model runs one
    ``run_with_cache`` filtered to the hooks, stopped after the deepest one's layer (the
    whole model when a hook has no layer number); another ``nn.Module`` runs once with a
    forward hook on each module, stopped once every one of them has run. Each name is
    checked as :class:`TransformerLensReader` / :class:`ModuleReader` check one.
    """

    def __init__(self, model: nn.Module, hook_names: list[str]):
        if not hook_names:
            raise ValueError("hook_names must name at least one hook")
        if len(set(hook_names)) != len(hook_names):
            raise ValueError(f"hook_names has duplicates: {hook_names}")
        self.model = model
        self.hook_names = list(hook_names)
        self.is_tl = is_transformer_lens(model)
        reader_cls = TransformerLensReader if self.is_tl else ModuleReader
        self.readers: dict[str, Any] = {h: reader_cls(model, h) for h in self.hook_names}
        first = self.readers[self.hook_names[0]]
        self.max_context = first.max_context
        if self.is_tl:
            stops = [r.stop_at_layer for r in self.readers.values()]
            self.stop_at_layer = None if any(s is None for s in stops) else max(stops)
            self.takes_stop_at_layer = first.takes_stop_at_layer
            self.takes_attention_mask = first.takes_attention_mask

    @property
    def input_device(self) -> torch.device:
        return self.readers[self.hook_names[0]].input_device

    def read(
        self, tokens: Tensor, attention_mask: Tensor | None, kwargs: dict
    ) -> dict[str, Tensor]:
        """tokens ``[batch, pos]`` -> ``{hook_name: value [batch, pos, ...]}``."""
        if self.is_tl:
            return self._read_tl(tokens, attention_mask, kwargs)
        return self._read_modules(tokens, attention_mask, kwargs)

    def _read_tl(
        self, tokens: Tensor, attention_mask: Tensor | None, kwargs: dict
    ) -> dict[str, Tensor]:
        extra: dict[str, Any] = {}
        if self.takes_stop_at_layer and self.stop_at_layer is not None:
            extra["stop_at_layer"] = self.stop_at_layer
        if attention_mask is not None and self.takes_attention_mask:
            extra["attention_mask"] = attention_mask
        _, cache = self.model.run_with_cache(
            tokens, names_filter=list(self.hook_names), **extra, **kwargs
        )
        return {h: cache[h] for h in self.hook_names}

    def _read_modules(
        self, tokens: Tensor, attention_mask: Tensor | None, kwargs: dict
    ) -> dict[str, Tensor]:
        captured: dict[str, Any] = {}
        by_module: dict[int, list[str]] = {}
        for name, reader in self.readers.items():
            by_module.setdefault(id(reader.module), []).append(name)

        def make_hook(names: list[str]) -> Any:
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                value = output[0] if isinstance(output, (tuple, list)) else output
                for name in names:
                    captured.setdefault(name, value)
                if len(captured) == len(self.hook_names):
                    raise _StopForward

            return hook

        handles = [
            self.readers[names[0]].module.register_forward_hook(make_hook(names))
            for names in by_module.values()
        ]
        model = self.model
        was_training = model.training
        model.eval()  # dropout would corrupt the activations
        first = self.readers[self.hook_names[0]]
        try:
            if first.is_hf:
                mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
                model(input_ids=tokens, attention_mask=mask, **kwargs)
            else:
                model(tokens, **kwargs)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        missing = [h for h in self.hook_names if h not in captured]
        if missing:
            raise RuntimeError(f"modules {missing} did not run in the forward pass")
        for name, value in captured.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"module {name!r} returned {type(value).__name__}, not a tensor")
        return {h: captured[h] for h in self.hook_names}
