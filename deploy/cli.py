"""`python -m deploy VERB RECIPE`: one plain function per verb; the work lives in the modules.

Every flag a container may need to change can also be set by environment variable
(XLAB_DEPLOY_HOST, XLAB_DEPLOY_PORT), so `docker run -e ...` works without a rebuild.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from deploy import flags
from deploy.errors import KitError
from deploy.home import image_dir
from deploy.recipe import RecipeError, json_schema, load_recipe

log = logging.getLogger("deploy")


def _load(path: Path, gpu: str | None = None):
    """The recipe, with `quantization.weights: auto` resolved for `gpu` or this machine (and the
    choice printed: it decides what gets built)."""
    from deploy.engines import resolve_weights

    recipe = load_recipe(path)
    resolved = resolve_weights(recipe, gpu)
    if resolved is not recipe:
        print(f"quantization.weights auto -> {resolved.quantization.weights} (see the log line above "
              "for why)", file=sys.stderr)
    return resolved


def validate(recipes: list[Path]) -> int:
    """Check recipes in full; print each one's verdict."""
    failed = 0
    for path in recipes:
        try:
            recipe = load_recipe(path)
        except RecipeError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
            continue
        print(f"ok: {path} ({recipe.name}: {recipe.model.source} model, "
              f"{recipe.engine.backend} engine, serve {recipe.serve.mode})")
    return 2 if failed else 0


def schema(out: Path | None) -> int:
    """Write the recipe's JSON Schema, for editors."""
    text = json.dumps(json_schema(), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}")
    return 0


def build(recipe: Path, dry_run: bool, overwrite: bool) -> int:
    """Build the recipe's model: fetch, quantize, verify (quality gate), publish. Reruns skip
    finished steps; a killed build resumes."""
    from deploy.builder.pipeline import build as run_build

    result = run_build(_load(recipe), publish_dry_run=dry_run, publish_overwrite=overwrite)
    print(f"model ready: {result.model_dir}")
    return 0


def plan(recipe: Path, gpu: str | None, ram: str | None, sessions: int | None, disk_mb_s: float,
         as_json: bool) -> int:
    """Predict from config.json alone whether the recipe fits: a GPU, with what KV budget, or, for an
    engine on the CPU (llama.cpp; transformers without a GPU here), this machine's memory; and how
    long a server takes to become ready (the probes of `image stack` and `image chart` allow for it)."""
    from deploy.builder.sources import model_config
    from deploy.capacity.startup import predict_start, render_start

    loaded = _load(recipe, gpu)
    config = model_config(loaded)
    result, text = _cpu_plan(loaded, config, gpu, ram, sessions) or _gpu_plan(loaded, config, gpu, sessions)
    start = predict_start(loaded, config, disk_mb_s)
    if as_json:
        print(json.dumps({**result.as_dict(), "start": start.as_dict()}, indent=2))
    else:
        print(text + "\n" + render_start(start))
    return 0 if result.fits else 3


def _gpu_plan(recipe, config: dict, gpu: str | None, sessions: int | None):
    from deploy.capacity.planner import plan as make_plan
    from deploy.capacity.planner import render

    result = make_plan(recipe, config, gpu, sessions)
    return result, render(recipe, result)


def _cpu_plan(recipe, config: dict, gpu: str | None, ram: str | None, sessions: int | None):
    """The RAM plan, for a recipe whose engine runs on the CPU (or any recipe given --ram)."""
    from deploy.builder.manifest import local_gguf
    from deploy.capacity.ram_planner import is_cpu_recipe, parse_ram, plan_ram, render_ram, this_machine
    from deploy.engines.hardware import visible_gpus

    # Only a transformers recipe depends on a GPU being here; asking costs a torch import where NVML
    # finds no driver, so a llama.cpp recipe never asks.
    gpu_here = gpu is not None or (recipe.engine.backend == "transformers" and visible_gpus() > 0)
    on_cpu = is_cpu_recipe(recipe, gpu_here)
    if recipe.engine.backend == "llamacpp" and gpu is not None:
        raise RecipeError("engine.backend llamacpp runs on the CPU, so --gpu does not apply to this "
                          "recipe: leave it out, or give --ram to plan for another machine's memory.")
    if not on_cpu and ram is None:
        return None
    if not on_cpu and recipe.engine.backend != "transformers":
        raise RecipeError(f"--ram plans an engine on the CPU; engine.backend {recipe.engine.backend} "
                          "runs on a GPU: use --gpu.")
    machine = parse_ram(ram) if ram is not None else this_machine()
    gguf = local_gguf(recipe) if recipe.engine.backend == "llamacpp" else None
    result = plan_ram(recipe, config, machine, gguf, sessions)
    return result, render_ram(recipe, result)


def bench(recipe: Path, tasks: Path | None, settings: str | None, out: Path, profile: str | None,
          force: bool, report_only: bool, repeats: int) -> int:
    """Benchmark a matrix of settings (memory, speed, serving latency, quality) into one report."""
    from deploy.bench.runner import run_bench

    report = run_bench(recipe, tasks, settings.split(",") if settings else None, out, profile, force,
                       report_only, repeats)
    print(f"report: {report}")
    return 0


def tune(recipe: Path, gpu: str | None, sessions: int | None, min_top1: float | None, goal: str,
         budget: str, plan_only: bool, repeats: int, out: Path | None, tasks: Path | None,
         batch_sizes: str | None, session_lens: str | None) -> int:
    """Find the best settings for a GPU (or this CPU), a number of sessions and a quality floor:
    the planner prunes the candidates, the benchmark measures the survivors within the budget, and
    the winner is written as a recipe beside a report of every candidate. On a CPU the recipe's own
    engine is tuned: llama.cpp's F16, q8_0, q4_1 and q4_0 for a llamacpp recipe, else transformers with
    HQQ 4-bit group sizes."""
    from deploy.builder.sources import model_config
    from deploy.tune import parse_budget
    from deploy.tune import tune as run_tune

    loaded = _load(recipe, gpu)
    out = out or Path("tune-results") / loaded.name
    result = run_tune(loaded, model_config(loaded), out, gpu=gpu, sessions=sessions,
                      min_top1=min_top1, goal=goal, budget_s=parse_budget(budget),
                      plan_only=plan_only, repeats=repeats, tasks=tasks,
                      batch_sizes=_int_list(batch_sizes, "--batch-sizes"),
                      session_lens=_int_list(session_lens, "--session-lens"))
    print(f"report: {result.report}")
    if result.winner is None:
        print("no candidate met the targets: the report says why each lost", file=sys.stderr)
        return 3
    print(f"winner: {result.winner.label}; recipe: {result.recipe}")
    return 0


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise RecipeError(f"{flag} {text!r}: give positive whole numbers separated by commas, e.g. 8,16.")
    return values


def image(action: str, recipe: Path, out: Path | None, port: int | None, replicas: int,
          force: bool, ca_bundle: Path | None, disk_mb_s: float) -> int:
    """Container images from the recipe: write the build context, build it, run it, write a
    compose file for several replicas behind one proxy on this machine, a Docker Swarm stack for
    several machines, or a Helm chart for Kubernetes."""
    from deploy.builder.manifest import built_model_dir, check_gate
    from deploy.package import image as images

    loaded = _load(recipe)
    if replicas < 1:
        raise RecipeError(f"--replicas {replicas}: give 1 or more.")
    out = out or image_dir(loaded.name) / action
    if action in ("stack", "chart"):
        return _scale_out(action, loaded, out, replicas, disk_mb_s)
    check_gate(loaded, force=force)  # mounted or baked, weights that failed the gate never ship
    # The built folder is needed to bake it into the image, or to mount it at `run`.
    baked = loaded.docker.weights == "bake" and action in ("context", "build")
    needs = images.needs_weights(loaded) and (baked or action == "run")
    folder = built_model_dir(loaded, force=force) if needs else None
    if action == "compose":
        from deploy.engines.hardware import usable_cpus

        out.mkdir(parents=True, exist_ok=True)
        host_cpus = usable_cpus()[0]
        memory = _replica_memory(loaded)
        for name, text in images.compose_files(loaded, replicas, host_cpus=host_cpus,
                                               memory=memory).items():
            (out / name).write_text(text)
        if share := images.cpu_share(loaded, replicas, host_cpus):
            print(f"each replica gets a {share:.2f}-CPU share of this machine's {host_cpus} (cpus:), "
                  "so their engines' threads do not contend for cores")
        _say_memory(memory, "mem_reservation, mem_limit")
        model = "MODEL_DIR=/path/to/built/model " if images.needs_weights(loaded) else ""
        print(f"wrote {out / 'docker-compose.yml'}; start it with: {model}"
              f"{images.compose_command()} -f {out / 'docker-compose.yml'} up -d")
        return 0
    if action in ("context", "build"):
        images.build_context(loaded, out, folder, ca_bundle=ca_bundle)
        print(f"build context: {out}")
        if action == "build":
            print(f"built {images.build_image(loaded, out)}")
        return 0
    images.run_container(loaded, folder, port)
    return 0


def _scale_out(action: str, recipe, out: Path, replicas: int, disk_mb_s: float) -> int:
    """`image stack` and `image chart`: files for several machines, probes from the predicted start."""
    from deploy.builder.sources import model_config
    from deploy.capacity.startup import predict_start

    start = predict_start(recipe, model_config(recipe), disk_mb_s)
    memory = _replica_memory(recipe)
    if action == "chart":
        from deploy.package.chart import write_chart

        write_chart(recipe, out, replicas, start, memory)
        _say_memory(memory, "resources.requests.memory, resources.limits.memory")
        print(f"chart: {out} (startup probe allows {start.probe_grace_s} s; predicted ready after "
              f"{start.total_s:.0f} s). Install it with: helm install {recipe.name.lower()} {out}")
        return 0
    from deploy.package.stack import deploy_commands, stack_files

    out.mkdir(parents=True, exist_ok=True)
    for name, text in stack_files(recipe, replicas, start, memory).items():
        (out / name).write_text(text)
    _say_memory(memory, "deploy.resources.reservations.memory, limits.memory")
    steps = "\n".join(f"  {step}" for step in deploy_commands(str(out / "stack.yml"), recipe))
    print(f"wrote {out / 'stack.yml'} and {out / 'nginx.conf'} (healthcheck start period "
          f"{start.probe_grace_s} s; predicted ready after {start.total_s:.0f} s).\n"
          "On the first machine: docker swarm init; on each other: the `docker swarm join ...` line it "
          "prints. Every node needs the image (build it there, or push it to your registry). Then, "
          f"on a manager:\n{steps}\nThe API answers on port 8000 of every node.")
    return 0


def _replica_memory(recipe) -> tuple[int, int] | None:
    """A CPU replica's (reservation, limit) in MiB from `deploy plan`'s resident set; None for a
    GPU image, whose GPU memory is what its plan sizes."""
    from deploy.package.image import image_kind, replica_memory

    if image_kind(recipe) == "gpu":
        return None
    from deploy.builder.manifest import local_gguf
    from deploy.builder.sources import model_config
    from deploy.capacity.ram_planner import plan_ram, this_machine

    gguf = local_gguf(recipe) if recipe.engine.backend == "llamacpp" else None
    plan = plan_ram(recipe, model_config(recipe), this_machine(), gguf)
    return replica_memory(plan.rss_bytes)


def _say_memory(memory: tuple[int, int] | None, keys: str) -> None:
    if memory:
        print(f"each replica reserves {memory[0]} MiB and is limited to {memory[1]} MiB ({keys}): "
              "`deploy plan`'s resident set for the recipe, and a 1.5x margin")


def app(recipe: Path, out: Path, force: bool) -> int:
    """Write the OpenXLab app bundle for the recipe: app.py, requirements.txt, packages.txt,
    README.md with OpenXLab's front matter, recipe.yaml and the kit."""
    from deploy.package.app_bundle import write_bundle

    bundle = write_bundle(_load(recipe), out, force=force)
    print(f"app bundle: {bundle}; run it with `python app.py` there")
    return 0


def app_try(bundle: Path, port: int) -> int:
    """Rehearse an OpenXLab app bundle locally, in a container that behaves like OpenXLab's Gradio
    runtime (packages.txt with apt-get, requirements.txt with pip, python app.py on port 7860)."""
    from deploy.package.app_try import container_name, try_app

    url = try_app(bundle, port)
    print(f"the app runs at {url}; stop it with `docker rm -f {container_name(bundle)}`")
    return 0


def serve(recipe: Path | None, host: str | None, port: int | None, force: bool) -> int:
    """Serve the recipe (gradio UI + API, API only, or the terminal chat, per serve.mode)."""
    from deploy.builder.manifest import check_gate

    if recipe is None:
        raise RecipeError("Give a recipe: python -m deploy serve RECIPE (or set XLAB_DEPLOY_RECIPE).")
    loaded = _load(recipe)
    check_gate(loaded, force=force)  # refuse before the server starts, not in its loading thread
    if loaded.serve.mode == "chat":
        return chat(recipe, force)
    from deploy.serve.run import run

    run(loaded, host=host, port=port, force=force)
    return 0


def chat(recipe: Path, force: bool) -> int:
    """Chat with the recipe's model in this terminal."""
    from deploy.serve.assistant import Assistant
    from deploy.serve.terminal_chat import chat_loop

    with Assistant.from_recipe(recipe, force=force) as assistant:
        chat_loop(assistant)
    return 0


VERBS = {"validate": validate, "schema": schema, "build": build, "plan": plan, "bench": bench,
         "tune": tune, "image": image, "app": app, "app-try": app_try, "serve": serve, "chat": chat}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy",
        description="xlab-deploy: turn a recipe into a served, quantized chat assistant.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in (_recipe_verbs, _measure_verbs, _package_verbs, _serve_verbs):
        add(verbs)
    return parser


def _recipe_verbs(verbs) -> None:
    """validate, schema, build."""
    p = verbs.add_parser("validate", help=validate.__doc__, description=validate.__doc__)
    p.add_argument("recipes", nargs="+", type=Path, metavar="RECIPE")

    p = verbs.add_parser("schema", help=schema.__doc__, description=schema.__doc__)
    p.add_argument("--out", type=Path, help="write to this file instead of stdout")

    p = verbs.add_parser("build", help=build.__doc__.split(".")[0], description=build.__doc__)
    flags.recipe(p)
    p.add_argument("--dry-run", action="store_true",
                   help="show what the publish step would add, replace and keep on the remote, and "
                   "upload nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="publish on top of a remote that someone changed since this recipe's last "
                   "publish (its other files and history stay; nothing is ever force-pushed)")


def _measure_verbs(verbs) -> None:
    """plan, bench, tune."""
    p = verbs.add_parser("plan", help=plan.__doc__, description=plan.__doc__ + " Exit 3 when the "
                         "weights do not fit.")
    flags.recipe(p)
    flags.gpu(p, "H100 for an engine on a GPU")
    p.add_argument("--ram", help="the memory to fit, for an engine on the CPU: a size like 16GiB or "
                   "512MiB (default: this machine's RAM, or its cgroup's memory limit where lower)")
    flags.sessions(p)
    flags.disk(p)
    p.add_argument("--json", dest="as_json", action="store_true", help="print JSON")

    p = verbs.add_parser("bench", help=bench.__doc__, description=bench.__doc__ + " Default "
                         "settings: on a GPU lmdeploy-fp16, lmdeploy-w4a16, lmdeploy-kv8, "
                         "lmdeploy-w4a16-kv8, transformers-fp16; on a CPU llamacpp-f16, llamacpp-q4_1 "
                         "and transformers-bf16 for a recipe on engine.backend llamacpp, else "
                         "transformers-bf16, transformers-w4a16. Each runs in a fresh process; a rerun "
                         "keeps finished ones.")
    p.add_argument("recipe", type=Path, metavar="RECIPE", help="the model and engine settings to vary")
    p.add_argument("--tasks", type=Path, help="JSONL task file: prompt, optional reference and system "
                   "(default: the kit's sample set, English and Chinese)")
    p.add_argument("--settings", help="comma-separated settings (also llamacpp-q8_0, lmdeploy-kv4, "
                   "lmdeploy-w4a16-kv4; "
                   "lmdeploy-fp8 and lmdeploy-fp8-kv8: blocked FP8 weights, TurboMind on Hopper or "
                   "newer; and lmdeploy-pytorch-fp16: LMDeploy's PyTorch engine whatever the recipe's "
                   "backend)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    p.add_argument("--profile", choices=["gpu", "cpu", "smoke"], help="how much to measure "
                   "(default: gpu or cpu by machine; smoke is a quick check)")
    p.add_argument("--force", action="store_true", help="re-measure settings already measured")
    p.add_argument("--repeats", type=int, default=1, help="serving runs at each concurrency, for "
                   "the spread a comparison needs (default 1; the report shows median and range)")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite the report from OUT's results (e.g. copied from a GPU machine)")

    p = verbs.add_parser("tune", help=tune.__doc__.split(":")[0], description=tune.__doc__ +
                         " Exit 3 when no candidate meets the targets.")
    flags.recipe(p)
    flags.gpu(p, "this machine's GPU; on a CPU machine, its RAM")
    flags.sessions(p, "; also the concurrency measured")
    p.add_argument("--min-top1", type=float, help="least top-1 agreement with the unquantized "
                   "model (default: the recipe's quantization.verify.min_top1_agreement)")
    p.add_argument("--goal", choices=["throughput", "latency", "memory"], default="throughput",
                   help="what the winner is best at (default throughput)")
    p.add_argument("--budget", default="20m", help="time for measuring, e.g. 20m, 90s, 1h "
                   "(default 20m); unmeasured candidates are reported as such")
    p.add_argument("--plan-only", action="store_true", help="use the planner alone, for a GPU you "
                   "don't have: nothing is built or measured")
    p.add_argument("--repeats", type=int, default=3, help="serving runs per candidate (default 3)")
    p.add_argument("--out", type=Path, help="report folder (default tune-results/NAME); a rerun "
                   "keeps its measured candidates")
    p.add_argument("--tasks", type=Path, help="JSONL task file for the quality check (default: the "
                   "recipe's verify.tasks, else the kit's sample set)")
    p.add_argument("--batch-sizes", help="max_batch_size values to try, e.g. 8,16 (default: "
                   "sessions and twice that on a GPU; half and all of them on a CPU)")
    p.add_argument("--session-lens", help="session_len values to try, e.g. 4096,2048 (default: the "
                   "recipe's, and half of it on a GPU)")


def _package_verbs(verbs) -> None:
    """image, app, app-try."""
    p = verbs.add_parser("image", help=image.__doc__.split(":")[0], description=image.__doc__)
    p.add_argument("action", choices=["context", "build", "run", "compose", "stack", "chart"])
    flags.recipe(p)
    p.add_argument("--out", type=Path, help="where to write the context, compose file, stack or "
                   "chart (default $XLAB_DEPLOY_HOME/images/NAME/ACTION)")
    p.add_argument("--port", type=int, help="host port for `run` (default serve.port)")
    p.add_argument("--replicas", type=int, default=2, help="API replicas for `compose`, `stack` "
                   "and `chart` (default 2)")
    flags.disk(p)
    p.add_argument("--ca-bundle", type=Path, help="a PEM file of extra CAs the container trusts "
                   "(an intercepting proxy's), for downloads at run time")
    flags.force(p)

    p = verbs.add_parser("app", help=app.__doc__.split(":")[0], description=app.__doc__)
    flags.recipe(p)
    p.add_argument("--out", type=Path, required=True, help="folder to write (replaced if present)")
    flags.force(p)

    p = verbs.add_parser("app-try", help=app_try.__doc__.split(",")[0], description=app_try.__doc__)
    p.add_argument("bundle", type=Path, metavar="DIR", help="a bundle written by `app RECIPE --out DIR`")
    p.add_argument("--port", type=int, default=7860, help="host port for the app (default 7860)")


def _serve_verbs(verbs) -> None:
    """serve, chat."""
    p = verbs.add_parser("serve", help=serve.__doc__, description=serve.__doc__)
    p.add_argument("recipe", type=Path, metavar="RECIPE", nargs="?",
                   default=os.environ.get("XLAB_DEPLOY_RECIPE"),
                   help="recipe file (default: $XLAB_DEPLOY_RECIPE)")
    p.add_argument("--host", default=os.environ.get("XLAB_DEPLOY_HOST"),
                   help="interface to bind (default: serve.host, else $XLAB_DEPLOY_HOST)")
    p.add_argument("--port", type=int, default=_env_int("XLAB_DEPLOY_PORT"),
                   help="port (default: serve.port, else $XLAB_DEPLOY_PORT)")
    flags.force(p)

    p = verbs.add_parser("chat", help=chat.__doc__, description=chat.__doc__)
    flags.recipe(p)
    flags.force(p)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


class LogHandler(logging.StreamHandler):
    """The kit's console handler. A subclass on purpose: LMDeploy's get_logger raises every root
    handler whose type *is* logging.StreamHandler to ERROR, which silenced the kit's start-up
    phase times once LMDeploy was imported (seen on the H100)."""


def setup_logging(verbose: bool = False) -> None:
    handler = LogHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # A no-op where logging is set up already (under pytest, say).
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    verb = args.pop("verb")
    setup_logging(args.pop("verbose"))
    try:
        return VERBS[verb](**args)
    except (KitError, OSError) as exc:
        # Failures a user can act on carry a message that says how (an OSError names the file
        # and what went wrong with it); anything else is a bug and keeps its traceback.
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        return 130
