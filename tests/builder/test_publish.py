"""Publishing never loses data. Driven against stand-ins, never a real hub: a local HTTP server
that answers the Hugging Face API with its LFS protocol (tests/fixtures/fake_hub.py, through HF_ENDPOINT), a
local bare git repository with git-lfs (file://), and a local git host over HTTP that demands Basic
auth (tests/fixtures/git_http.py) for OpenXLab's git push."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from deploy.builder.publish import PublishError, publish
from deploy.recipe import parse_recipe
from tests.helpers import in_ci

ROOT = Path(__file__).resolve().parents[2]
TOKEN_ENV = "TEST_HUB_TOKEN"


@pytest.fixture
def model(tmp_path) -> Path:
    """A model folder as the builder leaves it, with a nested folder: weights of 2 MiB (the LFS
    path), a config the model card reads, and small files."""
    folder = tmp_path / "model"
    (folder / "extra").mkdir(parents=True)
    config = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "hidden_size": 64, "model_type": "llama"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "qmodel.pt").write_bytes(os.urandom(2 * 2**20))
    (folder / "extra" / "notes.txt").write_text("nested files travel too\n")
    return folder


def recipe_for(hub: str, repo: str = "me/assistant"):
    return parse_recipe({"name": "pub-test", "quantization": {"weights": "w4a16"},
                         "publish": {"hub": hub, "repo": repo, "token_env": TOKEN_ENV}})


def git(*args: str, cwd: Path | None = None, env: dict | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}).stdout


def need_git_lfs():
    if not shutil.which("git-lfs"):
        if in_ci():
            pytest.fail("git-lfs is missing in CI: .ci/run must install it")
        pytest.skip("git-lfs is not installed (apt-get install git-lfs)")


# -- OpenXLab: git + git-lfs ------------------------------------------------------------------


def remote_with_history(root: Path, repo: str = "me/assistant") -> tuple[Path, str]:
    """A bare remote that already holds the user's README, LICENSE and an earlier commit."""
    bare = root / f"{repo}.git"
    bare.mkdir(parents=True)
    git("init", "-q", "--bare", "-b", "main", str(bare))
    seed = root / "seed"
    git("clone", "-q", str(bare), str(seed))
    (seed / "README.md").write_text("# My model\n\nWritten by me, not by the kit.\n")
    (seed / "LICENSE").write_text("MIT\n")
    git("add", "-A", cwd=seed)
    git("-c", "user.name=me", "-c", "user.email=me@x", "commit", "-q", "-m", "my work", cwd=seed)
    git("push", "-q", "origin", "main", cwd=seed)
    return bare, git("rev-parse", "HEAD", cwd=seed).strip()


def clone(bare: Path, where: Path, smudge: bool = True) -> Path:
    """A checkout of the remote; without `smudge`, LFS files stay pointers (their objects live on
    the HTTP host's LFS store, not in the bare repository)."""
    git("clone", "-q", "-b", "main", str(bare), str(where),
        env={"GIT_LFS_SKIP_SMUDGE": "0" if smudge else "1"})
    return where


@pytest.fixture
def openxlab(tmp_path, monkeypatch) -> tuple[Path, str]:
    """A file:// OpenXLab stand-in whose repo already has history; returns (bare repo, its head)."""
    need_git_lfs()
    remotes = tmp_path / "remotes"
    bare, earlier = remote_with_history(remotes)
    monkeypatch.setenv("XLAB_OPENXLAB_GIT", f"file://{remotes}")
    monkeypatch.setenv(TOKEN_ENV, "openxlab-secret-token")
    return bare, earlier


def test_openxlab_publish_commits_on_top_and_keeps_what_it_did_not_write(model, tmp_path, openxlab):
    bare, earlier = openxlab
    recipe = recipe_for("openxlab")

    plan = publish(recipe, model, {}, dry_run=True)["plan"]
    assert plan["added"] == ["MODEL_CARD.md", "config.json", "extra/notes.txt", "qmodel.pt"]
    assert plan["kept"] == ["LICENSE", "README.md"] and plan["replaced"] == []
    assert git("rev-parse", "main", cwd=bare).strip() == earlier  # a dry run pushes nothing

    first = publish(recipe, model, {})
    work = clone(bare, tmp_path / "check")
    assert git("merge-base", "--is-ancestor", earlier, "HEAD", cwd=work) == ""  # history intact
    assert git("rev-list", "--count", "HEAD", cwd=work).strip() == "2"
    assert "Written by me" in (work / "README.md").read_text()  # the user's README stays
    assert (work / "LICENSE").read_text() == "MIT\n"
    assert (work / "MODEL_CARD.md").read_text().startswith("---")
    assert (work / "extra" / "notes.txt").read_text() == "nested files travel too\n"
    assert (work / "qmodel.pt").read_bytes() == (model / "qmodel.pt").read_bytes()
    assert "qmodel.pt" in git("lfs", "ls-files", "-n", cwd=work).split()  # an LFS object
    assert "*.pt filter=lfs" in (work / ".gitattributes").read_text()  # committed
    assert first["head"] == git("rev-parse", "HEAD", cwd=work).strip()

    # Published again with changed weights: one more commit, the weights replaced.
    (model / "qmodel.pt").write_bytes(os.urandom(2 * 2**20))
    second = publish(recipe, model, {}, last={"head": first["head"]})
    assert second["plan"]["replaced"] == ["MODEL_CARD.md", "config.json", "extra/notes.txt",
                                          "qmodel.pt"]
    assert git("rev-list", "--count", "main", cwd=bare).strip() == "3"


def test_openxlab_refuses_a_remote_changed_since_the_last_publish(model, tmp_path, openxlab):
    bare, _ = openxlab
    recipe = recipe_for("openxlab")
    first = publish(recipe, model, {})

    other = clone(bare, tmp_path / "colleague")  # someone else pushes in between
    (other / "NOTES.md").write_text("a colleague's notes\n")
    git("add", "-A", cwd=other)
    git("-c", "user.name=c", "-c", "user.email=c@x", "commit", "-q", "-m", "notes", cwd=other)
    git("push", "-q", "origin", "main", cwd=other)
    moved = git("rev-parse", "main", cwd=bare).strip()

    (model / "qmodel.pt").write_bytes(os.urandom(2 * 2**20))
    with pytest.raises(PublishError, match="changed since this recipe last published it.*--overwrite"):
        publish(recipe, model, {}, last={"head": first["head"]})
    assert git("rev-parse", "main", cwd=bare).strip() == moved  # nothing was pushed

    publish(recipe, model, {}, last={"head": first["head"]}, overwrite=True)
    work = clone(bare, tmp_path / "after")
    assert (work / "NOTES.md").is_file()  # --overwrite publishes on top: the notes stay
    assert git("merge-base", "--is-ancestor", moved, "HEAD", cwd=work) == ""


def test_openxlab_publish_killed_after_its_push_ends_with_one_commit(model, tmp_path, openxlab,
                                                                    monkeypatch):
    """A publish whose push landed but whose record did not (killed in between) runs again: the
    remote already holds exactly these files, so no second commit is made."""
    bare, _ = openxlab
    recipe = recipe_for("openxlab")
    pushed = publish(recipe, model, {})  # ... and then the process died before recording it
    again = publish(recipe, model, {}, last=None)
    assert again.get("unchanged") and again["head"] == pushed["head"]
    assert git("rev-list", "--count", "main", cwd=bare).strip() == "2"  # earlier + one
    # A push that never reached the remote leaves it as it was; the rerun then makes one commit.
    bare2, earlier2 = remote_with_history(tmp_path / "remotes2", "me/other")
    monkeypatch.setenv("XLAB_OPENXLAB_GIT", "file:///nonexistent")
    with pytest.raises(PublishError, match="git ls-remote"):
        publish(recipe_for("openxlab", "me/other"), model, {})
    monkeypatch.setenv("XLAB_OPENXLAB_GIT", f"file://{tmp_path / 'remotes2'}")
    publish(recipe_for("openxlab", "me/other"), model, {})
    assert git("rev-list", "--count", "main", cwd=bare2).strip() == "2"


def test_openxlab_push_over_http_checks_basic_auth(model, tmp_path, monkeypatch, caplog, capfd):
    need_git_lfs()
    from tests.fixtures.git_http import GitHost

    remotes = tmp_path / "remotes"
    bare, earlier = remote_with_history(remotes)
    git("config", "http.receivepack", "true", cwd=bare)
    token = "oxl-" + "s3cret" * 6
    caplog.set_level("DEBUG")
    with GitHost(remotes, user="me", token=token) as host:
        monkeypatch.setenv("XLAB_OPENXLAB_GIT", host.url)
        monkeypatch.setenv(TOKEN_ENV, "wrong-" + token[::-1])
        with pytest.raises(PublishError) as refused:
            publish(recipe_for("openxlab"), model, {})
        assert "refused the credentials" in str(refused.value)
        assert token[::-1] not in str(refused.value) and token not in str(refused.value)
        assert host.refused > 0
        assert git("rev-parse", "main", cwd=bare).strip() == earlier

        monkeypatch.setenv(TOKEN_ENV, token)
        published = publish(recipe_for("openxlab"), model, {})
        assert "qmodel.pt" in published["lfs"]
    work = clone(bare, tmp_path / "check", smudge=False)
    assert git("merge-base", "--is-ancestor", earlier, "HEAD", cwd=work) == ""
    assert (work / "qmodel.pt").read_text().startswith("version https://git-lfs")  # a pointer
    # The weights went through the host's LFS store, not into git.
    stored = list((remotes / "lfs-objects").iterdir())
    assert [p.read_bytes() for p in stored if p.stat().st_size > 2**20] == \
        [(model / "qmodel.pt").read_bytes()]
    out, err = capfd.readouterr()
    assert token not in caplog.text + out + err


# -- Hugging Face -----------------------------------------------------------------------------


def test_hugging_face_publish_keeps_the_remote_and_sends_weights_by_lfs(model, hub, monkeypatch,
                                                                        caplog, capfd):
    from tests.fixtures.fake_hub import seed_repo

    token = "hf_" + "t0ken" * 8
    monkeypatch.setenv(TOKEN_ENV, token)
    caplog.set_level("DEBUG")
    earlier = seed_repo(hub, "me/assistant", {"README.md": b"# Mine\n", "LICENSE": b"MIT\n"})
    recipe = recipe_for("huggingface")

    plan = publish(recipe, model, {}, dry_run=True)["plan"]
    assert plan == {"added": ["MODEL_CARD.md", "config.json", "extra/notes.txt", "qmodel.pt"],
                    "replaced": [], "kept": ["LICENSE", "README.md"], "card": "MODEL_CARD.md"}
    assert len(hub.state.repos["me/assistant"]["commits"]) == 1  # a dry run commits nothing

    first = publish(recipe, model, {})
    repo = hub.state.repos["me/assistant"]
    assert repo["files"]["README.md"] == b"# Mine\n" and repo["files"]["LICENSE"] == b"MIT\n"
    assert repo["files"]["extra/notes.txt"] == b"nested files travel too\n"
    assert repo["files"]["qmodel.pt"] == (model / "qmodel.pt").read_bytes()
    assert repo["lfs"] == {"qmodel.pt"}  # the weights took the LFS protocol
    assert [c["id"] for c in repo["commits"]][1:] == [earlier]
    assert all(auth == f"Bearer {token}" for auth in repo["auth"])

    hub.state.repos["me/assistant"]["commits"].insert(0, {"id": "f" * 40, "title": "someone"})
    with pytest.raises(PublishError, match="changed since this recipe last published it"):
        publish(recipe, model, {}, last={"head": first["head"]})
    publish(recipe, model, {}, last={"head": first["head"]}, overwrite=True)
    out, err = capfd.readouterr()
    assert token not in caplog.text + out + err


def test_hugging_face_card_replaces_only_the_kits_own_readme(model, hub, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "hf_" + "x" * 34)
    recipe = recipe_for("huggingface", "me/fresh")
    publish(recipe, model, {})  # a new repo: the card is its README
    repo = hub.state.repos["me/fresh"]
    assert repo["files"]["README.md"].startswith(b"---") and "MODEL_CARD.md" not in repo["files"]
    again = publish(recipe, model, {}, last=None)
    assert again["plan"]["card"] == "README.md" and "README.md" in again["plan"]["replaced"]


def test_an_unreachable_hub_is_a_sentence_not_a_traceback(model, monkeypatch):
    """Nothing listens on the port HF_ENDPOINT names: huggingface_hub raises httpx.ConnectError,
    which the kit turns into PublishError (exit 5 from the CLI) with what to do."""
    from deploy.serve.ports import free_port

    monkeypatch.setenv(TOKEN_ENV, "hf_" + "x" * 34)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(PublishError, match="Cannot reach the hub .*HF_ENDPOINT"):
        publish(recipe_for("huggingface"), model, {}, dry_run=True)
