"""A Hugging Face fast tokenizer without transformers, for the llama.cpp engine.

transformers is 131 MB of the CPU image (docs/data/image-venv-sizes.json) and seconds of import at
every start, and the llama.cpp engine needs only a tokenizer and a chat template from it. The
folder's tokenizer.json is read by `tokenizers` (the library transformers' fast tokenizers run on:
the same ids), and the chat template is rendered by llama-cpp-python's Jinja2ChatFormatter, which
keeps transformers' sandbox, extensions and `tojson` (llama_cpp/llama_chat_format.py). It offers
the part of a transformers tokenizer the kit calls; tests/engines/test_lean_tokenizer.py holds it
equal to transformers on the bundled model.
"""

from __future__ import annotations

import json
from pathlib import Path


def _token_text(value) -> str | None:
    """tokenizer_config.json spells a special token as text or as {"content": text, ...}."""
    return value.get("content") if isinstance(value, dict) else value


def read_chat_template(model_dir: Path, config: dict) -> str | None:
    """The folder's chat template: chat_template.jinja (transformers 5 writes it there), else the
    tokenizer config's, which may be a list of named templates ("default" is the chat one)."""
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default")
    return template


class LeanTokenizer:
    def __init__(self, model_dir: Path, chat_template: str | None = None):
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        config_file = model_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.backend_tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token_id = self.backend_tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        template = chat_template or read_chat_template(model_dir, config)
        if not template:
            raise ValueError(f"The tokenizer in {model_dir} has no chat template: set "
                             "model.chat_template in the recipe.")
        self.chat_template = template

    @property
    def chat_template(self) -> str:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str) -> None:
        # Assignable, as on a transformers tokenizer: the formatter follows the template.
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._chat_template = template
        self._formatter = Jinja2ChatFormatter(template, eos_token=self.eos_token or "",
                                              bos_token=self.bos_token or "")

    def __deepcopy__(self, memo):
        # The Jinja formatter holds a compiled template that does not deep-copy; rebuild it instead.
        clone = object.__new__(type(self))
        clone.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_formatter"})
        clone.chat_template = self._chat_template
        return clone

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True):
        if tokenize or not add_generation_prompt:
            raise NotImplementedError("the kit renders chat prompts as text, ready for an answer")
        return self._formatter(messages=messages).prompt

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token: int) -> str | None:
        return self.backend_tokenizer.id_to_token(token)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend_tokenizer.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)
