"""Self-tuning dispatch (``fastsae.tuning``) on CPU: the tuner with an injected timer, the
key buckets, the JSON cache (round trip, versions, corrupt / unwritable files, two
processes at once), FASTSAE_TUNE=0, and ``fastsae.ops``'s CUDA branch with a fake device."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from fastsae import SparseCode, ops, torch_ops, tuning
from fastsae.bench.cases import Config, Problem
from fastsae.bench.rows import run_case

VERSIONS = {"torch": "2.0", "triton": "3.0", "fastsae": "0.1.0"}


class FakeTimer:
    """Times by name from a table; records which names it timed, and can run the
    candidates (``run``) to check what they return."""

    def __init__(self, ms: dict[str, float], run: tuple[str, ...] = ()) -> None:
        self.ms, self.run = ms, run
        self.timed: list[str] = []
        self.outputs: dict[str, object] = {}

    def __call__(self, name: str, fn) -> float:
        self.timed.append(name)
        if name in self.run:
            self.outputs[name] = fn()
        return self.ms[name]


def no_timer(name: str, fn) -> float:
    raise AssertionError(f"timed {name!r} where nothing may be timed")


def key(rows: int = 100, op: str = "topk_encode") -> tuning.TuneKey:
    return tuning.TuneKey.make("fake-gpu", op, "float32", rows, (768, 24576), 64)


CANDIDATES = {"fused": lambda: None, "chunked": lambda: None, "torch": lambda: None}


@pytest.fixture(autouse=True)
def _tuning_on(monkeypatch, tmp_path):
    """Tuning on, the cache in this test's folder, the Triton paths allowed."""
    monkeypatch.delenv(tuning.TUNE_ENV, raising=False)
    monkeypatch.delenv("FASTSAE_TOPK_SELECT", raising=False)
    monkeypatch.delenv("FASTSAE_DISABLE_TRITON", raising=False)
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path / "cache"))


# ------------------------------------------------------------------------------ mechanism
def test_fastest_fake_wins_is_cached_and_not_timed_again(tmp_path):
    path = tmp_path / "d.json"
    timer = FakeTimer({"fused": 3.0, "chunked": 1.0, "torch": 2.0})
    tuner = tuning.Tuner(tuning.DecisionCache(path, VERSIONS), timer)
    assert tuner.choose(key(), CANDIDATES, "torch") == "chunked"
    assert sorted(timer.timed) == ["chunked", "fused", "torch"]
    assert tuner.choose(key(), CANDIDATES, "torch") == "chunked"
    assert tuner.choose(key(rows=128), CANDIDATES, "torch") == "chunked"  # same bucket
    assert len(timer.timed) == 3  # decided once
    # another process (a fresh tuner on the same file) reads the decision, times nothing
    again = tuning.Tuner(tuning.DecisionCache(path, VERSIONS), no_timer)
    assert again.choose(key(), CANDIDATES, "torch") == "chunked"
    entry = json.loads(path.read_text())["decisions"][key().as_str()]
    assert entry == {"path": "chunked", "ms": {"fused": 3.0, "chunked": 1.0, "torch": 2.0}}


def test_failing_candidate_is_skipped_with_a_warning(tmp_path):
    def timer(name, fn):
        if name == "fused":
            raise RuntimeError("out of memory")
        return {"chunked": 2.0, "torch": 1.0}[name]

    tuner = tuning.Tuner(tuning.DecisionCache(None, VERSIONS), timer)
    with pytest.warns(RuntimeWarning, match="'fused' failed while timed"):
        assert tuner.choose(key(), CANDIDATES, "chunked") == "torch"


def test_key_buckets_rows_and_dims_to_powers_of_two():
    assert [tuning.bucket(n) for n in (0, 1, 2, 3, 5, 768, 1024, 1025)] == [
        0, 1, 2, 4, 8, 1024, 1024, 2048,
    ]  # fmt: skip
    a = tuning.TuneKey.make("H100", "topk_encode", "bfloat16", 3000, (768, 24576), 64)
    assert a == tuning.TuneKey.make("H100", "topk_encode", "bfloat16", 4096, (1024, 32768), 64)
    assert a.rows == 4096 and a.dims == (1024, 32768)
    for other in (
        tuning.TuneKey.make("H100", "topk_encode", "bfloat16", 4097, (768, 24576), 64),
        tuning.TuneKey.make("H100", "topk_encode", "bfloat16", 3000, (768, 24576), 32),
        tuning.TuneKey.make("H100", "topk_encode", "float32", 3000, (768, 24576), 64),
        tuning.TuneKey.make("A100", "topk_encode", "bfloat16", 3000, (768, 24576), 64),
        tuning.TuneKey.make("H100", "jumprelu_encode:sparse", "bfloat16", 3000, (768, 24576)),
    ):
        assert other.as_str() != a.as_str()
    assert tuning.dtype_tag(torch.float32, torch.float32) == "float32"
    assert tuning.dtype_tag(torch.float32, torch.bfloat16) == "float32/bfloat16"


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path / "x"))
    assert tuning.cache_dir() == tmp_path / "x"
    monkeypatch.delenv(tuning.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.cache_dir() == tmp_path / "xdg" / "fastsae"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tuning.cache_dir() == Path.home() / ".cache" / "fastsae"
    assert tuning.Tuner().cache.path == Path.home() / ".cache" / "fastsae" / "dispatch.json"


# ------------------------------------------------------------------------------ the file
def test_cache_file_round_trip(tmp_path):
    path = tmp_path / "sub" / "dispatch.json"  # the folder is created on first write
    cache = tuning.DecisionCache(path, VERSIONS)
    cache.put("a", "fused", {"fused": 1.0})
    cache.put("b", "torch")
    data = json.loads(path.read_text())
    assert data["format"] == tuning.FORMAT and data["versions"] == VERSIONS
    fresh = tuning.DecisionCache(path, VERSIONS)
    assert (fresh.get("a"), fresh.get("b"), fresh.get("c")) == ("fused", "torch", None)
    assert not list(path.parent.glob("*.tmp"))  # no temporary file left behind
    assert tuning.DecisionCache(path).versions == tuning.versions()


def test_version_change_invalidates(tmp_path):
    path = tmp_path / "dispatch.json"
    tuning.DecisionCache(path, VERSIONS).put("a", "fused")
    for changed in ("torch", "triton", "fastsae"):
        newer = {**VERSIONS, changed: "9.9"}
        assert tuning.DecisionCache(path, newer).get("a") is None, changed
    newer = {**VERSIONS, "torch": "9.9"}
    tuning.DecisionCache(path, newer).put("b", "torch")
    data = json.loads(path.read_text())
    assert data["versions"] == newer and list(data["decisions"]) == ["b"]  # stale entry gone


def test_corrupt_cache_file_warns_once_and_keeps_decisions_in_memory(tmp_path):
    path = tmp_path / "dispatch.json"
    path.write_text('{"format": 1, "decisions": {"a": ')  # a write cut short elsewhere
    timer = FakeTimer({"fused": 3.0, "chunked": 1.0, "torch": 2.0})
    tuner = tuning.Tuner(tuning.DecisionCache(path, VERSIONS), timer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tuner.choose(key(), CANDIDATES, "torch") == "chunked"
        assert tuner.choose(key(), CANDIDATES, "torch") == "chunked"
        assert tuner.choose(key(rows=10**6), CANDIDATES, "torch") == "chunked"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "not a valid cache file" in messages[0], messages
    assert timer.timed.count("fused") == 2  # two keys, each timed once: kept in memory
    # the same with valid JSON of the wrong shape
    path.write_text("[1, 2]")
    with pytest.warns(RuntimeWarning, match="no 'decisions' object"):
        assert tuning.DecisionCache(path, VERSIONS).get("a") is None


def test_unwritable_cache_dir_warns_once_never_crashes(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the cache "folder" is a file: mkdir fails, even as root
    timer = FakeTimer({"fused": 3.0, "chunked": 1.0, "torch": 2.0})
    tuner = tuning.Tuner(tuning.DecisionCache(blocker / "dispatch.json", VERSIONS), timer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tuner.choose(key(), CANDIDATES, "torch") == "chunked"
        assert tuner.choose(key(rows=10**6), CANDIDATES, "torch") == "chunked"
        assert tuner.choose(key(), CANDIDATES, "torch") == "chunked"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "cannot be read" in messages[0], messages
    assert timer.timed.count("fused") == 2


def test_failed_write_warns_once_never_crashes(tmp_path, monkeypatch):
    """The folder is there but no file can be created in it (a read-only mount, a full
    disk): one warning, decisions kept in memory, no temporary file left."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(tuning.tempfile, "mkstemp", refuse)
    timer = FakeTimer({"fused": 3.0, "chunked": 1.0, "torch": 2.0})
    tuner = tuning.Tuner(tuning.DecisionCache(tmp_path / "dispatch.json", VERSIONS), timer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tuner.choose(key(), CANDIDATES, "torch") == "chunked"
        assert tuner.choose(key(rows=10**6), CANDIDATES, "torch") == "chunked"
        assert tuner.choose(key(), CANDIDATES, "torch") == "chunked"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "cannot be written" in messages[0], messages
    assert timer.timed.count("fused") == 2
    assert [p.name for p in tmp_path.iterdir()] == ["dispatch.json.lock"]


WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from fastsae import tuning
    path, name, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    go.with_name(name + ".ready").touch()
    while not go.exists():
        time.sleep(0.001)
    cache = tuning.DecisionCache(path, {"torch": "t", "triton": "t", "fastsae": "t"})
    for i in range(40):
        cache.put(f"{name}-{i}", "torch", {"torch": float(i)})
    """
)


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path, go = tmp_path / "dispatch.json", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), name, str(go)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("p0", "p1")
    ]
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"{n}.ready").exists() for n in ("p0", "p1")):
        assert time.monotonic() < deadline, "the writer processes did not start"
        assert all(p.poll() is None for p in procs), "a writer process exited early"
        time.sleep(0.01)
    go.touch()  # both imported and waiting: now they race
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "Warning" not in err, err
    data = json.loads(path.read_text())  # valid JSON
    expected = {f"{n}-{i}" for n in ("p0", "p1") for i in range(40)}
    assert set(data["decisions"]) == expected
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------------------ when not to time
def test_tune_off_gives_default_without_timing(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.TUNE_ENV, "0")
    cache = tuning.DecisionCache(tmp_path / "d.json", VERSIONS)
    tuner = tuning.Tuner(cache, no_timer)
    assert tuner.choose(key(), CANDIDATES, "chunked") == "chunked"
    assert tuner.choose(key(), CANDIDATES, "torch") == "torch"
    assert not (tmp_path / "d.json").exists()


def test_no_timing_inside_a_compile_trace(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    tuner = tuning.Tuner(tuning.DecisionCache(None, VERSIONS), no_timer)
    assert tuner.choose(key(), CANDIDATES, "chunked") == "chunked"
    assert tuner.cached(key()) is None  # the default is not remembered as a decision


def test_bad_default_is_named():
    tuner = tuning.Tuner(tuning.DecisionCache(None, VERSIONS), no_timer)
    with pytest.raises(ValueError, match="default 'cublas'"):
        tuner.choose(key(), CANDIDATES, "cublas")


def _tensors(requires_grad: bool = False):
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    W_enc = torch.randn(16, 64, requires_grad=requires_grad)
    b_enc = torch.randn(64, requires_grad=requires_grad)
    return x, W_enc, b_enc


def test_cpu_auto_takes_torch_without_timing(monkeypatch):
    """CPU tensors: impl="auto" is the torch path, and nothing is timed or cached."""
    monkeypatch.setattr(ops, "triton_available", lambda: True)
    x, W_enc, b_enc = _tensors()
    tuner = tuning.Tuner(tuning.DecisionCache(None, VERSIONS), no_timer)
    with tuning.use_tuner(tuner), tuning.record_paths() as taken:
        code = ops.topk_encode(x, W_enc, b_enc, 5)
        ops.jumprelu_encode(x, W_enc, b_enc, torch.zeros(64), sparse=True)
        ops.sparse_decode(code, torch.randn(64, 16))
    assert taken == {"topk_encode": {"torch"}, "jumprelu_encode": {"torch"},
                     "sparse_decode": {"torch"}}  # fmt: skip
    assert tuner.cache.memory == {}


# ------------------------------------------------------------------------------ ops' CUDA branch
@pytest.fixture
def fake_gpu(monkeypatch):
    """Every tensor counts as on "fake-gpu" and Triton as installed: the CUDA branch of
    ``impl="auto"`` on CPU tensors. Returns a function making the tuner for a timer."""
    monkeypatch.setattr(ops, "triton_available", lambda: True)

    def make(timer) -> tuning.Tuner:
        return tuning.Tuner(tuning.DecisionCache(None, VERSIONS), timer, lambda ts: "fake-gpu")

    return make


def test_ops_topk_tunes_once_and_keeps_results_and_autograd(fake_gpu):
    timer = FakeTimer({"fused": 3.0, "chunked": 2.0, "torch": 1.0}, run=("chunked", "torch"))
    x, W_enc, b_enc = _tensors(requires_grad=True)
    with tuning.use_tuner(fake_gpu(timer)) as tuner, tuning.record_paths() as taken:
        code = ops.topk_encode(x, W_enc, b_enc, 5)
        ops.topk_encode(x[:5], W_enc, b_enc, 5)  # 5 rows: the same bucket as 6 (8)
    assert sorted(timer.timed) == ["chunked", "fused", "torch"]  # timed once, all paths
    assert taken == {"topk_encode": {"torch"}}
    key_ = tuning.TuneKey.make("fake-gpu", "topk_encode", "float32", 6, (16, 64), 5)
    assert tuner.cached(key_) == "torch"
    # the timed candidates ran detached under no_grad, on the call's own data
    ref = torch_ops.topk_encode(x, W_enc.detach(), b_enc.detach(), 5)
    for name, out in timer.outputs.items():
        assert not out.values.requires_grad, name
        assert torch.equal(out.indices.sort(-1).values, ref.indices.sort(-1).values), name
    # the real call's result and gradients are the untuned torch path's
    assert torch.equal(code.indices, ref.indices) and torch.allclose(code.values, ref.values)
    code.values.sum().backward()
    W2, b2 = W_enc.detach().clone().requires_grad_(), b_enc.detach().clone().requires_grad_()
    torch_ops.topk_encode(x, W2, b2, 5).values.sum().backward()
    assert torch.allclose(W_enc.grad, W2.grad) and torch.allclose(b_enc.grad, b2.grad)


def test_ops_topk_takes_the_measured_winner(fake_gpu):
    """The chunked path won: the call runs it (its forward is torch's chunked selection)."""
    timer = FakeTimer({"fused": 3.0, "chunked": 1.0, "torch": 2.0})
    x, W_enc, b_enc = _tensors()
    with tuning.use_tuner(fake_gpu(timer)), tuning.record_paths() as taken, torch.no_grad():
        code = ops.topk_encode(x, W_enc, b_enc, 5)
    assert taken == {"topk_encode": {"chunked"}}
    ref = torch_ops.topk_encode(x, W_enc, b_enc, 5)
    assert torch.equal(code.indices.sort(-1).values, ref.indices.sort(-1).values)


def test_ops_topk_large_k_has_no_fused_candidate(fake_gpu):
    timer = FakeTimer({"chunked": 2.0, "torch": 1.0})
    W_enc = torch.randn(4, 2048)
    with tuning.use_tuner(fake_gpu(timer)):
        path = ops.topk_auto_path(torch.randn(3, 4), W_enc, torch.zeros(2048), 1100)
    assert path == "torch" and sorted(timer.timed) == ["chunked", "torch"]


def test_ops_defaults_when_tuning_is_off_or_forced(fake_gpu, monkeypatch):
    x, W_enc, b_enc = _tensors()
    monkeypatch.setenv(tuning.TUNE_ENV, "0")
    with tuning.use_tuner(fake_gpu(no_timer)), tuning.record_paths() as taken:
        assert ops.topk_auto_path(x, W_enc, b_enc, 5) == "chunked"
        with torch.no_grad():
            ops.jumprelu_encode(x, W_enc, b_enc, torch.zeros(64), sparse=True)
    assert taken == {"jumprelu_encode": {"torch"}}
    monkeypatch.delenv(tuning.TUNE_ENV)
    monkeypatch.setenv("FASTSAE_TOPK_SELECT", "fused")  # forced: no tuning either
    with tuning.use_tuner(fake_gpu(no_timer)):
        assert ops.topk_auto_path(x, W_enc, b_enc, 5) == "fused"
    monkeypatch.setenv("FASTSAE_DISABLE_TRITON", "1")  # Triton off: torch, untimed
    with tuning.use_tuner(fake_gpu(no_timer)):
        assert ops.topk_auto_path(x, W_enc, b_enc, 5) == "torch"


def test_ops_jumprelu_and_decode_tune_per_key(fake_gpu):
    timer = FakeTimer({"triton": 2.0, "torch": 1.0}, run=("torch",))
    x, W_enc, b_enc = _tensors()
    threshold = torch.full((64,), 0.5)
    W_dec = torch.randn(64, 16)
    tuner = fake_gpu(timer)
    with tuning.use_tuner(tuner), tuning.record_paths() as taken, torch.no_grad():
        sparse = ops.jumprelu_encode(x, W_enc, b_enc, threshold, sparse=True)
        dense = ops.jumprelu_encode(x, W_enc, b_enc, threshold)  # another key
        out = ops.sparse_decode(sparse, W_dec)
        ops.sparse_decode(SparseCode(sparse.values[:5], sparse.indices[:5]), W_dec)
    assert timer.timed == ["triton", "torch"] * 3  # sparse, dense, decode; then cached
    assert taken == {"jumprelu_encode": {"torch"}, "sparse_decode": {"torch"}}
    ops_keyed = {k.split("|")[1] for k in tuner.cache.memory}
    assert ops_keyed == {"jumprelu_encode:sparse", "jumprelu_encode:dense", "sparse_decode"}
    assert torch.equal(dense, torch_ops.jumprelu_encode(x, W_enc, b_enc, threshold))
    assert torch.allclose(out, sparse.to_dense(64) @ W_dec, atol=1e-5)


def test_bench_row_reports_the_path_taken():
    cfg = Config("topk", 16, 64, 8, torch.float32, "cpu", k=4)
    row = run_case(Problem(cfg), "fastsae-torch", "encode", repeats=1)
    assert row["status"] == "ok" and row["path"] == "topk_encode=torch"
    row = run_case(Problem(cfg), "fastsae-torch", "forward", repeats=1)
    assert row["path"] == "sparse_decode=torch; topk_encode=torch"
    assert run_case(Problem(cfg), "torch", "matmul", repeats=1)["path"] is None


def test_pretune_on_cpu_reports_the_paths():
    """``fastsae tune``'s grid step (here on CPU tensors: the torch paths, untimed)."""
    point = ops.GridPoint(d_in=16, d_sae=64, rows=8, k=4, dtype=torch.float32)
    log = ops.pretune(point, device="cpu")
    assert tuning.describe_paths(log) == (
        "jumprelu_encode=torch; sparse_decode=torch; topk_encode=torch"
    )


def test_cli_tune_without_cuda_is_a_clear_error(capsys):
    from fastsae import cli

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["tune", "--shapes", "64x256", "--rows", "8"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
