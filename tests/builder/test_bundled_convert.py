"""The bundled GGUF's conversion to a model folder: the kit parses the GGUF's metadata once and builds
the tokenizer from the fast-tokenizer class directly (sources.py says why). What it writes must be
what transformers' own AutoTokenizer and AutoConfig make of the same file, byte for byte."""

from __future__ import annotations

import json

from transformers import AutoConfig, AutoTokenizer

from deploy.builder.sources import BUNDLED, _bundled_gguf, _convert_gguf


def test_converted_folder_equals_what_autotokenizer_and_autoconfig_make(tmp_path):
    gguf_dir, filename = _bundled_gguf(next(iter(BUNDLED)))
    kit = tmp_path / "kit"
    _convert_gguf(gguf_dir, filename, kit, weights=False)

    reference = tmp_path / "reference"
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename).save_pretrained(reference)
    AutoConfig.from_pretrained(gguf_dir, gguf_file=filename).save_pretrained(reference)

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (kit / name).read_bytes() == (reference / name).read_bytes(), name
    config = json.loads((kit / "config.json").read_text())
    assert config == json.loads((reference / "config.json").read_text())
    assert (kit / "generation_config.json").is_file()
    # And it is a working tokenizer: the chat template renders, text round-trips.
    tokenizer = AutoTokenizer.from_pretrained(kit)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True)
    assert "Hi there" in tokenizer.decode(ids["input_ids"] if isinstance(ids, dict) else ids)
