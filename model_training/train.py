"""Training: Adam, lr 1e-3, batch 32 (the paper's settings), early stopping on validation.

Data is streamed (``stream.py``): one pass over metadata finds the labels and trains the
tokenizer, then every epoch reads, decodes and batches in ``DataLoader`` workers; memory does
not grow with the dataset. The run folder gets ``config.yaml`` (resolved), ``tokenizer.json``,
``log.jsonl`` (one line per epoch), ``best.pt`` (best validation accuracy), ``last.pt`` (to
resume), ``metrics.json``, ``skipped.json`` (every skipped sample and why), ``curves.png`` (loss and
accuracy per epoch) and ``summary.md``.

With a pretrained backbone (``--model.backbone``) training has two phases. Phase 1: the backbone
is frozen and only what follows it learns; without augmentation the backbone's pooled features
are computed once and cached (``features.py``), so an epoch costs only the head. Phase 2
(``--finetune-epochs``, optional): the last ``--finetune-blocks`` backbone blocks learn too, from
the best phase-1 weights, at ``--finetune-lr``. The backbone's BatchNorm statistics stay ImageNet's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from classifier_core.text import TOKENIZER_KINDS, TextEncoder, train_tokenizer

from . import distributed, jsonsafe
from .augment import augment
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, write_checkpoint
from .config import TrainConfig, add_config_flags, config_to_dict, resolve_config
from .data import DataError, DataIndex, DataSpec, SkipReport, scan
from .features import FeatureCache, build_or_open, cache_key, data_fingerprint
from .model import FusedClassifier, build_model
from .stream import SplitStream, StreamConfig, loader

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_spec(cfg: TrainConfig) -> DataSpec:
    return DataSpec(list(cfg.data), cfg.seed, cfg.label_key, cfg.label_map, cfg.val_frac, cfg.test_frac, cfg.group_key,
                    cfg.image_key, cfg.caption_key, cfg.delimiter)


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 mixed precision: on CUDA by default (``--amp auto``), on CPU only when asked (``--amp bf16``)."""
    on = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    if cfg.amp not in ("auto", "bf16", "off"):
        raise DataError(f"--amp must be auto, bf16 or off, not {cfg.amp!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


@dataclass
class SplitResult:
    """Predictions over one whole split, streamed: a few numbers per sample, never the images."""

    targets: np.ndarray
    preds: np.ndarray
    logp: np.ndarray  # log-probability of the true class
    digests: np.ndarray
    skipped: SkipReport

    @property
    def accuracy(self) -> float:
        return float((self.preds == self.targets).mean()) if len(self.targets) else float("nan")

    @property
    def loss(self) -> float:
        return float(-self.logp.mean()) if len(self.targets) else float("nan")


@torch.no_grad()
def predict_split(model: FusedClassifier, spec: DataSpec, split: str, labels: list[str], tok_json: str,
                  cfg: TrainConfig, dd: distributed.Dist, batch_size: int = 64,
                  cache: FeatureCache | None = None) -> SplitResult:
    """The whole split's predictions: under torchrun each rank predicts its share and all ranks get the whole.

    ``cache``: this rank's share of the split as cached backbone features (phase 1 of a frozen backbone).
    """
    part = (_predict_cached(model, cache, dd, batch_size) if cache is not None
            else _predict_share(model, spec, split, labels, tok_json, cfg, dd, batch_size))
    if not dd.enabled:
        return part
    shares = [r for r in dd.gather(part) if isinstance(r, SplitResult)]
    skipped = SkipReport()
    for r in shares:
        skipped.merge(r.skipped)
    cat = {k: np.concatenate([getattr(r, k) for r in shares]) for k in ("targets", "preds", "logp", "digests")}
    return SplitResult(cat["targets"], cat["preds"], cat["logp"], cat["digests"], skipped)


def _predict_share(model: FusedClassifier, spec: DataSpec, split: str, labels: list[str], tok_json: str,
                   cfg: TrainConfig, dd: distributed.Dist, batch_size: int) -> SplitResult:
    device = dd.device
    # batches of 64, not 256: the paper model's conv activations at 256 rows raised the trainer's
    # peak RSS by about 200 MB (measured with benchmarks.train_data), for no gain in speed on CPU
    model.eval()
    stream = SplitStream(spec, split, labels, tok_json, StreamConfig(cfg.model.image_size, batch_size, cfg.max_len,
                                                                     rank=dd.rank, world=dd.world))
    parts: dict[str, list[np.ndarray]] = {"targets": [], "preds": [], "logp": [], "digests": []}
    skipped = SkipReport()
    for b in loader(stream, cfg.workers, pin_memory=device.type == "cuda"):
        for reason, key in b.get("skipped_keys", []):
            skipped.skip(reason, key)
        if len(b["targets"]) == 0:
            continue
        with autocast(cfg, device):
            logits, _ = model(b["images"].to(device, non_blocking=True), b["ids"].to(device, non_blocking=True))
        logp = torch.log_softmax(logits.float(), -1).cpu()
        # copies, never views: a batch from a loader worker lives in a shared-memory mapping, and a view
        # of its targets or digests keeps the whole mapping (with the batch's images) resident to the end
        # of the split: +470 MB over 19,000 training samples, measured with benchmarks.train_data
        parts["targets"].append(b["targets"].numpy().copy())
        parts["preds"].append(logp.argmax(-1).numpy().copy())
        parts["logp"].append(logp.gather(1, b["targets"][:, None])[:, 0].numpy().copy())
        parts["digests"].append(b["digests"].numpy().copy())
    cat = {k: np.concatenate(v) if v else np.zeros(0, np.float32 if k == "logp" else np.int64) for k, v in parts.items()}
    return SplitResult(cat["targets"], cat["preds"], cat["logp"], cat["digests"], skipped)


def _predict_cached(model: FusedClassifier, cache: FeatureCache, dd: distributed.Dist, batch_size: int) -> SplitResult:
    model.eval()
    targets, preds, logp = [], [], []
    for b in cache.batches(batch_size):
        text_pooled = b["text"].to(dd.device) if "text" in b else None
        logits, _ = model(None, b["ids"].to(dd.device), pooled=b["pooled"].to(dd.device), text_pooled=text_pooled)
        lp = torch.log_softmax(logits.float(), -1).cpu()
        targets.append(b["targets"].numpy())
        preds.append(lp.argmax(-1).numpy())
        logp.append(lp.gather(1, b["targets"][:, None])[:, 0].numpy())
    digests = cache.rows(0, cache.n)["digests"] if cache.n else np.zeros(0, np.int64)
    cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt))  # noqa: E731
    return SplitResult(cat(targets, np.int64), cat(preds, np.int64), cat(logp, np.float32), digests, SkipReport())


def duplicates_across_splits(results: dict[str, SplitResult]) -> int:
    """Samples whose decoded pixels also appear in another split (memory: the val and test digests only)."""
    held = {s: set(results[s].digests.tolist()) for s in ("val", "test")}
    shared = sum(1 for d in results["train"].digests.tolist() if d in held["val"] or d in held["test"])
    return shared + sum(1 for d in results["val"].digests.tolist() if d in held["test"])


def setup_text(cfg: TrainConfig, index: DataIndex, resume: dict[str, Any] | None, dd: distributed.Dist) -> TextEncoder:
    """One tokenizer for all ranks: rank 0 trains it (or a resumed run reads its own), the others receive it."""
    from tokenizers import Tokenizer

    if resume is not None:
        tok_json = str(resume["tokenizer"])
    elif cfg.model.text_encoder != "lstm":  # a pretrained encoder reads its own pieces: nothing to learn
        from .sentence import tokenizer_json

        tok_json = tokenizer_json()
    else:
        tok_json = dd.broadcast_str(train_tokenizer(index.captions, cfg.vocab_size, cfg.min_freq, cfg.tokenizer).to_str()  # type: ignore[attr-defined]
                                    if dd.main else None)
    text = TextEncoder(Tokenizer.from_str(tok_json), cfg.max_len)
    if dd.main and index.captions:
        log.info("caption tokens the model cannot read ([UNK]): %.1f %% of the training captions'",
                 100 * text.unknown_share(index.captions))
    return text


@dataclass
class Progress:
    """What early stopping and resuming need besides the weights."""

    epoch: int = 0  # the last finished epoch
    best_val: float = -1.0
    best_epoch: int = -1
    stale: int = 0
    phase: int = 1  # 1: the whole model, or after a frozen backbone; 2: the backbone's last blocks fine-tuned too
    best_loss: float = math.inf  # the validation loss at best_val: breaks ties of accuracy (small validation splits)


def train_limit(index: DataIndex, dd: distributed.Dist) -> int | None:
    return index.counts["train"] // dd.world * dd.world if dd.enabled else None  # equal steps on every rank


def train_epoch(cfg: TrainConfig, epoch: int, trained: torch.nn.Module, opt: torch.optim.Optimizer,
                spec: DataSpec, index: DataIndex, tok_json: str, dd: distributed.Dist,
                cache: FeatureCache | None = None) -> tuple[float, float, float]:
    """One pass over this rank's share of the training split; (loss sum, correct, count) of this rank.

    ``cache``: the frozen backbone's features of this rank's share, read instead of the images.
    """
    trained.train()
    limit = train_limit(index, dd)
    batches: Any
    if cache is not None:
        batches = cache.batches(cfg.batch_size, epoch, cfg.seed, shuffle=True)
    else:
        stream = SplitStream(spec, "train", index.labels, tok_json,
                             StreamConfig(cfg.model.image_size, cfg.batch_size, cfg.max_len, epoch=epoch, shuffle=True,
                                          buffer=cfg.shuffle_buffer, rank=dd.rank, world=dd.world, limit=limit))
        batches = loader(stream, cfg.workers, pin_memory=dd.device.type == "cuda")
    steps = math.ceil((limit or index.counts["train"]) / dd.world / cfg.batch_size)
    show = cfg.progress and dd.main and sys.stderr.isatty()  # no bars in log files
    bar = tqdm(batches, total=steps, desc=f"{cfg.model.mode} epoch {epoch}/{cfg.epochs + cfg.finetune_epochs}",
               disable=not show, leave=False)
    total, correct, loss_sum = 0, 0, 0.0
    # a rank whose share lost an image or two to decoding takes fewer steps: Join keeps DDP's collectives matched
    join: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if dd.enabled:
        from torch.distributed.algorithms.join import Join

        join = Join([trained])  # type: ignore[list-item]
    t0 = time.perf_counter()
    with join:
        for b in bar:
            if len(b["targets"]) == 0:
                continue
            if total == 0 and dd.main:
                log.info("epoch %d: first batch after %.2f s", epoch, time.perf_counter() - t0)
            ids, y = (t.to(dd.device, non_blocking=True) for t in (b["ids"], b["targets"]))
            text_pooled = b["text"].to(dd.device, non_blocking=True) if "text" in b else None
            if cache is not None:
                img, pooled = None, b["pooled"].to(dd.device, non_blocking=True)
            else:
                img, pooled = (augment(b["images"]) if cfg.augment else b["images"]).to(dd.device, non_blocking=True), None
            with autocast(cfg, dd.device):
                logits, _, parts = trained(img, ids, pooled=pooled, text_pooled=text_pooled, branches=True)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                if len(parts) == 3 and cfg.model.aux_loss_weight > 0:  # fusion heads: each branch's own head
                    loss = loss + cfg.model.aux_loss_weight * sum(
                        F.cross_entropy(z.float(), y, label_smoothing=cfg.label_smoothing) for z in parts[1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients of all ranks here
            opt.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(-1) == y).sum())
            total += len(y)
            bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.3f}")
    return loss_sum, correct, total


def train(cfg: TrainConfig, index: DataIndex | None = None) -> dict[str, Any]:
    """Train one model as configured; returns the run's summary (also in metrics.json).

    Under torchrun each rank trains on its share with DistributedDataParallel; only rank 0
    writes files and logs, and only rank 0's return value is the summary.
    """
    dd = distributed.setup(cfg.device)
    resume = read_checkpoint(Path(cfg.resume) / "last.pt") if cfg.resume else None
    if resume is not None:
        cfg.out_dir = str(cfg.resume)  # a resumed run goes on writing into its own folder
    out = Path(cfg.out_dir)
    if resume is None and not cfg.force and (out / "best.pt").exists():
        raise DataError(f"--out-dir {out} holds a run already (best.pt): pass --resume {out} to continue it, "
                        "--force to replace it, or another --out-dir")
    cfg.force = False  # a one-time permission: config.yaml, reused with --config, must not carry it
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // dd.world))
    if cfg.schedule not in ("constant", "cosine"):
        raise DataError(f"--schedule must be constant or cosine, not {cfg.schedule!r}")
    if cfg.model.text_encoder == "minilm" and not 3 <= cfg.max_len <= 512:
        raise DataError(f"--max-len {cfg.max_len}: the caption encoder reads 3 to 512 pieces, [CLS] and [SEP] included "
                        "(it was trained on up to 256)")
    if cfg.tokenizer not in TOKENIZER_KINDS:
        raise DataError(f"--tokenizer must be one of {', '.join(TOKENIZER_KINDS)}, not {cfg.tokenizer!r}")
    spec = data_spec(cfg)
    if index is None:
        index = scan(spec, max_bad="100%" if cfg.skip_bad else cfg.max_bad)
    spec = dataclasses.replace(spec, bad_keys=frozenset(key for key, _ in index.report.bad_images()))
    if cfg.model.mode != "image" and index.captioned == 0:
        raise DataError(f"{', '.join(cfg.data)}: no training sample has a caption, and a {cfg.model.mode} model reads "
                        "them; train an image-only model with --model.mode image, or add captions (a caption column, "
                        "or a .txt beside each image of a class folder)")
    if resume is not None and list(resume["labels"]) != index.labels:
        raise DataError(f"--resume {cfg.resume}: its labels {resume['labels']} differ from the data's {index.labels}")
    text = setup_text(cfg, index, resume, dd)
    tok_json = text.tokenizer.to_str()  # type: ignore[attr-defined]
    cfg.model.num_classes, cfg.model.vocab_size, cfg.model.pad_id = len(index.labels), text.vocab_size, text.pad_id
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        text.tokenizer.save(str(out / "tokenizer.json"))
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    model = build_model(cfg.model).to(dd.device)
    backbone = resume["extra"].get("backbone") if resume is not None else init_backbone(model, cfg)
    sentence = resume["extra"].get("text_encoder") if resume is not None else init_sentence_encoder(model)
    pretrained = {k: v for k, v in (("backbone", backbone), ("text_encoder", sentence)) if v}
    prog = Progress()
    log_path = out / "log.jsonl"
    if resume is not None:
        prog = restore_progress(resume, model, dd)
        log.info("resuming %s after epoch %d (phase %d)", out, prog.epoch, prog.phase)
    elif dd.main:
        log_path.write_text("")
    run = Run(cfg, model, dd, prog.phase)
    if resume is not None:
        run.restore(resume)
    resumed_after = prog.epoch if resume is not None else None
    caches: dict[str, FeatureCache | None] = {}
    t0 = time.time()
    epoch = prog.epoch
    if prog.phase == 1 and prog.stale >= cfg.patience:
        epoch = max(epoch, cfg.epochs)  # phase 1 had stopped early before the run was interrupted
    while epoch < cfg.epochs + cfg.finetune_epochs:
        epoch += 1
        if prog.phase == 1 and epoch > cfg.epochs:  # phase 2: from the best phase-1 weights
            model.load_state_dict(read_checkpoint(out / "best.pt")["state_dict"])
            if model.branch_heads is not None:  # a finished run's best.pt holds its fit: train on as trained before
                model.fusion_weights.fill_(1.0)
                model.fusion_temperatures.fill_(1.0)
            prog.phase, prog.stale = 2, 0
            run = Run(cfg, model, dd, 2)
            caches = {}
            log.info("fine-tuning the backbone's last %d blocks and the caption encoder's last %d layers at lr %g",
                     cfg.finetune_blocks if model.backbone is not None else 0,
                     cfg.finetune_text_layers if model.sentence_encoder is not None else 0, cfg.finetune_lr)
        if run.cached and not caches:
            fingerprint = data_fingerprint(spec)  # once per run, for both splits' keys
            caches = {s: feature_cache(model, cfg, spec, s, index, tok_json, dd, pretrained, fingerprint) for s in ("train", "val")}
        loss_sum, correct, total = dd.sum(*train_epoch(cfg, epoch, run.trained, run.opt, spec, index, tok_json, dd,
                                                       caches.get("train")))
        if run.sched is not None:
            run.sched.step()
        prog.epoch = epoch
        stop = False
        val = predict_split(model, spec, "val", index.labels, tok_json, cfg, dd, cache=caches.get("val"))
        if dd.main:
            row = {"epoch": epoch, "phase": prog.phase, "train_loss": loss_sum / max(total, 1),
                   "train_acc": correct / max(total, 1), "val_loss": val.loss, "val_acc": val.accuracy,
                   "seconds": round(time.time() - t0, 1), "world_size": dd.world}
            if resumed_after is not None:
                row["resumed_after_epoch"] = resumed_after
            with log_path.open("a") as f:
                f.write(jsonsafe.dumps(row) + "\n")
            log.info("%s epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f", cfg.model.mode, epoch,
                     row["train_loss"], row["train_acc"], val.loss, val.accuracy)
            stop = record_epoch(cfg, out, model, run.opt, run.sched, index, text, prog, val, dd.world, pretrained)
        if dd.broadcast_flag(stop):  # every rank stops the phase at the same epoch
            if prog.phase == 2 or cfg.finetune_epochs == 0:
                break
            epoch = cfg.epochs  # early stop of phase 1: on to phase 2

    if cfg.model.fusion == "heads" and cfg.model.mode == "fused":
        fit_fusion(cfg, out, spec, index, tok_json, dd, caches)
    summary = final_report(cfg, out, spec, index, tok_json, dd, t0)
    dd.barrier()
    return summary if dd.main else {}


def init_sentence_encoder(model: FusedClassifier) -> dict[str, Any] | None:
    """Load the pretrained caption encoder's weights (it stays frozen); what the checkpoint and artifact record."""
    encoder = model.sentence_encoder
    if encoder is None:
        return None
    from .sentence import SentenceEncoderError, load_minilm

    try:
        pretrained, info = load_minilm()
    except SentenceEncoderError as exc:
        raise DataError(str(exc)) from None
    encoder.load_state_dict(pretrained.state_dict())
    log.info("caption encoder %s: weights sha256 %s...", info["name"], info["weights_sha256"][:12])
    return info


def init_backbone(model: FusedClassifier, cfg: TrainConfig) -> dict[str, Any] | None:
    """Load the pretrained weights into a new model's backbone; what the checkpoint and the artifact record of them."""
    if model.backbone is None:
        return None
    from importlib import metadata

    from .backbone import BackboneError, load_pretrained, sha256_of

    try:
        pretrained, path = load_pretrained(cfg.model.backbone, cfg.model.image_size, cfg.model.backbone_weights)
    except BackboneError as exc:
        raise DataError(str(exc)) from None
    model.backbone.load_state_dict(pretrained.state_dict())
    spec = pretrained.spec
    own = cfg.model.backbone_weights is not None
    info: dict[str, Any] = {"name": spec.name, "weights_file": path.name, "weights_sha256": sha256_of(path),
            "source": "user's file" if own else spec.package,
            "package_version": None if own else metadata.version(spec.package),
            "licence": "as the user's file" if own else spec.licence, "imagenet_resolution": spec.resolution}
    log.info("backbone %s: weights %s (sha256 %s...)", spec.name, path, info["weights_sha256"][:12])
    return info


def restore_progress(resume: dict[str, Any], model: FusedClassifier, dd: distributed.Dist) -> Progress:
    """Weights, generators and early stopping of a resumed run (the optimizer comes with its phase's Run)."""
    extra = resume["extra"]
    model.load_state_dict(resume["state_dict"])
    torch.set_rng_state(resume["torch_rng"])
    if "cuda_rng" in extra and dd.device.type == "cuda":
        torch.cuda.set_rng_state(extra["cuda_rng"], dd.device)  # dropout on the GPU
    return Progress(int(extra["epoch"]), float(extra["best_val"]), int(extra["best_epoch"]), int(extra["stale"]),
                    int(extra.get("phase", 1)), float(extra.get("best_loss", math.inf)))


class Run:
    """What trains in a phase: which parameters, the (DDP) module, the optimizer and its schedule."""

    def __init__(self, cfg: TrainConfig, model: FusedClassifier, dd: distributed.Dist, phase: int) -> None:
        set_trainable(model, phase, cfg.finetune_blocks, cfg.finetune_text_layers)
        self.trained: torch.nn.Module = model
        if dd.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.trained = DistributedDataParallel(model, device_ids=[dd.device.index] if dd.device.type == "cuda" else None)
        params = [p for p in self.trained.parameters() if p.requires_grad]
        lr = cfg.lr if phase == 1 else cfg.finetune_lr
        self.opt = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.epochs)
                      if cfg.schedule == "cosine" and phase == 1 else None)
        # the cache holds what a frozen backbone computes: only in phase 1, only without augmentation
        self.cached = model.backbone is not None and phase == 1 and cfg.feature_cache and not cfg.augment

    def restore(self, resume: dict[str, Any]) -> None:
        # everything the next epoch depends on besides the weights: Adam's moments and the schedule
        # (the data order is a function of seed and epoch)
        self.opt.load_state_dict(resume["optimizer"])
        if self.sched is not None and "scheduler" in resume["extra"]:
            self.sched.load_state_dict(resume["extra"]["scheduler"])


def set_trainable(model: FusedClassifier, phase: int, finetune_blocks: int, finetune_text_layers: int = 0) -> None:
    """Phase 1 freezes a pretrained backbone whole; phase 2 unfreezes its last blocks and head convolution.
    A pretrained caption encoder is frozen in phase 1; phase 2 unfreezes its last ``finetune_text_layers``
    transformer layers (its embeddings and the layers below stay as pretrained)."""
    encoder = model.sentence_encoder
    if encoder is not None:
        for p in encoder.parameters():
            p.requires_grad = False
        if phase == 2 and finetune_text_layers > 0:
            layers = list(encoder.layers)  # type: ignore[arg-type]
            for layer in layers[max(0, len(layers) - finetune_text_layers):]:
                for p in layer.parameters():
                    p.requires_grad = True
    backbone = model.backbone
    if backbone is None:
        return
    for p in backbone.parameters():
        p.requires_grad = False
    if phase == 2:
        blocks = list(backbone._blocks)
        for module in [*blocks[len(blocks) - finetune_blocks :], backbone._conv_head, backbone._bn1]:
            for p in module.parameters():
                p.requires_grad = True


def feature_cache(model: FusedClassifier, cfg: TrainConfig, spec: DataSpec, split: str, index: DataIndex, tok_json: str,
                  dd: distributed.Dist, pretrained: dict[str, Any], fingerprint: str) -> FeatureCache:
    limit = train_limit(index, dd) if split == "train" else None
    scfg = StreamConfig(cfg.model.image_size, 64, cfg.max_len, rank=dd.rank, world=dd.world, limit=limit)
    key = cache_key(spec, split, cfg.model.image_size, pretrained, tok_json, dd.rank, dd.world, limit, fingerprint)
    folder = Path(cfg.out_dir) / "cache" / f"{split}-rank{dd.rank}of{dd.world}"
    t0 = time.perf_counter()
    cache, _ = build_or_open(model, folder, key, spec, split, index.labels, tok_json, scfg, cfg.workers, dd.device)
    log.info("%s features ready in %.1f s", split, time.perf_counter() - t0)
    return cache


def record_epoch(cfg: TrainConfig, out: Path, model: FusedClassifier, opt: torch.optim.Optimizer, sched: Any,
                 index: DataIndex, text: TextEncoder, prog: Progress, val: SplitResult, world: int,
                 pretrained: dict[str, Any] | None = None) -> bool:
    """Checkpoints and early stopping after an epoch (rank 0); True to stop (the phase).

    Better = a higher validation accuracy, or the same with a lower validation loss: on a small
    validation split accuracy plateaus at once, and the first epoch of a plateau is rarely the best.
    """
    stop = False
    val_acc, val_loss = val.accuracy, val.loss
    score = val_acc if val_acc == val_acc else float(prog.epoch)  # no val figure: keep the latest epoch
    loss = val_loss if val_loss == val_loss else math.inf
    info = dict(pretrained or {})  # backbone, text_encoder: what the weights came from
    if score > prog.best_val or (score == prog.best_val and loss < prog.best_loss):
        prog.best_val, prog.best_loss, prog.best_epoch, prog.stale = score, loss, prog.epoch, 0
        save_checkpoint(out / "best.pt", model, index.labels, text, cfg,
                        {"epoch": prog.epoch, "val_acc": val_acc, "world_size": world, "phase": prog.phase, **info})
    else:
        prog.stale += 1
        if prog.stale >= cfg.patience:
            log.info("early stop: no better validation accuracy for %d epochs", cfg.patience)
            stop = True
    # the latest state, with the optimizer's, so an interrupted run can be inspected or continued
    save_checkpoint(out / "last.pt", model, index.labels, text, cfg,
                    {"epoch": prog.epoch, "val_acc": val_acc, "world_size": world, "best_val": prog.best_val,
                     "best_loss": prog.best_loss, "best_epoch": prog.best_epoch, "stale": prog.stale, "phase": prog.phase, **info,
                     **({"scheduler": sched.state_dict()} if sched is not None else {}),
                     **({"cuda_rng": torch.cuda.get_rng_state(next(model.parameters()).device)}
                        if next(model.parameters()).is_cuda else {})},
                    optimizer=opt, rng=torch.get_rng_state())
    return stop


def final_report(cfg: TrainConfig, out: Path, spec: DataSpec, index: DataIndex, tok_json: str,
                 dd: distributed.Dist, t0: float) -> dict[str, Any]:
    """The best checkpoint on all three splits (streamed, every rank its share), the skips, and images
    shared between splits; rank 0 writes the files."""
    best, ckpt = load_checkpoint(out / "best.pt")  # rank 0 saved it before the last broadcast_flag (and fit_fusion's barrier)
    best.to(dd.device)
    results = {s: predict_split(best, spec, s, index.labels, tok_json, cfg, dd) for s in ("train", "val", "test")}
    if not dd.main:
        return {}
    report = SkipReport()
    report.merge(index.report)
    for r in results.values():
        report.merge(r.skipped)
    dups = duplicates_across_splits(results)
    if dups:
        log.warning("%d decoded images appear in more than one split: test accuracy partly measures memory "
                    "(near-duplicates? split by a source with --group-key)", dups)
    summary: dict[str, Any] = {
        "mode": cfg.model.mode,
        "best_epoch": int(ckpt["extra"]["epoch"]),  # as numbered in log.jsonl (fine-tuning counts from --epochs)
        **_epochs_run(out / "log.jsonl", int(ckpt["extra"]["epoch"])),
        "world_size": dd.world,
        **{f"{s}_acc": results[s].accuracy for s in ("train", "val", "test")},
        **{f"n_{s}": len(results[s].targets) for s in ("train", "val", "test")},
        "duplicates_across_splits": dups,
        "skipped": report.to_dict(),
        "seconds": round(time.time() - t0, 1),
    }
    (out / "metrics.json").write_text(jsonsafe.dumps(summary, indent=2))
    from .evaluate import classification_report
    from .report import plot_curves, write_summary

    plot_curves(out / "log.jsonl", out / "curves.png", f"{cfg.model.mode} model, {', '.join(cfg.data)}")
    confusion = classification_report(results["test"].targets, results["test"].preds, index.labels)["confusion_matrix"]
    write_summary(out / "summary.md", summary, list(cfg.data), index.labels, confusion)
    (out / "skipped.json").write_text(jsonsafe.dumps(report.to_json(), indent=2))
    log.info(report.summary())
    return summary


def fit_fusion(cfg: TrainConfig, out: Path, spec: DataSpec, index: DataIndex, tok_json: str, dd: distributed.Dist,
               caches: dict[str, FeatureCache | None]) -> None:
    """Fusion heads: the best checkpoint's branch heads refitted as probes (``--model.refit-heads``),
    then its head weights fitted on the validation split (``fusion.py``), written into ``best.pt``
    with the fit's figures (``extra.fusion``)."""
    from . import fusion

    best, ckpt = load_checkpoint(out / "best.pt")
    best.to(dd.device)
    fine_tuned = int(ckpt["extra"].get("phase", 1)) != 1  # fine-tuned weights: the cache is stale

    def batches(split: str) -> Any:
        cache = caches.get(split)
        if cache is None or fine_tuned:
            stream = SplitStream(spec, split, index.labels, tok_json,
                                 StreamConfig(cfg.model.image_size, 64, cfg.max_len, rank=dd.rank, world=dd.world))
            return loader(stream, cfg.workers, pin_memory=dd.device.type == "cuda")
        return cache.batches(64)

    def gathered(pair: tuple[np.ndarray, Any], axis: int) -> tuple[np.ndarray, Any]:
        shares = [s for s in dd.gather(pair) if isinstance(s, tuple)]
        second = ([np.concatenate([s[1][k] for s in shares]) for k in range(2)] if isinstance(pair[1], list)
                  else np.concatenate([s[1] for s in shares], axis=axis))
        return np.concatenate([s[0] for s in shares]), second

    refit: dict[str, Any] = {}
    if cfg.model.refit_heads:
        train_in = gathered(fusion.head_inputs(best, batches("train"), dd.device), 0)
        val_in = gathered(fusion.head_inputs(best, batches("val"), dd.device), 0)
        refit = fusion.refit_heads(best, train_in, val_in)  # the same on every rank: same rows, same L-BFGS
    targets, parts = gathered(fusion.branch_logits(best, batches("val"), dd.device), 1)
    if dd.main:
        fit = fusion.fit_weights(parts, targets, probes=bool(refit))  # refit probes: their late fusion
        _write_fusion(out, ckpt, best, {**fit, **({"refit": refit} if refit else {})})
    dd.barrier()  # every rank's final report reads best.pt: only once it holds the fitted weights


def _write_fusion(out: Path, ckpt: dict[str, Any], best: FusedClassifier, fit: dict[str, Any]) -> None:
    from . import fusion

    fusion.apply(best, fit)
    ckpt["state_dict"] = best.cpu().state_dict()
    ckpt["extra"] = {**ckpt["extra"], "fusion": fit}
    write_checkpoint(out / "best.pt", ckpt)
    heads = fit.get("val_acc_by_head", {})
    log.info("fusion heads: weights (joint, image, text) %s on %d validation rows: val acc %.4f (joint head %.4f, "
             "image head %.4f, text head %.4f, as trained %.4f)", fit["weights"], fit["rows"], fit.get("val_acc", float("nan")),
             heads.get("joint", float("nan")), heads.get("image", float("nan")), heads.get("text", float("nan")),
             heads.get("trained", float("nan")))


def _epochs_run(log_path: Path, best_epoch: int) -> dict[str, int]:
    """Epochs run, how many of them in phase 1, and the best one's place among them (1-based)."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    place = next((i for i, r in enumerate(rows, 1) if r.get("epoch") == best_epoch), best_epoch)
    return {"epochs_run": len(rows), "epochs_frozen": sum(1 for r in rows if r.get("phase", 1) == 1), "best_epoch_run": place}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model_training train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    summary = train(cfg)
    distributed.cleanup()
    if not summary:  # not rank 0
        return summary
    print(jsonsafe.dumps({k: v for k, v in summary.items() if k != "skipped"}, indent=2))  # noqa: T201
    print(f"skipped: {summary['skipped'] or 'none'}")  # noqa: T201
    return summary
