"""OpenVINO as the CPU engine, where it is installed (``pip install -e '.[openvino]'``): the artifact's
own ONNX graph, compiled by OpenVINO's CPU plugin, behind the few calls ``session.Predictor`` makes
of an onnxruntime session (``run``, ``get_inputs``, ``get_outputs``, ``get_providers``).

Why: on the pretrained artifact (EfficientNet-Lite0 at 128 px) onnxruntime's CPU kernels leave most
of a modern CPU unused; OpenVINO ran the same float32 graph 2.6x faster at batch 32 and 1.8x at
batch 1 on this project's 2-core AMD EPYC (AVX2), with the same answers (docs/performance.md). It is
used only after a parity check against onnxruntime on the same inputs (``parity``); the plain serve
install never needs it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from classifier_core import contract

PROVIDER = "OpenVINOCPU"  # what /model and the logs show as the provider in use
PARITY_ATOL = 1e-4  # max |probability difference| against onnxruntime on the check's inputs
_TYPES = {"u8": "tensor(uint8)", "i64": "tensor(int64)", "f32": "tensor(float)"}


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class _Arg:
    """An input or output as onnxruntime describes it: name, type string, shape (None: dynamic)."""

    name: str
    type: str
    shape: list[int | str | None]


class OpenVINOSession:
    """One compiled model; ``run`` is serialised (one infer request): the batcher calls it from one thread."""

    def __init__(self, model_path: Path, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        # no pinning: several worker processes share the cores, and pinned threads would fight over them
        config = {"INFERENCE_NUM_THREADS": max(1, threads), "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False,
                  "INFERENCE_PRECISION_HINT": "f32"}
        self._compiled = core.compile_model(core.read_model(str(model_path)), "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()
        self._outputs = {o.get_any_name(): i for i, o in enumerate(self._compiled.outputs)}

    @staticmethod
    def _arg(port: Any) -> _Arg:
        shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        return _Arg(port.get_any_name(), _TYPES.get(port.get_element_type().get_type_name(), str(port.get_element_type())), shape)

    def get_inputs(self) -> list[_Arg]:
        return [self._arg(p) for p in self._compiled.inputs]

    def get_outputs(self) -> list[_Arg]:
        return [self._arg(p) for p in self._compiled.outputs]

    def get_providers(self) -> list[str]:
        return [PROVIDER]

    def run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            result = self._request.infer(feed)
            order = names or list(self._outputs)
            # copies: the request's output buffers are reused by its next call
            return [np.array(result[self._outputs[n]], copy=True) for n in order]


def parity(candidate: Any, reference: Any, image_size: int, max_len: int) -> float:
    """Max |probability difference| of two sessions on random images and captions of several shapes,
    and of their OOD scores relative to the score's size."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for batch, length in ((1, 1), (3, max_len), (8, max(1, max_len // 2))):
        feed = contract.feeds(rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8),
                              rng.integers(2, 6, (batch, length)).astype(np.int64))  # ids every vocabulary has
        names = [o.name for o in reference.get_outputs() if o.name in (contract.PROBABILITIES, contract.OOD_SCORE)]
        for name, a, b in zip(names, candidate.run(names, feed), reference.run(names, feed), strict=True):
            # the OOD score decides abstention: compared relative to its size (a distance, not a probability)
            scale = 1.0 if name == contract.PROBABILITIES else max(1.0, float(np.abs(b).max()))
            worst = max(worst, float(np.abs(a - b).max()) / scale)
    return worst
