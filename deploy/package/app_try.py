"""A rehearsal of the OpenXLab app before it is pushed: the bundle from `deploy app`, run in a
container that behaves like OpenXLab's Gradio runtime.

Like that runtime, the container installs the Debian packages in packages.txt with apt-get and
the Python packages in requirements.txt with pip, works in /home/xlab-app-center, and runs
`python app.py` on port 7860. One difference, for machines with no route to PyTorch's index (or
none at all): pip takes its wheels from the kit's wheelhouse on this host, not from an index.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from deploy.package.image import LABEL, ImageError, _client, build_image_context, cpu_torch, start_and_wait
from deploy.package.wheelhouse import link_into, wheelhouse

DOCKERFILE = """\
# OpenXLab's Gradio runtime, as far as the kit knows it: Debian packages, then pip, then app.py.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}
WORKDIR /home/xlab-app-center
COPY packages.txt ./
# hadolint ignore=DL3008
RUN apt-get update \\
 && xargs -a packages.txt apt-get install -y --no-install-recommends \\
 && rm -rf /var/lib/apt/lists/*
COPY requirements.txt ./
COPY .wheels/ /tmp/wheels/
RUN PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/wheels pip install --no-cache-dir -r requirements.txt \\
 && rm -rf /tmp/wheels
COPY . .
EXPOSE 7860
CMD ["python", "app.py"]
"""

def try_app(bundle: Path, port: int = 7860, timeout: float = 600) -> str:
    """Build the bundle into an OpenXLab-like image, run it, wait for its /health; the URL."""
    if not (bundle / "app.py").is_file() or not (bundle / "requirements.txt").is_file():
        raise ImageError(f"{bundle} is not an app bundle: make one with "
                         "`python -m deploy app RECIPE --out DIR`.")
    name = container_name(bundle)
    client = _client()
    with tempfile.TemporaryDirectory(prefix="xlab-app-try-") as tmp:
        context = Path(tmp) / "context"
        shutil.copytree(bundle, context, ignore=shutil.ignore_patterns(".git", "__pycache__"))
        (context / "Dockerfile").write_text(DOCKERFILE)
        requirements = [line for line in (bundle / "requirements.txt").read_text().splitlines()
                        if line and not line.startswith("-")]
        link_into(wheelhouse("\n".join(requirements) + "\n", torch=cpu_torch()), context / ".wheels")
        tag = f"{name}:latest"
        build_image_context(context, tag, offline=False)
    try:
        client.containers.get(name).remove(force=True)  # an earlier rehearsal of this bundle
    except Exception:  # noqa: BLE001 - docker.errors.NotFound: nothing to replace
        pass
    kwargs = {"detach": True, "name": name, "labels": {LABEL: name},
              "ports": {"7860/tcp": ("127.0.0.1", port)}}
    start_and_wait(client, tag, kwargs, f"http://127.0.0.1:{port}", timeout)
    return f"http://127.0.0.1:{port}"


def container_name(bundle: Path) -> str:
    return f"xlab-app-{bundle.resolve().name.lower()}"



