"""Stage 1, the recipe: the YAML schema (schema.py), the error users fix (errors.py) and the task
files that calibration, the quality gate and the benchmark read (tasks.py)."""

from deploy.errors import RecipeError
from deploy.recipe.schema import Recipe, chat_template_text, json_schema, load_recipe, parse_recipe

__all__ = ["Recipe", "RecipeError", "chat_template_text", "json_schema", "load_recipe", "parse_recipe"]
