"""Chat prompts rendered by the kit, for every engine: the recipe's template, else the tokenizer's.

LMDeploy guesses a template from the model folder's name (lmdeploy issues #2150, #2120); rendering
the prompt here and handing engines token ids removes the guess, and every engine sees the same
prompt for the same conversation.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # base.py calls encode_chat: a runtime import back would be a cycle
    from deploy.engines.base import Message


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
