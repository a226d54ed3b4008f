"""fastsae.dashboard.data on a tiny TransformerLens model with the MiniLM tokenizer:
every number written is checked against the full dense activations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dashboard_testing import (
    CTX,
    D_SAE,
    DOCS,
    HOOK,
    NP_ID,
    SETTINGS,
    make_sae,
    minilm_tokenizer,
    tiny_model,
    write_labels,
)  # fmt: skip

from fastsae import cli
from fastsae.dashboard import data
from fastsae.labels import load_feature_labels
from fastsae.training import runner

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture(scope="module")
def sae():
    return make_sae()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n".join(DOCS) + "\n\n")
    return path


@pytest.fixture(scope="module")
def tokens(model, text_file):
    # model.tokenizer: TransformerLens gives the MiniLM tokenizer a BOS token (its [UNK])
    return data.load_token_rows(
        model.tokenizer, text_file=text_file, context_size=CTX, max_tokens=10**6
    )


def dense(sae, model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    return sae.encode(cache[HOOK]).detach()  # [rows, ctx, d_sae]


def read_feature(out: Path, f: int) -> dict:
    return json.loads((out / "data" / "features" / f"{f}.json").read_text())


def test_token_rows_pack_lines(model, tokens, text_file):
    tok = model.tokenizer
    bos = tok.bos_token_id
    assert bos is not None
    # each row: BOS, then the lines' tokens end to end
    ids = tok(DOCS, add_special_tokens=False)["input_ids"]
    flat = [t for doc in ids for t in doc]
    assert tokens.shape == (len(flat) // (CTX - 1), CTX)
    assert (tokens[:, 0] == bos).all()
    assert tokens[:, 1:].flatten().tolist() == flat[: tokens.shape[0] * (CTX - 1)]
    few = data.load_token_rows(tok, text_file=text_file, context_size=CTX, max_tokens=40)
    assert few.shape == (2, CTX) and torch.equal(few, tokens[:2])  # --max-tokens


def test_every_number_matches_dense_activations(sae, model, tokens, tokenizer, tmp_path):
    features = [0, 3, 7, 11, 20, 33, 47]
    labels = load_feature_labels(write_labels(tmp_path / "labels", {3: "the letter x", 47: "dogs"}))
    res = data.write_dashboard_data(
        tmp_path / "out", sae, model, tokens, features, settings=SETTINGS, labels=labels,
        chunk_size=3, show_progress=False,
    )  # fmt: skip
    assert res.computed_chunks == [0, 1, 2] and res.reused_chunks == []
    acts = dense(sae, model, tokens)
    n = tokens.numel()
    meta = json.loads(res.meta_path.read_text())
    assert meta["n_tokens"] == n and meta["n_rows"] == tokens.shape[0]
    assert meta["context_size"] == CTX and meta["sae"]["d_sae"] == D_SAE
    assert [s["feature_index"] for s in meta["features"]] == features
    logits = (sae.W_dec.detach() @ model.W_U.detach()).double()
    fired_any = n_quantile_samples = 0
    for f in features:
        rec = read_feature(tmp_path / "out", f)
        a = acts[..., f]
        nz = a[a != 0].double().numpy()
        assert rec["feature_index"] == f and rec["n_tokens"] == n
        assert rec["n_nonzero"] == len(nz) and rec["frac_nonzero"] == pytest.approx(len(nz) / n)
        assert rec["neuronpedia_url"] == f"https://www.neuronpedia.org/{NP_ID}/{f}"
        assert rec["label"] == {3: "the letter x", 47: "dogs"}.get(f)
        # histogram of non-zero activations over [min(0, min), max(0, max)]
        lo, hi = (min(0.0, nz.min()), max(0.0, nz.max())) if len(nz) else (0.0, 0.0)
        edges = np.asarray(rec["freq_hist_bin_edges"])
        np.testing.assert_allclose(edges, np.linspace(lo, hi, SETTINGS.hist_bins + 1), rtol=1e-6)
        if len(nz):
            fired_any += 1
            counts, _ = np.histogram(nz, bins=edges)
            assert rec["freq_hist_data_bar_heights"] == counts.tolist()
            assert rec["max_activation"] == pytest.approx(nz.max(), rel=1e-6)
        else:
            assert rec["freq_hist_data_bar_heights"] == [0] * SETTINGS.hist_bins
        np.testing.assert_allclose(rec["freq_hist_data_bar_values"], (edges[:-1] + edges[1:]) / 2)
        # top contexts: the largest positive activations, in order, with their windows
        top = [x for x in rec["activations"] if x["kind"] == "top"]
        want = a.flatten().topk(SETTINGS.top_k).values
        want = want[want > 0]
        np.testing.assert_allclose([x["max_value"] for x in top], want.numpy(), rtol=1e-5)
        for x in top + [x for x in rec["activations"] if x["kind"] == "quantile"]:
            r, p = x["row"], x["position"]
            lo_p, hi_p = max(p - SETTINGS.window, 0), min(p + SETTINGS.window + 1, CTX)
            assert x["token_ids"] == tokens[r, lo_p:hi_p].tolist()
            assert x["tokens"] == [tokenizer.decode([t]) for t in x["token_ids"]]
            np.testing.assert_allclose(x["values"], a[r, lo_p:hi_p].numpy(), rtol=1e-5, atol=1e-6)
            assert x["max_value_token_index"] == p - lo_p
            assert x["max_value"] == pytest.approx(float(a[r, p]), rel=1e-5)
        assert all(x["bin_min"] == -1 and x["bin_max"] == -1 for x in top)
        # quantile contexts: min(m, count) distinct samples per interval, inside it
        quant = [x for x in rec["activations"] if x["kind"] == "quantile"]
        q_edges = np.linspace(lo, hi, SETTINGS.n_quantiles + 1)
        in_q = np.clip(np.floor((nz - lo) / (hi - lo) * SETTINGS.n_quantiles), 0,
                       SETTINGS.n_quantiles - 1) if len(nz) else np.array([])  # fmt: skip
        seen_bins = []
        for q in reversed(range(SETTINGS.n_quantiles)):
            got = [x for x in quant if x["bin_min"] == pytest.approx(q_edges[q])]
            n_in = int((in_q == q).sum())
            assert len(got) == min(SETTINGS.quantile_examples, n_in)
            assert len({(x["row"], x["position"]) for x in got}) == len(got)
            for x in got:
                assert x["bin_max"] == pytest.approx(q_edges[q + 1])
                assert q_edges[q] - 1e-6 <= x["max_value"] <= q_edges[q + 1] + 1e-6
                assert x["max_value"] != 0
                assert x["bin_contains"] == pytest.approx(n_in / len(nz))
            assert [x["max_value"] for x in got] == sorted((x["max_value"] for x in got),
                                                           reverse=True)  # fmt: skip
            seen_bins += [q] * len(got)
        assert len(quant) == len(seen_bins)
        n_quantile_samples += len(quant)
        assert [x["kind"] for x in rec["activations"]] == ["top"] * len(top) + ["quantile"] * len(
            quant
        )
        # logit lens
        row = logits[f]
        assert rec["pos_token_ids"] == row.topk(SETTINGS.logit_k).indices.tolist()
        assert rec["neg_token_ids"] == (-row).topk(SETTINGS.logit_k).indices.tolist()
        np.testing.assert_allclose(rec["pos_values"], row.topk(SETTINGS.logit_k).values, rtol=1e-4)
        assert rec["pos_str"] == [tokenizer.decode([t]) for t in rec["pos_token_ids"]]
        assert rec["neg_str"] == [tokenizer.decode([t]) for t in rec["neg_token_ids"]]
        counts, l_edges = np.histogram(row.numpy(), bins=SETTINGS.logit_hist_bins)
        assert rec["logits_hist_data_bar_heights"] == counts.tolist()
        # float32 vs float64 edges: compare at a tolerance of the range, not of each value
        # (a midpoint near 0 has a large relative error)
        np.testing.assert_allclose(
            rec["logits_hist_data_bar_values"], (l_edges[:-1] + l_edges[1:]) / 2,
            rtol=0, atol=1e-5 * float(l_edges[-1] - l_edges[0]),
        )  # fmt: skip
    assert fired_any >= 3 and n_quantile_samples >= 10  # the checks above are not vacuous


def test_quantile_sampling_is_seeded(sae, model, tokens, tmp_path):
    kw = dict(settings=SETTINGS, show_progress=False)
    data.write_dashboard_data(tmp_path / "a", sae, model, tokens, [5, 6], **kw)
    data.write_dashboard_data(tmp_path / "b", sae, model, tokens, [5, 6], **kw)
    assert read_feature(tmp_path / "a", 5) == read_feature(tmp_path / "b", 5)
    reseeded = data.DashboardSettings(**{**SETTINGS.__dict__, "seed": 1})
    data.write_dashboard_data(tmp_path / "c", sae, model, tokens, [5, 6], settings=reseeded,
                              show_progress=False)  # fmt: skip

    def samples(folder):
        recs = [read_feature(folder, f)["activations"] for f in (5, 6)]
        return [(x["row"], x["position"]) for r in recs for x in r if x["kind"] == "quantile"]

    assert samples(tmp_path / "a") and samples(tmp_path / "a") != samples(tmp_path / "c")


def test_resume_recomputes_nothing_finished(sae, model, tokens, tmp_path, monkeypatch):
    real = data.compute_chunk_stats
    calls: list[list[int]] = []

    def interrupted(encoder, toks, ids, settings, **kw):
        if len(calls) == 1:
            raise KeyboardInterrupt  # simulated Ctrl-C in the second chunk
        calls.append(list(ids))
        return real(encoder, toks, ids, settings, **kw)

    monkeypatch.setattr(data, "compute_chunk_stats", interrupted)
    features = list(range(10, 17))
    args = (tmp_path, sae, model, tokens, features)
    kw = dict(settings=SETTINGS, chunk_size=3, show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        data.write_dashboard_data(*args, **kw)
    assert calls == [[10, 11, 12]]
    assert not (tmp_path / "data" / "meta.json").exists()
    assert not (tmp_path / "data" / "features" / "13.json").exists()
    done = {
        f: (tmp_path / "data" / "features" / f"{f}.json").stat().st_mtime_ns for f in (10, 11, 12)
    }

    def counting(encoder, toks, ids, settings, **kw):
        calls.append(list(ids))
        return real(encoder, toks, ids, settings, **kw)

    monkeypatch.setattr(data, "compute_chunk_stats", counting)
    calls.clear()
    res = data.write_dashboard_data(*args, **kw)
    assert calls == [[13, 14, 15], [16]]
    assert res.reused_chunks == [0] and res.computed_chunks == [1, 2]
    for f, mtime in done.items():
        assert (tmp_path / "data" / "features" / f"{f}.json").stat().st_mtime_ns == mtime
    meta = json.loads(res.meta_path.read_text())
    assert [s["feature_index"] for s in meta["features"]] == features
    # the same as one uninterrupted run
    data.write_dashboard_data(tmp_path / "fresh", sae, model, tokens, features, **kw)
    for f in features:
        assert read_feature(tmp_path, f) == read_feature(tmp_path / "fresh", f)
    # a third run computes nothing; other settings recompute everything
    calls.clear()
    assert data.write_dashboard_data(*args, **kw).computed_chunks == []
    other = data.DashboardSettings(**{**SETTINGS.__dict__, "top_k": 2})
    assert data.write_dashboard_data(*args, **{**kw, "settings": other}).computed_chunks == [
        0,
        1,
        2,
    ]


def test_errors_name_the_problem(sae, model, tokens, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"unknown feature indices 48, 99: .*d_sae=48"):
        data.write_dashboard_data(tmp_path, sae, model, tokens, [1, 48, 99], show_progress=False)
    with pytest.raises(ValueError, match=r"d_in=8 but hook 'blocks.1.hook_resid_pre'.* size 16"):
        data.write_dashboard_data(tmp_path, make_sae(8), model, tokens, [0], show_progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt' is empty"):
        data.load_token_rows(tokenizer, text_file=empty, context_size=CTX)
    short = tmp_path / "short.txt"
    short.write_text("two words\n")
    with pytest.raises(ValueError, match="short.txt'.*gave no row of context_size=16"):
        data.load_token_rows(tokenizer, text_file=short, context_size=CTX)
    with pytest.raises(ValueError, match="no tokens"):
        data.write_dashboard_data(tmp_path, sae, model, tokens[:0], [0], show_progress=False)
    bad_hook = make_sae()
    with pytest.raises(ValueError, match="'blocks.9.nope' is not a hook"):
        data.write_dashboard_data(tmp_path, bad_hook, model, tokens, [0], hook_name="blocks.9.nope",
                                  show_progress=False)  # fmt: skip


def test_cli_writes_data_with_labels_and_max_tokens(sae, model, text_file, tmp_path, monkeypatch,
                                                    capsys):  # fmt: skip
    sae_dir = tmp_path / "sae"
    sae.save_model(sae_dir)
    labels = write_labels(tmp_path / "labels", {2: "two"})
    loaded = []

    def load_model_by_name(name, model_class_name, device):
        loaded.append((name, model_class_name, device))
        return model, None

    monkeypatch.setattr(runner, "load_model_by_name", load_model_by_name)
    out = tmp_path / "dash"
    argv = ["dashboard", str(sae_dir), "--model", "tiny", "--text-file", str(text_file),
            "--features", "0-4", "--out", str(out), "--max-tokens", "48", "--context-size",
            str(CTX), "--labels", str(labels), "--chunk-size", "2", "--no-progress",
            "--device", "cpu", "--top-k", "3", "--window", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    assert loaded == [("tiny", "HookedTransformer", "cpu")]
    printed = capsys.readouterr().out
    assert "5 features in 3 chunks (3 computed, 0 already done)" in printed
    assert f"dashboard: {(out / 'index.html').resolve().as_uri()}" in printed
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["n_tokens"] == 48 and meta["n_rows"] == 3 and meta["context_size"] == CTX
    assert meta["labels"] == str(labels) and meta["info"]["text_file"] == str(text_file)
    assert [s["label"] for s in meta["features"]] == [None, None, "two", None, None]
    rec = read_feature(out, 2)
    assert rec["label"] == "two" and rec["neuronpedia_url"].endswith(f"{NP_ID}/2")
    assert all(len(x["values"]) <= 5 for x in rec["activations"])
    assert cli.main(argv) == 0
    assert "(0 computed, 3 already done)" in capsys.readouterr().out
    assert cli.main([*argv[:6], "--features", "40-60", *argv[8:]]) == 2
    assert "60 is out of range; the SAE has 48 features" in capsys.readouterr().err


def test_dataset_source_text_and_token_ids(model, tokens, tmp_path):
    import datasets

    tokenizer = model.tokenizer
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    got = data.load_token_rows(tokenizer, dataset=str(jsonl), column="body", context_size=CTX)
    assert torch.equal(got, tokens)
    folder = tmp_path / "ids"
    datasets.Dataset.from_dict({"input_ids": tokens.tolist()}).save_to_disk(str(folder))
    got = data.load_token_rows(None, dataset=str(folder), column="input_ids", context_size=CTX,
                               max_tokens=3 * CTX)  # fmt: skip
    assert torch.equal(got, tokens[:3])
    with pytest.raises(ValueError, match="has no column 'text'; columns: \\['body'\\]"):
        data.load_token_rows(tokenizer, dataset=str(jsonl), context_size=CTX)
    with pytest.raises(ValueError, match="'local-docstrings' has only the column 'text'"):
        data.load_token_rows(tokenizer, dataset="local-docstrings", column="body")
