"""Where the server process spends its part of an LMDeploy start: each step the kit's LMDeployEngine
takes before LMDeploy builds its engine, timed on its own and then under cProfile.

Usage: python -m benchmarks.profile_engine_start MODEL_DIR [--backend lmdeploy-turbomind|lmdeploy-pytorch]
       [--out DIR]

It loads no weights and starts no engine: the steps are the server's imports, LMDeploy's import, the
kit's tokenizer and the engine config, in the order LMDeployEngine runs them (lmdeploy_engine.py).
MODEL_DIR needs only config.json and the tokenizer files. Writes DIR/steps.json (seconds per step)
and DIR/STEP.txt (the 40 costliest calls by cumulative time) for each profiled step.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path


def timed(name: str, steps: dict, out: Path, fn, profile: bool = True):
    """Runs fn once, timed; the profile is of that same run (its overhead inflates Python-heavy
    steps, so the seconds in steps.json are from the clock, the ranking from the profile)."""
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    result = fn()
    if profiler:
        profiler.disable()
    steps[name] = round(time.perf_counter() - started, 3)
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
        (out / f"{name}.txt").write_text(text.getvalue())
    print(f"{name}: {steps[name]:.2f}s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--backend", default="lmdeploy-turbomind")
    parser.add_argument("--out", type=Path, default=Path("/tmp/profile-start"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    steps: dict[str, float] = {}

    timed("server_imports", steps, args.out, lambda: __import__("deploy.serve.app"))

    def lmdeploy_import():
        from lmdeploy.serve.core.async_engine import AsyncEngine
        return AsyncEngine

    timed("lmdeploy_import", steps, args.out, lmdeploy_import)

    from deploy.engines.chat_format import load_tokenizer
    from deploy.engines.config import EngineConfig
    from deploy.engines.lmdeploy_engine import lmdeploy_config

    timed("tokenizer", steps, args.out, lambda: load_tokenizer(args.model_dir))
    timed("tokenizer_again", steps, args.out, lambda: load_tokenizer(args.model_dir), profile=False)
    config = EngineConfig(backend=args.backend, dtype="float16", cache_max_entry_count=0.2)
    model_config = json.loads((args.model_dir / "config.json").read_text())
    timed("engine_config", steps, args.out, lambda: lmdeploy_config(config, model_config, args.model_dir))

    def lmdeploy_tokenizer():
        from lmdeploy.tokenizer import Tokenizer
        return Tokenizer(str(args.model_dir))

    timed("lmdeploy_tokenizer", steps, args.out, lmdeploy_tokenizer)
    (args.out / "steps.json").write_text(json.dumps(steps, indent=2))


if __name__ == "__main__":
    main()
