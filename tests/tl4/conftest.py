"""A tiny Hugging Face GPT-2 folder (random weights, a 50-word tokenizer), built offline
for the TransformerBridge tests: ``TransformerBridge.boot_transformers(folder)`` loads it
as it would a hub model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

VOCAB = 50


def build_tiny_gpt2(folder: Path) -> Path:
    """Save a 2-layer GPT-2 (d_model 16, context 16) and its tokenizer under ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special, eos_token=special, unk_token=special,
        pad_token=special,
    )  # fmt: skip
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=4, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))
