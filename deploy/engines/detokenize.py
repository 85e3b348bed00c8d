"""Token ids in, new text out, one request's answer at a time, in time linear in its length.

Decoding the whole answer again at every token (what the engine did first) costs O(n^2) over an
answer. Fast tokenizers get `tokenizers`' own `DecodeStream`, which keeps a small window and holds
back a character until its bytes are complete (byte fallback, multi-byte UTF-8, SentencePiece's
leading space). Other tokenizers get the same idea by hand: decode only from a prefix offset.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


def incremental_decoder(tokenizer, skip_special_tokens: bool = True) -> IncrementalDecoder:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return StreamDecoder(backend, skip_special_tokens)
    return OffsetDecoder(tokenizer, skip_special_tokens)


class IncrementalDecoder:
    def add(self, ids: list[int]) -> str:
        raise NotImplementedError

    def flush(self) -> str:
        """The rest at the end of the answer. A character whose bytes never completed is dropped:
        no later token can complete it."""
        return ""


class StreamDecoder(IncrementalDecoder):
    def __init__(self, backend, skip_special_tokens: bool = True):
        self.backend = backend
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def add(self, ids: list[int]) -> str:
        pieces = (self.stream.step(self.backend, i) for i in ids)
        return "".join(p for p in pieces if p)


class OffsetDecoder(IncrementalDecoder):
    """Decodes ids[prefix:] against ids[prefix:read] (as TGI and vLLM do): a few tokens of context
    keep word-initial spaces right, and the window moves on once a piece is complete."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):  # an incomplete character
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:]).rstrip("\ufffd")
        self.prefix = self.read = len(self.ids)
        return text[len(before):]
