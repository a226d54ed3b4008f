"""Building an :class:`~fastsae.training.activations_store.ActivationsStore` from an SAE
(its ``cfg.metadata``) or from a runner config, as SAELens's ``from_sae`` /
``from_config`` do."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from datasets import DatasetDict
from torch import nn

from fastsae.training.text_loading import HfDataset

if TYPE_CHECKING:
    from fastsae.training.activations_store import ActivationsStore


class StoreBuildersMixin:
    """``ActivationsStore.from_sae`` and ``ActivationsStore.from_config``."""

    @classmethod
    def from_sae(
        cls,
        model: nn.Module,
        sae: Any,
        dataset: HfDataset | DatasetDict | str | None = None,
        *,
        context_size: int | None = None,
        streaming: bool = True,
        store_batch_size_prompts: int = 8,
        train_batch_size_tokens: int = 4096,
        n_batches_in_buffer: int = 8,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        **kwargs: Any,
    ) -> ActivationsStore:
        """A store that feeds ``sae`` (fastsae or SAELens): hook_name, hook_head_index,
        prepend_bos, context_size, seqpos_slice and dataset_path come from
        ``sae.cfg.metadata``, d_in and dtype from ``sae.cfg``. ``kwargs`` go to the
        constructor (tokenizer, exclude_special_tokens, seed, ...)."""
        metadata = getattr(sae.cfg, "metadata", None)

        def meta(name: str) -> Any:
            value = getattr(metadata, name, None) if metadata is not None else None
            return value if value is not None else getattr(sae.cfg, name, None)

        hook_name = meta("hook_name")
        if not hook_name:
            raise ValueError("sae.cfg.metadata.hook_name is not set; the store needs it")
        context_size = context_size if context_size is not None else meta("context_size")
        if context_size is None:
            raise ValueError("context_size is not in sae.cfg.metadata; pass context_size=")
        if dataset is None:
            dataset = meta("dataset_path")
            if not dataset:
                raise ValueError("sae.cfg.metadata.dataset_path is not set; pass dataset=")
        prepend_bos = meta("prepend_bos")
        kwargs.setdefault("prepend_bos", True if prepend_bos is None else bool(prepend_bos))
        kwargs.setdefault("seqpos_slice", tuple(meta("seqpos_slice") or (None,)))
        return cls(
            model,
            dataset,
            hook_name=hook_name,
            hook_head_index=meta("hook_head_index"),
            d_in=sae.cfg.d_in,
            context_size=context_size,
            streaming=streaming,
            store_batch_size_prompts=store_batch_size_prompts,
            train_batch_size_tokens=train_batch_size_tokens,
            n_batches_in_buffer=n_batches_in_buffer,
            device=device,
            dtype=dtype if dtype is not None else sae.cfg.dtype,
            **kwargs,
        )

    @classmethod
    def from_config(
        cls,
        model: nn.Module,
        cfg: Any,
        override_dataset: HfDataset | DatasetDict | str | None = None,
        *,
        tokenizer: Any = None,
    ) -> ActivationsStore:
        """A store built from a runner config's fields, read by name (SAELens defaults for
        missing ones). ``d_in`` is ``cfg.sae.d_in`` when the config nests an SAE config."""

        def get(name: str, default: Any = None) -> Any:
            value = getattr(cfg, name, default)
            return default if value is None else value

        dataset = override_dataset if override_dataset is not None else get("dataset_path", "")
        if isinstance(dataset, str) and not dataset:
            raise ValueError("the config has no dataset_path and no override_dataset was given")
        d_in = cfg.sae.d_in if getattr(cfg, "sae", None) is not None else get("d_in")
        device = get("act_store_device") or get("device", "cpu")
        if device == "with_model":
            device = get("llm_device") or get("device", "cpu")
        exclude = get("exclude_special_tokens", False)
        return cls(
            model,
            dataset,
            hook_name=get("hook_name"),
            hook_head_index=getattr(cfg, "hook_head_index", None),
            d_in=d_in,
            context_size=get("context_size", 128),
            train_batch_size_tokens=get("train_batch_size_tokens", 4096),
            store_batch_size_prompts=get("store_batch_size_prompts", 32),
            n_batches_in_buffer=get("n_batches_in_buffer", 20),
            prepend_bos=get("prepend_bos", True),
            # SAELens configs default is_dataset_tokenized=True and its store ignores the
            # field; the column decides here too.
            is_dataset_tokenized=None,
            exclude_special_tokens=list(exclude) if isinstance(exclude, tuple) else exclude,
            seqpos_slice=tuple(get("seqpos_slice", (None,))),
            disable_concat_sequences=get("disable_concat_sequences", False),
            sequence_separator_token=getattr(cfg, "sequence_separator_token", "bos"),
            device=device,
            dtype=get("dtype", "float32"),
            seed=get("seed", 42),
            model_kwargs=get("model_kwargs", None),
            autocast_lm=get("autocast_lm", False),
            streaming=get("streaming", True),
            dataset_trust_remote_code=bool(get("dataset_trust_remote_code", False)),
            tokenizer=tokenizer,
        )
