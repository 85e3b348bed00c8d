"""Publishing built weights with a generated model card: Hugging Face, or OpenXLab over git.

Tokens come only from the environment variable the recipe names (publish.token_env). They are
never printed, logged, put on a command line, or written to the card or the manifest.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
from pathlib import Path

from rich.console import Console

from deploy.atomic import link_or_copy
from deploy.engines.sizing import kv_bytes_per_token
from deploy.recipe import Recipe, RecipeError

console = Console(stderr=True)
OPENXLAB_GIT = "https://code.openxlab.org.cn"


class PublishError(RuntimeError):
    """The hub refused or could not be reached; the message says what to do."""


def publish(recipe: Recipe, folder: Path, verify: dict, *, dry_run: bool = False) -> dict:
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    card = model_card(recipe, folder, verify)
    target = f"{recipe.publish.hub}:{recipe.publish.repo}"
    if dry_run:
        visibility = "private" if recipe.publish.private else "public"
        console.print(f"dry run: would publish to {target} ({visibility}):")
        for name in [*files, "README.md (generated model card)"]:
            console.print(f"  {name}")
        return {"dry_run": True, "target": target, "files": [*files, "README.md"]}
    token = _token(recipe)
    if recipe.publish.hub == "huggingface":
        url = _to_huggingface(recipe, folder, files, card, token)
    else:
        url = _to_openxlab(recipe, folder, card, token)
    return {"target": target, "url": url, "files": [*files, "README.md"]}


def _token(recipe: Recipe) -> str | None:
    name = recipe.publish.token_env
    if name is None:
        return None  # huggingface_hub falls back to HF_TOKEN or a saved login
    value = os.environ.get(name)
    if not value:
        raise RecipeError(f"publish.token_env names {name}, but it is not set: export {name}=... "
                          "with a write token for the hub, then run the build again.")
    return value


def _to_huggingface(recipe: Recipe, folder: Path, files: list[str], card: str, token: str | None) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    # HfApi honours HF_ENDPOINT, so a mirror or a local stand-in for the hub works the same way.
    api = HfApi(token=token)
    repo = recipe.publish.repo
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
                  for name in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    try:
        api.create_repo(repo, private=recipe.publish.private, exist_ok=True, repo_type="model")
        commit = api.create_commit(repo, operations, commit_message=f"xlab-deploy: {recipe.name}")
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        hint = {401: "the token is missing or invalid", 403: "the token cannot write to this repo"}
        raise PublishError(f"Hugging Face refused the upload to {repo} ({status}: "
                           f"{hint.get(status, 'see the hub status')}). Check publish.repo and the "
                           f"token in ${recipe.publish.token_env or 'HF_TOKEN'}.") from None
    except OSError as exc:
        raise PublishError(f"Cannot reach the hub ({type(exc).__name__}): check the network or "
                           "HF_ENDPOINT, then run the build again; finished steps are kept.") from None
    return commit.commit_url


def _to_openxlab(recipe: Recipe, folder: Path, card: str, token: str | None) -> str:
    """Push the folder to the OpenXLab model repo with git and git-lfs, as OpenXLab's docs do."""
    remote = f"{os.environ.get('XLAB_OPENXLAB_GIT', OPENXLAB_GIT)}/{recipe.publish.repo}.git"
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    if token:
        # The credential travels in git's environment config, never on a command line.
        owner = recipe.publish.repo.split("/")[0]
        basic = base64.b64encode(f"{owner}:{token}".encode()).decode()
        env.update({"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
                    "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}"})
    with tempfile.TemporaryDirectory(prefix="xlab-publish-") as tmp:
        repo = Path(tmp) / "repo"

        def git(*args: str, cwd: Path = repo) -> None:
            run = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
            if run.returncode:
                detail = run.stderr.replace(token, "***") if token else run.stderr
                raise PublishError(f"git {args[0]} to {remote} failed: {detail.strip()[-500:]}")

        git("init", "-q", "-b", "main", str(repo), cwd=Path(tmp))
        git("lfs", "install", "--local")
        git("lfs", "track", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.model")
        for item in folder.iterdir():
            if item.is_file():
                link_or_copy(str(item), str(repo / item.name))
        (repo / "README.md").write_text(card, encoding="utf-8")
        git("add", "-A")
        git("-c", "user.name=xlab-deploy", "-c", "user.email=xlab-deploy@localhost", "commit", "-q",
            "-m", f"xlab-deploy: {recipe.name}")
        git("push", "-q", "--force", remote, "main")
    return remote


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
