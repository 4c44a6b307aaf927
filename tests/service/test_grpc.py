"""The Open Inference Protocol over gRPC, driven by NVIDIA's own client (tritonclient[grpc]) against real servers.

This process never imports ``service.grpc_v2`` (its messages share the protocol's names with
tritonclient's, and one process cannot register both): the server runs as a subprocess.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from helpers import DEFAULT_MODEL, ROOT, free_port, jpeg_bytes, running_server
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

MODEL = "image-text-classifier"
TOMATO = (ROOT / "examples" / "tomato.jpg").read_bytes()
LEMON = (ROOT / "examples" / "lemon.jpg").read_bytes()


def grpc_env(port: int, **extra: str) -> dict[str, str]:
    return {"CLASSIFIER_GRPC_PORT": str(port), "CLASSIFIER_GRPC_HOST": "127.0.0.1", "CLASSIFIER_WORKERS": "1", **extra}


def inputs(images: list[bytes], captions: list[bytes]) -> list[tg.InferInput]:
    img = tg.InferInput("image", [len(images)], "BYTES")
    img.set_data_from_numpy(np.array(images, dtype=object))
    txt = tg.InferInput("description", [len(captions)], "BYTES")
    txt.set_data_from_numpy(np.array(captions, dtype=object))
    return [img, txt]


def status_of(call: object) -> tuple[str, str]:
    """(gRPC status name, message) of a tritonclient call that must fail."""
    with pytest.raises(InferenceServerException) as err:
        call()  # type: ignore[operator]
    return str(err.value.status()).removeprefix("StatusCode."), err.value.message()


@pytest.fixture(scope="module")
def server() -> tuple[str, str]:
    port = free_port()
    env = grpc_env(port, CLASSIFIER_MAX_BATCH_BODY_BYTES=str(2 * 1024 * 1024), CLASSIFIER_METRICS_MAX_AGE_S="0")
    with running_server(DEFAULT_MODEL, **env) as (_, url):
        yield url, f"127.0.0.1:{port}"


def test_every_rpc_answers_like_rest(server: tuple[str, str]) -> None:
    url, target = server
    c = tg.InferenceServerClient(target)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL)
    assert c.get_server_metadata().name == "image-text-classifier"
    meta = c.get_model_metadata(MODEL)
    assert [t.name for t in meta.inputs] == ["image", "description"] and meta.outputs[1].shape == [-1, 8]
    r = c.infer(MODEL, inputs([TOMATO, LEMON], [b"a cherry tomato", b"a lemon"]))
    labels = [x.decode() for x in r.as_numpy("label")]
    probs = r.as_numpy("probabilities")
    assert probs.shape == (2, 8) and r.as_numpy("abstained").dtype == bool and r.as_numpy("ood_score").shape == (2,)
    for i, (image, caption) in enumerate(((TOMATO, "a cherry tomato"), (LEMON, "a lemon"))):
        rest = httpx.post(f"{url}/classify", files={"image": ("x.jpg", image, "image/jpeg")},
                          data={"description": caption}, params={"top_k": 8}).json()
        assert labels[i] == (rest["label"] or "")
        want = {p["label"]: p["score"] for p in rest["predictions"]}
        got = dict(zip(meta_labels(url), probs[i].tolist()))
        assert max(abs(got[k] - want[k]) for k in want) < 1e-5


def meta_labels(url: str) -> list[str]:
    return httpx.get(f"{url}/model").json()["labels"]


def test_typed_bytes_contents_answer_like_raw_ones(server: tuple[str, str]) -> None:
    # tritonclient sends raw_input_contents; the protocol's typed contents are built here with its own messages
    _, target = server
    raw = tg.InferenceServerClient(target).infer(MODEL, inputs([TOMATO], [b"a cherry tomato"])).as_numpy("probabilities")
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = service_pb2.ModelInferRequest(model_name=MODEL)
        for name, value in (("image", TOMATO), ("description", b"a cherry tomato")):
            t = req.inputs.add(name=name, datatype="BYTES", shape=[1])
            t.contents.bytes_contents.append(value)
        req.outputs.add(name="probabilities")
        reply = stub.ModelInfer(req, timeout=30)
    assert [o.name for o in reply.outputs] == ["probabilities"]
    typed = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(1, 8)
    assert np.abs(typed - raw).max() < 1e-6


def test_errors_map_to_grpc_status_codes(server: tuple[str, str]) -> None:
    _, target = server
    c = tg.InferenceServerClient(target)
    # a wrong datatype, an unreadable image: INVALID_ARGUMENT with the REST route's messages
    bad = tg.InferInput("image", [1], "FP32")
    bad.set_data_from_numpy(np.zeros(1, np.float32))
    code, message = status_of(lambda: c.infer(MODEL, [bad]))
    assert code == "INVALID_ARGUMENT" and "must have datatype BYTES" in message
    code, message = status_of(lambda: c.infer(MODEL, inputs([b"not an image"], [b"x"])))
    assert code == "INVALID_ARGUMENT" and "not a recognised image" in message
    assert status_of(lambda: c.infer("nope", inputs([TOMATO], [b"x"])))[0] == "NOT_FOUND"
    assert status_of(lambda: c.get_model_metadata("nope"))[0] == "NOT_FOUND"
    assert status_of(lambda: c.infer(MODEL, inputs([TOMATO], [b"x"]), model_version="9"))[0] == "NOT_FOUND"
    # a message over the size limit (2 MiB here) is refused by grpc before any handler runs
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), np.uint8)).save(noise, "PNG")
    assert len(noise.getvalue()) > 2 * 1024 * 1024
    assert status_of(lambda: c.infer(MODEL, inputs([noise.getvalue()], [b"x"])))[0] == "RESOURCE_EXHAUSTED"
    # a deadline shorter than the work: DEADLINE_EXCEEDED, and the server goes on serving
    slow = io.BytesIO()  # 16 flat 2000x2000 PNGs: 20 kB each to send, tens of milliseconds each to decode
    Image.new("RGB", (2000, 2000), (30, 120, 200)).save(slow, "PNG")
    assert status_of(lambda: c.infer(MODEL, inputs([slow.getvalue()] * 16, [b"x"] * 16), client_timeout=0.15))[0] == "DEADLINE_EXCEEDED"
    # ... on the server too: the call ended at its deadline (cancelled or timed out), it was not finished
    time.sleep(0.5)
    metrics = httpx.get(f"{server[0]}/metrics").text
    assert re.search(r'classifier_grpc_requests_total\{code="(DEADLINE_EXCEEDED|CANCELLED)",method="ModelInfer"\} [1-9]', metrics)
    assert c.infer(MODEL, inputs([TOMATO], [b"a tomato"])).as_numpy("label")[0] == b"tomato"


def test_overload_is_resource_exhausted() -> None:
    port = free_port()
    flat = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (600, 600, 3), np.uint8)).save(flat, "PNG", compress_level=0)
    with running_server(DEFAULT_MODEL, **grpc_env(port, CLASSIFIER_MAX_QUEUE="2")):
        c = tg.InferenceServerClient(f"127.0.0.1:{port}")
        codes: list[str] = []

        def call() -> None:
            try:
                c.infer(MODEL, inputs([flat.getvalue()] * 2, [b"x"] * 2))
                codes.append("OK")
            except InferenceServerException as exc:
                codes.append(str(exc.status()).removeprefix("StatusCode."))

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes


def test_not_ready_is_unavailable_and_the_api_key_is_required(tmp_path: Path) -> None:
    # the owner topology with its owner stopped: not ready, refused at once
    port = free_port()
    log = tmp_path / "server.log"
    env = grpc_env(port, CLASSIFIER_TOPOLOGY="owner", CLASSIFIER_API_KEY="s3cret", CLASSIFIER_LOG_LEVEL="info",
                   CLASSIFIER_LOG_FORMAT="text")
    with log.open("wb") as out, running_server(DEFAULT_MODEL, stdout=out, **env):
        c = tg.InferenceServerClient(f"127.0.0.1:{port}")
        key = {"authorization": "Bearer s3cret"}
        assert c.is_server_live()  # open, as /v2/health/live is
        assert status_of(lambda: c.infer(MODEL, inputs([TOMATO], [b"x"])))[0] == "UNAUTHENTICATED"
        assert c.infer(MODEL, inputs([TOMATO], [b"x"]), headers=key).as_numpy("label").shape == (1,)
        owner = int(next(line for line in log.read_text().splitlines() if "model owner [" in line).split("[")[1].split("]")[0])
        os.kill(owner, signal.SIGSTOP)
        try:
            time.sleep(1.5)
            assert not c.is_server_ready(headers=key)
            t0 = time.perf_counter()
            code, message = status_of(lambda: c.infer(MODEL, inputs([TOMATO], [b"x"]), headers=key))
            assert code == "UNAVAILABLE" and "owner" in message and time.perf_counter() - t0 < 1
        finally:
            os.kill(owner, signal.SIGCONT)


def test_sigterm_lets_calls_in_flight_finish() -> None:
    port = free_port()
    with running_server(DEFAULT_MODEL, **grpc_env(port, CLASSIFIER_DRAIN_DELAY_S="0.5")) as (proc, _):
        c = tg.InferenceServerClient(f"127.0.0.1:{port}")
        results: list[object] = []

        def call() -> None:
            try:
                results.append(c.infer(MODEL, inputs([TOMATO] * 16, [b"a tomato"] * 16)).as_numpy("label")[0])
            except InferenceServerException as exc:
                results.append(exc)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert proc.wait(40) == 0
    assert results == [b"tomato"] * 4, results


def test_the_generated_stubs_match_the_proto() -> None:
    grpc_tools = pytest.importorskip("grpc_tools")
    assert grpc_tools
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={out}", f"--pyi_out={out}",
                        f"--grpc_python_out={out}", "service/grpc_v2/inference.proto"], cwd=ROOT, check=True)
        for name in ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py"):
            fresh = (Path(out) / "service" / "grpc_v2" / name).read_text()
            assert fresh == (ROOT / "service" / "grpc_v2" / name).read_text(), f"{name} is stale: regenerate it (see the .proto)"


def test_every_worker_listens_on_the_grpc_port() -> None:
    from benchmarks.procstats import listening_sockets

    port = free_port()
    with running_server(DEFAULT_MODEL, **{**grpc_env(port), "CLASSIFIER_WORKERS": "2"}):
        deadline = time.time() + 30
        while listening_sockets(port) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert listening_sockets(port) == 2  # one socket per worker (SO_REUSEPORT): the kernel spreads connections
        for _ in range(4):  # a new client, so a new connection, each time
            c = tg.InferenceServerClient(f"127.0.0.1:{port}")
            assert c.infer(MODEL, inputs([jpeg_bytes()], [b"a red tomato"])).as_numpy("label").shape == (1,)
            c.close()
