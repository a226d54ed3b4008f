"""``upload_saes_to_huggingface``, offline.

``HfApi`` is replaced by :class:`FakeHfApi`, which answers the public methods the upload
calls (each call is bound against the real ``HfApi`` method's signature, so a wrong
argument name fails here as it would against the hub), records them, and writes what is
committed to ``main`` into the offline Hugging Face cache of the ``hub`` fixture. The
uploaded SAEs are then loaded back with fastsae's and sae-lens's ``from_pretrained``.
Any other ``HfApi`` method fails the test, and sockets are blocked.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
import huggingface_hub.constants as hf_constants
import pytest
import sae_lens
import torch
import yaml
from huggingface_hub.errors import HFValidationError
from sae_testing import assert_close

import fastsae
from fastsae import hub_upload
from fastsae.hub_upload import upload_saes_to_huggingface

D_IN, D_SAE, K = 12, 32, 4
REPO = "user/my-saes"
HOOK_A = "blocks.0.hook_resid_pre"
HOOK_B = "blocks.1.hook_resid_post"
TOKEN = "hf_test_token"


def random_input() -> torch.Tensor:
    return torch.randn(5, D_IN, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def random_sae(arch: str = "topk", hook: str = HOOK_A, seed: int = 1) -> fastsae.SAE:
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "metadata": {"model_name": "gpt2", "hook_name": hook},
    }
    if arch == "topk":
        cfg["k"] = K
    sae = fastsae.SAE.from_dict(cfg)
    g = torch.Generator().manual_seed(seed)
    for name, p in sae.named_parameters():
        if name == "threshold":
            p.copy_(torch.rand(p.shape, generator=g) * 0.4)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae


# --------------------------------------------------------------------------- the fake hub API
class FakeRemote:
    """The repos of a fake hub (``{repo: {branch: {path: bytes}}}``) and every API call."""

    def __init__(self, hub):
        self.hub = hub
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.tokens: list[str | None] = []  # one per HfApi built

    def api(self, token: str | None = None, **kwargs) -> FakeHfApi:
        inspect.signature(huggingface_hub.HfApi.__init__).bind(None, token=token, **kwargs)
        self.tokens.append(token)
        return FakeHfApi(self)

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None) -> None:
        self.repos[repo_id] = {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}}
        self._write(repo_id, "main", files or {})

    def _write(self, repo_id: str, branch: str, files: dict[str, bytes]) -> None:
        self.repos[repo_id][branch].update(files)
        if branch == "main":  # main is what from_pretrained reads: the offline cache
            snap = self.hub.snapshot(repo_id)
            for path, data in files.items():
                (snap / path).parent.mkdir(parents=True, exist_ok=True)
                (snap / path).write_bytes(data)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def commits(self) -> list[dict[str, Any]]:
        return [args for name, args in self.calls if name == "create_commit"]

    def assert_untouched(self) -> None:
        assert self.tokens == [], "an HfApi was built"
        assert self.calls == [], f"the hub was called: {self.names()}"
        assert self.repos == {}, "a repo was created"


class FakeHfApi:
    def __init__(self, remote: FakeRemote):
        self._remote = remote

    def _record(self, name: str, *args, **kwargs) -> dict[str, Any]:
        bound = inspect.signature(getattr(huggingface_hub.HfApi, name)).bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        self._remote.calls.append((name, arguments))
        return arguments

    def __getattr__(self, name: str):
        raise AssertionError(f"the upload called HfApi.{name}, which the fake does not answer")

    def repo_exists(self, *args, **kwargs) -> bool:
        a = self._record("repo_exists", *args, **kwargs)
        return a["repo_id"] in self._remote.repos

    def create_repo(self, *args, **kwargs):
        a = self._record("create_repo", *args, **kwargs)
        if a["repo_id"] in self._remote.repos:
            if not a.get("exist_ok"):
                raise AssertionError("create_repo on an existing repo without exist_ok")
        else:
            self._remote.add_repo(a["repo_id"])
        return f"https://huggingface.co/{a['repo_id']}"

    def create_branch(self, *args, **kwargs) -> None:
        a = self._record("create_branch", *args, **kwargs)
        branches = self._remote.repos[a["repo_id"]]
        if a["branch"] not in branches:
            branches[a["branch"]] = dict(branches["main"])

    def file_exists(self, *args, **kwargs) -> bool:
        a = self._record("file_exists", *args, **kwargs)
        branch = self._remote.repos.get(a["repo_id"], {}).get(a.get("revision") or "main", {})
        return a["filename"] in branch

    def create_commit(self, *args, **kwargs):
        a = self._record("create_commit", *args, **kwargs)
        a["operations"] = list(a["operations"])
        branch = a.get("revision") or "main"
        if branch not in self._remote.repos.get(a["repo_id"], {}):
            raise AssertionError(f"commit to {a['repo_id']}@{branch}, which does not exist")
        files = {}
        for op in a["operations"]:
            assert isinstance(op, huggingface_hub.CommitOperationAdd), op
            with op.as_file() as f:
                files[op.path_in_repo] = f.read()
        self._remote._write(a["repo_id"], branch, files)
        oid = hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
        return SimpleNamespace(oid=oid, commit_message=a["commit_message"])


@pytest.fixture
def remote(hub, monkeypatch, tmp_path) -> FakeRemote:
    """A fake hub behind ``HfApi``, and no login: no HF_TOKEN, no token file."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no_login" / "token"))
    fake = FakeRemote(hub)
    monkeypatch.setattr(hub_upload, "HfApi", fake.api)
    return fake


def uploaded_paths(commit: dict[str, Any]) -> set[str]:
    return {op.path_in_repo for op in commit["operations"]}


def assert_loads_back(folder: str, original: fastsae.SAE, repo: str = REPO) -> None:
    """The folder loads with fastsae (exactly the original) and with sae-lens."""
    ours = fastsae.SAE.from_pretrained(repo, folder)
    assert type(ours) is type(original)
    assert ours.cfg.metadata.hook_name == original.cfg.metadata.hook_name
    x = random_input()
    assert_close(ours(x), original(x), tol=0.0, what=f"fastsae {folder}")
    theirs = sae_lens.SAE.from_pretrained(repo, folder)
    assert theirs.cfg.architecture() == original.cfg.architecture()
    assert_close(theirs(x), original(x), what=f"sae_lens {folder}")


# --------------------------------------------------------------------------- SAELens's spelling
def test_dict_of_saes_and_folders_goes_up_in_one_commit(remote, tmp_path):
    topk = random_sae("topk", HOOK_A, seed=1)
    jumprelu = random_sae("jumprelu", HOOK_A, seed=2)
    standard = random_sae("standard", HOOK_B, seed=3)
    jumprelu_dir = tmp_path / "saved" / "jumprelu"
    log_sparsity = torch.randn(D_SAE)
    jumprelu.save_model(jumprelu_dir, sparsity=log_sparsity)
    standard_dir = tmp_path / "saved" / "standard"
    standard.save_model(standard_dir)
    (standard_dir / "runner_cfg.json").write_text(json.dumps({"lr": 1e-4}))
    (standard_dir / "notes.txt").write_text("not an SAE file")

    result = upload_saes_to_huggingface(
        {"topk/layer_0": topk, "jumprelu": str(jumprelu_dir), "standard": standard_dir},
        REPO,
        show_progress=False,
        token=TOKEN,
    )

    assert remote.names() == ["repo_exists", "create_repo", "create_commit"]
    assert remote.tokens == [TOKEN]
    (commit,) = remote.commits()
    assert result.oid and result.commit_message == commit["commit_message"]
    assert commit["repo_id"] == REPO and commit["revision"] == "main"
    assert uploaded_paths(commit) == {
        "topk/layer_0/cfg.json",
        "topk/layer_0/sae_weights.safetensors",
        "jumprelu/cfg.json",
        "jumprelu/sae_weights.safetensors",
        "jumprelu/sparsity.safetensors",
        "standard/cfg.json",
        "standard/sae_weights.safetensors",
        "standard/runner_cfg.json",
        "README.md",
    }
    assert_loads_back("topk/layer_0", topk)
    assert_loads_back("jumprelu", jumprelu)
    assert_loads_back("standard", standard)
    _, _, got = fastsae.SAE.from_pretrained_with_cfg_and_sparsity(REPO, "jumprelu")
    assert torch.equal(got, log_sparsity)
    _, _, theirs = sae_lens.SAE.from_pretrained_with_cfg_and_sparsity(REPO, "jumprelu")
    assert torch.equal(theirs, log_sparsity)


def test_default_readme_tag_folders_and_snippet(remote):
    upload_saes_to_huggingface(
        {"layer_0": random_sae("topk"), "layer_1": random_sae("standard", HOOK_B)},
        REPO,
        show_progress=False,
        token=TOKEN,
    )
    readme = remote.repos[REPO]["main"]["README.md"].decode()
    assert readme.startswith("---\n")
    front = yaml.safe_load(readme.split("---\n")[1])
    assert front["library_name"] == "saelens"
    assert "saelens" in front["tags"]
    assert f"| `layer_0` | topk | {HOOK_A} | {D_IN} | {D_SAE} |" in readme
    assert f"| `layer_1` | standard | {HOOK_B} | {D_IN} | {D_SAE} |" in readme
    snippet = readme.split("```python\n")[1].split("```")[0]
    assert f'SAE.from_pretrained("{REPO}", "layer_0")' in snippet
    # the snippet runs against what was uploaded, with either library
    for module in (sae_lens, fastsae):
        code = snippet.replace("from sae_lens import SAE", f"from {module.__name__} import SAE")
        scope: dict[str, Any] = {}
        exec(code, scope)  # noqa: S102 - our own generated snippet, offline
        assert scope["sae"].cfg.d_sae == D_SAE


def test_existing_repo_with_readme_keeps_it(remote):
    remote.add_repo(REPO, {"README.md": b"# my own card\n", "old/cfg.json": b"{}"})
    sae = random_sae("jumprelu")
    upload_saes_to_huggingface({"new": sae}, REPO, show_progress=False, token=TOKEN)
    assert remote.names() == ["repo_exists", "file_exists", "create_commit"]
    assert remote.calls[1][1]["filename"] == "README.md"
    assert remote.calls[1][1]["revision"] == "main"
    (commit,) = remote.commits()
    assert uploaded_paths(commit) == {"new/cfg.json", "new/sae_weights.safetensors"}
    assert remote.repos[REPO]["main"]["README.md"] == b"# my own card\n"
    assert "old/cfg.json" in remote.repos[REPO]["main"]
    assert_loads_back("new", sae)


def test_existing_repo_without_readme_gets_one(remote):
    remote.add_repo(REPO)
    upload_saes_to_huggingface({"a": random_sae()}, REPO, token=TOKEN)  # with a progress bar
    assert "create_repo" not in remote.names()
    assert "README.md" in uploaded_paths(remote.commits()[0])


def test_no_readme_when_asked(remote):
    upload_saes_to_huggingface(
        {"a": random_sae()}, REPO, show_progress=False, add_default_readme=False, token=TOKEN
    )
    assert remote.names() == ["repo_exists", "create_repo", "create_commit"]
    assert uploaded_paths(remote.commits()[0]) == {"a/cfg.json", "a/sae_weights.safetensors"}


def test_revision_branch_is_created_and_committed_to(remote):
    remote.add_repo(REPO, {"README.md": b"card"})
    upload_saes_to_huggingface(
        {"a": random_sae()}, REPO, hf_revision="dev", show_progress=False, token=TOKEN
    )
    assert remote.names() == ["repo_exists", "create_branch", "file_exists", "create_commit"]
    assert remote.calls[1][1]["branch"] == "dev" and remote.calls[1][1]["exist_ok"]
    assert remote.calls[2][1]["revision"] == "dev"
    assert remote.commits()[0]["revision"] == "dev"
    assert "a/cfg.json" in remote.repos[REPO]["dev"]
    assert "a/cfg.json" not in remote.repos[REPO]["main"]


# --------------------------------------------------------------------------- the list spelling
def test_list_of_saes_named_by_hook(remote):
    a, b = random_sae("topk", HOOK_A, seed=4), random_sae("gated", HOOK_B, seed=5)
    upload_saes_to_huggingface(saes=[a, b], repo_id=REPO, token=TOKEN, show_progress=False)
    assert remote.tokens == [TOKEN]
    (commit,) = remote.commits()
    assert uploaded_paths(commit) == {
        f"{HOOK_A}/cfg.json",
        f"{HOOK_A}/sae_weights.safetensors",
        f"{HOOK_B}/cfg.json",
        f"{HOOK_B}/sae_weights.safetensors",
        "README.md",
    }
    assert_loads_back(HOOK_A, a)
    assert_loads_back(HOOK_B, b)


def test_cached_login_is_used_without_token(remote, monkeypatch, tmp_path):
    token_file = tmp_path / "login" / "token"
    token_file.parent.mkdir()
    token_file.write_text("hf_cached_login")
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(token_file))
    upload_saes_to_huggingface(saes=[random_sae()], repo_id=REPO, show_progress=False)
    assert remote.tokens == ["hf_cached_login"]
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    upload_saes_to_huggingface(saes=[random_sae()], repo_id=REPO, show_progress=False)
    assert remote.tokens == ["hf_cached_login", "hf_from_env"]


def test_training_sae_goes_up_as_its_inference_sae(remote):
    cfg = fastsae.BatchTopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=K, metadata=fastsae.SAEMetadata(hook_name=HOOK_A)
    )
    training = fastsae.BatchTopKTrainingSAE(cfg)
    with torch.no_grad():
        training.b_enc.normal_()
    upload_saes_to_huggingface(saes=[training], repo_id=REPO, token=TOKEN, show_progress=False)
    cfg_json = json.loads(remote.repos[REPO]["main"][f"{HOOK_A}/cfg.json"])
    assert cfg_json["architecture"] == "jumprelu"
    assert_loads_back(HOOK_A, training.to_inference_sae())


def test_sae_with_sparsity_from_the_hub_is_reuploaded_with_it(remote):
    sae = random_sae("topk")
    log_sparsity = torch.randn(D_SAE)
    remote.add_repo("other/source", {})
    sae.save_model(remote.hub.snapshot("other/source") / "src", sparsity=log_sparsity)
    loaded = fastsae.SAE.from_pretrained("other/source", "src")
    upload_saes_to_huggingface({"copy": loaded}, REPO, token=TOKEN, show_progress=False)
    assert "copy/sparsity.safetensors" in uploaded_paths(remote.commits()[0])
    _, _, got = fastsae.SAE.from_pretrained_with_cfg_and_sparsity(REPO, "copy")
    assert torch.equal(got, log_sparsity)


def test_sae_lens_sae_object(remote):
    theirs = sae_lens.SAE.from_dict(
        {
            "architecture": "standard",
            "d_in": D_IN,
            "d_sae": D_SAE,
            "metadata": {"hook_name": HOOK_B},
        }
    )
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    upload_saes_to_huggingface(saes=[theirs], repo_id=REPO, token=TOKEN, show_progress=False)
    ours = fastsae.SAE.from_pretrained(REPO, HOOK_B)
    x = random_input()
    assert_close(ours(x), theirs(x), what="sae_lens object, loaded by fastsae")


# --------------------------------------------------------------------------- bad input
def saved_folder(tmp_path: Path, drop: str | None = None, cfg_text: str | None = None) -> Path:
    folder = tmp_path / "saved_sae"
    random_sae().save_model(folder)
    if drop:
        (folder / drop).unlink()
    if cfg_text is not None:
        (folder / "cfg.json").write_text(cfg_text)
    return folder


def no_hook_sae() -> fastsae.SAE:
    sae = random_sae()
    sae.cfg.metadata.hook_name = None
    return sae


BAD_INPUTS = {
    "neither SAE nor folder": (
        lambda p: dict(saes_dict={"a": 42}, hf_repo_id=REPO),
        TypeError,
        "neither an SAE nor a path",
    ),
    "tensor value": (
        lambda p: dict(saes_dict={"a": torch.zeros(3)}, hf_repo_id=REPO),
        TypeError,
        "Tensor is neither",
    ),
    "missing folder": (
        lambda p: dict(saes_dict={"a": p / "nowhere"}, hf_repo_id=REPO),
        FileNotFoundError,
        "is not a folder",
    ),
    "folder without cfg.json": (
        lambda p: dict(saes_dict={"a": saved_folder(p, drop="cfg.json")}, hf_repo_id=REPO),
        FileNotFoundError,
        "has no cfg.json",
    ),
    "folder without weights": (
        lambda p: dict(
            saes_dict={"a": str(saved_folder(p, drop="sae_weights.safetensors"))}, hf_repo_id=REPO
        ),
        FileNotFoundError,
        "has no sae_weights.safetensors",
    ),
    "cfg.json not JSON": (
        lambda p: dict(saes_dict={"a": saved_folder(p, cfg_text="{oops")}, hf_repo_id=REPO),
        ValueError,
        "not valid JSON",
    ),
    "good SAE beside a bad folder": (
        lambda p: dict(saes_dict={"a": random_sae(), "b": p / "nowhere"}, hf_repo_id=REPO),
        FileNotFoundError,
        "'b'",
    ),
    "duplicate hook names": (
        lambda p: dict(saes=[random_sae(), random_sae("standard")], repo_id=REPO),
        ValueError,
        "same folder 'blocks.0.hook_resid_pre'",
    ),
    "duplicate folders after normalising": (
        lambda p: dict(saes_dict={"a": random_sae(), "/a/": random_sae()}, hf_repo_id=REPO),
        ValueError,
        "same folder 'a'",
    ),
    "folder with ..": (
        lambda p: dict(saes_dict={"../a": random_sae()}, hf_repo_id=REPO),
        ValueError,
        "bad folder name",
    ),
    "empty folder name": (
        lambda p: dict(saes_dict={"/": random_sae()}, hf_repo_id=REPO),
        ValueError,
        "bad folder name",
    ),
    "folder that is another's file": (
        lambda p: dict(saes_dict={"a": random_sae(), "a/cfg.json": random_sae()}, hf_repo_id=REPO),
        ValueError,
        "both a file and a folder",
    ),
    "saes_dict with repo_id": (
        lambda p: dict(saes_dict={"a": random_sae()}, repo_id=REPO),
        TypeError,
        "do not mix",
    ),
    "saes with hf_repo_id": (
        lambda p: dict(saes=[random_sae()], hf_repo_id=REPO),
        TypeError,
        "do not mix",
    ),
    "both SAE arguments": (
        lambda p: dict(saes_dict={"a": random_sae()}, saes=[random_sae()], repo_id=REPO),
        TypeError,
        "not both",
    ),
    "both repo arguments": (
        lambda p: dict(saes=[random_sae()], repo_id=REPO, hf_repo_id=REPO),
        TypeError,
        "not both",
    ),
    "no SAEs": (lambda p: dict(repo_id=REPO), TypeError, "no SAEs given"),
    "no repo": (lambda p: dict(saes=[random_sae()]), TypeError, "no repo given"),
    "empty dict": (lambda p: dict(saes_dict={}, hf_repo_id=REPO), ValueError, "no SAEs to upload"),
    "a list as saes_dict": (
        lambda p: dict(saes_dict=[random_sae()], hf_repo_id=REPO),
        TypeError,
        "pass saes=",
    ),
    "a path in saes": (
        lambda p: dict(saes=[str(saved_folder(p))], repo_id=REPO),
        TypeError,
        "not an SAE",
    ),
    "a single SAE as saes": (
        lambda p: dict(saes=random_sae(), repo_id=REPO),
        TypeError,
        "must be a list",
    ),
    "SAE without hook name": (
        lambda p: dict(saes=[no_hook_sae()], repo_id=REPO),
        ValueError,
        "no cfg.metadata.hook_name",
    ),
    "bad repo id": (
        lambda p: dict(saes=[random_sae()], repo_id="user/my saes/x"),
        HFValidationError,
        "Repo id must be",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_before_any_upload(case, remote, tmp_path):
    make_kwargs, error, match = BAD_INPUTS[case]
    kwargs = make_kwargs(tmp_path)
    with pytest.raises(error, match=match):
        upload_saes_to_huggingface(**kwargs, token=TOKEN, show_progress=False)
    remote.assert_untouched()


def test_missing_token_without_login_fails_before_any_upload(remote):
    assert huggingface_hub.get_token() is None  # the fixture logged us out
    with pytest.raises(PermissionError, match="no Hugging Face token"):
        upload_saes_to_huggingface(saes=[random_sae()], repo_id=REPO, show_progress=False)
    remote.assert_untouched()
    with pytest.raises(PermissionError, match="no Hugging Face token"):
        upload_saes_to_huggingface({"a": random_sae()}, REPO, show_progress=False)
    remote.assert_untouched()
