"""Caption encoding shared by training and serving: a WordLevel ``tokenizers`` tokenizer, no torch.

One padding routine (``pad_ids``) serves training batches, export parity checks and the
service's batches, so ids are laid out the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
EMPTY_TOKEN = "[EMPTY]"  # stands in for an empty caption so the LSTM always reads one real step
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, EMPTY_TOKEN)  # ids 0, 1, 2 in this order
PAD_ID = 0


def pad_ids(rows: Sequence[Sequence[int]], length: int | None = None, pad_id: int = PAD_ID) -> np.ndarray:
    """Right-pad id lists into an int64 ``[N, L]`` array (L = the longest row, or ``length``)."""
    width = length or max((len(r) for r in rows), default=1)
    arr = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        arr[i, : len(r)] = r
    return arr


@dataclass(frozen=True)
class EncodedText:
    ids: list[int]  # at least one id, never longer than max_len
    tokens: list[str]  # the token strings of ``ids``, for attention display


class TextEncoder:
    """Wraps a trained HuggingFace ``tokenizers`` WordLevel tokenizer (tokenizer.json)."""

    def __init__(self, tokenizer: object, max_len: int) -> None:
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise TypeError("expected a tokenizers.Tokenizer")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_len)
        vocab = self.tokenizer.get_vocab()
        for i, tok in enumerate(SPECIAL_TOKENS):
            if vocab.get(tok) != i:
                raise ValueError(f"tokenizer must map {tok} to id {i}")
        self.pad_id = 0
        self.unk_id = 1
        self.empty_id = 2
        self.vocab_size = self.tokenizer.get_vocab_size()

    @classmethod
    def from_file(cls, path: str | Path, max_len: int) -> TextEncoder:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), max_len)

    def encode(self, text: str) -> EncodedText:
        enc = self.tokenizer.encode(text)
        if not enc.ids:
            return EncodedText([self.empty_id], [EMPTY_TOKEN])
        return EncodedText(list(enc.ids), list(enc.tokens))

    def encode_batch(self, texts: Sequence[str]) -> list[EncodedText]:
        out = []
        for enc in self.tokenizer.encode_batch(list(texts)):
            out.append(EncodedText(list(enc.ids), list(enc.tokens)) if enc.ids else EncodedText([self.empty_id], [EMPTY_TOKEN]))
        return out

    def pad(self, encoded: Sequence[EncodedText], length: int | None = None) -> np.ndarray:
        """Right-pad ids into an int64 ``[N, L]`` array (L = longest, or ``length``)."""
        return pad_ids([e.ids for e in encoded], length, self.pad_id)


def train_tokenizer(captions: Iterable[str], vocab_size: int = 5000, min_frequency: int = 2) -> object:
    """A WordLevel tokenizer from the training captions only (NFKC + lowercase)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS)
    )
    tok.train_from_iterator(captions, trainer=trainer)
    return tok
