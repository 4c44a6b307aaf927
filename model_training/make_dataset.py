"""Write the built-in synthetic dataset (see ``model_training.synthetic``) as WebDataset shards."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

from .config import DEFAULT_DATA
from .data import DataError
from .synthetic import GeneratorConfig, write_shards

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model_training make-dataset", description=__doc__)
    p.add_argument("--out", default=DEFAULT_DATA, help=f"output folder (default: {DEFAULT_DATA})")
    for f in dataclasses.fields(GeneratorConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=f.default,
                       help=f"(default: {f.default})")
    return p


def main(argv: list[str] | None = None) -> list[str]:
    args = build_parser().parse_args(argv)
    cfg = GeneratorConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GeneratorConfig)})
    problems = [f"--{k.replace('_', '-')} must be at least 1, not {getattr(cfg, k)}" for k in ("num_samples", "shard_size")
                if getattr(cfg, k) < 1]
    problems += [f"--{k.replace('_', '-')} must be between 0 and 1, not {getattr(cfg, k)}"
                 for k in ("p_informative", "p_misleading", "p_typo", "p_faint_seams") if not 0 <= getattr(cfg, k) <= 1]
    if not 8 <= cfg.min_canvas <= cfg.max_canvas:
        problems.append(f"--min-canvas must be at least 8 and at most --max-canvas ({cfg.min_canvas}, {cfg.max_canvas})")
    if problems:
        raise DataError("; ".join(problems))
    t0 = time.time()
    paths = write_shards(cfg, args.out)
    log.info("wrote %d samples in %d shards to %s in %.1fs", cfg.num_samples, len(paths), args.out, time.time() - t0)
    return [str(p) for p in paths]
