"""Write the built-in synthetic dataset (see ``model_training.synthetic``) as WebDataset shards."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

from .config import DEFAULT_DATA
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
    t0 = time.time()
    paths = write_shards(cfg, args.out)
    log.info("wrote %d samples in %d shards to %s in %.1fs", cfg.num_samples, len(paths), args.out, time.time() - t0)
    return [str(p) for p in paths]
