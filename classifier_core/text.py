"""Caption encoding shared by training and serving: a ``tokenizers`` tokenizer, no torch.

Two kinds, both read from the artifact's own ``tokenizer.json`` by the same code: the WordLevel
vocabulary trained on the training captions (the paper's branch: ``[PAD]``, ``[UNK]``, ``[EMPTY]``
are ids 0, 1, 2), and a pretrained encoder's WordPiece tokenizer (all-MiniLM-L6-v2: ``[PAD]`` 0,
its post-processor adds ``[CLS]`` and ``[SEP]``, an unseen word becomes pieces). One padding routine
(``pad_ids``) serves training batches, export parity checks and the service's batches, so ids are
laid out the same everywhere.
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
    """Wraps a HuggingFace ``tokenizers`` tokenizer (tokenizer.json): ours (WordLevel) or a pretrained one."""

    def __init__(self, tokenizer: object, max_len: int) -> None:
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise TypeError("expected a tokenizers.Tokenizer")
        self.tokenizer = tokenizer
        self.max_len = max_len
        specials = tokenizer.num_special_tokens_to_add(False)
        if max_len <= specials:  # tokenizers would then skip truncation altogether
            raise ValueError(f"max_len {max_len} leaves no room for a caption beside the {specials} special tokens")
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_len)  # counts the special tokens a post-processor adds
        vocab = self.tokenizer.get_vocab()
        if EMPTY_TOKEN in vocab:  # ours: the three special tokens first, in this order
            for i, tok in enumerate(SPECIAL_TOKENS):
                if vocab.get(tok) != i:
                    raise ValueError(f"tokenizer must map {tok} to id {i}")
        elif vocab.get(PAD_TOKEN) != PAD_ID or UNK_TOKEN not in vocab:
            raise ValueError(f"tokenizer must map {PAD_TOKEN} to id {PAD_ID} and have {UNK_TOKEN}")
        self.pad_id = PAD_ID
        self.unk_id = vocab[UNK_TOKEN]
        # an empty caption: [EMPTY] (ours), or [UNK] where a tokenizer adds no tokens of its own
        self.empty_id = vocab.get(EMPTY_TOKEN, self.unk_id)
        self.empty_token = EMPTY_TOKEN if EMPTY_TOKEN in vocab else UNK_TOKEN
        self.vocab_size = self.tokenizer.get_vocab_size()

    @classmethod
    def from_file(cls, path: str | Path, max_len: int) -> TextEncoder:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), max_len)

    def encode(self, text: str) -> EncodedText:
        enc = self.tokenizer.encode(text)
        if not enc.ids:
            return EncodedText([self.empty_id], [self.empty_token])
        return EncodedText(list(enc.ids), list(enc.tokens))

    def encode_batch(self, texts: Sequence[str]) -> list[EncodedText]:
        out = []
        for enc in self.tokenizer.encode_batch(list(texts)):
            out.append(EncodedText(list(enc.ids), list(enc.tokens)) if enc.ids else EncodedText([self.empty_id], [self.empty_token]))
        return out

    def unknown_share(self, texts: Iterable[str]) -> float:
        """The share of the captions' tokens that are ``[UNK]``: what the model cannot read of them."""
        total = unknown = 0
        for enc in self.tokenizer.encode_batch(list(texts)):
            words = [i for i, special in zip(enc.ids, enc.special_tokens_mask, strict=True) if not special]  # no [CLS]/[SEP]
            total += len(words)
            unknown += sum(1 for i in words if i == self.unk_id)
        return unknown / total if total else 0.0

    def pad(self, encoded: Sequence[EncodedText], length: int | None = None) -> np.ndarray:
        """Right-pad ids into an int64 ``[N, L]`` array (L = longest, or ``length``)."""
        return pad_ids([e.ids for e in encoded], length, self.pad_id)


TOKENIZER_KINDS = ("word", "subword")


def train_tokenizer(captions: Iterable[str], vocab_size: int = 5000, min_frequency: int = 2, kind: str = "word") -> object:
    """A tokenizer from the training captions only (NFKC + lowercase).

    ``word``: the paper's WordLevel vocabulary; a word seen fewer than ``min_frequency`` times, or
    never, is ``[UNK]``. ``subword``: WordPiece pieces learned from the same captions (BERT's scheme,
    ``##`` marks a piece inside a word); a plural, a Korean word with a particle attached or a word
    never seen arrives as pieces of words that were seen instead of ``[UNK]``, as long as its
    characters were seen in the captions at those places (a word with an unseen character is one
    ``[UNK]``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind must be one of {TOKENIZER_KINDS}, got {kind!r}")
    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
        trainer: object = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS)
        )
    else:
        tok = Tokenizer(models.WordPiece(unk_token=UNK_TOKEN, continuing_subword_prefix="##"))
        tok.decoder = decoders.WordPiece(prefix="##")
        # every character of the training captions is kept (an alphabet of at most 1000), so a new word
        # is spelled from pieces at worst; merges need min_frequency occurrences
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
            limit_alphabet=1000, continuing_subword_prefix="##"
        )
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, trainer=trainer)  # type: ignore[arg-type]
    return tok
