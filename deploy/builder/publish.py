"""Publishing built weights with a generated model card: Hugging Face, or OpenXLab over git.

Tokens come only from the environment variable the recipe names (publish.token_env). They are
never printed, logged, put on a command line, or written to the card or the manifest.

Publishing never loses data: it commits on top of the remote's current history (never a
force-push), replaces only the files it writes, keeps the rest, and refuses a remote that someone
else changed since this recipe's last publish unless told to go ahead (`--overwrite`).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import yaml
from rich.console import Console

from deploy.atomic import link_or_copy
from deploy.engines.sizing import kv_bytes_per_token
from deploy.errors import KitError
from deploy.recipe import Recipe, RecipeError

console = Console(stderr=True)
OPENXLAB_GIT = "https://code.openxlab.org.cn"


class PublishError(KitError):
    """The hub refused or could not be reached; the message says what to do."""

    exit_code = 5


# The kit's card carries this tag in its front matter: a README.md without it is the user's and is
# never replaced (the card then goes to MODEL_CARD.md).
KIT_TAG = "xlab-deploy"
KIT_TRAILER = "Xlab-Deploy-Recipe"  # in the kit's commit messages: a commit the kit made
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.model", "*.gguf")


@dataclass
class Plan:
    """What a publish changes on the remote."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # files on the remote the kit does not write
    card: str = "README.md"

    def show(self, target: str, visibility: str) -> None:
        console.print(f"dry run: would publish to {target} ({visibility}):")
        for label, names in (("add", self.added), ("replace", self.replaced), ("keep", self.kept)):
            for name in names:
                note = " (generated model card)" if name == self.card and label != "keep" else ""
                console.print(f"  {label:7s} {name}{note}")

    def as_dict(self) -> dict:
        return asdict(self)


def plan_changes(ours: list[str], remote: list[str], kit_readme: bool) -> Plan:
    """Our files against the remote's: the card replaces README.md only where README.md is absent
    or is the kit's own card; the remote's other files stay."""
    card = "README.md" if "README.md" not in remote or kit_readme else "MODEL_CARD.md"
    written = sorted({*ours, card})
    there = set(remote)
    return Plan(added=[f for f in written if f not in there],
                replaced=[f for f in written if f in there],
                kept=sorted(there - set(written) - {".gitattributes"}), card=card)


def publish(recipe: Recipe, folder: Path, verify: dict, *, dry_run: bool = False,
            overwrite: bool = False, last: dict | None = None) -> dict:
    """Publish `folder` (nested files included) and a model card on top of what the remote holds.
    `last` is what the previous publish of this recipe recorded; a remote changed since then by
    someone else is refused unless `overwrite`. Nothing is ever force-pushed."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    card = model_card(recipe, folder, verify)
    target = f"{recipe.publish.hub}:{recipe.publish.repo}"
    token = _token(recipe, required=not dry_run)  # a dry run may look at a public repo without one
    publisher = _to_huggingface if recipe.publish.hub == "huggingface" else _to_openxlab
    result = publisher(recipe, folder, files, card, token, last=last or {}, overwrite=overwrite,
                       dry_run=dry_run)
    return {"target": target, **result}


def _token(recipe: Recipe, required: bool = True) -> str | None:
    name = recipe.publish.token_env
    if name is None:
        return None  # huggingface_hub falls back to HF_TOKEN or a saved login
    value = os.environ.get(name)
    if not value and required:
        raise RecipeError(f"publish.token_env names {name}, but it is not set: export {name}=... "
                          "with a write token for the hub, then run the build again.")
    return value or None


def _visibility(recipe: Recipe) -> str:
    return "private" if recipe.publish.private else "public"


def _to_huggingface(recipe: Recipe, folder: Path, files: list[str], card: str, token: str | None, *,
                    last: dict, overwrite: bool, dry_run: bool) -> dict:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    # HfApi honours HF_ENDPOINT, so a mirror or a local stand-in for the hub works the same way.
    api = HfApi(token=token)
    repo = recipe.publish.repo
    target = f"huggingface:{repo}"
    try:
        try:
            info = api.model_info(repo)
            remote = [s.rfilename for s in info.siblings or []]
            tags = list(getattr(info.card_data, "tags", None) or [])
            head = info.sha
        except RepositoryNotFoundError:
            remote, tags, head = [], [], None
        plan = plan_changes(files, remote, KIT_TAG in tags)
        if dry_run:
            plan.show(target, _visibility(recipe))
            return {"dry_run": True, "plan": plan.as_dict()}
        kit_made = head is not None and head != last.get("head") and \
            api.list_repo_commits(repo)[0].title == f"xlab-deploy: {recipe.name}"
        _refuse_if_changed(target, head, last, overwrite, kit_made=kit_made)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
                      for name in files]
        operations.append(CommitOperationAdd(path_in_repo=plan.card, path_or_fileobj=card.encode()))
        api.create_repo(repo, private=recipe.publish.private, exist_ok=True, repo_type="model")
        commit = api.create_commit(repo, operations, commit_message=f"xlab-deploy: {recipe.name}",
                                   parent_commit=head)
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        hint = {401: "the token is missing or invalid", 403: "the token cannot write to this repo",
                412: "the repo changed while publishing: run the build again"}
        raise PublishError(f"Hugging Face refused the upload to {repo} ({status}: "
                           f"{hint.get(status, 'see the hub status')}). Check publish.repo and the "
                           f"token in ${recipe.publish.token_env or 'HF_TOKEN'}.") from None
    except Exception as exc:
        if not unreachable(exc):
            raise
        raise PublishError(f"Cannot reach the hub ({type(exc).__name__}): check the network or "
                           "HF_ENDPOINT, then run the build again; finished steps are kept.") from None
    return {"url": commit.commit_url, "head": commit.oid, "plan": plan.as_dict()}


def unreachable(exc: BaseException) -> bool:
    """A network failure, whichever HTTP library raised it: OSError, or a transport error of
    httpx or of the httpx fork that huggingface_hub 1.x ships (httpx2), matched by class name."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, OSError) or bool(names & {"TransportError", "NetworkError", "TimeoutException"})


def _refuse_if_changed(target: str, head: str | None, last: dict, overwrite: bool, *,
                       kit_made: bool) -> None:
    """The remote moved since this recipe's last publish, and not by the kit: someone else's work
    may be there. Publishing on top would bury it silently, so ask first."""
    if not last.get("head") or head in (None, last["head"]) or kit_made or overwrite:
        return
    raise PublishError(
        f"{target} changed since this recipe last published it (then at {last['head'][:12]}, now "
        f"at {head[:12]}). Look at what changed there; then run the build again with --overwrite "
        "to publish on top of it (its files stay, except those the kit writes), or with "
        "--dry-run to see what would change."
    )


def _to_openxlab(recipe: Recipe, folder: Path, files: list[str], card: str, token: str | None, *,
                 last: dict, overwrite: bool, dry_run: bool) -> dict:
    """Commit the folder on top of the OpenXLab model repo's main with git and git-lfs, as
    OpenXLab's docs do: the remote's history and files stay, and nothing is force-pushed."""
    remote = f"{os.environ.get('XLAB_OPENXLAB_GIT', OPENXLAB_GIT)}/{recipe.publish.repo}.git"
    target = f"openxlab:{recipe.publish.repo}"
    # LFS files already on the remote stay pointers: the kit replaces or keeps them, never reads.
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_LFS_SKIP_SMUDGE": "1"}
    if token:
        # The credential travels in git's environment config, never on a command line or in a URL.
        owner = recipe.publish.repo.split("/")[0]
        basic = base64.b64encode(f"{owner}:{token}".encode()).decode()
        env.update({"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
                    "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}"})
    with tempfile.TemporaryDirectory(prefix="xlab-publish-") as tmp:
        repo = Path(tmp) / "repo"

        def git(*args: str, cwd: Path = repo, check: bool = True) -> subprocess.CompletedProcess:
            run = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
            if check and run.returncode:
                detail = run.stderr.replace(token, "***") if token else run.stderr
                raise PublishError(f"git {args[0]} to {remote} failed: {detail.strip()[-500:]}"
                                   + _git_hint(detail))
            return run

        git("init", "-q", "-b", "main", str(repo), cwd=Path(tmp))
        git("lfs", "install", "--local")
        git("remote", "add", "origin", remote)
        listed = git("ls-remote", "origin", "refs/heads/main").stdout.split()
        head = listed[0] if listed else None
        kit_made = False
        if head:
            git("fetch", "-q", "origin", "main")
            git("checkout", "-q", "-B", "main", "FETCH_HEAD")
            kit_made = f"{KIT_TRAILER}: {recipe.name}" in git("log", "-1", "--format=%B").stdout
        remote_files = git("ls-files").stdout.split("\n") if head else []
        readme = repo / "README.md"
        plan = plan_changes(files, [f for f in remote_files if f],
                            readme.is_file() and _has_kit_tag(readme.read_text(errors="replace")))
        if dry_run:
            plan.show(target, _visibility(recipe))
            return {"dry_run": True, "plan": plan.as_dict()}
        _refuse_if_changed(target, head, last, overwrite, kit_made=kit_made)
        git("lfs", "track", *WEIGHT_PATTERNS)
        for name in files:
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).unlink(missing_ok=True)  # a checked-out LFS pointer, or an old copy
            link_or_copy(str(folder / name), str(repo / name))
        (repo / plan.card).write_text(card, encoding="utf-8")
        git("add", "--", ".gitattributes", plan.card, *files)
        if git("diff", "--cached", "--quiet", check=False).returncode == 0:
            # The remote holds exactly this already: an earlier publish whose record was lost
            # (killed after its push). No second commit.
            return {"url": remote, "head": head, "plan": plan.as_dict(), "unchanged": True}
        git("-c", "user.name=xlab-deploy", "-c", "user.email=xlab-deploy@localhost", "commit", "-q",
            "-m", f"xlab-deploy: {recipe.name}\n\n{KIT_TRAILER}: {recipe.name}")
        lfs = set(git("lfs", "ls-files", "-n").stdout.split())
        missed = [f for f in files if any(fnmatch(Path(f).name, p) for p in WEIGHT_PATTERNS)
                  and f not in lfs]
        if missed:
            raise PublishError(f"git-lfs did not take {', '.join(missed)}: check `git lfs install` "
                               "and that git-lfs is on PATH, then run the build again.")
        git("push", "-q", "origin", "main")  # fast-forward only: never --force
        new_head = git("rev-parse", "HEAD").stdout.strip()
    return {"url": remote, "head": new_head, "plan": plan.as_dict(), "lfs": sorted(lfs)}


def _has_kit_tag(text: str) -> bool:
    """Whether a README's front matter lists the kit's tag (the cards it writes do)."""
    if not text.startswith("---"):
        return False
    front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    try:
        tags = (yaml.safe_load(front) or {}).get("tags") or []
    except yaml.YAMLError:
        return False
    return KIT_TAG in tags


def _git_hint(detail: str) -> str:
    lowered = detail.lower()
    # A 401 makes git ask for a user name, which it may not: the header's credentials were refused.
    if any(sign in lowered for sign in ("authentication failed", "could not read username", " 401",
                                        " 403")):
        return (" The hub refused the credentials: check the token in publish.token_env (it needs "
                "write access to this repo).")
    if "rejected" in lowered or "fetch first" in lowered or "non-fast-forward" in lowered:
        return " The remote moved while publishing: run the build again to publish on top of it."
    return ""


def model_card(recipe: Recipe, folder: Path, verify: dict) -> str:
    config = json.loads((folder / "config.json").read_text())
    q = recipe.quantization
    weights = sum(p.stat().st_size for p in folder.iterdir()
                  if p.suffix in (".safetensors", ".bin", ".pt"))
    method = {"none": "none (original weights)", "w4a16": f"W4A16, group size {q.group_size}"}
    gate = (f"- top-1 next-token agreement with the original: **{verify['top1_agreement']:.3f}**\n"
            f"- mean KL(original || quantized): **{verify['mean_kl']:.4f}** nats over "
            f"{verify['positions']} positions\n") if "top1_agreement" in verify else \
        "- no quality gate ran (the weights are not quantized)\n"
    source = recipe.model.id or recipe.model.path
    if recipe.model.source == "bundled":
        source = f"HuggingFaceTB/{recipe.model.id or 'SmolLM2-135M-Instruct'} (bundled GGUF)"
    revision = f" (revision {recipe.model.revision})" if recipe.model.revision else ""
    return f"""---
tags:
- xlab-deploy
- lmdeploy
- {"w4a16" if q.weights == "w4a16" else "fp16"}
---

# {recipe.name}

Built by xlab-deploy from `{source}`{revision}.

## Quantization

- weights: {method[q.weights]}
- KV cache at serving time: {q.kv_cache}
- KV cache per token: {kv_bytes_per_token(config, q.kv_cache) / 1024:.1f} KiB

## Measured

- weight files: {weights / 2**30:.2f} GiB
{gate}
## Serve it

```yaml
model:
  source: huggingface
  id: {recipe.publish.repo}
quantization:
  weights: {q.weights}
  kv_cache: {q.kv_cache}
engine:
  backend: {recipe.engine.backend}
  session_len: {recipe.engine.session_len}
```

```bash
python -m deploy serve recipe.yaml   # OpenAI-compatible API, /memory, and a Gradio UI
```
"""
