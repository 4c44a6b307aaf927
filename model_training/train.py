"""Training: Adam, lr 1e-3, batch 32 (the paper's settings), early stopping on validation.

The run folder gets ``config.yaml`` (resolved), ``tokenizer.json``, ``log.jsonl`` (one
line per epoch), ``best.pt`` (best validation accuracy), ``metrics.json`` and
``skipped.json`` (what the readers skipped and why).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from classifier_core.text import TextEncoder, train_tokenizer

from . import distributed, jsonsafe
from .augment import augment
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .config import TrainConfig, add_config_flags, config_to_dict, resolve_config
from .data import DataError, LoadedData, load_data
from .model import build_model
from .tensors import accuracy, iterate, predict_probs, to_tensors

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, data: LoadedData | None = None) -> dict[str, Any]:
    """Train one model as configured; returns the run's summary (also in metrics.json).

    Under torchrun each rank trains on its shard with DistributedDataParallel; only rank 0
    writes files and logs, and only rank 0's return value is the summary.
    """
    dd = distributed.setup(cfg.device)
    resume = read_checkpoint(Path(cfg.resume) / "last.pt") if cfg.resume else None
    if resume is not None:
        cfg.out_dir = str(cfg.resume)  # a resumed run goes on writing into its own folder
    out = Path(cfg.out_dir)
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // dd.world))
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    if data is None:
        data = load_data(cfg.data, cfg.model.image_size, cfg.seed, cfg.label_key, cfg.label_map,
                         cfg.val_frac, cfg.test_frac, cfg.group_key)
    if resume is not None and list(resume["labels"]) != data.labels:
        raise DataError(f"--resume {cfg.resume}: its labels {resume['labels']} differ from the data's {data.labels}")

    # one tokenizer for all ranks: rank 0 trains it (or a resumed run reads its own), the others receive it
    from tokenizers import Tokenizer

    if resume is not None:
        tok_json = str(resume["tokenizer"])
    else:
        tok_json = dd.broadcast_str(train_tokenizer(data.splits["train"].captions, cfg.vocab_size, cfg.min_freq).to_str()  # type: ignore[attr-defined]
                                    if dd.main else None)
    text = TextEncoder(Tokenizer.from_str(tok_json), cfg.max_len)
    cfg.model.num_classes = len(data.labels)
    cfg.model.vocab_size = text.vocab_size
    cfg.model.pad_id = text.pad_id
    if dd.main:
        (out / "skipped.json").write_text(jsonsafe.dumps(data.report.to_dict(), indent=2))
        text.tokenizer.save(str(out / "tokenizer.json"))
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    tr, va, te = (to_tensors(data.splits[s], text, data.labels) for s in ("train", "val", "test"))
    model = build_model(cfg.model).to(dd.device)
    trained: torch.nn.Module = model
    if dd.enabled:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[dd.device.index] if dd.device.type == "cuda" else None)
    opt = torch.optim.Adam(trained.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule not in ("constant", "cosine"):
        raise DataError(f"--schedule must be constant or cosine, not {cfg.schedule!r}")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs) if cfg.schedule == "cosine" else None
    rng = np.random.default_rng(cfg.seed)
    best_val, best_epoch, stale = -1.0, -1, 0
    log_path = out / "log.jsonl"
    first_epoch = 1
    if resume is not None:
        # everything the next epoch depends on: weights, Adam's moments, the schedule, the shuffling
        # and dropout generators, early stopping; so the resumed run takes the steps the whole one would
        extra = resume["extra"]
        model.load_state_dict(resume["state_dict"])
        opt.load_state_dict(resume["optimizer"])
        if sched is not None and "scheduler" in extra:
            sched.load_state_dict(extra["scheduler"])
        rng.bit_generator.state = extra["np_rng"]
        torch.set_rng_state(resume["torch_rng"])
        best_val, best_epoch, stale = float(extra["best_val"]), int(extra["best_epoch"]), int(extra["stale"])
        first_epoch = int(extra["epoch"]) + 1
        log.info("resuming %s after epoch %d", out, first_epoch - 1)
    elif dd.main:
        log_path.write_text("")
    t0 = time.time()
    epoch = first_epoch - 1
    show_bars = cfg.progress and dd.main and sys.stderr.isatty()  # no bars in log files
    for epoch in range(first_epoch, cfg.epochs + 1):
        trained.train()
        order = dd.shard(rng.permutation(len(tr.targets)))  # same permutation on every rank
        total, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(iterate(tr, cfg.batch_size, order), total=-(-len(order) // cfg.batch_size),
                   desc=f"{cfg.model.mode} epoch {epoch}/{cfg.epochs}", disable=not show_bars, leave=False)
        for img, ids, y in bar:
            if cfg.augment:
                img = augment(img)
            img, ids, y = img.to(dd.device), ids.to(dd.device), y.to(dd.device)
            logits, _ = trained(img, ids)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients of all ranks here
            opt.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(-1) == y).sum())
            total += len(y)
            bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.3f}")
        if sched is not None:
            sched.step()
        loss_sum, correct_f, total_f = dd.sum(loss_sum, correct, total)
        stop = False
        if dd.main:
            val_probs = predict_probs(model, va)
            val_acc = accuracy(val_probs, va.targets)
            val_loss = (float(F.nll_loss(torch.log(torch.from_numpy(val_probs) + 1e-12), va.targets))
                        if len(va.targets) else float("nan"))
            row = {"epoch": epoch, "train_loss": loss_sum / total_f, "train_acc": correct_f / total_f,
                   "val_loss": val_loss, "val_acc": val_acc, "seconds": round(time.time() - t0, 1), "world_size": dd.world}
            if resume is not None:
                row["resumed_after_epoch"] = first_epoch - 1
            with log_path.open("a") as f:
                f.write(jsonsafe.dumps(row) + "\n")
            log.info("%s epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f", cfg.model.mode, epoch,
                     row["train_loss"], row["train_acc"], val_loss, val_acc)
            # an empty val split (tiny data) falls back to keeping the latest epoch
            score = val_acc if val_acc == val_acc else float(epoch)
            if score > best_val:
                best_val, best_epoch, stale = score, epoch, 0
                save_checkpoint(out / "best.pt", model, data.labels, text, cfg,
                                {"epoch": epoch, "val_acc": val_acc, "world_size": dd.world})
            else:
                stale += 1
                if stale >= cfg.patience:
                    log.info("early stop: no better validation accuracy for %d epochs", cfg.patience)
                    stop = True
            # the latest state, with the optimizer's, so an interrupted run can be inspected or continued
            save_checkpoint(out / "last.pt", model, data.labels, text, cfg,
                            {"epoch": epoch, "val_acc": val_acc, "world_size": dd.world, "best_val": best_val,
                             "best_epoch": best_epoch, "stale": stale, "np_rng": rng.bit_generator.state,
                             **({"scheduler": sched.state_dict()} if sched is not None else {})},
                            optimizer=opt, rng=torch.get_rng_state())
        if dd.broadcast_flag(stop):  # every rank stops at the same epoch
            break

    summary: dict[str, Any] = {}
    if dd.main:
        best, _ = load_checkpoint(out / "best.pt")
        summary = {
            "mode": cfg.model.mode,
            "best_epoch": best_epoch,
            "epochs_run": epoch,
            "world_size": dd.world,
            "train_acc": accuracy(predict_probs(best, tr), tr.targets),
            "val_acc": accuracy(predict_probs(best, va), va.targets),
            "test_acc": accuracy(predict_probs(best, te), te.targets),
            "n_train": len(tr.targets), "n_val": len(va.targets), "n_test": len(te.targets),
            "skipped": data.report.to_dict(),
            "seconds": round(time.time() - t0, 1),
        }
        (out / "metrics.json").write_text(jsonsafe.dumps(summary, indent=2))
        log.info(data.report.summary())
    dd.barrier()
    return summary


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
