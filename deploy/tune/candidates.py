"""The settings `deploy tune` considers, and the planner's verdict on each before anything runs.

A candidate is one point of weights x KV cache x cache size x max_batch_size x session_len. On a
GPU the planner (deploy/capacity/planner.py) decides whether it fits the target card and holds the
sessions asked for. On a CPU the recipe's CPU engine runs: llama.cpp (a recipe with engine.backend
llamacpp: F16, q8_0, q4_1 and q4_0 GGUFs, an fp16 KV cache reserved up front for every sequence) or
transformers (HQQ 4-bit weights by group size, an unquantized KV cache that grows per request); the
check is `deploy plan`'s resident set for the candidate's server against the RAM
(deploy/capacity/ram_planner.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from deploy.capacity.planner import GIB, plan
from deploy.capacity.ram_planner import HEADROOM, plan_ram
from deploy.engines.formats import capability_for, fastest_weights
from deploy.engines.sizing import kv_bytes_per_token
from deploy.recipe import Recipe, parse_recipe

# Room the planner's prediction must leave on the target card. Measured on the H100 (TurboMind,
# random Llama-2-7B shapes, fixed KV budgets, docs/data/tune-h100/): fp16 weights used within
# 0.2 GiB of the prediction, AWQ weights 0.99-1.13 GiB more, up to 5.0% of an A10.
GPU_HEADROOM = 0.06
KV_ORDER = {"none": 0, "int8": 1, "int4": 2}
WEIGHT_ORDER = {"none": 0, "fp8": 1, "w4a16": 2, "q8_0": 1, "q4_1": 2, "q4_0": 3}
# llama.cpp's candidates: F16, 8-bit, 4-bit, and the 4-bit type AVX2 decodes fastest (rougher: the
# quality floor decides; docs/data/gguf-4bit-formats.json)
GGUF_WEIGHTS = ("none", "q8_0", "q4_1", "q4_0")


@dataclass(frozen=True)
class Target:
    """Where the candidates must fit: a GPU (by the planner) or this CPU machine's RAM."""

    kind: str  # "gpu" or "cpu"
    name: str
    total_bytes: int


@dataclass(frozen=True)
class Candidate:
    family: str  # lmdeploy (on a GPU) | llamacpp or transformers (on a CPU)
    weights: str  # none | fp8 | w4a16 | q8_0 | q4_1 | q4_0 (the last three: llamacpp)
    kv_cache: str  # none | int8 | int4
    max_batch_size: int
    session_len: int
    cache_max_entry_count: float | None = None
    kv_cache_gib: float | None = None
    group_size: int = 128

    @property
    def label(self) -> str:
        cache = (f"-kv{self.kv_cache_gib:g}g" if self.kv_cache_gib is not None else
                 f"-r{self.cache_max_entry_count:g}" if self.cache_max_entry_count else "")
        kv = "" if self.kv_cache == "none" else f"-kv{self.kv_cache[3:]}"
        weights = {"none": "fp", "w4a16": f"w4a16g{self.group_size}"}.get(self.weights, self.weights)
        return f"{weights}{kv}-b{self.max_batch_size}-s{self.session_len}{cache}"

    @property
    def quantization_rank(self) -> tuple[int, int]:
        """Less quantized first: the order in which answer quality can only get worse."""
        return WEIGHT_ORDER[self.weights], KV_ORDER[self.kv_cache]

    @property
    def variant(self) -> tuple[int, int, int]:
        """What decides answer quality: the quantization, and the weights' group size."""
        return (*self.quantization_rank, -self.group_size if self.weights == "w4a16" else 0)

    def recipe(self, base: Recipe) -> Recipe:
        """The base recipe with this candidate's settings. Candidates with the same weights share
        one build (`NAME-FAMILY-WEIGHTS[-gGROUP]`)."""
        data = base.model_dump(exclude={"publish"})
        engine = data["engine"]
        family = self.family
        if family in ("transformers", "llamacpp"):
            engine["backend"] = family
        elif not str(engine["backend"]).startswith("lmdeploy"):
            engine["backend"] = "auto"
        engine.update(max_batch_size=self.max_batch_size, session_len=self.session_len,
                      cache_max_entry_count=self.cache_max_entry_count,
                      kv_cache_gib=self.kv_cache_gib)
        data["quantization"].update(weights=self.weights, kv_cache=self.kv_cache,
                                    group_size=self.group_size)
        # The group size is in the build's name, so candidates that differ in it never evict
        # each other's build.
        group = f"-g{self.group_size}" if self.weights == "w4a16" else ""
        data["name"] = f"{base.name}-{family}-{self.weights}{group}"
        recipe = parse_recipe(data)
        recipe._base_dir = base._base_dir
        return recipe


@dataclass
class Verdict:
    """One candidate's fate, filled in as tuning goes: pruned, not measured, measured, chosen."""

    candidate: Candidate
    label: str
    fits: bool
    predicted_bytes: int  # nvidia-smi used on the target GPU, or `deploy plan`'s resident set on a CPU
    kv_capacity_tokens: int | None
    sessions_that_fit: int
    status: str = "pruned"  # pruned | unmeasured | measured | failed | chosen
    reason: str = ""
    measured: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["candidate"] = asdict(self.candidate)
        return data


def enumerate_candidates(base: Recipe, target: Target, sessions: int, config: dict,
                         batch_sizes: list[int] | None = None,
                         session_lens: list[int] | None = None) -> list[Candidate]:
    """Every combination worth a look. The cache size is the recipe's ratio (or 0.8) and, as the
    alternative, the exact KV budget the sessions need; on a CPU there is no cache to size."""
    gpu = target.kind == "gpu"
    batch_sizes = batch_sizes or sorted({sessions, 2 * sessions} if gpu
                                        else {max(1, sessions // 2), sessions})
    session_lens = session_lens or ([base.engine.session_len] if not gpu else
                                    sorted({base.engine.session_len,
                                            max(1024, base.engine.session_len // 2)}, reverse=True))
    if not gpu:
        return _cpu_candidates(base, config, batch_sizes, session_lens)
    ratio = base.engine.cache_max_entry_count or 0.8
    found: list[Candidate] = []
    formats = [("none", base.quantization.group_size), ("w4a16", base.quantization.group_size)]
    if fp8_fits(base, target):
        formats.insert(1, ("fp8", 128))  # 128x128 blocks: TurboMind's one FP8 layout
    for weights, group in formats:
        for kv in ("none", "int8", "int4"):
            for batch in batch_sizes:
                for session_len in session_lens:
                    found.append(Candidate("lmdeploy", weights, kv, batch, session_len,
                                           cache_max_entry_count=ratio, group_size=group))
                    # The alternative: exactly the KV the sessions need, the rest of the card left free.
                    per_token = kv_bytes_per_token(config, kv)
                    need = sessions * session_len * per_token / base.engine.tp
                    gib = max(0.01, round(need / GIB + 0.005, 2))
                    found.append(Candidate("lmdeploy", weights, kv, batch, session_len, kv_cache_gib=gib,
                                           group_size=group))
    return found


def _cpu_candidates(base: Recipe, config: dict, batch_sizes: list[int],
                    session_lens: list[int]) -> list[Candidate]:
    """The recipe's own CPU engine: a llama.cpp recipe is tuned on llama.cpp (about 10x the
    transformers engine here, docs/cpu-runtimes.md), any other on transformers. KV int8/int4 are
    listed too, so that the report says why neither CPU engine offers them."""
    group = base.quantization.group_size
    if base.engine.backend == "llamacpp":
        family, formats = "llamacpp", [(weights, group) for weights in GGUF_WEIGHTS]
    else:
        family = "transformers"
        formats = [("none", group)] + [("w4a16", g) for g in group_sizes(group, config, gpu=False)]
    return [Candidate(family, weights, kv, batch, session_len, group_size=g)
            for weights, g in formats for kv in ("none", "int8", "int4")
            for batch in batch_sizes for session_len in session_lens]


def fp8_fits(base: Recipe, target: Target) -> bool:
    """FP8 candidates where `quantization.weights: auto` would pick FP8 (engines/formats.py: Hopper
    and newer, with the engine free to compute in bf16): one rule, stated there."""
    backend = base.engine.backend if base.engine.backend.startswith("lmdeploy") else "lmdeploy-turbomind"
    choice = fastest_weights(backend, target.name, capability_for(target.name), base.engine.dtype)
    return choice.weights == "fp8"


def group_sizes(wanted: int, config: dict, gpu: bool) -> list[int]:
    """Weight group sizes to try. LMDeploy's AWQ kernels take the recipe's (128 by default). HQQ on
    a CPU trades memory for quality by group size (SmolLM2-135M: 64 gave 0.82 top-1 agreement, 32
    gave 0.98), so every size of 128, 64 and 32 that divides the model's widths is tried."""
    if gpu:
        return [wanted]
    widths = [config.get("hidden_size") or 0, config.get("intermediate_size") or 0]
    return [size for size in (128, 64, 32) if all(w % size == 0 for w in widths)] or [wanted]


def judge(base: Recipe, candidate: Candidate, target: Target, sessions: int, config: dict) -> Verdict:
    """The planner's verdict: does it fit, and does it hold `sessions` full sessions?"""
    if target.kind == "cpu":
        return _judge_cpu(base, candidate, target, sessions, config)
    p = plan(candidate.recipe(base), config, sessions=sessions, gpu_total=(target.name, target.total_bytes))
    verdict = Verdict(candidate, candidate.label, p.fits, p.nvidia_smi_used_bytes,
                      p.kv_capacity_tokens, p.sessions_that_fit)
    if not p.fits:
        verdict.reason = f"the weights ({p.weight_bytes / GIB:.1f} GiB) leave no room for a KV cache"
    elif p.nvidia_smi_used_bytes > target.total_bytes * (1 - GPU_HEADROOM):
        verdict.fits = False
        verdict.reason = (f"{p.cache_setting} needs {p.nvidia_smi_used_bytes / GIB:.1f} GiB, more than "
                          f"{100 - GPU_HEADROOM * 100:.0f}% of the {target.total_bytes / GIB:.1f} GiB "
                          f"of the {target.name}")
    elif p.sessions_that_fit < sessions:
        verdict.reason = (f"holds {p.sessions_that_fit} full sessions of {candidate.session_len} "
                          f"tokens, {sessions} asked")
    else:
        verdict.status, verdict.reason = "unmeasured", "fits; not measured yet"
    return verdict


def _judge_cpu(base: Recipe, candidate: Candidate, target: Target, sessions: int,
               config: dict) -> Verdict:
    """`deploy plan`'s memory plan for the candidate's server (ram_planner.py): llama.cpp reserves
    its fp16 KV when it starts; transformers' cache grows with the sessions actually served."""
    llamacpp = candidate.family == "llamacpp"
    # A KV-quantized candidate is refused below; its bytes are those of its unquantized twin.
    p = plan_ram(replace(candidate, kv_cache="none").recipe(base), config,
                 (target.name, target.total_bytes), sessions=None if llamacpp else sessions)
    held = min(p.sessions_that_fit, candidate.max_batch_size) if llamacpp else p.sessions_that_fit
    # llama.cpp runs max_batch_size sequences at once; more sessions wait their turn
    verdict = Verdict(candidate, candidate.label, p.fits, p.rss_bytes, None, held)
    if candidate.kv_cache != "none":
        verdict.fits = False
        engine_name = "llama.cpp (as the kit runs it)" if llamacpp else "the transformers engine"
        verdict.reason = (f"{engine_name} keeps an unquantized KV cache on a CPU; KV "
                          f"{candidate.kv_cache} is served by LMDeploy on a GPU")
    elif not p.fits:
        full = p.kv_cache_bytes // p.kv_bytes_per_token // p.session_len
        verdict.reason = (f"weights and {full} full sessions need {p.rss_bytes / GIB:.1f} GiB, more "
                          f"than {HEADROOM:.0%} of the {target.total_bytes / GIB:.1f} GiB of RAM")
    else:
        verdict.status, verdict.reason = "unmeasured", "fits; not measured yet"
    return verdict
