"""The in-process backend: artifact checks, provider choice, warm-up, inference on one onnxruntime session.

Nothing here touches the event loop; the batcher calls ``predict`` from its thread.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from classifier_core import contract
from classifier_core.artifact import ATTENTION, PROBABILITIES, ArtifactError, Manifest, load_manifest
from classifier_core.text import EncodedText, TextEncoder

from ..settings import Settings
from .base import ModelInfo, Prediction, ProviderError, predictions, resident_bytes

# a lone request's model call runs on the event loop (the pipeline's): requests arriving meanwhile
# wait that long to be read. A model slower than this at one row takes the batcher's thread, and
# keeps no lone session (nor its memory)
LONE_MAX_S = 0.02

log = logging.getLogger(__name__)

_ORT_DTYPES = {"tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(float)": "float32"}
_PROVIDER_NAMES = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider", "cpu": "CPUExecutionProvider"}


def gpu_present() -> bool:
    """A cheap look for an NVIDIA device before asking onnxruntime to load CUDA libraries."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


class Predictor:
    """One artifact folder on one onnxruntime session (``model_dir``; default: the settings').

    ``name`` and ``version``: what clients address it as (default: the manifest's). ``lone``: it may
    hold a lone session (a worker of ``python -m service``, which sees on the board whether the other
    workers are busy; never a process that cannot)."""

    def __init__(self, settings: Settings, model_dir: Path | None = None, name: str | None = None,
                 version: str | None = None, lone: bool = False) -> None:
        self.settings = settings
        self.lone = lone
        self.model_dir = Path(model_dir or settings.model_dir)
        self.name, self.version = name, version
        self.manifest: Manifest | None = None
        self.text: TextEncoder | None = None
        self.session: ort.InferenceSession | None = None
        # the same graph with every core, for a lone request while the other workers idle (lone_threads)
        self.lone_session: ort.InferenceSession | None = None
        # one row's warm call on the main session: at most LONE_MAX_S; None: lone rows stay off the event loop
        self.lone_seconds: float | None = None
        self.providers: list[str] = []
        self.state = "not_loaded"  # not_loaded -> loading -> ready | failed
        self.error: str | None = None
        self._lock = threading.Lock()
        self.loaded: ModelInfo | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # --- loading -------------------------------------------------------------------
    def _session_options(self, lone: bool = False) -> ort.SessionOptions:
        settings = self.settings.resolved(processes=1)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = settings.lone_threads if lone else settings.intra_op_threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # onnxruntime's workers spin after each op by default; on a small CPU that spinning
        # takes the cores the image decoders need (measured with benchmarks/bench.py). The lone
        # session spins within its call only: waking a sleeping thread for each of a small graph's
        # ops costs more than the second core gives (c=1 unchanged without spinning)
        spin = lone or self.settings.ort_spinning
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if lone:
            so.add_session_config_entry("session.force_spinning_stop", "1")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return so

    def _lone_session(self, model_path: Path, sess: Any) -> ort.InferenceSession | None:
        """A second onnxruntime CPU session with lone_threads threads, when that is more than the
        main session has (several workers share the cores); None otherwise (GPU, OpenVINO, off, or it
        cannot be made: the model serves all the same)."""
        settings = self.settings.resolved(processes=1)
        if (not self.lone or settings.lone_threads <= settings.intra_op_threads or not isinstance(sess, ort.InferenceSession)
                or sess.get_providers()[0] != "CPUExecutionProvider"):
            return None
        try:
            return ort.InferenceSession(str(model_path), self._session_options(lone=True), providers=["CPUExecutionProvider"])
        except Exception as exc:  # memory, an option this onnxruntime refuses: a speed-up lost, not the model
            log.warning("no lone session for %s (%s: %s)", model_path, type(exc).__name__, str(exc)[:200])
            return None

    def _provider_list(self, kind: str) -> list[Any]:
        dev = {"device_id": self.settings.device_id}
        if kind == "cuda":
            return [("CUDAExecutionProvider", dev), "CPUExecutionProvider"]
        if kind == "tensorrt":
            return [("TensorrtExecutionProvider", dev), ("CUDAExecutionProvider", dev), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _try_session(self, model_path: Path, kind: str) -> ort.InferenceSession:
        # onnxruntime logs (and falls back) when CUDA libraries are missing; when we probe,
        # we look at the outcome ourselves, so its error lines are muted for that one call
        previous = 2
        ort.set_default_logger_severity(4 if kind != "cpu" and self.settings.provider == "auto" else 3)
        try:
            return ort.InferenceSession(str(model_path), self._session_options(), providers=self._provider_list(kind))
        finally:
            ort.set_default_logger_severity(previous)

    def _create_session(self, model_path: Path) -> Any:
        requested = self.settings.provider
        available = ort.get_available_providers()
        if requested == "cpu":
            return self._try_session(model_path, "cpu")
        if requested == "openvino":
            return self._openvino_session(model_path, required=True)
        if requested != "cpu" and gpu_present() and hasattr(ort, "preload_dlls"):
            # CUDA/cuDNN from pip wheels (onnxruntime-gpu[cuda,cudnn]) are not on the loader path
            try:
                ort.preload_dlls()
            except Exception as exc:  # missing wheels are fine: system libraries may exist
                log.debug("preload_dlls: %s", exc)
        if requested == "auto":
            if "CUDAExecutionProvider" in available and gpu_present():
                sess = self._try_session(model_path, "cuda")
                if sess.get_providers()[0] == "CUDAExecutionProvider":
                    return sess
                log.info("CUDA is not usable here (onnxruntime fell back); using CPU")
            return self._try_session(model_path, "cpu")
        wanted = _PROVIDER_NAMES[requested]
        if wanted not in available:
            raise ProviderError(
                f"CLASSIFIER_PROVIDER={requested}: onnxruntime here has no {wanted} "
                f"(available: {', '.join(available)}); install onnxruntime-gpu or use provider=cpu/auto"
            )
        if not gpu_present():
            raise ProviderError(f"CLASSIFIER_PROVIDER={requested}: no NVIDIA GPU is visible on this machine")
        sess = self._try_session(model_path, requested)
        if sess.get_providers()[0] != wanted:
            raise ProviderError(
                f"CLASSIFIER_PROVIDER={requested}: onnxruntime could not start {wanted} "
                f"(CUDA/cuDNN libraries missing or mismatched); it would have fallen back to {sess.get_providers()[0]}"
            )
        return sess

    def _openvino_session(self, model_path: Path, required: bool) -> Any:
        """OpenVINO on the CPU if it is installed and answers as onnxruntime does on the same inputs;
        else ProviderError (``required``) or None. Only by name (CLASSIFIER_PROVIDER=openvino): ``auto``
        keeps onnxruntime, so installing the extra never changes what a running service computes."""
        from . import openvino

        if not openvino.available():
            if required:
                raise ProviderError("CLASSIFIER_PROVIDER=openvino: the openvino package is not installed "
                                    "(pip install -e '.[openvino]'), or use provider=cpu/auto")
            return None
        threads = self.settings.resolved(processes=1).intra_op_threads
        try:
            sess = openvino.OpenVINOSession(model_path, threads)
            manifest = load_manifest(model_path.parent, verify_checksums=False)
            diff = openvino.parity(sess, self._try_session(model_path, "cpu"), manifest.image_size, manifest.max_len)
        except Exception as exc:  # an op OpenVINO cannot compile, a broken install: onnxruntime serves
            if required:
                raise ProviderError(f"CLASSIFIER_PROVIDER=openvino: OpenVINO cannot run {model_path} "
                                    f"({type(exc).__name__}: {str(exc)[:200]})") from exc
            log.info("OpenVINO cannot run %s (%s); using onnxruntime", model_path, type(exc).__name__)
            return None
        if diff > openvino.PARITY_ATOL:
            message = f"OpenVINO's answers differ from onnxruntime's by {diff:.2e} (> {openvino.PARITY_ATOL:g})"
            if required:
                raise ProviderError(f"CLASSIFIER_PROVIDER=openvino: {message}")
            log.warning("%s on %s; using onnxruntime", message, model_path)
            return None
        log.info("OpenVINO on the CPU: parity with onnxruntime %.1e", diff)
        return sess

    def _check_io(self, sess: ort.InferenceSession, manifest: Manifest, model_path: Path) -> None:
        for kind, actual, expected in (("input", sess.get_inputs(), manifest.inputs), ("output", sess.get_outputs(), manifest.outputs)):
            got = [(a.name, _ORT_DTYPES.get(a.type, a.type)) for a in actual]
            want = [(e.name, e.dtype) for e in expected]
            if got != want:
                raise ArtifactError(f"{model_path}: {kind}s {got} do not match the manifest's {want}")
        for name in (contract.IMAGE, contract.INPUT_IDS):
            if name not in {i.name for i in manifest.inputs}:
                raise ArtifactError(f"{model_path}: the model has no '{name}' input")
        for name in (PROBABILITIES, ATTENTION):  # read by name, never by position
            if name not in {o.name for o in manifest.outputs}:
                raise ArtifactError(f"{model_path}: the model has no '{name}' output")
        img = next(i for i in sess.get_inputs() if i.name == contract.IMAGE).shape
        if list(img[1:]) != [manifest.image_size, manifest.image_size, 3]:
            raise ArtifactError(f"{model_path}: image input shape {img} does not match image_size {manifest.image_size}")

    def load(self) -> ModelInfo:
        """Verify the artifact, open the session, warm up; raises ArtifactError/ProviderError.

        Loaded already (``python -m service`` checked it before binding): what was loaded."""
        if self.state == "ready" and self.loaded is not None:
            return self.loaded
        self.state = "loading"
        t0 = time.perf_counter()
        rss0 = resident_bytes()
        try:
            model_dir = self.model_dir
            manifest = load_manifest(model_dir)
            tok_path = model_dir / manifest.tokenizer_file
            try:
                text = TextEncoder.from_file(tok_path, manifest.max_len)
            except Exception as exc:
                raise ArtifactError(f"{tok_path}: not a usable tokenizer ({exc})") from exc
            model_path = model_dir / manifest.model_file
            try:
                sess = self._create_session(model_path)
            except ProviderError:
                raise
            except Exception as exc:
                raise ArtifactError(f"{model_path}: onnxruntime cannot load it ({type(exc).__name__}: {str(exc)[:200]})") from exc
            self._check_io(sess, manifest, model_path)
            self.manifest, self.text, self.session = manifest, text, sess
            self.providers = sess.get_providers()
            self.lone_session = self._lone_session(model_path, sess)
            width = self._warm_up()
            if width != len(manifest.labels):
                raise ArtifactError(
                    f"{model_dir / 'manifest.json'}: {len(manifest.labels)} labels but the model outputs {width} classes"
                )
        except Exception as exc:
            self.state, self.error = "failed", str(exc)
            raise
        self.state = "ready"
        seconds, rss1 = time.perf_counter() - t0, resident_bytes()
        log.info("model %s %s loaded in %.2fs; provider in use: %s%s", manifest.name, manifest.version,
                 seconds, self.providers[0], f"; lone requests on {self.lone_session.get_session_options().intra_op_num_threads}"
                 " threads" if self.lone_session is not None else "")
        self.loaded = ModelInfo(self.name or manifest.name, self.version or manifest.version, manifest, text, model_dir,
                                tuple(self.providers), None if rss0 is None or rss1 is None else max(0, rss1 - rss0),
                                round(seconds, 3))
        return self.loaded

    @property
    def fixed_shapes(self) -> bool:
        """On GPUs every new input shape costs (cuDNN algorithm search, LSTM descriptors), so
        batches are padded to power-of-two buckets and captions to max_len: a handful of
        shapes, all warmed up. On CPU, padding would only add work, so shapes stay exact."""
        return bool(self.providers) and self.providers[0] not in ("CPUExecutionProvider", "OpenVINOCPU")

    def batch_buckets(self) -> list[int]:
        top = self.settings.max_batch_size
        buckets = [1 << k for k in range(top.bit_length()) if (1 << k) < top]
        return [*buckets, top]

    def _warm_up(self) -> int:
        """Run every batch shape the service uses once, so the first request pays nothing extra."""
        assert self.manifest is not None and self.session is not None
        size = self.manifest.image_size
        width = 0
        batches = self.batch_buckets() if self.fixed_shapes else sorted({1, self.settings.max_batch_size})
        lengths = (self.manifest.max_len,) if self.fixed_shapes else (1, self.manifest.max_len)
        for batch in batches:
            for length in lengths:
                probs = self.session.run([PROBABILITIES], contract.feeds(np.zeros((batch, size, size, 3), np.uint8),
                                                                         np.full((batch, length), 2, np.int64)))[0]
                width = probs.shape[1]
        if self.lone:
            self._time_lone(contract.feeds(np.zeros((1, size, size, 3), np.uint8), np.full((1, lengths[-1]), 2, np.int64)))
        return width

    def _time_lone(self, feed: dict[str, np.ndarray]) -> None:
        """Lone rows run on the event loop only if one row (the longest caption) runs within LONE_MAX_S
        on the main session (its own threads): the call holds the loop. The best of five, so a busy
        moment at load (the other workers warming up at the same time) does not decide it."""
        assert self.session is not None
        if self.lone_session is not None:
            self.lone_session.run([PROBABILITIES], feed)  # its warm-up: it only ever runs one row
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            self.session.run([PROBABILITIES], feed)
            times.append(time.perf_counter() - t0)
        if min(times) <= LONE_MAX_S:
            self.lone_seconds = min(times)
            return
        log.info("lone rows off the event loop: one row takes %.1f ms (more than %.0f ms)", min(times) * 1000, LONE_MAX_S * 1000)
        self.lone_session = None

    # --- inference -----------------------------------------------------------------
    def encode(self, descriptions: list[str]) -> list[EncodedText]:
        assert self.text is not None
        return self.text.encode_batch(descriptions)

    def predict(self, images: np.ndarray, encoded: list[EncodedText], lone: bool = False) -> list[Prediction]:
        """images uint8 [N, S, S, 3]; one Prediction per row, in order. ``lone``: on the lone session
        (every core: the other workers idle), where there is one."""
        assert self.text is not None
        probs, attn, ood = self.run_arrays(images, self.text.pad(encoded), lone=lone)
        return predictions(probs, attn, ood, encoded)

    def run_arrays(self, images: np.ndarray, ids: np.ndarray, lone: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The session on arrays: uint8 [N, S, S, 3] and right-padded int64 [N, L]; (calibrated
        probabilities, attention [N, L], OOD score over its threshold [N]: NaN without one)."""
        assert self.session is not None and self.text is not None and self.manifest is not None
        session = self.lone_session if lone and self.lone_session is not None else self.session
        step = self.settings.max_batch_size
        probs_out, attn_out, ood_out = [], [], []
        names = contract.output_names(self.manifest)
        for s in range(0, len(ids), step):
            batch_ids, imgs = ids[s : s + step], images[s : s + step]
            n, width = batch_ids.shape
            if self.fixed_shapes:
                bucket = next(b for b in self.batch_buckets() if b >= n)
                full = np.full((bucket, self.text.max_len), self.text.pad_id, np.int64)
                full[:n, :width] = batch_ids[:, : self.text.max_len]
                if bucket > n:  # zero rows fill the bucket; their outputs are dropped
                    imgs = np.concatenate([imgs, np.zeros((bucket - n, *imgs.shape[1:]), imgs.dtype)])
                batch_ids = full
            out = contract.postprocess({k: v[:n] for k, v in zip(names, session.run(names, contract.feeds(imgs, batch_ids)),
                                                                  strict=True)}, self.manifest)
            assert out.attention is not None
            probs_out.append(out.probabilities)
            attn_out.append(out.attention[:, :width])
            ood_out.append(out.ood)
        return np.concatenate(probs_out), np.concatenate(attn_out), np.concatenate(ood_out)

    def close(self) -> None:
        """Drop the session: an unloaded version's memory goes back (the batcher has stopped calling it)."""
        self.session, self.lone_session, self.lone_seconds, self.loaded = None, None, None, None
        self.state = "not_loaded"

