"""Model folders whose config.json LMDeploy's PyTorch engine cannot read under transformers 5.

Published InternLM2 checkpoints (and other configs written before transformers 5) give `rope_theta`
and `rope_scaling` but no `rope_parameters`. Loaded without their hub code, transformers 5 leaves
`config.rope_parameters` None, LMDeploy 0.18's `get_rope_theta` calls `.get` on it, and the engine
process dies before it answers: the parent only says "PyTorch ZMQ engine process is not alive" (seen
on the lent H200, docs/data/gpu-2026-11-26-internlm2/). The kit hands LMDeploy a shadow folder instead:
every file linked, and config.json with `rope_parameters` built from `rope_theta` and
`rope_scaling`. The model's own folder is never written.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path

from deploy.atomic import atomic_dir, write_json
from deploy.home import rope_compat_dir

log = logging.getLogger(__name__)


def needs_rope_parameters(config: dict, transformers_version: str | None = None) -> bool:
    version = transformers_version or installed_transformers()
    return (int(version.split(".")[0]) >= 5 and "rope_theta" in config
            and not config.get("rope_parameters"))


def installed_transformers() -> str:
    return importlib.metadata.version("transformers")


def rope_parameters(config: dict) -> dict:
    """transformers 5's form of the older `rope_theta` + `rope_scaling` pair."""
    scaling = dict(config.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    return {"rope_type": kind, **scaling, "rope_theta": config["rope_theta"]}


def model_dir_for_lmdeploy(model_dir: Path, config: dict) -> Path:
    """`model_dir`, or a shadow of it whose config.json has `rope_parameters`."""
    if not needs_rope_parameters(config):
        return model_dir
    source = Path(model_dir).resolve()
    key = hashlib.sha256((str(source) + json.dumps(config, sort_keys=True)).encode()).hexdigest()[:16]
    target = rope_compat_dir() / f"{source.name}-{key}"
    if not (target / "config.json").is_file():
        with atomic_dir(target, keep_existing=True) as work:
            for item in source.iterdir():
                if item.name != "config.json":
                    (work / item.name).symlink_to(item.resolve())
            write_json(work / "config.json", {**config, "rope_parameters": rope_parameters(config)})
    log.info("config.json of %s has no rope_parameters, which LMDeploy needs under transformers 5: "
             "serving it through %s, where they are added", source, target)
    return target
