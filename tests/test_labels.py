"""``fastsae.labels`` and ``fastsae labels download`` against a real HTTP server on
127.0.0.1 serving Neuronpedia-shaped responses (and 429s, 500s, malformed JSON, missing
fields, dropped connections, a Ctrl-C mid-run): the files and their exact shape, the
stats, resume, the rate limit, the CLI and the errors. Nothing leaves the loopback."""

from __future__ import annotations

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
    that feature's successive requests (then ``"ok"``); counts requests per path."""

    def __init__(self):
        self.script: dict[int, list[str]] = defaultdict(list)
        self.counts: Counter[str] = Counter()
        self.times: list[float] = []
        self.api_keys: list[str | None] = []
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
        if action in ("429", "429-1"):
            wait = "1" if action == "429-1" else "0"
            send(429, b'{"error": "rate limited"}', **{"Retry-After": wait})
        elif action in ("500", "503", "404", "401"):
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
