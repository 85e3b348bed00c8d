"""The package's layering rules, read from the source by an AST scan of every import (function-level
imports included; imports under `if TYPE_CHECKING:` are for type hints only and run nothing).

docs/architecture.md explains the rules; this file is what holds them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "deploy"
# The repository's Python rooms: the package, and beside it what measures, investigates, helps and
# tests it (docs/architecture.md, "Beside the package").
ROOMS = ("deploy", "benchmarks", "experiments", "tools", "tests")
OUTSIDE = ("benchmarks", "experiments", "tools", "tests")

# Which stages each stage may import. `errors`, `home` and `atomic` sit below everything and import
# nothing; every stage may use `errors` (the root of the errors meant for users).
BELOW = {"errors"}
ALLOWED = {
    "recipe": set(),
    "engines": {"recipe", "home", "atomic"},
    "capacity": {"recipe", "engines"},
    "builder": {"recipe", "engines", "capacity", "home", "atomic"},
    "serve": {"recipe", "engines", "capacity", "builder"},  # builder: the manifest alone, see below
    "package": {"recipe", "builder", "atomic", "home", "capacity"},  # builder: likewise
    "bench": {"recipe", "engines", "capacity", "builder", "serve"},
    "tune": {"recipe", "engines", "capacity", "bench", "atomic"},  # measures through bench's worker
    "home": set(),
    "atomic": set(),
    "errors": set(),
}
TOP = {"cli", "flags", "__init__", "__main__"}  # the verbs and the public API may import any stage
MANIFEST_ONLY = {"serve", "package"}  # they find built weights only through deploy.builder.manifest


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def deploy_imports(source: str, name: str, type_only: bool = False) -> list[str]:
    """The deploy.* modules that `source` (module `name`) imports, skipping TYPE_CHECKING blocks
    unless `type_only`."""
    tree = ast.parse(source)
    skipped = set()
    for node in ast.walk(tree):
        if not type_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "deploy"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "deploy":
            # `from deploy.package import image` imports the module deploy.package.image.
            modules = [f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}")]
            found += modules if len(modules) == len(node.names) else [node.module, *modules]
    return found


def is_module(dotted: str) -> bool:
    path = PACKAGE.parent / dotted.replace(".", "/")
    return path.with_suffix(".py").is_file() or path.is_dir()


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def violations(module: str, imports: list[str]) -> list[str]:
    """Each import of `module` that breaks a rule, as a sentence."""
    own = stage(module)
    if own in TOP:
        return []
    problems = []
    for target in imports:
        other = stage(target)
        if other == own or (other in BELOW and own not in BELOW):
            continue
        if other not in ALLOWED[own]:
            problems.append(f"{module} imports {target}: the {own} stage may not import {other}")
        elif own in MANIFEST_ONLY and other == "builder" and target != "deploy.builder.manifest":
            problems.append(f"{module} imports {target}: {own} finds built weights only through "
                            "deploy.builder.manifest")
        elif own == "engines" and target in ("deploy.recipe", "deploy.recipe.schema") \
                and module != "deploy.engines.config":
            problems.append(f"{module} imports {target}: engines take an EngineConfig; only "
                            "deploy.engines.config reads the recipe")
        elif own == "serve" and other == "recipe" and module != "deploy.serve.config":
            problems.append(f"{module} imports {target}: serving takes a ServeConfig; only "
                            "deploy.serve.config reads the recipe")
        elif own == "serve" and target == "deploy.engines.config" and module != "deploy.serve.config":
            problems.append(f"{module} imports {target}: only deploy.serve.config turns a recipe "
                            "into engine settings on the serving side")
    return problems


def graph(type_only: bool = False) -> dict[str, list[str]]:
    return {module_name(p): deploy_imports(p.read_text(), module_name(p), type_only)
            for p in sorted(PACKAGE.rglob("*.py")) if "templates" not in p.parts}


def test_every_stage_imports_only_what_it_may():
    problems = [v for module, imports in graph().items() for v in violations(module, imports)]
    assert not problems, "\n".join(problems)


def test_every_module_belongs_to_a_known_stage():
    unknown = {stage(m) for m in graph()} - set(ALLOWED) - TOP
    assert not unknown, f"add these to ALLOWED and docs/architecture.md: {unknown}"


@pytest.mark.parametrize("source, module, expected", [
    ("from deploy.builder.pipeline import build", "deploy.engines.transformers_engine",
     "the engines stage may not import builder"),
    ("def f():\n    from deploy.serve import server", "deploy.engines.lmdeploy_engine",
     "the engines stage may not import serve"),
    ("from deploy.recipe import Recipe", "deploy.engines.lmdeploy_engine", "only deploy.engines.config"),
    ("from deploy.builder.pipeline import build", "deploy.serve.assistant", "only through"),
    ("from deploy.bench.runner import run_bench", "deploy.builder.gate", "may not import bench"),
    ("from deploy.recipe import Recipe", "deploy.serve.app", "only deploy.serve.config"),
    ("from deploy.engines.config import engine_config", "deploy.serve.run", "only deploy.serve.config"),
])
def test_the_checker_catches_a_broken_rule(source, module, expected):
    found = violations(module, deploy_imports(source, module))
    assert found and expected in found[0], found


def test_type_checking_imports_do_not_count():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from deploy.serve import server\n"
    assert deploy_imports(source, "deploy.engines.base") == []


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """One import cycle among the modules, as a path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in edges.get(node, []):
            if nxt not in edges:
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in edges:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)
    # Type-only imports too: a cycle there is the same tangle, only hidden from the interpreter.
    cycle = find_cycle(graph(type_only=True))
    assert cycle is None, "type-only: " + " -> ".join(cycle)
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]


def calls_to(qualified: str, folders=("deploy",)) -> set[str]:
    """Files under `folders` that call `module.function` (written as module.function(...))."""
    module, name = qualified.split(".")
    files = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                func = node.func if isinstance(node, ast.Call) else None
                if isinstance(func, ast.Attribute) and func.attr == name \
                        and isinstance(func.value, ast.Name) and func.value.id == module:
                    files.add(str(path.relative_to(ROOT)))
    return files


def definitions_of(name: str) -> set[str]:
    files = set()
    for folder in ROOMS:
        for path in (ROOT / folder).rglob("*.py"):
            if any(isinstance(n, ast.FunctionDef) and n.name == name
                   for n in ast.walk(ast.parse(path.read_text()))):
                files.add(str(path.relative_to(ROOT)))
    return files


def test_one_atomic_folder_helper_and_one_free_port():
    # In the kit, temporary folders and files renamed into place are made by one helper module.
    assert calls_to("tempfile.mkdtemp") == {"deploy/atomic.py"}
    assert calls_to("tempfile.mkstemp") == {"deploy/atomic.py"}
    assert calls_to("os.replace") == {"deploy/atomic.py"}
    assert definitions_of("atomic_dir") == {"deploy/atomic.py"}
    assert definitions_of("free_port") == {"deploy/serve/ports.py"}


def python_files(rooms=ROOMS):
    for room in rooms:
        yield from (p for p in sorted((ROOT / room).rglob("*.py")) if "templates" not in p.parts)


def test_the_package_never_imports_the_rooms_beside_it():
    """benchmarks/, experiments/, tools/ and tests/ use the kit; the kit never uses them (a
    non-editable install has none of them)."""
    found = []
    for path in python_files(("deploy",)):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(ROOT)} imports {n}" for n in names if n.split(".")[0] in OUTSIDE]
    assert not found, "\n".join(found)


def test_no_sys_path_edits():
    """Every room is importable by name from the repository root (`python -m benchmarks.NAME`,
    pytest's `pythonpath`), so no file edits sys.path. app/app.py is the one exception and is not
    scanned: the OpenXLab app imports the kit vendored beside it."""
    edits = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in python_files()
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and node.attr in ("insert", "append", "extend")
             and ast.unparse(node.value) == "sys.path"]
    assert not edits, f"sys.path edited at {edits}: import by module name from the repository root"


LONGEST_FUNCTION = 80  # lines; a function longer than a screen hides what it does


def test_no_function_in_the_package_is_longer_than_a_screen():
    long = [f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in python_files(("deploy",)) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION]
    assert not long, "split these: " + ", ".join(long)


def test_every_room_has_its_readme():
    for room in ("benchmarks", "experiments", "tools"):
        assert (ROOT / room / "README.md").is_file(), f"{room}/ needs a README.md saying what it holds"
