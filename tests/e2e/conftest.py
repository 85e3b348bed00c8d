"""Fixtures for the end-to-end tests: a real Docker engine, the project's own or CI's."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.helpers import ROOT, in_ci

LABEL = "xlab-deploy.recipe"
# Images a later test builds on (the kit's default CPU image, the swarm's node image): kept between
# tests so that their layers are reused. Every other image a test makes is removed after it.
KEPT_IMAGES = {"xlab-deploy/smollm2-cpu:latest", "local/swarm-node:bookworm"}


@pytest.fixture(scope="module")
def engine():
    """DOCKER_HOST and the base images' names, from the project's own engine script."""
    env_before = {k: os.environ.get(k) for k in ("DOCKER_HOST", "XLAB_DEPLOY_BASE_IMAGE",
                                                  "XLAB_DEPLOY_PROXY_IMAGE")}
    running_before = subprocess.run(["docker", "version"], capture_output=True).returncode == 0 \
        if shutil.which("docker") else False
    if os.geteuid() != 0 and not running_before:
        reason = "no Docker engine runs and starting one needs root"
        pytest.fail(reason) if in_ci() else pytest.skip(reason)
    run = subprocess.run(["bash", str(ROOT / "tools" / "docker_engine.sh")], capture_output=True,
                         text=True)
    if run.returncode:
        message = f"tools/docker_engine.sh failed:\n{run.stderr[-2000:]}"
        pytest.fail(message) if in_ci() else pytest.skip(message)
    exports = dict(line.removeprefix("export ").split("=", 1) for line in run.stdout.split("\n") if line)
    os.environ.update(exports)
    import docker

    client = docker.from_env()
    started = set()
    yield client, started
    for container in client.containers.list(all=True, filters={"label": LABEL}):
        container.remove(force=True)
    if not running_before and os.environ.get("XLAB_KEEP_DOCKER") != "1":
        subprocess.run(["bash", str(ROOT / "tools" / "docker_engine.sh"), "stop"], check=False)
    for key, value in env_before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _image_ids(client) -> set[str]:
    return {image.id for image in client.images.list(all=True)}


@pytest.fixture(autouse=True)
def new_images_removed(request):
    """Removes the images a container test made, once it ends, passed or failed.

    One run of the container tests builds about 15 GB of images (GPU stand-in, baked 4-bit weights,
    the OpenXLab rehearsal, the swarm's nodes); left in place they filled a CI machine's disk
    (`no space left on device` mid-run). Kept: the images there before the test and KEPT_IMAGES."""
    if "engine" not in request.fixturenames:
        yield
        return
    client, _ = request.getfixturevalue("engine")
    before = _image_ids(client)
    yield
    for image in client.images.list():
        if image.id in before or KEPT_IMAGES & set(image.tags):
            continue
        try:
            client.images.remove(image.id, force=True)
        except Exception as error:  # an image still used by a leftover container: say so, go on
            print(f"could not remove image {image.tags or image.short_id}: {error}")
    client.images.prune(filters={"dangling": True})
