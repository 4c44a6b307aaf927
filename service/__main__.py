"""``python -m service``: load and check the model, then serve it with uvicorn."""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .logs import log_config
from .serving.session import Predictor
from .settings import Settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service", description="Serve the image + text classifier over HTTP. "
                                "Settings come from CLASSIFIER_* environment variables (docs/configuration.md).")
    p.add_argument("--host", default="0.0.0.0", help="bind address (default: 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--model-dir", default=None, help="artifact folder (overrides CLASSIFIER_MODEL_DIR)")
    p.add_argument("--model-repository", default=None, help="model repository: DIR/NAME/VERSION/ artifacts "
                   "(overrides CLASSIFIER_MODEL_REPOSITORY and --model-dir)")
    p.add_argument("--poll-repository", type=float, default=None, metavar="SECONDS",
                   help="scan the repository for new and removed versions this often (CLASSIFIER_POLL_REPOSITORY_S)")
    p.add_argument("--default-model", default=None, help="the model that answers requests naming none (CLASSIFIER_DEFAULT_MODEL)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (overrides CLASSIFIER_WORKERS; 0 = one per core)")
    args = p.parse_args(argv)
    # settings are built once, here, and passed to every worker: never written back to the environment
    overrides: dict[str, Any] = {}
    if args.model_dir:
        overrides["model_dir"] = Path(args.model_dir)
    if args.workers is not None:
        overrides["workers"] = args.workers
    if args.model_repository:
        overrides["model_repository"] = Path(args.model_repository)
    if args.poll_repository is not None:
        overrides["poll_repository_s"] = args.poll_repository
    if args.default_model:
        overrides["default_model"] = args.default_model
    try:
        settings = Settings(**overrides)
        if settings.grpc_host is None:  # gRPC listens where HTTP does, unless CLASSIFIER_GRPC_HOST says otherwise
            settings = settings.model_copy(update={"grpc_host": args.host})
    except ValidationError as exc:  # a mistyped setting: one line naming the variable, exit 2
        wrong = "; ".join(f"CLASSIFIER_{'_'.join(str(x) for x in e['loc']).upper()}: {e['msg']}"
                          + (f" (got {e['input']!r})" if isinstance(e.get("input"), str | int | float) else "")
                          for e in exc.errors(include_url=False))
        print(f"service: cannot start: {wrong}", file=sys.stderr)  # noqa: T201
        return 2
    logging.config.dictConfig(log_config(settings.log_level, settings.log_format))
    settings = settings.resolved()  # cores, workers, threads: worked out once, here
    workers, threads = settings.workers, settings.intra_op_threads
    owner = resolve_topology(settings) == "owner"
    # check the model before binding the port: a broken artifact ends start-up with one line.
    # With several workers the check runs in a child process, so the supervisor itself never
    # holds a model session (on a GPU: never a CUDA context and its memory)
    from .server import check_in_child, load_problem

    problem, predictor = None, None
    if settings.model_repository is not None:
        # a repository: a broken version is reported and skipped, never a reason not to start
        if not Path(settings.model_repository).is_dir():
            problem = f"{settings.model_repository}: not a folder (CLASSIFIER_MODEL_REPOSITORY)"
    else:
        predictor = Predictor(settings) if workers == 1 and not owner else None
        problem = load_problem(predictor) if predictor is not None else check_in_child(settings)
    if problem:
        print(f"service: cannot start: {problem}", file=sys.stderr)  # noqa: T201
        return 2

    from .server import Listen, PortInUse, Supervisor, serve_socket

    listen = Listen(args.host, args.port)
    try:
        if workers == 1 and not owner:
            sock = listen.bind()
            return serve_socket(settings, sock, {predictor.model_dir: predictor} if predictor is not None else None)
        made = None
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # prometheus_client's own variable, read by each worker at import: one metrics view over all
            made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="classifier-metrics-")
        if owner:
            logging.getLogger("service").info("starting %d workers and one model owner process", workers)
        else:
            logging.getLogger("service").info("starting %d workers, %d onnxruntime threads each", workers, threads)
        try:
            return Supervisor(settings, listen, workers, owner=owner).run()
        finally:
            if made is not None:  # ours: nothing is left in the temporary folder after the service stops
                shutil.rmtree(made, ignore_errors=True)
    except PortInUse as exc:
        print(f"service: {exc}", file=sys.stderr)  # noqa: T201
        return 2


def resolve_topology(settings: Settings) -> str:
    """``workers`` or ``owner`` (see Settings.topology); auto picks the owner only where a GPU will run the model."""
    if settings.topology != "auto":
        return settings.topology
    if settings.provider in ("cpu", "openvino"):  # CPU engines: a model per worker process
        return "workers"
    import onnxruntime as ort

    from .serving.session import gpu_present

    return "owner" if gpu_present() and "CUDAExecutionProvider" in ort.get_available_providers() else "workers"


if __name__ == "__main__":
    sys.exit(main())
