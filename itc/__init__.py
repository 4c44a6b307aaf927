"""``itc``: one console command for both halves, installed with the package (``[project.scripts]``).

    itc serve [--port 8000 ...]          = python -m service
    itc train|evaluate|export|ablate|make-dataset ...   = python -m model_training <command>

Only a dispatcher: it imports the half a command needs, when it is asked for (serving never
imports torch, training never imports the web stack).
"""

from __future__ import annotations

import sys

USAGE = ("usage: itc {serve,train,evaluate,export,quantize,ablate,make-dataset} ...\n"
         "  itc serve --help      serve a model over HTTP (python -m service)\n"
         "  itc train --help      train, evaluate, export, quantize, ablate, make-dataset (python -m model_training)")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)  # noqa: T201
        return 0 if args else 2
    if args[0] == "serve":
        from service.__main__ import main as serve

        return serve(args[1:])
    from model_training.cli import main as training

    return training(args)


if __name__ == "__main__":
    sys.exit(main())
