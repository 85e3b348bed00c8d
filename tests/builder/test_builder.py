"""The builder on the real bundled model: quantize (HQQ 4-bit on CPU), gate, resume, serve, publish.

Publishing is driven against stand-ins, never a real hub: a local HTTP server that answers the
Hugging Face upload API (tests/fixtures/fake_hub.py, reached through HF_ENDPOINT), and a local bare git
repository with git-lfs for OpenXLab's git push.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deploy.builder.pipeline import build, read_manifest, work_dir
from deploy.recipe import load_recipe
from tests.builder.test_publish import need_git_lfs

ROOT = Path(__file__).resolve().parents[2]


def write_recipe(tmp_path: Path, name: str, **overrides) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "smollm2-cpu-w4.yaml").read_text())
    data["name"] = name
    data["quantization"]["verify"] = {"prompts": 2, "answer_tokens": 16,
                                      **overrides.pop("verify", {})}
    data.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    shutil.rmtree(work_dir(load_recipe(path)), ignore_errors=True)  # each test starts clean
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = write_recipe(tmp_path_factory.mktemp("recipes"), "test-build-w4")
    recipe = load_recipe(path)
    return recipe, build(recipe)


@pytest.mark.slow  # over 20 s on the 2-core machine, itself or through its fixture
def test_build_records_every_step_and_passes_the_gate(built):
    recipe, result = built
    steps = result.manifest["steps"]
    assert list(steps) == ["fetch", "merge", "quantize", "verify", "publish"]
    assert steps["quantize"]["outputs"]["method"] == "hqq"
    assert steps["quantize"]["fingerprints"]["qmodel.pt"].startswith("sha256")
    assert all(step["seconds"] >= 0 for step in steps.values())
    verify = steps["verify"]["outputs"]
    assert verify["top1_agreement"] >= 0.9 and verify["mean_kl"] <= 0.1
    report = json.loads(Path(verify["report"]).read_text())
    assert len(report["answers"]) == 2 and all(a["quantized"] for a in report["answers"])
    assert result.model_dir == Path(steps["quantize"]["outputs"]["model_dir"])


@pytest.mark.slow  # over 20 s on the 2-core machine, itself or through its fixture
def test_built_model_serves_with_4bit_weights(built, assistant):
    from deploy.engines import GenerationParams
    from deploy.serve.assistant import Assistant

    recipe, _ = built
    with Assistant.from_recipe(recipe) as quantized:
        answer = asyncio.run(quantized.achat([{"role": "user", "content": "What is the capital of France?"}],
                                            GenerationParams(max_tokens=16)))
        weights = quantized.engine.memory().weight_bytes
    assert "Paris" in answer.text
    assert weights < 0.5 * assistant.engine.memory().weight_bytes  # 4-bit vs bf16


@pytest.mark.slow  # over 20 s on the 2-core machine, itself or through its fixture
def test_rerun_skips_finished_steps(built, capsys):
    recipe, first = built
    again = build(recipe)
    assert again.manifest["steps"]["quantize"]["finished_at"] == \
        first.manifest["steps"]["quantize"]["finished_at"]
    assert capsys.readouterr().err.count("done earlier, skipped") == 5


@pytest.mark.slow  # over 20 s on the 2-core machine, itself or through its fixture
def test_killed_build_resumes_without_half_written_output(tmp_path):
    path = write_recipe(tmp_path, "test-build-killed")
    recipe = load_recipe(path)
    proc = subprocess.Popen([sys.executable, "-m", "deploy", "build", str(path)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # kill it once quantizing has begun
        if "fetch:" in line:
            time.sleep(1.5)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    work = work_dir(recipe)
    assert list(read_manifest(recipe)["steps"]) == ["fetch", "merge"]  # merge: nothing to merge
    assert not (work / "quantized-hqq").exists()
    rerun = subprocess.run([sys.executable, "-m", "deploy", "build", str(path)], cwd=ROOT,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "[1/5] fetch: done earlier, skipped" in rerun.stderr
    assert "[3/5] quantize: done in" in rerun.stderr
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # leftovers removed
    assert (work / "quantized-hqq" / "qmodel.pt").is_file()


@pytest.mark.slow  # over 20 s on the 2-core machine, itself or through its fixture
def test_failed_gate_exits_4_and_says_why(tmp_path):
    path = write_recipe(tmp_path, "test-build-gate", verify={"prompts": 1, "max_mean_kl": 0.0})
    run = subprocess.run([sys.executable, "-m", "deploy", "build", str(path)], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 4
    assert "failed the quality gate" in run.stderr and "mean KL" in run.stderr
    assert "Traceback" not in run.stderr
    # The verdict is recorded, so that serving can refuse these weights (tests/builder/test_build_gate.py).
    assert read_manifest(load_recipe(path))["steps"]["verify"]["outputs"]["passed"] is False


def published_recipe(tmp_path, hub: str, repo: str):
    path = write_recipe(tmp_path, f"test-publish-{hub}",
                        publish={"hub": hub, "repo": repo, "private": True, "token_env": "TEST_HUB_TOKEN"})
    return load_recipe(path)


@pytest.mark.slow  # over 20 s on the 2-core machine, itself or through its fixture
def test_publish_dry_run_lists_and_uploads_nothing(built, hub, tmp_path, capsys):
    recipe, result = built
    recipe = recipe.model_copy(deep=True)
    recipe.publish.repo = "me/never-uploaded"
    recipe.publish.hub = "huggingface"
    outcome = build(recipe, publish_dry_run=True)
    err = capsys.readouterr().err
    assert "dry run: would publish to huggingface:me/never-uploaded (private)" in err
    assert "add     qmodel.pt" in err and "add     README.md (generated model card)" in err
    assert hub.state.repos == {}  # nothing created, nothing uploaded
    assert "publish" not in outcome.manifest["steps"] or \
        "dry_run" not in outcome.manifest["steps"]["publish"]["outputs"]


@pytest.mark.slow  # over 20 s on the 2-core machine, itself or through its fixture
def test_publish_to_hugging_face_through_a_local_stand_in(built, hub, tmp_path, monkeypatch, caplog,
                                                          capfd):
    from deploy.builder.publish import publish

    recipe, result = built
    token = "hf_" + "t0ken" * 8
    caplog.set_level("DEBUG")  # every log record, huggingface_hub's and httpx's included
    monkeypatch.setenv("TEST_HUB_TOKEN", token)
    target = published_recipe(tmp_path, "huggingface", "me/smollm2-w4")
    verify = result.manifest["steps"]["verify"]["outputs"]
    outcome = publish(target, result.model_dir, verify)
    repo = hub.state.repos["me/smollm2-w4"]
    assert "qmodel.pt" in repo["lfs"]  # the weights took the LFS protocol
    expected = {p.name for p in result.model_dir.iterdir()} | {"README.md"}
    assert set(repo["files"]) == expected
    assert repo["files"]["qmodel.pt"] == (result.model_dir / "qmodel.pt").read_bytes()
    assert repo["private"] is True
    assert all(auth == f"Bearer {token}" for auth in repo["auth"])
    card = repo["files"]["README.md"].decode()
    assert "W4A16, group size 32" in card and f"{verify['top1_agreement']:.3f}" in card
    assert token not in card and token not in json.dumps(outcome)
    assert token not in manifest_text(target)
    out, err = capfd.readouterr()
    assert token not in caplog.text and token not in out + err


def manifest_text(recipe) -> str:
    path = work_dir(recipe) / "manifest.json"
    return path.read_text() if path.exists() else ""


@pytest.mark.slow  # over 20 s on the 2-core machine, itself or through its fixture
def test_publish_to_openxlab_by_git_lfs_push_to_a_local_repo(built, tmp_path, monkeypatch, caplog,
                                                             capfd):
    need_git_lfs()
    from deploy.builder.publish import publish

    recipe, result = built
    remote_root = tmp_path / "remotes"
    bare = remote_root / "me" / "smollm2-w4.git"
    bare.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    monkeypatch.setenv("XLAB_OPENXLAB_GIT", f"file://{remote_root}")
    monkeypatch.setenv("TEST_HUB_TOKEN", "openxlab-secret-token")
    target = published_recipe(tmp_path, "openxlab", "me/smollm2-w4")
    caplog.set_level("DEBUG")
    publish(target, result.model_dir, result.manifest["steps"]["verify"]["outputs"])
    out, err = capfd.readouterr()
    assert "openxlab-secret-token" not in caplog.text + out + err
    assert "openxlab-secret-token" not in manifest_text(target)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "-b", "main", str(bare), str(clone)], check=True,
                   env={**os.environ, "GIT_LFS_SKIP_SMUDGE": "0"})
    assert (clone / "README.md").read_text().startswith("---")
    assert (clone / "qmodel.pt").read_bytes() == (result.model_dir / "qmodel.pt").read_bytes()
    tracked = subprocess.run(["git", "lfs", "ls-files", "-n"], cwd=clone, capture_output=True,
                             text=True, check=True).stdout.split()
    assert "qmodel.pt" in tracked  # the weights travelled as LFS objects


@pytest.mark.slow  # over 20 s on the 2-core machine, itself or through its fixture
def test_build_records_the_publish_and_refuses_a_remote_changed_since(built, tmp_path, monkeypatch):
    """Through the pipeline: the published head is recorded in the manifest; a remote that someone
    else changed since then is refused (PublishError, exit 5) until --overwrite."""
    need_git_lfs()
    from deploy.builder.publish import PublishError
    from tests.builder.test_publish import clone, git, remote_with_history

    recipe, _ = built
    remotes = tmp_path / "remotes"
    bare, _ = remote_with_history(remotes, "me/pipeline")
    monkeypatch.setenv("XLAB_OPENXLAB_GIT", f"file://{remotes}")
    monkeypatch.setenv("TEST_HUB_TOKEN", "t")
    target = recipe.model_copy(deep=True)
    target.publish.repo, target.publish.token_env = "me/pipeline", "TEST_HUB_TOKEN"
    target.publish.hub = "openxlab"  # after the repo: each assignment is validated
    first = build(target)
    head = git("rev-parse", "main", cwd=bare).strip()
    assert first.manifest["published"]["openxlab:me/pipeline"]["head"] == head

    other = clone(bare, tmp_path / "colleague")
    (other / "NOTES.md").write_text("notes\n")
    git("add", "-A", cwd=other)
    git("-c", "user.name=c", "-c", "user.email=c@x", "commit", "-q", "-m", "notes", cwd=other)
    git("push", "-q", "origin", "main", cwd=other)
    target.publish.private = False  # a publish setting changed: the publish step runs again
    with pytest.raises(PublishError, match="--overwrite"):
        build(target)
    again = build(target, publish_overwrite=True)
    assert again.manifest["published"]["openxlab:me/pipeline"]["head"] == \
        git("rev-parse", "main", cwd=bare).strip()
    assert "NOTES.md" in git("ls-tree", "--name-only", "main", cwd=bare).split()


def test_full_disk_during_quantize_says_what_to_do_and_leaves_no_partial_output(tmp_path,
                                                                               monkeypatch):
    # Fault injection: no test machine has a disk to fill safely, so the weights writer (torch.save,
    # which hqq's save_quantized calls) writes part of its file and then fails as a full disk does.
    import errno

    import torch

    from deploy.builder.pipeline import BuildError

    recipe = load_recipe(write_recipe(tmp_path, "test-build-full-disk"))

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial weights")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(BuildError) as failure:
        build(recipe)
    message = str(failure.value)
    assert message.startswith("The quantize step ran out of disk space writing ")
    assert "XLAB_DEPLOY_HOME" in message and "finished steps are kept" in message
    work = work_dir(recipe)
    assert list(read_manifest(recipe)["steps"]) == ["fetch", "merge"]
    assert not [p.name for p in work.iterdir() if p.name.startswith(".") or "quantized" in p.name]


def test_unwritable_cache_is_a_sentence_not_a_traceback(tmp_path):
    # A real refused write: the cache is pointed below a file, which no user, root included, can
    # create folders in.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    path = write_recipe(tmp_path, "test-build-unwritable")
    env = {**os.environ, "XLAB_DEPLOY_HOME": str(blocker / "cache")}
    run = subprocess.run([sys.executable, "-m", "deploy", "build", str(path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert "error: " in run.stderr and "XLAB_DEPLOY_HOME" in run.stderr, run.stderr


@pytest.mark.parametrize("code", ["EACCES", "EPERM", "EROFS"])
def test_refused_writes_name_the_path_and_the_way_out(code, tmp_path):
    import errno

    from deploy.builder.pipeline import write_problem

    exc = OSError(getattr(errno, code), os.strerror(getattr(errno, code)), "/models/x/config.json")
    message = write_problem(exc, "fetch", tmp_path)
    assert message.startswith("The fetch step may not write /models/x/config.json (")
    assert "XLAB_DEPLOY_HOME" in message
    # Errors that are not about the disk (a refused connection, say) stay as they are.
    assert write_problem(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "fetch", tmp_path) is None


def test_full_disk_outside_the_kits_cache_names_that_folder(tmp_path, monkeypatch):
    import errno

    from deploy.builder.pipeline import write_problem

    monkeypatch.setenv("XLAB_DEPLOY_HOME", str(tmp_path / "kit"))
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "hf" / "blob"))
    message = write_problem(full, "fetch", tmp_path / "kit" / "builds" / "x")
    assert f"writing {tmp_path / 'hf' / 'blob'}" in message
    assert "move that folder to a bigger disk" in message and "XLAB_DEPLOY_HOME" not in message
