"""LoRA adapters: made here with peft on the bundled SmolLM2 (weights set by hand), merged by the
builder, and served; plus the README's Python example, run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
import yaml

from deploy.builder.pipeline import build, work_dir
from deploy.builder.sources import bundled_model_dir
from deploy.recipe import RecipeError, load_recipe
from deploy.serve.assistant import Assistant

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What is the capital of France?"


def make_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA's B starts at zero (a no-op adapter): give it weights by hand
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(out)
    return out


def recipe_with_adapter(tmp_path: Path, adapter: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    data = yaml.safe_load((ROOT / "recipes" / "smollm2-cpu.yaml").read_text())
    data["name"] = name
    data["model"]["adapter"] = str(adapter)
    data["engine"]["backend"] = "transformers"  # a merge writes safetensors; llama.cpp reads GGUF
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapter")
    adapter = make_adapter(bundled_model_dir("SmolLM2-135M-Instruct"), tmp / "lora")
    recipe = load_recipe(recipe_with_adapter(tmp, adapter, "test-adapter"))
    import shutil

    shutil.rmtree(work_dir(recipe), ignore_errors=True)
    return recipe, build(recipe)


def test_merged_adapter_changes_the_greedy_answer_and_serves(merged, assistant, serve_with):
    recipe, result = merged
    assert list(result.manifest["steps"]["merge"]["outputs"]) == ["model_dir", "adapter"]
    assert (result.model_dir / "model.safetensors").is_file()
    base_answer = assistant.chat(QUESTION, max_tokens=16)
    with Assistant.from_recipe(recipe) as tuned:
        tuned_answer = tuned.chat(QUESTION, max_tokens=16)
        assert tuned_answer and tuned_answer != base_answer
        with serve_with(tuned) as live:
            client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
            reply = client.chat.completions.create(
                model=recipe.name, messages=[{"role": "user", "content": QUESTION}], max_tokens=16,
                temperature=0)
    assert reply.choices[0].message.content == tuned_answer


def test_adapter_for_another_base_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4,
                                 vocab_size=49152)).save_pretrained(other)
    adapter = make_adapter(other, tmp_path / "foreign-lora")
    recipe = load_recipe(recipe_with_adapter(tmp_path, adapter, "test-adapter-foreign"))
    with pytest.raises(RecipeError, match="does not fit this base model"):
        build(recipe)


@pytest.mark.slow  # a fresh process loads the model
def test_readme_python_example_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use it from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert "Paris" in lines[0]
    assert int(lines[-1]) > 100e6  # the weight bytes from bot.memory()
