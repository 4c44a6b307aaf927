"""The model repository: several models and versions served at once, loaded, unloaded and replaced live."""

from __future__ import annotations

import base64
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from helpers import app_client, jpeg_bytes, make_repository, running_server

JPG = jpeg_bytes()


def labels_of(tiny: Path) -> list[str]:
    import json

    return list(json.loads((tiny / "manifest.json").read_text())["labels"])


@pytest.fixture(scope="module")
def repo(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = labels_of(tiny_artifact)
    return make_repository(
        tmp_path_factory.mktemp("repo"),
        {"alpha": {"1": tiny_artifact, "2": tiny_artifact}, "beta": {"1": tiny_artifact}},
        labels={"alpha/2": [f"v2-{x}" for x in base], "beta/1": [f"beta-{x}" for x in base]},
        policies={"alpha": {"versions": "all", "default_version": "1"}})


def classify(c: Any, **params: Any) -> Any:
    return c.post("/classify", params={"top_k": 8, **params}, files={"image": ("x.jpg", JPG, "image/jpeg")},
                  data={"description": "a red tomato"})


def v2_infer(c: Any, path: str) -> Any:
    return c.post(f"/v2/models/{path}/infer", json={"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(JPG).decode()]},
        {"name": "description", "datatype": "BYTES", "shape": [1], "data": ["a red tomato"]}]})


def test_two_models_and_two_versions_answer_each_with_its_own_labels(repo: Path, tiny_artifact: Path) -> None:
    base = set(labels_of(tiny_artifact))
    with app_client(tiny_artifact, model_repository=repo) as c:
        default = classify(c).json()  # alpha (first by name), pinned version 1
        assert default["model"] == {"name": "alpha", "version": "1"} and {p["label"] for p in default["predictions"]} == base
        v2 = classify(c, model="alpha", version="2").json()
        assert v2["model"]["version"] == "2" and all(p["label"].startswith("v2-") for p in v2["predictions"])
        beta = classify(c, model="beta").json()
        assert beta["model"] == {"name": "beta", "version": "1"} and all(p["label"].startswith("beta-") for p in beta["predictions"])
        # the same image, the same weights: only the label names differ
        assert [p["score"] for p in beta["predictions"]] == [p["score"] for p in default["predictions"]]
        r = v2_infer(c, "beta").json()  # (the label itself is "" here: the model abstains on this odd image)
        assert (r["model_name"], r["model_version"]) == ("beta", "1")
        assert c.get("/v2/models/beta").json()["parameters"]["labels"][0].startswith("beta-")
        r = v2_infer(c, "alpha/versions/2").json()
        assert r["model_version"] == "2"
        assert c.get("/v2/models/alpha/versions/2").json()["parameters"]["labels"][0].startswith("v2-")
        assert c.get("/v2/models/alpha").json()["versions"] == ["1", "2"]
        listed = c.get("/model").json()
        assert {(m["name"], m["version"], m["default"]) for m in listed["models"]} == {
            ("alpha", "1", True), ("alpha", "2", False), ("beta", "1", True)}
        # measured for every version; it may be 0 where a load reused memory an earlier one freed (seen once)
        assert listed["default_model"] == "alpha" and all(isinstance(m["memory_bytes"], int) for m in listed["models"])
        index = c.get("/v2/repository/index").json()
        assert [(i["name"], i["version"], i["state"]) for i in index] == [
            ("alpha", "1", "READY"), ("alpha", "2", "READY"), ("beta", "1", "READY")]
        item = {"image_base64": base64.b64encode(JPG).decode()}
        batch = c.post("/classify/batch", params={"model": "beta"}, json={"items": [item]})
        assert batch.json()["results"][0]["model"]["name"] == "beta"
        metrics = c.get("/metrics").text
        assert 'classifier_rows_total{model="beta",outcome="ok",version="1"}' in metrics


def test_unknown_models_and_versions_are_404_on_every_http_route(repo: Path, tiny_artifact: Path) -> None:
    with app_client(tiny_artifact, model_repository=repo) as c:
        answers = [classify(c, model="nope"), classify(c, model="alpha", version="9"),
                   c.post("/classify/batch", params={"model": "nope"}, json={"items": []}),
                   c.get("/model", params={"model": "nope"}),
                   v2_infer(c, "nope"), v2_infer(c, "alpha/versions/9"), c.get("/v2/models/nope"),
                   c.get("/v2/models/nope/ready"), c.get("/v2/models/alpha/versions/9/ready")]
        for r in answers:
            body = r.json()
            assert r.status_code == 404, (r.request.url, body)
            assert (body["error"]["code"] if isinstance(body["error"], dict) else body["code"]) == "model_not_found"
        # a client-chosen name never becomes a metric label
        assert "nope" not in c.get("/metrics").text


def test_load_and_unload_need_the_api_key_and_change_what_is_served(repo: Path, tiny_artifact: Path) -> None:
    key = {"x-api-key": "secret"}
    with app_client(tiny_artifact, model_repository=repo, api_key="secret") as c:
        assert c.post("/v2/repository/models/beta/unload").status_code == 401
        assert c.post("/v2/repository/models/beta/load").status_code == 401
        assert c.post("/v2/repository/models/beta/unload", headers=key).json() == {"name": "beta", "unloaded": True, "pending_workers": []}
        assert classify(c, model="beta").status_code == 401  # the key guards every route
        assert c.post("/classify", params={"model": "beta"}, headers=key,
                      files={"image": ("x.jpg", JPG, "image/jpeg")}).status_code == 404
        states = {(i["name"], i["version"]): i["state"] for i in c.get("/v2/repository/index", headers=key).json()}
        assert states[("beta", "1")] == "UNAVAILABLE" and states[("alpha", "1")] == "READY"
        loaded = c.post("/v2/repository/models/beta/load", headers=key).json()
        assert [v["version"] for v in loaded["loaded"]] == ["1"]
        assert c.post("/classify", params={"model": "beta"}, headers=key,
                      files={"image": ("x.jpg", JPG, "image/jpeg")}).status_code == 200
        assert c.post("/v2/repository/models/nope/load", headers=key).status_code == 404
    with app_client(tiny_artifact, model_repository=repo) as open_service:  # no key: nobody may change the set
        r = open_service.post("/v2/repository/models/beta/unload")
        assert (r.status_code, r.json()["code"]) == (403, "forbidden")
        assert classify(open_service, model="beta").status_code == 200


def test_a_corrupt_new_version_leaves_the_old_one_serving_and_a_fixed_copy_takes_over(
        tiny_artifact: Path, tmp_path: Path) -> None:
    repo = make_repository(tmp_path, {"alpha": {"1": tiny_artifact}})
    with app_client(tiny_artifact, model_repository=repo, poll_repository_s=0.1) as c:
        assert classify(c).json()["model"]["version"] == "1"
        broken = repo / "alpha" / "2"
        shutil.copytree(tiny_artifact, broken)
        with (broken / "model.onnx").open("r+b") as f:  # one flipped byte: the checksum catches it
            f.seek(1000)
            f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            index = {(i["name"], i["version"]): i for i in c.get("/v2/repository/index").json()}
            if "sha256 mismatch" in index.get(("alpha", "2"), {}).get("reason", ""):
                break
            time.sleep(0.1)
        assert index[("alpha", "2")]["state"] == "UNAVAILABLE" and "sha256 mismatch" in index[("alpha", "2")]["reason"]
        assert index[("alpha", "2")]["reason"].startswith("alpha/2/model.onnx: ")  # no server path
        time.sleep(0.35)  # later polls skip the unchanged broken copy: the old version must still serve
        assert classify(c).json()["model"]["version"] == "1" and c.get("/readyz").status_code == 200
        shutil.copy(tiny_artifact / "model.onnx", broken / "model.onnx")  # fixed in place: retried, takes over
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and classify(c).json()["model"]["version"] != "2":
            time.sleep(0.1)
        assert classify(c).json()["model"]["version"] == "2"
        assert [m["version"] for m in c.get("/model").json()["models"]] == ["2"]  # "latest": the old one is unloaded


def test_the_load_limit_is_kept_and_the_previous_set_serves_on(tiny_artifact: Path, tmp_path: Path) -> None:
    repo = make_repository(tmp_path, {"a": {"1": tiny_artifact}, "b": {"1": tiny_artifact}})
    with app_client(tiny_artifact, model_repository=repo, max_loaded_models=1, api_key="k") as c:
        index = {(i["name"], i["version"]): i for i in c.get("/v2/repository/index", headers={"x-api-key": "k"}).json()}
        assert index[("a", "1")]["state"] == "READY" and "CLASSIFIER_MAX_LOADED_MODELS" in index[("b", "1")]["reason"]
        r = c.post("/v2/repository/models/b/load", headers={"x-api-key": "k"})
        assert (r.status_code, r.json()["code"]) == (422, "model_load_failed")
        ok = c.post("/classify", params={"model": "a"}, headers={"x-api-key": "k"}, files={"image": ("x.jpg", JPG, "image/jpeg")})
        assert ok.status_code == 200


KEY = {"x-api-key": "k"}


def _steady_load(url: str, stop: threading.Event, statuses: Counter[Any], versions: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=30, headers=KEY) as c:
        while not stop.is_set():
            r = classify(c)
            statuses[r.status_code] += 1
            if r.status_code == 200:
                versions.append(r.json()["model"]["version"])


def test_a_new_version_dropped_in_takes_over_with_no_failed_request_on_every_worker(
        tiny_artifact: Path, tmp_path: Path) -> None:
    import tritonclient.grpc as tg
    from helpers import free_port

    base = labels_of(tiny_artifact)
    repo = make_repository(tmp_path / "repo", {"alpha": {"1": tiny_artifact}, "beta": {"1": tiny_artifact}},
                           labels={"beta/1": [f"beta-{x}" for x in base]})
    grpc_port = free_port()
    with running_server(repo, "--model-repository", str(repo), "--poll-repository", "0.2", "--workers", "2",
                        CLASSIFIER_GRPC_PORT=str(grpc_port), CLASSIFIER_API_KEY="k") as (_, url):
        stop, statuses, versions = threading.Event(), Counter[Any](), []
        clients = [threading.Thread(target=_steady_load, args=(url, stop, statuses, versions)) for _ in range(4)]
        for t in clients:
            t.start()
        time.sleep(1.0)
        # the copy arrives under another name and is renamed into place (a half-copied folder would
        # be refused by its checksums and tried again once its files stop changing)
        shutil.copytree(tiny_artifact, tmp_path / "incoming")
        dropped = time.monotonic()
        (tmp_path / "incoming").rename(repo / "alpha" / "2")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (len(versions) > 50 and set(versions[-40:]) == {"2"}):
            time.sleep(0.05)
        switch_s = time.monotonic() - dropped
        time.sleep(0.5)
        stop.set()
        for t in clients:
            t.join()
        print(f"switch: {switch_s:.2f} s after the folder appeared; statuses {dict(statuses)}")
        assert set(statuses) == {200} and sum(statuses.values()) > 100, statuses  # not one failed request
        assert set(versions[-40:]) == {"2"} and versions[0] == "1"

        # unloading through one worker: every worker stops serving it before the call is answered
        with httpx.Client(base_url=url, headers=KEY) as c:
            assert c.post("/v2/repository/models/beta/unload").status_code == 200
        for _ in range(20):  # fresh connections: the kernel spreads them over both workers
            with httpx.Client(base_url=url, headers=KEY) as c:
                assert classify(c, model="beta").status_code == 404
        with httpx.Client(base_url=url, headers=KEY) as c:
            assert c.post("/v2/repository/models/beta/load").status_code == 200
        for _ in range(20):
            with httpx.Client(base_url=url, headers=KEY) as c:
                assert classify(c, model="beta").json()["predictions"][0]["label"].startswith("beta-")  # top_k lists every label

        # gRPC: the same routing, the same 404s
        g = tg.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        meta = [("x-api-key", "k")]
        img = tg.InferInput("image", [1], "BYTES")
        img.set_data_from_numpy(np.array([JPG], dtype=object))
        assert g.infer("beta", [img], headers=dict(meta)).get_response().model_name == "beta"
        assert g.infer("alpha", [img], headers=dict(meta)).get_response().model_version == "2"
        for name, version in (("nope", ""), ("alpha", "9")):
            with pytest.raises(tg.InferenceServerException) as e:
                g.infer(name, [img], model_version=version, headers=dict(meta))
            assert e.value.status() == "StatusCode.NOT_FOUND"


def test_the_owner_topology_serves_the_repository_and_loads_new_versions_on_demand(tiny_artifact: Path, tmp_path: Path) -> None:
    # one owner process holds every version's session; the workers' repositories decide what is served
    base = labels_of(tiny_artifact)
    repo = make_repository(tmp_path / "repo", {"alpha": {"1": tiny_artifact}, "beta": {"1": tiny_artifact}},
                           labels={"beta/1": [f"beta-{x}" for x in base]})
    with running_server(repo, "--model-repository", str(repo), "--poll-repository", "0.2", "--workers", "2",
                        CLASSIFIER_TOPOLOGY="owner") as (_, url), httpx.Client(base_url=url, timeout=30) as c:
        assert classify(c).json()["model"] == {"name": "alpha", "version": "1"}
        beta = classify(c, model="beta").json()
        assert beta["model"]["name"] == "beta" and all(p["label"].startswith("beta-") for p in beta["predictions"])
        assert [p["score"] for p in beta["predictions"]] == [p["score"] for p in classify(c).json()["predictions"]]
        shutil.copytree(tiny_artifact, tmp_path / "incoming")
        (tmp_path / "incoming").rename(repo / "alpha" / "2")  # not in the owner at start: loaded when asked for
        deadline = time.monotonic() + 30
        seen: list[Any] = []
        while time.monotonic() < deadline and seen[-20:] != ["2"] * 20:
            r = classify(c)
            seen.append(r.json()["model"]["version"] if r.status_code == 200 else r.status_code)
        assert set(seen) <= {"1", "2"}, seen  # every answer a 200, from the old version or the new one
        assert seen[-20:] == ["2"] * 20


# --- a model's life under traffic (#34) --------------------------------------------------------------


class SlowUpload:
    """A request whose body arrives in two parts: the head and half the body now, the rest on ``finish``."""

    def __init__(self, url: str, path: str, body: bytes, content_type: str) -> None:
        import http.client

        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=15)
        self.conn.putrequest("POST", path)
        for k, v in {"content-type": content_type, "content-length": str(len(body)), **KEY}.items():
            self.conn.putheader(k, v)
        self.conn.endheaders()
        self.rest = body[len(body) // 2 :]
        self.conn.send(body[: len(body) // 2])

    def finish(self) -> tuple[int, Any]:
        import json

        self.conn.send(self.rest)
        r = self.conn.getresponse()  # a request nobody answers times out here (15 s), failing the test
        status, body = r.status, json.loads(r.read())
        self.conn.close()
        return status, body


def _slow_classify(url: str) -> SlowUpload:
    from helpers import multipart_body

    body, content_type = multipart_body(JPG, "a red tomato")
    return SlowUpload(url, "/classify", body, content_type)


def _slow_batch(url: str, rows: int) -> SlowUpload:
    import json

    item = {"image_base64": base64.b64encode(JPG).decode(), "description": "a red tomato"}
    return SlowUpload(url, "/classify/batch", json.dumps({"items": [item] * rows}).encode(), "application/json")


def test_uploads_still_arriving_across_a_reload_and_a_new_version_are_answered(tiny_artifact: Path, tmp_path: Path) -> None:
    """A request holds the version it resolved from before its body arrives to its answer: a reload
    through the API or a version dropped into the folder waits for it, and the row budget is whole after."""
    repo = make_repository(tmp_path / "repo", {"alpha": {"1": tiny_artifact}})
    with running_server(repo, "--model-repository", str(repo), "--poll-repository", "0.2", CLASSIFIER_API_KEY="k",
                        CLASSIFIER_MAX_QUEUE="16") as (_, url), httpx.Client(base_url=url, timeout=30, headers=KEY) as c:
        single, batch = _slow_classify(url), _slow_batch(url, 8)
        time.sleep(0.3)  # both resolved alpha/1 and wait for the rest of their bodies
        assert c.post("/v2/repository/models/alpha/load").status_code == 200  # a reload: alpha/1 replaced
        status, body = single.finish()
        assert status == 200 and body["model"] == {"name": "alpha", "version": "1"}, body
        status, body = batch.finish()
        assert status == 200 and [r["model"]["version"] for r in body["results"]] == ["1"] * 8, body

        late = _slow_classify(url)
        time.sleep(0.3)
        shutil.copytree(tiny_artifact, tmp_path / "incoming")
        (tmp_path / "incoming").rename(repo / "alpha" / "2")  # the poll swaps alpha/1 out for alpha/2
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and classify(c).json()["model"]["version"] != "2":
            time.sleep(0.1)
        status, body = late.finish()
        assert status == 200 and body["model"] == {"name": "alpha", "version": "1"}, body

        # the worker's row budget is whole: a batch of all 16 rows it admits is served
        item = {"image_base64": base64.b64encode(JPG).decode()}
        full = c.post("/classify/batch", json={"items": [item] * 16})
        assert full.status_code == 200 and all("error" not in r for r in full.json()["results"]), full.text
        assert c.get("/readyz").status_code == 200


def test_a_relative_repository_path_does_not_reload_what_has_not_changed(tiny_artifact: Path, tmp_path: Path) -> None:
    import os

    repo = make_repository(tmp_path / "repo", {"alpha": {"1": tiny_artifact}})
    relative = os.path.relpath(repo) + "/"  # relative to this process's working folder, slash-ended
    with app_client(tiny_artifact, model_repository=Path(relative), poll_repository_s=0.05) as c:
        repository = c.app.state.pipeline.repository
        first = repository.models["alpha"]["1"]
        time.sleep(0.6)  # a dozen polls
        assert repository.models["alpha"]["1"] is first  # the same load: nothing was reloaded
        # a change of its files in place is a change: the next poll reloads it
        manifest = repo / "alpha" / "1" / "manifest.json"
        manifest.write_text(manifest.read_text().replace(f'"{labels_of(tiny_artifact)[0]}"', '"renamed"', 1))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and repository.models["alpha"]["1"] is first:
            time.sleep(0.05)
        assert "renamed" in repository.models["alpha"]["1"].info.labels


def test_every_worker_applies_every_control_call_even_concurrent_ones(tiny_artifact: Path, tmp_path: Path) -> None:
    base = labels_of(tiny_artifact)
    repo = make_repository(tmp_path / "repo", {"alpha": {"1": tiny_artifact}, "beta": {"1": tiny_artifact},
                                               "gamma": {"1": tiny_artifact}})

    def on_every_worker(check: Any, what: str) -> None:
        for _ in range(16):  # fresh connections: the kernel spreads them over both workers
            with httpx.Client(base_url=url, headers=KEY, timeout=30) as fresh:
                assert check(fresh), what

    with running_server(repo, "--model-repository", str(repo), "--workers", "2", CLASSIFIER_API_KEY="k") as (_, url):
        for _ in range(3):  # two unloads at once, through whichever workers took them: both applied everywhere
            answers: list[httpx.Response] = []
            calls = [threading.Thread(target=lambda n=n, out=answers: out.append(
                httpx.post(f"{url}/v2/repository/models/{n}/unload", headers=KEY, timeout=30))) for n in ("beta", "gamma")]
            for t in calls:
                t.start()
            for t in calls:
                t.join()
            assert [a.status_code for a in answers] == [200, 200] and all(a.json()["pending_workers"] == [] for a in answers)
            on_every_worker(lambda c: [classify(c, model=n).status_code for n in ("beta", "gamma")] == [404, 404],
                            "an unload was lost in a worker")
            for n in ("beta", "gamma"):
                assert httpx.post(f"{url}/v2/repository/models/{n}/load", headers=KEY, timeout=30).status_code == 200

        # files changed in place, then a load through one worker: every worker serves the new files
        manifest = repo / "alpha" / "1" / "manifest.json"
        manifest.write_text(manifest.read_text().replace(f'"{base[0]}"', '"renamed"', 1))
        r = httpx.post(f"{url}/v2/repository/models/alpha/load", headers=KEY, timeout=30)
        assert r.status_code == 200 and r.json()["pending_workers"] == []
        on_every_worker(lambda c: "renamed" in {p["label"] for p in classify(c).json()["predictions"]},
                        "a worker still serves the old files")
