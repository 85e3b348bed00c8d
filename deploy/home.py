"""Where the kit keeps what it makes, in one place: $XLAB_DEPLOY_HOME, else ~/.cache/xlab-deploy.

    builds/NAME/            a recipe's build steps and manifest.json (deploy/builder/)
    models/bundled/NAME/    the bundled model, converted once from GGUF
    models/openxlab/ID/     models downloaded from OpenXLab
    lmdeploy-env-checked/   LMDeploy environment checks that passed (deploy/engines/)
    models/rope-compat/     links to model folders, with config.json fixed for LMDeploy
                            (deploy/engines/rope_compat.py)
    images/NAME/            Docker build contexts and stack files (deploy/package/)
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    home = os.environ.get("XLAB_DEPLOY_HOME")
    return Path(home) if home else Path.home() / ".cache" / "xlab-deploy"


def build_dir(recipe_name: str) -> Path:
    return cache_home() / "builds" / recipe_name


def bundled_model_dir(name: str) -> Path:
    return cache_home() / "models" / "bundled" / name


def openxlab_model_dir(model_id: str) -> Path:
    return cache_home() / "models" / "openxlab" / model_id.replace("/", "--")


def env_check_dir() -> Path:
    return cache_home() / "lmdeploy-env-checked"


def rope_compat_dir() -> Path:
    return cache_home() / "models" / "rope-compat"


def image_dir(recipe_name: str) -> Path:
    """Where `image context|build|compose` write by default: not a folder called build/, which
    .gitignore files, linters and pytest skip."""
    return cache_home() / "images" / recipe_name
