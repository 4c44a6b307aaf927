"""``python -m service``: load and check the model, then serve it with uvicorn."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from .artifact import ArtifactError
from .predictor import Predictor, ProviderError
from .settings import Settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service", description="Serve the image + text classifier over HTTP. "
                                "Settings come from CLASSIFIER_* environment variables (see README).")
    p.add_argument("--host", default="0.0.0.0", help="bind address (default: 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--model-dir", default=None, help="artifact folder (overrides CLASSIFIER_MODEL_DIR)")
    args = p.parse_args(argv)
    overrides = {"model_dir": args.model_dir} if args.model_dir else {}
    settings = Settings(**overrides)  # type: ignore[arg-type]
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    predictor = Predictor(settings)
    try:
        # load before binding the port: a broken artifact ends start-up with one line
        predictor.load()
    except (ArtifactError, ProviderError) as exc:
        print(f"service: cannot start: {exc}", file=sys.stderr)  # noqa: T201
        return 2

    import uvicorn

    from .app import create_app

    app = create_app(settings, predictor=predictor)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal; after a clean
    # drain the process should exit 0, which orchestrators read as a normal stop
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=settings.log_level, server_header=False,
                date_header=True, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
