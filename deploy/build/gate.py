"""Quality of one setting against another on the same prompts: top-1 agreement and mean KL.

Each prompt is answered greedily by the reference; both engines then score the same token sequence
(prompt + that answer), and the next-token distributions are compared at every answer position.
The builder gates on it; the benchmark reports it.
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
    vocab = min(p.shape[-1], q.shape[-1])
    p, q = p[:, :vocab].float(), q[:, :vocab].float()
    agree = int((p.argmax(-1) == q.argmax(-1)).sum())
    return agree, float((p.exp() * (p - q)).sum()), p.shape[0]


async def compare(reference: Engine, candidate: Engine, tokenizer, tasks: list[Task],
                  answer_tokens: int = 32, progress=None) -> Comparison:
    import torch

    agree = positions = 0
    kl_sum = 0.0
    answers = []
    params = GenerationParams(max_tokens=answer_tokens)
    for task in tasks:
        messages = task.messages()
        ref = await reference.chat(messages, params)
        cand = await candidate.chat(messages, params)
        prompt = encode_chat(tokenizer, messages)
        answer = tokenizer(ref.text, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        ids = prompt + answer
        ref_logits = (await reference.prompt_logits([ids]))[0]
        cand_logits = (await candidate.prompt_logits([ids]))[0]
        # Rows prompt-1 .. end-1 predict the answer tokens.
        span = slice(len(prompt) - 1, len(ids) - 1)
        matched, kl, count = agreement(torch.log_softmax(ref_logits[span], dim=-1),
                                       torch.log_softmax(cand_logits[span], dim=-1))
        agree, kl_sum, positions = agree + matched, kl_sum + kl, positions + count
        answers.append({"prompt": task.prompt, "original": ref.text, "quantized": cand.text})
        if progress:
            progress()
    return Comparison(len(tasks), positions, agree / positions, kl_sum / positions, answers)
