"""Thin command dispatcher; each command's module owns its flags and its ``main(argv)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

COMMANDS = {
    "make-dataset": ("model_training.make_dataset", "write the built-in synthetic dataset as WebDataset shards"),
    "train": ("model_training.train", "train one model (fused, image or text)"),
    "evaluate": ("model_training.evaluate", "accuracy, per-class P/R/F1 and a confusion matrix"),
    "ablate": ("model_training.ablate", "train image-only, text-only and fused; table and bar chart"),
    "export": ("model_training.export", "export a checkpoint to a verified ONNX artifact"),
    "quantize": ("model_training.quantize", "an int8 copy of a pretrained artifact, written only if it keeps its accuracy"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model_training",
        description="Train, evaluate, ablate and export the fused image-text classifier.",
        epilog="Run 'python -m model_training <command> --help' for a command's options.",
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the TorchScript exporter is chosen on purpose (see export.py); its deprecation notice is noise here
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    module = importlib.import_module(COMMANDS[ns.command][0])
    from .data import DataError
    from .export import ExportError
    from .quantize import QuantizeError

    try:
        module.main(ns.args)
    except DataError as exc:  # a mistake in the data or a path: one line, no traceback
        print(f"python -m model_training {ns.command}: error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except QuantizeError as exc:  # the int8 graph failed its accuracy gate: nothing was written
        print(f"python -m model_training {ns.command}: quantization refused: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    except ExportError as exc:  # the artifact failed a check (parity, checker): nothing was written
        print(f"python -m model_training {ns.command}: export failed: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    except OSError as exc:  # a file named on the command line that is not there, not readable, a folder...
        if exc.filename is None:
            raise
        print(f"python -m model_training {ns.command}: error: {exc.filename}: {exc.strerror}", file=sys.stderr)  # noqa: T201
        return 2
    return 0
