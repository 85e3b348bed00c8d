"""Configs without transformers 5's `rope_parameters` get a shadow folder LMDeploy can read
(deploy/engines/rope_compat.py); the GPU side of it runs on the device (benchmarks/gpu_internlm2.py)."""

from __future__ import annotations

import json

from deploy.engines.rope_compat import model_dir_for_lmdeploy, needs_rope_parameters, rope_parameters

INTERNLM2 = {"model_type": "internlm2", "rope_theta": 1000000, "rope_scaling": None,
             "hidden_size": 4096}


def test_only_configs_without_rope_parameters_under_transformers_5_need_it():
    assert needs_rope_parameters(INTERNLM2, "5.17.0")
    assert not needs_rope_parameters(INTERNLM2, "4.57.1")
    with_them = {**INTERNLM2, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    assert not needs_rope_parameters(with_them, "5.17.0")
    assert not needs_rope_parameters({"model_type": "gpt2"}, "5.17.0")


def test_rope_scaling_carries_over():
    assert rope_parameters(INTERNLM2) == {"rope_type": "default", "rope_theta": 1000000}
    dynamic = {**INTERNLM2, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    assert rope_parameters(dynamic) == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000}


def test_shadow_folder_links_everything_and_leaves_the_model_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("XLAB_DEPLOY_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("deploy.engines.rope_compat.installed_transformers", lambda: "5.17.0")
    model = tmp_path / "internlm2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(INTERNLM2))
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "tokenizer.json").write_text("{}")
    shadow = model_dir_for_lmdeploy(model, INTERNLM2)
    assert shadow != model and shadow.is_relative_to(tmp_path / "home")
    assert json.loads((shadow / "config.json").read_text())["rope_parameters"]["rope_theta"] == 1000000
    assert (shadow / "model.safetensors").resolve() == (model / "model.safetensors").resolve()
    assert (shadow / "tokenizer.json").is_symlink()
    assert json.loads((model / "config.json").read_text()) == INTERNLM2  # untouched
    assert model_dir_for_lmdeploy(model, INTERNLM2) == shadow  # made once, then reused
    fixed = {**INTERNLM2, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000}}
    assert model_dir_for_lmdeploy(model, fixed) == model
