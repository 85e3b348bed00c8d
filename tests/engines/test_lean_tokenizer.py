"""The llama.cpp engine's tokenizer without transformers gives transformers' prompts, ids and text
on the bundled model: chat prompts (system, multi-turn, a tool schema's JSON), raw text with
special tokens, odd Unicode, and decoding with and without special tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from deploy.builder.manifest import built_model_dir
from deploy.engines.chat_format import encode_chat

pytest.importorskip("llama_cpp", reason="the CPU engine's extra is not installed (make install)")

from deploy.engines.lean_tokenizer import LeanTokenizer  # noqa: E402  (needs llama_cpp)

TEXTS = ["Hello, world!", "  leading spaces and\ttabs\n\nnew lines", "naïve café — 東京 🚀🇫🇷",
         "<|im_start|>user\nHi<|im_end|>", "x" * 300, "def f(x):\n    return x ** 2  # squares",
         "\u200b zero width, \ufeff BOM, combining e\u0301"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in French."},
     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bonjour !"},
     {"role": "user", "content": "Name three fruits 🍎."}],
    [{"role": "user", "content": '{"type": "function", "name": "get_weather", "args": {"city": "Paris"}}'}],
]


@pytest.fixture(scope="module")
def pair(recipe):
    folder = built_model_dir(recipe)
    return LeanTokenizer(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("messages", CHATS)
def test_chat_prompts_match_transformers(pair, messages):
    lean, reference = pair
    assert encode_chat(lean, messages) == encode_chat(reference, messages)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_text_match_transformers(pair, text):
    lean, reference = pair
    ids = reference(text)["input_ids"]
    assert lean(text)["input_ids"] == ids
    for skip in (False, True):
        assert lean.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_vocabulary_and_special_tokens_match_transformers(pair):
    lean, reference = pair
    assert len(lean) == len(reference) and lean.get_vocab() == reference.get_vocab()
    assert lean.eos_token_id == reference.eos_token_id
    assert [lean.convert_ids_to_tokens(i) for i in (0, 2, 100, 49151)] == \
        [reference.convert_ids_to_tokens(i) for i in (0, 2, 100, 49151)]
    names = ("<|im_end|>", "<|endoftext|>", "hello")
    assert [lean.convert_tokens_to_ids(t) for t in names] == \
        [reference.convert_tokens_to_ids(t) for t in names]


def test_an_assigned_template_is_the_one_rendered_and_copies_are_independent(pair):
    """Code written against transformers swaps a tokenizer's template by assignment."""
    import copy

    lean, _ = pair
    clone = copy.deepcopy(lean)
    clone.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    assert clone.apply_chat_template([{"role": "user", "content": "hi"}]) == "<hi>"
    assert lean.apply_chat_template([{"role": "user", "content": "hi"}]) != "<hi>"


def test_the_recipe_template_wins_and_a_missing_one_is_named(pair, recipe, tmp_path):
    folder = built_model_dir(recipe)
    own = LeanTokenizer(folder, "{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert own.apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ValueError, match="model.chat_template"):
        LeanTokenizer(tmp_path)
