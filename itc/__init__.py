"""``itc``: one console command for both halves, installed with the package (``[project.scripts]``).

    itc serve [--port 8000 ...]          = python -m service
    itc predict MODEL --data X --out F   = itc/predict.py (an exported model, no server)
    itc train|evaluate|export|quantize|ablate|make-dataset ...   = python -m model_training <command>

Only a dispatcher: it imports the half a command needs, when it is asked for (serving never
imports torch, training never imports the web stack).
"""

from __future__ import annotations

import sys

USAGE = ("usage: itc COMMAND [--help]\n"
         "  itc serve         serve a model over HTTP, gRPC and the KServe V2 protocol (python -m service)\n"
         "  itc predict       run an exported model over a folder or a table: answers to CSV / JSON Lines\n"
         "  itc train         train a fused, image-only or text-only model\n"
         "  itc evaluate      accuracy, per-class figures and a confusion matrix of a model on data\n"
         "  itc export        a checkpoint to a verified ONNX artifact the service loads\n"
         "  itc quantize      an int8 copy of a pretrained artifact, written only if it keeps its accuracy\n"
         "  itc ablate        train image-only, text-only and fused; table and chart\n"
         "  itc make-dataset  write the built-in synthetic dataset\n"
         "Run 'itc COMMAND --help' for a command's options.")


def __getattr__(name: str) -> object:
    # ``from itc import Classifier``: the in-process API, imported only when asked for
    if name in ("Classifier", "Answer"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)  # noqa: T201
        return 0 if args else 2
    if args[0] == "serve":
        from service.__main__ import main as serve

        return serve(args[1:])
    if args[0] == "predict":
        from .predict import main as predict

        return predict(args[1:])
    from model_training.cli import main as training

    return training(args)


if __name__ == "__main__":
    sys.exit(main())
