"""Picking the winner: the quality floor first, then the goal, with the spread kept honest.

Goals:
- throughput: the most output tokens per second at the asked concurrency (median of the repeats);
- latency: the shortest request at that load, TTFT p50 + TPOT p50 x (answer tokens - 1);
- memory: the least memory: the planner's nvidia-smi prediction on the target GPU, or the measured
  RSS on a CPU.

Without measurements (`--plan-only`) speed and quality are unknown, so the rule is stated instead:
the longest session_len that fits; then for memory the smallest prediction, otherwise the least
quantized candidate (quality can only drop with quantization), the largest batch, the most KV tokens.
Measured or not, a shorter session_len than the recipe's only wins where the recipe's cannot.
"""

from __future__ import annotations

from deploy.tune.candidates import Verdict

GOALS = ("throughput", "latency", "memory")
WORSE = {"throughput": "lower", "latency": "slower", "memory": "more"}


def goal_value(verdict: Verdict, goal: str) -> tuple[float, float, float] | None:
    """(value, low, high) in the goal's unit, where higher is better after the sign; None if unknown."""
    m = verdict.measured
    if goal == "memory":
        cpu = verdict.candidate.family != "lmdeploy"
        value = m.get("memory_bytes") if cpu else verdict.predicted_bytes
        return None if value is None else (-value, -value, -value)
    key = "output_tok_per_s" if goal == "throughput" else "latency_ms"
    spread = m.get(key) or {}
    if spread.get("median") is None:
        return None
    sign = 1 if goal == "throughput" else -1
    low, high = sorted((sign * spread["min"], sign * spread["max"]))
    return sign * spread["median"], low, high


def choose(verdicts: list[Verdict], goal: str, min_top1: float, max_kl: float | None,
           plan_only: bool) -> Verdict | None:
    """Mark the winner `chosen` and say of each other candidate why it lost; return the winner."""
    if plan_only:
        return _choose_by_plan(verdicts, goal)
    for v in verdicts:
        if v.status != "measured":
            continue
        top1, kl = v.measured["top1_agreement"], v.measured["mean_kl"]
        if v.measured["failed_requests"]:
            v.status, v.reason = "failed", f"{v.measured['failed_requests']} requests failed under load"
        elif top1 is None and v.measured.get("not_scored"):
            v.status, v.reason = "failed", f"quality not measured: {v.measured['not_scored']}"
        elif top1 is None or top1 < min_top1:
            v.status, v.reason = "failed", f"top-1 agreement {_f(top1)} is below the floor {min_top1}"
        elif max_kl is not None and kl is not None and kl > max_kl:
            v.status, v.reason = "failed", f"mean KL {kl:.4f} is above the gate's {max_kl}"
    eligible = [v for v in verdicts if v.status == "measured" and v.fits
                and goal_value(v, goal) is not None]
    if not eligible:
        return None
    # A shorter session_len is a fallback, never a trade for speed: users lose context with it.
    longest = max(v.candidate.session_len for v in eligible)
    for v in eligible:
        if v.candidate.session_len < longest:
            v.reason = f"session_len {v.candidate.session_len} is shorter than {longest}, which also passed"
    eligible = [v for v in eligible if v.candidate.session_len == longest]
    # Ties on the goal go to the less quantized candidate: no quality is given away for nothing.
    best = max(eligible, key=lambda v: (goal_value(v, goal)[0], [-r for r in v.candidate.quantization_rank]))
    best.status, best.reason = "chosen", f"the best {goal} of the candidates that passed"
    value, low, _ = goal_value(best, goal)
    for v in eligible:
        if v is best:
            continue
        _, _, high = goal_value(v, goal)
        # Runs whose ranges overlap cannot be told apart: say so rather than rank them. Memory is
        # one reading, so 2% is its tolerance.
        tolerance = 0.02 * abs(low) if goal == "memory" else 0
        verdict = ("parity within the spread of the repeats" if high >= low - tolerance
                   else WORSE[goal])
        v.reason = f"{goal} {_describe(v, goal)} against {_describe(best, goal)}: {verdict}"
    return best


def _choose_by_plan(verdicts: list[Verdict], goal: str) -> Verdict | None:
    fitting = [v for v in verdicts if v.status == "unmeasured" and v.fits]
    if not fitting:
        return None
    if goal == "memory":
        best = min(fitting, key=lambda v: (-v.candidate.session_len, v.predicted_bytes,
                                           v.candidate.quantization_rank))
        why = "the least predicted memory that holds the sessions"
    else:
        best = min(fitting, key=lambda v: (-v.candidate.session_len, v.candidate.quantization_rank,
                                           -v.candidate.max_batch_size, -(v.kv_capacity_tokens or 0)))
        why = ("plan only: the longest session_len that fits, then the least quantization, the "
               "largest batch and the most KV tokens (speed and quality are not measured)")
    for v in fitting:
        v.reason = "fits; plan only, not measured"
    best.status, best.reason = "chosen", why
    return best


def _describe(v: Verdict, goal: str) -> str:
    m = v.measured
    if goal == "memory":
        return f"{-goal_value(v, goal)[0] / 2**30:.2f} GiB"
    unit, key = ("tok/s", "output_tok_per_s") if goal == "throughput" else ("ms", "latency_ms")
    s = m[key]
    return f"{s['median']:.1f} {unit} ({s['min']:.1f}-{s['max']:.1f})"


def _f(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"
