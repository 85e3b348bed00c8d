"""Recipe validation: the schema, the messages users see, and every shipped recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.recipe import RecipeError, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem


def test_defaults_fill_a_minimal_recipe():
    recipe = parse_recipe({})
    assert recipe.model.source == "bundled"
    assert recipe.serve.host == "127.0.0.1"
    assert recipe.quantization.group_size == 128
    assert recipe.engine.cache_max_entry_count is None


def test_bad_value_names_field_value_and_allowed_values():
    with pytest.raises(RecipeError) as err:
        parse_recipe({"quantization": {"kv_cache": "int3"}})
    msg = str(err.value)
    assert "quantization.kv_cache" in msg
    assert "'int3'" in msg
    assert "'none', 'int8' or 'int4'" in msg


def test_typo_suggests_nearest_field():
    with pytest.raises(RecipeError) as err:
        parse_recipe({"engine": {"sesion_len": 2048}})
    msg = str(err.value)
    assert "engine.sesion_len: unknown field" in msg
    assert "Did you mean 'session_len'?" in msg


def test_unknown_section_is_refused_with_suggestion():
    with pytest.raises(RecipeError, match="Did you mean 'quantization'"):
        parse_recipe({"quantisation": {}})


def test_ratio_out_of_range_and_both_cache_settings():
    with pytest.raises(RecipeError, match="engine.cache_max_entry_count"):
        parse_recipe({"engine": {"cache_max_entry_count": 1.0}})
    with pytest.raises(RecipeError, match="not both"):
        parse_recipe({"engine": {"cache_max_entry_count": 0.5, "kv_cache_gib": 4}})


@pytest.mark.parametrize("secret", [
    "hf_" + "a1B2c3D4e5" * 4,
    "sk-" + "x" * 40,
    "ghp_" + "Z" * 36,
])
def test_secret_looking_values_are_refused(secret):
    with pytest.raises(RecipeError) as err:
        parse_recipe({"serve": {"description": f"key is {secret}"}})
    assert "serve.description looks like a secret" in str(err.value)
    assert secret not in str(err.value)


def test_env_fields_take_names_not_values():
    with pytest.raises(RecipeError, match="publish.token_env"):
        parse_recipe({"publish": {"hub": "huggingface", "repo": "u/m", "token_env": "abc def"}})
    assert parse_recipe({"serve": {"api_key_env": "MY_KEY"}}).serve.api_key_env == "MY_KEY"


def test_source_needs_its_fields_and_files_must_exist(tmp_path):
    with pytest.raises(RecipeError, match="model.id is required"):
        parse_recipe({"model": {"source": "huggingface"}})
    path = write(tmp_path, "model:\n  source: local\n  path: nowhere\n  chat_template: t.jinja\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "model.path: folder 'nowhere' not found" in str(err.value)
    assert "model.chat_template: file 't.jinja' not found" in str(err.value)


def test_cli_validate_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, "engine:\n  backend: vllm\n")
    run = subprocess.run([sys.executable, "-m", "deploy", "validate", str(path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    assert "engine.backend: 'vllm' is not allowed" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_validate_bad_yaml_and_missing_file(tmp_path):
    bad = write(tmp_path, "engine: [\n")
    run = subprocess.run([sys.executable, "-m", "deploy", "validate", str(bad),
                          str(tmp_path / "absent.yaml")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    assert "not valid YAML at line 2" in run.stderr
    assert "no such recipe file" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_schema_is_json_schema_of_the_recipe(tmp_path):
    out = tmp_path / "schema.json"
    run = subprocess.run([sys.executable, "-m", "deploy", "schema", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    schema = json.loads(out.read_text())
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {
        "name", "model", "quantization", "engine", "serve", "docker", "publish"
    }


def test_removed_target_field_says_what_to_do():
    with pytest.raises(RecipeError, match=r"target: this field was removed .* the verb picks"):
        parse_recipe({"target": "local"})


def test_yaml_aliases_are_refused_quickly(tmp_path):
    """A 'billion laughs' recipe: nine levels of nine aliases would expand to 387 million items."""
    import subprocess
    import sys
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nname: bomb\n")
    run = subprocess.run([sys.executable, "-m", "deploy", "validate", str(bomb)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "line 2 uses a YAML alias" in run.stderr  # refused, unexpanded
    assert "Traceback" not in run.stderr
