"""Streamed text equals the whole answer decoded at once, for a byte-level BPE tokenizer (the bundled
SmolLM2's) and a SentencePiece-style one with byte fallback, through both incremental decoders."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from deploy.engines.detokenize import OffsetDecoder, StreamDecoder, incremental_decoder

TEXTS = ["Hello world, naïve café!", "héllo wörld 世界 🤖 done", "  two  spaces\n\nand\tthen  ",
         "ünïcödé 日本語テキスト ✓"]


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama-1/2-style: a '▁' word marker, and bytes for every character outside the vocabulary."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    pieces += ["▁", "▁hello", "▁world", "▁two", "▁spaces", "▁and", "▁then", "▁done", "h", "e", "l",
               "o", "w", "r", "d", "n", "a", "t", "s", "p", "c", "f", "i", "v", "é", "▁na", "▁caf"]
    model = models.Unigram([(p, -float(len(p) == 1) - 1.0) for p in pieces], unk_id=0,
                           byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


class SlowOnly:
    """A tokenizer seen only through `decode`, as a slow (Python) tokenizer is."""

    def __init__(self, fast):
        self.decode = fast.decode


@pytest.fixture(scope="module")
def smollm2(recipe, assistant):
    return assistant.engine.tokenizer


@pytest.mark.parametrize("kind", ["stream", "offset"])
@pytest.mark.parametrize("which", ["smollm2", "sentencepiece"])
def test_streamed_pieces_join_to_the_whole_decode(kind, which, request):
    tokenizer = request.getfixturevalue("smollm2") if which == "smollm2" else sentencepiece_like()
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if which == "sentencepiece":
            assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
        decoder = StreamDecoder(tokenizer.backend_tokenizer) if kind == "stream" else OffsetDecoder(
            SlowOnly(tokenizer))
        pieces = [decoder.add([i]) for i in ids]
        pieces.append(decoder.flush())
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in p for p in pieces)  # a character is held back until whole


def test_special_tokens_are_skipped_and_a_cut_character_is_dropped(smollm2):
    ids = smollm2("<|im_start|>assistant\nbonjour 世<|im_end|>", add_special_tokens=False)["input_ids"]
    decoder = incremental_decoder(smollm2)
    assert isinstance(decoder, StreamDecoder)  # a fast tokenizer streams through `tokenizers`
    assert decoder.add(ids) + decoder.flush() == "assistant\nbonjour 世"
    world = smollm2("世", add_special_tokens=False)["input_ids"]
    assert len(world) > 1  # one character, several byte tokens
    half = OffsetDecoder(SlowOnly(smollm2))
    assert half.add(world[:1]) + half.flush() == ""  # never completed: nothing, not a U+FFFD


def test_a_tokenizer_without_a_backend_gets_the_offset_decoder(smollm2):
    assert isinstance(incremental_decoder(SlowOnly(smollm2)), OffsetDecoder)
