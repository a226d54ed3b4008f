"""``fastsae.labels`` and ``fastsae labels download`` against a real HTTP server on
127.0.0.1 serving Neuronpedia-shaped responses (and 429s, 500s, malformed JSON, missing
fields, dropped connections, a Ctrl-C mid-run): the files and their exact shape, the
stats, resume, the rate limit, the CLI and the errors. Nothing leaves the loopback."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fastsae.cli import main
from fastsae.labels import (
    FeatureLabel,
    NeuronpediaExportError,
    download_feature_labels,
    find_feature_labels,
    load_feature_labels,
    neuronpedia_url,
    parse_feature_spec,
    width_from_sae_id,
)

RELEASE = "gemma-scope-2b-pt-res-canonical"
SAE_ID = "layer_16/width_16k/canonical"
NP_ID = "gemma-2-2b/16-gemmascope-res-16k"  # the registry's for RELEASE / SAE_ID
FEATURE_PREFIX = f"/api/feature/{NP_ID}/"
EXPORT_PREFIX = f"/exports/{NP_ID}/explanations/"  # exports_url is {server.url}/exports

# fast retries: the backoff is what the tests do not time
FAST = {"backoff_base": 0.01, "max_backoff": 0.05, "show_progress": False, "timeout": 5.0}


def good_body(index: int, explained: bool = True) -> dict:
    return {
        "modelId": "gemma-2-2b",
        "layer": "16-gemmascope-res-16k",
        "index": str(index),
        "explanations": [
            {"description": f" feature {index} text", "typeName": "oai_token-act-pair"}
        ]
        if explained
        else [],
        "pos_str": [f"pos{index}", "the"],
        "neg_str": [f"neg{index}"],
        "maxActApprox": index + 0.5,
        "frac_nonzero": 0.01,
    }


class FakeNeuronpedia:
    """A ThreadingHTTPServer on 127.0.0.1: ``script[index]`` is the list of actions for
    that feature's successive requests (then ``"ok"``); counts requests per path. The
    bulk exports: ``batches[n]`` is the body of ``batch-n.jsonl.gz`` (absent: 404),
    ``batch_script[n]`` the actions of its successive requests (then ``"batch"``)."""

    def __init__(self):
        self.script: dict[int, list[str]] = defaultdict(list)
        self.batch_script: dict[int, list[str]] = defaultdict(list)
        self.batches: dict[int, bytes] = {}
        self.counts: Counter[str] = Counter()
        self.times: list[float] = []
        self.api_keys: list[str | None] = []
        self.export_keys: list[str | None] = []
        self.lock = threading.Lock()
        self.drop_all = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with server.lock:
                    server.counts[self.path] += 1
                    server.times.append(time.monotonic())
                    if self.path.startswith(EXPORT_PREFIX):
                        server.export_keys.append(self.headers.get("x-api-key"))
                        name = self.path[len(EXPORT_PREFIX) :]
                        index = int(name.removeprefix("batch-").removesuffix(".jsonl.gz"))
                        queue = server.batch_script.get(index)
                        action = queue.pop(0) if queue else "batch"
                        server.respond(self, action, index)
                        return
                    server.api_keys.append(self.headers.get("x-api-key"))
                    if not self.path.startswith(FEATURE_PREFIX):
                        action = "404"
                        index = -1
                    else:
                        index = int(self.path[len(FEATURE_PREFIX) :])
                        queue = server.script.get(index)
                        action = queue.pop(0) if queue else "ok"
                    if server.drop_all:
                        action = "drop"
                server.respond(self, action, index)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def respond(self, h: BaseHTTPRequestHandler, action: str, index: int) -> None:
        def send(status: int, body: bytes, **headers: str) -> None:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body)

        if action == "drop":  # close the socket without a response
            h.close_connection = True
            return
        if action in ("batch", "batch-encoded", "interrupt-batch"):
            body = self.batches.get(index)
            if body is None:
                send(404, b"<Error><Code>NoSuchKey</Code></Error>")
                return
            if action == "interrupt-batch":  # Ctrl-C the client while it waits for the batch
                os.kill(os.getpid(), signal.SIGINT)
            headers = {"Content-Encoding": "gzip"} if action == "batch-encoded" else {}
            with contextlib.suppress(OSError):  # an interrupted client is gone
                send(200, body, **headers)
            return
        if action in ("429", "429-1"):
            wait = "1" if action == "429-1" else "0"
            send(429, b'{"error": "rate limited"}', **{"Retry-After": wait})
        elif action in ("500", "503", "400", "404", "401", "403"):
            send(int(action), b'{"error": "x"}')
        elif action == "malformed":
            send(200, b'{"explanations": [')
        elif action == "missing":
            body = good_body(index)
            del body["maxActApprox"]
            send(200, json.dumps(body).encode())
        elif action == "noexp":
            send(200, json.dumps(good_body(index, explained=False)).encode())
        elif action == "interrupt":  # answer, then Ctrl-C the client process
            send(200, json.dumps(good_body(index)).encode())
            os.kill(os.getpid(), signal.SIGINT)
        else:
            send(200, json.dumps(good_body(index)).encode())

    def feature_count(self, index: int) -> int:
        return self.counts[f"{FEATURE_PREFIX}{index}"]

    def batch_count(self, n: int) -> int:
        return self.counts[f"{EXPORT_PREFIX}batch-{n}.jsonl.gz"]

    def api_count(self) -> int:
        return sum(c for path, c in self.counts.items() if path.startswith(FEATURE_PREFIX))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeNeuronpedia()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.delenv("NEURONPEDIA_API_KEY", raising=False)
    monkeypatch.delenv("NEURONPEDIA_API_URL", raising=False)
    monkeypatch.delenv("NEURONPEDIA_EXPORTS_URL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # an empty Hugging Face cache: the width of an SAE comes only from what a test puts there
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def labels_path(out: Path) -> Path:
    return out / RELEASE / SAE_ID / "feature_labels.json"


def test_download_shape_stats_and_failures(server, tmp_path):
    out = tmp_path / "labels"
    server.script.update(
        {
            1: ["429", "429"],  # retried, honouring Retry-After: 0
            2: ["500", "503"],  # retried
            3: ["malformed"],  # failed, not retried
            4: ["missing"],  # failed
            5: ["noexp"],  # successful, without description
            6: ["drop"],  # connection dropped mid-run: retried
            7: ["500"] * 10,  # failed after the retries
            8: ["404"],  # failed
        }
    )
    res = download_feature_labels(
        RELEASE,
        SAE_ID,
        out=out,
        features="0-9",
        api_url=server.url,
        api_key="secret",
        requests_per_second=1000,
        max_retries=3,
        **FAST,
    )
    assert res.folder == out / RELEASE / SAE_ID
    data = json.loads(labels_path(out).read_text())
    assert list(data) == ["sae_info", "features", "stats"]
    info = data["sae_info"]
    assert list(info) == ["release", "sae_id", "neuronpedia_id", "num_features", "downloaded_at"]
    assert info["release"] == RELEASE and info["sae_id"] == SAE_ID
    assert info["neuronpedia_id"] == NP_ID and info["num_features"] == 16384
    assert time.strptime(info["downloaded_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert list(data["features"]) == ["0", "1", "2", "5", "6", "9"]
    assert data["features"]["0"] == {
        "description": " feature 0 text",
        "top_positive_tokens": ["pos0", "the"],
        "top_negative_tokens": ["neg0"],
        "max_activation": 0.5,
        "has_explanations": True,
    }
    assert data["features"]["5"]["description"] is None
    assert data["features"]["5"]["has_explanations"] is False
    assert data["features"]["5"]["top_positive_tokens"] == ["pos5", "the"]
    assert data["stats"] == {
        "total_features": 10,
        "with_descriptions": 5,
        "successful": 6,
        "failed": 4,
    }
    meta = json.loads((res.folder / "metadata.json").read_text())
    assert meta["sae_info"] == info and meta["stats"] == data["stats"]
    assert meta["failed_features"] == [3, 4, 7, 8]
    assert "malformed JSON" in meta["errors"]["3"]
    assert "maxActApprox" in meta["errors"]["4"]
    assert meta["errors"]["7"] == "HTTP 500 after 3 retries"
    assert meta["errors"]["8"] == "HTTP 404"
    assert res.failed == [3, 4, 7, 8] and res.fetched == 10 and res.already_had == 0
    # requests: retried kinds retried, others asked once
    assert server.feature_count(1) == 3 and server.feature_count(2) == 3
    assert server.feature_count(6) == 2 and server.feature_count(7) == 4
    assert server.feature_count(3) == 1 and server.feature_count(8) == 1
    assert set(server.api_keys) == {"secret"}
    assert not [p for p in res.folder.iterdir() if p.name.endswith(".tmp")]

    # reading back
    labels = load_feature_labels(RELEASE, SAE_ID, root=out)
    assert len(labels) == 6 and sorted(labels) == [0, 1, 2, 5, 6, 9]
    assert labels[9] == FeatureLabel(" feature 9 text", ["pos9", "the"], ["neg9"], 9.5, True)
    assert labels.failed == [3, 4, 7, 8]
    assert labels.stats["failed"] == 4 and labels.sae_info["num_features"] == 16384
    assert labels.url(9) == f"https://www.neuronpedia.org/{NP_ID}/9"
    with pytest.raises(KeyError, match="feature 3 .*failed"):
        labels[3]
    with pytest.raises(KeyError, match="feature 100 .*not downloaded"):
        labels[100]
    assert load_feature_labels(res.folder)[0].description == " feature 0 text"
    assert load_feature_labels(res.labels_path).stats == data["stats"]
    found = find_feature_labels(NP_ID, root=out)
    assert found is not None and found.path == res.labels_path and sorted(found) == sorted(labels)
    assert find_feature_labels("gpt2-small/8-res-jb", root=out) is None
    assert find_feature_labels(NP_ID, root=tmp_path / "nothing-here") is None
    # a real SAE carrying the registry's neuronpedia id (as SAE.from_pretrained sets it)
    from fastsae import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=4, d_sae=8)
    cfg.metadata.neuronpedia_id = NP_ID
    sae = StandardSAE(cfg)
    assert find_feature_labels(sae, root=out)[9].description == " feature 9 text"
    assert neuronpedia_url(sae, 9) == labels.url(9)

    # a later run retries only the failed ones
    server.counts.clear()
    server.script.clear()
    res2 = download_feature_labels(
        RELEASE, SAE_ID, out=out, features="0-9", api_url=server.url, **FAST
    )
    assert sorted(server.counts) == sorted(f"{FEATURE_PREFIX}{i}" for i in (3, 4, 7, 8))
    assert res2.failed == [] and res2.fetched == 4 and res2.already_had == 6
    assert json.loads(labels_path(out).read_text())["stats"] == {
        "total_features": 10,
        "with_descriptions": 9,
        "successful": 10,
        "failed": 0,
    }


def test_resume_after_ctrl_c_and_kill(server, tmp_path):
    out = tmp_path / "labels"
    server.script[5] = ["interrupt"]
    with pytest.raises(KeyboardInterrupt):
        download_feature_labels(
            RELEASE,
            SAE_ID,
            out=out,
            features="0-39",
            api_url=server.url,
            requests_per_second=200,
            workers=1,
            **FAST,
        )
    folder = out / RELEASE / SAE_ID
    assert not (folder / "feature_labels.json").exists()  # only a finished run writes it
    lines = (folder / "progress.jsonl").read_text().splitlines()
    got = [json.loads(line)["index"] for line in lines[1:]]
    assert 5 <= len(got) < 40 and got == list(range(len(got)))
    had = {f"{FEATURE_PREFIX}{i}" for i in got}
    # a kill in the middle of a line: that line is ignored, the feature fetched again
    with open(folder / "progress.jsonl", "a") as f:
        f.write('{"index": 39, "ok": tr')

    server.counts.clear()
    res = download_feature_labels(
        RELEASE, SAE_ID, out=out, features="0-39", api_url=server.url, requests_per_second=1000,
        **FAST,
    )  # fmt: skip
    assert not set(server.counts) & had  # nothing it had is fetched again
    assert sum(server.counts.values()) == 40 - len(got)
    assert res.already_had == len(got) and res.stats["successful"] == 40
    assert sorted(map(int, json.loads(res.labels_path.read_text())["features"])) == list(range(40))
    # a third run has nothing to fetch
    server.counts.clear()
    res = download_feature_labels(
        RELEASE, SAE_ID, out=out, features="0-39", api_url=server.url, **FAST
    )
    assert sum(server.counts.values()) == 0 and res.stats["successful"] == 40


def test_network_loss_stops_then_resumes(server, tmp_path):
    out = tmp_path / "labels"
    server.drop_all = True
    with pytest.raises(ConnectionError, match="3 features in a row failed to connect"):
        download_feature_labels(
            RELEASE,
            SAE_ID,
            out=out,
            features="0-19",
            api_url=server.url,
            workers=1,
            max_retries=1,
            max_consecutive_failures=3,
            requests_per_second=1000,
            **FAST,
        )
    assert server.feature_count(19) == 0  # it stopped instead of failing every feature
    server.drop_all = False
    server.counts.clear()
    res = download_feature_labels(
        RELEASE, SAE_ID, out=out, features="0-19", api_url=server.url, requests_per_second=1000,
        **FAST,
    )  # fmt: skip
    assert res.stats == {"total_features": 20, "with_descriptions": 20, "successful": 20,
                         "failed": 0}  # fmt: skip
    assert all(server.feature_count(i) == 1 for i in range(20))


def test_rate_limit(server, tmp_path):
    n, rate = 12, 20.0
    t0 = time.monotonic()
    download_feature_labels(
        RELEASE,
        SAE_ID,
        out=tmp_path,
        features=f"0-{n - 1}",
        api_url=server.url,
        requests_per_second=rate,
        workers=4,
        **FAST,
    )
    assert time.monotonic() - t0 >= (n - 1) / rate
    assert len(server.times) == n
    gaps = [b - a for a, b in zip(server.times, server.times[1:], strict=False)]
    assert server.times[-1] - server.times[0] >= (n - 1) / rate * 0.9
    assert min(gaps) >= 0.5 / rate  # evenly spaced, not a burst


def test_retry_after_is_honoured_by_every_worker(server, tmp_path):
    server.script[0] = ["429-1"]
    res = download_feature_labels(
        RELEASE, SAE_ID, out=tmp_path, features="0-5", api_url=server.url, workers=2,
        requests_per_second=1000, **FAST,
    )  # fmt: skip
    assert res.stats["successful"] == 6 and server.feature_count(0) == 2
    gaps = [b - a for a, b in zip(server.times, server.times[1:], strict=False)]
    # after the 429 no request started for a second (the backoff alone is 0.01 s)
    assert max(gaps) >= 0.9
    assert server.times[-1] - server.times[0] >= 0.9


def test_width_from_cached_cfg_and_num_features(server, tmp_path):
    from huggingface_hub import constants

    release, sae_id = "gpt2-small-res-jb", "blocks.8.hook_resid_pre"
    with pytest.raises(ValueError, match="cannot know the number of features .*--num-features"):
        download_feature_labels(release, sae_id, out=tmp_path, api_url=server.url, **FAST)
    # --num-features gives it
    res = download_feature_labels(
        release, sae_id, out=tmp_path, features="2", num_features=24576, api_url=server.url,
        **FAST,
    )  # fmt: skip
    assert res.stats["total_features"] == 1
    assert json.loads(res.labels_path.read_text())["sae_info"]["num_features"] == 24576
    # gpt2-small/8-res-jb is not NP_ID: that server answers 404 (failed, listed)
    assert res.failed == [2]
    # a cfg.json in the Hugging Face cache gives it too
    repo = Path(constants.HF_HUB_CACHE) / "models--jbloom--GPT2-Small-SAEs-Reformatted"
    snap = repo / "snapshots" / "abc123" / sae_id
    snap.mkdir(parents=True)
    (snap / "cfg.json").write_text(json.dumps({"d_sae": 24576, "d_in": 768}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    res = download_feature_labels(
        release, sae_id, out=tmp_path / "b", features="0", api_url=server.url, **FAST
    )
    assert json.loads(res.labels_path.read_text())["sae_info"]["num_features"] == 24576
    with pytest.raises(ValueError, match="--num-features 100 contradicts .* 24576"):
        download_feature_labels(release, sae_id, out=tmp_path, num_features=100, **FAST)


def test_errors(server, tmp_path):
    with pytest.raises(ValueError, match="release 'gemma-scope-2b-pt-res-canonicall' is not in"):
        download_feature_labels(RELEASE + "l", SAE_ID, out=tmp_path, **FAST)
    with pytest.raises(ValueError, match="did you mean gemma-scope-2b-pt-res-canonical"):
        download_feature_labels(RELEASE + "l", SAE_ID, out=tmp_path, **FAST)
    with pytest.raises(ValueError, match="sae_id 'layer_99/width_16k/canonical' is not in"):
        download_feature_labels(RELEASE, "layer_99/width_16k/canonical", out=tmp_path, **FAST)
    no_np = ("gemma-scope-2-4b-pt-transcoders-all", "layer_0_width_16k_l0_big")
    with pytest.raises(ValueError, match="no neuronpedia id .*--neuronpedia-id"):
        download_feature_labels(*no_np, out=tmp_path, **FAST)
    with pytest.raises(ValueError, match="'nomodel' is not 'modelId/sourceId'"):
        download_feature_labels(*no_np, neuronpedia_id="nomodel", out=tmp_path, **FAST)
    with pytest.raises(ValueError, match="'x' is not an index or a range"):
        download_feature_labels(RELEASE, SAE_ID, out=tmp_path, features="0-3,x", **FAST)
    with pytest.raises(ValueError, match="16384 is out of range; the SAE has 16384"):
        download_feature_labels(RELEASE, SAE_ID, out=tmp_path, features="16384", **FAST)
    with pytest.raises(PermissionError, match="HTTP 401.*API key"):
        server.script[0] = ["401"]
        download_feature_labels(
            RELEASE, SAE_ID, out=tmp_path, features="0", api_url=server.url, **FAST
        )
    # a progress file of another SAE in the same folder is not mixed in
    folder = tmp_path / RELEASE / SAE_ID
    with pytest.raises(ValueError, match="written for neuronpedia_id"):
        download_feature_labels(
            RELEASE, SAE_ID, out=tmp_path, features="0", neuronpedia_id="other/src",
            api_url=server.url, **FAST,
        )  # fmt: skip
    assert (folder / "progress.jsonl").is_file()
    with pytest.raises(FileNotFoundError, match="no feature labels at .*labels download"):
        load_feature_labels(RELEASE, "layer_1/width_16k/canonical", root=tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sae_info": {}, "features": {}, "stats": {}}))
    with pytest.raises(ValueError, match="sae_info: missing release"):
        load_feature_labels(bad)


def test_feature_spec_width_and_url(tmp_path):
    assert parse_feature_spec("0-3, 7,2,10-10", 16) == [0, 1, 2, 3, 7, 10]
    for bad, match in [("", "'' is not"), ("3-1", "ends before"), ("-1", "'-1' is not"),
                       ("1,,2", "'' is not"), ("16", "out of range")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            parse_feature_spec(bad, 16)
    assert width_from_sae_id("layer_16/width_16k/canonical") == 16384
    assert width_from_sae_id("layer_0_width_16k_l0_big") == 16384
    assert width_from_sae_id("layer_3/width_1m/average_l0_27") == 1 << 20
    assert width_from_sae_id("layer_3/width_65k/x") == 65536
    assert width_from_sae_id("layer_3/width_131k/x") == 131072
    assert width_from_sae_id("layer_3/width_10k/x") is None  # no power of two rounds to it
    assert width_from_sae_id("blocks.8.hook_resid_pre") is None
    assert (
        neuronpedia_url(NP_ID, 7)
        == "https://www.neuronpedia.org/gemma-2-2b/16-gemmascope-res-16k/7"
    )

    class Meta:
        neuronpedia_id = "gpt2-small/8-res-jb"

    class Cfg:
        metadata = Meta()

    class FakeSAE:
        cfg = Cfg()

    assert neuronpedia_url(FakeSAE(), 3) == "https://www.neuronpedia.org/gpt2-small/8-res-jb/3"
    assert find_feature_labels(FakeSAE(), root=tmp_path) is None
    Meta.neuronpedia_id = None
    with pytest.raises(ValueError, match="FakeSAE has no cfg.metadata.neuronpedia_id"):
        neuronpedia_url(FakeSAE(), 3)
    with pytest.raises(ValueError, match="is not 'modelId/sourceId'"):
        neuronpedia_url("a/b/c", 3)


def test_cli(server, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    monkeypatch.setenv("NEURONPEDIA_API_URL", server.url)
    monkeypatch.setenv("NEURONPEDIA_API_KEY", "env-key")
    server.script[3] = ["404"]
    argv = ["labels", "download", "--release", RELEASE, "--sae-id", SAE_ID, "--out", str(out),
            "--features", "0-4", "--requests-per-second", "1000", "--no-progress",
            "--max-retries", "1"]  # fmt: skip
    assert main(argv) == 1  # a failed feature: non-zero, and named
    captured = capsys.readouterr()
    assert "4 of 5 features labelled" in captured.out
    assert "failed features: 3" in captured.err
    assert set(server.api_keys) == {"env-key"}
    meta = json.loads((out / RELEASE / SAE_ID / "metadata.json").read_text())
    assert meta["failed_features"] == [3]
    assert main(argv) == 0  # the retry fetches feature 3 only
    assert server.feature_count(3) == 2 and server.feature_count(0) == 1
    assert "fetched 1 now, 4 already downloaded" in capsys.readouterr().out
    data = json.loads(labels_path(out).read_text())
    assert data["stats"] == {"total_features": 5, "with_descriptions": 5, "successful": 5,
                             "failed": 0}  # fmt: skip
    assert data["sae_info"]["neuronpedia_id"] == NP_ID

    assert main([*argv[:9], "1-x", "--no-progress"]) == 2
    assert "labels: error: --features '1-x': '1-x' is not an index" in capsys.readouterr().err
    assert main(["labels", "download", "--release", "nope", "--sae-id", SAE_ID,
                 "--out", str(out)]) == 2  # fmt: skip
    assert "release 'nope' is not in the pretrained SAE registry" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["labels", "download", "--release", RELEASE])  # --sae-id is required

    # Ctrl-C: exit 130, what was fetched kept; the rerun fetches only the rest
    server.counts.clear()
    server.script[12] = ["interrupt"]
    argv = [*argv[:9], "10-19", "--no-progress", "--workers", "1"]
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert server.feature_count(10) == 1 and server.feature_count(19) == 0
    assert main(argv) == 0
    assert server.feature_count(10) == 1 and server.feature_count(19) == 1
    assert json.loads(labels_path(out).read_text())["stats"]["total_features"] == 15


# --------------------------------------------------------------------------- bulk exports


def export_line(index: int, text: str | None = None, *, int_index: bool = False) -> dict:
    return {
        "modelId": "gemma-2-2b",
        "layer": "16-gemmascope-res-16k",
        "index": index if int_index else str(index),
        "description": f" export {index}" if text is None else text,
        "explanationModelName": "gpt-4o-mini",
        "typeName": "oai_token-act-pair",
    }


def gz_lines(records: list) -> bytes:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    return gzip.compress(text.encode())


def bulk_label(text: str) -> dict:
    """A feature labelled from an export: its description only."""
    return {
        "description": text,
        "top_positive_tokens": [],
        "top_negative_tokens": [],
        "max_activation": None,
        "has_explanations": True,
    }


def bulk(server: FakeNeuronpedia, **kwargs) -> dict:
    return {
        "bulk": True,
        "exports_url": f"{server.url}/exports",
        "api_url": server.url,
        "requests_per_second": 1000,
        **FAST,
        **kwargs,
    }


def test_bulk_download_shape_and_missing_features_via_api(server, tmp_path):
    out = tmp_path / "labels"
    server.batches[0] = gz_lines(
        [
            export_line(0),
            export_line(1),
            export_line(3, " first of 3"),
            export_line(2, int_index=True),
            export_line(3, " second of 3"),  # several explanations: the first is kept
            export_line(100),  # not requested: not in the file
        ]
    )
    server.batches[1] = gz_lines(
        [export_line(4), export_line(5), "", export_line(6), export_line(1, " again"),
         export_line(8, "")]
    )  # fmt: skip
    server.batch_script[1] = ["batch-encoded"]  # a server that sets Content-Encoding: gzip
    server.script[9] = ["404"]  # 7 and 9 are in no batch: asked through the API
    res = download_feature_labels(
        RELEASE, SAE_ID, out=out, features="0-9", api_key="secret", **bulk(server)
    )
    data = json.loads(labels_path(out).read_text())
    assert list(data) == ["sae_info", "features", "stats"]
    assert list(data["sae_info"]) == [
        "release", "sae_id", "neuronpedia_id", "num_features", "downloaded_at"
    ]  # fmt: skip
    assert data["sae_info"]["neuronpedia_id"] == NP_ID
    assert data["features"] == {
        "0": bulk_label(" export 0"),
        "1": bulk_label(" export 1"),
        "2": bulk_label(" export 2"),
        "3": bulk_label(" first of 3"),
        "4": bulk_label(" export 4"),
        "5": bulk_label(" export 5"),
        "6": bulk_label(" export 6"),
        "7": {
            "description": " feature 7 text",
            "top_positive_tokens": ["pos7", "the"],
            "top_negative_tokens": ["neg7"],
            "max_activation": 7.5,
            "has_explanations": True,
        },
        "8": bulk_label(""),
    }
    assert data["stats"] == {
        "total_features": 10,
        "with_descriptions": 8,  # 8's description is empty
        "successful": 9,
        "failed": 1,
    }
    meta = json.loads(res.metadata_path.read_text())
    assert meta["failed_features"] == [9] and meta["errors"] == {"9": "HTTP 404"}
    assert res.batches == 2 and res.fetched == 8 + 2 and res.already_had == 0
    assert [server.batch_count(n) for n in range(4)] == [1, 1, 1, 0]  # batch-2: 404, the end
    assert server.api_count() == 2 and server.feature_count(7) == server.feature_count(9) == 1
    assert set(server.api_keys) == {"secret"}  # the API key goes to the API only
    assert set(server.export_keys) == {None}
    assert not [p for p in res.folder.iterdir() if p.name.endswith(".tmp")]
    labels = load_feature_labels(RELEASE, SAE_ID, root=out)
    assert labels[3] == FeatureLabel(" first of 3", [], [], None, True)

    # a rerun asks only for the failed feature (no batch: the export's end is known)
    server.counts.clear()
    res = download_feature_labels(RELEASE, SAE_ID, out=out, features="0-9", **bulk(server))
    assert dict(server.counts) == {f"{FEATURE_PREFIX}9": 1}
    assert res.batches == 0 and res.fetched == 1 and res.stats["failed"] == 0


def test_bulk_bad_batches_name_the_url_and_line(server, tmp_path):
    good = gz_lines([export_line(i) for i in range(5)])
    batch1 = f"{server.url}{EXPORT_PREFIX}batch-1.jsonl.gz"
    cases = [
        (b"\x1f\x8b\x08\x00garbage" * 3, "batch-1.jsonl.gz: corrupt gzip data"),
        (gzip.compress(b"x" * 100)[:-12], "batch-1.jsonl.gz: corrupt gzip data"),  # truncated
        (b'{"index": "5", "description": "plain"}\n', "batch-1.jsonl.gz: not a gzip file"),
        (gz_lines([export_line(5), '{"index": "6", "descr']),
         "batch-1.jsonl.gz line 2: not JSON"),
        (gz_lines([export_line(5), {"index": "6"}]), "batch-1.jsonl.gz line 2: no description"),
        (gz_lines([["6", "x"]]), "line 1: not a JSON object but list"),
        (gz_lines([export_line(5), {"index": "six", "description": "x"}]),
         "line 2: index 'six' is not a feature index"),
        (gz_lines([{"index": 16384, "description": "x"}]),
         "line 1: feature 16384 is out of range; the SAE has 16384"),
        (gz_lines([{"index": 1, "description": None}]), "line 1: description is not a string"),
        (gz_lines([{**export_line(6), "layer": "20-gemmascope-res-16k"}]),
         "line 1: layer '20-gemmascope-res-16k' is not this SAE's"),
    ]  # fmt: skip
    for n, (body, match) in enumerate(cases):
        out = tmp_path / str(n)
        server.counts.clear()
        server.batches.update({0: good, 1: body})
        with pytest.raises(NeuronpediaExportError, match=match) as e:
            download_feature_labels(RELEASE, SAE_ID, out=out, features="0-9", **bulk(server))
        assert batch1 in str(e.value)
        assert not labels_path(out).exists()  # a stopped run writes no final file
        # the batch before is kept: fixed, the rerun does not fetch it again
        server.batches[1] = gz_lines([export_line(i) for i in range(5, 10)])
        res = download_feature_labels(RELEASE, SAE_ID, out=out, features="0-9", **bulk(server))
        assert server.batch_count(0) == 1 and server.batch_count(1) == 2
        assert res.stats["successful"] == 10 and res.batches == 1 and res.already_had == 5
        assert server.api_count() == 0

    # no export at all: an error, not 16k API requests
    server.batches.clear()
    server.counts.clear()
    with pytest.raises(NeuronpediaExportError, match="no explanations export of .*HTTP 404"):
        download_feature_labels(RELEASE, SAE_ID, out=tmp_path / "none", **bulk(server))
    assert server.api_count() == 0
    # another HTTP error of a batch is not the end of the export
    server.batches[0] = good
    server.batch_script[1] = ["400"]
    with pytest.raises(NeuronpediaExportError, match=r"batch-1.jsonl.gz: HTTP 400"):
        download_feature_labels(RELEASE, SAE_ID, out=tmp_path / "400", **bulk(server))
    server.batch_script[1] = ["403"]
    with pytest.raises(PermissionError, match=r"batch-1.jsonl.gz \(HTTP 403\).*--exports-url"):
        download_feature_labels(RELEASE, SAE_ID, out=tmp_path / "403", **bulk(server))


def test_bulk_retries_429_and_5xx(server, tmp_path):
    out = tmp_path / "labels"
    server.batches[0] = gz_lines([export_line(i) for i in range(5)])
    server.batches[1] = gz_lines([export_line(i) for i in range(5, 10)])
    server.batch_script[0] = ["429", "503"]  # retried (Retry-After: 0), then served
    server.batch_script[1] = ["500"] * 10  # still failing after the retries: stops the run
    with pytest.raises(ConnectionError, match="batch-1.jsonl.gz: HTTP 500 after 2 retries.*"
                       "run again to resume"):  # fmt: skip
        download_feature_labels(
            RELEASE, SAE_ID, out=out, features="0-9", **bulk(server, max_retries=2)
        )
    assert server.batch_count(0) == 3 and server.batch_count(1) == 3
    server.batch_script.clear()
    server.counts.clear()
    res = download_feature_labels(RELEASE, SAE_ID, out=out, features="0-9", **bulk(server))
    assert server.batch_count(0) == 0 and server.batch_count(1) == 1
    assert res.stats["successful"] == 10 and server.api_count() == 0
    # a Retry-After on a batch is honoured
    server.counts.clear()
    server.times.clear()
    server.batch_script[0] = ["429-1"]
    download_feature_labels(RELEASE, SAE_ID, out=tmp_path / "b", features="0-4", **bulk(server))
    assert server.batch_count(0) == 2 and server.times[1] - server.times[0] >= 0.9


def test_bulk_resume_after_ctrl_c(server, tmp_path):
    out = tmp_path / "labels"
    for n in range(3):
        server.batches[n] = gz_lines([export_line(i) for i in range(10 * n, 10 * n + 10)])
    server.batch_script[1] = ["interrupt-batch"]
    with pytest.raises(KeyboardInterrupt):
        download_feature_labels(RELEASE, SAE_ID, out=out, features="0-29", **bulk(server))
    folder = out / RELEASE / SAE_ID
    assert not (folder / "feature_labels.json").exists()
    records = [json.loads(line) for line in (folder / "progress.jsonl").read_text().splitlines()]
    assert [r.get("index") for r in records[1:11]] == list(range(10))
    assert records[11] == {"batch": 0, "url": f"{server.url}{EXPORT_PREFIX}batch-0.jsonl.gz",
                           "indices": list(range(10))}  # fmt: skip
    assert len(records) == 12  # batch 1 was cut short: not recorded
    # a kill in the middle of the batch line: that batch is fetched again
    with open(folder / "progress.jsonl", "a") as f:
        f.write('{"index": 10, "ok": true, "label": {"description": "x", "top_')

    res = download_feature_labels(RELEASE, SAE_ID, out=out, features="0-29", **bulk(server))
    # batch 0 not again; batch 2 held the last of 0-29: batch 3 not asked for
    assert [server.batch_count(n) for n in range(4)] == [1, 2, 1, 0]
    assert res.already_had == 10 and res.fetched == 20 and res.batches == 2
    assert res.stats["successful"] == 30 and server.api_count() == 0
    # nothing left to fetch: no request at all
    server.counts.clear()
    res = download_feature_labels(RELEASE, SAE_ID, out=out, features="0-29", **bulk(server))
    assert sum(server.counts.values()) == 0 and res.stats["successful"] == 30
    # more features, in no batch: the finished batches are not fetched again, batch 3 is
    # (a 404: the end), then the API is asked
    res = download_feature_labels(RELEASE, SAE_ID, out=out, features="0-34", **bulk(server))
    assert dict(server.counts) == {
        f"{EXPORT_PREFIX}batch-3.jsonl.gz": 1,
        **{f"{FEATURE_PREFIX}{i}": 1 for i in range(30, 35)},
    }
    assert res.stats["successful"] == 35 and res.batches == 0
    # and now the end is known: no batch at all
    server.counts.clear()
    res = download_feature_labels(RELEASE, SAE_ID, out=out, features="0-39", **bulk(server))
    assert sorted(server.counts) == sorted(f"{FEATURE_PREFIX}{i}" for i in range(35, 40))
    assert res.stats["successful"] == 40


def test_bulk_subset_stops_early_and_widens(server, tmp_path):
    out = tmp_path / "labels"
    for n in range(2):
        server.batches[n] = gz_lines([export_line(i) for i in range(10 * n, 10 * n + 10)])
    res = download_feature_labels(RELEASE, SAE_ID, out=out, features="2-4", **bulk(server))
    assert [server.batch_count(n) for n in range(3)] == [1, 0, 0]  # all found in batch 0
    assert sorted(map(int, json.loads(res.labels_path.read_text())["features"])) == [2, 3, 4]
    # a wider request needs batch 0's other features: it is read again, then batch 1
    res = download_feature_labels(RELEASE, SAE_ID, out=out, features="0-19", **bulk(server))
    assert [server.batch_count(n) for n in range(3)] == [2, 1, 0]
    assert res.already_had == 3 and res.fetched == 17 and res.stats["successful"] == 20
    # an API-labelled feature keeps its richer label in bulk mode
    api_out = tmp_path / "api"
    download_feature_labels(RELEASE, SAE_ID, out=api_out, features="5", api_url=server.url,
                            **FAST)  # fmt: skip
    res = download_feature_labels(RELEASE, SAE_ID, out=api_out, features="4-6", **bulk(server))
    labels = load_feature_labels(res.labels_path)
    assert labels[5].top_positive_tokens == ["pos5", "the"] and labels[5].max_activation == 5.5
    assert labels[4] == FeatureLabel(" export 4", [], [], None, True)


def test_bulk_cli_and_env(server, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    monkeypatch.setenv("NEURONPEDIA_API_URL", server.url)
    monkeypatch.setenv("NEURONPEDIA_EXPORTS_URL", f"{server.url}/exports/")
    server.batches[0] = gz_lines([export_line(i) for i in range(3)])
    argv = ["labels", "download", "--release", RELEASE, "--sae-id", SAE_ID, "--out", str(out),
            "--features", "0-4", "--requests-per-second", "1000", "--no-progress", "--bulk"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "5 of 5 features labelled" in printed
    assert "fetched 5 now, 1 export batches, 0 already downloaded" in printed
    assert [server.batch_count(n) for n in range(3)] == [1, 1, 0]
    assert server.api_count() == 2 and server.feature_count(3) == 1
    data = json.loads(labels_path(out).read_text())
    assert data["features"]["0"] == bulk_label(" export 0")
    assert data["features"]["3"]["max_activation"] == 3.5  # from the API

    # --exports-url wins over the environment; a bad batch: exit 2, the batch named
    monkeypatch.setenv("NEURONPEDIA_EXPORTS_URL", f"{server.url}/nowhere")
    server.batches[0] = b"not gzip"
    argv = [*argv[:7], str(tmp_path / "cli2"), *argv[8:], "--exports-url", f"{server.url}/exports"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{server.url}{EXPORT_PREFIX}batch-0.jsonl.gz: not a gzip file" in err
    assert not [p for p in server.counts if p.startswith("/nowhere")]
    assert main([a for a in argv if a != "--bulk"]) == 2  # --exports-url without --bulk
    assert "--exports-url is where --bulk reads" in capsys.readouterr().err

    # the Python call reads the environment too
    monkeypatch.setenv("NEURONPEDIA_EXPORTS_URL", f"{server.url}/exports")
    server.batches[0] = gz_lines([export_line(7)])
    res = download_feature_labels(
        RELEASE, SAE_ID, out=tmp_path / "py", features="7", bulk=True, **FAST
    )
    assert res.batches == 1 and res.stats["with_descriptions"] == 1 and server.api_count() == 2
