"""The fused image-text classifier of Kim & Lee (2023) and its two ablations.

One module, one code path: ``mode`` picks which branches feed the head, so the
image-only, text-only and fused models differ only in that switch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("image", "text", "fused")


@dataclass
class ModelConfig:
    mode: str = "fused"  # image | text | fused (the paper's ablation switch)
    num_classes: int = 8  # set from the data's label list at train time
    image_size: int = 64  # square model input, pixels; the artifact records it
    conv_channels: tuple[int, ...] = (32, 64, 128)  # one Conv-ReLU-MaxPool block per entry
    batch_norm: bool = False  # BatchNorm after each convolution (the photo preset; not in the paper)
    global_pool: bool = False  # average the last feature map instead of flattening it (fewer weights, any size)
    image_dim: int = 128  # image feature width after the dense layer
    vocab_size: int = 1000  # set from the trained tokenizer
    pad_id: int = 0  # the tokenizer's [PAD] id; its embedding stays zero
    embed_dim: int = 64  # word embedding width
    hidden_dim: int = 128  # LSTM hidden width (= text feature width)
    attn_dim: int = 64  # width of the additive-attention scorer
    dropout: float = 0.2  # before the head, training only
    # ImageNet statistics; stored in the artifact so nobody has to guess them.
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        self.conv_channels = tuple(int(c) for c in self.conv_channels)
        self.mean = tuple(float(m) for m in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(s) for s in self.std)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ImageEncoder(nn.Module):
    """Stacked Conv2d + ReLU + MaxPool2d blocks, flattened, then a dense layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        in_ch = 3
        for out_ch in cfg.conv_channels:
            blocks += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not cfg.batch_norm)]
            if cfg.batch_norm:
                blocks.append(nn.BatchNorm2d(out_ch))
            blocks += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        side = cfg.image_size // (2 ** len(cfg.conv_channels))
        if side < 1:
            raise ValueError("image_size too small for the number of pooling blocks")
        self.global_pool = cfg.global_pool
        self.fc = nn.Linear(in_ch if cfg.global_pool else in_ch * side * side, cfg.image_dim)
        self.pixel_mean: torch.Tensor
        self.pixel_inv_std: torch.Tensor
        self.register_buffer("pixel_mean", torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_inv_std", 1.0 / (torch.tensor(cfg.std).view(1, 3, 1, 1) * 255.0), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # image: uint8 [N, H, W, 3]; scaling lives in the graph so callers send raw pixels
        x = image.permute(0, 3, 1, 2).float()  # [N, 3, H, W]
        x = (x - self.pixel_mean) * self.pixel_inv_std
        x = self.features(x)  # [N, C, H/2^k, W/2^k]
        x = x.mean(dim=(2, 3)) if self.global_pool else torch.flatten(x, 1)  # [N, C] or [N, C*h*w]
        return F.relu(self.fc(x))  # [N, image_dim]


class TextEncoder(nn.Module):
    """Embedding -> LSTM -> additive attention over time steps.

    No ``pack_padded_sequence``: the LSTM is unidirectional and ids are right-padded,
    so a real step never sees a pad; the pads are then masked out of the attention.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pad_id = cfg.pad_id
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.pad_id)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_dim, batch_first=True)
        self.attn_proj = nn.Linear(cfg.hidden_dim, cfg.attn_dim)
        self.attn_score = nn.Linear(cfg.attn_dim, 1, bias=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # input_ids: int64 [N, L], right-padded with pad_id
        mask = input_ids != self.pad_id  # [N, L]
        h, _ = self.lstm(self.embedding(input_ids))  # [N, L, hidden]
        scores = self.attn_score(torch.tanh(self.attn_proj(h))).squeeze(-1)  # [N, L]
        # finite minimum, not -inf: an all-pad row must give zeros, not NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1) * mask.to(scores.dtype)  # [N, L]
        features = torch.bmm(weights.unsqueeze(1), h).squeeze(1)  # [N, hidden]
        return features, weights


class FusedClassifier(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg) if cfg.mode in ("image", "fused") else None
        self.text_encoder = TextEncoder(cfg) if cfg.mode in ("text", "fused") else None
        width = (cfg.image_dim if self.image_encoder else 0) + (cfg.hidden_dim if self.text_encoder else 0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(width, cfg.num_classes)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        assert self.image_encoder is not None, "text-only model has no image branch"
        return self.image_encoder(image)

    def encode_text(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.text_encoder is not None, "image-only model has no text branch"
        return self.text_encoder(input_ids)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return logits [N, C] and text attention weights [N, L]."""
        feats: list[torch.Tensor] = []
        if self.image_encoder is not None:
            feats.append(self.encode_image(image))  # [N, image_dim]
        if self.text_encoder is not None:
            text_feat, attn = self.encode_text(input_ids)  # [N, hidden], [N, L]
            feats.append(text_feat)
        else:
            attn = torch.zeros_like(input_ids, dtype=torch.float32)  # [N, L]: nothing was read
        fused = torch.cat(feats, dim=-1)  # [N, width]
        return self.head(self.dropout(fused)), attn


class InferenceWrapper(nn.Module):
    """What the artifact computes: probabilities instead of logits."""

    def __init__(self, model: FusedClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, attn = self.model(image, input_ids)
        if self.model.image_encoder is None:
            # keep the unused input in the graph so every artifact has the same signature
            logits = logits + image.flatten(1)[:, :1].float() * 0.0
        return torch.softmax(logits, dim=-1), attn


def build_model(cfg: ModelConfig) -> FusedClassifier:
    return FusedClassifier(cfg)
