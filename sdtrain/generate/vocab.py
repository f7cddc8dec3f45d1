"""Text to token ids and back, as the model was trained: bytes (vocabulary 256) or the
recipe's tokenizer.json. Decoding is incremental: the text of each new token is written as
soon as it is whole (a UTF-8 character split over byte tokens waits for its last byte)."""

from __future__ import annotations

import codecs

BYTE_VOCAB = 256
KEPT_CONTROLS = "\n\t"  # the layout of generated text; every other control character is escaped


class ByteVocab:
    size = BYTE_VOCAB
    description = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def stream(self) -> TextStream:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return TextStream(lambda token: decoder.decode(bytes([token])), lambda: decoder.decode(b"", final=True))


class TokenizerVocab:
    """A Hugging Face `tokenizers` tokenizer (already loaded and checked by its reader)."""

    def __init__(self, tokenizer, description: str):
        self.tokenizer, self.description = tokenizer, description
        self.size = tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def stream(self) -> TextStream:
        # A token is not always text on its own (byte-level BPE splits characters; decoders
        # join pieces), so the whole sequence is decoded again and only what is new and
        # whole is written: nothing that ends in U+FFFD, a character still missing bytes.
        ids: list[int] = []
        written = [0]

        def add(token: int) -> str:
            ids.append(token)
            text = self.tokenizer.decode(ids)
            if text.endswith("\ufffd") or len(text) < written[0]:
                return ""
            new, written[0] = text[written[0]:], len(text)
            return new

        def finish() -> str:
            text = self.tokenizer.decode(ids)
            return text[written[0]:] if len(text) > written[0] else ""

        return TextStream(add, finish)


class TextStream:
    """Feeds token ids in, hands terminal-safe text out: a model's output is data, so control
    characters other than newline and tab come out escaped (`\\x1b`), never acted on by the
    terminal."""

    def __init__(self, add, finish):
        self._add, self._finish = add, finish

    def add(self, token: int) -> str:
        return safe_for_terminal(self._add(token))

    def finish(self) -> str:
        return safe_for_terminal(self._finish())


def safe_for_terminal(text: str) -> str:
    return "".join(ch if ch.isprintable() or ch in KEPT_CONTROLS else repr(ch)[1:-1] for ch in text)
