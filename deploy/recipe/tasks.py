"""Task files: JSONL, one object a line, `prompt` required, `reference` and `system` optional.

The same format feeds the builder's quality gate and the benchmark. The kit ships a small sample
set (deploy/data/tasks.jsonl) with English and Chinese questions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from deploy.errors import RecipeError


@dataclass(frozen=True)
class Task:
    prompt: str
    reference: str | None = None
    system: str | None = None

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, {"role": "user", "content": self.prompt}]


def default_tasks_file() -> Path:
    return Path(str(resources.files("deploy") / "data" / "tasks.jsonl"))


def load_tasks(path: Path | None = None, limit: int | None = None) -> list[Task]:
    path = path or default_tasks_file()
    tasks = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError("needs a string field 'prompt'")
            unknown = set(row) - {"prompt", "reference", "system"}
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}; allowed: prompt, reference, system")
            tasks.append(Task(row["prompt"], row.get("reference"), row.get("system")))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise RecipeError(f"{path}, line {number}: {exc}. Each line is one JSON object.")
    if not tasks:
        raise RecipeError(f"{path} holds no tasks: add lines like {{\"prompt\": \"...\"}}.")
    return tasks[:limit] if limit else tasks
