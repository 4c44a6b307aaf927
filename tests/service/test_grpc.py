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
from typing import Any

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


def _grpc_count(url: str, method: str, code: str) -> float:
    m = re.search(rf'classifier_grpc_requests_total\{{code="{code}",method="{method}"\}} ([0-9.e+]+)', httpx.get(f"{url}/metrics").text)
    return float(m.group(1)) if m else 0.0


def test_each_call_is_counted_once_with_its_own_status(server: tuple[str, str]) -> None:
    url, target = server
    c = tg.InferenceServerClient(target)
    before = {code: _grpc_count(url, "ModelMetadata", code) for code in ("OK", "NOT_FOUND")}
    c.get_model_metadata(MODEL)
    status_of(lambda: c.get_model_metadata("nope"))
    after = {code: _grpc_count(url, "ModelMetadata", code) for code in ("OK", "NOT_FOUND")}
    assert {k: after[k] - before[k] for k in after} == {"OK": 1, "NOT_FOUND": 1}


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


# The generator writes its own release into the stubs (grpcio-tools' version; protobuf's gencode
# version and the runtime check that goes with it). Those lines say which generator ran, not what the
# .proto means: they are compared as placeholders, everything else byte for byte.
GENERATOR_LINES = [
    (re.compile(r"(?m)^GRPC_GENERATED_VERSION = '[^']*'$"), "GRPC_GENERATED_VERSION = <grpcio-tools>"),
    (re.compile(r"(?m)^# Protobuf Python Version: .*$"), "# Protobuf Python Version: <protobuf>"),
    (re.compile(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*\d+,\s*\d+,\s*\d+,"),
     "ValidateProtobufRuntimeVersion(<protobuf>,"),
]
STUBS = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def without_generator_release(text: str) -> str:
    for pattern, placeholder in GENERATOR_LINES:
        text = pattern.sub(placeholder, text)
    return text


def generate_stubs(proto_dir: Path, out: Path) -> dict[str, str]:
    # grpcio-tools is in the dev extra: a missing generator is a failed install, not a skip
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={out}", f"--pyi_out={out}",
                    f"--grpc_python_out={out}", "service/grpc_v2/inference.proto"], cwd=proto_dir, check=True)
    return {name: (out / "service" / "grpc_v2" / name).read_text() for name in STUBS}


def test_the_generated_stubs_match_the_proto() -> None:
    with tempfile.TemporaryDirectory() as out:
        fresh = generate_stubs(ROOT, Path(out))
    for name, text in fresh.items():
        committed = (ROOT / "service" / "grpc_v2" / name).read_text()
        assert without_generator_release(text) == without_generator_release(committed), \
            f"{name} is stale: regenerate it (see the .proto)"


def test_a_changed_proto_makes_the_stubs_stale() -> None:
    """The comparison above still sees a real change: a new field and a new method in the .proto are caught."""
    with tempfile.TemporaryDirectory() as tmp:
        proto = Path(tmp) / "service" / "grpc_v2" / "inference.proto"
        proto.parent.mkdir(parents=True)
        text = (ROOT / "service" / "grpc_v2" / "inference.proto").read_text()
        changed = text.replace("message ServerLiveResponse {\n", "message ServerLiveResponse {\n  string extra = 99;\n", 1)
        new_rpc = "  rpc ServerAlive(ServerLiveRequest) returns (ServerLiveResponse) {}\n"
        changed = changed.replace("  rpc ServerLive(", new_rpc + "  rpc ServerLive(", 1)
        assert changed != text
        proto.write_text(changed)
        (Path(tmp) / "out").mkdir()
        fresh = generate_stubs(Path(tmp), Path(tmp) / "out")
    stale = [name for name, t in fresh.items()
             if without_generator_release(t) != without_generator_release((ROOT / "service" / "grpc_v2" / name).read_text())]
    assert stale == list(STUBS)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def test_the_stubs_run_on_the_locked_and_declared_grpcio_and_protobuf() -> None:
    """The stubs refuse to import on a grpcio older than their generator (and protobuf on an older runtime):
    the service image's lock and the serve extra's floor must both satisfy them, or the image fails at start."""
    grpc_stub = (ROOT / "service" / "grpc_v2" / "inference_pb2_grpc.py").read_text()
    pb2 = (ROOT / "service" / "grpc_v2" / "inference_pb2.py").read_text()
    grpc_needs = _version(re.search(r"(?m)^GRPC_GENERATED_VERSION = '([^']*)'", grpc_stub).group(1))
    pb_needs = _version(re.search(r"(?m)^# Protobuf Python Version: (.*)$", pb2).group(1))
    lock = (ROOT / "requirements" / "serve.lock").read_text()
    locked = {m.group(1): _version(m.group(2)) for m in re.finditer(r"(?m)^(grpcio|protobuf)==(\S+)", lock)}
    pyproject = (ROOT / "pyproject.toml").read_text()
    floor = {m.group(1): _version(m.group(2)) for m in re.finditer(r'"(grpcio|protobuf)>=([0-9.]+)', pyproject)}
    assert locked["grpcio"] >= grpc_needs and floor["grpcio"] >= grpc_needs, (locked, floor, grpc_needs)
    assert locked["protobuf"] >= pb_needs and floor["protobuf"] >= pb_needs, (locked, floor, pb_needs)
    assert locked["protobuf"][0] == pb_needs[0]  # protobuf's gencode runs on its own major version only


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


def peak_rss_mb(pid: int) -> float:
    """The process's resident high-water mark (VmHWM): what a burst cost at its worst, not after it."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def test_grpc_floods_stay_within_the_bytes_budget() -> None:
    """32 calls of 3.9 MB at once against a budget of 8 MiB in flight: two calls at a time may hold a
    message (4 MiB each), the others are refused before a handler runs, every refusal frees its memory
    at once, and the worker's peak memory grows by a few budgets, not by 32 messages (125 MB)."""
    port = free_port()
    env = grpc_env(port, CLASSIFIER_MAX_INFLIGHT_BODY_BYTES=str(8 * 1024 * 1024), CLASSIFIER_GRPC_MAX_CONCURRENT_CALLS="2")
    garbage = np.random.default_rng(5).bytes(3_900_000)  # not an image: a call that gets this far ends INVALID_ARGUMENT
    with running_server(DEFAULT_MODEL, **env) as (proc, _):
        c = tg.InferenceServerClient(f"127.0.0.1:{port}")
        assert c.infer(MODEL, inputs([TOMATO], [b"x"])).as_numpy("label").shape == (1,)
        before = peak_rss_mb(proc.pid)
        codes: list[str] = []

        def call() -> None:
            try:
                tg.InferenceServerClient(f"127.0.0.1:{port}").infer(MODEL, inputs([garbage], [b"x"]), client_timeout=60)
                codes.append("OK")
            except InferenceServerException as exc:
                codes.append(str(exc.status()).removeprefix("StatusCode."))

        for _ in range(3):  # three floods: memory a refusal kept would add up
            threads = [threading.Thread(target=call) for _ in range(32)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(90)
        grown = peak_rss_mb(proc.pid) - before
        print(f"peak RSS grew {grown:.0f} MB for 3 x 32 calls of 3.9 MB ({ {c: codes.count(c) for c in set(codes)} })")
        assert len(codes) == 96 and set(codes) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, codes  # each answered
        assert grown < 80, f"the worker's peak RSS grew {grown:.0f} MB"
        big = tg.InferInput("image", [1], "BYTES")  # past the budget's share of one call: refused unread
        big.set_data_from_numpy(np.array([bytes(4_300_000)], dtype=object))
        assert status_of(lambda: c.infer(MODEL, [big]))[0] == "RESOURCE_EXHAUSTED"
        assert c.infer(MODEL, inputs([TOMATO], [b"x"])).as_numpy("label")[0] == b"tomato"


def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def test_counts_and_undecodable_messages_are_invalid_argument_before_parsing(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    env = grpc_env(port, CLASSIFIER_LOG_LEVEL="info")
    with log.open("wb") as out, running_server(DEFAULT_MODEL, stdout=out, **env), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        raw_infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        raw_live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")

        def refused(call: Any, message: bytes) -> str:
            with pytest.raises(grpc.RpcError) as err:
                call(message, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            return str(err.value.details())

        assert "not valid protobuf" in refused(raw_infer, b"\x2a\xff\xff")  # field 5, a length past the end
        assert "not a valid" in refused(raw_live, b"\x0a\x05ab")

        def request() -> service_pb2.ModelInferRequest:
            req = service_pb2.ModelInferRequest(model_name=MODEL)
            t = req.inputs.add(name="image", datatype="BYTES", shape=[1])
            t.contents.bytes_contents.append(TOMATO)
            return req

        many = request()
        many.inputs[0].contents.bytes_contents.extend([b""] * 5000)
        assert "elements in an input's contents: more than 4096" in refused(raw_infer, many.SerializeToString())
        # copies of the contents message merge into one: their elements add up
        contents = service_pb2.InferTensorContents(bytes_contents=[b""] * 3000).SerializeToString()
        copies = request().SerializeToString()
        tensor = service_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1]).SerializeToString()
        tensor += b"".join(b"\x2a" + _varint(len(contents)) + contents for _ in range(3))  # field 5, three times
        copies += b"\x2a" + _varint(len(tensor)) + tensor
        assert "more than 4096" in refused(raw_infer, copies)
        numbers = request()
        numbers.inputs[0].contents.fp32_contents.extend([0.5] * 5000)  # packed: counted by its length
        assert "more than 4096" in refused(raw_infer, numbers.SerializeToString())
        outputs = request()
        for _ in range(17):
            outputs.outputs.add(name="label")
        assert "requested outputs: more than 16" in refused(raw_infer, outputs.SerializeToString())
        twice = request()
        twice.outputs.add(name="label")
        twice.outputs.add(name="label")
        assert "more than once" in refused(raw_infer, twice.SerializeToString())
        typed = request()
        typed.inputs[0].contents.fp32_contents.append(1.0)
        assert "belongs in contents.bytes_contents" in refused(raw_infer, typed.SerializeToString())
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelInfer(request(), timeout=30).model_name == MODEL  # the same request, within bounds
    assert "Traceback" not in log.read_text()


def test_the_grpc_listener_binds_the_services_host() -> None:
    port = free_port()
    with running_server(DEFAULT_MODEL, CLASSIFIER_GRPC_PORT=str(port), CLASSIFIER_WORKERS="1"):  # --host 127.0.0.1
        listening = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if int(local.rsplit(":", 1)[1], 16) == port and state == "0A":
                    listening.append(local.rsplit(":", 1)[0])
        # 127.0.0.1 only (IPv4, or IPv4-mapped on an IPv6 socket), not 0.0.0.0
        assert listening and set(listening) <= {"0100007F", "0000000000000000FFFF00000100007F"}, listening
