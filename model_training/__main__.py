"""``python -m model_training <command>``: make-dataset, train, evaluate, ablate, export."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
