"""Quality of one setting against another on the same prompts: top-1 agreement and mean KL.

Each prompt is answered greedily by the reference; both engines then score the same token sequence
(prompt + that answer), and the next-token distributions are compared at every answer position.
The builder gates on it; the benchmark reports it. The reference runs first and its distributions
are kept on the CPU, so only one model is loaded at a time: a 7B fp16 reference and its quantized
candidate never need the GPU memory of both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from deploy.engines import Engine, GenerationParams
from deploy.engines.chat_format import encode_chat
from deploy.recipe.tasks import Task


@dataclass
class Comparison:
    prompts: int
    positions: int
    top1_agreement: float
    mean_kl: float
    answers: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def agreement(p, q) -> tuple[int, float, int]:
    """(positions where the argmax agrees, summed KL(p || q), positions) for two [len, vocab]
    log-probability tensors; a padded vocabulary is cut to the shorter of the two."""
    import torch

    vocab = min(p.shape[-1], q.shape[-1])
    # Both renormalised over the full (shared) vocabulary in float64: a record stored in half
    # precision, or a cut vocabulary, sums to slightly more or less than 1, and KL between such
    # near-distributions came out negative (-3.5e-05, the reference against itself, in CI).
    p = torch.log_softmax(p[:, :vocab].double(), dim=-1)
    q = torch.log_softmax(q[:, :vocab].double(), dim=-1)
    agree = int((p.argmax(-1) == q.argmax(-1)).sum())
    # Tokens the reference gives probability 0 (a log-probability of -inf: engines mask unused
    # vocabulary rows) add nothing to KL(p || q); computed as 0 x (-inf - q) they would make it NaN.
    prob = p.exp()
    terms = torch.where(prob > 0, prob * (p - q), torch.zeros_like(prob))
    # KL of two distributions is >= 0; what float64 rounding leaves below it is noise.
    return agree, float(terms.sum(-1).clamp_min(0).sum()), p.shape[0]


class UnscorableLogits(RuntimeError):
    """An engine returned NaN logits, so its distributions cannot be compared with anything."""


def scorable(logits, engine: Engine):
    """`logits` ([len, vocab]), or UnscorableLogits where a position holds NaN. LMDeploy 0.18's
    PyTorch engine returns NaN at every position when its KV cache is quantized, while its answers
    are whole (H100, docs/data/gpu-2026-11-26-kv-logits/); scored, that read as top-1 0.000."""
    import torch

    broken = int(torch.isnan(logits).any(-1).sum())
    if broken:
        raise UnscorableLogits(f"the {engine.name} engine returned NaN logits at {broken} of "
                               f"{logits.shape[0]} positions")
    return logits


@dataclass
class ReferenceRow:
    """The reference's answer to one task and its next-token log-probabilities over that answer,
    kept on the CPU so that the reference can be closed before the candidate loads."""

    prompt: str
    answer: str
    ids: list[int]  # prompt + answer tokens
    start: int  # the row of `logprobs`' first position in the logits of `ids`
    logprobs: object  # a float tensor [answer tokens, vocab]


async def _answers(engine: Engine, tasks: list[Task], answer_tokens: int, progress=None) -> list[str]:
    """Every task's greedy answer, all of them before any logits are asked for: on LMDeploy's
    PyTorch engine, answers asked for after a logits request came back with 2 tokens
    (docs/data/gpu-2026-11-26-logits/). The answers are the slow part: the progress bar follows them."""
    params = GenerationParams(max_tokens=answer_tokens)
    texts = []
    for task in tasks:
        texts.append((await engine.chat(task.messages(), params)).text)
        if progress:
            progress()
    return texts


async def reference_rows(reference: Engine, tokenizer, tasks: list[Task], answer_tokens: int = 32,
                         progress=None) -> list[ReferenceRow]:
    """Phase one: the reference answers each task greedily and scores its own answer."""
    import torch

    rows = []
    texts = await _answers(reference, tasks, answer_tokens, progress)
    for task, text in zip(tasks, texts, strict=True):
        prompt = encode_chat(tokenizer, task.messages())
        answer = tokenizer(text, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        ids = prompt + answer
        logits = scorable((await reference.prompt_logits([ids]))[0], reference)
        # Rows prompt-1 .. end-1 predict the answer tokens.
        start = len(prompt) - 1
        rows.append(ReferenceRow(task.prompt, text, ids, start,
                                 torch.log_softmax(logits[start:len(ids) - 1].float(), dim=-1).cpu()))
    return rows


async def compare_with(candidate: Engine, rows: list[ReferenceRow], tasks: list[Task],
                       answer_tokens: int = 32, progress=None) -> Comparison:
    """Phase two: the candidate answers the same tasks and scores the reference's sequences."""
    import torch

    agree = positions = 0
    kl_sum = 0.0
    answers = []
    texts = await _answers(candidate, tasks, answer_tokens, progress)
    for row, text in zip(rows, texts, strict=True):
        logits = scorable((await candidate.prompt_logits([row.ids]))[0], candidate)
        q = torch.log_softmax(logits[row.start:len(row.ids) - 1].float(), dim=-1)
        matched, kl, count = agreement(row.logprobs, q)
        agree, kl_sum, positions = agree + matched, kl_sum + kl, positions + count
        answers.append({"prompt": row.prompt, "original": row.answer, "quantized": text})
    return Comparison(len(rows), positions, agree / positions, kl_sum / positions, answers)
