"""Chat prompts rendered by the kit, for every engine: the recipe's template, else the tokenizer's.

LMDeploy guesses a template from the model folder's name (lmdeploy issues #2150, #2120); rendering
the prompt here and handing engines token ids removes the guess, and every engine sees the same
prompt for the same conversation.
"""

from __future__ import annotations

from pathlib import Path

Message = dict[str, str]  # OpenAI-style: {"role": "user", "content": "..."}


def load_tokenizer(model_dir: Path, chat_template: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise ValueError(
            f"The tokenizer in {model_dir} has no chat template: set model.chat_template in the recipe."
        )
    return tokenizer


def encode_chat(tokenizer, messages: list[Message]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template already holds any BOS token, so add no special tokens a second time.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def eos_ids(model_dir: Path, tokenizer) -> list[int]:
    """Token ids that end an answer: the generation config's EOS ids and the tokenizer's."""
    import json

    ids: list[int] = []
    config = Path(model_dir) / "generation_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def pad_token_in_prompts(model_config: dict, tokenizer) -> str | None:
    """The pad token's text where this model's chat prompts contain its `pad_token_id`, else None.
    LMDeploy 0.18's PyTorch engine zeroes the embedding row of `pad_token_id` when it loads the
    weights (lmdeploy/pytorch/nn/embedding.py, `weight_loader`); TurboMind and transformers keep
    the row as stored. Where the template emits that token, the engine reads every prompt
    differently (H100: 36% next-token agreement with transformers on such prompts, 99% with the
    token swapped out; docs/data/gpu-2026-11-26-chat-logits/)."""
    pad = model_config.get("pad_token_id")
    if pad is None:
        return None
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Thanks"}]
    try:
        ids = encode_chat(tokenizer, turns)
    except Exception:  # a template that refuses this conversation: an advisory check must not stop a start
        return None
    return tokenizer.convert_ids_to_tokens(pad) if pad in ids else None
