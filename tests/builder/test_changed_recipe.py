"""A recipe edited after its build: the last verified build is still served, with a warning that
names the fields that changed and the command that rebuilds."""

from __future__ import annotations

import json
import logging

from deploy.builder.manifest import built_model_dir, changed_since_build, manifest_path
from deploy.recipe import parse_recipe


def write_build(recipe, folder, group_size: int) -> None:
    """A manifest as the builder leaves it after a passed gate (HQQ, so no calibration read)."""
    folder.mkdir(parents=True)
    prints = {"model.safetensors": "abc"}
    steps = {
        "fetch": {"inputs": {"model": recipe.model.model_dump(include={"source", "id", "path", "revision"})},
                  "outputs": {"model_dir": str(folder.parent / "fetched")}},
        "quantize": {"inputs": {"weights": "w4a16", "group_size": group_size, "calibration": None},
                     "outputs": {"model_dir": str(folder), "method": "hqq"}, "fingerprints": prints},
        "verify": {"inputs": {"quantized_fingerprints": prints,
                              "verify": recipe.quantization.verify.model_dump()},
                   "outputs": {"passed": True, "top1_agreement": 0.97, "mean_kl": 0.01}},
    }
    path = manifest_path(recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"recipe": recipe.name, "steps": steps}))


def test_the_last_verified_build_is_served_with_the_changed_fields_named(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XLAB_DEPLOY_HOME", str(tmp_path / "home"))
    built = parse_recipe({"name": "edited", "quantization": {"weights": "w4a16", "group_size": 64}})
    folder = tmp_path / "quantized"
    write_build(built, folder, group_size=64)
    with caplog.at_level(logging.WARNING):
        assert built_model_dir(built) == folder
    assert "changed since" not in caplog.text  # unchanged: no warning

    edited = parse_recipe({"name": "edited", "quantization": {
        "weights": "w4a16", "group_size": 32, "verify": {"min_top1_agreement": 0.95}}})
    assert changed_since_build(edited, json.loads(manifest_path(edited).read_text())["steps"]) == [
        "quantization.group_size", "quantization.verify.min_top1_agreement"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert built_model_dir(edited) == folder
    assert "quantization.group_size, quantization.verify.min_top1_agreement" in caplog.text
    assert "python -m deploy build RECIPE" in caplog.text
